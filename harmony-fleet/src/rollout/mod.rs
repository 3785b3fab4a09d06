//! `FleetRolloutScore`: a deployment rolled out in waves, stopped by itself
//! when too many devices fail, resumable, and optionally reverted.
//!
//! A rollout writes one wave's documents, waits for those devices to
//! report (applied and committed, or failed, or rolled back by their health
//! checks), counts the failures of every wave so far against the threshold,
//! and either goes on with the next wave or stops. Its state lives in the
//! rollouts bucket under the deployment's name and is written with
//! compare-and-set at every step, so an interrupted rollout resumes where it
//! stopped and two operators never drive one rollout at once.

mod plan;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use harmony_score_wire::{bounded_text, now_ms, Check, DeploymentName, DeviceId, DeviceScore};
use harmony_topology::{
    async_trait, Id, Interpret, InterpretError, InterpretName, InterpretStatus, Inventory, Outcome, Score,
    Topology, Version,
};
use serde::{Deserialize, Serialize};

pub use plan::{
    parse_waves, wave_ends, DeviceResult, DeviceState, MaxFailures, RolloutEvent, RolloutPhase, RolloutState,
    WaveSize, MAX_WAVES, ROLLOUT_STATE_FORMAT,
};
pub use store::{OnDone, RolloutDocument, RolloutStore, StoredRollout};

use crate::{error_chain, Awaited, DeployRequest, Deployed, FleetError};

/// Which devices a rollout reaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutTargets {
    /// These devices, in this order (the first is the canary).
    Devices(Vec<DeviceId>),
    /// Every device whose published labels hold all of these, by device id.
    Selector(BTreeMap<String, String>),
}

/// Receives a rollout's events as they happen (progress bars, JSON lines).
#[derive(Clone)]
pub struct RolloutEvents(pub Arc<dyn Fn(&RolloutEvent) + Send + Sync>);

impl std::fmt::Debug for RolloutEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RolloutEvents")
    }
}

/// Rolls a deployment's document out to devices in cumulative waves.
///
/// Each wave's devices get the document (as their deployment's next
/// generation; a device that already holds it is left alone), then the
/// rollout waits up to `wave_timeout_s` for each to report it applied (and,
/// with health checks, committed). Devices that fail, roll back or do not
/// answer count against `max_failures`, over all waves so far; once it is
/// crossed no further wave is written, and with `revert_on_abort` every
/// device reached gets its previous document back as a newer generation.
///
/// With `resume`, everything but `deployment` is read from the stored
/// state of an interrupted rollout.
#[derive(Debug, Serialize, Deserialize)]
pub struct FleetRolloutScore {
    /// The deployment's name on every device.
    pub deployment: DeploymentName,
    /// The device Scores, in the order devices run them.
    pub scores: Vec<Box<dyn DeviceScore>>,
    /// Health checks each device runs before it commits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health: Vec<Check>,
    /// Seconds the checks get.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_timeout_s: Option<u64>,
    /// When devices should stop accepting the document (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Which devices.
    pub targets: RolloutTargets,
    /// The waves (`1,10%,50%,100%`).
    pub waves: Vec<WaveSize>,
    /// The failure threshold.
    #[serde(default)]
    pub max_failures: MaxFailures,
    /// Seconds each wave's devices get to report.
    pub wave_timeout_s: u64,
    /// Await the last wave too (else it is written and the rollout ends).
    #[serde(default)]
    pub wait: bool,
    /// When aborted, put the previous documents back.
    #[serde(default)]
    pub revert_on_abort: bool,
    /// Write even Score tags a device did not list as supported.
    #[serde(default)]
    pub force: bool,
    /// Seconds without a state write after which another operator may
    /// resume this rollout (the running one writes it every third of this).
    pub lease_s: u64,
    /// Resume the interrupted rollout of `deployment` instead.
    #[serde(default)]
    pub resume: bool,
    /// Where events go, besides the log.
    #[serde(skip)]
    pub events: Option<RolloutEvents>,
}

