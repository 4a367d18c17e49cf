//! `sandbox [--accounts N]`: the three emulators on loopback with N
//! generated accounts, a temporary state file, one full sync, and a readable
//! account of what was pushed. The way to try billsync, and rules, safely.

use std::collections::BTreeMap;

use crate::emulators::lab::Lab;
use crate::engine::{CycleOptions, Engine};

pub async fn run(accounts: usize) -> u8 {
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
    let extra = r#"
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
    let settings = match lab.settings(extra, &[]) {
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
    let engine = match Engine::new(settings).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("billsync: {e}");
            return super::EXIT_ABORTED;
        }
    };
    let bar = super::progress::terminal();
    let opts = CycleOptions {
        full: true,
        progress: bar.as_ref().map(|(p, _)| p.clone()),
        ..Default::default()
    };
    let report = engine.run_cycle(&opts).await;
    if let Some((_, b)) = bar {
        b.finish_and_clear();
    }
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("billsync: cycle aborted: {e}");
            return super::EXIT_ABORTED;
        }
    };
    println!();
    super::sync::print_human(&report);
    println!();
    print_pushed(&lab);
    let second = engine.run_cycle(&CycleOptions::default()).await;
    if let Ok(r) = second {
        println!();
        println!(
            "a second, incremental cycle: {} ({} operations planned, {} VMS requests in all so far)",
            r.result,
            r.operations.create + r.operations.update + r.operations.delete,
            lab.vms.requests()
        );
    }
    println!();
    println!(
        "Try it against the same emulators while they run: e.g. `billsync --config {} status`",
        lab.config_path().display()
    );
    println!("(they stop when this command exits)");
    engine.store.close().await;
    super::sync::exit_code(&report)
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
