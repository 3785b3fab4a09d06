//! Running one deployment's Scores: every Interpret under a timeout and its run's signal, stopping at a Score boundary when cancelled.
//!
//! A run gets everything it needs in a [`RunPlan`] and reports back over a
//! channel; it touches no bookkeeping. The controller decides what to run,
//! and what the results mean.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use harmony_score_wire::{DeploymentName, DesiredState, DeviceScore, ResourceId, ScoreStatus};
use harmony_topology::{InterpretError, InterpretErrorKind, LocalDeviceTopology, Maestro, RunSignal};
use tokio::sync::mpsc;

/// How long an Interpret may run: a default, and overrides per Score tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// For every tag without an override.
    pub default: Duration,
    /// Tag → limit.
    pub per_tag: BTreeMap<String, Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { default: Duration::from_secs(300), per_tag: BTreeMap::new() }
    }
}

impl Timeouts {
    /// The limit for `score`: the agent's override for its tag, else the
    /// Score's own [`DeviceScore::interpret_timeout`], else the default.
    pub fn for_score(&self, score: &dyn DeviceScore) -> Duration {
        self.per_tag
            .get(score.typetag_name())
            .copied()
            .or_else(|| score.interpret_timeout())
            .unwrap_or(self.default)
    }
}

/// One resource to undo in a run.
#[derive(Debug, Clone)]
pub struct PruneItem {
    /// What is undone.
    pub resource: ResourceId,
    /// The Score that undoes it.
    pub undo: Arc<dyn DeviceScore>,
}

/// Everything one run needs.
#[derive(Debug)]
pub struct RunPlan {
    /// Tells results of an older run from the current one.
    pub run_id: u64,
    /// The deployment.
    pub deployment: DeploymentName,
    /// The document to apply; `None` for a deleted deployment (prune only).
    pub document: Option<Arc<DesiredState>>,
    /// Undos of owned resources the document no longer names, newest first.
    pub prune: Vec<PruneItem>,
    /// Raised when a newer generation, a delete or shutdown supersedes the run.
    pub signal: RunSignal,
}

/// What a run reports to the controller.
#[derive(Debug)]
pub enum RunEvent {
    /// A Score is starting (`2/5 file [/etc/motd]`).
    Progress { deployment: DeploymentName, run_id: u64, current: String },
    /// The run ended.
    Finished { deployment: DeploymentName, run_id: u64, result: RunResult },
    /// A verification's checks changed state.
    Checking { deployment: DeploymentName, run_id: u64, checks: Vec<harmony_score_wire::CheckStatus> },
    /// A verification ended.
    Verified { deployment: DeploymentName, run_id: u64, verification: crate::health::Verification },
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// Per Score run (document Scores in order, then undos), in order.
    pub scores: Vec<ScoreStatus>,
    /// Resources whose undo held.
    pub pruned: Vec<ResourceId>,
    /// How many undos failed.
    pub prune_failures: usize,
    /// Stopped at a Score boundary because the signal was raised.
    pub cancelled: bool,
}

impl RunResult {
    /// No Score or undo failed (each held, or is BLOCKED: see
    /// [`ScoreStatus::is_settled`]) and the run was not cut short.
    pub fn all_ok(&self) -> bool {
        !self.cancelled && self.prune_failures == 0 && self.scores.iter().all(ScoreStatus::is_settled)
    }
}

/// Runs one Score's Interpret under `limit` and the current run's signal;
/// a timeout is a FAILURE of kind `timeout`.
pub async fn run_score(
    maestro: &Maestro<LocalDeviceTopology>,
    score: &dyn DeviceScore,
    limit: Duration,
    signal: &RunSignal,
) -> ScoreStatus {
    let result = match signal.scope(tokio::time::timeout(limit, maestro.interpret(score))).await {
        Ok(result) => result,
        Err(_) => Err(InterpretError::with_kind(
            InterpretErrorKind::Timeout,
            format!("did not finish within {} s", limit.as_secs_f64()),
        )),
    };
    ScoreStatus::from_result(score.typetag_name(), score.name(), score.resource().to_string(), result)
}

/// Runs `plan`: the document's Scores in order, then the undos, checking the
/// signal before each. Reports progress and the result on `events`.
pub async fn execute(
    maestro: Arc<Maestro<LocalDeviceTopology>>,
    timeouts: Arc<Timeouts>,
    plan: RunPlan,
    events: mpsc::UnboundedSender<RunEvent>,
) {
    let RunPlan { run_id, deployment, document, prune, signal } = plan;
    let mut result = RunResult::default();
    let scores: &[Box<dyn DeviceScore>] = document.as_ref().map_or(&[], |d| &d.scores[..]);
    let total = scores.len() + prune.len();
    let progress = |n: usize, name: String| {
        let current = format!("{n}/{total} {name}");
        let _ = events.send(RunEvent::Progress { deployment: deployment.clone(), run_id, current });
    };
    for (i, score) in scores.iter().enumerate() {
        if signal.is_cancelled() {
            result.cancelled = true;
            break;
        }
        progress(i + 1, score.name());
        result
            .scores
            .push(run_score(&maestro, score.as_ref(), timeouts.for_score(score.as_ref()), &signal).await);
    }
    for (i, item) in prune.iter().enumerate() {
        if result.cancelled || signal.is_cancelled() {
            result.cancelled = true;
            break;
        }
        progress(scores.len() + i + 1, format!("prune {}", item.undo.name()));
        let mut status =
            run_score(&maestro, item.undo.as_ref(), timeouts.for_score(item.undo.as_ref()), &signal).await;
        status.message = format!("pruned: {}", status.message);
        // A blocked undo lets the resource go too: the device cannot act
        // on it (a package off the host's root), and holding it would keep
        // the deployment from ever being pruned.
        if status.is_settled() {
            result.pruned.push(item.resource.clone());
        } else {
            result.prune_failures += 1;
        }
        result.scores.push(status);
    }
    // Raised during the last Score: the run did not finish as asked (a
    // Score that honoured the signal returned `cancelled`).
    result.cancelled |= signal.is_cancelled();
    let _ = events.send(RunEvent::Finished { deployment, run_id, result });
}
