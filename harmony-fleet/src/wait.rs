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

/// Where a deployment stands with respect to an awaited generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The generation (or a newer one) is applied.
    Applied(DeploymentStatus),
    /// The generation (or a newer one) failed or was rejected.
    Failed(DeploymentStatus),
    /// Not there yet; the deployment's status so far, if it has one.
    Pending(Option<DeploymentStatus>),
}

/// Judges a device's status against an awaited `generation` of `deployment`.
pub fn generation_progress(
    status: Option<&AgentStatus>,
    deployment: &DeploymentName,
    generation: u64,
) -> Progress {
    let Some(ds) = status.and_then(|s| s.deployments.get(deployment)) else {
        return Progress::Pending(None);
    };
    match ds.phase {
        Phase::Applied if ds.observed_generation >= generation => Progress::Applied(ds.clone()),
        Phase::Failed | Phase::Rejected if ds.desired_generation >= generation => {
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
    /// Waits until the device reports `generation` of `deployment` applied
    /// (`observed_generation >= generation`, phase Applied). A failed or
    /// rejected generation ends the wait with [`FleetError::DeploymentFailed`];
    /// nothing conclusive within `timeout` with [`FleetError::Timeout`].
    pub async fn wait_for_generation(
        &self,
        device: &DeviceId,
        deployment: &DeploymentName,
        generation: u64,
        timeout: Duration,
    ) -> Result<DeploymentStatus, FleetError> {
        let what = format!("{device}/{deployment} to apply generation {generation}");
        self.follow_status(device, timeout, what, |status| {
            match generation_progress(status, deployment, generation) {
                Progress::Applied(ds) => ControlFlow::Break(Ok(ds)),
                Progress::Failed(ds) => ControlFlow::Break(Err(FleetError::DeploymentFailed {
                    device: device.clone(),
                    deployment: deployment.clone(),
                    status: Box::new(ds),
                })),
                Progress::Pending(last) => ControlFlow::Continue(last),
            }
        })
        .await
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
                    warn!(device = %device, cause = %err, "cannot watch status; polling");
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
                            warn!(device = %device, cause = %err, "status watch error");
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
        .inspect_err(|err| warn!(key = %entry.key, cause = %err, "ignoring undecodable status"))
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
            truncated: false,
        }
    }

    #[test]
    fn a_generation_is_applied_only_when_observed_and_applied() {
        let web = DeploymentName::new("web").unwrap();
        let judge = |s: &AgentStatus, g| generation_progress(Some(s), &web, g);
        assert!(matches!(judge(&status("web", 3, 3, Phase::Applied), 3), Progress::Applied(_)));
        assert!(matches!(judge(&status("web", 4, 4, Phase::Applied), 3), Progress::Applied(_)));
        assert!(matches!(judge(&status("web", 3, 2, Phase::Applying), 3), Progress::Pending(Some(_))));
        // An older generation applied is not the awaited one.
        assert!(matches!(judge(&status("web", 2, 2, Phase::Applied), 3), Progress::Pending(Some(_))));
        assert!(matches!(judge(&status("web", 3, 2, Phase::Failed), 3), Progress::Failed(_)));
        assert!(matches!(judge(&status("web", 3, 2, Phase::Rejected), 3), Progress::Failed(_)));
        // An older failure is not the awaited generation's.
        assert!(matches!(judge(&status("web", 2, 1, Phase::Failed), 3), Progress::Pending(Some(_))));
        assert!(matches!(judge(&status("db", 3, 3, Phase::Applied), 3), Progress::Pending(None)));
        assert_eq!(generation_progress(None, &web, 1), Progress::Pending(None));
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
