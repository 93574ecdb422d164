//! The command line: `run`, `check`, `token` and `dev`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, LogFormat};
use crate::token::metrics::TokenMetrics;
use crate::token::{Credential, TokenStore};

#[derive(Parser)]
#[command(
    name = "tokenward",
    version,
    about = "A reverse-proxy auth sidecar: injects fresh provider tokens into upstream requests"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve until SIGTERM or SIGINT, then drain requests in flight.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config and print what it would do (exit 2 on any error).
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Do not read secret files or environment variables (for configs meant for another machine).
        #[arg(long)]
        skip_secrets: bool,
    },
    /// Obtain one token for credential NAME and print its expiry and source.
    Token {
        name: String,
        #[arg(long, short)]
        config: PathBuf,
        /// Also print the token itself, alone on the last line of standard output.
        #[arg(long)]
        show: bool,
    },
    /// Run a self-contained demo: provider, echo upstream and tokenward, all on loopback.
    Dev {
        /// Run only one demo component (for docker-compose stand-ins).
        #[arg(long, value_enum)]
        component: Option<Component>,
        /// Listen address of the component given with --component.
        #[arg(long, requires = "component")]
        listen: Option<SocketAddr>,
        #[arg(long, default_value = "127.0.0.1:8080")]
        proxy_listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin_listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:8081")]
        echo_listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:8082")]
        provider_listen: SocketAddr,
        /// Lifetime of the demo provider's tokens.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        token_lifetime: Duration,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Component {
    Provider,
    Echo,
}

const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(EXIT_CONFIG)
    })
}

pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            crate::telemetry::init(config.log_format, &config.log_level);
            warn_at_start(&config);
            match crate::server::run(config, Vec::new()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "tokenward cannot start");
                    eprintln!("error: {e:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Check {
            config,
            skip_secrets,
        } => check(&config, skip_secrets),
        Command::Token { name, config, show } => token(&name, &config, show),
        Command::Dev {
            component,
            listen,
            proxy_listen,
            admin_listen,
            echo_listen,
            provider_listen,
            token_lifetime,
        } => {
            crate::telemetry::init(LogFormat::Text, "info");
            let result = match component {
                Some(c) => dev_component(c, listen, token_lifetime),
                None => dev(
                    proxy_listen,
                    admin_listen,
                    echo_listen,
                    provider_listen,
                    token_lifetime,
                ),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
    }
}

/// What an operator should know before traffic flows: plaintext HTTP off loopback, and admin
/// actions that nobody can use.
fn warn_at_start(config: &Config) {
    for w in crate::config::warnings::all(config) {
        tracing::warn!("{w}");
    }
    let access = crate::admin::action_access(config.admin_listen, config.admin_token.as_ref());
    match access {
        crate::admin::ActionAccess::Refused => {
            tracing::warn!(admin = %config.admin_listen, "admin actions are {}", access.describe())
        }
        _ => {
            tracing::info!(admin = %config.admin_listen, "admin actions are {}", access.describe())
        }
    }
}

/// Reads and checks a client certificate and its key; says which certificate, never the key.
fn check_client_cert(
    path: &std::path::Path,
    cert: &crate::mtls::ClientCertSource,
    skip_secrets: bool,
    problems: &mut Vec<String>,
) {
    if skip_secrets {
        println!(
            "           client certificate: {:?}, key {:?} (not read: --skip-secrets)",
            cert.cert, cert.key
        );
        return;
    }
    match cert.load() {
        Ok(identity) => println!(
            "           client certificate: {:?} (sha256 {}), key {:?} (matches)",
            cert.cert,
            identity.thumbprint_hex(),
            cert.key
        ),
        Err(e) => problems.push(format!("config error: {}: {e}", path.display())),
    }
}

