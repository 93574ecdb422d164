//! Black-box tests of the proxy threads (`server.threads`): one listening socket per thread on
//! every route listener, every thread serving, and what a connection that has sent nothing yet
//! costs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The inodes of the sockets `pid` holds open.
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// How many of `inodes` are TCP sockets listening on `port` (/proc/net/tcp, state 0A).
fn listening_on(port: u16, inodes: &BTreeSet<u64>) -> usize {
    sockets_on(port, "0A", inodes)
}

/// How many of `inodes` are TCP sockets on local `port` in `state` (/proc/net/tcp).
fn sockets_on(port: u16, state: &str, inodes: &BTreeSet<u64>) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f[1].rsplit(':').next().unwrap();
            u16::from_str_radix(local_port, 16).unwrap() == port
                && f[3] == state
                && inodes.contains(&f[9].parse().unwrap())
        })
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One plain HTTP/1.1 request on its own connection to `proxy`; the status code.
async fn get_on_new_connection(proxy: SocketAddr) -> u16 {
    get_on(tokio::net::TcpStream::connect(proxy).await.unwrap()).await
}

/// One plain HTTP/1.1 request on `conn`, which it then closes; the status code.
async fn get_on(mut conn: tokio::net::TcpStream) -> u16 {
    conn.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    String::from_utf8_lossy(&answer)[9..12].parse().unwrap()
}

/// Each proxy thread's (name, times it went to sleep and was woken: voluntary context switches).
fn proxy_thread_wakeups(pid: u32) -> BTreeMap<String, u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm"))
                .ok()?
                .trim()
                .to_string();
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            let switches = status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
                .trim()
                .parse()
                .ok()?;
            name.starts_with("proxy-").then_some((name, switches))
        })
        .collect()
}

/// Starts tokenward with three proxy threads and `extra_env`, checks how many sockets listen on
/// its route port, and that sixty connections are served, with their token, by all three threads.
async fn three_threads_serve(extra_env: &[(&str, &str)], listening_sockets: usize) -> Tokenward {
    let provider = FakeProvider::start(3600, false, None).await;
    let upstream = FakeUpstream::start().await;
    let mut env = vec![("TOKENWARD_SERVER__THREADS", "3")];
    env.extend_from_slice(extra_env);
    let tw = Tokenward::start_in_env(
        &format!("http://{}", upstream.addr()),
        &oauth2_keys(&provider, ""),
        &env,
    );
    tw.wait_ready().await;
    let port = tw.proxy.port();
    assert_eq!(
        listening_on(port, &socket_inodes(tw.pid())),
        listening_sockets
    );
    let idle = proxy_thread_wakeups(tw.pid());
    assert_eq!(idle.len(), 3, "{idle:?}");
    let requests = 60;
    let mut answers = tokio::task::JoinSet::new();
    for _ in 0..requests {
        answers.spawn(get_on_new_connection(tw.proxy));
    }
    let mut statuses = Vec::new();
    while let Some(status) = answers.join_next().await {
        statuses.push(status.unwrap());
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), requests);
    assert!(
        seen.iter().all(|s| {
            let auth = s.all("authorization");
            auth.len() == 1 && auth[0].starts_with("Bearer ")
        }),
        "every request went upstream with its one token"
    );
    // Every thread took part: an idle proxy thread sleeps in epoll until a connection for it
    // arrives, so each one woke up. A thread the kernel gave none of the sixty connections
    // (odds (2/3)^60 with three sockets) would not have.
    let busy = proxy_thread_wakeups(tw.pid());
    for (name, before) in &idle {
        assert!(
            busy[name] > *before,
            "{name} never woke: {idle:?} -> {busy:?}"
        );
    }
    tw
}

/// Whether another process of the same user could bind `addr` with `SO_REUSEPORT`, and so take
/// a share of its connections.
fn port_can_be_joined(addr: SocketAddr) -> bool {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket.bind(&addr.into()).is_ok() && socket.listen(16).is_ok()
}

#[tokio::test]
async fn each_proxy_thread_listens_on_its_own_socket_and_all_of_them_serve() {
    // One SO_REUSEPORT socket per thread: the kernel spreads connections over them.
    three_threads_serve(&[], 3).await;
}

#[tokio::test]
async fn without_reuse_port_the_threads_share_one_socket_no_one_else_can_join() {
    let tw = three_threads_serve(&[("TOKENWARD_SERVER__REUSE_PORT", "false")], 1).await;
    assert!(!port_can_be_joined(tw.proxy));
}

#[tokio::test]
async fn one_proxy_thread_leaves_its_port_to_no_one_else() {
    let provider = FakeProvider::start(3600, false, None).await;
    let upstream = FakeUpstream::start().await;
    let tw = Tokenward::start_in_env(
        &format!("http://{}", upstream.addr()),
        &oauth2_keys(&provider, ""),
        &[("TOKENWARD_SERVER__THREADS", "1")],
    );
    tw.wait_ready().await;
    assert_eq!(get_on_new_connection(tw.proxy).await, 200);
    // A socket with SO_REUSEPORT would let another process of the same user bind the port and
    // take a share of the app's requests (a container of the same pod running as that user).
    assert!(!port_can_be_joined(tw.proxy));
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_a_minute() {
    let (_provider, _upstream, tw) = oauth2_setup(3600, "").await;
    tw.wait_ready().await;
    let mut silent = tokio::net::TcpStream::connect(tw.proxy).await.unwrap();
    let opened = std::time::Instant::now();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(80), silent.read(&mut buf))
        .await
        .expect("closed within 80 s");
    let after = opened.elapsed();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(after >= Duration::from_secs(59), "closed after {after:?}");
}

#[tokio::test]
async fn a_connection_that_has_sent_nothing_costs_little_memory() {
    let _ = rlimit::increase_nofile_limit(8192);
    let (_provider, _upstream, tw) = oauth2_setup(3600, "").await;
    tw.wait_ready().await;
    assert_eq!(get_on_new_connection(tw.proxy).await, 200);
    let pid = tw.pid();
    let before = rss_kib(pid);
    let held = 2000;
    let mut idle = Vec::with_capacity(held);
    for _ in 0..held {
        idle.push(tokio::net::TcpStream::connect(tw.proxy).await.unwrap());
    }
    // Accepted: tokenward holds an established socket for each (not only the kernel's queue).
    wait_for("every connection accepted", Duration::from_secs(30), || {
        sockets_on(tw.proxy.port(), "01", &socket_inodes(pid)) >= held
    })
    .await;
    let per_connection = (rss_kib(pid).saturating_sub(before)) * 1024 / held as u64;
    // A session with its buffers and the request loop's state is ~12 KiB, a client stream with
    // its write buffer ~3.3 KiB; what is held before the first byte is the accepted socket's
    // task and its I/O registration (~1.3 KiB).
    assert!(
        per_connection < 2560,
        "{per_connection} bytes of RSS per idle connection"
    );
    // And they are still served when they speak.
    assert_eq!(get_on(idle.pop().unwrap()).await, 200);
}
