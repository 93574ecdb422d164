//! The token engine's defences from the hardening review: back-off bounded by the token's own
//! life, waiters with a deadline while a stalled exchange goes on, lifetimes counted from the
//! request, and one writer per refresh chain across reloads and processes on one state dir.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// A 6 s token whose refresh gets `503 Retry-After: 30`, then the provider recovers: the next
/// attempt comes when the token stops being usable, not 30 s later, so no request gets a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_off_never_outlasts_the_token() {
    let (provider, _upstream, tw) =
        oauth2_setup(6, "min_refresh_interval = \"1s\"\nmax_backoff = \"60s\"").await;
    tw.wait_ready().await;
    provider.set_mode(Mode::Busy {
        status: 503,
        retry_after_s: 30,
    });
    wait_for("the refresh-ahead attempt", Duration::from_secs(8), || {
        provider.call_count() >= 2
    })
    .await;
    provider.set_mode(Mode::Ok);
    let client = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(6);
    let mut refused = 0;
    let mut sent = 0;
    while Instant::now() < until {
        let r = client.get(tw.url("/x")).send().await.unwrap();
        sent += 1;
        if r.status() != 200 {
            refused += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        refused, 0,
        "{refused} of {sent} requests refused after the provider recovered"
    );
    assert!(provider.successful_calls() >= 2, "{:?}", provider.calls());
}

/// A secret file that stalls every read (a FIFO with no writer): requests get a JSON 503 within
/// their deadline instead of waiting forever, and the runtime keeps serving everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_secret_read_gives_waiters_a_503_not_a_hang() {
    let provider = FakeProvider::start(300, false, None).await;
    let upstream = FakeUpstream::start().await;
    let (_fifo, path) = stalled_secret("client_secret");
    let keys = format!(
        "dialect = \"oauth2\"\ntoken_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = {{ file = \"{}\" }}\ntimeout = \"1s\"\n",
        provider.token_url(),
        path.display()
    );
    let tw = Tokenward::start(&format!("http://{}", upstream.addr()), &keys);
    tw.wait_healthy().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    for i in 0..3 {
        let started = Instant::now();
        let r = client
            .get(tw.url(&format!("/x{i}")))
            .send()
            .await
            .expect("an answer, not a hang");
        assert_eq!(r.status(), 503);
        assert!(r.headers().get("retry-after").is_some());
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "token_unavailable");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "request {i} waited {:?}",
            started.elapsed()
        );
        let health = client.get(tw.admin_url("/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);
    }
    assert!(
        upstream.seen().is_empty(),
        "nothing went upstream untokened"
    );
    assert_eq!(provider.call_count(), 0);
}

/// A provider that takes 2 s to answer with `expires_in: 6`: the token's lifetime counts from
/// when the request was sent, so it has at most about 4 s left once it arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetime_counts_from_when_the_request_was_sent() {
    let provider = FakeProvider::start(6, false, None).await;
    provider.set_delay(Duration::from_secs(2));
    let upstream = FakeUpstream::start().await;
    let tw = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &oauth2_keys(&provider, "timeout = \"5s\""),
    );
    tw.wait_ready().await;
    let status = tw.get_json("/tokens/api").await;
    let left = status["token"]["expires_in_s"].as_f64().unwrap();
    assert!(
        left <= 4.2,
        "a 6 s token that took 2 s to arrive has {left} s left"
    );
    assert!(left > 2.0, "{status}");
}

/// `tokenward token` run against a live instance's state dir rotates the same chain: the live
/// instance must continue from the rotated token, never present the one `token` spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenward_token_beside_a_live_instance_does_not_fork_the_chain() {
    let provider = FakeProvider::start(300, true, Some("rt-bootstrap")).await;
    let upstream = FakeUpstream::start().await;
    let keys = oauth2_keys(
        &provider,
        "grant = \"refresh_token\"\nrefresh_token = \"rt-bootstrap\"\nmin_refresh_interval = \"0s\"",
    );
    let tw = Tokenward::start(&format!("http://{}", upstream.addr()), &keys);
    tw.wait_ready().await;
    for _ in 0..3 {
        let out = std::process::Command::new(bin())
            .args(["token", "api", "--config"])
            .arg(&tw.config_path)
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let client = reqwest::Client::new();
    let r = client
        .post(tw.admin_url("/tokens/api/refresh"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(client.get(tw.url("/x")).send().await.unwrap().status(), 200);
    let rejected = provider.refused_calls();
    assert!(
        rejected.is_empty(),
        "spent refresh tokens presented: {rejected:?}"
    );
    assert_eq!(provider.successful_calls(), 5);
}

/// Reloads that change a rotating credential's settings while its refreshes are in flight: the
/// new credential continues the old one's chain (one writer), so the provider never sees a
/// spent refresh token and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_a_rotating_credential_under_load_never_forks_its_chain() {
    let provider = FakeProvider::start(2, true, Some("rt-bootstrap")).await;
    provider.set_delay(Duration::from_millis(500));
    let upstream = FakeUpstream::start().await;
    let keys = oauth2_keys(
        &provider,
        "grant = \"refresh_token\"\nrefresh_token = \"rt-bootstrap\"\nmin_refresh_interval = \"0s\"\ntimeout = \"5s\"",
    );
    let tw = Tokenward::start(&format!("http://{}", upstream.addr()), &keys);
    tw.wait_ready().await;
    let load = {
        let url = tw.url("/load");
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut failed = Vec::new();
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until {
                let r = client.get(&url).send().await.unwrap();
                if r.status() != 200 {
                    failed.push(r.status().as_u16());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            failed
        })
    };
    // Two seconds apart, each reload lands while the credential it replaces is refreshing
    // ahead (at 1.35–1.5 s of a 2 s token, for 0.5 s).
    for i in 0..4 {
        // Each change of `timeout` makes a new credential of the same chain.
        let (from, to) = if i % 2 == 0 {
            ("timeout = \"5s\"", "timeout = \"6s\"")
        } else {
            ("timeout = \"6s\"", "timeout = \"5s\"")
        };
        rewrite_config(&tw, from, to);
        tw.signal("HUP");
        tokio::time::sleep(Duration::from_millis(2000)).await;
    }
    let failed = load.await.unwrap();
    assert!(failed.is_empty(), "requests failed: {failed:?}");
    let rejected = provider.refused_calls();
    assert!(
        rejected.is_empty(),
        "spent refresh tokens presented: {rejected:?}"
    );
    assert!(
        tw.logs().contains("configuration reloaded"),
        "the reloads happened"
    );
}
