//! The agent's state on disk: per deployment, the accepted document's raw bytes, what it owns, and its high-water mark.
//!
//! One file per deployment, `<state_dir>/deployments/<name>.state`, written
//! atomically (temp file, fsync, rename, fsync of the folder), so a kill at
//! any point leaves the old or the new record. A record holds the document
//! exactly as it arrived (never a re-encoding of trait objects), so an
//! agent rolled back to a version without one of its tags still reads the
//! record and can say which Scores it cannot run. Every record carries a
//! SHA-256 of its content; one that does not check out is moved aside
//! (`<name>.state.unreadable-<ms>`), reported, and never overwritten.
//!
//! The folder is locked (`flock` on `<state_dir>/lock`) for as long as the
//! store is open: two agents on one state directory would undo each other.

use std::fs::File;
use std::path::{Path, PathBuf};

use harmony_score_wire::{document_digest, from_cbor, now_ms, to_cbor, DeploymentName, ResourceId};
use harmony_topology::local::{create_dir_all_durable, remove_stale_temp_files_in, write_file_atomic};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Largest record read back: a 1 MiB document plus the undo Scores of
/// earlier generations.
const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;
/// The record format this agent writes.
const RECORD_FORMAT: u32 = 2;
const SUFFIX: &str = ".state";

/// How a document's bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocumentFormat {
    /// CBOR, as in the KV bucket.
    Cbor,
    /// The JSON form (folder sources).
    Json,
}

/// An accepted document as it arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDocument {
    /// The bytes, exactly as read from the source.
    #[serde(with = "harmony_score_wire::cbor_bytes")]
    pub bytes: Vec<u8>,
    /// How they are encoded.
    pub format: DocumentFormat,
    /// [`document_digest`] of `bytes`.
    pub digest: String,
    /// The document's generation.
    pub generation: u64,
}

/// Something a deployment may have made on the device and not yet undone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedResource {
    /// The resource.
    pub resource: ResourceId,
    /// The CBOR of the Score that undoes it (`DeviceScore::undo`).
    #[serde(with = "harmony_score_wire::cbor_bytes")]
    pub undo: Vec<u8>,
}

/// The newest generation ever accepted for a deployment, and its digest.
/// It outlives deletes: a replayed older document stays refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HighWater {
    /// The generation.
    pub generation: u64,
    /// Its document's digest.
    pub digest: String,
}

/// A generation applied and being verified, persisted before its checks
/// run: a crash or reboot resumes verification instead of committing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verifying {
    /// The generation.
    pub generation: u64,
    /// Its document's digest.
    pub digest: String,
    /// When its (latest) verification started.
    pub since_ms: u64,
    /// How many verifications of it a restart cut short.
    #[serde(default)]
    pub interruptions: u32,
}

/// A generation that failed its health checks: never tried again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthFailure {
    /// The generation.
    pub generation: u64,
    /// Its document's digest (the same generation with other content is
    /// another document, refused as stale by the high-water mark anyway).
    pub digest: String,
    /// The check that failed, in one line.
    pub check: String,
    /// What it saw, bounded and escaped.
    pub output: String,
    /// When it was decided.
    pub at_ms: u64,
    /// The last good generation the device went back to; `None`: there was
    /// none, and the device was left as the failed generation made it.
    pub rolled_back_to: Option<u64>,
}

/// What the agent keeps about one deployment across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// The accepted document; `None` once the deployment was deleted.
    #[serde(default)]
    pub document: Option<StoredDocument>,
    /// The last generation whose every Score held, and its digest.
    #[serde(default)]
    pub observed_generation: u64,
    /// Digest of the observed generation's document.
    #[serde(default)]
    pub observed_digest: Option<String>,
    /// When it was last applied fully.
    #[serde(default)]
    pub last_applied_at_ms: u64,
    /// Every resource that may have been made and is not yet undone. Grown
    /// (and persisted) before a document runs, shrunk only after an undo
    /// held, so a crash never forgets a resource.
    #[serde(default)]
    pub owned: Vec<OwnedResource>,
    /// The newest generation accepted, ever.
    #[serde(default)]
    pub high_water: Option<HighWater>,
    /// The last generation committed (applied, and its checks held if it
    /// had any), as it arrived, while `document` is another (newer, not
    /// committed): what a failed generation rolls back to, from disk, with
    /// no network. `None` when `document` is the committed one
    /// (`observed_digest`): a record holds one copy of a document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_good: Option<StoredDocument>,
    /// The generation whose checks are running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifying: Option<Verifying>,
    /// The last generation that failed its checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_failure: Option<HealthFailure>,
}

