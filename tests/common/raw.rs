//! HTTP/1.1 on the wire for the conformance suite: a strict framing parser (RFC 9112 §6), the
//! canonical form transcripts are compared in, a readable byte diff, the write boundaries a case
//! is sent with, a scripted raw upstream that records every byte it receives, and a raw client.
//! Everything here uses blocking std sockets on their own threads, so the pacing of writes is
//! not at the mercy of an async runtime's scheduling; every wait is bounded.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A request the runner appends on connections a case leaves open: its answer arriving intact
/// proves the connection is still in step (no stray bytes before it, nothing swallowed).
pub const SENTINEL_REQUEST: &[u8] = b"GET /__end HTTP/1.1\r\nHost: app\r\n\r\n";
pub const SENTINEL_TARGET: &str = "/__end";
/// What the scripted upstream answers to the sentinel, on any connection, outside any script.
pub const SENTINEL_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nend";

/// How long any one wait of the runner may take before the run is recorded as stuck: long
/// enough for a debug build on a loaded machine; only a failing run waits it out.
pub const STEP_WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Parsing

/// One message head: its start line, its fields (names lower-cased) and its length on the wire.
#[derive(Clone, Debug)]
pub struct Head {
    pub start: String,
    pub fields: Vec<(String, Vec<u8>)>,
    pub len: usize,
}

impl Head {
    pub fn values(&self, name: &str) -> impl Iterator<Item = &[u8]> {
        self.fields
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
    pub fn has(&self, name: &str) -> bool {
        self.values(name).next().is_some()
    }
    /// The comma-separated members of every `name` field, trimmed, lower-cased.
    pub fn list(&self, name: &str) -> Vec<String> {
        self.values(name)
            .flat_map(|v| v.split(|b| *b == b','))
            .map(|m| String::from_utf8_lossy(m.trim_ascii()).to_ascii_lowercase())
            .filter(|m| !m.is_empty())
            .collect()
    }
    pub fn method(&self) -> &str {
        self.start.split(' ').next().unwrap_or("")
    }
    pub fn target(&self) -> &str {
        self.start.split(' ').nth(1).unwrap_or("")
    }
    /// A status line's code; 0 for a request line.
    pub fn status(&self) -> u16 {
        if !self.start.starts_with("HTTP/") {
            return 0;
        }
        self.start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

/// Parses a head at the start of `buf`: `Ok(None)` until its empty line has arrived.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if let Some(lf) = buf.iter().position(|b| *b == b'\n') {
            if lf == 0 || buf[lf - 1] != b'\r' {
                return Err("bare LF in a head".into());
            }
        }
        return Ok(None);
    };
    // Every line with its CRLF; the empty line that ends the head is left out.
    let text = &buf[..end + 2];
    let mut lines = text[..text.len() - 1].split(|b| *b == b'\n');
    let start = lines.next().unwrap_or_default();
    let start = start.strip_suffix(b"\r").unwrap_or(start);
    if start.is_empty() || start.contains(&b'\r') || !start.is_ascii() {
        return Err(format!(
            "bad start line {:?}",
            String::from_utf8_lossy(start)
        ));
    }
    let mut fields = Vec::new();
    for line in lines {
        let Some(line) = line.strip_suffix(b"\r") else {
            return Err("bare LF in a head".into());
        };
        if line.contains(&b'\r') {
            return Err("bare CR in a head".into());
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| format!("field line without colon {:?}", show(line)))?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
            return Err(format!("bad field name {:?}", show(name)));
        }
        fields.push((
            String::from_utf8_lossy(name).to_ascii_lowercase(),
            line[colon + 1..].trim_ascii().to_vec(),
        ));
    }
    Ok(Some(Head {
        start: String::from_utf8_lossy(start).into_owned(),
        fields,
        len: end + 4,
    }))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// How a message's body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
    /// After a 101 or a 2xx to CONNECT: what follows is no longer HTTP.
    Tunnel,
}

fn content_length(head: &Head) -> Result<Option<usize>, String> {
    let mut found: Option<usize> = None;
    for v in head.values("content-length") {
        // One value per field: a list, even of equal values, is left to the peer to refuse.
        if v.is_empty() || !v.iter().all(u8::is_ascii_digit) || v.len() > 15 {
            return Err(format!("bad Content-Length {:?}", show(v)));
        }
        let n: usize = std::str::from_utf8(v).unwrap().parse().unwrap();
        if found.is_some_and(|f| f != n) {
            return Err("conflicting Content-Length fields".into());
        }
        found = Some(n);
    }
    Ok(found)
}

