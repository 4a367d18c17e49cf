//! SPEC §12.3 end to end: the public camera groups each user holds follow
//! what its account bought. The engine against the emulators over loopback
//! HTTP; the VMS emulator replaces or merges a user's set (how the real one
//! does is not documented), and every scenario runs under both.

mod common;
use common::LabSettings;

use std::collections::BTreeSet;

use billsync::core::cycle::CycleResult;
use billsync::engine::{CycleOptions, CycleReport, Engine};
use billsync_emulators::billmanager::BmService;
use billsync_emulators::lab::Lab;
use billsync_emulators::vms::CamerasMode;

const MODES: [CamerasMode; 2] = [CamerasMode::Replace, CamerasMode::Merge];

/// Tree elements and camera access on; both plans grant the same
/// permission, so a plan change moves only camera groups: "Video 30" adds
/// the shared group `hd-cameras` to the account's own element.
fn config(format: &str, on_block: &str) -> String {
    format!(
        r#"
[sources.billmanager.services]
item_types = ["videocam"]

[vms.tree]
enabled = true

[vms.cameras]
enabled = true
format = "{format}"
on_block = "{on_block}"

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
plans = ["Video 30"]
grant = ["archives-show"]
camera_groups = ["hd-cameras"]
"#
    )
}

/// `n` active BILLmanager accounts, each with a "Video 30" service, and an
/// engine; the VMS in `mode`.
async fn setup(n: usize, mode: CamerasMode, format: &str, on_block: &str) -> (Lab, Engine) {
    let lab = Lab::start(n, 0).await.unwrap();
    lab.vms.data().cameras_mode = mode;
    for a in lab.bm.data().accounts.iter_mut() {
        (a.status, a.balance) = ("1".into(), "100.00".into());
    }
    for account in 1..=n as u64 {
        lab.bm.add_service(BmService {
            id: 700 + account,
            item_type: "videocam".into(),
            account_id: account,
            pricelist: "Video 30".into(),
            item_status: "2".into(),
            ..Default::default()
        });
    }
    let settings = lab.settings(&config(format, on_block), &[]).unwrap();
    (lab, Engine::new(settings).await.unwrap())
}

async fn cycle(engine: &Engine) -> CycleReport {
    let r = engine.run_cycle(&CycleOptions::default()).await.unwrap();
    assert!(
        matches!(r.result, CycleResult::Ok | CycleResult::Held),
        "{r:?}"
    );
    r
}

fn login(account: u64) -> String {
    format!("user{account}@bm.example.com")
}

fn groups(lab: &Lab, account: u64) -> BTreeSet<String> {
    lab.vms.user(&login(account)).unwrap().camera_groups
}

fn these(groups: &[&str]) -> BTreeSet<String> {
    groups.iter().map(|g| g.to_string()).collect()
}

fn own(account: u64) -> String {
    format!("billmanager-{account}")
}

fn plan(lab: &Lab, account: u64, plan: &str) {
    let mut bm = lab.bm.data();
    let s = (bm.services.iter_mut())
        .find(|s| s.account_id == account)
        .unwrap();
    s.pricelist = plan.into();
}

fn account_status(lab: &Lab, account: u64, status: &str) {
    lab.bm.data().accounts[account as usize - 1].status = status.into();
}

