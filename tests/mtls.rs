//! Mutual TLS (RFC 8705): a token endpoint and an upstream that demand a client certificate
//! (TLS servers started here with CAs made here), pooled upstream connections kept apart by
//! certificate and by CA bundle, certificate rotation under load, a subject JWKS fetched without
//! the token endpoint's certificate, and the warning about private key files others can read.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use sha2::{Digest, Sha256};

const MTLS_CLIENT_ID: &str = "tw-mtls-client";
const EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn sha256(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// SHA-256 of a connection's client certificate (zeros without one).
fn cert_of(chain: &[CertificateDer<'static>]) -> [u8; 32] {
    chain.first().map(|c| sha256(c)).unwrap_or_default()
}

fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A certificate authority made for one test.
struct Ca {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

/// A certificate and its key, as PEM, with the SHA-256 of the certificate.
#[derive(Clone)]
struct Leaf {
    cert_pem: String,
    key_pem: String,
    sha: [u8; 32],
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { key, cert }
    }

    /// A leaf for `name`; `serial` fixes its serial number (pingora's pool tells client
    /// certificates apart by serial only).
    fn issue(&self, name: &str, serial: Option<u8>) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        if let Some(s) = serial {
            params.serial_number = Some(rcgen::SerialNumber::from(vec![s]));
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            sha: sha256(cert.der()),
        }
    }

    fn roots(&self) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        Arc::new(roots)
    }

    fn write(&self, path: &Path) {
        std::fs::write(path, self.cert.pem()).unwrap();
    }
}

fn self_signed(name: &str) -> Leaf {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        sha: sha256(cert.der()),
    }
}

impl Leaf {
    /// Writes the pair as `NAME.crt` and `NAME.key`, each by rename, as Kubernetes and
    /// cert-manager replace files.
    fn install(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        for (path, body) in [(&key, &self.key_pem), (&cert, &self.cert_pem)] {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, body).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        (cert, key)
    }

    /// Lines of the private key's PEM body: none may appear anywhere tokenward writes.
    fn key_material(&self) -> Vec<String> {
        self.key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::to_string)
            .collect()
    }
}

/// Which client certificates a test server accepts. It can change while the server runs: the
/// handshake and every request check the current rule, so a connection made with a
/// certificate no longer accepted gets no more answers.
enum Trust {
    /// Signed by this CA (rustls' WebPKI client verifier).
    Ca(Arc<dyn ClientCertVerifier>),
    /// RFC 8705 §2.2: exactly these (self-signed) certificates, by SHA-256.
    Pinned(Vec<[u8; 32]>),
    /// Asks for a certificate but does not require one: shows whether a client offers one.
    Optional,
}

impl Trust {
    fn ca(ca: &Ca) -> Self {
        Trust::Ca(
            rustls::server::WebPkiClientVerifier::builder_with_provider(ca.roots(), provider())
                .build()
                .unwrap(),
        )
    }

    fn accepts(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some(leaf) = chain.first() else {
            return matches!(self, Trust::Optional);
        };
        match self {
            Trust::Ca(v) => v
                .verify_client_cert(leaf, &chain[1..], UnixTime::now())
                .is_ok(),
            Trust::Pinned(pins) => pins.contains(&sha256(leaf)),
            Trust::Optional => true,
        }
    }
}

#[derive(Debug)]
struct Policy {
    trust: Arc<Mutex<Trust>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Trust")
    }
}

impl ClientCertVerifier for Policy {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        !matches!(*self.trust.lock().unwrap(), Trust::Optional)
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match &*self.trust.lock().unwrap() {
            Trust::Ca(v) => v.verify_client_cert(end_entity, intermediates, now),
            Trust::Pinned(pins) if pins.contains(&sha256(end_entity)) => {
                Ok(ClientCertVerified::assertion())
            }
            Trust::Pinned(_) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
            Trust::Optional => Ok(ClientCertVerified::assertion()),
        }
    }

    // Possession of the key is proved by the handshake signature, checked for real.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// One request a test server answered.
