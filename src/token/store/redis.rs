//! Chains shared by replicas in Redis (or Valkey): sealed with AES-256-GCM under
//! `state.encryption_key`, filed under the engine's identity hash, with a renewed `SET NX PX`
//! lease and a version checked atomically (Lua) on every write.
//!
//! Redis holds, per chain, `tokenward:v2:{identity}` (a hash: `v` the version a write names,
//! `s` the sealed state, base64 of nonce || ciphertext, and the state's lineage mirrored as `e`
//! its epoch and `n` its counter, for the write fence to compare) and
//! `tokenward:v2:{identity}:lease` (the holder id). The sealed state's associated data is its
//! key name and lineage, so a blob cannot be moved to another chain or passed off as another
//! point of its history. Each write renews the chain's expiry (`state.chain_ttl`), so a chain
//! nobody uses any more (a changed account, a removed credential) does not stay forever. No
//! credential name, token or key reaches Redis in the clear.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{RedisResult, Script};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use async_trait::async_trait;
use base64::Engine;
use secrecy::zeroize::Zeroizing;
use serde::{Deserialize, Serialize};

use super::{
    ChainKey, ChainState, Lease, Lineage, MovedTo, SharedAccess, StoreError, Stored, StoredFailure,
    TokenStore,
};
use crate::dialect::GrantKind;
use crate::secret::{Secret, SecretSource};

/// Every Redis command answers within this, or the operation is `Unavailable`: a dead Redis
/// must never stall a refresh.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// A lease lapses this long after its holder stops renewing it (it renews every third of it).
const LEASE_TTL: Duration = Duration::from_secs(3);
const NONCE_LEN: usize = 12;
const KEY_PREFIX: &str = "tokenward:v2:";
/// Where versions before lineages kept chains (read only, to carry one across the upgrade).
const LEGACY_PREFIX: &str = "tokenward:v1:";
/// How long a chain nobody writes stays in Redis, unless `state.chain_ttl` says otherwise.
pub const DEFAULT_CHAIN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Where the shared store is and how its values are sealed: `[state] redis` and
/// `encryption_key`, validated.
#[derive(Clone)]
pub struct RedisSettings {
    /// As configured; may carry a password, so it is only ever handed to the client.
    url: Secret,
    /// The password, as written and percent-decoded, to scrub from any error text.
    password: Vec<Secret>,
    /// `HOST:PORT/DB`, for logs.
    location: String,
    tls: bool,
    /// `state.redis_username`: an ACL user, for a password given by `password_source`.
    username: Option<String>,
    /// `state.redis_password`: read each time a client is built (at open and by `check`).
    password_source: Option<SecretSource>,
    pub encryption_key: SecretSource,
    /// `state.previous_encryption_keys`: keys `encryption_key` replaced, used only to read.
    pub previous_encryption_keys: Vec<SecretSource>,
    /// `state.chain_ttl`: each write renews the chain's key for this long.
    chain_ttl: Duration,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("at", &self.describe())
            .field("username", &self.username)
            .field("password", &self.password_source)
            .field("encryption_key", &self.encryption_key)
            .field("previous_encryption_keys", &self.previous_encryption_keys)
            .finish()
    }
}

/// A reload compares settings to refuse a change that only a restart applies.
impl PartialEq for RedisSettings {
    fn eq(&self, other: &Self) -> bool {
        let same_password = match (&self.password_source, &other.password_source) {
            (None, None) => true,
            (Some(a), Some(b)) => same_source(a, b),
            _ => false,
        };
        self.url == other.url
            && self.chain_ttl == other.chain_ttl
            && self.username == other.username
            && same_password
            && same_source(&self.encryption_key, &other.encryption_key)
            && self.previous_encryption_keys.len() == other.previous_encryption_keys.len()
            && self
                .previous_encryption_keys
                .iter()
                .zip(&other.previous_encryption_keys)
                .all(|(a, b)| same_source(a, b))
    }
}

fn same_source(a: &SecretSource, b: &SecretSource) -> bool {
    match (a, b) {
        (SecretSource::Literal(a), SecretSource::Literal(b)) => a == b,
        (SecretSource::File(a), SecretSource::File(b)) => a == b,
        (SecretSource::Env(a), SecretSource::Env(b)) => a == b,
        _ => false,
    }
}

impl RedisSettings {
    /// Validates `url` (`redis://` or `rediss://`, `[user:password@]host[:port][/db]`). The
    /// error is the reason, for `state.redis`; it never repeats the URL.
    pub fn new(url: &str, encryption_key: SecretSource) -> Result<RedisSettings, String> {
        if !url.contains("://") {
            return Err("must start with the scheme redis:// or rediss:// (TLS)".into());
        }
        let parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        let tls = match parsed.scheme() {
            "redis" => false,
            "rediss" => true,
            other => {
                return Err(format!(
                    "scheme {other:?} is not redis:// or rediss:// (TLS)"
                ));
            }
        };
        let host = match parsed.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => format!("[{a}]"),
            _ => return Err("has no host".into()),
        };
        let db = match parsed.path().trim_matches('/') {
            "" => 0,
            n => n
                .parse::<u32>()
                .map_err(|_| "the path must be a database number, e.g. /0".to_string())?,
        };
        if parsed.query().is_some() {
            return Err("query parameters are not supported".into());
        }
        if parsed.fragment().is_some() {
            // `#insecure` would turn certificate verification off: use SSL_CERT_FILE instead.
            return Err("fragments (such as #insecure) are not supported".into());
        }
        let mut password = Vec::new();
        if let Some(raw) = parsed.password() {
            password.push(Secret::new(raw));
            if let Ok(decoded) = percent_decode(raw) {
                password.push(Secret::new(decoded));
            }
        }
        let settings = RedisSettings {
            url: Secret::new(url),
            password,
            location: format!("{host}:{}/{db}", parsed.port().unwrap_or(6379)),
            tls,
            username: None,
            password_source: None,
            encryption_key,
            previous_encryption_keys: Vec::new(),
            chain_ttl: DEFAULT_CHAIN_TTL,
        };
        ::redis::Client::open(settings.url.expose())
            .map_err(|e| settings.scrub(format!("not a usable Redis URL: {e}")))?;
        Ok(settings)
    }

    /// Adds `state.redis_username` and `state.redis_password`. The error names the key at
    /// fault and never holds a password: a password may come from the URL or the key, not
    /// both, and a username needs a password from one of them.
    pub fn with_credentials(
        mut self,
        username: Option<String>,
        password: Option<SecretSource>,
    ) -> Result<RedisSettings, (&'static str, String)> {
        let in_url = url::Url::parse(self.url.expose()).ok();
        let url_has_user = in_url.as_ref().is_some_and(|u| !u.username().is_empty());
        let url_has_password = in_url.as_ref().is_some_and(|u| u.password().is_some());
        if password.is_some() && url_has_password {
            return Err((
                "state.redis_password",
                "the `state.redis` URL holds a password too; keep one of them".into(),
            ));
        }
        if username.is_some() && url_has_user {
            return Err((
                "state.redis_username",
                "the `state.redis` URL names a user too; keep one of them".into(),
            ));
        }
        if let Some(name) = &username {
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err((
                    "state.redis_username",
                    "must be a non-empty name without spaces".into(),
                ));
            }
            if password.is_none() && !url_has_password {
                return Err((
                    "state.redis_username",
                    "needs a password: set `state.redis_password`".into(),
                ));
            }
        }
        if let Some(SecretSource::Literal(p)) = &password {
            self.password.push(p.clone());
        }
        self.username = username;
        self.password_source = password;
        Ok(self)
    }

    /// Sets `state.previous_encryption_keys`.
    pub fn with_previous_keys(mut self, keys: Vec<SecretSource>) -> RedisSettings {
        self.previous_encryption_keys = keys;
        self
    }

    /// Reads and decodes each of `state.previous_encryption_keys`; the error names the entry
    /// (`[i]`) and the reason, never the key.
    pub fn previous_keys(&self) -> Result<Vec<Zeroizing<[u8; 32]>>, (usize, String)> {
        self.previous_encryption_keys
            .iter()
            .enumerate()
            .map(|(i, source)| {
                let secret = source.resolve().map_err(|e| (i, e.to_string()))?;
                decode_encryption_key(&secret).map_err(|reason| (i, reason))
            })
            .collect()
    }

    /// Sets `state.chain_ttl`.
    pub fn with_chain_ttl(mut self, ttl: Duration) -> RedisSettings {
        self.chain_ttl = ttl;
        self
    }

    pub fn chain_ttl(&self) -> Duration {
        self.chain_ttl
    }

    /// Reads `state.redis_password`, if set; the error is the reason, for that key.
    pub fn redis_password(&self) -> Result<Option<Secret>, String> {
        self.password_source
            .as_ref()
            .map(|source| source.resolve().map_err(|e| e.to_string()))
            .transpose()
    }

    /// Where `state.redis_password` comes from, for `check` (never the value).
    pub fn password_source(&self) -> Option<&SecretSource> {
        self.password_source.as_ref()
    }

    /// A client for the URL with the configured user and the password as read now. The
    /// error is prefixed with the key at fault and never holds the password.
    fn client(&self) -> Result<::redis::Client, String> {
        use ::redis::IntoConnectionInfo;
        let info = self
            .url
            .expose()
            .into_connection_info()
            .map_err(|e| format!("state.redis: {}", self.scrub(e.to_string())))?;
        let mut redis = info.redis_settings().clone();
        if let Some(name) = &self.username {
            redis = redis.set_username(name);
        }
        if let Some(password) = self
            .redis_password()
            .map_err(|reason| format!("state.redis_password: {reason}"))?
        {
            redis = redis.set_password(password.expose());
        }
        ::redis::Client::open(info.set_redis_settings(redis))
            .map_err(|e| format!("state.redis: {}", self.scrub(e.to_string())))
    }

    /// `redis at HOST:PORT/DB`, with ` (TLS)` for rediss://; never a password.
    pub fn describe(&self) -> String {
        let tls = if self.tls { " (TLS)" } else { "" };
        format!("redis at {}{tls}", self.location)
    }

    /// Reads and decodes the encryption key; the error is the reason, for
    /// `state.encryption_key`, and never holds the key.
    pub fn encryption_key(&self) -> Result<Zeroizing<[u8; 32]>, String> {
        let secret = self.encryption_key.resolve().map_err(|e| e.to_string())?;
        decode_encryption_key(&secret)
    }

    /// Connects and sends PING within `within`: how long it took, or why not.
    pub async fn ping(&self, within: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let client = self.client()?;
        let config = ::redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(within))
            .set_response_timeout(Some(within));
        let attempt = async {
            let mut con = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            ::redis::cmd("PING").query_async::<String>(&mut con).await
        };
        match tokio::time::timeout(within, attempt).await {
            Ok(Ok(_)) => Ok(started.elapsed()),
            Ok(Err(e)) => Err(self.scrub(e.to_string())),
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(within)
            )),
        }
    }

    /// Removes the password from text that may quote it (a client error).
    fn scrub(&self, mut text: String) -> String {
        for p in &self.password {
            if !p.expose().is_empty() {
                text = text.replace(p.expose(), "[REDACTED]");
            }
        }
        text
    }
}