impl FleetRolloutScore {
    /// A score that resumes the interrupted rollout of `deployment`.
    pub fn resume(deployment: DeploymentName, events: Option<RolloutEvents>) -> Self {
        Self {
            deployment,
            scores: Vec::new(),
            health: Vec::new(),
            health_timeout_s: None,
            expires_at: None,
            targets: RolloutTargets::Devices(Vec::new()),
            waves: Vec::new(),
            max_failures: MaxFailures::default(),
            wave_timeout_s: 0,
            wait: false,
            revert_on_abort: false,
            force: false,
            lease_s: 0,
            resume: true,
            events,
        }
    }
}

impl<T: Topology + RolloutStore> Score<T> for FleetRolloutScore {
    fn create_interpret(&self) -> Box<dyn Interpret<T>> {
        let document = RolloutDocument {
            scores: Vec::new(),
            health: self.health.clone(),
            health_timeout_s: self.health_timeout_s,
            expires_at: self.expires_at,
        };
        // The Scores travel in their wire form (no `Clone` on a boxed Score).
        let document = harmony_score_wire::try_to_cbor(&self.scores)
            .map_err(FleetError::EncodeFailed)
            .and_then(|bytes| {
                let scores = harmony_score_wire::from_cbor(&bytes, usize::MAX, "scores")
                    .map_err(|source| FleetError::BadValue { key: "scores".into(), source })?;
                Ok(RolloutDocument { scores, ..document })
            })
            .map_err(|e| error_chain(&e));
        Box::new(FleetRolloutInterpret {
            deployment: self.deployment.clone(),
            document,
            targets: self.targets.clone(),
            waves: self.waves.clone(),
            max_failures: self.max_failures,
            wave_timeout_s: self.wave_timeout_s,
            wait: self.wait,
            revert_on_abort: self.revert_on_abort,
            force: self.force,
            lease_s: self.lease_s,
            resume: self.resume,
            events: self.events.clone(),
        })
    }

    fn name(&self) -> String {
        format!("fleet rollout [{}]", self.deployment)
    }
}

/// What reverting one device comes to.
enum Revert {
    /// Its previous document is to be written back.
    Write(DeployRequest),
    /// It had none: the deployment was deleted.
    Deleted,
}

/// Runs a [`FleetRolloutScore`] against a [`RolloutStore`].
#[derive(Debug)]
pub struct FleetRolloutInterpret {
    deployment: DeploymentName,
    document: Result<RolloutDocument, String>,
    targets: RolloutTargets,
    waves: Vec<WaveSize>,
    max_failures: MaxFailures,
    wave_timeout_s: u64,
    wait: bool,
    revert_on_abort: bool,
    force: bool,
    lease_s: u64,
    resume: bool,
    events: Option<RolloutEvents>,
}

/// This process, as a rollout's owner.
fn owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}:{}", host.trim(), std::process::id())
}

fn random_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        bytes = now_ms().to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One run of a rollout: the fleet, the state and its revision.
struct Run<'a, T: RolloutStore> {
    fleet: &'a T,
    state: RolloutState,
    revision: u64,
    events: Option<RolloutEvents>,
}

