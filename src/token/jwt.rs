//! Reads the `exp` claim of a JWT without verifying it: the sidecar cannot check the provider's
//! signature and does not need to, it only wants to know when the token stops working.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;

/// The `exp` of `token` when it is a JWT, after any scheme prefix such as `Bearer ` or `QJWT `.
pub fn expiry(token: &str) -> Option<SystemTime> {
    let jwt = token.rsplit(' ').next()?;
    let mut parts = jwt.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > 16 * 1024 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    if !(exp.is_finite() && exp > 0.0 && exp < 1e11) {
        return None;
    }
    Some(UNIX_EPOCH + Duration::from_secs_f64(exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", enc(r#"{"alg":"HS256"}"#), enc(payload))
    }

    #[test]
    fn reads_exp_with_and_without_scheme() {
        let t = jwt(r#"{"exp":1618559362}"#);
        let want = UNIX_EPOCH + Duration::from_secs(1618559362);
        assert_eq!(expiry(&t), Some(want));
        assert_eq!(expiry(&format!("QJWT {t}")), Some(want));
        assert_eq!(expiry(&format!("Bearer {t}")), Some(want));
    }

    #[test]
    fn ignores_what_is_not_a_jwt() {
        assert_eq!(expiry("opaque-token"), None);
        assert_eq!(expiry(&jwt(r#"{"sub":"x"}"#)), None);
        assert_eq!(expiry(&jwt(r#"{"exp":"soon"}"#)), None);
        assert_eq!(expiry(&jwt(r#"{"exp":-5}"#)), None);
        assert_eq!(expiry("a.%%%.c"), None);
    }
}
