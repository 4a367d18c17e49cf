//! Phase 2, read, per source: list completely, read payments, fetch details
//! for what is new or changed, persist, normalize. A failed listing or
//! payment read makes the source *incomplete*: its known accounts are kept
//! as the store has them, and nothing of it is deprovisioned. A failed
//! detail call does not: that account alone is left out this cycle and its
//! user left alone (`unusable`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use futures::StreamExt;

use super::index::Indexing;
use super::report::SourceSummary;
use super::{Engine, EngineError, Intent, Progress};
use crate::core::desired::SourceInput;
use crate::core::model::{
    Account, Invalid, InvalidCode, ListedAccount, Payment, RawAccount, SourceKind,
};
use crate::core::normalize::{self, Normalizer};
use crate::core::pacing::Pacing;
use crate::sources::{BadRow, Details, ListedPayment, Listing, PaymentListing, Source};
use crate::store::{AccountIndexEntry, ReadStamp, Store, StoreError};
use crate::telemetry::{liveness, metrics};

/// Detail calls in flight per source.
const DETAIL_CONCURRENCY: usize = 4;
/// Details saved per transaction while they arrive.
const DETAIL_BATCH: usize = 500;
/// Used when a source section names no payment window.
const DEFAULT_PAYMENT_WINDOW_DAYS: u32 = 3;

#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Fetch every account's details, read payments back `paid_history_days`.
    pub full: bool,
    pub payment_window_days: u32,
    /// `max(paid_within_days)` over the rules.
    pub paid_history_days: u32,
    /// Past this many missing cycles an account is deleted for good, and
    /// its row is no longer rewritten each cycle.
    pub missing_grace_cycles: u32,
    /// Accounts whose details are re-read this cycle whatever they look
    /// like (rolling re-verification).
    pub reverify: HashSet<String>,
    pub pacing: Pacing,
    /// This cycle's read: its sequence orders it against the other lane's.
    pub read: ReadStamp,
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
    /// Accounts re-read one by one (a targeted read).
    pub fresh: Vec<String>,
    /// What each account bought, by account id (SPEC §12.1).
    pub services: HashMap<String, Vec<crate::core::entitlements::Service>>,
}

/// Every source's contribution to a cycle.
#[derive(Default)]
pub struct Reads {
    pub inputs: BTreeMap<SourceKind, SourceInput>,
    pub summaries: BTreeMap<String, SourceSummary>,
    pub invalid: usize,
}

impl Engine {
    /// Reads every enabled source, each on a task of its own: their
    /// listings wait on different servers and parse on different cores, so
    /// the read phase costs the slowest source, not the sum.
    pub(super) async fn read_all(
        &self,
        store: &Store,
        intent: &Intent,
        progress: Option<&Progress>,
    ) -> Result<Reads, EngineError> {
        if !intent.kind.lists() {
            return self.read_targeted(store, intent).await;
        }
        // Dropping the set (a failed read, shutdown) aborts the others.
        let mut reads = tokio::task::JoinSet::new();
        for source in &self.sources {
            let job = self.read_job(store, source, intent, progress);
            reads.spawn(liveness::in_this_lane(job));
        }
        let mut out = Reads::default();
        while let Some(done) = reads.join_next().await {
            let (kind, read) = match done {
                Ok(read) => read?,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => return Err(EngineError::Setup(format!("source read: {e}"))),
            };
            out.add(kind, read);
        }
        Ok(out)
    }

    /// One source's read, owning what it uses.
    fn read_job(
        &self,
        store: &Store,
        source: &Source,
        intent: &Intent,
        progress: Option<&Progress>,
    ) -> impl Future<Output = Result<(SourceKind, SourceRead), EngineError>> + Send + 'static {
        let kind = source.kind();
        let (store, source) = (store.clone(), source.clone());
        let normalizer = self.normalizers[&kind].clone();
        let opts = self.read_options(kind, intent);
        let progress = progress.cloned();
        async move {
            let label = format!("reading {kind}");
            let cb = |n: usize| {
                if let Some(p) = &progress {
                    p(&label, n as u64, None);
                }
            };
            let read = read_source(&store, &source, &normalizer, &opts, &cb).await?;
            Ok((kind, read))
        }
    }

    pub(super) fn read_options(&self, kind: SourceKind, intent: &Intent) -> ReadOptions {
        let history = self.core.rules.iter().map(|r| r.paid_within_days).max();
        let window = self
            .settings
            .source(kind)
            .map(|s| s.common.payment_window_days);
        ReadOptions {
            full: intent.kind.is_full(),
            payment_window_days: window.unwrap_or(DEFAULT_PAYMENT_WINDOW_DAYS),
            paid_history_days: history.unwrap_or(0),
            missing_grace_cycles: self.settings.daemon.missing_grace_cycles,
            reverify: intent
                .reverify_accounts
                .get(&kind)
                .cloned()
                .unwrap_or_default(),
            pacing: self.pacing,
            read: ReadStamp {
                seq: intent.seq,
                at: intent.started,
            },
        }
    }
}

