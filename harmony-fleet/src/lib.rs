//! The operator side of a Harmony device fleet: build, deploy and follow desired state.
//!
//! [`FleetClient`] writes each device's desired state to NATS JetStream KV
//! (with compare-and-set, keeping the per-device index in step), reads what
//! the agents report and sends them commands. Fleet automation is itself a
//! Harmony Score: [`DeviceDeploymentScore`] runs against a [`FleetTopology`]
//! (any topology with the [`DeviceFleet`] capability) through the `Maestro`,
//! and [`FleetRolloutScore`] rolls one out in waves that stop by themselves
//! when too many devices fail (the [`RolloutStore`] capability).

mod artifacts;
mod client;
mod deploy_many;
mod desired;
mod error;
mod keyset;
mod multi_get;
pub mod nats_config;
pub mod report;
mod rollout;
mod score;
mod topology;
mod wait;

pub use artifacts::{ArtifactInfo, PutArtifact};
pub use client::{BucketAction, BucketReport, FleetClient, DESIRED_STATE_HISTORY};
pub use desired::{DeployRequest, Deployed};
pub use error::{error_chain, FleetError, NatsError};
pub use keyset::read_keyset;
pub use rollout::{
    parse_waves, wave_ends, DeviceResult, DeviceState, FleetRolloutInterpret, FleetRolloutScore, MaxFailures,
    OnDone, RolloutDocument, RolloutEvent, RolloutEvents, RolloutPhase, RolloutState, RolloutStore,
    RolloutTargets, StoredRollout, WaveSize, MAX_WAVES, ROLLOUT_STATE_FORMAT,
};
pub use score::{DeviceDeploymentInterpret, DeviceDeploymentScore};
pub use topology::{DeviceFleet, FleetTopology};
pub use wait::{generation_progress, is_pruned, Awaited, Progress};

/// The NATS client this crate is built on, for callers that need the
/// connection underneath ([`FleetClient::nats`], [`FleetClient::jetstream`]).
pub use async_nats;
pub use harmony_score_wire as wire;
