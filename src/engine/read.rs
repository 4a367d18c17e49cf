//! The read phase of a cycle, per source: list completely, fetch details for
//! what is new or changed, read payments, persist, normalize. A failure makes
//! the source *incomplete*: its known accounts are kept as the store has them,
//! and nothing of it is deprovisioned.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use futures::StreamExt;

use crate::core::model::{Account, Invalid, InvalidCode, RawAccount, SourceKind};
use crate::core::normalize::{self, Normalizer};
use crate::sources::{BadRow, Details, ListedAccount, Source};
use crate::store::Store;
use crate::telemetry::metrics;

/// Detail calls in flight per source.
const DETAIL_CONCURRENCY: usize = 4;
/// Details saved per transaction while they arrive.
const DETAIL_BATCH: usize = 500;

#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Fetch every account's details, read payments back `paid_history_days`.
    pub full: bool,
    pub payment_window_days: u32,
    /// `max(paid_within_days)` over the rules.
    pub paid_history_days: u32,
    pub now: DateTime<Utc>,
}

/// A record skipped this cycle, with why.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidRecord {
    pub id: String,
    pub kind: &'static str,
    pub invalid: Invalid,
}

#[derive(Debug, Default)]
pub struct SourceRead {
    pub complete: bool,
    pub error: Option<String>,
    /// Listed now (complete) or known from the store (incomplete).
    pub accounts: Vec<Account>,
    /// Missing-cycle counts of accounts absent from complete listings.
    pub missing: HashMap<String, u32>,
    pub invalid: Vec<InvalidRecord>,
    /// Latest paid date by account id.
    pub last_paid: HashMap<String, DateTime<Utc>>,
    pub listed: usize,
    pub detail_calls: u32,
    /// Listed accounts left out this cycle because their details could not
    /// be read (retried next cycle; never treated as deleted).
    pub details_unavailable: usize,
    /// Ids listed but not usable this cycle (details unavailable or gone
    /// mid-read): whatever they own is left alone.
    pub unusable: Vec<String>,
}

fn bad_rows(rows: Vec<BadRow>, kind: &'static str) -> Vec<InvalidRecord> {
    rows.into_iter()
        .map(|b| InvalidRecord {
            id: b.id,
            kind,
            invalid: Invalid::new(InvalidCode::Malformed, b.reason),
        })
        .collect()
}

