//! SPEC §9 over loopback: each test is a failure that used to happen (issue
//! #9's list), now prevented. The engine runs against the three emulators
//! with a real SQLite file.

mod common;
use common::LabSettings;

use std::time::Duration;

use billsync::core::cycle::CycleResult;
use billsync::core::model::SourceKind;
use billsync::engine::{CycleOptions, CycleReport, Engine};
use billsync_emulators::lab::Lab;
use billsync_emulators::Fault;

const MANAGED: [&str; 3] = [
    "archives-download",
    "archives-preview-download",
    "archives-show",
];

/// A lab whose accounts all pay and are active, so that every change below
/// is the test's own.
async fn setup(bm: usize, ap: usize, env: &[(&str, &str)]) -> (Lab, Engine) {
    let lab = Lab::start(bm, ap).await.unwrap();
    for a in lab.bm.data().accounts.iter_mut() {
        a.status = "1".into();
        a.balance = "100.00".into();
    }
    for a in lab.ap.data().accounts.iter_mut() {
        a.status = "active".into();
        a.balance = 100.0;
    }
    let engine = Engine::new(lab.settings("", env).unwrap()).await.unwrap();
    (lab, engine)
}

async fn cycle(engine: &Engine) -> CycleReport {
    engine.run_cycle(&CycleOptions::default()).await.unwrap()
}

/// The login the BILLmanager emulator's account `id` yields.
fn bm_login(id: u64) -> String {
    match id % 17 {
        0 => format!("user{id}@example.com"),
        _ => format!("user{id}@bm.example.com"),
    }
}

fn paying(lab: &Lab, login: &str) -> bool {
    let u = lab.vms.user(login).unwrap();
    u.status == "active" && MANAGED.iter().all(|p| u.permissions.contains(*p))
}

fn blocked(lab: &Lab, login: &str) -> bool {
    let u = lab.vms.user(login).unwrap();
    u.status == "blocked" && MANAGED.iter().all(|p| !u.permissions.contains(*p))
}

async fn status(engine: &Engine) -> serde_json::Value {
    billsync::status::status_json(&engine.store, &engine.settings)
        .await
        .unwrap()
}

/// 1. A create the VMS applied but whose answer was lost, then the
/// account's deletion: the user must end blocked, not active for ever.
#[tokio::test]
async fn a_lost_create_of_an_account_deleted_since_ends_blocked() {
    let env = [
        ("BILLSYNC__VMS__TIMEOUT_SECS", "1"),
        ("BILLSYNC__VMS__MAX_ATTEMPTS", "1"),
    ];
    let (lab, engine) = setup(3, 0, &env).await;
    let login = bm_login(2);
    lab.vms.faults.once(
        &format!("POST user/manage {login}"),
        Fault::LoseAnswer(Duration::from_secs(3)),
    );
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Partial, "{r:?}");
    let created = lab.vms.user(&login).expect("the VMS applied the create");
    assert_eq!(created.status, "active");
    let s = status(&engine).await;
    assert_eq!(s["in_doubt"][0]["login"], login.as_str(), "{s}");
    assert_eq!(s["in_doubt"][0]["op"], "create", "{s}");
    lab.bm.data().accounts[1].status = "3".into(); // deleted
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    assert!(blocked(&lab, &login), "{:?}", lab.vms.user(&login));
    assert!(status(&engine).await["in_doubt"]
        .as_array()
        .unwrap()
        .is_empty());
}

