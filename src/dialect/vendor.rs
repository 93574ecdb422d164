//! What the vendor dialects share: success predicates, the expiry formats vendors use, error-code
//! tables, hashing helpers and the small HTTP conveniences every one of them needs.
//!
//! Nothing here formats a secret or a response body into an error: messages name the credential's
//! field, the provider's numeric or symbolic code and the HTTP status only.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::Value;

use super::http::{ProviderResponse, json_type};
use super::{DialectError, ErrorClass, Expiry, GrantKind};
use crate::secret::{Secret, SecretSource};

/// How a provider states when a token expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpiresFormat {
    /// Seconds from now, as a number or a numeric string.
    RelativeSeconds,
    /// An absolute Unix time in seconds.
    EpochSeconds,
    /// An absolute Unix time in milliseconds.
    EpochMillis,
    /// An RFC 3339 date-time with offset, e.g. `2025-04-26T15:58:28.456762+08:00`.
    Rfc3339,
    /// The token is a JWT: its `exp` claim (the engine reads it; the body carries nothing).
    Jwt,
}

impl ExpiresFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ExpiresFormat::RelativeSeconds => "relative_seconds",
            ExpiresFormat::EpochSeconds => "epoch_seconds",
            ExpiresFormat::EpochMillis => "epoch_millis",
            ExpiresFormat::Rfc3339 => "rfc3339",
            ExpiresFormat::Jwt => "jwt",
        }
    }
}

/// A number, or a string holding one (vendors send both).
fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
}

/// Reads the expiry at `pointer` in `format`; a missing or null field is `Expiry::Unknown`
/// (the engine falls back to the JWT `exp`, then to the configured default), anything present
/// but unreadable is an error naming the field.
pub fn parse_expiry(
    body: &Value,
    pointer: &str,
    what: &str,
    format: ExpiresFormat,
) -> Result<Expiry, DialectError> {
    let value = match body.pointer(pointer) {
        None | Some(Value::Null) => return Ok(Expiry::Unknown),
        Some(v) => v,
    };
    expiry_from_value(value, format).map_err(|reason| {
        DialectError::transient(format!(
            "provider answer has `{what}` {reason} (expected {})",
            format.as_str()
        ))
    })
}

/// One value in one format; the error says what was wrong with it (never the value itself).
pub fn expiry_from_value(value: &Value, format: ExpiresFormat) -> Result<Expiry, String> {
    let wrong_type = || format!("of the wrong type ({})", json_type(value));
    match format {
        ExpiresFormat::Jwt => Ok(Expiry::Unknown),
        ExpiresFormat::RelativeSeconds => {
            let s = as_number(value).ok_or_else(wrong_type)?;
            if !(s.is_finite() && s >= 0.0) {
                return Err("that is negative or not finite".into());
            }
            Ok(Expiry::In(Duration::from_secs_f64(s.min(1e10))))
        }
        ExpiresFormat::EpochSeconds | ExpiresFormat::EpochMillis => {
            let n = as_number(value).ok_or_else(wrong_type)?;
            let secs = if format == ExpiresFormat::EpochMillis {
                n / 1000.0
            } else {
                n
            };
            if !(secs.is_finite() && secs > 0.0 && secs < 1e11) {
                return Err("that is not a plausible Unix time".into());
            }
            Ok(Expiry::At(UNIX_EPOCH + Duration::from_secs_f64(secs)))
        }
        ExpiresFormat::Rfc3339 => {
            let Value::String(s) = value else {
                return Err(wrong_type());
            };
            parse_rfc3339(s)
                .map(Expiry::At)
                .ok_or_else(|| "that is not an RFC 3339 date-time".into())
        }
    }
}

pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let t = time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .ok()?;
    let nanos = t.unix_timestamp_nanos();
    if nanos <= 0 {
        return None;
    }
    Some(UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).ok()?))
}

/// A provider's error code, as text: numbers as their decimal form, strings only when they look
/// like a code (they are echoed into logs, so free text is dropped).
pub fn code_at(body: &Value, pointer: &str) -> Option<String> {
    match body.pointer(pointer)? {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => {
            let plausible = !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            plausible.then(|| s.clone())
        }
        _ => None,
    }
}

