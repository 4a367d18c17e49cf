//! A BILLmanager emulator: `func=` calls over POST forms or GET queries,
//! `out=json` documents with `$`/`$orig` scalars, errors in HTTP 200 bodies,
//! paging that clamps past the last page, `elem` as a single object for one
//! row and absent for none, repeated fields as arrays, unknown fields.
//! Service lists per product type (`func=INTNAME`) page like `func=account`;
//! their rows name the owner and the tariff plan by display name.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::{Fault, Faults, Seq, Server};

pub const USER: &str = "api";
pub const PASSWORD: &str = "emu-bm-secret";

#[derive(Debug, Clone)]
pub struct BmAccount {
    pub id: u64,
    pub name: String,
    pub email: String,
    pub phone: String,
    /// Raw status code (`$orig`).
    pub status: String,
    pub balance: String,
    /// One entry per subaccount.
    pub credit_limits: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct BmPayment {
    pub id: u64,
    pub account_id: u64,
    pub account_name: String,
    pub amount: String,
    pub status: String,
    pub create_date: String,
    pub pay_date: String,
}

/// One service (what a customer bought) of a product type.
#[derive(Debug, Clone, Default)]
pub struct BmService {
    pub id: u64,
    /// The product type's `intname`, e.g. `videocam`.
    pub item_type: String,
    pub account_id: u64,
    /// The owner's display name (the row's `account`).
    pub account_name: String,
    /// The tariff plan's display name.
    pub pricelist: String,
    pub pricelist_id: Option<u64>,
    /// Raw `item_status` code (`$orig`): 1 ordered, 2 active, 3 suspended,
    /// 4 deleted, 5 processing.
    pub item_status: String,
}

#[derive(Debug, Default)]
pub struct BmData {
    pub accounts: Vec<BmAccount>,
    pub payments: Vec<BmPayment>,
    /// Whether payment rows carry `account_id` (some versions do not).
    pub payments_have_account_id: bool,
    /// The server's own cap on `p_cnt`.
    pub max_page_size: usize,
    pub sessions: Vec<String>,
    pub services: Vec<BmService>,
    /// Product types (`intname`) whose `func=INTNAME` lists services.
    pub itemtypes: Vec<String>,
    /// Whether service rows carry `account_id` (`new`: true).
    pub services_have_account_id: bool,
    /// Whether service rows carry `pricelist_id` (`new`: false).
    pub services_have_pricelist_id: bool,
}

pub struct BmEmulator {
    data: Mutex<BmData>,
    rows: super::RowCache,
    pub faults: Faults,
    calls: Mutex<HashMap<String, u64>>,
    next_session: AtomicU64,
}

impl BmData {
    /// By id: ids are generated in order, so a binary search usually hits.
    pub fn find(&self, id: u64) -> Option<&BmAccount> {
        match self.accounts.binary_search_by_key(&id, |a| a.id) {
            Ok(i) => self.accounts.get(i),
            Err(_) => self.accounts.iter().find(|a| a.id == id),
        }
    }
}

impl BmEmulator {
    pub fn new(accounts: usize, seed: u64) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(BmData {
                accounts: generate(accounts, seed),
                payments: vec![],
                payments_have_account_id: true,
                max_page_size: 1000,
                sessions: vec![],
                services: vec![],
                itemtypes: vec![],
                services_have_account_id: true,
                services_have_pricelist_id: false,
            }),
            rows: Default::default(),
            faults: Faults::default(),
            calls: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
        })
    }

    pub async fn serve(self: &Arc<Self>) -> std::io::Result<Server> {
        let router = Router::new()
            .route("/billmgr", any(handle))
            .with_state(self.clone());
        Server::start(router).await
    }

    /// For handlers that only read: keeps the rendered-row cache.
    fn read(&self) -> std::sync::MutexGuard<'_, BmData> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The data, for reading or changing; drops the rendered-row cache.
    pub fn data(&self) -> std::sync::MutexGuard<'_, BmData> {
        self.rows.invalidate();
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls received per `func`.
    pub fn calls(&self, func: &str) -> u64 {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(func)
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

    /// Drops every session, as an expiry would.
    pub fn expire_sessions(&self) {
        self.data().sessions.clear();
    }

    pub fn add_payment(&self, account_id: u64, amount: &str, status: &str, date: &str) -> u64 {
        let mut d = self.data();
        let id = d.payments.iter().map(|p| p.id).max().unwrap_or(0) + 1;
        let name = d
            .accounts
            .iter()
            .find(|a| a.id == account_id)
            .map(|a| a.name.clone())
            .unwrap_or_default();
        d.payments.push(BmPayment {
            id,
            account_id,
            account_name: name,
            amount: amount.into(),
            status: status.into(),
            create_date: date.into(),
            pay_date: date.into(),
        });
        id
    }

    /// Adds a service and lists its type in `itemtypes`; an empty
    /// `account_name` is taken from the account.
    pub fn add_service(&self, mut sv: BmService) {
        let mut d = self.data();
        if sv.account_name.is_empty() {
            if let Some(a) = d.find(sv.account_id) {
                sv.account_name = a.name.clone();
            }
        }
        if !d.itemtypes.contains(&sv.item_type) {
            d.itemtypes.push(sv.item_type.clone());
        }
        d.services.push(sv);
    }
}

