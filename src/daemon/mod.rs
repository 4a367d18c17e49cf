//! `billsync run`: the state lock, the admin server, cron schedules, a cycle
//! loop that never overlaps itself, operator requests, systemd
//! notifications, and a graceful stop on SIGTERM/SIGINT (SPEC §2.4).

mod admin;
pub mod notify;
pub mod serve;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch, Notify};
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::config::Settings;
use crate::core::cycle::{CycleKind, CycleResult};
use crate::engine::{CycleOptions, Engine, Progress, Targets};
use crate::store::{RequestKind, StateLock, Store};
use crate::telemetry::liveness::{self, Pulse};
use crate::telemetry::metrics;

/// What the loop, the scheduler and the admin server share.
pub struct Shared {
    pub settings: Settings,
    pub store: Store,
    pub heartbeat: &'static Pulse,
    pub running: AtomicBool,
    pub loop_alive: AtomicBool,
    pub wake: Notify,
    pub started: Instant,
    pub started_at: DateTime<Utc>,
    /// The incremental schedule's period (for health).
    pub period: Duration,
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

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Locked(String),
    #[error("{0}")]
    Other(String),
}

/// Starts everything and returns once the admin server listens and the
/// store is migrated (READY=1 has been sent).
pub async fn start(settings: Settings, resync: bool) -> Result<(Daemon, StateLock), StartError> {
    let lock = StateLock::try_acquire(&settings.daemon.state_path).map_err(StartError::Locked)?;
    let engine = Engine::new(settings.clone())
        .await
        .map_err(|e| StartError::Other(e.to_string()))?;
    let store = engine.store.clone();
    let abandoned = store
        .close_abandoned_cycles()
        .await
        .map_err(|e| StartError::Other(e.to_string()))?;
    if abandoned > 0 {
        tracing::warn!(
            abandoned,
            "cycles left unfinished by a previous run were closed as failed"
        );
    }
    if resync {
        store
            .request(RequestKind::Resync, None)
            .await
            .map_err(|e| StartError::Other(e.to_string()))?;
    }
    let shared = Arc::new(Shared {
        period: crate::config::schedule_period(&settings.daemon.schedule),
        settings: settings.clone(),
        store: store.clone(),
        heartbeat: liveness::pulse(),
        running: AtomicBool::new(false),
        loop_alive: AtomicBool::new(true),
        wake: Notify::new(),
        started: Instant::now(),
        started_at: Utc::now(),
    });
    shared.heartbeat.beat();

    let listener = tokio::net::TcpListener::bind(&settings.admin.listen)
        .await
        .map_err(|e| StartError::Other(format!("admin.listen {}: {e}", settings.admin.listen)))?;
    let admin_addr = listener
        .local_addr()
        .map_err(|e| StartError::Other(e.to_string()))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let admin = {
        let router = admin::router(shared.clone());
        let mut rx = shutdown_rx.clone();
        let limits = serve::Limits::default();
        tokio::spawn(async move {
            serve::serve(
                listener,
                router,
                limits,
                async move { stopped(&mut rx).await },
            )
            .await;
        })
    };
    tracing::info!(admin = %admin_addr, state = %settings.daemon.state_path.display(), "billsync is running");

    // Schedules only send ticks; the loop runs the cycles, one at a time.
    let (tick_tx, tick_rx) = mpsc::channel::<CycleKind>(1);
    let mut scheduler = JobScheduler::new()
        .await
        .map_err(|e| StartError::Other(format!("scheduler: {e}")))?;
    let mut schedules = vec![(settings.daemon.schedule.clone(), CycleKind::Incremental)];
    if !settings.daemon.payments_schedule.is_empty() {
        schedules.push((
            settings.daemon.payments_schedule.clone(),
            CycleKind::Payments,
        ));
    }
    if !settings.daemon.full_resync_schedule.is_empty() {
        schedules.push((
            settings.daemon.full_resync_schedule.clone(),
            CycleKind::Full,
        ));
    }
    for (expr, kind) in schedules {
        let tx = tick_tx.clone();
        let sh = shared.clone();
        let job = Job::new_async(expr.as_str(), move |_, _| {
            let tx = tx.clone();
            let sh = sh.clone();
            Box::pin(async move {
                let busy = sh.running.load(Ordering::Relaxed) || tx.try_send(kind).is_err();
                // A payment tick during a cycle is no news: that cycle, or
                // the next tick, reads the payments.
                if busy && kind != CycleKind::Payments {
                    metrics::get().cycle(kind, metrics::SKIPPED);
                    tracing::info!(
                        kind = kind.as_str(),
                        "a cycle is still running; this tick is skipped"
                    );
                }
            })
        })
        .map_err(|e| StartError::Other(format!("schedule {expr:?}: {e}")))?;
        scheduler
            .add(job)
            .await
            .map_err(|e| StartError::Other(format!("scheduler: {e}")))?;
    }
    scheduler
        .start()
        .await
        .map_err(|e| StartError::Other(format!("scheduler: {e}")))?;

    notify::ready();
    let watchdog = notify::spawn_watchdog(shared.heartbeat);
    let loop_task = tokio::spawn(cycle_loop(engine, shared.clone(), tick_rx, shutdown_rx));
    let task = tokio::spawn(async move {
        let _ = loop_task.await;
        let _ = scheduler.shutdown().await;
        if let Some(w) = watchdog {
            w.abort();
        }
        let _ = admin.await;
        shared.store.close().await;
    });
    Ok((
        Daemon {
            admin_addr,
            shutdown: shutdown_tx,
            task,
        },
        lock,
    ))
}

