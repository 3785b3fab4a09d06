//! Device commands with a body: the `logs` request and its typed reply.
//!
//! `ping` and `reconcile` carry no body and are answered with a
//! [`CommandReply`](crate::CommandReply). `logs` names a container and how
//! many lines; its [`LogsReply`] holds [`CommandReply`]'s fields and the
//! lines, so an older agent's "unknown verb" reply still decodes as one.

use serde::{Deserialize, Serialize};

use crate::DeviceId;

/// The verb of the logs command (`device-commands.<id>.logs`).
pub const LOGS_VERB: &str = "logs";
/// Lines a `logs` request asks for when it names no number.
pub const DEFAULT_LOG_TAIL: u32 = 100;
/// Most lines a `logs` request may ask for.
pub const MAX_LOG_TAIL: u32 = 10_000;
/// Most bytes of log text one reply carries (the newest are kept).
pub const MAX_LOG_BYTES: usize = 256 * 1024;
/// Largest `logs` request body a device decodes.
pub const MAX_LOGS_REQUEST_BYTES: usize = 1024;
/// Largest `logs` reply an operator decodes: the text, one escape per byte
/// at worst, and the framing.
pub const MAX_LOGS_REPLY_BYTES: usize = 4 * MAX_LOG_BYTES + 64 * 1024;
/// Longest container name a request may hold (as the container Score).
const MAX_CONTAINER_NAME_BYTES: usize = 128;

/// The body of a `logs` request (CBOR).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsRequest {
    /// The container, as its Score names it.
    pub container: String,
    /// How many of its last lines (1 to [`MAX_LOG_TAIL`]).
    #[serde(default = "default_tail")]
    pub tail: u32,
}

fn default_tail() -> u32 {
    DEFAULT_LOG_TAIL
}

impl LogsRequest {
    /// A request for the last `tail` lines of `container`.
    pub fn new(container: impl Into<String>, tail: u32) -> Self {
        Self { container: container.into(), tail }
    }

    /// Why this request cannot be answered as asked: a container name a
    /// Score could not hold, or a tail out of bounds.
    pub fn check(&self) -> Result<(), String> {
        let name = &self.container;
        let name_ok = name.len() <= MAX_CONTAINER_NAME_BYTES
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !name_ok {
            return Err(format!(
                "container {:?} is not 1 to {MAX_CONTAINER_NAME_BYTES} of [A-Za-z0-9_.-], starting with a letter or digit",
                crate::bounded_text(name, 64)
            ));
        }
        if self.tail == 0 || self.tail > MAX_LOG_TAIL {
            return Err(format!("tail {} is not 1 to {MAX_LOG_TAIL}", self.tail));
        }
        Ok(())
    }
}

/// Why a device did not return a container's logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LogsErrorKind {
    /// The request does not decode or is out of bounds.
    InvalidRequest,
    /// No container of that name.
    NotFound,
    /// A container of that name that this agent does not manage (no label
    /// `harmony.managed=true`): its logs are not the fleet's to read.
    NotManaged,
    /// The container runtime cannot be run on the device.
    Unavailable,
    /// The runtime ran and failed (its message says why).
    Failed,
    /// A kind this build does not know (from a newer agent).
    #[serde(other)]
    Unknown,
}

impl LogsErrorKind {
    /// The wire name (`not_managed`).
    pub fn as_str(self) -> &'static str {
        match self {
            LogsErrorKind::InvalidRequest => "invalid_request",
            LogsErrorKind::NotFound => "not_found",
            LogsErrorKind::NotManaged => "not_managed",
            LogsErrorKind::Unavailable => "unavailable",
            LogsErrorKind::Failed => "failed",
            LogsErrorKind::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for LogsErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The reply to `logs`: [`CommandReply`](crate::CommandReply)'s fields,
/// then the lines, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsReply {
    /// The answering device.
    pub device_id: DeviceId,
    /// `logs` (or, from an agent without the verb, what it answered).
    pub verb: String,
    /// Whether the lines are there.
    pub ok: bool,
    /// One line: what was returned, or why not.
    pub message: String,
    /// The agent's version.
    #[serde(default)]
    pub agent_version: String,
    /// Why nothing was returned, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<LogsErrorKind>,
    /// The container's last lines (its stdout and stderr as podman keeps
    /// them), without their line ends, oldest first.
    #[serde(default)]
    pub lines: Vec<String>,
    /// Older lines were dropped to stay within [`MAX_LOG_BYTES`].
    #[serde(default)]
    pub truncated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_bounded_and_name_containers_a_score_could() {
        assert!(LogsRequest::new("web-1.a_b", 1).check().is_ok());
        assert!(LogsRequest::new("web", MAX_LOG_TAIL).check().is_ok());
        for bad in [
            LogsRequest::new("web", 0),
            LogsRequest::new("web", MAX_LOG_TAIL + 1),
            LogsRequest::new("", 10),
            LogsRequest::new("-web", 10),
            LogsRequest::new("--all", 10),
            LogsRequest::new("a/b", 10),
            LogsRequest::new("w".repeat(129), 10),
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        let bytes = crate::to_cbor(&serde_json::json!({"container": "web"}));
        let decoded: LogsRequest = crate::from_cbor(&bytes, MAX_LOGS_REQUEST_BYTES, "logs request").unwrap();
        assert_eq!(decoded.tail, DEFAULT_LOG_TAIL);
    }

    #[test]
    fn an_older_agents_reply_decodes_as_a_refusal_and_unknown_kinds_survive() {
        let old = crate::CommandReply {
            device_id: DeviceId::new("dev-1").unwrap(),
            verb: "logs".into(),
            ok: false,
            message: "unknown verb \"logs\" (known: ping, reconcile)".into(),
            agent_version: "0.1.0".into(),
        };
        let reply: LogsReply = crate::from_cbor(&crate::to_cbor(&old), 4096, "reply").unwrap();
        assert!(!reply.ok && reply.lines.is_empty() && reply.error.is_none());
        let newer = serde_json::json!({"device_id": "dev-1", "verb": "logs", "ok": false, "message": "x",
            "error": "rate_limited"});
        let reply: LogsReply = crate::from_cbor(&crate::to_cbor(&newer), 4096, "reply").unwrap();
        assert_eq!(reply.error, Some(LogsErrorKind::Unknown));
        assert_eq!(LogsErrorKind::NotManaged.to_string(), "not_managed");
    }
}
