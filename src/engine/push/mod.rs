//! The push phase: one executor for every VMS-side operation of a plan
//! (users, tree elements, write-backs). `execute` says how a task ended;
//! `record` writes what that means (applied, retry, quarantine, the plan
//! row, metrics, audit) after `policy::error_policy` decided about a failure.
//! A new operation costs a `Task` variant, a client method and a match arm.

mod channel;
pub mod policy;
mod user;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::StreamExt;

use policy::{error_policy, Next, PushError, TaskKind};

use crate::config::VmsSettings;
use crate::core::cycle::OpResult;
use crate::core::desired::CoreConfig;
use crate::core::model::{AccountKey, SourceKind};
use crate::core::pacing::Pacing;
use crate::core::plan::{
    applied_after, state_hash, Action, AppliedUser, Op, Plan, TreeOp, WritebackOp,
};
use crate::sources::WriteBack;
use crate::store::{AuditRow, QuarantinePart, RetryInfo, Store};
use crate::telemetry::metrics;
use crate::vms::{VmsClient, VmsOp};
pub use channel::limiter;
use channel::Channel;

use super::schedule::{Key, Turn, Turns};
use super::Progress;

const NEWER_READ: &str = "pushed meanwhile from a newer read";
const DONE_MEANWHILE: &str = "done meanwhile by the other lane";

/// One planned operation.
#[derive(Debug, Clone, Copy)]
pub enum Task<'p> {
    User(&'p Op),
    Tree(&'p TreeOp),
    Writeback(&'p WritebackOp),
}

impl Task<'_> {
    fn kind(&self) -> TaskKind {
        match self {
            Task::User(_) => TaskKind::User,
            Task::Tree(_) => TaskKind::Tree,
            Task::Writeback(_) => TaskKind::Writeback,
        }
    }

    /// What the task writes, for the scheduler.
    fn schedule_key(&self) -> Key {
        match self {
            Task::User(op) => Key::Login(op.login.clone()),
            Task::Tree(t) => Key::Tree(t.external_id.clone()),
            Task::Writeback(w) => Key::Writeback(w.account.to_string()),
        }
    }

    /// The login, or the tree element's external id.
    fn key(&self) -> &str {
        match self {
            Task::User(op) => &op.login,
            Task::Tree(t) => &t.external_id,
            Task::Writeback(w) => &w.login,
        }
    }

    /// The `op` label of `billsync_operations_total`.
    fn metric_op(&self) -> &'static str {
        match self {
            Task::User(op) => match op.action {
                Action::Create => "create",
                Action::Update { .. } => "update",
                Action::Delete => "delete",
            },
            Task::Tree(t) => tree_op(t).as_str(),
            Task::Writeback(_) => "writeback",
        }
    }

    /// The audit log's action.
    fn action(&self, status_blocked: &str) -> &'static str {
        match self {
            Task::User(op) => op.label(status_blocked),
            _ => self.metric_op(),
        }
    }
}

fn tree_op(t: &TreeOp) -> VmsOp {
    if t.create {
        VmsOp::TreeCreate
    } else {
        VmsOp::TreeUpdate
    }
}

/// How a task ended this cycle.
#[derive(Debug)]
pub enum Outcome {
    /// Every request confirmed. `adopted`: the user existed already.
    Applied {
        adopted: bool,
    },
    Failed(PushError),
}

/// What the push achieved, for the cycle's report (user tasks).
#[derive(Debug, Default)]
pub struct PushSummary {
    pub applied: usize,
    pub pending: usize,
    /// Quarantined by this push (users and tree elements).
    pub quarantined: usize,
    pub breaker_open: bool,
    /// Requests went out and the VMS refused every one.
    pub vms_refused: bool,
}

