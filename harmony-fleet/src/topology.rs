//! `FleetTopology` and its capability `DeviceFleet`: where fleet automation Scores run.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;

use harmony_score_wire::{AgentStatus, DeploymentName, DeploymentStatus, DeviceId};
use harmony_topology::{async_trait, PreparationError, PreparationOutcome, Topology};

use crate::client::BucketAction;
use crate::{error_chain, Awaited, DeployRequest, Deployed, FleetClient, FleetError};

/// A fleet of devices that follow desired state: the capability a Score
/// needs to deploy to devices and learn how they fared. Named after the
/// concept, not the transport: a fleet over another store would implement it
/// the same way.
#[async_trait]
pub trait DeviceFleet: Send + Sync {
    /// Writes one deployment's desired state for one device.
    async fn write_desired_state(&self, request: DeployRequest) -> Result<Deployed, FleetError>;

    /// Writes many devices' deployments: one result per request, in order.
    /// By default [`write_desired_state`](Self::write_desired_state) for
    /// each, 32 at once; a fleet that can batch them does
    /// ([`FleetClient::deploy_many`]).
    async fn write_desired_states(&self, requests: Vec<DeployRequest>) -> Vec<Result<Deployed, FleetError>> {
        futures_util::stream::iter(requests)
            .map(|request| self.write_desired_state(request))
            .buffered(32)
            .collect()
            .await
    }

    /// The device's last reported status; `None` when it never reported.
    async fn read_status(&self, device: &DeviceId) -> Result<Option<AgentStatus>, FleetError>;

    /// Waits until the device reports exactly `generation` of `deployment`
    /// applied, with `digest` (when given) as the document it observed; fails
    /// when it reports that generation failed or rejected, when it moved past
    /// it ([`FleetError::Superseded`]), or after `timeout`.
    async fn wait_for_generation(
        &self,
        device: &DeviceId,
        deployment: &DeploymentName,
        generation: u64,
        digest: Option<&str>,
        timeout: Duration,
    ) -> Result<DeploymentStatus, FleetError>;

    /// [`wait_for_generation`](Self::wait_for_generation) for many devices
    /// at once: one result per awaited device, in order; the outer error is
    /// a failure to follow statuses at all.
    async fn wait_for_generations(
        &self,
        deployment: &DeploymentName,
        awaited: &[Awaited],
        timeout: Duration,
    ) -> Result<Vec<Result<DeploymentStatus, FleetError>>, FleetError>;
}

#[async_trait]
impl DeviceFleet for FleetClient {
    async fn write_desired_state(&self, request: DeployRequest) -> Result<Deployed, FleetError> {
        self.deploy(request).await
    }

    async fn write_desired_states(&self, requests: Vec<DeployRequest>) -> Vec<Result<Deployed, FleetError>> {
        self.deploy_many(requests).await
    }

    async fn read_status(&self, device: &DeviceId) -> Result<Option<AgentStatus>, FleetError> {
        Ok(self.device_status(device).await?.map(|(status, _)| status))
    }

    async fn wait_for_generation(
        &self,
        device: &DeviceId,
        deployment: &DeploymentName,
        generation: u64,
        digest: Option<&str>,
        timeout: Duration,
    ) -> Result<DeploymentStatus, FleetError> {
        FleetClient::wait_for_generation(self, device, deployment, generation, digest, timeout).await
    }

    async fn wait_for_generations(
        &self,
        deployment: &DeploymentName,
        awaited: &[Awaited],
        timeout: Duration,
    ) -> Result<Vec<Result<DeploymentStatus, FleetError>>, FleetError> {
        FleetClient::wait_for_generations(self, deployment, awaited, timeout).await
    }
}

/// The topology of a device fleet reached through NATS: fleet automation
/// Scores (`DeviceDeploymentScore`) run against it from an operator's machine.
#[derive(Debug, Clone)]
pub struct FleetTopology {
    client: FleetClient,
}

impl FleetTopology {
    /// Connects to the fleet's NATS (see [`FleetClient::connect`]).
    pub async fn connect(urls: &[String], creds: Option<&Path>) -> Result<Self, FleetError> {
        Ok(Self::from_client(FleetClient::connect(urls, creds).await?))
    }

    /// A topology over an existing client.
    pub fn from_client(client: FleetClient) -> Self {
        Self { client }
    }

    /// The client underneath.
    pub fn client(&self) -> &FleetClient {
        &self.client
    }
}

#[async_trait]
impl Topology for FleetTopology {
    fn name(&self) -> &str {
        "FleetTopology"
    }

    /// Ensures the fleet's buckets exist (creating or repairing them).
    async fn ensure_ready(&self) -> Result<PreparationOutcome, PreparationError> {
        let report =
            self.client.ensure_buckets().await.map_err(|e| PreparationError::new(error_chain(&e)))?;
        let changed: Vec<String> = report
            .iter()
            .filter(|r| r.action != BucketAction::Existed)
            .map(|r| format!("{} {:?}", r.bucket, r.action).to_lowercase())
            .collect();
        Ok(if changed.is_empty() {
            PreparationOutcome::Noop
        } else {
            PreparationOutcome::Success { details: changed.join(", ") }
        })
    }
}

#[async_trait]
impl DeviceFleet for FleetTopology {
    async fn write_desired_state(&self, request: DeployRequest) -> Result<Deployed, FleetError> {
        self.client.write_desired_state(request).await
    }

    async fn write_desired_states(&self, requests: Vec<DeployRequest>) -> Vec<Result<Deployed, FleetError>> {
        self.client.write_desired_states(requests).await
    }

    async fn read_status(&self, device: &DeviceId) -> Result<Option<AgentStatus>, FleetError> {
        self.client.read_status(device).await
    }

    async fn wait_for_generation(
        &self,
        device: &DeviceId,
        deployment: &DeploymentName,
        generation: u64,
        digest: Option<&str>,
        timeout: Duration,
    ) -> Result<DeploymentStatus, FleetError> {
        DeviceFleet::wait_for_generation(&self.client, device, deployment, generation, digest, timeout).await
    }

    async fn wait_for_generations(
        &self,
        deployment: &DeploymentName,
        awaited: &[Awaited],
        timeout: Duration,
    ) -> Result<Vec<Result<DeploymentStatus, FleetError>>, FleetError> {
        DeviceFleet::wait_for_generations(&self.client, deployment, awaited, timeout).await
    }
}
