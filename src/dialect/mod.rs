//! Provider dialects: each knows how to obtain a token from one kind of provider. The token
//! engine drives every dialect through the same [`Dialect`] trait and never knows which it has.

pub mod aws_sigv4;
pub mod babelbird;
pub mod cloudreve;
pub mod custom;
pub mod enos_apim;
pub mod google;
pub mod http;
pub mod oauth2;
pub mod quectel_accesskey;
pub mod quectel_enduser;
pub mod template;
pub mod vendor;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::secret::{Secret, SecretSource};
pub use http::ProviderClient;

/// Config names of every dialect, for error messages.
pub const NAMES: &[&str] = &[
    "oauth2",
    "quectel-enduser",
    "enos-apim",
    "quectel-accesskey",
    "babelbird",
    "cloudreve",
    "custom",
    "google-service-account",
    "aws-sigv4",
];

/// Builds the dialect named by `dialect = "…"` from the rest of the credential's keys.
/// Errors are `(key, reason)` pairs relative to the credential's table.
pub fn build(
    kind: &str,
    credential: &str,
    keys: figment::value::Dict,
) -> Result<Arc<dyn Dialect>, Vec<(String, String)>> {
    fn boxed<D: Dialect + 'static>(
        d: Result<D, Vec<(String, String)>>,
    ) -> Result<Arc<dyn Dialect>, Vec<(String, String)>> {
        d.map(|d| Arc::new(d) as Arc<dyn Dialect>)
    }
    match kind {
        "oauth2" => boxed(oauth2::OAuth2::from_keys(credential, keys)),
        "quectel-enduser" => boxed(quectel_enduser::QuectelEnduser::from_keys(keys)),
        "enos-apim" => boxed(enos_apim::EnosApim::from_keys(keys)),
        "quectel-accesskey" => boxed(quectel_accesskey::QuectelAccessKey::from_keys(keys)),
        "babelbird" => boxed(babelbird::BabelBird::from_keys(keys)),
        "cloudreve" => boxed(cloudreve::Cloudreve::from_keys(keys)),
        "custom" => boxed(custom::Custom::from_keys(keys)),
        "google-service-account" => {
            boxed(google::GoogleServiceAccount::from_keys(credential, keys))
        }
        "aws-sigv4" => boxed(aws_sigv4::AwsSigV4::from_keys(keys)),
        other => Err(vec![(
            "dialect".into(),
            format!("unknown dialect {other:?}; one of: {}", NAMES.join(", ")),
        )]),
    }
}

/// Deserializes a dialect's own keys, turning figment's errors into `(key, reason)` pairs.
/// A provider endpoint must be an absolute http or https URL.
pub fn is_http_url(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
}

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

/// Whose fault a failed token exchange is, as the provider's answer says.
#[derive(Debug, Clone, PartialEq)]
pub enum Blame {
    /// The provider tied the refusal to the caller's token (`invalid_grant`,
    /// `interaction_required`, Entra's user-side AADSTS codes): that caller's 401, remembered.
    Subject,
    /// Anything else — tokenward's own request, client, actor token or settings, or the
    /// provider itself: a 503 for the caller, never remembered against its token.
    Credential,
    /// Entra ID Conditional Access: the caller's token lacks what a policy requires (MFA, a
    /// compliant device, an authentication context). The JSON `claims` Entra sent, for the
    /// caller's app to request a new token with; a refusal of this token, but one the user
    /// can resolve at once, so it is never remembered.
    Claims(String),
    /// A success answer that cannot be used (a negative `expires_in`, no token in it): this
    /// caller's failure, backed off for that caller alone.
    Unusable,
}

/// A failed token exchange: the error, and whose fault it is.
#[derive(Debug, Clone)]
pub struct ExchangeError {
    pub error: DialectError,
    pub blame: Blame,
}

impl ExchangeError {
    /// A failure that is not the caller's.
    pub fn credential(error: DialectError) -> Self {
        ExchangeError {
            error,
            blame: Blame::Credential,
        }
    }
}

#[async_trait]
pub trait Dialect: Send + Sync {
    /// What this dialect will do, for `tokenward check`: endpoints and grant, never a secret.
    fn describe(&self) -> String;

