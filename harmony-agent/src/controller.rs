//! The controller: owns every deployment's state, routes inputs, and runs deployments (one run per deployment, a bounded number at once).
//!
//! Modelled on kube-runtime's `Controller`/`Runner`: the loop only routes —
//! inputs from the source, results from runs, timers — and never awaits a
//! Score itself. A run is a task ([`crate::runner`]); a newer generation or
//! a delete raises its signal so it stops at the next Score boundary, and
//! the deployment runs again once it has. What each event means for a
//! deployment is decided in [`crate::deployment`].

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use harmony_score_wire::{
    decode, decode_json, document_digest, from_cbor, now_ms, peek_generation, try_to_cbor, AgentStatus,
    DecodeLimits, DeploymentName, DeviceId, DeviceInfo, DeviceScore, ErrorKind, KeySet, ResourceId,
    ScoreStatus, StatusError,
};
use harmony_topology::{InterpretStatus, LocalDeviceTopology, Maestro, RunSignal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::commit;
use crate::config::DevicePolicy;
use crate::deployment::{
    error_policy, Accepted, Action, Deployment, LastRun, Rejection, Running, Verdict, CHECKED_HOLDS_FOR,
    FORGET_PRUNED_AFTER,
};
use crate::inbox::{Command, InboxReceiver, Input, Item};
use crate::runner::{self, PruneItem, RunEvent, RunPlan, RunResult, Timeouts};
use crate::store::{DocumentFormat, HighWater, OwnedResource, Store, StoreError, StoredDocument};
use crate::AGENT_VERSION;

/// The parts of a record a run changes, kept to tell whether to save and
/// to restore them when the save fails.
struct Persisted {
    owned: Vec<OwnedResource>,
    observed_generation: u64,
    observed_digest: Option<String>,
    last_applied_at_ms: u64,
    /// Whether the record held a last good document aside (it is dropped
    /// at a commit; kept whole only when a save must be undone).
    last_good: Option<StoredDocument>,
    verifying: Option<crate::store::Verifying>,
}

impl Persisted {
    fn of(record: &crate::store::DeploymentRecord) -> Self {
        Self {
            owned: record.owned.clone(),
            observed_generation: record.observed_generation,
            observed_digest: record.observed_digest.clone(),
            last_applied_at_ms: record.last_applied_at_ms,
            last_good: record.last_good.clone(),
            verifying: record.verifying.clone(),
        }
    }

    fn changed(&self, record: &crate::store::DeploymentRecord) -> bool {
        self.owned != record.owned
            || self.observed_generation != record.observed_generation
            || self.observed_digest != record.observed_digest
            || self.last_good.is_some() != record.last_good.is_some()
            || self.verifying != record.verifying
    }

    fn restore(self, record: &mut crate::store::DeploymentRecord) {
        record.owned = self.owned;
        record.observed_generation = self.observed_generation;
        record.observed_digest = self.observed_digest;
        record.last_applied_at_ms = self.last_applied_at_ms;
        record.last_good = self.last_good;
        record.verifying = self.verifying;
    }
}

/// Failures [`Controller::recheck`] sets, cleared when the document passes again.
const RECHECKED: [ErrorKind; 5] = [
    ErrorKind::Unsigned,
    ErrorKind::BadSignature,
    ErrorKind::WrongDevice,
    ErrorKind::Expired,
    ErrorKind::PolicyDenied,
];

/// Largest undo Score read back from a record.
const MAX_UNDO_BYTES: usize = 1024 * 1024;

/// The controller's settings.
#[derive(Debug, Clone)]
pub struct ControllerSettings {
    /// This device.
    pub device: DeviceId,
    /// Most deployments running at once.
    pub max_parallel: usize,
    /// Re-run everything (drift repair) and re-offer refused documents this often.
    pub resync: Duration,
    /// Interpret time limits.
    pub timeouts: Timeouts,
    /// How long shutdown waits for runs to reach a Score boundary.
    pub shutdown_grace: Duration,
    /// Reported in status.
    pub heartbeat: Duration,
    /// Published in status.
    pub info: DeviceInfo,
    /// The device owner's limits.
    pub policy: DevicePolicy,
    /// Whose signatures are accepted.
    pub trust: harmony_score_wire::TrustedKeys,
    /// Whether bare documents are accepted.
    pub allow_unsigned: bool,
    /// The root keys that sign key sets; empty: key sets are ignored.
    pub root_keys: harmony_score_wire::TrustedKeys,
}

/// The key set the device accepted last, and the trust it gives.
struct HeldKeySet {
    keyset: KeySet,
    trust: harmony_score_wire::TrustedKeys,
    bytes: Vec<u8>,
}

/// Runs a device's deployments against its topology.
pub struct Controller {
    settings: ControllerSettings,
    maestro: Arc<Maestro<LocalDeviceTopology>>,
    store: Arc<Store>,
    timeouts: Arc<Timeouts>,
    limits: DecodeLimits,
    instance_id: String,
    deployments: BTreeMap<DeploymentName, Deployment>,
    /// Deployments waiting for a free slot, each once.
    ready: VecDeque<DeploymentName>,
    running: usize,
    next_run_id: u64,
    events_tx: mpsc::UnboundedSender<RunEvent>,
    events_rx: mpsc::UnboundedReceiver<RunEvent>,
    tasks: JoinSet<()>,
    stopping: bool,
    dirty: bool,
    /// Problems of the device as a whole, reported in status.
    device_errors: Vec<StatusError>,
    /// The root-signed key set in force; `None`: the configured keys are.
    keyset: Option<HeldKeySet>,
    /// Why the last key set offered was refused.
    keyset_error: Option<StatusError>,
    /// The persisted key set could not be used: no key is trusted (not
    /// even the configured ones, which it may have revoked) until a valid
    /// key set arrives.
    keyset_unusable: bool,
}

impl Controller {
    /// A controller over `store`; [`Controller::boot`] loads what it holds.
    pub fn new(settings: ControllerSettings, maestro: Maestro<LocalDeviceTopology>, store: Store) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Self {
            timeouts: Arc::new(settings.timeouts.clone()),
            settings,
            maestro: Arc::new(maestro),
            store: Arc::new(store),
            limits: DecodeLimits::default(),
            instance_id: instance_id(),
            deployments: BTreeMap::new(),
            ready: VecDeque::new(),
            running: 0,
            next_run_id: 1,
            events_tx,
            events_rx,
            tasks: JoinSet::new(),
            stopping: false,
            dirty: true,
            device_errors: Vec::new(),
            keyset: None,
            keyset_error: None,
            keyset_unusable: false,
        }
    }

    /// Loads every persisted deployment and schedules it: a device that
    /// boots offline runs what it last accepted and finishes interrupted
    /// prunes. Unreadable records are reported, not skipped.
    pub fn boot(&mut self) {
        self.load_keyset();
        let loaded = match self.store.load_all() {
            Ok(loaded) => loaded,
            Err(err) => {
                error!(cause = %harmony_score_wire::log_text(&err), "cannot list persisted state");
                let message = format!("cannot list persisted state: {err}");
                self.device_errors.push(StatusError::new(ErrorKind::StateUnreadable, message));
                Vec::new()
            }
        };
        for (name, record) in loaded {
            let mut entry = Deployment::default();
            match record {
                Ok(record) => {
                    let mut adopt = true;
                    if let Some(stored) = &record.document {
                        // Verified when it was accepted; the envelope is only opened here.
                        let payload = harmony_score_wire::payload_of(&stored.bytes).unwrap_or_default();
                        match self.decode(&payload, stored.format) {
                            // A record copied or renamed under another name:
                            // what it owns is another deployment's. Kept
                            // aside, never run, never pruned.
                            Ok(doc) if doc.deployment != name => {
                                let message = format!("holds the document of deployment {}", doc.deployment);
                                let err = self.store.set_aside(&name, message);
                                error!(deployment = %name, cause = %harmony_score_wire::log_text(&err), "persisted state is another deployment's; kept aside");
                                entry.failure =
                                    Some(StatusError::new(ErrorKind::StateUnreadable, err.to_string()));
                                adopt = false;
                            }
                            Ok(doc) => entry.document = Some(Accepted::new(doc)),
                            Err(err) => {
                                error!(deployment = %name, cause = %harmony_score_wire::log_text(&err), "persisted document cannot run on this agent");
                                let message = format!(
                                    "persisted generation {} cannot run on this agent: {err}",
                                    stored.generation
                                );
                                entry.failure = Some(StatusError::new(err.kind(), message));
                            }
                        }
                    }
                    if adopt {
                        entry.record = record;
                    }
                }
                Err(err) => {
                    error!(deployment = %name, cause = %harmony_score_wire::log_text(&err), "persisted state unreadable; kept aside, reading the key again");
                    entry.failure = Some(StatusError::new(ErrorKind::StateUnreadable, err.to_string()));
                }
            }
            self.deployments.insert(name.clone(), entry);
            self.schedule(&name, false);
        }
        info!(deployments = self.deployments.len(), "applying persisted desired state");
    }

    /// Every deployment the device has state for, so a source can look up
    /// keys that were deleted while the agent was down.
    pub fn known_deployments(&self) -> Vec<DeploymentName> {
        self.deployments
            .iter()
            // A generation failed in place has no work but is still held:
            // its key deleted while the agent was down must be seen.
            .filter(|(_, d)| d.has_work() || d.failure.is_some() || d.record.document.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The agent process's id, fresh at every start.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Routes inputs and run results until `shutdown`, publishing status on
    /// `status` after every change; then stops runs at a Score boundary
    /// (aborting what is still running after the grace period).
    pub async fn run(
        mut self,
        mut inbox: InboxReceiver,
        status: watch::Sender<Arc<AgentStatus>>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let resync = self.settings.resync;
        let mut next_resync = first_tick(resync);
        self.start_ready().await;
        self.publish(&status);
        loop {
            let retry_at = self.next_retry();
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(event) = self.events_rx.recv() => {
                    self.on_event(event).await;
                    // Events already there are taken with it and the status
                    // published once: a quick run's progress and end
                    // arrive together.
                    while let Ok(event) = self.events_rx.try_recv() {
                        self.on_event(event).await;
                    }
                }
                item = inbox.recv() => match item {
                    Item::Input(input) => self.handle(input).await,
                    Item::Command(command) => self.command(command).await,
                    Item::KeySet(bytes) => self.offer_keyset(&bytes).await,
                },
                () = tokio::time::sleep_until(next_resync) => {
                    next_resync = tokio::time::Instant::now() + jittered(resync);
                    self.resync().await;
                }
                () = sleep_until(retry_at), if retry_at.is_some() => self.run_due_retries(Instant::now()),
                Some(joined) = self.tasks.join_next() => {
                    if let Err(err) = joined {
                        if !err.is_cancelled() {
                            error!(cause = %harmony_score_wire::log_text(&err), "a run task failed");
                        }
                    }
                }
            }
            self.start_ready().await;
            self.publish(&status);
        }
        debug!(coalesced = inbox.coalesced(), "inputs replaced by newer ones before they ran");
        self.stop(&status).await;
    }

    fn publish(&mut self, status: &watch::Sender<Arc<AgentStatus>>) {
        if std::mem::take(&mut self.dirty) {
            status.send_replace(Arc::new(self.status()));
        }
    }

    async fn stop(&mut self, status: &watch::Sender<Arc<AgentStatus>>) {
        self.stopping = true;
        self.ready.clear();
        for d in self.deployments.values() {
            if let Some(run) = &d.running {
                run.signal.cancel();
            }
        }
        let deadline = tokio::time::Instant::now() + self.settings.shutdown_grace;
        while self.running > 0 {
            tokio::select! {
                Some(event) = self.events_rx.recv() => self.on_event(event).await,
                () = tokio::time::sleep_until(deadline) => {
                    warn!(runs = self.running, "runs did not reach a Score boundary in time; aborted");
                    self.tasks.abort_all();
                    break;
                }
            }
        }
        self.dirty = true;
        self.publish(status);
    }

    async fn handle(&mut self, input: Input) {
        match input {
            Input::Document { deployment, bytes, format } => self.offer(&deployment, bytes, format).await,
            Input::Deleted { deployment } => self.delete(&deployment).await,
        }
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::ReconcileNow { reply } => {
                let scheduled = self.resync().await;
                let failing = self.status().deployments.values().filter(|d| d.error.is_some()).count();
                let _ = reply.send(format!(
                    "reconcile scheduled for {scheduled} deployments ({} running, {failing} failing or refused)",
                    self.running
                ));
            }
        }
    }

    fn decode(
        &self,
        bytes: &[u8],
        format: DocumentFormat,
    ) -> Result<harmony_score_wire::DesiredState, harmony_score_wire::DecodeError> {
        match format {
            DocumentFormat::Cbor => decode(bytes, &self.limits),
            DocumentFormat::Json => decode_json(bytes, &self.limits),
        }
    }

    /// Whether the accepted document's expiry has passed: the one check
    /// that time alone changes, made before every run.
    fn expired(&self, name: &DeploymentName) -> Option<StatusError> {
        let doc = &self.deployments.get(name)?.document.as_ref()?.doc;
        let expires_at = doc.expires_at?;
        (expires_at <= now_ms() / 1000).then(|| {
            let message = format!(
                "accepted generation {} expired at {expires_at} (seconds since the epoch)",
                doc.generation
            );
            StatusError::new(ErrorKind::Expired, message)
        })
    }

    /// Checks an accepted document again as if it were offered now:
    /// signature, device, expiry and policy. `None` when it may run.
    async fn recheck(&self, name: &DeploymentName) -> Option<StatusError> {
        let entry = self.deployments.get(name)?;
        let (stored, accepted) = (entry.record.document.as_ref()?, entry.document.as_ref()?);
        if let Err((kind, message)) = self.verified_payload(&stored.bytes, stored.format, false) {
            return Some(StatusError::new(
                kind,
                format!("accepted generation {}: {message}", stored.generation),
            ));
        }
        let doc = &accepted.doc;
        if doc.device_id != self.settings.device {
            return Some(StatusError::new(
                ErrorKind::WrongDevice,
                format!("document is for device {}", doc.device_id),
            ));
        }
        if let Some(expired) = self.expired(name) {
            return Some(expired);
        }
        if let Some(message) = self.settings.policy.refused_score(doc) {
            return Some(StatusError::new(ErrorKind::PolicyDenied, message));
        }
        // Every path allowed (the default): nothing for the filesystem to
        // say, and no hand-off to the blocking pool to hear it.
        if self.settings.policy.allows_path("/") {
            return None;
        }
        let (topology, policy, judged) =
            (self.maestro.topology().clone(), self.settings.policy.clone(), accepted.judged_paths.clone());
        let outside =
            tokio::task::spawn_blocking(move || outside_policy(&topology, &policy, &judged)).await.ok()?;
        outside.map(|(kind, message)| StatusError::new(kind, message))
    }

    /// The document inside `bytes` once its signatures hold: a signed
    /// envelope must carry enough valid signatures by trusted keys (the key
    /// set's, once one is accepted); a bare document is accepted only with
    /// `allow_unsigned`. With `fresh` (a document offered now, not one
    /// accepted before) the key set must not have expired.
    fn verified_payload(
        &self,
        bytes: &[u8],
        format: DocumentFormat,
        fresh: bool,
    ) -> Result<Vec<u8>, (ErrorKind, String)> {
        let no_keys = harmony_score_wire::TrustedKeys::new(Vec::new(), 1);
        let trust = match &self.keyset {
            Some(held) => {
                if fresh && held.keyset.expired(now_ms() / 1000) && harmony_score_wire::is_signed(bytes) {
                    return Err((
                        ErrorKind::KeysetExpired,
                        format!(
                            "the key set this device trusts (version {}) expired at {}: no new document is accepted until the root signs a newer one",
                            held.keyset.version, held.keyset.expires_at
                        ),
                    ));
                }
                &held.trust
            }
            None if self.keyset_unusable => &no_keys,
            None => &self.settings.trust,
        };
        // JSON (folder sources) cannot be signed: it passes only unsigned.
        let allow_unsigned = self.settings.allow_unsigned;
        let opened = match format {
            DocumentFormat::Cbor => trust.open(bytes, allow_unsigned),
            DocumentFormat::Json if allow_unsigned => Ok(bytes.to_vec()),
            DocumentFormat::Json => Err(harmony_score_wire::SignatureError::Unsigned),
        };
        opened.map_err(|e| (e.kind(), e.to_string()))
    }

    /// Offers the current value of a deployment's key: decoded, judged,
    /// checked for resource conflicts, persisted, then run (superseding a
    /// run of an older generation).
    pub async fn offer(&mut self, name: &DeploymentName, bytes: Vec<u8>, format: DocumentFormat) {
        let digest = document_digest(&bytes);
        // Signatures first: nothing of an unverified document is decoded
        // into Scores. The digest stays that of the bytes as stored.
        let payload = match self.verified_payload(&bytes, format, true) {
            Ok(payload) => payload,
            Err((kind, message)) => {
                let generation = peek_generation(&bytes, &self.limits);
                // A new key set may make it acceptable: kept to offer again then.
                let keep = (!self.settings.root_keys.is_empty()).then_some((bytes, format));
                return self.reject(name, generation, digest, kind, message, keep);
            }
        };
        let doc = match self.decode(&payload, format) {
            Ok(doc) => doc,
            Err(err) => {
                let generation = match format {
                    DocumentFormat::Cbor => peek_generation(&payload, &self.limits),
                    DocumentFormat::Json => None,
                };
                let keep = err.kind().may_clear().then_some((bytes, format));
                return self.reject(name, generation, digest, err.kind(), err.to_string(), keep);
            }
        };
        let entry = self.deployments.entry(name.clone()).or_default();
        match entry.judge(&self.settings.device, name, &doc, &digest, now_ms() / 1000) {
            Verdict::Unchanged => {
                // The key holds the accepted document again: a refusal of
                // what it held in between no longer describes the key.
                if entry.rejected.take().is_some() {
                    self.dirty = true;
                }
                return;
            }
            Verdict::Reject(kind, message) => {
                return self.reject(name, Some(doc.generation), digest, kind, message, None);
            }
            Verdict::Accept => {}
        }
        let accepted = Accepted::new(doc);
        let others = self.others(name);
        if let Some(message) = self.settings.policy.refused_score(&accepted.doc) {
            let generation = Some(accepted.doc.generation);
            return self.reject(name, generation, digest, ErrorKind::PolicyDenied, message, None);
        }
        // Undos are recorded (and persisted) before anything runs, so a
        // crash mid-run never forgets a resource.
        let undos = match undos_of(&accepted.doc) {
            Ok(undos) => undos,
            Err(message) => {
                let generation = Some(accepted.doc.generation);
                return self.reject(name, generation, digest, ErrorKind::InvalidScore, message, None);
            }
        };
        let generation = accepted.doc.generation;
        // The record as it will be once accepted, built on a copy: the
        // checks below may still refuse the document.
        let mut record = self.deployments.get(name).map(|e| e.record.clone()).unwrap_or_default();
        for owned in undos {
            record.owned.retain(|o| o.resource != owned.resource);
            record.owned.push(owned);
        }
        record.high_water = Some(HighWater { generation, digest: digest.clone() });
        // The committed document stays on disk as what a failed check rolls back to.
        let stored = StoredDocument { bytes: bytes.clone(), format, digest: digest.clone(), generation };
        commit::accept(&mut record, stored);
        // One hand-off to the blocking pool: the policy and the conflicts by
        // what the device's filesystem makes of each path (a symlinked
        // parent is an alias: `/lib/x` is `/usr/lib/x` on a merged-/usr
        // device), then, only if both pass, the record persisted.
        let (topology, mine) = (self.maestro.topology().clone(), accepted.resources.clone());
        let (policy, judged) = (self.settings.policy.clone(), accepted.judged_paths.clone());
        let (store, key) = (self.store.clone(), name.clone());
        let checked = tokio::task::spawn_blocking(move || {
            match outside_policy(&topology, &policy, &judged)
                .or_else(|| alias_clash(&topology, &mine, &others))
            {
                Some(clash) => Err(clash),
                None => Ok((store.save(&key, &record), record)),
            }
        })
        .await
        .unwrap_or_else(|join| Err((ErrorKind::ResourceConflict, format!("conflict check failed: {join}"))));
        let (saved, record) = match checked {
            Ok(checked) => checked,
            Err((kind, message)) => {
                let keep = kind.may_clear().then_some((bytes, format));
                return self.reject(name, Some(generation), digest, kind, message, keep);
            }
        };
        info!(deployment = %name, generation, scores = accepted.doc.scores.len(), "accepted");
        let entry = self.deployments.entry(name.clone()).or_default();
        entry.record = record;
        entry.document = Some(accepted);
        entry.health.clear();
        entry.rejected = None;
        entry.failure = None;
        entry.pruned_at = None;
        entry.retry = None;
        entry.checked_at = Some(Instant::now());
        self.dirty = true;
        if self.after_save(name, saved) {
            self.schedule(name, true);
        }
    }

    /// The deployment's key is gone: undo everything it owns.
    pub async fn delete(&mut self, name: &DeploymentName) {
        let Some(entry) = self.deployments.get_mut(name) else { return };
        if entry.record.document.is_none() && entry.rejected.is_none() && entry.failure.is_none() {
            return; // already deleted (its prune runs or ran)
        }
        // A delete marker carries no signature: where documents must be
        // signed, whoever can write the bucket could otherwise prune a
        // fleet. Only a signed document without Scores retires what runs.
        let runs_something = match &entry.document {
            Some(accepted) => !accepted.doc.scores.is_empty(),
            None => entry.record.document.is_some(),
        };
        if !self.settings.allow_unsigned && runs_something {
            let message = "the key was deleted, but this device requires signed documents: nothing is pruned until a signed document without Scores retires the deployment (harmony-fleet delete with a signing key)";
            let (kind, digest) = (ErrorKind::UnsignedDelete, String::new());
            return self.reject(name, None, digest, kind, message.into(), None);
        }
        info!(deployment = %name, "deleted; pruning");
        let had_document = entry.record.document.is_some();
        commit::forget(&mut entry.record);
        entry.document = None;
        entry.health.clear();
        entry.rejected = None;
        // An unreadable record's resources are unknown, so nothing can be
        // pruned for it: keep saying so rather than vanish from status.
        entry.failure = entry.failure.take().filter(|f| f.kind == ErrorKind::StateUnreadable).map(|f| {
            StatusError::new(
                f.kind,
                format!(
                    "deleted, but its state was unreadable: what it owned was not pruned ({})",
                    f.message
                ),
            )
        });
        entry.retry = None;
        self.dirty = true;
        let saved = self.save(name).await;
        // Nothing owned is left to undo (Scores without an undo, such as an
        // absent file): no run will say `pruned`, so say it now.
        if let Some(entry) = self.deployments.get_mut(name) {
            if saved && had_document && entry.running.is_none() && entry.record.is_tombstone() {
                info!(deployment = %name, "pruned");
                entry.pruned_at = Some(Instant::now());
            }
        }
        self.schedule(name, true);
        // What the document only named (no undo) is free from now on.
        self.reoffer_clearable(Some(name)).await;
    }

    fn reject(
        &mut self,
        name: &DeploymentName,
        generation: Option<u64>,
        digest: String,
        kind: ErrorKind,
        message: String,
        retry_bytes: Option<(Vec<u8>, DocumentFormat)>,
    ) {
        let entry = self.deployments.entry(name.clone()).or_default();
        if entry.rejected.as_ref().is_some_and(|r| r.digest == digest && r.error.kind == kind) {
            return; // already reported
        }
        warn!(deployment = %name, ?generation, kind = %kind, message = %harmony_score_wire::log_text(&message), "document rejected");
        entry.rejected =
            Some(Rejection { generation, digest, error: StatusError::new(kind, message), retry_bytes });
        entry.pruned_at = None;
        self.dirty = true;
    }

    /// Persists a deployment's record; a failure makes it FAILED
    /// (`persist_failed`) and schedules a retry instead of a run.
    async fn save(&mut self, name: &DeploymentName) -> bool {
        let Some(entry) = self.deployments.get(name) else { return false };
        // On the blocking pool: an fsync on slow flash takes long, and the
        // source and the runs share this runtime.
        let (store, record, key) = (self.store.clone(), entry.record.clone(), name.clone());
        let saved =
            tokio::task::spawn_blocking(move || store.save(&key, &record)).await.unwrap_or_else(|join| {
                Err(StoreError::IoFailed {
                    path: "(save task)".into(),
                    source: std::io::Error::other(join.to_string()),
                })
            });
        self.after_save(name, saved)
    }

    /// Takes a save's result: a failure makes the deployment FAILED
    /// (`persist_failed`) and schedules a retry instead of a run.
    fn after_save(&mut self, name: &DeploymentName, saved: Result<(), StoreError>) -> bool {
        let Some(entry) = self.deployments.get_mut(name) else { return false };
        match saved {
            Ok(()) => {
                if entry.failure.as_ref().is_some_and(|f| f.kind == ErrorKind::PersistFailed) {
                    entry.failure = None;
                }
                true
            }
            Err(err) => {
                error!(deployment = %name, cause = %harmony_score_wire::log_text(&err), "cannot persist deployment state");
                entry.failure = Some(StatusError::new(ErrorKind::PersistFailed, err.to_string()));
                let attempt = entry.retry.map_or(0, |(a, _)| a + 1);
                if let Action::RequeueAfter(delay) = error_policy(false, false, attempt, jitter()) {
                    entry.retry = Some((attempt, Instant::now() + delay));
                }
                self.dirty = true;
                false
            }
        }
    }

    /// Queues a run of `name`; a run in progress is marked to run again and,
    /// with `supersede`, told to stop at its next Score boundary.
    fn schedule(&mut self, name: &DeploymentName, supersede: bool) {
        let Some(entry) = self.deployments.get_mut(name) else { return };
        if let Some(run) = &entry.running {
            entry.rerun = true;
            if supersede {
                run.signal.cancel();
            }
            return;
        }
        if entry.has_work() && !self.ready.contains(name) {
            self.ready.push_back(name.clone());
        }
    }

    async fn start_ready(&mut self) {
        while !self.stopping && self.running < self.settings.max_parallel {
            let Some(name) = self.ready.pop_front() else { break };
            self.start_run(&name).await;
        }
    }

    async fn start_run(&mut self, name: &DeploymentName) {
        let Some(entry) = self.deployments.get_mut(name) else { return };
        if entry.running.is_some() || !entry.has_work() {
            return;
        }
        if entry.failure.as_ref().is_some_and(|f| f.kind == ErrorKind::PersistFailed)
            && !self.save(name).await
        {
            return;
        }
        // What was accepted once is checked again before every run (after a
        // restart, at every drift repair): a key removed from the trusted
        // set, a narrowed policy or a passed expiry stops it from running.
        // Nothing is undone: it stays owned, and a newer document replaces it.
        // A document its offer checked a moment ago is not checked twice.
        let Some(entry) = self.deployments.get_mut(name) else { return };
        let just_checked = entry.checked_at.take().is_some_and(|at| at.elapsed() < CHECKED_HOLDS_FOR);
        // Its expiry is checked still: a run can start later than its offer
        // (after the run before it ends), and time alone expires a document.
        let refusal = if just_checked { self.expired(name) } else { self.recheck(name).await };
        if let Some(refusal) = refusal {
            let Some(entry) = self.deployments.get_mut(name) else { return };
            if entry.failure.as_ref() != Some(&refusal) {
                warn!(deployment = %name, kind = %refusal.kind, message = %harmony_score_wire::log_text(&refusal.message), "accepted document no longer passes its checks; not run");
                entry.failure = Some(refusal);
                self.dirty = true;
            }
            return;
        }
        let Some(entry) = self.deployments.get_mut(name) else { return };
        if entry.failure.as_ref().is_some_and(|f| RECHECKED.contains(&f.kind)) {
            entry.failure = None;
            self.dirty = true;
        }
        let wanted: HashSet<_> = entry.wanted().collect();
        let mut prune = Vec::new();
        let mut unreadable_undos = Vec::new();
        for owned in entry.record.owned.iter().rev().filter(|o| !wanted.contains(&o.resource)) {
            // Read back from disk: validated like any Score from outside
            // before it runs (a Score's `resource()` and Interpret rely on it).
            let undo = from_cbor::<Box<dyn DeviceScore>>(&owned.undo, MAX_UNDO_BYTES, "undo score")
                .map_err(|err| err.to_string())
                .and_then(|undo| undo.validate().map(|()| undo).map_err(|err| err.to_string()));
            match undo {
                Ok(undo) => prune.push(PruneItem { resource: owned.resource.clone(), undo: Arc::from(undo) }),
                Err(err) => unreadable_undos.push(ScoreStatus {
                    tag: String::new(),
                    name: format!("prune {}", owned.resource),
                    resource: owned.resource.to_string(),
                    status: InterpretStatus::FAILURE,
                    message: harmony_score_wire::bounded_text(
                        &format!("pruned: this agent cannot run the undo: {err}"),
                        512,
                    ),
                    details: Vec::new(),
                    error_kind: None,
                }),
            }
        }
        let run_id = self.next_run_id;
        self.next_run_id += 1;
        let signal = RunSignal::for_deployment(name.as_str());
        let document = entry.document.as_ref().map(|a| a.doc.clone());
        entry.running = Some(Running {
            run_id,
            generation: document.as_ref().map(|d| d.generation),
            signal: signal.clone(),
            current: None,
            verifying: false,
        });
        entry.rerun = false;
        entry.retry = entry.retry.map(|(attempt, _)| (attempt, far_future()));
        self.running += 1;
        self.dirty = true;
        let plan = RunPlan { run_id, deployment: name.clone(), document, prune, signal };
        let (maestro, timeouts, events) =
            (self.maestro.clone(), self.timeouts.clone(), self.events_tx.clone());
        let (deployment, panic_events) = (name.clone(), self.events_tx.clone());
        self.tasks.spawn(async move {
            let run =
                std::panic::AssertUnwindSafe(runner::execute(maestro, timeouts, plan, events)).catch_unwind();
            if run.await.is_err() {
                // A panicking Interpret must not leave the deployment running forever.
                let mut result = RunResult::default();
                result.scores.push(ScoreStatus {
                    tag: String::new(),
                    name: "run".into(),
                    resource: String::new(),
                    status: InterpretStatus::FAILURE,
                    message: "an Interpret panicked".into(),
                    details: Vec::new(),
                    error_kind: None,
                });
                let _ = panic_events.send(RunEvent::Finished { deployment, run_id, result });
            }
        });
        if !unreadable_undos.is_empty() {
            if let Some(entry) = self.deployments.get_mut(name) {
                entry.pending_failures = unreadable_undos;
            }
        }
    }

    async fn on_event(&mut self, event: RunEvent) {
        match event {
            RunEvent::Progress { deployment, run_id, current } => {
                if let Some(run) = self.deployments.get_mut(&deployment).and_then(|d| d.running.as_mut()) {
                    if run.run_id == run_id {
                        run.current = Some(current);
                        self.dirty = true;
                    }
                }
            }
            RunEvent::Finished { deployment, run_id, result } => {
                self.finish(&deployment, run_id, result).await
            }
            RunEvent::Checking { deployment, run_id, checks } => {
                let entry = self.deployments.get_mut(&deployment);
                if let Some(entry) = entry.filter(|d| d.running.as_ref().is_some_and(|r| r.run_id == run_id))
                {
                    entry.health = checks;
                    self.dirty = true;
                }
            }
            RunEvent::Verified { deployment, run_id, verification } => {
                self.verified(&deployment, run_id, verification).await
            }
        }
    }

    async fn finish(&mut self, name: &DeploymentName, run_id: u64, mut result: RunResult) {
        let Some(entry) = self.deployments.get_mut(name) else { return };
        let Some(run) = entry.running.take_if(|r| r.run_id == run_id) else { return };
        self.running -= 1;
        self.dirty = true;
        let pending = std::mem::take(&mut entry.pending_failures);
        result.prune_failures += pending.len();
        result.scores.extend(pending);

        // What a run can change in the record (the document cannot): not a
        // clone of the whole record, which holds up to a 1 MiB document.
        let before = Persisted::of(&entry.record);
        let wanted: HashSet<_> = entry.wanted().cloned().collect();
        let pruned: HashSet<_> = result.pruned.iter().filter(|r| !wanted.contains(*r)).collect();
        entry.record.owned.retain(|o| !pruned.contains(&o.resource));
        let ownership_changed = !pruned.is_empty();
        let mut applied = None;
        if result.cancelled {
            if run.generation.is_some() && run.generation != entry.generation() {
                entry.superseded_generation = run.generation;
                info!(deployment = %name, generation = ?run.generation, "run superseded by a newer generation");
            }
        } else {
            let ok = result.all_ok();
            let now = now_ms();
            if ok {
                if let (Some(generation), Some(stored)) = (run.generation, &entry.record.document) {
                    if stored.generation == generation {
                        applied = Some((generation, stored.digest.clone(), now));
                    }
                }
                entry.retry = None;
            } else {
                let attempt = entry.retry.map_or(0, |(a, _)| a + 1);
                if let Action::RequeueAfter(delay) = error_policy(ok, false, attempt, jitter()) {
                    warn!(deployment = %name, attempt, retry_in = ?delay, "deployment failed");
                    entry.retry = Some((attempt, Instant::now() + delay));
                }
            }
            entry.last_run = Some(LastRun {
                generation: run.generation,
                scores: result.scores,
                prune_failures: result.prune_failures,
                ok,
                at_ms: now,
            });
        }
        // Applied is committed unless the document asks for verification:
        // then "verifying N" is persisted (below) before any check runs.
        let mut verify = false;
        let mut give_up = None;
        if let Some((_, _, at)) = &applied {
            // A document without Scores retires the deployment: nothing to verify.
            let gated = entry.document.as_ref().is_some_and(|a| a.plan.is_some() && !a.doc.scores.is_empty());
            match commit::after_apply(&entry.record, gated, *at) {
                commit::AfterApply::Commit => commit::commit(&mut entry.record, *at),
                commit::AfterApply::Verify(verifying) => {
                    info!(deployment = %name, generation = verifying.generation, interruptions = verifying.interruptions, "applied; verifying its health checks");
                    entry.record.verifying = Some(verifying);
                    verify = true;
                }
                commit::AfterApply::Fail { check, output } => give_up = Some((check, output)),
            }
        }
        // A signed document without Scores retires the deployment: once it
        // ran and nothing is owned, the record keeps only its high-water
        // mark, as after a delete.
        let retired = applied.is_some()
            && entry.document.as_ref().is_some_and(|a| a.doc.scores.is_empty())
            && entry.record.owned.is_empty();
        if retired {
            commit::forget(&mut entry.record);
            entry.document = None;
        }
        let deleted_and_undone = entry.record.document.is_none() && entry.record.owned.is_empty();
        // Only what says something new is written: a drift repair that held
        // moves `last_applied_at_ms` in memory (status) without an fsync.
        let changed = retired || before.changed(&entry.record);
        let rerun = entry.rerun;
        if changed && !self.save(name).await {
            // Not persisted, so not applied: the observed generation stays
            // what the disk says, and the run is retried. Nor undone: what
            // the disk says is owned stays owned (no other deployment may
            // take it), and the undo runs again once saves work.
            if let Some(entry) = self.deployments.get_mut(name) {
                before.restore(&mut entry.record);
                if let Some(last) = &mut entry.last_run {
                    last.ok = false;
                }
            }
            verify = false;
            give_up = None;
        } else if deleted_and_undone {
            // Also when the run was cancelled (a delete during its last
            // Score): nothing is left to run, so nothing else would say it.
            if let Some(entry) = self.deployments.get_mut(name) {
                if entry.rejected.is_none() && entry.pruned_at.is_none() {
                    info!(deployment = %name, "pruned");
                    entry.pruned_at = Some(Instant::now());
                }
            }
        }
        if verify {
            self.start_verification(name);
        } else if let Some((check, output)) = give_up {
            self.health_failed(name, check, output).await;
        }
        if rerun {
            self.schedule(name, false);
        }
        if ownership_changed || deleted_and_undone {
            self.reoffer_clearable(Some(name)).await;
        }
    }

    /// Offers again every refused document whose reason may have cleared
    /// (a conflicting owner went away, an upgrade brought a tag), except `skip`'s.
    async fn reoffer_clearable(&mut self, skip: Option<&DeploymentName>) {
        let offers: Vec<_> = self
            .deployments
            .iter_mut()
            .filter(|(n, _)| Some(*n) != skip)
            .filter_map(|(n, d)| {
                let rejected = d.rejected.as_mut()?;
                let (bytes, format) = rejected.retry_bytes.clone()?;
                // Offered as the source would; a refusal that still holds is
                // recognised by `reject` (same digest and kind) and not re-reported.
                Some((n.clone(), bytes, format))
            })
            .collect();
        for (name, bytes, format) in offers {
            self.offer(&name, bytes, format).await;
        }
    }

    /// Drift repair and re-evaluation: re-offers refused documents whose
    /// reason may clear, schedules every deployment with work, and forgets
    /// long-pruned ones. Returns how many deployments were scheduled.
    async fn resync(&mut self) -> usize {
        let now = Instant::now();
        for d in self.deployments.values_mut() {
            let long_pruned =
                d.pruned_at.is_some_and(|at| now.saturating_duration_since(at) >= FORGET_PRUNED_AFTER);
            if d.running.is_none() && long_pruned {
                // Gone from status, but the record stays: its high-water
                // mark keeps a replayed old generation refused.
                *d = Deployment { record: std::mem::take(&mut d.record), ..Deployment::default() };
            }
        }
        self.reoffer_clearable(None).await;
        let names: Vec<_> =
            self.deployments.iter().filter(|(_, d)| d.has_work()).map(|(n, _)| n.clone()).collect();
        for name in &names {
            self.schedule(name, false);
        }
        self.dirty = true;
        names.len()
    }

    fn next_retry(&self) -> Option<Instant> {
        self.deployments
            .values()
            .filter(|d| d.running.is_none())
            .filter_map(|d| d.retry.map(|(_, at)| at))
            .min()
    }

    fn run_due_retries(&mut self, now: Instant) {
        let due: Vec<_> = self
            .deployments
            .iter()
            .filter(|(_, d)| d.running.is_none() && d.retry.is_some_and(|(_, at)| at <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if let Some(entry) = self.deployments.get_mut(&name) {
                entry.retry = entry.retry.map(|(attempt, _)| (attempt, far_future()));
            }
            self.schedule(&name, false);
        }
    }

    /// Every other deployment's resources (owned or wanted), to find conflicts with `name`'s.
    fn others(&self, name: &DeploymentName) -> Vec<(DeploymentName, Vec<ResourceId>)> {
        self.deployments
            .iter()
            .filter(|(other, _)| *other != name)
            .map(|(other, d)| (other.clone(), d.resources().cloned().collect()))
            .collect()
    }

    /// The device's whole status as of now.
    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            device_id: self.settings.device.clone(),
            agent_version: AGENT_VERSION.to_owned(),
            updated_at_ms: now_ms(),
            heartbeat_at_ms: now_ms(),
            heartbeat_interval_ms: u64::try_from(self.settings.heartbeat.as_millis()).unwrap_or(u64::MAX),
            info: Some(self.settings.info.clone()),
            deployments: self
                .deployments
                .iter()
                .filter(|(_, d)| d.is_visible())
                .map(|(n, d)| (n.clone(), d.status()))
                .collect(),
            instance_id: self.instance_id.clone(),
            errors: self
                .device_errors
                .iter()
                .chain(&self.keyset_error)
                .cloned()
                .chain(self.keyset_expiry())
                .collect(),
            keyset_version: self.keyset.as_ref().map(|held| held.keyset.version),
            truncated: false,
        }
    }
}

