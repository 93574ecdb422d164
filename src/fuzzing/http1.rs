//! The `http1_request` fuzz target's case: a request built from the fuzzer's bytes (arbitrary
//! header lines, a body framed by Content-Length or chunks with extensions and trailers, bytes
//! of a next request behind it), written cut at the fuzzer's read boundaries through the lean
//! path's request relay to an in-memory upstream that parses what it gets strictly. The
//! upstream must see exactly the body the client meant, or nothing complete when the request was
//! refused (a 400), and never a second request.

use std::cell::RefCell;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::proxy::lean::relay_one_request;

/// Streams hold at most this much unread, so a large body waits for its reader as on a socket;
/// more than one 64 KiB read, so a write of that size can be read whole.
const PIPE: usize = 128 << 10;

/// A case that takes longer waits for bytes the client already sent.
const HANG: Duration = Duration::from_secs(5);

thread_local! {
    static RUNTIME: RefCell<tokio::runtime::Runtime> = RefCell::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime"),
    );
}

/// Reads choices off the fuzzer's bytes; zeros once they run out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let Some((first, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        *first
    }

    fn u16(&mut self) -> usize {
        usize::from(self.byte()) << 8 | usize::from(self.byte())
    }

    /// Up to `max` bytes, none of them in `banned`.
    fn bytes(&mut self, max: usize, banned: &[u8]) -> Vec<u8> {
        let n = usize::from(self.byte()) % (max + 1);
        let n = n.min(self.0.len());
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        taken
            .iter()
            .copied()
            .filter(|b| !banned.contains(b))
            .collect()
    }
}

/// Field names and values that change how a proxy treats a request.
const NAMES: [&str; 10] = [
    "Connection",
    "Expect",
    "Upgrade",
    "Keep-Alive",
    "TE",
    "Trailer",
    "Proxy-Connection",
    "X-Forwarded-For",
    "X-Session",
    "Host",
];
const VALUES: [&str; 9] = [
    "close",
    "keep-alive",
    "100-continue",
    "websocket",
    "h2c",
    "trailers",
    "x-session, upgrade",
    "Upgrade, HTTP2-Settings",
    "x-forwarded-for",
];

/// One header line: mostly a well-formed field (a name and value that matter to a proxy, or
/// made of the fuzzer's bytes), sometimes any bytes but CR and LF.
fn header_line(input: &mut Input) -> Vec<u8> {
    let choice = input.byte();
    if choice.is_multiple_of(8) {
        return input.bytes(48, b"\r\n");
    }
    let token = |b: u8| b"abcdefghijklmnopqrstuvwxyz0123456789-_.!#"[usize::from(b) % 41];
    let name: Vec<u8> = if choice % 8 == 1 {
        let raw = input.bytes(16, b"");
        std::iter::once(b'x')
            .chain(raw.into_iter().map(token))
            .collect()
    } else {
        NAMES[usize::from(input.byte()) % NAMES.len()]
            .as_bytes()
            .to_vec()
    };
    let value: Vec<u8> = if input.byte().is_multiple_of(2) {
        VALUES[usize::from(input.byte()) % VALUES.len()]
            .as_bytes()
            .to_vec()
    } else {
        let raw = input.bytes(24, b"");
        raw.into_iter().map(|b| b' ' + b % 95).collect()
    };
    [&name[..], b": ", &value[..]].concat()
}

/// A request as the client writes it and the body it means.
struct Case {
    wire: Vec<u8>,
    body: Vec<u8>,
    /// Where the client's writes end (cumulative offsets).
    cuts: Vec<usize>,
}

