//! `harmony-agent`: the device agent's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use harmony_agent::{run_scores, ConfigLayer};
use harmony_score_wire::{registered_scores, DecodeLimits};
use harmony_topology::{Inventory, LocalDeviceTopology, Maestro};

#[derive(Parser)]
#[command(name = "harmony-agent", version, about = "Runs Harmony Scores on this device")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one desired-state document (CBOR, or JSON when it ends in .json) now.
    ///
    /// Exit status: 0 when no Score failed (each is SUCCESS, NOOP or BLOCKED), 1 when any failed,
    /// 2 when the document is rejected (nothing is applied then).
    Apply {
        /// The document.
        doc: PathBuf,
        /// Directory every Score path is resolved under.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Require a signature by this public key (repeatable), as the daemon does.
        #[arg(long = "trusted-key")]
        trusted_keys: Vec<PathBuf>,
        /// Require the document to be for this device.
        #[arg(long)]
        device_id: Option<String>,
        /// Apply the `[policy]` table of this agent configuration file (its
        /// other settings are not read). Without it: every registered tag,
        /// any path, no privileges (no setuid, no privileged containers).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
    },
    /// Lists the Score tags this agent runs: tag, version, summary.
    Scores,
    /// Runs the agent daemon: follows this device's desired state and keeps it applied.
    Run(Box<RunArgs>),
}

/// Flags of `run`; each overrides the same setting of `--config`.
#[derive(clap::Args)]
struct RunArgs {
    /// TOML configuration file (see docs/agent.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// This device's id (RFC 1123 label).
    #[arg(long)]
    device_id: Option<String>,
    /// NATS server URLs, comma-separated.
    #[arg(long)]
    nats: Option<String>,
    /// NATS credentials file.
    #[arg(long)]
    creds: Option<PathBuf>,
    /// Where accepted desired state is persisted.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Directory every Score path is resolved under (default /).
    #[arg(long)]
    root: Option<PathBuf>,
    /// The podman binary container Scores run (default `podman` from PATH).
    #[arg(long)]
    podman: Option<PathBuf>,
    /// Seconds between full re-reads and drift repair (default 60).
    #[arg(long)]
    resync: Option<u64>,
    /// Seconds between heartbeats (default 30).
    #[arg(long)]
    heartbeat: Option<u64>,
    /// Do not follow changes live; read keys only at connect and on resync
    /// (for a bucket made without republished hints).
    #[arg(long)]
    resync_only: bool,
    /// `nats` (default) or `dir:PATH` for a folder of documents.
    #[arg(long)]
    source: Option<String>,
    /// A label published in the device info, `key=value`; repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Most deployments running at once (default 4).
    #[arg(long)]
    max_parallel: Option<usize>,
    /// Seconds one Interpret may run before it fails as `timeout` (default 300).
    #[arg(long)]
    interpret_timeout: Option<u64>,
    /// A public key file whose signatures this device accepts; repeatable.
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<PathBuf>,
    /// Accept unsigned documents (logs a warning at every start).
    #[arg(long)]
    allow_unsigned: bool,
    /// A root public key file whose key sets this device accepts; repeatable.
    #[arg(long = "root-key")]
    root_keys: Vec<PathBuf>,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("label {text:?} is not key=value"))
}

fn main() -> ExitCode {
    harmony_scores::ensure_linked();
    init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Apply { doc, root, trusted_keys, device_id, policy } => {
            apply(doc, root, &trusted_keys, device_id, policy.as_deref())
        }
        Command::Run(args) => run(*args),
        Command::Scores => {
            for reg in registered_scores() {
                println!("{}\t{}\t{}", reg.tag, reg.version(), reg.summary);
            }
            ExitCode::SUCCESS
        }
    }
}

/// Logs to stderr, filtered by `HARMONY_LOG` (`info` by default): a level
/// (`debug`) or `target=level` pairs (`harmony_agent=debug,async_nats=warn`).
/// A `Targets` filter, not an `EnvFilter`: no regex engine in the agent's
/// binary (about 0.5 MiB of it), and no span-field filters, which no one used.
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, refused) = match std::env::var("HARMONY_LOG") {
        Ok(text) => match text.parse::<tracing_subscriber::filter::Targets>() {
            Ok(filter) => (filter, None),
            Err(err) => (default_filter(), Some((text, err))),
        },
        Err(_) => (default_filter(), None),
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        )
        .with(filter)
        .init();
    if let Some((text, err)) = refused {
        tracing::warn!(
            value = %harmony_score_wire::log_text(&text),
            error = %err,
            "HARMONY_LOG is not a filter (a level, or target=level pairs); logging at info"
        );
    }
}

fn default_filter() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
}

