//! The crash campaign (issue #9): `kill -9` at random moments of `run` and
//! `sync` while the world keeps changing, with 10 % VMS 500s and some
//! answers lost after the VMS applied the request. Then faults off and
//! `sync` until it exits 0: the VMS must hold exactly the desired state, old
//! logins of e-mail changes blocked, and no login created twice. Services
//! and camera access are on (SPEC §12): ActivePlatform subscriptions change
//! plans and stop, and every user's camera set must be exact too.
//!
//! `BILLSYNC_CAMPAIGN_KILLS=200 BILLSYNC_CAMPAIGN_SEED=7 cargo test --test campaign -- --nocapture`

mod common;
use common::LabSettings;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use billsync_emulators::activeplatform::{ApAccount, ApSubscription};
use billsync_emulators::billmanager::BmAccount;
use billsync_emulators::lab::Lab;
use billsync_emulators::{Fault, Seq};

const BIN: &str = env!("CARGO_BIN_EXE_billsync");
const MANAGED: [&str; 3] = [
    "archives-download",
    "archives-preview-download",
    "archives-show",
];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn billsync(lab: &Lab, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--config").arg(lab.config_path()).args(args);
    c.env_remove("RUST_LOG");
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c
}

/// What the VMS must hold for one login once everything converged.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// Active, with every managed permission or none, and these camera
    /// groups exactly.
    Active {
        paying: bool,
        groups: BTreeSet<String>,
    },
    /// Blocked with no managed permission and no camera group, or never
    /// created.
    BlockedOrAbsent,
}

/// Services and camera access on. `on_block = "clear"` (not the default
/// `keep`) so that a blocked user's set is a function of the final world
/// alone: with `keep` it would be whatever its history left.
const EXTRA: &str = r#"
[safety]
max_deprovision = 100000

[sources.activeplatform.services]
enabled = true

[vms.tree]
enabled = true

[vms.cameras]
enabled = true
on_block = "clear"

[[permissions.rules]]
name = "paying"
min_available = 0
grant = ["archives-show", "archives-download", "archives-preview-download"]

[[permissions.rules]]
name = "hd"
sources = ["activeplatform"]
plans = ["Video 30"]
grant = []
camera_groups = ["hd-cameras"]
"#;

/// The changing world: both billing systems, and every login ever used.
struct World<'a> {
    lab: &'a Lab,
    rng: Seq,
    next_bm: u64,
    next_ap: u64,
    next_sub: u64,
    old_logins: BTreeSet<String>,
}

