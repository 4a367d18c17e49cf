//! Payment -> VMS latency (SPEC §10.2, issue 10): N accounts synced once at
//! full speed, then the daemon runs with the default schedules and limits
//! against emulators with real-world latencies (BILLmanager 150 ms, Active
//! Platform 60 ms, VMS 30 ms per call). PAYMENTS customers who do not pay
//! pay at random moments; each latency is from the credit to the archive
//! permission on the VMS. Then the same through `POST /trigger`, as the
//! BILLmanager hook sends it.
//!
//! cargo bench --bench payments -- [N] [PAYMENTS]   (default 100000 20)

use std::time::{Duration, Instant};

mod common;

use billsync_emulators::lab::Lab;
use common::{credit, paying, unpaid, LabSettings};
use rand::Rng;

const TOKEN: &str = "bench-admin-token-0123456789";

fn main() {
    let args = common::numbers();
    let n = args.first().copied().unwrap_or(100_000);
    let payments = args.get(1).copied().unwrap_or(20);
    common::block_on(bench(n, payments));
}

async fn bench(n: usize, payments: usize) {
    let lab = Lab::start(n / 2, n - n / 2).await.unwrap();
    let mut customers = unpaid(&lab, payments);
    // The initial sync at full speed: not what is measured.
    let t = Instant::now();
    common::initial_sync(&lab).await;
    eprintln!(
        "initial sync of {n} accounts: {:.1} s",
        t.elapsed().as_secs_f64()
    );

    lab.bm.faults.set_latency(Duration::from_millis(150));
    lab.ap.faults.set_latency(Duration::from_millis(60));
    lab.vms.faults.set_latency(Duration::from_millis(30));
    // The defaults: a cycle a minute, payments every 10 s, 20 VMS requests/s.
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
    let settings = lab.settings("", &defaults).unwrap();
    let (daemon, _lock) = billsync::daemon::start(settings, false).await.unwrap();
    let admin = format!("http://{}", daemon.admin_addr);

    let by_trigger = customers.split_off(customers.len() / 2);
    println!("{n} accounts; BILLmanager 150 ms, ActivePlatform 60 ms, VMS 30 ms per call; default schedules");
    println!("| path | payments | p50 (s) | max (s) |");
    println!("|---|---:|---:|---:|");
    let t = Instant::now();
    report("payments schedule", measure(&lab, &customers, None).await);
    report(
        "POST /trigger",
        measure(&lab, &by_trigger, Some(&admin)).await,
    );
    let (cycles, secs) = listing_cycles(&admin).await;
    println!(
        "listing cycles finished in the {:.0} s measured: {cycles}, {secs:.0} s of listing in all",
        t.elapsed().as_secs_f64()
    );
    daemon.stop().await;
}

/// Credits each customer at a random moment (0-30 s apart) and waits for
/// the VMS to grant the archive; with `trigger`, the hook's POST follows.
async fn measure(lab: &Lab, customers: &[(String, String)], trigger: Option<&str>) -> Vec<f64> {
    let client = reqwest::Client::new();
    let mut waits = vec![];
    for (key, login) in customers {
        let gap = rand::rng().random_range(0..30_000);
        tokio::time::sleep(Duration::from_millis(gap)).await;
        credit(lab, key);
        let t = Instant::now();
        if let Some(admin) = trigger {
            let body = serde_json::json!({"accounts": [key]});
            let r = client
                .post(format!("{admin}/trigger"))
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
        }
        // Watched from now on, while the next customers pay.
        let vms = lab.vms.clone();
        let login = login.clone();
        waits.push(tokio::spawn(async move {
            while !paying(&vms, &login) {
                assert!(
                    t.elapsed() < Duration::from_secs(900),
                    "{login} never paid through"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            t.elapsed().as_secs_f64()
        }));
    }
    let done = futures::future::join_all(waits).await;
    done.into_iter().map(|r| r.unwrap()).collect()
}

/// Listing cycles finished so far and their time in all, from the
/// daemon's cycle duration histogram: that payments were measured while
/// listings ran, not between them.
async fn listing_cycles(admin: &str) -> (u64, f64) {
    let text = reqwest::Client::new()
        .get(format!("{admin}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        let prefix = format!("billsync_cycle_duration_seconds_{name}{{kind=\"incremental\"}} ");
        (text.lines())
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    };
    (value("count") as u64, value("sum"))
}

fn report(path: &str, mut secs: Vec<f64>) {
    secs.sort_by(|a, b| a.total_cmp(b));
    let p50 = secs[secs.len() / 2];
    let max = secs[secs.len() - 1];
    println!("| {path} | {} | {p50:.1} | {max:.1} |", secs.len());
}
