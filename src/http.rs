//! What every HTTP peer shares: client construction (timeouts, TLS options),
//! bounded body reads, and the transient/permanent error classes.

use std::time::Duration;

use reqwest::header::HeaderMap;

/// Largest response body accepted from any peer.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth retrying: transport, timeout, 408/429/5xx, a body that is not the
    /// expected JSON.
    Transient,
    /// Retrying will not help: credentials, access, validation.
    Permanent,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    pub class: ErrorClass,
    pub message: String,
    pub status: Option<u16>,
    pub retry_after: Option<Duration>,
}

impl FetchError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Transient,
            message: crate::telemetry::redact::scrub(&message.into()),
            status: None,
            retry_after: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            message: crate::telemetry::redact::scrub(&message.into()),
            status: None,
            retry_after: None,
        }
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    pub fn is_transient(&self) -> bool {
        self.class == ErrorClass::Transient
    }

    /// reqwest errors carry the URL (with `api_token`); drop it.
    pub fn from_reqwest(e: reqwest::Error) -> Self {
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "connection failed"
        } else if e.is_body() || e.is_decode() {
            "reading the body failed"
        } else {
            "request failed"
        };
        let e = e.without_url();
        let mut msg = format!("{what}: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        Self::transient(msg)
    }
}

/// A base URL that `join` extends instead of replacing its last segment.
pub fn base_url(text: &str) -> Result<url::Url, url::ParseError> {
    let mut base = url::Url::parse(text)?;
    if !base.path().ends_with('/') {
        let p = format!("{}/", base.path());
        base.set_path(&p);
    }
    Ok(base)
}

pub struct ClientOptions<'a> {
    pub timeout: Duration,
    pub ca_file: &'a str,
    pub insecure: bool,
    pub headers: HeaderMap,
    pub pool_size: usize,
}

pub fn build_client(o: ClientOptions<'_>) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(o.timeout)
        .connect_timeout(o.timeout.min(Duration::from_secs(10)))
        .pool_max_idle_per_host(o.pool_size.max(1))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("billsync/", env!("CARGO_PKG_VERSION")))
        .default_headers(o.headers);
    if !o.ca_file.is_empty() {
        let pem = std::fs::read(o.ca_file)
            .map_err(|e| anyhow::anyhow!("cannot read ca_file {}: {e}", o.ca_file))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| anyhow::anyhow!("ca_file {} is not PEM: {e}", o.ca_file))?;
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    if o.insecure {
        b = b.danger_accept_invalid_certs(true);
    }
    Ok(b.build()?)
}

/// Sends and reads the whole body, bounded. Status codes are the caller's.
/// A request that ends, either way, is progress for the watchdog.
pub async fn send(req: reqwest::RequestBuilder) -> Result<(u16, HeaderMap, Vec<u8>), FetchError> {
    let result = send_inner(req).await;
    crate::telemetry::liveness::beat();
    result
}

async fn send_inner(req: reqwest::RequestBuilder) -> Result<(u16, HeaderMap, Vec<u8>), FetchError> {
    let mut resp = req.send().await.map_err(FetchError::from_reqwest)?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    if let Some(len) = resp.content_length() {
        if len as usize > MAX_BODY_BYTES {
            return Err(FetchError::transient(format!(
                "response body of {len} bytes exceeds the {MAX_BODY_BYTES} byte limit"
            ))
            .with_status(status));
        }
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(FetchError::from_reqwest)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(FetchError::transient(format!(
                "response body exceeds the {MAX_BODY_BYTES} byte limit"
            ))
            .with_status(status));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, headers, body))
}

/// `Retry-After` as seconds (the HTTP-date form is rare for 429s; treat it
/// as absent and let backoff decide).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// A short, safe description of a body that is not what we expected.
pub fn describe_body(body: &[u8]) -> String {
    let head = String::from_utf8_lossy(&body[..body.len().min(200)]);
    let trimmed = head.trim_start();
    if trimmed.is_empty() {
        "an empty body".into()
    } else if trimmed.starts_with('<') {
        "an HTML/XML page (proxy, WAF or login page?)".into()
    } else {
        let one_line: String = trimmed
            .chars()
            .take(80)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        format!(
            "a body starting {:?}",
            crate::telemetry::redact::scrub(&one_line)
        )
    }
}

