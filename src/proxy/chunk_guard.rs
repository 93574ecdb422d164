//! A guard on HTTP/1 client connections: it refuses a chunked request body whose chunk-size
//! line holds a bare LF or no size. pingora-core parses chunk-size lines with httparse's
//! `parse_chunk_size`, which takes a bare LF inside a chunk extension as part of the extension
//! and ends the line at the next CRLF, where parsers that end a line at a bare LF see the chunk
//! data start earlier: two parsers would disagree on where the body ends (RFC 9112 §7.1.1
//! allows no LF there); and it reads a line without a size as the last chunk, losing the
//! chunks after it as trailers. The guard watches the bytes pingora reads, from the end of the request
//! head to the end of the chunked body, and fails the read that brings such a line. The lean
//! path says where each request starts (its loop runs between requests); on a connection the
//! `ProxyHttp` path serves, whose loop is pingora-proxy's, the guard follows each request's
//! framing itself from one head to the next.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes kept of a request's start, to find where its body begins: a head larger than this is
/// refused by pingora anyway (its `MAX_HEADER_SIZE` is smaller).
const RECORD_LIMIT: usize = 1 << 20;

/// The client stream, watched.
#[derive(Debug)]
pub struct Guarded {
    inner: Stream,
    state: Arc<Mutex<Watch>>,
}

/// The lean loop's side of the guard.
#[derive(Clone)]
pub struct Guard(Arc<Mutex<Watch>>);

#[derive(Debug, Default)]
struct Watch {
    mode: Mode,
    refused: bool,
    /// The recording buffer between requests, kept so a keep-alive connection allocates once.
    spare: Vec<u8>,
    /// The guard follows the framing from one request to the next (a connection of the
    /// `ProxyHttp` path): after a body, it records the next request's start.
    follows: bool,
}

#[derive(Debug, Default)]
enum Mode {
    #[default]
    Off,
    /// Reading a request head: what was read, from its first byte.
    Recording(Vec<u8>),
    Checking(ChunkLines),
    /// Bytes of a body framed by its length still to come (when following).
    Skipping(u64),
}

/// A request body's framing, as pingora-core reads it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Body {
    Empty,
    Length(u64),
    Chunked,
}

impl Body {
    /// The framing of `request`'s body: pingora-core's `validate_request` let through only
    /// chunked as a final coding, and tokenward's admission refuses any other coding before
    /// it; a `Content-Length` list it accepted holds one value.
    pub fn of(request: &pingora::http::RequestHeader) -> Body {
        if request
            .headers
            .contains_key(http::header::TRANSFER_ENCODING)
        {
            return Body::Chunked;
        }
        request
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.as_bytes().split(|b| *b == b',').next())
            .and_then(|v| std::str::from_utf8(v.trim_ascii()).ok())
            .and_then(|v| v.parse().ok())
            .map_or(Body::Empty, Body::Length)
    }
}

impl Guarded {
    /// For the lean path, which says where each request starts (`Guard::request_starts`).
    pub fn wrap(inner: Stream) -> (Stream, Guard) {
        let state = Arc::new(Mutex::new(Watch::default()));
        (
            Box::new(Guarded {
                inner,
                state: state.clone(),
            }),
            Guard(state),
        )
    }

    /// For a connection the `ProxyHttp` path serves from its first byte.
    pub fn wrap_following(inner: Stream) -> Stream {
        let (stream, guard) = Self::wrap(inner);
        guard.follow(&[]);
        stream
    }
}

