//! Opening directories beneath the root's descriptor, so that no `..`,
//! symlink or concurrent rename leads a Score's path out of the root.
//!
//! Every directory is reached from a descriptor of the root and handed on
//! as a descriptor: no path is checked first and used later. With
//! `openat2(RESOLVE_BENEATH)` (Linux 5.6 and newer) the kernel resolves the
//! whole path and refuses to leave the root. Without it, [`walk`] opens
//! one component at a time with `O_NOFOLLOW` and resolves symlinks itself
//! under the same rules.
//!
//! An absolute symlink names a path from the host's `/`. Beneath any other
//! root it is refused (`RESOLVE_BENEATH` cannot tell where it leads); when
//! the root *is* the host's `/`, nothing can lead out, and absolute links
//! (Debian's `/var/run -> /run`) are followed from the root
//! (`RESOLVE_IN_ROOT`).

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use rustix::fs::{mkdirat, openat, openat2, readlinkat, Mode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;

/// How directories beneath the root are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Resolver {
    /// `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` where the kernel
    /// has it, else [`Resolver::Walk`].
    #[default]
    Auto,
    /// One component at a time, each opened `O_NOFOLLOW` beneath the last
    /// (what a kernel without `openat2` gets; tests force it).
    #[cfg_attr(not(test), allow(dead_code, reason = "chosen at run time only by kernels without openat2"))]
    Walk,
}

/// Why a directory beneath the root could not be opened.
#[derive(Debug)]
pub(super) enum BeneathError {
    /// The path leaves the root: `..` above it, an absolute symlink, or a
    /// relative one climbing out.
    Escapes,
    /// The operating system refused.
    Io(io::Error),
}

impl From<io::Error> for BeneathError {
    fn from(err: io::Error) -> Self {
        Self::Io(err)
    }
}

impl From<Errno> for BeneathError {
    fn from(err: Errno) -> Self {
        Self::Io(err.into())
    }
}

impl BeneathError {
    pub(super) fn is_not_found(&self) -> bool {
        matches!(self, Self::Io(err) if err.kind() == io::ErrorKind::NotFound)
    }
}

/// Symlinks one resolution follows at most, as the kernel's `MAXSYMLINKS`.
const MAX_SYMLINKS: u32 = 40;
/// Directories one walk holds open at most (a descriptor each).
const MAX_DEPTH: usize = 256;
/// `openat2` asks to retry when a rename raced a `..`; after this many, give up.
const MAX_RETRIES: u32 = 16;

/// What an absolute symlink, or `..` at the root, means beneath a root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Absolute {
    /// It leaves the root: refused.
    Refused,
    /// The root is the host's `/`: resolved from the root, `..` stays there.
    FromRoot,
}

/// A root directory, held open for one operation.
#[derive(Debug)]
pub(super) struct Beneath {
    root: OwnedFd,
    resolver: Resolver,
    absolute: Absolute,
    /// Every lookup from the kernel's caches alone (`RESOLVE_CACHED`): one
    /// that would wait for the disk fails with `EAGAIN` instead.
    cached: bool,
}

impl Beneath {
    /// Opens `root` itself (the device owner's configuration names it, so
    /// symlinks on the way to it are followed).
    pub(super) fn open(root: &Path, resolver: Resolver) -> io::Result<Self> {
        let root = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        Self::opened(root, resolver, false)
    }

    /// As [`Beneath::open`], with the root and every lookup beneath it
    /// answered from the kernel's caches alone, so that nothing waits for
    /// the disk (a lookup that would fails with `EAGAIN`). `None` where
    /// lookups cannot be made so: a kernel before 5.12, or the walking
    /// resolver.
    pub(super) fn open_cached(root: &Path, resolver: Resolver) -> Option<io::Result<Self>> {
        if resolver != Resolver::Auto || !kernel_has_resolve_cached() {
            return None;
        }
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        Some(
            openat2(CWD, root, flags, Mode::empty(), ResolveFlags::CACHED)
                .map_err(io::Error::from)
                .and_then(|root| Self::opened(root, resolver, true)),
        )
    }

    fn opened(root: OwnedFd, resolver: Resolver, cached: bool) -> io::Result<Self> {
        let (this, host) = (rustix::fs::fstat(&root)?, rustix::fs::stat("/")?);
        let is_host_root = (this.st_dev, this.st_ino) == (host.st_dev, host.st_ino);
        let absolute = if is_host_root { Absolute::FromRoot } else { Absolute::Refused };
        Ok(Self { root, resolver, absolute, cached })
    }

