//! SPEC §2 end to end: the engine against the three emulators over real
//! loopback HTTP, with a real SQLite file (and again, every test, with a
//! real PostgreSQL: tests/engine_on_postgres.rs).

mod common;
use common::LabSettings;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use billsync::core::cycle::{CycleKind, CycleResult};
use billsync::core::model::SourceKind as Kind;
use billsync::engine::{Clock, CycleOptions, CycleReport, Engine};
use billsync::store::RequestKind;
use billsync_emulators::lab::Lab;
use billsync_emulators::Fault;

async fn setup(bm: usize, ap: usize, extra: &str, env: &[(&str, &str)]) -> (Lab, Engine) {
    let lab = Lab::start(bm, ap).await.unwrap();
    let settings = lab.settings(extra, env).unwrap();
    let engine = Engine::new(settings).await.unwrap();
    (lab, engine)
}

/// Replaces the engine's clock with one that reads the Unix second the
/// test sets (starting at the last whole 10 minutes, plus one second):
/// days pass without waiting for them.
fn fake_clock(engine: &mut Engine) -> Arc<AtomicI64> {
    let now = chrono::Utc::now().timestamp();
    let time = Arc::new(AtomicI64::new(now - now % 600 + 1));
    let t = time.clone();
    engine.set_clock(Clock::from_fn(move || {
        chrono::DateTime::from_timestamp(t.load(Ordering::SeqCst), 0).unwrap()
    }));
    time
}

async fn cycle(engine: &Engine) -> CycleReport {
    engine.run_cycle(&CycleOptions::default()).await.unwrap()
}

async fn cycle_with(engine: &Engine, opts: CycleOptions) -> CycleReport {
    engine.run_cycle(&opts).await.unwrap()
}

const MANAGED: [&str; 3] = [
    "archives-download",
    "archives-preview-download",
    "archives-show",
];

#[tokio::test]
async fn creates_users_with_permissions_then_sends_nothing() {
    let (lab, engine) = setup(20, 20, "", &[]).await;
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    assert_eq!(r.operations.create, 40);
    let data = lab.vms.data().users.clone();
    assert_eq!(data.len(), 40);
    let bm = lab.bm.data().accounts.clone();
    for a in &bm {
        let login = a.email.trim().to_lowercase();
        let u = &data[&login];
        assert_eq!(u.user_type, "b2c");
        assert_eq!(
            u.billing_info["billing_id"],
            format!("billmanager-{}", a.id)
        );
        assert_eq!(u.properties[0]["type"], "phone");
        // The default rule: balance + credit >= 0 grants every managed permission.
        let balance: f64 = a.balance.parse().unwrap();
        let credit: f64 = a
            .credit_limits
            .iter()
            .map(|c| c.parse::<f64>().unwrap())
            .sum();
        let paying = a.status == "1" && balance + credit >= 0.0;
        for p in MANAGED {
            assert_eq!(u.permissions.contains(p), paying, "{login} {p}");
        }
        assert_eq!(u.status, if a.status == "1" { "active" } else { "blocked" });
        // Permissions billsync does not manage are left alone.
        assert!(u.permissions.contains("camera-events-index"));
    }
    let before = lab.vms.requests();
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Ok);
    assert_eq!(
        lab.vms.requests(),
        before,
        "an unchanged world sends nothing"
    );
    assert_eq!(
        r.operations.create + r.operations.update + r.operations.delete,
        0
    );
}

#[tokio::test]
async fn profile_status_and_permission_updates() {
    let (lab, engine) = setup(10, 0, "", &[]).await;
    cycle(&engine).await;
    {
        let mut d = lab.bm.data();
        d.accounts[0].status = "1".into();
        d.accounts[0].balance = "-500.00".into(); // loses the paying rule
        d.accounts[1].status = "2".into(); // suspended -> blocked
        d.accounts[2].phone = "+7 000 111-22-33".into(); // profile change (details)
        d.accounts[2].balance = "77.00".into(); // list row change -> details re-read
    }
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    let u0 = lab.vms.user("user1@bm.example.com").unwrap();
    assert!(
        MANAGED.iter().all(|p| !u0.permissions.contains(*p)),
        "{:?}",
        u0.permissions
    );
    assert_eq!(u0.status, "active");
    let u1 = lab.vms.user("user2@bm.example.com").unwrap();
    assert_eq!(u1.status, "blocked");
    assert!(MANAGED.iter().all(|p| !u1.permissions.contains(*p)));
    assert!(u1.permissions.contains("camera-events-index"));
    let u2 = lab.vms.user("user3@bm.example.com").unwrap();
    assert_eq!(u2.properties[0]["value"], "+70001112233");
}

#[tokio::test]
async fn deletion_after_the_grace_period() {
    let (lab, engine) = setup(10, 0, "", &[]).await;
    cycle(&engine).await;
    lab.bm.data().accounts.retain(|a| a.id != 4);
    let before = lab.vms.requests();
    let r = cycle(&engine).await;
    assert_eq!(
        lab.vms.requests(),
        before,
        "first missing cycle: within grace"
    );
    assert_eq!(r.result, CycleResult::Ok);
    cycle(&engine).await;
    let u = lab.vms.user("user4@bm.example.com").unwrap();
    assert_eq!(
        u.status, "blocked",
        "second missing cycle: deleted (blocked)"
    );
    assert!(MANAGED.iter().all(|p| !u.permissions.contains(*p)));
}

#[tokio::test]
async fn on_deleted_delete_removes_the_user() {
    let (lab, engine) = setup(
        6,
        0,
        "",
        &[
            ("BILLSYNC__VMS__ON_DELETED", "delete"),
            ("BILLSYNC__DAEMON__MISSING_GRACE_CYCLES", "1"),
        ],
    )
    .await;
    cycle(&engine).await;
    lab.bm.data().accounts[2].status = "3".into(); // deleted in BILLmanager
    lab.bm.data().accounts.retain(|a| a.id != 5);
    cycle(&engine).await;
    assert!(lab.vms.user("user3@bm.example.com").is_none());
    assert!(lab.vms.user("user5@bm.example.com").is_none());
    assert_eq!(lab.vms.count("DELETE", 204), 2);
    // Deleted on first sight: never created.
    lab.bm
        .data()
        .accounts
        .push(billsync_emulators::billmanager::BmAccount {
            id: 99,
            name: "Late".into(),
            email: "late@bm.example.com".into(),
            phone: String::new(),
            status: "3".into(),
            balance: "0".into(),
            credit_limits: vec![],
        });
    cycle(&engine).await;
    assert_eq!(lab.vms.count_for("POST", "late@bm.example.com"), 0);
}