impl<T: RolloutStore> Run<'_, T> {
    fn emit(&self, event: RolloutEvent) {
        emit(&self.events, &event);
    }

    async fn save(&mut self) -> Result<(), FleetError> {
        self.revision = self.fleet.save_rollout(&self.state, self.revision).await?;
        Ok(())
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.state.lease_ms.max(3))
    }

    /// Waits for `awaited` while keeping the lease: the state is written
    /// again every third of it (a lost compare-and-set stops the rollout).
    async fn wait(
        &mut self,
        awaited: &[Awaited],
        on_done: OnDone<'_>,
    ) -> Result<Vec<Result<harmony_score_wire::DeploymentStatus, FleetError>>, FleetError> {
        let fleet = self.fleet;
        let timeout = Duration::from_secs(self.state.wave_timeout_s);
        let deployment = self.state.deployment.clone();
        let wait = fleet.wait_reporting(&deployment, awaited, timeout, on_done);
        tokio::pin!(wait);
        let every = self.lease() / 3;
        loop {
            tokio::select! {
                waited = &mut wait => return waited,
                () = tokio::time::sleep(every) => self.save().await?,
            }
        }
    }

    /// The request writing `doc` to `device`.
    fn request(&self, device: &DeviceId, doc: RolloutDocument) -> DeployRequest {
        DeployRequest::new(device.clone(), self.state.deployment.clone(), doc.scores)
            .expires_at(doc.expires_at)
            .health(doc.health, doc.health_timeout_s)
            .force(self.state.force)
            .skip_unchanged(true)
    }

    /// Writes `document` to each of `devices` (its next generation, unless
    /// it holds it already), all at once: the fleet batches their reads and
    /// pipelines their writes. One result per device, in order.
    async fn write_all(
        &self,
        devices: &[DeviceId],
        document: &RolloutDocument,
    ) -> Vec<Result<Deployed, FleetError>> {
        let mut requests = Vec::with_capacity(devices.len());
        let copies: Vec<Option<FleetError>> = devices
            .iter()
            .map(|device| match document.copy() {
                Ok(doc) => {
                    requests.push(self.request(device, doc));
                    None
                }
                Err(err) => Some(err),
            })
            .collect();
        let mut written = self.fleet.write_desired_states(requests).await.into_iter();
        copies
            .into_iter()
            .map(|copy| match copy {
                Some(err) => Err(err),
                None => {
                    written.next().unwrap_or_else(|| Err(FleetError::nats("deploy", "no result (a bug)")))
                }
            })
            .collect()
    }

    /// Records, once per device, the document it holds before the rollout
    /// reaches it (stored beside the state by digest, shared by devices
    /// that hold the same).
    async fn remember_previous(&mut self, devices: &[DeviceId]) -> Result<(), FleetError> {
        let mut stored: Vec<String> = self.state.previous.values().flatten().cloned().collect();
        let unknown: Vec<DeviceId> =
            devices.iter().filter(|d| !self.state.previous.contains_key(*d)).cloned().collect();
        let current = self.fleet.current_documents(&unknown, &self.state.deployment).await?;
        for (device, current) in unknown.into_iter().zip(current) {
            let previous = match current? {
                Some((doc, _)) => {
                    let (bytes, digest) = doc.encoded()?;
                    let name = format!("prev.{}", digest.trim_start_matches("sha256:"));
                    if !stored.contains(&name) {
                        self.fleet.save_document(&self.state.deployment, &name, bytes).await?;
                        stored.push(name.clone());
                    }
                    Some(name)
                }
                None => None,
            };
            self.state.previous.insert(device, previous);
        }
        self.save().await
    }

    /// Runs the waves from the stored one on.
    async fn waves(&mut self, document: &RolloutDocument) -> Result<(), FleetError> {
        let of = self.state.wave_ends.len();
        while self.state.phase == RolloutPhase::Running && self.state.wave < of {
            let wave = self.state.wave;
            let devices = self.state.wave_devices(wave).to_vec();
            self.emit(RolloutEvent::WaveStarted { wave: wave + 1, of, devices: devices.clone() });
            if self.state.revert_on_abort {
                self.remember_previous(&devices).await?;
            }
            let written = self.write_all(&devices, document).await;
            let mut results: Vec<Option<DeviceResult>> = Vec::with_capacity(devices.len());
            let mut awaited = Vec::new();
            let mut positions = Vec::new();
            for (i, (device, w)) in devices.iter().zip(&written).enumerate() {
                match w {
                    Ok(deployed) => {
                        awaited.push(Awaited {
                            device: device.clone(),
                            generation: deployed.generation,
                            digest: Some(deployed.digest.clone()),
                        });
                        positions.push(i);
                        results.push(None);
                    }
                    Err(err) => {
                        let result = DeviceResult::not_written(wave + 1, err);
                        self.emit(RolloutEvent::Device { device: device.clone(), result: result.clone() });
                        results.push(Some(result));
                    }
                }
            }
            let last_unawaited = wave + 1 == of && !self.state.wait;
            if last_unawaited {
                for (a, &i) in awaited.iter().zip(&positions) {
                    let result = DeviceResult {
                        wave: wave + 1,
                        state: DeviceState::Written,
                        generation: a.generation,
                        check: None,
                        detail: String::new(),
                    };
                    self.emit(RolloutEvent::Device { device: a.device.clone(), result: result.clone() });
                    results[i] = Some(result);
                }
            } else if !awaited.is_empty() {
                let events = self.events.clone();
                let on_done = |k: usize, waited: &Result<_, FleetError>| {
                    let result = DeviceResult::from_wait(wave + 1, awaited[k].generation, waited);
                    emit(&events, &RolloutEvent::Device { device: awaited[k].device.clone(), result });
                };
                let waited = self.wait(&awaited, &on_done).await?;
                for ((a, &i), w) in awaited.iter().zip(&positions).zip(&waited) {
                    if matches!(w, Err(FleetError::Timeout { .. })) {
                        // Not reported as it happened: a timeout concludes at the end.
                        let result = DeviceResult::from_wait(wave + 1, a.generation, w);
                        self.emit(RolloutEvent::Device { device: a.device.clone(), result });
                    }
                    results[i] = Some(DeviceResult::from_wait(wave + 1, a.generation, w));
                }
            }
            let count = |state: DeviceState| results.iter().flatten().filter(|r| r.state == state).count();
            let (done, failed, rolled_back) = (
                count(DeviceState::Done) + count(DeviceState::Written),
                count(DeviceState::Failed),
                count(DeviceState::RolledBack),
            );
            for (device, result) in devices.iter().zip(results) {
                if let Some(result) = result {
                    self.state.results.insert(device.clone(), result);
                }
            }
            let (failures, updated) = self.state.failures();
            self.emit(RolloutEvent::WaveFinished {
                wave: wave + 1,
                done,
                failed,
                rolled_back,
                failures_so_far: failures,
            });
            self.state.wave = wave + 1;
            if self.state.max_failures.crossed(failures, updated) {
                let untouched = self.state.devices.len().saturating_sub(updated);
                let reason = format!(
                    "{failures} of {updated} devices failed (at most {} allowed); {untouched} devices not updated",
                    self.state.max_failures
                );
                self.state.reason = Some(reason.clone());
                self.state.phase =
                    if self.state.revert_on_abort { RolloutPhase::Reverting } else { RolloutPhase::Aborted };
                self.save().await?;
                self.emit(RolloutEvent::Aborted { wave: wave + 1, reason });
                return Ok(());
            }
            self.save().await?;
        }
        if self.state.phase == RolloutPhase::Running {
            self.state.phase = RolloutPhase::Completed;
            self.save().await?;
        }
        Ok(())
    }

    /// Gives one device its previous document back (`Some`: awaited), or
    /// deletes the deployment when it had none (`None`). A device whose key
    /// no longer holds what the rollout wrote (`generation`) is left as it
    /// is, unless it holds the previous document already (a revert that was
    /// interrupted after writing it): the revert undoes the rollout's write,
    /// never a later one by another operator.
    ///
    /// `current` is what the device's key holds now; `loaded` the previous
    /// documents read so far, by name (each read once for all devices).
    async fn revert_one(
        &self,
        device: &DeviceId,
        generation: u64,
        current: Result<Option<(RolloutDocument, u64)>, FleetError>,
        loaded: &mut HashMap<String, RolloutDocument>,
    ) -> Result<Revert, FleetError> {
        let deployment = &self.state.deployment;
        // No entry is "not known", never "had none": that would delete.
        let previous = match self.state.previous.get(device) {
            Some(Some(name)) => {
                if !loaded.contains_key(name) {
                    let (doc, _) = self.fleet.load_document(deployment, name).await?;
                    loaded.insert(name.clone(), doc);
                }
                let doc = loaded.get(name).map(RolloutDocument::copy).transpose()?;
                // Without its expiry: the revert is a new decision, and a
                // past expiry would have every device refuse it.
                doc.map(|doc| RolloutDocument { expires_at: None, ..doc })
            }
            Some(None) => None,
            None => return Err(self.left("its previous document was not recorded")),
        };
        let current = current?;
        let ours = current.as_ref().is_some_and(|(_, g)| *g == generation);
        let reverted_already = match (&current, &previous) {
            (None, None) => true,
            (Some((doc, _)), Some(prev)) => {
                let doc = RolloutDocument { expires_at: None, ..doc.copy()? };
                doc.encoded()?.1 == prev.encoded()?.1
            }
            _ => false,
        };
        if !ours && !reverted_already {
            let now = current.map_or_else(
                || "the deployment was deleted".into(),
                |(_, g)| format!("generation {g} was written"),
            );
            return Err(self.left(&format!("{now} since the rollout wrote generation {generation}")));
        }
        match previous {
            // Written only over the rollout's own generation: another
            // operator's write between this read and the write fails it.
            Some(doc) if ours => Ok(Revert::Write(self.request(device, doc).if_generation(Some(generation)))),
            Some(doc) => Ok(Revert::Write(self.request(device, doc))),
            None => self.fleet.delete_deployment(device, deployment).await.map(|_| Revert::Deleted),
        }
    }

    /// Reports and records how reverting `device` ended.
    fn reverted(&mut self, device: DeviceId, result: DeviceResult) {
        self.emit(RolloutEvent::Reverted { device: device.clone(), result: result.clone() });
        self.state.reverted.insert(device, result);
    }

    fn left(&self, why: &str) -> FleetError {
        FleetError::RolloutRefused {
            deployment: self.state.deployment.clone(),
            reason: format!("not reverted: {why}; left as it is"),
        }
    }

    /// Gives every device the rollout reached its previous document back,
    /// as a newer generation (generations never go back); a device that had
    /// none loses the deployment.
    async fn revert(&mut self) -> Result<(), FleetError> {
        let reached: Vec<(DeviceId, usize, u64)> = self
            .state
            .results
            .iter()
            .filter(|(device, r)| r.generation > 0 && !self.state.reverted.contains_key(*device))
            .map(|(device, r)| (device.clone(), r.wave, r.generation))
            .collect();
        let devices: Vec<DeviceId> = reached.iter().map(|(device, _, _)| device.clone()).collect();
        let current = self.fleet.current_documents(&devices, &self.state.deployment).await?;
        let mut loaded = HashMap::new();
        // The writes, all at once: the fleet batches their reads and
        // pipelines them, as for a wave.
        let (mut requests, mut writing) = (Vec::new(), Vec::new());
        for ((device, wave, generation), current) in reached.iter().zip(current) {
            match self.revert_one(device, *generation, current, &mut loaded).await {
                Ok(Revert::Write(request)) => {
                    requests.push(request);
                    writing.push((device.clone(), *wave));
                }
                Ok(Revert::Deleted) => {
                    let result = DeviceResult {
                        wave: *wave,
                        state: DeviceState::Written,
                        generation: 0,
                        check: None,
                        detail: "it had no previous document: the deployment was deleted".into(),
                    };
                    self.reverted(device.clone(), result);
                }
                Err(err) => {
                    let result = DeviceResult::not_written(*wave, &err);
                    self.reverted(device.clone(), result);
                }
            }
        }
        let written = self.fleet.write_desired_states(requests).await;
        let mut awaited = Vec::new();
        for ((device, wave), written) in writing.into_iter().zip(written) {
            match written {
                Ok(deployed) => awaited.push(Awaited {
                    device,
                    generation: deployed.generation,
                    digest: Some(deployed.digest),
                }),
                Err(err) => {
                    let result = DeviceResult::not_written(wave, &err);
                    self.reverted(device, result);
                }
            }
        }
        if !awaited.is_empty() {
            let waited = self.wait(&awaited, &|_, _| {}).await?;
            for (a, w) in awaited.iter().zip(&waited) {
                let wave = self.state.results.get(&a.device).map_or(0, |r| r.wave);
                let result = DeviceResult::from_wait(wave, a.generation, w);
                self.reverted(a.device.clone(), result);
            }
        }
        self.state.phase = RolloutPhase::Reverted;
        self.save().await
    }
}

