//! Upstream targets: the resolved address (re-resolved in the background, so DNS changes are
//! followed without a restart), the Host header, the CA bundle for https upstreams, the client
//! certificate for mutual TLS (both part of the connection-pool key), the keep-alive pool's idle
//! timeout, and which failed upstream exchanges may be sent again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use pingora::prelude::{Error, ErrorType, RetryType};
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{CertKey, WrappedX509};

use crate::config::RouteConfig;

/// How often upstream host names are resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

/// How often a route's client certificate and key files are looked at (one `stat` each, on the
/// request path, by one request at a time).
pub const CLIENT_CERT_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A client certificate as pingora takes it, with the pool key of its exact chain.
type PeerCert = (Arc<CertKey>, u64);

pub struct UpstreamTarget {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub host_header: HeaderValue,
    /// `scheme://host[:port]` as the upstream sees it: the first part of each DPoP proof's
    /// `htu`, and the key its DPoP nonces are kept under. Fixed per route, so built once.
    pub origin: String,
    pub base_path: String,
    pub http2: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
    /// `false`: every request on a new connection, closed after its answer.
    pub keepalive: bool,
    ca: Option<Arc<[WrappedX509]>>,
    /// The pool key of `ca` (0 for the system roots): pingora's own pool key ignores the CA
    /// bundle a connection was verified with.
    ca_key: u64,
    /// The client certificate, with the pool key of its chain and `ca_key` together.
    client_cert: Option<crate::mtls::Rotating<PeerCert>>,
    addr: ArcSwapOption<SocketAddr>,
}

impl UpstreamTarget {
    pub fn new(route: &RouteConfig) -> Result<Self, String> {
        let u = &route.upstream;
        let (ca, ca_key) = match &route.ca_file {
            Some(path) => {
                let ders = crate::ca_bundle::load(path)?;
                let key = crate::mtls::digest64(ders.iter().map(Vec::as_slice));
                let certs: Vec<WrappedX509> = ders
                    .into_iter()
                    .map(|der| WrappedX509::new(der, pingora::utils::tls::parse_x509))
                    .collect();
                (Some(Arc::from(certs.into_boxed_slice())), key)
            }
            None => (None, 0),
        };
        let client_cert = match &route.client_cert {
            Some(source) => Some(crate::mtls::Rotating::new(
                source.clone(),
                CLIENT_CERT_CHECK_INTERVAL,
                move |identity| {
                    let key = pool_group(ca_key, identity.pool_key());
                    Ok((Arc::new(identity.cert_key()), key))
                },
            )?),
            None => None,
        };
        let host_header = HeaderValue::from_str(&u.authority)
            .map_err(|_| format!("invalid upstream host {:?}", u.authority))?;
        // An IP literal needs no resolver: set it now so the first request does not wait.
        let literal = u
            .host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .ok();
        Ok(UpstreamTarget {
            tls: u.tls,
            host: u.host.trim_matches(['[', ']']).to_string(),
            port: u.port,
            host_header,
            origin: format!("{}://{}", if u.tls { "https" } else { "http" }, u.authority),
            base_path: u.base_path.clone(),
            http2: route.http2,
            connect_timeout: route.connect_timeout,
            read_timeout: route.read_timeout,
            idle_timeout: route.idle_timeout,
            keepalive: route.upstream_keepalive,
            ca,
            ca_key,
            client_cert,
            addr: ArcSwapOption::new(literal.map(|ip| Arc::new(SocketAddr::new(ip, u.port)))),
        })
    }

    pub fn needs_resolution(&self) -> bool {
        self.host.parse::<std::net::IpAddr>().is_err()
    }

    pub fn address(&self) -> Option<SocketAddr> {
        self.addr.load().as_deref().copied()
    }

    /// Takes `other`'s address when it names the same host and port, so a reload keeps what
    /// the resolver found instead of starting unresolved.
    pub fn adopt_address(&self, other: &UpstreamTarget) -> bool {
        if self.host != other.host || self.port != other.port {
            return false;
        }
        let Some(addr) = other.address() else {
            return false;
        };
        self.addr.store(Some(Arc::new(addr)));
        true
    }

    /// The peer at the current address, presenting the client certificate `bound_to` names (the
    /// SHA-256 of the one the token was obtained with, where the route presents the credential's
    /// certificate) or else the current one. An upstream whose name has not resolved is
    /// unreachable: an upstream error (a JSON 502), like a refused connection.
    pub fn current_peer(&self, bound_to: Option<&[u8; 32]>) -> pingora::Result<HttpPeer> {
        let addr = self.address().ok_or_else(|| {
            Error::explain(
                ErrorType::ConnectNoRoute,
                format!("upstream host {} is not resolved", self.host),
            )
            .into_up()
        })?;
        Ok(self.peer(addr, bound_to))
    }

