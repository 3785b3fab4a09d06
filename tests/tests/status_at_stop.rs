//! The last status reaches the bucket when the agent stops while a run is
//! under way (review, session 6: a status held back as "a run under way"
//! was dropped at stop, and the fleet saw the previous generation applied).

use std::time::Duration;

use harmony_e2e::{agent_config, file_score, until_status, within, InProcessAgent, NatsServer, SleepScore};
use harmony_fleet::{DeployRequest, FleetClient};
use harmony_score_wire::names::{status_key, AGENT_STATUS_BUCKET};
use harmony_score_wire::{AgentStatus, DeploymentName, DeviceId, DeviceScore, Phase};

async fn stored_status(client: &FleetClient, device: &DeviceId) -> AgentStatus {
    let kv = within(client.jetstream().get_key_value(AGENT_STATUS_BUCKET)).await.unwrap();
    let bytes = within(kv.get(status_key(device))).await.unwrap().expect("a status");
    harmony_score_wire::from_cbor(&bytes, 1 << 20, "status").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_status_reaches_the_bucket_when_the_agent_stops_during_a_new_run() {
    harmony_scores::ensure_linked();
    let nats = NatsServer::start();
    let client = within(FleetClient::connect(&[nats.url()], None)).await.unwrap();
    within(client.ensure_buckets()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let device = DeviceId::new("dev-1").unwrap();
    let app = DeploymentName::new("app").unwrap();
    let agent = InProcessAgent::start(agent_config("dev-1", &nats.url(), dir.path(), 3600));

    let deploy = |scores: Vec<Box<dyn DeviceScore>>| {
        within(client.deploy(DeployRequest::new(device.clone(), app.clone(), scores).force(true)))
    };
    deploy(vec![file_score("/a", "1")]).await.unwrap();
    until_status(&client, &device, "g1 applied", |s| {
        s.deployments.get(&app).is_some_and(|d| d.phase == Phase::Applied && d.observed_generation == 1)
    })
    .await;

    // g2 starts a run; the agent is stopped (a reboot, an upgrade) while it runs.
    deploy(vec![Box::new(SleepScore { name: "x".into(), millis: 30_000, honour_cancel: true })])
        .await
        .unwrap();
    let marker = dir.path().join("root/started-x");
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while !marker.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    if waited.is_err() {
        let s = stored_status(&client, &device).await;
        panic!("g2 never started: {:?}", s.deployments.get(&app));
    }
    agent.stop().await.unwrap();

    // The device's own status.json says it holds generation 2 ...
    let local: AgentStatus =
        serde_json::from_slice(&std::fs::read(dir.path().join("state/status.json")).unwrap()).unwrap();
    assert_eq!(local.deployments[&app].desired_generation, 2, "{:?}", local.deployments[&app]);
    // ... and so should the status the fleet sees.
    let stored = stored_status(&client, &device).await;
    let d = &stored.deployments[&app];
    assert_eq!(
        (d.desired_generation, d.phase),
        (2, Phase::Applying),
        "the fleet still sees the device at generation 1, applied: {d:?}"
    );
}
