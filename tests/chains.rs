//! A chain is one account with one history. Replicas of tokenward sharing a real `redis-server`
//! against a provider that rotates strictly (each refresh token works once; a spent one answers
//! `invalid_grant` and revokes the account's whole family): two accounts on one client never
//! share a chain, and routine operations never make a replica present a spent refresh token.

mod common;
#[path = "common/strict_provider.rs"]
mod strict_provider;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::*;
use strict_provider::StrictProvider;

const STORE_KEY: &str = "1f2e3d4c5b6a79880716253443526170ffeeddccbbaa99887766554433221100";

/// One route per `(route, credential, upstream)`; each credential an oauth2 refresh-token
/// credential on the one client, its bootstrap read from `DIR/NAME.rt`, plus `extra` lines.
fn chain_config(
    dir: &Path,
    admin: SocketAddr,
    redis_url: &str,
    provider: &StrictProvider,
    routes: &[(SocketAddr, &str, &FakeUpstream)],
    extra: &str,
) -> String {
    let mut text = format!(
        r#"[log]
format = "json"
level = "debug"
[admin]
listen = "{admin}"
[state]
dir = "{state}"
redis = "{redis}"
encryption_key = "{STORE_KEY}"
[server]
threads = 2
grace_period = "5s"
"#,
        state = dir.join("state").display(),
        redis = redis_url,
    );
    for (listen, name, upstream) in routes {
        text.push_str(&format!(
            "[[routes]]\nname = \"{name}\"\nlisten = \"{listen}\"\nupstream = \"http://{}\"\ncredential = \"{name}\"\n",
            upstream.addr()
        ));
    }
    for (_, name, _) in routes {
        // Forced refreshes follow each other closely in these tests, unless one says otherwise.
        let interval = if extra.contains("min_refresh_interval") {
            ""
        } else {
            "min_refresh_interval = \"0s\"\n"
        };
        text.push_str(&format!(
            "[credentials.{name}]\ndialect = \"oauth2\"\ntoken_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\ngrant = \"refresh_token\"\nrefresh_token = {{ file = \"{}\" }}\n{interval}{extra}\n",
            provider.token_url(),
            dir.join(format!("{name}.rt")).display(),
        ));
    }
    text
}

/// A replica serving `accounts` (each a route and a credential of that name, to its own
/// upstream), with bootstrap files written from the provider's current tokens of `secrets_dir`.
fn replica(
    redis_url: &str,
    provider: &StrictProvider,
    secrets_dir: &Path,
    accounts: &[(&str, &FakeUpstream)],
    extra: &str,
) -> (Tokenward, Vec<SocketAddr>) {
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let ports: Vec<SocketAddr> = accounts.iter().map(|_| free_port()).collect();
    let routes: Vec<(SocketAddr, &str, &FakeUpstream)> = accounts
        .iter()
        .zip(&ports)
        .map(|((name, up), port)| (*port, *name, *up))
        .collect();
    let config_path = dir.path().join("tokenward.toml");
    std::fs::write(
        &config_path,
        chain_config(secrets_dir, admin, redis_url, provider, &routes, extra),
    )
    .unwrap();
    let proxy = ports[0];
    (Tokenward::start_with(dir, config_path, proxy, admin), ports)
}

/// Sends `n` requests to each address, `every` apart; returns the failures.
async fn requests(addrs: &[SocketAddr], n: usize, every: Duration) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut failed = Vec::new();
    for _ in 0..n {
        for addr in addrs {
            match client.get(format!("http://{addr}/r")).send().await {
                Ok(r) if r.status() == 200 => {}
                Ok(r) => failed.push(format!("{addr}: {}", r.status())),
                Err(e) => failed.push(format!("{addr}: {e}")),
            }
        }
        tokio::time::sleep(every).await;
    }
    failed
}

/// The accounts whose tokens an upstream was shown (by the provider's record of who each
/// access token was issued to), with the count of requests per account.
fn accounts_seen(upstream: &FakeUpstream, provider: &StrictProvider) -> Vec<(String, usize)> {
    let mut seen = std::collections::BTreeMap::new();
    for s in upstream.seen() {
        for auth in s.all("authorization") {
            let token = auth.strip_prefix("Bearer ").unwrap_or(auth);
            let who = provider
                .owner_of(token)
                .unwrap_or_else(|| format!("unknown token {token:?}"));
            *seen.entry(who).or_insert(0) += 1;
        }
    }
    seen.into_iter().collect()
}

/// Asks `tw` for a forced refresh of `credential` (the admin API's) and returns its answer.
async fn post_refresh(tw: &Tokenward, credential: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(tw.admin_url(&format!("/tokens/{credential}/refresh")))
        .send()
        .await
        .unwrap()
}

async fn force_refresh(tw: &Tokenward, credential: &str) {
    let r = post_refresh(tw, credential).await;
    assert_eq!(
        r.status(),
        200,
        "forced refresh of {credential}: {}",
        r.text().await.unwrap()
    );
}

