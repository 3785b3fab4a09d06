//! The agent's runner over a real nats-server, with agents in this process: long Scores, floods of generations, duplicates, deletes while down.
//!
//! Agents here resync once an hour: everything converges through the
//! republished hints or not at all.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use harmony_e2e::sleep_score as sleep;
use harmony_e2e::{
    agent_config, deployment as name, file_score, until_status, within, Fleet, InProcessAgent,
};
use harmony_fleet::DeployRequest;
use harmony_score_wire::{DeviceId, ErrorKind, Phase};

// Issue 6 §1/§8: while one Score ran, newer generations, deletes, commands
// and SIGTERM all waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_score_delays_neither_another_deployment_nor_a_ping_nor_shutdown() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let agent = f.agent_in("dev-1", "dev-1");
    f.online(&device).await;
    f.deploy(&device, "slow", vec![sleep("slow", 120_000)]).await;
    let slow = name("slow");
    until_status(&f.client, &device, "slow applying", |s| {
        s.deployments.get(&slow).is_some_and(|d| d.current_score.as_deref() == Some("1/1 sleep [slow]"))
    })
    .await;

    let started = Instant::now();
    let g = f.deploy(&device, "fast", vec![file_score("/fast", "x")]).await;
    f.applied(&device, "fast", g).await;
    let reply = within(f.client.ping(&device, Duration::from_secs(5))).await.unwrap();
    assert!(reply.ok);
    let reply = within(f.client.reconcile(&device, Duration::from_secs(5))).await.unwrap();
    assert!(reply.ok && reply.message.contains("1 running"), "{reply:?}");
    assert!(started.elapsed() < Duration::from_secs(20));

    let stopping = Instant::now();
    agent.stop().await.unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(15), "shutdown took {:?}", stopping.elapsed());
    assert!(!f.root("dev-1", "/slept-slow").exists());
}

// Issue 6 §8: 1,000 generations written back to back to one deployment,
// with the resync effectively off: the final one is always applied, and no
// generation is ever reported applied that the device did not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_generations_back_to_back_end_with_the_last_applied() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let _agent = f.agent_in("dev-1", "dev-1");
    f.online(&device).await;
    let mut last = 0;
    for i in 1..=1000u32 {
        last = f.deploy(&device, "app", vec![file_score("/etc/app", &format!("{i}\n"))]).await;
    }
    assert_eq!(last, 1000);
    let status = f.applied(&device, "app", last).await;
    let app = &status.deployments[&name("app")];
    assert_eq!(app.observed_digest, app.desired_digest);
    assert_eq!(std::fs::read_to_string(f.root("dev-1", "/etc/app")).unwrap(), "1000\n");
}

// Issue 6 §6: two devices cloned from one image overwrote each other's
// status silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_with_one_device_id_are_reported_as_duplicate_device() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let first = f.agent_in("dev-1", "clone-a");
    let seen = f.online(&device).await;
    let second = f.agent_in("dev-1", "clone-b");
    until_status(&f.client, &device, "a second instance", |s| s.instance_id != seen.instance_id).await;
    // Each write now conflicts with the other's: both report it.
    f.deploy(&device, "app", vec![file_score("/a", "x")]).await;
    let status = until_status(&f.client, &device, "duplicate_device", |s| {
        s.errors.iter().any(|e| e.kind == ErrorKind::DuplicateDevice)
    })
    .await;
    let error = status.errors.iter().find(|e| e.kind == ErrorKind::DuplicateDevice).unwrap();
    assert!(error.message.contains("two devices share this device id"), "{}", error.message);
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}

// Issue 6 §8: a deployment deleted while the agent was down is pruned when
// it comes back, from its own persisted state (the index no longer lists it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_deleted_while_the_agent_was_down_is_pruned_at_start() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let agent = f.agent_in("dev-1", "dev-1");
    f.online(&device).await;
    let g = f.deploy(&device, "app", vec![file_score("/etc/app", "x")]).await;
    f.applied(&device, "app", g).await;
    agent.stop().await.unwrap();

    assert!(within(f.client.delete(&device, &name("app"))).await.unwrap());
    let _agent = f.agent_in("dev-1", "dev-1");
    let app = name("app");
    until_status(&f.client, &device, "app pruned", |s| {
        s.deployments.get(&app).is_some_and(|d| d.phase == Phase::Pruned)
    })
    .await;
    assert!(!f.root("dev-1", "/etc/app").exists());
}

