//! The push scheduler (SPEC §10.2): the one owner of who writes what when.
//! Both lanes (listing; payments and triggers) hand it every task they
//! push: users, tree elements, write-backs. At most one task per key runs
//! at a time, and which of two cycles' work on a key stands is decided by
//! their read sequence (the cycle id the store assigned), never by the
//! wall clock:
//!
//! - once a cycle with a newer read has decided a key, an older cycle's
//!   task for it is *superseded*: older news, left to the next listing;
//! - a task whose key an older cycle decided after this one began is
//!   *stale*: it was planned against an applied state that moved since, so
//!   the executor checks whether that push did its work already (a merged
//!   duplicate) and else pushes in full.
//!
//! A targeted cycle holds its logins (in order) from before it loads any of
//! their state until its push ends, so its plan is never stale; a listing
//! cycle takes each key's turn as it pushes it. A holder waits only for tasks
//! that hold one key and wait for nothing, so no wait is circular.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// A cycle's read sequence: its id.
pub type Seq = i64;

/// What a task writes: one writer per key at a time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// A VMS user: create, update, delete.
    Login(String),
    /// A tree element, by external id.
    Tree(String),
    /// A login written back to a source account (`source:id`).
    Writeback(String),
}

#[derive(Default)]
pub struct Scheduler {
    state: Mutex<State>,
    freed: Notify,
}

#[derive(Default)]
struct State {
    /// Keys a task runs for, or a targeted cycle holds.
    busy: HashSet<Key>,
    /// Who last decided each key, recorded only while another cycle runs
    /// (only a cycle running beside it can be superseded or stale).
    decided: HashMap<Key, Decided>,
    /// Cycles running: (read sequence, tick at begin).
    runs: Vec<(Seq, u64)>,
    /// Counts begins: orders a release against the begins of cycles.
    tick: u64,
}

#[derive(Debug, Clone, Copy)]
struct Decided {
    seq: Seq,
    /// `tick` when released: after the begin of every cycle with `since <= at`.
    at: u64,
}

/// A running cycle; what it decides is remembered while others run.
pub struct Running<'a> {
    scheduler: &'a Scheduler,
    since: u64,
}

/// Keys taken by one cycle; released on drop, as decided by its read.
pub struct Taken<'a> {
    scheduler: &'a Scheduler,
    keys: HashSet<Key>,
    seq: Seq,
}

/// A task's turn at its key.
pub enum Turn<'a> {
    /// The cycle holds the key already (a targeted cycle's login).
    Held,
    /// Taken until dropped; `stale`: an older cycle decided the key after
    /// this one began.
    Taken { taken: Taken<'a>, stale: bool },
    /// A cycle with a newer read decided the key: this task is older news.
    Superseded,
}

/// One cycle's view of the scheduler, for its push.
#[derive(Clone, Copy)]
pub struct Turns<'a> {
    scheduler: &'a Scheduler,
    held: Option<&'a Taken<'a>>,
    seq: Seq,
}

enum Acquired {
    Taken { stale: bool },
    Superseded,
}

impl Scheduler {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn begin(&self, seq: Seq) -> Running<'_> {
        let mut s = self.lock();
        s.tick += 1;
        let since = s.tick;
        s.runs.push((seq, since));
        Running {
            scheduler: self,
            since,
        }
    }

    /// A targeted cycle's logins, each taken in the order given (sorted, so
    /// two holders could not wait on each other) once no one else holds it;
    /// those a newer read decided meanwhile are left out.
    pub async fn hold<'l>(&self, logins: impl Iterator<Item = &'l String>, seq: Seq) -> Taken<'_> {
        let mut held = self.taken(seq);
        for login in logins {
            let key = Key::Login(login.clone());
            if let Acquired::Taken { .. } = self.acquire(&key, seq).await {
                held.keys.insert(key);
            }
        }
        held
    }

    /// Waits until `key` is free, then takes it unless a newer read decided it.
    async fn acquire(&self, key: &Key, seq: Seq) -> Acquired {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut s = self.lock();
                let since = s.since_of(seq);
                match s.decided.get(key).copied() {
                    Some(d) if d.seq > seq => return Acquired::Superseded,
                    _ if s.busy.contains(key) => {}
                    decided => {
                        s.busy.insert(key.clone());
                        let stale = decided.is_some_and(|d| d.seq != seq && d.at >= since);
                        return Acquired::Taken { stale };
                    }
                }
            }
            wait(freed).await;
        }
    }

    fn taken(&self, seq: Seq) -> Taken<'_> {
        Taken {
            scheduler: self,
            keys: HashSet::new(),
            seq,
        }
    }

    /// Keys taken now (for tests and debugging).
    pub fn busy(&self) -> usize {
        self.lock().busy.len()
    }
}

impl State {
    /// When the cycle of `seq` began (the earliest, should two share it).
    fn since_of(&self, seq: Seq) -> u64 {
        let mine = self.runs.iter().filter(|(q, _)| *q == seq);
        mine.map(|(_, since)| *since).min().unwrap_or(0)
    }
}

impl Taken<'_> {
    pub fn holds_login(&self, login: &str) -> bool {
        self.keys.contains(&Key::Login(login.to_string()))
    }
}

impl<'a> Turns<'a> {
    pub fn new(scheduler: &'a Scheduler, held: Option<&'a Taken<'a>>, seq: Seq) -> Self {
        Self {
            scheduler,
            held,
            seq,
        }
    }

    pub async fn take(&self, key: Key) -> Turn<'a> {
        if self.held.is_some_and(|h| h.keys.contains(&key)) {
            return Turn::Held;
        }
        match self.scheduler.acquire(&key, self.seq).await {
            Acquired::Superseded => Turn::Superseded,
            Acquired::Taken { stale } => {
                let mut taken = self.scheduler.taken(self.seq);
                taken.keys.insert(key);
                Turn::Taken { taken, stale }
            }
        }
    }
}

