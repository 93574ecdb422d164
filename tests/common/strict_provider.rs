//! A token endpoint that rotates refresh tokens strictly, for several accounts at once, the way
//! real providers do: each refresh token works once; presenting a spent one answers
//! `invalid_grant` AND revokes its whole family (the current token of that account dies too).
//! It counts presentations per refresh token and remembers which account each access token
//! belongs to, so a test can say which account an upstream was shown.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

/// One account's refresh family.
#[derive(Debug, Default)]
struct Family {
    /// The one refresh token that works now; `None` once the family is revoked.
    current: Option<String>,
    revoked: bool,
    /// Every refresh token ever issued to this family (the bootstraps included).
    issued: Vec<String>,
}

#[derive(Default)]
struct Inner {
    families: HashMap<String, Family>,
    /// Refresh token → account.
    owner_of_refresh: HashMap<String, String>,
    /// Access token → account.
    owner_of_access: HashMap<String, String>,
    /// Refresh token → times presented.
    presented: HashMap<String, usize>,
    /// (account, refresh token) of each refused presentation.
    refused: Vec<(String, String)>,
    successes: usize,
    lifetime_s: u64,
    delay: Duration,
    /// Answer every request `401 invalid_client` (a revoked client secret, a locked account).
    refusing_client: bool,
    client_refusals: usize,
}

#[derive(Clone)]
pub struct StrictProvider {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    in_flight: Arc<AtomicUsize>,
    counter: Arc<AtomicUsize>,
}

impl StrictProvider {
    pub async fn start(lifetime_s: u64) -> StrictProvider {
        let provider = StrictProvider {
            addr: "127.0.0.1:0".parse().unwrap(),
            inner: Arc::new(Mutex::new(Inner {
                lifetime_s,
                ..Inner::default()
            })),
            in_flight: Arc::new(AtomicUsize::new(0)),
            counter: Arc::new(AtomicUsize::new(0)),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/token", post(token_endpoint))
            .with_state(provider.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        StrictProvider { addr, ..provider }
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// Gives `account` a new family whose first refresh token is `bootstrap` (what an operator
    /// obtains by signing in again); the account's previous family, if any, stops working.
    pub fn issue_bootstrap(&self, account: &str, bootstrap: &str) {
        let mut s = self.lock();
        let family = s.families.entry(account.to_string()).or_default();
        family.current = Some(bootstrap.to_string());
        family.revoked = false;
        family.issued.push(bootstrap.to_string());
        s.owner_of_refresh
            .insert(bootstrap.to_string(), account.to_string());
    }

    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// From now on every request is refused as from an unknown client (until told otherwise).
    pub fn refuse_the_client(&self, refuse: bool) {
        self.lock().refusing_client = refuse;
    }

    /// Requests refused as from an unknown client.
    pub fn client_refusals(&self) -> usize {
        self.lock().client_refusals
    }

    pub fn set_lifetime(&self, s: u64) {
        self.lock().lifetime_s = s;
    }

    /// Token requests received and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The account an access token was issued to.
    pub fn owner_of(&self, access_token: &str) -> Option<String> {
        self.lock().owner_of_access.get(access_token).cloned()
    }

    /// Refresh tokens presented more than once, with their counts.
    pub fn presented_twice(&self) -> Vec<(String, usize)> {
        let mut twice: Vec<_> = self
            .lock()
            .presented
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(t, n)| (t.clone(), *n))
            .collect();
        twice.sort();
        twice
    }

    /// Presentations refused (spent, revoked or unknown refresh tokens), as (account, token).
    pub fn refused(&self) -> Vec<(String, String)> {
        self.lock().refused.clone()
    }

    pub fn successes(&self) -> usize {
        self.lock().successes
    }

    /// Whether the account's family was revoked by the presentation of a spent token.
    pub fn revoked(&self, account: &str) -> bool {
        self.lock().families.get(account).is_some_and(|f| f.revoked)
    }

    /// The refresh token that works now for `account`.
    pub fn current(&self, account: &str) -> Option<String> {
        self.lock()
            .families
            .get(account)
            .and_then(|f| f.current.clone())
    }

    /// Every token (refresh and access) issued so far: none may appear in the clear anywhere.
    pub fn all_tokens(&self) -> Vec<String> {
        let s = self.lock();
        s.owner_of_refresh
            .keys()
            .chain(s.owner_of_access.keys())
            .cloned()
            .collect()
    }

    /// A one-line account of what happened, for assertion messages.
    pub fn summary(&self) -> String {
        let s = self.lock();
        format!(
            "{} successes; refused {:?}; presented twice {:?}; revoked {:?}",
            s.successes,
            s.refused,
            s.presented
                .iter()
                .filter(|(_, n)| **n > 1)
                .collect::<Vec<_>>(),
            s.families
                .iter()
                .filter(|(_, f)| f.revoked)
                .map(|(a, _)| a)
                .collect::<Vec<_>>()
        )
    }
}

/// Counts a request in flight until its handler returns or is dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn invalid_grant() -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": "invalid_grant"})),
    )
        .into_response()
}

async fn token_endpoint(State(p): State<StrictProvider>, body: String) -> Response {
    p.in_flight.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight(p.in_flight.clone());
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    if form.get("grant_type").map(String::as_str) != Some("refresh_token") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type"})),
        )
            .into_response();
    }
    let Some(presented) = form.get("refresh_token").cloned() else {
        return invalid_grant();
    };
    // Counted on arrival: a presentation is a presentation even if the caller gives up.
    let delay = {
        let mut s = p.lock();
        *s.presented.entry(presented.clone()).or_default() += 1;
        s.delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut s = p.lock();
    if s.refusing_client {
        s.client_refusals += 1;
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let Some(account) = s.owner_of_refresh.get(&presented).cloned() else {
        s.refused.push(("?".into(), presented));
        return invalid_grant();
    };
    let family = s
        .families
        .get_mut(&account)
        .expect("family of an issued token");
    if family.current.as_deref() != Some(presented.as_str()) {
        // Reuse of a spent token: the family is compromised, revoke all of it.
        family.current = None;
        family.revoked = true;
        s.refused.push((account, presented));
        return invalid_grant();
    }
    let n = p.counter.fetch_add(1, Ordering::SeqCst) + 1;
    let access = format!("at-{account}-{n}-{}", super::rand_hex());
    let refresh = format!("rt-{account}-{n}-{}", super::rand_hex());
    family.current = Some(refresh.clone());
    family.issued.push(refresh.clone());
    s.owner_of_refresh.insert(refresh.clone(), account.clone());
    s.owner_of_access.insert(access.clone(), account);
    s.successes += 1;
    let lifetime = s.lifetime_s;
    (
        StatusCode::OK,
        Json(json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "refresh_token": refresh,
        })),
    )
        .into_response()
}
