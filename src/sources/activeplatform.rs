//! ActivePlatform vendor API v1 reader (and the one write-back call).
//! `api_token` travels in the query, so no URL of ours is ever logged raw.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use serde_json::{Map, Value};
use url::Url;

use async_trait::async_trait;

use super::{
    json_text, with_retry, BadRow, BillingSource, Details, ListedAccount, ListedPayment, Listing,
    PaymentListing, ServiceListing, WriteBack,
};
use crate::config::{ActivePlatformSettings, Secret};
use crate::core::entitlements::RawService;
use crate::core::model::{PaymentState, RawAccount, RawPayment, SourceKind};
use crate::http::{self, FetchError};
use crate::telemetry::metrics;

const MAX_PAGES: u32 = 100_000;

pub struct ActivePlatformClient {
    http: reqwest::Client,
    base: Url,
    token: Secret,
    page_size: u32,
    writeback_attribute: Option<String>,
    /// Whether subscriptions are read (SPEC §12.1).
    services: bool,
    /// Plan names by plan id, each kept for a re-verification period.
    plans: std::sync::Mutex<HashMap<String, (String, Instant)>>,
}

/// How long a plan name is trusted before it is read again.
const PLAN_NAME_TTL: Duration = Duration::from_secs(24 * 3600);

impl ActivePlatformClient {
    pub fn new(cfg: &ActivePlatformSettings) -> anyhow::Result<Self> {
        let http = http::build_client(http::ClientOptions {
            timeout: Duration::from_secs(cfg.common.timeout_secs),
            ca_file: &cfg.common.ca_file,
            insecure: cfg.common.insecure_skip_tls_verify,
            headers: Default::default(),
            pool_size: 4,
        })?;
        let base = http::base_url(&cfg.common.url)?;
        Ok(Self {
            http,
            base,
            token: cfg.api_token.clone(),
            page_size: cfg.page_size,
            writeback_attribute: Some(cfg.writeback_attribute.clone()).filter(|a| !a.is_empty()),
            services: cfg.services.enabled,
            plans: Default::default(),
        })
    }

    fn endpoint(&self, path: &str) -> Result<Url, FetchError> {
        self.base
            .join(path)
            .map_err(|e| FetchError::permanent(format!("bad ActivePlatform path {path}: {e}")))
    }

    fn token(&self) -> String {
        self.token.expose().unwrap_or_default().to_string()
    }

    async fn request(&self, req: reqwest::RequestBuilder) -> Result<Value, FetchError> {
        let outcome = match http::send(req).await {
            Err(e) => Err(e),
            Ok((status, headers, body)) => {
                if (200..300).contains(&status) {
                    http::parse_json(&body)
                } else {
                    let msg = format!("HTTP {status} with {}", http::describe_body(&body));
                    let mut e = match http::classify_status(status) {
                        http::ErrorClass::Transient => FetchError::transient(msg),
                        http::ErrorClass::Permanent if (300..400).contains(&status) => {
                            FetchError::transient(msg)
                        }
                        http::ErrorClass::Permanent => FetchError::permanent(msg),
                    }
                    .with_status(status);
                    e.retry_after = http::retry_after(&headers);
                    Err(e)
                }
            }
        };
        metrics::get().source_request(SourceKind::Activeplatform, outcome.is_ok());
        outcome
    }

    async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, FetchError> {
        let url = self.endpoint(path)?;
        let mut q: Vec<(&str, String)> = vec![("api_token", self.token())];
        q.extend(query.iter().cloned());
        self.request(self.http.get(url).query(&q)).await
    }

    async fn page_all<T>(
        &self,
        path: &str,
        extra: &[(&str, String)],
        progress: &(dyn Fn(usize) + Sync),
        max_pages: u32,
        mut decode: impl FnMut(&Map<String, Value>, String) -> T,
    ) -> Result<(Vec<T>, Vec<BadRow>, u32), FetchError> {
        let mut seen = HashSet::new();
        let mut out = vec![];
        let mut bad = vec![];
        let mut page = 1u32;
        let mut requests = 0;
        loop {
            let mut q = vec![
                ("page", page.to_string()),
                ("per_page", self.page_size.to_string()),
            ];
            q.extend(extra.iter().cloned());
            // The decode is inside the retry: a proxy's odd body is transient.
            let rows = with_retry(|| async { list_envelope(self.get(path, &q).await?) }).await?;
            requests += 1;
            // An empty page ends the listing (API-NOTES).
            if rows.is_empty() {
                break;
            }
            let mut repeated = 0;
            for row in rows {
                let Value::Object(obj) = row else {
                    bad.push(BadRow {
                        id: String::new(),
                        reason: "list row is not an object".into(),
                    });
                    continue;
                };
                let Some(id) = obj
                    .get("id")
                    .and_then(json_text)
                    .filter(|s| !s.trim().is_empty())
                else {
                    bad.push(BadRow {
                        id: String::new(),
                        reason: "list row without id".into(),
                    });
                    continue;
                };
                let id = id.trim().to_string();
                if seen.insert(id.clone()) {
                    out.push(decode(&obj, id));
                } else {
                    repeated += 1;
                }
            }
            progress(seen.len());
            // A server that ignores `page` repeats itself: what it listed
            // cannot be proved complete (SPEC §9.4).
            if repeated > 0 {
                return Err(FetchError::transient(format!(
                    "{path}: page {page} repeats {repeated} rows already listed \
                     (the server ignores paging?); the listing is incomplete"
                )));
            }
            if page >= max_pages {
                if max_pages < MAX_PAGES {
                    break;
                }
                return Err(FetchError::transient(format!(
                    "{path}: gave up after {page} pages; the listing is incomplete"
                )));
            }
            page += 1;
        }
        Ok((out, bad, requests))
    }
}

