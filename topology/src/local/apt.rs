//! The `PackageManager` capability's apt/dpkg adapter on `LocalDeviceTopology`: `dpkg-query` to read, `apt-get` to install and remove.
//!
//! apt installs into the host it runs on: against a root other than the
//! host's `/` every operation is [`PackageError::NotHostRoot`] (a package's
//! maintainer scripts run on the host; `dpkg --root` does not make them
//! run inside another root).
//!
//! An install is simulated first (refused when it would remove another
//! package), then downloaded (killable: only the cache changes), then
//! installed from the cache. The last step runs dpkg, which must not be
//! killed half-way: when its time is up the agent stops waiting and dpkg
//! finishes on its own. When a simulation or a download fails, the package
//! lists are refreshed once (`apt-get update`) and it is tried again.
//! Package operations of one agent run one at a time; apt waits up to two
//! minutes for another program's dpkg lock.

use std::time::Duration;

use async_trait::async_trait;

use super::tool::{is_host_root, Tool, ToolError, ToolOutput};
use super::LocalDeviceTopology;
use crate::package::{check_package_name, check_package_version};
use crate::{PackageError, PackageManager, PackageState};

/// How long a query or a simulation may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long refreshing the package lists may take.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a download may take.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the agent waits for dpkg to install or remove.
const DPKG_TIMEOUT: Duration = Duration::from_secs(600);

/// One package operation at a time in this process: apt holds locks, and
/// two runs would only fail on each other's.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `apt-get` with the options every call shares: no questions, no
/// recommended packages, and a wait for the dpkg lock instead of a failure.
fn apt_get(args: &[&str]) -> Tool {
    let mut all = vec![
        "-q",
        "-y",
        "--no-install-recommends",
        "-o",
        "DPkg::Lock::Timeout=120",
        // A changed configuration file keeps the device's version, asking nothing.
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
    ];
    all.extend_from_slice(args);
    Tool::new("apt-get", all)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("APT_LISTCHANGES_FRONTEND", "none")
        .timeout(QUERY_TIMEOUT)
}

fn tool_error(err: ToolError) -> PackageError {
    match err {
        ToolError::TimedOut { .. } => PackageError::TimedOut { message: err.to_string() },
        _ => PackageError::Unavailable { message: err.to_string() },
    }
}

/// Runs `tool`; a run that did not exit 0 is `CommandFailed` with its message.
async fn run_ok(tool: Tool) -> Result<ToolOutput, PackageError> {
    let command = tool.display();
    let output = tool.run().await.map_err(tool_error)?;
    if output.success() {
        Ok(output)
    } else {
        Err(PackageError::CommandFailed { command, message: last_lines(&output.message(), 20) })
    }
}

/// The last `n` lines of `text` (apt's errors come last, after its progress).
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Parses `dpkg-query -f '${Status}\t${Version}'`: `install ok installed\t2.10-3`.
fn parse_status(text: &str) -> PackageState {
    let (status, version) = text.split_once('\t').unwrap_or((text, ""));
    let version = version.trim().to_owned();
    match status.split_whitespace().nth(2).unwrap_or("") {
        // Installed; only triggers of other packages are still to run.
        "installed" | "triggers-awaiting" | "triggers-pending" => PackageState::Installed { version },
        "not-installed" | "config-files" | "" => PackageState::NotInstalled,
        other => PackageState::Partial { status: other.to_owned(), version },
    }
}

