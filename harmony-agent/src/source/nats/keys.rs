//! Following the device's desired-state keys: republished hints, direct gets that wait for the hinted sequence, and the source's own set of known deployments.
//!
//! A hint (`harmony.hint.<id>.<key>`, the bucket's headers-only republish)
//! says that a key changed and at which stream sequence (`Nats-Sequence`).
//! The direct get that follows must return that sequence or a newer one; an
//! older value (a replica behind its leader) is not the news, so the key is
//! read again shortly, never dropped. Deduplication is by the sequence
//! last passed on, so a hint is only ever skipped when its value was
//! already delivered.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use harmony_score_wire::names::{
    desired_state_key, index_key, parse_desired_state_key, DESIRED_STATE_BUCKET, HINT_PREFIX, KEYSET_KEY,
};
use harmony_score_wire::{
    from_cbor, peek_generation, DecodeLimits, DeploymentIndex, DeploymentName, DeviceId,
};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::inbox::{InboxSender, Input};
use crate::store::DocumentFormat;

/// Largest index value read.
const MAX_INDEX_BYTES: usize = 1024 * 1024;
/// How often a key behind its hint is read again before the value read is
/// taken as it is (about 20 s in all with the backoff below).
const MAX_LAG_ATTEMPTS: u32 = 16;
/// The longest wait between two reads of a key that is behind its hint.
const MAX_LAG_BACKOFF: Duration = Duration::from_secs(2);

/// What a key holds right now.
enum Latest {
    Value {
        revision: u64,
        value: bytes::Bytes,
    },
    /// Deleted or purged (a marker), or never written (revision 0).
    Gone {
        revision: u64,
    },
}

impl Latest {
    fn revision(&self) -> u64 {
        match self {
            Latest::Value { revision, .. } | Latest::Gone { revision } => *revision,
        }
    }
}

/// A key the device reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// Its index (`<id>._index`).
    Index,
    /// One deployment's (`<id>.<deployment>`).
    Deployment(DeploymentName),
    /// The fleet's key set (`_keyset`), read when the device has root keys.
    SigningKeys,
}

/// Hints taken together: for each key of the device named, the highest
/// sequence hinted (0: a hint without one).
#[derive(Debug, Default)]
pub(super) struct Hints(HashMap<Key, u64>);

impl Hints {
    /// How many keys the hints name.
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

/// A key read older than its hint: read again at `next`.
struct Lagging {
    min_revision: u64,
    attempt: u32,
    next: Instant,
}

/// Reads the device's keys and turns changes into [`Input`]s.
pub(super) struct Follower {
    device: DeviceId,
    stream: jetstream::stream::Stream<()>,
    inbox: InboxSender,
    /// Deployments whose keys this source reads at every full sync: those
    /// the device held state for at start, those the index lists, and
    /// those a hint named (a name whose key does not exist at all is
    /// dropped once read, so this does not grow with hints for made-up names).
    known: BTreeSet<DeploymentName>,
    /// Per deployment: the revision last passed on, and its generation.
    passed: HashMap<DeploymentName, (u64, Option<u64>)>,
    lagging: HashMap<Key, Lagging>,
    /// Deployments the index lists as deleted (its tombstones).
    tombstoned: std::collections::HashSet<DeploymentName>,
    /// Whether the key set is read (the device has root keys to check it).
    follow_keyset: bool,
    /// The revision of the key set last passed on.
    keyset_passed: u64,
    /// How many deployment changes were passed on, ever (a resync that
    /// finds some found what no hint announced).
    changes_passed: u64,
}

/// Why every key is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FullSync {
    /// (Re)connected: changes made while away are expected.
    Connected,
    /// The resync timer: with hints followed, a change found here is one
    /// whose hint never arrived.
    Resync,
}