impl Guard {
    fn with<T>(&self, f: impl FnOnce(&mut Watch) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A request head is about to be read; `prefix` holds its bytes already read.
    pub fn request_starts(&self, prefix: Option<&[u8]>) {
        self.with(|w| {
            w.refused = false;
            let mut recorded = std::mem::take(&mut w.spare);
            recorded.extend_from_slice(prefix.unwrap_or_default());
            w.mode = Mode::Recording(recorded);
        });
    }

    /// The guard of the connection `stream` is, if it has one.
    pub fn of(stream: &Stream) -> Option<Guard> {
        (**stream)
            .as_any()
            .downcast_ref::<Guarded>()
            .map(|g| Guard(g.state.clone()))
    }

    /// From now on the guard follows the framing itself; `prefix` holds the next request's
    /// bytes already read.
    pub fn follow(&self, prefix: &[u8]) {
        self.request_starts(Some(prefix));
        self.with(|w| w.follows = true);
    }

    /// The connection carries something else than HTTP/1 from now on (after a 101).
    pub fn stop(&self) {
        self.with(|w| {
            w.follows = false;
            w.mode = Mode::Off;
        });
    }

    /// The head just read was `head` (its raw bytes), followed by a body framed as `body`.
    pub fn head_read(&self, head: &[u8], body: Body) {
        self.with(|w| {
            let chunked = body == Body::Chunked;
            let Mode::Recording(mut recorded) = std::mem::take(&mut w.mode) else {
                // Where its body starts is not known: a chunked body is not let through
                // unwatched.
                w.refused |= chunked;
                return;
            };
            match body_start(&recorded, head) {
                Some(at) if chunked || w.follows => {
                    // A bare LF already read is in pingora's buffer: the next read fails.
                    let _ = w.body_starts(body, &recorded[at..]);
                }
                Some(_) => {}
                None => w.refused |= chunked,
            }
            recorded.clear();
            if recorded.capacity() <= 16 << 10 {
                w.spare = recorded;
            }
        });
    }

    /// Whether this request's body was refused for a malformed chunk-size line.
    pub fn refused(&self) -> bool {
        self.with(|w| w.refused)
    }

    /// `e`, or when the guard refused the body, the client's malformed body (a 400): a read the
    /// guard failed is not a lost client.
    pub fn refusal(&self, e: Box<Error>) -> Box<Error> {
        if !self.refused() {
            return e;
        }
        Error::explain(
            ErrorType::HTTPStatus(400),
            "a chunk-size line with a bare LF or without a size (RFC 9112 §7.1)",
        )
        .into_down()
    }
}

impl Watch {
    /// Looks at `bytes` just read; an error refuses them.
    fn saw(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.refused {
            return Err(malformed_size_line());
        }
        match std::mem::take(&mut self.mode) {
            Mode::Off => {}
            Mode::Recording(mut recorded) => {
                if recorded.len() + bytes.len() <= RECORD_LIMIT {
                    recorded.extend_from_slice(bytes);
                    self.mode = Mode::Recording(recorded);
                }
            }
            Mode::Checking(mut lines) => {
                let fed = lines.feed(bytes);
                return self.fed(lines, fed, bytes);
            }
            Mode::Skipping(left) => match usize::try_from(left) {
                Ok(left) if left <= bytes.len() => self.body_ended(&bytes[left..]),
                _ => self.mode = Mode::Skipping(left - bytes.len() as u64),
            },
        }
        Ok(())
    }

    /// A body framed as `body` starts with `bytes`.
    fn body_starts(&mut self, body: Body, bytes: &[u8]) -> io::Result<()> {
        match body {
            Body::Empty => self.body_ended(bytes),
            Body::Length(n) => match usize::try_from(n) {
                Ok(n) if n <= bytes.len() => self.body_ended(&bytes[n..]),
                _ => self.mode = Mode::Skipping(n - bytes.len() as u64),
            },
            Body::Chunked => {
                let mut lines = ChunkLines::default();
                let fed = lines.feed(bytes);
                return self.fed(lines, fed, bytes);
            }
        }
        Ok(())
    }

    fn fed(&mut self, lines: ChunkLines, fed: Fed, bytes: &[u8]) -> io::Result<()> {
        match fed {
            Fed::More => self.mode = Mode::Checking(lines),
            Fed::End(used) => self.body_ended(&bytes[used..]),
            // pingora's own parser refuses it, and the connection ends.
            Fed::Malformed => self.mode = Mode::Off,
            Fed::Refused => {
                self.mode = Mode::Off;
                self.refused = true;
                return Err(malformed_size_line());
            }
        }
        Ok(())
    }

    /// The body ended; `rest` is what followed it in the same read: the next request's start.
    fn body_ended(&mut self, rest: &[u8]) {
        self.mode = if self.follows {
            let mut recorded = std::mem::take(&mut self.spare);
            recorded.extend_from_slice(rest);
            Mode::Recording(recorded)
        } else {
            Mode::Off
        };
    }
}

/// Where the body starts in `recorded`, the bytes read from the request's first, given `head`,
/// the raw head pingora parsed. That is the head as read, unless pingora-core had to escape
/// the request target (`escape_illegal_request_line` percent-encodes a space, `"`, `<`, `>` or
/// a control byte in it and parses the rebuilt head): only the request line differs then, and
/// the rest of the head is what was read after the first LF.
fn body_start(recorded: &[u8], head: &[u8]) -> Option<usize> {
    if recorded.starts_with(head) {
        return Some(head.len());
    }
    let first_lf = |bytes: &[u8]| bytes.iter().position(|b| *b == b'\n');
    let rest = &head[first_lf(head)?..];
    let read_lf = first_lf(recorded)?;
    recorded[read_lf..]
        .starts_with(rest)
        .then_some(read_lf + rest.len())
}

fn malformed_size_line() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "a chunk-size line with a bare LF or without a size",
    )
}

enum Fed {
    More,
    /// The body ended after this many of the bytes fed (what follows is the next request's).
    End(usize),
    /// Something pingora's own parser refuses: the guard stops watching.
    Malformed,
    /// A size line with a bare LF, or without a size.
    Refused,
}

