//! DPoP (RFC 9449): the P-256 key a credential's tokens are bound to, the ES256 proofs signed
//! with it (one per token request and one per upstream request), and the newest server nonce
//! per origin.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use p256::ecdsa::SigningKey;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use sha2::{Digest, Sha256};

/// The request header a proof travels in.
pub const HEADER: &str = "dpop";
/// The response header a server's nonce comes in (RFC 9449 §8, §9).
pub const NONCE_HEADER: &str = "dpop-nonce";
/// The error code of a server that wants a nonce in the proof.
pub const USE_NONCE: &str = "use_dpop_nonce";

/// Servers choose nonces, so their size and number are bounded: a hostile upstream cannot make
/// every proof (and so every request) grow, nor the map of origins.
const MAX_NONCE_LEN: usize = 512;
const MAX_ORIGINS: usize = 64;

/// A credential's DPoP key. Clones of the `Arc` share the nonces.
pub struct DpopKey {
    /// ring signs (its assembly P-256 is ~10× the pure-Rust one, and a proof is signed per
    /// request); `p256` only parses, generates and describes keys.
    signing: EcdsaKeyPair,
    /// The base64url of the proof's JOSE header: fixed for a key, so encoded once.
    header_b64: String,
    /// RFC 7638 thumbprint of the public key: the `cnf.jkt` of the tokens bound to it.
    thumbprint: String,
    generated: bool,
    /// The newest nonce each origin sent; read lock-free on every proof.
    nonces: ArcSwap<BTreeMap<String, Arc<str>>>,
}

impl std::fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopKey")
            .field("thumbprint", &self.thumbprint)
            .field("generated", &self.generated)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    jti: &'a str,
    htm: &'a str,
    htu: &'a str,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    ath: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<&'a str>,
}

impl DpopKey {
    /// A fresh key, for `dpop = true`: it lives as long as the process.
    pub fn generate() -> Result<Self, String> {
        use rand::RngCore;
        // A random 32-byte string is a valid scalar unless it is zero or ≥ n (odds ~2^-32).
        for _ in 0..16 {
            let mut bytes = secrecy::zeroize::Zeroizing::new([0u8; 32]);
            rand::rng().fill_bytes(bytes.as_mut());
            if let Ok(key) = SigningKey::from_slice(bytes.as_ref()) {
                return Self::new(key, true);
            }
        }
        Err("cannot generate a P-256 key".into())
    }

