//! The agent's state on disk: per deployment, the accepted document and what it may have made.
//!
//! One CBOR file per deployment under `<state_dir>/deployments/`, written
//! atomically, so a kill at any point leaves the old or the new record.

use std::path::{Path, PathBuf};

use harmony_score_wire::{from_cbor, try_to_cbor, DeploymentName, DesiredState, DeviceScore};
use harmony_topology::local::write_file_atomic;
use serde::{Deserialize, Serialize};

/// Largest record the agent reads back (documents are bounded to 1 MiB; the
/// owned Scores of earlier generations ride along).
const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// What the agent keeps about one deployment across restarts.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// The last accepted document; `None` once the deployment was deleted
    /// and its prune has not finished.
    #[serde(default)]
    pub document: Option<DesiredState>,
    /// The last generation whose every Score held.
    #[serde(default)]
    pub observed_generation: u64,
    /// When it was last applied fully.
    #[serde(default)]
    pub last_applied_at_ms: u64,
    /// Every Score that may have made something on the device and is not yet
    /// undone, one per resource. Grown before a document is applied, shrunk
    /// only after an undo held, so a crash never forgets a resource.
    #[serde(default)]
    pub owned: Vec<Box<dyn DeviceScore>>,
}

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading, writing or removing a file failed.
    #[error("state {path}: {source}")]
    IoFailed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A record could not be encoded or decoded (for example a Score tag this build no longer has).
    #[error("state {path}: {message}")]
    CorruptRecord { path: PathBuf, message: String },
}

/// A deployment's name and its record as loaded (or why it could not be).
pub type LoadedRecord = (DeploymentName, Result<DeploymentRecord, StoreError>);

/// The folder of deployment records.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating) `<state_dir>/deployments`.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let dir = state_dir.join("deployments");
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::IoFailed { path: dir.clone(), source })?;
        Ok(Self { dir })
    }

    fn path(&self, name: &DeploymentName) -> PathBuf {
        self.dir.join(format!("{name}.cbor"))
    }

    /// Every record on disk; a record that cannot be read is returned as its error.
    pub fn load_all(&self) -> Result<Vec<LoadedRecord>, StoreError> {
        let io = |source| StoreError::IoFailed { path: self.dir.clone(), source };
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let Some(stem) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".cbor"))
            else {
                continue; // temp files of an interrupted write, or foreign files
            };
            let Ok(name) = DeploymentName::new(stem) else { continue };
            out.push((name, self.load_file(&path)));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn load_file(&self, path: &Path) -> Result<DeploymentRecord, StoreError> {
        let bytes =
            std::fs::read(path).map_err(|source| StoreError::IoFailed { path: path.to_owned(), source })?;
        from_cbor(&bytes, MAX_RECORD_BYTES, "deployment record")
            .map_err(|e| StoreError::CorruptRecord { path: path.to_owned(), message: e.to_string() })
    }

    /// Writes a record atomically (0600: documents may hold secrets).
    pub fn save(&self, name: &DeploymentName, record: &DeploymentRecord) -> Result<(), StoreError> {
        let path = self.path(name);
        let bytes = try_to_cbor(record)
            .map_err(|e| StoreError::CorruptRecord { path: path.clone(), message: e.to_string() })?;
        write_file_atomic(&path, &bytes, 0o600).map_err(|source| StoreError::IoFailed { path, source })
    }

    /// Removes a record; a missing one is not an error.
    pub fn remove(&self, name: &DeploymentName) -> Result<(), StoreError> {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                Err(StoreError::IoFailed { path, source })
            }
            _ => Ok(()),
        }
    }
}
