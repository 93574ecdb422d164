//! The AWS credential chain: where the credentials come from (config keys, the environment, web
//! identity, container credentials, IMDSv2; the first configured, in the AWS SDKs' order) and
//! sts:AssumeRole on top. Each source is one small provider call through the `ProviderClient`.

use std::path::PathBuf;
use std::time::SystemTime;

use crate::dialect::vendor::{self, parse_rfc3339};
use crate::dialect::{DialectError, ProviderClient};
use crate::secret::{Secret, SecretSource};

use super::sigv4;

/// What the dialect obtained: the engine holds it as its token, encoded by [`Self::encode`].
/// `Debug` shows no secret: both secrets are [`Secret`]s.
#[derive(Debug)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    pub expiration: Option<SystemTime>,
}

/// A key id, secret or session token holds no whitespace, so the three travel as one secret,
/// separated by spaces, through the engine (which knows tokens only as opaque secrets that
/// could be written into a header).
impl Credentials {
    pub fn encode(&self) -> Secret {
        Secret::new(format!(
            "{} {} {}",
            self.access_key_id,
            self.secret_access_key.expose(),
            self.session_token.as_ref().map_or("", |t| t.expose())
        ))
    }

    /// `(access key id, secret access key, session token)` from an encoded token.
    pub fn decode(token: &Secret) -> Option<(&str, &str, Option<&str>)> {
        let mut parts = token.expose().splitn(3, ' ');
        let id = parts.next().filter(|s| !s.is_empty())?;
        let secret = parts.next().filter(|s| !s.is_empty())?;
        let session = parts.next().filter(|s| !s.is_empty());
        Some((id, secret, session))
    }

    fn checked(self, what: &str) -> Result<Self, DialectError> {
        let bad = |v: &str| v.is_empty() || v.contains(char::is_whitespace);
        if bad(&self.access_key_id)
            || bad(self.secret_access_key.expose())
            || self.session_token.as_ref().is_some_and(|t| bad(t.expose()))
        {
            return Err(DialectError::transient(format!(
                "{what} answered credentials with an empty field or one holding whitespace"
            )));
        }
        Ok(self)
    }
}

/// Where the base credentials come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// `access_key_id` and `secret_access_key` (and `session_token`) in the config.
    Static {
        access_key_id: String,
        secret_access_key: SecretSource,
        session_token: Option<SecretSource>,
    },
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, read at each call.
    Environment,
    /// sts:AssumeRoleWithWebIdentity with the token in `token_file`, read at each call (IRSA).
    WebIdentity {
        role_arn: String,
        token_file: PathBuf,
        session_name: String,
    },
    /// The ECS / EKS Pod Identity endpoint, with the authorization token from a file or the
    /// environment, read at each call.
    Container {
        url: String,
        token_file: Option<PathBuf>,
        token_env: bool,
    },
    /// The EC2 instance metadata service, version 2 (session token first).
    Imds { endpoint: String },
}

impl Source {
    pub fn name(&self) -> &'static str {
        match self {
            Source::Static { .. } => "config",
            Source::Environment => "environment",
            Source::WebIdentity { .. } => "web-identity",
            Source::Container { .. } => "container",
            Source::Imds { .. } => "imds",
        }
    }

    /// The source and where it reads, never a secret.
    pub fn describe(&self) -> String {
        match self {
            Source::Static {
                access_key_id,
                secret_access_key,
                session_token,
            } => format!(
                "config keys (access key id {access_key_id}, secret from {}{})",
                secret_access_key.origin(),
                session_token
                    .as_ref()
                    .map(|t| format!(", session token from {}", t.origin()))
                    .unwrap_or_default()
            ),
            Source::Environment => {
                "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)".into()
            }
            Source::WebIdentity {
                role_arn,
                token_file,
                ..
            } => format!(
                "web identity (AssumeRoleWithWebIdentity as {role_arn}, token file {})",
                token_file.display()
            ),
            Source::Container {
                url,
                token_file,
                token_env,
            } => format!(
                "container credentials at {url}{}",
                match (token_file, token_env) {
                    (Some(f), _) => format!(", authorization token file {}", f.display()),
                    (None, true) =>
                        ", authorization token from AWS_CONTAINER_AUTHORIZATION_TOKEN".into(),
                    (None, false) => String::new(),
                }
            ),
            Source::Imds { endpoint } => format!("instance metadata (IMDSv2) at {endpoint}"),
        }
    }
}

/// The environment as the chain reads it (a function, so tests give their own).
pub type Env<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

fn env_set(env: Env<'_>, name: &str) -> Option<String> {
    env(name).filter(|v| !v.trim().is_empty())
}

