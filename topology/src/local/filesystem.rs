//! The `Filesystem` capability and its real adapter on `LocalDeviceTopology`.
//!
//! Every operation resolves the parent directory beneath a descriptor of
//! the root (see [`super::beneath`]) and acts on the last component through
//! that directory's descriptor (`openat`, `renameat`, `unlinkat`,
//! `mkdirat`, `fchmod`), never following a symlink there.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{DirBuilder, File, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rustix::fs::{
    mkdirat, openat, renameat, statat, statx, unlinkat, AtFlags, Dir, FileType, Mode, OFlags, StatxFlags,
};
use rustix::io::Errno;
use tracing::debug;

use super::beneath::{Beneath, BeneathError};
use super::paths::{self, ScorePath};
use super::LocalDeviceTopology;

/// Most bytes [`Filesystem::inspect`] reads of a file (one more tells a
/// longer file apart).
pub const MAX_INSPECT_BYTES: u64 = 16 * 1024 * 1024;

/// Permission bits a mode may carry (`rwx` for all three, setuid/gid, sticky).
pub(super) const MODE_MASK: u32 = 0o7777;

/// What is at a path right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathEntry {
    /// Nothing.
    Missing,
    /// A regular file with its content and permission bits.
    File { content: Vec<u8>, mode: u32 },
    /// A directory with its permission bits.
    Directory { mode: u32 },
    /// Something else (a symlink, which is never followed, a socket, a
    /// device node, …).
    Other,
}

/// Why a filesystem operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilesystemError {
    /// Score paths must be absolute.
    #[error("path {path:?} is not absolute")]
    PathNotAbsolute { path: String },
    /// The path leaves the topology's root through `..` or a symlink (an
    /// absolute one does unless the root is the host's `/`).
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
/// names them; the topology decides where they really live. Symlinks in
/// the parent directories may be followed (the topology says how far); the
/// last component is never followed: a symlink there is replaced, removed
/// or reported as [`PathEntry::Other`].
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
    /// Creates the directory `path` (and its missing parents) with `mode`.
    async fn create_dir(&self, path: &str, mode: u32) -> Result<(), FilesystemError>;
    /// Removes the directory `path`; with `recursive` its content too
    /// (symlinks in it are removed, never followed, and a symlink at `path`
    /// is removed itself). A missing directory is not an error.
    async fn remove_dir(&self, path: &str, recursive: bool) -> Result<(), FilesystemError>;
}

/// Writes `content` to `path` so that a crash leaves either the old or the
/// new file: temp file in the same directory, fsync, rename, fsync of the
/// directory. Missing parent directories are created with mode 0755, each
/// made durable in its parent.
///
/// The path is followed as given: this is for the agent's own directories
/// (its state, its status file). A Score's paths go through
/// [`Filesystem::write_file`], which stays beneath the topology's root.
pub fn write_file_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let (dir, name) = split_file_path(path)?;
    create_dir_all_durable(dir)?;
    let dir = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    write_at(dir.as_fd(), name, content, mode)
}

/// Like [`write_file_atomic`] (a reader sees the old or the new content,
/// never a mix), but not durable: no fsync of the file or its directory.
/// For files worth no disk flush: rewritten at every start and change (the
/// agent's `status.json` mirror), where a power cut may lose the last
/// version (or, on a filesystem that does not order data before renames,
/// leave it empty) and nothing depends on it.
pub fn write_file_replacing(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let (dir, name) = split_file_path(path)?;
    std::fs::create_dir_all(dir)?;
    let dir = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    write_at_with(dir.as_fd(), name, content, mode, Durability::None)
}

/// A file's directory (`.` for a bare name) and its name.
fn split_file_path(path: &Path) -> io::Result<(&Path, &OsStr)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let dir = match path.parent() {
        Some(dir) if dir.as_os_str().is_empty() => Path::new("."),
        Some(dir) => dir,
        None => return Err(io::Error::new(io::ErrorKind::InvalidInput, "path has no parent")),
    };
    Ok((dir, name))
}

