//! `harmony-fleet`: the operator's command line (flags, logging, exit codes; the work is in `cli`).

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use harmony_fleet::{error_chain, FleetError};
use harmony_score_wire::{DeploymentName, DeviceId};

use crate::cli::{CliError, Connection};

/// The server tried when neither `--nats` nor `$HARMONY_NATS` is set.
const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";

#[derive(Parser)]
#[command(name = "harmony-fleet", version, about = "Deploys Harmony Scores to a fleet of devices")]
struct Cli {
    /// NATS server URLs, comma-separated [default: $HARMONY_NATS, else nats://127.0.0.1:4222].
    #[arg(long, global = true, value_name = "URL[,URL...]")]
    nats: Option<String>,
    /// NATS credentials file.
    #[arg(long, global = true, value_name = "FILE")]
    creds: Option<PathBuf>,
    /// Sign documents with this key (`harmony.key` from `keygen`) [default: $HARMONY_SIGN_KEY].
    #[arg(long, global = true, value_name = "FILE")]
    sign_key: Option<PathBuf>,
    /// A public key (`harmony.pub`) whose signed documents count when a
    /// signing `deploy` or `delete` numbers generations, besides the signing
    /// key's own (other operators' keys sharing the fleet, a key being
    /// rotated out); repeatable. Unsigned values never count.
    #[arg(long = "trusted-key", global = true, value_name = "FILE")]
    trusted_keys: Vec<PathBuf>,
    /// Inbox prefix for replies (a generated monitor or commander must use
    /// its own) [default: $HARMONY_INBOX_PREFIX, else _INBOX].
    #[arg(long, global = true, value_name = "PREFIX")]
    inbox_prefix: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validates the JSON form of a document and writes it as CBOR.
    Encode {
        /// The JSON document.
        doc: PathBuf,
        /// Where to write the CBOR (default: standard output).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Prints a CBOR document (or a JSON one, by extension) as JSON.
    Inspect {
        /// The document.
        doc: PathBuf,
    },
    /// Writes a document as a device's desired state, at the deployment's next generation.
    Deploy(cli::DeployArgs),
    /// Rolls a document out to many devices in waves; stops by itself when
    /// too many fail (exit 1 with a table of which device failed which check).
    Rollout(Box<cli::RolloutArgs>),
    /// Lists staged rollouts and where each stands.
    Rollouts {
        /// Print the stored states as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Deletes a deployment from a device (the device prunes what it owned).
    Delete {
        /// The device.
        #[arg(long)]
        device: DeviceId,
        /// The deployment.
        #[arg(long)]
        deployment: DeploymentName,
        /// Wait until the device reports the deployment pruned.
        #[arg(long)]
        wait: bool,
        /// Seconds to wait.
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        timeout: u64,
    },
    /// Shows what devices report: one row per device and deployment.
    Status {
        /// Only this device.
        #[arg(long)]
        device: Option<DeviceId>,
        /// Print the statuses as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Lists the devices that reported, with their agent version, host and labels.
    Devices,
    /// Asks a device's agent to answer.
    Ping {
        /// The device.
        device: DeviceId,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 5, value_name = "SECS")]
        timeout: u64,
    },
    /// Asks a device's agent to reconcile now.
    Reconcile {
        /// The device.
        device: DeviceId,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 30, value_name = "SECS")]
        timeout: u64,
    },
    /// Creates the fleet's buckets (desired state, status, artifacts) where missing.
    Init {
        /// Copies of each bucket's stream: 3 in a three-node cluster (a
        /// bucket then survives one node lost). Existing buckets with
        /// another number are changed to it. [default: 1 for new buckets,
        /// existing ones unchanged]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=5))]
        replicas: Option<u8>,
    },
    /// Artifacts: files Scores name by name and sha256 (container image archives).
    Artifact {
        #[command(subcommand)]
        action: ArtifactCommand,
    },
    /// Prints the last lines of a container the device's agent manages.
    Logs {
        /// The device.
        device: DeviceId,
        /// The container, as its Score names it.
        container: String,
        /// How many lines (at most 10000; a reply holds at most 256 KiB).
        #[arg(long, default_value_t = harmony_score_wire::DEFAULT_LOG_TAIL, value_name = "N")]
        tail: u32,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 10, value_name = "SECS")]
        timeout: u64,
    },
    /// Writes a new signing key pair: `harmony.key` (secret, 0600) and `harmony.pub`.
    Keygen {
        /// The folder to write into (created; existing key files are not overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Key sets: the online signing keys, signed by the offline root key.
    Keyset {
        #[command(subcommand)]
        action: KeysetCommand,
    },
    /// Writes a nats-server configuration with one user per device and an
    /// operator (and optionally a monitor and a commander), and each
    /// principal's connection settings (files 0600).
    NatsConfig {
        /// Device ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        devices: Vec<DeviceId>,
        /// Also a read-only `monitor` user (`monitor.env`): reads statuses,
        /// desired state, heartbeats and device info; writes nothing.
        #[arg(long)]
        monitor: bool,
        /// Also a command-only `commander` user (`commander.env`): sends
        /// device commands (ping, reconcile); reads no bucket.
        #[arg(long)]
        commander: bool,
        /// The folder to write into (created).
        #[arg(long)]
        out: PathBuf,
        /// The server address devices and the operator connect to.
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        url: String,
    },
}

