//! The admin HTTP server (SPEC §5): health, metrics, status, and the two
//! authenticated POST endpoints.

// Handlers return a ready `Response` as their error: that is the point.
#![allow(clippy::result_large_err)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde_json::{json, Value};

use super::Shared;
use crate::core::model::AccountKey;
use crate::store::{LastCycle, RequestKind, TriggerBody};
use crate::telemetry::metrics;

/// Request bodies are small JSON documents.
pub const BODY_LIMIT: usize = 64 * 1024;
/// A request (body included) must be answered within this.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

pub fn router(shared: Arc<Shared>) -> Router {
    let token = || middleware::from_fn_with_state(shared.clone(), require_token);
    let mut status_route = Router::new().route("/status", get(status));
    // Logins and VMS error texts are not for the whole network.
    if !is_loopback(&shared.settings.admin.listen) {
        status_route = status_route.route_layer(token());
    }
    let posts = Router::new()
        .route("/resync", post(resync))
        .route("/approve", post(approve))
        .route("/trigger", post(trigger))
        .route_layer(token());
    Router::new()
        .route("/livez", get(livez))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .merge(status_route)
        .merge(posts)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(deadline))
        .with_state(shared)
}

/// `127.0.0.1:9187`, `[::1]:9187`, `localhost:9187`.
fn is_loopback(listen: &str) -> bool {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(addr) => addr.ip().is_loopback(),
        Err(_) => listen
            .rsplit_once(':')
            .is_some_and(|(h, _)| h == "localhost"),
    }
}

/// The token is checked before anything reads the body.
async fn require_token(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    match authorize(&s, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(r) => r,
    }
}

async fn deadline(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_DEADLINE, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            Json(json!({"error": "request took too long"})),
        )
            .into_response(),
    }
}

/// A loop that has not shown life for this long is not alive.
const LIVENESS_LIMIT: Duration = Duration::from_secs(600);

