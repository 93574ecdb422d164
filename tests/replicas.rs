//! Many replicas, one refresh chain: tokenward instances sharing a credential through a real
//! `redis-server` make one provider refresh per lifetime between them, take over a dead holder's
//! lease, ride out a Redis outage and repopulate an emptied Redis — against a provider that
//! rotates refresh tokens strictly (a spent one is refused).

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::*;

const STORE_KEY: &str = "5d4b8f0a1c2e3f40516273849aabbccddeeff00112233445566778899aabbcc0";

/// A replica: its own listeners and state dir, the shared Redis, the same credential.
fn replica(upstream: &FakeUpstream, redis: &RedisServer, keys: &str) -> Tokenward {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = (free_port(), free_port());
    let config_path = dir.path().join("tokenward.toml");
    let text = config(
        proxy,
        admin,
        &format!("http://{}", upstream.addr()),
        &dir.path().join("state"),
        keys,
    )
    .replace(
        "[state]\n",
        &format!(
            "[state]\nredis = \"{}\"\nencryption_key = \"{STORE_KEY}\"\n",
            redis.url()
        ),
    );
    std::fs::write(&config_path, text).unwrap();
    Tokenward::start_with(dir, config_path, proxy, admin)
}

fn rotating_keys(provider: &FakeProvider, extra: &str) -> String {
    oauth2_keys(
        provider,
        &format!("grant = \"refresh_token\"\nrefresh_token = \"rt-bootstrap\"\n{extra}"),
    )
}

/// Sends a request every `every` through each replica until `until`; returns (sent, failed).
async fn load(urls: Vec<String>, every: Duration, until: Instant) -> (usize, Vec<String>) {
    let mut tasks = Vec::new();
    for url in urls {
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut sent, mut failed) = (0, Vec::new());
            while Instant::now() < until {
                sent += 1;
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => failed.push(format!("{url}: {}", r.status())),
                    Err(e) => failed.push(format!("{url}: {e}")),
                }
                tokio::time::sleep(every).await;
            }
            (sent, failed)
        }));
    }
    let mut all = (0, Vec::new());
    for t in tasks {
        let (sent, failed) = t.await.unwrap();
        all.0 += sent;
        all.1.extend(failed);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_replicas_make_one_refresh_per_lifetime_between_them() {
    let redis = RedisServer::start();
    let provider = FakeProvider::start(4, true, Some("rt-bootstrap")).await;
    provider.set_delay(Duration::from_millis(300));
    let upstream = FakeUpstream::start().await;
    let keys = rotating_keys(&provider, "min_refresh_interval = \"1s\"");
    let replicas: Vec<Tokenward> = (0..8).map(|_| replica(&upstream, &redis, &keys)).collect();
    for tw in &replicas {
        tw.wait_ready().await;
    }
    let commands_before = redis.commands_processed();
    let started = Instant::now();
    let urls = replicas.iter().map(|tw| tw.url("/load")).collect();
    let (sent, failed) = load(
        urls,
        Duration::from_millis(40),
        started + Duration::from_secs(17),
    )
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let commands = redis.commands_processed() - commands_before;
    eprintln!(
        "{sent} requests in {elapsed:.1} s through 8 replicas: {} provider calls, {commands} Redis commands",
        provider.call_count()
    );

    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {failed:?}",
        failed.len()
    );
    assert!(
        provider.refused_calls().is_empty(),
        "{:?}",
        provider.refused_calls()
    );
    // One login at start, then one refresh each time the shared token reaches its soft
    // threshold (67.5–75 % of 4 s, counted from when the request was sent).
    let calls = provider.successful_calls() - 1;
    let (fewest, most) = (
        (elapsed / 3.0).floor() as usize,
        (elapsed / 2.7).ceil() as usize,
    );
    assert!(
        calls + 1 >= fewest && calls <= most + 1,
        "{calls} refreshes in {elapsed:.1} s by 8 replicas (expected {fewest}..={most}, ± 1)"
    );
    assert!(
        (commands as usize) < sent / 2,
        "{commands} Redis commands for {sent} requests"
    );
    // Every replica adopted what another obtained at least once, and none saw a spent token.
    let mut waited = 0.0;
    for tw in &replicas {
        waited += metric(
            &tw.get_text("/metrics").await,
            "tokenward_store_leases_total{credential=\"api\",event=\"waited\"}",
        );
    }
    assert!(waited >= 1.0, "replicas waited for the holder's refresh");
    let shared = replicas[0].get_text("/metrics").await;
    assert_eq!(
        metric(
            &shared,
            "tokenward_store_mode{credential=\"api\",mode=\"shared\"}"
        ),
        1.0
    );
    assert!(
        metric(
            &shared,
            "tokenward_store_operations_total{op=\"load\",outcome=\"ok\"}"
        ) >= 1.0
    );

    // Nothing in Redis is a token, a secret or the credential's name in the clear.
    let mut needles: Vec<String> = provider.issued();
    needles.extend([
        CLIENT_SECRET.to_string(),
        "api".to_string(),
        "rt-bootstrap".into(),
    ]);
    for needle in &needles {
        assert!(
            !redis.holds_bytes(needle.as_bytes()),
            "Redis holds {needle:?} in the clear"
        );
    }
    assert!(!redis.keys().is_empty(), "the chain is in Redis");
    for tw in &replicas {
        tw.assert_no_leaks(&needles[..needles.len() - 1]).await;
    }
}

