//! Waiting for a device to report a generation applied, or a deployment pruned.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use harmony_score_wire::names::status_key;
use harmony_score_wire::{from_cbor, AgentStatus, DeploymentName, DeploymentStatus, DeviceId, Phase};
use tracing::warn;

use crate::client::MAX_VALUE_BYTES;
use crate::{FleetClient, FleetError};

/// Where a deployment stands with respect to an awaited generation (and digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Exactly the awaited generation (and document) is applied.
    Applied(DeploymentStatus),
    /// The awaited generation failed or was rejected.
    Failed(DeploymentStatus),
    /// The device moved past the awaited document: it reports a newer
    /// desired or observed generation, or the awaited generation with another
    /// digest. The awaited document will not be reported applied.
    Superseded(DeploymentStatus),
    /// Not there yet; the deployment's status so far, if it has one.
    Pending(Option<DeploymentStatus>),
}

/// Judges a device's status against an awaited `generation` of `deployment`
/// and, when given, the awaited `digest` ([`harmony_score_wire::document_digest`]
/// of the bytes written).
///
/// Applied means *that* document is running: `observed_generation` equals
/// the generation (never "at least": after a purge an operator could number
/// from 1 again while the device still runs 3), the observed digest matches,
/// and the phase is Applied. A device that reports no digest cannot confirm
/// an awaited digest: that stays Pending.
pub fn generation_progress(
    status: Option<&AgentStatus>,
    deployment: &DeploymentName,
    generation: u64,
    digest: Option<&str>,
) -> Progress {
    let Some(ds) = status.and_then(|s| s.deployments.get(deployment)) else {
        return Progress::Pending(None);
    };
    // Another document under the awaited generation: only when both sides know the digest.
    let other_document =
        |reported: &Option<String>| matches!((digest, reported.as_deref()), (Some(a), Some(r)) if a != r);
    let newer = ds.desired_generation > generation
        || ds.observed_generation > generation
        || ds.superseded_generation.is_some_and(|g| g >= generation);
    let replaced = (ds.desired_generation == generation && other_document(&ds.desired_digest))
        || (ds.observed_generation == generation && other_document(&ds.observed_digest));
    if newer || replaced {
        return Progress::Superseded(ds.clone());
    }
    let digest_confirmed = digest.is_none_or(|d| ds.observed_digest.as_deref() == Some(d));
    match ds.phase {
        Phase::Applied if ds.observed_generation == generation && digest_confirmed => {
            Progress::Applied(ds.clone())
        }
        // Rolled back: the awaited generation failed a health check and the
        // device went back to its last good one; it will not try it again.
        Phase::Failed | Phase::Rejected | Phase::RolledBack if ds.desired_generation == generation => {
            Progress::Failed(ds.clone())
        }
        _ => Progress::Pending(Some(ds.clone())),
    }
}

/// Whether a deleted deployment is gone from the device: pruned, or absent
/// from its status. A device that never reported has confirmed nothing.
pub fn is_pruned(status: Option<&AgentStatus>, deployment: &DeploymentName) -> bool {
    status.is_some_and(|s| s.deployments.get(deployment).is_none_or(|ds| ds.phase == Phase::Pruned))
}

/// One device awaited by [`FleetClient::wait_for_generations`]: its id, the
/// generation and (when known) the digest of the document written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Awaited {
    pub device: DeviceId,
    pub generation: u64,
    pub digest: Option<String>,
}

/// Up to this many devices a wait follows by their keys (one consumer with
/// a subject filter each); more, and it follows the whole bucket (one
/// consumer, every device's status) and skips the others.
const MAX_FILTERED_KEYS: usize = 256;