async fn livez(State(s): State<Arc<Shared>>) -> Response {
    let alive = s.loop_alive.load(Ordering::Relaxed) && s.heartbeat_age() < LIVENESS_LIMIT;
    if alive {
        (StatusCode::OK, Json(json!({"status": "alive"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "dead", "heartbeat_age_secs": s.heartbeat_age().as_secs()})),
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
    let role = match s.leads() {
        true => "leader",
        false => "standby",
    };
    let body = json!({"status": if ok { "ok" } else { "failing" }, "role": role, "checks": {"state_store": store, "last_cycle": last}});
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// A standby is ready while it could take over (SPEC §13): its store
/// answers and its binary may lead the schema. A leader, or a single node,
/// is ready when it is healthy.
async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    let Some(node) = s.node.as_ref().filter(|_| !s.leads()) else {
        return healthz(State(s)).await;
    };
    let store = s.store.ping().await;
    let barred = node.barred();
    let ok = store.is_ok() && barred.is_none();
    let body = json!({
        "status": if ok { "ok" } else { "failing" },
        "role": "standby",
        "checks": {
            "state_store": match &store {
                Ok(()) => json!({"ok": true}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            },
            "may_lead": match &barred {
                None => json!({"ok": true}),
                Some(why) => json!({"ok": false, "error": why}),
            },
        },
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// The Prometheus text format unless the scraper asks for OpenMetrics.
async fn metrics_text(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(node) = &s.node {
        use crate::lease::Gate;
        let m = metrics::get();
        m.leader.set(i64::from(node.may_act()));
        m.lease_epoch.set(node.newest_epoch());
    }
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (kind, body) = if wants_openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics::get().encode(),
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::get().encode_prometheus(),
        )
    };
    ([(header::CONTENT_TYPE, kind)], body).into_response()
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

async fn resync(State(s): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
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
            s.listing.wake.notify_one();
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

async fn approve(State(s): State<Arc<Shared>>) -> Response {
    match s.store.approve_held().await {
        Ok((id, held)) => {
            s.listing.wake.notify_one();
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

/// `{"accounts": ["SOURCE:ID", ...], "logins": [...], "services":
/// ["SOURCE:ID", ...]}`: re-read those accounts (and the owners of those
/// services) and push their users now (SPEC §10.3, §12.4).
async fn trigger(State(s): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    const SHAPE: &str = r#"body must be {"accounts": ["SOURCE:ID", ...], "logins": [...], "services": ["SOURCE:ID", ...]}"#;
    let Ok(t) = serde_json::from_slice::<TriggerBody>(&body) else {
        return bad_request(SHAPE);
    };
    let keys = t.accounts.iter().chain(&t.services);
    if let Some(bad) = keys.into_iter().find(|a| AccountKey::parse(a).is_none()) {
        return bad_request(&format!("{bad:?} is not SOURCE:ID (e.g. billmanager:42)"));
    }
    if t.accounts.is_empty() && t.logins.is_empty() && t.services.is_empty() {
        return bad_request(SHAPE);
    }
    match s.store.request_trigger(&t).await {
        Ok(id) => {
            s.fast.wake.notify_one();
            let answer = json!({"requested": "trigger", "id": id, "accounts": t.accounts,
                                "logins": t.logins, "services": t.services});
            (StatusCode::ACCEPTED, Json(answer)).into_response()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, Settings};
    use crate::store::Store;
    use axum::body::Body;
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;
    use tower::ServiceExt;

    const TOKEN: &str = "admin-test-token-0123";

    async fn app(listen: &str) -> (Router, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.admin.listen = listen.into();
        settings.admin.token = Secret::new(TOKEN);
        let store = Store::open(&dir.path().join("state.db")).await.unwrap();
        let shared = Shared {
            period: Duration::from_secs(60),
            settings,
            store,
            listing: Default::default(),
            fast: Default::default(),
            loop_alive: AtomicBool::new(true),
            started: Instant::now(),
            started_at: Utc::now(),
            node: None,
        };
        (router(Arc::new(shared)), dir)
    }

    fn post(path: &str, token: &str, body: Body) -> Request {
        Request::post(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(body)
            .unwrap()
    }

    /// A body that never ends: reading it would hang the request.
    fn endless() -> Body {
        Body::from_stream(futures::stream::pending::<
            Result<axum::body::Bytes, std::io::Error>,
        >())
    }

    #[tokio::test]
    async fn the_token_is_checked_before_the_body_is_read() {
        let (app, _dir) = app("127.0.0.1:9187").await;
        for path in ["/resync", "/approve"] {
            let call = app.clone().oneshot(post(path, "wrong", endless()));
            let answer = tokio::time::timeout(Duration::from_secs(5), call)
                .await
                .expect("the body was read before the token was checked")
                .unwrap();
            assert_eq!(answer.status(), StatusCode::UNAUTHORIZED, "{path}");
        }
    }

    #[tokio::test]
    async fn bodies_over_64_kib_are_refused() {
        let (app, _dir) = app("127.0.0.1:9187").await;
        let big = format!(r#"{{"logins":["{}"]}}"#, "a".repeat(BODY_LIMIT));
        let answer = app
            .clone()
            .oneshot(post("/resync", TOKEN, Body::from(big)))
            .await
            .unwrap();
        assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let small = r#"{"logins":["ann@x.example"]}"#;
        let answer = app
            .oneshot(post("/resync", TOKEN, Body::from(small)))
            .await
            .unwrap();
        assert_eq!(answer.status(), StatusCode::ACCEPTED);
    }

    #[tokio::test]
    async fn status_needs_the_token_off_loopback() {
        let get = |token: Option<&str>| {
            let mut r = Request::get("/status");
            if let Some(t) = token {
                r = r.header(header::AUTHORIZATION, format!("Bearer {t}"));
            }
            r.body(Body::empty()).unwrap()
        };
        let (open, _d1) = app("127.0.0.1:9187").await;
        assert_eq!(
            open.oneshot(get(None)).await.unwrap().status(),
            StatusCode::OK
        );
        let (exposed, _d2) = app("0.0.0.0:9187").await;
        let answer = exposed.clone().oneshot(get(None)).await.unwrap();
        assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
        let answer = exposed.clone().oneshot(get(Some(TOKEN))).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        // Health and metrics stay open for probes and scrapers.
        let livez = Request::get("/livez").body(Body::empty()).unwrap();
        assert_eq!(
            exposed.oneshot(livez).await.unwrap().status(),
            StatusCode::OK
        );
    }

    #[test]
    fn loopback_listen_addresses() {
        for l in [
            "127.0.0.1:9187",
            "[::1]:9187",
            "localhost:9187",
            "127.0.0.2:1",
        ] {
            assert!(is_loopback(l), "{l}");
        }
        for l in [
            "0.0.0.0:9187",
            "[::]:9187",
            "10.0.0.5:9187",
            "billsync.lan:9187",
        ] {
            assert!(!is_loopback(l), "{l}");
        }
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text_unless_openmetrics_is_asked() {
        let (app, _dir) = app("127.0.0.1:9187").await;
        let plain = Request::get("/metrics").body(Body::empty()).unwrap();
        let answer = app.clone().oneshot(plain).await.unwrap();
        let kind = answer.headers()[header::CONTENT_TYPE].to_str().unwrap();
        assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
        let om = Request::get("/metrics")
            .header(
                header::ACCEPT,
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
            )
            .body(Body::empty())
            .unwrap();
        let answer = app.oneshot(om).await.unwrap();
        let kind = answer.headers()[header::CONTENT_TYPE].to_str().unwrap();
        assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
        let body = axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap();
        assert!(body.ends_with(b"# EOF\n"));
    }
}
