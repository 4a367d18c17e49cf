//! SPEC §13 end to end: the state store in a real PostgreSQL shared by
//! nodes, one of which leads through the lease. The real binary against the
//! emulators on loopback.

use std::process::Command;
use std::time::Duration;

use billsync::store::{Claim, Store};
use billsync_emulators::lab::Lab;

const BIN: &str = env!("CARGO_BIN_EXE_billsync");

fn billsync(lab: &Lab, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--config").arg(lab.config_path()).args(args);
    c.env_remove("RUST_LOG");
    c
}

/// A lab whose state store is a fresh PostgreSQL database, and a handle on
/// that store as another node would hold it.
async fn shared_lab(bm: usize, ap: usize) -> (Lab, Store) {
    let lab = Lab::start(bm, ap).await.unwrap().with_postgres();
    lab.write_config("");
    let url = lab.state_url.clone().unwrap();
    let other = Store::open_postgres(&url, Duration::from_secs(10))
        .await
        .unwrap();
    (lab, other)
}

/// While another node holds the lease, `sync` exits 3, names it and sends
/// nothing; once the lease is free it leads for its run, converges, and
/// gives the lease up at the end (the next leader need not wait).
#[tokio::test(flavor = "multi_thread")]
async fn sync_leads_for_its_run_or_names_the_leader() {
    let (lab, other) = shared_lab(3, 3).await;
    let Claim::Held(held) = other.claim_lease("node-b/1234", 60_000).await.unwrap() else {
        panic!("a fresh store's lease was taken");
    };
    let out = billsync(&lab, &["sync"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("node-b/1234") && err.contains("leads"),
        "{err}"
    );
    assert_eq!(lab.vms.requests(), 0, "a standby sent requests");

    other
        .release_lease("node-b/1234", held.epoch)
        .await
        .unwrap();
    let out = billsync(&lab, &["sync"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(lab.vms.data().users.len(), 6);
    let lease = other.lease().await.unwrap().expect("a lease row");
    assert_eq!(lease.epoch, held.epoch + 1, "sync led at the next epoch");
    assert!(
        lease.expires_ms <= lease.now_ms,
        "released at the end: {lease:?}"
    );
    match other.claim_lease("node-b/1234", 60_000).await.unwrap() {
        Claim::Held(r) => assert_eq!(r.epoch, held.epoch + 2),
        Claim::Other(r) => panic!("the lease was not given up: {r:?}"),
    }
}

/// `sync --dry-run` needs no lease: beside the node that leads it plans
/// from the shared store, exits 0, and writes nothing there (no cycle, the
/// lease untouched) and sends nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_plans_beside_the_leader_and_writes_nothing() {
    let (lab, other) = shared_lab(3, 3).await;
    let out = billsync(&lab, &["sync"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = billsync_emulators::activeplatform::generate(4, 7)
        .pop()
        .unwrap();
    lab.ap.data().accounts.push(new);
    let Claim::Held(held) = other.claim_lease("node-b/1", 60_000).await.unwrap() else {
        panic!("sync did not give the lease up");
    };
    let cycles = other.last_cycles(100).await.unwrap().len();
    let requests = lab.vms.requests();
    let out = billsync(&lab, &["sync", "--dry-run", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let planned: Vec<_> = report["plan"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["login"].clone(), p["action"].clone()))
        .collect();
    assert!(
        planned.contains(&("client4@ap.example.com".into(), "create".into())),
        "{planned:?}"
    );
    assert_eq!(lab.vms.requests(), requests, "a dry run sent requests");
    assert_eq!(
        other.last_cycles(100).await.unwrap().len(),
        cycles,
        "a dry run wrote a cycle"
    );
    let lease = other.lease().await.unwrap().unwrap();
    assert_eq!(
        (lease.holder.as_str(), lease.epoch, lease.expires_ms),
        ("node-b/1", held.epoch, held.expires_ms)
    );
}
