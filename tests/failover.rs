//! The failover campaign (issue 20, SPEC §13): two `billsync run` nodes on
//! one PostgreSQL store while the world keeps changing and the VMS fails
//! now and then, and 20 random faults of the leader: kill -9 (and a
//! restart), SIGSTOP for one to three leases, its database sessions
//! terminated for a lease, its link to the database paused for one to
//! three leases. Then everything heals: the VMS must hold exactly the
//! desired state, no login created twice, one leader, and no node may have
//! sent to the VMS in another node's term (after that one took the lease,
//! so after its own had expired), but for what a frozen process can send
//! as it wakes (SPEC §13: one request per pusher).
//!
//! `BILLSYNC_FAILOVER_FAULTS=60 BILLSYNC_FAILOVER_SEED=7 cargo test --test failover -- --nocapture`

mod nodes;
mod world;
use nodes::{through, wait_for, Node, Terms, Via};
use world::World;

use std::time::{Duration, SystemTime};

use billsync::store::Store;
use billsync_emulators::lab::Lab;
use billsync_emulators::proxy::Proxy;
use billsync_emulators::{Fault, Seq};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A node's name, its proxies (kept across restarts) and its process.
struct Slot {
    name: &'static str,
    db: Proxy,
    vms: Proxy,
    node: Node,
    /// When it was woken from SIGSTOP.
    woken: Vec<SystemTime>,
}

impl Slot {
    async fn start(lab: &Lab, name: &'static str) -> Self {
        let url = lab.state_url.clone().unwrap();
        let db = Proxy::start(nodes::addr_of(&url)).await.unwrap();
        let vms = Proxy::start(lab.vms_srv.addr).await.unwrap();
        let node = Node::start_via(lab, name, &Self::via(lab, &db, &vms, name)).await;
        Slot {
            name,
            db,
            vms,
            node,
            woken: Vec::new(),
        }
    }

    fn via(lab: &Lab, db: &Proxy, vms: &Proxy, name: &str) -> Via {
        Via {
            state_url: Some(through(lab.state_url.as_deref().unwrap(), db.addr, name)),
            vms_url: Some(format!("http://{}", vms.addr)),
            lease: None,
            env: Vec::new(),
        }
    }

    async fn restart(&mut self, lab: &Lab) {
        let via = Self::via(lab, &self.db, &self.vms, self.name);
        self.node = Node::start_via(lab, self.name, &via).await;
    }
}

#[derive(Debug, Default)]
struct Tally {
    kills: u32,
    freezes: u32,
    storms: u32,
    cuts: u32,
}

/// One fault of the leader, healed before it returns.
async fn fault(lab: &Lab, slot: &mut Slot, rng: &mut Seq, admin: &sqlx::PgPool, t: &mut Tally) {
    let leases = |rng: &mut Seq| nodes::LEASE * (1 + rng.below(3) as u32);
    match rng.below(4) {
        0 => {
            t.kills += 1;
            slot.node.kill_9();
            slot.restart(lab).await;
        }
        1 => {
            t.freezes += 1;
            slot.node.signal("-STOP");
            tokio::time::sleep(leases(rng)).await;
            slot.node.signal("-CONT");
            slot.woken.push(SystemTime::now());
        }
        2 => {
            t.storms += 1;
            terminate_for(admin, slot.name, nodes::LEASE).await;
        }
        _ => {
            t.cuts += 1;
            slot.db.pause();
            tokio::time::sleep(leases(rng)).await;
            slot.db.resume();
        }
    }
}

