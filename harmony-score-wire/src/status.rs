//! What a device reports back: `AgentStatus`, `DeploymentStatus`, `DeviceInfo`.

use std::collections::BTreeMap;

use harmony_topology::{InterpretErrorKind, InterpretStatus, Outcome};
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
    /// The agent process that wrote this, fresh at every start: two
    /// different ids fighting over one key are two devices with one id.
    #[serde(default)]
    pub instance_id: String,
    /// Problems of the device as a whole: `duplicate_device`, and
    /// `state_unreadable` when the state folder itself cannot be listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<StatusError>,
    /// The version of the root-signed key set the device trusts; `None`
    /// when it trusts only its configured keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyset_version: Option<u64>,
    /// Set when the report was cut to fit the size limit (see [`AgentStatus::bound`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Where a deployment stands on a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Phase {
    /// The agent is running (or about to run) the Scores of `desired_generation`.
    #[default]
    Applying,
    /// Every Score of `observed_generation` is SUCCESS or NOOP, or
    /// BLOCKED: done as far as this device allows, the rest named in the
    /// Score's message (see [`ScoreStatus::is_settled`]).
    Applied,
    /// At least one Score failed; the agent retries with backoff.
    Failed,
    /// The latest document was refused (see `error`); the previous generation keeps running.
    Rejected,
    /// The deployment was deleted and what it owned was undone.
    Pruned,
    /// `desired_generation` is applied and its health checks are running
    /// (see `health`); it is not committed yet.
    Verifying,
    /// `desired_generation` failed a health check (named in `error`) and
    /// the device went back to its last good generation
    /// (`observed_generation`). The failed generation is not tried again.
    #[serde(rename = "rolled_back")]
    RolledBack,
    /// A phase this build does not know (reported by a newer agent).
    #[serde(other)]
    Unknown,
}

impl Phase {
    /// The phase's wire name (`rolled_back`).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Applying => "applying",
            Phase::Applied => "applied",
            Phase::Failed => "failed",
            Phase::Rejected => "rejected",
            Phase::Pruned => "pruned",
            Phase::Verifying => "verifying",
            Phase::RolledBack => "rolled_back",
            Phase::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one health check stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CheckState {
    /// Not held yet; tried again until the deadline.
    Pending,
    /// It holds.
    Held,
    /// It did not hold by the deadline.
    Failed,
    /// This device cannot tell (a unit where no systemd runs): not a
    /// failure, as a BLOCKED Score is not.
    Blocked,
    /// A state this build does not know (reported by a newer agent).
    #[serde(other)]
    Unknown,
}

impl CheckState {
    /// The state's wire name (`held`).
    pub fn as_str(self) -> &'static str {
        match self {
            CheckState::Pending => "pending",
            CheckState::Held => "held",
            CheckState::Failed => "failed",
            CheckState::Blocked => "blocked",
            CheckState::Unknown => "unknown",
        }
    }
}

/// One health check of the generation being verified (or last verified).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckStatus {
    /// The check in one line (`http http://127.0.0.1:8080/ -> 200`).
    pub check: String,
    /// `document`, or the Score that contributed it (`container [web]`).
    pub source: String,
    /// Where it stands.
    pub state: CheckState,
    /// What the last attempt saw (`connect 127.0.0.1:8080: connection
    /// refused`, `HTTP/1.1 200 OK`), bounded and escaped.
    #[serde(default)]
    pub output: String,
}

/// One deployment's status (Kubernetes' observedGeneration pattern: the
/// generation landed when `observed_generation == desired_generation` and
/// the phase is `Applied`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Digest ([`crate::document_digest`]) of the document of `desired_generation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_digest: Option<String>,
    /// Digest of the document of `observed_generation`: an operator waiting
    /// for what it wrote compares generation *and* digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_digest: Option<String>,
    /// While applying: the Score in progress (`2/5 file [/etc/motd]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_score: Option<String>,
    /// The last generation whose run a newer one superseded (never applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_generation: Option<u64>,
    /// The health checks of the generation being verified, or of the last
    /// one verified (empty for documents without checks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health: Vec<CheckStatus>,
}

