//! Client certificates for mutual TLS (RFC 8705): loading and checking a certificate chain and
//! its private key, and following their files when they are rotated, without a restart.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::secret::{Secret, SecretSource};

/// Where a client certificate and its key come from, with the config keys that named them so
/// that every later error (at start, in `check`, on rotation) names the key and not the content.
#[derive(Clone)]
pub struct ClientCertSource {
    pub cert: SecretSource,
    pub key: SecretSource,
    /// Full config key of the certificate, e.g. `credentials.bank.tls_client_cert`.
    pub cert_key: String,
    /// Full config key of the private key, e.g. `routes[0].tls_client_key`.
    pub key_key: String,
}

impl fmt::Debug for ClientCertSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCertSource")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

impl PartialEq for ClientCertSource {
    fn eq(&self, other: &Self) -> bool {
        same_source(&self.cert, &other.cert) && same_source(&self.key, &other.key)
    }
}

fn same_source(a: &SecretSource, b: &SecretSource) -> bool {
    match (a, b) {
        (SecretSource::Literal(x), SecretSource::Literal(y)) => x == y,
        (SecretSource::File(x), SecretSource::File(y)) => x == y,
        (SecretSource::Env(x), SecretSource::Env(y)) => x == y,
        _ => false,
    }
}

/// Which of the two keys a problem belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Cert,
    Key,
}

/// A parsed, consistent certificate chain (leaf first) and private key.
pub struct ClientIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The PEM text both came from, for reqwest, which takes PEM.
    pem: Secret,
    /// SHA-256 of the leaf certificate (RFC 8705 §3.1 `x5t#S256`): names it in logs.
    pub thumbprint: [u8; 32],
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientIdentity(sha256 {})", self.thumbprint_hex())
    }
}

impl ClientCertSource {
    /// Whether nothing is read from a file or the environment: then the config loader can check
    /// the pair at once.
    pub fn is_literal(&self) -> bool {
        matches!(self.cert, SecretSource::Literal(_))
            && matches!(self.key, SecretSource::Literal(_))
    }

    /// Reads and checks both; the error names the config key (and path), never the content.
    pub fn load(&self) -> Result<ClientIdentity, String> {
        let cert = read(&self.cert).map_err(|e| format!("`{}`: {e}", self.cert_key))?;
        let key = read(&self.key).map_err(|e| format!("`{}`: {e}", self.key_key))?;
        parse_identity(cert.expose(), key.expose()).map_err(|(part, reason)| {
            let (k, source) = match part {
                Part::Cert => (&self.cert_key, &self.cert),
                Part::Key => (&self.key_key, &self.key),
            };
            match source.file() {
                Some(path) => format!("`{k}` ({}): {reason}", path.display()),
                None => format!("`{k}`: {reason}"),
            }
        })
    }

    fn version(&self) -> (FileVersion, FileVersion) {
        (version(&self.cert), version(&self.key))
    }
}

fn read(source: &SecretSource) -> Result<Secret, String> {
    source.resolve().map_err(|e| e.to_string())
}

/// Parses a PEM certificate chain (leaf first) and a PEM private key, and checks that they
/// belong together and that every certificate is one the TLS stacks can use.
pub fn parse_identity(cert_pem: &str, key_pem: &str) -> Result<ClientIdentity, (Part, String)> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| (Part::Cert, format!("is not valid PEM ({})", pem_error(&e))))?;
    if chain.is_empty() {
        return Err((
            Part::Cert,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    // pingora parses each certificate of the chain and panics on one it cannot read: every one
    // is parsed here first.
    for (i, der) in chain.iter().enumerate() {
        let mut store = rustls::RootCertStore::empty();
        if store.add(der.clone()).is_err() {
            return Err((
                Part::Cert,
                format!(
                    "certificate {} of the chain is not a valid X.509 certificate",
                    i + 1
                ),
            ));
        }
    }
    // Errors about the key never echo the parser's message: it could quote key material.
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| {
        (
            Part::Key,
            "holds no usable PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC)".to_string(),
        )
    })?;
    // pingora reads the key back from bare DER by guessing its format; make sure it can.
    if PrivateKeyDer::try_from(key.secret_der().to_vec()).is_err() {
        return Err((
            Part::Key,
            "is a private key in a form the upstream TLS client cannot use".into(),
        ));
    }
    let provider = rustls::crypto::ring::default_provider();
    match rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider) {
        Ok(_) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err((
                Part::Key,
                "does not match the certificate (its public key is not the certificate's)".into(),
            ));
        }
        Err(rustls::Error::InvalidCertificate(_)) => {
            return Err((Part::Cert, "the leaf certificate cannot be parsed".into()));
        }
        Err(_) => {
            return Err((
                Part::Key,
                "is not a private key of a supported type (RSA, ECDSA P-256/P-384, Ed25519)".into(),
            ));
        }
    }
    let thumbprint: [u8; 32] = Sha256::digest(chain[0].as_ref()).into();
    let pem = Secret::new(format!("{}\n{}\n", cert_pem.trim_end(), key_pem.trim_end()));
    Ok(ClientIdentity {
        chain,
        key,
        pem,
        thumbprint,
    })
}

