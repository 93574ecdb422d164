//! Black-box tests of HTTP/1 framing on both request paths (the lean path and the `ProxyHttp`
//! path): where one message ends and the next begins must survive any read boundary, early
//! answers, upgrades, CONNECT and `Expect`. The upstream here is written by hand and parses what
//! it receives strictly, so a stray last chunk or a second request shows up as such; the client
//! is a raw socket that sends each request cut where the test says and parses each answer
//! strictly too.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The answer a script gives when it does not say otherwise.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// One step of the hand-written upstream's answer to a request.
#[derive(Clone, Debug)]
enum Step {
    /// Reads the request body (by its framing, strictly) and records it.
    ReadBody,
    Send(Vec<u8>),
    Pause(Duration),
    /// Closes the connection without reading what is left.
    Close,
    /// Records that the steps before it are done (see `RawUpstream::marks`).
    Mark(&'static str),
}

fn send(bytes: &[u8]) -> Step {
    Step::Send(bytes.to_vec())
}

/// What the upstream received of one request: its head (lower-cased) and, once read, its body
/// or why its framing was refused.
#[derive(Clone, Debug)]
struct Got {
    conn: usize,
    head: String,
    body: Option<Result<Vec<u8>, String>>,
}

type Script = Arc<dyn Fn(&str) -> Vec<Step> + Send + Sync>;

#[derive(Clone)]
struct RawUpstream {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    marks: Arc<Mutex<Vec<&'static str>>>,
}

impl RawUpstream {
    /// An upstream that answers each request head with the steps `script` gives for it.
    async fn start(script: impl Fn(&str) -> Vec<Step> + Send + Sync + 'static) -> Self {
        let script: Script = Arc::new(script);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let marks = Arc::new(Mutex::new(Vec::new()));
        let (log, marked) = (got.clone(), marks.clone());
        tokio::spawn(async move {
            let mut conn = 0;
            while let Ok((s, _)) = listener.accept().await {
                conn += 1;
                let (script, log, marked) = (script.clone(), log.clone(), marked.clone());
                tokio::spawn(serve_upstream(s, conn, script, log, marked));
            }
        });
        RawUpstream { addr, got, marks }
    }

    /// Answers every request `OK` once its body is read.
    async fn ok() -> Self {
        Self::start(|_| vec![Step::ReadBody, send(OK)]).await
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

async fn serve_upstream(
    mut s: TcpStream,
    conn: usize,
    script: Script,
    log: Arc<Mutex<Vec<Got>>>,
    marks: Arc<Mutex<Vec<&'static str>>>,
) {
    let mut buf = Vec::new();
    while let Some(head) = read_request_head(&mut s, &mut buf).await {
        let index = {
            let mut log = log.lock().unwrap();
            log.push(Got {
                conn,
                head: head.clone(),
                body: None,
            });
            log.len() - 1
        };
        for step in script(&head) {
            match step {
                Step::ReadBody => {
                    let body = read_body(&mut s, &mut buf, &head, false).await;
                    let failed = body.is_err();
                    // The test may have cleared the log since (a connection left reading).
                    if let Some(got) = log.lock().unwrap().get_mut(index) {
                        got.body = Some(body);
                    }
                    if failed {
                        return;
                    }
                }
                Step::Send(bytes) => {
                    if s.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Step::Pause(d) => tokio::time::sleep(d).await,
                Step::Close => return,
                Step::Mark(mark) => marks.lock().unwrap().push(mark),
            }
        }
    }
}

fn field<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .skip(1)
        .find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        })
        .map(|(_, v)| v.trim())
}

/// Reads more bytes into `buf`; `false` once the peer has closed.
async fn fill(s: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 65536];
    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
        Ok(Ok(n)) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        Ok(_) => false,
        Err(_) => panic!(
            "nothing arrived within 10s after {:?}",
            String::from_utf8_lossy(buf)
        ),
    }
}

/// One CRLF-terminated line from `buf` (a bare LF is a framing error).
async fn line(s: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> Result<Vec<u8>, String> {
    loop {
        if let Some(lf) = buf.iter().position(|b| *b == b'\n') {
            if lf == 0 || buf[lf - 1] != b'\r' {
                return Err(format!("bare LF in {:?}", String::from_utf8_lossy(buf)));
            }
            let line = buf[..lf - 1].to_vec();
            buf.drain(..=lf);
            return Ok(line);
        }
        if !fill(s, buf).await {
            return Err(format!(
                "closed in a line: {:?}",
                String::from_utf8_lossy(buf)
            ));
        }
    }
}

/// Reads a message body framed as `head` says, strictly (RFC 9112 §6, §7.1). `until_close`:
/// without Content-Length or chunked coding the body ends with the connection (answers);
/// otherwise it is empty (requests).
async fn read_body(
    s: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    head: &str,
    until_close: bool,
) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    if field(head, "transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        loop {
            let size_line = line(s, buf).await?;
            let size_line = String::from_utf8_lossy(&size_line).to_string();
            let size = size_line.split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| format!("bad chunk size line {size_line:?}"))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !line(s, buf).await?.is_empty() {}
                return Ok(body);
            }
            while buf.len() < size + 2 {
                if !fill(s, buf).await {
                    return Err(format!("closed in a chunk after {body:?}"));
                }
            }
            if &buf[size..size + 2] != b"\r\n" {
                return Err(format!("chunk of {size} not followed by CRLF"));
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    }
    if let Some(length) = field(head, "content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| format!("bad Content-Length {length:?}"))?;
        while buf.len() < length {
            if !fill(s, buf).await {
                return Err(format!("closed {} bytes into {length}", buf.len()));
            }
        }
        body.extend(buf.drain(..length));
        return Ok(body);
    }
    if until_close {
        while fill(s, buf).await {}
        body.append(buf);
    }
    Ok(body)
}