/// 2. A 200 that is not the user object confirms nothing: a customer who
/// stopped paying loses the archive once the VMS really answers.
#[tokio::test]
async fn a_200_that_is_not_the_user_confirms_nothing() {
    let env = [("BILLSYNC__VMS__MAX_ATTEMPTS", "1")];
    let (lab, engine) = setup(4, 0, &env).await;
    assert_eq!(cycle(&engine).await.result, CycleResult::Ok);
    for body in [
        "{}",
        r#"{"message":"Server Error"}"#,
        r#"{"data":{"login":"someone@else"}}"#,
        "",
    ] {
        let login = bm_login(3);
        lab.bm.data().accounts[2].balance = "-500.00".into();
        lab.vms.faults.clear();
        lab.vms.faults.always(
            &format!("PATCH user/manage {login}"),
            Fault::Reply(200, body.into()),
        );
        // The one request went out and was not confirmed: every request
        // was refused, so the cycle failed (SPEC §9.3).
        let r = cycle(&engine).await;
        assert_eq!(
            (r.result, r.pending),
            (CycleResult::Failed, 1),
            "{body}: {r:?}"
        );
        let applied = engine.store.load_applied().await.unwrap();
        let kept = &applied.users[&login].state.permissions;
        assert_eq!(kept.len(), 3, "{body}: recorded as stripped: {kept:?}");
        lab.vms.faults.clear();
        assert_eq!(cycle(&engine).await.result, CycleResult::Ok);
        let u = lab.vms.user(&login).unwrap();
        assert!(
            MANAGED.iter().all(|p| !u.permissions.contains(*p)),
            "{body}"
        );
        lab.bm.data().accounts[2].balance = "100.00".into();
        assert_eq!(cycle(&engine).await.result, CycleResult::Ok);
    }
}

/// 3. A refusal of the whole VMS quarantines nobody, fails the cycle, and
/// heals by itself on the first cycle after.
#[tokio::test]
async fn a_refusing_vms_quarantines_nobody_and_heals_by_itself() {
    let env = [
        ("BILLSYNC__VMS__MAX_ATTEMPTS", "2"),
        ("BILLSYNC__VMS__CIRCUIT_BREAKER_FAILURES", "3"),
        ("BILLSYNC__VMS__REQUEUE_BASE_SECS", "3600"),
    ];
    let (lab, engine) = setup(6, 0, &env).await;
    let refusals = [
        Fault::Status(403),
        Fault::Status(401),
        Fault::Redirect,
        Fault::Status(404),
        Fault::Status(405),
        Fault::Html,
    ];
    for fault in refusals {
        lab.vms.faults.always("", fault.clone());
        let r = cycle(&engine).await;
        assert_eq!(r.result, CycleResult::Failed, "{fault:?}: {r:?}");
        assert_eq!(r.quarantined, 0, "{fault:?}: {r:?}");
        assert!(engine.store.load_quarantine().await.unwrap().is_empty());
    }
    lab.vms.faults.clear();
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    assert_eq!(lab.vms.data().users.len(), 6);
    assert!(engine.store.load_retries().await.unwrap().is_empty());
}

/// 4. The same customer in both systems: while the owning BILLmanager
/// record is invalid, its deleted ActivePlatform twin takes nothing.
#[tokio::test]
async fn an_invalid_owner_keeps_its_login_from_a_deleted_twin() {
    let (lab, engine) = setup(2, 2, &[]).await;
    let login = bm_login(1);
    {
        let mut ap = lab.ap.data();
        ap.accounts[0].email = login.clone();
        ap.accounts[0].status = "deleted".into();
    }
    assert_eq!(cycle(&engine).await.result, CycleResult::Ok);
    assert!(paying(&lab, &login));
    lab.bm.data().accounts[0].status = "99".into(); // not in status_map
    let before = lab.vms.requests();
    for _ in 0..3 {
        let r = cycle(&engine).await;
        assert_eq!(r.invalid, 1, "{r:?}");
    }
    assert_eq!(lab.vms.requests(), before, "nothing sent for the login");
    assert!(paying(&lab, &login));
}

