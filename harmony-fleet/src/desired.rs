//! Writing desired state: deployment keys and each device's index, both with compare-and-set.

use std::time::Duration;

use async_nats::jetstream::{kv, stream};
use harmony_score_wire::names::{desired_state_key, index_key};
use harmony_score_wire::{
    check_health, check_scores, document_digest, encode, from_cbor, to_cbor, Check, DeploymentIndex,
    DeploymentName, DesiredState, DeviceId, DeviceInfo, DeviceScore, EncodeError, HEALTH_FEATURE,
};
use serde::Deserialize;
use tracing::{debug, warn};

use crate::client::MAX_VALUE_BYTES;
use crate::{error_chain, FleetClient, FleetError};

/// How often a compare-and-set write is retried after losing to another writer.
pub(crate) const MAX_CAS_ATTEMPTS: u32 = 50;
/// The most versions a KV bucket keeps per key (a limit of NATS KV).
const MAX_KV_HISTORY: usize = 64;

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
    /// Health checks the device runs before it commits to the document.
    pub health: Vec<Check>,
    /// Seconds the checks get to hold (`None`: the device's default when
    /// there are checks; with no checks, `Some` alone asks for the Scores' own).
    pub health_timeout_s: Option<u64>,
    /// Write even Score tags (and features) the device did not list as supported.
    pub force: bool,
    /// Write nothing when the deployed document already holds these Scores
    /// (only when `generation` is `None`).
    pub skip_unchanged: bool,
    /// Write only if the key holds this generation when written (`0`: no
    /// document), else fail with [`FleetError::GenerationMoved`] and write
    /// nothing: an operator's read-decide-write that another writer cannot
    /// slip between (the write is a compare-and-set on what was read).
    pub if_generation: Option<u64>,
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
            health: Vec::new(),
            health_timeout_s: None,
            force: false,
            skip_unchanged: false,
            if_generation: None,
        }
    }

    /// Writes only if the key still holds `generation` (`0`: no document);
    /// see [`DeployRequest::if_generation`](DeployRequest#structfield.if_generation).
    #[must_use]
    pub fn if_generation(mut self, generation: Option<u64>) -> Self {
        self.if_generation = generation;
        self
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

    /// Sets the health checks and their deadline (see [`DesiredState::health`]).
    #[must_use]
    pub fn health(mut self, checks: Vec<Check>, timeout_s: Option<u64>) -> Self {
        self.health = checks;
        self.health_timeout_s = timeout_s;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployed {
    /// The generation the key now holds.
    pub generation: u64,
    /// Whether a new document was written (`false`: it was already deployed).
    pub changed: bool,
    /// [`document_digest`] of the document's bytes as stored (those written,
    /// or those already there when unchanged): what the device reports as
    /// `observed_digest` once it applied exactly this document.
    pub digest: String,
}

/// The fields of a stored document needed to compare and number it.
#[derive(Debug, Deserialize)]
struct DocHeader {
    generation: u64,
    #[serde(default)]
    issued_at: u64,
    /// The device and deployment the document names (checked against the
    /// key when the value is signed: a signed document copied from another
    /// key does not number this one).
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    deployment: Option<String>,
}

/// A key's latest entry: its revision (0: never written) and, for a live
/// value, the value.
pub(crate) struct Latest {
    pub(crate) revision: u64,
    pub(crate) value: Option<bytes::Bytes>,
}

/// One deployment being written to one device: the document, and what
/// [`FleetClient::deploy`] carries from one compare-and-set attempt to the next.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) device: DeviceId,
    pub(crate) deployment: DeploymentName,
    wanted: Option<u64>,
    skip_unchanged: bool,
    /// [`DeployRequest::if_generation`](DeployRequest#structfield.if_generation).
    expected: Option<u64>,
    doc: DesiredState,
    issued_at: u64,
    /// `<device>.<deployment>`.
    pub(crate) key: String,
    /// `<device>._index`.
    pub(crate) index_key: String,
    /// The generation this job reserved in the index, reused after
    /// losing the key to another writer while the index still holds it.
    reserved: Option<u64>,
}

impl Job {
    /// The job of `request`, checked as far as it can be without reading
    /// anything (a document a device would reject is refused before
    /// anything is read or written), and whether it is forced (no check of
    /// the device's supported Scores and features).
    pub(crate) fn new(request: DeployRequest) -> Result<(Self, bool), FleetError> {
        let DeployRequest {
            device,
            deployment,
            scores,
            generation: wanted,
            expires_at,
            health,
            health_timeout_s,
            force,
            skip_unchanged,
            if_generation: expected,
        } = request;
        check_scores(&scores).map_err(|e| FleetError::EncodeFailed(EncodeError::WouldBeRejected(e)))?;
        let mut doc = DesiredState::new(device.clone(), deployment.clone(), 0, scores);
        doc.expires_at = expires_at;
        doc.health = health;
        doc.health_timeout_s = health_timeout_s;
        check_health(&doc).map_err(|e| FleetError::EncodeFailed(EncodeError::WouldBeRejected(e)))?;
        let job = Self {
            key: desired_state_key(&device, &deployment),
            index_key: index_key(&device),
            issued_at: doc.issued_at,
            device,
            deployment,
            wanted,
            skip_unchanged,
            expected,
            doc,
            reserved: None,
        };
        Ok((job, force))
    }

    /// Checks that the device, which reported `info` (`None`: never), runs
    /// every Score tag of the document, and health checks if it has any.
    pub(crate) fn check_device(&self, info: Option<&DeviceInfo>) -> Result<(), FleetError> {
        check_supported_by(&self.device, info, &self.doc.scores)?;
        if self.doc.is_health_gated() {
            check_feature_of(&self.device, info, HEALTH_FEATURE)?;
        }
        Ok(())
    }
}

/// A compare-and-set write: the value, and the key's revision it replaces.
#[derive(Debug)]
pub(crate) struct CasWrite {
    pub(crate) value: Vec<u8>,
    pub(crate) revision: u64,
}

/// What one attempt of a [`Job`] writes.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Nothing: this is the result.
    Done(Deployed),
    /// The index (when `index`), then the key (when `key`), each with
    /// compare-and-set; `deployed` once both are written. A job that wins
    /// the index and loses the key keeps the generation reserved.
    Write { index: Option<CasWrite>, key: Option<CasWrite>, deployed: Deployed },
}