impl World<'_> {
    /// A few random edits: new accounts, money, suspensions, deletions,
    /// removals, e-mail changes.
    fn change(&mut self) {
        for _ in 0..1 + self.rng.below(4) {
            match self.rng.below(8) {
                0 => self.new_bm(),
                1 => self.new_ap(),
                2 => self.money(),
                3 => self.suspend_or_restore(),
                4 => self.delete_one(),
                5 => self.remove_bm(),
                6 => self.subscription(),
                _ => self.email_change(),
            }
        }
    }

    fn new_bm(&mut self) {
        self.next_bm += 1;
        let id = self.next_bm;
        self.lab.bm.data().accounts.push(BmAccount {
            id,
            name: format!("New {id}"),
            email: format!("new{id}@bm.example.com"),
            phone: "+7 900 000-00-00".into(),
            status: "1".into(),
            balance: "10.00".into(),
            credit_limits: vec!["0".into()],
        });
    }

    fn new_ap(&mut self) {
        self.next_ap += 1;
        let id = self.next_ap;
        self.lab.ap.data().accounts.push(ApAccount {
            id,
            first_name: "New".into(),
            last_name: format!("{id}"),
            email: format!("new{id}@ap.example.com"),
            phone: "+375290000000".into(),
            status: "active".into(),
            balance: 10.0,
            credit_limit: 0.0,
            custom_attributes: Default::default(),
            updated_at: "2026-01-01T00:00:00.000+03:00".into(),
        });
    }

    fn money(&mut self) {
        let negative = self.rng.below(2) == 0;
        if self.rng.below(2) == 0 {
            let mut d = self.lab.bm.data();
            let i = self.rng.below(d.accounts.len() as u64) as usize;
            d.accounts[i].balance = if negative { "-900.00" } else { "900.00" }.into();
        } else {
            let mut d = self.lab.ap.data();
            let i = self.rng.below(d.accounts.len() as u64) as usize;
            d.accounts[i].balance = if negative { -900.0 } else { 900.0 };
        }
    }

    fn suspend_or_restore(&mut self) {
        let mut d = self.lab.ap.data();
        let i = self.rng.below(d.accounts.len() as u64) as usize;
        let a = &mut d.accounts[i];
        if a.status != "deleted" {
            a.status = if a.status == "active" {
                "credit hold"
            } else {
                "active"
            }
            .into();
        }
    }

    fn delete_one(&mut self) {
        let mut d = self.lab.bm.data();
        let i = self.rng.below(d.accounts.len() as u64) as usize;
        d.accounts[i].status = "3".into();
    }

    fn remove_bm(&mut self) {
        let mut d = self.lab.bm.data();
        if d.accounts.len() > 10 {
            let i = self.rng.below(d.accounts.len() as u64) as usize;
            let gone = d.accounts.remove(i);
            self.old_logins.insert(gone.email.trim().to_lowercase());
        }
    }

    /// A subscription bought, moved to the other plan, stopped or resumed.
    fn subscription(&mut self) {
        let mut d = self.lab.ap.data();
        let i = self.rng.below(d.accounts.len() as u64) as usize;
        let account_id = d.accounts[i].id;
        let change = self.rng.below(2);
        match d
            .subscriptions
            .iter_mut()
            .find(|s| s.account_id == account_id)
        {
            Some(s) if change == 0 => s.plan_id = if s.plan_id == 7 { 30 } else { 7 },
            Some(s) => {
                s.status = if s.status == "active" {
                    "stopped"
                } else {
                    "active"
                }
                .into();
            }
            None => {
                self.next_sub += 1;
                d.subscriptions.push(ApSubscription {
                    id: self.next_sub,
                    plan_id: 30,
                    account_id,
                    name: "Home video".into(),
                    status: "active".into(),
                    ..Default::default()
                });
            }
        }
    }

    /// Some list rows lack the e-mail, and an edit of only that reaches the
    /// VMS with a full resync or re-verification (SPEC §2.5, §10.1), not an
    /// incremental `sync`: this edit touches the balance too, as most do.
    fn email_change(&mut self) {
        let mut d = self.lab.ap.data();
        let i = self.rng.below(d.accounts.len() as u64) as usize;
        let a = &mut d.accounts[i];
        self.old_logins.insert(a.email.trim().to_lowercase());
        self.next_ap += 1;
        a.email = format!("moved{}@ap.example.com", self.next_ap);
        a.balance += 0.01;
    }

    /// The desired state, worked out from the emulators' data alone.
    fn wanted(&self) -> BTreeMap<String, Want> {
        let mut out: BTreeMap<String, Want> = self
            .old_logins
            .iter()
            .map(|l| (l.clone(), Want::BlockedOrAbsent))
            .collect();
        for a in &self.lab.bm.data().accounts {
            let credit: f64 = a
                .credit_limits
                .iter()
                .map(|c| c.parse::<f64>().unwrap())
                .sum();
            let money = a.balance.parse::<f64>().unwrap() + credit;
            let want = match a.status.as_str() {
                "1" => Want::Active {
                    paying: money >= 0.0,
                    groups: BTreeSet::from([format!("billmanager-{}", a.id)]),
                },
                _ => Want::BlockedOrAbsent,
            };
            out.insert(a.email.trim().to_lowercase(), want);
        }
        let ap = self.lab.ap.data();
        for a in &ap.accounts {
            let hd = (ap.subscriptions.iter())
                .any(|s| s.account_id == a.id && s.status == "active" && s.plan_id == 30);
            let mut groups = BTreeSet::from([format!("activeplatform-{}", a.id)]);
            if hd {
                groups.insert("hd-cameras".into());
            }
            let want = match a.status.as_str() {
                "active" => Want::Active {
                    paying: a.balance + a.credit_limit >= 0.0,
                    groups,
                },
                _ => Want::BlockedOrAbsent,
            };
            out.insert(a.email.trim().to_lowercase(), want);
        }
        out
    }
}

