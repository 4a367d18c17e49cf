//! `billsync run` as a real process against the emulators: the admin
//! endpoints, metrics, non-overlapping cycles, SIGTERM mid-cycle, the state
//! lock, and systemd notifications over a fake NOTIFY_SOCKET.

mod common;
use common::LabSettings;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use billsync::store::Store;
use billsync_emulators::lab::Lab;
use billsync_emulators::Fault;

const BIN: &str = env!("CARGO_BIN_EXE_billsync");
const TOKEN: &str = "test-admin-token-0123456789";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Running {
    child: Child,
    admin: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn lab(bm: usize, ap: usize) -> Lab {
    let lab = Lab::start(bm, ap).await.unwrap();
    lab.settings("", &[]).unwrap();
    lab
}

fn spawn(lab: &Lab, env: &[(&str, &str)], args: &[&str]) -> (Child, String) {
    let port = free_port();
    let admin = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(lab.config_path())
        .arg("run")
        .args(args)
        .env("BILLSYNC__ADMIN__LISTEN", &admin)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // `BILLSYNC_TEST_LOG=billsync=debug`: the daemon's log on the terminal.
    if let Ok(filter) = std::env::var("BILLSYNC_TEST_LOG") {
        cmd.env("RUST_LOG", filter).stderr(Stdio::inherit());
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    (cmd.spawn().unwrap(), format!("http://{admin}"))
}

async fn start(lab: &Lab, env: &[(&str, &str)], args: &[&str]) -> Running {
    let (child, admin) = spawn(lab, env, args);
    let r = Running { child, admin };
    let t = Instant::now();
    loop {
        if let Ok(resp) = reqwest::get(format!("{}/livez", r.admin)).await {
            if resp.status() == 200 {
                return r;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "daemon did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The child's exit status, once it exits; fails the test past `limit`.
async fn wait_exit(
    child: &mut Child,
    since: Instant,
    limit: Duration,
    what: &str,
) -> std::process::ExitStatus {
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(since.elapsed() < limit, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn cycles_finished(admin: &str) -> usize {
    let v: serde_json::Value = reqwest::get(format!("{admin}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["cycles"].as_array().map(|a| a.len()).unwrap_or(0)
}

const RARE: (&str, &str) = ("BILLSYNC__DAEMON__SCHEDULE", "0 0 0 1 1 *");

#[tokio::test(flavor = "multi_thread")]
async fn health_metrics_and_authenticated_resync() {
    let lab = lab(6, 4).await;
    let d = start(
        &lab,
        &[RARE, ("BILLSYNC__ADMIN__TOKEN", TOKEN)],
        &["--resync"],
    )
    .await;
    // --resync: the first cycle runs at once, in full.
    let t = Instant::now();
    while cycles_finished(&d.admin).await < 1 {
        assert!(t.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lab.vms.data().users.len(), 10);
    let health = reqwest::get(format!("{}/healthz", d.admin)).await.unwrap();
    assert_eq!(health.status(), 200);
    let h: serde_json::Value = health.json().await.unwrap();
    assert_eq!(h["checks"]["state_store"]["ok"], true);
    assert_eq!(h["checks"]["last_cycle"]["result"], "ok");
    assert_eq!(
        reqwest::get(format!("{}/readyz", d.admin))
            .await
            .unwrap()
            .status(),
        200
    );

    let metrics = reqwest::get(format!("{}/metrics", d.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in billsync::telemetry::metrics::SPEC_NAMES {
        assert!(metrics.contains(name), "{name} missing");
    }
    assert!(
        metrics.contains(r#"billsync_cycles_total{kind="full",result="ok"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"billsync_source_accounts{source="billmanager"} 6"#));
    // Every emulated login ends in example.com; none may reach a label.
    assert!(lab
        .vms
        .data()
        .users
        .keys()
        .all(|l| l.ends_with("example.com")));
    assert!(!metrics.contains("example.com"), "no login in a label");
    assert!(!metrics.contains(TOKEN));

    let client = reqwest::Client::new();
    let url = format!("{}/resync", d.admin);
    assert_eq!(client.post(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        client
            .post(&url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let logins: Vec<String> = lab.vms.data().users.keys().cloned().collect();
    let before: Vec<usize> = logins
        .iter()
        .map(|l| lab.vms.count_for("PATCH", l))
        .collect();
    let resp = client.post(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    // The full push reaches the VMS: every user gets a full-state PATCH.
    let t = Instant::now();
    loop {
        let after: Vec<usize> = logins
            .iter()
            .map(|l| lab.vms.count_for("PATCH", l))
            .collect();
        if after.iter().zip(&before).all(|(a, b)| a > b) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no full push seen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A named resync, with a body.
    let resp = client
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"logins": ["user1@bm.example.com"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let resp = client
        .post(&url)
        .bearer_auth(TOKEN)
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let approve = format!("{}/approve", d.admin);
    assert_eq!(client.post(&approve).send().await.unwrap().status(), 401);
    assert_eq!(
        client
            .post(&approve)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    let status: serde_json::Value = reqwest::get(format!("{}/status", d.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for key in billsync::status::KEYS {
        assert!(status.get(key).is_some(), "{key}");
    }
    assert!(!status.to_string().contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread")]
async fn post_endpoints_are_forbidden_without_a_token() {
    let lab = lab(1, 0).await;
    let d = start(&lab, &[RARE], &[]).await;
    let client = reqwest::Client::new();
    for path in ["resync", "approve"] {
        let r = client
            .post(format!("{}/{path}", d.admin))
            .bearer_auth("anything")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
    }
    // No cycle is due yet after start: healthy.
    assert_eq!(
        reqwest::get(format!("{}/healthz", d.admin))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cycles_never_overlap_when_the_vms_is_slow() {
    let lab = lab(20, 0).await;
    // A full resync every second pushes every user to a VMS that takes
    // 300 ms a request: each cycle outlasts several ticks.
    lab.vms.faults.set_latency(Duration::from_millis(300));
    let d = start(
        &lab,
        &[
            RARE,
            ("BILLSYNC__DAEMON__FULL_RESYNC_SCHEDULE", "* * * * * *"),
        ],
        &[],
    )
    .await;
    let t = Instant::now();
    loop {
        let metrics = reqwest::get(format!("{}/metrics", d.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let skipped: f64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("billsync_cycles_total{") && l.contains(r#"result="skipped""#)
            })
            .filter_map(|l| l.split_whitespace().last())
            .filter_map(|v| v.parse::<f64>().ok())
            .sum();
        if skipped >= 2.0 && cycles_finished(&d.admin).await >= 2 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "no skipped ticks seen"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status: serde_json::Value = reqwest::get(format!("{}/status", d.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut spans: Vec<(String, String)> = status["cycles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["started_at"].as_str().unwrap().to_string(),
                c["finished_at"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        let (a_end, b_start) = (
            chrono::DateTime::parse_from_rfc3339(&w[0].1).unwrap(),
            chrono::DateTime::parse_from_rfc3339(&w[1].0).unwrap(),
        );
        assert!(b_start >= a_end, "cycles overlap: {w:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_cycle_exits_0_with_a_consistent_store() {
    let lab = lab(60, 0).await;
    lab.vms.faults.set_latency(Duration::from_millis(200));
    let mut d = start(
        &lab,
        &[RARE, ("BILLSYNC__DAEMON__SHUTDOWN_GRACE_SECS", "10")],
        &["--resync"],
    )
    .await;
    wait_until("some users", Duration::from_secs(30), || {
        lab.vms.data().users.len() >= 8
    })
    .await;
    let pid = d.child.id().to_string();
    let t = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = wait_exit(
        &mut d.child,
        t,
        Duration::from_secs(15),
        "not stopped within the grace",
    )
    .await;
    assert_eq!(status.code(), Some(0));
    let vms_users = lab.vms.data().users.clone();
    assert!(
        vms_users.len() < 60,
        "stopped mid-cycle ({} users)",
        vms_users.len()
    );
    let store = Store::open(&lab.state_path()).await.unwrap();
    let applied = store.load_applied().await.unwrap();
    // Everything recorded as applied is on the VMS, as recorded.
    for (login, a) in &applied.users {
        let u = vms_users
            .get(login)
            .unwrap_or_else(|| panic!("{login} applied but not on the VMS"));
        assert_eq!(u.status, a.state.status);
        for p in a.state.permissions.iter() {
            assert!(u.permissions.contains(p), "{login}: {p}");
        }
    }
    // The interrupted cycle was recorded as finished.
    let cycles = store.last_cycles(10).await.unwrap();
    assert_eq!(cycles.len(), 1);
    assert_eq!(cycles[0]["result"], "partial");
    store.close().await;
    // And the next run finishes the job.
    lab.vms.faults.set_latency(Duration::ZERO);
    let out = Command::new(BIN)
        .arg("--config")
        .arg(lab.config_path())
        .args(["sync"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lab.vms.data().users.len(), 60);
}

/// With `admin.tls_cert_file` and `admin.tls_key_file` the admin server
/// speaks only TLS (SPEC §13): a client that trusts the certificate gets
/// its answers, the token included, and plain HTTP gets none.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_server_speaks_tls_with_a_certificate() {
    let lab = lab(2, 0).await;
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.key_pair.serialize_pem());
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("admin.crt"), dir.path().join("admin.key"));
    std::fs::write(&cert_file, &cert_pem).unwrap();
    std::fs::write(&key_file, &key_pem).unwrap();
    let env = [
        RARE,
        (
            "BILLSYNC__ADMIN__TLS_CERT_FILE",
            cert_file.to_str().unwrap(),
        ),
        ("BILLSYNC__ADMIN__TLS_KEY_FILE", key_file.to_str().unwrap()),
        ("BILLSYNC__ADMIN__TOKEN", TOKEN),
    ];
    let (child, plain) = spawn(&lab, &env, &[]);
    let _running = Running {
        child,
        admin: plain.clone(),
    };
    let https = plain.replace("http://", "https://");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let t = Instant::now();
    let live = loop {
        if let Ok(r) = client.get(format!("{https}/livez")).send().await {
            break r.status();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no TLS answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(live, 200);
    let resync = client
        .post(format!("{https}/resync"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert!(resync.status().is_success(), "{}", resync.status());
    let clear = reqwest::get(format!("{plain}/livez")).await;
    assert!(clear.is_err(), "plain HTTP was answered: {clear:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_refuses_to_start() {
    let lab = lab(1, 0).await;
    let first = start(&lab, &[RARE], &[]).await;
    let (mut second, _) = spawn(&lab, &[RARE], &[]);
    let t = Instant::now();
    let status = wait_exit(
        &mut second,
        t,
        Duration::from_secs(10),
        "the second daemon kept running",
    )
    .await;
    assert_eq!(status.code(), Some(3));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    let holder = format!("in use by billsync pid {}", first.child.id());
    assert!(err.contains(&holder), "{err}");
    assert!(
        err.contains("`sync --dry-run`"),
        "says what works beside it: {err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_ready_and_watchdog_stop_while_stuck() {
    let lab = lab(3, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let sock_str = sock_path.display().to_string();
    let d = start(
        &lab,
        &[
            RARE,
            ("BILLSYNC__ADMIN__TOKEN", TOKEN),
            ("BILLSYNC__VMS__TIMEOUT_SECS", "30"),
            ("NOTIFY_SOCKET", sock_str.as_str()),
            ("WATCHDOG_USEC", "400000"),
        ],
        &[],
    )
    .await;
    let mut buf = [0u8; 256];
    // Every message within `limit`, with when it came.
    let mut read_timed = |limit: Duration| -> Vec<(Duration, String)> {
        let t = Instant::now();
        let mut got = vec![];
        while t.elapsed() < limit {
            if let Ok(n) = sock.recv(&mut buf) {
                got.push((t.elapsed(), String::from_utf8_lossy(&buf[..n]).to_string()));
            }
        }
        got
    };

    let first = read_timed(Duration::from_secs(2));
    assert!(
        first.iter().any(|(_, m)| m.contains("READY=1")),
        "{first:?}"
    );
    assert!(
        first
            .iter()
            .filter(|(_, m)| m.contains("WATCHDOG=1"))
            .count()
            >= 2,
        "{first:?}"
    );
    // Stick the loop: the VMS holds every request for 5 s.
    lab.vms
        .faults
        .always("", Fault::Delay(Duration::from_secs(5)));
    let served = lab.vms.served();
    let r = reqwest::Client::new()
        .post(format!("{}/resync", d.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_until("a stuck request", Duration::from_secs(10), || {
        lab.vms.served() > served
    })
    .await;
    // The last progress is at most a watchdog period old when the request
    // sticks, so pings may go on for that long (400 ms here), then stop.
    let stuck = read_timed(Duration::from_secs(3));
    let pings: Vec<Duration> = stuck
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .map(|(at, _)| *at)
        .collect();
    assert!(
        pings.iter().all(|at| *at < Duration::from_secs(1)),
        "pinged while stuck: {pings:?}"
    );
    // Unstuck: the pings come back.
    lab.vms.faults.clear();
    let later = read_timed(Duration::from_secs(8));
    assert!(
        later.iter().any(|(_, m)| m.contains("WATCHDOG=1")),
        "{later:?}"
    );
    drop(d);
}

/// SPEC §10.4. Before: the detail phase never fed the watchdog (8.6 s
/// without a beat against a 3 s watchdog), so systemd killed the daemon in
/// its first cycle. Here the detail phase takes seconds against a 1 s
/// watchdog, and the pings must keep coming.
#[tokio::test(flavor = "multi_thread")]
async fn the_watchdog_is_fed_through_a_long_detail_phase() {
    const ACCOUNTS: u64 = 40;
    let lab = lab(ACCOUNTS as usize, 0).await;
    lab.bm.faults.set_latency(Duration::from_millis(150));
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let sock_str = sock_path.display().to_string();
    let (child, admin) = spawn(
        &lab,
        &[
            RARE,
            ("NOTIFY_SOCKET", sock_str.as_str()),
            ("WATCHDOG_USEC", "1000000"),
        ],
        &["--resync"],
    );
    let _running = Running { child, admin };
    let mut buf = [0u8; 256];
    let mut pings = vec![];
    let t = Instant::now();
    // Until every detail call is answered, and a little beyond.
    while lab.bm.calls("subaccount") < ACCOUNTS {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "details never finished"
        );
        if let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
                pings.push(Instant::now());
            }
        }
    }
    let details_took = t.elapsed();
    // The silence up to the end of the phase counts too.
    pings.push(Instant::now());
    assert!(lab.bm.calls("account.edit") >= ACCOUNTS);
    assert!(
        details_took > Duration::from_secs(2),
        "the detail phase was too short to prove anything"
    );
    let longest = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .expect("no pings at all");
    assert!(
        longest < Duration::from_millis(1500),
        "no watchdog ping for {longest:?} during a {details_took:?} read"
    );
}

/// A daemon with the admin token, after its first (full) cycle made `users`.
async fn started_and_synced(lab: &Lab, users: usize) -> Running {
    let d = start(
        lab,
        &[RARE, ("BILLSYNC__ADMIN__TOKEN", TOKEN)],
        &["--resync"],
    )
    .await;
    wait_finished(&d.admin, "full", 1).await;
    assert_eq!(lab.vms.data().users.len(), users);
    d
}

/// The BILLmanager customer `id` stops paying (no credit either).
fn stop_paying(lab: &Lab, id: u64) {
    let mut bm = lab.bm.data();
    let a = bm.accounts.iter_mut().find(|a| a.id == id).unwrap();
    (a.balance, a.credit_limits) = ("-500.00".into(), vec!["0".into()]);
}

/// The user has the archive (the paying rule's grant).
fn paying(lab: &Lab, login: &str) -> bool {
    lab.vms
        .user(login)
        .is_some_and(|u| u.permissions.contains("archives-show"))
}

/// SPEC §10.3: `POST /trigger` re-reads the named account and pushes its
/// user within seconds, without waiting for the schedule or listing.
#[tokio::test(flavor = "multi_thread")]
async fn trigger_pushes_one_account_now() {
    let lab = lab(3, 0).await;
    let d = started_and_synced(&lab, 3).await;
    let login = "user2@bm.example.com";
    let managed = |l: &str| paying(&lab, l);
    assert!(managed(login));
    let client = reqwest::Client::new();
    let url = format!("{}/trigger", d.admin);
    let body = serde_json::json!({"accounts": ["billmanager:2"]});
    assert_eq!(
        client.post(&url).json(&body).send().await.unwrap().status(),
        401
    );
    let bad = serde_json::json!({"accounts": ["billmanager"]});
    let r = client
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // The customer stops paying; the billing system's hook says so.
    stop_paying(&lab, 2);
    let lists = lab.bm.calls("account");
    let r = client
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_until("the trigger's push", Duration::from_secs(20), || {
        !managed(login)
    })
    .await;
    assert_eq!(lab.bm.calls("account"), lists, "the trigger listed");
    assert!(managed("user1@bm.example.com"), "another user changed");
}

/// The BILLmanager hook (`deploy/billmanager-hook/billsync_trigger`) passes
/// COREmanager's answer through untouched and triggers the account's push.
#[tokio::test(flavor = "multi_thread")]
async fn the_billmanager_hook_triggers_a_push() {
    let lab = lab(3, 0).await;
    let d = started_and_synced(&lab, 3).await;
    stop_paying(&lab, 2);
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("billsync_hook.conf");
    let token = dir.path().join("billsync_hook.token");
    std::fs::write(&conf, format!("BILLSYNC_URL={}\n", d.admin)).unwrap();
    std::fs::write(&token, TOKEN).unwrap();
    let hook = |func: &str, params: &[(&str, &str)]| {
        let mut c = Command::new("sh");
        c.arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/billmanager-hook/billsync_trigger"
        ))
        .env("BILLSYNC_HOOK_CONF", &conf)
        .env("BILLSYNC_HOOK_TOKEN_FILE", &token)
        .env("PARAM_func", func)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        for (k, v) in params {
            c.env(k, v);
        }
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        let doc = "<?xml version=\"1.0\"?>\n<doc><ok/></doc>\n";
        child
            .stdin
            .take()
            .unwrap()
            .write_all(doc.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            doc,
            "the answer was changed"
        );
    };
    let paying = |l: &str| paying(&lab, l);
    // No account id among the parameters: nothing is sent.
    hook("payment.edit", &[("PARAM_elid", "77")]);
    hook("payment.edit", &[("PARAM_account_id", "2")]);
    wait_until("the hook's push", Duration::from_secs(20), || {
        !paying("user2@bm.example.com")
    })
    .await;
    assert!(paying("user1@bm.example.com"));
}

/// SPEC §10.2 from outside: with listing cycles far apart, a credited
/// payment still reaches the VMS through the payments schedule.
#[tokio::test(flavor = "multi_thread")]
async fn a_payment_reaches_the_vms_between_listing_cycles() {
    let lab = lab(0, 3).await;
    let (ap_id, login) = {
        let mut ap = lab.ap.data();
        let a = &mut ap.accounts[1];
        (a.balance, a.credit_limit) = (-50.0, 0.0);
        (a.id, a.email.to_lowercase())
    };
    let every_second = ("BILLSYNC__DAEMON__PAYMENTS_SCHEDULE", "* * * * * *");
    let _d = start(&lab, &[RARE, every_second], &["--resync"]).await;
    wait_until("the first cycle", Duration::from_secs(20), || {
        lab.vms.data().users.len() == 3
    })
    .await;
    let paying = |l: &str| paying(&lab, l);
    assert!(!paying(&login));
    let lists = lab.ap.calls("list");
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    lab.ap.add_payment(ap_id, "100.00", "completed", &today);
    lab.ap.data().accounts[1].balance = 50.0;
    wait_until("the payment's push", Duration::from_secs(20), || {
        paying(&login)
    })
    .await;
    assert_eq!(lab.ap.calls("list"), lists, "a listing cycle ran");
}

/// Finished cycles of this kind, from `/metrics`.
async fn finished(admin: &str, kind: &str) -> u64 {
    let text = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let label = format!("billsync_cycles_total{{kind=\"{kind}\"");
    text.lines()
        .filter(|l| l.starts_with(&label) && !l.contains("skipped"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn post(admin: &str, path: &str, body: serde_json::Value) -> u16 {
    let r = reqwest::Client::new()
        .post(format!("{admin}{path}"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    r.status().as_u16()
}

/// SPEC §10.2: the fast lane runs beside a listing cycle, and one writer
/// per login. A customer is not paying. A full resync reads them so and
/// pushes slowly (one request at a time, 400 ms each, the customer's login
/// last); meanwhile the customer pays and the hook triggers. The payment
/// reaches the VMS while the resync still runs, and the resync does not
/// push its stale "not paying" afterwards. Before: the trigger waited for
/// the whole resync; without the claim, the resync blocked the customer
/// again.
#[tokio::test(flavor = "multi_thread")]
async fn a_trigger_is_not_undone_by_a_slower_listing_cycle() {
    let lab = lab(0, 24).await;
    // The customer whose login the resync pushes last does not pay.
    let (id, login) = {
        let mut ap = lab.ap.data();
        let a = (ap.accounts.iter_mut())
            .max_by_key(|a| a.email.to_lowercase())
            .unwrap();
        (a.balance, a.credit_limit) = (-50.0, 0.0);
        (a.id, a.email.to_lowercase())
    };
    let d = start(
        &lab,
        &[
            RARE,
            ("BILLSYNC__ADMIN__TOKEN", TOKEN),
            ("BILLSYNC__VMS__CONCURRENCY", "1"),
        ],
        &["--resync"],
    )
    .await;
    let fulls = wait_finished(&d.admin, "full", 1).await;
    assert!(lab.vms.user(&login).is_some() && !paying(&lab, &login));
    lab.vms.faults.set_latency(Duration::from_millis(400));
    let served = lab.vms.served();
    assert_eq!(post(&d.admin, "/resync", serde_json::json!({})).await, 202);
    wait_until("the resync's first pushes", Duration::from_secs(20), || {
        lab.vms.served() >= served + 2
    })
    .await;
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    lab.ap.add_payment(id, "100.00", "completed", &today);
    lab.ap
        .data()
        .accounts
        .iter_mut()
        .find(|a| a.id == id)
        .unwrap()
        .balance = 50.0;
    let accounts = serde_json::json!({"accounts": [format!("activeplatform:{id}")]});
    assert_eq!(post(&d.admin, "/trigger", accounts).await, 202);
    wait_until("the trigger's push", Duration::from_secs(20), || {
        paying(&lab, &login)
    })
    .await;
    assert_eq!(
        finished(&d.admin, "full").await,
        fulls,
        "the trigger waited for the resync"
    );
    wait_finished(&d.admin, "full", fulls + 1).await;
    assert!(
        paying(&lab, &login),
        "the resync pushed what it read before the payment"
    );
}

/// Waits until `n` cycles of this kind have finished; returns the count.
async fn wait_finished(admin: &str, kind: &str, n: u64) -> u64 {
    let t = Instant::now();
    loop {
        let done = finished(admin, kind).await;
        if done >= n {
            return done;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{n} {kind} cycles never finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 17: a daemon at its shipped defaults (only the schedule is fast)
/// with a few dozen accounts and nothing changing sends nothing after its
/// initial sync: no VMS request and no detail read, cycle after cycle. In
/// 0.5.1 rolling re-verification sent a PATCH and two detail reads in every
/// cycle, because its slice was never less than one.
#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_at_its_defaults_is_quiet_when_nothing_changes() {
    let lab = lab(15, 15).await;
    let d = start(&lab, &[], &[]).await;
    wait_finished(&d.admin, "incremental", 1).await;
    assert_eq!(lab.vms.data().users.len(), 30, "the initial sync");
    let (vms, bm_details, ap_gets) = (
        lab.vms.requests(),
        lab.bm.calls("account.edit") + lab.bm.calls("subaccount"),
        lab.ap.calls("get"),
    );
    let from = finished(&d.admin, "incremental").await;
    // Two minutes of cycles every 2 s, with payment ticks every 10 s.
    let quiet = Duration::from_secs(120);
    tokio::time::sleep(quiet).await;
    let cycles = finished(&d.admin, "incremental").await - from;
    assert!(cycles >= 30, "only {cycles} cycles ran in {quiet:?}");
    assert_eq!(
        lab.vms.requests(),
        vms,
        "VMS requests in {cycles} no-op cycles"
    );
    let details = lab.bm.calls("account.edit") + lab.bm.calls("subaccount");
    assert_eq!(details, bm_details, "BILLmanager detail reads");
    assert_eq!(lab.ap.calls("get"), ap_gets, "ActivePlatform account GETs");
    assert!(
        lab.bm.calls("account") > 0 && lab.ap.calls("list") > 0,
        "listings ran"
    );
}

/// A preview beside the running daemon (`sync --dry-run` while `run`
/// holds the lock): it succeeds, sends nothing, writes nothing (the daemon
/// is stopped with SIGSTOP meanwhile, so any change to the state file or
/// the VMS log is the dry run's), and the daemon's next cycle sends exactly
/// what it planned.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_beside_the_daemon_previews_its_next_cycle() {
    let lab = lab(4, 4).await;
    let d = start(&lab, &[], &[]).await;
    let first = wait_finished(&d.admin, "incremental", 1).await;
    // Stopped right after a cycle, well before the next (every 2 s).
    let from = wait_finished(&d.admin, "incremental", first + 1).await;
    let pid = d.child.id().to_string();
    signal("-STOP", &pid);
    // Two customers stop paying.
    for id in [1, 2] {
        let mut bm = lab.bm.data();
        let a = bm.accounts.iter_mut().find(|a| a.id == id).unwrap();
        (a.balance, a.credit_limits) = ("-50.00".into(), vec!["0".into()]);
    }
    let files = |lab: &Lab| {
        let state = lab.state_path();
        let wal = state.with_extension("db-wal");
        (std::fs::read(&state).unwrap(), std::fs::read(wal).ok())
    };
    let (before, requests) = (files(&lab), lab.vms.requests());
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(lab.config_path());
    cmd.args(["sync", "--dry-run", "--json"])
        .env_remove("RUST_LOG");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap());
    let out = out.await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("billsync pid {pid} holds")),
        "{stderr}"
    );
    assert_eq!(lab.vms.requests(), requests, "the dry run sent requests");
    assert!(files(&lab) == before, "the dry run wrote to the state file");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let planned: BTreeSet<String> = (report["plan"].as_array().unwrap().iter())
        .map(|p| p["login"].as_str().unwrap().to_string())
        .collect();
    let expected = ["user1@bm.example.com", "user2@bm.example.com"];
    assert_eq!(planned, expected.map(String::from).into(), "{report}");
    let events = lab.vms.data().events.len();
    signal("-CONT", &pid);
    wait_finished(&d.admin, "incremental", from + 1).await;
    let sent: BTreeSet<String> = lab.vms.data().events[events..]
        .iter()
        .map(|e| e.login.clone())
        .collect();
    assert_eq!(sent, planned, "the next cycle sent another plan");
}

fn signal(which: &str, pid: &str) {
    let ok = Command::new("kill").args([which, pid]).status().unwrap();
    assert!(ok.success(), "kill {which} {pid}");
}
