//! The standard OAuth 2.0 token endpoint (RFC 6749 §4.4, §4.3, §6) with the client
//! authentication methods of RFC 6749 §2.3 and RFC 7523 (`private_key_jwt`).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use serde::Deserialize;

use super::http::{ProviderResponse, required_str};
use super::{
    Dialect, DialectError, ErrorClass, ExchangeSettings, Expiry, Grant, GrantKind, Held,
    ProviderClient, parse_keys,
};
use crate::secret::{Secret, SecretSource};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    ClientCredentials,
    RefreshToken,
    Password,
    /// RFC 8693: each caller's token is exchanged for one minted for the upstream.
    TokenExchange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    ClientSecretBasic,
    ClientSecretPost,
    PrivateKeyJwt,
    None,
    /// RFC 8705 §2.1: a certificate from a CA the provider trusts; `client_id` in the body.
    TlsClientAuth,
    /// RFC 8705 §2.2: a self-signed certificate the provider has registered for the client.
    SelfSignedTlsClientAuth,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    token_url: String,
    #[serde(default = "default_grant")]
    grant: GrantType,
    client_id: String,
    client_secret: Option<SecretSource>,
    #[serde(default = "default_client_auth")]
    client_auth: ClientAuth,
    scope: Option<String>,
    audience: Option<String>,
    resource: Option<String>,
    #[serde(default)]
    extra_params: BTreeMap<String, String>,
    refresh_token: Option<SecretSource>,
    username: Option<String>,
    password: Option<SecretSource>,
    private_key: Option<SecretSource>,
    private_key_alg: Option<String>,
    private_key_kid: Option<String>,
    subject_header: Option<String>,
    subject_token_type: Option<String>,
    requested_token_type: Option<String>,
    cache_max_entries: Option<u64>,
    negative_ttl: Option<String>,
}

/// RFC 8693 §3: the type of a token that is an OAuth 2.0 access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// A rejected subject is remembered at most this long: beyond it a fixed token would stay
/// refused for no reason.
const MAX_NEGATIVE_TTL: Duration = Duration::from_secs(3600);

fn default_grant() -> GrantType {
    GrantType::ClientCredentials
}

fn default_client_auth() -> ClientAuth {
    ClientAuth::ClientSecretBasic
}

pub struct OAuth2 {
    token_url: String,
    grant: GrantType,
    client_id: String,
    client_secret: Option<SecretSource>,
    client_auth: ClientAuth,
    params: Vec<(String, String)>,
    bootstrap_refresh: Option<SecretSource>,
    username: Option<String>,
    password: Option<SecretSource>,
    private_key: Option<(SecretSource, jsonwebtoken::Algorithm)>,
    private_key_kid: Option<String>,
    exchange: Option<ExchangeSettings>,
}

/// Parameters a user may not set through `extra_params`: they carry the grant or a credential.
const RESERVED: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
    "refresh_token",
    "username",
    "password",
    "code",
    "subject_token",
    "subject_token_type",
    "requested_token_type",
    "actor_token",
    "actor_token_type",
];

