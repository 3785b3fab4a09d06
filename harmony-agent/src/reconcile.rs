//! The reconciler: decides which document each deployment runs, runs it, prunes, and derives status.
//!
//! It is plain state driven by one task (the daemon's loop): offers of new
//! documents, deletions, drift-repair passes and retries all go through it
//! in turn, so no two runs of one deployment ever overlap.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use harmony_score_wire::{
    decode, decode_json, now_ms, peek_generation, AgentStatus, DecodeLimits, DeploymentName,
    DeploymentStatus, DesiredState, DeviceId, DeviceInfo, DeviceScore, Phase, ScoreStatus, StatusError,
};
use harmony_topology::{LocalDeviceTopology, Maestro};
use tracing::{error, info, warn};

use crate::store::{DeploymentRecord, Store};
use crate::{run_scores, AGENT_VERSION};

/// How long a pruned deployment stays in status (as `pruned`) before the
/// agent forgets it; operators waiting for a prune also accept its absence.
pub const FORGET_PRUNED_AFTER: Duration = Duration::from_secs(600);

/// How a document's bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentFormat {
    /// CBOR, as in the KV bucket.
    Cbor,
    /// The JSON form (folder sources).
    Json,
}

/// Delay before retry number `attempt` (0-based) of a failed deployment:
/// doubling from 2 s up to 5 min, stretched by `jitter` (0.0–1.0) of up to
/// a quarter so a fleet that failed together does not retry together.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let base = Duration::from_secs(2).saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX));
    let capped = base.min(Duration::from_secs(300));
    capped.mul_f64(1.0 + jitter.clamp(0.0, 1.0) / 4.0)
}

/// The result of the last run of a deployment.
#[derive(Debug, Clone)]
struct LastRun {
    scores: Vec<ScoreStatus>,
    ok: bool,
    at_ms: u64,
}

#[derive(Debug, Default)]
struct Deployment {
    record: DeploymentRecord,
    last_run: Option<LastRun>,
    /// The newest refused document's generation (`None`: unreadable) and
    /// why, until a newer one is accepted.
    rejected: Option<(Option<u64>, StatusError)>,
    /// Deleted and fully undone (when), reported as `pruned` until forgotten.
    pruned_at: Option<Instant>,
    retry: Option<(u32, Instant)>,
}

impl Deployment {
    fn generation(&self) -> Option<u64> {
        self.record.document.as_ref().map(|d| d.generation)
    }

    fn resources(&self) -> impl Iterator<Item = harmony_score_wire::ResourceId> + '_ {
        let doc = self.record.document.iter().flat_map(|d| d.scores.iter());
        doc.chain(self.record.owned.iter()).map(|s| s.resource())
    }

    /// Status is derived, never stored: one place decides the phase.
    fn status(&self) -> DeploymentStatus {
        let accepted = self.generation().unwrap_or(0);
        let rejected = self
            .rejected
            .as_ref()
            .filter(|(g, _)| self.record.document.is_none() || g.is_none_or(|g| g > accepted));
        let failed = self.last_run.as_ref().is_some_and(|r| !r.ok);
        let (phase, error) = if self.pruned_at.is_some() {
            (Phase::Pruned, None)
        } else if let Some((_, err)) = rejected {
            (Phase::Rejected, Some(err.clone()))
        } else if failed {
            let scores = self.last_run.as_ref().map_or(&[][..], |r| &r.scores[..]);
            let bad = scores.iter().filter(|s| !s.is_ok()).count();
            let message = format!("{bad} of {} scores failed; retrying", scores.len());
            (Phase::Failed, Some(StatusError::new(harmony_score_wire::ErrorKind::ScoresFailed, message)))
        } else if self.last_run.is_some() {
            (Phase::Applied, None)
        } else {
            (Phase::Applying, None)
        };
        DeploymentStatus {
            desired_generation: accepted
                .max(self.record.observed_generation)
                .max(self.rejected.as_ref().and_then(|(g, _)| *g).unwrap_or(0)),
            observed_generation: self.record.observed_generation,
            phase,
            scores: self.last_run.as_ref().map(|r| r.scores.clone()).unwrap_or_default(),
            error,
            last_attempt_at_ms: self.last_run.as_ref().map_or(0, |r| r.at_ms),
            last_applied_at_ms: self.record.last_applied_at_ms,
            desired_digest: None,
            observed_digest: None,
            current_score: None,
            superseded_generation: None,
        }
    }
}