fn emit(events: &Option<RolloutEvents>, event: &RolloutEvent) {
    tracing::debug!(?event, "rollout");
    if let Some(events) = events {
        (events.0)(event);
    }
}

impl FleetRolloutInterpret {
    fn refused(&self, reason: impl Into<String>) -> FleetError {
        FleetError::RolloutRefused {
            deployment: self.deployment.clone(),
            reason: bounded_text(&reason.into(), 1024),
        }
    }

    /// The devices, in wave order.
    async fn devices<T: RolloutStore>(&self, fleet: &T) -> Result<Vec<DeviceId>, FleetError> {
        let devices = match &self.targets {
            RolloutTargets::Devices(devices) => {
                let mut seen = std::collections::BTreeSet::new();
                devices.iter().filter(|d| seen.insert((*d).clone())).cloned().collect()
            }
            RolloutTargets::Selector(selector) => {
                let mut found: Vec<DeviceId> = fleet
                    .device_labels()
                    .await?
                    .into_iter()
                    .filter(|(_, labels)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
                    .map(|(device, _)| device)
                    .collect();
                found.sort();
                found
            }
        };
        Ok(devices)
    }

    /// A new rollout: its state stored (refused while another is active).
    async fn start<'a, T: RolloutStore>(
        &self,
        fleet: &'a T,
        document: &RolloutDocument,
    ) -> Result<Run<'a, T>, FleetError> {
        let devices = self.devices(fleet).await?;
        let ends = wave_ends(&self.waves, devices.len()).map_err(|reason| self.refused(reason))?;
        if self.wave_timeout_s == 0 || self.lease_s == 0 {
            return Err(self.refused("the wave timeout and the lease must be at least 1 s"));
        }
        let revision = match fleet.load_rollout(&self.deployment).await? {
            Some(stored) if stored.state.phase.is_active() => {
                return Err(self.refused(format!(
                    "another rollout is {} (wave {} of {}, owner {}, state written {} s ago); resume it with --resume",
                    stored.state.phase.as_str(),
                    (stored.state.wave + 1).min(stored.state.wave_ends.len()),
                    stored.state.wave_ends.len(),
                    stored.state.owner,
                    stored.age.as_secs()
                )))
            }
            Some(stored) => stored.revision,
            None => 0,
        };
        let (bytes, digest) = document.encoded()?;
        let state = RolloutState {
            format: ROLLOUT_STATE_FORMAT,
            deployment: self.deployment.clone(),
            id: random_id(),
            owner: owner(),
            document_digest: digest,
            devices,
            wave_ends: ends,
            waves: self.waves.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            max_failures: self.max_failures,
            wave_timeout_s: self.wave_timeout_s,
            wait: self.wait,
            revert_on_abort: self.revert_on_abort,
            force: self.force,
            lease_ms: self.lease_s.saturating_mul(1000),
            wave: 0,
            phase: RolloutPhase::Running,
            results: BTreeMap::new(),
            previous: BTreeMap::new(),
            reverted: BTreeMap::new(),
            started_at_ms: now_ms(),
            reason: None,
        };
        // One KV value holds the state: refused now rather than at a save mid-way.
        let largest = state.largest_encoded_size();
        if largest > crate::client::MAX_VALUE_BYTES {
            return Err(self.refused(format!(
                "{} devices{}: its state could take {largest} bytes, more than the {} one value may hold; \
                 roll out to fewer devices at once",
                state.devices.len(),
                if state.revert_on_abort { " with --revert-on-abort" } else { "" },
                crate::client::MAX_VALUE_BYTES
            )));
        }
        // Stored before the state that names it (a resume needs it); under
        // its digest, so a rival start that loses the create replaces nothing.
        fleet.save_document(&self.deployment, &state.document_name(), bytes).await?;
        let mut run = Run { fleet, state, revision, events: self.events.clone() };
        // Compare-and-set: of two operators starting at once, one wins.
        run.save().await.map_err(|err| match err {
            FleetError::RolloutTakenOver { owner, .. } => {
                self.refused(format!("another operator ({owner}) started a rollout of it at the same time"))
            }
            other => other,
        })?;
        // This rollout owns the key now: what earlier rollouts stored
        // beside it (their documents, their devices' previous documents)
        // is no longer named by any state.
        match fleet.prune_documents(&self.deployment, &run.state.document_name()).await {
            Ok(0) => {}
            Ok(pruned) => {
                tracing::info!(deployment = %self.deployment, pruned, "earlier rollouts' documents purged")
            }
            Err(err) => {
                tracing::warn!(deployment = %self.deployment, cause = %harmony_score_wire::log_text(error_chain(&err)), "earlier rollouts' documents not purged")
            }
        }
        Ok(run)
    }

    /// An interrupted rollout, taken over once its owner stopped writing.
    async fn take_over<'a, T: RolloutStore>(
        &self,
        fleet: &'a T,
    ) -> Result<(Run<'a, T>, RolloutDocument), FleetError> {
        let Some(stored) = fleet.load_rollout(&self.deployment).await? else {
            return Err(self.refused("there is no rollout to resume"));
        };
        if !stored.state.phase.is_active() {
            return Err(
                self.refused(format!("the rollout is {}: nothing to resume", stored.state.phase.as_str()))
            );
        }
        let lease = Duration::from_millis(stored.state.lease_ms);
        if stored.age < lease {
            return Err(self.refused(format!(
                "its owner {} wrote its state {} ms ago (lease {} s): it is still running; try again after the lease",
                stored.state.owner,
                stored.age.as_millis(),
                lease.as_secs()
            )));
        }
        let (document, digest) = fleet.load_document(&self.deployment, &stored.state.document_name()).await?;
        if digest != stored.state.document_digest {
            return Err(self.refused("its stored document is not the one it started with"));
        }
        let mut state = stored.state;
        state.owner = owner();
        let mut run = Run { fleet, state, revision: stored.revision, events: self.events.clone() };
        run.save().await?;
        Ok((run, document))
    }

    async fn run<T: RolloutStore>(&self, fleet: &T) -> Result<RolloutState, FleetError> {
        let (mut run, document) = if self.resume {
            self.take_over(fleet).await?
        } else {
            let document = self.document.as_ref().map_err(|e| self.refused(e.clone()))?.copy()?;
            (self.start(fleet, &document).await?, document)
        };
        let mut sizes = Vec::new();
        for w in 0..run.state.wave_ends.len() {
            sizes.push(run.state.wave_devices(w).len());
        }
        run.emit(RolloutEvent::Started {
            deployment: self.deployment.clone(),
            devices: run.state.devices.len(),
            waves: sizes,
            resumed: self.resume,
        });
        if run.state.phase == RolloutPhase::Running {
            run.waves(&document).await?;
        }
        if run.state.phase == RolloutPhase::Reverting {
            run.revert().await?;
        }
        run.emit(RolloutEvent::Finished { phase: run.state.phase });
        Ok(run.state)
    }
}