fn pem_error(e: &rustls_pki_types::pem::Error) -> &'static str {
    use rustls_pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { .. } => "a section has no END line",
        Error::IllegalSectionStart { .. } => "a BEGIN line is malformed",
        Error::Base64Decode(_) => "a section is not base64",
        _ => "unreadable",
    }
}

/// Lower-case hex of a SHA-256, as certificates' thumbprints are shown.
pub fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl ClientIdentity {
    pub fn thumbprint_hex(&self) -> String {
        hex(&self.thumbprint)
    }

    /// The certificate and key as reqwest takes them (PEM, key and chain together).
    pub fn reqwest_identity(&self) -> Result<reqwest::Identity, String> {
        reqwest::Identity::from_pem(self.pem.expose().as_bytes())
            .map_err(|_| "the client certificate and key cannot be used by the HTTP client".into())
    }

    /// The certificate and key as pingora takes them.
    pub fn cert_key(&self) -> pingora::utils::tls::CertKey {
        pingora::utils::tls::CertKey::new(
            self.chain.iter().map(|c| c.to_vec()).collect(),
            self.key.secret_der().to_vec(),
        )
    }

    /// A connection-pool key for this exact chain. pingora tells pooled connections apart by
    /// the certificates' serial numbers only, which two certificates (two CAs, two self-signed
    /// certificates, a renewal that keeps the serial) can share.
    pub fn pool_key(&self) -> u64 {
        digest64(self.chain.iter().map(|c| c.as_ref()))
    }
}

/// The first 64 bits of a SHA-256 over `parts`, each length-prefixed so no two lists of parts
/// hash alike: a connection-pool key for certificates (pingora's pool keys are `u64`).
pub fn digest64<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().unwrap_or_default())
}

/// What identifies one version of a file: a replaced file (new inode, as Kubernetes' and
/// cert-manager's symlink swaps do) or a rewritten one (mtime, size). Literal and environment
/// sources never change while the process runs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileVersion(Option<(u64, u64, SystemTime)>);

fn version(source: &SecretSource) -> FileVersion {
    use std::os::unix::fs::MetadataExt;
    let Some(path): Option<&PathBuf> = source.file() else {
        return FileVersion(None);
    };
    FileVersion(std::fs::metadata(path).ok().map(|m| {
        (
            m.ino(),
            m.len(),
            m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        )
    }))
}

type Build<T> = Box<dyn Fn(&ClientIdentity) -> Result<T, String> + Send + Sync>;

