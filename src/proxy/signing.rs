//! Requests whose credential signs each request over its query and body (EnOS APIM, AWS
//! SigV4 with a signed payload), or over its headers only (AWS SigV4, unsigned payload).
//!
//! The signature goes into headers, and headers go upstream before the body, so the body is read
//! whole in `request_filter`, up to the signer's bound (larger ones get a 413 without being read).
//!
//! How the buffered body reaches the upstream, in pingora 0.9: once the downstream body is read,
//! pingora does not read it again; it sends whatever its *retry buffer* holds (at most 64 KiB;
//! a larger body truncates it and nothing is sent) through `request_body_filter`, and when the
//! body is empty it calls the filter with `None`. So the retry buffer is switched on only for
//! the last ≤ 64 KiB of the body — from the start for small bodies, once the bytes left to read
//! (known from Content-Length) fit for larger ones — and `request_body_filter` replaces that
//! tail with the whole buffered body. The same happens when a rejected request is replayed. A
//! chunked body (no Content-Length) larger than 64 KiB cannot be placed that way and gets a 411.
//! The upstream request carries `Content-Length` = the buffered length and no
//! `Transfer-Encoding`, and no `Expect` (the body is already here).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pingora::prelude::*;
use pingora::proxy::Session;
use serde_json::json;

use crate::dialect::{RequestSigner, SignInput, UpstreamVerdict};
use crate::token::Token;

/// pingora's retry buffer (`BODY_BUF_LIMIT` in pingora-core 0.9): what it replays by itself.
pub const RETRY_BUFFER: usize = 64 * 1024;

/// A signed request's signer and, when the signature covers it, its whole body.
pub struct Signed {
    signer: Arc<dyn RequestSigner>,
    /// `None` when the signer does not sign the body: it streams as for any route.
    body: Option<Bytes>,
    /// The client sent a body (Content-Length or chunked), even an empty one.
    had_body: bool,
}

/// Why a signed request is refused before it goes upstream.
pub enum Refusal {
    TooLarge {
        limit: usize,
    },
    LengthRequired,
    /// The body arrived in a way that left nothing for pingora to replay (not seen in practice).
    NotStaged,
}

impl Refusal {
    pub fn response(&self, route: &str) -> (u16, serde_json::Value) {
        match self {
            Refusal::TooLarge { limit } => (
                413,
                json!({
                    "error": "body_too_large",
                    "route": route,
                    "limit_bytes": limit,
                    "message": format!("this route signs each request over its body, which is buffered up to {limit} bytes; this body is larger"),
                }),
            ),
            Refusal::NotStaged => (
                500,
                json!({
                    "error": "proxy_error",
                    "route": route,
                    "message": "the request body could not be staged for signing",
                }),
            ),
            Refusal::LengthRequired => (
                411,
                json!({
                    "error": "length_required",
                    "route": route,
                    "message": format!("this route signs each request over its body; a body over {RETRY_BUFFER} bytes needs a Content-Length"),
                }),
            ),
        }
    }
}

