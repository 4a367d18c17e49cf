//! One writer per login (SPEC §10.2): the listing lane and the fast lane
//! (payments, triggers) run at once, and a login is pushed by one of them
//! at a time. A targeted cycle holds its logins from before it reads their
//! applied state until its push ends, and what it decided from its fresh
//! read wins: a listing cycle that started earlier leaves those logins to
//! the next listing instead of pushing what it read before.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

#[derive(Default)]
pub struct Claims {
    state: Mutex<State>,
    freed: Notify,
}

#[derive(Default)]
struct State {
    held: HashSet<String>,
    /// Start of the newest targeted cycle that held each login; kept only
    /// while a cycle that started earlier still runs.
    targeted: HashMap<String, DateTime<Utc>>,
    /// Cycles running, by start.
    running: BTreeMap<DateTime<Utc>, usize>,
}

/// One login a listing cycle pushes; released on drop.
pub struct Claim<'a> {
    claims: &'a Claims,
    login: String,
}

/// The logins a targeted cycle holds; released on drop.
pub struct Held<'a> {
    claims: &'a Claims,
    logins: Vec<String>,
    started: DateTime<Utc>,
}

/// A running cycle, registered so that what supersedes it is remembered
/// until it ends.
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

    /// A listing cycle's claim: waits while another cycle holds `login`.
    /// `None`: a targeted cycle that started after `started` held it; its
    /// decision stands.
    pub async fn claim(&self, login: &str, started: DateTime<Utc>) -> Option<Claim<'_>> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut s = self.lock();
                if s.targeted.get(login).is_some_and(|t| *t > started) {
                    return None;
                }
                if s.held.insert(login.to_string()) {
                    let login = login.to_string();
                    return Some(Claim {
                        claims: self,
                        login,
                    });
                }
            }
            wait(freed).await;
        }
    }

    /// A targeted cycle's logins, each taken once no one else holds it (in
    /// order; a holder never waits for another login, so this ends).
    pub async fn hold(&self, logins: BTreeSet<String>, started: DateTime<Utc>) -> Held<'_> {
        let mut held = Held {
            claims: self,
            logins: Vec::with_capacity(logins.len()),
            started,
        };
        for login in logins {
            loop {
                let freed = self.freed.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                if self.lock().held.insert(login.clone()) {
                    break;
                }
                wait(freed).await;
            }
            held.logins.push(login);
        }
        held
    }

    /// Logins held now (for tests and debugging).
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }
}

/// Waits for a release. Waiting on another lane is no stall of this one;
/// that lane's own pulse shows whether it is stuck.
async fn wait(freed: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>) {
    if tokio::time::timeout(Duration::from_secs(1), freed)
        .await
        .is_err()
    {
        crate::telemetry::liveness::beat();
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.claims.lock().held.remove(&self.login);
        self.claims.freed.notify_waiters();
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut s = self.claims.lock();
        // Only a listing cycle that started earlier can be superseded.
        let older_runs = s.running.keys().next().is_some_and(|t| *t < self.started);
        for login in self.logins.drain(..) {
            s.held.remove(&login);
            if older_runs {
                let at = s.targeted.entry(login).or_insert(self.started);
                *at = (*at).max(self.started);
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

    fn set(logins: &[&str]) -> BTreeSet<String> {
        logins.iter().map(|l| l.to_string()).collect()
    }

    #[tokio::test]
    async fn a_held_login_waits_for_its_release() {
        let claims = Arc::new(Claims::default());
        let first = claims.claim("alice", at(0)).await.unwrap();
        let mut second = Box::pin(claims.hold(set(&["alice", "bob"]), at(1)));
        assert!(
            futures::poll!(&mut second).is_pending(),
            "the targeted cycle must wait"
        );
        drop(first);
        assert_eq!(second.await.logins, ["alice", "bob"]);
        assert_eq!(claims.held(), 0);
    }

    #[tokio::test]
    async fn a_later_targeted_cycle_supersedes_an_earlier_listing() {
        let claims = Claims::default();
        let _listing = claims.begin(at(0));
        let _fast = claims.begin(at(5));
        drop(claims.hold(set(&["alice"]), at(5)).await);
        assert!(claims.claim("alice", at(0)).await.is_none());
        assert!(claims.claim("bob", at(0)).await.is_some());
        // A listing that started after the targeted cycle read is fresher.
        assert!(claims.claim("alice", at(9)).await.is_some());
    }

    #[tokio::test]
    async fn what_supersedes_is_forgotten_once_no_older_cycle_runs() {
        let claims = Claims::default();
        let listing = claims.begin(at(0));
        let fast = claims.begin(at(5));
        drop(claims.hold(set(&["alice"]), at(5)).await);
        drop(fast);
        assert_eq!(claims.lock().targeted.len(), 1, "the listing still runs");
        drop(listing);
        assert!(claims.lock().targeted.is_empty());
        assert!(claims.lock().running.is_empty());
        // With no older cycle running, nothing is remembered at all.
        let _fast = claims.begin(at(7));
        drop(claims.hold(set(&["bob"]), at(7)).await);
        assert!(claims.lock().targeted.is_empty());
    }
}
