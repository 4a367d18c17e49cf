//! An ActivePlatform vendor API v1 emulator: `api_token` in the query, page
//! and per_page, a configurable list envelope, list rows that sometimes lack
//! `email`, account GET and PUT, and payments filtered by `updated_at`;
//! subscriptions (listed, per account) and plan names.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{Fault, Faults, Seq, Server};

/// One PUT received: the account id and the form pairs.
pub type Put = (u64, Vec<(String, String)>);

pub const TOKEN: &str = "emu-ap-token-0123456789";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    Bare,
    Data,
    Accounts,
    Items,
}

#[derive(Debug, Clone)]
pub struct ApAccount {
    pub id: u64,
    pub first_name: String,
    pub last_name: String,
    pub email: String,
    pub phone: String,
    pub status: String,
    /// Sent as a number unless `balance_as_string`.
    pub balance: f64,
    pub credit_limit: f64,
    pub custom_attributes: BTreeMap<String, String>,
    pub updated_at: String,
}

#[derive(Debug, Clone)]
pub struct ApPayment {
    pub id: u64,
    pub account_id: u64,
    pub status: String,
    pub total: String,
    pub created_at: String,
    pub updated_at: String,
}

/// One subscription; `name` is its own, not the plan's.
#[derive(Debug, Clone, Default)]
pub struct ApSubscription {
    pub id: u64,
    pub plan_id: u64,
    pub account_id: u64,
    pub name: String,
    /// As on the wire: snake_case (`active`, `graced`, `stopping_failed`).
    pub status: String,
    pub trial: bool,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug)]
pub struct ApData {
    pub accounts: Vec<ApAccount>,
    pub payments: Vec<ApPayment>,
    pub envelope: Envelope,
    pub balance_as_string: bool,
    /// The server's own cap on per_page.
    pub max_page_size: usize,
    /// Answers page 1 whatever `page` asks (a server that ignores paging).
    pub ignore_page: bool,
    pub subscriptions: Vec<ApSubscription>,
    /// Plan names by plan id.
    pub plans: BTreeMap<u64, String>,
}

pub struct ApEmulator {
    data: Mutex<ApData>,
    rows: super::RowCache,
    pub faults: Faults,
    calls: Mutex<HashMap<String, u64>>,
    /// Every PUT received: (account id, form pairs).
    pub puts: Mutex<Vec<Put>>,
}

impl ApData {
    pub fn find(&self, id: u64) -> Option<&ApAccount> {
        match self.accounts.binary_search_by_key(&id, |a| a.id) {
            Ok(i) => self.accounts.get(i),
            Err(_) => self.accounts.iter().find(|a| a.id == id),
        }
    }
}

impl ApEmulator {
    pub fn new(accounts: usize, seed: u64) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(ApData {
                accounts: generate(accounts, seed),
                payments: vec![],
                envelope: Envelope::Bare,
                balance_as_string: false,
                max_page_size: 500,
                ignore_page: false,
                subscriptions: vec![],
                plans: BTreeMap::new(),
            }),
            rows: Default::default(),
            faults: Faults::default(),
            calls: Mutex::new(HashMap::new()),
            puts: Mutex::new(vec![]),
        })
    }

    pub async fn serve(self: &Arc<Self>) -> std::io::Result<Server> {
        let router = Router::new()
            .route("/api/vendor/v1/accounts.json", get(list_accounts))
            .route(
                "/api/vendor/v1/accounts/{file}",
                get(get_account).put(put_account),
            )
            .route("/api/vendor/v1/payments.json", get(list_payments))
            .route("/api/vendor/v1/subscriptions.json", get(list_subscriptions))
            .route(
                "/api/vendor/v1/accounts/{file}/subscriptions.json",
                get(account_subscriptions),
            )
            .route("/api/vendor/v1/plans/{file}", get(get_plan))
            .with_state(self.clone());
        Server::start(router).await
    }

    /// For handlers that only read: keeps the rendered-row cache.
    fn read(&self) -> std::sync::MutexGuard<'_, ApData> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The data, for reading or changing; drops the rendered-row cache.
    pub fn data(&self) -> std::sync::MutexGuard<'_, ApData> {
        self.rows.invalidate();
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls by kind: `list`, `get`, `put`, `payments`, `subscriptions`,
    /// `account_subscriptions`, `plan`.
    pub fn calls(&self, kind: &str) -> u64 {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(kind)
            .copied()
            .unwrap_or(0)
    }

    /// Every call received.
    pub fn total_calls(&self) -> u64 {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }

    pub fn reset_calls(&self) {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn count(&self, kind: &str) {
        *self
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind.into())
            .or_default() += 1;
    }

    pub fn add_payment(&self, account_id: u64, total: &str, status: &str, updated_at: &str) -> u64 {
        let mut d = self.data();
        let id = d.payments.iter().map(|p| p.id).max().unwrap_or(0) + 1;
        d.payments.push(ApPayment {
            id,
            account_id,
            status: status.into(),
            total: total.into(),
            created_at: updated_at.into(),
            updated_at: updated_at.into(),
        });
        id
    }
}

