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

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream::DirectGetErrorKind};
use async_nats::{header, HeaderMap, HeaderValue};
use harmony_score_wire::names::{heartbeat_subject, status_hint_subject, status_key, AGENT_STATUS_BUCKET};
use harmony_score_wire::{from_cbor, now_ms, to_cbor, AgentStatus, ErrorKind, StatusError, MAX_STATUS_BYTES};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::config::AgentConfig;

/// How long after a failed write the status is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(2);
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

/// Writes the latest status whenever it changes and at every heartbeat,
/// retrying failed writes, until `stop` turns true.
pub(super) async fn write_loop(
    js: jetstream::Context,
    client: async_nats::Client,
    config: AgentConfig,
    mut status: watch::Receiver<AgentStatus>,
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
    let mut heartbeat = tokio::time::interval(config.heartbeat);
    let mut dirty = true;
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
                dirty = true;
            }
            _ = heartbeat.tick() => {
                dirty = true;
                let beat = client.publish(heartbeat_subject(&config.device_id), to_cbor(&now_ms()).into()).await;
                if let Err(err) = beat {
                    debug!(cause = %harmony_score_wire::log_text(&err), "heartbeat not published");
                }
            }
            () = tokio::time::sleep(RETRY_AFTER), if dirty => {}
            Some(hint) = next_overwrite(&mut overwrites) => {
                let sequence = hint
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(async_nats::header::NATS_SEQUENCE))
                    .and_then(|v| v.as_str().parse::<u64>().ok());
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
            () = sleep_until(rewrite_at) => {
                rewrite_at = None;
                dirty = true;
            }
        }
        if dirty {
            let report = status.borrow_and_update().clone();
            let write = writer.write(&js, &stream, &subject, report);
            tokio::pin!(write);
            // At shutdown a write under way gets a moment to land (the last
            // status); with no server to take it, the agent does not wait.
            let written = tokio::select! {
                written = &mut write => written,
                _ = stop.changed() => {
                    if client.connection_state() != async_nats::connection::State::Connected {
                        return;
                    }
                    match tokio::time::timeout(SHUTDOWN_WRITE_GRACE, &mut write).await {
                        Ok(written) => written,
                        Err(_) => return,
                    }
                }
            };
            match written {
                Ok(()) => {
                    dirty = false;
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
    /// Writes `report` (with the heartbeat time, any `duplicate_device`
    /// error, bounded to [`MAX_STATUS_BYTES`]) expecting the revision last
    /// written; on a conflict reads the key and judges who wrote it.
    async fn write(
        &mut self,
        js: &jetstream::Context,
        stream: &jetstream::stream::Stream<()>,
        subject: &str,
        mut report: AgentStatus,
    ) -> Result<(), WriteError> {
        if self.duplicate.as_ref().is_some_and(|(_, at)| at.elapsed() > DUPLICATE_REPORTED_FOR) {
            self.duplicate = None;
        }
        for _ in 0..5 {
            let expected = match self.revision {
                Some(rev) => rev,
                None => self.read_and_judge(stream, subject, &report.instance_id).await?,
            };
            report.heartbeat_at_ms = now_ms();
            let mut value = report.clone();
            value.errors.extend(self.duplicate.iter().map(|(e, _)| e.clone()));
            value.bound(MAX_STATUS_BYTES);
            let mut headers = HeaderMap::new();
            headers.insert(header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, HeaderValue::from(expected));
            self.revision = None;
            let ack =
                js.publish_with_headers(subject.to_owned(), headers, to_cbor(&value).into()).await?.await;
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
