//! The lean HTTP/1 path: plain keep-alive HTTP/1 requests, on listeners whose routes all forward
//! plainly, served on pingora-core's HTTP/1 sessions and connector, with a keep-alive pool of
//! its own (`lean_pool`), without pingora-proxy's per-request orchestration, which costs about
//! a third of a proxied request's CPU (benches/README.md). Everything else — HTTP/2, upgrades,
//! per-caller exchange, signed requests, DPoP — goes to the `ProxyHttp` path. Both share the
//! route table, the token engine, the JSON answers and the replay and resend rules.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::protocols::http::v1::client::HttpSession as Upstream;
use pingora::protocols::http::v1::server::HttpSession as Downstream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use pingora::upstreams::peer::Peer;
use serde_json::json;
use tracing::info;

use super::admission;
use super::chunk_guard::{Body, Guard, Guarded};
use super::lean_pool::LeanPool;
use super::routing::{Route, RouteTable};
use super::upstream::{FailedAttempt, retry_failed_attempt};
use super::{
    InFlight, MAX_INFORMATIONAL, TokenwardProxy, failure_body, failure_status,
    is_websocket_upgrade, log_outcome, no_route, renewed, respond, retarget, token_unavailable,
};
use crate::token::Token;

/// How long an idle client connection is kept, as pingora's own HTTP/1 service does.
const KEEPALIVE_SECONDS: u64 = 60;

/// At most this many names in `Connection`; more is refused, as the full path does
/// (pingora-proxy's `ConnectionNominations::parse` refuses a tenth).
const MAX_CONNECTION_OPTIONS: usize = 9;

/// Hop-by-hop fields (RFC 9110 §7.6.1): they describe this connection, not the request.
const HOP_BY_HOP: [header::HeaderName; 10] = [
    header::CONNECTION,
    super::KEEP_ALIVE,
    super::PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HeaderName::from_static("http2-settings"),
];

/// One route listener: its connections go to the lean path when it is on and every route on
/// the listener forwards plainly, else to the `ProxyHttp` path.
pub struct ListenerApp {
    listener: SocketAddr,
    table: Arc<ArcSwap<RouteTable>>,
    in_flight: Arc<InFlight>,
    lean: bool,
    max_attempts: usize,
    pool: Arc<LeanPool>,
    full: Arc<HttpProxy<TokenwardProxy>>,
}

impl ListenerApp {
    pub fn new(
        proxy: TokenwardProxy,
        conf: &Arc<pingora::server::configuration::ServerConf>,
        lean: bool,
    ) -> Self {
        ListenerApp {
            listener: proxy.listener,
            table: proxy.table.clone(),
            in_flight: proxy.in_flight.clone(),
            lean,
            max_attempts: conf.max_retries.max(1),
            pool: Arc::new(LeanPool::new(
                pingora::connectors::ConnectorOptions::from_server_conf(conf),
                conf.upstream_keepalive_pool_size,
            )),
            full: Arc::new(full_path(conf, proxy)),
        }
    }
}

/// pingora-proxy's `HttpProxy` for what the lean path does not serve. `CONNECT` reaches its
/// `request_filter`, which refuses it with the same JSON 405 as the lean path, instead of
/// pingora-proxy's bare one (`handle_new_request`).
fn full_path(
    conf: &Arc<pingora::server::configuration::ServerConf>,
    proxy: TokenwardProxy,
) -> HttpProxy<TokenwardProxy> {
    let mut full = pingora::proxy::http_proxy(conf, proxy);
    let mut options = pingora::apps::HttpServerOptions::default();
    options.allow_connect_method_proxying = true;
    full.server_options = Some(options);
    full
}

/// What becomes of the client connection after one request.
enum Next {
    KeepAlive,
    Close,
    /// The request is for the `ProxyHttp` path, which reads it again from its raw header.
    HandOff,
}

#[async_trait]
impl ServerApp for ListenerApp {
    /// A connection that may have sent nothing yet: a stream the `ProxyHttp` path kept alive.
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut stream = stream;
        if self.serves_leanly() {
            // Nothing of a request is held before its first byte arrives: an idle connection
            // costs its socket and this small wait, not a session with its header buffer and
            // the request loop's state. The byte is read and given back to the stream
            // (pingora's peek).
            let mut first = [0u8; 1];
            let mut stop = shutdown.clone();
            tokio::select! {
                biased;
                peeked = stream.try_peek(&mut first) => {
                    if peeked.is_err() {
                        return None;
                    }
                }
                _ = stop.wait_for(|stopping| *stopping) => return None,
            }
        }
        self.serve_arrived(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.full.http_cleanup().await;
    }
}

