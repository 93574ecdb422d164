//! Assembles and runs the pingora server: a proxy service per listener, the admin service, and
//! the background services (token refresher, upstream resolver, drain on shutdown).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use arc_swap::{ArcSwap, Guard};
use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::ServiceWithDependents;
use pingora::services::background::{BackgroundService, background_service};
use pingora::services::listening::Service;
use prometheus::Registry;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::admin::AdminApp;
use crate::config::Config;
use crate::proxy::lean::ListenerApp;
use crate::proxy::metrics::ProxyMetrics;
use crate::proxy::routing::{Route, RouteTable};
use crate::proxy::upstream::RESOLVE_INTERVAL;
use crate::proxy::{InFlight, TokenwardProxy};
use crate::token::metrics::TokenMetrics;
use crate::token::refresher::Refresher;
use crate::token::{Credential, TokenStore};

mod client_stream;
pub mod proxy_threads;
mod reload;

/// What the proxy, admin and background services share. Readers load each part lock-free;
/// only a reload writes.
pub struct Shared {
    credentials: ArcSwap<Vec<Arc<Credential>>>,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub config: ArcSwap<Config>,
    pub registry: Registry,
    pub in_flight: Arc<InFlight>,
    pub store: Arc<dyn TokenStore>,
    token_metrics: TokenMetrics,
    proxy_metrics: ProxyMetrics,
    /// Hands credentials added by a reload to the background refresher.
    refresher: mpsc::UnboundedSender<Arc<Credential>>,
}

/// Credentials and routes built from one config.
struct Assembly {
    credentials: Vec<Arc<Credential>>,
    created: Vec<Arc<Credential>>,
    routes: RouteTable,
}

impl Shared {
    pub fn build(config: &Config) -> anyhow::Result<(Arc<Shared>, Refresher)> {
        let registry = Registry::new();
        register_build_info(&registry)?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let token_metrics = TokenMetrics::register(&registry)?;
        let proxy_metrics = ProxyMetrics::register(&registry)?;
        let store: Arc<dyn TokenStore> = Arc::new(crate::token::store::MeteredStore::wrap(
            crate::token::store::open_store(config)?,
            &registry,
        )?);
        let assembly = assemble(config, &[], &store, &token_metrics, &proxy_metrics)?;
        let (refresher, tx) = Refresher::new(assembly.credentials.clone());
        let shared = Shared {
            credentials: ArcSwap::from_pointee(assembly.credentials),
            routes: Arc::new(ArcSwap::from_pointee(assembly.routes)),
            config: ArcSwap::from_pointee(config.clone()),
            registry,
            in_flight: Arc::new(InFlight::default()),
            store,
            token_metrics,
            proxy_metrics,
            refresher: tx,
        };
        Ok((Arc::new(shared), refresher))
    }

    pub fn credentials(&self) -> Guard<Arc<Vec<Arc<Credential>>>> {
        self.credentials.load()
    }

    pub fn credential(&self, name: &str) -> Option<Arc<Credential>> {
        self.credentials
            .load()
            .iter()
            .find(|c| c.name() == name)
            .cloned()
    }
}

