//! `harmony-bench`: the agent measured against the floor the hardware allows,
//! in the same run. Each subcommand starts its own nats-server on loopback
//! and prints one JSON line of results last (docs/performance.md).
//!
//! ```sh
//! cargo build --release --bins
//! target/release/harmony-bench latency --count 1000
//! target/release/harmony-bench fleet --agents 1000
//! cargo build --profile release-small -p harmony-agent
//! target/release/harmony-bench footprint
//! ```

mod fleet;
mod footprint;
mod latency;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Measures the Harmony agent against the floor of the same machine.
#[derive(Parser)]
#[command(name = "harmony-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// N sequential generations to one real agent (the agent binary beside
    /// this one), from the operator's put to the operator seeing the status.
    Latency {
        #[arg(long, default_value_t = 500)]
        count: usize,
        /// Where the agent's state and root live (a tmpfs: /dev/shm).
        #[arg(long, default_value = "/tmp")]
        state_in: PathBuf,
        /// The operator signs and the agent verifies every document.
        #[arg(long)]
        signed: bool,
    },
    /// N real agents (in child processes of at most 4,000 agents each: one
    /// NATS connection, state directory and root each) receive one new
    /// generation at once.
    Fleet {
        #[arg(long, default_value_t = 100)]
        agents: usize,
        /// Where the agents' state and roots live (a tmpfs: /dev/shm).
        #[arg(long, default_value = "/tmp")]
        state_in: PathBuf,
        /// How the operator writes: `client` (FleetClient::deploy for each
        /// device, many at once, then one wait for all) or `raw` (pipelined
        /// puts of pre-encoded documents and index entries).
        #[arg(long, default_value = "client")]
        writer: fleet::Writer,
        /// A three-node hub cluster (buckets with three replicas), the
        /// agents and the floor's devices behind a leaf node, the operator
        /// on the hub.
        #[arg(long)]
        leaf: bool,
    },
    /// (Internal) a child process of `fleet`: runs agents `fleet-FIRST` to
    /// `fleet-(FIRST+COUNT-1)` until its stdin closes.
    #[command(hide = true)]
    Agents {
        #[arg(long)]
        url: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        count: usize,
    },
    /// The operator alone (no agents): writing N devices' generations
    /// through FleetClient and raw, and reading N statuses back.
    Operator {
        #[arg(long, default_value_t = 1000)]
        devices: usize,
    },
    /// The size-profile agent's binary size, idle RSS, CPU and messages.
    Footprint {
        /// The agent binary (default: `release-small/harmony-agent` in this target folder).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// How long the agent idles while CPU and messages are counted.
        #[arg(long, default_value_t = 60)]
        idle_secs: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    harmony_scores::ensure_linked();
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("harmony-bench: cannot start a runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Latency { count, state_in, signed } => latency::run(count, &state_in, signed).await,
            Command::Fleet { agents, state_in, writer, leaf } => {
                fleet::run(agents, &state_in, writer, leaf).await
            }
            Command::Operator { devices } => fleet::operator(devices).await,
            Command::Agents { url, dir, first, count } => fleet::agents(&url, &dir, first, count).await,
            Command::Footprint { agent, idle_secs } => {
                footprint::run(agent, Duration::from_secs(idle_secs)).await
            }
        }
    });
    match result {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("harmony-bench: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Thousands of agents need thousands of descriptors (a connection and two
/// state-directory locks each), here and in the nats-server child (which
/// inherits the limit). As root the hard limit is raised too.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    const WANTED: u64 = 262_144;
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit { current: Some(WANTED), maximum: Some(WANTED) };
    if limit.maximum.is_some_and(|max| max < WANTED) && setrlimit(Resource::Nofile, raised).is_ok() {
        return;
    }
    if limit.current < limit.maximum {
        let mut limit = limit;
        limit.current = limit.maximum;
        if let Err(err) = setrlimit(Resource::Nofile, limit) {
            eprintln!("harmony-bench: cannot raise the open files limit: {err}");
        }
    }
}

/// Why a measurement could not be made.
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;

/// A binary of this workspace beside this one (`target/<profile>/<name>`).
pub fn sibling_bin(name: &str) -> Result<PathBuf, BenchError> {
    let path = std::env::current_exe()?.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!("{} not found: build it first (cargo build --release --bins)", path.display()).into())
    }
}

/// The value at quantile `q` of sorted `values`.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// A field of `/proc/<pid>/status` in KiB.
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    harmony_e2e::proc_status_kib(pid, field).unwrap_or(0)
}

/// A page of a server's monitoring endpoint (`/varz`, `/connz`), as JSON.
pub fn monitoring(port: u16, page: &str) -> Result<serde_json::Value, BenchError> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(stream, "GET /{page} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response.split("\r\n\r\n").nth(1).ok_or("no HTTP body")?;
    Ok(serde_json::from_str(body)?)
}

/// Messages the server has received plus sent, all connections (`/varz`).
pub fn server_messages(port: u16) -> Result<u64, BenchError> {
    let varz = monitoring(port, "varz")?;
    Ok(varz["in_msgs"].as_u64().unwrap_or(0) + varz["out_msgs"].as_u64().unwrap_or(0))
}

/// Waits for `what` at most `limit`.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = T>,
) -> Result<T, BenchError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| format!("timed out after {limit:?} waiting for {what}").into())
}