impl ListenerApp {
    fn serves_leanly(&self) -> bool {
        self.lean && self.table.load().forwards_plainly(self.listener)
    }

    /// Serves a connection whose first byte has arrived (the proxy threads wait for it before
    /// they build a stream), on the lean path or the `ProxyHttp` path. `Some` is a connection
    /// the `ProxyHttp` path kept alive, for `process_new`.
    pub async fn serve_arrived(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if !self.serves_leanly() {
            // HTTP/2 frames its own way; an HTTP/1 connection gets the chunk guard, which
            // follows its requests' framing itself (pingora's loop runs between them).
            let stream = if stream.selected_alpn_proto() == Some(pingora::protocols::ALPN::H2) {
                stream
            } else {
                Guarded::wrap_following(stream)
            };
            return self.full.process_new(stream, shutdown).await;
        }
        Box::pin(self.serve_connection(stream, shutdown)).await
    }

    /// The lean path's loop over one client connection's requests, from its first byte.
    async fn serve_connection(&self, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let (mut stream, guard) = Guarded::wrap(stream);
        // Bytes read past the previous request that belong to the next one.
        let mut prefix: Option<BytesMut> = None;
        let mut stop = shutdown.clone();
        loop {
            let mut downstream = Downstream::new(stream);
            // A client may send its next request before this one's answer (RFC 9112 §9.3.2):
            // pingora-core's `HttpSession::reuse` then hands its bytes over instead of closing
            // a connection whose answer said keep-alive.
            downstream.set_pipelining_enabled(true);
            guard.request_starts(prefix.as_deref());
            if let Some(prefix) = prefix.take() {
                downstream.set_pipelined_prefix(prefix);
            }
            let stopping = *shutdown.borrow();
            // A stopping service lets no connection be reused.
            downstream.set_server_keepalive((!stopping).then_some(KEEPALIVE_SECONDS));
            let read = tokio::select! {
                biased;
                read = downstream.read_request() => read,
                _ = stop.wait_for(|stopping| *stopping) => return None,
            };
            match read {
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(e) => {
                    if e.etype() == &ErrorType::InvalidHTTPHeader {
                        let mut session = ServerSession::H1(downstream);
                        let _ = session.respond_error(400).await;
                    }
                    return None;
                }
            }
            watch_head(&guard, &downstream);
            // Boxed: an idle keep-alive connection then holds its session, not the space of a
            // whole request's state machine (benches/README.md, memory per connection).
            match Box::pin(self.serve(&mut downstream, &guard)).await {
                Next::KeepAlive => {
                    (stream, prefix) = downstream.reuse().await.ok()??.into_parts();
                }
                Next::Close => return None,
                Next::HandOff => {
                    return Box::pin(self.hand_off(downstream, &guard, shutdown)).await;
                }
            }
        }
    }