/// An answer as the client parsed it.
#[derive(Debug)]
struct Answer {
    /// The 1xx heads before the final one, lower-cased.
    informational: Vec<String>,
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    fn says_close(&self) -> bool {
        field(&self.head, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close"))
    }
}

/// Reads one answer (after any 1xx) strictly from `s`; bytes past it stay in `buf`.
async fn read_answer(s: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>, method: &str) -> Answer {
    let mut informational = Vec::new();
    loop {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(
                fill(s, buf).await,
                "closed before an answer: {:?}",
                String::from_utf8_lossy(buf)
            );
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        buf.drain(..end);
        let status: u16 = head
            .strip_prefix("http/1.1 ")
            .or_else(|| head.strip_prefix("http/1.0 "))
            .and_then(|h| h.get(..3))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {head:?}"));
        if (100..200).contains(&status) && status != 101 {
            informational.push(head);
            continue;
        }
        let bodiless = method == "HEAD" || matches!(status, 101 | 204 | 304);
        let body = if bodiless {
            Vec::new()
        } else {
            read_body(s, buf, &head, true)
                .await
                .unwrap_or_else(|e| panic!("answer {head:?} badly framed: {e}"))
        };
        return Answer {
            informational,
            status,
            head,
            body,
        };
    }
}

/// Writes `pieces` one after another, `pause` apart, until the proxy stops reading.
async fn write_pieces(s: &mut TcpStream, pieces: &[Vec<u8>], pause: Duration) {
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 && !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        if s.write_all(piece).await.is_err() {
            // The proxy answered and closed early; the answer is read next.
            return;
        }
    }
}

/// The ways a test cuts what it sends: in one write, byte by byte, at each CRLF.
fn cuts(bytes: &[u8]) -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let mut at_crlf = Vec::new();
    let mut start = 0;
    for i in 0..bytes.len() {
        if bytes[i..].starts_with(b"\r\n") {
            at_crlf.push(bytes[start..i + 1].to_vec());
            start = i + 1;
        }
    }
    at_crlf.push(bytes[start..].to_vec());
    vec![
        ("one write", vec![bytes.to_vec()]),
        ("byte by byte", bytes.iter().map(|b| vec![*b]).collect()),
        ("inside each CRLF", at_crlf),
    ]
}

/// Tokenward on the lean path (`lean`) or the `ProxyHttp` path, in front of `upstream`, ready.
async fn proxy(upstream: &str, provider: &FakeProvider, lean: bool) -> Tokenward {
    let tw = Tokenward::start_in_env(
        upstream,
        &oauth2_keys(provider, ""),
        &[(
            "TOKENWARD_SERVER__HTTP1_FAST_PATH",
            if lean { "true" } else { "false" },
        )],
    );
    tw.wait_ready().await;
    tw
}

fn path_name(lean: bool) -> &'static str {
    if lean { "lean path" } else { "full path" }
}

const NEXT: &[u8] = b"GET /next HTTP/1.1\r\nHost: app\r\n\r\n";

/// Sends `request` on a new connection, cut as `pieces` says, then a GET on the same connection;
/// returns both answers. The upstream must have seen exactly these two requests.
async fn request_then_next(
    tw: &Tokenward,
    pieces: &[Vec<u8>],
    pause: Duration,
    method: &str,
) -> (Answer, Answer) {
    let mut s = TcpStream::connect(tw.proxy).await.unwrap();
    write_pieces(&mut s, pieces, pause).await;
    let mut buf = Vec::new();
    let first = read_answer(&mut s, &mut buf, method).await;
    s.write_all(NEXT).await.unwrap();
    let next = read_answer(&mut s, &mut buf, "GET").await;
    assert!(
        buf.is_empty(),
        "stray bytes: {:?}",
        String::from_utf8_lossy(&buf)
    );
    (first, next)
}