impl DeploymentRecord {
    /// Whether the record is only a high-water mark: no document, nothing owned.
    pub fn is_tombstone(&self) -> bool {
        self.document.is_none() && self.owned.is_empty()
    }
}

/// The checked envelope around a record on disk.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    format: u32,
    /// `sha256:<hex>` of `payload`.
    checksum: String,
    #[serde(with = "harmony_score_wire::cbor_bytes")]
    payload: Vec<u8>,
}

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading, writing or removing a file failed.
    #[error("state {path}: {source}")]
    IoFailed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the state directory's lock.
    #[error("state directory {path} is in use by another agent (its lock is held)")]
    Locked { path: PathBuf },
    /// A record's checksum or encoding is wrong; it was moved to `kept_as`.
    #[error("state {path}: {message}; kept as {kept_as}")]
    CorruptRecord { path: PathBuf, message: String, kept_as: PathBuf },
}

/// A deployment's name and its record as loaded (or why it could not be).
pub type LoadedRecord = (DeploymentName, Result<DeploymentRecord, StoreError>);

/// The locked folder of deployment records.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// `<state_dir>/keyset`: the key set the device accepted last.
    keyset_path: PathBuf,
    /// Held open for the lock; released when the store is dropped.
    _lock: File,
    /// The state directory, locked as well (the lock file may be deleted).
    _dir_lock: File,
}