/// Forces a refresh of `api` and waits until it has ended with a new token: the forced call
/// answers within the request wait limit, and a replica settling a store that lost its data
/// takes longer (the flight goes on; its token then shows in `/tokens`).
async fn refresh_and_wait(tw: &Tokenward) {
    let before = token_served(tw).await;
    let deadline = Instant::now() + SOON;
    loop {
        let r = post_refresh(tw, "api").await;
        if r.status() == 200 {
            return;
        }
        let body = r.text().await.unwrap();
        if body.contains("the exchange goes on") {
            break;
        }
        // The first command after a failover meets the connection to the old primary.
        assert!(
            body.contains("token store unavailable") && Instant::now() < deadline,
            "{body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for_new_token(tw, &before).await;
}

/// Rewrites `from` to `to` in `tw`'s config and reloads it with SIGHUP, waiting for the reload.
async fn reload(tw: &Tokenward, from: &str, to: &str) {
    let reloads = || tw.logs().matches("configuration reloaded").count();
    let before = reloads();
    rewrite_config(tw, from, to);
    tw.signal("HUP");
    wait_for("the reload", SOON, || reloads() > before).await;
}

/// Waits until `tw` serves a token other than `before`, failing after [`SOON`].
async fn wait_for_new_token(tw: &Tokenward, before: &str) {
    let deadline = Instant::now() + SOON;
    while token_served(tw).await == before {
        assert!(
            Instant::now() < deadline,
            "no new token: {}",
            tw.get_json("/tokens/api").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Defect 1: alice's and bob's credentials differ only in the bootstrap refresh token (one
/// token URL, one client id). Each is its own chain: every request on alice's route reaches the
/// upstream with alice's token, on both replicas, through scheduled and forced refreshes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_accounts_on_one_client_never_see_each_others_tokens() {
    let redis = RedisServer::start();
    let provider = StrictProvider::start(4).await;
    let secrets = tempfile::tempdir().unwrap();
    for account in ["alice", "bob"] {
        let boot = format!("rt-{account}-bootstrap");
        provider.issue_bootstrap(account, &boot);
        std::fs::write(secrets.path().join(format!("{account}.rt")), boot).unwrap();
    }
    let (to_alice, to_bob) = (FakeUpstream::start().await, FakeUpstream::start().await);
    let accounts = [("alice", &to_alice), ("bob", &to_bob)];
    let (one, one_ports) = replica(&redis.url(), &provider, secrets.path(), &accounts, "");
    one.wait_ready().await;
    let (two, two_ports) = replica(&redis.url(), &provider, secrets.path(), &accounts, "");
    two.wait_ready().await;

    let all: Vec<SocketAddr> = one_ports.iter().chain(&two_ports).copied().collect();
    // Past one scheduled refresh (75 % of 4 s) of each chain.
    let mut failed = requests(&all, 25, Duration::from_millis(200)).await;
    for tw in [&one, &two] {
        for account in ["alice", "bob"] {
            force_refresh(tw, account).await;
        }
    }
    failed.extend(requests(&all, 5, Duration::from_millis(50)).await);

    let alice = accounts_seen(&to_alice, &provider);
    let bob = accounts_seen(&to_bob, &provider);
    assert!(
        alice.len() == 1 && alice[0].0 == "alice",
        "alice's upstream saw {alice:?}"
    );
    assert!(
        bob.len() == 1 && bob[0].0 == "bob",
        "bob's upstream saw {bob:?}"
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(provider.refused().is_empty(), "{}", provider.summary());
    assert!(!provider.revoked("alice") && !provider.revoked("bob"));
    // Two chains in Redis, each with its lease key at most.
    let chains = redis.chain_keys();
    assert_eq!(chains.len(), 2, "{chains:?}");
}

/// F1, across deployments: alice's deployment and bob's have separate configs (so the load-time
/// check sees only one of them) and read the bootstrap refresh token from the same place, the
/// same variable, with another account's value behind it in each (as each deployment's pods
/// mount their own Secret at one path). The chain's identity includes a keyed fingerprint of the
/// value: each account keeps its own chain, each upstream only ever sees its own account's
/// tokens through forced refreshes on every replica, and neither family is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_deployments_reading_one_bootstrap_place_keep_their_accounts_apart() {
    let redis = RedisServer::start();
    let provider = StrictProvider::start(60).await;
    let (to_alice, to_bob) = (FakeUpstream::start().await, FakeUpstream::start().await);
    let deployment = |account: &str, upstream: &FakeUpstream| {
        let dir = tempfile::tempdir().unwrap();
        let (admin, listen) = (free_port(), free_port());
        let text = chain_config(
            dir.path(),
            admin,
            &redis.url(),
            &provider,
            &[(listen, "api", upstream)],
            "timeout = \"1s\"",
        )
        .replace(
            &format!("{{ file = \"{}\" }}", dir.path().join("api.rt").display()),
            "{ env = \"TW_BOOTSTRAP_RT\" }",
        );
        assert!(text.contains("TW_BOOTSTRAP_RT"), "{text}");
        let path = dir.path().join("tokenward.toml");
        std::fs::write(&path, text).unwrap();
        let value = format!("rt-{account}-bootstrap");
        let tw =
            Tokenward::start_with_env(dir, path, listen, admin, &[("TW_BOOTSTRAP_RT", &value)]);
        (tw, listen)
    };
    for account in ["alice", "bob"] {
        provider.issue_bootstrap(account, &format!("rt-{account}-bootstrap"));
    }
    let mut all = Vec::new();
    for (account, upstream) in [("alice", &to_alice), ("alice", &to_alice), ("bob", &to_bob)] {
        let (tw, addr) = deployment(account, upstream);
        tw.wait_ready().await;
        all.push((tw, addr));
    }
    let addrs: Vec<SocketAddr> = all.iter().map(|(_, a)| *a).collect();
    assert_served(&addrs, 3).await;
    for (tw, _) in all.iter().chain(all.iter().rev()) {
        refresh_and_wait(tw).await;
    }
    assert_served(&addrs, 3).await;

    let alice = accounts_seen(&to_alice, &provider);
    let bob = accounts_seen(&to_bob, &provider);
    assert!(
        alice.len() == 1 && alice[0].0 == "alice",
        "alice's upstream saw {alice:?}"
    );
    assert!(
        bob.len() == 1 && bob[0].0 == "bob",
        "bob's upstream saw {bob:?}"
    );
    assert!(provider.refused().is_empty(), "{}", provider.summary());
    assert!(
        provider.presented_twice().is_empty(),
        "{}",
        provider.summary()
    );
    assert!(!provider.revoked("alice") && !provider.revoked("bob"));
    let chains = redis.chain_keys();
    assert_eq!(chains.len(), 2, "{chains:?}");
}

/// Runs `tokenward check` on the config at `path` (the load-error test does it twice): whether
/// it loaded, and what it wrote (stderr, then stdout).
fn check_config(path: &Path) -> (bool, String) {
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), text)
}

/// Two credentials that read their bootstrap refresh token from the same file are one account:
/// in a shared store that is refused at load, naming both, until one names its own chain.
#[tokio::test]
async fn one_account_twice_in_one_config_is_a_load_error_naming_both() {
    let OneAccount {
        redis,
        provider,
        secrets,
        upstream: up,
    } = OneAccount::start(60).await;
    std::fs::write(secrets.path().join("shared.rt"), "rt-x").unwrap();
    let text = chain_config(
        secrets.path(),
        free_port(),
        &redis.url(),
        &provider,
        &[(free_port(), "orders", &up), (free_port(), "billing", &up)],
        "",
    )
    .replace(
        &format!("{}/billing.rt", secrets.path().display()),
        &format!("{}/shared.rt", secrets.path().display()),
    )
    .replace(
        &format!("{}/orders.rt", secrets.path().display()),
        &format!("{}/shared.rt", secrets.path().display()),
    );
    let path = secrets.path().join("tokenward.toml");
    std::fs::write(&path, &text).unwrap();
    let (loaded, stderr) = check_config(&path);
    assert!(!loaded, "{stderr}");
    assert!(
        stderr.contains("credentials.orders")
            && stderr.contains("\"billing\"")
            && stderr.contains("tokenward.toml")
            && stderr.contains("chain"),
        "{stderr}"
    );

    // Named apart, they load.
    let named = text.replace(
        "[credentials.orders]\n",
        "[credentials.orders]\nchain = \"orders-account\"\n",
    );
    std::fs::write(&path, named).unwrap();
    let (_, text) = check_config(&path);
    assert!(
        !text.contains("same provider, client and account"),
        "{text}"
    );
}

/// What every test of one account's chain starts from, so each test shows only what it does
/// differently: a Redis, a provider rotating strictly, a folder for bootstrap files, an upstream.
struct OneAccount {
    redis: RedisServer,
    provider: StrictProvider,
    secrets: tempfile::TempDir,
    upstream: FakeUpstream,
}

/// A replica of the credential `api` and its route's address.
type Replica = (Tokenward, SocketAddr);

impl OneAccount {
    /// A fresh Redis and a provider issuing tokens that live `lifetime_s`.
    async fn start(lifetime_s: u64) -> OneAccount {
        OneAccount::on(RedisServer::start(), lifetime_s).await
    }

    /// Like [`OneAccount::start`], on `redis` set up by the test.
    async fn on(redis: RedisServer, lifetime_s: u64) -> OneAccount {
        let provider = StrictProvider::start(lifetime_s).await;
        let secrets = tempfile::tempdir().unwrap();
        let upstream = FakeUpstream::start().await;
        OneAccount {
            redis,
            provider,
            secrets,
            upstream,
        }
    }

    /// `n` replicas of one credential `api` (bootstrap in `secrets/api.rt`) on the fixture's
    /// Redis, with `extra` lines in the credential; each ready before the next starts.
    async fn replicas(&self, n: usize, extra: &str) -> Vec<Replica> {
        self.replicas_via(&self.redis.url(), n, extra).await
    }

    /// Like [`OneAccount::replicas`], reaching Redis at `redis_url` (a forwarder, say).
    async fn replicas_via(&self, redis_url: &str, n: usize, extra: &str) -> Vec<Replica> {
        self.provider.issue_bootstrap("api", "rt-api-bootstrap");
        std::fs::write(self.secrets.path().join("api.rt"), "rt-api-bootstrap").unwrap();
        let mut out = Vec::new();
        for _ in 0..n {
            let (tw, ports) = replica(
                redis_url,
                &self.provider,
                self.secrets.path(),
                &[("api", &self.upstream)],
                extra,
            );
            tw.wait_ready().await;
            out.push((tw, ports[0]));
        }
        out
    }

    /// Replicas A and B (A started first), as most tests name them.
    async fn two_replicas(&self, extra: &str) -> (Replica, Replica) {
        pair(self.replicas(2, extra).await)
    }
}

/// The two replicas of `reps`, first started first.
fn pair(mut reps: Vec<Replica>) -> (Replica, Replica) {
    let b = reps.pop().unwrap();
    let a = reps.pop().unwrap();
    (a, b)
}

/// A forced refresh of `api` on `tw`, sent in the background so the test can act while it
/// runs; its answer is awaited later.
fn spawn_forced_refresh(
    tw: &Tokenward,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    let url = tw.admin_url("/tokens/api/refresh");
    tokio::spawn(async move { reqwest::Client::new().post(url).send().await })
}

/// Makes the provider answer after `delay`, starts a forced refresh on `holder` and waits until
/// its provider call is in flight: from then on `holder` holds the lease in a slow call.
async fn start_slow_refresh(
    holder: &Tokenward,
    provider: &StrictProvider,
    delay: Duration,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    provider.set_delay(delay);
    let call = spawn_forced_refresh(holder);
    wait_for("the holder's provider call", SOON, || {
        provider.in_flight() > 0
    })
    .await;
    call
}

/// Asserts that a forced refresh sent in the background answered 200.
async fn assert_refreshed(call: tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>) {
    let r = call.await.unwrap().unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// Asserts that `n` requests to each address, 50 ms apart, are all served.
async fn assert_served(addrs: &[SocketAddr], n: usize) {
    let failed = requests(addrs, n, Duration::from_millis(50)).await;
    assert!(failed.is_empty(), "{failed:?}");
}

/// Polls `tw`'s `/tokens/api` until `done` holds of it, failing with the last status after
/// [`SOON`].
async fn wait_for_status(tw: &Tokenward, done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + SOON;
    loop {
        let status = tw.get_json("/tokens/api").await;
        if done(&status) {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The access token a replica serves now, as its upstream is sent it.
async fn token_served(tw: &Tokenward) -> String {
    let r = reqwest::get(tw.url("/which")).await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    body["headers"]["authorization"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The chain's state key in Redis (the one key that is not a lease).
fn chain_key(redis: &RedisServer) -> String {
    let keys = redis.chain_keys();
    assert_eq!(keys.len(), 1, "{keys:?}");
    keys[0].clone()
}

/// Waits for the forced refreshes `calls` (whatever they answered), then refreshes A and B once
/// more each, and checks that both serve and that no refresh token was presented twice.
async fn settled_and_intact(
    calls: [tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>; 2],
    (a, a_addr): (&Tokenward, SocketAddr),
    (b, b_addr): (&Tokenward, SocketAddr),
    provider: &StrictProvider,
) {
    for call in calls {
        let _ = call.await.unwrap().unwrap();
    }
    refresh_and_wait(a).await;
    refresh_and_wait(b).await;
    assert_served(&[a_addr, b_addr], 5).await;
    assert_chain_intact(provider);
}

fn assert_chain_intact(provider: &StrictProvider) {
    assert!(provider.refused().is_empty(), "{}", provider.summary());
    assert!(
        provider.presented_twice().is_empty(),
        "{}",
        provider.summary()
    );
    assert!(!provider.revoked("api"), "{}", provider.summary());
}

/// Defect 2: replica A rotates, Redis loses everything, and stale replica B (one rotation
/// behind) writes its state back first. A's newer state wins by lineage: nobody presents the
/// spent refresh token, and the chain goes on from A's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_emptied_after_a_rotation_with_the_stale_replica_writing_first() {
    let account = OneAccount::start(60).await;
    let (redis, provider) = (&account.redis, &account.provider);
    let ((a, a_addr), (b, b_addr)) = account.two_replicas("timeout = \"1s\"").await;
    assert_eq!(provider.successes(), 1, "B adopted A's token");

    // A rotates and is frozen at once, before B's sync can adopt the rotation.
    force_refresh(&a, "api").await;
    a.signal("STOP");
    redis.flush_all();
    wait_for("B's state written back", SOON, || {
        !redis.chain_keys().is_empty()
    })
    .await;
    a.signal("CONT");

    // B is asked to refresh right away, and A after it: neither presents a spent token.
    refresh_and_wait(&b).await;
    refresh_and_wait(&a).await;
    assert_served(&[a_addr, b_addr], 5).await;
    assert_chain_intact(provider);
    // The login, A's rotation, then one refresh each.
    assert_eq!(provider.successes(), 4, "{}", provider.summary());
}

/// Redis loses everything while replica A is one rotation behind B; A's refresh writes A's
/// state back and settles under the lease, and B's refresh, started right after, waits for that
/// lease. B's flight holds B's chain, so B's periodic comparison with Redis is skipped: B must
/// write its newer state back while it waits, or A's settle ends with A presenting the refresh
/// token B already spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_waiting_for_the_lease_writes_its_newer_state_back() {
    let account = OneAccount::start(60).await;
    let (redis, provider) = (&account.redis, &account.provider);
    let ((a, a_addr), (b, b_addr)) = account.two_replicas("timeout = \"1s\"").await;

    a.signal("STOP");
    refresh_and_wait(&b).await;
    redis.flush_all();
    a.signal("CONT");
    let on_a = spawn_forced_refresh(&a);
    wait_for("A's state written back", SOON, || {
        !redis.chain_keys().is_empty()
    })
    .await;
    let on_b = spawn_forced_refresh(&b);
    settled_and_intact([on_a, on_b], (&a, a_addr), (&b, b_addr), provider).await;
}

/// Redis loses everything, both replicas are asked to refresh (one settles the store under the
/// lease, the other waits for it), and Redis loses everything again within the settling time:
/// the first holder's lease went with it and the other replica takes it. The first must not
/// present its refresh token at the end of its wait: only a lease holder does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_emptied_twice_while_the_store_settles() {
    let account = OneAccount::start(60).await;
    let (redis, provider) = (&account.redis, &account.provider);
    let ((a, a_addr), (b, b_addr)) = account.two_replicas("timeout = \"1s\"").await;
    redis.flush_all();
    let on_a = spawn_forced_refresh(&a);
    let on_b = spawn_forced_refresh(&b);
    wait_for("a replica's state written back", SOON, || {
        !redis.chain_keys().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.flush_all();
    settled_and_intact([on_a, on_b], (&a, a_addr), (&b, b_addr), provider).await;
}

/// F2a: Redis loses everything and at once a replica starts with nothing but the bootstrap
/// value, long spent. It waits for the store to settle (the live replica writes its chain
/// back) instead of presenting the spent value, which would revoke the account's family.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_starting_on_an_emptied_store_waits_for_the_live_chain() {
    let fx = OneAccount::start(60).await;
    let reps = fx.replicas(1, "timeout = \"1s\"").await;
    let (a, a_addr) = &reps[0];
    force_refresh(a, "api").await;
    fx.redis.flush_all();
    let (c, ports) = replica(
        &fx.redis.url(),
        &fx.provider,
        fx.secrets.path(),
        &[("api", &fx.upstream)],
        "timeout = \"1s\"",
    );
    c.wait_ready().await;
    assert_served(&[*a_addr, ports[0]], 3).await;
    assert_chain_intact(&fx.provider);
}

/// Defect 3: a store rolled back to an older state (DUMP, a refresh, RESTORE — what a failover
/// to an asynchronous replica that missed the last write leaves) is never adopted: the replicas
/// write their newer state back and the next refreshes present the newest token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolled_back_store_is_not_adopted() {
    let account = OneAccount::start(60).await;
    let (redis, provider) = (&account.redis, &account.provider);
    let ((a, a_addr), (b, b_addr)) = account.two_replicas("timeout = \"1s\"").await;
    let key = chain_key(redis);
    let old = redis.dump(&key);

    force_refresh(&a, "api").await;
    let rotated = token_served(&a).await;
    let mut adopted = false;
    for _ in 0..150 {
        if token_served(&b).await == rotated {
            adopted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(adopted, "B adopts A's rotation at its sync");
    redis.restore(&key, &old);

    refresh_and_wait(&b).await;
    refresh_and_wait(&a).await;
    assert_served(&[a_addr, b_addr], 5).await;
    assert_chain_intact(provider);
    assert_eq!(provider.successes(), 4, "{}", provider.summary());
}

/// Defect 4: Redis is emptied while the lease holder is in a 3 s provider call. Another replica
/// then takes the (vanished) lease and finds the store empty: it must not take its own chain for
/// the newest and present the refresh token the holder is spending. Each refresh token is
/// presented once; the holder's rotated token lands in the emptied store and is adopted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_emptied_during_the_holders_provider_call() {
    let account = OneAccount::start(60).await;
    let (redis, provider) = (&account.redis, &account.provider);
    let ((a, a_addr), (b, b_addr)) = account.two_replicas("timeout = \"4s\"").await;

    let holder = start_slow_refresh(&a, provider, Duration::from_secs(3)).await;
    redis.flush_all();
    provider.set_delay(Duration::ZERO);
    refresh_and_wait(&b).await;
    assert_refreshed(holder).await;

    assert_served(&[a_addr, b_addr], 5).await;
    assert_chain_intact(provider);
    // The login, the holder's refresh, B's refresh from the holder's rotated token.
    assert_eq!(provider.successes(), 3, "{}", provider.summary());
}

/// Defect 6: a change of scope is not a change of account. Replica A is reloaded to another
/// scope and back, B is restarted with the change (a rolling deploy): one chain throughout, no
/// spent token presented, no failed request; the chain's key expires unless written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scope_change_by_reload_or_rolling_restart_keeps_one_chain() {
    let account = OneAccount::start(60).await;
    let (redis, provider) = (&account.redis, &account.provider);
    let ((a, a_addr), (mut b, b_addr)) = account
        .two_replicas("timeout = \"1s\"\nscope = \"read\"")
        .await;
    let key = chain_key(redis);

    for (from, to) in [
        ("scope = \"read\"", "scope = \"read write\""),
        ("scope = \"read write\"", "scope = \"read\""),
    ] {
        reload(&a, from, to).await;
        refresh_and_wait(&a).await;
        refresh_and_wait(&b).await;
    }
    // A rolling restart of B with the change.
    rewrite_config(&b, "scope = \"read\"", "scope = \"read write\"");
    b.kill9_and_restart();
    b.wait_ready().await;
    refresh_and_wait(&b).await;
    refresh_and_wait(&a).await;

    assert_served(&[a_addr, b_addr], 5).await;
    assert_chain_intact(provider);
    assert_eq!(chain_key(redis), key, "one chain throughout");
    assert!(
        redis.pttl(&key) > 29 * 24 * 3600 * 1000,
        "the chain expires"
    );
    // The login, one call per reload that changed the credential, six forced refreshes.
    assert_eq!(provider.successes(), 9, "{}", provider.summary());
}

/// F3, by reload: settings inside the chain's identity change on one replica while the other
/// still runs the old ones — the token URL respelled (127.0.0.1 → localhost, one endpoint), then
/// `chain = "NAME"` added. Each change moves the chain (the old key's state carried to the new
/// key under the old key's lease, a forwarding marker left behind) and the replica still on the
/// old key follows the marker instead of refreshing there: no refresh token is presented twice,
/// every forced refresh succeeds and requests are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identity_changes_by_reload_move_the_chain_for_every_replica() {
    let account = OneAccount::start(60).await;
    let provider = &account.provider;
    let ((a, a_addr), (b, b_addr)) = account.two_replicas("timeout = \"1s\"").await;
    let loopback = provider.token_url();
    let respelled = loopback.replace("127.0.0.1", "localhost");
    let named = "timeout = \"1s\"\nchain = \"api-account\"";

    reload(&a, &loopback, &respelled).await;
    refresh_and_wait(&a).await;
    refresh_and_wait(&b).await;
    assert_served(&[a_addr, b_addr], 3).await;
    reload(&a, "timeout = \"1s\"", named).await;
    refresh_and_wait(&a).await;
    refresh_and_wait(&b).await;
    assert_served(&[a_addr, b_addr], 3).await;
    // The rollout reaches B: both changes at once.
    reload(&b, "timeout = \"1s\"", named).await;
    refresh_and_wait(&b).await;
    refresh_and_wait(&a).await;

    assert_served(&[a_addr, b_addr], 5).await;
    assert_chain_intact(provider);
    // The chain moved twice (A's two reloads) and B followed it each time; B's own reload
    // found it already where its new settings put it.
    let moved = |tw: &Tokenward| tw.logs().matches("moved the chain to its new key").count();
    assert_eq!((moved(&a), moved(&b)), (2, 0), "{}", a.logs());
    assert!(
        b.logs().matches("following it").count() >= 2,
        "{}",
        b.logs()
    );
    // Two markers and the named chain: three keys besides the leases.
    let keys = account.redis.chain_keys();
    assert_eq!(keys.len(), 3, "{keys:?}");
}

/// A chain moved by a reload on replica A, then Redis loses everything before replica B (frozen
/// meanwhile) has followed the marker: the marker went with the data, and each replica would
/// write the chain back under its own key and present one refresh token from both. A restores
/// the markers it left, so B follows the chain instead of refreshing under the old key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_emptied_right_after_a_move_keeps_one_chain() {
    let account = OneAccount::start(60).await;
    let (redis, provider) = (&account.redis, &account.provider);
    let ((a, a_addr), (b, b_addr)) = account.two_replicas("timeout = \"1s\"").await;
    let loopback = provider.token_url();
    reload(&a, &loopback, &loopback.replace("127.0.0.1", "localhost")).await;

    b.signal("STOP");
    refresh_and_wait(&a).await;
    assert!(
        a.logs().contains("moved the chain to its new key"),
        "{}",
        a.logs()
    );
    redis.flush_all();
    b.signal("CONT");

    refresh_and_wait(&b).await;
    refresh_and_wait(&a).await;
    assert_served(&[a_addr, b_addr], 5).await;
    assert_chain_intact(provider);
    assert!(b.logs().contains("following it"), "{}", b.logs());
}

/// A reload that moved the chain is reverted, and the revert reaches the other replica first:
/// B moves the chain back to the key A left a marker at. A follows it back and must not take
/// B's chain there for a store that lost A's marker (writing the marker again would send both
/// keys to each other: a loop, and 503s on every replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_reverted_on_another_replica_first_keeps_the_chain() {
    let account = OneAccount::start(60).await;
    let provider = &account.provider;
    let ((a, a_addr), (b, b_addr)) = account.two_replicas("timeout = \"1s\"").await;
    let loopback = provider.token_url();
    let respelled = loopback.replace("127.0.0.1", "localhost");

    reload(&a, &loopback, &respelled).await;
    refresh_and_wait(&a).await;
    reload(&b, &loopback, &respelled).await;
    refresh_and_wait(&b).await;
    // The revert reaches B first: B moves the chain back; A follows at its next comparison.
    reload(&b, &respelled, &loopback).await;
    refresh_and_wait(&b).await;
    let followed = |tw: &Tokenward| tw.logs().matches("following it").count();
    let before = followed(&a);
    wait_for("A to follow the chain back", SOON, || followed(&a) > before).await;
    // Two more comparisons: A must leave B's chain where it is.
    tokio::time::sleep(Duration::from_secs(11)).await;
    reload(&a, &respelled, &loopback).await;
    refresh_and_wait(&a).await;
    refresh_and_wait(&b).await;

    assert_served(&[a_addr, b_addr], 5).await;
    assert_chain_intact(provider);
    assert!(!a.logs().contains("wrote it again"), "{}", a.logs());
}

/// F3, by rolling restart: replica A restarts with `chain = "NAME"` added while B still runs
/// without it. A finds its named key empty and moves the chain there from the key the same
/// settings derive without the name (the old key's lease, its state carried, a forwarding
/// marker left); B follows the marker. Then B restarts with the name too. No refresh token is
/// presented twice and requests are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn naming_a_chain_by_rolling_restart_moves_it_for_every_replica() {
    let account = OneAccount::start(60).await;
    let provider = &account.provider;
    let ((mut a, a_addr), (mut b, b_addr)) = account.two_replicas("timeout = \"1s\"").await;
    let named = "timeout = \"1s\"\nchain = \"api-account\"";
    refresh_and_wait(&b).await;

    rewrite_config(&a, "timeout = \"1s\"", named);
    a.kill9_and_restart();
    a.wait_ready().await;
    refresh_and_wait(&a).await;
    refresh_and_wait(&b).await;
    assert_served(&[a_addr, b_addr], 3).await;
    assert!(
        b.logs().contains("following it"),
        "B followed the marker: {}",
        b.logs()
    );
    rewrite_config(&b, "timeout = \"1s\"", named);
    b.kill9_and_restart();
    b.wait_ready().await;
    refresh_and_wait(&b).await;
    refresh_and_wait(&a).await;

    assert_served(&[a_addr, b_addr], 5).await;
    assert_chain_intact(provider);
    assert!(
        a.logs().contains("moved the chain to its new key"),
        "{}",
        a.logs()
    );
    // The login, then one refresh per forced refresh: nothing restarted from the bootstrap.
    assert_eq!(provider.successes(), 6, "{}", provider.summary());
}

/// Defect 9: a replica that waits for a live holder's slow provider call and then takes the
/// lease after the holder wrote has not taken anything over: `taken_over` stays 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_for_a_slow_live_holder_is_not_a_takeover() {
    let account = OneAccount::start(60).await;
    let provider = &account.provider;
    let ((a, _), (b, _)) = account.two_replicas("timeout = \"5s\"").await;
    let holder = start_slow_refresh(&a, provider, Duration::from_secs(4)).await;
    // B's forced refresh waits for the holder's lease, then makes its own call.
    let waiter = spawn_forced_refresh(&b);
    assert_eq!(holder.await.unwrap().unwrap().status(), 200);
    provider.set_delay(Duration::ZERO);
    assert_refreshed(waiter).await;
    let m = b.get_text("/metrics").await;
    let lease = |event: &str| {
        metric(
            &m,
            &format!("tokenward_store_leases_total{{credential=\"api\",event=\"{event}\"}}"),
        )
    };
    assert!(lease("waited") >= 1.0, "{m}");
    assert_eq!(lease("taken_over"), 0.0);
    assert!(!b.logs().contains("took over the refresh lease"));
    assert_chain_intact(provider);
}

/// Defect 5: an operator rolls a new bootstrap refresh token out (a new Secret value), and it
/// reaches the replicas at different times. The replica that sees it first starts a new chain
/// that remembers the value it superseded; the other, still configured with the old value,
/// continues that chain instead of restarting from a long-spent token. Both stay alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bootstrap_rollout_reaching_replicas_at_different_times_keeps_the_chain() {
    let account = OneAccount::start(60).await;
    let (redis, provider) = (&account.redis, &account.provider);
    provider.issue_bootstrap("api", "rt-api-boot-1");
    // Each replica mounts its own copy of the secret (as pods do); the operator names the
    // chain, since the two copies live at different paths on this one host.
    let extra = "timeout = \"1s\"\nchain = \"api-account\"";
    let mut reps = Vec::new();
    for _ in 0..2 {
        let secrets = tempfile::tempdir().unwrap();
        std::fs::write(secrets.path().join("api.rt"), "rt-api-boot-1").unwrap();
        let (tw, ports) = replica(
            &redis.url(),
            provider,
            secrets.path(),
            &[("api", &account.upstream)],
            extra,
        );
        tw.wait_ready().await;
        reps.push((tw, ports[0], secrets));
    }
    let (b, b_addr, b_secrets) = reps.pop().unwrap();
    let (a, a_addr, a_secrets) = reps.pop().unwrap();
    refresh_and_wait(&a).await;

    // The operator signs in again and rolls the new value out: A's copy first.
    provider.issue_bootstrap("api", "rt-api-boot-2");
    std::fs::write(a_secrets.path().join("api.rt"), "rt-api-boot-2").unwrap();
    refresh_and_wait(&a).await;
    // (A may refresh once more on its own: a changed secret file is a reason to.)
    let deadline = Instant::now() + SOON;
    while token_served(&b).await != token_served(&a).await {
        assert!(
            Instant::now() < deadline,
            "B never adopted the new chain:\nA: {}\nB: {}",
            a.logs(),
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // B still has the old value: it continues the chain.
    refresh_and_wait(&b).await;
    refresh_and_wait(&a).await;
    // The rollout reaches B.
    std::fs::write(b_secrets.path().join("api.rt"), "rt-api-boot-2").unwrap();
    refresh_and_wait(&b).await;
    refresh_and_wait(&a).await;

    assert_served(&[a_addr, b_addr], 5).await;
    assert_chain_intact(provider);
}

/// A new bootstrap value for an unnamed chain (its key bound to the value) while replica B is
/// paused: A takes it up under the new value's key and leaves a marker under the old one; B,
/// resumed, finds the marker or the new value and continues A's new chain. No refresh token is
/// presented twice, and requests are served on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_bootstrap_value_for_an_unnamed_chain_moves_every_replica_to_its_key() {
    let account = OneAccount::start(60).await;
    let (redis, provider) = (&account.redis, &account.provider);
    let ((a, a_addr), (b, b_addr)) = account.two_replicas("timeout = \"1s\"").await;
    refresh_and_wait(&b).await;
    let old_key = chain_key(redis);

    b.signal("STOP");
    provider.issue_bootstrap("api", "rt-api-boot-2");
    std::fs::write(account.secrets.path().join("api.rt"), "rt-api-boot-2").unwrap();
    refresh_and_wait(&a).await;
    b.signal("CONT");
    let deadline = Instant::now() + SOON;
    while token_served(&b).await != token_served(&a).await {
        assert!(
            Instant::now() < deadline,
            "B never took up the new chain:\nB: {}",
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    refresh_and_wait(&b).await;
    refresh_and_wait(&a).await;

    assert_served(&[a_addr, b_addr], 5).await;
    assert_chain_intact(provider);
    // The new value's chain and the marker under the old key.
    let keys = redis.chain_keys();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.contains(&old_key), "{keys:?}");
}

/// Defect 8: an upstream rejects every token. The token obtained for the first rejection is
/// kept through further rejections for `min_refresh_interval` — by every replica that adopts
/// it, not only the one that obtained it — so 4 replicas cost one provider call between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_rejecting_every_token_costs_one_call_across_replicas() {
    let account = OneAccount::start(60).await;
    let (provider, upstream) = (&account.provider, &account.upstream);
    let reps = account
        .replicas(4, "timeout = \"1s\"\nmin_refresh_interval = \"20s\"")
        .await;
    assert_eq!(provider.successes(), 1);
    upstream.reject_every_token();
    let client = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(8);
    let mut statuses = std::collections::BTreeMap::new();
    while Instant::now() < until {
        for (_, addr) in &reps {
            let status = client
                .get(format!("http://{addr}/r"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            *statuses.entry(status).or_insert(0) += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every answer is the upstream's 401, passed on once the fresh token was rejected too.
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![401],
        "{statuses:?}"
    );
    // The login and at most one call per replica (the issue's bound); one is the aim.
    let calls = provider.successes();
    eprintln!("{calls} provider calls with 4 replicas and an upstream rejecting every token");
    assert!(calls <= 4, "{calls} calls: {}", provider.summary());
    assert_chain_intact(provider);
}

/// A TCP forwarder standing for the address clients know Redis by: a failover points it at
/// the promoted replica and cuts the connections to the old primary (as a Sentinel-managed
/// address or a Kubernetes Service does).
struct Forwarder {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Forwarder {
    async fn start(target: SocketAddr) -> Forwarder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (t, c) = (target.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = *t.lock().unwrap();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Forwarder {
            addr,
            target,
            connections,
        }
    }

    fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Points new connections at `to` and cuts the ones open now.
    fn switch_to(&self, to: SocketAddr) {
        *self.target.lock().unwrap() = to;
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

/// Defect 3, a real failover: the primary dies with a write its asynchronous replica (started
/// with `--replicaof`) never received, and the replica, promoted (`REPLICAOF NO ONE`), takes
/// the primary's address. The
/// store now holds an older point of the chain than both tokenward replicas: neither adopts it,
/// the newer state is written back, and no spent refresh token is presented.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_to_a_lagging_redis_replica_presents_no_spent_token() {
    let primary = RedisServer::start();
    let standby = primary.start_replica();
    let forwarder = Forwarder::start(primary.addr()).await;
    let mut account = OneAccount::on(primary, 60).await;
    let provider = &account.provider;
    let reps = account
        .replicas_via(&forwarder.url(), 2, "timeout = \"1s\"")
        .await;
    let ((a, a_addr), (b, b_addr)) = pair(reps);
    let key = chain_key(&account.redis);
    wait_for("the standby holding the chain", SOON, || {
        standby.keys().contains(&key)
    })
    .await;

    // The standby falls behind: it is cut off from the primary (promoted, as a failover does,
    // before it received the next write — a stalled replica would still read what the primary
    // had sent it), then the chain moves on on the primary and B adopts it there.
    standby.promote();
    force_refresh(&a, "api").await;
    let deadline = Instant::now() + SOON;
    while token_served(&b).await != token_served(&a).await {
        assert!(Instant::now() < deadline, "B never adopted A's rotation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The primary dies; the standby, one write behind, takes its address.
    assert!(!standby.holds_bytes(b"rt-api"), "sealed");
    account.redis.stop();
    forwarder.switch_to(standby.addr());

    refresh_and_wait(&b).await;
    refresh_and_wait(&a).await;
    assert_served(&[a_addr, b_addr], 5).await;
    assert_chain_intact(provider);
    assert_eq!(provider.successes(), 4, "{}", provider.summary());
}

/// Defect 7: the lease holder is paused (SIGSTOP, as a long stall or a VM pause) for 8 s in the
/// middle of its provider call, past its lease. Another replica takes the lease over but waits
/// out the longest the holder's call can last before presenting the refresh token; the holder
/// resumes, lands its rotated token, and the other adopts it. No refresh token is presented
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_paused_past_its_lease_mid_call_is_not_raced() {
    let account = OneAccount::start(60).await;
    let provider = &account.provider;
    let ((a, a_addr), (b, b_addr)) = account.two_replicas("timeout = \"10s\"").await;

    let holder = start_slow_refresh(&a, provider, Duration::from_secs(2)).await;
    a.signal("STOP");
    let paused = Instant::now();
    provider.set_delay(Duration::ZERO);
    let other = spawn_forced_refresh(&b);
    // The pause is the scenario: 8 s, well past the holder's 3 s lease.
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(paused.elapsed())).await;
    a.signal("CONT");
    assert_refreshed(holder).await;
    assert_refreshed(other).await;

    assert_served(&[a_addr, b_addr], 5).await;
    assert_chain_intact(provider);
    let m = b.get_text("/metrics").await;
    assert_eq!(
        metric(
            &m,
            "tokenward_store_leases_total{credential=\"api\",event=\"taken_over\"}"
        ),
        1.0,
        "the lapsed lease was taken over"
    );
    // The login, the paused holder's refresh, the other's refresh from its rotated token.
    assert_eq!(provider.successes(), 3, "{}", provider.summary());
}

/// F5: the provider rotates and answers 0.5 s past the credential's `timeout`. The request
/// that waits for it is told to come back at `timeout`, as before; the exchange goes on and
/// keeps the answer — the only copy of the rotated refresh token — so the next refreshes, on
/// either replica, present it and the chain lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_answering_after_the_timeout_does_not_lose_the_rotated_token() {
    let account = OneAccount::start(60).await;
    let provider = &account.provider;
    let ((a, a_addr), (b, b_addr)) = account.two_replicas("timeout = \"1s\"").await;
    let before = token_served(&a).await;

    provider.set_delay(Duration::from_millis(1500));
    let asked = Instant::now();
    let late = post_refresh(&a, "api").await;
    let told_after = asked.elapsed();
    wait_for_new_token(&a, &before).await;
    provider.set_delay(Duration::ZERO);
    refresh_and_wait(&b).await;
    refresh_and_wait(&a).await;

    assert_served(&[a_addr, b_addr], 5).await;
    assert_chain_intact(provider);
    // The login, the late answer, one refresh each.
    assert_eq!(provider.successes(), 4, "{}", provider.summary());
    let body = late.text().await.unwrap();
    assert!(body.contains("the exchange goes on"), "{body}");
    assert!(
        told_after < Duration::from_millis(1500),
        "the waiter was told at `timeout`, not when the provider answered: {told_after:?}"
    );
}

/// F5 with one replica and the file store: the same late answer is kept and written to the
/// state file, so the restarted process continues the chain from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_answer_is_kept_by_a_single_replica_on_the_file_store() {
    let provider = StrictProvider::start(60).await;
    provider.issue_bootstrap("api", "rt-api-bootstrap");
    let upstream = FakeUpstream::start().await;
    let keys = format!(
        "dialect = \"oauth2\"\ntoken_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\ngrant = \"refresh_token\"\nrefresh_token = \"rt-api-bootstrap\"\nmin_refresh_interval = \"0s\"\ntimeout = \"1s\"\n",
        provider.token_url()
    );
    let mut tw = Tokenward::start(&format!("http://{}", upstream.addr()), &keys);
    tw.wait_ready().await;
    let before = token_served(&tw).await;

    provider.set_delay(Duration::from_millis(1500));
    let late = post_refresh(&tw, "api").await;
    wait_for_new_token(&tw, &before).await;
    provider.set_delay(Duration::ZERO);
    refresh_and_wait(&tw).await;
    tw.kill9_and_restart();
    tw.wait_ready().await;
    refresh_and_wait(&tw).await;

    assert_chain_intact(&provider);
    // The login, the late answer, one refresh; after the restart the first token (the file
    // store keeps no access token) and one refresh, each from the newest refresh token.
    assert_eq!(provider.successes(), 5, "{}", provider.summary());
    let body = late.text().await.unwrap();
    assert!(body.contains("the exchange goes on"), "{body}");
}

/// F5: the lease holder is paused (SIGSTOP) for 3.5 s just after sending its refresh token —
/// past its 2 s `timeout` and its 3 s lease, within its call's bound (2 × timeout + 1 s). The
/// provider answers meanwhile; the holder resumes, keeps the answer and lands the rotated
/// token, and the replica that took the lease over continues from it instead of presenting
/// the spent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_paused_longer_than_its_timeout_keeps_its_late_answer() {
    let account = OneAccount::start(60).await;
    let provider = &account.provider;
    let ((a, a_addr), (b, b_addr)) = account.two_replicas("timeout = \"2s\"").await;

    let holder = start_slow_refresh(&a, provider, Duration::from_secs(1)).await;
    a.signal("STOP");
    let paused = Instant::now();
    provider.set_delay(Duration::ZERO);
    let other = spawn_forced_refresh(&b);
    tokio::time::sleep(Duration::from_millis(3500).saturating_sub(paused.elapsed())).await;
    a.signal("CONT");
    let mut answers = Vec::new();
    for call in [holder, other] {
        let r = call.await.unwrap().unwrap();
        answers.push((r.status(), r.text().await.unwrap()));
    }
    wait_for("the other's refresh", SOON, || {
        provider.successes() >= 3 || !provider.refused().is_empty()
    })
    .await;
    refresh_and_wait(&a).await;

    assert_served(&[a_addr, b_addr], 5).await;
    assert_chain_intact(provider);
    // The login, the paused holder's refresh, the other's refresh from its rotated token, and
    // the holder's next.
    assert_eq!(provider.successes(), 4, "{}", provider.summary());
    // Each forced call answered 200, or was told to come back while its exchange went on.
    for (status, body) in answers {
        assert!(
            status == 200 || body.contains("the exchange goes on"),
            "{status}: {body}"
        );
    }
}

/// Redis is paused (SIGSTOP) while a replica tries to refresh: its request for the lease
/// (`SET NX`) reaches Redis only when it resumes, long after the replica gave up on it. The
/// replica serves its valid token throughout the outage, and once Redis is back it refreshes
/// at once — it does not wait for a lease nobody holds to lapse (3 s), and then out the
/// takeover's wait for a provider call that never was.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_asked_for_while_redis_was_paused_does_not_hold_up_the_next_refresh() {
    let account = OneAccount::start(60).await;
    let (redis, provider) = (&account.redis, &account.provider);
    let reps = account.replicas(1, "timeout = \"1s\"").await;
    let (a, a_addr) = &reps[0];

    redis.freeze();
    let r = post_refresh(a, "api").await;
    assert_ne!(
        r.status(),
        200,
        "no refresh of a rotating chain without its store"
    );
    assert_served(&[*a_addr], 5).await;
    redis.thaw();
    let asked = Instant::now();
    let r = post_refresh(a, "api").await;
    let took = asked.elapsed();

    let status = r.status();
    assert_eq!(status, 200, "{}", r.text().await.unwrap());
    assert!(
        took < Duration::from_secs(2),
        "the refresh after the outage took {took:?}"
    );
    let m = a.get_text("/metrics").await;
    assert_eq!(
        metric(
            &m,
            "tokenward_store_leases_total{credential=\"api\",event=\"taken_over\"}"
        ),
        0.0
    );
    assert_served(&[*a_addr], 3).await;
    assert_chain_intact(provider);
}

/// The store's `encryption_key` is changed from key A to key B in three rolling restarts, as the
/// README gives it: every replica first reads B (`previous_encryption_keys = [B]`), then each
/// writes with B (`encryption_key = B`, `previous_encryption_keys = [A]`), then A goes. The
/// chain grew from a bootstrap value, so its key binds the value under the store key: the
/// first replica on B moves it, and the replica still on A follows the marker, which it can
/// read. Redis emptied in the middle of the second step then finds both on one key. (With the
/// key changed in one step, the replica still on A could read nothing written with B, and
/// after the flush each wrote its state back under its own key and both spent one token.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_encryption_key_rotation_keeps_the_chain() {
    let account = OneAccount::start(60).await;
    let provider = &account.provider;
    let ((mut a, a_addr), (mut b, b_addr)) = account.two_replicas("timeout = \"1s\"").await;
    let new_key = "a1".repeat(32);
    let before = format!("encryption_key = \"{STORE_KEY}\"");
    let reads_new = format!("{before}\nprevious_encryption_keys = [\"{new_key}\"]");
    let writes_new =
        format!("encryption_key = \"{new_key}\"\nprevious_encryption_keys = [\"{STORE_KEY}\"]");
    for tw in [&mut a, &mut b] {
        rewrite_config(tw, &before, &reads_new);
        tw.kill9_and_restart();
        tw.wait_ready().await;
    }
    assert_served(&[a_addr, b_addr], 3).await;

    rewrite_config(&a, &reads_new, &writes_new);
    a.kill9_and_restart();
    a.wait_ready().await;
    wait_for("B to follow the chain A moved", SOON, || {
        b.logs().contains("moved to another key")
    })
    .await;
    account.redis.flush_all();
    refresh_and_wait(&a).await;
    assert_served(&[a_addr, b_addr], 3).await;
    rewrite_config(&b, &reads_new, &writes_new);
    b.kill9_and_restart();
    b.wait_ready().await;
    assert_served(&[a_addr, b_addr], 3).await;
    assert_chain_intact(provider);

    // A refresh writes the chain sealed with the new key; the old one can then go.
    refresh_and_wait(&a).await;
    for tw in [&mut a, &mut b] {
        rewrite_config(
            tw,
            &format!("\nprevious_encryption_keys = [\"{STORE_KEY}\"]"),
            "",
        );
        tw.kill9_and_restart();
        tw.wait_ready().await;
    }
    assert_served(&[a_addr, b_addr], 3).await;
    refresh_and_wait(&b).await;
    assert_served(&[a_addr, b_addr], 3).await;
    assert_chain_intact(provider);
}

/// Defect 10: a file store that failed once (its state file unreadable) is reported in use
/// again (`file`, not `hold`) as soon as it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_file_store_is_reported_in_use_again_once_it_answers() {
    let provider = FakeProvider::start(300, true, Some("rt-bootstrap")).await;
    let upstream = FakeUpstream::start().await;
    let tw = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &oauth2_keys(
            &provider,
            "grant = \"refresh_token\"\nrefresh_token = \"rt-bootstrap\"\nmin_refresh_interval = \"0s\"",
        ),
    );
    tw.wait_ready().await;
    let mode = async || tw.get_json("/tokens/api").await["store_mode"].clone();
    assert_eq!(mode().await, "file");
    let state = tw.dir.path().join("state").join("api.json");
    let saved = std::fs::read(&state).unwrap();
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir(&state).unwrap();
    let r = post_refresh(&tw, "api").await;
    assert_ne!(r.status(), 200, "the store cannot be read");
    assert_eq!(mode().await, "hold");

    std::fs::remove_dir(&state).unwrap();
    std::fs::write(&state, saved).unwrap();
    let r = post_refresh(&tw, "api").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(mode().await, "file");
    assert!(
        provider.refused_calls().is_empty(),
        "{:?}",
        provider.calls()
    );
}

