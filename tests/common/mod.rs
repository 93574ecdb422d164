//! Test harness: a fake OAuth 2.0 provider and a fake upstream (in-process, on loopback), and
//! the real `tokenward` binary run against them with its logs captured.
#![allow(dead_code)]

pub mod assertion;
pub mod jwks;
pub mod moto;
pub mod nginx;
pub mod peers;
pub mod raw;
pub mod redis;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{Value, json};

pub const CLIENT_ID: &str = "tw-client";
pub const CLIENT_SECRET: &str = "client-secret-7f3a9c";

/// A loopback port nothing listens on now, for a server the test starts later (tokenward's
/// listeners, nginx). It is drawn below the kernel's ephemeral range (32768 and up), from which
/// every `bind(0)` and outgoing connection of the parallel test processes takes its ports: a
/// port from that range, released here and bound by tokenward a moment later, could meanwhile
/// go to another test's fake server, and this test would talk to that one (a 404 in CI). A
/// port is leased to this test process for its whole life (`lease_port`), so no other test
/// process gets it either: not between this check and the server's bind, and not while a test
/// restarts its tokenward on the same ports (a SIGKILL restart once found its admin port taken).
pub fn free_port() -> SocketAddr {
    use std::hash::{BuildHasher, RandomState};
    const LOW: u16 = 20_000;
    const HIGH: u16 = 32_000;
    let seed = RandomState::new();
    for attempt in 0u32.. {
        let port =
            LOW + (seed.hash_one((std::process::id(), attempt)) % u64::from(HIGH - LOW)) as u16;
        if lease_port(port) {
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                return l.local_addr().unwrap();
            }
        }
        assert!(attempt < 10_000, "no free loopback port in {LOW}..{HIGH}");
    }
    unreachable!()
}

/// Takes `port` for the life of this process unless another test process (or this one)
/// holds it: an exclusive lock on a file per port under the temporary directory, which the
/// kernel releases when the holder exits, however it exits.
fn lease_port(port: u16) -> bool {
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("tokenward-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))
    else {
        return false;
    };
    // A second lock on the same file conflicts within one process too (another open file).
    if file.try_lock().is_err() {
        return false;
    }
    HELD.lock().unwrap().push(file);
    true
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

/// How the fake provider answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    Ok,
    Status(u16),
    /// HTTP 200 with a body that is not a token response.
    Garbage(&'static str),
    /// This status with `Retry-After: retry_after_s`.
    Busy {
        status: u16,
        retry_after_s: u64,
    },
}

#[derive(Clone, Debug)]
pub struct Call {
    pub grant_type: String,
    pub refresh_token: Option<String>,
    pub at: Instant,
    pub outcome: u16,
}

pub struct ProviderState {
    mode: Mutex<Mode>,
    lifetime: Mutex<u64>,
    delay: Mutex<Duration>,
    rotate: bool,
    /// The one refresh token the provider accepts now (rotation revokes the previous one).
    valid_refresh: Mutex<Option<String>>,
    issued: Mutex<Vec<String>>,
    calls: Mutex<Vec<Call>>,
    counter: AtomicUsize,
    /// Token requests received and not yet answered (a handler cut by a closed connection
    /// counts down too).
    in_flight: Arc<AtomicUsize>,
}

impl ProviderState {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

/// Counts a handler in flight until it returns or is dropped.
struct InFlightCall(Arc<AtomicUsize>);

impl InFlightCall {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlightCall(counter.clone())
    }
}

impl Drop for InFlightCall {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
pub struct FakeProvider {
    pub addr: SocketAddr,
    pub state: Arc<ProviderState>,
}

impl FakeProvider {
    /// `rotate`: every response carries a new refresh token and revokes the previous one.
    pub async fn start(lifetime_s: u64, rotate: bool, bootstrap_refresh: Option<&str>) -> Self {
        let state = Arc::new(ProviderState {
            mode: Mutex::new(Mode::Ok),
            lifetime: Mutex::new(lifetime_s),
            delay: Mutex::new(Duration::ZERO),
            rotate,
            valid_refresh: Mutex::new(bootstrap_refresh.map(String::from)),
            issued: Mutex::new(bootstrap_refresh.map(String::from).into_iter().collect()),
            calls: Mutex::new(Vec::new()),
            counter: AtomicUsize::new(0),
            in_flight: Arc::new(AtomicUsize::new(0)),
        });
        let router = Router::new()
            .route("/token", post(token_endpoint))
            .with_state(state.clone());
        FakeProvider {
            addr: serve(router).await,
            state,
        }
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }
    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }
    pub fn set_delay(&self, d: Duration) {
        *self.state.delay.lock().unwrap() = d;
    }
    pub fn set_lifetime(&self, s: u64) {
        *self.state.lifetime.lock().unwrap() = s;
    }
    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }
    pub fn call_count(&self) -> usize {
        self.state.calls.lock().unwrap().len()
    }
    /// Calls the provider refused (a spent refresh token, bad credentials, a busy answer).
    pub fn refused_calls(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.outcome != 200)
            .collect()
    }
    pub fn successful_calls(&self) -> usize {
        self.calls().iter().filter(|c| c.outcome == 200).count()
    }
    /// Every token and refresh token this provider issued or accepted.
    pub fn issued(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }
    pub fn valid_refresh(&self) -> Option<String> {
        self.state.valid_refresh.lock().unwrap().clone()
    }
}

