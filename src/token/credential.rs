//! The per-credential token engine. Requests read the current token lock-free; only when no
//! usable token exists do they queue on a single-flight guard, so any number of concurrent
//! waiters cause one provider call. Background refresh, back-off, the circuit breaker and
//! refresh-token rotation all happen under that same guard.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use rand::Rng;
use tracing::{error, info, warn};

use super::metrics::CredentialMetrics;
use super::model::Token;
use super::store::{RefreshState, TokenStore};
use crate::config::CredentialConfig;
use crate::dialect::{DialectError, ErrorClass, Held, ProviderClient};
use crate::secret::Secret;

/// First back-off step; each further failure doubles it, up to the credential's cap.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_FLOOR: Duration = Duration::from_millis(50);
/// What a client is told to wait when the credential has failed for good.
const FATAL_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Why a request cannot get a token right now.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub credential: Arc<str>,
    pub reason: String,
    pub retry_after: Duration,
}

/// The refresh chain, guarded by the single-flight lock.
struct Flight {
    loaded: bool,
    refresh: Option<Secret>,
    origin: Option<String>,
}

/// What the admin endpoints and the scheduler read; written only by the flight holder.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub last_success: Option<SystemTime>,
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
    pub last_error_class: Option<&'static str>,
    pub consecutive_failures: u32,
    pub not_before: Option<Instant>,
    pub fatal: bool,
    pub persist_error: Option<String>,
}

pub struct Credential {
    name: Arc<str>,
    config: CredentialConfig,
    client: ProviderClient,
    store: Arc<dyn TokenStore>,
    current: ArcSwapOption<Token>,
    flight: tokio::sync::Mutex<Flight>,
    attempts: AtomicU64,
    status: Mutex<Status>,
    wake: tokio::sync::Notify,
    retired: AtomicBool,
    metrics: CredentialMetrics,
}