    /// Gives the request just read to the `ProxyHttp` path, which parses it again from its raw
    /// header and the bytes read past it (a request without a body, so those can only belong to
    /// the next request), and serves the connection's next requests too, as pingora's own
    /// service loop does: the route that sent it there is one the lean path no longer serves.
    async fn hand_off(
        &self,
        mut downstream: Downstream,
        guard: &Guard,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut prefix = BytesMut::from(&downstream.get_headers_raw_bytes()[..]);
        // pingora-core's `HttpSession::reuse` hands over what its body reader read past the
        // request only with pipelining on (as it is on this path); else it would drop them.
        downstream.set_server_keepalive(Some(KEEPALIVE_SECONDS));
        let (stream, past) = downstream.reuse().await.ok()??.into_parts();
        if let Some(past) = past {
            prefix.extend_from_slice(&past);
        }
        // The `ProxyHttp` path reads the request again from `prefix`.
        guard.follow(&prefix);
        let mut session = ServerSession::new_http1(stream);
        let mut settings = HttpPersistentSettings::for_session(&session);
        settings.set_pipelined_prefix(prefix);
        settings.apply_to_session(&mut session);
        if *shutdown.borrow() {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(KEEPALIVE_SECONDS));
        }
        let mut reused = self.full.process_new_http(session, shutdown).await;
        while let Some((stream, settings)) = reused.map(|r| r.consume()) {
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            reused = self.full.process_new_http(session, shutdown).await;
        }
        None
    }

    async fn serve(&self, downstream: &mut Downstream, guard: &Guard) -> Next {
        let started = Instant::now();
        let _in_flight = self.in_flight.enter();
        if let Some(refusal) = admission::refusal(downstream.req_header()) {
            // Never forwarded: the full path refuses it the same way (`request_filter`).
            downstream.set_server_keepalive(None);
            write_answer(downstream, refusal.parts()).await;
            return Next::Close;
        }
        let route = self
            .table
            .load()
            .find_for(self.listener, downstream.req_header())
            .cloned();
        let Some(route) = route else {
            return answer(downstream, 404, no_route(), None).await;
        };
        if guard.refused() {
            // The bad line came with the head: refused before anything goes upstream.
            let e = guard.refusal(Error::new(ErrorType::InternalError));
            downstream.set_server_keepalive(None);
            answer(downstream, 400, failure_body(400, &route.name, &e), None).await;
            log_outcome(&route, 400, started, Some(&e));
            return Next::Close;
        }
        if !route.forwards_plainly() {
            if downstream.is_body_empty() {
                return Next::HandOff;
            }
            // A reload gave this route what only the full path does while this connection was
            // open, and the start of its body was read here: the client's next connection goes
            // to the full path.
            let body = json!({
                "error": "route_changed",
                "route": &*route.name,
                "message": "the route changed with a reload; send the request again",
            });
            downstream.set_server_keepalive(None);
            let next = answer(downstream, 503, body, Some(Duration::from_secs(1))).await;
            log_outcome(&route, 503, started, None);
            return next;
        }
        route.metrics.served_on_fast_path();
        let token = match route.credential.token().await {
            Ok(token) => token,
            Err(unavailable) => {
                let body = token_unavailable(&route, &unavailable);
                let next = answer(downstream, 503, body, Some(unavailable.retry_after)).await;
                log_outcome(&route, 503, started, None);
                return next;
            }
        };
        let outcome = self.forward(downstream, &route, token).await;
        match outcome {
            Ok(()) => {
                log_outcome(&route, final_status(downstream), started, None);
                Next::KeepAlive
            }
            Err(e) => {
                let e = guard.refusal(e);
                let code = failure_status(&e);
                if code > 0 && final_status(downstream) == 0 {
                    // The connection ends after this answer, and the answer says so.
                    downstream.set_server_keepalive(None);
                    let body = failure_body(code, &route.name, &e);
                    answer(downstream, code, body, None).await;
                }
                log_outcome(&route, final_status(downstream), started, Some(&e));
                Next::Close
            }
        }
    }

    /// Sends the request upstream with `token` and streams the answer back: again once with a
    /// new token when the upstream rejects this one, and again on another connection when an
    /// attempt failed in a way `upstream::retry_failed_attempt` allows. A WebSocket upgrade the
    /// upstream accepts becomes a tunnel.
    async fn forward(
        &self,
        downstream: &mut Downstream,
        route: &Route,
        mut token: Arc<Token>,
    ) -> Result<()> {
        let has_body = !downstream.is_body_empty();
        let client = downstream.req_header();
        // Only an HTTP/1.1 client can take a 1xx (RFC 9110 §15.2, §10.1.1).
        let http11 = client.version == http::Version::HTTP_11;
        let continue_asked = http11
            && client
                .headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        // A WebSocket upgrade with a body is forwarded as a plain request, its upgrade fields
        // stripped, on both paths (`upstream_request_filter`).
        let websocket = !has_body && is_websocket_upgrade(client);
        let idempotent = client.method.is_idempotent();
        if has_body && !route.reauth_statuses.is_empty() {
            // Keeps the first 64 KiB of the body so a rejected request can be sent again.
            downstream.enable_retry_buffering();
        }
        let exchange = Exchange {
            continue_asked,
            http11,
            websocket,
        };
        let (mut replayed, mut resent) = (false, false);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let peer = route.peer_for(Some(&token))?;
            let pool_key = peer.reuse_hash();
            let mut request = upstream_request(downstream.req_header(), route, has_body)?;
            if websocket {
                // As pingora-proxy does for the upgrades it passes (`sanitize_h1_upstream_request`).
                request.insert_header(header::CONNECTION, "Upgrade")?;
                request.insert_header(header::UPGRADE, "websocket")?;
            } else if !route.upstream.keepalive {
                request.insert_header(header::CONNECTION, "close")?;
            }
            let (name, value) = token.header();
            request.insert_header(name.clone(), value.clone())?;
            let (mut upstream, reused) = match self.pool.session(&peer, pool_key).await {
                Ok(got) => got,
                Err(e) => {
                    let mut retry = e.retry;
                    retry.decide_reuse(false);
                    if retry.retry() && attempts < self.max_attempts {
                        continue;
                    }
                    return Err(e.into_up());
                }
            };
            upstream.read_timeout = peer.options.read_timeout;
            upstream.write_timeout = peer.options.write_timeout;
            let whole = match send(downstream, &mut upstream, request, &exchange).await {
                Ok(whole) => whole,
                Err(e) => {
                    if e.esource() == &ErrorSource::Downstream {
                        return Err(e);
                    }
                    let kept = body_to_send(downstream).is_some();
                    let retry = attempts < self.max_attempts
                        && retry_failed_attempt(&FailedAttempt {
                            error: &e,
                            reused,
                            idempotent,
                            body_kept: kept,
                            resent_before: resent,
                        });
                    if !retry {
                        return Err(e);
                    }
                    resent = true;
                    continue;
                }
            };
            let response = upstream
                .resp_header()
                .ok_or_else(|| Error::explain(ErrorType::InvalidHTTPHeader, "no response header"))
                .map_err(|e| e.into_up())?;
            let status = response.status.as_u16();
            if route.reauth_statuses.contains(&status) {
                if !whole || replayed || body_to_send(downstream).is_none() {
                    // Still dropped: the next request must not carry a token the upstream refused.
                    route.credential.reject(token.generation);
                } else if let Some(fresh) = renewed(route, &token).await {
                    info!(route = %route.name, status, "upstream rejected the token; replaying with a new one");
                    token = fresh;
                    replayed = true;
                    continue;
                }
            }
            let (response, close_delimited) =
                downstream_response(response, downstream.req_header());
            if close_delimited {
                // Before the head is written, so that its `Connection` says close: pingora-core's
                // `prepare_response_header` turns keep-alive off for a close-delimited body only
                // after it has chosen that field's value.
                downstream.set_server_keepalive(None);
            }
            downstream
                .write_response_header(Box::new(response))
                .await
                .map_err(|e| e.into_down())?;
            if downstream.was_upgraded() {
                // The 101 ends the client connection's HTTP/1 life too (pingora-core's
                // `prepare_response_header` turns its keep-alive off).
                return tunnel(downstream, &mut upstream).await;
            }
            while let Some(chunk) = upstream.read_body_bytes().await.map_err(|e| e.into_up())? {
                // As for the request body in `relay_body`: an empty read is not the end.
                if chunk.is_empty() {
                    continue;
                }
                downstream
                    .write_body(&chunk)
                    .await
                    .map_err(|e| e.into_down())?;
            }
            downstream.finish_body().await.map_err(|e| e.into_down())?;
            if whole && route.upstream.keepalive && upstream.is_body_done() {
                self.pool
                    .release(upstream, pool_key, peer.options.idle_timeout)
                    .await;
            }
            return Ok(());
        }
    }
}

