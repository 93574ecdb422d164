//! Entry points for the fuzz targets in `fuzz/`: every parser of untrusted input, reachable from
//! outside the crate without widening its API.

use crate::dialect::GrantKind;
use crate::dialect::http::ProviderResponse;

/// Runs every dialect's response parser on `response`; each must return, never panic.
pub fn all_parsers(response: &ProviderResponse, kind: GrantKind) {
    let _ = crate::dialect::oauth2::parse_success(response, kind);
    let _ = crate::dialect::oauth2::parse_failure(response, kind);
}

/// Runs every template parser on `text`.
pub fn templates(text: &str) {
    for line in text.lines() {
        let _ = crate::config::Presentation::parse("Authorization", line);
    }
}
