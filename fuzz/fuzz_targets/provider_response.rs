//! Provider answers of any shape: every dialect's parser must return a grant or a clear error,
//! never panic. The first byte picks the HTTP status class, the rest is the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenward::dialect::GrantKind;
use tokenward::dialect::http::ProviderResponse;

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else { return };
    let status = [200u16, 201, 400, 401, 429, 500, 503, 302][usize::from(first % 8)];
    let response = ProviderResponse { status, retry_after: None, body: bytes::Bytes::copy_from_slice(body) };
    let kind = if first & 0x80 == 0 { GrantKind::Login } else { GrantKind::Refresh };
    let _ = tokenward::dialect::oauth2::parse_success(&response, kind);
    let _ = tokenward::dialect::oauth2::parse_failure(&response, kind);
    tokenward::fuzzing::all_parsers(&response, kind);
    if let Ok(text) = std::str::from_utf8(body) {
        let _ = tokenward::token::jwt::expiry(text);
    }
});
