//! `ResourceId`: what a Score owns on a device, typed and normalized so aliases collide.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest path a Score may name (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest path component (Linux `NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;

/// Why a path is not one a Score may name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// Not starting with `/`.
    #[error("path is not absolute")]
    NotAbsolute,
    /// Holds NUL, a newline or another control character.
    #[error("path holds a control character")]
    ControlCharacter,
    /// Holds a `..` component.
    #[error("path holds a '..' component")]
    ParentComponent,
    /// Names the root directory itself.
    #[error("path names the root directory")]
    Root,
    /// Longer than [`MAX_PATH_BYTES`], or a component longer than [`MAX_NAME_BYTES`].
    #[error("path or one of its components is too long")]
    TooLong,
}

/// Normalizes an absolute path: `//` and `/./` collapse, a trailing `/` goes.
/// `..`, control characters, the root itself and over-long paths are refused.
pub fn normalize_path(path: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(path.len());
    normal_components(path, |part| {
        out.push('/');
        out.push_str(part);
    })?;
    Ok(out)
}

/// Whether [`normalize_path`] accepts `path`, without building its result
/// (validation runs on every Score of every document decoded).
pub(crate) fn check_normalizable(path: &str) -> Result<(), PathError> {
    normal_components(path, |_| {})
}

/// Checks `path` and hands each component of its normal form to `each`.
fn normal_components<'p>(path: &'p str, mut each: impl FnMut(&'p str)) -> Result<(), PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if crate::validate::has_control(path) {
        return Err(PathError::ControlCharacter);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    let mut empty = true;
    for part in path.split('/') {
        // Byte patterns: a `str` match calls `memcmp` per component.
        match part.as_bytes() {
            [] | [b'.'] => {}
            [b'.', b'.'] => return Err(PathError::ParentComponent),
            _ if part.len() > MAX_NAME_BYTES => return Err(PathError::TooLong),
            _ => {
                empty = false;
                each(part);
            }
        }
    }
    if empty {
        return Err(PathError::Root);
    }
    Ok(())
}

/// The one thing a Score owns on a device, as `kind:name`.
///
/// Files and directories share the kind `path`, with the path normalized,
/// so `/etc//x/`, `/./etc/x` and `/etc/x` are one resource and a file and a
/// directory at one path collide. Other kinds (`container`, `unit`,
/// `package`, …) name things in their own namespaces.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ResourceId {
    /// Borrowed for the kinds Scores name in code (no allocation per
    /// Score when a document's resources are checked).
    kind: Cow<'static, str>,
    name: String,
}

/// Why a `kind:name` text is not a resource id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid resource id: {0}")]
pub struct ResourceIdError(&'static str);

impl ResourceId {
    /// The kind of every file and directory.
    pub const PATH: &'static str = "path";

    /// A file or directory at `path`, normalized. A path that cannot be
    /// normalized keeps its text (with control characters escaped): Scores
    /// are validated before their resources are used, so this only happens
    /// for a Score that never runs.
    pub fn path(path: &str) -> Self {
        let name = normalize_path(path).unwrap_or_else(|_| path.escape_default().to_string());
        Self { kind: Cow::Borrowed(Self::PATH), name }
    }

    /// A resource of another kind (`container`, `unit`, `package`): `kind`
    /// is lowercase ASCII letters, digits, `-` and `.`; `name` has no control
    /// characters and is escaped if it does.
    pub fn named(kind: &str, name: &str) -> Result<Self, ResourceIdError> {
        let kind_ok = !kind.is_empty()
            && kind.len() <= 32
            && kind.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !kind_ok {
            return Err(ResourceIdError("kind must be 1-32 of a-z, 0-9, '-', '.'"));
        }
        if kind == Self::PATH {
            return Ok(Self::path(name));
        }
        if name.is_empty() || crate::validate::has_control(name) || name.len() > MAX_PATH_BYTES {
            return Err(ResourceIdError("name must be 1-4096 bytes without control characters"));
        }
        Ok(Self { kind: Cow::Owned(kind.to_owned()), name: name.to_owned() })
    }

    /// The kind (`path`, `container`, …).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The name within the kind (a normalized path for `path`).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.name)
    }
}

impl From<ResourceId> for String {
    fn from(id: ResourceId) -> Self {
        id.to_string()
    }
}

impl TryFrom<String> for ResourceId {
    type Error = ResourceIdError;
    fn try_from(text: String) -> Result<Self, ResourceIdError> {
        let (kind, name) = text.split_once(':').ok_or(ResourceIdError("no ':' between kind and name"))?;
        Self::named(kind, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_of_one_path_are_one_resource() {
        let plain = ResourceId::path("/etc/x");
        for alias in ["/etc//x/", "/./etc/x", "//etc/./x//", "/etc/x/."] {
            assert_eq!(ResourceId::path(alias), plain, "{alias}");
        }
        assert_eq!(plain.to_string(), "path:/etc/x");
        assert_ne!(ResourceId::path("/etc/y"), plain);
    }

    #[test]
    fn bad_paths_are_refused_by_name() {
        assert_eq!(normalize_path("etc/x"), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path("/etc/../x"), Err(PathError::ParentComponent));
        assert_eq!(normalize_path("/a\nb"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("/a\0b"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("/a\u{1b}[31m"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("//./"), Err(PathError::Root));
        assert_eq!(normalize_path(&format!("/{}", "x".repeat(256))), Err(PathError::TooLong));
        assert_eq!(normalize_path(&"/x".repeat(2049)), Err(PathError::TooLong));
        assert_eq!(normalize_path("/a/.../b").as_deref(), Ok("/a/.../b"));
    }

    #[test]
    fn ids_round_trip_through_text_and_kinds_are_checked() {
        let id = ResourceId::named("container", "web").unwrap();
        let text: String = id.clone().into();
        assert_eq!(ResourceId::try_from(text).unwrap(), id);
        assert_eq!(ResourceId::try_from("path:/a//b".to_owned()).unwrap(), ResourceId::path("/a/b"));
        assert!(ResourceId::named("Container", "x").is_err());
        assert!(ResourceId::named("unit", "a\nb").is_err());
        assert!(ResourceId::try_from("nocolon".to_owned()).is_err());
    }
}
