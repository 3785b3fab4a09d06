//! `LocalDeviceTopology`: the device the agent runs on, confined to a root directory.

mod filesystem;
mod paths;

use std::path::{Path, PathBuf};

use async_trait::async_trait;

pub use filesystem::{write_file_atomic, Filesystem, FilesystemError, PathEntry, MAX_INSPECT_BYTES};

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

impl LocalDeviceTopology {
    /// The path as the device's filesystem sees it now: the parent
    /// directory's symlinks resolved (beneath the root), the last component
    /// kept (a write replaces a link, it does not follow it). `/lib/x` on a
    /// merged-/usr root is `/usr/lib/x`. Parents that do not exist yet are
    /// kept as written. `None` when the parent resolves outside the root or
    /// the path is not absolute.
    ///
    /// Blocking (it reads the filesystem). A symlink created after this
    /// call is not seen: this names aliases for conflict checks, it is not
    /// an access check.
    pub fn device_path(&self, path: &str) -> Option<String> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
        let (last, parents) = parts.split_last()?;
        if !path.starts_with('/') || parts.contains(&"..") {
            return None;
        }
        let canonical_root = std::fs::canonicalize(&self.root).ok()?;
        for existing in (0..=parents.len()).rev() {
            let prefix: PathBuf = parents[..existing].iter().fold(self.root.clone(), |p, c| p.join(c));
            if let Ok(resolved) = std::fs::canonicalize(&prefix) {
                let rest = parents[existing..].iter().chain(std::iter::once(last));
                let full = rest.fold(resolved, |p, c| p.join(c));
                let relative = full.strip_prefix(&canonical_root).ok()?;
                return Some(format!("/{}", relative.to_str()?));
            }
        }
        None
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
