//! The counters on disk: `state.file`, written every flush interval and at shutdown, read once
//! at start-up.
//!
//! A restart must not hand every bank a fresh day, and a file that was not read must never be
//! overwritten with zeros. So [`FileStore`] replaces the file atomically (temporary file, fsync,
//! rename, fsync of the directory); a file that parsed badly is moved aside and start-up goes on
//! from zero; any other read error stops start-up ([`LoadError`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Persisted form of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    pub version: u32,
    pub tenants: BTreeMap<String, SavedCounters>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedCounters {
    pub day: u32,
    pub daily: u64,
    pub month: u32,
    pub monthly: u64,
}

/// What loading a store found.
#[derive(Debug)]
pub enum Loaded {
    /// Nothing saved yet: start from zero.
    Empty,
    Found(SavedState),
    /// The saved state was read and is not valid; it was moved aside to `moved_to`, so the next
    /// save does not destroy it.
    Corrupt {
        reason: String,
        moved_to: PathBuf,
    },
}

/// Saved counters that could not be loaded and must not be overwritten, so start-up stops:
/// the counters may be fine (a permission or a disk problem) and the first save would replace
/// them with zeros.
#[derive(Debug)]
pub enum LoadError {
    /// The file exists (or something else is at its path) but could not be read: permission
    /// denied, a directory, an I/O error.
    Unreadable { path: PathBuf, error: std::io::Error },
    /// The file was read and is corrupt, but could not be moved aside.
    CorruptNotMoved { path: PathBuf, reason: String, error: std::io::Error },
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Unreadable { path, error } => write!(
                f,
                "cannot read the quota state file {}: {error}; fix it or move it away (state.file is never overwritten unread)",
                path.display()
            ),
            LoadError::CorruptNotMoved { path, reason, error } => write!(
                f,
                "the quota state file {} is corrupt ({reason}) and cannot be moved aside: {error}; move it away to start from zero",
                path.display()
            ),
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Unreadable { error, .. } | LoadError::CorruptNotMoved { error, .. } => Some(error),
        }
    }
}

impl From<LoadError> for std::io::Error {
    fn from(e: LoadError) -> std::io::Error {
        let kind = match &e {
            LoadError::Unreadable { error, .. } | LoadError::CorruptNotMoved { error, .. } => error.kind(),
        };
        std::io::Error::new(kind, e)
    }
}

/// Where counters persist between runs.
pub trait CounterStore: Send + Sync {
    /// Reads the saved counters. Only what was read and found invalid is [`Loaded::Corrupt`]
    /// (and moved aside); anything that stops the store from being read is an error, and
    /// start-up stops rather than overwrite it.
    fn load(&self) -> Result<Loaded, LoadError>;
    /// Writes the counters durably (a crash after it returns loses nothing written).
    fn save(&self, state: &SavedState) -> std::io::Result<()>;
}

/// Counters in a local JSON file, replaced atomically: write a temporary file, fsync it, rename
/// it over the old one, fsync the directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: impl Into<PathBuf>) -> FileStore {
        FileStore { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl CounterStore for FileStore {
    fn load(&self) -> Result<Loaded, LoadError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::Empty),
            Err(error) => return Err(LoadError::Unreadable { path: self.path.clone(), error }),
        };
        match serde_json::from_slice::<SavedState>(&bytes) {
            Ok(s) if s.version == 1 => Ok(Loaded::Found(s)),
            Ok(s) => self.move_aside(format!("unknown version {}", s.version)),
            Err(e) => self.move_aside(format!("not valid state JSON: {e}")),
        }
    }

    fn save(&self, state: &SavedState) -> std::io::Result<()> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut tmp_name = self.path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp = dir.join(tmp_name);
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        std::fs::File::open(&dir)?.sync_all()
    }
}

impl FileStore {
    fn move_aside(&self, reason: String) -> Result<Loaded, LoadError> {
        let secs = crate::clock::Clock::now_unix_s(&crate::clock::SystemClock);
        let mut aside = self.path.clone().into_os_string();
        aside.push(format!(".corrupt-{secs}"));
        let aside = PathBuf::from(aside);
        match std::fs::rename(&self.path, &aside) {
            Ok(()) => Ok(Loaded::Corrupt { reason, moved_to: aside }),
            Err(error) => Err(LoadError::CorruptNotMoved { path: self.path.clone(), reason, error }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateRegistry;

    #[test]
    fn file_store_round_trips_and_moves_corrupt_files_aside() {
        let dir = std::env::temp_dir().join(format!("bg-state-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let store = FileStore::new(dir.join("state.json"));
        assert!(matches!(store.load(), Ok(Loaded::Empty)));

        let reg = StateRegistry::default();
        reg.get_or_create("a").daily.set(100, 5);
        reg.get_or_create("a").monthly.set(7, 50);
        store.save(&reg.snapshot()).unwrap();
        let Ok(Loaded::Found(saved)) = store.load() else { panic!("saved state loads") };
        let reg2 = StateRegistry::default();
        reg2.restore(&saved);
        assert_eq!(reg2.get_or_create("a").daily.get(100), 5);
        assert_eq!(reg2.get_or_create("a").monthly.get(7), 50);

        std::fs::write(store.path(), b"{ not json").unwrap();
        match store.load() {
            Ok(Loaded::Corrupt { moved_to: p, .. }) => {
                assert!(p.exists());
                assert!(!store.path().exists(), "the corrupt file is moved, not left to fail the next start");
            }
            other => panic!("expected corrupt, got {other:?}"),
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_state_file_that_cannot_be_read_is_an_error_and_left_alone() {
        let dir = std::env::temp_dir().join(format!("bg-state-{}-{}", std::process::id(), fastrand::u64(..)));
        // A directory at the file's path: unreadable as a file even to root (EISDIR).
        let path = dir.join("state.json");
        std::fs::create_dir_all(path.join("inside")).unwrap();
        let store = FileStore::new(&path);
        match store.load() {
            Err(e @ LoadError::Unreadable { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&path.display().to_string()) && msg.contains("directory"), "{msg}");
            }
            other => panic!("expected an error, got {other:?}"),
        }
        assert!(path.join("inside").is_dir(), "not moved, not touched");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "nothing moved aside");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
