//! `sandbox [--accounts N]`: the three emulators on loopback with N
//! generated accounts, a temporary state file, one full sync, and a readable
//! account of what was pushed. The way to try billsync, and rules, safely.

use std::collections::BTreeMap;

use billsync::engine::CycleReport;
use billsync_emulators::lab::Lab;

pub async fn run(accounts: usize, once: bool) -> u8 {
    let bm_n = accounts / 2;
    let ap_n = accounts - bm_n;
    let lab = match Lab::start(bm_n, ap_n).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("billsync: cannot start the emulators: {e}");
            return super::EXIT_ABORTED;
        }
    };
    // A little history, so the payment rules have something to see.
    let today = chrono::Utc::now();
    for id in (1..=bm_n as u64).step_by(3) {
        lab.bm
            .add_payment(id, "20.00", "4", &today.format("%Y-%m-%d").to_string());
    }
    for i in (1..=ap_n as u64).step_by(4) {
        lab.ap
            .add_payment(2_000_000 + i, "15.00", "completed", &today.to_rfc3339());
    }
    // The admin token lives in a 0600 file, never on the screen.
    let token_path = lab.dir.path().join("admin.token");
    let token = billsync::vms::random_password();
    if let Err(e) = write_private(&token_path, &token) {
        eprintln!("billsync: cannot write {}: {e}", token_path.display());
        return super::EXIT_ABORTED;
    }
    let token_file = token_path.display().to_string();
    let path = lab.write_config(EXTRA);
    let env = [("BILLSYNC__ADMIN__TOKEN_FILE".to_string(), token_file)];
    let settings = match billsync::config::load(&path, &env).map(|(s, _)| s) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("billsync: sandbox config: {e}");
            return super::EXIT_CONFIG;
        }
    };
    println!("billsync sandbox: {bm_n} BILLmanager and {ap_n} ActivePlatform accounts on loopback");
    println!("  BILLmanager     {}/billmgr", lab.bm_srv.base_url());
    println!("  ActivePlatform  {}", lab.ap_srv.base_url());
    println!("  VMS             {}", lab.vms_srv.base_url());
    println!("  config          {}", lab.config_path().display());
    println!("  state           {}", lab.state_path().display());
    let store_path = settings.daemon.state_path.clone();
    let (daemon, lock) = match billsync::daemon::start(settings, true).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("billsync: {e}");
            return super::EXIT_ABORTED;
        }
    };
    println!("  admin           http://{}", daemon.admin_addr);
    println!();
    println!("running the first (full) sync...");
    let store = match billsync::store::Store::open(&store_path).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("billsync: {e}");
            return super::EXIT_ABORTED;
        }
    };
    let report = loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let last = store.last_cycles(1).await.unwrap_or_default();
        if let Some(r) = last.into_iter().next() {
            if let Ok(r) = serde_json::from_value::<CycleReport>(r) {
                break r;
            }
        }
    };
    super::sync::print_human(&report);
    println!();
    print_pushed(&lab);
    println!();
    let admin = format!("http://{}", daemon.admin_addr);
    println!("the daemon keeps running incremental cycles every 2 s. Try:");
    println!("  curl {admin}/status");
    println!("  curl {admin}/metrics");
    println!(
        "  curl -X POST -H \"Authorization: Bearer $(cat {})\" {admin}/resync",
        token_path.display()
    );
    println!("  billsync --config {} status", lab.config_path().display());
    let code = super::sync::exit_code(&report);
    if once {
        daemon.stop().await;
        drop(lock);
        store.close().await;
        return code;
    }
    println!("Ctrl-C stops the daemon and the emulators.");
    billsync::daemon::wait_for_signal().await;
    daemon.stop().await;
    drop(lock);
    store.close().await;
    super::EXIT_OK
}

const EXTRA: &str = r#"
[vms.tree]
enabled = true
type = "cameras"

[permissions]
managed = ["archives-show", "archives-download", "archives-preview-download"]

[[permissions.rules]]
name = "non-negative balance"
min_available = 0
grant = ["archives-show", "archives-preview-download"]

[[permissions.rules]]
name = "paid in the last 30 days"
paid_within_days = 30
grant = ["archives-download"]
"#;

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

fn print_pushed(lab: &Lab) {
    let data = lab.vms.data();
    let mut by_call: BTreeMap<(String, String, u16), usize> = BTreeMap::new();
    for e in &data.events {
        *by_call
            .entry((e.method.clone(), e.path.clone(), e.status))
            .or_default() += 1;
    }
    println!("what the VMS received:");
    for ((method, path, status), n) in &by_call {
        println!("  {n:>6} x {method:<6} /api/v1/billing/{path:<12} -> {status}");
    }
    let mut by_perms: BTreeMap<String, usize> = BTreeMap::new();
    for u in data.users.values() {
        let managed: Vec<&str> = u
            .permissions
            .iter()
            .filter(|p| p.starts_with("archives-"))
            .map(String::as_str)
            .collect();
        let key = format!(
            "{:<8} {}",
            u.status,
            if managed.is_empty() {
                "(no archive access)".to_string()
            } else {
                managed.join(" + ")
            }
        );
        *by_perms.entry(key).or_default() += 1;
    }
    println!(
        "VMS users now ({}), by status and archive permissions:",
        data.users.len()
    );
    for (k, n) in &by_perms {
        println!("  {n:>6}  {k}");
    }
    println!("tree elements: {}", data.tree.len());
    for u in data.users.values().take(3) {
        println!(
            "  e.g. {} [{}] {} properties={} permissions={:?}",
            u.login, u.user_type, u.status, u.properties, u.permissions
        );
    }
}