/// Deterministic accounts: mostly active, some suspended, money in the
/// formats BILLmanager installations print.
pub fn generate(n: usize, seed: u64) -> Vec<BmAccount> {
    let mut rng = Seq::new(seed);
    (1..=n as u64)
        .map(|id| {
            let status = match rng.below(20) {
                0 => "2",
                _ => "1",
            };
            let cents = rng.below(100_000) as i64 - 10_000;
            let balance = format!("{}.{:02}", cents / 100, (cents % 100).abs());
            let balance = if cents < 0 && cents > -100 {
                format!("-{}", balance.trim_start_matches('-'))
            } else {
                balance
            };
            BmAccount {
                id,
                name: format!("Customer {id}"),
                email: if id % 17 == 0 {
                    format!("  User{id}@Example.COM ")
                } else {
                    format!("user{id}@bm.example.com")
                },
                phone: format!(
                    "+7 (9{:02}) {:03}-{:02}-{:02}",
                    id % 100,
                    id % 1000,
                    id % 97,
                    id % 89
                ),
                status: status.into(),
                balance,
                credit_limits: if id % 5 == 0 {
                    vec!["100.00".into(), "50".into()]
                } else {
                    vec!["0.00".into()]
                },
            }
        })
        .collect()
}

fn s(v: impl Into<String>) -> Value {
    json!({ "$": v.into() })
}

fn doc(body: Value) -> Response {
    Json(json!({ "doc": body })).into_response()
}

fn error(kind: &str, msg: &str) -> Response {
    doc(json!({"error": {"$type": kind, "$object": "", "msg": {"$": msg}}}))
}

fn status_label(code: &str) -> &'static str {
    match code {
        "1" => "Active",
        "2" => "Suspended",
        "3" => "Deleted",
        _ => "Unknown",
    }
}

fn item_status_label(code: &str) -> &'static str {
    match code {
        "1" => "Ordered",
        "2" => "Active",
        "3" => "Suspended",
        "4" => "Deleted",
        "5" => "Processing",
        _ => "Unknown",
    }
}

