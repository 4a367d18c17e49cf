//! Phases 4 and 5: which logins changed, and their plan with the safety
//! threshold. Quarantine, retry state and write-back memory are loaded once
//! per cycle (`Memory`) and passed on.

use std::collections::{HashMap, HashSet};

use super::{Engine, Intent};
use crate::core::desired::{CoreConfig, Desired, DesiredUser};
use crate::core::model::{AccountKey, OnDeleted};
use crate::core::plan::{self, Applied, Plan, PlanOptions};
use crate::store::{InDoubt, QuarantinePart, RetryInfo, Store, StoreError};

/// What the store remembers about failed and finished work, read once.
#[derive(Debug, Default)]
pub struct Memory {
    /// Quarantined users: login -> desired hash when quarantined.
    pub quarantined_users: HashMap<String, String>,
    /// Quarantined tree elements, by external id.
    pub tree_quarantined: HashSet<String>,
    pub retries: HashMap<String, RetryInfo>,
    /// Write-backs done: account -> value written.
    pub written: HashMap<AccountKey, String>,
    /// Logins whose last request's answer never came.
    pub in_doubt: Vec<InDoubt>,
    /// Accounts with paid payments whose push is still to be timed.
    pub unpushed_payments: HashSet<AccountKey>,
}

/// Past this many keys, a table is read whole rather than key by key.
const ONE_BY_ONE: usize = 1_000;

impl Memory {
    /// `accounts`: the write-backs of these alone (a targeted cycle's).
    pub async fn load(
        store: &Store,
        accounts: Option<Vec<AccountKey>>,
    ) -> Result<Self, StoreError> {
        let written = match accounts {
            Some(keys) if keys.len() <= ONE_BY_ONE => store.load_written_of(&keys).await?,
            _ => store.load_written().await?,
        };
        let mut out = Memory {
            retries: store.load_retries().await?,
            written,
            in_doubt: store.load_in_doubt().await?,
            unpushed_payments: store.accounts_with_unpushed_payments().await?,
            ..Default::default()
        };
        for q in store.load_quarantine().await? {
            match q.part {
                QuarantinePart::User => {
                    out.quarantined_users.insert(q.key, q.hash);
                }
                QuarantinePart::Tree => {
                    out.tree_quarantined.insert(q.key);
                }
            }
        }
        Ok(out)
    }

    /// Quarantine entries still standing.
    pub fn quarantined(&self) -> usize {
        self.quarantined_users.len() + self.tree_quarantined.len()
    }
}

/// The logins a cycle plans.
#[derive(Debug)]
pub struct Need {
    /// None: every login (a full cycle).
    pub logins: Option<HashSet<String>>,
}

/// Phase 4: logins whose desired hash differs from the applied one, applied
/// logins nobody desires any more, named resyncs, write-backs not done, and
/// logins in doubt.
pub async fn changed(
    store: &Store,
    core: &CoreConfig,
    desired: &Desired,
    intent: &Intent,
    memory: &Memory,
) -> Result<Need, StoreError> {
    if !intent.kind.lists() {
        return Ok(Need {
            logins: Some(targeted(desired, intent)),
        });
    }
    let mut matched: HashSet<&str> = HashSet::new();
    let mut orphans: Vec<String> = vec![];
    store
        .scan_applied_hashes(|login, hash| match desired.users.get_key_value(login) {
            Some((key, d)) if d.hash == hash => {
                matched.insert(key.as_str());
            }
            Some(_) => {}
            None => orphans.push(login.to_string()),
        })
        .await?;
    if intent.kind.is_full() {
        return Ok(Need { logins: None });
    }
    let writeback_due = |login: &String, d: &DesiredUser| {
        core.writeback.contains_key(&d.owner.source)
            && plan::writeback_due(login, d, memory.written.get(&d.owner), false)
    };
    let mut logins: HashSet<String> = desired
        .users
        .iter()
        .filter(|(login, d)| {
            !matched.contains(login.as_str())
                || intent.resync_logins.contains(*login)
                || writeback_due(login, d)
        })
        .map(|(login, _)| login.clone())
        .collect();
    // Logins already blocked because their account is gone stay so; they
    // are not re-planned each cycle for ever.
    if !orphans.is_empty() && core.on_deleted == OnDeleted::Block {
        let settled = store.deprovisioned_logins(&core.status_blocked).await?;
        orphans.retain(|l| !settled.contains(l) || intent.resync_logins.contains(l));
    }
    logins.extend(orphans);
    logins.extend(intent.reverify_logins.iter().cloned());
    logins.extend(memory.in_doubt.iter().map(|d| d.login.clone()));
    Ok(Need {
        logins: Some(logins),
    })
}

/// A targeted cycle plans only what it targets: the named logins and the
/// users of the accounts it re-read. Everything else is the listing lane's,
/// which may be pushing it right now.
pub fn targeted(desired: &Desired, intent: &Intent) -> HashSet<String> {
    let mut logins = intent.resync_logins.clone();
    let owned = desired.users.iter();
    let owned = owned.filter(|(_, d)| intent.accounts.contains(&d.owner));
    logins.extend(owned.map(|(login, _)| login.clone()));
    logins
}

