//! The podman adapter of `ContainerRuntime`, and the capability on `LocalDeviceTopology`.
//!
//! Podman is driven through its CLI: one process per operation, arguments
//! passed as a vector (never through a shell), environment values through a
//! private `--env-file` (never on a command line other users can read),
//! JSON output parsed with serde. Every call has a time limit, reads at
//! most a bounded amount of output, and kills podman if the caller stops
//! waiting (the agent drops an Interpret that ran out of time).

use std::ffi::OsString;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rustix::fs::{statat, AtFlags, FileType};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::beneath::{Beneath, BeneathError};
use super::{paths, podman_logs, LocalDeviceTopology};
use crate::container::{
    ContainerError, ContainerLogs, ContainerRuntime, ContainerSpec, ContainerState, ContainerStatus,
};
use crate::{bounded_text, NetworkMode};

/// Most bytes of podman's stdout one call keeps (`inspect` of one
/// container is a few KiB).
const MAX_STDOUT_BYTES: usize = 4 << 20;
/// Most bytes of podman's stderr one call keeps.
const MAX_STDERR_BYTES: usize = 64 << 10;
/// Longest podman message an error carries.
const MAX_MESSAGE_BYTES: usize = 1024;

/// The podman CLI: which binary, and how long its calls may take.
#[derive(Debug, Clone)]
pub struct Podman {
    program: PathBuf,
    call_timeout: Duration,
    pull_timeout: Duration,
}

impl Default for Podman {
    /// `podman` from `PATH`, 60 s per call, 10 min per pull.
    fn default() -> Self {
        Self {
            program: PathBuf::from("podman"),
            call_timeout: Duration::from_secs(60),
            pull_timeout: Duration::from_secs(600),
        }
    }
}

/// What one podman call left behind.
#[derive(Debug)]
struct Output {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Output {
    /// Podman's own words: its `Error:` lines (warnings dropped), else all
    /// of stderr, escaped and bounded.
    fn message(&self) -> String {
        let stderr = String::from_utf8_lossy(&self.stderr);
        let errors: Vec<&str> =
            stderr.lines().filter_map(|line| line.strip_prefix("Error: ")).map(str::trim).collect();
        let text = if errors.is_empty() { stderr.trim().to_owned() } else { errors.join("; ") };
        let text = if text.is_empty() { format!("exit status {:?}, no message", self.code) } else { text };
        bounded_text(&text, MAX_MESSAGE_BYTES)
    }

    fn is_missing_container(&self) -> bool {
        String::from_utf8_lossy(&self.stderr).contains("no such container")
    }
}

impl Podman {
    /// The podman binary at `program` (a path, or a name looked up in `PATH`).
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self { program: program.into(), ..Self::default() }
    }

    /// The binary this adapter runs.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// How long one call (inspect, create, start, remove) may take; a stop
    /// gets its grace period on top.
    #[must_use]
    pub fn call_timeout(self, timeout: Duration) -> Self {
        Self { call_timeout: timeout, ..self }
    }

    /// How long an image pull may take.
    #[must_use]
    pub fn pull_timeout(self, timeout: Duration) -> Self {
        Self { pull_timeout: timeout, ..self }
    }

