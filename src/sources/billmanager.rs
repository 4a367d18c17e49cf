//! BILLmanager reader: POST forms with `out=json`, the `$`/`$orig` document
//! shape, errors inside HTTP 200, and paging that clamps past the end.

use std::collections::HashSet;
use std::time::Duration;

use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde_json::{Map, Value};
use tokio::sync::Mutex;
use url::Url;

use async_trait::async_trait;

use super::{
    with_retry, BadRow, BillingSource, Details, ListedAccount, ListedPayment, Listing,
    PaymentListing, ServiceListing,
};
use crate::config::{BillmanagerSettings, BmAuthMode, Secret};
use crate::core::entitlements::RawService;
use crate::core::model::{PaymentState, RawAccount, RawPayment, SourceKind};
use crate::core::normalize::parse_decimal;
use crate::http::{self, FetchError};
use crate::telemetry::metrics;

/// More pages than this is a server that never stops; give up.
const MAX_PAGES: u32 = 100_000;

pub struct BillmanagerClient {
    http: reqwest::Client,
    url: Url,
    username: String,
    password: Secret,
    mode: BmAuthMode,
    page_size: u32,
    session: Mutex<Option<String>>,
    /// Product types (`intname`) whose service lists are read.
    service_types: Vec<String>,
}

/// A decoded `doc`: a JSON object.
type Doc = Map<String, Value>;

impl BillmanagerClient {
    pub fn new(cfg: &BillmanagerSettings) -> anyhow::Result<Self> {
        let http = http::build_client(http::ClientOptions {
            timeout: Duration::from_secs(cfg.common.timeout_secs),
            ca_file: &cfg.common.ca_file,
            insecure: cfg.common.insecure_skip_tls_verify,
            headers: Default::default(),
            pool_size: 4,
        })?;
        Ok(Self {
            http,
            url: Url::parse(&cfg.common.url)?,
            username: cfg.username.clone(),
            password: cfg.password.clone(),
            mode: cfg.auth_mode,
            page_size: cfg.page_size,
            session: Mutex::new(None),
            service_types: cfg.services.item_types.clone(),
        })
    }

    fn credentials(&self) -> (String, String) {
        (
            self.username.clone(),
            self.password.expose().unwrap_or_default().to_string(),
        )
    }

    /// One raw call: the form goes in the POST body so `authinfo` never
    /// reaches an access log.
    async fn post(&self, form: &[(String, String)]) -> Result<Doc, FetchError> {
        let result = http::send(self.http.post(self.url.clone()).form(form)).await;
        let outcome = match result {
            Err(e) => Err(e),
            Ok((status, _, body)) => {
                if (300..400).contains(&status) {
                    Err(FetchError::transient(format!(
                        "HTTP {status}: redirected (proxy or wrong URL?)"
                    ))
                    .with_status(status))
                } else if !(200..300).contains(&status) {
                    let class = http::classify_status(status);
                    let msg = format!("HTTP {status} with {}", http::describe_body(&body));
                    Err(match class {
                        http::ErrorClass::Transient => FetchError::transient(msg),
                        http::ErrorClass::Permanent => FetchError::permanent(msg),
                    }
                    .with_status(status))
                } else {
                    decode_doc(&body)
                }
            }
        };
        metrics::get().source_request(SourceKind::Billmanager, outcome.is_ok());
        outcome
    }

    async fn login(&self) -> Result<String, FetchError> {
        let (user, pass) = self.credentials();
        let form = vec![
            ("func".to_string(), "auth".to_string()),
            ("out".into(), "json".into()),
            ("username".into(), user),
            ("password".into(), pass),
        ];
        let doc = self.post(&form).await?;
        doc.get("auth")
            .and_then(|a| {
                a.get("$id")
                    .and_then(super::json_text)
                    .or_else(|| scalar(a))
            })
            .filter(|s| !s.is_empty())
            .ok_or_else(|| FetchError::permanent("BILLmanager login returned no session id"))
    }

