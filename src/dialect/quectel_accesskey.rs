//! Quectel "quecauth" AccessKey API: `accessKeyLogin` with a SHA-256 password over a signed
//! username, refresh with the access token itself (no refresh token; within 30 minutes of issue
//! the same token comes back, which is a success), `Authorization: QJWT …` verbatim.

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;

use super::vendor::{self, CodeTable, ExpiresFormat};
use super::{
    Dialect, DialectError, ErrorClass, Expiry, Grant, GrantKind, Held, ProviderClient, parse_keys,
};
use crate::secret::{Secret, SecretSource};

const LOGIN_PATH: &str = "/v2/quecauth/accessKeyAuthrize/accessKeyLogin";
const REFRESH_PATH: &str = "/v2/quecauth/accessKeyAuthrize/refreshToken";

const CODES: CodeTable = CodeTable {
    relogin: &[],
    fatal: &[],
    transient: &[],
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
enum Method {
    #[default]
    Get,
    Post,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    base_url: String,
    access_key: String,
    access_secret: SecretSource,
    scope: Option<String>,
    login_path: Option<String>,
    refresh_path: Option<String>,
    #[serde(default)]
    login_method: Method,
}

pub struct QuectelAccessKey {
    login_url: String,
    refresh_url: String,
    access_key: String,
    access_secret: SecretSource,
    scope: Option<String>,
    login_method: Method,
}

impl QuectelAccessKey {
    pub fn from_keys(keys: figment::value::Dict) -> Result<Self, Vec<(String, String)>> {
        let k: Keys = parse_keys(keys)?;
        let mut errors = Vec::new();
        vendor::check_base_url(&k.base_url, &mut errors);
        vendor::check_non_empty("access_key", &k.access_key, &mut errors);
        if k.access_key.contains(['&', '=']) {
            errors.push(("access_key".into(), "must not contain '&' or '='".into()));
        }
        let login_url = vendor::endpoint(
            &k.base_url,
            "login_path",
            k.login_path,
            LOGIN_PATH,
            &mut errors,
        );
        let refresh_url = vendor::endpoint(
            &k.base_url,
            "refresh_path",
            k.refresh_path,
            REFRESH_PATH,
            &mut errors,
        );
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(QuectelAccessKey {
            login_url,
            refresh_url,
            access_key: k.access_key,
            access_secret: k.access_secret,
            scope: k.scope,
            login_method: k.login_method,
        })
    }

    /// The raw (un-encoded) username and its password for a login at `timestamp_ms`.
    fn credentials(&self, timestamp_ms: u128) -> Result<(String, Secret), DialectError> {
        let secret = vendor::resolve(&self.access_secret, "access_secret")?;
        let username = format!(
            "ver=1&auth_mode=accessKey&sign_method=sha256&access_key={}&timestamp={timestamp_ms}",
            self.access_key
        );
        let signed = Secret::new(format!("{username}{}", secret.expose()));
        let password = vendor::sha256_hex(signed.expose().as_bytes());
        Ok((username, Secret::new(password)))
    }

    async fn call(
        &self,
        client: &ProviderClient,
        kind: GrantKind,
        access_token: Option<&Secret>,
    ) -> Result<Grant, DialectError> {
        let request = match (kind, access_token) {
            (GrantKind::Refresh, Some(token)) => client
                .request(reqwest::Method::GET, &self.refresh_url)
                .query(&[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", token.expose()),
                    ("scope", self.scope.as_deref().unwrap_or("")),
                ]),
            _ => {
                let (username, password) = self.credentials(vendor::now_ms())?;
                let method = match self.login_method {
                    Method::Get => reqwest::Method::GET,
                    Method::Post => reqwest::Method::POST,
                };
                let mut query = vec![
                    ("grant_type", "password"),
                    ("username", username.as_str()),
                    ("password", password.expose()),
                ];
                if let Some(scope) = &self.scope {
                    query.push(("scope", scope));
                }
                client.request(method, &self.login_url).query(&query)
            }
        };
        let request = request.header(reqwest::header::ACCEPT, "application/json");
        let response = client.send(request).await?;
        let body = vendor::coded_body(&response, kind, &["/code"], &[200], &CODES)?;
        parse_grant(&body, kind)
    }
}

/// The token and its lifetime. The docs disagree on the lifetime (2 h vs 86400 s) and on the
/// field (`expires_in` number, `expire_in` string): when the token is a JWT its `exp` decides
/// (the engine reads it), otherwise whichever field is present.
pub(crate) fn parse_grant(body: &Value, kind: GrantKind) -> Result<Grant, DialectError> {
    let access_token = vendor::token_at(body, "/access_token", "access_token")?;
    let expires = if crate::token::jwt::expiry(access_token.expose()).is_some() {
        Expiry::Unknown
    } else {
        match vendor::parse_expiry(
            body,
            "/expires_in",
            "expires_in",
            ExpiresFormat::RelativeSeconds,
        )? {
            Expiry::Unknown => vendor::parse_expiry(
                body,
                "/expire_in",
                "expire_in",
                ExpiresFormat::RelativeSeconds,
            )?,
            known => known,
        }
    };
    Ok(Grant {
        kind,
        access_token,
        expires,
        refresh_token: None,
    })
}

#[async_trait]
impl Dialect for QuectelAccessKey {
    fn account(&self) -> String {
        // The access key is the account; the scope does not change it.
        format!(
            "quectel-accesskey at {} and {} as access key {:?}",
            self.login_url, self.refresh_url, self.access_key
        )
    }

    fn describe(&self) -> String {
        format!(
            "quectel-accesskey login at {} as access key {:?}{}; refresh at {} with the access token",
            self.login_url,
            self.access_key,
            self.scope
                .as_deref()
                .map(|s| format!(" scope {s:?}"))
                .unwrap_or_default(),
            self.refresh_url
        )
    }

    fn endpoints(&self) -> Vec<String> {
        vec![self.login_url.clone(), self.refresh_url.clone()]
    }

    fn default_format(&self) -> &'static str {
        "{token}"
    }

    fn secret_sources(&self) -> Vec<(String, &SecretSource)> {
        vec![("access_secret".into(), &self.access_secret)]
    }

    /// Refreshes with the held access token; when the refresh is refused (e.g. the user or key
    /// was disabled, which also kills the current token) logs in again at once, so a disabled
    /// key ends in the login's clear, fatal error rather than in a loop of refreshes.
    async fn obtain(&self, held: &Held, client: &ProviderClient) -> Result<Grant, DialectError> {
        if let Some(token) = &held.access_token {
            match self.call(client, GrantKind::Refresh, Some(token)).await {
                Err(e) if e.class == ErrorClass::Relogin => {
                    tracing::info!(error = %e.message, "quectel-accesskey refresh refused; logging in again");
                }
                other => return other,
            }
        }
        self.call(client, GrantKind::Login, None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::http::ProviderResponse;
    use base64::Engine;

    #[test]
    fn password_is_sha256_of_the_raw_username_and_secret() {
        let mut d = figment::value::Dict::new();
        d.insert("base_url".into(), "https://iot.example".into());
        d.insert("access_key".into(), "AK1".into());
        d.insert("access_secret".into(), "SK1".into());
        let d = QuectelAccessKey::from_keys(d).unwrap();
        let (user, pw) = d.credentials(1700000000000).unwrap();
        assert_eq!(
            user,
            "ver=1&auth_mode=accessKey&sign_method=sha256&access_key=AK1&timestamp=1700000000000"
        );
        assert_eq!(
            pw.expose(),
            vendor::sha256_hex(format!("{user}SK1").as_bytes())
        );
    }

    fn resp(body: &str) -> ProviderResponse {
        ProviderResponse {
            status: 200,
            retry_after: None,
            body: bytes::Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn lifetime_from_either_field_unless_jwt() {
        let read = |b: &str| {
            vendor::coded_body(&resp(b), GrantKind::Refresh, &["/code"], &[200], &CODES)
                .and_then(|v| parse_grant(&v, GrantKind::Refresh))
        };
        let g = read(r#"{"code":200,"access_token":"QJWT opaque","expires_in":86400}"#).unwrap();
        assert_eq!(g.expires, Expiry::In(std::time::Duration::from_secs(86400)));
        let g = read(r#"{"code":200,"access_token":"QJWT opaque","expire_in":"7200"}"#).unwrap();
        assert_eq!(g.expires, Expiry::In(std::time::Duration::from_secs(7200)));
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":4102444800}"#);
        let jwt = format!("QJWT eyJhbGciOiJIUzI1NiJ9.{payload}.sig");
        let g = read(&format!(
            r#"{{"code":200,"access_token":"{jwt}","expires_in":86400}}"#
        ))
        .unwrap();
        assert_eq!(g.expires, Expiry::Unknown);
        assert_eq!(g.access_token.expose(), jwt);
        let e = read(r#"{"code":200,"access_token":"x","expire_in":"two hours"}"#).unwrap_err();
        assert!(e.message.contains("expire_in"));
        assert_eq!(
            read(r#"{"code":4011,"msg":"disabled"}"#).unwrap_err().class,
            ErrorClass::Relogin
        );
        let e = vendor::coded_body(
            &resp(r#"{"code":4011}"#),
            GrantKind::Login,
            &["/code"],
            &[200],
            &CODES,
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::Fatal);
    }
}
