//! `DirectoryScore`: a directory with the given mode, or its absence.

use harmony_score_wire::validate::{check_mode, check_path};
use harmony_score_wire::{DeviceScore, ResourceId, ScoreValidationError};
use harmony_topology::{
    async_trait, Filesystem, Id, Interpret, InterpretError, InterpretName, InterpretStatus, Inventory,
    Outcome, PathEntry, Score, Topology, Version,
};
use serde::{Deserialize, Serialize};

use crate::{octal, PresenceState};

/// A directory at `path`, created with its parents.
///
/// `mode` is a number (493 for 0755); when unset, a new directory gets 0755
/// and an existing one keeps its mode. `state: absent` removes the directory
/// only when it is empty: a Score never deletes content it does not name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryScore {
    /// Absolute path on the device.
    pub path: String,
    /// Permission bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Present (default) or absent.
    #[serde(default)]
    pub state: PresenceState,
}

impl<T: Topology + Filesystem> Score<T> for DirectoryScore {
    fn create_interpret(&self) -> Box<dyn Interpret<T>> {
        Box::new(DirectoryInterpret { score: self.clone() })
    }

    fn name(&self) -> String {
        format!("directory [{}]", self.path)
    }
}

harmony_score_wire::device_score! {
    tag: "harmony.directory/v1",
    summary: "a directory with the given mode, or its absence (only when empty)",
    impl DeviceScore for DirectoryScore {
        fn validate(&self) -> Result<(), ScoreValidationError> {
            check_path("path", &self.path)?;
            check_mode("mode", self.mode)
        }

        fn resource(&self) -> ResourceId {
            ResourceId::path(&self.path)
        }

        fn privileges(&self) -> Vec<harmony_score_wire::Privilege> {
            // Only a directory that is made present gets the mode.
            match self.state {
                PresenceState::Present => harmony_score_wire::mode_privilege(self.mode).into_iter().collect(),
                PresenceState::Absent => Vec::new(),
            }
        }

        fn undo(&self) -> Option<Box<dyn DeviceScore>> {
            match self.state {
                PresenceState::Present => {
                    Some(Box::new(DirectoryScore { state: PresenceState::Absent, ..self.clone() }))
                }
                PresenceState::Absent => None,
            }
        }
    }
}

/// Makes a [`DirectoryScore`] true.
#[derive(Debug)]
pub struct DirectoryInterpret {
    score: DirectoryScore,
}

#[async_trait]
impl<T: Topology + Filesystem> Interpret<T> for DirectoryInterpret {
    async fn execute(&self, _inventory: &Inventory, topology: &T) -> Result<Outcome, InterpretError> {
        let DirectoryScore { path, mode, state } = &self.score;
        self.score.validate().map_err(|e| InterpretError::invalid_input(e.to_string()))?;
        match (state, topology.inspect(path).await?) {
            (PresenceState::Absent, PathEntry::Missing) => {
                Ok(Outcome::noop(format!("{path} already absent")))
            }
            (PresenceState::Absent, PathEntry::Directory { .. }) => {
                topology.remove_dir(path, false).await.map_err(|err| {
                    InterpretError::new(format!("{err} (a directory is removed only when it is empty)"))
                })?;
                Ok(Outcome::success(format!("{path} removed")))
            }
            (PresenceState::Present, PathEntry::Missing) => {
                let mode = mode.unwrap_or(0o755);
                topology.create_dir(path, mode).await?;
                Ok(Outcome::success(format!("{path} created (mode {})", octal(mode))))
            }
            (PresenceState::Present, PathEntry::Directory { mode: old }) => match mode {
                Some(want) if *want != old => {
                    topology.set_mode(path, *want).await?;
                    Ok(Outcome::success(format!("{path} mode {} -> {}", octal(old), octal(*want))))
                }
                _ => Ok(Outcome::noop(format!("{path} up to date"))),
            },
            (_, PathEntry::File { .. } | PathEntry::Other) => {
                Err(InterpretError::new(format!("{path} exists and is not a directory")))
            }
        }
    }

    fn get_name(&self) -> InterpretName {
        InterpretName::Directory
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use harmony_topology::{LocalDeviceTopology, Maestro};

    use super::*;

    fn dir_score(path: &str, mode: Option<u32>, state: PresenceState) -> DirectoryScore {
        DirectoryScore { path: path.into(), mode, state }
    }

    #[tokio::test]
    async fn creates_with_mode_then_noop_then_removes_only_when_empty() {
        let root = tempfile::tempdir().unwrap();
        let m = Maestro::initialize(Inventory::empty(), LocalDeviceTopology::new(root.path())).await.unwrap();
        let score = dir_score("/var/lib/app", Some(0o750), PresenceState::Present);
        assert_eq!(m.interpret(&score).await.unwrap().status, InterpretStatus::SUCCESS);
        let on_disk = root.path().join("var/lib/app");
        assert_eq!(std::fs::metadata(&on_disk).unwrap().permissions().mode() & 0o7777, 0o750);
        assert_eq!(m.interpret(&score).await.unwrap().status, InterpretStatus::NOOP);

        std::fs::write(on_disk.join("data"), "keep").unwrap();
        let undo = score.undo().unwrap();
        let err = m.interpret(undo.as_ref()).await.unwrap_err();
        assert!(err.message().contains("only when it is empty"), "{err}");
        assert!(on_disk.join("data").exists());

        std::fs::remove_file(on_disk.join("data")).unwrap();
        assert_eq!(m.interpret(undo.as_ref()).await.unwrap().status, InterpretStatus::SUCCESS);
        assert!(!on_disk.exists());
        assert_eq!(m.interpret(undo.as_ref()).await.unwrap().status, InterpretStatus::NOOP);
    }

    #[tokio::test]
    async fn a_file_in_the_way_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("f"), "x").unwrap();
        let m = Maestro::initialize(Inventory::empty(), LocalDeviceTopology::new(root.path())).await.unwrap();
        assert!(m.interpret(&dir_score("/f", None, PresenceState::Present)).await.is_err());
        assert_eq!(std::fs::read_to_string(root.path().join("f")).unwrap(), "x");
    }
}