fn check(path: &std::path::Path, skip_secrets: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut problems = Vec::new();
    println!("{}: OK", path.display());
    println!(
        "admin     http://{} (/healthz /readyz /metrics /tokens)",
        config.admin_listen
    );
    let access = crate::admin::action_access(config.admin_listen, config.admin_token.as_ref());
    println!(
        "          actions (POST /tokens/NAME/refresh|invalidate) are {}",
        access.describe()
    );
    if let (Some(source), false) = (&config.admin_token, skip_secrets) {
        if let Err(e) = source.resolve() {
            problems.push(format!(
                "config error: {}: `admin.token`: {e}",
                path.display()
            ));
        }
    }
    match &config.state_redis {
        None => println!(
            "state     files in {} (rotated refresh tokens)",
            config.state_dir.display()
        ),
        Some(redis) => {
            println!("state     {} (shared by replicas)", redis.describe());
            check_redis(path, redis, skip_secrets, &mut problems);
        }
    }
    println!(
        "server    {}, {}s grace period",
        crate::server::proxy_threads::Sockets::for_threads(config.threads, config.reuse_port)
            .describe(),
        config.grace_period.as_secs()
    );
    for r in &config.routes {
        let mut matcher = String::new();
        if let Some(h) = &r.host {
            matcher.push_str(&format!(" host {h}"));
        }
        if let Some(p) = &r.path_prefix {
            matcher.push_str(&format!(" path {p}*"));
        }
        println!(
            "route     {}: {}{} -> {} with credential {}",
            r.name, r.listen, matcher, r.upstream, r.credential
        );
        if let Some(cert) = &r.client_cert {
            check_client_cert(path, cert, skip_secrets, &mut problems);
        }
    }
    for c in &config.credentials {
        let t = &c.timing;
        println!("credential {}: {}", c.name, c.dialect.describe());
        let presents = if c.dialect.request_signer().is_some() {
            "signs each request with it".to_string()
        } else {
            format!(
                "sends `{}: {}{{token}}{}`",
                c.presentation.header, c.presentation.prefix, c.presentation.suffix
            )
        };
        println!(
            "           {presents}; refreshes at {:.0}% of the lifetime, stops serving {} before expiry",
            t.refresh_at * 100.0,
            humantime::format_duration(t.expiry_margin)
        );
        println!(
            "           reaches the provider {}{}",
            match &c.transport.proxy {
                Some(p) => format!("through proxy {p}"),
                None => "directly (HTTP_PROXY, HTTPS_PROXY, NO_PROXY are ignored)".into(),
            },
            match &c.transport.ca_file {
                Some(ca) => format!(", trusting only the CAs in {}", ca.display()),
                None => String::new(),
            }
        );
        if let Some(cert) = &c.transport.client_cert {
            check_client_cert(path, cert, skip_secrets, &mut problems);
        }
        for (key, source) in c.dialect.secret_sources() {
            if skip_secrets {
                println!("           secret {key}: {source:?} (not read: --skip-secrets)");
                continue;
            }
            match source
                .resolve()
                .map_err(|e| e.to_string())
                .and_then(|value| c.dialect.check_secret(&key, &value))
            {
                Ok(()) => println!("           secret {key}: {source:?} (readable)"),
                Err(e) => problems.push(format!(
                    "config error: {}: `credentials.{}.{key}`: {e}",
                    path.display(),
                    c.name
                )),
            }
        }
    }
    for w in crate::config::warnings::all(&config) {
        eprintln!("warning: {w}");
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        ExitCode::from(EXIT_CONFIG)
    }
}

/// The shared store's key (read and decoded) and whether Redis answers; an unreachable Redis
/// is only a warning, since replicas start and serve without it.
fn check_redis(
    path: &std::path::Path,
    redis: &crate::token::store::RedisSettings,
    skip_secrets: bool,
    problems: &mut Vec<String>,
) {
    let source = &redis.encryption_key;
    if skip_secrets {
        println!("          encryption key: {source:?} (not read: --skip-secrets)");
        if let Some(password) = redis.password_source() {
            println!("          redis password: {password:?} (not read: --skip-secrets)");
        }
        return;
    }
    match redis.encryption_key() {
        Ok(_) => println!("          encryption key: {source:?} (readable, 32 bytes)"),
        Err(reason) => problems.push(format!(
            "config error: {}: `state.encryption_key`: {reason}",
            path.display()
        )),
    }
    match redis.previous_keys() {
        Ok(keys) if keys.is_empty() => {}
        Ok(keys) => println!(
            "          previous encryption keys: {} (readable, used only to read)",
            keys.len()
        ),
        Err((i, reason)) => problems.push(format!(
            "config error: {}: `state.previous_encryption_keys[{i}]`: {reason}",
            path.display()
        )),
    }
    if let Some(password) = redis.password_source() {
        match redis.redis_password() {
            Ok(_) => println!("          redis password: {password:?} (readable)"),
            Err(reason) => {
                // Without its password Redis would refuse us anyway: no PING to report.
                problems.push(format!(
                    "config error: {}: `state.redis_password`: {reason}",
                    path.display()
                ));
                return;
            }
        }
    }
    let within = Duration::from_secs(2);
    let answer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))
        .and_then(|rt| rt.block_on(redis.ping(within)));
    match answer {
        Ok(took) => println!("          reachable (PING in {} ms)", took.as_millis()),
        Err(reason) => eprintln!(
            "warning: `state.redis`: {} is unreachable: {reason}",
            redis.describe()
        ),
    }
}

