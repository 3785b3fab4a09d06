//! NATS as the source: follow the device's keys, answer commands, write status.
//!
//! Keys are followed without a consumer (ARCHITECTURE.md, "NATS layout"):
//! the bucket's headers-only republish on `harmony.hint.<id>.>` says *that*
//! a key changed and at which sequence, a direct get of the key says *what*
//! it holds. The device never sees the operator's publish (nor its ack
//! inbox). Every key is read again after each (re)connect and on the
//! resync timer, so a hint lost while offline never leaves the device behind.

mod creds;
mod keys;
mod logs;
mod status;

use std::time::Duration;

use async_nats::{jetstream, ConnectOptions, Event, Message, ServerError};
use futures_util::{FutureExt, StreamExt};
use harmony_score_wire::names::{
    command_subject, hint_subjects, inbox_prefix, info_subject, keyset_hint_subject,
};
use harmony_score_wire::{log_text, to_cbor, CommandReply, DeviceInfo, LOGS_VERB};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::config::AgentConfig;
use crate::daemon::SourceContext;
use crate::inbox::{Command, InboxSender};
use crate::AGENT_VERSION;

/// Timeout of every JetStream request (direct gets, publish acks).
const JS_TIMEOUT: Duration = Duration::from_secs(5);

/// Most hints taken together before the other inputs of the loop get a turn.
const MAX_HINT_BATCH: usize = 1024;

