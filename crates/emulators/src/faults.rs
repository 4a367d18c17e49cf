//! Fault injection shared by the emulators.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this status and a small JSON body.
    Status(u16),
    /// A proxy's HTML error page with status 502.
    Html,
    /// An HTML page with status 200 (a WAF or login page).
    Html200,
    /// 200 with bytes that are not JSON.
    Garbage,
    /// BILLmanager's 200-with-error body of this `$type`.
    ErrorBody(String),
    /// Wait this long, then answer normally (past the client timeout: a timeout).
    Delay(Duration),
    /// A list call answers with no rows at all.
    EmptyListing,
    /// 429 with `Retry-After: secs`.
    TooMany(u64),
    /// 200 with a JSON body of an unexpected shape.
    WrongShape,
    /// This status with this body, as given (a proxy's or a broken VMS's 2xx).
    Reply(u16, String),
    /// A redirect to a login page (an SSO proxy in front).
    Redirect,
    /// The request is applied, then the answer is held this long (past the
    /// client's timeout: the answer is lost).
    LoseAnswer(Duration),
}

struct Queued {
    /// Applies to requests whose route key contains this ("" for any).
    matcher: String,
    fault: Fault,
}

/// `(percent, fault)`s drawn from a seeded sequence, so a run repeats.
type Sometimes = (Vec<(u64, Queued)>, Option<super::Seq>);

#[derive(Default)]
pub struct Faults {
    queue: Mutex<VecDeque<Queued>>,
    always: Mutex<Vec<Queued>>,
    sometimes: Mutex<Sometimes>,
    latency_ms: AtomicU64,
}

impl Faults {
    /// The next request matching `matcher` gets `fault`, once.
    pub fn once(&self, matcher: &str, fault: Fault) {
        self.lock_queue().push_back(Queued {
            matcher: matcher.into(),
            fault,
        });
    }

    /// The next `n` matching requests get `fault`.
    pub fn times(&self, matcher: &str, fault: Fault, n: usize) {
        for _ in 0..n {
            self.once(matcher, fault.clone());
        }
    }

    /// Every matching request gets `fault` until `clear`.
    pub fn always(&self, matcher: &str, fault: Fault) {
        self.always
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Queued {
                matcher: matcher.into(),
                fault,
            });
    }

    /// `percent` of the matching requests get `fault`, until `clear`.
    pub fn sometimes(&self, matcher: &str, fault: Fault, percent: u64, seed: u64) {
        let mut s = self.sometimes.lock().unwrap_or_else(|e| e.into_inner());
        s.1.get_or_insert_with(|| super::Seq::new(seed));
        s.0.push((
            percent,
            Queued {
                matcher: matcher.into(),
                fault,
            },
        ));
    }

    pub fn clear(&self) {
        self.sometimes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clear();
        self.lock_queue().clear();
        self.always
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.latency_ms.store(0, Ordering::Relaxed);
    }

    pub fn set_latency(&self, d: Duration) {
        self.latency_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fault for a request with this route key, if any.
    pub fn take(&self, key: &str) -> Option<Fault> {
        {
            let mut q = self.lock_queue();
            if let Some(pos) = q.iter().position(|f| key.contains(&f.matcher)) {
                return q.remove(pos).map(|f| f.fault);
            }
        }
        let always = self.always.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = always.iter().find(|f| key.contains(&f.matcher)) {
            return Some(f.fault.clone());
        }
        drop(always);
        let mut guard = self.sometimes.lock().unwrap_or_else(|e| e.into_inner());
        let (list, seq) = &mut *guard;
        let seq = seq.as_mut()?;
        list.iter()
            .filter(|(_, f)| key.contains(&f.matcher))
            .find(|(percent, _)| seq.below(100) < *percent)
            .map(|(_, f)| f.fault.clone())
    }

    /// Applies latency and the generic faults. Returns a response to send
    /// instead of the normal one, or the fault for the handler to apply
    /// (`EmptyListing`, `ErrorBody`, `Delay` already slept).
    pub async fn apply(&self, key: &str) -> Result<Option<Fault>, Response> {
        let latency = self.latency_ms.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        match self.take(key) {
            None => Ok(None),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(None)
            }
            Some(Fault::Status(code)) => {
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                Err((status, axum::Json(serde_json::json!({"message": "injected fault"}))).into_response())
            }
            Some(Fault::Html) => Err((
                StatusCode::BAD_GATEWAY,
                [("content-type", "text/html")],
                "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>",
            )
                .into_response()),
            Some(Fault::Html200) => Err((
                StatusCode::OK,
                [("content-type", "text/html")],
                "<!DOCTYPE html><html><body>Please log in</body></html>",
            )
                .into_response()),
            Some(Fault::Garbage) => Err((
                StatusCode::OK,
                [("content-type", "application/json")],
                vec![0xffu8, 0xfe, b'{', b'"', 0x00, b'x'],
            )
                .into_response()),
            Some(Fault::WrongShape) => Err((
                StatusCode::OK,
                axum::Json(serde_json::json!({"unexpected": {"shape": true}})),
            )
                .into_response()),
            Some(Fault::TooMany(secs)) => {
                let mut r = (
                    StatusCode::TOO_MANY_REQUESTS,
                    axum::Json(serde_json::json!({"message": "Too Many Attempts."})),
                )
                    .into_response();
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    r.headers_mut().insert("retry-after", v);
                }
                Err(r)
            }
            Some(Fault::Reply(code, body)) => {
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
                Err((status, [("content-type", "application/json")], body).into_response())
            }
            Some(Fault::Redirect) => Err((
                StatusCode::FOUND,
                [("location", "/sso/login?next=%2Fapi")],
                "",
            )
                .into_response()),
            Some(f @ (Fault::EmptyListing | Fault::ErrorBody(_) | Fault::LoseAnswer(_))) => {
                Ok(Some(f))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_faults_match_and_run_once() {
        let f = Faults::default();
        f.once("account.edit", Fault::Status(500));
        assert_eq!(f.take("account"), None);
        assert_eq!(f.take("account.edit"), Some(Fault::Status(500)));
        assert_eq!(f.take("account.edit"), None);
        f.always("", Fault::Html);
        assert_eq!(f.take("x"), Some(Fault::Html));
        assert_eq!(f.take("y"), Some(Fault::Html));
        f.clear();
        assert_eq!(f.take("y"), None);
    }
}
