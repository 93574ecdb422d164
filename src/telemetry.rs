//! Structured logs through `tracing`, as JSON or text; pingora's own `log` records are routed
//! into the same subscriber. A reload can change the level; nothing can lift the cap on the
//! libraries that log headers and bodies.

use std::sync::OnceLock;

use tracing::{Level, Metadata, Subscriber};
use tracing_log::AsLog;
use tracing_subscriber::filter::{FilterFn, LevelFilter};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Registry, reload};

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

type LevelHandle = reload::Handle<EnvFilter, Registry>;

/// The running subscriber's level filter, for reloads.
static LEVEL: OnceLock<LevelHandle> = OnceLock::new();

/// The operator's filter: `TOKENWARD_LOG` when set, else `level` (already validated).
pub fn filter(level: &str) -> EnvFilter {
    let base = std::env::var("TOKENWARD_LOG").unwrap_or_else(|_| level.to_string());
    EnvFilter::try_new(base).unwrap_or_else(|_| EnvFilter::new("info"))
}

fn capped(target: &str) -> bool {
    CAPPED.iter().any(|lib| {
        target
            .strip_prefix(lib)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// The cap, as a filter of its own that every event must also pass: within one `EnvFilter` a
/// more specific directive (`pingora_proxy::proxy_h1=debug`) would win over the cap.
fn cap(meta: &Metadata<'_>) -> bool {
    *meta.level() <= Level::INFO || !capped(meta.target())
}

/// The subscriber: the operator's filter (reloadable) and the cap, each of which must let an
/// event through, then the formatter.
fn build<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    colour: bool,
) -> (impl Subscriber + Send + Sync + 'static, LevelHandle)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let (level, handle) = reload::Layer::new(filter);
    let (json, text) = match format {
        LogFormat::Json => (
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(writer),
            ),
            None,
        ),
        LogFormat::Text => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_ansi(colour)
                    .with_writer(writer),
            ),
        ),
    };
    let subscriber = tracing_subscriber::registry()
        .with(level)
        .with(FilterFn::new(cap as fn(&Metadata<'_>) -> bool))
        .with(json)
        .with(text);
    (subscriber, handle)
}

/// Installs the global subscriber; later calls are ignored (tests start several servers).
pub fn init(format: LogFormat, level: &str) {
    let (subscriber, handle) = build(
        format,
        filter(level),
        std::io::stderr,
        // Colour codes only for a person at a terminal: a pipe, a file or a container's log
        // collector would keep them as text.
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    );
    if subscriber.try_init().is_ok() {
        let _ = LEVEL.set(handle);
    }
}

/// Applies `level` to the running subscriber (`TOKENWARD_LOG`, when set, still wins, as at
/// start). A no-op before `init`.
pub fn set_level(level: &str) -> Result<(), String> {
    let Some(handle) = LEVEL.get() else {
        return Ok(());
    };
    handle.reload(filter(level)).map_err(|e| e.to_string())?;
    // `log` records (pingora's) are skipped below the level fixed at `init`: follow the new one.
    tracing_log::log::set_max_level(LevelFilter::current().as_log());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Captured {
            self.clone()
        }
    }

    fn emit_all() {
        tracing::debug!(target: "pingora_proxy::proxy_h1", "proxy-h1-debug");
        tracing::trace!(target: "pingora_core::protocols", "core-trace");
        tracing::debug!(target: "hyper_util::client", "hyper-util-debug");
        tracing::info!(target: "pingora_proxy::proxy_h1", "proxy-h1-info");
        tracing::debug!(target: "tokenward::proxy", "own-debug");
        tracing::debug!(target: "pingora_proxyish", "lookalike-debug");
    }

    #[test]
    fn no_filter_lifts_the_cap_and_a_new_level_applies() {
        let out = Captured::default();
        let filter = EnvFilter::new(
            "pingora_proxy::proxy_h1=debug,pingora_core=trace,hyper_util=trace,trace",
        );
        let (subscriber, handle) = build(LogFormat::Text, filter, out.clone(), false);
        tracing::subscriber::with_default(subscriber, || {
            emit_all();
            handle.reload(EnvFilter::new("warn")).unwrap();
            tracing::info!(target: "tokenward::proxy", "own-info-after-warn");
            handle.reload(EnvFilter::new("debug")).unwrap();
            tracing::debug!(target: "tokenward::proxy", "own-debug-after-reload");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        for absent in [
            "proxy-h1-debug",
            "core-trace",
            "hyper-util-debug",
            "own-info-after-warn",
        ] {
            assert!(!text.contains(absent), "{absent} was logged:\n{text}");
        }
        for present in [
            "proxy-h1-info",
            "own-debug",
            "lookalike-debug",
            "own-debug-after-reload",
        ] {
            assert!(text.contains(present), "{present} was not logged:\n{text}");
        }
    }
}
