//! The read side over real loopback HTTP: both readers against their
//! emulators, every quirk and injected fault, through the state store.

mod common;
use common::LabSettings;

use std::time::Duration;

use billsync::core::model::{CanonicalStatus, InvalidCode, SourceKind};
use billsync::core::normalize::Normalizer;
use billsync::engine::read::{read_source, ReadOptions, SourceRead};
use billsync::http::ErrorClass;
use billsync::sources::{self, Source};
use billsync::store::Store;
use billsync_emulators::activeplatform::Envelope;
use billsync_emulators::lab::Lab as World;
use billsync_emulators::Fault;
use rust_decimal::Decimal;

fn source(settings: &billsync::config::Settings, kind: SourceKind) -> Source {
    sources::from_settings(settings)
        .unwrap()
        .into_iter()
        .find(|s| s.kind() == kind)
        .unwrap()
}

fn normalizer(settings: &billsync::config::Settings, kind: SourceKind) -> Normalizer {
    settings.normalizer(kind).unwrap()
}

fn opts(full: bool) -> ReadOptions {
    ReadOptions {
        full,
        payment_window_days: 3,
        paid_history_days: 30,
        missing_grace_cycles: 2,
        reverify: Default::default(),
        // The shipped pacing: a cycle a minute, re-verified daily.
        pacing: billsync::core::pacing::Pacing {
            interval_secs: 60,
            period_secs: 86_400,
        },
        read: next_read(),
    }
}

/// Each read a cycle of its own: a sequence higher than the last.
fn next_read() -> billsync::store::ReadStamp {
    static SEQ: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);
    billsync::store::ReadStamp {
        seq: SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        at: chrono::Utc::now(),
    }
}

/// A complete listing's size.
async fn listed(src: &Source) -> usize {
    src.list_accounts(&|_| {}, &|_, _| true)
        .await
        .unwrap()
        .accounts
        .len()
}

