//! Local validation of a caller's subject token against its issuer's JWKS, so a forged, expired
//! or foreign token is refused before it reaches the token-exchange provider; and the life of
//! that key set: fetched on its own HTTP client, refreshed in the background as the issuer's
//! `Cache-Control: max-age` says and on demand (an unknown `kid`, a `kid`-less token that fails)
//! by one single-flight writer while requests read it lock-free, kept across failed fetches for
//! at most `subject_jwks_max_stale`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tracing::{debug, info, warn};

use crate::dialect::{ProviderClient, SubjectValidation};

/// Clock skew tolerated on `exp` and `nbf`: small, because a token just past its `exp` is one
/// the provider will refuse anyway.
const LEEWAY_S: u64 = 30;
/// A JWKS with more keys than this is cut: issuers publish a handful, and every key of an
/// unnamed (`kid`-less) token is tried.
const MAX_KEYS: usize = 32;
/// How long a key set is fresh when the issuer says nothing (no `Cache-Control: max-age`).
const DEFAULT_FRESHNESS: Duration = Duration::from_secs(300);
/// The bounds on the issuer's `max-age`: below the lower one an issuer (or a `no-cache`) would
/// have every replica fetch its keys back to back; above the upper one a key the issuer
/// withdrew would stay trusted for longer than an hour.
const MIN_FRESHNESS: Duration = Duration::from_secs(5);
const MAX_FRESHNESS: Duration = Duration::from_secs(3600);
/// Fetches caused by requests (unknown `kid`s, failing `kid`-less tokens) are at least this far
/// apart whatever `min_refresh_interval` says: anyone can send a random `kid`, and `0s` must
/// not turn that into a fetch per request.
const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(1);
/// After a failed fetch, the background writer tries again this soon, doubling up to
/// [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Why a subject token is not exchanged.
#[derive(Debug, Clone, PartialEq)]
pub enum SubjectError {
    /// The token itself fails (the caller's fault): 401. The reason names the check, never the
    /// token.
    Rejected(String),
    /// No usable key set could be had to check it against: 503.
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
    /// Until then the set is current; after it the background writer fetches it again.
    fresh_until: Instant,
}

/// What the single writer knows of its own attempts.
#[derive(Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    /// When the last fetch ended (well or not): a caller that asked before then has its answer.
    last_finished: Option<Instant>,
    /// Consecutive failed fetches (0 after a good one).
    failures: u32,
    /// After a failure, when the background writer tries again.
    retry_at: Option<Instant>,
}

/// The longest a request waits for the next fetch it may cause (refetches are at least a
/// second apart): a key rotated in just after a fetch is still found at its first use.
const MAX_DEMAND_WAIT: Duration = Duration::from_secs(1);

/// Why a fetch is asked for.
#[derive(Clone, Copy, PartialEq)]
enum Cause {
    /// The set is due (or there is none): the background writer, or the first request.
    Due,
    /// A request whose token the current set cannot verify (an unknown `kid`, a `kid`-less token
    /// whose signature fails): rate-limited.
    Demand,
}

pub struct SubjectValidator {
    credential: Arc<str>,
    settings: SubjectValidation,
    /// The JWKS's own client: no client certificate, the system roots (or
    /// `subject_jwks_ca_file`), no proxy (or `subject_jwks_proxy`). The token endpoint's mTLS
    /// identity, CA bundle and proxy are for the token endpoint only.
    client: ProviderClient,
    /// Between two fetches caused by requests: `min_refresh_interval`, at least 1 s.
    refetch_interval: Duration,
    /// The last good key set, read lock-free by every request; replaced only by the writer.
    keys: ArcSwapOption<KeySet>,
    /// Held by the one fetch in progress: the single writer.
    writer: tokio::sync::Mutex<()>,
    /// The writer's record of its attempts, read by requests and the background loop without
    /// waiting for a fetch in progress (never held across an await).
    state: std::sync::Mutex<FetchState>,
}

