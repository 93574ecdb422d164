//! A token as the proxy uses it: its value, the header it is presented in, and its schedule
//! (when to refresh it in the background, and when it stops being served).

use std::time::{Duration, Instant, SystemTime};

use http::{HeaderName, HeaderValue};
use rand::Rng;

use super::store::SharedAccess;
use crate::config::{Presentation, Timing};
use crate::dialect::{Expiry, Grant, GrantKind};
use crate::secret::Secret;

/// Lifetimes beyond this are treated as a provider fault rather than trusted.
pub const MAX_LIFETIME: Duration = Duration::from_secs(400 * 24 * 3600);
/// How far in the future (by this replica's clock) another replica may have issued a token
/// this one adopts: NTP keeps hosts well within it; beyond it the clocks are not to be trusted
/// to say when the token stops being valid.
pub const SKEW_TOLERANCE: Duration = Duration::from_secs(1);

/// Why a shared token cannot be taken up.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FromShared {
    /// Issued this far in the future by this replica's clock, beyond [`SKEW_TOLERANCE`].
    #[error("issued {0:?} in the future by this replica's clock (more than the skew tolerance)")]
    Skewed(Duration),
    #[error("{0}")]
    Invalid(String),
}

pub struct Token {
    value: Secret,
    header: HeaderName,
    /// Built once per token so the request path only clones a reference-counted value.
    presented: HeaderValue,
    pub kind: GrantKind,
    pub generation: u64,
    pub issued_at: Instant,
    pub issued_wall: SystemTime,
    pub lifetime: Duration,
    /// Background refresh starts here (the soft threshold).
    pub refresh_at: Instant,
    /// Past here the token is no longer served and requests wait for a new one (the hard threshold).
    pub usable_until: Instant,
    pub expires_at: Instant,
    /// Obtained because the upstream rejected the token before it: if the upstream rejects this
    /// one too within `min_refresh_interval`, the upstream is at fault, not the token.
    pub after_rejection: bool,
    /// SHA-256 of the client certificate the token endpoint was called with (RFC 8705 §3: the
    /// provider may bind the token to it), where this process obtained the token with one.
    pub bound_cert: Option<[u8; 32]>,
}

/// When a provider request was sent: a token's lifetime counts from here, not from when the
/// answer arrived, so a slow provider cannot make a token look longer-lived than it is.
#[derive(Debug, Clone, Copy)]
pub struct SentAt {
    pub instant: Instant,
    pub wall: SystemTime,
}

impl SentAt {
    pub fn now() -> Self {
        SentAt {
            instant: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("value", &self.value)
            .field("kind", &self.kind)
            .field("generation", &self.generation)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// The refresh-ahead schedule of a token of `lifetime` issued at `issued_at`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub refresh_at: Instant,
    pub usable_until: Instant,
    pub expires_at: Instant,
}

/// How long a token lives, from what the provider said and the JWT's own `exp`. When both are
/// known the earlier wins: serving a token the upstream already rejects helps no one.
pub fn lifetime(
    expires: Expiry,
    jwt_exp: Option<SystemTime>,
    default: Duration,
    now: SystemTime,
) -> Result<Duration, String> {
    let until = |t: SystemTime| t.duration_since(now).unwrap_or(Duration::ZERO);
    let said = match expires {
        Expiry::In(d) => Some(d),
        Expiry::At(t) => Some(until(t)),
        Expiry::Unknown => None,
    };
    let lifetime = match (said, jwt_exp.map(until)) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => default,
    };
    if lifetime < Duration::from_secs(1) {
        return Err("provider issued a token that is already expired".into());
    }
    if lifetime > MAX_LIFETIME {
        return Err(format!(
            "provider issued a token valid for {}, beyond the {}-day bound",
            humantime::format_duration(Duration::from_secs(lifetime.as_secs())),
            MAX_LIFETIME.as_secs() / 86400
        ));
    }
    Ok(lifetime)
}

/// Soft threshold at `refresh_at` of the lifetime, jittered earlier by up to 10 % so replicas
/// and credentials do not refresh in lock-step; hard threshold a margin before expiry.
pub fn schedule(timing: &Timing, lifetime: Duration, issued_at: Instant, jitter: f64) -> Schedule {
    let margin = timing.expiry_margin.min(lifetime / 10);
    let usable = lifetime - margin;
    let factor = timing.refresh_at * (1.0 - 0.1 * jitter.clamp(0.0, 1.0));
    let soft = lifetime
        .mul_f64(factor)
        .max(timing.min_refresh_interval)
        .min(usable);
    Schedule {
        refresh_at: issued_at + soft,
        usable_until: issued_at + usable,
        expires_at: issued_at + lifetime,
    }
}

impl Token {
    pub fn from_grant(
        grant: Grant,
        sent: SentAt,
        presentation: &Presentation,
        timing: &Timing,
        generation: u64,
        after_rejection: bool,
    ) -> Result<Token, String> {
        let jwt_exp = super::jwt::expiry(grant.access_token.expose());
        let lifetime = lifetime(grant.expires, jwt_exp, timing.default_lifetime, sent.wall)?;
        Self::build(
            grant.access_token,
            grant.kind,
            sent,
            lifetime,
            presentation,
            timing,
            generation,
            after_rejection,
        )
    }