fn percent_decode(raw: &str) -> Result<String, ()> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).map_err(|_| ())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// A 32-byte key written as 64 hex digits or as base64 (standard or URL-safe, padded or not).
/// The error never holds the key.
pub fn decode_encryption_key(secret: &Secret) -> Result<Zeroizing<[u8; 32]>, String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let text = secret.expose().trim();
    let mut key = Zeroizing::new([0u8; 32]);
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                .map_err(|_| "is not valid hex".to_string())?;
        }
        return Ok(key);
    }
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        if let Ok(bytes) = engine.decode(text) {
            let bytes = Zeroizing::new(bytes);
            if bytes.len() == 32 {
                key.copy_from_slice(&bytes);
                return Ok(key);
            }
            return Err(format!(
                "decodes to {} bytes; it must be 32 bytes, as 64 hex digits or base64 \
                 (e.g. `openssl rand -base64 32`)",
                bytes.len()
            ));
        }
    }
    Err("must be 32 bytes, as 64 hex digits or base64 (e.g. `openssl rand -base64 32`)".into())
}

/// The state as sealed: JSON, times in unix milliseconds.
#[derive(Serialize)]
struct SealOut<'a> {
    refresh_token: Option<&'a str>,
    origin: Option<&'a str>,
    access: Option<AccessOut<'a>>,
    lineage: Option<LineageOut<'a>>,
    restored_ms: Option<u64>,
    superseded: &'a [String],
    failure: Option<FailureOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    moved_to: Option<MovedOut<'a>>,
}

#[derive(Serialize)]
struct MovedOut<'a> {
    identity: &'a str,
    superseded: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MovedIn {
    identity: String,
    superseded: bool,
}

#[derive(Serialize)]
struct FailureOut<'a> {
    class: &'a str,
    message: &'a str,
    config: &'a str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailureIn {
    class: String,
    message: String,
    config: String,
}

#[derive(Serialize)]
struct LineageOut<'a> {
    epoch: &'a str,
    counter: u64,
    parent: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineageIn {
    epoch: String,
    counter: u64,
    parent: Option<String>,
}

#[derive(Serialize)]
struct AccessOut<'a> {
    token: &'a str,
    kind: &'static str,
    issued_ms: u64,
    expires_ms: u64,
    after_rejection: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SealIn {
    refresh_token: Option<String>,
    origin: Option<String>,
    access: Option<AccessIn>,
    lineage: Option<LineageIn>,
    restored_ms: Option<u64>,
    #[serde(default)]
    superseded: Vec<String>,
    #[serde(default)]
    failure: Option<FailureIn>,
    #[serde(default)]
    moved_to: Option<MovedIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessIn {
    token: String,
    kind: String,
    issued_ms: u64,
    expires_ms: u64,
    #[serde(default)]
    after_rejection: bool,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Writes the state if the chain is still at the version the writer read (a missing hash is
/// version 0) and the writer's lease, when it names one, was not taken by another holder — or,
/// for a forward write, if the store holds nothing or an ancestor of the state (same epoch, a
/// smaller counter), whatever the version and the lease. Renews the chain's expiry. Returns the
/// new version, 0 when fenced out.
/// KEYS: state, lease. ARGV: expected, holder ("" for none), sealed blob, forward ("1"/"0"),
/// epoch, counter, ttl ms.
static SAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('HGET', KEYS[1], 'v')
local forward = false
if ARGV[4] == '1' then
  if not v then
    forward = true
  elseif redis.call('HGET', KEYS[1], 'e') == ARGV[5]
      and tonumber(redis.call('HGET', KEYS[1], 'n') or '0') < tonumber(ARGV[6]) then
    forward = true
  end
end
if not forward then
  if (v or '0') ~= ARGV[1] then return 0 end
  if ARGV[2] ~= '' then
    local h = redis.call('GET', KEYS[2])
    if h and h ~= ARGV[2] then return 0 end
  end
end
local next = tostring(tonumber(v or '0') + 1)
redis.call('HSET', KEYS[1], 'v', next, 's', ARGV[3], 'e', ARGV[5], 'n', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return tonumber(next)
",
    )
});

/// Writes a moved chain's marker again where the store lost it: when the key holds nothing, or a
/// state of the mover's lineage (epoch) with a counter not above the mover's — a stale replica's
/// write-back. Never over another chain, a newer point or a marker (mirrored epoch ""). Renews
/// the expiry. Returns the new version, 0 when it did not write.
/// KEYS: state. ARGV: sealed marker, mover's epoch, mover's counter, ttl ms.
static RESTORE_MARKER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('HGET', KEYS[1], 'v')
if v then
  if redis.call('HGET', KEYS[1], 'e') ~= ARGV[2]
      or tonumber(redis.call('HGET', KEYS[1], 'n') or '0') > tonumber(ARGV[3]) then
    return 0
  end
end
local next = tostring(tonumber(v or '0') + 1)
redis.call('HSET', KEYS[1], 'v', next, 's', ARGV[1], 'e', '', 'n', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return tonumber(next)
",
    )
});

/// Extends the lease only while its holder still has it. KEYS: lease. ARGV: holder, ttl ms.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
",
    )
});

/// Deletes the lease only if its holder still has it. KEYS: lease. ARGV: holder.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_LUA));

/// How long an abandoned lease request is watched for once Redis answers again (a command
/// queued on a connection made before it was cut may still arrive) — a lease's lifetime, after
/// which it would have lapsed anyway.
const ABANDONED_WATCH: Duration = LEASE_TTL;
/// How long Redis may stay silent before an abandoned lease request is no longer watched.
const ABANDONED_GIVE_UP: Duration = Duration::from_secs(30);
/// The first retry of a release Redis did not answer; each further one waits twice as long, up
/// to [`ABANDONED_RETRY_CAP`] (a Redis that is down for long gets few of them).
const ABANDONED_RETRY: Duration = Duration::from_millis(250);
const ABANDONED_RETRY_CAP: Duration = Duration::from_secs(4);

