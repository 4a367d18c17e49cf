//! The login index (issue 21): the login each stored account yields, as
//! last worked out, so a targeted cycle reads the few accounts that share
//! its logins instead of normalizing every account. The store keeps it; the
//! engine works the logins out (the store has no normalizer).

use std::collections::BTreeMap;

use futures::TryStreamExt;

use super::db::{on, on_pool, on_write, Row};
use super::{decode_json, Result, Store};
use crate::core::model::{AccountKey, RawAccount, SourceKind};

/// Index rows written per transaction.
const INDEX_BATCH: usize = 1000;

/// Bound on the ids of one `IN (…)` list.
const KEYS_PER_QUERY: usize = 500;

/// A stored account as a cycle normalizes it, with its index entry.
#[derive(Debug, Clone)]
pub struct Scanned {
    pub key: AccountKey,
    pub list: RawAccount,
    pub details: Option<RawAccount>,
    pub missing: u32,
    pub index: Indexed,
}

/// What the index holds for one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indexed {
    /// The login last worked out (None: the row yields none, or never had
    /// one worked out).
    pub login: Option<String>,
    /// False while the row changed since then.
    pub current: bool,
    /// The row's reads (`seen_seq`, `details_seq`): an index entry is
    /// written only over the row it was worked out from.
    pub version: (i64, i64),
}

/// A login worked out for a row, to be stored.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    pub id: String,
    pub login: Option<String>,
    pub version: (i64, i64),
}

impl Indexed {
    /// The entry to write when `login` is not what the index holds.
    pub fn stale(&self, id: &str, login: Option<&str>) -> Option<IndexEntry> {
        (!self.current || self.login.as_deref() != login).then(|| IndexEntry {
            id: id.to_string(),
            login: login.map(str::to_string),
            version: self.version,
        })
    }
}

/// The columns `scanned` decodes, in its order.
const SCANNED: &str = "source, id, list_raw, details_json, missing_cycles, login,
    login_indexed IS NOT NULL, seen_seq, COALESCE(details_seq, -1)";

fn scanned(r: &Row) -> Result<Scanned> {
    let source: &str = r.get(0);
    Ok(Scanned {
        key: super::account_key(source, r.get(1))?,
        list: decode_json(r.get::<&str, _>(2))?,
        details: match r.get::<Option<&str>, _>(3) {
            Some(d) => Some(decode_json(d)?),
            None => None,
        },
        missing: r.get::<i64, _>(4).max(0) as u32,
        index: Indexed {
            login: r.get(5),
            current: r.get(6),
            version: (r.get(7), r.get(8)),
        },
    })
}

/// Stored accounts per page of a scan.
const PAGE: usize = 2_000;

/// Every stored account of a source, a page at a time in id order: 100k
/// accounts never sit in memory twice, no statement outlives a page (a
/// session's `statement_timeout` bounds each on PostgreSQL), and the
/// reader may write between pages.
pub struct AccountPages<'s> {
    store: &'s Store,
    source: SourceKind,
    after: String,
    done: bool,
    /// Only the rows changed since they were indexed.
    unindexed: bool,
}

impl AccountPages<'_> {
    /// The next page; None after the last.
    pub async fn next(&mut self) -> Result<Option<Vec<Scanned>>> {
        if self.done {
            return Ok(None);
        }
        // `source || ''` keeps SQLite's planner off the primary key, whose
        // `source =` would walk every row of the source: the partial index
        // holds just the unindexed ones, in (source, id) order.
        let sql = match self.unindexed {
            false => format!(
                "SELECT {SCANNED} FROM source_accounts
                 WHERE source = $1 AND id > $2 ORDER BY id LIMIT $3"
            ),
            true => format!(
                "SELECT {SCANNED} FROM source_accounts
                 WHERE login_indexed IS NULL AND source || '' = $1 AND id > $2
                 ORDER BY source, id LIMIT $3"
            ),
        };
        let page = on_pool!(self.store.db, |c| collect(
            sqlx::query(&sql)
                .bind(self.source.as_str())
                .bind(&self.after)
                .bind(PAGE as i64)
                .fetch(c)
        )
        .await)?;
        self.done = page.len() < PAGE;
        match page.last() {
            Some(last) => self.after = last.key.id.clone(),
            None => return Ok(None),
        }
        Ok(Some(page))
    }
}

fn tag_key(source: SourceKind) -> String {
    format!("login_index:{}", source.as_str())
}

