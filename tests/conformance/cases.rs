//! The corpus: each case is the raw bytes a client sends, the raw answers a scripted upstream
//! gives, the write boundaries to send them with, and the exact bytes the upstream and the
//! client must receive (after normalisation: `<TOKEN>` for the injected token, `<UPSTREAM>`
//! for the upstream's address, `Date: <DATE>`; chunked bodies compared as one chunk).

use crate::Path;
use crate::common::peers::{Boundary, End, Step, Up};
use crate::common::raw;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    Proxy,
    Admin,
}

/// What the full path does differently from the lean path, and why that is allowed.
#[derive(Clone, Debug)]
pub struct PathDifference {
    pub reason: &'static str,
    pub upstream: Option<Vec<Vec<u8>>>,
    pub client: Option<Vec<u8>>,
    /// How the client connection ends on the full path, when not as on the lean path.
    pub end: Option<End>,
}

#[derive(Clone, Debug)]
pub struct Case {
    pub name: &'static str,
    /// "ordinary", or the defect of issue 18 it pins.
    pub covers: &'static str,
    pub target: Target,
    pub client: Vec<Step>,
    /// The upstream's script per connection, in accept order.
    pub upstream: Vec<Vec<Up>>,
    pub boundaries: Vec<Boundary>,
    pub end: End,
    /// What each upstream connection must receive (connections that carried only the
    /// runner's sentinel request are left out).
    pub expect_upstream: Vec<Vec<u8>>,
    /// Each upstream connection need only start with its expected bytes, and carry no more
    /// whole requests than they do, and there may be fewer connections than expected: for
    /// requests cut short (an upload the upstream refused early, a body the proxy found
    /// invalid half-way), where how much of them got through depends on timing.
    pub upstream_prefix: bool,
    pub expect_client: Vec<u8>,
    pub full_path: Option<PathDifference>,
    /// An informational answer the proxy relays a bounded number of times: every copy of it
    /// is taken out of what the client received before comparing, and there must be at most
    /// this many.
    pub bounded_1xx: Option<(&'static [u8], usize)>,
    /// Also run against nginx as the upstream (ordinary requests nginx serves as an origin).
    pub nginx_upstream: bool,
}

impl Case {
    pub fn expected(&self, path: Path) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut up = self.expect_upstream.clone();
        if path == Path::Full {
            up = up.iter().map(|c| transfer_encoding_last(c)).collect();
        }
        let mut client = self.expect_client.clone();
        if let (Path::Full, Some(d)) = (path, &self.full_path) {
            if let Some(u) = &d.upstream {
                up = u.clone();
            }
            if let Some(c) = &d.client {
                client = c.clone();
            }
        }
        (up, client)
    }

    /// How the client connection ends on `path`.
    pub fn end_on(&self, path: Path) -> End {
        match (path, &self.full_path) {
            (Path::Full, Some(PathDifference { end: Some(end), .. })) => *end,
            _ => self.end,
        }
    }

    /// How many final answers the client must have before the runner sends its sentinel.
    pub fn final_answers(&self, path: Path) -> usize {
        let methods = raw::methods_of(&self.client_bytes());
        raw::responses(&self.expected(path).1, &methods, true)
            .messages
            .iter()
            .filter(|m| !(100..200).contains(&m.head.status()))
            .count()
    }

