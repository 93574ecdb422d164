//! Rate limits log lines that callers can cause: the first line for each reason in a window is
//! written, the others only counted, so no caller controls the log volume (or the disk) by
//! sending many bad requests.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::IntCounter;

/// Distinct reasons tracked; any beyond are counted under [`OTHER`] and never logged, so the
/// limiter's own memory is bounded too.
const MAX_REASONS: usize = 64;
const OTHER: &str = "other";

/// Counts a suppressed line for a reason.
pub type SuppressedCounter = Box<dyn Fn(&str) -> IntCounter + Send + Sync>;

pub struct LogLimiter {
    window: Duration,
    last_written: Mutex<HashMap<String, Instant>>,
    suppressed: SuppressedCounter,
}

impl LogLimiter {
    /// Writes at most one line per reason per `window`; `suppressed(reason)` is the counter of
    /// the lines it holds back.
    pub fn new(window: Duration, suppressed: SuppressedCounter) -> Self {
        LogLimiter {
            window,
            last_written: Mutex::new(HashMap::new()),
            suppressed,
        }
    }

    /// Whether a line for `reason` may be written now; when not, it is counted instead.
    pub fn allow(&self, reason: &str) -> bool {
        self.allow_at(reason, Instant::now())
    }

    fn allow_at(&self, reason: &str, now: Instant) -> bool {
        let mut last = self.last_written.lock().unwrap_or_else(|p| p.into_inner());
        let known = last.len();
        let counted_as = match last.get_mut(reason) {
            Some(at) if now.saturating_duration_since(*at) >= self.window => {
                *at = now;
                return true;
            }
            Some(_) => reason,
            None if known < MAX_REASONS => {
                last.insert(reason.to_string(), now);
                return true;
            }
            None => OTHER,
        };
        drop(last);
        (self.suppressed)(counted_as).inc();
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> (LogLimiter, prometheus::IntCounterVec) {
        let family = prometheus::IntCounterVec::new(
            prometheus::Opts::new("suppressed", "test"),
            &["reason"],
        )
        .unwrap();
        let f = family.clone();
        let limiter = LogLimiter::new(
            Duration::from_secs(60),
            Box::new(move |r| f.with_label_values(&[r])),
        );
        (limiter, family)
    }

    #[test]
    fn the_first_line_per_reason_per_window_is_written_and_the_rest_counted() {
        let (l, family) = limiter();
        let t0 = Instant::now();
        assert!(l.allow_at("expired", t0));
        assert!(l.allow_at("bad signature", t0));
        for s in 1..60 {
            assert!(!l.allow_at("expired", t0 + Duration::from_secs(s)));
        }
        assert_eq!(family.with_label_values(&["expired"]).get(), 59);
        assert!(l.allow_at("expired", t0 + Duration::from_secs(60)));
        assert!(!l.allow_at("expired", t0 + Duration::from_secs(61)));
        assert_eq!(family.with_label_values(&["bad signature"]).get(), 0);
    }

    #[test]
    fn reasons_beyond_the_bound_are_counted_not_remembered() {
        let (l, family) = limiter();
        let t0 = Instant::now();
        for i in 0..MAX_REASONS {
            assert!(l.allow_at(&format!("r{i}"), t0));
        }
        for i in 0..10 {
            assert!(!l.allow_at(&format!("new{i}"), t0));
        }
        assert_eq!(family.with_label_values(&[OTHER]).get(), 10);
        assert_eq!(l.last_written.lock().unwrap().len(), MAX_REASONS);
    }
}