// Issue 6 §6: two documents with a 600 kB invalid device id grew the status
// past the server's max payload, and the device stopped reporting for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_invalid_documents_do_not_stop_the_device_reporting() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let _agent = f.agent_in("dev-1", "dev-1");
    f.online(&device).await;
    let kv = within(f.client.jetstream().get_key_value("harmony-desired-state")).await.unwrap();
    for deployment in ["a", "b"] {
        let value = serde_json::json!({"device_id": format!("{}\u{1b}[2J", "X".repeat(600_000)),
            "deployment": deployment, "generation": 1, "scores": []});
        let mut bytes = Vec::new();
        ciborium::into_writer(&value, &mut bytes).unwrap();
        within(kv.put(format!("dev-1.{deployment}"), bytes.into())).await.unwrap();
    }
    let status = until_status(&f.client, &device, "both refused", |s| {
        ["a", "b"].iter().all(|n| s.deployments.get(&name(n)).is_some_and(|d| d.phase == Phase::Rejected))
    })
    .await;
    assert_eq!(status.deployments[&name("a")].error.as_ref().unwrap().kind, ErrorKind::InvalidDeviceId);
    // Still reporting: a later deployment lands and is reported.
    let g = f.deploy(&device, "ok", vec![file_score("/ok", "x")]).await;
    let status = f.applied(&device, "ok", g).await;
    assert!(harmony_score_wire::to_cbor(&status).len() < 64 * 1024);
    assert!(status
        .deployments
        .values()
        .all(|d| d.error.as_ref().is_none_or(|e| !e.message.contains('\u{1b}'))));
}

// Issue 6 §8: the resync timer alone repairs drift (the one test where the
// timer is what is tested, so it runs with a short resync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resync_timer_alone_repairs_drift() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let mut config = agent_config("dev-1", &f.nats.url(), &f.dir.path().join("dev-1"), 3600);
    config.resync = Duration::from_secs(1);
    let _agent = InProcessAgent::start(config);
    f.online(&device).await;
    let g = f.deploy(&device, "app", vec![file_score("/etc/app", "desired")]).await;
    f.applied(&device, "app", g).await;
    std::fs::write(f.root("dev-1", "/etc/app"), "drifted").unwrap();
    within(async {
        while std::fs::read_to_string(f.root("dev-1", "/etc/app")).unwrap_or_default() != "desired" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

// Issue 6 §9, the lost-update stall, made deterministic: a hint that reaches
// the device before its value is readable (as a `$KV.…` publish could, or a
// read served by a replica that is behind). The first edition read the old
// value, took it for news already passed on, dropped the hint, and caught
// up only at the next resync (an hour here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hint_that_arrives_before_its_value_is_readable_is_not_dropped() {
    use futures_util::StreamExt;
    use harmony_fleet::async_nats::{header, HeaderMap};
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let _agent = f.agent_in("dev-1", "dev-1");
    f.online(&device).await;
    let g1 = f.deploy(&device, "app", vec![file_score("/etc/app", "one")]).await;
    f.applied(&device, "app", g1).await;

    // From here on the only hint the device gets is the one this test sends.
    let js = f.client.jetstream();
    let mut stream = within(js.get_stream("KV_harmony-desired-state")).await.unwrap();
    let mut config = within(stream.info()).await.unwrap().config.clone();
    config.republish = None;
    within(js.update_stream(config)).await.unwrap();
    let next = within(stream.info()).await.unwrap().state.last_sequence + 1;

    // The hint announces the next write before it happens; the test waits
    // until the device has read the key (its direct get is seen), so the
    // read returns the old value.
    let mut reads = within(
        f.client
            .nats()
            .subscribe("$JS.API.DIRECT.GET.KV_harmony-desired-state.$KV.harmony-desired-state.dev-1.app"),
    )
    .await
    .unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(header::NATS_SEQUENCE, next.to_string().as_str());
    // What the republish's headers-only copy carries (the agent ignores
    // anything else on a hint subject).
    headers.insert("Nats-Subject", "$KV.harmony-desired-state.dev-1.app");
    headers.insert("Nats-Msg-Size", "0");
    within(f.client.nats().publish_with_headers("harmony.hint.dev-1.app", headers, Default::default()))
        .await
        .unwrap();
    within(reads.next()).await.expect("the device read the key on the hint");

    let g2 = f.deploy(&device, "app", vec![file_score("/etc/app", "two")]).await;
    f.applied(&device, "app", g2).await;
    assert_eq!(std::fs::read_to_string(f.root("dev-1", "/etc/app")).unwrap(), "two");
}

// ---------------------------------------------------------------------------
// Attacks on the second edition (branch `attack`).
// ---------------------------------------------------------------------------

// Attack: the operator deletes a device's status key (a reset, a cleanup;
// `device_status` documents that a status may be deleted). The agent's next
// compare-and-set conflicts with the delete marker, reads it, cannot decode
// its empty payload as a status, and took it for another agent instance:
// `duplicate_device` for ten minutes, on a device that has no twin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_deleting_the_status_key_is_not_a_duplicate_device() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let _agent = f.agent_in("dev-1", "dev-1");
    let seen = f.online(&device).await;
    let kv = within(f.client.jetstream().get_key_value("harmony-agent-status")).await.unwrap();
    within(kv.delete("dev-1")).await.unwrap();
    let g = f.deploy(&device, "app", vec![file_score("/a", "x")]).await;
    let status = f.applied(&device, "app", g).await;
    assert_eq!(status.instance_id, seen.instance_id);
    assert!(status.errors.is_empty(), "{:?}", status.errors);
}

