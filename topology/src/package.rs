//! The `PackageManager` capability: which packages are installed, installing and removing them.

use async_trait::async_trait;

use crate::{InterpretError, InterpretErrorKind};

/// Longest package name accepted.
pub const MAX_PACKAGE_NAME_BYTES: usize = 128;
/// Longest package version accepted.
pub const MAX_PACKAGE_VERSION_BYTES: usize = 128;

/// Checks that `name` is a package name as Debian's policy has it: at
/// least two characters of `a-z`, `0-9`, `+`, `-` and `.`, starting with a
/// letter or digit; at most [`MAX_PACKAGE_NAME_BYTES`]. No architecture
/// qualifier (`:arm64`). The error is one line saying why.
pub fn check_package_name(name: &str) -> Result<(), String> {
    if name.len() < 2 || name.len() > MAX_PACKAGE_NAME_BYTES {
        return Err(format!("a package name has 2 to {MAX_PACKAGE_NAME_BYTES} characters"));
    }
    if let Some(bad) =
        name.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(*c)))
    {
        return Err(format!("{bad:?} is not allowed in a package name (a-z, 0-9, +, - and . are)"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("a package name starts with a letter or a digit".to_owned());
    }
    Ok(())
}

/// Checks that `version` looks like a Debian version
/// (`[epoch:]upstream[-revision]`): ASCII letters, digits and `.+~:-`,
/// starting with a digit; at most [`MAX_PACKAGE_VERSION_BYTES`]. The
/// package manager judges the rest.
pub fn check_package_version(version: &str) -> Result<(), String> {
    if version.is_empty() || version.len() > MAX_PACKAGE_VERSION_BYTES {
        return Err(format!("a version has 1 to {MAX_PACKAGE_VERSION_BYTES} characters"));
    }
    if let Some(bad) = version.chars().find(|c| !(c.is_ascii_alphanumeric() || ".+~:-".contains(*c))) {
        return Err(format!("{bad:?} is not allowed in a version (letters, digits and .+~:- are)"));
    }
    if !version.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("a version starts with a digit".to_owned());
    }
    Ok(())
}

/// A package as the package manager's database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackageState {
    /// Not installed (at most its configuration files are left).
    NotInstalled,
    /// Installed and configured, at `version`.
    Installed { version: String },
    /// Half-way: unpacked, half-configured, half-installed (`status` as
    /// the package manager says). Installing again completes it.
    Partial { status: String, version: String },
}

/// Why a package operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PackageError {
    /// Not a package name the package manager accepts.
    #[error("{name:?} is not a valid package name")]
    InvalidName { name: String },
    /// Not a version the package manager accepts.
    #[error("{version:?} is not a valid package version")]
    InvalidVersion { version: String },
    /// The topology's root is not the host's `/`: the host's package
    /// manager installs into the host only.
    #[error("packages are installed only when the root is the host's /; this root is {root}")]
    NotHostRoot { root: String },
    /// Doing it would also remove these other packages; nothing was done.
    #[error("{action} {package} would also remove {}; nothing was done", others.join(", "))]
    WouldRemoveOthers { action: &'static str, package: String, others: Vec<String> },
    /// A tool the package manager needs is missing or cannot run.
    #[error("{message}")]
    Unavailable { message: String },
    /// A tool did not finish in time.
    #[error("{message}")]
    TimedOut { message: String },
    /// The package manager refused; the message is its own.
    #[error("{command} failed: {message}")]
    CommandFailed { command: String, message: String },
}

impl From<PackageError> for InterpretError {
    fn from(err: PackageError) -> Self {
        use PackageError as P;
        let kind = match &err {
            P::InvalidName { .. } | P::InvalidVersion { .. } => InterpretErrorKind::InvalidInput,
            P::NotHostRoot { .. } | P::Unavailable { .. } => InterpretErrorKind::Unavailable,
            P::TimedOut { .. } => InterpretErrorKind::Timeout,
            P::WouldRemoveOthers { .. } | P::CommandFailed { .. } => InterpretErrorKind::Failed,
        };
        Self::with_kind(kind, err.to_string())
    }
}

/// A package manager (apt and dpkg on a Debian device). It acts on the
/// host's own root only: against any other root every operation is
/// [`PackageError::NotHostRoot`].
#[async_trait]
pub trait PackageManager: Send + Sync {
    /// What the package manager's database says of `name`.
    async fn package_state(&self, name: &str) -> Result<PackageState, PackageError>;
    /// Installs `name` (at `version`, when given: also a downgrade) without
    /// asking anything and without recommended packages. Refused, with
    /// nothing done, when it would remove another package.
    async fn install(&self, name: &str, version: Option<&str>) -> Result<(), PackageError>;
    /// Removes `name` (its configuration files stay). Refused, with
    /// nothing done, when it would remove another package too (one that
    /// depends on it).
    async fn remove(&self, name: &str) -> Result<(), PackageError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_and_versions_follow_debian_rules() {
        for ok in ["hello", "libc6", "g++", "python3.11", "0ad", "lib-x.y+z"] {
            assert!(check_package_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a", "Hello", "-rf", "+x", ".x", "a b", "a=1", "libc6:amd64", "x/y", &"a".repeat(129)]
        {
            assert!(check_package_name(bad).is_err(), "{bad}");
        }
        for ok in ["2.10-3", "1:1.99.1-7.3", "1.0~rc1", "5.02-1+b1", "0"] {
            assert!(check_package_version(ok).is_ok(), "{ok}");
        }
        for bad in ["", "v1", "-1", "1 2", "1=2", "1/2", "1\n", &"1".repeat(129)] {
            assert!(check_package_version(bad).is_err(), "{bad}");
        }
    }
}
