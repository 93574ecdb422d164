//! Configuration: loads the file (TOML or YAML) under `TOKENWARD_…` environment overrides and
//! validates it into the settings the proxy runs on. Every error names the file, key and reason.

pub mod file;
pub mod transport;
pub mod warnings;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml, Yaml};
use http::header::HeaderName;

use crate::dialect::{self, Dialect};
use crate::secret::SecretSource;
use crate::token::store::{RedisSettings, decode_encryption_key};
use file::{CommonCredentialFile, FileConfig, HumanDuration, RouteFile};
pub use transport::ProviderTransport;

pub const ENV_PREFIX: &str = "TOKENWARD_";
const ENV_SECTIONS: &[&str] = &["server", "log", "admin", "state", "credentials"];

/// One problem found in a configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{}: `{}`: {}", self.file, self.key, self.reason)
        }
    }
}

/// Every problem found in a configuration, so that one run of `check` shows them all.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "config error: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub source: PathBuf,
    pub threads: usize,
    /// Idle upstream connections kept for reuse, across all upstreams.
    pub upstream_keepalive_pool_size: usize,
    /// Plain HTTP/1 requests skip pingora-proxy's orchestration (`proxy::lean`).
    pub http1_fast_path: bool,
    /// With several proxy threads, each has its own `SO_REUSEPORT` socket per listener;
    /// otherwise they share one (`server::proxy_threads`).
    pub reuse_port: bool,
    pub grace_period: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    pub admin_listen: SocketAddr,
    /// What the admin actions require; `None` allows them on a loopback listener only.
    pub admin_token: Option<crate::secret::SecretSource>,
    pub state_dir: PathBuf,
    /// `[state] redis` and `encryption_key`: chains shared by replicas instead of `state_dir`.
    pub state_redis: Option<RedisSettings>,
    pub routes: Vec<RouteConfig>,
    pub credentials: Vec<CredentialConfig>,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub upstream: Upstream,
    pub credential: String,
    /// Lower-case host name without port; matched against the client's Host.
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub http2: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
    /// Whether upstream connections are kept for further requests (`upstream_keepalive`).
    pub upstream_keepalive: bool,
    pub reauth_statuses: Vec<u16>,
    /// The client certificate presented to the upstream (mutual TLS).
    pub client_cert: Option<crate::mtls::ClientCertSource>,
}

/// Where a route's requests go: parsed once from `upstream = "https://host:port/base"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prepended to every request path ("" when the URL has none).
    pub base_path: String,
    /// The Host header upstream: the host, with the port when it is not the scheme's default.
    pub authority: String,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.base_path)
    }
}

/// When a credential's token is refreshed; see `token::timing` for how these combine.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    pub default_lifetime: Duration,
    pub refresh_at: f64,
    pub expiry_margin: Duration,
    pub min_refresh_interval: Duration,
    pub max_backoff: Duration,
    pub probe_interval: Duration,
    pub timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            default_lifetime: Duration::from_secs(300),
            refresh_at: 0.75,
            expiry_margin: Duration::from_secs(30),
            min_refresh_interval: Duration::from_secs(5),
            max_backoff: Duration::from_secs(60),
            probe_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

/// How a token is written into the upstream request: `header: format` with `{token}` replaced.
#[derive(Debug, Clone, PartialEq)]
pub struct Presentation {
    pub header: HeaderName,
    pub prefix: String,
    pub suffix: String,
}

impl Presentation {
    pub fn parse(header: &str, format: &str) -> Result<Self, String> {
        let header = HeaderName::from_bytes(header.as_bytes())
            .map_err(|_| format!("{header:?} is not a valid header name"))?;
        let (prefix, suffix) = format
            .split_once("{token}")
            .ok_or_else(|| format!("{format:?} has no {{token}} placeholder"))?;
        if suffix.contains("{token}") {
            return Err(format!(
                "{format:?} has more than one {{token}} placeholder"
            ));
        }
        if format.chars().any(|c| c.is_control()) {
            return Err("format contains a control character".into());
        }
        Ok(Presentation {
            header,
            prefix: prefix.into(),
            suffix: suffix.into(),
        })
    }

    pub fn render(&self, token: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + token.len() + self.suffix.len());
        out.push_str(&self.prefix);
        out.push_str(token);
        out.push_str(&self.suffix);
        out
    }
}

#[derive(Clone)]
pub struct CredentialConfig {
    pub name: String,
    pub dialect_name: String,
    pub dialect: Arc<dyn Dialect>,
    pub presentation: Presentation,
    pub timing: Timing,
    /// How the provider client connects: its own proxy (never the environment's) and CAs.
    pub transport: ProviderTransport,
    /// Changes whenever any setting of this credential changes: a reload keeps the token of a
    /// credential whose fingerprint is unchanged.
    pub fingerprint: String,
    /// `chain = "NAME"`: the operator's name for this credential's chain in a shared store.
    pub chain: Option<String>,
}

impl CredentialConfig {
    /// Identifies the credential's refresh chain to a shared store: every replica (and every
    /// credential) with the same identity shares one chain. It is the account — provider,
    /// client and resource owner, see [`Dialect::account`] — or the operator's `chain` name,
    /// hashed so that neither reaches the store.
    ///
    /// This is what one config can tell apart (the load-time collision check compares it).
    /// In a shared store an unnamed chain grown from a bootstrap refresh token is filed under
    /// this bound to the bootstrap *value* as well (see `TokenStore::bind_identity`): two
    /// deployments reading one path or variable with different accounts' values behind it
    /// cannot see each other's configs, and must still never meet at one key. A named chain's
    /// identity is the name alone — no token URL, client or value — so that naming a chain
    /// first makes every other setting free to change without moving it again.
    pub fn chain_identity(&self) -> String {
        match &self.chain {
            Some(name) => identity_digest(&[b"tokenward chain v2 named\n", name.as_bytes()]),
            None => self.unnamed_chain_identity(),
        }
    }

    /// The identity these settings derive from the account alone, whether or not the chain is
    /// named: where the chain lived before the operator named it.
    pub fn unnamed_chain_identity(&self) -> String {
        identity_digest(&[
            b"tokenward chain v2\n",
            self.dialect_name.as_bytes(),
            b"\n",
            self.dialect.account().as_bytes(),
        ])
    }

    /// Where versions before identities by account filed this credential's chain: a hash of
    /// the dialect's whole description. Read to carry a chain across the upgrade, and what
    /// tells a token-exchange credential's per-caller tokens apart (everything it names).
    pub fn legacy_chain_identity(&self) -> String {
        identity_digest(&[
            b"tokenward chain v1\n",
            self.dialect_name.as_bytes(),
            b"\n",
            self.dialect.describe().as_bytes(),
        ])
    }
}

/// The first 16 bytes of the SHA-256 of `parts`, in hex: an identity that names nothing it
/// was derived from.
fn identity_digest(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let digest = parts
        .iter()
        .fold(Sha256::new(), |d, part| d.chain_update(part))
        .finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

impl fmt::Debug for CredentialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialConfig")
            .field("name", &self.name)
            .field("dialect", &self.dialect_name)
            .field("presentation", &self.presentation)
            .field("timing", &self.timing)
            .field("transport", &self.transport)
            .finish()
    }
}

