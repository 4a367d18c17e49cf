//! Pushing a plan to the VMS: bounded concurrency and rate, retries with
//! exponential backoff and full jitter (backon), `Retry-After`, the circuit
//! breaker, adoption on "login taken", and the applied state recorded on
//! every 2xx in its own transaction.

use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;

use crate::core::desired::CoreConfig;
use crate::core::plan::{Action, AppliedUser, Op};
use crate::http::ErrorClass;
use crate::store::Store;
use crate::telemetry::metrics;
use crate::vms::{VmsClient, VmsError, VmsOp};

/// How one op ended this cycle.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every request answered 2xx. `adopted`: the user existed already.
    Applied { adopted: bool },
    /// A transient failure outlived the retries, or the breaker opened.
    Pending(String),
    /// A permanent failure.
    Quarantined(String),
}

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

pub struct Pusher<'a> {
    pub vms: &'a VmsClient,
    pub store: &'a Store,
    pub core: &'a CoreConfig,
    pub breaker: Breaker,
    /// Set on shutdown: requests in flight finish, no new one starts.
    pub stop: Option<std::sync::Arc<AtomicBool>>,
    limiter: DefaultDirectRateLimiter,
    max_attempts: u32,
    max_retry_after: Duration,
}

fn breaker_error() -> VmsError {
    VmsError {
        class: ErrorClass::Transient,
        status: None,
        message: "circuit breaker open; not sent this cycle".into(),
        errors: Default::default(),
        retry_after: None,
    }
}

