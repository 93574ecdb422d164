//! Black-box tests of operations: hot reload (config change, secret rotation, bad config, no
//! connection dropped), the admin actions, and a real Prometheus scraping tokenward.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_moves_traffic_keeps_unchanged_tokens_and_drops_no_request() {
    let provider = FakeProvider::start(300, false, None).await;
    let first = FakeUpstream::start().await;
    let second = FakeUpstream::start().await;
    let tw = Tokenward::start(
        &format!("http://{}", first.addr()),
        &oauth2_keys(&provider, ""),
    );
    tw.wait_ready().await;

    // Steady keep-alive load for the whole test, bounded in count and time.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, sent, failed, url) =
            (stop.clone(), sent.clone(), failed.clone(), tw.url("/load"));
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(30)
                && sent.load(Ordering::Relaxed) < 20_000
            {
                sent.fetch_add(1, Ordering::Relaxed);
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {}
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    // 1. A route change on file save: traffic moves, the unchanged credential keeps its token.
    rewrite_config(&tw, &first.addr().to_string(), &second.addr().to_string());
    wait_for(
        "traffic on the new upstream",
        Duration::from_secs(5),
        || !second.seen().is_empty(),
    )
    .await;
    assert_eq!(
        provider.call_count(),
        1,
        "an unchanged credential was refreshed by the reload"
    );

    // 2. A bad config is rejected with a clear log line; the running one keeps serving.
    rewrite_config(&tw, "threads = 2", "threads = 2\nbogus_key = 1");
    wait_for("the rejection in the logs", Duration::from_secs(5), || {
        tw.logs().contains("reload rejected")
    })
    .await;
    assert!(
        tw.logs().contains("bogus_key"),
        "the rejection names the key"
    );
    let before = second.seen().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        second.seen().len() > before,
        "still serving after a rejected reload"
    );
    rewrite_config(&tw, "threads = 2\nbogus_key = 1", "threads = 2");

    // 3. SIGHUP with a changed credential: it gets a new token before traffic moves to it.
    rewrite_config(
        &tw,
        "client_secret =",
        "scope = \"reloaded\"\nclient_secret =",
    );
    let logs_before = tw.logs().len();
    tw.signal("HUP");
    wait_for("a reload", Duration::from_secs(5), || {
        tw.logs()[logs_before..].contains("configuration reloaded")
    })
    .await;
    assert_eq!(
        provider.successful_calls(),
        2,
        "the changed credential obtained one new token"
    );

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(sent > 100, "only {sent} requests were sent");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed across reloads"
    );
    let mut secrets = provider.issued();
    secrets.push(CLIENT_SECRET.into());
    tw.assert_no_leaks(&secrets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_secret_file_is_picked_up_without_restart() {
    let provider = FakeProvider::start(300, false, None).await;
    let upstream = FakeUpstream::start().await;
    let secrets_dir = tempfile::tempdir().unwrap();
    let secret_file = secrets_dir.path().join("client_secret");
    std::fs::write(&secret_file, "stale-secret-value\n").unwrap();
    let keys = oauth2_keys(&provider, "").replace(
        &format!("\"{CLIENT_SECRET}\""),
        &format!("{{ file = \"{}\" }}", secret_file.display()),
    );
    let tw = Tokenward::start(&format!("http://{}", upstream.addr()), &keys);
    tw.wait_healthy().await;
    wait_for("the fatal state", Duration::from_secs(5), || {
        provider.call_count() >= 1
    })
    .await;
    assert_eq!(reqwest::get(tw.url("/x")).await.unwrap().status(), 503);

    // Kubernetes replaces secret files atomically: write aside, then rename over.
    let tmp = secrets_dir.path().join(".client_secret.new");
    std::fs::write(&tmp, format!("{CLIENT_SECRET}\n")).unwrap();
    std::fs::rename(&tmp, &secret_file).unwrap();
    tw.wait_ready().await;
    assert_eq!(reqwest::get(tw.url("/x")).await.unwrap().status(), 200);
    tw.assert_no_leaks(&[CLIENT_SECRET.to_string(), "stale-secret-value".to_string()])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_refresh_and_invalidate() {
    let (provider, upstream, tw) = oauth2_setup(300, "").await;
    tw.wait_ready().await;
    let client = reqwest::Client::new();

    let r = client
        .post(tw.admin_url("/tokens/api/refresh"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["generation"], 2);
    assert!(body["expires_at"].is_string());
    assert_eq!(provider.successful_calls(), 2);

    let r = client
        .post(tw.admin_url("/tokens/api/invalidate"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["invalidated"],
        true
    );
    assert_eq!(client.get(tw.url("/y")).send().await.unwrap().status(), 200);
    wait_for(
        "a new token after invalidation",
        Duration::from_secs(3),
        || provider.successful_calls() == 3,
    )
    .await;
    let seen = upstream.seen();
    assert_eq!(
        seen.last().unwrap().all("authorization"),
        vec![format!("Bearer {}", provider.issued()[2])]
    );

    assert_eq!(
        client
            .post(tw.admin_url("/tokens/nope/refresh"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        client
            .get(tw.admin_url("/tokens/api/refresh"))
            .send()
            .await
            .unwrap()
            .status(),
        405
    );
    assert_eq!(
        client
            .post(tw.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        405
    );
    let one = tw.get_json("/tokens/api").await;
    assert_eq!(one["state"], "valid");
    assert_eq!(one["token"]["generation"], 3);
    let mut secrets = provider.issued();
    secrets.push(CLIENT_SECRET.into());
    tw.assert_no_leaks(&secrets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_scrapes_tokenward() {
    let prometheus =
        which("prometheus").expect("the prometheus binary (scripts/install-deps.sh installs it)");
    let (_provider, _upstream, tw) = oauth2_setup(300, "").await;
    tw.wait_ready().await;
    reqwest::get(tw.url("/warm")).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let web = free_port();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: tokenward\n    static_configs:\n      - targets: ['{}']\n",
            tw.admin
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let query = |q: &'static str| {
        let client = client.clone();
        async move {
            let r = client
                .get(format!("http://{web}/api/v1/query"))
                .query(&[("query", q)])
                .send()
                .await
                .ok()?;
            let body: serde_json::Value = r.json().await.ok()?;
            body["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<f64>()
                .ok()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut up = None;
    while Instant::now() < deadline {
        up = query("up{job=\"tokenward\"}").await;
        if up == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let valid = query("tokenward_token_valid{credential=\"api\"}").await;
    let expiry = query("tokenward_token_expiry_seconds{credential=\"api\"}").await;
    let requests = query("sum(tokenward_requests_total{route=\"api\",status_class=\"2xx\"})").await;
    let build = query("tokenward_build_info").await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(up, Some(1.0), "Prometheus did not see the target up");
    assert_eq!(valid, Some(1.0));
    assert!(
        expiry.is_some_and(|e| e > 200.0 && e <= 300.0),
        "{expiry:?}"
    );
    assert_eq!(requests, Some(1.0));
    assert_eq!(build, Some(1.0));
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_state_store_is_refused() {
    let (_provider, upstream, tw) = oauth2_setup(300, "").await;
    tw.wait_ready().await;
    let logs_before = tw.logs().len();
    rewrite_config(
        &tw,
        "[state]\n",
        "[state]\nredis = \"redis://:store-pw-93d1@127.0.0.1:6379/0\"\n\
         encryption_key = \"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\"\n",
    );
    tw.signal("HUP");
    // The file watcher may also see the change (and a half-written file) first: wait for the
    // restart-only rejection itself.
    wait_for("the rejection in the logs", Duration::from_secs(5), || {
        tw.logs()[logs_before..].contains("take effect only at start")
    })
    .await;
    let logs = tw.logs()[logs_before..].to_string();
    assert!(logs.contains("reload rejected"), "{logs}");
    assert!(
        logs.contains("state.redis") && logs.contains("restart"),
        "{logs}"
    );
    assert!(!logs.contains("configuration reloaded"), "{logs}");
    assert!(!tw.logs().contains("store-pw-93d1"));
    let before = upstream.seen().len();
    let r = reqwest::get(tw.url("/after")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(upstream.seen().len(), before + 1);
}
