//! Issue 10 §4: an idle device writes a few bytes per heartbeat and no
//! status. Its status (17.5 KB with 100 Scores) used to be written again at
//! every heartbeat and every resync: 58,329 writes in 130 s from an idle
//! 10,000-device fleet.

use std::time::{Duration, Instant};

use harmony_e2e::{file_score, within, Fleet};
use harmony_score_wire::names::{heartbeat_key, status_key, AGENT_STATUS_BUCKET};
use harmony_score_wire::{from_cbor, DeviceId};

/// The stream revision of `key` in the status bucket (0: none).
async fn revision(f: &Fleet, key: &str) -> u64 {
    let kv = within(f.client.jetstream().get_key_value(AGENT_STATUS_BUCKET)).await.unwrap();
    within(kv.entry(key)).await.unwrap().map_or(0, |e| e.revision)
}

// Heartbeat every second, resync every second: over five seconds of idling
// (five beats, five resyncs of every deployment, all NOOP) the status key
// is not written once; the heartbeat key is, and the operator's view of the
// device carries its last beat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_beats_a_few_bytes_and_never_rewrites_its_status() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let _agent = f.agent_process("dev-1", "dev-1", &["--heartbeat", "1", "--resync", "1"]);
    let scores = (0..20).map(|i| file_score(&format!("/etc/app/{i}"), "x\n")).collect();
    let g = f.deploy(&device, "app", scores).await;
    f.applied(&device, "app", g).await;
    // The first resync turns SUCCESS into NOOP: one more write. Then quiet.
    within(async {
        loop {
            let (status, _) = f.client.device_status(&device).await.unwrap().unwrap();
            if status
                .deployments
                .values()
                .all(|d| d.scores.iter().all(|s| s.status == harmony_topology::InterpretStatus::NOOP))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let (status_before, beat_before) =
        (revision(&f, &status_key(&device)).await, revision(&f, &heartbeat_key(&device)).await);
    let idle = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (status_after, beat_after) =
        (revision(&f, &status_key(&device)).await, revision(&f, &heartbeat_key(&device)).await);
    assert_eq!(status_after, status_before, "the status was written while the device idled");
    assert!(beat_after > beat_before, "no heartbeat stored in {:?}", idle.elapsed());

    let kv = within(f.client.jetstream().get_key_value(AGENT_STATUS_BUCKET)).await.unwrap();
    let beat = within(kv.entry(heartbeat_key(&device))).await.unwrap().expect("a heartbeat");
    assert!(beat.value.len() < 16, "a heartbeat of {} bytes", beat.value.len());
    let beat_ms: u64 = from_cbor(&beat.value, 16, "heartbeat").unwrap();
    let stored_ms = u64::try_from(beat.created.unix_timestamp_nanos() / 1_000_000).unwrap();
    // The operator's view carries the last beat, as the server stored it.
    let (seen, _) = f.client.device_status(&device).await.unwrap().unwrap();
    assert_eq!(seen.heartbeat_at_ms, stored_ms);
    assert!(beat_ms.abs_diff(stored_ms) < 1000, "device {beat_ms}, server {stored_ms}");
    let listed = f.client.list_statuses().await.unwrap();
    assert_eq!(listed.len(), 1, "heartbeat keys are not devices: {listed:?}");
    assert_eq!(listed[0].heartbeat_at_ms, stored_ms);
}

// A device (a compromised one, or one whose clock runs years ahead) writes
// its heartbeat and status with times near u64::MAX. The operator's view
// must not take its word: it would never look stale again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_or_status_dated_in_the_future_does_not_keep_a_device_fresh() {
    let f = Fleet::new().await;
    let device = DeviceId::new("liar").unwrap();
    let kv = within(f.client.jetstream().get_key_value(AGENT_STATUS_BUCKET)).await.unwrap();
    let mut status = harmony_e2e::reported_status(&device, None, Default::default());
    status.updated_at_ms = u64::MAX;
    status.heartbeat_at_ms = u64::MAX - 1;
    within(kv.put(status_key(&device), harmony_score_wire::to_cbor(&status).into())).await.unwrap();
    within(kv.put(heartbeat_key(&device), harmony_score_wire::to_cbor(&u64::MAX).into())).await.unwrap();
    let now = harmony_score_wire::now_ms();
    for seen in [
        f.client.device_status(&device).await.unwrap().unwrap().0,
        f.client.list_statuses().await.unwrap().remove(0),
    ] {
        assert!(seen.heartbeat_at_ms <= now + 1000 && seen.updated_at_ms <= now + 1000, "{seen:?}");
        // Stale once three default intervals pass, as for any device.
        assert!(harmony_fleet::report::is_stale(&seen, now + 10 * 60 * 1000));
    }
}

// Issue 10, session 6: every deploy cost two status writes, `applying` at
// the run's start and its end (two compare-and-sets, two acks, two hints
// back, two copies to the operator), and the end waited for the first's
// ack. A run that ends within a second is now one write: its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_apply_writes_its_status_once() {
    use futures_util::StreamExt;
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let _agent = f.agent_process("dev-1", "dev-1", &[]);
    f.online(&device).await;
    let subject = format!("$KV.{AGENT_STATUS_BUCKET}.{}", status_key(&device));
    let mut writes = within(f.client.nats().subscribe(subject)).await.unwrap();
    within(f.client.nats().flush()).await.unwrap();
    let app = harmony_e2e::deployment("app");
    for round in 0..3 {
        let g = f.deploy(&device, "app", vec![file_score("/etc/app", &format!("round {round}\n"))]).await;
        // Every write that names this generation, until one shows it applied.
        let mut seen = Vec::new();
        within(async {
            loop {
                let message = writes.next().await.expect("subscription open");
                let status: harmony_score_wire::AgentStatus =
                    from_cbor(&message.payload, 1 << 20, "status").expect("a status");
                let Some(d) = status.deployments.get(&app).filter(|d| d.desired_generation == g) else {
                    continue;
                };
                seen.push(d.phase);
                if d.phase == harmony_score_wire::Phase::Applied && d.observed_generation == g {
                    return;
                }
            }
        })
        .await;
        assert_eq!(
            seen,
            vec![harmony_score_wire::Phase::Applied],
            "round {round}: writes for generation {g}"
        );
    }
}

