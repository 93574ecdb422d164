//! Fakes for workload identity: a token endpoint that accepts only assertions the test signed
//! and currently accepts (as a client assertion or a JWT bearer grant), and a Google token
//! endpoint that verifies the RS256 assertion of a service-account key against its public half.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};

pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
pub const JWT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The audience Entra ID workload identity federation expects in the projected token.
pub const ENTRA_AUDIENCE: &str = "api://AzureADTokenExchange";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

/// Writes `body` to `path` the way the kubelet updates a projected volume: a new file renamed
/// over the old one, so a reader sees the old content or the new, never a torn one.
pub fn write_atomically(path: &Path, body: &str) {
    let tmp = path.with_extension(format!("tmp-{}", super::rand_hex()));
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The key the test signs its "projected service-account tokens" with (HS256: the fake and
/// the test share it; tokenward never sees it, it only passes the JWT on).
pub struct AssertionSigner {
    key: Vec<u8>,
    counter: AtomicUsize,
}

impl AssertionSigner {
    pub fn new() -> Self {
        AssertionSigner {
            key: super::rand_hex().into_bytes(),
            counter: AtomicUsize::new(0),
        }
    }

    /// A fresh signed JWT, valid for `lifetime_s`, shaped like a projected token.
    pub fn issue(&self, lifetime_s: u64) -> String {
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        let claims = json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": "system:serviceaccount:shop:orders",
            "aud": [ENTRA_AUDIENCE],
            "iat": now(),
            "exp": now() + lifetime_s,
            "jti": format!("sa-{n}-{}", super::rand_hex()),
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&self.key),
        )
        .unwrap()
    }

    /// Verifies signature, `exp` and audience; the reason when it fails.
    pub fn verify(&self, jwt: &str) -> Result<(), String> {
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.leeway = 0;
        v.set_audience(&[ENTRA_AUDIENCE]);
        v.set_required_spec_claims(&["exp", "aud", "sub"]);
        jsonwebtoken::decode::<Value>(jwt, &jsonwebtoken::DecodingKey::from_secret(&self.key), &v)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// How the assertion fake wants to be authenticated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AssertionMode {
    /// `client_assertion` + `client_assertion_type` + `client_id` on any grant.
    ClientAssertion,
    /// `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer` with `assertion` and `scope`.
    JwtBearer,
}

#[derive(Clone, Debug)]
pub struct AssertionCall {
    pub grant_type: String,
    pub assertion: String,
    pub status: u16,
    pub reason: String,
}

pub struct AssertionIdpState {
    mode: AssertionMode,
    signer: AssertionSigner,
    client_id: String,
    scope: String,
    lifetime_s: u64,
    /// Assertions accepted now: rotation revokes the previous ones.
    accepted: Mutex<BTreeSet<String>>,
    /// When set: the first request carrying this assertion makes the fake itself rotate the
    /// file (to the second value), accept only the new one and refuse the request, as if the
    /// kubelet had rotated the token while the request was in flight.
    rotate_on_receipt: Mutex<Option<(String, String, std::path::PathBuf)>>,
    refresh_tokens: Mutex<BTreeSet<String>>,
    calls: Mutex<Vec<AssertionCall>>,
    issued: Mutex<Vec<String>>,
    counter: AtomicUsize,
    /// How long each request takes before it is judged: a window for rotating under it.
    delay: Mutex<Duration>,
    in_flight: AtomicUsize,
}

#[derive(Clone)]
pub struct FakeAssertionIdp {
    pub addr: SocketAddr,
    pub state: Arc<AssertionIdpState>,
}

impl FakeAssertionIdp {
    pub async fn start(mode: AssertionMode, lifetime_s: u64) -> Self {
        let state = Arc::new(AssertionIdpState {
            mode,
            signer: AssertionSigner::new(),
            client_id: "00000000-aaaa-bbbb-cccc-000000000000".into(),
            scope: "partner.read".into(),
            lifetime_s,
            accepted: Mutex::new(BTreeSet::new()),
            rotate_on_receipt: Mutex::new(None),
            refresh_tokens: Mutex::new(BTreeSet::new()),
            calls: Mutex::new(Vec::new()),
            issued: Mutex::new(Vec::new()),
            counter: AtomicUsize::new(0),
            delay: Mutex::new(Duration::ZERO),
            in_flight: AtomicUsize::new(0),
        });
        let router = Router::new()
            .route("/token", post(assertion_endpoint))
            .with_state(state.clone());
        FakeAssertionIdp {
            addr: serve(router).await,
            state,
        }
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }
    pub fn client_id(&self) -> &str {
        &self.state.client_id
    }
    pub fn scope(&self) -> &str {
        &self.state.scope
    }
    /// A new assertion, signed and accepted from now on (beside the ones already accepted).
    pub fn issue_accepted(&self, lifetime_s: u64) -> String {
        let a = self.state.signer.issue(lifetime_s);
        self.state.accepted.lock().unwrap().insert(a.clone());
        a
    }
    /// A signed assertion the fake does not accept.
    pub fn issue_unaccepted(&self) -> String {
        self.state.signer.issue(60)
    }
    /// Accepts only `assertion` from now on.
    pub fn accept_only(&self, assertion: &str) {
        let mut a = self.state.accepted.lock().unwrap();
        a.clear();
        a.insert(assertion.to_string());
    }
    /// A refresh token the fake accepts (the bootstrap of a refresh_token credential).
    pub fn add_refresh_token(&self, token: &str) {
        self.state
            .refresh_tokens
            .lock()
            .unwrap()
            .insert(token.to_string());
    }
    pub fn rotate_on_receipt(&self, old: &str, new: &str, file: &Path) {
        *self.state.rotate_on_receipt.lock().unwrap() =
            Some((old.to_string(), new.to_string(), file.to_path_buf()));
    }
    pub fn calls(&self) -> Vec<AssertionCall> {
        self.state.calls.lock().unwrap().clone()
    }
    pub fn set_delay(&self, d: Duration) {
        *self.state.delay.lock().unwrap() = d;
    }
    /// Token requests received and not yet judged.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }
    pub fn issued(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }
    /// Every assertion the fake accepted a request with.
    pub fn accepted_assertions(&self) -> BTreeSet<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.status == 200)
            .map(|c| c.assertion)
            .collect()
    }
}

