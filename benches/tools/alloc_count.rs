//! Heap allocations per plain proxied request (issue 20): tokenward runs in this process, as
//! `tokenward run` would with the bench route of `benches/load.sh`, behind a counting global
//! allocator. Its upstream and its clients are threads of this process that never allocate per
//! request and are left out of the count, so the figures are the proxy's own.
//!
//! - upstream: std threads, one per keep-alive connection, answering every request with a fixed
//!   `200` and `ok\n`; each request must carry `Authorization: Bearer …`;
//! - token: the demo provider (`tokenward dev --component provider`) as an extra service of the
//!   same server, 1-hour tokens, so no refresh falls in the measured window;
//! - clients: `--connections` std threads on keep-alive connections, fixed request bytes, a fixed
//!   read buffer, Content-Length parsed by hand; every answer must be a 200 with `ok\n`.
//!
//! After `--warmup` requests the counters are read, then `--requests` more are made and the
//! counters are read again. The tool exits non-zero when an answer is wrong, the upstream saw a
//! request without its token or a different number of requests, or a phase outlasts 60 s.
//!
//! `alloc_count [--requests 20000] [--warmup 2000] [--connections 8] [--threads 1]
//!              [--fast-path true|false]`
//! The config is an ordinary file loaded with the environment overrides of `tokenward run`, so
//! `TOKENWARD_SERVER__THREADS=4` works too. Everything listens on 127.0.0.1.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A whole phase (warm-up or measurement) must end within this.
const PHASE_LIMIT: Duration = Duration::from_secs(60);
/// No single read or write on a bench socket waits longer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Large enough for any request or answer head of this bench.
const BUFFER: usize = 8192;
const BODY: &[u8] = b"ok\n";
const ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";

// The counting allocator. This bench tool is the one place with `unsafe`: implementing
// `GlobalAlloc` cannot be done otherwise. Each method only forwards its arguments unchanged to
// `System`, whose contract is the same as the trait's, and adds relaxed atomic increments; the
// library itself keeps `#![forbid(unsafe_code)]`.

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);
static REALLOC_BYTES: AtomicU64 = AtomicU64::new(0);
static FREES: AtomicU64 = AtomicU64::new(0);
/// Allocations of at least `LARGE` bytes (buffers, mostly), counted apart as well.
static LARGE_ALLOCS: AtomicU64 = AtomicU64::new(0);
static LARGE_ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);
const LARGE: usize = 4096;
/// The first few distinct sizes of large allocations in the measured phase (from `SIZES_ARMED`
/// on, so that start-up's sizes do not fill the table) and how often each was asked for: which
/// buffers a request costs. A size not fitting in the table is counted only in the totals.
static SIZES_ARMED: AtomicBool = AtomicBool::new(false);
static LARGE_SIZES: [(AtomicU64, AtomicU64); 8] =
    [const { (AtomicU64::new(0), AtomicU64::new(0)) }; 8];

