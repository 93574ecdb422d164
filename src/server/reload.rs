//! Hot reload: on SIGHUP, or when the config file or a secret file it references changes, load
//! and validate the new config and swap it in without dropping a connection. A bad config, or
//! one that changes a setting read only at start, is rejected with a log line and the running
//! one keeps serving; credentials whose settings did not change keep their tokens, upstreams
//! their resolved addresses, and `log.level` applies at once.

use super::proxy_threads::Sockets;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tracing::{error, info, warn};

use super::{Shared, assemble};
use crate::config::Config;

/// How often watched files are looked at. Polling (rather than inotify) sees Kubernetes'
/// symlink-swapping ConfigMap and Secret updates, and costs a few `stat` calls a second.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What identifies one version of a file: a replaced file (new inode) or a rewritten one
/// (mtime, size) both change it; a missing file is a version too.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileVersion(Option<(u64, u64, SystemTime)>);

fn version(path: &PathBuf) -> FileVersion {
    use std::os::unix::fs::MetadataExt;
    FileVersion(std::fs::metadata(path).ok().map(|m| {
        (
            m.ino(),
            m.len(),
            m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        )
    }))
}

/// The files a config depends on: the config itself, and each secret file with the credentials
/// that read it.
fn watched(config: &Config) -> (PathBuf, BTreeMap<PathBuf, BTreeSet<String>>) {
    let mut secrets: BTreeMap<PathBuf, BTreeSet<String>> = BTreeMap::new();
    for c in &config.credentials {
        for (_, source) in c.dialect.secret_sources() {
            if let Some(path) = source.file() {
                secrets
                    .entry(path.clone())
                    .or_default()
                    .insert(c.name.clone());
            }
        }
    }
    (config.source.clone(), secrets)
}

#[derive(Debug, PartialEq, Eq)]
pub struct ReloadSummary {
    pub kept: usize,
    pub started: usize,
    pub retired: usize,
}

impl Shared {
    /// Loads `path` and swaps it in, or explains why not (the running config stays).
    pub async fn reload(&self) -> Result<ReloadSummary, String> {
        let old = self.config.load_full();
        let new = Config::load(&old.source).map_err(|e| e.to_string())?;
        let listeners = |c: &Config| c.routes.iter().map(|r| r.listen).collect::<BTreeSet<_>>();
        if listeners(&new) != listeners(&old) {
            return Err(format!(
                "the set of route listeners changed ({:?} -> {:?}); restart tokenward to apply it",
                listeners(&old),
                listeners(&new)
            ));
        }
        let restart_only = [
            ("admin.listen", new.admin_listen != old.admin_listen),
            ("state.dir", new.state_dir != old.state_dir),
            (
                "state.redis, state.redis_username, state.redis_password, state.encryption_key, state.previous_encryption_keys or state.chain_ttl",
                new.state_redis != old.state_redis,
            ),
            ("server.threads", new.threads != old.threads),
            (
                "server.upstream_keepalive_pool_size",
                new.upstream_keepalive_pool_size != old.upstream_keepalive_pool_size,
            ),
            (
                "server.http1_fast_path",
                new.http1_fast_path != old.http1_fast_path,
            ),
            // With one thread the setting changes nothing.
            (
                "server.reuse_port",
                Sockets::for_threads(new.threads, new.reuse_port)
                    != Sockets::for_threads(old.threads, old.reuse_port),
            ),
            // pingora's own shutdown wait is fixed at start, so a new grace period could not be
            // honoured; the formatter is fixed at start too.
            ("server.grace_period", new.grace_period != old.grace_period),
            ("log.format", new.log_format != old.log_format),
        ];
        let changed: Vec<&str> = restart_only
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(key, _)| *key)
            .collect();
        if !changed.is_empty() {
            return Err(format!(
                "{}: {} changed, but admin.listen, state.dir, state.redis, state.redis_username, state.redis_password, state.encryption_key, state.previous_encryption_keys, state.chain_ttl, server.threads, server.upstream_keepalive_pool_size, server.http1_fast_path, server.reuse_port, server.grace_period and log.format take effect only at start; restart tokenward to apply them",
                old.source.display(),
                changed.join(", ")
            ));
        }
        let current = self.credentials.load_full();
        let assembly = assemble(
            &new,
            &current,
            &self.store,
            &self.token_metrics,
            &self.proxy_metrics,
        )
        .map_err(|e| format!("{e:#}"))?;
        // The new table serves only once its DNS-named upstreams have addresses.
        super::resolve_upstreams(&self.routes.load_full(), &assembly.routes).await;
        // New or changed credentials get their first token before traffic moves to them, so a
        // reload does not make requests wait (bounded: a provider outage must not block it).
        for c in &assembly.created {
            let limit = c.config().timing.timeout + Duration::from_secs(1);
            match tokio::time::timeout(limit, c.force_refresh()).await {
                Ok(Ok(_)) => {}
                Ok(Err(u)) => {
                    warn!(credential = c.name(), reason = %u.reason, "no token yet for the reloaded credential; requests will wait for it")
                }
                Err(_) => warn!(
                    credential = c.name(),
                    "no token yet for the reloaded credential (provider slow); requests will wait for it"
                ),
            }
        }
        let kept: Vec<_> = current
            .iter()
            .filter(|c| assembly.credentials.iter().any(|n| Arc::ptr_eq(c, n)))
            .collect();
        let summary = ReloadSummary {
            kept: kept.len(),
            started: assembly.created.len(),
            retired: current.len() - kept.len(),
        };
        self.routes.store(Arc::new(assembly.routes));
        self.credentials
            .store(Arc::new(assembly.credentials.clone()));
        self.config.store(Arc::new(new));
        for c in current
            .iter()
            .filter(|c| !assembly.credentials.iter().any(|n| Arc::ptr_eq(c, n)))
        {
            c.retire();
            if !assembly.credentials.iter().any(|n| n.name() == c.name()) {
                self.token_metrics.forget(c.name());
            }
        }
        for c in assembly.created {
            let _ = self.refresher.send(c);
        }
        Ok(summary)
    }
}

