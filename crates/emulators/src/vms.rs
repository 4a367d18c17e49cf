//! An AIPIX VMS Billing API emulator: users by login with status, type,
//! billing_info, properties and permissions; Laravel 422s (duplicate login,
//! unknown login, invalid fields); tree elements; camera access by public
//! group (ids or 25.06 objects, replaced or merged) and its read-back;
//! injected faults.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
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
    /// Public camera groups (external ids) the user sees; never rendered in
    /// `user/manage` answers.
    pub camera_groups: BTreeSet<String>,
}

/// How `user/manage/cameras` treats the user's current groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CamerasMode {
    /// The set becomes exactly the active entries sent.
    #[default]
    Replace,
    /// Active entries are added, `blocked` objects removed; bare ids never
    /// remove.
    Merge,
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
    pub cameras_mode: CamerasMode,
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
                cameras_mode: CamerasMode::Replace,
                next_id: 1,
            }),
            faults: Faults::default(),
            served: Default::default(),
        })
    }

    /// A tree element made by hand (not through the API).
    pub fn add_tree_element(&self, external_id: &str, name: &str, kind: &str) {
        let mut data = self.data();
        let id = data.next_id;
        data.next_id += 1;
        data.tree.push(TreeElement {
            id,
            name: name.into(),
            kind: kind.into(),
            external_id: external_id.into(),
        });
    }

    /// Requests received, faults included (counted even with events off).
    pub fn served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn serve(self: &Arc<Self>) -> std::io::Result<Server> {
        let router = Router::new()
            .route("/api/v1/billing/user/manage", any(user))
            .route("/api/v1/billing/tree", any(tree))
            .route("/api/v1/billing/user/manage/cameras", post(cameras))
            .route("/api/v1/billing/cameras/list", get(camera_list))
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

/// Records a request answered by an injected fault.
fn record_fault(emu: &VmsEmulator, method: &str, path: &str, login: &str, r: &Response) {
    let mut data = emu.data();
    if data.record_events {
        data.events.push(Event {
            method: method.into(),
            path: path.into(),
            login: login.into(),
            status: r.status().as_u16(),
            summary: "injected fault".into(),
        });
    }
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
        record_fault(&emu, method.as_str(), "user/manage", &login, &r);
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
                camera_groups: BTreeSet::new(),
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

fn unknown_login() -> (StatusCode, Value) {
    invalid(
        "The selected login is invalid.",
        "login",
        "The selected login is invalid.",
    )
}

/// The 422 that a missing or refused login gets on any call.
fn login_error(data: &VmsData, login: &str) -> Option<(StatusCode, Value)> {
    if login.is_empty() {
        return Some(invalid(
            "The login field is required.",
            "login",
            "The login field is required.",
        ));
    }
    if data.force_422.contains(login) {
        return Some(invalid(
            "The given data was invalid.",
            "status",
            "The selected status is invalid.",
        ));
    }
    if !data.users.contains_key(login) {
        return Some(unknown_login());
    }
    None
}

/// One entry of `public_group_external_ids`.
#[derive(Debug, Clone, PartialEq)]
enum GroupEntry {
    /// A bare external id (23.09+).
    Bare(String),
    /// `{external_id, status: "active"}` (25.06+).
    Active(String),
    /// `{external_id, status: "blocked"}` (25.06+).
    Blocked(String),
}

fn group_entry(e: &Value) -> Option<GroupEntry> {
    if let Some(id) = e.as_str() {
        return Some(GroupEntry::Bare(id.into()));
    }
    let id = e.get("external_id")?.as_str()?.to_string();
    match e.get("status").and_then(Value::as_str) {
        Some("active") => Some(GroupEntry::Active(id)),
        Some("blocked") => Some(GroupEntry::Blocked(id)),
        _ => None,
    }
}

/// The entries sent; absent or null is an empty list.
fn group_entries(v: Option<&Value>) -> Result<Vec<GroupEntry>, (StatusCode, Value)> {
    let list = match v {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(invalid(
                "The given data was invalid.",
                "public_group_external_ids",
                "The public group external ids must be an array.",
            ))
        }
    };
    list.iter()
        .enumerate()
        .map(|(i, e)| {
            group_entry(e).ok_or_else(|| {
                let field = format!("public_group_external_ids.{i}");
                invalid(
                    "The given data was invalid.",
                    &field,
                    "The entry is invalid.",
                )
            })
        })
        .collect()
}

fn apply_groups(set: &mut BTreeSet<String>, entries: Vec<GroupEntry>, mode: CamerasMode) {
    if mode == CamerasMode::Replace {
        set.clear();
    }
    for e in entries {
        match e {
            GroupEntry::Bare(id) | GroupEntry::Active(id) => {
                set.insert(id);
            }
            GroupEntry::Blocked(id) => {
                set.remove(&id);
            }
        }
    }
}

fn cameras_inner(emu: &VmsEmulator, body: &Value, login: &str) -> (StatusCode, Value) {
    let mut data = emu.data();
    if let Some(e) = login_error(&data, login) {
        return e;
    }
    let entries = match group_entries(body.get("public_group_external_ids")) {
        Ok(e) => e,
        Err(e) => return e,
    };
    let mode = data.cameras_mode;
    let Some(u) = data.users.get_mut(login) else {
        return unknown_login();
    };
    apply_groups(&mut u.camera_groups, entries, mode);
    (StatusCode::NO_CONTENT, Value::Null)
}

/// `POST user/manage/cameras {login, public_group_external_ids}`: 204.
async fn cameras(State(emu): State<Arc<VmsEmulator>>, body: axum::body::Bytes) -> Response {
    emu.served
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let login = parsed
        .get("login")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let path = "user/manage/cameras";
    let fault = emu.faults.apply(&format!("POST {path} {login}")).await;
    if let Err(r) = fault {
        record_fault(&emu, "POST", path, &login, &r);
        return r;
    }
    let (status, out) = cameras_inner(&emu, &parsed, &login);
    let response = finish(&emu, &Method::POST, path, &login, status, out);
    if let Ok(Some(Fault::LoseAnswer(hold))) = fault {
        tokio::time::sleep(hold).await;
    }
    response
}

/// One camera per group the user sees, or `null` for none.
fn camera_list_inner(emu: &VmsEmulator, login: &str, empty: bool) -> (StatusCode, Value) {
    let data = emu.data();
    if let Some(e) = login_error(&data, login) {
        return e;
    }
    let groups = match data.users.get(login) {
        Some(u) if !empty => &u.camera_groups,
        _ => return (StatusCode::OK, Value::Null),
    };
    if groups.is_empty() {
        return (StatusCode::OK, Value::Null);
    }
    let cams: Vec<Value> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            json!({"id": i + 1, "external_id": format!("cam-{g}"), "name": format!("Camera {g}"),
                   "status": "active", "group_type": "public", "group_external_id": g})
        })
        .collect();
    (StatusCode::OK, Value::Array(cams))
}

