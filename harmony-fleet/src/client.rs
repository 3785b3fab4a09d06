//! `FleetClient`: the operator's connection to a fleet — buckets, status reads and device commands.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::jetstream::{self, context::GetStreamErrorKind, kv, stream};
use async_nats::ConnectOptions;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use harmony_score_wire::names::{
    command_subject, heartbeat_key, hint_republish_destination, hint_republish_source, parse_heartbeat_key,
    redact_userinfo, status_hint_republish_destination, status_hint_republish_source, status_key,
    AGENT_STATUS_BUCKET, ARTIFACTS_BUCKET, DESIRED_STATE_BUCKET,
};
use harmony_score_wire::{
    bounded_text, from_cbor, to_cbor, AgentStatus, CommandReply, DeviceId, DeviceInfo, LogsErrorKind,
    LogsReply, LogsRequest, LOGS_VERB, MAX_LOGS_REPLY_BYTES,
};
use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::error::NatsError;
use crate::multi_get::{last_entries, MultiGetError, MAX_SUBJECTS};
use crate::FleetError;

/// Largest status, index or reply value decoded (NATS' default max payload).
pub(crate) const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// How many versions of each desired-state key the bucket keeps.
pub const DESIRED_STATE_HISTORY: i64 = 5;
/// Batched reads (of up to [`MAX_SUBJECTS`] keys each) in flight at once.
const BATCHES_IN_FLIGHT: usize = 4;
/// One-key reads in flight at once, where batched reads are not taken.
const READS_IN_FLIGHT: usize = 16;

/// The desired-state bucket's server-side republish: every write (by any
/// tool), headers only, to `harmony.hint.<device>.<deployment>`. Devices
/// follow these copies: they carry `Nats-Sequence` and no reply subject, so
/// a device never sees an operator's ack inbox, and they are sent after the
/// write is stored.
pub(crate) fn hint_republish() -> stream::Republish {
    stream::Republish {
        source: hint_republish_source(),
        destination: hint_republish_destination(),
        headers_only: true,
    }
}

/// The status bucket's republish: every status write, headers only, to
/// `harmony.status-hint.<device>`. Each agent follows its own: a write by
/// anyone else (a twin with the same device id, a stray tool) is noticed
/// at once, judged, and the agent's own status written again.
pub(crate) fn status_hint_republish() -> stream::Republish {
    stream::Republish {
        source: status_hint_republish_source(),
        destination: status_hint_republish_destination(),
        headers_only: true,
    }
}

/// The two KV buckets of a fleet, opened.
#[derive(Debug, Clone)]
pub(crate) struct Buckets {
    pub(crate) desired: kv::Store,
    pub(crate) status: kv::Store,
}

/// What [`FleetClient::ensure_buckets`] found or did for one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketAction {
    /// The bucket did not exist and was created.
    Created,
    /// The bucket existed as it should.
    Existed,
    /// The bucket existed without a safeguard and its stream was fixed: the
    /// desired-state bucket without its hint republish (or direct get), the
    /// status bucket with rollups allowed (a device could purge every
    /// device's status) or without direct get.
    Repaired,
    /// The bucket existed with another number of replicas than the client
    /// asks for ([`FleetClient::with_replicas`]) and its stream was changed
    /// to that number (the server copies the data to the new replicas).
    Rescaled {
        /// Replicas it had.
        from: usize,
        /// Replicas it has now.
        to: usize,
    },
}

/// One bucket's line in the report of [`FleetClient::ensure_buckets`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketReport {
    /// The bucket's name.
    pub bucket: &'static str,
    /// What was done.
    pub action: BucketAction,
}

