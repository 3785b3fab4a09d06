//! The wire format of Harmony device Scores: what an operator writes and a device reads.
//!
//! This crate is shared by the agent and by operator tools, so both produce
//! the same bytes. It holds serde types, the CBOR codec and names, and
//! deliberately no async runtime and no NATS client.

mod codec;
mod document;
mod file;
mod ids;
pub mod names;
mod registry;
mod status;

pub use codec::{
    decode, decode_json, encode, from_cbor, peek_generation, to_cbor, to_json_pretty, try_to_cbor,
    DecodeError, DecodeLimits, EncodeError, ValueDecodeError,
};
pub use document::{DeploymentIndex, DesiredState, FORMAT_VERSION};
pub use file::{is_json_path, read_document_file, DocumentFileError};
pub use ids::{DeploymentName, DeviceId, IdError};
pub use registry::{registered_scores, DeviceScore, ScoreRegistration};
pub use status::{
    now_ms, AgentStatus, CommandReply, DeploymentStatus, DeviceInfo, Phase, ScoreStatus, StatusError,
    SupportedScore,
};

/// Re-exported for `inventory::submit!` in Score crates.
pub use inventory;
