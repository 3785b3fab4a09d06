//! The `ServiceManager` capability's systemd adapter on `LocalDeviceTopology`: unit files beneath the root, `systemd-analyze verify`, `systemctl`.
//!
//! Unit files live in `/etc/systemd/system` beneath the topology's root and
//! are read and written through the root's descriptor, as every file is.
//! A new unit file is first written to a hidden scratch directory beside
//! its place (systemd ignores hidden names), checked there by
//! `systemd-analyze verify` against the root (its `ExecStart=` programs must
//! exist beneath the root), and only then renamed into place: an invalid
//! unit never replaces the one installed.
//!
//! A live systemd manages the root only when the root is the host's `/` and
//! `/run/systemd/system` exists (systemd's own test, `sd_booted`).
//! Otherwise `systemctl --root=ROOT` still enables and disables units
//! (symlinks in `*.wants/`); reloading, starting and stopping are
//! [`ServiceError::NotRunning`].

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rustix::fs::{mkdirat, openat, renameat, unlinkat, AtFlags, Mode, OFlags};

use super::filesystem::write_at;
use super::tool::{is_host_root, Tool, ToolError, ToolOutput};
use super::LocalDeviceTopology;
use crate::service::check_unit_name;
use crate::{Enablement, Filesystem, PathEntry, ServiceError, ServiceManager, ServiceRuntime, UnitState};

/// Where units written by the device's administrator (and by Scores) live.
pub const UNIT_DIR: &str = "/etc/systemd/system";
/// How long a query, an enable or a verification may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a start, stop or reload may take (a unit's own start timeout
/// is 90 s by default).
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

impl LocalDeviceTopology {
    /// `systemctl` for this root: `--root=ROOT` unless a live systemd manages it.
    fn systemctl(&self, live: bool, args: &[&str]) -> Tool {
        let mut all: Vec<std::ffi::OsString> = vec!["--no-pager".into(), "--no-ask-password".into()];
        if !live {
            let mut root = std::ffi::OsString::from("--root=");
            root.push(self.root());
            all.push(root);
        }
        all.extend(args.iter().map(Into::into));
        Tool::new("systemctl", all).timeout(QUERY_TIMEOUT)
    }

    async fn live(&self) -> bool {
        self.service_runtime().await == ServiceRuntime::Live
    }

    /// Runs `tool`; a run that did not exit 0 is `CommandFailed` with its message.
    async fn run_ok(tool: Tool) -> Result<ToolOutput, ServiceError> {
        let command = tool.display();
        let output = tool.run().await.map_err(tool_error)?;
        if output.success() {
            Ok(output)
        } else {
            Err(ServiceError::CommandFailed { command, message: output.message() })
        }
    }

    /// Writes `content` as `name` into a new hidden scratch directory beside
    /// the unit directory's units (created if missing).
    async fn stage(&self, name: &str, content: &[u8]) -> Result<Staged, ServiceError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let scratch =
            format!(".harmony-verify.{}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let (content, unit) = (content.to_vec(), name.to_owned());
        let staged = self
            .beneath("stage", &format!("{UNIT_DIR}/{scratch}"), move |beneath, path| {
                let unit_dir = beneath.dir_creating(&path.parents, 0o755)?;
                mkdirat(&unit_dir, scratch.as_str(), Mode::from_raw_mode(0o700))?;
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let scratch_dir = match openat(&unit_dir, scratch.as_str(), flags, Mode::empty()) {
                    Ok(fd) => fd,
                    Err(err) => {
                        let _ = unlinkat(&unit_dir, scratch.as_str(), AtFlags::REMOVEDIR);
                        return Err(err.into());
                    }
                };
                let staged = Staged { unit_dir, scratch_dir, scratch, unit };
                write_at(staged.scratch_dir.as_fd(), OsStr::new(&staged.unit), &content, 0o644)?;
                Ok(staged)
            })
            .await?;
        Ok(staged)
    }

