//! Black-box tests of what a reload applies: upstreams named by DNS stay reachable across a
//! reload.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

async fn wait_until<F: Fn() -> bool>(what: &str, within: Duration, f: F) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rewrite(tw: &Tokenward, from: &str, to: &str) {
    let body = std::fs::read_to_string(&tw.config_path).unwrap();
    assert!(body.contains(from), "{from:?} not in config");
    std::fs::write(&tw.config_path, body.replace(from, to)).unwrap();
}

/// Tokenward with the harness config, `from` replaced by `to` before it starts.
fn start_edited(upstream: &str, credential: &str, from: &str, to: &str) -> Tokenward {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = (free_port(), free_port());
    let path = dir.path().join("tokenward.toml");
    let text = config(
        proxy,
        admin,
        upstream,
        &dir.path().join("state"),
        credential,
    );
    assert!(text.contains(from), "{from:?} not in config");
    std::fs::write(&path, text.replace(from, to)).unwrap();
    Tokenward::start_with(dir, path, proxy, admin)
}

/// How many lines of `logs` after byte `from` contain `needle`.
fn count_after(logs: &str, from: usize, needle: &str) -> usize {
    logs[from..].lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstreams_named_by_dns_stay_reachable_across_reloads() {
    let provider = FakeProvider::start(300, false, None).await;
    let upstream = FakeUpstream::start().await;
    let port = upstream.addr().port();
    // Where `localhost` also resolves to ::1, serve there too, so either address works.
    if let Ok(v6) = tokio::net::TcpListener::bind(("::1", port)).await {
        let router = upstream.router();
        tokio::spawn(async move {
            let _ = axum::serve(v6, router).await;
        });
    }
    let tw = Tokenward::start(
        &format!("http://localhost:{port}"),
        &oauth2_keys(&provider, ""),
    );
    tw.wait_ready().await;
    let client = reqwest::Client::new();
    let url = tw.url("/dns");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = client.get(&url).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "localhost never became reachable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A steady request loop across two reloads (SIGHUP, then a file change).
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let statuses = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load = {
        let (stop, sent, failed, statuses) =
            (stop.clone(), sent.clone(), failed.clone(), statuses.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(30)
                && sent.load(Ordering::Relaxed) < 3000
            {
                sent.fetch_add(1, Ordering::Relaxed);
                let status = match client.get(&url).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                if status != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                    statuses.lock().unwrap().push(status);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let reloads_after = |offset: usize| count_after(&tw.logs(), offset, "configuration reloaded");
    let after = |n: usize| {
        let sent = sent.clone();
        let target = sent.load(Ordering::Relaxed) + n;
        move || sent.load(Ordering::Relaxed) >= target
    };
    wait_until("traffic", Duration::from_secs(10), after(50)).await;
    let offset = tw.logs().len();
    tw.signal("HUP");
    wait_until("the SIGHUP reload", Duration::from_secs(10), || {
        reloads_after(offset) >= 1
    })
    .await;
    wait_until("traffic after it", Duration::from_secs(10), after(100)).await;
    let offset = tw.logs().len();
    rewrite(
        &tw,
        "grace_period = \"5s\"",
        "grace_period = \"5s\"\n# edited",
    );
    wait_until("the file reload", Duration::from_secs(10), || {
        reloads_after(offset) >= 1
    })
    .await;
    wait_until("traffic after it", Duration::from_secs(10), after(100)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(
        failed,
        0,
        "{failed} of {sent} requests failed across reloads (statuses {:?})",
        statuses.lock().unwrap()
    );
}
