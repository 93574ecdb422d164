//! Black-box tests of the vendor dialects and the `custom` dialect: the real binary against fake
//! providers written from each vendor's rules (tests/common/vendors.rs), which check signatures,
//! encryption, client authentication and parameter placement and reject anything else.

mod common;
#[path = "common/vendors.rs"]
mod vendors;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vendors::*;

const FAST: &str = "min_refresh_interval = \"1s\"\nexpiry_margin = \"1s\"\n";

fn secret_file(dir: &Path, name: &str, value: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).unwrap();
    path.display().to_string()
}

/// Forces a refresh, waiting out the admin rate limit (one per `min_refresh_interval`) when a
/// test forces two in a row.
async fn force_refresh(tw: &Tokenward) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = reqwest::Client::new()
            .post(tw.admin_url("/tokens/api/refresh"))
            .send()
            .await
            .unwrap();
        if r.status() != 429 || Instant::now() > deadline {
            return r.status().as_u16();
        }
        let wait: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(wait.min(5))).await;
    }
}

/// GETs `path` through tokenward; returns the status and the Authorization the upstream saw.
async fn through(tw: &Tokenward, path: &str) -> (u16, Option<String>) {
    let r = reqwest::get(tw.url(path)).await.unwrap();
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    (
        status,
        body["headers"]["authorization"].as_str().map(String::from),
    )
}

async fn token_status(tw: &Tokenward) -> serde_json::Value {
    tw.get_json("/tokens/api").await
}

/// Leak scan with every secret configured and every token the provider saw or issued.
async fn no_leaks(tw: &Tokenward, vendor: &Vendor, secrets: &[&str]) {
    let mut all = vendor.issued();
    all.extend(secrets.iter().map(|s| s.to_string()));
    tw.assert_no_leaks(&all).await;
}

// ---------------------------------------------------------------------------------------------
// quectel-enduser

fn quectel_keys(v: &Vendor, dir: &Path) -> String {
    quectel_keys_with(v, dir, QE_PASSWORD)
}

