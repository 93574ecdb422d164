//! The token engine's metrics, registered on the registry the server hands it.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry,
};

pub const OUTCOMES: [&str; 4] = ["success", "transient_error", "relogin", "fatal_error"];

#[derive(Clone)]
pub struct TokenMetrics {
    refreshes: IntCounterVec,
    duration: HistogramVec,
    expiry: GaugeVec,
    valid: GaugeVec,
    fatal: GaugeVec,
    breaker: GaugeVec,
    coalesced: IntCounterVec,
}

/// One credential's children of every family, resolved once so updates take no lookup.
#[derive(Clone)]
pub struct CredentialMetrics {
    pub refreshes: [IntCounter; 4],
    pub duration: Histogram,
    pub expiry_seconds: Gauge,
    pub valid: Gauge,
    pub fatal: Gauge,
    pub breaker_open: Gauge,
    pub coalesced: IntCounter,
}

impl TokenMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = TokenMetrics {
            refreshes: IntCounterVec::new(
                Opts::new(
                    "tokenward_token_refreshes_total",
                    "Provider calls for a token, by outcome.",
                ),
                &["credential", "outcome"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "tokenward_token_refresh_duration_seconds",
                    "Time taken by provider calls.",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                &["credential"],
            )?,
            expiry: GaugeVec::new(
                Opts::new(
                    "tokenward_token_expiry_seconds",
                    "Seconds until the current token expires (0 when none).",
                ),
                &["credential"],
            )?,
            valid: GaugeVec::new(
                Opts::new(
                    "tokenward_token_valid",
                    "1 when the credential holds a token that is being served.",
                ),
                &["credential"],
            )?,
            fatal: GaugeVec::new(
                Opts::new(
                    "tokenward_credential_fatal",
                    "1 when the provider rejected the credential and retries stopped.",
                ),
                &["credential"],
            )?,
            breaker: GaugeVec::new(
                Opts::new(
                    "tokenward_breaker_open",
                    "1 while provider calls are held back after failures.",
                ),
                &["credential"],
            )?,
            coalesced: IntCounterVec::new(
                Opts::new(
                    "tokenward_single_flight_coalesced_total",
                    "Requests that waited for a token and shared another caller's provider call.",
                ),
                &["credential"],
            )?,
        };
        registry.register(Box::new(m.refreshes.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.expiry.clone()))?;
        registry.register(Box::new(m.valid.clone()))?;
        registry.register(Box::new(m.fatal.clone()))?;
        registry.register(Box::new(m.breaker.clone()))?;
        registry.register(Box::new(m.coalesced.clone()))?;
        Ok(m)
    }

    pub fn for_credential(&self, name: &str) -> CredentialMetrics {
        CredentialMetrics {
            refreshes: OUTCOMES.map(|o| self.refreshes.with_label_values(&[name, o])),
            duration: self.duration.with_label_values(&[name]),
            expiry_seconds: self.expiry.with_label_values(&[name]),
            valid: self.valid.with_label_values(&[name]),
            fatal: self.fatal.with_label_values(&[name]),
            breaker_open: self.breaker.with_label_values(&[name]),
            coalesced: self.coalesced.with_label_values(&[name]),
        }
    }

    /// Drops a removed credential's series so dashboards do not show stale values.
    pub fn forget(&self, name: &str) {
        for o in OUTCOMES {
            let _ = self.refreshes.remove_label_values(&[name, o]);
        }
        let _ = self.duration.remove_label_values(&[name]);
        let _ = self.expiry.remove_label_values(&[name]);
        let _ = self.valid.remove_label_values(&[name]);
        let _ = self.fatal.remove_label_values(&[name]);
        let _ = self.breaker.remove_label_values(&[name]);
        let _ = self.coalesced.remove_label_values(&[name]);
    }
}

impl CredentialMetrics {
    pub fn outcome(&self, outcome: &str) -> &IntCounter {
        let i = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(1);
        &self.refreshes[i]
    }
}