/// Where a chunked body's parse is. Anything but a bare LF in a size line or a line without a
/// size that pingora's own parser refuses is left to it: the guard then stops watching.
#[derive(Debug)]
enum ChunkLines {
    SizeLine {
        cr: bool,
        size: u64,
        digits: u8,
        past_digits: bool,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk's size line: the trailer section ends, as pingora-core's
    /// `do_read_chunked_body_final` ends it, at the first CRLF CRLF counting that line's CRLF.
    Trailers {
        matched: u8,
    },
    Ended,
    Malformed,
}

impl Default for ChunkLines {
    fn default() -> Self {
        ChunkLines::SizeLine {
            cr: false,
            size: 0,
            digits: 0,
            past_digits: false,
        }
    }
}

impl ChunkLines {
    fn feed(&mut self, bytes: &[u8]) -> Fed {
        const END: &[u8; 4] = b"\r\n\r\n";
        let mut at = 0;
        while let Some(&b) = bytes.get(at) {
            match self {
                ChunkLines::Data(left) => {
                    let skip = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len() - at);
                    *left -= skip as u64;
                    at += skip;
                    if *left == 0 {
                        *self = ChunkLines::DataCr;
                    }
                    continue;
                }
                ChunkLines::SizeLine {
                    cr,
                    size,
                    digits,
                    past_digits,
                } => match b {
                    b'\n' if !*cr => return Fed::Refused,
                    // No size: httparse's `parse_chunk_size` reads the line as the last chunk
                    // (size 0), and the chunks that follow as trailers: the body is lost.
                    b'\n' if *digits == 0 => return Fed::Refused,
                    b'\n' => {
                        *self = if *size == 0 {
                            ChunkLines::Trailers { matched: 2 }
                        } else {
                            ChunkLines::Data(*size)
                        };
                    }
                    _ if *cr => *self = ChunkLines::Malformed,
                    b'\r' => *cr = true,
                    _ if !*past_digits && b.is_ascii_hexdigit() => {
                        *digits += 1;
                        if *digits > 16 {
                            *self = ChunkLines::Malformed;
                        } else {
                            *size = *size << 4 | u64::from((b as char).to_digit(16).unwrap_or(0));
                        }
                    }
                    _ => *past_digits = true,
                },
                ChunkLines::DataCr => {
                    *self = if b == b'\r' {
                        ChunkLines::DataLf
                    } else {
                        ChunkLines::Malformed
                    };
                }
                ChunkLines::DataLf => {
                    *self = if b == b'\n' {
                        ChunkLines::default()
                    } else {
                        ChunkLines::Malformed
                    };
                }
                ChunkLines::Trailers { matched } => {
                    if b == END[usize::from(*matched)] {
                        *matched += 1;
                        if usize::from(*matched) == END.len() {
                            *self = ChunkLines::Ended;
                            return Fed::End(at + 1);
                        }
                    } else {
                        *matched = u8::from(b == b'\r');
                    }
                }
                ChunkLines::Ended => return Fed::End(at),
                ChunkLines::Malformed => return Fed::Malformed,
            }
            at += 1;
        }
        match self {
            ChunkLines::Ended => Fed::End(at),
            ChunkLines::Malformed => Fed::Malformed,
            _ => Fed::More,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            let mut watch = this.state.lock().unwrap_or_else(PoisonError::into_inner);
            if let Err(e) = watch.saw(&buf.filled()[before..]) {
                return Poll::Ready(Err(e));
            }
        }
        polled
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> std::time::Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> std::time::Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(parts: &[&[u8]]) -> Vec<&'static str> {
        let mut lines = ChunkLines::default();
        parts
            .iter()
            .map(|p| match lines.feed(p) {
                Fed::More => "more",
                Fed::End(_) => "done",
                Fed::Malformed => "malformed",
                Fed::Refused => "refused",
            })
            .collect()
    }

    #[test]
    fn a_bare_lf_in_a_chunk_size_line_is_caught_wherever_the_reads_end() {
        assert_eq!(feed_all(&[b"5;a\nb\r\nhello\r\n0\r\n\r\n"]), ["refused"]);
        assert_eq!(
            feed_all(&[b"5\r\nhello\r\n3", b";x\n"]),
            ["more", "refused"]
        );
        assert_eq!(feed_all(&[b"5\n"]), ["refused"]);
    }

    #[test]
    fn a_chunk_size_line_without_a_size_is_refused_wherever_the_reads_end() {
        let body: &[u8] = b"\r\n3\r\nabc\r\n0\r\n\r\n";
        for cut in 0..body.len() {
            let got = feed_all(&[&body[..cut], &body[cut..]]);
            assert!(got.contains(&"refused"), "cut at {cut}: {got:?}");
        }
        assert_eq!(feed_all(&[b";ext=1\r\n"]), ["refused"]);
        assert_eq!(feed_all(&[b"3\r\nabc\r\n", b"\r\n"]), ["more", "refused"]);
    }

