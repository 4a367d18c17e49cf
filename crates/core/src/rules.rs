//! Permission rules (SPEC §3): a rule matches an *active* account when every
//! condition it states holds; the grant is the union over matching rules,
//! limited to `permissions.managed`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::model::{Account, CanonicalStatus, SourceKind};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    #[serde(default)]
    pub grant: Vec<String>,
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
    pub now: DateTime<Utc>,
}

pub fn matches(rule: &Rule, account: &Account, ctx: &RuleContext<'_>) -> bool {
    if account.status != CanonicalStatus::Active {
        return false;
    }
    if !rule.sources.is_empty() && !rule.sources.contains(&account.key.source) {
        return false;
    }
    if let Some(min) = rule.min_available {
        match account.balance.checked_add(account.credit_limit) {
            Some(avail) if avail >= min => {}
            _ => return false,
        }
    }
    if rule.paid_within_days > 0 {
        let since = ctx.now - Duration::days(i64::from(rule.paid_within_days));
        match ctx.last_paid.get(&account.key.id) {
            Some(t) if *t >= since => {}
            _ => return false,
        }
    }
    rule.attributes.iter().all(|(name, want)| {
        account
            .attributes
            .get(name)
            .is_some_and(|have| have.trim() == want.trim())
    })
}

/// The managed permissions an account should have, and the rules that gave them.
pub fn grants<'r>(
    rules: &'r [Rule],
    managed: &[String],
    account: &Account,
    ctx: &RuleContext<'_>,
) -> (BTreeSet<String>, Vec<&'r str>) {
    let mut perms = BTreeSet::new();
    let mut matched = vec![];
    for rule in rules {
        if matches(rule, account, ctx) {
            matched.push(rule.name.as_str());
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
            grant: grant.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn conditions() {
        let now = Utc::now();
        let paid = HashMap::from([("1".to_string(), now - Duration::days(3))]);
        let ctx = RuleContext {
            last_paid: &paid,
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

    #[test]
    fn grants_are_a_union_within_managed() {
        let now = Utc::now();
        let paid = HashMap::new();
        let ctx = RuleContext {
            last_paid: &paid,
            now,
        };
        let rules = vec![rule(&["a", "b"]), rule(&["b", "c", "unmanaged"])];
        let managed: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let (perms, matched) = grants(&rules, &managed, &account(1, CanonicalStatus::Active), &ctx);
        assert_eq!(perms.into_iter().collect::<Vec<_>>(), vec!["a", "b", "c"]);
        assert_eq!(matched.len(), 2);
    }
}
