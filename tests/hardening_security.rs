//! Black-box tests of the security hardening: admin actions behind a bearer token and a rate
//! limit, a provider client that ignores the environment's proxy variables and uses only the
//! credential's own `proxy`, a per-credential `ca_file` for the token endpoint, and the warnings
//! for plaintext HTTP off loopback.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Writes a tokenward config with one `oauth2` credential for `token_url`, applies `edit` to it,
/// and returns what `Tokenward::start_with*` needs.
fn write_config(
    token_url: &str,
    upstream: &str,
    credential_extra: &str,
    edit: impl FnOnce(String) -> String,
) -> (tempfile::TempDir, PathBuf, SocketAddr, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = (free_port(), free_port());
    let keys = format!(
        "dialect = \"oauth2\"\ntoken_url = \"{token_url}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\n{credential_extra}\n"
    );
    let body = edit(config(
        proxy,
        admin,
        upstream,
        &dir.path().join("state"),
        &keys,
    ));
    let path = dir.path().join("tokenward.toml");
    std::fs::write(&path, body).unwrap();
    (dir, path, proxy, admin)
}

fn replace_file(path: &Path, value: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, format!("{value}\n")).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Admin actions

async fn post(tw: &Tokenward, path: &str, bearer: Option<&str>) -> reqwest::Response {
    let mut r = reqwest::Client::new().post(tw.admin_url(path));
    if let Some(token) = bearer {
        r = r.header("authorization", format!("Bearer {token}"));
    }
    r.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_actions_need_the_bearer_token_from_admin_token() {
    let provider = FakeProvider::start(300, false, None).await;
    let upstream = FakeUpstream::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin_token");
    let first = format!("adm-first-{}", rand_hex());
    let second = format!("adm-second-{}", rand_hex());
    replace_file(&token_file, &first);
    let (dir, path, proxy, admin) = write_config(
        &provider.token_url(),
        &format!("http://{}", upstream.addr()),
        "min_refresh_interval = \"1s\"",
        |c| {
            c.replace(
                "[admin]\n",
                &format!(
                    "[admin]\ntoken = {{ file = \"{}\" }}\n",
                    token_file.display()
                ),
            )
        },
    );
    let tw = Tokenward::start_with(dir, path, proxy, admin);
    tw.wait_ready().await;
    let calls = provider.call_count();

    // Without the token, or with anything else, the actions are refused and do nothing.
    for bad in [None, Some("wrong-token"), Some(&first[..first.len() - 1])] {
        for action in ["refresh", "invalidate"] {
            let r = post(&tw, &format!("/tokens/api/{action}"), bad).await;
            assert_eq!(r.status(), 401, "{action} with {bad:?}");
            let challenge = r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .to_string();
            assert!(challenge.starts_with("Bearer"), "{challenge}");
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"], "unauthorized", "{body}");
        }
    }
    let r = reqwest::Client::new()
        .post(tw.admin_url("/tokens/api/refresh"))
        .basic_auth("admin", Some(&first))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "Basic is not Bearer");
    assert_eq!(
        provider.call_count(),
        calls,
        "a refused action reached the provider"
    );
    assert_eq!(tw.get_json("/tokens/api").await["token"]["generation"], 1);

    // Read-only endpoints stay open.
    for open in ["/healthz", "/readyz", "/metrics", "/tokens", "/tokens/api"] {
        let r = reqwest::get(tw.admin_url(open)).await.unwrap();
        assert_eq!(r.status(), 200, "{open}");
    }

    // With the token: the refresh runs, and a second one right after it is rate-limited.
    let r = post(&tw, "/tokens/api/refresh", Some(&first)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["generation"],
        2
    );
    let calls = provider.call_count();
    let r = post(&tw, "/tokens/api/refresh", Some(&first)).await;
    assert_eq!(r.status(), 429);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry_after, 1, "min_refresh_interval is 1s");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert_eq!(
        provider.call_count(),
        calls,
        "a limited refresh reached the provider"
    );

    // A rotated token file is picked up: the old value stops working, the new one works.
    replace_file(&token_file, &second);
    let r = post(&tw, "/tokens/api/invalidate", Some(&first)).await;
    assert_eq!(r.status(), 401);
    let r = post(&tw, "/tokens/api/invalidate", Some(&second)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["invalidated"],
        true
    );

    // Once the interval has passed, a forced refresh is admitted again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = post(&tw, "/tokens/api/refresh", Some(&second))
            .await
            .status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 429);
        assert!(Instant::now() < deadline, "still rate-limited after 5s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut secrets: Vec<String> = provider.issued();
    secrets.extend([CLIENT_SECRET.to_string(), first, second]);
    tw.assert_no_leaks(&secrets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_admin_token_a_loopback_admin_answers_and_forced_refreshes_are_rate_limited() {
    // The harness binds the admin listener to 127.0.0.1 and sets no admin.token.
    let (provider, _upstream, tw) = oauth2_setup(300, "").await;
    tw.wait_ready().await;
    let r = post(&tw, "/tokens/api/refresh", None).await;
    assert_eq!(r.status(), 200);
    let calls = provider.call_count();

    // A burst of forced refreshes makes no further provider call (min_refresh_interval is 5s).
    for _ in 0..5 {
        let r = post(&tw, "/tokens/api/refresh", None).await;
        assert_eq!(r.status(), 429);
        let retry_after: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=5).contains(&retry_after), "{retry_after}");
    }
    assert_eq!(provider.call_count(), calls);
    // Invalidation is not a provider call in itself and stays available.
    assert_eq!(
        post(&tw, "/tokens/api/invalidate", None).await.status(),
        200
    );
    tw.assert_no_leaks(&[CLIENT_SECRET.to_string()]).await;
}

