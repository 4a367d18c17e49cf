//! Whole-cycle benchmark: the emulators (10 ms VMS latency) seeded with N
//! accounts, an initial full sync with `vms.concurrency = 8`, then no-op
//! incremental cycles, then no-op cycles after a change of `vms.user_type`.
//! Every phase runs in its own process, so each peak RSS is that phase's
//! alone; the emulators run in another.
//!
//! cargo bench --bench sync -- [N ...]   (default 10000 100000)
//!
//! Knobs: `BILLSYNC_BENCH_LATENCY_MS` (VMS latency), `BILLSYNC_BENCH_NOOPS`
//! (no-op cycles of each kind), `BILLSYNC_BENCH_BASELINE` (another build's
//! bench binary: each no-op cycle also runs there, alternately),
//! `BILLSYNC_BENCH_SERVICES` (`off`, the default; `on`: one service per
//! account in both sources, read by both; `both`: each size off, then on),
//! `BILLSYNC_BENCH_TICKS` (payment ticks after the no-op cycles, default
//! 10: each time one more customer pays, and one process runs the payment
//! fast path, its CPU time measured), `BILLSYNC_BENCH_RETYPED` (`off`:
//! skip the no-op cycles after a `vms.user_type` change),
//! `BILLSYNC_BENCH_STORE` (`sqlite`, the default; `postgres`: the state in
//! a fresh database of a throw-away PostgreSQL cluster on this machine,
//! each cycle run as a leader's, its writes fenced; `both`: each size on
//! SQLite, then on PostgreSQL), `BILLSYNC_BENCH_TICK_LOG` (the payment tick
//! process's `RUST_LOG`, e.g. `sqlx::query=debug` for each statement's
//! time, without logging every statement of the initial sync).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{peak_rss_mb, LabSettings};

use billsync::engine::{CycleOptions, Engine};
use billsync_emulators::lab::Lab;

