//! Batched reads of KV keys' latest entries: `multi_last` direct gets (nats-server 2.11 and newer), up to 1,024 keys a request.
//!
//! The request goes to `$JS.API.DIRECT.GET.<stream>` with the body
//! `{"multi_last": [filters…]}` (filters may hold wildcards). The server
//! answers on the reply subject with the last message of every matching
//! subject, in ascending sequence order, each with the headers it was
//! stored with plus `Nats-Subject`, `Nats-Sequence`, `Nats-Time-Stamp`
//! and `Nats-Num-Pending`, then ends with an empty `204 EOB` message
//! (`Nats-Num-Pending`: how many it did not send, `Nats-Last-Sequence`,
//! `Nats-UpTo-Sequence`). Each answer is read under the store's read lock:
//! one point in time. What nats-server (`getDirectMulti` in stream.go,
//! `MultiLastMsgs` in filestore.go) does besides:
//!
//! - filters matching more than 1,024 subjects are refused as a whole
//!   (`413 Too Many Results`), whatever the `batch` asked: the caller splits
//!   the keys itself;
//! - an answer stops after the message that reaches `max_bytes` (default:
//!   the server's `max_pending`, 64 MiB, which is also where it drops a
//!   client as a slow consumer) with a non-zero `Nats-Num-Pending` in the
//!   EOB: the next page asks again with `seq` one past the last sequence
//!   received. Pages here are of [`PAGE_BYTES`];
//! - no match at all is `404 No Results`;
//! - a server older than 2.11 ignores `multi_last` and answers
//!   `408 Empty Request`; a principal allowed only the one-key form
//!   (`$JS.API.DIRECT.GET.<stream>.<subject>`) gets no answer at all.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{kv, message::StreamMessage};
use async_nats::StatusCode;
use futures_util::StreamExt;
use serde::Serialize;

use crate::error::NatsError;

/// The most subjects one request's filters may match (nats-server's
/// `maxAllowedResponses`); more are refused with `413 Too Many Results`.
pub(crate) const MAX_SUBJECTS: usize = 1024;
/// Bytes an answer holds before the server stops it (the last message
/// included) and the next page is asked for: well below the 64 MiB a
/// server lets pile up for a client before it drops it as a slow consumer,
/// with a few batches in flight.
pub(crate) const PAGE_BYTES: usize = 8 * 1024 * 1024;
/// How long each message of an answer may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a batched read gave no entries.
#[derive(Debug)]
pub(crate) enum MultiGetError {
    /// The server does not take the batched form (older than 2.11, or the
    /// principal may not publish to the body-form subject): read key by key.
    Unsupported(String),
    /// The filters match more than [`MAX_SUBJECTS`] subjects.
    TooMany,
    /// The read failed midway (the connection, a timeout, a malformed answer).
    Failed(NatsError),
}

impl std::fmt::Display for MultiGetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unsupported(why) => write!(f, "batched direct get not supported: {why}"),
            Self::TooMany => write!(f, "more than {MAX_SUBJECTS} subjects match"),
            Self::Failed(err) => write!(f, "batched direct get failed: {err}"),
        }
    }
}

/// The request's body.
#[derive(Serialize)]
struct Request<'a> {
    multi_last: &'a [String],
    max_bytes: usize,
    /// The lowest sequence to answer with (the next page).
    #[serde(skip_serializing_if = "is_zero")]
    seq: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The latest entry (delete and purge markers included) of every key of