pub async fn read_source(
    store: &Store,
    source: &Source,
    normalizer: &Normalizer,
    opts: &ReadOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<SourceRead, crate::store::StoreError> {
    let kind = source.kind();
    let t0 = std::time::Instant::now();
    let index = store.account_index(kind).await?;
    let mut out = SourceRead::default();

    // Only rows the store lacks keep their JSON in memory.
    let keep = |id: &str, hash: &str| index.get(id).is_none_or(|k| k.row_hash != hash);
    let listing = match source.list_accounts(progress, &keep).await {
        Ok(l) if l.accounts.is_empty() && !index.is_empty() => Err(format!(
            "listed zero accounts while the store knows {}; treated as a failed read",
            index.len()
        )),
        Ok(l) => Ok(l),
        Err(e) => Err(format!("account listing failed: {e}")),
    };
    let mut listing = match listing {
        Ok(l) => l,
        Err(error) => return incomplete(store, kind, normalizer, out, error).await,
    };
    out.listed = listing.accounts.len();
    tracing::debug!(source = %kind, ms = t0.elapsed().as_millis() as u64, rss_mb = ?crate::telemetry::rss_mb(), "listed");
    out.invalid
        .extend(bad_rows(std::mem::take(&mut listing.bad), "account"));

    // Payments: new or changed ones also trigger a detail fetch.
    let days = if opts.full {
        opts.payment_window_days.max(opts.paid_history_days)
    } else {
        opts.payment_window_days
    };
    let today = opts.now.date_naive();
    let since = today - ChronoDuration::days(i64::from(days));
    let payments = match source.payments(since, today).await {
        Ok(p) => p,
        Err(e) => {
            return incomplete(
                store,
                kind,
                normalizer,
                out,
                format!("payment listing failed: {e}"),
            )
            .await
        }
    };
    out.invalid.extend(bad_rows(payments.bad, "payment"));
    let pay_index = store.payment_index(kind).await?;
    let names = unique_names(&listing.accounts);
    let mut paid_accounts: HashSet<String> = HashSet::new();
    let mut to_save = vec![];
    for lp in payments.payments {
        if pay_index.get(&lp.raw.id) == Some(&lp.row_hash) {
            continue;
        }
        match normalize::payment(kind, &lp.raw) {
            Ok(mut p) => {
                if p.account_id.is_none() {
                    match p.account_name.as_ref().and_then(|n| names.get(n)) {
                        Some(Some(id)) => p.account_id = Some(id.clone()),
                        _ => {
                            out.invalid.push(InvalidRecord {
                                id: p.id.clone(),
                                kind: "payment",
                                invalid: Invalid::new(
                                    InvalidCode::UnknownAccount,
                                    "payment's account_name matches no single account",
                                ),
                            });
                            continue;
                        }
                    }
                }
                if let Some(a) = &p.account_id {
                    paid_accounts.insert(a.clone());
                }
                to_save.push((p, lp.row_hash));
            }
            Err(invalid) => out.invalid.push(InvalidRecord {
                id: lp.raw.id.clone(),
                kind: "payment",
                invalid,
            }),
        }
    }

    // Details for what is new, changed, never detailed, or newly paid.
    let wanted: Vec<(String, String)> = listing
        .accounts
        .iter()
        .filter(|a| source.needs_details(&a.raw) || opts.full)
        .filter(|a| {
            opts.full
                || match index.get(&a.raw.id) {
                    None => true,
                    Some(k) => k.row_hash != a.row_hash || !k.has_details,
                }
                || paid_accounts.contains(&a.raw.id)
        })
        .map(|a| (a.raw.id.clone(), a.row_hash.clone()))
        .collect();
    // Rows awaiting details are stored with no hash until their details are:
    // a crash in between makes the next cycle ask again.
    let awaiting: HashSet<&str> = wanted.iter().map(|(id, _)| id.as_str()).collect();
    for a in listing.accounts.iter_mut() {
        if awaiting.contains(a.raw.id.as_str()) {
            a.row_hash = String::new();
        }
    }
    drop(awaiting);
    // The listing goes to the store first so it can leave memory before the
    // detail calls; details are saved in batches as they arrive.
    store
        .save_listing(kind, &listing.accounts, &index, opts.now)
        .await?;
    store.save_payments(&to_save, opts.now).await?;
    drop(listing);
    let expected = index.len().max(out.listed);
    drop(index);
    let mut batch: Vec<(String, String, RawAccount)> = Vec::with_capacity(DETAIL_BATCH);
    let mut failed: HashSet<String> = HashSet::new();
    let mut gone: HashSet<String> = HashSet::new();
    type Fetched = (String, String, Result<Details, crate::http::FetchError>);
    let mut results = futures::stream::iter(wanted.into_iter().map(
        |(id, hash)| -> futures::future::BoxFuture<'_, Fetched> {
            Box::pin(async move {
                let r = source.details(&id).await;
                (id, hash, r)
            })
        },
    ))
    .buffer_unordered(DETAIL_CONCURRENCY);
    let mut detail_error = None;
    while let Some((id, hash, r)) = results.next().await {
        out.detail_calls += 1;
        match r {
            Ok(Details::Found(raw)) => {
                batch.push((id, hash, raw));
                // The buffered futures hold no pool connection: safe to await.
                if batch.len() >= DETAIL_BATCH {
                    store.save_details(kind, &batch, opts.now).await?;
                    batch.clear();
                }
            }
            Ok(Details::Gone) => {
                gone.insert(id);
            }
            Err(e) => {
                detail_error.get_or_insert_with(|| e.to_string());
                failed.insert(id);
            }
        }
    }
    drop(results);
    store.save_details(kind, &batch, opts.now).await?;
    drop(batch);
    if let Some(e) = &detail_error {
        tracing::warn!(source = %kind, failed = failed.len(), error = %e, "some account details could not be read; retried next cycle");
    }
    tracing::debug!(source = %kind, ms = t0.elapsed().as_millis() as u64, rss_mb = ?crate::telemetry::rss_mb(), "saved");
    out.accounts.reserve_exact(expected);
    // Normalize from the store, one row at a time: list rows merged with
    // details; absent accounts come with their missing count.
    store
        .scan_accounts(kind, |list, details, missing| {
            let id = list.id.clone();
            if missing > 0 {
                out.missing.insert(id, missing);
                let merged = match &details {
                    Some(d) => list.merged_with(d),
                    None => list,
                };
                if let Ok(acc) = normalizer.account(&merged) {
                    out.accounts.push(acc);
                }
                return;
            }
            if gone.contains(&id) {
                out.unusable.push(id);
                return;
            }
            let merged = match &details {
                Some(d) => list.merged_with(d),
                None if source.needs_details(&list) => {
                    out.details_unavailable += 1;
                    out.unusable.push(id);
                    return;
                }
                None => list,
            };
            match normalizer.account(&merged) {
                Ok(acc) => out.accounts.push(acc),
                Err(invalid) => out.invalid.push(InvalidRecord {
                    id,
                    kind: "account",
                    invalid,
                }),
            }
        })
        .await?;
    tracing::debug!(source = %kind, ms = t0.elapsed().as_millis() as u64, rss_mb = ?crate::telemetry::rss_mb(), "normalized");
    out.last_paid = store.last_paid(kind).await?;
    out.complete = true;
    finish(store, kind, &mut out).await?;
    Ok(out)
}

