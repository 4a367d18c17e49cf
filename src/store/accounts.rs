//! Source accounts, payments and invalid records.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::db::{on, on_pool, on_write, Row};
use super::logins::{bind_ids, distinct_runs, placeholders};
use super::{decode_json, parse_ts, ts, Result, Store};
use crate::core::model::{AccountKey, ListedAccount, Payment, RawAccount, SourceKind};
use crate::core::pacing::{Pacing, Round};

#[derive(Debug, Clone)]
pub struct AccountIndexEntry {
    pub row_hash: String,
    pub has_details: bool,
    pub missing_cycles: u32,
}

fn decode_raw(text: &str) -> Result<RawAccount> {
    decode_json(text)
}

/// A record a source sent that could not be used, as `status` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRow {
    pub source: String,
    pub id: String,
    pub reason: String,
    pub detail: String,
}

/// When a read happened. `seq` orders reads: its cycle's id, assigned by
/// the store, so a clock stepped backwards cannot make an old read look
/// new. `at` is the wall time, stored for people and for grace periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadStamp {
    pub seq: i64,
    pub at: DateTime<Utc>,
}

/// A targeted re-read of one account.
#[derive(Debug, Clone, Copy)]
pub struct Fresh<'a> {
    pub raw: &'a RawAccount,
    /// It states a live status (active or suspended): the account exists,
    /// whatever earlier listings said, so its "gone" mark ends.
    pub live: bool,
    /// The source needs detail reads for this account: the re-read counts as
    /// its verification. (An account whose listing carries everything is
    /// verified by every listing and stays out of the detail rotation.)
    pub detailed: bool,
}

/// `verify_from` of an account's first details read, and of any later one.
fn verify_froms(pacing: &Pacing, source: SourceKind, id: &str, now: DateTime<Utc>) -> (i64, i64) {
    let key = format!("{}:{id}", source.as_str());
    let now = now.timestamp();
    (
        pacing.verify_from(&key, Round::First, now),
        pacing.verify_from(&key, Round::Again, now),
    )
}

/// Listing rows written per transaction.
const LISTING_BATCH: usize = 2_000;

/// Rows per statement of a batch's writes (8 parameters each).
const ROWS_PER_STATEMENT: usize = 500;

/// What one batch of listed rows writes: the new or changed rows, and the
/// unchanged ones that were going missing (their count reset).
fn listed_writes<'a>(
    batch: &'a [ListedAccount],
    index: &HashMap<String, AccountIndexEntry>,
) -> (Vec<&'a ListedAccount>, Vec<&'a str>) {
    let (mut changed, mut back) = (vec![], vec![]);
    for a in batch {
        let known = index.get(&a.raw.id);
        // An empty hash marks a row whose details are still to come: always
        // written, so its list fields are current.
        if a.row_hash.is_empty() || known.is_none_or(|k| k.row_hash != a.row_hash) {
            changed.push(a);
        } else if known.is_some_and(|k| k.missing_cycles > 0) {
            back.push(a.raw.id.as_str());
        }
    }
    (changed, back)
}

/// New or changed listing rows, in one statement; a row whose details were
/// read after this listing began keeps them (`details_seq`).
async fn upsert_listed(
    tx: &mut super::db::Tx,
    source: SourceKind,
    rows: &[&ListedAccount],
    read: ReadStamp,
) -> Result<()> {
    let now_s = ts(read.at);
    on!(tx.conn(), |c| {
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO source_accounts
                (source, id, row_json, row_hash, list_raw, first_seen, last_seen,
                 missing_cycles, seen_seq) ",
        );
        q.push_values(rows, |mut row, a| {
            row.push_bind(source.as_str())
                .push_bind(a.raw.id.as_str())
                .push_bind(a.row_json.as_deref().unwrap_or("{}"))
                .push_bind(a.row_hash.as_str())
                .push_bind(serde_json::to_string(&a.raw).unwrap_or_default())
                .push_bind(now_s.as_str())
                .push_bind(now_s.as_str())
                .push("0")
                .push_bind(read.seq);
        });
        q.push(
            " ON CONFLICT (source, id) DO UPDATE SET
                row_json = excluded.row_json, row_hash = excluded.row_hash,
                list_raw = excluded.list_raw, last_seen = excluded.last_seen,
                missing_cycles = 0, seen_seq = excluded.seen_seq, login_indexed = NULL
             WHERE source_accounts.details_seq IS NULL
                OR source_accounts.details_seq <= excluded.seen_seq",
        );
        q.build().execute(c).await.map(drop)
    })?;
    Ok(())
}

