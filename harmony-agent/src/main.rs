//! `harmony-agent`: the device agent's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use harmony_agent::run_scores;
use harmony_score_wire::{read_document_file, registered_scores, DecodeLimits};
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
    /// Exit status: 0 when every Score is SUCCESS or NOOP, 1 when any failed,
    /// 2 when the document is rejected (nothing is applied then).
    Apply {
        /// The document.
        doc: PathBuf,
        /// Directory every Score path is resolved under.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Lists the Score tags this agent runs: tag, version, summary.
    Scores,
}

fn main() -> ExitCode {
    harmony_scores::ensure_linked();
    init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Apply { doc, root } => apply(doc, root),
        Command::Scores => {
            for reg in registered_scores() {
                println!("{}\t{}\t{}", reg.tag, reg.version(), reg.summary);
            }
            ExitCode::SUCCESS
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HARMONY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

fn apply(doc: PathBuf, root: PathBuf) -> ExitCode {
    let doc = match read_document_file(&doc, &DecodeLimits::default()) {
        Ok(doc) => doc,
        Err(err) => {
            eprintln!("harmony-agent: {err}");
            return ExitCode::from(2);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("harmony-agent: cannot start runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let maestro = match Maestro::initialize(Inventory::empty(), LocalDeviceTopology::new(root)).await {
            Ok(m) => m,
            Err(err) => {
                eprintln!("harmony-agent: {}", error_chain(&err));
                return ExitCode::FAILURE;
            }
        };
        let report = run_scores(&maestro, doc.scores.iter().map(|s| s.as_ref())).await;
        for s in &report.scores {
            println!("{}\t{}\t{}\t{}", s.tag, s.name, s.status, s.message);
        }
        if report.all_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
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