/// `store` whose subject matches one of `filters`, by key. A key without
/// any message is absent.
///
/// Pages after the first are read without an upper sequence: a key written
/// meanwhile then shows its newer entry (kept over the older one) instead of
/// vanishing, which an upper bound would make it do in a bucket that keeps
/// one message per key.
pub(crate) async fn last_entries(
    nats: &async_nats::Client,
    store: &kv::Store,
    filters: &[String],
) -> Result<HashMap<String, kv::Entry>, MultiGetError> {
    let failed = |err: NatsError| MultiGetError::Failed(err);
    let subject = format!("$JS.API.DIRECT.GET.{}", store.stream_name);
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await.map_err(|e| failed(e.into()))?;
    let mut entries: HashMap<String, kv::Entry> = HashMap::new();
    let mut answered = false;
    let mut from = 0;
    let mut pages = 0;
    loop {
        let body = serde_json::to_vec(&Request { multi_last: filters, max_bytes: PAGE_BYTES, seq: from })
            .map_err(|e| failed(e.into()))?;
        nats.publish_with_reply(subject.clone(), inbox.clone(), body.into())
            .await
            .map_err(|e| failed(e.into()))?;
        let mut last = 0;
        let pending = loop {
            let message = match tokio::time::timeout(REPLY_TIMEOUT, replies.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => return Err(failed("the reply subscription closed".into())),
                Err(_) if !answered => {
                    return Err(MultiGetError::Unsupported(format!(
                        "no answer from {subject} in {REPLY_TIMEOUT:?} (no permission to publish there?)"
                    )))
                }
                Err(_) => return Err(failed(format!("{subject} stopped answering").into())),
            };
            answered = true;
            match message.status {
                None => {
                    let entry = entry_of(store, message).map_err(failed)?;
                    last = last.max(entry.revision);
                    match entries.get(&entry.key) {
                        Some(known) if known.revision >= entry.revision => {}
                        _ => {
                            entries.insert(entry.key.clone(), entry);
                        }
                    }
                }
                Some(status) => match status.as_u16() {
                    204 => break header_u64(&message, "Nats-Num-Pending"),
                    404 if message.description.as_deref() == Some("No Results") => break 0,
                    413 => return Err(MultiGetError::TooMany),
                    408 | 503 => return Err(MultiGetError::Unsupported(status_text(status, &message))),
                    _ => return Err(failed(status_text(status, &message).into())),
                },
            }
        };
        pages += 1;
        match next_page(from, last, pending, pages, entries.len()) {
            Ok(None) => return Ok(entries),
            Ok(Some(next)) => from = next,
            Err(why) => return Err(failed(why.into())),
        }
    }
}

/// Where the next page of an answer starts, `None` when there is none
/// (`pending` 0). The answer comes from the server, and is judged as data:
/// a page must move past the one before it (`last`, its highest sequence,
/// at least `from`), no more pages than [`MAX_PAGES`] and no more entries
/// than one request may match ([`MAX_SUBJECTS`]) are taken, and a sequence
/// at `u64::MAX` ends it; otherwise a server announcing pages forever, or
/// the same page again, would hold the caller in this loop.
fn next_page(
    from: u64,
    last: u64,
    pending: u64,
    pages: usize,
    entries: usize,
) -> Result<Option<u64>, String> {
    if entries > MAX_SUBJECTS {
        return Err(format!("answered with {entries} keys, more than one request may match"));
    }
    if pending == 0 {
        return Ok(None);
    }
    if last == 0 || last < from {
        return Err(format!("{pending} entries pending, and the page sent none past sequence {from}"));
    }
    if pages >= MAX_PAGES {
        return Err(format!("{pending} entries still pending after {pages} pages"));
    }
    last.checked_add(1).map(Some).ok_or_else(|| "the answer reached sequence u64::MAX".to_owned())
}

/// Most pages one read takes: a page holds at least one of at most
/// [`MAX_SUBJECTS`] keys' last entries (a key written meanwhile may come
/// again, once more).
const MAX_PAGES: usize = 2 * MAX_SUBJECTS;

/// A data message of an answer as the KV entry it is.
fn entry_of(store: &kv::Store, message: async_nats::Message) -> Result<kv::Entry, NatsError> {
    let message = StreamMessage::try_from(message)?;
    let key = message
        .subject
        .strip_prefix(store.prefix.as_str())
        .ok_or_else(|| format!("answered with subject {} outside the bucket", message.subject))?
        .to_owned();
    Ok(kv::Entry {
        bucket: store.name.clone(),
        key,
        operation: operation_of(&message.headers),
        value: message.payload,
        revision: message.sequence,
        delta: 0,
        created: message.time,
        seen_current: false,
    })
}

