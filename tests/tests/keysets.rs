//! Key rotation through root-signed key sets, end to end: the operator's CLI signs and publishes, a device under its generated least-privilege credentials follows the key set live and trusts what it delegates to.

use std::path::Path;

use harmony_e2e::{until_status, within, workspace_bin, AgentProcess, NatsServer};
use harmony_fleet::{DeployRequest, FleetClient, FleetError};
use harmony_score_wire::{
    parse_secret_key, DeploymentName, DeviceId, DeviceScore, DocumentSigner, ErrorKind, KeySet, Phase,
    TrustedKeys,
};

fn file(path: &str, content: &str) -> Vec<Box<dyn DeviceScore>> {
    vec![harmony_e2e::file_score(path, content)]
}

/// Runs `harmony-fleet` with `args`; returns its exit code and output.
async fn fleet(url: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = within(
        tokio::process::Command::new(workspace_bin("harmony-fleet"))
            .arg("--nats")
            .arg(url)
            .args(args)
            .output(),
    )
    .await
    .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

fn signer(dir: &Path) -> DocumentSigner {
    parse_secret_key(&std::fs::read_to_string(dir.join("harmony.key")).unwrap()).unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

// Issue 7 §3: rotation without touching devices, and the key sets a
// device must refuse (signed by a non-root key, expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_key_set_rotates_a_devices_keys_live_and_bad_key_sets_are_refused() {
    harmony_scores::ensure_linked();
    let (dev1, app) = (DeviceId::new("dev-1").unwrap(), DeploymentName::new("app").unwrap());
    let auth = harmony_fleet::nats_config::generate(std::slice::from_ref(&dev1)).unwrap();
    let nats = NatsServer::start_with_config(&auth.server_conf);
    let port = nats.url().rsplit(':').next().unwrap().to_owned();
    let server = format!("127.0.0.1:{port}");
    let operator_url = auth.operator.url(&server);
    let dir = tempfile::tempdir().unwrap();
    let (root_dir, old_dir, new_dir) =
        (dir.path().join("root-key"), dir.path().join("old"), dir.path().join("new"));
    for d in [&root_dir, &old_dir, &new_dir] {
        let (code, out) = fleet(&operator_url, &["keygen", "--out", path(d)]).await;
        assert_eq!(code, Some(0), "{out}");
    }
    let client = within(FleetClient::connect(std::slice::from_ref(&operator_url), None)).await.unwrap();
    client.ensure_buckets().await.unwrap();
    // Both operator keys number from each other's documents (a signing
    // client counts only values its trusted keys signed).
    let both = TrustedKeys::new(vec![signer(&old_dir).verifying_key(), signer(&new_dir).verifying_key()], 1);
    let old = client.clone().with_signer(signer(&old_dir)).with_trusted_keys(both.clone());
    let new = client.clone().with_signer(signer(&new_dir)).with_trusted_keys(both);
    let root_trust = TrustedKeys::new(vec![signer(&root_dir).verifying_key()], 1);
    let root_pub = root_dir.join("harmony.pub");

    std::fs::create_dir(dir.path().join("root")).unwrap();
    let root = dir.path().join("root");
    let agent = AgentProcess::start(
        &[
            "--device-id",
            "dev-1",
            "--nats",
            &auth.devices[0].1.url(&server),
            "--state-dir",
            path(&dir.path().join("state")),
            "--root",
            path(&root),
            "--trusted-key",
            path(&old_dir.join("harmony.pub")),
            "--root-key",
            path(&root_dir.join("harmony.pub")),
            "--heartbeat",
            "1",
            "--resync",
            "3600",
        ],
        &dir.path().join("agent.log"),
    );
    let g1 =
        old.deploy(DeployRequest::new(dev1.clone(), app.clone(), file("/etc/app", "v1")).force(true)).await;
    let g1 = g1.unwrap();
    let applied =
        old.wait_for_generation(&dev1, &app, g1.generation, Some(&g1.digest), harmony_e2e::WAIT).await;
    assert!(applied.is_ok(), "{applied:?}\n{}", agent.log_text());

    // The root delegates to the new key (the CLI signs offline, then publishes).
    let keyset_file = dir.path().join("keyset-1");
    let (code, out) = fleet(
        &operator_url,
        &[
            "keyset",
            "sign",
            "--root-key",
            path(&root_dir.join("harmony.key")),
            "--key",
            path(&new_dir.join("harmony.pub")),
            "--version",
            "1",
            "--out",
            path(&keyset_file),
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    let (code, out) =
        fleet(&operator_url, &["keyset", "publish", path(&keyset_file), "--root-pub", path(&root_pub)]).await;
    assert_eq!(code, Some(0), "{out}");
    until_status(&client, &dev1, "key set 1 in force", |s| s.keyset_version == Some(1)).await;
    // Publishing it again is refused by the operator's side: not newer.
    let (code, out) =
        fleet(&operator_url, &["keyset", "publish", path(&keyset_file), "--root-pub", path(&root_pub)]).await;
    assert_eq!(code, Some(2), "{out}");

    let g2 = new.deploy(DeployRequest::new(dev1.clone(), app.clone(), file("/etc/app", "v2"))).await.unwrap();
    new.wait_for_generation(&dev1, &app, g2.generation, Some(&g2.digest), harmony_e2e::WAIT).await.unwrap();
    assert_eq!(std::fs::read_to_string(root.join("etc/app")).unwrap(), "v2");

    // The old key is revoked by the rotation: its document is refused.
    let g3 = old.deploy(DeployRequest::new(dev1.clone(), app.clone(), file("/etc/app", "v3"))).await.unwrap();
    let refused =
        old.wait_for_generation(&dev1, &app, g3.generation, Some(&g3.digest), harmony_e2e::WAIT).await;
    match refused {
        Err(FleetError::DeploymentFailed { status, .. }) => {
            assert_eq!(status.phase, Phase::Rejected);
            assert_eq!(status.error.unwrap().kind, ErrorKind::BadSignature);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(std::fs::read_to_string(root.join("etc/app")).unwrap(), "v2");

    // A key set signed by an online key instead of the root: the
    // operator's side refuses to publish it; written past it (by anyone
    // able to write the bucket), the device refuses it.
    let by_online =
        KeySet::new(2, 0, u64::MAX / 2, 1, &[signer(&old_dir).verifying_key()]).sign(&[&signer(&new_dir)]);
    assert!(matches!(
        client.publish_keyset(&by_online, &root_trust).await,
        Err(FleetError::InvalidKeySet { .. })
    ));
    let kv = client.jetstream().get_key_value("harmony-desired-state").await.unwrap();
    kv.put("_keyset", by_online.clone().into()).await.unwrap();
    let s = until_status(&client, &dev1, "the key set signed by an online key refused", |s| {
        s.errors.iter().any(|e| e.kind == ErrorKind::BadSignature)
    })
    .await;
    assert_eq!(s.keyset_version, Some(1));

    // An expired key set, root-signed, written past the operator's check
    // (a replay of an old one): refused as expired.
    let root_key = signer(&root_dir);
    let expired = KeySet::new(3, 0, 1, 1, &[signer(&old_dir).verifying_key()]).sign(&[&root_key]);
    assert!(matches!(
        client.publish_keyset(&expired, &root_trust).await,
        Err(FleetError::InvalidKeySet { .. })
    ));
    kv.put("_keyset", expired.into()).await.unwrap();
    let s = until_status(&client, &dev1, "the expired key set refused", |s| {
        s.errors.iter().any(|e| e.kind == ErrorKind::KeysetExpired)
    })
    .await;
    assert_eq!(s.keyset_version, Some(1));
    // Still the new key's document, still running.
    assert_eq!(s.deployments[&app].observed_generation, g2.generation);

    // A device cannot write the key set itself.
    let device = harmony_fleet::async_nats::ConnectOptions::new()
        .custom_inbox_prefix("_INBOX_dev-1")
        .user_and_password("dev-1".into(), auth.devices[0].1.password.clone())
        .connect(format!("nats://{server}"))
        .await
        .unwrap();
    let js = harmony_fleet::async_nats::jetstream::ContextBuilder::new()
        .timeout(std::time::Duration::from_secs(1))
        .build(device);
    let forged =
        js.publish("$KV.harmony-desired-state._keyset", by_online.clone().into()).await.unwrap().await;
    assert!(forged.is_err(), "a device wrote the fleet's key set");
    let log = agent.log_text();
    assert!(!log.contains("Permissions Violation"), "the agent stepped outside its permissions:\n{log}");
}

// Security review: `keyset show` and `keyset publish` trusted whatever key
// set the bucket held. A bucket writer's key set, signed by a key of its
// own at version u64::MAX, was shown as the one in force and made every
// genuine root-signed one "not above" it. The operator's side now counts
// only key sets the root signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_set_the_root_did_not_sign_neither_shows_nor_blocks_publishing() {
    let server = NatsServer::start();
    let client = within(FleetClient::connect(&[server.url()], None)).await.unwrap();
    within(client.ensure_buckets()).await.unwrap();
    let kv = within(client.jetstream().get_key_value("harmony-desired-state")).await.unwrap();
    let (attacker, root, online) = (
        DocumentSigner::from_seed([66; 32]),
        DocumentSigner::from_seed([100; 32]),
        DocumentSigner::from_seed([1; 32]),
    );
    let root_trust = TrustedKeys::new(vec![root.verifying_key()], 1);
    let forged = KeySet::new(u64::MAX, 0, u64::MAX, 1, &[attacker.verifying_key()]).sign(&[&attacker]);
    within(kv.put("_keyset", forged.into())).await.unwrap();
    assert!(within(client.keyset(&root_trust)).await.unwrap().is_none(), "the forged key set is not shown");

    let dir = tempfile::tempdir().unwrap();
    let root_pub = dir.path().join("root.pub");
    std::fs::write(&root_pub, harmony_score_wire::to_hex32(&root.verifying_key().to_bytes())).unwrap();
    let (code, out) = fleet(&server.url(), &["keyset", "show", "--root-pub", path(&root_pub)]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("no key set signed by the root") && !out.contains("18446744073709551615"), "{out}");
    let (code, out) = fleet(&server.url(), &["keyset", "show"]).await;
    assert_eq!(code, Some(2), "the root public key is required: {out}");

    let in_a_day = harmony_score_wire::now_ms() / 1000 + 86_400;
    let genuine = KeySet::new(2, 0, in_a_day, 1, &[online.verifying_key()]).sign(&[&root]);
    assert_eq!(within(client.publish_keyset(&genuine, &root_trust)).await.unwrap(), 2);
    assert_eq!(within(client.keyset(&root_trust)).await.unwrap().map(|k| k.version), Some(2));
    let (code, out) = fleet(&server.url(), &["keyset", "show", "--root-pub", path(&root_pub)]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("version 2"), "{out}");
}
