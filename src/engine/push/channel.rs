//! The way to the VMS for one cycle: the rate limit, in-cycle retries with
//! exponential backoff and full jitter (backon), `Retry-After`, the circuit
//! breaker, and the stop flag of a shutdown.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;

use crate::config::VmsSettings;
use crate::core::cycle::OpResult;
use crate::http::ErrorClass;
use crate::telemetry::metrics;
use crate::vms::{Blame, VmsError, VmsOp};

/// Consecutive transient failures; open stops the cycle's pushing.
pub struct Breaker {
    limit: u32,
    failures: AtomicU32,
    open: AtomicBool,
}

impl Breaker {
    pub fn new(limit: u32) -> Self {
        Self {
            limit: limit.max(1),
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    fn failure(&self) {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= self.limit
            && !self.open.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                failures = self.limit,
                "circuit breaker open: no more VMS requests this cycle"
            );
        }
    }
}

/// What the VMS answered this cycle, request by request.
#[derive(Debug, Default)]
pub struct Answers {
    /// Confirmed: the channel works.
    pub confirmed: AtomicU32,
    /// About a user's data (422 and the like): the channel works too.
    pub about_data: AtomicU32,
    /// Refusals and failures of the channel.
    pub refused: AtomicU32,
}

impl Answers {
    fn count(&self, r: &Result<(), VmsError>) {
        let counter = match r {
            Ok(()) => &self.confirmed,
            Err(e) if e.blame == Blame::Login => &self.about_data,
            Err(_) => &self.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Some request was confirmed this cycle.
    pub fn channel_works(&self) -> bool {
        self.confirmed.load(Ordering::Relaxed) > 0
    }

    /// Requests went out and the channel refused every one of them.
    pub fn all_refused(&self) -> bool {
        let answered =
            self.confirmed.load(Ordering::Relaxed) + self.about_data.load(Ordering::Relaxed);
        self.refused.load(Ordering::Relaxed) > 0 && answered == 0
    }
}

pub struct Channel {
    pub breaker: Breaker,
    pub answers: Answers,
    /// Set on shutdown, or when outcomes can no longer be recorded: requests
    /// in flight finish, no new one starts.
    stop: Arc<AtomicBool>,
    /// Shared by every cycle of the process, so the lanes together stay
    /// within `vms.max_requests_per_second`.
    limiter: Arc<DefaultDirectRateLimiter>,
    /// The leader lease: no request starts while this node may not act.
    gate: Option<Arc<dyn crate::lease::Gate>>,
    max_attempts: u32,
    max_retry_after: Duration,
}

fn not_sent(why: &str) -> VmsError {
    VmsError {
        class: ErrorClass::Transient,
        blame: Blame::NotSent,
        status: None,
        message: format!("{why}; not sent this cycle"),
        errors: Default::default(),
        retry_after: None,
    }
}

/// Full jitter: a uniform delay in `[0, d]`.
fn full_jitter(d: Duration) -> Duration {
    let ms = d.as_millis().min(u128::from(u64::MAX)) as u64;
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

/// The process-wide VMS request rate limit.
pub fn limiter(settings: &VmsSettings) -> Arc<DefaultDirectRateLimiter> {
    let rps = NonZeroU32::new(settings.max_requests_per_second).unwrap_or(NonZeroU32::MIN);
    Arc::new(RateLimiter::direct(
        Quota::per_second(rps).allow_burst(NonZeroU32::MIN),
    ))
}

impl Channel {
    pub fn new(
        settings: &VmsSettings,
        limiter: Arc<DefaultDirectRateLimiter>,
        stop: Option<Arc<AtomicBool>>,
        gate: Option<Arc<dyn crate::lease::Gate>>,
    ) -> Self {
        Self {
            breaker: Breaker::new(settings.circuit_breaker_failures),
            answers: Answers::default(),
            stop: stop.unwrap_or_default(),
            limiter,
            gate,
            max_attempts: settings.max_attempts.max(1),
            max_retry_after: Duration::from_secs(settings.max_retry_after_secs),
        }
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Checked right before anything goes out (a VMS request, a
    /// write-back): a node that may no longer act as leader sends nothing
    /// more this cycle (SPEC §13). Nobody's fault: nothing was sent.
    pub fn may_send(&self) -> Result<(), VmsError> {
        if self.gate.as_ref().is_some_and(|g| !g.may_act()) {
            self.stop();
            return Err(not_sent("this node does not hold the leader lease"));
        }
        Ok(())
    }

    /// Nothing more goes out this cycle.
    pub fn closed(&self) -> bool {
        self.breaker.is_open() || self.stopping()
    }

    /// One request with in-cycle retries. 429 waits `min(Retry-After, cap)`.
    pub async fn request<F, Fut>(&self, op: VmsOp, f: F) -> Result<(), VmsError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), VmsError>>,
    {
        let f = std::sync::Mutex::new(f);
        let attempt = || async {
            if self.breaker.is_open() {
                return Err(not_sent("circuit breaker open"));
            }
            if self.stopping() {
                return Err(not_sent("stopping"));
            }
            self.limiter.until_ready().await;
            self.may_send()?;
            let fut = {
                let mut g = f.lock().unwrap_or_else(|e| e.into_inner());
                (g)()
            };
            let r = fut.await;
            self.answers.count(&r);
            match &r {
                Err(e) if e.blame == Blame::Channel => self.breaker.failure(),
                _ => self.breaker.success(),
            }
            r
        };
        let cap = self.max_retry_after;
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(10))
                    .with_max_times(self.max_attempts.saturating_sub(1) as usize),
            )
            .sleep(crate::telemetry::liveness::sleep)
            .when(|e: &VmsError| e.is_transient() && !self.closed())
            .adjust(move |e: &VmsError, d| match (d, e.retry_after) {
                (None, _) => None,
                (Some(_), Some(ra)) => Some(ra.min(cap)),
                (Some(d), None) => Some(full_jitter(d)),
            })
            .notify(|e: &VmsError, d| {
                metrics::get().operation(op.as_str(), OpResult::Retry);
                tracing::debug!(op = op.as_str(), error = %e, delay_ms = d.as_millis() as u64, "retrying");
            })
            .await
    }
}
