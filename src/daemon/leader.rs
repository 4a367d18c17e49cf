//! A daemon on a shared store (SPEC §13): it keeps renewing the lease; when
//! it comes to lead it closes the cycles a dead leader left open and runs a
//! listing cycle at once; when it no longer leads it stops its cycles (the
//! gate already refuses their requests, the fence their writes) and waits
//! for them to end before it claims again.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::{other, Shared, StartError};
use crate::config::Settings;
use crate::core::cycle::CycleKind;
use crate::engine::Engine;
use crate::lease::{self, Change, Node};
use crate::store::StoreError;

/// The engine on the shared store, gated by this node's lease (claimed
/// once here: a node that leads has migrated the schema).
pub async fn open(settings: &Settings, url: &str) -> Result<(Engine, Arc<Node>), StartError> {
    let d = &settings.daemon;
    let name = lease::node_name(&d.node_name);
    let lease = std::time::Duration::from_secs(d.lease_secs);
    let vms_timeout = std::time::Duration::from_secs(settings.vms.timeout_secs);
    let (store, node, _) = lease::open_shared(url, &name, lease, vms_timeout)
        .await
        .map_err(other)?;
    let engine = Engine::with_store(settings.clone(), store);
    if engine.is_err() {
        node.release().await;
    }
    let mut engine = engine.map_err(other)?;
    engine.set_gate(node.clone());
    Ok((engine, node))
}

/// Renews the lease every third of it (a standby claims then, or as the
/// lease it read expires) until shutdown (the daemon gives it
/// up once its lanes have ended).
pub async fn keep(
    node: Arc<Node>,
    shared: Arc<Shared>,
    listing: mpsc::Sender<CycleKind>,
    mut shutdown: watch::Receiver<bool>,
) {
    if node.holds().is_some() {
        became(&node, &shared, &listing).await;
    }
    let mut wait = node.next_claim_in();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = super::stopped(&mut shutdown) => break,
        }
        // A cycle of an earlier leadership still ending: no claim until it
        // has. A node that may not lead claims nothing.
        let idle = node.leading().is_none() && shared.any_running();
        if idle || node.barred().is_some() {
            wait = node.renew_every();
            continue;
        }
        let change = node.renew().await;
        node.say(&change);
        match change {
            Change::Became { .. } => became(&node, &shared, &listing).await,
            Change::Lost { .. } => shared.stop_cycles(),
            _ => {}
        }
        wait = node.next_claim_in();
    }
}

/// A new leader first brings the schema to its binary's (or, when the
/// schema is newer, gives the lease up for good); then it closes the
/// cycles a dead leader left open and starts a listing cycle at once, and
/// another once in-doubt logins may be pushed.
async fn became(node: &Arc<Node>, shared: &Shared, listing: &mpsc::Sender<CycleKind>) {
    match migrate_leading(node, &shared.store).await {
        Ok(()) if node.holds().is_some() => node.settle(),
        // Lost while migrating: the next claim decides.
        Ok(()) => return,
        Err(e @ StoreError::Schema { .. }) => return node.bar(e.to_string()).await,
        Err(e) => {
            tracing::warn!(error = %e, "cannot bring the schema up to date; giving the lease up");
            return node.release().await;
        }
    }
    close_abandoned(shared).await;
    let _ = listing.try_send(CycleKind::Incremental);
    if let Some(wait) = node.in_doubt_wait() {
        let listing = listing.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = listing.send(CycleKind::Incremental).await;
        });
    }
}

/// Migrates while renewing the lease: a long migration must not let it
/// lapse. No cycle runs meanwhile (the node has not settled).
async fn migrate_leading(node: &Node, store: &crate::store::Store) -> Result<(), StoreError> {
    let store = store.clone();
    let mut migrate = tokio::spawn(async move { store.migrate_now().await });
    loop {
        tokio::select! {
            r = &mut migrate => {
                return r.unwrap_or_else(|e| Err(StoreError::Decode(format!("the migration failed: {e}"))));
            }
            _ = tokio::time::sleep(node.renew_every()) => node.say(&node.renew().await),
        }
    }
}

/// Cycles a dead leader left open are closed as failed.
async fn close_abandoned(shared: &Shared) {
    match shared.store.close_abandoned_cycles().await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            abandoned = n,
            "cycles left unfinished by an earlier leader were closed as failed"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot close the cycles an earlier leader left open"),
    }
}