/// Whether an atomic write is flushed to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// The file, then its directory after the rename.
    Flushed,
    /// Neither (see [`write_file_replacing`]).
    None,
}

/// Creates `dir` and its missing parents (0755, less the umask), following
/// symlinks as given, and fsyncs the parent of each directory it creates:
/// a directory's own name reaches the disk with its parent, not with the
/// files later written into it, so without that a power cut could lose the
/// directory and everything beneath it.
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    let parent = match dir.parent() {
        Some(parent) if parent.as_os_str().is_empty() => Path::new("."),
        Some(parent) => parent,
        None => return Ok(()),
    };
    create_dir_all_durable(parent)?;
    match DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {
            let parent = rustix::fs::open(
                parent,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            Ok(rustix::fs::fsync(&parent)?)
        }
        // Made by another process meanwhile: it is that one's to sync.
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(err) => Err(err),
    }
}

/// The prefix of the temp files of atomic writes:
/// `.harmony-tmp.<pid>.<nonce>.<n>`.
const TEMP_PREFIX: &str = ".harmony-tmp.";

/// This process's part of its temp file names: its pid and a nonce drawn
/// at first use. Pids repeat (an agent started early at boot often gets
/// the pid it had before a power cut), so the pid alone cannot tell this
/// process's temp files from those a dead one with the same pid left.
fn temp_stem() -> &'static str {
    static STEM: OnceLock<String> = OnceLock::new();
    STEM.get_or_init(|| {
        let nonce =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos() ^ d.as_secs() as u32);
        format!("{TEMP_PREFIX}{}.{nonce:08x}.", std::process::id())
    })
}

/// The atomic write within the directory `dir`: a new temp file (`O_EXCL`,
/// `O_NOFOLLOW`), its exact mode set through its descriptor, fsync,
/// `renameat` over `name` (which replaces whatever is there, a symlink
/// included, and never writes through it), fsync of `dir`. Before it, the
/// temp files of writes that a dead process left in `dir` are removed, if
/// this process has not swept `dir` lately (see [`sweep_if_due`]).
pub(super) fn write_at(dir: BorrowedFd<'_>, name: &OsStr, content: &[u8], mode: u32) -> io::Result<()> {
    write_at_with(dir, name, content, mode, Durability::Flushed)
}

fn write_at_with(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    content: &[u8],
    mode: u32,
    durability: Durability,
) -> io::Result<()> {
    // A kill or a power cut between a temp file's creation and its rename
    // leaves it behind, up to a whole file's size each time: without this,
    // a device that crashes often fills the directories it manages. Before
    // the write, so that it runs even when the write then fails (a disk
    // those temp files filled, a crash at every first write).
    sweep_if_due(dir);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // The temp name does not embed the target's: a target name near
    // NAME_MAX would otherwise make the temp name too long to create.
    let tmp = format!("{}{n}", temp_stem());
    let result = (|| -> io::Result<()> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut file = File::from(openat(dir, tmp.as_str(), flags, Mode::from_raw_mode(mode & MODE_MASK))?);
        file.write_all(content)?;
        // The creation mode went through the umask; set the exact bits.
        file.set_permissions(Permissions::from_mode(mode & MODE_MASK))?;
        if durability == Durability::Flushed {
            file.sync_all()?;
        }
        Ok(renameat(dir, tmp.as_str(), dir, name)?)
    })();
    if result.is_err() {
        let _ = unlinkat(dir, tmp.as_str(), AtFlags::empty());
    }
    result?;
    if durability == Durability::Flushed {
        rustix::fs::fsync(dir)?;
    }
    Ok(())
}

/// How long a directory this process swept clean is not swept again. The
/// temp files a dead process left are all there when this one first writes
/// to the directory; only a process dying later (another agent writing the
/// same directory) can add more, and they wait at most this long. Reading
/// the directory at every write cost a `getdents` of the whole directory
/// per file written.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// Directories remembered as swept; past this many the memory is cleared
/// (each is then swept again at its next write).
const SWEPT_MAX: usize = 4096;