pub fn generate(n: usize, seed: u64) -> Vec<ApAccount> {
    let mut rng = Seq::new(seed.wrapping_add(1));
    (1..=n as u64)
        .map(|i| {
            let id = 2_000_000 + i;
            let status = match rng.below(25) {
                0 => "credit hold",
                1 => "administrative_hold",
                _ => "active",
            };
            ApAccount {
                id,
                first_name: format!("First{i}"),
                last_name: format!("Last{i}"),
                email: format!("client{i}@ap.example.com"),
                phone: if i % 3 == 0 {
                    format!("00375{:09}", i)
                } else {
                    format!("+375{:09}", i)
                },
                status: status.into(),
                balance: (rng.below(50_000) as f64 - 5_000.0) / 100.0,
                credit_limit: if i % 4 == 0 { 10.0 } else { 0.0 },
                custom_attributes: BTreeMap::new(),
                updated_at: "2026-01-01T00:00:00.000+03:00".into(),
            }
        })
        .collect()
}

fn authorized(q: &HashMap<String, String>) -> Result<(), Response> {
    if q.get("api_token").map(String::as_str) == Some(TOKEN) {
        Ok(())
    } else {
        Err((
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "Unauthorized", "message": "Invalid API token"})),
        )
            .into_response())
    }
}

fn account_json(a: &ApAccount, full: bool, balance_as_string: bool) -> Value {
    let attrs: Vec<Value> = a
        .custom_attributes
        .iter()
        .map(|(k, v)| json!({"name": k, "key": k, "value": v}))
        .collect();
    let mut v = json!({
        "id": a.id,
        "name": format!("{} {}", a.first_name, a.last_name),
        "primary_name": "",
        "first_name": a.first_name,
        "middle_name": null,
        "last_name": a.last_name,
        "phone": a.phone,
        "status": a.status,
        "balance": if balance_as_string { json!(format!("{:.2}", a.balance)) } else { json!(a.balance) },
        "credit_limit": a.credit_limit,
        "account_type": "Personal",
        "custom_attributes": attrs,
        "created_at": "2024-10-04T03:45:11.720+03:00",
        "updated_at": a.updated_at,
    });
    // Every tenth list row lacks the e-mail: the reader must GET the account.
    if full || !a.id.is_multiple_of(10) {
        v["email"] = json!(a.email);
    }
    v
}

fn wrap(rows: Vec<Value>, envelope: Envelope) -> Value {
    match envelope {
        Envelope::Bare => Value::Array(rows),
        Envelope::Data => json!({"data": rows, "meta": {"total": null}}),
        Envelope::Accounts => json!({"accounts": rows}),
        Envelope::Items => json!({"items": rows, "page": 1}),
    }
}

