//! What an account bought (SPEC §12): services and their canonical states,
//! and the camera groups rules grant. Pure: the read side hands in raw
//! states and what was settled before; the desired side asks what a rule's
//! plan condition and camera templates say.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::model::{Account, AccountKey};

/// A service's canonical state (SPEC §12.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    /// Grants what its plan gives.
    Active,
    /// Grants nothing.
    Suspended,
    /// Grants nothing (also: absent from complete listings past the grace).
    Closed,
    /// Ordered or in motion: keeps whatever its previous state granted.
    Pending,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Active => "active",
            ServiceState::Suspended => "suspended",
            ServiceState::Closed => "closed",
            ServiceState::Pending => "pending",
        }
    }

    pub fn parse(text: &str) -> Option<ServiceState> {
        match text {
            "active" => Some(ServiceState::Active),
            "suspended" => Some(ServiceState::Suspended),
            "closed" => Some(ServiceState::Closed),
            "pending" => Some(ServiceState::Pending),
            _ => None,
        }
    }

    /// A pending service stands for the state it had before (none yet:
    /// it grants nothing, and takes nothing away that it never gave).
    pub fn settle(self, before: Option<ServiceState>) -> ServiceState {
        match (self, before) {
            (ServiceState::Pending, Some(b)) => b,
            (s, _) => s,
        }
    }
}

/// A raw status as the maps compare it: trimmed, lowercased, spaces and
/// hyphens read as underscores (`Stopping failed` = `stopping_failed`).
pub fn status_key(raw: &str) -> String {
    let lower = raw.trim().to_lowercase();
    lower.replace([' ', '-'], "_")
}

/// The canonical state of a raw status; `None`: unknown (the row is
/// skipped and reported, its account keeps what it had).
pub fn service_state(raw: &str, map: &BTreeMap<String, ServiceState>) -> Option<ServiceState> {
    let key = status_key(raw);
    map.iter()
        .find(|(k, _)| status_key(k) == key)
        .map(|(_, s)| *s)
}

/// A service or subscription row as a reader decoded it (SPEC §12.1): the
/// owner by id when the row carries it, else by the account's name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawService {
    pub id: String,
    pub owner_id: Option<String>,
    pub owner_name: Option<String>,
    pub plan_id: Option<String>,
    pub plan_name: Option<String>,
    pub status: Option<String>,
}

/// One thing an account bought, normalized, its state settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    pub owner: AccountKey,
    pub plan_id: Option<String>,
    pub plan_name: Option<String>,
    pub state: ServiceState,
}

impl Service {
    /// Whether this service's plan is among `plans` (names, trimmed and
    /// compared case-insensitively) or `plan_ids`, while it is active.
    pub fn grants_plan(&self, plans: &[String], plan_ids: &[String]) -> bool {
        if self.state != ServiceState::Active {
            return false;
        }
        let name = self.plan_name.as_deref().map(|n| n.trim().to_lowercase());
        let by_name = name.is_some_and(|n| plans.iter().any(|p| p.trim().to_lowercase() == n));
        let by_id =
            (self.plan_id.as_deref()).is_some_and(|id| plan_ids.iter().any(|p| p.trim() == id));
        by_name || by_id
    }
}

/// A camera group template's placeholder had no value for this account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingPlaceholder {
    pub template: String,
    pub placeholder: String,
}

impl std::fmt::Display for MissingPlaceholder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "camera group {:?}: the account has no value for {{{}}}",
            self.template, self.placeholder
        )
    }
}