    /// The key in `pem`: a P-256 private key as SEC1 (`EC PRIVATE KEY`, as `openssl ecparam
    /// -genkey` writes it, with or without its `EC PARAMETERS` block) or PKCS#8 (`PRIVATE KEY`).
    /// Errors never quote the text.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        use p256::pkcs8::DecodePrivateKey;
        const WANT: &str =
            "is not a P-256 private key in PEM (SEC1 `EC PRIVATE KEY` or PKCS#8 `PRIVATE KEY`)";
        if pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
            return Err(
                "is an encrypted private key; give the key unencrypted (file mode 0600)".into(),
            );
        }
        let secret = if let Some(block) = pem_block(pem, "EC PRIVATE KEY") {
            p256::SecretKey::from_sec1_pem(block).map_err(|_| WANT.to_string())?
        } else if let Some(block) = pem_block(pem, "PRIVATE KEY") {
            p256::SecretKey::from_pkcs8_pem(block).map_err(|_| WANT.to_string())?
        } else {
            return Err(WANT.into());
        };
        Self::new(SigningKey::from(secret), false)
    }

    fn new(key: SigningKey, generated: bool) -> Result<Self, String> {
        let point = key.verifying_key().to_encoded_point(false);
        let scalar = secrecy::zeroize::Zeroizing::new(key.to_bytes());
        let signing = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &scalar[..],
            point.as_bytes(),
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|_| "cannot use this P-256 key for signing".to_string())?;
        // An uncompressed point of a valid key always has both coordinates.
        let coordinate =
            |c: Option<&p256::FieldBytes>| c.map(|c| B64.encode(c)).unwrap_or_default();
        let (x, y) = (coordinate(point.x()), coordinate(point.y()));
        let header = serde_json::json!({
            "typ": "dpop+jwt",
            "alg": "ES256",
            "jwk": {"kty": "EC", "crv": "P-256", "x": x, "y": y},
        });
        Ok(DpopKey {
            signing,
            header_b64: B64.encode(header.to_string()),
            thumbprint: thumbprint(&x, &y),
            generated,
            nonces: ArcSwap::from_pointee(BTreeMap::new()),
        })
    }

    /// The RFC 7638 JWK SHA-256 thumbprint (base64url): what the provider puts in `cnf.jkt`.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// Generated at start (`dpop = true`) rather than read from `dpop_key`.
    pub fn generated(&self) -> bool {
        self.generated
    }

    /// A proof for one request: `htu` is `origin` + `path` (no query, no fragment), `token` the
    /// access token it presents (for `ath`; none on token requests), with the newest nonce of
    /// `origin` if it sent one. Never logged: it is a credential for this request.
    pub fn proof(
        &self,
        htm: &str,
        origin: &str,
        path: &str,
        token: Option<&str>,
    ) -> Result<String, String> {
        use rand::RngCore;
        let mut jti = [0u8; 16];
        rand::rng().fill_bytes(&mut jti);
        let jti = B64.encode(jti);
        let mut htu = String::with_capacity(origin.len() + path.len());
        htu.push_str(origin);
        htu.push_str(path);
        let ath = token.map(ath);
        let nonces = self.nonces.load();
        let claims = Claims {
            jti: &jti,
            htm,
            htu: &htu,
            iat: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            ath: ath.as_deref(),
            nonce: nonces.get(origin).map(|n| &**n),
        };
        let claims = serde_json::to_vec(&claims).map_err(|e| e.to_string())?;
        let mut out = String::with_capacity(self.header_b64.len() + claims.len() * 4 / 3 + 100);
        out.push_str(&self.header_b64);
        out.push('.');
        B64.encode_string(&claims, &mut out);
        // FIXED_SIGNING: r ‖ s, 64 bytes, the JWS ES256 form (RFC 7518 §3.4).
        let signature = self
            .signing
            .sign(&ring::rand::SystemRandom::new(), out.as_bytes())
            .map_err(|_| "cannot sign the DPoP proof".to_string())?;
        out.push('.');
        B64.encode_string(signature.as_ref(), &mut out);
        Ok(out)
    }

    /// Keeps `nonce` (a `DPoP-Nonce` header value) as the newest of `origin`. A value that is
    /// not a valid nonce (RFC 9449 §8.1: visible ASCII but `"` and `\`) is ignored.
    pub fn set_nonce(&self, origin: &str, nonce: &[u8]) {
        if nonce.is_empty()
            || nonce.len() > MAX_NONCE_LEN
            || !nonce
                .iter()
                .all(|b| (0x21..=0x7e).contains(b) && *b != b'"' && *b != b'\\')
        {
            return;
        }
        let Ok(nonce) = std::str::from_utf8(nonce) else {
            return;
        };
        if self
            .nonces
            .load()
            .get(origin)
            .is_some_and(|n| &**n == nonce)
        {
            return;
        }
        self.nonces.rcu(|map| {
            let mut map = BTreeMap::clone(map);
            if map.len() >= MAX_ORIGINS && !map.contains_key(origin) {
                map.clear();
            }
            map.insert(origin.to_string(), Arc::from(nonce));
            map
        });
    }

    /// The nonce `origin` last sent, if any.
    pub fn nonce(&self, origin: &str) -> Option<Arc<str>> {
        self.nonces.load().get(origin).cloned()
    }
}

/// `ath` (RFC 9449 §4.2): base64url of the SHA-256 of the access token.
pub fn ath(token: &str) -> String {
    B64.encode(Sha256::digest(token.as_bytes()))
}

