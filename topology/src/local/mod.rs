//! `LocalDeviceTopology`: the device the agent runs on, confined to a root directory.

mod filesystem;
mod paths;

use std::path::{Path, PathBuf};

use async_trait::async_trait;

pub use filesystem::{write_file_atomic, Filesystem, FilesystemError, PathEntry};

use crate::{PreparationError, PreparationOutcome, Topology};

/// The device itself: files, and (in later capabilities) containers,
/// services and packages.
///
/// Every path a Score names is absolute and is resolved under `root`
/// (default `/`); a path that leaves the root, by `..` or through a symlink
/// pointing outside, is refused.
#[derive(Debug, Clone)]
pub struct LocalDeviceTopology {
    name: String,
    root: PathBuf,
}

impl LocalDeviceTopology {
    /// A topology confined to `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { name: "local-device".to_owned(), root: root.into() }
    }

    /// A topology rooted at `$HARMONY_ROOT`, or `/` when it is unset.
    pub fn from_env() -> Self {
        Self::new(std::env::var_os("HARMONY_ROOT").map_or_else(|| PathBuf::from("/"), PathBuf::from))
    }

    /// The root directory every path is resolved under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves an absolute Score path under the root, refusing any path that
    /// would leave it.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, FilesystemError> {
        paths::resolve_under(&self.root, path)
    }
}

impl Default for LocalDeviceTopology {
    fn default() -> Self {
        Self::new("/")
    }
}

#[async_trait]
impl Topology for LocalDeviceTopology {
    fn name(&self) -> &str {
        &self.name
    }

    async fn ensure_ready(&self) -> Result<PreparationOutcome, PreparationError> {
        match std::fs::metadata(&self.root) {
            Ok(meta) if meta.is_dir() => Ok(PreparationOutcome::Noop),
            Ok(_) => Err(PreparationError::new(format!("root {} is not a directory", self.root.display()))),
            Err(err) => Err(PreparationError::new(format!("root {}: {err}", self.root.display()))),
        }
    }
}
