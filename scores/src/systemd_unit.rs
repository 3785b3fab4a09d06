//! `SystemdUnitScore`: a systemd unit file, whether it starts at boot and whether it runs, or its absence.

use harmony_score_wire::{DeviceScore, ResourceId, ScoreValidationError};
use harmony_topology::{
    async_trait, check_unit_name, Enablement, Id, Interpret, InterpretError, InterpretName, InterpretStatus,
    Inventory, LocalDeviceTopology, Outcome, Score, ServiceManager, ServiceRuntime, Topology, Version,
};
use serde::{Deserialize, Serialize};

/// Largest unit file a Score may hold.
pub const MAX_UNIT_CONTENT_BYTES: usize = 64 * 1024;

/// What a unit should be doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    /// Started (the default); restarted when its unit file changes.
    #[default]
    Running,
    /// Not running.
    Stopped,
    /// No unit file: stopped, disabled and removed (the undo's form).
    Absent,
}

/// A unit file `/etc/systemd/system/<name>` holding `content`, verified by
/// systemd before it is installed; enabled at boot or not, running or
/// stopped. `state: absent` stops, disables and removes it.
///
/// Where no systemd runs for the topology's root (an image being
/// prepared, `--root`), the file is written and enabled, and a unit that
/// should run is reported `BLOCKED`: nothing can start it there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemdUnitScore {
    /// The unit's name with its type: `app.service`, `backup.timer`.
    pub name: String,
    /// The unit file (empty for `absent`).
    #[serde(default)]
    pub content: String,
    /// Whether it starts at boot (default `true`; a unit without an
    /// `[Install]` section has nothing to enable and is left as it is).
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// `running` (default), `stopped` or `absent`.
    #[serde(default)]
    pub state: ServiceState,
}

fn enabled_by_default() -> bool {
    true
}

impl<T: Topology + ServiceManager> Score<T> for SystemdUnitScore {
    fn create_interpret(&self) -> Box<dyn Interpret<T>> {
        Box::new(SystemdUnitInterpret { score: self.clone() })
    }

    fn name(&self) -> String {
        format!("systemd unit [{}]", self.name)
    }
}

harmony_score_wire::device_score! {
    tag: "harmony.systemd.unit/v1",
    summary: "a systemd unit file (verified), enabled or not, running or stopped, or its absence",
    impl DeviceScore for SystemdUnitScore {
        fn validate(&self) -> Result<(), ScoreValidationError> {
            check_unit_name(&self.name).map_err(|message| ScoreValidationError::new("name", message))?;
            if self.content.len() > MAX_UNIT_CONTENT_BYTES {
                return Err(ScoreValidationError::new(
                    "content",
                    format!("must be at most {MAX_UNIT_CONTENT_BYTES} bytes"),
                ));
            }
            if self.content.contains('\0') {
                return Err(ScoreValidationError::new("content", "holds a NUL byte"));
            }
            if self.content.trim().is_empty() && self.state != ServiceState::Absent {
                return Err(ScoreValidationError::new("content", "is empty (only an absent unit has none)"));
            }
            Ok(())
        }

        fn resource(&self) -> ResourceId {
            ResourceId::named("unit", &self.name).expect("validated unit name")
        }

        fn privileges(&self) -> Vec<harmony_score_wire::Privilege> {
            // A unit's commands run as root: only a device that allows
            // system services takes one (stopping or removing one too).
            vec![harmony_score_wire::Privilege::SystemService]
        }

        fn used_paths(&self) -> Vec<String> {
            // The unit file is written there; `allowed_paths` judge it.
            vec![format!("{}/{}", harmony_topology::local::UNIT_DIR, self.name)]
        }

        fn undo(&self) -> Option<Box<dyn DeviceScore>> {
            match self.state {
                // The content stays behind: the agent keeps every undo.
                ServiceState::Running | ServiceState::Stopped => Some(Box::new(SystemdUnitScore {
                    name: self.name.clone(),
                    content: String::new(),
                    enabled: false,
                    state: ServiceState::Absent,
                })),
                ServiceState::Absent => None,
            }
        }

        fn health(&self) -> Option<&dyn harmony_score_wire::HealthCheck> {
            Some(self)
        }
    }
}

/// The unit's own check, run for documents that ask for verification: a
/// unit that should run is `active` (`blocked`, not failed, where no
/// systemd runs). A stopped or absent unit contributes nothing.
impl harmony_score_wire::HealthCheck for SystemdUnitScore {
    fn health_checks(&self) -> Vec<harmony_score_wire::Check> {
        match self.state {
            ServiceState::Running => vec![harmony_score_wire::Check::UnitActive { unit: self.name.clone() }],
            ServiceState::Stopped | ServiceState::Absent => Vec::new(),
        }
    }
}

/// Makes a [`SystemdUnitScore`] true: reads the unit file, its enablement
/// and (with a live systemd) its state, and changes only what differs.
#[derive(Debug)]
pub struct SystemdUnitInterpret {
    score: SystemdUnitScore,
}

