//! `RolloutStore`: what a staged rollout needs of a fleet besides
//! `DeviceFleet`: device labels, the documents devices hold, and the
//! rollouts bucket where a rollout keeps its state (compare-and-set).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{kv, stream};
use futures_util::StreamExt;
use harmony_score_wire::names::ROLLOUTS_BUCKET;
use harmony_score_wire::{
    bounded_text, from_cbor, now_ms, try_to_cbor, Check, DeploymentName, DeploymentStatus, DeviceId,
    DeviceScore,
};
use harmony_topology::async_trait;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::plan::RolloutState;
use crate::client::{server_ms, BucketAction, MAX_VALUE_BYTES};
use crate::{Awaited, DeviceFleet, FleetClient, FleetError, FleetTopology};

/// The document a rollout writes, or one a device had before it: what a
/// [`DeployRequest`](crate::DeployRequest) needs besides the device.
#[derive(Debug, Serialize, Deserialize)]
pub struct RolloutDocument {
    /// The device Scores.
    pub scores: Vec<Box<dyn DeviceScore>>,
    /// The document's own health checks.
    #[serde(default)]
    pub health: Vec<Check>,
    /// Seconds the checks get.
    #[serde(default)]
    pub health_timeout_s: Option<u64>,
    /// When devices stop accepting it.
    #[serde(default)]
    pub expires_at: Option<u64>,
}

impl RolloutDocument {
    /// Its CBOR form and the digest that names it (`sha256:…` of those bytes).
    pub fn encoded(&self) -> Result<(Vec<u8>, String), FleetError> {
        let bytes = try_to_cbor(self).map_err(FleetError::EncodeFailed)?;
        let digest = harmony_score_wire::document_digest(&bytes);
        Ok((bytes, digest))
    }

    /// A copy (a `Box<dyn DeviceScore>` has no `Clone`).
    pub fn copy(&self) -> Result<Self, FleetError> {
        let (bytes, _) = self.encoded()?;
        decode_document(&bytes, "rollout document")
    }
}

fn decode_document(bytes: &[u8], key: &str) -> Result<RolloutDocument, FleetError> {
    from_cbor(bytes, MAX_VALUE_BYTES, "rollout document")
        .map_err(|source| FleetError::BadValue { key: key.to_owned(), source })
}

/// A rollout state as stored: its value, its revision (what the next
/// compare-and-set write names) and how long ago the server stored it.
#[derive(Debug, Clone)]
pub struct StoredRollout {
    /// The state.
    pub state: RolloutState,
    /// Its revision in the bucket.
    pub revision: u64,
    /// Since the server stored it (by this machine's clock).
    pub age: Duration,
}

/// Called with each awaited device's index and result as soon as it concludes.
pub type OnDone<'a> = &'a (dyn Fn(usize, &Result<DeploymentStatus, FleetError>) + Send + Sync);

/// The capability a staged rollout needs, beside [`DeviceFleet`].
#[async_trait]
pub trait RolloutStore: DeviceFleet {
    /// Every device that published its info, with its labels.
    async fn device_labels(&self) -> Result<Vec<(DeviceId, BTreeMap<String, String>)>, FleetError>;

    /// The document each of `devices` holds for `deployment` and its
    /// generation (`None` when none), one result per device in order, read
    /// in batches rather than one round trip per device. `Err` as a whole
    /// when the bucket cannot be reached.
    async fn current_documents(
        &self,
        devices: &[DeviceId],
        deployment: &DeploymentName,
    ) -> Result<Vec<Result<Option<(RolloutDocument, u64)>, FleetError>>, FleetError>;

    /// Deletes the deployment from the device; `false` when it held none.
    async fn delete_deployment(
        &self,
        device: &DeviceId,
        deployment: &DeploymentName,
    ) -> Result<bool, FleetError>;

    /// [`DeviceFleet::wait_for_generations`], telling `on_done` of each
    /// device as soon as it concludes.
    async fn wait_reporting(
        &self,
        deployment: &DeploymentName,
        awaited: &[Awaited],
        timeout: Duration,
        on_done: OnDone<'_>,
    ) -> Result<Vec<Result<DeploymentStatus, FleetError>>, FleetError>;

    /// The rollout of `deployment`; `None` when there never was one.
    async fn load_rollout(&self, deployment: &DeploymentName) -> Result<Option<StoredRollout>, FleetError>;