    /// A function call with auth, `out=json`, and one re-login on an `auth`
    /// error in session mode.
    pub async fn call(&self, func: &str, params: &[(&str, String)]) -> Result<Doc, FetchError> {
        for attempt in 0..2 {
            let mut form: Vec<(String, String)> =
                vec![("func".into(), func.into()), ("out".into(), "json".into())];
            form.extend(params.iter().map(|(k, v)| (k.to_string(), v.clone())));
            match self.mode {
                BmAuthMode::Authinfo => {
                    let (u, p) = self.credentials();
                    form.push(("authinfo".into(), format!("{u}:{p}")));
                }
                BmAuthMode::Session => {
                    let mut session = self.session.lock().await;
                    if session.is_none() {
                        *session = Some(self.login().await?);
                    }
                    form.push(("auth".into(), session.clone().unwrap_or_default()));
                }
            }
            match self.post(&form).await {
                Err(e) if self.mode == BmAuthMode::Session && attempt == 0 && is_auth_error(&e) => {
                    tracing::info!("BILLmanager session expired; logging in again");
                    *self.session.lock().await = None;
                }
                other => return other,
            }
        }
        Err(FetchError::permanent(
            "BILLmanager rejected the session after a fresh login",
        ))
    }

    /// Reads every page of a list function. `decode` turns a row into a value
    /// keyed by the row id; rows without an id are reported as bad.
    async fn page_all<T>(
        &self,
        func: &str,
        extra: &[(&str, String)],
        progress: &(dyn Fn(usize) + Sync),
        max_pages: u32,
        mut decode: impl FnMut(&Map<String, Value>, String) -> T,
    ) -> Result<(Vec<T>, Vec<BadRow>, u32), FetchError> {
        let mut seen: HashSet<String> = HashSet::new();
        let mut out = vec![];
        let mut bad = vec![];
        let mut requests = 0;
        let mut total: Option<usize> = None;
        let mut page = 1u32;
        loop {
            let mut params: Vec<(&str, String)> = vec![
                ("p_num", page.to_string()),
                ("p_cnt", self.page_size.to_string()),
            ];
            params.extend(extra.iter().cloned());
            let doc = with_retry(|| self.call(func, &params)).await?;
            requests += 1;
            let rows = elems(&doc)?;
            total = doc
                .get("p_elems")
                .and_then(scalar)
                .and_then(|t| t.trim().parse::<usize>().ok())
                .or(total);
            // `p_elems` is the server's word, not memory's: the vectors grow
            // with the rows that actually arrive (SPEC §11).
            let effective_cnt = doc
                .get("p_cnt")
                .and_then(scalar)
                .and_then(|c| c.trim().parse::<usize>().ok())
                .filter(|c| *c > 0)
                .unwrap_or(self.page_size as usize);
            let mut new_rows = 0;
            for row in &rows {
                let Some(obj) = row.as_object() else {
                    bad.push(BadRow {
                        id: String::new(),
                        reason: "list row is not an object".into(),
                    });
                    continue;
                };
                let id = field(obj, "id").or_else(|| field(obj, "elid"));
                let Some(id) = id.filter(|i| !i.trim().is_empty()) else {
                    bad.push(BadRow {
                        id: String::new(),
                        reason: "list row without id".into(),
                    });
                    continue;
                };
                let id = id.trim().to_string();
                if seen.insert(id.clone()) {
                    new_rows += 1;
                    out.push(decode(obj, id));
                }
            }
            progress(seen.len());
            // Past the end the server clamps and repeats the last page; only
            // `p_elems` can prove that the listing is over (SPEC §9.4).
            if new_rows == 0 {
                if !rows.is_empty() && total.is_none() {
                    return Err(FetchError::transient(format!(
                        "{func}: page {page} repeats rows already listed and the server \
                         sends no p_elems to prove the listing complete"
                    )));
                }
                break;
            }
            match total {
                Some(t) if seen.len() + bad.len() >= t => break,
                None if rows.len() < effective_cnt => break,
                _ => {}
            }
            if page >= max_pages {
                return Err(FetchError::transient(format!(
                    "{func}: gave up after {page} pages"
                )));
            }
            page += 1;
        }
        if let Some(t) = total {
            if seen.len() + bad.len() != t {
                return Err(FetchError::transient(format!(
                    "{func}: listing incomplete: read {} rows, server reports p_elems {t}",
                    seen.len() + bad.len()
                )));
            }
        }
        Ok((out, bad, requests))
    }
}