    /// `systemd-analyze verify` of the staged unit, against this root.
    async fn verify_staged(&self, staged: &Staged) -> Result<(), ServiceError> {
        let mut root = std::ffi::OsString::from("--root=");
        root.push(self.root());
        // The scratch directory comes first in the unit search path (given
        // as seen from the root), so the candidate shadows any installed
        // file of that name; the default path follows (the trailing `:`).
        // `--recursive-errors=no` judges this unit alone (a dependency may
        // come later) and makes its warnings (an unknown key, a value that
        // does not parse) errors.
        let args: Vec<std::ffi::OsString> = vec![
            "--man=no".into(),
            "--recursive-errors=no".into(),
            root,
            "verify".into(),
            staged.unit.as_str().into(),
        ];
        let tool = Tool::new("systemd-analyze", args)
            .env("SYSTEMD_UNIT_PATH", format!("{UNIT_DIR}/{}:", staged.scratch))
            .timeout(QUERY_TIMEOUT);
        let output = tool.run().await.map_err(tool_error)?;
        if output.success() {
            return Ok(());
        }
        // Name the unit file where it will be, not where it was checked.
        let scratch_on_host = self.root().join(&UNIT_DIR[1..]).join(&staged.scratch);
        let mut message = output.message().replace(&*scratch_on_host.to_string_lossy(), UNIT_DIR);
        message = message.replace(&format!("{UNIT_DIR}/{}", staged.scratch), UNIT_DIR);
        Err(ServiceError::InvalidUnit { unit: staged.unit.clone(), message })
    }
}

/// A candidate unit file in its scratch directory; dropping it removes both.
struct Staged {
    unit_dir: OwnedFd,
    scratch_dir: OwnedFd,
    scratch: String,
    unit: String,
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Two system calls: cheap enough for a drop on the async side.
        let _ = unlinkat(&self.scratch_dir, self.unit.as_str(), AtFlags::empty());
        let _ = unlinkat(&self.unit_dir, self.scratch.as_str(), AtFlags::REMOVEDIR);
    }
}

fn tool_error(err: ToolError) -> ServiceError {
    match err {
        ToolError::TimedOut { .. } => ServiceError::TimedOut { message: err.to_string() },
        _ => ServiceError::Unavailable { message: err.to_string() },
    }
}

fn checked(name: &str) -> Result<(), ServiceError> {
    check_unit_name(name).map_err(|_| ServiceError::InvalidUnitName { name: name.to_owned() })
}

fn parse_enablement(word: &str) -> Enablement {
    match word {
        "enabled" => Enablement::Enabled,
        // Enabled until the next boot only: not what "starts at boot" means.
        "disabled" | "enabled-runtime" => Enablement::Disabled,
        "static" | "indirect" | "generated" | "transient" => Enablement::Static,
        "masked" | "masked-runtime" => Enablement::Masked,
        other => Enablement::Other(other.to_owned()),
    }
}

fn parse_show(text: &str) -> UnitState {
    let mut state = UnitState { active_state: String::new(), sub_state: String::new(), needs_reload: false };
    for line in text.lines() {
        match line.split_once('=') {
            Some(("ActiveState", v)) => state.active_state = v.to_owned(),
            Some(("SubState", v)) => state.sub_state = v.to_owned(),
            Some(("NeedDaemonReload", v)) => state.needs_reload = v == "yes",
            _ => {}
        }
    }
    state
}

#[async_trait]
impl ServiceManager for LocalDeviceTopology {
    async fn service_runtime(&self) -> ServiceRuntime {
        if !is_host_root(self.root()) {
            return ServiceRuntime::Offline {
                reason: format!(
                    "no systemd manages this root ({} is not the host's /)",
                    self.root().display()
                ),
            };
        }
        if !Path::new("/run/systemd/system").is_dir() {
            return ServiceRuntime::Offline {
                reason: "no systemd manages this root (systemd is not running: no /run/systemd/system)"
                    .to_owned(),
            };
        }
        ServiceRuntime::Live
    }

    async fn unit_file(&self, name: &str) -> Result<Option<Vec<u8>>, ServiceError> {
        checked(name)?;
        let path = format!("{UNIT_DIR}/{name}");
        match self.inspect(&path).await? {
            PathEntry::Missing => Ok(None),
            PathEntry::File { content, .. } => Ok(Some(content)),
            PathEntry::Directory { .. } | PathEntry::Other => Err(ServiceError::NotAUnitFile { path }),
        }
    }

