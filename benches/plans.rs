//! Plan -> VMS latency (SPEC §12.4, issue 19): N accounts synced once at
//! full speed, every ActivePlatform account subscribed to "Video 7"; then
//! the daemon runs with the default schedules and limits against emulators
//! with the payments bench's real-world latencies (BILLmanager 150 ms,
//! ActivePlatform 60 ms, VMS 30 ms per call), services read by both
//! sources and camera access on. UPGRADES customers move to "Video 30" at
//! random moments, each followed by the `POST /trigger {"services": [..]}`
//! a billing hook sends; each latency is from the upgrade to the VMS user
//! holding both the new permission and the new camera group.
//!
//! cargo bench --bench plans -- [N] [UPGRADES]   (default 100000 20)

use std::time::{Duration, Instant};

mod common;

use billsync_emulators::activeplatform::ApSubscription;
use billsync_emulators::lab::Lab;
use billsync_emulators::vms::VmsEmulator;
use common::LabSettings;
use rand::Rng;

const TOKEN: &str = "bench-admin-token-0123456789";

/// Both plans grant by rule; "Video 30" adds a permission and a group.
const RULES: &str = r#"
[sources.activeplatform.services]
enabled = true

[vms.cameras]
enabled = true

[[permissions.rules]]
name = "Video 7"
sources = ["activeplatform"]
plans = ["Video 7"]
grant = ["archives-show"]

[[permissions.rules]]
name = "Video 30"
sources = ["activeplatform"]
plans = ["Video 30"]
grant = ["archives-show", "archives-download", "archives-preview-download"]
camera_groups = ["hd-cameras"]
"#;

fn main() {
    let args = common::numbers();
    let n = args.first().copied().unwrap_or(100_000);
    let upgrades = args.get(1).copied().unwrap_or(20);
    common::block_on(bench(n, upgrades));
}

/// Every active ActivePlatform account on "Video 7"; the subscription ids
/// of the first `k`, with their logins.
fn subscribe(lab: &Lab, k: usize) -> Vec<(u64, String)> {
    let mut ap = lab.ap.data();
    ap.plans.insert(7, "Video 7".into());
    ap.plans.insert(30, "Video 30".into());
    let active: Vec<(u64, String)> = (ap.accounts.iter())
        .filter(|a| a.status == "active")
        .map(|a| (a.id, a.email.trim().to_lowercase()))
        .collect();
    for (id, _) in &active {
        ap.subscriptions.push(ApSubscription {
            id: 500_000 + id,
            plan_id: 7,
            account_id: *id,
            name: "Home video".into(),
            status: "active".into(),
            ..Default::default()
        });
    }
    (active.into_iter().take(k))
        .map(|(id, login)| (500_000 + id, login))
        .collect()
}

async fn bench(n: usize, upgrades: usize) {
    let lab = Lab::start(n / 2, n - n / 2).await.unwrap();
    let customers = subscribe(&lab, upgrades);
    let t = Instant::now();
    let fast = lab
        .settings(RULES, &[("BILLSYNC__VMS__CONCURRENCY", "8")])
        .unwrap();
    let engine = billsync::engine::Engine::new(fast).await.unwrap();
    let full = billsync::engine::CycleOptions {
        full: true,
        ..Default::default()
    };
    engine.run_cycle(&full).await.unwrap();
    engine.store.close().await;
    eprintln!(
        "initial sync of {n} accounts: {:.1} s",
        t.elapsed().as_secs_f64()
    );

    lab.bm.faults.set_latency(Duration::from_millis(150));
    lab.ap.faults.set_latency(Duration::from_millis(60));
    lab.vms.faults.set_latency(Duration::from_millis(30));
    let defaults = [
        ("BILLSYNC__DAEMON__SCHEDULE", "0 * * * * *"),
        ("BILLSYNC__DAEMON__PAYMENTS_SCHEDULE", "*/10 * * * * *"),
        ("BILLSYNC__DAEMON__REVERIFY_HOURS", "24"),
        ("BILLSYNC__DAEMON__CONTROL_POLL_SECS", "5"),
        ("BILLSYNC__VMS__MAX_REQUESTS_PER_SECOND", "20"),
        ("BILLSYNC__VMS__CONCURRENCY", "4"),
        ("BILLSYNC__ADMIN__LISTEN", "127.0.0.1:0"),
        ("BILLSYNC__ADMIN__TOKEN", TOKEN),
        ("BILLSYNC__LOG__LEVEL", "error"),
    ];
    let settings = lab.settings(RULES, &defaults).unwrap();
    let (daemon, _lock) = billsync::daemon::start(settings, false).await.unwrap();
    let admin = format!("http://{}", daemon.admin_addr);
    println!("{n} accounts; BILLmanager 150 ms, ActivePlatform 60 ms, VMS 30 ms per call; default schedules");
    println!("| path | upgrades | p50 (s) | max (s) |");
    println!("|---|---:|---:|---:|");
    let secs = measure(&lab, &customers, &admin).await;
    report("POST /trigger with services", secs);
    daemon.stop().await;
}

/// Upgrades each customer at a random moment (0-30 s apart), sends the
/// hook's trigger, and waits for the VMS to hold what "Video 30" grants.
async fn measure(lab: &Lab, customers: &[(u64, String)], admin: &str) -> Vec<f64> {
    let client = reqwest::Client::new();
    let mut waits = vec![];
    for (sub, login) in customers {
        let gap = rand::rng().random_range(0..30_000);
        tokio::time::sleep(Duration::from_millis(gap)).await;
        {
            let mut ap = lab.ap.data();
            let s = ap.subscriptions.iter_mut().find(|s| s.id == *sub).unwrap();
            s.plan_id = 30;
        }
        let t = Instant::now();
        let body = serde_json::json!({"services": [format!("activeplatform:{sub}")]});
        let r = (client.post(format!("{admin}/trigger")))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let vms = lab.vms.clone();
        let login = login.clone();
        waits.push(tokio::spawn(async move {
            while !upgraded(&vms, &login) {
                assert!(
                    t.elapsed() < Duration::from_secs(900),
                    "{login} never got its upgrade"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            t.elapsed().as_secs_f64()
        }));
    }
    let done = futures::future::join_all(waits).await;
    done.into_iter().map(|r| r.unwrap()).collect()
}

fn upgraded(vms: &VmsEmulator, login: &str) -> bool {
    vms.user(login).is_some_and(|u| {
        u.permissions.contains("archives-download") && u.camera_groups.contains("hd-cameras")
    })
}

fn report(path: &str, mut secs: Vec<f64>) {
    secs.sort_by(|a, b| a.total_cmp(b));
    let p50 = secs[secs.len() / 2];
    let max = secs[secs.len() - 1];
    println!("| {path} | {} | {p50:.1} | {max:.1} |", secs.len());
}
