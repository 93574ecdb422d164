//! The standard OAuth 2.0 token endpoint (RFC 6749 §4.4, §4.3, §6) with the client
//! authentication methods of RFC 6749 §2.3 and RFC 7523 (`private_key_jwt`, or a ready
//! `client_assertion` read from a file), and the JWT bearer grant (RFC 7523 §2.1).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use serde::Deserialize;

use super::http::{ProviderResponse, required_str};
use super::{
    Blame, Dialect, DialectError, ErrorClass, ExchangeError, ExchangeSettings, ExchangeStyle,
    Expiry, Grant, GrantKind, Held, ProviderClient, SubjectValidation, parse_keys,
};
use crate::dpop::DpopKey;
use crate::secret::{Secret, SecretSource};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    ClientCredentials,
    RefreshToken,
    Password,
    /// RFC 8693: each caller's token is exchanged for one minted for the upstream.
    TokenExchange,
    /// RFC 7523 §2.1: a ready assertion (read from a file at each use) is the grant.
    JwtBearer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    ClientSecretBasic,
    ClientSecretPost,
    PrivateKeyJwt,
    /// RFC 7521 §4.2 / RFC 7523 §2.2: a ready assertion read from a file at each use (a
    /// projected service-account token of a workload identity federation).
    ClientAssertion,
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
    #[serde(default)]
    client_id: String,
    client_secret: Option<SecretSource>,
    client_auth: Option<ClientAuth>,
    client_assertion: Option<SecretSource>,
    client_assertion_type: Option<String>,
    assertion: Option<SecretSource>,
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
    subject_scheme: Option<String>,
    subject_token_type: Option<String>,
    requested_token_type: Option<String>,
    cache_max_entries: Option<u64>,
    max_exchanges_per_second: Option<u32>,
    negative_ttl: Option<String>,
    dpop: Option<bool>,
    dpop_key: Option<SecretSource>,
    actor: Option<String>,
    actor_token_type: Option<String>,
    subject_jwks_url: Option<String>,
    subject_issuer: Option<String>,
    subject_audience: Option<String>,
    subject_jwks_max_stale: Option<String>,
    subject_jwks_ca_file: Option<String>,
    subject_jwks_proxy: Option<String>,
    exchange_style: Option<String>,
}

/// RFC 8693 §3: the type of a token that is an OAuth 2.0 access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 7523 §2.1; Entra ID's on-behalf-of sends it too, with `requested_token_use`.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 7523 §2.2: the default `client_assertion_type`.
const JWT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// A rejected subject is remembered at most this long: beyond it a fixed token would stay
/// refused for no reason.
const MAX_NEGATIVE_TTL: Duration = Duration::from_secs(3600);

fn default_grant() -> GrantType {
    GrantType::ClientCredentials
}

pub struct OAuth2 {
    /// The credential's name, for the log line of a retry after a rotation.
    credential: String,
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
    client_assertion: Option<SecretSource>,
    client_assertion_type: String,
    assertion: Option<SecretSource>,
    exchange: Option<ExchangeSettings>,
    dpop: Option<TokenDpop>,
}

/// A DPoP credential's key and where its token requests go, split as proofs need them.
struct TokenDpop {
    key: Arc<DpopKey>,
    /// `dpop_key`, when the key is read from a file rather than generated.
    source: Option<SecretSource>,
    /// The token URL's origin (whose nonce the proofs carry) and path: `htu` without a query.
    origin: String,
    path: String,
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
    "assertion",
    "requested_token_use",
];