/// The KV operation a stored message's `headers` record, as
/// `kv::Store::entry` reads them: `KV-Operation`, else a limit marker's
/// reason, else a put.
fn operation_of(headers: &async_nats::HeaderMap) -> kv::Operation {
    if let Some(op) = headers.get("KV-Operation") {
        return op.as_str().parse().unwrap_or(kv::Operation::Put);
    }
    match headers.get("Nats-Marker-Reason").map(|r| r.as_str()) {
        Some("MaxAge" | "Purge") => kv::Operation::Purge,
        Some("Remove") => kv::Operation::Delete,
        _ => kv::Operation::Put,
    }
}

fn header_u64(message: &async_nats::Message, name: &str) -> u64 {
    message.headers.as_ref().and_then(|h| h.get(name)).and_then(|v| v.as_str().parse().ok()).unwrap_or(0)
}

fn status_text(status: StatusCode, message: &async_nats::Message) -> String {
    format!("{} {}", status.as_u16(), message.description.as_deref().unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_that_does_not_move_on_or_never_ends_is_refused() {
        assert_eq!(next_page(0, 0, 0, 1, 10), Ok(None));
        assert_eq!(next_page(0, 41, 3, 1, 10), Ok(Some(42)));
        assert_eq!(next_page(42, 90, 1, 2, 20), Ok(Some(91)));
        // The same page again, or one before it: refused, not looped on.
        assert!(next_page(42, 41, 3, 2, 10).is_err());
        assert!(next_page(42, 0, 3, 2, 10).is_err());
        // Pages forever, sequences at the end, more keys than asked for.
        assert!(next_page(42, 90, 1, MAX_PAGES, 10).is_err());
        assert!(next_page(42, u64::MAX, 1, 2, 10).is_err());
        assert!(next_page(0, 5, 0, 1, MAX_SUBJECTS + 1).is_err());
    }

    #[test]
    fn markers_are_read_as_kv_store_entry_reads_them() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut map = async_nats::HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, *value);
            }
            map
        };
        for (pairs, operation) in [
            (&[][..], kv::Operation::Put),
            (&[("KV-Operation", "PUT")][..], kv::Operation::Put),
            (&[("KV-Operation", "DEL")][..], kv::Operation::Delete),
            (&[("KV-Operation", "PURGE")][..], kv::Operation::Purge),
            (&[("KV-Operation", "bogus")][..], kv::Operation::Put),
            (&[("Nats-Marker-Reason", "MaxAge")][..], kv::Operation::Purge),
            (&[("Nats-Marker-Reason", "Purge")][..], kv::Operation::Purge),
            (&[("Nats-Marker-Reason", "Remove")][..], kv::Operation::Delete),
            (&[("KV-Operation", "DEL"), ("Nats-Marker-Reason", "MaxAge")][..], kv::Operation::Delete),
        ] {
            assert_eq!(operation_of(&headers(pairs)), operation, "{pairs:?}");
        }
    }

    #[test]
    fn the_request_names_the_filters_the_page_size_and_only_a_later_page_its_start() {
        let filters = vec!["$KV.b.>".to_owned()];
        let first =
            serde_json::to_value(Request { multi_last: &filters, max_bytes: PAGE_BYTES, seq: 0 }).unwrap();
        assert_eq!(first, serde_json::json!({ "multi_last": ["$KV.b.>"], "max_bytes": PAGE_BYTES }));
        let next =
            serde_json::to_value(Request { multi_last: &filters, max_bytes: PAGE_BYTES, seq: 42 }).unwrap();
        assert_eq!(next["seq"], 42);
    }
}