    /// Resolves the host name once; keeps the previous address when resolution fails.
    pub async fn resolve(&self) -> Result<SocketAddr, String> {
        let found = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))?
            .next()
            .ok_or_else(|| format!("{} resolved to no address", self.host))?;
        self.addr.store(Some(Arc::new(found)));
        Ok(found)
    }

    pub fn peer(&self, addr: SocketAddr, bound_to: Option<&[u8; 32]>) -> HttpPeer {
        // SNI is always set: pingora skips certificate verification when it is empty.
        let mut peer = HttpPeer::new(addr, self.tls, self.host.clone());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.idle_timeout = Some(self.idle_timeout);
        if self.tls {
            peer.options.alpn = if self.http2 { ALPN::H2H1 } else { ALPN::H1 };
            peer.options.ca = self.ca.clone();
            // Keeps connections verified against another CA bundle, or made with another
            // certificate (another route's, or this route's before a rotation), out of this
            // request's reach in the shared pool.
            peer.group_key = self.ca_key;
            if let Some(rotating) = &self.client_cert {
                // A token bound to the certificate before a rotation goes out with that one
                // until the token bound to the new one is held: never the two mixed.
                let chosen = bound_to
                    .and_then(|t| rotating.matching(t))
                    .unwrap_or_else(|| rotating.current());
                let (cert, group_key) = &*chosen;
                peer.client_cert_key = Some(cert.clone());
                peer.group_key = *group_key;
            }
        }
        peer
    }
}

/// The pool key of connections verified against the CA bundle `ca_key` and presenting the
/// client certificate `cert_key`.
fn pool_group(ca_key: u64, cert_key: u64) -> u64 {
    crate::mtls::digest64([&ca_key.to_be_bytes()[..], &cert_key.to_be_bytes()[..]])
}

/// What is known of one failed attempt to proxy a request, once its connection was obtained.
pub struct FailedAttempt<'a> {
    pub error: &'a Error,
    /// Pingora took the connection from the keep-alive pool.
    pub reused: bool,
    pub idempotent: bool,
    /// The request body is still whole in pingora's retry buffer (or there is none).
    pub body_kept: bool,
    /// This request was already sent again after a failed attempt: the resend for "nothing
    /// was sent" happens at most once.
    pub resent_before: bool,
}

/// Whether a failed attempt is tried again, on another connection.
///
/// An idempotent request follows pingora: a failure that looks like a stale pooled connection
/// (the peer closed or reset it before any response) is retried. Any request, whatever its
/// method, is also sent again once when nothing of it can have reached the upstream
/// application. Nothing else is: the upstream may have acted on anything it read, so a POST
/// answered by a reset is a 502, never a duplicate.
pub fn retry_failed_attempt(a: &FailedAttempt) -> bool {
    if !a.body_kept {
        return false;
    }
    if a.idempotent {
        let mut retry = a.error.retry;
        retry.decide_reuse(a.reused);
        if retry.retry() {
            return true;
        }
    }
    !a.resent_before && nothing_sent(a.error, a.reused)
}