impl Follower {
    pub(super) async fn new(
        js: &jetstream::Context,
        device: DeviceId,
        inbox: InboxSender,
        known: Vec<DeploymentName>,
        follow_keyset: bool,
    ) -> Result<Self, jetstream::context::GetStreamError> {
        // No STREAM.INFO request: it would list every key of the bucket,
        // and a device's credentials do not allow it.
        let stream = js.get_stream_no_info(format!("KV_{DESIRED_STATE_BUCKET}")).await?;
        Ok(Self {
            device,
            stream,
            inbox,
            known: known.into_iter().collect(),
            passed: HashMap::new(),
            lagging: HashMap::new(),
            tombstoned: std::collections::HashSet::new(),
            follow_keyset,
            keyset_passed: 0,
            changes_passed: 0,
        })
    }

    /// Adds a hint to `hints` (one entry per key of this device, its highest
    /// sequence); a hint for another device or of another shape is dropped.
    /// The message is not kept: a queued message can hold on to the read
    /// buffer of a whole document that arrived beside it.
    pub(super) fn add_hint(&self, hints: &mut Hints, message: &async_nats::Message) {
        let Some(key) = message.subject.strip_prefix(HINT_PREFIX).and_then(|s| s.strip_prefix('.')) else {
            return;
        };
        let source = format!("$KV.{DESIRED_STATE_BUCKET}.{key}");
        let key = if key == KEYSET_KEY && self.follow_keyset {
            Key::SigningKeys
        } else {
            let Some((device, deployment)) = parse_desired_state_key(key) else {
                debug!(subject = %harmony_score_wire::log_text(&message.subject), "ignored a hint for a key of another shape");
                return;
            };
            if device != self.device {
                return;
            }
            match deployment {
                Some(name) => Key::Deployment(name),
                // The index changes beside a deployment's key (the
                // operator writes or deletes the key, then the index), and
                // that key's own hint carries the change: reading the index
                // here too was one direct get per deploy for nothing. The
                // index is for discovery when no hint can be had: at start,
                // after a reconnect, on resync.
                None => return,
            }
        };
        // Only the bucket's own republished copy of this key counts: any
        // device can have the server deliver other messages here.
        let Some(sequence) = super::republished_sequence(message, &source) else {
            debug!(subject = %harmony_score_wire::log_text(&message.subject), "ignored a message on a hint subject that is no republished write");
            return;
        };
        let hinted = hints.0.entry(key).or_insert(sequence);
        *hinted = (*hinted).max(sequence);
    }

    /// Hints arrived: read each key they name once, at least at the highest
    /// sequence hinted, unless a value at least that new was already passed
    /// on (a burst of writes to one key is then one direct get, not one per
    /// write, however far behind the hints are). The key set goes first
    /// (documents signed by a new key need it).
    pub(super) async fn on_hints(&mut self, hints: Hints) {
        let mut hinted: Vec<(Key, u64)> = hints.0.into_iter().collect();
        // (Index hints are never added: see `add_hint`.)
        hinted.sort_by_key(|(key, _)| !matches!(key, Key::SigningKeys));
        for (key, min_revision) in hinted {
            if let Key::Deployment(name) = &key {
                if min_revision > 0 && self.passed.get(name).is_some_and(|(r, _)| *r >= min_revision) {
                    continue;
                }
                self.known.insert(name.clone());
            }
            self.sync(key, min_revision, 0).await;
        }
    }

    /// Reads the key set (first: documents signed by a new key need it),
    /// the index and every known deployment's key (at start, after a
    /// reconnect, on resync). Returns how many deployments changed that no
    /// hint had announced (keys already waiting on a hint not counted).
    pub(super) async fn full_sync(&mut self, why: FullSync) -> u64 {
        let before = self.changes_passed;
        let awaited = self.lagging.keys().filter(|k| matches!(k, Key::Deployment(_))).count() as u64;
        if self.follow_keyset {
            // Passed on again at every full sync: a key set refused for a
            // reason that passes (a failed save, a clock running ahead) is
            // judged again; one already held is recognised and costs nothing.
            self.keyset_passed = 0;
            self.sync(Key::SigningKeys, 0, 0).await;
        }
        self.sync(Key::Index, 0, 0).await;
        let names: Vec<_> = self.known.iter().cloned().collect();
        for name in names {
            self.sync(Key::Deployment(name), 0, 0).await;
        }
        let found = (self.changes_passed - before).saturating_sub(awaited);
        if why == FullSync::Resync && found > 0 {
            debug!(changes = found, "the resync found changes");
        }
        found
    }

