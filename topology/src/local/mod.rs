//! `LocalDeviceTopology`: the device the agent runs on, confined to a root directory.

mod apt;
mod beneath;
mod cached;
mod filesystem;
mod paths;
mod podman;
mod podman_logs;
mod systemd;
mod tool;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

pub use filesystem::{
    create_dir_all_durable, remove_stale_temp_files_in, write_file_atomic, write_file_replacing, Filesystem,
    FilesystemError, PathEntry, MAX_INSPECT_BYTES,
};
pub use podman::Podman;
pub use systemd::UNIT_DIR;

use crate::artifact::{ArtifactError, ArtifactStore, FetchedArtifact};
use crate::{PreparationError, PreparationOutcome, Topology};

/// The device itself: files ([`Filesystem`]), containers
/// ([`ContainerRuntime`](crate::ContainerRuntime), through [`Podman`]), and
/// in later capabilities services and packages.
///
/// Every path a Score names is absolute and is resolved beneath `root`
/// (default `/`), opened as a directory descriptor for each operation; a
/// path that leaves the root, by `..` or through a symlink pointing
/// outside, is refused, and so is an absolute symlink unless the root is
/// the host's `/`. Symlinks in parent directories that stay beneath the
/// root are followed; the last component is never followed.
#[derive(Clone)]
pub struct LocalDeviceTopology {
    name: String,
    root: PathBuf,
    resolver: beneath::Resolver,
    podman: Podman,
    artifacts: Option<Arc<dyn ArtifactStore>>,
}

impl std::fmt::Debug for LocalDeviceTopology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDeviceTopology")
            .field("name", &self.name)
            .field("root", &self.root)
            .field("resolver", &self.resolver)
            .field("podman", &self.podman)
            .field("artifacts", &self.artifacts.as_ref().map(|_| "<store>"))
            .finish()
    }
}

impl LocalDeviceTopology {
    /// A topology confined to `root`. Nothing is opened yet: each operation
    /// opens the root, so a missing root is an operation's error.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            name: "local-device".to_owned(),
            root: root.into(),
            resolver: beneath::Resolver::default(),
            podman: Podman::default(),
            artifacts: None,
        }
    }

    /// The same topology running containers with `podman` (default:
    /// `podman` from `PATH`).
    #[must_use]
    pub fn with_podman(self, podman: Podman) -> Self {
        Self { podman, ..self }
    }

    /// The same topology fetching artifacts (container image archives a
    /// Score names by name and sha256) from `store`. Without one, a Score
    /// that needs an artifact fails as `unavailable`.
    #[must_use]
    pub fn with_artifacts(self, store: Arc<dyn ArtifactStore>) -> Self {
        Self { artifacts: Some(store), ..self }
    }

    /// The podman adapter containers run through.
    pub fn podman(&self) -> &Podman {
        &self.podman
    }

    /// The same topology resolving as a kernel without `openat2` does.
    #[cfg(test)]
    pub(crate) fn walking_beneath(self) -> Self {
        Self { resolver: beneath::Resolver::Walk, ..self }
    }

    /// A topology rooted at `$HARMONY_ROOT`, or `/` when it is unset,
    /// running the podman binary `$HARMONY_PODMAN` (default `podman`).
    pub fn from_env() -> Self {
        let topology =
            Self::new(std::env::var_os("HARMONY_ROOT").map_or_else(|| PathBuf::from("/"), PathBuf::from));
        match std::env::var_os("HARMONY_PODMAN") {
            Some(program) => topology.with_podman(Podman::new(program)),
            None => topology,
        }
    }

    /// The root directory every path is resolved under.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl LocalDeviceTopology {
    /// The path as the device's filesystem sees it now: the parent
    /// directory's symlinks resolved beneath the root, as the filesystem
    /// operations resolve them, the last component kept (a write replaces a
    /// link, it does not follow it). `/lib/x` on a merged-/usr root is
    /// `/usr/lib/x`. Parents that do not exist yet are kept as written.
    /// `None` when the parent leaves the root (an absolute symlink does,
    /// unless the root is the host's `/`), cannot be read, or the path is
    /// not an absolute Score path.
    ///
    /// Blocking (it reads the filesystem). A symlink created after this
    /// call is not seen: this names aliases for conflict checks, it is not
    /// an access check.
    pub fn device_path(&self, path: &str) -> Option<String> {
        let parsed = paths::parse(path).ok()?;
        let beneath = beneath::Beneath::open(&self.root, self.resolver).ok()?;
        let mut names = beneath.resolved_names(&parsed.parents).ok()?;
        names.push(parsed.name.into());
        let names: Option<Vec<&str>> = names.iter().map(|name| name.to_str()).collect();
        Some(format!("/{}", names?.join("/")))
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

/// Artifacts on the device: through the store the agent handed over
/// ([`LocalDeviceTopology::with_artifacts`]), else none.
#[async_trait]
impl ArtifactStore for LocalDeviceTopology {
    async fn fetch(&self, name: &str, sha256: &str) -> Result<FetchedArtifact, ArtifactError> {
        match &self.artifacts {
            Some(store) => store.fetch(name, sha256).await,
            None => Err(ArtifactError::Unavailable {
                name: name.to_owned(),
                message:
                    "this topology was given no artifact store (the agent daemon has one; `apply` does not)"
                        .to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod confinement_tests;