/// Releases a lease this process asked for and gave up on (`SET NX` unanswered within
/// [`COMMAND_TIMEOUT`]): a paused or slow Redis applies the queued command when it resumes, and
/// would then hold a lease for nobody — every replica would wait for it to lapse and then wait
/// out the takeover's bound for a provider call that never was. The first release goes out at
/// once on the same connection, so Redis runs it right after the `SET`.
fn release_abandoned(
    handle: &tokio::runtime::Handle,
    conn: &ConnectionManager,
    key: String,
    holder: String,
) {
    let mut conn = conn.clone();
    handle.spawn(async move {
        let give_up = Instant::now() + ABANDONED_GIVE_UP;
        let mut answered_at: Option<Instant> = None;
        let mut retry = ABANDONED_RETRY;
        while Instant::now() < give_up {
            // EVAL, not EVALSHA: a script Redis does not know yet would need a second round
            // trip, and the one that matters is the first, queued right behind the `SET`.
            let released = tokio::time::timeout(
                COMMAND_TIMEOUT,
                ::redis::cmd("EVAL")
                    .arg(RELEASE_LUA)
                    .arg(1)
                    .arg(&key)
                    .arg(&holder)
                    .query_async::<i64>(&mut conn),
            )
            .await;
            match released {
                Ok(Ok(1)) => {
                    tracing::info!("released a refresh lease that Redis granted after this process had given up on it");
                    return;
                }
                Ok(Ok(_)) => {
                    let since = *answered_at.get_or_insert_with(Instant::now);
                    if since.elapsed() >= ABANDONED_WATCH {
                        return;
                    }
                    retry = ABANDONED_RETRY;
                }
                _ => retry = (retry * 2).min(ABANDONED_RETRY_CAP),
            }
            tokio::time::sleep(retry).await;
        }
    });
}

/// Chains in Redis, shared by every replica that has the same settings and key.
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The store's own runtime: the connection and lease renewals live on it, whatever runtime
    /// (or none) the caller has, so the store can be opened before pingora starts its own.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    conn: ConnectionManager,
    /// Seals every write and is tried first on every read.
    cipher: Aes256Gcm,
    /// Keys the fingerprint of a bootstrap value that goes into a chain's identity (see
    /// [`TokenStore::bind_identity`]); derived from `state.encryption_key`.
    identity_key: Zeroizing<[u8; 32]>,
    /// The same, derived from the key `state.encryption_key` replaced last
    /// (`state.previous_encryption_keys[0]`): where unnamed bootstrap chains were filed before.
    identity_key_before: Option<Zeroizing<[u8; 32]>>,
    /// `state.previous_encryption_keys`, tried in order when `cipher` cannot open an entry.
    previous: Vec<Aes256Gcm>,
    /// Set once an entry was opened with a previous key (said once in the log).
    read_with_previous: AtomicBool,
    settings: RedisSettings,
    lease_ttl: Duration,
    renew: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("at", &self.inner.settings.describe())
            .finish()
    }
}

fn state_key(key: &ChainKey) -> String {
    format!("{KEY_PREFIX}{}", key.identity)
}

fn lease_key(key: &ChainKey) -> String {
    format!("{KEY_PREFIX}{}:lease", key.identity)
}

/// The associated data: the entry's key name and lineage (as mirrored beside the blob).
fn aad(name: &str, epoch: &str, counter: u64) -> Vec<u8> {
    format!("{name}\0{epoch}\0{counter}").into_bytes()
}

/// The key that fingerprints bootstrap values for chain identities: an HMAC of a fixed label
/// under `state.encryption_key`, so the AES key itself serves one purpose only.
fn identity_key(encryption_key: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&hmac_sha256(
        encryption_key,
        &[b"tokenward chain identity key v1"],
    ));
    out
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac =
        <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// `identity` with the bootstrap `value` bound in under `identity_key` (see
