//! `FleetClient` on many devices at once against a real nats-server: statuses listed with batched reads, `deploy_many`.
//!
//! No agent runs here: where devices would report, the test writes their
//! statuses and heartbeats into the status bucket itself.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use harmony_e2e::{file_score, reported_status, within, NatsServer};
use harmony_fleet::async_nats::jetstream::kv;
use harmony_fleet::{error_chain, DeployRequest, FleetClient};
use harmony_score_wire::names::{heartbeat_key, AGENT_STATUS_BUCKET, DESIRED_STATE_BUCKET};
use harmony_score_wire::{encode, to_cbor, AgentStatus, DeploymentName, DesiredState, DeviceId};

const ALL_TAGS: &[&str] = &["harmony.file/v1", "harmony.directory/v1"];
/// A value above the 1 MiB a status may be (the test's server takes 2 MiB).
const OVERSIZED: usize = 1_100_000;

async fn connect(server: &NatsServer) -> FleetClient {
    let client = within(FleetClient::connect(&[server.url()], None)).await.unwrap();
    within(client.ensure_buckets()).await.unwrap();
    client
}

fn dev(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

fn name(n: &str) -> DeploymentName {
    DeploymentName::new(n).unwrap()
}

async fn bucket(client: &FleetClient, name: &str) -> kv::Store {
    within(client.jetstream().get_key_value(name)).await.unwrap()
}

/// A key and its value.
type KeyValue = (String, Vec<u8>);

/// Puts every `(key, value)`, 64 at once.
async fn put_all(kv: &kv::Store, values: Vec<KeyValue>) {
    let puts: Vec<_> = within(
        futures_util::stream::iter(values)
            .map(|(key, value)| async move { kv.put(key, value.into()).await })
            .buffered(64)
            .collect::<Vec<_>>(),
    )
    .await;
    for put in puts {
        put.unwrap();
    }
}

/// Messages this client's connection has sent so far (requests and publishes).
fn sent(client: &FleetClient) -> u64 {
    client.nats().statistics().out_messages.load(Ordering::Relaxed)
}

/// When the server stored `key` (milliseconds since the epoch).
async fn stored_ms(kv: &kv::Store, key: &str) -> u64 {
    let entry = within(kv.entry(key)).await.unwrap().unwrap();
    u64::try_from(entry.created.unix_timestamp_nanos() / 1_000_000).unwrap()
}

/// Statuses (heartbeat time 0 in the value) for `dev-<first>` to
/// `dev-<last>`, and a heartbeat for every even one.
fn statuses(range: std::ops::Range<usize>) -> (Vec<KeyValue>, Vec<KeyValue>) {
    let mut statuses = Vec::new();
    let mut beats = Vec::new();
    for i in range {
        let device = dev(&format!("dev-{i:03}"));
        let mut status = reported_status(&device, Some(ALL_TAGS), BTreeMap::new());
        status.heartbeat_at_ms = 0;
        statuses.push((device.to_string(), to_cbor(&status)));
        if i % 2 == 0 {
            // A beat dated far ahead by the device: the server's time counts.
            beats.push((heartbeat_key(&device), to_cbor(&u64::MAX)));
        }
    }
    (statuses, beats)
}

/// Checks a listing of `dev-000` to `dev-<count-1>` against the bucket:
/// every device once, in order, with its heartbeat merged at the time the
/// server stored it (0 without one).
async fn check_listing(kv: &kv::Store, listed: &[AgentStatus], count: usize) {
    let ids: Vec<String> = listed.iter().map(|s| s.device_id.to_string()).collect();
    let expected: Vec<String> = (0..count).map(|i| format!("dev-{i:03}")).collect();
    assert_eq!(ids, expected, "exactly the devices, sorted, nothing else");
    for (i, status) in listed.iter().enumerate() {
        let beat = match i % 2 {
            0 => stored_ms(kv, &heartbeat_key(&status.device_id)).await,
            _ => 0,
        };
        assert_eq!(status.heartbeat_at_ms, beat, "{}", status.device_id);
    }
}

// Issue 10 §4: `list_statuses` read one key per device (161–176 ms for
// 10,000). Now one batched request per 1,024 keys, with the same result as
// the key-by-key reads; a server that takes the batched form (2.15 here)
// must not be read key by key, which the messages the connection sends show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_statuses_are_listed_with_a_few_batched_reads_and_junk_is_skipped() {
    let server = NatsServer::start_with_config("max_payload: 2097152\n");
    let client = connect(&server).await;
    let kv = bucket(&client, AGENT_STATUS_BUCKET).await;
    let (first, first_beats) = statuses(0..150);
    let (second, second_beats) = statuses(150..300);
    put_all(&kv, first).await;
    // Junk between them, and more than a page (8 MiB) of oversized values:
    // the statuses after it come in the next page.
    let mut junk: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| {
            let mut status = reported_status(&dev(&format!("big-{i}")), None, BTreeMap::new());
            status.agent_version = "x".repeat(OVERSIZED);
            (format!("big-{i}"), to_cbor(&status))
        })
        .collect();
    junk.push(("Not_A_Device".into(), to_cbor(&reported_status(&dev("x"), None, BTreeMap::new()))));
    junk.push(("some.other.key".into(), b"?".to_vec()));
    junk.push(("corrupt".into(), vec![0xff, 0x00, 0x13, 0x37]));
    junk.push(("ghost.heartbeat".into(), to_cbor(&1u64)));
    junk.push(("gone".into(), to_cbor(&reported_status(&dev("gone"), None, BTreeMap::new()))));
    put_all(&kv, junk).await;
    within(kv.delete("gone")).await.unwrap();
    put_all(&kv, second).await;
    put_all(&kv, first_beats).await;
    put_all(&kv, second_beats).await;
    // A status dated in the future, and one claiming another device's id.
    let mut liar = reported_status(&dev("dev-000"), Some(ALL_TAGS), BTreeMap::new());
    (liar.updated_at_ms, liar.heartbeat_at_ms) = (u64::MAX, 0);
    put_all(&kv, vec![("dev-000".into(), to_cbor(&liar))]).await;
    let mut impostor = reported_status(&dev("dev-002"), Some(ALL_TAGS), BTreeMap::new());
    impostor.heartbeat_at_ms = 0;
    put_all(&kv, vec![("dev-001".into(), to_cbor(&impostor))]).await;

    let before = sent(&client);
    let listed = within(client.list_statuses()).await.unwrap();
    let requests = sent(&client) - before;
    check_listing(&kv, &listed, 300).await;
    assert!(listed[0].updated_at_ms <= stored_ms(&kv, "dev-000").await, "{:?}", listed[0]);
    assert_eq!(listed[1].device_id, dev("dev-001"), "the key decides");
    // 463 keys: one request, and one more page after the oversized values.
    assert!(requests <= 3, "{requests} messages sent: read key by key?");

    // The same as key by key (the path for servers older than 2.11).
    let one_by_one = FleetClient::from_nats(client.nats().clone()).with_batched_reads(false);
    let before = sent(&client);
    assert_eq!(within(one_by_one.list_statuses()).await.unwrap(), listed);
    assert!(sent(&client) - before >= 463, "key by key sends a request per key");

    // Past 1,024 keys (1,063 now) one request may not match them all: the
    // keys are listed, then read 1,024 at a time.
    let (third, third_beats) = statuses(300..700);
    put_all(&kv, third).await;
    put_all(&kv, third_beats).await;
    let before = sent(&client);
    let listed = within(client.list_statuses()).await.unwrap();
    let requests = sent(&client) - before;
    check_listing(&kv, &listed, 700).await;
    assert!(requests <= 8, "{requests} messages sent: read key by key?");
    assert_eq!(within(one_by_one.list_statuses()).await.unwrap(), listed);
}