fn quectel_keys_with(v: &Vendor, dir: &Path, password: &str) -> String {
    format!(
        "dialect = \"quectel-enduser\"\nbase_url = \"{}\"\nemail = \"{QE_EMAIL}\"\npassword = {{ file = \"{}\" }}\nuser_domain = \"{QE_DOMAIN}\"\nuser_domain_secret = {{ file = \"{}\" }}\n{FAST}",
        v.base_url(),
        secret_file(dir, "qe_pw", password),
        secret_file(dir, "qe_uds", QE_DOMAIN_SECRET),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quectel_enduser_login_refresh_rotation_across_kill9_and_relogin() {
    let v = quectel_enduser(3).await;
    let up = FakeUpstream::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let mut tw = Tokenward::start(
        &format!("http://{}", up.addr()),
        &quectel_keys(&v, secrets.path()),
    );
    tw.wait_ready().await;
    assert_eq!(v.count("login"), 1);
    // Presented verbatim: the vendor's token is the whole header value.
    let (status, auth) = through(&tw, "/x").await;
    assert_eq!(status, 200);
    assert!(v.issued().contains(&auth.clone().unwrap()), "{auth:?}");
    assert!(auth.unwrap().starts_with("qe-at-"));
    // Refreshes ahead of the 3 s expiry, rotating the refresh token each time.
    wait_for("two refreshes", Duration::from_secs(8), || {
        v.calls()
            .iter()
            .filter(|c| c.kind == "refresh" && c.outcome == "ok")
            .count()
            >= 2
    })
    .await;
    // The provider having answered is not enough: tokenward serves the newest token once it
    // has read that answer, a moment later.
    let newest = || {
        v.issued()
            .iter()
            .rev()
            .find(|t| t.starts_with("qe-at-"))
            .cloned()
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (_, auth) = through(&tw, "/y").await;
        if auth == newest() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{auth:?} is not the newest token {:?}",
            newest()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // kill -9 and restart: the newest refresh token was persisted, so no login is needed.
    tokio::task::block_in_place(|| tw.kill9_and_restart());
    tw.wait_ready().await;
    assert_eq!(
        v.count("login"),
        1,
        "restart logged in again: {:?}",
        v.calls()
    );
    assert!(
        v.rejected().is_empty(),
        "a revoked refresh token was used: {:?}",
        v.rejected()
    );
    // A dead refresh token (5032) leads to one new login, not a loop.
    v.revoke_refresh();
    wait_for("a re-login", Duration::from_secs(8), || {
        v.count("login") == 2
    })
    .await;
    assert!(v.calls().iter().any(|c| c.outcome == "5032"));
    tw.wait_ready().await;
    assert_eq!(through(&tw, "/z").await.0, 200);
    no_leaks(&tw, &v, &[QE_PASSWORD, QE_DOMAIN_SECRET]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quectel_enduser_wrong_password_is_fatal_and_never_retried() {
    let v = quectel_enduser(300).await;
    let up = FakeUpstream::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let keys = quectel_keys_with(&v, secrets.path(), "not-the-password");
    let tw = Tokenward::start(&format!("http://{}", up.addr()), &keys);
    tw.wait_healthy().await;
    wait_for("a login", Duration::from_secs(5), || v.count("login") >= 1).await;
    // Requests keep arriving: none may cause another password attempt.
    for _ in 0..5 {
        assert_eq!(through(&tw, "/x").await.0, 503);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(v.count("login"), 1, "{:?}", v.calls());
    let s = token_status(&tw).await;
    assert_eq!(s["state"], "fatal", "{s}");
    assert!(s["last_error"].as_str().unwrap().contains("5583"), "{s}");
    no_leaks(
        &tw,
        &v,
        &[QE_PASSWORD, QE_DOMAIN_SECRET, "not-the-password"],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// enos-apim

async fn raw_http(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enos_apim_signs_every_request_over_query_and_body() {
    let v = enos(300).await;
    let (up, seen) = enos_upstream(v.clone()).await;
    let keys = format!(
        "dialect = \"enos-apim\"\nbase_url = \"{}\"\napp_key = \"{ENOS_KEY}\"\napp_secret = \"{ENOS_SECRET}\"\nmax_body_bytes = 300000\n{FAST}",
        v.base_url()
    );
    let tw = Tokenward::start(&format!("http://{up}"), &keys);
    tw.wait_ready().await;
    let client = reqwest::Client::new();
    let check = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap();
        (status, body)
    };
    // A GET with a query that needs sorting and decoding.
    let (status, body) = check(
        client
            .get(tw.url("/api/devices?b=2&a=x%20y&c="))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["signature_ok"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    // A POST with a query and a small JSON body.
    let json_body = r#"{"deviceId":"d-1","values":[1,2,3]}"#;
    let (status, body) = check(
        client
            .post(tw.url("/api/data?z=1&y=%2Fslash"))
            .header("content-type", "application/json")
            .body(json_body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["signature_ok"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    assert_eq!(body["body_sha256"], sha256_hex(json_body.as_bytes()));
    // A body larger than pingora's 64 KiB retry buffer still goes upstream whole and signed.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (status, body) = check(
        client
            .put(tw.url("/api/blob?k=v"))
            .body(big.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["signature_ok"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    assert_eq!(body["body_bytes"], 200_000);
    assert_eq!(body["body_sha256"], sha256_hex(&big));
    // Over the configured bound: a clear 413, nothing sent upstream.
    let before = seen.lock().unwrap().len();
    let r = client
        .post(tw.url("/api/blob"))
        .body(vec![b'x'; 300_001])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "body_too_large");
    assert_eq!(body["limit_bytes"], 300000);
    assert_eq!(seen.lock().unwrap().len(), before);
    // A chunked body is signed and sent with a Content-Length.
    let reply = raw_http(
        tw.proxy,
        b"POST /api/chunked?q=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"signature_ok\":true"), "{reply}");
    let seen = seen.lock().unwrap().clone();
    let last = seen.last().unwrap();
    assert_eq!(last.body_len, 11);
    assert_eq!(last.content_length.as_deref(), Some("11"));
    assert_eq!(last.transfer_encoding, None);
    // Every request carried the three headers and a valid signature; no Authorization.
    assert!(
        seen.iter()
            .all(|s| s.signature_ok && s.authorization.is_none()),
        "{seen:?}"
    );
    assert_eq!(seen.len(), 4);
    // A chunked body over the 64 KiB pingora keeps for replays cannot be staged: a clear 411.
    let mut chunked = b"POST /api/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..3 {
        chunked.extend_from_slice(format!("{:x}\r\n", 30_000).as_bytes());
        chunked.extend_from_slice(&vec![b'c'; 30_000]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let reply = raw_http(tw.proxy, &chunked).await;
    assert!(reply.starts_with("HTTP/1.1 411"), "{reply}");
    assert!(reply.contains("length_required"), "{reply}");
    no_leaks(&tw, &v, &[ENOS_SECRET]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enos_apim_replays_a_rejected_signed_request_with_its_whole_body_and_a_new_signature() {
    let v = enos(300).await;
    let (up, seen) = enos_upstream(v.clone()).await;
    let keys = format!(
        "dialect = \"enos-apim\"\nbase_url = \"{}\"\napp_key = \"{ENOS_KEY}\"\napp_secret = \"{ENOS_SECRET}\"\n{FAST}",
        v.base_url()
    );
    let tw = Tokenward::start(&format!("http://{up}"), &keys);
    tw.wait_ready().await;
    // Older than min_refresh_interval, so a rejection may replace it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The gateway forgets the token: the upstream answers 401, tokenward gets a new token
    // (refresh refused with 1203, then get) and replays the request, body and all.
    v.forget_access();
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
    let r = reqwest::Client::new()
        .post(tw.url("/api/replay?x=1"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let reply: serde_json::Value = r.json().await.unwrap();
    assert_eq!(reply["body_sha256"], sha256_hex(&body));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(!seen[0].signature_ok && seen[1].signature_ok);
    assert_ne!(seen[0].token, seen[1].token);
    assert!(seen.iter().all(|s| s.body_len == 100_000));
    assert_eq!(v.count("login"), 2);
    no_leaks(&tw, &v, &[ENOS_SECRET]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enos_apim_refreshes_falls_back_to_get_and_stops_on_fatal_codes() {
    let v = enos(3).await;
    let (up, seen) = enos_upstream(v.clone()).await;
    let keys = format!(
        "dialect = \"enos-apim\"\nbase_url = \"{}\"\napp_key = \"{ENOS_KEY}\"\napp_secret = \"{ENOS_SECRET}\"\n{FAST}",
        v.base_url()
    );
    let tw = Tokenward::start(&format!("http://{up}"), &keys);
    tw.wait_ready().await;
    assert_eq!(v.count("login"), 1);
    wait_for("a refresh", Duration::from_secs(6), || {
        v.calls()
            .iter()
            .any(|c| c.kind == "refresh" && c.outcome == "ok")
    })
    .await;
    // The service dropped the token: refresh answers 1203 and the dialect calls get at once.
    v.forget_access();
    v.fail_refresh(Some("1204"));
    wait_for("a second get", Duration::from_secs(6), || {
        v.count("login") >= 2
    })
    .await;
    tw.wait_ready().await;
    let r = reqwest::get(tw.url("/after")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(seen.lock().unwrap().last().unwrap().signature_ok);
    // A bad app secret (1003) is fatal: no more calls.
    v.fail_refresh(Some("1003"));
    v.fail_login(Some("1003"));
    assert_ne!(force_refresh(&tw).await, 200);
    let n = v.calls().len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(v.calls().len(), n, "{:?}", v.calls());
    assert_eq!(token_status(&tw).await["state"], "fatal");
    no_leaks(&tw, &v, &[ENOS_SECRET]).await;
}

// ---------------------------------------------------------------------------------------------
// quectel-accesskey

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quectel_accesskey_same_token_within_window_is_success_without_spinning() {
    let v = quecauth(6).await;
    v.set_same_token_window(Duration::from_secs(2));
    let up = FakeUpstream::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let keys = format!(
        "dialect = \"quectel-accesskey\"\nbase_url = \"{}\"\naccess_key = \"{QA_KEY}\"\naccess_secret = {{ file = \"{}\" }}\n{FAST}",
        v.base_url(),
        secret_file(secrets.path(), "qa", QA_SECRET)
    );
    let tw = Tokenward::start(&format!("http://{}", up.addr()), &keys);
    tw.wait_ready().await;
    let (_, first) = through(&tw, "/a").await;
    let first = first.unwrap();
    assert!(
        first.starts_with("QJWT ey"),
        "verbatim, no second scheme: {first}"
    );
    // The JWT exp (6 s) wins over the body's 86400.
    let expires = token_status(&tw).await["token"]["expires_in_s"]
        .as_f64()
        .unwrap();
    assert!(expires <= 6.0, "{expires}");
    // A refresh inside the window returns the same token: a success, and no spinning.
    assert_eq!(force_refresh(&tw).await, 200);
    assert_eq!(v.calls().last().unwrap().outcome, "same");
    let n = v.calls().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(v.calls().len() <= n + 1, "spinning: {:?}", v.calls());
    assert_eq!(through(&tw, "/b").await.1.unwrap(), first);
    // Past the window, the scheduled refresh brings a new token before the old one expires.
    wait_for("a new token", Duration::from_secs(6), || {
        v.calls()
            .iter()
            .any(|c| c.kind == "refresh" && c.outcome == "ok")
    })
    .await;
    // Served once tokenward has read the provider's answer, a moment after the provider sent it.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (status, now) = through(&tw, "/c").await;
        assert_eq!(status, 200);
        if now.as_deref() != Some(first.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "the new token is not served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The key is disabled: refresh fails, the login fails too, and that is final.
    v.fail_refresh(Some("4030"));
    v.fail_login(Some("4030"));
    assert_ne!(force_refresh(&tw).await, 200);
    let n = v.calls().len();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(v.calls().len(), n);
    let s = token_status(&tw).await;
    assert_eq!(s["state"], "fatal", "{s}");
    assert_eq!(v.count("login"), 2, "{:?}", v.calls());
    no_leaks(&tw, &v, &[QA_SECRET]).await;
}

fn quectel_accesskey_custom(v: &Vendor, dir: &Path) -> String {
    shipped_custom(
        "quectel-accesskey-custom.toml",
        "quec",
        "https://iot-api.quectelcn.com",
        v,
        dir,
    )
    .replace("24b9rucGWFBzVt1wDhxRAzgM", QA_KEY)
}

/// Masks what differs between two runs of the same session: the login's millisecond timestamp
/// and the SHA-256 password derived from it (a successful login's is masked as an issued token).
fn mask_quecauth_volatile(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(i) = rest.find("timestamp=") {
        out.push_str(&rest[..i + "timestamp=".len()]);
        rest = rest[i + "timestamp=".len()..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push_str("<ms>");
    }
    out.push_str(rest);
    // A 64-digit lowercase hex run is a password computed for a refused login.
    let chars: Vec<char> = out.chars().collect();
    let mut masked = String::new();
    let mut i = 0;
    while i < chars.len() {
        let run = chars[i..]
            .iter()
            .take_while(|c| c.is_ascii_digit() || ('a'..='f').contains(*c))
            .count();
        if run == 64 {
            masked.push_str("<sha256>");
            i += run;
        } else {
            masked.extend(&chars[i..i + run.max(1)]);
            i += run.max(1);
        }
    }
    masked
}

/// A deterministic quectel-accesskey session: the provider transcript (tokens masked by issue
/// order), the outcome of each provider call, and the Authorization headers the upstream saw.
async fn quectel_accesskey_session(custom: bool) -> (Vec<String>, Vec<String>, Vec<String>) {
    let v = quecauth(300).await;
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(dir.path(), "quectel_access_secret", QA_SECRET);
    let keys = if custom {
        quectel_accesskey_custom(&v, dir.path())
    } else {
        format!(
            "dialect = \"quectel-accesskey\"\nbase_url = \"{}\"\naccess_key = \"{QA_KEY}\"\naccess_secret = {{ file = \"{secret}\" }}\n",
            v.base_url()
        )
    };
    let mut tw = Tokenward::start(&format!("http://{}", up.addr()), &keys);
    tw.wait_ready().await;
    through(&tw, "/one").await;
    // Refreshed with the access token itself: a new token.
    assert_eq!(force_refresh(&tw).await, 200);
    through(&tw, "/two").await;
    // Within the window the same token comes back: a success.
    v.set_same_token_window(Duration::from_secs(3600));
    assert_eq!(force_refresh(&tw).await, 200);
    assert_eq!(v.calls().last().unwrap().outcome, "same");
    through(&tw, "/three").await;
    v.set_same_token_window(Duration::ZERO);
    tokio::task::block_in_place(|| tw.kill9_and_restart());
    tw.wait_ready().await;
    through(&tw, "/four").await;
    // A refused refresh (the key was disabled for it) is followed at once by a login.
    v.fail_refresh(Some("4030"));
    assert_eq!(force_refresh(&tw).await, 200);
    assert_eq!(v.calls().last().unwrap().kind, "login");
    through(&tw, "/five").await;
    // Disabled for good: the login is refused too, and that is final.
    v.fail_login(Some("4030"));
    assert_ne!(force_refresh(&tw).await, 200);
    let n = v.calls().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(v.calls().len(), n, "retried: {:?}", v.calls());
    let s = token_status(&tw).await;
    assert_eq!(s["state"], "fatal", "{s}");
    through(&tw, "/six").await;
    no_leaks(&tw, &v, &[QA_SECRET]).await;
    let issued = v.issued();
    let mask = |s: &str| {
        let mut s = s.to_string();
        for (i, t) in issued.iter().enumerate().rev() {
            s = s.replace(t.as_str(), &format!("tok#{i}"));
        }
        s
    };
    let auths = up
        .seen()
        .iter()
        .flat_map(|s| s.all("authorization").into_iter().map(mask))
        .collect();
    let transcript = v
        .masked_transcript(&[])
        .iter()
        .map(|l| mask_quecauth_volatile(l))
        .collect();
    let outcomes = v
        .calls()
        .iter()
        .map(|c| format!("{} {}", c.kind, c.outcome))
        .collect();
    (transcript, outcomes, auths)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quectel_accesskey_builtin_and_custom_send_the_same_requests_and_inject_the_same_tokens() {
    let ((builtin, builtin_calls, builtin_auth), (custom, custom_calls, custom_auth)) = tokio::join!(
        quectel_accesskey_session(false),
        quectel_accesskey_session(true)
    );
    assert_eq!(builtin, custom);
    assert_eq!(builtin_calls, custom_calls);
    assert_eq!(builtin_auth, custom_auth);
    // The fake checked every login's signature: none was refused but the forced ones.
    assert_eq!(
        builtin_calls,
        [
            "login ok",
            "refresh ok",
            "refresh same",
            "login ok",
            "refresh 4030",
            "login ok",
            "refresh 4030",
            "login 4030"
        ],
        "{builtin:#?}"
    );
    assert_eq!(builtin_auth.len(), 6);
    assert!(
        builtin_auth.iter().all(|a| a.starts_with("QJWT tok#")),
        "{builtin_auth:?}"
    );
    assert!(
        builtin[0].starts_with("GET /v2/quecauth/accessKeyAuthrize/accessKeyLogin query={\"grant_type\": \"password\", \"password\": \"tok#"),
        "{}",
        builtin[0]
    );
}

// ---------------------------------------------------------------------------------------------
// custom: typed JSON values

/// A provider that records every JSON body it is sent and answers each with a new token.
async fn recording_provider() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let s2 = seen.clone();
    let router = axum::Router::new().route(
        "/login",
        axum::routing::post(move |body: String| {
            let seen = s2.clone();
            async move {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                seen.lock().unwrap().push(v);
                axum::Json(serde_json::json!({
                    "token": format!("typed-at-{}", rand_hex()),
                    "expires_in": 300
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_json_values_can_be_typed_numbers_and_booleans() {
    let (provider, seen) = recording_provider().await;
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let flag = secret_file(dir.path(), "flag", "true");
    let count = secret_file(dir.path(), "count", "42");
    let keys = format!(
        r#"dialect = "custom"
secrets = {{ flag = {{ file = "{flag}" }}, count = {{ file = "{count}" }} }}
[credentials.api.login]
url = "http://{provider}/login"
json = {{ ts = {{ number = "{{now_ms}}" }}, on = {{ bool = "{{secret.flag}}" }}, off = {{ bool = "false" }}, n = {{ number = "{{secret.count}}" }}, ratio = {{ number = "-0.5e1" }}, s = "{{secret.count}}", phone = {{ object = {{ number = "+49 30 1234" }} }}, list = [{{ number = "{{now_s}}" }}, "x", 7] }}
[credentials.api.login.response]
access_token = "/token"
expires = "/expires_in"
"#
    );
    let tw = Tokenward::start(&format!("http://{}", up.addr()), &keys);
    tw.wait_healthy().await;
    wait_for("a login", Duration::from_secs(10), || {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    let body = seen.lock().unwrap()[0].clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let ts = body["ts"].as_u64().unwrap_or_else(|| panic!("{body}"));
    assert!(
        (ts as i128 - now.as_millis() as i128).abs() < 600_000,
        "{body}"
    );
    assert_eq!(body["on"], serde_json::json!(true), "{body}");
    assert_eq!(body["off"], serde_json::json!(false), "{body}");
    assert_eq!(body["n"], serde_json::json!(42), "{body}");
    assert_eq!(body["ratio"], serde_json::json!(-5.0), "{body}");
    // Plain strings stay strings, and `object` sends a table whose one key is a type's name.
    assert_eq!(body["s"], serde_json::json!("42"), "{body}");
    assert_eq!(
        body["phone"],
        serde_json::json!({"number": "+49 30 1234"}),
        "{body}"
    );
    assert!(body["list"][0].is_u64(), "{body}");
    assert_eq!(body["list"][1], "x");
    assert_eq!(body["list"][2], 7);
    tw.wait_ready().await;
    assert_eq!(through(&tw, "/x").await.0, 200);
    // A value that does not render to its type fails the login clearly, naming the key and
    // never the value.
    secret_file(dir.path(), "flag", "yes-please-flag");
    assert_ne!(force_refresh(&tw).await, 200);
    let s = token_status(&tw).await;
    let error = s["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("login.json.on") && error.contains("boolean"),
        "{s}"
    );
    assert_eq!(s["state"], "fatal", "{s}");
    tw.assert_no_leaks(&["yes-please-flag".to_string()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_dialect_logs_in_to_the_enos_token_service_with_a_numeric_timestamp() {
    let v = enos(300).await;
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(dir.path(), "enos_app_secret", ENOS_SECRET);
    let keys = format!(
        r#"dialect = "custom"
header = "apim-accesstoken"
format = "{{token}}"
secrets = {{ app_secret = {{ file = "{secret}" }} }}
[credentials.api.login]
url = "{}/apim-token-service/v2.0/token/get"
json = {{ appKey = "{ENOS_KEY}", encryption = "{{sha256('{ENOS_KEY}' + now_ms + secret.app_secret)}}", timestamp = {{ number = "{{now_ms}}" }} }}
[credentials.api.login.response]
access_token = "/data/accessToken"
expires = "/data/expire"
success = {{ pointer = "/status", equals = 0 }}
error_code = "/status"
"#,
        v.base_url()
    );
    let tw = Tokenward::start(&format!("http://{}", up.addr()), &keys);
    tw.wait_healthy().await;
    wait_for("a login", Duration::from_secs(10), || v.count("login") >= 1).await;
    // The fake wants `timestamp` as a JSON number and checks the signature over it.
    assert_eq!(v.calls()[0].outcome, "ok", "{:?}", v.calls());
    tw.wait_ready().await;
    reqwest::get(tw.url("/x")).await.unwrap();
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].all("apim-accesstoken"), [v.issued()[0].as_str()]);
    no_leaks(&tw, &v, &[ENOS_SECRET]).await;
}

// ---------------------------------------------------------------------------------------------
// babelbird (built-in and custom)

fn babelbird_builtin(v: &Vendor, client_secret: &str, refresh: &str) -> String {
    format!(
        "dialect = \"babelbird\"\nbase_url = \"{}\"\nclient_id = \"{BB_CLIENT}\"\nclient_secret = {{ file = \"{client_secret}\" }}\nrefresh_token = {{ file = \"{refresh}\" }}\n",
        v.base_url()
    )
}

/// The shipped `config/dialects/<file>`'s credential, pointed at the fake provider and at
/// `secrets_dir` for its secret files.
fn shipped_custom(
    file: &str,
    credential: &str,
    base: &str,
    v: &Vendor,
    secrets_dir: &Path,
) -> String {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config/dialects")
            .join(file),
    )
    .unwrap();
    let header = format!("[credentials.{credential}]\n");
    let start = text.find(&header).unwrap() + header.len();
    text[start..]
        .replace(&format!("[credentials.{credential}."), "[credentials.api.")
        .replace(base, &v.base_url())
        .replace(
            "/etc/tokenward/secrets/",
            &format!("{}/", secrets_dir.display()),
        )
}

fn babelbird_custom(v: &Vendor, dir: &Path) -> String {
    shipped_custom(
        "babelbird-custom.toml",
        "files",
        "https://files.example.com",
        v,
        dir,
    )
}

/// A deterministic babelbird session: the provider transcript (tokens masked by issue order)
/// and the Authorization headers the upstream saw.
async fn babelbird_session(custom: bool) -> (Vec<String>, Vec<String>) {
    let boot = format!("rt-boot-{}", rand_hex());
    let v = babelbird(300, &boot).await;
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cs = secret_file(dir.path(), "babelbird_client_secret", BB_SECRET);
    let rt = secret_file(dir.path(), "babelbird_refresh_token", &boot);
    let keys = if custom {
        babelbird_custom(&v, dir.path())
    } else {
        babelbird_builtin(&v, &cs, &rt)
    };
    let mut tw = Tokenward::start(&format!("http://{}", up.addr()), &keys);
    tw.wait_ready().await;
    through(&tw, "/one").await;
    assert_eq!(force_refresh(&tw).await, 200);
    assert_eq!(force_refresh(&tw).await, 200);
    through(&tw, "/two").await;
    tokio::task::block_in_place(|| tw.kill9_and_restart());
    tw.wait_ready().await;
    through(&tw, "/three").await;
    assert!(
        v.rejected().is_empty(),
        "revoked refresh token used after restart"
    );
    // The refresh token dies: babelbird has no login, so this is fatal and says what to do.
    v.revoke_refresh();
    assert_ne!(force_refresh(&tw).await, 200);
    let n = v.calls().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(v.calls().len(), n, "retried: {:?}", v.calls());
    let s = token_status(&tw).await;
    assert_eq!(s["state"], "fatal", "{s}");
    assert!(
        s["last_error"].as_str().unwrap().contains("bootstrap"),
        "{s}"
    );
    // The operator writes a new bootstrap token: tokenward notices the file and starts a new chain.
    let boot2 = format!("rt-boot2-{}", rand_hex());
    v.accept_refresh(&boot2);
    let generation = token_status(&tw).await["token"]["generation"].as_u64();
    secret_file(dir.path(), "babelbird_refresh_token", &boot2);
    // The provider having seen the call is not enough: wait until tokenward serves its answer.
    let deadline = Instant::now() + Duration::from_secs(5);
    while token_status(&tw).await["token"]["generation"].as_u64() == generation {
        assert!(Instant::now() < deadline, "no token from the new bootstrap");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tw.wait_ready().await;
    through(&tw, "/four").await;
    // An invalid client secret (picked up from its file) is fatal at once.
    let calls = v.calls().len();
    secret_file(dir.path(), "babelbird_client_secret", "wrong-secret");
    wait_for(
        "a refresh with the new secret",
        Duration::from_secs(5),
        || v.calls().len() > calls,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(v.calls().len(), calls + 1, "{:?}", v.calls());
    assert_eq!(token_status(&tw).await["state"], "fatal");
    no_leaks(&tw, &v, &[BB_SECRET, &boot, &boot2]).await;
    let issued = v.issued();
    let mask = |s: &str| {
        let mut s = s.to_string();
        for (i, t) in issued.iter().enumerate().rev() {
            s = s.replace(t.as_str(), &format!("tok#{i}"));
        }
        s
    };
    let auths = up
        .seen()
        .iter()
        .flat_map(|s| s.all("authorization").into_iter().map(mask))
        .collect();
    (v.masked_transcript(&[]), auths)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn babelbird_builtin_and_custom_send_the_same_requests_and_inject_the_same_tokens() {
    let ((builtin, builtin_auth), (custom, custom_auth)) =
        tokio::join!(babelbird_session(false), babelbird_session(true));
    assert_eq!(builtin, custom);
    assert_eq!(builtin_auth, custom_auth);
    assert_eq!(builtin_auth.len(), 4);
    assert!(
        builtin_auth.iter().all(|a| a.starts_with("Bearer tok#")),
        "{builtin_auth:?}"
    );
    assert!(builtin[0].starts_with("POST /api/refreshToken.do query={\"grant_type\": \"refresh_token\", \"refresh_token\": \"tok#0\"} authorization=\"Basic "), "{}", builtin[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn babelbird_refreshes_ahead_of_expiry_and_other_dialects_do_not_buffer_bodies() {
    let boot = format!("rt-boot-{}", rand_hex());
    let v = babelbird(3, &boot).await;
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cs = secret_file(dir.path(), "cs", BB_SECRET);
    let rt = secret_file(dir.path(), "rt", &boot);
    let tw = Tokenward::start(
        &format!("http://{}", up.addr()),
        &format!("{}{FAST}", babelbird_builtin(&v, &cs, &rt)),
    );
    tw.wait_ready().await;
    let started = Instant::now();
    wait_for("three refreshes", Duration::from_secs(9), || {
        v.count("refresh") >= 3
    })
    .await;
    let calls = v.calls();
    for pair in calls.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap < Duration::from_secs(3) && gap >= Duration::from_millis(900),
            "gap {gap:?}"
        );
    }
    assert!(calls.iter().all(|c| c.outcome == "ok"), "{calls:?}");
    assert!(started.elapsed() < Duration::from_secs(9));
    // A 2 MiB body streams through: only signing dialects buffer (and bound) bodies.
    let r = reqwest::Client::new()
        .post(tw.url("/upload"))
        .body(vec![7u8; 2 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["body_bytes"], 2 << 20);
    no_leaks(&tw, &v, &[BB_SECRET, &boot]).await;
}

// ---------------------------------------------------------------------------------------------
// cloudreve (built-in and custom)

fn cloudreve_custom(v: &Vendor, dir: &Path) -> String {
    shipped_custom(
        "cloudreve-custom.toml",
        "cloud",
        "https://cloud.example.com",
        v,
        dir,
    )
}

async fn cloudreve_session(custom: bool) -> (Vec<String>, Vec<String>) {
    let v = cloudreve_provider(300).await;
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pw = secret_file(dir.path(), "cloudreve_password", CR_PASSWORD);
    let keys = if custom {
        cloudreve_custom(&v, dir.path())
    } else {
        format!(
            "dialect = \"cloudreve\"\nbase_url = \"{}\"\nemail = \"{CR_EMAIL}\"\npassword = {{ file = \"{pw}\" }}\n",
            v.base_url()
        )
    };
    let mut tw = Tokenward::start(&format!("http://{}", up.addr()), &keys);
    tw.wait_ready().await;
    through(&tw, "/one").await;
    assert_eq!(force_refresh(&tw).await, 200);
    assert_eq!(force_refresh(&tw).await, 200);
    through(&tw, "/two").await;
    tokio::task::block_in_place(|| tw.kill9_and_restart());
    tw.wait_ready().await;
    through(&tw, "/three").await;
    assert_eq!(v.count("login"), 1, "{:?}", v.calls());
    assert!(v.rejected().is_empty());
    // 40020: the refresh token is dead, so one login follows.
    v.revoke_refresh();
    assert_eq!(force_refresh(&tw).await, 200);
    assert_eq!(v.count("login"), 2);
    through(&tw, "/four").await;
    // Wrong password (40080) after a dead refresh token: fatal, never retried.
    // (tokenward notices the changed password file and tries it once).
    v.revoke_refresh();
    secret_file(dir.path(), "cloudreve_password", "wrong-password");
    wait_for("a failed login", Duration::from_secs(5), || {
        v.count("login") == 3
    })
    .await;
    let n = v.calls().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(v.calls().len(), n, "{:?}", v.calls());
    let s = token_status(&tw).await;
    assert_eq!(s["state"], "fatal", "{s}");
    assert!(s["last_error"].as_str().unwrap().contains("40080"), "{s}");
    // Still serving the token that is valid.
    assert_eq!(through(&tw, "/five").await.0, 200);
    no_leaks(&tw, &v, &[CR_PASSWORD, "wrong-password"]).await;
    let issued = v.issued();
    let mask = |s: &str| {
        let mut s = s.to_string();
        for (i, t) in issued.iter().enumerate().rev() {
            s = s.replace(t.as_str(), &format!("tok#{i}"));
        }
        s
    };
    let auths = up
        .seen()
        .iter()
        .flat_map(|s| s.all("authorization").into_iter().map(mask))
        .collect();
    (v.masked_transcript(&[CR_PASSWORD, "wrong-password"]), auths)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudreve_builtin_and_custom_send_the_same_requests_and_inject_the_same_tokens() {
    let ((builtin, builtin_auth), (custom, custom_auth)) =
        tokio::join!(cloudreve_session(false), cloudreve_session(true));
    assert_eq!(builtin, custom);
    assert_eq!(builtin_auth, custom_auth);
    assert_eq!(builtin_auth.len(), 5);
    assert!(
        builtin_auth.iter().all(|a| a.starts_with("Bearer tok#")),
        "{builtin_auth:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudreve_two_factor_account_is_a_clear_fatal_error() {
    let v = cloudreve_provider(300).await;
    v.fail_login(Some("203"));
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = format!(
        "dialect = \"cloudreve\"\nbase_url = \"{}\"\nemail = \"{CR_EMAIL}\"\npassword = {{ file = \"{}\" }}\n",
        v.base_url(),
        secret_file(dir.path(), "pw", CR_PASSWORD)
    );
    let tw = Tokenward::start(&format!("http://{}", up.addr()), &keys);
    tw.wait_healthy().await;
    wait_for("a login", Duration::from_secs(5), || v.count("login") == 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(v.count("login"), 1);
    let r = reqwest::get(tw.url("/x")).await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "credentials_rejected", "{body}");
    let status = tw.get_json("/tokens/api").await;
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("two-factor"),
        "{status}"
    );
    no_leaks(&tw, &v, &[CR_PASSWORD]).await;
}
