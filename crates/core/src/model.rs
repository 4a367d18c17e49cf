//! Domain types shared by the read side, the core and the store.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Billmanager,
    Activeplatform,
}

impl SourceKind {
    pub const ALL: [SourceKind; 2] = [SourceKind::Billmanager, SourceKind::Activeplatform];

    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Billmanager => "billmanager",
            SourceKind::Activeplatform => "activeplatform",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CanonicalStatus {
    Active,
    Suspended,
    Deleted,
}

impl CanonicalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CanonicalStatus::Active => "active",
            CanonicalStatus::Suspended => "suspended",
            CanonicalStatus::Deleted => "deleted",
        }
    }
}

/// `(source, id)`: one customer account in one source.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AccountKey {
    pub source: SourceKind,
    pub id: String,
}

/// Account name -> id, `None` where a name is shared: how payments that name
/// their account only are resolved (never to an ambiguous account).
pub fn unique_names(
    accounts: impl IntoIterator<Item = (String, String)>,
) -> std::collections::HashMap<String, Option<String>> {
    let mut out = std::collections::HashMap::new();
    for (name, id) in accounts {
        out.entry(name.trim().to_string())
            .and_modify(|v: &mut Option<String>| *v = None)
            .or_insert(Some(id));
    }
    out
}

impl AccountKey {
    /// `SOURCE:ID`, as `explain`, `sync --account` and `POST /trigger` take it.
    pub fn parse(text: &str) -> Option<Self> {
        let (source, id) = text.trim().split_once(':')?;
        let id = id.trim();
        let source = SourceKind::parse(source.trim())?;
        (!id.is_empty()).then(|| AccountKey {
            source,
            id: id.to_string(),
        })
    }
}

impl fmt::Display for AccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.id)
    }
}

/// An account as a source delivered it, fields still raw text. The readers
/// fill what their API has; normalization decides what is usable.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RawAccount {
    pub id: String,
    pub name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub status: Option<String>,
    pub balance: Option<String>,
    pub credit_limit: Option<String>,
    /// ActivePlatform custom attributes: name (or key) -> value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

impl RawAccount {
    /// Fields from `details` fill what the list row lacks; the list row wins
    /// for fields it carries, since it is the fresher read.
    pub fn merged_with(&self, details: &RawAccount) -> RawAccount {
        let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
        let mut attributes = details.attributes.clone();
        attributes.extend(self.attributes.clone());
        RawAccount {
            id: self.id.clone(),
            name: pick(&self.name, &details.name),
            email: pick(&self.email, &details.email),
            phone: pick(&self.phone, &details.phone),
            status: pick(&self.status, &details.status),
            balance: pick(&self.balance, &details.balance),
            credit_limit: pick(&self.credit_limit, &details.credit_limit),
            attributes,
        }
    }
}

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

/// What a payment's raw status means; each source knows its own codes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PaymentState {
    pub paid: bool,
    /// No later change is expected (paid for good, returned, cancelled).
    pub is_final: bool,
}

/// A payment as a source delivered it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RawPayment {
    pub id: String,
    pub account_id: Option<String>,
    pub account_name: Option<String>,
    pub amount: Option<String>,
    pub status: Option<String>,
    /// BILLmanager `pay_date` / ActivePlatform `updated_at`.
    pub paid_date: Option<String>,
    /// BILLmanager `create_date` / ActivePlatform `created_at`.
    pub created_date: Option<String>,
}

/// A normalized account: every field parsed, the login rendered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Account {
    pub key: AccountKey,
    pub login: String,
    pub billing_id: String,
    pub name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub status: CanonicalStatus,
    pub balance: Decimal,
    pub credit_limit: Decimal,
    pub attributes: BTreeMap<String, String>,
}

/// A normalized payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payment {
    pub source: SourceKind,
    pub id: String,
    /// Resolved owner, when known.
    pub account_id: Option<String>,
    pub account_name: Option<String>,
    pub amount: Decimal,
    pub paid: bool,
    /// No later change is expected (paid, returned, fraudulent, cancelled).
    pub is_final: bool,
    pub paid_at: Option<DateTime<Utc>>,
}

/// Why a record was skipped. `code` is a metric label (bounded set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invalid {
    pub code: InvalidCode,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvalidCode {
    NoLogin,
    BadLogin,
    UnknownStatus,
    BadNumber,
    MissingField,
    Malformed,
    UnknownAccount,
    /// A camera group template has no value for the account (SPEC §12.2).
    CameraGroup,
}

impl InvalidCode {
    pub const ALL: [InvalidCode; 8] = [
        InvalidCode::NoLogin,
        InvalidCode::BadLogin,
        InvalidCode::UnknownStatus,
        InvalidCode::BadNumber,
        InvalidCode::MissingField,
        InvalidCode::Malformed,
        InvalidCode::UnknownAccount,
        InvalidCode::CameraGroup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InvalidCode::NoLogin => "no_login",
            InvalidCode::BadLogin => "bad_login",
            InvalidCode::UnknownStatus => "unknown_status",
            InvalidCode::BadNumber => "bad_number",
            InvalidCode::MissingField => "missing_field",
            InvalidCode::Malformed => "malformed",
            InvalidCode::UnknownAccount => "unknown_account",
            InvalidCode::CameraGroup => "camera_group",
        }
    }
}

impl Invalid {
    pub fn new(code: InvalidCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.detail)
    }
}

/// What happens to the VMS user of a deleted account (`vms.on_deleted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDeleted {
    Block,
    Delete,
}

/// A short, stable content hash (for change detection, not security).
pub fn content_hash(value: &impl Serialize) -> String {
    use sha2::{Digest, Sha256};
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..16])
}

/// What one VMS user looks like, as desired or as last applied. Only
/// managed permissions are ever recorded here.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UserState {
    #[serde(rename = "type")]
    pub user_type: String,
    /// The VMS status value (`vms.status_active` / `vms.status_blocked`).
    pub status: String,
    pub billing_id: String,
    /// `(type, value)` pairs, sorted by type.
    pub properties: Vec<(String, String)>,
    /// Shared: 100k users hold a handful of distinct sets.
    pub permissions: std::sync::Arc<std::collections::BTreeSet<String>>,
    /// The source account is deleted (blocked, or removed with on_deleted = delete).
    #[serde(default)]
    pub gone: bool,
    /// Public camera groups (SPEC §12.3); None while `[vms.cameras]` is
    /// off, so states, hashes and stored rows are what they were without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cameras: Option<Cameras>,
}

/// A user's public camera groups, as desired or as last applied.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cameras {
    /// The account the groups are for: when another account takes the
    /// login, the set is replaced, never inherited.
    pub owner: AccountKey,
    /// External ids of public groups (tree elements).
    pub groups: std::sync::Arc<std::collections::BTreeSet<String>>,
    /// Desired: the set stays as applied (the account is not active and
    /// `on_block = "keep"`, or a template has no value). Applied: it was
    /// kept. Only this flag, not the groups, is compared while it is set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
}
