//! One cycle: read -> plan -> persist -> push -> record (SPEC §2.1).

mod push;
pub mod read;
mod report;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use futures::StreamExt;
use rand::Rng;

pub use push::Outcome;
pub use report::{
    plan_entries as report_entries, CycleReport, OperationCounts, PlanEntry, SourceSummary,
};

use crate::config::Settings;
use crate::core::desired::{self, CoreConfig, SourceInput};
use crate::core::model::SourceKind;
use crate::core::normalize::Normalizer;
use crate::core::plan::{self, Action, PlanOptions};
use crate::sources::Source;
use crate::store::{state_hash, AuditRow, RetryInfo, Store, StoreError};
use crate::telemetry::metrics;
use crate::vms::VmsClient;

/// A cycle could not run at all (SPEC §4 exit 3).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Setup(String),
}

/// Progress for people at a terminal: (phase, done, total).
pub type Progress = Arc<dyn Fn(&str, u64, Option<u64>) + Send + Sync>;

#[derive(Clone, Default)]
pub struct CycleOptions {
    pub full: bool,
    pub dry_run: bool,
    pub allow_deprovision: bool,
    pub progress: Option<Progress>,
    /// Shutdown: finish what is in flight, start nothing new.
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
}

pub struct Engine {
    pub settings: Settings,
    pub store: Store,
    sources: Vec<Source>,
    normalizers: BTreeMap<SourceKind, Normalizer>,
    vms: VmsClient,
    core: CoreConfig,
}

/// Backoff across cycles for a login that stays pending: 30 s doubling,
/// capped at one hour, with jitter.
fn next_attempt(now: DateTime<Utc>, attempts: u32, base_secs: u64) -> DateTime<Utc> {
    if base_secs == 0 {
        return now;
    }
    let exp = base_secs
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(16))
        .min(3600);
    let jittered = rand::rng().random_range(exp / 2..=exp.max(1));
    now + ChronoDuration::seconds(jittered as i64)
}

impl Engine {
    pub async fn new(settings: Settings) -> Result<Self, EngineError> {
        let store = Store::open(&settings.daemon.state_path).await?;
        Self::with_store(settings, store)
    }

    pub fn with_store(settings: Settings, store: Store) -> Result<Self, EngineError> {
        let sources =
            Source::from_settings(&settings).map_err(|e| EngineError::Setup(e.to_string()))?;
        let mut normalizers = BTreeMap::new();
        for s in &sources {
            let n = Normalizer::from_settings(&settings, s.kind()).map_err(EngineError::Setup)?;
            normalizers.insert(s.kind(), n);
        }
        let vms = VmsClient::new(&settings.vms).map_err(|e| EngineError::Setup(e.to_string()))?;
        let core = CoreConfig::from_settings(&settings);
        Ok(Self {
            settings,
            store,
            sources,
            normalizers,
            vms,
            core,
        })
    }

    pub fn core(&self) -> &CoreConfig {
        &self.core
    }

    /// Reads every source and builds the desired state (no writes to the VMS).
    pub async fn read_all(
        &self,
        store: &Store,
        full: bool,
        now: DateTime<Utc>,
        progress: Option<&Progress>,
    ) -> Result<
        (
            BTreeMap<SourceKind, SourceInput>,
            BTreeMap<String, SourceSummary>,
            usize,
        ),
        EngineError,
    > {
        let history = self
            .core
            .rules
            .iter()
            .map(|r| r.paid_within_days)
            .max()
            .unwrap_or(0);
        let mut inputs = BTreeMap::new();
        let mut summaries = BTreeMap::new();
        let mut invalid = 0;
        for source in &self.sources {
            let kind = source.kind();
            let window = match kind {
                SourceKind::Billmanager => self.settings.bm().map(|c| c.payment_window_days),
                SourceKind::Activeplatform => self.settings.ap().map(|c| c.payment_window_days),
            }
            .unwrap_or(3);
            let opts = read::ReadOptions {
                full,
                payment_window_days: window,
                paid_history_days: history,
                now,
            };
            let label = format!("reading {kind}");
            let cb = |n: usize| {
                if let Some(p) = progress {
                    p(&label, n as u64, None);
                }
            };
            let r = read::read_source(store, source, &self.normalizers[&kind], &opts, &cb).await?;
            invalid += r.invalid.len();
            summaries.insert(
                kind.as_str().to_string(),
                SourceSummary {
                    accounts: r.listed,
                    complete: r.complete,
                    error: r.error.clone(),
                },
            );
            let mut protected: HashSet<String> = r
                .invalid
                .iter()
                .filter(|i| i.kind == "account")
                .map(|i| i.id.clone())
                .collect();
            protected.extend(r.unusable.iter().cloned());
            inputs.insert(
                kind,
                SourceInput {
                    complete: r.complete,
                    accounts: r.accounts,
                    missing: r.missing,
                    last_paid: r.last_paid,
                    protected,
                },
            );
        }
        Ok((inputs, summaries, invalid))
    }