fn count_large_size(size: u64) {
    for (slot, count) in &LARGE_SIZES {
        let taken = match slot.compare_exchange(0, size, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => true,
            Err(current) => current == size,
        };
        if taken {
            count.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

thread_local! {
    /// Set on the bench's own threads (main, upstream, clients). Const-initialised and without
    /// a destructor, it is a plain thread-local slot: reading it never allocates, so the
    /// allocator may read it.
    static NOT_COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn counted() -> bool {
    NOT_COUNTED.try_with(|c| !c.get()).unwrap_or(false)
}

/// Leaves the calling thread's allocations out of the counts.
fn not_counted() {
    NOT_COUNTED.with(|c| c.set(true));
}

fn count_alloc(size: usize) {
    if counted() {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(size as u64, Ordering::Relaxed);
        if size >= LARGE {
            LARGE_ALLOCS.fetch_add(1, Ordering::Relaxed);
            LARGE_ALLOC_BYTES.fetch_add(size as u64, Ordering::Relaxed);
            if SIZES_ARMED.load(Ordering::Relaxed) {
                count_large_size(size as u64);
            }
        }
    }
}

struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments, so `System`'s
// guarantees are ours; the counters are atomics and the thread-local read cannot allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_alloc(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_alloc(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counted() {
            REALLOCS.fetch_add(1, Ordering::Relaxed);
            REALLOC_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        }
        // SAFETY: `ptr` and `layout` come from this allocator, which is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if counted() {
            FREES.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as for `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Clone, Copy)]
struct Counts {
    allocs: u64,
    alloc_bytes: u64,
    reallocs: u64,
    realloc_bytes: u64,
    frees: u64,
    large_allocs: u64,
    large_alloc_bytes: u64,
    large_sizes: [(u64, u64); 8],
}

fn counts() -> Counts {
    Counts {
        allocs: ALLOCS.load(Ordering::Relaxed),
        alloc_bytes: ALLOC_BYTES.load(Ordering::Relaxed),
        reallocs: REALLOCS.load(Ordering::Relaxed),
        realloc_bytes: REALLOC_BYTES.load(Ordering::Relaxed),
        frees: FREES.load(Ordering::Relaxed),
        large_allocs: LARGE_ALLOCS.load(Ordering::Relaxed),
        large_alloc_bytes: LARGE_ALLOC_BYTES.load(Ordering::Relaxed),
        large_sizes: std::array::from_fn(|i| {
            let (size, count) = &LARGE_SIZES[i];
            (size.load(Ordering::Relaxed), count.load(Ordering::Relaxed))
        }),
    }
}

/// What the upstream saw: requests with a bearer token and requests without one.
static UPSTREAM_WITH_TOKEN: AtomicU64 = AtomicU64::new(0);
static UPSTREAM_WITHOUT_TOKEN: AtomicU64 = AtomicU64::new(0);

struct Args {
    requests: u64,
    warmup: u64,
    connections: usize,
    threads: usize,
    fast_path: bool,
}

fn fail(message: &str) -> ! {
    eprintln!("alloc_count: {message}");
    std::process::exit(1)
}

fn args() -> Args {
    let mut parsed = Args {
        requests: 20_000,
        warmup: 2_000,
        connections: 8,
        threads: 1,
        fast_path: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            fail(&format!("{flag} needs a value"))
        };
        let number = || -> u64 {
            value
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .unwrap_or_else(|| fail(&format!("{flag}: {value:?} is not a positive number")))
        };
        match flag.as_str() {
            "--requests" => parsed.requests = number(),
            "--warmup" => parsed.warmup = number(),
            "--connections" => parsed.connections = number() as usize,
            "--threads" => parsed.threads = number() as usize,
            "--fast-path" => {
                parsed.fast_path = value
                    .parse()
                    .unwrap_or_else(|_| fail(&format!("--fast-path: {value:?} is not true/false")))
            }
            _ => fail(&format!(
                "unknown flag {flag}; usage: alloc_count [--requests N] [--warmup N] \
                 [--connections N] [--threads N] [--fast-path true|false]"
            )),
        }
    }
    parsed
}

/// A loopback port free at the time of asking (tokenward binds its listeners itself).
fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| fail(&format!("bind: {e}")));
    listener
        .local_addr()
        .unwrap_or_else(|e| fail(&format!("{e}")))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whether `head` (a request or answer head) has the field `name` (lower case, with its colon),
/// and the value after it.
fn field<'a>(head: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    head.split(|b| *b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        (line.len() >= name.len() && line[..name.len()].eq_ignore_ascii_case(name))
            .then(|| line[name.len()..].trim_ascii())
    })
}

fn has_bearer_token(head: &[u8]) -> bool {
    field(head, b"authorization:").is_some_and(|value| {
        value.len() > b"bearer ".len() && value[..b"bearer ".len()].eq_ignore_ascii_case(b"bearer ")
    })
}

/// Serves one upstream connection: reads request heads (GETs, no body) into a fixed buffer and
/// answers each with `ANSWER`, until the proxy closes it.
fn upstream_connection(mut stream: TcpStream) {
    not_counted();
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; BUFFER];
    let mut filled = 0;
    loop {
        while let Some(end) = find(&buf[..filled], b"\r\n\r\n") {
            let head = &buf[..end + 4];
            if has_bearer_token(head) {
                UPSTREAM_WITH_TOKEN.fetch_add(1, Ordering::Relaxed);
            } else {
                UPSTREAM_WITHOUT_TOKEN.fetch_add(1, Ordering::Relaxed);
            }
            if field(head, b"content-length:").is_some_and(|v| v != b"0")
                || field(head, b"transfer-encoding:").is_some()
            {
                fail("the upstream got a request with a body; this bench sends none");
            }
            if stream.write_all(ANSWER).is_err() {
                return;
            }
            buf.copy_within(end + 4..filled, 0);
            filled -= end + 4;
        }
        if filled == buf.len() {
            fail("a request head larger than the upstream's buffer");
        }
        match stream.read(&mut buf[filled..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => filled += n,
        }
    }
}

fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| fail(&format!("bind: {e}")));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| fail(&format!("{e}")));
    std::thread::spawn(move || {
        not_counted();
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || upstream_connection(stream));
        }
    });
    addr
}

/// Makes one request on `stream` and checks its answer: a 200 whose body is `ok\n`.
fn exchange(stream: &mut TcpStream, request: &[u8], buf: &mut [u8; BUFFER]) -> Result<(), String> {
    stream
        .write_all(request)
        .map_err(|e| format!("write: {e}"))?;
    let mut filled = 0;
    let end = loop {
        if let Some(end) = find(&buf[..filled], b"\r\n\r\n") {
            break end + 4;
        }
        if filled == buf.len() {
            return Err("an answer head larger than the client's buffer".into());
        }
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err("the proxy closed the connection".into()),
            Ok(n) => filled += n,
            Err(e) => return Err(format!("read: {e}")),
        }
    };
    let head = &buf[..end];
    if !head.starts_with(b"HTTP/1.1 200 ") {
        let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
        return Err(format!("answer {:?}", String::from_utf8_lossy(line)));
    }
    let length: usize = field(head, b"content-length:")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
        .ok_or("an answer without a Content-Length")?;
    if length != BODY.len() {
        return Err(format!("a body of {length} bytes, not {}", BODY.len()));
    }
    while filled < end + length {
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err("the proxy closed the connection in a body".into()),
            Ok(n) => filled += n,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    if filled != end + length {
        return Err("bytes after the answer that nobody asked for".into());
    }
    if &buf[end..filled] != BODY {
        return Err("a body other than `ok\\n`".into());
    }
    Ok(())
}

/// Makes `total` requests spread over the keep-alive `streams`, one client thread per stream.
fn phase(name: &str, streams: &mut [TcpStream], request: &[u8], total: u64) {
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let deadline = Instant::now() + PHASE_LIMIT;
    std::thread::scope(|scope| {
        for stream in streams.iter_mut() {
            scope.spawn(|| {
                not_counted();
                let mut buf = [0u8; BUFFER];
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    if Instant::now() > deadline {
                        failed.store(true, Ordering::Relaxed);
                        eprintln!("alloc_count: {name}: not done within {PHASE_LIMIT:?}");
                        return;
                    }
                    if let Err(e) = exchange(stream, request, &mut buf) {
                        failed.store(true, Ordering::Relaxed);
                        eprintln!("alloc_count: {name}: {e}");
                        return;
                    }
                }
            });
        }
    });
    if failed.load(Ordering::Relaxed) {
        std::process::exit(1);
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| fail(&format!("connect {addr}: {e}")));
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_nodelay(true);
    stream
}

/// Waits (at most 10 s) until the admin listener's `/readyz` answers 200: the token is in.
fn wait_ready(admin: SocketAddr) {
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(mut stream) = TcpStream::connect_timeout(&admin, Duration::from_millis(200)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            let mut answer = Vec::new();
            if stream.write_all(request.as_bytes()).is_ok()
                && stream.read_to_end(&mut answer).is_ok()
                && answer.starts_with(b"HTTP/1.1 200")
            {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    fail(&format!(
        "tokenward not ready within 10 s (http://{admin}/readyz)"
    ))
}

fn per_request(value: u64, requests: u64) -> f64 {
    value as f64 / requests as f64
}

fn main() {
    not_counted();
    let args = args();
    let upstream = start_upstream();
    let (proxy, admin, provider) = (free_port(), free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("alloc_count-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(&format!("{}: {e}", dir.display())));
    // The route and credential of benches/tools/bench_route.sh.
    let text = format!(
        r#"[server]
threads = {threads}
http1_fast_path = {fast_path}
[log]
level = "warn"
[admin]
listen = "{admin}"
[state]
dir = "{state}"
[[routes]]
name = "bench"
listen = "{proxy}"
upstream = "http://{upstream}"
credential = "bench"
[credentials.bench]
dialect = "oauth2"
token_url = "http://{provider}/oauth2/token"
client_id = "demo"
client_secret = "demo-secret"
"#,
        threads = args.threads,
        fast_path = args.fast_path,
        state = dir.join("state").display(),
    );
    let path = dir.join("alloc_count.toml");
    std::fs::write(&path, text).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
    let config = tokenward::config::Config::load(&path).unwrap_or_else(|e| fail(&e.to_string()));
    tokenward::telemetry::init(config.log_format, &config.log_level);
    let (threads, fast_path) = (config.threads, config.http1_fast_path);
    std::thread::spawn(move || {
        let extra = vec![tokenward::dev::provider_service(
            provider,
            Duration::from_secs(3600),
        )];
        if let Err(e) = tokenward::server::run(config, extra) {
            fail(&format!("tokenward cannot start: {e:#}"));
        }
    });
    wait_ready(admin);

    let request = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n", proxy.port());
    let mut streams: Vec<TcpStream> = (0..args.connections).map(|_| connect(proxy)).collect();
    phase("warm-up", &mut streams, request.as_bytes(), args.warmup);
    let upstream_before = UPSTREAM_WITH_TOKEN.load(Ordering::Relaxed);
    SIZES_ARMED.store(true, Ordering::Relaxed);
    let before = counts();
    phase(
        "measurement",
        &mut streams,
        request.as_bytes(),
        args.requests,
    );
    let after = counts();
    let upstream_seen = UPSTREAM_WITH_TOKEN.load(Ordering::Relaxed) - upstream_before;

    let without = UPSTREAM_WITHOUT_TOKEN.load(Ordering::Relaxed);
    if without > 0 {
        fail(&format!(
            "the upstream saw {without} requests without a bearer token"
        ));
    }
    if upstream_before != args.warmup || upstream_seen != args.requests {
        fail(&format!(
            "the upstream saw {upstream_before} + {upstream_seen} requests with a token, \
             not {} + {}",
            args.warmup, args.requests
        ));
    }
    let n = args.requests;
    println!(
        "tokenward in-process: threads {threads}, http1_fast_path {fast_path}; {} keep-alive \
         connections; {} warm-up + {n} measured requests, each a 200 `ok\\n`, each seen upstream \
         with its bearer token",
        args.connections, args.warmup
    );
    println!(
        "allocations/request        {:>9.2}   bytes allocated/request    {:>9.1}",
        per_request(after.allocs - before.allocs, n),
        per_request(after.alloc_bytes - before.alloc_bytes, n)
    );
    println!(
        "  of which >= {LARGE} bytes {:>9.2}   bytes/request              {:>9.1}",
        per_request(after.large_allocs - before.large_allocs, n),
        per_request(after.large_alloc_bytes - before.large_alloc_bytes, n)
    );
    let sizes: Vec<String> = after
        .large_sizes
        .iter()
        .zip(before.large_sizes.iter())
        .filter(|((size, after), (_, before))| *size > 0 && after > before)
        .map(|((size, after), (_, before))| {
            format!("{size} B × {:.2}", per_request(after - before, n))
        })
        .collect();
    println!("    by size, per request      {}", sizes.join(", "));
    println!(
        "reallocations/request      {:>9.2}   bytes reallocated/request  {:>9.1}   (new sizes)",
        per_request(after.reallocs - before.reallocs, n),
        per_request(after.realloc_bytes - before.realloc_bytes, n)
    );
    println!(
        "frees/request              {:>9.2}",
        per_request(after.frees - before.frees, n)
    );
    // Not before: tokenward watches its config file and would try a reload when it goes.
    let _ = std::fs::remove_dir_all(&dir);
    // tokenward's server thread never returns; its threads end with the process.
    std::process::exit(0);
}
