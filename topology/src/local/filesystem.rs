//! The `Filesystem` capability and its real adapter on `LocalDeviceTopology`.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use super::LocalDeviceTopology;

/// Most bytes [`Filesystem::inspect`] reads of a file (one more tells a
/// longer file apart).
pub const MAX_INSPECT_BYTES: u64 = 16 * 1024 * 1024;

/// Permission bits a mode may carry (`rwx` for all three, setuid/gid, sticky).
const MODE_MASK: u32 = 0o7777;

/// What is at a path right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathEntry {
    /// Nothing.
    Missing,
    /// A regular file with its content and permission bits.
    File { content: Vec<u8>, mode: u32 },
    /// A directory with its permission bits.
    Directory { mode: u32 },
    /// Something else (a socket, a device node, …).
    Other,
}

/// Why a filesystem operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilesystemError {
    /// Score paths must be absolute.
    #[error("path {path:?} is not absolute")]
    PathNotAbsolute { path: String },
    /// The path leaves the topology's root through `..` or a symlink.
    #[error("path {path:?} escapes the device root")]
    PathEscapesRoot { path: String },
    /// Empty, the root itself, or holding a NUL byte.
    #[error("path {path:?} is not a valid Score path")]
    InvalidPath { path: String },
    /// The operating system refused.
    #[error("{op} {path:?} failed: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Files and directories on a topology. Paths are absolute as the Score
/// names them; the topology decides where they really live.
#[async_trait]
pub trait Filesystem: Send + Sync {
    /// What is at `path`, reading a file's content (at most
    /// [`MAX_INSPECT_BYTES`] + 1 bytes of it: a longer file differs from any
    /// content a Score can hold).
    async fn inspect(&self, path: &str) -> Result<PathEntry, FilesystemError>;
    /// Replaces `path` atomically with `content` and permission bits `mode`,
    /// creating missing parent directories (0755).
    async fn write_file(&self, path: &str, content: &[u8], mode: u32) -> Result<(), FilesystemError>;
    /// Sets the permission bits of `path`.
    async fn set_mode(&self, path: &str, mode: u32) -> Result<(), FilesystemError>;
    /// Removes the file at `path`; a missing file is not an error.
    async fn remove_file(&self, path: &str) -> Result<(), FilesystemError>;
    /// Creates the directory `path` (and its parents) with `mode`.
    async fn create_dir(&self, path: &str, mode: u32) -> Result<(), FilesystemError>;
    /// Removes the directory `path`; with `recursive` its content too.
    /// A missing directory is not an error.
    async fn remove_dir(&self, path: &str, recursive: bool) -> Result<(), FilesystemError>;
}

/// Writes `content` to `path` so that a crash leaves either the old or the
/// new file: temp file in the same directory, fsync, rename, fsync of the
/// directory. Missing parent directories are created with mode 0755.
pub fn write_file_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir =
        path.parent().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    if path.file_name().is_none() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"));
    }
    DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // The temp name does not embed the target's: a target name near
    // NAME_MAX would otherwise make the temp name too long to create.
    let tmp = dir.join(format!(".harmony-tmp.{}.{n}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode & MODE_MASK).open(&tmp)?;
        file.write_all(content)?;
        // The creation mode went through the umask; set the exact bits.
        file.set_permissions(Permissions::from_mode(mode & MODE_MASK))?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    File::open(dir)?.sync_all()
}

fn inspect_blocking(path: &Path) -> io::Result<PathEntry> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(PathEntry::Missing),
        Err(err) => return Err(err),
    };
    let mode = meta.permissions().mode() & MODE_MASK;
    if meta.is_file() {
        // Bounded: a Score's content is at most a document (1 MiB), so the
        // first MAX_INSPECT_BYTES + 1 bytes tell whether it matches; a
        // huge file already in place must not be read whole into memory.
        use std::io::Read;
        let mut content = Vec::new();
        File::open(path)?.take(MAX_INSPECT_BYTES + 1).read_to_end(&mut content)?;
        Ok(PathEntry::File { content, mode })
    } else if meta.is_dir() {
        Ok(PathEntry::Directory { mode })
    } else {
        Ok(PathEntry::Other)
    }
}

/// Changes the mode through a descriptor, never through a path: the last
/// component is opened without following a symlink, and a regular file
/// with a second hard link (which may be a file outside the root) is
/// refused, since its mode is that other file's too.
fn set_mode_blocking(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // Non-blocking and no controlling terminal: a FIFO or a device node
    // swapped in must neither hang the agent nor be used.
    let flags = libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY;
    let file = OpenOptions::new().read(true).custom_flags(flags).open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() && !meta.is_dir() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "neither a regular file nor a directory"));
    }
    if meta.is_file() && meta.nlink() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} links point at this file; its mode is not changed", meta.nlink()),
        ));
    }
    file.set_permissions(Permissions::from_mode(mode & MODE_MASK))
}

