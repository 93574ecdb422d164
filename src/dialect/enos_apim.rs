//! EnOS APIM token service: `token/get` and `token/refresh` signed with
//! `sha256(appKey + timestamp + appSecret)`, no refresh token (refresh sends the access token), and
//! every upstream request signed with `apim-accesstoken`, `apim-timestamp` and `apim-signature`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::vendor::{self, CodeTable, ExpiresFormat};
use super::{
    Dialect, DialectError, ErrorClass, Grant, GrantKind, Held, ProviderClient, RequestSigner,
    SignInput, parse_keys,
};
use crate::secret::{Secret, SecretSource};

const GET_PATH: &str = "/apim-token-service/v2.0/token/get";
const REFRESH_PATH: &str = "/apim-token-service/v2.0/token/refresh";
/// Request bodies up to this size are buffered to be signed, unless `max_body_bytes` says otherwise.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// The largest `max_body_bytes` accepted: bodies are held in memory while they are signed.
const MAX_MAX_BODY: usize = 64 * 1024 * 1024;
/// How long a file- or environment-sourced `app_secret` is reused by the request signer before
/// it is read again (requests must not each read a file).
const SECRET_REUSE: Duration = Duration::from_secs(5);

const CODES: CodeTable = CodeTable {
    // 1203: access token expired, 1204: refresh failed — call `get` again.
    relogin: &[1203, 1204],
    fatal: &[
        (1002, "unknown app_key"),
        (1003, "bad encryption: check app_secret"),
    ],
    // 1001: duplicated encryption (a reused timestamp): a new timestamp fixes it.
    transient: &[1001],
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    base_url: String,
    app_key: String,
    app_secret: SecretSource,
    get_path: Option<String>,
    refresh_path: Option<String>,
    max_body_bytes: Option<u64>,
    /// Whether query values are URL-decoded before they are signed (the docs leave it open).
    #[serde(default = "yes")]
    sign_decoded_query: bool,
}

fn yes() -> bool {
    true
}

pub struct EnosApim {
    get_url: String,
    refresh_url: String,
    app_key: String,
    app_secret: SecretSource,
    signer: Arc<Signer>,
}

