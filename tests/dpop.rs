//! DPoP (RFC 9449): the real binary against a fake token endpoint and a fake upstream that check
//! every proof — its ES256 signature with the header's `jwk`, `typ`, `alg`, `htm`, `htu`, the
//! `iat` window, `jti` replay, `ath`, and the key's thumbprint against the `cnf.jkt` the fake
//! token endpoint mints into each token — and that each demand a nonce once.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::*;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The fake token endpoint signs its tokens with this (HS256); only the fakes know it.
const MINT_KEY: &[u8] = b"fake-authorization-server-mint-key";
/// How far a proof's `iat` may be from the fakes' clock.
const IAT_WINDOW_S: u64 = 30;

/// What both fakes share: every `jti` either has seen (a proof is never accepted twice) and
/// every proof they received (for the leak scan).
#[derive(Default)]
struct Seen {
    jtis: Mutex<HashSet<String>>,
    proofs: Mutex<Vec<String>>,
    /// Reasons proofs were refused, for the test's failure messages.
    refusals: Mutex<Vec<String>>,
}

/// What a server expects of one proof.
struct Expect<'a> {
    htm: &'a str,
    htu: &'a str,
    /// The access token the request presents: `ath` must be its hash (upstream requests only).
    token: Option<&'a str>,
}