    /// Writes `state` if its key is still at `revision` (0: no message at
    /// all); the new revision, or [`FleetError::RolloutTakenOver`].
    async fn save_rollout(&self, state: &RolloutState, revision: u64) -> Result<u64, FleetError>;

    /// Every rollout, by deployment: its state, or why the value under its
    /// key is not a usable one (one bad value does not hide the others).
    async fn list_rollouts(
        &self,
    ) -> Result<Vec<(DeploymentName, Result<StoredRollout, FleetError>)>, FleetError>;

    /// Stores a document beside the rollout under `name` (`doc.<sha256>`, `prev.<sha256>`).
    async fn save_document(
        &self,
        deployment: &DeploymentName,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<(), FleetError>;

    /// A document stored beside the rollout, and its digest.
    async fn load_document(
        &self,
        deployment: &DeploymentName,
        name: &str,
    ) -> Result<(RolloutDocument, String), FleetError>;

    /// Purges every document stored beside the rollout of `deployment` but
    /// `keep` (an earlier rollout's document and previous documents);
    /// returns how many.
    async fn prune_documents(&self, deployment: &DeploymentName, keep: &str) -> Result<usize, FleetError>;
}

fn document_key(deployment: &DeploymentName, name: &str) -> String {
    format!("{deployment}.{name}")
}

impl FleetClient {
    /// The rollouts bucket, created when missing (one value per key: only
    /// the newest state matters, and compare-and-set needs no history).
    pub(crate) async fn ensure_rollouts_bucket(&self) -> Result<BucketAction, FleetError> {
        let name = ROLLOUTS_BUCKET;
        match self.stream_exists(&format!("KV_{name}")).await? {
            Some(existing) => self.rescale(name, &existing.cached_info().config).await,
            None => {
                self.js
                    .create_key_value(kv::Config {
                        bucket: name.to_owned(),
                        description: "Harmony staged rollouts: <deployment> -> state (CBOR)".into(),
                        history: 1,
                        storage: stream::StorageType::File,
                        num_replicas: self.new_bucket_replicas(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| FleetError::nats(format!("create bucket {name}"), e))?;
                info!(bucket = name, "created bucket");
                Ok(BucketAction::Created)
            }
        }
    }

    /// The rollouts bucket if it exists, opened but never created.
    async fn existing_rollouts(&self) -> Result<Option<kv::Store>, FleetError> {
        if let Some(store) = self.rollouts.get() {
            return Ok(Some(store.clone()));
        }
        if self.stream_exists(&format!("KV_{ROLLOUTS_BUCKET}")).await?.is_none() {
            return Ok(None);
        }
        let store = self
            .js
            .get_key_value(ROLLOUTS_BUCKET)
            .await
            .map_err(|e| FleetError::nats(format!("open bucket {ROLLOUTS_BUCKET}"), e))?;
        Ok(Some(store))
    }

    /// The rollouts bucket, ensured and opened on first use (then shared
    /// by this client and its clones: a rollout writes its state every few
    /// seconds, and each write need not look the stream up again).
    async fn rollouts(&self) -> Result<kv::Store, FleetError> {
        let store = self
            .rollouts
            .get_or_try_init(|| async {
                if self.stream_exists(&format!("KV_{ROLLOUTS_BUCKET}")).await?.is_none() {
                    self.ensure_rollouts_bucket().await?;
                }
                self.js
                    .get_key_value(ROLLOUTS_BUCKET)
                    .await
                    .map_err(|e| FleetError::nats(format!("open bucket {ROLLOUTS_BUCKET}"), e))
            })
            .await?;
        Ok(store.clone())
    }
}

/// A state read from the bucket under `key`, checked.
fn decode_state_value(key: &str, value: &[u8]) -> Result<RolloutState, FleetError> {
    let state: RolloutState = from_cbor(value, MAX_VALUE_BYTES, "rollout state")
        .map_err(|source| FleetError::BadValue { key: key.to_owned(), source })?;
    let checked = match state.check() {
        // The key decides which rollout it is: a state copied from another
        // key would have `--resume` write another deployment.
        Ok(()) if state.deployment.as_str() != key => {
            Err(format!("it is the state of deployment {}", state.deployment))
        }
        checked => checked,
    };
    match checked {
        Ok(()) => Ok(state),
        Err(reason) => Err(FleetError::RolloutRefused {
            deployment: state.deployment.clone(),
            reason: bounded_text(&format!("its stored state under {key} is not usable: {reason}"), 512),
        }),
    }
}

fn decode_state(key: &str, entry: &kv::Entry) -> Result<StoredRollout, FleetError> {
    let state = decode_state_value(key, &entry.value)?;
    let age = Duration::from_millis(now_ms().saturating_sub(server_ms(entry)));
    Ok(StoredRollout { state, revision: entry.revision, age })
}

#[async_trait]
impl RolloutStore for FleetClient {
    async fn device_labels(&self) -> Result<Vec<(DeviceId, BTreeMap<String, String>)>, FleetError> {
        Ok(self
            .list_statuses()
            .await?
            .into_iter()
            .filter_map(|s| s.info.map(|info| (s.device_id, info.labels)))
            .collect())
    }

    async fn current_documents(
        &self,
        devices: &[DeviceId],
        deployment: &DeploymentName,
    ) -> Result<Vec<Result<Option<(RolloutDocument, u64)>, FleetError>>, FleetError> {
        let found = self.desired_states(devices, deployment).await?;
        Ok(found
            .into_iter()
            .map(|doc| {
                Ok(doc?.map(|doc| {
                    let document = RolloutDocument {
                        scores: doc.scores,
                        health: doc.health,
                        health_timeout_s: doc.health_timeout_s,
                        expires_at: doc.expires_at,
                    };
                    (document, doc.generation)
                }))
            })
            .collect())
    }

    async fn delete_deployment(
        &self,
        device: &DeviceId,
        deployment: &DeploymentName,
    ) -> Result<bool, FleetError> {
        self.delete(device, deployment).await
    }

    async fn wait_reporting(
        &self,
        deployment: &DeploymentName,
        awaited: &[Awaited],
        timeout: Duration,
        on_done: OnDone<'_>,
    ) -> Result<Vec<Result<DeploymentStatus, FleetError>>, FleetError> {
        self.wait_for_generations_reporting(deployment, awaited, timeout, on_done).await
    }

    async fn load_rollout(&self, deployment: &DeploymentName) -> Result<Option<StoredRollout>, FleetError> {
        let store = self.rollouts().await?;
        let key = deployment.to_string();
        match store.entry(&key).await.map_err(|e| FleetError::nats(format!("read rollout {key}"), e))? {
            Some(entry) if entry.operation == kv::Operation::Put => decode_state(&key, &entry).map(Some),
            _ => Ok(None),
        }
    }

    async fn save_rollout(&self, state: &RolloutState, revision: u64) -> Result<u64, FleetError> {
        let store = self.rollouts().await?;
        let key = state.deployment.to_string();
        let bytes = state.encode_within(MAX_VALUE_BYTES).map_err(|size| FleetError::RolloutRefused {
            deployment: state.deployment.clone(),
            reason: format!(
                "its state takes {size} bytes, more than the {MAX_VALUE_BYTES} one value may hold"
            ),
        })?;
        match store.update(&key, bytes.into(), revision).await {
            Ok(written) => return Ok(written),
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
            Err(err) => return Err(FleetError::nats(format!("write rollout {key}"), err)),
        }
        let owner = match self.load_rollout(&state.deployment).await {
            Ok(Some(now)) => bounded_text(&now.state.owner, 128),
            _ => "unknown".into(),
        };
        Err(FleetError::RolloutTakenOver { deployment: state.deployment.clone(), owner })
    }

    /// Read like statuses (batched direct gets of the keys of one token,
    /// no consumer), from the bucket only if it exists: listing creates
    /// nothing, so the read-only monitor may list too.
    async fn list_rollouts(
        &self,
    ) -> Result<Vec<(DeploymentName, Result<StoredRollout, FleetError>)>, FleetError> {
        let Some(store) = self.existing_rollouts().await? else { return Ok(Vec::new()) };
        // Documents beside the states (`<deployment>.doc.<sha256>`) have three tokens.
        let mut found = Vec::new();
        for (key, entry) in self.every_latest(&store, "*", "rollouts").await? {
            let Ok(deployment) = DeploymentName::new(key.as_str()) else { continue };
            match entry {
                Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                    found.push((deployment, decode_state(&key, &entry)));
                }
                Ok(_) => {}
                Err(err) => found.push((deployment, Err(err))),
            }
        }
        Ok(found)
    }

    async fn save_document(
        &self,
        deployment: &DeploymentName,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<(), FleetError> {
        let key = document_key(deployment, name);
        self.rollouts()
            .await?
            .put(&key, bytes.into())
            .await
            .map_err(|e| FleetError::nats(format!("write {key}"), e))?;
        Ok(())
    }

    async fn load_document(
        &self,
        deployment: &DeploymentName,
        name: &str,
    ) -> Result<(RolloutDocument, String), FleetError> {
        let key = document_key(deployment, name);
        let value = self
            .rollouts()
            .await?
            .get(&key)
            .await
            .map_err(|e| FleetError::nats(format!("read {key}"), e))?
            .ok_or_else(|| FleetError::RolloutRefused {
                deployment: deployment.clone(),
                reason: format!("its document {key} is missing"),
            })?;
        let digest = harmony_score_wire::document_digest(&value);
        Ok((decode_document(&value, &key)?, digest))
    }

    async fn prune_documents(&self, deployment: &DeploymentName, keep: &str) -> Result<usize, FleetError> {
        let store = self.rollouts().await?;
        let prefix = format!("{deployment}.");
        let keep = document_key(deployment, keep);
        let mut keys = store.keys().await.map_err(|e| FleetError::nats("list rollout documents", e))?;
        let mut stale = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| FleetError::nats("list rollout documents", e))?;
            if key.starts_with(&prefix) && key != keep {
                stale.push(key);
            }
        }
        for key in &stale {
            store.purge(key).await.map_err(|e| FleetError::nats(format!("purge {key}"), e))?;
        }
        Ok(stale.len())
    }
}

#[async_trait]
impl RolloutStore for FleetTopology {
    async fn device_labels(&self) -> Result<Vec<(DeviceId, BTreeMap<String, String>)>, FleetError> {
        self.client().device_labels().await
    }

