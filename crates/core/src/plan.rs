//! The diff of desired against applied, as operations (SPEC §2.1 step 6,
//! §2.2, §2.3), and the deprovision safety hold (step 7).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::cameras::{self, CameraStep};
use super::desired::{CoreConfig, Desired, DesiredUser};
use super::model::{AccountKey, OnDeleted, UserState};

/// The fields of a user the diff compares, and nothing else. `user_type` is
/// not among them: the VMS cannot change it for an existing user.
#[derive(Serialize)]
struct Compared<'a> {
    status: &'a str,
    billing_id: &'a str,
    properties: &'a [(String, String)],
    permissions: &'a BTreeSet<String>,
    gone: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    cameras: Option<cameras::Compared<'a>>,
}

/// The one definition of "changed": two states with equal hashes yield no
/// operation, and two that yield none have equal hashes (property-tested).
pub fn state_hash(s: &UserState) -> String {
    super::model::content_hash(&Compared {
        status: &s.status,
        billing_id: &s.billing_id,
        properties: &s.properties,
        permissions: &s.permissions,
        gone: s.gone,
        cameras: s.cameras.as_ref().map(cameras::compared),
    })
}

/// What billsync last confirmed the VMS accepted for one login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedUser {
    pub owner: AccountKey,
    pub state: UserState,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    pub users: BTreeMap<String, AppliedUser>,
    /// Tree elements: external_id -> name.
    pub tree: BTreeMap<String, String>,
    /// Write-backs done: account -> value written.
    pub written: HashMap<AccountKey, String>,
    /// Logins whose last request's answer never came, with the state it
    /// asked for: the VMS may or may not hold it.
    pub in_doubt: BTreeMap<String, AppliedUser>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    /// POST, then a PATCH attaching `target.permissions`. A 422 on the login
    /// adopts the existing user with a full-state PATCH.
    Create,
    /// PATCH with the full profile and the permission changes.
    Update {
        attach: BTreeSet<String>,
        detach: BTreeSet<String>,
        /// Names of what changed, for people: status, billing_info, properties.
        changes: Vec<String>,
        /// A full-state push (resync or adoption): re-create if unknown.
        full: bool,
    },
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub login: String,
    pub owner: AccountKey,
    pub action: Action,
    /// The state the VMS should have after this op.
    pub target: UserState,
    /// Blocks, deletes, detaches a managed permission or removes a
    /// camera group.
    pub deprovision: bool,
    /// The camera access request this op makes (SPEC §12.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cameras: Option<CameraStep>,
}

impl Op {
    /// The SPEC §6a action name: create, update, block or delete.
    pub fn label(&self, status_blocked: &str) -> &'static str {
        match &self.action {
            Action::Create => "create",
            Action::Delete => "delete",
            Action::Update { changes, .. }
                if changes.iter().any(|c| c == "status")
                    && self.target.status == status_blocked =>
            {
                "block"
            }
            Action::Update { .. } => "update",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeOp {
    pub external_id: String,
    pub name: String,
    pub create: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritebackOp {
    pub account: AccountKey,
    pub login: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub tree: Vec<TreeOp>,
    pub writebacks: Vec<WritebackOp>,
    /// Deprovisions held back by the safety threshold.
    pub held: Vec<Op>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
            && self.tree.is_empty()
            && self.writebacks.is_empty()
            && self.held.is_empty()
    }

    /// What the safety threshold counts: logins with a deprovision, plus the
    /// new login of each login change (SPEC §2.2: both count).
    pub fn deprovision_logins(&self) -> usize {
        count_deprovisions(self.ops.iter(), |_| true)
    }
}

/// Deprovisioned logins among `ops` that `counts`, plus the creates of the
/// logins they moved to.
fn count_deprovisions<'a>(
    ops: impl Iterator<Item = &'a Op> + Clone,
    counts: impl Fn(&Op) -> bool,
) -> usize {
    let deprovisions = ops.clone().filter(|o| o.deprovision && counts(o));
    let logins: HashSet<&str> = deprovisions.clone().map(|o| o.login.as_str()).collect();
    let moved_owners: HashSet<&AccountKey> = deprovisions
        .filter(|o| o.target.gone)
        .map(|o| &o.owner)
        .collect();
    let moved_to = ops
        .filter(|o| o.action == Action::Create && moved_owners.contains(&o.owner))
        .count();
    logins.len() + moved_to
}

/// Which deprovisions an operator let through (SPEC §9.4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Approval {
    #[default]
    None,
    /// `sync --allow-deprovision`: everything of that one run.
    All,
    /// `approve`: the held set that `status` showed at that moment.
    Held(HashSet<String>),
}

