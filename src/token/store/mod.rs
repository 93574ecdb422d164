//! Where each credential's refresh chain lives, and who may extend it. The engine sees only
//! [`TokenStore`]: [`FileStore`] keeps one host's chains in a directory, [`RedisStore`] shares
//! them (with the current access token) between replicas. Both grant a [`Lease`] — the one right
//! to call the provider for a chain — and fence every write on the version last read, so two
//! writers can never fork a chain.

mod file;
mod memory;
mod metered;
mod redis;

pub use memory::MemoryOnly;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

pub use self::redis::{DEFAULT_CHAIN_TTL, RedisSettings, RedisStore, decode_encryption_key};
pub use file::FileStore;
pub use metered::MeteredStore;

use crate::config::Config;
use crate::dialect::GrantKind;
use crate::secret::Secret;

/// Names one refresh chain. The file store files it under the credential's name; a shared store
/// under `identity`, a hash of the account the chain belongs to (provider, client and resource
/// owner, or the operator's `chain` name: see `CredentialConfig::chain_identity`), so neither a
/// name nor a secret ever reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainKey {
    pub name: String,
    pub identity: String,
    /// Where a version before chain identities by account filed this chain (a hash of the
    /// dialect's description), read once to carry a rotated chain across the upgrade.
    pub legacy: Option<String>,
}

impl ChainKey {
    /// The same chain's key under another identity (a moved chain's new place).
    pub fn with_identity(&self, identity: String) -> ChainKey {
        ChainKey {
            identity,
            ..self.clone()
        }
    }
}

/// What a chain leaves at its old key when it moves: where it went. A replica still using the
/// old key (its settings not changed yet, or changed by a restart that could not know the old
/// key) follows it instead of refreshing there, so one refresh token is never spent from two
/// keys. Sealed like any state, so only a replica holding the store's key can write one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MovedTo {
    /// The identity of the key the chain now lives under.
    pub identity: String,
    /// Set when the move was a new bootstrap value taking over: the chain left behind is
    /// superseded, not carried, so a follower drops it and continues the new one.
    pub superseded: bool,
}

/// An access token as a shared store keeps it, so a replica can serve what another obtained.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedAccess {
    pub token: Secret,
    pub kind: GrantKind,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    /// Obtained because the upstream rejected the previous token: a replica that adopts it
    /// keeps it through a rejection within `min_refresh_interval` too, so an upstream that
    /// rejects every token costs one provider call, not one per replica.
    pub after_rejection: bool,
}

/// Where a state stands in its chain's history. Replicas compare lineages, never versions: a
/// store that went back (a restart empty, a failover to a replica that missed writes, a
/// restored backup) shows an older lineage than a replica holds, and a replica never replaces
/// its state with one that does not descend from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lineage {
    /// Random at the chain's birth (a bootstrap value taken up, a login): two chains never
    /// share one, so states of different births are never mistaken for one history.
    pub epoch: String,
    /// Grows by one with every write of the chain's state by a refresh.
    pub counter: u64,
    /// Fingerprint of the refresh token this state's replaced, if it replaced one.
    pub parent: Option<String>,
}

/// How a stored state stands to the one a replica holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    /// The same point of the same chain.
    Same,
    /// Further along the same chain: adopt it.
    Newer,
    /// Behind the replica's state on the same chain: the store went back.
    Older,
    /// Another chain (another birth), or one side knows no lineage.
    Unrelated,
}

impl Lineage {
    /// A chain's first state.
    pub fn birth(parent: Option<String>) -> Lineage {
        Lineage {
            epoch: format!("{:032x}", rand::random::<u128>()),
            counter: 1,
            parent,
        }
    }

    /// The state that follows this one.
    pub fn next(&self, parent: Option<String>) -> Lineage {
        Lineage {
            epoch: self.epoch.clone(),
            counter: self.counter + 1,
            parent,
        }
    }

    /// How `stored` stands to `mine`.
    pub fn relation(mine: Option<&Lineage>, stored: Option<&Lineage>) -> Relation {
        match (mine, stored) {
            (Some(m), Some(s)) if m.epoch == s.epoch => match s.counter.cmp(&m.counter) {
                std::cmp::Ordering::Equal => Relation::Same,
                std::cmp::Ordering::Greater => Relation::Newer,
                std::cmp::Ordering::Less => Relation::Older,
            },
            _ => Relation::Unrelated,
        }
    }
}

/// The state of one chain.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChainState {
    /// The newest refresh token; `None` after the provider rejected the chain.
    pub refresh_token: Option<Secret>,
    /// Fingerprint of the operator-provided bootstrap token this chain grew from: a new
    /// bootstrap value (a different fingerprint) starts a new chain.
    pub origin: Option<String>,
    /// The newest access token, where the store shares it (the file store never keeps one).
    pub access: Option<SharedAccess>,
    /// Where this state stands in its chain (a shared store keeps it; the file store, one
    /// host's, does not need it).
    pub lineage: Option<Lineage>,
    /// Set when a replica wrote its own state back into a store that had lost it (found empty
    /// or behind): until the store settles — every live replica has had the time to write back
    /// a newer state, and a holder's provider call in flight the time to end — nobody presents
    /// this state's refresh token.
    pub restored_at: Option<SystemTime>,
    /// Fingerprints of the bootstrap values this chain has superseded (newest last, a few at
    /// most): a replica still configured with one of them continues this chain rather than
    /// restarting from a value the provider has long spent.
    pub superseded: Vec<String>,
    /// Set when a replica's provider call failed for good (bad credentials, a locked account):
    /// the others do not retry it either until the configuration changes or an operator forces
    /// a refresh. A successful refresh clears it.
    pub failure: Option<StoredFailure>,
    /// Set on the marker a moved chain leaves at its old key: nothing else there is in use.
    pub moved_to: Option<MovedTo>,
}

