//! The read side of services (SPEC §12.1), after a source's accounts: the
//! complete service listing saved, or, when it cannot be had, the source
//! incomplete (nothing is taken away) and the stored services used.

use std::collections::HashSet;

use super::read::{InvalidRecord, ReadOptions, SourceRead};
use crate::core::entitlements::{service_state, RawService};
use crate::core::model::{Invalid, InvalidCode};
use crate::core::normalize::Normalizer;
use crate::http::FetchError;
use crate::sources::{ServiceListing, Source};
use crate::store::{ListedService, Store, StoreError};

/// Saves the source's service listing, then loads every stored service.
pub async fn read(
    store: &Store,
    source: &Source,
    listed: Option<Result<ServiceListing, FetchError>>,
    normalizer: &Normalizer,
    opts: &ReadOptions,
    out: &mut SourceRead,
) -> Result<(), StoreError> {
    let kind = source.kind();
    let t0 = std::time::Instant::now();
    let Some(listed) = listed else {
        return stored(store, source, out).await;
    };
    let known = store.count_services(kind).await?;
    match listed {
        Ok(l) if l.services.is_empty() && known > 0 => {
            let why = format!("listed zero services while the store knows {known}");
            incomplete(store, source, out, why).await
        }
        Ok(listing) => {
            save(store, source, normalizer, opts, None, listing, out).await?;
            super::read::debug_step(kind, "services saved", t0);
            stored(store, source, out).await
        }
        Err(e) => incomplete(store, source, out, format!("service listing failed: {e}")).await,
    }
}

/// The stored services, by owner (a targeted or incomplete read).
pub async fn stored(
    store: &Store,
    source: &Source,
    out: &mut SourceRead,
) -> Result<(), StoreError> {
    out.services = store.load_services(source.kind()).await?;
    Ok(())
}

/// A service listing that cannot be proved complete takes nothing away:
/// the whole source counts as incomplete this cycle.
async fn incomplete(
    store: &Store,
    source: &Source,
    out: &mut SourceRead,
    error: String,
) -> Result<(), StoreError> {
    let kind = source.kind();
    tracing::warn!(source = %kind, error = %error, "service read failed; the source is incomplete this cycle");
    store.record_source_error(kind, &error).await?;
    out.complete = false;
    out.error.get_or_insert(error);
    stored(store, source, out).await
}

/// Each row's owner and state, or why it is skipped (reported; the row's
/// stored state stands, so its account keeps what it had).
async fn save(
    store: &Store,
    source: &Source,
    normalizer: &Normalizer,
    opts: &ReadOptions,
    owner: Option<&str>,
    listing: ServiceListing,
    out: &mut SourceRead,
) -> Result<(), StoreError> {
    let kind = source.kind();
    // Names resolve owners only where a row names none: a per-account
    // read (`owner`) never needs the whole source's.
    let by_name = owner.is_none() && listing.services.iter().any(|r| r.owner_id.is_none());
    let names = match by_name {
        true => store.account_names(kind).await?,
        false => Default::default(),
    };
    let mut listed = Vec::with_capacity(listing.services.len());
    let mut skipped = HashSet::new();
    let unreadable = !listing.bad.is_empty();
    for bad in listing.bad {
        out.invalid
            .push(invalid(bad.id, InvalidCode::Malformed, bad.reason));
    }
    for mut raw in listing.services {
        // A per-account read names its owner even where rows do not.
        if raw.owner_id.is_none() {
            raw.owner_id = owner.map(str::to_string);
        }
        match normalize(&raw, normalizer, &names) {
            Ok((owner_id, state)) => listed.push(ListedService {
                raw,
                owner_id,
                state,
            }),
            Err(i) => {
                skipped.insert(raw.id.clone());
                out.invalid.push(InvalidRecord {
                    id: raw.id,
                    kind: "service",
                    invalid: i,
                });
            }
        }
    }
    // Absence proves a close only in a whole listing with every row read.
    let complete = owner.is_none() && !unreadable;
    let grace = opts.missing_grace_cycles;
    store
        .save_services(kind, complete, &listed, &skipped, grace, opts.read)
        .await
}

/// A targeted re-read of one account's services, where the source has a
/// per-account read (ActivePlatform); a failure leaves the stored ones.
pub async fn re_read(
    store: &Store,
    source: &Source,
    normalizer: &Normalizer,
    opts: &ReadOptions,
    id: &str,
    out: &mut SourceRead,
) -> Result<(), StoreError> {
    match source.account_services(id).await {
        None => Ok(()),
        Some(Ok(listing)) => save(store, source, normalizer, opts, Some(id), listing, out).await,
        Some(Err(e)) => {
            let kind = source.kind();
            tracing::warn!(source = %kind, id, error = %e, "services re-read failed; the stored ones stand");
            Ok(())
        }
    }
}

fn normalize(
    raw: &RawService,
    normalizer: &Normalizer,
    names: &std::collections::HashMap<String, Option<String>>,
) -> Result<(String, crate::core::entitlements::ServiceState), Invalid> {
    let status = raw.status.as_deref().unwrap_or_default();
    let state = service_state(status, &normalizer.service_states).ok_or_else(|| {
        Invalid::new(
            InvalidCode::UnknownStatus,
            format!("service status {status:?} is not in status_map"),
        )
    })?;
    let owner = match (&raw.owner_id, &raw.owner_name) {
        (Some(id), _) => id.clone(),
        (None, Some(name)) => match names.get(name) {
            Some(Some(id)) => id.clone(),
            Some(None) => {
                let why = format!("service owner name {name:?} belongs to several accounts");
                return Err(Invalid::new(InvalidCode::UnknownAccount, why));
            }
            None => {
                let why = format!("no account named {name:?}");
                return Err(Invalid::new(InvalidCode::UnknownAccount, why));
            }
        },
        (None, None) => {
            return Err(Invalid::new(
                InvalidCode::UnknownAccount,
                "service row names no owner",
            ))
        }
    };
    Ok((owner, state))
}

fn invalid(id: String, code: InvalidCode, why: String) -> InvalidRecord {
    InvalidRecord {
        id,
        kind: "service",
        invalid: Invalid::new(code, why),
    }
}
