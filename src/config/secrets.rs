//! Secrets, declared once: a settings field of type [`Secret`] is a secret,
//! and its `NAME_file` sibling (an `Option<PathBuf>`, not serialized) names
//! a file holding it. Everything else is derived from that declaration by
//! walking the settings' serialization: which keys are secret (error
//! messages, verbatim environment overrides), reading `_file` forms, the
//! values the log redactor learns, the inline-secret warning, and masking.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{ConfigError, Settings};
use crate::telemetry::redact;

/// A secret value. Debug and Serialize never show it.
#[derive(Clone, Default)]
pub struct Secret(Option<SecretString>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        let value: String = value.into();
        if value.is_empty() {
            Self(None)
        } else {
            Self(Some(SecretString::from(value)))
        }
    }
    pub fn expose(&self) -> Option<&str> {
        self.0.as_ref().map(|s| s.expose_secret())
    }
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_set() { "\"***\"" } else { "\"\"" })
    }
}

thread_local! {
    /// Set only inside [`secrets_in`], on its own thread, for one call.
    static FIND: Cell<bool> = const { Cell::new(false) };
}

/// What a secret serializes to while [`secrets_in`] looks for them.
const MARK: &str = "\u{1}billsync-secret\u{1}";

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if FIND.get() {
            return s.serialize_str(&format!("{MARK}{}", self.expose().unwrap_or("")));
        }
        s.serialize_str(if self.is_set() { "***" } else { "" })
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Secret::new(String::deserialize(d)?))
    }
}

/// Every secret field in `value`: its dotted key and its value. A value
/// that cannot be walked is an error, never an empty list: redaction must
/// not be silently off.
pub fn secrets_in<T: Serialize>(value: &T) -> Result<Vec<(String, String)>, String> {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            FIND.set(false);
        }
    }
    FIND.set(true);
    let tree = {
        let _reset = Reset;
        serde_json::to_value(value).map_err(|e| e.to_string())?
    };
    let mut out = vec![];
    collect(&tree, String::new(), &mut out);
    Ok(out)
}

fn collect(v: &serde_json::Value, path: String, out: &mut Vec<(String, String)>) {
    let join = |k: &str| match path.is_empty() {
        true => k.to_string(),
        false => format!("{path}.{k}"),
    };
    match v {
        serde_json::Value::String(s) => {
            if let Some(secret) = s.strip_prefix(MARK) {
                out.push((path, secret.to_string()));
            }
        }
        serde_json::Value::Object(m) => m.iter().for_each(|(k, v)| collect(v, join(k), out)),
        serde_json::Value::Array(a) => {
            (a.iter().enumerate()).for_each(|(i, v)| collect(v, join(&i.to_string()), out))
        }
        _ => {}
    }
}

/// A map whose values are secrets shows as this key in the template.
const ANY: &str = "*";

/// Settings with every section present and one entry in each map of
/// secrets: the shape every secret key is read from.
fn template() -> Settings {
    let mut s = Settings {
        sources: super::SourcesSettings::every(),
        ..Default::default()
    };
    s.vms.headers.insert(ANY.into(), Secret::default());
    s
}

/// The secret keys: a plain key, or a map's key ending in `.*`.
static SECRET_KEYS: LazyLock<Vec<String>> = LazyLock::new(|| {
    secrets_in(&template())
        .expect("the default settings serialize")
        .into_iter()
        .map(|(k, _)| k)
        .collect()
});

/// `key` holds a secret, or a part of one (a map of secrets, an entry).
pub fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.iter().any(|k| {
        let k = k.strip_suffix(&format!(".{ANY}")).unwrap_or(k);
        key == k || key.strip_prefix(k).is_some_and(|r| r.starts_with('.'))
    })
}

/// The plain secret keys (those that have a `_file` form).
fn plain_secret_keys() -> impl Iterator<Item = &'static str> {
    let plain = SECRET_KEYS
        .iter()
        .filter(|k| !k.ends_with(&format!(".{ANY}")));
    plain.map(String::as_str)
}

