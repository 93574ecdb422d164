//! The `tokenward` binary: parses the command line and hands over to `tokenward::cli`.
#![forbid(unsafe_code)]

use clap::Parser;

/// An experiment measured in benches/README.md ("What was tried"); off by default.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tokenward::cli::main(tokenward::cli::Cli::parse())
}