/// Tells the guard where the request just read ends its head, and how its body is framed.
fn watch_head(guard: &Guard, downstream: &Downstream) {
    guard.head_read(
        &downstream.get_headers_raw_bytes(),
        Body::of(downstream.req_header()),
    );
}

/// What one request asks of each attempt's exchange with the upstream.
struct Exchange {
    /// The client sent `Expect: 100-continue` (HTTP/1.1 only): it gets our own 100 once a
    /// token and a connection are at hand.
    continue_asked: bool,
    /// The client can take 1xx answers.
    http11: bool,
    /// A WebSocket upgrade without a body: a 101 is its answer.
    websocket: bool,
}

/// The status of the final answer written to the client, 0 when none was (a 1xx is not one).
fn final_status(downstream: &Downstream) -> u16 {
    downstream
        .response_written()
        .filter(|r| {
            !r.status.is_informational() || r.status == http::StatusCode::SWITCHING_PROTOCOLS
        })
        .map_or(0, |r| r.status.as_u16())
}

/// The body an attempt sends: `Some(None)` to stream it from the client (none of it read yet),
/// `Some(Some(kept))` for the whole body already read, `None` when part of it was read and not
/// kept, so the request cannot be sent again.
fn body_to_send(downstream: &mut Downstream) -> Option<Option<Bytes>> {
    if downstream.is_body_done() {
        if downstream.body_bytes_read() == 0 {
            return Some(Some(Bytes::new()));
        }
        return downstream.get_retry_buffer().map(Some);
    }
    (downstream.body_bytes_read() == 0).then_some(None)
}