/// A directory by identity: device, inode and birth time (inode numbers are
/// reused once a directory is removed; the birth time is 0 on a file system
/// that keeps none).
type DirId = (u32, u32, u64, i64, u32);

fn dir_id(dir: BorrowedFd<'_>) -> Option<DirId> {
    let st = statx(dir, "", AtFlags::EMPTY_PATH, StatxFlags::INO | StatxFlags::BTIME).ok()?;
    let born = if st.stx_mask & StatxFlags::BTIME.bits() != 0 {
        (st.stx_btime.tv_sec, st.stx_btime.tv_nsec)
    } else {
        (0, 0)
    };
    Some((st.stx_dev_major, st.stx_dev_minor, st.stx_ino, born.0, born.1))
}

/// Sweeps `dir` of dead processes' temp files ([`remove_stale_temp_files`])
/// unless this process swept it clean less than [`SWEEP_EVERY`] ago. A
/// sweep that could not read the directory or remove a file is not
/// remembered: the next write tries again.
fn sweep_if_due(dir: BorrowedFd<'_>) {
    static SWEPT: OnceLock<Mutex<HashMap<DirId, Instant>>> = OnceLock::new();
    let swept = SWEPT.get_or_init(Mutex::default);
    let Some(id) = dir_id(dir) else {
        remove_stale_temp_files(dir);
        return;
    };
    let now = Instant::now();
    let recent = |at: &Instant| now.saturating_duration_since(*at) < SWEEP_EVERY;
    if swept.lock().unwrap_or_else(PoisonError::into_inner).get(&id).is_some_and(recent) {
        return;
    }
    let clean = sweep(dir).clean;
    let mut swept = swept.lock().unwrap_or_else(PoisonError::into_inner);
    if !clean {
        swept.remove(&id);
        return;
    }
    if swept.len() >= SWEPT_MAX {
        swept.clear();
    }
    swept.insert(id, now);
}

/// Removes from `dir` the temp files of atomic writes that a process no
/// longer running began and never renamed (it was killed, or the power
/// failed). Those of running processes (this one's other writes, another
/// agent's) are kept. Best effort: what cannot be removed now is tried
/// again at the next write in `dir`. Returns how many were removed.
pub(super) fn remove_stale_temp_files(dir: BorrowedFd<'_>) -> usize {
    sweep(dir).removed
}

/// What [`sweep`] did.
struct Sweep {
    /// Temp files removed.
    removed: usize,
    /// The whole directory was read and every stale temp file removed.
    clean: bool,
}

fn sweep(dir: BorrowedFd<'_>) -> Sweep {
    let Ok(entries) = Dir::read_from(dir) else { return Sweep { removed: 0, clean: false } };
    let (mut removed, mut clean) = (0, true);
    for entry in entries {
        let Ok(entry) = entry else {
            clean = false;
            continue;
        };
        let Ok(file_name) = entry.file_name().to_str() else { continue };
        if !is_stale_temp_name(file_name) {
            continue;
        }
        // Only a regular file (never a directory someone named so); a
        // symlink is removed itself, never followed.
        let regular = match entry.file_type() {
            FileType::RegularFile | FileType::Symlink => true,
            FileType::Unknown => statat(dir, file_name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::RegularFile),
            _ => false,
        };
        if !regular {
            continue;
        }
        match unlinkat(dir, file_name, AtFlags::empty()) {
            Ok(()) => removed += 1,
            // Removed meanwhile (another agent's sweep).
            Err(Errno::NOENT) => {}
            Err(_) => clean = false,
        }
    }
    if removed > 0 {
        debug!(removed, "removed temp files of writes an earlier process did not finish");
    }
    Sweep { removed, clean }
}

