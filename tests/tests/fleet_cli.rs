//! The `harmony-fleet` binary against a real nats-server: refusals, exit codes, status output.

use std::path::Path;

use harmony_e2e::{report_status, reported_status, within, workspace_bin, NatsServer};
use harmony_fleet::FleetClient;
use harmony_score_wire::names::DESIRED_STATE_BUCKET;
use harmony_score_wire::{DeploymentName, DeploymentStatus, DeviceId, Phase};

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn fleet(server: &NatsServer, args: &[&str]) -> Run {
    let out = within(
        tokio::process::Command::new(workspace_bin("harmony-fleet"))
            .arg("--nats")
            .arg(server.url())
            .args(args)
            .output(),
    )
    .await
    .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write_doc(dir: &Path) -> String {
    let path = dir.join("web.json");
    std::fs::write(
        &path,
        r#"{"device_id":"dev-1","deployment":"web","generation":1,
            "scores":[{"type":"harmony.file/v1","path":"/etc/web","content":"hi\n"}]}"#,
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

/// A document whose one Score a device would reject as invalid.
fn write_invalid_doc(dir: &Path, file_name: &str, score: &str) -> String {
    let path = dir.join(file_name);
    let doc = format!(r#"{{"device_id":"dev-1","deployment":"web","generation":1,"scores":[{score}]}}"#);
    std::fs::write(&path, doc).unwrap();
    path.to_str().unwrap().to_owned()
}

/// dev-1 reports that it decodes directories only.
async fn report_directories_only(client: &FleetClient) {
    let mut status = reported_status(
        &DeviceId::new("dev-1").unwrap(),
        Some(&["harmony.directory/v1"]),
        Default::default(),
    );
    if let Some(info) = status.info.as_mut() {
        info.hostname = "edge-1".into();
    }
    report_status(client, &status).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_refuses_unsupported_tags_with_exit_2_and_writes_nothing_unless_forced() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let doc = write_doc(dir.path());
    let client = within(FleetClient::connect(&[server.url()], None)).await.unwrap();
    report_directories_only(&client).await;
    let device = DeviceId::new("dev-1").unwrap();
    let web = DeploymentName::new("web").unwrap();

    let run = fleet(&server, &["deploy", &doc]).await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("harmony.file/v1") && run.stderr.contains("--force"), "{}", run.stderr);
    assert!(within(client.desired_state(&device, &web)).await.unwrap().is_none());
    assert!(within(client.deployment_index(&device)).await.unwrap().deployments.is_empty());

    // The same refusal on the --wait path, before anything runs.
    let run = fleet(&server, &["deploy", &doc, "--wait", "--timeout", "1"]).await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(within(client.desired_state(&device, &web)).await.unwrap().is_none());

    let run = fleet(&server, &["deploy", "--device", "dev-1", "--deployment", "web", &doc, "--force"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout.trim(), "dev-1/web: generation 1 written");
    assert_eq!(within(client.deployment_index(&device)).await.unwrap().deployments[&web], 1);

    // Waiting with no agent to apply it: exit 1, the outcome printed.
    let run = fleet(&server, &["deploy", &doc, "--force", "--wait", "--timeout", "1"]).await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.starts_with("FAILURE"), "{}", run.stdout);
    assert!(run.stdout.contains("timed out"), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_status_devices_and_ping_print_what_the_fleet_holds() {
    let server = NatsServer::start();
    // Listing rollouts is a read: before `init` it finds none and creates
    // no bucket (`init` below still creates the rollouts bucket).
    let run = fleet(&server, &["rollouts"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout.lines().count(), 1, "the header alone: {}", run.stdout);
    let run = fleet(&server, &["init"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "harmony-desired-state: created\nharmony-agent-status: created\nharmony-artifacts: created\nharmony-rollouts: created\n"
    );
    let run = fleet(&server, &["init"]).await;
    assert_eq!(
        run.stdout,
        "harmony-desired-state: exists\nharmony-agent-status: exists\nharmony-artifacts: exists\nharmony-rollouts: exists\n"
    );

    let client = within(FleetClient::connect(&[server.url()], None)).await.unwrap();
    report_directories_only(&client).await;
    let run = fleet(&server, &["status", "--json"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json[0]["device_id"], "dev-1");

    let run = fleet(&server, &["status"]).await;
    let row = run.stdout.lines().nth(1).unwrap_or_default().to_owned();
    assert!(row.starts_with("dev-1") && row.contains(" 0s"), "{}", run.stdout);

    let run = fleet(&server, &["devices"]).await;
    assert!(run.stdout.lines().nth(1).is_some_and(|l| l.contains("edge-1")), "{}", run.stdout);

    let run = fleet(&server, &["ping", "dev-9", "--timeout", "2"]).await;
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("device offline"), "{}", run.stderr);
}

// Regression: a document with an invalid Score reached NATS, and every
// device rejected it; encode and deploy now refuse it with exit 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encode_and_deploy_refuse_an_invalid_score_with_exit_2_and_write_nothing() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let client = within(FleetClient::connect(&[server.url()], None)).await.unwrap();
    // dev-1 decodes files: only the Score's fields are wrong.
    report_status(
        &client,
        &reported_status(&DeviceId::new("dev-1").unwrap(), Some(&["harmony.file/v1"]), Default::default()),
    )
    .await;
    let cases = [
        (
            write_invalid_doc(dir.path(), "relative.json", r#"{"type":"harmony.file/v1","path":"relative"}"#),
            "field path",
        ),
        (
            // 6637 = 0o14755: not a permission mode.
            write_invalid_doc(
                dir.path(),
                "bad-mode.json",
                r#"{"type":"harmony.file/v1","path":"/usr/bin/x","mode":6637}"#,
            ),
            "field mode",
        ),
    ];
    // A setuid mode (2541 = 0o4755) is not the operator's to refuse: each
    // device's policy decides (issue 7 §5).
    let setuid = write_invalid_doc(
        dir.path(),
        "setuid.json",
        r#"{"type":"harmony.file/v1","path":"/usr/bin/x","mode":2541}"#,
    );
    let cbor = dir.path().join("setuid.cbor");
    let run = fleet(&server, &["encode", &setuid, "-o", cbor.to_str().unwrap()]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    for (doc, field) in &cases {
        let cbor = dir.path().join("out.cbor");
        let run = fleet(&server, &["encode", doc, "-o", cbor.to_str().unwrap()]).await;
        assert_eq!(run.code, Some(2), "{}", run.stderr);
        for part in ["invalid_score", "score #0", "harmony.file/v1", field] {
            assert!(run.stderr.contains(part), "{part:?} missing: {}", run.stderr);
        }
        assert!(!cbor.exists(), "nothing encoded");

        for extra in [&[][..], &["--force"][..], &["--wait", "--timeout", "1"][..]] {
            let run = fleet(&server, &[&["deploy", doc.as_str()][..], extra].concat()).await;
            assert_eq!(run.code, Some(2), "{extra:?}: {}", run.stderr);
            assert!(run.stderr.contains("score #0") && run.stderr.contains(field), "{}", run.stderr);
        }
    }
    // Nothing reached the bucket: neither the key nor the index.
    let kv = within(client.jetstream().get_key_value(DESIRED_STATE_BUCKET)).await.unwrap();
    assert!(within(kv.entry("dev-1.web")).await.unwrap().is_none());
    assert!(within(kv.entry("dev-1._index")).await.unwrap().is_none());
}

// Regression: `deploy --wait` reported success when the device held a
// newer generation (after a purge the operator numbered from 1 again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_wait_fails_with_exit_1_when_the_device_runs_a_newer_generation() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let doc = write_doc(dir.path());
    let client = within(FleetClient::connect(&[server.url()], None)).await.unwrap();
    let ahead = DeploymentStatus {
        desired_generation: 3,
        observed_generation: 3,
        phase: Phase::Applied,
        desired_digest: Some("sha256:01d".into()),
        observed_digest: Some("sha256:01d".into()),
        ..Default::default()
    };
    let status = reported_status(
        &DeviceId::new("dev-1").unwrap(),
        Some(&["harmony.file/v1"]),
        [(DeploymentName::new("web").unwrap(), ahead)].into(),
    );
    report_status(&client, &status).await;

    let run = fleet(&server, &["deploy", &doc, "--wait", "--timeout", "20"]).await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.starts_with("FAILURE"), "{}", run.stdout);
    assert!(
        run.stdout.contains("generation 1 written, not applied") && run.stdout.contains("superseded"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("timed out"), "ends at once, not at the timeout: {}", run.stdout);
}

// `deploy --if-generation N`: written only over generation N (0: none);
// otherwise exit 3, a message naming what the key holds, nothing written.
// With --wait, the conditioned write is awaited like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_if_generation_exits_3_and_writes_nothing_when_the_key_moved() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let doc = write_doc(dir.path());
    let client = within(FleetClient::connect(&[server.url()], None)).await.unwrap();
    let (device, web) = (DeviceId::new("dev-1").unwrap(), DeploymentName::new("web").unwrap());
    let generation = |client: FleetClient| {
        let (device, web) = (device.clone(), web.clone());
        async move { client.desired_state(&device, &web).await.unwrap().map(|d| d.generation) }
    };
    let run = fleet(&server, &["deploy", &doc, "--force", "--if-generation", "0"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let run = fleet(&server, &["deploy", &doc, "--force", "--if-generation", "0"]).await;
    assert_eq!(run.code, Some(3), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("holds generation 1, not 0; nothing written"), "{}", run.stderr);
    assert_eq!(generation(client.clone()).await, Some(1));
    let run = fleet(&server, &["deploy", &doc, "--force", "--if-generation", "1"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(generation(client.clone()).await, Some(2));
    // With --wait: the write is awaited (the test reports for the device).
    // (An identical document would not be written again.)
    let changed = dir.path().join("web2.json");
    std::fs::write(&changed, std::fs::read_to_string(&doc).unwrap().replace("hi\\n", "bye\\n")).unwrap();
    let doc = changed.to_str().unwrap().to_owned();
    let reporter = client.clone();
    let report = tokio::spawn(async move {
        let kv = reporter.jetstream().get_key_value(DESIRED_STATE_BUCKET).await.unwrap();
        loop {
            if let Some(bytes) = kv.get("dev-1.web").await.unwrap() {
                let generation = harmony_score_wire::payload_of(&bytes)
                    .ok()
                    .and_then(|p| harmony_score_wire::decode(&p, &Default::default()).ok())
                    .map_or(0, |d| d.generation);
                if generation == 3 {
                    let digest = harmony_score_wire::document_digest(&bytes);
                    let applied = DeploymentStatus {
                        desired_generation: 3,
                        observed_generation: 3,
                        phase: Phase::Applied,
                        desired_digest: Some(digest.clone()),
                        observed_digest: Some(digest),
                        ..Default::default()
                    };
                    let id = DeviceId::new("dev-1").unwrap();
                    let web = DeploymentName::new("web").unwrap();
                    report_status(
                        &reporter,
                        &reported_status(&id, Some(&["harmony.file/v1"]), [(web, applied)].into()),
                    )
                    .await;
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    let run =
        fleet(&server, &["deploy", &doc, "--force", "--if-generation", "2", "--wait", "--timeout", "20"])
            .await;
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("dev-1/web: generation 3 applied"), "{}", run.stdout);
    within(report).await.unwrap();
    let run = fleet(&server, &["deploy", &doc, "--force", "--if-generation", "2", "--wait"]).await;
    assert_eq!(run.code, Some(3), "{}\n{}", run.stdout, run.stderr);
}

// Issue 7 §3: `keygen` writes a key pair (the secret 0600, never
// overwritten); `encode --sign-key` and `deploy` with `HARMONY_SIGN_KEY`
// write envelopes that verify against the public key, and nothing else does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygen_then_signed_encode_and_deploy_verify_against_the_public_key() {
    use std::os::unix::fs::PermissionsExt;
    harmony_scores::ensure_linked();
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let run = fleet(&server, &["keygen", "--out", keys.to_str().unwrap()]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.starts_with("ed25519:"), "{}", run.stdout);
    let mode = std::fs::metadata(keys.join("harmony.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let again = fleet(&server, &["keygen", "--out", keys.to_str().unwrap()]).await;
    assert_ne!(again.code, Some(0), "an existing key is never overwritten");
    let public =
        harmony_score_wire::parse_public_key(&std::fs::read_to_string(keys.join("harmony.pub")).unwrap())
            .unwrap();
    let trust = harmony_score_wire::TrustedKeys::new(vec![public], 1);

    let doc = write_doc(dir.path());
    let out = dir.path().join("web.cbor");
    let key = keys.join("harmony.key");
    let run =
        fleet(&server, &["--sign-key", key.to_str().unwrap(), "encode", &doc, "-o", out.to_str().unwrap()])
            .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let payload = trust.verify(&std::fs::read(&out).unwrap()).expect("the encoded file verifies");
    assert_eq!(harmony_score_wire::decode(&payload, &Default::default()).unwrap().deployment.as_str(), "web");

    let run = within(
        tokio::process::Command::new(workspace_bin("harmony-fleet"))
            .args(["--nats", &server.url(), "deploy", &doc, "--force"])
            .env("HARMONY_SIGN_KEY", &key)
            .output(),
    )
    .await
    .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let client = within(FleetClient::connect(&[server.url()], None)).await.unwrap();
    let kv = within(client.jetstream().get_key_value(DESIRED_STATE_BUCKET)).await.unwrap();
    let stored = within(kv.get("dev-1.web")).await.unwrap().unwrap();
    assert!(trust.verify(&stored).is_ok(), "the deployed value is signed by the key");
    let other = harmony_score_wire::TrustedKeys::new(
        vec![harmony_score_wire::DocumentSigner::from_seed([9; 32]).verifying_key()],
        1,
    );
    assert!(other.verify(&stored).is_err());
}
