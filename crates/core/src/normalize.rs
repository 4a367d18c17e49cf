//! SPEC §2.1 step 3: raw source records to normalized accounts and payments.
//! A record that cannot be normalized comes back as `Invalid`, never a panic.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use rust_decimal::Decimal;

use super::entitlements::ServiceState;
use super::model::{
    Account, AccountKey, CanonicalStatus, Invalid, InvalidCode, Payment, PaymentState, RawAccount,
    RawPayment, SourceKind,
};

/// Longest text accepted for a number; longer is certainly not a balance.
const MAX_NUMBER_LEN: usize = 64;
/// VMS logins: keep them to what a form field will take.
const MAX_LOGIN_LEN: usize = 191;

/// A login or billing-id template: literal text and `{placeholder}`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Var(String),
}

impl Template {
    pub fn parse(text: &str, allowed: &[&str]) -> Result<Self, String> {
        let mut parts = vec![];
        let mut rest = text;
        while let Some(start) = rest.find('{') {
            if start > 0 {
                parts.push(Part::Lit(rest[..start].to_string()));
            }
            let after = &rest[start + 1..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in {text:?}"))?;
            let name = &after[..end];
            if !allowed.contains(&name) {
                return Err(format!(
                    "unknown placeholder {{{name}}} in {text:?}; use {}",
                    allowed
                        .iter()
                        .map(|a| format!("{{{a}}}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
            parts.push(Part::Var(name.to_string()));
            rest = &after[end + 1..];
        }
        if rest.contains('}') {
            return Err(format!("stray '}}' in {text:?}"));
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        if !parts.iter().any(|p| matches!(p, Part::Var(_))) {
            return Err(format!(
                "{text:?} has no placeholder: every account would get the same value"
            ));
        }
        Ok(Self { parts })
    }

    /// Renders with `lookup`; a placeholder without a value yields `Err(name)`.
    pub fn render<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Var(name) => match lookup(name) {
                    Some(v) if !v.is_empty() => out.push_str(v),
                    _ => return Err(name.clone()),
                },
            }
        }
        Ok(out)
    }

    pub fn uses(&self, name: &str) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Var(n) if n == name))
    }
}

/// Per-source normalization settings, parsed once from the config.
#[derive(Debug, Clone)]
pub struct Normalizer {
    pub source: SourceKind,
    pub login: Template,
    pub billing_id: Template,
    pub status_map: BTreeMap<String, CanonicalStatus>,
    /// What the source's service statuses mean (SPEC §12.1; empty: the
    /// source reads no services).
    pub service_states: BTreeMap<String, ServiceState>,
}

pub const TEMPLATE_VARS: [&str; 3] = ["email", "id", "source"];

/// The version of how `account` works a login out (or refuses an account):
/// raise it with any change to that, so stored login indexes are rebuilt.
pub const INDEX_RULES: u32 = 1;

impl Normalizer {
    pub fn new(
        source: SourceKind,
        login_template: &str,
        billing_id_template: &str,
        status_map: &BTreeMap<String, CanonicalStatus>,
    ) -> Result<Self, String> {
        Ok(Self {
            source,
            login: Template::parse(login_template, &TEMPLATE_VARS)?,
            billing_id: Template::parse(billing_id_template, &TEMPLATE_VARS)?,
            status_map: status_map.clone(),
            service_states: BTreeMap::new(),
        })
    }

    /// Names the settings a login index was worked out with: any change of
    /// them (or of their form in a new build) makes the index stale, and so
    /// does a new `INDEX_RULES`.
    pub fn index_tag(&self) -> String {
        super::model::content_hash(&format!("{INDEX_RULES}/{self:?}"))
    }

    pub fn status(&self, raw: &str) -> Option<CanonicalStatus> {
        if let Some(s) = self.status_map.get(raw) {
            return Some(*s);
        }
        let folded = raw.trim().to_lowercase();
        self.status_map
            .iter()
            .find(|(k, _)| k.trim().to_lowercase() == folded)
            .map(|(_, v)| *v)
    }

