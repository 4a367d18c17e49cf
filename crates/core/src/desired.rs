//! Desired users (SPEC §2.1 steps 4–5, §2.2): one per login, owned by the
//! source that comes first in `sources.priority`, with the missing-account
//! grace applied and permissions from the rules.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::cameras::{self, CameraPolicy};
use super::entitlements::{MissingPlaceholder, Service};
use super::model::{Account, AccountKey, CanonicalStatus, OnDeleted, SourceKind, UserState};
use super::rules::{self, Rule, RuleContext};

/// The settings the core reads, in its own types (`Settings::core_config`).
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub priority: Vec<SourceKind>,
    pub missing_grace_cycles: u32,
    pub rules: Vec<Rule>,
    pub managed: Vec<String>,
    pub user_type: String,
    pub properties: Vec<String>,
    pub status_active: String,
    pub status_blocked: String,
    pub on_deleted: OnDeleted,
    /// `Some(type)` when tree sync is on.
    pub tree_type: Option<String>,
    /// Sources that take a write-back of the login, and into which attribute.
    pub writeback: BTreeMap<SourceKind, String>,
    /// `Some` when billsync owns the users' public camera groups.
    pub cameras: Option<CameraPolicy>,
}

impl Desired {
    /// The same desired state limited to `logins` (tree, conflicts and
    /// source flags kept whole): what a cycle plans when most users match
    /// their applied hash.
    pub fn subset(&self, logins: &HashSet<String>) -> Desired {
        Desired {
            users: self
                .users
                .iter()
                .filter(|(l, _)| logins.contains(*l))
                .map(|(l, u)| (l.clone(), u.clone()))
                .collect(),
            tree: self.tree.clone(),
            conflicts: self.conflicts.clone(),
            incomplete: self.incomplete.clone(),
            protected: self.protected.clone(),
            fresh: self.fresh.clone(),
            camera_errors: vec![],
        }
    }
}

impl Desired {
    /// A frozen source keeps its logins (SPEC §9.4): `kept` maps each login
    /// whose applied owner is a frozen source to that owner. No account of
    /// another source takes such a login over: it is a conflict, lost to the
    /// frozen owner, and its user is not pushed.
    pub fn keep_frozen(&mut self, kept: &BTreeMap<String, AccountKey>) {
        for (login, owner) in kept {
            let Some(user) = self.users.get(login) else {
                continue;
            };
            if user.owner.source == owner.source {
                continue;
            }
            let loser = user.owner.clone();
            self.users.remove(login);
            self.conflicts.push(Conflict {
                login: login.clone(),
                winner: owner.clone(),
                loser,
            });
        }
        (self.conflicts).sort_by(|a, b| (&a.login, &a.loser).cmp(&(&b.login, &b.loser)));
    }
}