/// Full jitter: a uniform delay in `[0, d]`.
fn full_jitter(d: Duration) -> Duration {
    let ms = d.as_millis().min(u128::from(u64::MAX)) as u64;
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

impl<'a> Pusher<'a> {
    pub fn new(
        vms: &'a VmsClient,
        store: &'a Store,
        core: &'a CoreConfig,
        settings: &crate::config::VmsSettings,
    ) -> Self {
        let rps = NonZeroU32::new(settings.max_requests_per_second).unwrap_or(NonZeroU32::MIN);
        Self {
            vms,
            store,
            core,
            breaker: Breaker::new(settings.circuit_breaker_failures),
            stop: None,
            limiter: RateLimiter::direct(Quota::per_second(rps).allow_burst(NonZeroU32::MIN)),
            max_attempts: settings.max_attempts.max(1),
            max_retry_after: Duration::from_secs(settings.max_retry_after_secs),
        }
    }

    pub fn stopping(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
    }

    /// One request with in-cycle retries. 429 waits `min(Retry-After, cap)`.
    async fn request<F, Fut>(&self, op: VmsOp, f: F) -> Result<(), VmsError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), VmsError>>,
    {
        let f = std::sync::Mutex::new(f);
        let attempt = || async {
            if self.breaker.is_open() {
                return Err(breaker_error());
            }
            if self.stopping() {
                return Err(VmsError {
                    message: "shutting down; not sent".into(),
                    ..breaker_error()
                });
            }
            self.limiter.until_ready().await;
            let fut = {
                let mut g = f.lock().unwrap_or_else(|e| e.into_inner());
                (g)()
            };
            let r = fut.await;
            match &r {
                Ok(()) => self.breaker.success(),
                Err(e) if e.is_transient() => self.breaker.failure(),
                Err(_) => self.breaker.success(),
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
            .when(|e: &VmsError| e.is_transient() && !self.breaker.is_open() && !self.stopping())
            .adjust(move |e: &VmsError, d| match (d, e.retry_after) {
                (None, _) => None,
                (Some(_), Some(ra)) => Some(ra.min(cap)),
                (Some(d), None) => Some(full_jitter(d)),
            })
            .notify(|e: &VmsError, d| {
                metrics::get()
                    .operations
                    .get_or_create(&metrics::OpResult {
                        op: op.as_str().into(),
                        result: "retry".into(),
                    })
                    .inc();
                tracing::debug!(op = op.as_str(), error = %e, delay_ms = d.as_millis() as u64, "retrying");
            })
            .await
    }

    async fn record(&self, op: &Op, state: &crate::core::model::UserState) -> Result<(), String> {
        let user = AppliedUser {
            owner: op.owner.clone(),
            state: state.clone(),
        };
        self.store
            .record_applied(&op.login, &user)
            .await
            .map_err(|e| format!("applied but not recorded: {e}"))
    }

    fn managed_except(&self, keep: &BTreeSet<String>) -> BTreeSet<String> {
        self.core
            .managed
            .iter()
            .filter(|p| !keep.contains(*p))
            .cloned()
            .collect()
    }

    /// Full state: profile, every desired managed permission attached and
    /// every other managed permission detached.
    async fn full_patch(&self, op: &Op) -> Result<(), VmsError> {
        let t = &op.target;
        let detach = self.managed_except(&t.permissions);
        self.request(VmsOp::Update, || {
            self.vms.update(&op.login, t, &t.permissions, &detach)
        })
        .await
    }

    /// POST, record, then attach the permissions (create takes none).
    async fn create(&self, op: &Op) -> Result<Outcome, VmsError> {
        let t = &op.target;
        match self
            .request(VmsOp::Create, || self.vms.create(&op.login, t))
            .await
        {
            Ok(()) => {
                let mut bare = t.clone();
                bare.permissions = Default::default();
                self.record(op, &bare).await.map_err(store_err)?;
                if !t.permissions.is_empty() {
                    let none = BTreeSet::new();
                    self.request(VmsOp::Update, || {
                        self.vms.update(&op.login, t, &t.permissions, &none)
                    })
                    .await?;
                    self.record(op, t).await.map_err(store_err)?;
                }
                Ok(Outcome::Applied { adopted: false })
            }
            // The login exists (created by a run that died before recording,
            // or by hand): adopt it with a full-state PATCH.
            Err(e) if e.is_login_error() => {
                tracing::info!(login = %op.login, "login exists on the VMS; adopting it");
                self.full_patch(op).await?;
                self.record(op, t).await.map_err(store_err)?;
                Ok(Outcome::Applied { adopted: true })
            }
            Err(e) => Err(e),
        }
    }

    async fn update(
        &self,
        op: &Op,
        attach: &BTreeSet<String>,
        detach: &BTreeSet<String>,
    ) -> Result<Outcome, VmsError> {
        let t = &op.target;
        match self
            .request(VmsOp::Update, || {
                self.vms.update(&op.login, t, attach, detach)
            })
            .await
        {
            Ok(()) => {
                self.record(op, t).await.map_err(store_err)?;
                Ok(Outcome::Applied { adopted: false })
            }
            // The VMS no longer knows the login (removed by hand): re-create
            // once, then apply the full state. A second failure quarantines.
            Err(e) if e.is_login_error() => {
                tracing::warn!(login = %op.login, "the VMS no longer knows this login; creating it again");
                self.store
                    .remove_applied(&op.login)
                    .await
                    .map_err(|e| store_err(e.to_string()))?;
                match self
                    .request(VmsOp::Create, || self.vms.create(&op.login, t))
                    .await
                {
                    Ok(()) => {}
                    Err(e2) if e2.is_transient() => return Err(e2),
                    Err(e2) => {
                        return Ok(Outcome::Quarantined(format!(
                            "unknown to the VMS and re-creating failed: {e2}"
                        )))
                    }
                }
                self.full_patch(op).await?;
                self.record(op, t).await.map_err(store_err)?;
                Ok(Outcome::Applied { adopted: false })
            }
            Err(e) => Err(e),
        }
    }

    async fn delete(&self, op: &Op) -> Result<Outcome, VmsError> {
        match self
            .request(VmsOp::Delete, || self.vms.delete(&op.login))
            .await
        {
            // Unknown to the VMS: already what we want.
            Ok(())
            | Err(VmsError {
                status: Some(404), ..
            }) => {}
            Err(e) if e.is_login_error() => {}
            Err(e) => return Err(e),
        }
        self.store
            .remove_applied(&op.login)
            .await
            .map_err(|e| store_err(e.to_string()))?;
        Ok(Outcome::Applied { adopted: false })
    }

    pub async fn execute(&self, op: &Op) -> Outcome {
        let result = match &op.action {
            Action::Create => self.create(op).await,
            Action::Update { attach, detach, .. } => self.update(op, attach, detach).await,
            Action::Delete => self.delete(op).await,
        };
        match result {
            Ok(o) => o,
            Err(e) if e.is_transient() => Outcome::Pending(e.message),
            Err(e) => Outcome::Quarantined(e.message),
        }
    }

    /// Tree create (201) or rename (200). A 422 on create means the element
    /// exists: rename it instead.
    pub async fn tree(&self, external_id: &str, name: &str, create: bool) -> Result<(), VmsError> {
        if create {
            match self
                .request(VmsOp::TreeCreate, || {
                    self.vms.tree_create(name, external_id)
                })
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if e.status == Some(422) && e.errors.contains_key("external_id") => {}
                Err(e) => return Err(e),
            }
        }
        self.request(VmsOp::TreeUpdate, || {
            self.vms.tree_update(name, external_id)
        })
        .await
    }
}

fn store_err(e: impl std::fmt::Display) -> VmsError {
    // The VMS accepted; our record failed. Transient: the next cycle
    // re-pushes, and adoption absorbs the duplicate.
    VmsError {
        class: ErrorClass::Transient,
        status: None,
        message: format!("state store: {e}"),
        errors: Default::default(),
        retry_after: None,
    }
}
