//! SPEC §13 end to end: the state store in a real PostgreSQL shared by
//! nodes, one of which leads through the lease. The real binary against the
//! emulators on loopback.

use std::process::Command;
use std::time::Duration;

use billsync::store::{Claim, Store};
use billsync_emulators::lab::Lab;

const BIN: &str = env!("CARGO_BIN_EXE_billsync");

fn billsync(lab: &Lab, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--config").arg(lab.config_path()).args(args);
    c.env_remove("RUST_LOG");
    c
}

/// A lab whose state store is a fresh PostgreSQL database, and a handle on
/// that store as another node would hold it.
async fn shared_lab(bm: usize, ap: usize) -> (Lab, Store) {
    let lab = Lab::start(bm, ap).await.unwrap().with_postgres();
    lab.write_config("");
    let url = lab.state_url.clone().unwrap();
    let other = Store::open_postgres(&url, Duration::from_secs(10))
        .await
        .unwrap();
    (lab, other)
}

/// While another node holds the lease, `sync` exits 3, names it and sends
/// nothing; once the lease is free it leads for its run, converges, and
/// gives the lease up at the end (the next leader need not wait).
#[tokio::test(flavor = "multi_thread")]
async fn sync_leads_for_its_run_or_names_the_leader() {
    let (lab, other) = shared_lab(3, 3).await;
    let Claim::Held(held) = other.claim_lease("node-b/1234", 60_000).await.unwrap() else {
        panic!("a fresh store's lease was taken");
    };
    let out = billsync(&lab, &["sync"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("node-b/1234") && err.contains("leads"),
        "{err}"
    );
    assert_eq!(lab.vms.requests(), 0, "a standby sent requests");

    other
        .release_lease("node-b/1234", held.epoch)
        .await
        .unwrap();
    let out = billsync(&lab, &["sync"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(lab.vms.data().users.len(), 6);
    let lease = other.lease().await.unwrap().expect("a lease row");
    assert_eq!(lease.epoch, held.epoch + 1, "sync led at the next epoch");
    assert!(
        lease.expires_ms <= lease.now_ms,
        "released at the end: {lease:?}"
    );
    match other.claim_lease("node-b/1234", 60_000).await.unwrap() {
        Claim::Held(r) => assert_eq!(r.epoch, held.epoch + 2),
        Claim::Other(r) => panic!("the lease was not given up: {r:?}"),
    }
}

/// `sync --dry-run` needs no lease: beside the node that leads it plans
/// from the shared store, exits 0, and writes nothing there (no cycle, the
/// lease untouched) and sends nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_plans_beside_the_leader_and_writes_nothing() {
    let (lab, other) = shared_lab(3, 3).await;
    let out = billsync(&lab, &["sync"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = billsync_emulators::activeplatform::generate(4, 7)
        .pop()
        .unwrap();
    lab.ap.data().accounts.push(new);
    let Claim::Held(held) = other.claim_lease("node-b/1", 60_000).await.unwrap() else {
        panic!("sync did not give the lease up");
    };
    let cycles = other.last_cycles(100).await.unwrap().len();
    let requests = lab.vms.requests();
    let out = billsync(&lab, &["sync", "--dry-run", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let planned: Vec<_> = report["plan"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["login"].clone(), p["action"].clone()))
        .collect();
    assert!(
        planned.contains(&("client4@ap.example.com".into(), "create".into())),
        "{planned:?}"
    );
    assert_eq!(lab.vms.requests(), requests, "a dry run sent requests");
    assert_eq!(
        other.last_cycles(100).await.unwrap().len(),
        cycles,
        "a dry run wrote a cycle"
    );
    let lease = other.lease().await.unwrap().unwrap();
    assert_eq!(
        (lease.holder.as_str(), lease.epoch, lease.expires_ms),
        ("node-b/1", held.epoch, held.expires_ms)
    );
}

const TOKEN: &str = "test-admin-token-0123456789";

/// One `billsync run` node of the lab's shared store.
struct Daemon {
    child: std::process::Child,
    admin: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Node `name` with a short lease (3 s, renewed every second), its
    /// admin endpoint up.
    async fn start(lab: &Lab, name: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let admin = format!("127.0.0.1:{port}");
        let child = billsync(lab, &["run"])
            .env("BILLSYNC__ADMIN__LISTEN", &admin)
            .env("BILLSYNC__ADMIN__TOKEN", TOKEN)
            .env("BILLSYNC__DAEMON__NODE_NAME", name)
            .env("BILLSYNC__DAEMON__LEASE_SECS", "3")
            .env_remove("NOTIFY_SOCKET")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            admin: format!("http://{admin}"),
        };
        let up = || async { reqwest::get(format!("{}/livez", d.admin)).await.is_ok() };
        wait_for("the node's admin endpoint", Duration::from_secs(20), up).await;
        d
    }

    async fn metrics(&self) -> String {
        let r = reqwest::get(format!("{}/metrics", self.admin)).await;
        r.unwrap().text().await.unwrap()
    }

    /// `billsync_leader` as this node reports it.
    async fn leads(&self) -> bool {
        self.metrics()
            .await
            .lines()
            .any(|l| l == "billsync_leader 1")
    }

    /// Every VMS request this node sent (`billsync_vms_requests_total`).
    async fn vms_requests(&self) -> u64 {
        let text = self.metrics().await;
        let counts = text
            .lines()
            .filter(|l| l.starts_with("billsync_vms_requests_total{"));
        counts
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    async fn role(&self) -> String {
        let r = reqwest::get(format!("{}/healthz", self.admin))
            .await
            .unwrap();
        let v: serde_json::Value = r.json().await.unwrap();
        v["role"].as_str().unwrap_or_default().to_string()
    }
}

/// Waits for `f`; fails the test when `limit` passes first.
async fn wait_for<F, Fut>(what: &str, limit: Duration, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = std::time::Instant::now();
    while !f().await {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two nodes on one store: exactly one leads and only it sends VMS
/// requests. After kill -9 of the leader the standby leads and pushes a
/// change within the lease plus a renewal plus a cycle, no login created
/// twice.
#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_one_leader_and_a_takeover_after_kill_9() {
    let (lab, _other) = shared_lab(5, 5).await;
    let a = Daemon::start(&lab, "node-a").await;
    wait_for("node-a to lead", Duration::from_secs(10), || a.leads()).await;
    let b = Daemon::start(&lab, "node-b").await;
    let all = || async { lab.vms.data().users.len() == 10 };
    wait_for("the leader's first sync", Duration::from_secs(20), all).await;
    // A few renewals and cycles later, still one leader.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(a.leads().await && !b.leads().await);
    assert_eq!(
        (a.role().await.as_str(), b.role().await.as_str()),
        ("leader", "standby")
    );
    assert_eq!(b.vms_requests().await, 0, "the standby sent VMS requests");
    assert!(a.vms_requests().await >= 10);

    let mut a = a;
    a.child.kill().unwrap();
    let _ = a.child.wait();
    let killed = std::time::Instant::now();
    // A customer stops paying while nobody leads.
    let paying = |email: &str| {
        let user = lab.vms.user(&email.trim().to_lowercase());
        user.is_some_and(|u| u.permissions.contains("archives-show"))
    };
    let login = {
        let mut bm = lab.bm.data();
        let acc = bm.accounts.iter_mut().find(|x| paying(&x.email));
        let acc = acc.expect("a paying BILLmanager customer");
        acc.balance = "-1000.00".into();
        acc.credit_limits.clear();
        acc.email.trim().to_lowercase()
    };
    let detached = || async {
        let user = lab.vms.user(&login).unwrap();
        !user.permissions.contains("archives-show")
    };
    // Lease 3 s + a renewal (1 s) + the 2 s schedule, and slack for a
    // loaded machine.
    wait_for(
        "the standby to take over and push",
        Duration::from_secs(15),
        detached,
    )
    .await;
    let took = killed.elapsed();
    assert!(b.leads().await, "node-b pushed without leading");
    eprintln!("takeover to the first push: {:.1} s", took.as_secs_f64());
    let mut created: std::collections::BTreeMap<String, usize> = Default::default();
    for e in lab.vms.data().events.iter() {
        if e.method == "POST" && e.path == "user/manage" && (200..300).contains(&e.status) {
            *created.entry(e.login.clone()).or_default() += 1;
        }
    }
    assert!(
        created.values().all(|n| *n == 1),
        "created twice: {created:?}"
    );
}

/// A leader frozen (SIGSTOP) mid-push for three lease periods, then woken:
/// meanwhile the standby takes over and finishes the push; once awake the
/// old leader starts no VMS request (only those in flight when it froze
/// complete), steps down, and there is one leader. Exact convergence, no
/// login created twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_frozen_mid_push_wakes_up_as_a_standby_and_sends_nothing() {
    let (lab, _other) = shared_lab(20, 20).await;
    // Slow enough that a freeze lands in the middle of the first push.
    lab.vms.faults.set_latency(Duration::from_millis(300));
    let a = Daemon::start(&lab, "node-a").await;
    wait_for("node-a to lead", Duration::from_secs(10), || a.leads()).await;
    let b = Daemon::start(&lab, "node-b").await;
    let pushing = || async { lab.vms.requests() >= 8 };
    wait_for("node-a to be pushing", Duration::from_secs(20), pushing).await;
    let pid = a.child.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    let sent_before = a.vms_requests().await;
    signal("-STOP");
    assert!(
        lab.vms.data().users.len() < 40,
        "the push ended before the freeze"
    );
    wait_for("node-b to take over", Duration::from_secs(15), || b.leads()).await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    signal("-CONT");
    wait_for("node-a to step down", Duration::from_secs(10), || async {
        a.role().await == "standby"
    })
    .await;
    let all = || async { lab.vms.data().users.len() == 40 };
    wait_for("node-b to finish the push", Duration::from_secs(60), all).await;
    // At most the requests in flight when it froze (vms.concurrency 4),
    // and those between reading its count and the freeze.
    let after = a.vms_requests().await;
    assert!(
        after <= sent_before + 8,
        "the woken node sent {} requests",
        after - sent_before
    );
    assert!(!a.leads().await && b.leads().await);
    let mut created: std::collections::BTreeMap<String, usize> = Default::default();
    for e in lab.vms.data().events.iter() {
        if e.method == "POST" && e.path == "user/manage" && (200..300).contains(&e.status) {
            *created.entry(e.login.clone()).or_default() += 1;
        }
    }
    assert!(
        created.values().all(|n| *n == 1),
        "created twice: {created:?}"
    );
}
