//! The proxy's per-route request metrics, with label children resolved once per route so the
//! request path only increments.

use std::sync::Arc;
use std::time::Duration;

use crate::log_limit::LogLimiter;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

#[derive(Clone)]
pub struct ProxyMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    fast_path: IntCounterVec,
    refusals_unlogged: IntCounterVec,
}

#[derive(Clone)]
pub struct RouteMetrics {
    requests: [IntCounter; 6],
    duration: [Histogram; 6],
    fast_path: IntCounter,
    /// Holds back the log line of each request refused for want of a token: callers decide
    /// how many requests they send, so they must not decide how much is logged.
    pub refusal_log: Arc<LogLimiter>,
}

/// A refused request's log line is written once per reason in this window, then counted.
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(60);

impl ProxyMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = ProxyMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "tokenward_requests_total",
                    "Requests handled, by route and response status class.",
                ),
                &["route", "status_class"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "tokenward_request_duration_seconds",
                    "Time from request to the end of the response, by route and status class.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ]),
                &["route", "status_class"],
            )?,
            fast_path: IntCounterVec::new(
                Opts::new(
                    "tokenward_fast_path_requests_total",
                    "Requests served by the lean HTTP/1 path (server.http1_fast_path), by route; \
                     the rest of tokenward_requests_total went through pingora-proxy.",
                ),
                &["route"],
            )?,
            refusals_unlogged: IntCounterVec::new(
                Opts::new(
                    "tokenward_refusal_log_lines_suppressed_total",
                    "Log lines about requests refused for want of a token not written, by route and \
                     reason: each reason is logged once a minute per route.",
                ),
                &["route", "reason"],
            )?,
        };
        registry.register(Box::new(m.refusals_unlogged.clone()))?;
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.fast_path.clone()))?;
        Ok(m)
    }

    pub fn for_route(&self, route: &str) -> RouteMetrics {
        RouteMetrics {
            requests: STATUS_CLASSES.map(|c| self.requests.with_label_values(&[route, c])),
            duration: STATUS_CLASSES.map(|c| self.duration.with_label_values(&[route, c])),
            fast_path: self.fast_path.with_label_values(&[route]),
            refusal_log: Arc::new(LogLimiter::new(REFUSAL_LOG_WINDOW, {
                let (family, route) = (self.refusals_unlogged.clone(), route.to_string());
                Box::new(move |reason| family.with_label_values(&[&route, reason]))
            })),
        }
    }
}

impl RouteMetrics {
    /// `status` 0 means no response was written (the client went away first).
    pub fn observe(&self, status: u16, seconds: f64) {
        let i = match status {
            100..=599 => (status / 100 - 1) as usize,
            _ => 5,
        };
        self.requests[i].inc();
        self.duration[i].observe(seconds);
    }

    pub fn served_on_fast_path(&self) {
        self.fast_path.inc();
    }
}
