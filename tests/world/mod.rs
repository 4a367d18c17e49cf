//! The changing world of the campaigns (`tests/campaign.rs`,
//! `tests/failover.rs`): both billing systems edited at random, and what
//! the VMS must hold once everything converged, worked out from the
//! emulators' data alone.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use billsync_emulators::activeplatform::{ApAccount, ApSubscription};
use billsync_emulators::billmanager::BmAccount;
use billsync_emulators::lab::Lab;
use billsync_emulators::Seq;

const MANAGED: [&str; 3] = [
    "archives-download",
    "archives-preview-download",
    "archives-show",
];

/// What the VMS must hold for one login once everything converged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
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
pub const EXTRA: &str = r#"
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

/// The campaigns' lab: the plans the rules name, and the config with
/// `EXTRA`, a VMS timeout of 1 s (in-doubt logins are decided sooner), one
/// grace cycle for a missing account, and cycles every second: the faults
/// must land in many cycles.
pub fn prepare(lab: &Lab) {
    {
        let mut ap = lab.ap.data();
        ap.plans.insert(7, "Video 7".into());
        ap.plans.insert(30, "Video 30".into());
    }
    let text = lab
        .config_text(EXTRA)
        .replace(
            "timeout_secs = 5\nconcurrency",
            "timeout_secs = 1\nconcurrency",
        )
        .replace("[daemon]", "[daemon]\nmissing_grace_cycles = 1")
        .replace("*/2 * * * * *", "* * * * * *");
    lab.write_config_text(&text);
}

/// The changing world: both billing systems, and every login ever used.
pub struct World<'a> {
    pub lab: &'a Lab,
    pub rng: Seq,
    pub next_bm: u64,
    pub next_ap: u64,
    pub next_sub: u64,
    pub old_logins: BTreeSet<String>,
}

impl<'a> World<'a> {
    /// The lab's world, edited from now on by a sequence drawn from `seed`.
    pub fn new(lab: &'a Lab, seed: u64) -> Self {
        World {
            lab,
            rng: Seq::new(seed),
            next_bm: 1000,
            next_ap: 3_000_000,
            next_sub: 0,
            old_logins: BTreeSet::new(),
        }
    }
}

impl World<'_> {
    /// A few random edits: new accounts, money, suspensions, deletions,
    /// removals, e-mail changes.
    pub fn change(&mut self) {
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
    pub fn wanted(&self) -> BTreeMap<String, Want> {
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

impl World<'_> {
    /// The VMS holds exactly the desired state (`converged`); fails the
    /// test with the first difference.
    pub fn assert_converged(&self) {
        if let Err(why) = self.converged() {
            panic!("{why}");
        }
    }

    /// Whether the VMS holds exactly the desired state: every wanted login
    /// as wanted, old logins of e-mail changes blocked, nobody else, and no
    /// login created twice; else the first difference.
    pub fn converged(&self) -> Result<(), String> {
        let wanted = self.wanted();
        let hd =
            |w: &Want| matches!(w, Want::Active { groups, .. } if groups.contains("hd-cameras"));
        ensure(wanted.values().any(hd), || {
            "the premise: some active account ends on Video 30".into()
        })?;
        let users = self.lab.vms.data().users.clone();
        for (login, want) in &wanted {
            user_as_wanted(login, want, users.get(login))?;
        }
        for login in users.keys() {
            ensure(wanted.contains_key(login), || {
                format!("{login} on the VMS, wanted by nobody")
            })?;
        }
        let mut created: BTreeMap<String, usize> = BTreeMap::new();
        for e in self.lab.vms.data().events.iter() {
            if e.method == "POST" && e.path == "user/manage" && (200..300).contains(&e.status) {
                *created.entry(e.login.clone()).or_default() += 1;
            }
        }
        let twice: Vec<_> = created.iter().filter(|(_, n)| **n > 1).collect();
        ensure(twice.is_empty(), || format!("created twice: {twice:?}"))
    }
}

fn ensure(ok: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(why())
    }
}

fn user_as_wanted(
    login: &str,
    want: &Want,
    user: Option<&billsync_emulators::vms::VmsUser>,
) -> Result<(), String> {
    match (want, user) {
        (Want::Active { paying, groups }, Some(u)) => {
            ensure(u.status == "active", || format!("{login} is {}", u.status))?;
            for p in MANAGED {
                ensure(u.permissions.contains(p) == *paying, || {
                    format!("{login} {p}: wanted {paying}")
                })?;
            }
            ensure(&u.camera_groups == groups, || {
                format!("{login} has {:?}, wanted {groups:?}", u.camera_groups)
            })
        }
        (Want::Active { .. }, None) => Err(format!("{login} was never created")),
        (Want::BlockedOrAbsent, Some(u)) => {
            ensure(u.status == "blocked", || {
                format!("{login} left {}", u.status)
            })?;
            ensure(MANAGED.iter().all(|p| !u.permissions.contains(*p)), || {
                format!("{login} kept a managed permission")
            })?;
            ensure(u.camera_groups.is_empty(), || {
                format!("{login} kept {:?}", u.camera_groups)
            })
        }
        (Want::BlockedOrAbsent, None) => Ok(()),
    }
}