impl Credential {
    pub fn new(
        config: CredentialConfig,
        store: Arc<dyn TokenStore>,
        metrics: CredentialMetrics,
    ) -> Result<Self, String> {
        let client = ProviderClient::new(config.timing.timeout, &config.transport)?;
        Ok(Credential {
            name: Arc::from(config.name.as_str()),
            config,
            client,
            store,
            current: ArcSwapOption::empty(),
            flight: tokio::sync::Mutex::new(Flight {
                loaded: false,
                refresh: None,
                origin: None,
            }),
            attempts: AtomicU64::new(0),
            status: Mutex::new(Status::default()),
            wake: tokio::sync::Notify::new(),
            retired: AtomicBool::new(false),
            metrics,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &CredentialConfig {
        &self.config
    }

    fn status(&self) -> MutexGuard<'_, Status> {
        // A panic elsewhere while holding this lock leaves plain data behind: keep using it.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status_snapshot(&self) -> Status {
        self.status().clone()
    }

    /// The token to serve now, if there is one: the request path's lock-free read.
    pub fn current(&self) -> Option<Arc<Token>> {
        let guard = self.current.load();
        match guard.as_ref() {
            Some(t) if t.is_usable(Instant::now()) => Some(Arc::clone(t)),
            _ => None,
        }
    }

    /// The last token obtained, usable or not (for status reporting).
    pub fn latest(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.current().is_some()
    }

    /// A token for a request: the current one, or — when none is usable — a share of the one
    /// provider call in flight.
    pub async fn token(&self) -> Result<Arc<Token>, Unavailable> {
        if let Some(t) = self.current() {
            return Ok(t);
        }
        let seen = self.attempts.load(Ordering::Acquire);
        let mut flight = self.flight.lock().await;
        if let Some(t) = self.current() {
            self.metrics.coalesced.inc();
            return Ok(t);
        }
        if self.attempts.load(Ordering::Acquire) != seen {
            // An attempt finished while we queued and it did not produce a usable token:
            // share its failure rather than calling the provider once per waiter.
            self.metrics.coalesced.inc();
            return Err(self.unavailable());
        }
        if self.held_back(Instant::now()) {
            return Err(self.unavailable());
        }
        self.attempt(&mut flight).await
    }

    /// Called by the background refresher when the soft threshold or a back-off ends.
    pub async fn refresh_if_due(&self) {
        let mut flight = self.flight.lock().await;
        let now = Instant::now();
        if self.held_back(now) {
            return;
        }
        if let Some(t) = self.current.load().as_ref() {
            if now < t.refresh_at {
                return;
            }
        }
        let _ = self.attempt(&mut flight).await;
    }

    /// Forces one provider call now (an operator's request); clears a fatal state.
    pub async fn force_refresh(&self) -> Result<Arc<Token>, Unavailable> {
        let seen = self.attempts.load(Ordering::Acquire);
        let mut flight = self.flight.lock().await;
        if self.attempts.load(Ordering::Acquire) != seen {
            // Someone refreshed while we waited: that is the refresh the operator asked for.
            return self.current().ok_or_else(|| self.unavailable());
        }
        {
            let mut s = self.status();
            s.fatal = false;
            s.not_before = None;
        }
        self.attempt(&mut flight).await
    }

    /// Drops the current token if it is still generation `generation` (or any, when `None`):
    /// a late report about an old token cannot evict a newer one.
    pub fn invalidate(&self, generation: Option<u64>) -> bool {
        let current = self.current.load_full();
        let Some(token) = current.as_ref() else {
            return false;
        };
        if generation.is_some_and(|g| g != token.generation) {
            return false;
        }
        let previous = self.current.compare_and_swap(&current, None);
        let swapped = match (&*previous, &current) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if swapped {
            info!(credential = %self.name, generation = token.generation, "token invalidated");
            self.wake.notify_one();
        }
        swapped
    }

    /// The upstream rejected token `generation`. Drops it if it is still current and older than
    /// `min_refresh_interval` (an upstream that rejects every token must not make us spin), and
    /// says whether a request that saw the rejection can expect a different token now.
    pub fn reject(&self, generation: u64) -> bool {
        let Some(current) = self.current.load_full() else {
            return true;
        };
        if current.generation != generation {
            return true;
        }
        if current.issued_at.elapsed() < self.config.timing.min_refresh_interval {
            return false;
        }
        // Losing the compare-and-swap to a concurrent rejection of the same token is fine: either
        // way the token is gone and a new one is on its way.
        if self.invalidate(Some(generation)) {
            warn!(credential = %self.name, generation, "upstream rejected the token; obtaining a new one");
        }
        true
    }

    fn held_back(&self, now: Instant) -> bool {
        let s = self.status();
        s.fatal || s.not_before.is_some_and(|t| now < t)
    }

    fn unavailable(&self) -> Unavailable {
        let s = self.status();
        let retry_after = if s.fatal {
            FATAL_RETRY_AFTER
        } else {
            s.not_before
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(1))
        };
        let reason = s
            .last_error
            .clone()
            .unwrap_or_else(|| "no token has been obtained yet".into());
        Unavailable {
            credential: self.name.clone(),
            reason,
            retry_after: Duration::from_secs(retry_after.as_secs_f64().ceil().max(1.0) as u64),
        }
    }

    /// When the background refresher should next look at this credential.
    pub fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let s = self.status();
        if s.fatal {
            return now + Duration::from_secs(24 * 3600);
        }
        let due = match self.current.load().as_ref() {
            Some(t) => t.refresh_at,
            None => now,
        };
        match s.not_before {
            Some(nb) => due.max(nb),
            None => due,
        }
    }

    /// Returns once no provider call is in flight, so a rotated refresh token is persisted
    /// before the process exits.
    pub async fn quiesce(&self) {
        drop(self.flight.lock().await);
    }

