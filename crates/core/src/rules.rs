//! Permission rules (SPEC §3): a rule matches an *active* account when every
//! condition it states holds; the grant is the union over matching rules,
//! limited to `permissions.managed`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::entitlements::{Service, ServiceState};
use super::model::{Account, CanonicalStatus, SourceKind};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    #[serde(default)]
    pub sources: Vec<SourceKind>,
    /// balance + credit_limit must be >= this; omitted: no condition.
    #[serde(default, with = "opt_decimal")]
    pub min_available: Option<Decimal>,
    #[serde(default)]
    pub paid_within_days: u32,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Plan names (SPEC §12.2): the rule matches only while the account
    /// has an active service on one of them (or of `plan_ids`).
    #[serde(default)]
    pub plans: Vec<String>,
    /// Plan ids, as strings (TOML integers accepted).
    #[serde(default, with = "id_list")]
    pub plan_ids: Vec<String>,
    #[serde(default)]
    pub grant: Vec<String>,
    /// Camera group templates (`entitlements::render_group`).
    #[serde(default)]
    pub camera_groups: Vec<String>,
}

/// Ids given as strings or integers, kept as strings.
mod id_list {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Id {
            I(i64),
            S(String),
        }
        let ids = Vec::<Id>::deserialize(d)?;
        Ok(ids
            .into_iter()
            .map(|id| match id {
                Id::I(i) => i.to_string(),
                Id::S(s) => s.trim().to_string(),
            })
            .collect())
    }
}

/// Decimals arrive from TOML as floats or integers; keep them exact via text.
mod opt_decimal {
    use rust_decimal::Decimal;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::str::FromStr;

    pub fn serialize<S: Serializer>(v: &Option<Decimal>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_str(&d.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Num {
            I(i64),
            F(f64),
            S(String),
        }
        let parsed = match Option::<Num>::deserialize(d)? {
            None => return Ok(None),
            Some(Num::I(i)) => Decimal::from(i),
            Some(Num::F(f)) => Decimal::from_str(&f.to_string())
                .map_err(|_| serde::de::Error::custom("not a finite number"))?,
            Some(Num::S(s)) => {
                Decimal::from_str(s.trim()).map_err(|_| serde::de::Error::custom("not a number"))?
            }
        };
        Ok(Some(parsed))
    }
}

/// What a rule looks at besides the account.
pub struct RuleContext<'a> {
    /// Latest paid payment per account id, for the account's source.
    pub last_paid: &'a HashMap<String, DateTime<Utc>>,
    /// Services per account id, for the account's source (states settled).
    pub services: &'a HashMap<String, Vec<Service>>,
    pub now: DateTime<Utc>,
}

pub fn matches(rule: &Rule, account: &Account, ctx: &RuleContext<'_>) -> bool {
    check(rule, account, ctx).is_ok()
}

/// The first condition of a rule an account does not meet, with the
/// values it was judged on (what `explain` shows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "condition", rename_all = "snake_case")]
pub enum Unmet {
    /// Rules apply only to active accounts.
    NotActive {
        status: CanonicalStatus,
    },
    OtherSource {
        source: SourceKind,
    },
    /// No active service on a plan the rule names.
    Plan {
        plans: Vec<String>,
        plan_ids: Vec<String>,
        /// The plans of the account's active services.
        active: Vec<String>,
    },
    MinAvailable {
        min: Decimal,
        balance: Decimal,
        credit_limit: Decimal,
    },
    PaidWithin {
        days: u32,
        last_paid: Option<DateTime<Utc>>,
    },
    Attribute {
        name: String,
        want: String,
        have: Option<String>,
    },
}

/// Whether a rule matches an account (`Ok`), else the first condition that
/// failed. `matches` is this, so what `explain` says is what cycles do.
pub fn check(rule: &Rule, account: &Account, ctx: &RuleContext<'_>) -> Result<(), Unmet> {
    if account.status != CanonicalStatus::Active {
        return Err(Unmet::NotActive {
            status: account.status,
        });
    }
    if !rule.sources.is_empty() && !rule.sources.contains(&account.key.source) {
        return Err(Unmet::OtherSource {
            source: account.key.source,
        });
    }
    check_plan(rule, account, ctx)?;
    if let Some(min) = rule.min_available {
        let (balance, credit_limit) = (account.balance, account.credit_limit);
        match balance.checked_add(credit_limit) {
            Some(avail) if avail >= min => {}
            _ => {
                return Err(Unmet::MinAvailable {
                    min,
                    balance,
                    credit_limit,
                })
            }
        }
    }
    if rule.paid_within_days > 0 {
        let since = ctx.now - Duration::days(i64::from(rule.paid_within_days));
        let last_paid = ctx.last_paid.get(&account.key.id).copied();
        if last_paid.is_none_or(|t| t < since) {
            return Err(Unmet::PaidWithin {
                days: rule.paid_within_days,
                last_paid,
            });
        }
    }
    for (name, want) in &rule.attributes {
        let have = account.attributes.get(name);
        if have.is_none_or(|have| have.trim() != want.trim()) {
            return Err(Unmet::Attribute {
                name: name.clone(),
                want: want.clone(),
                have: have.cloned(),
            });
        }
    }
    Ok(())
}