// Issue 10, session 6: the operator writes a deployment's key and its index
// entry; both hints reached the agent and it read both keys, one direct get
// per deploy for nothing (the key's own hint carries the change). The
// agent's reads are seen on the server as requests from its own inbox
// prefix: after a deploy it reads the key, never the index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_costs_the_agent_one_read_of_its_key_and_none_of_its_index() {
    use futures_util::StreamExt;
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let _agent = f.agent_process("dev-1", "dev-1", &[]);
    // The start's full read (index, then keys) is over once this applied.
    let g = f.deploy(&device, "app", vec![file_score("/etc/app", "0\n")]).await;
    f.applied(&device, "app", g).await;
    let api = format!("$JS.API.DIRECT.GET.KV_{}.>", harmony_score_wire::names::DESIRED_STATE_BUCKET);
    let mut reads = within(f.client.nats().subscribe(api)).await.unwrap();
    within(f.client.nats().flush()).await.unwrap();
    for round in 1..=3 {
        let g = f.deploy(&device, "app", vec![file_score("/etc/app", &format!("{round}\n"))]).await;
        f.applied(&device, "app", g).await;
    }
    // Every read of the agent reached the server before its last status
    // did; a marker published now arrives after them on this subscription.
    let marker = format!("$JS.API.DIRECT.GET.KV_{}.marker", harmony_score_wire::names::DESIRED_STATE_BUCKET);
    within(f.client.nats().publish(marker.clone(), "".into())).await.unwrap();
    let mut agents = Vec::new();
    loop {
        let read = within(reads.next()).await.expect("subscription open");
        if read.subject.as_str() == marker {
            break;
        }
        let from_agent = read
            .reply
            .as_ref()
            .is_some_and(|r| r.starts_with(&harmony_score_wire::names::inbox_prefix(&device)));
        if from_agent {
            agents.push(read.subject.to_string());
        }
    }
    assert!(!agents.iter().any(|s| s.ends_with("._index")), "the agent read its index: {agents:?}");
    let key_reads = agents.iter().filter(|s| s.ends_with("dev-1.app")).count();
    assert_eq!(key_reads, 3, "one read of the key per deploy: {agents:?}");
}