    pub fn account(&self, raw: &RawAccount) -> Result<Account, Invalid> {
        let id = raw.id.trim();
        if id.is_empty() {
            return Err(Invalid::new(InvalidCode::MissingField, "no id"));
        }
        if let Some(field) = undecodable_field(raw) {
            return Err(Invalid::new(
                InvalidCode::Malformed,
                format!("{field} holds bytes that are not UTF-8"),
            ));
        }
        let email = raw
            .email
            .as_deref()
            .map(normalize_email)
            .filter(|e| !e.is_empty());
        let source = self.source.as_str();
        let lookup = |name: &str| -> Option<&str> {
            match name {
                "email" => email.as_deref(),
                "id" => Some(id),
                "source" => Some(source),
                _ => None,
            }
        };
        let login = self.login.render(lookup).map_err(|missing| {
            Invalid::new(
                InvalidCode::NoLogin,
                format!("login_template needs {{{missing}}}, which the account lacks"),
            )
        })?;
        check_login(&login)?;
        let billing_id = self.billing_id.render(lookup).map_err(|missing| {
            Invalid::new(
                InvalidCode::MissingField,
                format!("billing_id_template needs {{{missing}}}, which the account lacks"),
            )
        })?;
        let raw_status = raw
            .status
            .as_deref()
            .ok_or_else(|| Invalid::new(InvalidCode::MissingField, "no status"))?;
        let status = self.status(raw_status).ok_or_else(|| {
            Invalid::new(
                InvalidCode::UnknownStatus,
                format!("raw status {:?} is not in status_map", clip(raw_status)),
            )
        })?;
        let balance = match raw.balance.as_deref() {
            Some(b) => parse_decimal(b)
                .map_err(|e| Invalid::new(InvalidCode::BadNumber, format!("balance: {e}")))?,
            None => Decimal::ZERO,
        };
        let credit_limit = match raw.credit_limit.as_deref() {
            Some(c) if !c.trim().is_empty() => parse_decimal(c)
                .map_err(|e| Invalid::new(InvalidCode::BadNumber, format!("credit_limit: {e}")))?,
            _ => Decimal::ZERO,
        };
        Ok(Account {
            key: AccountKey {
                source: self.source,
                id: id.to_string(),
            },
            login,
            billing_id,
            name: raw
                .name
                .as_deref()
                .map(clean_text)
                .filter(|n| !n.is_empty()),
            email,
            phone: raw.phone.as_deref().and_then(normalize_phone),
            status,
            balance,
            credit_limit,
            attributes: raw.attributes.clone(),
        })
    }
}

/// The first field holding U+FFFD, which the HTTP layer puts where the
/// wire had bytes that are not UTF-8 (the VMS would get mangled text).
fn undecodable_field(raw: &RawAccount) -> Option<&'static str> {
    let bad = |v: &Option<String>| v.as_deref().is_some_and(|s| s.contains('\u{fffd}'));
    if raw.id.contains('\u{fffd}') {
        return Some("id");
    }
    let fields = [
        ("name", &raw.name),
        ("email", &raw.email),
        ("phone", &raw.phone),
        ("status", &raw.status),
        ("balance", &raw.balance),
        ("credit_limit", &raw.credit_limit),
    ];
    if let Some((name, _)) = fields.iter().find(|(_, v)| bad(v)) {
        return Some(name);
    }
    raw.attributes
        .iter()
        .any(|(k, v)| k.contains('\u{fffd}') || v.contains('\u{fffd}'))
        .then_some("a custom attribute")
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

fn check_login(login: &str) -> Result<(), Invalid> {
    if login.chars().count() > MAX_LOGIN_LEN {
        return Err(Invalid::new(InvalidCode::BadLogin, "login is too long"));
    }
    if login.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Invalid::new(
            InvalidCode::BadLogin,
            format!("login {:?} has spaces or control characters", clip(login)),
        ));
    }
    Ok(())
}

/// Trimmed, lowercased (SPEC §2.5).
pub fn normalize_email(raw: &str) -> String {
    raw.trim().to_lowercase()
}

fn clean_text(raw: &str) -> String {
    raw.trim()
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
}

/// `+digits`: separators dropped, a `00` international prefix becomes `+`.
/// No digits at all: no phone.
///
/// ```
/// use billsync_core::normalize::normalize_phone;
/// assert_eq!(normalize_phone("+7 (912) 345-67-89").as_deref(), Some("+79123456789"));
/// assert_eq!(normalize_phone("00 375 29 074 59 30").as_deref(), Some("+375290745930"));
/// assert_eq!(normalize_phone("n/a"), None);
/// ```
pub fn normalize_phone(raw: &str) -> Option<String> {
    let digits: String = raw.chars().filter(|c| c.is_ascii_digit()).collect();
    let digits = match digits.strip_prefix("00") {
        Some(rest) if raw.trim_start().starts_with("00") => rest.to_string(),
        _ => digits,
    };
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    Some(format!("+{digits}"))
}

