//! Shared by the benchmarks (not every one uses every helper).
#![allow(dead_code)]

use billsync_emulators::lab::Lab;

#[path = "../../tests/common/mod.rs"]
mod lab_settings;
use billsync_emulators::vms::VmsEmulator;
pub use lab_settings::LabSettings;

/// The daemon's allocator (see `src/main.rs`), so RSS figures are its.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The numeric arguments after the bench's name.
pub fn numbers() -> Vec<usize> {
    std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect()
}

/// Runs a bench on a multi-threaded runtime, with the allocator tuned, as
/// the daemon runs.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    billsync::allocator::purge_freed_memory_soon();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// This process's peak resident set size (VmHWM), in MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The customers who will pay: the first `k` active accounts of each
/// source (one on hold would never get the archive), not paying now;
/// alternately BILLmanager and ActivePlatform.
pub fn unpaid(lab: &Lab, k: usize) -> Vec<(String, String)> {
    let mut bm_out = vec![];
    let mut bm = lab.bm.data();
    for a in bm.accounts.iter_mut().filter(|a| a.status == "1").take(k) {
        (a.balance, a.credit_limits) = ("-50.00".into(), vec!["0".into()]);
        let login = a.email.trim().to_lowercase();
        bm_out.push((format!("billmanager:{}", a.id), login));
    }
    drop(bm);
    let mut ap_out = vec![];
    let mut ap = lab.ap.data();
    for a in ap
        .accounts
        .iter_mut()
        .filter(|a| a.status == "active")
        .take(k)
    {
        (a.balance, a.credit_limit) = (-50.0, 0.0);
        let login = a.email.trim().to_lowercase();
        ap_out.push((format!("activeplatform:{}", a.id), login));
    }
    bm_out
        .into_iter()
        .zip(ap_out)
        .flat_map(|(b, a)| [b, a])
        .collect()
}

/// The billing system credits the payment: a payment row and the balance.
pub fn credit(lab: &Lab, key: &str) {
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let (source, id) = key.split_once(':').unwrap();
    let id: u64 = id.parse().unwrap();
    if source == "billmanager" {
        lab.bm.add_payment(id, "100.00", "4", &today);
        let mut bm = lab.bm.data();
        bm.accounts.iter_mut().find(|a| a.id == id).unwrap().balance = "50.00".into();
    } else {
        lab.ap.add_payment(id, "100.00", "completed", &today);
        let mut ap = lab.ap.data();
        ap.accounts.iter_mut().find(|a| a.id == id).unwrap().balance = 50.0;
    }
}

pub fn paying(vms: &VmsEmulator, login: &str) -> bool {
    vms.user(login)
        .is_some_and(|u| u.permissions.contains("archives-show"))
}

/// The initial full sync at full speed (8 requests in flight): the set-up
/// of the latency benches, not what they measure.
pub async fn initial_sync(lab: &Lab) {
    let fast = lab
        .settings("", &[("BILLSYNC__VMS__CONCURRENCY", "8")])
        .unwrap();
    let engine = billsync::engine::Engine::new(fast).await.unwrap();
    let full = billsync::engine::CycleOptions {
        full: true,
        ..Default::default()
    };
    engine.run_cycle(&full).await.unwrap();
    engine.store.close().await;
}