fn build(data: &[u8]) -> Case {
    let mut input = Input(data);
    let method =
        ["POST", "PUT", "GET", "PATCH", "DELETE", "OPTIONS"][usize::from(input.byte()) % 6];
    let framing = input.byte() % 3;
    let mut wire = format!("{method} /fuzz HTTP/1.1\r\nHost: upstream\r\n").into_bytes();
    for _ in 0..input.byte() % 6 {
        let line = header_line(&mut input);
        // The framing is the case's own; a second framing field would make "the body the
        // client meant" a matter of opinion.
        let name = line.split(|b| *b == b':').next().unwrap_or_default();
        // An empty line would end the head here.
        if line.is_empty()
            || name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
        {
            continue;
        }
        wire.extend_from_slice(&line);
        wire.extend_from_slice(b"\r\n");
    }
    let seed = input.byte();
    let data = |n: usize, salt: usize| -> Vec<u8> {
        (0..n)
            .map(|i| (i + salt + usize::from(seed)) as u8)
            .collect()
    };
    let mut body = Vec::new();
    match framing {
        0 => wire.extend_from_slice(b"\r\n"),
        1 => {
            body = data(input.u16() % 70_000, 0);
            wire.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            wire.extend_from_slice(&body);
        }
        _ => {
            wire.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            for chunk in 0..input.byte() % 5 {
                // Up to past 64 KiB, so a size line and its data can fill a read exactly.
                let size = input.u16() % 0x11000 + 1;
                // A bare LF may come: the lean path must then refuse the request.
                let ext = input.bytes(12, b"\r");
                wire.extend_from_slice(format!("{size:x}").as_bytes());
                if !ext.is_empty() {
                    wire.push(b';');
                    wire.extend_from_slice(&ext);
                }
                wire.extend_from_slice(b"\r\n");
                let piece = data(size, usize::from(chunk) * 7);
                wire.extend_from_slice(&piece);
                wire.extend_from_slice(b"\r\n");
                body.extend_from_slice(&piece);
            }
            wire.extend_from_slice(b"0\r\n");
            for _ in 0..input.byte() % 3 {
                let line = input.bytes(24, b"\r\n");
                if !line.is_empty() {
                    wire.extend_from_slice(&line);
                    wire.extend_from_slice(b"\r\n");
                }
            }
            wire.extend_from_slice(b"\r\n");
        }
    }
    if input.byte() % 2 == 1 {
        // A next request right behind: it must not reach the upstream as part of this one.
        wire.extend_from_slice(
            b"POST /next HTTP/1.1\r\nHost: upstream\r\nContent-Length: 3\r\n\r\nabc",
        );
    }
    let mut cuts = Vec::new();
    let mut at = 0;
    while at < wire.len() {
        let head_end = wire
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(wire.len(), |p| p + 4);
        let step = match input.byte() {
            0 => wire.len(),
            1 => 65_536,
            2 if at < head_end => head_end - at,
            b => usize::from(b) * usize::from(input.byte().max(1)),
        };
        at = (at + step.max(1)).min(wire.len());
        cuts.push(at);
    }
    Case { wire, body, cuts }
}

/// What the in-memory upstream made of the bytes it got.
#[derive(Debug, Default)]
struct Seen {
    /// Bodies of the complete requests.
    requests: Vec<Vec<u8>>,
    /// Why parsing stopped: the connection ended mid-request, or bytes that do not parse.
    stopped: Option<String>,
}

/// Reads requests strictly until the proxy side closes, answering each with an empty 200.
async fn upstream(mut s: DuplexStream) -> Seen {
    let mut seen = Seen::default();
    let mut buf = Vec::new();
    loop {
        match read_request(&mut s, &mut buf).await {
            Ok(Some(body)) => {
                seen.requests.push(body);
                if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .await
                    .is_err()
                {
                    return seen;
                }
            }
            Ok(None) => return seen,
            Err(e) => {
                // Dropping the stream ends the relay's wait for an answer at once.
                seen.stopped = Some(e);
                return seen;
            }
        }
    }
}

async fn more(s: &mut DuplexStream, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 8192];
    match s.read(&mut chunk).await {
        Ok(n) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        _ => Err(format!("ended after {:?}", String::from_utf8_lossy(buf))),
    }
}

async fn line(s: &mut DuplexStream, buf: &mut Vec<u8>) -> Result<Vec<u8>, String> {
    loop {
        if let Some(lf) = buf.iter().position(|b| *b == b'\n') {
            if lf == 0 || buf[lf - 1] != b'\r' {
                return Err("a bare LF".into());
            }
            let line = buf[..lf - 1].to_vec();
            buf.drain(..=lf);
            return Ok(line);
        }
        more(s, buf).await?;
    }
}

/// One request's body, `None` when the connection ended cleanly before a request.
async fn read_request(s: &mut DuplexStream, buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, String> {
    if buf.is_empty() && more(s, buf).await.is_err() {
        return Ok(None);
    }
    let mut head = Vec::new();
    loop {
        let l = line(s, buf).await?;
        if l.is_empty() {
            break;
        }
        head.push(String::from_utf8_lossy(&l).to_ascii_lowercase());
    }
    let field = |name: &str| {
        head.iter()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.trim().to_string())
            .collect::<Vec<_>>()
    };
    let (te, cl) = (field("transfer-encoding"), field("content-length"));
    let mut body = Vec::new();
    match (te.as_slice(), cl.as_slice()) {
        ([], []) => {}
        ([], [length]) => {
            let length: usize = length.parse().map_err(|_| "bad Content-Length")?;
            while buf.len() < length {
                more(s, buf).await?;
            }
            body.extend(buf.drain(..length));
        }
        ([chunked], []) if chunked == "chunked" => loop {
            let size_line = line(s, buf).await?;
            let size = usize::from_str_radix(&String::from_utf8_lossy(&size_line), 16)
                .map_err(|_| format!("chunk size line {size_line:?}"))?;
            if size == 0 {
                if !line(s, buf).await?.is_empty() {
                    return Err("trailers went upstream".into());
                }
                break;
            }
            while buf.len() < size + 2 {
                more(s, buf).await?;
            }
            if &buf[size..size + 2] != b"\r\n" {
                return Err("a chunk not followed by CRLF".into());
            }
            body.extend(buf.drain(..size));
            buf.drain(..2);
        },
        _ => return Err(format!("framing fields {te:?} {cl:?}")),
    }
    Ok(Some(body))
}