/// Builds the credentials and route table of `config`, reusing each credential of `keep` whose
/// settings are unchanged so it keeps its token.
fn assemble(
    config: &Config,
    keep: &[Arc<Credential>],
    store: &Arc<dyn TokenStore>,
    token_metrics: &TokenMetrics,
    proxy_metrics: &ProxyMetrics,
) -> anyhow::Result<Assembly> {
    let mut by_name = BTreeMap::new();
    let mut created = Vec::new();
    for c in &config.credentials {
        let reused = keep
            .iter()
            .find(|old| old.name() == c.name && old.config().fingerprint == c.fingerprint)
            .cloned();
        let credential = match reused {
            Some(old) => old,
            None => {
                // A changed credential continues its predecessor's chain: one chain, one writer.
                let predecessor = keep.iter().find(|old| old.name() == c.name);
                // Credentials that are signing secrets themselves (AWS) are persisted nowhere.
                let store = if c.dialect.keeps_tokens_in_memory_only() {
                    Arc::new(crate::token::store::MemoryOnly) as Arc<dyn TokenStore>
                } else {
                    store.clone()
                };
                let fresh = Credential::new(
                    c.clone(),
                    store,
                    predecessor.map(|p| p.chain()),
                    token_metrics.for_credential(&c.name),
                )
                .map_err(|e| anyhow!("credential {:?}: {e}", c.name))?;
                let fresh = Arc::new(fresh);
                created.push(fresh.clone());
                fresh
            }
        };
        by_name.insert(c.name.clone(), credential);
    }
    // A kept token-exchange credential follows its actor into the new configuration.
    for credential in by_name.values() {
        if let Some(x) = credential.exchanger() {
            x.set_actor(x.actor_name().and_then(|n| by_name.get(n).cloned()));
        }
    }
    let mut routes = Vec::new();
    for r in &config.routes {
        let credential = by_name
            .get(&r.credential)
            .cloned()
            .ok_or_else(|| anyhow!("route {:?}: unknown credential {:?}", r.name, r.credential))?;
        let route =
            Route::new(r, credential, proxy_metrics.for_route(&r.name)).map_err(|e| anyhow!(e))?;
        routes.push((r.listen, Arc::new(route)));
    }
    Ok(Assembly {
        credentials: by_name.into_values().collect(),
        created,
        routes: RouteTable::new(routes),
    })
}

fn register_build_info(registry: &Registry) -> prometheus::Result<()> {
    let info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "tokenward_build_info",
            "Always 1; labelled with the running version.",
        ),
        &["version"],
    )?;
    info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    registry.register(Box::new(info))
}

/// SIGTERM and SIGINT both drain gracefully: a sidecar is stopped by either, and neither should
/// cut requests in flight.
pub struct TermOrInt;

#[async_trait]
impl ShutdownSignalWatch for TermOrInt {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM received; draining"),
                    _ = int.recv() => info!("SIGINT received; draining"),
                }
            }
            _ => {
                warn!("cannot install signal handlers; shutting down");
            }
        }
        ShutdownSignal::GracefulTerminate
    }
}

/// How long a reload (or the start) waits for upstream names to resolve before serving.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Gives each upstream of `table` that is named by DNS an address before `table` serves: the
/// one `previous` holds for the same host and port, else a fresh resolution (bounded by
/// `RESOLVE_TIMEOUT`; one still running then sets the address when it completes). Until an
/// upstream has an address its requests get a JSON 502.
async fn resolve_upstreams(previous: &RouteTable, table: &RouteTable) {
    let mut pending = tokio::task::JoinSet::new();
    for route in table
        .routes()
        .filter(|r| r.upstream.needs_resolution() && r.upstream.address().is_none())
    {
        if previous
            .routes()
            .any(|old| route.upstream.adopt_address(&old.upstream))
        {
            continue;
        }
        let route = route.clone();
        pending.spawn(async move {
            let resolved = route.upstream.resolve().await;
            (route, resolved)
        });
    }
    let deadline = tokio::time::sleep(RESOLVE_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            joined = pending.join_next() => match joined {
                None => return,
                Some(Ok((route, Ok(addr)))) => info!(route = %route.name, %addr, "upstream resolved"),
                Some(Ok((route, Err(e)))) => {
                    warn!(route = %route.name, error = %e, "cannot resolve upstream; its requests get 502 until it resolves")
                }
                Some(Err(_)) => {}
            },
            _ = &mut deadline => {
                warn!(unresolved = pending.len(), "upstream names not resolved in time; their requests get 502 until they resolve");
                pending.detach_all();
                return;
            }
        }
    }
}

