//! What the error policy decided: per-login backoff across cycles, and
//! quarantine (of a user, or only of its tree element).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::db::{on_pool, on_write, Row};
use super::{parse_ts, ts, Result, Store};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetryInfo {
    pub attempts: u32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: String,
}

/// What a quarantine entry holds back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuarantinePart {
    /// The user: keyed by login.
    User,
    /// Only the tree element: keyed by external id.
    Tree,
}

impl QuarantinePart {
    pub fn as_str(self) -> &'static str {
        match self {
            QuarantinePart::User => "user",
            QuarantinePart::Tree => "tree",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuarantineEntry {
    pub key: String,
    pub part: QuarantinePart,
    pub error: String,
    pub since: DateTime<Utc>,
    /// The desired hash when quarantined: a change releases it.
    pub hash: String,
}

impl Store {
    pub async fn load_retries(&self) -> Result<HashMap<String, RetryInfo>> {
        let rows = on_pool!(self.db, |c| sqlx::query(
            "SELECT login, attempts, next_attempt_at, last_error FROM retry_state"
        )
        .fetch_all(c)
        .await
        .map(Row::all))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let info = RetryInfo {
                    attempts: r.get::<i64, _>(1).max(0) as u32,
                    next_attempt_at: parse_ts(&r.get::<String, _>(2)).unwrap_or_else(Utc::now),
                    last_error: r.get(3),
                };
                (r.get::<String, _>(0), info)
            })
            .collect())
    }

    pub async fn set_retry(&self, login: &str, info: &RetryInfo) -> Result<()> {
        on_write!(self, |c| {
            sqlx::query(
            "INSERT INTO retry_state (login, attempts, next_attempt_at, last_error) VALUES ($1, $2, $3, $4)
             ON CONFLICT (login) DO UPDATE SET attempts = excluded.attempts,
                next_attempt_at = excluded.next_attempt_at, last_error = excluded.last_error",
        )
        .bind(login)
        .bind(i64::from(info.attempts))
        .bind(ts(info.next_attempt_at))
        .bind(&info.last_error)
        .execute(c)
        .await.map(drop)
        })?;
        Ok(())
    }

    pub async fn clear_retry(&self, login: &str) -> Result<()> {
        on_write!(self, |c| sqlx::query(
            "DELETE FROM retry_state WHERE login = $1"
        )
        .bind(login)
        .execute(c)
        .await
        .map(drop))?;
        Ok(())
    }

    pub async fn load_quarantine(&self) -> Result<Vec<QuarantineEntry>> {
        let rows = on_pool!(self.db, |c| sqlx::query(
            "SELECT key, part, error, since, hash FROM quarantine ORDER BY since, key"
        )
        .fetch_all(c)
        .await
        .map(Row::all))?;
        Ok(rows
            .into_iter()
            .map(|r| QuarantineEntry {
                key: r.get(0),
                part: match r.get::<&str, _>(1) {
                    "tree" => QuarantinePart::Tree,
                    _ => QuarantinePart::User,
                },
                error: r.get(2),
                since: parse_ts(&r.get::<String, _>(3)).unwrap_or_else(Utc::now),
                hash: r.get(4),
            })
            .collect())
    }

    pub async fn quarantine(
        &self,
        key: &str,
        part: QuarantinePart,
        error: &str,
        hash: &str,
    ) -> Result<()> {
        on_write!(self, |c| sqlx::query(
            "INSERT INTO quarantine (key, part, error, since, hash) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (key, part) DO UPDATE SET error = excluded.error, hash = excluded.hash",
        )
        .bind(key)
        .bind(part.as_str())
        .bind(error)
        .bind(ts(Utc::now()))
        .bind(hash)
        .execute(c)
        .await
        .map(drop))?;
        Ok(())
    }

    /// Releases these keys (every part), or everything when `keys` is None.
    pub async fn release_quarantine(&self, keys: Option<&[String]>) -> Result<u64> {
        let Some(keys) = keys else {
            let done = on_write!(self, |c| sqlx::query("DELETE FROM quarantine")
                .execute(c)
                .await
                .map(|r| r.rows_affected()))?;
            return Ok(done);
        };
        let mut n = 0;
        for k in keys {
            n += on_write!(self, |c| sqlx::query(
                "DELETE FROM quarantine WHERE key = $1"
            )
            .bind(k)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
        }
        Ok(n)
    }

    /// Clears quarantine and backoff for the logins a resync covers (all
    /// when None).
    pub async fn clear_for_resync(&self, logins: Option<&HashSet<String>>) -> Result<()> {
        let Some(set) = logins else {
            on_write!(self, |c| sqlx::query("DELETE FROM quarantine")
                .execute(c)
                .await
                .map(drop))?;
            on_write!(self, |c| sqlx::query("DELETE FROM retry_state")
                .execute(c)
                .await
                .map(drop))?;
            return Ok(());
        };
        for l in set {
            on_write!(self, |c| sqlx::query(
                "DELETE FROM quarantine WHERE key = $1"
            )
            .bind(l)
            .execute(c)
            .await
            .map(drop))?;
            self.clear_retry(l).await?;
        }
        Ok(())
    }
}