/// What undoes each Score of `doc`, by the resource it owns, as the record
/// keeps it (persisted before anything of the document runs).
fn undos_of(doc: &harmony_score_wire::DesiredState) -> Result<Vec<OwnedResource>, String> {
    let mut undos = Vec::new();
    for score in &doc.scores {
        if let Some(undo) = score.undo() {
            let bytes = try_to_cbor(&undo)
                .map_err(|err| format!("cannot record the undo of {}: {err}", score.name()))?;
            undos.push(OwnedResource { resource: score.resource(), undo: bytes });
        }
    }
    Ok(undos)
}

/// The first path the policy does not allow, by its name and by what the
/// device's filesystem makes of it (a symlinked parent must not lead out).
pub(crate) fn outside_policy(
    topology: &LocalDeviceTopology,
    policy: &DevicePolicy,
    mine: &[ResourceId],
) -> Option<(ErrorKind, String)> {
    // The allowed paths as the device's filesystem makes them too: on a
    // merged-/usr device `/lib/firmware` is `/usr/lib/firmware`.
    let resolved = DevicePolicy {
        allowed_paths: policy
            .allowed_paths
            .iter()
            .map(|p| if p == "/" { p.clone() } else { topology.device_path(p).unwrap_or_else(|| p.clone()) })
            .collect(),
        ..DevicePolicy::default()
    };
    mine.iter().filter(|id| id.kind() == ResourceId::PATH).find_map(|id| {
        let device = topology.device_path(id.name());
        // Unresolvable (not UTF-8, an unreadable root): allowed only where
        // every path is.
        let anywhere = policy.allows_path("/");
        let allowed = policy.allows_path(id.name())
            && device.as_deref().map_or(anywhere, |p| policy.allows_path(p) || resolved.allows_path(p));
        (!allowed).then(|| {
            let seen = device
                .filter(|p| p != id.name())
                .map(|p| format!(" (on the device: {p})"))
                .unwrap_or_default();
            (ErrorKind::PolicyDenied, format!("{id}{seen} is outside this device's allowed paths"))
        })
    })
}