/// RFC 7638: SHA-256 over the required members of an EC JWK in lexicographic order.
fn thumbprint(x: &str, y: &str) -> String {
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    B64.encode(Sha256::digest(canonical.as_bytes()))
}

/// The `BEGIN label` … `END label` block of `pem`, markers included.
fn pem_block<'a>(pem: &'a str, label: &str) -> Option<&'a str> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)?;
    let stop = start + pem[start..].find(&end)? + end.len();
    Some(&pem[start..stop])
}

/// Whether a `WWW-Authenticate` value holds a DPoP challenge asking for a nonce (RFC 9449 §9):
/// `DPoP error="use_dpop_nonce"`, alone or among other challenges (RFC 9110 §11.6.1).
pub fn asks_for_nonce(www_authenticate: &[u8]) -> bool {
    let Ok(value) = std::str::from_utf8(www_authenticate) else {
        return false;
    };
    let mut in_dpop = false;
    for item in split_outside_quotes(value) {
        let item = item.trim();
        let (first, rest) = item.split_once(' ').unwrap_or((item, ""));
        // An item that starts with a bare token begins a new challenge: its scheme, then
        // perhaps its first parameter.
        let param = if !first.is_empty() && !first.contains('=') {
            in_dpop = first.eq_ignore_ascii_case("dpop");
            rest.trim()
        } else {
            item
        };
        if in_dpop
            && param.split_once('=').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("error")
                    && value.trim().trim_matches('"') == USE_NONCE
            })
        {
            return true;
        }
    }
    false
}

/// Splits at commas that are not inside a quoted string (`\"` escapes a quote).
fn split_outside_quotes(value: &str) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    let mut escaped = false;
    value.split(move |c| {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => return true,
            _ => {}
        }
        false
    })
}