impl OAuth2 {
    pub fn from_keys(
        credential: &str,
        keys: figment::value::Dict,
    ) -> Result<Self, Vec<(String, String)>> {
        let k: Keys = parse_keys(keys)?;
        let mut errors = Vec::new();
        let mut err = |key: &str, reason: &str| errors.push((key.to_string(), reason.to_string()));
        if !super::is_http_url(&k.token_url) {
            err("token_url", "must be an http or https URL");
        }
        // The JWT bearer grant authenticates with its assertion: the client is optional there
        // (RFC 7523 §3.1), so without a secret it defaults to no client authentication.
        let client_auth = k.client_auth.unwrap_or(if k.client_assertion.is_some() {
            ClientAuth::ClientAssertion
        } else if k.grant == GrantType::JwtBearer && k.client_secret.is_none() {
            ClientAuth::None
        } else {
            ClientAuth::ClientSecretBasic
        });
        let anonymous = k.grant == GrantType::JwtBearer && client_auth == ClientAuth::None;
        if k.client_id.is_empty() && !anonymous {
            err("client_id", "is required and must not be empty");
        }
        match (client_auth, &k.client_assertion) {
            (ClientAuth::ClientAssertion, None) => err(
                "client_assertion",
                "is required by client_auth = \"client_assertion\" (e.g. { file = \"/var/run/secrets/azure/tokens/azure-identity-token\" })",
            ),
            (ClientAuth::ClientAssertion, Some(_)) => {}
            (_, Some(_)) => err(
                "client_assertion",
                "is used only with client_auth = \"client_assertion\"",
            ),
            (_, None) => {}
        }
        if let Some(t) = &k.client_assertion_type {
            if client_auth != ClientAuth::ClientAssertion {
                err(
                    "client_assertion_type",
                    "is used only with client_auth = \"client_assertion\"",
                );
            } else if url::Url::parse(t).is_err() || t.chars().any(|c| c.is_whitespace()) {
                err(
                    "client_assertion_type",
                    "must be an assertion type URI such as urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                );
            }
        }
        match (k.grant, &k.assertion) {
            (GrantType::JwtBearer, None) => err(
                "assertion",
                "grant = \"jwt_bearer\" needs the assertion (e.g. { file = \"/var/run/secrets/tokens/assertion\" })",
            ),
            (GrantType::JwtBearer, Some(_)) | (_, None) => {}
            (_, Some(_)) => err("assertion", "is used only with grant = \"jwt_bearer\""),
        }
        match client_auth {
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
        let dpop = token_dpop(&k, &mut err);
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
            credential: credential.to_string(),
            token_url: k.token_url,
            grant: k.grant,
            client_id: k.client_id,
            client_secret: k.client_secret,
            client_auth,
            params,
            bootstrap_refresh: k.refresh_token,
            username: k.username,
            password: k.password,
            private_key: k.private_key.map(|p| (p, alg)),
            private_key_kid: k.private_key_kid,
            client_assertion: k.client_assertion,
            client_assertion_type: k
                .client_assertion_type
                .unwrap_or_else(|| JWT_ASSERTION_TYPE.to_string()),
            assertion: k.assertion,
            exchange,
            dpop,
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
                GrantType::JwtBearer => {
                    let source = self
                        .assertion
                        .as_ref()
                        .ok_or_else(|| DialectError::fatal("`assertion` is not configured"))?;
                    form.push(("grant_type".into(), JWT_BEARER_GRANT.into()));
                    form.push((
                        "assertion".into(),
                        Self::secret(source, "assertion")?.expose().to_string(),
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
    /// audience/resource/scope (with `actor` as the actor token when set), or Entra's
    /// on-behalf-of form, with the credential's client authentication.
    fn exchange_form(
        &self,
        subject: &str,
        actor: Option<&str>,
        settings: &ExchangeSettings,
    ) -> Result<(Vec<(String, String)>, Option<String>), DialectError> {
        let mut form: Vec<(String, String)> = match settings.style {
            ExchangeStyle::Rfc8693 => vec![
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
            ],
            ExchangeStyle::OnBehalfOf => vec![
                ("grant_type".into(), JWT_BEARER_GRANT.into()),
                ("assertion".into(), subject.to_string()),
                ("requested_token_use".into(), "on_behalf_of".into()),
            ],
        };
        if let (ExchangeStyle::Rfc8693, Some(actor)) = (settings.style, actor) {
            form.push(("actor_token".into(), actor.to_string()));
            form.push(("actor_token_type".into(), settings.actor_token_type.clone()));
        }
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
            ClientAuth::ClientAssertion => {
                let source = self
                    .client_assertion
                    .as_ref()
                    .ok_or_else(|| DialectError::fatal("`client_assertion` is not configured"))?;
                // Read at each use: a projected token is rotated by the kubelet.
                let assertion = Self::secret(source, "client_assertion")?;
                form.push(("client_id".into(), self.client_id.clone()));
                form.push((
                    "client_assertion_type".into(),
                    self.client_assertion_type.clone(),
                ));
                form.push(("client_assertion".into(), assertion.expose().to_string()));
            }
            ClientAuth::None if self.client_id.is_empty() => {}
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
        let Some(dpop) = &self.dpop else {
            return client.send(request).await;
        };
        let proof = dpop
            .key
            .proof("POST", &dpop.origin, &dpop.path, None)
            .map_err(DialectError::fatal)?;
        let request = request.header(crate::dpop::HEADER, proof);
        let (response, nonce) = client
            .send_keeping(request, Some(crate::dpop::NONCE_HEADER))
            .await?;
        if let Some(nonce) = nonce {
            dpop.key.set_nonce(&dpop.origin, &nonce);
        }
        Ok(response)
    }

    /// RFC 9449 §8: the token endpoint wants a nonce it has just sent; the request is built
    /// again (a client assertion's `jti` is single-use) and sent once more.
    fn wants_nonce(&self, response: &ProviderResponse) -> bool {
        self.dpop.as_ref().is_some_and(|d| {
            matches!(response.status, 400 | 401)
                && crate::dpop::body_asks_for_nonce(&response.body)
                && d.key.nonce(&d.origin).is_some()
        })
    }

    /// A DPoP credential asked for a DPoP-bound token; a Bearer one would be presented with a
    /// scheme the upstream does not expect, and asking again cannot change the provider's mind.
    fn check_token_type(&self, response: &ProviderResponse) -> Result<(), DialectError> {
        if self.dpop.is_none() {
            return Ok(());
        }
        let body = response.json()?;
        match body.get("token_type").and_then(|t| t.as_str()) {
            Some(t) if !t.eq_ignore_ascii_case("DPoP") => Err(DialectError::fatal(format!(
                "token endpoint issued a token of type {:?}, not a DPoP-bound one: does the provider support DPoP for this client?",
                if t.len() <= 16 && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    t
                } else {
                    "other"
                }
            ))),
            _ => Ok(()),
        }
    }

    /// Which assertion file changed since `form` was built, when the token endpoint refused
    /// that assertion (RFC 7523 §3.1: `invalid_grant` for the grant's; §3.2: `invalid_client`
    /// for the client's): the kubelet rotated the file while the request was in flight, and
    /// one more try with the new content is worth it before the refusal counts as fatal.
    fn rotated_since(
        &self,
        form: &[(String, String)],
        response: &ProviderResponse,
    ) -> Option<&'static str> {
        if (200..300).contains(&response.status) {
            return None;
        }
        let body = response.json().ok()?;
        let code = error_code(&body)?;
        let candidates = [
            ("client_assertion", "invalid_client", &self.client_assertion),
            ("assertion", "invalid_grant", &self.assertion),
        ];
        candidates.into_iter().find_map(|(key, refusal, source)| {
            let sent = form.iter().find(|(k, _)| k == key).map(|(_, v)| v)?;
            let now = source.as_ref()?.resolve().ok()?;
            (code == refusal && now.expose() != sent.as_str()).then_some(key)
        })
    }

    /// Posts the form `build` makes, and once more with a form built again (so with files read
    /// again) for each of: a DPoP nonce challenge, and a refusal of an assertion whose file has
    /// changed since it was read.
    async fn post_fresh<T>(
        &self,
        build: impl Fn() -> Result<(Vec<(String, String)>, Option<String>, T), DialectError>,
        client: &ProviderClient,
    ) -> Result<(ProviderResponse, T), DialectError> {
        let (mut form, authorization, mut extra) = build()?;
        let mut response = self.post(&form, authorization, client).await?;
        let (mut nonce_retried, mut rotation_retried) = (false, false);
        loop {
            if !nonce_retried && self.wants_nonce(&response) {
                // RFC 9449 §8: the form is built again too (a client assertion's `jti` is
                // single-use).
                nonce_retried = true;
            } else if let Some(key) = self
                .rotated_since(&form, &response)
                .filter(|_| !rotation_retried)
            {
                tracing::info!(credential = %self.credential, key, status = response.status, "the token endpoint refused an assertion whose file has changed since it was read; retrying once with the new one");
                rotation_retried = true;
            } else {
                return Ok((response, extra));
            }
            let authorization;
            (form, authorization, extra) = build()?;
            response = self.post(&form, authorization, client).await?;
        }
    }
}

/// The token-exchange keys: all or nothing with `grant = "token_exchange"`.
fn exchange_settings(k: &Keys, err: &mut impl FnMut(&str, &str)) -> Option<ExchangeSettings> {
    if k.grant != GrantType::TokenExchange {
        for (key, set) in [
            ("subject_header", k.subject_header.is_some()),
            ("subject_scheme", k.subject_scheme.is_some()),
            ("subject_token_type", k.subject_token_type.is_some()),
            ("requested_token_type", k.requested_token_type.is_some()),
            ("cache_max_entries", k.cache_max_entries.is_some()),
            (
                "max_exchanges_per_second",
                k.max_exchanges_per_second.is_some(),
            ),
            ("negative_ttl", k.negative_ttl.is_some()),
            ("actor", k.actor.is_some()),
            ("actor_token_type", k.actor_token_type.is_some()),
            ("subject_jwks_url", k.subject_jwks_url.is_some()),
            ("subject_issuer", k.subject_issuer.is_some()),
            ("subject_audience", k.subject_audience.is_some()),
            ("subject_jwks_max_stale", k.subject_jwks_max_stale.is_some()),
            ("subject_jwks_ca_file", k.subject_jwks_ca_file.is_some()),
            ("subject_jwks_proxy", k.subject_jwks_proxy.is_some()),
            ("exchange_style", k.exchange_style.is_some()),
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
    let subject_scheme = match k.subject_scheme.as_deref().unwrap_or("Bearer") {
        "" if subject_header
            .as_ref()
            .is_none_or(|h| h == http::header::AUTHORIZATION) =>
        {
            err(
                "subject_scheme",
                "must name a scheme: an Authorization header always carries one (\"\" takes a custom subject_header's whole value)",
            );
            None
        }
        "" => None,
        // RFC 9110 §11.1: an auth-scheme is a token.
        s if s.bytes().all(is_tchar) => Some(s.to_string()),
        _ => {
            err(
                "subject_scheme",
                "must be an auth scheme such as \"Bearer\" (letters, digits and !#$%&'*+-.^_`|~)",
            );
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
    let actor_token_type = token_type("actor_token_type", &k.actor_token_type);
    let style = match k.exchange_style.as_deref() {
        None | Some("rfc8693") => ExchangeStyle::Rfc8693,
        Some("on_behalf_of") => ExchangeStyle::OnBehalfOf,
        Some(_) => {
            err(
                "exchange_style",
                "must be one of \"rfc8693\" (the default), \"on_behalf_of\"",
            );
            ExchangeStyle::Rfc8693
        }
    };
    if style == ExchangeStyle::OnBehalfOf {
        // Entra's on-behalf-of request has no place for these: sending them would be ignored
        // at best, so a config that sets them says something tokenward would not do.
        for (key, set) in [
            ("actor", k.actor.is_some()),
            ("actor_token_type", k.actor_token_type.is_some()),
            ("subject_token_type", k.subject_token_type.is_some()),
            ("requested_token_type", k.requested_token_type.is_some()),
            ("audience", k.audience.is_some()),
        ] {
            if set {
                err(
                    key,
                    "is an RFC 8693 parameter; exchange_style = \"on_behalf_of\" does not send it (use scope)",
                );
            }
        }
        if k.scope.is_none() {
            err(
                "scope",
                "is required by exchange_style = \"on_behalf_of\" (e.g. \"https://graph.microsoft.com/.default\")",
            );
        }
    }
    if k.actor.as_deref().is_some_and(str::is_empty) {
        err("actor", "must name another credential");
    }
    let subject_validation = subject_validation(k, err);
    let cache_max_entries = k.cache_max_entries.unwrap_or(10_000);
    if cache_max_entries == 0 {
        err("cache_max_entries", "must be at least 1");
    }
    let max_exchanges_per_second = k.max_exchanges_per_second.unwrap_or(50);
    if !(1..=100_000).contains(&max_exchanges_per_second) {
        err("max_exchanges_per_second", "must be between 1 and 100000");
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
        subject_scheme,
        subject_token_type,
        requested_token_type,
        cache_max_entries,
        max_exchanges_per_second,
        negative_ttl,
        actor: k.actor.clone(),
        actor_token_type,
        subject_validation,
        style,
    })
}

/// The longest `subject_jwks_max_stale`: a key set older than a day may trust keys the issuer
/// withdrew long ago.
const MAX_JWKS_STALE: Duration = Duration::from_secs(24 * 3600);

/// `subject_jwks_url` and the keys that only go with it: `subject_issuer`, `subject_audience`,
/// `subject_jwks_max_stale`, `subject_jwks_ca_file`, `subject_jwks_proxy`.
fn subject_validation(k: &Keys, err: &mut impl FnMut(&str, &str)) -> Option<SubjectValidation> {
    let Some(url) = &k.subject_jwks_url else {
        for (key, set) in [
            ("subject_issuer", k.subject_issuer.is_some()),
            ("subject_audience", k.subject_audience.is_some()),
            ("subject_jwks_max_stale", k.subject_jwks_max_stale.is_some()),
            ("subject_jwks_ca_file", k.subject_jwks_ca_file.is_some()),
            ("subject_jwks_proxy", k.subject_jwks_proxy.is_some()),
        ] {
            if set {
                err(key, "is checked only with subject_jwks_url set");
            }
        }
        return None;
    };
    if !super::is_http_url(url) {
        err("subject_jwks_url", "must be an http or https URL");
    }
    for (key, value) in [
        ("subject_issuer", &k.subject_issuer),
        ("subject_audience", &k.subject_audience),
    ] {
        if value.as_deref().is_some_and(str::is_empty) {
            err(key, "must not be empty (leave it out to skip the check)");
        }
    }
    let max_stale = match k
        .subject_jwks_max_stale
        .as_deref()
        .map(humantime::parse_duration)
    {
        None => Duration::from_secs(3600),
        Some(Ok(d)) if d <= MAX_JWKS_STALE => d,
        Some(_) => {
            err(
                "subject_jwks_max_stale",
                "must be a duration of at most 24h, such as \"1h\"",
            );
            Duration::from_secs(3600)
        }
    };
    let proxy = k.subject_jwks_proxy.as_deref().and_then(|raw| {
        crate::config::transport::parse_proxy(raw)
            .map_err(|reason| err("subject_jwks_proxy", &reason))
            .ok()
    });
    let ca_file = k
        .subject_jwks_ca_file
        .as_deref()
        .map(std::path::PathBuf::from);
    if let Some(path) = &ca_file
        && let Err(reason) = crate::ca_bundle::load(path)
    {
        err("subject_jwks_ca_file", &reason);
    }
    Some(SubjectValidation {
        jwks_url: url.clone(),
        issuer: k.subject_issuer.clone(),
        audience: k.subject_audience.clone(),
        max_stale,
        transport: crate::config::ProviderTransport {
            proxy,
            ca_file,
            client_cert: None,
        },
    })
}

/// `dpop = true` (a key generated now) or `dpop_key` (read now: its thumbprint is part of the
/// credential's identity, so a new key file makes a new credential at the next reload).
fn token_dpop(k: &Keys, err: &mut impl FnMut(&str, &str)) -> Option<TokenDpop> {
    let key = match (k.dpop, &k.dpop_key) {
        (Some(false), Some(_)) => {
            err(
                "dpop",
                "is false, but `dpop_key` is set (a key implies dpop = true)",
            );
            return None;
        }
        (None | Some(false), None) => return None,
        (Some(true), None) => match DpopKey::generate() {
            Ok(key) => key,
            Err(e) => {
                err("dpop", &e);
                return None;
            }
        },
        (_, Some(source)) => {
            let read = source
                .resolve()
                .map_err(|e| e.to_string())
                .and_then(|pem| DpopKey::from_pem(pem.expose()));
            match read {
                Ok(key) => key,
                Err(reason) => {
                    err("dpop_key", &reason);
                    return None;
                }
            }
        }
    };
    let url = url::Url::parse(&k.token_url).ok()?;
    Some(TokenDpop {
        key: Arc::new(key),
        source: k.dpop_key.clone(),
        origin: url.origin().ascii_serialization(),
        path: url.path().to_string(),
    })
}

/// RFC 9110 §5.6.2: a character of a token.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
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

/// Entra ID's AADSTS codes that name the signed-in user or the user's token, not the client:
/// the assertion's signature (50013), a malformed or expired assertion (50027, 500133), a
/// session revoked or a password changed or expired (50132, 50133, 50173, 50055), the account
/// locked, disabled or missing (50053, 50057, 50034), no signed-in user (50058), multi-factor
/// authentication or a Conditional Access policy (50076, 50079, 50158, 53003), consent
/// (65001), the user not assigned to the app (50105). Entra sends them under `invalid_grant` or
/// `interaction_required` mostly; these count as the caller's under any error code but
/// `invalid_client` and `unauthorized_client`, which always name the client.
const ENTRA_USER_CODES: &[u64] = &[
    50013, 50027, 500133, 50132, 50133, 50173, 50055, 50053, 50057, 50034, 50058, 50076, 50079,
    50158, 53003, 65001, 50105,
];

/// Entra's `error_codes`: numbers only, so safe to log, unlike its `error_description`.
fn entra_codes(body: Option<&serde_json::Value>) -> Vec<u64> {
    body.and_then(|b| b.get("error_codes"))
        .and_then(|c| c.as_array())
        .map(|codes| codes.iter().filter_map(|c| c.as_u64()).take(4).collect())
        .unwrap_or_default()
}

/// The longest `claims` challenge passed on: its base64 must fit a response header that
/// clients and proxies accept (commonly 8 KiB or more), with room to spare.
const MAX_CLAIMS_BYTES: usize = 4096;

/// Entra's `claims` member of a refusal (a Conditional Access claims challenge): a JSON
/// object sent as a string. Anything else (not JSON, not an object, too large) is ignored,
/// and the refusal is then an ordinary one.
fn claims_challenge(body: Option<&serde_json::Value>) -> Option<String> {
    let claims = body?.get("claims")?.as_str()?;
    let parsed: serde_json::Value = serde_json::from_str(claims).ok()?;
    (claims.len() <= MAX_CLAIMS_BYTES && parsed.is_object()).then(|| claims.to_string())
}

/// Classifies a failed token exchange. Provider trouble stays transient. A refusal is the
/// caller's only when the provider ties it to the subject: `invalid_grant`,
/// `interaction_required`, or one of Entra's user-side codes. Everything else —
/// `invalid_request` (RFC 8693 uses it for a refused actor token too), `invalid_client`,
/// `invalid_target`, `invalid_dpop_proof`, a `use_dpop_nonce` repeated after its retry, a
/// firewall's 403 page — is about tokenward's own request: every caller would get it, so it is
/// the credential's, never remembered against a caller's token.
fn exchange_failure(response: &ProviderResponse) -> ExchangeError {
    let failure = parse_failure(response, GrantKind::Login);
    if let ErrorClass::Transient { .. } = failure.class {
        return ExchangeError::credential(failure);
    }
    let body = response.json().ok();
    let code = body.as_ref().and_then(error_code);
    let entra = entra_codes(body.as_ref());
    let what = failure
        .message
        .split(':')
        .next()
        .unwrap_or("token endpoint refused");
    let codes = if entra.is_empty() {
        String::new()
    } else {
        let named: Vec<String> = entra.iter().map(|c| format!("AADSTS{c}")).collect();
        format!(" ({})", named.join(", "))
    };
    let client_refused = matches!(code, Some("invalid_client" | "unauthorized_client"));
    let subject_tied = !client_refused
        && (matches!(code, Some("invalid_grant" | "interaction_required"))
            || entra.iter().any(|c| ENTRA_USER_CODES.contains(c)));
    if !subject_tied {
        return ExchangeError::credential(DialectError::fatal(format!(
            "{what}{codes}: the provider refused tokenward's request, not the caller's token; check the credential's settings and its actor"
        )));
    }
    if let Some(claims) = claims_challenge(body.as_ref()) {
        return ExchangeError {
            error: DialectError::relogin(format!(
                "{what}{codes}: Conditional Access: the caller must satisfy a claims challenge (step up and request a new token)"
            )),
            blame: Blame::Claims(claims),
        };
    }
    let why = if code == Some("interaction_required") {
        "interaction_required: the caller must sign in or consent again"
    } else {
        "the subject token was refused"
    };
    ExchangeError {
        error: DialectError::relogin(format!("{what}{codes}: {why}")),
        blame: Blame::Subject,
    }
}

#[async_trait]
impl Dialect for OAuth2 {
    fn describe(&self) -> String {
        let grant = match self.grant {
            GrantType::ClientCredentials => "client_credentials",
            GrantType::RefreshToken => "refresh_token",
            GrantType::Password => "password",
            GrantType::TokenExchange => match self.exchange.as_ref().map(|x| x.style) {
                Some(ExchangeStyle::OnBehalfOf) => "token_exchange (Entra on_behalf_of)",
                _ => "token_exchange",
            },
            GrantType::JwtBearer => "jwt_bearer",
        };
        let auth = match self.client_auth {
            ClientAuth::ClientSecretBasic => "client_secret_basic",
            ClientAuth::ClientSecretPost => "client_secret_post",
            ClientAuth::PrivateKeyJwt => "private_key_jwt",
            ClientAuth::ClientAssertion => "client_assertion",
            ClientAuth::None => "none",
            ClientAuth::TlsClientAuth => "tls_client_auth",
            ClientAuth::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
        };
        let mut params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if let Some(x) = &self.exchange {
            if let Some(actor) = &x.actor {
                params.push(format!("actor={actor}"));
            }
            if let Some(v) = &x.subject_validation {
                params.push(format!("subjects checked against {}", v.jwks_url));
            }
        }
        let client = if self.client_id.is_empty() {
            "with no client authentication".to_string()
        } else {
            format!("as client {:?} ({auth})", self.client_id)
        };
        format!(
            "oauth2 {grant} at {} {client}{}{}",
            self.token_url,
            if params.is_empty() {
                String::new()
            } else {
                format!(" with {}", params.join(" "))
            },
            // The thumbprint is in the chain identity: a token bound to another key (another
            // replica's, or this one's before a restart) is never adopted from a store.
            match &self.dpop {
                Some(d) if d.key.generated() => {
                    format!(", DPoP key generated at start (jkt {})", d.key.thumbprint())
                }
                Some(d) => format!(", DPoP key jkt {}", d.key.thumbprint()),
                None => String::new(),
            }
        )
    }

    fn account(&self) -> String {
        if self.grant == GrantType::TokenExchange {
            // Per-caller tokens: the whole description keys the exchange cache.
            return self.describe();
        }
        // The resource owner: the user of a password grant, where the bootstrap refresh token
        // or the assertion comes from (a new value there continues the chain), or for
        // client_credentials the client itself. Scope, audience, resource and extra parameters
        // choose what a token is for, not whose it is: they stay out.
        let owner = match self.grant {
            GrantType::Password => format!(
                " for user {:?}",
                self.username.as_deref().unwrap_or_default()
            ),
            GrantType::RefreshToken => match &self.bootstrap_refresh {
                Some(b) => format!(" for the refresh token from {}", b.origin()),
                None => String::new(),
            },
            GrantType::JwtBearer => match &self.assertion {
                Some(a) => format!(" for the assertion from {}", a.origin()),
                None => String::new(),
            },
            GrantType::ClientCredentials | GrantType::TokenExchange => String::new(),
        };
        // A workload's client assertion names the client it authenticates as.
        let assertion = self
            .client_assertion
            .as_ref()
            .map(|a| format!(" with the client assertion from {}", a.origin()))
            .unwrap_or_default();
        // A token bound to another DPoP key is useless here: the thumbprint stays in.
        let dpop = self
            .dpop
            .as_ref()
            .map(|d| format!(", DPoP key jkt {}", d.key.thumbprint()))
            .unwrap_or_default();
        format!(
            "oauth2 {:?} at {} as client {:?}{assertion}{owner}{dpop}",
            self.grant, self.token_url, self.client_id
        )
    }

    fn default_format(&self) -> &'static str {
        if self.dpop.is_some() {
            "DPoP {token}"
        } else {
            "Bearer {token}"
        }
    }

    fn dpop(&self) -> Option<&Arc<DpopKey>> {
        self.dpop.as_ref().map(|d| &d.key)
    }

    fn endpoints(&self) -> Vec<String> {
        let jwks = self
            .exchange
            .as_ref()
            .and_then(|x| x.subject_validation.as_ref())
            .map(|v| v.jwks_url.clone());
        std::iter::once(self.token_url.clone())
            .chain(jwks)
            .collect()
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
        if let Some(s) = self.dpop.as_ref().and_then(|d| d.source.as_ref()) {
            out.push(("dpop_key".into(), s));
        }
        if let Some(s) = &self.client_assertion {
            out.push(("client_assertion".into(), s));
        }
        if let Some(s) = &self.assertion {
            out.push(("assertion".into(), s));
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
        let (response, kind) = self.post_fresh(|| self.build_form(held), client).await?;
        if (200..300).contains(&response.status) {
            self.check_token_type(&response)?;
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
        actor: Option<&Secret>,
        client: &ProviderClient,
    ) -> Result<Grant, ExchangeError> {
        let Some(settings) = &self.exchange else {
            return Err(ExchangeError::credential(DialectError::fatal(
                "this credential does not exchange tokens",
            )));
        };
        let actor = actor.map(Secret::expose);
        let (response, ()) = self
            .post_fresh(
                || {
                    let (form, authorization) =
                        self.exchange_form(subject.expose(), actor, settings)?;
                    Ok((form, authorization, ()))
                },
                client,
            )
            .await
            .map_err(ExchangeError::credential)?;
        if (200..300).contains(&response.status) {
            self.check_token_type(&response)
                .map_err(ExchangeError::credential)?;
            return parse_success(&response, GrantKind::Login).map_err(|error| ExchangeError {
                error,
                blame: Blame::Unusable,
            });
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
        let (form, auth) = d.exchange_form("subj", None, settings).unwrap();
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
    fn on_behalf_of_sends_entras_form_and_refuses_rfc8693_keys() {
        let d = dialect(&[
            ("grant", "token_exchange".into()),
            ("exchange_style", "on_behalf_of".into()),
            ("client_auth", "client_secret_post".into()),
            ("scope", "api://x/.default".into()),
        ])
        .unwrap();
        let settings = d.exchange_settings().unwrap();
        assert_eq!(settings.style, ExchangeStyle::OnBehalfOf);
        let (form, auth) = d.exchange_form("subj", None, settings).unwrap();
        assert!(auth.is_none());
        assert!(form.contains(&("grant_type".into(), JWT_BEARER_GRANT.into())));
        assert!(form.contains(&("assertion".into(), "subj".into())));
        assert!(form.contains(&("requested_token_use".into(), "on_behalf_of".into())));
        assert!(form.contains(&("scope".into(), "api://x/.default".into())));
        assert!(form.contains(&("client_secret".into(), "p&ss".into())));
        for k in [
            "subject_token",
            "subject_token_type",
            "requested_token_type",
        ] {
            assert!(!form.iter().any(|(n, _)| n == k), "{k} sent");
        }
        let keys = |extra: &[(&str, figment::value::Value)]| -> Vec<String> {
            let mut all = vec![
                ("grant", "token_exchange".into()),
                ("exchange_style", "on_behalf_of".into()),
            ];
            all.extend(extra.iter().cloned());
            dialect(&all)
                .err()
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(
            keys(&[("scope", "s".into()), ("actor", "svc".into())]),
            vec!["actor"]
        );
        assert_eq!(
            keys(&[
                ("scope", "s".into()),
                ("requested_token_type", ACCESS_TOKEN_TYPE.into())
            ]),
            vec!["requested_token_type"]
        );
        assert_eq!(keys(&[]), vec!["scope"]);
        let errs = dialect(&[
            ("grant", "token_exchange".into()),
            ("exchange_style", "obo".into()),
        ])
        .err()
        .unwrap();
        assert_eq!(errs[0].0, "exchange_style");
        assert!(errs[0].1.contains("rfc8693") && errs[0].1.contains("on_behalf_of"));
    }

    #[test]
    fn actor_and_subject_validation_keys() {
        let d = dialect(&[
            ("grant", "token_exchange".into()),
            ("actor", "svc".into()),
            ("subject_jwks_url", "https://idp.example/jwks".into()),
            ("subject_issuer", "https://idp.example".into()),
        ])
        .unwrap();
        let settings = d.exchange_settings().unwrap();
        assert_eq!(settings.actor.as_deref(), Some("svc"));
        let v = settings.subject_validation.as_ref().unwrap();
        assert_eq!(v.issuer.as_deref(), Some("https://idp.example"));
        assert!(v.audience.is_none());
        let (form, _) = d.exchange_form("subj", Some("act"), settings).unwrap();
        assert!(form.contains(&("actor_token".into(), "act".into())));
        assert!(form.contains(&("actor_token_type".into(), ACCESS_TOKEN_TYPE.into())));
        let errs = dialect(&[
            ("grant", "token_exchange".into()),
            ("subject_issuer", "https://idp.example".into()),
            ("actor_token_type", "not a uri".into()),
        ])
        .err()
        .unwrap();
        let keys: Vec<_> = errs.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"subject_issuer"), "{keys:?}");
        assert!(keys.contains(&"actor_token_type"), "{keys:?}");
        let errs = dialect(&[("actor", "svc".into())]).err().unwrap();
        assert_eq!(errs[0].0, "actor");
    }

    #[test]
    fn the_subject_jwks_has_its_own_transport_and_staleness_bound() {
        let base = [
            ("grant", "token_exchange".into()),
            ("subject_jwks_url", "https://idp.example/jwks".into()),
        ];
        let validation = |keys: &[(&str, figment::value::Value)]| {
            dialect(keys)
                .unwrap()
                .exchange_settings()
                .unwrap()
                .subject_validation
                .clone()
                .unwrap()
        };
        let v = validation(&base);
        assert_eq!(v.max_stale, Duration::from_secs(3600));
        assert_eq!(v.transport, crate::config::ProviderTransport::default());

        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("jwks-ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["idp.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        let mut keys = base.to_vec();
        keys.extend([
            ("subject_jwks_max_stale", "10m".into()),
            ("subject_jwks_ca_file", ca.display().to_string().into()),
            ("subject_jwks_proxy", "http://proxy.internal:3128".into()),
        ]);
        let v = validation(&keys);
        assert_eq!(v.max_stale, Duration::from_secs(600));
        assert_eq!(v.transport.ca_file.as_deref(), Some(ca.as_path()));
        assert_eq!(
            v.transport.proxy.as_ref().map(|u| u.as_str()),
            Some("http://proxy.internal:3128/")
        );
        assert!(v.transport.client_cert.is_none());

        let mut bad = base.to_vec();
        bad.extend([
            ("subject_jwks_max_stale", "2d".into()),
            ("subject_jwks_ca_file", "/nonexistent/ca.pem".into()),
            ("subject_jwks_proxy", "socks5://p:1".into()),
        ]);
        let errs = dialect(&bad).err().unwrap();
        let keys: Vec<_> = errs.iter().map(|(k, _)| k.as_str()).collect();
        for k in [
            "subject_jwks_max_stale",
            "subject_jwks_ca_file",
            "subject_jwks_proxy",
        ] {
            assert!(keys.contains(&k), "{errs:?}");
        }
        let errs = dialect(&[
            ("grant", "token_exchange".into()),
            ("subject_jwks_max_stale", "1h".into()),
        ])
        .err()
        .unwrap();
        assert_eq!(errs[0].0, "subject_jwks_max_stale");
        assert!(errs[0].1.contains("subject_jwks_url"), "{errs:?}");
    }

    #[test]
    fn a_refused_subject_is_told_apart_from_the_credentials_refusals_and_outages() {
        let blame = |status, body| exchange_failure(&resp(status, body)).blame;
        for subject in [
            r#"{"error":"invalid_grant"}"#,
            r#"{"error":"interaction_required"}"#,
            r#"{"error":"invalid_request","error_codes":[50027]}"#,
            r#"{"error":"invalid_grant","error_codes":[50013]}"#,
        ] {
            assert_eq!(blame(400, subject), Blame::Subject, "{subject}");
        }
        for credential in [
            r#"{"error":"invalid_request"}"#,
            r#"{"error":"invalid_client"}"#,
            r#"{"error":"invalid_client","error_codes":[50013]}"#,
            r#"{"error":"invalid_target"}"#,
            r#"{"error":"invalid_scope"}"#,
            r#"{"error":"invalid_dpop_proof"}"#,
            r#"{"error":"use_dpop_nonce"}"#,
            r#"{"error":"invalid_token"}"#,
            "<html>Request blocked by the firewall</html>",
        ] {
            assert_eq!(blame(400, credential), Blame::Credential, "{credential}");
        }
        assert_eq!(blame(403, "<html>Forbidden</html>"), Blame::Credential);
        let e = exchange_failure(&resp(503, ""));
        assert_eq!(e.blame, Blame::Credential);
        assert!(matches!(e.error.class, ErrorClass::Transient { .. }));
        let e = exchange_failure(&resp(400, r#"{"error":"temporarily_unavailable"}"#));
        assert!(matches!(e.error.class, ErrorClass::Transient { .. }));
        let e = exchange_failure(&resp(400, r#"{"error":"invalid_request"}"#));
        assert_eq!(e.error.class, ErrorClass::Fatal);
        assert!(
            e.error.message.contains("not the caller's token"),
            "{}",
            e.error.message
        );
        let msg = exchange_failure(&resp(400, r#"{"error":"invalid_grant"}"#))
            .error
            .message;
        assert!(
            msg.contains("invalid_grant") && msg.contains("subject token"),
            "{msg}"
        );
        let msg = exchange_failure(&resp(
            400,
            r#"{"error":"invalid_grant","error_description":"AADSTS50013: secret-ish","error_codes":[50013]}"#,
        ))
        .error
        .message;
        assert!(msg.contains("AADSTS50013"), "{msg}");
        assert!(!msg.contains("secret-ish"), "{msg}");
        let claims = r#"{"access_token":{"capolids":{"essential":true,"values":["p1"]}}}"#;
        for error in ["invalid_grant", "interaction_required"] {
            let body = serde_json::json!({"error": error, "error_codes": [50076], "suberror": "basic_action", "claims": claims});
            let e = exchange_failure(&resp(400, &body.to_string()));
            assert_eq!(e.blame, Blame::Claims(claims.to_string()), "{error}");
            assert!(
                e.error.message.contains("claims challenge"),
                "{}",
                e.error.message
            );
        }
        for ignored in [
            "not json",
            "[1]",
            &format!("{{\"a\":\"{}\"}}", "x".repeat(5000)),
        ] {
            let body = serde_json::json!({"error": "invalid_grant", "claims": ignored});
            assert_eq!(
                exchange_failure(&resp(400, &body.to_string())).blame,
                Blame::Subject
            );
        }
        // A client refusal stays the credential's, claims or not.
        let body = serde_json::json!({"error": "invalid_client", "claims": claims});
        assert_eq!(
            exchange_failure(&resp(401, &body.to_string())).blame,
            Blame::Credential
        );
        let e = exchange_failure(&resp(400, r#"{"error":"interaction_required"}"#));
        assert_eq!(e.error.class, ErrorClass::Relogin);
        assert!(
            e.error.message.contains("interaction_required"),
            "{}",
            e.error.message
        );
    }

    #[test]
    fn dpop_keys_validate_and_name_the_key() {
        let d = dialect(&[("dpop", true.into())]).unwrap();
        let key = d.dpop().expect("a generated key");
        assert!(key.generated());
        assert_eq!(d.default_format(), "DPoP {token}");
        assert!(d.describe().contains(key.thumbprint()), "{}", d.describe());
        // Another parse generates another key, so another chain identity.
        let again = dialect(&[("dpop", true.into())]).unwrap();
        assert_ne!(d.describe(), again.describe());
        let plain = dialect(&[("dpop", false.into())]).unwrap();
        assert!(plain.dpop().is_none());
        assert_eq!(plain.default_format(), "Bearer {token}");

        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("dpop.pem");
        let secret = p256::SecretKey::from_slice(&[9u8; 32]).unwrap();
        std::fs::write(
            &pem,
            secret.to_sec1_pem(p256::pkcs8::LineEnding::LF).unwrap(),
        )
        .unwrap();
        let file = |path: &std::path::Path| -> figment::value::Value {
            let mut m = figment::value::Dict::new();
            m.insert("file".into(), path.display().to_string().into());
            m.into()
        };
        let a = dialect(&[("dpop_key", file(&pem))]).unwrap();
        let b = dialect(&[("dpop_key", file(&pem)), ("dpop", true.into())]).unwrap();
        let (ka, kb) = (a.dpop().unwrap(), b.dpop().unwrap());
        assert!(!ka.generated());
        assert_eq!(ka.thumbprint(), kb.thumbprint());
        assert_eq!(a.describe(), b.describe(), "a key file keeps the identity");
        assert!(a.secret_sources().iter().any(|(k, _)| k == "dpop_key"));

        let errs = |extra: &[(&str, figment::value::Value)]| dialect(extra).err().unwrap();
        let e = errs(&[("dpop_key", file(&pem)), ("dpop", false.into())]);
        assert_eq!(e[0].0, "dpop");
        let missing = dir.path().join("absent.pem");
        let e = errs(&[("dpop_key", file(&missing))]);
        assert_eq!(e[0].0, "dpop_key");
        assert!(e[0].1.contains("absent.pem"), "{e:?}");
        let not_p256 = dir.path().join("rsa.pem");
        std::fs::write(
            &not_p256,
            "-----BEGIN PRIVATE KEY-----\nTUlJQ2Rn\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = errs(&[("dpop_key", file(&not_p256))]);
        assert_eq!(e[0].0, "dpop_key");
        assert!(
            e[0].1.contains("P-256") && !e[0].1.contains("TUlJ"),
            "{e:?}"
        );
    }

    #[test]
    fn a_dpop_credential_refuses_a_bearer_token_and_retries_only_for_a_nonce() {
        let d = dialect(&[("dpop", true.into())]).unwrap();
        let ok = resp(200, r#"{"access_token":"a","token_type":"DPoP"}"#);
        assert!(d.check_token_type(&ok).is_ok());
        let bearer = resp(200, r#"{"access_token":"a","token_type":"Bearer"}"#);
        let e = d.check_token_type(&bearer).unwrap_err();
        assert_eq!(e.class, ErrorClass::Fatal);
        assert!(e.message.contains("Bearer"), "{}", e.message);
        assert!(dialect(&[]).unwrap().check_token_type(&bearer).is_ok());

        let asks = resp(400, r#"{"error":"use_dpop_nonce"}"#);
        assert!(!d.wants_nonce(&asks), "no nonce received yet");
        let dpop = d.dpop.as_ref().unwrap();
        dpop.key.set_nonce(&dpop.origin, b"n1");
        assert_eq!(dpop.origin, "https://idp.example");
        assert_eq!(dpop.path, "/token");
        assert!(d.wants_nonce(&asks));
        assert!(!d.wants_nonce(&resp(400, r#"{"error":"invalid_grant"}"#)));
        assert!(!dialect(&[]).unwrap().wants_nonce(&asks));
    }

    fn no_secret(extra: &[(&str, figment::value::Value)]) -> Result<OAuth2, Vec<(String, String)>> {
        let mut d = figment::value::Dict::new();
        d.insert("token_url".into(), "https://idp.example/token".into());
        for (k, v) in extra {
            d.insert((*k).into(), v.clone());
        }
        OAuth2::from_keys("t", d)
    }

    fn file_source(path: &std::path::Path) -> figment::value::Value {
        let mut m = figment::value::Dict::new();
        m.insert("file".into(), path.display().to_string().into());
        m.into()
    }

    fn field<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
        form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn client_assertion_is_read_from_its_file_at_each_use_on_every_grant() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "eyJ.first.sig\n").unwrap();
        let d = no_secret(&[
            ("client_id", "app".into()),
            ("client_auth", "client_assertion".into()),
            ("client_assertion", file_source(&path)),
        ])
        .unwrap();
        let (form, auth, _) = d.build_form(&Held::default()).unwrap();
        assert!(auth.is_none());
        assert_eq!(field(&form, "client_id"), Some("app"));
        assert_eq!(
            field(&form, "client_assertion_type"),
            Some(JWT_ASSERTION_TYPE)
        );
        assert_eq!(field(&form, "client_assertion"), Some("eyJ.first.sig"));
        std::fs::write(&path, "eyJ.second.sig").unwrap();
        let held = Held {
            access_token: None,
            refresh_token: Some(Secret::new("rt")),
        };
        let (form, _, kind) = d.build_form(&held).unwrap();
        assert_eq!(kind, GrantKind::Refresh);
        assert_eq!(field(&form, "client_assertion"), Some("eyJ.second.sig"));
        // client_assertion alone implies client_auth = "client_assertion"; a custom type is sent.
        let d = no_secret(&[
            ("client_id", "app".into()),
            ("grant", "token_exchange".into()),
            ("client_assertion", file_source(&path)),
            ("client_assertion_type", "urn:example:assertion".into()),
        ])
        .unwrap();
        let (form, _) = d
            .exchange_form("subj", None, d.exchange_settings().unwrap())
            .unwrap();
        assert_eq!(
            field(&form, "client_assertion_type"),
            Some("urn:example:assertion")
        );
        assert_eq!(field(&form, "client_assertion"), Some("eyJ.second.sig"));
        // A missing file names the key and the path, and is fatal.
        std::fs::remove_file(&path).unwrap();
        let e = d
            .exchange_form("subj", None, d.exchange_settings().unwrap())
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Fatal);
        assert!(
            e.message.contains("`client_assertion`")
                && e.message.contains(&path.display().to_string()),
            "{}",
            e.message
        );
    }

    #[test]
    fn jwt_bearer_sends_the_assertion_file_without_client_authentication() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("assertion");
        std::fs::write(&path, "eyJ.grant.sig").unwrap();
        let d = no_secret(&[
            ("grant", "jwt_bearer".into()),
            ("assertion", file_source(&path)),
            ("scope", "partner.read".into()),
        ])
        .unwrap();
        let (form, auth, kind) = d.build_form(&Held::default()).unwrap();
        assert_eq!(kind, GrantKind::Login);
        assert!(auth.is_none());
        assert_eq!(field(&form, "grant_type"), Some(JWT_BEARER_GRANT));
        assert_eq!(field(&form, "assertion"), Some("eyJ.grant.sig"));
        assert_eq!(field(&form, "scope"), Some("partner.read"));
        assert_eq!(field(&form, "client_id"), None);
        assert!(
            d.describe().contains("jwt_bearer")
                && d.describe().contains("no client authentication")
        );
        let keys: Vec<String> = d.secret_sources().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["assertion"]);
        // With a secret, client authentication defaults to Basic as for other grants.
        let d = dialect(&[
            ("grant", "jwt_bearer".into()),
            ("assertion", file_source(&path)),
        ])
        .unwrap();
        assert!(
            d.build_form(&Held::default())
                .unwrap()
                .1
                .unwrap()
                .starts_with("Basic ")
        );
    }

    #[test]
    fn assertion_config_errors_name_keys() {
        let keys = |extra: &[(&str, figment::value::Value)]| -> Vec<String> {
            no_secret(extra)
                .err()
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(
            keys(&[
                ("client_id", "a".into()),
                ("client_auth", "client_assertion".into())
            ]),
            vec!["client_assertion"]
        );
        assert_eq!(keys(&[("grant", "jwt_bearer".into())]), vec!["assertion"]);
        assert_eq!(
            keys(&[
                ("client_id", "a".into()),
                ("client_auth", "none".into()),
                ("assertion", "x".into())
            ]),
            vec!["assertion"]
        );
        assert_eq!(
            keys(&[
                ("client_id", "a".into()),
                ("client_auth", "none".into()),
                ("client_assertion_type", "urn:x".into())
            ]),
            vec!["client_assertion_type"]
        );
        assert_eq!(
            keys(&[
                ("client_id", "a".into()),
                ("client_assertion", "x".into()),
                ("client_assertion_type", "not a uri".into())
            ]),
            vec!["client_assertion_type"]
        );
        assert_eq!(
            keys(&[
                ("client_auth", "client_secret_post".into()),
                ("client_assertion", "x".into()),
                ("client_secret", "s".into())
            ]),
            vec!["client_id", "client_assertion"]
        );
        assert_eq!(keys(&[("client_auth", "none".into())]), vec!["client_id"]);
        assert_eq!(
            keys(&[
                ("client_id", "a".into()),
                ("extra_params", {
                    let mut m = figment::value::Dict::new();
                    m.insert("assertion".into(), "x".into());
                    m.into()
                }),
                ("client_auth", "none".into())
            ]),
            vec!["extra_params.assertion"]
        );
    }

    #[test]
    fn only_a_refusal_of_a_changed_assertion_file_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "old").unwrap();
        let d = no_secret(&[
            ("client_id", "a".into()),
            ("client_assertion", file_source(&path)),
        ])
        .unwrap();
        let (form, _, _) = d.build_form(&Held::default()).unwrap();
        let refused = resp(401, r#"{"error":"invalid_client"}"#);
        assert_eq!(d.rotated_since(&form, &refused), None, "unchanged file");
        std::fs::write(&path, "new").unwrap();
        assert_eq!(d.rotated_since(&form, &refused), Some("client_assertion"));
        assert_eq!(
            d.rotated_since(&form, &resp(400, r#"{"error":"invalid_grant"}"#)),
            None
        );
        assert_eq!(d.rotated_since(&form, &resp(503, "")), None);
        assert_eq!(
            d.rotated_since(&form, &resp(200, r#"{"access_token":"x"}"#)),
            None
        );
        let j = no_secret(&[
            ("grant", "jwt_bearer".into()),
            ("assertion", file_source(&path)),
        ])
        .unwrap();
        let (form, _, _) = j.build_form(&Held::default()).unwrap();
        std::fs::write(&path, "newer").unwrap();
        assert_eq!(
            j.rotated_since(&form, &resp(400, r#"{"error":"invalid_grant"}"#)),
            Some("assertion")
        );
        assert_eq!(j.rotated_since(&form, &refused), None);
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
