//! Takeover time (SPEC §13, issue 20): two `billsync run` nodes on one
//! PostgreSQL store, each reaching the VMS through a loopback proxy that
//! records its sends. The leader is killed with kill -9 and a customer's
//! balance changes at once; the time is from the kill to the first VMS
//! request of the new leader. The killed node then starts again as the
//! standby, and the next round kills whichever node leads, at a random
//! moment of its renew interval.
//!
//! cargo bench --bench failover -- [FAILOVERS] [LEASE_SECS...]   (default 20, leases 15 and 3)

#[path = "../tests/nodes/mod.rs"]
mod nodes;

use std::time::{Duration, SystemTime};

use billsync_emulators::lab::Lab;
use billsync_emulators::proxy::Proxy;
use nodes::{wait_for, Node, Via};
use rand::Rng;

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = args.first().copied().unwrap_or(20) as usize;
    let leases = match &args[args.len().min(1)..] {
        [] => vec![15, 3],
        given => given.to_vec(),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    for lease in leases {
        let times = rt.block_on(failovers(rounds, Duration::from_secs(lease)));
        report(lease, &times);
    }
}

fn report(lease: u64, times: &[Duration]) {
    let mut s: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
    s.sort_by(f64::total_cmp);
    let p50 = s[s.len() / 2];
    println!(
        "lease_secs {lease}: {} failovers, kill -9 to the new leader's first VMS request: \
         min {:.2} s, p50 {p50:.2} s, max {:.2} s",
        s.len(),
        s[0],
        s[s.len() - 1]
    );
}

struct Slot {
    name: &'static str,
    vms: Proxy,
    node: Node,
}

async fn failovers(rounds: usize, lease: Duration) -> Vec<Duration> {
    let lab = Lab::start(20, 20).await.unwrap().with_postgres();
    lab.write_config("");
    let start = |name: &'static str| {
        let lab = &lab;
        async move {
            let vms = Proxy::start(lab.vms_srv.addr).await.unwrap();
            let node = Node::start_via(lab, name, &via(&vms, lease)).await;
            Slot { name, vms, node }
        }
    };
    let mut slots = [start("node-a").await, start("node-b").await];
    let all = || async { lab.vms.data().users.len() == 40 };
    wait_for("the first sync", Duration::from_secs(60), all).await;
    let mut times = Vec::new();
    let mut rng = rand::rng();
    for round in 0..rounds {
        // At a random moment of the leader's renew interval.
        let phase = rng.random_range(0..lease.as_millis() as u64 / 3);
        tokio::time::sleep(Duration::from_millis(phase)).await;
        let leader = leader_of(&slots).await;
        let (dead, next) = (leader, 1 - leader);
        slots[dead].node.kill_9();
        let killed = SystemTime::now();
        change(&lab, round);
        let first = || async { sent_after(&slots[next].vms, killed).is_some() };
        wait_for("the new leader's first request", lease * 3, first).await;
        let at = sent_after(&slots[next].vms, killed).unwrap();
        times.push(at.duration_since(killed).unwrap());
        eprintln!("  round {round}: {:.2} s", times[round].as_secs_f64());
        let name = slots[dead].name;
        slots[dead].node = Node::start_via(&lab, name, &via(&slots[dead].vms, lease)).await;
        // The change is pushed and the restarted node settled as standby.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    times
}

fn via(vms: &Proxy, lease: Duration) -> Via {
    Via {
        vms_url: Some(format!("http://{}", vms.addr)),
        state_url: None,
        lease: Some(lease),
        env: Vec::new(),
    }
}

/// The node that leads, once one does.
async fn leader_of(slots: &[Slot; 2]) -> usize {
    let t = std::time::Instant::now();
    loop {
        for (i, s) in slots.iter().enumerate() {
            if s.node.leads().await {
                return i;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60), "nobody leads");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An active BILLmanager customer's balance flips between paying and not.
fn change(lab: &Lab, round: usize) {
    let mut bm = lab.bm.data();
    let mut active: Vec<_> = bm.accounts.iter_mut().filter(|a| a.status == "1").collect();
    let n = active.len();
    let acc = &mut active[round % n];
    acc.balance = match acc.balance.starts_with('-') {
        true => "500.00".into(),
        false => "-1000.00".into(),
    };
    acc.credit_limits.clear();
}

fn sent_after(vms: &Proxy, t: SystemTime) -> Option<SystemTime> {
    vms.sent_at().into_iter().find(|s| *s > t)
}