/// A rule that names plans needs an active service on one of them.
fn check_plan(rule: &Rule, account: &Account, ctx: &RuleContext<'_>) -> Result<(), Unmet> {
    if rule.plans.is_empty() && rule.plan_ids.is_empty() {
        return Ok(());
    }
    let services = ctx
        .services
        .get(&account.key.id)
        .map_or(&[][..], Vec::as_slice);
    if services
        .iter()
        .any(|s| s.grants_plan(&rule.plans, &rule.plan_ids))
    {
        return Ok(());
    }
    let active = services.iter().filter(|s| s.state == ServiceState::Active);
    Err(Unmet::Plan {
        plans: rule.plans.clone(),
        plan_ids: rule.plan_ids.clone(),
        active: active
            .map(|s| {
                s.plan_name
                    .clone()
                    .or(s.plan_id.clone())
                    .unwrap_or_default()
            })
            .collect(),
    })
}

impl std::fmt::Display for Unmet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unmet::NotActive { status } => write!(
                f,
                "the account is {}: rules apply only to active accounts",
                status.as_str()
            ),
            Unmet::OtherSource { source } => {
                write!(f, "the rule names other sources than {}", source.as_str())
            }
            Unmet::Plan {
                plans,
                plan_ids,
                active,
            } => {
                let wanted: Vec<&str> = plans.iter().chain(plan_ids).map(String::as_str).collect();
                match active.is_empty() {
                    true => write!(f, "plans {}: the account has no active service", wanted.join(", ")),
                    false => write!(
                        f,
                        "plans {}: the account's active services are on {}",
                        wanted.join(", "),
                        active.join(", ")
                    ),
                }
            }
            Unmet::MinAvailable {
                min,
                balance,
                credit_limit,
            } => match balance.checked_add(*credit_limit) {
                Some(sum) => write!(
                    f,
                    "min_available {min}: balance {balance} + credit limit {credit_limit} = {sum}, below it"
                ),
                None => write!(f, "min_available {min}: balance + credit limit overflows"),
            },
            Unmet::PaidWithin { days, last_paid } => match last_paid {
                Some(t) => write!(
                    f,
                    "paid_within_days {days}: the last paid payment is from {}",
                    t.format("%Y-%m-%d")
                ),
                None => write!(f, "paid_within_days {days}: no paid payment on record"),
            },
            Unmet::Attribute { name, want, have } => match have {
                Some(have) => write!(f, "attribute {name} = {want:?}: the account has {have:?}"),
                None => write!(f, "attribute {name} = {want:?}: the account has none"),
            },
        }
    }
}

