//! Waiting for a device to report a generation applied, or a deployment pruned.

use std::ops::ControlFlow;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use harmony_score_wire::names::status_key;
use harmony_score_wire::{from_cbor, AgentStatus, DeploymentName, DeploymentStatus, DeviceId, Phase};
use tracing::warn;

use crate::client::MAX_VALUE_BYTES;
use crate::{FleetClient, FleetError};

/// How often the status is read again while waiting, besides the watch (a
/// KV watch can die silently across a server restart).
const POLL_INTERVAL: Duration = Duration::from_secs(2);

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
        Phase::Failed | Phase::Rejected if ds.desired_generation == generation => {
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
        let what = format!(
            "{device}/{deployment} to apply generation {generation}{}",
            crate::error::short_digest(digest)
        );
        let result = self
            .follow_status(device, timeout, what, |status| {
                match generation_progress(status, deployment, generation, digest) {
                    Progress::Applied(ds) => ControlFlow::Break(Ok(ds)),
                    Progress::Failed(ds) => ControlFlow::Break(Err(FleetError::DeploymentFailed {
                        device: device.clone(),
                        deployment: deployment.clone(),
                        status: Box::new(ds),
                    })),
                    Progress::Superseded(ds) => ControlFlow::Break(Err(FleetError::Superseded {
                        device: device.clone(),
                        deployment: deployment.clone(),
                        awaited: generation,
                        current: Box::new(ds),
                    })),
                    Progress::Pending(last) => ControlFlow::Continue(last),
                }
            })
            .await;
        match result {
            // Say why a device that applied the generation did not confirm it.
            Err(FleetError::Timeout { what, after, last })
                if digest.is_some()
                    && last.as_ref().is_some_and(|ds| {
                        ds.phase == Phase::Applied
                            && ds.observed_generation == generation
                            && ds.observed_digest.is_none()
                    }) =>
            {
                let what = format!(
                    "{what} (the device reports generation {generation} applied but no digest, so it cannot confirm this document)"
                );
                Err(FleetError::Timeout { what, after, last })
            }
            other => other,
        }
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
        self.follow_status(device, timeout, what, |status| {
            if is_pruned(status, deployment) {
                ControlFlow::Break(Ok(()))
            } else {
                ControlFlow::Continue(status.and_then(|s| s.deployments.get(deployment)).cloned())
            }
        })
        .await
    }

    /// Feeds every status the device writes (and a fresh read at start and
    /// every [`POLL_INTERVAL`]) to `judge` until it breaks or `timeout` passes.
    async fn follow_status<R>(
        &self,
        device: &DeviceId,
        timeout: Duration,
        what: String,
        mut judge: impl FnMut(
            Option<&AgentStatus>,
        ) -> ControlFlow<Result<R, FleetError>, Option<DeploymentStatus>>,
    ) -> Result<R, FleetError> {
        let store = &self.buckets().await?.status;
        let key = status_key(device);
        let mut last = None;
        let follow = async {
            // Watch first, then read: a status written in between is not missed.
            let mut watch = match store.watch(&key).await {
                Ok(watch) => Some(watch),
                Err(err) => {
                    warn!(device = %device, cause = %harmony_score_wire::log_text(&err), "cannot watch status; polling");
                    None
                }
            };
            let mut poll = tokio::time::interval(POLL_INTERVAL);
            loop {
                let status = tokio::select! {
                    _ = poll.tick() => read(store, &key).await?,
                    entry = next_entry(&mut watch) => match entry {
                        Some(Ok(entry)) if entry.operation == kv::Operation::Put => match decode(&entry) {
                            Some(status) => Some(status),
                            None => continue,
                        },
                        Some(Ok(_)) => None,
                        Some(Err(err)) => {
                            warn!(device = %device, cause = %harmony_score_wire::log_text(&err), "status watch error");
                            continue;
                        }
                        None => {
                            watch = None;
                            continue;
                        }
                    },
                };
                match judge(status.as_ref()) {
                    ControlFlow::Break(result) => return result,
                    ControlFlow::Continue(seen) => last = seen,
                }
            }
        };
        let outcome = tokio::time::timeout(timeout, follow).await;
        match outcome {
            Ok(result) => result,
            Err(_) => Err(FleetError::Timeout { what, after: timeout, last: last.map(Box::new) }),
        }
    }
}

async fn next_entry(watch: &mut Option<kv::Watch>) -> Option<Result<kv::Entry, kv::WatcherError>> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}

async fn read(store: &kv::Store, key: &str) -> Result<Option<AgentStatus>, FleetError> {
    match store.entry(key).await.map_err(|e| FleetError::nats(format!("read status {key}"), e))? {
        Some(entry) if entry.operation == kv::Operation::Put => Ok(decode(&entry)),
        _ => Ok(None),
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