/// What the executor reads besides the plan.
pub struct PushInput<'a> {
    pub vms: &'a VmsClient,
    pub store: &'a Store,
    pub core: &'a CoreConfig,
    pub settings: &'a VmsSettings,
    /// The sources that take a write-back.
    pub writeback: BTreeMap<SourceKind, &'a dyn WriteBack>,
    /// Loaded once per cycle (`engine::Memory`).
    pub retries: &'a HashMap<String, RetryInfo>,
    pub tree_quarantined: &'a HashSet<String>,
    /// Accounts with paid payments whose push is still to be timed.
    pub unpushed_payments: &'a HashSet<AccountKey>,
    /// The applied users of the planned logins, before this push.
    pub applied: &'a BTreeMap<String, AppliedUser>,
    pub stop: Option<Arc<AtomicBool>>,
    pub now: DateTime<Utc>,
    pub limiter: Arc<governor::DefaultDirectRateLimiter>,
    /// Whether this node may start a request now (the leader lease).
    pub gate: Option<Arc<dyn crate::lease::Gate>>,
    /// What a confirmed full-state push counts its next verification from.
    pub pacing: Pacing,
    /// A full resync: it verifies everything at once, so its verifications
    /// are staggered like a first round (else they would all fall due in
    /// the same cycle a period later).
    pub restagger: bool,
    pub clock: super::Clock,
    /// Each task's turn at its key: the push scheduler.
    pub turns: Turns<'a>,
    pub cycle_id: i64,
}

pub struct Executor<'a> {
    vms: &'a VmsClient,
    store: &'a Store,
    core: &'a CoreConfig,
    channel: Channel,
    writeback: BTreeMap<SourceKind, &'a dyn WriteBack>,
    retries: &'a HashMap<String, RetryInfo>,
    tree_quarantined: &'a HashSet<String>,
    unpushed_payments: &'a HashSet<AccountKey>,
    applied: &'a BTreeMap<String, AppliedUser>,
    /// Logins whose VMS presence this push confirmed (true) or disproved.
    on_vms: Mutex<HashMap<String, bool>>,
    concurrency: usize,
    requeue_base_secs: u64,
    now: DateTime<Utc>,
    pacing: Pacing,
    restagger: bool,
    clock: super::Clock,
    turns: Turns<'a>,
    cycle_id: i64,
}

/// How `record` settled one task.
struct Recorded {
    kind: TaskKind,
    result: OpResult,
    audit: AuditRow,
}

impl<'a> Executor<'a> {
    pub fn new(input: PushInput<'a>) -> Self {
        Self {
            vms: input.vms,
            store: input.store,
            core: input.core,
            channel: Channel::new(input.settings, input.limiter, input.stop, input.gate),
            writeback: input.writeback,
            retries: input.retries,
            tree_quarantined: input.tree_quarantined,
            unpushed_payments: input.unpushed_payments,
            applied: input.applied,
            on_vms: Mutex::new(HashMap::new()),
            concurrency: input.settings.concurrency.max(1) as usize,
            requeue_base_secs: input.settings.requeue_base_secs,
            now: input.now,
            pacing: input.pacing,
            restagger: input.restagger,
            clock: input.clock,
            turns: input.turns,
            cycle_id: input.cycle_id,
        }
    }

    /// Tree elements first when camera access is on (a user's set names
    /// them), then users, then write-backs for users the VMS has. A failure to record stops
    /// the push (in-flight tasks are still recorded) and is returned.
    pub async fn push(
        &self,
        plan: &Plan,
        progress: Option<&Progress>,
    ) -> Result<PushSummary, PushError> {
        let mut tally = Tally::default();
        let mut stages = [
            ("tree", tasks(&plan.tree, Task::Tree)),
            ("pushing", tasks(&plan.ops, Task::User)),
            ("write-back", tasks(&plan.writebacks, Task::Writeback)),
        ];
        // Without camera access, users go first, as they always did.
        if self.core.cameras.is_none() {
            stages.swap(0, 1);
        }
        for (label, tasks) in stages {
            self.stage(label, tasks, &mut tally, progress).await;
        }
        tally.audit.extend(self.held(&plan.held));
        self.store.audit(self.cycle_id, &tally.audit).await?;
        match tally.failure {
            Some(e) => Err(e),
            None => Ok(PushSummary {
                breaker_open: self.channel.breaker.is_open(),
                vms_refused: self.channel.answers.all_refused(),
                ..tally.summary
            }),
        }
    }

