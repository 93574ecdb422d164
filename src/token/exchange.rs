//! Per-caller tokens (RFC 8693 token exchange): each caller's token is exchanged for one minted
//! for the upstream, cached per caller in a bounded moka cache keyed by a hash of the subject
//! token, with one flight per caller (shared by a miss and the background refresh ahead), a
//! negative cache for refused subjects, and back-off (see [`super::exchange_health`]: per
//! caller, per credential once failures span callers, a cap on exchanges per second).
//! Optionally the subject is validated locally first ([`super::subject`]), and another
//! credential's token is sent as the actor token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use moka::future::Cache;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{info, warn};

use super::credential::{Credential, Unavailable, exchange_identity};
use super::exchange_health::{Budget, CALLERS_FOR_OUTAGE, CallerBackoff, Failed, Health};
use super::metrics::ExchangeMetrics;
use super::model::{SentAt, Token};
use super::subject::{SubjectError, SubjectValidator};
use crate::config::{CredentialConfig, Timing};
use crate::dialect::{
    Blame, DialectError, ErrorClass, ExchangeError, ExchangeSettings, Grant, ProviderClient,
};
use crate::secret::Secret;

/// The cache key: SHA-256 of the credential's identity and the subject token's SHA-256, so
/// neither the subject nor a prefix of it is kept as a key, two credentials never share an
/// entry, and an operator can name one caller's entry by its subject's SHA-256.
pub type Key = [u8; 32];

/// How long a caller whose exchanges failed is remembered (its back-off, and that it counts
/// once towards an outage): longer than any back-off step, so a caller repeating failing
/// subjects cannot make them count as new callers again a moment later.
const FAILING_CALLER_MEMORY: Duration = Duration::from_secs(600);

/// The largest exchanged token kept. Servers commonly cap one request header at 8–16 KiB
/// (nginx's default large header buffer is 8 KiB, Node's whole header block 16 KiB), so a larger
/// token could not be presented upstream anyway; and with it the cache holds at most about
/// `cache_max_entries` × 2 × this (the token and its rendered header) plus fixed overhead.
pub const MAX_EXCHANGED_TOKEN_BYTES: usize = 16 * 1024;
/// How long an upstream rejection is remembered until the exchange it caused completes.
const REJECTION_MARK_TTL: Duration = Duration::from_secs(60);

/// One caller's exchanged token and the instant it stops being served.
pub struct Entry {
    pub token: Arc<Token>,
    /// The cache's epoch when the exchange began: an entry of an older epoch (before a flush,
    /// or a reload that replaced the actor) is never served.
    epoch: u64,
    /// The token's own hard threshold, or the subject token's `exp` when that is earlier.
    valid_until: Instant,
    subject_exp: Option<Instant>,
}

struct EntryExpiry;

impl moka::Expiry<Key, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(&self, _k: &Key, v: &Arc<Entry>, now: Instant) -> Option<Duration> {
        Some(v.valid_until.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _k: &Key,
        v: &Arc<Entry>,
        now: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.valid_until.saturating_duration_since(now))
    }
}

/// Why a caller gets no exchanged token.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// The provider refused this caller's token (or it has expired): the caller's fault, 401.
    Rejected,
    /// The provider cannot answer now: 503 with `retry_after`.
    Unavailable(Unavailable),
    /// Entra Conditional Access: the caller must step up; the claims (base64 of the JSON
    /// Entra sent) go back in `WWW-Authenticate`, 401. Never remembered: the user resolves it.
    ClaimsChallenge(Arc<str>),
}

/// What a background exchange ends with: nothing yet, then its entry or its refusal.
type RefreshOutcome = Option<Result<Arc<Entry>, Refusal>>;

/// How an exchange failed, once sorted by whose fault it is.
enum Refused {
    /// The provider refused the caller's token (the message names why, never the token).
    Subject(String),
    /// Not the caller's fault: the provider, or tokenward's own request.
    Failure(DialectError),
    /// No request was made (the actor credential has no token): answered as it says.
    NotSent(Refusal),
    /// The provider answered with something that cannot be used: this caller's failure.
    Unusable(String),
    /// A Conditional Access claims challenge (the message, the claims JSON).
    Claims(String, String),
}

/// Why an exchange is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A caller has no usable token: it waits for this one.
    Miss,
    /// A cached token passed its refresh point: made in the background.
    Refresh,
}

