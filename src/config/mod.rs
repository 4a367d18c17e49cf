//! Settings: the TOML file, `BILLSYNC__SECTION__KEY` overrides, `x_file`
//! secrets, defaults and validation (SPEC §3). Every error names its key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

mod secrets;
pub use secrets::Secret;
use secrets::{any_inline_secret, is_secret_key, register_secrets};

pub use crate::core::model::OnDeleted;
pub use crate::core::rules::Rule;

use crate::core::cameras::CameraPolicy;
use crate::core::desired::CoreConfig;
use crate::core::entitlements::ServiceState;
use crate::core::model::{CanonicalStatus, SourceKind};
use crate::core::normalize::{Normalizer, TEMPLATE_VARS};
use crate::telemetry::redact;

pub const DEFAULT_PATH: &str = "/etc/billsync/billsync.toml";
const ENV_PREFIX: &str = "BILLSYNC__";

/// A configuration problem: the key at fault and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("config: {key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub daemon: DaemonSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    pub safety: SafetySettings,
    pub sources: SourcesSettings,
    pub vms: VmsSettings,
    pub permissions: PermissionSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonSettings {
    pub state_path: PathBuf,
    /// `postgres://...` puts the state store in PostgreSQL (SPEC §13);
    /// `state_path` is then unused.
    pub state_url: Secret,
    /// Its `_file` form, read by `secrets::file_overrides`.
    #[serde(skip_serializing)]
    pub state_url_file: Option<PathBuf>,
    /// This node's name in the leader lease; "" is the host name.
    pub node_name: String,
    pub lease_secs: u64,
    pub schedule: String,
    pub full_resync_schedule: String,
    /// The payment fast path (SPEC §10.2); "" disables.
    pub payments_schedule: String,
    /// Rolling re-verification period (SPEC §10.1); 0 disables.
    pub reverify_hours: u32,
    pub missing_grace_cycles: u32,
    pub control_poll_secs: u64,
    pub shutdown_grace_secs: u64,
    pub audit_retention_days: u32,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            state_path: PathBuf::from("/var/lib/billsync/state.db"),
            state_url: Secret::default(),
            state_url_file: None,
            node_name: String::new(),
            lease_secs: 15,
            schedule: "0 * * * * *".into(),
            // Rolling re-verification repairs drift now (SPEC §10.1); the
            // full resync stays an operator tool.
            full_resync_schedule: String::new(),
            payments_schedule: "*/10 * * * * *".into(),
            reverify_hours: 24,
            missing_grace_cycles: 2,
            control_poll_secs: 5,
            shutdown_grace_secs: 30,
            audit_retention_days: 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    pub listen: String,
    pub token: Secret,
    /// Its `_file` form, read by `secrets::file_overrides`.
    #[serde(skip_serializing)]
    pub token_file: Option<PathBuf>,
    /// PEM certificate chain and private key: the admin server speaks TLS
    /// (SPEC §13). Both or neither.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9187".into(),
            token: Secret::default(),
            token_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

pub use crate::telemetry::LogFormat;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SafetySettings {
    pub max_deprovision: u32,
    pub max_deprovision_ratio: f64,
}

impl Default for SafetySettings {
    fn default() -> Self {
        Self {
            max_deprovision: 10,
            max_deprovision_ratio: 0.05,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourcesSettings {
    pub priority: Vec<SourceKind>,
    /// Absent section: the source is not configured (disabled).
    pub billmanager: Option<BillmanagerSettings>,
    pub activeplatform: Option<ActivePlatformSettings>,
}

impl SourcesSettings {
    /// Every source's section present, with its defaults.
    pub fn every() -> Self {
        Self {
            billmanager: Some(Default::default()),
            activeplatform: Some(Default::default()),
            ..Default::default()
        }
    }
}

impl Default for SourcesSettings {
    fn default() -> Self {
        Self {
            priority: vec![SourceKind::Billmanager, SourceKind::Activeplatform],
            billmanager: None,
            activeplatform: None,
        }
    }
}

/// What every billing system's section shares. Flattened into each section,
/// so the TOML keys stay where they were.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceCommon {
    pub enabled: bool,
    pub url: String,
    pub timeout_secs: u64,
    pub payment_window_days: u32,
    pub login_template: String,
    pub billing_id_template: String,
    pub ca_file: String,
    pub insecure_skip_tls_verify: bool,
}

impl Default for SourceCommon {
    fn default() -> Self {
        Self {
            enabled: true,
            url: String::new(),
            timeout_secs: 30,
            payment_window_days: 3,
            login_template: "{email}".into(),
            billing_id_template: "{source}-{id}".into(),
            ca_file: String::new(),
            insecure_skip_tls_verify: false,
        }
    }
}

/// One enabled source's settings as the engine sees them, whatever the
/// system. `page_size` and `status_map` live in each section because their
/// defaults differ per system.
#[derive(Debug, Clone, Copy)]
pub struct SourceSettings<'a> {
    pub kind: SourceKind,
    pub common: &'a SourceCommon,
    pub page_size: u32,
    pub status_map: &'a BTreeMap<String, CanonicalStatus>,
    /// What its service statuses mean (SPEC §12.1).
    pub service_states: &'a BTreeMap<String, ServiceState>,
    /// The custom attribute that receives the VMS login, for systems that
    /// can take a write-back.
    pub writeback_attribute: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BmAuthMode {
    /// `authinfo=USER:PASS` in every POST body (stateless).
    Authinfo,
    /// `func=auth` once, then `auth=SESSION`; one re-login on an auth error.
    Session,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillmanagerSettings {
    #[serde(flatten)]
    pub common: SourceCommon,
    pub username: String,
    pub password: Secret,
    /// Its `_file` form, read by `secrets::file_overrides`.
    #[serde(skip_serializing)]
    pub password_file: Option<PathBuf>,
    pub auth_mode: BmAuthMode,
    pub page_size: u32,
    pub status_map: BTreeMap<String, CanonicalStatus>,
    pub services: BmServiceSettings,
    /// A secret declared here and nowhere else (tests of `secrets`).
    #[cfg(test)]
    pub test_secret: Secret,
    #[cfg(test)]
    #[serde(skip_serializing)]
    pub test_secret_file: Option<PathBuf>,
}

impl Default for BillmanagerSettings {
    fn default() -> Self {
        Self {
            common: SourceCommon::default(),
            username: String::new(),
            password: Secret::default(),
            password_file: None,
            auth_mode: BmAuthMode::Authinfo,
            page_size: 500,
            services: BmServiceSettings::default(),
            #[cfg(test)]
            test_secret: Secret::default(),
            #[cfg(test)]
            test_secret_file: None,
            status_map: [
                ("1", CanonicalStatus::Active),
                ("2", CanonicalStatus::Suspended),
                ("3", CanonicalStatus::Deleted),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActivePlatformSettings {
    #[serde(flatten)]
    pub common: SourceCommon,
    pub api_token: Secret,
    /// Its `_file` form, read by `secrets::file_overrides`.
    #[serde(skip_serializing)]
    pub api_token_file: Option<PathBuf>,
    pub page_size: u32,
    pub status_map: BTreeMap<String, CanonicalStatus>,
    pub writeback_attribute: String,
    pub services: ApServiceSettings,
}

impl Default for ActivePlatformSettings {
    fn default() -> Self {
        use CanonicalStatus::*;
        Self {
            common: SourceCommon::default(),
            api_token: Secret::default(),
            api_token_file: None,
            page_size: 100,
            status_map: [
                ("active", Active),
                ("administrative hold", Suspended),
                ("administrative_hold", Suspended),
                ("credit hold", Suspended),
                ("credit_hold", Suspended),
                ("deleted", Deleted),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            writeback_attribute: String::new(),
            services: ApServiceSettings::default(),
        }
    }
}

/// `[sources.billmanager.services]` (SPEC §12.1): the product types whose
/// service lists are read, and what their `item_status` codes mean.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BmServiceSettings {
    pub item_types: Vec<String>,
    pub status_map: BTreeMap<String, ServiceState>,
}

impl Default for BmServiceSettings {
    fn default() -> Self {
        use ServiceState::*;
        let map = [
            ("1", Pending),
            ("2", Active),
            ("3", Suspended),
            ("4", Closed),
            ("5", Pending),
        ];
        Self {
            item_types: vec![],
            status_map: map.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        }
    }
}

/// `[sources.activeplatform.services]` (SPEC §12.1): whether subscriptions
/// are read, and what their statuses mean (compared as `status_key`s).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApServiceSettings {
    pub enabled: bool,
    pub status_map: BTreeMap<String, ServiceState>,
}

impl Default for ApServiceSettings {
    fn default() -> Self {
        use ServiceState::*;
        let pending = [
            "ordered",
            "installing",
            "installation_failed",
            "activating",
            "activating_failed",
            "delivered",
            "updating",
            "updating_failed",
            "renewing",
            "renewing_failed",
            "waiting_for_manual_approve",
            "stopping",
            "stopping_failed",
            "deletion_failed",
        ];
        let settled = [
            ("active", Active),
            ("graced", Active),
            ("stopped", Closed),
            ("deleted", Closed),
        ];
        let map = settled.into_iter().chain(pending.map(|p| (p, Pending)));
        Self {
            enabled: false,
            status_map: map.map(|(k, v)| (k.to_string(), v)).collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmsSettings {
    pub url: String,
    pub user_type: String,
    pub properties_field: String,
    pub properties: Vec<String>,
    pub status_active: String,
    pub status_blocked: String,
    pub on_deleted: OnDeleted,
    pub concurrency: u32,
    pub max_requests_per_second: u32,
    pub max_attempts: u32,
    pub max_retry_after_secs: u64,
    pub circuit_breaker_failures: u32,
    /// Base of the across-cycle backoff for pending logins (doubling, capped
    /// at one hour). 0 retries every cycle.
    pub requeue_base_secs: u64,
    pub timeout_secs: u64,
    pub headers: BTreeMap<String, Secret>,
    #[serde(skip_serializing)]
    pub header_files: BTreeMap<String, PathBuf>,
    pub ca_file: String,
    pub insecure_skip_tls_verify: bool,
    pub tree: TreeSettings,
    pub cameras: CameraSettings,
}

impl Default for VmsSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            user_type: "b2c".into(),
            properties_field: "billing_properties".into(),
            properties: vec!["phone".into()],
            status_active: "active".into(),
            status_blocked: "blocked".into(),
            on_deleted: OnDeleted::Block,
            concurrency: 4,
            max_requests_per_second: 20,
            max_attempts: 5,
            max_retry_after_secs: 300,
            circuit_breaker_failures: 20,
            requeue_base_secs: 30,
            timeout_secs: 30,
            headers: BTreeMap::new(),
            header_files: BTreeMap::new(),
            ca_file: String::new(),
            insecure_skip_tls_verify: false,
            tree: TreeSettings::default(),
            cameras: CameraSettings::default(),
        }
    }
}

/// `[vms.cameras]` (SPEC §12.3).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CameraSettings {
    pub enabled: bool,
    pub format: CameraFormat,
    pub on_block: crate::core::cameras::OnBlock,
}

/// How `user/manage/cameras` names groups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CameraFormat {
    /// Bare external ids (23.09+).
    #[default]
    Ids,
    /// `{external_id, status}` objects (25.06+); removed groups are sent
    /// once more as blocked.
    Objects,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TreeSettings {
    pub enabled: bool,
    #[serde(rename = "type")]
    pub kind: String,
}

impl Default for TreeSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            kind: "cameras".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PermissionSettings {
    pub managed: Vec<String>,
    pub rules: Vec<Rule>,
}

impl Default for PermissionSettings {
    fn default() -> Self {
        let managed: Vec<String> = [
            "archives-show",
            "archives-download",
            "archives-preview-download",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        Self {
            rules: vec![Rule {
                name: "paying".into(),
                sources: vec![],
                min_available: Some(Decimal::ZERO),
                paid_within_days: 0,
                attributes: BTreeMap::new(),
                plans: vec![],
                plan_ids: vec![],
                grant: managed.clone(),
                camera_groups: vec![],
            }],
            managed,
        }
    }
}

/// Warnings found while loading, to be logged once logging is up.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub path: PathBuf,
    pub warnings: Vec<String>,
}

/// Which file to read: `--config`, else `$BILLSYNC_CONFIG`, else the default.
/// Where the config file's path came from: errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathOrigin {
    Flag,
    Env,
    Default,
}

impl PathOrigin {
    /// The key a read error is reported under.
    pub fn key(self) -> &'static str {
        match self {
            PathOrigin::Flag => "--config",
            PathOrigin::Env => "$BILLSYNC_CONFIG",
            PathOrigin::Default => "the default config path (no --config, no $BILLSYNC_CONFIG)",
        }
    }
}

pub fn resolve_path(cli: Option<&Path>) -> (PathBuf, PathOrigin) {
    if let Some(p) = cli {
        return (p.to_path_buf(), PathOrigin::Flag);
    }
    match std::env::var_os("BILLSYNC_CONFIG") {
        Some(p) if !p.is_empty() => (PathBuf::from(p), PathOrigin::Env),
        _ => (PathBuf::from(DEFAULT_PATH), PathOrigin::Default),
    }
}

/// `load`, with a read error named after where the path came from.
pub fn load_resolved(
    (path, origin): (PathBuf, PathOrigin),
    env: &[(String, String)],
) -> Result<(Settings, LoadReport), ConfigError> {
    load(&path, env).map_err(|e| match e.key == READ_KEY {
        true => ConfigError::new(origin.key(), e.message),
        false => e,
    })
}

const READ_KEY: &str = "--config";

/// Loads, overrides, resolves secrets and validates. The environment is passed
/// in so tests need not touch the process environment.
pub fn load(path: &Path, env: &[(String, String)]) -> Result<(Settings, LoadReport), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(READ_KEY, format!("cannot read {}: {e}", path.display())))?;
    // The file is checked strictly first (the config crate would quietly
    // turn `enabled = 3` into `true`).
    serde_path_to_error::deserialize::<_, Settings>(toml::Deserializer::new(&text)).map_err(
        |e| {
            let key = e.path().to_string();
            let doc = toml::from_str::<toml::Value>(&text).ok();
            let section = section_of(&key, |k| doc.as_ref()?.get("sources")?.get(k).cloned());
            error_at(field_key(key, section), e.inner().message())
        },
    )?;
    let mut builder = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml));
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let key = rest.to_ascii_lowercase().replace("__", ".");
        if key.is_empty() {
            continue;
        }
        let value = if is_secret_key(&key) {
            config::Value::from(raw.to_string())
        } else {
            env_value(raw)
        };
        builder = builder
            .set_override(key.clone(), value)
            .map_err(|e| ConfigError::new(key, e.to_string()))?;
    }
    let build = |b: config::builder::ConfigBuilder<config::builder::DefaultState>| {
        b.build()
            .map_err(|e| error_at(config_error_key(&e), &e.to_string()))
    };
    let cfg = build(builder.clone())?;
    // `KEY_file` secrets are read into `KEY`, then everything is built again.
    let files = secrets::file_overrides(&cfg)?;
    let cfg = match files.is_empty() {
        true => cfg,
        false => {
            for (key, value) in files {
                builder = builder
                    .set_override(key, value)
                    .map_err(|e| ConfigError::new(key, e.to_string()))?;
            }
            build(builder)?
        }
    };
    let mut settings: Settings = serde_path_to_error::deserialize(cfg.clone()).map_err(|e| {
        let key = e.path().to_string();
        let section = section_of(&key, |k| {
            cfg.get::<config::Value>(&format!("sources.{k}")).ok()
        });
        error_at(field_key(key, section), &e.inner().to_string())
    })?;

    let mut report = LoadReport {
        path: path.to_path_buf(),
        warnings: vec![],
    };
    secrets::resolve_header_files(&mut settings)?;
    validate(&settings)?;
    register_secrets(&settings)?;
    if any_inline_secret(&text) && world_readable(path) {
        report.warnings.push(format!(
            "config file {} holds a secret and is readable by other users; chmod 600 it or use *_file secrets",
            path.display()
        ));
    }
    for (key, on) in insecure_flags(&settings) {
        if on {
            report.warnings.push(format!(
                "{key} = true: TLS certificates are NOT verified for this peer"
            ));
        }
    }
    Ok((settings, report))
}