/// The checks of RFC 9449 §4.3, as a server does them with only the request in hand. Returns
/// the JWK thumbprint of the key and the nonce the proof carries.
fn verify_proof(
    proof: &str,
    want: &Expect<'_>,
    seen: &Seen,
) -> Result<(String, Option<String>), String> {
    let parts: Vec<&str> = proof.split('.').collect();
    if parts.len() != 3 {
        return Err("not a JWS".into());
    }
    let json = |p: &str| -> Result<Value, String> {
        let bytes = B64.decode(p).map_err(|_| "not base64url")?;
        serde_json::from_slice(&bytes).map_err(|_| "not JSON".to_string())
    };
    let header = json(parts[0])?;
    let claims = json(parts[1])?;
    if header["typ"] != "dpop+jwt" {
        return Err(format!("typ {}", header["typ"]));
    }
    if header["alg"] != "ES256" {
        return Err(format!("alg {}", header["alg"]));
    }
    let jwk = &header["jwk"];
    if jwk["kty"] != "EC" || jwk["crv"] != "P-256" || jwk.get("d").is_some() {
        return Err("jwk is not a public P-256 key".into());
    }
    let coordinate = |c: &str| -> Result<Vec<u8>, String> {
        let b = B64
            .decode(jwk[c].as_str().ok_or("no coordinate")?)
            .map_err(|_| "bad coordinate")?;
        if b.len() != 32 {
            return Err("coordinate length".into());
        }
        Ok(b)
    };
    let (x, y) = (coordinate("x")?, coordinate("y")?);
    let point = p256::EncodedPoint::from_affine_coordinates(
        x.as_slice().into(),
        y.as_slice().into(),
        false,
    );
    let key = VerifyingKey::from_encoded_point(&point).map_err(|_| "jwk not on the curve")?;
    let signature = Signature::from_slice(&B64.decode(parts[2]).map_err(|_| "bad signature")?)
        .map_err(|_| "bad signature")?;
    key.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
        .map_err(|_| "signature does not verify with the header's jwk")?;
    if claims["htm"] != want.htm {
        return Err(format!("htm {} != {}", claims["htm"], want.htm));
    }
    if claims["htu"] != want.htu {
        return Err(format!("htu {} != {}", claims["htu"], want.htu));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    match claims["iat"].as_u64() {
        Some(iat) if iat.abs_diff(now) <= IAT_WINDOW_S => {}
        _ => return Err(format!("iat {} outside the window", claims["iat"])),
    }
    match want.token {
        Some(token) => {
            let ath = B64.encode(Sha256::digest(token.as_bytes()));
            if claims["ath"] != ath.as_str() {
                return Err("ath is not the token's hash".into());
            }
        }
        None if claims.get("ath").is_some() => return Err("ath on a token request".into()),
        None => {}
    }
    let jti = claims["jti"].as_str().ok_or("no jti")?;
    if jti.len() < 16 || !seen.jtis.lock().unwrap().insert(jti.to_string()) {
        return Err("jti replayed (or too short)".into());
    }
    let thumbprint = B64.encode(Sha256::digest(
        format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            jwk["x"].as_str().unwrap(),
            jwk["y"].as_str().unwrap()
        )
        .as_bytes(),
    ));
    Ok((thumbprint, claims["nonce"].as_str().map(String::from)))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

// ---- the fake token endpoint ---------------------------------------------------------------

#[derive(Default)]
struct AsState {
    url: Mutex<String>,
    /// The nonce proofs must carry; a new one comes with every token it issues.
    nonce: Mutex<Option<String>>,
    nonce_counter: AtomicUsize,
    /// (status, error) of every call.
    calls: Mutex<Vec<(u16, String)>>,
    minted: Mutex<Vec<String>>,
    /// The `cnf.jkt` of every token minted.
    jkts: Mutex<Vec<String>>,
    lifetime_s: AtomicUsize,
}

#[derive(Clone)]
struct FakeAs {
    addr: std::net::SocketAddr,
    state: Arc<AsState>,
}

impl FakeAs {
    async fn start(seen: Arc<Seen>, lifetime_s: usize) -> Self {
        let state = Arc::new(AsState::default());
        state.lifetime_s.store(lifetime_s, Ordering::SeqCst);
        let router = Router::new()
            .route("/token", post(as_endpoint))
            .with_state((state.clone(), seen));
        let addr = serve(router).await;
        *state.url.lock().unwrap() = format!("http://{addr}/token");
        FakeAs { addr, state }
    }
    fn keys(&self, extra: &str) -> String {
        format!(
            "dialect = \"oauth2\"\ntoken_url = \"http://{}/token\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\nscope = \"orders.read\"\n{extra}\n",
            self.addr
        )
    }
    fn calls(&self) -> Vec<(u16, String)> {
        self.state.calls.lock().unwrap().clone()
    }
    fn issued(&self) -> usize {
        self.calls().iter().filter(|(s, _)| *s == 200).count()
    }
    fn minted(&self) -> Vec<String> {
        self.state.minted.lock().unwrap().clone()
    }
    fn jkts(&self) -> Vec<String> {
        self.state.jkts.lock().unwrap().clone()
    }
}

async fn serve(router: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

fn oauth_error(status: StatusCode, error: &str, nonce: Option<&str>) -> Response {
    let mut r = (status, Json(json!({"error": error}))).into_response();
    if let Some(n) = nonce {
        r.headers_mut().insert("dpop-nonce", n.parse().unwrap());
    }
    r
}

async fn as_endpoint(
    State((s, seen)): State<(Arc<AsState>, Arc<Seen>)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let record = |status: u16, error: &str| {
        s.calls.lock().unwrap().push((status, error.to_string()));
    };
    let basic = B64_STD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    if header(&headers, "authorization") != Some(&format!("Basic {basic}")) {
        record(401, "invalid_client");
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", None);
    }
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let exchange = form.get("grant_type").map(String::as_str)
        == Some("urn:ietf:params:oauth:grant-type:token-exchange")
        && form.get("subject_token").is_some_and(|t| !t.is_empty());
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") && !exchange {
        record(400, "unsupported_grant_type");
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", None);
    }
    let Some(proof) = header(&headers, "dpop") else {
        record(400, "invalid_dpop_proof");
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_dpop_proof", None);
    };
    seen.proofs.lock().unwrap().push(proof.to_string());
    let url = s.url.lock().unwrap().clone();
    let want = Expect {
        htm: "POST",
        htu: &url,
        token: None,
    };
    let (jkt, nonce) = match verify_proof(proof, &want, &seen) {
        Ok(v) => v,
        Err(reason) => {
            seen.refusals
                .lock()
                .unwrap()
                .push(format!("token endpoint: {reason}"));
            record(400, "invalid_dpop_proof");
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_dpop_proof", None);
        }
    };
    // The nonce is demanded from the first request on, and must be the newest one given.
    let expected = s.nonce.lock().unwrap().clone();
    if expected.is_none() || nonce != expected {
        let fresh = expected.unwrap_or_else(|| {
            let n = format!(
                "as-nonce-{}",
                s.nonce_counter.fetch_add(1, Ordering::SeqCst)
            );
            *s.nonce.lock().unwrap() = Some(n.clone());
            n
        });
        record(400, "use_dpop_nonce");
        return oauth_error(StatusCode::BAD_REQUEST, "use_dpop_nonce", Some(&fresh));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let lifetime = s.lifetime_s.load(Ordering::SeqCst) as u64;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": form.get("subject_token").map_or(CLIENT_ID, String::as_str), "iat": now,
                "exp": now + lifetime, "cnf": {"jkt": jkt}, "jti": rand_hex()}),
        &jsonwebtoken::EncodingKey::from_secret(MINT_KEY),
    )
    .unwrap();
    s.minted.lock().unwrap().push(token.clone());
    s.jkts.lock().unwrap().push(jkt);
    // Every answer carries a new nonce: the next request must use the newest one.
    let next = format!(
        "as-nonce-{}",
        s.nonce_counter.fetch_add(1, Ordering::SeqCst)
    );
    *s.nonce.lock().unwrap() = Some(next.clone());
    record(200, "");
    let mut r = (
        StatusCode::OK,
        Json(json!({"access_token": token, "token_type": "DPoP", "expires_in": lifetime})),
    )
        .into_response();
    r.headers_mut().insert("dpop-nonce", next.parse().unwrap());
    r
}