/// A cycle's plan, with what the push needs to know about it.
#[derive(Debug)]
pub struct Planned {
    pub plan: Plan,
    /// The applied state of the planned logins, before the push.
    pub applied: Applied,
    /// Logins left pending because they are backing off.
    pub backing_off: usize,
}

/// Logins left alone this cycle, and quarantines the desired state lifted.
struct Holds {
    skip: HashSet<String>,
    release: Vec<String>,
    backing_off: usize,
}

/// Quarantined logins wait until their desired user changes; logins backing
/// off wait for their time, unless this cycle resyncs them. A targeted
/// cycle knows the desired users of its `scope` alone: the quarantines of
/// the others are the listing lane's to judge.
fn holds(
    desired: &Desired,
    memory: &Memory,
    intent: &Intent,
    scope: Option<&HashSet<String>>,
) -> Holds {
    let mut skip = HashSet::new();
    let mut release = vec![];
    let judged = memory.quarantined_users.iter();
    for (login, hash) in judged.filter(|(l, _)| scope.is_none_or(|s| s.contains(*l))) {
        match desired.users.get(login) {
            Some(d) if d.hash == *hash => skip.insert(login.clone()),
            _ => {
                release.push(login.clone());
                false
            }
        };
    }
    if !intent.kind.is_full() {
        for (login, r) in &memory.retries {
            if r.next_attempt_at > intent.started && !intent.resync_logins.contains(login) {
                skip.insert(login.clone());
            }
        }
    }
    let backing_off = skip
        .iter()
        .filter(|l| memory.retries.contains_key(*l))
        .count();
    Holds {
        skip,
        release,
        backing_off,
    }
}

impl Engine {
    /// Phase 5: the plan of the needed logins, deprovisions held over the
    /// safety threshold unless approved.
    pub(super) async fn plan_with_safety(
        &self,
        store: &Store,
        desired: &Desired,
        need: &Need,
        intent: &Intent,
        memory: &mut Memory,
    ) -> Result<Planned, StoreError> {
        let applied = Applied {
            users: store.load_applied_users(need.logins.as_ref()).await?,
            tree: applied_tree(store, desired, intent).await?,
            written: std::mem::take(&mut memory.written),
            in_doubt: (memory.in_doubt.iter())
                .map(|d| (d.login.clone(), d.user.clone()))
                .collect(),
        };
        let scope = need.logins.as_ref().filter(|_| !intent.kind.lists());
        let mut holds = holds(desired, memory, intent, scope);
        // Just after a takeover, the old leader's late requests may still
        // land: its logins in doubt wait (SPEC §13).
        if self.gate.as_ref().is_some_and(|g| !g.may_push_in_doubt()) {
            holds
                .skip
                .extend(memory.in_doubt.iter().map(|d| d.login.clone()));
        }
        for login in &holds.release {
            memory.quarantined_users.remove(login);
        }
        if !intent.dry_run && !holds.release.is_empty() {
            store.release_quarantine(Some(&holds.release)).await?;
        }
        let subset = need.logins.as_ref().map(|n| desired.subset(n));
        let opts = PlanOptions {
            full: intent.kind.is_full(),
            full_logins: intent
                .resync_logins
                .union(&intent.reverify_logins)
                .cloned()
                .collect(),
            skip: holds.skip,
        };
        let mut plan = plan::plan(
            &self.core,
            subset.as_ref().unwrap_or(desired),
            &applied,
            &opts,
        );
        let limit = self.safety_limit(store, &plan).await?;
        plan::apply_safety(&self.core, &mut plan, &applied, limit, &intent.approval);
        if !plan.held.is_empty() {
            tracing::warn!(
                held = plan.held.len(),
                limit,
                "deprovisions exceed the safety threshold and are held; approve with `billsync approve`"
            );
        }
        Ok(Planned {
            plan,
            applied,
            backing_off: holds.backing_off,
        })
    }

    /// The deprovisions a plan may make unapproved. Counting every live
    /// user costs a scan: only a plan that deprovisions needs it.
    async fn safety_limit(&self, store: &Store, plan: &Plan) -> Result<usize, StoreError> {
        let live = match plan.ops.iter().any(|o| o.deprovision) {
            true => store.count_live_users(&self.core.status_active).await?,
            false => 0,
        };
        let safety = &self.settings.safety;
        Ok(plan::threshold(
            safety.max_deprovision,
            safety.max_deprovision_ratio,
            live as usize,
        ))
    }
}

/// The applied tree elements the plan compares: a targeted cycle's scope
/// names a few, read one by one.
async fn applied_tree(
    store: &Store,
    desired: &Desired,
    intent: &Intent,
) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
    if intent.kind.lists() || desired.tree.len() > ONE_BY_ONE {
        return store.load_tree().await;
    }
    let ids: Vec<&str> = desired.tree.keys().map(String::as_str).collect();
    store.load_tree_of(&ids).await
}