/// The failures that prove the upstream never saw the request:
/// - HTTP/1: writing the request head to a pooled connection failed. The socket already held
///   the upstream's reset, so the upstream had closed it before any byte of this request; a
///   failure later (body, response) may follow a request the upstream read, and is excluded.
///   pingora marks this error only by its context (pingora-core 0.9 `protocols/http/v1/client.rs`
///   `write_request_header`); the unit tests below pin that text.
/// - HTTP/2: the stream was refused (REFUSED_STREAM, GOAWAY before it was processed, or
///   HTTP_1_1_REQUIRED), which RFC 9113 §8.7 guarantees was not processed; pingora marks exactly
///   these as retryable.
fn nothing_sent(e: &Error, reused: bool) -> bool {
    match e.etype() {
        ErrorType::WriteError => {
            reused
                && e.context.as_ref().is_some_and(|c| {
                    let c = c.as_str();
                    c == "while writing request headers" || c == "flushing request header"
                })
        }
        ErrorType::H2Error | ErrorType::H2Downgrade => e.retry == RetryType::Decided(true),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(upstream: &str) -> UpstreamTarget {
        let text = format!(
            "[[routes]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\nupstream = \"{upstream}\"\ncredential = \"c\"\n\
             [credentials.c]\ndialect = \"oauth2\"\ntoken_url = \"http://127.0.0.1:2/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n"
        );
        let config =
            crate::config::Config::parse(std::path::Path::new("t.toml"), &text, false).unwrap();
        UpstreamTarget::new(&config.routes[0]).unwrap()
    }

    #[test]
    fn an_unresolved_upstream_is_an_upstream_failure_and_a_reload_carries_the_address_over() {
        let old = target("http://api.internal:8080");
        let e = old.current_peer(None).unwrap_err();
        assert_eq!(e.etype(), &ErrorType::ConnectNoRoute);
        // fail_to_proxy answers an upstream error with the JSON 502, an internal one with 500.
        assert_eq!(e.esource(), &pingora::prelude::ErrorSource::Upstream);

        let addr: SocketAddr = "10.0.0.7:8080".parse().unwrap();
        old.addr.store(Some(Arc::new(addr)));
        let same = target("http://api.internal:8080/v2");
        assert!(same.adopt_address(&old));
        use pingora::upstreams::peer::Peer;
        assert_eq!(
            same.current_peer(None).unwrap().address().to_string(),
            addr.to_string()
        );
        assert!(!target("http://api.internal:9090").adopt_address(&old));
        assert!(!target("http://other.internal:8080").adopt_address(&old));
        assert!(
            !target("http://api.internal:8080").adopt_address(&target("http://api.internal:8080"))
        );
    }

    fn attempt(error: &Error, reused: bool, idempotent: bool) -> FailedAttempt<'_> {
        FailedAttempt {
            error,
            reused,
            idempotent,
            body_kept: true,
            resent_before: false,
        }
    }

    /// What pingora's own HTTP/1 client returns when it writes a request head to a connection
    /// the upstream has reset (a pooled connection the upstream dropped).
    async fn head_write_failure() -> Box<Error> {
        use pingora::protocols::http::v1::client::HttpSession;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        server.set_zero_linger().unwrap();
        drop(server);
        // Wait (bounded) until the reset has arrived.
        for _ in 0..200 {
            if client.take_error().ok().flatten().is_some() || client.peer_addr().is_err() {
                break;
            }
            let mut b = [0u8; 1];
            match client.try_read(&mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await
                }
                _ => break,
            }
        }
        let stream: pingora::protocols::l4::stream::Stream = client.into();
        let mut session = HttpSession::new(Box::new(stream));
        let req = pingora::http::RequestHeader::build("POST", b"/", None).unwrap();
        session
            .write_request_header(Box::new(req))
            .await
            .expect_err("the connection was reset")
            .into_up()
    }

    #[tokio::test]
    async fn a_request_whose_head_could_not_be_written_to_a_pooled_connection_is_resent_once() {
        let e = head_write_failure().await;
        assert_eq!(e.etype(), &ErrorType::WriteError, "{e}");
        assert!(retry_failed_attempt(&attempt(&e, true, false)));
        assert!(retry_failed_attempt(&attempt(&e, true, true)));
        let flush = Error::explain(ErrorType::WriteError, "flushing request header");
        assert!(retry_failed_attempt(&attempt(&flush, true, false)));
        // Only once, only on a pooled connection, only with the whole body at hand.
        let once = FailedAttempt {
            resent_before: true,
            ..attempt(&e, true, false)
        };
        assert!(!retry_failed_attempt(&once));
        assert!(!retry_failed_attempt(&attempt(&e, false, false)));
        let truncated = FailedAttempt {
            body_kept: false,
            ..attempt(&e, true, false)
        };
        assert!(!retry_failed_attempt(&truncated));
    }

    #[test]
    fn a_non_idempotent_request_the_upstream_may_have_read_is_not_resent() {
        // What pingora returns when a pooled connection is closed or reset after the request
        // was written: retried for GET (stale connection), never for POST.
        let mut closed = Error::explain(
            ErrorType::ConnectionClosed,
            "while reading response headers, bytes already read: 0",
        );
        closed.retry = RetryType::ReusedOnly;
        assert!(!retry_failed_attempt(&attempt(&closed, true, false)));
        assert!(retry_failed_attempt(&attempt(&closed, true, true)));
        assert!(!retry_failed_attempt(&attempt(&closed, false, true)));
        let body = Error::explain(ErrorType::WriteError, "while writing body");
        assert!(!retry_failed_attempt(&attempt(&body, true, false)));
        let mut invalid = Error::explain(ErrorType::InvalidH2, "while reading h2 header");
        invalid.retry = RetryType::Decided(true);
        assert!(!retry_failed_attempt(&attempt(&invalid, true, false)));
    }

    #[test]
    fn a_refused_http2_stream_is_resent_whatever_the_method() {
        let mut refused = Error::explain(ErrorType::H2Error, "while reading h2 header");
        refused.retry = RetryType::Decided(true);
        assert!(retry_failed_attempt(&attempt(&refused, false, false)));
        let other = Error::explain(ErrorType::H2Error, "while reading h2 header");
        assert!(!retry_failed_attempt(&attempt(&other, true, false)));
    }
}