/// Runs a device's deployments against its topology.
pub struct Reconciler {
    device: DeviceId,
    maestro: Maestro<LocalDeviceTopology>,
    store: Store,
    limits: DecodeLimits,
    info: DeviceInfo,
    heartbeat_interval_ms: u64,
    deployments: BTreeMap<DeploymentName, Deployment>,
}

impl Reconciler {
    /// A reconciler over `store`, with nothing loaded yet (see [`Reconciler::boot`]).
    pub fn new(
        device: DeviceId,
        maestro: Maestro<LocalDeviceTopology>,
        store: Store,
        info: DeviceInfo,
        heartbeat: Duration,
    ) -> Self {
        Self {
            device,
            maestro,
            store,
            limits: DecodeLimits::default(),
            info,
            heartbeat_interval_ms: heartbeat.as_millis() as u64,
            deployments: BTreeMap::new(),
        }
    }

    /// Loads every persisted deployment and runs it: a device that boots
    /// offline runs what it last accepted, and finishes interrupted prunes.
    pub async fn boot(&mut self) {
        match self.store.load_all() {
            Ok(records) => {
                for (name, record) in records {
                    match record {
                        Ok(record) => {
                            self.deployments.insert(name, Deployment { record, ..Default::default() });
                        }
                        Err(err) => {
                            error!(deployment = %name, cause = %err, "persisted state unreadable; left as is")
                        }
                    }
                }
            }
            Err(err) => error!(cause = %err, "cannot list persisted state"),
        }
        info!(deployments = self.deployments.len(), "applying persisted desired state");
        self.reconcile_all().await;
    }

    /// The generation accepted for `name`, if any.
    fn accepted_generation(&self, name: &DeploymentName) -> Option<u64> {
        self.deployments.get(name).and_then(Deployment::generation)
    }

