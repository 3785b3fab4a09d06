//! The Harmony device agent: follows a device's desired state and runs its Scores locally.
//!
//! The public surface is small on purpose: [`run`] the daemon with an
//! [`AgentConfig`] (built from a [`ConfigLayer`]), or [`run_scores`] once.
//! Inside, a source (NATS KV, or a folder) feeds an inbox that keeps the
//! newest input per deployment; the controller judges documents against
//! each deployment's state machine, persists them, and hands runs to the
//! runner (one per deployment, a bounded number at once).

mod apply;
pub mod artifacts;
mod commit;
mod config;
mod controller;
mod daemon;
mod deployment;
mod health;
mod inbox;
mod runner;
mod source;
mod store;

pub use apply::{policy_refusal, run_scores, ApplyReport};
pub use config::{
    load_trusted_keys, AgentConfig, ConfigError, ConfigLayer, DevicePolicy, PolicyLayer, Source,
};
pub use daemon::{device_info, run, DaemonError};
pub use deployment::{backoff, FORGET_PRUNED_AFTER};
pub use health::run_checks;
pub use runner::Timeouts;
pub use store::StoreError;

/// This agent's version, as reported in status and device info.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
