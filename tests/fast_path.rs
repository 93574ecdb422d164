//! Black-box tests of the lean HTTP/1 path (`server.http1_fast_path`): that plain requests take
//! it, that it answers exactly as the `ProxyHttp` path does, and that what it does not serve
//! (routes a reload gave per-caller features) reaches the `ProxyHttp` path on the same connection.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Tokenward in front of `upstream` with `server.http1_fast_path` set through the environment
/// (which overrides the file, and whatever the test run itself sets), once ready. It runs the
/// default single proxy thread (tokio's single-threaded runtime), where the harness config
/// runs two.
async fn with_fast_path(upstream: &str, provider: &FakeProvider, on: bool) -> Tokenward {
    let value = if on { "true" } else { "false" };
    let tw = Tokenward::start_in_env(
        upstream,
        &oauth2_keys(provider, ""),
        &[
            ("TOKENWARD_SERVER__HTTP1_FAST_PATH", value),
            ("TOKENWARD_SERVER__THREADS", "1"),
        ],
    );
    tw.wait_ready().await;
    tw
}

async fn fast_path_count(tw: &Tokenward) -> u64 {
    let metrics = tw.get_text("/metrics").await;
    metrics
        .lines()
        .find(|l| l.starts_with("tokenward_fast_path_requests_total{route=\"api\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no fast path counter in:\n{metrics}"))
}

