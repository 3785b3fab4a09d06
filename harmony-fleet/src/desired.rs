//! Writing desired state: deployment keys and each device's index, both with compare-and-set.

use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use harmony_score_wire::names::{desired_state_key, index_key};
use harmony_score_wire::{
    encode, from_cbor, to_cbor, DeploymentIndex, DeploymentName, DesiredState, DeviceId, DeviceScore,
};
use serde::Deserialize;
use tracing::{debug, warn};

use crate::client::MAX_VALUE_BYTES;
use crate::{error_chain, FleetClient, FleetError};

/// How often a compare-and-set write is retried after losing to another writer.
const MAX_CAS_ATTEMPTS: u32 = 50;

/// One deployment to write for one device.
#[derive(Debug)]
pub struct DeployRequest {
    /// The device.
    pub device: DeviceId,
    /// The deployment.
    pub deployment: DeploymentName,
    /// The Scores, in the order the device runs them.
    pub scores: Vec<Box<dyn DeviceScore>>,
    /// The generation to write; `None`: one more than the key's last.
    pub generation: Option<u64>,
    /// When the device should stop accepting the document (seconds since the epoch).
    pub expires_at: Option<u64>,
    /// Write even Score tags the device did not list as supported.
    pub force: bool,
    /// Write nothing when the deployed document already holds these Scores
    /// (only when `generation` is `None`).
    pub skip_unchanged: bool,
}

impl DeployRequest {
    /// A request for the next generation, checked against the device's
    /// supported Scores, always written.
    pub fn new(device: DeviceId, deployment: DeploymentName, scores: Vec<Box<dyn DeviceScore>>) -> Self {
        Self {
            device,
            deployment,
            scores,
            generation: None,
            expires_at: None,
            force: false,
            skip_unchanged: false,
        }
    }

    /// Writes this exact generation (it must be newer than the key's).
    #[must_use]
    pub fn generation(mut self, generation: Option<u64>) -> Self {
        self.generation = generation;
        self
    }

    /// Sets the document's expiry.
    #[must_use]
    pub fn expires_at(mut self, expires_at: Option<u64>) -> Self {
        self.expires_at = expires_at;
        self
    }

    /// Skips the supported-tags check.
    #[must_use]
    pub fn force(mut self, force: bool) -> Self {
        self.force = force;
        self
    }

    /// Writes nothing when the Scores are already deployed.
    #[must_use]
    pub fn skip_unchanged(mut self, skip: bool) -> Self {
        self.skip_unchanged = skip;
        self
    }
}

/// What [`FleetClient::deploy`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deployed {
    /// The generation the key now holds.
    pub generation: u64,
    /// Whether a new document was written (`false`: it was already deployed).
    pub changed: bool,
}

/// The fields of a stored document needed to compare and number it.
#[derive(Debug, Deserialize)]
struct DocHeader {
    generation: u64,
    #[serde(default)]
    issued_at: u64,
}

/// A key's latest entry: its revision (0: never written) and, for a live
/// value, the value.
struct Latest {
    revision: u64,
    value: Option<bytes::Bytes>,
}