    /// Runs podman with `args` under `timeout`; a non-zero exit is returned,
    /// not an error.
    async fn call(&self, op: &str, args: Vec<OsString>, timeout: Duration) -> Result<Output, ContainerError> {
        let mut child = Command::new(&self.program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A caller that stops waiting (a timeout, a dropped Interpret)
            // must not leave podman running on its own.
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ContainerError::RuntimeUnavailable {
                program: self.program.display().to_string(),
                source,
            })?;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let run = async {
            let (stdout, stderr, status) = tokio::join!(
                read_bounded(stdout, MAX_STDOUT_BYTES),
                read_bounded(stderr, MAX_STDERR_BYTES),
                child.wait()
            );
            Ok::<_, io::Error>(Output { code: status?.code(), stdout: stdout?, stderr: stderr? })
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(err)) => Err(ContainerError::CommandFailed {
                op: op.to_owned(),
                code: None,
                message: bounded_text(&format!("reading podman's output: {err}"), MAX_MESSAGE_BYTES),
            }),
            // Dropping `child` kills podman (kill_on_drop).
            Err(_) => Err(ContainerError::TimedOut { op: op.to_owned(), timeout }),
        }
    }

    /// Like [`Podman::call`], with a non-zero exit as [`ContainerError::CommandFailed`].
    async fn call_ok(
        &self,
        op: &str,
        args: Vec<OsString>,
        timeout: Duration,
    ) -> Result<Output, ContainerError> {
        let output = self.call(op, args, timeout).await?;
        if output.code == Some(0) {
            Ok(output)
        } else {
            Err(failed(op, &output))
        }
    }
}

fn failed(op: &str, output: &Output) -> ContainerError {
    ContainerError::CommandFailed { op: op.to_owned(), code: output.code, message: output.message() }
}

/// Reads `from` to its end, keeping at most `limit` bytes: the rest is read
/// and dropped, so podman never blocks on a full pipe.
async fn read_bounded(from: Option<impl AsyncRead + Unpin>, limit: usize) -> io::Result<Vec<u8>> {
    let Some(mut from) = from else { return Ok(Vec::new()) };
    let mut kept = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = from.read(&mut chunk).await?;
        if n == 0 {
            return Ok(kept);
        }
        let room = limit.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..n.min(room)]);
    }
}

fn args<const N: usize>(fixed: [&str; N]) -> Vec<OsString> {
    fixed.iter().map(OsString::from).collect()
}

/// `podman container inspect` of one container, as much of it as we read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Inspected {
    id: String,
    name: String,
    #[serde(default)]
    image_name: String,
    state: InspectedState,
    config: InspectedConfig,
    #[serde(default)]
    restart_count: u64,
    #[serde(default)]
    host_config: Option<InspectedHostConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedHostConfig {
    #[serde(default)]
    log_config: Option<InspectedLogConfig>,
}

/// Where the container's output is logged.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedLogConfig {
    #[serde(default, rename = "Type")]
    driver: String,
    #[serde(default)]
    path: String,
}