/// The default chain's choice when the config gives no keys: the first source whose settings
/// are present, as the AWS SDKs pick it. `web_identity_token_file` and `role_arn` from the
/// config take the place of their variables.
pub fn default_source(
    env: Env<'_>,
    role_arn: Option<&str>,
    web_identity_token_file: Option<&str>,
) -> Result<Source, String> {
    let session_name = env_set(env, "AWS_ROLE_SESSION_NAME").unwrap_or_else(|| "tokenward".into());
    if let Some(file) = web_identity_token_file {
        let role_arn = role_arn
            .ok_or("`web_identity_token_file` needs `role_arn` (AssumeRoleWithWebIdentity)")?;
        return Ok(Source::WebIdentity {
            role_arn: role_arn.into(),
            token_file: file.into(),
            session_name,
        });
    }
    if env_set(env, "AWS_ACCESS_KEY_ID").is_some() {
        return Ok(Source::Environment);
    }
    if let (Some(file), Some(arn)) = (
        env_set(env, "AWS_WEB_IDENTITY_TOKEN_FILE"),
        env_set(env, "AWS_ROLE_ARN"),
    ) {
        return Ok(Source::WebIdentity {
            role_arn: arn,
            token_file: file.into(),
            session_name,
        });
    }
    let container_url = match (
        env_set(env, "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
        env_set(env, "AWS_CONTAINER_CREDENTIALS_FULL_URI"),
    ) {
        (Some(relative), _) => Some(format!("http://169.254.170.2{relative}")),
        (None, Some(full)) => {
            check_container_url(&full)?;
            Some(full)
        }
        (None, None) => None,
    };
    if let Some(url) = container_url {
        return Ok(Source::Container {
            url,
            token_file: env_set(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").map(PathBuf::from),
            token_env: env_set(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN").is_some(),
        });
    }
    if env_set(env, "AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Err("no AWS credentials: no config keys, no AWS_ACCESS_KEY_ID, no web identity, no container credentials, and AWS_EC2_METADATA_DISABLED is set".into());
    }
    let endpoint = env_set(env, "AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .unwrap_or_else(|| "http://169.254.169.254".into());
    if !crate::dialect::is_http_url(&endpoint) {
        return Err(format!(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT {endpoint:?} is not an http(s) URL"
        ));
    }
    Ok(Source::Imds {
        endpoint: endpoint.trim_end_matches('/').to_string(),
    })
}

/// As the AWS SDKs: the container endpoint is https, or http only on loopback or the ECS and
/// EKS Pod Identity link-local addresses (its token must not travel the network in clear).
fn check_container_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url)
        .map_err(|_| format!("AWS_CONTAINER_CREDENTIALS_FULL_URI {url:?} is not a URL"))?;
    let host = parsed.host_str().unwrap_or_default();
    let allowed_plain = matches!(
        host,
        "localhost" | "169.254.170.2" | "169.254.170.23" | "[fd00:ec2::23]"
    ) || host
        .trim_matches(['[', ']'])
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if allowed_plain => Ok(()),
        _ => Err(format!(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI must be https, or http on loopback, 169.254.170.2 or 169.254.170.23; {host:?} is neither"
        )),
    }
}

/// Whether `url` names a link-local address (IPv4 169.254.0.0/16, IPv6 fe80::/10) or the
/// EC2 and EKS agents' IPv6 addresses (fd00:ec2::254, fd00:ec2::23): never routed off the host.
pub fn on_link_local(url: &str) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    match parsed.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_link_local(),
        Some(url::Host::Ipv6(ip)) => {
            let s = ip.segments();
            (s[0] & 0xffc0) == 0xfe80 || (s[..4] == [0xfd00, 0x0ec2, 0, 0])
        }
        _ => false,
    }
}

/// STS settings shared by web identity and AssumeRole.
#[derive(Debug, Clone)]
pub struct Sts {
    pub endpoint: String,
    pub region: String,
}

/// sts:AssumeRole on top of the base credentials.
#[derive(Debug, Clone)]
pub struct AssumeRole {
    pub role_arn: String,
    pub session_name: String,
}

