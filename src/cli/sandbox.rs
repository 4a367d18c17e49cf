//! `sandbox [--accounts N] [--once] [--keep DIR]`: the three emulators on
//! loopback with N generated accounts, a state file of its own, one full
//! sync (with progress), a readable account of what was pushed, then the
//! daemon with commands to try, each of which works as printed. The way to
//! try billsync, and rules, safely.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use billsync::config::Settings;
use billsync::engine::{CycleOptions, CycleReport, Engine};
use billsync::store::StateLock;
use billsync_emulators::lab::Lab;

use super::SandboxArgs;

pub async fn run(args: SandboxArgs) -> u8 {
    match sandbox(args).await {
        Ok(code) | Err(code) => code,
    }
}

async fn sandbox(args: SandboxArgs) -> Result<u8, u8> {
    let (mut lab, settings, token_path) = prepare(args.accounts, args.keep.as_deref()).await?;
    print_header(&lab);
    let report = first_sync(&settings).await?;
    super::sync::print_human(&report);
    outln!();
    print_pushed(&lab);
    outln!();
    let code = super::sync::exit_code(&report);
    let kept = args.keep.is_some();
    lab.dir.disable_cleanup(kept);
    let cli = Commands::new(&lab)?;
    if args.once {
        if kept {
            outln!("kept in {}; it still answers:", lab.dir.path().display());
            outln!("  {}", cli.status());
        }
        return Ok(code);
    }
    let (daemon, lock) = billsync::daemon::start(settings, false)
        .await
        .map_err(|e| fail(&e))?;
    let admin = format!("http://{}", daemon.admin_addr);
    outln!("the daemon runs an incremental cycle every 2 s. Try, in another terminal:");
    outln!("  curl -fsS {admin}/status");
    outln!("  curl -fsS {admin}/metrics");
    outln!(
        "  curl -fsS -X POST -H \"Authorization: Bearer $(cat {})\" {admin}/resync",
        quoted(&token_path)
    );
    outln!("  {}", cli.status());
    outln!("  {}", cli.explain(&lab));
    outln!("  {}", cli.run("sync --dry-run"));
    match kept {
        true => outln!("Ctrl-C stops the daemon and the emulators; the files stay."),
        false => outln!("Ctrl-C stops the daemon and the emulators, and deletes the files."),
    }
    billsync::daemon::wait_for_signal().await;
    daemon.stop().await;
    drop(lock);
    Ok(super::EXIT_OK)
}

/// The emulators with a little payment history, the admin token in a 0600
/// file, and a config that says everything the daemon uses.
async fn prepare(accounts: usize, keep: Option<&Path>) -> Result<(Lab, Settings, PathBuf), u8> {
    let bm_n = accounts / 2;
    let ap_n = accounts - bm_n;
    let lab = Lab::start_in(bm_n, ap_n, keep)
        .await
        .map_err(|e| fail(&format!("cannot start the emulators: {e}")))?;
    let today = chrono::Utc::now();
    for id in (1..=bm_n as u64).step_by(3) {
        lab.bm
            .add_payment(id, "20.00", "4", &today.format("%Y-%m-%d").to_string());
    }
    for i in (1..=ap_n as u64).step_by(4) {
        lab.ap
            .add_payment(2_000_000 + i, "15.00", "completed", &today.to_rfc3339());
    }
    add_services(&lab);
    // The admin token lives in a 0600 file, never on the screen.
    let token_path = lab.dir.path().join("admin.token");
    let token = billsync::vms::random_password();
    write_private(&token_path, &token)
        .map_err(|e| fail(&format!("cannot write {}: {e}", token_path.display())))?;
    let port = free_port().map_err(|e| fail(&format!("no free loopback port: {e}")))?;
    let admin = format!(
        "listen = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"",
        token_path.display()
    );
    let path = lab.write_config_text(&lab.config_with_admin(EXTRA, &admin));
    let settings = billsync::config::load(&path, &[])
        .map(|(s, _)| s)
        .map_err(|e| {
            eprintln!("billsync: sandbox config: {e}");
            super::EXIT_CONFIG
        })?;
    Ok((lab, settings, token_path))
}