/// Terminates every session of `node` every 50 ms for `how_long`.
async fn terminate_for(admin: &sqlx::PgPool, node: &str, how_long: Duration) {
    let t = std::time::Instant::now();
    while t.elapsed() < how_long {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1",
        )
        .bind(node)
        .execute(admin)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The lab: services and camera access on (as the crash campaign), every
/// cycle each second, a VMS timeout of 1 s (the new leader's wait for
/// in-doubt logins).
async fn lab() -> Lab {
    let lab = Lab::start(30, 30).await.unwrap().with_postgres();
    world::prepare(&lab);
    lab
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_campaign_converges_with_one_pusher_at_a_time() {
    let faults = env_or("BILLSYNC_FAILOVER_FAULTS", 20);
    let seed = env_or("BILLSYNC_FAILOVER_SEED", 1);
    let lab = lab().await;
    let url = lab.state_url.clone().unwrap();
    let terms = Terms::watch(
        Store::open_postgres(&url, Duration::from_secs(10))
            .await
            .unwrap(),
    );
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let mut world = World::new(&lab, seed);
    let mut rng = Seq::new(seed + 1000);
    lab.vms.faults.set_latency(Duration::from_millis(15));
    lab.vms.faults.sometimes("", Fault::Status(500), 5, seed);
    let lose = Fault::LoseAnswer(Duration::from_millis(1500));
    lab.vms.faults.sometimes("user/manage", lose, 3, seed);

    let mut slots = [
        Slot::start(&lab, "node-a").await,
        Slot::start(&lab, "node-b").await,
    ];
    let mut tally = Tally::default();
    let started = std::time::Instant::now();
    let mut mid_push = 0;
    for k in 0..faults {
        tokio::time::sleep(Duration::from_millis(500 + rng.below(1500))).await;
        let served = lab.vms.served();
        world.change();
        // Every other fault strikes as the leader starts pushing the change.
        if k % 2 == 0 && pushing_within(&lab, served, Duration::from_secs(3)).await {
            mid_push += 1;
            tokio::time::sleep(Duration::from_millis(rng.below(100))).await;
        }
        let leader = leader_of(&slots).await.unwrap_or(rng.below(2) as usize);
        fault(&lab, &mut slots[leader], &mut rng, &admin, &mut tally).await;
    }
    lab.vms.faults.clear();
    let converged = || async { world.converged().is_ok() };
    let limit = Duration::from_secs(120);
    wait_for("exact convergence", limit, converged).await;
    world.assert_converged();
    println!(
        "failover campaign: {faults} faults {tally:?}, {mid_push} as a push began, \
         {} terms, {} VMS requests, {:.0?}",
        terms.all().len(),
        lab.vms.served(),
        started.elapsed()
    );
    assert!(terms.all().len() > 2, "the premise: leadership moved");
    assert!(mid_push > 0, "the premise: faults struck pushes");
    assert!(leader_of(&slots).await.is_some(), "nobody leads");
    let (a, b) = (slots[0].node.leads().await, slots[1].node.leads().await);
    assert!(!(a && b), "two leaders");
    for slot in &slots {
        only_stale_sends_on_waking(&terms, slot);
    }
}

/// Whether the VMS served more than `served` requests within `limit`.
async fn pushing_within(lab: &Lab, served: u64, limit: Duration) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        if lab.vms.served() > served {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Which node leads, if one does.
async fn leader_of(slots: &[Slot; 2]) -> Option<usize> {
    for (i, s) in slots.iter().enumerate() {
        if s.node.leads().await {
            return Some(i);
        }
    }
    None
}

/// A node's sends in another's term come only from a process that was
/// frozen past its gate: within a second of waking, a few per wake.
fn only_stale_sends_on_waking(terms: &Terms, slot: &Slot) {
    let foreign = terms.foreign(slot.name, &slot.vms.sent_at());
    let ms = |t: &SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    };
    let woken: Vec<u128> = slot.woken.iter().map(ms).collect();
    for (at, holder) in &foreign {
        let near = woken.iter().any(|w| *at + 200 >= *w && *at <= *w + 1000);
        assert!(
            near,
            "{} sent in {holder}'s term at {at}, not on waking",
            slot.name
        );
    }
    println!("{}: {} sends in another's term", slot.name, foreign.len());
    // Each of the 4 pushers: one request, which may reach the proxy in two reads.
    let allowed = slot.woken.len() * 8;
    assert!(
        foreign.len() <= allowed,
        "{}: {} stale sends after {} wakes",
        slot.name,
        foreign.len(),
        slot.woken.len()
    );
}
