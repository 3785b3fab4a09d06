//! Following the device's desired-state keys: index, direct gets, deduplication by revision.

use std::collections::{BTreeSet, HashMap};

use async_nats::jetstream::{self, kv, stream};
use harmony_score_wire::names::{
    desired_state_key, index_key, parse_desired_state_key, DESIRED_STATE_BUCKET,
};
use harmony_score_wire::{from_cbor, AgentStatus, DeploymentIndex, DeploymentName, DeviceId, Phase};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::daemon::Input;
use crate::reconcile::DocumentFormat;

/// What a key holds right now.
enum Latest {
    Value {
        revision: u64,
        value: bytes::Bytes,
    },
    /// Deleted or purged (a marker), or never written.
    Gone {
        revision: u64,
    },
}

/// Reads the device's keys and turns changes into [`Input`]s.
pub(super) struct Follower {
    device: DeviceId,
    stream: jetstream::stream::Stream<()>,
    inputs: mpsc::Sender<Input>,
    status: watch::Receiver<AgentStatus>,
    /// Revision last passed on per deployment, so an unchanged key is not decoded again.
    revisions: HashMap<DeploymentName, u64>,
}

impl Follower {
    pub(super) async fn new(
        js: &jetstream::Context,
        device: DeviceId,
        inputs: mpsc::Sender<Input>,
        status: watch::Receiver<AgentStatus>,
    ) -> Result<Self, jetstream::context::GetStreamError> {
        // No STREAM.INFO request: it would list every key of the bucket,
        // and a device's credentials do not allow it.
        let stream = js.get_stream_no_info(format!("KV_{DESIRED_STATE_BUCKET}")).await?;
        Ok(Self { device, stream, inputs, status, revisions: HashMap::new() })
    }

    /// A core notification arrived on `subject`: read what it points at.
    pub(super) async fn on_hint(&mut self, subject: &str) {
        let prefix = format!("$KV.{DESIRED_STATE_BUCKET}.");
        let Some((device, deployment)) = subject.strip_prefix(&prefix).and_then(parse_desired_state_key)
        else {
            debug!(subject, "ignored notification for a key of another shape");
            return;
        };
        if device != self.device {
            return;
        }
        let result = match deployment {
            Some(name) => self.sync_key(&name).await,
            None => self.sync_index(true).await,
        };
        if let Err(err) = result {
            warn!(subject, cause = %err, "cannot read key; retrying at the next resync");
        }
    }

    /// Reads the index and every known deployment's key.
    pub(super) async fn full_sync(&mut self) {
        if let Err(err) = self.sync_index(false).await {
            warn!(cause = %err, "cannot read desired state; retrying at the next resync");
        }
    }

    /// Reads the index; syncs the deployments it lists (only those whose
    /// listed generation is newer than the device's when `only_newer`) and,
    /// on a full pass, every deployment the device already knows.
    async fn sync_index(&mut self, only_newer: bool) -> Result<(), stream::DirectGetError> {
        let index = match self.read(&index_key(&self.device)).await? {
            Latest::Value { value, .. } => {
                from_cbor::<DeploymentIndex>(&value, 1024 * 1024, "deployment index").unwrap_or_else(|err| {
                    warn!(cause = %err, "index unreadable; following known deployments only");
                    DeploymentIndex::default()
                })
            }
            Latest::Gone { .. } => DeploymentIndex::default(),
        };
        let mut names = BTreeSet::new();
        {
            let status = self.status.borrow();
            for (name, generation) in index.deployments {
                let known = status.deployments.get(&name).map_or(0, |d| d.desired_generation);
                if !only_newer || generation > known {
                    names.insert(name);
                }
            }
            if !only_newer {
                names.extend(
                    status
                        .deployments
                        .iter()
                        .filter(|(_, d)| d.phase != Phase::Pruned)
                        .map(|(n, _)| n.clone()),
                );
            }
        }
        for name in names {
            self.sync_key(&name).await?;
        }
        Ok(())
    }

    async fn sync_key(&mut self, name: &DeploymentName) -> Result<(), stream::DirectGetError> {
        let input = match self.read(&desired_state_key(&self.device, name)).await? {
            Latest::Value { revision, value } => {
                if self.revisions.insert(name.clone(), revision) == Some(revision) {
                    return Ok(());
                }
                Input::Document {
                    deployment: name.clone(),
                    bytes: value.to_vec(),
                    format: DocumentFormat::Cbor,
                }
            }
            Latest::Gone { revision } => {
                if self.revisions.insert(name.clone(), revision) == Some(revision) {
                    return Ok(());
                }
                Input::Deleted { deployment: name.clone() }
            }
        };
        // The daemon only stops reading inputs when it shuts down.
        let _ = self.inputs.send(input).await;
        Ok(())
    }

    async fn read(&self, key: &str) -> Result<Latest, stream::DirectGetError> {
        match self.stream.direct_get_last_for_subject(format!("$KV.{DESIRED_STATE_BUCKET}.{key}")).await {
            Ok(message) => {
                let operation = message
                    .headers
                    .get("KV-Operation")
                    .and_then(|v| v.as_str().parse::<kv::Operation>().ok())
                    .unwrap_or(kv::Operation::Put);
                Ok(match operation {
                    kv::Operation::Put => {
                        Latest::Value { revision: message.sequence, value: message.payload }
                    }
                    kv::Operation::Delete | kv::Operation::Purge => {
                        Latest::Gone { revision: message.sequence }
                    }
                })
            }
            Err(err) if err.kind() == stream::DirectGetErrorKind::NotFound => {
                Ok(Latest::Gone { revision: 0 })
            }
            Err(err) => Err(err),
        }
    }
}