/// Whether `file_name` is the temp file of a write by a process that is
/// gone: another process with this one's pid before it (another nonce, or
/// the first edition's `<pid>.<n>` form), or a pid no process has.
fn is_stale_temp_name(file_name: &str) -> bool {
    let Some(rest) = file_name.strip_prefix(TEMP_PREFIX) else { return false };
    if file_name.starts_with(temp_stem()) {
        return false;
    }
    let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<i32>().ok()) else { return false };
    if pid == std::process::id() as i32 {
        return true;
    }
    match rustix::process::Pid::from_raw(pid) {
        // ESRCH: no such process. EPERM: one runs, under another user.
        Some(pid) => rustix::process::test_kill_process(pid) == Err(Errno::SRCH),
        None => false,
    }
}

/// Removes the temp files of writes a dead process left in the directory
/// `dir` (see [`write_file_atomic`]); the agent calls it on its state
/// directory at start. Returns how many were removed.
pub fn remove_stale_temp_files_in(dir: &Path) -> io::Result<usize> {
    let dir = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    Ok(remove_stale_temp_files(dir.as_fd()))
}

/// Opens `name` in `dir` without following a symlink (`ELOOP`), without
/// blocking on a FIFO and without making a terminal the agent's: a FIFO or
/// a device node swapped in must neither hang the agent nor be used.
fn open_nofollow(dir: BorrowedFd<'_>, name: &str) -> rustix::io::Result<File> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    openat(dir, name, flags, Mode::empty()).map(File::from)
}

fn inspect_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<PathEntry> {
    let stat = match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(PathEntry::Missing),
        Err(err) => return Err(err.into()),
    };
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::Directory => return Ok(PathEntry::Directory { mode: stat.st_mode & MODE_MASK }),
        FileType::RegularFile => {}
        // A symlink is reported, never followed.
        _ => return Ok(PathEntry::Other),
    }
    let file = match open_nofollow(dir, name) {
        Ok(file) => file,
        Err(Errno::NOENT) => return Ok(PathEntry::Missing),
        // Replaced by a symlink since the stat.
        Err(Errno::LOOP) => return Ok(PathEntry::Other),
        Err(err) => return Err(err.into()),
    };
    // What was opened, not what was seen before: it may have been replaced.
    let meta = file.metadata()?;
    let mode = meta.mode() & MODE_MASK;
    if meta.is_dir() {
        return Ok(PathEntry::Directory { mode });
    }
    if !meta.is_file() {
        return Ok(PathEntry::Other);
    }
    // Bounded: a Score's content is at most a document (1 MiB), so the
    // first MAX_INSPECT_BYTES + 1 bytes tell whether it matches; a huge
    // file already in place must not be read whole into memory.
    let mut content = Vec::new();
    file.take(MAX_INSPECT_BYTES + 1).read_to_end(&mut content)?;
    Ok(PathEntry::File { content, mode })
}

/// Changes the mode through a descriptor, never through a path: the last
/// component is opened without following a symlink, and a regular file
/// with a second hard link (which may be a file outside the root) is
/// refused, since its mode is that other file's too.
fn set_mode_at(dir: BorrowedFd<'_>, name: &str, mode: u32) -> io::Result<()> {
    let file = open_nofollow(dir, name)?;
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

fn create_dir_at(beneath: &Beneath, path: &ScorePath, mode: u32) -> Result<(), BeneathError> {
    let mode = mode & MODE_MASK;
    // Missing parents get 0755, as for files: the Score's mode (0777, a
    // sticky or setgid bit) is for the directory it names, not for
    // ancestors it never owns.
    let parent = beneath.dir_creating(&path.parents, 0o755)?;
    match mkdirat(&parent, path.name.as_str(), Mode::from_raw_mode(mode)) {
        // Durable before the run reports it made.
        Ok(()) => rustix::fs::fsync(&parent)?,
        Err(Errno::EXIST) => {}
        Err(err) => return Err(err.into()),
    }
    // As for files, the umask may have cleared bits the Score asked for;
    // they are set on the directory opened, never through a symlink.
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let dir = File::from(openat(&parent, path.name.as_str(), flags, Mode::empty())?);
    Ok(dir.set_permissions(Permissions::from_mode(mode))?)
}

fn remove_dir_at(dir: BorrowedFd<'_>, name: &str, recursive: bool) -> rustix::io::Result<()> {
    if !recursive {
        return ignore_missing(unlinkat(dir, name, AtFlags::REMOVEDIR));
    }
    match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(()),
        Err(err) => Err(err),
        // The link itself goes, as with `std::fs::remove_dir_all`; what it
        // points at is never touched.
        Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::Symlink => {
            ignore_missing(unlinkat(dir, name, AtFlags::empty()))
        }
        Ok(_) => remove_tree(dir, name),
    }
}

