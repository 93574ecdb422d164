//! Google service accounts: the JSON key file's RSA key signs a JWT (RS256, `kid` = the key's
//! `private_key_id`) that is traded at the key's `token_uri` by the JWT bearer grant
//! (RFC 7523 §2.1), as Google's own client libraries do.

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Deserialize;

use super::http::ProviderResponse;
use super::oauth2::{JWT_BEARER_GRANT, parse_failure, parse_success};
use super::{
    Dialect, DialectError, Grant, GrantKind, Held, ProviderClient, is_http_url, parse_keys,
};
use crate::secret::{Secret, SecretSource};

/// Google signs its own assertions for an hour, the longest it accepts.
const ASSERTION_LIFETIME_S: u64 = 3600;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    key_file: SecretSource,
    scope: String,
    subject: Option<String>,
    token_url: Option<String>,
}

pub struct GoogleServiceAccount {
    /// The credential's name, for the log line of a retry after a key rotation.
    credential: String,
    key_file: SecretSource,
    scope: String,
    subject: Option<String>,
    token_url: Option<String>,
}

/// What tokenward uses of a service-account JSON key; its other fields are ignored.
pub struct ServiceAccountKey {
    pub client_email: String,
    pub private_key_id: String,
    pub token_uri: Option<String>,
    private_key: Secret,
}

impl ServiceAccountKey {
    /// Parses the JSON key. Reasons name the field and what is wrong with it, never a value
    /// (serde's own messages can quote the offending value, so they are not used).
    pub fn parse(json: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| {
            format!(
                "is not a JSON key file (invalid JSON at line {} column {})",
                e.line(),
                e.column()
            )
        })?;
        let object = value
            .as_object()
            .ok_or("is not a JSON key file (not a JSON object)")?;
        let field = |name: &str| -> Result<&str, String> {
            match object.get(name) {
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(s),
                Some(serde_json::Value::String(_)) => Err(format!("field `{name}` is empty")),
                Some(other) => Err(format!(
                    "field `{name}` is a {}, not a string",
                    super::http::json_type(other)
                )),
                None => Err(format!("field `{name}` is missing")),
            }
        };
        let kind = field("type")?;
        if kind != "service_account" {
            // Other Google credential files (`authorized_user`, `external_account`) are named:
            // the type is not a secret and says what was mounted instead.
            let shown =
                if kind.len() <= 32 && kind.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    format!("{kind:?}")
                } else {
                    "something else".to_string()
                };
            return Err(format!(
                "field `type` is {shown}, not \"service_account\": this dialect reads service-account keys"
            ));
        }
        let key = ServiceAccountKey {
            client_email: field("client_email")?.to_string(),
            private_key_id: field("private_key_id")?.to_string(),
            token_uri: match object.get("token_uri") {
                None => None,
                Some(_) => Some(field("token_uri")?.to_string()),
            },
            private_key: Secret::new(field("private_key")?),
        };
        if !key
            .private_key
            .expose()
            .contains("-----BEGIN PRIVATE KEY-----")
        {
            return Err(
                "field `private_key` is not a PEM PKCS#8 private key (-----BEGIN PRIVATE KEY-----)"
                    .into(),
            );
        }
        Ok(key)
    }

    fn encoding_key(&self) -> Result<jsonwebtoken::EncodingKey, String> {
        jsonwebtoken::EncodingKey::from_rsa_pem(self.private_key.expose().as_bytes())
            .map_err(|_| "field `private_key` is not an RSA private key in PEM".to_string())
    }
}

