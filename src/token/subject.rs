//! Local validation of a caller's subject token against its issuer's JWKS, so a forged, expired
//! or foreign token is refused before it reaches the token-exchange provider.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tracing::{info, warn};

use crate::dialect::{ProviderClient, SubjectValidation};

/// Clock skew tolerated on `exp` and `nbf`: small, because a token just past its `exp` is one
/// the provider will refuse anyway.
const LEEWAY_S: u64 = 30;
/// A JWKS with more keys than this is cut: issuers publish a handful, and every key of an
/// unnamed (`kid`-less) token is tried.
const MAX_KEYS: usize = 32;

/// Why a subject token is not exchanged.
#[derive(Debug, Clone, PartialEq)]
pub enum SubjectError {
    /// The token itself fails (the caller's fault): 401. The reason names the check, never the
    /// token.
    Rejected(String),
    /// No key set could be had to check it against: 503.
    Unavailable {
        reason: String,
        retry_after: Duration,
    },
}

struct Key {
    kid: Option<String>,
    /// The JWK's own `alg`, when it pins one.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

struct KeySet {
    keys: Vec<Key>,
}

pub struct SubjectValidator {
    credential: Arc<str>,
    settings: SubjectValidation,
    client: ProviderClient,
    min_refresh_interval: Duration,
    /// The last good key set: a failed refetch keeps it.
    keys: ArcSwapOption<KeySet>,
    /// Held by the one refetch in progress; records when the last one started.
    fetch: tokio::sync::Mutex<Option<Instant>>,
}

/// Only signature algorithms with a public key: a JWKS key can never be an HMAC secret, and
/// `none` is not an algorithm jsonwebtoken parses.
fn asymmetric(alg: Algorithm) -> bool {
    !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// The usable signing keys of a JWKS document; the others (encryption keys, symmetric keys,
/// unknown key types) are skipped rather than failing the whole set.
fn parse_key_set(body: &serde_json::Value) -> Result<KeySet, String> {
    let raw = body
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("the JWKS has no `keys` array")?;
    let mut keys = Vec::new();
    for value in raw.iter() {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value.clone()) else {
            continue;
        };
        if matches!(
            jwk.common.public_key_use,
            Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
        ) || matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_))
        {
            continue;
        }
        let alg = match &jwk.common.key_algorithm {
            None => None,
            Some(a) => match a.to_string().parse::<Algorithm>() {
                Ok(a) if asymmetric(a) => Some(a),
                _ => continue,
            },
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
        if keys.len() == MAX_KEYS {
            break;
        }
    }
    if keys.is_empty() {
        return Err("the JWKS has no usable signing key".into());
    }
    Ok(KeySet { keys })
}

impl SubjectValidator {
    pub fn new(
        credential: Arc<str>,
        settings: SubjectValidation,
        client: ProviderClient,
        min_refresh_interval: Duration,
    ) -> Self {
        SubjectValidator {
            credential,
            settings,
            client,
            min_refresh_interval,
            keys: ArcSwapOption::empty(),
            fetch: tokio::sync::Mutex::new(None),
        }
    }