    async fn current_documents(
        &self,
        devices: &[DeviceId],
        deployment: &DeploymentName,
    ) -> Result<Vec<Result<Option<(RolloutDocument, u64)>, FleetError>>, FleetError> {
        self.client().current_documents(devices, deployment).await
    }

    async fn delete_deployment(
        &self,
        device: &DeviceId,
        deployment: &DeploymentName,
    ) -> Result<bool, FleetError> {
        self.client().delete(device, deployment).await
    }

    async fn wait_reporting(
        &self,
        deployment: &DeploymentName,
        awaited: &[Awaited],
        timeout: Duration,
        on_done: OnDone<'_>,
    ) -> Result<Vec<Result<DeploymentStatus, FleetError>>, FleetError> {
        self.client().wait_reporting(deployment, awaited, timeout, on_done).await
    }

    async fn load_rollout(&self, deployment: &DeploymentName) -> Result<Option<StoredRollout>, FleetError> {
        self.client().load_rollout(deployment).await
    }

    async fn save_rollout(&self, state: &RolloutState, revision: u64) -> Result<u64, FleetError> {
        self.client().save_rollout(state, revision).await
    }

    async fn list_rollouts(
        &self,
    ) -> Result<Vec<(DeploymentName, Result<StoredRollout, FleetError>)>, FleetError> {
        self.client().list_rollouts().await
    }

    async fn save_document(
        &self,
        deployment: &DeploymentName,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<(), FleetError> {
        self.client().save_document(deployment, name, bytes).await
    }

    async fn load_document(
        &self,
        deployment: &DeploymentName,
        name: &str,
    ) -> Result<(RolloutDocument, String), FleetError> {
        self.client().load_document(deployment, name).await
    }

    async fn prune_documents(&self, deployment: &DeploymentName, keep: &str) -> Result<usize, FleetError> {
        self.client().prune_documents(deployment, keep).await
    }
}

#[cfg(test)]
mod tests {
    use harmony_score_wire::to_cbor;

    use super::*;

    // The state under key `web` that names deployment `db`: resuming `web`
    // would write `db` on every device (and CAS `db`'s key with `web`'s revision).
    #[test]
    fn a_state_under_another_deployments_key_is_refused() {
        let state = crate::rollout::plan::tests::state_of(1, &[1]);
        let value = to_cbor(&state);
        assert!(decode_state_value("web", &value).is_ok());
        let err = decode_state_value("db", &value).unwrap_err();
        assert!(crate::error_chain(&err).contains("deployment web"), "{}", crate::error_chain(&err));
    }
}
