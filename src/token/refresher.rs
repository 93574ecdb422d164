//! The background refresher: one task per credential that wakes at the soft threshold (or when a
//! back-off ends) and refreshes under the credential's single-flight guard. A reload that adds
//! credentials hands them over through a channel; replaced ones retire and their task ends.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::{Mutex, mpsc};

use super::Credential;

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

/// Keeps one credential's token fresh until shutdown or until a reload retires it.
pub async fn keep_fresh(credential: Arc<Credential>, mut shutdown: ShutdownWatch) {
    loop {
        if *shutdown.borrow() || credential.is_retired() {
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