/// The managed permissions an account should have, and the rules that gave them.
pub fn grants<'r>(
    rules: &'r [Rule],
    managed: &[String],
    account: &Account,
    ctx: &RuleContext<'_>,
) -> (BTreeSet<String>, Vec<&'r Rule>) {
    let mut perms = BTreeSet::new();
    let mut matched = vec![];
    for rule in rules {
        if matches(rule, account, ctx) {
            matched.push(rule);
            perms.extend(rule.grant.iter().filter(|g| managed.contains(g)).cloned());
        }
    }
    (perms, matched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AccountKey, SourceKind};
    use rust_decimal::Decimal;
    use std::collections::BTreeMap;

    fn account(balance: i64, status: CanonicalStatus) -> Account {
        Account {
            key: AccountKey {
                source: SourceKind::Activeplatform,
                id: "1".into(),
            },
            login: "a@b".into(),
            billing_id: "ap-1".into(),
            name: None,
            email: None,
            phone: None,
            status,
            balance: Decimal::from(balance),
            credit_limit: Decimal::from(10),
            attributes: BTreeMap::from([("Tariff".to_string(), "gold".to_string())]),
        }
    }

    fn rule(grant: &[&str]) -> Rule {
        Rule {
            name: "r".into(),
            sources: vec![],
            min_available: None,
            paid_within_days: 0,
            attributes: BTreeMap::new(),
            plans: vec![],
            plan_ids: vec![],
            grant: grant.iter().map(|g| g.to_string()).collect(),
            camera_groups: vec![],
        }
    }

    #[test]
    fn conditions() {
        let now = Utc::now();
        let paid = HashMap::from([("1".to_string(), now - Duration::days(3))]);
        let none = HashMap::new();
        let ctx = RuleContext {
            last_paid: &paid,
            services: &none,
            now,
        };
        let a = account(-5, CanonicalStatus::Active);
        let mut r = rule(&["x"]);
        assert!(
            matches(&r, &a, &ctx),
            "an empty rule matches every active account"
        );
        r.min_available = Some(Decimal::ZERO);
        assert!(matches(&r, &a, &ctx), "-5 + 10 credit >= 0");
        r.min_available = Some(Decimal::from(6));
        assert!(!matches(&r, &a, &ctx));
        r.min_available = None;
        r.paid_within_days = 2;
        assert!(!matches(&r, &a, &ctx));
        r.paid_within_days = 4;
        assert!(matches(&r, &a, &ctx));
        r.attributes.insert("Tariff".into(), "gold".into());
        assert!(matches(&r, &a, &ctx));
        r.attributes.insert("Tariff".into(), "silver".into());
        assert!(!matches(&r, &a, &ctx));
        r.attributes.clear();
        r.sources = vec![SourceKind::Billmanager];
        assert!(!matches(&r, &a, &ctx));
        assert!(!matches(
            &rule(&["x"]),
            &account(0, CanonicalStatus::Suspended),
            &ctx
        ));
    }

    /// What `explain` prints: the first failed condition, with its values.
    #[test]
    fn a_rule_that_does_not_match_says_why() {
        let now = Utc::now();
        let paid = HashMap::new();
        let none = HashMap::new();
        let ctx = RuleContext {
            last_paid: &paid,
            services: &none,
            now,
        };
        let why = |r: &Rule, a: &Account| check(r, a, &ctx).unwrap_err().to_string();
        let suspended = account(449, CanonicalStatus::Suspended);
        assert_eq!(
            why(&rule(&[]), &suspended),
            "the account is suspended: rules apply only to active accounts"
        );
        let a = account(-15, CanonicalStatus::Active);
        let mut r = rule(&[]);
        r.min_available = Some(Decimal::ZERO);
        assert_eq!(
            why(&r, &a),
            "min_available 0: balance -15 + credit limit 10 = -5, below it"
        );
        r.min_available = None;
        r.paid_within_days = 30;
        assert_eq!(
            why(&r, &a),
            "paid_within_days 30: no paid payment on record"
        );
        r.paid_within_days = 0;
        r.attributes.insert("Tariff".into(), "silver".into());
        assert_eq!(
            why(&r, &a),
            "attribute Tariff = \"silver\": the account has \"gold\""
        );
        r.attributes.clear();
        r.sources = vec![SourceKind::Billmanager];
        assert!(why(&r, &a).contains("other sources than activeplatform"));
    }

    /// SPEC §12.2: a rule naming plans matches only while the account has
    /// an active service on one of them; the other conditions still apply.
    #[test]
    fn a_plan_rule_needs_an_active_service_on_its_plan() {
        use crate::entitlements::{Service, ServiceState};
        let a = account(5, CanonicalStatus::Active);
        let service = |state, plan: &str| Service {
            id: "s".into(),
            owner: a.key.clone(),
            plan_id: Some("7".into()),
            plan_name: Some(plan.into()),
            state,
        };
        let mut r = rule(&["x"]);
        r.plans = vec!["Video 30".into()];
        let check_with = |services: Vec<Service>, r: &Rule| {
            let paid = HashMap::new();
            let by_account = HashMap::from([("1".to_string(), services)]);
            let ctx = RuleContext {
                last_paid: &paid,
                services: &by_account,
                now: Utc::now(),
            };
            check(r, &a, &ctx).map_err(|u| u.to_string())
        };
        assert_eq!(
            check_with(vec![service(ServiceState::Active, "video 30")], &r),
            Ok(())
        );
        assert_eq!(
            check_with(vec![service(ServiceState::Active, "Video 7")], &r),
            Err("plans Video 30: the account's active services are on Video 7".into())
        );
        assert_eq!(
            check_with(vec![service(ServiceState::Suspended, "Video 30")], &r),
            Err("plans Video 30: the account has no active service".into())
        );
        r.min_available = Some(Decimal::from(100));
        let poor = check_with(vec![service(ServiceState::Active, "Video 30")], &r);
        assert!(
            poor.unwrap_err().starts_with("min_available"),
            "other conditions apply"
        );
        r.min_available = None;
        r.plans.clear();
        r.plan_ids = vec!["7".into()];
        assert_eq!(
            check_with(vec![service(ServiceState::Active, "Video 7")], &r),
            Ok(())
        );
    }

    #[test]
    fn grants_are_a_union_within_managed() {
        let now = Utc::now();
        let paid = HashMap::new();
        let none = HashMap::new();
        let ctx = RuleContext {
            last_paid: &paid,
            services: &none,
            now,
        };
        let rules = vec![rule(&["a", "b"]), rule(&["b", "c", "unmanaged"])];
        let managed: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let (perms, matched) = grants(&rules, &managed, &account(1, CanonicalStatus::Active), &ctx);
        assert_eq!(perms.into_iter().collect::<Vec<_>>(), vec!["a", "b", "c"]);
        assert_eq!(matched.len(), 2);
    }
}