/// The outcome a finished rollout reports.
fn outcome(state: &RolloutState) -> Outcome {
    let (failed, _) = state.failures();
    let of = state.wave_ends.len();
    let (status, message) = match state.phase {
        RolloutPhase::Completed => (
            InterpretStatus::SUCCESS,
            format!(
                "{}: rollout completed: {} devices in {of} waves, {failed} failed{}",
                state.deployment,
                state.devices.len(),
                if state.wait { "" } else { " (the last wave written, not awaited)" }
            ),
        ),
        phase => (
            InterpretStatus::FAILURE,
            format!(
                "{}: rollout {} after wave {} of {of}: {}{}",
                state.deployment,
                phase.as_str(),
                state.wave,
                // Escaped: a resumed rollout's reason is what the bucket held.
                bounded_text(state.reason.as_deref().unwrap_or("stopped"), 1024),
                if phase == RolloutPhase::Reverted {
                    format!(
                        "; {} devices given their previous document back ({} of them did not confirm it)",
                        state.reverted.len(),
                        state.reverted.values().filter(|r| r.state.is_failure()).count()
                    )
                } else {
                    String::new()
                }
            ),
        ),
    };
    let details =
        if failed > 0 { state.failure_table().lines().map(str::to_owned).collect() } else { Vec::new() };
    Outcome { status, message, details }
}

#[async_trait]
impl<T: Topology + RolloutStore> Interpret<T> for FleetRolloutInterpret {
    async fn execute(&self, _inventory: &Inventory, topology: &T) -> Result<Outcome, InterpretError> {
        match self.run(topology).await {
            Ok(state) => Ok(outcome(&state)),
            Err(err) => Err(InterpretError::new(error_chain(&err))),
        }
    }

    fn get_name(&self) -> InterpretName {
        InterpretName::Custom("FleetRollout")
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

#[cfg(test)]
mod tests {
    use super::*;

    // A resumed rollout prints the reason its stored state holds.
    #[test]
    fn the_outcome_escapes_and_bounds_a_stored_reason() {
        let mut state = plan::tests::state_of(1, &[1]);
        state.phase = RolloutPhase::Aborted;
        state.reason = Some(format!("\u{1b}[2Jgone\n{}", "x".repeat(100_000)));
        let message = outcome(&state).message;
        assert!(!message.contains('\u{1b}') && !message.contains('\n'), "{message}");
        assert!(message.len() < 2048, "{}", message.len());
    }
}