    /// Runs tasks with bounded concurrency; bookkeeping happens inside each
    /// task's future, so no buffered future waits unpolled on the store.
    async fn stage<'p>(
        &'p self,
        label: &str,
        tasks: Vec<Task<'p>>,
        tally: &mut Tally,
        progress: Option<&Progress>,
    ) {
        let total = tasks.len();
        tally.done = 0;
        let futures = Runs {
            exec: self,
            tasks: tasks.into_iter(),
        };
        let mut results = futures::stream::iter(futures).buffer_unordered(self.concurrency);
        while let Some(r) = results.next().await {
            tally.add(r, &self.channel);
            if let Some(p) = progress {
                p(label, tally.done as u64, Some(total as u64));
            }
        }
    }

    /// Whether a task is left for a later cycle without being tried.
    fn skipped(&self, task: &Task<'_>) -> bool {
        match task {
            Task::User(_) => false,
            Task::Tree(t) => {
                self.tree_quarantined.contains(&t.external_id) || self.channel.closed()
            }
            Task::Writeback(w) => self.channel.stopping() || !self.is_on_vms(&w.login),
        }
    }

    /// Executes and records a task in its turn at its key (one writer per
    /// key), so its outcome is written before another cycle's turn.
    fn run<'t>(&'t self, task: Task<'t>) -> BoxFuture<'t, Result<Recorded, PushError>> {
        Box::pin(async move {
            let (_turn, full) = match self.turns.take(task.schedule_key()).await {
                Turn::Superseded => return self.superseded(task, NEWER_READ).await,
                Turn::Held => (None, false),
                Turn::Taken { taken, stale } => {
                    if stale && self.done_meanwhile(task).await? {
                        return self.superseded(task, DONE_MEANWHILE).await;
                    }
                    (Some(taken), stale)
                }
            };
            let outcome = self.execute(task, full).await;
            self.record(task, outcome).await
        })
    }

    /// Another cycle decided this key after this one read it: a newer read
    /// (this plan is older news; the next listing re-diffs it), or an
    /// older one that already left the VMS as this task would.
    async fn superseded(&self, task: Task<'_>, why: &str) -> Result<Recorded, PushError> {
        tracing::debug!(key = task.key(), why, "left to what another cycle pushed");
        if let Task::User(op) = task {
            self.store.plan_done_in(&op.login, self.cycle_id).await?;
        }
        Ok(Recorded {
            kind: task.kind(),
            result: OpResult::Superseded,
            audit: AuditRow {
                login: task.key().to_string(),
                action: task.action(&self.core.status_blocked).into(),
                result: OpResult::Superseded.as_str().into(),
                detail: why.into(),
            },
        })
    }

    /// Whether an older cycle's push, made after this cycle read the
    /// applied state, left exactly what this user task would (a duplicate
    /// of both lanes, merged). Tree and write-back tasks are sent again:
    /// they are idempotent.
    async fn done_meanwhile(&self, task: Task<'_>) -> Result<bool, PushError> {
        let Task::User(op) = task else {
            return Ok(false);
        };
        let last = op.proofs().last().copied();
        let after = last.and_then(|proof| applied_after(op, proof));
        Ok(self.store.holds_exactly(&op.login, after.as_ref()).await?)
    }

    /// `full`: the op's applied state moved since it was planned, so a
    /// user update states the whole target, not the planned difference.
    pub async fn execute(&self, task: Task<'_>, full: bool) -> Outcome {
        let done = match task {
            Task::User(op) => self.user(op, full).await.map(|d| d.adopted),
            Task::Tree(t) => self.tree(t).await.map(|()| false),
            Task::Writeback(w) => self.write_back(w).await.map(|()| false),
        };
        match done {
            Ok(adopted) => Outcome::Applied { adopted },
            Err(e) => Outcome::Failed(e),
        }
    }

    /// Tree create (201) or rename (200). A 422 on create means the element
    /// exists: rename it instead.
    async fn tree(&self, t: &TreeOp) -> Result<(), PushError> {
        let (name, ext) = (&t.name, &t.external_id);
        let created = match t.create {
            false => false,
            true => match self
                .channel
                .request(VmsOp::TreeCreate, || self.vms.tree_create(name, ext))
                .await
            {
                Ok(()) => true,
                Err(e) if e.status == Some(422) && e.errors.contains_key("external_id") => false,
                Err(e) => return Err(e.into()),
            },
        };
        if !created {
            self.channel
                .request(VmsOp::TreeUpdate, || self.vms.tree_update(name, ext))
                .await?;
        }
        self.store.record_tree(ext, name).await?;
        Ok(())
    }

    async fn write_back(&self, w: &WritebackOp) -> Result<(), PushError> {
        let Some(target) = self.writeback.get(&w.account.source) else {
            let why = format!("{} takes no write-back", w.account.source);
            return Err(PushError::Source(crate::http::FetchError::permanent(why)));
        };
        self.channel.may_send()?;
        target
            .write_login(&w.account.id, &w.login)
            .await
            .map_err(PushError::Source)?;
        self.store.record_writeback(&w.account, &w.login).await?;
        Ok(())
    }

    /// Writes what an outcome means; a failure the policy cannot leave to a
    /// later cycle (the store) stops the push and comes back as the error.
    async fn record(&self, task: Task<'_>, outcome: Outcome) -> Result<Recorded, PushError> {
        let (result, detail) = match outcome {
            Outcome::Applied { adopted } => {
                self.record_done(task).await?;
                (
                    OpResult::Applied,
                    if adopted { "adopted existing user" } else { "" }.to_string(),
                )
            }
            Outcome::Failed(error) => {
                let ctx = policy::Context {
                    attempts: self.attempts(task),
                    now: self.now,
                    requeue_base_secs: self.requeue_base_secs,
                    channel_works: self.channel.answers.channel_works(),
                };
                let next = error_policy(task.kind(), &error, ctx);
                self.record_failure(task, error, next, ctx.attempts).await?
            }
        };
        metrics::get().operation(task.metric_op(), result);
        if let Task::User(Op {
            cameras: Some(_), ..
        }) = task
        {
            metrics::get().operation("cameras", result);
        }
        let detail = match task {
            Task::Tree(t) => t.name.clone(),
            _ => detail,
        };
        Ok(Recorded {
            kind: task.kind(),
            result,
            audit: AuditRow {
                login: task.key().to_string(),
                action: task.action(&self.core.status_blocked).into(),
                result: result.as_str().into(),
                detail,
            },
        })
    }

    async fn record_done(&self, task: Task<'_>) -> Result<(), PushError> {
        if let Task::User(op) = task {
            if self.unpushed_payments.contains(&op.owner) {
                let now = chrono::Utc::now();
                for seen in self.store.payments_pushed(&op.owner, now).await? {
                    let secs = (now - seen).num_milliseconds().max(0) as f64 / 1000.0;
                    metrics::get().payment_to_push.observe(secs);
                }
            }
            self.store.clear_in_doubt(&op.login).await?;
            self.store.plan_done(&op.login).await?;
            if self.retries.contains_key(&op.login) {
                self.store.clear_retry(&op.login).await?;
            }
        }
        Ok(())
    }

    async fn record_failure(
        &self,
        task: Task<'_>,
        error: PushError,
        next: Next,
        attempts: u32,
    ) -> Result<(OpResult, String), PushError> {
        let text = error.to_string();
        match (task, next) {
            (_, Next::FailCycle) => {
                tracing::error!(key = task.key(), error = %text, "cannot record a push outcome; stopping the push");
                self.channel.stop();
                return Err(error);
            }
            (Task::User(op), Next::Retry { at }) => {
                let info = RetryInfo {
                    attempts,
                    next_attempt_at: at,
                    last_error: text.clone(),
                };
                self.store.set_retry(&op.login, &info).await?;
            }
            (Task::User(op), Next::Quarantine(reason)) => {
                tracing::warn!(login = %op.login, error = %reason, "quarantined after a permanent VMS error");
                let hash = state_hash(&op.target);
                self.store
                    .quarantine(&op.login, QuarantinePart::User, &reason, &hash)
                    .await?;
                self.store.clear_retry(&op.login).await?;
                self.store.plan_done(&op.login).await?;
                return Ok((OpResult::Quarantined, reason));
            }
            (Task::Tree(t), Next::Quarantine(reason)) => {
                self.store
                    .quarantine(&t.external_id, QuarantinePart::Tree, &reason, "")
                    .await?;
                return Ok((OpResult::Quarantined, reason));
            }
            (Task::Tree(_), Next::Retry { .. }) => {}
            (Task::Writeback(w), _) => {
                tracing::warn!(account = %w.account, error = %text, "write-back failed; retried next cycle");
            }
        }
        Ok((OpResult::Retry, text))
    }

    /// Failed cycles in a row for this task, this one included.
    fn attempts(&self, task: Task<'_>) -> u32 {
        match task {
            Task::User(op) => self.retries.get(&op.login).map_or(0, |r| r.attempts) + 1,
            _ => 1,
        }
    }

    fn note_on_vms(&self, login: &str, present: bool) {
        let mut seen = self.on_vms.lock().unwrap_or_else(|e| e.into_inner());
        seen.insert(login.to_string(), present);
    }

    /// Whether the VMS has this user: as this push left it, else as applied.
    fn is_on_vms(&self, login: &str) -> bool {
        let seen = self.on_vms.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(login)
            .copied()
            .unwrap_or_else(|| self.applied.contains_key(login))
    }

    /// Held deprovisions: counted and audited, not sent.
    fn held(&self, held: &[Op]) -> Vec<AuditRow> {
        held.iter()
            .map(|op| {
                let task = Task::User(op);
                metrics::get().operation(task.metric_op(), OpResult::Held);
                AuditRow {
                    login: op.login.clone(),
                    action: task.action(&self.core.status_blocked).into(),
                    result: OpResult::Held.as_str().into(),
                    detail: String::new(),
                }
            })
            .collect()
    }
}

