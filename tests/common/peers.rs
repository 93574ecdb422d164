//! The peers of the conformance suite: the write boundaries a case is sent with, a scripted raw
//! upstream that records every byte it receives, and a raw client. Everything here uses blocking
//! std sockets on their own threads, so the pacing of writes is not at the mercy of an async
//! runtime's scheduling; every wait is bounded.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::raw::{Parsed, methods_of, parse_request, responses, show};

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
