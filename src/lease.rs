//! This node's side of the leader lease (SPEC §13). The lease row in the
//! store says who leads, in database time; this says whether this node may
//! act now, by its own monotonic clock: only while its last successful
//! renewal was *sent* less than `lease` minus a margin ago (at least 1 s,
//! at least twice the slowest recent renewal round trip). A node that
//! leads writes as its epoch (`Store::fence`), so once another takes over
//! its next write fails.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::{Claim, LeaseRow, Store, StoreError};

/// Whether this process may start a VMS request or a write-back now.
pub trait Gate: Send + Sync {
    fn may_act(&self) -> bool;

    /// Whether a login left in doubt by an earlier leader may be pushed:
    /// not before that leader's late requests can no longer land.
    fn may_push_in_doubt(&self) -> bool {
        true
    }
}

/// A monotonic clock: the time since some origin. A test drives its own.
#[derive(Clone)]
pub struct Mono(Arc<dyn Fn() -> Duration + Send + Sync>);

impl Mono {
    pub fn system() -> Self {
        let origin = Instant::now();
        Mono(Arc::new(move || origin.elapsed()))
    }

    pub fn from_fn(f: impl Fn() -> Duration + Send + Sync + 'static) -> Self {
        Mono(Arc::new(f))
    }

    pub fn now(&self) -> Duration {
        (self.0)()
    }
}

/// What one renewal changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This node leads from now on, at this epoch.
    Became {
        epoch: i64,
    },
    Renewed,
    /// This node led and no longer does (another holds the lease, or the
    /// database could not be reached for a whole lease).
    Lost {
        to: Option<LeaseRow>,
    },
    /// Another node leads, as before.
    Standby,
    /// The database did not answer; nothing changed yet.
    Unreachable(String),
}

/// Renewal round trips remembered for the margin.
const RTTS: usize = 8;

pub struct Node {
    /// The engine's store, fenced at this node's epoch.
    store: Store,
    /// Where the lease is claimed: sessions of its own.
    lease_store: Store,
    holder: String,
    lease: Duration,
    vms_timeout: Duration,
    clock: Mono,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The epoch this node leads at.
    epoch: Option<i64>,
    /// When the last successful renewal was sent.
    renewed_sent: Option<Duration>,
    rtts: VecDeque<Duration>,
    /// The lease as last read, and when by this node's clock.
    seen: Option<LeaseRow>,
    seen_at: Duration,
    newest_epoch: i64,
    /// In-doubt logins wait until then after a takeover.
    in_doubt_after: Option<Duration>,
    /// Why this node may not lead at all (a schema newer than its binary).
    barred: Option<String>,
    /// A new leader has brought the schema to its binary's: it may act.
    settled: bool,
    /// The last claim got no answer: the next waits a renew interval.
    failed: bool,
}

