//! The `ContainerRuntime` capability: what a topology that runs containers offers Scores.
//!
//! Named after the concept, not the tool: the podman adapter
//! ([`crate::local::Podman`]) is one implementation, and a Score bounded on
//! `ContainerRuntime` runs unchanged on any other. The types here hold what
//! a runtime needs to create a container ([`ContainerSpec`]) and what it
//! reports about one ([`ContainerState`]); parsing of the textual forms a
//! Score carries (ports, memory sizes) lives here too, so a Score validates
//! with the same code the runtime relies on.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;

/// A container to create: everything the runtime needs, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    /// The container's name, unique on the host.
    pub name: String,
    /// The image reference (`localhost/harmony-busybox:test`).
    pub image: String,
    /// The command and its arguments; empty: the image's own.
    pub command: Vec<String>,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// Published ports.
    pub ports: Vec<PortMapping>,
    /// Bind mounts.
    pub volumes: Vec<BindMount>,
    /// What the runtime does when the container exits.
    pub restart: RestartPolicy,
    /// Labels, the owner's and the caller's own (`harmony.spec`, …).
    pub labels: BTreeMap<String, String>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU limit in CPUs (`0.5`).
    pub cpus: Option<f64>,
    /// How long a stop waits after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// Run with every capability and the host's devices.
    pub privileged: bool,
    /// Which network the container joins.
    pub network: NetworkMode,
}

/// A bind mount: a directory or file of the host into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// The host path as a Score names it: absolute, resolved by the
    /// topology beneath its root (as [`crate::Filesystem`] paths are).
    pub source: String,
    /// Where it appears in the container (absolute).
    pub target: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// What the runtime does when the container's process exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum RestartPolicy {
    /// Nothing; the agent's next reconcile starts it again (the default).
    #[default]
    No,
    /// Always restart.
    Always,
    /// Restart when it exits with a non-zero code.
    OnFailure,
    /// Restart unless it was stopped by hand.
    UnlessStopped,
}

impl RestartPolicy {
    /// The name runtimes use (`on-failure`).
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::UnlessStopped => "unless-stopped",
        }
    }
}

/// The network a container joins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum NetworkMode {
    /// The runtime's default (a private network namespace with NAT).
    #[default]
    Default,
    /// The host's network namespace (a privilege: it sees every interface).
    Host,
}

/// A container as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    /// The runtime's id of the container (changes when it is recreated).
    pub id: String,
    /// Its name.
    pub name: String,
    /// The image reference it was created from.
    pub image: String,
    /// Whether it runs.
    pub status: ContainerStatus,
    /// The last exit code (meaningful once it exited).
    pub exit_code: i32,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// When its process last started, as the runtime says it (opaque: two
    /// readings differ when it started again in between).
    pub started_at: String,
    /// How often the runtime restarted it by its restart policy.
    pub restart_count: u64,
    /// The file its output is logged to, when the runtime logs to a file
    /// it can be read from directly (podman's `k8s-file`).
    pub log_file: Option<std::path::PathBuf>,
}

/// The lifecycle state of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerStatus {
    /// Created, never started.
    Created,
    /// Its process runs.
    Running,
    /// Frozen.
    Paused,
    /// Its process ended.
    Exited,
    /// Stopped by a user.
    Stopped,
    /// Any other state the runtime names (`stopping`, `removing`, …).
    Other(String),
}

impl ContainerStatus {
    /// From the runtime's lower-case name.
    pub fn from_name(name: &str) -> Self {
        match name {
            "created" | "configured" => ContainerStatus::Created,
            "running" => ContainerStatus::Running,
            "paused" => ContainerStatus::Paused,
            "exited" => ContainerStatus::Exited,
            "stopped" => ContainerStatus::Stopped,
            other => ContainerStatus::Other(other.to_owned()),
        }
    }

    /// Whether `start` alone makes it run again.
    pub fn is_startable(&self) -> bool {
        matches!(self, ContainerStatus::Created | ContainerStatus::Exited | ContainerStatus::Stopped)
    }
}

impl fmt::Display for ContainerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContainerStatus::Created => "created",
            ContainerStatus::Running => "running",
            ContainerStatus::Paused => "paused",
            ContainerStatus::Exited => "exited",
            ContainerStatus::Stopped => "stopped",
            ContainerStatus::Other(other) => other,
        })
    }
}