#[tokio::test]
async fn safety_threshold_holds_until_approved() {
    let (lab, engine) = setup(
        30,
        0,
        "",
        &[
            ("BILLSYNC__SAFETY__MAX_DEPROVISION", "3"),
            ("BILLSYNC__DAEMON__MISSING_GRACE_CYCLES", "1"),
        ],
    )
    .await;
    cycle(&engine).await;
    lab.bm.data().accounts.truncate(20); // 10 gone: over the limit of 3
    lab.bm.data().accounts[0].phone = "+1 555".into();
    lab.bm.data().accounts[0].balance = "1.00".into(); // a non-destructive change still goes out
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Held, "{r:?}");
    assert_eq!(r.held, 10);
    assert_eq!(
        lab.vms.user("user25@bm.example.com").unwrap().status,
        "active"
    );
    assert_eq!(
        lab.vms.user("user1@bm.example.com").unwrap().properties[0]["value"],
        "+1555"
    );
    // Still held next cycle.
    assert_eq!(cycle(&engine).await.result, CycleResult::Held);
    engine
        .store
        .request(RequestKind::Approve, None)
        .await
        .unwrap();
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    assert_eq!(
        lab.vms.user("user25@bm.example.com").unwrap().status,
        "blocked"
    );
    // The approval was used up.
    assert!(!engine.store.pending_requests().await.unwrap().approve);
}

#[tokio::test]
async fn empty_or_failing_source_deprovisions_nothing() {
    let (lab, engine) = setup(
        10,
        10,
        "",
        &[("BILLSYNC__DAEMON__MISSING_GRACE_CYCLES", "1")],
    )
    .await;
    cycle(&engine).await;
    let snapshot = lab.vms.data().users.clone();
    lab.bm.faults.always("account", Fault::EmptyListing);
    lab.ap.faults.always("accounts.json", Fault::Status(503));
    for _ in 0..3 {
        let r = cycle(&engine).await;
        assert_eq!(r.result, CycleResult::Failed, "every source failed: {r:?}");
    }
    assert_eq!(lab.vms.data().users, snapshot);
    // One source failing, the other fine: partial, and still no deprovision.
    lab.bm.faults.clear();
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Partial);
    assert_eq!(lab.vms.data().users, snapshot);
}

/// A node whose lease lapses mid-push starts no request after (SPEC
/// §13): the rest waits, nothing is quarantined, nothing is recorded that
/// the VMS did not confirm; once it may act again the next cycle
/// converges exactly.
#[tokio::test]
async fn no_request_starts_once_the_lease_lapses() {
    struct Until(Arc<billsync_emulators::vms::VmsEmulator>, Arc<AtomicI64>);
    impl billsync::lease::Gate for Until {
        fn may_act(&self) -> bool {
            (self.0.requests() as i64) < self.1.load(Ordering::SeqCst)
        }
    }
    let (lab, mut engine) = setup(10, 10, "", &[]).await;
    let allowed = Arc::new(AtomicI64::new(5));
    engine.set_gate(Arc::new(Until(lab.vms.clone(), allowed.clone())));
    let r = cycle(&engine).await;
    let sent = lab.vms.requests();
    // Requests that passed the gate before the fifth answer came back.
    let concurrency = 4;
    assert!(
        sent >= 5 && sent < 5 + concurrency,
        "{sent} requests: {r:?}"
    );
    assert!(engine.store.load_quarantine().await.unwrap().is_empty());
    let applied = engine.store.load_applied().await.unwrap().users.len();
    assert!(applied <= sent, "{applied} applied from {sent} requests");
    cycle(&engine).await;
    assert_eq!(
        lab.vms.requests(),
        sent,
        "a cycle sent requests without the lease"
    );
    allowed.store(i64::MAX, Ordering::SeqCst);
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    assert_eq!(lab.vms.data().users.len(), 20);
    assert_eq!(engine.store.load_applied().await.unwrap().users.len(), 20);
}

#[tokio::test]
async fn quarantine_and_release() {
    let (lab, engine) = setup(5, 0, "", &[]).await;
    lab.vms
        .data()
        .force_422
        .insert("user2@bm.example.com".into());
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Partial);
    assert_eq!(r.quarantined, 1);
    let q = engine.store.load_quarantine().await.unwrap();
    assert_eq!(q[0].key, "user2@bm.example.com");
    assert!(q[0].error.contains("422"), "{}", q[0].error);
    // Not retried while the account is unchanged.
    let n = lab.vms.count_for("POST", "user2@bm.example.com");
    cycle(&engine).await;
    assert_eq!(lab.vms.count_for("POST", "user2@bm.example.com"), n);
    // Released by the operator: pushed again.
    lab.vms.data().force_422.clear();
    engine
        .store
        .release_quarantine(Some(&["user2@bm.example.com".to_string()]))
        .await
        .unwrap();
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    assert!(lab.vms.user("user2@bm.example.com").is_some());
}

#[tokio::test]
async fn adopts_an_existing_login() {
    let (lab, engine) = setup(3, 0, "", &[]).await;
    // The user exists already (created by hand, or by a run that died).
    let v = lab.vms_srv.base_url();
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{v}/api/v1/billing/user/manage"))
        .json(&serde_json::json!({"login": "user2@bm.example.com", "password": "x", "type": "b2c", "status": "blocked"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    let u = lab.vms.user("user2@bm.example.com").unwrap();
    assert_eq!(
        u.status, "active",
        "adopted and brought to the desired state"
    );
    assert_eq!(lab.vms.count("POST", 422), 1);
    assert_eq!(lab.vms.count_for("POST", "user2@bm.example.com"), 2);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let (lab, engine) = setup(1, 0, "", &[]).await;
    lab.vms.faults.once("POST user/manage", Fault::TooMany(1));
    let t = Instant::now();
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "waited {:?}",
        t.elapsed()
    );
    assert_eq!(lab.vms.count("POST", 429), 1);
    assert_eq!(lab.vms.count("POST", 200), 1);
}

#[tokio::test]
async fn transient_faults_converge_over_cycles() {
    let (lab, engine) = setup(8, 0, "", &[("BILLSYNC__VMS__MAX_ATTEMPTS", "2")]).await;
    lab.vms
        .faults
        .always("POST user/manage user3", Fault::Status(503));
    lab.vms.faults.always("POST user/manage user4", Fault::Html);
    lab.vms.faults.always(
        "POST user/manage user5",
        Fault::Delay(Duration::from_secs(6)),
    );
    // A proxy's login page behind a 200 is not the VMS saying yes.
    lab.vms
        .faults
        .always("PATCH user/manage user6", Fault::Html200);
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Partial, "{r:?}");
    assert_eq!(r.pending, 4);
    let status = billsync::status::status_json(&engine.store, &engine.settings)
        .await
        .unwrap();
    assert_eq!(status["pending"].as_array().unwrap().len(), 4, "{status}");
    let applied = engine.store.load_applied().await.unwrap();
    let user6 = &applied.users["user6@bm.example.com"].state;
    assert!(user6.permissions.is_empty(), "the attach was not confirmed");
    lab.vms.faults.clear();
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    assert_eq!(lab.vms.data().users.len(), 8);
    assert!(engine.store.load_retries().await.unwrap().is_empty());
    let applied = engine.store.load_applied().await.unwrap();
    for (login, a) in &applied.users {
        let on_vms = lab.vms.user(login).unwrap().permissions;
        assert!(
            a.state.permissions.iter().all(|p| on_vms.contains(p)),
            "{login}"
        );
    }
}

#[tokio::test]
async fn circuit_breaker_stops_a_dead_vms() {
    let (lab, engine) = setup(
        30,
        0,
        "",
        &[
            ("BILLSYNC__VMS__CIRCUIT_BREAKER_FAILURES", "5"),
            ("BILLSYNC__VMS__MAX_ATTEMPTS", "2"),
        ],
    )
    .await;
    lab.vms.faults.always("", Fault::Status(502));
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Failed, "{r:?}");
    assert!(
        lab.vms.requests() < 12,
        "stopped early: {}",
        lab.vms.requests()
    );
    assert_eq!(r.pending, 30);
    lab.vms.faults.clear();
    assert_eq!(cycle(&engine).await.result, CycleResult::Ok);
    assert_eq!(lab.vms.data().users.len(), 30);
}