/// Writes `plan` for `job`, index first: the result when every write won,
/// `None` when one lost to another writer (the attempt is over).
pub(crate) async fn write_plan(
    store: &kv::Store,
    job: &mut Job,
    plan: Plan,
) -> Result<Option<Deployed>, FleetError> {
    let (index, key, deployed) = match plan {
        Plan::Done(deployed) => return Ok(Some(deployed)),
        Plan::Write { index, key, deployed } => (index, key, deployed),
    };
    if let Some(index) = index {
        if !index_written(
            job,
            &deployed,
            key.is_some(),
            cas_write(store, &job.index_key, index.value, index.revision).await?,
        ) {
            return Ok(None);
        }
    }
    if let Some(key) = key {
        if !key_written(job, &deployed, cas_write(store, &job.key, key.value, key.revision).await?) {
            return Ok(None);
        }
    }
    Ok(Some(deployed))
}

/// Records the outcome of `job`'s index write (`won`) for the key write
/// that follows (`then_key`): the generation is reserved in the index.
pub(crate) fn index_written(job: &mut Job, deployed: &Deployed, then_key: bool, won: bool) -> bool {
    if won && then_key {
        job.reserved = Some(deployed.generation);
    }
    won
}

/// Records the outcome of `job`'s key write (`won`).
pub(crate) fn key_written(job: &Job, deployed: &Deployed, won: bool) -> bool {
    if won {
        debug!(key = %job.key, generation = deployed.generation, "deployment written");
    }
    won
}