/// Something built from a client certificate (an HTTP client, a pingora `CertKey`) that is
/// built again when the certificate or key file changes. Files are looked at (a `stat` each, no
/// read) at most once per `min_interval`, on use; a change that does not load (a half-written
/// pair, a key that does not match yet) keeps the previous version and is tried again. The
/// version before the last change is kept too: a token bound to the old certificate (RFC 8705
/// §3) goes out on a connection that presents it until a token bound to the new one is held.
pub struct Rotating<T> {
    source: ClientCertSource,
    build: Build<T>,
    current: ArcSwap<Built<T>>,
    previous: ArcSwapOption<Built<T>>,
    seen: Mutex<Seen>,
    min_interval: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` before which files are not looked at again.
    next_check: AtomicU64,
}

/// One version built from one certificate, with the SHA-256 of its leaf.
struct Built<T> {
    value: Arc<T>,
    thumbprint: [u8; 32],
}

struct Seen {
    loaded: (FileVersion, FileVersion),
    /// The last version that failed to load, so that its warning is logged once.
    failed: Option<(FileVersion, FileVersion)>,
}

impl<T> Rotating<T> {
    pub fn new(
        source: ClientCertSource,
        min_interval: Duration,
        build: impl Fn(&ClientIdentity) -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let loaded = source.version();
        let identity = source.load()?;
        let first = build(&identity)?;
        Ok(Rotating {
            source,
            build: Box::new(build),
            current: ArcSwap::from_pointee(Built {
                value: Arc::new(first),
                thumbprint: identity.thumbprint,
            }),
            previous: ArcSwapOption::empty(),
            seen: Mutex::new(Seen {
                loaded,
                failed: None,
            }),
            min_interval,
            epoch: Instant::now(),
            next_check: AtomicU64::new(0),
        })
    }

    /// The current version, after looking at the files if they are due.
    pub fn current(&self) -> Arc<T> {
        if self.due() {
            self.check();
        }
        self.current.load().value.clone()
    }

    /// SHA-256 of the current leaf certificate, after looking at the files if they are due.
    pub fn thumbprint(&self) -> [u8; 32] {
        if self.due() {
            self.check();
        }
        self.current.load().thumbprint
    }

    /// The version built from the certificate of SHA-256 `thumbprint` (a token's binding): the
    /// current one, or the one before it. A certificate not seen yet makes the files be looked
    /// at now (a token obtained with a new certificate can arrive before this looks on its
    /// own). `None` when neither is that certificate.
    pub fn matching(&self, thumbprint: &[u8; 32]) -> Option<Arc<T>> {
        let pick = |rotating: &Self| {
            let current = rotating.current.load();
            if current.thumbprint == *thumbprint {
                return Some(current.value.clone());
            }
            let previous = rotating.previous.load();
            previous
                .as_ref()
                .filter(|p| p.thumbprint == *thumbprint)
                .map(|p| p.value.clone())
        };
        pick(self).or_else(|| {
            self.check();
            pick(self)
        })
    }

    /// SHA-256 of the leaf certificate in use, for logs.
    pub fn thumbprint_hex(&self) -> String {
        hex(&self.current.load().thumbprint)
    }

    fn due(&self) -> bool {
        if self.min_interval.is_zero() {
            return true;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let next = self.next_check.load(Ordering::Relaxed);
        // One caller per interval wins the exchange and looks; the others go on at once.
        now >= next
            && self
                .next_check
                .compare_exchange(
                    next,
                    now + self.min_interval.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    fn check(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.source.version();
        if now == seen.loaded {
            return;
        }
        let built = self
            .source
            .load()
            .and_then(|id| (self.build)(&id).map(|t| (t, id.thumbprint)));
        match built {
            Ok((t, thumbprint)) => {
                let before = self.current.swap(Arc::new(Built {
                    value: Arc::new(t),
                    thumbprint,
                }));
                if before.thumbprint != thumbprint {
                    self.previous.store(Some(before));
                }
                seen.loaded = now;
                seen.failed = None;
                tracing::info!(
                    certificate = %self.source.cert_key,
                    sha256 = %self.thumbprint_hex(),
                    "client certificate changed; new connections present the new one"
                );
            }
            Err(reason) => {
                if seen.failed.as_ref() != Some(&now) {
                    tracing::warn!(
                        error = %reason,
                        "client certificate files changed but do not load; the previous certificate stays in use until they do"
                    );
                    seen.failed = Some(now);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn source(dir: &std::path::Path, cert: &str, key: &str) -> ClientCertSource {
        std::fs::write(dir.join("c.pem"), cert).unwrap();
        std::fs::write(dir.join("k.pem"), key).unwrap();
        ClientCertSource {
            cert: SecretSource::File(dir.join("c.pem")),
            key: SecretSource::File(dir.join("k.pem")),
            cert_key: "routes[0].tls_client_cert".into(),
            key_key: "routes[0].tls_client_key".into(),
        }
    }

    #[test]
    fn parses_a_matching_pair_and_names_what_is_wrong_otherwise() {
        let (cert_a, key_a) = pair("a");
        let (_, key_b) = pair("b");
        let id = parse_identity(&cert_a, &key_a).unwrap();
        assert_eq!(id.thumbprint_hex().len(), 64);
        assert!(!format!("{id:?}").contains("PRIVATE"));
        let (part, reason) = parse_identity(&cert_a, &key_b).unwrap_err();
        assert_eq!(part, Part::Key);
        assert!(reason.contains("does not match"), "{reason}");
        assert_eq!(parse_identity(&key_a, &key_a).unwrap_err().0, Part::Cert);
        assert_eq!(parse_identity("garbage", &key_a).unwrap_err().0, Part::Cert);
        let broken = cert_a.replace("-----END CERTIFICATE-----", "");
        assert_eq!(parse_identity(&broken, &key_a).unwrap_err().0, Part::Cert);
        let (part, reason) = parse_identity(&cert_a, &cert_a).unwrap_err();
        assert_eq!(part, Part::Key);
        assert!(!reason.contains("BEGIN"), "{reason}");
        let bad_der = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(parse_identity(bad_der, &key_a).unwrap_err().0, Part::Cert);
    }

    #[test]
    fn load_errors_name_the_key_and_path_never_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = pair("a");
        let (_, key_b) = pair("b");
        let s = source(dir.path(), &cert_a, &key_b);
        let e = s.load().unwrap_err();
        assert!(e.contains("routes[0].tls_client_key"), "{e}");
        assert!(e.contains("k.pem"), "{e}");
        assert!(!e.contains(key_b.lines().nth(1).unwrap()), "{e}");
        std::fs::remove_file(dir.path().join("c.pem")).unwrap();
        let e = s.load().unwrap_err();
        assert!(
            e.contains("routes[0].tls_client_cert") && e.contains("c.pem"),
            "{e}"
        );
        let _ = key_a;
    }

    #[test]
    fn a_pool_key_tells_apart_chains_that_share_a_serial() {
        let mk = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
            p.serial_number = Some(rcgen::SerialNumber::from(vec![1u8]));
            let cert = p.self_signed(&key).unwrap();
            parse_identity(&cert.pem(), &key.serialize_pem()).unwrap()
        };
        let (a, b) = (mk("a"), mk("b"));
        assert_eq!(a.cert_key().serial(), b.cert_key().serial());
        assert_ne!(a.pool_key(), b.pool_key());
    }

    #[test]
    fn rotation_follows_the_files_and_keeps_the_old_pair_while_the_new_one_is_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = pair("a");
        let (cert_b, key_b) = pair("b");
        let s = source(dir.path(), &cert_a, &key_a);
        let r = Rotating::new(s, Duration::ZERO, |id| Ok(id.thumbprint)).unwrap();
        let a = *r.current();
        // The certificate is replaced before the key: the mismatched pair is not used.
        let tmp = dir.path().join("tmp");
        std::fs::write(&tmp, &cert_b).unwrap();
        std::fs::rename(&tmp, dir.path().join("c.pem")).unwrap();
        assert_eq!(*r.current(), a);
        std::fs::write(&tmp, &key_b).unwrap();
        std::fs::rename(&tmp, dir.path().join("k.pem")).unwrap();
        let b = *r.current();
        assert_ne!(a, b);
        assert_eq!(b, parse_identity(&cert_b, &key_b).unwrap().thumbprint);
    }

    #[test]
    fn files_are_looked_at_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = pair("a");
        let (cert_b, key_b) = pair("b");
        let s = source(dir.path(), &cert_a, &key_a);
        let r = Rotating::new(s, Duration::from_secs(3600), |id| Ok(id.thumbprint)).unwrap();
        let a = *r.current();
        source(dir.path(), &cert_b, &key_b);
        // Within the interval the change is not seen yet.
        assert_eq!(*r.current(), a);
    }

    #[test]
    fn the_pair_before_a_rotation_stays_at_hand_for_its_bound_token() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = pair("a");
        let (cert_b, key_b) = pair("b");
        let s = source(dir.path(), &cert_a, &key_a);
        let r = Rotating::new(s, Duration::from_secs(3600), |id| Ok(id.thumbprint)).unwrap();
        let a = r.thumbprint();
        let b = parse_identity(&cert_b, &key_b).unwrap().thumbprint;
        assert_eq!(r.matching(&a).as_deref(), Some(&a));
        assert_eq!(r.matching(&b), None);
        source(dir.path(), &cert_b, &key_b);
        // A token bound to the new certificate makes the files be looked at before the
        // interval is up; the old pair stays available to the token bound to it.
        assert_eq!(r.matching(&b).as_deref(), Some(&b));
        assert_eq!(r.matching(&a).as_deref(), Some(&a));
        assert_eq!(*r.current(), b);
        assert_eq!(r.matching(&[7; 32]), None);
    }
}
