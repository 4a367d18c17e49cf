//! An AIPIX VMS Billing API emulator: users by login with status, type,
//! billing_info, properties and permissions; Laravel 422s (duplicate login,
//! unknown login, invalid fields); tree elements; injected faults.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{Fault, Faults, Server};

/// Permissions every new VMS user starts with; billsync must leave them be.
pub const DEFAULT_PERMISSIONS: [&str; 1] = ["camera-events-index"];

#[derive(Debug, Clone, PartialEq)]
pub struct VmsUser {
    pub id: u64,
    pub login: String,
    pub user_type: String,
    pub status: String,
    pub billing_info: Value,
    pub properties: Value,
    pub permissions: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TreeElement {
    pub id: u64,
    pub name: String,
    pub kind: String,
    pub external_id: String,
}

/// One request as the emulator saw it: for tests and the sandbox report.
#[derive(Debug, Clone)]
pub struct Event {
    pub method: String,
    pub path: String,
    pub login: String,
    pub status: u16,
    pub summary: String,
}

#[derive(Debug)]
pub struct VmsData {
    pub users: BTreeMap<String, VmsUser>,
    pub tree: Vec<TreeElement>,
    pub allowed_types: Vec<String>,
    /// Logins whose every request answers 422 (a validation the VMS insists on).
    pub force_422: HashSet<String>,
    pub events: Vec<Event>,
    /// Keep events (the sandbox and tests); off for large benchmarks.
    pub record_events: bool,
    next_id: u64,
}

pub struct VmsEmulator {
    pub data: Mutex<VmsData>,
    pub faults: Faults,
    served: std::sync::atomic::AtomicU64,
}

impl VmsEmulator {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(VmsData {
                users: BTreeMap::new(),
                tree: vec![],
                allowed_types: vec!["b2c".into(), "b2b".into()],
                force_422: HashSet::new(),
                events: vec![],
                record_events: true,
                next_id: 1,
            }),
            faults: Faults::default(),
            served: Default::default(),
        })
    }

    /// Requests received, faults included (counted even with events off).
    pub fn served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn serve(self: &Arc<Self>) -> std::io::Result<Server> {
        let router = Router::new()
            .route("/api/v1/billing/user/manage", any(user))
            .route("/api/v1/billing/tree", any(tree))
            .with_state(self.clone());
        Server::start(router).await
    }

    pub fn data(&self) -> std::sync::MutexGuard<'_, VmsData> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests with this method whose answer had this status.
    pub fn count(&self, method: &str, status: u16) -> usize {
        self.data()
            .events
            .iter()
            .filter(|e| e.method == method && e.status == status)
            .count()
    }

    pub fn count_for(&self, method: &str, login: &str) -> usize {
        self.data()
            .events
            .iter()
            .filter(|e| e.method == method && e.login == login)
            .count()
    }

    pub fn requests(&self) -> usize {
        self.data().events.len()
    }

    pub fn user(&self, login: &str) -> Option<VmsUser> {
        self.data().users.get(login).cloned()
    }
}

fn invalid(message: &str, field: &str, reason: &str) -> (StatusCode, Value) {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({"message": message, "errors": {field: [reason]}}),
    )
}

fn user_json(u: &VmsUser) -> Value {
    json!({
        "id": u.id, "login": u.login, "name": null, "type": u.user_type, "status": u.status,
        "created_at": "2026-01-01T00:00:00.000000Z", "updated_at": "2026-01-01T00:00:00.000000Z",
        "deleted_at": null, "can_update_password": false, "billing_properties": u.properties,
    })
}

fn str_list(v: Option<&Value>) -> Result<Vec<String>, ()> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(String::from).ok_or(()))
            .collect(),
        _ => Err(()),
    }
}

fn properties_of(body: &Value) -> Value {
    body.get("billing_properties")
        .or_else(|| body.get("properties"))
        .cloned()
        .unwrap_or_else(|| json!([]))
}

fn finish(
    emu: &VmsEmulator,
    method: &Method,
    path: &str,
    login: &str,
    status: StatusCode,
    body: Value,
) -> Response {
    let mut data = emu.data();
    if data.record_events {
        let summary = match status.as_u16() {
            200..=299 => String::new(),
            _ => body
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        };
        data.events.push(Event {
            method: method.to_string(),
            path: path.into(),
            login: login.into(),
            status: status.as_u16(),
            summary,
        });
    }
    if status == StatusCode::NO_CONTENT {
        return status.into_response();
    }
    (status, Json(body)).into_response()
}

async fn user(
    State(emu): State<Arc<VmsEmulator>>,
    method: Method,
    body: axum::body::Bytes,
) -> Response {
    emu.served
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let login = parsed
        .get("login")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let key = format!("{method} user/manage {login}");
    let fault = emu.faults.apply(&key).await;
    if let Err(r) = fault {
        let status = r.status().as_u16();
        let mut data = emu.data();
        if data.record_events {
            data.events.push(Event {
                method: method.to_string(),
                path: "user/manage".into(),
                login: login.clone(),
                status,
                summary: "injected fault".into(),
            });
        }
        return r;
    }
    let (status, out) = user_inner(&emu, &method, &parsed, &login);
    let response = finish(&emu, &method, "user/manage", &login, status, out);
    if let Ok(Some(Fault::LoseAnswer(hold))) = fault {
        tokio::time::sleep(hold).await;
    }
    response
}