/// A port free now, for the admin endpoint the printed commands name.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn print_header(lab: &Lab) {
    let (bm, ap) = (lab.bm.data().accounts.len(), lab.ap.data().accounts.len());
    outln!("billsync sandbox: {bm} BILLmanager and {ap} ActivePlatform accounts on loopback");
    outln!("  BILLmanager     {}/billmgr", lab.bm_srv.base_url());
    outln!("  ActivePlatform  {}", lab.ap_srv.base_url());
    outln!("  VMS             {}", lab.vms_srv.base_url());
    outln!("  config          {}", lab.config_path().display());
    outln!("  state           {}", lab.state_path().display());
    outln!("  rules           plan \"Video 7\": archives-show; plan \"Video 30\": all three archive permissions");
    outln!("                  and the group \"{CITY}\"; every active account sees its own tree element");
    outln!();
}

/// The first full sync, run here (with progress on a terminal) as
/// `billsync sync --full` would, before the daemon starts.
async fn first_sync(settings: &Settings) -> Result<CycleReport, u8> {
    let _lock = StateLock::try_acquire(&settings.daemon.state_path).map_err(|e| fail(&e))?;
    let engine = Engine::new(settings.clone()).await.map_err(|e| fail(&e))?;
    outln!("the first (full) sync:");
    let bar = super::progress::terminal();
    let opts = CycleOptions {
        full: true,
        progress: bar.as_ref().map(|(p, _)| p.clone()),
        ..Default::default()
    };
    let report = engine.run_cycle(&opts).await;
    if let Some((_, bar)) = bar {
        bar.finish_and_clear();
    }
    engine.store.close().await;
    report.map_err(|e| fail(&e))
}

/// The billsync commands the sandbox suggests: this very binary, with the
/// sandbox's config.
struct Commands {
    prefix: String,
}

impl Commands {
    fn new(lab: &Lab) -> Result<Self, u8> {
        let exe = std::env::current_exe().map_err(|e| fail(&e))?;
        let prefix = format!("{} --config {}", quoted(&exe), quoted(&lab.config_path()));
        Ok(Self { prefix })
    }

    fn run(&self, args: &str) -> String {
        format!("{} {args}", self.prefix)
    }

    fn status(&self) -> String {
        self.run("status")
    }

    fn explain(&self, lab: &Lab) -> String {
        let login = lab
            .ap
            .data()
            .accounts
            .first()
            .map(|a| a.email.to_lowercase());
        self.run(&format!("explain {}", login.unwrap_or_default()))
    }
}

/// A path as a shell word.
fn quoted(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:@,=".contains(c);
    match text.chars().all(plain) {
        true => text,
        false => format!("'{}'", text.replace('\'', r"'\''")),
    }
}

fn fail(e: &dyn std::fmt::Display) -> u8 {
    eprintln!("billsync: {e}");
    super::EXIT_ABORTED
}

/// A public camera group the operator made by hand (seeded in the VMS
/// emulator's tree): "Video 30" customers also see the city's cameras.
const CITY: &str = "city-cameras";

/// What the customers bought decides what they get (SPEC §12): a video
/// service on plan "Video 7" or "Video 30" in either billing system. With
/// tree elements and camera access on, each active account's user sees
/// its own element (its home cameras); "Video 30" adds the city's.
const EXTRA: &str = r#"
[sources.billmanager.services]
item_types = ["videocam"]

[sources.activeplatform.services]
enabled = true

[vms.tree]
enabled = true
type = "cameras"

[vms.cameras]
enabled = true

[permissions]
managed = ["archives-show", "archives-download", "archives-preview-download"]

[[permissions.rules]]
name = "Video 7"
plans = ["Video 7"]
grant = ["archives-show"]