impl GoogleServiceAccount {
    pub fn from_keys(
        credential: &str,
        keys: figment::value::Dict,
    ) -> Result<Self, Vec<(String, String)>> {
        let k: Keys = parse_keys(keys)?;
        let mut errors = Vec::new();
        if k.scope.trim().is_empty() {
            errors.push((
                "scope".to_string(),
                "must name at least one scope, such as https://www.googleapis.com/auth/cloud-platform".to_string(),
            ));
        }
        if let Some(url) = &k.token_url {
            if !is_http_url(url) {
                errors.push(("token_url".into(), "must be an http or https URL".into()));
            }
        }
        if k.subject.as_deref().is_some_and(|s| s.trim().is_empty()) {
            errors.push(("subject".into(), "must not be empty".into()));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(GoogleServiceAccount {
            credential: credential.to_string(),
            key_file: k.key_file,
            scope: k.scope,
            subject: k.subject,
            token_url: k.token_url,
        })
    }

    /// Reads and parses the key file (at each use: a rotated key is picked up without a
    /// restart), with the token endpoint it is used at.
    fn load(&self) -> Result<(Secret, ServiceAccountKey, String), String> {
        let raw = self.key_file.resolve().map_err(|e| e.to_string())?;
        let key = ServiceAccountKey::parse(raw.expose())?;
        let token_url = self.token_url_for(&key)?;
        Ok((raw, key, token_url))
    }

    fn token_url_for(&self, key: &ServiceAccountKey) -> Result<String, String> {
        match (&self.token_url, &key.token_uri) {
            (Some(url), _) => Ok(url.clone()),
            (None, Some(uri)) if is_http_url(uri) => Ok(uri.clone()),
            (None, Some(_)) => Err("field `token_uri` is not an http or https URL".into()),
            (None, None) => Err("field `token_uri` is missing (or set `token_url`)".into()),
        }
    }

    /// The signed assertion: iss = the service account, aud = the token endpoint used.
    fn assertion(&self, key: &ServiceAccountKey, token_url: &str) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut claims = serde_json::json!({
            "iss": key.client_email,
            "scope": self.scope,
            "aud": token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_S,
        });
        if let Some(sub) = &self.subject {
            claims["sub"] = serde_json::Value::String(sub.clone());
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(key.private_key_id.clone());
        jsonwebtoken::encode(&header, &claims, &key.encoding_key()?)
            .map_err(|_| "field `private_key` cannot sign (not a usable RSA private key)".into())
    }

    async fn post(
        &self,
        token_url: &str,
        assertion: &str,
        client: &ProviderClient,
    ) -> Result<ProviderResponse, DialectError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", JWT_BEARER_GRANT)
            .append_pair("assertion", assertion)
            .finish();
        let request = client
            .request(reqwest::Method::POST, token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body);
        client.send(request).await
    }

    /// One signed request with the key as it is now.
    async fn attempt(
        &self,
        client: &ProviderClient,
    ) -> Result<(Secret, ProviderResponse), DialectError> {
        let key_error = |reason: String| DialectError::fatal(format!("`key_file`: {reason}"));
        let (raw, key, token_url) = self.load().map_err(key_error)?;
        let assertion = self.assertion(&key, &token_url).map_err(key_error)?;
        let response = self.post(&token_url, &assertion, client).await?;
        Ok((raw, response))
    }
}

#[async_trait]
impl Dialect for GoogleServiceAccount {
    fn describe(&self) -> String {
        // The key's identity is part of the description (and so of the chain identity): a
        // different service account or key is a different credential.
        let who = match self.load() {
            Ok((_, key, url)) => {
                format!("{} (key {}) at {url}", key.client_email, key.private_key_id)
            }
            Err(reason) => format!(
                "with the key in {:?} (not usable now: {reason})",
                self.key_file
            ),
        };
        let sub = match &self.subject {
            Some(s) => format!(" for subject {s}"),
            None => String::new(),
        };
        format!(
            "google-service-account jwt-bearer as {who}{sub} with scope={}",
            self.scope
        )
    }

    fn account(&self) -> String {
        // The service account (and the user it acts for) is the account; the key's id and the
        // scope do not change it, so a rotated key or a new scope continues the chain.
        let who = match self.load() {
            Ok((_, key, url)) => format!("{} at {url}", key.client_email),
            Err(_) => format!("the key from {}", self.key_file.origin()),
        };
        let sub = self
            .subject
            .as_deref()
            .map(|s| format!(" for subject {s}"))
            .unwrap_or_default();
        format!("google-service-account as {who}{sub}")
    }

    fn endpoints(&self) -> Vec<String> {
        match &self.token_url {
            Some(url) => vec![url.clone()],
            None => self.load().map(|(_, _, url)| vec![url]).unwrap_or_default(),
        }
    }

    fn secret_sources(&self) -> Vec<(String, &SecretSource)> {
        vec![("key_file".into(), &self.key_file)]
    }

    fn check_secret(&self, key: &str, value: &Secret) -> Result<(), String> {
        if key != "key_file" {
            return Ok(());
        }
        let parsed = ServiceAccountKey::parse(value.expose())?;
        let token_url = self.token_url_for(&parsed)?;
        // Only signing parses the RSA key itself: a PEM with a broken key inside passes
        // every other test.
        self.assertion(&parsed, &token_url).map(|_| ())
    }