/// Runs one case; panics when the upstream saw anything but the client's body (or nothing
/// complete, for a refused request), or more than one request.
pub fn http1_request(data: &[u8]) {
    let case = build(data);
    RUNTIME.with(|runtime| runtime.borrow().block_on(run(case)));
}

async fn run(case: Case) {
    let (mut client, proxy_client_side) = tokio::io::duplex(PIPE);
    let (proxy_upstream_side, upstream_side) = tokio::io::duplex(PIPE);
    let wire = case.wire.clone();
    let cuts = case.cuts.clone();
    let writer = async move {
        let mut from = 0;
        for to in cuts {
            if client.write_all(&wire[from..to]).await.is_err() {
                break;
            }
            from = to;
            // Lets the proxy read before the next write: the cut becomes a read boundary.
            tokio::task::yield_now().await;
        }
        // Held open (and drained of 100s) until the relay is done: an early EOF would hide a
        // relay that waits for bytes it was already given.
        let mut sink = [0u8; 1024];
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
        std::future::pending::<()>().await;
    };
    let relay = async {
        let outcome = tokio::time::timeout(
            HANG,
            relay_one_request(Box::new(proxy_client_side), Box::new(proxy_upstream_side)),
        )
        .await;
        // Both proxy-side streams are dropped here: the upstream then sees the end.
        outcome.unwrap_or_else(|_| panic!("the relay waited for bytes the client had sent"))
    };
    let (outcome, seen) = tokio::select! {
        both = async { tokio::join!(relay, upstream(upstream_side)) } => both,
        _ = writer => unreachable!("the client never ends"),
    };
    match outcome {
        Ok(whole) => {
            assert!(
                whole,
                "the upstream answered before the body ended: {seen:?}"
            );
            assert_eq!(seen.requests.len(), 1, "requests upstream: {seen:?}");
            assert!(
                seen.requests[0] == case.body,
                "the body changed on its way: sent {} bytes as {:?}, cut at {:?}; the upstream got {} bytes",
                case.body.len(),
                String::from_utf8_lossy(&case.wire[..case.wire.len().min(300)]),
                case.cuts,
                seen.requests[0].len()
            );
            assert!(seen.stopped.is_none(), "bytes after the request: {seen:?}");
        }
        Err(e) => {
            let refused = e.esource() == &pingora::prelude::ErrorSource::Downstream;
            assert!(refused, "the relay failed on its own: {e}");
            assert!(seen.requests.len() <= 1, "requests upstream: {seen:?}");
            if let Some(body) = seen.requests.first() {
                assert!(
                    *body == case.body,
                    "a refused request reached the upstream changed"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_requests_reach_the_upstream_whole_through_the_lean_relay() {
        // A fixed walk through the input space (xorshift), the fuzzer's seeds, and the cases
        // of issue 18 defect 1: trailers; a 64 KiB-aligned chunk; byte-by-byte cuts.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        };
        for _ in 0..200 {
            let len = usize::from(next()) + 8;
            let input: Vec<u8> = (0..len).map(|_| next()).collect();
            http1_request(&input);
        }
        // POST, chunked, no header lines, seed 0, two chunks (0xfffa and 5 bytes) without
        // extensions, one trailer "x: y", no next request; written as the head, then 64 KiB
        // (the first chunk's size line and data, exactly), then 3 bytes at a time.
        let aligned = [
            0, 2, 0, 0, 2, 0xff, 0xf9, 0, 0, 4, 0, 1, 4, b'x', b':', b' ', b'y', 0, 2, 1, 3, 1,
        ];
        http1_request(&aligned);
        let seeds = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/http1_request");
        let mut ran = 0;
        for seed in std::fs::read_dir(seeds).expect("the fuzzer's seeds") {
            http1_request(&std::fs::read(seed.unwrap().path()).unwrap());
            ran += 1;
        }
        assert!(ran > 0, "no seeds in {seeds}");
    }
}
