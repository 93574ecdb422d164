//! The subject issuer's key set over time (`subject_jwks_url`): refreshed as the issuer's
//! `Cache-Control: max-age` says, on a rotation that `kid`-less tokens reveal, never faster than
//! twice a second whatever callers send, and kept across an outage for at most
//! `subject_jwks_max_stale`. The real binary against a fake issuer that publishes the keys the
//! test chooses and records each fetch.

mod common;

use std::time::{Duration, Instant};

use common::jwks::*;
use common::*;

async fn start(idp: &FakeIdp, extra: &str) -> (FakeUpstream, Tokenward) {
    let upstream = FakeUpstream::start().await;
    let tw = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &idp.credential(extra),
    );
    tw.wait_ready().await;
    (upstream, tw)
}

#[tokio::test]
async fn a_key_the_issuer_withdraws_is_refused_within_its_max_age() {
    let idp = FakeIdp::start().await;
    let (k1, k2) = (TestKey::new("k1"), TestKey::new("k2"));
    idp.publish(vec![k1.jwk(), k2.jwk()]);
    idp.set_max_age(Some(5));
    let (_upstream, tw) = start(&idp, "min_refresh_interval = \"1s\"").await;
    let mut sent = vec![subject_token(&k1, "alice")];
    let (status, body, _) = call(&tw, &sent[0]).await;
    assert_eq!(status, 200, "{body}");

    // The issuer withdraws k1. Every token below names a kid tokenward already knows, so
    // nothing but the issuer's max-age can make it look at the key set again.
    idp.publish(vec![k2.jwk()]);
    let withdrawn = Instant::now();
    let fetches_before = idp.fetches().len();
    loop {
        let token = subject_token(&k1, "mallory");
        sent.push(token.clone());
        let (status, body, _) = call(&tw, &token).await;
        if status == 401 {
            assert_eq!(body["error"], "subject_token_rejected");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            withdrawn.elapsed() < Duration::from_secs(15),
            "a key withdrawn 15 s ago is still trusted ({} JWKS fetches since)",
            idp.fetches().len() - fetches_before
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(idp.fetches().len() > fetches_before);
    let bob = subject_token(&k2, "bob");
    assert_eq!(call(&tw, &bob).await.0, 200, "the key still published");
    let late = subject_token(&k1, "mallory");
    assert_eq!(call(&tw, &late).await.0, 401);
    assert!(!idp.exchanged().contains(&late));
    sent.extend([bob, late]);
    tw.assert_no_leaks(&sent).await;
}

#[tokio::test]
async fn kid_less_tokens_are_accepted_after_the_issuer_rotates_its_key() {
    let idp = FakeIdp::start().await;
    let (old, new) = (TestKey::new("old"), TestKey::new("new"));
    // An issuer that publishes one key and names none: neither tokens nor the JWKS carry kids.
    idp.publish(vec![old.jwk_without_kid()]);
    idp.set_max_age(Some(5));
    let (_upstream, tw) = start(&idp, "min_refresh_interval = \"1s\"").await;
    let token =
        |key: &TestKey, sub: &str| key.sign_without_kid(claims(sub, ISSUER, SUBJECT_AUD, 300));
    let first = token(&old, "alice");
    assert_eq!(call(&tw, &first).await.0, 200);

    idp.publish(vec![new.jwk_without_kid()]);
    let rotated = Instant::now();
    let mut sent = vec![first];
    loop {
        let t = token(&new, "bob");
        sent.push(t.clone());
        let (status, body, _) = call(&tw, &t).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 401, "{body}");
        assert!(
            rotated.elapsed() < Duration::from_secs(15),
            "tokens of the new key are still refused 15 s after the rotation"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let stale = token(&old, "mallory");
    assert_eq!(call(&tw, &stale).await.0, 401, "the rotated-out key");
    sent.push(stale);
    tw.assert_no_leaks(&sent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_kids_cost_at_most_two_jwks_fetches_a_second_and_one_log_line() {
    let idp = FakeIdp::start().await;
    let k1 = TestKey::new("k1");
    idp.publish(vec![k1.jwk()]);
    // 0s lifts every other limit on refreshes; not this one.
    let (_upstream, tw) = start(&idp, "min_refresh_interval = \"0s\"").await;
    assert_eq!(call(&tw, &subject_token(&k1, "alice")).await.0, 200);
    let before = idp.fetches().len();

    // 60 tokens under kids nobody published, 10 at a time, over about two seconds.
    let stranger = TestKey::new("stranger");
    let tw = std::sync::Arc::new(tw);
    let mut sent = Vec::new();
    for _ in 0..6 {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let token = stranger.sign_as(&rand_hex(), claims("mallory", ISSUER, SUBJECT_AUD, 300));
            sent.push(token.clone());
            let tw = tw.clone();
            batch.spawn(async move { call(&tw, &token).await.0 });
        }
        while let Some(status) = batch.join_next().await {
            assert_eq!(status.unwrap(), 401);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let fetches = idp.fetches()[before..].to_vec();
    assert!(!fetches.is_empty(), "an unknown kid refetches the key set");
    for (i, at) in fetches.iter().enumerate() {
        let within_a_second = fetches[i..]
            .iter()
            .take_while(|t| t.duration_since(*at) < Duration::from_secs(1))
            .count();
        assert!(
            within_a_second <= 2,
            "{within_a_second} JWKS fetches within one second ({} in all)",
            fetches.len()
        );
    }
    assert!(
        idp.exchanged().len() == 1,
        "an unknown kid reached the provider"
    );

    // One WARN line for the 60 refusals; the rest are counted.
    let logs = tw.logs();
    let lines = logs
        .matches("subject token failed local validation")
        .count();
    assert_eq!(lines, 1, "{logs}");
    let metrics = tw.get_text("/metrics").await;
    let suppressed = metric(
        &metrics,
        "tokenward_log_lines_suppressed_total{credential=\"api\",reason=\"its kid is not in the issuer's JWKS\"}",
    );
    assert_eq!(suppressed, 59.0, "{metrics}");
    tw.assert_no_leaks(&sent).await;
}

#[tokio::test]
async fn a_jwks_that_stays_down_serves_its_last_keys_for_subject_jwks_max_stale_then_503() {
    let idp = FakeIdp::start().await;
    let k1 = TestKey::new("k1");
    idp.publish(vec![k1.jwk()]);
    idp.set_max_age(Some(5));
    let (_upstream, tw) = start(
        &idp,
        "min_refresh_interval = \"1s\"\nsubject_jwks_max_stale = \"4s\"",
    )
    .await;
    assert_eq!(call(&tw, &subject_token(&k1, "alice")).await.0, 200);
    idp.set_down(true);
    let good = *idp.fetches().last().unwrap();

    // Fresh for 5 s, then stale but kept for 4 s more: new callers are still served.
    while good.elapsed() < Duration::from_secs(8) {
        let (status, body, _) = call(&tw, &subject_token(&k1, "bob")).await;
        assert_eq!(status, 200, "at {:?}: {body}", good.elapsed());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Then 503 with Retry-After (never 401: the caller did nothing wrong).
    let retry = loop {
        let (status, body, retry) = call(&tw, &subject_token(&k1, "carol")).await;
        if status == 503 {
            assert_eq!(body["error"], "token_unavailable", "{body}");
            break retry.expect("a 503 carries Retry-After");
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            good.elapsed() < Duration::from_secs(12),
            "a key set 12 s old is still used with subject_jwks_max_stale = 4s and max-age 5"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(retry.parse::<u64>().unwrap() >= 1, "{retry}");
    let (status, _, _) = call(&tw, &subject_token(&k1, "dave")).await;
    assert_eq!(status, 503);
    let logs = tw.logs();
    assert!(
        logs.contains("cannot fetch the subject issuer's JWKS"),
        "{logs}"
    );

    // The issuer comes back: served again without a restart.
    idp.set_down(false);
    let back = Instant::now();
    loop {
        let (status, body, _) = call(&tw, &subject_token(&k1, "erin")).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(back.elapsed() < Duration::from_secs(20), "not served again");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `subject_jwks_proxy` is the only way to a JWKS host tokenward cannot reach directly: here a
/// name that resolves nowhere, which the forward proxy (the fake, answering the absolute-form
/// request itself) serves. The token endpoint is still reached directly.
#[tokio::test]
async fn the_jwks_is_fetched_through_subject_jwks_proxy() {
    let idp = FakeIdp::start().await;
    let k1 = TestKey::new("k1");
    idp.publish(vec![k1.jwk()]);
    let upstream = FakeUpstream::start().await;
    let credential = idp.credential_with_jwks_at(
        "http://jwks.unreachable.invalid/jwks",
        &format!("subject_jwks_proxy = \"http://{}\"", idp.addr),
    );
    let tw = Tokenward::start(&format!("http://{}", upstream.addr()), &credential);
    tw.wait_ready().await;
    let alice = subject_token(&k1, "alice");
    let (status, body, _) = call(&tw, &alice).await;
    assert_eq!(status, 200, "{body}");
    assert!(!idp.fetches().is_empty());
    assert_eq!(idp.exchanged(), vec![alice]);
}

/// A JWKS host that hangs: requests with unknown kids queue for the one fetch in progress and
/// share its answer (the fetch times out), instead of each waiting for a fetch of its own in
/// turn; a request under a known kid is not held up at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_behind_a_hanging_jwks_share_one_fetch() {
    let idp = FakeIdp::start().await;
    let k1 = TestKey::new("k1");
    idp.publish(vec![k1.jwk()]);
    let (_upstream, tw) = start(&idp, "timeout = \"1s\"\nmin_refresh_interval = \"1s\"").await;
    assert_eq!(call(&tw, &subject_token(&k1, "alice")).await.0, 200);
    // Past the floor between refetches since the fetch at start, so the wave below fetches.
    let last = *idp.fetches().last().unwrap();
    tokio::time::sleep_until((last + Duration::from_millis(1100)).into()).await;
    idp.set_delay(Duration::from_secs(30));
    let before = idp.fetches().len();
    let stranger = TestKey::new("stranger");
    let tw = std::sync::Arc::new(tw);
    let started = Instant::now();
    let mut batch = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let token = stranger.sign_as(&rand_hex(), claims("mallory", ISSUER, SUBJECT_AUD, 300));
        let tw = tw.clone();
        batch.spawn(async move { (call(&tw, &token).await.0, started.elapsed()) });
    }
    assert_eq!(call(&tw, &subject_token(&k1, "bob")).await.0, 200);
    while let Some(answer) = batch.join_next().await {
        let (status, after) = answer.unwrap();
        assert_eq!(status, 401);
        assert!(after < Duration::from_secs(5), "answered after {after:?}");
    }
    let fetches = idp.fetches().len() - before;
    assert!(
        fetches <= 2,
        "{fetches} fetches for one wave of unknown kids"
    );
}

/// A key the issuer rotates in just after tokenward fetched the set (within the 1 s floor
/// between refetches) is found: its first token waits for the next allowed fetch instead of
/// being refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_rotated_in_just_after_a_fetch_is_accepted_at_its_first_use() {
    let idp = FakeIdp::start().await;
    let (k1, k2) = (TestKey::new("k1"), TestKey::new("k2"));
    idp.publish(vec![k1.jwk()]);
    let (_upstream, tw) = start(&idp, "min_refresh_interval = \"1s\"").await;
    // An unknown kid refetches now; the next refetch may come only a second later.
    let stranger = TestKey::new("stranger");
    let forged = stranger.sign_as("nobody", claims("mallory", ISSUER, SUBJECT_AUD, 300));
    assert_eq!(call(&tw, &forged).await.0, 401);
    idp.publish(vec![k1.jwk(), k2.jwk()]);
    assert_eq!(call(&tw, &subject_token(&k2, "carol")).await.0, 200);
}
