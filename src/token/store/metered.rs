//! Counts and times every store operation (`tokenward_store_operations_total{op,outcome}`,
//! `tokenward_store_operation_duration_seconds{op}`) around whichever store is in use.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use super::{ChainKey, ChainState, Lease, Lineage, StoreError, Stored, TokenStore};

pub struct MeteredStore {
    inner: Arc<dyn TokenStore>,
    operations: IntCounterVec,
    duration: HistogramVec,
}

impl MeteredStore {
    pub fn wrap(inner: Arc<dyn TokenStore>, registry: &Registry) -> prometheus::Result<Self> {
        let operations = IntCounterVec::new(
            Opts::new(
                "tokenward_store_operations_total",
                "Token store operations, by operation (load, lease, save) and outcome (ok; empty: nothing stored; busy: lease held elsewhere; fenced: a newer write came first; error).",
            ),
            &["op", "outcome"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tokenward_store_operation_duration_seconds",
                "Time taken by token store operations.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["op"],
        )?;
        registry.register(Box::new(operations.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(MeteredStore {
            inner,
            operations,
            duration,
        })
    }

    /// Runs one operation of the inner store, timing it and counting its outcome: `ok`, `absent`
    /// when it answered with nothing, or `error`.
    async fn metered<T>(
        &self,
        op: &str,
        absent: &'static str,
        call: impl Future<Output = Result<Option<T>, StoreError>>,
    ) -> Result<Option<T>, StoreError> {
        let started = Instant::now();
        let result = call.await;
        self.duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(Some(_)) => "ok",
            Ok(None) => absent,
            Err(_) => "error",
        };
        self.operations.with_label_values(&[op, outcome]).inc();
        result
    }
}

#[async_trait]
impl TokenStore for MeteredStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }

    fn bind_identity(&self, identity: &str, value: &crate::secret::Secret) -> String {
        self.inner.bind_identity(identity, value)
    }

    fn bind_identity_before(
        &self,
        identity: &str,
        value: &crate::secret::Secret,
    ) -> Option<String> {
        self.inner.bind_identity_before(identity, value)
    }

    async fn load(&self, key: &ChainKey) -> Result<Option<Stored>, StoreError> {
        self.metered("load", "empty", self.inner.load(key)).await
    }

    async fn load_legacy(&self, key: &ChainKey) -> Result<Option<ChainState>, StoreError> {
        self.metered("load", "empty", self.inner.load_legacy(key))
            .await
    }

    async fn try_lease(&self, key: &ChainKey) -> Result<Option<Lease>, StoreError> {
        self.metered("lease", "busy", self.inner.try_lease(key))
            .await
    }

    async fn save(
        &self,
        key: &ChainKey,
        lease: Option<&Lease>,
        expected: u64,
        state: &ChainState,
    ) -> Result<Option<u64>, StoreError> {
        let call = self.inner.save(key, lease, expected, state);
        self.metered("save", "fenced", call).await
    }

    async fn save_forward(
        &self,
        key: &ChainKey,
        lease: Option<&Lease>,
        expected: u64,
        state: &ChainState,
    ) -> Result<Option<u64>, StoreError> {
        let call = self.inner.save_forward(key, lease, expected, state);
        self.metered("save", "fenced", call).await
    }

    async fn restore_marker(
        &self,
        key: &ChainKey,
        marker: &ChainState,
        over: &Lineage,
    ) -> Result<Option<u64>, StoreError> {
        let call = self.inner.restore_marker(key, marker, over);
        self.metered("save", "fenced", call).await
    }
}
