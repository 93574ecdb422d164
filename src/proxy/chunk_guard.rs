//! A guard on the lean path's client connections: it refuses a chunked request body whose
//! chunk-size line holds a bare LF or no size. pingora-core parses chunk-size lines with httparse's
//! `parse_chunk_size`, which takes a bare LF inside a chunk extension as part of the extension
//! and ends the line at the next CRLF, where parsers that end a line at a bare LF see the chunk
//! data start earlier: two parsers would disagree on where the body ends (RFC 9112 §7.1.1
//! allows no LF there); and it reads a line without a size as the last chunk, losing the
//! chunks after it as trailers. The guard watches the bytes pingora reads, from the end of the request
//! head to the end of the chunked body, and fails the read that brings such a line.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use async_trait::async_trait;
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
}

#[derive(Debug, Default)]
enum Mode {
    #[default]
    Off,
    /// Reading a request head: what was read, from its first byte.
    Recording(Vec<u8>),
    Checking(ChunkLines),
}

impl Guarded {
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

    /// The head just read was `head` (its raw bytes); `chunked` when a chunked body follows.
    pub fn head_read(&self, head: &[u8], chunked: bool) {
        self.with(|w| {
            let Mode::Recording(mut recorded) = std::mem::take(&mut w.mode) else {
                return;
            };
            if chunked {
                match body_start(&recorded, head) {
                    Some(at) => {
                        let mut lines = ChunkLines::default();
                        match lines.feed(&recorded[at..]) {
                            Fed::More => w.mode = Mode::Checking(lines),
                            Fed::Done => {}
                            // The bytes are already in pingora's buffer: the next read fails
                            // instead.
                            Fed::Refused => w.refused = true,
                        }
                    }
                    // A body that cannot be watched is not let through unwatched.
                    None => w.refused = true,
                }
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
}

impl Watch {
    /// Looks at `bytes` just read; an error refuses them.
    fn saw(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.refused {
            return Err(malformed_size_line());
        }
        match &mut self.mode {
            Mode::Off => {}
            Mode::Recording(recorded) => {
                if recorded.len() + bytes.len() > RECORD_LIMIT {
                    self.mode = Mode::Off;
                } else {
                    recorded.extend_from_slice(bytes);
                }
            }
            Mode::Checking(lines) => match lines.feed(bytes) {
                Fed::More => {}
                Fed::Done => self.mode = Mode::Off,
                Fed::Refused => {
                    self.mode = Mode::Off;
                    self.refused = true;
                    return Err(malformed_size_line());
                }
            },
        }
        Ok(())
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
    /// The body ended (what follows is the next request's).
    Done,
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
    TrailerLine {
        empty: bool,
        cr: bool,
    },
    Done,
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
    fn feed(&mut self, mut bytes: &[u8]) -> Fed {
        while let Some((&b, rest)) = bytes.split_first() {
            match self {
                ChunkLines::Data(left) => {
                    let skip = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *left -= skip as u64;
                    bytes = &bytes[skip..];
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
                            ChunkLines::TrailerLine {
                                empty: true,
                                cr: false,
                            }
                        } else {
                            ChunkLines::Data(*size)
                        };
                    }
                    _ if *cr => *self = ChunkLines::Done,
                    b'\r' => *cr = true,
                    _ if !*past_digits && b.is_ascii_hexdigit() => {
                        *digits += 1;
                        if *digits > 16 {
                            *self = ChunkLines::Done;
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
                        ChunkLines::Done
                    };
                }
                ChunkLines::DataLf => {
                    *self = if b == b'\n' {
                        ChunkLines::default()
                    } else {
                        ChunkLines::Done
                    };
                }
                ChunkLines::TrailerLine { empty, cr } => match b {
                    b'\n' if *empty && *cr => {
                        *self = ChunkLines::Done;
                        return Fed::Done;
                    }
                    b'\n' => {
                        *empty = true;
                        *cr = false;
                    }
                    b'\r' => *cr = true,
                    _ => {
                        *empty = false;
                        *cr = false;
                    }
                },
                ChunkLines::Done => return Fed::Done,
            }
            bytes = rest;
        }
        match self {
            ChunkLines::Done => Fed::Done,
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
                Fed::Done => "done",
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
            w.head_read(head, true);
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
    fn what_pingora_refuses_itself_ends_the_watch() {
        // A CR without its LF, a chunk without its CRLF: pingora's parser refuses these.
        assert_eq!(feed_all(&[b"5\rx"]), ["done"]);
        assert_eq!(feed_all(&[b"1\r\naXY"]), ["done"]);
    }
}
