//! Secret values that redact themselves, and the three places a configured secret can come from.

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

/// A credential value: prints as `[REDACTED]` in `Debug`, has no `Display`, and is zeroised on drop.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretString::from(value.into()))
    }

    /// The raw value, for the one place that must send it (a provider call or an upstream header).
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// A short, stable, non-reversible identifier: lets logs and state files tell two values
    /// apart without revealing either.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.expose().as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// Where a configured secret lives. Files and environment variables are read at each use, so a
/// rotated Kubernetes secret mount is picked up without a restart.
#[derive(Clone)]
pub enum SecretSource {
    Literal(Secret),
    File(PathBuf),
    Env(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("secret file {0} is empty")]
    EmptyFile(PathBuf),
    #[error("environment variable {0} is not set or is empty")]
    Env(String),
}

impl SecretSource {
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        match self {
            SecretSource::Literal(secret) => Ok(secret.clone()),
            SecretSource::File(path) => {
                let raw = std::fs::read_to_string(path).map_err(|e| SecretError::File {
                    path: path.clone(),
                    reason: e.kind().to_string(),
                })?;
                // Secret files written by editors and `kubectl create secret --from-file` often
                // end in a newline that is not part of the value.
                let value = raw.trim_end_matches(['\n', '\r']);
                if value.is_empty() {
                    return Err(SecretError::EmptyFile(path.clone()));
                }
                Ok(Secret::new(value))
            }
            SecretSource::Env(var) => match std::env::var(var) {
                Ok(value) if !value.is_empty() => Ok(Secret::new(value)),
                _ => Err(SecretError::Env(var.clone())),
            },
        }
    }

    /// Where the value comes from, naming no secret: the file or the variable, or for a value
    /// written in the config its fingerprint. A chain's identity includes the origin of the
    /// values that name its account, so a new value at the same place (a rotated bootstrap
    /// refresh token) continues the chain while another place starts another one.
    pub fn origin(&self) -> String {
        match self {
            SecretSource::Literal(secret) => format!("value {}", secret.fingerprint()),
            SecretSource::File(path) => format!("file {}", normal_file_path(path).display()),
            SecretSource::Env(var) => format!("env {var}"),
        }
    }

    /// The file this secret is read from, for reload watchers.
    pub fn file(&self) -> Option<&PathBuf> {
        match self {
            SecretSource::File(path) => Some(path),
            _ => None,
        }
    }
}

/// One spelling for every way of writing a file's path (`d/./f`, `d/x/../f`, `d//f`, a path
/// relative to the working directory it is read from), so that two credentials reading one file
/// get one origin — and the load-time check that refuses two credentials sharing one chain sees
/// them. Lexical only: the file may not exist yet, and a symlink is the operator's explicit choice.
fn normal_file_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        // Secret files are opened relative to the working directory (see `resolve`).
        std::env::current_dir()
            .map(|cwd| cwd.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    let mut out = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                // `..` above the root stays at the root, as the kernel resolves it.
                if !out.pop() && !out.has_root() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Literal(_) => f.write_str("literal [REDACTED]"),
            SecretSource::File(path) => write!(f, "file {}", path.display()),
            SecretSource::Env(var) => write!(f, "env {var}"),
        }
    }
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SourceVisitor;
        const EXPECTED: &str = "a string, { file = \"PATH\" } or { env = \"VAR\" }";

        impl<'de> Visitor<'de> for SourceVisitor {
            type Value = SecretSource;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(EXPECTED)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecretSource, E> {
                if v.is_empty() {
                    return Err(E::custom("secret is empty"));
                }
                Ok(SecretSource::Literal(Secret::new(v)))
            }

            // Environment overrides arrive parsed: a numeric or boolean secret is still a string.
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SecretSource, E> {
                self.visit_str(&v.to_string())
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SecretSource, E> {
                self.visit_str(&v.to_string())
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<SecretSource, E> {
                self.visit_str(&v.to_string())
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<SecretSource, E> {
                self.visit_str(&v.to_string())
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretSource, A::Error> {
                let mut found: Option<SecretSource> = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    if found.is_some() {
                        return Err(de::Error::custom(format!("expected {EXPECTED}, not both")));
                    }
                    if value.is_empty() {
                        return Err(de::Error::custom(format!("`{key}` is empty")));
                    }
                    found = Some(match key.as_str() {
                        "file" => SecretSource::File(PathBuf::from(value)),
                        "env" => SecretSource::Env(value),
                        other => return Err(de::Error::unknown_field(other, &["file", "env"])),
                    });
                }
                found.ok_or_else(|| de::Error::custom(format!("expected {EXPECTED}")))
            }
        }

        deserializer.deserialize_any(SourceVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{secret:?}"), "[REDACTED]");
        let source = SecretSource::Literal(secret);
        assert!(!format!("{source:?}").contains("hunter2"));
    }

    #[test]
    fn file_source_strips_trailing_newline_and_rereads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "first\n").unwrap();
        let source = SecretSource::File(path.clone());
        assert_eq!(source.resolve().unwrap().expose(), "first");
        std::fs::write(&path, "second").unwrap();
        assert_eq!(source.resolve().unwrap().expose(), "second");
    }

    #[test]
    fn missing_sources_name_what_is_missing() {
        let err = SecretSource::Env("TOKENWARD_TEST_UNSET_VAR".into())
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("TOKENWARD_TEST_UNSET_VAR"));
        let err = SecretSource::File("/nonexistent/x".into())
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x"));
    }

    #[test]
    fn deserializes_three_forms_and_rejects_others() {
        #[derive(Deserialize)]
        struct W {
            s: SecretSource,
        }
        let w: W = serde_json::from_str(r#"{"s":"lit"}"#).unwrap();
        assert!(matches!(w.s, SecretSource::Literal(_)));
        let w: W = serde_json::from_str(r#"{"s":{"file":"/a"}}"#).unwrap();
        assert!(matches!(w.s, SecretSource::File(_)));
        let w: W = serde_json::from_str(r#"{"s":{"env":"A"}}"#).unwrap();
        assert!(matches!(w.s, SecretSource::Env(_)));
        assert!(serde_json::from_str::<W>(r#"{"s":{"vault":"x"}}"#).is_err());
        assert!(serde_json::from_str::<W>(r#"{"s":{"file":"a","env":"b"}}"#).is_err());
        let w: W = serde_json::from_str(r#"{"s":7}"#).unwrap();
        assert!(matches!(w.s, SecretSource::Literal(ref v) if v.expose() == "7"));
        assert!(serde_json::from_str::<W>(r#"{"s":[1]}"#).is_err());
    }
}
