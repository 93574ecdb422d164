//! Config text of any shape: load and validation return errors, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // A CA bundle path would make validation read a file; the fuzzer must not read /dev/zero.
    if text.contains("ca_file") {
        return;
    }
    let yaml = text.starts_with("---");
    let _ = tokenward::config::Config::parse(std::path::Path::new("fuzz.toml"), text, yaml);
});
