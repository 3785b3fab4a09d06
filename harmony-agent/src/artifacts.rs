//! Artifacts over NATS: the device's `ArtifactStore`, reading the fleet's Object Store bucket into a checked cache.
//!
//! The bucket `harmony-artifacts` is an Object Store: per object one
//! metadata message on `$O.<bucket>.M.<base64url(name)>` (JSON: size, chunk
//! count, the nuid of its chunks, a digest) and its chunks on
//! `$O.<bucket>.C.<nuid>`. async-nats' `ObjectStore::get` reads the stream
//! info and creates an ordered push consumer on the chunk subject; a device
//! allowed that could also create consumers that push any stream's
//! messages to any subject. So the device reads with direct gets only: the
//! metadata with a get of the last message on its subject, then each chunk
//! with "next message on the chunk subject from sequence N". Its
//! credentials need two publish subjects and no consumer (docs/security.md).
//!
//! What arrives is hashed while it is written to a temp file in the cache
//! (`<state_dir>/artifacts`), bounded in size; only a file whose sha256 is
//! the one the Score names is renamed to `<sha256>`. A cached file is
//! hashed again before it is used and, when right, used without a transfer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;
use harmony_score_wire::names::{artifact_chunk_subject, artifacts_stream, ARTIFACTS_BUCKET};
use harmony_score_wire::validate::{check_artifact_name, check_sha256_hex};
use harmony_score_wire::{bounded_text, log_text};
use harmony_topology::{async_trait, ArtifactError, ArtifactStore, FetchedArtifact};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::{info, warn};

/// Largest artifact a device accepts unless its configuration says otherwise.
pub const DEFAULT_MAX_ARTIFACT_BYTES: u64 = 2 << 30;

/// Where the NATS source hands its connection to the artifact store once
/// it has one. Dropped without a connection (a `dir:` source): fetches
/// that need a transfer fail as `unavailable`.
#[derive(Debug)]
pub struct ArtifactLink(watch::Sender<Option<jetstream::Context>>);

impl ArtifactLink {
    /// Transfers from here on use `js` (the device's own connection).
    pub fn connect(&self, js: jetstream::Context) {
        let _ = self.0.send(Some(js));
    }
}

