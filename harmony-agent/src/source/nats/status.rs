//! Writing the device's status to KV with compare-and-set, and the heartbeat.
//!
//! Compare-and-set is real: on a sequence conflict the writer reads the
//! value it lost to. Its own instance's (an ack lost on the way) or the
//! previous instance's (the first write after a start) is taken over; any
//! other instance id means a second agent writes this device's status —
//! two devices with one id, say cloned from one image. That is reported
//! as `duplicate_device` in the log and in the status, never overwritten
//! silently.
//!
//! The agent also follows its own key (the bucket's headers-only republish
//! on `harmony.status-hint.<id>`): a write past its own by anyone else is
//! answered, after a pause, by writing its status again, so its newest
//! status lands in the end without waiting for a heartbeat.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream::DirectGetErrorKind};
use async_nats::{header, HeaderMap, HeaderValue};
use harmony_score_wire::names::{
    heartbeat_key, heartbeat_subject, status_hint_subject, status_key, AGENT_STATUS_BUCKET,
};
use harmony_score_wire::{
    from_cbor, now_ms, to_cbor, AgentStatus, DeploymentStatus, ErrorKind, Phase, StatusError,
    MAX_STATUS_BYTES,
};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::config::AgentConfig;

/// How long after a failed write the status is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// How long a run may show `applying` (or its progress) before the status
/// says so: most runs end well within it, and their end is then the one
/// write (a resync's NOOP run: none at all).
const RUN_QUIET: Duration = Duration::from_secs(1);
/// How long a status write under way at shutdown may still take.
const SHUTDOWN_WRITE_GRACE: Duration = Duration::from_secs(1);
/// How long a `duplicate_device` report stays after the last conflict.
const DUPLICATE_REPORTED_FOR: Duration = Duration::from_secs(600);

/// How long after someone else wrote over this agent's status it writes
/// its own again (and, while a duplicate device is reported, how long).
const REWRITE_AFTER: Duration = Duration::from_secs(1);
const DUPLICATE_REWRITE_AFTER: Duration = Duration::from_secs(5);

