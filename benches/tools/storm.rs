//! Start-up, memory and refresh-storm figures for `benches/README.md`, against a release
//! tokenward started here with one route and one credential:
//! - start to ready: from spawning the process to `/readyz` answering 200, against the fake
//!   provider's fixed latency (one provider round trip is part of it);
//! - RSS idle, then holding `--connections` keep-alive client connections;
//! - a burst of one request on each of those connections with a valid token (the baseline),
//!   then the same burst right after the token was dropped (`invalidate`), so every request
//!   waits for one refresh: provider calls, errors and latency percentiles of both.
//!
//! `storm TOKENWARD_BINARY [--connections 10000] [--provider-latency-ms 50]`
//! Everything listens on 127.0.0.1; every wait is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;

const ADMIN_TOKEN: &str = "storm-admin-token";
const BOUND: Duration = Duration::from_secs(60);

struct Args {
    binary: String,
    connections: usize,
    provider_latency: Duration,
}

fn args() -> Args {
    let mut it = std::env::args().skip(1);
    let Some(binary) = it.next() else {
        eprintln!("usage: storm TOKENWARD_BINARY [--connections N] [--provider-latency-ms MS]");
        std::process::exit(2);
    };
    let mut parsed = Args {
        binary,
        connections: 10_000,
        provider_latency: Duration::from_millis(50),
    };
    while let Some(flag) = it.next() {
        let value: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            eprintln!("{flag} needs a number");
            std::process::exit(2)
        });
        match flag.as_str() {
            "--connections" => parsed.connections = value as usize,
            "--provider-latency-ms" => parsed.provider_latency = Duration::from_millis(value),
            _ => {
                eprintln!("unknown flag {flag}");
                std::process::exit(2)
            }
        }
    }
    parsed
}

/// Serves `app` on a loopback port from its own thread, so its work never queues behind the
/// clients' on this runtime.
fn serve_on_own_thread(app: Router) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = TcpListener::from_std(listener).expect("listener");
            axum::serve(listener, app).await.expect("serve");
        });
    });
    addr
}

/// Waits until tokenward's RSS stops changing (it accepts and frees at its own pace), at most
/// 10 s.
async fn wait_for_rss_to_settle(pid: u32) {
    let mut last = rss_kib(pid);
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = rss_kib(pid);
        if now.abs_diff(last) < 256 {
            return;
        }
        last = now;
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One HTTP/1.1 exchange on `stream`, reading exactly the answer's Content-Length.
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> std::io::Result<u16> {
    stream.write_all(request).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed before the answer ended"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("no status"))?;
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| std::io::Error::other("no content-length"))?;
        while buf.len() < end + 4 + length {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::other("closed mid-body"));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        return Ok(status);
    }
}

async fn http(addr: SocketAddr, method: &str, path: &str, auth: bool) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let auth = if auth {
        format!("Authorization: Bearer {ADMIN_TOKEN}\r\n")
    } else {
        String::new()
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    exchange(&mut stream, request.as_bytes()).await.ok()
}

struct Burst {
    ok: usize,
    failed: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    wall: Duration,
}

