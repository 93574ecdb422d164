//! Whose failures hold back whom on a token-exchange credential: a failure for one caller backs
//! off that caller only; the credential-wide back-off starts when failures span several callers
//! within a window; and the cap on exchanges per second that bounds what distinct callers cost.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use super::credential::backoff;
use super::exchange::Key;

/// How many distinct callers must fail within the window before the whole credential backs
/// off: fewer is one caller's trouble (its subject makes the provider fail), not an outage.
pub const CALLERS_FOR_OUTAGE: usize = 3;
/// The window is `min_refresh_interval`, but never shorter than this: with `"0s"` failures
/// would never be seen to span several callers.
const MIN_WINDOW: Duration = Duration::from_secs(1);

/// One caller's failures and when it may try again.
#[derive(Debug, Clone)]
pub struct CallerBackoff {
    pub failures: u32,
    pub not_before: Instant,
    pub reason: String,
}

impl CallerBackoff {
    /// The back-off after one more failure than `previous` (capped at `cap`), at `now`.
    pub fn next(
        previous: Option<&CallerBackoff>,
        now: Instant,
        cap: Duration,
        retry_after: Option<Duration>,
        reason: String,
    ) -> Self {
        let failures = previous.map_or(1, |p| p.failures.saturating_add(1));
        CallerBackoff {
            failures,
            not_before: now + backoff(failures, cap, retry_after),
            reason,
        }
    }
}

/// The credential-wide state.
#[derive(Default)]
pub struct Health {
    /// Consecutive failed probes since the credential-wide back-off began.
    pub failures: u32,
    pub not_before: Option<Instant>,
    /// While backing off, only one exchange probes the provider at a time.
    pub probing: bool,
    /// When the last probe of the credential-wide back-off was sent.
    pub last_probe_at: Option<Instant>,
    /// The longest a back-off step lasts (`probe_interval`), set with each failure.
    cap: Duration,
    /// Set while the credential-wide back-off runs: failures spanned several callers.
    pub outage: bool,
    /// Whether the provider has answered since the last failure (or since the start). Until
    /// it has, exchanges go one at a time: at the start of an outage a wave of new callers
    /// must not all probe a provider that is down.
    pub proven: bool,
    /// Failing callers (by key) and when they failed, newest last, within the window.
    recent: VecDeque<(Key, Instant)>,
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
}

/// What one failure did to the credential.
#[derive(Debug, PartialEq)]
pub enum Failed {
    /// Only this caller backs off.
    Caller,
    /// Failures now span several callers: the credential-wide back-off began.
    OutageBegan,
    /// A probe failed while the credential-wide back-off ran: it goes on.
    OutageGoesOn,
}

impl Health {
    /// Whether a provider call must wait: the credential-wide back-off runs, or its probe is out.
    pub fn held_back(&self, now: Instant) -> bool {
        self.outage && (self.not_before.is_some_and(|t| now < t) || self.probing)
    }

    /// Whether a caller that failed before may probe during the credential-wide back-off: only
    /// when no other caller has probed for two back-off steps. Its subject may be what fails,
    /// and a caller repeating it fast must not win every probe while others wait; but where
    /// every caller has failed before (a few callers, a long outage) one of them still probes.
    pub fn repeat_may_probe(&self, now: Instant) -> bool {
        self.last_probe_at.is_none_or(|at| now >= at + self.cap * 2)
    }

    /// The provider answered (a token, or a refusal of the caller's token): it is up.
    pub fn answered(&mut self) -> bool {
        let was_failing = self.outage || !self.recent.is_empty();
        self.failures = 0;
        self.not_before = None;
        self.probing = false;
        self.outage = false;
        self.proven = true;
        self.recent.clear();
        was_failing
    }

    /// An exchange for caller `key` failed for a reason that is not the caller's; `repeat`: that
    /// caller failed before and is still backing off (it counts once towards an outage).
    pub fn failed(
        &mut self,
        key: Key,
        repeat: bool,
        now: Instant,
        window: Duration,
        cap: Duration,
        retry_after: Option<Duration>,
        reason: &str,
    ) -> Failed {
        self.probing = false;
        self.proven = false;
        self.cap = cap;
        self.last_error = Some(reason.to_string());
        self.last_error_at = Some(SystemTime::now());
        let window = window.max(MIN_WINDOW);
        let outcome = if self.outage {
            Failed::OutageGoesOn
        } else if repeat {
            return Failed::Caller;
        } else {
            self.recent
                .retain(|(k, at)| *k != key && now - *at < window);
            self.recent.push_back((key, now));
            if self.recent.len() < CALLERS_FOR_OUTAGE {
                return Failed::Caller;
            }
            self.outage = true;
            self.failures = 0;
            Failed::OutageBegan
        };
        self.failures = self.failures.saturating_add(1);
        self.not_before = Some(now + backoff(self.failures, cap, retry_after));
        outcome
    }