/// One attempt: the request head, the body, and the answer's head (after any 1xx). `Ok(false)`
/// when the upstream answered before it took the whole body: the connection then cannot carry
/// another request.
async fn send(
    downstream: &mut Downstream,
    upstream: &mut Upstream,
    request: RequestHeader,
    exchange: &Exchange,
) -> Result<bool> {
    let body = body_to_send(downstream).ok_or_else(|| {
        Error::explain(ErrorType::InternalError, "the request body was not kept").into_in()
    })?;
    upstream
        .write_request_header(Box::new(request))
        .await
        .map_err(|e| e.into_up())?;
    if let Err(e) = relay_body(downstream, upstream, body, exchange.continue_asked).await {
        if e.esource() != &ErrorSource::Upstream || e.etype() != &ErrorType::WriteError {
            return Err(e);
        }
        // An upstream may give its final answer before it has read the whole body (a 401 or a
        // 413 after the head) and close: that answer, when it sent one, is the outcome, not the
        // failed write (RFC 9112 §9.6; pingora-proxy's `proxy_handle_upstream` reads on too).
        return match read_answer_head(downstream, upstream, exchange).await {
            Ok(()) => Ok(false),
            Err(_) => Err(e),
        };
    }
    read_answer_head(downstream, upstream, exchange).await?;
    Ok(true)
}

/// Sends the request body: the kept one, or the client's, read as it comes.
async fn relay_body(
    downstream: &mut Downstream,
    upstream: &mut Upstream,
    body: Option<Bytes>,
    continue_asked: bool,
) -> Result<()> {
    match body {
        Some(kept) => {
            if !kept.is_empty() {
                upstream.write_body(&kept).await.map_err(|e| e.into_up())?;
            }
        }
        None => {
            if continue_asked {
                // Expect is not forwarded: this proxy asks for the body itself, once it has a
                // token and a connection (RFC 9110 §10.1.1). pingora-core's
                // `prepare_response_header` turns the connection's keep-alive off for any answer
                // written before the request body is read (its default
                // `close_on_response_before_downstream_finish`), a 100 included, though the 100
                // asks for that body; the final answer, written once it is read, keeps the rule.
                downstream.set_close_on_response_before_downstream_finish(false);
                let written = downstream.write_continue_response().await;
                downstream.set_close_on_response_before_downstream_finish(true);
                written.map_err(|e| e.into_down())?;
            }
            while let Some(chunk) = downstream
                .read_body_bytes()
                .await
                .map_err(|e| e.into_down())?
            {
                // pingora-core's `BodyReader::do_read_chunked_body` and `..._final` return an
                // empty read in ordinary states (a chunk-size line cut by a read, a chunk's
                // CRLF in the next read, trailers), and `HttpSession::write_body` encodes an
                // empty write as the last chunk `0\r\n\r\n`: passed on, it would end the
                // body early and leave the rest to be taken for a second request. pingora-proxy
                // skips them too (`send_body_to_pipe`).
                if chunk.is_empty() {
                    continue;
                }
                upstream.write_body(&chunk).await.map_err(|e| e.into_up())?;
            }
        }
    }
    upstream.finish_body().await.map_err(|e| e.into_up())?;
    Ok(())
}