/// Every kind of error a status reports, as one stable list: document
/// rejections, run failures and device-wide problems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// Larger than the size limit.
    TooLarge,
    /// Ends in the middle of a value.
    Truncated,
    /// Not well-formed, or not shaped like a document.
    Malformed,
    /// Nested too deep.
    TooDeep,
    /// More Scores than the limit.
    TooManyScores,
    /// Score tags this agent does not know.
    UnknownScoreTags,
    /// The document's device id is not valid.
    InvalidDeviceId,
    /// The document's deployment name is not valid.
    InvalidDeploymentName,
    /// A document format this agent does not read.
    UnsupportedFormat,
    /// Two Scores of the document own one resource.
    DuplicateResource,
    /// A Score's fields are not valid.
    InvalidScore,
    /// The document names another device.
    WrongDevice,
    /// The document names another deployment than its key.
    WrongDeployment,
    /// The document's expiry passed.
    Expired,
    /// A generation older than (or equal to, with other content) one accepted before.
    StaleGeneration,
    /// A resource the document names is owned by another deployment.
    ResourceConflict,
    /// A Score is outside the device owner's policy (its tag, or a path).
    PolicyDenied,
    /// A bare document where the device accepts signed documents only.
    Unsigned,
    /// A signed document without enough valid signatures by trusted keys
    /// (wrong key, tampered bytes, malformed envelope).
    BadSignature,
    /// The persisted state of a deployment cannot be read; kept aside on disk.
    StateUnreadable,
    /// The accepted state could not be persisted, so the run is not applied.
    PersistFailed,
    /// Some Scores failed; retried with backoff.
    ScoresFailed,
    /// Undoing a resource the deployment no longer names failed; retried.
    PruneFailed,
    /// Another agent instance writes this device's status: two devices share one id.
    DuplicateDevice,
    /// The deployment's key was deleted, but this device requires signed
    /// documents and a bare delete carries no signature: nothing is pruned
    /// until a signed document without Scores retires the deployment.
    UnsignedDelete,
    /// The key set the device trusts has expired: no new document is
    /// accepted until the root signs a newer one.
    KeysetExpired,
    /// A health check is not valid (a host that is not loopback, a bad
    /// digest, an unknown check type, a deadline out of bounds).
    InvalidHealthCheck,
    /// A health check did not hold by the deadline: the generation was
    /// rolled back (or, with no good generation before it, left failed).
    HealthCheckFailed,
    /// A kind this build does not know (sent by a newer agent).
    #[serde(other)]
    Unknown,
}