impl ActivePlatformClient {
    /// A plan's name: from the cache while fresh, else `plans/{id}.json`.
    /// A plan's name: from the cache while fresh, else `plans/{id}.json`;
    /// when that cannot be read, the name last read (stale is better than
    /// none). `None`: no name can be had.
    async fn plan_name(&self, id: &str) -> Option<String> {
        let cached = (self.plans.lock().unwrap_or_else(|e| e.into_inner()))
            .get(id)
            .cloned();
        if let Some((name, _)) = cached
            .clone()
            .filter(|(_, at)| at.elapsed() < PLAN_NAME_TTL)
        {
            return Some(name);
        }
        let path = format!("api/vendor/v1/plans/{}.json", urlencode(id));
        let read = with_retry(|| self.get(&path, &[])).await.ok();
        let name = read.as_ref().and_then(|doc| {
            let plan = doc.get("plan").unwrap_or(doc);
            plan.get("name").and_then(json_text)
        });
        match name {
            Some(n) => {
                let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
                plans.insert(id.to_string(), (n.clone(), Instant::now()));
                Some(n)
            }
            None => cached.map(|(name, _)| name),
        }
    }

    /// Each row's plan name. A row whose plan has no name to be had is
    /// unreadable (reported; it keeps what it had): a rule on plan names
    /// must not stop matching because the catalogue did not answer.
    async fn with_plan_names(&self, rows: Vec<RawService>) -> ServiceListing {
        let mut out = ServiceListing::default();
        for mut row in rows {
            let Some(id) = row.plan_id.clone() else {
                out.services.push(row);
                continue;
            };
            match self.plan_name(&id).await {
                Some(name) => {
                    row.plan_name = Some(name);
                    out.services.push(row);
                }
                None => out.bad.push(BadRow {
                    id: row.id,
                    reason: format!("the name of plan {id} cannot be read"),
                }),
            }
        }
        out
    }
}

impl ActivePlatformClient {
    async fn subscriptions_of(&self, path: &str) -> Result<ServiceListing, FetchError> {
        let rows = with_retry(|| async { list_envelope(self.get(path, &[]).await?) }).await?;
        let mut out = ServiceListing::default();
        let mut services = vec![];
        for row in rows {
            let id = row
                .get("id")
                .and_then(json_text)
                .filter(|i| !i.trim().is_empty());
            match (row.as_object(), id) {
                (Some(obj), Some(id)) => {
                    services.push(subscription_row(obj, id.trim().to_string()))
                }
                _ => out.bad.push(BadRow {
                    id: String::new(),
                    reason: "subscription row without id".into(),
                }),
            }
        }
        let named = self.with_plan_names(services).await;
        out.services = named.services;
        out.bad.extend(named.bad);
        Ok(out)
    }
}

/// A subscription row: `name` is the subscription's own, not its plan's.
fn subscription_row(row: &Map<String, Value>, id: String) -> RawService {
    let text = |name: &str| {
        row.get(name)
            .and_then(json_text)
            .filter(|v| !v.trim().is_empty())
    };
    RawService {
        id,
        owner_id: text("account_id"),
        owner_name: None,
        plan_id: text("plan_id"),
        plan_name: None,
        status: text("status"),
    }
}

#[async_trait]
impl BillingSource for ActivePlatformClient {
    fn kind(&self) -> SourceKind {
        SourceKind::Activeplatform
    }

    /// A detail GET only when the list row lacks e-mail or status.
    fn needs_details(&self, raw: &RawAccount) -> bool {
        raw.email.is_none() || raw.status.is_none()
    }