const B64_STD: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

// ---- the fake upstream ---------------------------------------------------------------------

#[derive(Default)]
struct UpState {
    origin: Mutex<String>,
    /// The nonce proofs must carry (the first request has none and is answered with one).
    nonce: Mutex<Option<String>>,
    nonce_counter: AtomicUsize,
    /// Every answer: (method, path, status, what).
    answers: Mutex<Vec<(String, String, u16, String)>>,
    /// Tokens this upstream no longer accepts (revoked before they expire).
    revoked: Mutex<Vec<String>>,
    /// When set, the next request is refused with a new nonce even if it carried the current
    /// one (a server rotating its nonce without telling).
    rotate_next: AtomicBool,
}

#[derive(Clone)]
struct FakeUp {
    addr: std::net::SocketAddr,
    state: Arc<UpState>,
}

impl FakeUp {
    async fn start(seen: Arc<Seen>) -> Self {
        let state = Arc::new(UpState::default());
        let router = Router::new()
            .fallback(any(up_endpoint))
            .with_state((state.clone(), seen));
        let addr = serve(router).await;
        *state.origin.lock().unwrap() = format!("http://{addr}");
        FakeUp { addr, state }
    }
    fn answers(&self) -> Vec<(String, String, u16, String)> {
        self.state.answers.lock().unwrap().clone()
    }
    fn count(&self, status: u16, what: &str) -> usize {
        self.answers()
            .iter()
            .filter(|a| a.2 == status && a.3.contains(what))
            .count()
    }
}

