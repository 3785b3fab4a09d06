//! Verifying a generation: its health checks, tried together until all hold in one round or the deadline passes.
//!
//! A round runs every check at once, each attempt bounded
//! ([`ATTEMPT_LIMIT`]); rounds repeat every [`RETRY_EVERY`] until every
//! check holds (or is blocked) in the same round, or the deadline passes.
//! The run's signal stops it at once (a newer generation, a delete,
//! shutdown). What it decides is only "held" or "this check failed, with
//! this output": what that means for the deployment is
//! [`crate::commit`]'s.

mod probe;

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use harmony_score_wire::{bounded_text, Check, CheckState, CheckStatus, HealthPlan, MAX_MESSAGE_BYTES};
use harmony_topology::{LocalDeviceTopology, RunSignal};

pub use probe::Seen;

/// The longest one attempt at one check may take.
pub const ATTEMPT_LIMIT: Duration = Duration::from_secs(5);
/// The shortest an attempt is given, even when the deadline is nearer: the
/// last round gets a real chance rather than none.
const MIN_ATTEMPT: Duration = Duration::from_secs(1);
/// Time between rounds.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// How a verification ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Every check's last state and output, in plan order.
    pub checks: Vec<CheckStatus>,
    /// The run's signal stopped it: it concluded nothing.
    pub cancelled: bool,
}

impl Verification {
    /// Whether every check held (or is blocked) in the last round.
    pub fn held(&self) -> bool {
        !self.cancelled
            && self.checks.iter().all(|c| matches!(c.state, CheckState::Held | CheckState::Blocked))
    }

    /// The first check that failed, as the status and the record name it.
    pub fn first_failed(&self) -> Option<&CheckStatus> {
        self.checks.iter().find(|c| c.state == CheckState::Failed)
    }
}

/// One check and what it remembers between rounds.
struct Probe {
    check: Check,
    status: CheckStatus,
    container: probe::ContainerWatch,
}

impl Probe {
    async fn attempt(&mut self, topology: &LocalDeviceTopology, limit: Duration) {
        let seen = tokio::time::timeout(limit, self.run(topology)).await.unwrap_or_else(|_| Seen {
            state: CheckState::Pending,
            output: format!("no answer within {} s", limit.as_secs_f64()),
        });
        self.status.state = seen.state;
        self.status.output = seen.output;
    }

    async fn run(&mut self, topology: &LocalDeviceTopology) -> Seen {
        let invalid = |err: harmony_score_wire::ScoreValidationError| Seen {
            state: CheckState::Pending,
            output: bounded_text(&format!("invalid check: {err}"), MAX_MESSAGE_BYTES),
        };
        // Validated at decode; parsed again here, never trusted as text.
        match &self.check {
            Check::Tcp { address } => match harmony_score_wire::health::loopback_socket("address", address) {
                Ok(addr) => probe::tcp(addr).await,
                Err(err) => invalid(err),
            },
            Check::Http { url, status } => match harmony_score_wire::health::HttpTarget::parse(url) {
                Ok(target) => probe::http(&target, *status).await,
                Err(err) => invalid(err),
            },
            Check::FileSha256 { path, sha256 } => probe::file_sha256(topology, path, sha256).await,
            Check::ContainerRunning { name, stable_s } => {
                let stable = Duration::from_secs(*stable_s);
                probe::container_running(topology, name, stable, &mut self.container, Instant::now()).await
            }
            Check::UnitActive { unit } => probe::unit_active(topology, unit).await,
            // A check type this build decodes but cannot run never holds.
            other => {
                Seen { state: CheckState::Pending, output: format!("{} cannot be run here", other.kind()) }
            }
        }
    }
}

/// The statuses of `plan`'s checks before any attempt: all pending.
pub fn pending(plan: &HealthPlan) -> Vec<CheckStatus> {
    plan.checks
        .iter()
        .map(|sourced| CheckStatus {
            check: bounded_text(&sourced.check.to_string(), MAX_MESSAGE_BYTES),
            source: bounded_text(&sourced.source, MAX_MESSAGE_BYTES),
            state: CheckState::Pending,
            output: String::new(),
        })
        .collect()
}

/// Runs `plan`'s checks once to their end, as the daemon does after an
/// apply, without committing or rolling back anything (`harmony-agent
/// apply` keeps no state): each check's last state and output.
pub async fn run_checks(topology: &LocalDeviceTopology, plan: &HealthPlan) -> Vec<CheckStatus> {
    verify(topology, plan, &RunSignal::new(), |_| {}).await.checks
}

/// Runs `plan`'s checks against `topology` until all hold in one round, the
/// deadline passes (the checks not holding then are `failed`), or `signal`
/// is raised. `progress` hears the statuses whenever a check's state changes.
pub async fn verify(
    topology: &LocalDeviceTopology,
    plan: &HealthPlan,
    signal: &RunSignal,
    mut progress: impl FnMut(&[CheckStatus]),
) -> Verification {
    let deadline = Instant::now() + plan.timeout;
    let mut probes: Vec<Probe> = plan
        .checks
        .iter()
        .zip(pending(plan))
        .map(|(sourced, status)| Probe {
            check: sourced.check.clone(),
            status,
            container: Default::default(),
        })
        .collect();
    let statuses = |probes: &[Probe]| probes.iter().map(|p| p.status.clone()).collect::<Vec<_>>();
    let cancelled = |probes: &[Probe]| Verification { checks: statuses(probes), cancelled: true };
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let limit = remaining.max(MIN_ATTEMPT).min(ATTEMPT_LIMIT);
        let before: Vec<CheckState> = probes.iter().map(|p| p.status.state).collect();
        let round = join_all(probes.iter_mut().map(|p| p.attempt(topology, limit)));
        tokio::select! {
            _ = round => {}
            () = signal.cancelled() => return cancelled(&probes),
        }
        let all_held =
            probes.iter().all(|p| matches!(p.status.state, CheckState::Held | CheckState::Blocked));
        let over = Instant::now() >= deadline;
        if over && !all_held {
            for p in &mut probes {
                if p.status.state == CheckState::Pending {
                    p.status.state = CheckState::Failed;
                }
            }
        }
        if all_held || over {
            let checks = statuses(&probes);
            progress(&checks);
            return Verification { checks, cancelled: false };
        }
        if probes.iter().map(|p| p.status.state).ne(before) {
            progress(&statuses(&probes));
        }
        let pause = RETRY_EVERY.min(deadline.saturating_duration_since(Instant::now()));
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = signal.cancelled() => return cancelled(&probes),
        }
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
