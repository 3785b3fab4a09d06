//! `FleetError`: what can go wrong talking to a fleet, in variants callers branch on.

use std::time::Duration;

use harmony_score_wire::{
    bounded_text, DeploymentName, DeploymentStatus, DeviceId, EncodeError, ValueDecodeError,
    MAX_MESSAGE_BYTES,
};

/// The boxed cause of a failed NATS operation (async-nats has one error type per operation).
pub type NatsError = Box<dyn std::error::Error + Send + Sync>;

/// Why a fleet operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// No NATS server could be reached with the given URLs and credentials.
    #[error("cannot connect to NATS at {urls}")]
    ConnectFailed {
        /// The URLs tried, comma-separated.
        urls: String,
        /// Why.
        #[source]
        source: NatsError,
    },
    /// The credentials file could not be read.
    #[error("cannot read NATS credentials {path}")]
    CredentialsFailed {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A NATS or JetStream operation failed.
    #[error("{op} failed")]
    Nats {
        /// What was being done (`"create bucket harmony-desired-state"`).
        op: String,
        /// The client's error.
        #[source]
        source: NatsError,
    },
    /// No agent answers on the device's command subject (NATS "no responders").
    #[error("device offline: no agent of {device} answered")]
    DeviceOffline {
        /// The device.
        device: DeviceId,
    },
    /// Statuses could not be followed at all while waiting for many devices
    /// (the cause, shared by every device of the wait).
    #[error("cannot follow device statuses: {0}")]
    WaitFailed(String),
    /// Nothing conclusive happened in time.
    #[error("timed out after {}s waiting for {what}", after.as_secs_f64())]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        after: Duration,
        /// The deployment's last status seen while waiting, if any.
        last: Option<Box<DeploymentStatus>>,
    },
    /// A device's reply could not be decoded or does not answer the request.
    #[error("bad reply on {subject}: {message}")]
    BadReply {
        /// The request subject.
        subject: String,
        /// What is wrong with it.
        message: String,
    },
    /// A value in a bucket could not be decoded.
    #[error("bad value under key {key}")]
    BadValue {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: ValueDecodeError,
    },
    /// A stored desired-state document could not be decoded.
    #[error("bad document under key {key}")]
    BadDocument {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: harmony_score_wire::DecodeError,
    },
    /// Not a key set the fleet's devices could accept; nothing was written.
    #[error("invalid key set: {message}")]
    InvalidKeySet {
        /// What is wrong with it.
        message: String,
    },
    /// A compare-and-set write lost to concurrent writers too many times.
    #[error("conflict on {key}: {reason}")]
    Conflict {
        /// The key.
        key: String,
        /// What conflicted.
        reason: String,
    },
    /// An explicit generation that is not newer than the key's; nothing was written.
    #[error("generation {requested} for {key} is not newer than its current generation {current}")]
    StaleGeneration {
        /// The key.
        key: String,
        /// The key's generation.
        current: u64,
        /// The generation asked for.
        requested: u64,
    },
    /// The key no longer holds the generation the request was conditioned
    /// on ([`DeployRequest::if_generation`](crate::DeployRequest#structfield.if_generation));
    /// nothing was written.
    #[error("{key} holds generation {found}, not {expected}; nothing written")]
    GenerationMoved {
        /// The key.
        key: String,
        /// The generation the request expected (`0`: no document).
        expected: u64,
        /// The generation the key holds (`0`: no document, or none this client counts).
        found: u64,
    },
    /// The key's generation is already `u64::MAX`: no newer generation exists,
    /// so nothing was written (deploy under another deployment name).
    #[error("{key} is at the last generation ({}); no newer one can be written", u64::MAX)]
    GenerationExhausted {
        /// The key.
        key: String,
    },
    /// The device did not list these Score tags as supported; nothing was written.
    #[error("device {device} does not support score tags {} (use --force to deploy anyway)", tags.join(", "))]
    UnsupportedScores {
        /// The device.
        device: DeviceId,
        /// The tags it lacks, sorted.
        tags: Vec<String>,
    },
    /// The device's agent does not list a feature the document needs (an
    /// older agent would ignore its health checks); nothing was written.
    #[error(
        "device {device} does not support {feature} (its agent would ignore it; upgrade it, or use --force)"
    )]
    UnsupportedFeature {
        /// The device.
        device: DeviceId,
        /// The feature (`health/v1`).
        feature: String,
    },
    /// The device never reported which Scores it supports; nothing was written.
    #[error("device {device} has never reported the score tags it supports (use --force to deploy anyway)")]
    NoDeviceInfo {
        /// The device.
        device: DeviceId,
    },
    /// The device refused the document or failed to apply it.
    #[error("{device}/{deployment}: {}", describe_failure(status))]
    DeploymentFailed {
        /// The device.
        device: DeviceId,
        /// The deployment.
        deployment: DeploymentName,
        /// The device's status of the deployment.
        status: Box<DeploymentStatus>,
    },
    /// The device moved past the awaited document without applying it: it
    /// reports a newer desired or observed generation, or the awaited
    /// generation with another document (digest). The wait can never succeed.
    #[error("{device}/{deployment}: generation {awaited} was superseded: {}", describe_current(current))]
    Superseded {
        /// The device.
        device: DeviceId,
        /// The deployment.
        deployment: DeploymentName,
        /// The generation waited for.
        awaited: u64,
        /// The device's status of the deployment.
        current: Box<DeploymentStatus>,
    },
    /// Not an artifact that can be uploaded (a name Scores cannot hold, a
    /// file that changed during the upload); nothing usable was written.
    #[error("invalid artifact: {message}")]
    InvalidArtifact {
        /// What is wrong.
        message: String,
    },
    /// The artifact name holds other content; nothing was written (Scores
    /// already deployed may name that content's digest).
    #[error("artifact {name} already holds other content (sha256 {sha256}); use another name, or --replace")]
    ArtifactExists {
        /// The name.
        name: String,
        /// What it holds.
        sha256: String,
    },
    /// A local file could not be read.
    #[error("cannot read {}", path.display())]
    ReadFailed {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The device did not return the container's logs.
    #[error("{device}: no logs of {container}: {}{message}", kind.map(|k| format!("{k}: ")).unwrap_or_default())]
    LogsRefused {
        /// The device.
        device: DeviceId,
        /// The container asked for.
        container: String,
        /// Why, when the device said (`not_managed`, `not_found`); `None`
        /// from an agent without the verb.
        kind: Option<harmony_score_wire::LogsErrorKind>,
        /// The device's message (bounded, escaped).
        message: String,
    },
    /// The document could not be encoded, or a device would reject it (an
    /// invalid Score, two Scores owning one resource); nothing was written.
    #[error("cannot encode the document")]
    EncodeFailed(#[source] EncodeError),
    /// A rollout cannot start or resume as asked (another one runs, nothing
    /// to resume, waves that do not reach every device, no device selected).
    #[error("rollout of {deployment}: {reason}")]
    RolloutRefused {
        /// The deployment.
        deployment: DeploymentName,
        /// Why (bounded, escaped).
        reason: String,
    },
    /// Another operator process wrote the rollout's state since this one
    /// last did (it resumed the rollout): this one stops writing.
    #[error("rollout of {deployment} was taken over by another operator ({owner}); this one stopped")]
    RolloutTakenOver {
        /// The deployment.
        deployment: DeploymentName,
        /// Who holds it now, as it says (bounded, escaped).
        owner: String,
    },
}

impl FleetError {
    pub(crate) fn nats(op: impl Into<String>, source: impl Into<NatsError>) -> Self {
        FleetError::Nats { op: op.into(), source: source.into() }
    }

    /// The deployment status this error carries (a failed or timed-out wait).
    pub fn deployment_status(&self) -> Option<&DeploymentStatus> {
        match self {
            FleetError::DeploymentFailed { status, .. } => Some(status),
            FleetError::Superseded { current, .. } => Some(current),
            FleetError::Timeout { last, .. } => last.as_deref(),
            _ => None,
        }
    }
}

// Everything below echoes device-written text: bounded and escaped, since a
// device's status is not trusted to be short or printable.

fn describe_failure(status: &DeploymentStatus) -> String {
    let phase = status.phase.as_str();
    let mut text = format!("generation {} {phase}", status.desired_generation);
    if let Some(err) = &status.error {
        text.push_str(&format!(
            " ({}: {})",
            err.kind.as_str(),
            bounded_text(&err.message, MAX_MESSAGE_BYTES)
        ));
    }
    let failed: Vec<_> = status
        .scores
        .iter()
        .filter(|s| !s.is_settled())
        .map(|s| bounded_text(&s.name, MAX_MESSAGE_BYTES))
        .collect();
    if !failed.is_empty() {
        text.push_str(&format!("; failed: {}", failed.join(", ")));
    }
    let checks: Vec<_> = status
        .health
        .iter()
        .filter(|c| c.state == harmony_score_wire::CheckState::Failed)
        .map(|c| bounded_text(&c.check, MAX_MESSAGE_BYTES))
        .collect();
    if !checks.is_empty() {
        text.push_str(&format!("; failed checks: {}", checks.join(", ")));
    }
    text
}

fn describe_current(status: &DeploymentStatus) -> String {
    let phase = status.phase.as_str();
    format!(
        "the device reports desired generation {}{}, observed {}{}, {phase}",
        status.desired_generation,
        short_digest(status.desired_digest.as_deref()),
        status.observed_generation,
        short_digest(status.observed_digest.as_deref()),
    )
}

/// ` (sha256:0123456789ab)`: enough of a digest to tell documents apart.
pub(crate) fn short_digest(digest: Option<&str>) -> String {
    match digest {
        Some(digest) => {
            let shown: String = digest.chars().take("sha256:".len() + 12).collect();
            format!(" ({})", bounded_text(&shown, 64))
        }
        None => String::new(),
    }
}

/// An error and its causes on one line (`a: b: c`), for people and status lines.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their source's text in their own; say it once.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