/// Accounts by name, `None` where a name is shared (ambiguous).
fn unique_names(accounts: &[ListedAccount]) -> HashMap<String, Option<String>> {
    let mut out: HashMap<String, Option<String>> = HashMap::new();
    for a in accounts {
        if let Some(n) = &a.raw.name {
            out.entry(n.trim().to_string())
                .and_modify(|v| *v = None)
                .or_insert_with(|| Some(a.raw.id.clone()));
        }
    }
    out
}

async fn incomplete(
    store: &Store,
    kind: SourceKind,
    normalizer: &Normalizer,
    mut out: SourceRead,
    error: String,
) -> Result<SourceRead, crate::store::StoreError> {
    tracing::warn!(source = %kind, error = %error, "source read failed; it is incomplete this cycle");
    store.record_source_error(kind, &error).await?;
    store
        .scan_accounts(kind, |list, details, missing| {
            if missing > 0 {
                out.missing.insert(list.id.clone(), missing);
            }
            let merged = match &details {
                Some(d) => list.merged_with(d),
                None => list,
            };
            if let Ok(acc) = normalizer.account(&merged) {
                out.accounts.push(acc);
            }
        })
        .await?;
    out.last_paid = store.last_paid(kind).await?;
    out.complete = false;
    out.error = Some(error);
    Ok(out)
}

async fn finish(
    store: &Store,
    kind: SourceKind,
    out: &mut SourceRead,
) -> Result<(), crate::store::StoreError> {
    let m = metrics::get();
    m.source_accounts
        .get_or_create(&metrics::Source {
            source: kind.as_str().into(),
        })
        .set(out.listed as i64);
    let records: Vec<_> = out
        .invalid
        .iter()
        .map(|r| {
            (
                r.id.clone(),
                r.kind,
                r.invalid.code.as_str(),
                r.invalid.detail.clone(),
            )
        })
        .collect();
    for r in &out.invalid {
        m.invalid(kind, r.invalid.code);
        tracing::warn!(source = %kind, id = %r.id, kind = r.kind, reason = r.invalid.code.as_str(), detail = %r.invalid.detail, "skipped an invalid record");
    }
    store.replace_invalid(kind, &records, Utc::now()).await
}
