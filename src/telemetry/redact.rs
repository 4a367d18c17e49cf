//! Secret scrubbing. Every secret loaded from the config is registered here;
//! `scrub` replaces them, and credential-bearing URL parameters, with `***`.

use std::sync::RwLock;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Query and form parameters whose values are credentials.
const SECRET_PARAMS: [&str; 6] = [
    "api_token",
    "authinfo",
    "password",
    "passwd",
    "auth",
    "token",
];

const MASK: &str = "***";

/// Registers a secret in every form a log line may carry it: as is, escaped
/// for JSON (a `"` or `\` in it), escaped by `Debug`, and percent-encoded.
pub fn register(secret: &str) {
    // One- and two-character "secrets" would mangle every line; they are
    // rejected as weak elsewhere, and still covered by parameter masking.
    if secret.len() < 3 {
        return;
    }
    let quoted = |s: String| s[1..s.len() - 1].to_string();
    let forms = [
        secret.to_string(),
        serde_json::to_string(secret)
            .map(quoted)
            .unwrap_or_default(),
        quoted(format!("{secret:?}")),
        url::form_urlencoded::byte_serialize(secret.as_bytes()).collect(),
        url::form_urlencoded::byte_serialize(secret.as_bytes())
            .collect::<String>()
            .replace('+', "%20"),
    ];
    let mut all = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    for form in forms {
        if form.len() >= 3 && !all.contains(&form) {
            all.push(form);
        }
    }
    // Longest first, so a secret containing another is masked whole.
    all.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// Masks registered secrets and the values of credential parameters.
pub fn scrub(text: &str) -> String {
    let mut out = text.to_string();
    {
        let all = SECRETS.read().unwrap_or_else(|e| e.into_inner());
        for s in all.iter() {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), MASK);
            }
        }
    }
    mask_params(&out)
}

fn mask_params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'outer: while !rest.is_empty() {
        for p in SECRET_PARAMS {
            if let Some(after) = rest.strip_prefix(p).and_then(|r| r.strip_prefix('=')) {
                let boundary_ok = out
                    .chars()
                    .last()
                    .is_none_or(|c| matches!(c, '?' | '&' | ' ' | '"' | '\'' | '(' | ',' | '{'));
                if boundary_ok {
                    out.push_str(p);
                    out.push('=');
                    let end = after
                        .find(|c: char| {
                            matches!(c, '&' | ' ' | '"' | '\'' | ')' | ',' | '\n' | '}')
                        })
                        .unwrap_or(after.len());
                    if end > 0 {
                        out.push_str(MASK);
                    }
                    rest = &after[end..];
                    continue 'outer;
                }
            }
        }
        let c = rest.chars().next().expect("non-empty");
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// A URL fit for a log line: no user info, credential parameters masked.
pub fn url(u: &url::Url) -> String {
    let mut u = u.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    scrub(u.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_registered_secrets_and_params() {
        register("s3cr3t-value");
        let line = "GET http://h/x?api_token=abc123&page=2 failed: s3cr3t-value leaked";
        let clean = scrub(line);
        assert!(!clean.contains("abc123"), "{clean}");
        assert!(!clean.contains("s3cr3t-value"), "{clean}");
        assert!(clean.contains("page=2"));
        assert_eq!(
            scrub("authinfo=api:pw&func=account"),
            "authinfo=***&func=account"
        );
        // Not a parameter boundary: left alone.
        assert_eq!(scrub("myauth=1"), "myauth=1");
    }

    /// A JSON log line escapes `"` and `\`; the escaped form is masked too.
    #[test]
    fn masks_escaped_forms_of_a_secret() {
        let secret = r#"pa"ss\wo rd&x"#;
        register(secret);
        let json = serde_json::json!({ "error": format!("auth failed for {secret}") }).to_string();
        let debug = format!("{:?}", format!("token {secret}"));
        let query = format!(
            "GET /x?q={}",
            url::form_urlencoded::byte_serialize(secret.as_bytes()).collect::<String>()
        );
        for line in [json, debug, query, secret.to_string()] {
            let clean = scrub(&line);
            assert!(clean.contains(MASK), "{line} -> {clean}");
            assert!(
                !clean.contains("ss\\wo") && !clean.contains("wo rd") && !clean.contains("wo+rd"),
                "{clean}"
            );
        }
    }

    #[test]
    fn url_drops_userinfo() {
        let u = url::Url::parse("https://user:pw@h/billmgr?authinfo=a:b&out=json").unwrap();
        let s = url(&u);
        assert!(!s.contains("pw") && !s.contains("a:b"), "{s}");
        assert!(s.contains("out=json"));
    }
}