/// The key's latest entry as [`Latest`], from a read that returned `entry`.
pub(crate) fn latest_of(entry: Option<kv::Entry>) -> Latest {
    match entry {
        None => Latest { revision: 0, value: None },
        Some(entry) if entry.operation == kv::Operation::Put => {
            Latest { revision: entry.revision, value: Some(entry.value) }
        }
        Some(entry) => Latest { revision: entry.revision, value: None },
    }
}

/// [`FleetError::UnsupportedScores`] naming the tags of `scores` that
/// `info` does not list; [`FleetError::NoDeviceInfo`] without info.
fn check_supported_by(
    device: &DeviceId,
    info: Option<&DeviceInfo>,
    scores: &[Box<dyn DeviceScore>],
) -> Result<(), FleetError> {
    let info = info.ok_or_else(|| FleetError::NoDeviceInfo { device: device.clone() })?;
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

/// [`FleetError::UnsupportedFeature`] unless `info` lists `feature`.
fn check_feature_of(device: &DeviceId, info: Option<&DeviceInfo>, feature: &str) -> Result<(), FleetError> {
    let info = info.ok_or_else(|| FleetError::NoDeviceInfo { device: device.clone() })?;
    if info.has_feature(feature) {
        Ok(())
    } else {
        Err(FleetError::UnsupportedFeature { device: device.clone(), feature: feature.to_owned() })
    }
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
        check_supported_by(device, self.device_info(device).await?.as_ref(), scores)
    }

    /// Checks that the device listed `feature` in its info: an agent without
    /// it would read the document and silently ignore what needs it (an
    /// older agent commits a document with health checks unverified).
    pub async fn check_feature(&self, device: &DeviceId, feature: &str) -> Result<(), FleetError> {
        check_feature_of(device, self.device_info(device).await?.as_ref(), feature)
    }

    /// Writes one deployment's desired state: first the device's index
    /// (`<device>._index`), then the key `<device>.<deployment>`, both with
    /// compare-and-set, retried when another writer came in between.
    ///
    /// The index goes first so that a key is never written that a device
    /// which was offline cannot discover: when the index write fails, nothing
    /// was written; when the key write fails, the index names a generation
    /// the key does not hold yet, which the next deploy goes past.
    ///
    /// The next generation is one more than the highest the deployment ever
    /// had: in the index (live or as a tombstone of a delete), in the key and
    /// in the key's history. So numbering never restarts, even after another
    /// tool purged the key; a device remembers the generations it applied.
    /// Under contention a generation may be skipped (reserved in the index by
    /// a writer that then lost the key); generations stay distinct and only grow.
    ///
    /// A client that signs ([`FleetClient::with_signer`]) counts only values
    /// whose signature verifies against its own key or the keys of
    /// [`FleetClient::with_trusted_keys`], and written for this very key:
    /// whoever can write the bucket without a signing key cannot make it
    /// sign a huge generation (which would freeze the deployment on devices
    /// at `u64::MAX`). The index is not signed: its generation counts only
    /// up to the highest verified one; above it, it is ignored with a
    /// warning naming the index key (after a purge of a signed key, continue
    /// the numbering with an explicit `generation`).
    pub async fn deploy(&self, request: DeployRequest) -> Result<Deployed, FleetError> {
        let (job, force) = Job::new(request)?;
        if !force {
            let info = self.device_info(&job.device).await?;
            job.check_device(info.as_ref())?;
        }
        let store = &self.buckets().await?.desired;
        self.run_job(store, job, 0).await
    }

    /// [`deploy`](Self::deploy)'s compare-and-set loop, from attempt `first` on.
    pub(crate) async fn run_job(
        &self,
        store: &kv::Store,
        mut job: Job,
        first: u32,
    ) -> Result<Deployed, FleetError> {
        for attempt in first..MAX_CAS_ATTEMPTS {
            // The key before the index: a writer that changes the key after
            // this read has reserved its generation in the index first, so
            // either the index read below sees it or the index write fails.
            let latest = read_latest(store, &job.key).await?;
            let latest_index = read_latest(store, &job.index_key).await?;
            let plan = self.plan(store, &mut job, latest, latest_index).await?;
            if let Some(deployed) = write_plan(store, &mut job, plan).await? {
                return Ok(deployed);
            }
            backoff(attempt).await;
        }
        Err(lost(job.key))
    }

    /// What one attempt of `job` writes, given the key's and the index's
    /// latest entries.
    pub(crate) async fn plan(
        &self,
        store: &kv::Store,
        job: &mut Job,
        latest: Latest,
        latest_index: Latest,
    ) -> Result<Plan, FleetError> {
        let Job {
            ref device,
            ref deployment,
            wanted,
            skip_unchanged,
            expected,
            ref mut doc,
            issued_at,
            ref key,
            ref index_key,
            reserved,
        } = *job;
        let mut index = decode_index(index_key, latest_index.value.as_deref())?;
        // A stored value that is not a document must not block replacing it.
        // A signing client numbers only from values a trusted key signed.
        let header = latest.value.as_ref().and_then(|value| {
            self.numbering_header(key, device, deployment, value)
                .inspect_err(|cause| warn!(key = %harmony_score_wire::log_text(key), cause = %harmony_score_wire::log_text(cause), "replacing a value that does not count for numbering"))
                .ok()
        });
        // Checked on what this attempt read: the key's write below names the
        // revision read, so it fails if the key moved since.
        if let Some(expected) = expected {
            let found = header.as_ref().map_or(0, |h| h.generation);
            if found != expected {
                return Err(FleetError::GenerationMoved { key: key.clone(), expected, found });
            }
        }
        if let (true, None, Some(header), Some(value)) = (skip_unchanged, wanted, &header, &latest.value) {
            doc.generation = header.generation;
            doc.issued_at = header.issued_at;
            if self.sealed(encode(doc).map_err(FleetError::EncodeFailed)?) == value.as_ref() {
                let unchanged = Deployed {
                    generation: header.generation,
                    changed: false,
                    digest: document_digest(value),
                };
                // Already deployed; the index must still list it (another
                // tool may have written the key, or a delete raced).
                let listed = index.deployments.get(deployment).is_some_and(|g| *g >= header.generation);
                if !listed || index.deleted.contains_key(deployment) {
                    index.deleted.remove(deployment);
                    let entry = index.deployments.entry(deployment.clone()).or_insert(0);
                    *entry = (*entry).max(header.generation);
                    let index = CasWrite { value: to_cbor(&index), revision: latest_index.revision };
                    return Ok(Plan::Write { index: Some(index), key: None, deployed: unchanged });
                }
                return Ok(Plan::Done(unchanged));
            }
        }
        // The index is written before every key this client writes, so
        // when it knows the deployment at least as far as the key does,
        // the key's history can hold nothing newer. Only a key written
        // (or deleted) by another tool, past the index, costs the
        // history read (one direct get per kept revision).
        // A signing client trusts the (unsigned) index only where it
        // agrees with the verified key.
        let index_generation = index.last_generation(deployment);
        let index_covers_key = index_generation > 0
            && match (&header, self.signer.is_some()) {
                (Some(h), true) => h.generation == index_generation,
                (None, true) => false,
                (h, false) => h.as_ref().is_none_or(|h| h.generation <= index_generation),
            };
        let in_history = match latest.revision {
            0 => 0,
            _ if index_covers_key => 0,
            _ => self.last_generation_in_history(store, key, device, deployment).await?,
        };
        let in_key = header.as_ref().map_or(0, |h| h.generation).max(in_history);
        let ours = reserved.filter(|g| index.deployments.get(deployment) == Some(g));
        let in_index = match ours {
            // Our own reservation does not count against itself.
            Some(_) => index.deleted.get(deployment).copied().unwrap_or(0),
            None => index.last_generation(deployment),
        };
        // The index is unsigned: a signing client does not number above
        // every verified generation from it (a bucket writer could have
        // set it to u64::MAX).
        let in_index = if self.signer.is_some() && in_index > in_key {
            warn!(
                key = %index_key,
                deployment = %deployment,
                index_generation = in_index,
                verified_generation = in_key,
                "the index names a generation above every value signed by a trusted key; \
                 not counted for numbering (if the key was purged, deploy with an explicit generation)"
            );
            0
        } else {
            in_index
        };
        let prior = in_key.max(in_index);
        let generation = match (wanted, ours) {
            (Some(requested), _) if requested <= prior => {
                return Err(FleetError::StaleGeneration { key: key.clone(), current: prior, requested })
            }
            (Some(requested), _) => requested,
            (None, Some(ours)) if ours > prior => ours,
            (None, _) => {
                prior.checked_add(1).ok_or_else(|| FleetError::GenerationExhausted { key: key.clone() })?
            }
        };
        doc.generation = generation;
        doc.issued_at = issued_at;
        let bytes = self.sealed(encode(doc).map_err(FleetError::EncodeFailed)?);
        let index = (ours != Some(generation)).then(|| {
            index.deleted.remove(deployment);
            index.deployments.insert(deployment.clone(), generation);
            CasWrite { value: to_cbor(&index), revision: latest_index.revision }
        });
        let deployed = Deployed { generation, changed: true, digest: document_digest(&bytes) };
        Ok(Plan::Write { index, key: Some(CasWrite { value: bytes, revision: latest.revision }), deployed })
    }

    /// Deletes a deployment. Returns whether the key held a value.
    ///
    /// A client that signs ([`FleetClient::with_signer`]) *retires* it: it
    /// writes a signed document without Scores at the next generation, which
    /// the device runs (pruning everything the deployment owned) and then
    /// reports as pruned; the key keeps that document. A device that
    /// requires signatures prunes only on such a document, never on a bare
    /// delete marker, which anyone able to write the bucket could set.
    ///
    /// Without a signer, the key gets a delete marker (the device prunes
    /// what it owned), then the index moves it from its deployments to its
    /// tombstones (`deleted`, with the last generation), so that a later
    /// deploy continues the numbering.
    pub async fn delete(&self, device: &DeviceId, deployment: &DeploymentName) -> Result<bool, FleetError> {
        let store = &self.buckets().await?.desired;
        let key = desired_state_key(device, deployment);
        if self.signer.is_some() {
            // Also after a bare delete marker (which a device requiring
            // signatures refuses, keeping the deployment running): retired
            // whenever the key or the index shows it ever existed.
            let latest = read_latest(store, &key).await?;
            if latest.value.is_none() && latest.revision == 0 {
                let index = self.deployment_index(device).await?;
                if !index.deployments.contains_key(deployment) && !index.deleted.contains_key(deployment) {
                    return Ok(false);
                }
            }
            let retire = DeployRequest::new(device.clone(), deployment.clone(), Vec::new()).force(true);
            self.deploy(retire).await?;
            return Ok(true);
        }
        let mut deleted = None;
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let latest = read_latest(store, &key).await?;
            let Some(value) = &latest.value else {
                deleted = Some(Deleted::Nothing);
                break;
            };
            match store.delete_expect_revision(&key, Some(latest.revision)).await {
                Ok(()) => {
                    deleted = Some(match decode_header(&key, value) {
                        Ok(header) => Deleted::Generation(header.generation),
                        Err(_) => Deleted::Undecodable,
                    });
                    break;
                }
                Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => backoff(attempt).await,
                Err(err) => return Err(FleetError::nats(format!("delete {key}"), err)),
            }
        }
        let deleted = deleted.ok_or_else(|| lost(key.clone()))?;
        self.index_tombstone(device, deployment, &key, deleted).await?;
        Ok(deleted != Deleted::Nothing)
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
        let value = read_latest(store, &key).await?.value;
        decode_desired(key, value.as_deref())
    }

    /// [`desired_state`](Self::desired_state) of `deployment` on each of
    /// `devices`, one result per device in order, read in batches of up to
    /// 1,024 keys (one request each) instead of one get per device.
    pub async fn desired_states(
        &self,
        devices: &[DeviceId],
        deployment: &DeploymentName,
    ) -> Result<Vec<Result<Option<DesiredState>, FleetError>>, FleetError> {
        let store = &self.buckets().await?.desired;
        let keys = devices.iter().map(|device| desired_state_key(device, deployment)).collect();
        Ok(self
            .latest_entries(store, keys)
            .await
            .into_iter()
            .map(|(key, entry)| {
                entry.and_then(|entry| decode_desired(key, latest_of(entry).value.as_deref()))
            })
            .collect())
    }

    /// Moves `deployment` from the index's deployments to its tombstones,
    /// unless a redeploy won meanwhile: its key holds a value again, or the
    /// index lists a newer generation than the deleted document's (a deploy
    /// reserved it and is about to write the key).
    async fn index_tombstone(
        &self,
        device: &DeviceId,
        deployment: &DeploymentName,
        deployment_key: &str,
        deleted: Deleted,
    ) -> Result<(), FleetError> {
        let store = &self.buckets().await?.desired;
        let key = index_key(device);
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let latest = read_latest(store, &key).await?;
            let mut index = decode_index(&key, latest.value.as_deref())?;
            let Some(live) = index.deployments.get(deployment).copied() else {
                return Ok(());
            };
            if matches!(deleted, Deleted::Generation(g) if live > g)
                || read_latest(store, deployment_key).await?.value.is_some()
            {
                return Ok(());
            }
            index.deployments.remove(deployment);
            let last = match deleted {
                Deleted::Generation(g) => live.max(g),
                Deleted::Undecodable | Deleted::Nothing => live,
            };
            let tombstone = index.deleted.entry(deployment.clone()).or_insert(0);
            *tombstone = (*tombstone).max(last);
            if cas_write(store, &key, to_cbor(&index), latest.revision).await? {
                return Ok(());
            }
            backoff(attempt).await;
        }
        Err(lost(key))
    }
}