#[tokio::test]
async fn dry_run_changes_nothing_anywhere() {
    let (lab, engine) = setup(5, 5, "", &[]).await;
    cycle(&engine).await;
    lab.bm.data().accounts[0].balance = "-1000".into();
    lab.ap.data().accounts.push(
        billsync_emulators::activeplatform::generate(6, 7)
            .pop()
            .unwrap(),
    );
    let applied = engine.store.load_applied().await.unwrap();
    let cycles = engine.store.last_cycles(100).await.unwrap().len();
    let requests = lab.vms.requests();
    let r = cycle_with(
        &engine,
        CycleOptions {
            dry_run: true,
            ..Default::default()
        },
    )
    .await;
    assert!(r.dry_run);
    let actions: Vec<(&str, &str)> = r
        .plan
        .iter()
        .map(|p| (p.login.as_str(), p.action.as_str()))
        .collect();
    assert!(
        actions.contains(&("user1@bm.example.com", "detach")),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("client6@ap.example.com", "create")),
        "{actions:?}"
    );
    assert_eq!(lab.vms.requests(), requests);
    assert_eq!(engine.store.load_applied().await.unwrap(), applied);
    assert_eq!(engine.store.last_cycles(100).await.unwrap().len(), cycles);
    assert!(
        engine
            .store
            .account_index(billsync::core::model::SourceKind::Activeplatform)
            .await
            .unwrap()
            .len()
            == 5
    );
}

#[tokio::test]
async fn tree_elements_are_created_and_renamed() {
    let (lab, engine) = setup(
        3,
        2,
        "[vms.tree]\nenabled = true\ntype = \"cameras\"\n",
        &[],
    )
    .await;
    cycle(&engine).await;
    let tree = lab.vms.data().tree.clone();
    assert_eq!(tree.len(), 5);
    assert!(tree
        .iter()
        .any(|t| t.external_id == "billmanager-2" && t.name == "Customer 2"));
    lab.bm.data().accounts[1].name = "Renamed Ltd".into();
    cycle(&engine).await;
    let tree = lab.vms.data().tree.clone();
    assert_eq!(tree.len(), 5);
    assert!(tree
        .iter()
        .any(|t| t.external_id == "billmanager-2" && t.name == "Renamed Ltd"));
    let renames = lab
        .vms
        .data()
        .events
        .iter()
        .filter(|e| e.method == "PATCH" && e.path == "tree")
        .count();
    assert_eq!(renames, 1);
    let before = lab.vms.requests();
    cycle(&engine).await;
    assert_eq!(lab.vms.requests(), before);
}

#[tokio::test]
async fn writeback_is_sent_once() {
    let (lab, engine) = setup(
        0,
        4,
        "",
        &[(
            "BILLSYNC__SOURCES__ACTIVEPLATFORM__WRITEBACK_ATTRIBUTE",
            "vms_login",
        )],
    )
    .await;
    cycle(&engine).await;
    assert_eq!(lab.ap.puts.lock().unwrap().len(), 4);
    let acc = lab.ap.data().accounts[0].clone();
    assert_eq!(acc.custom_attributes.get("vms_login"), Some(&acc.email));
    cycle(&engine).await;
    cycle(&engine).await;
    assert_eq!(lab.ap.puts.lock().unwrap().len(), 4, "written once");
}