fn paging(q: &HashMap<String, String>, cap: usize) -> (usize, usize) {
    let page = q
        .get("page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1usize)
        .max(1);
    let per = q
        .get("per_page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(25usize)
        .clamp(1, cap.max(1));
    (page, per)
}

async fn list_accounts(
    State(emu): State<Arc<ApEmulator>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    emu.count("list");
    let fault = match emu.faults.apply("accounts.json").await {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Err(r) = authorized(&q) {
        return r;
    }
    let data = emu.read();
    let (mut page, per) = paging(&q, data.max_page_size);
    if data.ignore_page {
        page = 1;
    }
    let rendered = emu.rows.get_or_build(|| {
        data.accounts
            .iter()
            .map(|a| account_json(a, false, data.balance_as_string).to_string())
            .collect()
    });
    let rows: Vec<&str> = if fault == Some(Fault::EmptyListing) {
        vec![]
    } else {
        rendered
            .iter()
            .skip((page - 1) * per)
            .take(per)
            .map(String::as_str)
            .collect()
    };
    let list = format!("[{}]", rows.join(","));
    let body = match data.envelope {
        Envelope::Bare => list,
        Envelope::Data => format!("{{\"data\":{list},\"meta\":{{\"total\":null}}}}"),
        Envelope::Accounts => format!("{{\"accounts\":{list}}}"),
        Envelope::Items => format!("{{\"items\":{list},\"page\":{page}}}"),
    };
    ([("content-type", "application/json")], with_raw_bytes(body)).into_response()
}

/// Written into a field, this goes on the wire as the byte 0xFF (not UTF-8:
/// a customer's name saved in a legacy encoding).
pub const NOT_UTF8: &str = "~0xFF~";

fn with_raw_bytes(body: String) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    for (i, part) in body.split(NOT_UTF8).enumerate() {
        if i > 0 {
            out.push(0xff);
        }
        out.extend_from_slice(part.as_bytes());
    }
    out
}

fn account_id(file: &str) -> Option<u64> {
    file.strip_suffix(".json").unwrap_or(file).parse().ok()
}

async fn get_account(
    State(emu): State<Arc<ApEmulator>>,
    Path(file): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    emu.count("get");
    if let Err(r) = emu.faults.apply("accounts/").await {
        return r;
    }
    if let Err(r) = authorized(&q) {
        return r;
    }
    let data = emu.read();
    match account_id(&file).and_then(|id| data.find(id)) {
        Some(a) => Json(account_json(a, true, data.balance_as_string)).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({"error": "Not found"}))).into_response(),
    }
}

async fn put_account(
    State(emu): State<Arc<ApEmulator>>,
    Path(file): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    emu.count("put");
    if let Err(r) = emu.faults.apply("put").await {
        return r;
    }
    if let Err(r) = authorized(&q) {
        return r;
    }
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(&body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let Some(id) = account_id(&file) else {
        return (StatusCode::NOT_FOUND, Json(json!({"error": "Not found"}))).into_response();
    };
    let mut data = emu.data();
    let balance_as_string = data.balance_as_string;
    let Some(acc) = data.accounts.iter_mut().find(|a| a.id == id) else {
        return (StatusCode::NOT_FOUND, Json(json!({"error": "Not found"}))).into_response();
    };
    // custom_attributes[][key] / [][value] arrive as consecutive pairs.
    let mut key: Option<String> = None;
    for (k, v) in &pairs {
        match k.as_str() {
            "custom_attributes[][key]" => key = Some(v.clone()),
            "custom_attributes[][value]" => {
                if let Some(k) = key.take() {
                    acc.custom_attributes.insert(k, v.clone());
                }
            }
            "email" => acc.email = v.clone(),
            "phone" => acc.phone = v.clone(),
            _ => {}
        }
    }
    let out = account_json(acc, true, balance_as_string);
    drop(data);
    emu.puts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((id, pairs));
    Json(out).into_response()
}

async fn list_payments(
    State(emu): State<Arc<ApEmulator>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    emu.count("payments");
    let fault = match emu.faults.apply("payments.json").await {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Err(r) = authorized(&q) {
        return r;
    }
    let data = emu.read();
    let (page, per) = paging(&q, data.max_page_size);
    let since = q.get("filters[updated_at]").cloned().unwrap_or_default();
    let rows: Vec<Value> = if fault == Some(Fault::EmptyListing) {
        vec![]
    } else {
        data.payments
            .iter()
            .filter(|p| p.updated_at.as_str() >= since.as_str())
            .skip((page - 1) * per)
            .take(per)
            .map(|p| {
                json!({"id": p.id, "account_id": p.account_id, "status": p.status, "total": p.total,
                       "created_at": p.created_at, "updated_at": p.updated_at})
            })
            .collect()
    };
    Json(wrap(rows, data.envelope)).into_response()
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"error": "Not found"}))).into_response()
}

fn subscription_json(s: &ApSubscription) -> Value {
    json!({
        "id": s.id, "plan_id": s.plan_id, "account_id": s.account_id, "name": s.name,
        "trial": s.trial, "status": s.status, "start_date": s.created_at,
        "expiration_date": null, "created_at": s.created_at, "updated_at": s.updated_at,
    })
}

/// `filters[account_id|plan_id|status]` match exactly, `filters[created_at|
/// updated_at]` from that time on.
fn subscription_matches(s: &ApSubscription, q: &HashMap<String, String>) -> bool {
    let is = |key: &str, value: String| q.get(key).is_none_or(|want| *want == value);
    let since = |key: &str, value: &str| q.get(key).is_none_or(|from| value >= from.as_str());
    is("filters[account_id]", s.account_id.to_string())
        && is("filters[plan_id]", s.plan_id.to_string())
        && is("filters[status]", s.status.clone())
        && since("filters[created_at]", &s.created_at)
        && since("filters[updated_at]", &s.updated_at)
}