    /// `completed` and the two `receipt …` states are paid; the wire may use
    /// underscores.
    fn payment_state(&self, status: &str) -> PaymentState {
        payment_state(status)
    }

    fn writeback(&self) -> Option<&dyn WriteBack> {
        self.writeback_attribute
            .as_ref()
            .map(|_| self as &dyn WriteBack)
    }

    async fn list_accounts(
        &self,
        progress: &(dyn Fn(usize) + Sync),
        keep: super::KeepRow<'_>,
    ) -> Result<Listing, FetchError> {
        let (accounts, bad, requests) = self
            .page_all(
                "api/vendor/v1/accounts.json",
                &[],
                progress,
                MAX_PAGES,
                |row, id| account_row(row, id, keep),
            )
            .await?;
        Ok(Listing {
            accounts,
            bad,
            requests,
        })
    }

    /// Every subscription (paged like accounts), with its plan's name.
    async fn list_services(
        &self,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Option<Result<ServiceListing, FetchError>> {
        if !self.services {
            return None;
        }
        let path = "api/vendor/v1/subscriptions.json";
        let listed = self.page_all(path, &[], progress, MAX_PAGES, subscription_row);
        Some(match listed.await {
            Ok((rows, mut bad, _)) => {
                let mut named = self.with_plan_names(rows).await;
                bad.append(&mut named.bad);
                Ok(ServiceListing {
                    services: named.services,
                    bad,
                })
            }
            Err(e) => Err(e),
        })
    }

    /// `accounts/{id}/subscriptions.json`: a bare array, complete.
    async fn account_services(&self, id: &str) -> Option<Result<ServiceListing, FetchError>> {
        if !self.services {
            return None;
        }
        let path = format!(
            "api/vendor/v1/accounts/{}/subscriptions.json",
            urlencode(id)
        );
        Some(self.subscriptions_of(&path).await)
    }

    async fn first_page(&self) -> Result<Listing, FetchError> {
        let (accounts, bad, requests) = self
            .page_all("api/vendor/v1/accounts.json", &[], &|_| {}, 1, |row, id| {
                account_row(row, id, &|_, _| true)
            })
            .await?;
        Ok(Listing {
            accounts,
            bad,
            requests,
        })
    }

    async fn details(&self, id: &str) -> Result<Details, FetchError> {
        let path = format!("api/vendor/v1/accounts/{}.json", urlencode(id));
        match with_retry(|| self.get(&path, &[])).await {
            Ok(body) => {
                let obj = match body {
                    Value::Object(mut o) => {
                        match o.remove("data").or_else(|| o.remove("account")) {
                            Some(Value::Object(inner)) => inner,
                            Some(other) => {
                                o.insert("data".into(), other);
                                o
                            }
                            None => o,
                        }
                    }
                    _ => {
                        return Err(FetchError::transient(
                            "account GET did not return an object",
                        ))
                    }
                };
                Ok(Details::Found(decode_account(&obj, id.to_string())))
            }
            Err(e) if e.status == Some(404) => Ok(Details::Gone),
            Err(e) => Err(e),
        }
    }

    /// `filters[updated_at]` takes one date; what comes back is kept.
    async fn payments(
        &self,
        since: NaiveDate,
        _until: NaiveDate,
    ) -> Result<PaymentListing, FetchError> {
        let extra = [("filters[updated_at]", since.format("%Y-%m-%d").to_string())];
        let (payments, bad, _) = self
            .page_all(
                "api/vendor/v1/payments.json",
                &extra,
                &|_| {},
                MAX_PAGES,
                |row, id| {
                    let raw = RawPayment {
                        id,
                        account_id: row.get("account_id").and_then(json_text),
                        account_name: None,
                        amount: row.get("total").and_then(json_text),
                        status: row.get("status").and_then(json_text),
                        paid_date: row.get("updated_at").and_then(json_text),
                        created_date: row.get("created_at").and_then(json_text),
                    };
                    ListedPayment {
                        row_hash: super::hash_raw(&raw),
                        raw,
                    }
                },
            )
            .await?;
        Ok(PaymentListing { payments, bad })
    }
}

#[async_trait]
impl WriteBack for ActivePlatformClient {
    /// Stores the login in the configured custom attribute (SPEC §2.2).
    async fn write_login(&self, id: &str, value: &str) -> Result<(), FetchError> {
        let key = self.writeback_attribute.clone().unwrap_or_default();
        let url = self.endpoint(&format!("api/vendor/v1/accounts/{}.json", urlencode(id)))?;
        let form = [
            ("custom_attributes[][key]", key.to_string()),
            ("custom_attributes[][value]", value.to_string()),
        ];
        let body = serde_urlencoded_pairs(&form);
        let req = self
            .http
            .put(url)
            .query(&[("api_token", self.token())])
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body);
        self.request(req).await.map(|_| ())
    }
}

