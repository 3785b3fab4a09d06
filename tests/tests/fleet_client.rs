//! `FleetClient` against a real nats-server: buckets and hints, deploy/delete with the index, tags, waits, commands.
//!
//! No agent runs here: where a device would report, the test writes the
//! device's `AgentStatus` into the status bucket itself.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use harmony_e2e::{file_score, report_status, reported_status, within, NatsServer, WAIT};
use harmony_fleet::async_nats::{self, jetstream, HeaderMap};
use harmony_fleet::{BucketAction, DeployRequest, FleetClient, FleetError};
use harmony_score_wire::names::{command_subject, AGENT_STATUS_BUCKET, DESIRED_STATE_BUCKET};
use harmony_score_wire::{
    document_digest, encode, to_cbor, AgentStatus, CommandReply, DecodeError, DeploymentName,
    DeploymentStatus, DesiredState, DeviceId, DeviceScore, EncodeError, Phase, StatusError,
};
use harmony_scores::{DirectoryScore, FileScore, PresenceState};

async fn connect(server: &NatsServer) -> FleetClient {
    within(FleetClient::connect(&[server.url()], None)).await.unwrap()
}

fn dev(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

fn name(n: &str) -> DeploymentName {
    DeploymentName::new(n).unwrap()
}

fn directory(path: &str) -> Box<dyn DeviceScore> {
    Box::new(DirectoryScore { path: path.into(), mode: None, state: PresenceState::Present })
}

fn status(
    device: &DeviceId,
    tags: Option<&[&str]>,
    deployments: Vec<(&str, DeploymentStatus)>,
) -> AgentStatus {
    reported_status(device, tags, deployments.into_iter().map(|(n, d)| (name(n), d)).collect())
}

fn deployment(desired: u64, observed: u64, phase: Phase) -> DeploymentStatus {
    DeploymentStatus {
        desired_generation: desired,
        observed_generation: observed,
        phase,
        scores: Vec::new(),
        error: None,
        last_attempt_at_ms: 0,
        last_applied_at_ms: 0,
        ..Default::default()
    }
}

async fn report(client: &FleetClient, status: &AgentStatus) {
    report_status(client, status).await;
}

const ALL_TAGS: &[&str] = &["harmony.file/v1", "harmony.directory/v1"];

/// The desired-state bucket, as another tool would open it.
async fn desired_kv(client: &FleetClient) -> jetstream::kv::Store {
    within(client.ensure_buckets()).await.unwrap();
    within(client.jetstream().get_key_value(DESIRED_STATE_BUCKET)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_buckets_is_idempotent_and_the_status_bucket_refuses_rollups() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let first = within(client.ensure_buckets()).await.unwrap();
    assert!(first.iter().all(|r| r.action == BucketAction::Created), "{first:?}");
    let again = within(client.ensure_buckets()).await.unwrap();
    assert!(again.iter().all(|r| r.action == BucketAction::Existed), "{again:?}");
    // A second operator finds them too.
    let other = connect(&server).await;
    assert!(within(other.ensure_buckets()).await.unwrap().iter().all(|r| r.action == BucketAction::Existed));

    let mut desired = within(client.jetstream().get_stream("KV_harmony-desired-state")).await.unwrap();
    let republish = within(desired.info()).await.unwrap().config.republish.clone().expect("a republish");
    assert_eq!(
        (republish.source.as_str(), republish.destination.as_str(), republish.headers_only),
        ("$KV.harmony-desired-state.>", "harmony.hint.>", true)
    );

    let mut stream = within(client.jetstream().get_stream("KV_harmony-agent-status")).await.unwrap();
    let config = within(stream.info()).await.unwrap().config.clone();
    assert!(!config.allow_rollup && config.allow_direct && config.deny_delete);
    assert_eq!(config.max_messages_per_subject, 1);
    assert_eq!(config.subjects, vec!["$KV.harmony-agent-status.>".to_owned()]);

    let device = dev("dev-1");
    report(&client, &status(&device, None, vec![])).await;
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Rollup", "all");
    let ack = within(client.jetstream().publish_with_headers(
        "$KV.harmony-agent-status.dev-1",
        headers,
        to_cbor(&status(&device, None, vec![])).into(),
    ))
    .await
    .unwrap();
    let err = within(std::future::IntoFuture::into_future(ack)).await.expect_err("a rollup must be refused");
    assert!(err.to_string().contains("rollup"), "{err}");
    // The status written before the refused rollup is still there.
    assert!(within(client.device_status(&device)).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_buckets_repairs_a_status_bucket_that_allows_rollups() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    // What `create_key_value` makes: rollups allowed.
    within(client.jetstream().create_key_value(jetstream::kv::Config {
        bucket: AGENT_STATUS_BUCKET.into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    let report = within(client.ensure_buckets()).await.unwrap();
    assert_eq!(report[1].action, BucketAction::Repaired, "{report:?}");
    let mut stream = within(client.jetstream().get_stream("KV_harmony-agent-status")).await.unwrap();
    assert!(!within(stream.info()).await.unwrap().config.allow_rollup);
}

/// The next message on `sub`, within [`WAIT`].
async fn next_message(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    within(sub.next()).await.expect("subscription open")
}

/// The stream sequence a republished hint carries.
fn hint_sequence(message: &async_nats::Message) -> u64 {
    let headers = message.headers.as_ref().expect("a hint has headers");
    headers.get("Nats-Sequence").expect("Nats-Sequence").as_str().parse().unwrap()
}

async fn revision(kv: &jetstream::kv::Store, key: &str) -> u64 {
    within(kv.entry(key)).await.unwrap().expect("the key has an entry").revision
}

// Regression: devices followed `$KV.…` directly and saw the operator's ack
// inbox as the reply subject; the bucket now republishes headers-only hints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_is_republished_as_a_headers_only_hint_without_reply_subject() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let kv = desired_kv(&client).await;
    let device = dev("dev-1");
    let mut hints = client.nats().subscribe("harmony.hint.dev-1.>").await.unwrap();
    let mut others = client.nats().subscribe("harmony.hint.dev-2.>").await.unwrap();
    within(client.nats().flush()).await.unwrap();

    let request =
        DeployRequest::new(device.clone(), name("web"), vec![file_score("/etc/web", "a")]).force(true);
    within(client.deploy(request)).await.unwrap();
    // The index first (so a device that hears of the key can find it in the index), then the key.
    let index_hint = next_message(&mut hints).await;
    assert_eq!(index_hint.subject.as_str(), "harmony.hint.dev-1._index");
    assert_eq!(hint_sequence(&index_hint), revision(&kv, "dev-1._index").await);
    let hint = next_message(&mut hints).await;
    assert_eq!(hint.subject.as_str(), "harmony.hint.dev-1.web");
    assert_eq!(hint_sequence(&hint), revision(&kv, "dev-1.web").await);
    assert!(hint.reply.is_none(), "a hint must not carry a reply subject: {:?}", hint.reply);
    assert!(hint.payload.is_empty(), "headers only, {} bytes of payload", hint.payload.len());

    // A write by another tool is republished too, and a delete marker as well.
    let put = within(kv.put("dev-1.web", b"by another tool".to_vec().into())).await.unwrap();
    assert_eq!(hint_sequence(&next_message(&mut hints).await), put);
    within(kv.delete("dev-1.web")).await.unwrap();
    let marker = next_message(&mut hints).await;
    assert_eq!(hint_sequence(&marker), revision(&kv, "dev-1.web").await);
    let headers = marker.headers.as_ref().unwrap();
    assert_eq!(headers.get("KV-Operation").map(|v| v.as_str()), Some("DEL"));
    // Another device's subjects saw none of it.
    within(client.nats().flush()).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(200), others.next()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_buckets_adds_the_hint_republish_to_an_old_desired_state_bucket() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    // What the first edition made: no republish.
    let old = within(client.jetstream().create_key_value(jetstream::kv::Config {
        bucket: DESIRED_STATE_BUCKET.into(),
        history: 5,
        ..Default::default()
    }))
    .await
    .unwrap();
    within(old.put("dev-1.web", b"kept".to_vec().into())).await.unwrap();

    let report = within(client.ensure_buckets()).await.unwrap();
    assert_eq!(report[0].action, BucketAction::Repaired, "{report:?}");
    let again = within(client.ensure_buckets()).await.unwrap();
    assert_eq!(again[0].action, BucketAction::Existed, "{again:?}");
    let mut stream = within(client.jetstream().get_stream("KV_harmony-desired-state")).await.unwrap();
    let config = within(stream.info()).await.unwrap().config.clone();
    assert_eq!(
        config.republish.map(|r| (r.destination, r.headers_only)),
        Some(("harmony.hint.>".into(), true))
    );
    assert_eq!(config.max_messages_per_subject, 5, "the rest of the config is kept");

    // Its values are kept and its writes are now hinted.
    let kv = desired_kv(&client).await;
    assert_eq!(within(kv.get("dev-1.web")).await.unwrap().as_deref(), Some(&b"kept"[..]));
    let mut hints = client.nats().subscribe("harmony.hint.dev-1.>").await.unwrap();
    within(client.nats().flush()).await.unwrap();
    let put = within(kv.put("dev-1.web", b"new".to_vec().into())).await.unwrap();
    assert_eq!(hint_sequence(&next_message(&mut hints).await), put);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_writes_the_index_then_the_key_and_generations_only_grow() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let device = dev("dev-1");
    report(&client, &status(&device, Some(ALL_TAGS), vec![])).await;
    let deploy = |content: &str| {
        DeployRequest::new(device.clone(), name("web"), vec![file_score("/etc/web", content)])
    };

    assert_eq!(within(client.deploy(deploy("a"))).await.unwrap().generation, 1);
    let doc = within(client.desired_state(&device, &name("web"))).await.unwrap().unwrap();
    assert_eq!((doc.device_id.as_str(), doc.deployment.as_str(), doc.generation), ("dev-1", "web", 1));
    assert!(doc.issued_at > 0);
    assert_eq!(
        within(client.deployment_index(&device)).await.unwrap().deployments,
        BTreeMap::from([(name("web"), 1)])
    );

    assert_eq!(within(client.deploy(deploy("b"))).await.unwrap().generation, 2);
    assert_eq!(within(client.deployment_index(&device)).await.unwrap().deployments[&name("web")], 2);

    // An explicit generation must be newer.
    let err = within(client.deploy(deploy("c").generation(Some(2)))).await.unwrap_err();
    assert!(matches!(err, FleetError::StaleGeneration { current: 2, requested: 2, .. }), "{err:?}");
    assert_eq!(within(client.deploy(deploy("c").generation(Some(10)))).await.unwrap().generation, 10);

    // Unchanged Scores write nothing when asked so; changed ones do.
    let same = within(client.deploy(deploy("c").skip_unchanged(true))).await.unwrap();
    assert_eq!((same.generation, same.changed), (10, false));
    let changed = within(client.deploy(deploy("d").skip_unchanged(true))).await.unwrap();
    assert_eq!((changed.generation, changed.changed), (11, true));

    // Delete: marker on the key, a tombstone in the index; a redeploy continues the numbering.
    assert!(within(client.delete(&device, &name("web"))).await.unwrap());
    assert!(within(client.desired_state(&device, &name("web"))).await.unwrap().is_none());
    let index = within(client.deployment_index(&device)).await.unwrap();
    assert!(index.deployments.is_empty(), "{index:?}");
    assert_eq!(index.deleted, BTreeMap::from([(name("web"), 11)]));
    assert!(!within(client.delete(&device, &name("web"))).await.unwrap());
    assert_eq!(within(client.deploy(deploy("e"))).await.unwrap().generation, 12);
    let index = within(client.deployment_index(&device)).await.unwrap();
    assert_eq!(index.deployments, BTreeMap::from([(name("web"), 12)]));
    assert!(index.deleted.is_empty(), "a redeploy removes the tombstone: {index:?}");
}

// Regression: a purge by another tool erased the key's history, the index
// had forgotten the deleted deployment, and numbering restarted at 1 while
// devices still held generation 3 (and refused 1 as stale).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbering_continues_after_a_delete_and_a_purge_by_another_tool() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let kv = desired_kv(&client).await;
    let device = dev("dev-1");
    let deploy = |content: &str| {
        DeployRequest::new(device.clone(), name("web"), vec![file_score("/etc/web", content)]).force(true)
    };
    for (content, generation) in [("1", 1), ("2", 2), ("3", 3)] {
        assert_eq!(within(client.deploy(deploy(content))).await.unwrap().generation, generation);
    }
    assert!(within(client.delete(&device, &name("web"))).await.unwrap());
    within(kv.purge("dev-1.web")).await.unwrap();
    let history: Vec<_> =
        within(async { kv.history("dev-1.web").await.unwrap().collect::<Vec<_>>().await }).await;
    assert_eq!(history.len(), 1, "only the purge marker is left");

    let again = within(client.deploy(deploy("4"))).await.unwrap();
    assert_eq!(again.generation, 4);
    assert_eq!(within(client.desired_state(&device, &name("web"))).await.unwrap().unwrap().generation, 4);
    let index = within(client.deployment_index(&device)).await.unwrap();
    assert_eq!(index.deployments, BTreeMap::from([(name("web"), 4)]));
    assert!(index.deleted.is_empty(), "{index:?}");

    // A key purged without a delete (no tombstone): the index's live entry still counts.
    within(kv.purge("dev-1.web")).await.unwrap();
    assert_eq!(within(client.deploy(deploy("5"))).await.unwrap().generation, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbering_continues_after_the_highest_generation_in_the_keys_history() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let kv = desired_kv(&client).await;
    // Another tool wrote generation 7, then (wrongly) 2, and the index knows neither.
    for generation in [7, 2] {
        let doc = DesiredState::new(dev("dev-1"), name("web"), generation, vec![file_score("/etc/web", "x")]);
        within(kv.put("dev-1.web", encode(&doc).unwrap().into())).await.unwrap();
    }
    let request =
        DeployRequest::new(dev("dev-1"), name("web"), vec![file_score("/etc/web", "y")]).force(true);
    assert_eq!(within(client.deploy(request)).await.unwrap().generation, 8);
}

// Regression: the key was written before the index, so a failed index write
// left a key that a device which was offline could never discover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_index_write_leaves_no_key_behind() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let kv = desired_kv(&client).await;
    within(kv.put("dev-1._index", b"not an index".to_vec().into())).await.unwrap();
    let request =
        DeployRequest::new(dev("dev-1"), name("web"), vec![file_score("/etc/web", "x")]).force(true);
    let err = within(client.deploy(request)).await.unwrap_err();
    assert!(matches!(&err, FleetError::BadValue { key, .. } if key == "dev-1._index"), "{err:?}");
    assert!(within(kv.entry("dev-1.web")).await.unwrap().is_none(), "the key must not be written");
}

// Regression: `prior + 1` overflowed (a panic in debug builds, generation 0 in release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_at_the_last_generation_is_a_typed_error_not_a_panic() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let device = dev("dev-1");
    let deploy = |content: &str| {
        DeployRequest::new(device.clone(), name("web"), vec![file_score("/etc/web", content)]).force(true)
    };
    let last = within(client.deploy(deploy("a").generation(Some(u64::MAX)))).await.unwrap();
    assert_eq!(last.generation, u64::MAX);

    let err = within(client.deploy(deploy("b"))).await.unwrap_err();
    assert!(matches!(&err, FleetError::GenerationExhausted { key } if key == "dev-1.web"), "{err:?}");
    let err = within(client.deploy(deploy("b").generation(Some(u64::MAX)))).await.unwrap_err();
    assert!(matches!(err, FleetError::StaleGeneration { current: u64::MAX, .. }), "{err:?}");
    // Nothing changed; an unchanged document is still recognised as deployed.
    let doc = within(client.desired_state(&device, &name("web"))).await.unwrap().unwrap();
    assert_eq!(doc.generation, u64::MAX);
    let same = within(client.deploy(deploy("a").skip_unchanged(true))).await.unwrap();
    assert_eq!((same.generation, same.changed, same.digest), (u64::MAX, false, last.digest));

    // After a delete (tombstone at u64::MAX) the numbering is still exhausted.
    assert!(within(client.delete(&device, &name("web"))).await.unwrap());
    let err = within(client.deploy(deploy("c"))).await.unwrap_err();
    assert!(matches!(err, FleetError::GenerationExhausted { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_digest_is_of_the_bytes_stored() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let kv = desired_kv(&client).await;
    let request =
        || DeployRequest::new(dev("dev-1"), name("web"), vec![file_score("/etc/web", "x")]).force(true);
    let written = within(client.deploy(request())).await.unwrap();
    let stored = within(kv.get("dev-1.web")).await.unwrap().unwrap();
    assert_eq!(written.digest, document_digest(&stored));
    let unchanged = within(client.deploy(request().skip_unchanged(true))).await.unwrap();
    assert!(!unchanged.changed);
    assert_eq!(unchanged.digest, written.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_score_is_refused_before_anything_is_written() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let kv = desired_kv(&client).await;
    let bad_mode = Box::new(FileScore {
        path: "/usr/bin/x".into(),
        content: String::new(),
        mode: Some(0o14755),
        state: PresenceState::Present,
    });
    for scores in [vec![file_score("relative", "x")], vec![bad_mode as Box<dyn DeviceScore>]] {
        let err = within(client.deploy(DeployRequest::new(dev("dev-1"), name("web"), scores).force(true)))
            .await
            .unwrap_err();
        let FleetError::EncodeFailed(EncodeError::WouldBeRejected(DecodeError::InvalidScore {
            index,
            tag,
            field,
            ..
        })) = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!((*index, tag.as_str()), (0, "harmony.file/v1"));
        assert!(matches!(field.as_deref(), Some("path" | "mode")), "{field:?}");
    }
    assert!(within(kv.entry("dev-1.web")).await.unwrap().is_none());
    assert!(within(kv.entry("dev-1._index")).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_stored_document_is_replaced_not_a_dead_end() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    within(client.ensure_buckets()).await.unwrap();
    let kv = within(client.jetstream().get_key_value("harmony-desired-state")).await.unwrap();
    within(kv.put("dev-1.web", b"not a document".to_vec().into())).await.unwrap();
    let request =
        DeployRequest::new(dev("dev-1"), name("web"), vec![file_score("/etc/web", "x")]).force(true);
    assert_eq!(within(client.deploy(request)).await.unwrap().generation, 1);
    assert_eq!(
        within(client.desired_state(&dev("dev-1"), &name("web"))).await.unwrap().unwrap().generation,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operators_never_lose_each_others_index_entries_or_generations() {
    let server = NatsServer::start();
    let clients = [connect(&server).await, connect(&server).await];
    let device = dev("dev-1");
    within(clients[0].ensure_buckets()).await.unwrap();

    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let client = clients[i % 2].clone();
            let request = DeployRequest::new(
                device.clone(),
                name(&format!("app-{i}")),
                vec![file_score("/etc/x", "x")],
            );
            tokio::spawn(async move { client.deploy(request.force(true)).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(within(task).await.unwrap().unwrap().generation, 1);
    }
    let index = within(clients[1].deployment_index(&device)).await.unwrap();
    assert_eq!(index.deployments.len(), 10, "{index:?}");
    assert!(index.deployments.values().all(|g| *g == 1));

    // Ten writers of one deployment: ten distinct generations, the index at the highest.
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let client = clients[i % 2].clone();
            let request = DeployRequest::new(
                device.clone(),
                name("shared"),
                vec![file_score("/etc/s", &i.to_string())],
            );
            tokio::spawn(async move { client.deploy(request.force(true)).await })
        })
        .collect();
    let mut generations = Vec::new();
    for task in tasks {
        generations.push(within(task).await.unwrap().unwrap().generation);
    }
    generations.sort();
    generations.dedup();
    // Distinct (a writer that lost the key after reserving a generation in
    // the index may leave that number unused); the key holds the highest.
    assert_eq!(generations.len(), 10, "{generations:?}");
    let highest = *generations.last().unwrap();
    let doc = within(clients[0].desired_state(&device, &name("shared"))).await.unwrap().unwrap();
    assert_eq!(doc.generation, highest);
    let index = within(clients[0].deployment_index(&device)).await.unwrap();
    assert_eq!(index.deployments[&name("shared")], highest);
    assert_eq!(index.deployments.len(), 11);
}

// `if_generation`: an operator's read-decide-write. Another writer between
// the read and the write (here: ten at once, each conditioned on the same
// generation, from two clients, all through the batched and the single
// path) makes all but one fail with a typed error, and nothing of theirs
// is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_generation_writes_only_over_the_generation_it_names_and_one_of_racing_writers_wins() {
    let server = NatsServer::start();
    let clients = [connect(&server).await, connect(&server).await];
    within(clients[0].ensure_buckets()).await.unwrap();
    let (device, app) = (dev("dev-1"), name("app"));
    let request = |content: &str, expected: u64| {
        DeployRequest::new(device.clone(), app.clone(), vec![file_score("/etc/x", content)])
            .force(true)
            .if_generation(Some(expected))
    };
    let content = |client: &FleetClient| {
        let (client, device, app) = (client.clone(), device.clone(), app.clone());
        async move {
            let doc = client.desired_state(&device, &app).await.unwrap().unwrap();
            (doc.generation, format!("{:?}", doc.scores))
        }
    };
    // 0: no document yet; then only over the generation named.
    let moved = clients[0].deploy(request("a", 1)).await;
    assert!(matches!(moved, Err(FleetError::GenerationMoved { expected: 1, found: 0, .. })), "{moved:?}");
    assert!(clients[0].desired_state(&device, &app).await.unwrap().is_none(), "nothing written");
    assert_eq!(clients[0].deploy(request("a", 0)).await.unwrap().generation, 1);
    assert_eq!(clients[1].deploy(request("b", 1)).await.unwrap().generation, 2);
    let before = content(&clients[0]).await;
    let moved = clients[0].deploy(request("c", 1)).await;
    assert!(
        matches!(&moved, Err(FleetError::GenerationMoved { expected: 1, found: 2, key }) if key == "dev-1.app"),
        "{moved:?}"
    );
    assert_eq!(content(&clients[0]).await, before, "the key is unchanged");

    // Ten racing writers, each conditioned on generation 2: exactly one wins.
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let client = clients[i % 2].clone();
            let request = request(&format!("race {i}"), 2);
            tokio::spawn(async move {
                if i % 3 == 0 {
                    client.deploy_many(vec![request]).await.remove(0)
                } else {
                    client.deploy(request).await
                }
            })
        })
        .collect();
    let (mut won, mut lost) = (Vec::new(), 0);
    for task in tasks {
        match within(task).await.unwrap() {
            Ok(deployed) => won.push(deployed.generation),
            Err(FleetError::GenerationMoved { expected: 2, found, .. }) if found > 2 => lost += 1,
            Err(err) => panic!("{err:?}"),
        }
    }
    assert_eq!((won.len(), lost), (1, 9), "{won:?}");
    let (generation, _) = content(&clients[1]).await;
    assert_eq!(generation, won[0]);

    // A deleted key holds no document: 0 again.
    clients[0].delete(&device, &app).await.unwrap();
    let moved = clients[0].deploy(request("d", generation)).await;
    assert!(matches!(moved, Err(FleetError::GenerationMoved { found: 0, .. })), "{moved:?}");
    assert!(clients[0].deploy(request("d", 0)).await.unwrap().generation > generation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_score_tags_are_refused_unless_forced() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let device = dev("dev-1");
    let request =
        || DeployRequest::new(device.clone(), name("web"), vec![directory("/srv"), file_score("/srv/a", "")]);

    // Never reported: refused, nothing written.
    let err = within(client.deploy(request())).await.unwrap_err();
    assert!(matches!(err, FleetError::NoDeviceInfo { .. }), "{err:?}");

    report(&client, &status(&device, Some(&["harmony.directory/v1"]), vec![])).await;
    let err = within(client.deploy(request())).await.unwrap_err();
    let FleetError::UnsupportedScores { tags, .. } = &err else { panic!("{err:?}") };
    assert_eq!(tags, &["harmony.file/v1".to_owned()]);
    assert!(err.to_string().contains("--force"), "{err}");
    assert!(within(client.desired_state(&device, &name("web"))).await.unwrap().is_none());
    assert!(within(client.deployment_index(&device)).await.unwrap().deployments.is_empty());

    assert_eq!(within(client.deploy(request().force(true))).await.unwrap().generation, 1);
    assert!(within(client.desired_state(&device, &name("web"))).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_are_listed_and_device_info_read() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    assert!(within(client.list_statuses()).await.unwrap().is_empty());
    for id in ["dev-b", "dev-a"] {
        report(&client, &status(&dev(id), Some(ALL_TAGS), vec![("web", deployment(1, 1, Phase::Applied))]))
            .await;
    }
    let all = within(client.list_statuses()).await.unwrap();
    assert_eq!(all.iter().map(|s| s.device_id.as_str()).collect::<Vec<_>>(), ["dev-a", "dev-b"]);
    let info = within(client.device_info(&dev("dev-a"))).await.unwrap().unwrap();
    assert!(info.supports("harmony.file/v1"));
    assert!(within(client.device_info(&dev("dev-c"))).await.unwrap().is_none());
}

// Issue 7 §1: a device wrote its own status claiming `device_id: dev-2`, and
// `harmony-fleet status` showed dev-2 twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_key_decides_the_device_not_the_value() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    report(&client, &status(&dev("dev-2"), Some(ALL_TAGS), vec![("web", deployment(1, 1, Phase::Applied))]))
        .await;
    // dev-1 writes its own key, claiming to be dev-2.
    let forged = status(&dev("dev-2"), Some(ALL_TAGS), vec![("web", deployment(9, 9, Phase::Applied))]);
    let kv = within(client.jetstream().get_key_value("harmony-agent-status")).await.unwrap();
    within(kv.put("dev-1", harmony_score_wire::to_cbor(&forged).into())).await.unwrap();
    let all = within(client.list_statuses()).await.unwrap();
    assert_eq!(all.iter().map(|s| s.device_id.as_str()).collect::<Vec<_>>(), ["dev-1", "dev-2"]);
    let (dev2, _) = within(client.device_status(&dev("dev-2"))).await.unwrap().unwrap();
    assert_eq!(dev2.deployments[&name("web")].observed_generation, 1, "dev-2's own report is untouched");
    let (dev1, _) = within(client.device_status(&dev("dev-1"))).await.unwrap().unwrap();
    assert_eq!(dev1.device_id.as_str(), "dev-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_map_no_responders_to_device_offline_and_check_replies() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let device = dev("dev-1");
    let err = within(client.ping(&device, Duration::from_secs(2))).await.unwrap_err();
    assert!(matches!(err, FleetError::DeviceOffline { .. }), "{err:?}");

    // A stand-in agent: answers ping properly, reconcile with garbage.
    let nats = async_nats::connect(server.url()).await.unwrap();
    let mut pings = nats.subscribe(command_subject(&device, "ping")).await.unwrap();
    let mut reconciles = nats.subscribe(command_subject(&device, "reconcile")).await.unwrap();
    // `flush` only empties the socket; a message to itself proves the server
    // processed the subscriptions before the requests below are sent.
    let mut probe = nats.subscribe("probe").await.unwrap();
    nats.publish("probe", Vec::new().into()).await.unwrap();
    within(probe.next()).await.unwrap();
    let responder = tokio::spawn(async move {
        use harmony_fleet::async_nats::Subject;
        let reply = CommandReply {
            device_id: dev("dev-1"),
            verb: "ping".into(),
            ok: true,
            message: "pong".into(),
            agent_version: "0.1.0".into(),
        };
        let inbox = pings.next().await.and_then(|m| m.reply).unwrap_or_else(|| Subject::from("none"));
        nats.publish(inbox, to_cbor(&reply).into()).await.unwrap();
        let inbox = reconciles.next().await.and_then(|m| m.reply).unwrap_or_else(|| Subject::from("none"));
        nats.publish(inbox, b"not cbor".to_vec().into()).await.unwrap();
        nats.flush().await.unwrap();
    });
    let reply = within(client.ping(&device, Duration::from_secs(5))).await.unwrap();
    assert_eq!((reply.ok, reply.message.as_str()), (true, "pong"));
    let err = within(client.reconcile(&device, Duration::from_secs(5))).await.unwrap_err();
    assert!(matches!(err, FleetError::BadReply { .. }), "{err:?}");
    within(responder).await.unwrap();
}

fn with_digests(mut status: DeploymentStatus, desired: &str, observed: &str) -> DeploymentStatus {
    status.desired_digest = Some(desired.to_owned());
    status.observed_digest = Some(observed.to_owned());
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_generation_resolves_on_applied_fails_on_rejected_and_times_out() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    within(client.ensure_buckets()).await.unwrap();
    let device = dev("dev-1");
    let web = name("web");
    let d3 = "sha256:3333";

    // Applied, written while the wait runs (after an Applying report).
    let writer = {
        let client = client.clone();
        let device = device.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let applying = with_digests(deployment(3, 2, Phase::Applying), d3, "sha256:2222");
            report(&client, &status(&device, None, vec![("web", applying)])).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let applied = with_digests(deployment(3, 3, Phase::Applied), d3, d3);
            report(&client, &status(&device, None, vec![("web", applied)])).await;
        })
    };
    let applied = within(client.wait_for_generation(&device, &web, 3, Some(d3), WAIT)).await.unwrap();
    assert_eq!((applied.observed_generation, applied.phase), (3, Phase::Applied));
    within(writer).await.unwrap();

    // Already there: resolves from the first read (without a digest, on the generation alone).
    within(client.wait_for_generation(&device, &web, 3, Some(d3), WAIT)).await.unwrap();
    within(client.wait_for_generation(&device, &web, 3, None, WAIT)).await.unwrap();

    // Rejected: an error carrying the status.
    let mut rejected = deployment(4, 3, Phase::Rejected);
    rejected.error =
        Some(StatusError::new(harmony_score_wire::ErrorKind::UnknownScoreTags, "unknown score tags: x/v1"));
    report(&client, &status(&device, None, vec![("web", rejected)])).await;
    let err = within(client.wait_for_generation(&device, &web, 4, None, WAIT)).await.unwrap_err();
    let FleetError::DeploymentFailed { status: rejected, .. } = &err else { panic!("{err:?}") };
    assert_eq!(rejected.phase, Phase::Rejected);
    assert!(err.to_string().contains("unknown_score_tags"), "{err}");

    // Nothing conclusive: a timeout carrying the last status seen.
    let err = within(client.wait_for_generation(&device, &web, 5, None, Duration::from_millis(700)))
        .await
        .unwrap_err();
    let FleetError::Timeout { last, .. } = &err else { panic!("{err:?}") };
    assert_eq!(last.as_ref().map(|s| s.desired_generation), Some(4));

    // A device that applied the generation but reports no digest cannot
    // confirm the awaited document; the timeout says why.
    report(&client, &status(&device, None, vec![("web", deployment(5, 5, Phase::Applied))])).await;
    let err =
        within(client.wait_for_generation(&device, &web, 5, Some("sha256:5555"), Duration::from_millis(700)))
            .await
            .unwrap_err();
    assert!(matches!(err, FleetError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("no digest"), "{err}");

    // Prune: resolves once the deployment is reported pruned.
    let err = within(client.wait_for_prune(&device, &web, Duration::from_millis(500))).await.unwrap_err();
    assert!(matches!(err, FleetError::Timeout { .. }), "{err:?}");
    report(&client, &status(&device, None, vec![("web", deployment(5, 5, Phase::Pruned))])).await;
    within(client.wait_for_prune(&device, &web, WAIT)).await.unwrap();
}

// Regression: the wait reported success for `observed >= awaited`. After a
// purge the operator numbered from 1 again while the device still ran 3,
// and the wait said "applied" though the device ran the old content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_the_device_moved_past_ends_superseded_never_applied() {
    let server = NatsServer::start();
    let client = connect(&server).await;
    let device = dev("dev-1");
    let web = name("web");
    report(&client, &status(&device, Some(ALL_TAGS), vec![])).await;
    let deployed = within(client.deploy(DeployRequest::new(
        device.clone(),
        web.clone(),
        vec![file_score("/etc/web", "new")],
    )))
    .await
    .unwrap();
    assert_eq!(deployed.generation, 1);
    let wait =
        |generation| client.wait_for_generation(&device, &web, generation, Some(&deployed.digest), WAIT);

    // The device still runs generation 3 of older content.
    let old = with_digests(deployment(3, 3, Phase::Applied), "sha256:01d", "sha256:01d");
    report(&client, &status(&device, Some(ALL_TAGS), vec![("web", old)])).await;
    let err = within(wait(1)).await.unwrap_err();
    let FleetError::Superseded { awaited, current, .. } = &err else { panic!("{err:?}") };
    assert_eq!((*awaited, current.observed_generation), (1, 3));
    assert!(err.to_string().contains("superseded"), "{err}");
    assert_eq!(err.deployment_status().map(|s| s.desired_generation), Some(3));

    // The awaited generation, but another document under it.
    let other = with_digests(deployment(1, 1, Phase::Applied), "sha256:0th3r", "sha256:0th3r");
    report(&client, &status(&device, Some(ALL_TAGS), vec![("web", other)])).await;
    let err = within(wait(1)).await.unwrap_err();
    assert!(matches!(err, FleetError::Superseded { awaited: 1, .. }), "{err:?}");

    // A newer generation seen but not yet applied also ends the wait.
    let newer = with_digests(deployment(2, 1, Phase::Applying), "sha256:2", &deployed.digest);
    report(&client, &status(&device, Some(ALL_TAGS), vec![("web", newer)])).await;
    let err = within(wait(1)).await.unwrap_err();
    assert!(matches!(err, FleetError::Superseded { .. }), "{err:?}");

    // Exactly this document applied: success.
    let exact = with_digests(deployment(1, 1, Phase::Applied), &deployed.digest, &deployed.digest);
    report(&client, &status(&device, Some(ALL_TAGS), vec![("web", exact)])).await;
    let applied = within(wait(1)).await.unwrap();
    assert_eq!(applied.observed_digest.as_deref(), Some(deployed.digest.as_str()));
}
