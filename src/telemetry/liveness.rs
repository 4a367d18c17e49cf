//! Signs of progress for the systemd watchdog and `/livez` (SPEC §10.4).
//! Every request that ends (answered or failed) and every second of a
//! deliberate wait (backoff, `Retry-After`) beats; so does an idle lane. A
//! lane stuck anywhere else stops beating, and systemd restarts the process.
//! Each daemon lane has its own pulse (a task-local), so one idle lane
//! cannot hide another that is stuck.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// The last sign of progress, in milliseconds since `start`.
pub struct Pulse {
    start: Instant,
    last_ms: AtomicU64,
}

impl Pulse {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub fn beat(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    pub fn age(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    /// A deliberate wait that beats every `step` of it.
    async fn sleep(&self, d: Duration, step: Duration) {
        let until = tokio::time::Instant::now() + d;
        loop {
            self.beat();
            let now = tokio::time::Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep((until - now).min(step)).await;
        }
    }
}

impl Default for Pulse {
    fn default() -> Self {
        Self::new()
    }
}

/// Beaten outside any lane (`sync` and other commands).
static PULSE: LazyLock<Pulse> = LazyLock::new(Pulse::new);

tokio::task_local! {
    static CURRENT: Arc<Pulse>;
}

/// Runs `f` with its progress beating `pulse`.
pub async fn within<F: Future>(pulse: Arc<Pulse>, f: F) -> F::Output {
    CURRENT.scope(pulse, f).await
}

/// `f`, beating the lane it is made in wherever it runs: a task spawned
/// from a lane does not inherit the lane's task-local.
pub fn in_this_lane<F: Future>(f: F) -> impl Future<Output = F::Output> {
    let pulse = CURRENT.try_with(Arc::clone).ok();
    async move {
        match pulse {
            Some(p) => within(p, f).await,
            None => f.await,
        }
    }
}

/// Progress was made.
pub fn beat() {
    if CURRENT.try_with(|p| p.beat()).is_err() {
        PULSE.beat();
    }
}

/// A deliberate wait (backoff, `Retry-After`): beats every second of it.
pub async fn sleep(d: Duration) {
    let step = Duration::from_secs(1);
    match CURRENT.try_with(Arc::clone) {
        Ok(p) => p.sleep(d, step).await,
        Err(_) => PULSE.sleep(d, step).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before: a 300 s `Retry-After` wait showed no progress for 300 s.
    #[tokio::test]
    async fn a_long_wait_keeps_beating() {
        let pulse = std::sync::Arc::new(Pulse::new());
        let p = pulse.clone();
        let step = Duration::from_millis(50);
        let waiting = tokio::spawn(async move { p.sleep(Duration::from_millis(800), step).await });
        let mut oldest = Duration::ZERO;
        while !waiting.is_finished() {
            oldest = oldest.max(pulse.age());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            oldest < Duration::from_millis(400),
            "no beat for {oldest:?} while waiting"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            pulse.age() >= Duration::from_millis(400),
            "beats after the wait ended"
        );
    }

    /// Progress inside a lane beats that lane's pulse, not another's.
    #[tokio::test]
    async fn beats_go_to_the_current_lane() {
        let (a, b) = (Arc::new(Pulse::new()), Arc::new(Pulse::new()));
        tokio::time::sleep(Duration::from_millis(30)).await;
        within(a.clone(), async { beat() }).await;
        assert!(a.age() < Duration::from_millis(20));
        assert!(b.age() >= Duration::from_millis(30));
    }

    /// Before: a source read spawned from a lane beat no lane, so a long
    /// listing looked like a stuck daemon.
    #[tokio::test]
    async fn a_task_spawned_in_a_lane_beats_that_lane() {
        let (a, b) = (Arc::new(Pulse::new()), Arc::new(Pulse::new()));
        tokio::time::sleep(Duration::from_millis(30)).await;
        let job = CURRENT.sync_scope(a.clone(), || in_this_lane(async { beat() }));
        tokio::spawn(job).await.unwrap();
        assert!(a.age() < Duration::from_millis(20));
        assert!(b.age() >= Duration::from_millis(30));
    }
}