/// Starts `sync` or `run` and kills it with SIGKILL after `after`; whether
/// it was still running (and pushing) at that moment.
async fn kill_later(lab: &Lab, mut child: Child, after: Duration) -> (bool, bool) {
    let served = lab.vms.served();
    tokio::time::sleep(after).await;
    let running = child.try_wait().unwrap().is_none();
    let pushing = running && lab.vms.served() > served;
    let _ = child.kill();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    (running, pushing)
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_campaign_converges_exactly() {
    let kills = env_or("BILLSYNC_CAMPAIGN_KILLS", 60);
    let seed = env_or("BILLSYNC_CAMPAIGN_SEED", 1);
    let lab = Lab::start(40, 40).await.unwrap();
    {
        let mut ap = lab.ap.data();
        ap.plans.insert(7, "Video 7".into());
        ap.plans.insert(30, "Video 30".into());
    }
    lab.settings(EXTRA, &[]).unwrap();
    let text = lab
        .config_text(EXTRA)
        .replace(
            "timeout_secs = 5\nconcurrency",
            "timeout_secs = 1\nconcurrency",
        )
        .replace("[daemon]", "[daemon]\nmissing_grace_cycles = 1")
        .replace("*/2 * * * * *", "* * * * * *");
    std::fs::write(lab.config_path(), text).unwrap();
    let mut world = World {
        lab: &lab,
        rng: Seq::new(seed),
        next_bm: 1000,
        next_ap: 3_000_000,
        next_sub: 0,
        old_logins: BTreeSet::new(),
    };
    let faults = &lab.vms.faults;
    faults.set_latency(Duration::from_millis(15));
    faults.sometimes("", Fault::Status(500), 10, seed);
    faults.sometimes(
        "user/manage",
        Fault::LoseAnswer(Duration::from_millis(1500)),
        3,
        seed,
    );
    let (mut running, mut pushing) = (0, 0);
    let t = Instant::now();
    for k in 0..kills {
        world.change();
        let args: &[&str] = if k % 2 == 0 { &["sync"] } else { &["run"] };
        let child = billsync(&lab, args).spawn().unwrap();
        let after = Duration::from_millis(50 + world.rng.below(1500));
        let (r, p) = kill_later(&lab, child, after).await;
        running += r as u32;
        pushing += p as u32;
    }
    // The campaign's premise: kills landed in the middle of pushes.
    assert!(
        running > 0 && pushing > 0,
        "no kill landed while pushing ({running} while running, {pushing} pushing)"
    );
    faults.clear();
    let mut syncs = 0;
    loop {
        syncs += 1;
        let status = billsync(&lab, &["sync"]).status().unwrap();
        if status.code() == Some(0) {
            break;
        }
        assert!(syncs < 10, "no convergence after {syncs} syncs ({status})");
    }
    println!(
        "campaign: {kills} kills ({running} while running, {pushing} while pushing), \
         {} VMS requests, {syncs} syncs to converge, {:.0?}",
        lab.vms.served(),
        t.elapsed()
    );
    let wanted = world.wanted();
    let hd = |w: &Want| matches!(w, Want::Active { groups, .. } if groups.contains("hd-cameras"));
    assert!(
        wanted.values().any(hd),
        "the premise: some active account ends on Video 30"
    );
    let users = lab.vms.data().users.clone();
    for (login, want) in &wanted {
        let u = users.get(login);
        match (want, u) {
            (Want::Active { paying, groups }, Some(u)) => {
                assert_eq!(u.status, "active", "{login}");
                for p in MANAGED {
                    assert_eq!(u.permissions.contains(p), *paying, "{login} {p}");
                }
                assert_eq!(&u.camera_groups, groups, "{login}");
            }
            (Want::Active { .. }, None) => panic!("{login} was never created"),
            (Want::BlockedOrAbsent, Some(u)) => {
                assert_eq!(u.status, "blocked", "{login} left {}", u.status);
                assert!(
                    MANAGED.iter().all(|p| !u.permissions.contains(*p)),
                    "{login}"
                );
                assert!(
                    u.camera_groups.is_empty(),
                    "{login} kept {:?}",
                    u.camera_groups
                );
            }
            (Want::BlockedOrAbsent, None) => {}
        }
    }
    for login in users.keys() {
        assert!(
            wanted.contains_key(login),
            "{login} on the VMS, wanted by nobody"
        );
    }
    let mut created: BTreeMap<String, usize> = BTreeMap::new();
    for e in lab.vms.data().events.iter() {
        if e.method == "POST" && e.path == "user/manage" && (200..300).contains(&e.status) {
            *created.entry(e.login.clone()).or_default() += 1;
        }
    }
    let twice: Vec<_> = created.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "created twice: {twice:?}");
}