impl Inspected {
    /// The container's log file, when it logs to one in the `k8s-file` format.
    fn k8s_log_file(&self) -> Option<PathBuf> {
        let log = self.host_config.as_ref()?.log_config.as_ref()?;
        let path = Path::new(&log.path);
        (log.driver == "k8s-file" && path.is_absolute()).then(|| path.to_owned())
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedState {
    status: String,
    #[serde(default)]
    exit_code: i32,
    #[serde(default)]
    started_at: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectedConfig {
    #[serde(default)]
    labels: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    image: String,
}

impl From<Inspected> for ContainerState {
    fn from(c: Inspected) -> Self {
        let log_file = c.k8s_log_file();
        ContainerState {
            id: c.id,
            name: c.name,
            image: if c.image_name.is_empty() { c.config.image } else { c.image_name },
            status: ContainerStatus::from_name(&c.state.status),
            exit_code: c.state.exit_code,
            labels: c.config.labels.unwrap_or_default(),
            log_file,
            started_at: c.state.started_at,
            restart_count: c.restart_count,
        }
    }
}

/// An environment file only the agent's user can read, removed on drop.
struct EnvFile(PathBuf);

impl EnvFile {
    /// `KEY=value` lines; keys and values were validated (no `=` in a key,
    /// no newline or NUL anywhere).
    async fn write(env: &std::collections::BTreeMap<String, String>) -> Result<Self, ContainerError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(".harmony-env.{}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        let mut content = String::new();
        for (key, value) in env {
            if key.contains(['=', '\n', '\0']) || value.contains(['\n', '\r', '\0']) {
                return Err(ContainerError::CommandFailed {
                    op: "create".into(),
                    code: None,
                    message: bounded_text(&format!("environment variable {key:?} cannot be passed"), 256),
                });
            }
            content.push_str(&format!("{key}={value}\n"));
        }
        let io_err = |err: io::Error| ContainerError::CommandFailed {
            op: "create".into(),
            code: None,
            message: format!("writing the environment file {}: {err}", path.display()),
        };
        // O_EXCL: never through a link or into a file someone else made.
        let mut opened = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await
            .map_err(io_err)?;
        let file = EnvFile(path.clone());
        tokio::io::AsyncWriteExt::write_all(&mut opened, content.as_bytes()).await.map_err(io_err)?;
        tokio::io::AsyncWriteExt::flush(&mut opened).await.map_err(io_err)?;
        Ok(file)
    }
}

impl Drop for EnvFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `podman create` arguments for `spec`, whose volume sources are host paths.
fn create_args(spec: &ContainerSpec, env_file: Option<&Path>) -> Vec<OsString> {
    let mut a = args(["create", "--name", &spec.name, "--pull", "never"]);
    let mut push = |flag: &str, value: OsString| {
        a.push(flag.into());
        a.push(value);
    };
    push("--stop-timeout", spec.stop_timeout.as_secs().to_string().into());
    push("--restart", spec.restart.as_str().into());
    for (key, value) in &spec.labels {
        push("--label", format!("{key}={value}").into());
    }
    if let Some(path) = env_file {
        push("--env-file", path.into());
    }
    for port in &spec.ports {
        push("--publish", port.to_string().into());
    }
    for volume in &spec.volumes {
        let mut value = OsString::from(&volume.source);
        value.push(":");
        value.push(&volume.target);
        // Devices and setuid programs on a bind mount are never honoured
        // in the container (a container cannot plant a device node or a
        // setuid helper for itself there).
        value.push(if volume.read_only { ":ro,nosuid,nodev" } else { ":nosuid,nodev" });
        push("--volume", value);
    }
    if let Some(bytes) = spec.memory_bytes {
        push("--memory", bytes.to_string().into());
    }
    if let Some(cpus) = spec.cpus {
        push("--cpus", cpus.to_string().into());
    }
    if spec.network == NetworkMode::Host {
        push("--network", "host".into());
    }
    if spec.privileged {
        a.push("--privileged".into());
    } else {
        // No process in the container gains privileges through setuid or
        // file capabilities (the policy's `privileged_container` is the
        // switch for a container that needs them).
        push("--security-opt", "no-new-privileges".into());
    }
    // Everything after the image is the container's command.
    a.push("--".into());
    a.push((&spec.image).into());
    a.extend(spec.command.iter().map(OsString::from));
    a
}

/// Podman on the host itself: volume sources are host paths as given.
#[async_trait]
impl ContainerRuntime for Podman {
    async fn inspect_container(&self, name: &str) -> Result<Option<ContainerState>, ContainerError> {
        Ok(self.inspect(name).await?.map(ContainerState::from))
    }

    async fn image_present(&self, image: &str) -> Result<bool, ContainerError> {
        let op = format!("image exists {image}");
        let output = self.call(&op, args(["image", "exists", "--", image]), self.call_timeout).await?;
        match output.code {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(failed(&op, &output)),
        }
    }

    async fn pull_image(&self, image: &str) -> Result<(), ContainerError> {
        let op = format!("pull {image}");
        self.call_ok(&op, args(["pull", "--quiet", "--", image]), self.pull_timeout).await.map(drop)
    }

    /// Nothing to check: sources are host paths, which podman checks.
    async fn check_spec(&self, _spec: &ContainerSpec) -> Result<(), ContainerError> {
        Ok(())
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, ContainerError> {
        let env_file = match spec.env.is_empty() {
            true => None,
            false => Some(EnvFile::write(&spec.env).await?),
        };
        let op = format!("create {}", spec.name);
        let args = create_args(spec, env_file.as_ref().map(|f| f.0.as_path()));
        let created = self.call_ok(&op, args, self.call_timeout).await?;
        drop(env_file);
        let id = String::from_utf8_lossy(&created.stdout).trim().to_owned();
        // A failed start leaves the container created: the next run starts
        // it again and reports the same reason.
        self.start(&spec.name).await?;
        Ok(id)
    }

    async fn start(&self, name: &str) -> Result<(), ContainerError> {
        self.call_ok(&format!("start {name}"), args(["start", "--", name]), self.call_timeout).await.map(drop)
    }

    async fn stop(&self, name: &str, grace: Duration) -> Result<(), ContainerError> {
        let op = format!("stop {name}");
        let secs = grace.as_secs().to_string();
        let output =
            self.call(&op, args(["stop", "--time", &secs, "--", name]), grace + self.call_timeout).await?;
        match output.code {
            Some(0) => Ok(()),
            _ if output.is_missing_container() => Ok(()),
            _ => Err(failed(&op, &output)),
        }
    }

    async fn remove(&self, name: &str) -> Result<(), ContainerError> {
        let op = format!("remove {name}");
        let args = args(["rm", "--force", "--ignore", "--time", "0", "--", name]);
        self.call_ok(&op, args, self.call_timeout).await.map(drop)
    }

    /// `podman load --input FILE`, under the pull time limit; the names
    /// come from its `Loaded image: …` lines.
    async fn load_image(&self, archive: &Path) -> Result<Vec<String>, ContainerError> {
        let op = format!("load {}", archive.display());
        let mut load = args(["load", "--input"]);
        load.push(archive.into());
        let output = self.call_ok(&op, load, self.pull_timeout).await?;
        Ok(loaded_images(&String::from_utf8_lossy(&output.stdout)))
    }

    /// The container's log file read directly when it is a `k8s-file` log
    /// (see `podman_logs`: podman 4.3 prints lines logged in parts
    /// wrongly); otherwise, or when that file cannot be read,
    /// `podman logs --tail N -- NAME`.
    async fn logs(&self, name: &str, tail: u32, max_bytes: usize) -> Result<ContainerLogs, ContainerError> {
        let log_file = self.inspect(name).await?.and_then(|found| found.k8s_log_file());
        self.logs_from(name, log_file, tail, max_bytes).await
    }

    async fn logs_of(
        &self,
        container: &ContainerState,
        tail: u32,
        max_bytes: usize,
    ) -> Result<ContainerLogs, ContainerError> {
        self.logs_from(&container.id, container.log_file.clone(), tail, max_bytes).await
    }
}

impl Podman {
    /// The logs of `name`, from `log_file` when it has one (see [`Podman::logs`]).
    async fn logs_from(
        &self,
        name: &str,
        log_file: Option<PathBuf>,
        tail: u32,
        max_bytes: usize,
    ) -> Result<ContainerLogs, ContainerError> {
        if let Some(path) = log_file {
            let read = tokio::task::spawn_blocking({
                let path = path.clone();
                move || podman_logs::tail_k8s_file(&path, tail, max_bytes)
            });
            match read.await {
                Ok(Ok(logs)) => return Ok(logs),
                Ok(Err(err)) => {
                    tracing::warn!(container = name, path = %path.display(), error = %err, "log file unreadable; asking podman")
                }
                Err(err) => {
                    tracing::warn!(container = name, error = %err, "log file reader failed; asking podman")
                }
            }
        }
        self.podman_logs(name, tail, max_bytes).await
    }
}

impl Podman {
    /// `podman container inspect` of one container; `None`: there is none.
    async fn inspect(&self, name: &str) -> Result<Option<Inspected>, ContainerError> {
        let op = format!("inspect {name}");
        let output = self
            .call(&op, args(["container", "inspect", "--format", "json", "--", name]), self.call_timeout)
            .await?;
        if output.code != Some(0) {
            return if output.is_missing_container() { Ok(None) } else { Err(failed(&op, &output)) };
        }
        let mut found: Vec<Inspected> =
            serde_json::from_slice(&output.stdout).map_err(|err| ContainerError::BadOutput {
                op: op.clone(),
                message: bounded_text(&err.to_string(), MAX_MESSAGE_BYTES),
            })?;
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop()),
            n => Err(ContainerError::BadOutput { op, message: format!("{n} containers for one name") }),
        }
    }

    /// `podman logs --tail N -- NAME`, its stdout and stderr on one pipe so
    /// the lines keep podman's order.
    async fn podman_logs(
        &self,
        name: &str,
        tail: u32,
        max_bytes: usize,
    ) -> Result<ContainerLogs, ContainerError> {
        let op = format!("logs {name}");
        let io_failed = |err: io::Error| ContainerError::CommandFailed {
            op: op.clone(),
            code: None,
            message: bounded_text(&err.to_string(), MAX_MESSAGE_BYTES),
        };
        let (reader, writer) = io::pipe().map_err(io_failed)?;
        let mut command = Command::new(&self.program);
        command
            .args(["logs", "--tail", &tail.to_string(), "--", name])
            .stdin(Stdio::null())
            .stdout(writer.try_clone().map_err(io_failed)?)
            .stderr(writer)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|source| ContainerError::RuntimeUnavailable {
            program: self.program.display().to_string(),
            source,
        })?;
        // Our copies of the write end close here: the reader sees the end
        // of the output when podman exits.
        drop(command);
        let read = tokio::task::spawn_blocking(move || read_tail(reader, max_bytes));
        let run = async {
            let status = child.wait().await?;
            let (text, cut) = read.await.map_err(io::Error::other)??;
            Ok::<_, io::Error>((status.code(), text, cut))
        };
        let (code, text, cut) = match tokio::time::timeout(self.call_timeout, run).await {
            Ok(result) => result.map_err(io_failed)?,
            // Dropping `child` kills podman, which ends the reader too.
            Err(_) => return Err(ContainerError::TimedOut { op, timeout: self.call_timeout }),
        };
        if code != Some(0) {
            let output = Output { code, stdout: Vec::new(), stderr: text };
            return Err(failed(&op, &output));
        }
        Ok(ContainerLogs::from_output(&text, max_bytes, cut))
    }
}

/// The image references of `podman load`'s output (`Loaded image: a`,
/// `Loaded image(s): a,b`).
fn loaded_images(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|line| {
            line.strip_prefix("Loaded image: ").or_else(|| line.strip_prefix("Loaded image(s): "))
        })
        .flat_map(|names| names.split(','))
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .collect()
}

