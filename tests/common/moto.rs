//! moto's server (PyPI `moto[server]`, installed by scripts/install-deps.sh in the test venv) as
//! a real, independent SigV4 verifier: IAM authentication on, an IAM user with one access key,
//! a role, and two sets of temporary credentials from moto's STS (tests/fixtures/moto_setup.py).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, serde::Deserialize)]
pub struct Keys {
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default)]
    pub session_token: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct Setup {
    access_key_id: String,
    secret_access_key: String,
    role_arn: String,
    temporary: Vec<Keys>,
}

pub struct Moto {
    child: Child,
    pub addr: SocketAddr,
    pub user: Keys,
    pub role_arn: String,
    /// Two sets of temporary credentials for `role_arn`, issued by moto's STS.
    pub temporary: Vec<Keys>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The test venv scripts/install-deps.sh makes.
pub fn venv_bin(tool: &str) -> PathBuf {
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"));
    cache.join("tokenward-venv/bin").join(tool)
}

impl Moto {
    pub async fn start() -> Moto {
        let server = venv_bin("moto_server");
        assert!(
            server.exists(),
            "{} is missing: run scripts/install-deps.sh (it installs moto[server] in the test venv)",
            server.display()
        );
        let addr = super::free_port();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        let child = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &addr.port().to_string()])
            // The fixture's five set-up requests go unauthenticated; every later one is verified.
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "5")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start moto_server");
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "moto did not listen within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/moto_setup.py");
        let out = Command::new(venv_bin("python"))
            .args([script, &format!("http://{addr}")])
            .output()
            .expect("run moto_setup.py");
        assert!(
            out.status.success(),
            "moto_setup.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let setup: Setup = serde_json::from_slice(&out.stdout).unwrap();
        Moto {
            child,
            addr,
            user: Keys {
                access_key_id: setup.access_key_id,
                secret_access_key: setup.secret_access_key,
                session_token: None,
            },
            role_arn: setup.role_arn,
            temporary: setup.temporary,
            log,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// moto's request log (one line per request, with its status).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