impl Store {
    /// Every stored account of `source` (list row, details if fetched,
    /// missing count, index entry), in pages.
    pub fn account_pages(&self, source: SourceKind) -> AccountPages<'_> {
        AccountPages {
            store: self,
            source,
            after: String::new(),
            done: false,
            unindexed: false,
        }
    }

    /// The accounts of `source` changed since they were indexed, in pages.
    pub fn unindexed_pages(&self, source: SourceKind) -> AccountPages<'_> {
        AccountPages {
            unindexed: true,
            ..self.account_pages(source)
        }
    }

    /// Stores worked-out logins, each only over the row version it was
    /// worked out from (a row rewritten meanwhile stays unindexed).
    pub async fn index_logins(&self, source: SourceKind, entries: &[IndexEntry]) -> Result<()> {
        for batch in entries.chunks(INDEX_BATCH) {
            let mut tx = self.write_tx().await?;
            for e in batch {
                on!(tx.conn(), |c| sqlx::query(
                    "UPDATE source_accounts SET login = $3, login_indexed = TRUE
                     WHERE source = $1 AND id = $2
                       AND seen_seq = $4 AND COALESCE(details_seq, -1) = $5",
                )
                .bind(source.as_str())
                .bind(&e.id)
                .bind(&e.login)
                .bind(e.version.0)
                .bind(e.version.1)
                .execute(c)
                .await
                .map(drop))?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// The normalizer settings (`Normalizer::index_tag`) every indexed row
    /// of the source was worked out with, if one pass over all of them did.
    pub async fn login_tag(&self, source: SourceKind) -> Result<Option<String>> {
        self.meta(&tag_key(source)).await
    }

    pub async fn set_login_tag(&self, source: SourceKind, tag: &str) -> Result<()> {
        self.set_meta(&tag_key(source), tag).await
    }

    /// The index follows no settings any more: entries of other settings
    /// are about to be written.
    pub async fn clear_login_tag(&self, source: SourceKind) -> Result<()> {
        on_write!(self, |c| sqlx::query("DELETE FROM meta WHERE key = $1")
            .bind(tag_key(source))
            .execute(c)
            .await
            .map(drop))?;
        Ok(())
    }

    /// The stored accounts among `keys`.
    pub async fn accounts_by_key(&self, keys: &[AccountKey]) -> Result<Vec<Scanned>> {
        let mut by_source: BTreeMap<SourceKind, Vec<&str>> = BTreeMap::new();
        for k in keys {
            by_source.entry(k.source).or_default().push(&k.id);
        }
        let mut out = vec![];
        for (source, ids) in by_source {
            for chunk in ids.chunks(KEYS_PER_QUERY) {
                let sql = format!(
                    "SELECT {SCANNED} FROM source_accounts WHERE source = $1 AND id IN ({})",
                    placeholders(2, chunk.len())
                );
                out.extend(on_pool!(self.db, |c| {
                    let q = bind_ids(chunk, sqlx::query(&sql).bind(source.as_str()));
                    collect(q.fetch(c)).await
                })?);
            }
        }
        Ok(out)
    }

    /// Every account whose indexed login is `login`, current or not.
    pub async fn accounts_with_login(&self, login: &str) -> Result<Vec<Scanned>> {
        let sql = format!("SELECT {SCANNED} FROM source_accounts WHERE login = $1");
        on_pool!(self.db, |c| collect(sqlx::query(&sql).bind(login).fetch(c))
            .await)
    }
}

/// Binds each of `ids`, in order.
pub(super) fn bind_ids<'q, DB: sqlx::Database>(
    ids: &[&'q str],
    mut q: sqlx::query::Query<'q, DB, DB::Arguments<'q>>,
) -> sqlx::query::Query<'q, DB, DB::Arguments<'q>>
where
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for id in ids {
        q = q.bind(*id);
    }
    q
}

/// Runs of at most `max` rows, a new one wherever a key repeats, in the
/// order given: one statement per run never writes a row twice (PostgreSQL
/// refuses that), and the rows land as they would row by row.
pub(super) fn distinct_runs<'a, T>(
    rows: &'a [T],
    max: usize,
    key: impl Fn(&'a T) -> &'a str,
) -> Vec<&'a [T]> {
    let (mut runs, mut start) = (vec![], 0);
    let mut seen = std::collections::HashSet::new();
    for (i, row) in rows.iter().enumerate() {
        if i - start == max || !seen.insert(key(row)) {
            runs.push(&rows[start..i]);
            start = i;
            seen.clear();
            seen.insert(key(row));
        }
    }
    if start < rows.len() {
        runs.push(&rows[start..]);
    }
    runs
}

/// `$first, $first+1, …`, `n` of them.
pub(super) fn placeholders(first: usize, n: usize) -> String {
    let all = (first..first + n).map(|i| format!("${i}"));
    all.collect::<Vec<_>>().join(", ")
}

