//! `harmony-fleet`: the operator's command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use harmony_score_wire::{encode, read_document_file, to_json_pretty, DecodeLimits, DesiredState};

#[derive(Parser)]
#[command(name = "harmony-fleet", version, about = "Deploys Harmony Scores to a fleet of devices")]
struct Cli {
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
}

fn main() -> ExitCode {
    harmony_scores::ensure_linked();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Encode { doc, output } => encode_file(&doc, output.as_deref()),
        Command::Inspect { doc } => inspect_file(&doc),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("harmony-fleet: {message}");
            ExitCode::from(2)
        }
    }
}

fn read_doc(path: &Path) -> Result<DesiredState, String> {
    read_document_file(path, &DecodeLimits::default()).map_err(|e| e.to_string())
}

fn encode_file(path: &Path, output: Option<&Path>) -> Result<(), String> {
    let doc = read_doc(path)?;
    let bytes = encode(&doc).map_err(|e| e.to_string())?;
    match output {
        Some(out) => std::fs::write(out, &bytes).map_err(|e| format!("cannot write {}: {e}", out.display())),
        None => std::io::stdout().write_all(&bytes).map_err(|e| e.to_string()),
    }
}

fn inspect_file(path: &Path) -> Result<(), String> {
    let doc = read_doc(path)?;
    println!("{}", to_json_pretty(&doc).map_err(|e| e.to_string())?);
    Ok(())
}
