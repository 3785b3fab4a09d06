//! `DeviceDeploymentScore`: fleet automation as a Score — deploy Scores to devices, optionally wait.

use std::time::Duration;

use futures_util::StreamExt;
use harmony_score_wire::{from_cbor, try_to_cbor, DeploymentName, DeviceId, DeviceScore};
use harmony_topology::{
    async_trait, Id, Interpret, InterpretError, InterpretName, InterpretStatus, Inventory, Outcome, Score,
    Topology, Version,
};
use serde::{Deserialize, Serialize};

use crate::report::{score_lines, scores_summary};
use crate::{error_chain, DeployRequest, DeviceFleet};

/// How many devices are deployed to (and waited for) at once.
const PARALLEL_DEVICES: usize = 32;

/// Deploys one deployment — the same device Scores — to each of `devices`,
/// and with `wait` waits until each device reports exactly that document
/// (generation and digest) applied; a device that moved past it fails.
///
/// Each device's key gets its next generation, unless the deployed document
/// already holds these Scores: then nothing is written and that device
/// reports NOOP. A device that did not list a Score tag as supported is
/// refused (FAILURE) unless `force`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceDeploymentScore {
    /// The devices to deploy to.
    pub devices: Vec<DeviceId>,
    /// The deployment's name on every device.
    pub deployment: DeploymentName,
    /// The device Scores, in the order devices run them.
    pub scores: Vec<Box<dyn DeviceScore>>,
    /// Seconds to wait for each device to apply its generation; `None`: do not wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<u64>,
    /// Deploy even Score tags a device did not list as supported.
    #[serde(default)]
    pub force: bool,
    /// Write this exact generation on every device (normally `None`: each
    /// key's next; an explicit generation is always written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// When devices should stop accepting the document (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

impl<T: Topology + DeviceFleet> Score<T> for DeviceDeploymentScore {
    fn create_interpret(&self) -> Box<dyn Interpret<T>> {
        Box::new(DeviceDeploymentInterpret {
            devices: self.devices.clone(),
            deployment: self.deployment.clone(),
            scores: WireScores(try_to_cbor(&self.scores).map_err(|e| e.to_string())),
            wait: self.wait.map(Duration::from_secs),
            force: self.force,
            generation: self.generation,
            expires_at: self.expires_at,
        })
    }

    fn name(&self) -> String {
        format!("device deployment [{}]", self.deployment)
    }
}

/// The Scores in their wire form: a `Box<dyn DeviceScore>` has no `Clone`,
/// and each device's document needs its own copy.
struct WireScores(Result<Vec<u8>, String>);

impl std::fmt::Debug for WireScores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Ok(bytes) => write!(f, "<{} bytes of CBOR>", bytes.len()),
            Err(err) => write!(f, "<not encodable: {err}>"),
        }
    }
}

impl WireScores {
    fn copy(&self) -> Result<Vec<Box<dyn DeviceScore>>, String> {
        let bytes = self.0.as_ref().map_err(Clone::clone)?;
        from_cbor(bytes, usize::MAX, "scores").map_err(|e| e.to_string())
    }
}

/// Runs a [`DeviceDeploymentScore`] against a [`DeviceFleet`].
#[derive(Debug)]
pub struct DeviceDeploymentInterpret {
    devices: Vec<DeviceId>,
    deployment: DeploymentName,
    scores: WireScores,
    wait: Option<Duration>,
    force: bool,
    generation: Option<u64>,
    expires_at: Option<u64>,
}

/// How one device fared.
struct DeviceResult {
    status: InterpretStatus,
    line: String,
    scores: Vec<String>,
}

impl DeviceDeploymentInterpret {
    async fn deploy_one<T: DeviceFleet>(&self, fleet: &T, device: &DeviceId) -> DeviceResult {
        let failed = |line: String, scores| DeviceResult { status: InterpretStatus::FAILURE, line, scores };
        let scores = match self.scores.copy() {
            Ok(scores) => scores,
            Err(err) => return failed(format!("cannot copy the scores: {err}"), Vec::new()),
        };
        let request = DeployRequest::new(device.clone(), self.deployment.clone(), scores)
            .generation(self.generation)
            .expires_at(self.expires_at)
            .force(self.force)
            .skip_unchanged(true);
        let deployed = match fleet.write_desired_state(request).await {
            Ok(deployed) => deployed,
            Err(err) => return failed(format!("not deployed: {}", error_chain(&err)), Vec::new()),
        };
        let (status, verb) = if deployed.changed {
            (InterpretStatus::SUCCESS, "written")
        } else {
            (InterpretStatus::NOOP, "already deployed")
        };
        let generation = deployed.generation;
        let Some(timeout) = self.wait else {
            return DeviceResult {
                status,
                line: format!("generation {generation} {verb}"),
                scores: Vec::new(),
            };
        };
        // Exactly this document: the generation and the digest of the bytes stored.
        match fleet
            .wait_for_generation(device, &self.deployment, generation, Some(&deployed.digest), timeout)
            .await
        {
            // An unchanged document did not run again: its Score statuses are
            // those of the run that applied it, so they are not repeated.
            Ok(_) if !deployed.changed => DeviceResult {
                status,
                line: format!("generation {generation} {verb} and applied"),
                scores: Vec::new(),
            },
            Ok(ds) => DeviceResult {
                status,
                line: format!("generation {generation} {verb}, applied ({})", scores_summary(&ds.scores)),
                scores: score_lines(&ds),
            },
            Err(err) => {
                let scores = err.deployment_status().map(score_lines).unwrap_or_default();
                failed(format!("generation {generation} {verb}, not applied: {}", error_chain(&err)), scores)
            }
        }
    }
}

#[async_trait]
impl<T: Topology + DeviceFleet> Interpret<T> for DeviceDeploymentInterpret {
    async fn execute(&self, _inventory: &Inventory, topology: &T) -> Result<Outcome, InterpretError> {
        // Indices rather than `&DeviceId`s: a closure over references trips
        // the higher-ranked lifetime check of async-trait's boxed future.
        let results: Vec<DeviceResult> = futures_util::stream::iter(0..self.devices.len())
            .map(|i| self.deploy_one(topology, &self.devices[i]))
            .buffered(PARALLEL_DEVICES)
            .collect()
            .await;
        let count = |status| results.iter().filter(|r| r.status == status).count();
        let (failed, noop) = (count(InterpretStatus::FAILURE), count(InterpretStatus::NOOP));
        let status = if failed > 0 {
            InterpretStatus::FAILURE
        } else if noop == results.len() {
            InterpretStatus::NOOP
        } else {
            InterpretStatus::SUCCESS
        };
        let mut details = Vec::new();
        for (device, result) in self.devices.iter().zip(&results) {
            details.push(format!("{device}: {} {}", result.status, result.line));
            details.extend(result.scores.iter().map(|line| format!("  {line}")));
        }
        let message = format!(
            "{}: {} of {} devices failed, {} changed, {} unchanged",
            self.deployment,
            failed,
            results.len(),
            count(InterpretStatus::SUCCESS),
            noop
        );
        Ok(Outcome { status, message, details })
    }

    fn get_name(&self) -> InterpretName {
        InterpretName::Custom("DeviceDeployment")
    }

    fn get_version(&self) -> Version {
        Version::from("1.0.0")
    }

    fn get_status(&self) -> InterpretStatus {
        InterpretStatus::QUEUED
    }

    fn get_children(&self) -> Vec<Id> {
        Vec::new()
    }
}
