//! The proxy: per listener, `lean::ListenerApp` serves plain HTTP/1 requests itself and gives
//! the rest to a pingora `ProxyHttp` kept thin — route and token in `request_filter`, the peer
//! in `upstream_peer`, the token in `upstream_request_filter`, metrics in `logging`. The
//! decisions both paths make (answers, retargeting, renewal after a rejection) live here once.

mod admission;
mod chunk_guard;
pub mod lean;
mod lean_pool;
pub mod metrics;
pub mod respond;
pub mod routing;
pub mod signing;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use serde_json::json;
use tracing::{info, warn};

use crate::dialect::UpstreamVerdict;
use crate::secret::Secret;
use crate::token::exchange::Refusal;
use crate::token::{Exchanger, Token, Unavailable};
use routing::{Route, RouteTable};

/// Counts requests in flight so shutdown can wait for them to finish.
#[derive(Default)]
pub struct InFlight(AtomicUsize);

impl InFlight {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.clone())
    }
}

pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct TokenwardProxy {
    pub listener: SocketAddr,
    pub table: Arc<ArcSwap<RouteTable>>,
    pub in_flight: Arc<InFlight>,
}

pub struct RequestCtx {
    started: Instant,
    route: Option<Arc<Route>>,
    token: Option<Arc<Token>>,
    /// Set once the request has been replayed after the upstream rejected its token.
    replayed: bool,
    /// Set once the request has been replayed with the DPoP nonce the upstream asked for.
    nonce_replayed: bool,
    /// Set once the request has been sent again after a failed upstream attempt.
    resent: bool,
    /// For credentials that sign each request: the signer and the whole buffered body.
    signed: Option<signing::Signed>,
    /// The first bytes of an answer whose body alone can say whether it refused the signing
    /// credentials (S3's XML errors), while they are read.
    rejection_probe: Option<bytes::BytesMut>,
    /// For token-exchange credentials: the caller's own token, to exchange again after an
    /// upstream rejection. Dropped with the request.
    subject: Option<Secret>,
    /// 1xx answers the upstream sent for this request so far.
    informational: usize,
    /// The chunk guard of an HTTP/1 client connection (`chunk_guard`).
    guard: Option<chunk_guard::Guard>,
    _in_flight: InFlightGuard,
}

impl TokenwardProxy {
    /// The caller's exchanged token, or `None` once the request has been answered 401 (no
    /// subject token, or one the provider refused) without anything going upstream.
    async fn exchanged(
        session: &mut Session,
        ctx: &mut RequestCtx,
        route: &Arc<Route>,
        exchanger: &Arc<Exchanger>,
    ) -> Result<Option<std::result::Result<Arc<Token>, Unavailable>>> {
        let subject = session
            .req_header()
            .headers
            .get(exchanger.subject_header())
            .and_then(|v| exchanger.subject_in(v.as_bytes()))
            .map(Secret::new);
        let Some(subject) = subject else {
            let body = json!({
                "error": "missing_subject_token",
                "route": &*route.name,
                "message": exchanger.subject_wanted(),
            });
            respond::json(session, 401, body, None).await?;
            return Ok(None);
        };
        match exchanger.token(&subject).await {
            Ok(token) => {
                ctx.subject = Some(subject);
                Ok(Some(Ok(token)))
            }
            Err(Refusal::Unavailable(u)) => Ok(Some(Err(u))),
            Err(Refusal::ClaimsChallenge(claims)) => {
                let body = json!({
                    "error": "insufficient_claims",
                    "route": &*route.name,
                    "credential": route.credential.name(),
                    "message": "the identity provider requires the user to satisfy a Conditional Access policy; request a new token with the claims in WWW-Authenticate",
                });
                respond::claims_challenge(session, body, &claims).await?;
                Ok(None)
            }
            Err(Refusal::Rejected) => {
                let body = json!({
                    "error": "subject_token_rejected",
                    "route": &*route.name,
                    "credential": route.credential.name(),
                });
                respond::json(session, 401, body, None).await?;
                Ok(None)
            }
        }
    }
}

/// Marks the error that asks pingora to replay a request with a new token.
const TOKEN_REJECTED: ErrorType = ErrorType::Custom("TokenRejected");

/// Asks pingora to send the request again, once, with `fresh` in place of the token the
/// upstream rejected with `status`.
fn replay_with(ctx: &mut RequestCtx, fresh: Arc<Token>, status: u16) -> Result<()> {
    ctx.token = Some(fresh);
    ctx.replayed = true;
    replay(status)
}

