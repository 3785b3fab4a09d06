//! One deployment's state machine: what it holds, whether a document may be accepted, its phase and status, and the retry policy.
//!
//! Everything here is pure: no I/O, no clock reads except through
//! arguments. The controller feeds it events and does the I/O.

use std::sync::Arc;
use std::time::{Duration, Instant};

use harmony_score_wire::{
    CheckStatus, DeploymentName, DeploymentStatus, DesiredState, DeviceId, ErrorKind, HealthPlan, Phase,
    ResourceId, ScoreStatus, StatusError,
};
use harmony_topology::RunSignal;

use crate::store::{DeploymentRecord, DocumentFormat};

/// How long a pruned deployment stays in status (as `pruned`) before the
/// agent forgets it; operators waiting for a prune also accept its absence.
pub const FORGET_PRUNED_AFTER: Duration = Duration::from_secs(600);

/// Delay before retry number `attempt` (0-based) of a failed deployment:
/// doubling from 2 s up to 5 min, stretched by `jitter` (0.0–1.0) of up to
/// a quarter so a fleet that failed together does not retry together.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let base = Duration::from_secs(2).saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX));
    let capped = base.min(Duration::from_secs(300));
    capped.mul_f64(1.0 + jitter.clamp(0.0, 1.0) / 4.0)
}

/// What to do after a run (kube-runtime's `error_policy`, as a pure function).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing until something changes (or the next resync).
    AwaitChange,
    /// Run again after this long.
    RequeueAfter(Duration),
}

/// Decides the requeue after a run: a run that held needs nothing; a failed
/// one (Scores, undos, or persisting) is retried with [`backoff`]; one that
/// was superseded is rerun by whoever superseded it.
pub fn error_policy(result_ok: bool, cancelled: bool, attempt: u32, jitter: f64) -> Action {
    if result_ok || cancelled {
        Action::AwaitChange
    } else {
        Action::RequeueAfter(backoff(attempt, jitter))
    }
}

/// An accepted document, decoded, with the resources its Scores name.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The document.
    pub doc: Arc<DesiredState>,
    /// `resource()` of each Score, in order.
    pub resources: Vec<ResourceId>,
    /// Every path the device's policy judges: the resources, and the paths
    /// the Scores use besides them ([`DeviceScore::used_paths`]) and the
    /// health checks read.
    pub judged_paths: Vec<ResourceId>,
    /// The checks to run after an apply, when the document asks for them.
    pub plan: Option<Arc<HealthPlan>>,
}

impl Accepted {
    /// Wraps a decoded document (its checks were validated at decode).
    pub fn new(doc: DesiredState) -> Self {
        let resources: Vec<ResourceId> = doc.scores.iter().map(|s| s.resource()).collect();
        let judged_paths = judged_paths(&doc, &resources);
        let plan = doc.health_plan().ok().flatten().map(Arc::new);
        Self { doc: Arc::new(doc), resources, judged_paths, plan }
    }
}

/// `resources`, the paths `doc`'s Scores use besides them and the paths
/// its health checks read, as the device's `allowed_paths` judge them.
pub fn judged_paths(doc: &DesiredState, resources: &[ResourceId]) -> Vec<ResourceId> {
    let used = doc.scores.iter().flat_map(|s| s.used_paths()).map(|p| ResourceId::path(&p));
    let checked = doc.health.iter().filter_map(|c| c.used_path()).map(ResourceId::path);
    resources.iter().cloned().chain(used).chain(checked).collect()
}

/// A run in progress.
#[derive(Debug, Clone)]
pub struct Running {
    /// Its id.
    pub run_id: u64,
    /// The generation it applies (`None`: prune of a deleted deployment).
    pub generation: Option<u64>,
    /// Raised to supersede it.
    pub signal: RunSignal,
    /// The Score in progress.
    pub current: Option<String>,
    /// It runs the generation's health checks, not its Scores.
    pub verifying: bool,
}

/// The result of the last finished run.
#[derive(Debug, Clone)]
pub struct LastRun {
    /// The generation it applied (`None`: a prune of a deleted deployment).
    pub generation: Option<u64>,
    /// Per Score, in order.
    pub scores: Vec<ScoreStatus>,
    /// Undos that failed.
    pub prune_failures: usize,
    /// Whether everything held.
    pub ok: bool,
    /// When it ended.
    pub at_ms: u64,
}

/// A document that was refused, and why.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// Its generation, when it could be read.
    pub generation: Option<u64>,
    /// Its digest.
    pub digest: String,
    /// Why.
    pub error: StatusError,
    /// Its bytes, kept when the reason may clear ([`ErrorKind::may_clear`])
    /// so the controller can offer it again.
    pub retry_bytes: Option<(Vec<u8>, DocumentFormat)>,
}

/// Whether an offered document may be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A new generation: accept and run it.
    Accept,
    /// The document already accepted: nothing to do.
    Unchanged,
    /// Refused.
    Reject(ErrorKind, String),
}

