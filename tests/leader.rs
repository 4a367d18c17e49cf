//! SPEC §13 end to end: the state store in a real PostgreSQL shared by
//! nodes, one of which leads through the lease. The real binary against the
//! emulators on loopback.

mod nodes;
use nodes::{billsync, created_twice, wait_for, Node, Terms, Via};

use std::time::Duration;

use billsync::store::{Claim, Store};
use billsync_emulators::lab::Lab;
use billsync_emulators::proxy::Proxy;

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

/// Two nodes on one store: exactly one leads and only it sends VMS
/// requests. After kill -9 of the leader the standby leads and pushes a
/// change within the lease plus a renewal plus a cycle, no login created
/// twice.
#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_one_leader_and_a_takeover_after_kill_9() {
    let _one = nodes::one_at_a_time().await;
    let (lab, _other) = shared_lab(5, 5).await;
    let a = Node::start(&lab, "node-a").await;
    wait_for("node-a to lead", Duration::from_secs(10), || a.leads()).await;
    let b = Node::start(&lab, "node-b").await;
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
    the_standby_serves_and_the_leader_acts(&lab, &a, &b).await;

    let mut a = a;
    a.kill_9();
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
    // SPEC §13: the lease (3 s) plus a renew interval (1 s) plus a cycle;
    // 2 s more for a loaded machine.
    assert!(took < Duration::from_secs(8), "took over in {took:?}");
    eprintln!("takeover to the first push: {:.1} s", took.as_secs_f64());
    assert_eq!(created_twice(&lab), Default::default(), "created twice");
}