/// A source section's value when `key` names one (an error inside it);
/// `get` looks a section up by source name.
fn section_of<V>(key: &str, get: impl Fn(&str) -> Option<V>) -> Option<V> {
    let kind = SourceKind::parse(key.strip_prefix("sources.")?)?;
    get(kind.as_str())
}

/// The key of an error. Errors in a source's shared fields lose their last
/// segment (serde buffers flattened fields), so the section is read again
/// on its own to find the field.
fn field_key<'de, D: serde::Deserializer<'de>>(key: String, section: Option<D>) -> String {
    if key == "." {
        return "config".into();
    }
    match section.map(serde_path_to_error::deserialize::<_, SourceCommon>) {
        Some(Err(e)) => format!("{key}.{}", e.path()),
        _ => key,
    }
}

/// Reads the process environment for `load`.
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect()
}

/// An environment value is read as TOML (numbers, booleans, arrays, inline
/// tables); anything that does not parse is a plain string.
fn env_value(raw: &str) -> config::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => match t.remove("v") {
            Some(v) => toml_to_config(v),
            None => config::Value::from(raw.to_string()),
        },
        Err(_) => config::Value::from(raw.to_string()),
    }
}

fn toml_to_config(v: toml::Value) -> config::Value {
    use config::{Value, ValueKind};
    let kind = match v {
        toml::Value::String(s) => ValueKind::String(s),
        toml::Value::Integer(i) => ValueKind::I64(i),
        toml::Value::Float(f) => ValueKind::Float(f),
        toml::Value::Boolean(b) => ValueKind::Boolean(b),
        toml::Value::Datetime(d) => ValueKind::String(d.to_string()),
        toml::Value::Array(a) => ValueKind::Array(a.into_iter().map(toml_to_config).collect()),
        toml::Value::Table(t) => {
            ValueKind::Table(t.into_iter().map(|(k, v)| (k, toml_to_config(v))).collect())
        }
    };
    Value::new(None, kind)
}