impl FleetClient {
    /// Waits until the device reports exactly `generation` of `deployment`
    /// applied, with `digest` (when given) as its observed digest; see
    /// [`generation_progress`]. Ends with [`FleetError::DeploymentFailed`]
    /// when that generation failed or was rejected, with
    /// [`FleetError::Superseded`] when the device moved past it (never a
    /// success), and with [`FleetError::Timeout`] when nothing conclusive
    /// happened within `timeout`.
    pub async fn wait_for_generation(
        &self,
        device: &DeviceId,
        deployment: &DeploymentName,
        generation: u64,
        digest: Option<&str>,
        timeout: Duration,
    ) -> Result<DeploymentStatus, FleetError> {
        let awaited = Awaited { device: device.clone(), generation, digest: digest.map(str::to_owned) };
        let mut results =
            self.wait_for_generations(deployment, std::slice::from_ref(&awaited), timeout).await?;
        results.pop().unwrap_or_else(|| {
            Err(FleetError::Timeout { what: device.to_string(), after: timeout, last: None })
        })
    }

    /// [`wait_for_generation`](Self::wait_for_generation) for many devices at
    /// once, with one follow of the status bucket (one consumer, whatever
    /// the number of devices; no poll): one result per awaited device, in
    /// order. The outer error is a failure to follow the bucket at all.
    pub async fn wait_for_generations(
        &self,
        deployment: &DeploymentName,
        awaited: &[Awaited],
        timeout: Duration,
    ) -> Result<Vec<Result<DeploymentStatus, FleetError>>, FleetError> {
        self.wait_for_generations_reporting(deployment, awaited, timeout, &|_, _| {}).await
    }

    /// [`wait_for_generations`](Self::wait_for_generations), calling
    /// `on_done(index, result)` for each device as soon as it concludes
    /// (a device that times out is not reported: its result is the
    /// timeout, in the list returned).
    pub async fn wait_for_generations_reporting(
        &self,
        deployment: &DeploymentName,
        awaited: &[Awaited],
        timeout: Duration,
        on_done: &(dyn Fn(usize, &Result<DeploymentStatus, FleetError>) + Send + Sync),
    ) -> Result<Vec<Result<DeploymentStatus, FleetError>>, FleetError> {
        let whats = awaited
            .iter()
            .map(|a| {
                format!(
                    "{}/{deployment} to apply generation {}{}",
                    a.device,
                    a.generation,
                    crate::error::short_digest(a.digest.as_deref())
                )
            })
            .collect();
        let devices: Vec<DeviceId> = awaited.iter().map(|a| a.device.clone()).collect();
        let results = self
            .follow_statuses(&devices, timeout, whats, |i, status| {
                let Awaited { device, generation, digest } = &awaited[i];
                let judged = match generation_progress(status, deployment, *generation, digest.as_deref()) {
                    Progress::Applied(ds) => ControlFlow::Break(Ok(ds)),
                    Progress::Failed(ds) => ControlFlow::Break(Err(FleetError::DeploymentFailed {
                        device: device.clone(),
                        deployment: deployment.clone(),
                        status: Box::new(ds),
                    })),
                    Progress::Superseded(ds) => ControlFlow::Break(Err(FleetError::Superseded {
                        device: device.clone(),
                        deployment: deployment.clone(),
                        awaited: *generation,
                        current: Box::new(ds),
                    })),
                    Progress::Pending(last) => ControlFlow::Continue(last),
                };
                if let ControlFlow::Break(result) = &judged {
                    on_done(i, result);
                }
                judged
            })
            .await?;
        Ok(results
            .into_iter()
            .zip(awaited)
            .map(|(result, a)| match result {
                // Say why a device that applied the generation did not confirm it.
                Err(FleetError::Timeout { what, after, last })
                    if a.digest.is_some()
                        && last.as_ref().is_some_and(|ds| {
                            ds.phase == Phase::Applied
                                && ds.observed_generation == a.generation
                                && ds.observed_digest.is_none()
                        }) =>
                {
                    let what = format!(
                        "{what} (the device reports generation {} applied but no digest, so it cannot confirm this document)",
                        a.generation
                    );
                    Err(FleetError::Timeout { what, after, last })
                }
                other => other,
            })
            .collect())
    }

