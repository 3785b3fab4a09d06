//! `PackageScore`: a package installed (at a version, when given), or its absence.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;

use harmony_score_wire::{DeviceScore, ResourceId, ScoreValidationError};
use harmony_topology::{
    async_trait, check_package_name, check_package_version, Filesystem, Id, Interpret, InterpretError,
    InterpretErrorKind, InterpretName, InterpretStatus, Inventory, LocalDeviceTopology, Outcome,
    PackageError, PackageManager, PackageState, PathEntry, Score, Topology, Version,
};
use serde::{Deserialize, Serialize};

use crate::PresenceState;

/// Where the agent notes, one empty file per package, the packages it
/// installed itself (beneath the topology's root): an undo removes only those.
pub const INSTALLED_BY_AGENT_DIR: &str = "/var/lib/harmony/packages";

/// A package installed by the device's package manager (apt), at `version`
/// when given, or not installed (`state: absent`).
///
/// Installing asks nothing, adds no recommended packages and is refused
/// when it would remove another package; so is a removal that would take
/// dependent packages with it. The undo (a pruned Score) removes the
/// package only if the agent installed it: one the device had before stays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageScore {
    /// The package's name (`curl`).
    pub name: String,
    /// The exact version (`7.88.1-10+deb12u5`); unset: any installed version
    /// holds, and a new install takes the candidate apt chooses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Present (default) or absent.
    #[serde(default)]
    pub state: PresenceState,
    /// With `state: absent`: remove the package only if the agent
    /// installed it (the undo's form).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub only_if_agent_installed: bool,
}

impl<T: Topology + PackageManager + Filesystem> Score<T> for PackageScore {
    fn create_interpret(&self) -> Box<dyn Interpret<T>> {
        Box::new(PackageInterpret { score: self.clone() })
    }

    fn name(&self) -> String {
        format!("package [{}]", self.name)
    }
}

harmony_score_wire::device_score! {
    tag: "harmony.package/v1",
    summary: "a package installed by the device's package manager (at a version), or its absence",
    impl DeviceScore for PackageScore {
        fn validate(&self) -> Result<(), ScoreValidationError> {
            check_package_name(&self.name).map_err(|message| ScoreValidationError::new("name", message))?;
            if let Some(version) = &self.version {
                check_package_version(version).map_err(|message| ScoreValidationError::new("version", message))?;
            }
            if self.only_if_agent_installed && self.state == PresenceState::Present {
                return Err(ScoreValidationError::new("only_if_agent_installed", "applies to state absent only"));
            }
            Ok(())
        }

        fn resource(&self) -> ResourceId {
            ResourceId::named("package", &self.name).expect("validated package name")
        }

        fn privileges(&self) -> Vec<harmony_score_wire::Privilege> {
            // Maintainer scripts run as root, wherever they write.
            vec![harmony_score_wire::Privilege::PackageChange]
        }

        fn undo(&self) -> Option<Box<dyn DeviceScore>> {
            match self.state {
                PresenceState::Present => Some(Box::new(PackageScore {
                    name: self.name.clone(),
                    version: None,
                    state: PresenceState::Absent,
                    only_if_agent_installed: true,
                })),
                PresenceState::Absent => None,
            }
        }

        fn interpret_timeout(&self) -> Option<std::time::Duration> {
            // A refresh of the package lists, a download and dpkg's run.
            Some(std::time::Duration::from_secs(30 * 60))
        }
    }
}

/// Makes a [`PackageScore`] true: reads dpkg's state first, installs or
/// removes only when it differs.
#[derive(Debug)]
pub struct PackageInterpret {
    score: PackageScore,
}

