//! What both request paths refuse before routing, alike, with nothing sent upstream: methods
//! tokenward never forwards, request targets of no form a reverse proxy takes, an HTTP/1.1
//! request without exactly one Host, and transfer codings it cannot decode.

use bytes::Bytes;
use http::{Method, Version, header};
use pingora::http::authority::{RawTargetAuthority, raw_target_authority};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use serde_json::json;

use super::respond;

/// The methods a 405 names in its `Allow` (RFC 9110 §15.5.6 requires the field): those a
/// route forwards that any common upstream implements. Any other method but the refused ones
/// is forwarded too.
const ALLOWED: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// A request refused before routing: the answer, after which the connection ends (the request's
/// body, if it has one, is left unread).
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    body: serde_json::Value,
}

impl Refusal {
    /// The answer's head and body.
    pub fn parts(&self) -> Result<(ResponseHeader, Bytes)> {
        let (mut head, body) = respond::json_parts(self.status, self.body.clone(), None)?;
        if self.status == 405 {
            head.insert_header("Allow", ALLOWED)?;
        }
        Ok((head, body))
    }

    /// A short reason, for the fuzz target's error.
    pub fn reason(&self) -> String {
        self.body["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Why `request` must not be forwarded at all, if it must not.
pub fn refusal(request: &RequestHeader) -> Option<Refusal> {
    let bad_request = |message: &str| Refusal {
        status: 400,
        body: json!({"error": "bad_request", "message": message}),
    };
    if never_forwarded(&request.method) {
        // CONNECT would open a tunnel where the client asks, not to the route's upstream; an
        // upstream that implements TRACE (RFC 9110 §9.3.8) echoes the request it received,
        // and with it the route's token, to the caller (TRACK is IIS's TRACE). Methods are
        // case-sensitive, but some servers are not: `trace` is refused too.
        return Some(Refusal {
            status: 405,
            body: json!({
                "error": "method_not_allowed",
                "message": format!("{} is not forwarded", request.method),
            }),
        });
    }
    if request.version == Version::HTTP_11
        && request.headers.get_all(header::HOST).iter().count() != 1
    {
        // RFC 9112 §3.2: a server MUST answer 400. pingora-core's `validate_request_authority`
        // refuses a second Host, not a missing one.
        return Some(bad_request(
            "an HTTP/1.1 request carries exactly one Host field (RFC 9112 §3.2)",
        ));
    }
    if !known_target_form(request) {
        return Some(bad_request(
            "the request target is neither a path, an http(s) URL, nor * for OPTIONS (RFC 9112 §3.2)",
        ));
    }
    codings_refusal(request)
}

fn never_forwarded(method: &Method) -> bool {
    ["CONNECT", "TRACE", "TRACK"]
        .iter()
        .any(|m| method.as_str().eq_ignore_ascii_case(m))
}

/// Origin-form (`/…`), absolute-form with an http(s) URL, or asterisk-form for OPTIONS
/// (RFC 9112 §3.2.1, §3.2.2, §3.2.4; authority-form is CONNECT's). Anything else would be
/// rewritten to some path of the route's upstream (`retarget`), and sent with its token.
fn known_target_form(request: &RequestHeader) -> bool {
    let raw = request.raw_path();
    if raw.starts_with(b"/") {
        return true;
    }
    if raw == b"*" {
        return request.method == Method::OPTIONS;
    }
    match raw_target_authority(raw) {
        RawTargetAuthority::Absolute {
            scheme, authority, ..
        } => {
            (scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https"))
                && !authority.is_empty()
        }
        RawTargetAuthority::None | RawTargetAuthority::AmbiguousAuthority => false,
    }
}

/// Transfer codings (RFC 9112 §6.1): tokenward decodes chunked alone. A list that ends with
/// chunked but holds another coding is a 501, as a server answers a coding it does not
/// understand, and as nginx does: passed on as plain chunked, its body would reach the
/// upstream still coded. A list that does not end with chunked is a 400 (§6.3), which
/// pingora-core's `validate_request` answers before this.
fn codings_refusal(request: &RequestHeader) -> Option<Refusal> {
    let mut codings = request
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    let first = codings.next()?;
    let chunked = |c: &[u8]| c.eq_ignore_ascii_case(b"chunked");
    let Some(last) = codings.last() else {
        return (!chunked(first)).then(|| Refusal {
            status: 400,
            body: json!({"error": "bad_request", "message": "the last transfer coding is not chunked (RFC 9112 §6.3)"}),
        });
    };
    Some(if chunked(last) {
        Refusal {
            status: 501,
            body: json!({
                "error": "not_implemented",
                "message": "a request's only transfer coding can be chunked (RFC 9112 §6.1)",
            }),
        }
    } else {
        Refusal {
            status: 400,
            body: json!({"error": "bad_request", "message": "the last transfer coding is not chunked (RFC 9112 §6.3)"}),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(line: &str, fields: &[(&str, &str)]) -> RequestHeader {
        let mut parts = line.split(' ');
        let method = parts.next().unwrap();
        let target = parts.next().unwrap();
        let mut r = RequestHeader::build(method, target.as_bytes(), None).unwrap();
        if parts.next() == Some("HTTP/1.0") {
            r.set_version(Version::HTTP_10);
        }
        for (name, value) in fields {
            r.append_header(name.to_string(), *value).unwrap();
        }
        r
    }

    fn status(line: &str, fields: &[(&str, &str)]) -> Option<u16> {
        refusal(&request(line, fields)).map(|r| r.status)
    }

    const HOST: (&str, &str) = ("Host", "app");

    #[test]
    fn connect_trace_and_track_are_refused_whatever_their_case_and_the_405_names_what_is_allowed() {
        for method in ["CONNECT", "TRACE", "TRACK", "trace", "Track"] {
            let r = refusal(&request(&format!("{method} / HTTP/1.1"), &[HOST])).unwrap();
            assert_eq!(r.status, 405, "{method}");
            let (head, _) = r.parts().unwrap();
            assert_eq!(head.headers["allow"], ALLOWED);
        }
        for method in ["GET", "POST", "PROPFIND", "OPTIONS"] {
            assert_eq!(status(&format!("{method} / HTTP/1.1"), &[HOST]), None);
        }
    }

    #[test]
    fn an_http11_request_needs_exactly_one_host_an_http10_one_none() {
        assert_eq!(status("GET / HTTP/1.1", &[]), Some(400));
        assert_eq!(status("GET / HTTP/1.1", &[HOST, HOST]), Some(400));
        assert_eq!(status("GET / HTTP/1.1", &[HOST]), None);
        assert_eq!(status("GET / HTTP/1.0", &[]), None);
    }

    #[test]
    fn only_origin_absolute_http_and_asterisk_for_options_targets_pass() {
        for target in [
            "/",
            "/a?q=1",
            "http://app/x",
            "HTTPS://app",
            "http://app:8080/x?y",
        ] {
            assert_eq!(
                status(&format!("GET {target} HTTP/1.1"), &[HOST]),
                None,
                "{target}"
            );
        }
        assert_eq!(status("OPTIONS * HTTP/1.1", &[HOST]), None);
        for target in [
            "evil",
            "evil.example:443",
            "*",
            "?q=1",
            "ftp://app/x",
            "app/x",
        ] {
            assert_eq!(
                status(&format!("GET {target} HTTP/1.1"), &[HOST]),
                Some(400),
                "{target}"
            );
        }
    }

    #[test]
    fn chunked_alone_passes_another_coding_before_it_is_501_and_one_after_it_400() {
        let te = |v: &'static str| [HOST, ("Transfer-Encoding", v)];
        assert_eq!(status("POST / HTTP/1.1", &te("chunked")), None);
        assert_eq!(status("POST / HTTP/1.1", &te("Chunked")), None);
        assert_eq!(status("POST / HTTP/1.1", &te("gzip, chunked")), Some(501));
        assert_eq!(
            status("POST / HTTP/1.1", &te("chunked, chunked")),
            Some(501)
        );
        assert_eq!(status("POST / HTTP/1.1", &te("chunked, gzip")), Some(400));
        assert_eq!(status("POST / HTTP/1.1", &te("gzip")), Some(400));
        let two = [
            HOST,
            ("Transfer-Encoding", "gzip"),
            ("Transfer-Encoding", "chunked"),
        ];
        assert_eq!(status("POST / HTTP/1.1", &two), Some(501));
        assert_eq!(status("POST / HTTP/1.1", &[HOST]), None);
    }
}
