//! A measurement, ignored by default: the agent's peak memory while 800 documents of
//! about 1 MiB each are written to one of its deployments as fast as one client can.
//!
//! Issue 7 §6 measured such a flood taking the agent from 16 MB to 710 MB
//! RSS (before hints were headers-only republishes). Run it with
//!
//! ```sh
//! cargo test --release -p harmony-e2e --test flood_memory -- --ignored --nocapture
//! ```
//!
//! It prints one JSON line: the agent's RSS before the flood, when the last
//! generation is applied and once the server has stopped sending it
//! anything; its high-water mark (VmHWM from `/proc/<pid>/status`); how many
//! bytes and messages the server sent the agent's connection; and how long
//! the writes and the convergence took. Nothing here is asserted about time; the
//! agent must only end up applying the last generation written.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use harmony_e2e::{free_port, AgentProcess, NatsServer, WAIT};
use harmony_fleet::{DeployRequest, FleetClient};
use harmony_score_wire::names::{desired_state_key, DESIRED_STATE_BUCKET};
use harmony_score_wire::{encode, DeploymentName, DesiredState, DeviceId, DeviceScore, Phase};
use harmony_scores::{FileScore, PresenceState};

const WRITES: u64 = 800;
/// The content of the one FileScore: the document is just under the 1 MiB
/// the agent accepts and NATS carries.
const CONTENT_BYTES: usize = 1_000_000;
/// Writes published and not yet acknowledged.
const WINDOW: usize = 8;

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent is running");
    let line = status.lines().find(|l| l.starts_with(field)).expect("field in /proc status");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a number of KiB")
}

/// The agent connection's counters from the server's monitoring port.
fn agent_connection(monitor: u16) -> serde_json::Value {
    let mut stream = TcpStream::connect(("127.0.0.1", monitor)).expect("monitoring port");
    write!(stream, "GET /connz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let body = response.split("\r\n\r\n").nth(1).expect("an HTTP body");
    let connz: serde_json::Value = serde_json::from_str(body).expect("connz JSON");
    connz["connections"]
        .as_array()
        .and_then(|all| {
            all.iter().find(|c| c["name"].as_str().is_some_and(|n| n.starts_with("harmony-agent-")))
        })
        .cloned()
        .expect("the agent's connection")
}

fn document(device: &DeviceId, deployment: &DeploymentName, generation: u64) -> Vec<u8> {
    let mut content = format!("generation {generation}\n");
    content.extend(std::iter::repeat_n('x', CONTENT_BYTES - content.len()));
    let score: Box<dyn DeviceScore> = Box::new(FileScore {
        path: "/var/lib/flood/blob".into(),
        content,
        mode: None,
        state: PresenceState::Present,
    });
    encode(&DesiredState::new(device.clone(), deployment.clone(), generation, vec![score]))
        .expect("under 1 MiB")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --ignored --nocapture (release build)"]
async fn a_flood_of_one_mib_writes_keeps_the_agent_memory_bounded() {
    harmony_scores::ensure_linked();
    let monitor = free_port();
    let nats = NatsServer::start_with_config(&format!("http: \"127.0.0.1:{monitor}\"\n"));
    let client =
        tokio::time::timeout(WAIT, FleetClient::connect(&[nats.url()], None)).await.unwrap().unwrap();
    tokio::time::timeout(WAIT, client.ensure_buckets()).await.unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("root")).unwrap();
    let (device, deployment) = (DeviceId::new("dev-1").unwrap(), DeploymentName::new("flood").unwrap());
    let (root, state, url) = (dir.path().join("root"), dir.path().join("state"), nats.url());
    let args = [
        "--allow-unsigned",
        "--device-id",
        device.as_str(),
        "--nats",
        &url,
        "--state-dir",
        state.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--resync",
        "3600",
        "--heartbeat",
        "5",
    ];
    let agent = AgentProcess::start_logging(&args, &dir.path().join("agent.log"), "info");
    let pid = agent.pid().unwrap();

    // Generation 1 through the operator's client (index and key), applied.
    let small: Box<dyn DeviceScore> = Box::new(FileScore {
        path: "/var/lib/flood/blob".into(),
        content: "generation 1\n".into(),
        mode: None,
        state: PresenceState::Present,
    });
    let request = DeployRequest::new(device.clone(), deployment.clone(), vec![small]).force(true);
    let first = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if client.ping(&device, Duration::from_secs(1)).await.is_ok() {
                return client.deploy(request).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("agent never answered:\n{}", agent.log_text()));
    client
        .wait_for_generation(&device, &deployment, first.generation, Some(&first.digest), WAIT)
        .await
        .unwrap_or_else(|e| panic!("first generation not applied: {e:?}\n{}", agent.log_text()));
    let rss_before = status_kib(pid, "VmRSS:");
    let hwm_before = status_kib(pid, "VmHWM:");
    let sent_before = agent_connection(monitor);

    // The flood: writes pipelined, WINDOW acknowledgements outstanding (the
    // server refuses more pending bytes per stream with "too many requests").
    let subject = format!("$KV.{DESIRED_STATE_BUCKET}.{}", desired_state_key(&device, &deployment));
    let last = first.generation + WRITES;
    let started = Instant::now();
    let mut acks = std::collections::VecDeque::new();
    for generation in first.generation + 1..=last {
        let bytes = document(&device, &deployment, generation);
        acks.push_back(client.jetstream().publish(subject.clone(), bytes.into()).await.expect("published"));
        if acks.len() > WINDOW {
            let ack = acks.pop_front().unwrap();
            tokio::time::timeout(WAIT, ack).await.expect("ack in time").expect("write acknowledged");
        }
    }
    for ack in acks {
        tokio::time::timeout(WAIT, ack).await.expect("ack in time").expect("write acknowledged");
    }
    let write_ms = started.elapsed().as_millis();

    let applied = tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            if let Ok(Some((status, _))) = client.device_status(&device).await {
                if let Some(d) = status.deployments.get(&deployment) {
                    if d.observed_generation == last && d.phase == Phase::Applied {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let converge_ms = started.elapsed().as_millis();
    assert!(applied.is_ok(), "generation {last} never applied:\n{}", agent.log_text());
    let blob = std::fs::read_to_string(root.join("var/lib/flood/blob")).unwrap();
    assert!(blob.starts_with(&format!("generation {last}\n")), "the last generation is on disk");

    let rss_converged = status_kib(pid, "VmRSS:");
    // Then until the server has sent the agent nothing for a second (the
    // hints still queued are handled), at most 60 s.
    let mut sent_after = agent_connection(monitor);
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = agent_connection(monitor);
        if now["out_msgs"] == sent_after["out_msgs"] {
            break;
        }
        sent_after = now;
    }
    let settle_ms = settle.elapsed().as_millis();
    let hwm_after = status_kib(pid, "VmHWM:");
    let rss_after = status_kib(pid, "VmRSS:");
    let delta =
        |field: &str| sent_after[field].as_u64().unwrap_or(0) - sent_before[field].as_u64().unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({
            "writes": WRITES,
            "doc_bytes": document(&device, &deployment, last).len(),
            "write_ms": write_ms,
            "converge_ms": converge_ms,
            "agent_rss_before_kib": rss_before,
            "agent_hwm_before_kib": hwm_before,
            "agent_rss_converged_kib": rss_converged,
            "agent_hwm_after_kib": hwm_after,
            "agent_rss_settled_kib": rss_after,
            "settle_ms": settle_ms,
            "server_to_agent_msgs": delta("out_msgs"),
            "server_to_agent_mib": delta("out_bytes") / (1 << 20),
        })
    );
}
