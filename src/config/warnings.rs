//! What a valid configuration should still tell its operator: settings that load and work
//! but weaken a defence, said at start, at each reload and by `check`.

use super::Config;

/// Every warning about `config`, each naming the file and the key.
pub fn all(config: &Config) -> Vec<String> {
    let mut out = super::transport::plaintext_warnings(config);
    out.extend(zero_min_refresh_interval(config));
    out
}

/// `min_refresh_interval = "0s"` is legitimate (tests and tools that force refreshes back to
/// back use it to lift the admin rate limit), but it also turns off the guard that keeps a token
/// obtained for a rejection: an upstream that rejects every token then costs a provider call
/// per rejected request.
fn zero_min_refresh_interval(config: &Config) -> Vec<String> {
    config
        .credentials
        .iter()
        .filter(|c| c.timing.min_refresh_interval.is_zero())
        .map(|c| {
            format!(
                "{}: `credentials.{}.min_refresh_interval`: 0s turns off the guard against an upstream that rejects every token (each rejection then costs a provider call) and the limit on forced refreshes and JWKS refetches; use at least 1s outside tests",
                config.source.display(),
                c.name
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn load(interval: &str) -> Config {
        let text = format!(
            "[[routes]]\nname = \"r\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:9000\"\ncredential = \"api\"\n[credentials.api]\ndialect = \"oauth2\"\ntoken_url = \"http://127.0.0.1:9/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n{interval}\n"
        );
        Config::parse(Path::new("/etc/tokenward.toml"), &text, false).unwrap()
    }

    #[test]
    fn a_zero_min_refresh_interval_is_a_warning_naming_file_key_and_reason() {
        let warnings = all(&load("min_refresh_interval = \"0s\""));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let w = &warnings[0];
        assert!(
            w.starts_with("/etc/tokenward.toml: `credentials.api.min_refresh_interval`: 0s")
                && w.contains("rejects every token"),
            "{w}"
        );
        assert!(all(&load("min_refresh_interval = \"1s\"")).is_empty());
        assert!(all(&load("")).is_empty(), "the default is 5s");
    }
}
