//! Rolling re-verification (SPEC §10.1): which accounts and users were
//! verified longest ago, and when.

use chrono::{DateTime, Utc};

use super::db::{on, on_pool};
use super::{parse_ts, Result, Store};
use std::collections::HashSet;

use crate::core::model::{AccountKey, SourceKind};

impl Store {
    /// Up to `n` listed accounts due for a details re-read (`verify_from`
    /// at or before `due_before`), the longest due first; ties by id, so a
    /// dry run on a copy of the store picks the same ones.
    pub async fn due_accounts(
        &self,
        source: SourceKind,
        due_before: i64,
        n: u32,
    ) -> Result<Vec<String>> {
        Ok(on_pool!(self.db, |c| {
            sqlx::query_scalar(
                "SELECT id FROM source_accounts
             WHERE source = $1 AND missing_cycles = 0 AND verify_from <= $2
             ORDER BY verify_from, id LIMIT $3",
            )
            .bind(source.as_str())
            .bind(due_before)
            .bind(i64::from(n))
            .fetch_all(c)
            .await
        })?)
    }

    /// Up to `n` users of `sources` due for a full-state push, the longest
    /// due first (never verified before all); quarantined ones wait for
    /// their release. Users of other (frozen) sources are never pushed, so
    /// they are not taken. Two index range reads: an `OR` or an expression
    /// in the order would scan every user each cycle.
    pub async fn due_logins(
        &self,
        sources: &[SourceKind],
        due_before: i64,
        n: u32,
    ) -> Result<Vec<String>> {
        let names: Vec<String> = sources
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        let filter = format!(
            "source IN ({}) AND login NOT IN (SELECT key FROM quarantine WHERE part = 'user')",
            names.join(",")
        );
        let mut out: Vec<String> = on_pool!(self.db, |c| sqlx::query_scalar(&format!(
            "SELECT login FROM applied_users WHERE verify_from IS NULL AND {filter}
             ORDER BY login LIMIT $1"
        ))
        .bind(i64::from(n))
        .fetch_all(c)
        .await)?;
        let left = n.saturating_sub(out.len() as u32);
        if left > 0 {
            out.extend(on_pool!(self.db, |c| {
                sqlx::query_scalar::<_, String>(&format!(
                    "SELECT login FROM applied_users WHERE verify_from <= $1 AND {filter}
                     ORDER BY verify_from, login LIMIT $2"
                ))
                .bind(due_before)
                .bind(i64::from(left))
                .fetch_all(c)
                .await
            })?);
        }
        Ok(out)
    }

    /// Logins a cycle took for re-verification but could not push (an
    /// invalid owner, an incomplete source, backoff): they wait a period
    /// rather than hold the front of the queue every cycle. Their
    /// assertion time stays, so `oldest_verification` still shows them.
    pub async fn defer_verification(&self, logins: &[String], verify_from: i64) -> Result<()> {
        let mut tx = self.write_tx().await?;
        for login in logins {
            on!(tx.conn(), |c| sqlx::query(
                "UPDATE applied_users SET verify_from = $2 WHERE login = $1"
            )
            .bind(login)
            .bind(verify_from)
            .execute(c)
            .await
            .map(drop))?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn count_accounts(&self, source: SourceKind) -> Result<u64> {
        let n: i64 = on_pool!(self.db, |c| sqlx::query_scalar(
            "SELECT COUNT(*) FROM source_accounts WHERE source = $1 AND missing_cycles = 0",
        )
        .bind(source.as_str())
        .fetch_one(c)
        .await)?;
        Ok(n.max(0) as u64)
    }

    /// Accounts with a paid payment whose push is not timed yet (loaded once
    /// a cycle: only their users' pushes look for payments to time).
    pub async fn accounts_with_unpushed_payments(&self) -> Result<HashSet<AccountKey>> {
        let rows: Vec<(String, String)> = on_pool!(self.db, |c| sqlx::query_as(
            "SELECT DISTINCT source, account_id FROM payments
             WHERE paid = TRUE AND paid_seen_at IS NOT NULL AND pushed_at IS NULL
               AND account_id IS NOT NULL",
        )
        .fetch_all(c)
        .await)?;
        rows.into_iter()
            .map(|(source, id)| super::account_key(&source, id))
            .collect()
    }

    pub async fn count_applied(&self) -> Result<u64> {
        let n: i64 = on_pool!(self.db, |c| sqlx::query_scalar(
            "SELECT COUNT(*) FROM applied_users"
        )
        .fetch_one(c)
        .await)?;
        Ok(n.max(0) as u64)
    }

    /// The oldest verification: of a listed account's details (accounts
    /// never detailed are verified by every listing) and of a user's full
    /// state (or its first write).
    pub async fn oldest_verification(&self) -> Result<Option<DateTime<Utc>>> {
        let accounts: Option<String> = on_pool!(self.db, |c| sqlx::query_scalar(
            "SELECT MIN(details_at) FROM source_accounts
             WHERE missing_cycles = 0 AND verify_from IS NOT NULL",
        )
        .fetch_one(c)
        .await)?;
        let users: Option<String> = on_pool!(self.db, |c| sqlx::query_scalar(
            "SELECT MIN(COALESCE(asserted_at, applied_at)) FROM applied_users"
        )
        .fetch_one(c)
        .await)?;
        let times = [accounts, users];
        Ok(times.iter().flatten().filter_map(|t| parse_ts(t)).min())
    }
}