impl OAuth2 {
    pub fn from_keys(
        _credential: &str,
        keys: figment::value::Dict,
    ) -> Result<Self, Vec<(String, String)>> {
        let k: Keys = parse_keys(keys)?;
        let mut errors = Vec::new();
        let mut err = |key: &str, reason: &str| errors.push((key.to_string(), reason.to_string()));
        match url::Url::parse(&k.token_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => err("token_url", "must be an http or https URL"),
        }
        if k.client_id.is_empty() {
            err("client_id", "must not be empty");
        }
        match k.client_auth {
            ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost
                if k.client_secret.is_none() =>
            {
                err(
                    "client_secret",
                    "is required by this client_auth (or set client_auth = \"none\")",
                )
            }
            ClientAuth::PrivateKeyJwt if k.private_key.is_none() => err(
                "private_key",
                "is required by client_auth = \"private_key_jwt\"",
            ),
            ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth
                if k.client_secret.is_some() =>
            {
                err(
                    "client_secret",
                    "is never sent with a TLS client certificate (RFC 8705); remove it",
                )
            }
            _ => {}
        }
        match k.grant {
            GrantType::RefreshToken if k.refresh_token.is_none() => err(
                "refresh_token",
                "grant = \"refresh_token\" needs the bootstrap refresh token",
            ),
            GrantType::Password if k.username.is_none() || k.password.is_none() => err(
                "username",
                "grant = \"password\" needs username and password",
            ),
            _ => {}
        }
        for name in k.extra_params.keys() {
            if RESERVED.contains(&name.as_str()) {
                err(
                    &format!("extra_params.{name}"),
                    "is set by tokenward itself and cannot be overridden",
                );
            }
        }
        let alg = match k
            .private_key_alg
            .as_deref()
            .unwrap_or("RS256")
            .parse::<jsonwebtoken::Algorithm>()
        {
            Ok(a)
                if !matches!(
                    a,
                    jsonwebtoken::Algorithm::HS256
                        | jsonwebtoken::Algorithm::HS384
                        | jsonwebtoken::Algorithm::HS512
                ) =>
            {
                a
            }
            _ => {
                err(
                    "private_key_alg",
                    "must be an asymmetric JWS algorithm (RS256, PS256, ES256, EdDSA, …)",
                );
                jsonwebtoken::Algorithm::RS256
            }
        };
        let exchange = exchange_settings(&k, &mut err);
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut params = Vec::new();
        for (name, value) in [
            ("scope", &k.scope),
            ("audience", &k.audience),
            ("resource", &k.resource),
        ] {
            if let Some(v) = value {
                params.push((name.to_string(), v.clone()));
            }
        }
        params.extend(k.extra_params);
        Ok(OAuth2 {
            token_url: k.token_url,
            grant: k.grant,
            client_id: k.client_id,
            client_secret: k.client_secret,
            client_auth: k.client_auth,
            params,
            bootstrap_refresh: k.refresh_token,
            username: k.username,
            password: k.password,
            private_key: k.private_key.map(|p| (p, alg)),
            private_key_kid: k.private_key_kid,
            exchange,
        })
    }

    fn secret(source: &SecretSource, key: &str) -> Result<Secret, DialectError> {
        source
            .resolve()
            .map_err(|e| DialectError::fatal(format!("`{key}`: {e}")))
    }

    fn client_assertion(&self) -> Result<String, DialectError> {
        let Some((source, alg)) = &self.private_key else {
            return Err(DialectError::fatal("`private_key` is not configured"));
        };
        let pem = Self::secret(source, "private_key")?;
        let key = match alg {
            jsonwebtoken::Algorithm::ES256 | jsonwebtoken::Algorithm::ES384 => {
                jsonwebtoken::EncodingKey::from_ec_pem(pem.expose().as_bytes())
            }
            jsonwebtoken::Algorithm::EdDSA => {
                jsonwebtoken::EncodingKey::from_ed_pem(pem.expose().as_bytes())
            }
            _ => jsonwebtoken::EncodingKey::from_rsa_pem(pem.expose().as_bytes()),
        }
        .map_err(|_| {
            DialectError::fatal(format!(
                "`private_key` is not a PEM key usable with {alg:?}"
            ))
        })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = serde_json::json!({
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "iat": now,
            "exp": now + 60,
            "jti": random_hex(16),
        });
        let mut header = jsonwebtoken::Header::new(*alg);
        header.kid = self.private_key_kid.clone();
        jsonwebtoken::encode(&header, &claims, &key)
            .map_err(|e| DialectError::fatal(format!("cannot sign the client assertion: {e}")))
    }