/// Defect 10: a secret read that hangs (a FIFO with no writer) holds one blocking thread, not
/// one more per retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_secret_read_holds_at_most_one_blocking_thread() {
    let provider = FakeProvider::start(300, false, None).await;
    let upstream = FakeUpstream::start().await;
    let (_fifo, path) = stalled_secret("client_secret");
    let keys = format!(
        "dialect = \"oauth2\"\ntoken_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = {{ file = \"{}\" }}\ntimeout = \"1s\"\nprobe_interval = \"500ms\"\nmax_backoff = \"500ms\"\n",
        provider.token_url(),
        path.display()
    );
    let tw = Tokenward::start(&format!("http://{}", upstream.addr()), &keys);
    tw.wait_healthy().await;
    let threads = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", tw.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap()
    };
    // The first exchange hangs on the read, and its flight gives up after 2 × timeout + 1 s.
    wait_for_status(&tw, |status| {
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("did not finish"))
    })
    .await;
    let first = threads();
    // Retries every 500 ms (and requests) for 8 s more.
    let client = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let r = client.get(tw.url("/x")).send().await.unwrap();
        assert_eq!(r.status(), 503);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let last = threads();
    assert!(
        last <= first + 1,
        "threads grew from {first} to {last} while the secret read hung"
    );
    assert_eq!(provider.call_count(), 0);
}