[[permissions.rules]]
name = "Video 30"
plans = ["Video 30"]
grant = ["archives-show", "archives-download", "archives-preview-download"]
camera_groups = ["city-cameras"]
"#;

/// Plan of the `i`th account's video service (none for every fifth) and
/// whether it is suspended (every seventh).
fn plan_of(i: u64) -> Option<(u64, &'static str, bool)> {
    let suspended = i.is_multiple_of(7);
    match i % 5 {
        0 => None,
        1 | 3 => Some((30, "Video 30", suspended)),
        _ => Some((7, "Video 7", suspended)),
    }
}

/// A video service for most accounts of both emulators.
fn add_services(lab: &Lab) {
    use billsync_emulators::activeplatform::ApSubscription;
    use billsync_emulators::billmanager::BmService;
    let bm_ids: Vec<u64> = lab.bm.data().accounts.iter().map(|a| a.id).collect();
    for (i, id) in bm_ids.into_iter().enumerate() {
        if let Some((plan, name, suspended)) = plan_of(i as u64 + 1) {
            lab.bm.add_service(BmService {
                id: 10_000 + id,
                item_type: "videocam".into(),
                account_id: id,
                pricelist: name.into(),
                pricelist_id: Some(plan),
                item_status: if suspended { "3" } else { "2" }.into(),
                ..Default::default()
            });
        }
    }
    lab.vms.add_tree_element(CITY, "City cameras", "cameras");
    let mut ap = lab.ap.data();
    ap.plans.insert(7, "Video 7".into());
    ap.plans.insert(30, "Video 30".into());
    let ap_ids: Vec<u64> = ap.accounts.iter().map(|a| a.id).collect();
    for (i, id) in ap_ids.into_iter().enumerate() {
        if let Some((plan, _, suspended)) = plan_of(i as u64 + 1) {
            ap.subscriptions.push(ApSubscription {
                id: 20_000 + i as u64,
                plan_id: plan,
                account_id: id,
                name: "Home video".into(),
                status: if suspended { "stopped" } else { "active" }.into(),
                ..Default::default()
            });
        }
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
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

/// A user's camera groups, its own tree element called "own".
fn cameras(u: &billsync_emulators::vms::VmsUser) -> String {
    let billing_id = u.billing_info["billing_id"].as_str().unwrap_or("");
    let groups: Vec<&str> = (u.camera_groups.iter())
        .map(|g| if g == billing_id { "own" } else { g.as_str() })
        .collect();
    match groups.is_empty() {
        true => "(no cameras)".into(),
        false => format!("cameras: {}", groups.join(" + ")),
    }
}

fn print_pushed(lab: &Lab) {
    let data = lab.vms.data();
    let mut by_call: BTreeMap<(String, String, u16), usize> = BTreeMap::new();
    for e in &data.events {
        *by_call
            .entry((e.method.clone(), e.path.clone(), e.status))
            .or_default() += 1;
    }
    outln!("what the VMS received (a create, a PATCH for users granted permissions, then each camera set):");
    for ((method, path, status), n) in &by_call {
        outln!("  {n:>6} x {method:<6} /api/v1/billing/{path:<12} -> {status}");
    }
    let mut by_perms: BTreeMap<String, usize> = BTreeMap::new();
    for u in data.users.values() {
        let managed: Vec<&str> = u
            .permissions
            .iter()
            .filter(|p| p.starts_with("archives-"))
            .map(String::as_str)
            .collect();
        let perms = match managed.is_empty() {
            true => "(no archive access)".to_string(),
            false => managed.join(" + "),
        };
        *by_perms
            .entry(format!("{:<8} {perms:<60} {}", u.status, cameras(u)))
            .or_default() += 1;
    }
    outln!(
        "VMS users now ({}), by status, the archive permissions and the camera groups billsync manages:",
        data.users.len()
    );
    for (k, n) in &by_perms {
        outln!("  {n:>6}  {k}");
    }
    outln!("tree elements: {}", data.tree.len());
}
