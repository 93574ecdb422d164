//! The per-credential token engine. Requests read the current token lock-free; only when no
//! usable token exists do they join the one *flight* in progress — a spawned task that owns a
//! provider exchange to its end, persisting a rotated refresh token before the token is used —
//! and wait for it with their own deadline. One chain has one writer: in this process a chain
//! lock shared by every generation of the credential (a reload hands it over), across processes
//! and replicas the store's lease, with every write fenced on the version it read.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use rand::Rng;
use tokio::sync::{OwnedMutexGuard, watch};
use tracing::{error, info, warn};

use super::metrics::CredentialMetrics;
use super::model::{SentAt, Token};
use super::refresher::STORE_SYNC_INTERVAL;
use super::store::{
    ChainKey, ChainState, Lease, Lineage, MovedTo, Relation, StoreError, Stored, TokenStore,
};
use crate::config::CredentialConfig;
use crate::dialect::{DialectError, ErrorClass, Grant, GrantKind, Held, ProviderClient};
use crate::secret::Secret;

/// First back-off step; each further failure doubles it, up to the credential's cap.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_FLOOR: Duration = Duration::from_millis(50);
/// What a client is told to wait when the credential has failed for good.
const FATAL_RETRY_AFTER: Duration = Duration::from_secs(30);
/// How many superseded bootstrap values a chain remembers (a rollout reaches every replica
/// long before a few more are made).
const MAX_SUPERSEDED: usize = 8;
/// How many forwarding markers a replica follows in one look (a chain moved on by each of a
/// few changes in a row); more is a loop.
const MAX_HOPS: usize = 4;
/// How often a flight that waits for another holder's lease looks at the store again.
const LEASE_POLL: Duration = Duration::from_millis(100);
/// How long a flight waits for another holder before it gives up (the holder's lease lapses
/// well within this when it dies, and another process's exchange is bounded like ours).
const LEASE_WAIT_EXTRA: Duration = Duration::from_secs(6);
/// How long past its requests' bound a blocking exchange is awaited: the requests end by the
/// bound, so this only cuts off a dialect stuck in a blocking read.
const OBTAIN_GRACE: Duration = Duration::from_secs(1);

/// Why a request cannot get a token right now. `class` is what a client may be told; `reason`
/// (which may name files, variables or the provider's words) goes to the log and `/tokens`.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub credential: Arc<str>,
    pub class: &'static str,
    pub reason: String,
    pub retry_after: Duration,
}

/// How this credential's chain is kept, as `/tokens`, `/readyz` and the metrics report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StoreMode {
    /// One host's state directory.
    File = 0,
    /// The shared store answers: every replica refreshes through it.
    Shared = 1,
    /// The shared store is down; the chain rotates nothing, so this replica refreshes alone.
    Local = 2,
    /// The shared store is down and a refresh would rotate a token the others hold: the
    /// current token is served until the store returns, with no refresh.
    Hold = 3,
}

impl StoreMode {
    pub const ALL: [StoreMode; 4] = [
        StoreMode::File,
        StoreMode::Shared,
        StoreMode::Local,
        StoreMode::Hold,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreMode::File => "file",
            StoreMode::Shared => "shared",
            StoreMode::Local => "local",
            StoreMode::Hold => "hold",
        }
    }

    fn from_u8(v: u8) -> StoreMode {
        StoreMode::ALL
            .into_iter()
            .find(|m| *m as u8 == v)
            .unwrap_or(StoreMode::File)
    }
}

/// The refresh chain as this process knows it. Shared by every generation of a credential (a
/// reload hands it over), and locked by whichever flight extends it.
#[derive(Default)]
pub struct Chain {
    loaded: bool,
    refresh: Option<Secret>,
    origin: Option<String>,
    /// The store version this state was read at or written as (0: the store holds nothing).
    version: u64,
    /// A rotated refresh token the store has not accepted yet (it was down): written back as
    /// soon as it answers.
    unsaved: bool,
    /// Where this state stands in the chain's history (a shared store compares lineages).
    lineage: Option<Lineage>,
    /// Bootstrap values (fingerprints) this chain has superseded.
    superseded: Vec<String>,
    /// When this process, holding no chain, first found the shared store empty: it waits for
    /// the store to settle from then before presenting its bootstrap value.
    found_empty_at: Option<Instant>,
    /// Where the chain lives in a shared store: the key these settings derived, or the one a
    /// forwarding marker sent this process to. `None` until a flight first locates it.
    at: Option<ChainKey>,
    /// The identity these settings derived when the chain was last located: another one now
    /// means the settings (or the bootstrap value) changed, and the chain moves with them.
    derived: Option<String>,
    /// The fingerprint of the bootstrap value bound into `derived` (an unnamed chain's): a
    /// marker saying the chain under that key was superseded supersedes this value.
    bound: Option<String>,
    /// A move decided but not made yet: the next flight makes it under the leases.
    moving: Option<Move>,
    /// Set when this process followed a marker saying its chain was superseded by a new
    /// bootstrap value, until it adopts the new chain: it has nothing of its own to write back.
    followed_rollout: bool,
    /// The markers this process left when it moved the chain, by the key each was left at: a
    /// store that loses its data loses them too, while replicas that have not followed one yet
    /// still hold the chain under its old key and would write it back there and refresh from
    /// it. This process writes them again (see `keep_markers`).
    left_markers: Vec<(ChainKey, ChainState)>,
    /// When `keep_markers` last looked, for the looks taken while a flight waits.
    markers_checked_at: Option<Instant>,
}

/// A chain to carry from one key to another (the settings that name its key changed), or —
/// `superseded` — to leave behind because a new bootstrap value starts another one.
#[derive(Debug, Clone)]
struct Move {
    from: ChainKey,
    superseded: bool,
    /// Whether this process held a point of the chain when the move was decided: then so may
    /// other replicas, and an old key found empty still gets a marker, or they would write
    /// the chain back there.
    holds_history: bool,
}

impl Chain {
    fn adopt(&mut self, stored: &Stored) {
        self.refresh = stored.state.refresh_token.clone();
        self.origin = stored.state.origin.clone();
        self.version = stored.version;
        self.lineage = stored.state.lineage.clone();
        self.superseded = stored.state.superseded.clone();
        self.loaded = true;
        self.unsaved = false;
        self.followed_rollout = false;
    }

    /// Drops the chain for one a new bootstrap value starts: the bootstrap values it grew from
    /// (the one it recorded, and `bound`, the one its key was derived from) are remembered as
    /// superseded, so this process never restarts from them.
    fn supersede(&mut self, bound: Option<String>) {
        for fp in [self.origin.take(), bound].into_iter().flatten() {
            self.superseded.retain(|s| *s != fp);
            self.superseded.push(fp);
        }
        let excess = self.superseded.len().saturating_sub(MAX_SUPERSEDED);
        self.superseded.drain(..excess);
        self.refresh = None;
        self.lineage = None;
        self.version = 0;
        self.loaded = false;
        self.unsaved = false;
        self.found_empty_at = None;
    }

    /// Whether this process knows a point of the chain's history (and so must not take an
    /// empty store's word that nothing newer exists).
    fn holds_history(&self) -> bool {
        self.lineage.is_some()
    }

    /// Whether this process holds a usable chain of its own: a point of its history with a
    /// refresh token to present.
    fn is_live(&self) -> bool {
        self.holds_history() && self.refresh.is_some()
    }

    /// Remembers the marker left at `from` for a move to `to`: the chain lives at `to` now, so
    /// a marker this process left there on an earlier move (a move back) is not its to keep.
    fn left_marker(&mut self, from: &ChainKey, marker: ChainState, to: &ChainKey) {
        self.left_markers
            .retain(|(k, _)| k.identity != from.identity && k.identity != to.identity);
        self.left_markers.push((from.clone(), marker));
        let excess = self.left_markers.len().saturating_sub(MAX_HOPS);
        self.left_markers.drain(..excess);
    }
}

/// What comparing the store's state with this process's chain called for.
enum Reconciled {
    /// A stored token makes the provider call unnecessary.
    Adopted(Arc<Token>),
    /// Nothing may be presented before this instant: the store lost what it knew, or a holder
    /// may still be in its provider call.
    SettleUntil(Instant),
    /// A refresh elsewhere moved the chain on (the newest point there is, as the provider has
    /// just issued it): nothing more to wait for.
    Advanced,
    /// Go on with the chain as it now is.
    Ready,
}

/// Publishes when a provider call began, and that it ended when dropped.
struct CallInProgress<'a>(&'a watch::Sender<Option<Instant>>);

impl<'a> CallInProgress<'a> {
    fn begin(calling: &'a watch::Sender<Option<Instant>>) -> Self {
        calling.send_replace(Some(Instant::now()));
        CallInProgress(calling)
    }
}

impl Drop for CallInProgress<'_> {
    fn drop(&mut self) {
        self.0.send_replace(None);
    }
}

/// How a flight's look at the store under the lease ended.
enum Settled {
    /// A stored token makes the provider call unnecessary.
    Token(Arc<Token>),
    /// The chain lives under another key now (a marker was followed): lease that one.
    Moved,
    /// The store lost this flight's lease while it waited for the store to settle (lost its
    /// data again): another replica may hold it now. Lease again.
    LeaseLost,
    /// Go on to the provider call.
    Ready,
}

/// The key a credential's settings file its chain under now, and the fingerprint of the
/// bootstrap value read for it.
struct Derived {
    key: ChainKey,
    bootstrap: Option<String>,
}

/// Clears the flag when dropped: marks a blocking exchange as running for as long as it does.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A lease as [`Credential::lease`] grants it.
struct Granted {
    /// `None` when the shared store is down and the chain may be refreshed without it.
    lease: Option<Lease>,
    /// The store's version when this flight began waiting for another holder, if it waited.
    waited_from: Option<u64>,
}

