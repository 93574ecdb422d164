//! The configuration file as written by people: serde structs only, no validation.

use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::time::Duration;

use crate::secret::SecretSource;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerFile,
    #[serde(default)]
    pub log: LogFile,
    #[serde(default)]
    pub admin: AdminFile,
    #[serde(default)]
    pub state: StateFile,
    #[serde(default)]
    pub routes: Vec<RouteFile>,
    #[serde(default)]
    pub credentials: BTreeMap<String, figment::value::Dict>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub threads: Option<usize>,
    pub grace_period: Option<HumanDuration>,
    pub upstream_keepalive_pool_size: Option<usize>,
    pub http1_fast_path: Option<bool>,
    pub reuse_port: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    pub format: Option<String>,
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub listen: Option<String>,
    /// Bearer token that POST /tokens/NAME/refresh|invalidate require.
    pub token: Option<SecretSource>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    pub dir: Option<String>,
    /// `redis://` or `rediss://` URL of a store shared by replicas (may hold a password).
    pub redis: Option<String>,
    /// ACL user for `redis` (a password from `redis_password` or the URL goes with it).
    pub redis_username: Option<String>,
    /// Password for `redis`, instead of one inside the URL.
    pub redis_password: Option<crate::secret::SecretSource>,
    /// 32 bytes (hex or base64) sealing what is kept in `redis`.
    pub encryption_key: Option<crate::secret::SecretSource>,
    /// Keys `encryption_key` replaced: entries sealed with one are still read (and sealed
    /// with `encryption_key` at their next write).
    pub previous_encryption_keys: Option<Vec<crate::secret::SecretSource>>,
    /// How long a chain nobody writes stays in `redis` (each write renews it).
    pub chain_ttl: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: String,
    pub listen: String,
    pub upstream: String,
    pub credential: String,
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    /// PEM bundle of CAs that sign the upstream's certificate, replacing the system roots.
    pub ca_file: Option<String>,
    /// `true` (default) offers HTTP/2 by ALPN to https upstreams.
    pub http2: Option<bool>,
    pub connect_timeout: Option<HumanDuration>,
    pub read_timeout: Option<HumanDuration>,
    /// How long an upstream connection is kept in the pool unused; shorter than the upstream's
    /// own keep-alive timeout, so tokenward never sends on a connection the upstream is closing.
    pub idle_timeout: Option<HumanDuration>,
    /// `false` sends each request on a new upstream connection (`Connection: close`), for
    /// upstreams known to send bytes after their answers (default true).
    pub upstream_keepalive: Option<bool>,
    /// Upstream statuses that mean "this token was rejected" (default [401]; [] turns it off).
    pub reauth_statuses: Option<Vec<u16>>,
    /// PEM client certificate (chain allowed) presented to an https upstream (mutual TLS).
    pub tls_client_cert: Option<SecretSource>,
    /// PEM private key of `tls_client_cert`.
    pub tls_client_key: Option<SecretSource>,
}

/// Keys every credential accepts whatever its dialect: how the token is presented upstream and
/// when it is refreshed. Everything else in a credential table belongs to its dialect.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommonCredentialFile {
    pub dialect: String,
    pub header: Option<String>,
    pub format: Option<String>,
    pub default_lifetime: Option<HumanDuration>,
    pub refresh_at: Option<f64>,
    pub expiry_margin: Option<HumanDuration>,
    pub min_refresh_interval: Option<HumanDuration>,
    pub max_backoff: Option<HumanDuration>,
    pub probe_interval: Option<HumanDuration>,
    pub timeout: Option<HumanDuration>,
    /// The only forward proxy the provider client uses (the environment's proxy variables never are).
    pub proxy: Option<String>,
    /// PEM bundle of CAs that sign the token endpoint's certificate, replacing the built-in roots.
    pub ca_file: Option<String>,
    /// PEM client certificate (chain allowed) presented to the token endpoint (RFC 8705).
    pub tls_client_cert: Option<SecretSource>,
    /// PEM private key of `tls_client_cert`.
    pub tls_client_key: Option<SecretSource>,
    /// Names the credential's refresh chain in a shared store, in place of the identity built
    /// from its provider, client and account.
    pub chain: Option<String>,
}

impl CommonCredentialFile {
    pub const KEYS: &'static [&'static str] = &[
        "dialect",
        "header",
        "format",
        "default_lifetime",
        "refresh_at",
        "expiry_margin",
        "min_refresh_interval",
        "max_backoff",
        "probe_interval",
        "timeout",
        "proxy",
        "ca_file",
        "tls_client_cert",
        "tls_client_key",
        "chain",
    ];
}

/// A duration written as `"30s"`, `"5m"`, `"1h 30m"` or a bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// The configured duration, or `default` when the key is absent.
    pub fn or(value: Option<Self>, default: Duration) -> Duration {
        value.map_or(default, |d| d.0)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom("expected a duration like \"30s\" or a number of seconds")
        })? {
            Raw::Seconds(s) => Ok(HumanDuration(Duration::from_secs(s))),
            Raw::Text(t) => humantime::parse_duration(t.trim())
                .map(HumanDuration)
                .map_err(|e| serde::de::Error::custom(format!("invalid duration {t:?}: {e}"))),
        }
    }
}
