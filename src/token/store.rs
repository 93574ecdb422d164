//! Where the newest refresh token of each credential is kept, so a restart never loses a rotated
//! one. The engine sees only [`TokenStore`]: a shared store for many replicas slots in beside
//! [`FileStore`] without touching it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// The refresh chain of one credential.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RefreshState {
    /// The newest refresh token; `None` after the provider rejected the chain.
    pub refresh_token: Option<Secret>,
    /// Fingerprint of the operator-provided bootstrap token this chain grew from: a new
    /// bootstrap value (a different fingerprint) starts a new chain.
    pub origin: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {path}: {reason}")]
    Io {
        action: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("state file {path} is not valid: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

#[async_trait]
pub trait TokenStore: Send + Sync {
    /// Where the state lives, for logs and `check`.
    fn describe(&self) -> String;
    async fn load(&self, credential: &str) -> Result<Option<RefreshState>, StoreError>;
    /// Durably replaces the credential's state: when this returns `Ok`, a crash loses nothing.
    async fn save(&self, credential: &str, state: &RefreshState) -> Result<(), StoreError>;
}

/// One JSON file per credential in a directory, replaced atomically (write, fsync, rename,
/// fsync the directory) and readable by the owner only.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: Arc<PathBuf>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    version: u32,
    refresh_token: Option<String>,
    origin: Option<String>,
    saved_at_unix: u64,
}

impl FileStore {
    /// Opens `dir`, creating it (mode 0700) if needed.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io = |action, e: std::io::Error| StoreError::Io {
            action,
            path: dir.to_path_buf(),
            reason: e.to_string(),
        };
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode_0700()
                .create(dir)
                .map_err(|e| io("create state directory", e))?;
        }
        let meta = std::fs::metadata(dir).map_err(|e| io("read state directory", e))?;
        if !meta.is_dir() {
            return Err(StoreError::Io {
                action: "use",
                path: dir.to_path_buf(),
                reason: "not a directory".into(),
            });
        }
        // A crash between writing a temporary file and renaming it leaves the temporary behind;
        // the state file itself is intact, so the leftovers are only litter.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') && name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(FileStore {
            dir: Arc::new(dir.to_path_buf()),
        })
    }

    pub fn path_for(&self, credential: &str) -> PathBuf {
        self.dir.join(format!("{credential}.json"))
    }

    fn load_sync(path: &Path) -> Result<Option<RefreshState>, StoreError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::Io {
                    action: "read",
                    path: path.into(),
                    reason: e.to_string(),
                });
            }
        };
        let disk: OnDisk = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: path.into(),
            reason: format!("{} at line {}", e.classify_str(), e.line()),
        })?;
        if disk.version != 1 {
            return Err(StoreError::Corrupt {
                path: path.into(),
                reason: format!("unknown version {}", disk.version),
            });
        }
        Ok(Some(RefreshState {
            refresh_token: disk.refresh_token.map(Secret::new),
            origin: disk.origin,
        }))
    }

    fn save_sync(dir: &Path, path: &Path, state: &RefreshState) -> Result<(), StoreError> {
        let io = |action, e: std::io::Error| StoreError::Io {
            action,
            path: path.into(),
            reason: e.to_string(),
        };
        let disk = OnDisk {
            version: 1,
            refresh_token: state.refresh_token.as_ref().map(|s| s.expose().to_string()),
            origin: state.origin.clone(),
            saved_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let bytes = serde_json::to_vec(&disk)
            .map_err(|e| io("encode", std::io::Error::other(e.to_string())))?;
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
        let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode_0600()
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, path)?;
            // The rename is durable only once the directory entry is.
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io("write", e)
        })
    }
}

trait ClassifyStr {
    fn classify_str(&self) -> &'static str;
}

impl ClassifyStr for serde_json::Error {
    fn classify_str(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Eof => "truncated",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected content",
            serde_json::error::Category::Io => "I/O error",
        }
    }
}

/// Owner-only permissions on the files and directory that hold refresh tokens.
trait OwnerOnly {
    fn mode_0600(&mut self) -> &mut Self;
}
trait OwnerOnlyDir {
    fn mode_0700(&mut self) -> &mut Self;
}

impl OwnerOnly for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

impl OwnerOnlyDir for std::fs::DirBuilder {
    fn mode_0700(&mut self) -> &mut Self {
        use std::os::unix::fs::DirBuilderExt;
        self.mode(0o700)
    }
}

#[async_trait]
impl TokenStore for FileStore {
    fn describe(&self) -> String {
        format!("files in {}", self.dir.display())
    }

    async fn load(&self, credential: &str) -> Result<Option<RefreshState>, StoreError> {
        let path = self.path_for(credential);
        tokio::task::spawn_blocking(move || Self::load_sync(&path))
            .await
            .map_err(|e| StoreError::Io {
                action: "read",
                path: self.path_for(credential),
                reason: e.to_string(),
            })?
    }

    async fn save(&self, credential: &str, state: &RefreshState) -> Result<(), StoreError> {
        let path = self.path_for(credential);
        let dir = self.dir.clone();
        let state = state.clone();
        tokio::task::spawn_blocking(move || Self::save_sync(&dir, &path, &state))
            .await
            .map_err(|e| StoreError::Io {
                action: "write",
                path: self.path_for(credential),
                reason: e.to_string(),
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn round_trips_owner_only_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("state")).unwrap();
        assert_eq!(store.load("c").await.unwrap(), None);
        let state = RefreshState {
            refresh_token: Some(Secret::new("rt-1")),
            origin: Some("ab".into()),
        };
        store.save("c", &state).await.unwrap();
        assert_eq!(store.load("c").await.unwrap(), Some(state));
        let mode = std::fs::metadata(store.path_for("c"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(dir.path().join("state"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let second = RefreshState {
            refresh_token: Some(Secret::new("rt-2")),
            origin: None,
        };
        store.save("c", &second).await.unwrap();
        assert_eq!(store.load("c").await.unwrap(), Some(second));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[tokio::test]
    async fn corrupt_state_is_reported_without_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        std::fs::write(
            store.path_for("c"),
            b"{\"version\":1,\"refresh_token\":\"leak-me",
        )
        .unwrap();
        let err = store.load("c").await.unwrap_err().to_string();
        assert!(err.contains("c.json") && err.contains("truncated"), "{err}");
        assert!(!err.contains("leak-me"));
    }
}