    /// When the next lagging key is due to be read again.
    pub(super) fn next_lag_check(&self) -> Option<Instant> {
        self.lagging.values().map(|l| l.next).min()
    }

    /// Reads again the keys that were behind their hints and are due.
    pub(super) async fn check_lagging(&mut self) {
        let now = Instant::now();
        let due: Vec<_> =
            self.lagging.iter().filter(|(_, l)| l.next <= now).map(|(k, _)| k.clone()).collect();
        for key in due {
            if let Some(lag) = self.lagging.remove(&key) {
                self.sync(key, lag.min_revision, lag.attempt + 1).await;
            }
        }
    }

    /// Reads `key` (at least at `min_revision`) and passes it on; for the
    /// index, then reads the deployments it points at.
    async fn sync(&mut self, key: Key, min_revision: u64, attempt: u32) {
        for name in self.sync_one(key, min_revision, attempt).await {
            self.sync_one(Key::Deployment(name), 0, 0).await;
        }
    }

    /// Reads one key; returns the deployments an index read says to read next.
    async fn sync_one(&mut self, key: Key, min_revision: u64, attempt: u32) -> Vec<DeploymentName> {
        let subject_key = match &key {
            Key::Deployment(name) => desired_state_key(&self.device, name),
            Key::Index => index_key(&self.device),
            Key::SigningKeys => KEYSET_KEY.to_owned(),
        };
        let latest = match self.read(&subject_key).await {
            Ok(latest) => latest,
            Err(err) => {
                warn!(key = %subject_key, cause = %harmony_score_wire::log_text(&err), "cannot read key; trying again shortly");
                self.lag(key, min_revision, attempt);
                return Vec::new();
            }
        };
        // A key whose messages were removed (purged by subject, bucket
        // recreated) never reaches the hinted sequence: after a while the
        // value read is taken as it is, rather than read again forever.
        if latest.revision() < min_revision && attempt < MAX_LAG_ATTEMPTS {
            debug!(key = %subject_key, read = latest.revision(), hinted = min_revision, "read is behind its hint; reading again");
            self.lag(key, min_revision, attempt);
            return Vec::new();
        }
        if latest.revision() < min_revision {
            warn!(key = %subject_key, read = latest.revision(), hinted = min_revision, "key never reached its hinted sequence; taking what it holds");
        }
        match key {
            Key::Deployment(name) => {
                self.pass_on(name, latest);
                Vec::new()
            }
            Key::Index => self.on_index(latest),
            Key::SigningKeys => {
                self.on_keyset(latest);
                Vec::new()
            }
        }
    }

    /// Passes a new key set on; a deleted one changes nothing (the device
    /// keeps the key set it holds: only a newer root-signed one replaces it).
    fn on_keyset(&mut self, latest: Latest) {
        if let Latest::Value { revision, value } = latest {
            if revision != self.keyset_passed {
                self.keyset_passed = revision;
                self.inbox.keyset(value.to_vec());
            }
        }
    }

    fn lag(&mut self, key: Key, min_revision: u64, attempt: u32) {
        let delay = Duration::from_millis(5u64 << attempt.min(10)).min(MAX_LAG_BACKOFF);
        let entry = self.lagging.entry(key).or_insert(Lagging {
            min_revision,
            attempt,
            next: Instant::now() + delay,
        });
        entry.min_revision = entry.min_revision.max(min_revision);
    }