/// The next hint of a write to the status key, if it is followed.
async fn next_overwrite(subscription: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    use futures_util::StreamExt;
    match subscription {
        Some(subscription) => subscription.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Why a status write failed.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("reading the status revision failed: {0}")]
    ReadFailed(#[from] jetstream::stream::DirectGetError),
    #[error("publishing the status failed: {0}")]
    PublishFailed(#[from] jetstream::context::PublishError),
    #[error("another writer kept changing the status key")]
    ConflictPersisted,
}

/// Writes the latest status whenever it changes (and again when someone
/// else wrote over it), retrying failed writes, and beats the heartbeat,
/// until `stop` turns true.
pub(super) async fn write_loop(
    js: jetstream::Context,
    client: async_nats::Client,
    config: AgentConfig,
    mut status: watch::Receiver<Arc<AgentStatus>>,
    mut stop: watch::Receiver<bool>,
) {
    let stream = match js.get_stream_no_info(format!("KV_{AGENT_STATUS_BUCKET}")).await {
        Ok(stream) => stream,
        Err(err) => {
            warn!(cause = %harmony_score_wire::log_text(&err), "cannot open the status stream; status is not reported");
            return;
        }
    };
    let subject = format!("$KV.{AGENT_STATUS_BUCKET}.{}", status_key(&config.device_id));
    let mut writer = CasWriter { revision: None, duplicate: None, first: true };
    // The status bucket's headers-only copy of every write of this key: a
    // write with a sequence past this agent's own is someone else's.
    let mut overwrites = match client.subscribe(status_hint_subject(&config.device_id)).await {
        Ok(subscription) => Some(subscription),
        Err(err) => {
            warn!(cause = %harmony_score_wire::log_text(&err), "cannot follow the status key; a status written over this agent's waits for its next write");
            None
        }
    };
    let mut rewrite_at: Option<tokio::time::Instant> = None;
    // The first beat at a random point of the first interval, then every
    // interval ±10 %: a fleet started together does not beat together.
    let mut next_beat = tokio::time::Instant::now() + config.heartbeat.mul_f64(crate::controller::jitter());
    let beat_key = format!("$KV.{AGENT_STATUS_BUCKET}.{}", heartbeat_key(&config.device_id));
    let mut dirty = true;
    // Written even when nothing but timestamps changed (someone else wrote
    // over it, a duplicate report expired, the first write).
    let mut force = true;
    // What was last written: a resync that finds everything as it was
    // (timestamps aside) does not write the status again.
    let mut written: Option<Arc<AgentStatus>> = None;
    let mut hold_until: Option<tokio::time::Instant> = None;
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = stop.changed() => {
                return last_word(&mut writer, &js, &stream, &subject, &client, written.as_deref(), &status).await;
            }
            changed = status.changed() => {
                // Closed: the controller stopped (it drops its sender just
                // before the source is told to stop), with its last status.
                if changed.is_err() {
                    return last_word(&mut writer, &js, &stream, &subject, &client, written.as_deref(), &status)
                        .await;
                }
                dirty = true;
            }
            () = tokio::time::sleep_until(next_beat) => {
                next_beat = tokio::time::Instant::now() + crate::controller::jittered(config.heartbeat);
                // A few bytes, stored (the heartbeat key: operators see the
                // last beat of a device) and live (the heartbeat subject).
                // The status itself is written only when it changes.
                let now = to_cbor(&now_ms());
                for subject in [beat_key.clone(), heartbeat_subject(&config.device_id)] {
                    if let Err(err) = client.publish(subject, now.clone().into()).await {
                        debug!(cause = %harmony_score_wire::log_text(&err), "heartbeat not published");
                    }
                }
                // A duplicate_device report past its time leaves the status.
                if writer.duplicate_expired() {
                    (dirty, force) = (true, true);
                }
            }
            () = tokio::time::sleep(RETRY_AFTER), if dirty => {}
            Some(hint) = next_overwrite(&mut overwrites) => {
                // Only the bucket's own copy of a write to this key: another
                // device can have the server deliver other messages here.
                let sequence = super::republished_sequence(&hint, &subject);
                let foreign = matches!((sequence, writer.revision), (Some(seq), Some(mine)) if seq > mine);
                if foreign && rewrite_at.is_none() {
                    // Not at once: two agents sharing a device id would
                    // otherwise rewrite over each other as fast as the
                    // server takes it. Both are reported (duplicate_device).
                    let after = if writer.duplicate.is_some() { DUPLICATE_REWRITE_AFTER } else { REWRITE_AFTER };
                    debug!(sequence = ?sequence, "the status key was written by someone else; writing it again");
                    rewrite_at = Some(tokio::time::Instant::now() + after);
                }
            }
            () = sleep_until(hold_until) => {}
            () = sleep_until(rewrite_at) => {
                rewrite_at = None;
                (dirty, force) = (true, true);
            }
        }
        if dirty {
            let report = Arc::clone(&status.borrow_and_update());
            if !force && writer.revision.is_some() {
                if written.as_ref().is_some_and(|w| same_but_timestamps(w, &report)) {
                    (dirty, hold_until) = (false, None);
                    continue;
                }
                // A run under way (a new generation accepted, its
                // progress, or a resync's run of an applied one) is news
                // only if it lasts: wait a little before saying so. Most
                // runs end within it, and their end (or, for a resync's
                // NOOP run, nothing) is then the one write. An end, a
                // failure, a rejection or a prune is written at once.
                let now = tokio::time::Instant::now();
                if written.as_ref().is_some_and(|w| only_runs_under_way(w, &report)) {
                    let until = *hold_until.get_or_insert(now + RUN_QUIET);
                    if until > now {
                        continue;
                    }
                }
            }
            hold_until = None;
            let write = writer.write(&js, &stream, &subject, Arc::clone(&report));
            tokio::pin!(write);
            // At shutdown a write under way gets a moment to land (the last
            // status); with no server to take it, the agent does not wait.
            let result = tokio::select! {
                result = &mut write => result,
                _ = stop.changed() => {
                    if client.connection_state() != async_nats::connection::State::Connected {
                        return;
                    }
                    match tokio::time::timeout(SHUTDOWN_WRITE_GRACE, &mut write).await {
                        Ok(result) => result,
                        Err(_) => return,
                    }
                }
            };
            match result {
                Ok(()) => {
                    (dirty, force) = (false, false);
                    written = Some(report);
                    if last_error.take().is_some() {
                        info!("status written again");
                    }
                }
                // Retried every few seconds: say each distinct cause once.
                Err(err) => {
                    let text = err.to_string();
                    if last_error.as_deref() != Some(&text) {
                        warn!(cause = %harmony_score_wire::log_text(&text), "status not written; retrying");
                    } else {
                        debug!(cause = %harmony_score_wire::log_text(&text), "status still not written");
                    }
                    last_error = Some(text);
                }
            }
        }
    }
}

