//! The status document of SPEC §6a, shared by `billsync status --json` and
//! the admin server's `GET /status`.

use serde_json::{json, Value};

use crate::config::Settings;
use crate::core::model::SourceKind;
use crate::store::{PlanState, Store, StoreError};

/// The top-level keys of the status document (SPEC §6a, plus `notices`):
/// scripts rely on them.
pub const KEYS: [&str; 14] = [
    "cycles",
    "pending",
    "quarantined",
    "held",
    "conflicts",
    "invalid",
    "resync_requested",
    "approval_pending",
    "notices",
    "in_doubt",
    "frozen",
    "dropped_requests",
    "oldest_verification",
    "services",
];

/// Sources whose VMS users are frozen: disabled or removed while they still
/// own users (SPEC §9.4).
async fn frozen(store: &Store, settings: &Settings) -> Result<Vec<Value>, StoreError> {
    let per_source = store.applied_per_source().await?;
    Ok(SourceKind::ALL
        .into_iter()
        .filter(|k| settings.source(*k).is_none())
        .filter_map(|k| {
            let users = *per_source.get(k.as_str())?;
            Some(json!({"source": k.as_str(), "users": users,
                "note": format!("disabled or removed: its users are frozen; `billsync sync --retire-source {k}` deprovisions them")}))
        })
        .collect())
}

pub async fn status_json(store: &Store, settings: &Settings) -> Result<Value, StoreError> {
    let cycles = store.last_cycles(10).await?;
    let retries = store.load_retries().await?;
    let plan = store.plan_rows().await?;
    let mut pending: Vec<Value> = vec![];
    let mut seen = std::collections::HashSet::new();
    for row in &plan {
        let login = &row.login;
        if row.state != PlanState::Planned || !seen.insert(login.clone()) {
            continue;
        }
        let r = retries.get(login);
        pending.push(json!({
            "login": login,
            "attempts": r.map(|r| r.attempts).unwrap_or(0),
            "next_attempt_at": r.map(|r| r.next_attempt_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            "last_error": r.map(|r| r.last_error.clone()),
        }));
    }
    for (login, r) in &retries {
        if seen.insert(login.clone()) {
            pending.push(json!({
                "login": login,
                "attempts": r.attempts,
                "next_attempt_at": r.next_attempt_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "last_error": r.last_error,
            }));
        }
    }
    let quarantined: Vec<Value> = store
        .load_quarantine()
        .await?
        .into_iter()
        .map(|q| {
            json!({
                "login": q.key,
                "part": q.part.as_str(),
                "error": q.error,
                "since": q.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            })
        })
        .collect();
    let held: Vec<Value> = plan
        .iter()
        .filter(|row| row.state == PlanState::Held)
        .map(|row| json!({"login": row.login, "action": row.action}))
        .collect();
    let conflicts: Vec<Value> = store
        .conflicts()
        .await?
        .into_iter()
        .map(|c| json!({"login": c.login, "sources": c.sources}))
        .collect();
    let invalid: Vec<Value> = store
        .invalid_records()
        .await?
        .into_iter()
        .map(|r| json!({"source": r.source, "id": r.id, "reason": r.reason, "detail": r.detail}))
        .collect();
    let requests = store.pending_requests().await?;
    Ok(json!({
        "cycles": cycles,
        "pending": pending,
        "quarantined": quarantined,
        "held": held,
        "conflicts": conflicts,
        "invalid": invalid,
        "resync_requested": requests.resync_all || !requests.resync_logins.is_empty(),
        "approval_pending": requests.approve,
        "notices": store.notices().await?,
        "frozen": frozen(store, settings).await?,
        "dropped_requests": store.dropped_requests().await?,
        "services": store.service_counts().await?,
        "oldest_verification": store.oldest_verification().await?.map(|t| json!({
            "at": t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "age_secs": (chrono::Utc::now() - t).num_seconds().max(0),
        })),
        "leader": leader(store, settings).await?,
        "in_doubt": store.load_in_doubt().await?.into_iter().map(|d| json!({
            "login": d.login,
            "op": d.op,
            "since": d.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        })).collect::<Vec<_>>(),
    }))
}

/// Who leads a shared store (SPEC §13): the node (its name and the id of
/// its process), the epoch, since when and until when, by database time.
/// Null on SQLite, and while nobody ever led.
async fn leader(store: &Store, settings: &Settings) -> Result<Value, StoreError> {
    if !settings.daemon.state_url.is_set() {
        return Ok(Value::Null);
    }
    let at = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    };
    Ok(match store.lease().await? {
        None => Value::Null,
        Some(l) => json!({
            "node": l.holder,
            "epoch": l.epoch,
            "since": at(l.since_ms),
            "expires": at(l.expires_ms),
            "expired": l.expires_ms <= l.now_ms,
        }),
    })
}
