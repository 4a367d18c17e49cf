//! A compressed day (SPEC §10.1, issue 10): requests per minute to each
//! system with rolling re-verification, against today's nightly full
//! resync, at the real-world latencies of `payments.rs` (BILLmanager 150 ms,
//! ActivePlatform 60 ms, VMS 30 ms per call) and the default schedules and
//! limits. One hour stands for the day (`reverify_hours = 1`) and N accounts
//! for 24 × N, so each minute re-verifies as many accounts as 24 × N do over
//! a real day (the default 4,200 stands for 100,800). The full resync's peak
//! rate is set by the limits, not by N; at 24 × N it lasts 24 times longer.
//! Customers pay at random moments in both phases: their latency shows
//! whether a payment waits for either.
//!
//! cargo bench --bench day -- [N] [MINUTES]   (default 4200 15)

use std::time::{Duration, Instant};

mod common;

use billsync_emulators::lab::Lab;
use common::{credit, paying, unpaid, LabSettings};
use rand::Rng;

const TOKEN: &str = "bench-admin-token-0123456789";

fn main() {
    let args = common::numbers();
    let n = args.first().copied().unwrap_or(4_200);
    let minutes = args.get(1).copied().unwrap_or(15);
    common::block_on(bench(n, minutes));
}

/// Requests each system received in one minute.
#[derive(Debug, Clone, Copy, Default)]
struct Minute {
    bm: u64,
    ap: u64,
    vms: u64,
}

fn totals(lab: &Lab) -> Minute {
    Minute {
        bm: lab.bm.total_calls(),
        ap: lab.ap.total_calls(),
        vms: lab.vms.served(),
    }
}

async fn bench(n: usize, minutes: usize) {
    let lab = Lab::start(n / 2, n - n / 2).await.unwrap();
    // About one payment every two minutes of the rolling phase, as many
    // during the resync.
    let mut customers = unpaid(&lab, minutes.div_ceil(2).max(2));
    common::initial_sync(&lab).await;

    lab.bm.faults.set_latency(Duration::from_millis(150));
    lab.ap.faults.set_latency(Duration::from_millis(60));
    lab.vms.faults.set_latency(Duration::from_millis(30));
    println!("{n} accounts (standing for {}), one hour standing for the day; BILLmanager 150 ms, ActivePlatform 60 ms, VMS 30 ms per call; default schedules and limits", n * 24);

    let nightly_customers = customers.split_off(customers.len() / 2);
    let rolling = phase(&lab, "1", false, &customers, Some(minutes)).await;
    let nightly = phase(&lab, "0", true, &nightly_customers, None).await;
    println!();
    println!("| phase | minutes | BILLmanager peak/min | ActivePlatform peak/min | VMS peak/min | VMS mean/min | payments | payment max (s) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    summary("rolling (reverify_hours = 1)", &rolling);
    summary("nightly full resync", &nightly);
}

struct Phase {
    minutes: Vec<Minute>,
    waits: Vec<f64>,
}

/// Runs the daemon: for `minutes`, or (`resync`) until the full resync it
/// starts with has finished. Customers pay at random moments meanwhile.
async fn phase(
    lab: &Lab,
    reverify_hours: &str,
    resync: bool,
    customers: &[(String, String)],
    minutes: Option<usize>,
) -> Phase {
    let env = [
        ("BILLSYNC__DAEMON__SCHEDULE", "0 * * * * *"),
        ("BILLSYNC__DAEMON__PAYMENTS_SCHEDULE", "*/10 * * * * *"),
        ("BILLSYNC__DAEMON__REVERIFY_HOURS", reverify_hours),
        ("BILLSYNC__DAEMON__FULL_RESYNC_SCHEDULE", ""),
        ("BILLSYNC__VMS__MAX_REQUESTS_PER_SECOND", "20"),
        ("BILLSYNC__VMS__CONCURRENCY", "4"),
        ("BILLSYNC__ADMIN__LISTEN", "127.0.0.1:0"),
        ("BILLSYNC__ADMIN__TOKEN", TOKEN),
        ("BILLSYNC__LOG__LEVEL", "error"),
    ];
    let settings = lab.settings("", &env).unwrap();
    let (daemon, lock) = billsync::daemon::start(settings, resync).await.unwrap();
    let admin = format!("http://{}", daemon.admin_addr);
    let label = if resync { "nightly" } else { "rolling" };
    // The metrics are the process's: the initial sync counted a full cycle.
    let fulls = full_resyncs(&admin).await;
    // Payments spread over the rolling phase; during the resync, quickly.
    let max_gap = minutes.map_or(40, |m| 2 * m as u64 * 60 / customers.len().max(1) as u64);
    let (waits, out) = tokio::join!(
        pay(lab, customers, Duration::from_secs(max_gap)),
        sample(lab, &admin, label, minutes, fulls)
    );
    daemon.stop().await;
    drop(lock);
    Phase {
        minutes: out,
        waits,
    }
}

/// Requests per minute, for `minutes`, or until one more full resync
/// than `fulls` finished.
async fn sample(
    lab: &Lab,
    admin: &str,
    label: &str,
    minutes: Option<usize>,
    fulls: u64,
) -> Vec<Minute> {
    let mut out = vec![];
    let mut last = totals(lab);
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let now = totals(lab);
        let m = Minute {
            bm: now.bm - last.bm,
            ap: now.ap - last.ap,
            vms: now.vms - last.vms,
        };
        last = now;
        out.push(m);
        eprintln!("{label} minute {}: {m:?}", out.len());
        let done = match minutes {
            Some(limit) => out.len() >= limit,
            None => full_resyncs(admin).await > fulls || out.len() >= 180,
        };
        if done {
            return out;
        }
    }
}

/// Each customer pays up to `max_gap` after the previous one; the latency
/// of each is from the credit to the archive on the VMS.
async fn pay(lab: &Lab, customers: &[(String, String)], max_gap: Duration) -> Vec<f64> {
    let mut waits = vec![];
    for (key, login) in customers {
        let gap = rand::rng().random_range(Duration::ZERO..max_gap);
        tokio::time::sleep(gap).await;
        credit(lab, key);
        let t = Instant::now();
        while !paying(&lab.vms, login) {
            assert!(
                t.elapsed() < Duration::from_secs(900),
                "{login} never paid through"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        waits.push(t.elapsed().as_secs_f64());
    }
    waits
}

/// Full cycles finished, from `/metrics`.
async fn full_resyncs(admin: &str) -> u64 {
    let text = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("billsync_cycles_total{kind=\"full\""))
        .filter(|l| !l.contains("skipped"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn summary(name: &str, p: &Phase) {
    let peak = |f: fn(&Minute) -> u64| p.minutes.iter().map(f).max().unwrap_or(0);
    let vms_mean = p.minutes.iter().map(|m| m.vms).sum::<u64>() as f64 / p.minutes.len() as f64;
    let max_wait = p.waits.iter().copied().fold(0.0, f64::max);
    println!(
        "| {name} | {} | {} | {} | {} | {vms_mean:.0} | {} | {max_wait:.1} |",
        p.minutes.len(),
        peak(|m| m.bm),
        peak(|m| m.ap),
        peak(|m| m.vms),
        p.waits.len(),
    );
}
