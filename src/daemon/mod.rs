//! `billsync run`: the state lock, the admin server, cron schedules, a cycle
//! loop that never overlaps itself, operator requests, systemd
//! notifications, and a graceful stop on SIGTERM/SIGINT (SPEC §2.4).

mod admin;
mod leader;
pub mod notify;
pub mod serve;
mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch, Notify};
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};

use crate::config::Settings;
use crate::core::cycle::{CycleKind, CycleResult};
use crate::engine::{CycleOptions, Engine, Progress, Targets};
use crate::store::{RequestKind, StateLock, Store};
use crate::telemetry::liveness::{self, Pulse};
use crate::telemetry::metrics;

/// The two lanes of cycles (SPEC §10.2). Listing cycles take a minute or
/// more at scale; the fast lane (payment ticks, triggers) runs beside them,
/// so a payment never waits for a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Listing,
    Fast,
}

impl Lane {
    pub fn of(kind: CycleKind) -> Self {
        match kind.lists() {
            true => Lane::Listing,
            false => Lane::Fast,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Lane::Listing => "listing",
            Lane::Fast => "fast",
        }
    }
}

/// One lane's flags: whether a cycle runs, its wake-up call, its pulse,
/// and the stop flag of the cycle running now.
#[derive(Default)]
pub struct LaneState {
    pub running: AtomicBool,
    pub wake: Notify,
    pub pulse: Arc<Pulse>,
    stop: std::sync::Mutex<Option<Arc<AtomicBool>>>,
}

/// What the lanes, the scheduler and the admin server share.
pub struct Shared {
    pub settings: Settings,
    pub store: Store,
    pub listing: LaneState,
    pub fast: LaneState,
    /// False once a lane has ended.
    pub loop_alive: AtomicBool,
    pub started: Instant,
    pub started_at: DateTime<Utc>,
    /// The incremental schedule's period (for health).
    pub period: Duration,
    /// This node's lease on a shared store (SPEC §13); None on SQLite.
    pub node: Option<Arc<crate::lease::Node>>,
}

impl Shared {
    pub fn lane(&self, lane: Lane) -> &LaneState {
        match lane {
            Lane::Listing => &self.listing,
            Lane::Fast => &self.fast,
        }
    }

    pub fn pulses(&self) -> Vec<Arc<Pulse>> {
        vec![self.listing.pulse.clone(), self.fast.pulse.clone()]
    }

    /// Since the stalest lane last showed progress.
    pub fn heartbeat_age(&self) -> Duration {
        notify::oldest_beat(&self.pulses())
    }

    /// Whether this node may run cycles: it leads, or needs no lease.
    pub fn leads(&self) -> bool {
        self.node.as_ref().is_none_or(|n| n.leading().is_some())
    }

    fn any_running(&self) -> bool {
        [&self.listing, &self.fast]
            .iter()
            .any(|l| l.running.load(Ordering::Relaxed))
    }