/// Why a container operation failed. Messages carry the runtime's own words.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContainerError {
    /// The runtime could not be run at all (not installed, not executable).
    #[error("cannot run {program}: {source}")]
    RuntimeUnavailable {
        /// The program tried.
        program: String,
        /// Why it could not start.
        #[source]
        source: std::io::Error,
    },
    /// The runtime ran and refused; `message` is what it said.
    #[error("{op} failed: {message}")]
    CommandFailed {
        /// The operation (`create web`).
        op: String,
        /// The runtime's exit code, if it exited.
        code: Option<i32>,
        /// The runtime's own message (its stderr, bounded, escaped).
        message: String,
    },
    /// The runtime did not answer in time (it was killed).
    #[error("{op} did not finish within {} s", timeout.as_secs_f64())]
    TimedOut {
        /// The operation.
        op: String,
        /// The limit it ran into.
        timeout: Duration,
    },
    /// The runtime's output could not be understood.
    #[error("{op}: unexpected output: {message}")]
    BadOutput {
        /// The operation.
        op: String,
        /// What was wrong with it.
        message: String,
    },
    /// A bind mount's host path cannot be used: it leaves the topology's
    /// root, does not exist, or is neither a directory nor a regular file.
    #[error("volume source {path:?}: {message}")]
    InvalidVolume {
        /// The path as the Score names it.
        path: String,
        /// What is wrong with it.
        message: String,
        /// Whether the path escapes the root or is malformed (as opposed to
        /// missing or unreadable).
        refused: bool,
    },
}

impl From<ContainerError> for crate::InterpretError {
    fn from(err: ContainerError) -> Self {
        use crate::InterpretErrorKind as K;
        let kind = match &err {
            ContainerError::RuntimeUnavailable { .. } => K::Unavailable,
            ContainerError::TimedOut { .. } => K::Timeout,
            ContainerError::InvalidVolume { refused: true, .. } => K::InvalidInput,
            ContainerError::InvalidVolume { refused: false, .. } => K::Io,
            _ => K::Failed,
        };
        Self::with_kind(kind, err.to_string())
    }
}

/// Containers on a topology: create, start, stop, remove and look at them
/// by name. Every operation on a name that does not exist either says so
/// (`inspect_container` → `None`) or treats it as done (`remove`).
#[async_trait]
pub trait ContainerRuntime: Send + Sync {
    /// The container called `name`, or `None` when there is none.
    async fn inspect_container(&self, name: &str) -> Result<Option<ContainerState>, ContainerError>;
    /// Whether `image` is present locally (no pull).
    async fn image_present(&self, image: &str) -> Result<bool, ContainerError>;
    /// Fetches `image` from its registry.
    async fn pull_image(&self, image: &str) -> Result<(), ContainerError>;
    /// Checks what `spec` needs of the host beyond the image (bind mount
    /// sources exist and may be used), without changing anything: a
    /// recreate checks before it removes the old container.
    async fn check_spec(&self, spec: &ContainerSpec) -> Result<(), ContainerError>;
    /// Creates the container `spec` describes from a local image (never
    /// pulling) and starts it; returns its id.
    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, ContainerError>;
    /// Starts the existing container `name`.
    async fn start(&self, name: &str) -> Result<(), ContainerError>;
    /// Stops `name`: SIGTERM (or the image's stop signal), SIGKILL after `grace`.
    async fn stop(&self, name: &str, grace: Duration) -> Result<(), ContainerError>;
    /// Removes the stopped container `name` (one still running is killed);
    /// a missing one is not an error.
    async fn remove(&self, name: &str) -> Result<(), ContainerError>;
    /// Loads the image archive at `archive` (a local file: `docker-archive`
    /// or `oci-archive`, as `podman save` writes them); returns the image
    /// references it loaded, as the runtime names them.
    async fn load_image(&self, archive: &Path) -> Result<Vec<String>, ContainerError>;
    /// The last `tail` lines the container `name` wrote (stdout and
    /// stderr, in the order the runtime kept them), at most `max_bytes` of
    /// them: older lines are dropped first, and the result says so.
    async fn logs(&self, name: &str, tail: u32, max_bytes: usize) -> Result<ContainerLogs, ContainerError>;
    /// [`logs`](Self::logs) of a container already inspected: what the
    /// inspection said (its log file) is not asked for again.
    async fn logs_of(
        &self,
        container: &ContainerState,
        tail: u32,
        max_bytes: usize,
    ) -> Result<ContainerLogs, ContainerError> {
        self.logs(&container.id, tail, max_bytes).await
    }
}

/// What [`ContainerRuntime::logs`] returns: lines without their line ends,
/// oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerLogs {
    /// The lines (invalid UTF-8 replaced).
    pub lines: Vec<String>,
    /// Older lines were dropped to stay within the byte limit.
    pub truncated: bool,
}