fn user_inner(
    emu: &VmsEmulator,
    method: &Method,
    body: &Value,
    login: &str,
) -> (StatusCode, Value) {
    let mut data = emu.data();
    if login.is_empty() {
        return invalid(
            "The login field is required.",
            "login",
            "The login field is required.",
        );
    }
    if data.force_422.contains(login) {
        return invalid(
            "The given data was invalid.",
            "status",
            "The selected status is invalid.",
        );
    }
    if let Some(p) = body.get("password") {
        match p.as_str() {
            Some(p) if p.chars().count() <= 100 => {}
            _ => {
                return invalid(
                    "The given data was invalid.",
                    "password",
                    "The password may not be greater than 100 characters.",
                )
            }
        }
    }
    if let Some(s) = body.get("status") {
        if !matches!(s.as_str(), Some("active") | Some("blocked")) {
            return invalid(
                "The given data was invalid.",
                "status",
                "The selected status is invalid.",
            );
        }
    }
    match *method {
        Method::POST => {
            if data.users.contains_key(login) {
                return invalid(
                    "The login has already been taken.",
                    "login",
                    "The login has already been taken.",
                );
            }
            let Some(t) = body.get("type").and_then(Value::as_str) else {
                return invalid(
                    "The type field is required.",
                    "type",
                    "The type field is required.",
                );
            };
            if t.chars().count() > 50 || !data.allowed_types.iter().any(|a| a == t) {
                return invalid(
                    "The given data was invalid.",
                    "type",
                    "The selected type is invalid.",
                );
            }
            if body.get("password").is_none() {
                return invalid(
                    "The password field is required.",
                    "password",
                    "The password field is required.",
                );
            }
            let id = data.next_id;
            data.next_id += 1;
            let u = VmsUser {
                id,
                login: login.into(),
                user_type: t.into(),
                status: body
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("active")
                    .into(),
                billing_info: body.get("billing_info").cloned().unwrap_or(Value::Null),
                properties: properties_of(body),
                permissions: DEFAULT_PERMISSIONS.iter().map(|p| p.to_string()).collect(),
            };
            let out = user_json(&u);
            data.users.insert(login.into(), u);
            (StatusCode::OK, out)
        }
        Method::PATCH => {
            let (Ok(attach), Ok(detach)) = (
                str_list(body.get("permissions_to_attach")),
                str_list(body.get("permissions_to_detach")),
            ) else {
                return invalid(
                    "The given data was invalid.",
                    "permissions_to_attach",
                    "must be an array of names",
                );
            };
            let Some(u) = data.users.get_mut(login) else {
                return invalid(
                    "The selected login is invalid.",
                    "login",
                    "The selected login is invalid.",
                );
            };
            if let Some(s) = body.get("status").and_then(Value::as_str) {
                u.status = s.into();
            }
            if let Some(b) = body.get("billing_info") {
                u.billing_info = b.clone();
            }
            if body.get("billing_properties").is_some() || body.get("properties").is_some() {
                u.properties = properties_of(body);
            }
            u.permissions.extend(attach);
            for d in detach {
                u.permissions.remove(&d);
            }
            (StatusCode::OK, user_json(u))
        }
        Method::DELETE => match data.users.remove(login) {
            Some(_) => (StatusCode::NO_CONTENT, Value::Null),
            None => invalid(
                "The selected login is invalid.",
                "login",
                "The selected login is invalid.",
            ),
        },
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"message": "Method not allowed"}),
        ),
    }
}

async fn tree(
    State(emu): State<Arc<VmsEmulator>>,
    method: Method,
    body: axum::body::Bytes,
) -> Response {
    emu.served
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let ext = parsed
        .get("external_id")
        .map(|v| {
            v.as_str()
                .map(String::from)
                .unwrap_or_else(|| v.to_string())
        })
        .unwrap_or_default();
    if let Err(r) = emu.faults.apply(&format!("{method} tree {ext}")).await {
        return r;
    }
    let (status, out) = {
        let mut data = emu.data();
        let kind = parsed.get("type").and_then(Value::as_str).unwrap_or("");
        let name = parsed.get("name").and_then(Value::as_str).unwrap_or("");
        let valid_kind = ["cameras", "intercoms", "camera_intercom"].contains(&kind);
        match method {
            Method::GET => {
                let all: Vec<Value> = data
                    .tree
                    .iter()
                    .map(|t| json!({"id": t.id, "name": t.name, "type": t.kind, "external_id": t.external_id}))
                    .collect();
                (StatusCode::OK, Value::Array(all))
            }
            Method::POST if !valid_kind => invalid(
                "The given data was invalid.",
                "type",
                "The selected type is invalid.",
            ),
            Method::POST if name.is_empty() => {
                invalid("The name field is required.", "name", "required")
            }
            Method::POST if data.tree.iter().any(|t| t.external_id == ext) => invalid(
                "The given data was invalid.",
                "external_id",
                "The external id has already been taken.",
            ),
            Method::POST => {
                let id = data.next_id;
                data.next_id += 1;
                data.tree.push(TreeElement {
                    id,
                    name: name.into(),
                    kind: kind.into(),
                    external_id: ext.clone(),
                });
                (
                    StatusCode::CREATED,
                    json!({"id": id, "name": name, "external_id": ext, "has_items": false}),
                )
            }
            Method::PATCH => match data.tree.iter_mut().find(|t| t.external_id == ext) {
                Some(t) if !name.is_empty() => {
                    t.name = name.into();
                    (
                        StatusCode::OK,
                        json!({"id": t.id, "name": t.name, "external_id": t.external_id, "has_items": false}),
                    )
                }
                Some(_) => invalid("The name field is required.", "name", "required"),
                None => invalid(
                    "The given data was invalid.",
                    "external_id",
                    "The selected external id is invalid.",
                ),
            },
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"message": "Method not allowed"}),
            ),
        }
    };
    finish(&emu, &method, "tree", &ext, status, out)
}
