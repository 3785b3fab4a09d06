//! The wire format of Harmony device Scores: what an operator writes and a device reads.
//!
//! This crate is shared by the agent and by operator tools, so both produce
//! the same bytes. It holds serde types, the CBOR codec and names, and
//! deliberately no async runtime and no NATS client.

pub mod cbor_bytes;
mod codec;
mod command;
mod document;
mod file;
pub mod health;
mod ids;
mod json;
mod keyset;
pub mod names;
mod privilege;
mod registry;
mod resource;
mod scan;
mod signed;
mod status;
mod tagged;
pub mod validate;

pub use codec::{
    check_health, check_scores, decode, decode_json, decode_via_typetag, encode, from_cbor, peek_generation,
    to_cbor, to_json_pretty, try_to_cbor, DecodeError, DecodeLimits, EncodeError, ValueDecodeError,
};
pub use command::{
    LogsErrorKind, LogsReply, LogsRequest, DEFAULT_LOG_TAIL, LOGS_VERB, MAX_LOGS_REPLY_BYTES,
    MAX_LOGS_REQUEST_BYTES, MAX_LOG_BYTES, MAX_LOG_TAIL,
};
pub use document::{document_digest, DeploymentIndex, DesiredState, FORMAT_VERSION};
pub use file::{is_json_path, read_document_file, DocumentFileError};
pub use health::{Check, HealthCheck, HealthCheckError, HealthPlan, SourcedCheck};
pub use ids::{DeploymentName, DeviceId, IdError};
pub use keyset::{KeySet, KeySetError, KEYSET_TAG, MAX_KEYSET_BYTES, MAX_KEYSET_KEYS};
pub use privilege::{mode_privilege, Privilege, SETUID_SETGID_BITS};
pub use registry::{is_registered, registered_scores, DeviceScore, ScoreRegistration};
pub use resource::{normalize_path, PathError, ResourceId, ResourceIdError, MAX_NAME_BYTES, MAX_PATH_BYTES};
pub use signed::{
    is_signed, key_id, open_signed, parse_public_key, parse_secret_key, payload_of, to_hex32,
    DocumentSignature, DocumentSigner, SignatureError, SignedDocument, TrustedKeys, SIGNED_TAG,
};
pub use status::{
    bounded_text, now_ms, AgentStatus, CheckState, CheckStatus, CommandReply, DeploymentStatus, DeviceInfo,
    ErrorKind, Phase, ScoreStatus, StatusError, SupportedScore, HEALTH_FEATURE, MAX_DETAIL_LINES,
    MAX_MESSAGE_BYTES, MAX_STATUS_BYTES,
};
pub use tagged::ScoreDecoder;
pub use validate::ScoreValidationError;

/// Re-exported: a log field made one safe line (see [`bounded_text`]).
pub use harmony_topology::text::log_text;

/// Re-exported: the public half of a signing key, as [`TrustedKeys`] takes it.
pub use ed25519_dalek::VerifyingKey;

/// Re-exported for `inventory::submit!` in Score crates.
pub use inventory;