    /// The form and the Authorization header for one token request.
    fn build_form(
        &self,
        held: &Held,
    ) -> Result<(Vec<(String, String)>, Option<String>, GrantKind), DialectError> {
        let mut form: Vec<(String, String)> = Vec::new();
        let kind = if let Some(refresh) = &held.refresh_token {
            form.push(("grant_type".into(), "refresh_token".into()));
            form.push(("refresh_token".into(), refresh.expose().to_string()));
            GrantKind::Refresh
        } else {
            match self.grant {
                GrantType::ClientCredentials => {
                    form.push(("grant_type".into(), "client_credentials".into()));
                }
                GrantType::Password => {
                    let (Some(user), Some(pw)) = (&self.username, &self.password) else {
                        return Err(DialectError::fatal(
                            "grant = \"password\" needs username and password",
                        ));
                    };
                    form.push(("grant_type".into(), "password".into()));
                    form.push(("username".into(), user.clone()));
                    form.push((
                        "password".into(),
                        Self::secret(pw, "password")?.expose().to_string(),
                    ));
                }
                GrantType::RefreshToken => {
                    return Err(DialectError::fatal(
                        "no usable refresh token: the provider rejected the last one; write a new one to `refresh_token`",
                    ));
                }
                GrantType::TokenExchange => {
                    return Err(DialectError::fatal(
                        "a token-exchange credential has no token of its own: it exchanges each caller's",
                    ));
                }
            }
            form.extend(self.params.iter().cloned());
            GrantKind::Login
        };
        let authorization = self.client_auth(&mut form)?;
        Ok((form, authorization, kind))
    }

    /// RFC 8693 §2.1: the form that exchanges `subject` for a token for this credential's
    /// audience/resource/scope, with the credential's client authentication.
    fn exchange_form(
        &self,
        subject: &str,
        settings: &ExchangeSettings,
    ) -> Result<(Vec<(String, String)>, Option<String>), DialectError> {
        let mut form: Vec<(String, String)> = vec![
            ("grant_type".into(), EXCHANGE_GRANT.into()),
            ("subject_token".into(), subject.to_string()),
            (
                "subject_token_type".into(),
                settings.subject_token_type.clone(),
            ),
            (
                "requested_token_type".into(),
                settings.requested_token_type.clone(),
            ),
        ];
        form.extend(self.params.iter().cloned());
        let authorization = self.client_auth(&mut form)?;
        Ok((form, authorization))
    }

    /// RFC 6749 §2.3 / RFC 7523: adds the client's authentication to `form`, or returns the
    /// Authorization header that carries it.
    fn client_auth(
        &self,
        form: &mut Vec<(String, String)>,
    ) -> Result<Option<String>, DialectError> {
        let mut authorization = None;
        match self.client_auth {
            ClientAuth::ClientSecretBasic => {
                let secret = Self::secret(
                    self.client_secret.as_ref().ok_or_else(missing_secret)?,
                    "client_secret",
                )?;
                // RFC 6749 §2.3.1: both parts are form-urlencoded before joining.
                let pair = format!(
                    "{}:{}",
                    form_encode(&self.client_id),
                    form_encode(secret.expose())
                );
                authorization = Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                ));
            }
            ClientAuth::ClientSecretPost => {
                let secret = Self::secret(
                    self.client_secret.as_ref().ok_or_else(missing_secret)?,
                    "client_secret",
                )?;
                form.push(("client_id".into(), self.client_id.clone()));
                form.push(("client_secret".into(), secret.expose().to_string()));
            }
            ClientAuth::PrivateKeyJwt => {
                form.push(("client_id".into(), self.client_id.clone()));
                form.push((
                    "client_assertion_type".into(),
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push(("client_assertion".into(), self.client_assertion()?));
            }
            ClientAuth::None => form.push(("client_id".into(), self.client_id.clone())),
            // RFC 8705 §2: the certificate on the connection authenticates; only the id is sent.
            ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth => {
                form.push(("client_id".into(), self.client_id.clone()))
            }
        }
        Ok(authorization)
    }

