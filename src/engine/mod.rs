//! One cycle, in the phases of ARCHITECTURE.md: requests → read → desired →
//! select changed → plan with safety → persist → push → record.

mod clock;
mod finish;
mod index;
mod notices;
mod payments;
mod push;
pub mod read;
mod report;
pub mod reverify;
pub mod schedule;
mod select;
mod services;
mod targeted;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};

pub use clock::Clock;
pub use push::policy::{error_policy, next_attempt, Context, Next, PushError, TaskKind};
pub use push::{Outcome, PushSummary};
pub use report::{
    plan_entries as report_entries, CycleReport, OperationCounts, PlanEntry, SourceSummary,
};
pub use select::{Memory, Need, Planned};

use crate::config::Settings;
use crate::core::cycle::CycleKind;
use crate::core::desired::{self, CoreConfig};
use crate::core::model::{AccountKey, SourceKind};
use crate::core::normalize::Normalizer;
use crate::core::pacing::Pacing;
use crate::core::plan::Approval;
use crate::sources::{self, Source};
use crate::store::{RequestKind, Requests, Store, StoreError};
use crate::vms::VmsClient;

/// Cycles that may take an operator request without completing before it
/// is dropped (SPEC §10.4): a request must not turn a crash into a loop.
pub const REQUEST_ATTEMPTS: u32 = 3;

/// A cycle could not run at all (SPEC §4 exit 3).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("push stopped: {0}")]
    Push(#[from] PushError),
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
    /// Disabled or removed sources whose users this cycle deprovisions.
    pub retire: Vec<SourceKind>,
    pub progress: Option<Progress>,
    /// Shutdown: finish what is in flight, start nothing new.
    pub stop: Option<Arc<AtomicBool>>,
    /// A targeted cycle (SPEC §10.3): these accounts re-read, these logins
    /// pushed in full, pending trigger requests added.
    pub targets: Option<Targets>,
    /// The targets come from the payment fast path (labelled `payments`).
    pub payments: bool,
}

/// What a targeted cycle re-reads and pushes.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    pub accounts: BTreeSet<AccountKey>,
    pub logins: HashSet<String>,
}

/// What a cycle was asked to do: its options merged with operator requests.
#[derive(Debug, Clone)]
pub struct Intent {
    pub kind: CycleKind,
    pub dry_run: bool,
    pub approval: Approval,
    /// Logins pushed in full (`resync --login`).
    pub resync_logins: HashSet<String>,
    /// The requests this cycle consumes.
    pub request_ids: Vec<i64>,
    /// Sources whose users are frozen: disabled or removed, not retired.
    pub frozen: BTreeSet<SourceKind>,
    /// Accounts a targeted cycle re-reads (empty otherwise).
    pub accounts: BTreeSet<AccountKey>,
    /// This cycle's slice of rolling re-verification (SPEC §10.1): account
    /// details re-read, and logins pushed in full without releasing their
    /// quarantine or backoff.
    pub reverify_accounts: BTreeMap<SourceKind, HashSet<String>>,
    pub reverify_logins: HashSet<String>,
    pub started: DateTime<Utc>,
    /// The cycle's row id, assigned by the store when the cycle starts.
    pub cycle_id: i64,
    /// The cycle's read sequence (`Store::next_read_seq`): a read of a
    /// higher sequence supersedes one of a lower, whatever the wall clock
    /// said (it may step back).
    pub seq: i64,
}

pub struct Engine {
    pub settings: Settings,
    pub store: Store,
    sources: Vec<Source>,
    normalizers: BTreeMap<SourceKind, Arc<Normalizer>>,
    vms: VmsClient,
    /// Shared with the blocking thread that builds a cycle's desired state.
    core: Arc<CoreConfig>,
    pacing: Pacing,
    clock: Clock,
    /// The one push scheduler both lanes hand their work to.
    scheduler: schedule::Scheduler,
    limiter: Arc<governor::DefaultDirectRateLimiter>,
    /// The leader lease on a shared store (SPEC §13); none: always act.
    gate: Option<Arc<dyn crate::lease::Gate>>,
}