/// Waits for a release. Waiting on another lane is no stall of this one;
/// that lane's own pulse shows whether it is stuck.
async fn wait(freed: Pin<&mut Notified<'_>>) {
    if tokio::time::timeout(Duration::from_secs(1), freed)
        .await
        .is_err()
    {
        crate::telemetry::liveness::beat();
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let mut s = self.scheduler.lock();
        let others = s.runs.iter().any(|(q, _)| *q != self.seq);
        let at = s.tick;
        for key in self.keys.drain() {
            s.busy.remove(&key);
            if others {
                let d = s
                    .decided
                    .entry(key)
                    .or_insert(Decided { seq: self.seq, at });
                *d = Decided {
                    seq: d.seq.max(self.seq),
                    at,
                };
            }
        }
        drop(s);
        self.scheduler.freed.notify_waiters();
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut s = self.scheduler.lock();
        s.runs.retain(|(_, since)| *since != self.since);
        // Keep what can still supersede a running cycle or make it stale.
        let runs = s.runs.clone();
        let useful = |d: &Decided| {
            (runs.iter()).any(|(seq, since)| d.seq > *seq || (d.seq != *seq && d.at >= *since))
        };
        s.decided.retain(|_, d| useful(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn logins(names: &[&str]) -> Vec<String> {
        names.iter().map(|l| l.to_string()).collect()
    }

    fn login(name: &str) -> Key {
        Key::Login(name.into())
    }

    async fn turn(s: &Scheduler, key: Key, seq: Seq) -> Turn<'_> {
        Turns::new(s, None, seq).take(key).await
    }

    fn superseded(t: &Turn<'_>) -> bool {
        matches!(t, Turn::Superseded)
    }

    fn stale(t: &Turn<'_>) -> bool {
        matches!(t, Turn::Taken { stale: true, .. })
    }

    #[tokio::test]
    async fn a_taken_key_waits_for_its_release() {
        let s = Arc::new(Scheduler::default());
        let _listing = s.begin(1);
        let first = turn(&s, login("alice"), 1).await;
        let names = logins(&["alice", "bob"]);
        let mut second = Box::pin(s.hold(names.iter(), 2));
        assert!(
            futures::poll!(&mut second).is_pending(),
            "the targeted cycle must wait"
        );
        drop(first);
        let held = second.await;
        assert!(held.holds_login("alice") && held.holds_login("bob"));
        drop(held);
        assert_eq!(s.busy(), 0);
    }

    /// Whatever the lane: the newer read decides. Sequences, not times.
    #[tokio::test]
    async fn a_newer_read_supersedes_an_older_one_in_either_lane() {
        let s = Scheduler::default();
        let _listing = s.begin(5);
        let _fast = s.begin(6);
        let names = logins(&["alice"]);
        drop(s.hold(names.iter(), 6).await);
        assert!(superseded(&turn(&s, login("alice"), 5).await));
        assert!(!superseded(&turn(&s, login("bob"), 5).await));
        // An older targeted cycle leaves alone what a newer listing pushed.
        let _old_fast = s.begin(4);
        drop(turn(&s, login("carol"), 5).await);
        let names = logins(&["carol", "dave"]);
        let held = s.hold(names.iter(), 4).await;
        assert!(!held.holds_login("carol") && held.holds_login("dave"));
    }

    /// A newer cycle's task for a key an older cycle pushed after it began
    /// is stale: planned against an applied state that moved since.
    #[tokio::test]
    async fn a_key_decided_since_the_cycle_began_is_stale() {
        let s = Scheduler::default();
        let _fast = s.begin(7);
        let pushing = turn(&s, Key::Tree("t1".into()), 7).await;
        let _listing = s.begin(8);
        drop(pushing);
        assert!(stale(&turn(&s, Key::Tree("t1".into()), 8).await));
        assert!(!stale(&turn(&s, Key::Tree("t2".into()), 8).await));
        // A cycle that began after the push read its result: not stale.
        let _later = s.begin(9);
        assert!(!stale(&turn(&s, Key::Tree("t1".into()), 9).await));
    }

    #[tokio::test]
    async fn what_was_decided_is_forgotten_once_no_cycle_could_use_it() {
        let s = Scheduler::default();
        let listing = s.begin(1);
        let fast = s.begin(2);
        let names = logins(&["alice"]);
        drop(s.hold(names.iter(), 2).await);
        drop(turn(&s, login("bob"), 1).await);
        assert_eq!(s.lock().decided.len(), 2);
        drop(fast);
        // Only what can supersede the listing stays: its own push of bob
        // matters to no one once the targeted cycle ended.
        assert_eq!(s.lock().decided.len(), 1, "the listing still runs");
        assert!(s.lock().decided.contains_key(&login("alice")));
        drop(listing);
        assert!(s.lock().decided.is_empty());
        assert!(s.lock().runs.is_empty());
        // A cycle running alone remembers nothing (a million keys).
        let _alone = s.begin(3);
        drop(turn(&s, login("carol"), 3).await);
        assert!(s.lock().decided.is_empty());
    }

    #[tokio::test]
    async fn the_held_logins_of_a_cycle_are_its_own_turns() {
        let s = Scheduler::default();
        let _fast = s.begin(3);
        let names = logins(&["alice"]);
        let held = s.hold(names.iter(), 3).await;
        let turns = Turns::new(&s, Some(&held), 3);
        assert!(matches!(turns.take(login("alice")).await, Turn::Held));
        assert!(matches!(
            turns.take(Key::Writeback("activeplatform:1".into())).await,
            Turn::Taken { stale: false, .. }
        ));
    }
}