    /// A token another process obtained and a shared store handed over, scheduled as if this
    /// process had obtained it (with its own jitter). Its times are the issuing replica's wall
    /// clock, read with this one's: a clock behind the issuer's sees the token younger than it
    /// is (by at most the skew tolerance, which `expiry_margin` absorbs), and a token issued
    /// further in the future than [`SKEW_TOLERANCE`] is refused rather than served past its
    /// real cut-off.
    pub fn from_shared(
        shared: &SharedAccess,
        presentation: &Presentation,
        timing: &Timing,
        generation: u64,
    ) -> Result<Token, FromShared> {
        Self::from_shared_at(shared, presentation, timing, generation, SentAt::now())
    }

    fn from_shared_at(
        shared: &SharedAccess,
        presentation: &Presentation,
        timing: &Timing,
        generation: u64,
        now: SentAt,
    ) -> Result<Token, FromShared> {
        if let Ok(ahead) = shared.issued_at.duration_since(now.wall) {
            if ahead > SKEW_TOLERANCE {
                return Err(FromShared::Skewed(ahead));
            }
        }
        let age = now
            .wall
            .duration_since(shared.issued_at)
            .unwrap_or_default();
        let lifetime = shared
            .expires_at
            .duration_since(shared.issued_at)
            .map_err(|_| {
                FromShared::Invalid("the shared token expires before it was issued".into())
            })?;
        let sent = SentAt {
            instant: now.instant.checked_sub(age).unwrap_or(now.instant),
            wall: shared.issued_at,
        };
        Self::build(
            shared.token.clone(),
            shared.kind,
            sent,
            lifetime,
            presentation,
            timing,
            generation,
            shared.after_rejection,
        )
        .map_err(FromShared::Invalid)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        value: Secret,
        kind: GrantKind,
        sent: SentAt,
        lifetime: Duration,
        presentation: &Presentation,
        timing: &Timing,
        generation: u64,
        after_rejection: bool,
    ) -> Result<Token, String> {
        let s = schedule(timing, lifetime, sent.instant, rand::rng().random::<f64>());
        let mut presented =
            HeaderValue::from_str(&presentation.render(value.expose())).map_err(|_| {
                "provider issued a token that cannot be written into an HTTP header".to_string()
            })?;
        presented.set_sensitive(true);
        Ok(Token {
            value,
            header: presentation.header.clone(),
            presented,
            kind,
            generation,
            issued_at: sent.instant,
            issued_wall: sent.wall,
            lifetime,
            refresh_at: s.refresh_at,
            usable_until: s.usable_until,
            expires_at: s.expires_at,
            after_rejection,
            bound_cert: None,
        })
    }

    /// What a shared store keeps of this token.
    pub fn to_shared(&self) -> SharedAccess {
        SharedAccess {
            token: self.value.clone(),
            kind: self.kind,
            issued_at: self.issued_wall,
            expires_at: self.expires_wall(),
            after_rejection: self.after_rejection,
        }
    }

    pub fn value(&self) -> &Secret {
        &self.value
    }