    fn pass_on(&mut self, name: DeploymentName, latest: Latest) {
        let revision = latest.revision();
        if self.passed.get(&name).is_some_and(|(r, _)| *r == revision) {
            return;
        }
        let input = match latest {
            Latest::Value { value, .. } => {
                let generation = peek_generation(&value, &DecodeLimits::default());
                self.known.insert(name.clone());
                self.passed.insert(name.clone(), (revision, generation));
                Input::Document { deployment: name, bytes: value.to_vec(), format: DocumentFormat::Cbor }
            }
            // No message at all, but the operator's index says it was
            // deleted: its delete marker was cleaned up while the device
            // was away. That is a delete.
            Latest::Gone { revision: 0 } if self.tombstoned.contains(&name) => {
                self.known.remove(&name);
                self.passed.insert(name.clone(), (0, None));
                Input::Deleted { deployment: name }
            }
            Latest::Gone { revision: 0 } => {
                // The key does not exist at all: no value and no delete
                // marker. Deletes and purges leave a marker, so this is a
                // name nobody wrote, or a bucket that lost its messages
                // (recreated after a server lost its store). Neither is an
                // instruction to undo anything: a lost bucket must not
                // prune a fleet. Stop following the name (a flood of such
                // hints cannot grow the set every resync reads); a real
                // write hints again, the index lists again.
                if self.known.remove(&name) {
                    warn!(deployment = %name, "its key does not exist (no value, no delete marker); keeping what the device runs");
                }
                self.passed.remove(&name);
                return;
            }
            Latest::Gone { .. } => {
                self.passed.insert(name.clone(), (revision, None));
                Input::Deleted { deployment: name }
            }
        };
        // Never blocks: the inbox keeps the newest input per deployment.
        self.changes_passed += 1;
        self.inbox.send(input);
    }

    /// The index changed: learn its deployments, and read those whose listed
    /// generation is newer than what was passed on, or that it lists as deleted.
    fn on_index(&mut self, latest: Latest) -> Vec<DeploymentName> {
        let index = match latest {
            Latest::Value { value, .. } => {
                match from_cbor::<DeploymentIndex>(&value, MAX_INDEX_BYTES, "deployment index") {
                    Ok(index) => index,
                    Err(err) => {
                        warn!(cause = %harmony_score_wire::log_text(&err), "index unreadable; following known deployments only");
                        return Vec::new();
                    }
                }
            }
            Latest::Gone { .. } => return Vec::new(),
        };
        let mut to_read = Vec::new();
        for (name, generation) in &index.deployments {
            self.known.insert(name.clone());
            let passed = self.passed.get(name).and_then(|(_, g)| *g);
            if passed.is_none_or(|p| p < *generation) {
                to_read.push(name.clone());
            }
        }
        self.tombstoned = index.deleted.keys().cloned().collect();
        for name in index.deleted.keys() {
            if self.known.contains(name) && self.passed.get(name).is_none_or(|(_, g)| g.is_some()) {
                to_read.push(name.clone());
            }
        }
        to_read
    }

    async fn read(&self, key: &str) -> Result<Latest, stream::DirectGetError> {
        match self.stream.direct_get_last_for_subject(format!("$KV.{DESIRED_STATE_BUCKET}.{key}")).await {
            Ok(message) => {
                let operation = message
                    .headers
                    .get("KV-Operation")
                    .and_then(|v| v.as_str().parse::<kv::Operation>().ok())
                    .unwrap_or(kv::Operation::Put);
                Ok(match operation {
                    kv::Operation::Put => {
                        Latest::Value { revision: message.sequence, value: message.payload }
                    }
                    kv::Operation::Delete | kv::Operation::Purge => {
                        Latest::Gone { revision: message.sequence }
                    }
                })
            }
            Err(err) if err.kind() == stream::DirectGetErrorKind::NotFound => {
                Ok(Latest::Gone { revision: 0 })
            }
            Err(err) => Err(err),
        }
    }
}
