//! BabelBird private-cloud file API: OAuth2-shaped refresh with the parameters in the URL query
//! (even on POST) and `Basic base64(client_id:client_secret)` client authentication. The first
//! token needs a browser, so the chain starts from an operator-provided refresh token and every
//! refresh rotates it.

use async_trait::async_trait;
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

use super::http::ProviderResponse;
use super::vendor::{self, ExpiresFormat};
use super::{
    Dialect, DialectError, ErrorClass, Grant, GrantKind, Held, ProviderClient, parse_keys,
};
use crate::secret::SecretSource;

const REFRESH_PATH: &str = "/api/refreshToken.do";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    base_url: String,
    client_id: String,
    client_secret: SecretSource,
    refresh_token: SecretSource,
    refresh_path: Option<String>,
}

pub struct BabelBird {
    refresh_url: String,
    client_id: String,
    client_secret: SecretSource,
    bootstrap: SecretSource,
}

impl BabelBird {
    pub fn from_keys(keys: figment::value::Dict) -> Result<Self, Vec<(String, String)>> {
        let k: Keys = parse_keys(keys)?;
        let mut errors = Vec::new();
        vendor::check_base_url(&k.base_url, &mut errors);
        vendor::check_non_empty("client_id", &k.client_id, &mut errors);
        if k.client_id.contains(':') {
            errors.push(("client_id".into(), "must not contain ':'".into()));
        }
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
        Ok(BabelBird {
            refresh_url,
            client_id: k.client_id,
            client_secret: k.client_secret,
            bootstrap: k.refresh_token,
        })
    }
}

/// A successful answer: HTTP 2xx with `access_token`.
pub(crate) fn parse_success(body: &Value) -> Result<Grant, DialectError> {
    Ok(Grant {
        kind: GrantKind::Refresh,
        access_token: vendor::token_at(body, "/access_token", "access_token")?,
        expires: vendor::parse_expiry(
            body,
            "/expires_in",
            "expires_in",
            ExpiresFormat::RelativeSeconds,
        )?,
        refresh_token: vendor::optional_token_at(body, "/refresh_token", "refresh_token")?,
    })
}

/// An OAuth2-style error (`error` / `error_description`): `invalid_grant` means the refresh token
/// is dead; anything else that is not a server-side hiccup is fatal.
pub(crate) fn parse_failure(response: &ProviderResponse) -> DialectError {
    if let Some(e) = vendor::transient_status(response) {
        return e;
    }
    let status = response.status;
    let code = response
        .json()
        .ok()
        .and_then(|b| vendor::code_at(&b, "/error"));
    let what = match &code {
        Some(code) => format!("provider answered HTTP {status} `{code}`"),
        None => format!("provider answered HTTP {status}"),
    };
    match code.as_deref() {
        Some("invalid_grant") => {
            DialectError::relogin(format!("{what}: the refresh token is no longer valid"))
        }
        Some("temporarily_unavailable" | "server_error" | "slow_down") => DialectError {
            class: ErrorClass::Transient {
                retry_after: response.retry_after,
            },
            message: what,
        },
        _ => DialectError::fatal(format!(
            "{what}: check client_id and client_secret; not retrying"
        )),
    }
}

#[async_trait]
impl Dialect for BabelBird {
    fn describe(&self) -> String {
        format!(
            "babelbird refresh at {} as client {:?} (Basic auth, query parameters), from a bootstrap refresh token",
            self.refresh_url, self.client_id
        )
    }

    fn account(&self) -> String {
        // The account is whoever the bootstrap refresh token belongs to: where it is read from
        // names it (a new value there continues the chain, see `SecretSource::origin`).
        format!(
            "babelbird at {} as client {:?} for the refresh token from {}",
            self.refresh_url,
            self.client_id,
            self.bootstrap.origin()
        )
    }

    fn endpoints(&self) -> Vec<String> {
        vec![self.refresh_url.clone()]
    }

    fn secret_sources(&self) -> Vec<(String, &SecretSource)> {
        vec![
            ("client_secret".into(), &self.client_secret),
            ("refresh_token".into(), &self.bootstrap),
        ]
    }

    fn bootstrap_refresh_token(&self) -> Option<&SecretSource> {
        Some(&self.bootstrap)
    }

    async fn obtain(&self, held: &Held, client: &ProviderClient) -> Result<Grant, DialectError> {
        let Some(refresh) = &held.refresh_token else {
            return Err(DialectError::fatal(
                "no usable refresh token: the provider rejected the last one and babelbird has no headless login; write a new bootstrap refresh token to `refresh_token`",
            ));
        };
        let secret = vendor::resolve(&self.client_secret, "client_secret")?;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            self.client_id,
            secret.expose()
        ));
        let request = client
            .request(reqwest::Method::POST, &self.refresh_url)
            .query(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh.expose()),
            ])
            .header(reqwest::header::AUTHORIZATION, format!("Basic {basic}"))
            .header(reqwest::header::ACCEPT, "application/json");
        let response = client.send(request).await?;
        if !(200..300).contains(&response.status) {
            return Err(parse_failure(&response));
        }
        parse_success(&vendor::json_object(&response)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, body: &str) -> ProviderResponse {
        ProviderResponse {
            status,
            retry_after: None,
            body: bytes::Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn classifies_answers() {
        let g = parse_success(
            &serde_json::from_str(r#"{"access_token":"a","refresh_token":"r","expires_in":3600}"#)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(g.refresh_token.unwrap().expose(), "r");
        let e =
            parse_success(&serde_json::from_str(r#"{"access_token":null}"#).unwrap()).unwrap_err();
        assert!(e.message.contains("access_token"));
        let e = parse_success(
            &serde_json::from_str(r#"{"access_token":"a","refresh_token":7}"#).unwrap(),
        )
        .unwrap_err();
        assert!(e.message.contains("refresh_token") && e.message.contains("number"));
        assert_eq!(
            parse_failure(&resp(
                400,
                r#"{"error":"invalid_grant","error_description":"x"}"#
            ))
            .class,
            ErrorClass::Relogin
        );
        assert_eq!(
            parse_failure(&resp(401, r#"{"error":"invalid_client"}"#)).class,
            ErrorClass::Fatal
        );
        assert!(matches!(
            parse_failure(&resp(502, "<html>")).class,
            ErrorClass::Transient { .. }
        ));
        assert!(
            !parse_failure(&resp(400, r#"{"error":"bad thing with spaces"}"#))
                .message
                .contains("spaces")
        );
    }

    #[tokio::test]
    async fn without_a_refresh_token_it_asks_for_a_new_bootstrap() {
        let mut d = figment::value::Dict::new();
        d.insert("base_url".into(), "http://127.0.0.1:9".into());
        d.insert("client_id".into(), "c".into());
        d.insert("client_secret".into(), "s".into());
        d.insert("refresh_token".into(), "r".into());
        let d = BabelBird::from_keys(d).unwrap();
        let client =
            ProviderClient::new(std::time::Duration::from_secs(1), &Default::default()).unwrap();
        let e = d.obtain(&Held::default(), &client).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Fatal);
        assert!(e.message.contains("bootstrap"));
    }
}