async fn up_endpoint(State((s, seen)): State<(Arc<UpState>, Arc<Seen>)>, req: Request) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let answer = |status: u16, what: &str| {
        s.answers
            .lock()
            .unwrap()
            .push((method.clone(), path.clone(), status, what.to_string()));
    };
    let refuse = |what: &str| {
        seen.refusals
            .lock()
            .unwrap()
            .push(format!("upstream: {what}"));
        answer(401, what);
        let mut r = (StatusCode::UNAUTHORIZED, Json(json!({"error": what}))).into_response();
        r.headers_mut().insert(
            "www-authenticate",
            "DPoP error=\"invalid_token\", algs=\"ES256\""
                .parse()
                .unwrap(),
        );
        r
    };
    let Some(token) = header(&headers, "authorization").and_then(|a| a.strip_prefix("DPoP "))
    else {
        return refuse("no DPoP authorization");
    };
    let token = token.to_string();
    if headers.get_all("authorization").iter().count() != 1 {
        return refuse("more than one authorization");
    }
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_aud = false;
    let Ok(data) = jsonwebtoken::decode::<Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(MINT_KEY),
        &validation,
    ) else {
        return refuse("token not minted by the fake token endpoint");
    };
    if s.revoked.lock().unwrap().contains(&token) {
        return refuse("invalid_token");
    }
    let Some(proof) = header(&headers, "dpop") else {
        return refuse("no DPoP proof");
    };
    seen.proofs.lock().unwrap().push(proof.to_string());
    let htu = format!("{}{path}", s.origin.lock().unwrap());
    let want = Expect {
        htm: &method,
        htu: &htu,
        token: Some(&token),
    };
    let (jkt, nonce) = match verify_proof(proof, &want, &seen) {
        Ok(v) => v,
        Err(reason) => return refuse(&format!("invalid_dpop_proof: {reason}")),
    };
    if data.claims["cnf"]["jkt"] != jkt.as_str() {
        return refuse("the proof's key is not the one the token is bound to");
    }
    let expected = s.nonce.lock().unwrap().clone();
    let rotate = s.rotate_next.swap(false, Ordering::SeqCst);
    if expected.is_none() || nonce != expected || rotate {
        let fresh = format!(
            "up-nonce-{}",
            s.nonce_counter.fetch_add(1, Ordering::SeqCst)
        );
        *s.nonce.lock().unwrap() = Some(fresh.clone());
        answer(401, "use_dpop_nonce");
        let mut r = (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "use_dpop_nonce"})),
        )
            .into_response();
        r.headers_mut().insert(
            "www-authenticate",
            "DPoP error=\"use_dpop_nonce\", error_description=\"Resource server requires nonce in DPoP proof\""
                .parse()
                .unwrap(),
        );
        r.headers_mut().insert("dpop-nonce", fresh.parse().unwrap());
        return r;
    }
    answer(200, "ok");
    Json(json!({"path": path, "method": method, "body_bytes": body.len(), "sub": data.claims["sub"]}))
        .into_response()
}

// ---- the tests -----------------------------------------------------------------------------

async fn setup(extra: &str) -> (FakeAs, FakeUp, Arc<Seen>, Tokenward) {
    let seen = Arc::new(Seen::default());
    let fake_as = FakeAs::start(seen.clone(), 300).await;
    let up = FakeUp::start(seen.clone()).await;
    let tw = Tokenward::start(&format!("http://{}/api", up.addr), &fake_as.keys(extra));
    (fake_as, up, seen, tw)
}

fn refusals(seen: &Seen) -> Vec<String> {
    seen.refusals.lock().unwrap().clone()
}