/// `BILLSYNC_BENCH_LATENCY_MS` overrides, for profiling the no-op cycle.
fn latency_ms() -> u64 {
    std::env::var("BILLSYNC_BENCH_LATENCY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}
const CONCURRENCY: u32 = 8;

/// `BILLSYNC_BENCH_BASELINE=<another build of this bench>` runs every no-op
/// cycle in that build too, alternately: an A/B on the same state.
/// `BILLSYNC_BENCH_NOOPS` no-op cycles of each kind (default 2); more give a
/// steadier median on a noisy machine.
fn noop_runs() -> usize {
    std::env::var("BILLSYNC_BENCH_NOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

fn retyped_runs(noops: usize) -> usize {
    match std::env::var("BILLSYNC_BENCH_RETYPED").as_deref() {
        Ok("off") => 0,
        _ => noops,
    }
}

/// `BILLSYNC_BENCH_TICKS` payment ticks, each for one account that paid.
fn tick_runs() -> usize {
    std::env::var("BILLSYNC_BENCH_TICKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

fn main() {
    billsync::allocator::purge_freed_memory_soon();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    match std::env::var("BILLSYNC_BENCH_ROLE").as_deref() {
        Ok("emulators") => {
            let services = args.get(1).is_some_and(|a| a == "services");
            return rt.block_on(emulators(args[0].parse().unwrap(), services));
        }
        Ok("cycle") => return rt.block_on(cycle(&args[0], args[1] == "full")),
        Ok("floor") => return rt.block_on(floor(&args[0])),
        Ok("ticks") => return rt.block_on(ticks(&args[0])),
        _ => {}
    }
    let sizes: Vec<usize> = if args.is_empty() {
        vec![10_000, 100_000]
    } else {
        args.iter().filter_map(|a| a.parse().ok()).collect()
    };
    println!("VMS latency {} ms, vms.concurrency {CONCURRENCY}; accounts split evenly between the two sources", latency_ms());
    println!("| accounts | cycle | time (s) | VMS requests | push phase (s) | ops/s in push | VMS req/s in push | source detail calls | result | peak RSS (MB) |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---|---:|");
    let services: &[bool] = match std::env::var("BILLSYNC_BENCH_SERVICES").as_deref() {
        Ok("on") => &[true],
        Ok("both") => &[false, true],
        _ => &[false],
    };
    let stores: &[bool] = match std::env::var("BILLSYNC_BENCH_STORE").as_deref() {
        Ok("postgres") => &[true],
        Ok("both") => &[false, true],
        _ => &[false],
    };
    for n in sizes {
        for &with in services {
            for &postgres in stores {
                bench(n, with, postgres);
            }
        }
    }
}

struct Emus {
    child: Child,
    stdin: ChildStdin,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl Emus {
    fn ask(&mut self, cmd: &str) -> serde_json::Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        serde_json::from_str(&self.lines.next().unwrap().unwrap()).unwrap()
    }
}

fn bench(n: usize, services: bool, postgres: bool) {
    // Each build its own database, as each has its own state file below.
    let urls = postgres.then(|| {
        let db = billsync_emulators::postgres::fresh_database;
        (db(), db())
    });
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg(n.to_string())
        .arg(if services { "services" } else { "" })
        .env("BILLSYNC_BENCH_ROLE", "emulators")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let config = lines.next().unwrap().unwrap();
    let mut emus = Emus {
        child,
        stdin,
        lines,
    };
    // The last rows run with another `vms.user_type`, which the VMS cannot
    // apply to existing users: their no-op cycles must cost what the others do.
    let retyped = "no-op after vms.user_type change";
    let noops = noop_runs();
    let (full_sync, noop) = match (services, postgres) {
        (false, false) => ("initial full sync", "no-op incremental"),
        (true, false) => ("initial full sync, services", "no-op incremental, services"),
        (false, true) => ("initial full sync, postgres", "no-op incremental, postgres"),
        (true, true) => (
            "initial full sync, services, postgres",
            "no-op incremental, services, postgres",
        ),
    };
    // Each no-op cycle is followed by the read floor, so their ratio is
    // measured in the same minutes of a noisy machine.
    let runs = std::iter::once((full_sync, true))
        .chain([(noop, false), (FLOOR, false)].repeat(noops))
        .chain(std::iter::repeat_n((retyped, false), retyped_runs(noops)));
    let this = std::env::current_exe().unwrap();
    let baseline = std::env::var_os("BILLSYNC_BENCH_BASELINE").map(std::path::PathBuf::from);
    // With a baseline, each cycle runs once in each build, alternately, so
    // both see the same sources and the same moments of a noisy machine.
    // Each build keeps its own state file (an older binary refuses a state
    // file a newer one migrated); the baseline's initial sync adopts the
    // users the first one created.
    let runs = runs.flat_map(|(label, full)| {
        std::iter::once((label, full, &this, ""))
            .chain(baseline.as_ref().map(|b| (label, full, b, " (baseline)")))
    });
    let state_of = |build: &str| {
        let dir = std::path::Path::new(&config).parent().unwrap();
        let name = if build.is_empty() {
            "state.db"
        } else {
            "baseline.db"
        };
        dir.join(name).display().to_string()
    };
    let mut times: std::collections::BTreeMap<(&str, &str), Vec<f64>> = Default::default();
    for (label, full, exe, build) in runs {
        let before = emus.ask("stats");
        let user_type = if label == retyped { "b2b" } else { "b2c" };
        let role = if label == FLOOR { "floor" } else { "cycle" };
        let mut cycle = Command::new(exe);
        cycle
            .args([config.as_str(), if full { "full" } else { "incremental" }])
            .env("BILLSYNC_BENCH_ROLE", role)
            .env("BILLSYNC__DAEMON__STATE_PATH", state_of(build))
            .env("BILLSYNC__VMS__USER_TYPE", user_type)
            .stderr(Stdio::inherit());
        if let Some((this_db, baseline_db)) = &urls {
            let url = if build.is_empty() {
                this_db
            } else {
                baseline_db
            };
            cycle.env("BILLSYNC__DAEMON__STATE_URL", url);
        }
        let out = cycle.output().unwrap();
        let r: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        let after = emus.ask("stats");
        let d = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
        let secs = r["secs"].as_f64().unwrap();
        let vms = d("vms");
        let push = r["push_secs"].as_f64().unwrap_or(0.0);
        let rate = |x: f64| {
            if push > 0.0 {
                format!("{:.0}", x / push)
            } else {
                "-".into()
            }
        };
        times.entry((label, build)).or_default().push(secs);
        println!(
            "| {n} | {label}{build} | {secs:.2} | {vms} | {push:.2} | {} | {} | {} | {} | {:.1} |",
            rate(r["applied"].as_f64().unwrap_or(0.0)),
            rate(vms as f64),
            d("details"),
            r["result"].as_str().unwrap_or("?"),
            r["peak_rss_mb"].as_f64().unwrap()
        );
    }
    let mut builds = vec![Build {
        exe: this.clone(),
        state: state_of(""),
        url: urls.as_ref().map(|(this_db, _)| this_db.clone()),
        label: "",
    }];
    if let Some(b) = &baseline {
        builds.push(Build {
            exe: b.clone(),
            state: state_of(" (baseline)"),
            url: urls.as_ref().map(|(_, baseline_db)| baseline_db.clone()),
            label: " (baseline)",
        });
    }
    payment_ticks(n, &mut emus, &config, &builds);
    if urls.is_none() {
        let state = state_of("");
        let size = ["", "-wal"]
            .iter()
            .filter_map(|s| std::fs::metadata(format!("{state}{s}")).ok());
        let bytes: u64 = size.map(|m| m.len()).sum();
        println!(
            "{n} accounts: state file {:.1} MB, {:.0} bytes per account",
            bytes as f64 / 1e6,
            bytes as f64 / n as f64
        );
    }
    let _ = emus.ask("quit");
    let _ = emus.child.wait();
    let median = |label: &str| {
        let mut v = times.get(&(label, "")).cloned().unwrap_or_default();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    if let (Some(c), Some(f)) = (median(noop), median(FLOOR)) {
        println!(
            "{n} accounts, {noop}: median {c:.2} s, read floor median {f:.2} s: {:.2}x the floor",
            c / f
        );
    }
}

/// The label of the read floor's rows.
const FLOOR: &str = "read floor";

/// With services: each source reads them; nothing else changes (the
/// rules are the default's), so the cost measured is the listings'.
const SERVICES: &str = "[sources.billmanager.services]\nitem_types = [\"videocam\"]\n\
                        [sources.activeplatform.services]\nenabled = true\n";

/// One video service per account in both sources.
fn add_services(lab: &Lab) {
    use billsync_emulators::activeplatform::ApSubscription;
    use billsync_emulators::billmanager::BmService;
    let bm_ids: Vec<u64> = lab.bm.data().accounts.iter().map(|a| a.id).collect();
    for id in bm_ids {
        lab.bm.add_service(BmService {
            id: 1_000_000 + id,
            item_type: "videocam".into(),
            account_id: id,
            pricelist: "Video 30".into(),
            item_status: "2".into(),
            ..Default::default()
        });
    }
    let mut ap = lab.ap.data();
    ap.plans.insert(30, "Video 30".into());
    let ap_ids: Vec<u64> = ap.accounts.iter().map(|a| a.id).collect();
    for id in ap_ids {
        ap.subscriptions.push(ApSubscription {
            id: 2_000_000 + id,
            plan_id: 30,
            account_id: id,
            name: "Home video".into(),
            status: "active".into(),
            ..Default::default()
        });
    }
}

async fn emulators(n: usize, services: bool) {
    let lab = Lab::start(n / 2, n - n / 2).await.unwrap();
    lab.vms
        .faults
        .set_latency(Duration::from_millis(latency_ms()));
    lab.vms.data().record_events = false;
    if services {
        add_services(&lab);
    }
    let mut paying = common::unpaid(&lab, tick_runs()).into_iter();
    let extra = format!(
        "[vms.tree]\nenabled = false\n{}",
        if services { SERVICES } else { "" }
    );
    let extra = extra.as_str();
    lab.settings(extra, &[]).unwrap();
    // The lab's config with the benchmark's VMS settings.
    let text = lab
        .config_text(extra)
        .replace("concurrency = 4", &format!("concurrency = {CONCURRENCY}"))
        .replace(
            "max_requests_per_second = 1000",
            "max_requests_per_second = 100000",
        )
        .replace("page_size = 100", "page_size = 500");
    std::fs::write(lab.config_path(), text).unwrap();
    println!("{}", lab.config_path().display());
    std::io::stdout().flush().unwrap();
    // Answer commands as they come: a blocking reader thread feeds a channel.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(cmd) = rx.recv().await {
        match cmd.as_str() {
            "stats" => {
                let details =
                    lab.bm.calls("account.edit") + lab.bm.calls("subaccount") + lab.ap.calls("get");
                println!(
                    "{}",
                    serde_json::json!({"vms": lab.vms.served(), "details": details})
                );
            }
            "credit" => {
                let (key, login) = paying.next().expect("customers left to pay");
                common::credit(&lab, &key);
                println!("{}", serde_json::json!({"key": key, "login": login}));
            }
            _ => {
                println!("{{}}");
                std::io::stdout().flush().unwrap();
                break;
            }
        }
        std::io::stdout().flush().unwrap();
    }
}

type Leader = (
    std::sync::Arc<billsync::lease::Node>,
    tokio::sync::watch::Sender<bool>,
);

/// On PostgreSQL a cycle runs as the daemon's leader runs it: holding the
/// lease and renewing it, every write fenced by its epoch, every request
/// gated (given up at the end, so the next phase's process need not wait).
async fn leading(settings: billsync::config::Settings, url: &str) -> (Engine, Option<Leader>) {
    let lease = Duration::from_secs(settings.daemon.lease_secs);
    let vms_timeout = Duration::from_secs(settings.vms.timeout_secs);
    let (store, node, first) = billsync::lease::open_shared(url, "bench", lease, vms_timeout)
        .await
        .unwrap();
    assert!(
        matches!(first, billsync::lease::Change::Became { .. }),
        "{first:?}"
    );
    let mut engine = Engine::with_store(settings, store).unwrap();
    engine.set_gate(node.clone());
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(node.clone().keep(rx));
    (engine, Some((node, stop)))
}

/// The engine of a cycle's process, leading on PostgreSQL.
async fn open_engine(config: &str) -> (Engine, Option<Leader>) {
    billsync::telemetry::init(billsync::config::LogFormat::Pretty, "warn");
    let env = billsync::config::process_env();
    let (settings, _) = billsync::config::load(std::path::Path::new(config), &env).unwrap();
    match settings.daemon.state_url.expose().map(String::from) {
        Some(url) => leading(settings, &url).await,
        None => (Engine::new(settings).await.unwrap(), None),
    }
}

async fn close_engine(engine: Engine, leader: Option<Leader>) {
    if let Some((node, stop)) = leader {
        stop.send_replace(true);
        node.release().await;
    }
    engine.store.close().await;
}

/// The read floor (issue 21): every listing page a cycle reads (accounts,
/// the payment window, services), fetched and parsed once with the
/// cycle's own clients and decoders, both sources at once as a cycle reads
/// them, keeping no row and touching no store.
async fn floor(config: &str) {
    billsync::telemetry::init(billsync::config::LogFormat::Pretty, "warn");
    let env = billsync::config::process_env();
    let (settings, _) = billsync::config::load(std::path::Path::new(config), &env).unwrap();
    let sources = billsync::sources::from_settings(&settings).unwrap();
    // The default payment window: the lab's config sets none.
    let days = 3;
    let today = chrono::Utc::now().date_naive();
    let t = Instant::now();
    let reads = sources.iter().map(|s| async move {
        let keep = |_: &str, _: &str| false;
        let accounts = async {
            s.list_accounts(&|_| {}, &keep).await.unwrap();
            let since = today - chrono::Duration::days(days);
            s.payments(since, today).await.unwrap();
        };
        let (_, services) = tokio::join!(accounts, s.list_services(&|_| {}));
        if let Some(r) = services {
            r.unwrap();
        }
    });
    futures::future::join_all(reads).await;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"secs": secs, "push_secs": 0.0, "result": "floor", "applied": 0, "peak_rss_mb": peak_rss_mb()})
    );
}

async fn cycle(config: &str, full: bool) {
    let (engine, leader) = open_engine(config).await;
    // When the push phase starts and ends, from the engine's progress events.
    let push = std::sync::Arc::new(std::sync::Mutex::new((None::<Instant>, None::<Instant>)));
    let p = push.clone();
    let progress: billsync::engine::Progress = std::sync::Arc::new(move |phase: &str, _, _| {
        if phase == "pushing" {
            let mut g = p.lock().unwrap();
            g.0.get_or_insert_with(Instant::now);
            g.1 = Some(Instant::now());
        }
    });
    let t = Instant::now();
    let r = engine
        .run_cycle(&CycleOptions {
            full,
            progress: Some(progress),
            ..Default::default()
        })
        .await
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let (first, last) = *push.lock().unwrap();
    let push_secs = match (first, last) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    close_engine(engine, leader).await;
    println!(
        "{}",
        serde_json::json!({"secs": secs, "push_secs": push_secs, "result": r.result, "applied": r.applied, "peak_rss_mb": peak_rss_mb()})
    );
}

/// Payment ticks (issue 21 goal 3): one customer pays, then in each build
/// (this one, and the baseline's), a process that has run the fast path
/// before runs it again; its CPU time is what a tick costs the daemon.
fn payment_ticks(n: usize, emus: &mut Emus, config: &str, builds: &[Build]) {
    let ticks = tick_runs();
    if ticks == 0 {
        return;
    }
    let mut tickers: Vec<Emus> = builds.iter().map(|b| ticker(config, b)).collect();
    // A first tick answers once the process has warmed up, before anyone pays.
    for t in &mut tickers {
        assert_eq!(t.ask("tick")["applied"], 0);
    }
    let mut times = vec![(vec![], vec![]); builds.len()];
    for _ in 0..ticks {
        let paid = emus.ask("credit");
        for (ticker, (cpu, wall)) in tickers.iter_mut().zip(&mut times) {
            let r = ticker.ask("tick");
            assert_eq!(r["applied"], 1, "{paid}: {r}");
            cpu.push(r["cpu_ms"].as_f64().unwrap());
            wall.push(r["ms"].as_f64().unwrap());
        }
    }
    for ((mut ticker, (mut cpu, mut wall)), b) in tickers.into_iter().zip(times).zip(builds) {
        let _ = ticker.ask("quit");
        let _ = ticker.child.wait();
        let (c, w) = (spread(&mut cpu), spread(&mut wall));
        println!("{n} accounts, payment tick for one account{} ({ticks} ticks): CPU median {:.1} ms, max {:.1} ms; wall median {:.1} ms, max {:.1} ms", b.label, c.0, c.1, w.0, w.1);
    }
}

/// One build's binary and state.
struct Build {
    exe: std::path::PathBuf,
    state: String,
    url: Option<String>,
    label: &'static str,
}

fn ticker(config: &str, b: &Build) -> Emus {
    let mut cmd = Command::new(&b.exe);
    cmd.arg(config)
        .env("BILLSYNC_BENCH_ROLE", "ticks")
        .env("BILLSYNC__DAEMON__STATE_PATH", &b.state)
        .env("BILLSYNC__VMS__USER_TYPE", "b2c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(url) = &b.url {
        cmd.env("BILLSYNC__DAEMON__STATE_URL", url);
    }
    if let Ok(filter) = std::env::var("BILLSYNC_BENCH_TICK_LOG") {
        cmd.env("RUST_LOG", filter);
    }
    let mut child = cmd.spawn().unwrap();
    Emus {
        stdin: child.stdin.take().unwrap(),
        lines: BufReader::new(child.stdout.take().unwrap()).lines(),
        child,
    }
}

/// Median and max.
fn spread(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() - 1])
}

/// The process's CPU time, user and system, in milliseconds.
fn cpu_ms() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(ru.ru_utime) + ms(ru.ru_stime)
}

/// The payment fast path, once per `tick` read from stdin.
async fn ticks(config: &str) {
    let (engine, leader) = open_engine(config).await;
    let opts = CycleOptions::default();
    // Warm: the pools open, the payment windows read once.
    assert!(engine.run_payments(&opts).await.unwrap().is_none());
    for line in std::io::stdin().lines().map_while(Result::ok) {
        if line != "tick" {
            println!("{{}}");
            break;
        }
        let (c, t) = (cpu_ms(), Instant::now());
        let r = engine.run_payments(&opts).await.unwrap();
        let (cpu, ms) = (cpu_ms() - c, t.elapsed().as_secs_f64() * 1e3);
        let applied = r.map_or(0, |r| r.applied);
        println!(
            "{}",
            serde_json::json!({"cpu_ms": cpu, "ms": ms, "applied": applied})
        );
        std::io::stdout().flush().unwrap();
    }
    close_engine(engine, leader).await;
}