fn config_error_key(e: &config::ConfigError) -> String {
    match e {
        config::ConfigError::Type { key: Some(k), .. } => k.clone(),
        config::ConfigError::NotFound(k) => k.clone(),
        config::ConfigError::At { key: Some(k), .. } => k.clone(),
        _ => "config".into(),
    }
}

/// An error at `key`. Parse errors quote values: for a secret key (or a
/// source section, whose flattened fields hide which one failed) the message
/// is replaced, and no message may carry a known secret.
fn error_at(key: String, msg: &str) -> ConfigError {
    let section = key
        .strip_prefix("sources.")
        .is_some_and(|k| SourceKind::parse(k).is_some());
    if is_secret_key(&key) {
        ConfigError::new(key, "must be a string (value not shown: it is a secret)")
    } else if section && msg.starts_with("invalid") && msg.contains('`') {
        let kind = msg.split('`').next().unwrap_or(msg).trim_end();
        ConfigError::new(key, format!("{kind} (value not shown)"))
    } else {
        ConfigError::new(key, redact::scrub(msg))
    }
}

#[cfg(unix)]
fn world_readable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o004 != 0)
        .unwrap_or(false)
}

#[cfg(not(unix))]
fn world_readable(_: &Path) -> bool {
    false
}

fn insecure_flags(s: &Settings) -> Vec<(String, bool)> {
    let mut v = vec![(
        "vms.insecure_skip_tls_verify".to_string(),
        s.vms.insecure_skip_tls_verify,
    )];
    for kind in SourceKind::ALL {
        if let Some(c) = s.configured(kind) {
            v.push((
                format!("sources.{kind}.insecure_skip_tls_verify"),
                c.insecure_skip_tls_verify,
            ));
        }
    }
    v
}