#[derive(Subcommand)]
enum ArtifactCommand {
    /// Uploads a file once (nothing is sent when the bucket holds it
    /// already); prints its name, sha256 and size.
    Put {
        /// The file (`podman save -o busybox.tar IMAGE`).
        file: PathBuf,
        /// The artifact's name [default: the file's name].
        #[arg(long)]
        name: Option<String>,
        /// Replace other content already under this name (Scores naming the
        /// old digest then fail on devices that have not cached it).
        #[arg(long)]
        replace: bool,
    },
    /// Lists the artifacts: name, sha256, size.
    List,
}

#[derive(Subcommand)]
enum KeysetCommand {
    /// Signs a key set with the root key(s), offline: writes the signed key set to --out.
    Sign(cli::KeysetSignArgs),
    /// Publishes a root-signed key set to every device (its version must be
    /// above the root-signed one the fleet holds).
    Publish {
        /// The signed key set (from `keyset sign`).
        file: PathBuf,
        #[command(flatten)]
        root: cli::RootArgs,
    },
    /// Prints the root-signed key set the fleet holds (anything else under
    /// the key is ignored, with a warning).
    Show {
        #[command(flatten)]
        root: cli::RootArgs,
    },
}

fn main() -> ExitCode {
    harmony_scores::ensure_linked();
    init_logging();
    let cli = Cli::parse();
    let sign_key = cli.sign_key.clone().or_else(|| std::env::var_os("HARMONY_SIGN_KEY").map(PathBuf::from));
    let result = match cli.command {
        Command::Encode { doc, output } => cli::encode_file(&doc, output.as_deref(), sign_key.as_deref()),
        Command::Keygen { out } => cli::keygen(&out),
        Command::Keyset { action: KeysetCommand::Sign(args) } => cli::keyset_sign(&args),
        Command::Inspect { doc } => cli::inspect_file(&doc),
        Command::NatsConfig { devices, out, url, monitor, commander } => {
            cli::nats_config(&devices, &out, &url, harmony_fleet::nats_config::Roles { monitor, commander })
        }
        command => {
            run_online(command, connection(cli.nats, cli.creds, sign_key, cli.inbox_prefix, cli.trusted_keys))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Errors may quote what devices wrote: one escaped line.
            eprintln!("harmony-fleet: {}", harmony_score_wire::bounded_text(&describe(&err), 8 * 1024));
            ExitCode::from(exit_code(&err))
        }
    }
}