    async fn verify_unit(&self, name: &str, content: &[u8]) -> Result<(), ServiceError> {
        checked(name)?;
        let staged = self.stage(name, content).await?;
        self.verify_staged(&staged).await
    }

    async fn write_unit(&self, name: &str, content: &[u8]) -> Result<(), ServiceError> {
        checked(name)?;
        let path = format!("{UNIT_DIR}/{name}");
        if let PathEntry::Directory { .. } | PathEntry::Other = self.inspect(&path).await? {
            return Err(ServiceError::NotAUnitFile { path });
        }
        let staged = self.stage(name, content).await?;
        self.verify_staged(&staged).await?;
        let io_error = |source| crate::FilesystemError::Io { op: "install", path: path.clone(), source };
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let unit = staged.unit.as_str();
            renameat(&staged.scratch_dir, unit, &staged.unit_dir, unit)?;
            Ok(rustix::fs::fsync(&staged.unit_dir)?)
        })
        .await
        .map_err(|join| io_error(std::io::Error::other(join.to_string())))?
        .map_err(io_error)?;
        Ok(())
    }

    async fn remove_unit(&self, name: &str) -> Result<(), ServiceError> {
        checked(name)?;
        let path = format!("{UNIT_DIR}/{name}");
        match self.inspect(&path).await? {
            PathEntry::Missing => Ok(()),
            PathEntry::File { .. } => Ok(self.remove_file(&path).await?),
            PathEntry::Directory { .. } | PathEntry::Other => Err(ServiceError::NotAUnitFile { path }),
        }
    }

    async fn enablement(&self, name: &str) -> Result<Enablement, ServiceError> {
        checked(name)?;
        let tool = self.systemctl(self.live().await, &["is-enabled", name]);
        let command = tool.display();
        let output = tool.run().await.map_err(tool_error)?;
        // Exit status 1 with a word is an answer ("disabled"); without one
        // it is a failure (no such unit).
        match output.stdout.lines().next().map(str::trim) {
            Some(word) if !word.is_empty() => Ok(parse_enablement(word)),
            _ => Err(ServiceError::CommandFailed { command, message: output.message() }),
        }
    }

    async fn enable(&self, name: &str) -> Result<(), ServiceError> {
        checked(name)?;
        Self::run_ok(self.systemctl(self.live().await, &["enable", name])).await.map(drop)
    }

    async fn disable(&self, name: &str) -> Result<(), ServiceError> {
        checked(name)?;
        Self::run_ok(self.systemctl(self.live().await, &["disable", name])).await.map(drop)
    }

    async fn unit_state(&self, name: &str) -> Result<UnitState, ServiceError> {
        checked(name)?;
        self.require_live().await?;
        let tool = self.systemctl(true, &["show", "--property=ActiveState,SubState,NeedDaemonReload", name]);
        Ok(parse_show(&Self::run_ok(tool).await?.stdout))
    }

    async fn daemon_reload(&self) -> Result<(), ServiceError> {
        self.require_live().await?;
        Self::run_ok(self.systemctl(true, &["daemon-reload"]).timeout(JOB_TIMEOUT)).await.map(drop)
    }

    async fn start(&self, name: &str) -> Result<(), ServiceError> {
        self.job("start", name).await
    }

    async fn stop(&self, name: &str) -> Result<(), ServiceError> {
        self.job("stop", name).await
    }

    async fn restart(&self, name: &str) -> Result<(), ServiceError> {
        self.job("restart", name).await
    }
}

impl LocalDeviceTopology {
    async fn require_live(&self) -> Result<(), ServiceError> {
        match self.service_runtime().await {
            ServiceRuntime::Live => Ok(()),
            ServiceRuntime::Offline { reason } => Err(ServiceError::NotRunning { reason }),
        }
    }

    async fn job(&self, verb: &str, name: &str) -> Result<(), ServiceError> {
        checked(name)?;
        self.require_live().await?;
        Self::run_ok(self.systemctl(true, &[verb, name]).timeout(JOB_TIMEOUT)).await.map(drop)
    }
}

#[cfg(test)]
#[path = "systemd_tests.rs"]
mod tests;
