//! Rolling re-verification (SPEC §10.1): which accounts and users were
//! verified longest ago, and when.

use chrono::{DateTime, Utc};

use super::{parse_ts, Result, Store};
use std::collections::HashSet;

use crate::core::model::{AccountKey, SourceKind};

impl Store {
    /// Listed accounts whose details were read longest ago (never first).
    pub async fn oldest_verified(&self, source: SourceKind, n: u32) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM source_accounts WHERE source = ?1 AND missing_cycles = 0
             ORDER BY details_at IS NOT NULL, details_at LIMIT ?2",
        )
        .bind(source.as_str())
        .bind(n)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Users whose full state was asserted longest ago (never first);
    /// quarantined ones wait for their release.
    pub async fn oldest_asserted(&self, n: u32) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT login FROM applied_users
             WHERE login NOT IN (SELECT key FROM quarantine WHERE part = 'user')
             ORDER BY asserted_at IS NOT NULL, asserted_at LIMIT ?1",
        )
        .bind(n)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn count_accounts(&self, source: SourceKind) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM source_accounts WHERE source = ? AND missing_cycles = 0",
        )
        .bind(source.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }

    /// Accounts with a paid payment whose push is not timed yet (loaded once
    /// a cycle: only their users' pushes look for payments to time).
    pub async fn accounts_with_unpushed_payments(&self) -> Result<HashSet<AccountKey>> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT DISTINCT source, account_id FROM payments
             WHERE paid = 1 AND paid_seen_at IS NOT NULL AND pushed_at IS NULL
               AND account_id IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(source, id)| super::account_key(&source, id))
            .collect()
    }

    pub async fn count_applied(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM applied_users")
            .fetch_one(&self.pool)
            .await?;
        Ok(n.max(0) as u64)
    }

    /// The oldest verification: of a listed account's details (or its first
    /// sighting) and of a user's full state (or its first write).
    pub async fn oldest_verification(&self) -> Result<Option<DateTime<Utc>>> {
        let accounts: Option<String> = sqlx::query_scalar(
            "SELECT MIN(COALESCE(details_at, first_seen)) FROM source_accounts
             WHERE missing_cycles = 0",
        )
        .fetch_one(&self.pool)
        .await?;
        let users: Option<String> =
            sqlx::query_scalar("SELECT MIN(COALESCE(asserted_at, applied_at)) FROM applied_users")
                .fetch_one(&self.pool)
                .await?;
        let times = [accounts, users];
        Ok(times.iter().flatten().filter_map(|t| parse_ts(t)).min())
    }
}
