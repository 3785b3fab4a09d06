//! The Harmony device agent: follows a device's desired state and runs its Scores locally.
//!
//! `apply` runs one document through the `Maestro`; the daemon in later
//! modules decides *when* to run which document.

pub mod apply;

pub use apply::{run_scores, ApplyReport};