impl Node {
    /// `node` plus an id drawn now, so a restarted or duplicated process
    /// never passes for the holder of an older lease.
    pub fn new(
        store: Store,
        lease_store: Store,
        node: &str,
        lease: Duration,
        vms_timeout: Duration,
        clock: Mono,
    ) -> Self {
        Self {
            store,
            lease_store,
            holder: format!("{node}/{}", process_id()),
            lease,
            vms_timeout,
            clock,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// How often the lease is renewed: a third of it.
    pub fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    /// When to claim next: a leader renews every third of the lease; a
    /// standby claims then too, or just after the lease it last read
    /// expires if that comes sooner (a takeover within the lease of the
    /// last renewal, not a renew interval later).
    pub fn next_claim_in(&self) -> Duration {
        let s = self.state();
        let every = self.renew_every();
        let standby = s.epoch.is_none() && !s.failed;
        let Some(row) = s.seen.as_ref().filter(|_| standby) else {
            return every;
        };
        let left = Duration::from_millis(row.expires_ms.saturating_sub(row.now_ms).max(0) as u64);
        let since = self.clock.now().saturating_sub(s.seen_at);
        (left.saturating_sub(since) + Duration::from_millis(20)).min(every)
    }

    /// Claims or renews the lease once.
    pub async fn renew(&self) -> Change {
        let sent = self.clock.now();
        let ms = i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX);
        // A renewal stuck behind a lock or a pool counts as no answer: the
        // node must not go on believing it leads while it waits.
        let claim = self.lease_store.claim_lease(&self.holder, ms);
        let claim = match tokio::time::timeout(self.renew_every(), claim).await {
            Ok(claim) => claim,
            Err(_) => Err(StoreError::Decode("the lease renewal took too long".into())),
        };
        let rtt = self.clock.now().saturating_sub(sent);
        self.apply(sent, rtt, claim)
    }

    fn apply(&self, sent: Duration, rtt: Duration, claim: Result<Claim, StoreError>) -> Change {
        let mut s = self.state();
        let claim = match claim {
            Err(e) => return self.unreachable(&mut s, e.to_string()),
            Ok(claim) => claim,
        };
        s.failed = false;
        s.rtts.push_back(rtt);
        if s.rtts.len() > RTTS {
            s.rtts.pop_front();
        }
        match claim {
            // A new term under a leader (its own lease expired and was taken
            // again): the old term's cycles end first; the next claim renews
            // the new term and becomes it.
            Claim::Held(row) if s.epoch.is_some_and(|e| e != row.epoch) => {
                s.epoch = None;
                s.newest_epoch = s.newest_epoch.max(row.epoch);
                Change::Lost { to: None }
            }
            Claim::Held(row) => {
                s.renewed_sent = Some(sent);
                s.newest_epoch = s.newest_epoch.max(row.epoch);
                let change = match s.epoch {
                    Some(e) if e == row.epoch => Change::Renewed,
                    _ => {
                        s.settled = false;
                        self.store.fence(row.epoch);
                        // An earlier leader's requests may still land until
                        // its lease ran out (by the time this answer came)
                        // plus a VMS timeout.
                        let answered = sent + rtt;
                        s.in_doubt_after = (row.epoch > 1).then_some(answered + self.vms_timeout);
                        Change::Became { epoch: row.epoch }
                    }
                };
                s.epoch = Some(row.epoch);
                s.seen = Some(row);
                s.seen_at = sent + rtt;
                change
            }
            Claim::Other(row) => {
                s.newest_epoch = s.newest_epoch.max(row.epoch);
                s.seen = Some(row.clone());
                s.seen_at = sent + rtt;
                match s.epoch.take() {
                    Some(_) => Change::Lost { to: Some(row) },
                    None => Change::Standby,
                }
            }
        }
    }

    /// No answer: a leader that has not renewed for a whole lease has
    /// certainly lost it (another may hold it by now).
    fn unreachable(&self, s: &mut Inner, error: String) -> Change {
        s.failed = true;
        let expired = s
            .renewed_sent
            .is_none_or(|r| self.clock.now().saturating_sub(r) >= self.lease);
        if s.epoch.is_some() && expired {
            s.epoch = None;
            return Change::Lost { to: None };
        }
        Change::Unreachable(error)
    }

    fn margin(s: &Inner) -> Duration {
        let slowest = s.rtts.iter().max().copied().unwrap_or_default();
        Duration::from_secs(1).max(slowest * 2)
    }

    /// A write failed on the newer epoch `now`: this node no longer
    /// leads, at once.
    pub fn step_down(&self, now: i64) {
        let mut s = self.state();
        s.newest_epoch = s.newest_epoch.max(now);
        // Fenced by its own newer term: a write of the old one, no loss.
        if s.epoch == Some(now) {
            return;
        }
        if s.epoch.take().is_some() {
            tracing::warn!("a newer leader exists (a write was fenced); this node steps down");
        }
    }

    /// This node may not lead (SPEC §13: a binary older than the schema):
    /// it gives the lease up and claims no more.
    pub async fn bar(&self, why: String) {
        tracing::error!(reason = %why, "this node cannot lead; it stays a standby");
        self.state().barred = Some(why);
        self.release().await;
    }

    /// Why this node may not lead, if so.
    pub fn barred(&self) -> Option<String> {
        self.state().barred.clone()
    }

    /// How long logins in doubt still wait after a takeover, if they do.
    pub fn in_doubt_wait(&self) -> Option<Duration> {
        let s = self.state();
        let left = s.in_doubt_after?.checked_sub(self.clock.now())?;
        (!left.is_zero()).then_some(left)
    }

    /// The epoch this node leads at, once it has settled as leader.
    pub fn leading(&self) -> Option<i64> {
        let s = self.state();
        s.epoch.filter(|_| s.settled)
    }

    /// The epoch this node holds the lease at, settled or not.
    pub fn holds(&self) -> Option<i64> {
        self.state().epoch
    }

    /// A new leader has migrated the schema: from now on it may act.
    pub fn settle(&self) {
        self.state().settled = true;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lease as last read: who leads.
    pub fn seen(&self) -> Option<LeaseRow> {
        self.state().seen.clone()
    }

    /// The newest epoch this node has seen (`billsync_lease_epoch`).
    pub fn newest_epoch(&self) -> i64 {
        self.state().newest_epoch
    }

    /// Gives the lease up (a clean stop): a standby need not wait.
    pub async fn release(&self) {
        let epoch = self.state().epoch.take();
        if let Some(epoch) = epoch {
            if let Err(e) = self.lease_store.release_lease(&self.holder, epoch).await {
                tracing::warn!(error = %e, "could not release the lease; it expires by itself");
            }
        }
    }
}

impl Gate for Node {
    fn may_act(&self) -> bool {
        let s = self.state();
        let (Some(_), Some(sent), true) = (s.epoch, s.renewed_sent, s.settled) else {
            return false;
        };
        let window = self.lease.saturating_sub(Self::margin(&s));
        self.clock.now().saturating_sub(sent) < window
    }

    fn may_push_in_doubt(&self) -> bool {
        let s = self.state();
        s.in_doubt_after.is_none_or(|t| self.clock.now() >= t)
    }
}

/// Opens the shared store on PostgreSQL and claims the lease once. The
/// schema is migrated only by the node that leads, or before anyone can
/// lead (a store without the lease table yet).
pub async fn open_shared(
    url: &str,
    node: &str,
    lease: Duration,
    vms_timeout: Duration,
) -> Result<(Store, Arc<Node>, Change), StoreError> {
    let bound = crate::store::pg_bound(lease.as_secs());
    let store = Store::open_postgres_unmigrated(url, bound).await?;
    if !store.has_lease_table().await? {
        store.migrate_first().await?;
    }
    let lease_store = Store::open_postgres_lease(url, bound).await?;
    let node = Arc::new(Node::new(
        store.clone(),
        lease_store,
        node,
        lease,
        vms_timeout,
        Mono::system(),
    ));
    let first = node.renew().await;
    if let Change::Became { .. } = first {
        if let Err(e) = store.migrate_now().await {
            node.release().await;
            return Err(e);
        }
        node.settle();
    }
    Ok((store, node, first))
}

/// This node's name: `daemon.node_name`, else the host name.
pub fn node_name(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "billsync".into())
}

impl Node {
    /// Renews every third of the lease until `stop`, saying each change.
    pub async fn keep(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.renew_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            self.say(&self.renew().await);
        }
    }