/// At stop: a status held back (a run under way) or not yet written is the
/// device's last word, written now if a server takes it (as a write under
/// way is given [`SHUTDOWN_WRITE_GRACE`]).
async fn last_word(
    writer: &mut CasWriter,
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream<()>,
    subject: &str,
    client: &async_nats::Client,
    written: Option<&AgentStatus>,
    status: &watch::Receiver<Arc<AgentStatus>>,
) {
    let last = Arc::clone(&status.borrow());
    let news = !written.is_some_and(|w| same_but_timestamps(w, &last));
    if news && client.connection_state() == async_nats::connection::State::Connected {
        let _ = tokio::time::timeout(SHUTDOWN_WRITE_GRACE, writer.write(js, stream, subject, last)).await;
    }
}

/// Whether `a` and `b` are the same status but for their timestamps (what
/// decides whether it changed). Compared field by field, without a copy:
/// it runs at every change of the status. The destructuring is
/// exhaustive, so a field added to the status must be placed here.
fn same_but_timestamps(a: &AgentStatus, b: &AgentStatus) -> bool {
    same_outside_deployments(a, b)
        && a.deployments.len() == b.deployments.len()
        && a.deployments
            .iter()
            .zip(&b.deployments)
            .all(|((na, da), (nb, db))| na == nb && same_deployment(da, db))
}

/// Everything but the deployments and the timestamps.
fn same_outside_deployments(a: &AgentStatus, b: &AgentStatus) -> bool {
    let AgentStatus {
        device_id,
        agent_version,
        updated_at_ms: _,
        heartbeat_at_ms: _,
        heartbeat_interval_ms,
        info,
        deployments: _,
        instance_id,
        errors,
        keyset_version,
        truncated,
    } = a;
    *device_id == b.device_id
        && *agent_version == b.agent_version
        && *heartbeat_interval_ms == b.heartbeat_interval_ms
        && *info == b.info
        && *instance_id == b.instance_id
        && *errors == b.errors
        && *keyset_version == b.keyset_version
        && *truncated == b.truncated
}

/// One deployment's status but for its timestamps.
fn same_deployment(a: &DeploymentStatus, b: &DeploymentStatus) -> bool {
    let DeploymentStatus {
        desired_generation,
        observed_generation,
        phase,
        scores,
        error,
        last_attempt_at_ms: _,
        last_applied_at_ms: _,
        desired_digest,
        observed_digest,
        current_score,
        superseded_generation,
        health,
    } = a;
    *desired_generation == b.desired_generation
        && *observed_generation == b.observed_generation
        && *phase == b.phase
        && *scores == b.scores
        && *error == b.error
        && *desired_digest == b.desired_digest
        && *observed_digest == b.observed_digest
        && *current_score == b.current_score
        && *superseded_generation == b.superseded_generation
        && *health == b.health
}