/// [`TokenStore::bind_identity`]).
fn bound_identity(identity_key: &[u8; 32], identity: &str, value: &Secret) -> String {
    let mac = hmac_sha256(
        identity_key,
        &[
            b"tokenward chain bootstrap v1\n",
            identity.as_bytes(),
            b"\n",
            value.expose().as_bytes(),
        ],
    );
    mac[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A state's lineage as mirrored in the hash: `("", 0)` for a state without one.
fn mirror(state: &ChainState) -> (String, u64) {
    state
        .lineage
        .as_ref()
        .map_or((String::new(), 0), |l| (l.epoch.clone(), l.counter))
}

impl RedisStore {
    /// Reads the encryption key and prepares the connection; it does not connect, so a replica
    /// starts (and serves its own tokens) while Redis is down.
    pub fn open(settings: &RedisSettings) -> anyhow::Result<RedisStore> {
        Self::open_with(settings, LEASE_TTL, true)
    }

    fn open_with(
        settings: &RedisSettings,
        lease_ttl: Duration,
        renew: bool,
    ) -> anyhow::Result<RedisStore> {
        let key = settings
            .encryption_key()
            .map_err(|reason| anyhow::anyhow!("state.encryption_key: {reason}"))?;
        let cipher = Aes256Gcm::new_from_slice(&key[..])
            .map_err(|_| anyhow::anyhow!("state.encryption_key: must be 32 bytes"))?;
        let previous_keys = settings.previous_keys().map_err(|(i, reason)| {
            anyhow::anyhow!("state.previous_encryption_keys[{i}]: {reason}")
        })?;
        let identity_key_before = previous_keys.first().map(|key| identity_key(key));
        let previous = previous_keys
            .iter()
            .map(|key| Aes256Gcm::new_from_slice(&key[..]))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| anyhow::anyhow!("state.previous_encryption_keys: must be 32 bytes"))?;
        // The redis crate fixes a connection manager's credentials when it is built (per-attempt
        // credentials need its token-based-authentication feature and more dependencies), so a
        // password file is read here, once: a rotated password needs a restart.
        let client = settings.client().map_err(|e| anyhow::anyhow!(e))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tokenward-redis")
            .enable_all()
            .build()
            .map_err(|e| anyhow::anyhow!("cannot start the Redis client's runtime: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            // Fail fast while Redis is down (the engine degrades); the manager reconnects on
            // the next command after an I/O error.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200));
        let conn = {
            let _in = runtime.enter();
            ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|e| anyhow::anyhow!("state.redis: {}", settings.scrub(e.to_string())))?
        };
        Ok(RedisStore {
            inner: Arc::new(Inner {
                handle: runtime.handle().clone(),
                runtime: Some(runtime),
                conn,
                cipher,
                identity_key: identity_key(&key),
                identity_key_before,
                previous,
                read_with_previous: AtomicBool::new(false),
                settings: settings.clone(),
                lease_ttl,
                renew,
            }),
        })
    }

    /// PING through the store's connection.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.inner.conn.clone();
        self.run("ping", async move {
            ::redis::cmd("PING").query_async::<String>(&mut conn).await
        })
        .await
        .map(|_| ())
    }

    /// Runs one command on the store's runtime, bounded by [`COMMAND_TIMEOUT`].
    async fn run<T: Send + 'static>(
        &self,
        what: &'static str,
        command: impl Future<Output = RedisResult<T>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let task = self
            .inner
            .handle
            .spawn(tokio::time::timeout(COMMAND_TIMEOUT, command));
        match task.await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(e))) => Err(StoreError::Unavailable(
                self.inner
                    .settings
                    .scrub(format!("{what} at {}: {e}", self.inner.settings.location)),
            )),
            Ok(Err(_)) => Err(StoreError::Unavailable(format!(
                "{what} at {}: no answer within {} ms",
                self.inner.settings.location,
                COMMAND_TIMEOUT.as_millis()
            ))),
            Err(e) => Err(StoreError::Unavailable(format!(
                "{what} at {}: {e}",
                self.inner.settings.location
            ))),
        }
    }

    fn seal(&self, name: &str, state: &ChainState) -> Result<String, StoreError> {
        let out = SealOut {
            refresh_token: state.refresh_token.as_ref().map(|s| s.expose()),
            origin: state.origin.as_deref(),
            lineage: state.lineage.as_ref().map(|l| LineageOut {
                epoch: &l.epoch,
                counter: l.counter,
                parent: l.parent.as_deref(),
            }),
            restored_ms: state.restored_at.map(unix_ms),
            superseded: &state.superseded,
            failure: state.failure.as_ref().map(|f| FailureOut {
                class: &f.class,
                message: &f.message,
                config: &f.config,
            }),
            moved_to: state.moved_to.as_ref().map(|m| MovedOut {
                identity: &m.identity,
                superseded: m.superseded,
            }),
            access: state.access.as_ref().map(|a| AccessOut {
                token: a.token.expose(),
                kind: a.kind.as_str(),
                issued_ms: unix_ms(a.issued_at),
                expires_ms: unix_ms(a.expires_at),
                after_rejection: a.after_rejection,
            }),
        };
        let plain = Zeroizing::new(
            serde_json::to_vec(&out)
                .map_err(|_| StoreError::Undecodable("cannot encode the state".into()))?,
        );
        let nonce: [u8; NONCE_LEN] = rand::random();
        let (epoch, counter) = mirror(state);
        let aad = aad(name, &epoch, counter);
        let sealed = self
            .inner
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .map_err(|_| StoreError::Undecodable("cannot seal the state".into()))?;
        let mut blob = Vec::with_capacity(NONCE_LEN + sealed.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        Ok(base64::engine::general_purpose::STANDARD.encode(blob))
    }

    fn unseal(
        &self,
        name: &str,
        (epoch, counter): (&str, u64),
        blob: &[u8],
    ) -> Result<ChainState, StoreError> {
        let state = self.open_sealed(&aad(name, epoch, counter), blob)?;
        if mirror(&state) != (epoch.to_string(), counter) {
            return Err(StoreError::Undecodable(format!(
                "{}: its lineage differs from the one beside it",
                self.inner.settings.location
            )));
        }
        Ok(state)
    }

    /// Decrypts and decodes a sealed state under associated data `aad`.
    fn open_sealed(&self, aad: &[u8], blob: &[u8]) -> Result<ChainState, StoreError> {
        let bad =
            |why: &str| StoreError::Undecodable(format!("{}: {why}", self.inner.settings.location));
        let raw = base64::engine::general_purpose::STANDARD
            .decode(blob)
            .map_err(|_| bad("not base64"))?;
        if raw.len() < NONCE_LEN + 16 {
            return Err(bad("too short"));
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| bad("too short"))?;
        let open = |cipher: &Aes256Gcm| {
            cipher
                .decrypt(&Nonce::from(nonce), Payload { msg: sealed, aad })
                .ok()
        };
        let plain = match open(&self.inner.cipher) {
            Some(plain) => plain,
            None => {
                let plain = self.inner.previous.iter().find_map(open).ok_or_else(|| {
                    bad("fails authentication (a different state.encryption_key, or the entry was altered or moved)")
                })?;
                // Every write seals with the current key, so the entry is re-sealed at its next
                // write (its chain's next refresh); until then the previous key is still needed.
                if !self.inner.read_with_previous.swap(true, Ordering::Relaxed) {
                    tracing::info!(at = %self.inner.settings.location, "read an entry sealed with one of state.previous_encryption_keys; it is sealed with state.encryption_key at its next write");
                }
                plain
            }
        };
        let plain = Zeroizing::new(plain);
        // serde_json's messages can quote the input: say only what kind of problem it was.
        let state: SealIn = serde_json::from_slice(&plain)
            .map_err(|e| bad(&format!("unexpected content ({:?})", e.classify())))?;
        let access = match state.access {
            None => None,
            Some(a) => Some(SharedAccess {
                kind: match a.kind.as_str() {
                    "login" => GrantKind::Login,
                    "refresh" => GrantKind::Refresh,
                    _ => return Err(bad("unknown grant kind")),
                },
                token: Secret::new(a.token),
                issued_at: from_unix_ms(a.issued_ms),
                expires_at: from_unix_ms(a.expires_ms),
                after_rejection: a.after_rejection,
            }),
        };
        let lineage = state.lineage.map(|l| Lineage {
            epoch: l.epoch,
            counter: l.counter,
            parent: l.parent,
        });
        let state = ChainState {
            refresh_token: state.refresh_token.map(Secret::new),
            origin: state.origin,
            access,
            lineage,
            restored_at: state.restored_ms.map(from_unix_ms),
            superseded: state.superseded,
            failure: state.failure.map(|f| StoredFailure {
                class: f.class,
                message: f.message,
                config: f.config,
            }),
            moved_to: state.moved_to.map(|m| MovedTo {
                identity: m.identity,
                superseded: m.superseded,
            }),
        };
        Ok(state)
    }
}

impl RedisStore {
    async fn write(
        &self,
        key: &ChainKey,
        lease: Option<&Lease>,
        expected: u64,
        state: &ChainState,
        forward: bool,
    ) -> Result<Option<u64>, StoreError> {
        let name = state_key(key);
        let blob = self.seal(&name, state)?;
        let (epoch, counter) = mirror(state);
        let lease_name = lease_key(key);
        let holder = lease.map(|l| l.holder.clone()).unwrap_or_default();
        let ttl_ms = u64::try_from(self.inner.settings.chain_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut conn = self.inner.conn.clone();
        let written: u64 = self
            .run("write", async move {
                SAVE.key(&name)
                    .key(&lease_name)
                    .arg(expected.to_string())
                    .arg(&holder)
                    .arg(&blob)
                    .arg(if forward { "1" } else { "0" })
                    .arg(&epoch)
                    .arg(counter.to_string())
                    .arg(ttl_ms.to_string())
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok((written > 0).then_some(written))
    }
}

/// Renews a lease while it lives; dropping it stops the renewal and releases the lease.
struct LeaseGuard {
    renewal: Option<tokio::task::AbortHandle>,
    handle: tokio::runtime::Handle,
    conn: ConnectionManager,
    key: String,
    holder: String,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
        }
        let mut conn = self.conn.clone();
        let key = std::mem::take(&mut self.key);
        let holder = std::mem::take(&mut self.holder);
        // Best effort: a lease not released lapses by itself within its ttl.
        self.handle.spawn(async move {
            let _ = tokio::time::timeout(
                COMMAND_TIMEOUT,
                RELEASE
                    .key(&key)
                    .arg(&holder)
                    .invoke_async::<i64>(&mut conn),
            )
            .await;
        });
    }
}

#[async_trait]
impl TokenStore for RedisStore {
    fn describe(&self) -> String {
        self.inner.settings.describe()
    }

    fn is_shared(&self) -> bool {
        true
    }

    /// Keyed by (a key derived from) `state.encryption_key`, not a public constant: key names
    /// are what anyone who can list Redis sees, and a bootstrap value may be guessable (a short
    /// test token, a vendor's low-entropy format); without the store's key its fingerprint
    /// cannot be brute-forced from a key name. Whoever holds the store's key can decrypt the
    /// values themselves, so keying by it gives nothing away. Every replica of a chain has the
    /// same key (it must, to read the chain), so they all derive one identity.
    fn bind_identity(&self, identity: &str, value: &Secret) -> String {
        bound_identity(&self.inner.identity_key, identity, value)
    }

    fn bind_identity_before(&self, identity: &str, value: &Secret) -> Option<String> {
        let key = self.inner.identity_key_before.as_ref()?;
        Some(bound_identity(key, identity, value))
    }

