//! A subject-token issuer for token-exchange tests: signing keys made here, and a fake identity
//! provider that publishes their JWKS (with the `Cache-Control` the test sets, or failing) and
//! exchanges the subjects tokenward sends it (RFC 8693), recording both.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde_json::json;

pub const ISSUER: &str = "https://idp.test.example";
pub const SUBJECT_AUD: &str = "tokenward-mid-tier";
const EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// A P-256 key made for the test, published (or not) in a JWKS under `kid`.
pub struct TestKey {
    pub kid: String,
    pub pem: String,
    pub x: String,
    pub y: String,
}

impl TestKey {
    pub fn new(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // The uncompressed point: 0x04 || X || Y.
        let raw = pair.public_key_raw();
        assert_eq!(raw.len(), 65);
        let b64 =
            |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
        TestKey {
            kid: kid.to_string(),
            pem: pair.serialize_pem(),
            x: b64(&raw[1..33]),
            y: b64(&raw[33..65]),
        }
    }
    pub fn jwk(&self) -> serde_json::Value {
        json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
               "kid": self.kid, "x": self.x, "y": self.y})
    }
    /// The JWK without its `kid`, as issuers that publish one key at a time do.
    pub fn jwk_without_kid(&self) -> serde_json::Value {
        json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
               "x": self.x, "y": self.y})
    }
    fn sign_with(&self, kid: Option<&str>, claims: serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = kid.map(str::to_string);
        let key = jsonwebtoken::EncodingKey::from_ec_pem(self.pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }
    /// A JWT signed by this key, naming `kid` in its header.
    pub fn sign_as(&self, kid: &str, claims: serde_json::Value) -> String {
        self.sign_with(Some(kid), claims)
    }
    pub fn sign(&self, claims: serde_json::Value) -> String {
        self.sign_as(&self.kid, claims)
    }
    /// A JWT signed by this key whose header names no `kid`.
    pub fn sign_without_kid(&self, claims: serde_json::Value) -> String {
        self.sign_with(None, claims)
    }
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims for `sub`, unique per call (`jti`), so each token is a new caller to tokenward.
pub fn claims(sub: &str, iss: &str, aud: &str, exp_in: i64) -> serde_json::Value {
    json!({"sub": sub, "iss": iss, "aud": aud, "iat": now_s(),
           "exp": (now_s() as i64 + exp_in), "jti": super::rand_hex()})
}

/// A valid subject for `sub` signed by `key`.
pub fn subject_token(key: &TestKey, sub: &str) -> String {
    key.sign(claims(sub, ISSUER, SUBJECT_AUD, 300))
}

#[derive(Default)]
pub struct IdpState {
    /// The JWKS document served at /jwks.
    pub jwks: Mutex<serde_json::Value>,
    /// `Cache-Control: max-age` sent with it, if any.
    pub max_age: Mutex<Option<u64>>,
    /// /jwks answers 503 while set.
    pub jwks_down: AtomicBool,
    /// /jwks answers after this long (a host that hangs).
    pub jwks_delay: Mutex<std::time::Duration>,
    /// When each /jwks request arrived, answered or not.
    pub jwks_fetches: Mutex<Vec<Instant>>,
    /// Every subject token exchanged at /token.
    pub exchanged: Mutex<Vec<String>>,
}

/// The subject issuer's JWKS and a token-exchange endpoint, on loopback.
#[derive(Clone)]
pub struct FakeIdp {
    pub addr: SocketAddr,
    pub state: Arc<IdpState>,
}

impl FakeIdp {
    pub async fn start() -> Self {
        let state = Arc::new(IdpState::default());
        let router = Router::new()
            .route("/jwks", get(jwks))
            .route("/token", post(exchange))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        FakeIdp { addr, state }
    }
    pub fn publish(&self, keys: Vec<serde_json::Value>) {
        *self.state.jwks.lock().unwrap() = json!({ "keys": keys });
    }
    pub fn set_max_age(&self, s: Option<u64>) {
        *self.state.max_age.lock().unwrap() = s;
    }
    pub fn set_delay(&self, delay: std::time::Duration) {
        *self.state.jwks_delay.lock().unwrap() = delay;
    }
    pub fn set_down(&self, down: bool) {
        self.state.jwks_down.store(down, Ordering::SeqCst);
    }
    pub fn fetches(&self) -> Vec<Instant> {
        self.state.jwks_fetches.lock().unwrap().clone()
    }
    pub fn exchanged(&self) -> Vec<String> {
        self.state.exchanged.lock().unwrap().clone()
    }
    /// Credential keys for a token exchange at this fake that validates subjects against its
    /// JWKS, plus the `extra` TOML lines.
    pub fn credential(&self, extra: &str) -> String {
        self.credential_with_jwks_at(&format!("http://{}/jwks", self.addr), extra)
    }
    /// Like [`Self::credential`], with the JWKS at `jwks_url`.
    pub fn credential_with_jwks_at(&self, jwks_url: &str, extra: &str) -> String {
        format!(
            "dialect = \"oauth2\"\ngrant = \"token_exchange\"\ntoken_url = \"http://{}/token\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\n\
             subject_jwks_url = \"{jwks_url}\"\nsubject_issuer = \"{ISSUER}\"\nsubject_audience = \"{SUBJECT_AUD}\"\n{extra}\n",
            self.addr,
            super::CLIENT_ID,
            super::CLIENT_SECRET,
        )
    }
}

async fn jwks(State(s): State<Arc<IdpState>>) -> Response {
    s.jwks_fetches.lock().unwrap().push(Instant::now());
    let delay = *s.jwks_delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    if s.jwks_down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let body = Json(s.jwks.lock().unwrap().clone());
    match *s.max_age.lock().unwrap() {
        Some(age) => (
            [(header::CACHE_CONTROL, format!("public, max-age={age}"))],
            body,
        )
            .into_response(),
        None => body.into_response(),
    }
}

/// RFC 8693 with client_secret_post or basic: any subject is exchanged (what to let through is
/// tokenward's local validation, which the tests observe by what arrives here).
async fn exchange(
    State(s): State<Arc<IdpState>>,
    Form(form): Form<std::collections::HashMap<String, String>>,
) -> Response {
    let Some(subject) = form.get("subject_token") else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_request"})),
        )
            .into_response();
    };
    if form.get("grant_type").map(String::as_str) != Some(EXCHANGE_GRANT) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type"})),
        )
            .into_response();
    }
    s.exchanged.lock().unwrap().push(subject.clone());
    Json(json!({
        "access_token": format!("xt-{}", super::rand_hex()),
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "Bearer",
        "expires_in": 300,
    }))
    .into_response()
}

/// A request through tokenward from the caller whose token is `subject` (as a bearer token):
/// its status, JSON body and `Retry-After`.
pub async fn call(
    tw: &super::Tokenward,
    subject: &str,
) -> (u16, serde_json::Value, Option<String>) {
    let r = reqwest::Client::new()
        .get(tw.url("/x"))
        .bearer_auth(subject)
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}; logs:\n{}", tw.logs()));
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, body, retry)
}