/// Follows the device's keys on NATS and feeds the inbox until `stop` turns true.
pub async fn run(config: AgentConfig, context: SourceContext) {
    let SourceContext { inbox, known, status: status_rx, mut stop, artifacts } = context;
    let device = config.device_id.clone();
    let (event_tx, mut events) = mpsc::unbounded_channel();
    let mut options = ConnectOptions::new()
        .name(format!("harmony-agent-{device}"))
        .custom_inbox_prefix(inbox_prefix(&device))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| reconnect_delay(attempts, crate::controller::jitter()))
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let tx = event_tx.clone();
            async move {
                let _ = tx.send(event);
            }
        });
    if let Some((user, password)) = config.nats_auth.clone() {
        options = options.user_and_password(user, password);
    }
    if let Some(creds) = &config.creds {
        options = match creds::with_credentials_file(options, creds).await {
            Ok(options) => options,
            Err(err) => {
                error!(cause = %log_text(&err), "cannot read NATS credentials; not connecting");
                return;
            }
        };
    }
    // With retry_on_initial_connect this returns at once; the first
    // `Connected` event starts the first full read of the keys.
    let client = match options.connect(config.nats_urls.clone()).await {
        Ok(client) => client,
        Err(err) => {
            error!(cause = %log_text(&err), "cannot connect to NATS");
            return;
        }
    };
    let js = jetstream::ContextBuilder::new().timeout(JS_TIMEOUT).build(client.clone());
    // Artifacts travel over this same connection (and its credentials).
    if let Some(link) = &artifacts {
        link.connect(js.clone());
    }
    // Key sets matter only to a device with root keys to check them (and
    // only such a device's credentials need to read the key set).
    let follow_keyset = !config.root_keys.is_empty();
    let mut follower =
        match keys::Follower::new(&js, device.clone(), inbox.clone(), known, follow_keyset).await {
            Ok(follower) => follower,
            Err(err) => {
                error!(cause = %log_text(&err), "cannot open the desired-state stream");
                return;
            }
        };
    let mut commands = match client.subscribe(command_subject(&device, ">")).await {
        Ok(sub) => sub,
        Err(err) => {
            error!(cause = %log_text(&err), "cannot subscribe");
            return;
        }
    };
    let mut hints = match subscribe_hints(&client, &device, config.follow_hints, follow_keyset).await {
        Ok(hints) => hints,
        Err(err) => {
            error!(cause = %log_text(&err), "cannot subscribe");
            return;
        }
    };
    let info_rx = status_rx.clone();
    let writer =
        tokio::spawn(status::write_loop(js.clone(), client.clone(), config.clone(), status_rx, stop.clone()));
    // Commands have a task of their own: a full re-read of the keys (many
    // direct gets after a reconnect) never holds up a ping.
    let commands_task = {
        let (client, config, inbox, mut stop) = (client.clone(), config.clone(), inbox.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    message = commands.next() => match message {
                        Some(message) => {
                            tokio::spawn(answer(client.clone(), config.clone(), inbox.clone(), message));
                        }
                        None => return,
                    },
                }
            }
        })
    };

    let mut next_resync = crate::controller::first_tick(config.resync);
    loop {
        let lag_check = follower.next_lag_check();
        // One step of the loop; a step (a full read of many keys, each
        // under a 5 s timeout while the server is unreachable) is dropped
        // at shutdown rather than awaited.
        let step = async {
            tokio::select! {
                () = sleep_until(lag_check), if lag_check.is_some() => follower.check_lagging().await,
                Some(event) = events.recv() => match event {
                    Event::Connected => {
                        info!("connected to NATS; reading all keys");
                        let info = info_rx.borrow().info.clone();
                        publish_info(&client, &config, info.as_ref()).await;
                        follower.full_sync(keys::FullSync::Connected).await;
                    }
                    Event::Disconnected => warn!("disconnected from NATS; running on the last accepted state"),
                    Event::ServerError(ServerError::Other(text)) if text.starts_with("Permissions Violation") => {
                        error!(text = %log_text(&text), "NATS refused an operation: the device's credentials do not allow it");
                    }
                    Event::ClientError(err) => warn!(cause = %log_text(&err), "NATS client error"),
                    other => debug!(event = %log_text(&other), "NATS event"),
                },
                Some(message) = hints.next() => {
                    // Every hint already received is taken with this one, so a
                    // burst of writes costs one direct get per key, and hints do
                    // not queue behind gets (each queued message may pin the
                    // read buffer of a whole document received beside it).
                    let mut batch = keys::Hints::default();
                    follower.add_hint(&mut batch, &message);
                    drop(message);
                    for _ in 1..MAX_HINT_BATCH {
                        match hints.next().now_or_never() {
                            Some(Some(message)) => follower.add_hint(&mut batch, &message),
                            _ => break,
                        }
                    }
                    debug!(keys = batch.len(), "hints");
                    follower.on_hints(batch).await;
                }
                () = tokio::time::sleep_until(next_resync) => {
                    next_resync = tokio::time::Instant::now() + crate::controller::jittered(config.resync);
                    let missed = follower.full_sync(keys::FullSync::Resync).await;
                    if missed > 0 && config.follow_hints {
                        // The live path failed (a subscription dropped, a slow
                        // consumer, hints denied by the server): the resync is
                        // what converged the device. Worth a look, not fatal.
                        warn!(changes = missed, "the resync found changes no hint had announced: hints are being lost; fell back to the resync");
                    } else if missed > 0 {
                        info!(changes = missed, "the resync found changes (hints not followed)");
                    }
                }
            }
        };
        tokio::select! {
            _ = stop.changed() => break,
            () = step => {}
        }
    }
    let _ = writer.await;
    let _ = commands_task.await;
    // What was published reaches the server, unless there is none to reach.
    if client.connection_state() != async_nats::connection::State::Connected {
        return;
    }
    match tokio::time::timeout(Duration::from_secs(1), client.flush()).await {
        Ok(Err(err)) => debug!(cause = %log_text(&err), "flush on shutdown"),
        Err(_) => debug!("flush on shutdown: no server within 1 s"),
        Ok(Ok(())) => {}
    }
}

/// The longest wait between two connection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(8);

/// The wait before connection attempt `attempts` (async-nats counts from 1;
/// the initial connect with `retry_on_initial_connect` counts too): none
/// for the first, then doubling from 250 ms up to [`MAX_RECONNECT_DELAY`],
/// each cut to 50–100 % by `jitter` (0.0–1.0), so a fleet that lost its
/// server together does not hammer it together when it comes back.
fn reconnect_delay(attempts: usize, jitter: f64) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exponent = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    let full = Duration::from_millis(250).saturating_mul(1u32 << exponent).min(MAX_RECONNECT_DELAY);
    full.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
}