async fn read(w: &World, store: &Store, kind: SourceKind, full: bool) -> SourceRead {
    let s = w.settings("", &[]).unwrap();
    read_source(
        store,
        &source(&s, kind),
        &normalizer(&s, kind),
        &opts(full),
        &|_| {},
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn billmanager_reads_every_size_completely() {
    for n in [0usize, 1, 100, 101, 2500] {
        let w = World::start(n, 0).await.unwrap();
        let store = Store::open(&w.state_path()).await.unwrap();
        let r = read(&w, &store, SourceKind::Billmanager, false).await;
        assert!(r.complete, "n={n}: {:?}", r.error);
        assert_eq!(r.listed, n, "n={n}");
        assert_eq!(r.accounts.len(), n, "n={n}: invalid {:?}", r.invalid);
        assert!(r.invalid.is_empty(), "n={n}: {:?}", r.invalid);
        let mut ids: Vec<u64> = r
            .accounts
            .iter()
            .map(|a| a.key.id.parse().unwrap())
            .collect();
        ids.sort();
        assert_eq!(ids, (1..=n as u64).collect::<Vec<_>>(), "n={n}");
        // Every account got its details (e-mail is only in account.edit).
        assert_eq!(w.bm.calls("account.edit"), n as u64, "n={n}");
    }
}

#[tokio::test]
async fn billmanager_accounts_are_normalized() {
    let w = World::start(40, 0).await.unwrap();
    let store = Store::open(&w.state_path()).await.unwrap();
    let r = read(&w, &store, SourceKind::Billmanager, false).await;
    let by_id = |id: &str| r.accounts.iter().find(|a| a.key.id == id).unwrap().clone();
    let data = w.bm.data().accounts.clone();
    for emu in &data {
        let a = by_id(&emu.id.to_string());
        assert_eq!(a.login, emu.email.trim().to_lowercase());
        assert_eq!(a.billing_id, format!("billmanager-{}", emu.id));
        assert_eq!(a.name.as_deref(), Some(emu.name.as_str()));
        assert_eq!(a.balance, emu.balance.parse::<Decimal>().unwrap());
        let expect_status = if emu.status == "1" {
            CanonicalStatus::Active
        } else {
            CanonicalStatus::Suspended
        };
        assert_eq!(a.status, expect_status);
        assert!(a.phone.as_deref().unwrap().starts_with("+79"));
    }
    // Account 17 has "  User17@Example.COM " in BILLmanager.
    assert_eq!(by_id("17").login, "user17@example.com");
    // Account 5 has two subaccounts with limits 100.00 and 50.
    assert_eq!(by_id("5").credit_limit, Decimal::from(150));
    assert_eq!(by_id("4").credit_limit, Decimal::ZERO);
}

#[tokio::test]
async fn billmanager_survives_server_page_cap_and_clamping() {
    let w = World::start(250, 0).await.unwrap();
    // The server caps p_cnt at 30 although we ask for 100, and clamps.
    w.bm.data().max_page_size = 30;
    let store = Store::open(&w.state_path()).await.unwrap();
    let r = read(&w, &store, SourceKind::Billmanager, false).await;
    assert!(r.complete, "{:?}", r.error);
    assert_eq!(r.listed, 250);
    // 250 / 30 = 9 pages; no page repeats forever.
    assert!(w.bm.calls("account") <= 10, "{}", w.bm.calls("account"));
}

#[tokio::test]
async fn incremental_read_fetches_details_only_for_changes() {
    let w = World::start(300, 0).await.unwrap();
    let store = Store::open(&w.state_path()).await.unwrap();
    read(&w, &store, SourceKind::Billmanager, false).await;
    w.bm.reset_calls();
    let r = read(&w, &store, SourceKind::Billmanager, false).await;
    assert_eq!(r.accounts.len(), 300);
    assert_eq!(w.bm.calls("account.edit"), 0);
    assert_eq!(r.detail_calls, 0);
    // One balance change: one detail call.
    w.bm.data().accounts[9].balance = "999.00".into();
    let r = read(&w, &store, SourceKind::Billmanager, false).await;
    assert_eq!(w.bm.calls("account.edit"), 1);
    let a = r.accounts.iter().find(|a| a.key.id == "10").unwrap();
    assert_eq!(a.balance, Decimal::from(999));
    // A full read fetches every account's details again.
    w.bm.reset_calls();
    read(&w, &store, SourceKind::Billmanager, true).await;
    assert_eq!(w.bm.calls("account.edit"), 300);
}

#[tokio::test]
async fn billmanager_errors_in_200_are_classified() {
    let w = World::start(5, 0).await.unwrap();
    let s = w.settings("", &[]).unwrap();
    let src = source(&s, SourceKind::Billmanager);
    w.bm.faults
        .always("account", Fault::ErrorBody("access".into()));
    let e = src.list_accounts(&|_| {}, &|_, _| true).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert!(e.message.contains("(access)"), "{e}");
    w.bm.faults.clear();
    // Wrong password: 200 with an auth error, permanent, and no secret in it.
    let bad = w
        .settings(
            "",
            &[(
                "BILLSYNC__SOURCES__BILLMANAGER__PASSWORD",
                "wrong-password-xyz",
            )],
        )
        .unwrap();
    let e = source(&bad, SourceKind::Billmanager)
        .list_accounts(&|_| {}, &|_, _| true)
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert!(e.message.contains("(auth)"), "{e}");
    assert!(!e.message.contains("wrong-password-xyz"));
    // An unknown error type inside a 200 is transient (retried, then fails).
    w.bm.faults
        .always("account", Fault::ErrorBody("sysbusy".into()));
    let e = src.list_accounts(&|_| {}, &|_, _| true).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient);
}

#[tokio::test]
async fn billmanager_session_auth_relogs_once() {
    let w = World::start(120, 0).await.unwrap();
    let s = w
        .settings(
            "",
            &[("BILLSYNC__SOURCES__BILLMANAGER__AUTH_MODE", "session")],
        )
        .unwrap();
    let src = source(&s, SourceKind::Billmanager);
    assert_eq!(listed(&src).await, 120);
    assert_eq!(w.bm.calls("auth"), 1);
    w.bm.expire_sessions();
    assert_eq!(listed(&src).await, 120);
    assert_eq!(w.bm.calls("auth"), 2);
    // A session that is refused right after a fresh login: permanent.
    w.bm.faults
        .always("account", Fault::ErrorBody("auth".into()));
    let e = src.list_accounts(&|_| {}, &|_, _| true).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert_eq!(w.bm.calls("auth"), 3);
}

#[tokio::test]
async fn transport_faults_are_transient_and_retried() {
    let w = World::start(150, 150).await.unwrap();
    let s = w
        .settings(
            "",
            &[
                ("BILLSYNC__SOURCES__BILLMANAGER__TIMEOUT_SECS", "1"),
                ("BILLSYNC__SOURCES__ACTIVEPLATFORM__TIMEOUT_SECS", "1"),
            ],
        )
        .unwrap();
    let bm = source(&s, SourceKind::Billmanager);
    let ap = source(&s, SourceKind::Activeplatform);
    // One fault of each kind is absorbed by the in-read retry.
    for fault in [
        Fault::Status(503),
        Fault::Html,
        Fault::Html200,
        Fault::Garbage,
        Fault::WrongShape,
    ] {
        w.bm.faults.once("account", fault.clone());
        assert_eq!(listed(&bm).await, 150, "{fault:?}");
        w.ap.faults.once("accounts.json", fault.clone());
        assert_eq!(listed(&ap).await, 150, "{fault:?}");
    }
    // Persistent ones fail the read as transient.
    for fault in [
        Fault::Status(500),
        Fault::Html,
        Fault::Garbage,
        Fault::Delay(Duration::from_millis(1500)),
    ] {
        w.bm.faults.always("account", fault.clone());
        let e = bm.list_accounts(&|_| {}, &|_, _| true).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Transient, "{fault:?}: {e}");
        w.bm.faults.clear();
        w.ap.faults.always("accounts.json", fault.clone());
        let e = ap.list_accounts(&|_| {}, &|_, _| true).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Transient, "{fault:?}: {e}");
        assert!(!e
            .message
            .contains(billsync_emulators::activeplatform::TOKEN));
        w.ap.faults.clear();
    }
    w.ap.faults.always("accounts.json", Fault::TooMany(7));
    let e = ap.list_accounts(&|_| {}, &|_, _| true).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient);
    assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
}