/// The document a desired-state key's latest value holds (`None`: no value).
fn decode_desired(key: String, value: Option<&[u8]>) -> Result<Option<DesiredState>, FleetError> {
    let Some(value) = value else { return Ok(None) };
    let payload = harmony_score_wire::payload_of(value).map_err(|e| FleetError::BadDocument {
        key: key.clone(),
        source: harmony_score_wire::DecodeError::Malformed { message: e.to_string() },
    })?;
    harmony_score_wire::decode(&payload, &Default::default())
        .map(Some)
        .map_err(|source| FleetError::BadDocument { key, source })
}

/// What [`FleetClient::delete`] found under the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deleted {
    /// No value (never written, deleted or purged).
    Nothing,
    /// A document of this generation, now deleted.
    Generation(u64),
    /// A value that is not a document, now deleted.
    Undecodable,
}

/// The latest entry of `key`, delete and purge markers included (their
/// revision is what the next compare-and-set write must name).
pub(crate) async fn read_latest(store: &kv::Store, key: &str) -> Result<Latest, FleetError> {
    let entry = store.entry(key).await.map_err(|e| FleetError::nats(format!("read {key}"), e))?;
    Ok(latest_of(entry))
}

/// Writes `value` if the key's last revision is still `revision` (0: the key
/// has no message at all); `false` when another writer came first.
pub(crate) async fn cas_write(
    store: &kv::Store,
    key: &str,
    value: Vec<u8>,
    revision: u64,
) -> Result<bool, FleetError> {
    match store.update(key, value.into(), revision).await {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
        Err(err) => Err(FleetError::nats(format!("write {key}"), err)),
    }
}