#[async_trait]
impl<T: Topology + PackageManager + Filesystem> Interpret<T> for PackageInterpret {
    async fn execute(&self, _inventory: &Inventory, topology: &T) -> Result<Outcome, InterpretError> {
        self.score.validate().map_err(|e| InterpretError::invalid_input(e.to_string()))?;
        let PackageScore { name, version, state, only_if_agent_installed } = &self.score;
        let current = match topology.package_state(name).await {
            // Not this agent's to change: reported, not retried as a failure.
            Err(err @ PackageError::NotHostRoot { .. }) => {
                return Ok(Outcome::new(InterpretStatus::BLOCKED, format!("{name}: {err}")));
            }
            other => other?,
        };
        let marker = format!("{INSTALLED_BY_AGENT_DIR}/{name}");
        match (state, current) {
            (PresenceState::Present, PackageState::Installed { version: have })
                if version.as_ref().is_none_or(|want| *want == have) =>
            {
                Ok(Outcome::noop(format!("{name} {have} installed")))
            }
            (PresenceState::Present, before) => {
                until_cancelled(topology.install(name, version.as_deref())).await?;
                let have = match topology.package_state(name).await? {
                    PackageState::Installed { version: have }
                        if version.as_ref().is_none_or(|want| *want == have) =>
                    {
                        have
                    }
                    other => {
                        return Err(InterpretError::new(format!(
                            "{name}: the package manager reported success, and then {other:?}"
                        )))
                    }
                };
                let mut details = Vec::new();
                let message = match before {
                    PackageState::Installed { version: old } => format!("{name} {old} -> {have}"),
                    PackageState::Partial { status, .. } => format!("{name} {have} installed (was {status})"),
                    PackageState::NotInstalled => {
                        // Only what the agent installed may its undo remove.
                        if let Err(err) = topology.write_file(&marker, b"", 0o644).await {
                            details.push(format!(
                                "not noted as installed by the agent ({err}): an undo leaves it"
                            ));
                        }
                        format!("{name} {have} installed")
                    }
                };
                Ok(Outcome::success_with_details(message, details))
            }
            (PresenceState::Absent, PackageState::NotInstalled) => {
                topology.remove_file(&marker).await?;
                Ok(Outcome::noop(format!("{name} not installed")))
            }
            (PresenceState::Absent, _) => {
                if *only_if_agent_installed && topology.inspect(&marker).await? == PathEntry::Missing {
                    return Ok(Outcome::noop(format!(
                        "{name} left installed: the device had it before the agent installed anything"
                    )));
                }
                until_cancelled(topology.remove(name)).await?;
                topology.remove_file(&marker).await?;
                Ok(Outcome::success(format!("{name} removed")))
            }
        }
    }

    fn get_name(&self) -> InterpretName {
        InterpretName::Package
    }

    fn get_version(&self) -> Version {
        Version::from("1.0.0")
    }

    fn get_status(&self) -> InterpretStatus {
        InterpretStatus::QUEUED
    }

    fn get_children(&self) -> Vec<Id> {
        Vec::new()
    }
}

