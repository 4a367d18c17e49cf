//! SPEC §12.1-12.2 end to end: what a customer bought decides what its VMS
//! user gets. The engine against the emulators over loopback HTTP, with
//! BILLmanager service lists of one product type and rules on plans.

mod common;
use common::LabSettings;

use std::collections::BTreeSet;

use billsync::core::cycle::CycleResult;
use billsync::engine::{CycleOptions, CycleReport, Engine};
use billsync_emulators::billmanager::BmService;
use billsync_emulators::lab::Lab;
use billsync_emulators::Fault;

/// Two rules on plans for BILLmanager accounts (the lab configures both
/// sources; a plan rule must cover only sources that read services), no
/// other condition; services of type `videocam`.
const PLANS: &str = r#"
[sources.billmanager.services]
item_types = ["videocam"]

[permissions]
managed = ["archives-show", "archives-download", "archives-preview-download"]

[[permissions.rules]]
name = "video 7"
sources = ["billmanager"]
plans = ["Video 7"]
grant = ["archives-show"]

[[permissions.rules]]
name = "video 30"
sources = ["billmanager"]
plans = ["video 30"]
grant = ["archives-show", "archives-download", "archives-preview-download"]
"#;

const ALL: [&str; 3] = [
    "archives-download",
    "archives-preview-download",
    "archives-show",
];

/// `n` active, paying BILLmanager accounts and an engine reading services.
async fn setup(n: usize) -> (Lab, Engine) {
    let lab = Lab::start(n, 0).await.unwrap();
    for a in lab.bm.data().accounts.iter_mut() {
        (a.status, a.balance) = ("1".into(), "100.00".into());
    }
    let settings = lab.settings(PLANS, &[]).unwrap();
    (lab, Engine::new(settings).await.unwrap())
}

async fn cycle(engine: &Engine) -> CycleReport {
    engine.run_cycle(&CycleOptions::default()).await.unwrap()
}

fn service(lab: &Lab, account: u64, plan: &str, status: &str) {
    lab.bm.add_service(BmService {
        id: 700 + account,
        item_type: "videocam".into(),
        account_id: account,
        pricelist: plan.into(),
        item_status: status.into(),
        ..Default::default()
    });
}

/// Changes account `account`'s service.
fn set(lab: &Lab, account: u64, plan: &str, status: &str) {
    let mut bm = lab.bm.data();
    let s = bm
        .services
        .iter_mut()
        .find(|s| s.account_id == account)
        .unwrap();
    (s.pricelist, s.item_status) = (plan.into(), status.into());
}

fn perms(lab: &Lab, account: u64) -> BTreeSet<String> {
    let login = format!("user{account}@bm.example.com");
    let user = lab.vms.user(&login).unwrap();
    user.permissions
        .into_iter()
        .filter(|p| ALL.contains(&p.as_str()))
        .collect()
}

fn these(perms: &[&str]) -> BTreeSet<String> {
    perms.iter().map(|p| p.to_string()).collect()
}