#[tokio::test]
async fn a_user_removed_by_hand_is_recreated() {
    let (lab, engine) = setup(3, 0, "", &[]).await;
    cycle(&engine).await;
    lab.vms.data().users.remove("user2@bm.example.com");
    // An incremental cycle does not notice (there is no read endpoint)...
    lab.bm.data().accounts[1].balance = "-999".into();
    cycle(&engine).await;
    // ...until its PATCH answers 422 on the login: re-created, full state.
    let u = lab.vms.user("user2@bm.example.com").unwrap();
    assert!(MANAGED.iter().all(|p| !u.permissions.contains(*p)));
    lab.vms.data().users.remove("user3@bm.example.com");
    let r = cycle_with(
        &engine,
        CycleOptions {
            full: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.kind, CycleKind::Full);
    assert!(
        lab.vms.user("user3@bm.example.com").is_some(),
        "a full resync re-creates"
    );
}

#[tokio::test]
async fn login_change_moves_the_user() {
    let (lab, engine) = setup(3, 0, "", &[]).await;
    cycle(&engine).await;
    lab.bm.data().accounts[0].email = "new-address@bm.example.com".into();
    lab.bm.data().accounts[0].balance = "5.00".into(); // list row change: details re-read
    cycle(&engine).await;
    assert!(lab.vms.user("new-address@bm.example.com").is_some());
    let old = lab.vms.user("user1@bm.example.com").unwrap();
    assert_eq!(old.status, "blocked");
}

#[tokio::test]
async fn conflicts_go_to_the_priority_source() {
    let (lab, engine) = setup(2, 2, "", &[]).await;
    lab.ap.data().accounts[0].email = "user1@bm.example.com".into();
    let r = cycle(&engine).await;
    assert_eq!(r.conflicts, 1);
    let u = lab.vms.user("user1@bm.example.com").unwrap();
    assert_eq!(u.billing_info["billing_id"], "billmanager-1");
    let status = billsync::status::status_json(&engine.store, &engine.settings)
        .await
        .unwrap();
    assert_eq!(status["conflicts"][0]["login"], "user1@bm.example.com");
}

#[tokio::test]
async fn named_resync_pushes_those_logins_in_full() {
    let (lab, engine) = setup(4, 0, "", &[]).await;
    cycle(&engine).await;
    let before = lab.vms.requests();
    engine
        .store
        .request(
            RequestKind::Resync,
            Some(&["user2@bm.example.com".to_string()]),
        )
        .await
        .unwrap();
    let r = cycle(&engine).await;
    assert_eq!(r.operations.update, 1);
    assert_eq!(lab.vms.requests(), before + 1);
    assert_eq!(lab.vms.count_for("PATCH", "user2@bm.example.com"), 2);
}

/// A login that fails alone while the VMS confirms others backs off across
/// cycles (a refusal of the whole channel does not: see convergence.rs).
#[tokio::test]
async fn a_login_backing_off_is_skipped_until_its_time_or_a_resync() {
    let (lab, engine) = setup(
        4,
        0,
        "",
        &[
            ("BILLSYNC__VMS__MAX_ATTEMPTS", "1"),
            ("BILLSYNC__VMS__REQUEUE_BASE_SECS", "3600"),
            // One at a time, in login order: user1 is confirmed before user2 fails.
            ("BILLSYNC__VMS__CONCURRENCY", "1"),
        ],
    )
    .await;
    lab.vms
        .faults
        .always("POST user/manage user2", Fault::Status(503));
    let r = cycle(&engine).await;
    assert_eq!((r.result, r.pending), (CycleResult::Partial, 1), "{r:?}");
    let retry = engine.store.load_retries().await.unwrap()["user2@bm.example.com"].clone();
    assert_eq!(retry.attempts, 1);
    let wait = retry.next_attempt_at - chrono::Utc::now();
    assert!(wait > chrono::Duration::minutes(25), "backs off: {wait}");
    // The VMS is fine again, but the login waits for its time.
    lab.vms.faults.clear();
    let before = lab.vms.requests();
    let r = cycle(&engine).await;
    assert_eq!(lab.vms.requests(), before, "nothing sent while backing off");
    assert_eq!((r.result, r.pending), (CycleResult::Partial, 1), "{r:?}");
    assert!(lab.vms.user("user2@bm.example.com").is_none());
    // A resync of the login does not wait.
    engine
        .store
        .request(
            RequestKind::Resync,
            Some(&["user2@bm.example.com".to_string()]),
        )
        .await
        .unwrap();
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    assert!(lab.vms.user("user2@bm.example.com").is_some());
    assert!(engine.store.load_retries().await.unwrap().is_empty());
}

/// The VMS cannot change an existing user's type: a new `vms.user_type`
/// must not make every login look changed for ever (issue #8, item 4).
#[tokio::test]
async fn a_new_user_type_is_said_once_and_changes_nothing_else() {
    let (lab, engine) = setup(6, 4, "", &[]).await;
    assert_eq!(cycle(&engine).await.result, CycleResult::Ok);
    let settings = lab
        .settings("", &[("BILLSYNC__VMS__USER_TYPE", "b2b")])
        .unwrap();
    let engine = Engine::with_store(settings, engine.store.clone()).unwrap();
    for _ in 0..2 {
        let before = lab.vms.requests();
        let r = cycle(&engine).await;
        assert_eq!(r.result, CycleResult::Ok, "{r:?}");
        assert_eq!(lab.vms.requests(), before, "no VMS request");
        assert_eq!(r.operations, Default::default(), "{r:?}");
    }
    // Every desired user's hash equals its applied one: nothing is
    // re-planned by the no-op cycles that follow.
    let mut applied = std::collections::HashMap::new();
    engine
        .store
        .scan_applied_hashes(|login, hash| {
            applied.insert(login.to_string(), hash.to_string());
        })
        .await
        .unwrap();
    assert_eq!(applied.len(), 10);
    for (login, hash) in &applied {
        let desired = engine.store.desired_user(login).await.unwrap().unwrap();
        assert_eq!(
            &billsync::core::plan::state_hash(&desired.state),
            hash,
            "{login}"
        );
    }
    // Said once, in status.
    let status = billsync::status::status_json(&engine.store, &engine.settings)
        .await
        .unwrap();
    let notices = status["notices"].as_array().unwrap();
    assert_eq!(notices.len(), 1, "{status}");
    assert!(
        notices[0]["message"]
            .as_str()
            .unwrap()
            .contains("vms.user_type"),
        "{status}"
    );
    // A new login (an e-mail change) is created with the new type.
    lab.ap.data().accounts[0].email = "fresh@ap.example.com".into();
    let r = cycle_with(
        &engine,
        CycleOptions {
            allow_deprovision: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.operations.create, 1, "{r:?}");
    assert_eq!(
        lab.vms.user("fresh@ap.example.com").unwrap().user_type,
        "b2b"
    );
}

/// SPEC §10.4. Before: a resync request stayed pending while its cycles
/// failed (or were killed by the watchdog), so every restart began the same
/// doomed full resync, for ever.
#[tokio::test]
async fn a_request_whose_cycles_keep_failing_is_dropped_after_three() {
    let (lab, engine) = setup(3, 3, "", &[]).await;
    cycle(&engine).await;
    engine
        .store
        .request(RequestKind::Resync, None)
        .await
        .unwrap();
    lab.bm.faults.always("", Fault::Status(503));
    lab.ap.faults.always("", Fault::Status(503));
    for attempt in 1..=billsync::engine::REQUEST_ATTEMPTS {
        let r = cycle(&engine).await;
        assert_eq!(r.kind, CycleKind::Full, "attempt {attempt}");
        assert_eq!(r.result, CycleResult::Failed);
    }
    let r = cycle(&engine).await;
    assert_eq!(
        r.kind,
        CycleKind::Incremental,
        "the request was not dropped"
    );
    let settings = lab.settings("", &[]).unwrap();
    let status = billsync::status::status_json(&engine.store, &settings)
        .await
        .unwrap();
    let dropped = status["dropped_requests"].as_array().unwrap();
    assert_eq!(dropped.len(), 1, "{status}");
    assert_eq!(dropped[0]["kind"], "resync");
    assert_eq!(dropped[0]["attempts"], 3);
    assert_eq!(status["resync_requested"], false);

    // A request whose cycle completes is consumed by it, once.
    lab.bm.faults.clear();
    lab.ap.faults.clear();
    engine
        .store
        .request(RequestKind::Resync, None)
        .await
        .unwrap();
    assert_eq!(cycle(&engine).await.kind, CycleKind::Full);
    assert_eq!(cycle(&engine).await.kind, CycleKind::Incremental);
}

/// Synced, then the BILLmanager account `id` deleted and its user blocked
/// after the grace cycles; returns the login.
async fn deleted_and_blocked(lab: &Lab, engine: &Engine, id: u64) -> String {
    cycle(engine).await;
    lab.bm.data().accounts.retain(|a| a.id != id);
    for _ in 0..3 {
        cycle(engine).await;
    }
    let login = format!("user{id}@bm.example.com");
    assert_eq!(lab.vms.user(&login).unwrap().status, "blocked");
    login
}

/// Issue 10 (bounded state). Before: every account ever seen stayed in the
/// store and was rewritten every cycle; a user blocked after its account
/// went (or its login changed) was re-planned every cycle for ever.
#[tokio::test]
async fn accounts_gone_and_deprovisioned_are_forgotten_after_retention() {
    let (lab, engine) = setup(10, 0, "", &[]).await;
    let login = deleted_and_blocked(&lab, &engine, 4).await;
    let login = login.as_str();
    let stored = |engine: &Engine| {
        let store = engine.store.clone();
        async move {
            store
                .source_account(billsync::core::model::SourceKind::Billmanager, "4")
                .await
                .unwrap()
        }
    };
    assert!(stored(&engine).await.is_some(), "kept within retention");
    // Past retention (30 days by default).
    let db = common::StateDb::open(&lab).await;
    db.execute(
        "UPDATE source_accounts SET last_seen = '2000-01-01T00:00:00.000Z' WHERE id IN ('4', '5')",
    )
    .await;
    let before = lab.vms.requests();
    cycle(&engine).await;
    assert!(
        stored(&engine).await.is_none(),
        "a gone, blocked account is forgotten"
    );
    let live = engine
        .store
        .source_account(billsync::core::model::SourceKind::Billmanager, "5")
        .await
        .unwrap();
    assert!(live.is_some(), "a listed account is never forgotten");
    for _ in 0..2 {
        let r = cycle(&engine).await;
        assert_eq!(r.result, CycleResult::Ok);
        assert!(
            r.plan.is_empty(),
            "an operation for a settled login: {:?}",
            r.plan
        );
    }
    assert_eq!(lab.vms.requests(), before, "the VMS heard nothing");
    assert_eq!(lab.vms.user(login).unwrap().status, "blocked");
}

/// Before: when a source failed, its accounts came from the store as last
/// listed, so an account deleted (and its user blocked) long ago counted as
/// live again and its user was re-activated: doubt gave access.
#[tokio::test]
async fn a_failing_source_never_revives_a_deleted_account() {
    let (lab, engine) = setup(10, 0, "", &[]).await;
    let login = deleted_and_blocked(&lab, &engine, 4).await;
    let login = login.as_str();
    lab.bm.faults.always("account", Fault::Status(503));
    for _ in 0..2 {
        let r = cycle(&engine).await;
        assert!(!r.sources["billmanager"].complete);
    }
    let u = lab.vms.user(login).unwrap();
    assert_eq!(u.status, "blocked", "re-activated while the source failed");
    assert!(MANAGED.iter().all(|p| !u.permissions.contains(*p)));
}

fn targeted(accounts: &[&str]) -> CycleOptions {
    CycleOptions {
        targets: Some(billsync::engine::Targets {
            accounts: accounts
                .iter()
                .map(|a| billsync::core::model::AccountKey::parse(a).unwrap())
                .collect(),
            logins: Default::default(),
        }),
        ..Default::default()
    }
}

/// SPEC §10.3: a targeted cycle re-reads just the named accounts (no
/// listing) and pushes their users at once; it deprovisions nothing, even
/// for an account that disappeared meanwhile.
#[tokio::test]
async fn a_targeted_cycle_pushes_a_payment_without_listing_or_deprovisioning() {
    let (lab, engine) = setup(6, 4, "", &[]).await;
    {
        let mut bm = lab.bm.data();
        let a = bm.accounts.iter_mut().find(|a| a.id == 3).unwrap();
        a.balance = "-50.00".into();
        a.credit_limits = vec!["0".into()];
    }
    let ap_login = {
        let mut ap = lab.ap.data();
        let a = &mut ap.accounts[1];
        (a.balance, a.credit_limit) = (-50.0, 0.0);
        a.email.to_lowercase()
    };
    cycle(&engine).await;
    let bm_login = "user3@bm.example.com";
    for login in [bm_login, ap_login.as_str()] {
        let u = lab.vms.user(login).unwrap();
        assert!(
            MANAGED.iter().all(|p| !u.permissions.contains(*p)),
            "{login}: {u:?}"
        );
    }
    // The payments land; meanwhile another account is deleted.
    lab.bm
        .data()
        .accounts
        .iter_mut()
        .find(|a| a.id == 3)
        .unwrap()
        .balance = "100.00".into();
    let ap_id = {
        let mut ap = lab.ap.data();
        ap.accounts[1].balance = 100.0;
        ap.accounts[1].id
    };
    lab.bm.data().accounts.retain(|a| a.id != 5);
    let lists = (lab.bm.calls("account"), lab.ap.calls("list"));
    let ap_key = format!("activeplatform:{ap_id}");
    for _ in 0..3 {
        let r = cycle_with(&engine, targeted(&["billmanager:3", &ap_key])).await;
        assert_eq!(r.kind, CycleKind::Targeted);
        assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    }
    assert_eq!(
        (lab.bm.calls("account"), lab.ap.calls("list")),
        lists,
        "it listed"
    );
    for login in [bm_login, ap_login.as_str()] {
        let u = lab.vms.user(login).unwrap();
        assert!(
            MANAGED.iter().all(|p| u.permissions.contains(*p)),
            "{login}: {u:?}"
        );
    }
    let kept = lab.vms.user("user5@bm.example.com").unwrap();
    assert_eq!(kept.status, "active", "a targeted cycle deprovisioned");
    // The listing cycles that follow agree, and then deprovision as usual.
    for _ in 0..2 {
        cycle(&engine).await;
    }
    assert_eq!(
        lab.vms.user("user5@bm.example.com").unwrap().status,
        "blocked"
    );
    assert!(!lab.vms.user(bm_login).unwrap().permissions.is_empty());
}

/// Requests the VMS got about `login`.
fn sent_for(lab: &Lab, login: &str) -> usize {
    let data = lab.vms.data();
    data.events.iter().filter(|e| e.login == login).count()
}

/// A targeted cycle for the ActivePlatform account `ap_id` that must leave
/// `login` alone: another account owns it.
async fn leaves_alone(lab: &Lab, engine: &Engine, ap_id: u64, login: &str) -> CycleReport {
    let before = sent_for(lab, login);
    let ap_key = format!("activeplatform:{ap_id}");
    let r = cycle_with(engine, targeted(&[&ap_key])).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    assert_eq!(sent_for(lab, login), before, "the loser's state was pushed");
    r
}

/// An ActivePlatform customer who does not pay, then pays: their account's
/// id and login.
fn ap_unpaid(lab: &Lab, i: usize) -> (u64, String) {
    let mut ap = lab.ap.data();
    let a = &mut ap.accounts[i];
    (a.balance, a.credit_limit) = (-50.0, 0.0);
    a.status = "active".into();
    (a.id, a.email.to_lowercase())
}

fn ap_pays(lab: &Lab, i: usize) {
    lab.ap.data().accounts[i].balance = 100.0;
}

/// Issue 21: a targeted cycle reads only the accounts that share its
/// logins (the login index), yet a login two accounts yield still goes to
/// the source first in priority. Before the index it normalized every
/// account; a scope of the re-read accounts alone would hand a shared login
/// to whichever account paid.
#[tokio::test]
async fn a_targeted_cycle_leaves_a_shared_login_to_its_owner() {
    let (lab, engine) = setup(2, 2, "", &[]).await;
    let shared = "user1@bm.example.com";
    let (ap_id, _) = ap_unpaid(&lab, 0);
    lab.ap.data().accounts[0].email = shared.into();
    {
        let mut bm = lab.bm.data();
        let a = bm.accounts.iter_mut().find(|a| a.id == 1).unwrap();
        (a.balance, a.credit_limits) = ("-50.00".into(), vec!["0".into()]);
    }
    assert_eq!(cycle(&engine).await.conflicts, 1);
    let owner = |lab: &Lab| lab.vms.user(shared).unwrap().billing_info["billing_id"].clone();
    assert_eq!(owner(&lab), "billmanager-1");
    // The account that lost the login pays: nothing of it reaches the VMS.
    ap_pays(&lab, 0);
    let r = leaves_alone(&lab, &engine, ap_id, shared).await;
    assert_eq!(r.conflicts, 1, "{r:?}");
    assert_eq!(owner(&lab), "billmanager-1");
    // The owner pays: its user gets the archive at once.
    lab.bm
        .data()
        .accounts
        .iter_mut()
        .find(|a| a.id == 1)
        .unwrap()
        .balance = "50.00".into();
    let r = cycle_with(&engine, targeted(&["billmanager:1"])).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    let u = lab.vms.user(shared).unwrap();
    assert!(u.permissions.contains("archives-show"), "{u:?}");
    assert_eq!(owner(&lab), "billmanager-1");
}

/// A targeted cycle knows only the desired users it read (the login
/// index): a quarantine elsewhere is not its to lift. Were it judged
/// against a desired state that lacks the login, every payment tick would
/// release it, and the next listing would send the refused request again.
#[tokio::test]
async fn a_targeted_cycle_leaves_other_quarantines_alone() {
    let (lab, engine) = setup(3, 2, "", &[]).await;
    let refused = "user2@bm.example.com";
    lab.vms.data().force_422.insert(refused.into());
    let (ap_id, _) = ap_unpaid(&lab, 0);
    assert_eq!(cycle(&engine).await.quarantined, 1);
    ap_pays(&lab, 0);
    let ap_key = format!("activeplatform:{ap_id}");
    let r = cycle_with(&engine, targeted(&[&ap_key])).await;
    assert_eq!(r.applied, 1, "{r:?}");
    assert_eq!(r.quarantined, 1, "{r:?}");
    let q = engine.store.load_quarantine().await.unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    let sent = sent_for(&lab, refused);
    cycle(&engine).await;
    assert_eq!(
        sent_for(&lab, refused),
        sent,
        "the quarantined login was sent again"
    );
}

/// A listing killed between saving its rows and indexing them leaves rows
/// the index does not know: a targeted cycle reads those too. Here a
/// BILLmanager account came to yield an ActivePlatform customer's login
/// (stored as a re-read stores it, never indexed): the login is the
/// BILLmanager account's now, and the ActivePlatform payment changes
/// nothing on it.
#[tokio::test]
async fn a_targeted_cycle_reads_accounts_the_index_has_not_caught_up_with() {
    let (lab, engine) = setup(2, 2, "", &[]).await;
    let (ap_id, ap_login) = ap_unpaid(&lab, 1);
    cycle(&engine).await;
    let moved = billsync::core::model::RawAccount {
        id: "2".into(),
        email: Some(ap_login.clone()),
        ..Default::default()
    };
    let fresh = billsync::store::Fresh {
        raw: &moved,
        live: true,
        detailed: true,
    };
    let read = billsync::store::ReadStamp {
        seq: engine.store.next_read_seq().await.unwrap(),
        at: chrono::Utc::now(),
    };
    let pacing = engine.settings.pacing();
    let kind = billsync::core::model::SourceKind::Billmanager;
    engine
        .store
        .save_fresh(kind, fresh, read, &pacing)
        .await
        .unwrap();
    ap_pays(&lab, 1);
    let r = leaves_alone(&lab, &engine, ap_id, &ap_login).await;
    assert_eq!(r.conflicts, 1, "{r:?}");
}

/// The index follows the normalizer settings it was worked out with: after
/// a change of `login_template`, a targeted cycle reads every account until
/// a listing has indexed them again. Here the new template makes a
/// BILLmanager account yield an ActivePlatform customer's login; the old
/// index does not know it, and trusting it would push that customer's
/// payment onto a login that is no longer theirs.
#[tokio::test]
async fn a_targeted_cycle_does_not_trust_an_index_of_other_settings() {
    let (lab, engine) = setup(2, 2, "", &[]).await;
    let (ap_id, ap_login) = ap_unpaid(&lab, 0);
    cycle(&engine).await;
    engine.store.close().await;
    let settings = lab
        .settings(
            "",
            &[(
                "BILLSYNC__SOURCES__BILLMANAGER__LOGIN_TEMPLATE",
                "client{id}@ap.example.com",
            )],
        )
        .unwrap();
    let engine = Engine::new(settings).await.unwrap();
    ap_pays(&lab, 0);
    leaves_alone(&lab, &engine, ap_id, &ap_login).await;
    // A listing cycle indexes every account with the new settings; the
    // next targeted cycle trusts it and decides the same.
    cycle(&engine).await;
    lab.ap.data().accounts[0].balance = 200.0;
    leaves_alone(&lab, &engine, ap_id, &ap_login).await;
}

/// SPEC §10.2: the payment fast path reads only the payment windows and
/// pushes the accounts with new payments at once; with nothing new it does
/// nothing, and it never lists accounts.
#[tokio::test]
async fn the_payment_fast_path_pushes_paid_accounts_only() {
    let (lab, engine) = setup(4, 4, "", &[]).await;
    lab.bm.data().payments_have_account_id = false; // resolved by name
    {
        let mut bm = lab.bm.data();
        let a = bm.accounts.iter_mut().find(|a| a.id == 2).unwrap();
        (a.balance, a.credit_limits) = ("-50.00".into(), vec!["0".into()]);
    }
    let (ap_id, ap_login) = {
        let mut ap = lab.ap.data();
        let a = &mut ap.accounts[0];
        (a.balance, a.credit_limit) = (-50.0, 0.0);
        (a.id, a.email.to_lowercase())
    };
    cycle(&engine).await;
    let paying = |l: &str| {
        lab.vms
            .user(l)
            .unwrap()
            .permissions
            .contains("archives-show")
    };
    let bm_login = "user2@bm.example.com";
    assert!(!paying(bm_login) && !paying(&ap_login));
    let opts = CycleOptions::default();
    assert!(
        engine.run_payments(&opts).await.unwrap().is_none(),
        "nothing new"
    );

    // Both customers pay; the billing systems credit their balances.
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    lab.bm.add_payment(2, "100.00", "4", &today);
    lab.bm
        .data()
        .accounts
        .iter_mut()
        .find(|a| a.id == 2)
        .unwrap()
        .balance = "50.00".into();
    lab.ap.add_payment(ap_id, "100.00", "completed", &today);
    lab.ap.data().accounts[0].balance = 50.0;
    let lists = (lab.bm.calls("account"), lab.ap.calls("list"));
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let r = engine.run_payments(&opts).await.unwrap().expect("a cycle");
    assert_eq!(r.kind, CycleKind::Payments);
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    assert!(
        paying(bm_login),
        "the BILLmanager payment did not reach the VMS"
    );
    assert!(
        paying(&ap_login),
        "the ActivePlatform payment did not reach the VMS"
    );
    assert_eq!(
        (lab.bm.calls("account"), lab.ap.calls("list")),
        lists,
        "it listed"
    );
    assert!(
        engine.run_payments(&opts).await.unwrap().is_none(),
        "seen twice"
    );
    // billsync_payment_to_push_seconds: both payments timed, once.
    let db = common::StateDb::open(&lab).await;
    let since = before.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let sql = "SELECT source, account_id FROM payments
               WHERE paid_seen_at >= $1 AND pushed_at IS NOT NULL";
    let timed = db.pairs(sql, &since).await;
    assert!(
        timed.contains(&("billmanager".into(), "2".into())),
        "{timed:?}"
    );
    let ap = ("activeplatform".to_string(), ap_id.to_string());
    assert!(timed.contains(&ap), "{timed:?}");
    let text = billsync::telemetry::metrics::get().encode();
    assert!(text.contains("billsync_payment_to_push_seconds_count"));
}

/// SPEC §10.1. Before: only the nightly full resync (hours at 100k, with no
/// cycle meanwhile) repaired hand edits on the VMS and BILLmanager e-mail
/// edits. Now each incremental cycle re-verifies a small slice of what is
/// due; once a period has passed (a fake clock) everything is repaired, a
/// few requests per cycle, and then the cycles are quiet again.
#[tokio::test]
async fn rolling_reverification_repairs_drift_a_slice_at_a_time() {
    // A 1 h period, so that a cycle every 2 s takes one account per source
    // and one user.
    let env = [("BILLSYNC__DAEMON__REVERIFY_HOURS", "1")];
    let (lab, mut engine) = setup(3, 3, "", &env).await;
    let shift = fake_clock(&mut engine);
    cycle(&engine).await;
    let logins: Vec<String> = lab.vms.data().users.keys().cloned().collect();
    assert_eq!(logins.len(), 6);
    // Hand edits on the VMS, which billsync cannot read back.
    for u in lab.vms.data().users.values_mut() {
        u.permissions.clear();
    }
    // An e-mail edit in BILLmanager, which its list does not carry.
    lab.bm
        .data()
        .accounts
        .iter_mut()
        .find(|a| a.id == 1)
        .unwrap()
        .email = "renamed1@bm.example.com".into();
    let before = lab.vms.requests();
    let r = cycle(&engine).await;
    assert_eq!(lab.vms.requests(), before, "nothing is due yet: {r:?}");
    // One and a half periods later everything is due.
    shift.fetch_add(5400, Ordering::SeqCst);
    for _ in 0..8 {
        let before = lab.vms.requests();
        let r = cycle(&engine).await;
        assert_eq!(r.kind, CycleKind::Incremental);
        assert!(r.operations.update <= 2, "not a slice: {r:?}");
        assert!(lab.vms.requests() - before <= 5, "a storm, not a slice");
    }
    let users = lab.vms.data().users.clone();
    let u = |l: &str| users.get(l).unwrap_or_else(|| panic!("{l} missing"));
    for login in logins.iter().filter(|l| *l != "user1@bm.example.com") {
        assert!(
            MANAGED.iter().all(|p| u(login).permissions.contains(*p)),
            "{login} not repaired"
        );
    }
    assert!(MANAGED
        .iter()
        .all(|p| u("renamed1@bm.example.com").permissions.contains(*p)));
    assert_eq!(
        u("user1@bm.example.com").status,
        "blocked",
        "the old login stays active"
    );
    // Everything was verified just now: the next cycles send nothing.
    let before = lab.vms.requests();
    for _ in 0..3 {
        cycle(&engine).await;
    }
    assert_eq!(lab.vms.requests(), before, "re-verified more than once");
}

/// SPEC §10.1 (v3): a dry run plans what the next cycle sends, its
/// re-verification slice included. Before, the slice was chosen among ties
/// in the order of the state file, which the dry run's copy does not keep.
#[tokio::test]
async fn a_dry_run_shows_exactly_what_the_next_cycle_sends() {
    // A 1 h period and a cycle every 10 min: slices of two users and one
    // account per source.
    let env = [
        ("BILLSYNC__DAEMON__REVERIFY_HOURS", "1"),
        ("BILLSYNC__DAEMON__SCHEDULE", "0 */10 * * * *"),
    ];
    let (lab, mut engine) = setup(5, 5, "", &env).await;
    let shift = fake_clock(&mut engine);
    cycle(&engine).await;
    // Past the first half period users fall due one by one. Each real cycle
    // runs five minutes after its dry run, in the same schedule interval
    // (due times count from the interval's start: `Pacing::due_before`).
    shift.fetch_add(2400, Ordering::SeqCst);
    for round in 0..3 {
        lab.bm.data().accounts[round].balance = "-1000".into();
        let dry = CycleOptions {
            dry_run: true,
            ..Default::default()
        };
        let planned = cycle_with(&engine, dry).await;
        assert!(planned.plan.len() >= 2, "no slice: {planned:?}");
        shift.fetch_add(300, Ordering::SeqCst);
        let before = lab.vms.requests();
        let real = cycle(&engine).await;
        assert_eq!(real.operations, planned.operations, "round {round}");
        let sent: BTreeSet<String> = lab.vms.data().events[before..]
            .iter()
            .map(|e| e.login.clone())
            .collect();
        let shown: BTreeSet<String> = planned.plan.iter().map(|p| p.login.clone()).collect();
        assert_eq!(sent, shown, "round {round}");
        shift.fetch_add(300, Ordering::SeqCst);
    }
}

/// SPEC §10.3 (v3): an ActivePlatform re-read that answers the account with
/// a live status ends its "gone" mark. Before, an account that came back
/// stayed blocked until a listing cycle, whatever a trigger re-read said.
#[tokio::test]
async fn a_re_read_account_that_came_back_is_restored() {
    let (lab, engine) = setup(0, 3, "", &[]).await;
    cycle(&engine).await;
    let login = "client1@ap.example.com";
    assert_eq!(lab.vms.user(login).unwrap().status, "active");
    let account = {
        let mut ap = lab.ap.data();
        let i = ap.accounts.iter().position(|a| a.id == 2_000_001).unwrap();
        ap.accounts.remove(i)
    };
    // Gone from complete listings past the grace (2): blocked.
    for _ in 0..3 {
        cycle(&engine).await;
    }
    assert_eq!(lab.vms.user(login).unwrap().status, "blocked");
    lab.ap.data().accounts.push(account);
    let r = cycle_with(&engine, targeted(&["activeplatform:2000001"])).await;
    assert_eq!(r.kind, CycleKind::Targeted);
    assert_eq!(lab.vms.user(login).unwrap().status, "active", "{r:?}");
    // The next listing agrees: nothing to undo.
    let before = lab.vms.requests();
    cycle(&engine).await;
    assert_eq!(lab.vms.requests(), before);
}

/// Review of issue 17: a due user that cannot be pushed (a frozen source's)
/// must not hold the front of the re-verification queue for ever. Before,
/// once a period had passed the frozen users took every slot, and nobody
/// else was re-verified again.
#[tokio::test]
async fn re_verification_is_not_stuck_behind_users_it_cannot_push() {
    // A 1 h period and a cycle every 2 s: one user per cycle.
    let env = [("BILLSYNC__DAEMON__REVERIFY_HOURS", "1")];
    let (lab, engine) = setup(3, 3, "", &env).await;
    cycle(&engine).await;
    let off = [
        env[0],
        ("BILLSYNC__SOURCES__ACTIVEPLATFORM__ENABLED", "false"),
    ];
    let settings = lab.settings("", &off).unwrap();
    let mut engine = Engine::with_store(settings, engine.store.clone()).unwrap();
    let time = fake_clock(&mut engine);
    time.fetch_add(2 * 3600, Ordering::SeqCst);
    let before = lab.vms.requests();
    for _ in 0..4 {
        cycle(&engine).await;
    }
    let events = lab.vms.data().events[before..].to_vec();
    let pushed: BTreeSet<&str> = events.iter().map(|e| e.login.as_str()).collect();
    assert!(
        pushed.iter().all(|l| l.ends_with("@bm.example.com")),
        "a frozen user was pushed: {pushed:?}"
    );
    assert_eq!(
        pushed.len(),
        3,
        "not every BILLmanager user was re-verified: {pushed:?}"
    );
}

/// One writer per login (issue 17): the AP account whose login the push
/// order reaches last, and its login.
fn last_in_push_order(lab: &Lab) -> (u64, String) {
    let ap = lab.ap.data();
    let a = (ap.accounts.iter())
        .max_by_key(|a| a.email.to_lowercase())
        .unwrap();
    (a.id, a.email.to_lowercase())
}

fn set_paying(lab: &Lab, id: u64, paying: bool) {
    let mut ap = lab.ap.data();
    let a = ap.accounts.iter_mut().find(|a| a.id == id).unwrap();
    (a.balance, a.credit_limit) = if paying { (50.0, 0.0) } else { (-50.0, 0.0) };
}

fn is_paying(lab: &Lab, login: &str) -> bool {
    let u = lab.vms.user(login).unwrap();
    MANAGED.iter().all(|p| u.permissions.contains(*p))
}

/// Waits until the VMS has answered `n` more requests than `from`.
async fn vms_answered(lab: &Lab, from: u64, n: u64) {
    let t = Instant::now();
    while lab.vms.served() < from + n {
        assert!(t.elapsed() < Duration::from_secs(20), "the VMS saw no push");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Which read is newer is the read sequence's call, not the clock's. A
/// listing cycle pushes slowly (one request at a time, 300 ms each, the
/// customer last); meanwhile the clock steps back an hour, the customer
/// pays and a trigger re-reads the account. The re-read wins in the store
/// and at the VMS, and the listing does not push what it read before.
/// Ordered by the wall clock, the re-read was the older one: the store
/// dropped it, and the listing blocked the customer again.
#[tokio::test]
async fn a_clock_stepped_back_does_not_make_an_older_read_win() {
    // One request at a time, so the listing reaches the customer last.
    let env = [("BILLSYNC__VMS__CONCURRENCY", "1")];
    let (lab, mut engine) = setup(0, 6, "", &env).await;
    let time = fake_clock(&mut engine);
    cycle(&engine).await;
    let (id, login) = last_in_push_order(&lab);
    assert!(is_paying(&lab, &login));
    // Every customer stops paying: the listing has pushes to make before
    // it reaches this one.
    let ids: Vec<u64> = lab.ap.data().accounts.iter().map(|a| a.id).collect();
    for other in ids {
        set_paying(&lab, other, false);
    }
    lab.vms.faults.set_latency(Duration::from_millis(300));
    let served = lab.vms.served();
    let key = format!("activeplatform:{id}");
    let trigger = async {
        vms_answered(&lab, served, 1).await;
        time.fetch_sub(3600, Ordering::SeqCst);
        set_paying(&lab, id, true);
        cycle_with(&engine, targeted(&[&key])).await
    };
    let (listing, triggered) = tokio::join!(cycle(&engine), trigger);
    assert_eq!(listing.result, CycleResult::Ok, "{listing:?}");
    assert_eq!(triggered.result, CycleResult::Ok, "{triggered:?}");
    assert!(
        is_paying(&lab, &login),
        "the listing pushed what it read before the re-read"
    );
    let audit = engine.store.audit_of(&login, 5).await.unwrap();
    let results: Vec<&str> = audit.iter().map(|a| a.result.as_str()).collect();
    assert!(results.contains(&"superseded"), "{audit:?}");
    // The store kept the re-read, not the listing's older row.
    let id = id.to_string();
    let stored = engine.store.source_account(Kind::Activeplatform, &id);
    let stored = stored.await.unwrap().unwrap();
    assert_eq!(stored.list.balance.as_deref(), Some("50.0"), "{stored:?}");
}

/// Both lanes ask for the same login at once, in either order: the VMS
/// gets one push for it, not one per lane. The second lane starts once the
/// first has a request in flight (one at a time, 300 ms each; the
/// customer is the listing's last push):
/// - trigger first: the listing, planned against the applied state before
///   the trigger's push, finds that push did its work (merged);
/// - listing first: the trigger's newer read pushes the customer, and the
///   listing's own push of it is superseded.
#[tokio::test]
async fn the_same_login_asked_by_both_lanes_is_pushed_once() {
    let env = [("BILLSYNC__VMS__CONCURRENCY", "1")];
    for trigger_first in [true, false] {
        let (lab, engine) = setup(0, 4, "", &env).await;
        let (id, login) = last_in_push_order(&lab);
        set_paying(&lab, id, false);
        cycle(&engine).await;
        assert!(!is_paying(&lab, &login));
        // The customer pays; the others stop, so the listing has pushes to
        // make before it reaches the customer.
        let ids: Vec<u64> = lab.ap.data().accounts.iter().map(|a| a.id).collect();
        for other in ids {
            set_paying(&lab, other, other == id);
        }
        lab.vms.faults.set_latency(Duration::from_millis(300));
        let patches = lab.vms.count_for("PATCH", &login);
        let served = lab.vms.served();
        let key = format!("activeplatform:{id}");
        let fast = || cycle_with(&engine, targeted(&[&key]));
        let second = || async {
            vms_answered(&lab, served, 1).await;
        };
        let (a, b) = match trigger_first {
            true => tokio::join!(fast(), async {
                second().await;
                cycle(&engine).await
            }),
            false => tokio::join!(cycle(&engine), async {
                second().await;
                fast().await
            }),
        };
        let case = if trigger_first {
            "trigger first"
        } else {
            "listing first"
        };
        assert_eq!(a.result, CycleResult::Ok, "{case}: {a:?}");
        assert_eq!(b.result, CycleResult::Ok, "{case}: {b:?}");
        assert!(is_paying(&lab, &login), "{case}");
        let audit = engine.store.audit_of(&login, 4).await.unwrap();
        let pushes = lab.vms.count_for("PATCH", &login) - patches;
        assert_eq!(pushes, 1, "{case}: {audit:?}");
        let why = match trigger_first {
            true => "done meanwhile by the other lane",
            false => "pushed meanwhile from a newer read",
        };
        assert!(audit.iter().any(|a| a.detail == why), "{case}: {audit:?}");
    }
}