/// Writes `head` (and `body` once the proxy asks for it with a 100 when `expect` is set) on a
/// new connection and reads the answer to the end; `Connection: close` ends it.
async fn raw(proxy: SocketAddr, head: &str, body: &[u8], expect: bool) -> String {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    if expect {
        let mut buf = [0u8; 25];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .expect("no 100 Continue")
            .unwrap();
        assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    s.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("the answer did not end")
        .unwrap();
    String::from_utf8_lossy(&answer).to_string()
}

/// The JSON body of a `Connection: close` answer from the fake upstream.
fn json_body(answer: &str) -> serde_json::Value {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // One data chunk, then the last.
        body.split("\r\n").nth(1).unwrap().to_string()
    } else {
        body.to_string()
    };
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

/// What the upstream saw of each request, keyed by what the test sent, with its answer.
async fn run_requests(fast_path: bool) -> (BTreeMap<&'static str, serde_json::Value>, u64) {
    let provider = FakeProvider::start(300, false, None).await;
    let upstream = FakeUpstream::start().await;
    let tw = with_fast_path(&format!("http://{}", upstream.addr()), &provider, fast_path).await;
    let proxy = tw.proxy;

    let mut seen = BTreeMap::new();
    let hops = "GET /hops HTTP/1.1\r\nHost: app\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n\
                Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n\
                Authorization: Bearer the-callers-own\r\nX-Kept: 2\r\n\r\n";
    seen.insert("hop-by-hop", json_body(&raw(proxy, hops, b"", false).await));
    let sized =
        "POST /sized HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nConnection: close\r\n\r\n";
    seen.insert(
        "content-length",
        json_body(&raw(proxy, sized, b"12345", false).await),
    );
    let chunked = "POST /chunked HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let body = b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n";
    seen.insert(
        "chunked",
        json_body(&raw(proxy, chunked, body, false).await),
    );
    let expect = "PUT /continue HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 6\r\nConnection: close\r\n\r\n";
    seen.insert(
        "expect",
        json_body(&raw(proxy, expect, b"abcdef", true).await),
    );
    let old = "GET /old HTTP/1.0\r\nHost: app\r\n\r\n";
    seen.insert("http/1.0", json_body(&raw(proxy, old, b"", false).await));
    let absolute = "GET http://elsewhere.example/abs?q=1 HTTP/1.1\r\nHost: elsewhere.example\r\nConnection: close\r\n\r\n";
    seen.insert(
        "absolute-form",
        json_body(&raw(proxy, absolute, b"", false).await),
    );

    // Keep-alive: many requests on one connection, each with the token.
    let client = reqwest::Client::new();
    for i in 0..20 {
        let r = client.get(tw.url(&format!("/k/{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let token = format!("Bearer {}", provider.issued()[0]);
    for s in upstream.seen() {
        assert_eq!(s.all("authorization"), vec![token.as_str()], "{s:?}");
    }
    let counted = fast_path_count(&tw).await;
    (seen, counted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fast_path_serves_plain_requests_exactly_as_the_full_path_does() {
    let (lean, lean_count) = run_requests(true).await;
    let (full, full_count) = run_requests(false).await;
    assert_eq!(lean_count, 26, "every request took the fast path");
    assert_eq!(full_count, 0, "with the fast path off, none did");

    let hops = lean["hop-by-hop"]["headers"].as_object().unwrap();
    for gone in [
        "x-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "connection",
    ] {
        assert!(
            !hops.contains_key(gone),
            "{gone} reached the upstream: {hops:?}"
        );
    }
    assert_eq!(hops["x-kept"], "2");
    assert!(
        !hops["authorization"]
            .as_str()
            .unwrap()
            .contains("the-callers-own"),
        "{hops:?}"
    );
    assert_eq!(lean["content-length"]["body_bytes"], 5);
    assert_eq!(lean["chunked"]["body_bytes"], 7);
    assert_eq!(lean["expect"]["body_bytes"], 6);
    assert!(
        !lean["expect"]["headers"]
            .as_object()
            .unwrap()
            .contains_key("expect")
    );
    assert_eq!(lean["absolute-form"]["path"], "/abs?q=1");

    // The same request reaches the upstream the same way from either path: the same path,
    // version, fields and body (the token and the upstream's port aside, which differ per run).
    for (case, lean_seen) in &lean {
        let full_seen = &full[case];
        let fields = |v: &serde_json::Value| {
            let mut h = v["headers"].as_object().unwrap().clone();
            h.remove("authorization");
            h.remove("host");
            // The one difference: the fast path answers a client's 100-continue itself, as
            // nginx does, where pingora-proxy passes Expect on and relays the upstream's 100.
            h.remove("expect");
            h
        };
        assert_eq!(
            (
                &lean_seen["path"],
                &lean_seen["version"],
                &lean_seen["body_bytes"]
            ),
            (
                &full_seen["path"],
                &full_seen["version"],
                &full_seen["body_bytes"]
            ),
            "{case}"
        );
        assert_eq!(fields(lean_seen), fields(full_seen), "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_websocket_upgrade_after_plain_requests_on_one_connection_is_served_lean() {
    let provider = FakeProvider::start(300, false, None).await;
    let (addr, heads) = upgrade_echo_upstream().await;
    let tw = with_fast_path(&format!("http://{addr}"), &provider, true).await;
    let proxy = tw.proxy;

    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /plain HTTP/1.1\r\nHost: app\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut s, b"plain").await;
    }
    assert_eq!(fast_path_count(&tw).await, 2);
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(&mut s, b"\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    s.write_all(b"frames both ways").await.unwrap();
    assert_eq!(
        read_until(&mut s, b"frames both ways").await,
        "frames both ways"
    );
    assert_eq!(
        fast_path_count(&tw).await,
        3,
        "the upgrade was not counted as served lean"
    );
    let heads = heads.lock().unwrap().clone();
    let token = format!("authorization: bearer {}", provider.issued()[0]);
    assert_eq!(heads.len(), 3, "{heads:?}");
    assert!(heads.iter().all(|h| h.contains(&token)), "{heads:?}");
    assert!(heads[2].contains("upgrade: websocket"), "{heads:?}");
}

/// Sends one request on an open connection and reads its answer: head, then a body of the
/// length it declares.
async fn exchange_on(s: &mut tokio::net::TcpStream, request: &[u8]) -> String {
    s.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + length {
                return String::from_utf8_lossy(&got).to_string();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert!(
            n > 0,
            "closed before the answer: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

/// Whether the proxy closed the connection (it is read to its end within 5 s).
async fn closed(s: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_a_reload_takes_off_the_fast_path_is_served_by_the_full_path_at_once() {
    let provider = FakeProvider::start(300, false, None).await;
    let upstream = FakeUpstream::start().await;
    let tw = with_fast_path(&format!("http://{}", upstream.addr()), &provider, true).await;
    let proxy = tw.proxy;

    // Two keep-alive connections, each in the fast path's loop.
    let get = b"GET /before HTTP/1.1\r\nHost: app\r\n\r\n";
    let mut quiet = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let mut with_body = tokio::net::TcpStream::connect(proxy).await.unwrap();
    for s in [&mut quiet, &mut with_body] {
        assert!(exchange_on(s, get).await.starts_with("HTTP/1.1 200"));
    }
    assert_eq!(fast_path_count(&tw).await, 2);

    // The route's credential becomes a per-caller exchange, which only the full path serves.
    let offset = tw.logs().len();
    rewrite_config(
        &tw,
        "dialect = \"oauth2\"",
        "dialect = \"oauth2\"\ngrant = \"token_exchange\"\naudience = \"api://orders\"",
    );
    tw.signal("HUP");
    wait_for("the reload", Duration::from_secs(10), || {
        tw.logs()[offset..].contains("configuration reloaded")
    })
    .await;

    // A request without a body is handed over on its connection: the full path asks for the
    // caller's token (a 401 the fast path cannot give), and nothing goes upstream.
    let seen_before = upstream.seen().len();
    let answer = exchange_on(&mut quiet, b"GET /after HTTP/1.1\r\nHost: app\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("missing_subject_token"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("connection: keep-alive"),
        "{answer}"
    );
    // The connection lives on after the handed-over answer, as it says.
    let answer = exchange_on(&mut quiet, b"GET /again HTTP/1.1\r\nHost: app\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    // One whose body was already being read cannot be handed over: a JSON 503 with Retry-After,
    // and the connection closes so the client's retry takes a new one.
    let post = b"POST /after HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello";
    let answer = exchange_on(&mut with_body, post).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(answer.contains("route_changed"), "{answer}");
    assert!(closed(&mut with_body).await);

    // That retry, on a new connection, goes to the full path.
    let mut fresh = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let answer = exchange_on(&mut fresh, post).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("missing_subject_token"), "{answer}");
    assert_eq!(
        upstream.seen().len(),
        seen_before,
        "nothing went upstream without its token"
    );
    assert_eq!(fast_path_count(&tw).await, 2);
}

/// An upstream written by hand, for what a framework would not send: `/close` answers with a
/// body that ends with the connection, `/hints` with a 103 before its 200.
async fn hand_written_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(head) = read_request_head(&mut s, &mut got).await {
                    if head.starts_with("get /close ") {
                        let _ = s
                            .write_all(
                                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nclose-delimited body",
                            )
                            .await;
                        return;
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    addr
}

/// Reads one answer's bytes on `s` up to and including `end`.
async fn read_until(s: &mut tokio::net::TcpStream, end: &[u8]) -> String {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !got.windows(end.len()).any(|w| w == end) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {end:?} in {:?}", String::from_utf8_lossy(&got)))
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn close_delimited_answers_become_chunked_and_early_hints_are_relayed_on_both_paths() {
    let provider = FakeProvider::start(300, false, None).await;
    let upstream = hand_written_upstream().await;
    for on in [true, false] {
        let tw = with_fast_path(&format!("http://{upstream}"), &provider, on).await;
        let mut s = tokio::net::TcpStream::connect(tw.proxy).await.unwrap();
        // The client connection outlives the upstream's: the body is re-framed as chunked.
        s.write_all(b"GET /close HTTP/1.1\r\nHost: app\r\n\r\n")
            .await
            .unwrap();
        let answer = read_until(&mut s, b"0\r\n\r\n").await;
        let lower = answer.to_ascii_lowercase();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "fast path {on}: {answer}"
        );
        assert!(
            lower.contains("transfer-encoding: chunked"),
            "fast path {on}: {answer}"
        );
        assert!(
            answer.contains("close-delimited body"),
            "fast path {on}: {answer}"
        );
        // The same connection then carries a 103 and its 200.
        s.write_all(b"GET /hints HTTP/1.1\r\nHost: app\r\n\r\n")
            .await
            .unwrap();
        let answer = read_until(&mut s, b"\r\n\r\nok").await;
        assert!(
            answer.starts_with("HTTP/1.1 103"),
            "fast path {on}: {answer}"
        );
        assert!(
            answer.contains("</app.css>; rel=preload"),
            "fast path {on}: {answer}"
        );
        assert!(answer.contains("HTTP/1.1 200"), "fast path {on}: {answer}");
        assert_eq!(fast_path_count(&tw).await, if on { 2 } else { 0 });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn turning_the_fast_path_off_by_reload_is_refused_naming_the_key() {
    let (_provider, _upstream, tw) = oauth2_setup(300, "").await;
    tw.wait_ready().await;
    let offset = tw.logs().len();
    rewrite_config(&tw, "[server]\n", "[server]\nhttp1_fast_path = false\n");
    tw.signal("HUP");
    wait_for("the refusal", Duration::from_secs(10), || {
        tw.logs()[offset..].contains("take effect only at start")
    })
    .await;
    let logs = tw.logs()[offset..].to_string();
    assert!(logs.contains("server.http1_fast_path"), "{logs}");
    assert!(!logs.contains("configuration reloaded"), "{logs}");
    let r = reqwest::get(tw.url("/still-served")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        fast_path_count(&tw).await,
        1,
        "the running config keeps its fast path"
    );
}
