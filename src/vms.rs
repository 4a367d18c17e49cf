//! The AIPIX VMS Billing API client: user create/update/delete, tree
//! elements and camera access (`cameras.rs`), Laravel 422 decoding,
//! transient/permanent classes, Retry-After.

mod cameras;
pub use cameras::VisibleCamera;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::distr::{Alphanumeric, SampleString};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;
use serde_json::{json, Map, Value};
use url::Url;

use crate::config::VmsSettings;
use crate::core::model::UserState;
use crate::http::{self, ErrorClass};
use crate::telemetry::{metrics, redact};

const USER_PATH: &str = "api/v1/billing/user/manage";
const TREE_PATH: &str = "api/v1/billing/tree";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmsOp {
    Create,
    Update,
    Delete,
    TreeCreate,
    TreeUpdate,
    Cameras,
}

impl VmsOp {
    pub fn as_str(self) -> &'static str {
        match self {
            VmsOp::Create => "create",
            VmsOp::Update => "update",
            VmsOp::Delete => "delete",
            VmsOp::TreeCreate => "tree_create",
            VmsOp::TreeUpdate => "tree_update",
            VmsOp::Cameras => "cameras",
        }
    }
}

/// Whose fault a VMS error is (SPEC §9.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// An answer about this user's data: 422, or 400 with Laravel's shape.
    Login,
    /// The channel refused or failed (auth, allow-list, proxy, outage, junk,
    /// no answer): never one user's fault, and it heals by itself.
    Channel,
    /// Nothing was sent (breaker open, stopping): nobody's fault.
    NotSent,
}

/// The one classifier of VMS answers that are not a confirmation.
pub fn blame_of(status: Option<u16>, laravel_body: bool) -> Blame {
    match status {
        Some(422) => Blame::Login,
        Some(400) if laravel_body => Blame::Login,
        _ => Blame::Channel,
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct VmsError {
    /// Transient: worth retrying within the cycle.
    pub class: ErrorClass,
    pub blame: Blame,
    pub status: Option<u16>,
    pub message: String,
    /// Laravel's `errors` map from a 422.
    pub errors: BTreeMap<String, Vec<String>>,
    pub retry_after: Option<Duration>,
}

impl VmsError {
    pub fn is_transient(&self) -> bool {
        self.class == ErrorClass::Transient
    }

    /// A 422 naming `login`: taken (on create) or unknown (on update).
    pub fn is_login_error(&self) -> bool {
        self.status == Some(422) && self.errors.contains_key("login")
    }

    /// An answer about the user's data (quarantines), not a refusal.
    pub fn blames_login(&self) -> bool {
        self.blame == Blame::Login
    }

    /// A transient channel failure: no answer, or not one we can trust.
    pub fn transient(message: String, status: Option<u16>) -> Self {
        Self {
            class: ErrorClass::Transient,
            blame: Blame::Channel,
            status,
            message: redact::scrub(&message),
            errors: BTreeMap::new(),
            retry_after: None,
        }
    }
}

impl From<http::FetchError> for VmsError {
    fn from(e: http::FetchError) -> Self {
        Self {
            class: e.class,
            blame: Blame::Channel,
            status: e.status,
            message: e.message,
            errors: BTreeMap::new(),
            retry_after: e.retry_after,
        }
    }
}

/// A random password: 24 characters from a CSPRNG (`rand::rng()` is a
/// ChaCha generator seeded from the OS). Never logged, never stored.
pub fn random_password() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 24)
}

pub struct VmsClient {
    http: reqwest::Client,
    base: Url,
    properties_field: String,
    tree_type: String,
    camera_format: crate::config::CameraFormat,
}

impl VmsClient {
    pub fn new(cfg: &VmsSettings) -> anyhow::Result<Self> {
        let mut headers = HeaderMap::new();
        headers.insert("accept", HeaderValue::from_static("application/json"));
        for (name, value) in &cfg.headers {
            let value = value.expose().unwrap_or_default();
            let mut v = HeaderValue::from_str(value)
                .map_err(|_| anyhow::anyhow!("vms.headers.{name}: not a valid header value"))?;
            v.set_sensitive(true);
            headers.insert(HeaderName::from_bytes(name.as_bytes())?, v);
        }
        let http = http::build_client(http::ClientOptions {
            timeout: Duration::from_secs(cfg.timeout_secs),
            ca_file: &cfg.ca_file,
            insecure: cfg.insecure_skip_tls_verify,
            headers,
            pool_size: cfg.concurrency as usize,
        })?;
        let base = http::base_url(&cfg.url)?;
        Ok(Self {
            http,
            base,
            properties_field: cfg.properties_field.clone(),
            tree_type: cfg.tree.kind.clone(),
            camera_format: cfg.cameras.format,
        })
    }

    fn properties(&self, state: &UserState) -> Value {
        Value::Array(
            state
                .properties
                .iter()
                .map(|(t, v)| json!({"type": t, "value": v}))
                .collect(),
        )
    }

    fn billing_info(state: &UserState) -> Value {
        json!({"billing_id": state.billing_id, "billing_extra": []})
    }