/// 5. Disabling a source freezes its users; retiring them is explicit and
/// goes through the threshold and approval.
#[tokio::test]
async fn a_disabled_source_freezes_its_users_until_retired() {
    let safety = [
        ("BILLSYNC__SAFETY__MAX_DEPROVISION", "2"),
        ("BILLSYNC__SAFETY__MAX_DEPROVISION_RATIO", "0.0"),
    ];
    let (lab, engine) = setup(3, 4, &safety).await;
    assert_eq!(cycle(&engine).await.result, CycleResult::Ok);
    let off = [
        safety[0],
        safety[1],
        ("BILLSYNC__SOURCES__ACTIVEPLATFORM__ENABLED", "false"),
    ];
    let settings = lab.settings("", &off).unwrap();
    let engine = Engine::with_store(settings, engine.store.clone()).unwrap();
    let before = lab.vms.requests();
    for _ in 0..4 {
        let r = cycle(&engine).await;
        assert_eq!(r.operations, Default::default(), "{r:?}");
        assert_eq!(r.held, 0, "{r:?}");
    }
    assert_eq!(lab.vms.requests(), before, "nothing deprovisioned");
    let s = status(&engine).await;
    assert_eq!(s["frozen"][0]["source"], "activeplatform", "{s}");
    assert_eq!(s["frozen"][0]["users"], 4, "{s}");
    let mut retire = CycleOptions {
        retire: vec![SourceKind::Activeplatform],
        ..Default::default()
    };
    let r = engine.run_cycle(&retire).await.unwrap();
    assert_eq!((r.result, r.held), (CycleResult::Held, 4), "{r:?}");
    retire.allow_deprovision = true;
    let r = engine.run_cycle(&retire).await.unwrap();
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    for i in 1..=4 {
        assert!(blocked(&lab, &format!("client{i}@ap.example.com")));
    }
    assert!(paying(&lab, &bm_login(1)));
}

/// 6. An ActivePlatform that ignores `page` repeats page 1: the listing is
/// incomplete and nobody beyond page 1 is deprovisioned.
#[tokio::test]
async fn a_listing_that_repeats_itself_is_incomplete() {
    let env = [("BILLSYNC__DAEMON__MISSING_GRACE_CYCLES", "1")];
    let (lab, engine) = setup(0, 250, &env).await;
    assert_eq!(cycle(&engine).await.result, CycleResult::Ok);
    lab.ap.data().ignore_page = true;
    let before = lab.vms.requests();
    for _ in 0..3 {
        let r = cycle(&engine).await;
        assert_eq!(r.result, CycleResult::Partial, "{r:?}");
        assert!(!r.sources["activeplatform"].complete, "{r:?}");
    }
    assert_eq!(lab.vms.requests(), before);
    assert!(lab.vms.data().users.values().all(|u| u.status == "active"));
}

/// 7. An approval covers the held set it was given, not deprovisions that
/// appeared since.
#[tokio::test]
async fn an_approval_is_not_a_blank_cheque() {
    let env = [
        ("BILLSYNC__SAFETY__MAX_DEPROVISION", "3"),
        ("BILLSYNC__SAFETY__MAX_DEPROVISION_RATIO", "0.0"),
    ];
    let (lab, engine) = setup(40, 0, &env).await;
    assert_eq!(cycle(&engine).await.result, CycleResult::Ok);
    let broke = |range: std::ops::Range<usize>| {
        for a in &mut lab.bm.data().accounts[range] {
            a.balance = "-1000.00".into();
        }
    };
    broke(0..10);
    let r = cycle(&engine).await;
    assert_eq!((r.result, r.held), (CycleResult::Held, 10), "{r:?}");
    let (_, covered) = engine.store.approve_held().await.unwrap();
    assert_eq!(covered, 10);
    broke(10..30);
    let r = cycle(&engine).await;
    assert_eq!((r.result, r.held), (CycleResult::Held, 20), "{r:?}");
    for id in 1..=10 {
        assert!(!paying(&lab, &bm_login(id)), "approved {id} went out");
    }
    for id in 11..=30 {
        assert!(
            paying(&lab, &bm_login(id)),
            "{id} appeared after the approval"
        );
    }
}

/// 8. The threshold is a share of the live users: blocked history does not
/// loosen it.
#[tokio::test]
async fn blocked_history_does_not_loosen_the_threshold() {
    let env = [
        ("BILLSYNC__SAFETY__MAX_DEPROVISION", "1"),
        ("BILLSYNC__SAFETY__MAX_DEPROVISION_RATIO", "0.05"),
    ];
    let (lab, engine) = setup(100, 0, &env).await;
    for a in &mut lab.bm.data().accounts[10..] {
        a.status = "2".into(); // suspended: created blocked
    }
    assert_eq!(cycle(&engine).await.result, CycleResult::Ok);
    // 10 live of 100 known: the limit is max(1, ceil(0.05 × 10)) = 1, not 5.
    for a in &mut lab.bm.data().accounts[..3] {
        a.balance = "-1000.00".into();
    }
    let r = cycle(&engine).await;
    assert_eq!((r.result, r.held), (CycleResult::Held, 3), "{r:?}");
    assert!(paying(&lab, &bm_login(1)));
}

