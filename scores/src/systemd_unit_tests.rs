//! `SystemdUnitScore` against a temp root with the real systemd tools (offline), and against a fake live systemd.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use harmony_topology::{
    InterpretErrorKind, Maestro, PreparationError, PreparationOutcome, ServiceError, UnitState,
};

use super::*;

const GOOD: &str =
    "[Unit]\nDescription=App\n\n[Service]\nExecStart=/usr/bin/app\n\n[Install]\nWantedBy=multi-user.target\n";

fn unit(name: &str, content: &str, enabled: bool, state: ServiceState) -> SystemdUnitScore {
    SystemdUnitScore { name: name.into(), content: content.into(), enabled, state }
}

/// A temp root with an executable `/usr/bin/app` (verification looks for
/// `ExecStart=` programs beneath the root); `None`, saying why, where
/// systemd's tools are missing.
fn root_with_app() -> Option<tempfile::TempDir> {
    for tool in ["systemctl", "systemd-analyze"] {
        if std::process::Command::new(tool).arg("--version").output().is_err() {
            eprintln!("skipped: {tool} is not installed (scripts/install-test-deps installs it)");
            return None;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("usr/bin")).unwrap();
    std::fs::write(dir.path().join("usr/bin/app"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(dir.path().join("usr/bin/app"), std::fs::Permissions::from_mode(0o755)).unwrap();
    Some(dir)
}

async fn maestro(root: &Path) -> Maestro<LocalDeviceTopology> {
    Maestro::initialize(Inventory::empty(), LocalDeviceTopology::new(root)).await.unwrap()
}

fn wants(root: &Path, name: &str) -> std::path::PathBuf {
    root.join("etc/systemd/system/multi-user.target.wants").join(name)
}

#[tokio::test]
async fn offline_the_unit_is_written_and_enabled_and_the_start_is_blocked_with_its_reason() {
    let Some(dir) = root_with_app() else { return };
    let m = maestro(dir.path()).await;
    let score = unit("app.service", GOOD, true, ServiceState::Running);

    let first = m.interpret(&score).await.unwrap();
    assert_eq!(first.status, InterpretStatus::BLOCKED, "{first:?}");
    assert_eq!(
        first.message,
        format!(
            "app.service: unit file written, enabled; not started: no systemd manages this root ({} is not the host's /)",
            dir.path().display()
        )
    );
    assert_eq!(first.details, ["unit file written", "enabled"]);
    let file = dir.path().join("etc/systemd/system/app.service");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), GOOD);
    assert_eq!(
        std::fs::read_link(wants(dir.path(), "app.service")).unwrap(),
        Path::new("/etc/systemd/system/app.service")
    );

    // A rerun changes nothing; the start is still impossible, so still BLOCKED.
    let before = std::fs::metadata(&file).unwrap();
    let again = m.interpret(&score).await.unwrap();
    assert_eq!(again.status, InterpretStatus::BLOCKED);
    assert!(
        again.message.starts_with("app.service: up to date; not started: no systemd manages this root"),
        "{}",
        again.message
    );
    assert!(again.details.is_empty());
    let after = std::fs::metadata(&file).unwrap();
    assert_eq!((before.ino(), before.modified().unwrap()), (after.ino(), after.modified().unwrap()));

    // Stopped holds where nothing runs: nothing blocks it.
    let stopped = unit("app.service", GOOD, true, ServiceState::Stopped);
    assert_eq!(m.interpret(&stopped).await.unwrap().status, InterpretStatus::NOOP);
    let disabled = unit("app.service", GOOD, false, ServiceState::Stopped);
    let out = m.interpret(&disabled).await.unwrap();
    assert_eq!((out.status, out.message.as_str()), (InterpretStatus::SUCCESS, "app.service: disabled"));
    assert!(std::fs::symlink_metadata(wants(dir.path(), "app.service")).is_err());
    assert_eq!(m.interpret(&disabled).await.unwrap().status, InterpretStatus::NOOP);
}

#[tokio::test]
async fn invalid_content_fails_with_the_validators_message_and_the_good_unit_stays() {
    let Some(dir) = root_with_app() else { return };
    let m = maestro(dir.path()).await;
    m.interpret(&unit("app.service", GOOD, true, ServiceState::Running)).await.unwrap();

    let bad = GOOD.replace("ExecStart=/usr/bin/app", "ExecStart=/usr/bin/app\nRestart=sometimes");
    let err = m.interpret(&unit("app.service", &bad, true, ServiceState::Running)).await.unwrap_err();
    assert_eq!(err.kind(), InterpretErrorKind::InvalidInput);
    assert!(err.message().starts_with("unit app.service is not valid: "), "{err}");
    assert!(
        err.message()
            .contains("/etc/systemd/system/app.service:6: Failed to parse service restart specifier"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(dir.path().join("etc/systemd/system/app.service")).unwrap(), GOOD);
    assert!(std::fs::read_link(wants(dir.path(), "app.service")).is_ok());

    // A program missing beneath the root is what systemd says it is, too.
    let missing = GOOD.replace("/usr/bin/app", "/opt/none/bin/server");
    let err = m.interpret(&unit("other.service", &missing, true, ServiceState::Running)).await.unwrap_err();
    assert!(err.message().contains("Command /opt/none/bin/server is not executable"), "{err}");
    assert!(!dir.path().join("etc/systemd/system/other.service").exists());
}

#[tokio::test]
async fn undo_disables_and_removes_then_is_a_noop() {
    let Some(dir) = root_with_app() else { return };
    let m = maestro(dir.path()).await;
    let score = unit("app.service", GOOD, true, ServiceState::Running);
    m.interpret(&score).await.unwrap();

    let undo = score.undo().unwrap();
    assert_eq!(undo.resource(), score.resource());
    assert_eq!(undo.resource().to_string(), "unit:app.service");
    let out = m.interpret(undo.as_ref()).await.unwrap();
    assert_eq!(
        (out.status, out.message.as_str()),
        (InterpretStatus::SUCCESS, "app.service: disabled, unit file removed")
    );
    assert!(!dir.path().join("etc/systemd/system/app.service").exists());
    assert!(std::fs::symlink_metadata(wants(dir.path(), "app.service")).is_err());
    assert_eq!(m.interpret(undo.as_ref()).await.unwrap().status, InterpretStatus::NOOP);
    assert!(undo.undo().is_none());
    // The agent keeps every undo: it carries no content.
    let form = serde_json::to_value(&undo).unwrap();
    assert_eq!(
        form,
        serde_json::json!({"type": "harmony.systemd.unit/v1", "name": "app.service", "content": "", "enabled": false, "state": "absent"})
    );
}

#[tokio::test]
async fn a_masked_unit_is_left_masked() {
    let Some(dir) = root_with_app() else { return };
    let unit_dir = dir.path().join("etc/systemd/system");
    std::fs::create_dir_all(&unit_dir).unwrap();
    std::os::unix::fs::symlink("/dev/null", unit_dir.join("app.service")).unwrap();
    let m = maestro(dir.path()).await;
    let err = m.interpret(&unit("app.service", GOOD, true, ServiceState::Running)).await.unwrap_err();
    assert!(err.message().contains("not a regular file"), "{err}");
    let undo = unit("app.service", GOOD, true, ServiceState::Running).undo().unwrap();
    assert!(m.interpret(undo.as_ref()).await.is_err());
    assert_eq!(std::fs::read_link(unit_dir.join("app.service")).unwrap(), Path::new("/dev/null"));
}

#[test]
fn validation_names_the_field_and_the_defaults_are_enabled_and_running() {
    assert!(unit("app.service", GOOD, true, ServiceState::Running).validate().is_ok());
    assert!(unit("app.service", "", false, ServiceState::Absent).validate().is_ok());
    for (score, field) in [
        (unit("app", GOOD, true, ServiceState::Running), "name"),
        (unit("../x.service", GOOD, true, ServiceState::Running), "name"),
        (unit("app.device", GOOD, true, ServiceState::Running), "name"),
        (unit("a\nb.service", GOOD, true, ServiceState::Running), "name"),
        (unit(&format!("{}.service", "a".repeat(300)), GOOD, true, ServiceState::Running), "name"),
        (unit("app.service", "", true, ServiceState::Running), "content"),
        (unit("app.service", "[Unit]\0", true, ServiceState::Running), "content"),
        (
            unit("app.service", &"#".repeat(MAX_UNIT_CONTENT_BYTES + 1), true, ServiceState::Stopped),
            "content",
        ),
    ] {
        assert_eq!(score.validate().unwrap_err().field, field, "{score:?}");
    }
    let short: SystemdUnitScore =
        serde_json::from_str(r#"{"name": "a.timer", "content": "[Timer]\n"}"#).unwrap();
    assert_eq!(short, unit("a.timer", "[Timer]\n", true, ServiceState::Running));
}

/// A live systemd, faked: one unit, and every call it gets.
#[derive(Debug, Default)]
struct FakeSystemd(Mutex<Fake>);

#[derive(Debug, Default)]
struct Fake {
    file: Option<Vec<u8>>,
    enabled: bool,
    running: bool,
    loaded: Option<Vec<u8>>,
    calls: Vec<&'static str>,
}

impl FakeSystemd {
    fn calls(&self) -> Vec<&'static str> {
        std::mem::take(&mut self.0.lock().unwrap().calls)
    }
    fn with<R>(&self, call: &'static str, f: impl FnOnce(&mut Fake) -> R) -> R {
        let mut fake = self.0.lock().unwrap();
        fake.calls.push(call);
        f(&mut fake)
    }
}

#[async_trait]
impl Topology for FakeSystemd {
    fn name(&self) -> &str {
        "fake-systemd"
    }
    async fn ensure_ready(&self) -> Result<PreparationOutcome, PreparationError> {
        Ok(PreparationOutcome::Noop)
    }
}

#[async_trait]
impl ServiceManager for FakeSystemd {
    async fn service_runtime(&self) -> ServiceRuntime {
        ServiceRuntime::Live
    }
    async fn unit_file(&self, _: &str) -> Result<Option<Vec<u8>>, ServiceError> {
        Ok(self.0.lock().unwrap().file.clone())
    }
    async fn verify_unit(&self, _: &str, _: &[u8]) -> Result<(), ServiceError> {
        Ok(())
    }
    async fn write_unit(&self, _: &str, content: &[u8]) -> Result<(), ServiceError> {
        self.with("write", |f| f.file = Some(content.to_vec()));
        Ok(())
    }
    async fn remove_unit(&self, _: &str) -> Result<(), ServiceError> {
        self.with("remove", |f| f.file = None);
        Ok(())
    }
    async fn enablement(&self, _: &str) -> Result<Enablement, ServiceError> {
        let enabled = self.0.lock().unwrap().enabled;
        Ok(if enabled { Enablement::Enabled } else { Enablement::Disabled })
    }
    async fn enable(&self, _: &str) -> Result<(), ServiceError> {
        self.with("enable", |f| f.enabled = true);
        Ok(())
    }
    async fn disable(&self, _: &str) -> Result<(), ServiceError> {
        self.with("disable", |f| f.enabled = false);
        Ok(())
    }
    async fn unit_state(&self, _: &str) -> Result<UnitState, ServiceError> {
        let f = self.0.lock().unwrap();
        Ok(UnitState {
            active_state: if f.running { "active" } else { "inactive" }.into(),
            sub_state: String::new(),
            needs_reload: f.loaded != f.file,
        })
    }
    async fn daemon_reload(&self) -> Result<(), ServiceError> {
        self.with("daemon-reload", |f| f.loaded = f.file.clone());
        Ok(())
    }
    async fn start(&self, _: &str) -> Result<(), ServiceError> {
        self.with("start", |f| f.running = true);
        Ok(())
    }
    async fn stop(&self, _: &str) -> Result<(), ServiceError> {
        self.with("stop", |f| f.running = false);
        Ok(())
    }
    async fn restart(&self, _: &str) -> Result<(), ServiceError> {
        self.with("restart", |f| f.running = true);
        Ok(())
    }
}

#[tokio::test]
async fn with_a_live_systemd_it_reloads_starts_restarts_on_change_stops_and_removes() {
    let m = Maestro::initialize(Inventory::empty(), FakeSystemd::default()).await.unwrap();
    let fake = m.topology();
    let score = unit("app.service", GOOD, true, ServiceState::Running);
    let out = m.interpret(&score).await.unwrap();
    assert_eq!(out.status, InterpretStatus::SUCCESS);
    assert_eq!(out.message, "app.service: unit file written, enabled, systemd reloaded, started");
    assert_eq!(fake.calls(), ["write", "enable", "daemon-reload", "start"]);

    assert_eq!(m.interpret(&score).await.unwrap().status, InterpretStatus::NOOP);
    assert!(fake.calls().is_empty());

    // Killed by hand: started again.
    fake.0.lock().unwrap().running = false;
    assert_eq!(m.interpret(&score).await.unwrap().message, "app.service: started");
    assert_eq!(fake.calls(), ["start"]);

    // A file written but never loaded (a crash before the reload): reloaded.
    fake.0.lock().unwrap().loaded = None;
    assert_eq!(m.interpret(&score).await.unwrap().message, "app.service: systemd reloaded");
    fake.calls();

    let changed = unit("app.service", &GOOD.replace("App", "App 2"), true, ServiceState::Running);
    m.interpret(&changed).await.unwrap();
    assert_eq!(fake.calls(), ["write", "disable", "enable", "daemon-reload", "restart"]);

    let stopped = unit("app.service", &GOOD.replace("App", "App 2"), false, ServiceState::Stopped);
    assert_eq!(m.interpret(&stopped).await.unwrap().message, "app.service: disabled, stopped");
    assert_eq!(fake.calls(), ["disable", "stop"]);

    m.interpret(&changed).await.unwrap();
    fake.calls();
    // The undo's own struct, run against the fake.
    let absent = unit("app.service", "", false, ServiceState::Absent);
    assert_eq!(serde_json::to_value(changed.undo().unwrap()).unwrap()["state"], "absent");
    let out = m.interpret(&absent).await.unwrap();
    assert_eq!(out.message, "app.service: stopped, disabled, unit file removed, systemd reloaded");
    assert_eq!(fake.calls(), ["stop", "disable", "remove", "daemon-reload"]);
    assert_eq!(m.interpret(&absent).await.unwrap().status, InterpretStatus::NOOP);
}
