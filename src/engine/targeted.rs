//! A targeted read (SPEC §10.3): the named accounts re-read one by one and
//! stored as the freshest truth, then the stored accounts the plan needs:
//! those that yield the re-read accounts' logins or a named login, found
//! through the login index (issue 21), so the cost follows what the cycle
//! re-read, not the customer base. Ownership and conflicts of those logins
//! come out as a build over every account would give them: only accounts
//! that yield a login compete for it. Where the index cannot be trusted
//! (never built, or built with other normalizer settings), every stored
//! account is read, as before, and that pass rebuilds it. The sources count as incomplete, so
//! nothing is deprovisioned; an account the source says is gone is left to
//! the next listing.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::index::Indexing;
use super::read::{merge, stored_accounts, ReadOptions, Reads, SourceRead};
use super::{Engine, EngineError, Intent};
use crate::core::model::{Account, AccountKey, CanonicalStatus, SourceKind};
use crate::core::normalize::Normalizer;
use crate::sources::{Details, Source};
use crate::store::{Fresh, Scanned, Store, StoreError};

/// The stored accounts a targeted cycle builds its desired users from.
#[derive(Default)]
struct Found {
    accounts: Vec<Account>,
    missing: HashMap<String, u32>,
}

impl Engine {
    pub(super) async fn read_targeted(
        &self,
        store: &Store,
        intent: &Intent,
    ) -> Result<Reads, EngineError> {
        let reads = self.sources.iter().map(|source| {
            let kind = source.kind();
            let ids: Vec<&str> = (intent.accounts.iter())
                .filter(|a| a.source == kind)
                .map(|a| a.id.as_str())
                .collect();
            let opts = self.read_options(kind, intent);
            let normalizer = &self.normalizers[&kind];
            async move { re_read(store, source, normalizer, &ids, &opts).await }
        });
        let t0 = std::time::Instant::now();
        let reads = futures::future::try_join_all(reads).await?;
        debug_step("re-read", t0);
        let mut scope = self.scope(store, intent).await?;
        debug_step("scope found", t0);
        let mut out = Reads::default();
        for (source, mut read) in self.sources.iter().zip(reads) {
            let kind = source.kind();
            match scope.as_mut() {
                Some(found) => {
                    let found = found.remove(&kind).unwrap_or_default();
                    stored_in_scope(store, kind, found, &mut read).await?
                }
                None => {
                    stored_accounts(store, kind, &self.normalizers[&kind], &mut read).await?;
                    super::services::stored(store, source, &mut read).await?;
                }
            }
            read.complete = false;
            out.add(kind, read);
        }
        Ok(out)
    }

    /// The stored accounts that yield the logins the cycle plans, by
    /// source; `None` when the login index cannot be trusted.
    async fn scope(
        &self,
        store: &Store,
        intent: &Intent,
    ) -> Result<Option<BTreeMap<SourceKind, Found>>, StoreError> {
        for (kind, normalizer) in &self.normalizers {
            let tag = store.login_tag(*kind).await?;
            if tag.as_deref() != Some(normalizer.index_tag().as_str()) {
                tracing::debug!(source = %kind, "login index not built for these settings; reading every stored account");
                return Ok(None);
            }
        }
        let targets: Vec<AccountKey> = intent.accounts.iter().cloned().collect();
        let mut seen = Seen::new(&self.normalizers);
        for row in store.accounts_by_key(&targets).await? {
            seen.add(row, None);
        }
        let mut logins: BTreeSet<String> = intent.resync_logins.iter().cloned().collect();
        let of_targets = targets.iter().filter_map(|k| seen.login_of(k));
        logins.extend(of_targets.map(str::to_string));
        // The rows changed since they were indexed (a few, unless a listing
        // is saving a changed source), before the lookups: a row indexed
        // meanwhile is then found by its login.
        for kind in self.normalizers.keys() {
            let mut pages = store.unindexed_pages(*kind);
            while let Some(page) = pages.next().await? {
                for row in page {
                    seen.add(row, Some(&logins));
                }
                seen.write_index(store).await?;
            }
        }
        for login in &logins {
            for row in store.accounts_with_login(login).await? {
                seen.add(row, None);
            }
        }
        seen.write_index(store).await?;
        Ok(Some(seen.yielding(&logins)))
    }
}

/// Stored accounts normalized once each, with what the index needs.
struct Seen<'n> {
    normalizers: &'n BTreeMap<SourceKind, std::sync::Arc<Normalizer>>,
    accounts: HashMap<AccountKey, (Option<Account>, u32)>,
    indexing: BTreeMap<SourceKind, Indexing>,
}