/// A downgrade removes a group, an upgrade adds it back; a no-op cycle
/// sends nothing. In the object format removal works whether the VMS
/// replaces or merges; with bare ids only a replacing VMS drops a group
/// (why the object format exists: SPEC §12.3).
#[tokio::test]
async fn groups_follow_the_plan_whether_the_vms_replaces_or_merges() {
    for mode in MODES {
        for format in ["ids", "objects"] {
            let (lab, engine) = setup(2, mode, format, "keep").await;
            let at = format!("{mode:?}, {format}");
            cycle(&engine).await;
            let full = these(&[&own(1), "hd-cameras"]);
            assert_eq!(groups(&lab, 1), full, "{at}");
            plan(&lab, 1, "Video 7");
            let r = cycle(&engine).await;
            assert_eq!(r.operations.cameras, 1, "{at}: {r:?}");
            let removes = mode == CamerasMode::Replace || format == "objects";
            match removes {
                true => assert_eq!(groups(&lab, 1), these(&[&own(1)]), "{at}"),
                false => assert_eq!(groups(&lab, 1), full, "{at}: bare ids never remove"),
            }
            assert_eq!(groups(&lab, 2), these(&[&own(2), "hd-cameras"]), "{at}");
            plan(&lab, 1, "Video 30");
            cycle(&engine).await;
            assert_eq!(groups(&lab, 1), full, "{at}");
            let requests = lab.vms.requests();
            cycle(&engine).await;
            assert_eq!(
                lab.vms.requests(),
                requests,
                "{at}: a no-op cycle sent requests"
            );
        }
    }
}

/// `on_block = "keep"`: a suspended account's user is blocked and keeps
/// its set; `"clear"`: blocking empties it. Either way the set comes back
/// when the account is active again.
#[tokio::test]
async fn blocking_keeps_or_clears_the_set() {
    for mode in MODES {
        for (on_block, while_blocked) in [("keep", true), ("clear", false)] {
            let (lab, engine) = setup(1, mode, "objects", on_block).await;
            let at = format!("{mode:?}, {on_block}");
            cycle(&engine).await;
            let full = these(&[&own(1), "hd-cameras"]);
            account_status(&lab, 1, "2");
            cycle(&engine).await;
            let user = lab.vms.user(&login(1)).unwrap();
            assert_eq!(user.status, "blocked", "{at}");
            let want = if while_blocked {
                full.clone()
            } else {
                these(&[])
            };
            assert_eq!(user.camera_groups, want, "{at}");
            let requests = lab.vms.requests();
            cycle(&engine).await;
            assert_eq!(lab.vms.requests(), requests, "{at}: blocked and quiet");
            account_status(&lab, 1, "1");
            cycle(&engine).await;
            assert_eq!(groups(&lab, 1), full, "{at}: active again");
        }
    }
}

/// Removing a group from many users at once is a mass deprovision: held
/// by the safety threshold (the users keep their groups) until approved.
#[tokio::test]
async fn removing_groups_from_many_users_is_held_until_approved() {
    for mode in MODES {
        let (lab, engine) = setup(12, mode, "objects", "keep").await;
        cycle(&engine).await;
        for account in 1..=12 {
            plan(&lab, account, "Video 7");
        }
        let r = cycle(&engine).await;
        assert_eq!(
            (r.result, r.held),
            (CycleResult::Held, 12),
            "{mode:?}: {r:?}"
        );
        for account in 1..=12 {
            assert!(groups(&lab, account).contains("hd-cameras"), "{mode:?}");
        }
        let (_, covered) = engine.store.approve_held().await.unwrap();
        assert_eq!(covered, 12);
        let r = cycle(&engine).await;
        assert_eq!(r.result, CycleResult::Ok, "{mode:?}: {r:?}");
        for account in 1..=12 {
            assert_eq!(groups(&lab, account), these(&[&own(account)]), "{mode:?}");
        }
    }
}