impl EnosApim {
    pub fn from_keys(keys: figment::value::Dict) -> Result<Self, Vec<(String, String)>> {
        let k: Keys = parse_keys(keys)?;
        let mut errors = Vec::new();
        vendor::check_base_url(&k.base_url, &mut errors);
        vendor::check_non_empty("app_key", &k.app_key, &mut errors);
        let get_url = vendor::endpoint(&k.base_url, "get_path", k.get_path, GET_PATH, &mut errors);
        let refresh_url = vendor::endpoint(
            &k.base_url,
            "refresh_path",
            k.refresh_path,
            REFRESH_PATH,
            &mut errors,
        );
        let max_body = k.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY as u64);
        if max_body > MAX_MAX_BODY as u64 {
            errors.push((
                "max_body_bytes".into(),
                format!("must be at most {MAX_MAX_BODY} (bodies are held in memory to be signed)"),
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(EnosApim {
            get_url,
            refresh_url,
            app_key: k.app_key,
            signer: Arc::new(Signer {
                app_secret: k.app_secret.clone(),
                max_body: max_body as usize,
                decode_query: k.sign_decoded_query,
                cached: Mutex::new(None),
            }),
            app_secret: k.app_secret,
        })
    }

    /// The JSON body of a get (no access token) or a refresh.
    fn body(&self, access_token: Option<&Secret>, timestamp: u128) -> Result<Secret, DialectError> {
        let secret = vendor::resolve(&self.app_secret, "app_secret")?;
        let encryption = vendor::sha256_hex(
            format!("{}{timestamp}{}", self.app_key, secret.expose()).as_bytes(),
        );
        let mut body = json!({
            "appKey": self.app_key,
            "encryption": encryption,
            "timestamp": timestamp as u64,
        });
        if let Some(token) = access_token {
            body["accessToken"] = Value::String(token.expose().to_string());
        }
        Ok(Secret::new(body.to_string()))
    }

    async fn call(
        &self,
        client: &ProviderClient,
        kind: GrantKind,
        access_token: Option<&Secret>,
    ) -> Result<Grant, DialectError> {
        let url = match kind {
            GrantKind::Login => &self.get_url,
            GrantKind::Refresh => &self.refresh_url,
        };
        let body = self.body(access_token, vendor::now_ms())?;
        let request = client
            .request(reqwest::Method::POST, url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body.expose().to_string());
        let response = client.send(request).await?;
        // Some versions of the docs spell the field `stauts`: both are read.
        let body = vendor::coded_body(&response, kind, &["/status", "/stauts"], &[0], &CODES)?;
        parse_grant(&body, kind)
    }
}

pub(crate) fn parse_grant(body: &Value, kind: GrantKind) -> Result<Grant, DialectError> {
    Ok(Grant {
        kind,
        access_token: vendor::token_at(body, "/data/accessToken", "data.accessToken")?,
        expires: vendor::parse_expiry(
            body,
            "/data/expire",
            "data.expire",
            ExpiresFormat::RelativeSeconds,
        )?,
        refresh_token: None,
    })
}

#[async_trait]
impl Dialect for EnosApim {
    fn describe(&self) -> String {
        format!(
            "enos-apim token/get at {} and token/refresh at {} as app {:?}; upstream requests signed (bodies up to {} bytes)",
            self.get_url, self.refresh_url, self.app_key, self.signer.max_body
        )
    }

    fn account(&self) -> String {
        format!(
            "enos-apim at {} and {} as app {:?}",
            self.get_url, self.refresh_url, self.app_key
        )
    }

    fn endpoints(&self) -> Vec<String> {
        vec![self.get_url.clone(), self.refresh_url.clone()]
    }

    fn default_format(&self) -> &'static str {
        "{token}"
    }

    fn secret_sources(&self) -> Vec<(String, &SecretSource)> {
        vec![("app_secret".into(), &self.app_secret)]
    }

    fn request_signer(&self) -> Option<Arc<dyn RequestSigner>> {
        Some(self.signer.clone())
    }

    /// A refresh while an access token is held, `get` otherwise; a refresh the service refuses
    /// (1203 expired, 1204 refresh failed) is followed at once by a `get`. EnOS has no refresh
    /// token, so this fallback lives here rather than in the engine's re-login.
    async fn obtain(&self, held: &Held, client: &ProviderClient) -> Result<Grant, DialectError> {
        if let Some(token) = &held.access_token {
            match self.call(client, GrantKind::Refresh, Some(token)).await {
                Err(e) if e.class == ErrorClass::Relogin => {
                    tracing::info!(error = %e.message, "enos-apim refresh refused; calling token/get");
                }
                other => return other,
            }
        }
        self.call(client, GrantKind::Login, None).await
    }
}

/// Signs each upstream request: `sha256(token + paramsData + timestamp + appSecret)` with
/// `paramsData` the query parameters sorted by name as `k1v1k2v2…` followed by the raw body.
pub struct Signer {
    app_secret: SecretSource,
    max_body: usize,
    decode_query: bool,
    cached: Mutex<Option<(Instant, Secret)>>,
}

impl Signer {
    fn secret(&self) -> Result<Secret, String> {
        let now = Instant::now();
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, s)) = cached.as_ref() {
            if now.duration_since(*at) < SECRET_REUSE {
                return Ok(s.clone());
            }
        }
        let s = self
            .app_secret
            .resolve()
            .map_err(|e| format!("`app_secret`: {e}"))?;
        *cached = Some((now, s.clone()));
        Ok(s)
    }

    /// `paramsData`: the query's parameters sorted by name (then value), concatenated.
    pub fn params_data(query: Option<&str>, decode: bool) -> Vec<u8> {
        let Some(query) = query.filter(|q| !q.is_empty()) else {
            return Vec::new();
        };
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = if decode {
            form_urlencoded::parse(query.as_bytes())
                .map(|(k, v)| (k.into_owned().into_bytes(), v.into_owned().into_bytes()))
                .collect()
        } else {
            query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (k.as_bytes().to_vec(), v.as_bytes().to_vec())
                })
                .collect()
        };
        pairs.sort();
        let mut out = Vec::new();
        for (k, v) in pairs {
            out.extend_from_slice(&k);
            out.extend_from_slice(&v);
        }
        out
    }

    /// The signature for one request at `timestamp_ms`.
    pub fn signature(
        token: &str,
        params_and_body: &[u8],
        timestamp_ms: u128,
        app_secret: &str,
    ) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(token.as_bytes());
        h.update(params_and_body);
        h.update(timestamp_ms.to_string().as_bytes());
        h.update(app_secret.as_bytes());
        vendor::hex(&h.finalize())
    }
}

impl RequestSigner for Signer {
    fn max_body_bytes(&self) -> usize {
        self.max_body
    }

