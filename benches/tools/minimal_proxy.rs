//! The framework's floor for `benches/load.sh`: the least a pingora `ProxyHttp` can do for
//! tokenward's job (one fixed keep-alive upstream, one static `Authorization` header), with the
//! same pingora version, features and release profile as tokenward. Whatever tokenward costs
//! above this is tokenward's; whatever this costs above nginx is how pingora is driven.
//!
//! `minimal_proxy LISTEN UPSTREAM [THREADS]`, e.g. `minimal_proxy 127.0.0.1:18090 127.0.0.1:18081 1`.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Minimal {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Minimal {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut Self::CTX,
    ) -> Result<()> {
        upstream_request.insert_header("Authorization", "Bearer static-token-for-the-benchmark")?;
        upstream_request.insert_header("Host", self.upstream.as_str())?;
        Ok(())
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: minimal_proxy LISTEN UPSTREAM [THREADS]");
        std::process::exit(2);
    };
    let threads = args.next().and_then(|t| t.parse().ok()).unwrap_or(1);
    let conf = ServerConf {
        threads,
        // As tokenward (src/server/mod.rs): no work stealing for a single thread.
        work_stealing: threads > 1,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service =
        pingora::proxy::http_proxy_service(&server.configuration, Minimal { upstream });
    service.add_tcp(&listen);
    server.add_service(service);
    server.run_forever();
}