fn refuse(status: StatusCode, error: &str, why: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": why})),
    )
        .into_response()
}

async fn assertion_endpoint(State(s): State<Arc<AssertionIdpState>>, body: String) -> Response {
    s.in_flight.fetch_add(1, Ordering::SeqCst);
    let delay = *s.delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let field = |k: &str| form.get(k).cloned().unwrap_or_default();
    let grant_type = field("grant_type");
    let (assertion, error, status) = match s.mode {
        AssertionMode::ClientAssertion => (
            field("client_assertion"),
            "invalid_client",
            StatusCode::UNAUTHORIZED,
        ),
        AssertionMode::JwtBearer => (field("assertion"), "invalid_grant", StatusCode::BAD_REQUEST),
    };
    let record_why = |code: u16, reason: &str| {
        s.calls.lock().unwrap().push(AssertionCall {
            grant_type: grant_type.clone(),
            assertion: assertion.clone(),
            status: code,
            reason: reason.to_string(),
        })
    };
    let record = |code: u16| record_why(code, "");
    let rotation = {
        let mut r = s.rotate_on_receipt.lock().unwrap();
        match r.as_ref() {
            Some((old, _, _)) if *old == assertion => r.take(),
            _ => None,
        }
    };
    if let Some((_, new, file)) = rotation {
        write_atomically(&file, &new);
        let mut a = s.accepted.lock().unwrap();
        a.clear();
        a.insert(new);
    }
    // RFC 7521 §4.2 / RFC 7523 §2.1: exactly these parameters carry the assertion.
    let shape_ok = match s.mode {
        AssertionMode::ClientAssertion => {
            field("client_id") == s.client_id
                && field("client_assertion_type") == JWT_ASSERTION_TYPE
                && !form.contains_key("client_secret")
                && matches!(grant_type.as_str(), "client_credentials" | "refresh_token")
        }
        AssertionMode::JwtBearer => {
            grant_type == JWT_BEARER_GRANT
                && !form.contains_key("client_assertion")
                && !form.contains_key("client_secret")
        }
    };
    if !shape_ok {
        record(400);
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "wrong parameters",
        );
    }
    if let Err(why) = s.signer.verify(&assertion) {
        record_why(status.as_u16(), &why);
        return refuse(status, error, &why);
    }
    if !s.accepted.lock().unwrap().contains(&assertion) {
        record_why(status.as_u16(), "not accepted now");
        return refuse(status, error, "assertion no longer accepted");
    }
    if grant_type == "refresh_token" {
        let rt = field("refresh_token");
        if !s.refresh_tokens.lock().unwrap().remove(&rt) {
            record(400);
            return refuse(StatusCode::BAD_REQUEST, "invalid_grant", "refresh token");
        }
    } else if s.mode == AssertionMode::JwtBearer && field("scope") != s.scope {
        record(400);
        return refuse(StatusCode::BAD_REQUEST, "invalid_scope", "scope");
    }
    let n = s.counter.fetch_add(1, Ordering::SeqCst) + 1;
    let access = format!("wi-at-{n}-{}", super::rand_hex());
    let mut answer =
        json!({"access_token": access, "token_type": "Bearer", "expires_in": s.lifetime_s});
    let mut issued = vec![access];
    if grant_type == "refresh_token" {
        let rt = format!("wi-rt-{n}-{}", super::rand_hex());
        s.refresh_tokens.lock().unwrap().insert(rt.clone());
        answer["refresh_token"] = json!(rt);
        issued.push(rt);
    }
    s.issued.lock().unwrap().extend(issued);
    record(200);
    (StatusCode::OK, Json(answer)).into_response()
}