/// How long a key set fetched now stays fresh, from the response's `Cache-Control`: `max-age`
/// clamped to [`MIN_FRESHNESS`]..=[`MAX_FRESHNESS`]; `no-cache`/`no-store` are the lower bound;
/// nothing (or nothing readable) is [`DEFAULT_FRESHNESS`].
fn freshness(cache_control: Option<&[u8]>) -> Duration {
    let Some(value) = cache_control.and_then(|v| std::str::from_utf8(v).ok()) else {
        return DEFAULT_FRESHNESS;
    };
    let mut max_age = None;
    for directive in value.split(',') {
        let (name, arg) = match directive.split_once('=') {
            Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
            None => (directive.trim(), None),
        };
        if name.eq_ignore_ascii_case("no-cache") || name.eq_ignore_ascii_case("no-store") {
            return MIN_FRESHNESS;
        }
        if name.eq_ignore_ascii_case("max-age") {
            max_age = arg.and_then(|a| a.parse::<u64>().ok());
        }
    }
    max_age.map_or(DEFAULT_FRESHNESS, |s| {
        Duration::from_secs(s).clamp(MIN_FRESHNESS, MAX_FRESHNESS)
    })
}

/// The wait before the next try after `failures` failed fetches in a row.
fn retry_delay(failures: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(MAX_RETRY)
}

