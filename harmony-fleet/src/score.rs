//! `DeviceDeploymentScore`: fleet automation as a Score — deploy Scores to devices, optionally wait.

use std::time::Duration;

use harmony_score_wire::{
    from_cbor, try_to_cbor, Check, DeploymentName, DeploymentStatus, DeviceId, DeviceScore,
};
use harmony_topology::{
    async_trait, Id, Interpret, InterpretError, InterpretName, InterpretStatus, Inventory, Outcome, Score,
    Topology, Version,
};
use serde::{Deserialize, Serialize};

use crate::report::{check_lines, score_lines, scores_summary};
use crate::{error_chain, Awaited, DeployRequest, Deployed, DeviceFleet, FleetError};

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
    /// Health checks each device runs before it commits to the document
    /// (else it rolls back to its last good generation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health: Vec<Check>,
    /// Seconds the checks get to hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_timeout_s: Option<u64>,
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
            health: self.health.clone(),
            health_timeout_s: self.health_timeout_s,
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
    health: Vec<Check>,
    health_timeout_s: Option<u64>,
}

/// A device's failed result, saying why.
fn failed(line: String) -> DeviceResult {
    DeviceResult { status: InterpretStatus::FAILURE, line, scores: Vec::new() }
}

/// How one device fared.
struct DeviceResult {
    status: InterpretStatus,
    line: String,
    scores: Vec<String>,
}

impl DeviceDeploymentInterpret {
    /// One device's request, or the device's failed result.
    fn request(&self, device: &DeviceId) -> Result<DeployRequest, DeviceResult> {
        let scores = self.scores.copy().map_err(|err| failed(format!("cannot copy the scores: {err}")))?;
        Ok(DeployRequest::new(device.clone(), self.deployment.clone(), scores)
            .generation(self.generation)
            .expires_at(self.expires_at)
            .health(self.health.clone(), self.health_timeout_s)
            .force(self.force)
            .skip_unchanged(true))
    }

    /// A written device's result, given how its wait ended (`None`: not awaited).
    fn judged(deployed: &Deployed, waited: Option<Result<DeploymentStatus, FleetError>>) -> DeviceResult {
        let (status, verb) = if deployed.changed {
            (InterpretStatus::SUCCESS, "written")
        } else {
            (InterpretStatus::NOOP, "already deployed")
        };
        let generation = deployed.generation;
        match waited {
            None => {
                DeviceResult { status, line: format!("generation {generation} {verb}"), scores: Vec::new() }
            }
            // An unchanged document did not run again: its Score statuses are
            // those of the run that applied it, so they are not repeated.
            Some(Ok(_)) if !deployed.changed => DeviceResult {
                status,
                line: format!("generation {generation} {verb} and applied"),
                scores: Vec::new(),
            },
            Some(Ok(ds)) => DeviceResult {
                status,
                line: format!("generation {generation} {verb}, applied ({})", scores_summary(&ds.scores)),
                scores: [score_lines(&ds), check_lines(&ds)].concat(),
            },
            Some(Err(err)) => DeviceResult {
                status: InterpretStatus::FAILURE,
                line: format!("generation {generation} {verb}, not applied: {}", error_chain(&err)),
                scores: err
                    .deployment_status()
                    .map(|ds| [score_lines(ds), check_lines(ds)].concat())
                    .unwrap_or_default(),
            },
        }
    }

    /// Writes every device's document (many at once), then, with `wait`,
    /// waits for all of them with one follow of the status bucket: exactly
    /// the document written (generation and digest of the bytes stored).
    async fn deploy_all<T: DeviceFleet>(&self, fleet: &T) -> Vec<DeviceResult> {
        // Every device's request at once: the fleet batches their reads
        // and pipelines their writes.
        let mut requests = Vec::with_capacity(self.devices.len());
        let refused: Vec<Option<DeviceResult>> = self
            .devices
            .iter()
            .map(|device| match self.request(device) {
                Ok(request) => {
                    requests.push(request);
                    None
                }
                Err(failed) => Some(failed),
            })
            .collect();
        let mut results = fleet.write_desired_states(requests).await.into_iter();
        let written: Vec<Result<Deployed, DeviceResult>> = refused
            .into_iter()
            .map(|refused| match refused {
                Some(failed) => Err(failed),
                None => match results.next() {
                    Some(Ok(deployed)) => Ok(deployed),
                    Some(Err(err)) => Err(failed(format!("not deployed: {}", error_chain(&err)))),
                    None => Err(failed("not deployed: no result".to_owned())),
                },
            })
            .collect();
        let Some(timeout) = self.wait else {
            return written
                .into_iter()
                .map(|w| w.map_or_else(|failed| failed, |d| Self::judged(&d, None)))
                .collect();
        };
        let awaited: Vec<Awaited> = written
            .iter()
            .zip(&self.devices)
            .filter_map(|(w, device)| {
                w.as_ref().ok().map(|d| Awaited {
                    device: device.clone(),
                    generation: d.generation,
                    digest: Some(d.digest.clone()),
                })
            })
            .collect();
        let mut waits = match fleet.wait_for_generations(&self.deployment, &awaited, timeout).await {
            Ok(waits) => waits.into_iter(),
            Err(err) => {
                let text = error_chain(&err);
                let failed: Vec<_> =
                    awaited.iter().map(|_| Err(FleetError::WaitFailed(text.clone()))).collect();
                failed.into_iter()
            }
        };
        written
            .into_iter()
            .map(|w| match w {
                Ok(deployed) => Self::judged(&deployed, waits.next()),
                Err(failed) => failed,
            })
            .collect()
    }
}

#[async_trait]
impl<T: Topology + DeviceFleet> Interpret<T> for DeviceDeploymentInterpret {
    async fn execute(&self, _inventory: &Inventory, topology: &T) -> Result<Outcome, InterpretError> {
        let results = self.deploy_all(topology).await;
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