/// Reads the answer's head, relaying 1xx answers to a client that can take them, up to
/// `MAX_INFORMATIONAL` of them.
async fn read_answer_head(
    downstream: &mut Downstream,
    upstream: &mut Upstream,
    exchange: &Exchange,
) -> Result<()> {
    let mut informational = 0;
    loop {
        upstream.read_response().await.map_err(|e| e.into_up())?;
        let Some(response) = upstream.resp_header() else {
            return Err(
                Error::explain(ErrorType::InvalidHTTPHeader, "no response header").into_up(),
            );
        };
        if !response.status.is_informational() {
            return Ok(());
        }
        if response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            if exchange.websocket {
                return Ok(());
            }
            return Err(Error::explain(
                ErrorType::InvalidHTTPHeader,
                "upstream switched protocols on a request that asked for no upgrade",
            )
            .into_up());
        }
        informational += 1;
        if informational > MAX_INFORMATIONAL {
            return Err(Error::explain(
                ErrorType::InvalidHTTPHeader,
                "upstream sent too many 1xx answers",
            )
            .into_up());
        }
        let ours = response.status == http::StatusCode::CONTINUE && exchange.continue_asked;
        if exchange.http11 && !ours {
            let mut info = response.clone();
            super::strip_answer_hop_by_hop(&mut info);
            downstream
                .write_response_header(Box::new(info))
                .await
                .map_err(|e| e.into_down())?;
        }
    }
}

/// Carries bytes both ways between the client and the upstream after a 101, until either side
/// ends (as pingora-proxy ends an upgraded request). Bytes that came with either side's head
/// are the first carried: pingora-core's body readers turn them into the upgraded body.
async fn tunnel(downstream: &mut Downstream, upstream: &mut Upstream) -> Result<()> {
    upstream.maybe_upgrade_body_writer();
    enum Read {
        FromClient(Option<Bytes>),
        FromUpstream(Option<Bytes>),
    }
    loop {
        // Both reads are cancel-safe: a close-delimited read takes its buffered bytes without
        // waiting, and otherwise waits in one `read_buf`.
        let read = tokio::select! {
            read = downstream.read_body_bytes() => Read::FromClient(read.map_err(|e| e.into_down())?),
            read = upstream.read_body_bytes() => Read::FromUpstream(read.map_err(|e| e.into_up())?),
        };
        match read {
            Read::FromClient(Some(bytes)) if !bytes.is_empty() => {
                upstream.write_body(&bytes).await.map_err(|e| e.into_up())?;
            }
            Read::FromUpstream(Some(bytes)) if !bytes.is_empty() => {
                downstream
                    .write_body(&bytes)
                    .await
                    .map_err(|e| e.into_down())?;
            }
            Read::FromClient(Some(_)) | Read::FromUpstream(Some(_)) => {}
            Read::FromClient(None) | Read::FromUpstream(None) => return Ok(()),
        }
    }
}

/// The request as it goes upstream, without its token: HTTP/1.1, no hop-by-hop field, no
/// `Expect`, the route's Host and target, and chunked framing for a body of unknown length.
fn upstream_request(
    client: &RequestHeader,
    route: &Route,
    has_body: bool,
) -> Result<RequestHeader> {
    let mut request = unrouted_request(client, has_body)?;
    retarget(route, &mut request)?;
    Ok(request)
}

/// [`upstream_request`] but for the route's Host and target.
fn unrouted_request(client: &RequestHeader, has_body: bool) -> Result<RequestHeader> {
    let mut request = client.clone();
    request.set_version(http::Version::HTTP_11);
    strip_hop_by_hop(&mut request)
        .map_err(|reason| Error::explain(ErrorType::InvalidHTTPHeader, reason).into_down())?;
    request.remove_header(&header::EXPECT);
    super::normalise_content_length(&mut request)?;
    if has_body && !request.headers.contains_key(header::CONTENT_LENGTH) {
        request.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    }
    Ok(request)
}

/// One request through the lean path's reading, rewriting and relaying of a request (all but
/// routing and the token), from `client` to `upstream`, up to the upstream's answer head: what
/// the fuzz target `http1_request` drives over in-memory streams. `Ok(true)` when the whole
/// request went upstream; an error says why it was refused (the lean path's 400s) or failed.
pub(crate) async fn relay_one_request(client: Stream, upstream: Stream) -> Result<bool> {
    let (client, guard) = Guarded::wrap(client);
    let mut downstream = Downstream::new(client);
    guard.request_starts(None);
    match downstream.read_request().await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(Error::explain(ErrorType::ConnectionClosed, "no request").into_down());
        }
        Err(e) => return Err(e.into_down()),
    }
    watch_head(&guard, &downstream);
    if guard.refused() {
        return Err(guard.refusal(Error::new(ErrorType::InternalError)));
    }
    if let Some(refusal) = admission::refusal(downstream.req_header()) {
        return Err(
            Error::explain(ErrorType::HTTPStatus(refusal.status), refusal.reason()).into_down(),
        );
    }
    let has_body = !downstream.is_body_empty();
    let client = downstream.req_header();
    let http11 = client.version == http::Version::HTTP_11;
    let exchange = Exchange {
        continue_asked: http11
            && client
                .headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue")),
        http11,
        websocket: false,
    };
    let request = unrouted_request(client, has_body)?;
    let mut upstream = Upstream::new(upstream);
    send(&mut downstream, &mut upstream, request, &exchange)
        .await
        .map_err(|e| guard.refusal(e))
}