async fn collect<R, E>(
    rows: impl futures::Stream<Item = std::result::Result<R, E>>,
) -> Result<Vec<Scanned>>
where
    R: Into<Row>,
    super::StoreError: From<E>,
{
    let mut rows = std::pin::pin!(rows);
    let mut out = vec![];
    while let Some(r) = rows.try_next().await? {
        out.push(scanned(&r.into())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::ListedAccount;
    use crate::core::pacing::Pacing;
    use crate::store::testing::stores;
    use crate::store::{Fresh, ReadStamp};

    const AP: SourceKind = SourceKind::Activeplatform;

    fn read(seq: i64) -> ReadStamp {
        ReadStamp {
            seq,
            at: chrono::Utc::now(),
        }
    }

    async fn list(store: &Store, email: &str, seq: i64) {
        let raw = RawAccount {
            id: "7".into(),
            email: Some(email.into()),
            ..Default::default()
        };
        let row = ListedAccount {
            raw,
            row_hash: format!("hash-{email}"),
            row_json: None,
        };
        let index = store.account_index(AP).await.unwrap();
        (store.save_listing(AP, &[row], &index, 3, read(seq)))
            .await
            .unwrap();
    }

    async fn row(store: &Store) -> Scanned {
        let key = AccountKey {
            source: AP,
            id: "7".into(),
        };
        store.accounts_by_key(&[key]).await.unwrap().remove(0)
    }

    async fn unindexed(store: &Store) -> usize {
        let mut pages = store.unindexed_pages(AP);
        let mut n = 0;
        while let Some(page) = pages.next().await.unwrap() {
            n += page.len();
        }
        n
    }

    async fn index(store: &Store, row: &Scanned, login: &str) {
        let entry = IndexEntry {
            id: "7".into(),
            login: Some(login.into()),
            version: row.index.version,
        };
        store.index_logins(AP, &[entry]).await.unwrap();
    }

    /// A login worked out from one version of a row must never land on a
    /// newer one (the other lane rewrote it meanwhile): the index would
    /// then name the wrong accounts for a login, and a targeted cycle would
    /// hand the login to the wrong owner.
    #[tokio::test]
    async fn an_index_entry_lands_only_on_the_row_it_was_worked_out_from() {
        for (store, _dir) in stores().await {
            list(&store, "a@example.com", 1).await;
            let first = row(&store).await;
            assert!(!first.index.current, "a new row is unindexed");
            assert_eq!(unindexed(&store).await, 1);
            index(&store, &first, "a@example.com").await;
            let indexed = row(&store).await;
            assert!(indexed.index.current);
            assert_eq!(indexed.index.login.as_deref(), Some("a@example.com"));
            assert_eq!(unindexed(&store).await, 0);
            let found = store.accounts_with_login("a@example.com").await.unwrap();
            assert_eq!(found.len(), 1);
            assert_eq!(
                indexed
                    .index
                    .stale("7", Some("a@example.com"))
                    .map(|e| e.id),
                None
            );

            // A targeted re-read rewrites the row: unindexed again, and the
            // entry worked out before it is refused.
            let fresh = RawAccount {
                id: "7".into(),
                email: Some("b@example.com".into()),
                ..Default::default()
            };
            let pacing = Pacing {
                interval_secs: 60,
                period_secs: 86_400,
            };
            let f = Fresh {
                raw: &fresh,
                live: true,
                detailed: true,
            };
            store.save_fresh(AP, f, read(2), &pacing).await.unwrap();
            let rewritten = row(&store).await;
            assert!(!rewritten.index.current);
            index(&store, &indexed, "a@example.com").await;
            assert!(!row(&store).await.index.current, "an old entry landed");
            index(&store, &rewritten, "b@example.com").await;
            assert!(row(&store).await.index.current);

            // A changed listing row unindexes it too, and so do new details.
            list(&store, "c@example.com", 3).await;
            assert!(!row(&store).await.index.current);
            index(&store, &row(&store).await, "c@example.com").await;
            let details = [(
                "7".to_string(),
                "hash-c@example.com".to_string(),
                fresh.clone(),
            )];
            (store.save_details(AP, &details, read(4), &pacing, false))
                .await
                .unwrap();
            assert!(
                !row(&store).await.index.current,
                "new details kept the index"
            );
            index(&store, &row(&store).await, "c@example.com").await;
            // A listing that finds it gone moves no version; one that finds
            // it back does (its seen_seq), and unindexes it: an entry
            // refused for that move must not leave an old login current.
            let index_now = store.account_index(AP).await.unwrap();
            (store.save_listing(AP, &[], &index_now, 3, read(5)))
                .await
                .unwrap();
            assert!(row(&store).await.index.current);
            list(&store, "c@example.com", 6).await;
            assert!(!row(&store).await.index.current, "a reset kept the index");

            assert_eq!(store.login_tag(AP).await.unwrap(), None);
            store.set_login_tag(AP, "t1").await.unwrap();
            assert_eq!(store.login_tag(AP).await.unwrap().as_deref(), Some("t1"));
            store.clear_login_tag(AP).await.unwrap();
            assert_eq!(store.login_tag(AP).await.unwrap(), None);
            store.close().await;
        }
    }
}