// Attack: a flood of hints naming keys that do not exist (any principal that
// may publish on `harmony.hint.<id>.>`, or a tool probing names). Each name
// joined the follower's set of known deployments for good, and every resync
// (and reconnect) read every one of them again, one direct get after the
// other, on the loop that also reads hints and commands: memory and work
// grew without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_for_keys_that_do_not_exist_are_not_read_again_at_every_resync() {
    use futures_util::StreamExt;
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let mut config = agent_config("dev-1", &f.nats.url(), &f.dir.path().join("dev-1"), 3600);
    config.resync = Duration::from_secs(1);
    let _agent = InProcessAgent::start(config);
    f.online(&device).await;
    let mut reads =
        within(f.client.nats().subscribe("$JS.API.DIRECT.GET.KV_harmony-desired-state.>")).await.unwrap();
    const GHOSTS: usize = 2000;
    for i in 0..GHOSTS {
        // As the republish's headers-only copy would carry them.
        let mut headers = harmony_fleet::async_nats::HeaderMap::new();
        headers.insert("Nats-Subject", format!("$KV.harmony-desired-state.dev-1.ghost-{i}").as_str());
        headers.insert("Nats-Sequence", "0");
        headers.insert("Nats-Msg-Size", "0");
        within(f.client.nats().publish_with_headers(
            format!("harmony.hint.dev-1.ghost-{i}"),
            headers,
            Default::default(),
        ))
        .await
        .unwrap();
    }
    within(f.client.nats().flush()).await.unwrap();
    // Every hint is read once.
    let mut seen = 0;
    while seen < GHOSTS {
        within(reads.next()).await.unwrap();
        seen += 1;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Then, over three resyncs, only the index (and real keys) are read.
    let window = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut later = 0;
    while let Ok(Some(_)) = tokio::time::timeout_at(window, reads.next()).await {
        later += 1;
    }
    assert!(later < 100, "{later} direct gets in 3 s after {GHOSTS} hints for keys that do not exist");
}