/// Re-resolves upstream host names so DNS changes are followed.
struct Resolver {
    shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for Resolver {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let table = self.shared.routes.load_full();
            for route in table.routes().filter(|r| r.upstream.needs_resolution()) {
                let before = route.upstream.address();
                match route.upstream.resolve().await {
                    Ok(addr) if before != Some(addr) => {
                        info!(route = %route.name, %addr, "upstream resolved")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn!(route = %route.name, error = %e, "cannot resolve upstream; keeping the last address")
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RESOLVE_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// After the shutdown signal, waits for requests in flight and for any provider call that may
/// be rotating a refresh token, then exits — at the latest when the grace period ends.
struct Drain {
    shared: Arc<Shared>,
    grace: Duration,
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        let deadline = Instant::now() + self.grace;
        // Let listeners close and keep-alive clients see the shutdown before counting.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while self.shared.in_flight.count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.shared.in_flight.count();
        for c in self.shared.credentials().iter() {
            let _ = tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()),
                c.quiesce(),
            )
            .await;
        }
        info!(requests_cut = left, "drained; exiting");
        std::process::exit(0);
    }
}

/// The long-lived background work, on one runtime thread: pingora gives each service its own
/// runtime, and four mostly idle loops do not need four threads on a pod that often has one
/// core.
struct Housekeeping {
    refresher: Refresher,
    reloader: reload::Reloader,
    resolver: Resolver,
    drain: Drain,
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, shutdown: ShutdownWatch) {
        tokio::join!(
            self.refresher.start(shutdown.clone()),
            self.reloader.start(shutdown.clone()),
            self.resolver.start(shutdown.clone()),
            self.drain.start(shutdown),
        );
    }
}

/// Fails early, with the address, when a listener cannot be bound.
fn check_bindable(addrs: &[SocketAddr]) -> anyhow::Result<()> {
    for addr in addrs {
        std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    }
    Ok(())
}

/// Runs tokenward until SIGTERM/SIGINT. `extra` services (the demo's provider and upstream) run
/// in the same server.
pub fn run(config: Config, extra: Vec<Box<dyn ServiceWithDependents>>) -> anyhow::Result<()> {
    // Each proxied request holds two sockets: take the hard limit rather than the default 1024.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        warn!(error = %e, "cannot raise the open-file limit");
    }
    let (shared, refresher) = Shared::build(&config)?;
    // Upstreams named by DNS get their address before the first request, not at the resolver's
    // first tick.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime to resolve upstreams")?;
    runtime.block_on(resolve_upstreams(
        &RouteTable::default(),
        &shared.routes.load_full(),
    ));
    // A lookup still hanging after the timeout must not hold the start up (dropping the
    // runtime would wait for it); the resolver's ticks take over.
    runtime.shutdown_background();
    let mut listeners: Vec<SocketAddr> = config.routes.iter().map(|r| r.listen).collect();
    listeners.sort();
    listeners.dedup();
    let mut all = listeners.clone();
    all.push(config.admin_listen);
    check_bindable(&all)?;

    let conf = ServerConf {
        threads: config.threads,
        upstream_keepalive_pool_size: config.upstream_keepalive_pool_size,
        // The proxy threads are tokenward's own (proxy_threads); pingora's services here
        // (admin, housekeeping) run one thread each.
        work_stealing: false,
        grace_period_seconds: Some(config.grace_period.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let conf = server.configuration.clone();

    let sockets = proxy_threads::Sockets::for_threads(config.threads, config.reuse_port);
    let proxy_threads = proxy_threads::bind(&listeners, sockets, |addr| {
        let proxy = TokenwardProxy {
            listener: addr,
            table: shared.routes.clone(),
            in_flight: shared.in_flight.clone(),
        };
        ListenerApp::new(proxy, &conf, config.http1_fast_path)
    })?;
    server.add_service(proxy_threads::ProxyThreads::new(proxy_threads));
    let mut admin = Service::new(
        "admin".to_string(),
        HttpServer::new_app(AdminApp::new(shared.clone())),
    );
    admin.add_tcp(&config.admin_listen.to_string());
    // Probes and scrapes are a few requests a second: a thread of their own is plenty.
    admin.threads = Some(1);
    server.add_service(admin);

    server.add_service(background_service(
        "housekeeping",
        Housekeeping {
            refresher,
            reloader: reload::Reloader::new(shared.clone()),
            resolver: Resolver {
                shared: shared.clone(),
            },
            drain: Drain {
                shared: shared.clone(),
                grace: config.grace_period,
            },
        },
    ));
    for service in extra {
        server.add_boxed_service(service);
    }
    info!(
        routes = config.routes.len(),
        credentials = config.credentials.len(),
        admin = %config.admin_listen,
        state = %shared.store.describe(),
        "tokenward starting"
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(TermOrInt),
    });
    Ok(())
}