    /// Waits until the device reports a deleted deployment pruned (or its
    /// status no longer lists it).
    pub async fn wait_for_prune(
        &self,
        device: &DeviceId,
        deployment: &DeploymentName,
        timeout: Duration,
    ) -> Result<(), FleetError> {
        let what = format!("{device}/{deployment} to be pruned");
        let mut results = self
            .follow_statuses(std::slice::from_ref(device), timeout, vec![what], |_, status| {
                if is_pruned(status, deployment) {
                    ControlFlow::Break(Ok(()))
                } else {
                    ControlFlow::Continue(status.and_then(|s| s.deployments.get(deployment)).cloned())
                }
            })
            .await?;
        results.pop().unwrap_or(Ok(()))
    }

    /// Feeds every status the `devices` write, from the one stored now on,
    /// to `judge(index, status)` until it breaks for every device or
    /// `timeout` passes (then [`FleetError::Timeout`] with the last status
    /// seen, for each device not concluded).
    ///
    /// One KV watch (an ordered consumer: stored values only, in order,
    /// starting with each key's last value) follows them all: by key filter
    /// up to [`MAX_FILTERED_KEYS`] devices, else the whole bucket. No
    /// consumer per device (a server refuses past 1,000 per stream by
    /// default) and no poll. A watch that ends or fails is opened again: it
    /// starts again from each key's last value, so nothing is missed.
    async fn follow_statuses<R>(
        &self,
        devices: &[DeviceId],
        timeout: Duration,
        whats: Vec<String>,
        mut judge: impl FnMut(
            usize,
            Option<&AgentStatus>,
        ) -> ControlFlow<Result<R, FleetError>, Option<DeploymentStatus>>,
    ) -> Result<Vec<Result<R, FleetError>>, FleetError> {
        let store = &self.buckets().await?.status;
        let mut positions: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, device) in devices.iter().enumerate() {
            positions.entry(status_key(device)).or_default().push(i);
        }
        let mut results: Vec<Option<Result<R, FleetError>>> = devices.iter().map(|_| None).collect();
        let mut last: Vec<Option<DeploymentStatus>> = vec![None; devices.len()];
        let mut open = positions.len();
        let follow = async {
            let mut attempt = 0u32;
            while open > 0 {
                let watch = if positions.len() <= MAX_FILTERED_KEYS {
                    store.watch_many_with_history(positions.keys()).await
                } else {
                    store.watch_with_history(">").await
                };
                let mut watch = match watch {
                    Ok(watch) => watch,
                    Err(err) => {
                        attempt += 1;
                        if attempt >= 10 {
                            return Err(FleetError::nats("follow device statuses", err));
                        }
                        warn!(cause = %harmony_score_wire::log_text(&err), "cannot follow statuses; trying again");
                        tokio::time::sleep(Duration::from_millis(100) * attempt).await;
                        continue;
                    }
                };
                while let Some(entry) = watch.next().await {
                    let entry = match entry {
                        Ok(entry) => entry,
                        Err(err) => {
                            warn!(cause = %harmony_score_wire::log_text(&err), "status watch error");
                            continue;
                        }
                    };
                    let Some(indices) = positions.get(&entry.key) else { continue };
                    let status = match entry.operation {
                        kv::Operation::Put => match decode(&entry) {
                            Some(status) => Some(status),
                            None => continue,
                        },
                        _ => None,
                    };
                    for &i in indices {
                        if results[i].is_some() {
                            continue;
                        }
                        match judge(i, status.as_ref()) {
                            ControlFlow::Break(result) => {
                                results[i] = Some(result);
                                open -= 1;
                            }
                            ControlFlow::Continue(seen) => last[i] = seen,
                        }
                    }
                    if open == 0 {
                        break;
                    }
                }
            }
            Ok(())
        };
        if let Ok(Err(err)) = tokio::time::timeout(timeout, follow).await {
            return Err(err);
        }
        Ok(results
            .into_iter()
            .zip(whats)
            .zip(last)
            .map(|((result, what), last)| {
                result.unwrap_or_else(|| {
                    Err(FleetError::Timeout { what, after: timeout, last: last.map(Box::new) })
                })
            })
            .collect())
    }
}

