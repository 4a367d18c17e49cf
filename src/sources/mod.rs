//! The read side: one module per billing system. Each reader lists accounts
//! completely, fetches details, and reads payments, decoding whatever shape
//! the API sends into `RawAccount` / `RawPayment`.

pub mod activeplatform;
pub mod billmanager;

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::NaiveDate;

use crate::config::Settings;
use crate::core::model::{RawAccount, RawPayment, SourceKind};
use crate::http::FetchError;

pub use activeplatform::ActivePlatformClient;
pub use billmanager::BillmanagerClient;

/// One row of a complete listing.
#[derive(Debug, Clone)]
pub struct ListedAccount {
    pub raw: RawAccount,
    /// Hash of the fields billsync uses from the list row: a change means
    /// the details are fetched again.
    pub row_hash: String,
    /// The row as the source sent it (kept for `explain`); only for rows the
    /// store does not already hold, so a large unchanged listing stays small.
    pub row_json: Option<String>,
}

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

/// A configured source. An enum, not a trait object: there are two, and the
/// engine matches on them rarely.
pub enum Source {
    Billmanager(BillmanagerClient),
    Activeplatform(ActivePlatformClient),
}

impl Source {
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Vec<Source>> {
        let mut out = vec![];
        for kind in settings.enabled_sources() {
            match kind {
                SourceKind::Billmanager => {
                    let bm = settings.bm().expect("enabled");
                    out.push(Source::Billmanager(BillmanagerClient::new(bm)?));
                }
                SourceKind::Activeplatform => {
                    let ap = settings.ap().expect("enabled");
                    out.push(Source::Activeplatform(ActivePlatformClient::new(ap)?));
                }
            }
        }
        Ok(out)
    }

    pub fn kind(&self) -> SourceKind {
        match self {
            Source::Billmanager(_) => SourceKind::Billmanager,
            Source::Activeplatform(_) => SourceKind::Activeplatform,
        }
    }

    /// The complete listing; any failure makes the source incomplete.
    pub async fn list_accounts(
        &self,
        progress: &(dyn Fn(usize) + Sync),
        keep: KeepRow<'_>,
    ) -> Result<Listing, FetchError> {
        match self {
            Source::Billmanager(c) => c.list_accounts(progress, keep).await,
            Source::Activeplatform(c) => c.list_accounts(progress, keep).await,
        }
    }

    pub async fn details(&self, id: &str) -> Result<Details, FetchError> {
        match self {
            Source::Billmanager(c) => c.details(id).await,
            Source::Activeplatform(c) => c.details(id).await,
        }
    }

    /// Payments created/changed from `since` (inclusive) to `until`.
    pub async fn payments(
        &self,
        since: NaiveDate,
        until: NaiveDate,
    ) -> Result<PaymentListing, FetchError> {
        match self {
            Source::Billmanager(c) => c.payments(since, until).await,
            Source::Activeplatform(c) => c.payments(since).await,
        }
    }

    /// First page only, for `check-config --connect`.
    pub async fn first_page(&self) -> Result<Listing, FetchError> {
        match self {
            Source::Billmanager(c) => c.first_page().await,
            Source::Activeplatform(c) => c.first_page().await,
        }
    }

    /// Whether this source's list rows lack fields that only details carry.
    pub fn needs_details(&self, raw: &RawAccount) -> bool {
        match self {
            // The list has neither e-mail nor phone; credit limit comes from
            // subaccounts.
            Source::Billmanager(_) => true,
            Source::Activeplatform(_) => raw.email.is_none() || raw.status.is_none(),
        }
    }
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