/// Whether a token endpoint's error body is `use_dpop_nonce` (RFC 9449 §8).
pub fn body_asks_for_nonce(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("error")
                .and_then(|e| e.as_str())
                .map(|e| e == USE_NONCE)
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier;
    use p256::ecdsa::{Signature, VerifyingKey};

    fn decode(part: &str) -> serde_json::Value {
        serde_json::from_slice(&B64.decode(part).unwrap()).unwrap()
    }

    /// Checks the proof as a server would, with only the proof in hand.
    fn verify(proof: &str) -> (serde_json::Value, serde_json::Value) {
        let parts: Vec<&str> = proof.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = decode(parts[0]);
        let jwk = &header["jwk"];
        let coordinate = |c: &str| B64.decode(jwk[c].as_str().unwrap()).unwrap();
        let point = p256::EncodedPoint::from_affine_coordinates(
            coordinate("x").as_slice().into(),
            coordinate("y").as_slice().into(),
            false,
        );
        let key = VerifyingKey::from_encoded_point(&point).unwrap();
        let signature = Signature::from_slice(&B64.decode(parts[2]).unwrap()).unwrap();
        key.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
            .expect("signature verifies with the header's jwk");
        (header, decode(parts[1]))
    }

    #[test]
    fn rfc_vectors_for_thumbprint_and_ath() {
        // RFC 9449 §4.3 and §7.1.
        assert_eq!(
            thumbprint(
                "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
                "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA"
            ),
            "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
        );
        assert_eq!(
            ath("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"),
            "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
        );
    }

    #[test]
    fn a_proof_verifies_and_carries_the_claims() {
        let key = DpopKey::generate().unwrap();
        assert!(key.generated());
        let proof = key
            .proof("GET", "https://api.example:8443", "/v1/x", Some("tok"))
            .unwrap();
        let (header, claims) = verify(&proof);
        assert_eq!(header["typ"], "dpop+jwt");
        assert_eq!(header["alg"], "ES256");
        assert!(header["jwk"].get("d").is_none(), "no private part");
        assert_eq!(
            thumbprint(
                header["jwk"]["x"].as_str().unwrap(),
                header["jwk"]["y"].as_str().unwrap()
            ),
            key.thumbprint()
        );
        assert_eq!(claims["htm"], "GET");
        assert_eq!(claims["htu"], "https://api.example:8443/v1/x");
        assert_eq!(claims["ath"], ath("tok"));
        assert!(claims.get("nonce").is_none());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(claims["iat"].as_u64().unwrap().abs_diff(now) <= 2);
        let other = verify(&key.proof("GET", "https://a", "/", None).unwrap()).1;
        assert_ne!(claims["jti"], other["jti"]);
        assert!(other.get("ath").is_none());
    }

    #[test]
    fn nonces_are_kept_per_origin_and_bounded() {
        let key = DpopKey::generate().unwrap();
        key.set_nonce("https://a", b"n-1");
        key.set_nonce("https://a", b"n-2");
        key.set_nonce("https://a", b"bad\"nonce");
        key.set_nonce("https://a", &[b'x'; MAX_NONCE_LEN + 1]);
        key.set_nonce("https://b", b"other");
        let claims = verify(&key.proof("POST", "https://a", "/token", None).unwrap()).1;
        assert_eq!(claims["nonce"], "n-2");
        assert_eq!(key.nonce("https://b").as_deref(), Some("other"));
        assert_eq!(key.nonce("https://c"), None);
        for i in 0..(MAX_ORIGINS * 2) {
            key.set_nonce(&format!("https://h{i}"), b"n");
        }
        assert!(key.nonces.load().len() <= MAX_ORIGINS);
    }

    #[test]
    fn reads_sec1_and_pkcs8_pem_of_the_same_key() {
        use p256::pkcs8::{EncodePrivateKey, LineEnding};
        let secret = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        let sec1 = secret.to_sec1_pem(LineEnding::LF).unwrap();
        let pkcs8 = secret.to_pkcs8_pem(LineEnding::LF).unwrap();
        let with_params = format!(
            "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n{}",
            &*sec1
        );
        let a = DpopKey::from_pem(&sec1).unwrap();
        let b = DpopKey::from_pem(&pkcs8).unwrap();
        let c = DpopKey::from_pem(&with_params).unwrap();
        assert!(!a.generated());
        assert_eq!(a.thumbprint(), b.thumbprint());
        assert_eq!(a.thumbprint(), c.thumbprint());
        assert_eq!(format!("{a:?}").matches(a.thumbprint()).count(), 1);
        let p384 = "-----BEGIN PRIVATE KEY-----\nMIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDBh\n-----END PRIVATE KEY-----\n";
        for bad in [
            "",
            "not a key",
            p384,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\n",
        ] {
            let e = DpopKey::from_pem(bad).unwrap_err();
            assert!(!e.contains("MIG2"), "{e}");
        }
    }

    #[test]
    fn recognises_nonce_challenges() {
        assert!(asks_for_nonce(
            br#"DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof""#
        ));
        assert!(asks_for_nonce(
            br#"Bearer realm="x", DPoP algs="ES256", error="use_dpop_nonce""#
        ));
        assert!(asks_for_nonce(
            br#"DPoP error_description="needs a nonce, \"now\"", error="use_dpop_nonce""#
        ));
        assert!(asks_for_nonce(br#"dpop error=use_dpop_nonce"#));
        assert!(!asks_for_nonce(br#"DPoP error="invalid_token""#));
        assert!(!asks_for_nonce(br#"Bearer error="use_dpop_nonce""#));
        assert!(!asks_for_nonce(
            br#"DPoP algs="ES256", Bearer error="use_dpop_nonce""#
        ));
        assert!(!asks_for_nonce(
            br#"Bearer error_description="DPoP, error=use_dpop_nonce""#
        ));
        assert!(body_asks_for_nonce(br#"{"error":"use_dpop_nonce"}"#));
        assert!(!body_asks_for_nonce(br#"{"error":"invalid_dpop_proof"}"#));
        assert!(!body_asks_for_nonce(b"<html>"));
    }
}