impl ContainerLogs {
    /// The lines of `text`, the runtime's output for the last lines asked
    /// for, keeping at most `max_bytes` of the newest whole lines.
    /// `already_cut`: the output was cut at its start before it came here.
    pub fn from_output(text: &[u8], max_bytes: usize, already_cut: bool) -> Self {
        let mut truncated = already_cut;
        let mut start = 0;
        if text.len() > max_bytes {
            truncated = true;
            start = text.len() - max_bytes;
        }
        let mut kept = &text[start..];
        // A cut start leaves a partial line: drop it.
        if truncated {
            match kept.iter().position(|&b| b == b'\n') {
                Some(end) => kept = &kept[end + 1..],
                None => kept = &[],
            }
        }
        let lines = match kept.strip_suffix(b"\n").unwrap_or(kept) {
            _ if kept.is_empty() => Vec::new(),
            body => {
                body.split(|&b| b == b'\n').map(|line| String::from_utf8_lossy(line).into_owned()).collect()
            }
        };
        Self { lines, truncated }
    }
}

/// A published port: `[ip:][host_port:]container_port[/protocol]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortMapping {
    /// The host address it listens on; `None`: every address.
    pub host_ip: Option<IpAddr>,
    /// The host port; `None`: one the runtime picks.
    pub host_port: Option<u16>,
    /// The port inside the container.
    pub container_port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

/// The protocol of a published port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// `tcp`, `udp` or `sctp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// Why a port mapping's text is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PortMappingError(String);

impl FromStr for PortMapping {
    type Err = PortMappingError;

    /// `8080`, `8080/udp`, `18080:8080`, `127.0.0.1:18080:8080`,
    /// `127.0.0.1::8080` (any host port), `[::1]:18080:8080/tcp`. Ports
    /// are 1–65535; ranges are not supported.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| {
            PortMappingError(format!("{text:?} is not [ip:][host_port:]port[/tcp|udp|sctp]: {why}"))
        };
        let (ports, protocol) = match text.rsplit_once('/') {
            Some((ports, "tcp")) => (ports, Protocol::Tcp),
            Some((ports, "udp")) => (ports, Protocol::Udp),
            Some((ports, "sctp")) => (ports, Protocol::Sctp),
            Some(_) => return Err(err("unknown protocol")),
            None => (text, Protocol::Tcp),
        };
        // An IPv6 address is bracketed: its colons are not separators.
        let (host_ip, rest) = match ports.strip_prefix('[') {
            Some(bracketed) => {
                let (ip, rest) = bracketed.split_once(']').ok_or_else(|| err("unclosed '['"))?;
                let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| err("bad IPv6 address"))?;
                let rest = rest.strip_prefix(':').ok_or_else(|| err("expected ':' after the address"))?;
                (Some(IpAddr::V6(ip)), rest)
            }
            None => match ports.matches(':').count() {
                2 => {
                    let (ip, rest) = ports.split_once(':').ok_or_else(|| err("expected ':'"))?;
                    let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| err("bad IPv4 address"))?;
                    (Some(IpAddr::V4(ip)), rest)
                }
                0 | 1 => (None, ports),
                _ => return Err(err("too many ':' (bracket an IPv6 address)")),
            },
        };
        let port = |p: &str| -> Result<u16, PortMappingError> {
            // Digits only: no sign, no spaces, no range.
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err("a port is 1 to 65535"));
            }
            match p.parse::<u16>() {
                Ok(0) | Err(_) => Err(err("a port is 1 to 65535")),
                Ok(n) => Ok(n),
            }
        };
        let (host_port, container_port) = match rest.split_once(':') {
            Some(("", container)) if host_ip.is_some() => (None, port(container)?),
            Some((host, container)) => (Some(port(host)?), port(container)?),
            None if host_ip.is_some() => return Err(err("an address needs host_port:port or :port")),
            None => (None, port(rest)?),
        };
        Ok(PortMapping { host_ip, host_port, container_port, protocol })
    }
}

impl fmt::Display for PortMapping {
    /// The form runtimes take (`127.0.0.1:18080:8080/tcp`, `[::1]::80/udp`, `8080/tcp`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(IpAddr::V4(ip)) => write!(f, "{ip}:")?,
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            None => {}
        }
        match (self.host_ip, self.host_port) {
            (_, Some(port)) => write!(f, "{port}:")?,
            (Some(_), None) => f.write_str(":")?,
            (None, None) => {}
        }
        write!(f, "{}/{}", self.container_port, self.protocol.as_str())
    }
}

/// Smallest memory limit runtimes accept (podman refuses less than 6 MiB).
pub const MIN_MEMORY_BYTES: u64 = 6 * 1024 * 1024;