pub async fn fetch(
    source: &Source,
    sts: &Sts,
    client: &ProviderClient,
    env: Env<'_>,
) -> Result<Credentials, DialectError> {
    match source {
        Source::Static {
            access_key_id,
            secret_access_key,
            session_token,
        } => Credentials {
            access_key_id: access_key_id.clone(),
            secret_access_key: vendor::resolve(secret_access_key, "secret_access_key")?,
            session_token: session_token
                .as_ref()
                .map(|t| vendor::resolve(t, "session_token"))
                .transpose()?,
            expiration: None,
        }
        .checked("the config keys"),
        Source::Environment => {
            let need = |name: &str| {
                env_set(env, name).ok_or_else(|| {
                    DialectError::fatal(format!("environment variable {name} is not set"))
                })
            };
            Credentials {
                access_key_id: need("AWS_ACCESS_KEY_ID")?,
                secret_access_key: Secret::new(need("AWS_SECRET_ACCESS_KEY")?),
                session_token: env_set(env, "AWS_SESSION_TOKEN").map(Secret::new),
                expiration: None,
            }
            .checked("the environment")
        }
        Source::WebIdentity {
            role_arn,
            token_file,
            session_name,
        } => {
            let token = std::fs::read_to_string(token_file).map_err(|e| {
                DialectError::transient(format!(
                    "cannot read web identity token file {}: {}",
                    token_file.display(),
                    e.kind()
                ))
            })?;
            let token = token.trim();
            if token.is_empty() {
                return Err(DialectError::transient(format!(
                    "web identity token file {} is empty",
                    token_file.display()
                )));
            }
            let form = form_urlencoded::Serializer::new(String::new())
                .append_pair("Action", "AssumeRoleWithWebIdentity")
                .append_pair("Version", "2011-06-15")
                .append_pair("RoleArn", role_arn)
                .append_pair("RoleSessionName", session_name)
                .append_pair("WebIdentityToken", token)
                .finish();
            let request = client
                .request(reqwest::Method::POST, &sts.endpoint)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(form);
            sts_answer(client.send(request).await?, "AssumeRoleWithWebIdentity")
        }
        Source::Container {
            url,
            token_file,
            token_env,
        } => {
            let mut request = client
                .request(reqwest::Method::GET, url)
                .header(reqwest::header::ACCEPT, "application/json");
            let token = match (token_file, token_env) {
                (Some(file), _) => Some(
                    std::fs::read_to_string(file)
                        .map_err(|e| {
                            DialectError::transient(format!(
                                "cannot read container authorization token file {}: {}",
                                file.display(),
                                e.kind()
                            ))
                        })?
                        .trim()
                        .to_string(),
                ),
                (None, true) => env_set(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN"),
                (None, false) => None,
            };
            if let Some(token) = token {
                let mut value = reqwest::header::HeaderValue::from_str(&token).map_err(|_| {
                    DialectError::fatal("the container authorization token is not a header value")
                })?;
                value.set_sensitive(true);
                request = request.header(reqwest::header::AUTHORIZATION, value);
            }
            let response = client.send(request).await?;
            json_credentials(&response, "the container credentials endpoint")
        }
        Source::Imds { endpoint } => imds(endpoint, client).await,
    }
}

/// IMDSv2: a session token from `PUT /latest/api/token`, then the role's name, then its
/// credentials, each GET presenting the session token.
async fn imds(endpoint: &str, client: &ProviderClient) -> Result<Credentials, DialectError> {
    const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
    let put = client
        .request(
            reqwest::Method::PUT,
            &format!("{endpoint}/latest/api/token"),
        )
        .header("x-aws-ec2-metadata-token-ttl-seconds", "21600");
    let answer = client.send(put).await?;
    if answer.status != 200 {
        return Err(status_error(&answer, "IMDS token request"));
    }
    let token = String::from_utf8_lossy(&answer.body).trim().to_string();
    let mut token = reqwest::header::HeaderValue::from_str(&token)
        .map_err(|_| DialectError::transient("IMDS answered a token that is not a header value"))?;
    token.set_sensitive(true);
    let base = format!("{endpoint}/latest/meta-data/iam/security-credentials/");
    let roles = client
        .send(
            client
                .request(reqwest::Method::GET, &base)
                .header(TOKEN_HEADER, token.clone()),
        )
        .await?;
    if roles.status != 200 {
        return Err(status_error(&roles, "IMDS role listing"));
    }
    let roles = String::from_utf8_lossy(&roles.body);
    let role = roles
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .ok_or_else(|| DialectError::fatal("IMDS lists no instance role"))?;
    if role.contains(['/', '?', '#']) {
        return Err(DialectError::transient("IMDS answered an odd role name"));
    }
    let answer = client
        .send(
            client
                .request(reqwest::Method::GET, &format!("{base}{role}"))
                .header(TOKEN_HEADER, token),
        )
        .await?;
    json_credentials(&answer, "IMDS")
}

fn status_error(answer: &crate::dialect::http::ProviderResponse, what: &str) -> DialectError {
    DialectError {
        class: answer.status_class(),
        message: format!("{what} answered HTTP {}", answer.status),
    }
}

/// The JSON the container endpoint and IMDS answer: `AccessKeyId`, `SecretAccessKey`, `Token`,
/// `Expiration`.
fn json_credentials(
    answer: &crate::dialect::http::ProviderResponse,
    what: &str,
) -> Result<Credentials, DialectError> {
    if answer.status != 200 {
        return Err(status_error(answer, what));
    }
    let body = answer.json()?;
    let field = |name: &str| crate::dialect::http::required_str(&body, &format!("/{name}"), name);
    let expiration = match body.get("Expiration").and_then(|v| v.as_str()) {
        Some(s) => Some(parse_rfc3339(s).ok_or_else(|| {
            DialectError::transient(format!(
                "{what} answered an `Expiration` that is not RFC 3339"
            ))
        })?),
        None => None,
    };
    Credentials {
        access_key_id: field("AccessKeyId")?.to_string(),
        secret_access_key: Secret::new(field("SecretAccessKey")?),
        session_token: body
            .get("Token")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(Secret::new),
        expiration,
    }
    .checked(what)
}

/// The text of the first `<tag>…</tag>` in an STS answer, with XML's five entities decoded.
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(
        xml[start..end]
            .trim()
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// An STS answer: the credentials, or the error code (never the message, which can echo input).
fn sts_answer(
    answer: crate::dialect::http::ProviderResponse,
    action: &str,
) -> Result<Credentials, DialectError> {
    let body = String::from_utf8_lossy(&answer.body);
    if answer.status != 200 {
        let code = xml_text(&body, "Code")
            .filter(|c| c.len() <= 64 && c.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'))
            .unwrap_or_else(|| "no error code".into());
        let class = match code.as_str() {
            "Throttling"
            | "ThrottlingException"
            | "IDPCommunicationError"
            | "InvalidIdentityToken"
            | "ExpiredTokenException" => crate::dialect::ErrorClass::Transient {
                retry_after: answer.retry_after,
            },
            _ => answer.status_class(),
        };
        return Err(DialectError {
            class,
            message: format!("STS {action} answered HTTP {} ({code})", answer.status),
        });
    }
    let need = |tag: &str| {
        xml_text(&body, tag)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| DialectError::transient(format!("STS {action} answer has no `{tag}`")))
    };
    let expiration = parse_rfc3339(&need("Expiration")?).ok_or_else(|| {
        DialectError::transient(format!(
            "STS {action} answered an `Expiration` that is not RFC 3339"
        ))
    })?;
    Credentials {
        access_key_id: need("AccessKeyId")?,
        secret_access_key: Secret::new(need("SecretAccessKey")?),
        session_token: Some(Secret::new(need("SessionToken")?)),
        expiration: Some(expiration),
    }
    .checked(&format!("STS {action}"))
}

/// sts:AssumeRole, signed with `base`.
pub async fn assume_role(
    role: &AssumeRole,
    base: &Credentials,
    sts: &Sts,
    client: &ProviderClient,
) -> Result<Credentials, DialectError> {
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("Action", "AssumeRole")
        .append_pair("Version", "2011-06-15")
        .append_pair("RoleArn", &role.role_arn)
        .append_pair("RoleSessionName", &role.session_name)
        .finish();
    let url = url::Url::parse(&sts.endpoint)
        .map_err(|_| DialectError::fatal("`sts_endpoint` is not a URL"))?;
    let host = match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        (None, _) => return Err(DialectError::fatal("`sts_endpoint` has no host")),
    };
    let amz_date = sigv4::amz_date(SystemTime::now());
    let content_type = "application/x-www-form-urlencoded";
    let payload_hash = sigv4::sha256_hex(form.as_bytes());
    let mut signed: Vec<(&str, &str)> = vec![
        ("host", &host),
        ("content-type", content_type),
        ("x-amz-date", &amz_date),
    ];
    if let Some(token) = &base.session_token {
        signed.push(("x-amz-security-token", token.expose()));
    }
    let scope = sigv4::Scope {
        amz_date: &amz_date,
        region: &sts.region,
        service: "sts",
    };
    let authorization = sigv4::authorization(
        &base.access_key_id,
        &sigv4::signing_key(base.secret_access_key.expose(), &scope),
        &sigv4::Request {
            method: "POST",
            path: url.path(),
            query: url.query(),
            headers: &signed,
            payload_hash: &payload_hash,
        },
        &scope,
        sigv4::PathStyle::OTHER,
    );
    let mut request = client
        .request(reqwest::Method::POST, &sts.endpoint)
        .header(reqwest::header::CONTENT_TYPE, content_type)
        .header("x-amz-date", &amz_date)
        .header(reqwest::header::AUTHORIZATION, sensitive(&authorization)?);
    if let Some(token) = &base.session_token {
        request = request.header("x-amz-security-token", sensitive(token.expose())?);
    }
    sts_answer(client.send(request.body(form)).await?, "AssumeRole")
}

fn sensitive(value: &str) -> Result<reqwest::header::HeaderValue, DialectError> {
    let mut v = reqwest::header::HeaderValue::from_str(value)
        .map_err(|_| DialectError::fatal("credentials cannot be written into a header"))?;
    v.set_sensitive(true);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_default_chain_picks_the_first_configured_source_in_the_sdks_order() {
        let pick = |pairs: &'static [(&'static str, &'static str)]| {
            default_source(&env_of(pairs), None, None).map(|s| s.name())
        };
        assert_eq!(
            pick(&[
                ("AWS_ACCESS_KEY_ID", "a"),
                ("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"),
                ("AWS_ROLE_ARN", "arn")
            ]),
            Ok("environment")
        );
        assert_eq!(
            pick(&[
                ("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"),
                ("AWS_ROLE_ARN", "arn"),
                ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:1/c")
            ]),
            Ok("web-identity")
        );
        assert_eq!(
            pick(&[("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:1/c")]),
            Ok("container")
        );
        assert_eq!(pick(&[]), Ok("imds"));
        assert!(pick(&[("AWS_EC2_METADATA_DISABLED", "true")]).is_err());
        let e = pick(&[("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://10.0.0.1/c")]).unwrap_err();
        assert!(e.contains("AWS_CONTAINER_CREDENTIALS_FULL_URI"), "{e}");
        let s = default_source(
            &env_of(&[("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9/")]),
            None,
            None,
        )
        .unwrap();
        assert!(matches!(s, Source::Imds { endpoint } if endpoint == "http://127.0.0.1:9"));
        assert!(default_source(&env_of(&[]), None, Some("/t")).is_err());
    }

    #[test]
    fn metadata_addresses_are_link_local() {
        assert!(on_link_local("http://169.254.169.254"));
        assert!(on_link_local("http://169.254.170.2/v2/credentials"));
        assert!(on_link_local("http://[fd00:ec2::23]/v1/credentials"));
        assert!(!on_link_local("http://10.0.0.1/creds"));
        assert!(!on_link_local("http://metadata.example"));
    }

    #[test]
    fn credentials_round_trip_through_one_secret() {
        let c = Credentials {
            access_key_id: "AKID".into(),
            secret_access_key: Secret::new("s/k+"),
            session_token: Some(Secret::new("tok")),
            expiration: None,
        };
        let encoded = c.encode();
        assert_eq!(
            Credentials::decode(&encoded),
            Some(("AKID", "s/k+", Some("tok")))
        );
        let c = Credentials {
            session_token: None,
            ..c
        };
        assert_eq!(
            Credentials::decode(&c.encode()),
            Some(("AKID", "s/k+", None))
        );
    }

    #[test]
    fn sts_answers_give_credentials_or_the_error_code_only() {
        let answer = |status: u16, body: &str| crate::dialect::http::ProviderResponse {
            status,
            retry_after: None,
            body: bytes::Bytes::from(body.to_string()),
        };
        let ok = "<AssumeRoleResponse><AssumeRoleResult><Credentials><AccessKeyId>ASIA1</AccessKeyId><SecretAccessKey>sec&amp;ret</SecretAccessKey><SessionToken>tok</SessionToken><Expiration>2030-01-01T00:00:00Z</Expiration></Credentials></AssumeRoleResult></AssumeRoleResponse>";
        let c = sts_answer(answer(200, ok), "AssumeRole").unwrap();
        assert_eq!(c.access_key_id, "ASIA1");
        assert_eq!(c.secret_access_key.expose(), "sec&ret");
        assert!(c.expiration.is_some());
        let e = sts_answer(
            answer(403, "<ErrorResponse><Error><Code>AccessDenied</Code><Message>secret echo</Message></Error></ErrorResponse>"),
            "AssumeRole",
        )
        .unwrap_err();
        assert_eq!(e.class, crate::dialect::ErrorClass::Fatal);
        assert!(e.message.contains("AccessDenied") && !e.message.contains("echo"));
        let e = sts_answer(
            answer(400, "<Error><Code>InvalidIdentityToken</Code></Error>"),
            "AssumeRoleWithWebIdentity",
        )
        .unwrap_err();
        assert!(matches!(
            e.class,
            crate::dialect::ErrorClass::Transient { .. }
        ));
    }
}