impl Config {
    /// Loads and validates `path`, with environment overrides from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Self::load_with_env(path, Env::prefixed(ENV_PREFIX))
    }

    fn load_with_env(path: &Path, env: Env) -> Result<Config, ConfigErrors> {
        let file = path.display().to_string();
        let one = |key: &str, reason: String| {
            ConfigErrors(vec![ConfigError {
                file: file.clone(),
                key: key.into(),
                reason,
            }])
        };
        if !path.is_file() {
            return Err(one(
                "",
                "cannot read the file: not found or not a regular file".into(),
            ));
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let figment = match ext.as_str() {
            "toml" => Figment::from(Toml::file_exact(path)),
            "yaml" | "yml" => Figment::from(Yaml::file_exact(path)),
            _ => {
                return Err(one(
                    "",
                    "unknown file type: use .toml, .yaml or .yml".into(),
                ));
            }
        };
        // Only keys under known sections come from the environment, so that variables such as
        // `TOKENWARD_CLIENT_SECRET` (referenced by `{ env = … }`) are not mistaken for config.
        // A bare section (`TOKENWARD_LOG`, the log filter override) is not config either.
        let env = env.split("__").filter(|key| {
            let mut parts = key.as_str().split('.');
            let first = parts.next().unwrap_or("");
            parts.next().is_some() && ENV_SECTIONS.iter().any(|s| first.eq_ignore_ascii_case(s))
        });
        let figment = figment.merge(env);
        let raw: FileConfig = figment.extract().map_err(|e| figment_errors(&file, e))?;
        validate(path, raw)
    }

    /// Parses and validates config text with no environment overrides; `name` stands for the
    /// file in errors. For tools and fuzzing: it touches no file.
    pub fn parse(name: &Path, text: &str, yaml: bool) -> Result<Config, ConfigErrors> {
        let figment = if yaml {
            Figment::from(Yaml::string(text))
        } else {
            Figment::from(Toml::string(text))
        };
        let file = name.display().to_string();
        let raw: FileConfig = figment.extract().map_err(|e| figment_errors(&file, e))?;
        validate(name, raw)
    }
}

fn figment_errors(file: &str, errors: figment::Error) -> ConfigErrors {
    ConfigErrors(
        errors
            .into_iter()
            .map(|e| {
                let source = match e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                    Some(figment::Source::File(p)) => p.display().to_string(),
                    Some(_) | None => match &e.metadata {
                        Some(m) if m.name.contains("environment") => "environment".to_string(),
                        _ => file.to_string(),
                    },
                };
                ConfigError {
                    file: source,
                    key: e.path.join("."),
                    reason: e.kind.to_string(),
                }
            })
            .collect(),
    )
}

struct Collector {
    file: String,
    errors: Vec<ConfigError>,
}

impl Collector {
    fn push(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            key: key.into(),
            reason: reason.into(),
        });
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn validate(path: &Path, raw: FileConfig) -> Result<Config, ConfigErrors> {
    let mut c = Collector {
        file: path.display().to_string(),
        errors: Vec::new(),
    };
    // One proxy thread: a sidecar serves one pod, which usually has a core or less, and a
    // second thread there only adds wake-ups and cross-thread hand-offs (benches/README.md).
    let threads = raw.server.threads.unwrap_or(1);
    if threads == 0 || threads > 256 {
        c.push("server.threads", "must be between 1 and 256");
    }
    let upstream_keepalive_pool_size = raw.server.upstream_keepalive_pool_size.unwrap_or(128);
    if upstream_keepalive_pool_size > 100_000 {
        c.push(
            "server.upstream_keepalive_pool_size",
            "must be at most 100000 (0 turns upstream keep-alive off)",
        );
    }
    let grace_period = HumanDuration::or(raw.server.grace_period, Duration::from_secs(10));
    let log_format = match raw.log.format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            c.push("log.format", format!("{other:?} is not one of text, json"));
            LogFormat::Text
        }
    };
    let log_level = raw.log.level.unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        c.push(
            "log.level",
            format!("{log_level:?} is not a valid level or filter"),
        );
    }
    let admin_listen = parse_listen(
        &mut c,
        "admin.listen",
        raw.admin.listen.as_deref().unwrap_or("127.0.0.1:9901"),
    );
    let state_dir = PathBuf::from(raw.state.dir.as_deref().unwrap_or("./state"));
    let shared_store = raw.state.redis.is_some();
    let state_redis = validate_state_redis(&mut c, raw.state);

    let mut credentials = Vec::new();
    for (name, dict) in raw.credentials {
        let key = format!("credentials.{name}");
        if !valid_name(&name) {
            c.push(
                &key,
                "credential names use letters, digits, '-' and '_' (at most 64)",
            );
            continue;
        }
        if let Some(cred) = validate_credential(&mut c, &key, &name, dict) {
            credentials.push(cred);
        }
    }
    for cred in &credentials {
        // Each replica would generate its own key, and a token bound to one is useless to the
        // others that share it through the store.
        if shared_store && cred.dialect.dpop().is_some_and(|k| k.generated()) {
            c.push(
                format!("credentials.{}.dpop", cred.name),
                "a key generated at start differs on every replica, but `state.redis` shares \
                 the DPoP-bound token between them; give every replica the same key with \
                 dpop_key = { file = \"…\" }",
            );
        }
    }

    if shared_store {
        check_chain_collisions(&mut c, &credentials);
    }
    check_shared_bootstrap_values(&mut c, &credentials);
    check_actors(&mut c, &credentials);
    let known: BTreeSet<&str> = credentials.iter().map(|c| c.name.as_str()).collect();
    let mut routes = Vec::new();
    let mut names = BTreeSet::new();
    for (i, route) in raw.routes.into_iter().enumerate() {
        let key = format!("routes[{i}]");
        if !valid_name(&route.name) {
            c.push(
                format!("{key}.name"),
                "route names use letters, digits, '-' and '_' (at most 64)",
            );
        } else if !names.insert(route.name.clone()) {
            c.push(
                format!("{key}.name"),
                format!("route {:?} is defined twice", route.name),
            );
        }
        if !known.contains(route.credential.as_str()) {
            c.push(
                format!("{key}.credential"),
                format!("no credential named {:?} is defined", route.credential),
            );
        }
        if let Some(r) = validate_route(&mut c, &key, route) {
            routes.push(r);
        }
    }
    check_route_overlap(&mut c, &routes);
    if routes.is_empty() && c.errors.is_empty() {
        c.push("routes", "at least one route is needed");
    }
    for r in &routes {
        if r.listen == admin_listen {
            c.push(
                "admin.listen",
                format!("same address as route {:?}", r.name),
            );
        }
    }

    if !c.errors.is_empty() {
        return Err(ConfigErrors(c.errors));
    }
    Ok(Config {
        source: path.to_path_buf(),
        threads,
        upstream_keepalive_pool_size,
        http1_fast_path: raw.server.http1_fast_path.unwrap_or(true),
        reuse_port: raw.server.reuse_port.unwrap_or(true),
        grace_period,
        log_format,
        log_level,
        admin_listen,
        admin_token: raw.admin.token,
        state_dir,
        state_redis,
        routes,
        credentials,
    })
}