    async fn obtain(&self, _held: &Held, client: &ProviderClient) -> Result<Grant, DialectError> {
        let (used, mut response) = self.attempt(client).await?;
        let refused = |r: &ProviderResponse| {
            (400..500).contains(&r.status)
                && r.json().ok().is_some_and(|b| {
                    matches!(
                        b.get("error").and_then(|e| e.as_str()),
                        Some("invalid_grant" | "invalid_client" | "unauthorized_client")
                    )
                })
        };
        // A key rotated while the request was in flight: one more try with the new key before
        // the refusal counts as fatal.
        if refused(&response)
            && self
                .key_file
                .resolve()
                .is_ok_and(|now| now.expose() != used.expose())
        {
            tracing::info!(credential = %self.credential, status = response.status, "the token endpoint refused an assertion signed with a key file that has changed since; retrying once with the new key");
            response = self.attempt(client).await?.1;
        }
        if (200..300).contains(&response.status) {
            parse_success(&response, GrantKind::Login)
        } else {
            Err(parse_failure(&response, GrantKind::Login))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dialect(
        extra: &[(&str, figment::value::Value)],
    ) -> Result<GoogleServiceAccount, Vec<(String, String)>> {
        let mut d = figment::value::Dict::new();
        d.insert("key_file".into(), "{}".into());
        d.insert(
            "scope".into(),
            "https://www.googleapis.com/auth/devstorage.read_only".into(),
        );
        for (k, v) in extra {
            d.insert((*k).into(), v.clone());
        }
        GoogleServiceAccount::from_keys("gcs", d)
    }

    fn key_json(private_key: &str, extra: &str) -> String {
        format!(
            r#"{{"type":"service_account","project_id":"p","private_key_id":"kid-1","private_key":{},"client_email":"sa@p.iam.gserviceaccount.com","client_id":"1"{extra}}}"#,
            serde_json::to_string(private_key).unwrap()
        )
    }

    const FAKE_PEM: &str = "-----BEGIN PRIVATE KEY-----\nTUlJQ0lqQU5CZ2txaGtpRzl3MEJBUUVGQUFPQ0FnOEFNSUlDQ2dLQ0FnRUF0b3BzZWNyZXQ=\n-----END PRIVATE KEY-----\n";

    #[test]
    fn config_errors_name_keys() {
        let keys = |extra: &[(&str, figment::value::Value)]| -> Vec<String> {
            dialect(extra)
                .err()
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(keys(&[("scope", " ".into())]), vec!["scope"]);
        assert_eq!(keys(&[("token_url", "ftp://x".into())]), vec!["token_url"]);
        assert_eq!(keys(&[("subject", "".into())]), vec!["subject"]);
        assert_eq!(keys(&[("client_secret", "x".into())]).len(), 1);
        assert!(dialect(&[]).is_ok());
    }

    #[test]
    fn key_errors_name_the_field_never_the_value() {
        let secretish = "TUlJQ0lqQU5CZ2txaGtpRzl3MEJBUUVGQUFPQ0FnOEFNSUlDQ2dLQ0FnRUF0b3BzZWNyZXQ";
        let cases = [
            ("not json".to_string(), "invalid JSON"),
            ("[1]".to_string(), "not a JSON object"),
            (
                key_json(FAKE_PEM, "").replace("service_account", "authorized_user"),
                "\"authorized_user\"",
            ),
            (
                key_json(FAKE_PEM, "").replace("\"client_email\"", "\"x\""),
                "`client_email` is missing",
            ),
            (
                key_json(FAKE_PEM, "").replace("\"kid-1\"", "7"),
                "`private_key_id` is a number",
            ),
            (key_json("MIIsecret", ""), "`private_key` is not a PEM"),
        ];
        for (json, want) in cases {
            let err = ServiceAccountKey::parse(&json).err().unwrap();
            assert!(err.contains(want), "{err} lacks {want}");
            assert!(
                !err.contains(secretish) && !err.contains("MIIsecret"),
                "{err}"
            );
        }
        let key = ServiceAccountKey::parse(&key_json(FAKE_PEM, "")).unwrap();
        assert_eq!(key.client_email, "sa@p.iam.gserviceaccount.com");
        assert_eq!(key.token_uri, None);
        // A PEM that is not an RSA key is refused when it would sign, naming the field.
        let d = dialect(&[]).unwrap();
        let err = d
            .check_secret(
                "key_file",
                &Secret::new(key_json(
                    FAKE_PEM,
                    ",\"token_uri\":\"https://oauth2.googleapis.com/token\"",
                )),
            )
            .unwrap_err();
        assert!(
            err.contains("`private_key`") && !err.contains(secretish),
            "{err}"
        );
        let err = d
            .check_secret("key_file", &Secret::new(key_json(FAKE_PEM, "")))
            .unwrap_err();
        assert!(err.contains("`token_uri` is missing"), "{err}");
    }

    #[test]
    fn the_token_url_override_wins_and_a_key_file_problem_is_described_not_hidden() {
        let d = dialect(&[("token_url", "https://oauth2.example/token".into())]).unwrap();
        let key = ServiceAccountKey::parse(&key_json(
            FAKE_PEM,
            ",\"token_uri\":\"https://oauth2.googleapis.com/token\"",
        ))
        .unwrap();
        assert_eq!(
            d.token_url_for(&key).unwrap(),
            "https://oauth2.example/token"
        );
        // key_file is the literal "{}" here: the description says why it is unusable.
        assert!(
            d.describe().contains("field `type` is missing"),
            "{}",
            d.describe()
        );
        assert_eq!(
            d.endpoints(),
            vec!["https://oauth2.example/token".to_string()]
        );
    }
}