/// Runs `work` until it ends or the run is cancelled (a newer generation, a
/// shutdown). Dropping it stops a download; dpkg, once started, finishes.
async fn until_cancelled<R>(
    work: impl Future<Output = Result<R, PackageError>>,
) -> Result<R, InterpretError> {
    let mut work = pin!(work);
    let mut cancelled = pin!(harmony_topology::run::cancelled());
    std::future::poll_fn(|cx| {
        if let Poll::Ready(result) = work.as_mut().poll(cx) {
            return Poll::Ready(result.map_err(InterpretError::from));
        }
        match cancelled.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Err(InterpretError::with_kind(InterpretErrorKind::Cancelled, "cancelled")))
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

// A device Score must run on the device topology; this fails to compile if
// the generic impl above stops covering it.
const _: fn() = || {
    fn runs_on_device<S: Score<LocalDeviceTopology>>() {}
    runs_on_device::<PackageScore>();
};

#[cfg(test)]
mod tests {
    use harmony_topology::Maestro;

    use super::*;

    fn package(name: &str, version: Option<&str>, state: PresenceState) -> PackageScore {
        PackageScore {
            name: name.into(),
            version: version.map(Into::into),
            state,
            only_if_agent_installed: false,
        }
    }

    #[test]
    fn validation_names_the_field_and_the_undo_removes_only_what_the_agent_installed() {
        assert!(package("hello", Some("2.10-3"), PresenceState::Present).validate().is_ok());
        for (score, field) in [
            (package("Hello", None, PresenceState::Present), "name"),
            (package("-y", None, PresenceState::Present), "name"),
            (package("hello", Some("2.10 3"), PresenceState::Present), "version"),
            (package("hello", Some("=2"), PresenceState::Present), "version"),
            (
                PackageScore {
                    only_if_agent_installed: true,
                    ..package("hello", None, PresenceState::Present)
                },
                "only_if_agent_installed",
            ),
        ] {
            assert_eq!(score.validate().unwrap_err().field, field, "{score:?}");
        }
        let score = package("hello", Some("2.10-3"), PresenceState::Present);
        let undo = score.undo().unwrap();
        assert_eq!(
            (undo.resource(), undo.resource().to_string()),
            (score.resource(), "package:hello".into())
        );
        assert!(undo.undo().is_none());
        assert_eq!(
            serde_json::to_value(&undo).unwrap(),
            serde_json::json!({"type": "harmony.package/v1", "name": "hello", "state": "absent", "only_if_agent_installed": true})
        );
    }

    #[tokio::test]
    async fn against_a_root_other_than_the_hosts_it_is_blocked() {
        let dir = tempfile::tempdir().unwrap();
        let m = Maestro::initialize(Inventory::empty(), LocalDeviceTopology::new(dir.path())).await.unwrap();
        let out = m.interpret(&package("hello", None, PresenceState::Present)).await.unwrap();
        assert_eq!(out.status, InterpretStatus::BLOCKED);
        assert!(
            out.message.contains("packages are installed only when the root is the host's /"),
            "{}",
            out.message
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written beneath the root");
    }

    /// Whether apt can run here for real; says why not.
    fn apt_usable() -> bool {
        if std::process::Command::new("apt-get").arg("--version").output().is_err() {
            eprintln!("skipped: apt-get is not installed");
            return false;
        }
        let uid = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Uid:").map(|u| u.split_whitespace().next() == Some("0")))
        });
        if uid != Some(true) {
            eprintln!("skipped: installing packages needs root");
            return false;
        }
        true
    }

    // Real apt against the host (tests run as root in CI): `hello` is 53 kB
    // and needs only libc6. One test, so the steps never interleave.
    #[tokio::test]
    async fn hello_is_installed_then_noop_then_removed_and_an_undo_keeps_what_the_device_had() {
        if !apt_usable() {
            return;
        }
        let m = Maestro::initialize(Inventory::empty(), LocalDeviceTopology::new("/")).await.unwrap();
        let absent = package("hello", None, PresenceState::Absent);
        m.interpret(&absent).await.unwrap();

        let present = package("hello", None, PresenceState::Present);
        let out = m.interpret(&present).await.unwrap();
        assert_eq!(out.status, InterpretStatus::SUCCESS, "{out:?}");
        assert!(out.message.starts_with("hello ") && out.message.ends_with(" installed"), "{}", out.message);
        assert!(std::path::Path::new("/usr/bin/hello").exists());
        assert!(std::path::Path::new("/var/lib/harmony/packages/hello").exists());
        let again = m.interpret(&present).await.unwrap();
        assert_eq!(again.status, InterpretStatus::NOOP, "{again:?}");
        let PackageState::Installed { version } = m.topology().package_state("hello").await.unwrap() else {
            panic!("hello installed")
        };
        let pinned = package("hello", Some(&version), PresenceState::Present);
        assert_eq!(m.interpret(&pinned).await.unwrap().status, InterpretStatus::NOOP);

        // The agent installed it: its undo removes it, then is a NOOP.
        let undo = present.undo().unwrap();
        let out = m.interpret(undo.as_ref()).await.unwrap();
        assert_eq!((out.status, out.message.as_str()), (InterpretStatus::SUCCESS, "hello removed"));
        assert!(!std::path::Path::new("/usr/bin/hello").exists());
        assert!(!std::path::Path::new("/var/lib/harmony/packages/hello").exists());
        assert_eq!(m.interpret(undo.as_ref()).await.unwrap().status, InterpretStatus::NOOP);

        // The device had it before: the Score holds, its undo leaves it.
        m.topology().install("hello", None).await.unwrap();
        assert_eq!(m.interpret(&present).await.unwrap().status, InterpretStatus::NOOP);
        let out = m.interpret(undo.as_ref()).await.unwrap();
        assert_eq!(out.status, InterpretStatus::NOOP);
        assert!(out.message.contains("left installed"), "{}", out.message);
        assert!(std::path::Path::new("/usr/bin/hello").exists());

        // Absent, said outright, removes it whoever installed it.
        let out = m.interpret(&absent).await.unwrap();
        assert_eq!((out.status, out.message.as_str()), (InterpretStatus::SUCCESS, "hello removed"));
        assert_eq!(m.interpret(&absent).await.unwrap().status, InterpretStatus::NOOP);
        assert_eq!(m.topology().package_state("hello").await.unwrap(), PackageState::NotInstalled);

        // A version apt does not have fails with apt's own message.
        let err =
            m.interpret(&package("hello", Some("0.0-harmony"), PresenceState::Present)).await.unwrap_err();
        assert!(err.message().contains("Version '0.0-harmony' for 'hello' was not found"), "{err}");
        assert_eq!(m.topology().package_state("hello").await.unwrap(), PackageState::NotInstalled);
    }
}
