//! The agent daemon: lock and load the state, start the source, let the controller run until shutdown.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use harmony_score_wire::{registered_scores, AgentStatus, DeploymentName, DeviceInfo, SupportedScore};
use harmony_topology::{Inventory, LocalDeviceTopology, Maestro, MaestroError, Podman};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::artifacts::{ArtifactLink, NatsArtifacts};
use crate::config::{AgentConfig, Source};
use crate::controller::{Controller, ControllerSettings};
use crate::inbox::{inbox, InboxSender};
use crate::store::{Store, StoreError};
use crate::{source, AGENT_VERSION};

/// How long the source gets to stop after the controller did.
const SOURCE_STOP_GRACE: Duration = Duration::from_secs(5);
/// Least time between two writes of `<state_dir>/status.json` (a change is
/// written this long after it, with whatever followed it meanwhile: a run
/// that ends within it is one write, not two).
const LOCAL_STATUS_EVERY: Duration = Duration::from_secs(1);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The state directory is unusable, or another agent holds it.
    #[error("state directory")]
    StateFailed(#[from] StoreError),
    /// The device root is unusable.
    #[error("device topology")]
    TopologyFailed(#[from] MaestroError),
}

/// What a source is given to work with.
#[derive(Debug)]
pub struct SourceContext {
    /// Where inputs go; sending never blocks.
    pub inbox: InboxSender,
    /// Deployments the device holds state for at start: their keys are
    /// read even if the index no longer lists them (deleted while down).
    pub known: Vec<DeploymentName>,
    /// The status to report, newest value.
    pub status: watch::Receiver<Arc<AgentStatus>>,
    /// Turns true at shutdown.
    pub stop: watch::Receiver<bool>,
    /// Where a source with a NATS connection hands it to the artifact store.
    pub artifacts: Option<ArtifactLink>,
}

/// What the agent publishes about itself.
pub fn device_info(config: &AgentConfig) -> DeviceInfo {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    DeviceInfo {
        agent_version: AGENT_VERSION.to_owned(),
        scores: registered_scores()
            .into_iter()
            .map(|r| SupportedScore {
                tag: r.tag.to_owned(),
                version: r.version().to_owned(),
                summary: r.summary.to_owned(),
            })
            .collect(),
        hostname,
        arch: std::env::consts::ARCH.to_owned(),
        os: std::env::consts::OS.to_owned(),
        labels: config.labels.clone(),
        started_at_ms: harmony_score_wire::now_ms(),
        features: vec![harmony_score_wire::HEALTH_FEATURE.to_owned()],
    }
}

/// Runs the agent until `shutdown` resolves.
///
/// The persisted desired state is scheduled before any network: a device
/// that boots offline runs what it last accepted. On shutdown, runs stop at
/// a Score boundary (or are aborted after a grace period) and the source
/// stops; the whole takes a bounded time.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let store = Store::open(&config.state_dir)?;
    // Opened after the state directory's lock: it removes the temp files
    // of transfers a crash interrupted.
    let (artifacts, artifact_link) =
        NatsArtifacts::new(config.state_dir.join("artifacts"), config.max_artifact_bytes);
    let maestro = Maestro::initialize(
        Inventory::empty(),
        LocalDeviceTopology::new(&config.root)
            .with_podman(Podman::new(&config.podman))
            .with_artifacts(Arc::new(artifacts)),
    )
    .await?;
    let settings = ControllerSettings {
        device: config.device_id.clone(),
        max_parallel: config.max_parallel,
        resync: config.resync,
        timeouts: config.timeouts.clone(),
        shutdown_grace: config.shutdown_grace,
        heartbeat: config.heartbeat,
        info: device_info(&config),
        policy: config.policy.clone(),
        trust: config.trust.clone(),
        allow_unsigned: config.allow_unsigned,
        root_keys: config.root_keys.clone(),
    };
    if config.allow_unsigned {
        warn!("allow_unsigned is set: this device runs documents nobody signed");
    } else if config.trust.is_empty() {
        warn!("no trusted_keys and allow_unsigned is off: every document will be refused");
    }
    let mut controller = Controller::new(settings, maestro, store);
    controller.boot();
    let (status_tx, status_rx) = watch::channel(Arc::new(controller.status()));
    let (inbox_tx, inbox_rx) = inbox();
    let (stop_tx, stop_rx) = watch::channel(false);
    let context = SourceContext {
        inbox: inbox_tx,
        known: controller.known_deployments(),
        status: status_rx.clone(),
        stop: stop_rx.clone(),
        // Without NATS the link is dropped: only cached artifacts are there.
        artifacts: (config.source == Source::Nats).then_some(artifact_link),
    };
    let source_task = match &config.source {
        Source::Nats => tokio::spawn(source::nats::run(config.clone(), context)),
        Source::Dir(dir) => tokio::spawn(source::dir::run(dir.clone(), context)),
    };
    let local_status =
        tokio::spawn(write_local_status(config.state_dir.join("status.json"), status_rx, stop_rx));
    info!(device = %config.device_id, instance = controller.instance_id(), source = ?config.source, "agent running");

    controller.run(inbox_rx, status_tx, shutdown).await;

    info!("shutting down");
    let _ = stop_tx.send(true);
    if tokio::time::timeout(SOURCE_STOP_GRACE, source_task).await.is_err() {
        warn!("source did not stop within {SOURCE_STOP_GRACE:?}");
    }
    let _ = tokio::time::timeout(SOURCE_STOP_GRACE, local_status).await;
    Ok(())
}

/// Keeps `<state_dir>/status.json` (the same status, for people and for
/// air-gapped devices) up to date, at most every [`LOCAL_STATUS_EVERY`].
async fn write_local_status(
    path: PathBuf,
    mut status: watch::Receiver<Arc<AgentStatus>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        // The status itself, shared: not a copy of it.
        let report = Arc::clone(&status.borrow_and_update());
        let target = path.clone();
        let _ = tokio::task::spawn_blocking(move || write_status_file(&target, &report)).await;
        let stopping = tokio::select! {
            // Closed: the controller stopped, its last status published.
            changed = status.changed() => changed.is_err() || {
                // What follows the change within the pause is written with it.
                tokio::select! {
                    () = tokio::time::sleep(LOCAL_STATUS_EVERY) => false,
                    _ = stop.changed() => true,
                }
            },
            _ = stop.changed() => true,
        };
        if stopping {
            // The last status, at once.
            let report = Arc::clone(&status.borrow());
            let _ = tokio::task::spawn_blocking(move || write_status_file(&path, &report)).await;
            return;
        }
    }
}

fn write_status_file(path: &Path, status: &AgentStatus) {
    let mut bytes = Vec::with_capacity(8 * 1024);
    let result = serde_json::to_writer_pretty(&mut bytes, status)
        .map(|()| bytes)
        .map_err(std::io::Error::other)
        .and_then(|bytes| harmony_topology::local::write_file_replacing(path, &bytes, 0o644));
    if let Err(err) = result {
        error!(cause = %harmony_score_wire::log_text(&err), "cannot write local status");
    }
}
