//! AWS Signature Version 4: credentials from the AWS chain (config keys, environment, web
//! identity, container credentials, IMDSv2, with sts:AssumeRole on top) held by the engine as
//! its token, and every upstream request signed with them over the headers the upstream sees.

pub mod chain;
pub mod sigv4;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::Deserialize;

use super::{
    Dialect, DialectError, Expiry, Grant, GrantKind, Held, ProviderClient, RequestSigner,
    SignInput, UpstreamVerdict, parse_keys,
};
use crate::secret::{Secret, SecretSource};
use chain::{AssumeRole, Credentials, Source, Sts};

/// Request bodies up to this size are buffered to be hashed, unless `max_body_bytes` says
/// otherwise (`payload = "unsigned"` buffers nothing).
pub const DEFAULT_MAX_BODY: usize = 8 * 1024 * 1024;
/// The largest `max_body_bytes` accepted: bodies are held in memory while they are hashed.
const MAX_MAX_BODY: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    /// The body's SHA-256 is signed (the body is buffered to compute it).
    #[default]
    Signed,
    /// `X-Amz-Content-Sha256: UNSIGNED-PAYLOAD` (S3): the body streams.
    Unsigned,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    region: String,
    service: String,
    #[serde(default)]
    payload: Payload,
    access_key_id: Option<String>,
    secret_access_key: Option<SecretSource>,
    session_token: Option<SecretSource>,
    role_arn: Option<String>,
    web_identity_token_file: Option<String>,
    sts_endpoint: Option<String>,
    max_body_bytes: Option<u64>,
}

pub struct AwsSigV4 {
    source: Source,
    assume_role: Option<AssumeRole>,
    sts: Sts,
    signer: Arc<Signer>,
}