impl Reads {
    pub(super) fn add(&mut self, kind: SourceKind, r: SourceRead) {
        self.invalid += r.invalid.len();
        let summary = SourceSummary {
            accounts: r.listed,
            // A targeted read lists nothing, yet nothing failed.
            complete: r.error.is_none(),
            error: r.error,
        };
        self.summaries.insert(kind.as_str().to_string(), summary);
        let mut protected: HashSet<String> = r
            .invalid
            .into_iter()
            .filter(|i| i.kind == "account")
            .map(|i| i.id)
            .collect();
        protected.extend(r.unusable);
        let input = SourceInput {
            complete: r.complete,
            accounts: r.accounts,
            missing: r.missing,
            last_paid: r.last_paid,
            protected,
            fresh: r.fresh.into_iter().collect(),
            services: r.services,
        };
        self.inputs.insert(kind, input);
    }
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
) -> Result<SourceRead, StoreError> {
    let kind = source.kind();
    let t0 = std::time::Instant::now();
    let index = store.account_index(kind).await?;
    let mut out = SourceRead::default();
    // The services listing runs beside the accounts'; it is saved after
    // them, as a row may name its owner by an account's name.
    let (accounts, services) = tokio::join!(
        list(source, &index, opts, progress),
        source.list_services(&|_| {})
    );
    let (mut listing, payments) = match accounts {
        Ok(read) => read,
        Err(error) => return incomplete(store, kind, normalizer, out, error).await,
    };
    out.listed = listing.accounts.len();
    debug_step(kind, "listed", t0);
    out.invalid
        .extend(bad_rows(std::mem::take(&mut listing.bad), "account"));
    out.invalid.extend(bad_rows(payments.bad, "payment"));
    let names = unique_names(&listing.accounts);
    let (paid, to_save) = new_payments(store, source, payments.payments, &names, &mut out).await?;
    let wanted = wanted_details(source, &mut listing, &index, &paid, opts);
    // The listing goes to the store first (rows awaiting details without
    // their hash, so a crash re-asks), then the payments that asked for
    // them; the listing leaves memory before the detail calls.
    store
        .save_listing(
            kind,
            &listing.accounts,
            &index,
            opts.missing_grace_cycles,
            opts.read,
        )
        .await?;
    store.save_payments(&to_save, opts.read).await?;
    debug_step(kind, "listing saved", t0);
    drop(listing);
    let expected = index.len().max(out.listed);
    drop(index);
    let gone = fetch_details(store, source, wanted, opts, &mut out).await?;
    debug_step(kind, "saved", t0);
    out.accounts.reserve_exact(expected);
    normalize_stored(store, source, normalizer, &gone, &mut out).await?;
    debug_step(kind, "normalized", t0);
    out.last_paid = store.last_paid(kind).await?;
    out.complete = true;
    super::services::read(store, source, services, normalizer, opts, &mut out).await?;
    debug_step(kind, "services read", t0);
    finish(store, kind, &mut out).await?;
    Ok(out)
}

pub(super) fn debug_step(kind: SourceKind, what: &str, t0: std::time::Instant) {
    tracing::debug!(source = %kind, ms = t0.elapsed().as_millis() as u64, rss_mb = ?crate::telemetry::rss_mb(), "{what}");
}