/// Parses a JSON body; anything else is a transient transport error (a proxy
/// answered, not the application). Never decided by Content-Type.
///
/// One malformed value costs only the record holding it (SPEC §11): bytes
/// that are not UTF-8 become U+FFFD, and numbers too large for a float
/// become strings; normalization rejects such a record and reports it.
pub fn parse_json(body: &[u8]) -> Result<serde_json::Value, FetchError> {
    serde_json::from_slice(body).or_else(|e| {
        let text = String::from_utf8_lossy(body);
        let repaired = quote_huge_numbers(&text);
        let lossy = matches!(text, std::borrow::Cow::Owned(_));
        let retry = match (&repaired, lossy) {
            (Some(r), _) => serde_json::from_str(r).ok(),
            (None, true) => serde_json::from_str(&text).ok(),
            (None, false) => None,
        };
        retry.ok_or_else(|| {
            FetchError::transient(format!("expected JSON, got {} ({e})", describe_body(body)))
        })
    })
}

/// The text with every number outside strings that overflows a float
/// (`1e400`) quoted; `None` when there is none.
fn quote_huge_numbers(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = String::new();
    let (mut copied, mut i, mut in_string, mut changed) = (0, 0, false, false);
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
        } else if b == b'-' || b.is_ascii_digit() {
            let end = bytes[i..]
                .iter()
                .position(|c| !matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                .map_or(bytes.len(), |n| i + n);
            let token = &text[i..end];
            if token.parse::<f64>().is_ok_and(|f| f.is_infinite()) {
                out.push_str(&text[copied..i]);
                out.push('"');
                out.push_str(token);
                out.push('"');
                copied = end;
                changed = true;
            }
            i = end;
            continue;
        }
        i += 1;
    }
    changed.then(|| out + &text[copied..])
}

/// 408, 429 and 5xx are transient; other non-2xx statuses are permanent.
pub fn classify_status(status: u16) -> ErrorClass {
    match status {
        408 | 429 | 500..=599 => ErrorClass::Transient,
        _ => ErrorClass::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify_status(503), ErrorClass::Transient);
        assert_eq!(classify_status(429), ErrorClass::Transient);
        assert_eq!(classify_status(408), ErrorClass::Transient);
        assert_eq!(classify_status(401), ErrorClass::Permanent);
        assert_eq!(classify_status(422), ErrorClass::Permanent);
    }

    #[test]
    fn html_and_garbage_are_transient() {
        let e = parse_json(b"<html><body>502 Bad Gateway</body></html>").unwrap_err();
        assert!(e.is_transient());
        assert!(e.message.contains("HTML"), "{}", e.message);
        assert!(parse_json(&[0xff, 0xfe, 0x00]).unwrap_err().is_transient());
        let deep = "[".repeat(100_000);
        assert!(parse_json(deep.as_bytes()).is_err());
    }

    #[test]
    fn invalid_utf8_in_one_string_keeps_the_rest() {
        let mut body = br#"[{"id":1,"name":"Ann"},{"id":2,"name":"B"#.to_vec();
        body.extend([0xff, 0xfe]);
        body.extend(br#"b"}]"#);
        let v = parse_json(&body).unwrap();
        assert_eq!(v[0]["name"], "Ann");
        assert_eq!(v[1]["name"], "B\u{fffd}\u{fffd}b");
    }

    #[test]
    fn a_number_too_large_becomes_text_for_its_record_alone() {
        let body = br#"[{"id":1,"balance":5.5},{"id":2,"balance":-1e400,"n":"1e999"}]"#;
        let v = parse_json(body).unwrap();
        assert_eq!(v[0]["balance"], 5.5);
        assert_eq!(v[1]["balance"], "-1e400");
        assert_eq!(v[1]["n"], "1e999");
        assert_eq!(quote_huge_numbers(r#"{"a":"x\"1e400","b":2}"#), None);
        assert!(parse_json(b"[1e400").is_err());
    }
}
