//! `fleet --agents N`: N real agents receive one new generation at once.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use harmony_e2e::cluster::{LeafNode, NatsCluster};
use harmony_e2e::{file_score, free_port, InProcessAgent, NatsServer};
use harmony_fleet::FleetClient;
use harmony_score_wire::names::{
    desired_state_key, heartbeat_key, hint_subjects, index_key, status_hint_republish_destination,
    AGENT_STATUS_BUCKET, DESIRED_STATE_BUCKET,
};
use harmony_score_wire::{
    encode, from_cbor, now_ms, to_cbor, AgentStatus, DeploymentIndex, DeploymentName, DesiredState, DeviceId,
    Phase,
};
use serde_json::json;

use crate::{proc_kib, server_messages, within, BenchError};

/// Agents per child process.
const AGENTS_PER_PROCESS: usize = 4000;

/// The `agents` child: runs agents until its stdin closes, then stops them.
pub async fn agents(
    url: &str,
    dir: &Path,
    first: usize,
    count: usize,
) -> Result<serde_json::Value, BenchError> {
    let mut running = Vec::with_capacity(count);
    for i in first..first + count {
        let device = format!("fleet-{i}");
        let folder = dir.join(&device);
        std::fs::create_dir_all(folder.join("root"))?;
        let config = harmony_agent::ConfigLayer {
            device_id: Some(device),
            nats: Some(vec![url.to_owned()]),
            state_dir: Some(folder.join("state")),
            root: Some(folder.join("root")),
            resync_secs: Some(3600),
            heartbeat_secs: Some(3600),
            allow_unsigned: Some(true),
            ..Default::default()
        }
        .resolve()?;
        running.push(InProcessAgent::start(config));
    }
    // Until the parent closes stdin (or dies).
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)
    })
    .await;
    let stopped = futures_util::future::join_all(running.into_iter().map(InProcessAgent::stop)).await;
    let failed = stopped.iter().filter(|r| r.is_err()).count();
    Ok(json!({"agents": count, "failed_to_stop": failed}))
}

/// Publishes not yet acknowledged, at most.
const WINDOW: usize = 512;
/// `FleetClient::deploy` calls in flight at once (the client path).
const DEPLOYS_IN_FLIGHT: usize = 2048;

/// How the operator writes the new generation.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Writer {
    /// `FleetClient::deploy_many` for every device (as
    /// `DeviceDeploymentScore` writes); then one `wait_for_generations`.
    Client,
    /// Pipelined puts of pre-encoded documents and index entries.
    Raw,
}

/// The servers of a run: one, or (`--leaf`) a three-node hub cluster with
/// the agents behind a leaf node, as a site would be.
enum Servers {
    One(NatsServer),
    Site { cluster: NatsCluster, leaf: LeafNode },
}

impl Servers {
    /// Where the operator connects.
    fn hub_urls(&self) -> Vec<String> {
        match self {
            Servers::One(nats) => vec![nats.url()],
            Servers::Site { cluster, .. } => cluster.urls(),
        }
    }

    /// Where the agents (and the floor's devices) connect.
    fn device_url(&self) -> String {
        match self {
            Servers::One(nats) => nats.url(),
            Servers::Site { leaf, .. } => leaf.url(),
        }
    }
}

