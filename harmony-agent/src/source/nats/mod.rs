//! NATS as the source: follow the device's keys, answer commands, write status.
//!
//! Keys are followed without a consumer (ARCHITECTURE.md, "NATS layout"): a
//! core subscription on `$KV.harmony-desired-state.<id>.>` says *that* a key
//! changed, a direct get of the key says *what* it holds. Every key is read
//! again after each (re)connect and on the resync timer, so a notification
//! lost while offline, or a server restart, never leaves the device behind.

mod keys;
mod status;

use std::time::Duration;

use async_nats::{jetstream, ConnectOptions, Event, Message, ServerError};
use futures_util::StreamExt;
use harmony_score_wire::names::{command_subject, desired_state_subjects, inbox_prefix, info_subject};
use harmony_score_wire::{to_cbor, AgentStatus, CommandReply, DeviceInfo};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::config::AgentConfig;
use crate::daemon::Input;
use crate::AGENT_VERSION;

/// Timeout of every JetStream request (direct gets, publish acks).
const JS_TIMEOUT: Duration = Duration::from_secs(5);

/// Follows the device's keys on NATS and feeds `inputs` until `stop` turns true.
pub async fn run(
    config: AgentConfig,
    inputs: mpsc::Sender<Input>,
    status_rx: watch::Receiver<AgentStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let device = config.device_id.clone();
    let (event_tx, mut events) = mpsc::unbounded_channel();
    let mut options = ConnectOptions::new()
        .name(format!("harmony-agent-{device}"))
        .custom_inbox_prefix(inbox_prefix(&device))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let tx = event_tx.clone();
            async move {
                let _ = tx.send(event);
            }
        });
    if let Some((user, password)) = url_credentials(&config.nats_urls) {
        options = options.user_and_password(user, password);
    }
    if let Some(creds) = &config.creds {
        options = match options.credentials_file(creds).await {
            Ok(options) => options,
            Err(err) => {
                error!(cause = %err, "cannot read NATS credentials; not connecting");
                return;
            }
        };
    }
    // With retry_on_initial_connect this returns at once; the first
    // `Connected` event starts the first full read of the keys.
    let client = match options.connect(config.nats_urls.clone()).await {
        Ok(client) => client,
        Err(err) => {
            error!(cause = %err, "cannot connect to NATS");
            return;
        }
    };
    let js = jetstream::ContextBuilder::new().timeout(JS_TIMEOUT).build(client.clone());
    let mut follower = match keys::Follower::new(&js, device.clone(), inputs.clone(), status_rx.clone()).await
    {
        Ok(follower) => follower,
        Err(err) => {
            error!(cause = %err, "cannot open the desired-state stream");
            return;
        }
    };
    let subscriptions = tokio::try_join!(
        client.subscribe(desired_state_subjects(&device)),
        client.subscribe(command_subject(&device, ">")),
    );
    let (mut hints, mut commands) = match subscriptions {
        Ok(subs) => subs,
        Err(err) => {
            error!(cause = %err, "cannot subscribe");
            return;
        }
    };
    let info_rx = status_rx.clone();
    let writer =
        tokio::spawn(status::write_loop(js.clone(), client.clone(), config.clone(), status_rx, stop.clone()));

    let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + config.resync, config.resync);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(event) = events.recv() => match event {
                Event::Connected => {
                    info!("connected to NATS; reading all keys");
                    let info = info_rx.borrow().info.clone();
                    publish_info(&client, &config, info.as_ref()).await;
                    follower.full_sync().await;
                }
                Event::Disconnected => warn!("disconnected from NATS; running on the last accepted state"),
                Event::ServerError(ServerError::Other(text)) if text.starts_with("Permissions Violation") => {
                    error!(%text, "NATS refused an operation: the device's credentials do not allow it");
                }
                Event::ClientError(err) => warn!(cause = %err, "NATS client error"),
                other => debug!(event = %other, "NATS event"),
            },
            Some(message) = hints.next() => follower.on_hint(&message.subject).await,
            Some(message) = commands.next() => {
                tokio::spawn(answer(client.clone(), config.clone(), inputs.clone(), message));
            }
            _ = resync.tick() => follower.full_sync().await,
        }
    }
    let _ = writer.await;
    if let Err(err) = client.flush().await {
        debug!(cause = %err, "flush on shutdown");
    }
}

/// The `user:password@` of the first URL that has one: async-nats 0.51
/// parses it but does not send it, so the agent passes it on itself.
fn url_credentials(urls: &[String]) -> Option<(String, String)> {
    urls.iter()
        .filter_map(|url| url.parse::<async_nats::ServerAddr>().ok())
        .find_map(|addr| Some((addr.username()?.to_owned(), addr.password()?.to_owned())))
}

async fn publish_info(client: &async_nats::Client, config: &AgentConfig, info: Option<&DeviceInfo>) {
    if let Some(info) = info {
        if let Err(err) = client.publish(info_subject(&config.device_id), to_cbor(info).into()).await {
            warn!(cause = %err, "cannot publish device info");
        }
    }
}

/// Answers one `device-commands.<id>.<verb>` request. No verb runs a shell.
async fn answer(
    client: async_nats::Client,
    config: AgentConfig,
    inputs: mpsc::Sender<Input>,
    message: Message,
) {
    let Some(reply) = message.reply else { return };
    // Only an operator's request may be answered: a reply subject into
    // JetStream's API, or a JetStream status message, is not one.
    if reply.starts_with("$JS.") || message.status.is_some() {
        warn!(subject = %message.subject, "dropped a command that is not a request");
        return;
    }
    let verb = message.subject.rsplit('.').next().unwrap_or_default().to_owned();
    let (ok, text) = match verb.as_str() {
        "ping" => (true, "pong".to_owned()),
        "reconcile" => {
            let (tx, rx) = oneshot::channel();
            if inputs.send(Input::ReconcileNow { reply: tx }).await.is_err() {
                (false, "agent is shutting down".to_owned())
            } else {
                match tokio::time::timeout(Duration::from_secs(60), rx).await {
                    Ok(Ok(text)) => (true, text),
                    _ => (false, "reconcile did not finish within 60 s".to_owned()),
                }
            }
        }
        other => (false, format!("unknown verb {other:?} (known: ping, reconcile)")),
    };
    let body = CommandReply {
        device_id: config.device_id.clone(),
        verb,
        ok,
        message: text,
        agent_version: AGENT_VERSION.to_owned(),
    };
    if let Err(err) = client.publish(reply, to_cbor(&body).into()).await {
        warn!(cause = %err, "cannot answer command");
    }
}
