//! Black-box tests of what a reload applies and refuses: upstreams named by DNS stay reachable
//! across a reload, `log.level` takes effect, restart-only settings are refused by name, and
//! whatever the log filter, the libraries that log headers and bodies stay capped at `info`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

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

/// Waits for a log line after byte `from` that contains every one of `needles`; returns the
/// logs after `from`.
async fn wait_for_line(tw: &Tokenward, from: usize, needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = tw.logs()[from..].to_string();
        if logs.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return logs;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needles:?}:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    wait_for("traffic", Duration::from_secs(10), after(50)).await;
    let offset = tw.logs().len();
    tw.signal("HUP");
    wait_for("the SIGHUP reload", Duration::from_secs(10), || {
        reloads_after(offset) >= 1
    })
    .await;
    wait_for("traffic after it", Duration::from_secs(10), after(100)).await;
    let offset = tw.logs().len();
    rewrite_config(
        &tw,
        "grace_period = \"5s\"",
        "grace_period = \"5s\"\n# edited",
    );
    wait_for("the file reload", Duration::from_secs(10), || {
        reloads_after(offset) >= 1
    })
    .await;
    wait_for("traffic after it", Duration::from_secs(10), after(100)).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_applies_log_level() {
    let provider = FakeProvider::start(300, false, None).await;
    let first = FakeUpstream::start().await;
    let second = FakeUpstream::start().await;
    let tw = start_edited(
        &format!("http://{}", first.addr()),
        &oauth2_keys(&provider, ""),
        "level = \"debug\"",
        "level = \"warn\"",
    );
    tw.wait_ready().await;
    assert!(
        !tw.logs().contains("tokenward starting"),
        "info lines are filtered at warn"
    );

    // To info: the reload's own info line is written after the new level is in place.
    // Each edit changes the file's size, so the file poll sees it even where timestamps are
    // coarse, and triggers exactly one reload (a SIGHUP as well would make two).
    rewrite_config(&tw, "level = \"warn\"", "level = \"info,tokenward=info\"");
    wait_for(
        "the reload logged at the new level",
        Duration::from_secs(10),
        || tw.logs().contains("configuration reloaded"),
    )
    .await;

    // Back to warn, with a route change that shows when the reload is done.
    let offset = tw.logs().len();
    let body = std::fs::read_to_string(&tw.config_path).unwrap();
    std::fs::write(
        &tw.config_path,
        body.replace("level = \"info,tokenward=info\"", "level = \"warn\"")
            .replace(&first.addr().to_string(), &second.addr().to_string()),
    )
    .unwrap();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while second.seen().is_empty() {
        assert!(Instant::now() < deadline, "the reload never moved traffic");
        let _ = client.get(tw.url("/probe")).send().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count_after(&tw.logs(), offset, "configuration reloaded"),
        0,
        "an info line was logged after reloading to warn:\n{}",
        &tw.logs()[offset..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_refuses_log_format_and_grace_period_by_name() {
    let (_provider, upstream, tw) = oauth2_setup(300, "").await;
    tw.wait_ready().await;
    let client = reqwest::Client::new();

    let offset = tw.logs().len();
    rewrite_config(&tw, "format = \"json\"", "format = \"text\" # edited");
    let logs = wait_for_line(&tw, offset, &["reload rejected", "log.format changed"]).await;
    assert!(logs.contains("restart"), "{logs}");
    assert!(
        logs.contains(&tw.config_path.display().to_string()),
        "the error names the file: {logs}"
    );
    // Still JSON: the rejection itself is a JSON line.
    assert!(
        logs.lines()
            .filter(|l| l.contains("reload rejected"))
            .all(|l| l.starts_with('{')),
        "{logs}"
    );
    assert_eq!(client.get(tw.url("/a")).send().await.unwrap().status(), 200);

    let offset = tw.logs().len();
    let body = std::fs::read_to_string(&tw.config_path).unwrap();
    std::fs::write(
        &tw.config_path,
        body.replace("format = \"text\" # edited", "format = \"json\"")
            .replace("grace_period = \"5s\"", "grace_period = \"30s\""),
    )
    .unwrap();
    let logs = wait_for_line(
        &tw,
        offset,
        &["reload rejected", "server.grace_period changed"],
    )
    .await;
    assert!(!logs.contains("log.format changed"), "{logs}");
    assert_eq!(client.get(tw.url("/b")).send().await.unwrap().status(), 200);
    assert_eq!(upstream.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_log_filter_lets_libraries_log_headers_or_bodies() {
    let provider = FakeProvider::start(300, false, None).await;
    let upstream = FakeUpstream::start().await;
    let tw = start_edited(
        &format!("http://{}", upstream.addr()),
        &oauth2_keys(&provider, ""),
        "level = \"debug\"",
        "level = \"pingora_proxy::proxy_h1=debug,pingora_core=trace,pingora_pool=trace,trace\"",
    );
    tw.wait_ready().await;
    let marker = format!("marker{}", rand_hex());
    let client = reqwest::Client::new();
    for path in ["/one", "/two"] {
        let r = client
            .post(tw.url(path))
            .header("x-marker", format!("{marker}-header"))
            .body(format!("{marker}-body"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let echoed = r.text().await.unwrap();
        assert!(
            echoed.contains(&format!("{marker}-header")),
            "the upstream echoes the header, so the response carries it too"
        );
    }
    let logs = tw.logs();
    assert!(
        logs.contains("tokenward starting"),
        "logs were captured: {logs}"
    );
    assert!(
        !logs.contains(&marker),
        "request or response content appears in the logs:\n{logs}"
    );
    let mut secrets = provider.issued();
    secrets.push(CLIENT_SECRET.into());
    tw.assert_no_leaks(&secrets).await;
}
