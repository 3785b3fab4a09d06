//! The `ServiceManager` capability: unit files, whether they start at boot, and the services they run.

use async_trait::async_trait;

use crate::{FilesystemError, InterpretError, InterpretErrorKind};

/// The unit types a [`ServiceManager`] manages here, as unit name suffixes.
pub const UNIT_SUFFIXES: [&str; 6] = ["service", "socket", "timer", "path", "target", "mount"];

/// Longest unit name systemd accepts (`UNIT_NAME_MAX` less its NUL).
pub const MAX_UNIT_NAME_BYTES: usize = 255;

/// Checks that `name` is a unit name: `PREFIX.TYPE`, the type one of
/// [`UNIT_SUFFIXES`], the prefix of ASCII letters, digits and `:-_.\`,
/// not starting with `.`; an instance `PREFIX@INSTANCE.TYPE` is allowed,
/// a bare template `PREFIX@.TYPE` (which cannot run by itself) is not. At
/// most [`MAX_UNIT_NAME_BYTES`] bytes. The error is one line saying why.
pub fn check_unit_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_UNIT_NAME_BYTES {
        return Err(format!("a unit name has 1 to {MAX_UNIT_NAME_BYTES} bytes"));
    }
    let Some((prefix, suffix)) = name.rsplit_once('.') else {
        return Err(format!("a unit name ends in a type: .{}", UNIT_SUFFIXES.join(", .")));
    };
    if !UNIT_SUFFIXES.contains(&suffix) {
        return Err(format!("unit type .{suffix} is not one of .{}", UNIT_SUFFIXES.join(", .")));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c);
    if let Some(bad) = prefix.chars().find(|c| !allowed(*c)) {
        return Err(format!("{bad:?} is not allowed in a unit name (letters, digits and :-_.\\@ are)"));
    }
    if prefix.is_empty() || prefix.starts_with('.') || prefix.starts_with('@') {
        return Err("a unit name starts with a letter, a digit or one of :-_\\".to_owned());
    }
    if prefix.ends_with('@') {
        return Err(
            "a template unit (NAME@.TYPE) does not run by itself; name an instance (NAME@INSTANCE.TYPE)"
                .into(),
        );
    }
    Ok(())
}

/// Whether a running service manager manages a topology's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceRuntime {
    /// One runs: units can be reloaded, started and stopped.
    Live,
    /// None does (an image being prepared, a container without an init):
    /// unit files and their enablement can be written, nothing can be
    /// started. The reason says why.
    Offline { reason: String },
}

/// Whether a unit starts at boot (`systemctl is-enabled`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enablement {
    /// It is (`enabled`).
    Enabled,
    /// It is not, and could be (`disabled`, or enabled only until the next boot).
    Disabled,
    /// It has nothing to enable (no `[Install]` section: `static`,
    /// `indirect`, `generated`, `transient`): something else starts it.
    Static,
    /// Masked by the device's administrator: it cannot start at all.
    Masked,
    /// Any other answer, as the service manager gave it.
    Other(String),
}

/// What a unit is doing now (a live service manager only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    /// `active`, `inactive`, `failed`, `activating`, … as the service manager says.
    pub active_state: String,
    /// The finer state (`running`, `exited`, `dead`, …).
    pub sub_state: String,
    /// The unit file changed since the service manager last read it.
    pub needs_reload: bool,
}

impl UnitState {
    /// Whether it runs or is on its way to (`active`, `activating`, `reloading`).
    pub fn is_running(&self) -> bool {
        matches!(self.active_state.as_str(), "active" | "activating" | "reloading")
    }
}