/// The device's artifact store: a cache directory, filled over NATS.
#[derive(Debug)]
pub struct NatsArtifacts {
    dir: PathBuf,
    max_bytes: u64,
    js: watch::Receiver<Option<jetstream::Context>>,
    /// One fetch per digest at a time: two deployments asking for one
    /// archive transfer it once.
    busy: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl NatsArtifacts {
    /// A store caching in `dir` (created when first needed), accepting
    /// artifacts of at most `max_bytes`, and the link its connection
    /// comes through. Leftovers of transfers a crash interrupted are removed.
    pub fn new(dir: PathBuf, max_bytes: u64) -> (Self, ArtifactLink) {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.filter_map(Result::ok) {
                if entry.file_name().to_string_lossy().ends_with(".part") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let (tx, rx) = watch::channel(None);
        (Self { dir, max_bytes, js: rx, busy: Mutex::new(HashMap::new()) }, ArtifactLink(tx))
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn busy(&self, sha256: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.retain(|_, lock| Arc::strong_count(lock) > 1);
        busy.entry(sha256.to_owned()).or_default().clone()
    }

    /// The connection, once the source has one; `Unavailable` without NATS.
    async fn connection(&self, name: &str) -> Result<jetstream::Context, ArtifactError> {
        let mut js = self.js.clone();
        let connected = js.wait_for(Option::is_some).await.ok().and_then(|js| js.clone());
        match connected {
            Some(js) => Ok(js),
            None => Err(ArtifactError::Unavailable {
                name: name.to_owned(),
                message: format!(
                    "this agent has no NATS connection; place the archive at {}/<sha256> to use it offline",
                    self.dir.display()
                ),
            }),
        }
    }

    /// The cached file's size when it holds exactly `sha256`; a file that
    /// does not is removed (and fetched again).
    async fn cached(&self, name: &str, path: &Path, sha256: &str) -> Result<Option<u64>, ArtifactError> {
        let owned = path.to_owned();
        let checked = tokio::task::spawn_blocking(move || -> std::io::Result<Option<(String, u64)>> {
            use std::os::unix::fs::OpenOptionsExt;
            // A cached copy is a file the agent wrote, never a link.
            let nofollow = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
            let mut file = match std::fs::OpenOptions::new().read(true).custom_flags(nofollow).open(&owned) {
                Ok(file) => file,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(err) => return Err(err),
            };
            if !file.metadata()?.is_file() {
                return Ok(Some((String::new(), 0)));
            }
            let mut hasher = Sha256::new();
            let bytes = std::io::copy(&mut file, &mut hasher)?;
            Ok(Some((hex(&hasher.finalize()), bytes)))
        })
        .await
        .map_err(|e| cache_failed(name, "hashing the cached copy", std::io::Error::other(e)))?
        .map_err(|e| cache_failed(name, &format!("reading the cached copy {}", path.display()), e))?;
        match checked {
            None => Ok(None),
            Some((actual, bytes)) if actual == sha256 => Ok(Some(bytes)),
            Some((actual, _)) => {
                warn!(artifact = %log_text(name), path = %path.display(), actual = %actual, "cached artifact does not match its digest; fetching it again");
                let _ = tokio::fs::remove_file(path).await;
                Ok(None)
            }
        }
    }

    /// Transfers `name` into a temp file beside `path`, hashing it, and
    /// renames it to `path` only when its sha256 is `sha256`.
    async fn transfer(
        &self,
        js: &jetstream::Context,
        name: &str,
        sha256: &str,
        path: &Path,
    ) -> Result<u64, ArtifactError> {
        let failed = |message: String| ArtifactError::TransferFailed {
            name: name.to_owned(),
            message: bounded_text(&message, 1024),
        };
        let stream = js.get_stream_no_info(artifacts_stream()).await.map_err(|e| failed(e.to_string()))?;
        let meta_subject = format!("$O.{ARTIFACTS_BUCKET}.M.{}", URL_SAFE.encode(name));
        let meta = match stream.direct_get_last_for_subject(meta_subject).await {
            Ok(message) => message,
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => {
                return Err(ArtifactError::NotFound { name: name.to_owned() })
            }
            Err(err) => return Err(failed(format!("reading its metadata: {err}"))),
        };
        let meta: ObjectMeta = serde_json::from_slice(&meta.payload)
            .map_err(|e| failed(format!("its metadata does not decode: {e}")))?;
        if meta.deleted {
            return Err(ArtifactError::NotFound { name: name.to_owned() });
        }
        if meta.options.as_ref().is_some_and(|o| o.link.is_some()) {
            return Err(failed("it is a link to another object; links are not followed".to_owned()));
        }
        if meta.size > self.max_bytes {
            return Err(ArtifactError::TooLarge {
                name: name.to_owned(),
                size: meta.size,
                max: self.max_bytes,
            });
        }
        // The store's own digest, when it has one, refuses a wrong object
        // before a byte moves; the bytes are hashed below all the same.
        if let Some(announced) = meta.digest.as_deref().and_then(announced_sha256) {
            if announced != sha256 {
                return Err(digest_mismatch(name, sha256, announced));
            }
        }
        let chunks = artifact_chunk_subject(&meta.nuid);
        if meta.nuid.is_empty() || meta.nuid.contains(['.', '*', '>', ' ']) {
            return Err(failed(format!("its metadata names chunks {:?}", bounded_text(&meta.nuid, 64))));
        }

        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| cache_failed(name, &format!("creating {}", self.dir.display()), e))?;
        let temp = TempFile::new(&self.dir, sha256);
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp.0)
            .await
            .map_err(|e| cache_failed(name, &format!("creating {}", temp.0.display()), e))?;
        let mut hasher = Sha256::new();
        let (mut bytes, mut read_chunks, mut next) = (0u64, 0u64, 1u64);
        while read_chunks < meta.chunks {
            let chunk = match stream.direct_get_next_for_subject(chunks.as_str(), Some(next)).await {
                Ok(chunk) => chunk,
                Err(err) if err.kind() == DirectGetErrorKind::NotFound => {
                    return Err(failed(format!(
                        "the store holds {read_chunks} of its {} chunks (replaced or deleted meanwhile?)",
                        meta.chunks
                    )))
                }
                Err(err) => return Err(failed(format!("reading chunk {}: {err}", read_chunks + 1))),
            };
            bytes += chunk.payload.len() as u64;
            if bytes > meta.size {
                return Err(failed(format!("more than the {} bytes its metadata announced", meta.size)));
            }
            hasher.update(&chunk.payload);
            file.write_all(&chunk.payload)
                .await
                .map_err(|e| cache_failed(name, &format!("writing {}", temp.0.display()), e))?;
            read_chunks += 1;
            next = chunk.sequence + 1;
        }
        if bytes != meta.size {
            return Err(failed(format!("{bytes} bytes arrived, its metadata announced {}", meta.size)));
        }
        let actual = hex(&hasher.finalize());
        if actual != sha256 {
            return Err(digest_mismatch(name, sha256, actual));
        }
        file.sync_all().await.map_err(|e| cache_failed(name, "syncing the cached copy", e))?;
        drop(file);
        tokio::fs::rename(&temp.0, path)
            .await
            .map_err(|e| cache_failed(name, &format!("renaming into {}", path.display()), e))?;
        temp.keep();
        // The rename itself must survive a power cut.
        if let Ok(dir) = tokio::fs::File::open(&self.dir).await {
            let _ = dir.sync_all().await;
        }
        Ok(bytes)
    }
}

#[async_trait]
impl ArtifactStore for NatsArtifacts {
    async fn fetch(&self, name: &str, sha256: &str) -> Result<FetchedArtifact, ArtifactError> {
        // Checked at decode; checked again because the digest becomes a file name.
        if let Err(err) = check_artifact_name("artifact", name).and(check_sha256_hex("sha256", sha256)) {
            return Err(ArtifactError::TransferFailed {
                name: bounded_text(name, 128),
                message: err.to_string(),
            });
        }
        let busy = self.busy(sha256);
        let _one_at_a_time = busy.lock().await;
        let path = self.dir.join(sha256);
        if let Some(bytes) = self.cached(name, &path, sha256).await? {
            return Ok(FetchedArtifact { path, bytes, transferred_in: None });
        }
        let js = self.connection(name).await?;
        let started = Instant::now();
        let bytes = self.transfer(&js, name, sha256, &path).await?;
        let took = started.elapsed();
        info!(artifact = %log_text(name), bytes, ms = took.as_millis() as u64, "artifact fetched");
        Ok(FetchedArtifact { path, bytes, transferred_in: Some(took) })
    }
}

/// What the device reads of an object's metadata.
#[derive(Debug, Deserialize)]
struct ObjectMeta {
    #[serde(default)]
    nuid: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    chunks: u64,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    options: Option<ObjectOptions>,
}

#[derive(Debug, Deserialize)]
struct ObjectOptions {
    #[serde(default)]
    link: Option<serde_json::Value>,
}

/// `SHA-256=<base64url>` (as Object Store clients write it) as hex.
fn announced_sha256(digest: &str) -> Option<String> {
    let encoded = digest.strip_prefix("SHA-256=")?;
    let bytes = URL_SAFE.decode(encoded).ok()?;
    (bytes.len() == 32).then(|| hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest_mismatch(name: &str, expected: &str, actual: String) -> ArtifactError {
    ArtifactError::DigestMismatch { name: name.to_owned(), expected: expected.to_owned(), actual }
}

fn cache_failed(name: &str, op: &str, source: std::io::Error) -> ArtifactError {
    ArtifactError::CacheFailed { name: name.to_owned(), op: op.to_owned(), source }
}

/// A transfer's temp file, removed unless kept: a cancelled or failed
/// transfer leaves nothing a later fetch could take as complete.
struct TempFile(PathBuf);

impl TempFile {
    fn new(dir: &Path, sha256: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Self(dir.join(format!(".{sha256}.{}.{n}.part", std::process::id())))
    }

    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_stores_digest_reads_as_hex() {
        let digest = Sha256::digest(b"hello");
        let announced = format!("SHA-256={}", URL_SAFE.encode(digest));
        assert_eq!(announced_sha256(&announced), Some(hex(&digest)));
        assert_eq!(announced_sha256("SHA-256=short"), None);
        assert_eq!(announced_sha256("MD5=x"), None);
    }

    #[tokio::test]
    async fn a_cached_copy_is_used_only_with_the_right_digest_and_without_nats_nothing_else_is() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("artifacts");
        std::fs::create_dir(&cache).unwrap();
        std::fs::write(cache.join(".leftover.part"), "half").unwrap();
        let (store, link) = NatsArtifacts::new(cache.clone(), 1 << 20);
        assert!(!cache.join(".leftover.part").exists(), "a crashed transfer's temp file is removed");
        drop(link);
        let good = hex(&Sha256::digest(b"archive"));
        std::fs::write(cache.join(&good), "archive").unwrap();
        let fetched = store.fetch("a.tar", &good).await.unwrap();
        assert_eq!((fetched.bytes, fetched.transferred_in), (7, None));
        assert_eq!(fetched.path, cache.join(&good));
        // A corrupted copy is dropped, and without NATS nothing replaces it.
        let other = hex(&Sha256::digest(b"other"));
        std::fs::write(cache.join(&other), "tampered").unwrap();
        let err = store.fetch("b.tar", &other).await.unwrap_err();
        assert!(matches!(err, ArtifactError::Unavailable { .. }), "{err:?}");
        assert!(!cache.join(&other).exists());
        std::os::unix::fs::symlink(cache.join(&good), cache.join(&other)).unwrap();
        let err = store.fetch("b.tar", &other).await.unwrap_err();
        assert!(matches!(err, ArtifactError::CacheFailed { .. }), "a link is not followed: {err:?}");
        let err = store.fetch("../x", &good).await.unwrap_err();
        assert!(matches!(err, ArtifactError::TransferFailed { .. }), "{err:?}");
        let err = store.fetch("a.tar", "../../etc/passwd").await.unwrap_err();
        assert!(matches!(err, ArtifactError::TransferFailed { .. }), "{err:?}");
    }
}
