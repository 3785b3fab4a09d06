//! `DeviceDeploymentScore` run by a `Maestro` on a `FleetTopology`, against stand-in agents that report status.

use std::collections::BTreeMap;
use std::time::Duration;

use harmony_e2e::{report_status, reported_status, within, NatsServer};
use harmony_fleet::{DeviceDeploymentScore, FleetClient, FleetTopology};
use harmony_score_wire::names::{desired_state_key, DESIRED_STATE_BUCKET};
use harmony_score_wire::{
    document_digest, now_ms, peek_generation, DecodeLimits, DeploymentName, DeploymentStatus, DeviceId,
    DeviceScore, Phase, ScoreStatus,
};
use harmony_scores::{FileScore, PresenceState};
use harmony_topology::{InterpretStatus, Inventory, Maestro, Score};

fn dev(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

fn motd(content: &str) -> Vec<Box<dyn DeviceScore>> {
    vec![Box::new(FileScore {
        path: "/etc/motd".into(),
        content: content.into(),
        mode: None,
        state: PresenceState::Present,
    })]
}

fn score(devices: &[&str], content: &str, wait: Option<u64>) -> DeviceDeploymentScore {
    DeviceDeploymentScore {
        devices: devices.iter().map(|d| dev(d)).collect(),
        deployment: DeploymentName::new("motd").unwrap(),
        scores: motd(content),
        wait,
        force: false,
        generation: None,
        expires_at: None,
        health: Vec::new(),
        health_timeout_s: None,
    }
}

/// A stand-in agent: reports every deployment in the device's index at the
/// generation and digest of the document its key holds, in `phase`, with
/// one Score status.
fn fake_agent(client: FleetClient, device: DeviceId, phase: Phase) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        client.ensure_buckets().await.unwrap();
        let kv = client.jetstream().get_key_value(DESIRED_STATE_BUCKET).await.unwrap();
        loop {
            let index = client.deployment_index(&device).await.unwrap();
            let (observed, score_status) = match phase {
                Phase::Applied => (true, InterpretStatus::SUCCESS),
                _ => (false, InterpretStatus::FAILURE),
            };
            let mut deployments = BTreeMap::new();
            for name in index.deployments.into_keys() {
                let Some(bytes) = kv.get(desired_state_key(&device, &name)).await.unwrap() else { continue };
                let generation = peek_generation(&bytes, &DecodeLimits::default()).unwrap();
                let digest = Some(document_digest(&bytes));
                let status = DeploymentStatus {
                    desired_generation: generation,
                    observed_generation: if observed { generation } else { 0 },
                    phase,
                    scores: vec![ScoreStatus {
                        tag: "harmony.file/v1".into(),
                        name: "file [/etc/motd]".into(),
                        resource: "file:/etc/motd".into(),
                        status: score_status,
                        message: "/etc/motd written".into(),
                        details: Vec::new(),
                        error_kind: None,
                    }],
                    error: None,
                    last_attempt_at_ms: now_ms(),
                    last_applied_at_ms: 0,
                    desired_digest: digest.clone(),
                    observed_digest: if observed { digest } else { None },
                    ..Default::default()
                };
                deployments.insert(name, status);
            }
            report_status(&client, &reported_status(&device, Some(&["harmony.file/v1"]), deployments)).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

async fn maestro(server: &NatsServer) -> (FleetClient, Maestro<FleetTopology>) {
    let client = within(FleetClient::connect(&[server.url()], None)).await.unwrap();
    let maestro = within(Maestro::initialize(Inventory::empty(), FleetTopology::from_client(client.clone())))
        .await
        .unwrap();
    (client, maestro)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_to_each_device_waits_and_is_noop_when_nothing_changed() {
    let server = NatsServer::start();
    let (client, maestro) = maestro(&server).await;
    let agents = [
        fake_agent(client.clone(), dev("dev-1"), Phase::Applied),
        fake_agent(client.clone(), dev("dev-2"), Phase::Applied),
    ];
    // The agents have reported (with their supported tags) once the statuses exist.
    within(async {
        while client.list_statuses().await.unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    let first = within(maestro.interpret(&score(&["dev-1", "dev-2"], "hello\n", Some(10)))).await.unwrap();
    assert_eq!(first.status, InterpretStatus::SUCCESS, "{first:?}");
    assert_eq!(
        first.details,
        [
            "dev-1: SUCCESS generation 1 written, applied (1 SUCCESS)",
            "  file [/etc/motd]: SUCCESS /etc/motd written",
            "dev-2: SUCCESS generation 1 written, applied (1 SUCCESS)",
            "  file [/etc/motd]: SUCCESS /etc/motd written",
        ]
    );

    let again = within(maestro.interpret(&score(&["dev-1", "dev-2"], "hello\n", Some(10)))).await.unwrap();
    assert_eq!(again.status, InterpretStatus::NOOP, "{again:?}");
    assert!(again.details[0].starts_with("dev-1: NOOP generation 1 already deployed"), "{again:?}");
    assert_eq!(
        within(client.deployment_index(&dev("dev-1"))).await.unwrap().deployments.values().sum::<u64>(),
        1
    );

    let changed = within(maestro.interpret(&score(&["dev-1"], "changed\n", None))).await.unwrap();
    assert_eq!(changed.status, InterpretStatus::SUCCESS);
    assert_eq!(changed.details, ["dev-1: SUCCESS generation 2 written"]);
    for agent in agents {
        agent.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_fails_or_never_reported_fails_the_score_with_details() {
    let server = NatsServer::start();
    let (client, maestro) = maestro(&server).await;
    let agent = fake_agent(client.clone(), dev("dev-bad"), Phase::Failed);
    within(async {
        while client.device_status(&dev("dev-bad")).await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    let outcome = within(maestro.interpret(&score(&["dev-bad", "dev-new"], "x", Some(10)))).await.unwrap();
    assert_eq!(outcome.status, InterpretStatus::FAILURE, "{outcome:?}");
    assert!(outcome.message.contains("2 of 2 devices failed"), "{}", outcome.message);
    assert!(
        outcome.details[0].starts_with("dev-bad: FAILURE generation 1 written, not applied"),
        "{outcome:?}"
    );
    assert_eq!(outcome.details[1], "  file [/etc/motd]: FAILURE /etc/motd written");
    assert!(
        outcome.details[2].starts_with("dev-new: FAILURE not deployed: device dev-new has never reported")
    );
    agent.abort();
}

// Regression: the wait counted `observed >= written` as applied, so a device
// still running generation 3 of old content (the key had been purged and
// numbering restarted) was reported SUCCESS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_running_a_newer_generation_fails_the_score_as_superseded() {
    let server = NatsServer::start();
    let (client, maestro) = maestro(&server).await;
    let device = dev("dev-1");
    let old = DeploymentStatus {
        desired_generation: 3,
        observed_generation: 3,
        phase: Phase::Applied,
        desired_digest: Some("sha256:01d".into()),
        observed_digest: Some("sha256:01d".into()),
        ..Default::default()
    };
    let status = reported_status(
        &device,
        Some(&["harmony.file/v1"]),
        [(DeploymentName::new("motd").unwrap(), old)].into(),
    );
    report_status(&client, &status).await;

    let outcome = within(maestro.interpret(&score(&["dev-1"], "new\n", Some(20)))).await.unwrap();
    assert_eq!(outcome.status, InterpretStatus::FAILURE, "{outcome:?}");
    assert!(
        outcome.details[0].starts_with("dev-1: FAILURE generation 1 written, not applied")
            && outcome.details[0].contains("superseded"),
        "{outcome:?}"
    );
}

#[test]
fn the_score_round_trips_through_json_with_its_wire_tags() {
    harmony_scores::ensure_linked();
    let original = score(&["dev-1"], "hello\n", Some(30));
    let json = serde_json::to_value(&original).unwrap();
    assert_eq!(json["scores"][0]["type"], "harmony.file/v1");
    assert_eq!(json["wait"], 30);
    let back: DeviceDeploymentScore = serde_json::from_value(json).unwrap();
    assert_eq!(format!("{back:?}"), format!("{original:?}"));
    assert_eq!(Score::<FleetTopology>::name(&back), "device deployment [motd]");
}

// Issue 10 §4 ("waiting on a fleet"): one consumer per awaited device hit
// the server's consumer limit past 1,000 and fell back to polling. The
// wait now follows every device with one watch: the status stream never
// holds more than that one consumer while 300 real agents are awaited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_to_300_agents_is_awaited_with_one_consumer() {
    use harmony_e2e::{agent_config, InProcessAgent};
    use harmony_score_wire::names::AGENT_STATUS_BUCKET;
    harmony_scores::ensure_linked();
    let server = NatsServer::start();
    let (client, maestro) = maestro(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..300).map(|i| format!("dev-{i}")).collect();
    let agents: Vec<InProcessAgent> = ids
        .iter()
        .map(|id| InProcessAgent::start(agent_config(id, &server.url(), &dir.path().join(id), 3600)))
        .collect();
    let mut ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    // Online: every agent reported the tags it supports.
    within(async {
        while client.list_statuses().await.map_or(0, |s| s.len()) < ids.len() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // One device that never answers keeps the wait open until its timeout,
    // so the sampler below sees the wait's consumers for seconds.
    ids.push("dev-offline");
    // The most consumers the status stream held while the Score ran.
    let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = {
        let (js, most) = (client.jetstream().clone(), most.clone());
        let stream = format!("KV_{AGENT_STATUS_BUCKET}");
        tokio::spawn(async move {
            loop {
                if let Ok(mut s) = js.get_stream(&stream).await {
                    if let Ok(info) = s.info().await {
                        most.fetch_max(info.state.consumer_count, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = std::time::Instant::now();
    let mut fleet = score(&ids, "fleet\n", Some(3));
    fleet.force = true;
    let outcome = within(maestro.interpret(&fleet)).await.unwrap();
    let took = started.elapsed();
    sampler.abort();
    assert!(
        outcome.message.contains("1 of 301 devices failed"),
        "{}\n{}",
        outcome.message,
        outcome.details.join("\n")
    );
    let offline = outcome.details.iter().find(|l| l.starts_with("dev-offline:")).unwrap();
    assert!(offline.contains("timed out"), "{offline}");
    let most = most.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(most, 1, "the status stream held {most} consumers during the wait (0: the sampler missed it)");
    eprintln!("300 agents and an offline device deployed and awaited in {took:?} (3 s timeout included)");
    for agent in agents {
        agent.stop().await.unwrap();
    }
}
