//! The background refresher: one task per credential that wakes at the soft threshold (or when a
//! back-off ends) and starts or joins the credential's flight, and refreshes a token-exchange
//! credential's subject key set when it is due; on a shared store it also keeps
//! the credential in step with the store between refreshes. A reload that adds
//! credentials hands them over through a channel; replaced ones retire and their task ends.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::{Mutex, mpsc};

use std::time::{Duration, Instant};

use super::Credential;
use super::credential::StoreMode;

pub struct Refresher {
    initial: Vec<Arc<Credential>>,
    added: Mutex<mpsc::UnboundedReceiver<Arc<Credential>>>,
}

impl Refresher {
    /// The refresher, and the sender a reload uses to hand it new credentials.
    pub fn new(initial: Vec<Arc<Credential>>) -> (Self, mpsc::UnboundedSender<Arc<Credential>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Refresher {
                initial,
                added: Mutex::new(rx),
            },
            tx,
        )
    }
}

/// How often a credential on a shared store compares notes with it outside refreshes (adopting
/// what other replicas stored, writing back what it missed); when the store is down, the
/// credential's `probe_interval` instead.
pub(crate) const STORE_SYNC_INTERVAL: Duration = Duration::from_secs(5);

/// How often the client certificate files of a credential that has one are looked at (a
/// `stat` each), so a renewed certificate gets a token bound to it before the upstream
/// connections present it (they look as often: `proxy::upstream::CLIENT_CERT_CHECK_INTERVAL`).
const CLIENT_CERT_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps one credential's token fresh (and, for a token-exchange credential that validates
/// subjects, its issuer's key set) until shutdown or until a reload retires it.
pub async fn keep_fresh(credential: Arc<Credential>, mut shutdown: ShutdownWatch) {
    let mut next_sync = Instant::now() + STORE_SYNC_INTERVAL;
    let watches_certificate = credential.has_client_certificate();
    let subject_keys = credential
        .exchanger()
        .and_then(|x| x.subject_validator())
        .cloned();
    loop {
        if *shutdown.borrow() || credential.is_retired() {
            return;
        }
        let syncs = credential.store_mode() != StoreMode::File;
        let wake = credential.next_wake();
        let mut at = if syncs { wake.min(next_sync) } else { wake };
        if watches_certificate {
            at = at.min(Instant::now() + CLIENT_CERT_CHECK_INTERVAL);
        }
        if let Some(keys) = &subject_keys {
            at = at.min(keys.next_refresh());
        }
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {}
            // Something changed the schedule (a request-driven refresh, an invalidation): recompute.
            _ = credential.woken() => continue,
            _ = shutdown.changed() => return,
        }
        if syncs && Instant::now() >= next_sync {
            credential.sync_with_store().await;
            next_sync = Instant::now()
                + match credential.store_mode() {
                    StoreMode::Shared | StoreMode::File => STORE_SYNC_INTERVAL,
                    StoreMode::Local | StoreMode::Hold => credential.config().timing.probe_interval,
                };
        }
        if watches_certificate && credential.certificate_renewed() {
            tokio::select! {
                _ = credential.rebind_certificate() => {}
                _ = shutdown.changed() => return,
            }
        }
        if let Some(keys) = &subject_keys {
            tokio::select! {
                _ = keys.refresh_if_due() => {}
                _ = shutdown.changed() => return,
            }
        }
        let wake = credential.next_wake();
        if Instant::now() >= wake {
            tokio::select! {
                _ = credential.refresh_if_due() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Refresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tasks = tokio::task::JoinSet::new();
        for c in &self.initial {
            tasks.spawn(keep_fresh(c.clone(), shutdown.clone()));
        }
        let mut added = self.added.lock().await;
        loop {
            tokio::select! {
                Some(c) = added.recv() => {
                    tasks.spawn(keep_fresh(c, shutdown.clone()));
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = shutdown.changed() => break,
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}