#[derive(Clone, Debug)]
struct Hit {
    conn: usize,
    cert: [u8; 32],
    path: String,
    status: u16,
    form: Vec<(String, String)>,
    authorization: Option<String>,
    /// The access token a token endpoint issued.
    issued: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// An OAuth 2.0 token endpoint for RFC 8705 client authentication at `/token`.
    TokenEndpoint,
    /// An API that needs a bearer token on an mTLS connection.
    Upstream,
    /// An API that also checks the token's binding to the certificate (RFC 8705 §3): the
    /// connection's certificate must be the one the token was issued to.
    BoundUpstream,
    /// A subject issuer's JWKS: this document, to anyone.
    Jwks(&'static str),
}

/// A TLS server (HTTP/1.1 and HTTP/2) for `localhost` that requires a client certificate.
struct MtlsServer {
    addr: SocketAddr,
    trust: Arc<Mutex<Trust>>,
    hits: Arc<Mutex<Vec<Hit>>>,
    handshakes_refused: Arc<AtomicUsize>,
}

impl MtlsServer {
    async fn start(role: Role, server_ca: &Ca, trust: Trust) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server_cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&server_key, &server_ca.cert, &server_ca.key)
            .unwrap();
        let trust = Arc::new(Mutex::new(trust));
        let verifier = Arc::new(Policy {
            trust: trust.clone(),
            provider: provider(),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![server_cert.der().clone()],
                PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let refused = Arc::new(AtomicUsize::new(0));
        let (t, h, r) = (trust.clone(), hits.clone(), refused.clone());
        tokio::spawn(async move {
            let conns = Arc::new(AtomicUsize::new(0));
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, trust, hits, refused) =
                    (acceptor.clone(), t.clone(), h.clone(), r.clone());
                let conn = conns.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(_) => {
                            refused.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    };
                    let chain: Vec<CertificateDer<'static>> = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .unwrap_or_default()
                        .to_vec();
                    let service = hyper::service::service_fn(move |req| {
                        let (trust, hits, chain) = (trust.clone(), hits.clone(), chain.clone());
                        async move {
                            Ok::<_, Infallible>(
                                handle(role, conn, &chain, &trust, &hits, req).await,
                            )
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        MtlsServer {
            addr,
            trust,
            hits,
            handshakes_refused: refused,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    fn trust(&self, trust: Trust) {
        *self.trust.lock().unwrap() = trust;
    }
}

async fn handle(
    role: Role,
    conn: usize,
    chain: &[CertificateDer<'static>],
    trust: &Mutex<Trust>,
    hits: &Mutex<Vec<Hit>>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<String> {
    let path = req.uri().path().to_string();
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = axum::body::to_bytes(axum::body::Body::new(req.into_body()), 1 << 20)
        .await
        .unwrap_or_default();
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    // The certificate this connection was made with must still be accepted.
    let accepted = trust.lock().unwrap().accepts(chain);
    let mut issued = None;
    let (status, answer) = match role {
        Role::TokenEndpoint if !accepted => (401, r#"{"error":"invalid_client"}"#.to_string()),
        Role::TokenEndpoint => {
            if path != "/token"
                || !matches!(
                    field("grant_type"),
                    Some("client_credentials" | EXCHANGE_GRANT)
                )
                || field("client_id") != Some(MTLS_CLIENT_ID)
                || field("client_secret").is_some()
                || field("client_assertion").is_some()
                || authorization.is_some()
            {
                (400, r#"{"error":"invalid_request"}"#.to_string())
            } else {
                // Bound to the certificate (as `cnf.x5t#S256` would bind a JWT): its SHA-256
                // is part of the token.
                let token = format!("mtls-at-{}-{}", hex(&cert_of(chain)), rand_hex());
                issued = Some(token.clone());
                (
                    200,
                    serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": 300})
                        .to_string(),
                )
            }
        }
        Role::Upstream | Role::BoundUpstream if !accepted => (403, "{}".to_string()),
        Role::BoundUpstream
            if !authorization
                .as_deref()
                .unwrap_or("")
                .starts_with(&format!("Bearer mtls-at-{}-", hex(&cert_of(chain)))) =>
        {
            (401, r#"{"error":"invalid_token"}"#.to_string())
        }
        Role::Upstream | Role::BoundUpstream
            if !authorization
                .as_deref()
                .unwrap_or("")
                .starts_with("Bearer ") =>
        {
            (401, "{}".to_string())
        }
        Role::Upstream | Role::BoundUpstream => (200, format!("{{\"path\":{path:?}}}")),
        Role::Jwks(document) => (200, document.to_string()),
    };
    hits.lock().unwrap().push(Hit {
        conn,
        cert: cert_of(chain),
        path,
        status,
        form,
        authorization,
        issued,
    });
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(answer)
        .unwrap()
}

/// A reqwest client that trusts `server_ca`, presenting `leaf` if given.
fn probe(server_ca: &Ca, leaf: Option<&Leaf>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(server_ca.cert.pem().as_bytes()).unwrap(),
        )
        .no_proxy();
    if let Some(l) = leaf {
        b = b.identity(
            reqwest::Identity::from_pem(format!("{}{}", l.cert_pem, l.key_pem).as_bytes()).unwrap(),
        );
    }
    b.build().unwrap()
}

/// tokenward's config: `routes` and the credential `api` as TOML lines.
fn write_config(dir: &Path, admin: SocketAddr, routes: &str, credential: &str) -> PathBuf {
    let path = dir.join("tokenward.toml");
    let body = format!(
        "[log]\nformat = \"json\"\nlevel = \"debug\"\n[admin]\nlisten = \"{admin}\"\n[state]\ndir = \"{}\"\n\
         [server]\nthreads = 2\ngrace_period = \"2s\"\n{routes}\n[credentials.api]\n{credential}\n",
        dir.join("state").display()
    );
    std::fs::write(&path, body).unwrap();
    path
}

/// One route named `api` on `proxy` to the plain-HTTP `upstream`, with the credential `api`.
fn api_route(proxy: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        "[[routes]]\nname = \"api\"\nlisten = \"{proxy}\"\nupstream = \"http://{upstream}\"\ncredential = \"api\"\n"
    )
}

fn mtls_credential(token_url: &str, auth: &str, cert: &Path, key: &Path, ca: &Path) -> String {
    format!(
        "dialect = \"oauth2\"\ntoken_url = \"{token_url}\"\nclient_auth = \"{auth}\"\nclient_id = \"{MTLS_CLIENT_ID}\"\n\
         tls_client_cert = {{ file = \"{}\" }}\ntls_client_key = {{ file = \"{}\" }}\nca_file = \"{}\"\n\
         min_refresh_interval = \"1s\"\n",
        cert.display(),
        key.display(),
        ca.display()
    )
}

/// Clients sending GETs to `url/W/I` in a loop, each request `every` after the last answer,
/// bounded in count and time, recording every answer that is not a 200.
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    sent: Arc<AtomicUsize>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: &str, clients: usize, max_each: usize, every: Duration) -> Load {
        let (stop, failures, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::<Mutex<Vec<String>>>::default(),
            Arc::new(AtomicUsize::new(0)),
        );
        let workers = (0..clients)
            .map(|w| {
                let (stop, failures, sent, url) = (
                    stop.clone(),
                    failures.clone(),
                    sent.clone(),
                    url.to_string(),
                );
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    let deadline = Instant::now() + Duration::from_secs(40);
                    for i in 0..max_each {
                        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                            break;
                        }
                        let failure = match client.get(format!("{url}/{w}/{i}")).send().await {
                            Ok(r) if r.status() == 200 => None,
                            Ok(r) => Some(format!("HTTP {}", r.status())),
                            Err(e) => Some(e.to_string()),
                        };
                        failures.lock().unwrap().extend(failure);
                        sent.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(every).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            failures,
            sent,
            workers,
        }
    }

    fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Stops the clients and returns the failures they met.
    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.workers {
            w.await.unwrap();
        }
        self.failures.lock().unwrap().clone()
    }
}

fn check(config: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(bin())
        .arg("check")
        .args(extra)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Asks for a new token now, past the forced-refresh rate limit (bounded).
async fn force_refresh(tw: &Tokenward) -> reqwest::StatusCode {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client
            .post(tw.admin_url("/tokens/api/refresh"))
            .send()
            .await
            .unwrap();
        if r.status() != 429 || Instant::now() > deadline {
            return r.status();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_client_auth_presents_the_certificate_to_the_token_endpoint_only() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca, other_ca) =
        (Ca::new("servers"), Ca::new("clients"), Ca::new("rogue"));
    server_ca.write(&dir.path().join("server-ca.pem"));
    let idp = MtlsServer::start(Role::TokenEndpoint, &server_ca, Trust::ca(&client_ca)).await;
    let leaf = client_ca.issue("tokenward", None);
    let (cert, key) = leaf.install(dir.path(), "client");

    // The fake enforces the mechanism: no certificate, or one from another CA, fails the
    // handshake, and nothing reaches its token endpoint.
    for l in [None, Some(&other_ca.issue("rogue", None))] {
        let r = probe(&server_ca, l).post(idp.url("/token")).send().await;
        assert!(
            r.is_err(),
            "the token endpoint must refuse this client: {r:?}"
        );
    }
    assert!(idp.hits().is_empty());
    assert!(idp.handshakes_refused.load(Ordering::SeqCst) >= 2);

    // The upstream asks every client for a certificate without requiring one.
    let upstream = MtlsServer::start(Role::Upstream, &server_ca, Trust::Optional).await;
    let (proxy, admin) = (free_port(), free_port());
    let routes = format!(
        "[[routes]]\nname = \"api\"\nlisten = \"{proxy}\"\nupstream = \"{}\"\ncredential = \"api\"\nca_file = \"{}\"\n",
        upstream.url(""),
        dir.path().join("server-ca.pem").display()
    );
    let credential = mtls_credential(
        &idp.url("/token"),
        "tls_client_auth",
        &cert,
        &key,
        &dir.path().join("server-ca.pem"),
    );
    let config = write_config(dir.path(), admin, &routes, &credential);

    let (code, out) = check(&config, &[]);
    assert_eq!(code, Some(0), "{out}");
    let hex: String = leaf.sha.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        out.contains(&hex),
        "check names the certificate by its SHA-256: {out}"
    );

    let tw = Tokenward::start_with(tempfile::tempdir().unwrap(), config, proxy, admin);
    tw.wait_ready().await;
    let r = reqwest::get(tw.url("/orders")).await.unwrap();
    assert_eq!(r.status(), 200, "{}", tw.logs());

    let hits = idp.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0].status, 200);
    assert_eq!(
        hits[0].cert, leaf.sha,
        "the token request came on the client certificate"
    );
    assert_eq!(
        hits[0]
            .form
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>(),
        ["grant_type", "client_id"],
        "client_id in the body and no secret"
    );
    let seen = upstream.hits();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].authorization,
        Some(format!("Bearer {}", hits[0].issued.as_deref().unwrap()))
    );
    assert_eq!(
        seen[0].cert, [0; 32],
        "the upstream asked, but the credential's certificate is for its token endpoint only"
    );

    let mut secrets = leaf.key_material();
    secrets.push(leaf.key_pem.clone());
    tw.assert_no_leaks(&secrets).await;
    for s in &secrets {
        assert!(
            !out.contains(s.as_str()),
            "check printed key material: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn self_signed_tls_client_auth_is_accepted_by_its_pinned_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("servers");
    server_ca.write(&dir.path().join("server-ca.pem"));
    let leaf = self_signed("tokenward");
    let idp = MtlsServer::start(
        Role::TokenEndpoint,
        &server_ca,
        Trust::Pinned(vec![leaf.sha]),
    )
    .await;
    // Another self-signed certificate is refused by the pin.
    let r = probe(&server_ca, Some(&self_signed("tokenward")))
        .post(idp.url("/token"))
        .send()
        .await;
    assert!(r.is_err(), "{r:?}");

    let (cert, key) = leaf.install(dir.path(), "client");
    let upstream = FakeUpstream::start().await;
    let (proxy, admin) = (free_port(), free_port());
    let routes = api_route(proxy, upstream.addr());
    let credential = mtls_credential(
        &idp.url("/token"),
        "self_signed_tls_client_auth",
        &cert,
        &key,
        &dir.path().join("server-ca.pem"),
    );
    let config = write_config(dir.path(), admin, &routes, &credential);
    let tw = Tokenward::start_with(tempfile::tempdir().unwrap(), config, proxy, admin);
    tw.wait_ready().await;
    let r = reqwest::get(tw.url("/x")).await.unwrap();
    assert_eq!(r.status(), 200, "{}", tw.logs());
    let hits = idp.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!((hits[0].status, hits[0].cert), (200, leaf.sha));
    tw.assert_no_leaks(&leaf.key_material()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_names_the_key_and_path_of_a_bad_certificate_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("clients");
    ca.write(&dir.path().join("ca.pem"));
    let (a, b) = (ca.issue("a", None), ca.issue("b", None));
    let (cert, _) = a.install(dir.path(), "a");
    let (_, other_key) = b.install(dir.path(), "b");
    let (proxy, admin) = (free_port(), free_port());
    let routes = format!(
        "[[routes]]\nname = \"api\"\nlisten = \"{proxy}\"\nupstream = \"https://localhost:1\"\ncredential = \"api\"\n\
         tls_client_cert = {{ file = \"{}\" }}\ntls_client_key = {{ file = \"{}\" }}\n",
        cert.display(),
        other_key.display()
    );
    let credential = mtls_credential(
        "https://localhost:1/token",
        "tls_client_auth",
        &cert,
        &dir.path().join("missing.key"),
        &dir.path().join("ca.pem"),
    );
    let config = write_config(dir.path(), admin, &routes, &credential);
    let (code, out) = check(&config, &[]);
    assert_ne!(code, Some(0), "{out}");
    assert!(
        out.contains("`credentials.api.tls_client_key`") && out.contains("missing.key"),
        "{out}"
    );
    assert!(
        out.contains("`routes[0].tls_client_key`")
            && out.contains("b.key")
            && out.contains("does not match"),
        "{out}"
    );
    for s in a.key_material().iter().chain(b.key_material().iter()) {
        assert!(
            !out.contains(s.as_str()),
            "check printed key material: {out}"
        );
    }
    // Files are not read with --skip-secrets (CI without the mounted secrets).
    let (code, out) = check(&config, &["--skip-secrets"]);
    assert_eq!(code, Some(0), "{out}");
    // At start the same problem stops tokenward with the same message.
    let mut tw = Tokenward::start_with(tempfile::tempdir().unwrap(), config, proxy, admin);
    assert_ne!(
        tokio::task::block_in_place(|| tw.wait_exit(Duration::from_secs(10))),
        Some(0)
    );
    let logs = tw.logs();
    assert!(logs.contains("credentials.api.tls_client_key"), "{logs}");
    for s in a.key_material().iter().chain(b.key_material().iter()) {
        assert!(!logs.contains(s.as_str()), "{logs}");
    }
}

/// Two routes to one mTLS upstream address, one with certificate A and one with B: keep-alive
/// requests interleaved between them each arrive on their own route's certificate. A and B have
/// the same serial number, which is all pingora's own pool key looks at.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pooled_upstream_connections_never_carry_another_routes_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca) = (Ca::new("servers"), Ca::new("clients"));
    let server_ca_path = dir.path().join("server-ca.pem");
    server_ca.write(&server_ca_path);
    let upstream = MtlsServer::start(Role::Upstream, &server_ca, Trust::ca(&client_ca)).await;
    let (a, b) = (
        client_ca.issue("route-a", Some(7)),
        client_ca.issue("route-b", Some(7)),
    );
    assert_ne!(a.sha, b.sha);
    let (a_cert, a_key) = a.install(dir.path(), "a");
    let (b_cert, b_key) = b.install(dir.path(), "b");

    let idp = FakeProvider::start(300, false, None).await;
    let (proxy, admin) = (free_port(), free_port());
    let route = |name: &str, cert: &Path, key: &Path| {
        format!(
            "[[routes]]\nname = \"{name}\"\nlisten = \"{proxy}\"\npath_prefix = \"/{name}\"\nupstream = \"{}\"\n\
             credential = \"api\"\nca_file = \"{}\"\nhttp2 = false\n\
             tls_client_cert = {{ file = \"{}\" }}\ntls_client_key = {{ file = \"{}\" }}\n",
            upstream.url(""),
            server_ca_path.display(),
            cert.display(),
            key.display()
        )
    };
    let routes = format!(
        "{}{}",
        route("a", &a_cert, &a_key),
        route("b", &b_cert, &b_key)
    );
    let config = write_config(dir.path(), admin, &routes, &oauth2_keys(&idp, ""));
    let tw = Tokenward::start_with(tempfile::tempdir().unwrap(), config, proxy, admin);
    tw.wait_ready().await;

    let client = reqwest::Client::new();
    for i in 0..30 {
        let name = if i % 2 == 0 { "a" } else { "b" };
        let r = client
            .get(tw.url(&format!("/{name}/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", tw.logs());
    }
    let hits = upstream.hits();
    assert_eq!(hits.len(), 30);
    for h in &hits {
        let want = if h.path.starts_with("/a/") {
            a.sha
        } else {
            b.sha
        };
        assert_eq!(
            h.cert, want,
            "{} arrived on the other route's certificate",
            h.path
        );
        assert!(h.authorization.is_some());
    }
    // The pool is in use (else this test would prove nothing): far fewer connections than
    // requests, and each connection only ever carried one route's requests.
    let conns: std::collections::BTreeMap<usize, [u8; 32]> =
        hits.iter().map(|h| (h.conn, h.cert)).collect();
    assert!(
        conns.len() <= 6,
        "keep-alive was not used: {} connections",
        conns.len()
    );
    for h in &hits {
        assert_eq!(conns[&h.conn], h.cert);
    }
    // With `http2 = false` these TLS routes take the fast path (the default), so its pool is
    // the one proven here; `scripts/test.sh` does not turn it off for this file.
    let metrics = tw.get_text("/metrics").await;
    for route in ["a", "b"] {
        let line = format!("tokenward_fast_path_requests_total{{route=\"{route}\"}} 15");
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
    tw.assert_no_leaks(&[a.key_material(), b.key_material()].concat())
        .await;
}

/// Both certificates rotate under load: the token endpoint trusts only the new client CA from
/// the moment the files change, the upstream sees the new certificate on new connections, and
/// no proxied request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, old_ca, new_ca, upstream_ca) = (
        Ca::new("servers"),
        Ca::new("clients-2025"),
        Ca::new("clients-2026"),
        Ca::new("upstream-clients"),
    );
    let server_ca_path = dir.path().join("server-ca.pem");
    server_ca.write(&server_ca_path);
    let idp = MtlsServer::start(Role::TokenEndpoint, &server_ca, Trust::ca(&old_ca)).await;
    let upstream = MtlsServer::start(Role::Upstream, &server_ca, Trust::ca(&upstream_ca)).await;
    let (idp_old, idp_new) = (
        old_ca.issue("tokenward", None),
        new_ca.issue("tokenward", None),
    );
    let (up_old, up_new) = (
        upstream_ca.issue("tokenward", None),
        upstream_ca.issue("tokenward", None),
    );
    let (cert, key) = idp_old.install(dir.path(), "idp");
    let (up_cert, up_key) = up_old.install(dir.path(), "upstream");

    let (proxy, admin) = (free_port(), free_port());
    let routes = format!(
        "[[routes]]\nname = \"api\"\nlisten = \"{proxy}\"\nupstream = \"{}\"\ncredential = \"api\"\n\
         ca_file = \"{}\"\ntls_client_cert = {{ file = \"{}\" }}\ntls_client_key = {{ file = \"{}\" }}\n",
        upstream.url(""),
        server_ca_path.display(),
        up_cert.display(),
        up_key.display()
    );
    let credential = mtls_credential(
        &idp.url("/token"),
        "tls_client_auth",
        &cert,
        &key,
        &server_ca_path,
    );
    let config = write_config(dir.path(), admin, &routes, &credential);
    let tw = Tokenward::start_with(tempfile::tempdir().unwrap(), config, proxy, admin);
    tw.wait_ready().await;
    // A second token request reuses the pooled connection: keep-alive is on, so the rotation
    // below has a connection made with the old certificate to deal with.
    assert_eq!(force_refresh(&tw).await, 200, "{}", tw.logs());
    let before = idp.hits();
    assert_eq!(before.len(), 2, "{before:?}");
    assert_eq!(
        before[0].conn, before[1].conn,
        "the token endpoint connection is pooled"
    );
    assert!(
        before
            .iter()
            .all(|h| h.cert == idp_old.sha && h.status == 200)
    );

    // Load: two clients in a loop, bounded in count and time.
    let load = Load::start(&tw.url("/load"), 2, 20_000, Duration::from_millis(5));
    wait_for("load before the rotation", Duration::from_secs(10), || {
        load.sent() >= 50
    })
    .await;

    // Rotate: new files for both; the token endpoint trusts only the new CA from now on.
    idp_new.install(dir.path(), "idp");
    idp.trust(Trust::ca(&new_ca));
    up_new.install(dir.path(), "upstream");
    let rotated_at = upstream.hits().len();

    // The upstream sees the new certificate within the check interval and never the old one
    // again once it has.
    wait_for(
        "the upstream to see the new certificate",
        Duration::from_secs(10),
        || {
            upstream.hits()[rotated_at..]
                .iter()
                .any(|h| h.cert == up_new.sha)
        },
    )
    .await;
    // The next token request opens a new connection with the new certificate: the pooled one
    // was made with the old certificate, which the token endpoint no longer accepts.
    assert_eq!(force_refresh(&tw).await, 200, "{}", tw.logs());
    let after = idp.hits();
    let last = after.last().unwrap();
    assert_eq!((last.status, last.cert), (200, idp_new.sha), "{after:?}");
    assert_ne!(
        last.conn, before[1].conn,
        "a new connection after the rotation"
    );
    let sent_at_refresh = load.sent();
    wait_for("load after the rotation", Duration::from_secs(10), || {
        load.sent() >= sent_at_refresh + 50
    })
    .await;
    let failures = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed requests: {failures:?}\n{}",
        failures.len(),
        tw.logs()
    );
    let hits = upstream.hits();
    assert!(hits.iter().all(|h| h.status == 200));
    let first_new = hits.iter().position(|h| h.cert == up_new.sha).unwrap();
    assert!(
        hits[first_new..].iter().all(|h| h.cert == up_new.sha),
        "a request went out on the old certificate after the new one was in use"
    );
    // The token issued on the new certificate is the one in use.
    let new_token = format!("Bearer {}", last.issued.as_deref().unwrap());
    assert_eq!(
        hits.last().unwrap().authorization.as_deref(),
        Some(new_token.as_str())
    );
    assert!(
        tw.logs().contains("client certificate changed"),
        "{}",
        tw.logs()
    );
    tw.assert_no_leaks(
        &[
            idp_old.key_material(),
            idp_new.key_material(),
            up_old.key_material(),
            up_new.key_material(),
        ]
        .concat(),
    )
    .await;
}

/// RFC 8705 §3: the token endpoint binds each token to the certificate it was called with, and
/// the upstream refuses a token on a connection presenting another. The certificate is renewed
/// (same CA, new key) under 10 requests a second: tokenward obtains a token bound to the new
/// certificate first and keeps presenting the old certificate with the old token until then,
/// so the upstream never refuses a request, and sees the new certificate with its token within
/// 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewed_certificate_never_meets_a_token_bound_to_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, clients) = (Ca::new("servers"), Ca::new("clients"));
    let server_ca_path = dir.path().join("server-ca.pem");
    server_ca.write(&server_ca_path);
    let idp = MtlsServer::start(Role::TokenEndpoint, &server_ca, Trust::ca(&clients)).await;
    let upstream = MtlsServer::start(Role::BoundUpstream, &server_ca, Trust::ca(&clients)).await;
    let (old, new) = (
        clients.issue("tokenward", None),
        clients.issue("tokenward", None),
    );
    let (cert, key) = old.install(dir.path(), "client");
    let (proxy, admin) = (free_port(), free_port());
    let routes = format!(
        "[[routes]]\nname = \"api\"\nlisten = \"{proxy}\"\nupstream = \"{}\"\ncredential = \"api\"\n\
         ca_file = \"{}\"\ntls_client_cert = {{ file = \"{}\" }}\ntls_client_key = {{ file = \"{}\" }}\n",
        upstream.url(""),
        server_ca_path.display(),
        cert.display(),
        key.display()
    );
    let credential = mtls_credential(
        &idp.url("/token"),
        "tls_client_auth",
        &cert,
        &key,
        &server_ca_path,
    );
    let config = write_config(dir.path(), admin, &routes, &credential);
    let tw = Tokenward::start_with(tempfile::tempdir().unwrap(), config, proxy, admin);
    tw.wait_ready().await;

    // One client, 10 requests a second, bounded in count and time.
    let load = Load::start(&tw.url("/bound"), 1, 300, Duration::from_millis(100));
    wait_for("load before the renewal", Duration::from_secs(10), || {
        load.sent() >= 20
    })
    .await;

    new.install(dir.path(), "client");
    let renewed_at = Instant::now();
    let bound_to_new = format!("Bearer mtls-at-{}-", hex(&new.sha));
    wait_for(
        "the new certificate with a token bound to it upstream",
        Duration::from_secs(5),
        || {
            upstream.hits().iter().any(|h| {
                h.cert == new.sha
                    && h.status == 200
                    && h.authorization
                        .as_deref()
                        .is_some_and(|a| a.starts_with(&bound_to_new))
            })
        },
    )
    .await;
    let took = renewed_at.elapsed();
    let sent_then = load.sent();
    wait_for("load after the renewal", Duration::from_secs(10), || {
        load.sent() >= sent_then + 20
    })
    .await;
    let failures = load.stop().await;

    let hits = upstream.hits();
    let refused: Vec<&Hit> = hits.iter().filter(|h| h.status != 200).collect();
    assert!(
        refused.is_empty(),
        "the upstream refused {} requests (binding mismatches): {refused:?}\n{}",
        refused.len(),
        tw.logs()
    );
    assert!(failures.is_empty(), "{failures:?}");
    let first_new = hits.iter().position(|h| h.cert == new.sha).unwrap();
    assert!(
        hits[first_new..].iter().all(|h| h.cert == new.sha),
        "the old certificate went out again after the new one"
    );
    assert!(took <= Duration::from_secs(5), "{took:?}");
    tw.assert_no_leaks(&[old.key_material(), new.key_material()].concat())
        .await;
}

/// A token-exchange credential whose token endpoint needs its client certificate and a private
/// CA, and whose subjects' JWKS is on a host with another CA (Entra's public JWKS beside a
/// private token endpoint): the JWKS is fetched on its own client, which trusts
/// `subject_jwks_ca_file` and shows no certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_subject_jwks_is_fetched_without_the_credentials_certificate_or_ca_file() {
    use common::jwks::{ISSUER, SUBJECT_AUD, TestKey, call, subject_token};
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca, jwks_ca) = (
        Ca::new("servers"),
        Ca::new("clients"),
        Ca::new("public-web"),
    );
    let (server_ca_path, jwks_ca_path) = (
        dir.path().join("server-ca.pem"),
        dir.path().join("jwks-ca.pem"),
    );
    server_ca.write(&server_ca_path);
    jwks_ca.write(&jwks_ca_path);
    let idp = MtlsServer::start(Role::TokenEndpoint, &server_ca, Trust::ca(&client_ca)).await;
    let signer = TestKey::new("k1");
    let document: &'static str = Box::leak(
        serde_json::json!({"keys": [signer.jwk()]})
            .to_string()
            .into_boxed_str(),
    );
    // Asks every client for a certificate without requiring one: shows whether one is offered.
    let jwks = MtlsServer::start(Role::Jwks(document), &jwks_ca, Trust::Optional).await;
    let leaf = client_ca.issue("tokenward", None);
    let (cert, key) = leaf.install(dir.path(), "client");

    let upstream = FakeUpstream::start().await;
    let (proxy, admin) = (free_port(), free_port());
    let routes = api_route(proxy, upstream.addr());
    let credential = format!(
        "{}grant = \"token_exchange\"\nsubject_jwks_url = \"{}\"\nsubject_jwks_ca_file = \"{}\"\n\
         subject_issuer = \"{ISSUER}\"\nsubject_audience = \"{SUBJECT_AUD}\"\n",
        mtls_credential(
            &idp.url("/token"),
            "tls_client_auth",
            &cert,
            &key,
            &server_ca_path
        ),
        jwks.url("/jwks"),
        jwks_ca_path.display()
    );
    let config = write_config(dir.path(), admin, &routes, &credential);
    let tw = Tokenward::start_with(tempfile::tempdir().unwrap(), config, proxy, admin);
    tw.wait_ready().await;

    let subject = subject_token(&signer, "alice");
    let (status, body, _) = call(&tw, &subject).await;
    assert_eq!(status, 200, "{body}\n{}", tw.logs());
    let fetched = jwks.hits();
    assert!(!fetched.is_empty() && fetched.iter().all(|h| h.path == "/jwks"));
    assert!(
        fetched.iter().all(|h| h.cert == [0; 32]),
        "the JWKS host was shown the credential's client certificate"
    );
    let exchanged = idp.hits();
    assert_eq!(exchanged.len(), 1, "{exchanged:?}");
    assert_eq!((exchanged[0].status, exchanged[0].cert), (200, leaf.sha));
    assert!(
        exchanged[0]
            .form
            .iter()
            .any(|(k, v)| k == "subject_token" && *v == subject)
    );
    tw.assert_no_leaks(&[leaf.key_material(), vec![subject]].concat())
        .await;
}

/// Two routes to one TLS upstream address and SNI, one whose `ca_file` signs the upstream's
/// certificate and one whose does not: the second must fail verification on every request, on
/// both request paths, and never be handed the first one's pooled, already verified connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pooled_upstream_connections_are_kept_apart_by_ca_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, other_ca) = (Ca::new("servers"), Ca::new("someone-else"));
    let (trusting, distrusting) = (
        dir.path().join("trusting.pem"),
        dir.path().join("other.pem"),
    );
    server_ca.write(&trusting);
    other_ca.write(&distrusting);
    let upstream = MtlsServer::start(Role::Upstream, &server_ca, Trust::Optional).await;
    let idp = FakeProvider::start(300, false, None).await;
    for fast_path in [true, false] {
        let earlier = upstream.hits().len();
        let (proxy, admin) = (free_port(), free_port());
        let route = |name: &str, ca: &Path| {
            format!(
                "[[routes]]\nname = \"{name}\"\nlisten = \"{proxy}\"\npath_prefix = \"/{name}\"\nupstream = \"{}\"\n\
                 credential = \"api\"\nca_file = \"{}\"\nhttp2 = false\n",
                upstream.url(""),
                ca.display()
            )
        };
        // The first line still belongs to write_config's [server] table.
        let routes = format!(
            "http1_fast_path = {fast_path}\n{}{}",
            route("a", &trusting),
            route("b", &distrusting)
        );
        let config = write_config(dir.path(), admin, &routes, &oauth2_keys(&idp, ""));
        let tw = Tokenward::start_with(tempfile::tempdir().unwrap(), config, proxy, admin);
        tw.wait_ready().await;
        let client = reqwest::Client::new();
        for i in 0..3 {
            let a = client.get(tw.url(&format!("/a/{i}"))).send().await.unwrap();
            assert_eq!(a.status(), 200, "fast path {fast_path}: {}", tw.logs());
            let b = client.get(tw.url(&format!("/b/{i}"))).send().await.unwrap();
            assert_eq!(
                b.status(),
                502,
                "fast path {fast_path}: route b's CA bundle does not sign the upstream, yet it was answered (a pooled connection route a verified)"
            );
        }
        let hits = upstream.hits().split_off(earlier);
        assert!(hits.iter().all(|h| !h.path.starts_with("/b/")), "{hits:?}");
        // Route a's requests did share connections: the pool is in use. (Each 502 ends its
        // client connection, so the next request may come in on the other proxy thread, with
        // an upstream pool of its own: at most two connections for three requests.)
        let conns: std::collections::BTreeSet<usize> = hits
            .iter()
            .filter(|h| h.path.starts_with("/a/"))
            .map(|h| h.conn)
            .collect();
        assert!(conns.len() < 3, "keep-alive was not used");
    }
}

/// `check` and `run` name a private key file that group or others can read (its config key and
/// path, never its content), and say nothing once it is the owner's only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_private_key_file_others_can_read_is_warned_about_by_check_and_run() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("clients");
    ca.write(&dir.path().join("ca.pem"));
    let leaf = ca.issue("tokenward", None);
    let (cert, key) = leaf.install(dir.path(), "client");
    let chmod = |mode| {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let idp = MtlsServer::start(Role::TokenEndpoint, &ca, Trust::ca(&ca)).await;
    let upstream = FakeUpstream::start().await;
    let (proxy, admin) = (free_port(), free_port());
    let routes = api_route(proxy, upstream.addr());
    let credential = mtls_credential(
        &idp.url("/token"),
        "tls_client_auth",
        &cert,
        &key,
        &dir.path().join("ca.pem"),
    );
    let config = write_config(dir.path(), admin, &routes, &credential);
    const WARNING: &str = "readable by group or others";

    chmod(0o644);
    let (code, out) = check(&config, &[]);
    assert_eq!(code, Some(0), "a warning, not an error: {out}");
    let line = out
        .lines()
        .find(|l| l.contains(WARNING))
        .unwrap_or_else(|| panic!("no warning: {out}"));
    assert!(
        line.contains("`credentials.api.tls_client_key`")
            && line.contains(&key.display().to_string())
            && line.contains("0644"),
        "{line}"
    );
    let material = leaf.key_material();
    for s in &material {
        assert!(
            !out.contains(s.as_str()),
            "check printed key material: {out}"
        );
    }
    let tw = Tokenward::start_with(tempfile::tempdir().unwrap(), config.clone(), proxy, admin);
    tw.wait_ready().await;
    let logs = tw.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains(WARNING) && l.contains("credentials.api.tls_client_key")),
        "{logs}"
    );
    tw.assert_no_leaks(&material).await;
    drop(tw);

    chmod(0o600);
    let (code, out) = check(&config, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains(WARNING), "{out}");
}
