//! What happens after an error: one pure decision, in the style of kube-rs's
//! `error_policy`. The executor reports what went wrong; this decides.

use chrono::{DateTime, Duration, Utc};
use rand::Rng;

use crate::http::FetchError;
use crate::store::StoreError;
use crate::vms::{Blame, VmsError};

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

/// What the policy knows besides the error.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// Failed cycles in a row for this task, this one included.
    pub attempts: u32,
    pub now: DateTime<Utc>,
    pub requeue_base_secs: u64,
    /// The VMS confirmed other requests this cycle: a failure of this one
    /// looks like the login's, not the channel's.
    pub channel_works: bool,
}

/// The decision about a failed task.
///
/// - The store cannot record: fail the cycle (never the login's fault).
/// - An answer about the user's data (422, Laravel 400): quarantine.
/// - A refusal or failure of the channel: retry next cycle, never
///   quarantine; a user backs off across cycles only while the channel
///   demonstrably works for others (SPEC §9.3).
pub fn error_policy(task: TaskKind, error: &PushError, ctx: Context) -> Next {
    let next_cycle = Next::Retry { at: ctx.now };
    match (task, error) {
        (_, PushError::Store(_)) => Next::FailCycle,
        // Write-backs are planned again every cycle until one lands.
        (_, PushError::Source(_)) => next_cycle,
        (_, PushError::Vms(e)) if e.blame == Blame::Login => Next::Quarantine(e.message.clone()),
        (TaskKind::User, PushError::Vms(e)) if e.blame == Blame::Channel && ctx.channel_works => {
            Next::Retry {
                at: next_attempt(ctx.now, ctx.attempts, ctx.requeue_base_secs),
            }
        }
        (_, PushError::Vms(_)) => next_cycle,
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
    use crate::vms::{blame_of, decode_error};
    use reqwest::header::HeaderMap;

    fn ctx(attempts: u32, channel_works: bool) -> Context {
        Context {
            attempts,
            now: Utc::now(),
            requeue_base_secs: 30,
            channel_works,
        }
    }

    fn answer(status: u16, body: &str) -> PushError {
        PushError::Vms(decode_error(status, &HeaderMap::new(), body.as_bytes()))
    }

    fn no_answer(blame: Blame) -> PushError {
        PushError::Vms(VmsError {
            class: ErrorClass::Transient,
            blame,
            status: None,
            message: "timed out".into(),
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

    const LARAVEL: &str =
        r#"{"message":"The given data was invalid.","errors":{"status":["bad"]}}"#;

    /// Every channel refusal of SPEC §9.3, as the client decodes it.
    fn refusals() -> Vec<PushError> {
        let mut out: Vec<PushError> = [301, 302, 401, 403, 404, 405, 408, 409, 429, 500, 502, 503]
            .into_iter()
            .map(|s| answer(s, r#"{"message":"no"}"#))
            .collect();
        out.push(answer(400, "{}"));
        out.push(answer(403, "<html>forbidden</html>"));
        out.push(no_answer(Blame::Channel));
        out
    }

    #[test]
    fn only_answers_about_data_blame_the_login() {
        assert_eq!(blame_of(Some(422), false), Blame::Login);
        assert_eq!(blame_of(Some(400), true), Blame::Login);
        assert_eq!(blame_of(Some(400), false), Blame::Channel);
        for e in refusals() {
            let PushError::Vms(v) = &e else {
                unreachable!()
            };
            assert_eq!(v.blame, Blame::Channel, "{v:?}");
        }
        let PushError::Vms(v) = answer(400, LARAVEL) else {
            unreachable!()
        };
        assert_eq!(v.blame, Blame::Login);
    }

    #[test]
    fn answers_about_data_quarantine_users_and_tree_elements() {
        for task in [TaskKind::User, TaskKind::Tree] {
            for e in [answer(422, LARAVEL), answer(400, LARAVEL)] {
                let next = error_policy(task, &e, ctx(1, false));
                assert!(
                    matches!(next, Next::Quarantine(ref m) if m.contains("HTTP 4")),
                    "{next:?}"
                );
            }
        }
    }

    #[test]
    fn channel_refusals_never_quarantine_nor_back_off_while_the_channel_fails() {
        let c = ctx(5, false);
        for task in [TaskKind::User, TaskKind::Tree, TaskKind::Writeback] {
            for e in refusals() {
                assert_eq!(error_policy(task, &e, c), Next::Retry { at: c.now }, "{e}");
            }
        }
        let unsent = no_answer(Blame::NotSent);
        let works = ctx(5, true);
        assert_eq!(
            error_policy(TaskKind::User, &unsent, works),
            Next::Retry { at: works.now },
            "what was not sent never backs off"
        );
    }

    #[test]
    fn a_user_failing_alone_backs_off_across_cycles() {
        let e = answer(503, r#"{"message":"down"}"#);
        let first = ctx(1, true);
        let d = delay(&error_policy(TaskKind::User, &e, first), first.now);
        assert!((15..=30).contains(&d), "{d}");
        let fourth = ctx(4, true);
        let d = delay(&error_policy(TaskKind::User, &e, fourth), fourth.now);
        assert!((120..=240).contains(&d), "{d}");
        // A tree element has no backoff of its own.
        assert_eq!(
            error_policy(TaskKind::Tree, &e, fourth),
            Next::Retry { at: fourth.now }
        );
    }

    #[test]
    fn write_back_refusals_come_back_next_cycle() {
        let c = ctx(1, true);
        for class in [ErrorClass::Transient, ErrorClass::Permanent] {
            let e = PushError::Source(FetchError {
                class,
                message: "refused".into(),
                status: Some(403),
                retry_after: None,
            });
            assert_eq!(
                error_policy(TaskKind::Writeback, &e, c),
                Next::Retry { at: c.now }
            );
        }
    }

    #[test]
    fn a_store_failure_fails_the_cycle_not_the_login() {
        let e = PushError::Store(StoreError::Decode("disk I/O error".into()));
        for task in [TaskKind::User, TaskKind::Tree, TaskKind::Writeback] {
            assert_eq!(error_policy(task, &e, ctx(1, true)), Next::FailCycle);
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