fn decode(entry: &kv::Entry) -> Option<AgentStatus> {
    from_cbor(&entry.value, MAX_VALUE_BYTES, "agent status")
        .inspect_err(|err| warn!(key = %harmony_score_wire::log_text(&entry.key), cause = %harmony_score_wire::log_text(err), "ignoring undecodable status"))
        .ok()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn status(deployment: &str, desired: u64, observed: u64, phase: Phase) -> AgentStatus {
        let ds = DeploymentStatus {
            desired_generation: desired,
            observed_generation: observed,
            phase,
            scores: Vec::new(),
            error: None,
            last_attempt_at_ms: 0,
            last_applied_at_ms: 0,
            ..Default::default()
        };
        AgentStatus {
            device_id: DeviceId::new("dev-1").unwrap(),
            agent_version: "0".into(),
            updated_at_ms: 0,
            heartbeat_at_ms: 0,
            heartbeat_interval_ms: 0,
            info: None,
            deployments: BTreeMap::from([(DeploymentName::new(deployment).unwrap(), ds)]),
            instance_id: String::new(),
            errors: Vec::new(),
            keyset_version: None,
            truncated: false,
        }
    }

    const D: &str = "sha256:aaaa";
    const OTHER: &str = "sha256:bbbb";

    /// `status` with the reported digests of the desired and observed documents.
    fn with_digests(mut s: AgentStatus, desired: Option<&str>, observed: Option<&str>) -> AgentStatus {
        for ds in s.deployments.values_mut() {
            ds.desired_digest = desired.map(str::to_owned);
            ds.observed_digest = observed.map(str::to_owned);
        }
        s
    }

    fn judge(s: &AgentStatus, generation: u64, digest: Option<&str>) -> Progress {
        generation_progress(Some(s), &DeploymentName::new("web").unwrap(), generation, digest)
    }

    #[test]
    fn applied_is_exactly_the_generation_and_digest_in_phase_applied() {
        let applied = with_digests(status("web", 3, 3, Phase::Applied), Some(D), Some(D));
        assert!(matches!(judge(&applied, 3, Some(D)), Progress::Applied(_)));
        // No digest awaited: the generation alone decides.
        assert!(matches!(judge(&status("web", 3, 3, Phase::Applied), 3, None), Progress::Applied(_)));
        // Observed but not (yet) in phase Applied.
        let verifying = with_digests(status("web", 3, 3, Phase::Applying), Some(D), Some(D));
        assert!(matches!(judge(&verifying, 3, Some(D)), Progress::Pending(Some(_))));
    }

    #[test]
    fn an_older_generation_or_a_run_in_progress_is_pending() {
        let older = with_digests(status("web", 2, 2, Phase::Applied), Some(OTHER), Some(OTHER));
        assert!(matches!(judge(&older, 3, Some(D)), Progress::Pending(Some(_))));
        let applying = with_digests(status("web", 3, 2, Phase::Applying), Some(D), Some(OTHER));
        assert!(matches!(judge(&applying, 3, Some(D)), Progress::Pending(Some(_))));
        // An older generation's failure is not the awaited one's.
        assert!(matches!(judge(&status("web", 2, 1, Phase::Failed), 3, Some(D)), Progress::Pending(Some(_))));
        // Another deployment, or no status at all.
        assert!(matches!(judge(&status("db", 3, 3, Phase::Applied), 3, None), Progress::Pending(None)));
        let web = DeploymentName::new("web").unwrap();
        assert_eq!(generation_progress(None, &web, 1, Some(D)), Progress::Pending(None));
    }

    #[test]
    fn a_device_that_reports_no_digest_cannot_confirm_an_awaited_one() {
        let no_digest = status("web", 3, 3, Phase::Applied);
        assert!(matches!(judge(&no_digest, 3, Some(D)), Progress::Pending(Some(_))));
    }

    #[test]
    fn the_awaited_generation_failed_or_rejected_is_a_failure() {
        assert!(matches!(judge(&status("web", 3, 2, Phase::Failed), 3, None), Progress::Failed(_)));
        let rejected = with_digests(status("web", 3, 2, Phase::Rejected), Some(D), Some(OTHER));
        assert!(matches!(judge(&rejected, 3, Some(D)), Progress::Failed(_)));
        // A rejection that could not say which document it refused.
        assert!(matches!(judge(&status("web", 3, 2, Phase::Rejected), 3, Some(D)), Progress::Failed(_)));
    }

    // Issue 11 §2: verifying is pending; rolled back for the awaited
    // generation is a failure (the device went back to its last good one
    // and will not try it again), an older one's rollback is not.
    #[test]
    fn verifying_is_pending_and_a_rollback_of_the_awaited_generation_is_a_failure() {
        let verifying = with_digests(status("web", 3, 2, Phase::Verifying), Some(D), Some(OTHER));
        assert!(matches!(judge(&verifying, 3, Some(D)), Progress::Pending(Some(_))));
        let rolled_back = with_digests(status("web", 3, 2, Phase::RolledBack), Some(D), Some(OTHER));
        assert!(matches!(judge(&rolled_back, 3, Some(D)), Progress::Failed(_)));
        let older = with_digests(status("web", 2, 1, Phase::RolledBack), Some(OTHER), Some(OTHER));
        assert!(matches!(judge(&older, 3, Some(D)), Progress::Pending(Some(_))));
        // A later generation that rolled back supersedes an awaited earlier one.
        assert!(matches!(judge(&status("web", 4, 2, Phase::RolledBack), 3, None), Progress::Superseded(_)));
    }

    #[test]
    fn a_newer_generation_supersedes_and_is_never_success() {
        // The purge bug: the operator restarted at 1, the device runs 3.
        let ahead = with_digests(status("web", 3, 3, Phase::Applied), Some(OTHER), Some(OTHER));
        assert!(matches!(judge(&ahead, 1, Some(D)), Progress::Superseded(_)));
        assert!(matches!(judge(&status("web", 3, 3, Phase::Applied), 1, None), Progress::Superseded(_)));
        // A newer desired generation, even before it is applied or when it failed.
        assert!(matches!(judge(&status("web", 4, 2, Phase::Applying), 3, None), Progress::Superseded(_)));
        assert!(matches!(judge(&status("web", 4, 3, Phase::Rejected), 3, None), Progress::Superseded(_)));
        // The awaited run was superseded by a newer one.
        let mut cut = status("web", 4, 2, Phase::Applying);
        cut.deployments.values_mut().for_each(|d| d.superseded_generation = Some(3));
        assert!(matches!(judge(&cut, 3, None), Progress::Superseded(_)));
    }

    #[test]
    fn the_same_generation_with_another_digest_supersedes() {
        let applied_other = with_digests(status("web", 3, 3, Phase::Applied), Some(OTHER), Some(OTHER));
        assert!(matches!(judge(&applied_other, 3, Some(D)), Progress::Superseded(_)));
        let failed_other = with_digests(status("web", 3, 2, Phase::Failed), Some(OTHER), None);
        assert!(matches!(judge(&failed_other, 3, Some(D)), Progress::Superseded(_)));
        let applying_other = with_digests(status("web", 3, 2, Phase::Applying), Some(OTHER), None);
        assert!(matches!(judge(&applying_other, 3, Some(D)), Progress::Superseded(_)));
        // Without an awaited digest there is nothing to compare.
        assert!(matches!(judge(&applied_other, 3, None), Progress::Applied(_)));
    }

    #[test]
    fn pruned_means_pruned_or_gone() {
        let web = DeploymentName::new("web").unwrap();
        assert!(!is_pruned(None, &web));
        assert!(is_pruned(Some(&status("db", 1, 1, Phase::Applied)), &web));
        assert!(is_pruned(Some(&status("web", 1, 1, Phase::Pruned)), &web));
        assert!(!is_pruned(Some(&status("web", 1, 1, Phase::Applied)), &web));
    }
}
