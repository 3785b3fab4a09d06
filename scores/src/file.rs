//! `FileScore`: a file with the given content and mode, or its absence.

use harmony_score_wire::validate::{check_mode, check_path};
use harmony_score_wire::{DeviceScore, ResourceId, ScoreValidationError};
use harmony_topology::{
    async_trait, Filesystem, Id, Interpret, InterpretError, InterpretName, InterpretStatus, Inventory,
    LocalDeviceTopology, Outcome, PathEntry, Score, Topology, Version,
};
use serde::{Deserialize, Serialize};

use crate::{octal, PresenceState};

/// A regular file at `path` holding `content` (UTF-8 text).
///
/// `mode` is a number (420 for 0644); when unset, a new file gets 0644 and an
/// existing file keeps its mode. `state: absent` removes the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileScore {
    /// Absolute path on the device.
    pub path: String,
    /// The file's content.
    #[serde(default)]
    pub content: String,
    /// Permission bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Present (default) or absent.
    #[serde(default)]
    pub state: PresenceState,
}

impl<T: Topology + Filesystem> Score<T> for FileScore {
    fn create_interpret(&self) -> Box<dyn Interpret<T>> {
        Box::new(FileInterpret { score: self.clone() })
    }

    fn name(&self) -> String {
        format!("file [{}]", self.path)
    }
}

harmony_score_wire::device_score! {
    tag: "harmony.file/v1",
    summary: "a file with the given content and mode, or its absence",
    impl DeviceScore for FileScore {
        fn validate(&self) -> Result<(), ScoreValidationError> {
            check_path("path", &self.path)?;
            check_mode("mode", self.mode)
        }

        fn resource(&self) -> ResourceId {
            ResourceId::path(&self.path)
        }

        fn privileges(&self) -> Vec<harmony_score_wire::Privilege> {
            // Only a file that is made present gets the mode.
            match self.state {
                PresenceState::Present => harmony_score_wire::mode_privilege(self.mode).into_iter().collect(),
                PresenceState::Absent => Vec::new(),
            }
        }

        fn undo(&self) -> Option<Box<dyn DeviceScore>> {
            match self.state {
                // The content stays behind: an absent file needs none, and
                // the agent keeps every undo in its state.
                PresenceState::Present => Some(Box::new(FileScore {
                    state: PresenceState::Absent,
                    content: String::new(),
                    ..self.clone()
                })),
                PresenceState::Absent => None,
            }
        }
    }
}

/// Makes a [`FileScore`] true: reads the file first and changes only what differs.
#[derive(Debug)]
pub struct FileInterpret {
    score: FileScore,
}

#[async_trait]
impl<T: Topology + Filesystem> Interpret<T> for FileInterpret {
    async fn execute(&self, _inventory: &Inventory, topology: &T) -> Result<Outcome, InterpretError> {
        let FileScore { path, content, mode, state } = &self.score;
        // Validated at decode; checked again for Scores built in code.
        self.score.validate().map_err(|e| InterpretError::invalid_input(e.to_string()))?;
        let current = topology.inspect(path).await?;
        match (state, current) {
            (PresenceState::Absent, PathEntry::Missing) => {
                Ok(Outcome::noop(format!("{path} already absent")))
            }
            (PresenceState::Absent, PathEntry::File { .. }) => {
                topology.remove_file(path).await?;
                Ok(Outcome::success(format!("{path} removed")))
            }
            (PresenceState::Present, PathEntry::Missing) => {
                let mode = mode.unwrap_or(0o644);
                topology.write_file(path, content.as_bytes(), mode).await?;
                Ok(Outcome::success(format!(
                    "{path} created ({} bytes, mode {})",
                    content.len(),
                    octal(mode)
                )))
            }
            (PresenceState::Present, PathEntry::File { content: old, mode: old_mode }) => {
                // Without a mode of its own, new content never inherits
                // setuid/setgid (as a write by another user clears them):
                // only a mode the Score states, which the device policy
                // judges (`setuid_mode`), may carry them.
                let kept_mode = if old != content.as_bytes() { old_mode & !0o6000 } else { old_mode };
                let want_mode = mode.unwrap_or(kept_mode);
                if old != content.as_bytes() {
                    topology.write_file(path, content.as_bytes(), want_mode).await?;
                    Ok(Outcome::success(format!("{path} content updated ({} bytes)", content.len())))
                } else if want_mode != old_mode {
                    topology.set_mode(path, want_mode).await?;
                    Ok(Outcome::success(format!("{path} mode {} -> {}", octal(old_mode), octal(want_mode))))
                } else {
                    Ok(Outcome::noop(format!("{path} up to date")))
                }
            }
            (_, PathEntry::Directory { .. } | PathEntry::Other) => {
                Err(InterpretError::new(format!("{path} exists and is not a regular file")))
            }
        }
    }

