//! The admin listener: liveness, readiness, Prometheus metrics, and the token status and
//! actions an operator needs. It reveals no token or secret; its actions need a bearer token
//! (or a loopback listener) and forced refreshes are rate-limited per credential.

mod access;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{Encoder, TextEncoder};
use serde_json::{Value, json};

use crate::server::Shared;
use crate::token::{Credential, StoreMode};
pub use access::{ActionAccess, RefreshLimiter, action_access};

pub struct AdminApp {
    pub shared: Arc<Shared>,
    limiter: RefreshLimiter,
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

fn reply_json(status: StatusCode, body: Value) -> Response<Vec<u8>> {
    reply(status, "application/json", body.to_string().into_bytes())
}

/// Seconds with millisecond precision: enough for operators and for tests of short tokens.
fn secs_ms(d: std::time::Duration) -> f64 {
    (d.as_millis() as f64) / 1000.0
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// What `/tokens` says about one credential.
pub fn credential_status(c: &Credential) -> Value {
    let now = Instant::now();
    let status = c.status_snapshot();
    let token = c.latest();
    let state = match (&token, status.fatal) {
        (_, true) => "fatal",
        (Some(t), _) if t.is_usable(now) => "valid",
        (Some(_), _) => "expired",
        (None, _) => "pending",
    };
    let mut v = json!({
        "name": c.name(),
        "dialect": c.config().dialect_name,
        "state": state,
        "last_refresh": status.last_success.map(rfc3339),
        "last_error": status.last_error,
        "last_error_class": status.last_error_class,
        "last_error_at": status.last_error_at.map(rfc3339),
        "consecutive_failures": status.consecutive_failures,
        "next_attempt_in_s": status.not_before.map(|t| secs_ms(t.saturating_duration_since(now))),
        "persist_error": status.persist_error,
        "store_mode": c.store_mode().as_str(),
    });
    if let Some(source) = c.config().dialect.token_source() {
        v["source"] = json!(source);
    }
    if let Some((code, at)) = &status.last_upstream_rejection {
        v["last_upstream_rejection"] = json!({"code": code, "at": rfc3339(*at)});
    }
    if let Some(x) = c.exchanger() {
        // Per-caller tokens only: counts, never a token or a subject.
        v["state"] = json!("per_caller");
        v["exchange"] = x.status();
    }
    if let Some(t) = token {
        v["token"] = json!({
            "generation": t.generation,
            "obtained_via": t.kind.as_str(),
            "issued_at": rfc3339(t.issued_wall),
            "expires_at": rfc3339(t.expires_wall()),
            "expires_in_s": secs_ms(t.expires_at.saturating_duration_since(now)),
            "refresh_in_s": secs_ms(t.refresh_at.saturating_duration_since(now)),
        });
    }
    v
}

impl AdminApp {
    /// moka counts entries lazily: let it catch up so `/tokens` reports what the cache holds.
    async fn settle_exchanges(&self) {
        let creds = self.shared.credentials().clone();
        for c in creds.iter() {
            if let Some(x) = c.exchanger() {
                x.settle().await;
            }
        }
    }

    pub fn new(shared: Arc<Shared>) -> Self {
        AdminApp {
            shared,
            limiter: RefreshLimiter::default(),
        }
    }

    fn metrics(&self) -> Response<Vec<u8>> {
        for c in self.shared.credentials().iter() {
            c.update_gauges();
            if let Some(x) = c.exchanger() {
                x.update_gauges();
            }
        }
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.shared.registry.gather(), &mut out) {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("cannot encode metrics: {e}").into_bytes(),
            );
        }
        reply(StatusCode::OK, encoder.format_type(), out)
    }

    fn readyz(&self) -> Response<Vec<u8>> {
        let creds = self.shared.credentials();
        let waiting: Vec<&str> = creds
            .iter()
            .filter(|c| !c.is_ready())
            .map(|c| c.name())
            .collect();
        // Ready as long as every credential has a token, whatever the store does; a degraded
        // store is reported so an operator sees which replicas refresh alone or not at all.
        let degraded: serde_json::Map<String, Value> = creds
            .iter()
            .filter(|c| matches!(c.store_mode(), StoreMode::Local | StoreMode::Hold))
            .map(|c| (c.name().to_string(), json!(c.store_mode().as_str())))
            .collect();
        if waiting.is_empty() {
            reply_json(
                StatusCode::OK,
                json!({"status": "ready", "store_degraded": degraded}),
            )
        } else {
            reply_json(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "not_ready", "waiting_for": waiting, "store_degraded": degraded}),
            )
        }
    }

    async fn action(&self, name: &str, action: &str, query: Option<&str>) -> Response<Vec<u8>> {
        let Some(c) = self.shared.credential(name) else {
            return reply_json(
                StatusCode::NOT_FOUND,
                json!({"error": "unknown_credential", "credential": name}),
            );
        };
        if action == "refresh" {
            // A forced refresh clears the fatal state and the breaker: unthrottled, a caller could
            // make tokenward retry a bad password until the vendor locks the account.
            let interval = c.config().timing.min_refresh_interval;
            if let Err(wait) = self.limiter.admit(name, interval, Instant::now()) {
                return access::too_many(name, wait);
            }
        }
        match action {
            "refresh" => match c.force_refresh().await {
                Ok(t) => reply_json(
                    StatusCode::OK,
                    json!({
                        "credential": name,
                        "generation": t.generation,
                        "expires_at": rfc3339(t.expires_wall()),
                    }),
                ),
                Err(u) => reply_json(
                    StatusCode::BAD_GATEWAY,
                    json!({
                        "error": "refresh_failed", "credential": name, "reason": u.reason,
                    }),
                ),
            },
            "invalidate" => {
                let subject = match invalidate_query(query, c.exchanger().is_some()) {
                    Ok(subject) => subject,
                    Err(reason) => {
                        return reply_json(
                            StatusCode::BAD_REQUEST,
                            json!({"error": "bad_request", "credential": name, "reason": reason}),
                        );
                    }
                };
                let dropped = match c.exchanger() {
                    Some(x) => x.invalidate(subject.as_ref()).await,
                    None => c.invalidate(None),
                };
                reply_json(
                    StatusCode::OK,
                    json!({"credential": name, "invalidated": dropped}),
                )
            }
            _ => reply_json(StatusCode::NOT_FOUND, json!({"error": "not_found"})),
        }
    }
}

