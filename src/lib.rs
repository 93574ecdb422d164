//! tokenward: a reverse-proxy auth sidecar that injects fresh provider tokens into upstream requests.
#![forbid(unsafe_code)]

pub mod admin;
pub mod ca_bundle;
pub mod cli;
pub mod config;
pub mod dev;
pub mod dialect;
pub mod dpop;
#[doc(hidden)]
pub mod fuzzing;
pub mod log_limit;
pub mod mtls;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod telemetry;
pub mod token;
