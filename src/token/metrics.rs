//! The token engine's metrics, registered on the registry the server hands it.

use std::sync::Arc;
use std::time::Duration;

use super::credential::StoreMode;
use crate::log_limit::LogLimiter;
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
    rejections_kept: IntCounterVec,
    leases: IntCounterVec,
    skewed: IntCounterVec,
    mode: GaugeVec,
    exchange_entries: GaugeVec,
    exchange_lookups: IntCounterVec,
    exchanges: IntCounterVec,
    exchange_duration: HistogramVec,
    exchange_rejections_kept: IntCounterVec,
    log_lines_suppressed: IntCounterVec,
    exchange_throttled: IntCounterVec,
}

/// How a per-caller lookup was answered.
pub const LOOKUP_RESULTS: [&str; 3] = ["hit", "miss", "negative"];
/// How one token exchange ended.
pub const EXCHANGE_OUTCOMES: [&str; 4] = ["success", "rejected", "transient_error", "fatal_error"];

/// One token-exchange credential's series.
#[derive(Clone)]
pub struct ExchangeMetrics {
    pub entries: Gauge,
    pub lookups: [IntCounter; 3],
    pub exchanges: [IntCounter; 4],
    pub duration: Histogram,
    pub rejections_kept: IntCounter,
    /// Holds back the log lines of refused subjects: a caller must not control log volume.
    pub refusal_log: Arc<LogLimiter>,
    pub throttled: IntCounter,
}

/// A refused subject's log line is written once per reason in this window, then counted.
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(60);

pub const LEASE_EVENTS: [&str; 4] = ["acquired", "waited", "taken_over", "lost"];

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
    pub rejections_kept: IntCounter,
    pub leases: [IntCounter; 4],
    pub skewed: IntCounter,
    pub modes: [Gauge; 4],
    /// The token-exchange families: children are made only for credentials that exchange, so
    /// other credentials show no empty series.
    pub exchange: ExchangeFamilies,
}

#[derive(Clone)]
pub struct ExchangeFamilies {
    entries: GaugeVec,
    lookups: IntCounterVec,
    exchanges: IntCounterVec,
    duration: HistogramVec,
    rejections_kept: IntCounterVec,
    log_lines_suppressed: IntCounterVec,
    throttled: IntCounterVec,
}