/// Whether `now` differs from `written` only by runs under way: every
/// deployment that changed (or is new) shows `applying`, none went away,
/// nothing else changed. A run's end (applied, failed, verifying, rolled
/// back), a rejection or a prune is news. Timestamps are no change.
fn only_runs_under_way(written: &AgentStatus, now: &AgentStatus) -> bool {
    same_outside_deployments(written, now)
        && written.deployments.keys().all(|name| now.deployments.contains_key(name))
        && now.deployments.iter().all(|(name, d)| {
            d.phase == Phase::Applying || written.deployments.get(name).is_some_and(|w| same_deployment(w, d))
        })
}

/// The status key's compare-and-set state.
struct CasWriter {
    /// The revision this agent last wrote (or took over); `None`: unknown.
    revision: Option<u64>,
    /// Another instance seen writing this key, and when.
    duplicate: Option<(StatusError, std::time::Instant)>,
    /// No write yet: whatever the key holds is the previous instance's.
    first: bool,
}

impl CasWriter {
    /// Whether a `duplicate_device` report is held past its time.
    fn duplicate_expired(&self) -> bool {
        self.duplicate.as_ref().is_some_and(|(_, at)| at.elapsed() > DUPLICATE_REPORTED_FOR)
    }

    /// Writes `report` (with the heartbeat time, any `duplicate_device`
    /// error, bounded to [`MAX_STATUS_BYTES`]) expecting the revision last
    /// written; on a conflict reads the key and judges who wrote it.
    async fn write(
        &mut self,
        js: &jetstream::Context,
        stream: &jetstream::stream::Stream<()>,
        subject: &str,
        report: Arc<AgentStatus>,
    ) -> Result<(), WriteError> {
        if self.duplicate_expired() {
            self.duplicate = None;
        }
        for _ in 0..5 {
            let expected = match self.revision {
                Some(rev) => rev,
                None => self.read_and_judge(stream, subject, &report.instance_id).await?,
            };
            let mut value = AgentStatus::clone(&report);
            value.heartbeat_at_ms = now_ms();
            value.errors.extend(self.duplicate.iter().map(|(e, _)| e.clone()));
            let encoded = value.to_bounded_cbor(MAX_STATUS_BYTES);
            let mut headers = HeaderMap::new();
            headers.insert(header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, HeaderValue::from(expected));
            self.revision = None;
            let ack = js.publish_with_headers(subject.to_owned(), headers, encoded.into()).await?.await;
            match ack {
                Ok(ack) => {
                    self.revision = Some(ack.sequence);
                    self.first = false;
                    return Ok(());
                }
                Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(err) => return Err(err.into()),
            }
        }
        Err(WriteError::ConflictPersisted)
    }

    /// Reads the key's current revision; a value written by another agent
    /// instance (after this one's first write) is a duplicate device.
    async fn read_and_judge(
        &mut self,
        stream: &jetstream::stream::Stream<()>,
        subject: &str,
        mine: &str,
    ) -> Result<u64, WriteError> {
        let message = match stream.direct_get_last_for_subject(subject).await {
            Ok(message) => message,
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(err.into()),
        };
        // A delete marker (the operator deleted the key) was written by no
        // agent instance: take its revision over.
        let deleted =
            message.headers.get("KV-Operation").is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
        if !self.first && !deleted {
            let other = from_cbor::<AgentStatus>(&message.payload, 2 * MAX_STATUS_BYTES, "agent status")
                .map(|s| (s.instance_id, s.info.map(|i| i.hostname).unwrap_or_default()))
                .unwrap_or_else(|_| ("(unreadable)".to_owned(), String::new()));
            if other.0 != mine {
                let text = format!(
                    "another agent instance ({}, host {:?}) writes this device's status: two devices share this device id",
                    harmony_score_wire::bounded_text(&other.0, 64),
                    harmony_score_wire::bounded_text(&other.1, 64)
                );
                error!(kind = "duplicate_device", "{text}");
                self.duplicate =
                    Some((StatusError::new(ErrorKind::DuplicateDevice, text), std::time::Instant::now()));
            }
        }
        Ok(message.sequence)
    }
}

