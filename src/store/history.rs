//! What happened and what was asked: cycles, the audit log, operator
//! requests and notices, each pruned after `audit_retention_days`.

use std::collections::{BTreeSet, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::db::{on, on_pool, on_write, Row};
use super::{parse_ts, ts, Result, Store};
use crate::core::cycle::{CycleKind, CycleResult};
use crate::core::model::AccountKey;

/// What an operator asked for (`resync`, `approve`, `POST /resync|/approve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Resync,
    Approve,
    /// `POST /trigger`: re-read accounts, push logins (SPEC §10.3).
    Trigger,
}

impl RequestKind {
    fn as_str(self) -> &'static str {
        match self {
            RequestKind::Resync => "resync",
            RequestKind::Approve => "approve",
            RequestKind::Trigger => "trigger",
        }
    }
}

/// What a trigger request names (stored as JSON in `logins`).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct TriggerBody {
    #[serde(default)]
    pub accounts: Vec<String>,
    #[serde(default)]
    pub logins: Vec<String>,
    /// Services (`SOURCE:ID`): their owning accounts, from the store, are
    /// re-read and pushed (SPEC §12.4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
}

/// The unconsumed operator requests, merged.
#[derive(Debug, Clone, Default)]
pub struct Requests {
    pub ids: Vec<i64>,
    pub resync_all: bool,
    pub resync_logins: HashSet<String>,
    /// Some approval is recorded.
    pub approve: bool,
    /// The held logins the approvals named; an approval written by an older
    /// version names none and approves everything.
    pub approved_logins: HashSet<String>,
    pub approve_all: bool,
    /// Trigger requests, apart: a targeted cycle takes only these.
    pub trigger_ids: Vec<i64>,
    pub triggered_accounts: BTreeSet<AccountKey>,
    pub triggered_logins: HashSet<String>,
}

/// A request given up after cycles that kept failing (SPEC §10.4).
#[derive(Debug, Clone, Serialize)]
pub struct DroppedRequest {
    pub id: i64,
    pub kind: String,
    pub logins: Option<Vec<String>>,
    pub requested_at: String,
    pub dropped_at: String,
    pub attempts: i64,
}

/// One audit line to write: what was done to a login and how it ended.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRow {
    pub login: String,
    pub action: String,
    pub result: String,
    pub detail: String,
}

/// One audit line as read back, with its time.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub at: String,
    pub action: String,
    pub result: String,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastCycle {
    pub result: CycleResult,
    pub finished_at: DateTime<Utc>,
}

/// Something an operator should read once: a setting the VMS cannot apply.
#[derive(Debug, Clone, Serialize)]
pub struct Notice {
    pub at: DateTime<Utc>,
    pub message: String,
}

impl Store {
    pub async fn start_cycle(&self, kind: CycleKind, started: DateTime<Utc>) -> Result<i64> {
        let sql = "INSERT INTO cycles (kind, started_at) VALUES ($1, $2) RETURNING id";
        Ok(on_write!(self, |c| {
            sqlx::query_scalar(sql)
                .bind(kind.as_str())
                .bind(ts(started))
                .fetch_one(c)
                .await
        })?)
    }

    pub async fn finish_cycle(
        &self,
        id: i64,
        result: CycleResult,
        summary: &serde_json::Value,
    ) -> Result<()> {
        on_write!(self, |c| sqlx::query(
            "UPDATE cycles SET finished_at = $2, result = $3, summary = $4 WHERE id = $1"
        )
        .bind(id)
        .bind(ts(Utc::now()))
        .bind(result.as_str())
        .bind(summary.to_string())
        .execute(c)
        .await
        .map(drop))?;
        Ok(())
    }

    /// Summaries of the last `n` finished cycles, newest first.
    pub async fn last_cycles(&self, n: u32) -> Result<Vec<serde_json::Value>> {
        let rows = on_pool!(self.db, |c| sqlx::query(
            "SELECT summary FROM cycles WHERE summary IS NOT NULL ORDER BY id DESC LIMIT $1",
        )
        .bind(i64::from(n))
        .fetch_all(c)
        .await
        .map(Row::all))?;
        Ok(rows
            .into_iter()
            .filter_map(|r| serde_json::from_str(&r.get::<String, _>(0)).ok())
            .collect())
    }