/// 2: the input or the request must change (bad document or invalid Score,
/// refused tags, stale or exhausted generation); 3: `--if-generation` did
/// not hold (read again and decide); 1: the fleet said no or did not answer
/// in time.
fn exit_code(err: &CliError) -> u8 {
    match err {
        CliError::Usage(_) => 2,
        CliError::Fleet(FleetError::GenerationMoved { .. }) => 3,
        CliError::Fleet(
            FleetError::UnsupportedScores { .. }
            | FleetError::NoDeviceInfo { .. }
            | FleetError::UnsupportedFeature { .. }
            | FleetError::StaleGeneration { .. }
            | FleetError::GenerationExhausted { .. }
            | FleetError::InvalidKeySet { .. }
            | FleetError::InvalidArtifact { .. }
            | FleetError::ArtifactExists { .. }
            | FleetError::ReadFailed { .. }
            | FleetError::LogsRefused { kind: Some(harmony_score_wire::LogsErrorKind::InvalidRequest), .. }
            | FleetError::EncodeFailed(_),
        ) => 2,
        CliError::Fleet(_) | CliError::Failed(_) => 1,
    }
}

fn describe(err: &CliError) -> String {
    match err {
        CliError::Usage(message) | CliError::Failed(message) => message.clone(),
        CliError::Fleet(err) => error_chain(err),
    }
}

fn connection(
    nats: Option<String>,
    creds: Option<PathBuf>,
    sign_key: Option<PathBuf>,
    inbox_prefix: Option<String>,
    trusted_keys: Vec<PathBuf>,
) -> Connection {
    let urls = nats.or_else(|| std::env::var("HARMONY_NATS").ok()).unwrap_or_else(|| DEFAULT_NATS.to_owned());
    let urls = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect();
    let inbox_prefix = inbox_prefix
        .or_else(|| std::env::var("HARMONY_INBOX_PREFIX").ok())
        .filter(|prefix| !prefix.is_empty());
    Connection { urls, creds, sign_key, inbox_prefix, trusted_keys }
}

fn run_online(command: Command, conn: Connection) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move {
        match command {
            Command::Deploy(args) => cli::deploy(&conn, args).await,
            Command::Rollout(args) => cli::rollout(&conn, *args).await,
            Command::Rollouts { json } => cli::rollouts(&conn, json).await,
            Command::Delete { device, deployment, wait, timeout } => {
                cli::delete(&conn, &device, &deployment, wait.then_some(secs(timeout))).await
            }
            Command::Status { device, json } => cli::status(&conn, device.as_ref(), json).await,
            Command::Devices => cli::devices(&conn).await,
            Command::Ping { device, timeout } => cli::command(&conn, &device, "ping", secs(timeout)).await,
            Command::Reconcile { device, timeout } => {
                cli::command(&conn, &device, "reconcile", secs(timeout)).await
            }
            Command::Init { replicas } => cli::init(&conn, replicas.map(usize::from)).await,
            Command::Artifact { action: ArtifactCommand::Put { file, name, replace } } => {
                cli::artifact_put(&conn, &file, name.as_deref(), replace).await
            }
            Command::Artifact { action: ArtifactCommand::List } => cli::artifact_list(&conn).await,
            Command::Logs { device, container, tail, timeout } => {
                cli::logs(&conn, &device, &container, tail, secs(timeout)).await
            }
            Command::Keyset { action: KeysetCommand::Publish { file, root } } => {
                cli::keyset_publish(&conn, &file, &root).await
            }
            Command::Keyset { action: KeysetCommand::Show { root } } => cli::keyset_show(&conn, &root).await,
            Command::Keyset { action: KeysetCommand::Sign(_) } => unreachable!("handled offline"),
            Command::Encode { .. }
            | Command::Inspect { .. }
            | Command::NatsConfig { .. }
            | Command::Keygen { .. } => {
                unreachable!("handled offline")
            }
        }
    })
}

fn secs(secs: u64) -> std::time::Duration {
    std::time::Duration::from_secs(secs)
}

fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("HARMONY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