impl Approval {
    pub fn covers(&self, login: &str) -> bool {
        match self {
            Approval::None => false,
            Approval::All => true,
            Approval::Held(logins) => logins.contains(login),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Every login pushed in full (`sync --full`, resync).
    pub full: bool,
    /// Logins pushed in full (`resync --login`).
    pub full_logins: HashSet<String>,
    /// Logins not to touch this cycle (quarantined and unchanged, or
    /// backing off); full pushes ignore backoff but not this set.
    pub skip: HashSet<String>,
}

/// The state a login should end in when its account is gone.
fn deprovisioned(cfg: &CoreConfig, known: &AppliedUser) -> Option<UserState> {
    match cfg.on_deleted {
        OnDeleted::Delete => None,
        OnDeleted::Block => Some(UserState {
            status: cfg.status_blocked.clone(),
            permissions: Default::default(),
            gone: true,
            cameras: cameras::gone(cfg.cameras, known),
            ..known.state.clone()
        }),
    }
}

/// `doubt`: what a request whose answer never came asked for (the VMS may
/// hold it), when it is not `known` itself.
fn update_op(
    cfg: &CoreConfig,
    login: &str,
    owner: &AccountKey,
    (known, doubt): (&AppliedUser, Option<&AppliedUser>),
    target: &UserState,
    full: bool,
) -> Option<Op> {
    let applied = &known.state;
    let attach: BTreeSet<String> = target
        .permissions
        .difference(&applied.permissions)
        .cloned()
        .collect();
    let detach: BTreeSet<String> = applied
        .permissions
        .difference(&target.permissions)
        .filter(|p| cfg.managed.contains(p))
        .cloned()
        .collect();
    let mut changes = vec![];
    if applied.status != target.status {
        changes.push("status".to_string());
    }
    if applied.billing_id != target.billing_id {
        changes.push("billing_info".to_string());
    }
    if applied.properties != target.properties {
        changes.push("properties".to_string());
    }
    if cameras::changed(applied, target) {
        changes.push("cameras".to_string());
    }
    let marker_changed = applied.gone != target.gone;
    if !full && attach.is_empty() && detach.is_empty() && changes.is_empty() && !marker_changed {
        return None;
    }
    let step = cameras::update_step(known, doubt, target, full);
    let removes = step.as_ref().is_some_and(|s| !s.removed.is_empty());
    let blocks = applied.status != target.status && target.status == cfg.status_blocked;
    let deprovision = blocks || !detach.is_empty() || removes;
    let (attach, detach) = if full {
        (
            (*target.permissions).clone(),
            cfg.managed
                .iter()
                .filter(|p| !target.permissions.contains(*p))
                .cloned()
                .collect(),
        )
    } else {
        (attach, detach)
    };
    Some(Op {
        login: login.to_string(),
        owner: owner.clone(),
        action: Action::Update {
            attach,
            detach,
            changes,
            full,
        },
        target: target.clone(),
        deprovision,
        cameras: step,
    })
}

/// Diffs desired against applied.
pub fn plan(cfg: &CoreConfig, desired: &Desired, applied: &Applied, opts: &PlanOptions) -> Plan {
    let mut out = Plan::default();
    for (login, d) in &desired.users {
        out.ops
            .extend(desired_op(cfg, desired, applied, opts, login, d));
    }
    // Logins nobody desires any more (their account is gone past the grace
    // period, or its login changed), applied or in doubt.
    let undesired = applied
        .users
        .iter()
        .chain(
            applied
                .in_doubt
                .iter()
                .filter(|(l, _)| !applied.users.contains_key(*l)),
        )
        .filter(|(login, _)| !desired.users.contains_key(*login));
    for (login, known) in undesired {
        if may_deprovision(desired, opts, login, &known.owner) {
            let full = opts.is_full(login) || applied.in_doubt.contains_key(login);
            out.ops.extend(gone_op(cfg, login, known, full));
        }
    }
    out.tree = tree_ops(desired, applied);
    out.writebacks = writeback_ops(cfg, desired, applied, opts);
    out
}

/// Whether the login must be written to the account (SPEC §9.4).
pub fn writeback_due(login: &str, d: &DesiredUser, written: Option<&String>, full: bool) -> bool {
    let seen = d.writeback_seen.as_deref() == Some(login);
    !seen && (written.map(String::as_str) != Some(login) || full)
}

impl PlanOptions {
    fn is_full(&self, login: &str) -> bool {
        self.full || self.full_logins.contains(login)
    }
}

/// Never on doubt: not while the owner's source is incomplete, nor while
/// the owner's record is unusable.
fn may_deprovision(desired: &Desired, opts: &PlanOptions, login: &str, owner: &AccountKey) -> bool {
    !opts.skip.contains(login)
        && !desired.incomplete.contains(&owner.source)
        && !desired.protected.contains(owner)
}

/// The op for a desired user. A login in doubt (its last request's answer
/// never came) is pushed in full whatever it is now: created-or-adopted
/// when live, blocked or deleted when gone.
fn desired_op(
    cfg: &CoreConfig,
    desired: &Desired,
    applied: &Applied,
    opts: &PlanOptions,
    login: &str,
    d: &DesiredUser,
) -> Option<Op> {
    if opts.skip.contains(login) {
        return None;
    }
    let doubt = applied.in_doubt.get(login);
    let known = applied.users.get(login);
    // The login's record is its owner's until that record is usable again.
    if known.is_some_and(|a| a.owner != d.owner && desired.protected.contains(&a.owner)) {
        return None;
    }
    let last = known.or(doubt);
    let mut target = d.state.clone();
    // A new user has nothing to keep.
    cameras::resolve(&mut target, known);
    let op = match last {
        // First sight of a deleted account: nothing to create.
        None if d.state.gone => return None,
        None => create_op(login, &d.owner, target, None),
        Some(_) if known.is_none() && !d.state.gone => create_op(login, &d.owner, target, doubt),
        Some(a) if d.state.gone && cfg.on_deleted == OnDeleted::Delete => {
            delete_op(login, &d.owner, &a.state)
        }
        Some(a) => {
            let full = opts.is_full(login) || doubt.is_some();
            let other = doubt.filter(|_| known.is_some());
            update_op(cfg, login, &d.owner, (a, other), &target, full)?
        }
    };
    // An incomplete source yields no deprovision, except what an account
    // re-read this cycle says of itself (a targeted read, SPEC §10.3).
    let incomplete =
        desired.incomplete.contains(&d.owner.source) && !desired.fresh.contains(&d.owner);
    (!(incomplete && op.deprovision)).then_some(op)
}

fn create_op(
    login: &str,
    owner: &AccountKey,
    target: UserState,
    doubt: Option<&AppliedUser>,
) -> Op {
    Op {
        login: login.to_string(),
        owner: owner.clone(),
        action: Action::Create,
        cameras: cameras::create_step(&target, doubt),
        target,
        deprovision: false,
    }
}

fn delete_op(login: &str, owner: &AccountKey, known: &UserState) -> Op {
    Op {
        login: login.to_string(),
        owner: owner.clone(),
        action: Action::Delete,
        target: UserState {
            gone: true,
            ..known.clone()
        },
        deprovision: true,
        cameras: None,
    }
}

/// The op that ends a login nobody desires: delete, or block and strip.
fn gone_op(cfg: &CoreConfig, login: &str, known: &AppliedUser, full: bool) -> Option<Op> {
    match deprovisioned(cfg, known) {
        None => Some(delete_op(login, &known.owner, &known.state)),
        Some(target) => update_op(cfg, login, &known.owner, (known, None), &target, full),
    }
}

fn tree_ops(desired: &Desired, applied: &Applied) -> Vec<TreeOp> {
    let mut out = vec![];
    for (ext, name) in &desired.tree {
        let create = match applied.tree.get(ext) {
            None => true,
            Some(old) if old != name => false,
            Some(_) => continue,
        };
        out.push(TreeOp {
            external_id: ext.clone(),
            name: name.clone(),
            create,
        });
    }
    out
}

/// Write-backs for live users of sources that take one, when the account's
/// attribute as read does not hold the login, and it was not written (or
/// the push is a full one).
fn writeback_ops(
    cfg: &CoreConfig,
    desired: &Desired,
    applied: &Applied,
    opts: &PlanOptions,
) -> Vec<WritebackOp> {
    let mut out = vec![];
    if cfg.writeback.is_empty() {
        return out;
    }
    for (login, d) in &desired.users {
        if !cfg.writeback.contains_key(&d.owner.source) || d.state.gone || opts.skip.contains(login)
        {
            continue;
        }
        if writeback_due(login, d, applied.written.get(&d.owner), opts.is_full(login)) {
            out.push(WritebackOp {
                account: d.owner.clone(),
                login: login.clone(),
            });
        }
    }
    out
}

/// `max(max_deprovision, ceil(ratio × live users))` (SPEC §9.4).
pub fn threshold(max_deprovision: u32, ratio: f64, live_users: usize) -> usize {
    let by_ratio = (ratio * live_users as f64).ceil();
    let by_ratio = if by_ratio.is_finite() && by_ratio > 0.0 {
        by_ratio as usize
    } else {
        0
    };
    (max_deprovision as usize).max(by_ratio)
}

/// Holds the deprovisions the approval does not cover when they are more
/// than `limit`. A held update keeps its non-destructive part.
pub fn apply_safety(
    cfg: &CoreConfig,
    plan: &mut Plan,
    applied: &Applied,
    limit: usize,
    approval: &Approval,
) {
    let unapproved = |op: &Op| !approval.covers(&op.login);
    if count_deprovisions(plan.ops.iter(), unapproved) <= limit {
        return;
    }
    let ops = std::mem::take(&mut plan.ops);
    for op in ops {
        if !op.deprovision || approval.covers(&op.login) {
            plan.ops.push(op);
            continue;
        }
        plan.held.push(op.clone());
        let Some(a) = applied.users.get(&op.login) else {
            continue;
        };
        if let Action::Update { attach, .. } = &op.action {
            // Keep the applied status, permissions and camera groups; let
            // the rest through, unless it would leave another owner's groups.
            let Some(cameras) = cameras::without_removals(a, &op.target) else {
                continue;
            };
            let mut safe = op.target.clone();
            safe.status = a.state.status.clone();
            safe.gone = a.state.gone;
            safe.permissions =
                std::sync::Arc::new(a.state.permissions.union(attach).cloned().collect());
            safe.cameras = cameras;
            if let Some(rest) = update_op(cfg, &op.login, &op.owner, (a, None), &safe, false) {
                debug_assert!(!rest.deprovision);
                plan.ops.push(rest);
            }
        }
    }
}

/// What a VMS answer proved about one login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// The user exists with the op's profile and no managed permission.
    Created,
    /// The user has the op's profile and permissions; its camera groups
    /// are still those before the op (its camera step comes next).
    Profile,
    /// The user has the op's whole target state.
    Updated,
    /// The VMS no longer has the user (deleted, or it said it never knew it).
    Removed,
}

impl Op {
    /// The proofs a fully successful op collects, in order.
    pub fn proofs(&self) -> &'static [Proof] {
        let step = self.cameras.as_ref();
        match self.action {
            Action::Create if step.is_some() => &[Proof::Created, Proof::Profile, Proof::Updated],
            Action::Create => &[Proof::Created, Proof::Updated],
            Action::Update { .. } if step.is_some_and(|s| !s.first) && self.patches() => {
                &[Proof::Profile, Proof::Updated]
            }
            Action::Update { .. } => &[Proof::Updated],
            Action::Delete => &[Proof::Removed],
        }
    }