/// Renders one camera group template over `{billing_id}`, `{id}`,
/// `{source}` and `{attr:NAME}` (SPEC §12.2). An unknown or empty
/// placeholder is an error: the whole camera set then stays as applied.
pub fn render_group(template: &str, account: &Account) -> Result<String, MissingPlaceholder> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or_else(|| missing(template, after))?;
        let name = &after[..close];
        let value = placeholder(name, account).filter(|v| !v.trim().is_empty());
        out.push_str(&value.ok_or_else(|| missing(template, name))?);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether a template names only placeholders `render_group` fills (for
/// config validation; a value may still be missing for one account).
pub fn check_template(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or("a \"{\" is never closed")?;
        let name = &after[..close];
        let known = matches!(name, "billing_id" | "id" | "source")
            || name
                .strip_prefix("attr:")
                .is_some_and(|a| !a.trim().is_empty());
        if !known {
            return Err(format!(
                "{{{name}}} is not one of {{billing_id}}, {{id}}, {{source}}, {{attr:NAME}}"
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

fn placeholder(name: &str, account: &Account) -> Option<String> {
    match name {
        "billing_id" => Some(account.billing_id.clone()),
        "id" => Some(account.key.id.clone()),
        "source" => Some(account.key.source.as_str().to_string()),
        _ => name
            .strip_prefix("attr:")
            .and_then(|attr| account.attributes.get(attr).cloned()),
    }
}

fn missing(template: &str, placeholder: &str) -> MissingPlaceholder {
    MissingPlaceholder {
        template: template.to_string(),
        placeholder: placeholder.to_string(),
    }
}

/// Every template rendered, or the first that cannot be.
pub fn render_groups<'t>(
    templates: impl IntoIterator<Item = &'t String>,
    account: &Account,
) -> Result<BTreeSet<String>, MissingPlaceholder> {
    templates
        .into_iter()
        .map(|t| render_group(t, account))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CanonicalStatus, SourceKind};
    use rust_decimal::Decimal;

    fn account() -> Account {
        Account {
            key: AccountKey {
                source: SourceKind::Activeplatform,
                id: "42".into(),
            },
            login: "a@b".into(),
            billing_id: "activeplatform-42".into(),
            name: None,
            email: None,
            phone: None,
            status: CanonicalStatus::Active,
            balance: Decimal::ZERO,
            credit_limit: Decimal::ZERO,
            attributes: BTreeMap::from([("Address".to_string(), "minsk-7".to_string())]),
        }
    }

    fn service(state: ServiceState, plan: &str, id: &str) -> Service {
        Service {
            id: "s1".into(),
            owner: account().key,
            plan_id: Some(id.into()),
            plan_name: Some(plan.into()),
            state,
        }
    }

    #[test]
    fn statuses_are_compared_as_keys() {
        let map = BTreeMap::from([
            ("stopping_failed".to_string(), ServiceState::Pending),
            ("2".to_string(), ServiceState::Active),
        ]);
        assert_eq!(
            service_state("Stopping failed", &map),
            Some(ServiceState::Pending)
        );
        assert_eq!(
            service_state("stopping-failed ", &map),
            Some(ServiceState::Pending)
        );
        assert_eq!(service_state("2", &map), Some(ServiceState::Active));
        assert_eq!(
            service_state("9", &map),
            None,
            "unknown: skipped and reported"
        );
    }

    #[test]
    fn a_pending_service_keeps_what_it_had() {
        let p = ServiceState::Pending;
        assert_eq!(p.settle(Some(ServiceState::Active)), ServiceState::Active);
        assert_eq!(p.settle(Some(ServiceState::Closed)), ServiceState::Closed);
        assert_eq!(p.settle(None), ServiceState::Pending);
        assert_eq!(
            ServiceState::Closed.settle(Some(ServiceState::Active)),
            ServiceState::Closed
        );
    }

    #[test]
    fn only_an_active_service_on_a_named_plan_grants() {
        let plans = ["  video 30 ".to_string()];
        let ids = ["7".to_string()];
        let s = service(ServiceState::Active, "Video 30", "9");
        assert!(
            s.grants_plan(&plans, &[]),
            "names compare case-insensitively"
        );
        assert!(!s.grants_plan(&[], &ids));
        assert!(service(ServiceState::Active, "Video 7", "7").grants_plan(&[], &ids));
        assert!(!service(ServiceState::Suspended, "Video 30", "9").grants_plan(&plans, &[]));
        assert!(!service(ServiceState::Pending, "Video 30", "9").grants_plan(&plans, &[]));
    }

    #[test]
    fn camera_group_templates_render_or_say_what_is_missing() {
        let a = account();
        assert_eq!(
            render_group("{billing_id}", &a).unwrap(),
            "activeplatform-42"
        );
        assert_eq!(
            render_group("addr-{attr:Address}", &a).unwrap(),
            "addr-minsk-7"
        );
        assert_eq!(
            render_group("{source}/{id}", &a).unwrap(),
            "activeplatform/42"
        );
        let err = render_group("flat-{attr:Flat}", &a).unwrap_err();
        assert_eq!(err.placeholder, "attr:Flat");
        assert!(render_group("{nope}", &a).is_err());
        assert!(render_group("open{brace", &a).is_err());
        let both = ["{billing_id}".to_string(), "{attr:Flat}".to_string()];
        assert!(
            render_groups(&both, &a).is_err(),
            "one missing fails the set"
        );
    }
}