#[tokio::test]
async fn failing_or_empty_source_is_incomplete_and_keeps_accounts() {
    let w = World::start(60, 0).await.unwrap();
    let store = Store::open(&w.state_path()).await.unwrap();
    assert!(
        read(&w, &store, SourceKind::Billmanager, false)
            .await
            .complete
    );
    // An empty listing while the store knows accounts: a failed read.
    w.bm.faults.always("account", Fault::EmptyListing);
    let r = read(&w, &store, SourceKind::Billmanager, false).await;
    assert!(!r.complete);
    assert!(r.error.as_deref().unwrap().contains("zero accounts"));
    assert_eq!(r.accounts.len(), 60, "known accounts are kept");
    assert!(r.missing.is_empty(), "nothing counts as missing");
    w.bm.faults.clear();
    // A failing source likewise.
    w.bm.faults.always("account", Fault::Status(502));
    let r = read(&w, &store, SourceKind::Billmanager, false).await;
    assert!(!r.complete);
    assert_eq!(r.accounts.len(), 60);
    assert!(r.missing.is_empty());
    w.bm.faults.clear();
    // A failing payment read also makes the source incomplete.
    w.bm.faults.always("payment", Fault::Status(500));
    let r = read(&w, &store, SourceKind::Billmanager, false).await;
    assert!(!r.complete);
    w.bm.faults.clear();
    // Really gone accounts count missing cycles.
    w.bm.data().accounts.truncate(50);
    let r = read(&w, &store, SourceKind::Billmanager, false).await;
    assert!(r.complete);
    assert_eq!(r.missing.len(), 10);
    assert!(r.missing.values().all(|&m| m == 1));
    let r = read(&w, &store, SourceKind::Billmanager, false).await;
    assert!(r.missing.values().all(|&m| m == 2));
    assert_eq!(
        r.accounts.len(),
        60,
        "missing accounts stay known for the grace period"
    );
    // Past the grace period (2) the count stops: the rows of accounts gone
    // for good are not rewritten every cycle for ever (SPEC §10, issue 10).
    for _ in 0..4 {
        read(&w, &store, SourceKind::Billmanager, false).await;
    }
    let gone = store
        .source_account(SourceKind::Billmanager, "55")
        .await
        .unwrap()
        .expect("still stored");
    assert_eq!(gone.missing_cycles, 3);
}

