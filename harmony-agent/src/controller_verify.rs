//! Verifying an applied generation, then committing it or rolling back to the last good one: the controller's side of [`crate::commit`].
//!
//! A verification is the deployment's run while it lasts (one run per
//! deployment): a newer generation or a delete supersedes it through the
//! same signal, and shutdown stops it. It concludes nothing then: the
//! record still says "verifying N", so the next apply of N (the rerun, or
//! the boot after a restart) verifies it again.

use harmony_score_wire::{now_ms, payload_of, ErrorKind};
use harmony_topology::RunSignal;
use tracing::{error, info, warn};

use super::{alias_clash, undos_of, Controller};
use crate::commit::{self, AfterFailure};
use crate::deployment::{Accepted, Running};
use crate::health::{self, Verification};
use crate::runner::RunEvent;

impl Controller {
    /// Starts the checks of `name`'s accepted generation, whose "verifying"
    /// the record already holds on disk.
    pub(super) fn start_verification(&mut self, name: &harmony_score_wire::DeploymentName) {
        let Some(entry) = self.deployments.get_mut(name) else { return };
        let Some(accepted) = &entry.document else { return };
        let Some(plan) = accepted.plan.clone() else { return };
        let run_id = self.next_run_id;
        self.next_run_id += 1;
        let signal = RunSignal::for_deployment(name.as_str());
        entry.running = Some(Running {
            run_id,
            generation: Some(accepted.doc.generation),
            signal: signal.clone(),
            current: Some(format!("verifying {} checks", plan.checks.len())),
            verifying: true,
        });
        entry.health = health::pending(&plan);
        self.running += 1;
        self.dirty = true;
        let (topology, events, deployment) =
            (self.maestro.topology().clone(), self.events_tx.clone(), name.clone());
        self.tasks.spawn(async move {
            let progress = |checks: &[harmony_score_wire::CheckStatus]| {
                let checks = checks.to_vec();
                let _ = events.send(RunEvent::Checking { deployment: deployment.clone(), run_id, checks });
            };
            let verification = health::verify(&topology, &plan, &signal, progress).await;
            let _ = events.send(RunEvent::Verified { deployment, run_id, verification });
        });
    }

    /// A verification ended: commit, or handle the failed check.
    pub(super) async fn verified(
        &mut self,
        name: &harmony_score_wire::DeploymentName,
        run_id: u64,
        verification: Verification,
    ) {
        let Some(entry) = self.deployments.get_mut(name) else { return };
        let Some(run) = entry.running.take_if(|r| r.run_id == run_id) else { return };
        self.running -= 1;
        self.dirty = true;
        entry.health = verification.checks.clone();
        let rerun = entry.rerun;
        if verification.cancelled {
            // Superseded or shutting down: nothing concluded, "verifying"
            // stays on disk for the next apply of this generation.
            info!(deployment = %name, generation = ?run.generation, "verification stopped before it concluded");
        } else if verification.held() {
            let before = entry.record.clone();
            commit::commit(&mut entry.record, now_ms());
            if self.save(name).await {
                info!(deployment = %name, generation = ?run.generation, "health checks held; committed");
            } else if let Some(entry) = self.deployments.get_mut(name) {
                // Not on disk, not committed: the disk still says
                // "verifying", and the retry applies and verifies again.
                entry.record = before;
                if let Some(last) = &mut entry.last_run {
                    last.ok = false;
                }
            }
        } else {
            let (check, output) = match verification.first_failed() {
                Some(failed) => (format!("{} ({})", failed.check, failed.source), failed.output.clone()),
                None => ("verification".to_owned(), "no check held".to_owned()),
            };
            self.health_failed(name, check, output).await;
        }
        if rerun {
            self.schedule(name, false);
        }
    }

    /// `name`'s accepted generation failed `check`: back to its last good
    /// generation from the record (pruning what the failed one added), or,
    /// with none that can run, failed where it stands. Never retried.
    pub(super) async fn health_failed(
        &mut self,
        name: &harmony_score_wire::DeploymentName,
        check: String,
        mut output: String,
    ) {
        let Some(entry) = self.deployments.get(name) else { return };
        let mut back = None;
        if let (AfterFailure::RollBack(good), Some(stored)) =
            (commit::after_failure(&entry.record), commit::last_good(&entry.record))
        {
            // Verified when it was accepted; the envelope is only opened here
            // (the run's recheck verifies it against today's keys again).
            let decoded = payload_of(&stored.bytes)
                .map_err(|err| err.to_string())
                .and_then(|payload| self.decode(&payload, stored.format).map_err(|err| err.to_string()));
            match decoded {
                Ok(doc) => back = Some(Accepted::new(doc)),
                Err(err) => output.push_str(&format!(
                    "; cannot roll back: generation {good} cannot run on this agent: {err}"
                )),
            }
        }
        // What the good generation owns may have been taken by another
        // deployment since the failed one dropped it.
        if let Some(accepted) = &back {
            let (topology, mine, others) =
                (self.maestro.topology().clone(), accepted.resources.clone(), self.others(name));
            let clash = tokio::task::spawn_blocking(move || alias_clash(&topology, &mine, &others))
                .await
                .unwrap_or_else(|join| {
                    Some((ErrorKind::ResourceConflict, format!("conflict check failed: {join}")))
                });
            if let Some((_, message)) = clash {
                output.push_str(&format!("; cannot roll back: {message}"));
                back = None;
            }
        }
        let undos = match back.as_ref().map(|a| undos_of(&a.doc)).transpose() {
            Ok(undos) => undos,
            Err(message) => {
                output.push_str(&format!("; cannot roll back: {message}"));
                back = None;
                None
            }
        };
        let Some(entry) = self.deployments.get_mut(name) else { return };
        let before = (entry.record.clone(), entry.document.clone());
        let now = now_ms();
        let output = harmony_score_wire::bounded_text(&output, harmony_score_wire::MAX_MESSAGE_BYTES);
        if back.is_some() {
            commit::fail(&mut entry.record, check.clone(), output.clone(), now);
            for owned in undos.into_iter().flatten() {
                entry.record.owned.retain(|o| o.resource != owned.resource);
                entry.record.owned.push(owned);
            }
            entry.document = back;
        } else {
            // Nothing to go back to (or it cannot run here): left as it is.
            commit::fail_in_place(&mut entry.record, check.clone(), output.clone(), now);
        }
        entry.retry = None;
        self.dirty = true;
        let failure = entry.record.health_failure.clone();
        if !self.save(name).await {
            // The disk still says "verifying": a restart verifies again.
            if let Some(entry) = self.deployments.get_mut(name) {
                (entry.record, entry.document) = before;
            }
            return;
        }
        match failure.and_then(|f| f.rolled_back_to.map(|to| (f.generation, to))) {
            Some((failed, to)) => {
                warn!(deployment = %name, generation = failed, rolled_back_to = to, check = %harmony_score_wire::log_text(&check), output = %harmony_score_wire::log_text(&output), "health check failed; rolling back");
                self.schedule(name, true);
            }
            None => {
                error!(deployment = %name, check = %harmony_score_wire::log_text(&check), output = %harmony_score_wire::log_text(&output), "health check failed; no good generation to roll back to, left as it is");
            }
        }
    }
}