    async fn post(
        &self,
        form: &[(String, String)],
        authorization: Option<String>,
        client: &ProviderClient,
    ) -> Result<ProviderResponse, DialectError> {
        let mut request = client
            .request(reqwest::Method::POST, &self.token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(
                form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(form.iter())
                    .finish(),
            );
        if let Some(value) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        client.send(request).await
    }
}

/// The token-exchange keys: all or nothing with `grant = "token_exchange"`.
fn exchange_settings(k: &Keys, err: &mut impl FnMut(&str, &str)) -> Option<ExchangeSettings> {
    if k.grant != GrantType::TokenExchange {
        for (key, set) in [
            ("subject_header", k.subject_header.is_some()),
            ("subject_token_type", k.subject_token_type.is_some()),
            ("requested_token_type", k.requested_token_type.is_some()),
            ("cache_max_entries", k.cache_max_entries.is_some()),
            ("negative_ttl", k.negative_ttl.is_some()),
        ] {
            if set {
                err(key, "is used only with grant = \"token_exchange\"");
            }
        }
        return None;
    }
    let header = k.subject_header.as_deref().unwrap_or("Authorization");
    let subject_header = match http::HeaderName::from_bytes(header.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            err("subject_header", "is not a valid HTTP header name");
            None
        }
    };
    let mut token_type = |key: &str, value: &Option<String>| {
        let v = value.as_deref().unwrap_or(ACCESS_TOKEN_TYPE);
        // RFC 8693 §3: an absolute URI (the registered ones are URNs).
        if url::Url::parse(v).is_err() || v.chars().any(|c| c.is_whitespace()) {
            err(
                key,
                "must be a token type URI such as urn:ietf:params:oauth:token-type:access_token",
            );
        }
        v.to_string()
    };
    let subject_token_type = token_type("subject_token_type", &k.subject_token_type);
    let requested_token_type = token_type("requested_token_type", &k.requested_token_type);
    let cache_max_entries = k.cache_max_entries.unwrap_or(10_000);
    if cache_max_entries == 0 {
        err("cache_max_entries", "must be at least 1");
    }
    let negative_ttl = match k.negative_ttl.as_deref().map(humantime::parse_duration) {
        None => Duration::from_secs(5),
        Some(Ok(d)) if d <= MAX_NEGATIVE_TTL => d,
        Some(_) => {
            err(
                "negative_ttl",
                "must be a duration of at most 1h, such as \"5s\"",
            );
            Duration::from_secs(5)
        }
    };
    Some(ExchangeSettings {
        subject_header: subject_header?,
        subject_token_type,
        requested_token_type,
        cache_max_entries,
        negative_ttl,
    })
}

fn missing_secret() -> DialectError {
    DialectError::fatal("`client_secret` is not configured")
}

fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// An RFC 6749 §5.2 error code, kept only if it looks like one (it is echoed into logs).
fn error_code(body: &serde_json::Value) -> Option<&str> {
    let code = body.get("error")?.as_str()?;
    let plausible = !code.is_empty()
        && code.len() <= 64
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    plausible.then_some(code)
}

/// Reads a token response (RFC 6749 §5.1).
pub fn parse_success(response: &ProviderResponse, kind: GrantKind) -> Result<Grant, DialectError> {
    let body = response.json()?;
    if !body.is_object() {
        return Err(DialectError::transient(
            "token endpoint answered JSON that is not an object",
        ));
    }
    let access = required_str(&body, "/access_token", "access_token")?;
    let expires = match body.get("expires_in") {
        None | Some(serde_json::Value::Null) => Expiry::Unknown,
        Some(serde_json::Value::Number(n)) => match n.as_f64() {
            Some(s) if s.is_finite() && s >= 0.0 => Expiry::In(Duration::from_secs_f64(s.min(1e9))),
            _ => {
                return Err(DialectError::transient(
                    "token endpoint answered a negative `expires_in`",
                ));
            }
        },
        Some(serde_json::Value::String(s)) => match s.trim().parse::<u64>() {
            Ok(secs) => Expiry::In(Duration::from_secs(secs)),
            Err(_) => {
                return Err(DialectError::transient(
                    "token endpoint answered a non-numeric `expires_in`",
                ));
            }
        },
        Some(other) => {
            return Err(DialectError::transient(format!(
                "token endpoint answered `expires_in` of the wrong type ({})",
                super::http::json_type(other)
            )));
        }
    };
    let refresh_token = match body.get("refresh_token") {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Some(Secret::new(s.clone())),
        _ => None,
    };
    Ok(Grant {
        kind,
        access_token: Secret::new(access),
        expires,
        refresh_token,
    })
}