// The monitor of a fleet configured before batched reads were allowed to it
// (only the one-key subjects `$JS.API.DIRECT.GET.<stream>.>`): its batched
// request is dropped by the server, and the listing falls back to key by
// key after one wait, with the same result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_without_the_batched_form_still_lists_every_status() {
    let config = r#"
accounts { FLEET { jetstream: enabled, users: [
  { user: "operator", password: "op" },
  { user: "monitor", password: "mon", permissions: {
      publish: { allow: [
        "$JS.API.STREAM.INFO.KV_harmony-desired-state",
        "$JS.API.STREAM.INFO.KV_harmony-agent-status",
        "$JS.API.DIRECT.GET.KV_harmony-desired-state.>",
        "$JS.API.DIRECT.GET.KV_harmony-agent-status.>"
      ] },
      subscribe: { allow: [ "_INBOX_monitor.>" ] } } }
] } }
"#;
    let server = NatsServer::start_with_config(config);
    let url = |user: &str| server.url().replace("nats://", &format!("nats://{user}@"));
    let operator = within(FleetClient::connect(&[url("operator:op")], None)).await.unwrap();
    within(operator.ensure_buckets()).await.unwrap();
    let kv = bucket(&operator, AGENT_STATUS_BUCKET).await;
    let (values, beats) = statuses(0..40);
    put_all(&kv, values).await;
    put_all(&kv, beats).await;
    let monitor =
        within(FleetClient::connect_with_inbox_prefix(&[url("monitor:mon")], None, Some("_INBOX_monitor")))
            .await
            .unwrap();
    let listed = within(monitor.list_statuses()).await.unwrap();
    check_listing(&kv, &listed, 40).await;
    assert_eq!(within(operator.list_statuses()).await.unwrap(), listed);
}