    /// Runs one cycle. Errors only when the cycle could not run at all.
    pub async fn run_cycle(&self, opts: &CycleOptions) -> Result<CycleReport, EngineError> {
        if opts.dry_run {
            let dir = tempfile::tempdir().map_err(|e| EngineError::Setup(e.to_string()))?;
            let copy = dir.path().join("dry-run.db");
            self.store.snapshot_to(&copy).await?;
            let snapshot = Store::open(&copy).await?;
            let report = self.cycle_on(&snapshot, opts).await;
            snapshot.close().await;
            return report;
        }
        self.cycle_on(&self.store, opts).await
    }

    async fn cycle_on(
        &self,
        store: &Store,
        opts: &CycleOptions,
    ) -> Result<CycleReport, EngineError> {
        let started = Utc::now();
        let clock = Instant::now();
        let requests = store.pending_requests().await?;
        let full = opts.full || requests.resync_all;
        let kind = if full { "full" } else { "incremental" };
        let approved = opts.allow_deprovision || requests.approve;
        let cycle_id = store.start_cycle(kind, started).await?;
        if !opts.dry_run {
            if full {
                store.clear_for_resync(None).await?;
            } else if !requests.resync_logins.is_empty() {
                store
                    .clear_for_resync(Some(&requests.resync_logins))
                    .await?;
            }
        }

        let (inputs, sources, invalid) = self
            .read_all(store, full, started, opts.progress.as_ref())
            .await?;
        tracing::debug!(ms = clock.elapsed().as_millis() as u64, rss_mb = ?crate::telemetry::rss_mb(), "sources read");
        let desired = desired::build(&self.core, inputs, started);
        tracing::debug!(
            ms = clock.elapsed().as_millis() as u64, rss_mb = ?crate::telemetry::rss_mb(),
            users = desired.users.len(),
            "desired state built"
        );
        // Only logins whose desired hash differs from the applied one (or
        // that nobody desires any more) need their applied state and a plan.
        let mut known_users = 0usize;
        let mut matched: HashSet<&str> = HashSet::new();
        let mut orphans: Vec<String> = vec![];
        store
            .scan_applied_hashes(|login, hash| {
                known_users += 1;
                match desired.users.get_key_value(login) {
                    Some((key, d)) if d.hash == hash => {
                        matched.insert(key.as_str());
                    }
                    Some(_) => {}
                    None => orphans.push(login.to_string()),
                }
            })
            .await?;
        let need: Option<HashSet<String>> = if full {
            None
        } else {
            let written = if self.core.writeback_attribute.is_some() {
                store
                    .load_applied_subset(Some(&HashSet::new()))
                    .await?
                    .written
            } else {
                Default::default()
            };
            let mut need: HashSet<String> = desired
                .users
                .iter()
                .filter(|(login, d)| {
                    !matched.contains(login.as_str())
                        || requests.resync_logins.contains(*login)
                        || self.core.writeback_attribute.is_some()
                            && d.owner.source == SourceKind::Activeplatform
                            && written.get(&d.owner) != Some(*login)
                })
                .map(|(login, _)| login.clone())
                .collect();
            need.extend(orphans);
            Some(need)
        };
        drop(matched);
        let applied = store.load_applied_subset(need.as_ref()).await?;
        let planned = need.as_ref().map(|n| desired.subset(n));
        let plan_desired = planned.as_ref().unwrap_or(&desired);

        // Quarantined logins wait until their desired user changes.
        let mut skip: HashSet<String> = HashSet::new();
        for q in store.load_quarantine().await? {
            if q.part != "user" {
                continue;
            }
            match desired.users.get(&q.key) {
                Some(d) if d.hash == q.hash => {
                    skip.insert(q.key);
                }
                _ => {
                    if !opts.dry_run {
                        store
                            .release_quarantine(Some(std::slice::from_ref(&q.key)))
                            .await?;
                    }
                }
            }
        }
        let retries = store.load_retries().await?;
        if !full {
            for (login, r) in &retries {
                if r.next_attempt_at > started && !requests.resync_logins.contains(login) {
                    skip.insert(login.clone());
                }
            }
        }
        let plan_opts = PlanOptions {
            full,
            full_logins: requests.resync_logins.clone(),
            skip: skip.clone(),
        };
        tracing::debug!(
            ms = clock.elapsed().as_millis() as u64, rss_mb = ?crate::telemetry::rss_mb(),
            planned_logins = plan_desired.users.len(),
            "applied state loaded"
        );
        let mut the_plan = plan::plan(&self.core, plan_desired, &applied, &plan_opts);
        let limit = plan::threshold(
            self.settings.safety.max_deprovision,
            self.settings.safety.max_deprovision_ratio,
            known_users,
        );
        plan::apply_safety(&self.core, &mut the_plan, &applied, limit, approved);
        if !the_plan.held.is_empty() {
            tracing::warn!(
                held = the_plan.held.len(),
                limit,
                "deprovisions exceed the safety threshold and are held; approve with `billsync approve`"
            );
        }
        store
            .persist_plan(cycle_id, &desired, &the_plan, &self.core.status_blocked)
            .await?;

        tracing::debug!(
            ms = clock.elapsed().as_millis() as u64, rss_mb = ?crate::telemetry::rss_mb(),
            ops = the_plan.ops.len(),
            "plan persisted"
        );
        let mut report = CycleReport::new(
            kind,
            opts.dry_run,
            started,
            sources,
            invalid,
            &desired,
            &the_plan,
            &self.core,
        );
        if opts.dry_run {
            report.plan = report::plan_entries(&the_plan, &self.core);
            report.result =
                if report.sources.values().all(|s| !s.complete) && !report.sources.is_empty() {
                    "failed".into()
                } else {
                    "ok".into()
                };
            report.finished_at = Utc::now();
            return Ok(report);
        }
        if !requests.ids.is_empty() {
            store.consume_requests(&requests.ids, cycle_id).await?;
        }

        let all_failed = !report.sources.is_empty() && report.sources.values().all(|s| !s.complete);
        let outcome = self.push(store, &the_plan, cycle_id, opts).await?;
        report.applied = outcome.applied;
        report.pending = outcome.pending + skip.iter().filter(|l| retries.contains_key(*l)).count();
        let quarantined = store.load_quarantine().await?;
        report.quarantined = quarantined.len();
        report.held = the_plan.held.len();
        report.result = if all_failed || (outcome.breaker_open && outcome.applied == 0) {
            "failed"
        } else if report.held > 0 {
            "held"
        } else if report.pending > 0
            || report.quarantined > 0
            || report.sources.values().any(|s| !s.complete)
        {
            "partial"
        } else {
            "ok"
        }
        .into();
        report.finished_at = Utc::now();
        store
            .finish_cycle(
                cycle_id,
                &report.result,
                &serde_json::to_value(&report).unwrap_or_default(),
            )
            .await?;
        let retention = ChronoDuration::days(i64::from(self.settings.daemon.audit_retention_days));
        store.prune_history(started - retention).await?;
        let pay_keep = ChronoDuration::days(i64::from(
            self.core
                .rules
                .iter()
                .map(|r| r.paid_within_days)
                .max()
                .unwrap_or(0)
                .max(31),
        ));
        store.prune_payments(started - pay_keep).await?;

        let m = metrics::get();
        m.cycles
            .get_or_create(&metrics::KindResult {
                kind: kind.into(),
                result: report.result.clone(),
            })
            .inc();
        m.cycle_duration
            .get_or_create(&metrics::Kind { kind: kind.into() })
            .observe(clock.elapsed().as_secs_f64());
        if report.result != "failed" {
            m.last_success.set(Utc::now().timestamp() as f64);
        }
        m.pending.set(report.pending as i64);
        m.quarantined.set(report.quarantined as i64);
        m.held.set(report.held as i64);
        tracing::info!(
            kind,
            result = %report.result,
            applied = report.applied,
            pending = report.pending,
            quarantined = report.quarantined,
            held = report.held,
            ms = clock.elapsed().as_millis() as u64, rss_mb = ?crate::telemetry::rss_mb(),
            "cycle finished"
        );
        Ok(report)
    }

