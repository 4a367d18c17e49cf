//! The read side: one module per billing system, each implementing
//! `BillingSource`. A reader lists accounts completely, fetches details, and
//! reads payments, decoding whatever shape its API sends into `RawAccount` /
//! `RawPayment`; it also knows its own payment statuses and whether it can
//! take a write-back. Adding a system: ARCHITECTURE.md, "Adding a source".

pub mod activeplatform;
pub mod billmanager;

use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use chrono::NaiveDate;

use crate::config::Settings;
use crate::core::entitlements::RawService;
pub use crate::core::model::ListedAccount;
use crate::core::model::{PaymentState, RawAccount, RawPayment, SourceKind};
use crate::http::FetchError;

pub use activeplatform::ActivePlatformClient;
pub use billmanager::BillmanagerClient;

/// Details of one account, fetched on demand.
#[derive(Debug, Clone)]
pub enum Details {
    Found(RawAccount),
    /// The source says the account no longer exists.
    Gone,
}

/// A payment row as read, with its source JSON hash for change detection.
#[derive(Debug, Clone)]
pub struct ListedPayment {
    pub raw: RawPayment,
    pub row_hash: String,
}

/// A row the reader could not decode at all (no id, wrong shape).
#[derive(Debug, Clone)]
pub struct BadRow {
    pub id: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct Listing {
    pub accounts: Vec<ListedAccount>,
    pub bad: Vec<BadRow>,
    pub requests: u32,
}

/// A complete service listing (SPEC §12.1): every row of the configured
/// kinds, and the rows that could not be decoded.
#[derive(Debug, Default)]
pub struct ServiceListing {
    pub services: Vec<RawService>,
    pub bad: Vec<BadRow>,
}

#[derive(Debug, Default)]
pub struct PaymentListing {
    pub payments: Vec<ListedPayment>,
    pub bad: Vec<BadRow>,
}

pub fn hash_raw(raw: &impl serde::Serialize) -> String {
    crate::core::model::content_hash(raw)
}

/// Whether the store lacks this `(id, row_hash)`: then the row's JSON is kept.
pub type KeepRow<'a> = &'a (dyn Fn(&str, &str) -> bool + Sync);

/// One billing system, as the engine reads it.
#[async_trait]
pub trait BillingSource: Send + Sync {
    fn kind(&self) -> SourceKind;

    /// Whether this list row lacks fields that only details carry.
    fn needs_details(&self, raw: &RawAccount) -> bool;

    /// What one of this system's payment statuses means.
    fn payment_state(&self, status: &str) -> PaymentState;

    /// The write-back capability, for systems that can store the VMS login
    /// on the account and are configured to.
    fn writeback(&self) -> Option<&dyn WriteBack> {
        None
    }

    /// The complete listing; any failure makes the source incomplete.
    async fn list_accounts(
        &self,
        progress: &(dyn Fn(usize) + Sync),
        keep: KeepRow<'_>,
    ) -> Result<Listing, FetchError>;

    /// First page only, for `check-config --connect`.
    async fn first_page(&self) -> Result<Listing, FetchError>;

    async fn details(&self, id: &str) -> Result<Details, FetchError>;

    /// Payments created/changed from `since` (inclusive) to `until`.
    async fn payments(
        &self,
        since: NaiveDate,
        until: NaiveDate,
    ) -> Result<PaymentListing, FetchError>;

    /// Every service of the kinds configured, with the completeness proofs
    /// of an account listing; `None`: this source is not set to read any.
    async fn list_services(
        &self,
        _progress: &(dyn Fn(usize) + Sync),
    ) -> Option<Result<ServiceListing, FetchError>> {
        None
    }

    /// One account's services, complete, where the system has such a read
    /// (targeted cycles); `None`: it has not, or reads no services.
    async fn account_services(&self, _id: &str) -> Option<Result<ServiceListing, FetchError>> {
        None
    }
}

/// Storing the VMS login on a source account (SPEC §2.2 write-back).
#[async_trait]
pub trait WriteBack: Send + Sync {
    async fn write_login(&self, id: &str, login: &str) -> Result<(), FetchError>;
}

/// Shared, so each source's read can run on a task of its own.
pub type Source = std::sync::Arc<dyn BillingSource>;

/// The enabled sources, in priority order: the one place that knows which
/// module reads which system.
pub fn from_settings(settings: &Settings) -> anyhow::Result<Vec<Source>> {
    let mut out: Vec<Source> = vec![];
    for kind in settings.enabled_sources() {
        out.push(match kind {
            SourceKind::Billmanager => {
                std::sync::Arc::new(BillmanagerClient::new(settings.bm().expect("enabled"))?)
            }
            SourceKind::Activeplatform => {
                std::sync::Arc::new(ActivePlatformClient::new(settings.ap().expect("enabled"))?)
            }
        });
    }
    Ok(out)
}

/// Retries a transient source failure a few times within one read; a
/// permanent one (credentials, access) returns at once.
pub async fn with_retry<T, F, Fut>(f: F) -> Result<T, FetchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, FetchError>>,
{
    f.retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(2)
            .with_jitter(),
    )
    .sleep(crate::telemetry::liveness::sleep)
    .when(|e: &FetchError| e.is_transient())
    .await
}

/// Text of a JSON scalar as sources send them: strings, numbers, booleans.
pub fn json_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}