#[async_trait]
impl BillingSource for BillmanagerClient {
    fn kind(&self) -> SourceKind {
        SourceKind::Billmanager
    }

    /// The list has neither e-mail nor phone, and the credit limit comes
    /// from subaccounts: every account needs its details.
    fn needs_details(&self, _raw: &RawAccount) -> bool {
        true
    }

    /// Status codes (API-NOTES): 4 credited is the only paid one; 4, 6, 7
    /// and 9 are final.
    fn payment_state(&self, status: &str) -> PaymentState {
        payment_state(status)
    }

    async fn list_accounts(
        &self,
        progress: &(dyn Fn(usize) + Sync),
        keep: super::KeepRow<'_>,
    ) -> Result<Listing, FetchError> {
        let (accounts, bad, requests) = self
            .page_all("account", &[], progress, MAX_PAGES, |row, id| {
                account_row(row, id, keep)
            })
            .await?;
        Ok(Listing {
            accounts,
            bad,
            requests,
        })
    }

    /// Each configured product type's list (`func=INTNAME`), with the
    /// account listing's paging and completeness proofs; the owner is the
    /// row's `account_id` where it has one, else its `account` name.
    async fn list_services(
        &self,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Option<Result<ServiceListing, FetchError>> {
        if self.service_types.is_empty() {
            return None;
        }
        let mut out = ServiceListing::default();
        for func in &self.service_types {
            match self
                .page_all(func, &[], progress, MAX_PAGES, service_row)
                .await
            {
                Ok((services, bad, _)) => {
                    out.services.extend(services);
                    out.bad.extend(bad);
                }
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(out))
    }

    async fn first_page(&self) -> Result<Listing, FetchError> {
        let params = [
            ("p_num", "1".to_string()),
            ("p_cnt", self.page_size.to_string()),
        ];
        let doc = with_retry(|| self.call("account", &params)).await?;
        let mut listing = Listing {
            requests: 1,
            ..Default::default()
        };
        for row in elems(&doc)? {
            let id = row.as_object().and_then(|o| {
                field(o, "id")
                    .or_else(|| field(o, "elid"))
                    .map(|id| (o, id))
            });
            match id {
                Some((obj, id)) => listing.accounts.push(account_row(obj, id, &|_, _| true)),
                None => listing.bad.push(BadRow {
                    id: String::new(),
                    reason: "list row without id".into(),
                }),
            }
        }
        Ok(listing)
    }

    /// `account.edit` (e-mail, phone, names) and the subaccounts' credit limits.
    async fn details(&self, id: &str) -> Result<Details, FetchError> {
        let params = [("elid", id.to_string())];
        let doc = match with_retry(|| self.call("account.edit", &params)).await {
            Ok(doc) => doc,
            Err(e) if e.message.contains("(missed)") => return Ok(Details::Gone),
            Err(e) => return Err(e),
        };
        let get = |k: &str| doc.get(k).and_then(scalar).filter(|s| !s.trim().is_empty());
        let raw = RawAccount {
            id: id.to_string(),
            name: get("name"),
            email: get("email"),
            phone: get("phone")
                .or_else(|| get("valid_phone"))
                .or_else(|| get("try_phone")),
            ..Default::default()
        };
        let subs = with_retry(|| self.call("subaccount", &params)).await?;
        let mut limit = Decimal::ZERO;
        let mut bad_limit = None;
        // The subaccount rows carry the balance too (API-NOTES): the first
        // one is the account's main currency. A cycle's list row wins over
        // it; a targeted re-read (SPEC §10.2) takes it as the fresh value.
        let balance = elems(&subs)?
            .iter()
            .filter_map(|r| r.as_object().and_then(|o| field(o, "balance")))
            .find(|b| !b.trim().is_empty());
        for row in elems(&subs)? {
            if let Some(text) = row.as_object().and_then(|o| field(o, "creditlimit")) {
                if text.trim().is_empty() {
                    continue;
                }
                match parse_decimal(&text) {
                    Ok(d) => limit = limit.checked_add(d).unwrap_or(limit),
                    Err(_) => bad_limit = Some(text),
                }
            }
        }
        Ok(Details::Found(RawAccount {
            credit_limit: Some(bad_limit.unwrap_or_else(|| limit.normalize().to_string())),
            balance,
            ..raw
        }))
    }

    /// Payments created in `[since, until]`, all pages.
    async fn payments(
        &self,
        since: NaiveDate,
        until: NaiveDate,
    ) -> Result<PaymentListing, FetchError> {
        let extra = [
            ("filter", "on".to_string()),
            ("createdate", "other".to_string()),
            ("createdatestart", since.format("%Y-%m-%d").to_string()),
            ("createdateend", until.format("%Y-%m-%d").to_string()),
        ];
        let (payments, bad, _) = self
            .page_all("payment", &extra, &|_| {}, MAX_PAGES, |row, id| {
                let raw = RawPayment {
                    id,
                    account_id: field(row, "account_id"),
                    account_name: field(row, "account_name"),
                    amount: field(row, "subaccountamount_iso")
                        .or_else(|| field(row, "subaccountamount")),
                    status: field(row, "status"),
                    paid_date: field(row, "pay_date").or_else(|| field(row, "paydate")),
                    created_date: field(row, "create_date").or_else(|| field(row, "createdate")),
                };
                ListedPayment {
                    row_hash: super::hash_raw(&raw),
                    raw,
                }
            })
            .await?;
        Ok(PaymentListing { payments, bad })
    }
}

fn payment_state(code: &str) -> PaymentState {
    let (paid, is_final) = match code.trim() {
        "4" => (true, true),
        "6" | "7" | "9" => (false, true),
        _ => (false, false),
    };
    PaymentState { paid, is_final }
}

fn account_row(row: &Map<String, Value>, id: String, keep: super::KeepRow<'_>) -> ListedAccount {
    let raw = RawAccount {
        id,
        name: field(row, "name"),
        status: field(row, "account_status"),
        balance: field(row, "balance"),
        ..Default::default()
    };
    let row_hash = super::hash_raw(&raw);
    let row_json = keep(&raw.id, &row_hash).then(|| serde_json::to_string(row).unwrap_or_default());
    ListedAccount {
        row_hash,
        row_json,
        raw,
    }
}

fn is_auth_error(e: &FetchError) -> bool {
    e.message.contains("(auth)")
}

/// `{"doc": {...}}` or an error; an `error` element inside a 200 is decoded
/// and classified: `auth` and `access` are configuration problems.
pub fn decode_doc(body: &[u8]) -> Result<Doc, FetchError> {
    let v = http::parse_json(body)?;
    let Value::Object(mut top) = v else {
        return Err(FetchError::transient(format!(
            "expected a BILLmanager document, got {}",
            http::describe_body(body)
        )));
    };
    let doc = match top.remove("doc") {
        Some(Value::Object(doc)) => doc,
        _ => {
            return Err(FetchError::transient(format!(
                "expected a BILLmanager document (no \"doc\"), got {}",
                http::describe_body(body)
            )))
        }
    };
    if let Some(err) = doc.get("error") {
        let kind = err
            .get("$type")
            .and_then(super::json_text)
            .unwrap_or_else(|| "unknown".into());
        let msg = err
            .get("msg")
            .and_then(scalar)
            .or_else(|| scalar(err))
            .unwrap_or_default();
        let object = err
            .get("$object")
            .and_then(super::json_text)
            .unwrap_or_default();
        let text = format!("BILLmanager error ({kind}) {object}: {msg}");
        return Err(match kind.as_str() {
            "auth" | "access" | "missed" | "value" => FetchError::permanent(text),
            _ => FetchError::transient(text),
        });
    }
    Ok(doc)
}

/// `elem` as an array, a single object, or absent.
pub fn elems(doc: &Doc) -> Result<Vec<Value>, FetchError> {
    match doc.get("elem") {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => Ok(a.clone()),
        Some(o @ Value::Object(_)) => Ok(vec![o.clone()]),
        Some(_) => Err(FetchError::transient(
            "BILLmanager \"elem\" is neither a list nor an object",
        )),
    }
}

/// The text of a BILLmanager value: `{"$orig": ..}` wins over `{"$": ..}`;
/// a repeated field (array) yields its first element.
pub fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::Array(a) => a.first().and_then(scalar),
        Value::Object(o) => o
            .get("$orig")
            .and_then(super::json_text)
            .or_else(|| o.get("$").and_then(super::json_text)),
        other => super::json_text(other),
    }
}