    async fn load(&self, key: &ChainKey) -> Result<Option<Stored>, StoreError> {
        let name = state_key(key);
        let mut conn = self.inner.conn.clone();
        let field = name.clone();
        type Fields = (
            Option<String>,
            Option<Vec<u8>>,
            Option<String>,
            Option<String>,
        );
        let (version, blob, epoch, counter): Fields = self
            .run("read", async move {
                ::redis::cmd("HMGET")
                    .arg(&field)
                    .arg("v")
                    .arg("s")
                    .arg("e")
                    .arg("n")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let (version, blob) = match (version, blob) {
            (None, None) => return Ok(None),
            (Some(v), Some(s)) => (v, s),
            _ => {
                return Err(StoreError::Undecodable(format!(
                    "{}: an entry lacks its version or state",
                    self.inner.settings.location
                )));
            }
        };
        let version: u64 = version.parse().map_err(|_| {
            StoreError::Undecodable(format!(
                "{}: an entry's version is not a number",
                self.inner.settings.location
            ))
        })?;
        let counter: u64 = match counter {
            None => 0,
            Some(n) => n.parse().map_err(|_| {
                StoreError::Undecodable(format!(
                    "{}: an entry's lineage is not a number",
                    self.inner.settings.location
                ))
            })?,
        };
        let state = self.unseal(
            &name,
            (epoch.as_deref().unwrap_or_default(), counter),
            &blob,
        )?;
        Ok(Some(Stored { version, state }))
    }

    async fn load_legacy(&self, key: &ChainKey) -> Result<Option<ChainState>, StoreError> {
        let Some(legacy) = &key.legacy else {
            return Ok(None);
        };
        // `tokenward:v1:{identity}`: `v` the version, `s` the state sealed with the key name and
        // version as associated data.
        let name = format!("{LEGACY_PREFIX}{legacy}");
        let mut conn = self.inner.conn.clone();
        let field = name.clone();
        let (version, blob): (Option<String>, Option<Vec<u8>>) = self
            .run("read", async move {
                ::redis::cmd("HMGET")
                    .arg(&field)
                    .arg("v")
                    .arg("s")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let (Some(version), Some(blob)) = (version, blob) else {
            return Ok(None);
        };
        self.open_sealed(format!("{name}\0{version}").as_bytes(), &blob)
            .map(Some)
    }

    async fn try_lease(&self, key: &ChainKey) -> Result<Option<Lease>, StoreError> {
        let holder = format!("{:032x}", rand::random::<u128>());
        let lease = lease_key(key);
        let ttl_ms = u64::try_from(self.inner.lease_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut conn = self.inner.conn.clone();
        let (k, h) = (lease.clone(), holder.clone());
        let taken: Option<String> = match self
            .run("take the lease", async move {
                ::redis::cmd("SET")
                    .arg(&k)
                    .arg(&h)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut conn)
                    .await
            })
            .await
        {
            Ok(taken) => taken,
            Err(e) => {
                release_abandoned(&self.inner.handle, &self.inner.conn, lease, holder);
                return Err(e);
            }
        };
        if taken.is_none() {
            return Ok(None);
        }
        let renewal = self.inner.renew.then(|| {
            let mut conn = self.inner.conn.clone();
            let (k, h) = (lease.clone(), holder.clone());
            let every = self.inner.lease_ttl / 3;
            self.inner
                .handle
                .spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        let renewed = tokio::time::timeout(
                            every.min(COMMAND_TIMEOUT),
                            RENEW
                                .key(&k)
                                .arg(&h)
                                .arg(ttl_ms)
                                .invoke_async::<i64>(&mut conn),
                        )
                        .await;
                        match renewed {
                            // Ours lapsed (or Redis restarted empty): a write naming it is
                            // refused if another holder has taken it since.
                            Ok(Ok(0)) => {
                                tracing::warn!(
                                    "the refresh lease lapsed before it could be renewed"
                                );
                                break;
                            }
                            // Redis is slow or down: keep trying while the lease may still live.
                            _ => continue,
                        }
                    }
                })
                .abort_handle()
        });
        Ok(Some(Lease {
            holder: holder.clone(),
            _hold: Box::new(LeaseGuard {
                renewal,
                handle: self.inner.handle.clone(),
                conn: self.inner.conn.clone(),
                key: lease,
                holder,
            }),
        }))
    }

    async fn save(
        &self,
        key: &ChainKey,
        lease: Option<&Lease>,
        expected: u64,
        state: &ChainState,
    ) -> Result<Option<u64>, StoreError> {
        self.write(key, lease, expected, state, false).await
    }

    async fn save_forward(
        &self,
        key: &ChainKey,
        lease: Option<&Lease>,
        expected: u64,
        state: &ChainState,
    ) -> Result<Option<u64>, StoreError> {
        self.write(key, lease, expected, state, true).await
    }

    async fn restore_marker(
        &self,
        key: &ChainKey,
        marker: &ChainState,
        over: &Lineage,
    ) -> Result<Option<u64>, StoreError> {
        let name = state_key(key);
        let blob = self.seal(&name, marker)?;
        let ttl_ms = u64::try_from(self.inner.settings.chain_ttl.as_millis()).unwrap_or(u64::MAX);
        let (epoch, counter) = (over.epoch.clone(), over.counter);
        let mut conn = self.inner.conn.clone();
        let written: u64 = self
            .run("write", async move {
                RESTORE_MARKER
                    .key(&name)
                    .arg(&blob)
                    .arg(&epoch)
                    .arg(counter.to_string())
                    .arg(ttl_ms.to_string())
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok((written > 0).then_some(written))
    }
}

#[cfg(test)]
#[path = "../../../tests/common/redis.rs"]
#[allow(dead_code)]
mod test_server;

#[cfg(test)]
mod tests {
    use super::test_server::RedisServer;
    use super::*;

    const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn settings(server: &RedisServer, key: &str) -> RedisSettings {
        RedisSettings::new(&server.url(), SecretSource::Literal(Secret::new(key))).unwrap()
    }

    fn store(server: &RedisServer) -> RedisStore {
        RedisStore::open(&settings(server, KEY_HEX)).unwrap()
    }

    fn chain() -> ChainKey {
        ChainKey {
            name: "orders-credential-name".into(),
            identity: "5e1f0c0ffee0d15ea5e0000000000001".into(),
            legacy: None,
        }
    }

    fn state(refresh: &str, access: Option<&str>) -> ChainState {
        let now = UNIX_EPOCH + Duration::from_millis(unix_ms(SystemTime::now()));
        ChainState {
            refresh_token: Some(Secret::new(refresh)),
            origin: Some("0a1b2c3d4e5f6071".into()),
            access: access.map(|t| SharedAccess {
                token: Secret::new(t),
                kind: GrantKind::Refresh,
                issued_at: now,
                expires_at: now + Duration::from_secs(600),
                after_rejection: true,
            }),
            ..ChainState::default()
        }
    }

    fn at(mut state: ChainState, epoch: &str, counter: u64) -> ChainState {
        state.lineage = Some(Lineage {
            epoch: epoch.into(),
            counter,
            parent: Some("0f0f0f0f".into()),
        });
        state
    }

    #[tokio::test]
    async fn a_chain_an_earlier_version_stored_is_read_from_its_old_key() {
        let server = RedisServer::start();
        let s = store(&server);
        let key = ChainKey {
            legacy: Some("0ld1dent1ty".into()),
            ..chain()
        };
        assert_eq!(s.load_legacy(&key).await.unwrap(), None);
        // As versions before lineages sealed it: the key name and version as associated data.
        let name = "tokenward:v1:0ld1dent1ty";
        let plain = br#"{"refresh_token":"rt-rotated","origin":"0a1b2c3d4e5f6071","access":null}"#;
        let nonce = [7u8; NONCE_LEN];
        let sealed = s
            .inner
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plain,
                    aad: format!("{name}\03").as_bytes(),
                },
            )
            .unwrap();
        let blob = base64::engine::general_purpose::STANDARD.encode([&nonce[..], &sealed].concat());
        let mut con = ::redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = ::redis::cmd("HSET")
            .arg(name)
            .arg("v")
            .arg("3")
            .arg("s")
            .arg(&blob)
            .query_async(&mut con)
            .await
            .unwrap();
        let old = s.load_legacy(&key).await.unwrap().expect("the old entry");
        assert_eq!(old.refresh_token, Some(Secret::new("rt-rotated")));
        assert_eq!(old.origin.as_deref(), Some("0a1b2c3d4e5f6071"));
        // Never under the new key, and not without a legacy name.
        assert_eq!(s.load(&key).await.unwrap(), None);
        assert_eq!(s.load_legacy(&chain()).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_forward_write_lands_on_an_empty_store_or_an_ancestor_only_and_keys_expire() {
        let server = RedisServer::start();
        let ttl = Duration::from_secs(3600);
        let s = RedisStore::open(&settings(&server, KEY_HEX).with_chain_ttl(ttl)).unwrap();
        let c = chain();
        let held = s.try_lease(&c).await.unwrap().expect("free");
        // Empty: lands whatever the version named and the lease (held by another).
        let first = at(state("rt-5", None), "e1", 5);
        assert_eq!(s.save_forward(&c, None, 9, &first).await.unwrap(), Some(1));
        let got = s.load(&c).await.unwrap().unwrap();
        assert_eq!((got.version, &got.state), (1, &first));
        let pttl = server.pttl(&state_key(&c));
        assert!(pttl > 3_500_000 && pttl <= 3_600_000, "{pttl}");
        // A descendant lands over an ancestor, whatever the version named.
        let sixth = at(state("rt-6", None), "e1", 6);
        assert_eq!(s.save_forward(&c, None, 0, &sixth).await.unwrap(), Some(2));
        // An ancestor, the same point, or another chain do not (the version is wrong too).
        for refused in [
            at(state("rt-4", None), "e1", 4),
            at(state("rt-6b", None), "e1", 6),
            at(state("rt-x", None), "e2", 9),
        ] {
            assert_eq!(s.save_forward(&c, None, 0, &refused).await.unwrap(), None);
            assert_eq!(s.save(&c, None, 0, &refused).await.unwrap(), None);
        }
        // A plain save naming the version still works, under the lease.
        let other_chain = at(state("rt-y", None), "e2", 1);
        assert_eq!(
            s.save(&c, Some(&held), 2, &other_chain).await.unwrap(),
            Some(3)
        );
        assert_eq!(s.load(&c).await.unwrap().unwrap().state, other_chain);
    }

    /// Polls `f` every 20 ms until it holds, for at most `within`.
    async fn eventually<F: AsyncFnMut() -> bool>(within: Duration, mut f: F) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if f().await {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn round_trips_state_and_access_token() {
        let server = RedisServer::start();
        let store = store(&server);
        assert!(store.is_shared());
        assert_eq!(store.load(&chain()).await.unwrap(), None);
        let first = state("rt-1", Some("at-1"));
        assert_eq!(
            store.save(&chain(), None, 0, &first).await.unwrap(),
            Some(1)
        );
        let got = store.load(&chain()).await.unwrap().unwrap();
        assert_eq!((got.version, got.state), (1, first));
        let second = ChainState::default();
        assert_eq!(
            store.save(&chain(), None, 1, &second).await.unwrap(),
            Some(2)
        );
        let got = store.load(&chain()).await.unwrap().unwrap();
        assert_eq!((got.version, got.state), (2, second));
        // Another replica (another store on the same Redis and key) reads the same chain.
        let other = super::RedisStore::open(&settings(&server, KEY_HEX)).unwrap();
        assert_eq!(other.load(&chain()).await.unwrap().unwrap().version, 2);
    }

    #[tokio::test]
    async fn a_marker_round_trips_sealed_and_fences_a_forward_write() {
        let server = RedisServer::start();
        let store = store(&server);
        let live = at(state("rt-1", Some("at-1")), "e1", 3);
        assert_eq!(store.save(&chain(), None, 0, &live).await.unwrap(), Some(1));
        let marker = ChainState {
            origin: live.origin.clone(),
            moved_to: Some(MovedTo {
                identity: "00112233445566778899aabbccddeeff".into(),
                superseded: true,
            }),
            ..ChainState::default()
        };
        assert_eq!(
            store.save(&chain(), None, 1, &marker).await.unwrap(),
            Some(2)
        );
        let got = store.load(&chain()).await.unwrap().unwrap();
        assert_eq!((got.version, got.state), (2, marker));
        // A holder that read the chain before it moved cannot land its rotation over the
        // marker, not even as a forward write of the same lineage.
        let late = at(state("rt-2", Some("at-2")), "e1", 4);
        assert_eq!(
            store.save_forward(&chain(), None, 1, &late).await.unwrap(),
            None
        );
        assert!(
            !server.holds_bytes(b"00112233445566778899aabbccddeeff"),
            "sealed"
        );
    }

    #[tokio::test]
    async fn a_lost_marker_is_restored_over_nothing_or_a_stale_point_only() {
        let server = RedisServer::start();
        let store = store(&server);
        let marker = ChainState {
            moved_to: Some(MovedTo {
                identity: "00112233445566778899aabbccddeeff".into(),
                superseded: false,
            }),
            ..ChainState::default()
        };
        let mover = Lineage {
            epoch: "e1".into(),
            counter: 5,
            parent: None,
        };
        let is_marker = async |store: &RedisStore| {
            let got = store.load(&chain()).await.unwrap();
            got.is_some_and(|g| g.state == marker)
        };
        // Nothing there (the store lost it): written.
        assert!(
            store
                .restore_marker(&chain(), &marker, &mover)
                .await
                .unwrap()
                .is_some()
        );
        assert!(is_marker(&store).await);
        // A marker there already: left alone.
        assert_eq!(
            store
                .restore_marker(&chain(), &marker, &mover)
                .await
                .unwrap(),
            None
        );
        // What a stale replica writes back (same chain, not ahead): replaced.
        for counter in [3, 5] {
            server.flush_all();
            let stale = at(state("rt-stale", None), "e1", counter);
            store
                .save_forward(&chain(), None, 0, &stale)
                .await
                .unwrap()
                .unwrap();
            assert!(
                store
                    .restore_marker(&chain(), &marker, &mover)
                    .await
                    .unwrap()
                    .is_some()
            );
            assert!(is_marker(&store).await, "over counter {counter}");
        }
        // A point ahead of the mover's, or another chain: never replaced.
        for (epoch, counter) in [("e1", 6), ("e2", 1)] {
            server.flush_all();
            let other = at(state("rt-other", None), epoch, counter);
            store
                .save_forward(&chain(), None, 0, &other)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                store
                    .restore_marker(&chain(), &marker, &mover)
                    .await
                    .unwrap(),
                None
            );
            let got = store.load(&chain()).await.unwrap().unwrap();
            assert_eq!(got.state, other, "{epoch} {counter}");
        }
    }

    #[test]
    fn a_bootstrap_value_is_bound_into_the_identity_under_the_store_key() {
        let open = |key: &str| {
            RedisStore::open(
                &RedisSettings::new(
                    "redis://127.0.0.1:1",
                    SecretSource::Literal(Secret::new(key)),
                )
                .unwrap(),
            )
            .unwrap()
        };
        let store = open(KEY_HEX);
        let bind = |store: &RedisStore, identity: &str, value: &str| {
            store.bind_identity(identity, &Secret::new(value))
        };
        let alice = bind(&store, "id-1", "rt-alice");
        assert_eq!(alice.len(), 32);
        assert!(alice.bytes().all(|b| b.is_ascii_hexdigit()));
        // One value, one identity: every replica (another store on the same key) agrees.
        assert_eq!(alice, bind(&open(KEY_HEX), "id-1", "rt-alice"));
        // Another account's value at the same place, or another account, is another chain.
        assert_ne!(alice, bind(&store, "id-1", "rt-bob"));
        assert_ne!(alice, bind(&store, "id-2", "rt-alice"));
        // Keyed by the store's key: without it a key name says nothing of a guessable value.
        let other_key = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
        assert_ne!(alice, bind(&open(other_key), "id-1", "rt-alice"));
        let unkeyed = {
            use sha2::{Digest, Sha256};
            let d = Sha256::digest(b"id-1\nrt-alice");
            d[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        assert_ne!(alice, unkeyed);
    }

    #[tokio::test]
    async fn writes_are_fenced_on_version_and_lease() {
        let server = RedisServer::start();
        let a = store(&server);
        let b = store(&server);
        let c = chain();
        a.save(&c, None, 0, &state("rt-1", None)).await.unwrap();
        a.save(&c, None, 1, &state("rt-2", None)).await.unwrap();
        // A writer that read version 1 (and so spent rt-1) cannot overwrite rt-2.
        assert_eq!(
            b.save(&c, None, 1, &state("rt-x", None)).await.unwrap(),
            None
        );
        assert_eq!(
            b.save(&c, None, 0, &state("rt-y", None)).await.unwrap(),
            None
        );
        let now = a.load(&c).await.unwrap().unwrap();
        assert_eq!((now.version, now.state), (2, state("rt-2", None)));

        // A lease taken over by another holder fences its old holder out, even at the right
        // version; the new holder writes.
        let short = RedisStore::open_with(
            &settings(&server, KEY_HEX),
            Duration::from_millis(300),
            false,
        )
        .unwrap();
        let paused = short.try_lease(&c).await.unwrap().expect("free");
        let mut took_over = None;
        assert!(
            eventually(Duration::from_secs(5), async || {
                took_over = b.try_lease(&c).await.unwrap();
                took_over.is_some()
            })
            .await,
            "the unrenewed lease never lapsed"
        );
        assert_eq!(
            short
                .save(&c, Some(&paused), 2, &state("rt-paused", None))
                .await
                .unwrap(),
            None
        );
        let took_over = took_over.unwrap();
        assert_eq!(
            b.save(&c, Some(&took_over), 2, &state("rt-3", None))
                .await
                .unwrap(),
            Some(3)
        );
        drop(took_over);

        // A lapsed lease nobody took, at an unchanged version, still writes.
        let mut lapsing = None;
        assert!(
            eventually(Duration::from_secs(5), async || {
                lapsing = short.try_lease(&c).await.unwrap();
                lapsing.is_some()
            })
            .await,
            "the dropped lease was never released"
        );
        let lapsing = lapsing.unwrap();
        assert!(
            eventually(Duration::from_secs(5), async || {
                !server.keys().iter().any(|k| k.ends_with(":lease"))
            })
            .await
        );
        assert_eq!(
            short
                .save(&c, Some(&lapsing), 3, &state("rt-4", None))
                .await
                .unwrap(),
            Some(4)
        );
        assert_eq!(
            a.load(&c).await.unwrap().unwrap().state,
            state("rt-4", None)
        );
    }

    #[tokio::test]
    async fn one_lease_at_a_time_renewed_while_held_released_on_drop() {
        let server = RedisServer::start();
        let ttl = Duration::from_millis(300);
        let a = RedisStore::open_with(&settings(&server, KEY_HEX), ttl, true).unwrap();
        let b = store(&server);
        let lease = a.try_lease(&chain()).await.unwrap().expect("free");
        assert_eq!(lease.holder.len(), 32);
        let other = ChainKey {
            name: "other".into(),
            identity: "0ther".into(),
            legacy: None,
        };
        assert!(b.try_lease(&other).await.unwrap().is_some());
        // Held for many ttls: the renewal keeps it.
        let held_until = Instant::now() + ttl * 5;
        while Instant::now() < held_until {
            assert!(
                b.try_lease(&chain()).await.unwrap().is_none(),
                "lease lost while held"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(lease);
        let mut again = None;
        assert!(
            eventually(Duration::from_secs(2), async || {
                again = b.try_lease(&chain()).await.unwrap();
                again.is_some()
            })
            .await
        );
        // `b` has the default 3 s ttl: a drop releases at once, well before it would lapse.
        drop(again);
        let started = Instant::now();
        let mut last = None;
        assert!(
            eventually(Duration::from_secs(1), async || {
                last = a.try_lease(&chain()).await.unwrap();
                last.is_some()
            })
            .await,
            "a dropped lease was not released"
        );
        assert!(started.elapsed() < LEASE_TTL / 2);
    }

    #[tokio::test]
    async fn a_lapsed_holder_cannot_release_the_next_holders_lease() {
        let server = RedisServer::start();
        let ttl = Duration::from_millis(300);
        let dead = RedisStore::open_with(&settings(&server, KEY_HEX), ttl, false).unwrap();
        let live = store(&server);
        let old = dead.try_lease(&chain()).await.unwrap().expect("free");
        let mut new = None;
        assert!(
            eventually(Duration::from_secs(5), async || {
                new = live.try_lease(&chain()).await.unwrap();
                new.is_some()
            })
            .await
        );
        drop(old);
        // The old holder's release runs in the background: watch that the lease stays held.
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            assert!(
                dead.try_lease(&chain()).await.unwrap().is_none(),
                "released by its old holder"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(new.is_some());
    }

    #[tokio::test]
    async fn an_unrenewed_lease_lapses_after_its_ttl() {
        let server = RedisServer::start();
        let ttl = Duration::from_millis(400);
        let dead = RedisStore::open_with(&settings(&server, KEY_HEX), ttl, false).unwrap();
        let live = store(&server);
        let started = Instant::now();
        let _lease = dead.try_lease(&chain()).await.unwrap().expect("free");
        assert!(live.try_lease(&chain()).await.unwrap().is_none());
        let mut taken = None;
        assert!(
            eventually(Duration::from_secs(5), async || {
                taken = live.try_lease(&chain()).await.unwrap();
                taken.is_some()
            })
            .await
        );
        assert!(started.elapsed() >= ttl - Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_different_key_cannot_read_and_tampering_is_detected() {
        let server = RedisServer::start();
        let store = store(&server);
        store
            .save(&chain(), None, 0, &state("rt-1", Some("at-1")))
            .await
            .unwrap();
        let other_key = "ff".repeat(32);
        let wrong = RedisStore::open(&settings(&server, &other_key)).unwrap();
        let err = wrong.load(&chain()).await.unwrap_err();
        assert!(matches!(err, StoreError::Undecodable(_)), "{err}");
        assert!(!err.to_string().contains("rt-1"), "{err}");

        // A blob moved to another chain, or replayed under another version, fails too.
        let moved = ChainKey {
            name: "x".into(),
            identity: "another".into(),
            legacy: None,
        };
        let mut con = ::redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let blob: Vec<u8> = ::redis::cmd("HGET")
            .arg(state_key(&chain()))
            .arg("s")
            .query_async(&mut con)
            .await
            .unwrap();
        let _: () = ::redis::cmd("HSET")
            .arg(state_key(&moved))
            .arg("v")
            .arg("1")
            .arg("s")
            .arg(&blob)
            .arg("n")
            .arg("0")
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(matches!(
            store.load(&moved).await,
            Err(StoreError::Undecodable(_))
        ));
        // Its lineage changed beside it (a rolled-back counter) fails too.
        let _: () = ::redis::cmd("HSET")
            .arg(state_key(&chain()))
            .arg("n")
            .arg("7")
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(matches!(
            store.load(&chain()).await,
            Err(StoreError::Undecodable(_))
        ));
    }

    #[tokio::test]
    async fn a_previous_key_reads_and_the_next_write_seals_with_the_current_one() {
        let server = RedisServer::start();
        let old = store(&server);
        old.save(&chain(), None, 0, &state("rt-1", Some("at-1")))
            .await
            .unwrap();
        let new_key = "ee".repeat(32);
        let rotated = RedisStore::open(
            &settings(&server, &new_key)
                .with_previous_keys(vec![SecretSource::Literal(Secret::new(KEY_HEX))]),
        )
        .unwrap();
        let read = rotated.load(&chain()).await.unwrap().expect("stored");
        assert_eq!(
            read.state.refresh_token.as_ref().map(|s| s.expose()),
            Some("rt-1")
        );
        // Until written again, the new key alone cannot read it; after a write it can, and the
        // old key no longer can.
        let only_new = RedisStore::open(&settings(&server, &new_key)).unwrap();
        assert!(matches!(
            only_new.load(&chain()).await,
            Err(StoreError::Undecodable(_))
        ));
        rotated
            .save(&chain(), None, read.version, &state("rt-2", None))
            .await
            .unwrap()
            .expect("written");
        let reread = only_new.load(&chain()).await.unwrap().expect("stored");
        assert_eq!(
            reread.state.refresh_token.as_ref().map(|s| s.expose()),
            Some("rt-2")
        );
        assert!(matches!(
            old.load(&chain()).await,
            Err(StoreError::Undecodable(_))
        ));
        // A previous key that is not a key is refused at open, naming its place in the list.
        let bad = settings(&server, &new_key)
            .with_previous_keys(vec![SecretSource::Literal(Secret::new("short"))]);
        let err = RedisStore::open(&bad).err().expect("refused").to_string();
        assert!(
            err.starts_with("state.previous_encryption_keys[0]:"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn redis_holds_no_name_token_or_key_in_the_clear() {
        let server = RedisServer::start();
        let store = store(&server);
        let c = chain();
        store
            .save(
                &c,
                None,
                0,
                &state("refresh-token-9c1e7", Some("access-token-4b2d8")),
            )
            .await
            .unwrap();
        let _lease = store.try_lease(&c).await.unwrap().unwrap();
        let keys = server.keys();
        assert_eq!(
            keys,
            vec![
                format!("tokenward:v2:{}", c.identity),
                format!("tokenward:v2:{}:lease", c.identity)
            ]
        );
        let raw_key: Vec<u8> = (0u8..32).collect();
        for needle in [
            c.name.as_bytes(),
            b"refresh-token-9c1e7",
            b"access-token-4b2d8",
            b"0a1b2c3d4e5f6071",
            KEY_HEX.as_bytes(),
            &raw_key,
        ] {
            assert!(
                !server.holds_bytes(needle),
                "{:?} found in Redis",
                String::from_utf8_lossy(needle)
            );
        }
        // The check itself can see what it looks for.
        assert!(server.holds_bytes(c.identity.as_bytes()));
    }

    #[tokio::test]
    async fn redis_down_is_unavailable_within_the_bound_and_recovers() {
        let mut server = RedisServer::start();
        let store = store(&server);
        let c = chain();
        store.save(&c, None, 0, &state("rt-1", None)).await.unwrap();
        server.stop();
        for _ in 0..3 {
            let started = Instant::now();
            let err = store.load(&c).await.unwrap_err();
            assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
            assert!(started.elapsed() < COMMAND_TIMEOUT + Duration::from_millis(500));
            let started = Instant::now();
            assert!(matches!(
                store.try_lease(&c).await,
                Err(StoreError::Unavailable(_))
            ));
            assert!(matches!(
                store.save(&c, None, 1, &state("rt-2", None)).await,
                Err(StoreError::Unavailable(_))
            ));
            assert!(started.elapsed() < 2 * COMMAND_TIMEOUT + Duration::from_millis(500));
        }
        // Restarted empty: the same store reconnects by itself.
        server.restart();
        assert!(
            eventually(Duration::from_secs(10), async || {
                matches!(store.load(&c).await, Ok(None))
            })
            .await,
            "the store did not reconnect"
        );
        assert_eq!(
            store.save(&c, None, 0, &state("rt-2", None)).await.unwrap(),
            Some(1)
        );
    }

    #[tokio::test]
    async fn a_hung_redis_is_unavailable_within_the_bound() {
        let server = RedisServer::start();
        let store = store(&server);
        let c = chain();
        store.save(&c, None, 0, &state("rt-1", None)).await.unwrap();
        server.freeze();
        let started = Instant::now();
        let err = store.load(&c).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(matches!(
            store.save(&c, None, 1, &state("rt-2", None)).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.try_lease(&c).await,
            Err(StoreError::Unavailable(_))
        ));
        let took = started.elapsed();
        assert!(
            took < 3 * COMMAND_TIMEOUT + Duration::from_millis(500),
            "{took:?}"
        );
        server.thaw();
        assert!(
            eventually(Duration::from_secs(10), async || store
                .load(&c)
                .await
                .is_ok())
            .await,
            "the store did not recover"
        );
    }

    #[tokio::test]
    async fn opens_while_redis_is_down_and_never_shows_the_password() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("redis://tw:pass-w0rd-5ecret@127.0.0.1:{port}/2");
        let s = RedisSettings::new(&url, SecretSource::Literal(Secret::new(KEY_HEX))).unwrap();
        assert_eq!(s.describe(), format!("redis at 127.0.0.1:{port}/2"));
        assert!(!format!("{s:?}").contains("pass-w0rd"));
        let store = RedisStore::open(&s).unwrap();
        let err = store.load(&chain()).await.unwrap_err().to_string();
        assert!(
            err.contains("unavailable") && !err.contains("pass-w0rd"),
            "{err}"
        );
        let err = s.ping(Duration::from_millis(500)).await.unwrap_err();
        assert!(!err.contains("pass-w0rd"), "{err}");
    }

    #[tokio::test]
    async fn authenticates_with_the_url_password() {
        let server = RedisServer::start_with(&["--requirepass", "pa55-w0rd"]);
        let key = SecretSource::Literal(Secret::new(KEY_HEX));
        let wrong = RedisSettings::new(
            &format!("redis://:nope@127.0.0.1:{}/0", server.port()),
            key.clone(),
        )
        .unwrap();
        let err = RedisStore::open(&wrong)
            .unwrap()
            .load(&chain())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(!err.to_string().contains("nope"), "{err}");
        let right = RedisSettings::new(
            &format!("redis://:pa55-w0rd@127.0.0.1:{}/0", server.port()),
            key,
        )
        .unwrap();
        assert!(right.ping(Duration::from_secs(2)).await.is_ok());
        let store = RedisStore::open(&right).unwrap();
        assert_eq!(
            store
                .save(&chain(), None, 0, &state("rt", None))
                .await
                .unwrap(),
            Some(1)
        );
    }

    #[tokio::test]
    async fn authenticates_with_a_password_file_and_an_acl_user() {
        let server = RedisServer::start_with(&[
            "--requirepass",
            "fi1e-pw-3b7e",
            // One argument per ACL rule: redis-server reads a quoted rule list as a user name.
            "--user",
            "tw-app",
            "on",
            ">us3r-pw-8c1d",
            "~*",
            "&*",
            "+@all",
        ]);
        let dir = tempfile::tempdir().unwrap();
        let pw_file = dir.path().join("redis-pw");
        let with = |username: Option<&str>, password: &str| {
            std::fs::write(&pw_file, format!("{password}\n")).unwrap();
            RedisSettings::new(&server.url(), SecretSource::Literal(Secret::new(KEY_HEX)))
                .unwrap()
                .with_credentials(
                    username.map(str::to_string),
                    Some(SecretSource::File(pw_file.clone())),
                )
                .unwrap()
        };
        for (username, password) in [(None, "fi1e-pw-3b7e"), (Some("tw-app"), "us3r-pw-8c1d")] {
            let s = with(username, password);
            assert!(!format!("{s:?}").contains(password), "{s:?}");
            assert!(s.ping(Duration::from_secs(2)).await.is_ok(), "{username:?}");
            let store = RedisStore::open(&s).unwrap();
            store.ping().await.unwrap();
        }
        let store = RedisStore::open(&with(None, "fi1e-pw-3b7e")).unwrap();
        assert_eq!(
            store
                .save(&chain(), None, 0, &state("rt", None))
                .await
                .unwrap(),
            Some(1)
        );

        // A wrong password is refused by Redis, and no error quotes it.
        let wrong = with(None, "wr0ng-pw-55aa");
        let err = wrong.ping(Duration::from_secs(2)).await.unwrap_err();
        assert!(!err.contains("wr0ng-pw-55aa"), "{err}");
        let err = RedisStore::open(&wrong)
            .unwrap()
            .load(&chain())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(!err.to_string().contains("wr0ng-pw-55aa"), "{err}");

        // An unreadable password file is an error naming the key, at open and for `check`.
        std::fs::remove_file(&pw_file).unwrap();
        let err = wrong.redis_password().unwrap_err();
        assert!(err.contains("redis-pw"), "{err}");
        let err = RedisStore::open(&wrong).unwrap_err().to_string();
        assert!(err.contains("state.redis_password"), "{err}");
    }

    #[test]
    fn settings_validate_url_and_key() {
        let key = || SecretSource::Literal(Secret::new(KEY_HEX));
        let s = RedisSettings::new("rediss://u:p%40ss@redis.example:6380/3", key()).unwrap();
        assert_eq!(s.describe(), "redis at redis.example:6380/3 (TLS)");
        assert_eq!(
            s.scrub("x p@ss y p%40ss".into()),
            "x [REDACTED] y [REDACTED]"
        );
        assert_eq!(
            RedisSettings::new("redis://[::1]", key())
                .unwrap()
                .describe(),
            "redis at [::1]:6379/0"
        );
        for (bad, why) in [
            ("http://u:secretpw@h:6379", "scheme"),
            ("redis://u:secretpw@h:6379/x", "database"),
            ("redis://u:secretpw@h/0?protocol=resp3", "query"),
            ("rediss://u:secretpw@h/0#insecure", "insecure"),
            ("redis:///0", "host"),
            ("127.0.0.1:6379", "scheme"),
            ("not a url secretpw", "scheme"),
            ("redis://u:secretpw@h:99999/0", "URL"),
        ] {
            let err = RedisSettings::new(bad, key()).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
            assert!(!err.contains("secretpw"), "{bad}: {err}");
        }
    }

    #[test]
    fn keys_decode_from_hex_or_base64_to_32_bytes() {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        let raw: Vec<u8> = (0u8..32).collect();
        let decode = |s: &str| decode_encryption_key(&Secret::new(s));
        assert_eq!(&decode(KEY_HEX).unwrap()[..], &raw[..]);
        assert_eq!(&decode(&KEY_HEX.to_uppercase()).unwrap()[..], &raw[..]);
        assert_eq!(&decode(&STANDARD.encode(&raw)).unwrap()[..], &raw[..]);
        assert_eq!(
            &decode(&format!("{}\n", STANDARD.encode(&raw))).unwrap()[..],
            &raw[..]
        );
        assert_eq!(
            &decode(&URL_SAFE_NO_PAD.encode(&raw)).unwrap()[..],
            &raw[..]
        );
        let short = STANDARD.encode([7u8; 16]);
        let err = decode(&short).unwrap_err();
        assert!(err.contains("16 bytes") && !err.contains(&short), "{err}");
        let err = decode(&KEY_HEX[..62]).unwrap_err();
        assert!(
            err.contains("32 bytes") && !err.contains(&KEY_HEX[..62]),
            "{err}"
        );
        assert!(decode("correct horse battery staple").is_err());
    }
}