    /// Whether an update sends a PATCH: not when all it changes is the
    /// camera set, which its camera step sends.
    pub fn patches(&self) -> bool {
        match &self.action {
            Action::Update {
                attach,
                detach,
                changes,
                full,
            } => {
                let only_cameras = changes.iter().all(|c| c == "cameras") && !changes.is_empty();
                *full
                    || !attach.is_empty()
                    || !detach.is_empty()
                    || !only_cameras
                    || self.cameras.is_none()
            }
            _ => true,
        }
    }
}

/// The applied record a proof leaves for the op's login (None: no record).
/// The engine records through this, and `apply` below is built on it.
pub fn applied_after(op: &Op, proof: Proof) -> Option<AppliedUser> {
    let state = match proof {
        Proof::Removed => return None,
        Proof::Created => UserState {
            permissions: Default::default(),
            cameras: (op.target.cameras.clone()).map(|c| crate::model::Cameras {
                groups: Default::default(),
                ..c
            }),
            ..op.target.clone()
        },
        Proof::Profile => UserState {
            cameras: op.cameras.as_ref().and_then(|s| s.before.clone()),
            ..op.target.clone()
        },
        Proof::Updated => op.target.clone(),
    };
    Some(AppliedUser {
        owner: op.owner.clone(),
        state,
    })
}