/// Removes the directory `name` in `dir` and everything in it, each entry
/// through the descriptor of the directory holding it: a directory is
/// opened `O_NOFOLLOW` before it is entered, so a symlink (there from the
/// start or swapped in) is removed itself and never followed.
fn remove_tree<P: rustix::path::Arg + Copy>(dir: BorrowedFd<'_>, name: P) -> rustix::io::Result<()> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let tree = match openat(dir, name, flags, Mode::empty()) {
        Ok(tree) => tree,
        Err(Errno::NOENT) => return Ok(()),
        Err(err) => return Err(err),
    };
    for entry in Dir::read_from(&tree)? {
        let entry = entry?;
        let child = entry.file_name();
        if child == c"." || child == c".." {
            continue;
        }
        let unlinked = match entry.file_type() {
            FileType::Directory | FileType::Unknown => Err(Errno::ISDIR),
            _ => unlinkat(&tree, child, AtFlags::empty()),
        };
        match unlinked {
            Ok(()) | Err(Errno::NOENT) => {}
            // A directory, or one now: its content first.
            Err(Errno::ISDIR) => match remove_tree(tree.as_fd(), child) {
                // Not a directory after all (a symlink, a file): itself.
                Err(Errno::NOTDIR | Errno::LOOP) => ignore_missing(unlinkat(&tree, child, AtFlags::empty()))?,
                other => other?,
            },
            Err(err) => return Err(err),
        }
    }
    ignore_missing(unlinkat(dir, name, AtFlags::REMOVEDIR))
}

fn ignore_missing(result: rustix::io::Result<()>) -> rustix::io::Result<()> {
    match result {
        Err(Errno::NOENT) => Ok(()),
        other => other,
    }
}

impl LocalDeviceTopology {
    /// Splits `path`, opens the root and runs `op` with both on the
    /// blocking pool, so a slow disk never stalls the agent's network tasks.
    pub(super) async fn beneath<R: Send + 'static>(
        &self,
        op_name: &'static str,
        path: &str,
        op: impl FnOnce(&Beneath, ScorePath) -> Result<R, BeneathError> + Send + 'static,
    ) -> Result<R, FilesystemError> {
        let parsed = paths::parse(path)?;
        let (root, resolver) = (self.root.clone(), self.resolver);
        let result = tokio::task::spawn_blocking(move || op(&Beneath::open(&root, resolver)?, parsed)).await;
        let io_err = |source| FilesystemError::Io { op: op_name, path: path.to_owned(), source };
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(BeneathError::Escapes)) => Err(FilesystemError::PathEscapesRoot { path: path.to_owned() }),
            Ok(Err(BeneathError::Io(source))) => Err(io_err(source)),
            Err(join) => Err(io_err(io::Error::other(join.to_string()))),
        }
    }
}

impl LocalDeviceTopology {
    /// [`Filesystem::inspect`] on the blocking pool, whatever the caches hold.
    pub(super) async fn inspect_on_pool(&self, path: &str) -> Result<PathEntry, FilesystemError> {
        self.beneath("inspect", path, |beneath, path| match existing_parent(beneath, &path)? {
            Some(dir) => Ok(inspect_at(dir.as_fd(), &path.name)?),
            None => Ok(PathEntry::Missing),
        })
        .await
    }
}