impl Store {
    /// Opens (creating) `<state_dir>/deployments` and takes the state
    /// directory's lock; [`StoreError::Locked`] when another agent has it.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::IoFailed { path, source }
        };
        let dir = state_dir.join("deployments");
        // Durable in their parents: a record in a directory a power cut
        // lost is lost with it.
        create_dir_all_durable(&dir).map_err(io(&dir))?;
        let lock_path = state_dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // The lock file can be deleted under a running agent (a "stale
        // lock" cleaned up by hand); the state directory itself cannot be
        // while it holds the records. Both are locked.
        let dir_lock = File::open(state_dir).map_err(io(state_dir))?;
        for (file, path) in [(&dir_lock, state_dir), (&lock, lock_path.as_path())] {
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::Locked { path: state_dir.to_owned() })
                }
                Err(std::fs::TryLockError::Error(source)) => {
                    return Err(StoreError::IoFailed { path: path.to_owned(), source })
                }
            }
        }
        // With the lock held no other agent writes here: the temp files of
        // record, key set and status writes a kill or a power cut
        // interrupted are garbage, up to a record's size each.
        for folder in [state_dir, dir.as_path()] {
            match remove_stale_temp_files_in(folder) {
                Ok(0) => {}
                Ok(removed) => {
                    info!(removed, folder = %harmony_score_wire::log_text(folder.display()), "removed temp files of interrupted writes")
                }
                Err(err) => {
                    warn!(folder = %harmony_score_wire::log_text(folder.display()), cause = %harmony_score_wire::log_text(&err), "cannot look for temp files of interrupted writes")
                }
            }
        }
        Ok(Self { dir, keyset_path: state_dir.join("keyset"), _lock: lock, _dir_lock: dir_lock })
    }

    fn path(&self, name: &DeploymentName) -> PathBuf {
        self.dir.join(format!("{name}{SUFFIX}"))
    }

    /// Every record on disk, sorted by name. A record that cannot be read is
    /// moved aside and returned as its error, so the caller reports it.
    pub fn load_all(&self) -> Result<Vec<LoadedRecord>, StoreError> {
        let io = |source| StoreError::IoFailed { path: self.dir.clone(), source };
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            if let Some(stem) = file_name.strip_suffix(SUFFIX) {
                let Ok(name) = DeploymentName::new(stem) else { continue };
                out.push((name, self.load_file(&path)));
            } else if let Some(stem) = file_name.strip_suffix(".cbor") {
                // A first-edition record: its document was re-encoded trait
                // objects. Keep it aside, never delete it; the key is read
                // again from the source.
                let Ok(name) = DeploymentName::new(stem) else { continue };
                let message = "record of an older agent format".to_owned();
                out.push((name, Err(self.quarantine(&path, message))));
            }
            // Anything else: temp files of an interrupted write, records
            // already kept aside, foreign files.
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn load_file(&self, path: &Path) -> Result<DeploymentRecord, StoreError> {
        // Opening a FIFO would block the boot; a directory cannot be read.
        if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
            return Err(self.quarantine(path, "not a regular file".to_owned()));
        }
        let bytes =
            read_bounded(path).map_err(|source| StoreError::IoFailed { path: path.to_owned(), source })?;
        let checked = from_cbor::<Envelope>(&bytes, MAX_RECORD_BYTES, "state envelope")
            .map_err(|e| e.to_string())
            .and_then(|env| {
                if env.format != RECORD_FORMAT {
                    return Err(format!("record format {} (this agent reads {RECORD_FORMAT})", env.format));
                }
                if document_digest(&env.payload) != env.checksum {
                    return Err("checksum mismatch".to_owned());
                }
                from_cbor::<DeploymentRecord>(&env.payload, MAX_RECORD_BYTES, "deployment record")
                    .map_err(|e| e.to_string())
            });
        checked.map_err(|message| self.quarantine(path, message))
    }

    /// Moves an unreadable record to `<file>.unreadable-<ms>` so it is kept
    /// for inspection and the next save cannot overwrite it.
    fn quarantine(&self, path: &Path, message: String) -> StoreError {
        let mut kept_as = path.as_os_str().to_owned();
        kept_as.push(format!(".unreadable-{}", now_ms()));
        let kept_as = PathBuf::from(kept_as);
        if let Err(err) = std::fs::rename(path, &kept_as) {
            warn!(path = %harmony_score_wire::log_text(path.display()), cause = %harmony_score_wire::log_text(&err), "cannot move an unreadable record aside");
        }
        StoreError::CorruptRecord { path: path.to_owned(), message, kept_as }
    }

    /// Moves `name`'s record aside like an unreadable one (it loaded, but
    /// is not that deployment's), so it is kept and never overwritten.
    pub fn set_aside(&self, name: &DeploymentName, message: String) -> StoreError {
        self.quarantine(&self.path(name), message)
    }

    /// Writes a record atomically (0600: documents may hold secrets).
    pub fn save(&self, name: &DeploymentName, record: &DeploymentRecord) -> Result<(), StoreError> {
        let path = self.path(name);
        let payload = to_cbor(record);
        if payload.len() > MAX_RECORD_BYTES - 1024 {
            // It could not be read back: refuse it now rather than lose the
            // record (ownership, high-water mark) at the next start.
            let source = std::io::Error::other(format!(
                "record of {} bytes is larger than the {MAX_RECORD_BYTES} bytes a record may have",
                payload.len()
            ));
            return Err(StoreError::IoFailed { path, source });
        }
        let envelope = Envelope { format: RECORD_FORMAT, checksum: document_digest(&payload), payload };
        write_file_atomic(&path, &to_cbor(&envelope), 0o600)
            .map_err(|source| StoreError::IoFailed { path, source })
    }

    /// The accepted key set's bytes as received (root-signed: whoever reads
    /// them checks the signature again), or `None` when there is none.
    pub fn load_keyset(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let path = &self.keyset_path;
        if std::fs::symlink_metadata(path).is_ok_and(|m| !m.is_file()) {
            return Err(StoreError::IoFailed {
                path: path.clone(),
                source: std::io::Error::other("not a regular file"),
            });
        }
        match read_bounded(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::IoFailed { path: path.clone(), source }),
        }
    }

    /// Replaces the accepted key set atomically.
    pub fn save_keyset(&self, bytes: &[u8]) -> Result<(), StoreError> {
        write_file_atomic(&self.keyset_path, bytes, 0o644)
            .map_err(|source| StoreError::IoFailed { path: self.keyset_path.clone(), source })
    }

    /// The folder records live in.
    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    File::open(path)?.take(MAX_RECORD_BYTES as u64 + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> DeploymentName {
        DeploymentName::new(n).unwrap()
    }

    fn record(generation: u64) -> DeploymentRecord {
        let bytes = vec![0xa0, generation as u8];
        DeploymentRecord {
            document: Some(StoredDocument {
                digest: document_digest(&bytes),
                bytes,
                format: DocumentFormat::Cbor,
                generation,
            }),
            owned: vec![OwnedResource { resource: ResourceId::path("/etc/x"), undo: vec![1, 2, 3] }],
            high_water: Some(HighWater { generation, digest: "d".into() }),
            ..Default::default()
        }
    }

    #[test]
    fn records_round_trip_with_their_raw_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save(&name("web"), &record(3)).unwrap();
        let loaded = store.load_all().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].0, name("web"));
        assert_eq!(loaded[0].1.as_ref().unwrap(), &record(3));
    }

    // Issue 9 §3: a kill during a record write left its temp file in the
    // state directory for good (the crash test found one after a restart).
    #[test]
    fn temp_files_of_writes_a_dead_agent_left_are_removed_when_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let deployments = dir.path().join("deployments");
        std::fs::create_dir_all(&deployments).unwrap();
        std::fs::write(deployments.join(format!(".harmony-tmp.{dead}.0123abcd.7")), b"half a record")
            .unwrap();
        std::fs::write(dir.path().join(format!(".harmony-tmp.{dead}.3")), b"half a status").unwrap();
        std::fs::write(deployments.join("notes.txt"), b"someone else's").unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save(&name("web"), &record(1)).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&deployments)
            .unwrap()
            .chain(std::fs::read_dir(dir.path()).unwrap())
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["deployments", "lock", "notes.txt", "web.state"]);
    }

    #[test]
    fn a_second_store_on_one_directory_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        assert!(matches!(Store::open(dir.path()), Err(StoreError::Locked { .. })));
        drop(first);
        Store::open(dir.path()).unwrap();
    }

    // Issue 6 §5: an unreadable record was skipped at boot and overwritten by the next save.
    #[test]
    fn a_corrupt_record_is_reported_and_kept_aside_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save(&name("web"), &record(3)).unwrap();
        let path = store.dir().join("web.state");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff; // one flipped bit in the payload
        std::fs::write(&path, &bytes).unwrap();
        std::fs::write(store.dir().join("old.cbor"), b"first edition").unwrap();

        let loaded = store.load_all().unwrap();
        let errors: Vec<_> =
            loaded.iter().map(|(n, r)| (n.as_str(), r.as_ref().err().map(ToString::to_string))).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[1].1.as_deref().unwrap().contains("checksum mismatch"), "{errors:?}");
        assert!(errors[0].1.as_deref().unwrap().contains("older agent format"), "{errors:?}");
        // Kept aside byte for byte; a new save does not touch it.
        store.save(&name("web"), &record(4)).unwrap();
        let kept: Vec<_> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".unreadable-"))
            .collect();
        assert_eq!(kept.len(), 2, "{kept:?}");
        let web_kept = kept.iter().find(|n| n.starts_with("web.state")).unwrap();
        assert_eq!(std::fs::read(store.dir().join(web_kept)).unwrap(), bytes);
        // A truncated record is caught as well.
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(store.load_all().unwrap()[0].1.is_err());
    }

    // Attack: someone "cleans up a stale lock" (or a tmp cleaner removes it)
    // while the agent runs. flock held on the unlinked file no longer guards
    // the path: a second agent created a fresh `lock`, took it, and ran on
    // the same records, each undoing the other's resources.
    #[test]
    fn deleting_the_lock_file_does_not_let_a_second_store_in() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join("lock")).unwrap();
        assert!(matches!(Store::open(dir.path()), Err(StoreError::Locked { .. })));
    }

    // Attack: a FIFO (or any non-regular file) named like a record. Opening
    // it blocked load_all, and with it the agent's boot, until some process
    // wrote to it.
    #[test]
    fn a_fifo_named_like_a_record_does_not_block_the_boot() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let fifo = store.dir().join("web.state");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let (tx, rx) = std::sync::mpsc::channel();
        let dir_path = dir.path().to_owned();
        drop(store);
        std::thread::spawn(move || {
            let store = Store::open(&dir_path).unwrap();
            let _ =
                tx.send(store.load_all().map(|l| l.into_iter().map(|(_, r)| r.is_err()).collect::<Vec<_>>()));
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(5));
        if got.is_err() {
            // Release the stuck reader before failing.
            drop(std::fs::OpenOptions::new().read(true).write(true).open(&fifo));
        }
        assert_eq!(got.expect("load_all returned").unwrap(), vec![true], "reported as unreadable");
    }

    #[test]
    fn the_longest_deployment_name_fits_every_file_name_the_store_derives() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let long = name(&"x".repeat(DeploymentName::MAX_LEN));
        store.save(&long, &record(1)).unwrap();
        let path = store.dir().join(format!("{long}.state"));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(3);
        std::fs::write(&path, bytes).unwrap();
        let loaded = store.load_all().unwrap();
        let Err(StoreError::CorruptRecord { kept_as, .. }) = &loaded[0].1 else { panic!("{loaded:?}") };
        assert!(kept_as.exists(), "the kept-aside name fits NAME_MAX");
    }
}