async fn list_subscriptions(
    State(emu): State<Arc<ApEmulator>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    emu.count("subscriptions");
    let fault = match emu.faults.apply("subscriptions.json").await {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Err(r) = authorized(&q) {
        return r;
    }
    let data = emu.read();
    let (mut page, per) = paging(&q, data.max_page_size);
    if data.ignore_page {
        page = 1;
    }
    let rows: Vec<Value> = if fault == Some(Fault::EmptyListing) {
        vec![]
    } else {
        data.subscriptions
            .iter()
            .filter(|s| subscription_matches(s, &q))
            .skip((page - 1) * per)
            .take(per)
            .map(subscription_json)
            .collect()
    };
    let mut body = wrap(rows, data.envelope);
    if data.envelope == Envelope::Items {
        body["page"] = json!(page);
    }
    Json(body).into_response()
}

/// One account's subscriptions, a bare array; 404 for an account that is
/// neither known nor named by a subscription.
async fn account_subscriptions(
    State(emu): State<Arc<ApEmulator>>,
    Path(file): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    emu.count("account_subscriptions");
    let key = format!("account_subscriptions/{file}.json");
    let fault = match emu.faults.apply(&key).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Err(r) = authorized(&q) {
        return r;
    }
    let Ok(id) = file.parse::<u64>() else {
        return not_found();
    };
    let data = emu.read();
    let mut rows: Vec<Value> = data
        .subscriptions
        .iter()
        .filter(|s| s.account_id == id)
        .map(subscription_json)
        .collect();
    if rows.is_empty() && data.find(id).is_none() {
        return not_found();
    }
    if fault == Some(Fault::EmptyListing) {
        rows.clear();
    }
    Json(Value::Array(rows)).into_response()
}

async fn get_plan(
    State(emu): State<Arc<ApEmulator>>,
    Path(file): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    emu.count("plan");
    if let Err(r) = emu.faults.apply(&format!("plans/{file}")).await {
        return r;
    }
    if let Err(r) = authorized(&q) {
        return r;
    }
    let data = emu.read();
    let id = account_id(&file);
    match id.and_then(|id| data.plans.get(&id).map(|name| (id, name))) {
        Some((id, name)) => Json(json!({"id": id, "name": name})).into_response(),
        None => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(id: u64, account_id: u64, status: &str) -> ApSubscription {
        ApSubscription {
            id,
            plan_id: 7,
            account_id,
            name: format!("Cameras #{id}"),
            status: status.into(),
            ..Default::default()
        }
    }

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut q: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        q.insert("api_token".into(), TOKEN.into());
        q
    }

    async fn json_of(resp: Response) -> (StatusCode, Value) {
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn subscriptions_filter_page_and_name_plans() {
        let emu = ApEmulator::new(2, 1);
        {
            let mut d = emu.data();
            d.subscriptions = vec![
                sub(1, 2_000_001, "active"),
                sub(2, 2_000_002, "graced"),
                sub(3, 2_000_001, "stopped"),
            ];
            d.plans.insert(7, "Cameras 10".into());
        }
        let q = query(&[
            ("filters[account_id]", "2000001"),
            ("per_page", "1"),
            ("page", "2"),
        ]);
        let (_, v) = json_of(list_subscriptions(State(emu.clone()), Query(q)).await).await;
        assert_eq!(v, json!([subscription_json(&sub(3, 2_000_001, "stopped"))]));
        let one = account_subscriptions(
            State(emu.clone()),
            Path("2000002".into()),
            Query(query(&[])),
        );
        let (_, v) = json_of(one.await).await;
        assert_eq!(v[0]["status"], "graced");
        let plan = get_plan(State(emu.clone()), Path("7.json".into()), Query(query(&[])));
        assert_eq!(
            json_of(plan.await).await.1,
            json!({"id": 7, "name": "Cameras 10"})
        );
        let plan = get_plan(State(emu.clone()), Path("8.json".into()), Query(query(&[])));
        assert_eq!(json_of(plan.await).await.0, StatusCode::NOT_FOUND);
        assert_eq!(
            (
                emu.calls("subscriptions"),
                emu.calls("account_subscriptions"),
                emu.calls("plan")
            ),
            (1, 1, 2)
        );
    }
}
