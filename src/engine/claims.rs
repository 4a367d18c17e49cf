//! One writer per login (SPEC §10.2): the listing lane and the fast lane
//! (payments, triggers) run at once, and a login is pushed by one of them
//! at a time. A targeted cycle re-read its accounts just now, so what it
//! pushed wins: a listing cycle that started before it leaves that login to
//! the next listing instead of pushing what it read earlier.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

/// Who asks to push a login, and when its cycle started reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// A listing cycle: superseded by a targeted push newer than its start.
    Listing(DateTime<Utc>),
    /// A targeted cycle: never superseded; waits its turn.
    Targeted(DateTime<Utc>),
}

#[derive(Default)]
pub struct Claims {
    state: Mutex<State>,
    freed: Notify,
}

#[derive(Default)]
struct State {
    held: HashSet<String>,
    /// Start of the newest targeted cycle that pushed each login; kept only
    /// while a cycle that started earlier still runs.
    targeted: HashMap<String, DateTime<Utc>>,
    /// Cycles running, by start.
    running: BTreeMap<DateTime<Utc>, usize>,
}

/// A login being pushed; released on drop.
pub struct Claim<'a> {
    claims: &'a Claims,
    login: String,
    writer: Writer,
}

/// A running cycle, registered so that what it may be superseded by is
/// remembered until it ends.
pub struct Running<'a> {
    claims: &'a Claims,
    started: DateTime<Utc>,
}

impl Claims {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn begin(&self, started: DateTime<Utc>) -> Running<'_> {
        *self.lock().running.entry(started).or_default() += 1;
        Running {
            claims: self,
            started,
        }
    }

    /// Waits until no other cycle pushes `login`, then holds it. `None`:
    /// a targeted cycle that started later pushed it; leave it.
    pub async fn claim(&self, login: &str, writer: Writer) -> Option<Claim<'_>> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut s = self.lock();
                if let Writer::Listing(started) = writer {
                    if s.targeted.get(login).is_some_and(|t| *t > started) {
                        return None;
                    }
                }
                if s.held.insert(login.to_string()) {
                    return Some(Claim {
                        claims: self,
                        login: login.to_string(),
                        writer,
                    });
                }
            }
            // Waiting on another lane is no stall of this one; that lane's
            // own pulse shows whether it is stuck.
            if tokio::time::timeout(Duration::from_secs(1), freed).await.is_err() {
                crate::telemetry::liveness::beat();
            }
        }
    }

    /// Logins held now (for tests and debugging).
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut s = self.claims.lock();
        s.held.remove(&self.login);
        if let Writer::Targeted(started) = self.writer {
            // Only an earlier listing cycle can be superseded by it.
            if s.running.keys().next().is_some_and(|t| *t < started) {
                let at = s.targeted.entry(self.login.clone()).or_insert(started);
                *at = (*at).max(started);
            }
        }
        drop(s);
        self.claims.freed.notify_waiters();
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut s = self.claims.lock();
        if let Some(n) = s.running.get_mut(&self.started) {
            *n -= 1;
            if *n == 0 {
                s.running.remove(&self.started);
            }
        }
        match s.running.keys().next().copied() {
            Some(oldest) => s.targeted.retain(|_, t| *t > oldest),
            None => s.targeted.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[tokio::test]
    async fn a_held_login_waits_for_its_release() {
        let claims = Arc::new(Claims::default());
        let first = claims.claim("alice", Writer::Listing(at(0))).await.unwrap();
        let c = claims.clone();
        let second = tokio::spawn(async move {
            c.claim("alice", Writer::Targeted(at(1))).await.is_some()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "the second writer must wait");
        assert!(claims.claim("bob", Writer::Listing(at(0))).await.is_some());
        drop(first);
        assert!(second.await.unwrap());
        assert_eq!(claims.held(), 0);
    }

    #[tokio::test]
    async fn a_later_targeted_push_supersedes_an_earlier_listing() {
        let claims = Claims::default();
        let _listing = claims.begin(at(0));
        let _fast = claims.begin(at(5));
        drop(claims.claim("alice", Writer::Targeted(at(5))).await.unwrap());
        assert!(claims.claim("alice", Writer::Listing(at(0))).await.is_none());
        // A listing that started after the targeted cycle read is fresher.
        assert!(claims.claim("alice", Writer::Listing(at(9))).await.is_some());
        // Targeted writers are never superseded.
        assert!(claims.claim("alice", Writer::Targeted(at(1))).await.is_some());
    }

    #[tokio::test]
    async fn what_supersedes_is_forgotten_once_no_older_cycle_runs() {
        let claims = Claims::default();
        let listing = claims.begin(at(0));
        let fast = claims.begin(at(5));
        drop(claims.claim("alice", Writer::Targeted(at(5))).await.unwrap());
        drop(fast);
        assert_eq!(claims.lock().targeted.len(), 1, "the listing still runs");
        drop(listing);
        assert!(claims.lock().targeted.is_empty());
        assert!(claims.lock().running.is_empty());
        // With no older cycle running, nothing is remembered at all.
        let _fast = claims.begin(at(7));
        drop(claims.claim("bob", Writer::Targeted(at(7))).await.unwrap());
        assert!(claims.lock().targeted.is_empty());
    }
}
