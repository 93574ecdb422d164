//! Per-caller tokens (RFC 8693 token exchange): the real binary against a fake token endpoint
//! that implements the exchange and mints a token naming each caller.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use common::*;
use serde_json::json;

const AUDIENCE: &str = "orders-api";
const ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";

#[derive(Default)]
struct ExchangeState {
    /// Every call: the subject token and the status answered.
    calls: Mutex<Vec<(String, u16)>>,
    minted: Mutex<Vec<String>>,
    counter: AtomicUsize,
    down: AtomicBool,
    lifetime_s: AtomicUsize,
}

#[derive(Clone)]
struct FakeExchange {
    addr: std::net::SocketAddr,
    state: Arc<ExchangeState>,
}

impl FakeExchange {
    async fn start(lifetime_s: usize) -> Self {
        let state = Arc::new(ExchangeState::default());
        state.lifetime_s.store(lifetime_s, Ordering::SeqCst);
        let router = Router::new()
            .route("/token", post(exchange_endpoint))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        FakeExchange { addr, state }
    }
    fn calls(&self) -> Vec<(String, u16)> {
        self.state.calls.lock().unwrap().clone()
    }
    fn minted(&self) -> Vec<String> {
        self.state.minted.lock().unwrap().clone()
    }
    fn keys(&self, extra: &str) -> String {
        format!(
            "dialect = \"oauth2\"\ngrant = \"token_exchange\"\ntoken_url = \"http://{}/token\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\naudience = \"{AUDIENCE}\"\n{extra}\n",
            self.addr
        )
    }
}

fn refuse(status: StatusCode, error: &str) -> Response {
    (status, Json(json!({"error": error}))).into_response()
}

async fn exchange_endpoint(
    State(s): State<Arc<ExchangeState>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let subject = form.get("subject_token").cloned().unwrap_or_default();
    let record = |status: u16| s.calls.lock().unwrap().push((subject.clone(), status));
    if s.down.load(Ordering::SeqCst) {
        record(503);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "1")],
            Json(json!({"error": "temporarily_unavailable"})),
        )
            .into_response();
    }
    let want = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{CLIENT_ID}:{CLIENT_SECRET}"),
    );
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Basic {want}"))
    {
        record(401);
        return refuse(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let field = |k: &str| form.get(k).map(String::as_str);
    if field("grant_type") != Some("urn:ietf:params:oauth:grant-type:token-exchange")
        || field("subject_token_type") != Some(ACCESS)
        || field("requested_token_type") != Some(ACCESS)
        || field("audience") != Some(AUDIENCE)
        || subject.is_empty()
    {
        record(400);
        return refuse(StatusCode::BAD_REQUEST, "invalid_request");
    }
    if subject.starts_with("bad") {
        record(400);
        return refuse(StatusCode::BAD_REQUEST, "invalid_grant");
    }
    record(200);
    let n = s.counter.fetch_add(1, Ordering::SeqCst) + 1;
    let token = format!("xt-{subject}-{n}");
    s.minted.lock().unwrap().push(token.clone());
    Json(json!({
        "access_token": token,
        "issued_token_type": ACCESS,
        "token_type": "Bearer",
        "expires_in": s.lifetime_s.load(Ordering::SeqCst),
    }))
    .into_response()
}

async fn setup(extra: &str) -> (FakeExchange, FakeUpstream, Tokenward) {
    let provider = FakeExchange::start(300).await;
    let upstream = FakeUpstream::start().await;
    let tw = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &provider.keys(extra),
    );
    // An exchange credential has no token of its own: ready at once.
    tw.wait_ready().await;
    (provider, upstream, tw)
}

fn subject(i: usize) -> String {
    format!("caller{i}-{}", rand_hex())
}

