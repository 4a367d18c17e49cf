//! The admin HTTP server (SPEC §5): health, metrics, status, and the two
//! authenticated POST endpoints.

// Handlers return a ready `Response` as their error: that is the point.
#![allow(clippy::result_large_err)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde_json::{json, Value};

use super::Shared;
use crate::store::{LastCycle, RequestKind};
use crate::telemetry::metrics;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/healthz", get(healthz))
        .route("/readyz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/status", get(status))
        .route("/resync", post(resync))
        .route("/approve", post(approve))
        .with_state(shared)
}

/// A loop that has not shown life for this long is not alive.
const LIVENESS_LIMIT: Duration = Duration::from_secs(600);

async fn livez(State(s): State<Arc<Shared>>) -> Response {
    let alive = s.loop_alive.load(Ordering::Relaxed) && s.heartbeat.age() < LIVENESS_LIMIT;
    if alive {
        (StatusCode::OK, Json(json!({"status": "alive"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "dead", "heartbeat_age_secs": s.heartbeat.age().as_secs()})),
        )
            .into_response()
    }
}

async fn healthz(State(s): State<Arc<Shared>>) -> Response {
    let mut ok = true;
    let store = match s.store.ping().await {
        Ok(()) => json!({"ok": true}),
        Err(e) => {
            ok = false;
            json!({"ok": false, "error": e.to_string()})
        }
    };
    let limit = s.period * 3;
    let uptime = s.started.elapsed();
    let last = match s.store.last_cycle().await {
        Ok(Some(LastCycle {
            result,
            finished_at: at,
        })) if at >= s.started_at => {
            let age = (Utc::now() - at).to_std().unwrap_or_default();
            let good = result.completed() && age <= limit;
            let due = uptime > limit;
            let pass = good || !due && result.completed();
            ok &= pass;
            json!({"ok": pass, "result": result, "finished_at": at, "age_secs": age.as_secs(), "limit_secs": limit.as_secs()})
        }
        Ok(_) => {
            // No cycle finished since start: fine until one is overdue.
            let pass = uptime <= limit;
            ok &= pass;
            json!({"ok": pass, "result": null, "note": "no cycle finished since start", "limit_secs": limit.as_secs()})
        }
        Err(e) => {
            ok = false;
            json!({"ok": false, "error": e.to_string()})
        }
    };
    let body = json!({"status": if ok { "ok" } else { "failing" }, "checks": {"state_store": store, "last_cycle": last}});
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics_text() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics::get().encode(),
    )
        .into_response()
}

async fn status(State(s): State<Arc<Shared>>) -> Response {
    match crate::status::status_json(&s.store, &s.settings).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

/// Equal-time comparison, so the token cannot be guessed byte by byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 403 without a configured token, 401 for a missing or wrong one.
fn authorize(s: &Shared, headers: &HeaderMap) -> Result<(), Response> {
    let Some(token) = s.settings.admin.token.expose() else {
        return Err((
            StatusCode::FORBIDDEN,
            Json(json!({"error": "admin.token is not configured; POST endpoints are disabled"})),
        )
            .into_response());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if same(given.trim().as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        let mut r = (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "missing or wrong bearer token"})),
        )
            .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        Err(r)
    }
}

async fn resync(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return r;
    }
    let logins: Option<Vec<String>> = if body.iter().all(|b| b.is_ascii_whitespace()) {
        None
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v) => match v.get("logins") {
                None | Some(Value::Null) => None,
                Some(Value::Array(a)) => {
                    let l: Option<Vec<String>> =
                        a.iter().map(|x| x.as_str().map(String::from)).collect();
                    match l {
                        Some(l) if !l.is_empty() => Some(l),
                        Some(_) => None,
                        None => return bad_request("logins must be a list of strings"),
                    }
                }
                Some(_) => return bad_request("logins must be a list of strings"),
            },
            Err(_) => return bad_request("body must be JSON: {\"logins\": [...]} or empty"),
        }
    };
    match s
        .store
        .request(RequestKind::Resync, logins.as_deref())
        .await
    {
        Ok(id) => {
            s.wake.notify_one();
            (
                StatusCode::ACCEPTED,
                Json(json!({"requested": "resync", "id": id, "logins": logins})),
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

async fn approve(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return r;
    }
    match s.store.approve_held().await {
        Ok((id, held)) => {
            s.wake.notify_one();
            (
                StatusCode::ACCEPTED,
                Json(json!({"requested": "approve", "id": id, "held": held})),
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

fn bad_request(msg: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": msg}))).into_response()
}
