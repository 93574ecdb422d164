//! Fault injection: hostile or broken providers and clients, each with counted outcomes
//! (requests sent, requests failed, provider calls made).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use common::*;

/// A provider that misbehaves in one chosen way and counts its calls.
#[derive(Clone, Copy, Debug)]
enum Hostile {
    Silent,
    Endless,
    Huge,
    NotUtf8,
    WrongType,
    Html,
    ExpiredAlready,
    YearsAhead,
}

async fn hostile_provider(kind: Hostile) -> (SocketAddr, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let router = Router::new().route(
        "/token",
        post(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let ok = |body: Body| {
                    Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .body(body)
                        .unwrap()
                };
                match kind {
                    Hostile::Silent => {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        ok(Body::from("{}"))
                    }
                    // 64 KiB chunks, up to 64 MiB: far beyond the bound, and still finite.
                    Hostile::Endless => ok(Body::new(chunks::Chunks(1024))),
                    Hostile::Huge => ok(Body::from(vec![b' '; 8 << 20])),
                    Hostile::NotUtf8 => ok(Body::from(vec![0xff, 0xfe, 0x7b, 0x00])),
                    Hostile::WrongType => {
                        ok(Body::from(r#"{"access_token": 12345, "expires_in": 60}"#))
                    }
                    Hostile::Html => (
                        StatusCode::OK,
                        [("content-type", "text/html")],
                        "<html><body>Gateway</body></html>",
                    )
                        .into_response(),
                    Hostile::ExpiredAlready => ok(Body::from(
                        r#"{"access_token": "tok-expired-123456", "expires_in": 0}"#,
                    )),
                    Hostile::YearsAhead => ok(Body::from(
                        r#"{"access_token": "tok-forever-123456", "expires_in": 315360000}"#,
                    )),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (addr, calls)
}

/// A finite body of 64 KiB chunks.
mod chunks {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub struct Chunks(pub usize);

    impl http_body::Body for Chunks {
        type Data = bytes::Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>> {
            if self.0 == 0 {
                return Poll::Ready(None);
            }
            self.0 -= 1;
            Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from(
                vec![b'{'; 64 * 1024],
            )))))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_provider_answers_fail_clearly_and_boundedly() {
    let upstream = FakeUpstream::start().await;
    let cases: &[(Hostile, &str)] = &[
        (Hostile::Silent, "did not answer within"),
        (Hostile::Endless, "bound"),
        (Hostile::Huge, "bound"),
        (Hostile::NotUtf8, "UTF-8"),
        (Hostile::WrongType, "access_token"),
        (Hostile::Html, "HTML"),
        (Hostile::ExpiredAlready, "already expired"),
        (Hostile::YearsAhead, "bound"),
    ];
    for (kind, want) in cases {
        let (addr, calls) = hostile_provider(*kind).await;
        let keys = format!(
            "dialect = \"oauth2\"\ntoken_url = \"http://{addr}/token\"\nclient_id = \"c\"\nclient_secret = \"{CLIENT_SECRET}\"\ntimeout = \"1s\"\n"
        );
        let tw = Tokenward::start(&format!("http://{}", upstream.addr()), &keys);
        tw.wait_healthy().await;
        let started = Instant::now();
        let r = reqwest::get(tw.url("/x")).await.unwrap();
        let waited = started.elapsed();
        assert_eq!(r.status(), 503, "{kind:?}");
        assert!(r.headers().get("retry-after").is_some(), "{kind:?}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            waited < Duration::from_secs(5),
            "{kind:?}: a request waited {waited:?}"
        );
        let status = tw.get_json("/tokens/api").await;
        let error = status["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            error.contains(want),
            "{kind:?}: last_error {error:?} does not say {want:?}; client saw {body}"
        );
        assert!(calls.load(Ordering::SeqCst) >= 1);
        assert!(
            upstream.seen().is_empty(),
            "{kind:?}: a request went upstream without a token"
        );
        tw.assert_no_leaks(&[
            "tok-expired-123456".into(),
            "tok-forever-123456".into(),
            CLIENT_SECRET.into(),
        ])
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outage_longer_than_several_lifetimes_under_steady_load() {
    // Tokens live 2 s (served for 1.8 s); the provider is down for 6 s: three lifetimes.
    let provider = FakeProvider::start(2, false, None).await;
    let upstream = FakeUpstream::start().await;
    let tw = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &oauth2_keys(
            &provider,
            "min_refresh_interval = \"500ms\"\nexpiry_margin = \"200ms\"\nprobe_interval = \"500ms\"",
        ),
    );
    tw.wait_ready().await;
    provider.set_mode(Mode::Status(503));
    let outage_start = Instant::now();
    let token_valid_until = {
        let t = tw.get_json("/tokens/api").await;
        // Served until the margin before expiry.
        Duration::from_secs_f64(t["token"]["expires_in_s"].as_f64().unwrap())
            .saturating_sub(Duration::from_millis(200))
    };

    #[derive(Default)]
    struct Tally {
        sent: usize,
        ok_while_valid: usize,
        failed_while_valid: usize,
        json_503_after_expiry: usize,
        other_after_expiry: usize,
    }
    let tally = Arc::new(Mutex::new(Tally::default()));
    let client = reqwest::Client::new();
    let load = |until: Duration| {
        let (tally, client, url) = (tally.clone(), client.clone(), tw.url("/steady"));
        async move {
            while outage_start.elapsed() < until {
                let at = outage_start.elapsed();
                let r = client.get(&url).send().await.unwrap();
                let status = r.status().as_u16();
                let is_json = r
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v == "application/json");
                {
                    let mut t = tally.lock().unwrap();
                    t.sent += 1;
                    // A small guard band around the expiry instant, where either answer is right.
                    if at + Duration::from_millis(250) < token_valid_until {
                        if status == 200 {
                            t.ok_while_valid += 1
                        } else {
                            t.failed_while_valid += 1
                        }
                    } else if at > token_valid_until + Duration::from_millis(250) {
                        if status == 503 && is_json {
                            t.json_503_after_expiry += 1
                        } else {
                            t.other_after_expiry += 1
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let workers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(load(Duration::from_secs(6))))
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let calls_during_outage = provider.call_count() - 1;

    provider.set_mode(Mode::Ok);
    let back = Instant::now();
    let successes_before = provider.successful_calls();
    loop {
        if client.get(tw.url("/back")).send().await.unwrap().status() == 200 {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(3), "no recovery");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovered_in = back.elapsed();
    let recovery_calls = provider.successful_calls() - successes_before;
    let t = tally.lock().unwrap();
    eprintln!(
        "outage 6s, lifetime 2s: sent {}, ok while valid {}, failed while valid {}, json 503 after expiry {}, other after expiry {}, provider calls during outage {}, recovered in {:?} with {} provider call(s)",
        t.sent,
        t.ok_while_valid,
        t.failed_while_valid,
        t.json_503_after_expiry,
        t.other_after_expiry,
        calls_during_outage,
        recovered_in,
        recovery_calls
    );
    assert!(
        t.ok_while_valid > 20,
        "too little load while the token was valid"
    );
    assert_eq!(
        t.failed_while_valid, 0,
        "requests failed while a valid token existed"
    );
    assert!(
        t.json_503_after_expiry > 100,
        "too little load after expiry"
    );
    assert_eq!(
        t.other_after_expiry, 0,
        "after expiry every answer is a JSON 503 (never the expired token)"
    );
    // One probe per interval (≤ 500 ms), not one call per request: at most ~12 in 6 s plus slack.
    assert!(
        calls_during_outage <= 16,
        "{calls_during_outage} provider calls during the outage for {} requests",
        t.sent
    );
    assert!(
        recovered_in < Duration::from_secs(1),
        "recovered in {recovered_in:?}"
    );
    assert_eq!(
        recovery_calls, 1,
        "recovery took {recovery_calls} provider calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_cannot_reach_another_host_or_the_token() {
    let (provider, upstream, tw) = oauth2_setup(300, "").await;
    tw.wait_ready().await;
    let proxy = tw.proxy;
    let raw = move |request: Vec<u8>| {
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(proxy).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let _ = s.write_all(&request);
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).to_string()
        })
    };
    // Huge headers are refused before anything is proxied.
    let mut huge = b"GET /big HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..2000 {
        huge.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(100)).as_bytes());
    }
    huge.extend_from_slice(b"\r\n");
    let refused = raw(huge).await.unwrap();
    assert!(
        refused.is_empty() || refused.starts_with("HTTP/1.1 4"),
        "{}",
        &refused[..refused.len().min(200)]
    );

    // CL.TE request smuggling: a conflicting Content-Length and Transfer-Encoding.
    let smuggle = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: evil\r\n\r\n".to_vec();
    let out = raw(smuggle).await.unwrap();
    let smuggled = upstream.seen().iter().any(|s| s.path.contains("smuggled"));
    assert!(!smuggled, "a smuggled request reached the upstream: {out}");

    // The token goes to the upstream and nowhere else: an upstream answer that does not echo
    // the request reaches the client with no token in it, although the upstream did get one.
    let r = reqwest::get(tw.url("/bytes/16")).await.unwrap();
    assert_eq!(r.status(), 200);
    let mut answer = format!("{:?}", r.headers());
    answer.push_str(&r.text().await.unwrap());
    let seen = upstream.seen();
    let got = seen
        .iter()
        .find(|s| s.path == "/bytes/16")
        .expect("the request reached the upstream");
    let token = provider.issued().last().cloned().unwrap();
    assert_eq!(
        got.all("authorization"),
        [format!("Bearer {token}").as_str()]
    );
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    let mut secrets = provider.issued();
    secrets.extend([CLIENT_SECRET.to_string(), basic.clone()]);
    for secret in &secrets {
        assert!(
            !answer.contains(secret.as_str()),
            "the client got a secret back: {answer}"
        );
        assert!(
            !refused.contains(secret.as_str()),
            "tokenward's own answer carries a secret: {refused}"
        );
    }
    // The client's secret never reaches the upstream, in any request.
    for s in &seen {
        for (name, value) in &s.headers {
            assert!(
                !value.contains(CLIENT_SECRET) && !value.contains(basic.as_str()),
                "{} carried the client secret in {name}",
                s.path
            );
        }
    }
    let admin = tw.get_text("/tokens").await;
    for secret in provider.issued() {
        assert!(!admin.contains(&secret));
    }
}