/// A stage's tasks, collected: a few words each. Iterating a `map` with a
/// higher-ranked constructor (or a closure over `&Op`) in the stage would
/// make the cycle future lose `Send` (a known limit of higher-ranked
/// lifetimes in auto traits).
fn tasks<'p, T>(items: &'p [T], task: fn(&'p T) -> Task<'p>) -> Vec<Task<'p>> {
    items.iter().map(task).collect()
}

/// Yields each runnable task's future, skipping those left for later.
struct Runs<'a> {
    exec: &'a Executor<'a>,
    tasks: std::vec::IntoIter<Task<'a>>,
}

impl<'a> Iterator for Runs<'a> {
    type Item = BoxFuture<'a, Result<Recorded, PushError>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let task = self.tasks.next()?;
            if !self.exec.skipped(&task) {
                return Some(self.exec.run(task));
            }
        }
    }
}

#[derive(Default)]
struct Tally {
    summary: PushSummary,
    audit: Vec<AuditRow>,
    done: usize,
    /// The first failure that stopped the push.
    failure: Option<PushError>,
}

impl Tally {
    fn add(&mut self, r: Result<Recorded, PushError>, channel: &Channel) {
        self.done += 1;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                channel.stop();
                self.failure.get_or_insert(e);
                return;
            }
        };
        let s = &mut self.summary;
        match (r.kind, r.result) {
            (TaskKind::User, OpResult::Applied) => s.applied += 1,
            (TaskKind::User, OpResult::Retry) => s.pending += 1,
            (_, OpResult::Quarantined) => s.quarantined += 1,
            _ => {}
        }
        self.audit.push(r.audit);
    }
}