/// Parses money as sources write it: `"1234.50"`, `"1 234,50"`, `"20.00 RUB"`,
/// `"1,234.50"`, `"-5"`. Absurd or ambiguous text is an error.
///
/// ```
/// use billsync_core::normalize::parse_decimal;
/// use rust_decimal::Decimal;
/// assert_eq!(parse_decimal("1 234,50").unwrap(), Decimal::new(123450, 2));
/// assert_eq!(parse_decimal("20.00 RUB").unwrap(), Decimal::new(20, 0));
/// assert!(parse_decimal("1e400").is_err());
/// ```
pub fn parse_decimal(raw: &str) -> Result<Decimal, String> {
    let text = raw.trim();
    if text.is_empty() {
        return Err("empty".into());
    }
    if text.len() > MAX_NUMBER_LEN {
        return Err("too long to be a number".into());
    }
    // A currency code or symbol may stand on either side; inside, only
    // digits, separators, a sign and grouping spaces.
    let core =
        text.trim_matches(|c: char| c.is_alphabetic() || c.is_whitespace() || "₽$€£¥".contains(c));
    let mut body = String::with_capacity(core.len());
    for c in core.chars() {
        match c {
            '0'..='9' | '.' | ',' | '-' | '+' => body.push(c),
            c if c.is_whitespace() || c == '\'' => {}
            _ => return Err(format!("unexpected character {c:?} in {:?}", clip(text))),
        }
    }
    let (negative, digits) = match body.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, body.strip_prefix('+').unwrap_or(&body)),
    };
    if digits.is_empty() || digits.contains(['-', '+']) {
        return Err(format!("{:?} is not a number", clip(text)));
    }
    let last_dot = digits.rfind('.');
    let last_comma = digits.rfind(',');
    let normalized = match (last_dot, last_comma) {
        (Some(d), Some(c)) => {
            // The later separator is the decimal one.
            let (dec, group) = if d > c { ('.', ',') } else { (',', '.') };
            let s: String = digits.chars().filter(|&ch| ch != group).collect();
            if s.matches(dec).count() > 1 {
                return Err(format!("{:?} is not a number", clip(text)));
            }
            s.replace(dec, ".")
        }
        (None, Some(_)) => {
            if digits.matches(',').count() > 1 {
                digits.replace(',', "")
            } else {
                digits.replace(',', ".")
            }
        }
        (Some(_), None) => {
            if digits.matches('.').count() > 1 {
                digits.replace('.', "")
            } else {
                digits.to_string()
            }
        }
        (None, None) => digits.to_string(),
    };
    if normalized.starts_with('.') || normalized.ends_with('.') {
        return Err(format!("{:?} is not a number", clip(text)));
    }
    let value = Decimal::from_str(&normalized)
        .map_err(|_| format!("{:?} is out of range or not a number", clip(text)))?;
    Ok(if negative { -value } else { value })
}

/// Dates as sources write them: RFC 3339, `YYYY-MM-DD HH:MM:SS` or
/// `YYYY-MM-DD` (taken as UTC: BILLmanager's zone is unknown, a day's error
/// is within what payment windows tolerate).
pub fn parse_date(raw: &str) -> Option<DateTime<Utc>> {
    let t = raw.trim();
    if t.is_empty() || t.starts_with("0000") {
        return None;
    }
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Some(d.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S") {
        return Some(Utc.from_utc_datetime(&d));
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|d| Utc.from_utc_datetime(&d));
    }
    None
}

