//! Issue 9 §2: a three-node JetStream cluster loses a node during a
//! rollout — the leader of the desired-state stream, the leader of the
//! status stream, the node the agent is connected to (hung first, then
//! killed) — and gets it back.
//!
//! Buckets have three replicas, the agent (the real binary) and the
//! operator know all three URLs. Each round writes 30 generations of one
//! file: 10, then the victim is killed with SIGKILL, 10 more while it is
//! down (the operator retries a write that fails during the election, as
//! an operator must), then it is restarted and 10 more are written while
//! it catches up. The agent resyncs once an hour: convergence comes from
//! hints and the reads after a reconnect only.
//!
//! "No status update is lost" is checked as:
//! - what the agent last reported (its local `status.json`, the status it
//!   holds) is, byte for byte once decoded, what each of the three nodes
//!   serves for its status key, at one and the same stream sequence, once
//!   the restarted node caught up (stream info: every replica current, no lag);
//! - every status the stream stored, as a KV watch saw them over the
//!   whole test, came in increasing revisions, with the deployment's
//!   desired and observed generations never going back (an acknowledged
//!   write rolled back by a leader change would show as a step back);
//! - the status that the generation written while the node was down is
//!   applied is read before the restart (the writer went on through the
//!   election, with two nodes), and no status reports `duplicate_device`
//!   (a write whose ack was lost in the election is the agent's own, not
//!   another instance's).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;
use harmony_e2e::{file_score, until_status, within, AgentProcess, NatsCluster};
use harmony_fleet::{DeployRequest, Deployed, FleetClient};
use harmony_score_wire::names::{status_key, AGENT_STATUS_BUCKET};
use harmony_score_wire::{AgentStatus, DeploymentName, DeviceId, Phase};

const DESIRED_STREAM: &str = "KV_harmony-desired-state";
const STATUS_STREAM: &str = "KV_harmony-agent-status";
/// Generations written per phase of a round (before the kill, while the
/// node is down, after its restart).
const WRITES_PER_PHASE: usize = 10;
/// Generations written while the agent's node hangs: until the two others
/// drop its routes (route pings, about 4 s: see `NatsCluster::start`), a
/// read the operator makes may be routed to the hung replica (direct gets
/// are answered by any replica) and wait out its 5 s timeout before the
/// retry.
const WRITES_WHILE_HUNG: usize = 3;
/// How long one operator write may keep failing (an election takes a few
/// seconds) before the test fails.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);
const FILE: &str = "/etc/app.conf";
/// Operator writes that failed and were tried again (for the report).
static RETRIED_WRITES: AtomicUsize = AtomicUsize::new(0);

/// Which node a round kills.
#[derive(Debug, Clone, Copy)]
enum Victim {
    /// The leader of the desired-state stream (hints, direct gets, operator CAS).
    DesiredStateLeader,
    /// The leader of the status stream (the agent's CAS writes).
    StatusLeader,
    /// The node the agent is connected to hangs (SIGSTOP: its connections
    /// stay open, nothing is answered) while the writes go on elsewhere,
    /// then is killed: the agent reconnects to another node, and only its
    /// read of every key after a reconnect can bring those writes.
    AgentsNodeHung,
}