    pub fn header(&self) -> (&HeaderName, &HeaderValue) {
        (&self.header, &self.presented)
    }

    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }

    pub fn expires_wall(&self) -> SystemTime {
        self.issued_wall + self.lifetime
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn lifetime_prefers_the_earlier_of_body_and_jwt() {
        let now = T0 + secs(1000);
        assert_eq!(
            lifetime(Expiry::In(secs(3600)), Some(now + secs(60)), secs(5), now).unwrap(),
            secs(60)
        );
        assert_eq!(
            lifetime(Expiry::In(secs(30)), Some(now + secs(60)), secs(5), now).unwrap(),
            secs(30)
        );
        assert_eq!(
            lifetime(Expiry::At(now + secs(90)), None, secs(5), now).unwrap(),
            secs(90)
        );
        assert_eq!(
            lifetime(Expiry::Unknown, Some(now + secs(70)), secs(5), now).unwrap(),
            secs(70)
        );
        assert_eq!(
            lifetime(Expiry::Unknown, None, secs(300), now).unwrap(),
            secs(300)
        );
    }

    #[test]
    fn lifetime_rejects_past_and_absurd_expiry() {
        let now = T0 + secs(1000);
        assert!(
            lifetime(Expiry::At(now - secs(1)), None, secs(5), now)
                .unwrap_err()
                .contains("already expired")
        );
        assert!(lifetime(Expiry::In(secs(0)), None, secs(5), now).is_err());
        assert!(
            lifetime(Expiry::In(secs(10 * 365 * 86400)), None, secs(5), now)
                .unwrap_err()
                .contains("bound")
        );
    }

    #[test]
    fn schedule_refreshes_ahead_and_stops_serving_before_expiry() {
        let t = Timing::default();
        let now = Instant::now();
        let s = schedule(&t, secs(3600), now, 0.0);
        assert_eq!(s.refresh_at - now, secs(2700));
        assert_eq!(s.usable_until - now, secs(3570));
        let s = schedule(&t, secs(3600), now, 1.0);
        assert_eq!(s.refresh_at - now, secs(2430));
        // Short tokens: the margin shrinks to a tenth of the lifetime.
        let s = schedule(&t, secs(30), now, 0.0);
        assert_eq!(s.usable_until - now, secs(27));
        assert!(s.refresh_at < s.usable_until);
    }

    #[test]
    fn schedule_never_refreshes_sooner_than_the_minimum_interval() {
        let t = Timing::default();
        let now = Instant::now();
        let s = schedule(&t, secs(4), now, 0.0);
        // min interval 5s > usable lifetime: refresh at the hard threshold, never before.
        assert_eq!(s.refresh_at, s.usable_until);
        // 75 % of 6s is 4.5s: held back to the 5s minimum, still before the 5.4s hard threshold.
        let s = schedule(&t, secs(6), now, 0.0);
        assert_eq!(s.refresh_at - now, secs(5));
    }

    #[test]
    fn a_shared_token_issued_in_the_future_beyond_the_tolerance_is_refused() {
        let presentation = Presentation::parse("Authorization", "Bearer {token}").unwrap();
        let timing = Timing::default();
        let now = SentAt::now();
        let shared = |issued: SystemTime| SharedAccess {
            token: Secret::new("at-1"),
            kind: GrantKind::Refresh,
            issued_at: issued,
            expires_at: issued + secs(600),
            after_rejection: true,
        };
        let at = |issued| Token::from_shared_at(&shared(issued), &presentation, &timing, 1, now);
        // Another replica's clock 3 s ahead: refused, never served past its real cut-off.
        assert_eq!(
            at(now.wall + secs(3)).unwrap_err(),
            FromShared::Skewed(secs(3))
        );
        // Within the tolerance: taken up, the rejection mark with it.
        let t = at(now.wall + Duration::from_millis(500)).unwrap();
        assert!(t.after_rejection);
        assert_eq!(t.expires_at - now.instant, secs(600));
        // Issued 100 s ago by the same clock: 100 s less to live.
        let t = at(now.wall - secs(100)).unwrap();
        assert_eq!(t.expires_at + secs(100) - now.instant, secs(600));
    }
}