/// The complete listing and the payment window; the error text of the first
/// read that failed. An empty listing while the store knows accounts is a
/// failed read.
async fn list(
    source: &Source,
    index: &HashMap<String, AccountIndexEntry>,
    opts: &ReadOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<(Listing, PaymentListing), String> {
    // Only rows the store lacks keep their JSON in memory.
    let keep = |id: &str, hash: &str| index.get(id).is_none_or(|k| k.row_hash != hash);
    let listing = match source.list_accounts(progress, &keep).await {
        Ok(l) if l.accounts.is_empty() && !index.is_empty() => Err(format!(
            "listed zero accounts while the store knows {}; treated as a failed read",
            index.len()
        )),
        Ok(l) => Ok(l),
        Err(e) => Err(format!("account listing failed: {e}")),
    }?;
    let days = match opts.full {
        true => opts.payment_window_days.max(opts.paid_history_days),
        false => opts.payment_window_days,
    };
    let today = opts.read.at.date_naive();
    let since = today - ChronoDuration::days(i64::from(days));
    let payments = source
        .payments(since, today)
        .await
        .map_err(|e| format!("payment listing failed: {e}"))?;
    Ok((listing, payments))
}

/// New and changed payments, normalized, and the accounts they belong to
/// (whose details are fetched again). `names` resolves payments that carry
/// only an account name: name -> id, `None` where the name is shared.
pub async fn new_payments(
    store: &Store,
    source: &Source,
    payments: Vec<ListedPayment>,
    names: &HashMap<String, Option<String>>,
    out: &mut SourceRead,
) -> Result<(HashSet<String>, Vec<(Payment, String)>), StoreError> {
    let kind = source.kind();
    let ids: Vec<&str> = payments.iter().map(|p| p.raw.id.as_str()).collect();
    let known = store.payment_hashes(kind, &ids).await?;
    drop(ids);
    let mut paid_accounts = HashSet::new();
    let mut to_save = vec![];
    for lp in payments {
        if known.get(&lp.raw.id) == Some(&lp.row_hash) {
            continue;
        }
        let normalized = normalize::payment(kind, &lp.raw, |s| source.payment_state(s));
        let mut p = match normalized {
            Ok(p) => p,
            Err(invalid) => {
                out.invalid
                    .push(invalid_payment(lp.raw.id.clone(), invalid));
                continue;
            }
        };
        if p.account_id.is_none() {
            match p.account_name.as_ref().and_then(|n| names.get(n)) {
                Some(Some(id)) => p.account_id = Some(id.clone()),
                _ => {
                    let why = "payment's account_name matches no single account";
                    let invalid = Invalid::new(InvalidCode::UnknownAccount, why);
                    out.invalid.push(invalid_payment(p.id.clone(), invalid));
                    continue;
                }
            }
        }
        paid_accounts.extend(p.account_id.clone());
        to_save.push((p, lp.row_hash));
    }
    Ok((paid_accounts, to_save))
}

fn invalid_payment(id: String, invalid: Invalid) -> InvalidRecord {
    InvalidRecord {
        id,
        kind: "payment",
        invalid,
    }
}

/// `(id, row hash)` of the accounts whose details are fetched: new, changed,
/// never detailed or newly paid (all on a full read). Their rows are stored
/// with no hash until their details are: a crash in between re-asks.
fn wanted_details(
    source: &Source,
    listing: &mut Listing,
    index: &HashMap<String, AccountIndexEntry>,
    paid: &HashSet<String>,
    opts: &ReadOptions,
) -> Vec<(String, String)> {
    let full = opts.full;
    let stale = |a: &ListedAccount| match index.get(&a.raw.id) {
        None => true,
        Some(k) => k.row_hash != a.row_hash || !k.has_details,
    };
    let mut wanted = vec![];
    for a in listing.accounts.iter_mut() {
        let reverify = opts.reverify.contains(&a.raw.id);
        let due = full || reverify || stale(a) || paid.contains(&a.raw.id);
        if (full || reverify || source.needs_details(&a.raw)) && due {
            wanted.push((a.raw.id.clone(), std::mem::take(&mut a.row_hash)));
        }
    }
    wanted
}

/// Fetches details with bounded concurrency, saving them in batches.
/// Returns the ids the source says are gone.
async fn fetch_details(
    store: &Store,
    source: &Source,
    wanted: Vec<(String, String)>,
    opts: &ReadOptions,
    out: &mut SourceRead,
) -> Result<HashSet<String>, StoreError> {
    type Fetched = (String, String, Result<Details, crate::http::FetchError>);
    let kind = source.kind();
    let mut results = futures::stream::iter(wanted.into_iter().map(
        |(id, hash)| -> futures::future::BoxFuture<'_, Fetched> {
            Box::pin(async move {
                let r = source.details(&id).await;
                (id, hash, r)
            })
        },
    ))
    .buffer_unordered(DETAIL_CONCURRENCY);
    let mut batch: Vec<(String, String, RawAccount)> = Vec::with_capacity(DETAIL_BATCH);
    let (mut gone, mut failed) = (HashSet::new(), 0usize);
    let mut first_error = None;
    while let Some((id, hash, r)) = results.next().await {
        out.detail_calls += 1;
        match r {
            Ok(Details::Found(raw)) => batch.push((id, hash, raw)),
            Ok(Details::Gone) => {
                gone.insert(id);
            }
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
                failed += 1;
            }
        }
        // The buffered futures hold no pool connection: safe to await.
        if batch.len() >= DETAIL_BATCH {
            store
                .save_details(kind, &batch, opts.read, &opts.pacing, opts.full)
                .await?;
            batch.clear();
        }
    }
    drop(results);
    store
        .save_details(kind, &batch, opts.read, &opts.pacing, opts.full)
        .await?;
    if let Some(e) = &first_error {
        tracing::warn!(source = %kind, failed, error = %e, "some account details could not be read; retried next cycle");
    }
    Ok(gone)
}