    /// The entry `name` (one component, neither `.` nor `..`) of `dir`, a
    /// directory opened beneath the root, opened with `flags` and never
    /// followed if it is a symlink, from the kernel's caches alone.
    pub(super) fn entry_cached(
        &self,
        dir: BorrowedFd<'_>,
        name: &str,
        flags: OFlags,
    ) -> Result<OwnedFd, Errno> {
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        openat2(dir, name, flags, Mode::empty(), resolve_flags(self.absolute) | ResolveFlags::CACHED)
    }

    /// As if the root were the host's `/` (tests cannot write there).
    #[cfg(test)]
    pub(super) fn treated_as_host_root(self) -> Self {
        Self { absolute: Absolute::FromRoot, ..self }
    }

    /// The directory `parts` (names relative to the root, none of them
    /// empty, `.` or `..`), opened for reading.
    pub(super) fn dir(&self, parts: &[String]) -> Result<OwnedFd, BeneathError> {
        if self.resolver == Resolver::Auto && kernel_has_openat2() {
            return open_beneath(self.root.as_fd(), parts, self.absolute, self.cached);
        }
        let walk = walk(self.root.as_fd(), parts, self.absolute)?;
        if !walk.missing.is_empty() {
            return Err(io::Error::from(io::ErrorKind::NotFound).into());
        }
        let reached = walk.reached.last().map_or(self.root.as_fd(), |(_, fd)| fd.as_fd());
        Ok(openat(reached, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
    }

    /// As [`Beneath::dir`], creating missing directories with `mode` (and
    /// the umask) one component at a time: each is made with `mkdirat` in
    /// the descriptor of its parent (then fsynced, so the new directory
    /// outlives a power cut), then resolved again from the root, so a
    /// symlink swapped in meanwhile is judged like any other.
    pub(super) fn dir_creating(&self, parts: &[String], mode: u32) -> Result<OwnedFd, BeneathError> {
        match self.dir(parts) {
            Err(err) if err.is_not_found() => {}
            other => return other,
        }
        let mut parent = self.dir(&[])?;
        for depth in 1..=parts.len() {
            parent = match self.dir(&parts[..depth]) {
                Ok(fd) => fd,
                Err(err) if err.is_not_found() => {
                    match mkdirat(&parent, parts[depth - 1].as_str(), Mode::from_raw_mode(mode)) {
                        // The new entry must survive a power cut before
                        // anything is written beneath it: an fsync of the
                        // new directory's content does not make its own
                        // name in the parent durable.
                        Ok(()) => rustix::fs::fsync(&parent)?,
                        Err(Errno::EXIST) => {}
                        Err(err) => return Err(err.into()),
                    }
                    self.dir(&parts[..depth])?
                }
                Err(err) => return Err(err),
            };
        }
        Ok(parent)
    }

    /// The names of the directories `parts` resolve to beneath the root,
    /// outermost first, with the part that does not exist yet appended as
    /// written (its `..`, from a symlink, applied to the names).
    pub(super) fn resolved_names(&self, parts: &[String]) -> Result<Vec<OsString>, BeneathError> {
        let walk = walk(self.root.as_fd(), parts, self.absolute)?;
        let mut names: Vec<OsString> = walk.reached.into_iter().map(|(name, _)| name).collect();
        for part in walk.missing {
            match part.as_bytes() {
                b"" | b"." => {}
                b".." => {
                    if names.pop().is_none() && self.absolute == Absolute::Refused {
                        return Err(BeneathError::Escapes);
                    }
                }
                _ => names.push(part),
            }
        }
        Ok(names)
    }
}

/// `probe`'s answer, asked once per process and kept in `cache`.
fn asked_once(cache: &AtomicU8, probe: impl FnOnce() -> bool) -> bool {
    // 0: not asked yet.
    const YES: u8 = 1;
    const NO: u8 = 2;
    match cache.load(Ordering::Relaxed) {
        YES => true,
        NO => false,
        _ => {
            let has = probe();
            cache.store(if has { YES } else { NO }, Ordering::Relaxed);
            has
        }
    }
}

/// Whether this kernel has `openat2`; asked once per process.
fn kernel_has_openat2() -> bool {
    static HAS: AtomicU8 = AtomicU8::new(0);
    asked_once(&HAS, || {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        // ENOSYS before 5.6; EPERM where a seccomp filter (an older
        // container runtime's) refuses system calls it does not know.
        !matches!(
            openat2(CWD, ".", flags, Mode::empty(), ResolveFlags::BENEATH),
            Err(Errno::NOSYS | Errno::PERM)
        )
    })
}

/// Whether this kernel resolves from its caches alone (`RESOLVE_CACHED`,
/// Linux 5.12); asked once per process.
pub(super) fn kernel_has_resolve_cached() -> bool {
    static HAS: AtomicU8 = AtomicU8::new(0);
    asked_once(&HAS, || {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        // EINVAL: a kernel with openat2 but not this flag; "/" is
        // always cached, so EAGAIN does not happen on one that has it.
        kernel_has_openat2()
            && !matches!(
                openat2(CWD, "/", flags, Mode::empty(), ResolveFlags::CACHED),
                Err(Errno::INVAL | Errno::NOSYS | Errno::PERM)
            )
    })
}

/// How `openat2` keeps a resolution beneath the root.
fn resolve_flags(absolute: Absolute) -> ResolveFlags {
    let scope = match absolute {
        Absolute::Refused => ResolveFlags::BENEATH,
        Absolute::FromRoot => ResolveFlags::IN_ROOT,
    };
    scope | ResolveFlags::NO_MAGICLINKS
}

fn open_beneath(
    root: BorrowedFd<'_>,
    parts: &[String],
    absolute: Absolute,
    cached: bool,
) -> Result<OwnedFd, BeneathError> {
    let relative = if parts.is_empty() { ".".to_owned() } else { parts.join("/") };
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let resolve =
        if cached { resolve_flags(absolute) | ResolveFlags::CACHED } else { resolve_flags(absolute) };
    for _ in 0..MAX_RETRIES {
        match openat2(root, relative.as_str(), flags, Mode::empty(), resolve) {
            Ok(fd) => return Ok(fd),
            Err(Errno::XDEV) => return Err(BeneathError::Escapes),
            // From the caches alone, EAGAIN says the disk is needed.
            Err(Errno::AGAIN) if cached => return Err(Errno::AGAIN.into()),
            // A rename or mount raced the resolution of a `..` (openat2(2)).
            Err(Errno::AGAIN) => continue,
            Err(err) => return Err(err.into()),
        }
    }
    Err(Errno::AGAIN.into())
}

/// How far a [`walk`] got.
#[derive(Debug)]
pub(super) struct Walk {
    /// The directories reached below the root, outermost first: the name
    /// each has in its parent and a descriptor (`O_PATH`) of it.
    pub(super) reached: Vec<(OsString, OwnedFd)>,
    /// What is left when a component does not exist, that component first;
    /// empty when the walk reached the end.
    pub(super) missing: VecDeque<OsString>,
}

/// Resolves `parts` beneath `root` the way `openat2` does, one component at
/// a time: each directory opened `O_NOFOLLOW` from the descriptor of the
/// one before; a symlink read (`readlinkat`) and its target resolved in its
/// place (an absolute one as `absolute` says); `..` steps back to the
/// descriptor held for the parent, never above the root. A component
/// swapped for a symlink between two calls is therefore read as a symlink,
/// and judged as one.
pub(super) fn walk(root: BorrowedFd<'_>, parts: &[String], absolute: Absolute) -> Result<Walk, BeneathError> {
    let mut pending: VecDeque<OsString> = parts.iter().map(OsString::from).collect();
    let mut reached: Vec<(OsString, OwnedFd)> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        match part.as_bytes() {
            b"" | b"." => continue,
            b".." => {
                if reached.pop().is_none() && absolute == Absolute::Refused {
                    return Err(BeneathError::Escapes);
                }
                continue;
            }
            _ => {}
        }
        if reached.len() >= MAX_DEPTH {
            return Err(Errno::NAMETOOLONG.into());
        }
        let dir = reached.last().map_or(root, |(_, fd)| fd.as_fd());
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match openat(dir, part.as_os_str(), flags, Mode::empty()) {
            Ok(fd) => reached.push((part, fd)),
            Err(Errno::NOENT) => {
                pending.push_front(part);
                return Ok(Walk { reached, missing: pending });
            }
            // A symlink, or no directory at all.
            Err(refused @ (Errno::NOTDIR | Errno::LOOP)) => {
                let target = match readlinkat(dir, part.as_os_str(), Vec::new()) {
                    Ok(target) => target,
                    Err(Errno::INVAL) => return Err(refused.into()),
                    Err(err) => return Err(err.into()),
                };
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Errno::LOOP.into());
                }
                let target = target.as_bytes();
                if target.is_empty() {
                    return Err(Errno::NOENT.into());
                }
                if target.starts_with(b"/") {
                    match absolute {
                        Absolute::Refused => return Err(BeneathError::Escapes),
                        Absolute::FromRoot => reached.clear(),
                    }
                }
                for name in target.split(|b| *b == b'/').rev() {
                    pending.push_front(OsStr::from_bytes(name).to_owned());
                }
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(Walk { reached, missing: VecDeque::new() })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn parts(path: &str) -> Vec<String> {
        path.split('/').filter(|p| !p.is_empty()).map(str::to_owned).collect()
    }

    fn names(beneath: &Beneath, path: &str) -> Result<String, BeneathError> {
        let names = beneath.resolved_names(&parts(path))?;
        Ok(names.iter().map(|n| n.to_str().unwrap()).collect::<Vec<_>>().join("/"))
    }

    #[test]
    fn both_resolvers_follow_links_beneath_the_root_and_refuse_those_leaving_it() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/lib/sub")).unwrap();
        std::fs::write(root.join("usr/file"), "").unwrap();
        symlink("usr/lib", root.join("lib")).unwrap();
        symlink("../lib/sub", root.join("usr/up")).unwrap();
        symlink(root.join("usr"), root.join("abs")).unwrap();
        symlink(outside.path(), root.join("out")).unwrap();
        let outside_name = outside.path().file_name().unwrap().to_str().unwrap();
        symlink(format!("../{outside_name}"), root.join("rel-out")).unwrap();
        symlink("..", root.join("usr/lib/sub/dotdot")).unwrap();
        symlink("../../..", root.join("usr/lib/up3")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        symlink("/usr/lib", root.join("abs-lib")).unwrap();

        for resolver in [Resolver::Auto, Resolver::Walk] {
            let beneath = Beneath::open(root, resolver).unwrap();
            for inside in ["usr", "lib", "lib/sub", "usr/up", "usr/lib/sub/dotdot/sub", ""] {
                assert!(beneath.dir(&parts(inside)).is_ok(), "{resolver:?} {inside}");
            }
            // An absolute link leaves this root even when its target is
            // inside it: the kernel resolves it from the host's `/`.
            for escaping in ["abs", "abs-lib", "out", "rel-out", "out/x", "lib/up3", "lib/sub/dotdot/up3/x"] {
                assert!(
                    matches!(beneath.dir(&parts(escaping)), Err(BeneathError::Escapes)),
                    "{resolver:?} {escaping}"
                );
            }
            assert!(beneath.dir(&parts("missing/x")).unwrap_err().is_not_found());
            assert!(matches!(beneath.dir(&parts("usr/file")), Err(BeneathError::Io(_))));
            assert!(matches!(beneath.dir(&parts("loop")), Err(BeneathError::Io(_))));
        }
        let walking = Beneath::open(root, Resolver::Walk).unwrap();
        assert_eq!(names(&walking, "lib/sub").unwrap(), "usr/lib/sub");
        assert_eq!(names(&walking, "usr/up/new/deeper").unwrap(), "usr/lib/sub/new/deeper");
        assert_eq!(names(&walking, "usr/lib/sub/dotdot").unwrap(), "usr/lib");
        assert!(matches!(names(&walking, "abs/x"), Err(BeneathError::Escapes)));
    }

    // Where the root is the host's `/`, an absolute link cannot lead out
    // (Debian's `/var/run -> /run`): both resolvers follow it from the root.
    #[test]
    fn beneath_the_host_root_absolute_links_resolve_from_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/lib/sub")).unwrap();
        symlink("/usr/lib", root.join("abs-lib")).unwrap();
        symlink("../../..", root.join("usr/lib/up3")).unwrap();
        for resolver in [Resolver::Auto, Resolver::Walk] {
            let beneath = Beneath::open(root, resolver).unwrap().treated_as_host_root();
            for path in ["abs-lib/sub", "usr/lib/up3/usr/lib/sub", "abs-lib/up3/abs-lib"] {
                assert!(beneath.dir(&parts(path)).is_ok(), "{resolver:?} {path}");
            }
            assert_eq!(names(&beneath, "abs-lib/sub/new").unwrap(), "usr/lib/sub/new");
            assert_eq!(names(&beneath, "usr/lib/up3/usr").unwrap(), "usr");
        }
        assert!(Beneath::open(Path::new("/"), Resolver::Auto).unwrap().absolute == Absolute::FromRoot);
        assert!(Beneath::open(root, Resolver::Auto).unwrap().absolute == Absolute::Refused);
    }

    #[test]
    fn missing_directories_are_created_one_at_a_time_through_links_beneath_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        symlink("usr/lib", root.join("lib")).unwrap();
        symlink("usr/none", root.join("dangling")).unwrap();
        for (n, resolver) in [Resolver::Auto, Resolver::Walk].into_iter().enumerate() {
            let beneath = Beneath::open(root, resolver).unwrap();
            beneath.dir_creating(&parts(&format!("lib/new{n}/deeper")), 0o755).unwrap();
            assert!(root.join(format!("usr/lib/new{n}/deeper")).is_dir());
            // A dangling link is not made to point somewhere by creating its target.
            assert!(beneath.dir_creating(&parts("dangling/x"), 0o755).is_err());
            assert!(!root.join("usr/none").exists());
        }
    }
}