/// One source's contribution to a cycle.
#[derive(Debug, Clone, Default)]
pub struct SourceInput {
    pub complete: bool,
    pub accounts: Vec<Account>,
    pub missing: HashMap<String, u32>,
    pub last_paid: HashMap<String, DateTime<Utc>>,
    /// Listed this cycle but not usable (invalid, details unavailable):
    /// whatever they own is left alone.
    pub protected: HashSet<String>,
    /// Re-read one by one this cycle (a targeted read): their own state is
    /// known for sure even though the source was not listed.
    pub fresh: HashSet<String>,
    /// What each account bought, by account id, states settled (SPEC §12;
    /// empty while no services are read).
    pub services: HashMap<String, Vec<Service>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DesiredUser {
    pub login: String,
    pub owner: AccountKey,
    pub state: UserState,
    /// `content_hash(state)`: equal to the applied hash means nothing to do.
    pub hash: String,
    /// Names of the matching rules (shared, like the permission sets).
    pub rules: Arc<Vec<String>>,
    /// The account's current write-back attribute value, if it has one.
    pub writeback_seen: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub login: String,
    pub winner: AccountKey,
    pub loser: AccountKey,
}

#[derive(Debug, Clone, Default)]
pub struct Desired {
    pub users: BTreeMap<String, DesiredUser>,
    /// Tree elements: external_id -> name.
    pub tree: BTreeMap<String, String>,
    pub conflicts: Vec<Conflict>,
    pub incomplete: BTreeSet<SourceKind>,
    pub protected: HashSet<AccountKey>,
    /// Accounts of incomplete sources re-read this cycle: what their state
    /// says (suspended, unpaid) may be applied; absence still may not.
    pub fresh: HashSet<AccountKey>,
    /// Accounts whose camera group template has no value: their users'
    /// sets stay as applied (SPEC §12.2).
    pub camera_errors: Vec<(AccountKey, MissingPlaceholder)>,
}

/// Builds the desired state from every source's accounts.
pub fn build(
    cfg: &CoreConfig,
    mut inputs: BTreeMap<SourceKind, SourceInput>,
    now: DateTime<Utc>,
) -> Desired {
    let mut out = Desired::default();
    let winners = owners(cfg, &inputs, &mut out.conflicts);
    out.conflicts
        .sort_by(|a, b| (&a.login, &a.loser).cmp(&(&b.login, &b.loser)));
    // Pass 2: desired users for the owners, consuming the accounts so their
    // memory is reused rather than doubled.
    let mut shared = Shared::default();
    for (kind, input) in inputs.iter_mut() {
        if !input.complete {
            out.incomplete.insert(*kind);
        }
        let key = |id: &String| AccountKey {
            source: *kind,
            id: id.clone(),
        };
        out.protected.extend(input.protected.iter().map(key));
        out.fresh.extend(input.fresh.iter().map(key));
        let accounts = std::mem::take(&mut input.accounts);
        let ctx = RuleContext {
            last_paid: &input.last_paid,
            services: &input.services,
            now,
        };
        for (i, account) in accounts.into_iter().enumerate() {
            if !winners.contains(&(*kind, i)) {
                continue;
            }
            let status = effective(cfg, input, &account);
            if status != CanonicalStatus::Deleted && cfg.tree_type.is_some() {
                out.tree.insert(
                    account.billing_id.clone(),
                    account
                        .name
                        .clone()
                        .unwrap_or_else(|| account.login.clone()),
                );
            }
            let (user, camera_error) = desired_user(cfg, account, status, &ctx, &mut shared);
            if let Some(e) = camera_error {
                out.camera_errors.push((user.owner.clone(), e));
            }
            out.users.insert(user.login.clone(), user);
        }
    }
    out
}

/// An account's status with the missing-account grace applied. Missing
/// counts move only on complete listings, so they stand when this cycle's
/// listing failed: a deleted account stays deleted (an outage must not
/// revive it), and an incomplete source still deprovisions nothing new
/// (`may_deprovision`).
fn effective(cfg: &CoreConfig, input: &SourceInput, account: &Account) -> CanonicalStatus {
    let missing = input.missing.get(&account.key.id).copied().unwrap_or(0);
    if missing > 0 && missing >= cfg.missing_grace_cycles {
        CanonicalStatus::Deleted
    } else {
        account.status
    }
}

/// Pass 1: the owner of each login, as `(source, index)`. Lower rank wins:
/// live accounts before deleted ones, then source priority, then account
/// id. Borrowed strings only; everyone but the owner is a conflict.
fn owners(
    cfg: &CoreConfig,
    inputs: &BTreeMap<SourceKind, SourceInput>,
    conflicts: &mut Vec<Conflict>,
) -> HashSet<(SourceKind, usize)> {
    let prio = |kind: &SourceKind| {
        cfg.priority
            .iter()
            .position(|p| p == kind)
            .unwrap_or(usize::MAX)
    };
    type Rank<'a> = (bool, usize, &'a str);
    let mut owner: HashMap<&str, (Rank<'_>, SourceKind, usize)> = HashMap::new();
    for (kind, input) in inputs {
        for (i, account) in input.accounts.iter().enumerate() {
            let dead = effective(cfg, input, account) == CanonicalStatus::Deleted;
            let rank = (dead, prio(kind), account.key.id.as_str());
            owner
                .entry(account.login.as_str())
                .and_modify(|best| {
                    if rank < best.0 {
                        *best = (rank, *kind, i);
                    }
                })
                .or_insert((rank, *kind, i));
        }
    }
    let mut winners = HashSet::new();
    for (kind, input) in inputs {
        for (i, account) in input.accounts.iter().enumerate() {
            let Some(&(_, wkind, wi)) = owner.get(account.login.as_str()) else {
                continue;
            };
            if (wkind, wi) == (*kind, i) {
                winners.insert((wkind, wi));
            } else {
                conflicts.push(Conflict {
                    login: account.login.clone(),
                    winner: inputs[&wkind].accounts[wi].key.clone(),
                    loser: account.key.clone(),
                });
            }
        }
    }
    winners
}

/// Interned permission sets and rule lists: one allocation per distinct value.
#[derive(Default)]
struct Shared {
    permissions: HashMap<BTreeSet<String>, Arc<BTreeSet<String>>>,
    rules: HashMap<Vec<String>, Arc<Vec<String>>>,
}

fn intern<T: std::hash::Hash + Eq + Clone>(map: &mut HashMap<T, Arc<T>>, value: T) -> Arc<T> {
    map.entry(value.clone())
        .or_insert_with(|| Arc::new(value))
        .clone()
}

fn desired_user(
    cfg: &CoreConfig,
    mut account: Account,
    status: CanonicalStatus,
    ctx: &RuleContext<'_>,
    shared: &mut Shared,
) -> (DesiredUser, Option<MissingPlaceholder>) {
    // `status` is the account's own, or Deleted: rules only see active ones.
    let active = status == CanonicalStatus::Active;
    let (permissions, matched) = match active {
        true => rules::grants(&cfg.rules, &cfg.managed, &account, ctx),
        false => (BTreeSet::new(), vec![]),
    };
    let (cameras, camera_error) = match cfg.cameras {
        Some(policy) => {
            let (set, error) = cameras::desired(policy, &account, active, &matched);
            (Some(set), error)
        }
        None => (None, None),
    };
    let permissions = intern(&mut shared.permissions, permissions);
    let names = matched.iter().map(|r| r.name.clone()).collect();
    let matched = intern(&mut shared.rules, names);
    let mut properties: Vec<(String, String)> = cfg
        .properties
        .iter()
        .filter_map(|p| {
            let value = match p.as_str() {
                "phone" => account.phone.take(),
                "email" => account.email.take(),
                "name" => account.name.take(),
                _ => None,
            }?;
            Some((p.clone(), value))
        })
        .collect();
    properties.sort();
    let vms_status = match status {
        CanonicalStatus::Active => cfg.status_active.clone(),
        _ => cfg.status_blocked.clone(),
    };
    let state = UserState {
        user_type: cfg.user_type.clone(),
        status: vms_status,
        billing_id: std::mem::take(&mut account.billing_id),
        properties,
        permissions,
        gone: status == CanonicalStatus::Deleted,
        cameras,
    };
    let writeback_seen = cfg
        .writeback
        .get(&account.key.source)
        .and_then(|a| account.attributes.remove(a));
    let user = DesiredUser {
        login: account.login,
        owner: account.key,
        hash: super::plan::state_hash(&state),
        state,
        rules: matched,
        writeback_seen,
    };
    (user, camera_error)
}
