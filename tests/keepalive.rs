//! Black-box tests of the upstream keep-alive pool: the idle timeout (a route setting, below the
//! 5 s many servers use, so tokenward closes a pooled connection before the upstream does), and
//! which failures on a reused connection are retried. The upstream here is a raw HTTP/1.1 server
//! so each test controls exactly when a connection is closed or reset.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the raw upstream does with the second request that arrives on one connection.
#[derive(Clone, Copy, PartialEq)]
enum Second {
    Serve,
    /// Reads and records the request, then resets the connection without answering: the request
    /// may have been acted on, so it must not be sent again unless its method is idempotent.
    ResetAfterRead,
}

#[derive(Default)]
struct RawLog {
    /// (connection, "METHOD /path") of every request read in full.
    requests: Vec<(usize, String)>,
    /// When each response was written, by connection.
    answered: Vec<(usize, Instant)>,
    /// When tokenward closed an idle connection, by connection.
    closed_by_peer: Vec<(usize, Instant)>,
}

#[derive(Clone)]
struct RawUpstream {
    addr: SocketAddr,
    log: Arc<Mutex<RawLog>>,
}

impl RawUpstream {
    /// `idle_close`: the upstream's own keep-alive timeout (it closes a connection idle that
    /// long); `None` keeps idle connections open (up to 60 s).
    async fn start(idle_close: Option<Duration>, second: Second) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(RawLog::default()));
        let shared = log.clone();
        tokio::spawn(async move {
            for conn in 0..1000 {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve_connection(
                    stream,
                    conn,
                    idle_close,
                    second,
                    shared.clone(),
                ));
            }
        });
        RawUpstream { addr, log }
    }

    fn requests(&self) -> Vec<(usize, String)> {
        self.log.lock().unwrap().requests.clone()
    }

    fn answered(&self, conn: usize) -> Option<Instant> {
        let log = self.log.lock().unwrap();
        log.answered
            .iter()
            .rev()
            .find(|(c, _)| *c == conn)
            .map(|x| x.1)
    }

    fn closed_by_peer(&self, conn: usize) -> Option<Instant> {
        let log = self.log.lock().unwrap();
        log.closed_by_peer
            .iter()
            .find(|(c, _)| *c == conn)
            .map(|x| x.1)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn serve_connection(
    mut s: tokio::net::TcpStream,
    conn: usize,
    idle_close: Option<Duration>,
    second: Second,
    log: Arc<Mutex<RawLog>>,
) {
    let mut buf: Vec<u8> = Vec::new();
    for n in 1..=100 {
        // Read one request head; while nothing of it has arrived the connection is idle.
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 8192];
            let idle = if buf.is_empty() {
                idle_close.unwrap_or(Duration::from_secs(60))
            } else {
                Duration::from_secs(10)
            };
            match tokio::time::timeout(idle, s.read(&mut chunk)).await {
                Err(_) => return, // our own idle timeout: close (FIN)
                Ok(Ok(0)) | Ok(Err(_)) => {
                    if buf.is_empty() {
                        log.lock()
                            .unwrap()
                            .closed_by_peer
                            .push((conn, Instant::now()));
                    }
                    return;
                }
                Ok(Ok(k)) => buf.extend_from_slice(&chunk[..k]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let request_line = head.lines().next().unwrap_or("").to_string();
        let length: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
                Ok(Ok(k)) if k > 0 => buf.extend_from_slice(&chunk[..k]),
                _ => return,
            }
        }
        buf.drain(..head_end + length);
        let mut parts = request_line.split(' ');
        let what = format!(
            "{} {}",
            parts.next().unwrap_or(""),
            parts.next().unwrap_or("")
        );
        log.lock().unwrap().requests.push((conn, what));
        if n == 2 && second == Second::ResetAfterRead {
            let _ = s.set_zero_linger();
            return;
        }
        let body = format!("conn={conn} request={n}");
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(response.as_bytes()).await.is_err() {
            return;
        }
        log.lock().unwrap().answered.push((conn, Instant::now()));
    }
}