/// Numeric code at `pointer` (a number or a numeric string).
pub fn int_code_at(body: &Value, pointer: &str) -> Option<i64> {
    match body.pointer(pointer)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// JSON values equal, numbers compared by value (`0` equals `0.0`).
pub fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// The class of an HTTP status that says nothing about the credential: 408/425/429/5xx.
pub fn transient_status(response: &ProviderResponse) -> Option<DialectError> {
    match response.status {
        408 | 425 | 429 | 500..=599 => Some(DialectError {
            class: ErrorClass::Transient {
                retry_after: response.retry_after,
            },
            message: format!("provider answered HTTP {}", response.status),
        }),
        _ => None,
    }
}

/// The body as a JSON object, or a transient error saying what came instead.
pub fn json_object(response: &ProviderResponse) -> Result<Value, DialectError> {
    let body = response.json()?;
    if !body.is_object() {
        return Err(DialectError::transient(format!(
            "provider answered HTTP {} with JSON that is not an object ({})",
            response.status,
            json_type(&body)
        )));
    }
    Ok(body)
}

/// How a vendor's code table classifies one error code.
pub struct CodeTable {
    /// Codes meaning the refresh token is dead (only on a refresh; on a login they are fatal).
    pub relogin: &'static [i64],
    /// Codes meaning the credentials are wrong or the account is locked: never retried.
    pub fatal: &'static [(i64, &'static str)],
    /// Codes meaning "try again" (e.g. a reused timestamp).
    pub transient: &'static [i64],
}

impl CodeTable {
    /// Classifies `code` seen on a `kind` call. Unknown codes shaped like HTTP server errors are
    /// transient; other unknown codes are fatal on a login (a password must not be retried
    /// blindly: vendors lock accounts) and mean "log in again" on a refresh.
    pub fn classify(&self, code: i64, kind: GrantKind, field: &str) -> DialectError {
        if let Some((_, what)) = self.fatal.iter().find(|(c, _)| *c == code) {
            return DialectError::fatal(format!(
                "provider answered {field} {code} ({what}); not retrying"
            ));
        }
        if self.relogin.contains(&code) {
            return match kind {
                GrantKind::Refresh => DialectError::relogin(format!(
                    "provider answered {field} {code}: the refresh token is no longer valid"
                )),
                GrantKind::Login => DialectError::fatal(format!(
                    "provider answered {field} {code} to a login; not retrying"
                )),
            };
        }
        if self.transient.contains(&code) || (500..=599).contains(&code) || code == 429 {
            return DialectError::transient(format!("provider answered {field} {code}"));
        }
        match kind {
            GrantKind::Login => DialectError::fatal(format!(
                "provider answered {field} {code} to a login, a code tokenward does not know; not retrying a login automatically"
            )),
            GrantKind::Refresh => DialectError::relogin(format!(
                "provider answered {field} {code} to a refresh, a code tokenward does not know; logging in again"
            )),
        }
    }
}

/// Resolves a configured secret, naming its key (never its value) when it cannot be read.
pub fn resolve(source: &SecretSource, key: &str) -> Result<Secret, DialectError> {
    source
        .resolve()
        .map_err(|e| DialectError::fatal(format!("`{key}`: {e}")))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(data))
}

