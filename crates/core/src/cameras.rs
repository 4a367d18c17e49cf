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
    /// `others`: what else the VMS may hold (a request in doubt), whose
    /// groups the target lacks are removed too.
    fn new(before: Option<&Cameras>, others: &[&Cameras], target: &Cameras, first: bool) -> Self {
        let held = before.into_iter().chain(others.iter().copied());
        let removed = held
            .flat_map(|c| c.groups.iter())
            .filter(|g| !target.groups.contains(*g))
            .cloned()
            .collect();
        CameraStep {
            before: before.cloned(),
            removed,
            first,
        }
    }
}

/// Whether a record (applied or in doubt) is another account's.
fn others_record(record: &AppliedUser, owner: &AccountKey) -> bool {
    record.owner != *owner || (record.state.cameras.as_ref()).is_some_and(|c| c.owner != *owner)
}

/// A kept set with no group: unknown, or known empty; sending it could
/// only wipe what someone assigned by hand.
fn nothing_to_restate(t: &Cameras) -> bool {
    t.kept && t.groups.is_empty()
}

/// The step of an update from `last` (and what a request in doubt may
/// have left): when the set differs, or in every full-state push; first
/// when another account held the login, in either record.
pub fn update_step(
    last: &AppliedUser,
    doubt: Option<&AppliedUser>,
    target: &UserState,
    full: bool,
) -> Option<CameraStep> {
    let t = target.cameras.as_ref()?;
    let before = last.state.cameras.as_ref();
    let other_owner =
        others_record(last, &t.owner) || doubt.is_some_and(|d| others_record(d, &t.owner));
    let doubted: Vec<&Cameras> = doubt
        .and_then(|d| d.state.cameras.as_ref())
        .into_iter()
        .collect();
    match before {
        _ if other_owner => Some(CameraStep::new(before, &doubted, t, true)),
        _ if nothing_to_restate(t) => None,
        Some(b) if b.groups == t.groups && !full && doubted.is_empty() => None,
        _ => Some(CameraStep::new(before, &doubted, t, false)),
    }
}

/// The step of a create: its set, unless it is kept (a new user has none
/// to keep). A login in doubt for another owner is replaced all the same.
pub fn create_step(target: &UserState, doubt: Option<&AppliedUser>) -> Option<CameraStep> {
    let t = target.cameras.as_ref()?;
    let other_owner = doubt.is_some_and(|d| others_record(d, &t.owner));
    let doubted: Vec<&Cameras> = doubt
        .and_then(|d| d.state.cameras.as_ref())
        .into_iter()
        .collect();
    (!t.kept || other_owner).then(|| CameraStep::new(None, &doubted, t, other_owner))
}

/// The step of a push whose applied state moved since it was planned (the
/// other lane pushed meanwhile): the target set first, removing whatever
/// the current record or the plan knew of.
pub fn stale_step(
    current: Option<&AppliedUser>,
    planned: Option<&CameraStep>,
    target: &UserState,
) -> Option<CameraStep> {
    let t = target.cameras.as_ref()?;
    let other_owner = current.is_some_and(|c| others_record(c, &t.owner));
    if nothing_to_restate(t) && !other_owner {
        return None;
    }
    let before = current.and_then(|c| c.state.cameras.as_ref());
    let planned_before = planned.and_then(|p| p.before.as_ref());
    Some(CameraStep::new(
        before,
        &planned_before.into_iter().collect::<Vec<_>>(),
        t,
        true,
    ))
}

/// The step of an adoption: whose groups an existing user holds is not
/// known, so its set is replaced first, kept or not.
pub fn adopt_step(planned: Option<&CameraStep>, target: &UserState) -> Option<CameraStep> {
    let t = target.cameras.as_ref()?;
    let mut step = planned
        .cloned()
        .unwrap_or_else(|| CameraStep::new(None, &[], t, true));
    step.first = true;
    Some(step)
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
    (!nothing_to_restate(t)).then(|| CameraStep::new(None, &[], t, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SourceKind;

    fn key(id: &str) -> AccountKey {
        AccountKey {
            source: SourceKind::Activeplatform,
            id: id.into(),
        }
    }

    fn set(owner: &str, groups: &[&str], kept: bool) -> Cameras {
        Cameras {
            owner: key(owner),
            groups: Arc::new(groups.iter().map(|g| g.to_string()).collect()),
            kept,
        }
    }

    fn state(cameras: Cameras) -> UserState {
        UserState {
            user_type: "b2c".into(),
            status: "active".into(),
            billing_id: "x".into(),
            properties: vec![],
            permissions: Default::default(),
            gone: false,
            cameras: Some(cameras),
        }
    }

    fn record(owner: &str, cameras: Cameras) -> AppliedUser {
        AppliedUser {
            owner: key(owner),
            state: state(cameras),
        }
    }

    /// The old owner's groups, only in a request whose answer never came,
    /// still make the set go first and are removed.
    #[test]
    fn a_request_in_doubt_for_another_owner_is_replaced_first() {
        let applied = record("b", set("b", &["own-b"], false));
        let doubt = record("a", set("a", &["own-a"], false));
        let target = state(set("b", &["own-b"], false));
        let step = update_step(&applied, Some(&doubt), &target, true).unwrap();
        assert!(step.first);
        assert_eq!(step.removed, BTreeSet::from(["own-a".to_string()]));
    }

    /// A kept set with no group is never sent, not even by a full push: it
    /// would wipe groups assigned by hand.
    #[test]
    fn an_empty_kept_set_is_never_sent() {
        let applied = record("a", set("a", &[], true));
        let target = state(set("a", &[], true));
        assert_eq!(update_step(&applied, None, &target, true), None);
        assert_eq!(restate(&target), None);
        assert_eq!(stale_step(Some(&applied), None, &target), None);
        // Another owner's record is replaced all the same.
        let theirs = record("b", set("b", &["own-b"], false));
        let step = update_step(&theirs, None, &target, false).unwrap();
        assert!(step.first && step.removed.contains("own-b"));
        // An adoption replaces whatever the existing user held.
        assert!(adopt_step(None, &target).unwrap().first);
    }

    /// A stale push states its set first and removes what the current
    /// record holds, which the plan did not know.
    #[test]
    fn a_stale_push_removes_what_the_other_lane_added() {
        let now = record("a", set("a", &["own-a", "hd"], false));
        let target = state(set("a", &["own-a"], false));
        let step = stale_step(Some(&now), None, &target).unwrap();
        assert!(step.first);
        assert_eq!(step.removed, BTreeSet::from(["hd".to_string()]));
    }
}
