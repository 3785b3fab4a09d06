//! Confining Score paths to the topology's root.

use std::io;
use std::path::{Component, Path, PathBuf};

use super::FilesystemError;

/// Joins the absolute `path` onto `root` and checks that neither a `..`
/// component nor a symlink on the way leads outside `root`.
///
/// Checked at the time of the call: a symlink created between this check and
/// the use of the path is not seen. The agent is the only writer of the paths
/// it owns, so this guards against documents, not against local root users.
pub(super) fn resolve_under(root: &Path, path: &str) -> Result<PathBuf, FilesystemError> {
    if path.is_empty() || path.contains('\0') {
        return Err(FilesystemError::InvalidPath { path: path.to_owned() });
    }
    let requested = Path::new(path);
    if !requested.is_absolute() {
        return Err(FilesystemError::PathNotAbsolute { path: path.to_owned() });
    }
    let mut resolved = root.to_path_buf();
    for component in requested.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => resolved.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(FilesystemError::PathEscapesRoot { path: path.to_owned() })
            }
        }
    }
    if resolved == root {
        // The root itself is never a Score's to write or remove.
        return Err(FilesystemError::InvalidPath { path: path.to_owned() });
    }
    check_symlinks(root, &resolved, path)?;
    Ok(resolved)
}

/// Walks from `root` to `resolved`; every existing symlink on the way must
/// resolve to somewhere inside the canonical root.
fn check_symlinks(root: &Path, resolved: &Path, path: &str) -> Result<(), FilesystemError> {
    let io_err = |source: io::Error| FilesystemError::Io { op: "resolve", path: path.to_owned(), source };
    let canonical_root = std::fs::canonicalize(root).map_err(io_err)?;
    let relative = resolved
        .strip_prefix(root)
        .map_err(|_| FilesystemError::PathEscapesRoot { path: path.to_owned() })?;
    let mut current = root.to_path_buf();
    for part in relative.components() {
        current.push(part);
        let meta = match std::fs::symlink_metadata(&current) {
            Ok(meta) => meta,
            // Nothing exists from here on, so no symlink can lead out.
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(io_err(err)),
        };
        if meta.file_type().is_symlink() {
            match std::fs::canonicalize(&current) {
                Ok(target) if target.starts_with(&canonical_root) => {}
                // A dangling link could later be made to point anywhere: refuse it too.
                _ => return Err(FilesystemError::PathEscapesRoot { path: path.to_owned() }),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_absolute_paths_under_root() {
        let dir = tempfile::tempdir().unwrap();
        let got = resolve_under(dir.path(), "/etc/motd").unwrap();
        assert_eq!(got, dir.path().join("etc/motd"));
    }

    #[test]
    fn refuses_relative_parent_and_empty_paths() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            resolve_under(dir.path(), "etc/motd"),
            Err(FilesystemError::PathNotAbsolute { .. })
        ));
        assert!(matches!(
            resolve_under(dir.path(), "/etc/../../x"),
            Err(FilesystemError::PathEscapesRoot { .. })
        ));
        assert!(matches!(resolve_under(dir.path(), "/a/.."), Err(FilesystemError::PathEscapesRoot { .. })));
        assert!(matches!(resolve_under(dir.path(), ""), Err(FilesystemError::InvalidPath { .. })));
        assert!(matches!(resolve_under(dir.path(), "/"), Err(FilesystemError::InvalidPath { .. })));
        assert!(matches!(resolve_under(dir.path(), "/a\0b"), Err(FilesystemError::InvalidPath { .. })));
    }

    #[test]
    fn refuses_symlinks_that_leave_the_root_and_allows_those_inside() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("in")).unwrap();
        std::os::unix::fs::symlink("/nonexistent-harmony-target", dir.path().join("dangling")).unwrap();

        assert!(matches!(resolve_under(dir.path(), "/out/x"), Err(FilesystemError::PathEscapesRoot { .. })));
        assert!(matches!(resolve_under(dir.path(), "/out"), Err(FilesystemError::PathEscapesRoot { .. })));
        assert!(matches!(
            resolve_under(dir.path(), "/dangling"),
            Err(FilesystemError::PathEscapesRoot { .. })
        ));
        assert_eq!(resolve_under(dir.path(), "/in/x").unwrap(), dir.path().join("in/x"));
    }
}

#[cfg(test)]
mod device_path_tests {
    use crate::LocalDeviceTopology;

    #[test]
    fn parents_resolve_through_symlinks_beneath_the_root_and_the_last_component_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", dir.path().join("lib")).unwrap();
        std::os::unix::fs::symlink("/usr/lib", dir.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("x.conf", dir.path().join("usr/lib/link.conf")).unwrap();
        let topo = LocalDeviceTopology::new(dir.path());
        assert_eq!(topo.device_path("/lib/x.conf").as_deref(), Some("/usr/lib/x.conf"));
        assert_eq!(topo.device_path("/usr/lib/x.conf").as_deref(), Some("/usr/lib/x.conf"));
        assert_eq!(topo.device_path("/lib/new/dir/f").as_deref(), Some("/usr/lib/new/dir/f"));
        assert_eq!(topo.device_path("/usr/lib/link.conf").as_deref(), Some("/usr/lib/link.conf"));
        assert_eq!(topo.device_path("/etc/x").as_deref(), Some("/etc/x"));
        // An absolute link points outside this root (the host's /usr/lib).
        assert_eq!(topo.device_path("/abs/x"), None);
        assert_eq!(topo.device_path("relative"), None);
        assert_eq!(topo.device_path("/"), None);
    }
}