fn token(name: &str, path: &std::path::Path, show: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::telemetry::init(config.log_format, "warn");
    let Some(cred) = config.credentials.iter().find(|c| c.name == name).cloned() else {
        let known: Vec<&str> = config.credentials.iter().map(|c| c.name.as_str()).collect();
        eprintln!(
            "error: no credential named {name:?} in {} (known: {})",
            path.display(),
            known.join(", ")
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start a runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(async move {
        let store: Arc<dyn TokenStore> = match crate::token::store::open_store(&config) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        let registry = prometheus::Registry::new();
        let metrics = match TokenMetrics::register(&registry) {
            Ok(m) => m.for_credential(name),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        let credential = match Credential::new(cred, store.clone(), None, metrics) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                eprintln!("error: credential {name:?}: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        let started = Instant::now();
        match credential.force_refresh().await {
            Ok(t) => {
                println!("credential  {name}");
                println!(
                    "obtained    via {} in {} ms",
                    t.kind.as_str(),
                    started.elapsed().as_millis()
                );
                println!(
                    "expires     {} (in {}s)",
                    humantime::format_rfc3339_seconds(t.expires_wall()),
                    t.lifetime.as_secs()
                );
                println!(
                    "refresh     in {}s",
                    t.refresh_at
                        .saturating_duration_since(Instant::now())
                        .as_secs()
                );
                println!("state       {}", store.describe());
                if let Some(e) = credential.status_snapshot().persist_error {
                    eprintln!("warning: the rotated refresh token could not be saved: {e}");
                }
                if show {
                    println!("{}", t.value().expose());
                }
                ExitCode::SUCCESS
            }
            Err(u) => {
                eprintln!("error: credential {name:?}: {}", u.reason);
                ExitCode::from(EXIT_FAILURE)
            }
        }
    })
}

fn dev_component(
    component: Component,
    listen: Option<SocketAddr>,
    lifetime: Duration,
) -> anyhow::Result<()> {
    let (service, default) = match component {
        Component::Provider => (
            crate::dev::provider_service(listen.unwrap_or(([127, 0, 0, 1], 8082).into()), lifetime),
            "provider",
        ),
        Component::Echo => (
            crate::dev::echo_service(listen.unwrap_or(([127, 0, 0, 1], 8081).into())),
            "echo",
        ),
    };
    tracing::info!(component = default, "starting demo component");
    // A stand-in has nothing to drain: stop within a second of SIGTERM.
    let conf = pingora::server::configuration::ServerConf {
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = pingora::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    server.add_boxed_service(service);
    server.run(pingora::server::RunArgs {
        shutdown_signal: Box::new(crate::server::TermOrInt),
    });
    Ok(())
}

fn dev(
    proxy: SocketAddr,
    admin: SocketAddr,
    echo: SocketAddr,
    provider: SocketAddr,
    lifetime: Duration,
) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("tokenward-dev-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("tokenward.toml");
    std::fs::write(
        &path,
        crate::dev::demo_config(proxy, admin, echo, provider, &dir.join("state")),
    )?;
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!("{}", crate::dev::banner(proxy, admin, provider));
    eprintln!("(demo config written to {})\n", path.display());
    crate::server::run(
        config,
        vec![
            crate::dev::provider_service(provider, lifetime),
            crate::dev::echo_service(echo),
        ],
    )
}