/// Runs `work` on a single-threaded runtime (the agent is small; file work
/// goes to the blocking pool).
fn block_on(work: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(work),
        Err(err) => {
            eprintln!("harmony-agent: cannot start runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

fn apply(
    path: PathBuf,
    root: PathBuf,
    trusted_keys: &[PathBuf],
    device_id: Option<String>,
    policy: Option<&std::path::Path>,
) -> ExitCode {
    let refuse = |message: String| {
        // The message may quote the document (an unknown tag): one escaped line.
        eprintln!("harmony-agent: {}: rejected: {}", path.display(), cli_text(&message));
        ExitCode::from(2)
    };
    let policy = match policy.map(harmony_agent::DevicePolicy::from_config_file).transpose() {
        Ok(policy) => policy.unwrap_or_default(),
        Err(err) => {
            eprintln!("harmony-agent: {err}");
            return ExitCode::from(2);
        }
    };
    // Read once, bounded; what is verified is what is decoded.
    let limits = DecodeLimits::default();
    let bytes = {
        use std::io::Read;
        let mut bytes = Vec::new();
        let read = std::fs::File::open(&path)
            .and_then(|f| f.take(limits.max_bytes as u64 + 64 * 1024).read_to_end(&mut bytes));
        if let Err(err) = read {
            return refuse(format!("cannot read: {err}"));
        }
        bytes
    };
    let json = harmony_score_wire::is_json_path(&path);
    // The daemon's decision: with keys, only a signature by one of them;
    // without, apply is the device owner's own act and opens any envelope.
    let payload = if trusted_keys.is_empty() {
        if json {
            bytes
        } else {
            harmony_score_wire::payload_of(&bytes).unwrap_or(bytes)
        }
    } else {
        let trust = match harmony_agent::load_trusted_keys(trusted_keys.to_vec(), None) {
            Ok(trust) => trust,
            Err(err) => return refuse(err.to_string()),
        };
        let opened =
            if json { Err(harmony_score_wire::SignatureError::Unsigned) } else { trust.open(&bytes, false) };
        match opened {
            Ok(payload) => payload,
            Err(err) => return refuse(format!("{}: {err}", err.kind())),
        }
    };
    let decoded = if json {
        harmony_score_wire::decode_json(&payload, &limits)
    } else {
        harmony_score_wire::decode(&payload, &limits)
    };
    let doc = match decoded {
        Ok(doc) => doc,
        Err(err) => return refuse(format!("{}: {err}", err.kind())),
    };
    if let Some(device) = &device_id {
        if doc.device_id.as_str() != device {
            return refuse(format!("wrong_device: the document is for {}", doc.device_id));
        }
    }
    if let Some(expires_at) = doc.expires_at {
        if expires_at <= harmony_score_wire::now_ms() / 1000 {
            return refuse(format!("expired: at {expires_at} (seconds since the epoch)"));
        }
    }
    // HARMONY_PODMAN names another podman binary, as for the daemon's `podman` setting.
    let topology = match std::env::var_os("HARMONY_PODMAN") {
        Some(podman) => LocalDeviceTopology::new(root).with_podman(harmony_topology::Podman::new(podman)),
        None => LocalDeviceTopology::new(root),
    };
    // The daemon's policy decision, before anything of the document runs.
    if let Some(message) = harmony_agent::policy_refusal(&topology, &policy, &doc) {
        return refuse(format!("policy_denied: {message}"));
    }
    block_on(async {
        let maestro = match Maestro::initialize(Inventory::empty(), topology).await {
            Ok(m) => m,
            Err(err) => {
                eprintln!("harmony-agent: {}", cli_text(&error_chain(&err)));
                return ExitCode::FAILURE;
            }
        };
        let report = run_scores(&maestro, doc.scores.iter().map(|s| s.as_ref())).await;
        for s in &report.scores {
            println!("{}\t{}\t{}\t{}", s.tag, s.name, s.status, s.message);
        }
        if !report.all_ok() {
            return ExitCode::FAILURE;
        }
        // A document with checks: run them as the daemon would (no rollback here).
        let Ok(Some(plan)) = doc.health_plan() else { return ExitCode::SUCCESS };
        let checks = harmony_agent::run_checks(maestro.topology(), &plan).await;
        for c in &checks {
            println!("check\t{}\t{}\t{}\t{}", c.check, c.source, c.state.as_str(), c.output);
        }
        if checks.iter().any(|c| c.state == harmony_score_wire::CheckState::Failed) {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// `text` as one line for stderr: control characters escaped, at most 8 KiB.
fn cli_text(text: &str) -> String {
    harmony_score_wire::bounded_text(text, 8 * 1024)
}

/// `outer: cause: root cause`, for one line on stderr.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn run(args: RunArgs) -> ExitCode {
    let file = match &args.config {
        Some(path) => match ConfigLayer::from_file(path) {
            Ok(layer) => layer,
            Err(err) => {
                eprintln!("harmony-agent: {err}");
                return ExitCode::from(2);
            }
        },
        None => ConfigLayer::default(),
    };
    let flags = ConfigLayer {
        device_id: args.device_id,
        nats: args.nats.map(|n| vec![n]),
        creds: args.creds,
        state_dir: args.state_dir,
        root: args.root,
        podman: args.podman,
        resync_secs: args.resync,
        heartbeat_secs: args.heartbeat,
        follow_hints: args.resync_only.then_some(false),
        source: args.source,
        labels: args.labels.into_iter().collect(),
        max_parallel: args.max_parallel,
        interpret_timeout_secs: args.interpret_timeout,
        trusted_keys: (!args.trusted_keys.is_empty()).then_some(args.trusted_keys),
        allow_unsigned: args.allow_unsigned.then_some(true),
        root_keys: (!args.root_keys.is_empty()).then_some(args.root_keys),
        ..Default::default()
    };
    let config = match file.overridden_by(flags).resolve() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("harmony-agent: {err}");
            return ExitCode::from(2);
        }
    };
    block_on(async {
        match harmony_agent::run(config, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("harmony-agent: {}", cli_text(&error_chain(&err)));
                ExitCode::FAILURE
            }
        }
    })
}

/// Resolves on the first SIGTERM or SIGINT (graceful: runs stop at a Score
/// boundary); a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tokio::spawn(async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                eprintln!("harmony-agent: second signal, exiting now");
                std::process::exit(130);
            });
        }
        _ => {
            // Without signal handlers, fall back to Ctrl-C alone.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