/// A raw payment to a normalized one; `state_of` is the source's own reading
/// of its status vocabulary.
pub fn payment(
    source: SourceKind,
    raw: &RawPayment,
    state_of: impl Fn(&str) -> PaymentState,
) -> Result<Payment, Invalid> {
    let id = raw.id.trim();
    if id.is_empty() {
        return Err(Invalid::new(
            InvalidCode::MissingField,
            "payment without id",
        ));
    }
    let status = raw
        .status
        .as_deref()
        .ok_or_else(|| Invalid::new(InvalidCode::MissingField, "payment without status"))?;
    let PaymentState { paid, is_final } = state_of(status);
    let amount = match raw.amount.as_deref() {
        Some(a) => parse_decimal(a)
            .map_err(|e| Invalid::new(InvalidCode::BadNumber, format!("payment amount: {e}")))?,
        None => Decimal::ZERO,
    };
    let paid_at = raw
        .paid_date
        .as_deref()
        .and_then(parse_date)
        .or_else(|| raw.created_date.as_deref().and_then(parse_date));
    if paid && paid_at.is_none() {
        return Err(Invalid::new(
            InvalidCode::MissingField,
            "paid payment without a usable date",
        ));
    }
    let account_id = raw
        .account_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from);
    let account_name = raw
        .account_name
        .as_deref()
        .map(clean_text)
        .filter(|s| !s.is_empty());
    if account_id.is_none() && account_name.is_none() {
        return Err(Invalid::new(
            InvalidCode::MissingField,
            "payment names no account",
        ));
    }
    Ok(Payment {
        source,
        id: id.to_string(),
        account_id,
        account_name,
        amount,
        paid,
        is_final,
        paid_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn decimals_in_the_wild() {
        assert_eq!(parse_decimal("1234.50").unwrap(), dec("1234.50"));
        assert_eq!(parse_decimal("1 234,50").unwrap(), dec("1234.50"));
        assert_eq!(parse_decimal("1\u{a0}234,50").unwrap(), dec("1234.50"));
        assert_eq!(parse_decimal("20.00 RUB").unwrap(), dec("20.00"));
        assert_eq!(parse_decimal("20.00 EUR").unwrap(), dec("20"));
        assert_eq!(parse_decimal("1,234.50").unwrap(), dec("1234.5"));
        assert_eq!(parse_decimal("1.234,50").unwrap(), dec("1234.5"));
        assert_eq!(parse_decimal("-5").unwrap(), dec("-5"));
        assert_eq!(parse_decimal("- 15,5 ₽").unwrap(), dec("-15.5"));
        assert_eq!(parse_decimal("1,000,000").unwrap(), dec("1000000"));
        assert!(parse_decimal("").is_err());
        assert!(parse_decimal("abc").is_err());
        assert!(parse_decimal("1e400").is_err());
        assert!(parse_decimal("99999999999999999999999999999999999").is_err());
        assert!(parse_decimal("1.2.3,4,5").is_err());
        assert!(parse_decimal("--5").is_err());
        assert!(parse_decimal(".").is_err());
    }

    #[test]
    fn phones() {
        assert_eq!(
            normalize_phone("+7 (912) 345-67-89").as_deref(),
            Some("+79123456789")
        );
        assert_eq!(
            normalize_phone("00375290745930").as_deref(),
            Some("+375290745930")
        );
        assert_eq!(
            normalize_phone("8 912 345 67 89").as_deref(),
            Some("+89123456789")
        );
        assert_eq!(normalize_phone("n/a"), None);
        assert_eq!(normalize_phone(""), None);
    }

    #[test]
    fn templates() {
        let t = Template::parse("vms-{source}-{id}", &TEMPLATE_VARS).unwrap();
        let out = t
            .render(|n| match n {
                "source" => Some("billmanager"),
                "id" => Some("7"),
                _ => None,
            })
            .unwrap();
        assert_eq!(out, "vms-billmanager-7");
        assert!(Template::parse("{mail}", &TEMPLATE_VARS).is_err());
        assert!(Template::parse("{email", &TEMPLATE_VARS).is_err());
        assert!(Template::parse("fixed", &TEMPLATE_VARS).is_err());
        assert_eq!(
            Template::parse("{email}", &TEMPLATE_VARS)
                .unwrap()
                .render(|_| None),
            Err("email".to_string())
        );
    }

    fn ap() -> Normalizer {
        let status_map = [
            ("active", CanonicalStatus::Active),
            ("credit hold", CanonicalStatus::Suspended),
            ("deleted", CanonicalStatus::Deleted),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Normalizer::new(
            SourceKind::Activeplatform,
            "{email}",
            "{source}-{id}",
            &status_map,
        )
        .unwrap()
    }

    fn raw(id: &str, email: Option<&str>, status: &str) -> RawAccount {
        RawAccount {
            id: id.into(),
            email: email.map(String::from),
            status: Some(status.into()),
            balance: Some("10.5".into()),
            ..Default::default()
        }
    }

    #[test]
    fn account_normalizes() {
        let mut r = raw("42", Some("  John@Example.COM "), "Credit Hold");
        r.phone = Some("00 375 29 074 59 30".into());
        r.credit_limit = Some("1 000,00".into());
        let a = ap().account(&r).unwrap();
        assert_eq!(a.login, "john@example.com");
        assert_eq!(a.billing_id, "activeplatform-42");
        assert_eq!(a.status, CanonicalStatus::Suspended);
        assert_eq!(a.phone.as_deref(), Some("+375290745930"));
        assert_eq!(a.credit_limit, dec("1000"));
        assert_eq!(a.balance, dec("10.5"));
    }

    #[test]
    fn bad_accounts_are_invalid_with_reasons() {
        let n = ap();
        assert_eq!(
            n.account(&raw("1", None, "active")).unwrap_err().code,
            InvalidCode::NoLogin
        );
        assert_eq!(
            n.account(&raw("1", Some("a@b"), "frozen"))
                .unwrap_err()
                .code,
            InvalidCode::UnknownStatus
        );
        let mut r = raw("1", Some("a@b"), "active");
        r.balance = Some("lots".into());
        assert_eq!(n.account(&r).unwrap_err().code, InvalidCode::BadNumber);
        assert_eq!(
            n.account(&raw("1", Some("a b@c"), "active"))
                .unwrap_err()
                .code,
            InvalidCode::BadLogin
        );
        assert_eq!(
            n.account(&raw(" ", Some("a@b"), "active"))
                .unwrap_err()
                .code,
            InvalidCode::MissingField
        );
    }

    /// "4" paid for good, "2" still open: a stand-in for a source's codes.
    fn codes(status: &str) -> PaymentState {
        PaymentState {
            paid: status == "4",
            is_final: status == "4",
        }
    }

    #[test]
    fn payments_take_the_sources_reading_dates_and_amounts() {
        let bm = RawPayment {
            id: "1".into(),
            account_name: Some("ACME".into()),
            amount: Some("20.00 EUR".into()),
            status: Some("4".into()),
            created_date: Some("2026-11-20".into()),
            ..Default::default()
        };
        let p = payment(SourceKind::Billmanager, &bm, codes).unwrap();
        assert!(p.paid && p.is_final);
        assert_eq!(p.amount, dec("20"));
        let mut pending = bm.clone();
        pending.status = Some("2".into());
        let p = payment(SourceKind::Billmanager, &pending, codes).unwrap();
        assert!(!p.paid && !p.is_final);
        let ap = RawPayment {
            id: "9".into(),
            account_id: Some("5".into()),
            status: Some("4".into()),
            amount: Some("15".into()),
            paid_date: Some("2026-11-20T10:00:00.000+03:00".into()),
            ..Default::default()
        };
        let p = payment(SourceKind::Activeplatform, &ap, codes).unwrap();
        assert!(p.paid);
        assert_eq!(p.paid_at.unwrap().to_rfc3339(), "2026-11-20T07:00:00+00:00");
        let mut orphan = ap.clone();
        orphan.account_id = None;
        assert!(payment(SourceKind::Activeplatform, &orphan, codes).is_err());
        let mut undated = ap.clone();
        undated.paid_date = None;
        assert!(payment(SourceKind::Activeplatform, &undated, codes).is_err());
    }

    proptest! {
        #[test]
        fn decimal_parser_never_panics(s in "\\PC{0,80}") {
            let _ = parse_decimal(&s);
        }

        #[test]
        fn decimal_roundtrip(units in -1_000_000_000i64..1_000_000_000, cents in 0u32..100) {
            let text = format!("{units}.{cents:02}");
            let expect = Decimal::from_str(&text).unwrap();
            prop_assert_eq!(parse_decimal(&text).unwrap(), expect);
            let comma = text.replace('.', ",");
            prop_assert_eq!(parse_decimal(&comma).unwrap(), expect);
        }

        #[test]
        fn normalize_never_panics(id in "\\PC{0,10}", email in proptest::option::of("\\PC{0,30}"),
                                  status in "\\PC{0,12}", bal in proptest::option::of("\\PC{0,20}"),
                                  phone in proptest::option::of("\\PC{0,20}")) {
            let r = RawAccount { id, email, status: Some(status), balance: bal, phone, ..Default::default() };
            let _ = ap().account(&r);
        }
    }
}
