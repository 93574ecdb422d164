//! Criterion benchmarks of the request path's own work: route lookup, the lock-free token read,
//! the header a token is presented in, and a DPoP proof. Run: `cargo bench --bench hot_path`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use criterion::{Criterion, black_box, criterion_group, criterion_main};
use tokenward::config::{Config, CredentialConfig, Presentation, Timing};
use tokenward::dialect::{
    Dialect, DialectError, ExchangeError, ExchangeSettings, Expiry, Grant, GrantKind, Held,
    ProviderClient,
};
use tokenward::proxy::metrics::ProxyMetrics;
use tokenward::proxy::routing::{Route, RouteTable};
use tokenward::secret::{Secret, SecretSource};
use tokenward::token::metrics::TokenMetrics;
use tokenward::token::{Credential, FileStore};

/// A provider that answers at once, so the benchmark measures tokenward and nothing else.
struct Instant;

#[async_trait]
impl Dialect for Instant {
    fn describe(&self) -> String {
        "bench".into()
    }
    fn secret_sources(&self) -> Vec<(String, &SecretSource)> {
        Vec::new()
    }
    async fn obtain(&self, _held: &Held, _client: &ProviderClient) -> Result<Grant, DialectError> {
        Ok(Grant {
            kind: GrantKind::Login,
            access_token: Secret::new("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJiZW5jaCJ9.c2lnbmF0dXJl"),
            expires: Expiry::In(Duration::from_secs(3600)),
            refresh_token: None,
        })
    }
}

/// A token-exchange provider that answers at once, for the per-caller cache-hit path.
struct InstantExchange(ExchangeSettings);

#[async_trait]
impl Dialect for InstantExchange {
    fn describe(&self) -> String {
        "bench exchange".into()
    }
    fn secret_sources(&self) -> Vec<(String, &SecretSource)> {
        Vec::new()
    }
    async fn obtain(&self, _held: &Held, _client: &ProviderClient) -> Result<Grant, DialectError> {
        Err(DialectError::fatal("per caller only"))
    }
    fn exchange_settings(&self) -> Option<&ExchangeSettings> {
        Some(&self.0)
    }
    async fn exchange(
        &self,
        _subject: &Secret,
        _actor: Option<&Secret>,
        _client: &ProviderClient,
    ) -> Result<Grant, ExchangeError> {
        Instant
            .obtain(&Held::default(), _client)
            .await
            .map_err(ExchangeError::credential)
    }
}

fn setup() -> (RouteTable, Arc<Credential>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let mut routes = String::new();
    for i in 0..8 {
        routes.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:9000\"\ncredential = \"c\"\npath_prefix = \"/svc{i}\"\n"
        ));
    }
    routes.push_str("[credentials.c]\ndialect = \"oauth2\"\ntoken_url = \"http://127.0.0.1:1/t\"\nclient_id = \"x\"\nclient_secret = \"y\"\n");
    std::fs::write(&path, routes).unwrap();
    let config = Config::load(&path).unwrap();
    let registry = prometheus::Registry::new();
    let token_metrics = TokenMetrics::register(&registry).unwrap();
    let proxy_metrics = ProxyMetrics::register(&registry).unwrap();
    let cred_config = CredentialConfig {
        dialect: Arc::new(Instant),
        presentation: Presentation::parse("Authorization", "Bearer {token}").unwrap(),
        timing: Timing::default(),
        ..config.credentials[0].clone()
    };
    let store = Arc::new(FileStore::open(&dir.path().join("state")).unwrap());
    let credential = Arc::new(
        Credential::new(cred_config, store, None, token_metrics.for_credential("c")).unwrap(),
    );
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(credential.force_refresh())
        .unwrap();
    let table = RouteTable::new(
        config
            .routes
            .iter()
            .map(|r| {
                (
                    r.listen,
                    Arc::new(
                        Route::new(r, credential.clone(), proxy_metrics.for_route(&r.name))
                            .unwrap(),
                    ),
                )
            })
            .collect(),
    );
    (table, credential, dir)
}

/// An exchange credential whose cache holds one caller's token.
fn exchange_setup(config: &CredentialConfig) -> (Arc<Credential>, Secret) {
    let dir = tempfile::tempdir().unwrap();
    let registry = prometheus::Registry::new();
    let token_metrics = TokenMetrics::register(&registry).unwrap();
    let settings = ExchangeSettings {
        subject_header: http::header::AUTHORIZATION,
        subject_scheme: Some("Bearer".into()),
        subject_token_type: "urn:ietf:params:oauth:token-type:access_token".into(),
        requested_token_type: "urn:ietf:params:oauth:token-type:access_token".into(),
        cache_max_entries: 10_000,
        max_exchanges_per_second: 50,
        negative_ttl: Duration::from_secs(5),
        actor: None,
        actor_token_type: "urn:ietf:params:oauth:token-type:access_token".into(),
        subject_validation: None,
        style: tokenward::dialect::ExchangeStyle::Rfc8693,
    };
    let cred_config = CredentialConfig {
        dialect: Arc::new(InstantExchange(settings)),
        ..config.clone()
    };
    let store = Arc::new(FileStore::open(&dir.path().join("state")).unwrap());
    let credential = Arc::new(
        Credential::new(cred_config, store, None, token_metrics.for_credential("x")).unwrap(),
    );
    (
        credential,
        Secret::new("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjYWxsZXIifQ.c2ln"),
    )
}

fn hot_path(c: &mut Criterion) {
    let (table, credential, _dir) = setup();
    let listener = "127.0.0.1:8080".parse().unwrap();
    let mut request = pingora::http::RequestHeader::build("GET", b"/svc7/orders/42", None).unwrap();
    request.insert_header("Host", "api.internal").unwrap();
    c.bench_function("route_lookup_8_routes", |b| {
        b.iter(|| black_box(table.find_for(listener, black_box(&request))))
    });
    c.bench_function("token_current_lock_free", |b| {
        b.iter(|| black_box(credential.current()))
    });
    c.bench_function("token_header_clone", |b| {
        let token = credential.current().unwrap();
        b.iter(|| {
            let (name, value) = token.header();
            black_box((name.clone(), value.clone()))
        })
    });
    let (exchange, subject) = exchange_setup(&credential.config().clone());
    let exchanger = exchange.exchanger().unwrap().clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(exchanger.token(&subject)).unwrap();
    c.bench_function("exchange_cache_hit_hash_and_lookup", |b| {
        b.iter(|| black_box(rt.block_on(exchanger.token(black_box(&subject))).is_ok()))
    });
    // One ES256 proof for a typical upstream URL and an access token of JWT size (~800 bytes):
    // what a DPoP route adds to each request.
    let dpop = tokenward::dpop::DpopKey::generate().unwrap();
    dpop.set_nonce("https://orders.example.com", b"eyJ7S_zG.eyJH0-Z.HX4w-7v");
    let access_token = format!(
        "eyJhbGciOiJSUzI1NiJ9.{}.{}",
        "e".repeat(600),
        "s".repeat(171)
    );
    c.bench_function("dpop_proof", |b| {
        b.iter(|| {
            black_box(
                dpop.proof(
                    "GET",
                    black_box("https://orders.example.com"),
                    black_box("/api/v1/orders/42"),
                    Some(black_box(&access_token)),
                )
                .unwrap(),
            )
        })
    });
    let p = Presentation::parse("Authorization", "Bearer {token}").unwrap();
    c.bench_function("presentation_render", |b| {
        b.iter(|| black_box(p.render(black_box("eyJhbGciOiJIUzI1NiJ9.e30.sig"))))
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
