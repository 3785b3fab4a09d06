//! Running a document's Scores through the `Maestro`, one `ScoreStatus` each.

use harmony_score_wire::{DeviceScore, ScoreStatus};
use harmony_topology::{InterpretStatus, LocalDeviceTopology, Maestro};

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

/// Runs `scores` in order; a failing Score does not stop the ones after it.
pub async fn run_scores<'a>(
    maestro: &Maestro<LocalDeviceTopology>,
    scores: impl IntoIterator<Item = &'a dyn DeviceScore>,
) -> ApplyReport {
    let mut report = Vec::new();
    for score in scores {
        // Trait upcasting: the wire trait is a Score on the device topology.
        let result = maestro.interpret(score).await;
        report.push(ScoreStatus::from_result(
            score.typetag_name(),
            score.name(),
            score.resource().to_string(),
            result,
        ));
    }
    ApplyReport { scores: report }
}