/// The lease holder is SIGKILLed while its provider call waits on a slow provider, which
/// therefore never answers it: the kill closes the connection and the fake provider drops the
/// request before it rotates. Another replica takes the lease over once it lapses and continues
/// the chain; the killed one restarts and adopts the stored token.
///
/// What this does not (and cannot) show: a holder killed after the provider rotated and before
/// its write loses the only copy of the new refresh token, and the takeover then presents the
/// spent one — README, "When the store loses or goes back".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_holder_killed_before_the_provider_rotated_is_taken_over() {
    let redis = RedisServer::start();
    let provider = FakeProvider::start(300, true, Some("rt-bootstrap")).await;
    let upstream = FakeUpstream::start().await;
    let keys = rotating_keys(&provider, "min_refresh_interval = \"0s\"\ntimeout = \"2s\"");
    let mut holder = replica(&upstream, &redis, &keys);
    holder.wait_ready().await;
    let other = replica(&upstream, &redis, &keys);
    other.wait_ready().await;
    assert_eq!(provider.successful_calls(), 1, "the second replica adopted");

    provider.set_delay(Duration::from_secs(3));
    let client = reqwest::Client::new();
    let forced = {
        let (client, url) = (client.clone(), holder.admin_url("/tokens/api/refresh"));
        tokio::spawn(async move { client.post(url).send().await })
    };
    wait_for("the holder's lease", Duration::from_secs(5), || {
        redis.keys().iter().any(|k| k.ends_with(":lease"))
    })
    .await;
    wait_for("the holder's provider call", Duration::from_secs(5), || {
        provider.state.in_flight() > 0
    })
    .await;
    holder.kill9();
    let _ = forced.await;
    provider.set_delay(Duration::ZERO);

    // The taker waits out the longest the dead holder's provider call could have lasted
    // (2 × timeout + 1 s) before presenting the refresh token: longer than a forced call waits,
    // so the flight ends after the answer.
    let r = client
        .post(other.admin_url("/tokens/api/refresh"))
        .send()
        .await
        .unwrap();
    if r.status() != 200 {
        let body = r.text().await.unwrap();
        assert!(body.contains("the exchange goes on"), "{body}");
    }
    wait_for("the taker's refresh", Duration::from_secs(15), || {
        provider.successful_calls() == 2
    })
    .await;
    let m = other.get_text("/metrics").await;
    assert_eq!(
        metric(
            &m,
            "tokenward_store_leases_total{credential=\"api\",event=\"taken_over\"}"
        ),
        1.0
    );
    holder.restart();
    holder.wait_ready().await;
    assert_eq!(
        client.get(holder.url("/x")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        client.get(other.url("/x")).send().await.unwrap().status(),
        200
    );
    assert!(
        provider.refused_calls().is_empty(),
        "{:?}",
        provider.refused_calls()
    );
    // The login, the refresh the holder died in (cut before the provider rotated: none of its
    // calls is recorded as refused or answered), the takeover.
    assert_eq!(provider.successful_calls(), 2, "{:?}", provider.calls());
    let holder_token = &holder.get_json("/tokens/api").await["token"]["issued_at"];
    let other_token = &other.get_json("/tokens/api").await["token"]["issued_at"];
    assert_eq!(
        holder_token, other_token,
        "the restarted replica adopted the stored token"
    );
}

/// Redis is stopped right after a refresh and restarted empty: every request succeeds on the
/// valid tokens, the replicas report the outage, and the store is repopulated from them without
/// a provider call; the chain then continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_lost_and_restarted_empty_is_repopulated_without_a_provider_call() {
    let mut redis = RedisServer::start();
    let provider = FakeProvider::start(300, true, Some("rt-bootstrap")).await;
    let upstream = FakeUpstream::start().await;
    let keys = rotating_keys(&provider, "min_refresh_interval = \"0s\"\ntimeout = \"2s\"");
    let a = replica(&upstream, &redis, &keys);
    let b = replica(&upstream, &redis, &keys);
    a.wait_ready().await;
    b.wait_ready().await;
    assert_eq!(provider.successful_calls(), 1);

    redis.stop();
    let urls = vec![a.url("/down"), b.url("/down")];
    let (sent, failed) = load(
        urls,
        Duration::from_millis(50),
        Instant::now() + Duration::from_secs(7),
    )
    .await;
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {failed:?}",
        failed.len()
    );
    let status = a.get_json("/tokens/api").await;
    assert_eq!(status["store_mode"], "hold", "{status}");
    let ready = a.get_json("/readyz").await;
    assert_eq!(ready["store_degraded"]["api"], "hold", "{ready}");

    redis.restart();
    wait_for("the chain back in Redis", Duration::from_secs(10), || {
        !redis.keys().is_empty()
    })
    .await;
    wait_for(
        "both replicas shared again",
        Duration::from_secs(10),
        || {
            [&a, &b]
                .iter()
                .all(|tw| tw.logs().contains("token store available again"))
        },
    )
    .await;
    assert_eq!(
        provider.successful_calls(),
        1,
        "repopulated without a provider call"
    );

    // The chain continues from the repopulated state: a forced refresh on each replica presents
    // the newest refresh token, never a spent one. A store that lost its data settles first
    // (every replica writes back what it holds), which may outlast the forced call's wait.
    let client = reqwest::Client::new();
    for (tw, calls) in [(&a, 2), (&b, 3)] {
        let r = client
            .post(tw.admin_url("/tokens/api/refresh"))
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            let body = r.text().await.unwrap();
            assert!(body.contains("the exchange goes on"), "{body}");
        }
        wait_for("the forced refresh", Duration::from_secs(15), || {
            provider.successful_calls() >= calls
        })
        .await;
    }
    assert!(
        provider.refused_calls().is_empty(),
        "{:?}",
        provider.refused_calls()
    );
    assert_eq!(provider.successful_calls(), 3);
}