fn check_url(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::new(key, "is required"));
    }
    let url =
        url::Url::parse(value).map_err(|e| ConfigError::new(key, format!("not a URL ({e})")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(ConfigError::new(key, "must be http:// or https://"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::new(
            key,
            "must not carry credentials; use the secret keys",
        ));
    }
    Ok(())
}

fn check_ca(key: &str, value: &str) -> Result<(), ConfigError> {
    if !value.is_empty() && !Path::new(value).is_file() {
        return Err(ConfigError::new(
            key,
            format!("{value} is not a readable file"),
        ));
    }
    Ok(())
}

fn check_template(key: &str, t: &str, allowed: &[&str]) -> Result<(), ConfigError> {
    crate::core::normalize::Template::parse(t, allowed)
        .map(|_| ())
        .map_err(|e| ConfigError::new(key, e))
}

/// Seconds between two fires of a cron expression (with seconds).
pub fn schedule_period(expr: &str) -> Duration {
    let parsed = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(expr);
    let Ok(cron) = parsed else {
        return Duration::from_secs(60);
    };
    let mut it = cron.iter_after(chrono::Utc::now());
    match (it.next(), it.next()) {
        (Some(a), Some(b)) => (b - a).to_std().unwrap_or(Duration::from_secs(60)),
        _ => Duration::from_secs(60),
    }
}

/// A bound for day counts: a century. Beyond it date arithmetic overflows.
pub const MAX_DAYS: u32 = 36_500;
/// A bound for second counts that become timers: a week.
pub const MAX_SECS: u64 = 7 * 86_400;

fn check_at_most(key: &str, v: u64, max: u64, unit: &str) -> Result<(), ConfigError> {
    if v > max {
        return Err(ConfigError::new(
            key,
            format!("must be at most {max} {unit}"),
        ));
    }
    Ok(())
}

fn check_days(key: &str, v: u32) -> Result<(), ConfigError> {
    check_at_most(key, v.into(), MAX_DAYS.into(), "days")
}

fn check_secs(key: &str, v: u64) -> Result<(), ConfigError> {
    check_at_most(key, v, MAX_SECS, "seconds")
}

fn check_positive(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::new(key, "must be greater than 0"));
    }
    Ok(())
}

pub fn validate_cron(key: &str, expr: &str) -> Result<(), ConfigError> {
    croner_check(expr).map_err(|e| ConfigError::new(key, e))
}

/// Six fields (seconds first), as tokio-cron-scheduler takes them.
fn croner_check(expr: &str) -> Result<(), String> {
    let fields = expr.split_whitespace().count();
    if !(6..=7).contains(&fields) {
        return Err(format!(
            "\"{expr}\" must be a cron expression with seconds (6 fields), e.g. \"0 * * * * *\""
        ));
    }
    tokio_cron_scheduler::Job::new_async(expr, |_, _| Box::pin(async {}))
        .map(|_| ())
        .map_err(|e| format!("\"{expr}\" is not a valid schedule ({e})"))
}

/// What every enabled source needs, then its own secret and extras.
fn validate_source(s: &Settings, kind: SourceKind) -> Result<(), ConfigError> {
    let Some(src) = s.source(kind) else {
        return Ok(());
    };
    let k = |f: &str| format!("sources.{kind}.{f}");
    let c = src.common;
    check_url(&k("url"), &c.url)?;
    check_positive(&k("page_size"), src.page_size.into())?;
    check_positive(&k("timeout_secs"), c.timeout_secs)?;
    check_secs(&k("timeout_secs"), c.timeout_secs)?;
    check_positive(&k("payment_window_days"), c.payment_window_days.into())?;
    check_days(&k("payment_window_days"), c.payment_window_days)?;
    check_template(&k("login_template"), &c.login_template, &TEMPLATE_VARS)?;
    check_template(
        &k("billing_id_template"),
        &c.billing_id_template,
        &TEMPLATE_VARS,
    )?;
    check_ca(&k("ca_file"), &c.ca_file)?;
    let required = |set: bool, key: &str| match set {
        true => Ok(()),
        false => Err(ConfigError::new(
            k(key),
            format!("is required (or {key}_file)"),
        )),
    };
    match kind {
        SourceKind::Billmanager => {
            let bm = s.sources.billmanager.as_ref().expect("enabled");
            if bm.username.is_empty() {
                return Err(ConfigError::new(k("username"), "is required"));
            }
            required(bm.password.is_set(), "password")?;
            if bm.username.contains(':') {
                return Err(ConfigError::new(k("username"), "must not contain ':'"));
            }
        }
        SourceKind::Activeplatform => {
            let ap = s.sources.activeplatform.as_ref().expect("enabled");
            required(ap.api_token.is_set(), "api_token")?;
        }
    }
    Ok(())
}