fn replay(status: u16) -> Result<()> {
    let mut e = Error::explain(
        TOKEN_REJECTED,
        format!("upstream answered {status} to the token"),
    );
    e.set_retry(true);
    Err(e)
}

#[async_trait]
impl ProxyHttp for TokenwardProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            route: None,
            token: None,
            replayed: false,
            nonce_replayed: false,
            resent: false,
            signed: None,
            rejection_probe: None,
            subject: None,
            informational: 0,
            guard: None,
            _in_flight: self.in_flight.enter(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // First, before anything reads the body: the guard learns where it starts.
        if let Some(guard) = session.as_ref().stream().and_then(chunk_guard::Guard::of) {
            guard.head_read(
                &session.as_ref().to_h1_raw(),
                chunk_guard::Body::of(session.req_header()),
            );
            ctx.guard = Some(guard);
        }
        if let Some(refusal) = admission::refusal(session.req_header()) {
            // As on the lean path. pingora-proxy's `handle_new_request` would refuse CONNECT
            // with a bare 405; it is let through (`allow_connect_method_proxying`) to get here.
            session.set_keepalive(None);
            let (head, body) = refusal.parts()?;
            respond::write(session, head, body).await?;
            return Ok(true);
        }
        // Pipelined requests are answered in order, as on the lean path (RFC 9112 §9.3.2);
        // without this pingora-core closes the connection after an answer that said
        // keep-alive (`HttpSession::reuse`).
        session.as_mut().set_pipelining_enabled(true);
        if session.req_header().version == http::Version::HTTP_10 {
            // An HTTP/1.0 client cannot take a 1xx (RFC 9110 §15.2); pingora-core's
            // `HttpSession::write_response_header` would write them.
            session.as_mut().set_ignore_info_resp(true);
        }
        let route = self
            .table
            .load()
            .find_for(self.listener, session.req_header())
            .cloned();
        let Some(route) = route else {
            respond::json(session, 404, no_route(), None).await?;
            return Ok(true);
        };
        if let Some(guard) = ctx.guard.as_ref().filter(|g| g.refused()) {
            // The bad line came with the head: refused before anything goes upstream.
            let e = guard.refusal(Error::new(ErrorType::InternalError));
            session.set_keepalive(None);
            respond::json(session, 400, failure_body(400, &route.name, &e), None).await?;
            ctx.route = Some(route);
            return Ok(true);
        }
        let outcome = match route.credential.exchanger() {
            None => route.credential.token().await,
            Some(exchanger) => match Self::exchanged(session, ctx, &route, exchanger).await? {
                Some(outcome) => outcome,
                None => {
                    ctx.route = Some(route);
                    return Ok(true);
                }
            },
        };
        match outcome {
            Ok(token) => ctx.token = Some(token),
            Err(unavailable) => {
                let body = token_unavailable(&route, &unavailable);
                ctx.route = Some(route);
                respond::json(session, 503, body, Some(unavailable.retry_after)).await?;
                return Ok(true);
            }
        }
        let signer = route.credential.config().dialect.request_signer();
        if let Some(signer) = signer.as_ref().filter(|s| !s.signs_body()) {
            // Signed over the headers only: the body streams, its first 64 KiB kept so a
            // request the upstream refused for its signature can be replayed.
            ctx.signed = Some(signing::streaming(signer.clone()));
            session.as_mut().enable_retry_buffering();
        } else if let Some(signer) = signer {
            // The signature covers the body, so the whole body is read before any header goes
            // upstream (and kept, so a rejected request can be replayed too).
            match signing::buffer_body(session, signer).await? {
                Ok(signed) => ctx.signed = Some(signed),
                Err(refusal) => {
                    let (status, body) = refusal.response(&route.name);
                    ctx.route = Some(route);
                    respond::json(session, status, body, None).await?;
                    return Ok(true);
                }
            }
        } else if !route.reauth_statuses.is_empty()
            || route.credential.config().dialect.dpop().is_some()
        {
            // Keeps the first 64 KiB of the body so a rejected request (or one whose DPoP
            // proof lacked the nonce the upstream wants) can be sent again.
            session.as_mut().enable_retry_buffering();
        }
        ctx.route = Some(route);
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let route = ctx
            .route
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no route selected"))?;
        Ok(Box::new(route.peer_for(ctx.token.as_deref())?))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Both are set together in request_filter; a request never leaves without its token.
        let (Some(route), Some(token)) = (ctx.route.as_ref(), ctx.token.as_ref()) else {
            return Error::e_explain(ErrorType::InternalError, "no token for this request");
        };
        retarget(route, upstream_request)?;
        normalise_content_length(upstream_request)?;
        if session.req_header().version == http::Version::HTTP_10 {
            // Expect means nothing from an HTTP/1.0 client (RFC 9110 §10.1.1), and the 100 it
            // would draw could not be relayed.
            upstream_request.remove_header(&http::header::EXPECT);
        }
        if upstream_request.headers.contains_key(http::header::UPGRADE)
            && !session.as_mut().is_body_empty()
        {
            // A WebSocket upgrade with a body goes as a plain request, on both paths.
            upstream_request.remove_header(&http::header::UPGRADE);
            upstream_request.remove_header(&http::header::CONNECTION);
        }
        if !route.upstream.keepalive
            && !upstream_request.headers.contains_key(http::header::UPGRADE)
        {
            upstream_request.insert_header(http::header::CONNECTION, "close")?;
        }
        if ctx.subject.is_some()
            && let Some(exchanger) = route.credential.exchanger()
        {
            // The caller's own token never goes upstream, whatever header carried it.
            upstream_request.remove_header(exchanger.subject_header());
        }
        match &ctx.signed {
            Some(signed) => signed.apply(token, upstream_request)?,
            None => {
                let (name, value) = token.header();
                upstream_request.insert_header(name.clone(), value.clone())?;
            }
        }
        if let Some(dpop) = route.credential.config().dialect.dpop() {
            // One fresh proof per attempt, for the URL the upstream sees (RFC 9449 §4.2): signed
            // here, after the lock-free token read, and never logged.
            let proof = dpop
                .proof(
                    upstream_request.method.as_str(),
                    &route.upstream.origin,
                    upstream_request.uri.path(),
                    Some(token.value().expose()),
                )
                .map_err(|reason| Error::explain(ErrorType::InternalError, reason))?;
            upstream_request.insert_header(crate::dpop::HEADER, proof)?;
        }
        Ok(())
    }

    /// For signed requests the body was read in `request_filter`; pingora then replays what it
    /// kept of it here (see `signing`), and the whole buffered body is sent in its place.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(signed) = &ctx.signed {
            signed.substitute(body, end_of_stream);
        }
        Ok(())
    }

    /// An upstream that rejects the token: drop it (only if it is still the current one), get a
    /// new one through the single flight, and replay the request once when its body allows.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = response.status.as_u16();
        if response.status == http::StatusCode::SWITCHING_PROTOCOLS
            && !(is_websocket_upgrade(session.req_header()) && session.as_mut().is_body_empty())
        {
            // pingora-proxy (`reject_mismatched_h1_upgrade_101`) refuses a 101 only when the
            // two sides' upgrade requests differ; one nobody asked for would become a tunnel.
            return Error::e_explain(
                ErrorType::InvalidHTTPHeader,
                "upstream switched protocols on a request that asked for no upgrade",
            )
            .map_err(|e| e.into_up());
        }
        if response.status.is_informational() && status != 101 {
            ctx.informational += 1;
            if ctx.informational > MAX_INFORMATIONAL {
                return Error::e_explain(
                    ErrorType::InvalidHTTPHeader,
                    "upstream sent too many 1xx answers",
                )
                .map_err(|e| e.into_up());
            }
        }
        let (Some(route), Some(token)) = (ctx.route.as_ref(), ctx.token.as_ref()) else {
            return Ok(());
        };
        if let Some(dpop) = route.credential.config().dialect.dpop() {
            let nonce = response.headers.get(crate::dpop::NONCE_HEADER);
            if let Some(nonce) = nonce {
                dpop.set_nonce(&route.upstream.origin, nonce.as_bytes());
            }
            let asks_for_nonce = status == 401
                && response
                    .headers
                    .get_all(http::header::WWW_AUTHENTICATE)
                    .iter()
                    .any(|v| crate::dpop::asks_for_nonce(v.as_bytes()));
            if asks_for_nonce {
                // RFC 9449 §9: the token was not rejected, the proof lacked the nonce. Replay
                // once with it, keeping the token; a second such answer passes through.
                if nonce.is_none()
                    || ctx.nonce_replayed
                    || session.as_ref().retry_buffer_truncated()
                {
                    return Ok(());
                }
                ctx.nonce_replayed = true;
                info!(route = %route.name, "upstream asked for a DPoP nonce; replaying with it");
                return replay(status);
            }
        }
        if let Some(signed) = &ctx.signed {
            match signed.verdict(response) {
                UpstreamVerdict::Accepted => {}
                UpstreamVerdict::InBody => {
                    ctx.rejection_probe = Some(bytes::BytesMut::new());
                    return Ok(());
                }
                UpstreamVerdict::Rejected(code) => {
                    route.credential.note_upstream_rejection(&code);
                    let (route, token) = (route.clone(), token.clone());
                    return reauthorize(session, ctx, &route, &token, status).await;
                }
            }
        }
        if !route.reauth_statuses.contains(&status) {
            return Ok(());
        }
        if let (Some(exchanger), Some(subject)) = (route.credential.exchanger(), &ctx.subject) {
            // Only this caller's entry is dropped, and only if it still holds the rejected token.
            if ctx.replayed
                || session.as_ref().retry_buffer_truncated()
                || !exchanger.reject(subject, token).await
            {
                return Ok(());
            }
            return match exchanger.token(subject).await {
                Ok(fresh) if fresh.generation != token.generation => {
                    info!(route = %route.name, status, "upstream rejected a caller's exchanged token; replaying with a new one");
                    replay_with(ctx, fresh, status)
                }
                _ => Ok(()),
            };
        }
        let (route, token) = (route.clone(), token.clone());
        reauthorize(session, ctx, &route, &token, status).await
    }

    /// A refusal of the signing credentials that only the body names (S3): the answer is on its
    /// way to the client, so the credentials are dropped for the next request, not replayed.
    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        let Some(probe) = ctx.rejection_probe.as_mut() else {
            return Ok(None);
        };
        if let Some(chunk) = body {
            let room = REJECTION_PROBE_BYTES.saturating_sub(probe.len());
            probe.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        if !end_of_stream && probe.len() < REJECTION_PROBE_BYTES {
            return Ok(None);
        }
        let probe = ctx.rejection_probe.take().unwrap_or_default();
        if let (Some(signed), Some(route), Some(token)) = (&ctx.signed, &ctx.route, &ctx.token)
            && let Some(code) = signed.rejection_in_body(&probe)
        {
            route.credential.note_upstream_rejection(code);
            route.credential.reject(token.generation);
        }
        Ok(None)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if response.status == http::StatusCode::SWITCHING_PROTOCOLS
            && let Some(guard) = &ctx.guard
        {
            // What follows is the tunnel's, not HTTP/1.
            guard.stop();
        }
        // pingora-core's `prepare_response_header` turns the client connection's keep-alive off
        // for any answer written before the request body is read whole (its default
        // `close_on_response_before_downstream_finish`): a 100 relayed for `Expect:
        // 100-continue`, which asks for that body, would end the connection after the final
        // answer. A 1xx does not end the exchange; the final answer keeps the rule.
        session
            .as_mut()
            .set_close_on_response_before_downstream_finish(!response.status.is_informational());
        strip_answer_hop_by_hop(response);
        if answers_http10_until_close(session.req_header(), response) {
            // pingora-proxy's `ProxyHttp::proxy_handle_downstream` (proxy_h1.rs) adds
            // `Transfer-Encoding: chunked` to every answer of unknown length before this filter,
            // whatever the client's version; an HTTP/1.0 client cannot take chunked (RFC 9112
            // §6.1). Without it pingora-core's body writer sends the body as it comes, and
            // keep-alive is turned off first so that `write_response_header` says close.
            response.remove_header(&http::header::TRANSFER_ENCODING);
            session.set_keepalive(None);
        } else if answers_coded_until_close(session.req_header(), response) {
            // pingora-core's body writer then writes it close-delimited and turns keep-alive
            // off itself (`prepare_response_header`), but only after it has written
            // `Connection: keep-alive`: turned off here first, the answer says close.
            session.set_keepalive(None);
        }
        Ok(())
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let retry = if e.etype() == &TOKEN_REJECTED {
            // The upstream refused the request at authentication, so it did not act on it:
            // replaying is safe whatever the method, as long as the whole body was kept.
            !session.as_ref().retry_buffer_truncated()
        } else {
            // Decided on pingora's own error, before the context below wraps it.
            let retry = upstream::retry_failed_attempt(&upstream::FailedAttempt {
                error: &e,
                reused: client_reused,
                idempotent: session.req_header().method.is_idempotent(),
                body_kept: !session.as_ref().retry_buffer_truncated(),
                resent_before: ctx.resent,
            });
            ctx.resent |= retry;
            retry
        };
        let mut e = e.more_context(format!("Peer: {peer}"));
        e.set_retry(retry);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        // A read the chunk guard failed is the client's malformed body, not a lost client.
        let refused = ctx
            .guard
            .as_ref()
            .filter(|g| g.refused())
            .map(|g| g.refusal(Error::new(ErrorType::InternalError)));
        let e = refused.as_deref().unwrap_or(e);
        let code = failure_status(e);
        let answered = session
            .response_written()
            .is_some_and(|r| !r.status.is_informational() || r.status == 101);
        if code > 0 && !answered {
            // The connection ends after this answer (`can_reuse_downstream` below): say so.
            session.set_keepalive(None);
            let route = ctx.route.as_ref().map(|r| &*r.name).unwrap_or("");
            let body = failure_body(code, route, e);
            if let Err(write_err) = respond::json(session, code, body, None).await {
                warn!(route, error = %write_err, "cannot write the error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let Some(route) = ctx.route.as_ref() else {
            return;
        };
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        log_outcome(route, status, ctx.started, e);
    }
}

/// How many 1xx answers one request may get before the upstream is taken to be broken.
const MAX_INFORMATIONAL: usize = 16;

/// A WebSocket upgrade as pingora-proxy recognises one (`is_websocket_upgrade_request`): the
/// only upgrade either path passes on.
fn is_websocket_upgrade(request: &RequestHeader) -> bool {
    request.version == http::Version::HTTP_11
        && request
            .headers
            .get(http::header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// Whether an answer's body ends only when the upstream closes, whoever the client: its
/// transfer codings do not end with chunked (RFC 9112 §6.3). It cannot be re-framed without
/// decoding them, so it is relayed as it came, codings and all, and the client connection
/// ends with it.
fn answers_coded_until_close(client: &RequestHeader, response: &ResponseHeader) -> bool {
    let bodiless = client.method == http::Method::HEAD
        || response.status.is_informational()
        || matches!(response.status.as_u16(), 204 | 304);
    let last_coding = response
        .headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .map(|v| {
            v.as_bytes()
                .rsplit(|b| *b == b',')
                .next()
                .unwrap_or_default()
                .trim_ascii()
        });
    !bodiless && last_coding.is_some_and(|c| !c.eq_ignore_ascii_case(b"chunked"))
}

/// Whether an answer to an HTTP/1.0 client has a body of unknown length, which it must get
/// close-delimited, its connection ending with the body: it cannot take chunked (RFC 9112 §6.1).
fn answers_http10_until_close(client: &RequestHeader, response: &ResponseHeader) -> bool {
    let old_client = matches!(
        client.version,
        http::Version::HTTP_10 | http::Version::HTTP_09
    );
    let bodiless = client.method == http::Method::HEAD
        || response.status.is_informational()
        || matches!(response.status.as_u16(), 204 | 304);
    old_client && !bodiless && !response.headers.contains_key(http::header::CONTENT_LENGTH)
}

/// Hop-by-hop fields an answer must not carry past this proxy (RFC 9110 §7.6.1): those its
/// `Connection` names, `Keep-Alive`, `Proxy-Connection`, `TE`, and `Upgrade` unless it is a 101.
/// The framing fields stay: the answer is re-framed from them. pingora writes its own
/// `Connection` on final answers; a 101 keeps `Connection: Upgrade`.
fn strip_answer_hop_by_hop(response: &mut ResponseHeader) {
    /// At most this many `Connection` names are looked at; an answer naming more is odd, not
    /// dangerous: what is not removed only reaches the client.
    const MAX_NAMED: usize = 32;
    let switching = response.status == http::StatusCode::SWITCHING_PROTOCOLS;
    // Fields `Connection` names come only with `Connection`.
    let stripped = [
        http::header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        http::header::TE,
        http::header::UPGRADE,
    ];
    if !carries_any(&response.headers, &stripped) {
        if switching {
            let _ = response.insert_header(http::header::CONNECTION, "Upgrade");
        }
        return;
    }
    let named: Vec<http::HeaderName> = response
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|o| !o.is_empty())
        .take(MAX_NAMED)
        .filter_map(|o| http::HeaderName::from_bytes(o).ok())
        .collect();
    let kept = |name: &http::HeaderName| {
        *name == http::header::CONTENT_LENGTH
            || *name == http::header::TRANSFER_ENCODING
            || (switching && *name == http::header::UPGRADE)
    };
    let always = [KEEP_ALIVE, PROXY_CONNECTION, http::header::TE];
    let not_upgrading = [http::header::UPGRADE, http::header::CONNECTION];
    let doomed = named
        .iter()
        .filter(|name| !kept(name))
        .chain(&always)
        .chain(not_upgrading.iter().filter(|_| !switching));
    for name in doomed {
        if response.headers.contains_key(name) {
            response.remove_header(name);
        }
    }
    if switching {
        let _ = response.insert_header(http::header::CONNECTION, "Upgrade");
    }
}

/// Whether `headers` carries any of `names`. Most messages carry no hop-by-hop field, and
/// one pass over the few fields a message has costs less than a lookup per name; pingora's
/// `remove_header` given a name as text also parses it and looks in two maps even when the
/// field is absent (stripping that way cost 4.6 % of instructions per request). Removal then
/// goes name by name, typed, in a fixed order: the order of removal decides the order of the
/// fields left (`HeaderMap` fills a removed field's place with its last one).
fn carries_any(headers: &http::HeaderMap, names: &[http::HeaderName]) -> bool {
    headers.keys().any(|carried| names.contains(carried))
}

/// Hop-by-hop fields `http` has no constant for.
const KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: http::HeaderName = http::HeaderName::from_static("proxy-connection");

fn no_route() -> serde_json::Value {
    json!({"error": "no_route", "message": "no route matches this request's host and path"})
}

/// The 503 body for a request refused for want of a token, logged with its reason.
fn token_unavailable(route: &Route, unavailable: &Unavailable) -> serde_json::Value {
    if route.metrics.refusal_log.allow(unavailable.class) {
        warn!(
            route = %route.name,
            credential = %unavailable.credential,
            class = unavailable.class,
            reason = %unavailable.reason,
            retry_after_s = unavailable.retry_after.as_secs(),
            "request refused: no valid token (logged once a minute per route and class; tokenward_refusal_log_lines_suppressed_total counts the rest)"
        );
    }
    // The client learns the class only: the detail can name secret files, environment
    // variables or the provider's own words (it is in the log and `/tokens` for operators).
    json!({
        "error": "token_unavailable",
        "route": &*route.name,
        "credential": &*unavailable.credential,
        "reason": unavailable.class,
        "retry_after": unavailable.retry_after.as_secs(),
    })
}

/// Collapses a `Content-Length` pingora accepted as a list of one repeated value (`5, 5`, or the
/// field twice) to that one value: a strict upstream refuses the list (RFC 9110 §8.6).
/// pingora-core's `validate_content_length` accepts such lists but forwards them as they came.
fn normalise_content_length(request: &mut RequestHeader) -> Result<()> {
    let values = request.headers.get_all(http::header::CONTENT_LENGTH);
    let mut iter = values.iter();
    let (Some(first), None) = (iter.next(), iter.next()) else {
        return collapse(request);
    };
    if first.as_bytes().contains(&b',') {
        return collapse(request);
    }
    Ok(())
}

fn collapse(request: &mut RequestHeader) -> Result<()> {
    let mut length: Option<&[u8]> = None;
    for part in request
        .headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
    {
        if length.is_some_and(|l| l != part) || part.is_empty() {
            return Error::e_explain(ErrorType::InvalidHTTPHeader, "conflicting Content-Length")
                .map_err(|e| e.into_down());
        }
        length = Some(part);
    }
    if let Some(length) = length.map(<[u8]>::to_vec) {
        request.insert_header(http::header::CONTENT_LENGTH, length)?;
    }
    Ok(())
}

/// Points a request at the route's upstream: its Host, and its target below the upstream's
/// base path.
fn retarget(route: &Route, request: &mut RequestHeader) -> Result<()> {
    request.insert_header(http::header::HOST, route.upstream.host_header.clone())?;
    // An absolute-form target names another host: send only its path, to our upstream.
    let absolute = !request.raw_path().starts_with(b"/") || request.uri.authority().is_some();
    if absolute || !route.upstream.base_path.is_empty() {
        let pq = request.uri.path_and_query().map_or("/", |p| p.as_str());
        let target = format!("{}{}", route.upstream.base_path, pq);
        let uri = target.parse::<http::Uri>().map_err(|_| {
            Error::explain(
                ErrorType::InvalidHTTPHeader,
                "request target cannot be rewritten",
            )
        })?;
        request.set_uri(uri);
    }
    Ok(())
}

/// How much of an answer's body is read for a refusal of the signing credentials.
const REJECTION_PROBE_BYTES: usize = 4096;

/// The upstream refused `token` (a bearer token's 401, AWS credentials' signature): drops it
/// and replays the request once with a new one when its body was kept whole and it was not
/// replayed already; otherwise only drops it, so the next request does not carry it.
async fn reauthorize(
    session: &mut Session,
    ctx: &mut RequestCtx,
    route: &Arc<Route>,
    token: &Arc<Token>,
    status: u16,
) -> Result<()> {
    if ctx.replayed || session.as_ref().retry_buffer_truncated() {
        route.credential.reject(token.generation);
        return Ok(());
    }
    match renewed(route, token).await {
        Some(fresh) => {
            info!(route = %route.name, status, "upstream rejected the token; replaying with a new one");
            replay_with(ctx, fresh, status)
        }
        None => Ok(()),
    }
}

/// After the upstream refused `token`: drops it (only if it is still the current one) and
/// returns a new one from the single flight, or `None` when there is none to replay with.
async fn renewed(route: &Route, token: &Token) -> Option<Arc<Token>> {
    if !route.credential.reject(token.generation) {
        return None;
    }
    match route.credential.token().await {
        Ok(fresh) if fresh.generation != token.generation => Some(fresh),
        _ => None,
    }
}

/// The status a failed request is answered with; 0 when the client is gone.
fn failure_status(e: &Error) -> u16 {
    match e.etype() {
        ErrorType::HTTPStatus(code) => *code,
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}

fn failure_body(code: u16, route: &str, e: &Error) -> serde_json::Value {
    let error = if code == 502 {
        "upstream_unavailable"
    } else {
        "proxy_error"
    };
    json!({"error": error, "route": route, "reason": e.etype().as_str()})
}

fn log_outcome(route: &Route, status: u16, started: Instant, e: Option<&Error>) {
    route
        .metrics
        .observe(status, started.elapsed().as_secs_f64());
    if let Some(e) = e {
        warn!(route = %route.name, credential = %route.credential.name(), status, error = %e.etype().as_str(), "request failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, fields: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (name, value) in fields {
            r.append_header(name.to_string(), *value).unwrap();
        }
        r
    }

    #[test]
    fn answers_lose_their_hop_by_hop_fields_but_keep_their_framing_and_a_101_its_upgrade() {
        let mut r = answer(
            200,
            &[
                ("Connection", "X-Hop, Content-Length, close"),
                ("X-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Connection", "keep-alive"),
                ("TE", "trailers"),
                ("Upgrade", "h2c"),
                ("Content-Length", "2"),
                ("X-Kept", "k"),
            ],
        );
        strip_answer_hop_by_hop(&mut r);
        let left: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-length", "x-kept"]);
        let mut r = answer(
            101,
            &[
                ("Connection", "Upgrade, X-Hop"),
                ("Upgrade", "websocket"),
                ("X-Hop", "1"),
            ],
        );
        strip_answer_hop_by_hop(&mut r);
        assert_eq!(r.headers["connection"], "Upgrade");
        assert_eq!(r.headers["upgrade"], "websocket");
        assert!(!r.headers.contains_key("x-hop"));
    }

    #[test]
    fn a_content_length_list_of_one_value_becomes_that_value_and_conflicts_are_refused() {
        for fields in [&["5, 5"][..], &["5", "5"], &["5,5, 5"]] {
            let mut r = RequestHeader::build("POST", b"/", None).unwrap();
            for v in fields {
                r.append_header("Content-Length", *v).unwrap();
            }
            normalise_content_length(&mut r).unwrap();
            let values: Vec<_> = r.headers.get_all("content-length").iter().collect();
            assert_eq!(values, ["5"], "{fields:?}");
        }
        for fields in [&["5, 6"][..], &["5", "6"], &["5,"]] {
            let mut r = RequestHeader::build("POST", b"/", None).unwrap();
            for v in fields {
                r.append_header("Content-Length", *v).unwrap();
            }
            assert!(normalise_content_length(&mut r).is_err(), "{fields:?}");
        }
    }
}