/// Plan upgrade, downgrade, a suspended and a closed service, a pending
/// one that keeps what it had (and one that never had anything); then a
/// no-op cycle sends nothing.
#[tokio::test]
async fn the_plan_decides_what_each_user_gets() {
    let (lab, engine) = setup(5).await;
    service(&lab, 1, "Video 7", "2");
    service(&lab, 2, "Video 30", "2");
    service(&lab, 3, "Video 30", "3"); // suspended
    service(&lab, 4, "Video 30", "1"); // ordered: pending, never active
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    assert_eq!(perms(&lab, 1), these(&["archives-show"]));
    assert_eq!(perms(&lab, 2), these(&ALL));
    for nothing in [3, 4, 5] {
        assert_eq!(perms(&lab, nothing), these(&[]), "account {nothing}");
    }
    set(&lab, 1, "Video 30", "2"); // upgrade
    set(&lab, 2, "Video 7", "2"); // downgrade
    cycle(&engine).await;
    assert_eq!(perms(&lab, 1), these(&ALL), "the upgrade");
    assert_eq!(perms(&lab, 2), these(&["archives-show"]), "the downgrade");
    set(&lab, 2, "Video 30", "5"); // processing: keeps what it had
    set(&lab, 3, "Video 30", "2"); // resumed
    cycle(&engine).await;
    assert_eq!(perms(&lab, 2), these(&["archives-show"]), "pending kept");
    assert_eq!(perms(&lab, 3), these(&ALL), "resumed");
    set(&lab, 1, "Video 30", "4"); // closed
    cycle(&engine).await;
    assert_eq!(perms(&lab, 1), these(&[]), "closed");
    let requests = lab.vms.requests();
    let r = cycle(&engine).await;
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    assert_eq!(lab.vms.requests(), requests, "a no-op cycle sent requests");
    // explain shows the service (raw and settled) and why a rule fails.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_billsync"))
        .arg("--config")
        .arg(lab.config_path())
        .args(["explain", "user2@bm.example.com"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    for line in [
        "service    702: plan Video 7 (null), active (raw \"5\")",
        "rule       video 30: no: plans video 30: the account's active services are on Video 7",
        "rule       video 7: matches",
    ] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(shown.contains(line), "{line:?} not in\n{shown}\n{err}");
    }
}

/// A service listing that fails or comes back empty while services are
/// known takes nothing away; a row with an unknown status is reported and
/// its account keeps what it had.
#[tokio::test]
async fn a_doubtful_service_listing_takes_nothing_away() {
    let (lab, engine) = setup(3).await;
    for account in 1..=3 {
        service(&lab, account, "Video 30", "2");
    }
    cycle(&engine).await;
    assert_eq!(perms(&lab, 1), these(&ALL));
    // Every service closes, but the listing fails.
    for account in 1..=3 {
        set(&lab, account, "Video 30", "4");
    }
    lab.bm.faults.always("videocam", Fault::Status(500));
    let r = cycle(&engine).await;
    assert!(!r.sources["billmanager"].complete, "{r:?}");
    lab.bm.faults.clear();
    // Then the listing answers with no rows at all.
    lab.bm.data().services.clear();
    let r = cycle(&engine).await;
    let error = r.sources["billmanager"].error.clone().unwrap_or_default();
    assert!(error.contains("zero services"), "{r:?}");
    for account in 1..=3 {
        assert_eq!(perms(&lab, account), these(&ALL), "account {account}");
    }
    // An unknown status: that row is skipped and reported.
    service(&lab, 1, "Video 30", "9");
    service(&lab, 2, "Video 30", "2");
    service(&lab, 3, "Video 30", "4");
    // Past the grace (2 listings): the skipped row is still not missing.
    for _ in 0..3 {
        cycle(&engine).await;
    }
    assert_eq!(perms(&lab, 1), these(&ALL), "an unknown status took access");
    assert_eq!(perms(&lab, 3), these(&[]), "a real close is applied");
    let invalid = engine.store.invalid_records().await.unwrap();
    assert!(
        invalid
            .iter()
            .any(|i| i.id == "701" && i.reason == "unknown_status"),
        "{invalid:?}"
    );
}

/// A service that vanishes from complete listings is closed only after the
/// grace (2 listings); one that comes back within it keeps its access, and
/// the no-op cycles in between send nothing.
#[tokio::test]
async fn a_vanished_service_closes_after_the_grace_and_not_before() {
    let (lab, engine) = setup(3).await;
    for account in 1..=3 {
        service(&lab, account, "Video 30", "2");
    }
    cycle(&engine).await;
    let gone = |lab: &Lab, id: u64| lab.bm.data().services.retain(|s| s.id != id);
    gone(&lab, 701);
    gone(&lab, 702);
    let requests = lab.vms.requests();
    cycle(&engine).await;
    assert_eq!(lab.vms.requests(), requests, "one absence took something");
    assert_eq!(perms(&lab, 1), these(&ALL));
    service(&lab, 2, "Video 30", "2"); // back within the grace
    cycle(&engine).await;
    assert_eq!(perms(&lab, 1), these(&[]), "absent from 2 listings");
    assert_eq!(perms(&lab, 2), these(&ALL), "back in time, kept");
    assert_eq!(perms(&lab, 3), these(&ALL));
    let requests = lab.vms.requests();
    for _ in 0..2 {
        cycle(&engine).await;
    }
    assert_eq!(lab.vms.requests(), requests, "a no-op cycle sent requests");
    let counts = engine.store.service_counts().await.unwrap();
    assert_eq!(counts["billmanager"]["closed"], 1, "{counts:?}");
    assert_eq!(counts["billmanager"]["active"], 2, "{counts:?}");
}

/// A BILLmanager service row without `account_id` is owned by the one
/// account with its name; a name two accounts share owns nothing.
#[tokio::test]
async fn a_service_whose_owner_name_is_shared_is_attached_to_no_one() {
    let (lab, engine) = setup(3).await;
    {
        let mut bm = lab.bm.data();
        bm.services_have_account_id = false;
        bm.accounts[0].name = "Ivanov".into();
        bm.accounts[1].name = "Ivanov".into();
    }
    service(&lab, 1, "Video 30", "2");
    service(&lab, 3, "Video 30", "2");
    cycle(&engine).await;
    assert_eq!(perms(&lab, 1), these(&[]));
    assert_eq!(perms(&lab, 2), these(&[]));
    assert_eq!(
        perms(&lab, 3),
        these(&ALL),
        "a unique name owns its service"
    );
    let invalid = engine.store.invalid_records().await.unwrap();
    assert!(
        invalid
            .iter()
            .any(|i| i.id == "701" && i.detail.contains("several accounts")),
        "{invalid:?}"
    );
}

/// ActivePlatform subscriptions: plan names from `plans/{id}.json`,
/// `Stopping failed` read as pending; a trigger naming a subscription
/// re-reads its owner's subscriptions (no listing) and pushes the upgrade.
#[tokio::test]
async fn a_subscription_trigger_pushes_its_owner_without_listing() {
    use billsync::engine::Targets;
    use billsync::store::TriggerBody;
    use billsync_emulators::activeplatform::ApSubscription;
    let lab = Lab::start(0, 3).await.unwrap();
    let ids: Vec<u64> = {
        let mut ap = lab.ap.data();
        for a in ap.accounts.iter_mut() {
            a.status = "active".into();
        }
        ap.plans.insert(7, "Video 7".into());
        ap.plans.insert(30, "Video 30".into());
        let ids: Vec<u64> = ap.accounts.iter().map(|a| a.id).collect();
        for (i, (plan, status)) in [(7, "active"), (30, "active")].into_iter().enumerate() {
            ap.subscriptions.push(ApSubscription {
                id: 9000 + i as u64,
                plan_id: plan,
                account_id: ids[i],
                name: "Home video".into(),
                status: status.into(),
                ..Default::default()
            });
        }
        ids
    };
    let rules = PLANS
        .replace(
            "[sources.billmanager.services]\nitem_types = [\"videocam\"]",
            "[sources.activeplatform.services]\nenabled = true",
        )
        .replace("\"billmanager\"]", "\"activeplatform\"]");
    let engine = Engine::new(lab.settings(&rules, &[]).unwrap())
        .await
        .unwrap();
    cycle(&engine).await;
    let login = |i: usize| {
        let ap = lab.ap.data();
        let a = ap.accounts.iter().find(|a| a.id == ids[i]).unwrap();
        a.email.to_lowercase()
    };
    let perms_of = |i: usize| {
        let user = lab.vms.user(&login(i)).unwrap();
        let managed = user
            .permissions
            .into_iter()
            .filter(|p| ALL.contains(&p.as_str()));
        managed.collect::<BTreeSet<String>>()
    };
    assert_eq!(perms_of(0), these(&["archives-show"]));
    assert_eq!(perms_of(1), these(&ALL));
    // In motion: `Stopping failed` is pending and keeps what it had.
    lab.ap.data().subscriptions[1].status = "Stopping failed".into();
    cycle(&engine).await;
    assert_eq!(perms_of(1), these(&ALL), "pending took access away");
    // A plan the catalogue cannot name: that row is unreadable, reported,
    // and keeps what it had (a rule by plan name would no longer match).
    lab.ap.data().subscriptions[1].plan_id = 31;
    lab.ap.data().subscriptions[1].status = "active".into();
    for _ in 0..3 {
        cycle(&engine).await;
    }
    assert_eq!(perms_of(1), these(&ALL), "an unnamed plan took access away");
    // The customer upgrades; the billing event names the subscription.
    lab.ap.data().subscriptions[0].plan_id = 30;
    let lists = (lab.ap.calls("list"), lab.ap.calls("subscriptions"));
    let per_account = lab.ap.calls("account_subscriptions");
    let body = TriggerBody {
        services: vec!["activeplatform:9000".into()],
        ..Default::default()
    };
    engine.store.request_trigger(&body).await.unwrap();
    let opts = CycleOptions {
        targets: Some(Targets::default()),
        ..Default::default()
    };
    let r = engine.run_cycle(&opts).await.unwrap();
    assert_eq!(r.result, CycleResult::Ok, "{r:?}");
    assert_eq!(perms_of(0), these(&ALL), "the upgrade was not pushed");
    assert_eq!(
        (lab.ap.calls("list"), lab.ap.calls("subscriptions")),
        lists,
        "it listed"
    );
    assert!(lab.ap.calls("account_subscriptions") > per_account);
}

/// `check-config --connect` lists the raw service statuses it saw and
/// those the service status map lacks; `status` counts services by state.
#[tokio::test(flavor = "multi_thread")]
async fn check_config_names_service_statuses_the_map_lacks() {
    let (lab, engine) = setup(2).await;
    service(&lab, 1, "Video 30", "2");
    service(&lab, 2, "Video 30", "9");
    cycle(&engine).await;
    let run = |args: &'static [&'static str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_billsync"));
        cmd.arg("--config")
            .arg(lab.config_path())
            .args(args)
            .env_remove("RUST_LOG");
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
    };
    let out = run(&["check-config", "--connect"]).await.unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains("raw service statuses seen: {\"2\", \"9\"}"),
        "{shown}"
    );
    assert!(
        shown.contains("services.status_map LACKS [\"9\"]"),
        "{shown}"
    );
    let out = run(&["status", "--json"]).await.unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["services"]["billmanager"]["active"], 1, "{doc}");
}