/// A service-account key made by the test: the JSON key file Google would hand out, and the
/// public half the fake Google verifies with.
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key_id: String,
    pub private_key_pem: String,
    pub public: jsonwebtoken::DecodingKey,
}

/// 2048-bit RSA keys are slow to make in a debug build: each test binary makes two, once.
fn rsa_keys() -> &'static [(String, jsonwebtoken::DecodingKey); 2] {
    static KEYS: OnceLock<[(String, jsonwebtoken::DecodingKey); 2]> = OnceLock::new();
    KEYS.get_or_init(|| {
        let make = || {
            use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
            let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
            let public = key
                .to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap();
            (
                pem,
                jsonwebtoken::DecodingKey::from_rsa_pem(public.as_bytes()).unwrap(),
            )
        };
        [make(), make()]
    })
}

impl ServiceAccount {
    /// Key `which` (0 or 1) of this test binary, under a fresh key id.
    pub fn new(which: usize) -> Self {
        let (pem, public) = &rsa_keys()[which];
        ServiceAccount {
            client_email: format!("reader-{which}@shop-prod.iam.gserviceaccount.com"),
            private_key_id: format!("{which}{}", super::rand_hex()),
            private_key_pem: pem.clone(),
            public: public.clone(),
        }
    }

    /// The JSON key file, as `gcloud iam service-accounts keys create` writes it.
    pub fn key_json(&self, token_uri: &str) -> String {
        serde_json::to_string_pretty(&json!({
            "type": "service_account",
            "project_id": "shop-prod",
            "private_key_id": self.private_key_id,
            "private_key": self.private_key_pem,
            "client_email": self.client_email,
            "client_id": "104242424242424242424",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "universe_domain": "googleapis.com",
        }))
        .unwrap()
    }

    /// The base64 body of the PEM, for leak scans (a log would not keep the PEM's line breaks).
    pub fn pem_lines(&self) -> Vec<String> {
        self.private_key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(String::from)
            .collect()
    }
}

#[derive(Clone, Debug)]
pub struct GoogleCall {
    pub assertion: String,
    pub kid: Option<String>,
    pub claims: Value,
    pub status: u16,
    pub reason: String,
}

pub struct GoogleState {
    /// The service account Google knows now, with the audience and scope it expects.
    account: Mutex<(String, String, jsonwebtoken::DecodingKey)>,
    audience: Mutex<String>,
    scope: String,
    subject: Option<String>,
    lifetime_s: u64,
    calls: Mutex<Vec<GoogleCall>>,
    issued: Mutex<Vec<String>>,
}

#[derive(Clone)]
pub struct FakeGoogle {
    pub addr: SocketAddr,
    pub state: Arc<GoogleState>,
}

