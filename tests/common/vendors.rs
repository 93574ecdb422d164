//! Fake providers for the vendor dialects, written from each vendor's published rules (see
//! shared/DIALECTS.md): each checks signatures, encryption, client authentication and where every
//! parameter travels, and rejects anything else. They record every call in a transcript whose
//! token values can be masked, so two dialects can be shown to send the same requests.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::rand_hex;

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// An unsigned JWT-shaped token with `exp`, as vendors issue them.
pub fn jwt(exp: u64, tag: &str) -> String {
    let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.{}",
        enc(r#"{"alg":"HS256","typ":"JWT"}"#),
        enc(&format!(
            r#"{{"sub":"{tag}","exp":{exp},"jti":"{}"}}"#,
            rand_hex()
        )),
        rand_hex()
    )
}

/// RFC 3339 with a +08:00 offset and microseconds, as Cloudreve writes it.
pub fn rfc3339_plus8(t: u64) -> String {
    let t = t + 8 * 3600;
    let (days, secs) = (t / 86400, t % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.456762+08:00",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[derive(Clone, Debug)]
pub struct VCall {
    pub kind: &'static str,
    /// "ok" or the error code answered.
    pub outcome: String,
    pub at: Instant,
}

/// State shared by every fake vendor.
#[derive(Default)]
pub struct VState {
    pub lifetime: Mutex<u64>,
    /// The one refresh token accepted now (rotation revokes the previous one).
    pub valid_refresh: Mutex<Option<String>>,
    /// Refresh tokens presented after they were revoked.
    pub rejected: Mutex<Vec<String>>,
    pub calls: Mutex<Vec<VCall>>,
    /// Every request as the provider saw it: method, path, sorted query, relevant headers, body.
    pub transcript: Mutex<Vec<String>>,
    /// Every token and secret issued or seen, in order.
    pub issued: Mutex<Vec<String>>,
    /// Answer every login / refresh with this code instead.
    pub fail_login: Mutex<Option<String>>,
    pub fail_refresh: Mutex<Option<String>>,
    /// Access tokens issued and when they were issued (quecauth's 30-minute rule, EnOS get).
    pub access: Mutex<Vec<(String, Instant, u64)>>,
    /// Timestamps / randoms already used (replays are refused).
    pub used_nonces: Mutex<Vec<String>>,
    /// A reused-token window (quecauth: refresh within it returns the same token).
    pub same_token_window: Mutex<Duration>,
    pub n: AtomicUsize,
}

#[derive(Clone)]
pub struct Vendor {
    pub addr: SocketAddr,
    pub state: Arc<VState>,
}

impl Vendor {
    async fn serve(router: Router, state: Arc<VState>) -> Vendor {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Vendor { addr, state }
    }

    fn new_state(lifetime: u64) -> Arc<VState> {
        let s = VState::default();
        *s.lifetime.lock().unwrap() = lifetime;
        Arc::new(s)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn calls(&self) -> Vec<VCall> {
        self.state.calls.lock().unwrap().clone()
    }
    pub fn count(&self, kind: &str) -> usize {
        self.calls().iter().filter(|c| c.kind == kind).count()
    }
    pub fn issued(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }
    pub fn valid_refresh(&self) -> Option<String> {
        self.state.valid_refresh.lock().unwrap().clone()
    }
    pub fn revoke_refresh(&self) {
        *self.state.valid_refresh.lock().unwrap() = None;
    }
    pub fn rejected(&self) -> Vec<String> {
        self.state.rejected.lock().unwrap().clone()
    }
    pub fn fail_login(&self, code: Option<&str>) {
        *self.state.fail_login.lock().unwrap() = code.map(String::from);
    }
    pub fn fail_refresh(&self, code: Option<&str>) {
        *self.state.fail_refresh.lock().unwrap() = code.map(String::from);
    }
    pub fn set_lifetime(&self, s: u64) {
        *self.state.lifetime.lock().unwrap() = s;
    }
    /// Forgets every access token issued (the gateway dropped them).
    pub fn forget_access(&self) {
        self.state.access.lock().unwrap().clear();
    }
    /// Accepts `token` as the valid refresh token (an operator minted a new one).
    pub fn accept_refresh(&self, token: &str) {
        *self.state.valid_refresh.lock().unwrap() = Some(token.to_string());
        self.state.issue(token);
    }
    pub fn set_same_token_window(&self, d: Duration) {
        *self.state.same_token_window.lock().unwrap() = d;
    }
    /// The transcript with every issued token replaced by `tok#i` (its issue order) and every
    /// value in `volatile` masked, so runs can be compared.
    pub fn masked_transcript(&self, volatile: &[&str]) -> Vec<String> {
        let issued = self.issued();
        self.state
            .transcript
            .lock()
            .unwrap()
            .iter()
            .map(|line| {
                let mut line = line.clone();
                for (i, t) in issued.iter().enumerate().rev() {
                    line = line.replace(t.as_str(), &format!("tok#{i}"));
                }
                for v in volatile {
                    line = line.replace(v, "<volatile>");
                }
                line
            })
            .collect()
    }
}

impl VState {
    fn record(&self, kind: &'static str, outcome: impl Into<String>) {
        self.calls.lock().unwrap().push(VCall {
            kind,
            outcome: outcome.into(),
            at: Instant::now(),
        });
    }
    fn note(&self, line: String) {
        self.transcript.lock().unwrap().push(line);
    }
    fn issue(&self, v: &str) {
        self.issued.lock().unwrap().push(v.to_string());
    }
    fn next(&self) -> usize {
        self.n.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn lifetime(&self) -> u64 {
        *self.lifetime.lock().unwrap()
    }
    /// Checks `presented` against the valid refresh token; on success rotates it.
    fn take_refresh(&self, presented: &str) -> Option<String> {
        let mut valid = self.valid_refresh.lock().unwrap();
        if valid.as_deref() != Some(presented) {
            self.rejected.lock().unwrap().push(presented.to_string());
            return None;
        }
        let next = format!("rt-{}-{}", self.next(), rand_hex());
        *valid = Some(next.clone());
        self.issue(&next);
        Some(next)
    }
    fn fresh_nonce(&self, v: &str) -> bool {
        let mut used = self.used_nonces.lock().unwrap();
        if used.iter().any(|u| u == v) {
            return false;
        }
        used.push(v.to_string());
        true
    }
}

fn query_map(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn describe(method: &Method, uri: &Uri, headers: &HeaderMap, body: &str) -> String {
    let body = match serde_json::from_str::<Value>(body) {
        Ok(v) => v.to_string(),
        Err(_) => body.to_string(),
    };
    format!(
        "{method} {} query={:?} authorization={:?} content-type={:?} body={body}",
        uri.path(),
        query_map(uri),
        header(headers, "authorization"),
        header(headers, "content-type"),
    )
}

fn reject(code: StatusCode, body: Value) -> Response {
    (code, Json(body)).into_response()
}

// ---------------------------------------------------------------------------------------------
// 000 Quectel end-user API

pub const QE_EMAIL: &str = "ops@example.com";
pub const QE_PASSWORD: &str = "china1234-pw";
pub const QE_DOMAIN: &str = "C.DM.5.1";
pub const QE_DOMAIN_SECRET: &str = "uds-secret-9f8e7d";

fn quectel_decrypt(pwd_b64: &str, random: &str) -> Option<String> {
    use aes::cipher::{BlockDecryptMut, KeyIvInit, block_padding::Pkcs7};
    use md5::Md5;
    let digest: String = Md5::digest(random.as_bytes())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    let key = digest[8..24].as_bytes().to_vec();
    let iv = [&key[8..16], &key[0..8]].concat();
    let mut data = base64::engine::general_purpose::STANDARD
        .decode(pwd_b64)
        .ok()?;
    let plain = cbc::Decryptor::<aes::Aes128>::new_from_slices(&key, &iv)
        .ok()?
        .decrypt_padded_mut::<Pkcs7>(&mut data)
        .ok()?;
    String::from_utf8(plain.to_vec()).ok()
}

fn quectel_pair(s: &VState, refresh: String) -> Value {
    let n = s.next();
    let access = format!("qe-at-{n}-{}", rand_hex());
    s.issue(&access);
    let exp = now_s() + s.lifetime();
    json!({"code": 200, "msg": "", "extMsg": "", "data": {
        "accessToken": {"token": access, "expirationTime": exp},
        "refreshToken": {"token": refresh, "expirationTime": now_s() + 30 * 86400},
    }})
}

async fn quectel_login(State(s): State<Arc<VState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body =
        String::from_utf8(axum::body::to_bytes(body, 1 << 20).await.unwrap().to_vec()).unwrap();
    s.note(describe(
        &parts.method,
        &parts.uri,
        &parts.headers,
        "<form>",
    ));
    let code = |c: i64| {
        s.record("login", c.to_string());
        Json(json!({"code": c, "msg": "error"})).into_response()
    };
    if let Some(c) = s.fail_login.lock().unwrap().clone() {
        return code(c.parse().unwrap());
    }
    if header(&parts.headers, "content-type") != "application/x-www-form-urlencoded"
        || parts.uri.query().is_some()
    {
        return code(4000);
    }
    let form: BTreeMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let keys: Vec<&str> = form.keys().map(|k| k.as_str()).collect();
    if keys != ["email", "pwd", "random", "signature", "userDomain"] {
        return code(4000);
    }
    let random = &form["random"];
    if random.len() != 16
        || !random.chars().all(|c| c.is_ascii_alphanumeric())
        || !s.fresh_nonce(random)
    {
        return code(5420);
    }
    let want = sha256_hex(
        format!("{}{}{random}{QE_DOMAIN_SECRET}", form["email"], form["pwd"]).as_bytes(),
    );
    if form["signature"] != want || form["userDomain"] != QE_DOMAIN {
        return code(5420);
    }
    if form["email"] != QE_EMAIL
        || quectel_decrypt(&form["pwd"], random).as_deref() != Some(QE_PASSWORD)
    {
        return code(5583);
    }
    s.issue(&form["pwd"]);
    s.issue(&form["signature"]);
    let refresh = format!("rt-{}-{}", s.next(), rand_hex());
    s.issue(&refresh);
    *s.valid_refresh.lock().unwrap() = Some(refresh.clone());
    s.record("login", "ok");
    Json(quectel_pair(&s, refresh)).into_response()
}

async fn quectel_refresh(State(s): State<Arc<VState>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    s.note(describe(&parts.method, &parts.uri, &parts.headers, ""));
    let q = query_map(&parts.uri);
    if let Some(c) = s.fail_refresh.lock().unwrap().clone() {
        s.record("refresh", c.clone());
        return Json(json!({"code": c.parse::<i64>().unwrap(), "msg": "x"})).into_response();
    }
    let Some(presented) = q.get("refreshToken").filter(|_| q.len() == 1) else {
        s.record("refresh", "4000");
        return Json(json!({"code": 4000})).into_response();
    };
    match s.take_refresh(presented) {
        Some(next) => {
            s.record("refresh", "ok");
            Json(quectel_pair(&s, next)).into_response()
        }
        None => {
            s.record("refresh", "5032");
            Json(json!({"code": 5032, "msg": "token verification failed"})).into_response()
        }
    }
}

pub async fn quectel_enduser(lifetime: u64) -> Vendor {
    let state = Vendor::new_state(lifetime);
    let router = Router::new()
        .route("/v2/enduser/enduserapi/emailPwdLogin", post(quectel_login))
        .route("/v2/enduser/enduserapi/refreshToken", put(quectel_refresh))
        .with_state(state.clone());
    Vendor::serve(router, state).await
}

// ---------------------------------------------------------------------------------------------
// 001 EnOS APIM

pub const ENOS_KEY: &str = "5acb82e7-app-key";
pub const ENOS_SECRET: &str = "enos-app-secret-4c1d";

async fn enos_token(State(s): State<Arc<VState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let refresh = parts.uri.path().ends_with("/refresh");
    let kind = if refresh { "refresh" } else { "login" };
    s.note(describe(
        &parts.method,
        &parts.uri,
        &parts.headers,
        "<json>",
    ));
    let status = |c: i64| {
        s.record(kind, c.to_string());
        Json(json!({"status": c, "msg": "error", "business": "apim-token-service"})).into_response()
    };
    let forced = if refresh {
        s.fail_refresh.lock().unwrap().clone()
    } else {
        s.fail_login.lock().unwrap().clone()
    };
    if let Some(c) = forced {
        return status(c.parse().unwrap());
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return status(400);
    };
    if header(&parts.headers, "content-type") != "application/json" {
        return status(400);
    }
    let (Some(app), Some(enc), Some(ts)) = (
        v["appKey"].as_str(),
        v["encryption"].as_str(),
        v["timestamp"].as_u64(),
    ) else {
        return status(400);
    };
    if app != ENOS_KEY {
        return status(1002);
    }
    if enc != sha256_hex(format!("{app}{ts}{ENOS_SECRET}").as_bytes()) {
        return status(1003);
    }
    if (ts as i128 - now_ms() as i128).abs() > 600_000 || !s.fresh_nonce(&ts.to_string()) {
        return status(1001);
    }
    let lifetime = s.lifetime();
    let mut access = s.access.lock().unwrap();
    let live = |a: &(String, Instant, u64)| a.1.elapsed() < Duration::from_secs(a.2);
    if refresh {
        let presented = v["accessToken"].as_str().unwrap_or("");
        if !access.iter().any(|a| a.0 == presented && live(a)) {
            drop(access);
            return status(1203);
        }
    } else if let Some(current) = access.last().filter(|a| live(a)).cloned() {
        // `get` returns the same token while it is valid.
        drop(access);
        s.record(kind, "ok");
        let left = Duration::from_secs(current.2)
            .saturating_sub(current.1.elapsed())
            .as_secs();
        return Json(json!({"status": 0, "msg": "SUCCESS", "data": {"accessToken": current.0, "expire": left}})).into_response();
    }
    let token = format!("enos-at-{}-{}", s.next(), rand_hex());
    access.push((token.clone(), Instant::now(), lifetime));
    drop(access);
    s.issue(&token);
    s.record(kind, "ok");
    Json(json!({"status": 0, "msg": "SUCCESS", "business": "apim-token-service", "data": {"accessToken": token, "expire": lifetime}})).into_response()
}

pub async fn enos(lifetime: u64) -> Vendor {
    let state = Vendor::new_state(lifetime);
    let router = Router::new()
        .route("/apim-token-service/v2.0/token/get", post(enos_token))
        .route("/apim-token-service/v2.0/token/refresh", post(enos_token))
        .with_state(state.clone());
    Vendor::serve(router, state).await
}

/// What the EnOS fake upstream saw of one request.
#[derive(Clone, Debug)]
pub struct SignedSeen {
    pub method: String,
    pub path_and_query: String,
    pub body_len: usize,
    pub signature_ok: bool,
    pub token: String,
    pub content_length: Option<String>,
    pub transfer_encoding: Option<String>,
    pub authorization: Option<String>,
}

/// An API behind the EnOS gateway: recomputes `apim-signature` over the query (sorted by name,
/// values decoded, `k1v1k2v2…`) and the raw body, and answers 401 when it does not match.
pub async fn enos_upstream(vendor: Vendor) -> (SocketAddr, Arc<Mutex<Vec<SignedSeen>>>) {
    let seen: Arc<Mutex<Vec<SignedSeen>>> = Arc::default();
    let s2 = seen.clone();
    let handler = move |req: Request| {
        let seen = s2.clone();
        let vendor = vendor.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, 64 << 20).await.unwrap();
            let token = header(&parts.headers, "apim-accesstoken");
            let ts = header(&parts.headers, "apim-timestamp");
            let mut pairs: Vec<(String, String)> = parts
                .uri
                .query()
                .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
                .unwrap_or_default();
            pairs.sort();
            let mut data: Vec<u8> = pairs
                .iter()
                .flat_map(|(k, v)| [k.as_bytes(), v.as_bytes()].concat())
                .collect();
            data.extend_from_slice(&body);
            let mut signed = token.as_bytes().to_vec();
            signed.extend_from_slice(&data);
            signed.extend_from_slice(ts.as_bytes());
            signed.extend_from_slice(ENOS_SECRET.as_bytes());
            let ts_ok = ts
                .parse::<u128>()
                .is_ok_and(|t| (t as i128 - now_ms() as i128).abs() < 600_000);
            let token_ok = vendor
                .state
                .access
                .lock()
                .unwrap()
                .iter()
                .any(|a| a.0 == token);
            let signature_ok = ts_ok
                && token_ok
                && header(&parts.headers, "apim-signature") == sha256_hex(&signed);
            let h = |n: &str| {
                parts
                    .headers
                    .get(n)
                    .map(|v| v.to_str().unwrap().to_string())
            };
            seen.lock().unwrap().push(SignedSeen {
                method: parts.method.to_string(),
                path_and_query: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                body_len: body.len(),
                signature_ok,
                token: token.clone(),
                content_length: h("content-length"),
                transfer_encoding: h("transfer-encoding"),
                authorization: h("authorization"),
            });
            let status = if signature_ok {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            };
            (status, Json(json!({"signature_ok": signature_ok, "body_bytes": body.len(), "body_sha256": sha256_hex(&body)}))).into_response()
        }
    };
    let router = Router::new().fallback(any(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (addr, seen)
}

// ---------------------------------------------------------------------------------------------
// 002 Quectel quecauth AccessKey

pub const QA_KEY: &str = "AK-quec-7731";
pub const QA_SECRET: &str = "SK-quec-secret-55aa";

async fn quecauth_login(State(s): State<Arc<VState>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    s.note(describe(&parts.method, &parts.uri, &parts.headers, ""));
    let code = |c: i64| {
        s.record("login", c.to_string());
        Json(json!({"code": c, "msg": "error"})).into_response()
    };
    if let Some(c) = s.fail_login.lock().unwrap().clone() {
        return code(c.parse().unwrap());
    }
    let q = query_map(&parts.uri);
    if q.get("grant_type").map(String::as_str) != Some("password") {
        return code(4001);
    }
    let (Some(user), Some(pw)) = (q.get("username"), q.get("password")) else {
        return code(4001);
    };
    let fields: HashMap<String, String> = form_urlencoded::parse(user.as_bytes())
        .into_owned()
        .collect();
    let ok_fields = fields.get("ver").map(String::as_str) == Some("1")
        && fields.get("auth_mode").map(String::as_str) == Some("accessKey")
        && fields.get("sign_method").map(String::as_str) == Some("sha256")
        && fields.get("access_key").map(String::as_str) == Some(QA_KEY)
        && fields
            .get("timestamp")
            .and_then(|t| t.parse::<u128>().ok())
            .is_some_and(|t| (t as i128 - now_ms() as i128).abs() < 600_000);
    if !ok_fields || *pw != sha256_hex(format!("{user}{QA_SECRET}").as_bytes()) {
        return code(4003);
    }
    s.issue(pw);
    s.record("login", "ok");
    Json(quecauth_issue(&s)).into_response()
}

fn quecauth_issue(s: &VState) -> Value {
    let lifetime = s.lifetime();
    let token = format!(
        "QJWT {}",
        jwt(now_s() + lifetime, &format!("q{}", s.next()))
    );
    s.issue(&token);
    s.issue(token.trim_start_matches("QJWT "));
    s.access
        .lock()
        .unwrap()
        .push((token.clone(), Instant::now(), lifetime));
    // The docs disagree on the lifetime; the fake says 86400 while the JWT says `lifetime`.
    json!({"code": 200, "msg": "OK", "access_token": token, "token_type": "jwt", "expires_in": 86400})
}

async fn quecauth_refresh(State(s): State<Arc<VState>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    s.note(describe(&parts.method, &parts.uri, &parts.headers, ""));
    let q = query_map(&parts.uri);
    if let Some(c) = s.fail_refresh.lock().unwrap().clone() {
        s.record("refresh", c.clone());
        return Json(json!({"code": c.parse::<i64>().unwrap(), "msg": "disabled"})).into_response();
    }
    let presented = q.get("refresh_token").cloned().unwrap_or_default();
    if q.get("grant_type").map(String::as_str) != Some("refresh_token") || !q.contains_key("scope")
    {
        s.record("refresh", "4001");
        return Json(json!({"code": 4001})).into_response();
    }
    let access = s.access.lock().unwrap().clone();
    let Some(current) = access.iter().rev().find(|a| a.0 == presented) else {
        s.record("refresh", "4002");
        return Json(json!({"code": 4002, "msg": "invalid token"})).into_response();
    };
    let window = *s.same_token_window.lock().unwrap();
    if current.1.elapsed() < window {
        s.record("refresh", "same");
        return Json(json!({"code": 200, "msg": "OK", "access_token": current.0, "token_type": "jwt", "expire_in": "86400"})).into_response();
    }
    s.record("refresh", "ok");
    Json(quecauth_issue(&s)).into_response()
}

pub async fn quecauth(lifetime: u64) -> Vendor {
    let state = Vendor::new_state(lifetime);
    let router = Router::new()
        .route(
            "/v2/quecauth/accessKeyAuthrize/accessKeyLogin",
            get(quecauth_login),
        )
        .route(
            "/v2/quecauth/accessKeyAuthrize/refreshToken",
            get(quecauth_refresh),
        )
        .with_state(state.clone());
    Vendor::serve(router, state).await
}

// ---------------------------------------------------------------------------------------------
// 003 BabelBird

pub const BB_CLIENT: &str = "tokenward-client";
pub const BB_SECRET: &str = "bb-client-secret-e3f1";

async fn babelbird_refresh(State(s): State<Arc<VState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    s.note(describe(
        &parts.method,
        &parts.uri,
        &parts.headers,
        &String::from_utf8_lossy(&body),
    ));
    let err = |status: StatusCode, e: &str| {
        s.record("refresh", e.to_string());
        reject(status, json!({"error": e, "error_description": "see docs"}))
    };
    if let Some(c) = s.fail_refresh.lock().unwrap().clone() {
        return err(StatusCode::BAD_REQUEST, &c);
    }
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{BB_CLIENT}:{BB_SECRET}"));
    if header(&parts.headers, "authorization") != format!("Basic {basic}") {
        return err(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let q = query_map(&parts.uri);
    // Parameters travel in the query, never in a body.
    if !body.is_empty()
        || q.get("grant_type").map(String::as_str) != Some("refresh_token")
        || q.len() != 2
    {
        return err(StatusCode::BAD_REQUEST, "invalid_request");
    }
    let Some(next) = s.take_refresh(q.get("refresh_token").map(String::as_str).unwrap_or(""))
    else {
        return err(StatusCode::BAD_REQUEST, "invalid_grant");
    };
    let access = format!("bb-at-{}-{}", s.next(), rand_hex());
    s.issue(&access);
    s.record("refresh", "ok");
    Json(json!({"access_token": access, "refresh_token": next, "expires_in": s.lifetime()}))
        .into_response()
}

pub async fn babelbird(lifetime: u64, bootstrap: &str) -> Vendor {
    let state = Vendor::new_state(lifetime);
    *state.valid_refresh.lock().unwrap() = Some(bootstrap.to_string());
    state.issue(bootstrap);
    let router = Router::new()
        .route("/api/refreshToken.do", post(babelbird_refresh))
        .with_state(state.clone());
    Vendor::serve(router, state).await
}

// ---------------------------------------------------------------------------------------------
// 004 Cloudreve v4

pub const CR_EMAIL: &str = "tokenward@example.com";
pub const CR_PASSWORD: &str = "cloudreve-pw-81b2";

fn cloudreve_pair(s: &VState, refresh: String) -> Value {
    let lifetime = s.lifetime();
    let exp = now_s() + lifetime;
    let access = jwt(exp, &format!("cr{}", s.next()));
    s.issue(&access);
    json!({
        "access_token": access,
        "access_expires": rfc3339_plus8(exp),
        "refresh_token": refresh,
        "refresh_expires": rfc3339_plus8(now_s() + 14 * 86400),
    })
}

async fn cloudreve(State(s): State<Arc<VState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let refresh = parts.uri.path().ends_with("/refresh");
    let kind = if refresh { "refresh" } else { "login" };
    s.note(describe(
        &parts.method,
        &parts.uri,
        &parts.headers,
        &String::from_utf8_lossy(&body),
    ));
    // Errors come with HTTP 200 and a code.
    let code = |c: i64| {
        s.record(kind, c.to_string());
        Json(json!({"code": c, "msg": "error", "data": null})).into_response()
    };
    let forced = if refresh {
        s.fail_refresh.lock().unwrap().clone()
    } else {
        s.fail_login.lock().unwrap().clone()
    };
    if let Some(c) = forced {
        return code(c.parse().unwrap());
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return code(40001);
    };
    if header(&parts.headers, "content-type") != "application/json" || parts.uri.query().is_some() {
        return code(40001);
    }
    if refresh {
        let presented = v["refresh_token"].as_str().unwrap_or("");
        let Some(next) = s.take_refresh(presented) else {
            return code(40020);
        };
        s.record(kind, "ok");
        return Json(json!({"code": 0, "msg": "", "data": cloudreve_pair(&s, next)}))
            .into_response();
    }
    if v["email"] != CR_EMAIL || v["password"] != CR_PASSWORD {
        return code(40080);
    }
    let rt = jwt(now_s() + 14 * 86400, &format!("crr{}", s.next()));
    s.issue(&rt);
    *s.valid_refresh.lock().unwrap() = Some(rt.clone());
    s.record(kind, "ok");
    Json(json!({"code": 0, "msg": "", "data": {"user": {"email": CR_EMAIL}, "token": cloudreve_pair(&s, rt)}})).into_response()
}

pub async fn cloudreve_provider(lifetime: u64) -> Vendor {
    let state = Vendor::new_state(lifetime);
    let router = Router::new()
        .route("/api/v4/session/token", post(cloudreve))
        .route("/api/v4/session/token/refresh", post(cloudreve))
        .with_state(state.clone());
    Vendor::serve(router, state).await
}
