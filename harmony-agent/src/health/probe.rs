//! One attempt at one health check, through the topology's capabilities (files beneath its root, its container runtime, its service manager) or a loopback socket.
//!
//! Every attempt is bounded in time by its caller. Text that comes from
//! outside (a server's status line, a tool's error) is bounded and escaped
//! before it reaches a status.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use harmony_score_wire::health::HttpTarget;
use harmony_score_wire::{bounded_text, CheckState, MAX_MESSAGE_BYTES};
use harmony_topology::local::MAX_INSPECT_BYTES;
use harmony_topology::{
    ContainerRuntime, ContainerStatus, Filesystem, LocalDeviceTopology, PathEntry, ServiceManager,
    ServiceRuntime,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most an HTTP check reads of a reply: its status line must fit.
const MAX_STATUS_LINE_BYTES: usize = 1024;

/// What one attempt saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Held, blocked, or pending (not yet: try again).
    pub state: CheckState,
    /// What it saw, for people.
    pub output: String,
}

impl Seen {
    fn held(output: impl AsRef<str>) -> Self {
        Self { state: CheckState::Held, output: bounded_text(output.as_ref(), MAX_MESSAGE_BYTES) }
    }

    fn not_yet(output: impl AsRef<str>) -> Self {
        Self { state: CheckState::Pending, output: bounded_text(output.as_ref(), MAX_MESSAGE_BYTES) }
    }

    fn blocked(output: impl AsRef<str>) -> Self {
        Self { state: CheckState::Blocked, output: bounded_text(output.as_ref(), MAX_MESSAGE_BYTES) }
    }
}

/// A TCP connection to `addr` is accepted (and closed at once).
pub async fn tcp(addr: SocketAddr) -> Seen {
    match TcpStream::connect(addr).await {
        Ok(_) => Seen::held(format!("connected to {addr}")),
        Err(err) => Seen::not_yet(format!("connect {addr}: {err}")),
    }
}

/// An HTTP/1.0 GET of `target` answers `expected`. Only the status line is
/// read: the body can be anything and any size.
pub async fn http(target: &HttpTarget, expected: u16) -> Seen {
    match http_status_line(target).await {
        Ok(line) => match status_code(&line) {
            Some(code) if code == expected => Seen::held(line),
            Some(_) => Seen::not_yet(format!("{line} (expected {expected})")),
            None => Seen::not_yet(format!("not an HTTP reply: {line:?}")),
        },
        Err(err) => Seen::not_yet(format!("GET http://{}{}: {err}", target.host, target.path)),
    }
}

async fn http_status_line(target: &HttpTarget) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(target.addr).await?;
    // The path and host were validated as printable ASCII without spaces:
    // they cannot end the request line or add a header.
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: harmony-agent/{}\r\nConnection: close\r\n\r\n",
        target.path,
        target.host,
        crate::AGENT_VERSION
    );
    stream.write_all(request.as_bytes()).await?;
    let mut reply = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !reply.contains(&b'\n') && reply.len() < MAX_STATUS_LINE_BYTES {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..n]);
    }
    let line = reply.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let line = line.trim_end_matches('\r');
    if line.is_empty() {
        return Err(std::io::Error::other("the server closed the connection without a reply"));
    }
    Ok(bounded_text(line, 256))
}

/// The code of a status line `HTTP/1.x NNN reason`.
fn status_code(line: &str) -> Option<u16> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    let code = parts.next()?;
    let digits = code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit());
    (version.starts_with("HTTP/") && digits).then(|| code.parse().ok()).flatten()
}

/// The regular file at `path`, read through the topology (beneath its
/// root, never following a link at the last component), has `sha256`.
pub async fn file_sha256(topology: &LocalDeviceTopology, path: &str, sha256: &str) -> Seen {
    match topology.inspect(path).await {
        Ok(PathEntry::File { content, .. }) if content.len() as u64 > MAX_INSPECT_BYTES => Seen::not_yet(
            format!("{path} is larger than {} MiB: too large to check", MAX_INSPECT_BYTES >> 20),
        ),
        Ok(PathEntry::File { content, .. }) => {
            let actual = hex(&Sha256::digest(&content));
            if actual == sha256 {
                Seen::held(format!("{path}: sha256 matches ({} bytes)", content.len()))
            } else {
                Seen::not_yet(format!("{path}: sha256 is {actual}"))
            }
        }
        Ok(PathEntry::Missing) => Seen::not_yet(format!("{path} does not exist")),
        Ok(PathEntry::Directory { .. } | PathEntry::Other) => {
            Seen::not_yet(format!("{path} is not a regular file"))
        }
        Err(err) => Seen::not_yet(err.to_string()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a `container_running` check remembers between attempts: the start
/// it saw (the container's id, start time and restart count) and since when.
#[derive(Debug, Clone, Default)]
pub struct ContainerWatch {
    seen: Option<((String, String, u64), Instant)>,
}

/// The container `name` runs, unchanged (same container, same start, no
/// restart) for at least `stable` of what this watch saw.
pub async fn container_running(
    topology: &LocalDeviceTopology,
    name: &str,
    stable: Duration,
    watch: &mut ContainerWatch,
    now: Instant,
) -> Seen {
    let state = match topology.inspect_container(name).await {
        Ok(Some(state)) => state,
        Ok(None) => {
            watch.seen = None;
            return Seen::not_yet(format!("no container named {name}"));
        }
        Err(err) => return Seen::not_yet(err.to_string()),
    };
    if state.status != ContainerStatus::Running {
        watch.seen = None;
        return Seen::not_yet(format!("{name} is {} (exit code {})", state.status, state.exit_code));
    }
    let start = (state.id, state.started_at, state.restart_count);
    let since = match &watch.seen {
        Some((seen, since)) if *seen == start => *since,
        _ => {
            // A new start (or the first look): stability counts from here.
            watch.seen = Some((start, now));
            now
        }
    };
    let up = now.saturating_duration_since(since);
    if up >= stable {
        Seen::held(format!("{name} is running (seen up {} s without a restart)", up.as_secs()))
    } else {
        Seen::not_yet(format!("{name} is running, up {} s of {} s", up.as_secs(), stable.as_secs()))
    }
}

/// The unit is `active`; blocked where no service manager runs for the
/// topology's root (nothing there could make it active: as a Score that
/// cannot start a unit there is BLOCKED, not failed).
pub async fn unit_active(topology: &LocalDeviceTopology, unit: &str) -> Seen {
    if let ServiceRuntime::Offline { reason } = topology.service_runtime().await {
        return Seen::blocked(format!("cannot tell whether {unit} is active: {reason}"));
    }
    match topology.unit_state(unit).await {
        Ok(state) if state.active_state == "active" => {
            Seen::held(format!("{unit} is active ({})", state.sub_state))
        }
        Ok(state) => Seen::not_yet(format!("{unit} is {} ({})", state.active_state, state.sub_state)),
        Err(err) => Seen::not_yet(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read_strictly() {
        assert_eq!(status_code("HTTP/1.1 200 OK"), Some(200));
        assert_eq!(status_code("HTTP/1.0 404 Not Found"), Some(404));
        assert_eq!(status_code("HTTP/1.0 204"), Some(204));
        for bad in ["", "200", "HTTP/1.1", "HTTP/1.1 2000 x", "SSH-2.0-OpenSSH 200 x", "HTTP/1.1 +20 x"] {
            assert_eq!(status_code(bad), None, "{bad:?}");
        }
    }
}