    /// The device's whole status as of now.
    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            device_id: self.device.clone(),
            agent_version: AGENT_VERSION.to_owned(),
            updated_at_ms: now_ms(),
            heartbeat_at_ms: now_ms(),
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            info: Some(self.info.clone()),
            deployments: self.deployments.iter().map(|(n, d)| (n.clone(), d.status())).collect(),
            instance_id: String::new(),
            errors: Vec::new(),
            truncated: false,
        }
    }

    /// Offers the current value of deployment `name`'s key. Returns whether
    /// status changed. An older or equal generation is ignored; a bad one is
    /// rejected and the accepted generation keeps running.
    pub async fn offer(&mut self, name: &DeploymentName, bytes: &[u8], format: DocumentFormat) -> bool {
        let decoded = match format {
            DocumentFormat::Cbor => decode(bytes, &self.limits),
            DocumentFormat::Json => decode_json(bytes, &self.limits),
        };
        let doc = match decoded {
            Ok(doc) => doc,
            Err(err) => {
                let generation = match format {
                    DocumentFormat::Cbor => peek_generation(bytes, &self.limits),
                    DocumentFormat::Json => None,
                };
                return self.reject(name, generation, err.kind(), err.to_string());
            }
        };
        if let Some(accepted) = self.accepted_generation(name) {
            if doc.generation <= accepted {
                if doc.generation < accepted {
                    warn!(deployment = %name, generation = doc.generation, accepted, "older generation ignored");
                }
                return false;
            }
        }
        if let Err((kind, message)) = self.verify(name, &doc) {
            return self.reject(name, Some(doc.generation), kind, message);
        }
        info!(deployment = %name, generation = doc.generation, scores = doc.scores.len(), "accepted");
        let entry = self.deployments.entry(name.clone()).or_default();
        for score in &doc.scores {
            let resource = score.resource();
            entry.record.owned.retain(|owned| owned.resource() != resource);
            entry.record.owned.extend(score.undo());
        }
        entry.record.document = Some(doc);
        entry.rejected = None;
        entry.pruned_at = None;
        entry.retry = None;
        if let Err(err) = self.store.save(name, &entry.record) {
            // Still run it: the device should converge even if its disk is
            // full; it will re-read the key after a restart.
            error!(deployment = %name, cause = %err, "cannot persist accepted document");
        }
        self.apply(name).await;
        true
    }

    /// The deployment's key was deleted: undo what it made.
    pub async fn delete(&mut self, name: &DeploymentName) -> bool {
        let Some(entry) = self.deployments.get_mut(name) else { return false };
        // Pruned, or already deleted and pruning (its retries run on their own schedule).
        if entry.pruned_at.is_some() || (entry.record.document.is_none() && entry.rejected.is_none()) {
            return false;
        }
        info!(deployment = %name, "deleted; pruning");
        entry.record.document = None;
        entry.rejected = None;
        self.apply(name).await;
        true
    }

    /// Runs every deployment again (drift repair), and forgets deployments
    /// pruned more than [`FORGET_PRUNED_AFTER`] ago so status does not grow
    /// without bound. Returns whether anything ran.
    pub async fn reconcile_all(&mut self) -> bool {
        self.forget_pruned(Instant::now());
        let names: Vec<_> = self
            .deployments
            .iter()
            .filter(|(_, d)| {
                d.pruned_at.is_none() && (d.record.document.is_some() || !d.record.owned.is_empty())
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in &names {
            self.apply(name).await;
        }
        !names.is_empty()
    }

    /// Forgets deployments pruned more than [`FORGET_PRUNED_AFTER`] before `now`.
    pub fn forget_pruned(&mut self, now: Instant) {
        self.deployments.retain(|_, d| {
            d.pruned_at.is_none_or(|at| now.saturating_duration_since(at) < FORGET_PRUNED_AFTER)
        });
    }

    /// When the next retry of a failed deployment is due.
    pub fn next_retry(&self) -> Option<Instant> {
        self.deployments.values().filter_map(|d| d.retry.map(|(_, at)| at)).min()
    }

    /// Runs the failed deployments whose retry is due.
    pub async fn run_due_retries(&mut self, now: Instant) -> bool {
        let due: Vec<_> = self
            .deployments
            .iter()
            .filter(|(_, d)| d.retry.is_some_and(|(_, at)| at <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in &due {
            self.apply(name).await;
        }
        !due.is_empty()
    }

    fn verify(
        &self,
        name: &DeploymentName,
        doc: &DesiredState,
    ) -> Result<(), (harmony_score_wire::ErrorKind, String)> {
        if doc.device_id != self.device {
            return Err((
                harmony_score_wire::ErrorKind::WrongDevice,
                format!("document is for device {}, not {}", doc.device_id, self.device),
            ));
        }
        if &doc.deployment != name {
            return Err((
                harmony_score_wire::ErrorKind::WrongDeployment,
                format!("document names deployment {}, key is {name}", doc.deployment),
            ));
        }
        if let Some(expires_at) = doc.expires_at {
            if expires_at <= now_ms() / 1000 {
                return Err((
                    harmony_score_wire::ErrorKind::Expired,
                    format!("document expired at {expires_at} (seconds since the epoch)"),
                ));
            }
        }
        let mine: HashSet<harmony_score_wire::ResourceId> = doc.scores.iter().map(|s| s.resource()).collect();
        for (other, deployment) in self.deployments.iter().filter(|(n, _)| *n != name) {
            if let Some(resource) = deployment.resources().find(|r| mine.contains(r)) {
                return Err((
                    harmony_score_wire::ErrorKind::ResourceConflict,
                    format!("{resource} is owned by deployment {other}"),
                ));
            }
        }
        Ok(())
    }

    fn reject(
        &mut self,
        name: &DeploymentName,
        generation: Option<u64>,
        kind: harmony_score_wire::ErrorKind,
        message: String,
    ) -> bool {
        let entry = self.deployments.entry(name.clone()).or_default();
        if entry.rejected.as_ref().is_some_and(|(g, e)| *g == generation && e.kind == kind) {
            return false; // already reported
        }
        warn!(deployment = %name, ?generation, kind = %kind, %message, "document rejected");
        entry.rejected = Some((generation, StatusError::new(kind, message)));
        entry.pruned_at = None;
        true
    }

    /// Runs the accepted document (if any), then undoes every owned resource
    /// the document no longer names, newest first.
    async fn apply(&mut self, name: &DeploymentName) {
        let Self { maestro, deployments, store, .. } = self;
        let Some(entry) = deployments.get_mut(name) else { return };
        let mut scores = Vec::new();
        let mut wanted = HashSet::new();
        if let Some(doc) = &entry.record.document {
            scores = run_scores(maestro, doc.scores.iter().map(|s| s.as_ref())).await.scores;
            wanted = doc.scores.iter().map(|s| s.resource()).collect();
        }
        let owned = std::mem::take(&mut entry.record.owned);
        let (keep, to_prune): (Vec<_>, Vec<_>) =
            owned.into_iter().partition(|s| wanted.contains(&s.resource()));
        entry.record.owned = keep;
        let mut pruned: Vec<Box<dyn DeviceScore>> = Vec::new();
        for undo in to_prune.into_iter().rev() {
            let result = maestro.interpret(undo.as_ref()).await;
            let mut status = ScoreStatus::from_result(
                undo.typetag_name(),
                undo.name(),
                undo.resource().to_string(),
                result,
            );
            status.message = format!("pruned: {}", status.message);
            if !status.is_ok() {
                pruned.push(undo);
            }
            scores.push(status);
        }
        // Undos that failed stay owned, in their original order, to be retried.
        pruned.reverse();
        entry.record.owned.extend(pruned);

        let ok = scores.iter().all(ScoreStatus::is_ok);
        let now = now_ms();
        let deleted = entry.record.document.is_none();
        if ok {
            if let Some(generation) = entry.generation() {
                entry.record.observed_generation = generation;
                entry.record.last_applied_at_ms = now;
            }
            entry.retry = None;
        } else {
            let attempt = entry.retry.map_or(0, |(a, _)| a + 1);
            let jitter = f64::from(now.wrapping_mul(2_654_435_761) as u32 % 1000) / 1000.0;
            let delay = backoff(attempt, jitter);
            warn!(deployment = %name, attempt, retry_in = ?delay, "deployment failed");
            entry.retry = Some((attempt, Instant::now() + delay));
        }
        entry.last_run = Some(LastRun { scores, ok, at_ms: now });
        let result = if deleted && entry.record.owned.is_empty() && entry.rejected.is_none() {
            entry.pruned_at = Some(Instant::now());
            info!(deployment = %name, "pruned");
            store.remove(name)
        } else {
            store.save(name, &entry.record)
        };
        if let Err(err) = result {
            error!(deployment = %name, cause = %err, "cannot persist deployment state");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters_up_to_a_quarter() {
        assert_eq!(backoff(0, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(1, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(5, 0.0), Duration::from_secs(64));
        assert_eq!(backoff(8, 0.0), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX, 0.0), Duration::from_secs(300));
        assert_eq!(backoff(0, 1.0), Duration::from_millis(2500));
        assert_eq!(backoff(0, 7.0), Duration::from_millis(2500));
    }
}