    #[test]
    fn well_formed_bodies_pass_to_their_end_in_any_cut() {
        let body =
            b"5;ext=1\r\nhe\nlo\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: a\r\n\r\nNEXT";
        for cut in 0..body.len() {
            let got = feed_all(&[&body[..cut], &body[cut..]]);
            assert_eq!(got.last(), Some(&"done"), "cut at {cut}: {got:?}");
            assert!(!got.contains(&"refused"), "cut at {cut}");
        }
        let bytewise: Vec<&[u8]> = body.chunks(1).collect();
        assert!(!feed_all(&bytewise).contains(&"refused"));
    }

    #[test]
    fn the_body_is_found_behind_a_head_pingora_rebuilt_and_refused_when_it_cannot_be() {
        let read = b"POST /x y HTTP/1.1\r\nHost: a\r\n\r\n5;a\nb";
        let escaped = b"POST /x%20y HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(body_start(read, escaped), Some(read.len() - 5));
        let plain = b"POST /x HTTP/1.1\r\nHost: a\r\n\r\n5\r\n";
        assert_eq!(
            body_start(plain, &plain[..plain.len() - 3]),
            Some(plain.len() - 3)
        );
        assert_eq!(
            body_start(read, b"POST /x%20y HTTP/1.1\r\nHost: b\r\n\r\n"),
            None
        );

        let guard = |read: &[u8], head: &[u8]| {
            let w = Guard(Arc::new(Mutex::new(Watch::default())));
            w.request_starts(Some(read));
            w.head_read(head, Body::Chunked);
            w.refused()
        };
        assert!(guard(read, escaped), "the bare LF behind an escaped head");
        let fine = b"POST /x y HTTP/1.1\r\nHost: a\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert!(!guard(fine, escaped));
        assert!(
            guard(fine, b"GET /other HTTP/1.1\r\n\r\n"),
            "a body it cannot find"
        );
    }

    #[test]
    fn a_following_guard_finds_each_request_behind_the_body_before_it_whatever_the_reads() {
        let head_cl = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\n".to_vec();
        let head_chunked = b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let head_get = b"GET /c HTTP/1.1\r\n\r\n".to_vec();
        let trailers = b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n\r\n".to_vec();
        let bad = b"5;a\nb\r\nhello\r\n0\r\n\r\n".to_vec();
        // Three requests, the last one's body with a bare LF, as one byte stream cut anywhere.
        let requests: [(&[u8], Body, &[u8]); 4] = [
            (&head_cl, Body::Length(5), b"hello"),
            (&head_chunked, Body::Chunked, &trailers),
            (&head_get, Body::Empty, b""),
            (&head_chunked, Body::Chunked, &bad),
        ];
        let wire: Vec<u8> = requests
            .iter()
            .flat_map(|(h, _, b)| [*h, *b].concat())
            .collect();
        for cut in [1, 7, 13, 64, wire.len()] {
            let state = Arc::new(Mutex::new(Watch::default()));
            let guard = Guard(state.clone());
            guard.follow(&[]);
            // As pingora reads: a head, then (after `head_read`) its body, in reads of `cut`.
            let mut at = 0;
            let mut failed = false;
            for (head, body, bytes) in requests {
                let end = at + head.len();
                while at < end {
                    let to = (at + cut).min(end);
                    failed |= state.lock().unwrap().saw(&wire[at..to]).is_err();
                    at = to;
                }
                guard.head_read(head, body);
                let end = at + bytes.len();
                while at < end {
                    let to = (at + cut).min(end);
                    failed |= state.lock().unwrap().saw(&wire[at..to]).is_err();
                    at = to;
                }
                if head != &head_chunked[..] || bytes != &bad[..] {
                    assert!(!failed && !guard.refused(), "cut {cut}: {head:?}");
                }
            }
            assert!(guard.refused(), "cut {cut}: the bare LF went through");
        }
        // After an upgrade nothing is watched or kept.
        let state = Arc::new(Mutex::new(Watch::default()));
        let guard = Guard(state.clone());
        guard.follow(&[]);
        guard.stop();
        assert!(state.lock().unwrap().saw(&bad).is_ok());
        assert!(matches!(state.lock().unwrap().mode, Mode::Off));
    }

    #[test]
    fn what_pingora_refuses_itself_ends_the_watch() {
        // A CR without its LF, a chunk without its CRLF: pingora's parser refuses these.
        assert_eq!(feed_all(&[b"5\rx"]), ["malformed"]);
        assert_eq!(feed_all(&[b"1\r\naXY"]), ["malformed"]);
    }
}