fn payment_state(status: &str) -> PaymentState {
    let s = status.trim().to_lowercase().replace('_', " ");
    let (paid, is_final) = match s.as_str() {
        "completed" | "receipt creating" | "receipt sent" => (true, s == "receipt sent"),
        "cancelled" | "canceled" => (false, true),
        _ => (false, false),
    };
    PaymentState { paid, is_final }
}

fn serde_urlencoded_pairs(pairs: &[(&str, String)]) -> String {
    let mut ser = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        ser.append_pair(k, v);
    }
    ser.finish()
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The list envelope is unknown: a bare array, or an object holding the
/// array under `data`, `accounts`, `payments` or `items`.
pub fn list_envelope(body: Value) -> Result<Vec<Value>, FetchError> {
    match body {
        Value::Array(a) => Ok(a),
        Value::Object(mut o) => {
            for key in ["data", "accounts", "payments", "items"] {
                if let Some(Value::Array(a)) = o.remove(key) {
                    return Ok(a);
                }
            }
            Err(FetchError::transient(
                "list response is an object without a data/accounts/items array",
            ))
        }
        _ => Err(FetchError::transient(
            "list response is neither an array nor an object",
        )),
    }
}

fn account_row(row: &Map<String, Value>, id: String, keep: super::KeepRow<'_>) -> ListedAccount {
    let raw = decode_account(row, id);
    let row_hash = super::hash_raw(&raw);
    let row_json = keep(&raw.id, &row_hash).then(|| serde_json::to_string(row).unwrap_or_default());
    ListedAccount {
        row_hash,
        row_json,
        raw,
    }
}

pub fn decode_account(row: &Map<String, Value>, id: String) -> RawAccount {
    let text = |k: &str| {
        row.get(k)
            .and_then(json_text)
            .filter(|s| !s.trim().is_empty())
    };
    let name = text("name").or_else(|| text("primary_name")).or_else(|| {
        let full = [text("first_name"), text("last_name")]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        Some(full).filter(|f| !f.is_empty())
    });
    let mut attributes = std::collections::BTreeMap::new();
    if let Some(Value::Array(attrs)) = row.get("custom_attributes") {
        for a in attrs {
            let Some(obj) = a.as_object() else { continue };
            let value = obj.get("value").and_then(json_text).unwrap_or_default();
            for k in ["name", "key"] {
                if let Some(n) = obj.get(k).and_then(json_text).filter(|n| !n.is_empty()) {
                    attributes.insert(n, value.clone());
                }
            }
        }
    }
    RawAccount {
        id,
        name,
        email: text("email"),
        phone: text("phone"),
        status: text("status"),
        balance: text("balance"),
        credit_limit: text("credit_limit"),
        attributes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn envelopes() {
        let one = serde_json::json!([{"id": 1}]);
        assert_eq!(list_envelope(one).unwrap().len(), 1);
        for key in ["data", "accounts", "items"] {
            let v = serde_json::json!({ key: [{"id": 1}, {"id": 2}], "meta": {} });
            assert_eq!(list_envelope(v).unwrap().len(), 2);
        }
        assert!(list_envelope(serde_json::json!({"error": "x"})).is_err());
        assert!(list_envelope(serde_json::json!("x")).is_err());
    }

    #[test]
    fn account_fields() {
        let v = serde_json::json!({
            "id": 2000589, "first_name": "John", "last_name": "Doe", "email": "doe@x.com",
            "status": "credit hold", "balance": 12.5, "credit_limit": "1",
            "custom_attributes": [{"name": "Trial", "value": ""}, {"name": "VMS login", "key": "vms_login", "value": "a@b"}]
        });
        let raw = decode_account(v.as_object().unwrap(), "2000589".into());
        assert_eq!(raw.name.as_deref(), Some("John Doe"));
        assert_eq!(raw.balance.as_deref(), Some("12.5"));
        assert_eq!(raw.status.as_deref(), Some("credit hold"));
        assert_eq!(
            raw.attributes.get("vms_login").map(String::as_str),
            Some("a@b")
        );
        assert_eq!(
            raw.attributes.get("VMS login").map(String::as_str),
            Some("a@b")
        );
    }

    proptest! {
        #[test]
        fn decoding_never_panics(v in crate::sources::billmanager::tests::arb_json()) {
            if let Ok(rows) = list_envelope(v.clone()) {
                for r in rows { if let Some(o) = r.as_object() { let _ = decode_account(o, "1".into()); } }
            }
            if let Some(o) = v.as_object() { let _ = decode_account(o, "1".into()); }
        }
    }
}
