//! Request heads and bodies (Content-Length or chunked, with extensions and trailers), cut at
//! any read boundaries, through the lean path's request relay to an in-memory upstream: the
//! upstream sees exactly the client's body, or nothing complete for a refused request, and
//! never a second request (`tokenward::fuzzing::http1_request` builds and checks each case).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tokenward::fuzzing::http1_request(data));