/// Reads `from` to its end, keeping the last `keep` bytes or a little
/// more; says whether anything was dropped.
fn read_tail(mut from: impl io::Read, keep: usize) -> io::Result<(Vec<u8>, bool)> {
    let mut kept = Vec::new();
    let mut cut = false;
    let mut chunk = [0u8; 8192];
    loop {
        let n = match from.read(&mut chunk) {
            Ok(0) => return Ok((kept, cut)),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        kept.extend_from_slice(&chunk[..n]);
        // Drop the oldest bytes now and then, not at every read.
        if kept.len() > 2 * keep + chunk.len() {
            kept.drain(..kept.len() - keep);
            cut = true;
        }
    }
}

impl LocalDeviceTopology {
    /// The host path of a volume source the Score names: the parent
    /// directories resolved beneath the root as the filesystem operations
    /// resolve them (a symlink that leaves the root is refused), the last
    /// component an existing directory or regular file, never a symlink
    /// (as everywhere, the last component is not followed: what the
    /// device's path policy judged is what is mounted).
    ///
    /// Podman is given the resolved path as text and resolves it again
    /// when it mounts: a local user who can replace a component beneath the
    /// root between the two can still redirect the mount.
    async fn volume_source(&self, path: &str) -> Result<String, ContainerError> {
        let invalid = |message: &str, refused: bool| ContainerError::InvalidVolume {
            path: path.to_owned(),
            message: bounded_text(message, MAX_MESSAGE_BYTES),
            refused,
        };
        let parsed = paths::parse(path).map_err(|err| invalid(&err.to_string(), true))?;
        if path.contains([':', ',']) {
            return Err(invalid("holds ':' or ','", true));
        }
        let (root, resolver) = (self.root.clone(), self.resolver);
        let resolved = tokio::task::spawn_blocking(move || -> Result<(PathBuf, FileType), BeneathError> {
            let beneath = Beneath::open(&root, resolver)?;
            let parents = beneath.resolved_names(&parsed.parents)?;
            let dir = beneath.dir(&parsed.parents)?;
            let stat = statat(dir.as_fd(), parsed.name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io::Error::from)?;
            // A relative root would make podman read the source as a named volume.
            let mut host = std::path::absolute(&root)?;
            host.extend(&parents);
            host.push(&parsed.name);
            Ok((host, FileType::from_raw_mode(stat.st_mode)))
        })
        .await
        .map_err(|join| invalid(&join.to_string(), false))?;
        let host = match resolved {
            Ok((host, FileType::Directory | FileType::RegularFile)) => host,
            Ok((_, FileType::Symlink)) => return Err(invalid("is a symlink (name what it points to)", true)),
            Ok(_) => return Err(invalid("is neither a directory nor a regular file", false)),
            Err(BeneathError::Escapes) => return Err(invalid("escapes the device root", true)),
            Err(err) if err.is_not_found() => return Err(invalid("does not exist", false)),
            Err(BeneathError::Io(err)) => return Err(invalid(&err.to_string(), false)),
        };
        let host = host.into_os_string().into_string().map_err(|_| invalid("is not UTF-8", false))?;
        if host.contains([':', ',']) {
            return Err(invalid(&format!("resolves to {host:?}, which holds ':' or ','"), true));
        }
        Ok(host)
    }
}

/// Containers on the device: podman ([`LocalDeviceTopology::with_podman`]),
/// with volume sources resolved beneath the topology's root.
#[async_trait]
impl ContainerRuntime for LocalDeviceTopology {
    async fn inspect_container(&self, name: &str) -> Result<Option<ContainerState>, ContainerError> {
        self.podman.inspect_container(name).await
    }

    async fn image_present(&self, image: &str) -> Result<bool, ContainerError> {
        self.podman.image_present(image).await
    }

    async fn pull_image(&self, image: &str) -> Result<(), ContainerError> {
        self.podman.pull_image(image).await
    }

    async fn check_spec(&self, spec: &ContainerSpec) -> Result<(), ContainerError> {
        for volume in &spec.volumes {
            self.volume_source(&volume.source).await?;
        }
        Ok(())
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, ContainerError> {
        let mut spec = spec.clone();
        for volume in &mut spec.volumes {
            volume.source = self.volume_source(&volume.source).await?;
        }
        self.podman.create_and_start(&spec).await
    }

    async fn start(&self, name: &str) -> Result<(), ContainerError> {
        self.podman.start(name).await
    }

    async fn stop(&self, name: &str, grace: Duration) -> Result<(), ContainerError> {
        self.podman.stop(name, grace).await
    }

    async fn remove(&self, name: &str) -> Result<(), ContainerError> {
        self.podman.remove(name).await
    }

    async fn load_image(&self, archive: &Path) -> Result<Vec<String>, ContainerError> {
        self.podman.load_image(archive).await
    }

    async fn logs(&self, name: &str, tail: u32, max_bytes: usize) -> Result<ContainerLogs, ContainerError> {
        self.podman.logs(name, tail, max_bytes).await
    }

    async fn logs_of(
        &self,
        container: &ContainerState,
        tail: u32,
        max_bytes: usize,
    ) -> Result<ContainerLogs, ContainerError> {
        self.podman.logs_of(container, tail, max_bytes).await
    }
}

#[cfg(test)]
#[path = "podman_tests.rs"]
mod tests;