    async fn push(
        &self,
        store: &Store,
        the_plan: &plan::Plan,
        cycle_id: i64,
        opts: &CycleOptions,
    ) -> Result<PushSummary, EngineError> {
        let progress = opts.progress.as_ref();
        let mut pusher = push::Pusher::new(&self.vms, store, &self.core, &self.settings.vms);
        pusher.stop = opts.stop.clone();
        let now = Utc::now();
        let retries = store.load_retries().await?;
        let total = the_plan.ops.len() as u64;
        let mut summary = PushSummary::default();
        let mut audit = vec![];
        let mut done = 0u64;
        let mut live: HashSet<String> = HashSet::new();
        // Bookkeeping happens inside each op's future: awaiting the store in
        // the loop body would leave buffered futures unpolled while they hold
        // pool connections.
        let retries = &retries;
        let mut results = futures::stream::iter(OpFutures {
            engine: self,
            pusher: &pusher,
            store,
            ops: the_plan.ops.iter(),
            retries,
            now,
        })
        .buffer_unordered(self.settings.vms.concurrency.max(1) as usize);
        while let Some((op, outcome, settled)) = results.next().await {
            let (result, detail) = settled?;
            done += 1;
            if let Some(p) = progress {
                p("pushing", done, Some(total));
            }
            match &outcome {
                Outcome::Applied { .. } => {
                    summary.applied += 1;
                    if !op.target.gone {
                        live.insert(op.login.clone());
                    }
                }
                Outcome::Pending(_) => summary.pending += 1,
                Outcome::Quarantined(_) => {}
            }
            let metric_op = match &op.action {
                Action::Create => "create",
                Action::Update { .. } => "update",
                Action::Delete => "delete",
            };
            metrics::get()
                .operations
                .get_or_create(&metrics::OpResult {
                    op: metric_op.into(),
                    result: result.into(),
                })
                .inc();
            audit.push(AuditRow {
                login: op.login.clone(),
                action: op.label(&self.core.status_blocked).into(),
                result: result.into(),
                detail,
            });
        }
        drop(results);
        for op in &the_plan.held {
            metrics::get()
                .operations
                .get_or_create(&metrics::OpResult {
                    op: match op.action {
                        Action::Delete => "delete",
                        _ => "update",
                    }
                    .into(),
                    result: "held".into(),
                })
                .inc();
            audit.push(AuditRow {
                login: op.login.clone(),
                action: op.label(&self.core.status_blocked).into(),
                result: "held".into(),
                detail: String::new(),
            });
        }

        // Tree elements.
        let tree_q: HashSet<String> = store
            .load_quarantine()
            .await?
            .into_iter()
            .filter(|q| q.part == "tree")
            .map(|q| q.key)
            .collect();
        for t in &the_plan.tree {
            if tree_q.contains(&t.external_id) || pusher.breaker.is_open() || pusher.stopping() {
                continue;
            }
            let op = if t.create {
                "tree_create"
            } else {
                "tree_update"
            };
            let result = match pusher.tree(&t.external_id, &t.name, t.create).await {
                Ok(()) => {
                    store.record_tree(&t.external_id, &t.name).await?;
                    "applied"
                }
                Err(e) if e.is_transient() => "retry",
                Err(e) => {
                    store
                        .quarantine(&t.external_id, "tree", &e.message, "")
                        .await?;
                    "quarantined"
                }
            };
            metrics::get()
                .operations
                .get_or_create(&metrics::OpResult {
                    op: op.into(),
                    result: result.into(),
                })
                .inc();
            audit.push(AuditRow {
                login: t.external_id.clone(),
                action: op.into(),
                result: result.into(),
                detail: t.name.clone(),
            });
        }

        // Write-backs, for users the VMS now has.
        if let Some(attr) = &self.core.writeback_attribute {
            let ap = self.sources.iter().find_map(|s| match s {
                Source::Activeplatform(c) => Some(c),
                _ => None,
            });
            let applied_now = store.load_applied().await?;
            for w in &the_plan.writebacks {
                let Some(ap) = ap else { break };
                if pusher.stopping()
                    || !applied_now.users.contains_key(&w.login) && !live.contains(&w.login)
                {
                    continue;
                }
                let result = match ap.write_attribute(&w.account.id, attr, &w.login).await {
                    Ok(()) => {
                        store.record_writeback(&w.account, &w.login).await?;
                        "applied"
                    }
                    Err(e) => {
                        tracing::warn!(account = %w.account, error = %e, "write-back failed; retried next cycle");
                        "retry"
                    }
                };
                metrics::get()
                    .operations
                    .get_or_create(&metrics::OpResult {
                        op: "writeback".into(),
                        result: result.into(),
                    })
                    .inc();
                audit.push(AuditRow {
                    login: w.login.clone(),
                    action: "writeback".into(),
                    result: result.into(),
                    detail: String::new(),
                });
            }
        }
        store.audit(cycle_id, &audit).await?;
        summary.breaker_open = pusher.breaker.is_open();
        Ok(summary)
    }

