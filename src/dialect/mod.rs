//! Provider dialects: each knows how to obtain a token from one kind of provider. The token
//! engine drives every dialect through the same [`Dialect`] trait and never knows which it has.

pub mod http;
pub mod oauth2;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::secret::{Secret, SecretSource};
pub use http::ProviderClient;

/// Config names of every dialect, for error messages.
pub const NAMES: &[&str] = &["oauth2"];

/// Builds the dialect named by `dialect = "…"` from the rest of the credential's keys.
/// Errors are `(key, reason)` pairs relative to the credential's table.
pub fn build(
    kind: &str,
    credential: &str,
    keys: figment::value::Dict,
) -> Result<Arc<dyn Dialect>, Vec<(String, String)>> {
    match kind {
        "oauth2" => {
            oauth2::OAuth2::from_keys(credential, keys).map(|d| Arc::new(d) as Arc<dyn Dialect>)
        }
        other => Err(vec![(
            "dialect".into(),
            format!("unknown dialect {other:?}; one of: {}", NAMES.join(", ")),
        )]),
    }
}

/// Deserializes a dialect's own keys, turning figment's errors into `(key, reason)` pairs.
pub fn parse_keys<T: serde::de::DeserializeOwned>(
    keys: figment::value::Dict,
) -> Result<T, Vec<(String, String)>> {
    figment::value::Value::from(keys)
        .deserialize()
        .map_err(|e| {
            e.into_iter()
                .map(|e| (e.path.join("."), e.kind.to_string()))
                .collect()
        })
}

/// What the engine holds when it asks for a token.
#[derive(Debug, Default)]
pub struct Held {
    /// The access token currently held, if any (some providers refresh with it).
    pub access_token: Option<Secret>,
    /// The newest refresh token, if any; `None` means a full login is needed.
    pub refresh_token: Option<Secret>,
}

/// When a token expires, as the provider said it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Expiry {
    In(Duration),
    At(SystemTime),
    /// The provider did not say: the engine falls back to the JWT `exp`, then to a default.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantKind {
    Login,
    Refresh,
}

impl GrantKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::Login => "login",
            GrantKind::Refresh => "refresh",
        }
    }
}

/// A successful answer from the provider.
#[derive(Debug)]
pub struct Grant {
    pub kind: GrantKind,
    pub access_token: Secret,
    pub expires: Expiry,
    /// A refresh token the provider returned; when it differs from the one held, it has rotated
    /// and must be persisted before it is used.
    pub refresh_token: Option<Secret>,
}

/// How the engine should react to a failure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ErrorClass {
    /// Worth retrying after a back-off (network, 5xx, 429, malformed answer).
    Transient { retry_after: Option<Duration> },
    /// The refresh token is dead: drop it and log in again where the dialect can.
    Relogin,
    /// Retrying cannot help and may hurt (bad credentials, locked account): stop and report.
    Fatal,
}

impl ErrorClass {
    pub fn outcome(&self) -> &'static str {
        match self {
            ErrorClass::Transient { .. } => "transient_error",
            ErrorClass::Relogin => "relogin",
            ErrorClass::Fatal => "fatal_error",
        }
    }
}

/// A provider failure. The message names the cause (status, error code, missing field) and
/// never includes a secret or the provider's response body.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct DialectError {
    pub class: ErrorClass,
    pub message: String,
}

impl DialectError {
    pub fn transient(message: impl Into<String>) -> Self {
        DialectError {
            class: ErrorClass::Transient { retry_after: None },
            message: message.into(),
        }
    }
    pub fn relogin(message: impl Into<String>) -> Self {
        DialectError {
            class: ErrorClass::Relogin,
            message: message.into(),
        }
    }
    pub fn fatal(message: impl Into<String>) -> Self {
        DialectError {
            class: ErrorClass::Fatal,
            message: message.into(),
        }
    }
}

#[async_trait]
pub trait Dialect: Send + Sync {
    /// What this dialect will do, for `tokenward check`: endpoints and grant, never a secret.
    fn describe(&self) -> String;

    /// The scheme written before the token when the config gives no `format`.
    fn default_format(&self) -> &'static str {
        "Bearer {token}"
    }

    /// Every configured secret with its key, so `check` can verify they are readable and the
    /// reloader can watch their files.
    fn secret_sources(&self) -> Vec<(&'static str, &SecretSource)>;

    /// The operator-provided refresh token that starts a refresh chain, if this dialect uses one.
    fn bootstrap_refresh_token(&self) -> Option<&SecretSource> {
        None
    }

    /// Obtains a token: a refresh when `held.refresh_token` is set, otherwise a login.
    async fn obtain(&self, held: &Held, client: &ProviderClient) -> Result<Grant, DialectError>;
}
