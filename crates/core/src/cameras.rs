//! Camera access (SPEC §12.3): the public groups a user should hold, what
//! "keep" means against the applied set, and the request one op makes.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::entitlements::{render_groups, MissingPlaceholder};
use super::model::{Account, AccountKey, Cameras, UserState};
use super::plan::AppliedUser;
use super::rules::Rule;

/// `vms.cameras.on_block`: what a user's set becomes while its account is
/// not active.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBlock {
    /// The set last applied stays (the VMS shows the user blocked).
    #[default]
    Keep,
    /// Blocking also empties the set.
    Clear,
}

/// `[vms.cameras]` as the core reads it; `CoreConfig::cameras` is None
/// while camera access is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CameraPolicy {
    pub on_block: OnBlock,
    /// `vms.tree.enabled`: an active account's own tree element is in its set.
    pub own_group: bool,
}

/// An account's desired set: for an active account, the groups of the
/// rules it matched plus its own tree element; otherwise kept or emptied
/// as `on_block` says. A template without a value keeps the applied set;
/// the error comes back to be reported.
pub fn desired(
    policy: CameraPolicy,
    account: &Account,
    active: bool,
    matched: &[&Rule],
) -> (Cameras, Option<MissingPlaceholder>) {
    let owner = account.key.clone();
    let kept = |owner| Cameras {
        owner,
        groups: Default::default(),
        kept: true,
    };
    if !active {
        return match policy.on_block {
            OnBlock::Keep => (kept(owner), None),
            OnBlock::Clear => (emptied(owner), None),
        };
    }
    let templates = matched.iter().flat_map(|r| &r.camera_groups);
    match render_groups(templates, account) {
        Ok(mut groups) => {
            if policy.own_group {
                groups.insert(account.billing_id.clone());
            }
            let groups = Arc::new(groups);
            let set = Cameras {
                owner,
                groups,
                kept: false,
            };
            (set, None)
        }
        Err(e) => (kept(owner), Some(e)),
    }
}

/// No group at all, for `owner`.
pub fn emptied(owner: AccountKey) -> Cameras {
    Cameras {
        owner,
        groups: Default::default(),
        kept: false,
    }
}

/// What the diff and the hash compare of a set. While it is kept, its
/// groups are whatever was applied, so they are not compared.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Compared<'a> {
    owner: &'a AccountKey,
    kept: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    groups: Option<&'a BTreeSet<String>>,
}

pub fn compared(c: &Cameras) -> Compared<'_> {
    Compared {
        owner: &c.owner,
        kept: c.kept,
        groups: (!c.kept).then_some(&*c.groups),
    }
}

/// Whether two states differ in what is compared of their sets.
pub fn changed(applied: &UserState, target: &UserState) -> bool {
    applied.cameras.as_ref().map(compared) != target.cameras.as_ref().map(compared)
}

/// A kept target takes the groups `last` holds for the same owner; the
/// groups of another owner are never kept (SPEC §12.3).
pub fn resolve(target: &mut UserState, last: Option<&AppliedUser>) {
    let Some(t) = target.cameras.as_mut().filter(|t| t.kept) else {
        return;
    };
    let before = last.and_then(|k| k.state.cameras.as_ref());
    if let Some(b) = before.filter(|b| b.owner == t.owner) {
        t.groups = b.groups.clone();
    }
}

/// The `user/manage/cameras` request of one op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CameraStep {
    /// The set applied before the op; None: not known (never managed, or
    /// a user billsync did not create).
    pub before: Option<Cameras>,
    /// Groups of `before` the target drops: a removal, so a deprovision;
    /// the object format sends them once more as blocked.
    pub removed: BTreeSet<String>,
    /// Another account held the login: the set is replaced before the
    /// user is activated or given any permission.
    pub first: bool,
}

impl CameraStep {
    fn new(before: Option<&Cameras>, target: &Cameras, first: bool) -> Self {
        let removed = before.map_or_else(BTreeSet::new, |b| {
            b.groups.difference(&target.groups).cloned().collect()
        });
        CameraStep {
            before: before.cloned(),
            removed,
            first,
        }
    }
}

/// The step of an update from `last`: when the set differs, or in every
/// full-state push. A kept set nobody knows is not sent (an empty set
/// goes out only when the rules say so).
pub fn update_step(last: &AppliedUser, target: &UserState, full: bool) -> Option<CameraStep> {
    let t = target.cameras.as_ref()?;
    let before = last.state.cameras.as_ref();
    let other_owner = last.owner != t.owner || before.is_some_and(|b| b.owner != t.owner);
    match before {
        _ if other_owner => Some(CameraStep::new(before, t, true)),
        None if t.kept => None,
        Some(b) if b.groups == t.groups && !full => None,
        _ => Some(CameraStep::new(before, t, false)),
    }
}

/// The step of a create: its set, unless it is kept (a new user has none
/// to keep). A login in doubt for another owner is replaced all the same.
pub fn create_step(target: &UserState, doubt: Option<&AppliedUser>) -> Option<CameraStep> {
    let t = target.cameras.as_ref()?;
    let other_owner = doubt.is_some_and(|d| d.owner != t.owner);
    (!t.kept || other_owner).then(|| CameraStep::new(None, t, other_owner))
}

/// The set a held update may still send: additions go, removals wait.
/// None: the update cannot be split (another owner's groups would stay).
pub fn without_removals(last: &AppliedUser, target: &UserState) -> Option<Option<Cameras>> {
    let Some(t) = &target.cameras else {
        return Some(last.state.cameras.clone());
    };
    match &last.state.cameras {
        _ if last.owner != t.owner => None,
        Some(b) if b.owner != t.owner => None,
        Some(b) => {
            let groups = b.groups.union(&t.groups).cloned().collect();
            Some(Some(Cameras {
                groups: Arc::new(groups),
                ..t.clone()
            }))
        }
        None => Some(Some(t.clone())),
    }
}

/// The set of a login nobody desires any more: kept, or emptied, as
/// `on_block` says (None while camera access is off).
pub fn gone(policy: Option<CameraPolicy>, last: &AppliedUser) -> Option<Cameras> {
    match policy?.on_block {
        OnBlock::Keep => (last.state.cameras.clone()).map(|c| Cameras { kept: true, ..c }),
        OnBlock::Clear => Some(emptied(last.owner.clone())),
    }
}

/// The step a push that states the whole target makes when its op
/// planned none (its applied state moved meanwhile): the target set,
/// unless it is a kept set nobody knows.
pub fn restate(target: &UserState) -> Option<CameraStep> {
    let t = target.cameras.as_ref()?;
    (!t.kept || !t.groups.is_empty()).then(|| CameraStep::new(None, t, false))
}