#[tokio::test]
async fn bad_records_are_skipped_and_reported() {
    let w = World::start(30, 30).await.unwrap();
    {
        let mut d = w.bm.data();
        d.accounts[2].status = "42".into(); // unknown raw status
        d.accounts[3].balance = "lots".into(); // malformed number
        d.accounts[4].email = "".into(); // no login
    }
    let store = Store::open(&w.state_path()).await.unwrap();
    let r = read(&w, &store, SourceKind::Billmanager, false).await;
    assert!(r.complete);
    assert_eq!(r.accounts.len(), 27);
    let reasons: Vec<(String, InvalidCode)> = r
        .invalid
        .iter()
        .map(|i| (i.id.clone(), i.invalid.code))
        .collect();
    assert!(
        reasons.contains(&("3".into(), InvalidCode::UnknownStatus)),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&("4".into(), InvalidCode::BadNumber)),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&("5".into(), InvalidCode::NoLogin)),
        "{reasons:?}"
    );
    let stored = store.invalid_records().await.unwrap();
    assert_eq!(stored.len(), 3);
    let metrics = billsync::telemetry::metrics::get().encode();
    assert!(metrics.contains(
        r#"billsync_invalid_records_total{source="billmanager",reason="unknown_status"}"#
    ));

    w.ap.data().accounts[0].status = "frozen".into();
    let r = read(&w, &store, SourceKind::Activeplatform, false).await;
    assert_eq!(r.accounts.len(), 29);
    assert_eq!(r.invalid.len(), 1);
    assert_eq!(r.invalid[0].invalid.code, InvalidCode::UnknownStatus);
}

#[tokio::test]
async fn activeplatform_reads_every_size_and_envelope() {
    for (n, envelope) in [
        (0usize, Envelope::Bare),
        (1, Envelope::Data),
        (100, Envelope::Accounts),
        (101, Envelope::Items),
        (2500, Envelope::Bare),
    ] {
        let w = World::start(0, n).await.unwrap();
        w.ap.data().envelope = envelope;
        let store = Store::open(&w.state_path()).await.unwrap();
        let r = read(&w, &store, SourceKind::Activeplatform, false).await;
        assert!(r.complete, "n={n}: {:?}", r.error);
        assert_eq!(r.accounts.len(), n, "n={n} {envelope:?}: {:?}", r.invalid);
        // Rows without e-mail (every tenth id) were completed by a GET.
        let without_email =
            w.ap.data()
                .accounts
                .iter()
                .filter(|a| a.id % 10 == 0)
                .count() as u64;
        assert_eq!(w.ap.calls("get"), without_email, "n={n}");
        let data = w.ap.data().accounts.clone();
        for emu in data.iter().take(50) {
            let a = r
                .accounts
                .iter()
                .find(|a| a.key.id == emu.id.to_string())
                .unwrap();
            assert_eq!(a.login, emu.email);
            assert_eq!(
                a.phone.as_deref().unwrap(),
                format!("+375{:09}", emu.id - 2_000_000)
            );
            assert_eq!(a.credit_limit, Decimal::try_from(emu.credit_limit).unwrap());
            assert_eq!(
                a.balance,
                Decimal::try_from(emu.balance).unwrap().round_dp(2)
            );
        }
    }
}