pub async fn run(
    agents: usize,
    state_in: &Path,
    writer: Writer,
    leaf: bool,
) -> Result<serde_json::Value, BenchError> {
    // One server: its monitoring port counts the messages of a run.
    let monitor = (!leaf).then(free_port);
    let servers = match monitor {
        None => {
            let cluster = NatsCluster::start().await;
            let leaf = cluster.start_leaf("site-1");
            Servers::Site { cluster, leaf }
        }
        Some(port) => Servers::One(NatsServer::start_with_config(&format!("http: \"127.0.0.1:{port}\"\n"))),
    };
    let messages = || monitor.map(server_messages).transpose();
    let url = servers.device_url();
    let client = FleetClient::connect(&servers.hub_urls(), None).await?;
    // Behind a hub cluster, buckets on every node, as operations.md says.
    let client = if leaf { client.with_replicas(3) } else { client };
    client.ensure_buckets().await?;
    let dir = tempfile::tempdir_in(state_in)?;
    let deployment = DeploymentName::new("bench")?;
    let limit = Duration::from_secs(60 + agents as u64 / 50);

    // Device status keys are one token (`<id>`); heartbeat keys are two.
    // Behind a leaf node the agents' writes reach the hub's stream through
    // the leaf's JetStream mapping, not as plain messages on `$KV.…`: there
    // the statuses are followed with one watch (`wait_for_generations`),
    // and "online" by the status bucket's republished hints.
    let mut statuses = client.nats().subscribe(format!("$KV.{AGENT_STATUS_BUCKET}.*")).await?;
    let mut hints = client.nats().subscribe(status_hint_republish_destination()).await?;
    let devices: Vec<DeviceId> =
        (0..agents).map(|i| DeviceId::new(format!("fleet-{i}"))).collect::<Result<_, _>>()?;
    let started = Instant::now();
    // Child processes: each has its own open-files limit (an agent holds a
    // connection and two state-directory locks).
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for first in (0..agents).step_by(AGENTS_PER_PROCESS) {
        let count = AGENTS_PER_PROCESS.min(agents - first);
        let child = tokio::process::Command::new(&exe)
            .args(["agents", "--url", &url, "--first", &first.to_string(), "--count", &count.to_string()])
            .arg("--dir")
            .arg(dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        children.push(child);
    }
    let mut online = HashSet::new();
    within(limit, "every agent online", async {
        while online.len() < agents {
            let Some(message) = hints.next().await else { break };
            // Heartbeat keys (`<id>.heartbeat`) are hinted too.
            if let Some(device) = message.subject.rsplit('.').next().filter(|d| d.starts_with("fleet-")) {
                online.insert(device.to_owned());
            }
        }
    })
    .await
    .map_err(|err| format!("{err}: {} of {agents} online", online.len()))?;
    let online_ms = started.elapsed().as_millis() as u64;
    let agent_rss: u64 = children.iter().filter_map(|c| c.id()).map(|pid| proc_kib(pid, "VmRSS:")).sum();
    let messages_before = messages()?;

    let (write_ms, converge_ms, awaited_ms) = match writer {
        Writer::Raw if leaf => {
            let (write, started) = write_generation(&client, &devices, &deployment).await?;
            let converge_ms = converge_watch(&client, &devices, &deployment, started, limit).await?;
            (write.as_millis() as u64, converge_ms, None)
        }
        Writer::Raw => {
            let (write, started) = write_generation(&client, &devices, &deployment).await?;
            let converge_ms = converge(&mut statuses, &devices, &deployment, started, limit).await?;
            (write.as_millis() as u64, converge_ms, None)
        }
        Writer::Client => {
            let started = Instant::now();
            let converged = converge(&mut statuses, &devices, &deployment, started, limit);
            let operator = async {
                // As `DeviceDeploymentScore` writes: `deploy_many`.
                let written = deploy_many(&client, &devices, &deployment, 1).await?;
                let write_ms = started.elapsed().as_millis() as u64;
                let results = client.wait_for_generations(&deployment, &written, limit).await?;
                let failed = results.iter().filter(|r| r.is_err()).count();
                if failed > 0 {
                    return Err(BenchError::from(format!("{failed} devices did not apply the generation")));
                }
                Ok::<_, BenchError>((write_ms, started.elapsed().as_millis() as u64))
            };
            let (write_ms, awaited_ms, converge_ms) = if leaf {
                let (write_ms, awaited_ms) = operator.await?;
                (write_ms, awaited_ms, awaited_ms)
            } else {
                let (converge_ms, operator) = tokio::join!(converged, operator);
                let (write_ms, awaited_ms) = operator?;
                (write_ms, awaited_ms, converge_ms?)
            };
            (write_ms, converge_ms, Some(awaited_ms))
        }
    };
    let messages_after = messages()?;
    let (server_rss, server_hwm) = match &servers {
        Servers::One(nats) => (
            nats.pid().map_or(0, |pid| proc_kib(pid, "VmRSS:")),
            nats.pid().map_or(0, |pid| proc_kib(pid, "VmHWM:")),
        ),
        Servers::Site { leaf, .. } => (
            leaf.pid().map_or(0, |pid| proc_kib(pid, "VmRSS:")),
            leaf.pid().map_or(0, |pid| proc_kib(pid, "VmHWM:")),
        ),
    };
    drop((statuses, hints));
    // Closing their stdin stops the children's agents (each shuts down).
    for mut child in children {
        drop(child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;
    }

    let floor = floor(&client, &url, agents, &deployment, limit, leaf, monitor).await?;
    // Every message the server took in or sent out while the generation
    // went out and came back (the operator's writes and its status
    // subscription included, in both runs alike), per device.
    let per_device = |before: Option<u64>, after: Option<u64>| {
        before
            .zip(after)
            .map(|(b, a)| ((a.saturating_sub(b)) as f64 / agents.max(1) as f64 * 10.0).round() / 10.0)
    };
    Ok(json!({
        "agents": agents,
        "converge_ms": converge_ms,
        "write_ms": write_ms,
        "awaited_ms": awaited_ms,
        "writer": format!("{writer:?}").to_lowercase(),
        "online_ms": online_ms,
        "server_rss_kib": server_rss,
        "server_hwm_kib": server_hwm,
        "agent_rss_kib_per_agent": agent_rss / agents.max(1) as u64,
        "floor_converge_ms": floor.1,
        "floor_write_ms": floor.0,
        "msgs_per_device": per_device(messages_before, messages_after),
        "floor_msgs_per_device": per_device(floor.2, floor.3),
        "state_in": state_in.display().to_string(),
        "leaf": leaf,
    }))
}

/// The operator's side alone. Writes: N devices' generation raw (the
/// floor), then through `FleetClient::deploy` (one call per device, 2,048
/// at once) and `FleetClient::deploy_many`, each for a new deployment and
/// then for its next generation, then `deploy` 32 at once (what
/// `DeviceDeploymentScore` did before). Reads: N statuses and N heartbeats
/// (written raw, as agents do) listed with `list_statuses`, batched and key
/// by key, against the floor of one batched read of every message of the
/// bucket, undecoded.
pub async fn operator(count: usize) -> Result<serde_json::Value, BenchError> {
    let nats = NatsServer::start();
    let client = FleetClient::connect(&[nats.url()], None).await?;
    client.ensure_buckets().await?;
    let devices: Vec<DeviceId> =
        (0..count).map(|i| DeviceId::new(format!("op-{i}"))).collect::<Result<_, _>>()?;
    // Raw first: it puts each index without compare-and-set (naming only
    // its own deployment); the client writes after it keep every entry.
    let (raw, _) = write_generation(&client, &devices, &DeploymentName::new("raw")?).await?;
    let (one, many) = (DeploymentName::new("client")?, DeploymentName::new("many")?);
    let started = Instant::now();
    deploy_all(&client, &devices, &one, DEPLOYS_IN_FLIGHT).await?;
    let client_ms = started.elapsed().as_millis() as u64;
    let started = Instant::now();
    deploy_many(&client, &devices, &many, 1).await?;
    let many_ms = started.elapsed().as_millis() as u64;
    let started = Instant::now();
    deploy_all(&client, &devices, &one, DEPLOYS_IN_FLIGHT).await?;
    let client_next_ms = started.elapsed().as_millis() as u64;
    let started = Instant::now();
    deploy_many(&client, &devices, &many, 2).await?;
    let many_next_ms = started.elapsed().as_millis() as u64;
    // What `DeviceDeploymentScore` did before `deploy_many`: 32 at once.
    let started = Instant::now();
    deploy_all(&client, &devices, &one, 32).await?;
    let client_32_ms = started.elapsed().as_millis() as u64;
    // Statuses and heartbeats as agents write them (one put each), then listed.
    let mut acks = VecDeque::new();
    for device in &devices {
        let status = harmony_e2e::reported_status(device, None, Default::default());
        let values = [
            (format!("$KV.{AGENT_STATUS_BUCKET}.{device}"), to_cbor(&status)),
            (format!("$KV.{AGENT_STATUS_BUCKET}.{}", heartbeat_key(device)), to_cbor(&now_ms())),
        ];
        for (subject, value) in values {
            acks.push_back(client.jetstream().publish(subject, value.into()).await?);
            if acks.len() >= WINDOW {
                if let Some(ack) = acks.pop_front() {
                    ack.await?;
                }
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    let started = Instant::now();
    let listed = client.list_statuses().await?;
    let list_ms = started.elapsed().as_millis() as u64;
    if listed.len() != count {
        return Err(format!("listed {} statuses of {count}", listed.len()).into());
    }
    let one_by_one = FleetClient::from_nats(client.nats().clone()).with_batched_reads(false);
    let started = Instant::now();
    let listed = one_by_one.list_statuses().await?;
    let list_per_key_ms = started.elapsed().as_millis() as u64;
    if listed.len() != count {
        return Err(format!("listed {} statuses of {count} key by key", listed.len()).into());
    }
    let started = Instant::now();
    let read = read_every_message(&client, 2 * count).await?;
    let read_floor_ms = started.elapsed().as_millis() as u64;
    if read != 2 * count {
        return Err(format!("the floor read {read} messages of {}", 2 * count).into());
    }
    Ok(json!({
        "devices": count,
        "raw_write_ms": raw.as_millis() as u64,
        "deploy_ms": client_ms,
        "deploy_many_ms": many_ms,
        "deploy_next_ms": client_next_ms,
        "deploy_many_next_ms": many_next_ms,
        "deploy_32_next_ms": client_32_ms,
        "list_statuses_ms": list_ms,
        "list_statuses_per_key_ms": list_per_key_ms,
        "read_floor_ms": read_floor_ms,
        "load": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    }))
}

/// Deploys generation `generation` of `deployment` to every device with
/// one `FleetClient::deploy_many`.
async fn deploy_many(
    client: &FleetClient,
    devices: &[DeviceId],
    deployment: &DeploymentName,
    generation: u64,
) -> Result<Vec<harmony_fleet::Awaited>, BenchError> {
    let requests = devices
        .iter()
        .map(|device| {
            harmony_fleet::DeployRequest::new(
                device.clone(),
                deployment.clone(),
                vec![file_score("/etc/bench", &format!("{generation}\n"))],
            )
            .force(true)
        })
        .collect();
    let mut awaited = Vec::with_capacity(devices.len());
    for (result, device) in client.deploy_many(requests).await.into_iter().zip(devices) {
        let deployed = result?;
        if deployed.generation != generation {
            return Err(format!("deploy_many wrote another generation than {generation}").into());
        }
        awaited.push(harmony_fleet::Awaited {
            device: device.clone(),
            generation,
            digest: Some(deployed.digest),
        });
    }
    Ok(awaited)
}

/// The floor of a listing: every message of the status bucket (`expected`
/// of them) in one batched direct get by sequence (`next_by_subj`), paged by
/// the server's byte limit, undecoded. Returns how many were read.
async fn read_every_message(client: &FleetClient, expected: usize) -> Result<usize, BenchError> {
    let nats = client.nats();
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await?;
    let (mut read, mut from) = (0, 1);
    loop {
        let body =
            json!({ "seq": from, "next_by_subj": format!("$KV.{AGENT_STATUS_BUCKET}.>"), "batch": expected });
        nats.publish_with_reply(
            format!("$JS.API.DIRECT.GET.KV_{AGENT_STATUS_BUCKET}"),
            inbox.clone(),
            serde_json::to_vec(&body)?.into(),
        )
        .await?;
        let mut last = 0;
        loop {
            let message = within(Duration::from_secs(10), "the floor read", replies.next())
                .await?
                .ok_or("the reply subscription closed")?;
            match message.status.map(|s| s.as_u16()) {
                None => {
                    read += 1;
                    last = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Sequence"))
                        .and_then(|v| v.as_str().parse().ok())
                        .unwrap_or(last);
                }
                Some(204) => break,
                Some(status) => return Err(format!("the floor read ended with status {status}").into()),
            }
        }
        if read >= expected || last == 0 {
            return Ok(read);
        }
        from = last + 1;
    }
}

/// Deploys the next generation of `deployment` to every device through
/// `FleetClient::deploy` (numbering, index, compare-and-set), `in_flight`
/// at once.
async fn deploy_all(
    client: &FleetClient,
    devices: &[DeviceId],
    deployment: &DeploymentName,
    in_flight: usize,
) -> Result<Vec<harmony_fleet::Awaited>, BenchError> {
    let deploys = futures_util::stream::iter(devices.iter().cloned()).map(|device| async move {
        let request = harmony_fleet::DeployRequest::new(
            device.clone(),
            deployment.clone(),
            vec![file_score("/etc/bench", "1\n")],
        )
        .force(true);
        let deployed = client.deploy(request).await?;
        Ok::<_, harmony_fleet::FleetError>(harmony_fleet::Awaited {
            device,
            generation: deployed.generation,
            digest: Some(deployed.digest),
        })
    });
    let written: Vec<_> = deploys.buffered(in_flight).collect().await;
    Ok(written.into_iter().collect::<Result<_, _>>()?)
}

/// Writes, pipelined, each device's index entry and generation 1 of
/// `deployment` (what a batched operator write puts on the wire). Returns
/// how long the writes took and when they started.
async fn write_generation(
    client: &FleetClient,
    devices: &[DeviceId],
    deployment: &DeploymentName,
) -> Result<(Duration, Instant), BenchError> {
    let mut values = Vec::with_capacity(devices.len() * 2);
    for device in devices {
        let mut index = DeploymentIndex::default();
        index.deployments.insert(deployment.clone(), 1);
        values.push((format!("$KV.{DESIRED_STATE_BUCKET}.{}", index_key(device)), to_cbor(&index)));
        let doc =
            DesiredState::new(device.clone(), deployment.clone(), 1, vec![file_score("/etc/bench", "1\n")]);
        values.push((
            format!("$KV.{DESIRED_STATE_BUCKET}.{}", desired_state_key(device, deployment)),
            encode(&doc)?,
        ));
    }
    let started = Instant::now();
    let mut acks = VecDeque::new();
    for (subject, bytes) in values {
        acks.push_back(client.jetstream().publish(subject, bytes.into()).await?);
        if acks.len() >= WINDOW {
            if let Some(ack) = acks.pop_front() {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    Ok((started.elapsed(), started))
}

/// Waits until every device reports `deployment` generation 1 applied;
/// returns the milliseconds from the first write until the last status.
async fn converge(
    statuses: &mut async_nats::Subscriber,
    devices: &[DeviceId],
    deployment: &DeploymentName,
    started: Instant,
    limit: Duration,
) -> Result<u64, BenchError> {
    let mut pending: HashSet<&str> = devices.iter().map(DeviceId::as_str).collect();
    within(limit, "every agent to apply the generation", async {
        while !pending.is_empty() {
            let Some(message) = statuses.next().await else { break };
            let Some(device) = message.subject.rsplit('.').next() else { continue };
            if !pending.contains(device) {
                continue;
            }
            let done = from_cbor::<AgentStatus>(&message.payload, 1 << 20, "status").is_ok_and(|s| {
                s.deployments
                    .get(deployment)
                    .is_some_and(|d| d.phase == Phase::Applied && d.observed_generation == 1)
            });
            if done {
                pending.remove(device);
            }
        }
    })
    .await?;
    Ok(started.elapsed().as_millis() as u64)
}

/// [`converge`] through the operator's own path: one watch of the status
/// bucket (`wait_for_generations`) for every device's generation 1.
async fn converge_watch(
    client: &FleetClient,
    devices: &[DeviceId],
    deployment: &DeploymentName,
    started: Instant,
    limit: Duration,
) -> Result<u64, BenchError> {
    let awaited: Vec<harmony_fleet::Awaited> = devices
        .iter()
        .map(|device| harmony_fleet::Awaited { device: device.clone(), generation: 1, digest: None })
        .collect();
    let results = client.wait_for_generations(deployment, &awaited, limit).await?;
    let failed = results.iter().filter(|r| r.is_err()).count();
    if failed > 0 {
        return Err(BenchError::from(format!("{failed} devices did not apply generation 1")));
    }
    Ok(started.elapsed().as_millis() as u64)
}

/// The floor: N bare devices (a connection each) that, on a hint, do a
/// direct get of the key and put a status. No Maestro, no files. Returns
/// (write ms, converge ms, the server's message count before the write and
/// after the last status when `monitor` is given).
async fn floor(
    client: &FleetClient,
    url: &str,
    count: usize,
    deployment: &DeploymentName,
    limit: Duration,
    leaf: bool,
    monitor: Option<u16>,
) -> Result<(u64, u64, Option<u64>, Option<u64>), BenchError> {
    let devices: Vec<DeviceId> =
        (0..count).map(|i| DeviceId::new(format!("floor-{i}"))).collect::<Result<_, _>>()?;
    let mut statuses = client.nats().subscribe(format!("$KV.{AGENT_STATUS_BUCKET}.*")).await?;
    let mut tasks = Vec::with_capacity(count);
    for device in &devices {
        let connection = async_nats::connect(url).await?;
        let js = async_nats::jetstream::new(connection.clone());
        let stream = js.get_stream_no_info(format!("KV_{DESIRED_STATE_BUCKET}")).await?;
        let mut hints = connection.subscribe(hint_subjects(device)).await?;
        let key = format!("$KV.{DESIRED_STATE_BUCKET}.{}", desired_state_key(device, deployment));
        let status_subject = format!("$KV.{AGENT_STATUS_BUCKET}.{device}");
        connection.flush().await?;
        let template = harmony_e2e::reported_status(device, None, Default::default());
        let deployment = deployment.clone();
        tasks.push(tokio::spawn(async move {
            let _connection = connection;
            while let Some(hint) = hints.next().await {
                if !hint.subject.ends_with(deployment.as_str()) {
                    continue;
                }
                let Ok(message) = stream.direct_get_last_for_subject(&key).await else { continue };
                let mut report = template.clone();
                let generation =
                    harmony_score_wire::peek_generation(&message.payload, &Default::default()).unwrap_or(0);
                report.deployments.insert(
                    deployment.clone(),
                    harmony_score_wire::DeploymentStatus {
                        desired_generation: generation,
                        observed_generation: generation,
                        phase: Phase::Applied,
                        ..Default::default()
                    },
                );
                if let Ok(ack) = js.publish(status_subject.clone(), to_cbor(&report).into()).await {
                    let _ = ack.await;
                }
            }
        }));
    }
    client.nats().flush().await?;
    let messages_before = monitor.map(server_messages).transpose()?;
    let (write, started) = write_generation(client, &devices, deployment).await?;
    let converge_ms = if leaf {
        converge_watch(client, &devices, deployment, started, limit).await?
    } else {
        converge(&mut statuses, &devices, deployment, started, limit).await?
    };
    let messages_after = monitor.map(server_messages).transpose()?;
    for task in tasks {
        task.abort();
    }
    Ok((write.as_millis() as u64, converge_ms, messages_before, messages_after))
}
