//! The `tokenward` binary: parses the command line and hands over to `tokenward::cli`.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    tokenward::cli::main(tokenward::cli::Cli::parse())
}