fn field(row: &Map<String, Value>, name: &str) -> Option<String> {
    row.get(name).and_then(scalar)
}

/// A service list row (API-NOTES v3): `pricelist` and `account` are
/// display names; `account_id` and `pricelist_id` only on some versions.
fn service_row(row: &Map<String, Value>, id: String) -> RawService {
    let text = |name: &str| field(row, name).filter(|v| !v.trim().is_empty());
    RawService {
        id,
        owner_id: text("account_id"),
        owner_name: text("account"),
        plan_id: text("pricelist_id"),
        plan_name: text("pricelist"),
        status: text("item_status"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn scalars_and_elems() {
        let doc = decode_doc(
            br#"{"doc":{"elem":{"id":{"$":"7"},"account_status":{"$orig":"2","$":"Suspended"},
                "name":[{"$":"first"},{"$":"second"}],"extra":{"x":1}}}}"#,
        )
        .unwrap();
        let rows = elems(&doc).unwrap();
        assert_eq!(rows.len(), 1);
        let row = rows[0].as_object().unwrap();
        assert_eq!(field(row, "id").as_deref(), Some("7"));
        assert_eq!(field(row, "account_status").as_deref(), Some("2"));
        assert_eq!(field(row, "name").as_deref(), Some("first"));
        assert_eq!(field(row, "extra"), None);
        let empty = decode_doc(br#"{"doc":{"p_elems":{"$":"0"}}}"#).unwrap();
        assert!(elems(&empty).unwrap().is_empty());
    }

    #[test]
    fn errors_in_200_are_classified() {
        let e = decode_doc(br#"{"doc":{"error":{"$type":"auth","msg":{"$":"bad password"}}}}"#)
            .unwrap_err();
        assert!(!e.is_transient());
        assert!(e.message.contains("(auth)"));
        let e =
            decode_doc(br#"{"doc":{"error":{"$type":"access","$object":"account"}}}"#).unwrap_err();
        assert!(!e.is_transient());
        let e = decode_doc(br#"{"doc":{"error":{"$type":"sysbusy"}}}"#).unwrap_err();
        assert!(e.is_transient());
        assert!(decode_doc(b"<html>login</html>")
            .unwrap_err()
            .is_transient());
        assert!(decode_doc(br#"{"nodoc":1}"#).unwrap_err().is_transient());
        assert!(decode_doc(br#"[1,2]"#).unwrap_err().is_transient());
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(doc) = decode_doc(&bytes) {
                if let Ok(rows) = elems(&doc) {
                    for r in rows { if let Some(o) = r.as_object() { let _ = account_row(o, "1".into(), &|_, _| true); } }
                }
            }
        }

        #[test]
        fn decode_never_panics_on_json(v in arb_json()) {
            let body = serde_json::to_vec(&serde_json::json!({"doc": v})).unwrap();
            if let Ok(doc) = decode_doc(&body) {
                if let Ok(rows) = elems(&doc) {
                    for r in rows {
                        let _ = scalar(&r);
                        if let Some(o) = r.as_object() { let _ = account_row(o, "1".into(), &|_, _| true); }
                    }
                }
            }
        }
    }

    pub(crate) fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("elem".to_string()),
                        Just("$".to_string()),
                        Just("$orig".to_string()),
                        Just("id".to_string()),
                        Just("error".to_string()),
                        "[a-z_$]{1,8}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
