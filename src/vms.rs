//! The AIPIX VMS Billing API client: user create/update/delete and tree
//! elements, Laravel 422 decoding, transient/permanent classes, Retry-After.

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
}

impl VmsOp {
    pub fn as_str(self) -> &'static str {
        match self {
            VmsOp::Create => "create",
            VmsOp::Update => "update",
            VmsOp::Delete => "delete",
            VmsOp::TreeCreate => "tree_create",
            VmsOp::TreeUpdate => "tree_update",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct VmsError {
    pub class: ErrorClass,
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

    fn transient(message: String, status: Option<u16>) -> Self {
        Self {
            class: ErrorClass::Transient,
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
        self.send(VmsOp::Create, Method::POST, USER_PATH, Value::Object(body))
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
        self.send(VmsOp::Update, Method::PATCH, USER_PATH, Value::Object(body))
            .await
    }

    pub async fn delete(&self, login: &str) -> Result<(), VmsError> {
        self.send(
            VmsOp::Delete,
            Method::DELETE,
            USER_PATH,
            json!({"login": login}),
        )
        .await
    }

    pub async fn tree_create(&self, name: &str, external_id: &str) -> Result<(), VmsError> {
        let body = json!({"name": name, "type": self.tree_type, "external_id": external_id});
        self.send(VmsOp::TreeCreate, Method::POST, TREE_PATH, body)
            .await
    }

    pub async fn tree_update(&self, name: &str, external_id: &str) -> Result<(), VmsError> {
        let body = json!({"name": name, "type": self.tree_type, "external_id": external_id});
        self.send(VmsOp::TreeUpdate, Method::PATCH, TREE_PATH, body)
            .await
    }

    async fn send(
        &self,
        op: VmsOp,
        method: Method,
        path: &str,
        body: Value,
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
        if (200..300).contains(&status) {
            // A 2xx that is not the API's JSON came from something in between.
            if method != Method::DELETE && status != 204 {
                let parsed = http::parse_json(&bytes).map_err(VmsError::from)?;
                if !parsed.is_object() && !parsed.is_array() {
                    return Err(VmsError::transient(
                        format!("HTTP {status} with {}", http::describe_body(&bytes)),
                        Some(status),
                    ));
                }
            }
            return Ok(());
        }
        Err(decode_error(status, &headers, &bytes))
    }
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
    VmsError {
        class,
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