#[tokio::test]
async fn activeplatform_string_balances_and_auth_errors() {
    let w = World::start(0, 20).await.unwrap();
    w.ap.data().balance_as_string = true;
    let store = Store::open(&w.state_path()).await.unwrap();
    let r = read(&w, &store, SourceKind::Activeplatform, false).await;
    assert_eq!(r.accounts.len(), 20);
    let bad = w
        .settings(
            "",
            &[("BILLSYNC__SOURCES__ACTIVEPLATFORM__API_TOKEN", "nope-nope")],
        )
        .unwrap();
    let e = source(&bad, SourceKind::Activeplatform)
        .list_accounts(&|_| {}, &|_, _| true)
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert_eq!(e.status, Some(401));
    assert!(!e.message.contains("nope-nope"));
}

#[tokio::test]
async fn payments_feed_last_paid_and_resolve_by_name() {
    let w = World::start(10, 10).await.unwrap();
    let today = chrono::Utc::now()
        .date_naive()
        .format("%Y-%m-%d")
        .to_string();
    w.bm.add_payment(3, "20.00", "4", &today);
    w.bm.add_payment(4, "1 000,00", "1", &today); // new: not paid
    w.bm.data().payments_have_account_id = false;
    let store = Store::open(&w.state_path()).await.unwrap();
    let r = read(&w, &store, SourceKind::Billmanager, false).await;
    assert!(r.complete);
    assert!(r.last_paid.contains_key("3"), "{:?}", r.last_paid);
    assert!(!r.last_paid.contains_key("4"));
    // Two accounts with one name: the payment cannot be placed.
    {
        let mut d = w.bm.data();
        d.accounts[6].name = "Twin".into();
        d.accounts[7].name = "Twin".into();
    }
    w.bm.add_payment(7, "5", "4", &today);
    let r = read(&w, &store, SourceKind::Billmanager, false).await;
    assert!(r
        .invalid
        .iter()
        .any(|i| i.kind == "payment" && i.invalid.code == InvalidCode::UnknownAccount));

    let ts = chrono::Utc::now().to_rfc3339();
    w.ap.add_payment(2_000_002, "15.00", "receipt sent", &ts);
    w.ap.add_payment(2_000_003, "15.00", "waiting for payment", &ts);
    let r = read(&w, &store, SourceKind::Activeplatform, false).await;
    assert!(r.last_paid.contains_key("2000002"));
    assert!(!r.last_paid.contains_key("2000003"));
}

#[tokio::test]
async fn detail_failures_are_retried_next_cycle() {
    let w = World::start(20, 0).await.unwrap();
    let store = Store::open(&w.state_path()).await.unwrap();
    w.bm.faults.always("account.edit", Fault::Status(500));
    let r = read(&w, &store, SourceKind::Billmanager, false).await;
    assert!(r.complete, "the listing itself is complete");
    assert_eq!(r.accounts.len(), 0);
    assert_eq!(r.details_unavailable, 20);
    assert!(r.missing.is_empty());
    w.bm.faults.clear();
    let r = read(&w, &store, SourceKind::Billmanager, false).await;
    assert_eq!(r.accounts.len(), 20);
}