fn ignore_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl LocalDeviceTopology {
    /// Resolves `path` and runs `op` on the blocking pool, so a slow disk
    /// never stalls the agent's network tasks.
    async fn blocking<R: Send + 'static>(
        &self,
        op_name: &'static str,
        path: &str,
        op: impl FnOnce(PathBuf) -> io::Result<R> + Send + 'static,
    ) -> Result<R, FilesystemError> {
        let resolved = self.resolve(path)?;
        let io_err = |source| FilesystemError::Io { op: op_name, path: path.to_owned(), source };
        tokio::task::spawn_blocking(move || op(resolved))
            .await
            .map_err(|join| io_err(io::Error::other(join.to_string())))?
            .map_err(io_err)
    }
}

#[async_trait]
impl Filesystem for LocalDeviceTopology {
    async fn inspect(&self, path: &str) -> Result<PathEntry, FilesystemError> {
        self.blocking("inspect", path, |p| inspect_blocking(&p)).await
    }

    async fn write_file(&self, path: &str, content: &[u8], mode: u32) -> Result<(), FilesystemError> {
        let content = content.to_vec();
        self.blocking("write", path, move |p| write_file_atomic(&p, &content, mode)).await
    }

    async fn set_mode(&self, path: &str, mode: u32) -> Result<(), FilesystemError> {
        self.blocking("chmod", path, move |p| set_mode_blocking(&p, mode)).await
    }

    async fn remove_file(&self, path: &str) -> Result<(), FilesystemError> {
        self.blocking("remove", path, |p| ignore_missing(fs::remove_file(p))).await
    }

    async fn create_dir(&self, path: &str, mode: u32) -> Result<(), FilesystemError> {
        self.blocking("mkdir", path, move |p| {
            DirBuilder::new().recursive(true).mode(mode & MODE_MASK).create(&p)?;
            // As for files, the umask may have cleared bits the Score asked for.
            set_mode_blocking(&p, mode)
        })
        .await
    }

    async fn remove_dir(&self, path: &str, recursive: bool) -> Result<(), FilesystemError> {
        self.blocking("rmdir", path, move |p| {
            ignore_missing(if recursive { fs::remove_dir_all(p) } else { fs::remove_dir(p) })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_is_atomic_sets_exact_mode_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let topo = LocalDeviceTopology::new(dir.path());
        topo.write_file("/a/b/c.txt", b"one", 0o640).await.unwrap();
        topo.write_file("/a/b/c.txt", b"two", 0o600).await.unwrap();
        assert_eq!(
            topo.inspect("/a/b/c.txt").await.unwrap(),
            PathEntry::File { content: b"two".to_vec(), mode: 0o600 }
        );
        let names: Vec<_> =
            fs::read_dir(dir.path().join("a/b")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("c.txt")]);
    }

    // Issue 7 §2: a hard link inside the root to a file outside it, and a
    // chmod through the path, changed the outside file's mode.
    #[tokio::test]
    async fn a_mode_change_never_reaches_a_hard_linked_or_symlinked_file() {
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("secret");
        fs::write(&target, "x").unwrap();
        fs::set_permissions(&target, Permissions::from_mode(0o600)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        fs::hard_link(&target, dir.path().join("hard")).unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("soft")).unwrap();
        let topo = LocalDeviceTopology::new(dir.path());
        assert!(topo.set_mode("/hard", 0o777).await.is_err());
        assert!(topo.set_mode("/soft", 0o777).await.is_err());
        assert_eq!(fs::metadata(&target).unwrap().permissions().mode() & 0o7777, 0o600);
        topo.write_file("/own", b"y", 0o600).await.unwrap();
        topo.set_mode("/own", 0o640).await.unwrap();
        assert_eq!(fs::metadata(dir.path().join("own")).unwrap().permissions().mode() & 0o7777, 0o640);
    }

    #[tokio::test]
    async fn inspect_reports_missing_directories_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let topo = LocalDeviceTopology::new(dir.path());
        assert_eq!(topo.inspect("/nothing").await.unwrap(), PathEntry::Missing);
        topo.create_dir("/d/e", 0o750).await.unwrap();
        assert_eq!(topo.inspect("/d/e").await.unwrap(), PathEntry::Directory { mode: 0o750 });
        topo.remove_dir("/d", true).await.unwrap();
        topo.remove_dir("/d", true).await.unwrap();
        topo.remove_file("/d/x").await.unwrap();
        assert_eq!(topo.inspect("/d").await.unwrap(), PathEntry::Missing);
    }
}