    pub async fn create(&self, login: &str, state: &UserState) -> Result<(), VmsError> {
        let mut body = Map::new();
        body.insert("login".into(), json!(login));
        body.insert("password".into(), json!(random_password()));
        body.insert("type".into(), json!(state.user_type));
        body.insert("status".into(), json!(state.status));
        body.insert("billing_info".into(), Self::billing_info(state));
        body.insert(self.properties_field.clone(), self.properties(state));
        let expect = Expect::User(login);
        self.send(
            VmsOp::Create,
            Method::POST,
            USER_PATH,
            Value::Object(body),
            expect,
        )
        .await
    }

    /// The full profile, and the permission changes when there are any.
    pub async fn update(
        &self,
        login: &str,
        state: &UserState,
        attach: &BTreeSet<String>,
        detach: &BTreeSet<String>,
    ) -> Result<(), VmsError> {
        let mut body = Map::new();
        body.insert("login".into(), json!(login));
        body.insert("status".into(), json!(state.status));
        body.insert("billing_info".into(), Self::billing_info(state));
        body.insert(self.properties_field.clone(), self.properties(state));
        if !attach.is_empty() {
            body.insert("permissions_to_attach".into(), json!(attach));
        }
        if !detach.is_empty() {
            body.insert("permissions_to_detach".into(), json!(detach));
        }
        let expect = Expect::User(login);
        self.send(
            VmsOp::Update,
            Method::PATCH,
            USER_PATH,
            Value::Object(body),
            expect,
        )
        .await
    }

    pub async fn delete(&self, login: &str) -> Result<(), VmsError> {
        let body = json!({"login": login});
        self.send(
            VmsOp::Delete,
            Method::DELETE,
            USER_PATH,
            body,
            Expect::Deleted,
        )
        .await
    }

    pub async fn tree_create(&self, name: &str, external_id: &str) -> Result<(), VmsError> {
        let body = json!({"name": name, "type": self.tree_type, "external_id": external_id});
        let expect = Expect::Element(external_id);
        self.send(VmsOp::TreeCreate, Method::POST, TREE_PATH, body, expect)
            .await
    }

    pub async fn tree_update(&self, name: &str, external_id: &str) -> Result<(), VmsError> {
        let body = json!({"name": name, "type": self.tree_type, "external_id": external_id});
        let expect = Expect::Element(external_id);
        self.send(VmsOp::TreeUpdate, Method::PATCH, TREE_PATH, body, expect)
            .await
    }

    async fn send(
        &self,
        op: VmsOp,
        method: Method,
        path: &str,
        body: Value,
        expect: Expect<'_>,
    ) -> Result<(), VmsError> {
        let url = self
            .base
            .join(path)
            .map_err(|e| VmsError::transient(format!("bad VMS URL: {e}"), None))?;
        let result = http::send(self.http.request(method.clone(), url).json(&body)).await;
        let code = match &result {
            Ok((status, _, _)) => status.to_string(),
            Err(_) => "error".to_string(),
        };
        metrics::get()
            .vms_requests
            .get_or_create(&metrics::OpCode {
                op: op.as_str().into(),
                code,
            })
            .inc();
        let (status, headers, bytes) = result.map_err(VmsError::from)?;
        if !(200..300).contains(&status) {
            return Err(decode_error(status, &headers, &bytes));
        }
        if expect.confirmed_by(status, &bytes) {
            return Ok(());
        }
        let text = format!(
            "unconfirmed: HTTP {status} with {}",
            http::describe_body(&bytes)
        );
        tracing::warn!(op = op.as_str(), "{text}");
        Err(VmsError::transient(text, Some(status)))
    }
}

