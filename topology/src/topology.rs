//! The `Topology` trait: where Scores run, and how it gets ready.

use async_trait::async_trait;

/// What [`Topology::ensure_ready`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreparationOutcome {
    /// The topology was prepared; the message says how.
    Success { details: String },
    /// The topology was already ready.
    Noop,
}

/// Why a topology could not be made ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("topology preparation failed: {msg}")]
pub struct PreparationError {
    msg: String,
}

impl PreparationError {
    /// A preparation error with the given message.
    pub fn new(msg: impl Into<String>) -> Self {
        Self { msg: msg.into() }
    }
}

/// An environment Scores run against. Its capabilities are further traits
/// (`Filesystem`, …) implemented on the same type.
#[async_trait]
pub trait Topology: Send + Sync {
    /// A short name for logs and status.
    fn name(&self) -> &str;
    /// Makes the topology usable (checks and creates what it needs).
    async fn ensure_ready(&self) -> Result<PreparationOutcome, PreparationError>;
}