/// A connection to a fleet's NATS: writes desired state, reads status and
/// sends commands to devices. Cheap to clone; clones share the connection and
/// the opened buckets.
#[derive(Clone)]
pub struct FleetClient {
    pub(crate) nats: async_nats::Client,
    pub(crate) js: jetstream::Context,
    buckets: Arc<OnceCell<Buckets>>,
    /// The rollouts bucket, once opened (`rollout::store`).
    pub(crate) rollouts: Arc<OnceCell<kv::Store>>,
    /// Signs every document this client writes, when set.
    pub(crate) signer: Option<Arc<harmony_score_wire::DocumentSigner>>,
    /// Keys whose signed values count when a signing client numbers
    /// generations, besides the signer's own ([`FleetClient::with_trusted_keys`]).
    pub(crate) trusted: Option<Arc<harmony_score_wire::TrustedKeys>>,
    /// Replicas of the buckets this client creates, and rescales existing
    /// ones to; `None`: creates with one, leaves existing ones as they are.
    pub(crate) replicas: Option<usize>,
    /// Whether many keys are read with batched direct gets (cleared, for
    /// this client and its clones, when the server refuses one).
    batched_reads: Arc<AtomicBool>,
}

impl std::fmt::Debug for FleetClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetClient")
            .field("state", &self.nats.connection_state())
            .field("buckets_open", &self.buckets.initialized())
            .finish()
    }
}

impl FleetClient {
    /// Connects to any of `urls` (tried in random order), with a NATS
    /// credentials file when given. Fails fast when no server answers.
    pub async fn connect(urls: &[String], creds: Option<&Path>) -> Result<Self, FleetError> {
        Self::connect_with_inbox_prefix(urls, creds, None).await
    }