    fn get_name(&self) -> InterpretName {
        InterpretName::File
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

// A device Score must run on the device topology; this fails to compile if
// the generic impl above stops covering it.
const _: fn() = || {
    fn runs_on_device<S: Score<LocalDeviceTopology>>() {}
    runs_on_device::<FileScore>();
};

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use harmony_topology::Maestro;

    use super::*;

    fn file(path: &str, content: &str, mode: Option<u32>, state: PresenceState) -> FileScore {
        FileScore { path: path.into(), content: content.into(), mode, state }
    }

    async fn maestro(root: &std::path::Path) -> Maestro<LocalDeviceTopology> {
        Maestro::initialize(Inventory::empty(), LocalDeviceTopology::new(root)).await.unwrap()
    }

    // Review finding: a Score without a mode rewrote a 04755 file and kept
    // the bit, installing setuid content on a device whose policy forbids
    // setuid (the privilege is judged on the declared mode only).
    #[tokio::test]
    async fn new_content_without_a_stated_mode_drops_setuid_and_setgid() {
        let dir = tempfile::tempdir().unwrap();
        let m = maestro(dir.path()).await;
        let on_disk = dir.path().join("usr/bin/tool");
        std::fs::create_dir_all(on_disk.parent().unwrap()).unwrap();
        std::fs::write(&on_disk, "old").unwrap();
        std::fs::set_permissions(&on_disk, std::fs::Permissions::from_mode(0o6755)).unwrap();
        let score = file("/usr/bin/tool", "attacker content", None, PresenceState::Present);
        assert!(score.privileges().is_empty());
        assert_eq!(m.interpret(&score).await.unwrap().status, InterpretStatus::SUCCESS);
        assert_eq!(std::fs::read_to_string(&on_disk).unwrap(), "attacker content");
        assert_eq!(std::fs::metadata(&on_disk).unwrap().permissions().mode() & 0o7777, 0o755);
        // Same content again: nothing changes, the mode stays as it is.
        assert_eq!(m.interpret(&score).await.unwrap().status, InterpretStatus::NOOP);
    }

    #[tokio::test]
    async fn creates_then_reports_noop_without_touching_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = maestro(dir.path()).await;
        let score = file("/etc/motd", "hello\n", Some(0o640), PresenceState::Present);
        assert_eq!(m.interpret(&score).await.unwrap().status, InterpretStatus::SUCCESS);
        let on_disk = dir.path().join("etc/motd");
        let before = std::fs::metadata(&on_disk).unwrap();
        assert_eq!(std::fs::read_to_string(&on_disk).unwrap(), "hello\n");
        assert_eq!(before.permissions().mode() & 0o7777, 0o640);

        assert_eq!(m.interpret(&score).await.unwrap().status, InterpretStatus::NOOP);
        let after = std::fs::metadata(&on_disk).unwrap();
        assert_eq!(before.modified().unwrap(), after.modified().unwrap());
        assert_eq!(before.ino(), after.ino());
    }

    #[tokio::test]
    async fn changes_only_the_mode_when_only_the_mode_differs() {
        let dir = tempfile::tempdir().unwrap();
        let m = maestro(dir.path()).await;
        m.interpret(&file("/f", "x", Some(0o600), PresenceState::Present)).await.unwrap();
        let ino = std::fs::metadata(dir.path().join("f")).unwrap().ino();
        let out = m.interpret(&file("/f", "x", Some(0o644), PresenceState::Present)).await.unwrap();
        assert_eq!(out.status, InterpretStatus::SUCCESS);
        assert_eq!(out.message, "/f mode 0600 -> 0644");
        let meta = std::fs::metadata(dir.path().join("f")).unwrap();
        assert_eq!((meta.ino(), meta.permissions().mode() & 0o7777), (ino, 0o644));
    }

    #[tokio::test]
    async fn absent_removes_and_then_is_noop_and_undo_removes() {
        let dir = tempfile::tempdir().unwrap();
        let m = maestro(dir.path()).await;
        let present = file("/a/b", "x", None, PresenceState::Present);
        m.interpret(&present).await.unwrap();
        let undo = present.undo().unwrap();
        assert_eq!(m.interpret(undo.as_ref()).await.unwrap().status, InterpretStatus::SUCCESS);
        assert!(!dir.path().join("a/b").exists());
        assert_eq!(m.interpret(undo.as_ref()).await.unwrap().status, InterpretStatus::NOOP);
        assert!(undo.undo().is_none());
        // The agent keeps every undo in its state: it carries no content.
        let form = serde_json::to_value(&undo).unwrap();
        assert_eq!((form["state"].as_str(), form["content"].as_str()), (Some("absent"), Some("")));
    }