/// Parses a memory size as runtimes write it: a number with an optional
/// unit `b`, `k`, `m` or `g` (powers of 1024, either case): `256m`, `1g`,
/// `1048576`. At least [`MIN_MEMORY_BYTES`], at most 1 PiB.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let err = || format!("{text:?} is not a size like 256m or 1g (at least 6m)");
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return Err(err()),
    };
    if digits.is_empty() || digits.len() > 16 {
        return Err(err());
    }
    let bytes = digits.parse::<u64>().ok().and_then(|n| n.checked_mul(scale)).ok_or_else(err)?;
    if !(MIN_MEMORY_BYTES..=1 << 50).contains(&bytes) {
        return Err(err());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mappings_parse_and_print_in_the_runtimes_form() {
        for (text, printed) in [
            ("8080", "8080/tcp"),
            ("8080/udp", "8080/udp"),
            ("18080:8080", "18080:8080/tcp"),
            ("127.0.0.1:18080:8080", "127.0.0.1:18080:8080/tcp"),
            ("127.0.0.1::8080/sctp", "127.0.0.1::8080/sctp"),
            ("[::1]:18080:8080", "[::1]:18080:8080/tcp"),
            ("[::]::53/udp", "[::]::53/udp"),
            ("65535:1", "65535:1/tcp"),
        ] {
            let parsed: PortMapping = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(parsed.to_string(), printed);
            assert_eq!(printed.parse::<PortMapping>().unwrap(), parsed, "{printed} round-trips");
        }
        let full: PortMapping = "127.0.0.1:18080:8080/udp".parse().unwrap();
        assert_eq!(
            full,
            PortMapping {
                host_ip: Some("127.0.0.1".parse().unwrap()),
                host_port: Some(18080),
                container_port: 8080,
                protocol: Protocol::Udp
            }
        );
    }

    #[test]
    fn bad_port_mappings_are_refused() {
        for bad in [
            "",
            "0",
            "65536",
            "80/icmp",
            "80/",
            "-1",
            "+80",
            " 80",
            "80 ",
            "8000-8010",
            "a:80",
            "1.2.3:80:80",
            "1.2.3.4:80",
            "::1:80:80",
            "[::1]:80",
            "[::1:80:80",
            "1:2:3:4",
            "127.0.0.1:0:80",
            "x/tcp",
            "127.0.0.1:80:80:",
            "080808",
        ] {
            assert!(bad.parse::<PortMapping>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn memory_sizes_are_a_number_and_a_binary_unit() {
        assert_eq!(parse_memory("256m"), Ok(256 << 20));
        assert_eq!(parse_memory("1G"), Ok(1 << 30));
        assert_eq!(parse_memory("6291456"), Ok(6 << 20));
        assert_eq!(parse_memory("8192k"), Ok(8 << 20));
        for bad in ["", "m", "5m", "1.5g", "256mb", "256 m", "-1g", "1t", "99999999999999999g", "0"] {
            assert!(parse_memory(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn logs_keep_the_newest_whole_lines_within_the_byte_limit() {
        let logs = ContainerLogs::from_output(b"one\ntwo\nthree\n", 100, false);
        assert_eq!(
            (logs.lines, logs.truncated),
            (vec!["one".to_owned(), "two".into(), "three".into()], false)
        );
        let logs = ContainerLogs::from_output(b"one\ntwo\nthree\n", 9, false);
        assert_eq!((logs.lines, logs.truncated), (vec!["three".to_owned()], true));
        let logs = ContainerLogs::from_output(b"no end", 100, false);
        assert_eq!(logs.lines, ["no end"]);
        let logs = ContainerLogs::from_output(b"", 100, false);
        assert!(logs.lines.is_empty() && !logs.truncated);
        let logs = ContainerLogs::from_output(b"a very long line\n", 4, false);
        assert!(logs.lines.is_empty() && logs.truncated);
        let logs = ContainerLogs::from_output(b"partial\nwhole\n", 100, true);
        assert_eq!((logs.lines, logs.truncated), (vec!["whole".to_owned()], true));
        let logs = ContainerLogs::from_output(b"\xff\n", 100, false);
        assert_eq!(logs.lines, ["\u{fffd}"]);
        let logs = ContainerLogs::from_output(b"a\n\nb\n", 100, false);
        assert_eq!(logs.lines, ["a", "", "b"]);
    }

    #[test]
    fn statuses_name_what_start_can_fix() {
        for (name, startable) in
            [("created", true), ("exited", true), ("stopped", true), ("running", false), ("paused", false)]
        {
            assert_eq!(ContainerStatus::from_name(name).is_startable(), startable, "{name}");
            assert_eq!(ContainerStatus::from_name(name).to_string(), name);
        }
        assert_eq!(ContainerStatus::from_name("removing"), ContainerStatus::Other("removing".into()));
    }
}