/// What a flight was started for: it decides whether a token another process stored will do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// The soft threshold passed: a stored token that is not due yet will do.
    Due,
    /// No usable token: any usable stored token other than the one dropped will do.
    Missing,
    /// An operator or a changed secret asked for a provider call.
    Forced,
}

type Outcome = Result<Arc<Token>, Unavailable>;

/// What the admin endpoints and the scheduler read; written only by flights.
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
    /// The upstream's last refusal of the credentials themselves (an AWS error code such as
    /// `SignatureDoesNotMatch`), and when: a code, never a message.
    pub last_upstream_rejection: Option<(String, SystemTime)>,
}

pub struct Credential {
    name: Arc<str>,
    config: CredentialConfig,
    client: ProviderClient,
    store: Arc<dyn TokenStore>,
    /// The chain's key as the settings name it before any bootstrap value is bound in (a
    /// shared store files an unnamed bootstrap chain by the value too: see [`Self::derive`]).
    base: ChainKey,
    current: ArcSwapOption<Token>,
    /// The token last dropped for a rejection: a shared store's copy of it is not taken back.
    dropped: ArcSwapOption<Token>,
    chain: Arc<tokio::sync::Mutex<Chain>>,
    /// The flight in progress (or the last one, finished).
    flight: Mutex<Option<watch::Receiver<Option<Outcome>>>>,
    generation: AtomicU64,
    /// Set when a rejection dropped the token: the next one is obtained because of it.
    rejected: AtomicBool,
    /// Set while a provider exchange runs on the blocking pool.
    obtaining: Arc<AtomicBool>,
    /// When the provider call in progress began (`None` between calls): a waiter is told to
    /// come back once it has run for `timeout`, while the call itself goes on to its bound.
    calling: watch::Sender<Option<Instant>>,
    mode: AtomicU8,
    status: Mutex<Status>,
    wake: tokio::sync::Notify,
    retired: AtomicBool,
    metrics: CredentialMetrics,
    /// Set for a token-exchange credential: it has no token of its own, only per-caller ones.
    exchanger: Option<Arc<super::Exchanger>>,
}

/// Identifies a token-exchange credential's per-caller tokens: everything its description
/// names (endpoints, client, scope, actor), hashed — the description hash chains were filed
/// under before identities by account. A chain's identity is
/// [`CredentialConfig::chain_identity`], which names the account instead.
pub fn exchange_identity(config: &CredentialConfig) -> String {
    config.legacy_chain_identity()
}

impl Credential {
    /// A credential whose chain is `chain` — a new one, or the one a reloaded predecessor of
    /// the same name held, so the chain passes on rather than forks.
    pub fn new(
        config: CredentialConfig,
        store: Arc<dyn TokenStore>,
        chain: Option<Arc<tokio::sync::Mutex<Chain>>>,
        metrics: CredentialMetrics,
    ) -> Result<Self, String> {
        let client = ProviderClient::new(config.timing.timeout, &config.transport)?;
        let mode = if store.is_shared() {
            StoreMode::Shared
        } else {
            StoreMode::File
        };
        metrics.set_mode(mode);
        let exchanger = match config.dialect.exchange_settings() {
            Some(settings) => Some(Arc::new(super::Exchanger::new(
                &config,
                settings.clone(),
                metrics.exchange.for_credential(&config.name),
            )?)),
            None => None,
        };
        Ok(Credential {
            name: Arc::from(config.name.as_str()),
            base: ChainKey {
                name: config.name.clone(),
                identity: config.chain_identity(),
                // Only a chain grown from a bootstrap value is worth carrying over (and can be
                // told to be this account's: it names the value it grew from).
                legacy: config
                    .dialect
                    .bootstrap_refresh_token()
                    .map(|_| config.legacy_chain_identity()),
            },
            config,
            client,
            store,
            current: ArcSwapOption::empty(),
            dropped: ArcSwapOption::empty(),
            chain: chain.unwrap_or_default(),
            flight: Mutex::new(None),
            generation: AtomicU64::new(0),
            rejected: AtomicBool::new(false),
            obtaining: Arc::new(AtomicBool::new(false)),
            calling: watch::Sender::new(None),
            mode: AtomicU8::new(mode as u8),
            status: Mutex::new(Status::default()),
            wake: tokio::sync::Notify::new(),
            retired: AtomicBool::new(false),
            metrics,
            exchanger,
        })
    }

    pub fn exchanger(&self) -> Option<&Arc<super::Exchanger>> {
        self.exchanger.as_ref()
    }

    /// What a token-exchange credential answers when asked for a token of its own.
    fn per_caller(&self) -> Unavailable {
        Unavailable {
            credential: self.name.clone(),
            class: "per_caller",
            reason: "a token-exchange credential obtains tokens per caller only".into(),
            retry_after: Duration::from_secs(1),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &CredentialConfig {
        &self.config
    }

    /// The chain, for the credential that replaces this one at a reload.
    pub fn chain(&self) -> Arc<tokio::sync::Mutex<Chain>> {
        self.chain.clone()
    }

    fn status(&self) -> MutexGuard<'_, Status> {
        // A panic elsewhere while holding this lock leaves plain data behind: keep using it.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status_snapshot(&self) -> Status {
        self.status().clone()
    }

    pub fn store_mode(&self) -> StoreMode {
        StoreMode::from_u8(self.mode.load(Ordering::Acquire))
    }

    fn set_mode(&self, mode: StoreMode) {
        let before = self.mode.swap(mode as u8, Ordering::AcqRel);
        if before != mode as u8 {
            self.metrics.set_mode(mode);
            match mode {
                StoreMode::Shared | StoreMode::File => {
                    info!(credential = %self.name, mode = mode.as_str(), "token store available again")
                }
                StoreMode::Local => {
                    warn!(credential = %self.name, mode = mode.as_str(), "token store unavailable; refreshing locally (this chain rotates no token)")
                }
                StoreMode::Hold => {
                    warn!(credential = %self.name, mode = mode.as_str(), "token store unavailable; serving the current token without refreshing (a refresh would rotate a token the other replicas hold)")
                }
            }
        }
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
        self.exchanger.is_some() || self.current().is_some()
    }

    /// How long a request waits for a flight before it is told to come back later.
    fn wait_limit(&self) -> Duration {
        self.config.timing.timeout * 2 + Duration::from_secs(1)
    }

    /// A token for a request: the current one, or — when none is usable — a share of the one
    /// flight in progress, waited for no longer than [`Self::wait_limit`].
    pub async fn token(self: &Arc<Self>) -> Outcome {
        if let Some(t) = self.current() {
            return Ok(t);
        }
        if self.exchanger.is_some() {
            return Err(self.per_caller());
        }
        if self.held_back(Instant::now()) {
            return Err(self.unavailable());
        }
        let (rx, joined) = self.flight(Purpose::Missing);
        if joined {
            self.metrics.coalesced.inc();
        }
        self.wait(rx, self.wait_limit()).await
    }

    /// Called by the background refresher when the soft threshold or a back-off ends; returns
    /// when the flight it started or joined ends.
    pub async fn refresh_if_due(self: &Arc<Self>) {
        let now = Instant::now();
        if self.exchanger.is_some() {
            return;
        }
        if self.held_back(now) {
            return;
        }
        if self
            .current
            .load()
            .as_ref()
            .is_some_and(|t| now < t.refresh_at)
        {
            return;
        }
        let (mut rx, _) = self.flight(Purpose::Due);
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Forces one provider call now (an operator's request, a changed secret); clears a fatal
    /// state. Waits no longer than a request would; the flight goes on regardless.
    pub async fn force_refresh(self: &Arc<Self>) -> Outcome {
        if self.exchanger.is_some() {
            return Err(self.per_caller());
        }
        {
            let mut s = self.status();
            s.fatal = false;
            s.not_before = None;
        }
        let (rx, _) = self.flight(Purpose::Forced);
        self.wait(rx, self.wait_limit()).await
    }

    /// Whether the client certificate the token endpoint is called with changed since the
    /// current token was obtained with another: the token is bound to the old one (RFC 8705
    /// §3), and one bound to the new one is needed before the upstream sees the new one.
    pub fn certificate_renewed(&self) -> bool {
        let Some(bound) = self.current.load().as_ref().and_then(|t| t.bound_cert) else {
            return false;
        };
        self.client
            .client_cert_thumbprint()
            .is_some_and(|now| now != bound)
    }

    /// Obtains a token bound to the renewed client certificate (unless a back-off holds
    /// provider calls back); returns when the flight it started or joined ends.
    pub async fn rebind_certificate(self: &Arc<Self>) {
        if self.exchanger.is_some() || self.held_back(Instant::now()) {
            return;
        }
        info!(credential = %self.name, "the client certificate changed; obtaining a token bound to the new one");
        let (mut rx, _) = self.flight(Purpose::Forced);
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Whether this credential's token endpoint is called with a client certificate, whose
    /// files are then watched for a renewal.
    pub fn has_client_certificate(&self) -> bool {
        self.client.client_cert_thumbprint().is_some()
    }

    /// The flight in progress, or a new one for `purpose`; `true` when joining one.
    fn flight(self: &Arc<Self>, purpose: Purpose) -> (watch::Receiver<Option<Outcome>>, bool) {
        let mut slot = self.flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = slot.as_ref() {
            // A finished flight has a value; a crashed one has lost its sender.
            if rx.borrow().is_none() && rx.has_changed().is_ok() {
                return (rx.clone(), true);
            }
        }
        let (tx, rx) = watch::channel(None);
        *slot = Some(rx.clone());
        drop(slot);
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = me.run_flight(purpose).await;
            tx.send_replace(Some(outcome));
        });
        (rx, false)
    }

    /// Waits for the flight's outcome no longer than `within`, nor past `timeout` into a
    /// provider call: a provider that has not answered by then is reported to the waiter as
    /// it always was, while the call goes on to its own bound (and its answer is kept).
    async fn wait(&self, mut rx: watch::Receiver<Option<Outcome>>, within: Duration) -> Outcome {
        let give_up = Instant::now() + within;
        let mut calling = self.calling.subscribe();
        let waited = loop {
            let deadline = match *calling.borrow_and_update() {
                Some(began) => give_up.min(began + self.config.timing.timeout),
                None => give_up,
            };
            tokio::select! {
                outcome = rx.wait_for(Option::is_some) => {
                    return match outcome {
                        Ok(outcome) => match outcome.as_ref() {
                            Some(o) => o.clone(),
                            None => Err(self.unavailable()),
                        },
                        Err(_) => Err(Unavailable {
                            credential: self.name.clone(),
                            class: "provider_unavailable",
                            reason: "the token exchange ended abnormally".into(),
                            retry_after: Duration::from_secs(1),
                        }),
                    };
                }
                // A call began or ended: the deadline moves. (The sender lives as long as this
                // credential, so this never ends the wait.)
                Ok(()) = calling.changed() => continue,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    break if deadline < give_up {
                        self.config.timing.timeout
                    } else {
                        within
                    };
                }
            }
        };
        // Not logged here: the proxy logs each refused request, and a thousand waiters would
        // otherwise log the same line a thousand times.
        Err(Unavailable {
            credential: self.name.clone(),
            class: "provider_timeout",
            reason: format!(
                "no token within {}; the exchange goes on",
                humantime::format_duration(waited)
            ),
            retry_after: Duration::from_secs(1),
        })
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
            self.dropped.store(Some(token.clone()));
            info!(credential = %self.name, generation = token.generation, "token invalidated");
            self.wake.notify_one();
        }
        swapped
    }