    /// Every byte the client sends (for reading the answers in order).
    pub fn client_bytes(&self) -> Vec<u8> {
        self.client
            .iter()
            .flat_map(|s| match s {
                Step::Send(b) | Step::SendAfterContinue(b) => b.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    fn send(mut self, bytes: impl AsRef<[u8]>) -> Self {
        self.client.push(Step::Send(bytes.as_ref().to_vec()));
        self
    }
    fn wait_for_answers(mut self, n: usize) -> Self {
        self.client.push(Step::WaitForAnswers(n));
        self
    }
    fn wait_for(mut self, bytes: impl AsRef<[u8]>) -> Self {
        self.client.push(Step::WaitFor(bytes.as_ref().to_vec()));
        self
    }
    fn send_after_continue(mut self, bytes: impl AsRef<[u8]>) -> Self {
        self.client
            .push(Step::SendAfterContinue(bytes.as_ref().to_vec()));
        self
    }
    fn await_upstream(mut self) -> Self {
        self.client.push(Step::AwaitUpstream);
        self
    }
    fn upstream(mut self, steps: Vec<Up>) -> Self {
        self.upstream.push(steps);
        self
    }
    fn boundaries(mut self, b: Vec<Boundary>) -> Self {
        self.boundaries = b;
        self
    }
    fn end(mut self, end: End) -> Self {
        self.end = end;
        self
    }
    fn admin(mut self) -> Self {
        self.target = Target::Admin;
        self
    }
    fn expect_upstream(mut self, conns: &[&[u8]]) -> Self {
        self.expect_upstream = conns.iter().map(|c| c.to_vec()).collect();
        self
    }
    fn upstream_prefix(mut self) -> Self {
        self.upstream_prefix = true;
        self
    }
    fn expect_client(mut self, bytes: impl AsRef<[u8]>) -> Self {
        self.expect_client = bytes.as_ref().to_vec();
        self
    }
    fn full_path_differs(
        mut self,
        reason: &'static str,
        upstream: Option<&[&[u8]]>,
        client: Option<&[u8]>,
    ) -> Self {
        self.full_path = Some(PathDifference {
            reason,
            upstream: upstream.map(|u| u.iter().map(|c| c.to_vec()).collect()),
            client: client.map(<[u8]>::to_vec),
            end: None,
        });
        self
    }
    fn bounded_1xx(mut self, head: &'static [u8], at_most: usize) -> Self {
        self.bounded_1xx = Some((head, at_most));
        self
    }
    fn nginx_upstream(mut self) -> Self {
        self.nginx_upstream = true;
        self
    }
}

/// The one difference between the paths that every case with a request body shows.
pub const TE_LAST: &str = "on the full path a forwarded request's `Transfer-Encoding: chunked` is the last field of its head, after the token: pingora-proxy removes it with the other hop-by-hop fields and adds it back after upstream_request_filter (pingora-proxy's finalize_h1_upstream_request_framing); the order of differently named fields carries no meaning (RFC 9110 §5.3)";

/// Moves `Transfer-Encoding: chunked` to the end of every request head in `bytes`.
fn transfer_encoding_last(bytes: &[u8]) -> Vec<u8> {
    const TE: &[u8] = b"Transfer-Encoding: chunked\r\n";
    let move_it = |head: &[u8]| -> Vec<u8> {
        match head.windows(TE.len()).position(|w| w == TE) {
            Some(at) => {
                let mut out = [&head[..at], &head[at + TE.len()..head.len() - 2]].concat();
                out.extend_from_slice(TE);
                out.extend_from_slice(b"\r\n");
                out
            }
            None => head.to_vec(),
        }
    };
    let t = raw::requests(bytes);
    let mut out = Vec::new();
    for m in &t.messages {
        out.extend(move_it(&m.raw_head));
        out.extend_from_slice(&m.canonical()[m.raw_head.len()..]);
    }
    match raw::parse_head(&t.rest) {
        Ok(Some(head)) => {
            out.extend(move_it(&t.rest[..head.len]));
            out.extend_from_slice(&t.rest[head.len..]);
        }
        _ => out.extend_from_slice(&t.rest),
    }
    out
}

fn case(name: &'static str, covers: &'static str) -> Case {
    Case {
        name,
        covers,
        target: Target::Proxy,
        client: Vec::new(),
        upstream: Vec::new(),
        boundaries: vec![Boundary::OneWrite, Boundary::ByteByByte, Boundary::Crlf],
        end: End::KeepAlive,
        expect_upstream: Vec::new(),
        upstream_prefix: false,
        expect_client: Vec::new(),
        full_path: None,
        bounded_1xx: None,
        nginx_upstream: false,
    }
}

fn answer(bytes: &[u8]) -> Up {
    Up::Answer(bytes.to_vec())
}

/// `a` then `b`.
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The upstream's plain answer.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
/// That answer as the client gets it on a kept connection: the proxy adds Date (RFC 9110
/// §6.6.1) and says keep-alive.
const OK_RELAYED: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: <DATE>\r\nConnection: keep-alive\r\n\r\nok";
/// The token line the proxy adds to every request it forwards.
const TOKEN: &[u8] = b"authorization: Bearer <TOKEN>\r\n";

/// `head` (its start line and fields, each with its CRLF) then the token line, the empty
/// line, and `body`: a request as the upstream must get it.
fn fwd(head: &str, body: &[u8]) -> Vec<u8> {
    cat(&[head.as_bytes(), TOKEN, b"\r\n", body])
}

/// An answer as the client gets it: `head` (start line and fields with CRLFs), the proxy's
/// Date and `Connection: connection`, then `body`.
fn relayed(head: &str, connection: &str, body: &[u8]) -> Vec<u8> {
    cat(&[
        head.as_bytes(),
        b"Date: <DATE>\r\nConnection: ",
        connection.as_bytes(),
        b"\r\n\r\n",
        body,
    ])
}

/// pingora's own answer to a request it cannot parse.
const PINGORA_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\nDate: <DATE>\r\nContent-Length: 0\r\nCache-Control: private, no-store\r\nConnection: close\r\n\r\n";

/// One of tokenward's JSON error answers, on a connection it then closes.
fn json_error(status: &str, error: &str, reason: &str) -> Vec<u8> {
    let body = format!("{{\"error\":\"{error}\",\"reason\":\"{reason}\",\"route\":\"api\"}}");
    relayed(
        &format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
            body.len()
        ),
        "close",
        body.as_bytes(),
    )
}

/// The methods tokenward's 405 names in `Allow`.
const ALLOW: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// One of tokenward's JSON answers to a request it refuses before routing (no route named), on
/// a connection it then closes; a 405 names the allowed methods.
fn refused(status: &str, body: &str) -> Vec<u8> {
    let allow = if status.starts_with("405") {
        format!("Allow: {ALLOW}\r\n")
    } else {
        String::new()
    };
    relayed(
        &format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\n{allow}",
            body.len()
        ),
        "close",
        body.as_bytes(),
    )
}

/// A WebSocket handshake as pingora forwards it: its fields in the order pingora-proxy writes
/// them (the order of differently named fields carries no meaning, RFC 9110 §5.3).
const WS_FORWARDED: &str = "GET /ws HTTP/1.1\r\nHost: <UPSTREAM>\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: Upgrade\r\nupgrade: websocket\r\n";

const WS_HEAD: &str = "GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
const WS_ACCEPT: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

pub fn corpus() -> Vec<Case> {
    let big_chunk = [b'x'; 0xfffa];
    let body_200k = vec![b'b'; 200 << 10];
    let upload_8m = vec![b'u'; 8 << 20];
    let flood: Vec<u8> = cat(&[&b"HTTP/1.1 102 Processing\r\n\r\n".repeat(1000), OK]);
    vec![
        // ---- ordinary traffic
        case("get", "ordinary")
            .send(b"GET /a?q=1 HTTP/1.1\r\nHost: app\r\nUser-Agent: t\r\n\r\n")
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("GET /a?q=1 HTTP/1.1\r\nHost: <UPSTREAM>\r\nUser-Agent: t\r\n", b"")])
            .expect_client(OK_RELAYED)
            .nginx_upstream(),
        case("post-content-length", "ordinary")
            .send(b"POST /p HTTP/1.1\r\nHost: app\r\nContent-Length: 11\r\n\r\nhello world")
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("POST /p HTTP/1.1\r\nHost: <UPSTREAM>\r\nContent-Length: 11\r\n", b"hello world")])
            .expect_client(OK_RELAYED)
            .nginx_upstream(),
        case("post-content-length-200k", "ordinary")
            .send(cat(&[b"POST /big HTTP/1.1\r\nHost: app\r\nContent-Length: 204800\r\n\r\n", &body_200k]))
            .boundaries(vec![Boundary::OneWrite, Boundary::Aligned64K])
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("POST /big HTTP/1.1\r\nHost: <UPSTREAM>\r\nContent-Length: 204800\r\n", &body_200k)])
            .expect_client(OK_RELAYED)
            .nginx_upstream(),
        case("post-chunked", "ordinary")
            .send(b"POST /c HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n-world\r\n0\r\n\r\n")
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("POST /c HTTP/1.1\r\nHost: <UPSTREAM>\r\nTransfer-Encoding: chunked\r\n", b"b\r\nhello-world\r\n0\r\n\r\n")])
            .expect_client(OK_RELAYED)
            .nginx_upstream(),
        case("answer-chunked", "ordinary")
            .send(b"GET /chunked HTTP/1.1\r\nHost: app\r\n\r\n")
            .upstream(vec![answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n-world\r\n0\r\n\r\n")])
            .expect_upstream(&[&fwd("GET /chunked HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(relayed("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", "keep-alive", b"b\r\nhello-world\r\n0\r\n\r\n")),
        case("answer-close-delimited", "ordinary")
            .send(b"GET /close HTTP/1.1\r\nHost: app\r\n\r\n")
            .upstream(vec![answer(b"HTTP/1.1 200 OK\r\n\r\nclose-delimited"), Up::Close])
            .expect_upstream(&[&fwd("GET /close HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            // The client's connection outlives the upstream's: the body is re-framed chunked.
            .expect_client(relayed("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", "keep-alive", b"f\r\nclose-delimited\r\n0\r\n\r\n")),
        case("keep-alive-two-requests", "ordinary")
            .send(b"GET /1 HTTP/1.1\r\nHost: app\r\n\r\n")
            .wait_for_answers(1)
            .send(b"POST /2 HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\n\r\nabc")
            .upstream(vec![answer(OK), answer(OK)])
            .expect_upstream(&[&cat(&[
                &fwd("GET /1 HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b""),
                &fwd("POST /2 HTTP/1.1\r\nHost: <UPSTREAM>\r\nContent-Length: 3\r\n", b"abc"),
            ])])
            .expect_client(cat(&[OK_RELAYED, OK_RELAYED]))
            .nginx_upstream(),
        case("pipelined-three", "ordinary")
            .send(b"GET /1 HTTP/1.1\r\nHost: app\r\n\r\nPOST /2 HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nHost: app\r\n\r\n")
            .upstream(vec![answer(OK), answer(OK), answer(OK)])
            .expect_upstream(&[&cat(&[
                &fwd("GET /1 HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b""),
                &fwd("POST /2 HTTP/1.1\r\nHost: <UPSTREAM>\r\nContent-Length: 3\r\n", b"abc"),
                &fwd("GET /3 HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b""),
            ])])
            .expect_client(cat(&[OK_RELAYED, OK_RELAYED, OK_RELAYED]))
            .nginx_upstream(),
        case("head", "ordinary")
            .send(b"HEAD /h HTTP/1.1\r\nHost: app\r\n\r\n")
            .upstream(vec![answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")])
            .expect_upstream(&[&fwd("HEAD /h HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(relayed("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n", "keep-alive", b""))
            .nginx_upstream(),
        case("head-chunked", "ordinary")
            .send(b"HEAD /hc HTTP/1.1\r\nHost: app\r\n\r\n")
            .upstream(vec![answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")])
            .expect_upstream(&[&fwd("HEAD /hc HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(relayed("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", "keep-alive", b"")),
        case("no-content-204", "ordinary")
            .send(b"DELETE /x HTTP/1.1\r\nHost: app\r\n\r\n")
            .upstream(vec![answer(b"HTTP/1.1 204 No Content\r\n\r\n")])
            .expect_upstream(&[&fwd("DELETE /x HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(relayed("HTTP/1.1 204 No Content\r\n", "keep-alive", b"")),
        case("not-modified-304", "ordinary")
            .send(b"GET /etag HTTP/1.1\r\nHost: app\r\nIf-None-Match: \"a\"\r\n\r\n")
            .upstream(vec![answer(b"HTTP/1.1 304 Not Modified\r\nETag: \"a\"\r\nContent-Length: 10\r\n\r\n")])
            .expect_upstream(&[&fwd("GET /etag HTTP/1.1\r\nHost: <UPSTREAM>\r\nIf-None-Match: \"a\"\r\n", b"")])
            .expect_client(relayed("HTTP/1.1 304 Not Modified\r\nETag: \"a\"\r\nContent-Length: 10\r\n", "keep-alive", b"")),
        case("early-hints-103", "ordinary")
            .send(b"GET /hints HTTP/1.1\r\nHost: app\r\n\r\n")
            .upstream(vec![answer(&cat(&[b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n", OK]))])
            .expect_upstream(&[&fwd("GET /hints HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(cat(&[b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n", OK_RELAYED])),
        case("processing-102", "ordinary")
            .send(b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n")
            .upstream(vec![answer(&cat(&[b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n", OK]))])
            .expect_upstream(&[&fwd("GET /slow HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(cat(&[b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n", OK_RELAYED])),
        case("unsolicited-100", "ordinary")
            .send(b"GET /u HTTP/1.1\r\nHost: app\r\n\r\n")
            .upstream(vec![answer(&cat(&[b"HTTP/1.1 100 Continue\r\n\r\n", OK]))])
            .expect_upstream(&[&fwd("GET /u HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            // A proxy forwards a 1xx it did not ask for (RFC 9110 §15.2).
            .expect_client(cat(&[b"HTTP/1.1 100 Continue\r\n\r\n", OK_RELAYED])),
        case("absolute-form", "ordinary")
            .send(b"GET http://elsewhere.example/abs?q=1 HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n")
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("GET /abs?q=1 HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(OK_RELAYED)
            .nginx_upstream(),
        case("hop-by-hop-request", "ordinary")
            .send(b"GET /hops HTTP/1.1\r\nHost: app\r\nConnection: X-Hop, Keep-Alive\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Connection: keep-alive\r\nAuthorization: Bearer callers-own\r\nX-Kept: 2\r\n\r\n")
            .upstream(vec![answer(OK)])
            // The token takes the place of the caller's own Authorization.
            .expect_upstream(&[b"GET /hops HTTP/1.1\r\nHost: <UPSTREAM>\r\nauthorization: Bearer <TOKEN>\r\nX-Kept: 2\r\n\r\n"])
            .expect_client(OK_RELAYED)
            .nginx_upstream(),
        case("http10", "ordinary")
            .send(b"GET /old HTTP/1.0\r\nHost: app\r\n\r\n")
            .end(End::Closed)
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("GET /old HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(relayed("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", "close", b"ok"))
            .nginx_upstream(),
        case("http10-keep-alive", "ordinary")
            .send(b"GET /old HTTP/1.0\r\nHost: app\r\nConnection: keep-alive\r\n\r\n")
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("GET /old HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(OK_RELAYED)
            .nginx_upstream(),
        case("http10-chunked-answer", "ordinary")
            .send(b"GET /old HTTP/1.0\r\nHost: app\r\n\r\n")
            .end(End::Closed)
            .upstream(vec![answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")])
            .expect_upstream(&[&fwd("GET /old HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            // An HTTP/1.0 client knows no chunked coding: the body ends with the connection.
            .expect_client(relayed("HTTP/1.1 200 OK\r\n", "close", b"hello")),
        case("expect-100-continue", "ordinary")
            .send(b"PUT /e HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 6\r\n\r\n")
            .send_after_continue(b"abcdef")
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("PUT /e HTTP/1.1\r\nHost: <UPSTREAM>\r\nContent-Length: 6\r\n", b"abcdef")])
            .expect_client(cat(&[b"HTTP/1.1 100 Continue\r\n\r\n", OK_RELAYED]))
            .full_path_differs(
                "the lean path answers the client's 100-continue itself (as nginx does) and sends no Expect upstream; pingora-proxy passes Expect on and relays the upstream's 100; both keep the connection",
                Some(&[&fwd("PUT /e HTTP/1.1\r\nHost: <UPSTREAM>\r\nExpect: 100-continue\r\nContent-Length: 6\r\n", b"abcdef")]),
                None,
            ),
        // ---- upgrades and CONNECT
        case("websocket", "ordinary")
            // As RFC 6455 §4.1 has it: the client waits for the 101 before its first frame.
            .send(format!("{WS_HEAD}\r\n"))
            .wait_for(b"\r\n\r\n")
            .send(b"frame-1")
            .wait_for(b"frame-1")
            .end(End::ClientCloses)
            .upstream(vec![Up::Tunnel(WS_ACCEPT.to_vec())])
            .expect_upstream(&[&fwd(WS_FORWARDED, b"frame-1")])
            .expect_client(cat(&[WS_ACCEPT, b"frame-1"])),
        // A client that sends its first frame without waiting for the 101.
        case("websocket-accepted", "defect 3")
            .send(format!("{WS_HEAD}\r\nframe-1"))
            .wait_for(b"frame-1")
            .send(b"frame-2")
            .wait_for(b"frame-2")
            .end(End::ClientCloses)
            .upstream(vec![Up::Tunnel(WS_ACCEPT.to_vec())])
            .expect_upstream(&[&fwd(WS_FORWARDED, b"frame-1frame-2")])
            .expect_client(cat(&[WS_ACCEPT, b"frame-1frame-2"])),
        case("websocket-refused", "defect 3")
            .send(format!("{WS_HEAD}\r\n"))
            .upstream(vec![answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")])
            .expect_upstream(&[&fwd(WS_FORWARDED, b"")])
            .expect_client(relayed("HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n", "keep-alive", b"no")),
        case("h2c-upgrade", "defect 3")
            .send(b"GET /h2c HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("GET /h2c HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(OK_RELAYED)
            .nginx_upstream(),
        case("websocket-with-body", "defect 6")
            .send(format!("{WS_HEAD}Content-Length: 5\r\n\r\nhello"))
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("GET /ws HTTP/1.1\r\nHost: <UPSTREAM>\r\nContent-Length: 5\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"hello")])
            .expect_client(OK_RELAYED),
        case("connect", "defect 4")
            .send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            .end(End::Closed)
            // Nothing goes upstream; a JSON 405, and the connection closes (nginx answers 400).
            .expect_client(refused("405 Method Not Allowed", r#"{"error":"method_not_allowed","message":"CONNECT is not forwarded"}"#)),
        // An upstream that implements TRACE echoes the request, the route's token with it.
        case("trace", "issue 18 follow-up 1")
            .send(b"TRACE /echo HTTP/1.1\r\nHost: app\r\n\r\n")
            .end(End::Closed)
            .upstream(vec![answer(OK)])
            .expect_client(refused("405 Method Not Allowed", r#"{"error":"method_not_allowed","message":"TRACE is not forwarded"}"#)),
        case("track", "issue 18 follow-up 1")
            .send(b"TRACK /echo HTTP/1.1\r\nHost: app\r\n\r\n")
            .end(End::Closed)
            .upstream(vec![answer(OK)])
            .expect_client(refused("405 Method Not Allowed", r#"{"error":"method_not_allowed","message":"TRACK is not forwarded"}"#)),
        case("unsolicited-101", "defect 9")
            .send(b"GET /no-upgrade HTTP/1.1\r\nHost: app\r\n\r\n")
            .end(End::Closed)
            .upstream(vec![Up::Tunnel(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\nraw bytes".to_vec())])
            .expect_upstream(&[&fwd("GET /no-upgrade HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(json_error("502 Bad Gateway", "upstream_unavailable", "InvalidHTTPHeader")),
        // ---- framing defects
        case("chunked-trailers-request", "defect 1")
            .send(b"POST /t HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n")
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("POST /t HTTP/1.1\r\nHost: <UPSTREAM>\r\nTransfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n")])
            .expect_client(OK_RELAYED)
            .nginx_upstream(),
        case("chunked-trailers-answer", "defect 1")
            .send(b"GET /ct HTTP/1.1\r\nHost: app\r\n\r\n")
            .upstream(vec![answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n")])
            .expect_upstream(&[&fwd("GET /ct HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(relayed("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", "keep-alive", b"5\r\nhello\r\n0\r\n\r\n")),
        case("chunk-crlf-late", "defect 1")
            .send(b"POST /late HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n-world\r\n0\r\n\r\n")
            // "5\r\nhello", then 100 ms later the chunk's CRLF and the rest.
            .boundaries(vec![Boundary::At(&[66]), Boundary::ByteByByte, Boundary::OneWrite])
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("POST /late HTTP/1.1\r\nHost: <UPSTREAM>\r\nTransfer-Encoding: chunked\r\n", b"b\r\nhello-world\r\n0\r\n\r\n")])
            .expect_client(OK_RELAYED)
            .nginx_upstream(),
        case("chunk-fills-64k-read", "defect 1")
            .send(cat(&[b"POST /fffa HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nfffa\r\n", &big_chunk, b"\r\n0\r\n\r\n"]))
            .boundaries(vec![Boundary::OneWrite, Boundary::Aligned64K])
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("POST /fffa HTTP/1.1\r\nHost: <UPSTREAM>\r\nTransfer-Encoding: chunked\r\n", &cat(&[b"fffa\r\n", &big_chunk, b"\r\n0\r\n\r\n"]))])
            .expect_client(OK_RELAYED)
            .nginx_upstream(),
        case("answer-chunk-fills-64k-read", "defect 1")
            .send(b"GET /fffa HTTP/1.1\r\nHost: app\r\n\r\n")
            .boundaries(vec![Boundary::OneWrite, Boundary::Aligned64K])
            .upstream(vec![answer(&cat(&[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffa\r\n", &big_chunk, b"\r\n0\r\n\r\n"]))])
            .expect_upstream(&[&fwd("GET /fffa HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(relayed("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", "keep-alive", &cat(&[b"fffa\r\n", &big_chunk, b"\r\n0\r\n\r\n"]))),
        case("early-401-during-upload", "defect 2")
            .send(cat(&[b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 8388608\r\n\r\n", &upload_8m]))
            .boundaries(vec![Boundary::OneWrite])
            .end(End::Closed)
            .upstream(vec![Up::AnswerAfterHead(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()), Up::Close])
            .expect_upstream(&[&fwd("POST /upload HTTP/1.1\r\nHost: <UPSTREAM>\r\nContent-Length: 8388608\r\n", b"")])
            .upstream_prefix()
            .expect_client(relayed("HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n", "close", b"")),
        case("early-413-during-upload", "defect 2")
            .send(cat(&[b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 8388608\r\n\r\n", &upload_8m]))
            .boundaries(vec![Boundary::OneWrite])
            .end(End::Closed)
            .upstream(vec![Up::AnswerAfterHead(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()), Up::Close])
            .expect_upstream(&[&fwd("POST /upload HTTP/1.1\r\nHost: <UPSTREAM>\r\nContent-Length: 8388608\r\n", b"")])
            .upstream_prefix()
            .expect_client(relayed("HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n", "close", b"")),
        case("expect-100-upstream-fails", "defect 5")
            .send(b"PUT /e HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            .send_after_continue(b"hello")
            .end(End::Closed)
            // The whole request read, then the connection closed unanswered (closed after the
            // head instead, whether writing the body or reading the answer fails first is a
            // race, and the 502's reason with it).
            .upstream(vec![Up::CloseAfterRequest])
            .expect_upstream(&[&fwd("PUT /e HTTP/1.1\r\nHost: <UPSTREAM>\r\nContent-Length: 5\r\n", b"hello")])
            .expect_client(cat(&[b"HTTP/1.1 100 Continue\r\n\r\n", &json_error("502 Bad Gateway", "upstream_unavailable", "ConnectionClosed")]))
            .full_path_differs(
                "the full path passes Expect on (see expect-100-continue); the client's 100 is the upstream's",
                Some(&[&fwd("PUT /e HTTP/1.1\r\nHost: <UPSTREAM>\r\nExpect: 100-continue\r\nContent-Length: 5\r\n", b"hello")]),
                None,
            ),
        case("expect-100-http10", "defect 5")
            .send(b"PUT /e HTTP/1.0\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
            .end(End::Closed)
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("PUT /e HTTP/1.1\r\nHost: <UPSTREAM>\r\nContent-Length: 5\r\n", b"hello")])
            // An HTTP/1.0 client gets no 1xx (RFC 9110 §15.2).
            .expect_client(relayed("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", "close", b"ok")),
        // Both paths take at most 9 Connection options (pingora-proxy's limit; the lean path
        // took 32).
        case("connection-9-options", "defect 6")
            .send(b"GET /opts HTTP/1.1\r\nHost: app\r\nConnection: a1, a2, a3, a4, a5, a6, a7, a8, a9\r\nA1: x\r\nX-Kept: 1\r\n\r\n")
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("GET /opts HTTP/1.1\r\nHost: <UPSTREAM>\r\nX-Kept: 1\r\n", b"")])
            .expect_client(OK_RELAYED),
        case("connection-10-options", "defect 6")
            .send(b"GET /opts HTTP/1.1\r\nHost: app\r\nConnection: a1, a2, a3, a4, a5, a6, a7, a8, a9, a10\r\nA1: x\r\nX-Kept: 1\r\n\r\n")
            .end(End::Closed)
            .expect_client(json_error("400 Bad Request", "proxy_error", "InvalidHTTPHeader")),
        case("connection-33-options", "defect 6")
            .send(format!("GET /opts HTTP/1.1\r\nHost: app\r\nConnection: {}\r\n\r\n", (1..=33).map(|i| format!("a{i}")).collect::<Vec<_>>().join(", ")))
            .end(End::Closed)
            .expect_client(json_error("400 Bad Request", "proxy_error", "InvalidHTTPHeader")),
        case("hop-by-hop-answer", "defect 7")
            .send(b"GET /hop-answer HTTP/1.1\r\nHost: app\r\n\r\n")
            .upstream(vec![answer(b"HTTP/1.1 200 OK\r\nConnection: X-Up-Hop, keep-alive\r\nX-Up-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Kept: 1\r\nContent-Length: 2\r\n\r\nok")])
            .expect_upstream(&[&fwd("GET /hop-answer HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(relayed("HTTP/1.1 200 OK\r\nX-Kept: 1\r\nContent-Length: 2\r\n", "keep-alive", b"ok")),
        case("late-bytes-after-204", "defect 8")
            .send(b"DELETE /late HTTP/1.1\r\nHost: app\r\n\r\n")
            .wait_for(b"\r\n\r\n")
            .await_upstream()
            .upstream(vec![answer(b"HTTP/1.1 204 No Content\r\n\r\n"), Up::Write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate".to_vec()), Up::AwaitClose])
            .expect_upstream(&[&fwd("DELETE /late HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(relayed("HTTP/1.1 204 No Content\r\n", "keep-alive", b"")),
        case("late-bytes-after-head", "defect 8")
            .send(b"HEAD /late HTTP/1.1\r\nHost: app\r\n\r\n")
            .wait_for(b"\r\n\r\n")
            .await_upstream()
            .upstream(vec![answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"), Up::Write(b"late".to_vec()), Up::AwaitClose])
            .expect_upstream(&[&fwd("HEAD /late HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(relayed("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n", "keep-alive", b"")),
        case("late-bytes-with-the-answer", "defect 8")
            .send(b"GET /extra HTTP/1.1\r\nHost: app\r\n\r\n")
            // The stray bytes in the answer's own write (Crlf leaves "okEXTRA" whole), so they
            // are there before the client's next request: byte by byte they could arrive after
            // it was written upstream, which no HTTP/1 proxy can tell apart (defect 8).
            .boundaries(vec![Boundary::OneWrite, Boundary::Crlf])
            .upstream(vec![answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")])
            .expect_upstream(&[&fwd("GET /extra HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(OK_RELAYED),
        case("1xx-flood", "defect 10")
            .send(b"GET /flood HTTP/1.1\r\nHost: app\r\n\r\n")
            .boundaries(vec![Boundary::OneWrite])
            .end(End::Closed)
            .upstream(vec![answer(&flood)])
            // At most 16 relayed, then a 502 (the full path may relay fewer: it counts them
            // as its pipe reads them).
            .bounded_1xx(b"HTTP/1.1 102 Processing\r\n\r\n", 16)
            .expect_upstream(&[&fwd("GET /flood HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(json_error("502 Bad Gateway", "upstream_unavailable", "InvalidHTTPHeader")),
        case("1xx-to-http10", "defect 10")
            .send(b"GET /hints HTTP/1.0\r\nHost: app\r\n\r\n")
            .end(End::Closed)
            .upstream(vec![answer(&cat(&[b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n", OK]))])
            .expect_upstream(&[&fwd("GET /hints HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(relayed("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", "close", b"ok")),
        case("bad-request-400", "defect 11")
            .send(b"GET /bad HTTP/1.1\r\nHost: app\r\nBad Header\r\n\r\n")
            .end(End::Closed)
            .expect_client(PINGORA_400),
        case("upstream-gone-502", "defect 11")
            .send(b"GET /gone HTTP/1.1\r\nHost: app\r\n\r\n")
            .end(End::Closed)
            .upstream(vec![Up::CloseAfterHead])
            .upstream(vec![Up::CloseAfterHead])
            .upstream(vec![Up::CloseAfterHead])
            .expect_upstream(&[&fwd("GET /gone HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(json_error("502 Bad Gateway", "upstream_unavailable", "ConnectionClosed")),
        case("chunk-extension-bare-lf", "defect 12")
            .send(b"POST /lf HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n")
            .end(End::Closed)
            // Refused with a 400: the upstream gets at most the head, never a whole request.
            .expect_upstream(&[&fwd("POST /lf HTTP/1.1\r\nHost: <UPSTREAM>\r\nTransfer-Encoding: chunked\r\n", b"")])
            .upstream_prefix()
            .expect_client(json_error("400 Bad Request", "proxy_error", "HTTPStatus")),
        // A target pingora-core escapes (the space): it parses a rebuilt head, not the one read.
        case("chunk-extension-bare-lf-escaped-target", "issue 18 follow-up 6")
            .send(b"POST /lf x HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n")
            .boundaries(vec![Boundary::OneWrite, Boundary::Crlf])
            .end(End::Closed)
            .expect_upstream(&[&fwd("POST /lf%20x HTTP/1.1\r\nHost: <UPSTREAM>\r\nTransfer-Encoding: chunked\r\n", b"")])
            .upstream_prefix()
            .expect_client(json_error("400 Bad Request", "proxy_error", "HTTPStatus")),
        // A chunk-size line without a size: httparse's `parse_chunk_size` reads it as the last
        // chunk, and what follows as trailers, so the body the client sent would be lost.
        case("chunk-size-empty", "issue 18 breaker F1")
            .send(b"POST /empty HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            .end(End::Closed)
            .expect_upstream(&[&fwd("POST /empty HTTP/1.1\r\nHost: <UPSTREAM>\r\nTransfer-Encoding: chunked\r\n", b"")])
            .upstream_prefix()
            .expect_client(json_error("400 Bad Request", "proxy_error", "HTTPStatus")),
        case("content-length-list", "defect 12")
            .send(b"POST /cl HTTP/1.1\r\nHost: app\r\nContent-Length: 5, 5\r\n\r\nhello")
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("POST /cl HTTP/1.1\r\nHost: <UPSTREAM>\r\nContent-Length: 5\r\n", b"hello")])
            .expect_client(OK_RELAYED),
        case("transfer-encoding-and-content-length", "ordinary")
            .send(b"POST /te-cl HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            // Read by its Transfer-Encoding alone, Content-Length dropped; then the connection
            // must close (RFC 9112 §6.1).
            .end(End::Closed)
            .upstream(vec![answer(OK)])
            .expect_upstream(&[&fwd("POST /te-cl HTTP/1.1\r\nHost: <UPSTREAM>\r\nTransfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n")])
            .expect_client(relayed("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", "close", b"ok")),
        case("transfer-encoding-not-chunked", "ordinary")
            .send(b"POST /gzip HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip\r\n\r\nxxxx")
            .end(End::Closed)
            .expect_client(PINGORA_400),
        // A transfer coding tokenward cannot decode before chunked: not dropped, refused.
        case("transfer-encoding-gzip-chunked", "issue 18 follow-up 2")
            .send(b"POST /gz HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            .end(End::Closed)
            .upstream(vec![answer(OK)])
            .expect_client(refused("501 Not Implemented", r#"{"error":"not_implemented","message":"a request's only transfer coding can be chunked (RFC 9112 §6.1)"}"#)),
        case("target-not-origin-form", "issue 18 follow-up 4")
            .send(b"GET evil HTTP/1.1\r\nHost: app\r\n\r\n")
            .end(End::Closed)
            .upstream(vec![answer(OK)])
            .expect_client(refused("400 Bad Request", r#"{"error":"bad_request","message":"the request target is neither a path, an http(s) URL, nor * for OPTIONS (RFC 9112 §3.2)"}"#)),
        case("space-before-colon", "ordinary")
            .send(b"GET /sp HTTP/1.1\r\nHost: app\r\nX-A : 1\r\n\r\n")
            .end(End::Closed)
            .expect_client(PINGORA_400),
        // Request smuggling classics: each refused with a 400, nothing upstream.
        case("http11-without-host", "issue 18 follow-up 5")
            .send(b"GET /nohost HTTP/1.1\r\nUser-Agent: t\r\n\r\n")
            .end(End::Closed)
            // RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without Host.
            .upstream(vec![answer(OK)])
            .expect_client(refused("400 Bad Request", r#"{"error":"bad_request","message":"an HTTP/1.1 request carries exactly one Host field (RFC 9112 §3.2)"}"#)),
        case("http11-two-hosts", "issue 18 follow-up 5")
            .send(b"GET /twohosts HTTP/1.1\r\nHost: app\r\nHost: other\r\n\r\n")
            .end(End::Closed)
            .upstream(vec![answer(OK)])
            // pingora-core's `validate_request_authority` refuses it while reading the head.
            .expect_client(PINGORA_400),
        case("content-length-negative", "ordinary")
            .send(b"POST /neg HTTP/1.1\r\nHost: app\r\nContent-Length: -1\r\n\r\nhello")
            .end(End::Closed)
            .expect_client(PINGORA_400),
        case("content-length-conflict", "ordinary")
            .send(b"POST /two HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
            .end(End::Closed)
            .expect_client(PINGORA_400),
        case("chunk-size-overflow", "ordinary")
            .send(b"POST /huge HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nhello\r\n0\r\n\r\n")
            .end(End::Closed)
            .expect_upstream(&[&fwd("POST /huge HTTP/1.1\r\nHost: <UPSTREAM>\r\nTransfer-Encoding: chunked\r\n", b"")])
            .upstream_prefix()
            .expect_client(json_error("400 Bad Request", "proxy_error", "InvalidChunk")),
        case("obs-fold", "ordinary")
            .send(b"GET /fold HTTP/1.1\r\nHost: app\r\nX-A: 1\r\n 2\r\n\r\n")
            .end(End::Closed)
            .expect_client(PINGORA_400),
        case("answer-content-length-conflict", "ordinary")
            .send(b"GET /two HTTP/1.1\r\nHost: app\r\n\r\n")
            .end(End::Closed)
            .upstream(vec![answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!")])
            .expect_upstream(&[&fwd("GET /two HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            // RFC 9112 §6.3: an answer whose length cannot be known is a 502 from a proxy.
            .expect_client(json_error("502 Bad Gateway", "upstream_unavailable", "InvalidHTTPHeader")),
        case("answer-content-length-and-chunked", "ordinary")
            .send(b"GET /cl-te HTTP/1.1\r\nHost: app\r\n\r\n")
            .upstream(vec![answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")])
            .expect_upstream(&[&fwd("GET /cl-te HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(relayed("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", "keep-alive", b"5\r\nhello\r\n0\r\n\r\n")),
        // Transfer codings that do not end with chunked: the body ends with the connection
        // (RFC 9112 §6.3), relayed as it came, and the client connection ends with it.
        case("answer-transfer-encoding-gzip", "issue 18 follow-up 3")
            .send(b"GET /gz HTTP/1.1\r\nHost: app\r\n\r\n")
            .end(End::Closed)
            .upstream(vec![answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzipped-bytes"), Up::Close])
            .expect_upstream(&[&fwd("GET /gz HTTP/1.1\r\nHost: <UPSTREAM>\r\n", b"")])
            .expect_client(relayed("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n", "close", b"zipped-bytes")),
        case("admin-http10", "defect 13")
            .admin()
            .send(b"GET /healthz HTTP/1.0\r\n\r\n")
            .end(End::Closed)
            .expect_client(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\nCache-Control: no-store\r\nDate: <DATE>\r\nConnection: close\r\n\r\n{\"status\":\"ok\"}"),
    ]
}