/// `GET cameras/list?login=L`.
async fn camera_list(
    State(emu): State<Arc<VmsEmulator>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    emu.served
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let login = q.get("login").cloned().unwrap_or_default();
    let path = "cameras/list";
    let fault = match emu.faults.apply(&format!("GET {path} {login}")).await {
        Ok(f) => f,
        Err(r) => {
            record_fault(&emu, "GET", path, &login, &r);
            return r;
        }
    };
    let empty = fault == Some(Fault::EmptyListing);
    let (status, out) = camera_list_inner(&emu, &login, empty);
    finish(&emu, &Method::GET, path, &login, status, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(set: &BTreeSet<String>) -> Vec<&str> {
        set.iter().map(String::as_str).collect()
    }

    #[test]
    fn camera_groups_replace_or_merge() {
        let body = json!(["a", {"external_id": "b", "status": "active"},
                          {"external_id": "c", "status": "blocked"}]);
        let entries = group_entries(Some(&body)).unwrap();
        let start: BTreeSet<String> = ["c", "d"].iter().map(|s| s.to_string()).collect();
        let mut set = start.clone();
        apply_groups(&mut set, entries.clone(), CamerasMode::Replace);
        assert_eq!(ids(&set), ["a", "b"]);
        let mut set = start;
        apply_groups(&mut set, entries, CamerasMode::Merge);
        assert_eq!(ids(&set), ["a", "b", "d"]);
        assert!(group_entries(Some(&json!([{"external_id": "x"}]))).is_err());
        assert!(group_entries(Some(&json!("x"))).is_err());
        assert!(group_entries(None).unwrap().is_empty());
    }

    #[tokio::test]
    async fn cameras_need_a_known_login_and_list_back() {
        let emu = VmsEmulator::new();
        let body = json!({"login": "u1", "public_group_external_ids": ["g1"]}).to_string();
        let r = cameras(State(emu.clone()), body.clone().into()).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let create = json!({"login": "u1", "type": "b2c", "password": "p"});
        assert_eq!(
            user_inner(&emu, &Method::POST, &create, "u1").0,
            StatusCode::OK
        );
        let (_, v) = camera_list_inner(&emu, "u1", false);
        assert_eq!(v, Value::Null);
        let r = cameras(State(emu.clone()), body.into()).await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let (_, v) = camera_list_inner(&emu, "u1", false);
        assert_eq!(v[0]["external_id"], "cam-g1");
        assert!(!user_json(&emu.user("u1").unwrap())
            .to_string()
            .contains("g1"));
        assert_eq!(emu.count_for("POST", "u1"), 2);
    }
}
