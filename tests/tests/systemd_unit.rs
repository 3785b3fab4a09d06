//! A systemd unit deployed through a real agent and nats-server to a root no systemd manages: written, enabled, BLOCKED for the start, pruned on delete.

use harmony_e2e::{agent_config, until_status, within, InProcessAgent, NatsServer};
use harmony_fleet::{DeployRequest, FleetClient};
use harmony_score_wire::{DeploymentName, DeviceId, DeviceScore, Phase};
use harmony_scores::{FileScore, PresenceState, ServiceState, SystemdUnitScore};
use harmony_topology::InterpretStatus;

const UNIT: &str =
    "[Unit]\nDescription=App\n\n[Service]\nExecStart=/usr/bin/app\n\n[Install]\nWantedBy=multi-user.target\n";

fn tools_present() -> bool {
    for tool in ["systemctl", "systemd-analyze"] {
        if std::process::Command::new(tool).arg("--version").output().is_err() {
            eprintln!("skipped: {tool} is not installed (scripts/install-test-deps installs it)");
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_on_an_offline_root_is_enabled_reported_blocked_and_pruned_on_delete() {
    if !tools_present() {
        return;
    }
    harmony_scores::ensure_linked();
    let nats = NatsServer::start();
    let client = within(FleetClient::connect(&[nats.url()], None)).await.unwrap();
    within(client.ensure_buckets()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = agent_config("dev-1", &nats.url(), dir.path(), 3600);
    // A unit's commands run as root: the device owner allows it explicitly.
    config.policy.allow_system_services = true;
    let agent = InProcessAgent::start(config);
    let device = DeviceId::new("dev-1").unwrap();
    let deployment = DeploymentName::new("app").unwrap();
    until_status(&client, &device, "online", |s| s.info.is_some()).await;

    // The program first: systemd verifies the unit against the root.
    let scores: Vec<Box<dyn DeviceScore>> = vec![
        Box::new(FileScore {
            path: "/usr/bin/app".into(),
            content: "#!/bin/sh\nexec sleep infinity\n".into(),
            mode: Some(0o755),
            state: PresenceState::Present,
        }),
        Box::new(SystemdUnitScore {
            name: "app.service".into(),
            content: UNIT.into(),
            enabled: true,
            state: ServiceState::Running,
        }),
    ];
    let request = DeployRequest::new(device.clone(), deployment.clone(), scores).force(true);
    let generation = within(client.deploy(request)).await.unwrap().generation;
    let status = until_status(&client, &device, "app applied", |s| {
        s.deployments
            .get(&deployment)
            .is_some_and(|d| d.phase == Phase::Applied && d.observed_generation == generation)
    })
    .await;

    let app = &status.deployments[&deployment];
    assert_eq!(app.error, None);
    let unit = &app.scores[1];
    assert_eq!(
        (unit.tag.as_str(), unit.name.as_str()),
        ("harmony.systemd.unit/v1", "systemd unit [app.service]")
    );
    assert_eq!(unit.resource, "unit:app.service");
    assert_eq!(unit.status, InterpretStatus::BLOCKED, "{unit:?}");
    assert!(
        unit.message.starts_with(
            "app.service: unit file written, enabled; not started: no systemd manages this root"
        ),
        "{}",
        unit.message
    );
    let root = dir.path().join("root");
    assert_eq!(std::fs::read_to_string(root.join("etc/systemd/system/app.service")).unwrap(), UNIT);
    let wants = root.join("etc/systemd/system/multi-user.target.wants/app.service");
    assert_eq!(std::fs::read_link(&wants).unwrap(), std::path::Path::new("/etc/systemd/system/app.service"));

    // Deleting the deployment disables and removes the unit.
    assert!(within(client.delete(&device, &deployment)).await.unwrap());
    until_status(&client, &device, "app pruned", |s| {
        s.deployments.get(&deployment).is_none_or(|d| d.phase == Phase::Pruned)
    })
    .await;
    assert!(!root.join("etc/systemd/system/app.service").exists());
    assert!(std::fs::symlink_metadata(&wants).is_err());
    assert!(!root.join("usr/bin/app").exists());
    agent.stop().await.unwrap();
}