impl ExchangeFamilies {
    pub fn for_credential(&self, name: &str) -> ExchangeMetrics {
        ExchangeMetrics {
            entries: self.entries.with_label_values(&[name]),
            lookups: LOOKUP_RESULTS.map(|r| self.lookups.with_label_values(&[name, r])),
            exchanges: EXCHANGE_OUTCOMES.map(|o| self.exchanges.with_label_values(&[name, o])),
            duration: self.duration.with_label_values(&[name]),
            rejections_kept: self.rejections_kept.with_label_values(&[name]),
            refusal_log: Arc::new(LogLimiter::new(REFUSAL_LOG_WINDOW, {
                let (family, name) = (self.log_lines_suppressed.clone(), name.to_string());
                Box::new(move |reason| family.with_label_values(&[&name, reason]))
            })),
            throttled: self.throttled.with_label_values(&[name]),
        }
    }
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
            rejections_kept: IntCounterVec::new(
                Opts::new(
                    "tokenward_token_rejections_kept_total",
                    "Upstream rejections passed on without a refresh: the token was itself obtained for a rejection less than min_refresh_interval before.",
                ),
                &["credential"],
            )?,
            leases: IntCounterVec::new(
                Opts::new(
                    "tokenward_store_leases_total",
                    "Refresh leases: acquired at once, waited for (another holder was refreshing), taken over from a holder that did not finish, or lost (this holder's answer came after another replica moved the chain on).",
                ),
                &["credential", "event"],
            )?,
            skewed: IntCounterVec::new(
                Opts::new(
                    "tokenward_store_skewed_total",
                    "Stored tokens not adopted because another replica issued them further in the future, by this replica's clock, than the skew tolerance: the replicas' clocks differ.",
                ),
                &["credential"],
            )?,
            mode: GaugeVec::new(
                Opts::new(
                    "tokenward_store_mode",
                    "1 for the store mode each credential is in: file, shared, local (shared store down, refreshing alone) or hold (shared store down, not refreshing).",
                ),
                &["credential", "mode"],
            )?,
            exchange_entries: GaugeVec::new(
                Opts::new(
                    "tokenward_exchange_cache_entries",
                    "Exchanged per-caller tokens held in the cache.",
                ),
                &["credential"],
            )?,
            exchange_lookups: IntCounterVec::new(
                Opts::new(
                    "tokenward_exchange_cache_requests_total",
                    "Per-caller token lookups: hit, miss (an exchange was made or joined), negative (a refused subject remembered).",
                ),
                &["credential", "result"],
            )?,
            exchanges: IntCounterVec::new(
                Opts::new(
                    "tokenward_exchange_total",
                    "Token exchanges (RFC 8693) by outcome.",
                ),
                &["credential", "outcome"],
            )?,
            exchange_duration: HistogramVec::new(
                HistogramOpts::new(
                    "tokenward_exchange_duration_seconds",
                    "Time taken by token exchanges.",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                &["credential"],
            )?,
            exchange_rejections_kept: IntCounterVec::new(
                Opts::new(
                    "tokenward_exchange_rejections_kept_total",
                    "Upstream rejections of a caller's exchanged token passed on without a new exchange: the token was itself obtained for a rejection less than min_refresh_interval before.",
                ),
                &["credential"],
            )?,
            log_lines_suppressed: IntCounterVec::new(
                Opts::new(
                    "tokenward_log_lines_suppressed_total",
                    "Log lines about refused subjects not written, by reason: each reason is logged once a minute per credential, so callers cannot control log volume.",
                ),
                &["credential", "reason"],
            )?,
            exchange_throttled: IntCounterVec::new(
                Opts::new(
                    "tokenward_exchange_throttled_total",
                    "Cache misses answered 503 without an exchange: over max_exchanges_per_second.",
                ),
                &["credential"],
            )?,
        };
        registry.register(Box::new(m.log_lines_suppressed.clone()))?;
        registry.register(Box::new(m.exchange_rejections_kept.clone()))?;
        registry.register(Box::new(m.exchange_throttled.clone()))?;
        registry.register(Box::new(m.exchange_entries.clone()))?;
        registry.register(Box::new(m.exchange_lookups.clone()))?;
        registry.register(Box::new(m.exchanges.clone()))?;
        registry.register(Box::new(m.exchange_duration.clone()))?;
        registry.register(Box::new(m.refreshes.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.expiry.clone()))?;
        registry.register(Box::new(m.valid.clone()))?;
        registry.register(Box::new(m.fatal.clone()))?;
        registry.register(Box::new(m.breaker.clone()))?;
        registry.register(Box::new(m.coalesced.clone()))?;
        registry.register(Box::new(m.rejections_kept.clone()))?;
        registry.register(Box::new(m.leases.clone()))?;
        registry.register(Box::new(m.skewed.clone()))?;
        registry.register(Box::new(m.mode.clone()))?;
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
            rejections_kept: self.rejections_kept.with_label_values(&[name]),
            leases: LEASE_EVENTS.map(|e| self.leases.with_label_values(&[name, e])),
            skewed: self.skewed.with_label_values(&[name]),
            modes: StoreMode::ALL.map(|m| self.mode.with_label_values(&[name, m.as_str()])),
            exchange: ExchangeFamilies {
                entries: self.exchange_entries.clone(),
                lookups: self.exchange_lookups.clone(),
                exchanges: self.exchanges.clone(),
                duration: self.exchange_duration.clone(),
                rejections_kept: self.exchange_rejections_kept.clone(),
                log_lines_suppressed: self.log_lines_suppressed.clone(),
                throttled: self.exchange_throttled.clone(),
            },
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
        let _ = self.rejections_kept.remove_label_values(&[name]);
        for e in LEASE_EVENTS {
            let _ = self.leases.remove_label_values(&[name, e]);
        }
        let _ = self.skewed.remove_label_values(&[name]);
        for m in StoreMode::ALL {
            let _ = self.mode.remove_label_values(&[name, m.as_str()]);
        }
        let _ = self.exchange_entries.remove_label_values(&[name]);
        for r in LOOKUP_RESULTS {
            let _ = self.exchange_lookups.remove_label_values(&[name, r]);
        }
        for o in EXCHANGE_OUTCOMES {
            let _ = self.exchanges.remove_label_values(&[name, o]);
        }
        let _ = self.exchange_duration.remove_label_values(&[name]);
        let _ = self.exchange_rejections_kept.remove_label_values(&[name]);
        let _ = self.exchange_throttled.remove_label_values(&[name]);
    }
}

impl CredentialMetrics {
    pub fn outcome(&self, outcome: &str) -> &IntCounter {
        let i = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(1);
        &self.refreshes[i]
    }

    pub fn lease(&self, event: &str) -> &IntCounter {
        let i = LEASE_EVENTS.iter().position(|e| *e == event).unwrap_or(0);
        &self.leases[i]
    }

    pub fn set_mode(&self, mode: StoreMode) {
        for (m, gauge) in StoreMode::ALL.iter().zip(&self.modes) {
            gauge.set(if *m == mode { 1.0 } else { 0.0 });
        }
    }
}
