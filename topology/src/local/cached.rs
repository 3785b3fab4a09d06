//! Inspecting a path from the kernel's caches alone, on the async runtime's own thread.
//!
//! The topology's file operations run on tokio's blocking pool, so that a
//! slow disk never stalls the agent's network tasks. For a NOOP reconcile
//! that hand-off was most of the cost: 100 FileScores took 3.5–4.6 ms where
//! a stat and a read of each file take 0.46 ms, and the same stat and read
//! each handed to the pool and back 2.5 ms
//! (`cargo bench -p harmony-agent --bench apply`). An inspection the kernel
//! can answer from memory needs no other thread. Here the names are
//! resolved as the pool resolves them, beneath the root's descriptor, with
//! `RESOLVE_CACHED` added (a lookup that would read the disk fails with
//! `EAGAIN`), and the content is read with `RWF_NOWAIT` (`EAGAIN` for a
//! page not in the page cache): how io_uring decides what it may run
//! inline. Anything else (a step that would wait, any error, a file over
//! [`MAX_CACHED_BYTES`], a kernel before 5.12, the walking resolver) gives
//! `None`, and the inspection runs on the pool as before, from the start.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use rustix::fs::{fstat, FileType, OFlags};
use rustix::io::{preadv2, Errno, ReadWriteFlags};

use super::beneath::{Beneath, Resolver};
use super::filesystem::MODE_MASK;
use super::paths;
use super::PathEntry;

/// Largest file read on the runtime thread: a copy from the page cache of
/// at most this much costs microseconds. Larger files go to the pool.
pub(super) const MAX_CACHED_BYTES: u64 = 64 * 1024;

/// What is at `path` beneath `root`, when the kernel knows without
/// waiting for the disk; `None` when the blocking pool must find out.
pub(super) fn inspect(root: &Path, resolver: Resolver, path: &str) -> Option<PathEntry> {
    let path = paths::parse(path).ok()?;
    let beneath = Beneath::open_cached(root, resolver)?.ok()?;
    let dir = match beneath.dir(&path.parents) {
        Ok(dir) => dir,
        // A negative dentry: the kernel knows the directory is not there.
        Err(err) if err.is_not_found() => return Some(PathEntry::Missing),
        Err(_) => return None,
    };
    inspect_at(&beneath, dir.as_fd(), &path.name).ok()
}

/// The pool's `inspect_at`, step for step, each step from the caches; an
/// error sends the whole inspection to the pool.
fn inspect_at(beneath: &Beneath, dir: BorrowedFd<'_>, name: &str) -> Result<PathEntry, Errno> {
    // The pool's `statat` without following a symlink: the entry itself,
    // as an `O_PATH` descriptor (which opens no device and no FIFO).
    let entry = match beneath.entry_cached(dir, name, OFlags::PATH) {
        Ok(entry) => entry,
        Err(Errno::NOENT) => return Ok(PathEntry::Missing),
        Err(err) => return Err(err),
    };
    let stat = fstat(&entry)?;
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::Directory => return Ok(PathEntry::Directory { mode: stat.st_mode & MODE_MASK }),
        FileType::RegularFile => {}
        _ => return Ok(PathEntry::Other),
    }
    drop(entry);
    let file = match beneath.entry_cached(dir, name, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY) {
        Ok(file) => file,
        Err(Errno::NOENT) => return Ok(PathEntry::Missing),
        // Replaced by a symlink since the look.
        Err(Errno::LOOP) => return Ok(PathEntry::Other),
        Err(err) => return Err(err),
    };
    // What was opened, not what was seen before: it may have been replaced.
    let stat = fstat(&file)?;
    let mode = stat.st_mode & MODE_MASK;
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::Directory => return Ok(PathEntry::Directory { mode }),
        FileType::RegularFile => {}
        _ => return Ok(PathEntry::Other),
    }
    let size = u64::try_from(stat.st_size).map_err(|_| Errno::INVAL)?;
    if size > MAX_CACHED_BYTES {
        return Err(Errno::FBIG);
    }
    let content = match read_from_memory(file.as_fd(), size, ReadWriteFlags::NOWAIT) {
        // tmpfs and ramfs refuse RWF_NOWAIT, and have no disk to wait for:
        // their pages are memory (a swapped-out one stalls the agent as
        // its own swapped memory would).
        Err(Errno::OPNOTSUPP) if in_memory_filesystem(file.as_fd()) => {
            read_from_memory(file.as_fd(), size, ReadWriteFlags::empty())?
        }
        other => other?,
    };
    Ok(PathEntry::File { content, mode })
}

/// The whole content of `file`, `size` bytes by its stat, read with
/// `flags`; `FBIG` when it grew meanwhile.
fn read_from_memory(file: BorrowedFd<'_>, size: u64, flags: ReadWriteFlags) -> Result<Vec<u8>, Errno> {
    // One byte more than the size, to see a file that grew meanwhile.
    let mut content = vec![0; usize::try_from(size).map_err(|_| Errno::FBIG)? + 1];
    let mut len = 0;
    loop {
        if len == content.len() {
            return Err(Errno::FBIG);
        }
        match preadv2(file, &mut [IoSliceMut::new(&mut content[len..])], len as u64, flags) {
            Ok(0) => break,
            Ok(read) => len += read,
            Err(Errno::INTR) => {}
            // AGAIN: a page is not in the page cache.
            Err(err) => return Err(err),
        }
    }
    content.truncate(len);
    Ok(content)
}

