//! The `Interpret` trait and what an Interpret reports: `Outcome`, `InterpretStatus`.

use std::fmt::{self, Debug, Display};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::Inventory;

/// The imperative half of a Score: makes the Score's desired state true on a
/// topology `T`, and says what it did.
#[async_trait]
pub trait Interpret<T>: Debug + Send + Sync {
    /// Runs against `topology`. Reading the current state first, an Interpret
    /// that finds nothing to change returns an [`InterpretStatus::NOOP`] outcome.
    async fn execute(&self, inventory: &Inventory, topology: &T) -> Result<Outcome, InterpretError>;
    /// Which Interpret this is.
    fn get_name(&self) -> InterpretName;
    /// The Interpret's own version.
    fn get_version(&self) -> Version;
    /// The status of its last run, as far as it keeps one.
    fn get_status(&self) -> InterpretStatus;
    /// Ids of the Interprets this one runs in turn.
    fn get_children(&self) -> Vec<Id>;
}

/// Where an Interpret run ended up. Names are Harmony's.
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InterpretStatus {
    /// The desired state was reached by changing something.
    SUCCESS,
    /// The desired state could not be reached.
    FAILURE,
    /// Still running.
    RUNNING,
    /// Waiting to run.
    QUEUED,
    /// Cannot run until something else happens.
    BLOCKED,
    /// Already in the desired state; nothing changed.
    NOOP,
}

impl Display for InterpretStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Debug::fmt(self, f)
    }
}

/// The result of one Interpret run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// What happened.
    pub status: InterpretStatus,
    /// One line for people.
    pub message: String,
    /// Further lines (what was changed, and how).
    pub details: Vec<String>,
}

impl Outcome {
    /// An outcome with the given status and message.
    pub fn new(status: InterpretStatus, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), details: Vec::new() }
    }
    /// Something was changed and the desired state holds.
    pub fn success(message: impl Into<String>) -> Self {
        Self::new(InterpretStatus::SUCCESS, message)
    }
    /// Like [`Outcome::success`], with detail lines.
    pub fn success_with_details(message: impl Into<String>, details: Vec<String>) -> Self {
        Self { details, ..Self::success(message) }
    }
    /// Nothing needed changing.
    pub fn noop(message: impl Into<String>) -> Self {
        Self::new(InterpretStatus::NOOP, message)
    }
    /// The desired state was not reached, without an error being raised.
    pub fn failure(message: impl Into<String>) -> Self {
        Self::new(InterpretStatus::FAILURE, message)
    }
}

/// What kind of failure an [`InterpretError`] is, so status and retry
/// policy can branch on it without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum InterpretErrorKind {
    /// The Interpret ran and could not reach the desired state.
    Failed,
    /// The Interpret did not finish within its time limit.
    Timeout,
    /// The Score asks for something impossible (a bad path, a bad mode).
    InvalidInput,
    /// The operating system refused a file operation.
    Io,
    /// A tool or service the Interpret needs is not there or not answering.
    Unavailable,
    /// The run was cancelled (superseded or shut down) before the Interpret finished.
    Cancelled,
    /// Content fetched for a Score (an artifact) is not what its digest names.
    DigestMismatch,
    /// A kind this build does not know (sent by a newer agent).
    #[serde(other)]
    Other,
}

impl InterpretErrorKind {
    /// The kind's wire name (`timeout`, `invalid_input`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            InterpretErrorKind::Failed => "failed",
            InterpretErrorKind::Timeout => "timeout",
            InterpretErrorKind::InvalidInput => "invalid_input",
            InterpretErrorKind::Io => "io",
            InterpretErrorKind::Unavailable => "unavailable",
            InterpretErrorKind::Cancelled => "cancelled",
            InterpretErrorKind::DigestMismatch => "digest_mismatch",
            InterpretErrorKind::Other => "other",
        }
    }
}

impl Display for InterpretErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an Interpret failed: a typed [`InterpretErrorKind`] and one line for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct InterpretError {
    kind: InterpretErrorKind,
    msg: String,
}

impl InterpretError {
    /// An error of kind [`InterpretErrorKind::Failed`] with the given message.
    pub fn new(msg: impl Into<String>) -> Self {
        Self::with_kind(InterpretErrorKind::Failed, msg)
    }
    /// An error of the given kind.
    pub fn with_kind(kind: InterpretErrorKind, msg: impl Into<String>) -> Self {
        Self { kind, msg: msg.into() }
    }
    /// A Score asked for something impossible.
    pub fn invalid_input(msg: impl Into<String>) -> Self {
        Self::with_kind(InterpretErrorKind::InvalidInput, msg)
    }
    /// The message.
    pub fn message(&self) -> &str {
        &self.msg
    }
    /// The kind.
    pub fn kind(&self) -> InterpretErrorKind {
        self.kind
    }
}

impl From<crate::FilesystemError> for InterpretError {
    fn from(err: crate::FilesystemError) -> Self {
        use crate::FilesystemError as F;
        let kind = match &err {
            F::PathNotAbsolute { .. } | F::PathEscapesRoot { .. } | F::InvalidPath { .. } => {
                InterpretErrorKind::InvalidInput
            }
            _ => InterpretErrorKind::Io,
        };
        Self::with_kind(kind, err.to_string())
    }
}

/// Which Interpret is running: one variant per Interpret, and `Custom` for
/// Interprets defined outside this workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterpretName {
    /// `FileInterpret`.
    File,
    /// `DirectoryInterpret`.
    Directory,
    /// `PodmanContainerInterpret`.
    PodmanContainer,
    /// `SystemdUnitInterpret`.
    SystemdUnit,
    /// `PackageInterpret`.
    Package,
    /// An Interpret not listed above.
    Custom(&'static str),
}

impl Display for InterpretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InterpretName::File => f.write_str("File"),
            InterpretName::Directory => f.write_str("Directory"),
            InterpretName::PodmanContainer => f.write_str("PodmanContainer"),
            InterpretName::SystemdUnit => f.write_str("SystemdUnit"),
            InterpretName::Package => f.write_str("Package"),
            InterpretName::Custom(name) => f.write_str(name),
        }
    }
}

/// A version string such as `"1.0.0"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version(String);

impl Version {
    /// A version from its text.
    pub fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

impl Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An identifier of an Interpret run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Id(String);

impl Id {
    /// An id from its text.
    pub fn from(text: &str) -> Self {
        Self(text.to_owned())
    }
}

impl Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