impl FleetClient {
    /// Checks that the device reported support for every Score tag in
    /// `scores`: [`FleetError::UnsupportedScores`] names the missing ones,
    /// [`FleetError::NoDeviceInfo`] says the device never reported.
    pub async fn check_supported(
        &self,
        device: &DeviceId,
        scores: &[Box<dyn DeviceScore>],
    ) -> Result<(), FleetError> {
        let info = self
            .device_info(device)
            .await?
            .ok_or_else(|| FleetError::NoDeviceInfo { device: device.clone() })?;
        let mut missing: Vec<String> =
            scores.iter().map(|s| s.typetag_name().to_owned()).filter(|t| !info.supports(t)).collect();
        missing.sort();
        missing.dedup();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(FleetError::UnsupportedScores { device: device.clone(), tags: missing })
        }
    }

    /// Writes one deployment's desired state: the key `<device>.<deployment>`
    /// first (devices also follow key notifications), then the device's index.
    /// Both writes are compare-and-set, retried when another operator wrote in
    /// between, so concurrent operators never lose each other's entries and a
    /// key's generation only grows.
    pub async fn deploy(&self, request: DeployRequest) -> Result<Deployed, FleetError> {
        let DeployRequest {
            device,
            deployment,
            scores,
            generation: wanted,
            expires_at,
            force,
            skip_unchanged,
        } = request;
        if !force {
            self.check_supported(&device, &scores).await?;
        }
        let store = &self.buckets().await?.desired;
        let key = desired_state_key(&device, &deployment);
        let mut doc = DesiredState::new(device.clone(), deployment.clone(), 0, scores);
        doc.expires_at = expires_at;
        let issued_at = doc.issued_at;
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let latest = read_latest(store, &key).await?;
            // A stored value that is not a document must not block replacing it.
            let header = latest.value.as_ref().and_then(|value| {
                decode_header(&key, value)
                    .inspect_err(|err| warn!(key = %key, cause = %error_chain(err), "replacing an undecodable document"))
                    .ok()
            });
            if let (true, None, Some(header), Some(value)) = (skip_unchanged, wanted, &header, &latest.value)
            {
                doc.generation = header.generation;
                doc.issued_at = header.issued_at;
                if encode(&doc).map_err(FleetError::EncodeFailed)? == value.as_ref() {
                    self.index_upsert(&device, &deployment, header.generation).await?;
                    return Ok(Deployed { generation: header.generation, changed: false });
                }
            }
            let prior = match header {
                Some(header) => header.generation,
                // Deleted (or undecodable): continue after the highest generation in the history.
                None if latest.revision > 0 => last_generation_in_history(store, &key).await?,
                None => 0,
            };
            doc.generation = match wanted {
                Some(requested) if requested <= prior => {
                    return Err(FleetError::StaleGeneration { key, current: prior, requested })
                }
                Some(g) => g,
                None => prior + 1,
            };
            doc.issued_at = issued_at;
            let bytes = encode(&doc).map_err(FleetError::EncodeFailed)?;
            if cas_write(store, &key, bytes, latest.revision).await? {
                debug!(key = %key, generation = doc.generation, "deployment written");
                self.index_upsert(&device, &deployment, doc.generation).await?;
                return Ok(Deployed { generation: doc.generation, changed: true });
            }
            backoff(attempt).await;
        }
        Err(lost(key))
    }

    /// Deletes a deployment: its key gets a delete marker (the device prunes
    /// what it owned), then it leaves the index. Returns whether it existed.
    pub async fn delete(&self, device: &DeviceId, deployment: &DeploymentName) -> Result<bool, FleetError> {
        let store = &self.buckets().await?.desired;
        let key = desired_state_key(device, deployment);
        let mut existed = None;
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let latest = read_latest(store, &key).await?;
            if latest.value.is_none() {
                existed = Some(false);
                break;
            }
            match store.delete_expect_revision(&key, Some(latest.revision)).await {
                Ok(()) => {
                    existed = Some(true);
                    break;
                }
                Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => backoff(attempt).await,
                Err(err) => return Err(FleetError::nats(format!("delete {key}"), err)),
            }
        }
        let existed = existed.ok_or_else(|| lost(key.clone()))?;
        self.index_remove(device, deployment, &key).await?;
        Ok(existed)
    }

    /// The device's index of deployments (empty when none was written).
    pub async fn deployment_index(&self, device: &DeviceId) -> Result<DeploymentIndex, FleetError> {
        let store = &self.buckets().await?.desired;
        let key = index_key(device);
        decode_index(&key, read_latest(store, &key).await?.value.as_deref())
    }

    /// The deployment's document as stored; `None` when missing or deleted.
    pub async fn desired_state(
        &self,
        device: &DeviceId,
        deployment: &DeploymentName,
    ) -> Result<Option<DesiredState>, FleetError> {
        let store = &self.buckets().await?.desired;
        let key = desired_state_key(device, deployment);
        match read_latest(store, &key).await?.value {
            Some(value) => harmony_score_wire::decode(&value, &Default::default())
                .map(Some)
                .map_err(|source| FleetError::BadDocument { key, source }),
            None => Ok(None),
        }
    }

    /// Makes the index list `deployment` at `generation` or newer.
    async fn index_upsert(
        &self,
        device: &DeviceId,
        deployment: &DeploymentName,
        generation: u64,
    ) -> Result<(), FleetError> {
        let store = &self.buckets().await?.desired;
        let key = index_key(device);
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let latest = read_latest(store, &key).await?;
            let mut index = decode_index(&key, latest.value.as_deref())?;
            // A slower writer of an older generation must not move the index back.
            if index.deployments.get(deployment).is_some_and(|g| *g >= generation) {
                return Ok(());
            }
            index.deployments.insert(deployment.clone(), generation);
            if cas_write(store, &key, to_cbor(&index), latest.revision).await? {
                return Ok(());
            }
            backoff(attempt).await;
        }
        Err(lost(key))
    }

    /// Removes `deployment` from the index, unless its key was written again
    /// meanwhile (a concurrent redeploy wins).
    async fn index_remove(
        &self,
        device: &DeviceId,
        deployment: &DeploymentName,
        deployment_key: &str,
    ) -> Result<(), FleetError> {
        let store = &self.buckets().await?.desired;
        let key = index_key(device);
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let latest = read_latest(store, &key).await?;
            let mut index = decode_index(&key, latest.value.as_deref())?;
            if !index.deployments.contains_key(deployment)
                || read_latest(store, deployment_key).await?.value.is_some()
            {
                return Ok(());
            }
            index.deployments.remove(deployment);
            if cas_write(store, &key, to_cbor(&index), latest.revision).await? {
                return Ok(());
            }
            backoff(attempt).await;
        }
        Err(lost(key))
    }
}