/// 9. An account whose custom attribute already holds its login gets no
/// write-back, even on its first sync.
#[tokio::test]
async fn a_write_back_already_in_place_is_not_sent() {
    let env = [(
        "BILLSYNC__SOURCES__ACTIVEPLATFORM__WRITEBACK_ATTRIBUTE",
        "vms_login",
    )];
    let (lab, engine) = setup(0, 4, &env).await;
    {
        let mut ap = lab.ap.data();
        for a in ap.accounts.iter_mut().take(3) {
            let login = a.email.clone();
            a.custom_attributes.insert("vms_login".into(), login);
        }
    }
    assert_eq!(cycle(&engine).await.result, CycleResult::Ok);
    let puts = lab.ap.puts.lock().unwrap().clone();
    assert_eq!(puts.len(), 1, "{puts:?}");
    assert_eq!(puts[0].0, 2_000_004);
}

/// 10. A user removed by hand whose re-create's answer is lost: the retry
/// meets "login taken" and adopts the user instead of quarantining it.
#[tokio::test]
async fn a_lost_re_create_is_adopted_not_quarantined() {
    let env = [("BILLSYNC__VMS__TIMEOUT_SECS", "1")];
    let (lab, engine) = setup(3, 0, &env).await;
    assert_eq!(cycle(&engine).await.result, CycleResult::Ok);
    let login = bm_login(3);
    lab.vms.data().users.remove(&login);
    lab.bm.data().accounts[2].balance = "-55.00".into(); // a change: a PATCH goes out
    lab.vms.faults.once(
        &format!("POST user/manage {login}"),
        Fault::LoseAnswer(Duration::from_secs(3)),
    );
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    assert_eq!(r.quarantined, 0, "{r:?}");
    let u = lab.vms.user(&login).unwrap();
    assert_eq!(u.status, "active");
    assert!(MANAGED.iter().all(|p| !u.permissions.contains(*p)), "{u:?}");
    let applied = engine.store.load_applied().await.unwrap();
    assert!(applied.users[&login].state.permissions.is_empty());
    assert!(applied.in_doubt.is_empty());
    assert_eq!(
        lab.vms.count_for("POST", &login),
        3,
        "create, re-create, re-create"
    );
}

/// SPEC §9.4: a frozen source keeps its logins. Before, its accounts were
/// not built at all, so an enabled source's account with the same login
/// took the user over (its billing id, status and permissions) while the
/// frozen source's owner could say nothing.
#[tokio::test]
async fn a_frozen_source_keeps_its_logins() {
    let (lab, engine) = setup(2, 2, &[]).await;
    assert_eq!(cycle(&engine).await.result, CycleResult::Ok);
    let taken = "client1@ap.example.com";
    let before = lab.vms.user(taken).unwrap();
    let off = [("BILLSYNC__SOURCES__ACTIVEPLATFORM__ENABLED", "false")];
    let engine = Engine::with_store(lab.settings("", &off).unwrap(), engine.store.clone()).unwrap();
    // A BILLmanager customer now has the frozen user's e-mail (the balance
    // changes too, so the list row changes and the details are re-read).
    {
        let mut bm = lab.bm.data();
        let a = bm.accounts.iter_mut().find(|a| a.id == 1).unwrap();
        a.email = taken.into();
        a.balance = "55.00".into();
    }
    let r = cycle(&engine).await;
    assert!(r.conflicts >= 1, "{r:?}");
    let after = lab.vms.user(taken).unwrap();
    assert_eq!(after.billing_info, before.billing_info, "taken over: {r:?}");
    assert_eq!(after.status, before.status);
    let sent = lab
        .vms
        .data()
        .events
        .iter()
        .filter(|e| e.login == taken)
        .count();
    assert_eq!(
        sent, 2,
        "the frozen user was pushed (create and attach only)"
    );
}