/// `invalidate`'s query: nothing, or for a token-exchange credential `subject_sha256=<hex>`
/// (SHA-256 of one caller's raw subject token). Anything else is refused rather than ignored:
/// a misspelt parameter must not drop every caller's token.
fn invalidate_query(query: Option<&str>, exchange: bool) -> Result<Option<[u8; 32]>, String> {
    let mut subject = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "subject_sha256" if !exchange => {
                return Err("subject_sha256 names a caller of a token-exchange credential; this credential has one token".into());
            }
            "subject_sha256" if subject.is_none() => {
                let digest = hex_digest(&value).ok_or(
                    "subject_sha256 must be the SHA-256 of the subject token, 64 hex digits",
                )?;
                subject = Some(digest);
            }
            "subject_sha256" => return Err("subject_sha256 is given more than once".into()),
            other => {
                return Err(format!(
                    "unknown parameter {:?}",
                    other.chars().take(32).collect::<String>()
                ));
            }
        }
    }
    Ok(subject)
}

fn hex_digest(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Whether the client asked to keep its connection (RFC 9112 §9.3): HTTP/1.1 unless it sent
/// `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`.
fn client_keeps_alive(request: &pingora::http::RequestHeader) -> bool {
    let has = |option: &str| {
        request
            .headers
            .get_all(http::header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .any(|o| o.trim_ascii().eq_ignore_ascii_case(option.as_bytes()))
    };
    match request.version {
        http::Version::HTTP_11 => !has("close"),
        http::Version::HTTP_10 => has("keep-alive") && !has("close"),
        _ => false,
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        if !client_keeps_alive(session.req_header()) {
            // pingora-core's `HttpServer::process_new_http` turns keep-alive on for every
            // request after reading it, an HTTP/1.0 one without `Connection: keep-alive` and
            // one with `Connection: close` included: the answer would say keep-alive to a
            // client that then waits for the close its request asked for.
            session.set_keepalive(None);
        }
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        if method == Method::GET && segments.first() == Some(&"tokens") {
            self.settle_exchanges().await;
        }
        match (&method, segments.as_slice()) {
            (&Method::GET, ["healthz"]) => reply_json(StatusCode::OK, json!({"status": "ok"})),
            (&Method::GET, ["readyz"]) => self.readyz(),
            (&Method::GET, ["metrics"]) => self.metrics(),
            (&Method::GET, ["tokens"]) => {
                let list: Vec<Value> = self
                    .shared
                    .credentials()
                    .iter()
                    .map(|c| credential_status(c))
                    .collect();
                reply_json(StatusCode::OK, json!({"credentials": list}))
            }
            (&Method::GET, ["tokens", name]) => match self.shared.credential(name) {
                Some(c) => reply_json(StatusCode::OK, credential_status(&c)),
                None => reply_json(
                    StatusCode::NOT_FOUND,
                    json!({"error": "unknown_credential"}),
                ),
            },
            (&Method::POST, ["tokens", name, action]) => {
                let config = self.shared.config.load_full();
                let access = action_access(config.admin_listen, config.admin_token.as_ref());
                if let Err(refused) = access::authorize(&access, session).await {
                    return refused;
                }
                let name = name.to_string();
                let action = action.to_string();
                let query = session.req_header().uri.query().map(str::to_string);
                self.action(&name, &action, query.as_deref()).await
            }
            (_, ["healthz" | "readyz" | "metrics" | "tokens", ..]) => reply_json(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "method_not_allowed"}),
            ),
            _ => reply_json(StatusCode::NOT_FOUND, json!({"error": "not_found"})),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidate_takes_one_subject_digest_or_nothing() {
        let hex = "ab".repeat(32);
        assert_eq!(invalidate_query(None, true), Ok(None));
        assert_eq!(invalidate_query(Some(""), false), Ok(None));
        assert_eq!(
            invalidate_query(Some(&format!("subject_sha256={hex}")), true),
            Ok(Some([0xab; 32]))
        );
        assert_eq!(
            invalidate_query(
                Some(&format!("subject_sha256={}", hex.to_uppercase())),
                true
            ),
            Ok(Some([0xab; 32]))
        );
        for bad in [
            "subject_sha256=xyz".to_string(),
            format!("subject_sha256={hex}&subject_sha256={hex}"),
            format!("subject_sha={hex}"),
            format!("subject_sha256={}", "é".repeat(32)),
        ] {
            assert!(invalidate_query(Some(&bad), true).is_err(), "{bad}");
        }
        assert!(invalidate_query(Some(&format!("subject_sha256={hex}")), false).is_err());
    }
}
