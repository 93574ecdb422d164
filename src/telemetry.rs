//! Structured logs through `tracing`, as JSON or text; pingora's own `log` records are routed
//! into the same subscriber.

use crate::config::LogFormat;

/// Libraries that log request or response headers and bodies at debug level — where tokens
/// travel — are capped at `info` whatever level is asked for.
const CAPPED: &[&str] = &[
    "pingora_proxy",
    "pingora_core",
    "pingora_http",
    "pingora_pool",
    "h2",
    "hyper",
    "hyper_util",
    "reqwest",
    "rustls",
];

/// The filter for `level` (or `TOKENWARD_LOG`), with the library caps appended: a directive
/// naming a target wins over a bare level, so `debug` still cannot reach those libraries.
pub fn filter(level: &str) -> tracing_subscriber::EnvFilter {
    let base = std::env::var("TOKENWARD_LOG").unwrap_or_else(|_| level.to_string());
    let caps: Vec<String> = CAPPED.iter().map(|t| format!("{t}=info")).collect();
    tracing_subscriber::EnvFilter::try_new(format!("{base},{}", caps.join(",")))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// Installs the global subscriber; later calls are ignored (tests start several servers).
pub fn init(format: LogFormat, level: &str) {
    let filter = filter(level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.with_target(false).try_init(),
    };
}
