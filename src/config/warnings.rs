//! What a valid configuration should still tell its operator: settings that load and work
//! but weaken a defence (a private key file others can read among them), said at start, at
//! each reload and by `check`.

use super::Config;

/// Every warning about `config`, each naming the file and the key.
pub fn all(config: &Config) -> Vec<String> {
    let mut out = super::transport::plaintext_warnings(config);
    out.extend(zero_min_refresh_interval(config));
    out.extend(exposed_private_keys(config));
    out
}

/// The dialect keys whose file is a private key (Google's service-account `key_file` holds
/// one too).
const PRIVATE_KEY_KEYS: &[&str] = &["key_file", "private_key", "dpop_key"];

/// Every private key read from a file: its full config key and path.
fn private_key_files(config: &Config) -> Vec<(String, &std::path::Path)> {
    let mut out = Vec::new();
    for r in &config.routes {
        if let Some(cert) = &r.client_cert
            && let Some(path) = cert.key.file()
        {
            out.push((cert.key_key.clone(), path.as_path()));
        }
    }
    for c in &config.credentials {
        if let Some(cert) = &c.transport.client_cert
            && let Some(path) = cert.key.file()
        {
            out.push((cert.key_key.clone(), path.as_path()));
        }
        for (key, source) in c.dialect.secret_sources() {
            if PRIVATE_KEY_KEYS.contains(&key.as_str())
                && let Some(path) = source.file()
            {
                out.push((format!("credentials.{}.{key}", c.name), path.as_path()));
            }
        }
    }
    out
}

/// A private key file that group or others can read is one any other user or process on the
/// host (or in the pod) can copy. Only the file's mode is looked at, never its content; a file
/// that cannot be looked at is left to the check that reads it.
fn exposed_private_keys(config: &Config) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    private_key_files(config)
        .into_iter()
        .filter_map(|(key, path)| {
            let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
            (mode & 0o044 != 0).then(|| {
                format!(
                    "{}: `{key}`: the private key file {} is readable by group or others (mode {mode:04o}); make it readable by tokenward's user only (chmod 600, or defaultMode: 0400 on a Kubernetes secret volume)",
                    config.source.display(),
                    path.display()
                )
            })
        })
        .collect()
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
                "{}: `credentials.{}.min_refresh_interval`: 0s turns off the guard against an upstream that rejects every token (each rejection then costs a provider call) and the limit on forced refreshes (JWKS refetches keep a 1s floor); use at least 1s outside tests",
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

    #[test]
    fn a_private_key_file_others_can_read_is_a_warning_naming_key_and_path_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("signing.pem");
        let pem = rcgen::KeyPair::generate().unwrap().serialize_pem();
        std::fs::write(&key, &pem).unwrap();
        let config = |mode: u32| {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            load(&format!(
                "client_auth = \"private_key_jwt\"\nprivate_key = {{ file = \"{}\" }}",
                key.display()
            ))
        };
        let warnings = all(&config(0o644));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let w = &warnings[0];
        assert!(
            w.starts_with("/etc/tokenward.toml: `credentials.api.private_key`: ")
                && w.contains(&key.display().to_string())
                && w.contains("0644"),
            "{w}"
        );
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!w.contains(line), "key material in {w}");
        }
        assert_eq!(all(&config(0o640)).len(), 1, "group-readable");
        assert!(all(&config(0o600)).is_empty());
        assert!(all(&config(0o400)).is_empty());
    }
}