// ---------------------------------------------------------------------------------------------
// Proxies

/// A forward proxy stand-in on loopback: it records each request head it receives and answers
/// every request itself with a token, so a test sees exactly what went through it.
#[derive(Clone)]
struct FakeProxy {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    token: String,
}

impl FakeProxy {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = FakeProxy {
            addr: listener.local_addr().unwrap(),
            connections: Arc::new(AtomicUsize::new(0)),
            heads: Arc::new(Mutex::new(Vec::new())),
            token: format!("at-via-proxy-{}", rand_hex()),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                p.connections.fetch_add(1, Ordering::SeqCst);
                let p = p.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(5), p.answer(&mut tcp)).await;
                });
            }
        });
        proxy
    }

    async fn answer(&self, tcp: &mut tokio::net::TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 {
                return;
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        self.heads.lock().unwrap().push(head.clone());
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0)
            .min(64 * 1024);
        while buf.len() < head_end + length {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = format!(
            "{{\"access_token\":\"{}\",\"token_type\":\"Bearer\",\"expires_in\":300}}",
            self.token
        );
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tcp.write_all(answer.as_bytes()).await;
        let _ = tcp.shutdown().await;
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// GETs through tokenward and returns the Authorization the upstream saw.
async fn injected(tw: &Tokenward, upstream: &FakeUpstream) -> String {
    let r = reqwest::get(tw.url("/x")).await.unwrap();
    assert_eq!(r.status(), 200, "{}", tw.logs());
    upstream.seen().last().unwrap().all("authorization")[0].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_variables_in_the_environment_are_ignored() {
    let provider = FakeProvider::start(300, false, None).await;
    let upstream = FakeUpstream::start().await;
    let fake_proxy = FakeProxy::start().await;
    let (dir, path, proxy, admin) = write_config(
        &provider.token_url(),
        &format!("http://{}", upstream.addr()),
        "",
        |c| c,
    );
    let p = fake_proxy.url();
    let env = [
        ("HTTP_PROXY", p.as_str()),
        ("http_proxy", p.as_str()),
        ("HTTPS_PROXY", p.as_str()),
        ("ALL_PROXY", p.as_str()),
    ];
    let tw = Tokenward::start_with_env(dir, path, proxy, admin, &env);
    tw.wait_ready().await;

    assert_eq!(
        fake_proxy.connections(),
        0,
        "the client secret went through the environment's proxy: {:?}",
        fake_proxy.heads()
    );
    assert_eq!(provider.successful_calls(), 1);
    assert_eq!(
        injected(&tw, &upstream).await,
        format!("Bearer {}", provider.issued()[0])
    );
    tw.assert_no_leaks(&[CLIENT_SECRET.to_string(), provider.issued()[0].clone()])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_configured_proxy_carries_the_token_request_whatever_no_proxy_says() {
    let provider = FakeProvider::start(300, false, None).await;
    let upstream = FakeUpstream::start().await;
    let fake_proxy = FakeProxy::start().await;
    let (dir, path, proxy, admin) = write_config(
        &provider.token_url(),
        &format!("http://{}", upstream.addr()),
        &format!("proxy = \"{}\"", fake_proxy.url()),
        |c| c,
    );
    let tw = Tokenward::start_with_env(
        dir,
        path,
        proxy,
        admin,
        &[("NO_PROXY", "127.0.0.1,localhost"), ("no_proxy", "*")],
    );
    tw.wait_ready().await;

    let heads = fake_proxy.heads();
    assert!(
        !heads.is_empty(),
        "nothing went through the configured proxy"
    );
    let request_line = heads[0].lines().next().unwrap();
    assert_eq!(
        request_line,
        format!("POST {} HTTP/1.1", provider.token_url()),
        "{heads:?}"
    );
    assert_eq!(
        provider.call_count(),
        0,
        "the provider was reached directly"
    );
    assert_eq!(
        injected(&tw, &upstream).await,
        format!("Bearer {}", fake_proxy.token)
    );
    tw.assert_no_leaks(&[CLIENT_SECRET.to_string(), fake_proxy.token.clone()])
        .await;
}

// ---------------------------------------------------------------------------------------------
// ca_file

/// A token endpoint served over TLS with a certificate for 127.0.0.1 signed by its own CA.
/// Returns the endpoint's URL, the CA bundle's path, and the count of tokens issued.
async fn tls_provider(dir: &Path) -> (String, PathBuf, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tokenward test provider CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let ca_path = dir.join("provider-ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();

    let _ = rustls::crypto::ring::default_provider().install_default();
    let server_config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let issued = Arc::new(Mutex::new(Vec::<String>::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let (i, n) = (issued.clone(), calls.clone());
    let router = axum::Router::new().route(
        "/token",
        axum::routing::post(move || {
            let (i, n) = (i.clone(), n.clone());
            async move {
                n.fetch_add(1, Ordering::SeqCst);
                let token = format!("at-tls-{}", rand_hex());
                i.lock().unwrap().push(token.clone());
                axum::Json(serde_json::json!({"access_token": token, "expires_in": 300}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let router = router.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(router);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    (format!("https://{addr}/token"), ca_path, calls, issued)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ca_file_makes_a_token_endpoint_with_a_private_ca_trusted() {
    let certs = tempfile::tempdir().unwrap();
    let (token_url, ca_path, calls, issued) = tls_provider(certs.path()).await;
    let upstream = FakeUpstream::start().await;

    // Without ca_file the built-in roots do not know the provider's CA: no token, and the reason
    // says so.
    let (dir, path, proxy, admin) = write_config(
        &token_url,
        &format!("http://{}", upstream.addr()),
        "",
        |c| c,
    );
    let untrusting = Tokenward::start_with(dir, path, proxy, admin);
    untrusting.wait_healthy().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = untrusting.get_json("/tokens/api").await;
        if s["last_error"].is_string() {
            break s;
        }
        assert!(Instant::now() < deadline, "no error reported: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let error = status["last_error"].as_str().unwrap().to_ascii_lowercase();
    assert!(error.contains("certificate"), "{status}");
    assert_ne!(status["state"], "valid", "{status}");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "a request got through");
    drop(untrusting);

    // With ca_file naming that CA, the same endpoint issues the token.
    let (dir, path, proxy, admin) = write_config(
        &token_url,
        &format!("http://{}", upstream.addr()),
        &format!("ca_file = \"{}\"", ca_path.display()),
        |c| c,
    );
    let tw = Tokenward::start_with(dir, path, proxy, admin);
    tw.wait_ready().await;
    let first = issued.lock().unwrap()[0].clone();
    assert_eq!(injected(&tw, &upstream).await, format!("Bearer {first}"));
    tw.assert_no_leaks(&[CLIENT_SECRET.to_string(), first])
        .await;
}

// ---------------------------------------------------------------------------------------------
// check and start-up warnings

fn check(path: &Path, skip_secrets: bool) -> (Option<i32>, String, String) {
    let mut args = vec!["check", "--config", path.to_str().unwrap()];
    if skip_secrets {
        args.push("--skip-secrets");
    }
    let out = Command::new(bin()).args(&args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

const BASE: &str = r#"
[admin]
listen = "ADMIN"
[[routes]]
name = "orders"
listen = "127.0.0.1:18080"
upstream = "UPSTREAM"
credential = "orders"
[credentials.orders]
dialect = "oauth2"
token_url = "TOKEN_URL"
client_id = "x"
client_secret = "inline-secret-value"
"#;

fn base(admin: &str, upstream: &str, token_url: &str) -> String {
    BASE.replace("ADMIN", admin)
        .replace("UPSTREAM", upstream)
        .replace("TOKEN_URL", token_url)
}

#[test]
fn check_warns_about_plaintext_http_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        base(
            "127.0.0.1:19901",
            "http://orders.internal.example:8080/v1",
            "http://idp.internal.example/oauth2/token?x=1",
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = check(&path, true);
    assert_eq!(
        code,
        Some(0),
        "warnings are not errors:\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("warning: route \"orders\": upstream http://orders.internal.example:8080 is plain http://"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: credential \"orders\": token endpoint http://idp.internal.example is plain http://"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("x=1"),
        "no query string in warnings: {stderr}"
    );

    // Loopback and https draw no warning.
    for (upstream, token_url) in [
        ("http://127.0.0.1:9000", "http://localhost:9001/token"),
        (
            "https://orders.example.com",
            "https://idp.example.com/token",
        ),
        ("http://[::1]:9000", "http://127.0.0.2:9001/token"),
    ] {
        std::fs::write(&path, base("127.0.0.1:19901", upstream, token_url)).unwrap();
        let (code, stdout, stderr) = check(&path, true);
        assert_eq!(code, Some(0), "{stdout}\n{stderr}");
        assert!(
            !stderr.contains("warning"),
            "{upstream} {token_url}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_warns_at_start_about_a_plaintext_upstream_off_loopback() {
    let provider = FakeProvider::start(300, false, None).await;
    // A documentation address (RFC 5737): named in the config, never contacted by this test.
    let tw = Tokenward::start("http://192.0.2.10:8080", &oauth2_keys(&provider, ""));
    tw.wait_healthy().await;
    let wanted = "upstream http://192.0.2.10:8080 is plain http:// on a host that is not loopback";
    wait_for("the start-up warning", Duration::from_secs(5), || {
        tw.logs().contains(wanted)
    })
    .await;
    let logs = tw.logs();
    assert!(
        !logs.contains("token endpoint"),
        "the loopback token endpoint drew a warning:\n{logs}"
    );
}

#[test]
fn check_says_whether_admin_actions_are_protected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let up = "https://orders.example.com";
    let idp = "https://idp.example.com/token";

    std::fs::write(&path, base("127.0.0.1:19901", up, idp)).unwrap();
    let (code, stdout, _) = check(&path, true);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("open to local clients only"), "{stdout}");

    std::fs::write(&path, base("0.0.0.0:19901", up, idp)).unwrap();
    let (code, stdout, _) = check(&path, true);
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("refused: the listener is not loopback and admin.token is not set"),
        "{stdout}"
    );

    let token_file = dir.path().join("admin_token");
    let with_token = base("0.0.0.0:19901", up, idp).replace(
        "[admin]\n",
        &format!(
            "[admin]\ntoken = {{ file = \"{}\" }}\n",
            token_file.display()
        ),
    );
    std::fs::write(&path, &with_token).unwrap();
    // The file is missing: check names the key.
    let (code, stdout, stderr) = check(&path, false);
    assert_eq!(code, Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("`admin.token`"), "{stderr}");
    std::fs::write(&token_file, "adm-token-value-7\n").unwrap();
    let (code, stdout, stderr) = check(&path, false);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("protected"), "{stdout}");
    assert!(
        stdout.contains(&token_file.display().to_string()),
        "{stdout}"
    );
    assert!(!stdout.contains("adm-token-value-7") && !stderr.contains("adm-token-value-7"));
}

#[test]
fn check_rejects_bad_proxy_and_ca_file_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let cases = [
        (
            "proxy = \"socks5://127.0.0.1:1080\"",
            "credentials.orders.proxy",
        ),
        (
            "proxy = \"http://user:pw-hunter2@127.0.0.1:3128\"",
            "credentials.orders.proxy",
        ),
        (
            "ca_file = \"/nonexistent/ca.pem\"",
            "credentials.orders.ca_file",
        ),
        (
            &format!("ca_file = \"{}\"", not_pem.display())[..],
            "credentials.orders.ca_file",
        ),
    ];
    for (line, key) in cases {
        let body = format!(
            "{}{line}\n",
            base(
                "127.0.0.1:19901",
                "https://orders.example.com",
                "https://idp.example.com/token"
            )
        );
        std::fs::write(&path, body).unwrap();
        let (code, stdout, stderr) = check(&path, true);
        assert_eq!(code, Some(2), "{line}: {stdout}\n{stderr}");
        assert!(stderr.contains(&format!("`{key}`")), "{line}: {stderr}");
        assert!(stderr.contains("c.toml"), "{stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
    let good = format!(
        "{}proxy = \"http://127.0.0.1:3128\"\n",
        base(
            "127.0.0.1:19901",
            "https://orders.example.com",
            "https://idp.example.com/token"
        )
    );
    std::fs::write(&path, good).unwrap();
    let (code, stdout, stderr) = check(&path, true);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("through proxy http://127.0.0.1:3128"),
        "{stdout}"
    );
}