// Review finding: a bucket that lost its messages (recreated after a server
// lost its store) made every key read as "not found", and every device
// pruned every deployment. Deletes and purges leave a marker; a key with no
// message at all is no instruction to undo anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_no_message_at_all_prunes_nothing() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let _agent = f.agent_in("dev-1", "dev-1");
    f.online(&device).await;
    let g = f.deploy(&device, "app", vec![file_score("/etc/app", "kept")]).await;
    f.applied(&device, "app", g).await;

    // Every message of the key goes, markers included (a stream purge by
    // subject, as a lost store would), and the device hears of the key.
    let mut stream = within(f.client.jetstream().get_stream("KV_harmony-desired-state")).await.unwrap();
    within(stream.purge().filter("$KV.harmony-desired-state.dev-1.app").into_future()).await.unwrap();
    let _ = within(stream.info()).await.unwrap();
    let mut headers = harmony_fleet::async_nats::HeaderMap::new();
    headers.insert("Nats-Subject", "$KV.harmony-desired-state.dev-1.app");
    headers.insert("Nats-Sequence", "1");
    headers.insert("Nats-Msg-Size", "0");
    within(f.client.nats().publish_with_headers("harmony.hint.dev-1.app", headers, Default::default()))
        .await
        .unwrap();
    let g = f.deploy(&device, "marker", vec![file_score("/marker", "x")]).await;
    let status = f.applied(&device, "marker", g).await;
    assert_eq!(status.deployments[&name("app")].phase, Phase::Applied);
    assert_eq!(std::fs::read_to_string(f.root("dev-1", "/etc/app")).unwrap(), "kept");
}

// Issue 7 §3: signed documents. The device trusts one key: documents signed
// by it apply; an unsigned one, one signed by another key, a tampered one,
// one for another device and an expired one are each refused with their own
// typed reason, while the last good generation keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_documents_signed_by_a_trusted_key_run() {
    use harmony_score_wire::{encode, open_signed, to_cbor, DesiredState, DocumentSigner, TrustedKeys};
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let trusted = DocumentSigner::from_seed([1; 32]);
    let mut config = agent_config("dev-1", &f.nats.url(), &f.dir.path().join("dev-1"), 3600);
    config.trust = TrustedKeys::new(vec![trusted.verifying_key()], 1);
    config.allow_unsigned = false;
    let _agent = InProcessAgent::start(config);
    f.online(&device).await;
    let signed = f.client.clone().with_signer(DocumentSigner::from_seed([1; 32]));
    let g1 = within(signed.deploy(
        DeployRequest::new(device.clone(), name("app"), vec![file_score("/etc/app", "signed")]).force(true),
    ))
    .await
    .unwrap();
    f.applied(&device, "app", g1.generation).await;

    let kv = within(f.client.jetstream().get_key_value("harmony-desired-state")).await.unwrap();
    let doc = |generation: u64, device_id: &str, expires_at: Option<u64>| {
        let mut doc = DesiredState::new(
            DeviceId::new(device_id).unwrap(),
            name("app"),
            generation,
            vec![file_score("/etc/app", "evil")],
        );
        doc.expires_at = expires_at;
        encode(&doc).unwrap()
    };
    let tampered = {
        let mut envelope = open_signed(&trusted.sign(doc(11, "dev-1", None))).unwrap();
        let last = envelope.payload.len() - 2;
        envelope.payload[last] ^= 0x01;
        to_cbor(&envelope)
    };
    let cases: Vec<(u64, Vec<u8>, ErrorKind)> = vec![
        (10, doc(10, "dev-1", None), ErrorKind::Unsigned),
        (11, DocumentSigner::from_seed([2; 32]).sign(doc(11, "dev-1", None)), ErrorKind::BadSignature),
        (12, tampered, ErrorKind::BadSignature),
        (13, trusted.sign(doc(13, "dev-2", None)), ErrorKind::WrongDevice),
        (14, trusted.sign(doc(14, "dev-1", Some(1))), ErrorKind::Expired),
    ];
    for (generation, bytes, kind) in cases {
        within(kv.put("dev-1.app", bytes.into())).await.unwrap();
        let app = name("app");
        let status = until_status(&f.client, &device, &format!("{kind:?}"), |s| {
            s.deployments.get(&app).and_then(|d| d.error.as_ref()).is_some_and(|e| e.kind == kind)
        })
        .await;
        let app = &status.deployments[&name("app")];
        assert_eq!(
            (app.phase, app.observed_generation),
            (Phase::Rejected, g1.generation),
            "{kind:?} at {generation}"
        );
        assert_eq!(std::fs::read_to_string(f.root("dev-1", "/etc/app")).unwrap(), "signed");
    }
    // A newer signed generation still applies.
    let g2 = within(
        signed.deploy(
            DeployRequest::new(device.clone(), name("app"), vec![file_score("/etc/app", "signed again")])
                .force(true),
        ),
    )
    .await
    .unwrap();
    f.applied(&device, "app", g2.generation).await;
    assert_eq!(std::fs::read_to_string(f.root("dev-1", "/etc/app")).unwrap(), "signed again");

    // A bare delete (by anyone who can write the bucket) prunes nothing here.
    within(f.client.delete(&device, &name("app"))).await.unwrap();
    let app = name("app");
    let status = until_status(&f.client, &device, "the unsigned delete refused", |s| {
        s.deployments
            .get(&app)
            .and_then(|d| d.error.as_ref())
            .is_some_and(|e| e.kind == ErrorKind::UnsignedDelete)
    })
    .await;
    assert_eq!(status.deployments[&app].observed_generation, g2.generation);
    assert_eq!(std::fs::read_to_string(f.root("dev-1", "/etc/app")).unwrap(), "signed again");
    // The signing operator's delete is a signed retirement: it prunes, also
    // when the key holds only the bare delete marker (review finding: it
    // returned "not deployed" and wrote nothing).
    assert!(within(signed.delete(&device, &app)).await.unwrap());
    within(signed.wait_for_prune(&device, &app, harmony_e2e::WAIT)).await.unwrap();
    assert!(!f.root("dev-1", "/etc/app").exists());
}