/// Why a service manager operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// Not a unit name the service manager accepts.
    #[error("{name:?} is not a valid unit name")]
    InvalidUnitName { name: String },
    /// The service manager's own validator refused the unit file; nothing
    /// was installed.
    #[error("unit {unit} is not valid: {message}")]
    InvalidUnit { unit: String, message: String },
    /// Something other than a regular file is where the unit file goes (a
    /// unit masked by a link to `/dev/null`, a linked unit); it is left alone.
    #[error("{path} is not a regular file (a masked or linked unit); left as it is")]
    NotAUnitFile { path: String },
    /// A runtime operation without a running service manager.
    #[error("no service manager runs for this root: {reason}")]
    NotRunning { reason: String },
    /// A tool the service manager needs is missing or cannot run.
    #[error("{message}")]
    Unavailable { message: String },
    /// A tool did not finish in time.
    #[error("{message}")]
    TimedOut { message: String },
    /// The service manager refused; the message is its own.
    #[error("{command} failed: {message}")]
    CommandFailed { command: String, message: String },
    /// Reading or writing a unit file failed.
    #[error(transparent)]
    Filesystem(#[from] FilesystemError),
}

impl From<ServiceError> for InterpretError {
    fn from(err: ServiceError) -> Self {
        use ServiceError as S;
        let kind = match err {
            S::Filesystem(err) => return err.into(),
            S::InvalidUnitName { .. } | S::InvalidUnit { .. } => InterpretErrorKind::InvalidInput,
            S::NotRunning { .. } | S::Unavailable { .. } => InterpretErrorKind::Unavailable,
            S::TimedOut { .. } => InterpretErrorKind::Timeout,
            S::NotAUnitFile { .. } | S::CommandFailed { .. } => InterpretErrorKind::Failed,
        };
        Self::with_kind(kind, err.to_string())
    }
}

/// A service manager (systemd on a device): unit files beneath the
/// topology's root, their enablement, and, when one runs for that root,
/// the services themselves.
///
/// Unit files, verification and enablement work on any root, also when no
/// service manager runs for it; reloading, starting, stopping and
/// [`ServiceManager::unit_state`] need [`ServiceRuntime::Live`] and fail
/// with [`ServiceError::NotRunning`] otherwise.
#[async_trait]
pub trait ServiceManager: Send + Sync {
    /// Whether a service manager runs for this root.
    async fn service_runtime(&self) -> ServiceRuntime;
    /// The content of unit `name`'s file as installed; `None` when there is none.
    async fn unit_file(&self, name: &str) -> Result<Option<Vec<u8>>, ServiceError>;
    /// Checks `content` as the file of unit `name` with the service
    /// manager's own validator, installing nothing:
    /// [`ServiceError::InvalidUnit`] carries the validator's message.
    async fn verify_unit(&self, name: &str, content: &[u8]) -> Result<(), ServiceError>;
    /// Verifies `content` (as [`ServiceManager::verify_unit`]), then
    /// installs it atomically as unit `name`'s file. An invalid unit
    /// installs nothing: the file in place stays as it was.
    async fn write_unit(&self, name: &str, content: &[u8]) -> Result<(), ServiceError>;
    /// Removes unit `name`'s file; a missing one is not an error, anything
    /// but a regular file is [`ServiceError::NotAUnitFile`].
    async fn remove_unit(&self, name: &str) -> Result<(), ServiceError>;
    /// Whether unit `name` starts at boot.
    async fn enablement(&self, name: &str) -> Result<Enablement, ServiceError>;
    /// Makes unit `name` start at boot (as its `[Install]` section says).
    async fn enable(&self, name: &str) -> Result<(), ServiceError>;
    /// Makes unit `name` no longer start at boot.
    async fn disable(&self, name: &str) -> Result<(), ServiceError>;
    /// What unit `name` is doing now.
    async fn unit_state(&self, name: &str) -> Result<UnitState, ServiceError>;
    /// Makes the service manager read the unit files again.
    async fn daemon_reload(&self) -> Result<(), ServiceError>;
    /// Starts unit `name` and waits for the start to finish.
    async fn start(&self, name: &str) -> Result<(), ServiceError>;
    /// Stops unit `name` and waits for the stop to finish.
    async fn stop(&self, name: &str) -> Result<(), ServiceError>;
    /// Restarts unit `name` (so that a changed unit file takes effect).
    async fn restart(&self, name: &str) -> Result<(), ServiceError>;
}