fn validate(s: &Settings) -> Result<(), ConfigError> {
    let d = &s.daemon;
    if d.state_path.as_os_str().is_empty() && !d.state_url.is_set() {
        return Err(ConfigError::new("daemon.state_path", "is required"));
    }
    if let Some(url) = d.state_url.expose() {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            let why = "must be a postgres:// URL (leave it unset for SQLite at state_path)";
            return Err(ConfigError::new("daemon.state_url", why));
        }
    }
    if d.lease_secs < 3 {
        return Err(ConfigError::new("daemon.lease_secs", "must be at least 3"));
    }
    check_secs("daemon.lease_secs", d.lease_secs)?;
    validate_cron("daemon.schedule", &d.schedule)?;
    if !d.payments_schedule.is_empty() {
        validate_cron("daemon.payments_schedule", &d.payments_schedule)?;
    }
    if !d.full_resync_schedule.is_empty() {
        validate_cron("daemon.full_resync_schedule", &d.full_resync_schedule)?;
    }
    check_positive("daemon.control_poll_secs", d.control_poll_secs)?;
    check_secs("daemon.control_poll_secs", d.control_poll_secs)?;
    check_secs("daemon.shutdown_grace_secs", d.shutdown_grace_secs)?;
    check_positive("daemon.audit_retention_days", d.audit_retention_days.into())?;
    check_days("daemon.audit_retention_days", d.audit_retention_days)?;
    check_at_most(
        "daemon.reverify_hours",
        d.reverify_hours.into(),
        8760,
        "hours",
    )?;
    if s.admin.tls_cert_file.is_some() != s.admin.tls_key_file.is_some() {
        let why = "admin.tls_cert_file and admin.tls_key_file go together: set both or neither";
        return Err(ConfigError::new("admin.tls_key_file", why));
    }
    s.admin
        .listen
        .parse::<std::net::SocketAddr>()
        .map_err(|e| ConfigError::new("admin.listen", format!("not HOST:PORT ({e})")))?;
    if !(0.0..=1.0).contains(&s.safety.max_deprovision_ratio) {
        return Err(ConfigError::new(
            "safety.max_deprovision_ratio",
            "must be between 0.0 and 1.0",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for p in &s.sources.priority {
        if !seen.insert(*p) {
            return Err(ConfigError::new(
                "sources.priority",
                format!("{p} is listed twice"),
            ));
        }
    }
    let enabled = s.enabled_sources();
    for src in &enabled {
        if !s.sources.priority.contains(src) {
            return Err(ConfigError::new(
                "sources.priority",
                format!("enabled source {src} is missing from the list"),
            ));
        }
    }
    for kind in enabled {
        validate_source(s, kind)?;
    }
    let v = &s.vms;
    check_url("vms.url", &v.url)?;
    if v.user_type.is_empty() || v.user_type.chars().count() > 50 {
        return Err(ConfigError::new(
            "vms.user_type",
            "must be 1 to 50 characters",
        ));
    }
    if v.properties_field.is_empty() {
        return Err(ConfigError::new("vms.properties_field", "is required"));
    }
    for p in &v.properties {
        if !["phone", "email", "name"].contains(&p.as_str()) {
            return Err(ConfigError::new(
                "vms.properties",
                format!("unknown property {p:?}: use phone, email or name"),
            ));
        }
    }
    check_positive("vms.concurrency", v.concurrency.into())?;
    check_positive(
        "vms.max_requests_per_second",
        v.max_requests_per_second.into(),
    )?;
    check_positive("vms.max_attempts", v.max_attempts.into())?;
    check_positive(
        "vms.circuit_breaker_failures",
        v.circuit_breaker_failures.into(),
    )?;
    check_positive("vms.timeout_secs", v.timeout_secs)?;
    check_secs("vms.timeout_secs", v.timeout_secs)?;
    check_secs("vms.requeue_base_secs", v.requeue_base_secs)?;
    for name in v.headers.keys() {
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(ConfigError::new(
                format!("vms.headers.{name}"),
                "not a valid HTTP header name",
            ));
        }
    }
    for (name, value) in &v.headers {
        let ok = value
            .expose()
            .map(|x| reqwest::header::HeaderValue::from_str(x).is_ok())
            .unwrap_or(false);
        if !ok {
            return Err(ConfigError::new(
                format!("vms.headers.{name}"),
                "empty or not a valid HTTP header value",
            ));
        }
    }
    check_ca("vms.ca_file", &v.ca_file)?;
    if !["cameras", "intercoms", "camera_intercom"].contains(&v.tree.kind.as_str()) {
        return Err(ConfigError::new(
            "vms.tree.type",
            "must be cameras, intercoms or camera_intercom",
        ));
    }
    let managed = &s.permissions.managed;
    for (i, rule) in s.permissions.rules.iter().enumerate() {
        let key = format!("permissions.rules[{i}].paid_within_days");
        check_days(&key, rule.paid_within_days)?;
        for g in &rule.grant {
            if !managed.contains(g) {
                return Err(ConfigError::new(
                    format!("permissions.rules[{i}].grant"),
                    format!("{g:?} is not in permissions.managed"),
                ));
            }
        }
        camera_groups_are_pushed(s, i, rule)?;
        plans_are_read(s, i, rule)?;
    }
    Ok(())
}

/// A rule on plans matches only accounts whose services are read: on a
/// source that reads none it would match no one and take what it grants
/// away from everyone. Each source it covers must read services.
fn plans_are_read(
    s: &Settings,
    i: usize,
    rule: &crate::core::rules::Rule,
) -> Result<(), ConfigError> {
    if rule.plans.is_empty() && rule.plan_ids.is_empty() {
        return Ok(());
    }
    let covered = match rule.sources.is_empty() {
        true => s.enabled_sources(),
        false => rule.sources.clone(),
    };
    let reads = |kind: SourceKind| match kind {
        SourceKind::Billmanager => {
            (s.sources.billmanager.as_ref()).is_some_and(|b| !b.services.item_types.is_empty())
        }
        SourceKind::Activeplatform => {
            (s.sources.activeplatform.as_ref()).is_some_and(|a| a.services.enabled)
        }
    };
    match covered.into_iter().find(|k| !reads(*k)) {
        None => Ok(()),
        Some(kind) => Err(ConfigError::new(
            format!("permissions.rules[{i}].plans"),
            format!(
                "sources.{kind} reads no services (set its [services]), or name the sources \
                 the rule is for: it would match none of its accounts"
            ),
        )),
    }
}

/// A rule granting camera groups changes nothing unless billsync pushes
/// camera access, and each template names only placeholders it knows.
fn camera_groups_are_pushed(
    s: &Settings,
    i: usize,
    rule: &crate::core::rules::Rule,
) -> Result<(), ConfigError> {
    let key = || format!("permissions.rules[{i}].camera_groups");
    if !rule.camera_groups.is_empty() && !s.vms.cameras.enabled {
        let why = "camera groups are pushed only with [vms.cameras] enabled = true";
        return Err(ConfigError::new(key(), why));
    }
    for template in &rule.camera_groups {
        crate::core::entitlements::check_template(template)
            .map_err(|why| ConfigError::new(key(), format!("{template:?}: {why}")))?;
    }
    Ok(())
}

impl Settings {
    /// Enabled sources in priority order.
    pub fn enabled_sources(&self) -> Vec<SourceKind> {
        let mut v: Vec<SourceKind> = SourceKind::ALL
            .into_iter()
            .filter(|k| self.source(*k).is_some())
            .collect();
        v.sort_by_key(|s| {
            self.sources
                .priority
                .iter()
                .position(|p| p == s)
                .unwrap_or(usize::MAX)
        });
        v
    }

    /// The effective config as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// The shared part of a source's section, enabled or not (None: absent).
    pub fn configured(&self, kind: SourceKind) -> Option<&SourceCommon> {
        match kind {
            SourceKind::Billmanager => self.sources.billmanager.as_ref().map(|b| &b.common),
            SourceKind::Activeplatform => self.sources.activeplatform.as_ref().map(|a| &a.common),
        }
    }

    /// An enabled source's settings; None when absent or disabled.
    pub fn source(&self, kind: SourceKind) -> Option<SourceSettings<'_>> {
        let view = match kind {
            SourceKind::Billmanager => self.sources.billmanager.as_ref().map(|b| SourceSettings {
                kind,
                common: &b.common,
                page_size: b.page_size,
                status_map: &b.status_map,
                service_states: &b.services.status_map,
                writeback_attribute: None,
            }),
            SourceKind::Activeplatform => {
                self.sources
                    .activeplatform
                    .as_ref()
                    .map(|a| SourceSettings {
                        kind,
                        common: &a.common,
                        page_size: a.page_size,
                        status_map: &a.status_map,
                        service_states: &a.services.status_map,
                        writeback_attribute: Some(a.writeback_attribute.as_str())
                            .filter(|w| !w.is_empty()),
                    })
            }
        };
        view.filter(|v| v.common.enabled)
    }

    pub fn bm(&self) -> Option<&BillmanagerSettings> {
        self.sources
            .billmanager
            .as_ref()
            .filter(|b| b.common.enabled)
    }

    pub fn ap(&self) -> Option<&ActivePlatformSettings> {
        self.sources
            .activeplatform
            .as_ref()
            .filter(|a| a.common.enabled)
    }

    /// Rolling re-verification's pacing: the incremental schedule's
    /// interval and `daemon.reverify_hours`.
    pub fn pacing(&self) -> crate::core::pacing::Pacing {
        crate::core::pacing::Pacing {
            interval_secs: schedule_period(&self.daemon.schedule).as_secs(),
            period_secs: u64::from(self.daemon.reverify_hours) * 3600,
        }
    }

    /// The settings the pure core reads, in its own types.
    pub fn core_config(&self) -> CoreConfig {
        CoreConfig {
            priority: self.sources.priority.clone(),
            missing_grace_cycles: self.daemon.missing_grace_cycles,
            rules: self.permissions.rules.clone(),
            managed: self.permissions.managed.clone(),
            user_type: self.vms.user_type.clone(),
            properties: self.vms.properties.clone(),
            status_active: self.vms.status_active.clone(),
            status_blocked: self.vms.status_blocked.clone(),
            on_deleted: self.vms.on_deleted,
            tree_type: self.vms.tree.enabled.then(|| self.vms.tree.kind.clone()),
            writeback: SourceKind::ALL
                .into_iter()
                .filter_map(|k| {
                    let attr = self.source(k)?.writeback_attribute?;
                    Some((k, attr.to_string()))
                })
                .collect(),
            cameras: self.vms.cameras.enabled.then_some(CameraPolicy {
                on_block: self.vms.cameras.on_block,
                own_group: self.vms.tree.enabled,
            }),
        }
    }

    /// How an enabled source's records are normalized.
    pub fn normalizer(&self, kind: SourceKind) -> Result<Normalizer, String> {
        let src = self
            .source(kind)
            .ok_or_else(|| format!("{kind} is not enabled"))?;
        let mut n = Normalizer::new(
            kind,
            &src.common.login_template,
            &src.common.billing_id_template,
            src.status_map,
        )?;
        n.service_states = src.service_states.clone();
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    const MINIMAL: &str = r#"
[vms]
url = "http://127.0.0.1:1"
[sources.activeplatform]
url = "http://127.0.0.1:2"
api_token = "tok-123456"
"#;

    #[test]
    fn defaults_follow_spec() {
        let f = write(MINIMAL);
        let (s, _) = load(f.path(), &[]).unwrap();
        assert_eq!(s.daemon.schedule, "0 * * * * *");
        assert_eq!(s.daemon.missing_grace_cycles, 2);
        assert_eq!(s.vms.concurrency, 4);
        assert_eq!(s.vms.properties_field, "billing_properties");
        assert_eq!(s.admin.listen, "127.0.0.1:9187");
        assert_eq!(s.enabled_sources(), vec![SourceKind::Activeplatform]);
        let ap = s.ap().unwrap();
        assert_eq!(ap.page_size, 100);
        assert_eq!(
            ap.status_map.get("credit_hold"),
            Some(&CanonicalStatus::Suspended)
        );
        assert_eq!(s.permissions.rules.len(), 1);
    }

    #[test]
    fn env_overrides_are_typed() {
        let f = write(MINIMAL);
        let env = vec![
            ("BILLSYNC__VMS__CONCURRENCY".to_string(), "9".to_string()),
            (
                "BILLSYNC__VMS__PROPERTIES".to_string(),
                r#"["phone", "email"]"#.to_string(),
            ),
            (
                "BILLSYNC__VMS__URL".to_string(),
                "http://127.0.0.1:7".to_string(),
            ),
            (
                "BILLSYNC__VMS__TREE__ENABLED".to_string(),
                "true".to_string(),
            ),
        ];
        let (s, _) = load(f.path(), &env).unwrap();
        assert_eq!(s.vms.concurrency, 9);
        assert_eq!(s.vms.properties, vec!["phone", "email"]);
        assert_eq!(s.vms.url, "http://127.0.0.1:7");
        assert!(s.vms.tree.enabled);
    }

    #[test]
    fn unknown_key_is_named() {
        let f = write(&format!("{MINIMAL}\n[daemon]\nschedul = \"x\"\n"));
        let e = load(f.path(), &[]).unwrap_err();
        assert_eq!(e.key, "daemon.schedul");
        assert!(e.message.contains("schedul"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let f = write(&MINIMAL.replace("[vms]", "[vms]\nconcurrency = \"many\""));
        let e = load(f.path(), &[]).unwrap_err();
        assert_eq!(e.key, "vms.concurrency", "{e}");
    }

    #[test]
    fn secret_file_is_read_and_trimmed() {
        let secret = write("from-file-secret\n");
        let text = MINIMAL.replace(
            "api_token = \"tok-123456\"",
            &format!("api_token_file = {:?}", secret.path()),
        );
        let f = write(&text);
        let (s, _) = load(f.path(), &[]).unwrap();
        assert_eq!(s.ap().unwrap().api_token.expose(), Some("from-file-secret"));
        let shown = s.to_masked_toml();
        assert!(!shown.contains("from-file-secret"), "{shown}");
        assert!(shown.contains("***"));
    }

    /// Issue 17: a secret is declared once, by its type. `test_secret`
    /// exists only in this test build, in the BILLmanager section, and
    /// nothing else names it: masking, redaction, the inline-secret warning,
    /// the verbatim environment override and its `_file` form all follow.
    #[test]
    fn a_secret_field_declared_in_one_section_is_handled_everywhere() {
        use std::os::unix::fs::PermissionsExt;
        let section = "[sources.billmanager]\nurl = \"http://127.0.0.1:3\"\nusername = \"api\"\npassword = \"pw-0123456\"\n";
        let inline = format!("{MINIMAL}{section}test_secret = \"declared-once-4711\"\n");
        let f = write(&inline);
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let (s, report) = load(f.path(), &[]).unwrap();
        let bm = s.sources.billmanager.as_ref().unwrap();
        assert_eq!(bm.test_secret.expose(), Some("declared-once-4711"));
        assert!(!s.to_masked_toml().contains("declared-once-4711"));
        assert!(!format!("{s:?}").contains("declared-once-4711"));
        let line = redact::scrub("connecting with declared-once-4711");
        assert!(!line.contains("declared-once-4711"), "{line}");
        assert!(report.warnings.iter().any(|w| w.contains("readable")));
        // Only the secret makes the file one that holds a secret.
        let without = MINIMAL.replace("api_token = \"tok-123456\"", "api_token_file = \"/x\"");
        assert!(!secrets::any_inline_secret(&without));
        assert!(secrets::any_inline_secret(&format!("{without}{section}")));
        // From the environment it is taken verbatim, and named, never
        // quoted, when it is wrong.
        assert!(is_secret_key("sources.billmanager.test_secret"));
        let env = [(
            "BILLSYNC__SOURCES__BILLMANAGER__TEST_SECRET".to_string(),
            "1e3".to_string(),
        )];
        let (s, _) = load(write(&format!("{MINIMAL}{section}")).path(), &env).unwrap();
        let bm = s.sources.billmanager.as_ref().unwrap();
        assert_eq!(bm.test_secret.expose(), Some("1e3"));
        let bad = format!("{MINIMAL}{section}test_secret = 42\n");
        let e = load(write(&bad).path(), &[]).unwrap_err();
        assert!(
            e.message.contains("secret") && !e.message.contains("42"),
            "{e}"
        );
        // Its `_file` form is read, and both at once is refused.
        let file = write("from-a-file-0815\n");
        let by_file = format!("{MINIMAL}{section}test_secret_file = {:?}\n", file.path());
        let (s, _) = load(write(&by_file).path(), &[]).unwrap();
        let bm = s.sources.billmanager.as_ref().unwrap();
        assert_eq!(bm.test_secret.expose(), Some("from-a-file-0815"));
        let both = format!("{by_file}test_secret = \"x\"\n");
        let e = load(write(&both).path(), &[]).unwrap_err();
        assert_eq!(e.key, "sources.billmanager.test_secret_file", "{e}");
    }

    /// The shared source fields are flattened: the section still rejects
    /// unknown keys and names the key of a wrong type.
    #[test]
    fn source_sections_stay_strict() {
        let with =
            |line: &str| write(&MINIMAL.replace("api_token = ", &format!("{line}\napi_token = ")));
        let e = load(with("urll = \"http://x\"").path(), &[]).unwrap_err();
        assert!(e.message.contains("urll"), "{e}");
        let e = load(with("timeout_secs = \"soon\"").path(), &[]).unwrap_err();
        assert_eq!(e.key, "sources.activeplatform.timeout_secs", "{e}");
        let e = load(with("enabled = 3").path(), &[]).unwrap_err();
        assert_eq!(e.key, "sources.activeplatform.enabled", "{e}");
        let env = [(
            "BILLSYNC__SOURCES__ACTIVEPLATFORM__PAYMENT_WINDOW_DAYS".to_string(),
            "7".to_string(),
        )];
        let (s, _) = load(with("page_size = 50").path(), &env).unwrap();
        let late = [(
            "BILLSYNC__SOURCES__ACTIVEPLATFORM__TIMEOUT_SECS".to_string(),
            "soon".to_string(),
        )];
        let e = load(with("page_size = 50").path(), &late).unwrap_err();
        assert_eq!(e.key, "sources.activeplatform.timeout_secs", "{e}");
        let ap = s.source(SourceKind::Activeplatform).unwrap();
        assert_eq!((ap.page_size, ap.common.payment_window_days), (50, 7));
        assert_eq!(ap.common.login_template, "{email}");
    }

    #[test]
    fn masked_config_reads_back() {
        let f = write(&MINIMAL.replace("[vms]", "[sources.billmanager]\nenabled = false\n[vms]"));
        let (s, _) = load(f.path(), &[]).unwrap();
        let shown = s.to_masked_toml();
        let back: Settings = toml::from_str(&shown).unwrap();
        assert_eq!(back.enabled_sources(), vec![SourceKind::Activeplatform]);
        assert!(back.configured(SourceKind::Billmanager).is_some());
        assert_eq!(back.sources.activeplatform.unwrap().page_size, 100);
    }

    #[test]
    fn missing_secret_is_an_error() {
        let f = write(&MINIMAL.replace("api_token = \"tok-123456\"", ""));
        let e = load(f.path(), &[]).unwrap_err();
        assert_eq!(e.key, "sources.activeplatform.api_token");
    }

    #[test]
    fn bad_schedule_and_grant_are_rejected() {
        let f = write(&format!("{MINIMAL}\n[daemon]\nschedule = \"* * * * *\"\n"));
        assert_eq!(load(f.path(), &[]).unwrap_err().key, "daemon.schedule");
        let f = write(&format!(
            "{MINIMAL}\n[[permissions.rules]]\nname = \"x\"\ngrant = [\"groups-all\"]\n"
        ));
        assert_eq!(
            load(f.path(), &[]).unwrap_err().key,
            "permissions.rules[0].grant"
        );
    }

    /// Plan rules and service sections parse with SPEC §12's defaults (ids
    /// as strings or integers); camera groups are refused while cameras are
    /// not pushed (a rule granting them would change nothing), and so is a
    /// template with a placeholder nobody fills.
    #[test]
    fn plan_rules_and_camera_groups_parse() {
        let rule = "[[permissions.rules]]\nname = \"x\"\nplans = [\"Video 30\"]\nplan_ids = [7, \" 8 \"]\ngrant = []\n";
        let services = "[sources.activeplatform.services]\nenabled = true\nstatus_map = { graced = \"active\" }\n";
        let (s, _) = load(write(&format!("{MINIMAL}\n{rule}{services}")).path(), &[]).unwrap();
        assert_eq!(s.permissions.rules[0].plan_ids, ["7", "8"]);
        let ap = s.sources.activeplatform.as_ref().unwrap();
        assert!(ap.services.enabled);
        // A status_map given replaces the defaults, as for accounts.
        assert_eq!(ap.services.status_map.len(), 1);
        let e = load(write(&format!("{MINIMAL}\n{rule}")).path(), &[]).unwrap_err();
        assert_eq!(
            e.key, "permissions.rules[0].plans",
            "no source reads services: {e}"
        );
        let f = write(&format!(
            "{MINIMAL}\n[[permissions.rules]]\nname = \"x\"\ncamera_groups = [\"{{billing_id}}\"]\ngrant = []\n"
        ));
        let e = load(f.path(), &[]).unwrap_err();
        assert_eq!(e.key, "permissions.rules[0].camera_groups", "{e}");
        assert!(e.to_string().contains("[vms.cameras]"), "{e}");
        let on = "[vms.cameras]\nenabled = true\nformat = \"objects\"\non_block = \"clear\"\n";
        let rule = |t: &str| {
            format!("{MINIMAL}\n{on}[[permissions.rules]]\nname = \"x\"\ncamera_groups = [\"{t}\"]\ngrant = []\n")
        };
        let (s, _) = load(write(&rule("zone-{attr:Zone}-{id}")).path(), &[]).unwrap();
        assert_eq!(s.vms.cameras.format, CameraFormat::Objects);
        assert_eq!(s.vms.cameras.on_block, crate::core::cameras::OnBlock::Clear);
        for bad in ["{email}", "{attr:}", "open-{id"] {
            let e = load(write(&rule(bad)).path(), &[]).unwrap_err();
            assert_eq!(e.key, "permissions.rules[0].camera_groups", "{bad}: {e}");
        }
        let ap = ApServiceSettings::default();
        assert_eq!(ap.status_map["graced"], ServiceState::Active);
        assert_eq!(ap.status_map["stopped"], ServiceState::Closed);
        assert_eq!(
            BmServiceSettings::default().status_map["5"],
            ServiceState::Pending
        );
    }

    #[test]
    fn bad_status_map_value_is_named() {
        let f = write(&MINIMAL.replace(
            "api_token = \"tok-123456\"",
            "api_token = \"t\"\nstatus_map = { \"x\" = \"gone\" }",
        ));
        let e = load(f.path(), &[]).unwrap_err();
        assert!(
            e.key.starts_with("sources.activeplatform.status_map"),
            "{e}"
        );
    }

    #[test]
    fn world_readable_secret_file_warns() {
        use std::os::unix::fs::PermissionsExt;
        let f = write(MINIMAL);
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let (_, report) = load(f.path(), &[]).unwrap();
        assert!(report.warnings.iter().any(|w| w.contains("readable")));
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        let (_, report) = load(f.path(), &[]).unwrap();
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    }

    #[test]
    fn insecure_tls_warns() {
        let f = write(&MINIMAL.replace("[vms]", "[vms]\ninsecure_skip_tls_verify = true"));
        let (_, report) = load(f.path(), &[]).unwrap();
        assert!(report
            .warnings
            .iter()
            .any(|w| w.contains("vms.insecure_skip_tls_verify")));
    }

    /// A secret of the wrong type is named, never quoted (SPEC §11).
    #[test]
    fn secret_of_wrong_type_is_not_echoed() {
        let cases = [
            MINIMAL.replace("[vms]", "[admin]\ntoken = 987654321987\n[vms]"),
            MINIMAL.replace("api_token = \"tok-123456\"", "api_token = 987654321987"),
            format!("{MINIMAL}\n[sources.billmanager]\nurl = \"http://127.0.0.1:3\"\nusername = \"u\"\npassword = 987654321987\n"),
            MINIMAL.replace("[vms]", "[vms]\nheaders = { X-Key = 987654321987 }"),
        ];
        for text in cases {
            let f = write(&text);
            let e = load(f.path(), &[]).unwrap_err();
            assert!(!e.to_string().contains("987654321987"), "{e}");
            assert!(
                e.key.contains("token") || e.key.contains("password") || e.key.contains("headers"),
                "{e}"
            );
        }
    }

    /// Secrets from the environment are strings, verbatim: `1e3` stays `1e3`.
    #[test]
    fn secret_from_env_is_verbatim() {
        let f = write(MINIMAL);
        for raw in ["1e3", "true", "0123", "[1,2]", "\"quoted\""] {
            let env = [
                ("BILLSYNC__ADMIN__TOKEN".to_string(), raw.to_string()),
                (
                    "BILLSYNC__SOURCES__ACTIVEPLATFORM__API_TOKEN".to_string(),
                    raw.to_string(),
                ),
            ];
            let (s, _) = load(f.path(), &env).unwrap();
            assert_eq!(s.admin.token.expose(), Some(raw));
            assert_eq!(s.ap().unwrap().api_token.expose(), Some(raw));
        }
    }

    /// Before: `audit_retention_days = 4000000000` passed (only > 0 was
    /// checked) and panicked on date arithmetic in the first cycle.
    #[test]
    fn day_and_timer_settings_are_bounded() {
        let cases = [
            (
                "BILLSYNC__DAEMON__AUDIT_RETENTION_DAYS",
                "4000000000",
                "daemon.audit_retention_days",
            ),
            (
                "BILLSYNC__DAEMON__AUDIT_RETENTION_DAYS",
                "36501",
                "daemon.audit_retention_days",
            ),
            (
                "BILLSYNC__SOURCES__ACTIVEPLATFORM__PAYMENT_WINDOW_DAYS",
                "4000000000",
                "sources.activeplatform.payment_window_days",
            ),
            (
                "BILLSYNC__SOURCES__ACTIVEPLATFORM__PAYMENT_WINDOW_DAYS",
                "0",
                "sources.activeplatform.payment_window_days",
            ),
            (
                "BILLSYNC__DAEMON__CONTROL_POLL_SECS",
                "18446744073709551615",
                "daemon.control_poll_secs",
            ),
            (
                "BILLSYNC__VMS__TIMEOUT_SECS",
                "99999999999",
                "vms.timeout_secs",
            ),
        ];
        let f = write(MINIMAL);
        for (name, value, key) in cases {
            let e = load(f.path(), &[(name.to_string(), value.to_string())]).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
        let rule = format!(
            "{MINIMAL}\n[[permissions.rules]]\nname = \"x\"\npaid_within_days = 4000000000\ngrant = []\n"
        );
        let e = load(write(&rule).path(), &[]).unwrap_err();
        assert_eq!(e.key, "permissions.rules[0].paid_within_days", "{e}");
        let ok = [(
            "BILLSYNC__DAEMON__AUDIT_RETENTION_DAYS".to_string(),
            "36500".to_string(),
        )];
        assert!(load(f.path(), &ok).is_ok());
    }
}