/// Defect 8: the provider refuses the client for good (`invalid_client`). The replica that met
/// it records the failure with the chain; the other replica, due for its own refresh, stops
/// too without repeating the call (a bad password retried by every replica locks accounts).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_for_good_travels_with_the_chain() {
    let account = OneAccount::start(4).await;
    let provider = &account.provider;
    let ((a, _), (b, _)) = account.two_replicas("timeout = \"1s\"").await;
    provider.refuse_the_client(true);
    let r = post_refresh(&a, "api").await;
    assert_ne!(r.status(), 200);
    assert_eq!(a.get_json("/tokens/api").await["state"], "fatal");
    // B's token is due within 3 s; its refresh finds the failure and stops there.
    wait_for_status(&b, |status| status["state"] == "fatal").await;
    assert_eq!(provider.client_refusals(), 1, "{}", provider.summary());
}

/// Upgrading: an earlier version kept the chain under `tokenward:v1:{hash of the dialect's
/// description}`, already rotated past the configured bootstrap value. The new version reads it
/// once (it grew from the bootstrap value configured here) and continues it, instead of
/// presenting the long-spent bootstrap value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chain_stored_by_an_earlier_version_is_carried_over() {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use base64::Engine;
    use sha2::{Digest, Sha256};

    let OneAccount {
        redis,
        provider,
        secrets,
        upstream,
    } = OneAccount::start(60).await;
    provider.issue_bootstrap("api", "rt-api-bootstrap");
    // The earlier version rotated the chain: the bootstrap value is spent.
    provider.issue_bootstrap("api", "rt-api-rotated-by-v1");
    std::fs::write(secrets.path().join("api.rt"), "rt-api-bootstrap").unwrap();

    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let describe = format!(
        "oauth2 refresh_token at {} as client \"{CLIENT_ID}\" (client_secret_basic)",
        provider.token_url()
    );
    let identity = hex(&Sha256::new()
        .chain_update(b"tokenward chain v1\noauth2\n")
        .chain_update(describe.as_bytes())
        .finalize()[..16]);
    let origin = hex(&Sha256::digest(b"rt-api-bootstrap")[..8]);
    let name = format!("tokenward:v1:{identity}");
    let key: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&STORE_KEY[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(&key).unwrap();
    let nonce = [9u8; 12];
    let plain =
        format!(r#"{{"refresh_token":"rt-api-rotated-by-v1","origin":"{origin}","access":null}}"#);
    let sealed = cipher
        .encrypt(
            &aes_gcm::Nonce::from(nonce),
            Payload {
                msg: plain.as_bytes(),
                aad: format!("{name}\x004").as_bytes(),
            },
        )
        .unwrap();
    let blob = base64::engine::general_purpose::STANDARD.encode([&nonce[..], &sealed].concat());
    let status = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port().to_string(),
            "HSET",
            &name,
            "v",
            "4",
            "s",
            &blob,
        ])
        .output()
        .unwrap();
    assert!(status.status.success());

    let (tw, ports) = replica(
        &redis.url(),
        &provider,
        secrets.path(),
        &[("api", &upstream)],
        "timeout = \"1s\"",
    );
    tw.wait_ready().await;
    assert_served(&ports, 3).await;
    assert_chain_intact(&provider);
    assert_eq!(provider.successes(), 1, "{}", provider.summary());
    assert!(
        tw.logs()
            .contains("continuing the chain an earlier version stored")
    );
}

/// How long a test waits for something that should happen within a few seconds.
const SOON: Duration = Duration::from_secs(15);

#[allow(dead_code)]
fn deadline() -> Instant {
    Instant::now() + SOON
}
