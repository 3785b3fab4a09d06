//! What a device reports back: `AgentStatus`, `DeploymentStatus`, `DeviceInfo`.

use std::collections::BTreeMap;

use harmony_topology::{InterpretStatus, Outcome};
use serde::{Deserialize, Serialize};

use crate::{DeploymentName, DeviceId};

/// Milliseconds since the Unix epoch, the unit of every status timestamp.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A device's whole report, one KV value per device, written by its agent
/// with compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The reporting device.
    pub device_id: DeviceId,
    /// The agent's version.
    pub agent_version: String,
    /// When this report was written.
    #[serde(default)]
    pub updated_at_ms: u64,
    /// The agent's last sign of life.
    #[serde(default)]
    pub heartbeat_at_ms: u64,
    /// How often the agent beats; a status whose heartbeat is older than
    /// three intervals is stale.
    #[serde(default)]
    pub heartbeat_interval_ms: u64,
    /// What the device is and supports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<DeviceInfo>,
    /// Per deployment, how far the device got.
    #[serde(default)]
    pub deployments: BTreeMap<DeploymentName, DeploymentStatus>,
}

/// Where a deployment stands on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Phase {
    /// The agent is running the Scores of `desired_generation`.
    Applying,
    /// Every Score of `observed_generation` is SUCCESS or NOOP.
    Applied,
    /// At least one Score failed; the agent retries with backoff.
    Failed,
    /// The latest document was refused (see `error`); the previous generation keeps running.
    Rejected,
    /// The deployment was deleted and what it owned was undone.
    Pruned,
}

/// One deployment's status (Kubernetes' observedGeneration pattern: the
/// generation landed when `observed_generation == desired_generation` and
/// the phase is `Applied`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentStatus {
    /// The newest generation the device has seen.
    pub desired_generation: u64,
    /// The last generation fully applied (0: none yet).
    pub observed_generation: u64,
    /// Where it stands.
    pub phase: Phase,
    /// Per Score of the last attempt, in document order.
    #[serde(default)]
    pub scores: Vec<ScoreStatus>,
    /// Why the latest document was refused, or why the attempt failed as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StatusError>,
    /// When the agent last ran this deployment.
    #[serde(default)]
    pub last_attempt_at_ms: u64,
    /// When the agent last applied it fully.
    #[serde(default)]
    pub last_applied_at_ms: u64,
}

/// A typed error as status carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusError {
    /// Stable machine-readable kind, e.g. `unknown_score_tags`.
    pub kind: String,
    /// One line for people.
    pub message: String,
}

/// One Score's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScoreStatus {
    /// Wire tag.
    pub tag: String,
    /// The Score's name.
    pub name: String,
    /// The resource it owns.
    pub resource: String,
    /// What its Interpret reported.
    pub status: InterpretStatus,
    /// One line.
    pub message: String,
    /// Further lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

impl ScoreStatus {
    /// The status of a Score whose Interpret returned `result`.
    pub fn from_result(
        tag: &str,
        name: String,
        resource: String,
        result: Result<Outcome, harmony_topology::InterpretError>,
    ) -> Self {
        let (status, message, details) = match result {
            Ok(Outcome { status, message, details }) => (status, message, details),
            Err(err) => (InterpretStatus::FAILURE, err.to_string(), Vec::new()),
        };
        Self { tag: tag.to_owned(), name, resource, status, message, details }
    }

    /// Whether the Score holds (SUCCESS or NOOP).
    pub fn is_ok(&self) -> bool {
        matches!(self.status, InterpretStatus::SUCCESS | InterpretStatus::NOOP)
    }
}

/// What a device is and which Scores it can run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The agent's version.
    pub agent_version: String,
    /// Every Score tag the agent decodes.
    pub scores: Vec<SupportedScore>,
    /// The host's name.
    #[serde(default)]
    pub hostname: String,
    /// CPU architecture (`x86_64`, `aarch64`).
    #[serde(default)]
    pub arch: String,
    /// Operating system (`linux`).
    #[serde(default)]
    pub os: String,
    /// Labels from the agent's configuration.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// When the agent started.
    #[serde(default)]
    pub started_at_ms: u64,
}

/// One supported Score tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupportedScore {
    /// Wire tag.
    pub tag: String,
    /// The tag's version suffix.
    pub version: String,
    /// One line.
    pub summary: String,
}

impl DeviceInfo {
    /// Whether the device decodes `tag`.
    pub fn supports(&self, tag: &str) -> bool {
        self.scores.iter().any(|s| s.tag == tag)
    }
}

/// The reply to a `device-commands.<device>.<verb>` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandReply {
    /// The answering device.
    pub device_id: DeviceId,
    /// The verb answered (`ping`, `reconcile`).
    pub verb: String,
    /// Whether the command did what it was asked.
    pub ok: bool,
    /// One line.
    pub message: String,
    /// The agent's version.
    #[serde(default)]
    pub agent_version: String,
}