/// One deployment as the controller tracks it.
#[derive(Debug, Default)]
pub struct Deployment {
    /// What is persisted.
    pub record: DeploymentRecord,
    /// The accepted document, decoded (`None` when deleted, or when this
    /// agent cannot decode the persisted bytes: see `failure`).
    pub document: Option<Accepted>,
    /// The last finished run.
    pub last_run: Option<LastRun>,
    /// The newest refused document, until a newer one is accepted.
    pub rejected: Option<Rejection>,
    /// A failure of the deployment as a whole (unreadable or unrunnable
    /// persisted state, a failed save).
    pub failure: Option<StatusError>,
    /// Deleted and fully undone (when), reported as `pruned` until forgotten.
    pub pruned_at: Option<Instant>,
    /// Failed: the attempt number and when the next is due.
    pub retry: Option<(u32, Instant)>,
    /// The run in progress.
    pub running: Option<Running>,
    /// Run again once the current run ends.
    pub rerun: bool,
    /// The last generation whose run was superseded.
    pub superseded_generation: Option<u64>,
    /// Failures found before the run started (undos this agent cannot
    /// decode), added to its result.
    pub pending_failures: Vec<ScoreStatus>,
    /// The health checks of the generation being (or last) verified.
    pub health: Vec<CheckStatus>,
    /// When the accepted document passed every check of an offer: a run
    /// started soon after (within [`CHECKED_HOLDS_FOR`]) does not check
    /// it again. Cleared when the trusted keys change.
    pub checked_at: Option<Instant>,
}

/// How long an offer's checks stand for the run that follows it.
pub const CHECKED_HOLDS_FOR: std::time::Duration = std::time::Duration::from_secs(1);

impl Deployment {
    /// The accepted generation.
    pub fn generation(&self) -> Option<u64> {
        self.record.document.as_ref().map(|d| d.generation)
    }

    /// Whether status lists it: anything but a bare high-water mark.
    pub fn is_visible(&self) -> bool {
        !self.record.is_tombstone()
            || self.last_run.is_some()
            || self.rejected.is_some()
            || self.failure.is_some()
            || self.pruned_at.is_some()
            || self.running.is_some()
    }

    /// Whether there is anything to run: a document, or resources to undo.
    ///
    /// Owned resources alone are work only once the deployment was deleted:
    /// while the persisted document cannot be decoded by this agent (a
    /// rollback to a version without one of its tags), what it owns is
    /// still wanted and must not be undone.
    pub fn has_work(&self) -> bool {
        let deleted = self.record.document.is_none();
        // A delete that could not be saved is work too: its save is retried
        // by the run (which then has nothing else to do).
        let unsaved_delete =
            deleted && self.failure.as_ref().is_some_and(|f| f.kind == ErrorKind::PersistFailed);
        // A generation that failed its checks with nothing to roll back to
        // is left as it is: never run again (a newer one replaces it).
        let runnable = self.document.is_some() && !crate::commit::failed_in_place(&self.record);
        self.pruned_at.is_none() && (runnable || (deleted && !self.record.owned.is_empty()) || unsaved_delete)
    }