/// Only signature algorithms with a public key: a JWKS key can never be an HMAC secret, and
/// `none` is not an algorithm jsonwebtoken parses.
fn asymmetric(alg: Algorithm) -> bool {
    !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// The usable signing keys of a JWKS document; the others (encryption keys, symmetric keys,
/// unknown key types) are skipped rather than failing the whole set.
fn parse_key_set(body: &serde_json::Value) -> Result<Vec<Key>, String> {
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
    Ok(keys)
}

/// A verification that failed, and whether a newer key set could change the answer.
struct Failure {
    reason: String,
    /// No key fits, or the signature does not verify: the issuer may have rotated.
    keys_suspect: bool,
}

impl KeySet {
    fn has(&self, kid: &Option<String>) -> bool {
        self.keys.iter().any(|k| &k.kid == kid)
    }
}

fn same(a: &Option<Arc<KeySet>>, b: &Option<Arc<KeySet>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

impl SubjectValidator {
    /// `timeout` bounds each fetch; `min_refresh_interval` (at least 1 s) spaces the fetches
    /// that requests cause.
    pub fn new(
        credential: Arc<str>,
        settings: SubjectValidation,
        timeout: Duration,
        min_refresh_interval: Duration,
    ) -> Result<Self, String> {
        let client = ProviderClient::new(timeout, &settings.transport)
            .map_err(|e| format!("subject JWKS client: {e}"))?;
        Ok(SubjectValidator {
            credential,
            settings,
            client,
            refetch_interval: min_refresh_interval.max(MIN_REFETCH_INTERVAL),
            keys: ArcSwapOption::empty(),
            writer: tokio::sync::Mutex::new(()),
            state: std::sync::Mutex::new(FetchState::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FetchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key set requests may use at `now`: the last good one, until `subject_jwks_max_stale`
    /// past the end of its freshness.
    fn usable(&self, now: Instant) -> Option<Arc<KeySet>> {
        self.keys
            .load_full()
            .filter(|s| now < s.fresh_until + self.settings.max_stale)
    }

    /// When the background writer fetches next: when the set stops being fresh, or the retry
    /// after a failed fetch once it has; at once when nothing was ever fetched.
    pub fn next_refresh(&self) -> Instant {
        self.next_refresh_after(Instant::now())
    }

    fn next_refresh_after(&self, now: Instant) -> Instant {
        let retry_at = self.state().retry_at;
        match (self.keys.load().as_ref(), retry_at) {
            (Some(set), Some(retry)) => set.fresh_until.max(retry),
            (Some(set), None) => set.fresh_until,
            (None, Some(retry)) => retry,
            (None, None) => now,
        }
    }

    /// The background writer's turn: fetches the key set if it is due (checked again inside
    /// the single flight, so a request's fetch in between counts).
    pub async fn refresh_if_due(self: &Arc<Self>) {
        let now = Instant::now();
        if now >= self.next_refresh_after(now) {
            let seen = self.keys.load_full();
            self.refetch(Cause::Due, seen).await;
        }
    }

    /// Checks `token`'s signature against the issuer's keys, its `exp`/`nbf`, and `iss`/`aud`
    /// when configured. An unknown `kid`, or a `kid`-less token no key verifies, fetches the
    /// key set again first (see [`Self::refetch`]).
    pub async fn validate(self: &Arc<Self>, token: &str) -> Result<(), SubjectError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| SubjectError::Rejected("not a signed JWT".into()))?;
        if !asymmetric(header.alg) {
            return Err(SubjectError::Rejected(format!(
                "alg {:?} is not accepted (only RS*, PS*, ES*, EdDSA)",
                header.alg
            )));
        }
        let mut set = match self.usable(Instant::now()) {
            Some(set) => set,
            None => {
                let seen = self.keys.load_full();
                self.refetch(Cause::Due, seen)
                    .await
                    .ok_or_else(|| self.unavailable())?
            }
        };
        if header.kid.is_some() && !set.has(&header.kid) {
            // A key the issuer rotated in since the last fetch, or a forged kid: one refetch
            // (shared, and rate-limited) decides.
            if let Some(fresh) = self.refetch(Cause::Demand, Some(set.clone())).await {
                set = fresh;
            }
        }
        let failure = match self.verify(&set, &header, token) {
            Ok(()) => return Ok(()),
            Err(f) => f,
        };
        if header.kid.is_none() && failure.keys_suspect {
            // Without a kid, a rotation looks like a bad signature: the same refetch decides.
            if let Some(fresh) = self.refetch(Cause::Demand, Some(set.clone())).await
                && !Arc::ptr_eq(&fresh, &set)
            {
                return self
                    .verify(&fresh, &header, token)
                    .map_err(|f| SubjectError::Rejected(f.reason));
            }
        }
        Err(SubjectError::Rejected(failure.reason))
    }

    fn verify(
        &self,
        set: &KeySet,
        header: &jsonwebtoken::Header,
        token: &str,
    ) -> Result<(), Failure> {
        let candidates: Vec<&Key> = set
            .keys
            .iter()
            .filter(|k| header.kid.is_none() || k.kid == header.kid)
            .filter(|k| k.alg.is_none_or(|a| a == header.alg))
            .filter(|k| k.key.family() == header.alg.family())
            .collect();
        if candidates.is_empty() {
            return Err(Failure {
                reason: match &header.kid {
                    Some(_) => "its kid is not in the issuer's JWKS".into(),
                    None => format!("no key of the issuer's JWKS is for alg {:?}", header.alg),
                },
                keys_suspect: true,
            });
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
        let kind = last.as_ref().map(|e| e.kind());
        let reason = match kind {
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
        Err(Failure {
            reason: reason.into(),
            keys_suspect: matches!(kind, Some(ErrorKind::InvalidSignature)),
        })
    }

    fn unavailable(&self) -> SubjectError {
        let now = Instant::now();
        let floor = self.state().last_attempt.map(|t| t + self.refetch_interval);
        let next = self.next_refresh_after(now).max(floor.unwrap_or(now));
        let wait = next.saturating_duration_since(now);
        let reason = if self.keys.load().is_some() {
            "the subject issuer's JWKS cannot be fetched and the last good one is older than subject_jwks_max_stale"
        } else {
            "the subject issuer's JWKS cannot be fetched and none is cached"
        };
        SubjectError::Unavailable {
            reason: reason.into(),
            retry_after: Duration::from_secs(wait.as_secs_f64().ceil().max(1.0) as u64),
        }
    }

    /// Fetches the key set again, one fetch at a time, unless it is no longer needed once this
    /// caller's turn comes: another fetch replaced `seen` meanwhile, a fetch ended after this
    /// caller asked (its answer, good or not, is this caller's too: callers queued behind a
    /// JWKS host that hangs wait for one fetch, not one each), or a due fetch is not due any
    /// more. A demanded fetch less than `refetch_interval` after the last attempt waits for the
    /// interval to pass when that is at most [`MAX_DEMAND_WAIT`] away (a key rotated in just
    /// after a fetch is still found), and is not made otherwise. The fetch runs in
    /// its own task (a caller that goes away does not cut it); on failure the last good set
    /// stays. Returns the set usable now.
    async fn refetch(
        self: &Arc<Self>,
        cause: Cause,
        seen: Option<Arc<KeySet>>,
    ) -> Option<Arc<KeySet>> {
        let me = self.clone();
        let asked = Instant::now();
        let task = tokio::spawn(async move {
            let _writer = me.writer.lock().await;
            let answered = |me: &Self| me.state().last_finished.is_some_and(|t| t >= asked);
            if !same(&me.keys.load_full(), &seen) || answered(&me) {
                return me.usable(Instant::now());
            }
            let now = Instant::now();
            match cause {
                Cause::Due if now < me.next_refresh_after(now) => return me.usable(now),
                Cause::Due => {}
                Cause::Demand => {
                    let next = me.state().last_attempt.map(|t| t + me.refetch_interval);
                    match next.filter(|t| now < *t) {
                        // A request waits for the next allowed fetch only briefly; further off,
                        // it is judged on the set at hand.
                        Some(next) if next - now > MAX_DEMAND_WAIT => return me.usable(now),
                        Some(next) => tokio::time::sleep_until(next.into()).await,
                        None => {}
                    }
                }
            }
            let now = Instant::now();
            me.state().last_attempt = Some(now);
            let result = me.fetch_once().await;
            let mut st = me.state();
            st.last_finished = Some(Instant::now());
            match result {
                Ok(set) => {
                    st.failures = 0;
                    st.retry_at = None;
                    drop(st);
                    let fresh_for_s = set.fresh_until.saturating_duration_since(now).as_secs();
                    // A routine refresh (as often as every 5 s) is not news; new keys are.
                    let kids =
                        |s: &KeySet| s.keys.iter().map(|k| k.kid.clone()).collect::<Vec<_>>();
                    if me.keys.load().as_deref().map(kids) == Some(kids(&set)) {
                        debug!(credential = %me.credential, keys = set.keys.len(), fresh_for_s, "refreshed the subject issuer's JWKS");
                    } else {
                        info!(credential = %me.credential, keys = set.keys.len(), fresh_for_s, "fetched the subject issuer's JWKS");
                    }
                    me.keys.store(Some(Arc::new(set)));
                }
                Err(e) => {
                    st.failures = st.failures.saturating_add(1);
                    let retry = retry_delay(st.failures);
                    st.retry_at = Some(Instant::now() + retry);
                    drop(st);
                    let kept = me.usable(Instant::now()).is_some();
                    warn!(credential = %me.credential, error = %e, kept_last = kept, retry_in_s = retry.as_secs(), "cannot fetch the subject issuer's JWKS");
                }
            }
            me.usable(Instant::now())
        });
        task.await.ok().flatten()
    }

    async fn fetch_once(&self) -> Result<KeySet, String> {
        let request = self
            .client
            .request(reqwest::Method::GET, &self.settings.jwks_url)
            .header(reqwest::header::ACCEPT, "application/json");
        let started = Instant::now();
        let (response, cache_control) = self
            .client
            .send_keeping(request, Some("cache-control"))
            .await
            .map_err(|e| e.message)?;
        if !(200..300).contains(&response.status) {
            return Err(format!(
                "the JWKS endpoint answered HTTP {}",
                response.status
            ));
        }
        let body = response.json().map_err(|e| e.message)?;
        let keys = parse_key_set(&body)?;
        Ok(KeySet {
            keys,
            // Counted from the request, as HTTP caches count an answer's age.
            fresh_until: started + freshness(cache_control.as_deref()),
        })
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
        let kids: Vec<_> = parsed.iter().map(|k| k.kid.as_deref()).collect();
        assert_eq!(kids, vec![Some("sig")]);
        assert_eq!(parsed[0].alg, Some(Algorithm::ES256));
        assert!(parse_key_set(&serde_json::json!({"keys": []})).is_err());
        assert!(parse_key_set(&serde_json::json!({"nokeys": 1})).is_err());
    }

    #[test]
    fn freshness_follows_max_age_within_bounds() {
        let f = |v: &str| freshness(Some(v.as_bytes()));
        assert_eq!(freshness(None), DEFAULT_FRESHNESS);
        assert_eq!(
            f("public, max-age=60, must-revalidate"),
            Duration::from_secs(60)
        );
        assert_eq!(f("Max-Age=\"120\""), Duration::from_secs(120));
        assert_eq!(f("max-age=0"), MIN_FRESHNESS);
        assert_eq!(f("max-age=999999"), MAX_FRESHNESS);
        assert_eq!(f("no-cache"), MIN_FRESHNESS);
        assert_eq!(f("max-age=60, no-store"), MIN_FRESHNESS);
        assert_eq!(f("max-age=soon"), DEFAULT_FRESHNESS);
        assert_eq!(f("public"), DEFAULT_FRESHNESS);
        assert_eq!(freshness(Some(b"\xff")), DEFAULT_FRESHNESS);
    }

    #[test]
    fn retries_after_a_failed_fetch_double_up_to_a_minute() {
        let secs: Vec<u64> = (1..=9).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY);
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
