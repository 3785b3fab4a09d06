//! `DesiredState`: one deployment's Scores for one device, at one generation.

use serde::{Deserialize, Serialize};

use crate::health::{Check, HealthCheckError, HealthPlan, SourcedCheck};
use crate::{DeploymentName, DeviceId, DeviceScore};

/// The document format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

fn format_version() -> u32 {
    FORMAT_VERSION
}

/// The desired state of one deployment on one device. The agent runs its
/// Scores in the order listed.
#[derive(Debug, Serialize, Deserialize)]
pub struct DesiredState {
    /// Document format, [`FORMAT_VERSION`].
    #[serde(default = "format_version")]
    pub format: u32,
    /// The device this document is for.
    pub device_id: DeviceId,
    /// The deployment, unique per device.
    pub deployment: DeploymentName,
    /// Increases with every change; the device applies only newer generations.
    pub generation: u64,
    /// When it was issued, in seconds since the Unix epoch (0: unknown).
    #[serde(default)]
    pub issued_at: u64,
    /// From this time on (seconds since the Unix epoch) the device refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The Scores, in the order they run.
    pub scores: Vec<Box<dyn DeviceScore>>,
    /// Checks that must hold after the Scores are applied before the
    /// device commits to this generation (else it rolls back to its last
    /// good one). Absent: not written, so documents without checks keep
    /// their bytes (and digests) as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health: Vec<Check>,
    /// Seconds the checks get to hold (default
    /// [`DEFAULT_HEALTH_TIMEOUT_S`](crate::health::DEFAULT_HEALTH_TIMEOUT_S)).
    /// Setting it alone asks for verification by the Scores' own checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_timeout_s: Option<u64>,
}

impl DesiredState {
    /// A document issued now.
    pub fn new(
        device_id: DeviceId,
        deployment: DeploymentName,
        generation: u64,
        scores: Vec<Box<dyn DeviceScore>>,
    ) -> Self {
        let issued_at =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self {
            format: FORMAT_VERSION,
            device_id,
            deployment,
            generation,
            issued_at,
            expires_at: None,
            scores,
            health: Vec::new(),
            health_timeout_s: None,
        }
    }

    /// Whether the device verifies this document before committing to it:
    /// it carries checks, or a `health_timeout_s`. Otherwise applied is
    /// committed, as for every document before checks existed.
    pub fn is_health_gated(&self) -> bool {
        !self.health.is_empty() || self.health_timeout_s.is_some()
    }

    /// The validated checks to run after an apply (the document's, then
    /// each Score's own through its [`HealthCheck`](crate::HealthCheck)
    /// companion) and their deadline; `None` when the document is not
    /// [gated](Self::is_health_gated).
    pub fn health_plan(&self) -> Result<Option<HealthPlan>, HealthCheckError> {
        if !self.is_health_gated() {
            return Ok(None);
        }
        let own =
            self.health.iter().map(|check| SourcedCheck { check: check.clone(), source: "document".into() });
        let contributed = self.scores.iter().flat_map(|score| {
            let source = score.name();
            score
                .health()
                .map(|companion| companion.health_checks())
                .unwrap_or_default()
                .into_iter()
                .map(move |check| SourcedCheck { check, source: source.clone() })
        });
        HealthPlan::validate(own.chain(contributed).collect(), self.health_timeout_s).map(Some)
    }
}

/// The value of a device's index key (`<device>._index`): every deployment
/// the operator wrote for it, with its generation. Written by the operator
/// with compare-and-set *before* each deployment key, so the device can
/// discover its deployments with direct gets alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentIndex {
    /// Deployment → generation last written.
    #[serde(default)]
    pub deployments: std::collections::BTreeMap<DeploymentName, u64>,
    /// Tombstones: deleted deployment → the last generation it had, so a
    /// deployment written again continues its numbering even after its key
    /// was purged (a device may remember the old generations).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub deleted: std::collections::BTreeMap<DeploymentName, u64>,
}

impl DeploymentIndex {
    /// The highest generation `deployment` ever had here, live or deleted.
    pub fn last_generation(&self, deployment: &DeploymentName) -> u64 {
        let live = self.deployments.get(deployment).copied().unwrap_or(0);
        live.max(self.deleted.get(deployment).copied().unwrap_or(0))
    }
}

/// The digest of a document's bytes as stored and sent: `sha256:<hex>`.
/// Operator and device compare it to know they mean the same document.
pub fn document_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in hash {
        out.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(byte & 15)]));
    }
    out
}