#[cfg(test)]
mod tests {
    use harmony_score_wire::{AgentStatus, DeploymentName, DeploymentStatus, DeviceId, Phase};

    use super::{only_runs_under_way, same_but_timestamps};

    fn status(phase: Phase, desired: u64, observed: u64, current: Option<&str>) -> AgentStatus {
        let mut status = AgentStatus {
            device_id: DeviceId::new("dev-1").unwrap(),
            agent_version: "0".into(),
            updated_at_ms: 0,
            heartbeat_at_ms: 0,
            heartbeat_interval_ms: 0,
            info: None,
            deployments: Default::default(),
            instance_id: "i".into(),
            errors: Vec::new(),
            keyset_version: None,
            truncated: false,
        };
        let deployment = DeploymentStatus {
            desired_generation: desired,
            observed_generation: observed,
            phase,
            current_score: current.map(str::to_owned),
            last_attempt_at_ms: desired * 1000,
            ..Default::default()
        };
        status.deployments.insert(DeploymentName::new("app").unwrap(), deployment);
        status
    }

    // A run under way is held back, whatever started it; its end is not.
    // The bench found a first version holding a new generation's end too
    // (every deploy took 250 ms more).
    #[test]
    fn only_runs_under_way_are_held_never_their_end() {
        let applied = status(Phase::Applied, 3, 3, None);
        // A resync's run of the applied generation.
        let rerun = status(Phase::Applying, 3, 3, Some("1/1 file [/a]"));
        assert!(only_runs_under_way(&applied, &rerun));
        // A new generation accepted, its progress: under way, held.
        let accepted = status(Phase::Applying, 4, 3, None);
        let progress = status(Phase::Applying, 4, 3, Some("1/1 file [/a]"));
        assert!(only_runs_under_way(&applied, &accepted));
        assert!(only_runs_under_way(&accepted, &progress));
        // Its end, a failure, a rejection: news.
        for end in [Phase::Applied, Phase::Failed, Phase::Verifying, Phase::Rejected, Phase::RolledBack] {
            let ended = status(end, 4, 4, None);
            assert!(!only_runs_under_way(&progress, &ended), "{end:?} held");
            assert!(!only_runs_under_way(&applied, &ended), "{end:?} held");
        }
        // A new deployment under way is held; a deployment gone is news.
        let mut two = progress.clone();
        two.deployments.insert(
            DeploymentName::new("other").unwrap(),
            progress.deployments[&DeploymentName::new("app").unwrap()].clone(),
        );
        assert!(only_runs_under_way(&applied, &two));
        assert!(!only_runs_under_way(&two, &progress));
        // A change outside the deployments (an error reported) is news.
        let mut erred = rerun.clone();
        erred.errors.push(harmony_score_wire::StatusError {
            kind: harmony_score_wire::ErrorKind::DuplicateDevice,
            message: "twin".into(),
        });
        assert!(!only_runs_under_way(&applied, &erred));
        // Timestamps alone are no change; anything else is.
        let mut later = status(Phase::Applied, 3, 3, None);
        (later.updated_at_ms, later.heartbeat_at_ms) = (5, 6);
        later.deployments.values_mut().for_each(|d| (d.last_attempt_at_ms, d.last_applied_at_ms) = (7, 8));
        assert!(same_but_timestamps(&applied, &later));
        assert!(only_runs_under_way(&applied, &later));
        assert!(!same_but_timestamps(&applied, &rerun));
        assert!(!same_but_timestamps(&applied, &erred));
        later.keyset_version = Some(2);
        assert!(!same_but_timestamps(&applied, &later));
    }
}