async fn wait_for<T>(what: &str, within: Duration, f: impl Fn() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `config` with `line` added to its route.
fn with_route_setting(config: &str, line: &str) -> String {
    let anchor = "credential = \"api\"\n";
    assert!(config.contains(anchor));
    config.replacen(anchor, &format!("{anchor}{line}\n"), 1)
}

/// Tokenward in front of `upstream`, its route carrying `line`.
fn start_with_route_setting(
    upstream: SocketAddr,
    provider: &FakeProvider,
    line: &str,
) -> Tokenward {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = (free_port(), free_port());
    let path = dir.path().join("tokenward.toml");
    let text = config(
        proxy,
        admin,
        &format!("http://{upstream}"),
        &dir.path().join("state"),
        &oauth2_keys(provider, ""),
    );
    std::fs::write(&path, with_route_setting(&text, line)).unwrap();
    Tokenward::start_with(dir, path, proxy, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pooled_upstream_connections_close_after_the_route_idle_timeout() {
    let upstream = RawUpstream::start(None, Second::Serve).await;
    let provider = FakeProvider::start(300, false, None).await;
    let tw = Tokenward::start(
        &format!("http://{}", upstream.addr),
        &oauth2_keys(&provider, ""),
    );
    tw.wait_ready().await;
    let client = reqwest::Client::new();

    // The default is below the 5 s of Node and many others, so tokenward closes first.
    let r = client.get(tw.url("/one")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let answered = upstream.answered(0).expect("the upstream answered");
    let closed = wait_for(
        "tokenward to close the idle upstream connection",
        Duration::from_secs(8),
        || upstream.closed_by_peer(0),
    )
    .await;
    let idle = closed - answered;
    assert!(
        idle >= Duration::from_millis(3500) && idle < Duration::from_millis(5000),
        "the default idle timeout is 4s; the connection was closed after {idle:?}"
    );

    // A route setting, applied by a reload.
    let text = std::fs::read_to_string(&tw.config_path).unwrap();
    std::fs::write(
        &tw.config_path,
        with_route_setting(&text, "idle_timeout = \"1s\""),
    )
    .unwrap();
    let before = tw.logs().len();
    tw.signal("HUP");
    wait_for("the reload", Duration::from_secs(5), || {
        tw.logs()[before..]
            .contains("configuration reloaded")
            .then_some(())
    })
    .await;
    let r = client.get(tw.url("/two")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let conn: usize = body
        .strip_prefix("conn=")
        .and_then(|b| b.split(' ').next())
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("unexpected body {body:?}"));
    let answered = upstream.answered(conn).unwrap();
    let closed = wait_for(
        "tokenward to close the idle upstream connection",
        Duration::from_secs(5),
        || upstream.closed_by_peer(conn),
    )
    .await;
    let idle = closed - answered;
    assert!(
        idle >= Duration::from_millis(800) && idle < Duration::from_millis(2000),
        "idle_timeout = 1s; the connection was closed after {idle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_post_after_the_upstream_closed_the_pooled_connection_succeeds() {
    // The upstream's keep-alive (1 s) is shorter than the route's idle_timeout (10 s): the
    // pool must notice the upstream's close and not send the POST into that connection. (This
    // held before idle_timeout existed too; it guards the behaviour the default relies on.)
    let upstream = RawUpstream::start(Some(Duration::from_secs(1)), Second::Serve).await;
    let provider = FakeProvider::start(300, false, None).await;
    let tw = start_with_route_setting(upstream.addr, &provider, "idle_timeout = \"10s\"");
    tw.wait_ready().await;
    let client = reqwest::Client::new();
    let r = client.get(tw.url("/first")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = client
        .post(tw.url("/second"))
        .body("payload")
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 200, "{}", r.text().await.unwrap());
    assert_eq!(
        upstream
            .requests()
            .iter()
            .filter(|(_, w)| w == "POST /second")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_post_the_upstream_read_is_never_sent_twice() {
    let upstream = RawUpstream::start(None, Second::ResetAfterRead).await;
    let provider = FakeProvider::start(300, false, None).await;
    // One proxy thread: each has its own upstream pool, and the client may send a request on
    // a new connection (hyper returns one to its pool a moment after the answer), which on
    // two threads could reach the thread whose pool holds nothing to reuse.
    let tw = Tokenward::start_in_env(
        &format!("http://{}", upstream.addr),
        &oauth2_keys(&provider, ""),
        &[("TOKENWARD_SERVER__THREADS", "1")],
    );
    tw.wait_ready().await;
    let client = reqwest::Client::new();
    assert_eq!(
        client.get(tw.url("/first")).send().await.unwrap().status(),
        200
    );
    // The pooled connection is reused, the upstream reads the POST and resets the connection
    // without an answer: it may have acted on it, so the client gets a 502, not a duplicate.
    let r = client
        .post(tw.url("/pay"))
        .body("once")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        502,
        "upstream saw {:?}; tokenward logged:\n{}",
        upstream.requests(),
        tw.logs()
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "upstream_unavailable");
    let requests = upstream.requests();
    assert_eq!(
        requests.iter().filter(|(_, w)| w == "POST /pay").count(),
        1,
        "{requests:?}"
    );
    assert_eq!(
        requests[1].0, requests[0].0,
        "the POST went on the reused connection"
    );

    // The same failure for a GET is retried (on a new connection) and succeeds. A new client:
    // tokenward closes the client connection after an error response.
    let client = reqwest::Client::new();
    let r = client.get(tw.url("/again")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client.get(tw.url("/idempotent")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let requests = upstream.requests();
    assert_eq!(
        requests
            .iter()
            .filter(|(_, w)| w == "GET /idempotent")
            .count(),
        2,
        "{requests:?}"
    );
}

/// An upstream that reads each request head and then answers per connection: the first
/// connection never, the others with a head and 3 of the 10 body bytes it announces.
async fn stalling_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if read_request_head(&mut conn, &mut Vec::new())
                    .await
                    .is_none()
                {
                    return;
                }
                if n > 0 {
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                        .await;
                }
                // Holds the connection open, silent, until tokenward gives up on it.
                let _ = conn.read(&mut [0u8; 1]).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_upstream_is_given_up_at_the_route_read_timeout() {
    let upstream = stalling_upstream().await;
    let provider = FakeProvider::start(300, false, None).await;
    let tw = start_with_route_setting(upstream, &provider, "read_timeout = \"1s\"");
    tw.wait_ready().await;
    // Bounded: without the read timeout these would wait for ever.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // No answer head: a JSON 502 naming the timeout, after the route's read timeout.
    let asked = Instant::now();
    let r = client.get(tw.url("/head")).send().await.unwrap();
    let waited = asked.elapsed();
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert!(body.contains("ReadTimedout"), "{body}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "gave up after {waited:?}"
    );

    // The head came, the body stalls: the answer is cut (its length was promised) once the
    // upstream has been silent for the read timeout.
    let asked = Instant::now();
    let r = client.get(tw.url("/body")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await;
    let waited = asked.elapsed();
    assert!(
        body.is_err(),
        "a cut answer must not read as whole: {body:?}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "cut after {waited:?}"
    );
    let logs = tw.logs();
    assert!(logs.contains("ReadTimedout"), "{logs}");
}

/// An upstream that answers each request with its head one byte every 50 ms (2 s in all),
/// then a 2-byte body.
async fn trickling_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut conn, &mut Vec::new())
                    .await
                    .is_none()
                {
                    return;
                }
                let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Slow: yes\r\n\r\n";
                for byte in answer {
                    if conn.write_all(&[*byte]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = conn.write_all(b"ok").await;
                let _ = conn.read(&mut [0u8; 1]).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_timeout_limits_each_read_not_a_head_that_keeps_arriving() {
    // As pingora-proxy and nginx's proxy_read_timeout: the limit is on the time between two
    // reads. A head that takes 2 s, a byte every 50 ms, passes a 1 s read timeout.
    let upstream = trickling_upstream().await;
    let provider = FakeProvider::start(300, false, None).await;
    let tw = start_with_route_setting(upstream, &provider, "read_timeout = \"1s\"");
    tw.wait_ready().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let asked = Instant::now();
    let r = client.get(tw.url("/slow")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(r.text().await.unwrap(), "ok");
    assert!(asked.elapsed() >= Duration::from_millis(1500));
}