/// An unchanged row listed again after it went missing.
async fn reset_missing(
    tx: &mut super::db::Tx,
    source: SourceKind,
    id: &str,
    read: ReadStamp,
) -> Result<()> {
    on!(tx.conn(), |c| sqlx::query(
        "UPDATE source_accounts SET missing_cycles = 0, last_seen = $3, seen_seq = $4,
            login_indexed = NULL
         WHERE source = $1 AND id = $2 AND seen_seq <= $4",
    )
    .bind(source.as_str())
    .bind(id)
    .bind(ts(read.at))
    .bind(read.seq)
    .execute(c)
    .await
    .map(drop))?;
    Ok(())
}

impl Store {
    /// What the store knows of a source's accounts, by id.
    pub async fn account_index(
        &self,
        source: SourceKind,
    ) -> Result<HashMap<String, AccountIndexEntry>> {
        let rows = on_pool!(self.db, |c| sqlx::query(
            "SELECT id, row_hash, details_json IS NOT NULL AS has_details, missing_cycles
             FROM source_accounts WHERE source = $1",
        )
        .bind(source.as_str())
        .fetch_all(c)
        .await
        .map(Row::all))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.get::<String, _>(0),
                    AccountIndexEntry {
                        row_hash: r.get(1),
                        has_details: r.get(2),
                        missing_cycles: r.get::<i64, _>(3).max(0) as u32,
                    },
                )
            })
            .collect())
    }

    /// Records a complete listing: new and changed rows are written, rows
    /// absent from it count one more missing cycle (up to `grace`: beyond,
    /// the count changes nothing and the row is left alone), returning rows
    /// reset. The rows go in batches, each its own transaction, so that a
    /// listing of a million never holds the write lock for long (the other
    /// source and the fast lane write meanwhile); writing a row again is
    /// harmless, so a crash between batches loses nothing. The missing
    /// counts, which must move once per listing, go in one transaction
    /// after them.
    pub async fn save_listing(
        &self,
        source: SourceKind,
        listing: &[ListedAccount],
        index: &HashMap<String, AccountIndexEntry>,
        grace: u32,
        read: ReadStamp,
    ) -> Result<()> {
        for batch in listing.chunks(LISTING_BATCH) {
            let (changed, back) = listed_writes(batch, index);
            if changed.is_empty() && back.is_empty() {
                continue;
            }
            let mut tx = self.write_tx().await?;
            for rows in distinct_runs(&changed, ROWS_PER_STATEMENT, |a| a.raw.id.as_str()) {
                upsert_listed(&mut tx, source, rows, read).await?;
            }
            for id in back {
                reset_missing(&mut tx, source, id, read).await?;
            }
            tx.commit().await?;
        }
        let listed: std::collections::HashSet<&str> =
            listing.iter().map(|a| a.raw.id.as_str()).collect();
        self.count_missing(source, index, &listed, grace, read)
            .await
    }

    /// Rows of the index absent from a complete listing: one more missing
    /// cycle each, and the listing's time recorded, in one transaction.
    async fn count_missing(
        &self,
        source: SourceKind,
        index: &HashMap<String, AccountIndexEntry>,
        listed: &std::collections::HashSet<&str>,
        grace: u32,
        read: ReadStamp,
    ) -> Result<()> {
        let now_s = ts(read.at);
        let mut tx = self.write_tx().await?;
        let prev_listed: Option<String> = on!(tx.conn(), |c| sqlx::query_scalar(
            "SELECT last_listed_at FROM source_state WHERE source = $1"
        )
        .bind(source.as_str())
        .fetch_optional(c)
        .await)?
        .flatten();
        for (id, entry) in index {
            if listed.contains(id.as_str()) || entry.missing_cycles > grace {
                continue;
            }
            // Going missing now: its last sighting was the previous listing.
            let last_seen = if entry.missing_cycles == 0 {
                prev_listed.clone()
            } else {
                None
            };
            // A live re-read of a later cycle (it moved `seen_seq`) is newer
            // evidence that the account exists.
            on!(tx.conn(), |c| sqlx::query(
                "UPDATE source_accounts SET missing_cycles = missing_cycles + 1,
                    last_seen = COALESCE($3, last_seen)
                 WHERE source = $1 AND id = $2 AND seen_seq < $4",
            )
            .bind(source.as_str())
            .bind(id)
            .bind(last_seen)
            .bind(read.seq)
            .execute(c)
            .await
            .map(drop))?;
        }
        on!(tx.conn(), |c| sqlx::query(
            "INSERT INTO source_state (source, last_listed_at) VALUES ($1, $2)
             ON CONFLICT (source) DO UPDATE SET last_listed_at = excluded.last_listed_at",
        )
        .bind(source.as_str())
        .bind(&now_s)
        .execute(c)
        .await
        .map(drop))?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn record_source_error(&self, source: SourceKind, error: &str) -> Result<()> {
        on_write!(self, |c| sqlx::query(
            "INSERT INTO source_state (source, last_error, last_error_at) VALUES ($1, $2, $3)
             ON CONFLICT (source) DO UPDATE SET last_error = excluded.last_error,
                last_error_at = excluded.last_error_at",
        )
        .bind(source.as_str())
        .bind(error)
        .bind(ts(Utc::now()))
        .execute(c)
        .await
        .map(drop))?;
        Ok(())
    }

    /// A targeted re-read (SPEC §10.2-10.3): what it carries wins over the
    /// stored list row and details. An account the store does not know yet
    /// is stored with an empty row hash, so the next listing rewrites it.
    pub async fn save_fresh(
        &self,
        source: SourceKind,
        fresh: Fresh<'_>,
        read: ReadStamp,
        pacing: &Pacing,
    ) -> Result<()> {
        let Fresh {
            raw: fresh,
            live,
            detailed,
        } = fresh;
        // Read and written in one transaction: a listing saved in between
        // must not be merged away.
        let mut tx = self.write_tx().await?;
        let old = read_account(&mut tx.conn(), source, &fresh.id).await?;
        let (list, details) = match &old {
            Some(o) => (
                fresh.merged_with(&o.list),
                fresh.merged_with(o.details.as_ref().unwrap_or(&o.list)),
            ),
            None => (fresh.clone(), fresh.clone()),
        };
        let json = |r: &RawAccount| serde_json::to_string(r).unwrap_or_default();
        let (first, again) = match detailed {
            true => {
                let (first, again) = verify_froms(pacing, source, &fresh.id, read.at);
                (Some(first), Some(again))
            }
            false => (None, None),
        };
        on!(tx.conn(), |c| sqlx::query(
            "INSERT INTO source_accounts
                (source, id, row_json, row_hash, list_raw, details_json, details_at,
                 first_seen, last_seen, missing_cycles, verify_from, seen_seq, details_seq)
             VALUES ($1, $2, '{}', '', $3, $4, $5, $5, $5, 0, $6, $9, $9)
             ON CONFLICT (source, id) DO UPDATE SET
                list_raw = excluded.list_raw, details_json = excluded.details_json,
                details_at = excluded.details_at, details_seq = excluded.details_seq,
                login_indexed = NULL,
                verify_from = CASE WHEN $6 IS NULL THEN source_accounts.verify_from
                    WHEN source_accounts.details_at IS NULL THEN $6 ELSE $7 END,
                missing_cycles = CASE WHEN $8 THEN 0 ELSE source_accounts.missing_cycles END,
                last_seen = CASE WHEN $8 THEN excluded.last_seen ELSE source_accounts.last_seen END,
                seen_seq = CASE WHEN $8 THEN excluded.seen_seq ELSE source_accounts.seen_seq END
             WHERE source_accounts.seen_seq <= $9
               AND COALESCE(source_accounts.details_seq, 0) <= $9",
        )
        .bind(source.as_str())
        .bind(&fresh.id)
        .bind(json(&list))
        .bind(json(&details))
        .bind(ts(read.at))
        .bind(first)
        .bind(again)
        .bind(live)
        .bind(read.seq)
        .execute(c)
        .await
        .map(drop))?;
        tx.commit().await?;
        Ok(())
    }

    /// Details read for listed accounts: each read verifies its account,
    /// the first one staggered (`core::pacing`), and so is every one of a
    /// full read (`restagger`), which verifies all at once.
    pub async fn save_details(
        &self,
        source: SourceKind,
        details: &[(String, String, RawAccount)],
        read: ReadStamp,
        pacing: &Pacing,
        restagger: bool,
    ) -> Result<()> {
        let now_s = ts(read.at);
        let mut tx = self.write_tx().await?;
        for (id, row_hash, raw) in details {
            let (first, again) = verify_froms(pacing, source, id, read.at);
            let again = if restagger { first } else { again };
            on!(tx.conn(), |c| sqlx::query(
                "UPDATE source_accounts SET details_json = $3, details_at = $4, row_hash = $5,
                    verify_from = CASE WHEN details_at IS NULL THEN $6 ELSE $7 END,
                    details_seq = $8, login_indexed = NULL
                 WHERE source = $1 AND id = $2 AND (details_seq IS NULL OR details_seq <= $8)",
            )
            .bind(source.as_str())
            .bind(id)
            .bind(serde_json::to_string(raw).unwrap_or_default())
            .bind(&now_s)
            .bind(row_hash)
            .bind(first)
            .bind(again)
            .bind(read.seq)
            .execute(c)
            .await
            .map(drop))?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Hashes of the stored payments among `ids`, to spot new and changed
    /// ones: a window's worth, not every payment kept.
    pub async fn payment_hashes(
        &self,
        source: SourceKind,
        ids: &[&str],
    ) -> Result<HashMap<String, String>> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let sql = format!(
                "SELECT id, row_hash FROM payments WHERE source = $1 AND id IN ({})",
                placeholders(2, chunk.len())
            );
            let rows = on_pool!(self.db, |c| {
                let q = sqlx::query(&sql).bind(source.as_str());
                bind_ids(chunk, q).fetch_all(c).await.map(Row::all)
            })?;
            out.extend(rows.into_iter().map(|r| (r.get(0), r.get(1))));
        }
        Ok(out)
    }

    pub async fn save_payments(
        &self,
        payments: &[(Payment, String)],
        read: ReadStamp,
    ) -> Result<()> {
        let now_s = ts(read.at);
        let mut tx = self.write_tx().await?;
        for (p, hash) in payments {
            on!(tx.conn(), |c| {
                sqlx::query(
                "INSERT INTO payments
                    (source, id, account_id, account_name, amount, paid, is_final, paid_at, row_hash,
                     seen_at, paid_seen_at, seen_seq)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, CASE WHEN $6 THEN $10 END, $11)
                 ON CONFLICT (source, id) DO UPDATE SET
                    account_id = excluded.account_id, account_name = excluded.account_name,
                    amount = excluded.amount, paid = excluded.paid, is_final = excluded.is_final,
                    paid_at = excluded.paid_at, row_hash = excluded.row_hash, seen_at = excluded.seen_at,
                    paid_seen_at = COALESCE(payments.paid_seen_at, excluded.paid_seen_at),
                    seen_seq = excluded.seen_seq
                 WHERE payments.seen_seq <= excluded.seen_seq",
            )
            .bind(p.source.as_str())
            .bind(&p.id)
            .bind(&p.account_id)
            .bind(&p.account_name)
            .bind(p.amount.to_string())
            .bind(p.paid)
            .bind(p.is_final)
            .bind(p.paid_at.map(ts))
            .bind(hash)
            .bind(&now_s)
            .bind(read.seq)
            .execute(c)
            .await.map(drop)
            })?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Latest paid date per account of a source.
    pub async fn last_paid(&self, source: SourceKind) -> Result<HashMap<String, DateTime<Utc>>> {
        let rows = on_pool!(self.db, |c| sqlx::query(
            "SELECT account_id, MAX(paid_at) FROM payments
             WHERE source = $1 AND paid = TRUE AND account_id IS NOT NULL AND paid_at IS NOT NULL
             GROUP BY account_id",
        )
        .bind(source.as_str())
        .fetch_all(c)
        .await
        .map(Row::all))?;
        let mut out = HashMap::new();
        for r in rows {
            if let Some(t) = r.get::<Option<String>, _>(1).as_deref().and_then(parse_ts) {
                out.insert(r.get::<String, _>(0), t);
            }
        }
        Ok(out)
    }

    /// Latest paid date of the accounts among `ids` (a targeted cycle's).
    pub async fn last_paid_of(
        &self,
        source: SourceKind,
        ids: &[&str],
    ) -> Result<HashMap<String, DateTime<Utc>>> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(500) {
            let sql = format!(
                "SELECT account_id, MAX(paid_at) FROM payments
                 WHERE source = $1 AND account_id IN ({}) AND paid = TRUE AND paid_at IS NOT NULL
                 GROUP BY account_id",
                placeholders(2, chunk.len())
            );
            let rows = on_pool!(self.db, |c| {
                let q = sqlx::query(&sql).bind(source.as_str());
                bind_ids(chunk, q).fetch_all(c).await.map(Row::all)
            })?;
            for r in rows {
                if let Some(t) = r.get::<Option<String>, _>(1).as_deref().and_then(parse_ts) {
                    out.insert(r.get::<String, _>(0), t);
                }
            }
        }
        Ok(out)
    }

    /// Forgets accounts gone for good (past `grace` missing cycles, last
    /// seen before `older_than`) whose users are deprovisioned or were never
    /// made: the state stays bounded by what is alive.
    pub async fn purge_gone_accounts(&self, grace: u32, older_than: DateTime<Utc>) -> Result<u64> {
        let sql = format!("DELETE {}", self.gone_accounts_sql());
        let mut purged = 0;
        for source in SourceKind::ALL {
            purged += on_write!(self, |c| sqlx::query(&sql)
                .bind(i64::from(grace))
                .bind(ts(older_than))
                .bind(source.as_str())
                .execute(c)
                .await
                .map(|r| r.rows_affected()))?;
        }
        Ok(purged)
    }

    /// `FROM … WHERE …` of the accounts to purge, of source `$3`: by source,
    /// so the statement walks `accounts_by_due` from the grace on (else a
    /// scan of every row, 2 GB at a million accounts, under the write lock
    /// a payment tick waits for), each asking `applied_by_owner` for a live
    /// user.
    fn gone_accounts_sql(&self) -> String {
        let gone = self.db.backend().json_true("au.state_json", "gone");
        format!(
            "FROM source_accounts
             WHERE source = $3 AND missing_cycles > $1 AND last_seen < $2
               AND NOT EXISTS (SELECT 1 FROM applied_users au
                   WHERE au.source = source_accounts.source
                     AND au.account_id = source_accounts.id
                     AND NOT {gone})"
        )
    }

    /// Marks the account's paid payments as pushed (its user's push was
    /// confirmed) and returns when each was first seen paid.
    pub async fn payments_pushed(
        &self,
        account: &AccountKey,
        now: DateTime<Utc>,
    ) -> Result<Vec<DateTime<Utc>>> {
        let seen: Vec<String> = on_write!(self, |c| sqlx::query_scalar(
            "UPDATE payments SET pushed_at = $3
             WHERE source = $1 AND account_id = $2 AND paid = TRUE
               AND paid_seen_at IS NOT NULL AND pushed_at IS NULL
             RETURNING paid_seen_at",
        )
        .bind(account.source.as_str())
        .bind(&account.id)
        .bind(ts(now))
        .fetch_all(c)
        .await)?;
        Ok(seen.iter().filter_map(|s| parse_ts(s)).collect())
    }

    /// Account name -> id, `None` where names repeat: resolves payments that
    /// name their account only (the fast path, which lists no accounts).
    pub async fn account_names(
        &self,
        source: SourceKind,
    ) -> Result<HashMap<String, Option<String>>> {
        let name = self.db.backend().json_text("list_raw", "name");
        let sql = format!("SELECT id, {name} FROM source_accounts WHERE source = $1");
        let rows = on_pool!(self.db, |c| {
            sqlx::query(&sql)
                .bind(source.as_str())
                .fetch_all(c)
                .await
                .map(Row::all)
        })?;
        let named = rows
            .into_iter()
            .filter_map(|r| Some((r.get::<Option<String>, _>(1)?, r.get::<String, _>(0))));
        Ok(crate::core::model::unique_names(named))
    }

    /// Payments no rule can use any more: found by a read (a scan, which
    /// in WAL mode blocks no writer), then deleted by key in batches, each
    /// checked again, so the write lock is held for the deletes alone.
    pub async fn prune_payments(&self, older_than: DateTime<Utc>) -> Result<u64> {
        let before = ts(older_than);
        let rows = on_pool!(self.db, |c| {
            sqlx::query(
            "SELECT source, id FROM payments WHERE is_final = TRUE AND COALESCE(paid_at, seen_at) < $1",
        )
        .bind(&before)
        .fetch_all(c)
        .await
        .map(Row::all)
        })?;
        let keys: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut done = 0;
        for batch in keys.chunks(LISTING_BATCH) {
            let mut tx = self.write_tx().await?;
            for (source, id) in batch {
                done += on!(tx.conn(), |c| sqlx::query(
                    "DELETE FROM payments WHERE source = $1 AND id = $2
                       AND is_final = TRUE AND COALESCE(paid_at, seen_at) < $3",
                )
                .bind(source)
                .bind(id)
                .bind(&before)
                .execute(c)
                .await
                .map(|r| r.rows_affected()))?;
            }
            tx.commit().await?;
        }
        Ok(done)
    }

    /// Replaces a source's invalid records with this cycle's.
    pub async fn replace_invalid(
        &self,
        source: SourceKind,
        records: &[(String, &'static str, &'static str, String)],
        now: DateTime<Utc>,
    ) -> Result<()> {
        let now_s = ts(now);
        let mut tx = self.write_tx().await?;
        on!(tx.conn(), |c| sqlx::query(
            "DELETE FROM invalid_records WHERE source = $1"
        )
        .bind(source.as_str())
        .execute(c)
        .await
        .map(drop))?;
        for (id, kind, reason, detail) in records {
            on!(tx.conn(), |c| sqlx::query(
                "INSERT INTO invalid_records (source, id, kind, reason, detail, seen_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(source.as_str())
            .bind(id)
            .bind(kind)
            .bind(reason)
            .bind(detail)
            .bind(&now_s)
            .execute(c)
            .await
            .map(drop))?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Replaces the accounts reported for a camera group template without
    /// a value (reason `camera_group`), across sources: a listing cycle's
    /// desired state finds them all at once.
    pub async fn replace_camera_errors(
        &self,
        records: &[(SourceKind, String, String)],
        now: DateTime<Utc>,
    ) -> Result<()> {
        let now_s = ts(now);
        let mut tx = self.write_tx().await?;
        on!(tx.conn(), |c| sqlx::query(
            "DELETE FROM invalid_records WHERE reason = 'camera_group'"
        )
        .execute(c)
        .await
        .map(drop))?;
        for (source, id, detail) in records {
            on!(tx.conn(), |c| sqlx::query(
                "INSERT INTO invalid_records (source, id, kind, reason, detail, seen_at)
                 VALUES ($1, $2, 'account', 'camera_group', $3, $4)",
            )
            .bind(source.as_str())
            .bind(id)
            .bind(detail)
            .bind(&now_s)
            .execute(c)
            .await
            .map(drop))?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every invalid record (at most 1000).
    pub async fn invalid_records(&self) -> Result<Vec<InvalidRow>> {
        let rows = on_pool!(self.db, |c| {
            sqlx::query(
            "SELECT source, id, reason, detail FROM invalid_records ORDER BY source, id LIMIT 1000",
        )
        .fetch_all(c)
        .await.map(Row::all)
        })?;
        Ok(rows
            .into_iter()
            .map(|r| InvalidRow {
                source: r.get(0),
                id: r.get(1),
                reason: r.get(2),
                detail: r.get(3),
            })
            .collect())
    }
}

/// One stored source account, for `explain`.
#[derive(Debug, Clone)]
pub struct StoredAccount {
    pub row_json: String,
    pub list: RawAccount,
    pub details: Option<RawAccount>,
    pub missing_cycles: u32,
    pub first_seen: String,
    pub last_seen: String,
}

impl Store {
    pub async fn source_account(
        &self,
        source: SourceKind,
        id: &str,
    ) -> Result<Option<StoredAccount>> {
        read_account(&mut self.db.acquire().await?.conn(), source, id).await
    }
}

async fn read_account(
    conn: &mut super::db::Conn<'_>,
    source: SourceKind,
    id: &str,
) -> Result<Option<StoredAccount>> {
    let sql = "SELECT row_json, list_raw, details_json, missing_cycles, first_seen, last_seen
               FROM source_accounts WHERE source = $1 AND id = $2";
    let row = on!(conn, |c| sqlx::query(sql)
        .bind(source.as_str())
        .bind(id)
        .fetch_optional(&mut **c)
        .await
        .map(Row::opt))?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(StoredAccount {
        row_json: r.get(0),
        list: decode_raw(&r.get::<String, _>(1))?,
        details: match r.get::<Option<String>, _>(2) {
            Some(d) => Some(decode_raw(&d)?),
            None => None,
        },
        missing_cycles: r.get::<i64, _>(3).max(0) as u32,
        first_seen: r.get(4),
        last_seen: r.get(5),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::stores;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    const PACING: Pacing = Pacing {
        interval_secs: 60,
        period_secs: 86_400,
    };

    fn fresh(raw: &RawAccount) -> Fresh<'_> {
        Fresh {
            raw,
            live: true,
            detailed: true,
        }
    }

    fn raw(balance: &str) -> RawAccount {
        RawAccount {
            id: "7".into(),
            balance: Some(balance.into()),
            ..Default::default()
        }
    }

    /// Read `seq` at a wall time that runs backwards as `seq` grows: the
    /// clock stepped back an hour before each read.
    fn read(seq: i64) -> ReadStamp {
        ReadStamp {
            seq,
            at: at(-3600 * seq),
        }
    }

    async fn list(store: &Store, balance: &str, read: ReadStamp) {
        let kind = SourceKind::Activeplatform;
        let index = store.account_index(kind).await.unwrap();
        let rows: Vec<_> = (balance != "unlisted")
            .then(|| ListedAccount {
                raw: raw(balance),
                row_hash: format!("hash-{balance}"),
                row_json: None,
            })
            .into_iter()
            .collect();
        store
            .save_listing(kind, &rows, &index, 3, read)
            .await
            .unwrap();
        let details: Vec<_> = rows
            .iter()
            .map(|r| ("7".to_string(), r.row_hash.clone(), raw(balance)))
            .collect();
        store
            .save_details(kind, &details, read, &PACING, false)
            .await
            .unwrap();
    }

    async fn re_read(store: &Store, balance: &str, read: ReadStamp) {
        let kind = SourceKind::Activeplatform;
        let raw = raw(balance);
        (store.save_fresh(kind, fresh(&raw), read, &PACING))
            .await
            .unwrap();
    }

    async fn balance(store: &Store) -> (Option<String>, Option<String>) {
        let a = store.source_account(SourceKind::Activeplatform, "7").await;
        let a = a.unwrap().unwrap();
        (a.list.balance, a.details.and_then(|d| d.balance))
    }

    /// The two lanes save at once: a listing cycle that read before a
    /// targeted re-read must not overwrite it, nor the reverse. Which read
    /// is older is the sequence's call: the wall clock runs backwards here.
    #[tokio::test]
    async fn an_older_read_never_overwrites_a_fresher_one() {
        for (store, _dir) in stores().await {
            let paid = || (Some("50".to_string()), Some("50".to_string()));
            list(&store, "-5", read(1)).await;
            re_read(&store, "50", read(3)).await;
            assert_eq!(balance(&store).await, paid());
            // A listing cycle that started before the re-read saves what it read.
            list(&store, "-6", read(2)).await;
            assert_eq!(balance(&store).await, paid(), "a stale listing won");
            // A listing that started after the re-read is fresher.
            list(&store, "60", read(5)).await;
            let sixty = (Some("60".to_string()), Some("60".to_string()));
            assert_eq!(balance(&store).await, sixty);
            // A targeted read from before that listing is older news.
            re_read(&store, "1", read(4)).await;
            assert_eq!(balance(&store).await, sixty, "a stale re-read won");
        }
    }

    /// A listing that began before a live re-read does not count the
    /// account missing, though the re-read's wall time is earlier.
    #[tokio::test]
    async fn a_live_re_read_outranks_an_older_listing_that_missed_it() {
        for (store, _dir) in stores().await {
            let missing = || async {
                let index = store.account_index(SourceKind::Activeplatform).await;
                index.unwrap()["7"].missing_cycles
            };
            list(&store, "5", read(1)).await;
            re_read(&store, "5", read(3)).await;
            list(&store, "unlisted", read(2)).await;
            assert_eq!(missing().await, 0, "the older listing counted it gone");
            list(&store, "unlisted", read(4)).await;
            assert_eq!(missing().await, 1, "a newer listing is the authority");
        }
    }

    fn listed(id: &str, balance: &str) -> ListedAccount {
        let raw = RawAccount {
            id: id.into(),
            balance: Some(balance.into()),
            ..Default::default()
        };
        ListedAccount {
            raw,
            row_hash: format!("hash-{id}-{balance}"),
            row_json: None,
        }
    }

    /// Rows go several to a statement: a listing longer than a statement
    /// takes lands whole, and a row listed twice keeps the later (one
    /// statement cannot update a row twice on PostgreSQL).
    #[tokio::test]
    async fn a_long_listing_with_a_row_listed_twice_lands_whole() {
        let kind = SourceKind::Activeplatform;
        for (store, _dir) in stores().await {
            let n = ROWS_PER_STATEMENT + 3;
            let mut rows: Vec<_> = (0..n).map(|i| listed(&i.to_string(), "1")).collect();
            rows.insert(6, listed("5", "2"));
            let index = store.account_index(kind).await.unwrap();
            (store.save_listing(kind, &rows, &index, 3, read(1)))
                .await
                .unwrap();
            assert_eq!(store.account_index(kind).await.unwrap().len(), n);
            let five = store.source_account(kind, "5").await.unwrap().unwrap();
            assert_eq!(five.list.balance.as_deref(), Some("2"));
        }
    }

    /// The purge runs in every listing cycle under the write lock: it must
    /// find its rows by index, on both sides of the ownership check.
    #[tokio::test]
    async fn the_purge_of_gone_accounts_walks_indexes_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let sql = format!("EXPLAIN QUERY PLAN SELECT 1 {}", store.gone_accounts_sql());
        let plan: Vec<(i64, i64, i64, String)> =
            on!(store.db.acquire().await.unwrap().conn(), |c| {
                sqlx::query_as(&sql)
                    .bind(3_i64)
                    .bind("2026-01-01")
                    .bind("billmanager")
                    .fetch_all(c)
                    .await
            })
            .unwrap();
        let steps: Vec<&str> = plan.iter().map(|p| p.3.as_str()).collect();
        assert!(steps.iter().all(|s| !s.starts_with("SCAN")), "{steps:?}");
        assert!(
            steps.iter().any(|s| s.contains("accounts_by_due")),
            "{steps:?}"
        );
        assert!(
            steps.iter().any(|s| s.contains("applied_by_owner")),
            "{steps:?}"
        );
    }
}