/// SPEC §12.1 read side: BILLmanager service lists per product type, paged
/// with the account listing's proofs (the server caps and clamps pages);
/// the owner by `account_id` where the row has it, else by name; the
/// status as its code (`$orig`), not the localized label.
#[tokio::test]
async fn billmanager_service_lists_are_read_completely() {
    use billsync_emulators::billmanager::BmService;
    let w = World::start(40, 0).await.unwrap();
    w.bm.data().max_page_size = 7;
    for id in 1..=40u64 {
        w.bm.add_service(BmService {
            id: 500 + id,
            item_type: "videocam".into(),
            account_id: id,
            pricelist: format!("Video {}", if id % 2 == 0 { 30 } else { 7 }),
            pricelist_id: Some(if id % 2 == 0 { 30 } else { 7 }),
            item_status: "2".into(),
            ..Default::default()
        });
    }
    let mut settings = w.settings("", &[]).unwrap();
    let bm = settings.sources.billmanager.as_mut().unwrap();
    bm.services.item_types = vec!["videocam".into()];
    let src = source(&settings, SourceKind::Billmanager);
    let listing = src
        .list_services(&|_| {})
        .await
        .expect("configured")
        .unwrap();
    assert_eq!(listing.services.len(), 40, "{:?}", listing.bad);
    let s = listing.services.iter().find(|s| s.id == "502").unwrap();
    assert_eq!(s.owner_id.as_deref(), Some("2"));
    assert_eq!(s.plan_name.as_deref(), Some("Video 30"));
    assert_eq!(s.status.as_deref(), Some("2"), "the code, not the label");
    assert_eq!(s.plan_id, None, "this version shows no pricelist_id");
    // Another version: no account_id, but pricelist_id; owners by name.
    {
        let mut d = w.bm.data();
        (d.services_have_account_id, d.services_have_pricelist_id) = (false, true);
    }
    let listing = src.list_services(&|_| {}).await.unwrap().unwrap();
    let s = listing.services.iter().find(|s| s.id == "502").unwrap();
    assert_eq!(
        (s.owner_id.as_deref(), s.plan_id.as_deref()),
        (None, Some("30"))
    );
    assert!(s.owner_name.is_some());
    // Not configured: no service call at all.
    let plain = source(&w.settings("", &[]).unwrap(), SourceKind::Billmanager);
    assert!(plain.list_services(&|_| {}).await.is_none());
}

/// ActivePlatform subscriptions, paged; plan names from `plans/{id}.json`,
/// read once and cached; a server that ignores paging cannot prove the
/// listing complete, so it is an error (nothing is taken away on it).
#[tokio::test]
async fn activeplatform_subscriptions_carry_cached_plan_names() {
    use billsync_emulators::activeplatform::ApSubscription;
    let w = World::start(0, 30).await.unwrap();
    let ids: Vec<u64> = w.ap.data().accounts.iter().map(|a| a.id).collect();
    {
        let mut d = w.ap.data();
        d.plans.insert(7, "Video 7".into());
        d.plans.insert(30, "Video 30".into());
        for (i, account_id) in ids.iter().enumerate() {
            d.subscriptions.push(ApSubscription {
                id: 9000 + i as u64,
                plan_id: if i % 3 == 0 { 30 } else { 7 },
                account_id: *account_id,
                name: "Home video".into(),
                status: if i == 1 {
                    "Stopping failed".into()
                } else {
                    "active".into()
                },
                ..Default::default()
            });
        }
    }
    let mut settings = w.settings("", &[]).unwrap();
    let ap = settings.sources.activeplatform.as_mut().unwrap();
    (ap.services.enabled, ap.page_size) = (true, 8);
    let src = source(&settings, SourceKind::Activeplatform);
    for _ in 0..2 {
        let listing = src.list_services(&|_| {}).await.unwrap().unwrap();
        assert_eq!(listing.services.len(), 30);
        let first = &listing.services[0];
        assert_eq!(
            first.plan_name.as_deref(),
            Some("Video 30"),
            "not the subscription's name"
        );
        assert_eq!(first.owner_id, Some(ids[0].to_string()));
        assert_eq!(
            listing.services[1].status.as_deref(),
            Some("Stopping failed")
        );
    }
    assert_eq!(w.ap.calls("plan"), 2, "each plan's name read once");
    w.ap.data().ignore_page = true;
    let err = src.list_services(&|_| {}).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("repeats"), "{err}");
}