impl FakeGoogle {
    pub async fn start(
        account: &ServiceAccount,
        scope: &str,
        subject: Option<&str>,
        lifetime_s: u64,
    ) -> Self {
        let state = Arc::new(GoogleState {
            account: Mutex::new((
                account.client_email.clone(),
                account.private_key_id.clone(),
                account.public.clone(),
            )),
            audience: Mutex::new(String::new()),
            scope: scope.into(),
            subject: subject.map(String::from),
            lifetime_s,
            calls: Mutex::new(Vec::new()),
            issued: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .route("/token", post(google_endpoint))
            .with_state(state.clone());
        let addr = serve(router).await;
        *state.audience.lock().unwrap() = format!("http://{addr}/token");
        FakeGoogle { addr, state }
    }

    pub fn token_uri(&self) -> String {
        format!("http://{}/token", self.addr)
    }
    /// Google now knows only `account` (the old key was deleted).
    pub fn trust_only(&self, account: &ServiceAccount) {
        *self.state.account.lock().unwrap() = (
            account.client_email.clone(),
            account.private_key_id.clone(),
            account.public.clone(),
        );
    }
    pub fn calls(&self) -> Vec<GoogleCall> {
        self.state.calls.lock().unwrap().clone()
    }
    pub fn issued(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }
}

/// Checks the assertion as Google does: RS256 by the registered key, `kid`, `iss`, `aud`,
/// `scope`, `sub`, and an `iat`/`exp` pair at most an hour apart around now.
fn verify_google(s: &GoogleState, assertion: &str) -> Result<(Option<String>, Value), String> {
    let header = jsonwebtoken::decode_header(assertion).map_err(|e| format!("header: {e}"))?;
    let (email, kid, public) = s.account.lock().unwrap().clone();
    if header.alg != jsonwebtoken::Algorithm::RS256 {
        return Err(format!("alg {:?}", header.alg));
    }
    if header.kid.as_deref() != Some(kid.as_str()) {
        return Err(format!("kid {:?}", header.kid));
    }
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.leeway = 0;
    v.set_audience(&[s.audience.lock().unwrap().clone()]);
    v.set_issuer(&[email]);
    v.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    let data = jsonwebtoken::decode::<Value>(assertion, &public, &v)
        .map_err(|e| format!("signature or claims: {e}"))?;
    let c = data.claims;
    let (iat, exp) = (
        c["iat"].as_u64().unwrap_or(0),
        c["exp"].as_u64().unwrap_or(0),
    );
    if iat.abs_diff(now()) > 60 || exp != iat + 3600 {
        return Err(format!("iat {iat} exp {exp}"));
    }
    if c["scope"].as_str() != Some(s.scope.as_str()) {
        return Err(format!("scope {}", c["scope"]));
    }
    if c.get("sub").and_then(Value::as_str) != s.subject.as_deref() {
        return Err(format!("sub {:?}", c.get("sub")));
    }
    Ok((header.kid, c))
}

async fn google_endpoint(State(s): State<Arc<GoogleState>>, body: String) -> Response {
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let assertion = form.get("assertion").cloned().unwrap_or_default();
    let outcome = if form.get("grant_type").map(String::as_str) != Some(JWT_BEARER_GRANT) {
        Err("grant_type".to_string())
    } else if form.len() != 2 {
        Err("unexpected parameters".to_string())
    } else {
        verify_google(&s, &assertion)
    };
    let record = |status: u16, kid: Option<String>, claims: Value, reason: String| {
        s.calls.lock().unwrap().push(GoogleCall {
            assertion: assertion.clone(),
            kid,
            claims,
            status,
            reason,
        })
    };
    match outcome {
        Err(reason) => {
            record(400, None, Value::Null, reason);
            // What Google answers for a bad signature or an unknown key.
            refuse(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "Invalid JWT Signature.",
            )
        }
        Ok((kid, claims)) => {
            record(200, kid, claims, String::new());
            let token = format!("ya29.fake-{}", super::rand_hex());
            s.issued.lock().unwrap().push(token.clone());
            Json(json!({"access_token": token, "expires_in": s.lifetime_s, "token_type": "Bearer"}))
                .into_response()
        }
    }
}
