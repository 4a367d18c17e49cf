//! Rolling re-verification under a fake clock (SPEC §10.1, "due, then
//! paced"): a mass creation, then cycle after cycle over several simulated
//! periods, through the store and the slice the engine takes. Every account
//! and user is verified once per period and not more often, no cycle takes
//! more than its bound, nothing is due right after the creation, and no
//! verification gets older than 1.5 periods.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use billsync::core::model::{AccountKey, ListedAccount, RawAccount, SourceKind, UserState};
use billsync::core::pacing::{Pacing, Round};
use billsync::core::plan::{Action, AppliedUser};
use billsync::engine::reverify::due_slice;
use billsync::store::Store;

const KIND: SourceKind = SourceKind::Billmanager;
const PERIODS: i64 = 3;

/// A read at `secs`: simulated time runs forward, so it orders reads too.
fn read(secs: i64) -> billsync::store::ReadStamp {
    billsync::store::ReadStamp {
        seq: secs,
        at: time(secs),
    }
}

fn time(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap()
}

fn user(id: &str) -> AppliedUser {
    AppliedUser {
        owner: AccountKey {
            source: KIND,
            id: id.to_string(),
        },
        state: UserState {
            user_type: "b2c".into(),
            status: "active".into(),
            billing_id: format!("billmanager-{id}"),
            properties: vec![],
            permissions: Arc::default(),
            gone: false,
            cameras: None,
        },
    }
}

/// When each key was verified, in Unix seconds.
#[derive(Default)]
struct Log {
    times: HashMap<String, Vec<i64>>,
}

impl Log {
    fn verified(&mut self, key: &str, at: i64) {
        self.times.entry(key.to_string()).or_default().push(at);
    }

    /// The oldest any verification got before the next one, or by `end`.
    fn oldest_age(&self, end: i64) -> i64 {
        let gaps = self.times.values().flat_map(|t| {
            let last = end - t.last().unwrap();
            t.windows(2).map(|w| w[1] - w[0]).chain([last])
        });
        gaps.max().unwrap()
    }
}

/// The real write paths: a complete listing with details (the initial
/// sync), and users created by confirmed creates.
async fn initial_sync(store: &Store, pacing: &Pacing, n: usize, t0: i64, log: &mut [Log; 2]) {
    let ids: Vec<String> = (0..n).map(|i| format!("{i}")).collect();
    let listing: Vec<ListedAccount> = ids
        .iter()
        .map(|id| ListedAccount {
            raw: RawAccount {
                id: id.clone(),
                ..Default::default()
            },
            row_hash: String::new(),
            row_json: None,
        })
        .collect();
    let index = store.account_index(KIND).await.unwrap();
    (store.save_listing(KIND, &listing, &index, 2, read(t0)))
        .await
        .unwrap();
    save_details(store, pacing, &ids, t0).await;
    let from = |id: &str| pacing.verify_from(id, Round::of(&Action::Create).unwrap(), t0);
    for id in &ids {
        let login = format!("u{id}");
        let u = user(id);
        (store.set_applied(&login, Some(&u), Some(from(&login))))
            .await
            .unwrap();
        log[0].verified(id, t0);
        log[1].verified(&login, t0);
    }
}

async fn save_details(store: &Store, pacing: &Pacing, ids: &[String], at: i64) {
    let rows: Vec<(String, String, RawAccount)> = ids
        .iter()
        .map(|id| {
            let raw = RawAccount {
                id: id.clone(),
                ..Default::default()
            };
            (id.clone(), format!("h{id}"), raw)
        })
        .collect();
    (store.save_details(KIND, &rows, read(at), pacing, false))
        .await
        .unwrap();
}

/// One cycle's re-verification, as the engine takes and records it.
async fn cycle(store: &Store, pacing: &Pacing, now: i64, log: &mut [Log; 2]) -> (usize, usize) {
    let slice = due_slice(store, &[KIND], *pacing, time(now)).await.unwrap();
    let ids: Vec<String> = slice.accounts[&KIND].iter().cloned().collect();
    save_details(store, pacing, &ids, now).await;
    let full = Action::Update {
        attach: Default::default(),
        detach: Default::default(),
        changes: vec![],
        full: true,
    };
    let round = Round::of(&full).unwrap();
    for login in &slice.logins {
        let id = login.trim_start_matches('u');
        let from = pacing.verify_from(login, round, now);
        let u = user(id);
        (store.set_applied(login, Some(&u), Some(from)))
            .await
            .unwrap();
        log[1].verified(login, now);
    }
    for id in &ids {
        log[0].verified(id, now);
    }
    (ids.len(), slice.logins.len())
}

async fn simulate(n: usize, interval_secs: u64) {
    let period_secs = 86_400;
    let pacing = Pacing {
        interval_secs,
        period_secs,
    };
    let (interval, period) = (interval_secs as i64, period_secs as i64);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).await.unwrap();
    let t0 = 1_800_000_000;
    let mut log = [Log::default(), Log::default()];
    initial_sync(&store, &pacing, n, t0, &mut log).await;
    let bound = pacing.bound(n as u64) as usize;
    let mut busiest = (0, 0);
    let mut now = t0;
    while now < t0 + (PERIODS + 1) * period {
        now += interval;
        let (accounts, users) = cycle(&store, &pacing, now, &mut log).await;
        assert!(
            accounts <= bound && users <= bound,
            "{accounts}/{users} > {bound} at {now}"
        );
        if now - t0 < period / 2 {
            assert_eq!(
                (accounts, users),
                (0, 0),
                "due before half a period at {now}"
            );
        }
        busiest = (busiest.0.max(accounts), busiest.1.max(users));
    }
    let max_age = log[0].oldest_age(now).max(log[1].oldest_age(now));
    assert!(
        max_age <= period * 3 / 2,
        "a verification got {max_age} s old"
    );
    for (what, log) in ["account", "user"].iter().zip(&log) {
        assert_eq!(log.times.len(), n, "{what}s seen");
        for (key, times) in &log.times {
            let gaps: Vec<i64> = times.windows(2).map(|w| w[1] - w[0]).collect();
            assert!(gaps.len() as i64 >= PERIODS, "{what} {key}: {times:?}");
            assert!(
                gaps[0] >= period / 2,
                "{what} {key} first round early: {gaps:?}"
            );
            let later = &gaps[1..];
            assert!(
                later.iter().all(|g| *g >= period && *g <= period * 3 / 2),
                "{what} {key} not once per period: {gaps:?}"
            );
        }
    }
    let distinct: HashSet<&String> = log[1].times.keys().collect();
    assert_eq!(distinct.len(), n);
    eprintln!("n={n}: bound {bound}, busiest cycle {busiest:?}, oldest {max_age} s");
}

#[tokio::test]
async fn ten_users_once_a_period() {
    simulate(10, 60).await;
}

#[tokio::test]
async fn a_thousand_users_once_a_period() {
    simulate(1_000, 60).await;
}

/// 10k at a cycle every 10 minutes: the bound is many per cycle.
#[tokio::test]
async fn ten_thousand_users_once_a_period() {
    simulate(10_000, 600).await;
}

/// 100k: 400k confirmed pushes, each its own transaction as in a real push,
/// take minutes in a debug build; run it with
/// `cargo test --release --test pacing -- --include-ignored`.
#[tokio::test]
#[cfg_attr(
    debug_assertions,
    ignore = "minutes in a debug build; run with --release"
)]
async fn a_hundred_thousand_users_once_a_period() {
    simulate(100_000, 600).await;
}