async fn leak_scan(tw: &Tokenward, fake_as: &FakeAs, seen: &Seen, more: &[String]) {
    let mut secrets = fake_as.minted();
    secrets.extend(seen.proofs.lock().unwrap().iter().cloned());
    // The signature part alone, too: a log that cut a proof would still leak it.
    secrets.extend(
        seen.proofs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|p| p.rsplit('.').next().map(String::from)),
    );
    secrets.push(CLIENT_SECRET.to_string());
    secrets.extend(more.iter().cloned());
    tw.assert_no_leaks(&secrets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_proof_is_checked_nonces_are_demanded_once_and_the_token_is_kept() {
    let (fake_as, up, seen, tw) = setup("dpop = true").await;
    tw.wait_ready().await;

    // Token endpoint: the first request was told to use a nonce, the second carried it.
    assert_eq!(
        fake_as.calls(),
        vec![(400, "use_dpop_nonce".to_string()), (200, String::new())],
        "refusals: {:?}",
        refusals(&seen)
    );
    let client = reqwest::Client::new();

    // Upstream: the first request is answered 401 use_dpop_nonce and replayed with the nonce,
    // with the same token (no second token request). htu is the URL the upstream sees: its
    // base path, no query.
    let r = client
        .get(tw.url("/v1/orders?page=2#frag"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "refusals: {:?}", refusals(&seen));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["path"], "/api/v1/orders");
    assert_eq!(up.count(401, "use_dpop_nonce"), 1);
    assert_eq!(up.count(200, "ok"), 1);
    assert_eq!(
        fake_as.issued(),
        1,
        "a nonce challenge does not drop the token"
    );

    // A POST with a body, after the upstream rotated its nonce unannounced: replayed once with
    // the new nonce and the whole body.
    up.state.rotate_next.store(true, Ordering::SeqCst);
    let r = client
        .post(tw.url("/v1/items"))
        .body(vec![b'x'; 3000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "refusals: {:?}", refusals(&seen));
    assert_eq!(r.json::<Value>().await.unwrap()["body_bytes"], 3000);
    assert_eq!(up.count(401, "use_dpop_nonce"), 2);
    assert_eq!(fake_as.issued(), 1);

    // Concurrent requests of every method: each carries a fresh proof (a replayed jti would be
    // refused), and the newest nonce: none is challenged again.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (client, url) = (client.clone(), tw.url(&format!("/v1/n/{i}")));
        tasks.push(tokio::spawn(async move {
            let request = match i % 4 {
                0 => client.get(url),
                1 => client.delete(url),
                2 => client.put(url).body("{}"),
                _ => client.patch(url).body("{\"a\":1}"),
            };
            request.send().await.unwrap().status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200, "refusals: {:?}", refusals(&seen));
    }
    assert_eq!(up.count(401, "use_dpop_nonce"), 2);
    let methods: HashSet<String> = up.answers().into_iter().map(|a| a.0).collect();
    assert_eq!(methods.len(), 5, "{methods:?}");

    // A forced refresh: the token endpoint's newest nonce came with its last 200, so the
    // request carries it and is accepted at once.
    let r = client
        .post(tw.admin_url("/tokens/api/refresh"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    wait_for("the refreshed token", Duration::from_secs(10), || {
        fake_as.issued() == 2
    })
    .await;
    assert_eq!(fake_as.calls().len(), 3, "{:?}", fake_as.calls());

    // A real rejection still drops the token and replays with a new one.
    let current = fake_as.minted().last().unwrap().clone();
    let r = client
        .get(tw.url("/v1/after-refresh"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "refusals: {:?}", refusals(&seen));
    up.state.revoked.lock().unwrap().push(current);
    let r = client.get(tw.url("/v1/revoked")).send().await.unwrap();
    assert_eq!(r.status(), 200, "refusals: {:?}", refusals(&seen));
    assert_eq!(fake_as.issued(), 3);
    assert_eq!(up.count(401, "invalid_token"), 1);

    // Every token was bound to the one key tokenward generated; no proof was refused.
    let jkts: HashSet<String> = fake_as.jkts().into_iter().collect();
    assert_eq!(jkts.len(), 1);
    let refused: Vec<String> = refusals(&seen)
        .into_iter()
        .filter(|r| !r.ends_with("invalid_token"))
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
    leak_scan(&tw, &fake_as, &seen, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dpop_key_file_binds_every_token_to_it_across_restarts() {
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    let dir = tempfile::tempdir().unwrap();
    let mut d = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut d);
    let secret = p256::SecretKey::from_slice(&d).unwrap();
    let pem = secret.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let path = dir.path().join("dpop.pem");
    std::fs::write(&path, &pem).unwrap();
    let point =
        p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&secret.public_key(), false);
    let jkt = B64.encode(Sha256::digest(
        format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            B64.encode(point.x().unwrap()),
            B64.encode(point.y().unwrap())
        )
        .as_bytes(),
    ));

    let (fake_as, up, seen, mut tw) =
        setup(&format!("dpop_key = {{ file = \"{}\" }}", path.display())).await;
    tw.wait_ready().await;
    let client = reqwest::Client::new();
    let r = client.get(tw.url("/v1/one")).send().await.unwrap();
    assert_eq!(r.status(), 200, "refusals: {:?}", refusals(&seen));
    tw.kill9_and_restart();
    tw.wait_ready().await;
    let r = client.get(tw.url("/v1/two")).send().await.unwrap();
    assert_eq!(r.status(), 200, "refusals: {:?}", refusals(&seen));
    assert_eq!(fake_as.jkts(), vec![jkt.clone(), jkt.clone()]);
    assert!(up.count(200, "ok") >= 2);

    // `check` names the key by its thumbprint and the file, never its content.
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&tw.config_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&jkt) && stdout.contains("dpop_key"),
        "{stdout}"
    );
    let key_lines: Vec<String> = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(String::from)
        .collect();
    let hex_d: String = d.iter().map(|b| format!("{b:02x}")).collect();
    for leak in key_lines.iter().chain([&hex_d]) {
        assert!(!stdout.contains(leak.as_str()), "the key in check output");
    }
    let mut more = key_lines;
    more.push(hex_d);
    leak_scan(&tw, &fake_as, &seen, &more).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_dpop_the_fakes_refuse_and_nothing_reaches_the_upstream() {
    // The same fakes and a credential without DPoP: the token endpoint refuses every request
    // (no proof), so the client gets a 503 and the upstream sees nothing.
    let (fake_as, up, seen, tw) = setup("probe_interval = \"200ms\"").await;
    tw.wait_healthy().await;
    wait_for("a refused token request", Duration::from_secs(10), || {
        !fake_as.calls().is_empty()
    })
    .await;
    let r = reqwest::get(tw.url("/v1/x")).await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(fake_as.calls().iter().all(|c| c.1 == "invalid_dpop_proof"));
    assert!(up.answers().is_empty());
    leak_scan(&tw, &fake_as, &seen, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_exchange_credentials_get_dpop_bound_tokens_per_caller() {
    let (fake_as, up, seen, tw) = setup("grant = \"token_exchange\"\ndpop = true").await;
    tw.wait_ready().await;
    let client = reqwest::Client::new();
    for caller in ["caller-one-5d1c", "caller-two-9e2f", "caller-one-5d1c"] {
        let r = client
            .get(tw.url("/v1/me"))
            .header("authorization", format!("Bearer {caller}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "refusals: {:?}", refusals(&seen));
        assert_eq!(r.json::<Value>().await.unwrap()["sub"], caller);
    }
    // One exchange per caller (the first after a nonce challenge), each bound to the one key.
    assert_eq!(fake_as.issued(), 2, "{:?}", fake_as.calls());
    assert_eq!(fake_as.jkts().iter().collect::<HashSet<_>>().len(), 1);
    assert_eq!(up.count(401, "use_dpop_nonce"), 1);
    assert!(refusals(&seen).is_empty(), "{:?}", refusals(&seen));
    leak_scan(&tw, &fake_as, &seen, &[]).await;
}

#[test]
fn the_fakes_refuse_proofs_that_break_any_rule() {
    let seen = Seen::default();
    let key = tokenward::dpop::DpopKey::generate().unwrap();
    let other = tokenward::dpop::DpopKey::generate().unwrap();
    let origin = "http://127.0.0.1:1";
    let want = Expect {
        htm: "GET",
        htu: "http://127.0.0.1:1/api/x",
        token: Some("tok"),
    };
    let good = key.proof("GET", origin, "/api/x", Some("tok")).unwrap();
    let (jkt, _) = verify_proof(&good, &want, &seen).unwrap();
    assert_eq!(jkt, key.thumbprint());
    assert!(
        verify_proof(&good, &want, &seen)
            .unwrap_err()
            .contains("jti")
    );
    let fresh = || key.proof("GET", origin, "/api/x", Some("tok")).unwrap();
    // Another key's signature under this key's header.
    let forged = {
        let mine = fresh();
        let theirs = other.proof("GET", origin, "/api/x", Some("tok")).unwrap();
        let (m, t): (Vec<&str>, Vec<&str>) =
            (mine.split('.').collect(), theirs.split('.').collect());
        format!("{}.{}.{}", m[0], m[1], t[2])
    };
    assert!(
        verify_proof(&forged, &want, &seen)
            .unwrap_err()
            .contains("signature")
    );
    let cases = [
        (
            key.proof("POST", origin, "/api/x", Some("tok")).unwrap(),
            "htm",
        ),
        (
            key.proof("GET", origin, "/api/y", Some("tok")).unwrap(),
            "htu",
        ),
        (
            key.proof("GET", origin, "/api/x", Some("other")).unwrap(),
            "ath",
        ),
        (key.proof("GET", origin, "/api/x", None).unwrap(), "ath"),
    ];
    for (proof, what) in cases {
        let e = verify_proof(&proof, &want, &seen).unwrap_err();
        assert!(e.contains(what), "{what}: {e}");
    }
    // A header that is not dpop+jwt, or an old iat, re-signed with the right key.
    let resign = |header: Value, claims: Value| -> String {
        use p256::ecdsa::signature::Signer;
        let signing = p256::ecdsa::SigningKey::from_slice(&[5u8; 32]).unwrap();
        let point = signing.verifying_key().to_encoded_point(false);
        let mut header = header;
        header["jwk"] = json!({"kty": "EC", "crv": "P-256", "x": B64.encode(point.x().unwrap()), "y": B64.encode(point.y().unwrap())});
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig: Signature = signing.sign(input.as_bytes());
        format!("{input}.{}", B64.encode(sig.to_bytes()))
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |iat: u64| {
        json!({"jti": rand_hex() + &rand_hex(), "htm": "GET", "htu": want.htu, "iat": iat,
               "ath": B64.encode(Sha256::digest(b"tok"))})
    };
    let ok = resign(json!({"typ": "dpop+jwt", "alg": "ES256"}), claims(now));
    assert!(verify_proof(&ok, &want, &seen).is_ok());
    let e = verify_proof(
        &resign(json!({"typ": "JWT", "alg": "ES256"}), claims(now)),
        &want,
        &seen,
    );
    assert!(e.unwrap_err().contains("typ"));
    let e = verify_proof(
        &resign(
            json!({"typ": "dpop+jwt", "alg": "ES256"}),
            claims(now - 600),
        ),
        &want,
        &seen,
    );
    assert!(e.unwrap_err().contains("iat"));
}

#[test]
fn check_names_the_key_of_each_dpop_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, state: &str, extra: &str| -> (i32, String) {
        let credential = format!(
            "dialect = \"oauth2\"\ntoken_url = \"http://127.0.0.1:9/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n{extra}\n"
        );
        let text = config(
            free_port(),
            free_port(),
            "http://127.0.0.1:9",
            &dir.path().join("state"),
            &credential,
        )
        .replace("[state]\n", &format!("[state]\n{state}"));
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let redis = "redis = \"redis://127.0.0.1:9/0\"\nencryption_key = \"0000000000000000000000000000000000000000000000000000000000000000\"\n";
    let (code, out) = run("redis", redis, "dpop = true");
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("`credentials.api.dpop`") && out.contains("dpop_key"),
        "{out}"
    );
    let missing = dir.path().join("no-such-key.pem");
    let (code, out) = run(
        "missing",
        "",
        &format!("dpop_key = {{ file = \"{}\" }}", missing.display()),
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("`credentials.api.dpop_key`") && out.contains("no-such-key.pem"),
        "{out}"
    );
    let (code, out) = run("format", "", "dpop = true\nformat = \"Bearer {token}\"");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("`credentials.api.format`"), "{out}");
    let (code, out) = run("ok", "", "dpop = true");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("DPoP key generated at start") && out.contains("DPoP {token}"),
        "{out}"
    );
}