    /// Whose tokens these are: the provider, the client and the resource owner, as text that
    /// names no secret (a secret appears by where it is read from, see
    /// [`SecretSource::origin`]). Two credentials with the same account share one refresh
    /// chain in a shared store, so this holds everything that names the account and nothing
    /// that does not change it (scope, extra parameters): a rolling change of scope keeps the
    /// chain. The default, the whole description, suits dialects whose description names the
    /// account and no setting beside it.
    fn account(&self) -> String {
        self.describe()
    }

    /// The URLs this dialect calls, as configured (a `custom` template as written): for the
    /// warning about plain `http://` off loopback. Never a secret.
    fn endpoints(&self) -> Vec<String> {
        Vec::new()
    }

    /// The scheme written before the token when the config gives no `format`.
    fn default_format(&self) -> &'static str {
        "Bearer {token}"
    }

    /// Every configured secret with its key relative to the credential (`password`,
    /// `secrets.NAME`), so `check` can name and verify each and the reloader can watch its file.
    fn secret_sources(&self) -> Vec<(String, &SecretSource)>;

    /// Checks what a readable secret holds (a key file's format), for `tokenward check`. The
    /// reason names the field and the problem, never the value.
    fn check_secret(&self, _key: &str, _value: &Secret) -> Result<(), String> {
        Ok(())
    }

    /// The operator-provided refresh token that starts a refresh chain, if this dialect uses one.
    fn bootstrap_refresh_token(&self) -> Option<&SecretSource> {
        None
    }

    /// A per-request hook for providers that want each upstream request signed (EnOS APIM). The
    /// proxy buffers the request body up to the signer's bound for these credentials only, and
    /// sends the signer's headers in place of the credential's `header`.
    fn request_signer(&self) -> Option<Arc<dyn RequestSigner>> {
        None
    }

    /// Where this credential's tokens come from, when the dialect picks among several sources
    /// (the AWS credential chain): shown in `/tokens`, never a secret.
    fn token_source(&self) -> Option<String> {
        None
    }

    /// Whether the tokens must be persisted nowhere (no state file, no shared store): for
    /// credentials that are themselves signing secrets (AWS), obtained again after a restart.
    fn keeps_tokens_in_memory_only(&self) -> bool {
        false
    }

    /// Set for a credential whose tokens are DPoP-bound (RFC 9449): the key that signs a proof
    /// for each of its token requests and each upstream request that presents its token.
    fn dpop(&self) -> Option<&Arc<crate::dpop::DpopKey>> {
        None
    }

    /// Whether the client authenticates by its TLS certificate (RFC 8705): then the credential
    /// needs `tls_client_cert` and `tls_client_key`, and no other credential may have them.
    fn tls_client_auth(&self) -> bool {
        false
    }

    /// Obtains a token: a refresh when `held.refresh_token` is set, otherwise a login.
    async fn obtain(&self, held: &Held, client: &ProviderClient) -> Result<Grant, DialectError>;

    /// Set for a credential that has no token of its own but exchanges each caller's.
    fn exchange_settings(&self) -> Option<&ExchangeSettings> {
        None
    }

    /// Exchanges a caller's token (RFC 8693, or Entra's on-behalf-of), with `actor` as the
    /// `actor_token` when the credential names one. The error says whose fault a failure is
    /// ([`Blame`]); provider trouble is transient as for [`Dialect::obtain`].
    async fn exchange(
        &self,
        _subject: &Secret,
        _actor: Option<&Secret>,
        _client: &ProviderClient,
    ) -> Result<Grant, ExchangeError> {
        Err(ExchangeError::credential(DialectError::fatal(
            "this credential does not exchange tokens",
        )))
    }
}

