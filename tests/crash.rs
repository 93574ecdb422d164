//! Crash safety of refresh-token rotation: tokenward is killed with SIGKILL at random points of
//! repeated rotations, and every restart must resume with the newest refresh token the provider
//! issued (never a revoked one), from a state file that is never torn.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use rand::Rng;
use serde_json::json;

use common::*;

/// A provider with rotation as real ones do it: each refresh issues a new refresh token; the
/// previous one stays valid until the new one is first used (so a response lost in flight does
/// not lock the client out), and everything older is revoked.
#[derive(Default)]
struct Chain {
    current: String,
    pending: Option<String>,
    issued: Vec<String>,
    accepted: Vec<String>,
    rejected: Vec<String>,
    n: usize,
    /// Calls received and not yet answered (or dropped).
    in_flight: usize,
}

/// Counts a call as in flight until its handler finishes or is dropped.
struct InFlight(Arc<Mutex<Chain>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().unwrap().in_flight -= 1;
    }
}

async fn refresh(State(chain): State<Arc<Mutex<Chain>>>, body: String) -> Response {
    chain.lock().unwrap().in_flight += 1;
    let _in_flight = InFlight(chain.clone());
    let delay = rand::rng().random_range(0..15);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let presented = form.get("refresh_token").cloned().unwrap_or_default();
    let mut c = chain.lock().unwrap();
    if c.pending.as_deref() == Some(presented.as_str()) {
        // The new token's first use: the chain moves on and the old one dies.
        c.current = presented.clone();
        c.pending = None;
    } else if presented != c.current {
        c.rejected.push(presented);
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant"})),
        )
            .into_response();
    }
    c.accepted.push(presented);
    c.n += 1;
    let next = format!("rt-{}-{}", c.n, rand_hex());
    c.pending = Some(next.clone());
    c.issued.push(next.clone());
    let access = format!("at-{}-{}", c.n, rand_hex());
    c.issued.push(access.clone());
    (
        StatusCode::OK,
        Json(json!({"access_token": access, "expires_in": 300, "refresh_token": next})),
    )
        .into_response()
}

async fn start_provider(bootstrap: &str) -> (SocketAddr, Arc<Mutex<Chain>>) {
    let chain = Arc::new(Mutex::new(Chain {
        current: bootstrap.to_string(),
        ..Default::default()
    }));
    let router = Router::new()
        .route("/token", post(refresh))
        .with_state(chain.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (addr, chain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_rotations_never_loses_the_newest_refresh_token() {
    const TRIALS: usize = 200;
    let bootstrap = format!("rt-boot-{}", rand_hex());
    let (provider, chain) = start_provider(&bootstrap).await;
    let upstream = FakeUpstream::start().await;
    // min_refresh_interval 0s lifts the admin rate limit on forced refreshes (one per interval),
    // so each trial can force a burst of rotations for the kill to land in.
    let keys = format!(
        "dialect = \"oauth2\"\ntoken_url = \"http://{provider}/token\"\ngrant = \"refresh_token\"\nclient_id = \"c\"\nclient_auth = \"none\"\nrefresh_token = \"{bootstrap}\"\nmin_refresh_interval = \"0s\"\n"
    );
    let mut tw = Tokenward::start(&format!("http://{}", upstream.addr()), &keys);
    let state_file = tw.dir.path().join("state/api.json");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let started = Instant::now();
    let mut kills_mid_refresh = 0;

    for trial in 0..TRIALS {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "crash test over its time bound at trial {trial}"
        );
        tw.wait_ready().await;
        // The restart resumed the chain: its first provider call was accepted.
        assert!(
            chain.lock().unwrap().rejected.is_empty(),
            "trial {trial}: a revoked refresh token was used: {:?}",
            chain.lock().unwrap().rejected
        );
        // Force rotations and kill at a random instant among them.
        let kill_after = Duration::from_millis(rand::rng().random_range(0..60));
        let admin = tw.admin_url("/tokens/api/refresh");
        let forcing = {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    if client.post(&admin).send().await.is_err() {
                        return;
                    }
                }
            })
        };
        tokio::time::sleep(kill_after).await;
        tokio::task::block_in_place(|| tw.kill9());
        forcing.abort();
        // Let the provider finish (or drop) what the dead process asked for, then see whether
        // the kill landed mid-refresh: the provider issued a refresh token that never reached
        // the disk, the loss the provider's grace for the previous token has to absorb.
        let settle = Instant::now() + Duration::from_secs(2);
        while chain.lock().unwrap().in_flight > 0 {
            assert!(
                Instant::now() < settle,
                "trial {trial}: provider call stuck"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let on_disk = std::fs::read_to_string(&state_file).ok();
        {
            let c = chain.lock().unwrap();
            let persisted = |p: &String| on_disk.as_ref().is_some_and(|d| d.contains(p.as_str()));
            if c.pending.as_ref().is_some_and(|p| !persisted(p)) {
                kills_mid_refresh += 1;
            }
        }
        tw.restart();
        // Whatever instant the kill hit, the state file is whole JSON, owner-only.
        if let Some(text) = on_disk {
            let parsed: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("trial {trial}: torn state file: {e}"));
            assert!(
                parsed["refresh_token"].is_string(),
                "trial {trial}: {parsed}"
            );
        }
    }
    tw.wait_ready().await;
    let c = chain.lock().unwrap();
    assert!(
        c.rejected.is_empty(),
        "revoked refresh tokens were used: {:?}",
        c.rejected
    );
    assert!(c.n > TRIALS, "only {} rotations in {TRIALS} trials", c.n);
    eprintln!(
        "{TRIALS} kills, {} rotations, {kills_mid_refresh} kills landed mid-refresh",
        c.n
    );
    // Runs land 70–90 of 200 kills between the provider's rotation and the fsync; without a
    // good share of those the test would prove nothing about crash safety.
    assert!(
        kills_mid_refresh >= TRIALS / 10,
        "only {kills_mid_refresh} of {TRIALS} kills landed mid-refresh"
    );
    // The state file and its lock file (kept: it is what two processes lock) stay; no
    // temporary file of a killed write does.
    let leftovers: Vec<_> = std::fs::read_dir(tw.dir.path().join("state"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != ".api.lock")
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary files left behind: {leftovers:?}"
    );
    let secrets = c.issued.clone();
    drop(c);
    tw.assert_no_leaks(&secrets).await;
}
