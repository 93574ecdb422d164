//! One host's chains: a JSON file per credential in `state.dir`, replaced atomically and
//! readable by the owner only, with a lock file per chain so that two processes on one directory
//! (a `run` and a `token`, or two `run`s) take turns rather than fork a chain.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{ChainKey, ChainState, Lease, StoreError, Stored, TokenStore};
use crate::secret::Secret;

/// Temporary files older than this are a crash's leftovers, not a write in progress.
const STALE_TEMP: Duration = Duration::from_secs(60);

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
    /// Bumped by every write; a write names the one it replaces (files from before have none).
    #[serde(default)]
    chain_version: u64,
}

/// Makes every temporary file name unique, within a process and across processes.
static WRITES: AtomicU64 = AtomicU64::new(0);

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
        // Leases are lock files and refresh tokens are written by rename: a directory this
        // process cannot write (a read-only mount, another owner) is a start-up error naming
        // it, not a credential that never becomes ready.
        let probe = dir.join(format!(".write-check-{}", std::process::id()));
        std::fs::File::create(&probe).map_err(|e| io("write to state directory", e))?;
        let _ = std::fs::remove_file(&probe);
        // A crash between writing a temporary file and renaming it leaves the temporary behind;
        // the state file itself is intact, so the leftovers are only litter. A live process's
        // may be a write in progress (another process on the same directory).
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if !(name.starts_with('.') && name.ends_with(".tmp")) {
                    continue;
                }
                let writer_alive = temp_writer(&name)
                    .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_TEMP);
                if !writer_alive || stale {
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

    fn lock_path(&self, credential: &str) -> PathBuf {
        self.dir.join(format!(".{credential}.lock"))
    }

    fn load_sync(path: &Path) -> Result<Option<Stored>, StoreError> {
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
        Ok(Some(Stored {
            version: disk.chain_version,
            state: ChainState {
                refresh_token: disk.refresh_token.map(Secret::new),
                origin: disk.origin,
                ..ChainState::default()
            },
        }))
    }

    /// Writes `state` as version `expected + 1` if the file is still at `expected`.
    fn save_sync(
        dir: &Path,
        path: &Path,
        expected: u64,
        state: &ChainState,
    ) -> Result<Option<u64>, StoreError> {
        let found = Self::load_sync(path)?.map_or(0, |s| s.version);
        if found != expected {
            return Ok(None);
        }
        let version = expected + 1;
        let io = |action, e: std::io::Error| StoreError::Io {
            action,
            path: path.into(),
            reason: e.to_string(),
        };
        let disk = OnDisk {
            version: 1,
            refresh_token: state.refresh_token.as_ref().map(|s| s.expose().to_string()),
            origin: state.origin.clone(),
            saved_at_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            chain_version: version,
        };
        let bytes = serde_json::to_vec(&disk)
            .map_err(|e| io("encode", std::io::Error::other(e.to_string())))?;
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
        let tmp = dir.join(format!(
            ".{file_name}.{}-{}.tmp",
            std::process::id(),
            WRITES.fetch_add(1, Ordering::Relaxed)
        ));
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
        })?;
        Ok(Some(version))
    }
}