/// The starting point of the deploy test, on any server: devices `d-000`
/// to `d-199` in every situation `deploy` meets.
async fn prepare(client: &FleetClient) {
    let status = bucket(client, AGENT_STATUS_BUCKET).await;
    let desired = bucket(client, DESIRED_STATE_BUCKET).await;
    let mut reports = Vec::new();
    for i in 0..200 {
        let device = dev(&format!("d-{i:03}"));
        let tags: Option<&[&str]> = match i {
            // Never reported, and without the directory Score.
            7 => None,
            14 => Some(&["harmony.file/v1"]),
            _ => Some(ALL_TAGS),
        };
        reports.push((device.to_string(), to_cbor(&reported_status(&device, tags, BTreeMap::new()))));
    }
    put_all(&status, reports).await;
    for i in 0..200 {
        let device = dev(&format!("d-{i:03}"));
        let web = |content: &str| {
            DeployRequest::new(device.clone(), name("web"), vec![file_score("/etc/web", content)]).force(true)
        };
        match i % 5 {
            // Three generations already.
            1 => {
                for content in ["1", "2", "3"] {
                    within(client.deploy(web(content))).await.unwrap();
                }
            }
            // Deployed, then deleted: a tombstone in the index.
            2 => {
                within(client.deploy(web("1"))).await.unwrap();
                within(client.delete(&device, &name("web"))).await.unwrap();
            }
            // Written by another tool, past the index: its history counts.
            3 => {
                let doc =
                    DesiredState::new(device.clone(), name("web"), 7, vec![file_score("/etc/web", "7")]);
                within(desired.put(format!("{device}.web"), encode(&doc).unwrap().into())).await.unwrap();
            }
            // The very Scores asked again below, with `skip_unchanged`.
            4 => {
                within(client.deploy(web("same"))).await.unwrap();
            }
            _ => {}
        }
    }
    // An index that is not one.
    within(desired.put("d-035._index", b"not an index".to_vec().into())).await.unwrap();
}

/// The requests of the deploy test, in order.
fn requests() -> Vec<DeployRequest> {
    let mut requests = Vec::new();
    for i in 0..200 {
        let device = dev(&format!("d-{i:03}"));
        let scores = match i {
            // Refused before anything is read.
            21 => vec![file_score("relative", "x")],
            // A Score d-014 does not run.
            14 => vec![harmony_e2e::file_score("/etc/web", "new"), directory("/srv")],
            _ if i % 5 == 4 => vec![file_score("/etc/web", "same")],
            _ => vec![file_score("/etc/web", "new")],
        };
        let mut request = DeployRequest::new(device.clone(), name("web"), scores).skip_unchanged(i % 5 == 4);
        request = match i {
            // Stale (it holds 3), then a fresh explicit one.
            11 => request.generation(Some(3)),
            16 => request.generation(Some(40)),
            // Checked against what the device reported (d-007 never did).
            7 | 14 | 20 => request,
            _ => request.force(true),
        };
        requests.push(request);
        // A second deployment for a few devices, and the same one again.
        if i % 50 == 0 {
            requests.push(
                DeployRequest::new(device.clone(), name("extra"), vec![file_score("/etc/x", "x")])
                    .force(true),
            );
            requests.push(
                DeployRequest::new(device, name("web"), vec![file_score("/etc/web", "again")]).force(true),
            );
        }
    }
    requests
}

fn directory(path: &str) -> Box<dyn harmony_score_wire::DeviceScore> {
    Box::new(harmony_scores::DirectoryScore {
        path: path.into(),
        mode: None,
        state: harmony_scores::PresenceState::Present,
    })
}

/// What a deploy returned, comparable across servers (digests hold times).
fn outcome(result: &Result<harmony_fleet::Deployed, harmony_fleet::FleetError>) -> String {
    match result {
        Ok(deployed) => format!("generation {} changed {}", deployed.generation, deployed.changed),
        Err(err) => error_chain(err),
    }
}

