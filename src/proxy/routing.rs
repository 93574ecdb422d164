//! The route table: which route (and so which upstream and credential) a request belongs to,
//! by listener, then Host, then path prefix.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use super::metrics::RouteMetrics;
use super::upstream::UpstreamTarget;
use crate::config::RouteConfig;
use crate::token::{Credential, Token};
use pingora::upstreams::peer::HttpPeer;

pub struct Route {
    pub name: Arc<str>,
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub credential: Arc<Credential>,
    pub upstream: UpstreamTarget,
    /// Upstream statuses that mean the token was rejected: it is invalidated and the request
    /// replayed once with a new one.
    pub reauth_statuses: Box<[u16]>,
    pub metrics: RouteMetrics,
    /// The route presents the same client certificate files as its credential's token
    /// endpoint: its tokens are bound to the certificate (RFC 8705 §3), and each goes out on a
    /// connection presenting the certificate it was obtained with.
    binds_certificate: bool,
}

impl Route {
    pub fn new(
        config: &RouteConfig,
        credential: Arc<Credential>,
        metrics: RouteMetrics,
    ) -> Result<Self, String> {
        let binds_certificate = config.client_cert.is_some()
            && config.client_cert == credential.config().transport.client_cert;
        Ok(Route {
            name: Arc::from(config.name.as_str()),
            host: config.host.clone(),
            path_prefix: config
                .path_prefix
                .as_ref()
                .map(|p| p.trim_end_matches('/').to_string()),
            credential,
            upstream: UpstreamTarget::new(config)
                .map_err(|e| format!("route {:?}: {e}", config.name))?,
            reauth_statuses: config.reauth_statuses.clone().into_boxed_slice(),
            metrics,
            binds_certificate,
        })
    }

    /// The upstream peer for a request carrying `token`.
    pub fn peer_for(&self, token: Option<&Token>) -> pingora::Result<HttpPeer> {
        let bound_to = token
            .filter(|_| self.binds_certificate)
            .and_then(|t| t.bound_cert.as_ref());
        self.upstream.current_peer(bound_to)
    }

    fn matches(&self, host: Option<&str>, path: &str) -> bool {
        if let Some(want) = &self.host {
            if host != Some(want.as_str()) {
                return false;
            }
        }
        match &self.path_prefix {
            None => true,
            Some(p) if p.is_empty() => true,
            // Segment-aware: "/v1" matches "/v1" and "/v1/x", not "/v10".
            Some(p) => path.strip_prefix(p.as_str()).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')
            }),
        }
    }

    /// Whether `proxy::lean` can serve this route: the credential's one current token in a
    /// header, over HTTP/1. Per-caller exchange, signed requests, DPoP proofs and HTTP/2
    /// upstreams stay with the `ProxyHttp` path.
    pub fn forwards_plainly(&self) -> bool {
        let dialect = &self.credential.config().dialect;
        self.credential.exchanger().is_none()
            && dialect.request_signer().is_none()
            && dialect.dpop().is_none()
            // HTTP/2 is only ever negotiated by ALPN, over TLS.
            && !(self.upstream.tls && self.upstream.http2)
    }

    fn specificity(&self) -> (bool, usize) {
        (
            self.host.is_some(),
            self.path_prefix.as_ref().map_or(0, |p| p.len()),
        )
    }
}

#[derive(Default)]
pub struct RouteTable {
    by_listener: HashMap<SocketAddr, Vec<Arc<Route>>>,
}

impl RouteTable {
    pub fn new(routes: Vec<(SocketAddr, Arc<Route>)>) -> Self {
        let mut by_listener: HashMap<SocketAddr, Vec<Arc<Route>>> = HashMap::new();
        for (listen, route) in routes {
            by_listener.entry(listen).or_default().push(route);
        }
        for routes in by_listener.values_mut() {
            // Most specific first: a Host match beats none, a longer prefix beats a shorter one.
            routes.sort_by(|a, b| b.specificity().cmp(&a.specificity()));
        }
        RouteTable { by_listener }
    }

    /// The route for a request on `listener`. The Host is only read (and lower-cased, which
    /// allocates) when a route on that listener matches on it.
    pub fn find_for(
        &self,
        listener: SocketAddr,
        req: &pingora::http::RequestHeader,
    ) -> Option<&Arc<Route>> {
        let routes = self.by_listener.get(&listener)?;
        // Routes that match on Host sort first, so the first route says whether any does.
        let host = if routes.first().is_some_and(|r| r.host.is_some()) {
            request_host(req)
        } else {
            None
        };
        let path = req.uri.path();
        routes.iter().find(|r| r.matches(host.as_deref(), path))
    }

    /// Whether every route on `listener` can be served by `proxy::lean`.
    pub fn forwards_plainly(&self, listener: SocketAddr) -> bool {
        self.by_listener
            .get(&listener)
            .is_none_or(|routes| routes.iter().all(|r| r.forwards_plainly()))
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.by_listener.values().flatten()
    }

    pub fn listeners(&self) -> impl Iterator<Item = &SocketAddr> {
        self.by_listener.keys()
    }
}

/// The authority of an absolute-form request target (`GET http://host/path`), which pingora
/// keeps only in the raw target.
pub fn absolute_form_authority(req: &pingora::http::RequestHeader) -> Option<http::uri::Authority> {
    let raw = req.raw_path();
    if raw.starts_with(b"/") || raw == b"*" {
        return None;
    }
    let uri: http::Uri = std::str::from_utf8(raw).ok()?.parse().ok()?;
    uri.authority().cloned()
}

/// The host a request names: the authority of an absolute-form target (RFC 9112 §3.2.2 says it
/// overrides Host), else the Host header; lower-cased and without port.
pub fn request_host(req: &pingora::http::RequestHeader) -> Option<String> {
    let raw = match req
        .uri
        .authority()
        .cloned()
        .or_else(|| absolute_form_authority(req))
    {
        Some(a) => a.host().to_string(),
        None => {
            let h = req.headers.get(http::header::HOST)?.to_str().ok()?;
            match h.rsplit_once(':') {
                // Keep IPv6 literals ("[::1]:80" → "[::1]") intact.
                Some((host, port))
                    if port.chars().all(|c| c.is_ascii_digit()) && !host.ends_with(':') =>
                {
                    host.to_string()
                }
                _ => h.to_string(),
            }
        }
    };
    Some(raw.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_host_strips_port_and_case() {
        let mut req = pingora::http::RequestHeader::build("GET", b"/x", None).unwrap();
        req.insert_header("Host", "API.Example.com:8080").unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("api.example.com"));
        req.insert_header("Host", "[::1]:80").unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("[::1]"));
        let req =
            pingora::http::RequestHeader::build("GET", b"http://Evil.example/x", None).unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("evil.example"));
    }
}