pub struct Exchanger {
    name: Arc<str>,
    config: CredentialConfig,
    settings: ExchangeSettings,
    client: ProviderClient,
    identity: String,
    cache: Cache<Key, Arc<Entry>>,
    /// Subjects answered without an exchange for `negative_ttl`: refused ones (401) and ones
    /// whose exchanged token was over the size bound (503).
    negative: Cache<Key, Refusal>,
    /// Callers whose token an upstream rejected: their next token is obtained because of it.
    rejected: Cache<Key, ()>,
    /// Callers whose exchanges failed for reasons not tied to their token (a 500 for that
    /// subject, an unusable answer): each backs off alone until failures span several callers.
    failing: Cache<Key, CallerBackoff>,
    /// `max_exchanges_per_second`: what cache misses may cost the provider.
    budget: Mutex<Budget>,
    throttled: AtomicU64,
    /// The credential named by `actor`, set (and reset at each reload) by the server.
    actor: ArcSwapOption<Credential>,
    validator: Option<Arc<SubjectValidator>>,
    rejected_locally: AtomicU64,
    rejections_kept: AtomicU64,
    /// Background exchanges under way, by caller, with the channel their outcome comes on.
    refreshing: Mutex<HashMap<Key, watch::Receiver<RefreshOutcome>>>,
    /// The credential's timing for exchanged tokens: refreshed at `refresh_at` of their
    /// lifetime, without the `min_refresh_interval` floor of service tokens (that floor is
    /// about one token's refresh rate; a caller's token lives on its own schedule).
    timing: Timing,
    health: Mutex<Health>,
    /// Held by the one exchange in flight while the provider is not known to answer (see
    /// [`Health::proven`]).
    probe_slot: tokio::sync::Semaphore,
    generation: AtomicU64,
    /// Bumped by every flush of the per-caller cache (see [`Entry::epoch`]).
    epoch: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    negatives: AtomicU64,
    outcomes: [AtomicU64; 4],
    metrics: ExchangeMetrics,
}

const OUTCOME_SUCCESS: usize = 0;
const OUTCOME_REJECTED: usize = 1;
const OUTCOME_TRANSIENT: usize = 2;
const OUTCOME_FATAL: usize = 3;

struct ProbeGuard<'a>(&'a Mutex<Health>);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).probing = false;
    }
}

/// The subject token in a caller's header value: what follows `scheme` (RFC 9110 §11.1:
/// case-insensitive, then one or more spaces), or with no scheme the whole value. A value in
/// another scheme, or none, is no subject: it must never be sent to the provider.
pub fn subject_from_header<'a>(value: &'a [u8], scheme: Option<&str>) -> Option<&'a str> {
    let v = std::str::from_utf8(value).ok()?.trim();
    let v = match scheme {
        None => v,
        Some(scheme) => {
            let (given, rest) = v.split_at_checked(scheme.len())?;
            if !given.eq_ignore_ascii_case(scheme) || !rest.starts_with(' ') {
                return None;
            }
            rest.trim_start()
        }
    };
    (!v.is_empty()).then_some(v)
}

impl Exchanger {
    pub fn new(
        config: &CredentialConfig,
        settings: ExchangeSettings,
        metrics: ExchangeMetrics,
    ) -> Result<Self, String> {
        let client = ProviderClient::new(config.timing.timeout, &config.transport)?;
        let cache = Cache::builder()
            .max_capacity(settings.cache_max_entries)
            .expire_after(EntryExpiry)
            .build();
        let negative = Cache::builder()
            .max_capacity(settings.cache_max_entries)
            .time_to_live(settings.negative_ttl.max(Duration::from_millis(1)))
            .build();
        let rejected = Cache::builder()
            .max_capacity(settings.cache_max_entries)
            .time_to_live(REJECTION_MARK_TTL)
            .build();
        let failing = Cache::builder()
            .max_capacity(settings.cache_max_entries)
            .time_to_live(
                config
                    .timing
                    .max_backoff
                    .max(config.timing.probe_interval)
                    .max(FAILING_CALLER_MEMORY),
            )
            .build();
        let budget = Mutex::new(Budget::new(
            settings.max_exchanges_per_second,
            Instant::now(),
        ));
        let validator = match settings.subject_validation.clone() {
            Some(v) => Some(Arc::new(SubjectValidator::new(
                Arc::from(config.name.as_str()),
                v,
                config.timing.timeout,
                config.timing.min_refresh_interval,
            )?)),
            None => None,
        };
        Ok(Exchanger {
            name: Arc::from(config.name.as_str()),
            identity: exchange_identity(config),
            config: config.clone(),
            settings,
            client,
            cache,
            negative,
            rejected,
            failing,
            budget,
            throttled: AtomicU64::new(0),
            actor: ArcSwapOption::empty(),
            validator,
            rejected_locally: AtomicU64::new(0),
            rejections_kept: AtomicU64::new(0),
            refreshing: Mutex::new(HashMap::new()),
            timing: Timing {
                min_refresh_interval: Duration::ZERO,
                ..config.timing.clone()
            },
            health: Mutex::new(Health::default()),
            probe_slot: tokio::sync::Semaphore::new(1),
            generation: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            negatives: AtomicU64::new(0),
            outcomes: Default::default(),
            metrics,
        })
    }

    pub fn subject_header(&self) -> &http::HeaderName {
        &self.settings.subject_header
    }