// Security review: a writer of the bucket without the signing key wrote an
// unsigned document at generation u64::MAX - 1; the signing operator numbered
// its next document from it, signed u64::MAX, and the device accepted it,
// freezing the deployment for good (`GenerationExhausted`). A signing client
// numbers only from values a trusted key signed: it signs the next small
// generation, the device applies it, and the signed retirement still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_operator_numbers_past_an_unsigned_huge_generation_from_signed_values_only() {
    use harmony_score_wire::{encode, DesiredState, DocumentSigner, TrustedKeys};
    let f = Fleet::new().await;
    let (device, web) = (DeviceId::new("dev-1").unwrap(), name("web"));
    let key = DocumentSigner::from_seed([7; 32]);
    let mut config = agent_config("dev-1", &f.nats.url(), &f.dir.path().join("dev-1"), 3600);
    config.trust = TrustedKeys::new(vec![key.verifying_key()], 1);
    config.allow_unsigned = false;
    let agent = InProcessAgent::start(config);
    f.online(&device).await;
    let operator = f.client.clone().with_signer(DocumentSigner::from_seed([7; 32]));
    let deploy = |content: &'static str| {
        operator.deploy(
            DeployRequest::new(device.clone(), web.clone(), vec![file_score("/srv/web", content)])
                .force(true),
        )
    };
    let g1 = within(deploy("v1")).await.unwrap();
    f.applied(&device, "web", g1.generation).await;

    // The bucket writer's unsigned document, refused by the device.
    let kv = within(f.client.jetstream().get_key_value("harmony-desired-state")).await.unwrap();
    let forged = DesiredState::new(device.clone(), web.clone(), u64::MAX - 1, Vec::new());
    within(kv.put("dev-1.web", encode(&forged).unwrap().into())).await.unwrap();
    until_status(&f.client, &device, "the unsigned value refused", |s| {
        s.deployments.get(&web).is_some_and(|x| x.phase == Phase::Rejected)
    })
    .await;

    let g2 = within(deploy("v2")).await.unwrap();
    assert_eq!(g2.generation, g1.generation + 1, "numbered from the signed values only");
    f.applied(&device, "web", g2.generation).await;
    assert_eq!(std::fs::read_to_string(f.root("dev-1", "/srv/web")).unwrap(), "v2");
    // Not frozen: the signed retirement goes through and prunes.
    assert!(within(operator.delete(&device, &web)).await.unwrap());
    within(operator.wait_for_prune(&device, &web, harmony_e2e::WAIT)).await.unwrap();
    assert!(!f.root("dev-1", "/srv/web").exists());
    let _ = agent.stop().await;
}