/// The parent of `path` beneath the root, or `None` when it does not exist
/// (so neither does anything in it).
fn existing_parent(
    beneath: &Beneath,
    path: &ScorePath,
) -> Result<Option<std::os::fd::OwnedFd>, BeneathError> {
    match beneath.dir(&path.parents) {
        Ok(dir) => Ok(Some(dir)),
        Err(err) if err.is_not_found() => Ok(None),
        Err(err) => Err(err),
    }
}

#[async_trait]
impl Filesystem for LocalDeviceTopology {
    async fn inspect(&self, path: &str) -> Result<PathEntry, FilesystemError> {
        // A reconcile that finds everything in place inspects files the
        // kernel has in memory: no need to hand those to another thread.
        if let Some(entry) = super::cached::inspect(&self.root, self.resolver, path) {
            return Ok(entry);
        }
        self.inspect_on_pool(path).await
    }

    async fn write_file(&self, path: &str, content: &[u8], mode: u32) -> Result<(), FilesystemError> {
        let content = content.to_vec();
        self.beneath("write", path, move |beneath, path| {
            let dir = beneath.dir_creating(&path.parents, 0o755)?;
            Ok(write_at(dir.as_fd(), OsStr::new(&path.name), &content, mode)?)
        })
        .await
    }

    async fn set_mode(&self, path: &str, mode: u32) -> Result<(), FilesystemError> {
        self.beneath("chmod", path, move |beneath, path| {
            let dir = beneath.dir(&path.parents)?;
            Ok(set_mode_at(dir.as_fd(), &path.name, mode)?)
        })
        .await
    }

    async fn remove_file(&self, path: &str) -> Result<(), FilesystemError> {
        self.beneath("remove", path, |beneath, path| match existing_parent(beneath, &path)? {
            Some(dir) => match unlinkat(&dir, path.name.as_str(), AtFlags::empty()) {
                // Durable before the agent forgets it owned the file: a
                // removal lost to a power cut would bring back a file
                // that no record owns, so nothing would ever prune it.
                Ok(()) => Ok(rustix::fs::fsync(&dir)?),
                Err(Errno::NOENT) => Ok(()),
                Err(err) => Err(err.into()),
            },
            None => Ok(()),
        })
        .await
    }

    async fn create_dir(&self, path: &str, mode: u32) -> Result<(), FilesystemError> {
        self.beneath("mkdir", path, move |beneath, path| create_dir_at(beneath, &path, mode)).await
    }