/// An e-mail reused by another customer moves the login to another
/// account: its old owner's groups are replaced before the new owner's
/// profile and permissions are sent, so the new owner never holds them.
#[tokio::test]
async fn a_login_taken_by_another_account_keeps_none_of_the_old_groups() {
    for mode in MODES {
        let (lab, engine) = setup(2, mode, "objects", "keep").await;
        plan(&lab, 2, "Video 7");
        cycle(&engine).await;
        assert_eq!(groups(&lab, 1), these(&[&own(1), "hd-cameras"]));
        {
            let mut bm = lab.bm.data();
            bm.accounts[0].email = "moved1@bm.example.com".into();
            bm.accounts[1].email = login(1);
            // The list does not carry e-mails: a list row change makes
            // billsync re-read both accounts' details.
            bm.accounts[0].balance = "101.00".into();
            bm.accounts[1].balance = "101.00".into();
        }
        lab.vms.data().events.clear();
        let r = cycle(&engine).await;
        assert_eq!(groups(&lab, 1), these(&[&own(2)]), "{mode:?}: {r:?}");
        let taken = lab.vms.user(&login(1)).unwrap();
        assert_eq!(taken.billing_info["billing_id"], own(2), "{mode:?}");
        let paths: Vec<String> = (lab.vms.data().events.iter())
            .filter(|e| e.login == login(1))
            .map(|e| format!("{} {}", e.method, e.path))
            .collect();
        assert_eq!(
            paths.first().map(String::as_str),
            Some("POST user/manage/cameras"),
            "{mode:?}: {paths:?}"
        );
        let moved = lab.vms.user("moved1@bm.example.com").unwrap();
        assert_eq!(
            moved.camera_groups,
            these(&[&own(1), "hd-cameras"]),
            "{mode:?}"
        );
    }
}

/// `explain --vms` prints the desired groups and, read-only, the cameras
/// the VMS says the user sees; without `--vms` it asks nothing. (Multi-threaded: the emulators answer while
/// the test waits for the binary.)
#[tokio::test(flavor = "multi_thread")]
async fn explain_shows_the_groups_and_what_the_vms_shows() {
    let (lab, engine) = setup(1, CamerasMode::Replace, "ids", "keep").await;
    cycle(&engine).await;
    let explain = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_billsync"))
            .arg("--config")
            .arg(lab.config_path())
            .arg("explain")
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let shown = explain(&[&login(1), "--vms"]);
    for line in [
        "desired    active [b2c], archives-show, camera groups billmanager-1, hd-cameras",
        "applied    active [b2c], archives-show, camera groups billmanager-1, hd-cameras",
        "vms sees   camera cam-hd-cameras \"Camera hd-cameras\", active, public group",
        "next       nothing to do",
    ] {
        assert!(shown.contains(line), "{line:?} not in:\n{shown}");
    }
    let requests = lab.vms.requests();
    assert!(!explain(&[&login(1)]).contains("vms sees"));
    assert_eq!(
        lab.vms.requests(),
        requests,
        "explain without --vms asks the VMS"
    );
}

/// A rule whose template names an attribute the account lacks: reported
/// (reason `camera_group`), and the set already applied stays.
#[tokio::test]
async fn a_template_without_a_value_keeps_the_applied_set() {
    let lab = Lab::start(0, 1).await.unwrap();
    {
        let mut ap = lab.ap.data();
        let a = &mut ap.accounts[0];
        (a.status, a.balance) = ("active".into(), 100.0);
        a.custom_attributes
            .insert("Street".into(), "lenina-1".into());
    }
    let extra = r#"
[vms.cameras]
enabled = true

[[permissions.rules]]
name = "street"
camera_groups = ["street-{attr:Street}"]
grant = ["archives-show"]
"#;
    let engine = Engine::new(lab.settings(extra, &[]).unwrap())
        .await
        .unwrap();
    let r = cycle(&engine).await;
    assert_eq!(r.invalid, 0, "{r:?}");
    let user = "client1@ap.example.com";
    assert_eq!(
        lab.vms.user(user).unwrap().camera_groups,
        these(&["street-lenina-1"])
    );
    lab.ap.data().accounts[0].custom_attributes.remove("Street");
    lab.ap.data().accounts[0].balance = 99.0;
    let r = cycle(&engine).await;
    assert_eq!(r.invalid, 1, "{r:?}");
    assert_eq!(
        lab.vms.user(user).unwrap().camera_groups,
        these(&["street-lenina-1"])
    );
    let status = billsync::status::status_json(&engine.store, &engine.settings)
        .await
        .unwrap();
    assert!(status.to_string().contains("camera_group"), "{status}");
    let requests = lab.vms.requests();
    cycle(&engine).await;
    assert_eq!(lab.vms.requests(), requests, "a kept set is quiet");
}