    fn sign(
        &self,
        token: &Secret,
        input: &SignInput<'_>,
    ) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, String> {
        let secret = self.secret()?;
        let timestamp = vendor::now_ms();
        let mut data = Self::params_data(input.query, self.decode_query);
        data.extend_from_slice(input.body);
        let signature = Self::signature(token.expose(), &data, timestamp, secret.expose());
        let mut token_value = http::HeaderValue::from_str(token.expose())
            .map_err(|_| "the access token cannot be written into a header".to_string())?;
        token_value.set_sensitive(true);
        let value = |s: String| {
            http::HeaderValue::from_str(&s)
                .map_err(|_| "cannot build a signature header".to_string())
        };
        Ok(vec![
            (
                http::HeaderName::from_static("apim-accesstoken"),
                token_value,
            ),
            (
                http::HeaderName::from_static("apim-timestamp"),
                value(timestamp.to_string())?,
            ),
            (
                http::HeaderName::from_static("apim-signature"),
                value(signature)?,
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::http::ProviderResponse;

    fn dialect() -> EnosApim {
        let mut d = figment::value::Dict::new();
        d.insert("base_url".into(), "https://gw.example".into());
        d.insert("app_key".into(), "ak".into());
        d.insert("app_secret".into(), "as".into());
        EnosApim::from_keys(d).unwrap()
    }

    #[test]
    fn token_request_encryption() {
        let d = dialect();
        let body: Value =
            serde_json::from_str(d.body(None, 1572574909697).unwrap().expose()).unwrap();
        assert_eq!(body["appKey"], "ak");
        assert_eq!(body["timestamp"], 1572574909697u64);
        assert_eq!(body["encryption"], vendor::sha256_hex(b"ak1572574909697as"));
        assert!(body.get("accessToken").is_none());
        let body: Value =
            serde_json::from_str(d.body(Some(&Secret::new("tok")), 1).unwrap().expose()).unwrap();
        assert_eq!(body["accessToken"], "tok");
    }

    #[test]
    fn request_signature_sorts_and_decodes_the_query_then_appends_the_body() {
        assert_eq!(
            Signer::params_data(Some("b=2&a=x%20y&c="), true),
            b"ax yb2c".to_vec()
        );
        assert_eq!(
            Signer::params_data(Some("b=2&a=x%20y"), false),
            b"ax%20yb2".to_vec()
        );
        assert!(Signer::params_data(None, true).is_empty());
        let mut data = Signer::params_data(Some("z=1&y=2"), true);
        data.extend_from_slice(b"{\"k\":1}");
        assert_eq!(
            Signer::signature("tok", &data, 1700000000000, "sec"),
            vendor::sha256_hex(b"toky2z1{\"k\":1}1700000000000sec")
        );
        let d = dialect();
        let signer = d.request_signer().unwrap();
        assert_eq!(signer.max_body_bytes(), DEFAULT_MAX_BODY);
        let headers = signer
            .sign(
                &Secret::new("tok"),
                &SignInput {
                    method: "GET",
                    path: "/",
                    headers: &http::HeaderMap::new(),
                    query: Some("a=1"),
                    body: b"xyz",
                },
            )
            .unwrap();
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.to_str().unwrap().to_string())
                .unwrap()
        };
        let ts: u128 = get("apim-timestamp").parse().unwrap();
        assert_eq!(get("apim-accesstoken"), "tok");
        assert_eq!(
            get("apim-signature"),
            vendor::sha256_hex(format!("toka1xyz{ts}as").as_bytes())
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
    fn classifies_answers() {
        let read = |b: &str, k| {
            vendor::coded_body(&resp(b), k, &["/status", "/stauts"], &[0], &CODES)
                .and_then(|v| parse_grant(&v, k))
        };
        let g = read(
            r#"{"status":0,"data":{"accessToken":"t","expire":7200}}"#,
            GrantKind::Login,
        )
        .unwrap();
        assert_eq!(
            g.expires,
            crate::dialect::Expiry::In(Duration::from_secs(7200))
        );
        assert!(
            read(
                r#"{"stauts":0,"data":{"accessToken":"t","expire":"7200"}}"#,
                GrantKind::Refresh
            )
            .is_ok()
        );
        let class = |b: &str, k| read(b, k).unwrap_err().class;
        assert_eq!(
            class(r#"{"status":1203}"#, GrantKind::Refresh),
            ErrorClass::Relogin
        );
        assert_eq!(
            class(r#"{"status":1204}"#, GrantKind::Refresh),
            ErrorClass::Relogin
        );
        assert!(matches!(
            class(r#"{"status":1001}"#, GrantKind::Login),
            ErrorClass::Transient { .. }
        ));
        assert_eq!(
            class(r#"{"status":1002}"#, GrantKind::Login),
            ErrorClass::Fatal
        );
        assert_eq!(
            class(r#"{"status":1003}"#, GrantKind::Refresh),
            ErrorClass::Fatal
        );
        let e = read(
            r#"{"status":0,"data":{"accessToken":["x"]}}"#,
            GrantKind::Login,
        )
        .unwrap_err();
        assert!(e.message.contains("data.accessToken") && e.message.contains("array"));
        let e = read(
            r#"{"status":0,"data":{"accessToken":"t","expire":{}}}"#,
            GrantKind::Login,
        )
        .unwrap_err();
        assert!(e.message.contains("data.expire"));
    }

    #[test]
    fn max_body_bytes_is_bounded() {
        let mut d = figment::value::Dict::new();
        d.insert("base_url".into(), "https://gw.example".into());
        d.insert("app_key".into(), "ak".into());
        d.insert("app_secret".into(), "as".into());
        d.insert("max_body_bytes".into(), (1u64 << 40).into());
        let e = EnosApim::from_keys(d).err().unwrap();
        assert_eq!(e[0].0, "max_body_bytes");
    }
}