/// Lowercase hex HMAC-SHA256 of `data` under `key`.
pub fn hmac_sha256_hex(key: &[u8], data: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    // HMAC accepts keys of any length, so this constructor cannot fail.
    match <Hmac<sha2::Sha256> as Mac>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(data);
            hex(&mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

pub fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

/// `count` random ASCII letters and digits.
pub fn random_alnum(count: usize) -> String {
    use rand::Rng;
    const SET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..count)
        .map(|_| SET[rng.random_range(0..SET.len())] as char)
        .collect()
}

/// Joins `base` (scheme, host, optional base path) and a vendor `path`.
pub fn join_url(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// Validates a `base_url` key: an http(s) URL without query or fragment.
pub fn check_base_url(value: &str, errors: &mut Vec<(String, String)>) {
    match url::Url::parse(value) {
        Ok(u)
            if matches!(u.scheme(), "http" | "https")
                && u.query().is_none()
                && u.fragment().is_none()
                && u.host().is_some() => {}
        _ => errors.push((
            "base_url".into(),
            "must be an http or https URL without query or fragment".into(),
        )),
    }
}

/// The URL of one vendor endpoint: `base_url` joined with the configured `key` (a path) or the
/// vendor's default path, which is checked like any configured one.
pub fn endpoint(
    base_url: &str,
    key: &str,
    configured: Option<String>,
    default: &str,
    errors: &mut Vec<(String, String)>,
) -> String {
    let path = configured.unwrap_or_else(|| default.to_string());
    check_path(key, &path, errors);
    join_url(base_url, &path)
}

/// Validates a `*_path` key.
pub fn check_path(key: &str, value: &str, errors: &mut Vec<(String, String)>) {
    if !value.starts_with('/') || value.contains(['?', '#', ' ']) {
        errors.push((
            key.into(),
            "must be a path starting with '/' (no query or fragment)".into(),
        ));
    }
}

/// Validates a required non-empty string key.
pub fn check_non_empty(key: &str, value: &str, errors: &mut Vec<(String, String)>) {
    if value.trim().is_empty() {
        errors.push((key.into(), "must not be empty".into()));
    }
}

/// A token string at `pointer`: present, a string and non-empty, or an error naming `what`.
pub fn token_at(body: &Value, pointer: &str, what: &str) -> Result<Secret, DialectError> {
    super::http::required_str(body, pointer, what).map(Secret::new)
}

/// An optional token string at `pointer` (absent, null or empty: none).
pub fn optional_token_at(
    body: &Value,
    pointer: &str,
    what: &str,
) -> Result<Option<Secret>, DialectError> {
    match body.pointer(pointer) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(Secret::new(s.clone()))),
        Some(other) => Err(DialectError::transient(format!(
            "provider answer has `{what}` of the wrong type ({})",
            json_type(other)
        ))),
    }
}

/// Reads a vendor answer that carries its outcome in a numeric body code (`code`, `status`, …):
/// HTTP 200 alone is never success. Returns the body when the code at one of `code_pointers` is
/// one of `success_codes` and the HTTP status is 2xx; otherwise the error the code table gives.
pub fn coded_body(
    response: &ProviderResponse,
    kind: GrantKind,
    code_pointers: &[&str],
    success_codes: &[i64],
    table: &CodeTable,
) -> Result<Value, DialectError> {
    if let Some(e) = transient_status(response) {
        return Err(e);
    }
    let status = response.status;
    let ok_status = (200..300).contains(&status);
    let body = match json_object(response) {
        Ok(b) => b,
        Err(e) if ok_status => return Err(e),
        Err(_) => return Err(unexplained_status(status, kind)),
    };
    let field = code_pointers
        .first()
        .map_or("code", |p| p.trim_start_matches('/'));
    match code_pointers.iter().find_map(|p| int_code_at(&body, p)) {
        Some(code) if success_codes.contains(&code) && ok_status => Ok(body),
        Some(code) if success_codes.contains(&code) => Err(unexplained_status(status, kind)),
        Some(code) => Err(table.classify(code, kind, field)),
        None if ok_status => Err(DialectError::transient(format!(
            "provider answered HTTP {status} without a numeric `{field}`"
        ))),
        None => Err(unexplained_status(status, kind)),
    }
}