    /// Checks `token`'s signature against the issuer's keys, its `exp`/`nbf`, and `iss`/`aud`
    /// when configured. An unknown `kid` refetches the key set once (see [`Self::refetch`]).
    pub async fn validate(self: &Arc<Self>, token: &str) -> Result<(), SubjectError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| SubjectError::Rejected("not a signed JWT".into()))?;
        if !asymmetric(header.alg) {
            return Err(SubjectError::Rejected(format!(
                "alg {:?} is not accepted (only RS*, PS*, ES*, EdDSA)",
                header.alg
            )));
        }
        let mut set = self.keys.load_full();
        if set.is_none() {
            set = self.refetch(None).await;
        }
        let Some(mut set) = set else {
            return Err(self.unavailable());
        };
        if header.kid.is_some() && !set.keys.iter().any(|k| k.kid == header.kid) {
            // A key the issuer rotated in since the last fetch, or a forged kid: one refetch
            // (shared, and at most one per min_refresh_interval) decides.
            if let Some(fresh) = self.refetch(Some(&set)).await {
                set = fresh;
            }
        }
        let candidates: Vec<&Key> = set
            .keys
            .iter()
            .filter(|k| header.kid.is_none() || k.kid == header.kid)
            .filter(|k| k.alg.is_none_or(|a| a == header.alg))
            .filter(|k| k.key.family() == header.alg.family())
            .collect();
        if candidates.is_empty() {
            return Err(SubjectError::Rejected(match &header.kid {
                Some(_) => "its kid is not in the issuer's JWKS".into(),
                None => format!("no key of the issuer's JWKS is for alg {:?}", header.alg),
            }));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_S;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(iss) = &self.settings.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &self.settings.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let mut last = None;
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation) {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        use jsonwebtoken::errors::ErrorKind;
        let reason = match last.as_ref().map(|e| e.kind()) {
            Some(ErrorKind::InvalidSignature) => "bad signature",
            Some(ErrorKind::ExpiredSignature) => "expired",
            Some(ErrorKind::ImmatureSignature) => "not valid yet (nbf)",
            Some(ErrorKind::InvalidIssuer) => "wrong issuer",
            Some(ErrorKind::InvalidAudience) => "wrong audience",
            Some(ErrorKind::MissingRequiredClaim(_)) => {
                "a required claim (exp, iss, aud) is missing"
            }
            Some(ErrorKind::InvalidAlgorithm) => "alg does not match the key",
            _ => "malformed",
        };
        Err(SubjectError::Rejected(reason.into()))
    }

    fn unavailable(&self) -> SubjectError {
        let since = self
            .fetch
            .try_lock()
            .ok()
            .and_then(|g| g.map(|t| t.elapsed()))
            .unwrap_or_default();
        let wait = self.min_refresh_interval.saturating_sub(since);
        SubjectError::Unavailable {
            reason: "the subject issuer's JWKS cannot be fetched and none is cached".into(),
            retry_after: Duration::from_secs(wait.as_secs_f64().ceil().max(1.0) as u64),
        }
    }

    /// Fetches the key set again unless another request already did since `seen` was read, or
    /// the last attempt is less than `min_refresh_interval` old. The fetch runs in its own task
    /// (a caller that goes away does not cut it), one at a time; on failure the last good set
    /// stays. Returns the set to use now.
    async fn refetch(self: &Arc<Self>, seen: Option<&Arc<KeySet>>) -> Option<Arc<KeySet>> {
        let seen = seen.cloned();
        let me = self.clone();
        let task = tokio::spawn(async move {
            let mut last = me.fetch.lock().await;
            let current = me.keys.load_full();
            let changed = match (&current, &seen) {
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                (Some(_), None) => true,
                _ => false,
            };
            if changed || last.is_some_and(|t| t.elapsed() < me.min_refresh_interval) {
                return current;
            }
            *last = Some(Instant::now());
            match me.fetch_once().await {
                Ok(set) => {
                    let set = Arc::new(set);
                    info!(credential = %me.credential, keys = set.keys.len(), "fetched the subject issuer's JWKS");
                    me.keys.store(Some(set.clone()));
                    Some(set)
                }
                Err(e) => {
                    warn!(credential = %me.credential, error = %e, kept_last = current.is_some(), "cannot fetch the subject issuer's JWKS");
                    current
                }
            }
        });
        task.await.ok().flatten()
    }

    async fn fetch_once(&self) -> Result<KeySet, String> {
        let request = self
            .client
            .request(reqwest::Method::GET, &self.settings.jwks_url)
            .header(reqwest::header::ACCEPT, "application/json");
        let response = self.client.send(request).await.map_err(|e| e.message)?;
        if !(200..300).contains(&response.status) {
            return Err(format!(
                "the JWKS endpoint answered HTTP {}",
                response.status
            ));
        }
        let body = response.json().map_err(|e| e.message)?;
        parse_key_set(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwks_keeps_only_asymmetric_signing_keys() {
        let set = serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "EC", "crv": "P-256", "kid": "sig", "alg": "ES256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "weird"},
        ]});
        let parsed = parse_key_set(&set).unwrap();
        let kids: Vec<_> = parsed.keys.iter().map(|k| k.kid.as_deref()).collect();
        assert_eq!(kids, vec![Some("sig")]);
        assert_eq!(parsed.keys[0].alg, Some(Algorithm::ES256));
        assert!(parse_key_set(&serde_json::json!({"keys": []})).is_err());
        assert!(parse_key_set(&serde_json::json!({"nokeys": 1})).is_err());
    }

    #[test]
    fn hmac_algorithms_are_never_accepted() {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            assert!(!asymmetric(alg));
        }
        for alg in [
            Algorithm::RS256,
            Algorithm::PS256,
            Algorithm::ES256,
            Algorithm::EdDSA,
        ] {
            assert!(asymmetric(alg));
        }
    }
}