impl<'n> Seen<'n> {
    fn new(normalizers: &'n BTreeMap<SourceKind, std::sync::Arc<Normalizer>>) -> Self {
        Self {
            normalizers,
            accounts: HashMap::new(),
            indexing: BTreeMap::new(),
        }
    }

    /// Normalizes a row not seen yet, of a source this cycle reads, and
    /// keeps it unless it yields none of `keep`.
    fn add(&mut self, row: Scanned, keep: Option<&BTreeSet<String>>) {
        let Some(normalizer) = self.normalizers.get(&row.key.source) else {
            return;
        };
        if self.accounts.contains_key(&row.key) {
            return;
        }
        let account = normalizer.account(&merge(row.list, row.details)).ok();
        let indexing = (self.indexing)
            .entry(row.key.source)
            .or_insert_with(|| Indexing::new(normalizer));
        indexing.see(&row.index, &row.key.id, account.as_ref());
        let wanted = |a: &Account| keep.is_none_or(|k| k.contains(&a.login));
        if account.as_ref().is_some_and(wanted) || keep.is_none() {
            self.accounts.insert(row.key, (account, row.missing));
        }
    }

    fn login_of(&self, key: &AccountKey) -> Option<&str> {
        let (account, _) = self.accounts.get(key)?;
        account.as_ref().map(|a| a.login.as_str())
    }

    /// Rows seen changed since they were indexed: indexed now.
    async fn write_index(&mut self, store: &Store) -> Result<(), StoreError> {
        for (kind, indexing) in std::mem::take(&mut self.indexing) {
            indexing.finish(store, kind, false).await?;
        }
        Ok(())
    }

    /// The accounts that yield one of `logins`, by source.
    fn yielding(self, logins: &BTreeSet<String>) -> BTreeMap<SourceKind, Found> {
        let mut out: BTreeMap<SourceKind, Found> = BTreeMap::new();
        for (key, (account, missing)) in self.accounts {
            let Some(account) = account.filter(|a| logins.contains(&a.login)) else {
                continue;
            };
            let found = out.entry(key.source).or_default();
            if missing > 0 {
                found.missing.insert(key.id, missing);
            }
            found.accounts.push(account);
        }
        // In key order, as a build over every account sees them (a tree
        // element two owners name takes the same name).
        for found in out.values_mut() {
            found.accounts.sort_by(|a, b| a.key.cmp(&b.key));
        }
        out
    }
}

/// A source's share of the scope, with the payments and services of those
/// accounts alone.
async fn stored_in_scope(
    store: &Store,
    kind: SourceKind,
    found: Found,
    out: &mut SourceRead,
) -> Result<(), StoreError> {
    let ids: Vec<&str> = found.accounts.iter().map(|a| a.key.id.as_str()).collect();
    out.last_paid = store.last_paid_of(kind, &ids).await?;
    out.services = store.load_services_of(kind, &ids).await?;
    out.missing = found.missing;
    out.accounts = found.accounts;
    Ok(())
}

/// Each named account of one source re-read and stored; a re-read that
/// states a live status is evidence the account exists: it ends its "gone"
/// mark.
async fn re_read(
    store: &Store,
    source: &Source,
    normalizer: &Normalizer,
    ids: &[&str],
    opts: &ReadOptions,
) -> Result<SourceRead, StoreError> {
    let kind = source.kind();
    let mut out = SourceRead::default();
    for id in ids {
        out.detail_calls += 1;
        match source.details(id).await {
            Ok(Details::Found(raw)) => {
                let live = (raw.status.as_deref())
                    .and_then(|s| normalizer.status(s))
                    .is_some_and(|s| s != CanonicalStatus::Deleted);
                let detailed = source.needs_details(&raw);
                let fresh = Fresh {
                    raw: &raw,
                    live,
                    detailed,
                };
                store
                    .save_fresh(kind, fresh, opts.read, &opts.pacing)
                    .await?;
                super::services::re_read(store, source, normalizer, opts, id, &mut out).await?;
                out.fresh.push(id.to_string());
            }
            Ok(Details::Gone) => {
                tracing::info!(source = %kind, id, "targeted account not found; the next listing decides");
            }
            Err(e) => {
                tracing::warn!(source = %kind, id, error = %e, "targeted re-read failed; the next cycle reads it");
                out.unusable.push(id.to_string());
            }
        }
    }
    Ok(out)
}

fn debug_step(what: &str, t0: std::time::Instant) {
    tracing::debug!(
        ms = t0.elapsed().as_millis() as u64,
        "targeted read: {what}"
    );
}
