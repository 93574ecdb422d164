//! The floor of pingora-core's own pieces for `benches/load.sh`: a proxy with no `ProxyHttp` at
//! all — pingora's listener and runtime, its HTTP/1 server session, its HTTP/1 connector and
//! keep-alive pool — forwarding each keep-alive request to one upstream with one static
//! `Authorization` header, body streamed both ways. What `minimal_proxy` costs above this is
//! pingora-proxy's per-request orchestration; what this costs above nginx is pingora-core's.
//!
//! `lean_proxy LISTEN UPSTREAM [THREADS]`, e.g. `lean_proxy 127.0.0.1:18090 127.0.0.1:18081 1`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::connectors::http::v1::Connector;
use pingora::prelude::*;
use pingora::protocols::Stream;
use pingora::protocols::http::v1::server::HttpSession as Downstream;
use pingora::server::ShutdownWatch;
use pingora::server::configuration::ServerConf;
use pingora::services::listening::Service;

struct Lean {
    upstream: String,
    peer: HttpPeer,
    connector: Connector,
}

impl Lean {
    /// One request: `Ok(true)` when the client connection can serve another.
    async fn forward(&self, downstream: &mut Downstream) -> Result<bool> {
        let mut request = downstream.req_header().clone();
        request.insert_header("Authorization", "Bearer static-token-for-the-benchmark")?;
        request.insert_header("Host", self.upstream.as_str())?;
        let (mut upstream, _reused) = self.connector.get_http_session(&self.peer).await?;
        upstream.write_request_header(Box::new(request)).await?;
        while let Some(chunk) = downstream.read_body_bytes().await? {
            upstream.write_body(&chunk).await?;
        }
        upstream.finish_body().await?;
        upstream.read_response().await?;
        let response = upstream
            .resp_header()
            .ok_or_else(|| Error::explain(ErrorType::InvalidHTTPHeader, "no response header"))?
            .clone();
        downstream.write_response_header(Box::new(response)).await?;
        while let Some(chunk) = upstream.read_body_bytes().await? {
            downstream.write_body(&chunk).await?;
        }
        downstream.finish_body().await?;
        let reusable = upstream.is_body_done();
        if reusable {
            self.connector
                .release_http_session(upstream, &self.peer, Some(Duration::from_secs(60)))
                .await;
        }
        Ok(true)
    }
}

#[async_trait]
impl ServerApp for Lean {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut stream = stream;
        loop {
            let mut downstream = Downstream::new(stream);
            downstream.set_server_keepalive(Some(60));
            match downstream.read_request().await {
                Ok(Some(_)) => {}
                _ => return None,
            }
            match self.forward(&mut downstream).await {
                Ok(true) => {}
                _ => return None,
            }
            stream = downstream.reuse().await.ok()??.into_parts().0;
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: lean_proxy LISTEN UPSTREAM [THREADS]");
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
    let peer = HttpPeer::new(upstream.as_str(), false, String::new());
    let lean = Lean {
        upstream,
        peer,
        connector: Connector::new(None),
    };
    let mut service = Service::new("lean".to_string(), lean);
    // Unbuffered client reads, as tokenward's listeners (src/server/mod.rs).
    service.add_listener(
        pingora::listeners::ListenerConfig::tcp(listen.as_str())
            .l4_buffer(pingora::protocols::l4::stream::L4BufferSettings::default().read(0)),
    );
    server.add_service(service);
    server.run_forever();
}