    /// [`connect`](Self::connect), with replies to this client's requests
    /// under `inbox_prefix` instead of `_INBOX` (a principal confined to its
    /// own inbox: `_INBOX_monitor`, `_INBOX.commander`; see `nats_config`).
    pub async fn connect_with_inbox_prefix(
        urls: &[String],
        creds: Option<&Path>,
        inbox_prefix: Option<&str>,
    ) -> Result<Self, FleetError> {
        let options = match creds {
            Some(path) => ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|source| FleetError::CredentialsFailed { path: path.to_owned(), source })?,
            None => ConnectOptions::new(),
        };
        let connect_failed = |source: NatsError| FleetError::ConnectFailed {
            urls: urls.iter().map(|u| redact_userinfo(u)).collect::<Vec<_>>().join(","),
            source,
        };
        if urls.is_empty() {
            return Err(connect_failed("no NATS URL given".into()));
        }
        let options = match inbox_prefix {
            Some(prefix) if !valid_inbox_prefix(prefix) => {
                return Err(connect_failed(
                    format!("inbox prefix {:?} is not a subject prefix", bounded_text(prefix, 64)).into(),
                ))
            }
            Some(prefix) => options.custom_inbox_prefix(prefix),
            None => options,
        };
        // Credentials leave the URLs and go through the auth options: a
        // URL with a password reaches async-nats' logs, and 0.51 does not
        // even send it.
        let mut url_auth = None;
        let bare: Vec<String> = urls
            .iter()
            .map(|url| {
                let (bare, auth) = harmony_score_wire::names::split_url_credentials(url);
                url_auth = url_auth.take().or(auth);
                bare
            })
            .collect();
        let options = match url_auth {
            Some((user, password)) => options.user_and_password(user, password),
            None => options,
        };
        let nats = options
            .name("harmony-fleet")
            .connection_timeout(Duration::from_secs(5))
            .connect(bare)
            .await
            .map_err(|e| connect_failed(e.into()))?;
        Ok(Self::from_nats(nats))
    }

    /// A fleet client over an existing connection.
    pub fn from_nats(nats: async_nats::Client) -> Self {
        let js = jetstream::ContextBuilder::new().timeout(Duration::from_secs(5)).build(nats.clone());
        Self {
            nats,
            js,
            buckets: Arc::new(OnceCell::new()),
            rollouts: Arc::new(OnceCell::new()),
            signer: None,
            trusted: None,
            replicas: None,
            batched_reads: Arc::new(AtomicBool::new(true)),
        }
    }

    /// This client reading many keys at once (statuses, the keys a
    /// [`deploy_many`](Self::deploy_many) reads) with batched direct gets
    /// (`multi_last`, nats-server 2.11 or newer), or, with `false`, with
    /// one direct get per key. On by default; a client whose server refuses
    /// a batched read says so in a warning and reads key by key from then
    /// on. Turn it off for a principal allowed only the one-key form
    /// `$JS.API.DIRECT.GET.<stream>.<subject>` (a monitor generated before
    /// it was also allowed `$JS.API.DIRECT.GET.<stream>`): its batched
    /// request is dropped and the first read waits 5 s before falling back.
    #[must_use]
    pub fn with_batched_reads(mut self, batched: bool) -> Self {
        self.batched_reads = Arc::new(AtomicBool::new(batched));
        self
    }

    /// Whether batched reads are (still) tried.
    fn batched(&self) -> bool {
        self.batched_reads.load(Ordering::Relaxed)
    }

    /// Stops trying batched reads on this client and its clones.
    fn refuse_batched(&self, why: &str) {
        if self.batched_reads.swap(false, Ordering::Relaxed) {
            warn!(
                cause = %harmony_score_wire::log_text(why),
                "the server does not take batched direct gets (nats-server older than 2.11, or no \
                 permission for the body form); reading keys one by one"
            );
        }
    }

    /// The latest entry of each of `keys` of `store` (delete and purge
    /// markers included; `None`: the key has no message), in the order
    /// given: batched reads of up to [`MAX_SUBJECTS`] keys, a few at once,
    /// else one direct get per key. A batch that fails midway is read
    /// again key by key.
    pub(crate) async fn latest_entries(
        &self,
        store: &kv::Store,
        keys: Vec<String>,
    ) -> Vec<(String, Result<Option<kv::Entry>, FleetError>)> {
        let chunks: Vec<Vec<String>> = keys.chunks(MAX_SUBJECTS).map(<[String]>::to_vec).collect();
        futures_util::stream::iter(chunks)
            .map(|chunk| self.latest_chunk(store, chunk))
            .buffered(BATCHES_IN_FLIGHT)
            .flat_map(futures_util::stream::iter)
            .collect()
            .await
    }

    async fn latest_chunk(
        &self,
        store: &kv::Store,
        keys: Vec<String>,
    ) -> Vec<(String, Result<Option<kv::Entry>, FleetError>)> {
        if self.batched() {
            let subjects: Vec<String> = keys.iter().map(|key| format!("{}{key}", store.prefix)).collect();
            match last_entries(&self.nats, store, &subjects).await {
                Ok(found) => {
                    return keys
                        .into_iter()
                        .map(|key| {
                            let entry = found.get(&key).cloned();
                            (key, Ok(entry))
                        })
                        .collect()
                }
                Err(MultiGetError::Unsupported(why)) => self.refuse_batched(&why),
                Err(err) => warn!(
                    cause = %harmony_score_wire::log_text(&err),
                    keys = keys.len(),
                    "a batched read failed; reading its keys one by one"
                ),
            }
        }
        futures_util::stream::iter(keys)
            .map(|key| async move {
                let entry =
                    store.entry(key.as_str()).await.map_err(|e| FleetError::nats(format!("read {key}"), e));
                (key, entry)
            })
            .buffered(READS_IN_FLIGHT)
            .collect()
            .await
    }

    /// This client with every document it writes signed by `signer`
    /// (devices that trust its public key accept them).
    #[must_use]
    pub fn with_signer(mut self, signer: harmony_score_wire::DocumentSigner) -> Self {
        self.signer = Some(Arc::new(signer));
        self
    }

    /// This client, when it signs, numbering generations also from values
    /// signed by `keys` (other operator keys sharing the fleet, an older key
    /// during a rotation), not only from those signed by its own key.
    ///
    /// A signing client counts only values whose signature verifies (against
    /// its own key, or `keys` with their threshold): a writer of the bucket
    /// without a signing key cannot make it sign a huge generation. Without
    /// a signer these keys are not used.
    #[must_use]
    pub fn with_trusted_keys(mut self, keys: harmony_score_wire::TrustedKeys) -> Self {
        self.trusted = Some(Arc::new(keys));
        self
    }

    /// This client creating the fleet's buckets with `replicas` copies of
    /// their streams (3 in a three-node cluster: a bucket then survives one
    /// node lost; the server takes 1 to 5, and at most the cluster's size),
    /// and changing an existing bucket with another number to it
    /// ([`BucketAction::Rescaled`]). Everything else in the buckets'
    /// configuration stays as [`ensure_buckets`](Self::ensure_buckets)
    /// describes it.
    ///
    /// Without it buckets are created with one replica and existing ones
    /// keep theirs: an operator tool of a single-server fleet never scales
    /// down a cluster's buckets.
    #[must_use]
    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// Replicas of a bucket created now.
    pub(crate) fn new_bucket_replicas(&self) -> usize {
        self.replicas.unwrap_or(1)
    }

    /// The replicas an existing stream with `config` must be changed to,
    /// if any (only when this client asks for a number, and it differs).
    pub(crate) fn rescale_to(&self, config: &stream::Config) -> Option<usize> {
        // The server reports 0 for a stream created without a number: one.
        self.replicas.filter(|wanted| *wanted != config.num_replicas.max(1))
    }

    /// The underlying NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// The JetStream context this client uses.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Creates the desired-state and status buckets where missing (idempotent),
    /// repairs existing ones that lack a safeguard, and says, per bucket, what
    /// it found or did.
    ///
    /// The desired-state bucket republishes every write, headers only, to
    /// `harmony.hint.<device>.<deployment>` ([`hint_republish_source`] →
    /// [`hint_republish_destination`]): the hints devices follow.
    ///
    /// The status bucket is a stream made by hand with the KV conventions and
    /// `allow_rollup: false`: `kv::Config` has no such switch, and with
    /// rollups allowed one device publishing `Nats-Rollup: all` on its own
    /// status key would purge every device's status.
    ///
    /// The artifacts bucket (an Object Store, `harmony-artifacts`) is
    /// created here too, with direct gets (devices read it with nothing
    /// else); other calls open it only when they use it.
    pub async fn ensure_buckets(&self) -> Result<Vec<BucketReport>, FleetError> {
        let (mut report, buckets) = self.setup_buckets().await?;
        let artifacts = self.ensure_artifacts_bucket().await?;
        report.push(BucketReport { bucket: ARTIFACTS_BUCKET, action: artifacts });
        let rollouts = self.ensure_rollouts_bucket().await?;
        report.push(BucketReport { bucket: harmony_score_wire::names::ROLLOUTS_BUCKET, action: rollouts });
        // Another task may have opened them meanwhile; both handles are equal.
        let _ = self.buckets.set(buckets);
        Ok(report)
    }

    /// The buckets, ensured on first use.
    pub(crate) async fn buckets(&self) -> Result<&Buckets, FleetError> {
        self.buckets.get_or_try_init(|| async { Ok(self.setup_buckets().await?.1) }).await
    }

    async fn setup_buckets(&self) -> Result<(Vec<BucketReport>, Buckets), FleetError> {
        let desired_action = self.ensure_desired_bucket().await?;
        let status_action = self.ensure_status_bucket().await?;
        let (desired, status) =
            (self.open_bucket(DESIRED_STATE_BUCKET).await?, self.open_bucket(AGENT_STATUS_BUCKET).await?);
        let report = vec![
            BucketReport { bucket: DESIRED_STATE_BUCKET, action: desired_action },
            BucketReport { bucket: AGENT_STATUS_BUCKET, action: status_action },
        ];
        Ok((report, Buckets { desired, status }))
    }

    async fn open_bucket(&self, name: &str) -> Result<kv::Store, FleetError> {
        self.js.get_key_value(name).await.map_err(|e| FleetError::nats(format!("open bucket {name}"), e))
    }

    pub(crate) async fn stream_exists(&self, name: &str) -> Result<Option<stream::Stream>, FleetError> {
        match self.js.get_stream(name).await {
            Ok(stream) => Ok(Some(stream)),
            Err(err) => match err.kind() {
                GetStreamErrorKind::JetStream(js_err)
                    if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(None)
                }
                _ => Err(FleetError::nats(format!("look up stream {name}"), err)),
            },
        }
    }

    async fn ensure_desired_bucket(&self) -> Result<BucketAction, FleetError> {
        let name = DESIRED_STATE_BUCKET;
        let action = match self.stream_exists(&format!("KV_{name}")).await? {
            Some(existing) => {
                let config = &existing.cached_info().config;
                if config.republish.as_ref() != Some(&hint_republish()) || !config.allow_direct {
                    let fixed = stream::Config {
                        republish: Some(hint_republish()),
                        allow_direct: true,
                        num_replicas: self.rescale_to(config).unwrap_or(config.num_replicas),
                        ..config.clone()
                    };
                    self.js
                        .update_stream(fixed)
                        .await
                        .map_err(|e| FleetError::nats(format!("add hint republish to bucket {name}"), e))?;
                    warn!(
                        bucket = name,
                        "desired-state bucket lacked the hint republish or direct get; fixed"
                    );
                    BucketAction::Repaired
                } else {
                    self.rescale(name, config).await?
                }
            }
            None => {
                self.js
                    .create_key_value(kv::Config {
                        bucket: name.to_owned(),
                        description: "Harmony desired state: <device>.<deployment> -> DesiredState (CBOR)"
                            .into(),
                        history: DESIRED_STATE_HISTORY,
                        storage: stream::StorageType::File,
                        republish: Some(hint_republish()),
                        num_replicas: self.new_bucket_replicas(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| FleetError::nats(format!("create bucket {name}"), e))?;
                info!(bucket = name, "created bucket");
                BucketAction::Created
            }
        };
        Ok(action)
    }

    async fn ensure_status_bucket(&self) -> Result<BucketAction, FleetError> {
        let name = AGENT_STATUS_BUCKET;
        let action = match self.stream_exists(&format!("KV_{name}")).await? {
            Some(existing) => {
                let config = &existing.cached_info().config;
                if config.allow_rollup || !config.allow_direct || config.republish.is_none() {
                    let fixed = stream::Config {
                        allow_rollup: false,
                        allow_direct: true,
                        republish: Some(status_hint_republish()),
                        num_replicas: self.rescale_to(config).unwrap_or(config.num_replicas),
                        ..config.clone()
                    };
                    self.js
                        .update_stream(fixed)
                        .await
                        .map_err(|e| FleetError::nats(format!("disable rollups on bucket {name}"), e))?;
                    warn!(
                        bucket = name,
                        "status bucket allowed rollups or lacked direct get or its republish; fixed"
                    );
                    BucketAction::Repaired
                } else {
                    self.rescale(name, config).await?
                }
            }
            None => {
                self.js
                    .create_stream(status_stream_config(self.new_bucket_replicas()))
                    .await
                    .map_err(|e| FleetError::nats(format!("create bucket {name}"), e))?;
                info!(bucket = name, "created bucket");
                BucketAction::Created
            }
        };
        Ok(action)
    }

    /// Changes an existing bucket's stream (`config`) to the replicas this
    /// client asks for, if it asks and they differ; nothing else changes.
    pub(crate) async fn rescale(
        &self,
        name: &str,
        config: &stream::Config,
    ) -> Result<BucketAction, FleetError> {
        let Some(to) = self.rescale_to(config) else {
            return Ok(BucketAction::Existed);
        };
        let from = config.num_replicas.max(1);
        self.js
            .update_stream(stream::Config { num_replicas: to, ..config.clone() })
            .await
            .map_err(|e| FleetError::nats(format!("change bucket {name} from {from} to {to} replicas"), e))?;
        info!(bucket = name, from, to, "changed the bucket's replicas");
        Ok(BucketAction::Rescaled { from, to })
    }

    /// The device's last status and its revision in the bucket; `None` when
    /// the device never reported (or its status was deleted).
    pub async fn device_status(&self, device: &DeviceId) -> Result<Option<(AgentStatus, u64)>, FleetError> {
        let buckets = self.buckets().await?;
        let key = status_key(device);
        let (status, beat) =
            tokio::join!(read_status(&buckets.status, &key), read_heartbeat(&buckets.status, device));
        Ok(status?.map(|(mut status, revision)| {
            status.heartbeat_at_ms = status.heartbeat_at_ms.max(beat);
            (status, revision)
        }))
    }

    /// The last status of every device that reported, sorted by device id,
    /// each with its last heartbeat merged in (from the key
    /// `<id>.heartbeat`). A status that cannot be read or decoded, and a key
    /// that is neither a device id nor a heartbeat key, are skipped with a
    /// warning.
    ///
    /// Read with batched direct gets (see
    /// [`with_batched_reads`](Self::with_batched_reads)): one request for
    /// the whole bucket when it holds at most 1,024 keys; else the keys are
    /// listed from the stream's info (its subjects) and read 1,024 at a
    /// time. No consumer: none per listing against the stream's budget, and
    /// a read-only principal (the generated `monitor`) may list too.
    pub async fn list_statuses(&self) -> Result<Vec<AgentStatus>, FleetError> {
        let store = &self.buckets().await?.status;
        Ok(statuses_of(self.every_latest(store, ">", "status keys").await?))
    }

    /// The latest entry (delete and purge markers included) of every key of
    /// `store` whose subject matches `<prefix><filter>` (`>`: every key;
    /// `*`: keys of one token), sorted by key. One batched direct get when
    /// at most 1,024 keys match; else the keys are listed from the stream's
    /// info (its subjects) and read 1,024 at a time, or one by one where
    /// batched reads are refused. No consumer: none per listing against the
    /// stream's budget, and a read-only principal may list. `what` names the
    /// keys in an error.
    pub(crate) async fn every_latest(
        &self,
        store: &kv::Store,
        filter: &str,
        what: &str,
    ) -> Result<Vec<(String, Result<Option<kv::Entry>, FleetError>)>, FleetError> {
        if self.batched() {
            match last_entries(&self.nats, store, &[format!("{}{filter}", store.prefix)]).await {
                Ok(found) => {
                    let mut found: Vec<_> = found.into_iter().map(|(key, e)| (key, Ok(Some(e)))).collect();
                    found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                    return Ok(found);
                }
                // More keys than one request may match: listed, then read in batches.
                Err(MultiGetError::TooMany) => {}
                Err(MultiGetError::Unsupported(why)) => self.refuse_batched(&why),
                Err(err) => warn!(
                    cause = %harmony_score_wire::log_text(&err),
                    "a batched read of {what} failed; listing the keys"
                ),
            }
        }
        let subject_prefix = store.prefix.as_str();
        let mut keys: Vec<String> = store
            .stream
            .info_with_subjects(format!("{subject_prefix}{filter}"))
            .await
            .map_err(|e| FleetError::nats(format!("list {what}"), e))?
            .try_filter_map(|(subject, _)| {
                std::future::ready(Ok(subject.strip_prefix(subject_prefix).map(str::to_owned)))
            })
            .try_collect()
            .await
            .map_err(|e| FleetError::nats(format!("list {what}"), e))?;
        keys.sort_unstable();
        Ok(self.latest_entries(store, keys).await)
    }

    /// What the device last reported about itself (agent version, supported Scores, labels).
    pub async fn device_info(&self, device: &DeviceId) -> Result<Option<DeviceInfo>, FleetError> {
        Ok(self.device_status(device).await?.and_then(|(status, _)| status.info))
    }

    /// Asks the device's agent to answer; [`FleetError::DeviceOffline`] when no agent listens.
    pub async fn ping(&self, device: &DeviceId, timeout: Duration) -> Result<CommandReply, FleetError> {
        self.command(device, "ping", timeout).await
    }

    /// Asks the device's agent to reconcile now rather than at its next interval.
    pub async fn reconcile(&self, device: &DeviceId, timeout: Duration) -> Result<CommandReply, FleetError> {
        self.command(device, "reconcile", timeout).await
    }

    /// The last `tail` lines of the container `container` on the device
    /// (only containers its agent manages), at most
    /// [`MAX_LOG_BYTES`](harmony_score_wire::MAX_LOG_BYTES) of them
    /// (`truncated` says older lines were dropped). The lines are the
    /// container's own output: escape them before printing.
    /// [`FleetError::LogsRefused`] says why the device did not answer with lines.
    pub async fn logs(
        &self,
        device: &DeviceId,
        container: &str,
        tail: u32,
        timeout: Duration,
    ) -> Result<LogsReply, FleetError> {
        let request = LogsRequest::new(container, tail);
        request.check().map_err(|message| FleetError::LogsRefused {
            device: device.clone(),
            container: bounded_text(container, 128),
            kind: Some(LogsErrorKind::InvalidRequest),
            message,
        })?;
        let (subject, payload) =
            self.request(device, LOGS_VERB, Bytes::from(to_cbor(&request)), timeout).await?;
        let reply: LogsReply = from_cbor(&payload, MAX_LOGS_REPLY_BYTES, "logs reply")
            .map_err(|e| FleetError::BadReply { subject: subject.clone(), message: e.to_string() })?;
        if reply.device_id != *device {
            return Err(FleetError::BadReply {
                subject,
                message: format!("answered by device {} instead", reply.device_id),
            });
        }
        if !reply.ok {
            return Err(FleetError::LogsRefused {
                device: device.clone(),
                container: bounded_text(container, 128),
                kind: reply.error,
                message: bounded_text(&reply.message, 1024),
            });
        }
        Ok(reply)
    }

    async fn command(
        &self,
        device: &DeviceId,
        verb: &str,
        timeout: Duration,
    ) -> Result<CommandReply, FleetError> {
        let (subject, payload) = self.request(device, verb, Bytes::new(), timeout).await?;
        let reply: CommandReply = from_cbor(&payload, MAX_VALUE_BYTES, "command reply")
            .map_err(|e| FleetError::BadReply { subject: subject.clone(), message: e.to_string() })?;
        if reply.device_id != *device {
            return Err(FleetError::BadReply {
                subject,
                message: format!("answered by device {} instead", reply.device_id),
            });
        }
        Ok(reply)
    }

    /// Sends `verb` with `body` to the device; its subject and the reply's payload.
    async fn request(
        &self,
        device: &DeviceId,
        verb: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(String, Bytes), FleetError> {
        let subject = command_subject(device, verb);
        let request = async_nats::Request::new().payload(body).timeout(Some(timeout));
        let reply = match self.nats.send_request(subject.clone(), request).await {
            Ok(reply) => reply,
            Err(err) => {
                return Err(match err.kind() {
                    RequestErrorKind::NoResponders => FleetError::DeviceOffline { device: device.clone() },
                    RequestErrorKind::TimedOut => FleetError::Timeout {
                        what: format!("{device} to answer {verb}"),
                        after: timeout,
                        last: None,
                    },
                    _ => FleetError::nats(format!("request {subject}"), err),
                })
            }
        };
        Ok((subject, reply.payload))
    }
}

/// Whether `prefix` can start inbox subjects: tokens of subject
/// characters, no wildcard, no empty token.
fn valid_inbox_prefix(prefix: &str) -> bool {
    prefix.split('.').all(|token| {
        !token.is_empty() && token.chars().all(|c| c.is_ascii_graphic() && !matches!(c, '*' | '>'))
    })
}

/// When the server stored the device's last heartbeat (milliseconds since
/// the epoch); 0 when it never beat. The server's time, not the value the
/// device wrote: a device (or its clock) claiming a beat in the future
/// would otherwise never look stale.
async fn read_heartbeat(store: &kv::Store, device: &DeviceId) -> u64 {
    match store.entry(heartbeat_key(device)).await {
        Ok(Some(entry)) => beat_ms(&entry),
        _ => 0,
    }
}

/// When the server stored a heartbeat entry; 0 for a delete or purge marker.
fn beat_ms(entry: &kv::Entry) -> u64 {
    match entry.operation {
        kv::Operation::Put => server_ms(entry),
        _ => 0,
    }
}

/// When the server stored `entry`, in milliseconds since the epoch.
pub(crate) fn server_ms(entry: &kv::Entry) -> u64 {
    u64::try_from(entry.created.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// Reads and decodes one status key; deleted or missing → `None`.
async fn read_status(store: &kv::Store, key: &str) -> Result<Option<(AgentStatus, u64)>, FleetError> {
    let Ok(device) = DeviceId::new(key) else {
        warn!(key = %harmony_score_wire::log_text(key), "status key is not a device id; skipped");
        return Ok(None);
    };
    let entry = store.entry(key).await.map_err(|e| FleetError::nats(format!("read status {key}"), e))?;
    decode_status(device, entry)
}

/// The status an entry of `device`'s status key holds, and its revision;
/// `None` for a delete or purge marker or no entry.
///
/// The device's identity is the key, never the value: a device may write
/// only its own key, but it writes whatever it likes into it, including
/// another device's id.
pub(crate) fn decode_status(
    device: DeviceId,
    entry: Option<kv::Entry>,
) -> Result<Option<(AgentStatus, u64)>, FleetError> {
    match entry {
        Some(entry) if entry.operation == kv::Operation::Put => {
            let mut status: AgentStatus = from_cbor(&entry.value, MAX_VALUE_BYTES, "agent status")
                .map_err(|source| FleetError::BadValue { key: device.to_string(), source })?;
            if status.device_id != device {
                warn!(key = %device, claimed = %status.device_id, "a status claims another device id; the key decides");
                status.device_id = device;
            }
            // Times the device claims are no later than the server stored
            // them: staleness must not rest on a device's word or clock.
            let stored = server_ms(&entry);
            status.updated_at_ms = status.updated_at_ms.min(stored);
            status.heartbeat_at_ms = status.heartbeat_at_ms.min(stored);
            Ok(Some((status, entry.revision)))
        }
        _ => Ok(None),
    }
}

/// The statuses among the status bucket's entries (by key), each with its
/// device's last heartbeat merged in, sorted by device id. What cannot be
/// read or decoded, and keys that are neither device ids nor heartbeat
/// keys, are skipped with a warning.
fn statuses_of(
    entries: impl IntoIterator<Item = (String, Result<Option<kv::Entry>, FleetError>)>,
) -> Vec<AgentStatus> {
    let mut statuses = Vec::new();
    let mut beats: HashMap<DeviceId, u64> = HashMap::new();
    for (key, entry) in entries {
        // Status keys are device ids; `<id>.heartbeat` keys hold each
        // device's last beat (its status is written only when it changes).
        if let Ok(device) = DeviceId::new(&key) {
            match entry.and_then(|entry| decode_status(device, entry)) {
                Ok(Some((status, _))) => statuses.push(status),
                Ok(None) => {}
                Err(err) => {
                    warn!(key = %harmony_score_wire::log_text(&key), cause = %harmony_score_wire::log_text(crate::error_chain(&err)), "skipping unreadable status")
                }
            }
        } else if let Some(device) = parse_heartbeat_key(&key) {
            if let Ok(Some(entry)) = entry {
                beats.insert(device, beat_ms(&entry));
            }
        } else {
            warn!(
                key = %harmony_score_wire::log_text(&key),
                "a key of the status bucket is neither a device id nor a heartbeat key; skipped"
            );
        }
    }
    for status in &mut statuses {
        if let Some(beat) = beats.get(&status.device_id) {
            status.heartbeat_at_ms = status.heartbeat_at_ms.max(*beat);
        }
    }
    statuses.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    statuses
}

/// The status bucket's stream: what `create_key_value` would make with
/// history 1, but with rollups refused; `replicas` copies.
fn status_stream_config(replicas: usize) -> stream::Config {
    stream::Config {
        name: format!("KV_{AGENT_STATUS_BUCKET}"),
        description: Some("Harmony agent status: <device> -> AgentStatus (CBOR)".into()),
        subjects: vec![format!("$KV.{AGENT_STATUS_BUCKET}.>")],
        max_messages_per_subject: 1,
        allow_rollup: false,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        republish: Some(status_hint_republish()),
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}