    /// Marks this credential as replaced by a reload: its refresher stops.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Wakes the background refresher so it recomputes its schedule.
    pub fn kick(&self) {
        self.wake.notify_one();
    }

    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Updates the gauges that depend on the clock; called before each scrape.
    pub fn update_gauges(&self) {
        let now = Instant::now();
        let (expiry, valid) = match self.current.load().as_ref() {
            Some(t) => (
                t.expires_at.saturating_duration_since(now).as_secs_f64(),
                t.is_usable(now),
            ),
            None => (0.0, false),
        };
        self.metrics.expiry_seconds.set(expiry);
        self.metrics.valid.set(if valid { 1.0 } else { 0.0 });
        let s = self.status();
        self.metrics.fatal.set(if s.fatal { 1.0 } else { 0.0 });
        self.metrics
            .breaker_open
            .set(if s.not_before.is_some_and(|t| now < t) {
                1.0
            } else {
                0.0
            });
    }

    /// Which refresh token to use: the newest of the chain, unless the operator has provided a
    /// bootstrap value this chain did not grow from, which starts a new chain.
    async fn prepare_chain(&self, flight: &mut Flight) -> Result<(), DialectError> {
        if !flight.loaded {
            match self.store.load(&self.name).await {
                Ok(Some(state)) => {
                    flight.refresh = state.refresh_token;
                    flight.origin = state.origin;
                }
                Ok(None) => {}
                Err(e) => {
                    error!(credential = %self.name, error = %e, "cannot read stored refresh token; starting from the configured one")
                }
            }
            flight.loaded = true;
        }
        if let Some(source) = self.config.dialect.bootstrap_refresh_token() {
            match source.resolve() {
                Ok(bootstrap) => {
                    let fp = bootstrap.fingerprint();
                    if flight.origin.as_deref() != Some(fp.as_str()) {
                        if flight.origin.is_some() {
                            info!(credential = %self.name, "a new bootstrap refresh token was provided; starting a new chain");
                        }
                        flight.refresh = Some(bootstrap);
                        flight.origin = Some(fp);
                    }
                }
                Err(e) if flight.refresh.is_none() => {
                    return Err(DialectError::fatal(format!("`refresh_token`: {e}")));
                }
                Err(e) => {
                    warn!(credential = %self.name, error = %e, "cannot read the bootstrap refresh token; continuing the stored chain")
                }
            }
        }
        Ok(())
    }

    async fn persist(&self, flight: &Flight) {
        let state = RefreshState {
            refresh_token: flight.refresh.clone(),
            origin: flight.origin.clone(),
        };
        let result = self.store.save(&self.name, &state).await;
        let mut s = self.status();
        match result {
            Ok(()) => s.persist_error = None,
            Err(e) => {
                error!(credential = %self.name, error = %e, "cannot persist the refresh token; it is kept in memory and saved again at the next refresh");
                s.persist_error = Some(e.to_string());
            }
        }
    }