/// For each `KEY_file` set, the file's content as `KEY` (both set is an
/// error): overrides for the builder, so the secret is read like any value.
pub fn file_overrides(cfg: &config::Config) -> Result<Vec<(&'static str, String)>, ConfigError> {
    let mut out = vec![];
    for key in plain_secret_keys() {
        let file_key = format!("{key}_file");
        let Ok(path) = cfg.get_string(&file_key) else {
            continue;
        };
        if cfg.get_string(key).is_ok_and(|v| !v.is_empty()) {
            let msg = format!("set both {key} and {file_key}; keep one");
            return Err(ConfigError::new(file_key, msg));
        }
        let value = read_secret_file(&file_key, Path::new(&path))?;
        out.push((key, value.expose().unwrap_or_default().to_string()));
    }
    Ok(out)
}

pub fn read_secret_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let resolved = if path.is_relative() {
        match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) => PathBuf::from(dir).join(path),
            None => path.to_path_buf(),
        }
    } else {
        path.to_path_buf()
    };
    let mut text = std::fs::read_to_string(&resolved)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", resolved.display())))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("{} is empty", resolved.display()),
        ));
    }
    Ok(Secret::new(text))
}

/// `[vms.header_files]`: header name -> file, each a secret header value.
pub fn resolve_header_files(s: &mut Settings) -> Result<(), ConfigError> {
    for (name, path) in s.vms.header_files.clone() {
        let key = format!("vms.header_files.{name}");
        if s.vms.headers.contains_key(&name) {
            return Err(ConfigError::new(
                key,
                format!("header {name} is also set in vms.headers; keep one"),
            ));
        }
        let value = read_secret_file(&key, &path)?;
        s.vms.headers.insert(name, value);
    }
    Ok(())
}

/// Teaches the log redactor every secret value the settings hold.
pub fn register_secrets(s: &Settings) -> Result<(), ConfigError> {
    let found = secrets_in(s).map_err(|e| ConfigError::new("config", e))?;
    for (_, value) in found {
        if !value.is_empty() {
            redact::register(&value);
        }
    }
    Ok(())
}

/// The config file itself holds a secret (not only `_file` paths).
pub fn any_inline_secret(text: &str) -> bool {
    let Ok(doc) = toml::from_str::<toml::Value>(text) else {
        return false;
    };
    SECRET_KEYS.iter().any(|key| {
        let key = key.strip_suffix(&format!(".{ANY}")).unwrap_or(key);
        let found = key.split('.').try_fold(&doc, |v, part| v.get(part));
        match found {
            Some(toml::Value::String(s)) => !s.is_empty(),
            Some(toml::Value::Table(t)) => !t.is_empty(),
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_keys_are_read_off_the_types() {
        let keys: Vec<&str> = SECRET_KEYS.iter().map(String::as_str).collect();
        for key in [
            "admin.token",
            "sources.billmanager.password",
            "sources.activeplatform.api_token",
            "vms.headers.*",
        ] {
            assert!(keys.contains(&key), "{key} not found in {keys:?}");
        }
        assert!(is_secret_key("vms.headers.X-Api-Key"));
        assert!(!is_secret_key("sources.billmanager.username"));
        assert!(!is_secret_key("sources.billmanager.password_file"));
    }

    #[test]
    fn finding_secrets_leaves_serialization_masked() {
        let mut s = Settings::default();
        s.admin.token = Secret::new("tok-123");
        assert_eq!(
            secrets_in(&s).unwrap(),
            vec![
                ("admin.token".to_string(), "tok-123".to_string()),
                ("daemon.state_url".to_string(), String::new()),
            ]
        );
        let shown = serde_json::to_string(&s).unwrap();
        assert!(!shown.contains("tok-123") && shown.contains("***"));
    }
}