    /// How long until the credential-wide back-off lets a probe through.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        self.not_before
            .filter(|_| self.outage)
            .map(|t| t.saturating_duration_since(now))
    }

    /// Distinct callers that failed within the window, for `/tokens`.
    pub fn failing_callers(&self) -> usize {
        self.recent.len()
    }
}

/// The cap on exchanges per second (`max_exchanges_per_second`): a token bucket holding one
/// second's worth, so a burst of new callers is served at once and a flood of distinct
/// subjects costs at most the rate.
pub struct Budget {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl Budget {
    pub fn new(per_second: u32, now: Instant) -> Self {
        Budget {
            per_second: f64::from(per_second),
            tokens: f64::from(per_second),
            last: now,
        }
    }

    /// Takes one exchange from the budget, or says how long until one is available.
    pub fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(5);
    const CAP: Duration = Duration::from_secs(1);

    fn key(n: u8) -> Key {
        [n; 32]
    }

    #[test]
    fn one_callers_failures_never_back_off_the_credential() {
        let mut h = Health::default();
        let t0 = Instant::now();
        for i in 0..10 {
            let now = t0 + Duration::from_millis(100 * i);
            assert_eq!(
                h.failed(key(1), false, now, W, CAP, None, "500"),
                Failed::Caller
            );
            assert!(!h.held_back(now));
        }
        assert_eq!(
            h.failed(key(2), false, t0, W, CAP, None, "500"),
            Failed::Caller
        );
        assert_eq!(h.failing_callers(), 2);
    }

    #[test]
    fn a_caller_that_failed_before_counts_once_towards_an_outage() {
        let mut h = Health::default();
        let t0 = Instant::now();
        assert_eq!(
            h.failed(key(1), false, t0, W, CAP, None, "500"),
            Failed::Caller
        );
        assert_eq!(
            h.failed(key(2), false, t0, W, CAP, None, "500"),
            Failed::Caller
        );
        // The same two callers again, then again: still only their own trouble.
        for _ in 0..3 {
            for k in [1, 2] {
                assert_eq!(
                    h.failed(key(k), true, t0, W, CAP, None, "500"),
                    Failed::Caller
                );
            }
        }
        assert!(!h.held_back(t0));
        assert_eq!(
            h.failed(key(3), false, t0, W, CAP, None, "500"),
            Failed::OutageBegan
        );
    }

    #[test]
    fn failures_of_three_callers_within_the_window_back_off_the_credential() {
        let mut h = Health::default();
        let t0 = Instant::now();
        h.failed(key(1), false, t0, W, CAP, None, "500");
        // Out of the window by the time the others fail: not counted.
        let later = t0 + W + Duration::from_millis(1);
        h.failed(key(2), false, later, W, CAP, None, "500");
        assert_eq!(
            h.failed(key(3), false, later, W, CAP, None, "500"),
            Failed::Caller
        );
        assert_eq!(
            h.failed(
                key(4),
                false,
                later,
                W,
                CAP,
                Some(Duration::from_secs(2)),
                "500"
            ),
            Failed::OutageBegan
        );
        assert!(h.held_back(later));
        assert!(
            h.wait(later).unwrap() >= Duration::from_secs(2),
            "Retry-After is a floor"
        );
        let after = later + Duration::from_secs(3);
        assert!(!h.held_back(after));
        assert_eq!(
            h.failed(key(5), false, after, W, CAP, None, "500"),
            Failed::OutageGoesOn
        );
        assert!(h.wait(after).unwrap() <= CAP, "capped at probe_interval");
        assert!(!h.proven);
        assert!(h.answered());
        assert!(h.proven);
        assert!(!h.held_back(after));
        assert_eq!(h.failing_callers(), 0);
        // A zero window still sees failures span callers.
        let mut h = Health::default();
        for n in 1..=3 {
            h.failed(key(n), false, t0, Duration::ZERO, CAP, None, "500");
        }
        assert!(h.outage);
    }

    #[test]
    fn the_budget_admits_the_rate_per_second() {
        let t0 = Instant::now();
        let mut b = Budget::new(50, t0);
        for _ in 0..50 {
            assert!(b.admit(t0).is_ok());
        }
        let wait = b.admit(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(20), "{wait:?}");
        let mut admitted = 0;
        for ms in 0..10_000u64 {
            if b.admit(t0 + Duration::from_millis(ms)).is_ok() {
                admitted += 1;
            }
        }
        assert!((499..=500).contains(&admitted), "{admitted}");
    }
}