#[async_trait]
impl<T: Topology + ServiceManager> Interpret<T> for SystemdUnitInterpret {
    async fn execute(&self, _inventory: &Inventory, topology: &T) -> Result<Outcome, InterpretError> {
        self.score.validate().map_err(|e| InterpretError::invalid_input(e.to_string()))?;
        let runtime = topology.service_runtime().await;
        if self.score.state == ServiceState::Absent {
            return self.remove(topology, &runtime).await;
        }
        let SystemdUnitScore { name, content, enabled, state } = &self.score;
        let mut changes: Vec<String> = Vec::new();

        let installed = topology.unit_file(name).await?;
        let rewritten = installed.as_deref() != Some(content.as_bytes());
        if rewritten {
            // Verified first: an invalid unit is a failure carrying
            // systemd's message, and the installed file stays.
            topology.write_unit(name, content.as_bytes()).await?;
            changes.push(if installed.is_none() { "unit file written" } else { "unit file updated" }.into());
        }

        match (*enabled, topology.enablement(name).await?) {
            (_, Enablement::Masked) => {
                return Err(InterpretError::new(format!(
                    "{name} is masked on this device; unmask it (systemctl unmask {name}) to let the Score manage it"
                )));
            }
            // A new [Install] section may name other targets: the old links go.
            (true, Enablement::Enabled) if rewritten => {
                topology.disable(name).await?;
                topology.enable(name).await?;
                changes.push("enabled again (for its new [Install] section)".into());
            }
            (true, Enablement::Enabled | Enablement::Static)
            | (false, Enablement::Disabled | Enablement::Static) => {}
            (true, _) => {
                topology.enable(name).await?;
                changes.push("enabled".into());
            }
            (false, _) => {
                topology.disable(name).await?;
                changes.push("disabled".into());
            }
        }

        let blocked = match &runtime {
            ServiceRuntime::Offline { reason } => match state {
                ServiceState::Running => Some(reason.clone()),
                // Nothing runs under a root no systemd manages.
                _ => None,
            },
            ServiceRuntime::Live => {
                let now = topology.unit_state(name).await?;
                if rewritten || now.needs_reload {
                    topology.daemon_reload().await?;
                    changes.push("systemd reloaded".into());
                }
                match state {
                    ServiceState::Running if !now.is_running() => {
                        topology.start(name).await?;
                        changes.push("started".into());
                    }
                    ServiceState::Running if rewritten => {
                        topology.restart(name).await?;
                        changes.push("restarted (its unit file changed)".into());
                    }
                    ServiceState::Stopped if now.is_running() => {
                        topology.stop(name).await?;
                        changes.push("stopped".into());
                    }
                    _ => {}
                }
                None
            }
        };

        let done = if changes.is_empty() { "up to date".to_owned() } else { changes.join(", ") };
        Ok(match blocked {
            Some(reason) => Outcome {
                status: InterpretStatus::BLOCKED,
                message: format!("{name}: {done}; not started: {reason}"),
                details: changes,
            },
            None if changes.is_empty() => Outcome::noop(format!("{name} up to date")),
            None => Outcome::success_with_details(format!("{name}: {done}"), changes),
        })
    }

    fn get_name(&self) -> InterpretName {
        InterpretName::SystemdUnit
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

impl SystemdUnitInterpret {
    /// `state: absent`: stops (with a live systemd), disables and removes
    /// the unit file. Without a file there is nothing of the Score's to
    /// stop: a unit of that name running now comes from elsewhere (a
    /// package's own), and is left alone.
    async fn remove<T: ServiceManager>(
        &self,
        topology: &T,
        runtime: &ServiceRuntime,
    ) -> Result<Outcome, InterpretError> {
        let name = &self.score.name;
        if topology.unit_file(name).await?.is_none() {
            return Ok(Outcome::noop(format!("{name} already absent")));
        }
        let mut changes: Vec<String> = Vec::new();
        let live = *runtime == ServiceRuntime::Live;
        if live && topology.unit_state(name).await?.is_running() {
            topology.stop(name).await?;
            changes.push("stopped".into());
        }
        if topology.enablement(name).await? == Enablement::Enabled {
            topology.disable(name).await?;
            changes.push("disabled".into());
        }
        topology.remove_unit(name).await?;
        changes.push("unit file removed".into());
        if live {
            topology.daemon_reload().await?;
            changes.push("systemd reloaded".into());
        }
        Ok(Outcome::success_with_details(format!("{name}: {}", changes.join(", ")), changes))
    }
}

// A device Score must run on the device topology; this fails to compile if
// the generic impl above stops covering it.
const _: fn() = || {
    fn runs_on_device<S: Score<LocalDeviceTopology>>() {}
    runs_on_device::<SystemdUnitScore>();
};

#[cfg(test)]
#[path = "systemd_unit_tests.rs"]
mod tests;
