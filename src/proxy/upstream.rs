//! Upstream targets: the resolved address (re-resolved in the background, so DNS changes are
//! followed without a restart), the Host header, and the CA bundle for https upstreams.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::WrappedX509;

use crate::config::RouteConfig;

/// How often upstream host names are resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

pub struct UpstreamTarget {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub host_header: HeaderValue,
    pub base_path: String,
    pub http2: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    ca: Option<Arc<[WrappedX509]>>,
    addr: ArcSwapOption<SocketAddr>,
}

/// Reads a PEM bundle, checking that every certificate parses (pingora panics on bad DER).
pub fn load_ca_bundle(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let ders: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read CA bundle {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("CA bundle {} is not valid PEM: {e}", path.display()))?;
    if ders.is_empty() {
        return Err(format!("CA bundle {} holds no certificate", path.display()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for der in &ders {
        roots.add(der.clone()).map_err(|e| {
            format!(
                "CA bundle {} holds an unusable certificate: {e}",
                path.display()
            )
        })?;
    }
    Ok(ders.into_iter().map(|d| d.to_vec()).collect())
}

impl UpstreamTarget {
    pub fn new(route: &RouteConfig) -> Result<Self, String> {
        let u = &route.upstream;
        let ca = match &route.ca_file {
            Some(path) => {
                let ders = load_ca_bundle(path)?;
                let certs: Vec<WrappedX509> = ders
                    .into_iter()
                    .map(|der| WrappedX509::new(der, pingora::utils::tls::parse_x509))
                    .collect();
                Some(Arc::from(certs.into_boxed_slice()))
            }
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
            base_path: u.base_path.clone(),
            http2: route.http2,
            connect_timeout: route.connect_timeout,
            read_timeout: route.read_timeout,
            ca,
            addr: ArcSwapOption::new(literal.map(|ip| Arc::new(SocketAddr::new(ip, u.port)))),
        })
    }

    pub fn needs_resolution(&self) -> bool {
        self.host.parse::<std::net::IpAddr>().is_err()
    }

    pub fn address(&self) -> Option<SocketAddr> {
        self.addr.load().as_deref().copied()
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

    pub fn peer(&self, addr: SocketAddr) -> HttpPeer {
        // SNI is always set: pingora skips certificate verification when it is empty.
        let mut peer = HttpPeer::new(addr, self.tls, self.host.clone());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        if self.tls {
            peer.options.alpn = if self.http2 { ALPN::H2H1 } else { ALPN::H1 };
            peer.options.ca = self.ca.clone();
        }
        peer
    }
}
