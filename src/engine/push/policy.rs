//! What happens after an error: one pure decision, in the style of kube-rs's
//! `error_policy`. The executor reports what went wrong; this decides.

use chrono::{DateTime, Duration, Utc};
use rand::Rng;

use crate::http::FetchError;
use crate::store::StoreError;
use crate::vms::VmsError;

/// Across-cycle backoff is capped at one hour (SPEC §2.1 step 8).
const MAX_BACKOFF_SECS: u64 = 3600;

/// Why a task did not complete.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The VMS refused, failed, or did not answer.
    #[error("{0}")]
    Vms(VmsError),
    /// The source refused a write-back.
    #[error("{0}")]
    Source(FetchError),
    /// The local state store could not record an answer: not the VMS's fault.
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl From<VmsError> for PushError {
    fn from(e: VmsError) -> Self {
        PushError::Vms(e)
    }
}

/// Which kind of task failed: the policy differs by what can be retried how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    User,
    Tree,
    Writeback,
}

/// What to do next about a failed task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Stays pending; not tried again before `at`.
    Retry { at: DateTime<Utc> },
    /// Held back until its desired state changes or an operator releases it.
    Quarantine(String),
    /// Stop pushing this cycle: outcomes can no longer be recorded.
    FailCycle,
}

/// The decision for a task that failed its `attempts`-th cycle in a row.
pub fn error_policy(
    task: TaskKind,
    error: &PushError,
    attempts: u32,
    now: DateTime<Utc>,
    requeue_base_secs: u64,
) -> Next {
    match (task, error) {
        (_, PushError::Store(_)) => Next::FailCycle,
        // Write-backs are planned again every cycle until one lands.
        (_, PushError::Source(_)) => Next::Retry { at: now },
        (TaskKind::User, PushError::Vms(e)) if e.is_transient() => Next::Retry {
            at: next_attempt(now, attempts, requeue_base_secs),
        },
        (_, PushError::Vms(e)) if e.is_transient() => Next::Retry { at: now },
        (_, PushError::Vms(e)) => Next::Quarantine(e.message.clone()),
    }
}

/// Backoff across cycles for a login that stays pending: `base` doubling per
/// attempt, capped at one hour, with jitter in its upper half.
pub fn next_attempt(now: DateTime<Utc>, attempts: u32, base_secs: u64) -> DateTime<Utc> {
    if base_secs == 0 {
        return now;
    }
    let exp = base_secs
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(16))
        .min(MAX_BACKOFF_SECS);
    let jittered = rand::rng().random_range(exp / 2..=exp.max(1));
    now + Duration::seconds(jittered as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::ErrorClass;

    fn vms(status: Option<u16>, class: ErrorClass) -> PushError {
        PushError::Vms(VmsError {
            class,
            status,
            message: format!("HTTP {status:?}"),
            errors: Default::default(),
            retry_after: None,
        })
    }

    fn delay(next: &Next, now: DateTime<Utc>) -> i64 {
        match next {
            Next::Retry { at } => (*at - now).num_seconds(),
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn transient_vms_errors_back_off_a_user() {
        let now = Utc::now();
        for status in [None, Some(408), Some(429), Some(500), Some(503)] {
            let e = vms(status, ErrorClass::Transient);
            let first = error_policy(TaskKind::User, &e, 1, now, 30);
            assert!((15..=30).contains(&delay(&first, now)), "{status:?}");
            let fourth = error_policy(TaskKind::User, &e, 4, now, 30);
            assert!((120..=240).contains(&delay(&fourth, now)), "{status:?}");
        }
    }

    #[test]
    fn permanent_vms_errors_quarantine_with_the_vms_message() {
        let now = Utc::now();
        for task in [TaskKind::User, TaskKind::Tree] {
            let e = vms(Some(422), ErrorClass::Permanent);
            assert_eq!(
                error_policy(task, &e, 1, now, 30),
                Next::Quarantine("HTTP Some(422)".into())
            );
        }
    }

    #[test]
    fn tree_and_writeback_failures_come_back_next_cycle() {
        let now = Utc::now();
        let e = vms(Some(502), ErrorClass::Transient);
        assert_eq!(
            error_policy(TaskKind::Tree, &e, 3, now, 30),
            Next::Retry { at: now }
        );
        for class in [ErrorClass::Transient, ErrorClass::Permanent] {
            let e = PushError::Source(FetchError {
                class,
                message: "refused".into(),
                status: Some(403),
                retry_after: None,
            });
            assert_eq!(
                error_policy(TaskKind::Writeback, &e, 1, now, 30),
                Next::Retry { at: now }
            );
        }
    }

    #[test]
    fn a_store_failure_fails_the_cycle_not_the_login() {
        let e = PushError::Store(StoreError::Decode("disk I/O error".into()));
        for task in [TaskKind::User, TaskKind::Tree, TaskKind::Writeback] {
            assert_eq!(error_policy(task, &e, 1, Utc::now(), 30), Next::FailCycle);
        }
    }

    #[test]
    fn backoff_doubles_to_an_hour_and_zero_means_every_cycle() {
        let now = Utc::now();
        for attempts in 1..40 {
            let exp = (30u64 << (attempts - 1).min(16)).min(3600) as i64;
            let d = (next_attempt(now, attempts, 30) - now).num_seconds();
            assert!((exp / 2..=exp).contains(&d), "attempt {attempts}: {d}s");
        }
        assert_eq!(next_attempt(now, 7, 0), now);
        let capped = (next_attempt(now, u32::MAX, u64::MAX) - now).num_seconds();
        assert!((1800..=3600).contains(&capped), "{capped}");
    }
}
