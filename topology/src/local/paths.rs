//! Confining Score paths to the topology's root.

use super::FilesystemError;

/// A Score's absolute path, split into names relative to the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ScorePath {
    /// The directories above the last component, outermost first; none of
    /// them empty, `.` or `..`.
    pub(super) parents: Vec<String>,
    /// The last component: the file or directory an operation acts on.
    pub(super) name: String,
}

/// Splits the absolute `path` into names beneath the root. Refuses a
/// relative path, a `..` anywhere, the root itself and a NUL byte; empty
/// and `.` components are dropped. Symlinks are the filesystem's business:
/// see [`super::beneath`].
pub(super) fn parse(path: &str) -> Result<ScorePath, FilesystemError> {
    if path.is_empty() || path.contains('\0') {
        return Err(FilesystemError::InvalidPath { path: path.to_owned() });
    }
    if !path.starts_with('/') {
        return Err(FilesystemError::PathNotAbsolute { path: path.to_owned() });
    }
    let mut parents: Vec<String> = Vec::new();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(FilesystemError::PathEscapesRoot { path: path.to_owned() });
        }
        parents.push(part.to_owned());
    }
    // The root itself is never a Score's to write or remove.
    let name = parents.pop().ok_or_else(|| FilesystemError::InvalidPath { path: path.to_owned() })?;
    Ok(ScorePath { parents, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_absolute_paths_into_names_beneath_the_root() {
        let got = parse("/etc/motd").unwrap();
        assert_eq!(got, ScorePath { parents: vec!["etc".to_owned()], name: "motd".to_owned() });
        assert_eq!(parse("//etc/./app//x/").unwrap().parents, ["etc", "app"]);
        assert_eq!(parse("/x").unwrap(), ScorePath { parents: vec![], name: "x".to_owned() });
    }

    #[test]
    fn refuses_relative_parent_and_empty_paths() {
        assert!(matches!(parse("etc/motd"), Err(FilesystemError::PathNotAbsolute { .. })));
        assert!(matches!(parse("/etc/../../x"), Err(FilesystemError::PathEscapesRoot { .. })));
        assert!(matches!(parse("/a/.."), Err(FilesystemError::PathEscapesRoot { .. })));
        assert!(matches!(parse(""), Err(FilesystemError::InvalidPath { .. })));
        assert!(matches!(parse("/"), Err(FilesystemError::InvalidPath { .. })));
        assert!(matches!(parse("/./"), Err(FilesystemError::InvalidPath { .. })));
        assert!(matches!(parse("/a\0b"), Err(FilesystemError::InvalidPath { .. })));
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