/// The packages a simulation (`apt-get -s`) would remove: its `Remv NAME [VERSION]` lines.
fn removed_by(simulation: &str) -> Vec<String> {
    simulation
        .lines()
        .filter_map(|line| line.strip_prefix("Remv "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(|name| name.split(':').next().unwrap_or(name).to_owned())
        .collect()
}

impl LocalDeviceTopology {
    fn require_host_root(&self) -> Result<(), PackageError> {
        if is_host_root(self.root()) {
            Ok(())
        } else {
            Err(PackageError::NotHostRoot { root: self.root().display().to_string() })
        }
    }

    /// Simulates `action` of `spec` and refuses it when it would remove any
    /// package but `keep`.
    async fn simulate(&self, action: &'static str, spec: &str, keep: &str) -> Result<(), PackageError> {
        let output = run_ok(apt_get(&["-s", action, spec])).await?;
        let others: Vec<String> = removed_by(&output.stdout).into_iter().filter(|p| p != keep).collect();
        if others.is_empty() {
            Ok(())
        } else {
            Err(PackageError::WouldRemoveOthers { action, package: keep.to_owned(), others })
        }
    }

    /// Simulates, then downloads `spec` into apt's cache.
    async fn prepare_install(&self, spec: &str, name: &str, args: &[&str]) -> Result<(), PackageError> {
        self.simulate("install", spec, name).await?;
        let mut download: Vec<&str> = args.to_vec();
        download.extend(["--download-only", "install", spec]);
        run_ok(apt_get(&download).timeout(DOWNLOAD_TIMEOUT)).await.map(drop)
    }
}

fn checked(name: &str) -> Result<(), PackageError> {
    check_package_name(name).map_err(|_| PackageError::InvalidName { name: name.to_owned() })
}

#[async_trait]
impl PackageManager for LocalDeviceTopology {
    async fn package_state(&self, name: &str) -> Result<PackageState, PackageError> {
        checked(name)?;
        self.require_host_root()?;
        let tool =
            Tool::new("dpkg-query", ["-W", "-f", "${Status}\t${Version}", name]).timeout(QUERY_TIMEOUT);
        let command = tool.display();
        let output = tool.run().await.map_err(tool_error)?;
        if output.success() {
            Ok(parse_status(&output.stdout))
        } else if output.stderr.contains("no packages found matching") {
            Ok(PackageState::NotInstalled)
        } else {
            Err(PackageError::CommandFailed { command, message: output.message() })
        }
    }

    async fn install(&self, name: &str, version: Option<&str>) -> Result<(), PackageError> {
        checked(name)?;
        if let Some(version) = version {
            check_package_version(version)
                .map_err(|_| PackageError::InvalidVersion { version: version.to_owned() })?;
        }
        self.require_host_root()?;
        let _one = ONE_AT_A_TIME.lock().await;
        let spec = match version {
            Some(version) => format!("{name}={version}"),
            None => name.to_owned(),
        };
        // A version pinned below the installed one is a downgrade the Score asked for.
        let args: &[&str] = if version.is_some() { &["--allow-downgrades"] } else { &[] };
        match self.prepare_install(&spec, name, args).await {
            Ok(()) => {}
            // Lists missing or stale (an unknown package, a 404): refresh once.
            Err(PackageError::CommandFailed { .. }) => {
                run_ok(apt_get(&["update"]).timeout(UPDATE_TIMEOUT)).await?;
                self.prepare_install(&spec, name, args).await?;
            }
            Err(err) => return Err(err),
        }
        let mut install: Vec<&str> = args.to_vec();
        install.extend(["install", &spec]);
        run_ok(apt_get(&install).timeout(DPKG_TIMEOUT).killable(false)).await.map(drop)
    }

    async fn remove(&self, name: &str) -> Result<(), PackageError> {
        checked(name)?;
        self.require_host_root()?;
        let _one = ONE_AT_A_TIME.lock().await;
        self.simulate("remove", name, name).await?;
        run_ok(apt_get(&["remove", name]).timeout(DPKG_TIMEOUT).killable(false)).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_states_and_simulated_removals_are_read() {
        assert_eq!(
            parse_status("install ok installed\t2.10-3"),
            PackageState::Installed { version: "2.10-3".into() }
        );
        assert_eq!(parse_status("hold ok installed\t1:2"), PackageState::Installed { version: "1:2".into() });
        assert_eq!(parse_status("deinstall ok config-files\t2.10-3"), PackageState::NotInstalled);
        assert_eq!(parse_status("unknown ok not-installed\t"), PackageState::NotInstalled);
        assert_eq!(
            parse_status("install reinstreq half-installed\t1.0"),
            PackageState::Partial { status: "half-installed".into(), version: "1.0".into() }
        );
        let simulation =
            "Reading package lists...\nRemv libfoo:amd64 [1.0]\nRemv foo-tools [2]\nInst bar (3 Debian)\n";
        assert_eq!(removed_by(simulation), ["libfoo", "foo-tools"]);
        assert_eq!(last_lines("a\nb\nc", 2), "b\nc");
    }

    #[tokio::test]
    async fn a_root_other_than_the_hosts_is_refused_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let topo = LocalDeviceTopology::new(dir.path());
        for result in [
            topo.install("hello", None).await,
            topo.remove("hello").await,
            topo.package_state("hello").await.map(drop),
        ] {
            assert!(matches!(result, Err(PackageError::NotHostRoot { .. })), "{result:?}");
        }
        assert!(matches!(topo.install("-rf", None).await, Err(PackageError::InvalidName { .. })));
        assert!(matches!(topo.install("hello", Some("1 2")).await, Err(PackageError::InvalidVersion { .. })));
    }

    // dpkg itself is installed wherever this adapter can work.
    #[tokio::test]
    async fn the_hosts_own_packages_are_read_from_dpkg() {
        if Tool::new("dpkg-query", ["--version"]).run().await.is_err() {
            eprintln!("skipped: dpkg-query is not installed");
            return;
        }
        let topo = LocalDeviceTopology::new("/");
        assert!(matches!(topo.package_state("dpkg").await, Ok(PackageState::Installed { .. })));
        assert_eq!(topo.package_state("harmony-no-such-package").await, Ok(PackageState::NotInstalled));
    }
}
