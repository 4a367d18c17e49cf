//! The write side's tables: desired and applied state, the plan, retries,
//! quarantine, cycles, audit, operator requests and write-backs.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::{parse_ts, ts, Result, Store, StoreError};
use crate::core::desired::Desired;
use crate::core::model::{AccountKey, SourceKind, UserState};
use crate::core::plan::{Applied, AppliedUser, Plan};

fn key(source: &str, id: String) -> Result<AccountKey> {
    Ok(AccountKey {
        source: SourceKind::parse(source)
            .ok_or_else(|| StoreError::Decode(format!("unknown source {source}")))?,
        id,
    })
}

fn state(text: &str) -> Result<UserState> {
    serde_json::from_str(text).map_err(|e| StoreError::Decode(e.to_string()))
}

pub fn state_hash(s: &UserState) -> String {
    crate::core::model::content_hash(s)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetryInfo {
    pub attempts: u32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuarantineEntry {
    pub key: String,
    pub part: String,
    pub error: String,
    pub since: DateTime<Utc>,
    pub hash: String,
}

#[derive(Debug, Clone, Default)]
pub struct Requests {
    pub ids: Vec<i64>,
    pub resync_all: bool,
    pub resync_logins: HashSet<String>,
    pub approve: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditRow {
    pub login: String,
    pub action: String,
    pub result: String,
    pub detail: String,
}

impl Store {
    pub async fn load_applied(&self) -> Result<Applied> {
        self.load_applied_subset(None).await
    }

    /// Streams `(login, hash)` of every applied user: enough to tell which
    /// logins need planning without holding 100k rows.
    pub async fn scan_applied_hashes(&self, mut f: impl FnMut(&str, &str)) -> Result<()> {
        use futures::TryStreamExt;
        let mut rows = sqlx::query("SELECT login, hash FROM applied_users").fetch(&self.pool);
        while let Some(r) = rows.try_next().await? {
            f(r.get::<&str, _>(0), r.get::<&str, _>(1));
        }
        Ok(())
    }

    /// The applied state of `logins` (all when None), with the whole tree
    /// and write-back record. Rows are streamed and only the wanted decoded.
    pub async fn load_applied_subset(&self, logins: Option<&HashSet<String>>) -> Result<Applied> {
        use futures::TryStreamExt;
        let mut out = Applied::default();
        // A few logins: by primary key. Many: one pass over the table.
        if let Some(set) = logins.filter(|s| s.len() <= 2000) {
            for login in set {
                let row = sqlx::query(
                    "SELECT source, account_id, state_json FROM applied_users WHERE login = ?",
                )
                .bind(login)
                .fetch_optional(&self.pool)
                .await?;
                if let Some(r) = row {
                    out.users.insert(
                        login.clone(),
                        AppliedUser {
                            owner: key(&r.get::<String, _>(0), r.get(1))?,
                            state: state(&r.get::<String, _>(2))?,
                        },
                    );
                }
            }
            return self.load_tree_and_written(out).await;
        }
        let mut rows =
            sqlx::query("SELECT login, source, account_id, state_json FROM applied_users")
                .fetch(&self.pool);
        while let Some(r) = rows.try_next().await? {
            let login: String = r.get(0);
            if logins.is_some_and(|l| !l.contains(&login)) {
                continue;
            }
            out.users.insert(
                login,
                AppliedUser {
                    owner: key(&r.get::<String, _>(1), r.get(2))?,
                    state: state(&r.get::<String, _>(3))?,
                },
            );
        }
        drop(rows);
        self.load_tree_and_written(out).await
    }

    async fn load_tree_and_written(&self, mut out: Applied) -> Result<Applied> {
        for r in sqlx::query("SELECT external_id, name FROM applied_tree")
            .fetch_all(&self.pool)
            .await?
        {
            out.tree.insert(r.get(0), r.get(1));
        }
        for r in sqlx::query("SELECT source, account_id, value FROM writebacks")
            .fetch_all(&self.pool)
            .await?
        {
            out.written
                .insert(key(&r.get::<String, _>(0), r.get(1))?, r.get(2));
        }
        Ok(out)
    }

    /// One 2xx, recorded at once in its own transaction.
    pub async fn record_applied(&self, login: &str, user: &AppliedUser) -> Result<()> {
        sqlx::query(
            "INSERT INTO applied_users (login, source, account_id, state_json, hash, applied_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (login) DO UPDATE SET source = excluded.source,
                account_id = excluded.account_id, state_json = excluded.state_json,
                hash = excluded.hash, applied_at = excluded.applied_at",
        )
        .bind(login)
        .bind(user.owner.source.as_str())
        .bind(&user.owner.id)
        .bind(serde_json::to_string(&user.state).unwrap_or_default())
        .bind(state_hash(&user.state))
        .bind(ts(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn remove_applied(&self, login: &str) -> Result<()> {
        sqlx::query("DELETE FROM applied_users WHERE login = ?")
            .bind(login)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn record_tree(&self, external_id: &str, name: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO applied_tree (external_id, name, applied_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (external_id) DO UPDATE SET name = excluded.name, applied_at = excluded.applied_at",
        )
        .bind(external_id)
        .bind(name)
        .bind(ts(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn record_writeback(&self, account: &AccountKey, value: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO writebacks (source, account_id, value, written_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (source, account_id) DO UPDATE SET value = excluded.value,
                written_at = excluded.written_at",
        )
        .bind(account.source.as_str())
        .bind(&account.id)
        .bind(value)
        .bind(ts(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Desired state, plan and conflicts in one transaction, before any push.
    /// Only desired rows that changed are written.
    pub async fn persist_plan(
        &self,
        cycle_id: i64,
        desired: &Desired,
        plan: &Plan,
        status_blocked: &str,
    ) -> Result<()> {
        // Which stored rows are current, and which are gone: streamed, so a
        // no-op cycle holds no copy of 100k rows.
        let mut current: std::collections::HashSet<&str> = Default::default();
        let mut gone: Vec<String> = vec![];
        {
            use futures::TryStreamExt;
            let mut rows = sqlx::query("SELECT login, hash FROM desired_users").fetch(&self.pool);
            while let Some(r) = rows.try_next().await? {
                let login: &str = r.get(0);
                match desired.users.get_key_value(login) {
                    Some((key, d)) if d.hash == r.get::<&str, _>(1) => {
                        current.insert(key.as_str());
                    }
                    Some(_) => {}
                    None => gone.push(login.to_string()),
                }
            }
        }
        let mut tx = self.pool.begin().await?;
        for (login, d) in &desired.users {
            let hash = &d.hash;
            if current.contains(login.as_str()) {
                continue;
            }
            sqlx::query(
                "INSERT INTO desired_users (login, source, account_id, state_json, hash, rules)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (login) DO UPDATE SET source = excluded.source,
                    account_id = excluded.account_id, state_json = excluded.state_json,
                    hash = excluded.hash, rules = excluded.rules",
            )
            .bind(login)
            .bind(d.owner.source.as_str())
            .bind(&d.owner.id)
            .bind(serde_json::to_string(&d.state).unwrap_or_default())
            .bind(hash)
            .bind(serde_json::to_string(&d.rules).unwrap_or_default())
            .execute(&mut *tx)
            .await?;
        }
        for login in &gone {
            sqlx::query("DELETE FROM desired_users WHERE login = ?")
                .bind(login)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM plan_ops")
            .execute(&mut *tx)
            .await?;
        let rows = plan
            .ops
            .iter()
            .map(|o| (o, "planned"))
            .chain(plan.held.iter().map(|o| (o, "held")));
        for (op, st) in rows {
            sqlx::query(
                "INSERT INTO plan_ops (cycle_id, login, action, payload, deprovision, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .bind(cycle_id)
            .bind(&op.login)
            .bind(op.label(status_blocked))
            .bind(serde_json::to_string(op).unwrap_or_default())
            .bind(op.deprovision)
            .bind(st)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM conflicts")
            .execute(&mut *tx)
            .await?;
        let mut by_login: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for c in &desired.conflicts {
            let e = by_login
                .entry(c.login.as_str())
                .or_insert_with(|| vec![c.winner.to_string()]);
            e.push(c.loser.to_string());
        }
        for (login, sources) in by_login {
            sqlx::query("INSERT INTO conflicts (login, sources) VALUES (?1, ?2)")
                .bind(login)
                .bind(serde_json::to_string(&sources).unwrap_or_default())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A login's planned op is done: it leaves the pending list.
    pub async fn plan_done(&self, login: &str) -> Result<()> {
        sqlx::query("DELETE FROM plan_ops WHERE login = ? AND state = 'planned'")
            .bind(login)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// `(login, action, state)` of the persisted plan.
    pub async fn plan_rows(&self) -> Result<Vec<(String, String, String)>> {
        let rows = sqlx::query("SELECT login, action, state FROM plan_ops ORDER BY seq")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    pub async fn desired_user(
        &self,
        login: &str,
    ) -> Result<Option<(AccountKey, UserState, Vec<String>)>> {
        let row = sqlx::query(
            "SELECT source, account_id, state_json, rules FROM desired_users WHERE login = ?",
        )
        .bind(login)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((
                key(&r.get::<String, _>(0), r.get(1))?,
                state(&r.get::<String, _>(2))?,
                serde_json::from_str(&r.get::<String, _>(3)).unwrap_or_default(),
            ))),
        }
    }

    pub async fn load_retries(&self) -> Result<HashMap<String, RetryInfo>> {
        let rows =
            sqlx::query("SELECT login, attempts, next_attempt_at, last_error FROM retry_state")
                .fetch_all(&self.pool)
                .await?;
        let mut out = HashMap::new();
        for r in rows {
            out.insert(
                r.get::<String, _>(0),
                RetryInfo {
                    attempts: r.get::<i64, _>(1).max(0) as u32,
                    next_attempt_at: parse_ts(&r.get::<String, _>(2)).unwrap_or_else(Utc::now),
                    last_error: r.get(3),
                },
            );
        }
        Ok(out)
    }

    pub async fn set_retry(&self, login: &str, info: &RetryInfo) -> Result<()> {
        sqlx::query(
            "INSERT INTO retry_state (login, attempts, next_attempt_at, last_error) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (login) DO UPDATE SET attempts = excluded.attempts,
                next_attempt_at = excluded.next_attempt_at, last_error = excluded.last_error",
        )
        .bind(login)
        .bind(i64::from(info.attempts))
        .bind(ts(info.next_attempt_at))
        .bind(&info.last_error)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn clear_retry(&self, login: &str) -> Result<()> {
        sqlx::query("DELETE FROM retry_state WHERE login = ?")
            .bind(login)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn load_quarantine(&self) -> Result<Vec<QuarantineEntry>> {
        let rows =
            sqlx::query("SELECT key, part, error, since, hash FROM quarantine ORDER BY since, key")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|r| QuarantineEntry {
                key: r.get(0),
                part: r.get(1),
                error: r.get(2),
                since: parse_ts(&r.get::<String, _>(3)).unwrap_or_else(Utc::now),
                hash: r.get(4),
            })
            .collect())
    }

    pub async fn quarantine(&self, key: &str, part: &str, error: &str, hash: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO quarantine (key, part, error, since, hash) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (key, part) DO UPDATE SET error = excluded.error, hash = excluded.hash",
        )
        .bind(key)
        .bind(part)
        .bind(error)
        .bind(ts(Utc::now()))
        .bind(hash)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Releases these keys (every part), or everything when `keys` is None.
    pub async fn release_quarantine(&self, keys: Option<&[String]>) -> Result<u64> {
        let n = match keys {
            None => sqlx::query("DELETE FROM quarantine")
                .execute(&self.pool)
                .await?
                .rows_affected(),
            Some(keys) => {
                let mut n = 0;
                for k in keys {
                    n += sqlx::query("DELETE FROM quarantine WHERE key = ?")
                        .bind(k)
                        .execute(&self.pool)
                        .await?
                        .rows_affected();
                }
                n
            }
        };
        Ok(n)
    }

    /// Clears quarantine and backoff for the logins a resync covers.
    pub async fn clear_for_resync(&self, logins: Option<&HashSet<String>>) -> Result<()> {
        match logins {
            None => {
                sqlx::query("DELETE FROM quarantine")
                    .execute(&self.pool)
                    .await?;
                sqlx::query("DELETE FROM retry_state")
                    .execute(&self.pool)
                    .await?;
            }
            Some(set) => {
                for l in set {
                    sqlx::query("DELETE FROM quarantine WHERE key = ?")
                        .bind(l)
                        .execute(&self.pool)
                        .await?;
                    sqlx::query("DELETE FROM retry_state WHERE login = ?")
                        .bind(l)
                        .execute(&self.pool)
                        .await?;
                }
            }
        }
        Ok(())
    }

    pub async fn start_cycle(&self, kind: &str, started: DateTime<Utc>) -> Result<i64> {
        let id = sqlx::query("INSERT INTO cycles (kind, started_at) VALUES (?1, ?2)")
            .bind(kind)
            .bind(ts(started))
            .execute(&self.pool)
            .await?
            .last_insert_rowid();
        Ok(id)
    }

    pub async fn finish_cycle(
        &self,
        id: i64,
        result: &str,
        summary: &serde_json::Value,
    ) -> Result<()> {
        sqlx::query("UPDATE cycles SET finished_at = ?2, result = ?3, summary = ?4 WHERE id = ?1")
            .bind(id)
            .bind(ts(Utc::now()))
            .bind(result)
            .bind(summary.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Summaries of the last `n` finished cycles, newest first.
    pub async fn last_cycles(&self, n: u32) -> Result<Vec<serde_json::Value>> {
        let rows = sqlx::query(
            "SELECT summary FROM cycles WHERE summary IS NOT NULL ORDER BY id DESC LIMIT ?",
        )
        .bind(i64::from(n))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| serde_json::from_str(&r.get::<String, _>(0)).ok())
            .collect())
    }

    /// `(result, finished_at)` of the newest finished cycle.
    pub async fn last_cycle_result(&self) -> Result<Option<(String, DateTime<Utc>)>> {
        let row = sqlx::query(
            "SELECT result, finished_at FROM cycles WHERE finished_at IS NOT NULL ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|r| {
            let at = parse_ts(&r.get::<String, _>(1))?;
            Some((r.get(0), at))
        }))
    }

    /// A cycle that never finished (the process died): closed as failed.
    pub async fn close_abandoned_cycles(&self) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE cycles SET finished_at = started_at, result = 'failed' WHERE finished_at IS NULL",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    pub async fn audit(&self, cycle_id: i64, rows: &[AuditRow]) -> Result<()> {
        let now = ts(Utc::now());
        let mut tx = self.pool.begin().await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO audit (cycle_id, at, login, action, result, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .bind(cycle_id)
            .bind(&now)
            .bind(&r.login)
            .bind(&r.action)
            .bind(&r.result)
            .bind(&r.detail)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn audit_of(
        &self,
        login: &str,
        limit: u32,
    ) -> Result<Vec<(String, String, String, String)>> {
        let rows = sqlx::query(
            "SELECT at, action, result, detail FROM audit WHERE login = ? ORDER BY id DESC LIMIT ?",
        )
        .bind(login)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    pub async fn prune_history(&self, older_than: DateTime<Utc>) -> Result<()> {
        let cutoff = ts(older_than);
        sqlx::query("DELETE FROM audit WHERE at < ?")
            .bind(&cutoff)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM cycles WHERE finished_at IS NOT NULL AND finished_at < ?")
            .bind(&cutoff)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "DELETE FROM control_requests WHERE consumed_at IS NOT NULL AND consumed_at < ?",
        )
        .bind(&cutoff)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Writes an operator request (resync or approve).
    pub async fn request(&self, kind: &str, logins: Option<&[String]>) -> Result<i64> {
        let logins = logins.map(|l| serde_json::to_string(l).unwrap_or_default());
        Ok(sqlx::query(
            "INSERT INTO control_requests (kind, logins, requested_at) VALUES (?1, ?2, ?3)",
        )
        .bind(kind)
        .bind(logins)
        .bind(ts(Utc::now()))
        .execute(&self.pool)
        .await?
        .last_insert_rowid())
    }

    pub async fn pending_requests(&self) -> Result<Requests> {
        let rows = sqlx::query(
            "SELECT id, kind, logins FROM control_requests WHERE consumed_at IS NULL ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Requests::default();
        for r in rows {
            out.ids.push(r.get(0));
            match r.get::<String, _>(1).as_str() {
                "approve" => out.approve = true,
                "resync" => match r.get::<Option<String>, _>(2) {
                    None => out.resync_all = true,
                    Some(text) => {
                        let logins: Vec<String> = serde_json::from_str(&text).unwrap_or_default();
                        out.resync_logins.extend(logins);
                    }
                },
                _ => {}
            }
        }
        Ok(out)
    }

    pub async fn consume_requests(&self, ids: &[i64], cycle_id: i64) -> Result<()> {
        let now = ts(Utc::now());
        for id in ids {
            sqlx::query(
                "UPDATE control_requests SET consumed_at = ?2, cycle_id = ?3 WHERE id = ?1",
            )
            .bind(id)
            .bind(&now)
            .bind(cycle_id)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    pub async fn conflicts(&self) -> Result<Vec<(String, Vec<String>)>> {
        let rows = sqlx::query("SELECT login, sources FROM conflicts ORDER BY login")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.get(0),
                    serde_json::from_str(&r.get::<String, _>(1)).unwrap_or_default(),
                )
            })
            .collect())
    }

    /// Copies the database to `dest` (for a dry run that must change nothing).
    pub async fn snapshot_to(&self, dest: &std::path::Path) -> Result<()> {
        sqlx::query("VACUUM INTO ?")
            .bind(dest.display().to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