/// Whether `file` lives on tmpfs or ramfs.
fn in_memory_filesystem(file: BorrowedFd<'_>) -> bool {
    const TMPFS_MAGIC: u32 = 0x0102_1994;
    const RAMFS_MAGIC: u32 = 0x8584_58f6;
    // `f_type` is a signed word of the platform's size; the magic numbers
    // are its low 32 bits.
    rustix::fs::fstatfs(file).is_ok_and(|fs| matches!(fs.f_type as u32, TMPFS_MAGIC | RAMFS_MAGIC))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;
    use crate::local::beneath::kernel_has_resolve_cached;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & MODE_MASK
    }
    use crate::{Filesystem, LocalDeviceTopology};

    /// A root with one of each kind of entry, and the paths that name them.
    fn root_with_entries() -> (tempfile::TempDir, Vec<&'static str>) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc/app")).unwrap();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::write(root.join("etc/app/conf"), "a = 1\n").unwrap();
        std::fs::set_permissions(root.join("etc/app/conf"), std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::write(root.join("etc/empty"), "").unwrap();
        std::fs::write(root.join("etc/large"), vec![b'x'; MAX_CACHED_BYTES as usize + 1]).unwrap();
        std::fs::write(root.join("usr/lib/x.conf"), "x\n").unwrap();
        symlink("usr/lib", root.join("lib")).unwrap();
        symlink("conf", root.join("etc/app/link")).unwrap();
        symlink("/usr/lib", root.join("abs")).unwrap();
        symlink("../../..", root.join("etc/up")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("etc/fifo").as_path(),
            FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let paths = vec![
            "/etc/app/conf",
            "/etc/empty",
            "/etc/large",
            "/etc/app",
            "/etc/app/link",
            "/etc/fifo",
            "/lib/x.conf",
            "/etc/missing",
            "/missing/dir/file",
            "/etc/app/conf/below-a-file",
            "/abs/x.conf",
            "/etc/up/outside",
            "relative",
            "/etc/../x",
        ];
        (dir, paths)
    }

    // What the runtime thread finds from the caches is what the pool finds;
    // errors, escapes and anything it cannot know are left to the pool.
    #[tokio::test]
    async fn the_caches_answer_as_the_pool_does_or_not_at_all() {
        let (dir, paths) = root_with_entries();
        let topology = LocalDeviceTopology::new(dir.path());
        for path in &paths {
            // Twice: the pool's lookups fill the caches for the second.
            for round in 0..2 {
                let pool = topology.inspect_on_pool(path).await;
                let fast = inspect(dir.path(), Resolver::Auto, path);
                if let Some(fast) = &fast {
                    assert!(
                        matches!(&pool, Ok(entry) if entry == fast),
                        "{path}: {fast:?} from the caches, {pool:?} from the pool"
                    );
                }
                let public = topology.inspect(path).await;
                assert_eq!(format!("{public:?}"), format!("{pool:?}"), "{path}, round {round}");
            }
        }
        if !kernel_has_resolve_cached() {
            return;
        }
        let cached = |path| inspect(dir.path(), Resolver::Auto, path);
        assert_eq!(
            cached("/etc/app/conf"),
            Some(PathEntry::File { content: b"a = 1\n".to_vec(), mode: 0o640 })
        );
        let mode = mode_of(&dir.path().join("usr/lib/x.conf"));
        assert_eq!(cached("/lib/x.conf"), Some(PathEntry::File { content: b"x\n".to_vec(), mode }));
        assert_eq!(cached("/etc/app/link"), Some(PathEntry::Other));
        assert_eq!(cached("/etc/fifo"), Some(PathEntry::Other));
        assert!(matches!(cached("/etc/app"), Some(PathEntry::Directory { .. })));
        assert_eq!(
            cached("/etc/missing"),
            Some(PathEntry::Missing),
            "a negative dentry after the pool's look"
        );
        for to_the_pool in
            ["/etc/large", "/abs/x.conf", "/etc/up/outside", "/etc/app/conf/below-a-file", "relative"]
        {
            assert_eq!(cached(to_the_pool), None, "{to_the_pool}");
        }
        assert_eq!(inspect(dir.path(), Resolver::Walk, "/etc/app/conf"), None, "the walking resolver");
    }

    // The runtime thread never waits for the disk: a file whose pages
    // were dropped from the page cache goes to the pool.
    #[tokio::test]
    async fn a_file_not_in_the_page_cache_is_left_to_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cold");
        std::fs::write(&file, vec![b'c'; 8192]).unwrap();
        let handle = std::fs::File::open(&file).unwrap();
        handle.sync_all().unwrap();
        rustix::fs::fadvise(&handle, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        // tmpfs keeps its pages whatever the advice.
        if !kernel_has_resolve_cached() || in_memory_filesystem(handle.as_fd()) {
            return;
        }
        assert_eq!(inspect(dir.path(), Resolver::Auto, "/cold"), None);
        let topology = LocalDeviceTopology::new(dir.path());
        assert_eq!(
            topology.inspect("/cold").await.unwrap(),
            PathEntry::File { content: vec![b'c'; 8192], mode: mode_of(&file) }
        );
    }
}