/// Every device's index and documents' generations, comparable across servers.
async fn desired_state_of(client: &FleetClient) -> Vec<String> {
    let mut seen = Vec::new();
    for i in 0..200 {
        let device = dev(&format!("d-{i:03}"));
        let index = match within(client.deployment_index(&device)).await {
            Ok(index) => format!("{:?} {:?}", index.deployments, index.deleted),
            Err(err) => error_chain(&err),
        };
        let mut line = format!("{device}: {index}");
        for deployment in ["web", "extra"] {
            if let Some(doc) = within(client.desired_state(&device, &name(deployment))).await.unwrap() {
                line.push_str(&format!(" {deployment}={}", doc.generation));
            }
        }
        seen.push(line);
    }
    seen
}

// Issue 10 §4: `deploy` costs four round trips one after the other. For
// 200 devices in every situation `deploy` meets (first deploy, next
// generation, tombstone, a key written past its index, unchanged Scores,
// stale or explicit generations, unsupported or unreported devices, a
// document refused, an index that is not one, two requests for one
// device), `deploy_many` returns what `deploy`, one request after the
// other, returns, and leaves the buckets as it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_many_gives_each_device_what_deploy_one_by_one_gives() {
    let (many_server, one_server) = (NatsServer::start(), NatsServer::start());
    let (many, one) = (connect(&many_server).await, connect(&one_server).await);
    tokio::join!(prepare(&many), prepare(&one));

    let before = sent(&many);
    let batched: Vec<String> = within(many.deploy_many(requests())).await.iter().map(outcome).collect();
    let messages = sent(&many) - before;
    let before = sent(&one);
    let mut sequential = Vec::new();
    for request in requests() {
        sequential.push(outcome(&within(one.deploy(request)).await));
    }
    let one_by_one = sent(&one) - before;
    assert_eq!(batched, sequential);
    let expected = |i: usize| sequential[i + 2 * (i / 50 + usize::from(!i.is_multiple_of(50)))].clone();
    assert_eq!(expected(0), "generation 1 changed true");
    assert_eq!(expected(1), "generation 4 changed true");
    assert_eq!(expected(2), "generation 2 changed true", "after the tombstone");
    assert_eq!(expected(3), "generation 8 changed true", "after the history");
    assert_eq!(expected(4), "generation 1 changed false", "unchanged");
    assert!(expected(7).contains("d-007 has never reported"), "{}", expected(7));
    assert!(expected(11).contains("not newer than its current generation 3"), "{}", expected(11));
    assert!(expected(14).contains("harmony.directory/v1"), "{}", expected(14));
    assert_eq!(expected(16), "generation 40 changed true");
    assert!(expected(21).contains("would be rejected"), "{}", expected(21));
    assert!(expected(35).contains("d-035._index"), "{}", expected(35));
    assert_eq!(desired_state_of(&many).await, desired_state_of(&one).await);
    // Reads in batches: about two writes per device (its index and its
    // key), the history reads of the keys written past their index, and a
    // few batched requests; `deploy` reads each key and index besides.
    eprintln!("deploy_many sent {messages} messages, deploy one by one {one_by_one}");
    assert!(messages + 300 < one_by_one, "deploy_many {messages} messages, deploy {one_by_one}");
}