/// One status the stream stored, as the watch saw it.
struct Seen {
    revision: u64,
    status: AgentStatus,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_during_a_rollout_loses_no_status() {
    harmony_scores::ensure_linked();
    let started = Instant::now();
    let mut cluster = NatsCluster::start().await;
    let urls = cluster.urls();
    let client = within(FleetClient::connect(&urls, None)).await.expect("operator connects").with_replicas(3);
    within(client.ensure_buckets()).await.expect("buckets with three replicas");
    let js = client.jetstream().clone();
    for stream in [DESIRED_STREAM, STATUS_STREAM] {
        let info = cluster.until_replicas_current(&js, stream).await;
        assert_eq!(info.config.num_replicas, 3, "{stream}");
        assert_eq!(info.cluster.map(|c| c.replicas.len()), Some(2), "{stream}: a leader and two replicas");
    }

    let device = DeviceId::new("dev-cluster").unwrap();
    let name = DeploymentName::new("app").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (state, root) = (dir.path().join("state"), dir.path().join("root"));
    std::fs::create_dir_all(&root).unwrap();
    let nats = urls.join(",");
    let args = harmony_e2e::agent_args(device.as_str(), &nats, &state, &root);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = AgentProcess::start(&args, &dir.path().join("agent.log"));
    until_status(&client, &device, "online", |s| s.info.is_some()).await;
    let (seen, reopened) = watch_statuses(client.clone(), device.clone());

    let mut written = 0;
    let mut last: Option<(Deployed, String)> = None;
    for (round, victim) in
        [Victim::DesiredStateLeader, Victim::StatusLeader, Victim::AgentsNodeHung].into_iter().enumerate()
    {
        let round_started = Instant::now();
        for _ in 0..WRITES_PER_PHASE {
            written += 1;
            last = Some(deploy_retrying(&client, &device, &name, written).await);
        }
        // Landed before the fault: what the agent applies after it is news.
        let (deployed, before) = last.clone().expect("written");
        until_applied(&client, &device, &name, &deployed).await;
        let agents_node = cluster.node_of_connection(&format!("harmony-agent-{device}"));
        let node = match victim {
            Victim::DesiredStateLeader => cluster.until_stream_leader(&js, DESIRED_STREAM).await,
            Victim::StatusLeader => cluster.until_stream_leader(&js, STATUS_STREAM).await,
            Victim::AgentsNodeHung => agents_node
                .unwrap_or_else(|| panic!("the agent is connected to no node\n{}", agent.log_text())),
        };
        let roles = roles_of(&cluster, &js, node).await;
        let hung = matches!(victim, Victim::AgentsNodeHung);
        // A hung node answers nothing on connections it holds: the writes
        // while it is down go through a client of the two other nodes.
        let writer = if hung {
            cluster.freeze(node);
            let others: Vec<String> =
                (0..harmony_e2e::cluster::NODES).filter(|n| *n != node).map(|n| cluster.url(n)).collect();
            within(FleetClient::connect(&others, None)).await.expect("operator connects to the two others")
        } else {
            cluster.kill(node);
            client.clone()
        };

        // Writes go on; the victim's streams elect a new leader among the two left.
        for _ in 0..if hung { WRITES_WHILE_HUNG } else { WRITES_PER_PHASE } {
            written += 1;
            last = Some(deploy_retrying(&writer, &device, &name, written).await);
        }
        if hung {
            // No hint reached the agent and no read was answered: it still
            // runs the file from before. Only the read of every key after it
            // reconnects elsewhere can bring what was written.
            assert_file(&root, &before);
            cluster.kill(node);
        }
        let since = Instant::now();
        let (deployed, content) = last.clone().expect("written");
        until_file(&root, &content).await;
        let on_disk_after = since.elapsed();
        let converged_down = until_applied(&writer, &device, &name, &deployed).await;
        let status_after = since.elapsed();
        for stream in [DESIRED_STREAM, STATUS_STREAM] {
            let leader = cluster.until_stream_leader(writer.jetstream(), stream).await;
            assert_ne!(leader, node, "{stream}: the killed node still leads");
        }

        cluster.restart(node);
        for _ in 0..WRITES_PER_PHASE {
            written += 1;
            last = Some(deploy_retrying(&client, &device, &name, written).await);
        }
        let (deployed, content) = last.clone().expect("written");
        until_applied(&client, &device, &name, &deployed).await;
        assert_file(&root, &content);
        for stream in [DESIRED_STREAM, STATUS_STREAM] {
            cluster.until_replicas_current(&js, stream).await;
        }
        let on_every_node = status_on_every_node(&cluster, &device, &state).await;
        assert_eq!(on_every_node.deployments[&name].observed_generation, deployed.generation);
        eprintln!(
            "round {round} ({victim:?}): {} down (led desired-state: {}, status: {}; agent on {:?}); \
             generation {} on disk {:.1?} and in status {:.1?} after the last write{}; \
             generation {} on all three nodes after the restart; round took {:.1?}",
            cluster.name(node),
            roles.0,
            roles.1,
            agents_node.map(|n| cluster.name(n).to_owned()),
            converged_down.deployments[&name].observed_generation,
            on_disk_after,
            status_after,
            if hung { " (and the kill of the hung node)" } else { "" },
            deployed.generation,
            round_started.elapsed(),
        );
    }

    let seen = seen.lock().unwrap();
    assert_monotonic(&seen, &name);
    let log = agent.log_text();
    eprintln!(
        "{} generations ({} operator writes tried again) in {:.1?}; {} statuses seen (watch reopened {} times); \
         agent log: {} failed status writes, {} reconnects",
        written,
        RETRIED_WRITES.load(Ordering::Relaxed),
        started.elapsed(),
        seen.len(),
        reopened.load(Ordering::Relaxed),
        log.matches("status not written; retrying").count(),
        log.matches("connected to NATS; reading all keys").count().saturating_sub(1),
    );
}

/// Deploys generation `n` of the file (content names `n`), retrying a
/// write that fails while a stream elects a leader, for at most
/// [`WRITE_DEADLINE`]; the document written and its content.
async fn deploy_retrying(
    client: &FleetClient,
    device: &DeviceId,
    name: &DeploymentName,
    n: usize,
) -> (Deployed, String) {
    let content = format!("write {n}\n");
    let deadline = Instant::now() + WRITE_DEADLINE;
    loop {
        let request =
            DeployRequest::new(device.clone(), name.clone(), vec![file_score(FILE, &content)]).force(true);
        match tokio::time::timeout(Duration::from_secs(10), client.deploy(request)).await {
            Ok(Ok(deployed)) => return (deployed, content),
            Ok(Err(err)) => {
                assert!(
                    Instant::now() < deadline,
                    "write {n} kept failing: {}",
                    harmony_fleet::error_chain(&err)
                )
            }
            Err(_) => assert!(Instant::now() < deadline, "write {n} kept timing out"),
        }
        RETRIED_WRITES.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the deployment reports exactly `deployed` applied.
async fn until_applied(
    client: &FleetClient,
    device: &DeviceId,
    name: &DeploymentName,
    deployed: &Deployed,
) -> AgentStatus {
    until_status(client, device, &format!("generation {} applied", deployed.generation), |s| {
        s.deployments.get(name).is_some_and(|d| {
            d.phase == Phase::Applied
                && d.observed_generation == deployed.generation
                && d.observed_digest.as_deref() == Some(deployed.digest.as_str())
        })
    })
    .await
}

/// Waits until the managed file holds `content`.
async fn until_file(root: &std::path::Path, content: &str) {
    let path = root.join(FILE.trim_start_matches('/'));
    let deadline = Instant::now() + harmony_e2e::WAIT;
    while std::fs::read_to_string(&path).ok().as_deref() != Some(content) {
        assert!(Instant::now() < deadline, "{} never held {content:?}", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_file(root: &std::path::Path, content: &str) {
    let on_disk = std::fs::read_to_string(root.join(FILE.trim_start_matches('/'))).expect("managed file");
    assert_eq!(on_disk, content);
}

/// Whether `node` leads the desired-state stream, and the status stream.
async fn roles_of(cluster: &NatsCluster, js: &jetstream::Context, node: usize) -> (bool, bool) {
    (
        cluster.stream_leader(js, DESIRED_STREAM).await == Some(node),
        cluster.stream_leader(js, STATUS_STREAM).await == Some(node),
    )
}

/// Waits until each node, asked alone with a direct get, serves the
/// device's status at one sequence, and that status is the one the agent
/// holds (its `status.json`; `heartbeat_at_ms` is set at each write and
/// not compared); returns it.
async fn status_on_every_node(
    cluster: &NatsCluster,
    device: &DeviceId,
    state: &std::path::Path,
) -> AgentStatus {
    let subject = format!("$KV.{AGENT_STATUS_BUCKET}.{}", status_key(device));
    let mut streams = Vec::new();
    for node in 0..harmony_e2e::cluster::NODES {
        // One client per node, with only that node's URL: its direct gets
        // are answered by that node's replica (the local member of the
        // stream's direct-get queue group is preferred).
        let client = within(async_nats::connect(cluster.url(node))).await.expect("connect to one node");
        let js = jetstream::new(client);
        streams.push(within(js.get_stream_no_info(STATUS_STREAM)).await.expect("status stream"));
    }
    let deadline = Instant::now() + harmony_e2e::WAIT;
    loop {
        let mut served = Vec::new();
        for stream in &streams {
            if let Ok(Ok(message)) =
                tokio::time::timeout(Duration::from_secs(5), stream.direct_get_last_for_subject(&subject))
                    .await
            {
                served.push((message.sequence, message.payload));
            }
        }
        let local: Option<AgentStatus> =
            std::fs::read(state.join("status.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        if let (Some(local), true) = (&local, served.len() == streams.len()) {
            let same_everywhere = served.iter().all(|s| *s == served[0]);
            let decoded: Option<AgentStatus> =
                harmony_score_wire::from_cbor(&served[0].1, 1 << 20, "status").ok();
            if let (true, Some(mut stored)) = (same_everywhere, decoded) {
                assert!(stored.errors.is_empty(), "status reports errors: {:?}", stored.errors);
                stored.heartbeat_at_ms = local.heartbeat_at_ms;
                if stored == *local {
                    return stored;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the nodes do not all serve the status the agent holds\nserved (sequence, bytes): {:?}\nlocal: {local:#?}",
            served.iter().map(|(seq, bytes)| (*seq, bytes.len())).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Follows the device's status key with a KV watch for the rest of the
/// test and records every status the stream stored; also returns how
/// often the watch was opened again.
///
/// A watch whose consumer lived on a killed node can stall without an
/// error (ARCHITECTURE.md: watches die silently after a server restart).
/// So while it is quiet the key is read every half second, and a stored
/// revision newer than the last one seen opens the watch again from the
/// revision after it.
fn watch_statuses(client: FleetClient, device: DeviceId) -> (Arc<Mutex<Vec<Seen>>>, Arc<AtomicUsize>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let reopened = Arc::new(AtomicUsize::new(0));
    let (sink, reopens) = (seen.clone(), reopened.clone());
    tokio::spawn(async move {
        let key = status_key(&device);
        let mut last_seen = 0;
        loop {
            let watch = tokio::time::timeout(Duration::from_secs(5), async {
                let kv = client.jetstream().get_key_value(AGENT_STATUS_BUCKET).await.ok()?;
                let watch = match last_seen {
                    0 => kv.watch_with_history(&key).await.ok()?,
                    seen => kv.watch_from_revision(&key, seen + 1).await.ok()?,
                };
                Some((kv, watch))
            })
            .await;
            let Ok(Some((kv, mut entries))) = watch else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            loop {
                match tokio::time::timeout(Duration::from_millis(500), entries.next()).await {
                    Ok(Some(Ok(entry))) => {
                        last_seen = last_seen.max(entry.revision);
                        if let Ok(status) =
                            harmony_score_wire::from_cbor::<AgentStatus>(&entry.value, 1 << 20, "status")
                        {
                            sink.lock().unwrap().push(Seen { revision: entry.revision, status });
                        }
                    }
                    Ok(_) => break,
                    Err(_) => {
                        let stored = tokio::time::timeout(Duration::from_secs(2), kv.entry(&key)).await;
                        if let Ok(Ok(Some(entry))) = stored {
                            if entry.revision > last_seen {
                                break;
                            }
                        }
                    }
                }
            }
            reopens.fetch_add(1, Ordering::Relaxed);
        }
    });
    (seen, reopened)
}

/// Statuses seen came in increasing revisions (a value seen again by a
/// reopened watch is skipped), one agent instance, no device-wide
/// errors, and the deployment's generations never went back.
fn assert_monotonic(seen: &[Seen], name: &DeploymentName) {
    assert!(!seen.is_empty(), "no status seen");
    let mut last: Option<&Seen> = None;
    for s in seen {
        assert!(s.status.errors.is_empty(), "revision {}: {:?}", s.revision, s.status.errors);
        if let Some(prev) = last {
            if s.revision == prev.revision {
                continue;
            }
            assert!(
                s.revision > prev.revision,
                "status revision went back: {} after {}",
                s.revision,
                prev.revision
            );
            assert_eq!(s.status.instance_id, prev.status.instance_id, "another agent instance wrote");
            if let (Some(a), Some(b)) = (prev.status.deployments.get(name), s.status.deployments.get(name)) {
                assert!(
                    b.desired_generation >= a.desired_generation
                        && b.observed_generation >= a.observed_generation,
                    "status went back at revision {}: desired {}→{}, observed {}→{}",
                    s.revision,
                    a.desired_generation,
                    b.desired_generation,
                    a.observed_generation,
                    b.observed_generation
                );
            }
        }
        last = Some(s);
    }
}

/// `harmony-fleet init --replicas 3` makes every bucket with three replicas
/// (the republish of hints, direct gets and the status bucket's refusal of
/// rollups as without it); `init` without the flag leaves them at three;
/// a bucket made with one replica is changed to three by the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_with_replicas_makes_and_rescales_buckets() {
    let cluster = NatsCluster::start().await;
    let nats = cluster.urls().join(",");
    let init = |extra: &'static [&'static str]| {
        let nats = nats.clone();
        async move {
            let out = within(
                tokio::process::Command::new(harmony_e2e::workspace_bin("harmony-fleet"))
                    .args(["--nats", &nats, "init"])
                    .args(extra)
                    .output(),
            )
            .await
            .expect("harmony-fleet runs");
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
            stdout
        }
    };
    let client = within(FleetClient::connect(&cluster.urls(), None)).await.expect("operator connects");
    let js = client.jetstream().clone();
    let replicas = |stream: &'static str| {
        let js = js.clone();
        async move {
            let mut stream = within(js.get_stream(stream)).await.expect("stream exists");
            within(stream.info()).await.expect("stream info").config.clone()
        }
    };

    // The status bucket first made by a client without the setting: one replica.
    within(client.ensure_buckets()).await.expect("buckets");
    assert_eq!(replicas(STATUS_STREAM).await.num_replicas, 1);
    within(js.delete_stream(DESIRED_STREAM)).await.expect("desired-state bucket removed");
    within(js.delete_stream("OBJ_harmony-artifacts")).await.expect("artifacts bucket removed");

    let first = init(&["--replicas", "3"]).await;
    assert!(first.contains("harmony-desired-state: created"), "{first}");
    assert!(first.contains("harmony-agent-status: replicas changed from 1 to 3"), "{first}");
    assert!(first.contains("harmony-artifacts: created"), "{first}");
    assert!(first.contains("harmony-rollouts: replicas changed from 1 to 3"), "{first}");
    for stream in [DESIRED_STREAM, STATUS_STREAM, "OBJ_harmony-artifacts", "KV_harmony-rollouts"] {
        let config = replicas(stream).await;
        assert_eq!(config.num_replicas, 3, "{stream}");
        assert!(config.allow_direct, "{stream}");
    }
    let desired = replicas(DESIRED_STREAM).await;
    assert!(desired.republish.is_some_and(|r| r.headers_only), "hints still republished");
    assert_eq!(desired.max_messages_per_subject, harmony_fleet::DESIRED_STATE_HISTORY);
    assert!(!replicas(STATUS_STREAM).await.allow_rollup, "status bucket still refuses rollups");

    let again = init(&[]).await;
    assert_eq!(again.matches(": exists").count(), 4, "{again}");
    assert_eq!(replicas(DESIRED_STREAM).await.num_replicas, 3, "init without the flag changes nothing");
}

/// The resync of the agent behind the leaf node: the fallback for a hint
/// lost while the leaf node attaches to another hub node.
const LEAF_RESYNC: Duration = Duration::from_secs(10);

/// A site: one agent whose only server is a leaf node (no JetStream of its
/// own) attached to the hub cluster, the buckets in the hub (domain `hub`;
/// the leaf maps `$JS.API.>` and `$KV.>` into it, see docs/operations.md).
/// Direct gets, hints, status writes and commands cross the leaf connection: a
/// generation lands well before the resync could bring it. Then, three
/// times, the hub node the leaf is attached to is killed and a generation
/// written at once: the leaf attaches to another node and the agent
/// converges, by the hint when the leaf was attached at the write, else
/// by its resync (the hint was published while no leaf connection took
/// it, and the agent's own connection never dropped: nothing else tells
/// it to read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_behind_a_leaf_node_follows_the_hub() {
    harmony_scores::ensure_linked();
    let mut cluster = NatsCluster::start().await;
    let client = within(FleetClient::connect(&cluster.urls(), None))
        .await
        .expect("operator connects")
        .with_replicas(3);
    within(client.ensure_buckets()).await.expect("buckets with three replicas");
    let leaf = cluster.start_leaf("site-1");
    let device = DeviceId::new("dev-site").unwrap();
    let name = DeploymentName::new("app").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (state, root) = (dir.path().join("state"), dir.path().join("root"));
    std::fs::create_dir_all(&root).unwrap();
    let (url, resync) = (leaf.url(), LEAF_RESYNC.as_secs().to_string());
    let args = [
        "--device-id",
        device.as_str(),
        "--nats",
        &url,
        "--state-dir",
        state.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--resync",
        &resync,
        "--heartbeat",
        "3600",
        "--allow-unsigned",
    ];
    let agent = AgentProcess::start(&args, &dir.path().join("agent.log"));
    until_status(&client, &device, "online", |s| s.info.is_some()).await;
    let since = Instant::now();
    let (deployed, content) = deploy_retrying(&client, &device, &name, 1).await;
    until_file(&root, &content).await;
    let first = since.elapsed();
    assert!(first < LEAF_RESYNC / 2, "generation 1 took {first:?}: not by its hint\n{}", agent.log_text());
    until_applied(&client, &device, &name, &deployed).await;
    eprintln!("leaf: generation 1 on disk {first:.1?} after its write");
    // Commands cross the leaf too (request from the hub, reply from the site).
    let pong = within(client.ping(&device, Duration::from_secs(5))).await.expect("the device answers a ping");
    assert!(pong.ok, "{pong:?}");

    let js = client.jetstream().clone();
    for round in 0..3 {
        let hub = cluster.node_of_leaf(leaf.name()).expect("the leaf is attached");
        cluster.kill(hub);
        let since = Instant::now();
        let (deployed, content) = deploy_retrying(&client, &device, &name, 2 + round).await;
        let attached_at_write = cluster.node_of_leaf(leaf.name());
        let written = since.elapsed();
        until_file(&root, &content).await;
        let on_disk = since.elapsed();
        until_applied(&client, &device, &name, &deployed).await;
        eprintln!(
            "leaf round {round}: hub node {} killed; generation {} written after {written:.1?} (leaf attached then: \
             {:?}), on disk after {on_disk:.1?}",
            cluster.name(hub),
            deployed.generation,
            attached_at_write.map(|n| cluster.name(n).to_owned()),
        );
        cluster.restart(hub);
        cluster.until_replicas_current(&js, DESIRED_STREAM).await;
        cluster.until_replicas_current(&js, STATUS_STREAM).await;
    }
    let log = agent.log_text();
    assert!(!log.contains("panicked"), "{log}");
}