async fn handle(
    State(emu): State<Arc<BmEmulator>>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let mut params: HashMap<String, String> = HashMap::new();
    for src in [query.unwrap_or_default().into_bytes(), body.to_vec()] {
        for (k, v) in url::form_urlencoded::parse(&src) {
            params.insert(k.into_owned(), v.into_owned());
        }
    }
    let func = params.get("func").cloned().unwrap_or_default();
    *emu.calls
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(func.clone())
        .or_default() += 1;
    let fault = match emu.faults.apply(&func).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    if let Some(Fault::ErrorBody(kind)) = &fault {
        return error(kind, "injected error");
    }
    if params.get("out").map(String::as_str) != Some("json") {
        return (
            axum::http::StatusCode::OK,
            [("content-type", "text/xml")],
            "<?xml version=\"1.0\"?><doc/>",
        )
            .into_response();
    }
    if func == "auth" {
        let ok = params.get("username").map(String::as_str) == Some(USER)
            && params.get("password").map(String::as_str) == Some(PASSWORD);
        if !ok {
            return error("auth", "Invalid username or password");
        }
        let sid = format!(
            "sess{:08}",
            emu.next_session.fetch_add(1, Ordering::Relaxed)
        );
        emu.read().sessions.push(sid.clone());
        return doc(json!({"auth": {"$id": sid, "$": sid}}));
    }
    let authed = match (params.get("authinfo"), params.get("auth")) {
        (Some(info), _) => info == &format!("{USER}:{PASSWORD}"),
        (None, Some(sid)) => emu.read().sessions.contains(sid),
        _ => false,
    };
    if !authed {
        return error("auth", "Authorization failed");
    }
    let empty = fault == Some(Fault::EmptyListing);
    match func.as_str() {
        "account" => {
            let data = emu.read();
            let rows = emu.rows.get_or_build(|| {
                data.accounts
                    .iter()
                    .map(|a| account_row(a).to_string())
                    .collect()
            });
            let rows: &[String] = if empty { &[] } else { &rows };
            rendered_page(rows, &params, data.max_page_size)
        }
        "account.edit" => {
            let data = emu.read();
            let id = params.get("elid").and_then(|e| e.parse::<u64>().ok());
            match id.and_then(|id| data.find(id)) {
                None => error("missed", "Account not found"),
                Some(a) => doc(json!({
                    "elid": s(a.id.to_string()),
                    "email": s(a.email.clone()),
                    "name": s(a.name.clone()),
                    "realname": s(format!("Contact of {}", a.name)),
                    "phone": s(a.phone.clone()),
                    "valid_phone": s(""),
                    "note": s(""),
                    "project": s("1"),
                })),
            }
        }
        "subaccount" => {
            let data = emu.read();
            let id = params
                .get("elid")
                .or_else(|| params.get("plid"))
                .and_then(|e| e.parse::<u64>().ok());
            match id.and_then(|id| data.find(id)) {
                None => error("missed", "Account not found"),
                Some(a) => {
                    let rows: Vec<Value> = a
                        .credit_limits
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            json!({"id": s((a.id * 10 + i as u64).to_string()), "creditlimit": s(c.clone()),
                                   "balance": s(a.balance.clone()), "project": s("1")})
                        })
                        .collect();
                    page(&rows, &params, data.max_page_size, Value::clone)
                }
            }
        }
        "payment" => {
            let data = emu.read();
            let start = params.get("createdatestart").cloned().unwrap_or_default();
            let end = params
                .get("createdateend")
                .cloned()
                .unwrap_or_else(|| "9999".into());
            let filtered = params.get("filter").map(String::as_str) == Some("on");
            let rows: Vec<Value> = if empty {
                vec![]
            } else {
                data.payments
                    .iter()
                    .filter(|p| {
                        !filtered
                            || (p.create_date >= start
                                && p.create_date[..10.min(p.create_date.len())] <= *end)
                    })
                    .map(|p| {
                        let mut row = json!({
                            "id": s(p.id.to_string()),
                            "number": s(format!("P-{}", p.id)),
                            "create_date": s(p.create_date.clone()),
                            "pay_date": s(p.pay_date.clone()),
                            "account_name": s(p.account_name.clone()),
                            "subaccountamount_iso": s(format!("{} EUR", p.amount)),
                            "status": {"$orig": p.status.clone(), "$": "localized"},
                        });
                        if data.payments_have_account_id {
                            row["account_id"] = s(p.account_id.to_string());
                        }
                        row
                    })
                    .collect()
            };
            page(&rows, &params, data.max_page_size, Value::clone)
        }
        _ => {
            let data = emu.read();
            services(&data, &func, &params, empty)
                .unwrap_or_else(|| error("missed", "Unknown function"))
        }
    }
}

/// `func=INTNAME` for a type in `itemtypes`: its services, paged like
/// `func=account`. `None` for any other function.
fn services(
    data: &BmData,
    func: &str,
    params: &HashMap<String, String>,
    empty: bool,
) -> Option<Response> {
    if !data.itemtypes.iter().any(|t| t == func) {
        return None;
    }
    let rows: Vec<&BmService> = if empty {
        vec![]
    } else {
        data.services
            .iter()
            .filter(|sv| sv.item_type == func)
            .collect()
    };
    let ids = (
        data.services_have_account_id,
        data.services_have_pricelist_id,
    );
    Some(page(&rows, params, data.max_page_size, |sv| {
        service_row(sv, ids)
    }))
}

/// A service row; `ids` says whether `account_id` and `pricelist_id` are shown.
fn service_row(sv: &BmService, ids: (bool, bool)) -> Value {
    let mut row = json!({
        "id": s(sv.id.to_string()),
        "pricelist": s(sv.pricelist.clone()),
        "account": s(sv.account_name.clone()),
        "item_status": {"$orig": sv.item_status.clone(), "$": item_status_label(&sv.item_status)},
        "status_msg": s(""),
        "createdate": s("2026-01-01"),
        "expiredate": s("2027-01-01"),
        "cost": s("100.00 RUB"),
    });
    if ids.0 {
        row["account_id"] = s(sv.account_id.to_string());
    }
    if let (true, Some(p)) = (ids.1, sv.pricelist_id) {
        row["pricelist_id"] = s(p.to_string());
    }
    row
}