fn basic_ok(headers: &HeaderMap) -> bool {
    let want =
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Basic {want}"))
}

async fn token_endpoint(
    State(s): State<Arc<ProviderState>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let _in_flight = InFlightCall::enter(&s.in_flight);
    let delay = *s.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let grant_type = form.get("grant_type").cloned().unwrap_or_default();
    let refresh_token = form.get("refresh_token").cloned();
    let record = |outcome: u16| {
        s.calls.lock().unwrap().push(Call {
            grant_type: grant_type.clone(),
            refresh_token: refresh_token.clone(),
            at: Instant::now(),
            outcome,
        });
    };
    let mode = s.mode.lock().unwrap().clone();
    match mode {
        Mode::Ok => {}
        Mode::Status(code) => {
            record(code);
            let status = StatusCode::from_u16(code).unwrap();
            return (
                status,
                [("retry-after", "0")],
                Json(json!({"error": "temporarily_unavailable"})),
            )
                .into_response();
        }
        Mode::Busy {
            status,
            retry_after_s,
        } => {
            record(status);
            return (
                StatusCode::from_u16(status).unwrap(),
                [("retry-after", retry_after_s.to_string())],
                Json(json!({"error": "temporarily_unavailable"})),
            )
                .into_response();
        }
        Mode::Garbage(body) => {
            record(200);
            return (StatusCode::OK, body.to_string()).into_response();
        }
    }
    if !basic_ok(&headers) {
        record(401);
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    match grant_type.as_str() {
        "client_credentials" => {}
        "refresh_token" => {
            let valid = s.valid_refresh.lock().unwrap().clone();
            if valid.is_none() || refresh_token != valid {
                record(400);
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "invalid_grant"})),
                )
                    .into_response();
            }
        }
        _ => {
            record(400);
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "unsupported_grant_type"})),
            )
                .into_response();
        }
    }
    let n = s.counter.fetch_add(1, Ordering::SeqCst) + 1;
    let access = format!("at-{n}-{}", rand_hex());
    let mut body = json!({"access_token": access, "token_type": "Bearer", "expires_in": *s.lifetime.lock().unwrap()});
    let mut issued = vec![access];
    if s.rotate {
        let rt = format!("rt-{n}-{}", rand_hex());
        *s.valid_refresh.lock().unwrap() = Some(rt.clone());
        body["refresh_token"] = json!(rt);
        issued.push(rt);
    }
    s.issued.lock().unwrap().extend(issued);
    record(200);
    (StatusCode::OK, Json(body)).into_response()
}

/// A secret file whose read hangs (a FIFO nobody writes, as a stuck network mount behaves),
/// named `name` in a directory that lives as long as the returned guard.
pub fn stalled_secret(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo {}", path.display());
    (dir, path)
}

/// Polls `cond` until it holds, failing the test after `within`.
pub async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rewrites the running config file (the reloader notices within a second).
pub fn rewrite_config(tw: &Tokenward, from: &str, to: &str) {
    let body = std::fs::read_to_string(&tw.config_path).unwrap();
    assert!(body.contains(from), "{from:?} not in config");
    std::fs::write(&tw.config_path, body.replace(from, to)).unwrap();
}

pub fn rand_hex() -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What the fake upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[derive(Clone, Default)]
pub struct FakeUpstream {
    pub addr: Option<SocketAddr>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Authorization values this upstream answers 401 to (a token revoked before its expiry).
    pub revoked: Arc<Mutex<Vec<String>>>,
    /// Answers 401 to every token (an upstream misconfigured to trust no issuer).
    pub reject_all: Arc<std::sync::atomic::AtomicBool>,
}

