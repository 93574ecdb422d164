//! Who may use the admin actions (a bearer token, or a loopback listener when none is
//! configured) and how often a credential may be force-refreshed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{Response, StatusCode, header};
use pingora::protocols::http::ServerSession;
use serde_json::json;
use tracing::warn;

use super::reply_json;
use crate::secret::SecretSource;

/// What `POST /tokens/NAME/refresh|invalidate` require.
#[derive(Debug, Clone)]
pub enum ActionAccess {
    /// `Authorization: Bearer <admin.token>`.
    Bearer(SecretSource),
    /// No token configured and a loopback listener: only local clients can reach the actions.
    Loopback,
    /// No token configured and a listener others can reach: refused.
    Refused,
}

/// The policy for an admin listener on `listen` with `admin.token` = `token`.
pub fn action_access(listen: SocketAddr, token: Option<&SecretSource>) -> ActionAccess {
    match token {
        Some(t) => ActionAccess::Bearer(t.clone()),
        None if listen.ip().to_canonical().is_loopback() => ActionAccess::Loopback,
        None => ActionAccess::Refused,
    }
}

impl ActionAccess {
    /// One line for `check` and the start-up log; names where the token lives, never its value.
    pub fn describe(&self) -> String {
        match self {
            ActionAccess::Bearer(source) => {
                format!(
                    "protected: they need `Authorization: Bearer` with admin.token ({source:?})"
                )
            }
            ActionAccess::Loopback => {
                "open to local clients only: the listener is loopback and admin.token is not set"
                    .into()
            }
            ActionAccess::Refused => {
                "refused: the listener is not loopback and admin.token is not set".into()
            }
        }
    }
}

/// Lets the request through, or answers it: 401 without the right bearer token, 403 when the
/// actions are refused outright, 503 when the configured token cannot be read.
pub(super) async fn authorize(
    access: &ActionAccess,
    session: &ServerSession,
) -> Result<(), Response<Vec<u8>>> {
    let source = match access {
        ActionAccess::Loopback => return Ok(()),
        ActionAccess::Refused => {
            return Err(reply_json(
                StatusCode::FORBIDDEN,
                json!({
                    "error": "forbidden",
                    "reason": "admin actions on a listener that is not loopback need admin.token to be set",
                }),
            ));
        }
        ActionAccess::Bearer(source) => source.clone(),
    };
    let peer = session
        .client_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let Some(presented) = bearer(session.req_header().headers.get(header::AUTHORIZATION)) else {
        warn!(%peer, "admin action refused: no bearer token");
        return Err(unauthorized());
    };
    // A file read can stall (a hung network mount): keep it off the runtime's threads.
    let expected = match tokio::task::spawn_blocking(move || source.resolve()).await {
        Ok(Ok(secret)) => secret,
        Ok(Err(e)) => {
            warn!(error = %e, "admin.token cannot be read; refusing admin actions");
            return Err(reply_json(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "admin_token_unavailable"}),
            ));
        }
        Err(_) => {
            return Err(reply_json(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "admin_token_unavailable"}),
            ));
        }
    };
    if same_secret(presented, expected.expose().as_bytes()) {
        Ok(())
    } else {
        warn!(%peer, "admin action refused: wrong bearer token");
        Err(unauthorized())
    }
}

/// The token of an `Authorization: Bearer …` header (scheme case-insensitive).
fn bearer(value: Option<&http::HeaderValue>) -> Option<&[u8]> {
    let value = value?.as_bytes();
    let (scheme, rest) = value.split_at(value.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Compares in time independent of where the values differ: both sides are hashed first, so
/// neither their contents nor their lengths steer the comparison.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn unauthorized() -> Response<Vec<u8>> {
    let mut r = reply_json(
        StatusCode::UNAUTHORIZED,
        json!({
            "error": "unauthorized",
            "reason": "admin actions need `Authorization: Bearer <admin.token>`",
        }),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer realm=\"tokenward admin\""),
    );
    r
}

/// The answer to a forced refresh that came too soon after the previous one.
pub(super) fn too_many(credential: &str, wait: Duration) -> Response<Vec<u8>> {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let secs = secs.max(1);
    let mut r = reply_json(
        StatusCode::TOO_MANY_REQUESTS,
        json!({
            "error": "rate_limited",
            "credential": credential,
            "reason": "one forced refresh per min_refresh_interval",
            "retry_after_s": secs,
        }),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, http::HeaderValue::from(secs));
    r
}

/// When each credential was last force-refreshed. Admission is recorded before the provider is
/// called, so concurrent requests and failing refreshes count alike.
#[derive(Default)]
pub struct RefreshLimiter {
    last: Mutex<HashMap<String, Instant>>,
}

impl RefreshLimiter {
    /// Admits one forced refresh of `credential`, or says how long until the next one may run.
    pub fn admit(
        &self,
        credential: &str,
        interval: Duration,
        now: Instant,
    ) -> Result<(), Duration> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(prev) = last.get(credential) {
            let since = now.saturating_duration_since(*prev);
            if since < interval {
                return Err(interval - since);
            }
        }
        last.insert(credential.to_string(), now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_token_only_a_loopback_listener_allows_actions() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        for loopback in ["127.0.0.1:9901", "127.0.0.2:9901", "[::1]:9901"] {
            assert!(
                matches!(action_access(at(loopback), None), ActionAccess::Loopback),
                "{loopback}"
            );
        }
        for open in [
            "0.0.0.0:9901",
            "[::]:9901",
            "10.1.2.3:9901",
            "[::ffff:10.1.2.3]:9901",
        ] {
            assert!(
                matches!(action_access(at(open), None), ActionAccess::Refused),
                "{open}"
            );
        }
        let token = SecretSource::Env("TOKENWARD_ADMIN_TOKEN".into());
        for any in ["127.0.0.1:9901", "0.0.0.0:9901"] {
            assert!(
                matches!(
                    action_access(at(any), Some(&token)),
                    ActionAccess::Bearer(_)
                ),
                "{any}"
            );
        }
    }

    #[test]
    fn bearer_header_parsing() {
        let h = |s: &'static str| http::HeaderValue::from_static(s);
        assert_eq!(bearer(Some(&h("Bearer abc"))), Some(&b"abc"[..]));
        assert_eq!(bearer(Some(&h("bearer  abc "))), Some(&b"abc"[..]));
        assert_eq!(bearer(Some(&h("Basic abc"))), None);
        assert_eq!(bearer(Some(&h("Bearer "))), None);
        assert_eq!(bearer(Some(&h("Bearerabc"))), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn secrets_compare_by_value() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cret", b"s3cre"));
        assert!(!same_secret(b"s3cret", b"s3creT"));
        assert!(!same_secret(b"", b"x"));
    }

    #[test]
    fn one_forced_refresh_per_interval_per_credential() {
        let l = RefreshLimiter::default();
        let t0 = Instant::now();
        let every = Duration::from_secs(5);
        assert!(l.admit("a", every, t0).is_ok());
        assert!(
            l.admit("b", every, t0).is_ok(),
            "credentials are limited apart"
        );
        assert_eq!(
            l.admit("a", every, t0 + Duration::from_secs(2)),
            Err(Duration::from_secs(3))
        );
        assert!(l.admit("a", every, t0 + every).is_ok());
        // A refused attempt does not push the next allowed one further away.
        assert!(
            l.admit("a", every, t0 + every + Duration::from_secs(1))
                .is_err()
        );
        assert!(l.admit("a", every, t0 + every * 2).is_ok());
        assert!(l.admit("a", Duration::ZERO, t0 + every * 2).is_ok());
    }
}