/// `state.redis`, the key that seals what it holds and the user and password it is reached
/// with. A key or password read from a file or the environment is checked when the store
/// opens (and by `check`), not here.
fn validate_state_redis(c: &mut Collector, state: file::StateFile) -> Option<RedisSettings> {
    let (url, key) = (state.redis, state.encryption_key);
    let previous = state.previous_encryption_keys.unwrap_or_default();
    for (i, source) in previous.iter().enumerate() {
        if let SecretSource::Literal(secret) = source {
            if let Err(reason) = decode_encryption_key(secret) {
                c.push(format!("state.previous_encryption_keys[{i}]"), reason);
            }
        }
    }
    let auth = (state.redis_username, state.redis_password);
    let chain_ttl = HumanDuration::or(state.chain_ttl, crate::token::store::DEFAULT_CHAIN_TTL);
    // Shorter than a day would drop a chain over a quiet weekend of a batch job's credential.
    if chain_ttl < Duration::from_secs(24 * 3600) {
        c.push(
            "state.chain_ttl",
            "must be at least 1 day (a chain nobody writes for this long is dropped from Redis)",
        );
    }
    let Some(url) = url else {
        if state.chain_ttl.is_some() {
            c.push("state.chain_ttl", "is only used with `state.redis`");
        }
        if key.is_some() {
            c.push(
                "state.encryption_key",
                "is only used with `state.redis`; set both or neither",
            );
        }
        if !previous.is_empty() {
            c.push(
                "state.previous_encryption_keys",
                "is only used with `state.redis`",
            );
        }
        if auth.0.is_some() {
            c.push("state.redis_username", "is only used with `state.redis`");
        }
        if auth.1.is_some() {
            c.push("state.redis_password", "is only used with `state.redis`");
        }
        return None;
    };
    let key = match key {
        None => {
            c.push(
                "state.encryption_key",
                "is required with `state.redis`: 32 bytes as 64 hex digits or base64, \
                 e.g. { file = \"/var/run/secrets/tokenward/store-key\" }",
            );
            None
        }
        Some(SecretSource::Literal(secret)) => match decode_encryption_key(&secret) {
            Ok(_) => Some(SecretSource::Literal(secret)),
            Err(reason) => {
                c.push("state.encryption_key", reason);
                None
            }
        },
        Some(other) => Some(other),
    };
    // Without a key the URL is still checked, so one run reports both.
    let placeholder = || SecretSource::Env(String::new());
    match RedisSettings::new(&url, key.clone().unwrap_or_else(placeholder)) {
        Ok(settings) => match settings.with_credentials(auth.0, auth.1) {
            Ok(settings) => key.map(|_| {
                settings
                    .with_chain_ttl(chain_ttl)
                    .with_previous_keys(previous)
            }),
            Err((at, reason)) => {
                c.push(at, reason);
                None
            }
        },
        Err(reason) => {
            c.push("state.redis", reason);
            None
        }
    }
}