/// Classifies an error response (RFC 6749 §5.2).
pub fn parse_failure(response: &ProviderResponse, kind: GrantKind) -> DialectError {
    let body = response.json().ok();
    let code = body.as_ref().and_then(error_code);
    let status = response.status;
    let what = match code {
        Some(code) => format!("token endpoint answered HTTP {status} `{code}`"),
        None => format!("token endpoint answered HTTP {status}"),
    };
    let class = match (code, kind) {
        _ if matches!(response.status_class(), ErrorClass::Transient { .. }) => {
            response.status_class()
        }
        (Some("invalid_grant"), GrantKind::Refresh) => ErrorClass::Relogin,
        (Some("temporarily_unavailable" | "server_error" | "slow_down"), _) => {
            ErrorClass::Transient {
                retry_after: response.retry_after,
            }
        }
        _ => ErrorClass::Fatal,
    };
    let message = match class {
        ErrorClass::Relogin => format!("{what}: the refresh token is no longer valid"),
        ErrorClass::Fatal => format!("{what}: check the credential's settings; not retrying"),
        ErrorClass::Transient { .. } => what,
    };
    DialectError { class, message }
}

/// Classifies a failed token exchange: provider trouble stays transient; any other refusal
/// (RFC 8693 §2.2.2: invalid_grant, invalid_request, invalid_token, 400/401) is a refusal of
/// this caller's token, not of the credential as a whole.
fn exchange_failure(response: &ProviderResponse) -> DialectError {
    let failure = parse_failure(response, GrantKind::Login);
    match failure.class {
        ErrorClass::Transient { .. } => failure,
        _ => DialectError::relogin(format!(
            "{}: the subject token was refused",
            failure
                .message
                .split(':')
                .next()
                .unwrap_or("token endpoint refused")
        )),
    }
}