    pub fn say(&self, change: &Change) {
        match change {
            Change::Became { epoch } => {
                tracing::info!(epoch, holder = %self.holder, "this node leads")
            }
            Change::Lost { to } => {
                tracing::warn!(to = ?to.as_ref().map(|r| &r.holder), "this node no longer leads")
            }
            Change::Unreachable(e) => tracing::warn!(error = %e, "the lease could not be renewed"),
            Change::Renewed | Change::Standby => {}
        }
    }
}

/// An id drawn at each process start (the standard library's randomly
/// seeded hasher, over the time and the pid).
fn process_id() -> String {
    use std::hash::BuildHasher;
    let seed = (std::time::SystemTime::now(), std::process::id());
    format!(
        "{:016x}",
        std::collections::hash_map::RandomState::new().hash_one(seed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    const LEASE: Duration = Duration::from_secs(15);
    const VMS_TIMEOUT: Duration = Duration::from_secs(30);

    /// A node on a scratch store and a clock the test sets (ms).
    async fn node() -> (Node, Arc<AtomicU64>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let ms = Arc::new(AtomicU64::new(0));
        let t = ms.clone();
        let clock = Mono::from_fn(move || Duration::from_millis(t.load(Ordering::SeqCst)));
        let n = Node::new(store.clone(), store, "n1", LEASE, VMS_TIMEOUT, clock);
        (n, ms, dir)
    }

    fn row(holder: &str, epoch: i64) -> LeaseRow {
        LeaseRow {
            holder: holder.into(),
            epoch,
            since_ms: 0,
            expires_ms: 15_000,
            now_ms: 0,
        }
    }

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn acts_only_within_the_lease_less_the_margin_from_the_renewal_sent() {
        let (n, now, _d) = node().await;
        assert!(!n.may_act(), "before any lease");
        let change = n.apply(at(0), at(10), Ok(Claim::Held(row(n.holder(), 1))));
        assert_eq!(change, Change::Became { epoch: 1 });
        assert!(!n.may_act(), "not before it settled (migrated)");
        n.settle();
        now.store(13_999, Ordering::SeqCst);
        assert!(n.may_act());
        now.store(14_000, Ordering::SeqCst);
        assert!(!n.may_act(), "15 s lease, 1 s margin");
        // A slow round trip widens the margin to twice it.
        assert_eq!(
            n.apply(at(14_000), at(3_000), Ok(Claim::Held(row(n.holder(), 1)))),
            Change::Renewed
        );
        now.store(14_000 + 8_999, Ordering::SeqCst);
        assert!(n.may_act());
        now.store(14_000 + 9_000, Ordering::SeqCst);
        assert!(!n.may_act(), "15 s less 2 x 3 s");
    }

    #[tokio::test]
    async fn another_holder_takes_it_and_a_new_epoch_is_a_new_leadership() {
        let (n, now, _d) = node().await;
        n.apply(at(0), at(5), Ok(Claim::Held(row(n.holder(), 1))));
        let lost = n.apply(at(5_000), at(5), Ok(Claim::Other(row("n2/x", 2))));
        assert_eq!(
            lost,
            Change::Lost {
                to: Some(row("n2/x", 2))
            }
        );
        assert!(!n.may_act());
        assert_eq!(
            n.apply(at(10_000), at(5), Ok(Claim::Other(row("n2/x", 2)))),
            Change::Standby
        );
        now.store(40_000, Ordering::SeqCst);
        let back = n.apply(at(40_000), at(5), Ok(Claim::Held(row(n.holder(), 3))));
        assert_eq!(back, Change::Became { epoch: 3 });
        n.settle();
        assert!(n.may_act());
        assert_eq!(n.newest_epoch(), 3);
    }

    #[tokio::test]
    async fn a_leader_without_the_database_for_a_whole_lease_has_lost_it() {
        let (n, now, _d) = node().await;
        n.apply(at(0), at(5), Ok(Claim::Held(row(n.holder(), 1))));
        n.settle();
        let down = || Err(StoreError::Decode("connection refused".into()));
        now.store(10_000, Ordering::SeqCst);
        assert!(matches!(
            n.apply(at(10_000), at(0), down()),
            Change::Unreachable(_)
        ));
        assert_eq!(n.leading(), Some(1), "not yet");
        now.store(14_500, Ordering::SeqCst);
        assert!(!n.may_act(), "no request once the window closed");
        now.store(15_000, Ordering::SeqCst);
        assert_eq!(
            n.apply(at(15_000), at(0), down()),
            Change::Lost { to: None }
        );
        assert_eq!(n.leading(), None);
    }

    /// After a takeover, logins in doubt wait out the old leader's late
    /// requests: a VMS timeout from when the takeover's answer came (the
    /// old lease had run out by then, however long the claim waited); a
    /// first leader waits for nobody.
    #[tokio::test]
    async fn in_doubt_logins_wait_a_vms_timeout_after_a_takeover() {
        let (n, now, _d) = node().await;
        n.apply(at(0), at(5), Ok(Claim::Held(row(n.holder(), 1))));
        assert!(n.may_push_in_doubt(), "the first leader");
        n.apply(at(1_000), at(5), Ok(Claim::Other(row("n2/x", 2))));
        now.store(60_000, Ordering::SeqCst);
        // The claim waited 2 s behind the old leader's lock.
        n.apply(at(60_000), at(2_000), Ok(Claim::Held(row(n.holder(), 3))));
        now.store(62_000 + 29_999, Ordering::SeqCst);
        assert!(!n.may_push_in_doubt());
        now.store(92_000, Ordering::SeqCst);
        assert!(n.may_push_in_doubt());
    }

    /// A standby claims just after the lease it read expires, when that
    /// comes before its next tick; a leader renews on its tick.
    #[tokio::test]
    async fn a_standby_claims_as_the_lease_it_read_expires() {
        let (n, now, _d) = node().await;
        assert_eq!(n.next_claim_in(), LEASE / 3, "nothing read yet");
        let mut other = row("n2/x", 4);
        (other.now_ms, other.expires_ms) = (100_000, 103_000);
        now.store(50_000, Ordering::SeqCst);
        n.apply(at(50_000), at(0), Ok(Claim::Other(other.clone())));
        now.store(51_000, Ordering::SeqCst);
        assert_eq!(n.next_claim_in(), at(2_020));
        other.expires_ms = 115_000;
        n.apply(at(51_000), at(0), Ok(Claim::Other(other)));
        assert_eq!(n.next_claim_in(), LEASE / 3, "renewed far ahead");
        n.apply(at(60_000), at(0), Ok(Claim::Held(row(n.holder(), 5))));
        assert_eq!(n.next_claim_in(), LEASE / 3);
    }

    /// Its own expired lease taken again is a new term: the old term's
    /// cycles end first (Lost), the next claim becomes the new one; a write
    /// fenced by its own new term is no loss.
    #[tokio::test]
    async fn a_new_term_of_its_own_passes_through_lost() {
        let (n, _now, _d) = node().await;
        n.apply(at(0), at(5), Ok(Claim::Held(row(n.holder(), 1))));
        n.settle();
        let again = n.apply(at(20_000), at(5), Ok(Claim::Held(row(n.holder(), 2))));
        assert_eq!(again, Change::Lost { to: None });
        assert_eq!(n.leading(), None);
        let next = n.apply(at(20_100), at(5), Ok(Claim::Held(row(n.holder(), 2))));
        assert_eq!(next, Change::Became { epoch: 2 });
        n.settle();
        n.step_down(2);
        assert_eq!(n.leading(), Some(2));
        n.step_down(3);
        assert_eq!((n.leading(), n.newest_epoch()), (None, 3));
    }

    /// A claim that got no answer is retried a renew interval later, not
    /// at the expiry shortcut (no busy loop on a failing database).
    #[tokio::test]
    async fn a_failed_claim_waits_a_renew_interval() {
        let (n, now, _d) = node().await;
        let mut other = row("n2/x", 4);
        (other.now_ms, other.expires_ms) = (100_000, 100_500);
        n.apply(at(0), at(0), Ok(Claim::Other(other)));
        now.store(1_000, Ordering::SeqCst);
        assert_eq!(n.next_claim_in(), at(20), "just after the expiry");
        n.apply(
            at(1_000),
            at(0),
            Err(StoreError::Decode("read-only".into())),
        );
        assert_eq!(n.next_claim_in(), LEASE / 3);
    }

    #[test]
    fn each_process_draws_another_holder_id() {
        assert_ne!(process_id(), process_id());
    }
}