impl FleetClient {
    /// The highest generation the key held in the bucket's history (the last
    /// few versions, delete markers included), so a deployment written again
    /// continues its numbering (a device may still remember the old generations).
    /// A purge leaves no history: the index's tombstone covers that case
    /// (for a signing client, only up to the highest verified generation).
    ///
    /// Read with direct gets, one per version, rather than `kv::Store::history`:
    /// that creates a consumer per call, and consumers are a server-wide budget
    /// a fleet-wide deploy would spend by the thousand.
    ///
    /// A signing client counts only values that `numbering_header` accepts.
    async fn last_generation_in_history(
        &self,
        store: &kv::Store,
        key: &str,
        device: &DeviceId,
        deployment: &DeploymentName,
    ) -> Result<u64, FleetError> {
        let subject = format!("{}{key}", store.prefix);
        let mut highest = 0;
        let mut from = None;
        for _ in 0..MAX_KV_HISTORY {
            let message = match store.stream.direct_get_next_for_subject(subject.as_str(), from).await {
                Ok(message) => message,
                Err(err) if err.kind() == stream::DirectGetErrorKind::NotFound => break,
                Err(err) => return Err(FleetError::nats(format!("read history of {key}"), err)),
            };
            from = Some(message.sequence.saturating_add(1));
            let is_put = message.headers.get("KV-Operation").is_none_or(|op| op.as_str() == "PUT");
            if is_put {
                if let Ok(header) = self.numbering_header(key, device, deployment, &message.payload) {
                    highest = highest.max(header.generation);
                }
            }
        }
        Ok(highest)
    }