/// Removes the fields `Connection` names and the standard hop-by-hop ones. A `Connection`
/// naming Host, a forwarding field or a pseudo-header, or one that is not a list of tokens, is
/// refused: a client must not be able to strip what the upstream relies on.
fn strip_hop_by_hop(request: &mut RequestHeader) -> std::result::Result<(), &'static str> {
    // Fields `Connection` names come only with `Connection`, one of these.
    if !super::carries_any(&request.headers, &HOP_BY_HOP) {
        return Ok(());
    }
    let mut named = Vec::new();
    for option in request
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|o| !o.is_empty())
    {
        if named.len() >= MAX_CONNECTION_OPTIONS {
            return Err("too many Connection options");
        }
        if !option.iter().all(|b| is_token_char(*b)) {
            return Err("a Connection option is not a token");
        }
        let name = header::HeaderName::from_bytes(option)
            .map_err(|_| "a Connection option is not a field name")?;
        if matches!(
            name.as_str(),
            "host" | "x-forwarded-for" | "x-forwarded-host" | "x-forwarded-proto"
        ) {
            return Err("Connection names a field that must reach the upstream");
        }
        named.push(name);
    }
    // Typed names, each looked for before it is removed: see `carries_any`.
    for name in named.iter().chain(&HOP_BY_HOP) {
        if request.headers.contains_key(name) {
            request.remove_header(name);
        }
    }
    Ok(())
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The upstream's answer as the client gets it: a body that ends with the connection becomes
/// chunked, so the client connection can be kept; except to an HTTP/1.0 client, which cannot
/// take chunked (RFC 9112 §6.1): its body of unknown length is sent close-delimited; and
/// except a body whose transfer codings do not end with chunked, relayed as it came until the
/// upstream closes. The flag says the client connection must then end with the body.
fn downstream_response(
    upstream: &ResponseHeader,
    client: &RequestHeader,
) -> (ResponseHeader, bool) {
    let mut response = upstream.clone();
    super::strip_answer_hop_by_hop(&mut response);
    if super::answers_http10_until_close(client, &response) {
        // pingora-core's body writer decodes nothing: with no Transfer-Encoding it writes the
        // upstream's decoded body as it comes, until the end.
        response.remove_header(&header::TRANSFER_ENCODING);
        return (response, true);
    }
    if super::answers_coded_until_close(client, &response) {
        return (response, true);
    }
    // A 1xx (a 101 included) never carries framing fields (RFC 9112 §6.1): what follows a 101
    // is the tunnel's raw bytes.
    let bodiless = client.method == http::Method::HEAD
        || response.status.is_informational()
        || matches!(response.status.as_u16(), 204 | 304);
    if !bodiless
        && !response.headers.contains_key(header::CONTENT_LENGTH)
        && !response.headers.contains_key(header::TRANSFER_ENCODING)
    {
        response.set_version(http::Version::HTTP_11);
        // Cannot fail: a static, valid value.
        let _ = response.insert_header(header::TRANSFER_ENCODING, "chunked");
    }
    (response, false)
}

/// Writes one of tokenward's own JSON answers. A client that cannot take it is gone.
async fn answer(
    downstream: &mut Downstream,
    status: u16,
    body: serde_json::Value,
    retry_after: Option<Duration>,
) -> Next {
    write_answer(downstream, respond::json_parts(status, body, retry_after)).await
}