/// The hint subscriptions (the device's keys, and the key set's when it
/// follows key sets) as one stream; none when hints are not followed.
async fn subscribe_hints(
    client: &async_nats::Client,
    device: &harmony_score_wire::DeviceId,
    follow_hints: bool,
    follow_keyset: bool,
) -> Result<futures_util::stream::BoxStream<'static, Message>, async_nats::SubscribeError> {
    if !follow_hints {
        info!("not following hints: changes are read at connect and on the resync timer only");
        return Ok(futures_util::stream::pending().boxed());
    }
    let hints = client.subscribe(hint_subjects(device)).await?;
    if !follow_keyset {
        return Ok(hints.boxed());
    }
    let keyset_hints = client.subscribe(keyset_hint_subject()).await?;
    Ok(futures_util::stream::select(hints, keyset_hints).boxed())
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn publish_info(client: &async_nats::Client, config: &AgentConfig, info: Option<&DeviceInfo>) {
    if let Some(info) = info {
        if let Err(err) = client.publish(info_subject(&config.device_id), to_cbor(info).into()).await {
            warn!(cause = %log_text(&err), "cannot publish device info");
        }
    }
}

/// The sequence a headers-only republish of `subject` carries, or `None`
/// for any other message on a hint subject. Devices share an account, and
/// the server delivers the answer to a device's JetStream request (a direct
/// get of its own status, with headers it stored; an ack) on whatever reply
/// subject it names: another device's hint or status-hint subject. Such an
/// answer has a payload, or no `Nats-Msg-Size`, or the server's own
/// `Nats-Subject` (the key actually read) beside any stored one; a real
/// copy has an empty payload and exactly one `Nats-Subject`, the key's.
pub(super) fn republished_sequence(message: &Message, subject: &str) -> Option<u64> {
    if !message.payload.is_empty() || message.reply.is_some() || message.status.is_some() {
        return None;
    }
    let headers = message.headers.as_ref()?;
    let only = |name: &str| {
        let mut values = headers.get_all(name);
        match (values.next(), values.next()) {
            (Some(value), None) => Some(value.as_str().to_owned()),
            _ => None,
        }
    };
    only("Nats-Msg-Size")?;
    if only("Nats-Subject")? != subject {
        return None;
    }
    only("Nats-Sequence")?.parse().ok()
}

/// Whether a command's reply subject may be answered: only under the
/// operator's inbox prefix. A reply subject is chosen by whoever sent the
/// command; answering `$KV.…` would write into a bucket with the device's
/// own credentials (a confused deputy).
fn trusted_reply(reply: &str, prefix: &str) -> bool {
    reply.starts_with(prefix) && reply.len() > prefix.len() && !reply.contains(['*', '>', ' '])
}