    /// The header of a stored value as it counts for numbering generations.
    /// Without a signer: any decodable document. With one: only a value
    /// whose signature verifies against the signer's own key or the keys of
    /// [`FleetClient::with_trusted_keys`], naming this device and deployment.
    fn numbering_header(
        &self,
        key: &str,
        device: &DeviceId,
        deployment: &DeploymentName,
        value: &[u8],
    ) -> Result<DocHeader, String> {
        let Some(signer) = &self.signer else {
            return decode_header(key, value).map_err(|e| error_chain(&e));
        };
        let own = harmony_score_wire::TrustedKeys::new(vec![signer.verifying_key()], 1);
        let payload = own
            .verify(value)
            .or_else(|err| match &self.trusted {
                Some(trusted) => trusted.verify(value),
                None => Err(err),
            })
            .map_err(|e| format!("not signed by a trusted key: {e}"))?;
        let header: DocHeader =
            from_cbor(&payload, MAX_VALUE_BYTES, "desired state").map_err(|e| e.to_string())?;
        if header.device_id.as_deref() != Some(device.as_str())
            || header.deployment.as_deref() != Some(deployment.as_str())
        {
            return Err("a signed document for another device or deployment".to_owned());
        }
        Ok(header)
    }
}

impl FleetClient {
    /// `payload` as written: wrapped in a signed envelope when this client signs.
    fn sealed(&self, payload: Vec<u8>) -> Vec<u8> {
        match &self.signer {
            Some(signer) => signer.sign(payload),
            None => payload,
        }
    }
}

fn decode_header(key: &str, value: &[u8]) -> Result<DocHeader, FleetError> {
    // A signed value's header is inside its payload, not verified here: a
    // client without a signer numbers with it (a signing one goes through
    // `numbering_header`, which verifies).
    if harmony_score_wire::is_signed(value) {
        if let Ok(payload) = harmony_score_wire::payload_of(value) {
            return from_cbor(&payload, MAX_VALUE_BYTES, "desired state")
                .map_err(|source| FleetError::BadValue { key: key.to_owned(), source });
        }
    }
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
pub(crate) async fn backoff(attempt: u32) {
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos() % 7));
    tokio::time::sleep(Duration::from_millis(u64::from(attempt.min(10)) * 5 + jitter)).await;
}