/// The first clash of a document's resources, with each other or with
/// another deployment's, counting every alias the device's filesystem makes
/// (see [`LocalDeviceTopology::device_path`]): a duplicate within the
/// document, or a conflict naming the other deployment.
fn alias_clash(
    topology: &LocalDeviceTopology,
    mine: &[ResourceId],
    others: &[(DeploymentName, Vec<ResourceId>)],
) -> Option<(ErrorKind, String)> {
    let device_id = |id: &ResourceId| -> ResourceId {
        if id.kind() != ResourceId::PATH {
            return id.clone();
        }
        topology.device_path(id.name()).map_or_else(|| id.clone(), |p| ResourceId::path(&p))
    };
    let mut claimed: std::collections::HashMap<ResourceId, &ResourceId> = std::collections::HashMap::new();
    for id in mine {
        for key in [id.clone(), device_id(id)] {
            if let Some(first) = claimed.insert(key.clone(), id) {
                if first != id {
                    return Some((
                        ErrorKind::DuplicateResource,
                        format!("{first} and {id} are one resource ({key})"),
                    ));
                }
            }
        }
    }
    for (other, ids) in others {
        for id in ids {
            let aliases = [id.clone(), device_id(id)];
            if let Some(mine) = aliases.iter().find_map(|a| claimed.get(a)) {
                let through = if *mine == id { String::new() } else { format!(" (as {id})") };
                return Some((
                    ErrorKind::ResourceConflict,
                    format!("{mine} is owned by deployment {other}{through}"),
                ));
            }
        }
    }
    None
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// An instant no timer reaches (a retry that is running, not due).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// 0.0–1.0 from the clock's low bits: enough to spread a fleet's retries.
pub(crate) fn jitter() -> f64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1000) / 1000.0
}

/// `period` stretched or cut by up to 10 %, at random: timers of a fleet
/// started together drift apart instead of firing together for ever.
pub(crate) fn jittered(period: Duration) -> Duration {
    period.mul_f64(0.9 + jitter() / 5.0)
}

/// The first tick of a periodic timer: at a random point of the second
/// half of its first period.
pub(crate) fn first_tick(period: Duration) -> tokio::time::Instant {
    tokio::time::Instant::now() + period.mul_f64(0.5 + jitter() / 2.0)
}

/// A fresh id for this agent process: pid, start time and a counter, hex.
fn instance_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{:x}-{n:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;

#[path = "controller_keysets.rs"]
mod keysets;

#[path = "controller_verify.rs"]
mod verify;