/// How a token-exchange credential (RFC 8693) takes each caller's token and caches the result.
#[derive(Debug, Clone)]
pub struct ExchangeSettings {
    /// Where the caller's token is read.
    pub subject_header: ::http::HeaderName,
    /// The auth scheme that must precede the caller's token there (`Bearer` by default,
    /// matched case-insensitively); `None` takes the header's whole value (a custom header
    /// only). A value in any other scheme (`Basic` carries a password) is never a subject.
    pub subject_scheme: Option<String>,
    pub subject_token_type: String,
    pub requested_token_type: String,
    pub cache_max_entries: u64,
    /// The most exchanges per second that cache misses may cause (`max_exchanges_per_second`).
    pub max_exchanges_per_second: u32,
    /// How long a refused subject token is answered 401 without asking the provider again.
    pub negative_ttl: Duration,
    /// Another credential whose current token is sent as `actor_token` (RFC 8693 §2.1).
    pub actor: Option<String>,
    pub actor_token_type: String,
    /// Set when the subject is checked locally against its issuer's JWKS before any exchange.
    pub subject_validation: Option<SubjectValidation>,
    pub style: ExchangeStyle,
}

/// Which request form exchanges a caller's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeStyle {
    /// RFC 8693 token exchange.
    Rfc8693,
    /// Entra ID on-behalf-of: the jwt-bearer grant with `requested_token_use=on_behalf_of`.
    OnBehalfOf,
}

/// Where and how a subject token is validated locally (`subject_jwks_url` and friends).
#[derive(Debug, Clone)]
pub struct SubjectValidation {
    pub jwks_url: String,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// How long past its freshness the last good key set is still used while fetches fail
    /// (`subject_jwks_max_stale`); after that, subjects are answered 503.
    pub max_stale: std::time::Duration,
    /// How the JWKS is reached: `subject_jwks_proxy` and `subject_jwks_ca_file`, never a client
    /// certificate.
    pub transport: crate::config::ProviderTransport,
}

/// The per-request part of the request that a [`RequestSigner`] sees.
pub struct SignInput<'a> {
    pub method: &'a str,
    /// The path as the upstream will see it.
    pub path: &'a str,
    /// The headers the upstream will see (its own Host), before the signer's are added.
    pub headers: &'a ::http::HeaderMap,
    /// The raw query string (without `?`), if any.
    pub query: Option<&'a str>,
    /// The whole request body exactly as it is sent upstream.
    pub body: &'a [u8],
}

/// What an upstream answer says about the credentials that signed the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamVerdict {
    /// Nothing about the credentials.
    Accepted,
    /// The upstream refused the credentials (its error code): they are dropped and the request
    /// is replayed once with new ones, as for a bearer token's 401.
    Rejected(String),
    /// Only the body can tell; its first bytes go to [`RequestSigner::rejection_in_body`]. The
    /// answer has reached the client by then, so it is not replayed; the credentials are
    /// dropped for the next request.
    InBody,
}

/// Computes the headers of one upstream request from the current token, its query and its body.
pub trait RequestSigner: Send + Sync {
    /// The largest request body this signer buffers; larger requests are answered 413.
    fn max_body_bytes(&self) -> usize;

    /// Whether the signature covers the body, which is then buffered whole before the request
    /// goes upstream; otherwise the body streams.
    fn signs_body(&self) -> bool {
        true
    }

    /// The path to send upstream in place of `path`, when the signature needs the path on the
    /// wire spelled as it signs it (S3 compares the path as received).
    fn wire_path(&self, _path: &str) -> Option<String> {
        None
    }

    /// The query to send upstream in place of `query`, when the signature needs it on the wire
    /// spelled as it signs it (a verifier reading a `+` as a space, or the client's raw bytes).
    fn wire_query(&self, _query: &str) -> Option<String> {
        None
    }

    /// Whether the upstream's answer (status and header) refused the credentials.
    fn verdict(&self, _status: u16, _headers: &::http::HeaderMap) -> UpstreamVerdict {
        UpstreamVerdict::Accepted
    }

    /// After [`UpstreamVerdict::InBody`]: the error code in the body's first bytes, when it
    /// names a refusal of the credentials.
    fn rejection_in_body(&self, _body_start: &[u8]) -> Option<&'static str> {
        None
    }

    /// Fields removed from the upstream request before it is signed: whatever the client sent
    /// in the fields the signature owns.
    fn replaces(&self) -> &[::http::HeaderName] {
        &[]
    }

    /// The headers to send upstream (they replace the credential's presentation header). The
    /// error names what is missing (e.g. an unreadable secret), never a value.
    fn sign(
        &self,
        token: &Secret,
        input: &SignInput<'_>,
    ) -> Result<Vec<(::http::HeaderName, ::http::HeaderValue)>, String>;
}