/// A 4xx without a code the dialect understands: a login is not retried blindly, a refresh
/// falls back to a login.
pub fn unexplained_status(status: u16, kind: GrantKind) -> DialectError {
    match kind {
        GrantKind::Login => DialectError::fatal(format!(
            "provider answered HTTP {status} to a login; not retrying"
        )),
        GrantKind::Refresh => DialectError::relogin(format!(
            "provider answered HTTP {status} to a refresh; logging in again"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(v: Expiry) -> u64 {
        match v {
            Expiry::At(t) => t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_expiry_format() {
        let f = |v: Value, fmt| expiry_from_value(&v, fmt);
        assert_eq!(
            f(json!(7200), ExpiresFormat::RelativeSeconds).unwrap(),
            Expiry::In(Duration::from_secs(7200))
        );
        assert_eq!(
            f(json!("86400"), ExpiresFormat::RelativeSeconds).unwrap(),
            Expiry::In(Duration::from_secs(86400))
        );
        assert_eq!(
            f(json!(" 3600 "), ExpiresFormat::RelativeSeconds).unwrap(),
            Expiry::In(Duration::from_secs(3600))
        );
        assert!(f(json!(-1), ExpiresFormat::RelativeSeconds).is_err());
        assert!(f(json!("soon"), ExpiresFormat::RelativeSeconds).is_err());
        assert!(f(json!(true), ExpiresFormat::RelativeSeconds).is_err());
        assert_eq!(
            at(f(json!(1618559362), ExpiresFormat::EpochSeconds).unwrap()),
            1618559362
        );
        assert_eq!(
            at(f(json!("1618559362"), ExpiresFormat::EpochSeconds).unwrap()),
            1618559362
        );
        assert_eq!(
            at(f(json!(1572574909697u64), ExpiresFormat::EpochMillis).unwrap()),
            1572574909
        );
        assert!(f(json!(0), ExpiresFormat::EpochSeconds).is_err());
        assert!(f(json!(1e15), ExpiresFormat::EpochSeconds).is_err());
        assert_eq!(
            at(f(
                json!("2025-04-26T15:58:28.456762+08:00"),
                ExpiresFormat::Rfc3339
            )
            .unwrap()),
            1745654308
        );
        assert_eq!(
            at(f(json!("2025-04-26T07:58:28Z"), ExpiresFormat::Rfc3339).unwrap()),
            1745654308
        );
        assert!(f(json!("2025-04-26 07:58"), ExpiresFormat::Rfc3339).is_err());
        assert!(f(json!(1745654308), ExpiresFormat::Rfc3339).is_err());
        assert_eq!(
            f(json!("anything"), ExpiresFormat::Jwt).unwrap(),
            Expiry::Unknown
        );
    }

    #[test]
    fn parse_expiry_names_the_field_and_tolerates_absence() {
        let body = json!({"data": {"expire": "x", "none": null}});
        let e = parse_expiry(
            &body,
            "/data/expire",
            "data.expire",
            ExpiresFormat::RelativeSeconds,
        )
        .unwrap_err();
        assert!(e.message.contains("data.expire"), "{}", e.message);
        assert!(!e.message.contains("\"x\""));
        assert_eq!(
            parse_expiry(&body, "/data/none", "n", ExpiresFormat::EpochSeconds).unwrap(),
            Expiry::Unknown
        );
        assert_eq!(
            parse_expiry(&body, "/missing", "m", ExpiresFormat::Rfc3339).unwrap(),
            Expiry::Unknown
        );
    }

    #[test]
    fn codes_and_equality() {
        let body =
            json!({"code": 5032, "s": "invalid_grant", "free": "has spaces in it", "n": "17"});
        assert_eq!(code_at(&body, "/code").as_deref(), Some("5032"));
        assert_eq!(code_at(&body, "/s").as_deref(), Some("invalid_grant"));
        assert_eq!(code_at(&body, "/free"), None);
        assert_eq!(int_code_at(&body, "/n"), Some(17));
        assert!(json_equal(&json!(0), &json!(0.0)));
        assert!(!json_equal(&json!(0), &json!("0")));
    }

    #[test]
    fn code_table_classes() {
        const T: CodeTable = CodeTable {
            relogin: &[5032],
            fatal: &[(5583, "wrong password")],
            transient: &[1001],
        };
        let c = |code, kind| T.classify(code, kind, "code").class;
        assert_eq!(c(5032, GrantKind::Refresh), ErrorClass::Relogin);
        assert_eq!(c(5032, GrantKind::Login), ErrorClass::Fatal);
        assert_eq!(c(5583, GrantKind::Refresh), ErrorClass::Fatal);
        assert!(matches!(
            c(1001, GrantKind::Login),
            ErrorClass::Transient { .. }
        ));
        assert!(matches!(
            c(503, GrantKind::Login),
            ErrorClass::Transient { .. }
        ));
        assert_eq!(c(4242, GrantKind::Login), ErrorClass::Fatal);
        assert_eq!(c(4242, GrantKind::Refresh), ErrorClass::Relogin);
        assert!(
            T.classify(5583, GrantKind::Login, "code")
                .message
                .contains("wrong password")
        );
    }

    #[test]
    fn hashes() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // RFC 4231 test case 2.
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let r = random_alnum(16);
        assert_eq!(r.len(), 16);
        assert!(r.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(join_url("http://a/b/", "/c"), "http://a/b/c");
    }
}