    /// The newest finished cycle.
    pub async fn last_cycle(&self) -> Result<Option<LastCycle>> {
        let row = on_pool!(self.db, |c| sqlx::query(
            "SELECT result, finished_at FROM cycles
             WHERE finished_at IS NOT NULL AND kind IN ('incremental', 'full')
             ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(c)
        .await
        .map(Row::opt))?;
        Ok(row.and_then(|r| {
            Some(LastCycle {
                result: CycleResult::parse(r.get::<&str, _>(0))?,
                finished_at: parse_ts(&r.get::<String, _>(1))?,
            })
        }))
    }

    /// A cycle that never finished (the process died): closed as failed.
    pub async fn close_abandoned_cycles(&self) -> Result<u64> {
        Ok(on_write!(self, |c| {
            sqlx::query(
            "UPDATE cycles SET finished_at = started_at, result = 'failed' WHERE finished_at IS NULL",
        )
        .execute(c)
        .await.map(|r| r.rows_affected())
        })?)
    }

    pub async fn audit(&self, cycle_id: i64, rows: &[AuditRow]) -> Result<()> {
        let now = ts(Utc::now());
        let mut tx = self.write_tx().await?;
        for r in rows {
            on!(tx.conn(), |c| {
                sqlx::query(
                "INSERT INTO audit (cycle_id, at, login, action, result, detail) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(cycle_id)
            .bind(&now)
            .bind(&r.login)
            .bind(&r.action)
            .bind(&r.result)
            .bind(&r.detail)
            .execute(c)
            .await.map(drop)
            })?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The newest `limit` audit lines of one login.
    pub async fn audit_of(&self, login: &str, limit: u32) -> Result<Vec<AuditEntry>> {
        let rows = on_pool!(self.db, |c| {
            sqlx::query(
            "SELECT at, action, result, detail FROM audit WHERE login = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(login)
        .bind(i64::from(limit))
        .fetch_all(c)
        .await.map(Row::all)
        })?;
        Ok(rows
            .into_iter()
            .map(|r| AuditEntry {
                at: r.get(0),
                action: r.get(1),
                result: r.get(2),
                detail: r.get(3),
            })
            .collect())
    }

    pub async fn prune_history(&self, older_than: DateTime<Utc>) -> Result<()> {
        let cutoff = ts(older_than);
        for sql in [
            "DELETE FROM audit WHERE at < $1",
            "DELETE FROM cycles WHERE finished_at IS NOT NULL AND finished_at < $1",
            "DELETE FROM control_requests WHERE consumed_at IS NOT NULL AND consumed_at < $1",
            "DELETE FROM notices WHERE at < $1",
        ] {
            on_write!(self, |c| sqlx::query(sql)
                .bind(&cutoff)
                .execute(c)
                .await
                .map(drop))?;
        }
        Ok(())
    }

    /// Writes a trigger request (`POST /trigger`).
    pub async fn request_trigger(&self, body: &TriggerBody) -> Result<i64> {
        let text = serde_json::to_string(body).unwrap_or_default();
        let sql = "INSERT INTO control_requests (kind, logins, requested_at)
                   VALUES ('trigger', $1, $2) RETURNING id";
        Ok(on_pool!(self.db, |c| {
            sqlx::query_scalar(sql)
                .bind(text)
                .bind(ts(Utc::now()))
                .fetch_one(c)
                .await
        })?)
    }

    /// Writes an operator request; `logins` narrows a resync.
    pub async fn request(&self, kind: RequestKind, logins: Option<&[String]>) -> Result<i64> {
        let logins = logins.map(|l| serde_json::to_string(l).unwrap_or_default());
        let sql = "INSERT INTO control_requests (kind, logins, requested_at)
                   VALUES ($1, $2, $3) RETURNING id";
        Ok(on_pool!(self.db, |c| {
            sqlx::query_scalar(sql)
                .bind(kind.as_str())
                .bind(logins)
                .bind(ts(Utc::now()))
                .fetch_one(c)
                .await
        })?)
    }

    /// Approves the deprovisions held right now, and only those (SPEC
    /// §9.4): returns the request id and how many logins it covers.
    pub async fn approve_held(&self) -> Result<(i64, usize)> {
        let mut held: Vec<String> = (self.plan_rows().await?.into_iter())
            .filter(|r| r.state == super::PlanState::Held)
            .map(|r| r.login)
            .collect();
        held.dedup();
        let id = self.request(RequestKind::Approve, Some(&held)).await?;
        Ok((id, held.len()))
    }

    pub async fn pending_requests(&self) -> Result<Requests> {
        let rows = on_pool!(self.db, |c| {
            sqlx::query(
            "SELECT id, kind, logins FROM control_requests WHERE consumed_at IS NULL ORDER BY id",
        )
        .fetch_all(c)
        .await.map(Row::all)
        })?;
        let mut out = Requests::default();
        for r in rows {
            let logins: Option<String> = r.get(2);
            if r.get::<&str, _>(1) == "trigger" {
                out.trigger_ids.push(r.get(0));
                let body: TriggerBody = logins
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or_default();
                let keys = body.accounts.iter().filter_map(|a| AccountKey::parse(a));
                out.triggered_accounts.extend(keys);
                out.triggered_logins.extend(body.logins);
                for service in body.services.iter().filter_map(|s| AccountKey::parse(s)) {
                    out.triggered_accounts
                        .extend(self.service_owner(&service).await?);
                }
                continue;
            }
            out.ids.push(r.get(0));
            match (r.get::<&str, _>(1), logins) {
                ("approve", None) => (out.approve, out.approve_all) = (true, true),
                ("approve", Some(text)) => {
                    out.approve = true;
                    let logins = serde_json::from_str::<Vec<String>>(&text).unwrap_or_default();
                    out.approved_logins.extend(logins);
                }
                ("resync", None) => out.resync_all = true,
                ("resync", Some(text)) => out
                    .resync_logins
                    .extend(serde_json::from_str::<Vec<String>>(&text).unwrap_or_default()),
                _ => {}
            }
        }
        Ok(out)
    }

    /// The account that owns a stored service (`None`: not listed yet; the
    /// next listing reads it).
    async fn service_owner(&self, service: &AccountKey) -> Result<Option<AccountKey>> {
        let owner: Option<String> = on_pool!(self.db, |c| sqlx::query_scalar(
            "SELECT owner_id FROM services WHERE source = $1 AND id = $2"
        )
        .bind(service.source.as_str())
        .bind(&service.id)
        .fetch_optional(c)
        .await)?;
        if owner.is_none() {
            tracing::info!(service = %service, "triggered service not listed yet; the next listing reads it");
        }
        Ok(owner.map(|id| AccountKey {
            source: service.source,
            id,
        }))
    }

    /// Gives up the requests that `max` cycles took without completing
    /// (each a crash, a kill or a failed cycle); returns how many.
    pub async fn drop_exhausted_requests(&self, max: u32) -> Result<u64> {
        Ok(on_write!(self, |c| sqlx::query(
            "UPDATE control_requests SET consumed_at = $1, dropped = TRUE
             WHERE consumed_at IS NULL AND attempts >= $2",
        )
        .bind(ts(Utc::now()))
        .bind(i64::from(max))
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?)
    }

    /// Counts a cycle that starts with these requests, before it does any
    /// work: a cycle that dies still counts.
    pub async fn start_requests(&self, ids: &[i64], cycle_id: i64) -> Result<()> {
        for id in ids {
            on_write!(self, |c| sqlx::query(
                "UPDATE control_requests SET attempts = attempts + 1, cycle_id = $2 WHERE id = $1",
            )
            .bind(id)
            .bind(cycle_id)
            .execute(c)
            .await
            .map(drop))?;
        }
        Ok(())
    }

    /// Requests given up, newest first (pruned with the history).
    pub async fn dropped_requests(&self) -> Result<Vec<DroppedRequest>> {
        let rows = on_pool!(self.db, |c| sqlx::query(
            "SELECT id, kind, logins, requested_at, consumed_at, attempts FROM control_requests
             WHERE dropped = TRUE ORDER BY id DESC",
        )
        .fetch_all(c)
        .await
        .map(Row::all))?;
        Ok(rows
            .into_iter()
            .map(|r| DroppedRequest {
                id: r.get(0),
                kind: r.get(1),
                logins: r
                    .get::<Option<String>, _>(2)
                    .and_then(|t| serde_json::from_str(&t).ok()),
                requested_at: r.get(3),
                dropped_at: r.get::<Option<String>, _>(4).unwrap_or_default(),
                attempts: r.get(5),
            })
            .collect())
    }

    pub async fn consume_requests(&self, ids: &[i64], cycle_id: i64) -> Result<()> {
        let now = ts(Utc::now());
        for id in ids {
            on_write!(self, |c| sqlx::query(
                "UPDATE control_requests SET consumed_at = $2, cycle_id = $3 WHERE id = $1",
            )
            .bind(id)
            .bind(&now)
            .bind(cycle_id)
            .execute(c)
            .await
            .map(drop))?;
        }
        Ok(())
    }

    /// A small remembered value (`meta` table).
    /// The next read sequence: it orders the reads of both lanes (a cycle,
    /// a payment tick) whatever the clock says. Never reused.
    pub async fn next_read_seq(&self) -> Result<i64> {
        Ok(on_write!(self, |c| {
            sqlx::query_scalar(
                "INSERT INTO meta (key, value) VALUES ('read_seq', '1')
             ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(meta.value AS BIGINT) + 1 AS TEXT)
             RETURNING CAST(value AS BIGINT)",
            )
            .fetch_one(c)
            .await
        })?)
    }

    pub async fn meta(&self, key: &str) -> Result<Option<String>> {
        let row = on_pool!(self.db, |c| sqlx::query(
            "SELECT value FROM meta WHERE key = $1"
        )
        .bind(key)
        .fetch_optional(c)
        .await
        .map(Row::opt))?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        on_write!(self, |c| sqlx::query(
            "INSERT INTO meta (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(c)
        .await
        .map(drop))?;
        Ok(())
    }

    pub async fn add_notice(&self, message: &str) -> Result<()> {
        on_write!(self, |c| sqlx::query(
            "INSERT INTO notices (at, message) VALUES ($1, $2)"
        )
        .bind(ts(Utc::now()))
        .bind(message)
        .execute(c)
        .await
        .map(drop))?;
        Ok(())
    }

    /// Notices, newest first.
    pub async fn notices(&self) -> Result<Vec<Notice>> {
        let rows = on_pool!(self.db, |c| sqlx::query(
            "SELECT at, message FROM notices ORDER BY id DESC"
        )
        .fetch_all(c)
        .await
        .map(Row::all))?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                Some(Notice {
                    at: parse_ts(&r.get::<String, _>(0))?,
                    message: r.get(1),
                })
            })
            .collect())
    }
}