async fn upstream_handler(State(up): State<FakeUpstream>, req: Request) -> Response {
    let seen = up.seen.clone();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let version = format!("{:?}", req.version());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).to_string(),
            )
        })
        .collect();
    let entry = Seen {
        path: path.clone(),
        version: version.clone(),
        headers: headers.clone(),
    };
    seen.lock().unwrap().push(entry);
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if up.revoked.lock().unwrap().contains(&auth) || up.reject_all.load(Ordering::SeqCst) {
        let _ = axum::body::to_bytes(req.into_body(), 16 << 20).await;
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_token"})),
        )
            .into_response();
    }
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|s| s.parse::<usize>().ok())
    {
        return (StatusCode::OK, vec![b'b'; n.min(64 << 20)]).into_response();
    }
    if let Some(ms) = path
        .strip_prefix("/slow/")
        .and_then(|s| s.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let body_len = axum::body::to_bytes(req.into_body(), 16 << 20)
        .await
        .map(|b| b.len())
        .unwrap_or(0);
    let map: serde_json::Map<String, Value> =
        headers.into_iter().map(|(k, v)| (k, json!(v))).collect();
    Json(json!({"path": path, "version": version, "headers": map, "body_bytes": body_len}))
        .into_response()
}

impl FakeUpstream {
    pub fn router(&self) -> Router {
        Router::new()
            .fallback(any(upstream_handler))
            .with_state(self.clone())
    }

    pub async fn start() -> Self {
        let mut u = FakeUpstream::default();
        u.addr = Some(serve(u.router()).await);
        u
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.unwrap()
    }
    pub fn revoke(&self, authorization: String) {
        self.revoked.lock().unwrap().push(authorization);
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    pub fn reject_every_token(&self) {
        self.reject_all.store(true, Ordering::SeqCst);
    }
}

/// The tokenward binary under test.
pub struct Tokenward {
    child: Option<Child>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    log: Arc<Mutex<String>>,
    /// Environment variables set for the binary, on top of the test's own.
    env: Vec<(String, String)>,
}

/// Proxy variables are removed from the binary's environment unless a test sets them, so that a
/// proxy configured on the machine running the tests cannot change what they observe.
const PROXY_VARS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tokenward")
}

/// A config with one route on `proxy` to `upstream` and one credential named `api` whose
/// dialect keys are `credential` (TOML lines).
pub fn config(
    proxy: SocketAddr,
    admin: SocketAddr,
    upstream: &str,
    state: &std::path::Path,
    credential: &str,
) -> String {
    format!(
        r#"[log]
format = "json"
level = "debug"
[admin]
listen = "{admin}"
[state]
dir = "{state}"
[server]
threads = 2
grace_period = "5s"
[[routes]]
name = "api"
listen = "{proxy}"
upstream = "{upstream}"
credential = "api"
[credentials.api]
{credential}
"#,
        state = state.display()
    )
}

pub fn oauth2_keys(provider: &FakeProvider, extra: &str) -> String {
    format!(
        "dialect = \"oauth2\"\ntoken_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\n{extra}\n",
        provider.token_url()
    )
}

/// The common setup: a fake provider issuing `lifetime_s` tokens, a fake upstream, and
/// tokenward in front of it with an `oauth2` credential plus the `extra` TOML lines.
pub async fn oauth2_setup(lifetime_s: u64, extra: &str) -> (FakeProvider, FakeUpstream, Tokenward) {
    let provider = FakeProvider::start(lifetime_s, false, None).await;
    let upstream = FakeUpstream::start().await;
    let tw = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &oauth2_keys(&provider, extra),
    );
    (provider, upstream, tw)
}

impl Tokenward {
    /// Starts tokenward with one route to `upstream` and credential keys `credential`.
    pub fn start(upstream: &str, credential: &str) -> Self {
        Self::start_in_env(upstream, credential, &[])
    }

    /// Like [`Tokenward::start`], with `env` set in the binary's environment.
    pub fn start_in_env(upstream: &str, credential: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (proxy, admin) = (free_port(), free_port());
        let config_path = dir.path().join("tokenward.toml");
        std::fs::write(
            &config_path,
            config(
                proxy,
                admin,
                upstream,
                &dir.path().join("state"),
                credential,
            ),
        )
        .unwrap();
        Self::start_with_env(dir, config_path, proxy, admin, env)
    }

    pub fn start_with(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        proxy: SocketAddr,
        admin: SocketAddr,
    ) -> Self {
        Self::start_with_env(dir, config_path, proxy, admin, &[])
    }

