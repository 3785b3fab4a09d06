//! The reconciler on a real temp root and state directory: acceptance rules, prune, crash safety.

use std::path::Path;
use std::time::Duration;

use harmony_agent::daemon::device_info;
use harmony_agent::reconcile::{DocumentFormat, Reconciler};
use harmony_agent::store::Store;
use harmony_score_wire::{decode_json, encode, DecodeLimits, DeploymentName, DeviceId, Phase};
use harmony_topology::{InterpretStatus, Inventory, LocalDeviceTopology, Maestro};
use serde_json::{json, Value};

struct Device {
    dir: tempfile::TempDir,
}

impl Device {
    fn new() -> Self {
        harmony_scores::ensure_linked();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        Self { dir }
    }

    fn root(&self, path: &str) -> std::path::PathBuf {
        self.dir.path().join("root").join(path.trim_start_matches('/'))
    }

    fn state(&self) -> &Path {
        self.dir.path()
    }

    async fn reconciler(&self) -> Reconciler {
        let config = harmony_agent::config::ConfigLayer {
            device_id: Some("dev-1".into()),
            state_dir: Some(self.state().join("state")),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let maestro =
            Maestro::initialize(Inventory::empty(), LocalDeviceTopology::new(self.dir.path().join("root")))
                .await
                .unwrap();
        let store = Store::open(&self.state().join("state")).unwrap();
        let mut reconciler = Reconciler::new(
            DeviceId::new("dev-1").unwrap(),
            maestro,
            store,
            device_info(&config),
            Duration::from_secs(30),
        );
        reconciler.boot().await;
        reconciler
    }
}

fn name(text: &str) -> DeploymentName {
    DeploymentName::new(text).unwrap()
}

fn doc(deployment: &str, generation: u64, scores: Value) -> Vec<u8> {
    let value =
        json!({"device_id": "dev-1", "deployment": deployment, "generation": generation, "scores": scores});
    encode(&decode_json(value.to_string().as_bytes(), &DecodeLimits::default()).unwrap()).unwrap()
}

fn file(path: &str, content: &str) -> Value {
    json!({"type": "harmony.file/v1", "path": path, "content": content})
}

#[tokio::test]
async fn a_resource_owned_by_another_deployment_is_a_conflict_on_the_later_one() {
    let device = Device::new();
    let mut r = device.reconciler().await;
    assert!(r.offer(&name("a"), &doc("a", 1, json!([file("/x", "from a")])), DocumentFormat::Cbor).await);
    assert!(r.offer(&name("b"), &doc("b", 1, json!([file("/x", "from b")])), DocumentFormat::Cbor).await);
    let status = r.status();
    let b = &status.deployments[&name("b")];
    assert_eq!((b.phase, b.error.as_ref().unwrap().kind.as_str()), (Phase::Rejected, "resource_conflict"));
    assert!(b.error.as_ref().unwrap().message.contains("file:/x is owned by deployment a"));
    assert_eq!(status.deployments[&name("a")].phase, Phase::Applied);
    assert_eq!(std::fs::read_to_string(device.root("/x")).unwrap(), "from a");
    // The rejection is reported once, and survives a drift-repair pass.
    assert!(!r.offer(&name("b"), &doc("b", 1, json!([file("/x", "from b")])), DocumentFormat::Cbor).await);
    r.reconcile_all().await;
    assert_eq!(r.status().deployments[&name("b")].phase, Phase::Rejected);
}

#[tokio::test]
async fn wrong_device_wrong_key_expired_and_older_generations_are_not_run() {
    let device = Device::new();
    let mut r = device.reconciler().await;
    let other =
        json!({"device_id": "dev-2", "deployment": "a", "generation": 1, "scores": [file("/x", "1")]});
    let bytes =
        encode(&decode_json(other.to_string().as_bytes(), &DecodeLimits::default()).unwrap()).unwrap();
    r.offer(&name("a"), &bytes, DocumentFormat::Cbor).await;
    assert_eq!(r.status().deployments[&name("a")].error.as_ref().unwrap().kind.as_str(), "wrong_device");

    r.offer(&name("b"), &doc("a", 1, json!([file("/y", "1")])), DocumentFormat::Cbor).await;
    assert_eq!(r.status().deployments[&name("b")].error.as_ref().unwrap().kind.as_str(), "wrong_deployment");

    let expired =
        json!({"device_id": "dev-1", "deployment": "c", "generation": 1, "expires_at": 1, "scores": []});
    r.offer(&name("c"), expired.to_string().as_bytes(), DocumentFormat::Json).await;
    assert_eq!(r.status().deployments[&name("c")].error.as_ref().unwrap().kind.as_str(), "expired");
    assert!(!device.root("/x").exists() && !device.root("/y").exists());

    r.offer(&name("d"), &doc("d", 5, json!([file("/d", "5")])), DocumentFormat::Cbor).await;
    assert!(!r.offer(&name("d"), &doc("d", 4, json!([file("/d", "4")])), DocumentFormat::Cbor).await);
    assert_eq!(std::fs::read_to_string(device.root("/d")).unwrap(), "5");
    assert_eq!(r.status().deployments[&name("d")].observed_generation, 5);
}

#[tokio::test]
async fn corrupt_input_is_rejected_with_its_generation_and_the_last_good_state_keeps_running() {
    let device = Device::new();
    let mut r = device.reconciler().await;
    r.offer(&name("a"), &doc("a", 1, json!([file("/x", "good")])), DocumentFormat::Cbor).await;
    let bad = doc("a", 2, json!([file("/x", "never")]));
    r.offer(&name("a"), &bad[..bad.len() - 2], DocumentFormat::Cbor).await;
    let a = r.status().deployments[&name("a")].clone();
    assert_eq!(
        (a.phase, a.observed_generation, a.error.unwrap().kind.as_str()),
        (Phase::Rejected, 1, "truncated")
    );
    let unknown =
        json!({"device_id": "dev-1", "deployment": "a", "generation": 3, "scores": [{"type": "x.y/v1"}]});
    let mut bytes = Vec::new();
    ciborium::into_writer(&unknown, &mut bytes).unwrap();
    r.offer(&name("a"), &bytes, DocumentFormat::Cbor).await;
    let a = r.status().deployments[&name("a")].clone();
    assert_eq!((a.desired_generation, a.error.unwrap().kind.as_str()), (3, "unknown_score_tags"));
    r.reconcile_all().await;
    assert_eq!(std::fs::read_to_string(device.root("/x")).unwrap(), "good");
    assert_eq!(r.status().deployments[&name("a")].phase, Phase::Rejected);
}

#[tokio::test]
async fn a_restart_resumes_from_disk_and_finishes_an_interrupted_prune() {
    let device = Device::new();
    {
        let mut r = device.reconciler().await;
        r.offer(
            &name("a"),
            &doc("a", 1, json!([file("/keep", "k"), file("/drop", "d")])),
            DocumentFormat::Cbor,
        )
        .await;
    }
    assert!(device.root("/drop").exists());
    // Simulate a crash after generation 2 was persisted but before it ran:
    // the record holds the new document and still owns /drop.
    let store = Store::open(&device.state().join("state")).unwrap();
    let (_, record) = store.load_all().unwrap().pop().unwrap();
    let mut record = record.unwrap();
    let gen2 =
        harmony_score_wire::decode(&doc("a", 2, json!([file("/keep", "k")])), &DecodeLimits::default())
            .unwrap();
    record.document = Some(gen2);
    store.save(&name("a"), &record).unwrap();

    let r = device.reconciler().await;
    let a = &r.status().deployments[&name("a")];
    assert!(!device.root("/drop").exists());
    assert_eq!((a.phase, a.observed_generation), (Phase::Applied, 2));
    assert_eq!(
        a.scores.iter().map(|s| s.status).collect::<Vec<_>>(),
        [InterpretStatus::NOOP, InterpretStatus::SUCCESS]
    );
    assert!(a.scores[1].message.starts_with("pruned:"));

    // And a clean restart changes nothing.
    drop(r);
    let r = device.reconciler().await;
    assert!(r.status().deployments[&name("a")].scores.iter().all(|s| s.status == InterpretStatus::NOOP));
}

#[tokio::test]
async fn a_failed_score_does_not_stop_the_others_and_schedules_a_retry() {
    let device = Device::new();
    std::fs::create_dir(device.root("/dir")).unwrap();
    let mut r = device.reconciler().await;
    r.offer(
        &name("a"),
        &doc("a", 1, json!([file("/dir", "not a dir"), file("/ok", "ok")])),
        DocumentFormat::Cbor,
    )
    .await;
    let a = r.status().deployments[&name("a")].clone();
    assert_eq!((a.phase, a.observed_generation), (Phase::Failed, 0));
    assert_eq!(
        a.scores.iter().map(|s| s.status).collect::<Vec<_>>(),
        [InterpretStatus::FAILURE, InterpretStatus::SUCCESS]
    );
    assert!(r.next_retry().is_some());
    std::fs::remove_dir(device.root("/dir")).unwrap();
    r.run_due_retries(std::time::Instant::now() + Duration::from_secs(600)).await;
    let a = r.status().deployments[&name("a")].clone();
    assert_eq!((a.phase, a.observed_generation), (Phase::Applied, 1));
    assert!(r.next_retry().is_none());
}

#[tokio::test]
async fn deleting_prunes_everything_and_forgets_the_record() {
    let device = Device::new();
    let mut r = device.reconciler().await;
    let scores = json!([{"type": "harmony.directory/v1", "path": "/d"}, file("/d/f", "x")]);
    r.offer(&name("a"), &doc("a", 1, scores), DocumentFormat::Cbor).await;
    assert!(r.delete(&name("a")).await);
    assert!(!device.root("/d").exists());
    assert_eq!(r.status().deployments[&name("a")].phase, Phase::Pruned);
    assert!(Store::open(&device.state().join("state")).unwrap().load_all().unwrap().is_empty());
    assert!(!r.delete(&name("a")).await);

    // Reported as pruned for a while, then forgotten so status stays bounded.
    r.forget_pruned(std::time::Instant::now());
    assert!(r.status().deployments.contains_key(&name("a")));
    r.forget_pruned(std::time::Instant::now() + harmony_agent::reconcile::FORGET_PRUNED_AFTER);
    assert!(!r.status().deployments.contains_key(&name("a")));
}
