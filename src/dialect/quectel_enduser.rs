//! Quectel / Acceleronix end-user API: e-mail or phone password login (AES-encrypted password,
//! SHA-256 signature), `PUT …/refreshToken?refreshToken=…` refresh that rotates the refresh token,
//! and the access token presented verbatim in `Authorization`.

use async_trait::async_trait;
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

use super::vendor::{self, CodeTable, ExpiresFormat};
use super::{Dialect, DialectError, Grant, GrantKind, Held, ProviderClient, parse_keys};
use crate::secret::{Secret, SecretSource};

const EMAIL_LOGIN_PATH: &str = "/v2/enduser/enduserapi/emailPwdLogin";
const PHONE_LOGIN_PATH: &str = "/v2/enduser/enduserapi/phonePwdLogin";
const REFRESH_PATH: &str = "/v2/enduser/enduserapi/refreshToken";

/// `code == 200` is success; the published example shows 0, so that is accepted too.
const SUCCESS: &[i64] = &[200, 0];

const CODES: CodeTable = CodeTable {
    relogin: &[5032],
    fatal: &[
        (
            5420,
            "bad signature: check user_domain and user_domain_secret",
        ),
        (5583, "wrong password"),
        (5584, "wrong password"),
        (5585, "wrong password"),
        (5586, "wrong password, account about to be locked"),
        (5147, "account frozen"),
        (5325, "IP address blocked"),
    ],
    transient: &[],
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
enum Placement {
    /// Form-encoded body (what real clients send).
    #[default]
    Form,
    /// URL query (what the vendor's document says).
    Query,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    base_url: String,
    email: Option<String>,
    phone: Option<String>,
    international_code: Option<String>,
    password: SecretSource,
    user_domain: String,
    user_domain_secret: SecretSource,
    login_path: Option<String>,
    refresh_path: Option<String>,
    #[serde(default)]
    login_params: Placement,
}

enum Account {
    Email(String),
    Phone { code: String, phone: String },
}

pub struct QuectelEnduser {
    login_url: String,
    refresh_url: String,
    account: Account,
    password: SecretSource,
    user_domain: String,
    user_domain_secret: SecretSource,
    login_params: Placement,
}

/// The vendor's password encryption: AES-128-CBC with PKCS#7 padding, Base64 of the ciphertext;
/// `key = upper(hex(md5(random)))[8..24]` as ASCII and `iv = key[8..16] + key[0..8]`.
pub fn encrypt_password(password: &str, random: &str) -> Result<String, DialectError> {
    use aes::cipher::{BlockEncryptMut, KeyIvInit, block_padding::Pkcs7};
    use md5::{Digest, Md5};
    let digest = vendor::hex(&Md5::digest(random.as_bytes())).to_ascii_uppercase();
    let key = &digest.as_bytes()[8..24];
    let mut iv = [0u8; 16];
    iv[..8].copy_from_slice(&key[8..16]);
    iv[8..].copy_from_slice(&key[..8]);
    let plain = password.as_bytes();
    let mut buf = vec![0u8; (plain.len() / 16 + 1) * 16];
    buf[..plain.len()].copy_from_slice(plain);
    let cipher = cbc::Encryptor::<aes::Aes128>::new_from_slices(key, &iv)
        .map_err(|_| DialectError::fatal("cannot set up the password cipher"))?;
    let out = cipher
        .encrypt_padded_mut::<Pkcs7>(&mut buf, plain.len())
        .map_err(|_| DialectError::fatal("cannot encrypt the password"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(out))
}

impl QuectelEnduser {
    pub fn from_keys(keys: figment::value::Dict) -> Result<Self, Vec<(String, String)>> {
        let k: Keys = parse_keys(keys)?;
        let mut errors = Vec::new();
        vendor::check_base_url(&k.base_url, &mut errors);
        vendor::check_non_empty("user_domain", &k.user_domain, &mut errors);
        let account = match (&k.email, &k.phone, &k.international_code) {
            (Some(email), None, None) => {
                vendor::check_non_empty("email", email, &mut errors);
                Some(Account::Email(email.clone()))
            }
            (None, Some(phone), Some(code)) => {
                vendor::check_non_empty("phone", phone, &mut errors);
                vendor::check_non_empty("international_code", code, &mut errors);
                Some(Account::Phone {
                    code: code.clone(),
                    phone: phone.clone(),
                })
            }
            (None, Some(_), None) => {
                errors.push((
                    "international_code".into(),
                    "is required with `phone` (e.g. \"86\")".into(),
                ));
                None
            }
            (Some(_), Some(_), _) => {
                errors.push((
                    "phone".into(),
                    "set either `email` or `phone`, not both".into(),
                ));
                None
            }
            (Some(_), None, Some(_)) => {
                errors.push((
                    "international_code".into(),
                    "is only used with `phone`".into(),
                ));
                None
            }
            (None, None, _) => {
                errors.push((
                    "email".into(),
                    "`email` or `phone` (with `international_code`) is required".into(),
                ));
                None
            }
        };
        let default_login = match account {
            Some(Account::Phone { .. }) => PHONE_LOGIN_PATH,
            _ => EMAIL_LOGIN_PATH,
        };
        let login_url = vendor::endpoint(
            &k.base_url,
            "login_path",
            k.login_path,
            default_login,
            &mut errors,
        );
        let refresh_url = vendor::endpoint(
            &k.base_url,
            "refresh_path",
            k.refresh_path,
            REFRESH_PATH,
            &mut errors,
        );
        match account {
            Some(account) if errors.is_empty() => Ok(QuectelEnduser {
                login_url,
                refresh_url,
                account,
                password: k.password,
                user_domain: k.user_domain,
                user_domain_secret: k.user_domain_secret,
                login_params: k.login_params,
            }),
            _ => Err(errors),
        }
    }

    /// The login parameters with a fresh `random` (it must change on every login).
    fn login_params(&self, random: &str) -> Result<Vec<(&'static str, Secret)>, DialectError> {
        let password = vendor::resolve(&self.password, "password")?;
        let domain_secret = vendor::resolve(&self.user_domain_secret, "user_domain_secret")?;
        let pwd = encrypt_password(password.expose(), random)?;
        let mut params = Vec::new();
        let signed = match &self.account {
            Account::Email(email) => {
                params.push(("email", Secret::new(email.clone())));
                format!("{email}{pwd}{random}{}", domain_secret.expose())
            }
            Account::Phone { code, phone } => {
                params.push(("internationalCode", Secret::new(code.clone())));
                params.push(("phone", Secret::new(phone.clone())));
                format!("{code}{phone}{pwd}{random}{}", domain_secret.expose())
            }
        };
        let signature = vendor::sha256_hex(signed.as_bytes());
        drop(Secret::new(signed));
        params.push(("pwd", Secret::new(pwd)));
        params.push(("random", Secret::new(random)));
        params.push(("signature", Secret::new(signature)));
        params.push(("userDomain", Secret::new(self.user_domain.clone())));
        Ok(params)
    }
}

/// Reads the token pair from a successful answer (login and refresh alike).
pub(crate) fn parse_grant(body: &Value, kind: GrantKind) -> Result<Grant, DialectError> {
    let access_token = vendor::token_at(body, "/data/accessToken/token", "data.accessToken.token")?;
    let expires = vendor::parse_expiry(
        body,
        "/data/accessToken/expirationTime",
        "data.accessToken.expirationTime",
        ExpiresFormat::EpochSeconds,
    )?;
    let refresh_token =
        vendor::optional_token_at(body, "/data/refreshToken/token", "data.refreshToken.token")?;
    Ok(Grant {
        kind,
        access_token,
        expires,
        refresh_token,
    })
}

#[async_trait]
impl Dialect for QuectelEnduser {
    fn describe(&self) -> String {
        let who = match &self.account {
            Account::Email(e) => format!("e-mail {e:?}"),
            Account::Phone { code, phone } => format!("phone +{code} {phone:?}"),
        };
        format!(
            "quectel-enduser password login at {} as {who} in user domain {:?}; refresh at {}",
            self.login_url, self.user_domain, self.refresh_url
        )
    }

    fn endpoints(&self) -> Vec<String> {
        vec![self.login_url.clone(), self.refresh_url.clone()]
    }

    fn default_format(&self) -> &'static str {
        "{token}"
    }

    fn secret_sources(&self) -> Vec<(String, &SecretSource)> {
        vec![
            ("password".into(), &self.password),
            ("user_domain_secret".into(), &self.user_domain_secret),
        ]
    }

    async fn obtain(&self, held: &Held, client: &ProviderClient) -> Result<Grant, DialectError> {
        let (kind, request) = match &held.refresh_token {
            Some(refresh) => (
                GrantKind::Refresh,
                client
                    .request(reqwest::Method::PUT, &self.refresh_url)
                    .query(&[("refreshToken", refresh.expose())]),
            ),
            None => {
                let params = self.login_params(&vendor::random_alnum(16))?;
                let pairs: Vec<(&str, &str)> =
                    params.iter().map(|(k, v)| (*k, v.expose())).collect();
                let request = client.request(reqwest::Method::POST, &self.login_url);
                let request = match self.login_params {
                    Placement::Form => request
                        .header(
                            reqwest::header::CONTENT_TYPE,
                            "application/x-www-form-urlencoded",
                        )
                        .body(
                            form_urlencoded::Serializer::new(String::new())
                                .extend_pairs(pairs.iter())
                                .finish(),
                        ),
                    Placement::Query => request.query(&pairs),
                };
                (GrantKind::Login, request)
            }
        };
        let request = request.header(reqwest::header::ACCEPT, "application/json");
        let response = client.send(request).await?;
        let body = vendor::coded_body(&response, kind, &["/code"], SUCCESS, &CODES)?;
        parse_grant(&body, kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::ErrorClass;
    use crate::dialect::http::ProviderResponse;

    #[test]
    fn aes_test_vector_from_the_vendor_docs() {
        use md5::{Digest, Md5};
        let random = "j1acpdj2bmtqZXVb";
        let digest = vendor::hex(&Md5::digest(random.as_bytes())).to_ascii_uppercase();
        assert_eq!(&digest[8..24], "89A049614445CCA8");
        assert_eq!(
            format!("{}{}", &digest[16..24], &digest[8..16]),
            "4445CCA889A04961"
        );
        assert_eq!(
            encrypt_password("china1234", random).unwrap(),
            "lkZMvj0KDSJXlp66jBieHA=="
        );
    }

    fn keys(extra: &[(&str, &str)]) -> figment::value::Dict {
        let mut d = figment::value::Dict::new();
        d.insert("base_url".into(), "https://iot.example/".into());
        d.insert("password".into(), "china1234".into());
        d.insert("user_domain".into(), "C.DM.1.2".into());
        d.insert("user_domain_secret".into(), "uds".into());
        for (k, v) in extra {
            d.insert((*k).into(), (*v).into());
        }
        d
    }

    #[test]
    fn signature_covers_encrypted_password_and_random() {
        let d = QuectelEnduser::from_keys(keys(&[("email", "a@b.c")])).unwrap();
        assert_eq!(
            d.login_url,
            "https://iot.example/v2/enduser/enduserapi/emailPwdLogin"
        );
        let params = d.login_params("j1acpdj2bmtqZXVb").unwrap();
        let get = |k: &str| {
            params
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.expose().to_string())
                .unwrap()
        };
        assert_eq!(get("pwd"), "lkZMvj0KDSJXlp66jBieHA==");
        assert_eq!(
            get("signature"),
            vendor::sha256_hex(b"a@b.clkZMvj0KDSJXlp66jBieHA==j1acpdj2bmtqZXVbuds")
        );
        assert_eq!(get("userDomain"), "C.DM.1.2");

        let d = QuectelEnduser::from_keys(keys(&[("phone", "138"), ("international_code", "86")]))
            .unwrap();
        assert!(d.login_url.ends_with("phonePwdLogin"));
        let params = d.login_params("j1acpdj2bmtqZXVb").unwrap();
        let sig = params.iter().find(|(n, _)| *n == "signature").unwrap();
        assert_eq!(
            sig.1.expose(),
            vendor::sha256_hex(b"86138lkZMvj0KDSJXlp66jBieHA==j1acpdj2bmtqZXVbuds")
        );
    }

    #[test]
    fn config_errors_name_keys() {
        let e = QuectelEnduser::from_keys(keys(&[("phone", "138")]))
            .err()
            .unwrap();
        assert_eq!(e[0].0, "international_code");
        let e = QuectelEnduser::from_keys(keys(&[])).err().unwrap();
        assert_eq!(e[0].0, "email");
        let e = QuectelEnduser::from_keys(keys(&[("email", "a"), ("emial", "b")]))
            .err()
            .unwrap();
        assert!(e[0].1.contains("emial"), "{e:?}");
        let e = QuectelEnduser::from_keys(keys(&[("email", "a"), ("refresh_path", "x")]))
            .err()
            .unwrap();
        assert_eq!(e[0].0, "refresh_path");
    }

    fn resp(status: u16, body: &str) -> ProviderResponse {
        ProviderResponse {
            status,
            retry_after: None,
            body: bytes::Bytes::from(body.to_string()),
        }
    }

    fn outcome(status: u16, body: &str, kind: GrantKind) -> Result<Grant, DialectError> {
        vendor::coded_body(&resp(status, body), kind, &["/code"], SUCCESS, &CODES)
            .and_then(|b| parse_grant(&b, kind))
    }

    #[test]
    fn classifies_answers() {
        let ok = r#"{"code":200,"data":{"accessToken":{"token":"at","expirationTime":4102444800},"refreshToken":{"token":"rt","expirationTime":4102444800}}}"#;
        let g = outcome(200, ok, GrantKind::Refresh).unwrap();
        assert_eq!(g.access_token.expose(), "at");
        assert_eq!(g.refresh_token.unwrap().expose(), "rt");
        assert!(outcome(200, &ok.replace("200", "0"), GrantKind::Login).is_ok());
        let class = |b: &str, k| outcome(200, b, k).unwrap_err().class;
        assert_eq!(
            class(r#"{"code":5032}"#, GrantKind::Refresh),
            ErrorClass::Relogin
        );
        for code in [5420, 5583, 5584, 5585, 5586, 5147, 5325] {
            assert_eq!(
                class(&format!(r#"{{"code":{code},"msg":"x"}}"#), GrantKind::Login),
                ErrorClass::Fatal
            );
        }
        assert!(matches!(
            outcome(503, "", GrantKind::Login).unwrap_err().class,
            ErrorClass::Transient { .. }
        ));
        // Malformed, truncated and wrong-typed answers name the field and never panic.
        let e = outcome(
            200,
            r#"{"code":200,"data":{"accessToken":{"token":5}}}"#,
            GrantKind::Login,
        )
        .unwrap_err();
        assert!(
            e.message.contains("data.accessToken.token"),
            "{}",
            e.message
        );
        let e = outcome(
            200,
            r#"{"code":200,"data":{"accessToken":{"token":"a","expirationTime":"soon"}}}"#,
            GrantKind::Login,
        )
        .unwrap_err();
        assert!(e.message.contains("expirationTime"), "{}", e.message);
        assert!(outcome(200, r#"{"code":200,"da"#, GrantKind::Login).is_err());
        assert!(
            outcome(200, r#"{"data":{}}"#, GrantKind::Login)
                .unwrap_err()
                .message
                .contains("code")
        );
        assert!(outcome(200, r#"[1,2]"#, GrantKind::Login).is_err());
    }
}