    /// What a request without a subject token is told it lacks.
    pub fn subject_wanted(&self) -> String {
        match &self.settings.subject_scheme {
            Some(scheme) => format!(
                "this route needs the caller's token in {} as \"{scheme} <token>\"",
                self.settings.subject_header
            ),
            None => format!(
                "this route needs the caller's token in {}",
                self.settings.subject_header
            ),
        }
    }

    /// The subject token in this caller's `subject_header` value, if it carries one in the
    /// configured scheme.
    pub fn subject_in<'a>(&self, value: &'a [u8]) -> Option<&'a str> {
        subject_from_header(value, self.settings.subject_scheme.as_deref())
    }

    /// The credential `actor` names, if any.
    pub fn actor_name(&self) -> Option<&str> {
        self.settings.actor.as_deref()
    }

    /// The subject issuer's key set, when subjects are validated locally: its background
    /// refresh runs with the credential's refresher.
    pub fn subject_validator(&self) -> Option<&Arc<SubjectValidator>> {
        self.validator.as_ref()
    }

    /// Points `actor` at the credential of that name in the configuration now serving. When
    /// that is another credential than before (a reload replaced it), the tokens exchanged
    /// with the old one's actor token are not served any more.
    pub fn set_actor(&self, actor: Option<Arc<Credential>>) {
        let previous = self.actor.swap(actor.clone());
        let same = match (&previous, &actor) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same && previous.is_some() {
            info!(credential = %self.name, "the actor credential changed; dropping every caller's exchanged token");
            self.flush();
        }
    }

    /// Drops every caller's entry, the refused and failing ones too, and makes sure an
    /// exchange in flight now is not served afterwards.
    fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
        self.negative.invalidate_all();
        self.rejected.invalidate_all();
        self.failing.invalidate_all();
    }

    /// `POST /tokens/NAME/invalidate`: drops every caller's exchanged token, or with
    /// `subject_sha256` (SHA-256 of the raw subject token, see [`subject_digest`]) that one
    /// caller's. Says whether anything was dropped.
    pub async fn invalidate(&self, subject_sha256: Option<&[u8; 32]>) -> bool {
        match subject_sha256 {
            Some(digest) => {
                let key = self.key_of_digest(digest);
                let dropped = self.cache.remove(&key).await.is_some();
                let refused = self.negative.remove(&key).await.is_some();
                self.rejected.remove(&key).await;
                self.failing.remove(&key).await;
                if dropped || refused {
                    info!(credential = %self.name, "one caller's exchanged token invalidated by an operator");
                }
                dropped || refused
            }
            None => {
                self.cache.run_pending_tasks().await;
                self.negative.run_pending_tasks().await;
                let held = self.cache.entry_count() + self.negative.entry_count();
                self.flush();
                info!(credential = %self.name, entries = held, "every caller's exchanged token invalidated by an operator");
                held > 0
            }
        }
    }

    pub fn key(&self, subject: &str) -> Key {
        self.key_of_digest(&subject_digest(subject))
    }

    /// The cache key of the subject whose SHA-256 is `digest`: hashed again with the
    /// credential's identity, so two credentials never share an entry and an operator who
    /// knows a caller's subject hash can name its entry.
    fn key_of_digest(&self, digest: &[u8; 32]) -> Key {
        Sha256::new()
            .chain_update(b"tokenward exchange v2\n")
            .chain_update(self.identity.as_bytes())
            .chain_update(b"\n")
            .chain_update(digest)
            .finalize()
            .into()
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The exchanged token for this caller: cached, or exchanged now (joined with the caller's
    /// other requests), or a refusal.
    pub async fn token(self: &Arc<Self>, subject: &Secret) -> Result<Arc<Token>, Refusal> {
        let key = self.key(subject.expose());
        let now = Instant::now();
        let epoch = self.epoch.load(Ordering::Acquire);
        let cached = self.cache.get(&key).await;
        if cached.as_ref().is_some_and(|e| e.epoch != epoch) {
            // Exchanged before a flush: never served; exchanged again below.
            self.cache.invalidate(&key).await;
        } else if let Some(entry) = cached
            && now < entry.valid_until
        {
            self.count_lookup(0);
            if now >= entry.token.refresh_at && entry.subject_exp.is_none_or(|e| now < e) {
                self.refresh_ahead(key, subject);
            }
            return Ok(entry.token.clone());
        }
        if let Some(refusal) = self.negative.get(&key).await {
            self.count_lookup(2);
            return Err(refusal);
        }
        if let Some(backoff) = self.failing.get(&key).await
            && now < backoff.not_before
        {
            // This caller's exchanges fail; others go on.
            self.count_lookup(2);
            return Err(Refusal::Unavailable(Unavailable {
                credential: self.name.clone(),
                class: "provider_unavailable",
                reason: backoff.reason.clone(),
                retry_after: whole_seconds(backoff.not_before - now),
            }));
        }
        self.count_lookup(1);
        let subject_exp = subject_expiry(subject.expose());
        if subject_exp.is_some_and(|e| e <= now) {
            return Err(Refusal::Rejected);
        }
        if let Some(joined) = self.join_refresh(&key).await {
            return joined.map(|entry| entry.token.clone());
        }
        let me = self.clone();
        let init_subject = subject.clone();
        match self
            .cache
            .try_get_with(key, async move {
                // Inside the single flight: one caller's burst costs one check.
                me.check_subject(&init_subject).await?;
                me.exchange(key, &init_subject, Purpose::Miss).await
            })
            .await
        {
            Ok(entry) => Ok(entry.token.clone()),
            Err(refusal) => Err((*refusal).clone()),
        }
    }

    /// Validates the subject locally when `subject_jwks_url` is set; a token that fails is
    /// never sent to the provider.
    async fn check_subject(&self, subject: &Secret) -> Result<(), Refusal> {
        let Some(validator) = &self.validator else {
            return Ok(());
        };
        match validator.validate(subject.expose()).await {
            Ok(()) => Ok(()),
            Err(SubjectError::Rejected(reason)) => {
                self.rejected_locally.fetch_add(1, Ordering::Relaxed);
                if self.metrics.refusal_log.allow(&reason) {
                    warn!(credential = %self.name, reason = %reason, "subject token failed local validation; not exchanged (logged once a minute per reason; tokenward_log_lines_suppressed_total counts the rest)");
                }
                Err(Refusal::Rejected)
            }
            Err(SubjectError::Unavailable {
                reason,
                retry_after,
            }) => {
                if self.metrics.refusal_log.allow(&reason) {
                    warn!(credential = %self.name, reason = %reason, "cannot validate the subject token (logged once a minute per reason)");
                }
                Err(Refusal::Unavailable(Unavailable {
                    credential: self.name.clone(),
                    class: "provider_unavailable",
                    reason,
                    retry_after,
                }))
            }
        }
    }

    /// The actor credential and its current token, through its own engine (cached, refreshed
    /// and single-flighted like any service token); its refusal is this request's 503.
    async fn actor_token(&self) -> Result<Option<(Arc<Credential>, Arc<Token>)>, Refusal> {
        let Some(name) = self.settings.actor.as_deref() else {
            return Ok(None);
        };
        let Some(actor) = self.actor.load_full() else {
            return Err(Refusal::Unavailable(Unavailable {
                credential: self.name.clone(),
                class: "pending",
                reason: format!("the actor credential {name:?} is not running"),
                retry_after: Duration::from_secs(1),
            }));
        };
        match actor.token().await {
            Ok(token) => Ok(Some((actor, token))),
            Err(u) => {
                warn!(credential = %self.name, actor = name, class = u.class, reason = %u.reason, "no actor token; not exchanging");
                Err(Refusal::Unavailable(Unavailable {
                    credential: self.name.clone(),
                    class: u.class,
                    reason: format!("actor credential {name:?}: {}", u.reason),
                    retry_after: u.retry_after,
                }))
            }
        }
    }

    /// One request to the token endpoint, bounded by the credential's timeout.
    async fn call_provider(
        &self,
        subject: &Secret,
        actor: Option<&(Arc<Credential>, Arc<Token>)>,
    ) -> Result<Grant, ExchangeError> {
        let sent = Instant::now();
        let result = tokio::time::timeout(
            self.config.timing.timeout + Duration::from_secs(1),
            self.config
                .dialect
                .exchange(subject, actor.map(|(_, t)| t.value()), &self.client),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ExchangeError::credential(DialectError::transient(
                "the token exchange timed out",
            )))
        });
        self.metrics.duration.observe(sent.elapsed().as_secs_f64());
        result
    }

    /// The exchange, and when the provider refused tokenward's request while an actor token
    /// went with it, once more with a fresh actor token: the actor's token is the part of the
    /// request most likely to have gone bad (revoked, rotated keys). The actor credential's
    /// own guard keeps a token obtained for such a refusal for `min_refresh_interval`, so a
    /// provider refusing every actor token costs one actor refresh per interval, not one per
    /// caller.
    async fn exchange_with_actor(&self, subject: &Secret) -> Result<(Grant, SentAt), Refused> {
        let actor = self.actor_token().await.map_err(Refused::NotSent)?;
        let sent = SentAt::now();
        let refused = match self.call_provider(subject, actor.as_ref()).await {
            Ok(grant) => return Ok((grant, sent)),
            Err(e) => e,
        };
        let retry = match &actor {
            Some((credential, token))
                if refused.blame == Blame::Credential
                    && !matches!(refused.error.class, ErrorClass::Transient { .. }) =>
            {
                credential.refused(token.generation, "the token endpoint, as actor token")
            }
            _ => false,
        };
        if !retry {
            return Err(self.failed(refused));
        }
        warn!(credential = %self.name, actor = self.settings.actor.as_deref(), error = %refused.error.message, "the provider refused the exchange with the actor token; trying once more with a fresh one");
        let actor = self.actor_token().await.map_err(Refused::NotSent)?;
        let sent = SentAt::now();
        match self.call_provider(subject, actor.as_ref()).await {
            Ok(grant) => Ok((grant, sent)),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// An upstream rejected `token`: drops this caller's entry if it still holds that token (a
    /// late report cannot evict a newer one). As for service tokens, a token that was itself
    /// obtained because of a rejection less than `min_refresh_interval` ago is kept and the
    /// rejection passed on, so an upstream that refuses every token costs one re-exchange per
    /// caller, not one per request. Says whether a new token may now be obtained.
    pub async fn reject(&self, subject: &Secret, token: &Arc<Token>) -> bool {
        let key = self.key(subject.expose());
        match self.cache.get(&key).await {
            Some(entry) if Arc::ptr_eq(&entry.token, token) => {
                if token.after_rejection
                    && token.issued_at.elapsed() < self.config.timing.min_refresh_interval
                {
                    self.rejections_kept.fetch_add(1, Ordering::Relaxed);
                    self.metrics.rejections_kept.inc();
                    warn!(credential = %self.name, generation = token.generation, "upstream rejected a caller's token obtained for its rejection of the previous one; keeping it and passing the rejection on (min_refresh_interval)");
                    return false;
                }
                self.rejected.insert(key, ()).await;
                self.cache.invalidate(&key).await;
                warn!(credential = %self.name, generation = token.generation, "upstream rejected a caller's exchanged token; exchanging again");
                true
            }
            Some(_) => true,
            None => true,
        }
    }

    /// Starts a background exchange for a caller whose token passed its soft threshold, at most
    /// one per caller at a time; the cached token keeps being served meanwhile, and a request
    /// of this caller that finds no usable token while it runs joins it (see
    /// [`Exchanger::join_refresh`]) rather than making a second exchange.
    fn refresh_ahead(self: &Arc<Self>, key: Key, subject: &Secret) {
        if self.held_back(Instant::now()) {
            return;
        }
        let (done, outcome) = watch::channel(None);
        {
            let mut refreshing = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
            if refreshing.contains_key(&key) {
                return;
            }
            refreshing.insert(key, outcome);
        }
        let me = self.clone();
        let subject = subject.clone();
        tokio::spawn(async move {
            let result = me.exchange(key, &subject, Purpose::Refresh).await;
            if let Ok(entry) = &result {
                me.cache.insert(key, entry.clone()).await;
            }
            // Stored first, then announced: a request after this finds the new entry.
            done.send_replace(Some(result));
            me.refreshing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        });
    }

    /// The outcome of this caller's background exchange, when one is under way: a request
    /// whose cached token lapsed just now waits for it instead of exchanging a second time.
    async fn join_refresh(&self, key: &Key) -> RefreshOutcome {
        let mut outcome = self
            .refreshing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)?
            .clone();
        // An error means the task ended without a word (it panicked): exchange as usual.
        let done = outcome.wait_for(Option::is_some).await.ok()?;
        done.clone()
    }

    fn held_back(&self, now: Instant) -> bool {
        self.health().held_back(now)
    }

    fn unavailable(&self) -> Unavailable {
        let h = self.health();
        let wait = h.wait(Instant::now()).unwrap_or(Duration::from_secs(1));
        Unavailable {
            credential: self.name.clone(),
            class: "provider_unavailable",
            reason: h
                .last_error
                .clone()
                .unwrap_or_else(|| "the token exchange is backing off".into()),
            retry_after: whole_seconds(wait),
        }
    }

    /// While the provider has not answered since its last failure (or since the start),
    /// exchanges go one at a time: the others wait for this one's outcome (at most the
    /// exchange's own bound) and go on at once when it was an answer. An outage so costs one
    /// exchange in flight, however many new callers arrive.
    async fn probe_slot(&self) -> Result<Option<tokio::sync::SemaphorePermit<'_>>, Refusal> {
        if self.health().proven {
            return Ok(None);
        }
        let bound = self.config.timing.timeout + Duration::from_secs(1);
        let permit = match tokio::time::timeout(bound, self.probe_slot.acquire()).await {
            Ok(Ok(permit)) => permit,
            _ => return Err(Refusal::Unavailable(self.unavailable())),
        };
        Ok((!self.health().proven).then_some(permit))
    }

    /// Takes one exchange from `max_exchanges_per_second`, or answers 503 with the wait.
    fn admit(&self) -> Result<(), Refusal> {
        let admitted = self
            .budget
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now());
        admitted.map_err(|wait| {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            self.metrics.throttled.inc();
            Refusal::Unavailable(Unavailable {
                credential: self.name.clone(),
                class: "exchange_rate_limited",
                reason: format!(
                    "more than max_exchanges_per_second ({}) new callers",
                    self.settings.max_exchanges_per_second
                ),
                retry_after: whole_seconds(wait),
            })
        })
    }

    /// One provider call for `key`, unless the credential is backing off after failures or
    /// (for a cache miss) over `max_exchanges_per_second`.
    async fn exchange(
        &self,
        key: Key,
        subject: &Secret,
        purpose: Purpose,
    ) -> Result<Arc<Entry>, Refusal> {
        let _slot = self.probe_slot().await?;
        let repeat = self.failing.get(&key).await.is_some();
        // A probe whose request was cancelled (the caller went away) must not keep every other
        // caller out: the flag goes with it.
        let _probe = {
            let mut h = self.health();
            let now = Instant::now();
            if h.held_back(now) || (h.outage && repeat && !h.repeat_may_probe(now)) {
                drop(h);
                return Err(Refusal::Unavailable(self.unavailable()));
            }
            if h.outage {
                h.last_probe_at = Some(now);
            }
            h.probing = h.outage;
            // Built only for a probe: dropping a spare guard here would lock `health` twice.
            h.probing.then(|| ProbeGuard(&self.health))
        };
        match purpose {
            // A cached caller's refresh is not a new caller: a flood of distinct subjects must
            // not starve the callers already served.
            Purpose::Miss => self.admit()?,
            Purpose::Refresh => {
                // A caller whose refreshes fail waits out its back-off like a miss would.
                if let Some(backoff) = self.failing.get(&key).await
                    && Instant::now() < backoff.not_before
                {
                    return Err(Refusal::Unavailable(self.unavailable()));
                }
            }
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let (grant, sent) = match self.exchange_with_actor(subject).await {
            Ok(answer) => answer,
            Err(Refused::Subject(message)) => return Err(self.subject_refused(key, message).await),
            Err(Refused::Failure(e)) => return Err(self.failure(key, e).await),
            Err(Refused::Unusable(message)) => return Err(self.unusable(key, message).await),
            Err(Refused::Claims(message, claims)) => {
                return Err(self.claims_challenge(message, &claims));
            }
            Err(Refused::NotSent(refusal)) => return Err(refusal),
        };
        if grant.access_token.expose().len() > MAX_EXCHANGED_TOKEN_BYTES {
            return Err(self.oversized(key, grant.access_token.expose().len()).await);
        }
        let after_rejection = self.rejected.remove(&key).await.is_some();
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let token = Token::from_grant(
            grant,
            sent,
            &self.config.presentation,
            &self.timing,
            generation,
            after_rejection,
        );
        let token = match token {
            Ok(token) => token,
            Err(e) => return Err(self.unusable(key, e).await),
        };
        self.count_outcome(OUTCOME_SUCCESS);
        if self.health().answered() {
            info!(credential = %self.name, "token exchange works again");
        }
        self.failing.invalidate(&key).await;
        let subject_exp = subject_expiry(subject.expose());
        let valid_until = subject_exp.map_or(token.usable_until, |e| e.min(token.usable_until));
        Ok(Arc::new(Entry {
            token: Arc::new(token),
            epoch,
            valid_until,
            subject_exp,
        }))
    }

    /// Sorts a failed exchange: the caller's refusal, or a failure that is not the caller's.
    fn failed(&self, e: ExchangeError) -> Refused {
        match e.blame {
            Blame::Subject => Refused::Subject(e.error.message),
            Blame::Credential => Refused::Failure(e.error),
            Blame::Unusable => Refused::Unusable(e.error.message),
            Blame::Claims(claims) => Refused::Claims(e.error.message, claims),
        }
    }

    /// Conditional Access refused this caller's token with a claims challenge: passed on for
    /// the app to step the user up, and not remembered (the next token may satisfy it).
    fn claims_challenge(&self, message: String, claims: &str) -> Refusal {
        use base64::Engine;
        self.count_outcome(OUTCOME_REJECTED);
        if self.metrics.refusal_log.allow(&message) {
            info!(credential = %self.name, error = %message, "token exchange answered a claims challenge; passing it to the caller (logged once a minute per reason)");
        }
        self.answered_with(message);
        // MSAL and Entra's own APIs send the claims base64-encoded (standard alphabet, padded).
        Refusal::ClaimsChallenge(Arc::from(
            base64::engine::general_purpose::STANDARD.encode(claims),
        ))
    }

    /// A refusal of the caller's token is an answer: the provider is up.
    fn answered_with(&self, message: String) {
        let mut h = self.health();
        h.answered();
        h.last_error = Some(message);
        h.last_error_at = Some(SystemTime::now());
    }

    /// The provider refused this caller's token: 401, remembered for `negative_ttl`.
    async fn subject_refused(&self, key: Key, message: String) -> Refusal {
        self.count_outcome(OUTCOME_REJECTED);
        // The message names the provider's error (and Entra's codes), never the subject.
        if self.metrics.refusal_log.allow(&message) {
            info!(credential = %self.name, error = %message, "token exchange refused the caller's token (logged once a minute per reason; tokenward_log_lines_suppressed_total counts the rest)");
        }
        self.answered_with(message);
        self.failing.invalidate(&key).await;
        self.negative.insert(key, Refusal::Rejected).await;
        Refusal::Rejected
    }

    /// The provider could not or would not exchange for reasons that are not the caller's: a
    /// 503, nothing remembered against this caller's token. While the failures are this
    /// caller's alone it backs off alone; once they span several callers the credential does.
    async fn failure(&self, key: Key, e: DialectError) -> Refusal {
        let retry_after = match e.class {
            ErrorClass::Transient { retry_after } => retry_after,
            _ => None,
        };
        self.count_outcome(if e.class == ErrorClass::Fatal {
            OUTCOME_FATAL
        } else {
            OUTCOME_TRANSIENT
        });
        let timing = &self.config.timing;
        let now = Instant::now();
        // A caller that failed before (its back-off still remembered) is a repeat: its subject
        // makes the provider fail, and it does not count towards an outage again. Otherwise one
        // caller holding three such subjects could hold every other caller in the
        // credential-wide back-off, again and again.
        let repeat = self.failing.get(&key).await.is_some();
        let failed = self.health().failed(
            key,
            repeat,
            now,
            timing.min_refresh_interval,
            // Callers without a token wait for the provider's return: it must be noticed
            // within `probe_interval`, as for a service credential holding no token.
            timing.probe_interval,
            retry_after,
            &e.message,
        );
        match failed {
            Failed::Caller => {
                if self.metrics.refusal_log.allow(&e.message) {
                    warn!(credential = %self.name, error = %e.message, "token exchange failed for one caller; backing that caller off (logged once a minute per reason)");
                }
                self.back_off_caller(key, now, retry_after, e.message).await
            }
            Failed::OutageBegan => {
                warn!(credential = %self.name, error = %e.message, callers = CALLERS_FOR_OUTAGE, "token exchange failures span several callers; backing off the credential");
                // The callers whose failures began it keep their own (first, short) back-off:
                // if their subjects, not the provider, are at fault, the next probe is another
                // caller's, which ends the back-off as soon as the provider answers it.
                let _ = self.back_off_caller(key, now, retry_after, e.message).await;
                Refusal::Unavailable(self.unavailable())
            }
            Failed::OutageGoesOn => {
                warn!(credential = %self.name, error = %e.message, "token exchange failed; backing off");
                // The probing caller backs off too (its first step is short, and the cap is
                // `probe_interval`): if its subject is what fails, it must not win every probe
                // while other callers wait; its next try is a repeat's.
                let _ = self.back_off_caller(key, now, retry_after, e.message).await;
                Refusal::Unavailable(self.unavailable())
            }
        }
    }

    /// An answer that cannot be used (a token already expired by its `expires_in`, a body that
    /// is no token response): this caller's failure alone, whoever else is served.
    async fn unusable(&self, key: Key, message: String) -> Refusal {
        self.count_outcome(OUTCOME_FATAL);
        if self.metrics.refusal_log.allow(&message) {
            warn!(credential = %self.name, error = %message, "token exchange answered a token that cannot be used; backing this caller off (logged once a minute per reason)");
        }
        // Still an answer: the provider is up.
        self.answered_with(message.clone());
        self.back_off_caller(key, Instant::now(), None, message)
            .await
    }

    /// Backs one caller off (capped at `probe_interval`: it holds no token), and its 503.
    async fn back_off_caller(
        &self,
        key: Key,
        now: Instant,
        retry_after: Option<Duration>,
        reason: String,
    ) -> Refusal {
        let previous = self.failing.get(&key).await;
        let backoff = CallerBackoff::next(
            previous.as_ref(),
            now,
            self.config.timing.probe_interval,
            retry_after,
            reason,
        );
        let refusal = Refusal::Unavailable(Unavailable {
            credential: self.name.clone(),
            class: "provider_unavailable",
            reason: backoff.reason.clone(),
            retry_after: whole_seconds(backoff.not_before - now),
        });
        self.failing.insert(key, backoff).await;
        refusal
    }

    /// A token over [`MAX_EXCHANGED_TOKEN_BYTES`]: not cached, and this caller is answered 503
    /// without another exchange for `negative_ttl`. The provider is up, so no back-off.
    async fn oversized(&self, key: Key, len: usize) -> Refusal {
        self.count_outcome(OUTCOME_FATAL);
        let reason = format!(
            "credential {:?}: the exchanged token is {len} bytes, over the {MAX_EXCHANGED_TOKEN_BYTES}-byte bound; not cached",
            &*self.name
        );
        warn!(credential = %self.name, bytes = len, bound = MAX_EXCHANGED_TOKEN_BYTES, "exchanged token too large; refused");
        {
            let mut h = self.health();
            h.last_error = Some(reason.clone());
            h.last_error_at = Some(SystemTime::now());
        }
        let refusal = Refusal::Unavailable(Unavailable {
            credential: self.name.clone(),
            class: "provider_unavailable",
            reason,
            retry_after: Duration::from_secs(
                self.settings.negative_ttl.as_secs_f64().ceil().max(1.0) as u64,
            ),
        });
        self.negative.insert(key, refusal.clone()).await;
        refusal
    }

    fn count_lookup(&self, i: usize) {
        [&self.hits, &self.misses, &self.negatives][i].fetch_add(1, Ordering::Relaxed);
        self.metrics.lookups[i].inc();
    }

    fn count_outcome(&self, i: usize) {
        self.outcomes[i].fetch_add(1, Ordering::Relaxed);
        self.metrics.exchanges[i].inc();
    }

    /// Lets moka finish its pending evictions so the entry count is exact, and publishes it.
    pub async fn settle(&self) {
        self.cache.run_pending_tasks().await;
        self.failing.run_pending_tasks().await;
        self.negative.run_pending_tasks().await;
        self.rejected.run_pending_tasks().await;
        self.update_gauges();
    }

    pub fn update_gauges(&self) {
        self.metrics.entries.set(self.cache.entry_count() as f64);
    }

    /// What `/tokens` shows: counts and the last error, never a token or a subject.
    pub fn status(&self) -> serde_json::Value {
        let hits = self.hits.load(Ordering::Relaxed);
        let misses = self.misses.load(Ordering::Relaxed);
        let negatives = self.negatives.load(Ordering::Relaxed);
        let lookups = hits + misses + negatives;
        let h = self.health();
        let o = |i: usize| self.outcomes[i].load(Ordering::Relaxed);
        serde_json::json!({
            "entries": self.cache.entry_count(),
            "max_entries": self.settings.cache_max_entries,
            "negative_entries": self.negative.entry_count(),
            "lookups": {"hit": hits, "miss": misses, "negative": negatives},
            "hit_ratio": if lookups == 0 { 0.0 } else { hits as f64 / lookups as f64 },
            "exchanges": {
                "success": o(OUTCOME_SUCCESS),
                "rejected": o(OUTCOME_REJECTED),
                "transient_error": o(OUTCOME_TRANSIENT),
                "fatal_error": o(OUTCOME_FATAL),
            },
            "actor": self.settings.actor,
            "subject_rejected_locally": self.rejected_locally.load(Ordering::Relaxed),
            "rejections_kept": self.rejections_kept.load(Ordering::Relaxed),
            "consecutive_failures": h.failures,
            "backing_off": h.outage,
            "failing_callers": h.failing_callers(),
            "callers_backing_off": self.failing.entry_count(),
            "throttled": self.throttled.load(Ordering::Relaxed),
            "next_attempt_in_s": h.wait(Instant::now()).map(|d| d.as_secs_f64()),
            "last_error": h.last_error,
            "last_error_at": h.last_error_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        })
    }
}