    /// Every resource this deployment holds or wants: the accepted
    /// document's and everything owned not yet undone.
    pub fn resources(&self) -> impl Iterator<Item = &ResourceId> + '_ {
        let owned = self.record.owned.iter().map(|o| &o.resource);
        owned.chain(self.wanted())
    }

    /// The resources the accepted document names.
    pub fn wanted(&self) -> impl Iterator<Item = &ResourceId> + '_ {
        self.document.iter().flat_map(|d| d.resources.iter())
    }

    /// Judges a decoded document against this deployment alone (the
    /// controller checks resources against the others).
    pub fn judge(
        &self,
        device: &DeviceId,
        name: &DeploymentName,
        doc: &DesiredState,
        digest: &str,
        now_secs: u64,
    ) -> Verdict {
        if doc.device_id != *device {
            return Verdict::Reject(
                ErrorKind::WrongDevice,
                format!("document is for device {}, not {device}", doc.device_id),
            );
        }
        if doc.deployment != *name {
            return Verdict::Reject(
                ErrorKind::WrongDeployment,
                format!("document names deployment {}, key is {name}", doc.deployment),
            );
        }
        if let Some(hw) = &self.record.high_water {
            let same = digest == hw.digest;
            let current = self.record.document.as_ref().is_some_and(|d| d.digest == digest);
            // The retiring document (no Scores) stays in its key after it
            // ran: read again, it is the same news, not a replay.
            let retired = self.record.document.is_none() && doc.scores.is_empty();
            // A generation that failed its checks, offered again (its key
            // still holds it): the device stays where it went back to.
            let failed = crate::commit::is_failed_document(&self.record, doc.generation, digest);
            if doc.generation == hw.generation && same && (current || retired || failed) {
                return Verdict::Unchanged;
            }
            if doc.generation <= hw.generation {
                let why = if doc.generation < hw.generation {
                    "is older than"
                } else if same {
                    "was deleted after being accepted as"
                } else {
                    "has other content than the accepted"
                };
                return Verdict::Reject(
                    ErrorKind::StaleGeneration,
                    format!("generation {} {why} generation {}", doc.generation, hw.generation),
                );
            }
        }
        if let Some(expires_at) = doc.expires_at {
            if expires_at <= now_secs {
                return Verdict::Reject(
                    ErrorKind::Expired,
                    format!("document expired at {expires_at} (seconds since the epoch)"),
                );
            }
        }
        Verdict::Accept
    }

    /// Status is derived, never stored: one place decides the phase.
    pub fn status(&self) -> DeploymentStatus {
        // A generation that failed its checks was accepted, whatever the
        // record's document is now (the last good one, after a rollback).
        let health_failure = self.record.health_failure.as_ref().filter(|_| self.record.document.is_some());
        let accepted = self.generation().unwrap_or(0).max(health_failure.map_or(0, |f| f.generation));
        let rejected = self
            .rejected
            .as_ref()
            .filter(|r| self.record.document.is_none() || r.generation.is_none_or(|g| g > accepted));
        // A failure of an older generation says nothing about the one
        // accepted since, which has not run yet (it waits for a slot).
        let last_failed = self.last_run.as_ref().filter(|r| !r.ok && r.generation == self.generation());
        let (phase, error) = if self.pruned_at.is_some() {
            (Phase::Pruned, None)
        } else if let Some(r) = rejected {
            (Phase::Rejected, Some(r.error.clone()))
        } else if let Some(failure) = health_failure {
            self.health_failure_phase(failure)
        } else if self.running.as_ref().is_some_and(|r| r.verifying) {
            (Phase::Verifying, None)
        } else if self.running.is_some() {
            (Phase::Applying, None)
        } else if let Some(failure) = &self.failure {
            (Phase::Failed, Some(failure.clone()))
        } else if let Some(run) = last_failed {
            let bad = run.scores.iter().filter(|s| !s.is_settled()).count();
            let (kind, message) = if bad == run.prune_failures {
                (ErrorKind::PruneFailed, format!("{bad} undos of pruned resources failed; retrying"))
            } else {
                (ErrorKind::ScoresFailed, format!("{bad} of {} scores failed; retrying", run.scores.len()))
            };
            (Phase::Failed, Some(StatusError::new(kind, message)))
        } else if self.last_run.is_some() && self.record.observed_generation == accepted {
            (Phase::Applied, None)
        } else {
            (Phase::Applying, None)
        };
        let desired_generation = accepted
            .max(self.record.observed_generation)
            .max(self.rejected.as_ref().and_then(|r| r.generation).unwrap_or(0));
        // The refused document's digest only when its refusal is the phase:
        // an older or equal generation refused as stale leaves the accepted
        // one desired (and applied).
        let desired_digest = match (rejected, health_failure) {
            (Some(r), _) => Some(r.digest.clone()),
            (None, Some(f)) => Some(f.digest.clone()),
            (None, None) => self.record.document.as_ref().map(|d| d.digest.clone()),
        };
        DeploymentStatus {
            desired_generation,
            observed_generation: self.record.observed_generation,
            phase,
            scores: self.last_run.as_ref().map(|r| r.scores.clone()).unwrap_or_default(),
            error,
            last_attempt_at_ms: self.last_run.as_ref().map_or(0, |r| r.at_ms),
            last_applied_at_ms: self.record.last_applied_at_ms,
            desired_digest,
            observed_digest: self.record.observed_digest.clone(),
            current_score: self.running.as_ref().and_then(|r| r.current.clone()),
            superseded_generation: self.superseded_generation,
            health: self.health.clone(),
        }
    }

    /// The phase and error of a deployment whose newest generation failed
    /// its checks: rolled back (and whether going back held), or failed in place.
    fn health_failure_phase(&self, failure: &crate::store::HealthFailure) -> (Phase, Option<StatusError>) {
        let said = format!("check {} failed: {}", failure.check, failure.output);
        let Some(good) = failure.rolled_back_to else {
            let message = format!(
                "generation {}: {said}; no earlier good generation to roll back to: the device is left as it is, and generation {} is not tried again",
                failure.generation, failure.generation
            );
            return (Phase::Failed, Some(StatusError::new(ErrorKind::HealthCheckFailed, message)));
        };
        let mut message =
            format!("generation {} rolled back to generation {good}: {said}", failure.generation);
        // Going back can fail too: the good generation no longer passes
        // its re-checks (an expired document, a revoked key), or its run fails.
        if let Some(failure) = &self.failure {
            message
                .push_str(&format!("; generation {good} cannot run: {}: {}", failure.kind, failure.message));
        } else if self.last_run.as_ref().is_some_and(|r| !r.ok && r.generation == Some(good)) {
            message.push_str(&format!("; re-applying generation {good} failed (see scores), retrying"));
        }
        (Phase::RolledBack, Some(StatusError::new(ErrorKind::HealthCheckFailed, message)))
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

    #[test]
    fn the_error_policy_requeues_only_failures() {
        assert_eq!(error_policy(true, false, 3, 0.0), Action::AwaitChange);
        assert_eq!(error_policy(false, true, 3, 0.0), Action::AwaitChange);
        assert_eq!(error_policy(false, false, 1, 0.0), Action::RequeueAfter(Duration::from_secs(4)));
    }
}
