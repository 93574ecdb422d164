//! Black-box tests of the token lifecycle: single flight on a cold cache, refresh ahead of
//! expiry, provider outages, and refresh-token rotation across a crash.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_requests_on_a_cold_cache_cause_one_provider_call() {
    let provider = FakeProvider::start(300, false, None).await;
    // Slow enough that every request arrives while the first provider call is in flight.
    provider.set_delay(Duration::from_millis(1500));
    let upstream = FakeUpstream::start().await;
    let tw = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &oauth2_keys(&provider, ""),
    );
    tw.wait_healthy().await;

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let ok = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let client = client.clone();
            let url = tw.url(&format!("/r/{i}"));
            let ok = ok.clone();
            tokio::spawn(async move {
                if let Ok(r) = client
                    .get(url)
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await
                {
                    if r.status() == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(ok.load(Ordering::Relaxed), 1000);
    assert_eq!(
        provider.call_count(),
        1,
        "provider calls: {:?}",
        provider.calls()
    );
    assert_eq!(upstream.seen().len(), 1000);
    // A request is counted once its answer is written, so the client can see the last answer
    // a moment before the metric does: wait for the count, then check it is exact.
    let served = "tokenward_requests_total{route=\"api\",status_class=\"2xx\"}";
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut metrics = tw.get_text("/metrics").await;
    while metric(&metrics, served) < 1000.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        metrics = tw.get_text("/metrics").await;
    }
    assert!(
        metric(
            &metrics,
            "tokenward_single_flight_coalesced_total{credential=\"api\"}"
        ) >= 1.0
    );
    assert_eq!(metric(&metrics, served), 1000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refreshes_ahead_of_expiry_without_making_requests_wait() {
    let (provider, _upstream, tw) = oauth2_setup(
        4,
        "min_refresh_interval = \"1s\"\nexpiry_margin = \"200ms\"",
    )
    .await;
    tw.wait_ready().await;
    // Every provider call now takes 600 ms: a request that waited for one would show it.
    provider.set_delay(Duration::from_millis(600));
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut tokens = std::collections::BTreeSet::new();
    let mut requests = 0;
    while started.elapsed() < Duration::from_secs(9) && requests < 2000 {
        let t = Instant::now();
        let r = client.get(tw.url("/tick")).send().await.unwrap();
        slowest = slowest.max(t.elapsed());
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        tokens.insert(
            body["headers"]["authorization"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        requests += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        tokens.len() >= 3,
        "expected at least two refreshes in 9s of 4s tokens, saw {} tokens",
        tokens.len()
    );
    assert!(
        slowest < Duration::from_millis(450),
        "a request waited {slowest:?}: it should never wait for a refresh"
    );
    // Each refresh happened before the previous token stopped being served (3.8 s of 4 s).
    let calls = provider.calls();
    for pair in calls.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap < Duration::from_secs(4),
            "refresh {gap:?} after the previous token: too late"
        );
        assert!(
            gap >= Duration::from_millis(900),
            "refresh {gap:?} after the previous one: spinning"
        );
    }
    let metrics = tw.get_text("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "tokenward_single_flight_coalesced_total{credential=\"api\"}"
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provider_outage_serves_the_valid_token_then_503_json_then_recovers() {
    let (provider, upstream, tw) = oauth2_setup(
        3,
        "min_refresh_interval = \"1s\"\nexpiry_margin = \"1s\"\nprobe_interval = \"500ms\"",
    )
    .await;
    tw.wait_ready().await;
    let first_token_at = Instant::now();
    provider.set_mode(Mode::Status(503));
    let client = reqwest::Client::new();

    // While the token is valid (2.7 s usable), no request fails even though refreshes do.
    let mut sent = 0;
    let mut failed = 0;
    while first_token_at.elapsed() < Duration::from_millis(2400) {
        sent += 1;
        if client.get(tw.url("/during")).send().await.unwrap().status() != 200 {
            failed += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sent > 20);
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed while a valid token existed"
    );
    assert!(
        provider.call_count() >= 1,
        "a refresh was attempted during the outage"
    );

    // After expiry: a JSON 503 with Retry-After, never the expired token.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = upstream.seen().len();
    let r = client.get(tw.url("/after-expiry")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "token_unavailable");
    assert_eq!(body["credential"], "api");
    assert_eq!(body["reason"], "provider_unavailable", "{body}");
    let status = tw.get_json("/tokens/api").await;
    assert!(
        status["last_error"].as_str().unwrap().contains("503"),
        "{status}"
    );
    assert_eq!(
        upstream.seen().len(),
        before,
        "nothing was sent upstream without a token"
    );
    let ready = reqwest::get(tw.admin_url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);

    // A dead provider is probed at the probe interval, not once per request.
    let calls_before = provider.call_count();
    for _ in 0..50 {
        let _ = client.get(tw.url("/herd")).send().await.unwrap();
    }
    let herd_calls = provider.call_count() - calls_before;
    assert!(
        herd_calls <= 3,
        "50 requests caused {herd_calls} provider calls"
    );

    // The provider returns: service recovers within about a second.
    provider.set_mode(Mode::Ok);
    let back = Instant::now();
    loop {
        let r = client.get(tw.url("/recovered")).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_millis(1500),
            "not recovered after {:?}",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut secrets = provider.issued();
    secrets.push(CLIENT_SECRET.into());
    tw.assert_no_leaks(&secrets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_after_rotation_uses_the_rotated_refresh_token() {
    let bootstrap = format!("rt-boot-{}", rand_hex());
    let provider = FakeProvider::start(2, true, Some(&bootstrap)).await;
    let upstream = FakeUpstream::start().await;
    let mut tw = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &oauth2_keys(
            &provider,
            &format!(
                "grant = \"refresh_token\"\nrefresh_token = \"{bootstrap}\"\nmin_refresh_interval = \"1s\""
            ),
        ),
    );
    tw.wait_ready().await;
    // Let it rotate a few times.
    let deadline = Instant::now() + Duration::from_secs(10);
    while provider.successful_calls() < 3 {
        assert!(
            Instant::now() < deadline,
            "no rotations: {:?}",
            provider.calls()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state_file = tw.dir.path().join("state/api.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&state_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The provider revokes a refresh token as soon as it rotates it, so a kill between its
    // answer and the fsync would lose the chain whatever tokenward does (tests/crash.rs covers
    // that with a provider that keeps the previous token): kill once the newest is on disk.
    // Rotations are over a second apart, so the next one cannot start before the kill lands.
    let deadline = Instant::now() + Duration::from_secs(5);
    let newest = loop {
        let newest = provider.valid_refresh().unwrap();
        let state = std::fs::read_to_string(&state_file).unwrap_or_default();
        if state.contains(newest.as_str()) {
            break newest;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated refresh token never reached the state file"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    let calls_at_kill = provider.call_count();
    tw.kill9_and_restart();
    tw.wait_ready().await;
    let after: Vec<Call> = provider.calls()[calls_at_kill..].to_vec();
    assert!(!after.is_empty());
    assert_eq!(
        after[0].outcome, 200,
        "first call after restart: {:?}",
        after[0]
    );
    assert_eq!(
        after[0].refresh_token.as_deref(),
        Some(newest.as_str()),
        "the restart did not resume from the newest refresh token"
    );
    assert_ne!(
        after[0].refresh_token.as_deref(),
        Some(bootstrap.as_str()),
        "restart went back to the bootstrap token"
    );
    assert!(
        provider.calls().iter().all(|c| c.outcome == 200),
        "a refresh was rejected: {:?}",
        provider.calls()
    );
    assert_eq!(reqwest::get(tw.url("/x")).await.unwrap().status(), 200);

    let mut secrets = provider.issued();
    secrets.push(CLIENT_SECRET.into());
    tw.assert_no_leaks(&secrets).await;
    // Rotation goes on after the restart: the file catches up with each new token.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let newest = provider.valid_refresh().unwrap();
        let state = std::fs::read_to_string(&state_file).unwrap_or_default();
        if state.contains(newest.as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the state file does not hold the newest refresh token"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_provider_answers_are_reported_not_served() {
    let provider = FakeProvider::start(300, false, None).await;
    provider.set_mode(Mode::Garbage("<html>gateway error</html>"));
    let upstream = FakeUpstream::start().await;
    let tw = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &oauth2_keys(&provider, ""),
    );
    tw.wait_healthy().await;
    let r = reqwest::get(tw.url("/x")).await.unwrap();
    assert_eq!(r.status(), 503);
    let status = tw.get_json("/tokens").await;
    let c = &status["credentials"][0];
    assert_eq!(c["state"], "pending");
    assert!(c["last_error"].as_str().unwrap().contains("HTML"), "{c}");
    assert!(upstream.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_client_credentials_are_fatal_and_not_retried() {
    let provider = FakeProvider::start(300, false, None).await;
    let upstream = FakeUpstream::start().await;
    let keys = oauth2_keys(&provider, "").replace(CLIENT_SECRET, "wrong-secret-value");
    let tw = Tokenward::start(&format!("http://{}", upstream.addr()), &keys);
    tw.wait_healthy().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..20 {
        assert_eq!(reqwest::get(tw.url("/x")).await.unwrap().status(), 503);
    }
    assert_eq!(
        provider.call_count(),
        1,
        "a fatal error was retried: {:?}",
        provider.calls()
    );
    let status = tw.get_json("/tokens").await;
    assert_eq!(status["credentials"][0]["state"], "fatal");
    let metrics = tw.get_text("/metrics").await;
    assert_eq!(
        metric(&metrics, "tokenward_credential_fatal{credential=\"api\"}"),
        1.0
    );
    tw.assert_no_leaks(&["wrong-secret-value".to_string()])
        .await;
}
