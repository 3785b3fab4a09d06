//! The Harmony device agent: follows a device's desired state and runs its Scores locally.
//!
//! [`apply`] runs one document through the `Maestro`; the [`daemon`] decides
//! *when* to run which document, fed by a [`source`] (NATS KV, or a folder),
//! keeps it on disk ([`store`]) and reports status.

pub mod apply;
pub mod config;
pub mod daemon;
pub mod reconcile;
pub mod source;
pub mod store;

pub use apply::{run_scores, ApplyReport};

/// This agent's version, as reported in status and device info.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