/// What answer proves a request applied (SPEC §9.2).
#[derive(Debug, Clone, Copy)]
pub enum Expect<'a> {
    /// The user object for this login, at the top level or under `data`.
    User(&'a str),
    /// 200 or 204.
    Deleted,
    /// 204, or a 2xx with the user object for this login.
    Synced(&'a str),
    /// The tree element: its `external_id` or `id`.
    Element(&'a str),
}

impl Expect<'_> {
    pub fn confirmed_by(self, status: u16, body: &[u8]) -> bool {
        match self {
            Expect::Deleted => status == 200 || status == 204,
            Expect::Synced(login) => {
                status == 204 || Expect::User(login).confirmed_by(status, body)
            }
            Expect::User(login) => answer_object(body)
                .and_then(|o| o.get("login")?.as_str().map(|l| same_login(l, login)))
                .unwrap_or(false),
            Expect::Element(external_id) => answer_object(body).is_some_and(|o| {
                let ext = o.get("external_id").and_then(crate::sources::json_text);
                ext.as_deref() == Some(external_id) || o.get("id").is_some_and(|id| !id.is_null())
            }),
        }
    }
}

/// The answer's object: at the top level, or under `data`.
fn answer_object(body: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice::<Value>(body).ok()? {
        Value::Object(mut top) => match top.remove("data") {
            Some(Value::Object(inner)) => Some(inner),
            Some(other) => {
                top.insert("data".into(), other);
                Some(top)
            }
            None => Some(top),
        },
        _ => None,
    }
}

fn same_login(a: &str, b: &str) -> bool {
    a.trim().to_lowercase() == b.trim().to_lowercase()
}

/// Non-2xx answers: Laravel's 422 `{message, errors}`, 429 with
/// `Retry-After`, 408/5xx transient, other 4xx permanent.
pub fn decode_error(status: u16, headers: &HeaderMap, body: &[u8]) -> VmsError {
    let class = http::classify_status(status);
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v.get("message"))
        .and_then(Value::as_str)
        .map(|m| m.chars().take(300).collect::<String>());
    let mut errors = BTreeMap::new();
    if let Some(Value::Object(map)) = parsed.as_ref().and_then(|v| v.get("errors")) {
        for (k, v) in map.iter().take(50) {
            let reasons = match v {
                Value::Array(a) => a
                    .iter()
                    .take(5)
                    .map(|r| {
                        r.as_str()
                            .map(String::from)
                            .unwrap_or_else(|| r.to_string())
                    })
                    .collect(),
                Value::String(s) => vec![s.clone()],
                other => vec![other.to_string()],
            };
            errors.insert(k.clone(), reasons);
        }
    }
    let mut text = format!("HTTP {status}");
    match &message {
        Some(m) => text.push_str(&format!(": {m}")),
        None if parsed.is_none() => text.push_str(&format!(" with {}", http::describe_body(body))),
        None => {}
    }
    for (k, reasons) in &errors {
        text.push_str(&format!("; {k}: {}", reasons.join(", ")));
    }
    let laravel = message.is_some() && !errors.is_empty();
    VmsError {
        class,
        blame: blame_of(Some(status), laravel),
        status: Some(status),
        message: redact::scrub(&text),
        errors,
        retry_after: http::retry_after(headers),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laravel_422_is_decoded() {
        let body = br#"{"message":"The given data was invalid.","errors":{"login":["The login has already been taken."],"type":["bad"]}}"#;
        let e = decode_error(422, &HeaderMap::new(), body);
        assert!(!e.is_transient());
        assert!(e.is_login_error());
        assert!(e.message.contains("already been taken"), "{}", e.message);
        let e = decode_error(
            422,
            &HeaderMap::new(),
            br#"{"message":"x","errors":{"type":["too long"]}}"#,
        );
        assert!(!e.is_login_error());
    }

    #[test]
    fn statuses_are_classified() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("12"));
        let e = decode_error(429, &h, b"{}");
        assert!(e.is_transient());
        assert_eq!(e.retry_after, Some(Duration::from_secs(12)));
        assert!(decode_error(502, &HeaderMap::new(), b"<html>bad gateway</html>").is_transient());
        assert!(decode_error(408, &HeaderMap::new(), b"").is_transient());
        assert!(!decode_error(403, &HeaderMap::new(), b"forbidden").is_transient());
        assert!(!decode_error(400, &HeaderMap::new(), b"{}").is_transient());
        // Only answers about the data blame the login (SPEC §9.3).
        assert_eq!(
            decode_error(403, &HeaderMap::new(), b"forbidden").blame,
            Blame::Channel
        );
        assert_eq!(
            decode_error(400, &HeaderMap::new(), b"{}").blame,
            Blame::Channel
        );
        let laravel = br#"{"message":"bad","errors":{"type":["x"]}}"#;
        assert_eq!(
            decode_error(400, &HeaderMap::new(), laravel).blame,
            Blame::Login
        );
        assert_eq!(
            decode_error(422, &HeaderMap::new(), b"").blame,
            Blame::Login
        );
    }

    #[test]
    fn only_the_user_object_confirms_a_user_write() {
        let user = Expect::User("Ann@x.example");
        assert!(user.confirmed_by(200, br#"{"id":1,"login":"ann@x.example"}"#));
        assert!(user.confirmed_by(201, br#"{"data":{"login":" ANN@X.example "}}"#));
        for junk in [
            &b"{}"[..],
            br#"{"message":"Server Error"}"#,
            br#"{"login":"bob@x.example"}"#,
            br#"{"data":[{"login":"ann@x.example"}]}"#,
            b"<html>ok</html>",
            b"",
            b"null",
        ] {
            assert!(
                !user.confirmed_by(200, junk),
                "{}",
                String::from_utf8_lossy(junk)
            );
        }
        assert!(Expect::Deleted.confirmed_by(204, b""));
        assert!(Expect::Deleted.confirmed_by(200, b"{}"));
        assert!(!Expect::Deleted.confirmed_by(202, b"{}"));
        let element = Expect::Element("bm-1");
        assert!(element.confirmed_by(201, br#"{"id":7,"external_id":"bm-1"}"#));
        assert!(element.confirmed_by(200, br#"{"data":{"external_id":"bm-1"}}"#));
        assert!(!element.confirmed_by(200, br#"{"status":"ok"}"#));
    }

    #[test]
    fn passwords_are_random_and_long_enough() {
        let a = random_password();
        let b = random_password();
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