/// What a standby serves (SPEC §13): ready to take over, who leads, the
/// epoch; a resync posted to it is done by the leader.
async fn the_standby_serves_and_the_leader_acts(lab: &Lab, a: &Node, b: &Node) {
    let (code, ready) = b.readyz().await;
    assert_eq!(
        (code, ready["role"].as_str()),
        (200, Some("standby")),
        "{ready}"
    );
    let metrics = b.metrics().await;
    assert!(
        metrics.lines().any(|l| l == "billsync_leader 0"),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == "billsync_lease_epoch 1"),
        "{metrics}"
    );
    let status: serde_json::Value = reqwest::get(format!("{}/status", b.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let leader = &status["leader"];
    assert!(
        leader["node"].as_str().unwrap().starts_with("node-a/"),
        "{leader}"
    );
    assert_eq!(
        (leader["epoch"].as_i64(), leader["expired"].as_bool()),
        (Some(1), Some(false))
    );

    let login = "user1@bm.example.com";
    let touched = || {
        lab.vms
            .data()
            .events
            .iter()
            .filter(|e| e.login == login)
            .count()
    };
    let before = touched();
    let r = reqwest::Client::new()
        .post(format!("{}/resync", b.admin))
        .bearer_auth(nodes::TOKEN)
        .json(&serde_json::json!({"logins": [login]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_i64()
        .unwrap();
    let db = sqlx::PgPool::connect(lab.state_url.as_deref().unwrap())
        .await
        .unwrap();
    let consumed = || async {
        let q = "SELECT consumed_at IS NOT NULL AND cycle_id IS NOT NULL
                 FROM control_requests WHERE id = $1";
        sqlx::query_scalar(q).bind(id).fetch_one(&db).await.unwrap()
    };
    wait_for(
        "the leader to do the resync",
        Duration::from_secs(10),
        consumed,
    )
    .await;
    let pushed = || async { touched() > before };
    wait_for(
        "the login's full state pushed",
        Duration::from_secs(10),
        pushed,
    )
    .await;
    assert_eq!(b.vms_requests().await, 0, "the standby did the resync");
    assert!(a.leads().await);
}

/// A leader frozen (SIGSTOP) mid-push for three lease periods, then woken:
/// meanwhile the standby takes over and finishes the push; once awake the
/// old leader starts no VMS request (only those in flight when it froze
/// complete), steps down, and there is one leader. Exact convergence, no
/// login created twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_frozen_mid_push_wakes_up_as_a_standby_and_sends_nothing() {
    let _one = nodes::one_at_a_time().await;
    let (lab, other) = shared_lab(20, 20).await;
    // Slow enough that a freeze lands in the middle of the first push.
    lab.vms.faults.set_latency(Duration::from_millis(300));
    let url = lab.state_url.clone().unwrap();
    let named = |name: &str| Via {
        state_url: Some(nodes::through(&url, nodes::addr_of(&url), name)),
        ..Via::default()
    };
    // The schema is there (`other` migrated it), no node writes yet.
    let writes = nodes::log_writes(&url).await;
    let terms = Terms::watch(other);
    let a = Node::start_via(&lab, "node-a", &named("node-a")).await;
    wait_for("node-a to lead", Duration::from_secs(10), || a.leads()).await;
    let b = Node::start_via(&lab, "node-b", &named("node-b")).await;
    let pushing = || async { lab.vms.requests() >= 8 };
    wait_for("node-a to be pushing", Duration::from_secs(20), pushing).await;
    let sent_before = a.vms_requests().await;
    a.signal("-STOP");
    assert!(
        lab.vms.data().users.len() < 40,
        "the push ended before the freeze"
    );
    wait_for("node-b to take over", Duration::from_secs(15), || b.leads()).await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    a.signal("-CONT");
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
    assert_eq!(created_twice(&lab), Default::default(), "created twice");
    // No write of node-a committed in node-b's term: what it tried as it
    // woke failed on the epoch.
    let terms = terms.all();
    let taken = terms.iter().find(|(_, node, _)| node != "node-a");
    let (_, _, since) = taken.expect("node-b's term");
    assert!(
        nodes::writes_after(&writes, "node-a", 0).await > 0,
        "the premise"
    );
    assert_eq!(nodes::writes_after(&writes, "node-a", *since).await, 0);
}

/// Node `name` whose store and VMS traffic go through proxies of its own:
/// the first can be paused (a partition), the second records its sends.
async fn node_via_proxies(lab: &Lab, name: &str) -> (Node, Proxy, Proxy) {
    let url = lab.state_url.clone().unwrap();
    let db = Proxy::start(nodes::addr_of(&url)).await.unwrap();
    let vms = Proxy::start(lab.vms_srv.addr).await.unwrap();
    let via = Via {
        state_url: Some(nodes::through(&url, db.addr, name)),
        vms_url: Some(format!("http://{}", vms.addr)),
        lease: None,
        env: Vec::new(),
    };
    (Node::start_via(lab, name, &via).await, db, vms)
}

/// A paying BILLmanager customer stops paying; their login.
fn stop_paying(lab: &Lab) -> String {
    let mut bm = lab.bm.data();
    let acc = bm.accounts.iter_mut().find(|x| x.status == "1");
    let acc = acc.expect("an active BILLmanager customer");
    assert!(!acc.balance.starts_with('-'), "the premise: they pay");
    acc.balance = "-1000.00".into();
    acc.credit_limits.clear();
    acc.email.trim().to_lowercase()
}

fn detached(lab: &Lab, login: &str) -> bool {
    let user = lab.vms.user(login);
    user.is_some_and(|u| !u.permissions.contains("archives-show"))
}

/// The leader cut off from the database but not from the VMS: it stops
/// pushing within the lease, the other node takes over and pushes, and
/// once the partition heals there is one leader, the new one.
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_cut_off_from_the_database_stops_pushing_within_the_lease() {
    let _one = nodes::one_at_a_time().await;
    let (lab, other) = shared_lab(15, 15).await;
    let terms = Terms::watch(other);
    // Slow enough that the cut lands in the middle of the first push.
    lab.vms.faults.set_latency(Duration::from_millis(200));
    let (a, a_db, a_vms) = node_via_proxies(&lab, "node-a").await;
    wait_for("node-a to lead", Duration::from_secs(10), || a.leads()).await;
    let (b, _b_db, b_vms) = node_via_proxies(&lab, "node-b").await;
    let some = || async { lab.vms.data().users.len() >= 8 };
    wait_for("node-a to be pushing", Duration::from_secs(20), some).await;

    a_db.pause();
    let cut = std::time::SystemTime::now();
    assert!(
        lab.vms.data().users.len() < 30,
        "the push ended before the cut"
    );
    let login = stop_paying(&lab);
    let pushed = || async { detached(&lab, &login) && lab.vms.data().users.len() == 30 };
    wait_for(
        "node-b to take over and push",
        Duration::from_secs(40),
        pushed,
    )
    .await;
    assert!(b.leads().await && !a.leads().await);
    let late: Vec<_> = (a_vms.sent_at().into_iter())
        .filter(|t| *t > cut + nodes::LEASE)
        .collect();
    assert!(
        late.is_empty(),
        "node-a sent {} requests past its lease",
        late.len()
    );

    a_db.resume();
    let standby = || async { a.role().await == "standby" };
    wait_for("node-a to be a standby", Duration::from_secs(10), standby).await;
    tokio::time::sleep(nodes::LEASE).await;
    assert!(
        b.leads().await && !a.leads().await,
        "not one leader after healing"
    );
    assert_eq!(
        a.readyz().await.0,
        200,
        "the healed node could not take over"
    );
    for (node, vms) in [("node-a", &a_vms), ("node-b", &b_vms)] {
        let foreign = terms.foreign(node, &vms.sent_at());
        assert!(
            foreign.is_empty(),
            "{node} sent in another's term: {foreign:?}"
        );
    }
    assert_eq!(created_twice(&lab), Default::default(), "created twice");
}

/// The leader's database sessions terminated again and again for two
/// leases (`pg_terminate_backend`) while a change waits: its pool
/// reconnects or it loses the lease, never both nodes pushing; once the
/// storm ends one node leads and the change is pushed.
#[tokio::test(flavor = "multi_thread")]
async fn the_leaders_sessions_terminated_never_make_two_leaders() {
    let _one = nodes::one_at_a_time().await;
    let (lab, other) = shared_lab(10, 10).await;
    let terms = Terms::watch(other);
    let (a, _a_db, a_vms) = node_via_proxies(&lab, "node-a").await;
    wait_for("node-a to lead", Duration::from_secs(10), || a.leads()).await;
    let (b, _b_db, b_vms) = node_via_proxies(&lab, "node-b").await;
    let all = || async { lab.vms.data().users.len() == 20 };
    wait_for("the leader's first sync", Duration::from_secs(20), all).await;

    let admin = sqlx::PgPool::connect(lab.state_url.as_deref().unwrap())
        .await
        .unwrap();
    let login = stop_paying(&lab);
    let storm = std::time::Instant::now();
    let mut terminated = 0;
    while storm.elapsed() < nodes::LEASE * 2 {
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'node-a'",
        )
        .fetch_all(&admin)
        .await
        .unwrap();
        terminated += killed.iter().filter(|k| **k).count();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        terminated > 0,
        "the premise: sessions of node-a were terminated"
    );
    let pushed = || async { detached(&lab, &login) };
    wait_for("the change to be pushed", Duration::from_secs(20), pushed).await;
    tokio::time::sleep(nodes::LEASE).await;
    let (la, lb) = (a.leads().await, b.leads().await);
    assert!(la ^ lb, "not one leader: node-a {la}, node-b {lb}");
    for (node, vms) in [("node-a", &a_vms), ("node-b", &b_vms)] {
        let foreign = terms.foreign(node, &vms.sent_at());
        assert!(
            foreign.is_empty(),
            "{node} sent in another's term: {foreign:?}"
        );
    }
    assert!(!a_vms.sent_at().is_empty(), "the premise: node-a pushed");
    eprintln!(
        "sessions terminated: {terminated}; terms: {:?}",
        terms.all()
    );
    assert_eq!(created_twice(&lab), Default::default(), "created twice");
}

/// After a takeover the new leader pushes the logins the dead one left in
/// doubt as soon as their wait ends (a VMS timeout), by a cycle of its
/// own: with an hourly schedule nothing else would come for an hour.
#[tokio::test(flavor = "multi_thread")]
async fn logins_left_in_doubt_are_pushed_when_their_wait_ends() {
    let _one = nodes::one_at_a_time().await;
    let (lab, other) = shared_lab(15, 15).await;
    lab.vms.faults.set_latency(Duration::from_millis(300));
    let hourly = Via {
        env: vec![("BILLSYNC__DAEMON__SCHEDULE", "0 0 * * * *".into())],
        ..Via::default()
    };
    let mut a = Node::start_via(&lab, "node-a", &hourly).await;
    wait_for("node-a to lead", Duration::from_secs(10), || a.leads()).await;
    let b = Node::start_via(&lab, "node-b", &hourly).await;
    let some = || async { lab.vms.data().users.len() >= 6 };
    wait_for("node-a to be pushing", Duration::from_secs(30), some).await;
    a.kill_9();
    let in_doubt = other.load_in_doubt().await.unwrap();
    assert!(!in_doubt.is_empty(), "the premise: requests were in flight");
    let all = || async { lab.vms.data().users.len() == 30 };
    wait_for("node-b to push everything", Duration::from_secs(30), all).await;
    let cleared = || async { other.load_in_doubt().await.unwrap().is_empty() };
    wait_for("no login in doubt", Duration::from_secs(10), cleared).await;
    assert!(b.leads().await);
    assert_eq!(created_twice(&lab), Default::default(), "created twice");
}