pub struct Reloader {
    shared: Arc<Shared>,
}

impl Reloader {
    pub fn new(shared: Arc<Shared>) -> Self {
        Reloader { shared }
    }

    async fn reload(&self, why: &str) {
        match self.shared.reload().await {
            Ok(s) => {
                // Before the line below, so that it is written at the new level.
                if let Err(e) = crate::telemetry::set_level(&self.shared.config.load().log_level) {
                    warn!(error = %e, "cannot apply the reloaded log.level");
                }
                for w in crate::config::warnings::all(&self.shared.config.load()) {
                    warn!("{w}");
                }
                info!(
                    trigger = why,
                    kept = s.kept,
                    started = s.started,
                    retired = s.retired,
                    "configuration reloaded"
                )
            }
            Err(e) => {
                error!(trigger = why, error = %e, "configuration reload rejected; the running configuration stays")
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; reloading on file changes only");
                None
            }
        };
        let (mut config_path, mut secrets) = watched(&self.shared.config.load());
        let mut config_version = version(&config_path);
        let mut secret_versions: BTreeMap<PathBuf, FileVersion> =
            secrets.keys().map(|p| (p.clone(), version(p))).collect();
        loop {
            tokio::select! {
                _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending::<()>().await } } => {
                    self.reload("SIGHUP").await;
                }
                _ = tokio::time::sleep(POLL_INTERVAL) => {
                    let now = version(&config_path);
                    if now != config_version {
                        config_version = now;
                        self.reload("config file changed").await;
                    }
                    for (path, names) in &secrets {
                        let now = version(path);
                        if secret_versions.get(path) != Some(&now) {
                            secret_versions.insert(path.clone(), now);
                            for name in names {
                                if let Some(c) = self.shared.credential(name) {
                                    info!(credential = %name, file = %path.display(), "secret file changed; refreshing with it");
                                    tokio::spawn(async move { let _ = c.force_refresh().await; });
                                }
                            }
                        }
                    }
                }
                _ = shutdown.changed() => return,
            }
            // The watched set follows the running config.
            let (p, s) = watched(&self.shared.config.load());
            if p != config_path || s.keys().ne(secrets.keys()) {
                for path in s
                    .keys()
                    .filter(|k| !secret_versions.contains_key(*k))
                    .cloned()
                    .collect::<Vec<_>>()
                {
                    let v = version(&path);
                    secret_versions.insert(path, v);
                }
                config_path = p;
                secrets = s;
            }
        }
    }
}