/// The applied state after every op of `plan` succeeded.
pub fn apply(applied: &Applied, plan: &Plan) -> Applied {
    let mut out = applied.clone();
    for op in &plan.ops {
        apply_op(&mut out, op);
    }
    for t in &plan.tree {
        out.tree.insert(t.external_id.clone(), t.name.clone());
    }
    for w in &plan.writebacks {
        out.written.insert(w.account.clone(), w.login.clone());
    }
    out
}

pub fn apply_op(applied: &mut Applied, op: &Op) {
    applied.in_doubt.remove(&op.login);
    for proof in op.proofs() {
        match applied_after(op, *proof) {
            Some(user) => applied.users.insert(op.login.clone(), user),
            None => applied.users.remove(&op.login),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cameras::{CameraPolicy, OnBlock};
    use crate::desired::{build, SourceInput};
    use crate::model::Cameras;
    use crate::model::{Account, CanonicalStatus, SourceKind};
    use chrono::Utc;
    use proptest::prelude::*;
    use rust_decimal::Decimal;

    const MANAGED: [&str; 3] = [
        "archives-show",
        "archives-download",
        "archives-preview-download",
    ];

    fn cfg(on_deleted: OnDeleted) -> CoreConfig {
        cfg_with(on_deleted, None)
    }

    /// With camera access: the paying rule grants group "all", a second
    /// rule grants "zone-{attr:Zone}" to balances of 3 and more (odd
    /// account ids have no Zone: their sets stay as applied).
    fn cfg_with(on_deleted: OnDeleted, cameras: Option<CameraPolicy>) -> CoreConfig {
        let mut cfg = cfg_base(on_deleted);
        if cameras.is_some() {
            cfg.rules[0].camera_groups = vec!["all".into()];
            cfg.rules.push(crate::rules::Rule {
                name: "zone".into(),
                min_available: Some(Decimal::from(3)),
                camera_groups: vec!["zone-{attr:Zone}".into()],
                ..Default::default()
            });
        }
        cfg.cameras = cameras;
        cfg
    }

    fn arb_policy() -> impl Strategy<Value = Option<CameraPolicy>> {
        proptest::option::of(
            (any::<bool>(), any::<bool>()).prop_map(|(clear, own_group)| CameraPolicy {
                on_block: if clear { OnBlock::Clear } else { OnBlock::Keep },
                own_group,
            }),
        )
    }

    fn cfg_base(on_deleted: OnDeleted) -> CoreConfig {
        let managed: Vec<String> = MANAGED.iter().map(|p| p.to_string()).collect();
        CoreConfig {
            priority: vec![SourceKind::Billmanager, SourceKind::Activeplatform],
            missing_grace_cycles: 2,
            rules: vec![crate::rules::Rule {
                name: "paying".into(),
                sources: vec![],
                min_available: Some(Decimal::ZERO),
                paid_within_days: 0,
                attributes: Default::default(),
                grant: managed.clone(),
                ..Default::default()
            }],
            managed,
            user_type: "b2c".into(),
            properties: vec!["phone".into()],
            status_active: "active".into(),
            status_blocked: "blocked".into(),
            on_deleted,
            tree_type: Some("cameras".into()),
            writeback: [(SourceKind::Activeplatform, "vms_login".to_string())].into(),
            cameras: None,
        }
    }

    fn arb_state() -> impl Strategy<Value = UserState> {
        (
            prop_oneof![Just("b2c"), Just("b2b")],
            prop_oneof![Just("active"), Just("blocked")],
            0u8..3,
            proptest::option::of(0u8..3),
            proptest::collection::btree_set(proptest::sample::select(MANAGED.to_vec()), 0..=3),
            any::<bool>(),
            proptest::option::of(arb_cameras()),
        )
            .prop_map(
                |(user_type, status, billing, phone, perms, gone, cameras)| UserState {
                    user_type: user_type.into(),
                    status: status.into(),
                    billing_id: format!("bm-{billing}"),
                    properties: phone
                        .map(|p| vec![("phone".to_string(), format!("+7{p}"))])
                        .unwrap_or_default(),
                    permissions: std::sync::Arc::new(perms.into_iter().map(String::from).collect()),
                    gone,
                    cameras,
                },
            )
    }

    fn arb_cameras() -> impl Strategy<Value = Cameras> {
        (
            0u8..2,
            proptest::collection::btree_set(
                proptest::sample::select(vec!["g1", "g2", "g3"]),
                0..=3,
            ),
            any::<bool>(),
        )
            .prop_map(|(owner, groups, kept)| Cameras {
                owner: AccountKey {
                    source: SourceKind::Billmanager,
                    id: owner.to_string(),
                },
                groups: std::sync::Arc::new(groups.into_iter().map(String::from).collect()),
                kept,
            })
    }

    fn account(
        source: SourceKind,
        id: u32,
        email: u32,
        status: CanonicalStatus,
        balance: i64,
    ) -> Account {
        Account {
            key: AccountKey {
                source,
                id: id.to_string(),
            },
            login: format!("u{email}@x"),
            billing_id: format!("{source}-{id}"),
            name: Some(format!("N{id}-{balance}")),
            email: Some(format!("u{email}@x")),
            phone: (balance % 2 == 0).then(|| format!("+7{id}")),
            status,
            balance: Decimal::from(balance),
            credit_limit: Decimal::ZERO,
            attributes: match id % 2 {
                0 => [("Zone".to_string(), format!("z{}", id % 3))].into(),
                _ => Default::default(),
            },
        }
    }

    fn arb_status() -> impl Strategy<Value = CanonicalStatus> {
        prop_oneof![
            4 => Just(CanonicalStatus::Active),
            1 => Just(CanonicalStatus::Suspended),
            1 => Just(CanonicalStatus::Deleted)
        ]
    }

    fn arb_source() -> impl Strategy<Value = SourceKind> {
        prop_oneof![
            Just(SourceKind::Billmanager),
            Just(SourceKind::Activeplatform)
        ]
    }

    fn arb_accounts() -> impl Strategy<Value = Vec<Account>> {
        proptest::collection::vec(
            (arb_source(), 0u32..30, 0u32..20, arb_status(), -5i64..5),
            0..25,
        )
        .prop_map(|v| {
            let mut seen = HashSet::new();
            v.into_iter()
                .filter(|(s, id, ..)| seen.insert((*s, *id)))
                .map(|(s, id, e, st, b)| account(s, id, e, st, b))
                .collect()
        })
    }

    fn inputs(
        accounts: &[Account],
        missing: &HashMap<AccountKey, u32>,
        complete: bool,
    ) -> BTreeMap<SourceKind, SourceInput> {
        let mut m: BTreeMap<SourceKind, SourceInput> = BTreeMap::new();
        for s in SourceKind::ALL {
            m.insert(
                s,
                SourceInput {
                    complete,
                    ..Default::default()
                },
            );
        }
        for a in accounts {
            let inp = m.get_mut(&a.key.source).unwrap();
            inp.accounts.push(a.clone());
            if let Some(n) = missing.get(&a.key) {
                inp.missing.insert(a.key.id.clone(), *n);
            }
        }
        m
    }

    /// What the VMS should hold for the desired state: non-gone users (and,
    /// with blocking, gone ones that already existed). A kept camera set is
    /// whatever the login held.
    fn converged(cfg: &CoreConfig, d: &Desired, a: &Applied) {
        for (login, du) in &d.users {
            match a.users.get(login) {
                Some(au) => {
                    let mut want = du.state.clone();
                    crate::cameras::resolve(&mut want, Some(au));
                    assert_eq!(&au.state, &want, "{login}");
                    assert_eq!(state_hash(&au.state), du.hash, "{login}");
                }
                None => assert!(du.state.gone, "{login} should exist"),
            }
        }
        for (login, au) in &a.users {
            if !d.users.contains_key(login) {
                assert!(
                    au.state.gone && cfg.on_deleted == OnDeleted::Block,
                    "{login} left behind"
                );
                assert!(au.state.permissions.is_empty());
            }
        }
        for (ext, name) in &d.tree {
            assert_eq!(a.tree.get(ext), Some(name));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// One definition of "changed": equal hashes exactly when the diff
        /// finds nothing to send (SPEC §2.1 step 6; a setting the VMS cannot
        /// apply, like `user_type`, must not make every user look changed).
        #[test]
        fn equal_hashes_iff_no_operation(applied in arb_state(), target in arb_state(), policy in arb_policy()) {
            let cfg = cfg_with(OnDeleted::Block, policy);
            let owner = AccountKey { source: SourceKind::Billmanager, id: "1".into() };
            let known = AppliedUser { owner: owner.clone(), state: applied.clone() };
            let op = update_op(&cfg, "u@x", &owner, (&known, None), &target, false);
            prop_assert_eq!(state_hash(&applied) == state_hash(&target), op.is_none(), "{:?}", op);
        }

        /// Applying a plan to the applied state yields the desired state, and
        /// planning again yields nothing.
        #[test]
        fn plan_converges(before in arb_accounts(), after in arb_accounts(), delete in any::<bool>(), full in any::<bool>(), policy in arb_policy()) {
            let cfg = cfg_with(if delete { OnDeleted::Delete } else { OnDeleted::Block }, policy);
            let now = Utc::now();
            let d0 = build(&cfg, inputs(&before, &HashMap::new(), true), now);
            let a0 = apply(&Applied::default(), &plan(&cfg, &d0, &Applied::default(), &PlanOptions::default()));
            converged(&cfg, &d0, &a0);
            let d1 = build(&cfg, inputs(&after, &HashMap::new(), true), now);
            let opts = PlanOptions { full, ..Default::default() };
            let p1 = plan(&cfg, &d1, &a0, &opts);
            let a1 = apply(&a0, &p1);
            converged(&cfg, &d1, &a1);
            let again = plan(&cfg, &d1, &a1, &PlanOptions::default());
            prop_assert!(again.is_empty(), "second plan not empty: {:?}", again);
        }

        /// Every login in doubt gets one full-state op, whatever its account
        /// became, and ends blocked or deleted when the account is gone
        /// (SPEC §9.1); applying the plan converges and clears the doubt.
        #[test]
        fn logins_in_doubt_are_pushed_in_full(before in arb_accounts(), after in arb_accounts(), delete in any::<bool>(), policy in arb_policy()) {
            let cfg = cfg_with(if delete { OnDeleted::Delete } else { OnDeleted::Block }, policy);
            let now = Utc::now();
            let d0 = build(&cfg, inputs(&before, &HashMap::new(), true), now);
            // The first plan went out and no answer came back.
            let mut doubt = Applied::default();
            for op in plan(&cfg, &d0, &Applied::default(), &PlanOptions::default()).ops {
                doubt.in_doubt.insert(op.login.clone(), AppliedUser { owner: op.owner, state: op.target });
            }
            let d1 = build(&cfg, inputs(&after, &HashMap::new(), true), now);
            let p = plan(&cfg, &d1, &doubt, &PlanOptions::default());
            for login in doubt.in_doubt.keys() {
                let ops: Vec<&Op> = p.ops.iter().filter(|o| &o.login == login).collect();
                prop_assert_eq!(ops.len(), 1, "{} {:?}", login, p.ops);
                let op = ops[0];
                let gone = d1.users.get(login).is_none_or(|d| d.state.gone);
                match &op.action {
                    Action::Create => prop_assert!(!gone),
                    Action::Update { full, .. } => {
                        prop_assert!(*full);
                        prop_assert!(!gone || (op.target.gone && op.target.permissions.is_empty()));
                    }
                    Action::Delete => prop_assert!(gone && delete),
                }
            }
            let a1 = apply(&doubt, &p);
            prop_assert!(a1.in_doubt.is_empty());
            converged(&cfg, &d1, &a1);
        }

        /// No permission outside `permissions.managed` is ever attached or
        /// detached, even when the applied state somehow holds one.
        #[test]
        fn only_managed_permissions_are_touched(accounts in arb_accounts(), extra in "[a-z]{3,8}") {
            let cfg = cfg(OnDeleted::Block);
            let d = build(&cfg, inputs(&accounts, &HashMap::new(), true), Utc::now());
            let mut a = Applied::default();
            for (login, du) in &d.users {
                let mut st = du.state.clone();
                std::sync::Arc::make_mut(&mut st.permissions).insert(extra.clone());
                a.users.insert(login.clone(), AppliedUser { owner: du.owner.clone(), state: st });
            }
            for full in [false, true] {
                let p = plan(&cfg, &d, &a, &PlanOptions { full, ..Default::default() });
                for op in &p.ops {
                    if let Action::Update { attach, detach, .. } = &op.action {
                        for perm in attach.iter().chain(detach) {
                            prop_assert!(cfg.managed.contains(perm), "{perm} touched");
                        }
                    }
                }
            }
        }

        /// An incomplete or empty source never yields a deprovision.
        #[test]
        fn incomplete_source_never_deprovisions(before in arb_accounts(), after in arb_accounts(), policy in arb_policy()) {
            let cfg = cfg_with(OnDeleted::Delete, policy);
            let now = Utc::now();
            let d0 = build(&cfg, inputs(&before, &HashMap::new(), true), now);
            let a0 = apply(&Applied::default(), &plan(&cfg, &d0, &Applied::default(), &PlanOptions::default()));
            // Both sources incomplete, with whatever accounts (or none).
            let d1 = build(&cfg, inputs(&after, &HashMap::new(), false), now);
            let p = plan(&cfg, &d1, &a0, &PlanOptions::default());
            prop_assert!(p.ops.iter().all(|o| !o.deprovision), "{:?}", p.ops);
            let d_empty = build(&cfg, inputs(&[], &HashMap::new(), false), now);
            prop_assert!(plan(&cfg, &d_empty, &a0, &PlanOptions::default()).ops.is_empty());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Camera groups follow the permissions' rules (SPEC §12.3): a
        /// removed group is a deprovision; a login another account takes
        /// has its set replaced first and never keeps the old owner's
        /// groups; a kept set is sent only by a full push.
        #[test]
        fn camera_sets_are_owned_and_removals_deprovision(before in arb_accounts(), after in arb_accounts(), policy in arb_policy(), full in any::<bool>()) {
            let cfg = cfg_with(OnDeleted::Block, policy);
            let now = Utc::now();
            let d0 = build(&cfg, inputs(&before, &HashMap::new(), true), now);
            let a0 = apply(&Applied::default(), &plan(&cfg, &d0, &Applied::default(), &PlanOptions::default()));
            let d1 = build(&cfg, inputs(&after, &HashMap::new(), true), now);
            let p = plan(&cfg, &d1, &a0, &PlanOptions { full, ..Default::default() });
            for op in &p.ops {
                let Some(step) = &op.cameras else { continue };
                let known = a0.users.get(&op.login);
                prop_assert!(step.removed.is_empty() || op.deprovision, "{:?}", op);
                let moved = known.is_some_and(|k| k.owner != op.owner);
                prop_assert_eq!(step.first, moved, "{:?}", op);
                let t = op.target.cameras.as_ref().unwrap();
                let same_set = known.and_then(|k| k.state.cameras.as_ref()).is_some_and(|b| b.groups == t.groups && b.owner == t.owner);
                prop_assert!(!(t.kept && same_set) || full, "a kept set sent without a full push: {:?}", op);
            }
            let a1 = apply(&a0, &p);
            for (login, u) in &a1.users {
                if let Some(c) = &u.state.cameras {
                    prop_assert_eq!(&c.owner, &u.owner, "{} holds another owner's groups", login);
                }
            }
        }
    }

    #[test]
    fn missing_grace_then_deletion() {
        let cfg = cfg(OnDeleted::Block);
        let now = Utc::now();
        let acc = account(SourceKind::Billmanager, 1, 1, CanonicalStatus::Active, 1);
        let d0 = build(
            &cfg,
            inputs(std::slice::from_ref(&acc), &HashMap::new(), true),
            now,
        );
        let a0 = apply(
            &Applied::default(),
            &plan(&cfg, &d0, &Applied::default(), &PlanOptions::default()),
        );
        assert!(!a0.users["u1@x"].state.permissions.is_empty());
        let once = HashMap::from([(acc.key.clone(), 1)]);
        let d1 = build(&cfg, inputs(std::slice::from_ref(&acc), &once, true), now);
        assert!(
            plan(&cfg, &d1, &a0, &PlanOptions::default()).ops.is_empty(),
            "within grace"
        );
        let twice = HashMap::from([(acc.key.clone(), 2)]);
        let d2 = build(&cfg, inputs(std::slice::from_ref(&acc), &twice, true), now);
        let p = plan(&cfg, &d2, &a0, &PlanOptions::default());
        assert_eq!(p.ops.len(), 1);
        assert!(p.ops[0].deprovision);
        assert_eq!(p.ops[0].target.status, "blocked");
        // The same absence from an incomplete source deletes nothing.
        let d3 = build(&cfg, inputs(&[acc], &twice, false), now);
        assert!(plan(&cfg, &d3, &a0, &PlanOptions::default()).ops.is_empty());
    }

    #[test]
    fn priority_owns_login_and_reports_conflict() {
        let cfg = cfg(OnDeleted::Block);
        let bm = account(SourceKind::Billmanager, 1, 7, CanonicalStatus::Active, 1);
        let ap = account(SourceKind::Activeplatform, 2, 7, CanonicalStatus::Active, 1);
        let d = build(
            &cfg,
            inputs(&[bm.clone(), ap.clone()], &HashMap::new(), true),
            Utc::now(),
        );
        assert_eq!(d.users["u7@x"].owner, bm.key);
        assert_eq!(d.conflicts.len(), 1);
        assert_eq!(d.conflicts[0].loser, ap.key);
        // A deleted account does not take a login from a live one.
        let mut dead = bm.clone();
        dead.status = CanonicalStatus::Deleted;
        let d = build(
            &cfg,
            inputs(&[dead, ap.clone()], &HashMap::new(), true),
            Utc::now(),
        );
        assert_eq!(d.users["u7@x"].owner, ap.key);
    }

    #[test]
    fn login_change_deprovisions_old_and_creates_new() {
        let cfg = cfg(OnDeleted::Delete);
        let now = Utc::now();
        let a = account(SourceKind::Activeplatform, 1, 1, CanonicalStatus::Active, 1);
        let d0 = build(
            &cfg,
            inputs(std::slice::from_ref(&a), &HashMap::new(), true),
            now,
        );
        let a0 = apply(
            &Applied::default(),
            &plan(&cfg, &d0, &Applied::default(), &PlanOptions::default()),
        );
        let mut moved = a.clone();
        moved.login = "new@x".into();
        let d1 = build(&cfg, inputs(&[moved], &HashMap::new(), true), now);
        let p = plan(&cfg, &d1, &a0, &PlanOptions::default());
        let kinds: Vec<_> = p
            .ops
            .iter()
            .map(|o| (o.login.as_str(), o.action.clone()))
            .collect();
        assert!(kinds.contains(&("new@x", Action::Create)));
        assert!(kinds.contains(&("u1@x", Action::Delete)));
        assert_eq!(
            p.deprovision_logins(),
            2,
            "both logins count toward the threshold"
        );
    }

    #[test]
    fn safety_holds_deprovisions_but_not_the_rest() {
        let cfg = cfg(OnDeleted::Block);
        let now = Utc::now();
        let accounts: Vec<Account> = (0..20)
            .map(|i| account(SourceKind::Billmanager, i, i, CanonicalStatus::Active, 1))
            .collect();
        let d0 = build(&cfg, inputs(&accounts, &HashMap::new(), true), now);
        let a0 = apply(
            &Applied::default(),
            &plan(&cfg, &d0, &Applied::default(), &PlanOptions::default()),
        );
        // 15 go negative (detach) and also change phone; one new account.
        let mut after = accounts.clone();
        for a in after.iter_mut().take(15) {
            a.balance = Decimal::from(-100);
            a.phone = Some("+1".into());
        }
        after.push(account(
            SourceKind::Billmanager,
            99,
            99,
            CanonicalStatus::Active,
            1,
        ));
        let d1 = build(&cfg, inputs(&after, &HashMap::new(), true), now);
        let mut p = plan(&cfg, &d1, &a0, &PlanOptions::default());
        assert_eq!(p.deprovision_logins(), 15);
        assert_eq!(threshold(10, 0.05, 20), 10);
        apply_safety(&cfg, &mut p, &a0, 10, &Approval::None);
        assert_eq!(p.held.len(), 15);
        assert!(p.ops.iter().all(|o| !o.deprovision));
        // The create and the 15 phone changes still go out.
        assert_eq!(p.ops.len(), 16);
        let a1 = apply(&a0, &p);
        assert!(a1.users.values().all(|u| !u.state.permissions.is_empty()));
        assert_eq!(
            a1.users["u0@x"].state.properties,
            vec![("phone".into(), "+1".into())]
        );
        // Approved: everything goes.
        let mut p = plan(&cfg, &d1, &a1, &PlanOptions::default());
        apply_safety(&cfg, &mut p, &a1, 10, &Approval::All);
        assert!(p.held.is_empty());
        assert_eq!(p.deprovision_logins(), 15);
    }

    #[test]
    fn writeback_once_and_on_full_when_attribute_differs() {
        let cfg = cfg(OnDeleted::Block);
        let now = Utc::now();
        let a = account(SourceKind::Activeplatform, 5, 5, CanonicalStatus::Active, 1);
        let d = build(
            &cfg,
            inputs(std::slice::from_ref(&a), &HashMap::new(), true),
            now,
        );
        let p = plan(&cfg, &d, &Applied::default(), &PlanOptions::default());
        assert_eq!(p.writebacks.len(), 1);
        let applied = apply(&Applied::default(), &p);
        assert!(plan(&cfg, &d, &applied, &PlanOptions::default())
            .writebacks
            .is_empty());
        // On a full resync the account's attribute is compared too.
        let full = PlanOptions {
            full: true,
            ..Default::default()
        };
        assert_eq!(plan(&cfg, &d, &applied, &full).writebacks.len(), 1);
        let mut b = a.clone();
        b.attributes.insert("vms_login".into(), "u5@x".into());
        let d = build(&cfg, inputs(&[b], &HashMap::new(), true), now);
        assert!(plan(&cfg, &d, &applied, &full).writebacks.is_empty());
        // An account whose attribute already holds its login gets no PUT,
        // even on its first sync.
        let first = plan(&cfg, &d, &Applied::default(), &PlanOptions::default());
        assert!(first.writebacks.is_empty(), "{:?}", first.writebacks);
    }
}
