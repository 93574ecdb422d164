//! The HTTP client dialects use to reach providers: bounded in time and size, with errors that
//! never carry a URL (query strings can hold credentials) or a response body.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};

use super::{DialectError, ErrorClass};
use crate::config::ProviderTransport;

/// Provider answers larger than this are refused: a token response is a few kilobytes.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;

#[derive(Clone)]
pub struct ProviderClient {
    client: Clients,
    timeout: Duration,
    /// Set for one exchange that may rotate a refresh token: every request of it runs until
    /// this instant instead of `timeout`, so a provider that answers late (after rotating) is
    /// still heard; see [`ProviderClient::until`].
    deadline: Option<(Instant, Duration)>,
}

#[derive(Clone)]
enum Clients {
    Fixed(reqwest::Client),
    /// With a client certificate (RFC 8705): the certificate and key files are looked at before
    /// each token request, and a change builds a new client. The old client's pooled
    /// connections, made with the old certificate, go with it, so the first request after a
    /// rotation opens a new connection that presents the new certificate.
    Rotating(Arc<crate::mtls::Rotating<reqwest::Client>>),
}

impl std::fmt::Debug for ProviderClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderClient")
            .field("timeout", &self.timeout)
            .field("deadline", &self.deadline.map(|(_, bound)| bound))
            .field(
                "client_certificate",
                &matches!(self.client, Clients::Rotating(_)),
            )
            .finish()
    }
}

#[derive(Debug)]
pub struct ProviderResponse {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

impl ProviderClient {
    /// A client that goes through `transport.proxy` or straight to the provider: reqwest would
    /// otherwise follow `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY`/`NO_PROXY` from the environment.
    pub fn new(timeout: Duration, transport: &ProviderTransport) -> Result<Self, String> {
        let client = match &transport.client_cert {
            None => Clients::Fixed(Self::build(timeout, transport, None)?),
            Some(source) => {
                let transport = transport.clone();
                Clients::Rotating(Arc::new(crate::mtls::Rotating::new(
                    source.clone(),
                    Duration::ZERO,
                    move |identity| Self::build(timeout, &transport, Some(identity)),
                )?))
            }
        };
        Ok(ProviderClient {
            client,
            timeout,
            deadline: None,
        })
    }

    /// This client for one exchange that ends `bound` from now: its requests wait for the
    /// provider's answer until then, whatever `timeout` says. For an exchange that presents a
    /// refresh token: a provider that rotated and answered late has spent the token presented,
    /// so the answer is the only copy of the next one, and dropping it kills the chain. The
    /// connection attempt stays bounded by `timeout` (nothing is spent before it is made).
    pub fn until(&self, bound: Duration) -> ProviderClient {
        ProviderClient {
            deadline: Some((Instant::now() + bound, bound)),
            ..self.clone()
        }
    }

    fn build(
        timeout: Duration,
        transport: &ProviderTransport,
        identity: Option<&crate::mtls::ClientIdentity>,
    ) -> Result<reqwest::Client, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tokenward/", env!("CARGO_PKG_VERSION")));
        builder = match &transport.proxy {
            Some(url) => builder.proxy(
                reqwest::Proxy::all(url.as_str())
                    .map_err(|e| format!("unusable proxy: {}", root_cause(&e)))?,
            ),
            None => builder.no_proxy(),
        };
        if let Some(path) = &transport.ca_file {
            builder = builder.tls_built_in_root_certs(false);
            for der in crate::ca_bundle::load(path)? {
                let cert = reqwest::Certificate::from_der(&der)
                    .map_err(|e| format!("CA bundle {}: {}", path.display(), root_cause(&e)))?;
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some(identity) = identity {
            builder = builder.identity(identity.reqwest_identity()?);
        }
        builder
            .build()
            .map_err(|e| format!("cannot build the provider HTTP client: {e}"))
    }

    /// SHA-256 of the client certificate the next request presents (after looking at its
    /// files), for a client that has one.
    pub fn client_cert_thumbprint(&self) -> Option<[u8; 32]> {
        match &self.client {
            Clients::Fixed(_) => None,
            Clients::Rotating(clients) => Some(clients.thumbprint()),
        }
    }

    pub fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let request = match &self.client {
            Clients::Fixed(client) => client.request(method, url),
            Clients::Rotating(clients) => clients.current().request(method, url),
        };
        match self.deadline {
            // Replaces the client's `timeout` for this request only (reqwest's per-request
            // timeout overrides the builder's).
            Some((at, _)) => request.timeout(at.saturating_duration_since(Instant::now())),
            None => request,
        }
    }