#[async_trait]
impl Dialect for OAuth2 {
    fn describe(&self) -> String {
        let grant = match self.grant {
            GrantType::ClientCredentials => "client_credentials",
            GrantType::RefreshToken => "refresh_token",
            GrantType::Password => "password",
            GrantType::TokenExchange => "token_exchange",
        };
        let auth = match self.client_auth {
            ClientAuth::ClientSecretBasic => "client_secret_basic",
            ClientAuth::ClientSecretPost => "client_secret_post",
            ClientAuth::PrivateKeyJwt => "private_key_jwt",
            ClientAuth::None => "none",
            ClientAuth::TlsClientAuth => "tls_client_auth",
            ClientAuth::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
        };
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "oauth2 {grant} at {} as client {:?} ({auth}){}",
            self.token_url,
            self.client_id,
            if params.is_empty() {
                String::new()
            } else {
                format!(" with {}", params.join(" "))
            }
        )
    }

    fn endpoints(&self) -> Vec<String> {
        vec![self.token_url.clone()]
    }

    fn secret_sources(&self) -> Vec<(String, &SecretSource)> {
        let mut out = Vec::new();
        if let Some(s) = &self.client_secret {
            out.push(("client_secret".into(), s));
        }
        if let Some(s) = &self.bootstrap_refresh {
            out.push(("refresh_token".into(), s));
        }
        if let Some(s) = &self.password {
            out.push(("password".into(), s));
        }
        if let Some((s, _)) = &self.private_key {
            out.push(("private_key".into(), s));
        }
        out
    }

    fn bootstrap_refresh_token(&self) -> Option<&SecretSource> {
        self.bootstrap_refresh.as_ref()
    }

    fn tls_client_auth(&self) -> bool {
        matches!(
            self.client_auth,
            ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth
        )
    }

    async fn obtain(&self, held: &Held, client: &ProviderClient) -> Result<Grant, DialectError> {
        let (form, authorization, kind) = self.build_form(held)?;
        let response = self.post(&form, authorization, client).await?;
        if (200..300).contains(&response.status) {
            parse_success(&response, kind)
        } else {
            Err(parse_failure(&response, kind))
        }
    }

    fn exchange_settings(&self) -> Option<&ExchangeSettings> {
        self.exchange.as_ref()
    }

    async fn exchange(
        &self,
        subject: &Secret,
        client: &ProviderClient,
    ) -> Result<Grant, DialectError> {
        let Some(settings) = &self.exchange else {
            return Err(DialectError::fatal(
                "this credential does not exchange tokens",
            ));
        };
        let (form, authorization) = self.exchange_form(subject.expose(), settings)?;
        let response = self.post(&form, authorization, client).await?;
        if (200..300).contains(&response.status) {
            return parse_success(&response, GrantKind::Login);
        }
        Err(exchange_failure(&response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn dialect(extra: &[(&str, figment::value::Value)]) -> Result<OAuth2, Vec<(String, String)>> {
        let mut d = figment::value::Dict::new();
        d.insert("token_url".into(), "https://idp.example/token".into());
        d.insert("client_id".into(), "id:x".into());
        d.insert("client_secret".into(), "p&ss".into());
        for (k, v) in extra {
            d.insert((*k).into(), v.clone());
        }
        OAuth2::from_keys("t", d)
    }

    fn resp(status: u16, body: &str) -> ProviderResponse {
        ProviderResponse {
            status,
            retry_after: None,
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn basic_auth_encodes_both_parts() {
        let d = dialect(&[("scope", "a b".into())]).unwrap();
        let (form, auth, kind) = d.build_form(&Held::default()).unwrap();
        assert_eq!(kind, GrantKind::Login);
        assert!(form.contains(&("grant_type".into(), "client_credentials".into())));
        assert!(form.contains(&("scope".into(), "a b".into())));
        assert!(!form.iter().any(|(k, _)| k == "client_secret"));
        let expected = base64::engine::general_purpose::STANDARD.encode("id%3Ax:p%26ss");
        assert_eq!(auth.unwrap(), format!("Basic {expected}"));
    }

    #[test]
    fn refresh_uses_the_held_refresh_token_without_scope() {
        let d = dialect(&[
            ("client_auth", "client_secret_post".into()),
            ("scope", "s".into()),
        ])
        .unwrap();
        let held = Held {
            access_token: None,
            refresh_token: Some(Secret::new("rt1")),
        };
        let (form, auth, kind) = d.build_form(&held).unwrap();
        assert_eq!(kind, GrantKind::Refresh);
        assert!(auth.is_none());
        assert!(form.contains(&("refresh_token".into(), "rt1".into())));
        assert!(form.contains(&("client_secret".into(), "p&ss".into())));
        assert!(!form.iter().any(|(k, _)| k == "scope"));
    }

    #[test]
    fn config_errors_name_keys() {
        let errs = dialect(&[
            ("grant", "refresh_token".into()),
            ("extra_params", {
                let mut m = figment::value::Dict::new();
                m.insert("grant_type".into(), "x".into());
                m.into()
            }),
        ])
        .err()
        .unwrap();
        let keys: Vec<_> = errs.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"refresh_token"), "{keys:?}");
        assert!(keys.contains(&"extra_params.grant_type"), "{keys:?}");
        let errs = dialect(&[("grant", "implicit".into())]).err().unwrap();
        assert_eq!(errs[0].0, "grant");
    }

    #[test]
    fn token_exchange_form_and_defaults() {
        let d = dialect(&[
            ("grant", "token_exchange".into()),
            ("audience", "orders-api".into()),
        ])
        .unwrap();
        let settings = d.exchange_settings().unwrap();
        assert_eq!(settings.subject_header, http::header::AUTHORIZATION);
        assert_eq!(settings.cache_max_entries, 10_000);
        assert_eq!(settings.negative_ttl, Duration::from_secs(5));
        let (form, auth) = d.exchange_form("subj", settings).unwrap();
        assert!(form.contains(&("grant_type".into(), EXCHANGE_GRANT.into())));
        assert!(form.contains(&("subject_token".into(), "subj".into())));
        assert!(form.contains(&("subject_token_type".into(), ACCESS_TOKEN_TYPE.into())));
        assert!(form.contains(&("requested_token_type".into(), ACCESS_TOKEN_TYPE.into())));
        assert!(form.contains(&("audience".into(), "orders-api".into())));
        assert!(auth.unwrap().starts_with("Basic "));
        // It has no token of its own.
        assert!(d.build_form(&Held::default()).is_err());
    }

    #[test]
    fn token_exchange_config_errors_name_keys() {
        let keys = |extra: &[(&str, figment::value::Value)]| -> Vec<String> {
            dialect(extra)
                .err()
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        let errs = keys(&[
            ("grant", "token_exchange".into()),
            ("subject_header", "bad header".into()),
            ("subject_token_type", "not a uri".into()),
            ("cache_max_entries", 0u64.into()),
            ("negative_ttl", "soon".into()),
        ]);
        for key in [
            "subject_header",
            "subject_token_type",
            "cache_max_entries",
            "negative_ttl",
        ] {
            assert!(errs.iter().any(|k| k == key), "{key} not in {errs:?}");
        }
        assert_eq!(keys(&[("negative_ttl", "5s".into())]), vec!["negative_ttl"]);
        assert_eq!(
            keys(&[
                ("grant", "token_exchange".into()),
                ("subject_tokne_type", "x".into())
            ])
            .len(),
            1
        );
    }

    #[test]
    fn a_refused_subject_is_told_apart_from_an_outage() {
        let class = |status, body| exchange_failure(&resp(status, body)).class;
        assert_eq!(
            class(400, r#"{"error":"invalid_grant"}"#),
            ErrorClass::Relogin
        );
        assert_eq!(
            class(401, r#"{"error":"invalid_token"}"#),
            ErrorClass::Relogin
        );
        assert!(matches!(class(503, ""), ErrorClass::Transient { .. }));
        assert!(matches!(
            class(400, r#"{"error":"temporarily_unavailable"}"#),
            ErrorClass::Transient { .. }
        ));
        let msg = exchange_failure(&resp(400, r#"{"error":"invalid_grant"}"#)).message;
        assert!(
            msg.contains("invalid_grant") && msg.contains("subject token"),
            "{msg}"
        );
    }

    #[test]
    fn parses_success_variants() {
        let g = parse_success(
            &resp(
                200,
                r#"{"access_token":"a","expires_in":"60","refresh_token":"r"}"#,
            ),
            GrantKind::Login,
        )
        .unwrap();
        assert_eq!(g.expires, Expiry::In(Duration::from_secs(60)));
        assert_eq!(g.refresh_token.unwrap().expose(), "r");
        let g = parse_success(&resp(200, r#"{"access_token":"a"}"#), GrantKind::Login).unwrap();
        assert_eq!(g.expires, Expiry::Unknown);
        let e = parse_success(
            &resp(200, r#"{"access_token":"a","expires_in":true}"#),
            GrantKind::Login,
        )
        .unwrap_err();
        assert!(e.message.contains("expires_in"));
        let e = parse_success(&resp(200, r#"{"token":"a"}"#), GrantKind::Login).unwrap_err();
        assert!(e.message.contains("access_token"));
        assert!(parse_success(&resp(200, "[1]"), GrantKind::Login).is_err());
    }

    #[test]
    fn classifies_failures() {
        let f = |s, b, k| parse_failure(&resp(s, b), k).class;
        assert_eq!(
            f(400, r#"{"error":"invalid_grant"}"#, GrantKind::Refresh),
            ErrorClass::Relogin
        );
        assert_eq!(
            f(400, r#"{"error":"invalid_grant"}"#, GrantKind::Login),
            ErrorClass::Fatal
        );
        assert_eq!(
            f(401, r#"{"error":"invalid_client"}"#, GrantKind::Login),
            ErrorClass::Fatal
        );
        assert!(matches!(
            f(503, "", GrantKind::Login),
            ErrorClass::Transient { .. }
        ));
        assert!(matches!(
            f(429, r#"{"error":"invalid_client"}"#, GrantKind::Login),
            ErrorClass::Transient { .. }
        ));
        assert!(matches!(
            f(
                400,
                r#"{"error":"temporarily_unavailable"}"#,
                GrantKind::Login
            ),
            ErrorClass::Transient { .. }
        ));
        let msg = parse_failure(
            &resp(
                400,
                r#"{"error":"bad code with spaces","error_description":"secret-ish"}"#,
            ),
            GrantKind::Login,
        )
        .message;
        assert!(
            !msg.contains("secret-ish") && !msg.contains("spaces"),
            "{msg}"
        );
    }
}