// Security review: the same through the device's index (`<id>._index`),
// which is not signed. A signing client ignores an index generation above
// every verified one (with a warning): it signs generation 1 and the device
// applies it. A second operator key sharing the fleet
// (`with_trusted_keys`) continues the first one's numbering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_operator_ignores_a_forged_index_generation_above_every_signed_value() {
    use harmony_score_wire::names::index_key;
    use harmony_score_wire::{to_cbor, DeploymentIndex, DocumentSigner, TrustedKeys};
    let f = Fleet::new().await;
    let (device, web) = (DeviceId::new("dev-1").unwrap(), name("web"));
    let (first, second) = (DocumentSigner::from_seed([7; 32]), DocumentSigner::from_seed([8; 32]));
    let mut config = agent_config("dev-1", &f.nats.url(), &f.dir.path().join("dev-1"), 3600);
    config.trust = TrustedKeys::new(vec![first.verifying_key(), second.verifying_key()], 1);
    config.allow_unsigned = false;
    let agent = InProcessAgent::start(config);
    f.online(&device).await;

    let kv = within(f.client.jetstream().get_key_value("harmony-desired-state")).await.unwrap();
    let mut index = DeploymentIndex::default();
    index.deleted.insert(web.clone(), u64::MAX - 1);
    within(kv.put(index_key(&device), to_cbor(&index).into())).await.unwrap();
    let operator = f.client.clone().with_signer(DocumentSigner::from_seed([7; 32]));
    let g1 = within(operator.deploy(
        DeployRequest::new(device.clone(), web.clone(), vec![file_score("/srv/web", "v1")]).force(true),
    ))
    .await
    .unwrap();
    assert_eq!(g1.generation, 1, "the forged index does not number signed documents");
    f.applied(&device, "web", 1).await;
    assert_eq!(within(f.client.deployment_index(&device)).await.unwrap().last_generation(&web), 1);

    // The same forgery in the live entry, now that the key holds generation 1.
    let mut index = DeploymentIndex::default();
    index.deployments.insert(web.clone(), u64::MAX - 1);
    within(kv.put(index_key(&device), to_cbor(&index).into())).await.unwrap();
    let other = f
        .client
        .clone()
        .with_signer(DocumentSigner::from_seed([8; 32]))
        .with_trusted_keys(TrustedKeys::new(vec![first.verifying_key()], 1));
    let g2 = within(other.deploy(
        DeployRequest::new(device.clone(), web.clone(), vec![file_score("/srv/web", "v2")]).force(true),
    ))
    .await
    .unwrap();
    assert_eq!(g2.generation, 2, "continues the trusted key's numbering, not the forged index's");
    f.applied(&device, "web", 2).await;
    assert_eq!(std::fs::read_to_string(f.root("dev-1", "/srv/web")).unwrap(), "v2");
    let _ = agent.stop().await;
}

// Review finding: a delete whose marker was cleaned up while the device was
// away (purge-deletes, compaction) was never seen. The index's tombstone
// says it was deleted: that is a delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_whose_marker_is_gone_is_seen_through_the_index_tombstone() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let agent = f.agent_in("dev-1", "dev-1");
    f.online(&device).await;
    let g = f.deploy(&device, "app", vec![file_score("/etc/app", "x")]).await;
    f.applied(&device, "app", g).await;
    agent.stop().await.unwrap();

    assert!(within(f.client.delete(&device, &name("app"))).await.unwrap());
    let mut stream = within(f.client.jetstream().get_stream("KV_harmony-desired-state")).await.unwrap();
    within(stream.purge().filter("$KV.harmony-desired-state.dev-1.app").into_future()).await.unwrap();
    let _ = within(stream.info()).await.unwrap();
    let _agent = f.agent_in("dev-1", "dev-1");
    let app = name("app");
    until_status(&f.client, &device, "app pruned", |s| {
        s.deployments.get(&app).is_some_and(|d| d.phase == Phase::Pruned)
    })
    .await;
    assert!(!f.root("dev-1", "/etc/app").exists());
}
