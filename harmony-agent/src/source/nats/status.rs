//! Writing the device's status to KV with compare-and-set, and the heartbeat.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream::DirectGetErrorKind};
use async_nats::{header, HeaderMap, HeaderValue};
use harmony_score_wire::names::{heartbeat_subject, status_key, AGENT_STATUS_BUCKET};
use harmony_score_wire::{now_ms, to_cbor, AgentStatus};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::AgentConfig;

/// How long after a failed write the status is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(2);

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
            warn!(cause = %err, "cannot open the status stream; status is not reported");
            return;
        }
    };
    let subject = format!("$KV.{AGENT_STATUS_BUCKET}.{}", status_key(&config.device_id));
    let mut revision: Option<u64> = None;
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
                    debug!(cause = %err, "heartbeat not published");
                }
            }
            () = tokio::time::sleep(RETRY_AFTER), if dirty => {}
        }
        if dirty {
            let mut report = status.borrow_and_update().clone();
            report.heartbeat_at_ms = now_ms();
            match write_cas(&js, &stream, &subject, &mut revision, to_cbor(&report).into()).await {
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
                        warn!(cause = %text, "status not written; retrying");
                    } else {
                        debug!(cause = %text, "status still not written");
                    }
                    last_error = Some(text);
                }
            }
        }
    }
}

/// Publishes `value` on the status key expecting the revision last seen;
/// on a conflict (another writer, or a first write after a restart) reads
/// the current revision and tries again.
async fn write_cas(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream<()>,
    subject: &str,
    revision: &mut Option<u64>,
    value: bytes::Bytes,
) -> Result<(), WriteError> {
    for _ in 0..5 {
        let expected = match *revision {
            Some(rev) => rev,
            None => match stream.direct_get_last_for_subject(subject).await {
                Ok(message) => message.sequence,
                Err(err) if err.kind() == DirectGetErrorKind::NotFound => 0,
                Err(err) => return Err(err.into()),
            },
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, HeaderValue::from(expected));
        *revision = None;
        let ack = js.publish_with_headers(subject.to_owned(), headers, value.clone()).await?.await;
        match ack {
            Ok(ack) => {
                *revision = Some(ack.sequence);
                return Ok(());
            }
            Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => continue,
            Err(err) => return Err(err.into()),
        }
    }
    Err(WriteError::ConflictPersisted)
}