fn parse_listen(c: &mut Collector, key: &str, value: &str) -> SocketAddr {
    value.parse().unwrap_or_else(|_| {
        c.push(
            key,
            format!("{value:?} is not an IP:port address (e.g. 127.0.0.1:8080)"),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

fn validate_route(c: &mut Collector, key: &str, raw: RouteFile) -> Option<RouteConfig> {
    let listen = parse_listen(c, &format!("{key}.listen"), &raw.listen);
    let upstream = match parse_upstream(&raw.upstream) {
        Ok(u) => Some(u),
        Err(reason) => {
            c.push(format!("{key}.upstream"), reason);
            None
        }
    };
    let host = raw.host.map(|h| h.trim().to_ascii_lowercase());
    if let Some(h) = &host {
        if h.is_empty() || h.contains(['/', ' ', ':']) {
            c.push(
                format!("{key}.host"),
                format!("{h:?} is not a host name (no port, no path)"),
            );
        }
    }
    if let Some(p) = &raw.path_prefix {
        if !p.starts_with('/') {
            c.push(
                format!("{key}.path_prefix"),
                format!("{p:?} must start with '/'"),
            );
        }
    }
    let reauth_statuses = raw.reauth_statuses.unwrap_or_else(|| vec![401]);
    if let Some(bad) = reauth_statuses.iter().find(|s| !(400..=499).contains(*s)) {
        c.push(
            format!("{key}.reauth_statuses"),
            format!("{bad} is not a 4xx status"),
        );
    }
    // Below the 5 s keep-alive of Node and many other servers.
    let idle_timeout = HumanDuration::or(raw.idle_timeout, Duration::from_secs(4));
    if idle_timeout < Duration::from_millis(100) || idle_timeout > Duration::from_secs(3600) {
        c.push(
            format!("{key}.idle_timeout"),
            "must be between 100ms and 1h (and shorter than the upstream's keep-alive timeout)",
        );
    }
    let ca_file = raw.ca_file.map(PathBuf::from);
    if let Some(ca) = &ca_file {
        if let Err(reason) = crate::ca_bundle::load(ca) {
            c.push(format!("{key}.ca_file"), reason);
        }
    }
    let client_cert = transport::client_cert(c, key, raw.tls_client_cert, raw.tls_client_key);
    if let (Some(cert), Some(u)) = (&client_cert, &upstream) {
        if !u.tls {
            c.push(
                cert.cert_key.clone(),
                "is presented only over TLS: the upstream must be https://",
            );
        }
    }
    Some(RouteConfig {
        name: raw.name,
        listen,
        upstream: upstream?,
        credential: raw.credential,
        host,
        path_prefix: raw.path_prefix,
        ca_file,
        http2: raw.http2.unwrap_or(true),
        connect_timeout: HumanDuration::or(raw.connect_timeout, Duration::from_secs(5)),
        read_timeout: HumanDuration::or(raw.read_timeout, Duration::from_secs(60)),
        idle_timeout,
        upstream_keepalive: raw.upstream_keepalive.unwrap_or(true),
        reauth_statuses,
        client_cert,
    })
}

/// Two credentials with one chain identity would share one refresh chain in the shared store:
/// either they are one account (and the second route should name the first credential) or the
/// identity cannot tell their accounts apart — and then one route would be served the other
/// account's tokens. Both are refused, naming both.
fn check_chain_collisions(c: &mut Collector, credentials: &[CredentialConfig]) {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for cred in credentials {
        if cred.dialect.exchange_settings().is_some() || cred.dialect.keeps_tokens_in_memory_only()
        {
            // Per-caller tokens only, or tokens persisted nowhere: no chain in the store.
            continue;
        }
        if let Some(first) = seen.insert(cred.chain_identity(), &cred.name) {
            let (key, why) = match &cred.chain {
                Some(name) => (
                    format!("credentials.{}.chain", cred.name),
                    format!("credential {first:?} already uses chain {name:?}"),
                ),
                None => (
                    format!("credentials.{}", cred.name),
                    format!(
                        "has the same provider, client and account as credential {first:?}, so \
                         both would share one refresh chain in `state.redis`; for one account \
                         point both routes at one credential, for two accounts give each its \
                         own `chain = \"NAME\"`"
                    ),
                ),
            };
            c.push(key, why);
        }
    }
}

/// Two credentials whose bootstrap refresh tokens hold one value would each spend it: one
/// value is one token family at the provider, and a strict provider revokes the family at its
/// second use. Their identities may still differ (the token URL spelled two ways, the value in
/// two files or a file and a variable), so the values are compared. A value that cannot be read
/// now is left to the credential's own start, which says why.
fn check_shared_bootstrap_values(c: &mut Collector, credentials: &[CredentialConfig]) {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for cred in credentials {
        let Some(value) = cred
            .dialect
            .bootstrap_refresh_token()
            .and_then(|source| source.resolve().ok())
        else {
            continue;
        };
        if let Some(first) = seen.insert(value.fingerprint(), &cred.name) {
            c.push(
                format!("credentials.{}.refresh_token", cred.name),
                format!(
                    "holds the same refresh token as credential {first:?}: both would spend it, \
                     and a provider that rotates refresh tokens revokes the family at its second \
                     use; point both routes at one credential"
                ),
            );
        }
    }
}

/// A token-exchange credential's `actor` must name another credential that has a token of its
/// own (a per-caller credential has none to act with).
fn check_actors(c: &mut Collector, credentials: &[CredentialConfig]) {
    for cred in credentials {
        let Some(actor) = cred
            .dialect
            .exchange_settings()
            .and_then(|s| s.actor.as_deref())
        else {
            continue;
        };
        let key = format!("credentials.{}.actor", cred.name);
        match credentials.iter().find(|a| a.name == actor) {
            _ if actor == cred.name => c.push(key, "cannot name the credential itself"),
            None => c.push(key, format!("no credential named {actor:?} is defined")),
            Some(a) if a.dialect.exchange_settings().is_some() => c.push(
                key,
                format!("credential {actor:?} exchanges tokens per caller and has no token of its own to act with"),
            ),
            Some(_) => {}
        }
    }
}

/// Two routes on one listener that match exactly the same requests would make one unreachable.
fn check_route_overlap(c: &mut Collector, routes: &[RouteConfig]) {
    let mut seen: BTreeMap<(SocketAddr, Option<String>, Option<String>), &str> = BTreeMap::new();
    for r in routes {
        let k = (r.listen, r.host.clone(), r.path_prefix.clone());
        if let Some(other) = seen.insert(k, &r.name) {
            c.push(
                format!("routes.{}", r.name),
                format!("matches exactly the same requests as route {other:?} (same listen, host and path_prefix)"),
            );
        }
    }
}

pub fn parse_upstream(raw: &str) -> Result<Upstream, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    let tls = match url.scheme() {
        "http" => false,
        "https" => true,
        other => return Err(format!("scheme {other:?} is not http or https")),
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in the upstream URL are not allowed; use a credential".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the upstream URL takes no query or fragment".into());
    }
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        None => return Err(format!("{raw:?} has no host")),
    };
    let port = url.port_or_known_default().ok_or("no port")?;
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let base_path = url.path().trim_end_matches('/').to_string();
    Ok(Upstream {
        tls,
        host,
        port,
        base_path,
        authority,
    })
}

fn validate_credential(
    c: &mut Collector,
    key: &str,
    name: &str,
    mut dict: figment::value::Dict,
) -> Option<CredentialConfig> {
    let fingerprint = {
        use sha2::{Digest, Sha256};
        let canonical = serde_json::to_string(&dict).unwrap_or_default();
        let digest = Sha256::digest(canonical.as_bytes());
        digest[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let mut common = figment::value::Dict::new();
    for k in CommonCredentialFile::KEYS {
        if let Some(v) = dict.remove(*k) {
            common.insert((*k).to_string(), v);
        }
    }
    let common: CommonCredentialFile = match figment::value::Value::from(common).deserialize() {
        Ok(v) => v,
        Err(e) => {
            for e in e {
                let sub = e.path.join(".");
                let k = if sub.is_empty() {
                    key.to_string()
                } else {
                    format!("{key}.{sub}")
                };
                let reason = if e.path.is_empty() && e.kind.to_string().contains("dialect") {
                    format!(
                        "`dialect` is required; one of: {}",
                        dialect::NAMES.join(", ")
                    )
                } else {
                    e.kind.to_string()
                };
                c.push(k, reason);
            }
            return None;
        }
    };
    let built = match dialect::build(&common.dialect, name, dict) {
        Ok(d) => d,
        Err(errs) => {
            for (sub, reason) in errs {
                let k = if sub.is_empty() {
                    key.to_string()
                } else {
                    format!("{key}.{sub}")
                };
                c.push(k, reason);
            }
            return None;
        }
    };
    let defaults = Timing::default();
    let or = HumanDuration::or;
    let timing = Timing {
        default_lifetime: or(common.default_lifetime, defaults.default_lifetime),
        refresh_at: common.refresh_at.unwrap_or(defaults.refresh_at),
        expiry_margin: or(common.expiry_margin, defaults.expiry_margin),
        min_refresh_interval: or(common.min_refresh_interval, defaults.min_refresh_interval),
        max_backoff: or(common.max_backoff, defaults.max_backoff),
        probe_interval: or(common.probe_interval, defaults.probe_interval),
        timeout: or(common.timeout, defaults.timeout),
    };
    if !(timing.refresh_at > 0.0 && timing.refresh_at < 1.0) {
        c.push(
            format!("{key}.refresh_at"),
            "must be a fraction of the lifetime between 0 and 1 (e.g. 0.75)",
        );
    }
    if timing.default_lifetime < Duration::from_secs(1) {
        c.push(format!("{key}.default_lifetime"), "must be at least 1s");
    }
    if timing.timeout < Duration::from_millis(100) || timing.timeout > Duration::from_secs(300) {
        c.push(format!("{key}.timeout"), "must be between 100ms and 300s");
    }
    if timing.probe_interval < Duration::from_millis(100) {
        c.push(format!("{key}.probe_interval"), "must be at least 100ms");
    }
    if timing.max_backoff < timing.probe_interval {
        c.push(
            format!("{key}.max_backoff"),
            "must not be shorter than probe_interval",
        );
    }
    let mut transport = transport::validate(c, key, common.proxy.clone(), common.ca_file.clone());
    let (cert, cert_key) = (
        common.tls_client_cert.clone(),
        common.tls_client_key.clone(),
    );
    if built.tls_client_auth() {
        if cert.is_none() && cert_key.is_none() {
            c.push(
                format!("{key}.tls_client_cert"),
                "is required (with tls_client_key) by client_auth = \"tls_client_auth\" or \"self_signed_tls_client_auth\"",
            );
        }
        transport.client_cert = transport::client_cert(c, key, cert, cert_key);
    } else {
        for (k, given) in [
            ("tls_client_cert", cert.is_some()),
            ("tls_client_key", cert_key.is_some()),
        ] {
            if given {
                c.push(
                    format!("{key}.{k}"),
                    "is used only with client_auth = \"tls_client_auth\" or \"self_signed_tls_client_auth\" (the certificate goes to the token endpoint only)",
                );
            }
        }
    }
    let mut fingerprint = fingerprint;
    if let Some(dpop) = built.dpop() {
        // RFC 9449 §7.1: a DPoP-bound token goes in Authorization with the DPoP scheme.
        if common
            .header
            .as_deref()
            .is_some_and(|h| !h.eq_ignore_ascii_case("authorization"))
        {
            c.push(
                format!("{key}.header"),
                "a DPoP credential's token is sent in Authorization; leave `header` unset",
            );
        }
        if common
            .format
            .as_deref()
            .is_some_and(|f| f != "DPoP {token}")
        {
            c.push(
                format!("{key}.format"),
                "a DPoP credential's token is sent as `DPoP {token}`; leave `format` unset",
            );
        }
        // A new key file is a new credential (a token bound to the old key is useless).
        if !dpop.generated() {
            fingerprint.push('-');
            fingerprint.push_str(dpop.thumbprint());
        }
    }
    let chain = common.chain.clone();
    if let Some(name) = &chain {
        if !valid_name(name) {
            c.push(
                format!("{key}.chain"),
                "chain names use letters, digits, '-' and '_' (at most 64)",
            );
        }
    }
    let header = common.header.as_deref().unwrap_or("Authorization");
    let format = common
        .format
        .clone()
        .unwrap_or_else(|| built.default_format().to_string());
    let presentation = match Presentation::parse(header, &format) {
        Ok(p) => p,
        Err(reason) => {
            let k = if reason.contains("header name") {
                "header"
            } else {
                "format"
            };
            c.push(format!("{key}.{k}"), reason);
            return None;
        }
    };
    Some(CredentialConfig {
        name: name.to_string(),
        dialect_name: common.dialect,
        dialect: built,
        presentation,
        timing,
        transport,
        fingerprint,
        chain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(ext: &str, text: &str) -> Result<Config, ConfigErrors> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("c.{ext}"));
        std::fs::write(&path, text).unwrap();
        Config::load_with_env(&path, Env::prefixed("TOKENWARD_UNIT_TEST_NONE_"))
    }

    const GOOD: &str = r#"
[[routes]]
name = "orders"
listen = "127.0.0.1:8080"
upstream = "https://orders.example.com/api/"
credential = "orders"

[credentials.orders]
dialect = "oauth2"
token_url = "https://idp.example.com/oauth2/token"
client_id = "tokenward"
client_secret = "s3cret"
"#;

    #[test]
    fn accepts_the_minimal_example_with_defaults() {
        let cfg = load_str("toml", GOOD).unwrap();
        assert_eq!(cfg.admin_listen.to_string(), "127.0.0.1:9901");
        assert_eq!(cfg.routes[0].upstream.authority, "orders.example.com");
        assert_eq!(cfg.routes[0].upstream.base_path, "/api");
        assert!(cfg.routes[0].upstream.tls);
        assert_eq!(cfg.credentials[0].presentation.render("abc"), "Bearer abc");
        assert_eq!(cfg.credentials[0].timing, Timing::default());
    }

    #[test]
    fn dpop_credentials_keep_authorization_and_a_shared_store_needs_a_key_file() {
        let with = |extra: &str, state: &str| {
            load_str(
                "toml",
                &format!("{state}\n{}\ndpop = true\n{extra}\n", GOOD.trim()),
            )
        };
        let cfg = with("", "").unwrap();
        assert_eq!(cfg.credentials[0].presentation.render("t"), "DPoP t");
        let keys = |e: ConfigErrors| e.0.into_iter().map(|e| e.key).collect::<Vec<_>>();
        let e = keys(with("format = \"Bearer {token}\"\nheader = \"X-Token\"", "").unwrap_err());
        assert!(
            e.contains(&"credentials.orders.format".to_string()),
            "{e:?}"
        );
        assert!(
            e.contains(&"credentials.orders.header".to_string()),
            "{e:?}"
        );
        assert!(with("format = \"DPoP {token}\"", "").is_ok());
        let redis = "[state]\nredis = \"redis://127.0.0.1:6379/0\"\nencryption_key = \"0000000000000000000000000000000000000000000000000000000000000000\"";
        let e = with("", redis).unwrap_err();
        assert_eq!(keys(e.clone()), vec!["credentials.orders.dpop".to_string()]);
        assert!(e.to_string().contains("dpop_key"), "{e}");
    }

    #[test]
    fn a_sidecar_runs_one_proxy_thread_and_pingoras_pool_size_unless_told() {
        let cfg = load_str("toml", GOOD).unwrap();
        assert_eq!((cfg.threads, cfg.upstream_keepalive_pool_size), (1, 128));
        let cfg = load_str(
            "toml",
            &format!("[server]\nthreads = 4\nupstream_keepalive_pool_size = 0\n{GOOD}"),
        )
        .unwrap();
        assert_eq!((cfg.threads, cfg.upstream_keepalive_pool_size), (4, 0));
        let err = load_str(
            "toml",
            &format!("[server]\nupstream_keepalive_pool_size = 1000000\n{GOOD}"),
        )
        .unwrap_err();
        assert_eq!(err.0[0].key, "server.upstream_keepalive_pool_size");
    }

    #[test]
    fn the_http1_fast_path_is_on_unless_turned_off() {
        assert!(load_str("toml", GOOD).unwrap().http1_fast_path);
        let off = format!("[server]\nhttp1_fast_path = false\n{GOOD}");
        assert!(!load_str("toml", &off).unwrap().http1_fast_path);
        let wrong = format!("[server]\nhttp1_fast_path = \"sometimes\"\n{GOOD}");
        assert_eq!(
            load_str("toml", &wrong).unwrap_err().0[0].key,
            "server.http1_fast_path"
        );
    }

    #[test]
    fn reuse_port_is_on_unless_turned_off() {
        assert!(load_str("toml", GOOD).unwrap().reuse_port);
        let off = format!("[server]\nreuse_port = false\n{GOOD}");
        assert!(!load_str("toml", &off).unwrap().reuse_port);
        let wrong = format!("[server]\nreuse_port = 1\n{GOOD}");
        assert_eq!(
            load_str("toml", &wrong).unwrap_err().0[0].key,
            "server.reuse_port"
        );
    }

    #[test]
    fn unknown_keys_are_errors_naming_file_and_key() {
        let err = load_str(
            "toml",
            &format!("{GOOD}\n[admin]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n"),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("c.toml"), "{text}");
        assert!(text.contains("lisen"), "{text}");
        let err = load_str("toml", &GOOD.replace("client_id =", "client_idd =")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("credentials.orders"), "{text}");
        assert!(text.contains("client_idd"), "{text}");
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let bad = GOOD
            .replace("listen = \"127.0.0.1:8080\"", "listen = \"localhost\"")
            .replace("credential = \"orders\"", "credential = \"nope\"")
            .replace("https://orders", "ftp://orders");
        let err = load_str("toml", &bad).unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"routes[0].listen"), "{keys:?}");
        assert!(keys.contains(&"routes[0].credential"), "{keys:?}");
        assert!(keys.contains(&"routes[0].upstream"), "{keys:?}");
    }

    #[test]
    fn yaml_works_too() {
        let yaml = r#"
routes:
  - name: a
    listen: 127.0.0.1:8080
    upstream: http://127.0.0.1:9000
    credential: a
credentials:
  a:
    dialect: oauth2
    token_url: http://127.0.0.1:9001/token
    client_id: x
    client_secret: { env: SOME_VAR }
    refresh_at: 0.5
    expiry_margin: 10s
"#;
        let cfg = load_str("yaml", yaml).unwrap();
        assert_eq!(cfg.credentials[0].timing.refresh_at, 0.5);
        assert_eq!(
            cfg.credentials[0].timing.expiry_margin,
            Duration::from_secs(10)
        );
        assert_eq!(cfg.routes[0].upstream.authority, "127.0.0.1:9000");
    }

    #[test]
    fn bad_format_and_refresh_at_are_rejected() {
        let bad = format!("{GOOD}format = \"Bearer\"\nrefresh_at = 1.5\n");
        let err = load_str("toml", &bad).unwrap_err().to_string();
        assert!(err.contains("credentials.orders.refresh_at"), "{err}");
        assert!(err.contains("credentials.orders.format"), "{err}");
    }

    #[test]
    fn env_overrides_file_and_ignores_other_variables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, GOOD).unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("TWTEST_ADMIN__LISTEN", "127.0.0.1:7777");
            jail.set_env("TWTEST_CREDENTIALS__ORDERS__SCOPE", "orders.write");
            jail.set_env("TWTEST_CLIENT_SECRET", "not-config");
            jail.set_env("TWTEST_LOG", "pingora_proxy=debug");
            let cfg = Config::load_with_env(&path, Env::prefixed("TWTEST_")).unwrap();
            assert_eq!(cfg.admin_listen.to_string(), "127.0.0.1:7777");
            assert!(
                cfg.credentials[0]
                    .dialect
                    .describe()
                    .contains("orders.write")
            );
            Ok(())
        });
    }

    const STORE_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    /// The chain identity of credential `orders` written with `keys` (oauth2, one client).
    fn identity_of(keys: &str) -> String {
        let text = format!(
            "[[routes]]\nname = \"r\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://u\"\ncredential = \"orders\"\n\
             [credentials.orders]\ndialect = \"oauth2\"\ntoken_url = \"https://idp.example/token\"\n\
             client_id = \"c1\"\nclient_secret = \"s\"\n{keys}\n"
        );
        load_str("toml", &text).unwrap().credentials[0].chain_identity()
    }

    #[test]
    fn chain_identity_names_the_account_and_leaves_out_what_does_not_change_it() {
        let rt = |file: &str| {
            format!("grant = \"refresh_token\"\nrefresh_token = {{ file = \"{file}\" }}")
        };
        let alice = identity_of(&rt("/s/alice"));
        // Another account's refresh token (read from elsewhere) is another chain.
        assert_ne!(alice, identity_of(&rt("/s/bob")));
        // Scope and extra parameters choose what a token is for, not whose it is.
        assert_eq!(
            alice,
            identity_of(&format!(
                "{}\nscope = \"a b\"\nextra_params = {{ x = \"1\" }}",
                rt("/s/alice")
            ))
        );
        // A refresh token written inline is told apart by its value's fingerprint.
        let inline = |v: &str| format!("grant = \"refresh_token\"\nrefresh_token = \"{v}\"");
        assert_ne!(identity_of(&inline("rt-a")), identity_of(&inline("rt-b")));
        // The user of a password grant is the account.
        let user = |u: &str| format!("grant = \"password\"\nusername = \"{u}\"\npassword = \"p\"");
        assert_ne!(identity_of(&user("alice")), identity_of(&user("bob")));
        assert_eq!(identity_of(&user("alice")), identity_of(&user("alice")));
        // The assertion's source names the account of a jwt_bearer grant.
        let jwt = |f: &str| format!("grant = \"jwt_bearer\"\nassertion = {{ file = \"{f}\" }}");
        assert_ne!(identity_of(&jwt("/a")), identity_of(&jwt("/b")));
        // An explicit chain name replaces all of it.
        assert_eq!(
            identity_of(&format!("{}\nchain = \"acct-1\"", rt("/s/alice"))),
            identity_of(&format!("{}\nchain = \"acct-1\"", rt("/s/bob")))
        );
        assert_ne!(
            identity_of(&format!("{}\nchain = \"acct-1\"", rt("/s/alice"))),
            alice
        );
        // A named chain's key is the name alone: the token URL (respelled, moved) and the
        // client stay out, so naming a chain first frees every other setting to change.
        let named = load_str(
            "toml",
            &GOOD.replace(
                "[credentials.orders]\n",
                "[credentials.orders]\nchain = \"acct-1\"\n",
            ),
        )
        .unwrap()
        .credentials[0]
            .clone();
        assert_eq!(
            named.chain_identity(),
            identity_of(&format!("{}\nchain = \"acct-1\"", rt("/s/alice")))
        );
        // Unnamed, the same settings derive the identity they had before the name.
        assert_ne!(named.unnamed_chain_identity(), named.chain_identity());
        assert_eq!(
            load_str("toml", GOOD).unwrap().credentials[0].chain_identity(),
            named.unnamed_chain_identity()
        );
        let err = load_str(
            "toml",
            &GOOD.replace(
                "[credentials.orders]\n",
                "[credentials.orders]\nchain = \"a b\"\n",
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("credentials.orders.chain"), "{err}");
    }

    #[test]
    fn a_file_origin_spelled_two_ways_is_one_chain_identity() {
        let rt = |file: &str| {
            format!("grant = \"refresh_token\"\nrefresh_token = {{ file = \"{file}\" }}")
        };
        let alice = identity_of(&rt("/s/alice.rt"));
        for alias in [
            "/s/./alice.rt",
            "/s/x/../alice.rt",
            "/s//alice.rt",
            "/s/x/./../alice.rt",
        ] {
            assert_eq!(alice, identity_of(&rt(alias)), "{alias}");
        }
        assert_ne!(alice, identity_of(&rt("/s/x/alice.rt")));
        // A relative path is read against the working directory, so it is that file's chain.
        let cwd = std::env::current_dir().unwrap();
        let absolute = cwd.join("alice.rt").display().to_string();
        assert_eq!(identity_of(&rt(&absolute)), identity_of(&rt("./alice.rt")));
        assert_eq!(identity_of(&rt(&absolute)), identity_of(&rt("alice.rt")));

        // Two credentials reading one file through aliases are refused at load time.
        let two = format!(
            "[state]\nredis = \"redis://127.0.0.1\"\nencryption_key = \"{STORE_KEY}\"\n\
             [[routes]]\nname = \"r\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://u\"\ncredential = \"a\"\n\
             [credentials.a]\ndialect = \"oauth2\"\ntoken_url = \"https://idp.example/token\"\nclient_id = \"c1\"\nclient_secret = \"s\"\n{}\n\
             [credentials.b]\ndialect = \"oauth2\"\ntoken_url = \"https://idp.example/token\"\nclient_id = \"c1\"\nclient_secret = \"s\"\n{}\n",
            rt("/s/alice.rt"),
            rt("/s/./alice.rt")
        );
        let err = load_str("toml", &two).unwrap_err();
        assert_eq!(err.0[0].key, "credentials.b", "{err}");
    }

    #[test]
    fn two_credentials_of_one_account_are_refused_with_a_shared_store_only() {
        let two = |state: &str| {
            format!(
                "{state}[[routes]]\nname = \"r\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://u\"\ncredential = \"a\"\n\
                 [credentials.a]\ndialect = \"oauth2\"\ntoken_url = \"https://idp.example/token\"\nclient_id = \"c1\"\nclient_secret = \"s\"\nscope = \"read\"\n\
                 [credentials.b]\ndialect = \"oauth2\"\ntoken_url = \"https://idp.example/token\"\nclient_id = \"c1\"\nclient_secret = \"s\"\nscope = \"write\"\n"
            )
        };
        assert!(load_str("toml", &two("")).is_ok());
        let shared =
            format!("[state]\nredis = \"redis://127.0.0.1\"\nencryption_key = \"{STORE_KEY}\"\n");
        let err = load_str("toml", &two(&shared)).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].key, "credentials.b");
        assert!(err.0[0].reason.contains("\"a\""), "{err}");
        assert!(err.0[0].reason.contains("chain"), "{err}");
        assert!(err.to_string().contains("c.toml"), "{err}");
        // Told apart by name, they load; one name twice is refused, naming the first.
        let named = two(&shared).replace("scope = \"write\"", "scope = \"write\"\nchain = \"w\"");
        assert!(load_str("toml", &named).is_ok());
        let twice = named.replace("scope = \"read\"", "scope = \"read\"\nchain = \"w\"");
        let err = load_str("toml", &twice).unwrap_err();
        assert_eq!(err.0[0].key, "credentials.b.chain", "{err}");
        assert!(err.0[0].reason.contains("\"a\""), "{err}");
    }

    #[test]
    fn credentials_persisted_nowhere_share_no_chain_so_one_source_may_serve_several() {
        // S3 and OpenSearch signed with the one instance role, beside a shared store: AWS
        // credentials never reach the store, so they have no chain to collide on.
        let text = format!(
            "[state]\nredis = \"redis://127.0.0.1\"\nencryption_key = \"{STORE_KEY}\"\n\
             [[routes]]\nname = \"r\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://u\"\ncredential = \"a\"\n\
             [credentials.a]\ndialect = \"aws-sigv4\"\nregion = \"eu-west-1\"\nservice = \"s3\"\naccess_key_id = \"AKID\"\nsecret_access_key = \"s\"\n\
             [credentials.b]\ndialect = \"aws-sigv4\"\nregion = \"eu-west-1\"\nservice = \"es\"\naccess_key_id = \"AKID\"\nsecret_access_key = \"s\"\n"
        );
        assert!(
            load_str("toml", &text).is_ok(),
            "{:?}",
            load_str("toml", &text).err()
        );
    }

    #[test]
    fn two_credentials_holding_one_bootstrap_value_are_refused_however_they_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rt");
        std::fs::write(&file, "rt-alice\n").unwrap();
        let cred = |name: &str, url: &str, source: &str| {
            format!(
                "[credentials.{name}]\ndialect = \"oauth2\"\ntoken_url = \"{url}\"\nclient_id = \"c1\"\nclient_secret = \"s\"\ngrant = \"refresh_token\"\nrefresh_token = {source}\n"
            )
        };
        let routes = "[[routes]]\nname = \"r\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://u\"\ncredential = \"a\"\n";
        let from_file = format!("{{ file = \"{}\" }}", file.display());
        for (a, b) in [
            // One value, read two ways; one provider spelled two ways.
            (
                cred("a", "https://idp/token", &from_file),
                cred("b", "https://idp/token", "\"rt-alice\""),
            ),
            (
                cred("a", "https://idp/token", "\"rt-alice\""),
                cred("b", "https://IDP/token?", "\"rt-alice\""),
            ),
        ] {
            let err = load_str("toml", &format!("{routes}{a}{b}")).unwrap_err();
            assert_eq!(err.0.len(), 1, "{err}");
            assert_eq!(err.0[0].key, "credentials.b.refresh_token", "{err}");
            assert!(err.0[0].reason.contains("\"a\""), "{err}");
            assert!(
                !err.to_string().contains("rt-alice"),
                "the value is never shown: {err}"
            );
        }
        let apart = format!(
            "{routes}{}{}",
            cred("a", "https://idp/token", &from_file),
            cred("b", "https://idp/token", "\"rt-bob\"")
        );
        assert!(load_str("toml", &apart).is_ok());
    }

    #[test]
    fn redis_state_needs_a_valid_url_and_a_32_byte_key() {
        let with = |state: &str| load_str("toml", &format!("{GOOD}\n[state]\n{state}\n"));
        let cfg = with(&format!(
            "redis = \"rediss://tw:hunter2-pw@redis.internal:6380/1\"\nencryption_key = \"{STORE_KEY}\""
        ))
        .unwrap();
        let redis = cfg.state_redis.expect("redis settings");
        assert_eq!(redis.describe(), "redis at redis.internal:6380/1 (TLS)");
        assert!(!format!("{redis:?}").contains("hunter2-pw"));
        assert!(with("dir = \"/var/lib/tw\"").unwrap().state_redis.is_none());
        // Chains expire 30 days after their last write unless `chain_ttl` says otherwise.
        assert_eq!(redis.chain_ttl(), Duration::from_secs(30 * 24 * 3600));
        let base = format!("redis = \"redis://127.0.0.1\"\nencryption_key = \"{STORE_KEY}\"");
        let ttl = with(&format!("{base}\nchain_ttl = \"90d\""))
            .unwrap()
            .state_redis
            .unwrap()
            .chain_ttl();
        assert_eq!(ttl, Duration::from_secs(90 * 24 * 3600));
        for bad in [
            format!("{base}\nchain_ttl = \"1h\""),
            "chain_ttl = \"90d\"".to_string(),
        ] {
            let err = with(&bad).unwrap_err();
            assert_eq!(err.0[0].key, "state.chain_ttl", "{err}");
        }
        // Previous keys: the same format, read only; a literal is checked here, naming its
        // place in the list, and they need `state.redis`.
        let previous = with(&format!(
            "{base}\nprevious_encryption_keys = [\"{}\", {{ file = \"/k/old\" }}]",
            "ab".repeat(32)
        ))
        .unwrap()
        .state_redis
        .unwrap();
        assert_eq!(previous.previous_encryption_keys.len(), 2);
        assert!(!format!("{previous:?}").contains(&"ab".repeat(32)));
        let err = with(&format!(
            "{base}\nprevious_encryption_keys = [\"{}\", \"short\"]",
            "ab".repeat(32)
        ))
        .unwrap_err();
        assert_eq!(err.0[0].key, "state.previous_encryption_keys[1]", "{err}");
        assert!(!err.to_string().contains("short"), "{err}");
        let err = with(&format!("previous_encryption_keys = [\"{STORE_KEY}\"]")).unwrap_err();
        assert_eq!(err.0[0].key, "state.previous_encryption_keys", "{err}");
        // A key read from a file is checked when it is read (at start, and by `check`).
        let cfg =
            with("redis = \"redis://127.0.0.1\"\nencryption_key = { file = \"/nonexistent/k\" }");
        assert!(cfg.unwrap().state_redis.is_some());

        let errors = |state: &str| {
            let err = with(state).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("c.toml"), "{text}");
            assert!(!text.contains("hunter2-pw"), "{text}");
            assert!(!text.contains(&STORE_KEY[..40]), "{text}");
            err.0
                .into_iter()
                .map(|e| (e.key, e.reason))
                .collect::<Vec<_>>()
        };
        let errs = errors("redis = \"redis://:hunter2-pw@127.0.0.1:6379/0\"");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].0, "state.encryption_key");
        assert!(errs[0].1.contains("required"), "{errs:?}");

        let errs = errors(&format!(
            "redis = \"http://:hunter2-pw@127.0.0.1:6379\"\nencryption_key = \"{STORE_KEY}\""
        ));
        assert_eq!(errs[0].0, "state.redis");
        assert!(errs[0].1.contains("scheme"), "{errs:?}");

        // Both problems are reported at once.
        let errs = errors("redis = \"tcp://:hunter2-pw@h\"");
        let keys: Vec<_> = errs.iter().map(|(k, _)| k.as_str()).collect();
        assert!(
            keys.contains(&"state.redis") && keys.contains(&"state.encryption_key"),
            "{errs:?}"
        );

        for short in [&STORE_KEY[..40], "c2hvcnQ="] {
            let errs = errors(&format!(
                "redis = \"redis://127.0.0.1\"\nencryption_key = \"{short}\""
            ));
            assert_eq!(errs[0].0, "state.encryption_key");
            assert!(errs[0].1.contains("32 bytes"), "{errs:?}");
            assert!(!errs[0].1.contains(short), "{errs:?}");
        }

        let errs = errors(&format!("encryption_key = \"{STORE_KEY}\""));
        assert_eq!(errs[0].0, "state.encryption_key");
        assert!(errs[0].1.contains("state.redis"), "{errs:?}");
    }

    #[test]
    fn redis_username_and_password_keys() {
        let with = |state: &str| load_str("toml", &format!("{GOOD}\n[state]\n{state}\n"));
        let key = format!("encryption_key = \"{STORE_KEY}\"");
        let cfg = with(&format!(
            "redis = \"rediss://redis.internal:6380/1\"\n{key}\nredis_username = \"tw\"\n\
             redis_password = \"hunter2-pw\""
        ))
        .unwrap();
        let redis = cfg.state_redis.expect("redis settings");
        assert!(!format!("{redis:?}").contains("hunter2-pw"));
        // A file password is read when the store connects, not at load.
        let cfg = with(&format!(
            "redis = \"redis://127.0.0.1\"\n{key}\nredis_password = {{ file = \"/nonexistent/pw\" }}"
        ));
        assert!(cfg.unwrap().state_redis.is_some());
        let cfg = with(&format!(
            "redis = \"redis://127.0.0.1\"\n{key}\nredis_password = {{ env = \"TW_REDIS_PW\" }}"
        ));
        assert!(cfg.unwrap().state_redis.is_some());
        // A reload compares settings to refuse a change of either key (restart-only).
        let store = |auth: &str| {
            with(&format!("redis = \"redis://127.0.0.1\"\n{key}\n{auth}"))
                .unwrap()
                .state_redis
                .unwrap()
        };
        let base = "redis_username = \"tw\"\nredis_password = { file = \"/a\" }";
        assert_eq!(store(base), store(base));
        assert_ne!(store(base), store(&base.replace("/a", "/b")));
        assert_ne!(store(base), store(&base.replace("\"tw\"", "\"other\"")));
        assert_ne!(store(base), store("redis_password = { file = \"/a\" }"));

        let errors = |state: &str| {
            let err = with(state).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("c.toml"), "{text}");
            assert!(!text.contains("hunter2-pw"), "{text}");
            err.0
                .into_iter()
                .map(|e| (e.key, e.reason))
                .collect::<Vec<_>>()
        };
        let errs = errors(&format!(
            "redis = \"redis://:hunter2-pw@127.0.0.1\"\n{key}\nredis_password = \"hunter2-pw\""
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].0, "state.redis_password");
        assert!(errs[0].1.contains("URL"), "{errs:?}");
        let errs = errors(&format!(
            "redis = \"redis://tw@127.0.0.1\"\n{key}\nredis_username = \"tw\"\n\
             redis_password = \"hunter2-pw\""
        ));
        assert_eq!(errs[0].0, "state.redis_username");
        assert!(errs[0].1.contains("URL"), "{errs:?}");
        let errs = errors("redis_password = \"hunter2-pw\"");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].0, "state.redis_password");
        assert!(errs[0].1.contains("state.redis"), "{errs:?}");
        let errs = errors("redis_username = \"tw\"");
        assert_eq!(errs[0].0, "state.redis_username");
        assert!(errs[0].1.contains("state.redis"), "{errs:?}");
        let errs = errors(&format!(
            "redis = \"redis://127.0.0.1\"\n{key}\nredis_username = \"tw\""
        ));
        assert_eq!(errs[0].0, "state.redis_username");
        assert!(errs[0].1.contains("password"), "{errs:?}");
    }

    #[test]
    fn redis_url_may_come_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            format!("{GOOD}\n[state]\nencryption_key = {{ env = \"TW_STORE_KEY\" }}\n"),
        )
        .unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "TWTEST_STATE__REDIS",
                "redis://:from-env-pw@10.0.0.7:6379/4",
            );
            let cfg = Config::load_with_env(&path, Env::prefixed("TWTEST_")).unwrap();
            let redis = cfg.state_redis.unwrap();
            assert_eq!(redis.describe(), "redis at 10.0.0.7:6379/4");
            assert!(!format!("{redis:?}").contains("from-env-pw"));
            Ok(())
        });
    }

    #[test]
    fn route_idle_timeout_defaults_below_5s_and_is_bounded() {
        let cfg = load_str("toml", GOOD).unwrap();
        assert_eq!(cfg.routes[0].idle_timeout, Duration::from_secs(4));
        let with = |v: &str| {
            GOOD.replacen(
                "credential = \"orders\"\n",
                &format!("credential = \"orders\"\nidle_timeout = {v}\n"),
                1,
            )
        };
        let cfg = load_str("toml", &with("\"90s\"")).unwrap();
        assert_eq!(cfg.routes[0].idle_timeout, Duration::from_secs(90));
        for bad in ["\"0s\"", "\"50ms\"", "\"2h\""] {
            let err = load_str("toml", &with(bad)).unwrap_err().to_string();
            assert!(err.contains("c.toml"), "{err}");
            assert!(err.contains("`routes[0].idle_timeout`"), "{err}");
            assert!(err.contains("between 100ms and 1h"), "{err}");
        }
        let err = load_str("toml", &with("\"soon\"")).unwrap_err().to_string();
        assert!(err.contains("idle_timeout"), "{err}");
    }

    #[test]
    fn upstream_urls() {
        let u = parse_upstream("http://[::1]:8080").unwrap();
        assert_eq!(u.authority, "[::1]:8080");
        assert!(parse_upstream("https://user:pw@x").is_err());
        assert!(parse_upstream("https://x/?a=b").is_err());
        assert_eq!(parse_upstream("https://x:443").unwrap().authority, "x");
    }
}