async fn cycle_loop(
    engine: Engine,
    shared: Arc<Shared>,
    mut ticks: mpsc::Receiver<CycleKind>,
    mut shutdown: watch::Receiver<bool>,
) {
    let poll = Duration::from_secs(shared.settings.daemon.control_poll_secs.max(1));
    let mut control = tokio::time::interval(poll);
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let grace = Duration::from_secs(shared.settings.daemon.shutdown_grace_secs);
    loop {
        let kind = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            _ = beat.tick() => {
                shared.heartbeat.beat();
                continue;
            }
            Some(k) = ticks.recv() => k,
            _ = control.tick() => match requested(&shared.store).await {
                Some(k) => k,
                None => continue,
            },
            _ = shared.wake.notified() => match requested(&shared.store).await {
                Some(k) => k,
                None => continue,
            },
        };
        shared.running.store(true, Ordering::Relaxed);
        shared.heartbeat.beat();
        let stop = Arc::new(AtomicBool::new(false));
        let progress: Progress = Arc::new(|_: &str, _, _| liveness::beat());
        let opts = CycleOptions {
            full: kind.is_full(),
            // Its accounts come from the pending trigger requests.
            targets: (kind == CycleKind::Targeted).then(Targets::default),
            progress: Some(progress),
            stop: Some(stop.clone()),
            ..Default::default()
        };
        let cycle = async {
            match kind {
                CycleKind::Payments => engine.run_payments(&opts).await,
                _ => engine.run_cycle(&opts).await.map(Some),
            }
        };
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
        shared.running.store(false, Ordering::Relaxed);
        shared.heartbeat.beat();
        match result {
            Some(Ok(Some(r))) => tracing::debug!(result = %r.result, "cycle done"),
            Some(Ok(None)) => {}
            Some(Err(e)) => {
                tracing::error!(error = %e, "cycle aborted");
                metrics::get().cycle(kind, CycleResult::Failed.as_str());
            }
            None => tracing::warn!("the cycle did not finish within the shutdown grace; its unfinished work is redone at the next start"),
        }
        if stopping {
            break;
        }
    }
    shared.loop_alive.store(false, Ordering::Relaxed);
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

/// A pending operator request, as the kind of cycle it asks for.
async fn requested(store: &Store) -> Option<CycleKind> {
    match store.pending_requests().await {
        Ok(r) if r.resync_all => Some(CycleKind::Full),
        Ok(r) if r.approve || !r.resync_logins.is_empty() => Some(CycleKind::Incremental),
        Ok(r) if !r.trigger_ids.is_empty() => Some(CycleKind::Targeted),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read operator requests");
            None
        }
    }
}

/// `billsync run`: until SIGTERM or SIGINT, then exit 0.
pub async fn run(settings: Settings, resync: bool) -> u8 {
    let (daemon, _lock) = match start(settings, resync).await {
        Ok(d) => d,
        Err(StartError::Locked(e)) => {
            eprintln!("billsync: not starting: {e}");
            return crate::cli::EXIT_ABORTED;
        }
        Err(StartError::Other(e)) => {
            eprintln!("billsync: {e}");
            return crate::cli::EXIT_ABORTED;
        }
    };
    wait_for_signal().await;
    tracing::info!("signal received; shutting down");
    notify::stopping();
    daemon.stop().await;
    tracing::info!("stopped");
    crate::cli::EXIT_OK
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