fn account_row(a: &BmAccount) -> Value {
    let mut row = json!({
        "id": s(a.id.to_string()),
        "name": s(a.name.clone()),
        "project": s("1"),
        "balance": s(a.balance.clone()),
        "account_status": {"$orig": a.status.clone(), "$": status_label(&a.status)},
        "tz_registration_date": s("2024-01-01 10:00:00"),
        "status": [{"$": "registered"}, {"$": "verified"}],
    });
    // Repeated fields and unknown fields, as real installations send.
    if a.id.is_multiple_of(7) {
        row["project"] = json!([{"$": "1"}, {"$": "2"}]);
    }
    if a.id.is_multiple_of(11) {
        row["x_custom_field"] = json!({"nested": {"$": "?"}});
    }
    row
}

/// `(p_cnt, p_num)` as BILLmanager applies them: capped and clamped.
fn window(total: usize, params: &HashMap<String, String>, cap: usize) -> (usize, usize) {
    let cnt = params
        .get("p_cnt")
        .and_then(|c| c.parse::<usize>().ok())
        .unwrap_or(20)
        .clamp(1, cap.max(1));
    let last_page = total.div_ceil(cnt).max(1);
    let num = params
        .get("p_num")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, last_page);
    (cnt, num)
}

/// `page` over rows already rendered as JSON text.
fn rendered_page(rows: &[String], params: &HashMap<String, String>, cap: usize) -> Response {
    let total = rows.len();
    let (cnt, num) = window(total, params, cap);
    let start = ((num - 1) * cnt).min(total);
    let slice = &rows[start..(start + cnt).min(total)];
    let elem = match slice.len() {
        0 => String::new(),
        1 => format!("\"elem\":{},", slice[0]),
        _ => format!("\"elem\":[{}],", slice.join(",")),
    };
    let body = format!(
        "{{\"doc\":{{{elem}\"p_elems\":{{\"$\":\"{total}\"}},\"p_num\":{{\"$\":\"{num}\"}},\"p_cnt\":{{\"$\":\"{cnt}\"}}}}}}"
    );
    ([("content-type", "application/json")], body).into_response()
}

/// Pages like BILLmanager: `p_cnt` capped by the server, and a `p_num` past
/// the end clamped to the last page. One row comes as an object, none as an
/// absent `elem`. Only the page's rows are rendered.
fn page<T>(
    rows: &[T],
    params: &HashMap<String, String>,
    cap: usize,
    render: impl Fn(&T) -> Value,
) -> Response {
    let total = rows.len();
    let (cnt, num) = window(total, params, cap);
    let slice: Vec<Value> = rows
        .iter()
        .skip((num - 1) * cnt)
        .take(cnt)
        .map(render)
        .collect();
    let mut body = Map::new();
    match slice.len() {
        0 => {}
        1 => {
            body.insert(
                "elem".into(),
                slice.into_iter().next().unwrap_or(Value::Null),
            );
        }
        _ => {
            body.insert("elem".into(), Value::Array(slice));
        }
    }
    body.insert("p_elems".into(), s(total.to_string()));
    body.insert("p_num".into(), s(num.to_string()));
    body.insert("p_cnt".into(), s(cnt.to_string()));
    body.insert("tparams".into(), json!({"out": {"$": "json"}}));
    doc(Value::Object(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn call(emu: &Arc<BmEmulator>, query: &str) -> Value {
        let q = format!("{query}&out=json&authinfo={USER}:{PASSWORD}");
        let resp = handle(State(emu.clone()), RawQuery(Some(q)), Bytes::new()).await;
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn service_lists_page_like_accounts() {
        let emu = BmEmulator::new(3, 1);
        for id in 1..=3 {
            emu.add_service(BmService {
                id,
                item_type: "videocam".into(),
                account_id: id,
                pricelist: "Cameras 10".into(),
                pricelist_id: Some(7),
                item_status: "2".into(),
                ..Default::default()
            });
        }
        let v = call(&emu, "func=videocam&p_cnt=2&p_num=9").await;
        let doc = &v["doc"];
        assert_eq!(doc["p_elems"]["$"], "3");
        assert_eq!(doc["p_num"]["$"], "2");
        let row = &doc["elem"];
        assert_eq!(row["id"]["$"], "3");
        assert_eq!(row["account"]["$"], "Customer 3");
        assert_eq!(row["item_status"]["$orig"], "2");
        assert_eq!(row["account_id"]["$"], "3");
        assert!(row.get("pricelist_id").is_none());
        assert_eq!(emu.calls("videocam"), 1);
        let v = call(&emu, "func=vds").await;
        assert_eq!(v["doc"]["error"]["$type"], "missed");
    }
}
