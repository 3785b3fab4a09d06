//! Running a document's Scores through the `Maestro`, one `ScoreStatus` each.

use harmony_score_wire::{DeviceScore, ScoreStatus};
use harmony_topology::{InterpretStatus, LocalDeviceTopology, Maestro, RunSignal};

use crate::runner::{run_score, Timeouts};

/// What one run of a list of Scores did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// One entry per Score, in the order run.
    pub scores: Vec<ScoreStatus>,
}

impl ApplyReport {
    /// Whether every Score is SUCCESS or NOOP.
    pub fn all_ok(&self) -> bool {
        self.scores.iter().all(ScoreStatus::is_ok)
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
