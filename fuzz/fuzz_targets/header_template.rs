//! Header templates and token values of any shape: parsing and rendering never panic, and a
//! rendered value either is a valid header value or is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenward::config::Presentation;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut parts = text.splitn(3, '\n');
    let (Some(header), Some(format), Some(token)) = (parts.next(), parts.next(), parts.next()) else { return };
    if let Ok(p) = Presentation::parse(header, format) {
        let rendered = p.render(token);
        assert!(rendered.starts_with(&p.prefix) && rendered.ends_with(&p.suffix));
        let _ = http::HeaderValue::from_str(&rendered);
    }
    tokenward::fuzzing::templates(text);
});