/// Retry-After in whole seconds, at least 1.
fn whole_seconds(wait: Duration) -> Duration {
    Duration::from_secs(wait.as_secs_f64().ceil().max(1.0) as u64)
}

/// SHA-256 of the raw subject token (the header value after the scheme): how an operator
/// names one caller to `invalidate?subject_sha256=<hex>` (`printf %s "$TOKEN" | sha256sum`).
pub fn subject_digest(subject: &str) -> [u8; 32] {
    Sha256::digest(subject.as_bytes()).into()
}

/// The subject token's JWT `exp` as an instant, when it has one.
fn subject_expiry(subject: &str) -> Option<Instant> {
    let exp = super::jwt::expiry(subject)?;
    let now = SystemTime::now();
    Some(match exp.duration_since(now) {
        Ok(d) => Instant::now() + d,
        Err(_) => Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_subject_from_the_configured_scheme_only() {
        let bearer = Some("Bearer");
        assert_eq!(subject_from_header(b"Bearer abc", bearer), Some("abc"));
        assert_eq!(subject_from_header(b"bearer  abc ", bearer), Some("abc"));
        assert_eq!(subject_from_header(b"BEARER abc", bearer), Some("abc"));
        for refused in [
            &b"abc"[..],
            b"Bearer ",
            b"",
            b"Bearerish",
            b"Basic dXNlcjpwYXNz",
            b"DPoP eyJ.x.y",
            b"Bearer\tabc",
            b"Bear",
        ] {
            assert_eq!(subject_from_header(refused, bearer), None, "{refused:?}");
        }
        assert_eq!(subject_from_header(b"DPoP eyJ", Some("dpop")), Some("eyJ"));
        assert_eq!(subject_from_header(b" abc ", None), Some("abc"));
        assert_eq!(subject_from_header(b"  ", None), None);
    }
}