    /// One op pushed and settled. Boxed with one named lifetime, which keeps
    /// the cycle future `Send` for the daemon's spawn.
    fn push_one<'a>(
        &'a self,
        pusher: &'a push::Pusher<'a>,
        store: &'a Store,
        op: &'a plan::Op,
        retries: &'a std::collections::HashMap<String, RetryInfo>,
        now: DateTime<Utc>,
    ) -> futures::future::BoxFuture<'a, Pushed<'a>> {
        Box::pin(async move {
            let outcome = pusher.execute(op).await;
            let settled = self.settle(store, op, &outcome, retries, now).await;
            (op, outcome, settled)
        })
    }

    /// Records how one op ended: retry state, quarantine, the plan row.
    async fn settle(
        &self,
        store: &Store,
        op: &plan::Op,
        outcome: &Outcome,
        retries: &std::collections::HashMap<String, RetryInfo>,
        now: DateTime<Utc>,
    ) -> Result<(&'static str, String), StoreError> {
        Ok(match outcome {
            Outcome::Applied { adopted } => {
                store.plan_done(&op.login).await?;
                if retries.contains_key(&op.login) {
                    store.clear_retry(&op.login).await?;
                }
                let detail = if *adopted {
                    "adopted existing user"
                } else {
                    ""
                };
                ("applied", detail.to_string())
            }
            Outcome::Pending(e) => {
                let attempts = retries.get(&op.login).map(|r| r.attempts).unwrap_or(0) + 1;
                let info = RetryInfo {
                    attempts,
                    next_attempt_at: next_attempt(
                        now,
                        attempts,
                        self.settings.vms.requeue_base_secs,
                    ),
                    last_error: e.clone(),
                };
                store.set_retry(&op.login, &info).await?;
                ("retry", e.clone())
            }
            Outcome::Quarantined(e) => {
                tracing::warn!(login = %op.login, error = %e, "quarantined after a permanent VMS error");
                store
                    .quarantine(&op.login, "user", e, &state_hash(&op.target))
                    .await?;
                store.clear_retry(&op.login).await?;
                store.plan_done(&op.login).await?;
                ("quarantined", e.clone())
            }
        })
    }
}

/// Yields each op's future. A plain iterator rather than `map` with a
/// closure: a closure over `&Op` here makes the cycle future lose `Send`
/// (a known limit of higher-ranked lifetimes in auto traits).
struct OpFutures<'a> {
    engine: &'a Engine,
    pusher: &'a push::Pusher<'a>,
    store: &'a Store,
    ops: std::slice::Iter<'a, plan::Op>,
    retries: &'a std::collections::HashMap<String, RetryInfo>,
    now: DateTime<Utc>,
}

impl<'a> Iterator for OpFutures<'a> {
    type Item = futures::future::BoxFuture<'a, Pushed<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let op = self.ops.next()?;
        Some(
            self.engine
                .push_one(self.pusher, self.store, op, self.retries, self.now),
        )
    }
}

type Pushed<'a> = (
    &'a plan::Op,
    Outcome,
    Result<(&'static str, String), StoreError>,
);

#[derive(Debug, Default)]
struct PushSummary {
    applied: usize,
    pending: usize,
    breaker_open: bool,
}
