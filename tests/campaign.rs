//! The crash campaign (issue #9): `kill -9` at random moments of `run` and
//! `sync` while the world keeps changing, with 10 % VMS 500s and some
//! answers lost after the VMS applied the request. Then faults off and
//! `sync` until it exits 0: the VMS must hold exactly the desired state, old
//! logins of e-mail changes blocked, and no login created twice. Services
//! and camera access are on (SPEC §12): ActivePlatform subscriptions change
//! plans and stop, and every user's camera set must be exact too.
//!
//! `BILLSYNC_CAMPAIGN_KILLS=200 BILLSYNC_CAMPAIGN_SEED=7 cargo test --test campaign -- --nocapture`

mod common;
use common::LabSettings;

mod world;
use world::{World, EXTRA};

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use billsync_emulators::lab::Lab;
use billsync_emulators::Fault;

const BIN: &str = env!("CARGO_BIN_EXE_billsync");
fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn billsync(lab: &Lab, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--config").arg(lab.config_path()).args(args);
    c.env_remove("RUST_LOG");
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c
}

/// Starts `sync` or `run` and kills it with SIGKILL after `after`; whether
/// it was still running (and pushing) at that moment.
async fn kill_later(lab: &Lab, mut child: Child, after: Duration) -> (bool, bool) {
    let served = lab.vms.served();
    tokio::time::sleep(after).await;
    let running = child.try_wait().unwrap().is_none();
    let pushing = running && lab.vms.served() > served;
    let _ = child.kill();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    (running, pushing)
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_campaign_converges_exactly() {
    let kills = env_or("BILLSYNC_CAMPAIGN_KILLS", 60);
    let seed = env_or("BILLSYNC_CAMPAIGN_SEED", 1);
    let lab = Lab::start(40, 40).await.unwrap();
    lab.settings(EXTRA, &[]).unwrap();
    world::prepare(&lab);
    let mut world = World::new(&lab, seed);
    let faults = &lab.vms.faults;
    faults.set_latency(Duration::from_millis(15));
    faults.sometimes("", Fault::Status(500), 10, seed);
    faults.sometimes(
        "user/manage",
        Fault::LoseAnswer(Duration::from_millis(1500)),
        3,
        seed,
    );
    let (mut running, mut pushing) = (0, 0);
    let t = Instant::now();
    for k in 0..kills {
        world.change();
        let args: &[&str] = if k % 2 == 0 { &["sync"] } else { &["run"] };
        let child = billsync(&lab, args).spawn().unwrap();
        let after = Duration::from_millis(50 + world.rng.below(1500));
        let (r, p) = kill_later(&lab, child, after).await;
        running += r as u32;
        pushing += p as u32;
    }
    // The campaign's premise: kills landed in the middle of pushes.
    assert!(
        running > 0 && pushing > 0,
        "no kill landed while pushing ({running} while running, {pushing} pushing)"
    );
    faults.clear();
    let mut syncs = 0;
    loop {
        syncs += 1;
        let status = billsync(&lab, &["sync"]).status().unwrap();
        if status.code() == Some(0) {
            break;
        }
        assert!(syncs < 10, "no convergence after {syncs} syncs ({status})");
    }
    println!(
        "campaign: {kills} kills ({running} while running, {pushing} while pushing), \
         {} VMS requests, {syncs} syncs to converge, {:.0?}",
        lab.vms.served(),
        t.elapsed()
    );
    world.assert_converged();
}
