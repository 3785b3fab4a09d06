//! Running a document's Scores through the `Maestro`, one `ScoreStatus` each.

use harmony_score_wire::{DesiredState, DeviceScore, ResourceId, ScoreStatus};
use harmony_topology::{InterpretStatus, LocalDeviceTopology, Maestro, RunSignal};

use crate::runner::{run_score, Timeouts};
use crate::DevicePolicy;

/// What one run of a list of Scores did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// One entry per Score, in the order run.
    pub scores: Vec<ScoreStatus>,
}

impl ApplyReport {
    /// Whether no Score failed: each is SUCCESS, NOOP or BLOCKED (see
    /// [`ScoreStatus::is_settled`]).
    pub fn all_ok(&self) -> bool {
        self.scores.iter().all(ScoreStatus::is_settled)
    }

    /// Whether every Score is NOOP: nothing was changed.
    pub fn all_noop(&self) -> bool {
        self.scores.iter().all(|s| s.status == InterpretStatus::NOOP)
    }
}

/// Runs `scores` in order, each under the default [`Timeouts`]; a failing
/// Score does not stop the ones after it.
pub async fn run_scores<'a>(
    maestro: &Maestro<LocalDeviceTopology>,
    scores: impl IntoIterator<Item = &'a dyn DeviceScore>,
) -> ApplyReport {
    let (timeouts, signal) = (Timeouts::default(), RunSignal::new());
    let mut report = Vec::new();
    for score in scores {
        report.push(run_score(maestro, score, timeouts.for_score(score), &signal).await);
    }
    ApplyReport { scores: report }
}

/// Why the device `policy` refuses `doc` on `topology`, as the daemon
/// judges a document when it is offered and before every run: a Score tag
/// it does not allow, a privilege it does not grant, or a path (a resource,
/// or one a Score uses, like a volume source) outside its allowed paths
/// (also after resolving symlinked parents). `None`: allowed.
pub fn policy_refusal(
    topology: &LocalDeviceTopology,
    policy: &DevicePolicy,
    doc: &DesiredState,
) -> Option<String> {
    policy.refused_score(doc).or_else(|| {
        let resources: Vec<ResourceId> = doc.scores.iter().map(|s| s.resource()).collect();
        let judged = crate::deployment::judged_paths(doc, &resources);
        crate::controller::outside_policy(topology, policy, &judged).map(|(_, message)| message)
    })
}
