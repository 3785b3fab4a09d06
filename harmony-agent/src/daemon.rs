//! The agent daemon: boot from disk, follow a source, reconcile, report; until shutdown.

use std::future::Future;
use std::path::Path;

use harmony_score_wire::{registered_scores, AgentStatus, DeploymentName, DeviceInfo, SupportedScore};
use harmony_topology::{Inventory, LocalDeviceTopology, Maestro, MaestroError};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};
use tracing::{error, info, warn};

use crate::config::{AgentConfig, Source};
use crate::reconcile::{DocumentFormat, Reconciler};
use crate::store::{Store, StoreError};
use crate::{source, AGENT_VERSION};

/// What a source tells the reconciler.
#[derive(Debug)]
pub enum Input {
    /// The current value of a deployment's key.
    Document { deployment: DeploymentName, bytes: Vec<u8>, format: DocumentFormat },
    /// The deployment's key is gone.
    Deleted { deployment: DeploymentName },
    /// Re-run everything now and say how it went.
    ReconcileNow { reply: oneshot::Sender<String> },
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory is unusable.
    #[error("state directory")]
    StateFailed(#[from] StoreError),
    /// The device root is unusable.
    #[error("device topology")]
    TopologyFailed(#[from] MaestroError),
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
    }
}

/// Runs the agent until `shutdown` resolves.
///
/// The persisted desired state is applied before any network: a device that
/// boots offline runs what it last accepted.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let store = Store::open(&config.state_dir)?;
    let maestro = Maestro::initialize(Inventory::empty(), LocalDeviceTopology::new(&config.root)).await?;
    let mut reconciler =
        Reconciler::new(config.device_id.clone(), maestro, store, device_info(&config), config.heartbeat);
    reconciler.boot().await;
    let status = reconciler.status();
    write_local_status(&config.state_dir, &status);
    let (status_tx, status_rx) = watch::channel(status);
    let (input_tx, mut input_rx) = mpsc::channel(64);
    let (stop_tx, stop_rx) = watch::channel(false);

    let source_task = match &config.source {
        Source::Nats => tokio::spawn(source::nats::run(config.clone(), input_tx, status_rx, stop_rx)),
        Source::Dir(dir) => tokio::spawn(source::dir::run(dir.clone(), input_tx, status_rx, stop_rx)),
    };
    info!(device = %config.device_id, source = ?config.source, "agent running");

    tokio::pin!(shutdown);
    let mut resync = tokio::time::interval_at(Instant::now() + config.resync, config.resync);
    let mut source_open = true;
    loop {
        let retry_at = reconciler.next_retry();
        let changed = tokio::select! {
            () = &mut shutdown => break,
            input = input_rx.recv(), if source_open => match input {
                Some(input) => handle(&mut reconciler, input).await,
                None => {
                    warn!("source stopped; running on the last accepted state");
                    source_open = false;
                    false
                }
            },
            _ = resync.tick() => reconciler.reconcile_all().await,
            () = sleep_until(retry_at.map_or_else(Instant::now, Instant::from_std)), if retry_at.is_some() => {
                reconciler.run_due_retries(std::time::Instant::now()).await
            }
        };
        if changed {
            let status = reconciler.status();
            write_local_status(&config.state_dir, &status);
            status_tx.send_replace(status);
        }
    }
    info!("shutting down");
    let _ = stop_tx.send(true);
    if tokio::time::timeout(std::time::Duration::from_secs(5), source_task).await.is_err() {
        warn!("source did not stop within 5 s");
    }
    Ok(())
}

async fn handle(reconciler: &mut Reconciler, input: Input) -> bool {
    match input {
        Input::Document { deployment, bytes, format } => reconciler.offer(&deployment, &bytes, format).await,
        Input::Deleted { deployment } => reconciler.delete(&deployment).await,
        Input::ReconcileNow { reply } => {
            reconciler.reconcile_all().await;
            let status = reconciler.status();
            let failed = status.deployments.values().filter(|d| d.scores.iter().any(|s| !s.is_ok())).count();
            let _ =
                reply.send(format!("reconciled {} deployments, {failed} failing", status.deployments.len()));
            true
        }
    }
}

/// `<state_dir>/status.json`: the same status, for people and for air-gapped devices.
fn write_local_status(state_dir: &Path, status: &AgentStatus) {
    let result = serde_json::to_vec_pretty(status).map_err(std::io::Error::other).and_then(|bytes| {
        harmony_topology::local::write_file_atomic(&state_dir.join("status.json"), &bytes, 0o644)
    });
    if let Err(err) = result {
        error!(cause = %err, "cannot write local status");
    }
}
