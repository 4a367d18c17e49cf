//! Rolling re-verification (SPEC §10.1, "due, then paced"): each incremental
//! cycle takes the accounts and users that are due (`core::pacing`), the
//! longest due first, at most `Pacing::bound` of each kind. A dry run takes
//! the same slice as the cycle after it, so it shows what that cycle sends.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};

use crate::core::model::SourceKind;
use crate::core::pacing::Pacing;
use crate::store::{Store, StoreError};

/// One cycle's re-verification work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slice {
    /// Account details to re-read, per source.
    pub accounts: BTreeMap<SourceKind, HashSet<String>>,
    /// Users to push in full (quarantine and backoff kept).
    pub logins: HashSet<String>,
}

/// The slice a cycle starting at `now` takes.
pub async fn due_slice(
    store: &Store,
    sources: &[SourceKind],
    pacing: Pacing,
    now: DateTime<Utc>,
) -> Result<Slice, StoreError> {
    let mut slice = Slice::default();
    if !pacing.enabled() {
        return Ok(slice);
    }
    let due_before = pacing.due_before(now.timestamp());
    for &kind in sources {
        let n = pacing.bound(store.count_accounts(kind).await?);
        let ids = store.due_accounts(kind, due_before, n).await?;
        slice.accounts.insert(kind, ids.into_iter().collect());
    }
    let n = pacing.bound(store.count_applied().await?);
    let due = store.due_logins(sources, due_before, n).await?;
    slice.logins = due.into_iter().collect();
    Ok(slice)
}

/// The sliced logins the plan has no operation for wait a period.
pub async fn defer_unplanned(
    store: &Store,
    slice: &HashSet<String>,
    planned: &HashSet<&str>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let idle: Vec<String> = (slice.iter())
        .filter(|l| !planned.contains(l.as_str()))
        .cloned()
        .collect();
    if idle.is_empty() {
        return Ok(());
    }
    store.defer_verification(&idle, now.timestamp()).await
}