impl ErrorKind {
    /// The kind's wire name (`resource_conflict`).
    pub fn as_str(self) -> &'static str {
        use ErrorKind::*;
        match self {
            TooLarge => "too_large",
            Truncated => "truncated",
            Malformed => "malformed",
            TooDeep => "too_deep",
            TooManyScores => "too_many_scores",
            UnknownScoreTags => "unknown_score_tags",
            InvalidDeviceId => "invalid_device_id",
            InvalidDeploymentName => "invalid_deployment_name",
            UnsupportedFormat => "unsupported_format",
            DuplicateResource => "duplicate_resource",
            InvalidScore => "invalid_score",
            WrongDevice => "wrong_device",
            WrongDeployment => "wrong_deployment",
            Expired => "expired",
            StaleGeneration => "stale_generation",
            ResourceConflict => "resource_conflict",
            PolicyDenied => "policy_denied",
            Unsigned => "unsigned",
            BadSignature => "bad_signature",
            StateUnreadable => "state_unreadable",
            PersistFailed => "persist_failed",
            ScoresFailed => "scores_failed",
            PruneFailed => "prune_failed",
            DuplicateDevice => "duplicate_device",
            UnsignedDelete => "unsigned_delete",
            KeysetExpired => "keyset_expired",
            InvalidHealthCheck => "invalid_health_check",
            HealthCheckFailed => "health_check_failed",
            Unknown => "unknown",
        }
    }

    /// Whether a document refused for this reason may be accepted later
    /// without changing (the owner of a conflicting resource goes away; an
    /// upgraded agent learns a tag), so the agent offers it again.
    pub fn may_clear(self) -> bool {
        matches!(self, ErrorKind::ResourceConflict | ErrorKind::UnknownScoreTags)
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed error as status carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusError {
    /// Stable machine-readable kind.
    pub kind: ErrorKind,
    /// One line for people, bounded and escaped.
    pub message: String,
}

impl StatusError {
    /// An error whose message is bounded to [`MAX_MESSAGE_BYTES`] with
    /// control characters escaped.
    pub fn new(kind: ErrorKind, message: impl AsRef<str>) -> Self {
        Self { kind, message: bounded_text(message.as_ref(), MAX_MESSAGE_BYTES) }
    }
}

/// Longest message, Score name or detail line a status carries.
pub const MAX_MESSAGE_BYTES: usize = 512;

/// Largest encoded status an agent writes: well under NATS' default 1 MiB
/// max payload, so a report always fits.
pub const MAX_STATUS_BYTES: usize = 256 * 1024;

/// The one escaping rule for echoed text, shared with logs (see
/// [`harmony_topology::text`]).
pub use harmony_topology::text::bounded_text;
use harmony_topology::text::{bound_in_place, is_bounded};

impl AgentStatus {
    /// Makes the report safe to write: every echoed string bounded and
    /// escaped, and, when the encoded report is still larger than
    /// `max_bytes`, detail dropped in steps (detail lines, the lists of
    /// Scores that hold, every Score list, supported tags, then deployments
    /// from the end) with `truncated` set.
    pub fn bound(&mut self, max_bytes: usize) {
        self.to_bounded_cbor(max_bytes);
    }

    /// [`AgentStatus::bound`], returning the bounded report's CBOR encoding
    /// (the one the size check made: a status is encoded once when it fits).
    pub fn to_bounded_cbor(&mut self, max_bytes: usize) -> Vec<u8> {
        // Most strings need nothing: they are left as they are, not copied.
        let b = |t: &mut String| bound_in_place(t, MAX_MESSAGE_BYTES);
        b(&mut self.agent_version);
        b(&mut self.instance_id);
        self.errors.iter_mut().for_each(|e| b(&mut e.message));
        if let Some(info) = &mut self.info {
            b(&mut info.hostname);
            b(&mut info.agent_version);
            let safe = |t: &String| is_bounded(t, MAX_MESSAGE_BYTES);
            if !info.labels.iter().all(|(k, v)| safe(k) && safe(v)) {
                info.labels = std::mem::take(&mut info.labels)
                    .into_iter()
                    .map(|(k, v)| (bounded_text(&k, MAX_MESSAGE_BYTES), bounded_text(&v, MAX_MESSAGE_BYTES)))
                    .collect();
            }
        }
        for d in self.deployments.values_mut() {
            if let Some(e) = &mut d.error {
                b(&mut e.message);
            }
            if let Some(c) = &mut d.current_score {
                b(c);
            }
            for check in &mut d.health {
                b(&mut check.check);
                b(&mut check.source);
                b(&mut check.output);
            }
            for score in &mut d.scores {
                b(&mut score.tag);
                b(&mut score.name);
                b(&mut score.resource);
                b(&mut score.message);
                score.details.truncate(MAX_DETAIL_LINES);
                score.details.iter_mut().for_each(b);
            }
        }
        type Step = fn(&mut AgentStatus);
        let steps: [Step; 4] = [
            |s| s.deployments.values_mut().flat_map(|d| &mut d.scores).for_each(|sc| sc.details.clear()),
            |s| s.deployments.values_mut().for_each(|d| d.scores.retain(|sc| !sc.is_ok())),
            |s| {
                s.deployments.values_mut().for_each(|d| {
                    d.scores.clear();
                    d.health.clear();
                })
            },
            |s| {
                if let Some(info) = &mut s.info {
                    info.scores.clear();
                }
            },
        ];
        for step in steps {
            let encoded = crate::to_cbor(self);
            if encoded.len() <= max_bytes {
                return encoded;
            }
            step(self);
            self.truncated = true;
        }
        // Then whole deployments from the end, in proportion to the excess
        // (encoding the report once per step, not once per deployment).
        loop {
            let encoded = crate::to_cbor(self);
            let size = encoded.len();
            if size <= max_bytes || self.deployments.is_empty() {
                return encoded;
            }
            let keep = (self.deployments.len() as u128 * max_bytes as u128 * 9 / 10 / size as u128) as usize;
            let keep = keep.min(self.deployments.len() - 1);
            if let Some(first_dropped) = self.deployments.keys().nth(keep).cloned() {
                self.deployments.split_off(&first_dropped);
            }
            self.truncated = true;
        }
    }
}

/// Most detail lines one Score reports.
pub const MAX_DETAIL_LINES: usize = 16;

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
    /// For a failure raised as an error: its kind (`timeout`, `io`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<InterpretErrorKind>,
}