/// One request on every connection, all released together; the connections are kept.
async fn burst(streams: Vec<TcpStream>, request: Arc<[u8]>) -> (Burst, Vec<TcpStream>) {
    let barrier = Arc::new(Barrier::new(streams.len() + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for mut stream in streams {
        let (barrier, request) = (barrier.clone(), request.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            let start = Instant::now();
            let status = tokio::time::timeout(BOUND, exchange(&mut stream, &request)).await;
            let ok = matches!(status, Ok(Ok(200)));
            (ok, start.elapsed(), stream)
        });
    }
    barrier.wait().await;
    let started = Instant::now();
    let (mut latencies, mut kept, mut failed) = (Vec::new(), Vec::new(), 0);
    while let Some(joined) = tasks.join_next().await {
        let (ok, latency, stream) = joined.expect("client task");
        if ok {
            latencies.push(latency);
            kept.push(stream);
        } else {
            failed += 1;
        }
    }
    let wall = started.elapsed();
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let summary = Burst {
        ok: latencies.len(),
        failed,
        p50: at(0.50),
        p99: at(0.99),
        max: latencies.last().copied().unwrap_or_default(),
        wall,
    };
    (summary, kept)
}

fn print_burst(name: &str, b: &Burst, calls: u64) {
    println!(
        "{name:<26} ok {:>6}  failed {:>4}  provider calls {calls:>2}  p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  burst wall {:>7.1} ms",
        b.ok,
        b.failed,
        b.p50.as_secs_f64() * 1e3,
        b.p99.as_secs_f64() * 1e3,
        b.max.as_secs_f64() * 1e3,
        b.wall.as_secs_f64() * 1e3,
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = args();
    // Both ends of every client connection live in this process and in tokenward.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let calls = Arc::new(AtomicU64::new(0));
    let latency = args.provider_latency;
    let counted = calls.clone();
    let provider = serve_on_own_thread(Router::new().route(
        "/token",
        post(move || {
            let counted = counted.clone();
            async move {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(latency).await;
                axum::Json(serde_json::json!({
                    "access_token": format!("storm-token-{n}"),
                    "token_type": "Bearer",
                    "expires_in": 3600,
                }))
            }
        }),
    ));
    let upstream = serve_on_own_thread(Router::new().route("/", get(|| async { "ok\n" })));

    let dir = tempfile::tempdir().expect("tempdir");
    let port = |l: std::net::TcpListener| l.local_addr().expect("addr").port();
    let listen_port = port(std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
    let admin_port = port(std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
    let config = dir.path().join("tokenward.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[log]
level = "warn"
[admin]
listen = "127.0.0.1:{admin_port}"
token = "{ADMIN_TOKEN}"
[state]
dir = "{state}"
[[routes]]
name = "storm"
listen = "127.0.0.1:{listen_port}"
upstream = "http://{upstream}"
credential = "storm"
[credentials.storm]
dialect = "oauth2"
token_url = "http://{provider}/token"
client_id = "storm"
client_secret = "storm-secret"
"#,
            state = dir.path().join("state").display(),
        ),
    )
    .expect("config");

    let started = Instant::now();
    let mut child = std::process::Command::new(&args.binary)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn tokenward");
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().expect("addr");
    let listen: SocketAddr = format!("127.0.0.1:{listen_port}").parse().expect("addr");
    let ready = loop {
        if http(admin, "GET", "/readyz", false).await == Some(200) {
            break started.elapsed();
        }
        assert!(started.elapsed() < BOUND, "tokenward not ready in time");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    println!(
        "start to ready             {:>7.1} ms  (provider latency {} ms; threads {})",
        ready.as_secs_f64() * 1e3,
        latency.as_millis(),
        std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .map(|d| d.count())
            .unwrap_or(0),
    );
    assert_eq!(
        http(listen, "GET", "/", false).await,
        Some(200),
        "first request"
    );
    // Let allocations made at start and by the first request settle into the resident set.
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "RSS idle, one route        {:>7.1} MiB",
        rss_kib(child.id()) as f64 / 1024.0
    );

    let mut streams = Vec::with_capacity(args.connections);
    let mut connecting = tokio::task::JoinSet::new();
    for batch in (0..args.connections).collect::<Vec<_>>().chunks(500) {
        for _ in batch {
            connecting.spawn(TcpStream::connect(listen));
        }
        while let Some(joined) = connecting.join_next().await {
            streams.push(joined.expect("task").expect("connect"));
        }
    }
    wait_for_rss_to_settle(child.id()).await;
    println!(
        "RSS with {:>6} connected   {:>7.1} MiB  (accepted, no request yet)",
        streams.len(),
        rss_kib(child.id()) as f64 / 1024.0
    );
    let request: Arc<[u8]> = format!("GET / HTTP/1.1\r\nHost: {listen}\r\n\r\n")
        .into_bytes()
        .into();
    let before = calls.load(Ordering::SeqCst);
    let (warm, streams) = burst(streams, request.clone()).await;
    print_burst(
        "burst, valid token",
        &warm,
        calls.load(Ordering::SeqCst) - before,
    );
    wait_for_rss_to_settle(child.id()).await;
    println!(
        "RSS with {:>6} keep-alive  {:>7.1} MiB  (each has made one request)",
        streams.len(),
        rss_kib(child.id()) as f64 / 1024.0
    );

    assert_eq!(
        http(admin, "POST", "/tokens/storm/invalidate", true).await,
        Some(200),
        "invalidate"
    );
    let before = calls.load(Ordering::SeqCst);
    let (storm, streams) = burst(streams, request).await;
    print_burst(
        "burst, token just dropped",
        &storm,
        calls.load(Ordering::SeqCst) - before,
    );
    println!(
        "storm p99 − valid-token p99 {:>6.1} ms  (provider latency {} ms)",
        (storm.p99.as_secs_f64() - warm.p99.as_secs_f64()) * 1e3,
        latency.as_millis()
    );
    drop(streams);
    let _ = child.kill();
    let _ = child.wait();
}