    /// One provider call (two when a dead refresh token calls for a login), under the flight lock.
    async fn attempt(&self, flight: &mut Flight) -> Result<Arc<Token>, Unavailable> {
        if let Err(e) = self.prepare_chain(flight).await {
            return Err(self.record_failure(e));
        }
        let mut relogged = false;
        loop {
            let held = Held {
                access_token: self.current.load().as_ref().map(|t| t.value().clone()),
                refresh_token: flight.refresh.clone(),
            };
            let started = Instant::now();
            // The client has its own timeout; this one also bounds a dialect that makes several calls.
            let limit = self.config.timing.timeout * 2 + Duration::from_secs(1);
            let result =
                match tokio::time::timeout(limit, self.config.dialect.obtain(&held, &self.client))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(DialectError::transient(format!(
                        "provider did not answer within {}",
                        humantime::format_duration(limit)
                    ))),
                };
            self.metrics
                .duration
                .observe(started.elapsed().as_secs_f64());
            let grant = match result {
                Ok(g) => g,
                Err(e) if e.class == ErrorClass::Relogin && !relogged => {
                    self.metrics.outcome("relogin").inc();
                    warn!(credential = %self.name, error = %e.message, "refresh token rejected; logging in again");
                    relogged = true;
                    flight.refresh = None;
                    self.persist(flight).await;
                    continue;
                }
                Err(e) => return Err(self.record_failure(e)),
            };
            if let Some(new) = &grant.refresh_token {
                if flight.refresh.as_ref() != Some(new) {
                    flight.refresh = Some(new.clone());
                    // Persisted before it is used: the provider may have revoked the old one.
                    self.persist(flight).await;
                }
            }
            let kind = grant.kind;
            let generation = self.attempts.load(Ordering::Acquire) + 1;
            let token = match Token::from_grant(
                grant,
                &self.config.presentation,
                &self.config.timing,
                generation,
            ) {
                Ok(t) => Arc::new(t),
                Err(reason) => return Err(self.record_failure(DialectError::transient(reason))),
            };
            let previous = self.current.swap(Some(token.clone()));
            let same = previous
                .as_ref()
                .is_some_and(|p| p.value() == token.value());
            self.attempts.fetch_add(1, Ordering::AcqRel);
            {
                let mut s = self.status();
                s.last_success = Some(SystemTime::now());
                s.consecutive_failures = 0;
                s.not_before = None;
                s.fatal = false;
            }
            self.metrics.outcome("success").inc();
            self.wake.notify_one();
            info!(
                credential = %self.name,
                via = kind.as_str(),
                lifetime_s = token.lifetime.as_secs(),
                same_token = same,
                "token obtained"
            );
            return Ok(token);
        }
    }

    fn record_failure(&self, e: DialectError) -> Unavailable {
        self.metrics.outcome(e.class.outcome()).inc();
        let now = Instant::now();
        let has_token = self.current().is_some();
        {
            let mut s = self.status();
            s.last_error = Some(e.message.clone());
            s.last_error_at = Some(SystemTime::now());
            s.last_error_class = Some(e.class.outcome());
            s.consecutive_failures = s.consecutive_failures.saturating_add(1);
            let retry_after = match e.class {
                ErrorClass::Fatal => {
                    s.fatal = true;
                    s.not_before = None;
                    None
                }
                ErrorClass::Transient { retry_after } => Some(retry_after),
                // A second dead refresh token in one attempt: back off like any other failure.
                ErrorClass::Relogin => Some(None),
            };
            if let Some(retry_after) = retry_after {
                // Without a usable token a returning provider must be noticed quickly; with
                // one there is time, and a struggling provider deserves the space.
                let cap = if has_token {
                    self.config.timing.max_backoff
                } else {
                    self.config.timing.probe_interval
                };
                s.not_before = Some(now + backoff(s.consecutive_failures, cap, retry_after));
            }
        }
        if e.class == ErrorClass::Fatal {
            error!(credential = %self.name, class = e.class.outcome(), error = %e.message, "token refresh failed; not retrying until the configuration changes or an operator forces a refresh");
        } else {
            warn!(credential = %self.name, class = e.class.outcome(), error = %e.message, serving_current = has_token, "token refresh failed");
        }
        self.wake.notify_one();
        self.unavailable()
    }
}

/// Exponential back-off with full jitter while it grows; once it reaches `cap` the breaker is
/// open and the provider gets one probe per `cap` (less a little jitter), however many requests
/// come. A provider's `Retry-After` is a floor.
pub fn backoff(failures: u32, cap: Duration, retry_after: Option<Duration>) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let delay = if exp >= cap {
        cap.mul_f64(rand::rng().random_range(0.9..=1.0))
    } else {
        exp.mul_f64(rand::rng().random::<f64>()).max(BACKOFF_FLOOR)
    };
    match retry_after {
        Some(r) => delay.max(r),
        None => delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_honours_retry_after() {
        for failures in 1..40 {
            let d = backoff(failures, Duration::from_secs(2), None);
            assert!(d >= BACKOFF_FLOOR && d <= Duration::from_secs(2), "{d:?}");
        }
        // Open breaker: one probe per interval, not a random burst.
        for _ in 0..100 {
            let d = backoff(10, Duration::from_secs(2), None);
            assert!(d >= Duration::from_millis(1800), "{d:?}");
        }
        assert!(backoff(1, Duration::from_secs(60), None) <= BACKOFF_BASE);
        assert_eq!(
            backoff(1, Duration::from_secs(1), Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
    }
}
