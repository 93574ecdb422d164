//! Where each credential's refresh chain lives, and who may extend it. The engine sees only
//! [`TokenStore`]: [`FileStore`] keeps one host's chains in a directory, [`RedisStore`] shares
//! them (with the current access token) between replicas. Both grant a [`Lease`] — the one right
//! to call the provider for a chain — and fence every write on the version last read, so two
//! writers can never fork a chain.

mod file;
mod metered;
mod redis;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

pub use self::redis::{RedisSettings, RedisStore, decode_encryption_key};
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
}

/// An access token as a shared store keeps it, so a replica can serve what another obtained.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedAccess {
    pub token: Secret,
    pub kind: GrantKind,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
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
