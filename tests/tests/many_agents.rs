//! Issue 6 §9, the lost-update stall: many agents, several generations each, every final generation reached every round.
//!
//! The first edition followed `$KV.…` publishes and read the key on each:
//! the read could return the key's *previous* value (the subscriber gets
//! the publish in parallel with the stream's store), the follower dropped
//! the hint as already seen, and the device caught up only at its next
//! resync, up to a minute later. Here the resync is an hour: every device
//! must reach every round's final generation through hints alone, within a
//! few seconds, in every round.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use harmony_e2e::{agent_config, within, InProcessAgent, NatsServer};
use harmony_fleet::{DeployRequest, FleetClient};
use harmony_score_wire::names::AGENT_STATUS_BUCKET;
use harmony_score_wire::{from_cbor, AgentStatus, DeploymentName, DeviceId, DeviceScore, Phase};
use harmony_scores::{FileScore, PresenceState};

/// Devices (`HARMONY_MANY_AGENTS`, default 200).
fn agents() -> usize {
    std::env::var("HARMONY_MANY_AGENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
}

/// Rounds (`HARMONY_MANY_AGENT_ROUNDS`, default 20).
fn rounds() -> usize {
    std::env::var("HARMONY_MANY_AGENT_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20)
}

/// Deploys in flight at once (`HARMONY_MANY_AGENT_WRITERS`, default 64):
/// the more, the busier the stream's ingest, the likelier the race.
fn writers() -> usize {
    std::env::var("HARMONY_MANY_AGENT_WRITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

/// Generations written back to back per device per round.
const GENERATIONS_PER_ROUND: u64 = 3;
/// How long every device has to reach a round's final generation.
const ROUND_DEADLINE: Duration = Duration::from_secs(10);

fn file(content: String) -> Vec<Box<dyn DeviceScore>> {
    vec![Box::new(FileScore {
        path: "/etc/app.conf".into(),
        content,
        mode: None,
        state: PresenceState::Present,
    })]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_reaches_every_final_generation_through_hints_alone() {
    harmony_scores::ensure_linked();
    let nats = NatsServer::start();
    let client = within(FleetClient::connect(&[nats.url()], None)).await.unwrap();
    within(client.ensure_buckets()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let devices: Vec<DeviceId> = (0..agents()).map(|i| DeviceId::new(format!("dev-{i}")).unwrap()).collect();
    let app = DeploymentName::new("app").unwrap();

    // Every status any agent writes, as the operator would follow a fleet:
    // status keys are one token (`<id>`); a heartbeat key (`<id>.heartbeat`,
    // the first beat at a random point of the hour) is two and not a status.
    let mut statuses = within(client.nats().subscribe(format!("$KV.{AGENT_STATUS_BUCKET}.*"))).await.unwrap();
    let running: Vec<InProcessAgent> = devices
        .iter()
        .map(|d| {
            InProcessAgent::start(agent_config(d.as_str(), &nats.url(), &dir.path().join(d.as_str()), 3600))
        })
        .collect();
    let mut observed: HashMap<String, (u64, Phase)> = HashMap::new();
    let mut online = 0;
    within(async {
        while online < devices.len() {
            let message = statuses.next().await.expect("status subscription");
            let device = message.subject.rsplit('.').next().unwrap_or_default().to_owned();
            if observed.insert(device, (0, Phase::Applying)).is_none() {
                online += 1;
            }
        }
    })
    .await;

    let mut slowest = Duration::ZERO;
    let mut generation = 0;
    for round in 1..=rounds() {
        let started = Instant::now();
        for _ in 0..GENERATIONS_PER_ROUND {
            generation += 1;
            let writes = futures_util::stream::iter(devices.iter().cloned()).map(|device| {
                let (client, app) = (client.clone(), app.clone());
                let content = format!("round {round} generation {generation}\n");
                async move {
                    let request = DeployRequest::new(device, app, file(content)).force(true);
                    client.deploy(request).await.expect("deploy").generation
                }
            });
            let written: Vec<u64> = within(writes.buffer_unordered(writers()).collect()).await;
            assert!(written.iter().all(|g| *g == generation), "generations stay in step: {written:?}");
        }
        let reached = tokio::time::timeout(ROUND_DEADLINE, async {
            loop {
                let behind =
                    observed.values().filter(|(g, p)| *g != generation || *p != Phase::Applied).count();
                if behind == 0 {
                    return;
                }
                let message = statuses.next().await.expect("status subscription");
                let device = message.subject.rsplit('.').next().unwrap_or_default().to_owned();
                if let Ok(status) = from_cbor::<AgentStatus>(&message.payload, 1 << 20, "status") {
                    if let Some(d) = status.deployments.get(&app) {
                        observed.insert(device, (d.observed_generation, d.phase));
                    }
                }
            }
        })
        .await;
        if reached.is_err() {
            let behind: Vec<_> =
                observed.iter().filter(|(_, (g, p))| *g != generation || *p != Phase::Applied).collect();
            panic!("round {round}: {} devices did not reach generation {generation} within {ROUND_DEADLINE:?}: {:?}", behind.len(), &behind[..behind.len().min(10)]);
        }
        slowest = slowest.max(started.elapsed());
        // What the devices report is what they hold.
        for device in devices.iter().step_by(37) {
            let content =
                std::fs::read_to_string(dir.path().join(device.as_str()).join("root/etc/app.conf")).unwrap();
            assert_eq!(content, format!("round {round} generation {generation}\n"));
        }
    }
    eprintln!("{} devices, {} rounds of {GENERATIONS_PER_ROUND} generations: slowest round {slowest:?} (writes included)", devices.len(), rounds());
    for agent in running {
        agent.stop().await.unwrap();
    }
}
