//! The `ArtifactStore` capability: a file a Score names by name and sha256, made local.
//!
//! A Score that ships content too large for a document (a container image
//! archive) names it by `name` and `sha256`; the topology fetches it into a
//! local file whose digest it checked, and the Score uses the path. Where
//! the bytes come from (the fleet's NATS Object Store, a cache, a USB stick)
//! is the store's business, not the Score's: the agent hands the device
//! topology an implementation ([`crate::LocalDeviceTopology::with_artifacts`]).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

/// A local copy of an artifact, its sha256 checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedArtifact {
    /// Where the file is (the store keeps it; callers only read it).
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// How long the transfer took; `None` when the store already held a
    /// copy with the right digest (nothing was transferred).
    pub transferred_in: Option<Duration>,
}

impl fmt::Display for FetchedArtifact {
    /// `2105344 bytes fetched in 41 ms` or `2105344 bytes from the cache`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.transferred_in {
            Some(took) => write!(f, "{} bytes fetched in {} ms", self.bytes, took.as_millis()),
            None => write!(f, "{} bytes from the cache", self.bytes),
        }
    }
}

/// Why an artifact could not be made local. Nothing half-written is left
/// where a later fetch would take it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArtifactError {
    /// The topology has no store, or the store cannot be reached.
    #[error("artifact {name}: no artifact store is available: {message}")]
    Unavailable {
        /// The artifact.
        name: String,
        /// Why.
        message: String,
    },
    /// The store holds no artifact of that name.
    #[error("artifact {name} not found in the artifact store")]
    NotFound {
        /// The artifact.
        name: String,
    },
    /// The artifact's content is not what the Score's digest names.
    #[error("artifact {name}: sha256 is {actual}, the score names {expected}")]
    DigestMismatch {
        /// The artifact.
        name: String,
        /// The digest the Score names.
        expected: String,
        /// The digest of what the store holds (or sent).
        actual: String,
    },
    /// The artifact is larger than the device accepts.
    #[error("artifact {name} is {size} bytes, more than the {max} bytes this device accepts")]
    TooLarge {
        /// The artifact.
        name: String,
        /// Its size (as announced, or as far as it was read).
        size: u64,
        /// The device's limit.
        max: u64,
    },
    /// The transfer failed part way (a timeout, a lost connection, a store
    /// that does not hold what it announced).
    #[error("artifact {name}: transfer failed: {message}")]
    TransferFailed {
        /// The artifact.
        name: String,
        /// Why.
        message: String,
    },
    /// The local copy could not be written or read.
    #[error("artifact {name}: {op}")]
    CacheFailed {
        /// The artifact.
        name: String,
        /// What was being done.
        op: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl From<ArtifactError> for crate::InterpretError {
    fn from(err: ArtifactError) -> Self {
        use crate::InterpretErrorKind as K;
        let kind = match &err {
            ArtifactError::Unavailable { .. } => K::Unavailable,
            ArtifactError::DigestMismatch { .. } => K::DigestMismatch,
            ArtifactError::TooLarge { .. } => K::InvalidInput,
            ArtifactError::CacheFailed { .. } => K::Io,
            _ => K::Failed,
        };
        let mut text = err.to_string();
        if let ArtifactError::CacheFailed { source, .. } = &err {
            text = format!("{text}: {source}");
        }
        Self::with_kind(kind, crate::bounded_text(&text, 1024))
    }
}

/// Artifacts on a topology: a file named by `name` whose sha256 is
/// `sha256` (64 lowercase hex digits), as a local path.
///
/// A store must verify the digest of what it returns, hand out only
/// complete files, and be safe to call concurrently (two deployments may
/// ask for one artifact at once). Callers race the returned future against
/// their run's cancellation and time limit: dropping it must stop the
/// transfer and leave nothing a later fetch would take as complete.
#[async_trait]
pub trait ArtifactStore: Send + Sync {
    /// The local copy of the artifact `name` with digest `sha256`.
    async fn fetch(&self, name: &str, sha256: &str) -> Result<FetchedArtifact, ArtifactError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InterpretErrorKind;

    #[test]
    fn errors_map_to_typed_interpret_errors() {
        let mismatch = ArtifactError::DigestMismatch {
            name: "busybox.tar".into(),
            expected: "a".repeat(64),
            actual: "b".repeat(64),
        };
        let err = crate::InterpretError::from(mismatch);
        assert_eq!(err.kind(), InterpretErrorKind::DigestMismatch);
        assert!(err.message().contains("busybox.tar"), "{}", err.message());
        let io = ArtifactError::CacheFailed {
            name: "x".into(),
            op: "writing the cache".into(),
            source: std::io::Error::other("disk full"),
        };
        let err = crate::InterpretError::from(io);
        assert_eq!(
            (err.kind(), err.message()),
            (InterpretErrorKind::Io, "artifact x: writing the cache: disk full")
        );
        let fetched =
            FetchedArtifact { path: "/x".into(), bytes: 10, transferred_in: Some(Duration::from_millis(41)) };
        assert_eq!(fetched.to_string(), "10 bytes fetched in 41 ms");
        assert_eq!(
            FetchedArtifact { transferred_in: None, ..fetched }.to_string(),
            "10 bytes from the cache"
        );
    }
}