// A writer that is not this client changes a key between `deploy_many`'s
// read and its write (another tool, writing past the index). The device
// then goes on as `deploy` does after losing the key: the index still holds
// its reserved generation, the key's history shows the other writer's, and
// the next generation is one above it. The other writer acts on the hint
// of the index write, so that it comes in between; should it come after
// the key write instead, the scenario runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_changed_by_another_writer_meanwhile_is_retried_as_deploy_does() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let other = connect(&server).await;
    let desired = bucket(&other, DESIRED_STATE_BUCKET).await;
    let mut conflicts = 0;
    for round in 0..5 {
        let deployment = name(&format!("web{round}"));
        let mut hints = within(other.nats().subscribe("harmony.hint.c-000._index")).await.unwrap();
        let bump = {
            let (desired, deployment) = (desired.clone(), deployment.clone());
            tokio::spawn(async move {
                hints.next().await.unwrap();
                let doc = DesiredState::new(
                    dev("c-000"),
                    deployment.clone(),
                    1000,
                    vec![file_score("/etc/w", "other")],
                );
                desired.put(format!("c-000.{deployment}"), encode(&doc).unwrap().into()).await.unwrap();
            })
        };
        let requests: Vec<_> = (0..200)
            .map(|i| {
                DeployRequest::new(
                    dev(&format!("c-{i:03}")),
                    deployment.clone(),
                    vec![file_score("/etc/w", "ours")],
                )
                .force(true)
            })
            .collect();
        let results = within(client.deploy_many(requests)).await;
        within(bump).await.unwrap();
        for result in &results[1..] {
            assert_eq!(result.as_ref().unwrap().generation, 1);
        }
        let ours = results[0].as_ref().unwrap();
        let doc = within(client.desired_state(&dev("c-000"), &deployment)).await.unwrap().unwrap();
        let index = within(client.deployment_index(&dev("c-000"))).await.unwrap();
        if ours.generation == 1 {
            // The other writer came after our key write: its value stands.
            assert_eq!(doc.generation, 1000);
            assert_eq!(index.deployments[&deployment], 1);
            continue;
        }
        conflicts += 1;
        assert_eq!(ours.generation, 1001, "one above the other writer's");
        assert_eq!(doc.generation, 1001);
        assert_eq!(index.deployments[&deployment], 1001);
        let history: Vec<u64> = within(async {
            desired.history(format!("c-000.{deployment}")).await.unwrap().collect::<Vec<_>>().await
        })
        .await
        .into_iter()
        .map(|entry| {
            harmony_score_wire::decode(&entry.unwrap().value, &Default::default()).unwrap().generation
        })
        .collect();
        assert_eq!(history, [1000, 1001]);
        break;
    }
    assert_eq!(conflicts, 1, "the other writer never came in between");
}

// Another writer changes a device's index between `deploy_many`'s read and
// its index write (a plain put of an index naming another deployment, sent
// as soon as the other writer sees the batched read go by). The device
// then goes on as `deploy` does after losing the index: it reads both
// again and keeps the other writer's entry beside its own. Should the put
// come after the index write instead (it then replaces the index), the
// scenario runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_changed_by_another_writer_meanwhile_is_retried_as_deploy_does() {
    let server = NatsServer::start();
    let (client, other) = (connect(&server).await, connect(&server).await);
    let desired = bucket(&other, DESIRED_STATE_BUCKET).await;
    let mut conflicts = 0;
    for round in 0..5 {
        let deployment = name(&format!("web{round}"));
        let devices: Vec<DeviceId> = (0..200).map(|i| dev(&format!("r{round}-{i:03}"))).collect();
        let last = devices[199].clone();
        // The body form of the direct get: batched reads only.
        let mut reads =
            within(other.nats().subscribe(format!("$JS.API.DIRECT.GET.KV_{DESIRED_STATE_BUCKET}")))
                .await
                .unwrap();
        within(other.nats().flush()).await.unwrap();
        let bump = {
            let (desired, last) = (desired.clone(), last.clone());
            tokio::spawn(async move {
                reads.next().await.unwrap();
                let mut index = harmony_score_wire::DeploymentIndex::default();
                index.deployments.insert(name("side"), 5);
                desired.put(format!("{last}._index"), to_cbor(&index).into()).await.unwrap();
            })
        };
        let requests: Vec<_> = devices
            .iter()
            .map(|device| {
                DeployRequest::new(device.clone(), deployment.clone(), vec![file_score("/etc/w", "w")])
                    .force(true)
            })
            .collect();
        let before = sent(&client);
        let results = within(client.deploy_many(requests)).await;
        let messages = sent(&client) - before;
        within(bump).await.unwrap();
        for result in &results {
            assert_eq!(result.as_ref().unwrap().generation, 1);
        }
        let index = within(client.deployment_index(&last)).await.unwrap();
        if !index.deployments.contains_key(&deployment) {
            // The other writer's plain put came after ours and replaced it.
            continue;
        }
        // One batched read and 400 writes; a device that lost its index
        // write (199 keys written) reads its key and index again and
        // writes both.
        if messages == 401 {
            // The put came before the read: nothing conflicted.
            continue;
        }
        assert_eq!(messages, 1 + 200 + 199 + 4, "one device retried");
        conflicts += 1;
        assert_eq!(index.deployments, BTreeMap::from([(name("side"), 5), (deployment.clone(), 1)]));
        let doc = within(client.desired_state(&last, &deployment)).await.unwrap().unwrap();
        assert_eq!(doc.generation, 1);
        break;
    }
    assert_eq!(conflicts, 1, "the other writer never came in between");
}
