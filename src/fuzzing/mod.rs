//! Entry points for the fuzz targets in `fuzz/`: every parser of untrusted input, reachable from
//! outside the crate without widening its API.

use crate::dialect::http::ProviderResponse;
use crate::dialect::vendor::{self, ExpiresFormat};
use crate::dialect::{
    GrantKind, babelbird, cloudreve, enos_apim, oauth2, quectel_accesskey, quectel_enduser,
};

/// Runs every dialect's response parser on `response`; each must return, never panic.
pub fn all_parsers(response: &ProviderResponse, kind: GrantKind) {
    let _ = oauth2::parse_success(response, kind);
    let _ = oauth2::parse_failure(response, kind);
    let _ = babelbird::parse_failure(response);
    let _ = vendor::transient_status(response);
    let Ok(body) = vendor::json_object(response) else {
        return;
    };
    let _ = babelbird::parse_success(&body);
    let _ = cloudreve::parse_grant(&body, kind);
    let _ = enos_apim::parse_grant(&body, kind);
    let _ = quectel_accesskey::parse_grant(&body, kind);
    let _ = quectel_enduser::parse_grant(&body, kind);
    for format in [
        ExpiresFormat::RelativeSeconds,
        ExpiresFormat::EpochSeconds,
        ExpiresFormat::EpochMillis,
        ExpiresFormat::Rfc3339,
        ExpiresFormat::Jwt,
    ] {
        let _ = vendor::parse_expiry(&body, "/expires", "expires", format);
        let _ = vendor::parse_expiry(&body, "/data/expire", "data.expire", format);
    }
    for pointer in ["/code", "/status", "/stauts", "/data/code"] {
        let _ = vendor::int_code_at(&body, pointer);
        let _ = vendor::code_at(&body, pointer);
    }
}

/// Runs every template parser on `text`: the `format` of a credential and the `custom`
/// dialect's value templates.
pub fn templates(text: &str) {
    for line in text.lines() {
        let _ = crate::config::Presentation::parse("Authorization", line);
        let _ = crate::dialect::template::Template::parse(line);
    }
}

mod http1;

pub use http1::http1_request;