fn content_length(session: &Session) -> Option<usize> {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Reads the whole request body, bounded by the signer's limit.
pub async fn buffer_body(
    session: &mut Session,
    signer: Arc<dyn RequestSigner>,
) -> Result<std::result::Result<Signed, Refusal>> {
    let limit = signer.max_body_bytes();
    let declared = content_length(session);
    if declared.is_some_and(|n| n > limit) {
        return Ok(Err(Refusal::TooLarge { limit }));
    }
    let headers = &session.req_header().headers;
    let had_body = declared.is_some() || headers.contains_key(http::header::TRANSFER_ENCODING);
    let expects_continue = headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let downstream = session.as_mut();
    if downstream.is_body_empty() {
        return Ok(Ok(Signed {
            signer,
            body: Some(Bytes::new()),
            had_body,
        }));
    }
    if expects_continue {
        downstream.write_continue_response().await?;
    }
    let mut buf = BytesMut::new();
    let mut buffering = false;
    loop {
        // Only the tail goes into pingora's retry buffer (see the module docs).
        let left = declared.map(|n| n.saturating_sub(buf.len()));
        if !buffering && left.is_none_or(|l| l <= RETRY_BUFFER) {
            downstream.enable_retry_buffering();
            buffering = true;
        }
        match downstream.read_request_body().await? {
            Some(chunk) => {
                if buf.len() + chunk.len() > limit {
                    return Ok(Err(Refusal::TooLarge { limit }));
                }
                buf.extend_from_slice(&chunk);
            }
            None => break,
        }
    }
    if !buf.is_empty() && downstream.get_retry_buffer().is_none() {
        // Nothing pingora would replay, so the body could not be sent: refuse rather than hang.
        return Ok(Err(if declared.is_none() {
            Refusal::LengthRequired
        } else {
            Refusal::NotStaged
        }));
    }
    Ok(Ok(Signed {
        signer,
        body: Some(buf.freeze()),
        had_body,
    }))
}

/// A request whose signature does not cover its body (`payload = "unsigned"`): nothing is read
/// here, the body streams.
pub fn streaming(signer: Arc<dyn RequestSigner>) -> Signed {
    Signed {
        signer,
        body: None,
        had_body: false,
    }
}

impl Signed {
    /// Writes the signer's headers (in place of the credential's presentation header) and
    /// frames the body as it will be sent.
    pub fn apply(&self, token: &Token, request: &mut RequestHeader) -> Result<()> {
        for name in self.signer.replaces() {
            request.remove_header(name);
        }
        let path = self.signer.wire_path(request.uri.path());
        let query = request.uri.query().and_then(|q| self.signer.wire_query(q));
        if path.is_some() || query.is_some() {
            let path = path.unwrap_or_else(|| request.uri.path().to_string());
            let target = match query.as_deref().or(request.uri.query()) {
                Some(q) if !q.is_empty() => format!("{path}?{q}"),
                _ => path,
            };
            let uri = target.parse::<http::Uri>().map_err(|_| {
                Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "cannot respell the request path for signing",
                )
            })?;
            request.set_uri(uri);
        }
        if let Some(body) = &self.body {
            // Framed first: the signature may cover the framing fields the upstream sees.
            request.remove_header(&http::header::EXPECT);
            if self.had_body || !body.is_empty() {
                request.remove_header(&http::header::TRANSFER_ENCODING);
                request.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
            }
        }
        let headers = self
            .signer
            .sign(
                token.value(),
                &SignInput {
                    method: request.method.as_str(),
                    path: request.uri.path(),
                    headers: &request.headers,
                    query: request.uri.query(),
                    body: self.body.as_deref().unwrap_or_default(),
                },
            )
            .map_err(|reason| {
                // What cannot be signed is what the client sent (a field that is not visible
                // ASCII): its 400, naming the field in the log, not a server fault.
                Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    format!("cannot sign the request: {reason}"),
                )
                .into_down()
            })?;
        for (name, value) in headers {
            request.insert_header(name, value)?;
        }
        Ok(())
    }

    /// What the upstream's answer says about the credentials that signed the request.
    pub fn verdict(&self, response: &ResponseHeader) -> UpstreamVerdict {
        self.signer
            .verdict(response.status.as_u16(), &response.headers)
    }

    /// After [`UpstreamVerdict::InBody`]: the refusal's code in the first bytes of its body.
    pub fn rejection_in_body(&self, body_start: &[u8]) -> Option<&'static str> {
        self.signer.rejection_in_body(body_start)
    }

    /// Replaces what pingora replays from its retry buffer with the whole body.
    pub fn substitute(&self, body: &mut Option<Bytes>, end_of_stream: bool) {
        let Some(whole) = &self.body else {
            return;
        };
        *body = if end_of_stream {
            (!whole.is_empty()).then(|| whole.clone())
        } else {
            Some(Bytes::new())
        };
    }
}