    async fn remove_dir(&self, path: &str, recursive: bool) -> Result<(), FilesystemError> {
        self.beneath("rmdir", path, move |beneath, path| match existing_parent(beneath, &path)? {
            Some(dir) => {
                remove_dir_at(dir.as_fd(), &path.name, recursive)?;
                // As for a file: durable before the agent forgets it.
                Ok(rustix::fs::fsync(&dir)?)
            }
            None => Ok(()),
        })
        .await
    }
}
#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// The topology over `root` both ways: `openat2` where the kernel has
    /// it, and walking one component at a time as without it.
    fn both(root: &Path) -> [LocalDeviceTopology; 2] {
        [LocalDeviceTopology::new(root), LocalDeviceTopology::new(root).walking_beneath()]
    }

    #[tokio::test]
    async fn write_is_atomic_sets_exact_mode_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        for topo in both(dir.path()) {
            let root = topo.root().to_path_buf();
            let _ = fs::remove_dir_all(root.join("a"));
            topo.write_file("/a/b/c.txt", b"one", 0o640).await.unwrap();
            topo.write_file("/a/b/c.txt", b"two", 0o600).await.unwrap();
            assert_eq!(
                topo.inspect("/a/b/c.txt").await.unwrap(),
                PathEntry::File { content: b"two".to_vec(), mode: 0o600 }
            );
            let names: Vec<_> =
                fs::read_dir(root.join("a/b")).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(names, vec![std::ffi::OsString::from("c.txt")]);
            assert_eq!(fs::metadata(root.join("a")).unwrap().permissions().mode() & 0o7777, 0o755 & !umask());
        }
    }

    fn umask() -> u32 {
        let dir = tempfile::tempdir().unwrap();
        DirBuilder::new().mode(0o777).create(dir.path().join("probe")).unwrap();
        !fs::metadata(dir.path().join("probe")).unwrap().permissions().mode() & 0o777
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
        for topo in both(dir.path()) {
            assert!(topo.set_mode("/hard", 0o777).await.is_err());
            assert!(topo.set_mode("/soft", 0o777).await.is_err());
            assert_eq!(fs::metadata(&target).unwrap().permissions().mode() & 0o7777, 0o600);
            topo.write_file("/own", b"y", 0o600).await.unwrap();
            topo.set_mode("/own", 0o640).await.unwrap();
            assert_eq!(fs::metadata(dir.path().join("own")).unwrap().permissions().mode() & 0o7777, 0o640);
        }
    }

    #[tokio::test]
    async fn inspect_reports_missing_directories_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        for topo in both(dir.path()) {
            assert_eq!(topo.inspect("/nothing").await.unwrap(), PathEntry::Missing);
            assert_eq!(topo.inspect("/no/such/parent").await.unwrap(), PathEntry::Missing);
            topo.create_dir("/d/e", 0o750).await.unwrap();
            assert_eq!(topo.inspect("/d/e").await.unwrap(), PathEntry::Directory { mode: 0o750 });
            // A missing parent gets 0755, not the Score's mode.
            topo.create_dir("/p/q", 0o1777).await.unwrap();
            assert_eq!(topo.inspect("/p").await.unwrap(), PathEntry::Directory { mode: 0o755 });
            assert_eq!(topo.inspect("/p/q").await.unwrap(), PathEntry::Directory { mode: 0o1777 });
            topo.remove_dir("/p", true).await.unwrap();
            topo.write_file("/d/e/f/g", b"x", 0o644).await.unwrap();
            topo.remove_dir("/d", true).await.unwrap();
            topo.remove_dir("/d", true).await.unwrap();
            topo.remove_file("/d/x").await.unwrap();
            assert_eq!(topo.inspect("/d").await.unwrap(), PathEntry::Missing);
            topo.create_dir("/empty", 0o700).await.unwrap();
            topo.remove_dir("/empty", false).await.unwrap();
            topo.remove_dir("/empty", false).await.unwrap();
            assert_eq!(topo.inspect("/empty").await.unwrap(), PathEntry::Missing);
        }
    }

    #[tokio::test]
    async fn a_file_where_a_directory_is_expected_is_an_error_not_a_change() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("file"), "x").unwrap();
        for topo in both(dir.path()) {
            assert!(matches!(topo.write_file("/file/x", b"y", 0o644).await, Err(FilesystemError::Io { .. })));
            assert!(matches!(topo.create_dir("/file", 0o700).await, Err(FilesystemError::Io { .. })));
            assert!(matches!(topo.remove_dir("/file", true).await, Err(FilesystemError::Io { .. })));
            assert!(matches!(topo.inspect("/file/x").await, Err(FilesystemError::Io { .. })));
            assert_eq!(fs::read(dir.path().join("file")).unwrap(), b"x");
            assert_eq!(
                fs::metadata(dir.path().join("file")).unwrap().permissions().mode() & 0o777,
                0o644 & !umask()
            );
        }
    }

    // Issue 9 §3: a SIGKILL between a temp file's creation and its rename
    // left the temp file (up to a whole file) in the managed directory for
    // good; a device crashing often filled the directories it manages.
    #[tokio::test]
    async fn a_write_removes_temp_files_dead_processes_left_in_its_directory_and_keeps_live_ones() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let me = std::process::id();
        let stale = [
            format!(".harmony-tmp.{dead}.0123abcd.4"),
            // The first edition's form.
            format!(".harmony-tmp.{dead}.2"),
            // An earlier process with this pid (pids repeat after a reboot).
            format!(".harmony-tmp.{me}.00000000.0"),
            format!(".harmony-tmp.{me}.9"),
        ];
        let kept = [
            // A running process's write in progress (pid 1 always runs).
            ".harmony-tmp.1.0123abcd.4".to_owned(),
            // This process's own, in progress.
            format!("{}999999", temp_stem()),
            ".harmony-tmp.not-a-pid".to_owned(),
            "other".to_owned(),
        ];
        let dir = tempfile::tempdir().unwrap();
        for topo in both(dir.path()) {
            let etc = topo.root().join("etc");
            fs::create_dir_all(etc.join(format!(".harmony-tmp.{dead}.0.0"))).unwrap();
            for name in stale.iter().chain(&kept) {
                fs::write(etc.join(name), b"x").unwrap();
            }
            topo.write_file("/etc/app.conf", b"new", 0o644).await.unwrap();
            let mut left: Vec<String> =
                fs::read_dir(&etc).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            left.sort();
            let mut want: Vec<String> = kept.to_vec();
            // A directory named like a temp file is not the agent's.
            want.extend([format!(".harmony-tmp.{dead}.0.0"), "app.conf".to_owned()]);
            want.sort();
            assert_eq!(left, want);
            fs::remove_dir_all(&etc).unwrap();
        }
    }

    // A directory is read for dead processes' temp files at this process's
    // first write in it, not at every write (a `getdents` of the whole
    // directory per file written); a directory removed and made again
    // (its inode number possibly reused) is a new directory, swept again.
    #[tokio::test]
    async fn a_directory_is_swept_at_the_first_write_and_again_when_it_is_made_anew() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = |n: u32| format!(".harmony-tmp.{dead}.0123abcd.{n}");
        let dir = tempfile::tempdir().unwrap();
        for topo in both(dir.path()) {
            let etc = topo.root().join("srv");
            let _ = fs::remove_dir_all(&etc);
            fs::create_dir_all(&etc).unwrap();
            fs::write(etc.join(stale(1)), b"x").unwrap();
            topo.write_file("/srv/a", b"a", 0o644).await.unwrap();
            assert!(!etc.join(stale(1)).exists(), "the first write sweeps");
            // Left since the sweep (a process that died after it): kept
            // until the directory is due again.
            fs::write(etc.join(stale(2)), b"x").unwrap();
            topo.write_file("/srv/b", b"b", 0o644).await.unwrap();
            assert!(etc.join(stale(2)).exists(), "swept at every write");
            let inode = fs::metadata(&etc).unwrap().ino();
            fs::remove_dir_all(&etc).unwrap();
            fs::create_dir_all(&etc).unwrap();
            fs::write(etc.join(stale(3)), b"x").unwrap();
            topo.write_file("/srv/a", b"a", 0o644).await.unwrap();
            assert!(
                !etc.join(stale(3)).exists(),
                "a directory made anew (inode {} then {inode}) was not swept",
                fs::metadata(&etc).unwrap().ino()
            );
        }
    }

    // The sweep runs before the write: a write that fails (here: its target
    // is a non-empty directory; on a device, a disk the dead processes'
    // temp files filled) still clears them.
    #[test]
    fn a_write_that_fails_still_sweeps_its_directory() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(format!(".harmony-tmp.{dead}.0123abcd.1"));
        fs::write(&stale, b"x").unwrap();
        fs::create_dir_all(dir.path().join("target/inside")).unwrap();
        let fd = rustix::fs::open(dir.path(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        assert!(write_at(fd.as_fd(), OsStr::new("target"), b"x", 0o644).is_err());
        assert!(!stale.exists(), "the failed write left the dead process's temp file");
    }

    #[test]
    fn the_agents_own_files_are_written_atomically_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/deep/record.cbor");
        write_file_atomic(&path, b"one", 0o600).unwrap();
        write_file_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o600);
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
        assert!(write_file_atomic(Path::new("/"), b"x", 0o600).is_err());
    }
}