/// Normalizes from the store, a page at a time: list rows merged with
/// details; absent accounts come with their missing count.
async fn normalize_stored(
    store: &Store,
    source: &Source,
    normalizer: &Normalizer,
    gone: &HashSet<String>,
    out: &mut SourceRead,
) -> Result<(), StoreError> {
    let kind = source.kind();
    let mut index = Indexing::new(normalizer);
    let mut pages = store.account_pages(kind);
    while let Some(page) = pages.next().await? {
        for row in page {
            let gone = gone.contains(&row.key.id);
            let undetailed = row.details.is_none() && source.needs_details(&row.list);
            let (id, missing, indexed) = (row.key.id, row.missing, row.index);
            let normalized = normalizer.account(&merge(row.list, row.details));
            index.see(&indexed, &id, normalized.as_ref().ok());
            if missing > 0 {
                out.missing.insert(id, missing);
                out.accounts.extend(normalized.ok());
            } else if gone || undetailed {
                out.details_unavailable += usize::from(!gone);
                out.unusable.push(id);
            } else {
                match normalized {
                    Ok(acc) => out.accounts.push(acc),
                    Err(invalid) => out.invalid.push(InvalidRecord {
                        id,
                        kind: "account",
                        invalid,
                    }),
                }
            }
        }
        index.flush(store, kind).await?;
    }
    index.finish(store, kind, true).await
}

pub(super) fn merge(list: RawAccount, details: Option<RawAccount>) -> RawAccount {
    match &details {
        Some(d) => list.merged_with(d),
        None => list,
    }
}

/// Accounts by name, `None` where a name is shared (ambiguous).
fn unique_names(accounts: &[ListedAccount]) -> HashMap<String, Option<String>> {
    let named = accounts
        .iter()
        .filter_map(|a| Some((a.raw.name.clone()?, a.raw.id.clone())));
    crate::core::model::unique_names(named)
}

/// Every stored account of a source, normalized, with its missing count.
pub(super) async fn stored_accounts(
    store: &Store,
    kind: SourceKind,
    normalizer: &Normalizer,
    out: &mut SourceRead,
) -> Result<(), StoreError> {
    let mut index = Indexing::new(normalizer);
    let mut pages = store.account_pages(kind);
    while let Some(page) = pages.next().await? {
        for row in page {
            let normalized = normalizer.account(&merge(row.list, row.details)).ok();
            index.see(&row.index, &row.key.id, normalized.as_ref());
            if row.missing > 0 {
                out.missing.insert(row.key.id, row.missing);
            }
            out.accounts.extend(normalized);
        }
        index.flush(store, kind).await?;
    }
    index.finish(store, kind, true).await?;
    out.last_paid = store.last_paid(kind).await?;
    Ok(())
}

async fn incomplete(
    store: &Store,
    kind: SourceKind,
    normalizer: &Normalizer,
    mut out: SourceRead,
    error: String,
) -> Result<SourceRead, StoreError> {
    tracing::warn!(source = %kind, error = %error, "source read failed; it is incomplete this cycle");
    store.record_source_error(kind, &error).await?;
    stored_accounts(store, kind, normalizer, &mut out).await?;
    out.services = store.load_services(kind).await?;
    out.complete = false;
    out.error = Some(error);
    Ok(out)
}

async fn finish(store: &Store, kind: SourceKind, out: &mut SourceRead) -> Result<(), StoreError> {
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

/// Accounts whose camera group template has no value: reported as invalid
/// (reason `camera_group`); their users' sets stay as applied.
pub(super) async fn record_camera_errors(
    store: &Store,
    errors: &[(
        crate::core::model::AccountKey,
        crate::core::entitlements::MissingPlaceholder,
    )],
) -> Result<(), StoreError> {
    let m = metrics::get();
    let mut records = vec![];
    for (key, e) in errors {
        m.invalid(key.source, InvalidCode::CameraGroup);
        tracing::warn!(account = %key, detail = %e, "camera group template without a value; the camera set stays as applied");
        records.push((key.source, key.id.clone(), e.to_string()));
    }
    store.replace_camera_errors(&records, Utc::now()).await
}
