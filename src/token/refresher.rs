//! The background refresher: one task per credential that wakes at the soft threshold (or when a
//! back-off ends) and refreshes under the credential's single-flight guard.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::Credential;

pub struct Refresher {
    pub credentials: Vec<Arc<Credential>>,
}

/// Keeps one credential's token fresh until shutdown.
pub async fn keep_fresh(credential: Arc<Credential>, mut shutdown: ShutdownWatch) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let wake = credential.next_wake();
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => credential.refresh_if_due().await,
            // Something changed the schedule (a request-driven refresh, an invalidation): recompute.
            _ = credential.woken() => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[async_trait]
impl BackgroundService for Refresher {
    async fn start(&self, shutdown: ShutdownWatch) {
        let tasks: Vec<_> = self
            .credentials
            .iter()
            .map(|c| tokio::spawn(keep_fresh(c.clone(), shutdown.clone())))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}
