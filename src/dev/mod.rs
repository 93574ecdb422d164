//! `tokenward dev`: a zero-configuration demo — a built-in OAuth 2.0 provider issuing short-lived
//! JWTs, an echo upstream that shows the headers it received, and tokenward in front of it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use http::{Response, StatusCode};
use pingora::apps::http_app::{HttpServer, ServeHttp};
use pingora::protocols::http::ServerSession;
use pingora::services::ServiceWithDependents;
use pingora::services::listening::Service;
use serde_json::json;
use tracing::info;

pub const DEMO_CLIENT_ID: &str = "demo";
pub const DEMO_CLIENT_SECRET: &str = "demo-secret";
const MAX_BODY: usize = 64 * 1024;

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Vec<u8>> {
    let body = body.to_string().into_bytes();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

async fn read_body(session: &mut ServerSession) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY {
                    return None;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Some(body),
            Err(_) => return None,
        }
    }
}

/// A minimal OAuth 2.0 token endpoint: `client_credentials` for the demo client, HS256 JWTs.
pub struct DemoProvider {
    key: Vec<u8>,
    lifetime: Duration,
    issued: AtomicU64,
}

impl DemoProvider {
    pub fn new(lifetime: Duration) -> Self {
        use rand::RngCore;
        let mut key = vec![0u8; 32];
        rand::rng().fill_bytes(&mut key);
        DemoProvider {
            key,
            lifetime,
            issued: AtomicU64::new(0),
        }
    }

    fn client_ok(&self, session: &ServerSession, form: &[(String, String)]) -> bool {
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if let Some(auth) = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
        {
            let decoded = auth
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Basic "))
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|b| String::from_utf8(b).ok());
            return decoded.as_deref() == Some(&format!("{DEMO_CLIENT_ID}:{DEMO_CLIENT_SECRET}"));
        }
        get("client_id") == Some(DEMO_CLIENT_ID) && get("client_secret") == Some(DEMO_CLIENT_SECRET)
    }
}

#[async_trait]
impl ServeHttp for DemoProvider {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        if session.req_header().method != http::Method::POST
            || session.req_header().uri.path() != "/oauth2/token"
        {
            return reply(
                StatusCode::NOT_FOUND,
                json!({"error": "not_found", "hint": "POST /oauth2/token"}),
            );
        }
        let Some(body) = read_body(session).await else {
            return reply(StatusCode::BAD_REQUEST, json!({"error": "invalid_request"}));
        };
        let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
        if !self.client_ok(session, &form) {
            return reply(StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"}));
        }
        if !form
            .iter()
            .any(|(k, v)| k == "grant_type" && v == "client_credentials")
        {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "unsupported_grant_type"}),
            );
        }
        let n = self.issued.fetch_add(1, Ordering::Relaxed) + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = json!({"sub": DEMO_CLIENT_ID, "iat": now, "exp": now + self.lifetime.as_secs(), "n": n});
        let token = match jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&self.key),
        ) {
            Ok(t) => t,
            Err(_) => {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "server_error"}),
                );
            }
        };
        info!(
            component = "demo-provider",
            token_number = n,
            lifetime_s = self.lifetime.as_secs(),
            "issued a token"
        );
        reply(
            StatusCode::OK,
            json!({"access_token": token, "token_type": "Bearer", "expires_in": self.lifetime.as_secs()}),
        )
    }
}

/// An upstream that answers with what it received, so the injected header can be seen.
pub struct Echo;

#[async_trait]
impl ServeHttp for Echo {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let headers: serde_json::Map<String, serde_json::Value> = req
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    json!(String::from_utf8_lossy(v.as_bytes())),
                )
            })
            .collect();
        let method = req.method.to_string();
        let path = req.uri.to_string();
        let body_len = read_body(session).await.map(|b| b.len());
        reply(
            StatusCode::OK,
            json!({"method": method, "path": path, "headers": headers, "body_bytes": body_len}),
        )
    }
}

pub fn provider_service(listen: SocketAddr, lifetime: Duration) -> Box<dyn ServiceWithDependents> {
    let mut s = Service::new(
        "demo provider".into(),
        HttpServer::new_app(DemoProvider::new(lifetime)),
    );
    s.add_tcp(&listen.to_string());
    Box::new(s)
}

pub fn echo_service(listen: SocketAddr) -> Box<dyn ServiceWithDependents> {
    let mut s = Service::new("echo upstream".into(), HttpServer::new_app(Echo));
    s.add_tcp(&listen.to_string());
    Box::new(s)
}

/// The configuration `tokenward dev` runs: an ordinary config file, so the demo exercises the
/// same loading and validation as production.
pub fn demo_config(
    proxy: SocketAddr,
    admin: SocketAddr,
    echo: SocketAddr,
    provider: SocketAddr,
    state: &std::path::Path,
) -> String {
    format!(
        r#"# Written by `tokenward dev`.
[log]
format = "text"
level = "info"

[admin]
listen = "{admin}"

[state]
dir = "{state}"

[server]
grace_period = "1s"

[[routes]]
name = "echo"
listen = "{proxy}"
upstream = "http://{echo}"
credential = "demo"

[credentials.demo]
dialect = "oauth2"
token_url = "http://{provider}/oauth2/token"
grant = "client_credentials"
client_id = "{DEMO_CLIENT_ID}"
client_secret = "{DEMO_CLIENT_SECRET}"
client_auth = "client_secret_basic"
expiry_margin = "3s"
min_refresh_interval = "2s"
"#,
        state = state.display()
    )
}

pub fn banner(proxy: SocketAddr, admin: SocketAddr, provider: SocketAddr) -> String {
    format!(
        r#"
tokenward dev is running: a demo OAuth 2.0 provider issuing 30-second JWTs, an echo upstream,
and tokenward in front of it. Try:

  # a request without any token; the echo shows the Authorization header tokenward injected
  curl -s http://{proxy}/hello

  # the token's state, expiry and refresh schedule (never the token itself)
  curl -s http://{admin}/tokens

  # watch the injected token change about every 22 seconds, before it expires
  for i in $(seq 1 12); do curl -s http://{proxy}/hello | grep -o '"authorization":"[^"]*"' | cut -c1-60; sleep 5; done

  # readiness, metrics
  curl -s http://{admin}/readyz; curl -s http://{admin}/metrics | grep '^tokenward_token'

  # ask the provider directly
  curl -s -u {DEMO_CLIENT_ID}:{DEMO_CLIENT_SECRET} -d grant_type=client_credentials http://{provider}/oauth2/token

Ctrl-C stops it.
"#
    )
}