    /// Records the upstream's refusal of the credentials by its error code, for `/tokens`.
    pub fn note_upstream_rejection(&self, code: &str) {
        warn!(credential = %self.name, code, "upstream refused the credentials");
        self.status().last_upstream_rejection = Some((code.to_string(), SystemTime::now()));
    }

    /// The upstream rejected token `generation`. The first rejection of a token drops it and a
    /// new one is obtained; only a token that was itself obtained because of a rejection less
    /// than `min_refresh_interval` ago is kept (an upstream that rejects every token must not
    /// make us hammer the provider). Says whether a request that saw the rejection can expect a
    /// different token now.
    pub fn reject(&self, generation: u64) -> bool {
        self.refused(generation, "upstream")
    }

    /// Like [`Credential::reject`], for a refusal by `by` (the upstream, or a token endpoint
    /// that refused this token as another credential's actor token).
    pub fn refused(&self, generation: u64, by: &str) -> bool {
        let Some(current) = self.current.load_full() else {
            return true;
        };
        if current.generation != generation {
            return true;
        }
        if current.after_rejection
            && current.issued_at.elapsed() < self.config.timing.min_refresh_interval
        {
            self.metrics.rejections_kept.inc();
            warn!(credential = %self.name, generation, by, "a token obtained for the rejection of the previous one was rejected too; keeping it and passing the rejection on (min_refresh_interval)");
            return false;
        }
        self.rejected.store(true, Ordering::Release);
        // Losing the compare-and-swap to a concurrent rejection of the same token is fine: either
        // way the token is gone and a new one is on its way.
        if self.invalidate(Some(generation)) {
            warn!(credential = %self.name, generation, by, "the token was rejected; obtaining a new one");
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
        let class = match s.last_error_class {
            None => "pending",
            Some(_) if self.store_mode() == StoreMode::Hold => "store_unavailable",
            Some("fatal_error") => "credentials_rejected",
            Some("relogin") => "refresh_rejected",
            Some(_) => "provider_unavailable",
        };
        Unavailable {
            credential: self.name.clone(),
            class,
            reason,
            retry_after: Duration::from_secs(retry_after.as_secs_f64().ceil().max(1.0) as u64),
        }
    }

    /// When the background refresher should next look at this credential.
    pub fn next_wake(&self) -> Instant {
        let now = Instant::now();
        if self.exchanger.is_some() {
            return now + Duration::from_secs(24 * 3600);
        }
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

    /// Returns once no flight is extending the chain, so a rotated refresh token is persisted
    /// before the process exits.
    pub async fn quiesce(&self) {
        drop(self.chain.lock().await);
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

    /// The key the chain lives under now (the file store files every chain by its name).
    fn key<'a>(&'a self, chain: &'a Chain) -> &'a ChainKey {
        chain.at.as_ref().unwrap_or(&self.base)
    }

    /// The key these settings file the chain under now. An unnamed chain grown from a
    /// bootstrap refresh token is bound to the value read now: the path or variable it is read
    /// from cannot tell two deployments' accounts apart (each mounts its own Secret there), the
    /// value can. A named chain is the operator's name alone.
    fn derive(&self) -> Result<Derived, String> {
        let source = match (
            &self.config.chain,
            self.config.dialect.bootstrap_refresh_token(),
        ) {
            (None, Some(source)) => source,
            _ => {
                return Ok(Derived {
                    key: self.base.clone(),
                    bootstrap: None,
                });
            }
        };
        let value = source
            .resolve()
            .map_err(|e| format!("`refresh_token`: {e}"))?;
        Ok(Derived {
            key: self
                .base
                .with_identity(self.store.bind_identity(&self.base.identity, &value)),
            bootstrap: Some(value.fingerprint()),
        })
    }

    /// Where these settings filed the chain before the operator named it: the key they derive
    /// without `chain`.
    fn unnamed_key(&self) -> Option<ChainKey> {
        let unnamed = self.config.unnamed_chain_identity();
        match self.config.dialect.bootstrap_refresh_token() {
            None => Some(self.base.with_identity(unnamed)),
            Some(source) => source.resolve().ok().map(|value| {
                self.base
                    .with_identity(self.store.bind_identity(&unnamed, &value))
            }),
        }
    }

    /// Where an unnamed chain grown from a bootstrap value was filed under the store key that
    /// `state.encryption_key` replaced: the value's binding is keyed by the store's key, so a
    /// key rotation alone would otherwise start a new chain from a bootstrap value long spent.
    fn key_before_rotation(&self) -> Option<ChainKey> {
        let source = self.config.dialect.bootstrap_refresh_token()?;
        let value = source.resolve().ok()?;
        let before = self
            .store
            .bind_identity_before(&self.base.identity, &value)?;
        Some(self.base.with_identity(before))
    }

    /// Finds the key the chain lives under before a flight reads or writes it. The first look
    /// takes the key the settings derive (a named chain also moves from where the same settings
    /// filed it before it was named: a rolling restart that names a chain). A later look that
    /// derives another key means the settings changed since (a reload) or the bootstrap value
    /// did: the chain moves to the new key — carried, or for a new bootstrap value of an unnamed
    /// chain left behind as superseded — and a marker at the old key sends the replicas still
    /// using it after it. A token held here never goes to a new key without that move.
    fn locate(&self, chain: &mut Chain) -> Result<(), DialectError> {
        let derived = match self.derive() {
            Ok(derived) => derived,
            // Where the chain already lives does not depend on reading the value again (the
            // flight says why it cannot start a chain from it, if it must).
            Err(_) if chain.at.is_some() => return Ok(()),
            Err(e) => return Err(DialectError::fatal(e)),
        };
        let want = derived.key;
        match chain.derived.clone() {
            Some(before) if before == want.identity => return Ok(()),
            None => {
                // Where the same chain was filed before this process: unnamed (a restart that
                // names it), or bound under the store key just replaced (a key rotation).
                let before = if self.config.chain.is_some() {
                    self.unnamed_key()
                } else {
                    self.key_before_rotation()
                };
                if let Some(old) = before.filter(|k| k.identity != want.identity) {
                    chain.moving = Some(Move {
                        from: old,
                        superseded: false,
                        holds_history: false,
                    });
                }
            }
            Some(_) => {
                // A move not made yet (its flight failed) still starts where the chain is.
                let pending = chain.moving.take();
                let from = pending
                    .as_ref()
                    .map_or_else(|| self.key(chain).clone(), |m| m.from.clone());
                let holds_history =
                    chain.holds_history() || pending.as_ref().is_some_and(|m| m.holds_history);
                let rollout = self.config.chain.is_none()
                    && derived.bootstrap.as_ref().is_some_and(|fp| {
                        chain.origin.as_ref().is_some_and(|o| o != fp)
                            && !chain.superseded.contains(fp)
                    });
                if rollout {
                    info!(credential = %self.name, "a new bootstrap refresh token was provided; starting a new chain under its own key, and leaving a marker to it under the old one");
                    chain.supersede(None);
                } else {
                    chain.version = 0;
                }
                let superseded = rollout || pending.as_ref().is_some_and(|m| m.superseded);
                if from.identity != want.identity {
                    if !rollout {
                        info!(credential = %self.name, "the settings that name this chain changed; moving it to its new key");
                    }
                    chain.moving = Some(Move {
                        from,
                        superseded,
                        holds_history,
                    });
                }
            }
        }
        chain.derived = Some(want.identity.clone());
        chain.bound = derived.bootstrap;
        chain.at = Some(want);
        Ok(())
    }

    /// Points the chain at the key a marker names. A marker left by a new bootstrap value
    /// supersedes the chain held here: it is dropped, with the value configured here.
    fn follow(&self, chain: &mut Chain, moved: &MovedTo) {
        let to = self.key(chain).with_identity(moved.identity.clone());
        // The chain lives there again (moved back by another replica): a marker this process
        // left there once is not its to keep any more.
        chain
            .left_markers
            .retain(|(k, _)| k.identity != moved.identity);
        if moved.superseded {
            info!(credential = %self.name, "a new bootstrap refresh token started a new chain on another replica; following it");
            let bound = chain.bound.clone();
            chain.supersede(bound);
            chain.followed_rollout = true;
        } else {
            info!(credential = %self.name, "this chain moved to another key (its settings changed on another replica); following it");
            chain.version = 0;
        }
        chain.at = Some(to);
    }

    /// Loads the chain where it lives, following the markers a moved chain leaves. Outside a
    /// lease: only where this process looks changes.
    async fn load_following(&self, chain: &mut Chain) -> Result<Option<Stored>, StoreError> {
        for _ in 0..=MAX_HOPS {
            let stored = self.store.load(self.key(chain)).await?;
            match stored.as_ref().and_then(|s| s.state.moved_to.clone()) {
                Some(moved) => self.follow(chain, &moved),
                None => return Ok(stored),
            }
        }
        Err(StoreError::Undecodable(
            "the chain's forwarding markers form a loop".into(),
        ))
    }

    /// The lease of `key` (the key a chain moves from), waiting for a holder in its provider
    /// call. A holder that left without writing may still be in its call: its bound is waited
    /// out before the key is read, so its late write is what moves.
    async fn lease_on(&self, key: &ChainKey) -> Result<Lease, DialectError> {
        let deadline = Instant::now() + self.call_bound() + LEASE_WAIT_EXTRA;
        let mut waited_from: Option<u64> = None;
        loop {
            if let Some(lease) = self.store.try_lease(key).await.map_err(moving_failed)? {
                if let Some(before) = waited_from {
                    let stored = self.store.load(key).await.map_err(moving_failed)?;
                    if stored.map_or(0, |s| s.version) == before {
                        tokio::time::sleep(self.call_bound()).await;
                    }
                }
                return Ok(lease);
            }
            if waited_from.is_none() {
                let stored = self.store.load(key).await.map_err(moving_failed)?;
                waited_from = Some(stored.map_or(0, |s| s.version));
            }
            if Instant::now() >= deadline {
                return Err(DialectError::transient(
                    "another process is refreshing the chain under its old key and has not finished; moving it at the next attempt",
                ));
            }
            let jitter = rand::rng().random_range(0..50);
            tokio::time::sleep(LEASE_POLL + Duration::from_millis(jitter)).await;
        }
    }

    /// Makes a move, holding the new key's `lease` and then the old key's: reads the chain
    /// under the old key (its newest point: a holder's write lands first), writes it under the
    /// new key unless that already holds the same chain as far along, then leaves the marker
    /// under the old key, fenced on the version read — from then on no replica refreshes there.
    /// A superseded chain is not carried: only its marker is written, and the new chain
    /// remembers the bootstrap values it grew from.
    async fn carry_over(
        &self,
        chain: &mut Chain,
        pending: &Move,
        lease: Option<&Lease>,
    ) -> Result<(), DialectError> {
        let to = self.key(chain).clone();
        let mut from = pending.from.clone();
        for _ in 0..=MAX_HOPS {
            if from.identity == to.identity {
                return Ok(());
            }
            let held = self.lease_on(&from).await?;
            let source = self.store.load(&from).await.map_err(moving_failed)?;
            let (version, state) = match source {
                Some(s) => match s.state.moved_to {
                    // Moved on already (another replica's settings changed first): carry it
                    // from where it went.
                    Some(moved) => {
                        if moved.superseded && !pending.superseded {
                            let bound = chain.bound.clone();
                            chain.supersede(bound);
                            chain.followed_rollout = true;
                        }
                        from = from.with_identity(moved.identity);
                        continue;
                    }
                    None => (s.version, Some(s.state)),
                },
                None => (0, None),
            };
            let Some(state) = state else {
                // Nothing stored under the old key: a marker keeps the replicas that hold the
                // chain from writing it back there; none is needed when nobody can hold it.
                if pending.holds_history {
                    let marker = self
                        .leave_marker(&from, &held, 0, None, &to, pending.superseded)
                        .await?;
                    chain.left_marker(&from, marker, &to);
                }
                return Ok(());
            };
            if pending.superseded {
                for fp in state.origin.iter().chain(&state.superseded) {
                    chain.superseded.retain(|s| s != fp);
                    chain.superseded.push(fp.clone());
                }
                let excess = chain.superseded.len().saturating_sub(MAX_SUPERSEDED);
                chain.superseded.drain(..excess);
            } else {
                self.write_carried(&to, lease, &state).await?;
            }
            let marker = self
                .leave_marker(
                    &from,
                    &held,
                    version,
                    state.origin.clone(),
                    &to,
                    pending.superseded,
                )
                .await?;
            chain.left_marker(&from, marker, &to);
            info!(credential = %self.name, superseded = pending.superseded, "moved the chain to its new key; a marker under the old key sends the other replicas after it");
            return Ok(());
        }
        Err(DialectError::transient(
            "the chain's forwarding markers in the shared store form a loop",
        ))
    }

    /// Writes a carried state under its new key, unless that holds the same chain as far
    /// along already (another replica carried it first).
    async fn write_carried(
        &self,
        to: &ChainKey,
        lease: Option<&Lease>,
        state: &ChainState,
    ) -> Result<(), DialectError> {
        // A write that meets another writer is tried again on what that one wrote.
        for _ in 0..3 {
            let there = self.store.load(to).await.map_err(moving_failed)?;
            let expected = there.as_ref().map_or(0, |t| t.version);
            let write = match &there {
                None => true,
                Some(t) if t.state.moved_to.is_some() => true,
                Some(t) => carried_is_ahead(state, &t.state),
            };
            if !write {
                return Ok(());
            }
            if self
                .store
                .save(to, lease, expected, state)
                .await
                .map_err(moving_failed)?
                .is_some()
            {
                return Ok(());
            }
        }
        Err(DialectError::transient(
            "the chain's new key kept changing during the move; moving it at the next attempt",
        ))
    }

    /// Writes the marker that sends the replicas still using `from` to `to`, fenced on the
    /// version read under `held`; returns it.
    async fn leave_marker(
        &self,
        from: &ChainKey,
        held: &Lease,
        version: u64,
        origin: Option<String>,
        to: &ChainKey,
        superseded: bool,
    ) -> Result<ChainState, DialectError> {
        let marker = ChainState {
            origin,
            moved_to: Some(MovedTo {
                identity: to.identity.clone(),
                superseded,
            }),
            ..ChainState::default()
        };
        match self
            .store
            .save(from, Some(held), version, &marker)
            .await
            .map_err(moving_failed)?
        {
            Some(_) => Ok(marker),
            None => Err(DialectError::transient(
                "the chain changed under its old key during the move; moving it at the next attempt",
            )),
        }
    }

    /// Writes again the markers this process left when it moved the chain, where the store lost
    /// them (a restart, a flush, a failover): a replica that had not followed one yet must find
    /// it before it refreshes under the old key — it waits for the store to settle first, longer
    /// than a sync interval. Only while the chain still lives where this process holds it (not
    /// moved on, or back, by another replica), and only over nothing or over what such a
    /// replica writes back: a restored point of this chain not ahead of the one held here.
    async fn keep_markers(&self, chain: &mut Chain) {
        if chain.left_markers.is_empty() {
            return;
        }
        chain.markers_checked_at = Some(Instant::now());
        let Some(lineage) = chain.lineage.clone() else {
            return;
        };
        let here = self.key(chain).clone();
        match self.store.load(&here).await {
            Ok(Some(s)) if s.state.moved_to.is_some() => return,
            Ok(_) => {}
            Err(_) => return,
        }
        for (key, marker) in &chain.left_markers {
            if key.identity == here.identity {
                continue;
            }
            let lost = match self.store.load(key).await {
                Ok(None) => true,
                Ok(Some(s)) => {
                    s.state.moved_to.is_none()
                        && s.state.restored_at.is_some()
                        && matches!(
                            Lineage::relation(Some(&lineage), s.state.lineage.as_ref()),
                            Relation::Same | Relation::Older
                        )
                }
                Err(_) => false,
            };
            if lost && let Ok(Some(_)) = self.store.restore_marker(key, marker, &lineage).await {
                warn!(credential = %self.name, "the shared store lost the marker this replica left where the chain moved from; wrote it again, so replicas still there follow the chain");
            }
        }
    }

    /// `keep_markers` at most once a second, for a flight that waits (for a lease, for the
    /// store to settle) while the periodic comparison is skipped: the replicas at an old key
    /// refresh once the store has settled, so its markers must be back before then.
    async fn keep_markers_while_waiting(&self, chain: &mut Chain) {
        if chain
            .markers_checked_at
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            self.keep_markers(chain).await;
        }
    }

    /// Brings this process and a shared store in line outside any refresh: adopts a newer
    /// token another replica stored, writes back a rotated refresh token the store missed
    /// while it was down, and repopulates a store that lost its data (a restart), all without
    /// a provider call. Skipped while a flight holds the chain.
    pub async fn sync_with_store(&self) {
        if !self.store.is_shared() {
            return;
        }
        let Ok(mut chain) = self.chain.clone().try_lock_owned() else {
            return;
        };
        // Until a flight has located the chain (and made any move its settings call for) there
        // is nothing to compare: a write now could carry this process's state to a new key
        // without the move, while other replicas still refresh under the old one.
        if chain.at.is_none() || chain.moving.is_some() {
            return;
        }
        match self.load_following(&mut chain).await {
            Err(e) => self.store_down(&chain, &e),
            // The store went back (a failover, a restored backup): never adopt what is behind;
            // write this replica's newer state back, which only ever moves it forward.
            Ok(Some(stored)) if self.relation(&chain, &stored) == Relation::Older => {
                warn!(credential = %self.name, "the shared store holds an older point of this chain; writing this replica's state back");
                self.write_back_forward(&mut chain, None, stored.version)
                    .await;
            }
            Ok(Some(stored)) if chain.unsaved && stored.version == chain.version => {
                self.write_back(&mut chain, stored.version).await
            }
            Ok(Some(stored)) => {
                self.set_mode(StoreMode::Shared);
                let relation = self.relation(&chain, &stored);
                if relation == Relation::Same {
                    chain.version = stored.version;
                } else if stored.version != chain.version || relation == Relation::Newer {
                    if chain.unsaved {
                        error!(credential = %self.name, "the shared store moved on while it was unreachable; the rotated refresh token held here is dropped for the stored chain");
                    }
                    chain.adopt(&stored);
                    let newer = match (&stored.state.access, self.current.load().as_ref()) {
                        (Some(a), Some(t)) => a.token != *t.value() && a.issued_at > t.issued_wall,
                        (Some(_), None) => true,
                        (None, _) => false,
                    };
                    if newer {
                        let _ = self.adopt_stored(&stored, Purpose::Missing);
                    }
                }
            }
            // Sent here by a new bootstrap value's chain that is not written yet: this process
            // holds nothing of it to write back.
            Ok(None) if chain.followed_rollout => self.set_mode(StoreMode::Shared),
            // Lost (a restart, a flush): write back what this replica knows; a replica holding a
            // newer point overwrites it, and nobody refreshes before the store settles.
            Ok(None) if chain.holds_history() => {
                self.write_back_forward(&mut chain, None, 0).await;
            }
            Ok(None) if chain.loaded || self.current.load().is_some() => {
                self.write_back(&mut chain, 0).await
            }
            Ok(None) => self.set_mode(StoreMode::Shared),
        }
        self.keep_markers(&mut chain).await;
    }

    /// Writes this process's chain (and token) to the store over version `expected`, under the
    /// lease: a replica refreshing right now must not find its write fenced out by this one.
    async fn write_back(&self, chain: &mut OwnedMutexGuard<Chain>, expected: u64) {
        let key = self.key(chain).clone();
        let lease = match self.store.try_lease(&key).await {
            Ok(Some(lease)) => lease,
            // Another replica is refreshing: its write repopulates the store.
            Ok(None) => return,
            Err(e) => return self.store_down(chain, &e),
        };
        match self.store.load(&key).await {
            // A chain that moved meanwhile is followed at the next sync.
            Ok(Some(stored)) if stored.state.moved_to.is_some() => return,
            Ok(stored) if stored.as_ref().map_or(0, |s| s.version) == expected => {}
            Ok(_) => return,
            Err(e) => return self.store_down(chain, &e),
        }
        let state = ChainState {
            refresh_token: chain.refresh.clone(),
            origin: chain.origin.clone(),
            access: self.current.load().as_ref().map(|t| t.to_shared()),
            lineage: chain.lineage.clone(),
            restored_at: (expected == 0).then(SystemTime::now),
            superseded: chain.superseded.clone(),
            failure: None,
            moved_to: None,
        };
        match self.store.save(&key, Some(&lease), expected, &state).await {
            Ok(Some(version)) => {
                chain.version = version;
                chain.unsaved = false;
                chain.loaded = true;
                self.set_mode(StoreMode::Shared);
                info!(credential = %self.name, "wrote this replica's chain back to the shared store");
            }
            // Another replica wrote first: the next sync adopts its state.
            Ok(None) => self.set_mode(StoreMode::Shared),
            Err(e) => self.store_down(chain, &e),
        }
    }

    /// Records a failure that stops the chain in the shared store, under the lease, so the
    /// other replicas stop too; the chain itself is left as it was.
    async fn share_failure(&self, chain: &mut Chain, lease: Option<&Lease>, e: &DialectError) {
        let state = ChainState {
            refresh_token: chain.refresh.clone(),
            origin: chain.origin.clone(),
            access: self.current.load().as_ref().map(|t| t.to_shared()),
            lineage: chain.lineage.clone(),
            restored_at: None,
            superseded: chain.superseded.clone(),
            failure: Some(super::store::StoredFailure {
                class: e.class.outcome().to_string(),
                message: e.message.clone(),
                config: self.config.fingerprint.clone(),
            }),
            moved_to: None,
        };
        let key = self.key(chain).clone();
        match self.store.save(&key, lease, chain.version, &state).await {
            Ok(Some(version)) => chain.version = version,
            Ok(None) => {}
            Err(err) => self.store_down(chain, &err),
        }
    }

    /// The store answered: whatever an earlier failure said, it is in use again.
    fn store_answered(&self) {
        let healthy = if self.store.is_shared() {
            StoreMode::Shared
        } else {
            StoreMode::File
        };
        self.set_mode(healthy);
    }

    /// The store failed: say so, in the mode that says what this replica still does.
    fn store_down(&self, chain: &Chain, e: &StoreError) {
        let mode = if self.rotates(chain) {
            StoreMode::Hold
        } else {
            StoreMode::Local
        };
        if self.store_mode() != mode {
            warn!(credential = %self.name, error = %e, "token store failed");
        }
        self.set_mode(mode);
    }

    /// Whether the next provider call would rotate a refresh token other replicas hold.
    fn rotates(&self, chain: &Chain) -> bool {
        chain.refresh.is_some() || self.config.dialect.bootstrap_refresh_token().is_some()
    }

    /// A stored token installed as this process's current one, if it suits `purpose`.
    fn adopt_stored(&self, stored: &Stored, purpose: Purpose) -> Option<Arc<Token>> {
        let access = stored.state.access.as_ref()?;
        if purpose == Purpose::Forced {
            return None;
        }
        let held = self.current.load_full();
        if held.as_ref().is_some_and(|t| *t.value() == access.token) {
            // The stored token is the one held (and found due, or dropped): no news.
            return None;
        }
        if self
            .dropped
            .load()
            .as_ref()
            .is_some_and(|t| *t.value() == access.token)
        {
            return None;
        }
        let generation = self.generation.load(Ordering::Acquire) + 1;
        let token = match Token::from_shared(
            access,
            &self.config.presentation,
            &self.config.timing,
            generation,
        ) {
            Ok(token) => token,
            Err(super::model::FromShared::Skewed(ahead)) => {
                self.metrics.skewed.inc();
                warn!(credential = %self.name, ahead_ms = ahead.as_millis() as u64, "not adopting a token another replica issued in the future by this replica's clock; the replicas' clocks differ by more than the tolerance");
                return None;
            }
            Err(super::model::FromShared::Invalid(_)) => return None,
        };
        let now = Instant::now();
        let suits = match purpose {
            Purpose::Due => now < token.refresh_at,
            Purpose::Missing | Purpose::Forced => token.is_usable(now),
        };
        if !suits {
            return None;
        }
        let token = Arc::new(token);
        self.install(token.clone());
        info!(credential = %self.name, generation, "adopted the token another replica obtained");
        Some(token)
    }

    fn install(&self, token: Arc<Token>) {
        self.generation.store(token.generation, Ordering::Release);
        self.current.store(Some(token));
        let mut s = self.status();
        s.last_success = Some(SystemTime::now());
        s.consecutive_failures = 0;
        s.not_before = None;
        s.fatal = false;
        drop(s);
        self.wake.notify_one();
    }

    async fn run_flight(self: Arc<Self>, purpose: Purpose) -> Outcome {
        let mut chain = self.chain.clone().lock_owned().await;
        // Another flight (of this credential or of the one it replaced) may have done the work
        // while this one queued for the chain.
        let now = Instant::now();
        match (purpose, self.current.load_full()) {
            (Purpose::Missing, Some(t)) if t.is_usable(now) => return Ok(t),
            (Purpose::Due, Some(t)) if now < t.refresh_at => return Ok(t),
            _ => {}
        }
        match self.exchange(&mut chain, purpose).await {
            Ok(t) => Ok(t),
            Err(e) => Err(self.record_failure(e)),
        }
    }

    /// Takes the chain's lease, adopting what another holder stores while waiting for it.
    /// `Ok(Err(token))` when a stored token made the provider call unnecessary; `Ok(Ok(None))`
    /// when the shared store is down and this chain may be refreshed without it.
    async fn lease(
        &self,
        chain: &mut Chain,
        purpose: Purpose,
    ) -> Result<Result<Granted, Arc<Token>>, DialectError> {
        // The holder may be settling a store that lost its data before its own provider call.
        let deadline = Instant::now() + self.call_bound() + self.settle_time() + LEASE_WAIT_EXTRA;
        // The store's version when this flight began to wait: unchanged when the lease is
        // ours means the holder left without writing.
        let mut waited_from: Option<u64> = None;
        loop {
            let key = self.key(chain).clone();
            match self.store.try_lease(&key).await {
                Ok(Some(lease)) => {
                    return Ok(Ok(Granted {
                        lease: Some(lease),
                        waited_from,
                    }));
                }
                Ok(None) => {
                    let first = waited_from.is_none();
                    if first {
                        self.metrics.lease("waited").inc();
                    }
                    match self.load_following(chain).await {
                        // The chain moved while this flight waited: wait for its new key.
                        Ok(_) if *self.key(chain) != key => waited_from = None,
                        Ok(stored) => {
                            if first {
                                waited_from = Some(stored.as_ref().map_or(0, |s| s.version));
                            }
                            // The store lost what it knew (or went back) and this flight holds
                            // the chain, so the periodic comparison that would write this
                            // replica's point back is skipped: write it back now, or the holder
                            // settling that store presents an older point of the chain.
                            if self.lost_by_store(chain, stored.as_ref()) {
                                let seen = stored.as_ref().map_or(0, |s| s.version);
                                self.write_back_forward(chain, None, seen).await;
                            }
                            self.keep_markers_while_waiting(chain).await;
                            let newer = stored.as_ref().is_some_and(|s| self.may_adopt(chain, s));
                            if let Some(stored) = stored.filter(|_| newer) {
                                if let Some(t) = self.adopt_stored(&stored, purpose) {
                                    chain.adopt(&stored);
                                    return Ok(Err(t));
                                }
                            }
                        }
                        Err(e) => {
                            return self.without_store(chain, e).map(|lease| {
                                Ok(Granted {
                                    lease,
                                    waited_from: None,
                                })
                            });
                        }
                    }
                    if Instant::now() >= deadline {
                        return Err(DialectError::transient(
                            "another process is refreshing this credential and has not finished",
                        ));
                    }
                    let jitter = rand::rng().random_range(0..50);
                    tokio::time::sleep(LEASE_POLL + Duration::from_millis(jitter)).await;
                }
                Err(e) => {
                    return self.without_store(chain, e).map(|lease| {
                        Ok(Granted {
                            lease,
                            waited_from: None,
                        })
                    });
                }
            }
        }
    }

    /// Re-reads the store under the lease and brings the chain in line with it before a provider
    /// call; returns a token when the store's makes the call unnecessary. Unknown is not
    /// newest: when the store lost what it knew (found empty, or behind this process) or the
    /// lease was taken over from a holder that never wrote, this process writes its own state
    /// back and presents nothing until the store has settled — a newer state another replica
    /// writes back, or the late holder's rotated token, is adopted meanwhile.
    async fn settle_under_lease(
        &self,
        chain: &mut Chain,
        purpose: Purpose,
        lease: Option<&Lease>,
        waited_from: Option<u64>,
    ) -> Result<Settled, DialectError> {
        // A move the settings call for is made first, under this (the new key's) lease and
        // the old key's, before anything is read or presented here.
        if let Some(pending) = chain.moving.take() {
            if let Err(e) = self.carry_over(chain, &pending, lease).await {
                chain.moving = Some(pending);
                return Err(e);
            }
        }
        let key = self.key(chain).clone();
        let mut quiet_until: Option<Instant> = None;
        let mut settled_wait = false;
        let mut first = true;
        loop {
            let stored = match self.store.load(&key).await {
                Ok(Some(stored)) if stored.state.moved_to.is_some() => {
                    // The chain moved on from this key (its settings changed on another
                    // replica): this lease is for the wrong key; take the new one's.
                    if let Some(moved) = &stored.state.moved_to {
                        self.follow(chain, moved);
                    }
                    return Ok(Settled::Moved);
                }
                Ok(stored) => {
                    self.store_answered();
                    stored
                }
                // Degraded but allowed (the chain rotates nothing): carry on.
                Err(e) => {
                    self.without_store(chain, e)?;
                    return Ok(Settled::Ready);
                }
            };
            if first {
                first = false;
                let now_at = stored.as_ref().map_or(0, |s| s.version);
                // The holder we waited for never wrote: it died, or stalled past its lease and
                // may still be in its provider call.
                let taken_over = waited_from == Some(now_at);
                self.metrics
                    .lease(if taken_over { "taken_over" } else { "acquired" })
                    .inc();
                if taken_over {
                    warn!(credential = %self.name, "took over the refresh lease of a holder that did not finish; waiting out its provider call before presenting a refresh token");
                    if self.store.is_shared() && self.rotates(chain) {
                        quiet_until = Some(Instant::now() + self.call_bound());
                    }
                }
            }
            // Another replica's provider call failed for good with these same settings: do not
            // repeat it (a bad password retried by every replica locks the account) unless an
            // operator forces it.
            if let Some((f, s)) = stored
                .as_ref()
                .and_then(|s| s.state.failure.as_ref().map(|f| (f, s)))
            {
                if purpose != Purpose::Forced
                    && f.config == self.config.fingerprint
                    && adopts_stored_failure(chain, &s.state)
                {
                    return Err(DialectError::fatal(format!(
                        "{} (met by another replica; not retried until the configuration changes or a refresh is forced)",
                        f.message
                    )));
                }
            }
            match self.reconcile(chain, stored.as_ref(), purpose, lease).await {
                Reconciled::Adopted(t) => return Ok(Settled::Token(t)),
                // A chain that rotates nothing has no token to spend twice: no need to wait.
                Reconciled::SettleUntil(until) if self.rotates(chain) => {
                    quiet_until = Some(quiet_until.map_or(until, |q| q.max(until)));
                }
                Reconciled::SettleUntil(_) => {}
                Reconciled::Advanced => quiet_until = None,
                Reconciled::Ready => {}
            }
            match quiet_until {
                Some(until) if Instant::now() < until => {
                    self.keep_markers_while_waiting(chain).await;
                    settled_wait = true;
                    tokio::time::sleep(LEASE_POLL.min(until - Instant::now())).await;
                }
                // After a wait for the store to settle, present only under a lease the store
                // still holds for this flight: a store that lost its data again meanwhile lost
                // the lease, and the replica that took it will present its own point.
                _ if settled_wait => {
                    if let Some(lease) = lease {
                        if !self.store.still_holds(&key, lease).await.unwrap_or(false) {
                            warn!(credential = %self.name, "the shared store lost this refresh lease while the store settled; taking it again before presenting a refresh token");
                            return Ok(Settled::LeaseLost);
                        }
                    }
                    return Ok(Settled::Ready);
                }
                _ => return Ok(Settled::Ready),
            }
        }
    }

    /// Compares the store's state with this process's chain (under the lease): adopts a newer
    /// one, writes this one back over an empty or older store, and says how long to wait.
    async fn reconcile(
        &self,
        chain: &mut Chain,
        stored: Option<&Stored>,
        purpose: Purpose,
        lease: Option<&Lease>,
    ) -> Reconciled {
        let Some(stored) = stored else {
            if self.store.is_shared() && chain.holds_history() {
                // The store lost the chain (a restart, a flush, a failover) while this process
                // holds a point of it: another replica may hold a newer one.
                warn!(credential = %self.name, "the shared store has lost this chain; writing this replica's state back and waiting for the store to settle before a refresh");
                return self.write_back_forward(chain, lease, 0).await;
            }
            chain.version = 0;
            chain.loaded = true;
            if self.store.is_shared() && !chain.holds_history() {
                // A chain this process was sent to by a new bootstrap value is not the one an
                // earlier version stored for the value it holds (superseded).
                if !chain.followed_rollout {
                    self.take_up_legacy_chain(chain).await;
                }
                // An empty store is a first use — or a store that just lost the chain (a flush,
                // a restart) while live replicas hold it and this replica holds only its
                // bootstrap value, long spent. Presenting it would revoke the account's family:
                // wait for the store to settle (a live replica writes its chain back within a
                // sync interval) before presenting a bootstrap value never seen in the store.
                if chain.refresh.is_none() && self.rotates(chain) {
                    let since = *chain.found_empty_at.get_or_insert_with(Instant::now);
                    return Reconciled::SettleUntil(since + self.settle_time());
                }
            }
            return Reconciled::Ready;
        };
        let relation = self.relation(chain, stored);
        if self.store.is_shared() && relation == Relation::Older {
            warn!(credential = %self.name, "the shared store went back in this chain's history (a failover or a restore); writing this replica's newer state back and waiting for the store to settle before a refresh");
            return self.write_back_forward(chain, lease, stored.version).await;
        }
        if relation != Relation::Older {
            if let Some(t) = self.adopt_stored(stored, purpose) {
                chain.adopt(stored);
                return Reconciled::Adopted(t);
            }
        }
        match relation {
            Relation::Same => chain.version = stored.version,
            Relation::Newer => chain.adopt(stored),
            // Another chain (a new bootstrap value, a login elsewhere), or one of no lineage.
            Relation::Unrelated | Relation::Older => {
                if !(chain.unsaved && stored.version == chain.version) {
                    chain.adopt(stored);
                }
            }
        }
        match stored.state.restored_at {
            Some(at) => Reconciled::SettleUntil(self.settled_after(at)),
            None if relation == Relation::Newer => Reconciled::Advanced,
            None => Reconciled::Ready,
        }
    }

    /// Carries a chain an earlier version kept (under its old key) across the upgrade — only
    /// one grown from the bootstrap value configured here, so it is this account's chain.
    async fn take_up_legacy_chain(&self, chain: &mut Chain) {
        let Some(Ok(bootstrap)) = self
            .config
            .dialect
            .bootstrap_refresh_token()
            .map(|s| s.resolve())
        else {
            return;
        };
        let fp = bootstrap.fingerprint();
        match self.store.load_legacy(self.key(chain)).await {
            Ok(Some(old)) if old.origin.as_deref() == Some(fp.as_str()) => {
                if let Some(refresh) = old.refresh_token {
                    info!(credential = %self.name, "continuing the chain an earlier version stored");
                    chain.refresh = Some(refresh);
                    chain.origin = Some(fp);
                }
            }
            Ok(_) => {}
            Err(e) => {
                warn!(credential = %self.name, error = %e, "cannot read the chain an earlier version stored; starting from the bootstrap value");
            }
        }
    }

    /// When a store restored at `at` (another replica's clock) has settled, on this clock.
    fn settled_after(&self, at: SystemTime) -> Instant {
        let settled = at + self.settle_time();
        Instant::now()
            + settled
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .min(self.settle_time())
    }

    /// How long a store that lost what it knew needs before anyone refreshes from it: every
    /// live replica syncs (and writes back a newer state) within a sync interval, and a
    /// holder's provider call in flight ends within its bound.
    fn settle_time(&self) -> Duration {
        self.call_bound()
            .max(STORE_SYNC_INTERVAL + Duration::from_secs(1))
    }

    /// The longest a provider exchange of this credential can last.
    fn call_bound(&self) -> Duration {
        self.config.timing.timeout * 2 + Duration::from_secs(1)
    }

    /// Whether the store lost this process's point of the chain: it holds nothing or an older
    /// point, while this process holds history and has no move to make first.
    fn lost_by_store(&self, chain: &Chain, stored: Option<&Stored>) -> bool {
        self.store.is_shared()
            && chain.holds_history()
            && chain.moving.is_none()
            && stored.is_none_or(|s| {
                s.state.moved_to.is_none() && self.relation(chain, s) == Relation::Older
            })
    }

    /// Whether a stored state may replace this process's chain outside a lease: never one
    /// behind it.
    fn may_adopt(&self, chain: &Chain, stored: &Stored) -> bool {
        self.relation(chain, stored) != Relation::Older
    }

    /// How the store's state stands to this process's chain: by lineage within one chain, by
    /// the bootstrap values each has superseded across chains (a chain started from a newer
    /// bootstrap value is newer than the one it replaced).
    fn relation(&self, chain: &Chain, stored: &Stored) -> Relation {
        chain_relation(chain, &stored.state)
    }

    /// Writes this process's state back over an empty store or an older state read at version
    /// `seen` (never over a newer one), marked restored: nobody refreshes from it before the
    /// store settles.
    async fn write_back_forward(
        &self,
        chain: &mut Chain,
        lease: Option<&Lease>,
        seen: u64,
    ) -> Reconciled {
        let restored_at = SystemTime::now();
        let state = ChainState {
            refresh_token: chain.refresh.clone(),
            origin: chain.origin.clone(),
            access: self.current.load().as_ref().map(|t| t.to_shared()),
            lineage: chain.lineage.clone(),
            restored_at: Some(restored_at),
            superseded: chain.superseded.clone(),
            failure: None,
            moved_to: None,
        };
        let key = self.key(chain).clone();
        match self.store.save_forward(&key, lease, seen, &state).await {
            Ok(Some(version)) => {
                chain.version = version;
                chain.unsaved = false;
                chain.loaded = true;
                self.set_mode(StoreMode::Shared);
                info!(credential = %self.name, "wrote this replica's chain back to the shared store");
            }
            // Another replica wrote a newer state first: the next look adopts it.
            Ok(None) => {}
            Err(e) => self.store_down(chain, &e),
        }
        self.keep_markers(chain).await;
        Reconciled::SettleUntil(Instant::now() + self.settle_time())
    }

    /// The store failed before a refresh: go on alone only if that cannot fork the chain.
    fn without_store(&self, chain: &Chain, e: StoreError) -> Result<Option<Lease>, DialectError> {
        self.store_down(chain, &e);
        if self.store.is_shared() && !self.rotates(chain) {
            Ok(None)
        } else if self.store.is_shared() {
            Err(DialectError::transient(format!(
                "{e}; not refreshing a rotating refresh token without it"
            )))
        } else {
            Err(DialectError::transient(e.to_string()))
        }
    }

    /// One exchange under the chain lock: the lease, the store's newest state, the provider
    /// call (two when a dead refresh token calls for a login), the fenced write, the new token.
    async fn exchange(
        &self,
        chain: &mut OwnedMutexGuard<Chain>,
        purpose: Purpose,
    ) -> Result<Arc<Token>, DialectError> {
        if self.store.is_shared() {
            self.locate(chain)?;
        }
        let mut hops = 0;
        let lease = loop {
            let Granted { lease, waited_from } = match self.lease(chain, purpose).await? {
                Ok(granted) => granted,
                Err(adopted) => return Ok(adopted),
            };
            if lease.is_none() {
                break lease;
            }
            match self
                .settle_under_lease(chain, purpose, lease.as_ref(), waited_from)
                .await?
            {
                Settled::Token(t) => return Ok(t),
                Settled::Ready => break lease,
                Settled::Moved | Settled::LeaseLost if hops < MAX_HOPS => hops += 1,
                Settled::LeaseLost => {
                    return Err(DialectError::transient(
                        "the shared store kept losing this flight's refresh lease; trying again at the next attempt",
                    ));
                }
                Settled::Moved => {
                    return Err(DialectError::transient(
                        "the chain's forwarding markers in the shared store form a loop",
                    ));
                }
            }
        };
        self.prepare_chain(chain)?;
        let mut relogged = false;
        loop {
            let held = Held {
                access_token: self.current.load().as_ref().map(|t| t.value().clone()),
                refresh_token: chain.refresh.clone(),
            };
            let sent = SentAt::now();
            // The certificate this exchange presents (looked at now, as the request will):
            // a provider binding the token to it makes it the one the upstream must see.
            let bound_cert = self.client.client_cert_thumbprint();
            let result = self.obtain(held).await;
            self.metrics
                .duration
                .observe(sent.instant.elapsed().as_secs_f64());
            let grant = match result {
                Ok(g) => g,
                Err(e) if e.class == ErrorClass::Relogin && !relogged => {
                    self.metrics.outcome("relogin").inc();
                    warn!(credential = %self.name, error = %e.message, "refresh token rejected; logging in again");
                    relogged = true;
                    let dead = chain.refresh.take();
                    chain.lineage = chain
                        .lineage
                        .as_ref()
                        .map(|l| l.next(dead.as_ref().map(Secret::fingerprint)));
                    self.persist(chain, lease.as_ref(), None).await;
                    continue;
                }
                Err(e) => {
                    if e.class == ErrorClass::Fatal && self.store.is_shared() && lease.is_some() {
                        self.share_failure(chain, lease.as_ref(), &e).await;
                    }
                    return Err(e);
                }
            };
            let rotated = grant
                .refresh_token
                .as_ref()
                .is_some_and(|new| chain.refresh.as_ref() != Some(new));
            let parent = chain.refresh.as_ref().map(Secret::fingerprint);
            // A login starts a new family at the provider, so a new chain here.
            chain.lineage = match (&chain.lineage, grant.kind) {
                (Some(l), GrantKind::Refresh) => Some(l.next(parent)),
                _ => Some(Lineage::birth(parent)),
            };
            if let Some(new) = &grant.refresh_token {
                chain.refresh = Some(new.clone());
            }
            let kind = grant.kind;
            let generation = self.generation.load(Ordering::Acquire) + 1;
            let after_rejection = self.rejected.swap(false, Ordering::AcqRel);
            let token = Token::from_grant(
                grant,
                sent,
                &self.config.presentation,
                &self.config.timing,
                generation,
                after_rejection,
            )
            .map(|mut token| {
                token.bound_cert = bound_cert;
                Arc::new(token)
            })
            .map_err(DialectError::transient);
            if rotated || (self.store.is_shared() && token.is_ok()) {
                // Persisted before it is used: the provider may have revoked the old one.
                let access = token.as_ref().ok().map(|t| t.to_shared());
                self.persist(chain, lease.as_ref(), access).await;
            }
            let token = token?;
            let same = self
                .current
                .load()
                .as_ref()
                .is_some_and(|p| p.value() == token.value());
            self.install(token.clone());
            self.metrics.outcome("success").inc();
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

    /// The dialect's exchange, on the blocking pool: a dialect may read secret files with
    /// blocking calls, and a stalled read must not stall a runtime thread. It runs to its end
    /// even if every waiter gave up, bounded only by its own limit.
    async fn obtain(&self, held: Held) -> Result<Grant, DialectError> {
        // A blocking exchange outlives its flight when a secret read hangs (a FIFO with no
        // writer, a stuck network mount): starting another each retry would strand one
        // blocking-pool thread per retry until the pool — which the file store uses too — is
        // full. One at a time per credential.
        if self.obtaining.swap(true, Ordering::AcqRel) {
            return Err(DialectError::transient(
                "the previous provider exchange has not ended (a secret read may hang); not starting another",
            ));
        }
        let running = ClearOnDrop(self.obtaining.clone());
        let dialect = self.config.dialect.clone();
        let bound = self.call_bound();
        // A refresh token presented is spent the moment the provider rotates it, so its answer
        // — the only copy of the next one — is waited for up to the exchange's bound, not
        // dropped at `timeout`. The bound is the one every other replica allows a holder's call
        // ([`Self::call_bound`]): one that took the lease over presents nothing before it.
        let client = if held.refresh_token.is_some() {
            self.client.until(bound)
        } else {
            self.client.clone()
        };
        // Past the requests' bound only a blocking read (a hung secret file) keeps a dialect.
        let limit = bound + OBTAIN_GRACE;
        let _calling = CallInProgress::begin(&self.calling);
        let runtime = tokio::runtime::Handle::current();
        let call = tokio::task::spawn_blocking(move || {
            let _running = running;
            runtime.block_on(async move { dialect.obtain(&held, &client).await })
        });
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(DialectError::transient(format!(
                "the provider exchange failed: {join}"
            ))),
            Err(_) => Err(DialectError::transient(format!(
                "the provider exchange did not finish within {}",
                humantime::format_duration(limit)
            ))),
        }
    }

    /// Which refresh token to use: the newest of the chain, unless the operator has provided a
    /// bootstrap value this chain did not grow from, which starts a new chain.
    fn prepare_chain(&self, chain: &mut Chain) -> Result<(), DialectError> {
        let Some(source) = self.config.dialect.bootstrap_refresh_token() else {
            return Ok(());
        };
        match source.resolve() {
            Ok(bootstrap) => {
                let fp = bootstrap.fingerprint();
                if chain.origin.as_deref() == Some(fp.as_str()) {
                    return Ok(());
                }
                if chain.superseded.contains(&fp) {
                    // A rollout of a new value has not reached this replica yet: the chain
                    // grew past this one, which the provider has long spent.
                    if chain.refresh.is_none() && chain.followed_rollout {
                        return Err(DialectError::transient(
                            "the bootstrap refresh token configured here was superseded by a newer one (rolled out to another replica first), whose chain is not in the shared store yet",
                        ));
                    }
                    info!(credential = %self.name, "the configured bootstrap refresh token is one this chain has superseded; continuing the chain");
                    return Ok(());
                }
                if let Some(old) = chain.origin.take() {
                    info!(credential = %self.name, "a new bootstrap refresh token was provided; starting a new chain");
                    chain.superseded.retain(|s| *s != old);
                    chain.superseded.push(old);
                    let excess = chain.superseded.len().saturating_sub(MAX_SUPERSEDED);
                    chain.superseded.drain(..excess);
                }
                chain.refresh = Some(bootstrap);
                chain.origin = Some(fp);
                // Born again at the next write: another family, another history.
                chain.lineage = None;
                Ok(())
            }
            Err(e) if chain.refresh.is_none() => {
                Err(DialectError::fatal(format!("`refresh_token`: {e}")))
            }
            Err(e) => {
                warn!(credential = %self.name, error = %e, "cannot read the bootstrap refresh token; continuing the stored chain");
                Ok(())
            }
        }
    }

    /// Writes the chain (and, for a shared store, the new access token) fenced on the version
    /// it was read at. A failed write keeps the chain in memory, to be written back later.
    async fn persist(
        &self,
        chain: &mut Chain,
        lease: Option<&Lease>,
        access: Option<super::store::SharedAccess>,
    ) {
        let state = ChainState {
            refresh_token: chain.refresh.clone(),
            origin: chain.origin.clone(),
            access,
            lineage: chain.lineage.clone(),
            restored_at: None,
            superseded: chain.superseded.clone(),
            failure: None,
            moved_to: None,
        };
        let key = self.key(chain).clone();
        // Forward: a holder whose lease vanished with the store's data (or was taken over while
        // its call was in flight) still lands its rotated token on an empty store or over the
        // state it grew from — the replica that took over waits for exactly this.
        let result = self
            .store
            .save_forward(&key, lease, chain.version, &state)
            .await;
        let stored = {
            let mut s = self.status();
            match result {
                Ok(Some(version)) => {
                    chain.version = version;
                    chain.unsaved = false;
                    chain.loaded = true;
                    s.persist_error = None;
                    drop(s);
                    self.store_answered();
                    true
                }
                Ok(None) => {
                    // Another writer extended the chain after this one read it (this process
                    // stalled past its lease, another replica took it over and refreshed): the
                    // stored chain wins; the next flight reads it. What this refresh obtained is
                    // dropped — and the provider saw one refresh token twice, so a provider that
                    // rotates strictly has likely revoked the family.
                    self.metrics.lease("lost").inc();
                    error!(credential = %self.name, "lost the refresh lease during the provider call: another replica took it over and moved the chain on before this answer could be stored; keeping the stored chain (a provider that rotates strictly may have revoked it)");
                    chain.loaded = false;
                    chain.unsaved = false;
                    s.persist_error = Some("fenced out by a newer write".into());
                    false
                }
                Err(e) => {
                    error!(credential = %self.name, error = %e, "cannot persist the refresh token; it is kept in memory and saved again as soon as the store answers");
                    chain.unsaved = true;
                    s.persist_error = Some(e.to_string());
                    drop(s);
                    self.store_down(chain, &e);
                    false
                }
            }
        };
        // A store that lost its data during the provider call lost this process's markers too:
        // the replicas still at an old key must find them before they settle, not at the next
        // sync.
        if stored {
            self.keep_markers(chain).await;
        }
    }

    fn record_failure(&self, e: DialectError) -> Unavailable {
        self.metrics.outcome(e.class.outcome()).inc();
        let now = Instant::now();
        let held = self.current();
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
                // one there is time, and a struggling provider deserves the space — but never
                // past the moment the token stops being served.
                let cap = if held.is_some() {
                    self.config.timing.max_backoff
                } else {
                    self.config.timing.probe_interval
                };
                let next = now + backoff(s.consecutive_failures, cap, retry_after);
                s.not_before = Some(match &held {
                    Some(t) => next.min(t.usable_until),
                    None => next,
                });
            }
        }
        if e.class == ErrorClass::Fatal {
            error!(credential = %self.name, class = e.class.outcome(), error = %e.message, "token refresh failed; not retrying until the configuration changes or an operator forces a refresh");
        } else {
            warn!(credential = %self.name, class = e.class.outcome(), error = %e.message, serving_current = held.is_some(), "token refresh failed");
        }
        self.wake.notify_one();
        self.unavailable()
    }
}

/// How a stored state stands to a replica's chain: by lineage within one chain, by the
/// bootstrap values each has superseded across chains (a chain started from a newer bootstrap
/// value is newer than the one it replaced).
fn chain_relation(chain: &Chain, stored: &ChainState) -> Relation {
    match Lineage::relation(chain.lineage.as_ref(), stored.lineage.as_ref()) {
        Relation::Unrelated => {
            let theirs = stored.origin.as_ref();
            let ours = chain.origin.as_ref();
            if theirs != ours && ours.is_some_and(|o| stored.superseded.contains(o)) {
                Relation::Newer
            } else if theirs != ours && theirs.is_some_and(|o| chain.superseded.contains(o)) {
                Relation::Older
            } else if chain.is_live()
                && (stored.refresh_token.is_none() || stored.failure.is_some())
            {
                // A dead end of another lineage, or of none (a replica that found the store
                // emptied presented its long-spent bootstrap value), says nothing about this
                // live chain: it is behind it, so this chain is kept and written back over it
                // rather than adopted — or its failure would stop every replica.
                Relation::Older
            } else {
                Relation::Unrelated
            }
        }
        known => known,
    }
}

/// Whether a chain carried to a new key should replace what is there: a later point of the
/// same chain, or a live chain where a dead end of another lies.
fn carried_is_ahead(carried: &ChainState, there: &ChainState) -> bool {
    let dead = |s: &ChainState| s.refresh_token.is_none() || s.failure.is_some();
    match Lineage::relation(there.lineage.as_ref(), carried.lineage.as_ref()) {
        Relation::Newer => true,
        Relation::Same | Relation::Older => false,
        Relation::Unrelated => dead(there) && !dead(carried),
    }
}

/// A store failure in the middle of a move: tried again at the next flight.
fn moving_failed(e: StoreError) -> DialectError {
    DialectError::transient(format!("moving the chain to its new key: {e}"))
}

/// Whether a failure for good recorded with `stored` stops this replica's chain too: only when
/// it was met at this chain's point or further along it, or this replica has no usable chain
/// of its own. A replica holding a live chain of another lineage keeps it.
fn adopts_stored_failure(chain: &Chain, stored: &ChainState) -> bool {
    chain_relation(chain, stored) != Relation::Older
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
    use crate::token::store::StoredFailure;

    fn live_chain() -> Chain {
        Chain {
            loaded: true,
            refresh: Some(Secret::new("rt-live")),
            origin: Some("boot".into()),
            version: 3,
            unsaved: false,
            lineage: Some(Lineage {
                epoch: "e-live".into(),
                counter: 3,
                parent: None,
            }),
            superseded: Vec::new(),
            ..Chain::default()
        }
    }

    /// What a replica that started on an emptied store leaves after presenting the spent
    /// bootstrap value: no refresh token, no lineage, a failure for good.
    fn spent_bootstrap_attempt() -> ChainState {
        ChainState {
            origin: Some("boot".into()),
            failure: Some(StoredFailure {
                class: "fatal_error".into(),
                message: "no usable refresh token".into(),
                config: "cfg".into(),
            }),
            ..ChainState::default()
        }
    }

    #[test]
    fn a_dead_end_of_another_lineage_does_not_stop_a_live_chain() {
        let live = live_chain();
        let dead = spent_bootstrap_attempt();
        // F2b: the live chain is not replaced by (nor stopped by) another attempt's dead end:
        // it is written back over it.
        assert_eq!(chain_relation(&live, &dead), Relation::Older);
        assert!(!adopts_stored_failure(&live, &dead));
        // A failure of another epoch, the chain still holding a token, is not ours either.
        let other = ChainState {
            refresh_token: Some(Secret::new("rt-other")),
            lineage: Some(Lineage::birth(None)),
            ..dead.clone()
        };
        assert!(!adopts_stored_failure(&live, &other));
        // Met at this chain's own point, or further along it: it is this chain's failure.
        let same = ChainState {
            lineage: live.lineage.clone(),
            ..dead.clone()
        };
        assert!(adopts_stored_failure(&live, &same));
        let newer = ChainState {
            lineage: live.lineage.as_ref().map(|l| l.next(None)),
            ..dead.clone()
        };
        assert!(adopts_stored_failure(&live, &newer));
        assert_eq!(chain_relation(&live, &newer), Relation::Newer);
        // A replica with no chain of its own (only its bootstrap value) takes it up.
        assert!(adopts_stored_failure(&Chain::default(), &dead));
        let spent = Chain {
            refresh: None,
            ..live_chain()
        };
        assert!(adopts_stored_failure(&spent, &dead));
        // A live state of another lineage is still another chain, adopted as before.
        let unrelated = ChainState {
            refresh_token: Some(Secret::new("rt-other")),
            lineage: Some(Lineage::birth(None)),
            ..ChainState::default()
        };
        assert_eq!(chain_relation(&live, &unrelated), Relation::Unrelated);
    }

    #[test]
    fn a_carried_chain_replaces_only_an_older_point_or_a_dead_end() {
        let point = |epoch: &str, counter: u64, refresh: Option<&str>| ChainState {
            refresh_token: refresh.map(Secret::new),
            lineage: Some(Lineage {
                epoch: epoch.into(),
                counter,
                parent: None,
            }),
            ..ChainState::default()
        };
        let carried = point("e1", 5, Some("rt-5"));
        // Another replica carried it first, as far or further: kept.
        assert!(!carried_is_ahead(&carried, &point("e1", 5, Some("rt-5"))));
        assert!(!carried_is_ahead(&carried, &point("e1", 6, Some("rt-6"))));
        // An older point of the same chain: replaced.
        assert!(carried_is_ahead(&carried, &point("e1", 4, Some("rt-4"))));
        // Another live chain (the operator's name already in use): kept.
        assert!(!carried_is_ahead(&carried, &point("e2", 9, Some("rt-x"))));
        // A dead end of another chain: replaced by the live one.
        assert!(carried_is_ahead(&carried, &point("e2", 9, None)));
    }

    #[test]
    fn a_superseded_chain_remembers_the_values_it_grew_from() {
        let mut chain = live_chain();
        chain.supersede(Some("bound".into()));
        assert_eq!(chain.superseded, vec!["boot".to_string(), "bound".into()]);
        assert!(chain.refresh.is_none() && chain.lineage.is_none() && chain.origin.is_none());
        assert!(!chain.holds_history());
        // Remembered once each, and only the last few.
        for i in 0..20 {
            chain.origin = Some(format!("v{i}"));
            chain.supersede(Some("bound".into()));
        }
        assert_eq!(chain.superseded.len(), MAX_SUPERSEDED);
        assert_eq!(chain.superseded.last().unwrap(), "bound");
        assert_eq!(chain.superseded.iter().filter(|s| *s == "bound").count(), 1);
    }

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