    /// Asks the cycles running now to send nothing more.
    fn stop_cycles(&self) {
        for lane in [&self.listing, &self.fast] {
            let flag = lane.stop.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(stop) = flag.as_ref() {
                stop.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// A handle on a running daemon (for `run`, the sandbox and tests).
pub struct Daemon {
    pub admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Daemon {
    /// Asks it to stop and waits until it has.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Why the daemon did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another billsync holds the state store.
    #[error("not starting: {0}")]
    Locked(String),
    #[error("{0}")]
    Other(String),
}

fn other(e: impl std::fmt::Display) -> StartError {
    StartError::Other(e.to_string())
}

/// Starts everything and returns once the admin server listens and the
/// store is migrated (READY=1 has been sent).
pub async fn start(
    settings: Settings,
    resync: bool,
) -> Result<(Daemon, Option<StateLock>), StartError> {
    let (engine, lock, node) = match settings.daemon.state_url.expose() {
        Some(url) => {
            let (engine, node) = leader::open(&settings, url).await?;
            request_resync(&engine, resync).await?;
            (engine, None, Some(node))
        }
        None => {
            let lock =
                StateLock::try_acquire(&settings.daemon.state_path).map_err(StartError::Locked)?;
            metrics::get().leader.set(1);
            (open_engine(&settings, resync).await?, Some(lock), None)
        }
    };
    let shared = Arc::new(Shared {
        node: node.clone(),
        period: crate::config::schedule_period(&settings.daemon.schedule),
        settings: settings.clone(),
        store: engine.store.clone(),
        listing: LaneState::default(),
        fast: LaneState::default(),
        loop_alive: AtomicBool::new(true),
        started: Instant::now(),
        started_at: Utc::now(),
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (admin, admin_addr) = serve_admin(&settings, &shared, shutdown_rx.clone()).await?;
    tracing::info!(admin = %admin_addr, state = %settings.daemon.state_path.display(), "billsync is running");
    let (scheduler, [listing_rx, fast_rx], listing_tx) =
        start_schedules(&settings, &shared).await?;
    let keeper = node.clone().map(|n| {
        let run = leader::keep(n, shared.clone(), listing_tx, shutdown_rx.clone());
        tokio::spawn(run)
    });
    notify::ready();
    let watchdog = notify::spawn_watchdog(shared.pulses());
    let engine = Arc::new(engine);
    let lanes = [(Lane::Listing, listing_rx), (Lane::Fast, fast_rx)].map(|(lane, rx)| {
        let run = cycle_loop(
            engine.clone(),
            shared.clone(),
            lane,
            rx,
            shutdown_rx.clone(),
        );
        tokio::spawn(run)
    });
    let task = tokio::spawn(async move {
        for lane in lanes {
            let _ = lane.await;
        }
        // Given up only now: a successor must not close the cycles that
        // were still finishing in the shutdown grace.
        if let Some(keeper) = keeper {
            let _ = keeper.await;
        }
        if let Some(node) = &node {
            node.release().await;
            metrics::get().leader.set(0);
        }
        let mut scheduler = scheduler;
        let _ = scheduler.shutdown().await;
        if let Some(w) = watchdog {
            w.abort();
        }
        let _ = admin.await;
        shared.store.close().await;
    });
    let daemon = Daemon {
        admin_addr,
        shutdown: shutdown_tx,
        task,
    };
    Ok((daemon, lock))
}

/// The engine on a migrated store: cycles a previous run left open are
/// closed as failed, and `run --resync` is recorded as a request.
async fn open_engine(settings: &Settings, resync: bool) -> Result<Engine, StartError> {
    let engine = Engine::new(settings.clone()).await.map_err(other)?;
    let abandoned = engine.store.close_abandoned_cycles().await.map_err(other)?;
    if abandoned > 0 {
        tracing::warn!(
            abandoned,
            "cycles left unfinished by a previous run were closed as failed"
        );
    }
    request_resync(&engine, resync).await?;
    Ok(engine)
}

/// `run --resync`, recorded as a request (the leader acts on it).
async fn request_resync(engine: &Engine, resync: bool) -> Result<(), StartError> {
    if resync {
        let request = engine.store.request(RequestKind::Resync, None);
        request.await.map_err(other)?;
    }
    Ok(())
}

/// The admin server, listening, until `shutdown`.
async fn serve_admin(
    settings: &Settings,
    shared: &Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> Result<(tokio::task::JoinHandle<()>, SocketAddr), StartError> {
    let listen = &settings.admin.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| StartError::Other(format!("admin.listen {listen}: {e}")))?;
    let addr = listener.local_addr().map_err(other)?;
    let tls = match (&settings.admin.tls_cert_file, &settings.admin.tls_key_file) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key).map_err(StartError::Other)?),
        _ => None,
    };
    if tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(listen = %listen, "the admin server listens off loopback without TLS: its bearer token crosses the network in clear text; set admin.tls_cert_file and admin.tls_key_file");
    }
    let router = admin::router(shared.clone());
    let mut rx = shutdown;
    let limits = serve::Limits::default();
    let task = tokio::spawn(async move {
        serve::serve(listener, router, limits, tls, async move {
            stopped(&mut rx).await
        })
        .await;
    });
    Ok((task, addr))
}

/// The schedules, started: they only send ticks, to the listing lane and
/// to the fast lane (whose receivers come back in that order).
async fn start_schedules(
    settings: &Settings,
    shared: &Arc<Shared>,
) -> Result<
    (
        JobScheduler,
        [mpsc::Receiver<CycleKind>; 2],
        mpsc::Sender<CycleKind>,
    ),
    StartError,
> {
    let (listing_tx, listing_rx) = mpsc::channel::<CycleKind>(1);
    let (fast_tx, fast_rx) = mpsc::channel::<CycleKind>(1);
    let scheduler_err = |e: JobSchedulerError| StartError::Other(format!("scheduler: {e}"));
    let scheduler = JobScheduler::new().await.map_err(scheduler_err)?;
    for (expr, kind) in schedules(settings) {
        let tx = match Lane::of(kind) {
            Lane::Listing => listing_tx.clone(),
            Lane::Fast => fast_tx.clone(),
        };
        let job = tick_job(&expr, kind, tx, shared.clone())?;
        scheduler.add(job).await.map_err(scheduler_err)?;
    }
    scheduler.start().await.map_err(scheduler_err)?;
    Ok((scheduler, [listing_rx, fast_rx], listing_tx))
}

/// The cron schedules of the daemon, each with the kind of cycle it ticks.
fn schedules(settings: &Settings) -> Vec<(String, CycleKind)> {
    let d = &settings.daemon;
    let all = [
        (&d.schedule, CycleKind::Incremental),
        (&d.payments_schedule, CycleKind::Payments),
        (&d.full_resync_schedule, CycleKind::Full),
    ];
    all.into_iter()
        .filter(|(expr, kind)| !expr.is_empty() || *kind == CycleKind::Incremental)
        .map(|(expr, kind)| (expr.clone(), kind))
        .collect()
}

/// A schedule's job: it only sends a tick to its lane.
fn tick_job(
    expr: &str,
    kind: CycleKind,
    tx: mpsc::Sender<CycleKind>,
    shared: Arc<Shared>,
) -> Result<Job, StartError> {
    let job = Job::new_async(expr, move |_, _| {
        let tx = tx.clone();
        let sh = shared.clone();
        Box::pin(async move {
            let lane = sh.lane(Lane::of(kind));
            let busy = lane.running.load(Ordering::Relaxed) || tx.try_send(kind).is_err();
            // A payment tick during a fast cycle is no news: the next tick
            // reads the payments.
            if busy && kind != CycleKind::Payments {
                metrics::get().cycle(kind, metrics::SKIPPED);
                tracing::info!(
                    kind = kind.as_str(),
                    "a cycle is still running; this tick is skipped"
                );
            }
        })
    });
    job.map_err(|e| StartError::Other(format!("schedule {expr:?}: {e}")))
}

async fn cycle_loop(
    engine: Arc<Engine>,
    shared: Arc<Shared>,
    lane: Lane,
    mut ticks: mpsc::Receiver<CycleKind>,
    mut shutdown: watch::Receiver<bool>,
) {
    let state = shared.lane(lane);
    let poll = Duration::from_secs(shared.settings.daemon.control_poll_secs.max(1));
    let mut control = tokio::time::interval(poll);
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let grace = Duration::from_secs(shared.settings.daemon.shutdown_grace_secs);
    loop {
        let kind = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            _ = beat.tick() => {
                state.pulse.beat();
                continue;
            }
            Some(k) = ticks.recv() => k,
            _ = control.tick() => match requested(&shared.store, lane).await {
                Some(k) => k,
                None => continue,
            },
            _ = state.wake.notified() => match requested(&shared.store, lane).await {
                Some(k) => k,
                None => continue,
            },
        };
        let Some(stop) = start_run(&shared, state) else {
            continue;
        };
        state.pulse.beat();
        let progress: Progress = Arc::new(|_: &str, _, _| liveness::beat());
        let opts = CycleOptions {
            full: kind.is_full(),
            // Its accounts come from the pending trigger requests.
            targets: (kind == CycleKind::Targeted).then(Targets::default),
            progress: Some(progress),
            stop: Some(stop.clone()),
            ..Default::default()
        };
        let cycle = liveness::within(state.pulse.clone(), async {
            match kind {
                CycleKind::Payments => engine.run_payments(&opts).await,
                _ => engine.run_cycle(&opts).await.map(Some),
            }
        });
        tokio::pin!(cycle);
        let mut stopping = false;
        let result = tokio::select! {
            r = &mut cycle => Some(r),
            _ = stopped(&mut shutdown) => {
                stopping = true;
                tracing::info!(grace_secs = grace.as_secs(), "stopping: letting in-flight requests finish");
                stop.store(true, Ordering::Relaxed);
                tokio::time::timeout(grace, &mut cycle).await.ok()
            }
        };
        end_run(state);
        match result {
            Some(Ok(Some(r))) => tracing::debug!(lane = lane.as_str(), result = %r.result, "cycle done"),
            Some(Ok(None)) => {}
            Some(Err(e)) => {
                tracing::error!(error = %e, "cycle aborted");
                metrics::get().cycle(kind, CycleResult::Failed.as_str());
                if let Some(now) = fenced(&e) {
                    shared.node.iter().for_each(|n| n.step_down(now));
                }
            }
            None => tracing::warn!("the cycle did not finish within the shutdown grace; its unfinished work is redone at the next start"),
        }
        if stopping {
            break;
        }
    }
    shared.loop_alive.store(false, Ordering::Relaxed);
}

/// Marks the lane running, with a fresh stop flag, before leadership is
/// checked: a step-down in between then stops it, and the lease is not
/// claimed again while it starts. A standby runs no cycle (the leader acts
/// on the requests): None.
fn start_run(shared: &Shared, state: &LaneState) -> Option<Arc<AtomicBool>> {
    state.running.store(true, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    *state.stop.lock().unwrap_or_else(|e| e.into_inner()) = Some(stop.clone());
    if shared.leads() {
        return Some(stop);
    }
    end_run(state);
    None
}

fn end_run(state: &LaneState) {
    state.running.store(false, Ordering::Relaxed);
    *state.stop.lock().unwrap_or_else(|e| e.into_inner()) = None;
    state.pulse.beat();
}

/// The newer epoch, when a write failed because a newer leader exists
/// (SPEC §13).
fn fenced(e: &crate::engine::EngineError) -> Option<i64> {
    use crate::engine::EngineError;
    use crate::engine::PushError;
    use crate::store::StoreError::Fenced;
    match e {
        EngineError::Store(Fenced { now, .. })
        | EngineError::Push(PushError::Store(Fenced { now, .. })) => Some(*now),
        _ => None,
    }
}

/// Resolves once shutdown is asked for (or the sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// A pending operator request for this lane, as the kind of cycle it asks
/// for: resyncs and approvals list, triggers are targeted.
async fn requested(store: &Store, lane: Lane) -> Option<CycleKind> {
    match (store.pending_requests().await, lane) {
        (Ok(r), Lane::Listing) if r.resync_all => Some(CycleKind::Full),
        (Ok(r), Lane::Listing) if r.approve || !r.resync_logins.is_empty() => {
            Some(CycleKind::Incremental)
        }
        (Ok(r), Lane::Fast) if !r.trigger_ids.is_empty() => Some(CycleKind::Targeted),
        (Ok(_), _) => None,
        (Err(e), _) => {
            tracing::warn!(error = %e, "cannot read operator requests");
            None
        }
    }
}

/// `billsync run`: until SIGTERM or SIGINT. An error means it could not
/// start; the command line says so and maps it to an exit code.
pub async fn run(settings: Settings, resync: bool) -> Result<(), StartError> {
    let (daemon, _lock) = start(settings, resync).await?;
    wait_for_signal().await;
    tracing::info!("signal received; shutting down");
    notify::stopping();
    daemon.stop().await;
    tracing::info!("stopped");
    Ok(())
}

pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