impl Engine {
    pub async fn new(settings: Settings) -> Result<Self, EngineError> {
        let d = &settings.daemon;
        let store =
            Store::open_configured(d.state_url.expose(), &d.state_path, d.lease_secs).await?;
        Self::with_store(settings, store)
    }

    pub fn with_store(settings: Settings, store: Store) -> Result<Self, EngineError> {
        let setup = |e: String| EngineError::Setup(e);
        let sources = sources::from_settings(&settings).map_err(|e| setup(e.to_string()))?;
        let normalizers = sources
            .iter()
            .map(|s| Ok((s.kind(), Arc::new(settings.normalizer(s.kind())?))))
            .collect::<Result<_, String>>()
            .map_err(setup)?;
        let vms = VmsClient::new(&settings.vms).map_err(|e| setup(e.to_string()))?;
        let core = Arc::new(settings.core_config());
        let limiter = push::limiter(&settings.vms);
        let pacing = settings.pacing();
        Ok(Self {
            settings,
            store,
            sources,
            normalizers,
            vms,
            core,
            pacing,
            clock: Clock::system(),
            scheduler: schedule::Scheduler::default(),
            limiter,
            gate: None,
        })
    }

    pub fn core(&self) -> &CoreConfig {
        &self.core
    }

    /// The desired state, built on a blocking thread: seconds of CPU at a
    /// million accounts, which on a runtime worker would hold up the
    /// payment lane's tasks queued behind it.
    async fn build_desired(
        &self,
        inputs: std::collections::BTreeMap<SourceKind, desired::SourceInput>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> desired::Desired {
        let core = Arc::clone(&self.core);
        let built = tokio::task::spawn_blocking(move || desired::build(&core, inputs, now));
        match built.await {
            Ok(desired) => desired,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down and drops this cycle.
            Err(_) => std::future::pending().await,
        }
    }

    /// Starts no VMS request or write-back unless `gate` allows it then.
    pub fn set_gate(&mut self, gate: Arc<dyn crate::lease::Gate>) {
        self.gate = Some(gate);
    }

    /// Replaces the wall clock cycles start by and record verifications
    /// with (tests of time-dependent behaviour).
    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    /// Runs one cycle. Errors only when the cycle could not run at all. A dry
    /// run works on a copy of the state file, so nothing changes anywhere.
    pub async fn run_cycle(&self, opts: &CycleOptions) -> Result<CycleReport, EngineError> {
        if !opts.dry_run {
            return self.cycle_on(&self.store, opts).await;
        }
        let dir = tempfile::tempdir().map_err(|e| EngineError::Setup(e.to_string()))?;
        let copy = dir.path().join("dry-run.db");
        self.store.snapshot_to(&copy).await?;
        let snapshot = Store::open(&copy).await?;
        let report = self.cycle_on(&snapshot, opts).await;
        snapshot.close().await;
        report
    }

    async fn cycle_on(
        &self,
        store: &Store,
        opts: &CycleOptions,
    ) -> Result<CycleReport, EngineError> {
        let clock = Instant::now();
        let intent = self.take_requests(store, opts).await?;
        let cycle_id = intent.cycle_id;
        let _running = (!intent.dry_run).then(|| self.scheduler.begin(intent.seq));
        if !intent.dry_run {
            store.start_requests(&intent.request_ids, cycle_id).await?;
        }
        let read = self
            .read_all(store, &intent, opts.progress.as_ref())
            .await?;
        debug_phase("sources read", clock);
        let mut desired = self.build_desired(read.inputs, intent.started).await;
        // A disabled or removed source is incomplete for ever and keeps its
        // logins (SPEC §9.4).
        desired.incomplete.extend(intent.frozen.iter().copied());
        if !intent.frozen.is_empty() {
            desired.keep_frozen(&store.applied_owners_in(&intent.frozen).await?);
        }
        if intent.kind.lists() && !intent.dry_run {
            read::record_camera_errors(store, &desired.camera_errors).await?;
        }
        debug_phase("desired state built", clock);
        let (need, held, mut memory) = self.select(store, &desired, &intent).await?;
        let planned = self
            .plan_with_safety(store, &desired, &need, &intent, &mut memory)
            .await?;
        let blocked = &self.core.status_blocked;
        let plan = &planned.plan;
        match intent.kind.lists() {
            true => {
                store
                    .persist_plan(cycle_id, &desired, plan, blocked)
                    .await?
            }
            false => (store.persist_targeted_plan(cycle_id, &desired, plan, blocked)).await?,
        }
        debug_phase("plan persisted", clock);
        if !intent.dry_run && !intent.reverify_logins.is_empty() {
            let ops = plan.ops.iter().chain(&plan.held);
            let planned_logins = ops.map(|o| o.login.as_str()).collect();
            let slice = &intent.reverify_logins;
            reverify::defer_unplanned(store, slice, &planned_logins, intent.started).await?;
        }
        let invalid = read.invalid + desired.camera_errors.len();
        let report = CycleReport::new(&intent, read.summaries, invalid, &desired, &planned);
        drop(desired);
        if intent.dry_run {
            return Ok(finish::dry_run(report, &planned, &self.core));
        }
        let turns = schedule::Turns::new(&self.scheduler, held.as_ref(), intent.seq);
        let pushed = self
            .push(store, &planned, &memory, &intent, turns, opts)
            .await?;
        let report = self
            .finish(store, cycle_id, report, &planned, &memory, pushed, clock)
            .await?;
        // A failed cycle leaves its requests for the next, up to a limit.
        if report.result.completed() {
            store
                .consume_requests(&intent.request_ids, cycle_id)
                .await?;
        }
        Ok(report)
    }

    /// Phase 4, which logins to plan. A targeted cycle holds its logins
    /// before it loads anything of their state (applied, in doubt, backoff),
    /// so a listing cycle's push cannot slip in between. Those a newer read
    /// decided meanwhile are left to it; the ones a trigger named are handed
    /// on as a resync, so their full push is not lost.
    async fn select(
        &self,
        store: &Store,
        desired: &desired::Desired,
        intent: &Intent,
    ) -> Result<(Need, Option<schedule::Taken<'_>>, Memory), EngineError> {
        if intent.kind.lists() || intent.dry_run {
            let memory = Memory::load(store, None).await?;
            let need = select::changed(store, &self.core, desired, intent, &memory).await?;
            return Ok((need, None, memory));
        }
        let mut logins = select::targeted(desired, intent);
        let sorted: BTreeSet<&String> = logins.iter().collect();
        let held = self.scheduler.hold(sorted.into_iter(), intent.seq).await;
        let named: Vec<String> = (logins.iter())
            .filter(|l| !held.holds_login(l) && intent.resync_logins.contains(*l))
            .cloned()
            .collect();
        logins.retain(|l| held.holds_login(l));
        if !named.is_empty() {
            tracing::info!(
                logins = named.len(),
                "named logins a newer cycle pushed meanwhile; resynced by the next listing"
            );
            store.request(RequestKind::Resync, Some(&named)).await?;
        }
        let owners = desired.users.values().map(|d| d.owner.clone());
        let memory = Memory::load(store, Some(owners.collect())).await?;
        Ok((
            Need {
                logins: Some(logins),
            },
            Some(held),
            memory,
        ))
    }

    /// Phase 1: the operator requests this cycle acts on. A resync clears
    /// quarantine and backoff for what it covers.
    async fn take_requests(
        &self,
        store: &Store,
        opts: &CycleOptions,
    ) -> Result<Intent, EngineError> {
        if !opts.dry_run {
            let dropped = store.drop_exhausted_requests(REQUEST_ATTEMPTS).await?;
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    attempts = REQUEST_ATTEMPTS,
                    "operator requests dropped after cycles that kept failing; see `status`"
                );
            }
        }
        let requests = store.pending_requests().await?;
        let mut intent = match &opts.targets {
            Some(targets) if !opts.full => self.targeted_intent(opts, targets, requests),
            _ => self.listing_intent(opts, requests),
        };
        if intent.kind == CycleKind::Incremental {
            let kinds: Vec<_> = self.sources.iter().map(|s| s.kind()).collect();
            let slice = reverify::due_slice(store, &kinds, self.pacing, intent.started).await?;
            intent.reverify_accounts = slice.accounts;
            intent.reverify_logins = slice.logins;
        }
        if !intent.dry_run {
            if intent.kind.is_full() {
                store.clear_for_resync(None).await?;
            } else if !intent.resync_logins.is_empty() {
                store.clear_for_resync(Some(&intent.resync_logins)).await?;
            }
            notices::unappliable_settings(store, &self.settings).await?;
        }
        intent.seq = store.next_read_seq().await?;
        intent.cycle_id = store.start_cycle(intent.kind, intent.started).await?;
        Ok(intent)
    }

    /// An incremental or full cycle takes resyncs and approvals; triggers
    /// are the fast lane's, which runs beside it.
    fn listing_intent(&self, opts: &CycleOptions, requests: Requests) -> Intent {
        let full = opts.full || requests.resync_all;
        Intent {
            kind: if full {
                CycleKind::Full
            } else {
                CycleKind::Incremental
            },
            dry_run: opts.dry_run,
            approval: match () {
                _ if opts.allow_deprovision || requests.approve_all => Approval::All,
                _ if requests.approve => Approval::Held(requests.approved_logins),
                _ => Approval::None,
            },
            resync_logins: requests.resync_logins,
            request_ids: requests.ids,
            frozen: self.frozen(opts),
            accounts: BTreeSet::new(),
            reverify_accounts: BTreeMap::new(),
            reverify_logins: HashSet::new(),
            started: self.clock.now(),
            cycle_id: 0,
            seq: 0,
        }
    }

    /// A targeted cycle takes only trigger requests; resyncs and approvals
    /// wait for a cycle that lists.
    fn targeted_intent(
        &self,
        opts: &CycleOptions,
        targets: &Targets,
        requests: Requests,
    ) -> Intent {
        let mut accounts = targets.accounts.clone();
        accounts.extend(requests.triggered_accounts);
        let mut logins = targets.logins.clone();
        logins.extend(requests.triggered_logins);
        Intent {
            kind: match opts.payments {
                true => CycleKind::Payments,
                false => CycleKind::Targeted,
            },
            dry_run: opts.dry_run,
            approval: Approval::None,
            resync_logins: logins,
            request_ids: requests.trigger_ids,
            frozen: self.frozen(opts),
            accounts,
            reverify_accounts: BTreeMap::new(),
            reverify_logins: HashSet::new(),
            started: self.clock.now(),
            cycle_id: 0,
            seq: 0,
        }
    }

    fn frozen(&self, opts: &CycleOptions) -> BTreeSet<SourceKind> {
        SourceKind::ALL
            .into_iter()
            .filter(|k| self.settings.source(*k).is_none() && !opts.retire.contains(k))
            .collect()
    }

    /// Phase 7: every planned operation through the one executor.
    async fn push(
        &self,
        store: &Store,
        planned: &Planned,
        memory: &Memory,
        intent: &Intent,
        turns: schedule::Turns<'_>,
        opts: &CycleOptions,
    ) -> Result<PushSummary, EngineError> {
        let executor = push::Executor::new(push::PushInput {
            vms: &self.vms,
            store,
            core: &self.core,
            settings: &self.settings.vms,
            writeback: self
                .sources
                .iter()
                .filter_map(|s| Some((s.kind(), s.writeback()?)))
                .collect(),
            retries: &memory.retries,
            tree_quarantined: &memory.tree_quarantined,
            unpushed_payments: &memory.unpushed_payments,
            applied: &planned.applied.users,
            stop: opts.stop.clone(),
            now: intent.started,
            limiter: self.limiter.clone(),
            gate: self.gate.clone(),
            pacing: self.pacing,
            restagger: intent.kind.is_full(),
            clock: self.clock.clone(),
            turns,
            cycle_id: intent.cycle_id,
        });
        let progress = opts.progress.as_ref();
        Ok(executor.push(&planned.plan, progress).await?)
    }
}

fn debug_phase(what: &str, clock: Instant) {
    tracing::debug!(
        ms = clock.elapsed().as_millis() as u64,
        rss_mb = ?crate::telemetry::rss_mb(),
        "{what}"
    );
}