impl ScoreStatus {
    /// The status of a Score whose Interpret returned `result`.
    pub fn from_result(
        tag: &str,
        name: String,
        resource: String,
        result: Result<Outcome, harmony_topology::InterpretError>,
    ) -> Self {
        let (status, message, details, error_kind) = match result {
            Ok(Outcome { status, message, details }) => (status, message, details, None),
            Err(err) => (InterpretStatus::FAILURE, err.to_string(), Vec::new(), Some(err.kind())),
        };
        Self {
            tag: bounded_text(tag, MAX_MESSAGE_BYTES),
            name: bounded_text(&name, MAX_MESSAGE_BYTES),
            resource: bounded_text(&resource, MAX_MESSAGE_BYTES),
            status,
            message: bounded_text(&message, MAX_MESSAGE_BYTES),
            details: details
                .iter()
                .take(MAX_DETAIL_LINES)
                .map(|d| bounded_text(d, MAX_MESSAGE_BYTES))
                .collect(),
            error_kind,
        }
    }

    /// Whether the Score holds (SUCCESS or NOOP).
    pub fn is_ok(&self) -> bool {
        matches!(self.status, InterpretStatus::SUCCESS | InterpretStatus::NOOP)
    }

    /// Whether the Score did not fail: it holds, or it is BLOCKED (it did
    /// what this device allows and says in its message what it cannot do
    /// here, such as starting a unit where no systemd runs). Retrying
    /// changes nothing for a blocked Score: a deployment whose Scores all
    /// settled is applied, not retried; the resync runs it again.
    pub fn is_settled(&self) -> bool {
        self.is_ok() || self.status == InterpretStatus::BLOCKED
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
    /// Abilities of the agent beyond its Score tags that an operator must
    /// not assume (an older agent lacks them and would ignore what asks
    /// for them): [`HEALTH_FEATURE`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// The feature an agent lists when it verifies documents' health checks
/// (an older agent reads a document with checks and ignores them).
pub const HEALTH_FEATURE: &str = "health/v1";

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

    /// Whether the device lists `feature` ([`HEALTH_FEATURE`]).
    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
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

#[cfg(test)]
mod tests {
    use super::*;

    // Attack: a newer agent reports a phase this build does not know (the
    // architecture plans `verifying` and `rolled_back`). ErrorKind has a
    // catch-all for exactly this; Phase did not, so the whole status of
    // such a device failed to decode in an older operator tool (`status`,
    // `devices`, every wait), although `phase_label` already prints
    // "unknown" for a phase it does not know.
    #[test]
    fn a_phase_from_a_newer_agent_still_decodes() {
        let status = serde_json::json!({
            "device_id": "dev-1", "agent_version": "9.0.0",
            "deployments": {"web": {"desired_generation": 3, "observed_generation": 2, "phase": "verifying"}}
        });
        let mut bytes = Vec::new();
        ciborium::into_writer(&status, &mut bytes).unwrap();
        let decoded = crate::from_cbor::<AgentStatus>(&bytes, 1 << 20, "agent status").unwrap();
        let web = &decoded.deployments[&DeploymentName::new("web").unwrap()];
        assert_eq!(web.observed_generation, 2);
        assert_ne!(web.phase, Phase::Applied);
    }

    #[test]
    fn bounded_text_escapes_control_characters_and_cuts_on_a_char_boundary() {
        assert_eq!(bounded_text("plain", 512), "plain");
        assert_eq!(bounded_text("a\u{1b}[31mb\nc", 512), "a\\u{1b}[31mb\\nc");
        let cut = bounded_text(&"é".repeat(600), 512);
        assert!(cut.len() <= 512 && cut.ends_with('…'), "{}", cut.len());
        assert_eq!(bounded_text(&"x".repeat(512), 512).len(), 512, "exactly the limit is not cut");
    }

    fn status_with(deployments: usize, scores: usize) -> AgentStatus {
        let score = ScoreStatus {
            tag: "harmony.file/v1".into(),
            name: "n".repeat(2000),
            resource: "path:/x".into(),
            status: InterpretStatus::NOOP,
            message: "\u{7}".repeat(2000),
            details: vec!["d".repeat(100); 20],
            error_kind: None,
        };
        AgentStatus {
            device_id: DeviceId::new("dev-1").unwrap(),
            agent_version: "1".into(),
            updated_at_ms: 0,
            heartbeat_at_ms: 0,
            heartbeat_interval_ms: 0,
            info: None,
            deployments: (0..deployments)
                .map(|i| {
                    let name = DeploymentName::new(format!("d{i}")).unwrap();
                    (name, DeploymentStatus { scores: vec![score.clone(); scores], ..Default::default() })
                })
                .collect(),
            instance_id: String::new(),
            errors: Vec::new(),
            keyset_version: None,
            truncated: false,
        }
    }

    // Issue 6 §6: a status past the server's max payload stopped the device
    // reporting for good.
    #[test]
    fn a_status_is_bounded_in_every_string_and_as_a_whole() {
        let mut small = status_with(1, 1);
        small.bound(MAX_STATUS_BYTES);
        let score = &small.deployments.values().next().unwrap().scores[0];
        assert!(score.name.len() <= MAX_MESSAGE_BYTES && score.message.len() <= MAX_MESSAGE_BYTES);
        assert!(!score.message.contains('\u{7}'));
        assert_eq!(score.details.len(), MAX_DETAIL_LINES.min(20));
        assert!(!small.truncated);

        let mut huge = status_with(300, 50);
        huge.bound(MAX_STATUS_BYTES);
        assert!(crate::to_cbor(&huge).len() <= MAX_STATUS_BYTES);
        assert!(huge.truncated);
        assert!(!huge.deployments.is_empty(), "deployments are kept while Score lists can go");

        // The encoding handed back is the bounded report's, small or cut;
        // labels and host name from outside are bounded too.
        for (deployments, scores) in [(1, 1), (300, 50)] {
            let mut report = status_with(deployments, scores);
            report.info = Some(DeviceInfo {
                agent_version: "1".into(),
                scores: Vec::new(),
                hostname: "host\u{1b}[2J".into(),
                arch: String::new(),
                os: String::new(),
                labels: [("site\n".to_owned(), "x".repeat(2 * MAX_MESSAGE_BYTES))].into(),
                started_at_ms: 0,
                features: Vec::new(),
            });
            let encoded = report.to_bounded_cbor(MAX_STATUS_BYTES);
            assert_eq!(encoded, crate::to_cbor(&report));
            let info = report.info.as_ref().unwrap();
            assert!(!info.hostname.contains('\u{1b}'));
            assert!(info.labels.iter().all(|(k, v)| !k.contains('\n') && v.len() <= MAX_MESSAGE_BYTES));
        }
    }
}