/// The process that wrote temporary file `name` (`.FILE.PID-N.tmp`).
fn temp_writer(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".tmp")?;
    let (_, tail) = stem.rsplit_once('.')?;
    let (pid, _) = tail.split_once('-')?;
    pid.parse().ok()
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

    fn is_shared(&self) -> bool {
        false
    }

    async fn load(&self, key: &ChainKey) -> Result<Option<Stored>, StoreError> {
        let path = self.path_for(&key.name);
        let shown = path.clone();
        tokio::task::spawn_blocking(move || Self::load_sync(&path))
            .await
            .map_err(|e| StoreError::Io {
                action: "read",
                path: shown,
                reason: e.to_string(),
            })?
    }

    /// An advisory `flock` on a lock file beside the state file: the kernel drops it when its
    /// holder dies, so a crashed process never leaves a chain locked.
    async fn try_lease(&self, key: &ChainKey) -> Result<Option<Lease>, StoreError> {
        let path = self.lock_path(&key.name);
        let shown = path.clone();
        let io = move |e: std::io::Error| StoreError::Io {
            action: "lock",
            path: shown.clone(),
            reason: e.to_string(),
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode_0600()
            .open(&path)
            .map_err(&io)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Lease {
                holder: format!("pid {}", std::process::id()),
                _hold: Box::new(file),
            })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
        }
    }

    async fn save(
        &self,
        key: &ChainKey,
        _lease: Option<&Lease>,
        expected: u64,
        state: &ChainState,
    ) -> Result<Option<u64>, StoreError> {
        let path = self.path_for(&key.name);
        let shown = path.clone();
        let dir = self.dir.clone();
        let state = state.clone();
        tokio::task::spawn_blocking(move || Self::save_sync(&dir, &path, expected, &state))
            .await
            .map_err(|e| StoreError::Io {
                action: "write",
                path: shown,
                reason: e.to_string(),
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key(name: &str) -> ChainKey {
        ChainKey {
            name: name.into(),
            identity: "id".into(),
            legacy: None,
        }
    }

    fn state(refresh: &str, origin: Option<&str>) -> ChainState {
        ChainState {
            refresh_token: Some(Secret::new(refresh)),
            origin: origin.map(String::from),
            ..ChainState::default()
        }
    }

    #[tokio::test]
    async fn round_trips_owner_only_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("state")).unwrap();
        let c = key("c");
        assert_eq!(store.load(&c).await.unwrap(), None);
        let first = state("rt-1", Some("ab"));
        assert_eq!(store.save(&c, None, 0, &first).await.unwrap(), Some(1));
        let loaded = store.load(&c).await.unwrap().unwrap();
        assert_eq!((loaded.version, loaded.state), (1, first));
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
        let second = state("rt-2", None);
        assert_eq!(store.save(&c, None, 1, &second).await.unwrap(), Some(2));
        assert_eq!(store.load(&c).await.unwrap().unwrap().state, second);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[tokio::test]
    async fn a_write_naming_an_old_version_is_fenced_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let c = key("c");
        store.save(&c, None, 0, &state("rt-1", None)).await.unwrap();
        store.save(&c, None, 1, &state("rt-2", None)).await.unwrap();
        // A writer that read version 1 (and so spent rt-1) cannot overwrite rt-2.
        assert_eq!(
            store.save(&c, None, 1, &state("rt-x", None)).await.unwrap(),
            None
        );
        assert_eq!(
            store.save(&c, None, 0, &state("rt-y", None)).await.unwrap(),
            None
        );
        let now = store.load(&c).await.unwrap().unwrap();
        assert_eq!((now.version, now.state), (2, state("rt-2", None)));
    }

    #[test]
    fn a_state_directory_that_cannot_be_written_is_an_error_naming_it() {
        // /proc/self is a directory nobody can create files in, root included.
        let e = FileStore::open(Path::new("/proc/self"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("write to state directory") && e.contains("/proc/self"),
            "{e}"
        );
    }

    #[test]
    fn temporary_files_name_their_writer() {
        assert_eq!(temp_writer(".c.json.4242-7.tmp"), Some(4242));
        assert_eq!(temp_writer(".c.json.tmp"), None);
        assert_eq!(temp_writer(".x.tmp"), None);
    }

    #[tokio::test]
    async fn one_lease_per_chain_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let other = FileStore::open(dir.path()).unwrap();
        let lease = store.try_lease(&key("c")).await.unwrap().expect("free");
        assert!(other.try_lease(&key("c")).await.unwrap().is_none());
        assert!(other.try_lease(&key("d")).await.unwrap().is_some());
        drop(lease);
        assert!(other.try_lease(&key("c")).await.unwrap().is_some());
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
        let err = store.load(&key("c")).await.unwrap_err().to_string();
        assert!(err.contains("c.json") && err.contains("truncated"), "{err}");
        assert!(!err.contains("leak-me"));
    }
}