pub fn request_framing(head: &Head) -> Result<Framing, String> {
    if head.has("transfer-encoding") {
        if head.has("content-length") {
            return Err("both Transfer-Encoding and Content-Length".into());
        }
        return match head.list("transfer-encoding").last().map(String::as_str) {
            Some("chunked") => Ok(Framing::Chunked),
            _ => Err("a request's last transfer coding is not chunked".into()),
        };
    }
    Ok(match content_length(head)? {
        Some(0) | None => Framing::None,
        Some(n) => Framing::Length(n),
    })
}

pub fn response_framing(head: &Head, method: &str) -> Result<Framing, String> {
    let status = head.status();
    if status == 101 || (method == "CONNECT" && (200..300).contains(&status)) {
        return Ok(Framing::Tunnel);
    }
    if (100..200).contains(&status) || status == 204 || status == 304 || method == "HEAD" {
        return Ok(Framing::None);
    }
    if head.has("transfer-encoding") {
        return Ok(
            match head.list("transfer-encoding").last().map(String::as_str) {
                Some("chunked") => Framing::Chunked,
                _ => Framing::UntilClose,
            },
        );
    }
    Ok(match content_length(head)? {
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// A chunked body: its data, its trailer section (field lines with their CRLFs) and how many
/// bytes it took on the wire; `Ok(None)` until all of it has arrived.
pub fn parse_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>, usize)>, String> {
    let mut at = 0;
    let mut data = Vec::new();
    loop {
        let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            if buf[at..].contains(&b'\n') {
                return Err("bare LF in a chunk-size line".into());
            }
            return Ok(None);
        };
        let line = &buf[at..at + eol];
        if line.contains(&b'\n') || line.contains(&b'\r') {
            return Err(format!(
                "bare CR or LF in a chunk-size line {:?}",
                show(line)
            ));
        }
        let hex_len = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let rest = &line[hex_len..];
        if hex_len == 0 || hex_len > 12 || !(rest.is_empty() || rest.starts_with(b";")) {
            return Err(format!("bad chunk-size line {:?}", show(line)));
        }
        let size = usize::from_str_radix(std::str::from_utf8(&line[..hex_len]).unwrap(), 16)
            .map_err(|e| e.to_string())?;
        at += eol + 2;
        if size == 0 {
            // The trailer section, up to its empty line.
            let mut trailer_end = at;
            loop {
                let Some(eol) = buf[trailer_end..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                if eol == 0 {
                    let trailer = buf[at..trailer_end].to_vec();
                    return Ok(Some((data, trailer, trailer_end + 2)));
                }
                trailer_end += eol + 2;
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        data.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        at += size + 2;
    }
}

/// One whole message.
#[derive(Clone, Debug)]
pub struct Message {
    pub head: Head,
    pub raw_head: Vec<u8>,
    pub framing: Framing,
    pub body: Vec<u8>,
    pub trailer: Vec<u8>,
    /// Bytes it took on the wire.
    pub len: usize,
}

impl Message {
    /// The form transcripts are compared in: the head as it came, then the body; a chunked
    /// body as one chunk (a proxy that re-chunks picks its sizes by its read boundaries, which
    /// carry no meaning, RFC 9112 §7.1) with its trailer section as it came.
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = self.raw_head.clone();
        match self.framing {
            Framing::Chunked => {
                if !self.body.is_empty() {
                    out.extend_from_slice(format!("{:x}\r\n", self.body.len()).as_bytes());
                    out.extend_from_slice(&self.body);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n");
                out.extend_from_slice(&self.trailer);
                out.extend_from_slice(b"\r\n");
            }
            _ => out.extend_from_slice(&self.body),
        }
        out
    }
}

pub enum Parsed {
    Complete(Message),
    /// The head has arrived, not yet all of the body.
    HeadOnly(Head),
    Partial,
    Invalid(String),
}

fn parse_body(buf: &[u8], head: Head, framing: Framing, eof: bool) -> Parsed {
    let raw_head = buf[..head.len].to_vec();
    let rest = &buf[head.len..];
    let done = |body: Vec<u8>, trailer: Vec<u8>, used: usize, head: Head| {
        Parsed::Complete(Message {
            len: head.len + used,
            head,
            raw_head: raw_head.clone(),
            framing,
            body,
            trailer,
        })
    };
    match framing {
        Framing::None | Framing::Tunnel => done(Vec::new(), Vec::new(), 0, head),
        Framing::Length(n) if rest.len() >= n => done(rest[..n].to_vec(), Vec::new(), n, head),
        Framing::Length(_) => Parsed::HeadOnly(head),
        Framing::Chunked => match parse_chunked(rest) {
            Ok(Some((body, trailer, used))) => done(body, trailer, used, head),
            Ok(None) => Parsed::HeadOnly(head),
            Err(e) => Parsed::Invalid(e),
        },
        Framing::UntilClose if eof => done(rest.to_vec(), Vec::new(), rest.len(), head),
        Framing::UntilClose => Parsed::HeadOnly(head),
    }
}

pub fn parse_request(buf: &[u8]) -> Parsed {
    match parse_head(buf) {
        Err(e) => Parsed::Invalid(e),
        Ok(None) => Parsed::Partial,
        Ok(Some(head)) => match request_framing(&head) {
            Err(e) => Parsed::Invalid(e),
            Ok(framing) => parse_body(buf, head, framing, false),
        },
    }
}

pub fn parse_response(buf: &[u8], method: &str, eof: bool) -> Parsed {
    match parse_head(buf) {
        Err(e) => Parsed::Invalid(e),
        Ok(None) => Parsed::Partial,
        Ok(Some(head)) => match response_framing(&head, method) {
            Err(e) => Parsed::Invalid(e),
            Ok(framing) => parse_body(buf, head, framing, eof),
        },
    }
}

/// A transcript cut into messages: the whole ones, then whatever did not parse as one.
#[derive(Clone, Debug, Default)]
pub struct Transcript {
    pub messages: Vec<Message>,
    /// Bytes after a tunnel began, or that are not (or not yet) a whole message.
    pub rest: Vec<u8>,
    /// Why `rest` is not a message, when it is not a tunnel or an incomplete one.
    pub invalid: Option<String>,
}

impl Transcript {
    pub fn canonical(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.messages.iter().flat_map(|m| m.canonical()).collect();
        out.extend_from_slice(&self.rest);
        out
    }
}

pub fn requests(buf: &[u8]) -> Transcript {
    let mut t = Transcript::default();
    let mut at = 0;
    while at < buf.len() {
        match parse_request(&buf[at..]) {
            Parsed::Complete(m) => {
                at += m.len;
                // After an upgrade request the bytes may be another protocol, or (the upgrade
                // refused) the next request: they are read as requests, and kept as they came
                // when they are not.
                let tunnel = m.head.method() == "CONNECT";
                t.messages.push(m);
                if tunnel {
                    break;
                }
            }
            Parsed::Invalid(e) => {
                t.invalid = Some(e);
                break;
            }
            Parsed::HeadOnly(_) | Parsed::Partial => break,
        }
    }
    t.rest = buf[at..].to_vec();
    t
}

/// Answers to requests with `methods`, in order; a 1xx does not use up a request.
pub fn responses(buf: &[u8], methods: &[String], eof: bool) -> Transcript {
    let mut t = Transcript::default();
    let mut at = 0;
    let mut answered = 0;
    while at < buf.len() {
        let method = methods.get(answered).map_or("GET", String::as_str);
        match parse_response(&buf[at..], method, eof) {
            Parsed::Complete(m) => {
                at += m.len;
                let status = m.head.status();
                let framing = m.framing;
                t.messages.push(m);
                if framing == Framing::Tunnel {
                    break;
                }
                if !(100..200).contains(&status) {
                    answered += 1;
                }
            }
            Parsed::Invalid(e) => {
                t.invalid = Some(e);
                break;
            }
            Parsed::HeadOnly(_) | Parsed::Partial => break,
        }
    }
    t.rest = buf[at..].to_vec();
    t
}

/// The methods of the requests in `client_bytes`, for reading the answers to them.
pub fn methods_of(client_bytes: &[u8]) -> Vec<String> {
    requests(client_bytes)
        .messages
        .iter()
        .map(|m| m.head.method().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Showing bytes

/// Bytes as readable text: CRLF shown and broken after, other controls escaped, long runs of
/// one byte summarised.
pub fn show(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let run = bytes[i..].iter().take_while(|x| **x == b).count();
        if run >= 24 {
            out.push_str(&format!("<{run} x {:?}>", b as char));
            i += run;
            continue;
        }
        match b {
            b'\r' if bytes.get(i + 1) == Some(&b'\n') => {
                out.push_str("\\r\\n\n");
                i += 2;
                continue;
            }
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n\n"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
        i += 1;
    }
    out
}

/// A line diff of two byte strings as [`show`] renders them: `-` expected, `+` actual.
pub fn diff(expected: &[u8], actual: &[u8]) -> String {
    let (e, a) = (show(expected), show(actual));
    let el: Vec<&str> = e.lines().collect();
    let al: Vec<&str> = a.lines().collect();
    if el.len() * al.len() > 250_000 {
        return format!("--- expected\n{e}\n+++ actual\n{a}\n");
    }
    // Longest common subsequence, then walk it.
    let mut lcs = vec![vec![0u32; al.len() + 1]; el.len() + 1];
    for i in (0..el.len()).rev() {
        for j in (0..al.len()).rev() {
            lcs[i][j] = if el[i] == al[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut lines) = (0, 0, Vec::new());
    while i < el.len() || j < al.len() {
        if i < el.len() && j < al.len() && el[i] == al[j] {
            lines.push(format!("    {}", el[i]));
            i += 1;
            j += 1;
        } else if j < al.len() && (i == el.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            lines.push(format!("  + {}", al[j]));
            j += 1;
        } else {
            lines.push(format!("  - {}", el[i]));
            i += 1;
        }
    }
    // Long runs of one line (a flood of 1xx, a body cut into 1-byte chunks) shown once.
    let mut out = String::new();
    let mut k = 0;
    while k < lines.len() {
        let run = lines[k..].iter().take_while(|l| **l == lines[k]).count();
        out.push_str(&lines[k]);
        out.push('\n');
        if run > 3 {
            out.push_str(&format!("    ... the line above {} more times\n", run - 1));
            k += run;
        } else {
            k += 1;
        }
    }
    out
}

/// One upstream step, readable.
pub fn describe(step: &Up) -> String {
    match step {
        Up::Answer(b) => format!("Answer({})", show(b)),
        Up::AnswerAfterHead(b) => format!("AnswerAfterHead({})", show(b)),
        Up::Tunnel(b) => format!("Tunnel({})", show(b)),
        Up::Write(b) => format!("Write({})", show(b)),
        other => format!("{other:?}"),
    }
}

/// Replaces every occurrence of `from` in `bytes` with `to`.
pub fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    if from.is_empty() {
        return bytes.to_vec();
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// Replaces the value of every `Date` field (in any case) with `<DATE>`.
pub fn normalise_date(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let at_line = i == 0 || bytes[i - 1] == b'\n';
        if at_line && bytes.len() >= i + 6 && bytes[i..i + 6].eq_ignore_ascii_case(b"date: ") {
            out.extend_from_slice(&bytes[i..i + 6]);
            out.extend_from_slice(b"<DATE>");
            let end = bytes[i..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .map_or(bytes.len(), |p| i + p);
            i = end;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Write boundaries

/// Where a case's bytes are cut into separate writes.
#[derive(Clone, Debug, PartialEq)]
pub enum Boundary {
    /// Each step's bytes in one write.
    OneWrite,
    /// Every byte in its own write.
    ByteByByte,
    /// A write ends after each CRLF.
    Crlf,
    /// The head in one write, then the body cut every 64 KiB from its start, so that a reader
    /// with a 64 KiB buffer sees reads end exactly at those offsets.
    Aligned64K,
    /// Cut at these offsets of each step's bytes, with a pause after each cut.
    At(&'static [usize]),
}

impl Boundary {
    pub fn name(&self) -> String {
        match self {
            Boundary::OneWrite => "one-write".into(),
            Boundary::ByteByByte => "byte-by-byte".into(),
            Boundary::Crlf => "crlf".into(),
            Boundary::Aligned64K => "aligned-64k".into(),
            Boundary::At(at) => format!("at{at:?}"),
        }
    }

    /// The pause after each write but the last. It shapes what the peer's reads return (a
    /// pause lets the peer read what was written so far on its own); nothing waits on it.
    fn pause(&self) -> Duration {
        match self {
            Boundary::OneWrite => Duration::ZERO,
            Boundary::ByteByByte => Duration::from_micros(150),
            Boundary::Crlf => Duration::from_millis(2),
            Boundary::Aligned64K => Duration::from_millis(10),
            Boundary::At(_) => Duration::from_millis(100),
        }
    }

    pub fn segments<'a>(&self, bytes: &'a [u8]) -> Vec<&'a [u8]> {
        let cuts: Vec<usize> = match self {
            Boundary::OneWrite => vec![],
            Boundary::ByteByByte => (1..bytes.len()).collect(),
            Boundary::Crlf => bytes
                .windows(2)
                .enumerate()
                .filter(|(_, w)| *w == b"\r\n")
                .map(|(i, _)| i + 2)
                .collect(),
            Boundary::Aligned64K => match bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                Some(p) => (p + 4..bytes.len()).step_by(64 << 10).collect(),
                None => (0..bytes.len()).step_by(64 << 10).skip(1).collect(),
            },
            Boundary::At(at) => at.to_vec(),
        };
        let mut out = Vec::new();
        let mut from = 0;
        for cut in cuts {
            if cut > from && cut < bytes.len() {
                out.push(&bytes[from..cut]);
                from = cut;
            }
        }
        out.push(&bytes[from..]);
        out
    }

    /// Writes `bytes` cut at this boundary's places. A peer that stops reading fails it after
    /// the write timeout.
    pub fn write(&self, s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
        let segments = self.segments(bytes);
        let last = segments.len().saturating_sub(1);
        for (i, segment) in segments.into_iter().enumerate() {
            s.write_all(segment)?;
            if i < last && !self.pause().is_zero() {
                std::thread::sleep(self.pause());
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The scripted upstream

/// One step of an upstream connection's script.
#[derive(Clone, Debug)]
pub enum Up {
    /// After the next whole request, write these bytes.
    Answer(Vec<u8>),
    /// After the next request's head, before its body: write these bytes; the body is then
    /// read (and recorded) and left unanswered.
    AnswerAfterHead(Vec<u8>),
    /// After the next whole request, write these bytes, then echo every byte that follows.
    Tunnel(Vec<u8>),
    /// Write these bytes now (after the steps before).
    Write(Vec<u8>),
    /// Close the connection now.
    Close,
    /// Close the connection as soon as the next request's head has arrived.
    CloseAfterHead,
    /// Close the connection once the next whole request has arrived, without answering it.
    CloseAfterRequest,
    /// Wait until the peer closes the connection.
    AwaitClose,
}

/// One connection the upstream accepted.
struct UpConn {
    /// The run it was accepted in.
    run: u64,
    received: Vec<u8>,
    open: bool,
    stream: Option<TcpStream>,
}

#[derive(Default)]
struct UpState {
    /// The current run: connections of earlier runs are kept apart from its record.
    run: u64,
    /// Scripts for the connections still to come, in accept order.
    scripts: VecDeque<Vec<Up>>,
    boundary: Option<Boundary>,
    conns: Vec<UpConn>,
    /// Connections whose script has not run to its end yet.
    scripts_running: usize,
    /// What went off script (a request with no step to answer it, bytes that are not HTTP).
    notes: Vec<String>,
}

/// A tiny TCP server that answers with scripted raw bytes and records exactly what it got.
pub struct RawUpstream {
    pub addr: SocketAddr,
    state: Arc<(Mutex<UpState>, Condvar)>,
    stop: Arc<AtomicBool>,
}

/// What the upstream got during one run.
#[derive(Debug, Default)]
pub struct UpstreamRecord {
    /// The bytes each connection received, in accept order.
    pub connections: Vec<Vec<u8>>,
    pub notes: Vec<String>,
}

impl RawUpstream {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state: Arc<(Mutex<UpState>, Condvar)> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, stopped) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let _ = conn.set_nodelay(true);
                let st = st.clone();
                let (index, script, boundary) = {
                    let mut s = st.0.lock().unwrap();
                    let script = s.scripts.pop_front().unwrap_or_default();
                    if !script.is_empty() {
                        s.scripts_running += 1;
                    }
                    let run = s.run;
                    s.conns.push(UpConn {
                        run,
                        received: Vec::new(),
                        open: true,
                        stream: conn.try_clone().ok(),
                    });
                    let boundary = s.boundary.clone().unwrap_or(Boundary::OneWrite);
                    (s.conns.len() - 1, script, boundary)
                };
                std::thread::spawn(move || serve_connection(conn, index, script, boundary, st));
            }
        });
        RawUpstream { addr, state, stop }
    }

    /// Sets the scripts for the next run's connections, and the boundary its answers use.
    pub fn begin(&self, scripts: Vec<Vec<Up>>, boundary: Boundary) {
        let mut s = self.state.0.lock().unwrap();
        s.run += 1;
        s.scripts = scripts.into();
        s.boundary = Some(boundary);
        s.scripts_running = 0;
        s.notes.clear();
    }

    /// Waits until every connection's script has run to its end.
    pub fn await_scripts(&self, within: Duration) -> bool {
        let (lock, cvar) = &*self.state;
        let deadline = Instant::now() + within;
        let mut s = lock.lock().unwrap();
        while s.scripts_running > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = cvar.wait_timeout(s, left).unwrap().0;
        }
        true
    }

    /// Ends a run: closes this side of every connection still open, waits for the proxy to
    /// close its side (its pool drops a connection the upstream closed), and returns what
    /// each connection received.
    pub fn finish(&self) -> UpstreamRecord {
        let (lock, cvar) = &*self.state;
        let run = {
            let s = lock.lock().unwrap();
            for c in s.conns.iter().filter(|c| c.open) {
                if let Some(stream) = &c.stream {
                    let _ = stream.shutdown(Shutdown::Write);
                }
            }
            s.run
        };
        let deadline = Instant::now() + STEP_WAIT;
        let mut s = lock.lock().unwrap();
        while s.conns.iter().any(|c| c.open) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = cvar.wait_timeout(s, left).unwrap().0;
        }
        let mut notes = std::mem::take(&mut s.notes);
        let mut connections = Vec::new();
        for (i, c) in s.conns.iter_mut().enumerate() {
            if c.open {
                notes.push(format!(
                    "upstream connection {i} still open {STEP_WAIT:?} after the upstream closed its side"
                ));
                if let Some(stream) = &c.stream {
                    let _ = stream.shutdown(Shutdown::Both);
                }
            }
            if c.run == run {
                connections.push(std::mem::take(&mut c.received));
            }
        }
        s.scripts.clear();
        UpstreamRecord { connections, notes }
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve_connection(
    mut conn: TcpStream,
    index: usize,
    script: Vec<Up>,
    boundary: Boundary,
    st: Arc<(Mutex<UpState>, Condvar)>,
) {
    let scripted = !script.is_empty();
    let mut steps: VecDeque<Up> = script.into();
    let mut buf: Vec<u8> = Vec::new();
    let mut tunnel = false;
    // The current request was answered after its head (or its head closed the connection).
    let mut answered_early = false;
    // The current request's `Expect: 100-continue` was answered.
    let mut continued = false;
    let mut garbage = false;
    let mut read_buf = vec![0u8; 64 << 10];
    let note = |st: &Arc<(Mutex<UpState>, Condvar)>, what: String| {
        st.0.lock().unwrap().notes.push(what);
    };
    let mut done_reported = !scripted;
    let report_done = |done: &mut bool| {
        if !*done {
            *done = true;
            st.0.lock().unwrap().scripts_running -= 1;
            st.1.notify_all();
        }
    };
    'conn: loop {
        // Steps that need no input.
        while let Some(step) = steps.front() {
            match step {
                Up::Write(bytes) => {
                    let _ = boundary.write(&mut conn, bytes);
                    steps.pop_front();
                }
                Up::Close => {
                    steps.pop_front();
                    let _ = conn.shutdown(Shutdown::Both);
                    break 'conn;
                }
                _ => break,
            }
        }
        if steps.is_empty() {
            report_done(&mut done_reported);
        }
        // Requests that have arrived whole (or their heads).
        while !garbage && !buf.is_empty() {
            if tunnel {
                let _ = conn.write_all(&buf);
                buf.clear();
                break;
            }
            match parse_request(&buf) {
                Parsed::Complete(m) => {
                    buf.drain(..m.len);
                    continued = false;
                    if m.head.target() == SENTINEL_TARGET {
                        let _ = conn.write_all(SENTINEL_ANSWER);
                        continue;
                    }
                    if std::mem::take(&mut answered_early) {
                        continue;
                    }
                    match steps.pop_front() {
                        Some(Up::Answer(bytes) | Up::AnswerAfterHead(bytes)) => {
                            let _ = boundary.write(&mut conn, &bytes);
                        }
                        Some(Up::CloseAfterHead | Up::CloseAfterRequest) => {
                            let _ = conn.shutdown(Shutdown::Both);
                            break 'conn;
                        }
                        Some(Up::Tunnel(bytes)) => {
                            let _ = boundary.write(&mut conn, &bytes);
                            tunnel = true;
                        }
                        Some(Up::AwaitClose) => {
                            steps.push_front(Up::AwaitClose);
                            note(
                                &st,
                                format!(
                                    "connection {index}: a request while the script waited for the proxy to close: {:?}",
                                    m.head.start
                                ),
                            );
                        }
                        other => {
                            note(
                                &st,
                                format!(
                                    "connection {index}: no scripted answer for {:?} (next step {})",
                                    m.head.start,
                                    other.as_ref().map_or("none".into(), describe)
                                ),
                            );
                        }
                    }
                    continue 'conn;
                }
                Parsed::HeadOnly(head) => {
                    if !answered_early {
                        match steps.front() {
                            Some(Up::AnswerAfterHead(bytes)) => {
                                let bytes = bytes.clone();
                                steps.pop_front();
                                answered_early = true;
                                let _ = boundary.write(&mut conn, &bytes);
                                continue 'conn;
                            }
                            Some(Up::CloseAfterHead) => {
                                steps.pop_front();
                                let _ = conn.shutdown(Shutdown::Both);
                                break 'conn;
                            }
                            _ => {}
                        }
                        if !continued
                            && head.target() != SENTINEL_TARGET
                            && head.list("expect").iter().any(|e| e == "100-continue")
                        {
                            continued = true;
                            // As servers do: the client asked before sending its body.
                            let _ = conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                        }
                    }
                    break;
                }
                Parsed::Partial => break,
                Parsed::Invalid(e) => {
                    note(&st, format!("connection {index}: not HTTP: {e}"));
                    garbage = true;
                }
            }
        }
        match conn.read(&mut read_buf) {
            Ok(0) | Err(_) => {
                if matches!(steps.front(), Some(Up::AwaitClose)) {
                    steps.pop_front();
                }
                if tunnel {
                    let _ = conn.shutdown(Shutdown::Write);
                }
                break;
            }
            Ok(n) => {
                st.0.lock().unwrap().conns[index]
                    .received
                    .extend_from_slice(&read_buf[..n]);
                buf.extend_from_slice(&read_buf[..n]);
            }
        }
    }
    if steps.is_empty() {
        report_done(&mut done_reported);
    } else if !done_reported {
        note(
            &st,
            format!(
                "connection {index} ended with its script not done: {}",
                steps.iter().map(describe).collect::<Vec<_>>().join(", ")
            ),
        );
        report_done(&mut done_reported);
    }
    st.0.lock().unwrap().conns[index].open = false;
    st.1.notify_all();
}

// ---------------------------------------------------------------------------------------------
// The raw client

/// One step of a client's script on its connection.
#[derive(Clone, Debug)]
pub enum Step {
    /// Write these bytes, cut at the run's boundary.
    Send(Vec<u8>),
    /// Wait until the bytes received since the previous wait contain these.
    WaitFor(Vec<u8>),
    /// Wait for an answer's status line; send the body if it is a 100 (a client that sent
    /// `Expect: 100-continue` does so, and sends nothing after a final answer).
    SendAfterContinue(Vec<u8>),
    /// Wait until the upstream's script has run to its end.
    AwaitUpstream,
    /// Wait until this many final answers (in all) have come whole.
    WaitForAnswers(usize),
}

/// How a case's client connection ends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum End {
    /// The connection stays usable: the runner sends the sentinel request and its answer
    /// must come back whole.
    KeepAlive,
    /// The proxy closes the connection after its last answer.
    Closed,
    /// A tunnel: the client closes its sending side, then the proxy closes the connection.
    ClientCloses,
}

#[derive(Debug, Default)]
pub struct ClientRecord {
    pub sent: Vec<u8>,
    pub received: Vec<u8>,
    /// The proxy closed the connection (read end of stream).
    pub closed: bool,
    pub notes: Vec<String>,
}

#[derive(Default)]
struct Inbox {
    bytes: Vec<u8>,
    eof: bool,
}

/// Runs `steps` on a new connection to `addr`, then ends it as `end` says; any one wait gives
/// up after `patience`.
pub fn run_client(
    addr: SocketAddr,
    steps: &[Step],
    boundary: &Boundary,
    end: End,
    answers: usize,
    upstream: Option<&RawUpstream>,
    patience: Duration,
) -> ClientRecord {
    let mut record = ClientRecord::default();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_write_timeout(Some(patience)).unwrap();
    let inbox: Arc<(Mutex<Inbox>, Condvar)> = Arc::default();
    let reader = {
        let mut r = s.try_clone().unwrap();
        let inbox = inbox.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = r.read(&mut buf).unwrap_or(0);
                let mut i = inbox.0.lock().unwrap();
                if n == 0 {
                    i.eof = true;
                    inbox.1.notify_all();
                    return;
                }
                i.bytes.extend_from_slice(&buf[..n]);
                inbox.1.notify_all();
            }
        })
    };
    // Waits until `cond` holds for what was received (or the peer closed); false on timeout.
    let wait = |cond: &dyn Fn(&Inbox) -> bool| -> bool {
        let deadline = Instant::now() + patience;
        let mut i = inbox.0.lock().unwrap();
        loop {
            if cond(&i) {
                return true;
            }
            if i.eof {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            i = inbox.1.wait_timeout(i, left).unwrap().0;
        }
    };
    let finals = |i: &Inbox, sent: &[u8]| {
        responses(&i.bytes, &methods_of(sent), false)
            .messages
            .iter()
            .filter(|m| !(100..200).contains(&m.head.status()))
            .count()
    };
    let mut seen = 0usize;
    let mut ok = true;
    for step in steps {
        match step {
            Step::Send(bytes) => {
                record.sent.extend_from_slice(bytes);
                if boundary.write(&mut s, bytes).is_err() {
                    // The proxy refused the request before its end and closed: what it
                    // answered is compared like any other answer.
                    ok = false;
                }
            }
            Step::WaitFor(pattern) => {
                let found = wait(&|i: &Inbox| {
                    i.bytes[seen.min(i.bytes.len())..]
                        .windows(pattern.len())
                        .any(|w| w == pattern.as_slice())
                });
                if !found {
                    record
                        .notes
                        .push(format!("client: never received {:?}", show(pattern)));
                    ok = false;
                } else {
                    let i = inbox.0.lock().unwrap();
                    let from = seen.min(i.bytes.len());
                    let p = i.bytes[from..]
                        .windows(pattern.len())
                        .position(|w| w == pattern.as_slice())
                        .unwrap();
                    seen = from + p + pattern.len();
                }
            }
            Step::SendAfterContinue(body) => {
                let status_line = |i: &Inbox| {
                    let from = seen.min(i.bytes.len());
                    i.bytes[from..].windows(2).any(|w| w == b"\r\n")
                };
                if !wait(&status_line) {
                    record.notes.push("client: no answer to Expect".into());
                    ok = false;
                } else {
                    let continued = {
                        let i = inbox.0.lock().unwrap();
                        i.bytes[seen.min(i.bytes.len())..].starts_with(b"HTTP/1.1 100 ")
                    };
                    if continued {
                        record.sent.extend_from_slice(body);
                        if boundary.write(&mut s, body).is_err() {
                            ok = false;
                        }
                    }
                }
            }
            Step::WaitForAnswers(n) => {
                let sent = record.sent.clone();
                if !wait(&|i: &Inbox| finals(i, &sent) >= *n) {
                    record
                        .notes
                        .push(format!("client: never received {n} answers"));
                    ok = false;
                }
            }
            Step::AwaitUpstream => {
                if let Some(up) = upstream {
                    if !up.await_scripts(patience) {
                        record
                            .notes
                            .push("the upstream's script did not end".into());
                    }
                }
            }
        }
        if !ok {
            break;
        }
    }
    match end {
        End::KeepAlive if ok => {
            // The sentinel goes once the answers the case expects are in: sent earlier, it
            // would be a pipelined request, which only the pipelining cases are about.
            let sent = record.sent.clone();
            if !wait(&|i: &Inbox| finals(i, &sent) >= answers) {
                record.notes.push(format!(
                    "client: {answers} answers expected before the sentinel, {} came",
                    finals(&inbox.0.lock().unwrap(), &sent)
                ));
            }
            record.sent.extend_from_slice(SENTINEL_REQUEST);
            if s.write_all(SENTINEL_REQUEST).is_err() {
                record
                    .notes
                    .push("client: the sentinel could not be written".into());
            }
            let sent = record.sent.clone();
            let answered = wait(&|i: &Inbox| finals(i, &sent) > answers);
            if !answered {
                record
                    .notes
                    .push("client: no answer to the sentinel request".into());
            }
        }
        End::KeepAlive | End::Closed => {
            if !wait(&|_| false) && !inbox.0.lock().unwrap().eof {
                record.notes.push(format!(
                    "client: the proxy did not close the connection within {patience:?}"
                ));
            }
        }
        End::ClientCloses => {
            let _ = s.shutdown(Shutdown::Write);
            if !wait(&|_| false) && !inbox.0.lock().unwrap().eof {
                record.notes.push(format!(
                    "client: the proxy did not close the tunnel within {patience:?}"
                ));
            }
        }
    }
    // Whether the proxy closed it, before this side's own close ends the reader too.
    record.closed = inbox.0.lock().unwrap().eof;
    let _ = s.shutdown(Shutdown::Both);
    let _ = reader.join();
    record.received = inbox.0.lock().unwrap().bytes.clone();
    record
}