    /// Like [`Tokenward::start_with`], with `env` set in the binary's environment.
    pub fn start_with_env(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        proxy: SocketAddr,
        admin: SocketAddr,
        env: &[(&str, &str)],
    ) -> Self {
        let mut tw = Tokenward {
            child: None,
            proxy,
            admin,
            dir,
            config_path,
            log: Arc::new(Mutex::new(String::new())),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        tw.spawn();
        tw
    }

    fn spawn(&mut self) {
        let mut command = Command::new(bin());
        for var in PROXY_VARS {
            command.env_remove(var);
        }
        let mut child = command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["run", "--config"])
            .arg(&self.config_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tokenward");
        for mut pipe in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let log = self.log.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        self.child = Some(child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }
    pub fn logs(&self) -> String {
        self.log.lock().unwrap().clone()
    }
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits until the admin listener answers /healthz.
    pub async fn wait_healthy(&self) {
        self.wait_admin("/healthz").await
    }

    /// Waits until /readyz says every credential holds a token.
    pub async fn wait_ready(&self) {
        self.wait_admin("/readyz").await
    }

    async fn wait_admin(&self, path: &str) {
        let client = reqwest::Client::new();
        // A first start on an empty shared store waits for it to settle before presenting a
        // bootstrap value — `2 × timeout + 1 s`, 21 s for a 10 s provider timeout.
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(r) = client.get(self.admin_url(path)).send().await {
                // pingora binds each service's listener on that service's own thread, so the
                // admin can answer before the proxy listener exists: wait for both.
                if r.status() == 200 && tokio::net::TcpStream::connect(self.proxy).await.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "tokenward {path} not OK, or its proxy listener not accepting, within 40s; logs:\n{}",
            self.logs()
        );
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().unwrap();
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "tokenward did not exit within {within:?}; logs:\n{}",
            self.logs()
        );
    }

    pub fn kill9_and_restart(&mut self) {
        self.kill9();
        self.restart();
    }

    /// SIGKILLs the process and waits until it is gone.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts the process again with the same config (after [`Self::kill9`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running tokenward");
        self.spawn();
    }

    pub async fn get_json(&self, path: &str) -> Value {
        reqwest::get(self.admin_url(path))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn get_text(&self, path: &str) -> String {
        reqwest::get(self.admin_url(path))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Fails when any of `secrets` appears in the captured logs, `/tokens` or `/metrics`.
    pub async fn assert_no_leaks(&self, secrets: &[String]) {
        let tokens = self.get_text("/tokens").await;
        let metrics = self.get_text("/metrics").await;
        let logs = self.logs();
        for s in secrets.iter().filter(|s| s.len() >= 6) {
            assert!(
                !logs.contains(s.as_str()),
                "secret {s:?} appears in the logs:\n{logs}"
            );
            assert!(
                !tokens.contains(s.as_str()),
                "secret {s:?} appears in /tokens: {tokens}"
            );
            assert!(
                !metrics.contains(s.as_str()),
                "secret {s:?} appears in /metrics"
            );
        }
        if let Ok(dir) = std::env::var("TOKENWARD_TEST_LOG_DIR") {
            let _ = std::fs::create_dir_all(&dir);
            let name = format!("{dir}/{}-{}.log", std::process::id(), rand_hex());
            let _ = std::fs::write(name, format!("{logs}\n{tokens}\n{metrics}"));
        }
    }
}

impl Drop for Tokenward {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads one metric sample's value from Prometheus text.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Reads one request head from `s` (through `got`, which keeps any bytes past it), lower-cased;
/// `None` once the peer has closed.
pub async fn read_request_head(s: &mut tokio::net::TcpStream, got: &mut Vec<u8>) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end + 4]).to_ascii_lowercase();
            got.drain(..end + 4);
            return Some(head);
        }
        let n = s.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// An upstream written by hand that answers plain requests with `plain`, and on a WebSocket
/// upgrade switches protocols and echoes bytes, as a WebSocket server does after its handshake.
/// Keeps every request head it saw, lower-cased.
pub async fn upgrade_echo_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(head) = read_request_head(&mut s, &mut got).await {
                    seen.lock().unwrap().push(head.clone());
                    if !head.contains("upgrade: websocket") {
                        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain";
                        s.write_all(plain).await.unwrap();
                        continue;
                    }
                    s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").await.unwrap();
                    let mut buf = vec![0u8; 8192];
                    loop {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        s.write_all(&buf[..n]).await.unwrap();
                    }
                }
            });
        }
    });
    (addr, heads)
}
