//! A real `redis-server` on a free loopback port for tests (killed on drop), and what tests ask
//! of it: stop and restart (empty), every key and value it holds, how many commands it served.
//! Also compiled into the crate's unit tests (`token::store::redis`), so it uses only std,
//! `tempfile` and the `redis` crate.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server may take to answer PING.
const READY_WITHIN: Duration = Duration::from_secs(10);

pub struct RedisServer {
    port: u16,
    /// Extra arguments (e.g. `--requirepass`), kept for restarts.
    args: Vec<String>,
    child: Option<Child>,
    /// Its working directory: nothing is persisted (`--save ''`), but Redis needs one.
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `redis-server` on a free port of 127.0.0.1 and waits until it answers PING.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// As [`start`](Self::start), with extra `redis-server` arguments such as
    /// `["--requirepass", "pw"]`.
    pub fn start_with(args: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().expect("temporary directory for redis-server");
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut server = RedisServer {
            port: free_port(),
            args,
            child: None,
            dir,
        };
        // Another process may take the free port between our probe and the server's bind: then
        // the server exits at once and we try another port.
        for _ in 0..5 {
            if server.spawn() {
                return server;
            }
            server.port = free_port();
        }
        panic!("redis-server did not start on a free loopback port (is it installed?)");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL, as a crash would) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a new, empty server on the same port (after [`stop`](Self::stop)).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + READY_WITHIN;
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Suspends the server (SIGSTOP): connections stay open but nothing answers, as with a
    /// hung or partitioned Redis. [`thaw`](Self::thaw) resumes it.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let status = Command::new("kill")
            .arg(sig)
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} redis-server");
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn client(&self) -> ::redis::Connection {
        let mut url = self.url();
        if let Some(i) = self.args.iter().position(|a| a == "--requirepass") {
            url = format!("redis://:{}@127.0.0.1:{}/0", self.args[i + 1], self.port);
        }
        ::redis::Client::open(url)
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("connect to the test redis-server")
    }

    /// Every key with every value it holds (for a hash: its fields and values, in turn; for
    /// any other type: its DUMP), whatever the database-0 key space holds.
    pub fn entries(&self) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
        let mut con = self.client();
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut cursor: u64 = 0;
        for _ in 0..10_000 {
            let (next, batch): (u64, Vec<Vec<u8>>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query(&mut con)
                .expect("SCAN");
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .map(|key| {
                let kind: String = ::redis::cmd("TYPE")
                    .arg(&key)
                    .query(&mut con)
                    .expect("TYPE");
                let values: Vec<Vec<u8>> = match kind.as_str() {
                    "string" => vec![::redis::cmd("GET").arg(&key).query(&mut con).expect("GET")],
                    "hash" => ::redis::cmd("HGETALL")
                        .arg(&key)
                        .query(&mut con)
                        .expect("HGETALL"),
                    "none" => Vec::new(),
                    _ => vec![
                        ::redis::cmd("DUMP")
                            .arg(&key)
                            .query(&mut con)
                            .expect("DUMP"),
                    ],
                };
                (key, values)
            })
            .collect()
    }

    /// The key names (lossy UTF-8), sorted.
    pub fn keys(&self) -> Vec<String> {
        self.entries()
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
            .collect()
    }

    /// Every key but the lease keys: the chains and their forwarding markers.
    pub fn chain_keys(&self) -> Vec<String> {
        self.keys()
            .into_iter()
            .filter(|k| !k.ends_with(":lease"))
            .collect()
    }

    /// Whether `needle` appears anywhere in a key name or value.
    pub fn holds_bytes(&self, needle: &[u8]) -> bool {
        self.entries()
            .iter()
            .any(|(k, values)| contains(k, needle) || values.iter().any(|v| contains(v, needle)))
    }

    /// The server's `total_commands_processed` (INFO stats), this call's INFO included.
    pub fn commands_processed(&self) -> u64 {
        let info: String = ::redis::cmd("INFO")
            .arg("stats")
            .query(&mut self.client())
            .expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("INFO stats has total_commands_processed")
    }

    /// The key's remaining time to live in milliseconds (-1: none, -2: no such key).
    pub fn pttl(&self, key: &str) -> i64 {
        ::redis::cmd("PTTL")
            .arg(key)
            .query(&mut self.client())
            .expect("PTTL")
    }

    /// `DUMP key`: the value as Redis serialises it, to put back later with [`Self::restore`].
    pub fn dump(&self, key: &str) -> Vec<u8> {
        ::redis::cmd("DUMP")
            .arg(key)
            .query(&mut self.client())
            .expect("DUMP")
    }

    /// `RESTORE key 0 value REPLACE`: the key as it was when dumped (a rolled-back store).
    pub fn restore(&self, key: &str, dumped: &[u8]) {
        let _: () = ::redis::cmd("RESTORE")
            .arg(key)
            .arg(0)
            .arg(dumped)
            .arg("REPLACE")
            .query(&mut self.client())
            .expect("RESTORE");
    }

    /// `FLUSHALL`: every key gone at once, leases included (what a restart without
    /// persistence leaves, without the outage).
    pub fn flush_all(&self) {
        let _: () = ::redis::cmd("FLUSHALL")
            .query(&mut self.client())
            .expect("FLUSHALL");
    }

    /// A second server replicating this one asynchronously (`--replicaof`), once it has
    /// caught up.
    pub fn start_replica(&self) -> RedisServer {
        let port = self.port.to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
        let deadline = Instant::now() + READY_WITHIN;
        while Instant::now() < deadline {
            let info: String = ::redis::cmd("INFO")
                .arg("replication")
                .query(&mut replica.client())
                .expect("INFO replication");
            if info.contains("master_link_status:up") {
                return replica;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the Redis replica did not catch up with its primary");
    }

    /// `REPLICAOF NO ONE`: a replica promoted to primary (a failover).
    pub fn promote(&self) {
        let _: () = ::redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query(&mut self.client())
            .expect("REPLICAOF NO ONE");
    }

    /// Starts the process on `self.port`; `false` if it exited or never answered PING.
    fn spawn(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server (installed by scripts/install-deps.sh)");
        let deadline = Instant::now() + READY_WITHIN;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if answers_ping(self.addr()) {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// PING answered with PONG or with NOAUTH (a server that wants a password is up, too).
fn answers_ping(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) => buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"),
        Err(_) => false,
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
