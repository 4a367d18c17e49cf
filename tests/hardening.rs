//! SPEC §11 from outside the modules: one malformed record costs only
//! itself, a count the server states never sizes memory, and a panic's text
//! is scrubbed like every log line.

mod common;
use common::LabSettings;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use billsync::core::model::SourceKind;
use billsync::engine::{CycleOptions, Engine};
use billsync::sources;
use billsync_emulators::activeplatform::NOT_UTF8;
use billsync_emulators::lab::Lab;
use billsync_emulators::Fault;

/// The largest single allocation this test binary made.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

/// Before: one byte 0xFF in one customer's name rejected the whole page, so
/// the source was incomplete every cycle and a new account on that page
/// never reached the VMS.
#[tokio::test]
async fn one_undecodable_name_costs_only_its_record() {
    let lab = Lab::start(0, 30).await.unwrap();
    let settings = lab.settings("", &[]).unwrap();
    let engine = Engine::new(settings).await.unwrap();
    let bad_login = {
        let mut data = lab.ap.data();
        let bad = &mut data.accounts[7];
        bad.first_name = format!("Ann{NOT_UTF8}e");
        bad.email.clone()
    };
    let r = engine.run_cycle(&CycleOptions::default()).await.unwrap();
    assert!(r.sources["activeplatform"].complete, "{r:?}");
    assert_eq!(r.invalid, 1, "{r:?}");
    let users = lab.vms.data().users.clone();
    assert_eq!(users.len(), 29);
    assert!(!users.contains_key(&bad_login));
    let status = billsync::status::status_json(&engine.store, &lab.settings("", &[]).unwrap())
        .await
        .unwrap();
    assert!(status["invalid"].to_string().contains("UTF-8"), "{status}");
}

/// Before: `p_elems` from the wire sized a preallocation (up to 10 million
/// rows: gigabytes for a one-row answer).
#[tokio::test]
async fn a_stated_row_count_never_sizes_memory() {
    let lab = Lab::start(1, 0).await.unwrap();
    let settings = lab.settings("", &[]).unwrap();
    let body =
        r#"{"doc":{"elem":[{"id":{"$":"1"},"name":{"$":"Ann"}}],"p_elems":{"$":"9000000"}}}"#;
    lab.bm
        .faults
        .always("account", Fault::Reply(200, body.into()));
    let source = sources::from_settings(&settings)
        .unwrap()
        .into_iter()
        .find(|s| s.kind() == SourceKind::Billmanager)
        .unwrap();
    const LIMIT: usize = 16 << 20;
    assert!(
        LARGEST.load(Ordering::Relaxed) < LIMIT,
        "the setup allocated too much"
    );
    let listing = source.list_accounts(&|_| {}, &|_, _| true).await;
    assert!(listing.is_err(), "a page that repeats is incomplete");
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < LIMIT,
        "an allocation of {largest} bytes for a one-row answer"
    );
}

/// Before: a number too large for a float (`1e400`) failed the whole page.
#[tokio::test]
async fn one_absurd_number_costs_only_its_record() {
    let lab = Lab::start(0, 0).await.unwrap();
    let settings = lab.settings("", &[]).unwrap();
    let engine = Engine::new(settings).await.unwrap();
    let row = |id: u32, balance: &str| {
        format!(
            r#"{{"id":{id},"email":"c{id}@ap.example.com","status":"active","balance":{balance},"credit_limit":0,"first_name":"C","last_name":"{id}"}}"#
        )
    };
    let page = format!("[{},{},{}]", row(1, "10.5"), row(2, "1e400"), row(3, "0"));
    lab.ap.faults.once("accounts.json", Fault::Reply(200, page));
    let r = engine.run_cycle(&CycleOptions::default()).await.unwrap();
    assert!(r.sources["activeplatform"].complete, "{r:?}");
    assert_eq!(r.invalid, 1, "{r:?}");
    let users = lab.vms.data().users.clone();
    assert!(users.contains_key("c1@ap.example.com") && users.contains_key("c3@ap.example.com"));
    assert!(!users.contains_key("c2@ap.example.com"));
}

/// Before: a panic's text went to stderr as is, secrets included.
#[test]
fn panic_text_is_scrubbed() {
    let secret = "panic-secret-7f3a9";
    billsync::telemetry::redact::register(secret);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = seen.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        *sink.lock().unwrap() = billsync::telemetry::panic_text(info);
    }));
    let joined = std::thread::Builder::new()
        .name("probe".into())
        .spawn(move || panic!("cannot log in with {secret}"))
        .unwrap()
        .join();
    std::panic::set_hook(previous);
    assert!(joined.is_err());
    let text = seen.lock().unwrap().clone();
    assert!(
        text.contains("'probe' panicked at tests/hardening.rs"),
        "{text}"
    );
    assert!(text.contains("cannot log in with ***"), "{text}");
    assert!(!text.contains(secret), "{text}");
}