    #[tokio::test]
    async fn refuses_directories_bad_modes_and_escaping_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let m = maestro(dir.path()).await;
        assert!(m.interpret(&file("/d", "x", None, PresenceState::Present)).await.is_err());
        let err = m.interpret(&file("/x", "x", Some(0o10000), PresenceState::Present)).await.unwrap_err();
        assert_eq!(err.kind(), harmony_topology::InterpretErrorKind::InvalidInput);
        assert!(m.interpret(&file("/x", "x", Some(0o14755), PresenceState::Present)).await.is_err());
        let err = m.interpret(&file("/../escape", "x", None, PresenceState::Present)).await.unwrap_err();
        assert!(err.message().contains(".."), "{err}");
        assert!(!dir.path().parent().unwrap().join("escape").exists());
        assert!(!dir.path().join("x").exists());
    }

    // Attack: a FileScore naming a path that holds a huge file (a disk
    // image, a log; here a sparse one of 1 TiB). The Interpret reads the
    // whole file to compare it with `content` (at most 1 MiB, the document
    // bound): the read fails for want of memory and the Score can never
    // converge; on a small device a file of a few GiB gets the agent
    // killed for memory at every resync instead.
    #[tokio::test]
    async fn a_huge_existing_file_is_replaced_without_reading_it_whole() {
        // Only where a 1 TiB allocation is refused rather than granted lazily.
        let overcommit = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap_or_default();
        if overcommit.trim() == "1" {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::File::create(dir.path().join("big")).unwrap().set_len(1 << 40).unwrap();
        let m = maestro(dir.path()).await;
        let out = m.interpret(&file("/big", "small now", None, PresenceState::Present)).await;
        assert_eq!(out.map(|o| o.status).map_err(|e| e.to_string()), Ok(InterpretStatus::SUCCESS));
        assert_eq!(std::fs::read_to_string(dir.path().join("big")).unwrap(), "small now");
    }

    // Issue 7 §5: setuid and setgid are the device policy's decision. The
    // Score is valid and declares the privilege; it is the agent that
    // refuses it unless `allow_setuid`, and the mode is then set exactly.
    #[tokio::test]
    async fn a_setuid_mode_is_valid_declares_its_privilege_and_is_set_exactly() {
        use harmony_score_wire::Privilege;
        use std::os::unix::fs::PermissionsExt;
        let setuid = file("/bin-x", "x", Some(0o4755), PresenceState::Present);
        assert!(setuid.validate().is_ok());
        assert_eq!(setuid.privileges(), [Privilege::SetuidMode]);
        assert_eq!(
            file("/g", "x", Some(0o2711), PresenceState::Present).privileges(),
            [Privilege::SetuidMode]
        );
        assert!(file("/x", "x", Some(0o1777), PresenceState::Present).privileges().is_empty());
        assert!(file("/x", "x", Some(0o4755), PresenceState::Absent).privileges().is_empty());
        assert!(setuid.undo().unwrap().privileges().is_empty(), "removing a setuid file needs no privilege");
        let dir = tempfile::tempdir().unwrap();
        let m = maestro(dir.path()).await;
        m.interpret(&setuid).await.unwrap();
        let mode = std::fs::metadata(dir.path().join("bin-x")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o4755);
    }

    #[test]
    fn validation_names_the_field_and_aliases_share_a_resource() {
        assert!(file("/etc//motd/", "x", Some(0o644), PresenceState::Present).validate().is_ok());
        for (score, field) in [
            (file("etc/motd", "x", None, PresenceState::Present), "path"),
            (file("/etc/mo\ntd", "x", None, PresenceState::Present), "path"),
            (file("/a\0b", "x", None, PresenceState::Present), "path"),
            (file("/a/../b", "x", None, PresenceState::Present), "path"),
            (file("/x", "x", Some(u32::MAX), PresenceState::Present), "mode"),
            (file("/x", "x", Some(0o10000), PresenceState::Present), "mode"),
        ] {
            assert_eq!(score.validate().unwrap_err().field, field, "{score:?}");
        }
        let a = file("/etc//x/", "", None, PresenceState::Present).resource();
        let b = crate::DirectoryScore { path: "/./etc/x".into(), mode: None, state: PresenceState::Present };
        assert_eq!(a, b.resource());
    }

    use std::os::unix::fs::MetadataExt;
}