/// Writes a whole answer of tokenward's own.
async fn write_answer(downstream: &mut Downstream, parts: Result<(ResponseHeader, Bytes)>) -> Next {
    let written = async {
        let (header, body) = parts?;
        downstream.write_response_header(Box::new(header)).await?;
        downstream.write_body(&body).await?;
        downstream.finish_body().await
    };
    match written.await {
        Ok(_) => Next::KeepAlive,
        Err(_) => Next::Close,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(fields: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/x", None).unwrap();
        for (name, value) in fields {
            r.append_header(name.to_string(), *value).unwrap();
        }
        r
    }

    #[test]
    fn hop_by_hop_fields_and_those_connection_names_are_removed() {
        let mut r = request(&[
            ("Connection", "keep-alive, X-Session"),
            ("Connection", "x-trace"),
            ("X-Session", "s"),
            ("X-Trace", "t"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Transfer-Encoding", "chunked"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
            ("X-Kept", "k"),
        ]);
        strip_hop_by_hop(&mut r).unwrap();
        let left: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn a_connection_naming_what_the_upstream_needs_or_no_token_is_refused() {
        for bad in [
            "Host",
            "x-forwarded-for",
            "X-Forwarded-Proto",
            ":authority",
            "\"x-a\"",
            "x a",
        ] {
            let mut r = request(&[("Connection", bad), ("Host", "h")]);
            assert!(strip_hop_by_hop(&mut r).is_err(), "{bad}");
        }
        let many = ["x"; MAX_CONNECTION_OPTIONS + 1].join(",");
        assert!(strip_hop_by_hop(&mut request(&[("Connection", &many)])).is_err());
        let enough = ["x"; MAX_CONNECTION_OPTIONS].join(",");
        assert!(strip_hop_by_hop(&mut request(&[("Connection", &enough)])).is_ok());
    }

    #[test]
    fn a_body_that_ends_with_the_connection_is_sent_chunked() {
        let get = request(&[]);
        let mut head = request(&[]);
        head.set_method(http::Method::HEAD);
        let close_delimited = ResponseHeader::build(200, None).unwrap();
        let (r, close) = downstream_response(&close_delimited, &get);
        assert_eq!(r.headers[header::TRANSFER_ENCODING], "chunked");
        assert!(!close);
        let (r, _) = downstream_response(&close_delimited, &head);
        assert!(!r.headers.contains_key(header::TRANSFER_ENCODING));
        let mut sized = ResponseHeader::build(200, None).unwrap();
        sized.insert_header("Content-Length", "3").unwrap();
        let (r, _) = downstream_response(&sized, &get);
        assert!(!r.headers.contains_key(header::TRANSFER_ENCODING));
        let empty = ResponseHeader::build(204, None).unwrap();
        let (r, _) = downstream_response(&empty, &get);
        assert!(!r.headers.contains_key(header::TRANSFER_ENCODING));
    }

    #[test]
    fn a_body_whose_codings_do_not_end_with_chunked_is_relayed_as_it_came_until_close() {
        let get = request(&[]);
        for codings in ["gzip", "chunked, gzip"] {
            let mut coded = ResponseHeader::build(200, None).unwrap();
            coded.insert_header("Transfer-Encoding", codings).unwrap();
            let (r, close) = downstream_response(&coded, &get);
            assert_eq!(r.headers[header::TRANSFER_ENCODING], codings);
            assert!(close, "{codings}");
        }
        let mut chunked = ResponseHeader::build(200, None).unwrap();
        chunked
            .insert_header("Transfer-Encoding", "gzip, chunked")
            .unwrap();
        assert!(!downstream_response(&chunked, &get).1);
        let mut head = request(&[]);
        head.set_method(http::Method::HEAD);
        let mut coded = ResponseHeader::build(200, None).unwrap();
        coded.insert_header("Transfer-Encoding", "gzip").unwrap();
        assert!(!downstream_response(&coded, &head).1);
    }

    #[test]
    fn an_http10_client_gets_a_body_of_unknown_length_close_delimited() {
        let mut old = request(&[]);
        old.set_version(http::Version::HTTP_10);
        let mut chunked = ResponseHeader::build(200, None).unwrap();
        chunked
            .insert_header("Transfer-Encoding", "chunked")
            .unwrap();
        for upstream in [ResponseHeader::build(200, None).unwrap(), chunked] {
            let (r, close) = downstream_response(&upstream, &old);
            assert!(!r.headers.contains_key(header::TRANSFER_ENCODING));
            assert!(close);
        }
        let mut sized = ResponseHeader::build(200, None).unwrap();
        sized.insert_header("Content-Length", "3").unwrap();
        assert!(!downstream_response(&sized, &old).1);
    }
}