/// The caller id the fake upstream saw in the path, with the Authorization it received.
fn seen_by_caller(upstream: &FakeUpstream) -> Vec<(String, Vec<String>)> {
    upstream
        .seen()
        .into_iter()
        .map(|s| {
            let auth = s
                .all("authorization")
                .into_iter()
                .map(String::from)
                .collect();
            (s.path, auth)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_caller_gets_its_own_token_with_one_exchange_per_caller() {
    let (provider, upstream, tw) = setup("").await;
    let subjects: Vec<String> = (0..50).map(subject).collect();
    let client = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, s) in subjects.iter().enumerate() {
        for r in 0..20 {
            let (client, url, s) = (client.clone(), tw.url(&format!("/who/{i}/{r}")), s.clone());
            tasks.spawn(async move {
                client
                    .get(url)
                    .bearer_auth(s)
                    .send()
                    .await
                    .unwrap()
                    .status()
            });
        }
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let calls = provider.calls();
    assert_eq!(calls.len(), 50, "one exchange per caller: {calls:?}");
    let mut per_subject: HashMap<&str, usize> = HashMap::new();
    for (s, status) in &calls {
        assert_eq!(*status, 200);
        *per_subject.entry(s.as_str()).or_default() += 1;
    }
    assert!(per_subject.values().all(|n| *n == 1), "{per_subject:?}");
    let seen = seen_by_caller(&upstream);
    assert_eq!(seen.len(), 1000);
    for (path, auth) in &seen {
        let i: usize = path.split('/').nth(2).unwrap().parse().unwrap();
        // Exactly one Authorization, the one minted for this caller; the caller's own is gone.
        assert_eq!(auth.len(), 1, "{path}: {auth:?}");
        let want = format!("Bearer xt-{}-", subjects[i]);
        assert!(auth[0].starts_with(&want), "{path} got {:?}", auth[0]);
    }
    let status = tw.get_json("/tokens/api").await;
    assert_eq!(status["state"], "per_caller");
    assert_eq!(status["exchange"]["entries"], 50, "{status}");
    assert_eq!(status["exchange"]["exchanges"]["success"], 50, "{status}");
    // Requests that joined a caller's exchange in flight count as misses too.
    let lookups = &status["exchange"]["lookups"];
    assert_eq!(
        lookups["hit"].as_u64().unwrap() + lookups["miss"].as_u64().unwrap(),
        1000,
        "{status}"
    );
    let mut secrets = subjects.clone();
    secrets.extend(provider.minted());
    tw.assert_no_leaks(&secrets).await;
}

#[tokio::test]
async fn a_request_without_a_subject_token_is_refused_before_anything_else() {
    let (provider, upstream, tw) = setup("").await;
    let r = reqwest::get(tw.url("/x")).await.unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "missing_subject_token");
    assert_eq!(body["route"], "api");
    assert!(provider.calls().is_empty());
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn a_refused_subject_costs_one_exchange_per_negative_ttl() {
    let (provider, upstream, tw) = setup("negative_ttl = \"30s\"").await;
    let bad = format!("bad-{}", rand_hex());
    let client = reqwest::Client::new();
    for _ in 0..100 {
        let r = client
            .get(tw.url("/x"))
            .bearer_auth(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "subject_token_rejected");
    }
    assert_eq!(provider.calls(), vec![(bad.clone(), 400)]);
    assert!(upstream.seen().is_empty());
    let status = tw.get_json("/tokens/api").await;
    assert_eq!(status["exchange"]["lookups"]["negative"], 99, "{status}");
    assert_eq!(status["exchange"]["exchanges"]["rejected"], 1, "{status}");
    tw.assert_no_leaks(&[bad]).await;
}

#[tokio::test]
async fn a_provider_outage_costs_one_call_per_backoff_step_not_one_per_caller() {
    let (provider, upstream, tw) = setup("").await;
    provider.state.down.store(true, Ordering::SeqCst);
    let client = reqwest::Client::new();
    let first = client
        .get(tw.url("/x"))
        .bearer_auth(subject(0))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 503);
    assert_eq!(provider.calls().len(), 1);
    // Two waves of 20 distinct callers: each back-off step (here the provider's Retry-After
    // of 1 s) lets at most one probe through, whatever the number of callers.
    let started = Instant::now();
    for _wave in 0..2 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 1..=20 {
            let (client, url, s) = (client.clone(), tw.url("/x"), subject(i));
            tasks.spawn(async move { client.get(url).bearer_auth(s).send().await.unwrap() });
        }
        while let Some(r) = tasks.join_next().await {
            let r = r.unwrap();
            assert_eq!(r.status(), 503);
            let retry: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(retry >= 1);
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"], "token_unavailable");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let calls = provider.calls().len();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(calls <= 3, "41 callers cost {calls} provider calls");
    assert!(upstream.seen().is_empty());
    // The provider returns: the next caller after the back-off gets its token.
    provider.state.down.store(false, Ordering::SeqCst);
    let s = subject(99);
    let mut ok = false;
    for _ in 0..100 {
        let r = client
            .get(tw.url("/x"))
            .bearer_auth(&s)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "no token after the provider came back");
}

#[tokio::test]
async fn the_cache_stays_bounded_by_cache_max_entries() {
    let (provider, _upstream, tw) = setup("cache_max_entries = 10").await;
    let client = reqwest::Client::new();
    for i in 0..40 {
        let r = client
            .get(tw.url("/x"))
            .bearer_auth(subject(i))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(provider.calls().len(), 40);
    let status = tw.get_json("/tokens/api").await;
    let entries = status["exchange"]["entries"].as_u64().unwrap();
    assert!(entries <= 10, "{status}");
    assert!(entries >= 1, "{status}");
}

#[tokio::test]
async fn an_upstream_rejection_drops_only_that_callers_token_and_replays() {
    let (provider, upstream, tw) = setup("").await;
    let (a, b) = (subject(1), subject(2));
    let client = reqwest::Client::new();
    for s in [&a, &b] {
        let r = client
            .get(tw.url("/x"))
            .bearer_auth(s)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let minted = provider.minted();
    let a1 = minted.iter().find(|t| t.contains(&a)).unwrap().clone();
    upstream.revoke(format!("Bearer {a1}"));
    let r = client
        .get(tw.url("/x"))
        .bearer_auth(&a)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "replayed with a new token");
    let r = client
        .get(tw.url("/x"))
        .bearer_auth(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let calls: Vec<String> = provider.calls().into_iter().map(|(s, _)| s).collect();
    assert_eq!(
        calls,
        vec![a.clone(), b.clone(), a.clone()],
        "only a re-exchanged"
    );
    let last = upstream.seen().pop().unwrap();
    assert!(last.all("authorization")[0].starts_with(&format!("Bearer xt-{b}-")));
}

#[tokio::test]
async fn a_token_past_its_refresh_point_is_exchanged_again_in_the_background() {
    let provider = FakeExchange::start(4).await;
    let upstream = FakeUpstream::start().await;
    let tw = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &provider.keys("refresh_at = 0.5\nmin_refresh_interval = \"1s\"\nexpiry_margin = \"1s\""),
    );
    tw.wait_ready().await;
    let s = subject(7);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    // Steady load: every request is answered from the cache, and a second token appears
    // before the first one stops being served.
    while provider.calls().len() < 2 {
        assert!(Instant::now() < deadline, "no refresh ahead");
        let started = Instant::now();
        let r = client
            .get(tw.url("/x"))
            .bearer_auth(&s)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(started.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut refreshed = false;
    for _ in 0..40 {
        let r = client
            .get(tw.url("/x"))
            .bearer_auth(&s)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let last = upstream.seen().pop().unwrap();
        if last.all("authorization")[0] == format!("Bearer xt-{s}-2") {
            refreshed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refreshed, "the refreshed token is not used");
    assert_eq!(provider.calls().len(), 2);
}
