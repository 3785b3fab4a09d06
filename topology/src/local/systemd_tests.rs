//! The systemd adapter against a temp root, with the real `systemctl` and `systemd-analyze`.

use std::os::unix::fs::PermissionsExt;

use super::*;

/// A temp root holding an executable `/usr/bin/app`, for `ExecStart=`
/// (verification checks it exists beneath the root). `None` (with the
/// reason printed) where systemd's tools are not installed.
async fn root_with_app() -> Option<tempfile::TempDir> {
    for tool in ["systemctl", "systemd-analyze"] {
        if Tool::new(tool, ["--version"]).run().await.is_err() {
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

const GOOD: &str =
    "[Unit]\nDescription=App\n\n[Service]\nExecStart=/usr/bin/app\n\n[Install]\nWantedBy=multi-user.target\n";

#[tokio::test]
async fn a_verified_unit_is_installed_enabled_and_disabled_offline() {
    let Some(dir) = root_with_app().await else { return };
    let topo = LocalDeviceTopology::new(dir.path());
    let ServiceRuntime::Offline { reason } = topo.service_runtime().await else {
        panic!("a temp root is offline")
    };
    assert!(reason.contains("no systemd manages this root"), "{reason}");

    assert_eq!(topo.unit_file("app.service").await.unwrap(), None);
    topo.write_unit("app.service", GOOD.as_bytes()).await.unwrap();
    let on_disk = dir.path().join("etc/systemd/system/app.service");
    assert_eq!(std::fs::read_to_string(&on_disk).unwrap(), GOOD);
    assert_eq!(std::fs::metadata(&on_disk).unwrap().permissions().mode() & 0o7777, 0o644);
    assert_eq!(topo.unit_file("app.service").await.unwrap().as_deref(), Some(GOOD.as_bytes()));
    // Nothing of the verification is left beside the unit.
    let names: Vec<_> = std::fs::read_dir(dir.path().join("etc/systemd/system"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["app.service"]);

    assert_eq!(topo.enablement("app.service").await.unwrap(), Enablement::Disabled);
    topo.enable("app.service").await.unwrap();
    let wants = dir.path().join("etc/systemd/system/multi-user.target.wants/app.service");
    assert_eq!(std::fs::read_link(&wants).unwrap(), Path::new("/etc/systemd/system/app.service"));
    assert_eq!(topo.enablement("app.service").await.unwrap(), Enablement::Enabled);
    topo.disable("app.service").await.unwrap();
    assert!(std::fs::symlink_metadata(&wants).is_err());
    topo.remove_unit("app.service").await.unwrap();
    topo.remove_unit("app.service").await.unwrap();
    assert!(!on_disk.exists());

    for result in [
        topo.start("app.service").await,
        topo.stop("app.service").await,
        topo.daemon_reload().await,
        topo.unit_state("app.service").await.map(drop),
    ] {
        assert!(matches!(result, Err(ServiceError::NotRunning { .. })), "{result:?}");
    }
}

#[tokio::test]
async fn an_invalid_unit_carries_the_validators_message_and_replaces_nothing() {
    let Some(dir) = root_with_app().await else { return };
    let topo = LocalDeviceTopology::new(dir.path());
    topo.write_unit("app.service", GOOD.as_bytes()).await.unwrap();
    let unit_dir = dir.path().join("etc/systemd/system");

    let cases = [
        ("[Service]\nExecStart=relative/path\n", "Neither a valid executable name nor an absolute path"),
        (
            "[Service]\nExecStart=/usr/bin/app\nRestart=sometimes\n",
            "Failed to parse service restart specifier",
        ),
        ("[Unit]\nDescripton=typo\n[Service]\nExecStart=/usr/bin/app\n", "Unknown key 'Descripton'"),
        ("[Service]\nExecStart=/usr/bin/missing\n", "/usr/bin/missing is not executable"),
        ("not a unit\n", "has no ExecStart="),
    ];
    for (content, expected) in cases {
        let err = topo.write_unit("app.service", content.as_bytes()).await.unwrap_err();
        let ServiceError::InvalidUnit { unit, message } = &err else { panic!("{err:?}") };
        assert_eq!(unit, "app.service");
        assert!(message.contains(expected), "{content:?}: {message}");
        // The device's path, not the scratch directory's.
        assert!(
            !message.contains(".harmony-verify") && !message.contains(&*dir.path().to_string_lossy()),
            "{message}"
        );
        assert_eq!(std::fs::read_to_string(unit_dir.join("app.service")).unwrap(), GOOD);
        assert!(matches!(
            topo.verify_unit("app.service", content.as_bytes()).await,
            Err(ServiceError::InvalidUnit { .. })
        ));
    }
    topo.verify_unit("app.service", GOOD.as_bytes()).await.unwrap();
    let names: Vec<_> = std::fs::read_dir(&unit_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["app.service"], "no scratch directory is left behind");
}

#[tokio::test]
async fn bad_names_and_a_masked_unit_are_refused_and_left_alone() {
    let Some(dir) = root_with_app().await else { return };
    let topo = LocalDeviceTopology::new(dir.path());
    for name in ["../x.service", "x", ".x.service", "a/b.service", "x@.service", "x.device"] {
        assert!(matches!(
            topo.write_unit(name, GOOD.as_bytes()).await,
            Err(ServiceError::InvalidUnitName { .. })
        ));
        assert!(matches!(topo.enable(name).await, Err(ServiceError::InvalidUnitName { .. })));
    }
    let unit_dir = dir.path().join("etc/systemd/system");
    std::fs::create_dir_all(&unit_dir).unwrap();
    std::os::unix::fs::symlink("/dev/null", unit_dir.join("masked.service")).unwrap();
    assert!(matches!(topo.unit_file("masked.service").await, Err(ServiceError::NotAUnitFile { .. })));
    assert!(matches!(
        topo.write_unit("masked.service", GOOD.as_bytes()).await,
        Err(ServiceError::NotAUnitFile { .. })
    ));
    assert!(matches!(topo.remove_unit("masked.service").await, Err(ServiceError::NotAUnitFile { .. })));
    assert_eq!(topo.enablement("masked.service").await.unwrap(), Enablement::Masked);
    assert_eq!(std::fs::read_link(unit_dir.join("masked.service")).unwrap(), Path::new("/dev/null"));
}

#[test]
fn unit_names_follow_systemd_rules() {
    for ok in
        ["a.service", "app-1_x:y.timer", "foo@bar.service", "var-lib\\x2dapp.mount", "multi-user.target"]
    {
        assert!(check_unit_name(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "a",
        ".service",
        "a.",
        "a.device",
        "a b.service",
        "a/b.path",
        "@x.service",
        "x@.service",
        "é.service",
    ] {
        assert!(check_unit_name(bad).is_err(), "{bad}");
    }
    assert!(check_unit_name(&format!("{}.service", "a".repeat(247))).is_ok());
    assert!(check_unit_name(&format!("{}.service", "a".repeat(248))).is_err());
}

#[test]
fn systemctl_answers_are_read() {
    assert_eq!(parse_enablement("enabled"), Enablement::Enabled);
    assert_eq!(parse_enablement("enabled-runtime"), Enablement::Disabled);
    assert_eq!(parse_enablement("static"), Enablement::Static);
    assert_eq!(parse_enablement("masked-runtime"), Enablement::Masked);
    assert_eq!(parse_enablement("alias"), Enablement::Other("alias".into()));
    let state = parse_show("ActiveState=active\nSubState=running\nNeedDaemonReload=yes\n");
    assert!(state.is_running() && state.needs_reload && state.sub_state == "running");
    assert!(!parse_show("ActiveState=failed\nNeedDaemonReload=no").is_running());
}