/// The latest entry of `key`, delete and purge markers included (their
/// revision is what the next compare-and-set write must name).
async fn read_latest(store: &kv::Store, key: &str) -> Result<Latest, FleetError> {
    let entry = store.entry(key).await.map_err(|e| FleetError::nats(format!("read {key}"), e))?;
    Ok(match entry {
        None => Latest { revision: 0, value: None },
        Some(entry) if entry.operation == kv::Operation::Put => {
            Latest { revision: entry.revision, value: Some(entry.value) }
        }
        Some(entry) => Latest { revision: entry.revision, value: None },
    })
}

/// Writes `value` if the key's last revision is still `revision` (0: the key
/// has no message at all); `false` when another writer came first.
async fn cas_write(store: &kv::Store, key: &str, value: Vec<u8>, revision: u64) -> Result<bool, FleetError> {
    match store.update(key, value.into(), revision).await {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
        Err(err) => Err(FleetError::nats(format!("write {key}"), err)),
    }
}

/// The highest generation a deleted key held, from the bucket's history
/// (the last few versions), so a deployment written again continues its
/// numbering (a device may still remember the old generations).
async fn last_generation_in_history(store: &kv::Store, key: &str) -> Result<u64, FleetError> {
    let history =
        store.history(key).await.map_err(|e| FleetError::nats(format!("read history of {key}"), e))?;
    let entries: Vec<_> = history.collect().await;
    let mut highest = 0;
    for entry in entries {
        let entry = entry.map_err(|e| FleetError::nats(format!("read history of {key}"), e))?;
        if entry.operation == kv::Operation::Put {
            if let Ok(header) = decode_header(key, &entry.value) {
                highest = highest.max(header.generation);
            }
        }
    }
    Ok(highest)
}

fn decode_header(key: &str, value: &[u8]) -> Result<DocHeader, FleetError> {
    from_cbor(value, MAX_VALUE_BYTES, "desired state")
        .map_err(|source| FleetError::BadValue { key: key.to_owned(), source })
}

fn decode_index(key: &str, value: Option<&[u8]>) -> Result<DeploymentIndex, FleetError> {
    match value {
        Some(value) => from_cbor(value, MAX_VALUE_BYTES, "deployment index")
            .map_err(|source| FleetError::BadValue { key: key.to_owned(), source }),
        None => Ok(DeploymentIndex::default()),
    }
}

fn lost(key: String) -> FleetError {
    FleetError::Conflict { key, reason: format!("lost to concurrent writers {MAX_CAS_ATTEMPTS} times") }
}

/// A short, growing, jittered pause between compare-and-set attempts, so
/// writers that collided do not collide again in lockstep.
async fn backoff(attempt: u32) {
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos() % 7));
    tokio::time::sleep(Duration::from_millis(u64::from(attempt.min(10)) * 5 + jitter)).await;
}