/// A failure that stops the chain, as the replica that met it recorded it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredFailure {
    /// The outcome class (`fatal_error`).
    pub class: String,
    /// What went wrong, as the engine words it (never a secret or a provider's body).
    pub message: String,
    /// The fingerprint of the credential's settings that failed: a replica with other
    /// settings (a fixed password) tries its own.
    pub config: String,
}

/// A chain's state as read, with the version a write must name to replace it.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub version: u64,
    pub state: ChainState,
}

/// The exclusive right to refresh one chain, held until dropped. A shared store's lease expires
/// unless renewed (its holder renews it while it lives), so a dead holder's lease lapses and
/// another replica takes over.
pub struct Lease {
    /// Who holds it: unique per lease, checked by the store on write.
    pub holder: String,
    /// Whatever keeps the lease alive (a locked file, a renewal task); dropping it releases.
    pub(crate) _hold: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("holder", &self.holder)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {path}: {reason}")]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("state file {path} is not valid: {reason}")]
    Corrupt {
        path: std::path::PathBuf,
        reason: String,
    },
    /// The shared store cannot be reached or answered with an error.
    #[error("token store unavailable: {0}")]
    Unavailable(String),
    /// A stored value fails authentication or cannot be decoded (wrong key, tampering).
    #[error("stored state cannot be read: {0}")]
    Undecodable(String),
}

#[async_trait]
pub trait TokenStore: Send + Sync {
    /// Where the state lives, for logs and `check` (never a password).
    fn describe(&self) -> String;

    /// `true` when other processes read and write the same chains (a rotating refresh made
    /// without the store could then lock them out).
    fn is_shared(&self) -> bool;

    /// The chain's state, or `None` when the store holds nothing for it.
    async fn load(&self, key: &ChainKey) -> Result<Option<Stored>, StoreError>;

    /// Takes the right to refresh the chain, or `None` at once when another holder has it.
    async fn try_lease(&self, key: &ChainKey) -> Result<Option<Lease>, StoreError>;

    /// Replaces the chain's state if it is still at version `expected` (0: the store holds
    /// nothing) and `lease` (when given) is still ours or lapsed with no other holder. Returns
    /// the new version, or `None` when fenced out (another writer came first). When this returns
    /// `Ok(Some(_))` the write is durable.
    async fn save(
        &self,
        key: &ChainKey,
        lease: Option<&Lease>,
        expected: u64,
        state: &ChainState,
    ) -> Result<Option<u64>, StoreError>;

    /// The identity a chain of `identity` grown from the bootstrap value `value` is filed under:
    /// a shared store binds the value into it, so two deployments that read their bootstrap
    /// value from one place (one path, one variable) but hold different accounts' values there
    /// never meet at one key. A store that files chains by credential name keeps `identity`.
    fn bind_identity(&self, identity: &str, _value: &Secret) -> String {
        identity.to_string()
    }

    /// The identity `bind_identity` gave the same chain before the store's key was last
    /// replaced (a store that keys the binding, and lists the key it replaced): where such a
    /// chain lived until this process started with the new key.
    fn bind_identity_before(&self, _identity: &str, _value: &Secret) -> Option<String> {
        None
    }

    /// The chain as a version before lineages filed it (`key.legacy`), if the store has it.
    async fn load_legacy(&self, _key: &ChainKey) -> Result<Option<ChainState>, StoreError> {
        Ok(None)
    }

    /// As [`save`](Self::save), and also — whatever the version and the lease — when the store
    /// holds nothing for the chain or an ancestor of `state` (its lineage's epoch with a smaller
    /// counter): a write that only moves the chain forward. A holder whose lease vanished with
    /// the store's data writes its rotated token this way, and so does a replica writing back a
    /// newer state than the store kept. A store without lineages saves as `save` does.
    async fn save_forward(
        &self,
        key: &ChainKey,
        lease: Option<&Lease>,
        expected: u64,
        state: &ChainState,
    ) -> Result<Option<u64>, StoreError> {
        self.save(key, lease, expected, state).await
    }

    /// Whether `lease` on the chain is still its holder's: a shared store that lost its data
    /// (a restart, a flush) lost the lease with it, and another replica may hold it now. A
    /// store whose leases cannot vanish says yes.
    async fn still_holds(&self, _key: &ChainKey, _lease: &Lease) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// Writes `marker` (a moved chain's forwarding marker) again at the key the chain left,
    /// whatever the version and the lease, when the store holds nothing there or a point of the
    /// chain of lineage `over` not ahead of it: what a replica that had not followed the marker
    /// yet wrote back after the store lost it. Never over another chain, a point ahead, or a
    /// marker. Returns the new version, or `None` when it did not write. A store that files
    /// chains by name never moves one.
    async fn restore_marker(
        &self,
        _key: &ChainKey,
        _marker: &ChainState,
        _over: &Lineage,
    ) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
}

/// The store `config` names: Redis when `state.redis` is set, else files in `state.dir`.
/// Opening Redis does not connect (a replica starts while Redis is down); it fails only on
/// settings, such as an encryption key that cannot be read.
pub fn open_store(config: &Config) -> anyhow::Result<Arc<dyn TokenStore>> {
    Ok(match &config.state_redis {
        Some(settings) => Arc::new(RedisStore::open(settings)?),
        None => Arc::new(
            FileStore::open(&config.state_dir).map_err(|e| anyhow::anyhow!("state.dir: {e}"))?,
        ),
    })
}
