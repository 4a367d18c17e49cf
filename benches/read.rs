//! Reading N accounts from the emulators: time, requests and peak RSS of the
//! reader. The emulators run in a child process (this binary re-executed),
//! so the RSS measured here is the reader's alone.
//!
//! cargo bench --bench read -- [N] [billmanager|activeplatform]   (default 100000, both)

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

mod common;
use common::peak_rss_mb;

use billsync::engine::read::{read_source, ReadOptions};
use billsync::store::Store;
use billsync_emulators::activeplatform::{self as ap_emu, ApEmulator};
use billsync_emulators::billmanager::{self as bm_emu, BmEmulator};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    if std::env::var("BILLSYNC_BENCH_ROLE").is_err() {
        billsync::telemetry::init(billsync::config::LogFormat::Pretty, "warn");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if std::env::var("BILLSYNC_BENCH_ROLE").as_deref() == Ok("emulators") {
        rt.block_on(serve_emulators(n));
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg(n.to_string())
        .env("BILLSYNC_BENCH_ROLE", "emulators")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let bm_url = lines.next().unwrap().unwrap();
    let ap_url = lines.next().unwrap().unwrap();
    rt.block_on(run(n, &bm_url, &ap_url));
    let _ = child.stdin.take().map(|mut s| s.write_all(b"q\n"));
    let _ = child.kill();
    let _ = child.wait();
}

async fn serve_emulators(n: usize) {
    let bm = BmEmulator::new(n, 1);
    let ap = ApEmulator::new(n, 1);
    let bm_srv = bm.serve().await.unwrap();
    let ap_srv = ap.serve().await.unwrap();
    println!("{}/billmgr", bm_srv.base_url());
    println!("{}", ap_srv.base_url());
    let _ = std::io::stdout().flush();
    // Until the parent closes stdin.
    tokio::task::spawn_blocking(|| {
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
    })
    .await
    .unwrap();
}

async fn run(n: usize, bm_url: &str, ap_url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[vms]\nurl = \"http://127.0.0.1:9\"\n[sources.billmanager]\nurl = \"{bm_url}\"\nusername = \"{}\"\npassword = \"{}\"\n[sources.activeplatform]\nurl = \"{ap_url}\"\napi_token = \"{}\"\n",
        bm_emu::USER,
        bm_emu::PASSWORD,
        ap_emu::TOKEN
    );
    let cfg = dir.path().join("billsync.toml");
    std::fs::write(&cfg, text).unwrap();
    let (settings, _) = billsync::config::load(&cfg, &[]).unwrap();
    let store = Store::open(&dir.path().join("state.db")).await.unwrap();
    println!("reading {n} accounts per source from loopback emulators");
    println!("| source | read | accounts | detail calls | time (s) | reader peak RSS (MB) |");
    println!("|---|---|---:|---:|---:|---:|");
    // `-- N billmanager` reads one source only: its own peak RSS.
    let only = std::env::args()
        .skip(1)
        .find(|a| a == "billmanager" || a == "activeplatform");
    for source in billsync::sources::from_settings(&settings).unwrap() {
        let kind = source.kind();
        if only.as_deref().is_some_and(|o| o != kind.as_str()) {
            continue;
        }
        let normalizer = settings.normalizer(kind).unwrap();
        for (seq, (label, full)) in [(1, ("initial", false)), (2, ("unchanged", false))] {
            let opts = ReadOptions {
                full,
                payment_window_days: 3,
                paid_history_days: 0,
                missing_grace_cycles: 2,
                reverify: Default::default(),
                pacing: settings.pacing(),
                read: billsync::store::ReadStamp {
                    seq,
                    at: chrono::Utc::now(),
                },
            };
            let t = Instant::now();
            let r = read_source(&store, &source, &normalizer, &opts, &|_| {})
                .await
                .unwrap();
            let secs = t.elapsed().as_secs_f64();
            assert!(r.complete, "{:?}", r.error);
            println!(
                "| {kind} | {label} | {} | {} | {secs:.2} | {:.1} |",
                r.accounts.len(),
                r.detail_calls,
                peak_rss_mb()
            );
        }
    }
}