/// The upstream saw exactly one request with `body`, then `GET /next`.
fn assert_two_requests(up: &RawUpstream, body: &[u8], case: &str) {
    let got = up.got();
    assert_eq!(got.len(), 2, "{case}: {got:?}");
    assert_eq!(
        got[0].body,
        Some(Ok(body.to_vec())),
        "{case}: the first request's body"
    );
    assert!(got[1].head.starts_with("get /next "), "{case}: {got:?}");
    assert_eq!(got[1].body, Some(Ok(Vec::new())), "{case}: {got:?}");
    up.got.lock().unwrap().clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunked_request_arrives_whole_whatever_its_read_boundaries() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::ok().await;
    let head = b"POST /up HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n";
    let with_trailers = [&head[..], b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"].concat();
    let two_chunks = [&head[..], b"5;ext=1\r\nhello\r\n6\r\n-world\r\n0\r\n\r\n"].concat();
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        let path = path_name(lean);
        for (cut, pieces) in cuts(&with_trailers) {
            let case = format!("{path}, trailers, {cut}");
            let (first, next) = request_then_next(&tw, &pieces, Duration::ZERO, "POST").await;
            assert_eq!((first.status, next.status), (200, 200), "{case}");
            assert_two_requests(&up, b"hello", &case);
        }
        for (cut, pieces) in cuts(&two_chunks) {
            let case = format!("{path}, two chunks, {cut}");
            let (first, next) = request_then_next(&tw, &pieces, Duration::ZERO, "POST").await;
            assert_eq!((first.status, next.status), (200, 200), "{case}");
            assert_two_requests(&up, b"hello-world", &case);
        }
        // The chunk's CRLF, and then the chunk-size line, arrive in later reads.
        let late = [
            head.to_vec(),
            b"5\r\nhello".to_vec(),
            b"\r\n6\r\n-world\r\n0\r\n\r\n".to_vec(),
        ];
        let case = format!("{path}, CRLF 100 ms later");
        let (first, next) = request_then_next(&tw, &late, Duration::from_millis(100), "POST").await;
        assert_eq!((first.status, next.status), (200, 200), "{case}");
        assert_two_requests(&up, b"hello-world", &case);
        // A chunk whose size line and data fill a 64 KiB read exactly; its CRLF comes next.
        let data = vec![b'x'; 0xfffa];
        let body = [
            b"fffa\r\n".to_vec(),
            data.clone(),
            b"\r\n0\r\n\r\n".to_vec(),
        ]
        .concat();
        let case = format!("{path}, 64 KiB-aligned chunk");
        let pieces = [head.to_vec(), body];
        let (first, next) =
            request_then_next(&tw, &pieces, Duration::from_millis(50), "POST").await;
        assert_eq!((first.status, next.status), (200, 200), "{case}");
        assert_two_requests(&up, &data, &case);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunked_answer_arrives_whole_whatever_its_read_boundaries() {
    let provider = FakeProvider::start(300, false, None).await;
    let big = vec![b'y'; 0xfffa];
    let big_answer = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffa\r\n".to_vec(),
        big.clone(),
    ]
    .concat();
    let up = RawUpstream::start(move |head| {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut steps = vec![Step::ReadBody];
        let pause = Step::Pause(Duration::from_millis(100));
        match head.split(' ').nth(1).unwrap_or("") {
            "/trailers" => steps.push(send(
                &[&chunked[..], b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"].concat(),
            )),
            "/late-crlf" => steps.extend([
                send(&[&chunked[..], b"5\r\nhello"].concat()),
                pause,
                send(b"\r\n6\r\n-world\r\n0\r\n\r\n"),
            ]),
            "/split-size" => steps.extend([
                send(&[&chunked[..], b"5\r\nhello\r\n"].concat()),
                pause.clone(),
                send(b"6"),
                pause,
                send(b"\r\n-world\r\n0\r\n\r\n"),
            ]),
            "/aligned" => steps.extend([send(&big_answer), pause, send(b"\r\n0\r\n\r\n")]),
            _ => steps.push(send(OK)),
        }
        steps
    })
    .await;
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        for (target, body) in [
            ("/trailers", &b"hello"[..]),
            ("/late-crlf", b"hello-world"),
            ("/split-size", b"hello-world"),
            ("/aligned", &big),
        ] {
            let case = format!("{}, {target}", path_name(lean));
            let request = format!("GET {target} HTTP/1.1\r\nHost: app\r\n\r\n");
            let (first, next) =
                request_then_next(&tw, &[request.into_bytes()], Duration::ZERO, "GET").await;
            assert_eq!(first.status, 200, "{case}");
            assert_eq!(first.body, body, "{case}: {}", first.text());
            assert_eq!((next.status, next.text().as_str()), (200, "ok"), "{case}");
        }
    }
}

fn target(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or("")
}

/// Whether the proxy has closed `s` (read to its end within 5 s).
async fn closed(s: &mut (impl AsyncRead + Unpin)) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn requests_in_class(metrics: &str, class: &str) -> f64 {
    metric(
        metrics,
        &format!("tokenward_requests_total{{route=\"api\",status_class=\"{class}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_early_answer_to_a_large_upload_is_relayed_and_a_401_drops_the_token() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::start(|head| match target(head) {
        // Answered after the head, the body left unread: the upstream closes (and resets).
        "/reject" => vec![
            send(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\nConnection: close\r\n\r\ndenied"),
            Step::Close,
        ],
        "/too-big" => vec![
            send(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 7\r\nConnection: close\r\n\r\ntoo big"),
            Step::Close,
        ],
        _ => vec![Step::ReadBody, send(OK)],
    })
    .await;
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        for (path, status, body) in [("/too-big", 413, "too big"), ("/reject", 401, "denied")] {
            let case = format!("{}, {path}", path_name(lean));
            let s = TcpStream::connect(tw.proxy).await.unwrap();
            let (mut r, mut w) = s.into_split();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\n\r\n",
                8 << 20
            );
            w.write_all(head.as_bytes()).await.unwrap();
            // The client keeps sending its 8 MiB while it reads the answer, as curl does.
            let writer = tokio::spawn(async move {
                let chunk = vec![b'u'; 64 << 10];
                for _ in 0..128 {
                    if w.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
            let mut buf = Vec::new();
            let answer = read_answer(&mut r, &mut buf, "POST").await;
            assert_eq!(
                (answer.status, answer.text().as_str()),
                (status, body),
                "{case}"
            );
            assert!(
                answer.says_close(),
                "{case}: the body was not read: {answer:?}"
            );
            writer.abort();
        }
        // The 401 dropped the token: the next request carries a new one.
        let mut s = TcpStream::connect(tw.proxy).await.unwrap();
        s.write_all(NEXT).await.unwrap();
        let answer = read_answer(&mut s, &mut Vec::new(), "GET").await;
        assert_eq!(answer.status, 200, "{}", path_name(lean));
        let got = up.got();
        let bearer = |g: &Got| field(&g.head, "authorization").unwrap_or("").to_string();
        let rejected = got.iter().find(|g| target(&g.head) == "/reject").unwrap();
        let next = got.last().unwrap();
        assert_eq!(target(&next.head), "/next");
        assert_ne!(
            bearer(rejected),
            bearer(next),
            "{}: the token the upstream refused was used again",
            path_name(lean)
        );
        up.got.lock().unwrap().clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_is_refused_with_a_405_on_both_paths_and_never_forwarded() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::ok().await;
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        let case = path_name(lean);
        let request = b"CONNECT app.example:443 HTTP/1.1\r\nHost: app.example:443\r\n\r\n";
        let answer = refused(&tw, request, "CONNECT", case).await;
        assert_eq!(answer.status, 405, "{case}: {answer:?}");
        let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(body["error"], "method_not_allowed", "{case}");
        assert!(up.got().is_empty(), "{case}: {:?}", up.got());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_failure_after_our_100_continue_is_a_502_and_http10_gets_no_100() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::start(|head| match target(head) {
        "/fail" => vec![Step::ReadBody, Step::Close],
        _ => vec![Step::ReadBody, send(OK)],
    })
    .await;
    // The lean path sends the 100 itself once it has a token and a connection.
    let tw = proxy(&up.url(), &provider, true).await;
    let mut s = TcpStream::connect(tw.proxy).await.unwrap();
    s.write_all(
        b"PUT /fail HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        assert!(fill(&mut s, &mut buf).await, "closed before the 100");
    }
    assert!(
        buf.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    s.write_all(b"hello").await.unwrap();
    let answer = read_answer(&mut s, &mut buf, "PUT").await;
    assert_eq!(answer.status, 502, "{answer:?}");
    assert!(answer.says_close(), "{answer:?}");
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body["error"], "upstream_unavailable");
    // The request is counted just after its answer is written: wait for the count.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let metrics = tw.get_text("/metrics").await;
        if requests_in_class(&metrics, "5xx") > 0.0 || std::time::Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(requests_in_class(&metrics, "5xx"), 1.0, "{metrics}");
    assert_eq!(requests_in_class(&metrics, "1xx"), 0.0, "{metrics}");
    drop(tw);

    // An HTTP/1.0 client cannot take a 1xx (RFC 9110 §15.2): it sends its body after waiting.
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        let mut s = TcpStream::connect(tw.proxy).await.unwrap();
        s.write_all(
            b"PUT /old HTTP/1.0\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(b"hello").await.unwrap();
        let answer = read_answer(&mut s, &mut Vec::new(), "PUT").await;
        assert_eq!(answer.status, 200, "{}: {answer:?}", path_name(lean));
        assert!(
            answer.informational.is_empty(),
            "{}: {answer:?}",
            path_name(lean)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn error_answers_that_end_the_connection_say_so() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::start(|head| match target(head) {
        "/reset" => vec![Step::ReadBody, Step::Close],
        _ => vec![Step::ReadBody, send(OK)],
    })
    .await;
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        let cases: [(&[u8], u16); 3] = [
            // The upstream closes without an answer.
            (
                b"POST /reset HTTP/1.1\r\nHost: app\r\nContent-Length: 1\r\n\r\nx",
                502,
            ),
            // A chunk-size line that is not hex.
            (
                b"POST /bad HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                400,
            ),
            // Connection names a field the upstream needs.
            (
                b"GET /conn HTTP/1.1\r\nHost: app\r\nConnection: host\r\n\r\n",
                400,
            ),
        ];
        for (request, status) in cases {
            let case = format!("{}, {}", path_name(lean), String::from_utf8_lossy(request));
            let mut s = TcpStream::connect(tw.proxy).await.unwrap();
            s.write_all(request).await.unwrap();
            let answer = read_answer(&mut s, &mut Vec::new(), "POST").await;
            assert_eq!(answer.status, status, "{case}: {answer:?}");
            assert!(answer.says_close(), "{case}: {answer:?}");
            assert!(closed(&mut s).await, "{case}");
        }
    }
}

const WS_HEAD: &str = "HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

/// A client sends its first WebSocket frame with the upgrade head, without waiting for the
/// 101; it must come back from the echoing upstream, and so must the next one.
async fn bytes_with_the_upgrade_head_come_back(lean: bool) {
    let provider = FakeProvider::start(300, false, None).await;
    let (addr, heads) = upgrade_echo_upstream().await;
    let tw = proxy(&format!("http://{addr}"), &provider, lean).await;
    let case = path_name(lean);
    let mut s = TcpStream::connect(tw.proxy).await.unwrap();
    s.write_all(format!("GET /ws {WS_HEAD}\r\nfirst frame").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let answer = read_answer(&mut s, &mut buf, "GET").await;
    assert_eq!(answer.status, 101, "{case}: {answer:?}");
    while buf.len() < b"first frame".len() {
        assert!(fill(&mut s, &mut buf).await, "{case}: closed");
    }
    assert_eq!(buf, b"first frame", "{case}");
    s.write_all(b"and the next").await.unwrap();
    buf.clear();
    while buf.len() < b"and the next".len() {
        assert!(fill(&mut s, &mut buf).await, "{case}: closed");
    }
    assert_eq!(buf, b"and the next", "{case}");
    let heads = heads.lock().unwrap().clone();
    let token = format!("authorization: bearer {}", provider.issued()[0]);
    assert!(heads.len() == 1 && heads[0].contains(&token), "{heads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bytes_sent_with_an_upgrade_head_are_carried_by_the_lean_path() {
    bytes_with_the_upgrade_head_come_back(true).await;
}

/// Passes about 59 runs in 60: pingora-proxy 0.9's `proxy_handle_upstream` ends an upgraded
/// exchange when it takes the empty request body's end from its pipe after it has read the
/// 101 (`request_done && was_upgraded`), which happens when the 101 arrives before that task
/// first polls; the upstream connection then closes under the tunnel. The lean path carries
/// WebSocket upgrades itself and is not exposed; this one runs with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "pingora-proxy race, about 1 run in 60 (see the comment)"]
async fn bytes_sent_with_an_upgrade_head_are_carried_by_the_full_path() {
    bytes_with_the_upgrade_head_come_back(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_upgrade_and_an_h2c_upgrade_keep_the_connection_as_their_answers_say() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::start(|head| match target(head) {
        "/ws-refused" => vec![send(
            b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 4\r\n\r\nnope",
        )],
        _ => vec![Step::ReadBody, send(OK)],
    })
    .await;
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        for (request, status) in [
            (format!("GET /ws-refused {WS_HEAD}\r\n"), 426),
            (
                "GET /h2c HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                 Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
                    .to_string(),
                200,
            ),
        ] {
            let case = format!("{}, {}", path_name(lean), request.lines().next().unwrap());
            let (first, next) =
                request_then_next(&tw, &[request.into_bytes()], Duration::ZERO, "GET").await;
            assert_eq!(first.status, status, "{case}: {first:?}");
            assert!(!first.says_close(), "{case}: {first:?}");
            assert_eq!(next.status, 200, "{case}");
        }
        let got = up.got();
        let h2c = got.iter().find(|g| target(&g.head) == "/h2c").unwrap();
        assert!(
            field(&h2c.head, "upgrade").is_none(),
            "{}: {h2c:?}",
            path_name(lean)
        );
        assert!(field(&h2c.head, "http2-settings").is_none(), "{h2c:?}");
        up.got.lock().unwrap().clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_paths_take_the_same_connection_options_and_treat_an_upgrade_with_a_body_alike() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::ok().await;
    let options = |n: usize| {
        (0..n)
            .map(|i| format!("x-opt-{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        let case = path_name(lean);
        let request = format!(
            "GET /nine HTTP/1.1\r\nHost: app\r\nConnection: {}\r\n\r\n",
            options(9)
        );
        let (answer, _) =
            request_then_next(&tw, &[request.into_bytes()], Duration::ZERO, "GET").await;
        assert_eq!(answer.status, 200, "{case}: nine options");
        let request = format!(
            "GET /ten HTTP/1.1\r\nHost: app\r\nConnection: {}\r\n\r\n",
            options(10)
        );
        let mut s = TcpStream::connect(tw.proxy).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut s, &mut Vec::new(), "GET").await;
        assert_eq!(answer.status, 400, "{case}: ten options");
        // A WebSocket upgrade with a body: a plain POST, its upgrade fields stripped.
        let request = format!("POST /ws-body {WS_HEAD}Content-Length: 5\r\n\r\nhello");
        let (answer, _) =
            request_then_next(&tw, &[request.into_bytes()], Duration::ZERO, "POST").await;
        assert_eq!(answer.status, 200, "{case}: {answer:?}");
        let got = up.got();
        let posted = got.iter().find(|g| target(&g.head) == "/ws-body").unwrap();
        assert!(
            field(&posted.head, "upgrade").is_none(),
            "{case}: {posted:?}"
        );
        assert_eq!(posted.body, Some(Ok(b"hello".to_vec())), "{case}");
        assert!(!got.iter().any(|g| target(&g.head) == "/ten"), "{case}");
        up.got.lock().unwrap().clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hop_by_hop_fields_of_answers_stay_on_the_upstream_connection() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::start(|head| {
        let answer: &[u8] = match target(head) {
            "/hints" => b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nKeep-Alive: timeout=1\r\nConnection: keep-alive, X-Hint-Hop\r\nX-Hint-Hop: 1\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            _ => b"HTTP/1.1 200 OK\r\nConnection: X-Session-Hop\r\nX-Session-Hop: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok",
        };
        vec![Step::ReadBody, send(answer)]
    })
    .await;
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        let case = path_name(lean);
        let request = b"GET /hops HTTP/1.1\r\nHost: app\r\n\r\n".to_vec();
        let (answer, _) = request_then_next(&tw, &[request], Duration::ZERO, "GET").await;
        assert_eq!(answer.status, 200, "{case}");
        for hop in [
            "x-session-hop",
            "keep-alive",
            "proxy-connection",
            "te",
            "upgrade",
        ] {
            assert!(
                field(&answer.head, hop).is_none(),
                "{case}: {hop} in {answer:?}"
            );
        }
        assert_eq!(field(&answer.head, "x-kept"), Some("yes"), "{case}");
        assert_eq!(
            field(&answer.head, "connection"),
            Some("keep-alive"),
            "{case}"
        );
        let request = b"GET /hints HTTP/1.1\r\nHost: app\r\n\r\n".to_vec();
        let (answer, _) = request_then_next(&tw, &[request], Duration::ZERO, "GET").await;
        assert_eq!(answer.informational.len(), 1, "{case}: {answer:?}");
        let hint = &answer.informational[0];
        assert!(
            hint.contains("link: </a.css>; rel=preload"),
            "{case}: {hint}"
        );
        for hop in ["x-hint-hop", "keep-alive", "connection"] {
            assert!(field(hint, hop).is_none(), "{case}: {hop} in {hint}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn informational_answers_are_bounded_never_reach_http10_and_a_101_must_be_asked_for() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::start(|head| {
        let mut steps = vec![Step::ReadBody];
        match target(head) {
            "/flood" => {
                steps.extend((0..20).map(|_| send(b"HTTP/1.1 102 Processing\r\n\r\n")));
                steps.push(send(OK));
            }
            "/hints" => {
                steps.extend((0..3).map(|_| send(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")));
                steps.push(send(OK));
            }
            "/switch" => steps.extend([
                send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nraw bytes"),
                Step::Pause(Duration::from_millis(500)),
            ]),
            _ => steps.push(send(OK)),
        }
        steps
    })
    .await;
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        let case = path_name(lean);
        for (request, status, informational) in [
            ("GET /hints HTTP/1.1\r\nHost: app\r\n\r\n", 200, 3),
            ("GET /hints HTTP/1.0\r\nHost: app\r\n\r\n", 200, 0),
            ("GET /flood HTTP/1.1\r\nHost: app\r\n\r\n", 502, 16),
            ("GET /switch HTTP/1.1\r\nHost: app\r\n\r\n", 502, 0),
        ] {
            let mut s = TcpStream::connect(tw.proxy).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let answer = read_answer(&mut s, &mut Vec::new(), "GET").await;
            let case = format!("{case}, {}", request.lines().next().unwrap());
            assert_eq!(answer.status, status, "{case}: {answer:?}");
            // The full path may drop the last few relayed before its pipe saw one too many.
            assert!(
                answer.informational.len() <= informational,
                "{case}: {answer:?}"
            );
            if status == 200 {
                assert_eq!(
                    answer.informational.len(),
                    informational,
                    "{case}: {answer:?}"
                );
            }
            if status == 502 {
                assert!(answer.says_close() && closed(&mut s).await, "{case}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_content_length_list_of_one_value_goes_upstream_as_that_value() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::ok().await;
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        for request in [
            &b"POST /list HTTP/1.1\r\nHost: app\r\nContent-Length: 5, 5\r\n\r\nhello"[..],
            b"POST /twice HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        ] {
            let case = format!("{}, {}", path_name(lean), String::from_utf8_lossy(request));
            let (answer, _) = request_then_next(&tw, &[request.to_vec()], Duration::ZERO, "POST").await;
            assert_eq!(answer.status, 200, "{case}");
            let got = up.got();
            assert_eq!(got[0].head.matches("content-length").count(), 1, "{case}: {got:?}");
            assert_eq!(field(&got[0].head, "content-length"), Some("5"), "{case}");
            assert_eq!(got[0].body, Some(Ok(b"hello".to_vec())), "{case}");
            up.got.lock().unwrap().clear();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_listener_closes_an_http10_connection_that_did_not_ask_to_stay() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::ok().await;
    let tw = proxy(&up.url(), &provider, true).await;
    for (request, kept) in [
        (&b"GET /healthz HTTP/1.0\r\n\r\n"[..], false),
        (
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            false,
        ),
        (
            b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            true,
        ),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n", true),
    ] {
        let case = String::from_utf8_lossy(request).to_string();
        let mut s = TcpStream::connect(tw.admin).await.unwrap();
        s.write_all(request).await.unwrap();
        let answer = read_answer(&mut s, &mut Vec::new(), "GET").await;
        assert_eq!(answer.status, 200, "{case}");
        assert_eq!(answer.says_close(), !kept, "{case}: {answer:?}");
        if !kept {
            assert!(closed(&mut s).await, "{case}: still open");
        }
    }
}

/// Tokenward on `lean` or the full path in front of `upstream`, its route carrying `line`.
async fn proxy_with_route_line(
    upstream: &str,
    provider: &FakeProvider,
    lean: bool,
    line: &str,
) -> Tokenward {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = (free_port(), free_port());
    let path = dir.path().join("tokenward.toml");
    let text = config(
        proxy,
        admin,
        upstream,
        &dir.path().join("state"),
        &oauth2_keys(provider, ""),
    );
    let anchor = "credential = \"api\"\n";
    std::fs::write(
        &path,
        text.replacen(anchor, &format!("{anchor}{line}\n"), 1),
    )
    .unwrap();
    let fast_path = if lean { "true" } else { "false" };
    let tw = Tokenward::start_with_env(
        dir,
        path,
        proxy,
        admin,
        &[("TOKENWARD_SERVER__HTTP1_FAST_PATH", fast_path)],
    );
    tw.wait_ready().await;
    tw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_bytes_from_an_upstream_never_reach_the_next_request_and_keepalive_can_be_turned_off()
{
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::start(|head| {
        let mut steps = vec![Step::ReadBody];
        match target(head) {
            // A HEAD answered with a body, and an answer followed by a second one nobody asked
            // for: the extra bytes arrive while the connection idles in the pool.
            "/head" => steps.extend([
                send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
                Step::Pause(Duration::from_millis(50)),
                send(b"stale"),
                Step::Mark("late"),
            ]),
            "/twice" => steps.extend([
                send(OK),
                Step::Pause(Duration::from_millis(50)),
                send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"),
                Step::Mark("late"),
            ]),
            _ => steps.push(send(OK)),
        }
        steps
    })
    .await;
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        for (method, path) in [("HEAD", "/head"), ("GET", "/twice")] {
            let case = format!("{}, {method} {path}", path_name(lean));
            let mut s = TcpStream::connect(tw.proxy).await.unwrap();
            let request = format!("{method} {path} HTTP/1.1\r\nHost: app\r\n\r\n");
            s.write_all(request.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            let answer = read_answer(&mut s, &mut buf, method).await;
            assert_eq!(answer.status, 200, "{case}");
            let marks = up.marks.clone();
            wait_for("the late bytes", Duration::from_secs(5), || {
                marks.lock().unwrap().contains(&"late")
            })
            .await;
            s.write_all(NEXT).await.unwrap();
            let next = read_answer(&mut s, &mut buf, "GET").await;
            assert_eq!((next.status, next.text().as_str()), (200, "ok"), "{case}");
            up.marks.lock().unwrap().clear();
        }
    }
    // A route whose upstream is known to do that takes a new connection for every request.
    up.got.lock().unwrap().clear();
    for lean in [true, false] {
        let tw =
            proxy_with_route_line(&up.url(), &provider, lean, "upstream_keepalive = false").await;
        let pieces = [b"GET /one HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()];
        let (first, next) = request_then_next(&tw, &pieces, Duration::ZERO, "GET").await;
        assert_eq!((first.status, next.status), (200, 200));
        let got = up.got();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_ne!(
            got[0].conn,
            got[1].conn,
            "{}: one upstream connection",
            path_name(lean)
        );
        for g in &got {
            assert_eq!(field(&g.head, "connection"), Some("close"), "{g:?}");
        }
        up.got.lock().unwrap().clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::start(|head| {
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
            target(head).len(),
            target(head)
        );
        vec![Step::ReadBody, Step::Send(answer.into_bytes())]
    })
    .await;
    let three = b"GET /a HTTP/1.1\r\nHost: app\r\n\r\n\
        POST /bb HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello\
        POST /ccc HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    for lean in [true, false] {
        let case = path_name(lean);
        let tw = proxy(&up.url(), &provider, lean).await;
        let mut s = TcpStream::connect(tw.proxy).await.unwrap();
        s.write_all(three).await.unwrap();
        let mut buf = Vec::new();
        for (path, method) in [("/a", "GET"), ("/bb", "POST"), ("/ccc", "POST")] {
            let answer = read_answer(&mut s, &mut buf, method).await;
            assert_eq!(
                (answer.status, answer.text().as_str()),
                (200, path),
                "{case}"
            );
            assert!(!answer.says_close(), "{case}: {answer:?}");
        }
        let got = up.got();
        let bodies: Vec<_> = got.iter().map(|g| g.body.clone()).collect();
        assert_eq!(
            bodies,
            [
                Some(Ok(vec![])),
                Some(Ok(b"hello".to_vec())),
                Some(Ok(b"abc".to_vec()))
            ],
            "{case}: {got:?}"
        );
        up.got.lock().unwrap().clear();
    }
}

/// pingora-core's chunk parser takes a bare LF in a chunk extension; both paths refuse it,
/// whatever the reads, whatever came before it on the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bare_lf_in_a_chunk_size_line_is_refused_on_both_paths() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::ok().await;
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        bare_lf_refused(&tw, &up, path_name(lean)).await;
    }
}

async fn bare_lf_refused(tw: &Tokenward, up: &RawUpstream, path: &str) {
    let head = b"POST /lf HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    // An LF-splitting parser reads a 5-byte chunk "b\r\nhe" here, httparse the chunk "hello".
    let body = b"5;a\nb\r\nhello\r\n0\r\n\r\n".to_vec();
    let late_body = [b"3\r\nabc\r\n".to_vec(), body.clone()].concat();
    // Targets pingora-core escapes (`escape_illegal_request_line`), rebuilding the head it
    // parses: what it read and the head it gives back differ.
    let escaped: Vec<(String, Vec<Vec<u8>>)> = ["/x y", "/x\"y", "/x<y>", "/a b c"]
        .iter()
        .flat_map(|target| {
            let head = format!(
                "POST {target} HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
            );
            [
                (
                    format!("target {target:?}, with the head"),
                    vec![[head.as_bytes(), &body].concat()],
                ),
                (
                    format!("target {target:?}, after the head"),
                    vec![head.clone().into_bytes(), body.clone()],
                ),
            ]
        })
        .collect();
    let cases = [
        (
            "with the head".to_string(),
            vec![[head.clone(), body.clone()].concat()],
        ),
        (
            "after the head".to_string(),
            vec![head.clone(), body.clone()],
        ),
        (
            "after a first chunk".to_string(),
            vec![head.clone(), late_body],
        ),
        (
            "byte by byte".to_string(),
            [head.clone(), body.clone()]
                .concat()
                .iter()
                .map(|b| vec![*b])
                .collect(),
        ),
    ];
    for (case, pieces) in cases.into_iter().chain(escaped) {
        let case = format!("{path}, {case}");
        let mut s = TcpStream::connect(tw.proxy).await.unwrap();
        write_pieces(&mut s, &pieces, Duration::from_millis(20)).await;
        let answer = read_answer(&mut s, &mut Vec::new(), "POST").await;
        assert_eq!(answer.status, 400, "{case}: {answer:?}");
        assert!(answer.says_close(), "{case}: {answer:?}");
        assert!(closed(&mut s).await, "{case}");
        let got = up.got();
        assert!(
            got.iter()
                .all(|g| g.body.as_ref().is_none_or(|b| b.is_err())),
            "{case}: a request went upstream whole: {got:?}"
        );
        up.got.lock().unwrap().clear();
    }
    // Behind a first request on the connection, its body framed by length or chunked with
    // trailers, sent with it or after its answer.
    let bad = [head.clone(), body.clone()].concat();
    for first in [
        &b"POST /first HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\n\r\nabc"[..],
        b"POST /first HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
        b"GET /first HTTP/1.1\r\nHost: app\r\n\r\n",
    ] {
        for pipelined in [true, false] {
            let case = format!("{path}, behind {:?}, pipelined {pipelined}", String::from_utf8_lossy(&first[..12]));
            let mut s = TcpStream::connect(tw.proxy).await.unwrap();
            let mut buf = Vec::new();
            if pipelined {
                s.write_all(&[first, &bad].concat()).await.unwrap();
            } else {
                s.write_all(first).await.unwrap();
            }
            let answer = read_answer(&mut s, &mut buf, "POST").await;
            assert_eq!(answer.status, 200, "{case}: {answer:?}");
            if !pipelined {
                s.write_all(&bad).await.unwrap();
            }
            let answer = read_answer(&mut s, &mut buf, "POST").await;
            assert_eq!(answer.status, 400, "{case}: {answer:?}");
            assert!(closed(&mut s).await, "{case}");
            let got = up.got();
            assert!(
                got.iter()
                    .filter(|g| target(&g.head) == "/lf")
                    .all(|g| g.body.as_ref().is_none_or(|b| b.is_err())),
                "{case}: a request went upstream whole: {got:?}"
            );
            up.got.lock().unwrap().clear();
        }
    }
    // The same body without the LF passes.
    let fine = [head, b"5;a=b\r\nhello\r\n0\r\n\r\n".to_vec()].concat();
    let (answer, _) = request_then_next(tw, &[fine], Duration::ZERO, "POST").await;
    assert_eq!(answer.status, 200, "{path}");
    up.got.lock().unwrap().clear();
}

/// A 101 is a 1xx: it carries no framing fields (RFC 9112 §6.1), whatever the lean path adds
/// to a final answer of unknown length. The full path's 101 is covered by the upgrade tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_101_carries_no_framing_fields() {
    let provider = FakeProvider::start(300, false, None).await;
    let (addr, _) = upgrade_echo_upstream().await;
    let tw = proxy(&format!("http://{addr}"), &provider, true).await;
    let mut s = TcpStream::connect(tw.proxy).await.unwrap();
    s.write_all(format!("GET /ws {WS_HEAD}\r\n").as_bytes())
        .await
        .unwrap();
    let answer = read_answer(&mut s, &mut Vec::new(), "GET").await;
    assert_eq!(answer.status, 101, "{answer:?}");
    assert_eq!(field(&answer.head, "transfer-encoding"), None, "{answer:?}");
    assert_eq!(field(&answer.head, "content-length"), None, "{answer:?}");
}

/// A request with `Expect: 100-continue` answered normally by a keep-alive upstream keeps its
/// client connection: the 100 is not the final answer. The lean path sends the 100 itself;
/// the full path passes `Expect` on and relays the upstream's 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_100_continue_exchange_keeps_the_client_connection() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::start(|head| {
        let mut steps = Vec::new();
        if field(head, "expect").is_some() {
            steps.push(send(b"HTTP/1.1 100 Continue\r\n\r\n"));
        }
        steps.extend([Step::ReadBody, send(OK)]);
        steps
    })
    .await;
    for lean in [true, false] {
        let case = path_name(lean);
        let tw = proxy(&up.url(), &provider, lean).await;
        let mut s = TcpStream::connect(tw.proxy).await.unwrap();
        s.write_all(
            b"POST /e HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(
                fill(&mut s, &mut buf).await,
                "{case}: closed before the 100"
            );
        }
        s.write_all(b"hello").await.unwrap();
        let first = read_answer(&mut s, &mut buf, "POST").await;
        assert_eq!(first.status, 200, "{case}: {first:?}");
        assert_eq!(first.informational.len(), 1, "{case}: {first:?}");
        assert!(!first.says_close(), "{case}: {first:?}");
        s.write_all(NEXT).await.unwrap();
        let next = read_answer(&mut s, &mut buf, "GET").await;
        assert_eq!(next.status, 200, "{case}: {next:?}");
        assert_two_requests(&up, b"hello", case);
    }
}

/// An HTTP/1.0 client never gets a chunked answer (RFC 9112 §6.1): an answer of unknown length,
/// chunked or close-delimited upstream, reaches it close-delimited with `Connection: close`,
/// and the connection ends with the body, as nginx does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http10_client_gets_a_close_delimited_body_never_chunked() {
    const CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    const UNTIL_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello world";
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::start(|head| match target(head) {
        "/chunked" => vec![Step::ReadBody, send(CHUNKED)],
        _ => vec![Step::ReadBody, send(UNTIL_CLOSE), Step::Close],
    })
    .await;
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        for (target, keep_alive) in [
            ("/chunked", ""),
            ("/close", ""),
            ("/chunked", "Connection: keep-alive\r\n"),
        ] {
            let case = format!("{}, {target} {keep_alive:?}", path_name(lean));
            let mut s = TcpStream::connect(tw.proxy).await.unwrap();
            s.write_all(
                format!("GET {target} HTTP/1.0\r\nHost: app\r\n{keep_alive}\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let answer = read_answer(&mut s, &mut Vec::new(), "GET").await;
            assert_eq!(answer.status, 200, "{case}: {answer:?}");
            assert_eq!(
                field(&answer.head, "transfer-encoding"),
                None,
                "{case}: {answer:?}"
            );
            assert!(answer.says_close(), "{case}: {answer:?}");
            assert_eq!(answer.text(), "hello world", "{case}");
        }
    }
}

/// Writes `request` on a new connection and reads its answer; the proxy must then close.
async fn refused(tw: &Tokenward, request: &[u8], method: &str, case: &str) -> Answer {
    let mut s = TcpStream::connect(tw.proxy).await.unwrap();
    s.write_all(request).await.unwrap();
    let answer = read_answer(&mut s, &mut Vec::new(), method).await;
    assert!(answer.says_close(), "{case}: {answer:?}");
    assert!(closed(&mut s).await, "{case}: still open");
    answer
}

/// An upstream that implements TRACE (RFC 9110 §9.3.8: it echoes the request it received)
/// would hand the route's token to the caller: neither path forwards TRACE, nor TRACK (its
/// IIS twin), and both say which methods they take.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trace_and_track_are_refused_with_a_405_naming_the_allowed_methods_and_never_forwarded() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::start(|head| {
        let echo = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: message/http\r\nContent-Length: {}\r\n\r\n{head}",
            head.len()
        );
        vec![Step::ReadBody, Step::Send(echo.into_bytes())]
    })
    .await;
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        for request in [
            &b"TRACE /anything HTTP/1.1\r\nHost: app\r\n\r\n"[..],
            b"TRACK /anything HTTP/1.1\r\nHost: app\r\n\r\n",
            b"trace /anything HTTP/1.1\r\nHost: app\r\n\r\n",
            b"CONNECT app.example:443 HTTP/1.1\r\nHost: app.example:443\r\n\r\n",
        ] {
            let case = format!("{}, {}", path_name(lean), String::from_utf8_lossy(request));
            let method = String::from_utf8_lossy(request.split(|b| *b == b' ').next().unwrap());
            let answer = refused(&tw, request, &method, &case).await;
            assert_eq!(answer.status, 405, "{case}: {answer:?}");
            let allow = field(&answer.head, "allow").unwrap_or_else(|| panic!("{case}: no Allow"));
            assert!(
                allow.contains("get") && !allow.contains("trace"),
                "{case}: {allow}"
            );
            let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
            assert_eq!(body["error"], "method_not_allowed", "{case}");
            assert!(
                !answer.text().to_lowercase().contains("bearer"),
                "{case}: {answer:?}"
            );
        }
        assert!(up.got().is_empty(), "{}: {:?}", path_name(lean), up.got());
    }
}

/// RFC 9112 §6.1: a server answers 501 to a transfer coding it does not understand, and nginx
/// does; tokenward decodes only chunked, so `gzip, chunked` must not be forwarded as plain
/// `chunked` (its body still compressed). A coding list whose last is not chunked is a 400
/// (§6.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_transfer_coding_other_than_chunked_alone_is_refused_never_dropped() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::ok().await;
    let body = "5\r\nhello\r\n0\r\n\r\n";
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        for (codings, status) in [
            ("Transfer-Encoding: gzip, chunked\r\n", 501),
            ("Transfer-Encoding: identity, chunked\r\n", 501),
            (
                "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                501,
            ),
            ("Transfer-Encoding: chunked, chunked\r\n", 501),
            ("Transfer-Encoding: chunked, gzip\r\n", 400),
        ] {
            let case = format!("{}, {codings:?}", path_name(lean));
            let request = format!("POST /z HTTP/1.1\r\nHost: app\r\n{codings}\r\n{body}");
            let answer = refused(&tw, request.as_bytes(), "POST", &case).await;
            assert_eq!(answer.status, status, "{case}: {answer:?}");
        }
        assert!(up.got().is_empty(), "{}: {:?}", path_name(lean), up.got());
        // A sole chunked, in any case, passes.
        let request =
            format!("POST /z HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: Chunked\r\n\r\n{body}");
        let (answer, _) =
            request_then_next(&tw, &[request.into_bytes()], Duration::ZERO, "POST").await;
        assert_eq!(answer.status, 200, "{}", path_name(lean));
        assert_two_requests(&up, b"hello", path_name(lean));
    }
}

/// An answer whose transfer codings do not end with chunked is delimited by the upstream
/// closing (RFC 9112 §6.3): relayed as it came, with its coding, until the end, and the client
/// connection ends with it, its answer saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_with_a_transfer_coding_but_chunked_last_is_relayed_until_close() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::start(|head| {
        let answer: &[u8] = match target(head) {
            "/gzip-length" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\nzipped-bytes",
            "/chunked-gzip" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nzipped-bytes",
            _ => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzipped-bytes",
        };
        vec![Step::ReadBody, send(answer), Step::Close]
    })
    .await;
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        for target in ["/gzip", "/gzip-length", "/chunked-gzip"] {
            let case = format!("{}, {target}", path_name(lean));
            let request = format!("GET {target} HTTP/1.1\r\nHost: app\r\n\r\n");
            let answer = refused(&tw, request.as_bytes(), "GET", &case).await;
            assert_eq!(answer.status, 200, "{case}: {answer:?}");
            assert_eq!(answer.text(), "zipped-bytes", "{case}: {answer:?}");
            let codings = field(&answer.head, "transfer-encoding").unwrap_or("");
            assert!(codings.ends_with("gzip"), "{case}: {answer:?}");
            assert_eq!(field(&answer.head, "content-length"), None, "{case}");
        }
    }
}

/// A request target is origin-form (`/…`), absolute-form (`http://host/…`), or `*` for OPTIONS
/// (RFC 9112 §3.2; authority-form is CONNECT's, refused anyway): anything else is a 400, not
/// a request for `/` sent upstream with the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_target_of_no_known_form_is_refused_with_a_400() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::ok().await;
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        for target in ["evil", "evil.example:443", "@evil.example/p", "*", "?q=1"] {
            let case = format!("{}, GET {target}", path_name(lean));
            let request = format!("GET {target} HTTP/1.1\r\nHost: app\r\n\r\n");
            let answer = refused(&tw, request.as_bytes(), "GET", &case).await;
            assert_eq!(answer.status, 400, "{case}: {answer:?}");
        }
        assert!(up.got().is_empty(), "{}: {:?}", path_name(lean), up.got());
        for (request, forwarded) in [
            (
                "OPTIONS * HTTP/1.1\r\nHost: app\r\n\r\n",
                "options * http/1.1",
            ),
            (
                "GET http://app/abs?q=1 HTTP/1.1\r\nHost: app\r\n\r\n",
                "get /abs?q=1 http/1.1",
            ),
        ] {
            let case = format!("{}, {request:?}", path_name(lean));
            let (answer, _) =
                request_then_next(&tw, &[request.as_bytes().to_vec()], Duration::ZERO, "GET").await;
            assert_eq!(answer.status, 200, "{case}: {answer:?}");
            let got = up.got();
            assert!(got[0].head.starts_with(forwarded), "{case}: {got:?}");
            up.got.lock().unwrap().clear();
        }
    }
}

/// RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without Host, or with more
/// than one; an HTTP/1.0 request may lack it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http11_request_without_one_host_is_refused_with_a_400() {
    let provider = FakeProvider::start(300, false, None).await;
    let up = RawUpstream::ok().await;
    for lean in [true, false] {
        let tw = proxy(&up.url(), &provider, lean).await;
        for request in [
            &b"GET /nohost HTTP/1.1\r\nUser-Agent: t\r\n\r\n"[..],
            b"GET http://app/nohost HTTP/1.1\r\n\r\n",
            b"GET /twohosts HTTP/1.1\r\nHost: app\r\nHost: other\r\n\r\n",
        ] {
            let case = format!("{}, {}", path_name(lean), String::from_utf8_lossy(request));
            let answer = refused(&tw, request, "GET", &case).await;
            assert_eq!(answer.status, 400, "{case}: {answer:?}");
        }
        assert!(up.got().is_empty(), "{}: {:?}", path_name(lean), up.got());
        let mut s = TcpStream::connect(tw.proxy).await.unwrap();
        s.write_all(b"GET /old HTTP/1.0\r\n\r\n").await.unwrap();
        let answer = read_answer(&mut s, &mut Vec::new(), "GET").await;
        assert_eq!(answer.status, 200, "{}: {answer:?}", path_name(lean));
        up.got.lock().unwrap().clear();
    }
}