    /// Sends `request` and reads at most [`MAX_RESPONSE_BYTES`] of the answer.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<ProviderResponse, DialectError> {
        self.send_keeping(request, None).await.map(|(r, _)| r)
    }

    /// Like [`Self::send`], and returns the raw value of the response header `keep` too (the
    /// DPoP nonce a token endpoint sends).
    pub async fn send_keeping(
        &self,
        request: reqwest::RequestBuilder,
        keep: Option<&str>,
    ) -> Result<(ProviderResponse, Option<Bytes>), DialectError> {
        let mut response = request.send().await.map_err(|e| self.transport_error(e))?;
        let kept = keep
            .and_then(|name| response.headers().get(name))
            .map(|v| Bytes::copy_from_slice(v.as_bytes()));
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        if let Some(len) = response.content_length() {
            if len as usize > MAX_RESPONSE_BYTES {
                return Err(DialectError::transient(format!(
                    "provider answered HTTP {status} with a {len}-byte body, over the {MAX_RESPONSE_BYTES}-byte bound"
                )));
            }
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.transport_error(e))?
        {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(DialectError::transient(format!(
                    "provider answered HTTP {status} with a body over the {MAX_RESPONSE_BYTES}-byte bound"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let response = ProviderResponse {
            status,
            retry_after,
            body: body.freeze(),
        };
        Ok((response, kept))
    }

    fn transport_error(&self, e: reqwest::Error) -> DialectError {
        let e = e.without_url();
        let what = if e.is_timeout() {
            let waited = self.deadline.map_or(self.timeout, |(_, bound)| bound);
            format!(
                "provider did not answer within {}",
                humantime::format_duration(waited)
            )
        } else if e.is_connect() {
            format!("cannot connect to provider: {}", root_cause(&e))
        } else {
            format!("provider request failed: {}", root_cause(&e))
        };
        DialectError::transient(what)
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// `Retry-After` as seconds or an HTTP date, capped so a hostile provider cannot park us for days.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    const CAP: Duration = Duration::from_secs(3600);
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(CAP));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(CAP),
    )
}

impl ProviderResponse {
    /// The body as JSON, or a transient error that says what came instead.
    pub fn json(&self) -> Result<serde_json::Value, DialectError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            let looks_like = if self.body.iter().take(64).any(|b| *b == b'<') {
                "HTML or XML"
            } else if std::str::from_utf8(&self.body).is_err() {
                "bytes that are not UTF-8"
            } else if self.body.is_empty() {
                "an empty body"
            } else {
                "text that is not valid JSON"
            };
            DialectError::transient(format!(
                "provider answered HTTP {} with {looks_like} ({})",
                self.status,
                e.classify_name()
            ))
        })
    }

    /// The class of an HTTP-level failure that carries no more specific error code.
    pub fn status_class(&self) -> ErrorClass {
        match self.status {
            408 | 425 | 429 | 500..=599 => ErrorClass::Transient {
                retry_after: self.retry_after,
            },
            _ => ErrorClass::Fatal,
        }
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "wrong type",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

/// Reads a string field that must be present, naming the field when it is not.
pub fn required_str<'a>(
    value: &'a serde_json::Value,
    pointer: &str,
    what: &str,
) -> Result<&'a str, DialectError> {
    match value.pointer(pointer) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s),
        Some(serde_json::Value::String(_)) => Err(DialectError::transient(format!(
            "provider answer has an empty `{what}`"
        ))),
        Some(other) => Err(DialectError::transient(format!(
            "provider answer has `{what}` of the wrong type ({})",
            json_type(other)
        ))),
        None => Err(DialectError::transient(format!(
            "provider answer has no `{what}`"
        ))),
    }
}

pub fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("999999"), Some(Duration::from_secs(3600)));
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
        assert_eq!(parse_retry_after(&past), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn json_errors_say_what_came_instead() {
        let r = |b: &'static [u8]| ProviderResponse {
            status: 200,
            retry_after: None,
            body: Bytes::from_static(b),
        };
        assert!(r(b"<html>").json().unwrap_err().message.contains("HTML"));
        assert!(r(b"\xff\xfe").json().unwrap_err().message.contains("UTF-8"));
        assert!(
            r(b"{\"a\":")
                .json()
                .unwrap_err()
                .message
                .contains("truncated")
        );
        assert!(r(b"").json().unwrap_err().message.contains("empty"));
    }

    #[test]
    fn required_str_names_the_field() {
        let v: serde_json::Value = serde_json::json!({"access_token": 5});
        let e = required_str(&v, "/access_token", "access_token").unwrap_err();
        assert!(e.message.contains("access_token") && e.message.contains("number"));
        let e = required_str(&v, "/nope", "nope").unwrap_err();
        assert!(e.message.contains("no `nope`"));
    }
}
