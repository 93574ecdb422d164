//! Cloudreve v4: e-mail/password login at `/api/v4/session/token`, refresh at
//! `/api/v4/session/token/refresh` (rotates the pair on every call), RFC 3339 expiry times,
//! success only when the body's `code == 0` (errors come with HTTP 200).

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::vendor::{self, CodeTable, ExpiresFormat};
use super::{Dialect, DialectError, Grant, GrantKind, Held, ProviderClient, parse_keys};
use crate::secret::{Secret, SecretSource};

const LOGIN_PATH: &str = "/api/v4/session/token";
const REFRESH_PATH: &str = "/api/v4/session/token/refresh";

const CODES: CodeTable = CodeTable {
    relogin: &[40020],
    fatal: &[
        (40080, "wrong e-mail or password"),
        (40017, "account banned"),
        (40018, "account not activated"),
        (
            203,
            "the account has two-factor authentication, which cannot be used headless",
        ),
    ],
    transient: &[],
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    base_url: String,
    email: String,
    password: SecretSource,
    login_path: Option<String>,
    refresh_path: Option<String>,
}

pub struct Cloudreve {
    login_url: String,
    refresh_url: String,
    email: String,
    password: SecretSource,
}

impl Cloudreve {
    pub fn from_keys(keys: figment::value::Dict) -> Result<Self, Vec<(String, String)>> {
        let k: Keys = parse_keys(keys)?;
        let mut errors = Vec::new();
        vendor::check_base_url(&k.base_url, &mut errors);
        vendor::check_non_empty("email", &k.email, &mut errors);
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
        Ok(Cloudreve {
            login_url,
            refresh_url,
            email: k.email,
            password: k.password,
        })
    }
}

/// The pair is under `data.token` after a login and directly under `data` after a refresh.
pub(crate) fn parse_grant(body: &Value, kind: GrantKind) -> Result<Grant, DialectError> {
    let base = match kind {
        GrantKind::Login => "/data/token",
        GrantKind::Refresh => "/data",
    };
    let field = |name: &str| {
        (
            format!("{base}/{name}"),
            format!("{}.{name}", &base[1..].replace('/', ".")),
        )
    };
    let (p, w) = field("access_token");
    let access_token = vendor::token_at(body, &p, &w)?;
    let (p, w) = field("access_expires");
    let expires = vendor::parse_expiry(body, &p, &w, ExpiresFormat::Rfc3339)?;
    let (p, w) = field("refresh_token");
    let refresh_token = vendor::optional_token_at(body, &p, &w)?;
    Ok(Grant {
        kind,
        access_token,
        expires,
        refresh_token,
    })
}

#[async_trait]
impl Dialect for Cloudreve {
    fn describe(&self) -> String {
        format!(
            "cloudreve login at {} as {:?}; refresh at {}",
            self.login_url, self.email, self.refresh_url
        )
    }

    fn endpoints(&self) -> Vec<String> {
        vec![self.login_url.clone(), self.refresh_url.clone()]
    }

    fn secret_sources(&self) -> Vec<(String, &SecretSource)> {
        vec![("password".into(), &self.password)]
    }

    async fn obtain(&self, held: &Held, client: &ProviderClient) -> Result<Grant, DialectError> {
        let (kind, url, body) = match &held.refresh_token {
            Some(refresh) => (
                GrantKind::Refresh,
                &self.refresh_url,
                Secret::new(json!({"refresh_token": refresh.expose()}).to_string()),
            ),
            None => {
                let password = vendor::resolve(&self.password, "password")?;
                (
                    GrantKind::Login,
                    &self.login_url,
                    Secret::new(
                        json!({"email": self.email, "password": password.expose()}).to_string(),
                    ),
                )
            }
        };
        let request = client
            .request(reqwest::Method::POST, url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body.expose().to_string());
        let response = client.send(request).await?;
        let body =
            vendor::coded_body(&response, kind, &["/code"], &[0], &CODES).map_err(|mut e| {
                if kind == GrantKind::Login
                    && e.class == super::ErrorClass::Fatal
                    && !e.message.contains("two-factor")
                {
                    e.message
                        .push_str(" (a site with login captcha enabled cannot be used headless)");
                }
                e
            })?;
        parse_grant(&body, kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::http::ProviderResponse;
    use crate::dialect::{ErrorClass, Expiry};

    fn read(body: &str, kind: GrantKind) -> Result<Grant, DialectError> {
        let r = ProviderResponse {
            status: 200,
            retry_after: None,
            body: bytes::Bytes::from(body.to_string()),
        };
        vendor::coded_body(&r, kind, &["/code"], &[0], &CODES).and_then(|b| parse_grant(&b, kind))
    }

    #[test]
    fn login_and_refresh_shapes() {
        let g = read(
            r#"{"code":0,"data":{"user":{},"token":{"access_token":"a","refresh_token":"r","access_expires":"2099-04-26T15:58:28.456762+08:00","refresh_expires":"2099-10-23T14:58:28.456762+08:00"}}}"#,
            GrantKind::Login,
        )
        .unwrap();
        assert!(matches!(g.expires, Expiry::At(_)));
        assert_eq!(g.refresh_token.unwrap().expose(), "r");
        let g = read(
            r#"{"code":0,"data":{"access_token":"a2","refresh_token":"r2","access_expires":"2099-04-26T07:58:28Z"}}"#,
            GrantKind::Refresh,
        )
        .unwrap();
        assert_eq!(g.access_token.expose(), "a2");
        let e = read(
            r#"{"code":0,"data":{"access_token":"a","access_expires":12}}"#,
            GrantKind::Refresh,
        )
        .unwrap_err();
        assert!(e.message.contains("data.access_expires"), "{}", e.message);
        let e = read(r#"{"code":0,"data":{}}"#, GrantKind::Login).unwrap_err();
        assert!(
            e.message.contains("data.token.access_token"),
            "{}",
            e.message
        );
    }

    #[test]
    fn classifies_codes() {
        let c = |code: i64, k| read(&format!(r#"{{"code":{code},"msg":"m"}}"#), k).unwrap_err();
        assert_eq!(c(40020, GrantKind::Refresh).class, ErrorClass::Relogin);
        for code in [40080, 40017, 40018] {
            assert_eq!(c(code, GrantKind::Login).class, ErrorClass::Fatal);
        }
        let e = c(203, GrantKind::Login);
        assert_eq!(e.class, ErrorClass::Fatal);
        assert!(e.message.contains("two-factor"));
    }
}