/// Before (v1): a store error while settling one operation aborted the push
/// and dropped the records of the others in flight, so their users were
/// created on the VMS and forgotten.
#[tokio::test]
async fn a_store_error_on_one_login_keeps_the_records_of_the_others() {
    let lab = Lab::start(0, 16).await.unwrap();
    let settings = lab
        .settings("", &[("BILLSYNC__VMS__CONCURRENCY", "4")])
        .unwrap();
    let engine = Engine::new(settings).await.unwrap();
    lab.vms
        .faults
        .set_latency(std::time::Duration::from_millis(30));
    let doomed = lab.ap.data().accounts[5].email.to_lowercase();
    let db = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new().filename(lab.state_path()),
    )
    .await
    .unwrap();
    let trigger = format!(
        "CREATE TRIGGER disk_full BEFORE INSERT ON applied_users WHEN NEW.login = '{doomed}' \
         BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
    );
    sqlx::query(&trigger).execute(&db).await.unwrap();
    let first = engine.run_cycle(&CycleOptions::default()).await;
    assert!(!matches!(&first, Ok(r) if r.result == billsync::core::cycle::CycleResult::Ok));
    let on_vms: Vec<String> = lab.vms.data().users.keys().cloned().collect();
    assert!(on_vms.len() > 1, "nothing was in flight: {on_vms:?}");
    let recorded: Vec<String> = sqlx::query_scalar("SELECT login FROM applied_users")
        .fetch_all(&db)
        .await
        .unwrap();
    for login in on_vms.iter().filter(|l| **l != doomed) {
        assert!(
            recorded.contains(login),
            "{login} is on the VMS but not recorded"
        );
    }
    sqlx::query("DROP TRIGGER disk_full")
        .execute(&db)
        .await
        .unwrap();
    let second = engine.run_cycle(&CycleOptions::default()).await.unwrap();
    assert_eq!(
        second.result,
        billsync::core::cycle::CycleResult::Ok,
        "{second:?}"
    );
    assert_eq!(lab.vms.data().users.len(), 16);
    for login in on_vms.iter().filter(|l| **l != doomed) {
        assert_eq!(lab.vms.count_for("POST", login), 1, "{login} created twice");
    }
}

/// The package, the unit and the README agree: every packaged file exists,
/// the conffile is packaged, the unit starts the packaged binary, and every
/// alert's runbook anchor is in the README. (`.ci/package` builds and
/// installs the package itself.)
#[test]
fn the_package_unit_and_runbook_agree() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let assets: Vec<(String, String)> = deb["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_array().unwrap();
            (a[0].as_str().unwrap().into(), a[1].as_str().unwrap().into())
        })
        .collect();
    for (src, _) in assets.iter().filter(|(s, _)| !s.starts_with("target/")) {
        assert!(root.join(src).is_file(), "packaged file {src} is missing");
    }
    for conf in deb["conf-files"].as_array().unwrap() {
        let conf = conf.as_str().unwrap().trim_start_matches('/');
        assert!(
            assets.iter().any(|(_, dest)| dest == conf),
            "{conf} not packaged"
        );
    }
    let (_, bin_dir) = assets
        .iter()
        .find(|(s, _)| s.ends_with("/billsync"))
        .unwrap();
    let unit = read("deploy/billsync.service");
    let exec = format!("ExecStart=/{bin_dir}billsync ");
    assert!(
        unit.contains(&exec),
        "the unit does not start /{bin_dir}billsync"
    );
    let readme = read("README.md");
    // The packaged README points at nothing missing: each document it
    // links is packaged beside it.
    let docs: Vec<&str> = (readme.split("](").skip(1))
        .filter_map(|rest| rest.split(')').next())
        .filter(|target| target.ends_with(".md"))
        .collect();
    assert!(docs.len() >= 3, "{docs:?}");
    for doc in docs {
        let packaged = format!("usr/share/doc/billsync/{doc}");
        assert!(
            assets
                .iter()
                .any(|(src, dest)| *src == doc && *dest == packaged),
            "README links {doc}, which the package lacks"
        );
    }
    let alerts = read("deploy/alerts.yml");
    let anchors: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook: \"README.md#"))
        .map(|a| a.trim_end_matches('"'))
        .collect();
    assert!(anchors.len() >= 8, "{anchors:?}");
    for a in anchors {
        assert!(
            readme.contains(&format!("<a id=\"{a}\"></a>")),
            "no runbook for {a}"
        );
    }
}