fn valid_label(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl AwsSigV4 {
    pub fn from_keys(keys: figment::value::Dict) -> Result<Self, Vec<(String, String)>> {
        Self::from_keys_in(keys, &|name| std::env::var(name).ok())
    }

    /// As [`Self::from_keys`], reading the environment through `env`.
    pub fn from_keys_in(
        keys: figment::value::Dict,
        env: chain::Env<'_>,
    ) -> Result<Self, Vec<(String, String)>> {
        let k: Keys = parse_keys(keys)?;
        let mut errors: Vec<(String, String)> = Vec::new();
        if !valid_label(&k.region) {
            errors.push((
                "region".into(),
                format!(
                    "{:?} is not an AWS region name (e.g. \"eu-west-1\")",
                    k.region
                ),
            ));
        }
        if !valid_label(&k.service) {
            errors.push((
                "service".into(),
                format!(
                    "{:?} is not a signing name (e.g. \"s3\", \"es\", \"execute-api\")",
                    k.service
                ),
            ));
        }
        let max_body = k.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY as u64);
        if max_body > MAX_MAX_BODY as u64 {
            errors.push((
                "max_body_bytes".into(),
                format!("must be at most {MAX_MAX_BODY} (bodies are held in memory to be hashed)"),
            ));
        }
        let sts_endpoint = k
            .sts_endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL_STS").filter(|v| !v.is_empty()))
            .unwrap_or_else(|| format!("https://sts.{}.amazonaws.com", k.region));
        if !super::is_http_url(&sts_endpoint) {
            errors.push((
                "sts_endpoint".into(),
                format!("{sts_endpoint:?} is not an http(s) URL"),
            ));
        }
        let source = match (&k.access_key_id, &k.secret_access_key) {
            (Some(id), Some(secret)) => {
                if id.is_empty() || id.contains(['\n', '\r']) {
                    errors.push(("access_key_id".into(), "must be one non-empty line".into()));
                }
                if k.web_identity_token_file.is_some() {
                    errors.push((
                        "web_identity_token_file".into(),
                        "cannot go with `access_key_id`: pick one source of credentials".into(),
                    ));
                }
                Some(Source::Static {
                    access_key_id: id.clone(),
                    secret_access_key: secret.clone(),
                    session_token: k.session_token.clone(),
                })
            }
            (Some(_), None) => {
                errors.push((
                    "secret_access_key".into(),
                    "`access_key_id` needs `secret_access_key`".into(),
                ));
                None
            }
            (None, Some(_)) => {
                errors.push((
                    "access_key_id".into(),
                    "`secret_access_key` needs `access_key_id`".into(),
                ));
                None
            }
            (None, None) => {
                if k.session_token.is_some() {
                    errors.push((
                        "session_token".into(),
                        "goes with `access_key_id` and `secret_access_key`".into(),
                    ));
                }
                match chain::default_source(
                    env,
                    k.role_arn.as_deref(),
                    k.web_identity_token_file.as_deref(),
                ) {
                    Ok(s) => Some(s),
                    Err(reason) => {
                        let key = if k.web_identity_token_file.is_some() {
                            "web_identity_token_file"
                        } else {
                            "dialect"
                        };
                        errors.push((key.into(), reason));
                        None
                    }
                }
            }
        };
        if let Some(arn) = &k.role_arn
            && !arn.starts_with("arn:")
        {
            errors.push((
                "role_arn".into(),
                format!("{arn:?} is not a role ARN (arn:aws:iam::ACCOUNT:role/NAME)"),
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let Some(source) = source else {
            return Err(vec![("dialect".into(), "no source of credentials".into())]);
        };
        // A configured role is assumed on top of the base credentials, unless the base
        // credentials are that role's already (web identity assumes it itself).
        let assume_role = match (&source, k.role_arn) {
            (Source::WebIdentity { .. }, _) | (_, None) => None,
            (_, Some(role_arn)) => Some(AssumeRole {
                role_arn,
                session_name: env("AWS_ROLE_SESSION_NAME")
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| "tokenward".into()),
            }),
        };
        let style = if k.service == "s3" {
            sigv4::PathStyle::S3
        } else {
            sigv4::PathStyle::OTHER
        };
        Ok(AwsSigV4 {
            source,
            assume_role,
            sts: Sts {
                endpoint: sts_endpoint,
                region: k.region.clone(),
            },
            signer: Arc::new(Signer {
                region: k.region,
                service: k.service,
                payload: k.payload,
                style,
                max_body: max_body as usize,
                key: std::sync::Mutex::new(None),
            }),
        })
    }

    fn uses_sts(&self) -> bool {
        self.assume_role.is_some() || matches!(self.source, Source::WebIdentity { .. })
    }

    fn credentials_text(&self) -> String {
        let mut text = self.source.describe();
        if let Some(role) = &self.assume_role {
            text.push_str(&format!(", then AssumeRole as {}", role.role_arn));
        }
        if self.uses_sts() {
            text.push_str(&format!(" (STS at {})", self.sts.endpoint));
        }
        text
    }
}

#[async_trait]
impl Dialect for AwsSigV4 {
    fn describe(&self) -> String {
        let payload = match self.signer.payload {
            Payload::Signed => format!(
                "payload signed (bodies up to {} bytes)",
                self.signer.max_body
            ),
            Payload::Unsigned => "payload unsigned".into(),
        };
        format!(
            "aws-sigv4 for service {} in {}; credentials from {}; {payload}",
            self.signer.service,
            self.signer.region,
            self.credentials_text()
        )
    }

    fn account(&self) -> String {
        format!(
            "aws-sigv4 with credentials from {}",
            self.credentials_text()
        )
    }

    /// The metadata services at their link-local addresses (IMDS, the ECS and EKS Pod Identity
    /// agents) speak plain http by design and are answered by the host itself: they are not
    /// listed, so `check` does not warn about them; an address moved elsewhere is.
    fn endpoints(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.source {
            Source::Container { url, .. } if !chain::on_link_local(url) => out.push(url.clone()),
            Source::Imds { endpoint } if !chain::on_link_local(endpoint) => {
                out.push(endpoint.clone())
            }
            _ => {}
        }
        if self.uses_sts() {
            out.push(self.sts.endpoint.clone());
        }
        out
    }

    fn default_format(&self) -> &'static str {
        "{token}"
    }

    fn secret_sources(&self) -> Vec<(String, &SecretSource)> {
        match &self.source {
            Source::Static {
                secret_access_key,
                session_token,
                ..
            } => {
                let mut out = vec![("secret_access_key".to_string(), secret_access_key)];
                if let Some(t) = session_token {
                    out.push(("session_token".into(), t));
                }
                out
            }
            _ => Vec::new(),
        }
    }

    fn request_signer(&self) -> Option<Arc<dyn RequestSigner>> {
        Some(self.signer.clone())
    }

    fn token_source(&self) -> Option<String> {
        Some(match &self.assume_role {
            Some(_) => format!("{}+assume-role", self.source.name()),
            None => self.source.name().to_string(),
        })
    }

    fn keeps_tokens_in_memory_only(&self) -> bool {
        true
    }

    async fn obtain(&self, _held: &Held, client: &ProviderClient) -> Result<Grant, DialectError> {
        let env = |name: &str| std::env::var(name).ok();
        let base = chain::fetch(&self.source, &self.sts, client, &env).await?;
        let credentials = match &self.assume_role {
            Some(role) => chain::assume_role(role, &base, &self.sts, client).await?,
            None => base,
        };
        Ok(Grant {
            kind: GrantKind::Login,
            access_token: credentials.encode(),
            expires: credentials.expiration.map_or(Expiry::Unknown, Expiry::At),
            refresh_token: None,
        })
    }
}

/// Signs each upstream request with the credentials the engine holds.
pub struct Signer {
    region: String,
    service: String,
    payload: Payload,
    style: sigv4::PathStyle,
    max_body: usize,
    /// The signing key of the last access key and day: four HMACs a day rather than four per
    /// request. An access key id names one secret (a new secret comes with a new id).
    key: std::sync::Mutex<Option<DayKey>>,
}

struct DayKey {
    access_key_id: String,
    date: String,
    key: [u8; 32],
}

impl Signer {
    fn day_key(&self, access_key_id: &str, secret: &str, scope: &sigv4::Scope<'_>) -> [u8; 32] {
        let mut cached = self.key.lock().unwrap_or_else(|p| p.into_inner());
        match cached.as_ref() {
            Some(k) if k.access_key_id == access_key_id && k.date == scope.date() => k.key,
            _ => {
                let key = sigv4::signing_key(secret, scope);
                *cached = Some(DayKey {
                    access_key_id: access_key_id.to_string(),
                    date: scope.date().to_string(),
                    key,
                });
                key
            }
        }
    }
}

/// AWS error codes that refuse the credentials themselves (a signature made with a wrong or
/// rotated secret, an unknown or expired key): new credentials can help. `AccessDenied` is
/// not among them: the credentials were fine, the policy says no.
const CREDENTIAL_ERRORS: [&str; 7] = [
    "SignatureDoesNotMatch",
    "InvalidClientTokenId",
    "ExpiredTokenException",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "UnrecognizedClientException",
    "InvalidSignatureException",
];

/// Fields the signature replaces whatever the client sent in them.
static REPLACED: [http::HeaderName; 4] = [
    http::header::AUTHORIZATION,
    http::HeaderName::from_static("x-amz-date"),
    http::HeaderName::from_static("x-amz-content-sha256"),
    http::HeaderName::from_static("x-amz-security-token"),
];

/// Whether a field the client sent is signed: what identifies the request and its content
/// (AWS requires `host` and every `x-amz-*` field to be signed). Hop-by-hop and framing
/// fields, which a proxy on the way may rewrite, are not.
fn signs_field(name: &http::HeaderName) -> bool {
    let n = name.as_str();
    n == "host" || n == "content-type" || n == "content-md5" || n.starts_with("x-amz-")
}

impl Signer {
    /// The signature headers for one request at `now`.
    pub fn headers_at(
        &self,
        token: &Secret,
        input: &SignInput<'_>,
        now: SystemTime,
    ) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, String> {
        let (access_key_id, secret, session) = Credentials::decode(token)
            .ok_or_else(|| "the held AWS credentials are incomplete".to_string())?;
        let amz_date = sigv4::amz_date(now);
        let payload_hash = match self.payload {
            Payload::Signed => sigv4::sha256_hex(input.body),
            Payload::Unsigned => sigv4::UNSIGNED_PAYLOAD.to_string(),
        };
        let mut signed: Vec<(&str, &str)> = Vec::with_capacity(input.headers.len() + 3);
        for (name, value) in input.headers {
            if signs_field(name) && !REPLACED.contains(name) {
                let value = value.to_str().map_err(|_| {
                    format!("the {name} field is not visible ASCII and cannot be signed")
                })?;
                signed.push((name.as_str(), value));
            }
        }
        signed.push(("x-amz-date", &amz_date));
        signed.push(("x-amz-content-sha256", &payload_hash));
        if let Some(session) = session {
            signed.push(("x-amz-security-token", session));
        }
        let scope = sigv4::Scope {
            amz_date: &amz_date,
            region: &self.region,
            service: &self.service,
        };
        let authorization = sigv4::authorization(
            access_key_id,
            &self.day_key(access_key_id, secret, &scope),
            &sigv4::Request {
                method: input.method,
                path: input.path,
                query: input.query,
                headers: &signed,
                payload_hash: &payload_hash,
            },
            &scope,
            self.style,
        );
        let value = |s: &str, sensitive: bool| {
            let mut v = http::HeaderValue::from_str(s)
                .map_err(|_| "cannot build a signature header".to_string())?;
            v.set_sensitive(sensitive);
            Ok::<_, String>(v)
        };
        let mut out = vec![
            (REPLACED[0].clone(), value(&authorization, true)?),
            (REPLACED[1].clone(), value(&amz_date, false)?),
            (REPLACED[2].clone(), value(&payload_hash, false)?),
        ];
        if let Some(session) = session {
            out.push((REPLACED[3].clone(), value(session, true)?));
        }
        Ok(out)
    }
}

impl RequestSigner for Signer {
    fn max_body_bytes(&self) -> usize {
        self.max_body
    }

    fn signs_body(&self) -> bool {
        self.payload == Payload::Signed
    }

    /// S3 signs the path as received, and so does a verifier that reads it from the wire:
    /// the path goes upstream spelled as it is signed (each byte outside RFC 3986's unreserved
    /// set and `/` percent-encoded once), whatever spelling the client chose.
    fn wire_path(&self, path: &str) -> Option<String> {
        (self.style == sigv4::PathStyle::S3)
            .then(|| sigv4::canonical_uri(path, self.style))
            .filter(|canonical| canonical != path)
    }

    /// The query goes upstream exactly as it is signed: its parameters decoded (a `+` is a
    /// space, as AWS reads a query) and encoded strictly, sorted — what AWS computes from
    /// whatever spelling it receives, and what a verifier that reads the raw query checks.
    fn wire_query(&self, query: &str) -> Option<String> {
        Some(sigv4::canonical_query(Some(query))).filter(|canonical| canonical != query)
    }

    /// S3 answers a refused signature 403 (an expired token 400) with the code in an XML body;
    /// the JSON protocols name it in `x-amzn-ErrorType` too (`Code:` then a URL, at times).
    fn verdict(&self, status: u16, headers: &http::HeaderMap) -> UpstreamVerdict {
        if !matches!(status, 400 | 403) {
            return UpstreamVerdict::Accepted;
        }
        match headers
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
        {
            Some(kind) => {
                let code = kind.split(':').next().unwrap_or_default().trim();
                match CREDENTIAL_ERRORS.iter().find(|c| **c == code) {
                    Some(c) => UpstreamVerdict::Rejected((*c).to_string()),
                    None => UpstreamVerdict::Accepted,
                }
            }
            None => UpstreamVerdict::InBody,
        }
    }

    fn rejection_in_body(&self, body_start: &[u8]) -> Option<&'static str> {
        let text = String::from_utf8_lossy(body_start);
        // `<Code>X</Code>` (XML) or `"__type":"…#X"` / `"code":"X"` (JSON): the code as a whole
        // word, so `ExpiredToken` is not read out of `ExpiredTokenException`.
        CREDENTIAL_ERRORS.iter().copied().find(|code| {
            text.match_indices(code).any(|(at, _)| {
                let before = text[..at].chars().next_back();
                let after = text[at + code.len()..].chars().next();
                !before.is_some_and(|c| c.is_ascii_alphanumeric())
                    && !after.is_some_and(|c| c.is_ascii_alphanumeric())
            })
        })
    }

    fn replaces(&self) -> &[http::HeaderName] {
        &REPLACED
    }

    fn sign(
        &self,
        token: &Secret,
        input: &SignInput<'_>,
    ) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, String> {
        self.headers_at(token, input, SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, &str)]) -> figment::value::Dict {
        let mut d = figment::value::Dict::new();
        for (k, v) in pairs {
            d.insert((*k).into(), (*v).into());
        }
        d
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn build(pairs: &[(&str, &str)]) -> Result<AwsSigV4, Vec<(String, String)>> {
        AwsSigV4::from_keys_in(keys(pairs), &no_env)
    }

    #[test]
    fn config_errors_name_the_key() {
        let key = |pairs: &[(&str, &str)]| build(pairs).err().unwrap()[0].0.clone();
        assert_eq!(key(&[("region", "EU 1"), ("service", "s3")]), "region");
        assert_eq!(key(&[("region", "eu-west-1"), ("service", "")]), "service");
        assert_eq!(
            key(&[
                ("region", "eu-west-1"),
                ("service", "s3"),
                ("access_key_id", "A")
            ]),
            "secret_access_key"
        );
        assert_eq!(
            key(&[
                ("region", "eu-west-1"),
                ("service", "s3"),
                ("payload", "maybe")
            ]),
            "payload"
        );
        assert_eq!(
            key(&[
                ("region", "eu-west-1"),
                ("service", "s3"),
                ("role_arn", "role/x")
            ]),
            "role_arn"
        );
        assert_eq!(
            key(&[
                ("region", "eu-west-1"),
                ("service", "s3"),
                ("web_identity_token_file", "/t")
            ]),
            "web_identity_token_file"
        );
    }

    #[test]
    fn the_source_and_sts_endpoint_show_without_secrets() {
        let d = build(&[
            ("region", "eu-west-1"),
            ("service", "s3"),
            ("access_key_id", "AKIDEXAMPLE"),
            ("secret_access_key", "wJalrXUtnFEMI"),
            ("role_arn", "arn:aws:iam::123456789012:role/app"),
        ])
        .unwrap();
        let text = d.describe();
        assert!(
            text.contains("config keys") && text.contains("AssumeRole"),
            "{text}"
        );
        assert!(
            text.contains("https://sts.eu-west-1.amazonaws.com"),
            "{text}"
        );
        assert!(!text.contains("wJalrXUtnFEMI"), "{text}");
        assert_eq!(d.token_source().as_deref(), Some("config+assume-role"));
    }

    #[test]
    fn refusals_of_the_credentials_are_told_from_other_refusals() {
        // No keys and an empty environment: the chain's last source, IMDS.
        let d = build(&[("region", "us-east-1"), ("service", "execute-api")]).unwrap();
        assert_eq!(d.token_source().as_deref(), Some("imds"));
        let s = &d.signer;
        let mut h = http::HeaderMap::new();
        assert_eq!(s.verdict(200, &h), UpstreamVerdict::Accepted);
        assert_eq!(s.verdict(403, &h), UpstreamVerdict::InBody);
        h.insert(
            "x-amzn-errortype",
            "ExpiredTokenException:http://internal".parse().unwrap(),
        );
        assert_eq!(
            s.verdict(403, &h),
            UpstreamVerdict::Rejected("ExpiredTokenException".into())
        );
        h.insert("x-amzn-errortype", "AccessDeniedException".parse().unwrap());
        assert_eq!(s.verdict(403, &h), UpstreamVerdict::Accepted);
        assert_eq!(
            s.rejection_in_body(b"<Error><Code>SignatureDoesNotMatch</Code>"),
            Some("SignatureDoesNotMatch")
        );
        assert_eq!(
            s.rejection_in_body(br#"{"__type":"com.amazon#ExpiredTokenException"}"#),
            Some("ExpiredTokenException")
        );
        assert_eq!(
            s.rejection_in_body(b"<Error><Code>AccessDenied</Code>"),
            None
        );
        assert_eq!(s.rejection_in_body(b"<Code>ExpiredTokenX</Code>"), None);
    }

    #[test]
    fn signs_over_the_upstream_headers_and_replaces_the_clients() {
        let d = build(&[
            ("region", "us-east-1"),
            ("service", "service"),
            ("access_key_id", "AKIDEXAMPLE"),
            (
                "secret_access_key",
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            ),
        ])
        .unwrap();
        let token = Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            session_token: Some(Secret::new("SESSION")),
            expiration: None,
        }
        .encode();
        let mut headers = http::HeaderMap::new();
        headers.insert("host", "example.amazonaws.com".parse().unwrap());
        headers.insert("authorization", "Bearer bogus".parse().unwrap());
        headers.insert("x-amz-meta-a", "1".parse().unwrap());
        headers.insert("user-agent", "curl".parse().unwrap());
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1440938160);
        let out = d
            .signer
            .headers_at(
                &token,
                &SignInput {
                    method: "GET",
                    path: "/",
                    query: None,
                    headers: &headers,
                    body: b"",
                },
                at,
            )
            .unwrap();
        let get = |n: &str| {
            out.iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.to_str().unwrap().to_string())
        };
        assert_eq!(get("x-amz-date").as_deref(), Some("20150830T123600Z"));
        assert_eq!(get("x-amz-security-token").as_deref(), Some("SESSION"));
        assert_eq!(
            get("x-amz-content-sha256").as_deref(),
            Some(sigv4::EMPTY_SHA256)
        );
        // The day's signing key is kept per access key: another key signs with its own.
        let other = Credentials {
            access_key_id: "AKIDOTHER".into(),
            secret_access_key: Secret::new("another-secret"),
            session_token: None,
            expiration: None,
        }
        .encode();
        let input = SignInput {
            method: "GET",
            path: "/",
            query: None,
            headers: &headers,
            body: b"",
        };
        let first = d.signer.headers_at(&other, &input, at).unwrap();
        let fresh = Signer {
            region: "us-east-1".into(),
            service: "service".into(),
            payload: Payload::Signed,
            style: sigv4::PathStyle::OTHER,
            max_body: 0,
            key: std::sync::Mutex::new(None),
        }
        .headers_at(&other, &input, at)
        .unwrap();
        assert_eq!(
            first[0].1, fresh[0].1,
            "a cached key never signs for another"
        );
        let auth = get("authorization").unwrap();
        assert!(auth.starts_with(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-meta-a;x-amz-security-token, Signature="
        ), "{auth}");
    }
}