/// Answers one `device-commands.<id>.<verb>` request. No verb runs a shell.
async fn answer(client: async_nats::Client, config: AgentConfig, inbox: InboxSender, message: Message) {
    let Some(reply) = message.reply else { return };
    if message.status.is_some() || !trusted_reply(&reply, &config.trusted_inbox_prefix) {
        warn!(
            subject = %log_text(&message.subject),
            reply = %log_text(&reply),
            "dropped a command whose reply subject is not under the trusted inbox prefix"
        );
        return;
    }
    let verb = message.subject.rsplit('.').next().unwrap_or_default().to_owned();
    if verb == LOGS_VERB {
        let podman = harmony_topology::Podman::new(&config.podman);
        let body = logs::answer(&config.device_id, &podman, &message.payload).await;
        if let Err(err) = client.publish(reply, to_cbor(&body).into()).await {
            warn!(cause = %log_text(&err), "cannot answer command");
        }
        return;
    }
    let (ok, text) = match verb.as_str() {
        "ping" => (true, "pong".to_owned()),
        "reconcile" => {
            let (tx, rx) = oneshot::channel();
            if !inbox.command(Command::ReconcileNow { reply: tx }) {
                (false, "agent is shutting down".to_owned())
            } else {
                match tokio::time::timeout(Duration::from_secs(10), rx).await {
                    Ok(Ok(text)) => (true, text),
                    _ => (false, "the agent did not take the reconcile within 10 s".to_owned()),
                }
            }
        }
        other => (
            false,
            format!(
                "unknown verb {:?} (known: ping, reconcile, logs)",
                harmony_score_wire::bounded_text(other, 64)
            ),
        ),
    };
    let body = CommandReply {
        device_id: config.device_id.clone(),
        verb: harmony_score_wire::bounded_text(&verb, 64),
        ok,
        message: text,
        agent_version: AGENT_VERSION.to_owned(),
    };
    if let Err(err) = client.publish(reply, to_cbor(&body).into()).await {
        warn!(cause = %log_text(&err), "cannot answer command");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{reconnect_delay, republished_sequence, trusted_reply, MAX_RECONNECT_DELAY};

    // Issue 9 §1: retries after a server loss are bounded and jittered.
    #[test]
    fn reconnect_delays_double_are_capped_and_jittered() {
        assert_eq!(reconnect_delay(0, 0.5), Duration::ZERO);
        assert_eq!(reconnect_delay(1, 0.5), Duration::ZERO);
        assert_eq!(reconnect_delay(2, 1.0), Duration::from_millis(250));
        assert_eq!(reconnect_delay(3, 1.0), Duration::from_millis(500));
        assert_eq!(reconnect_delay(3, 0.0), Duration::from_millis(250));
        for attempts in [7, 8, 100, usize::MAX] {
            assert_eq!(reconnect_delay(attempts, 1.0), MAX_RECONNECT_DELAY, "{attempts}");
            assert_eq!(reconnect_delay(attempts, 0.0), MAX_RECONNECT_DELAY / 2, "{attempts}");
        }
        // Out-of-range jitter is clamped, never a longer wait.
        assert_eq!(reconnect_delay(100, 7.0), MAX_RECONNECT_DELAY);
        assert_eq!(reconnect_delay(100, -1.0), MAX_RECONNECT_DELAY / 2);
    }

    // Issue 7 §1 (confused deputy): a command whose reply subject pointed
    // into another device's desired state was answered there.
    #[test]
    fn only_replies_under_the_trusted_prefix_are_answered() {
        assert!(trusted_reply("_INBOX.abc.1", "_INBOX."));
        for bad in [
            "$KV.harmony-desired-state.dev-2.app",
            "$JS.ACK.x",
            "_INBOX.",
            "_INBOX.>",
            "harmony.hint.dev-2.x",
            "_INBOXX.a",
        ] {
            assert!(!trusted_reply(bad, "_INBOX."), "{bad}");
        }
    }

    // What a device can have the server deliver on another device's hint
    // subject (the answer to its own direct get or write) is no hint; the
    // bucket's headers-only copy of the key named is.
    #[test]
    fn only_the_buckets_headers_only_copy_of_the_key_is_a_hint() {
        const KEY: &str = "$KV.harmony-desired-state.dev-2.app";
        let message = |headers: &[(&str, &str)], payload: &'static [u8], reply: Option<&str>| {
            let mut map = async_nats::HeaderMap::new();
            for (name, value) in headers {
                map.append(*name, *value);
            }
            async_nats::Message {
                subject: "harmony.hint.dev-2.app".into(),
                reply: reply.map(Into::into),
                payload: bytes::Bytes::from_static(payload),
                headers: Some(map),
                status: None,
                description: None,
                length: 0,
            }
        };
        let copy =
            [("Nats-Stream", "KV_x"), ("Nats-Subject", KEY), ("Nats-Sequence", "7"), ("Nats-Msg-Size", "12")];
        assert_eq!(republished_sequence(&message(&copy, b"", None), KEY), Some(7));
        // A direct get of dev-1's own key, its stored headers first.
        let forged = [
            ("Nats-Sequence", "99999999999"),
            ("Nats-Subject", "$KV.harmony-agent-status.dev-1"),
            ("Nats-Sequence", "3"),
            ("Nats-Msg-Size", "0"),
        ];
        assert_eq!(republished_sequence(&message(&forged, b"", None), KEY), None);
        let stored_subject = [
            ("Nats-Subject", KEY),
            ("Nats-Subject", "$KV.x.dev-1"),
            ("Nats-Sequence", "3"),
            ("Nats-Msg-Size", "0"),
        ];
        assert_eq!(republished_sequence(&message(&stored_subject, b"", None), KEY), None);
        assert_eq!(republished_sequence(&message(&copy, b"{}", None), KEY), None, "a payload");
        assert_eq!(republished_sequence(&message(&copy, b"", Some("_INBOX.x")), KEY), None, "a reply");
        assert_eq!(republished_sequence(&message(&copy[..3], b"", None), KEY), None, "no Nats-Msg-Size");
        assert_eq!(
            republished_sequence(&message(&copy, b"", None), "$KV.harmony-desired-state.dev-2.web"),
            None
        );
    }
}
