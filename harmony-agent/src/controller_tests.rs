//! The controller on a real temp root and state directory: acceptance, conflicts, supersede, timeouts, prune, crash safety.
//!
//! Each test drives a real `Controller` task through its inbox, as a
//! source would, and waits on the status it publishes. The resync timer is
//! set to an hour, so nothing here converges by a timer catching up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use harmony_score_wire::{
    device_score, encode, AgentStatus, DeploymentStatus, DesiredState, DeviceInfo, ErrorKind, Phase,
    ResourceId, ScoreValidationError,
};
use harmony_topology::{
    async_trait, Id, Interpret, InterpretError, InterpretName, InterpretStatus, Inventory, Outcome, Score,
    Version,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::*;
use crate::inbox::{inbox, InboxSender};
use crate::store::DeploymentRecord;

/// A test-only Score that takes `millis` to run, optionally honouring the
/// run's cancellation signal, and writes a marker file when it finishes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SleepScore {
    name: String,
    millis: u64,
    #[serde(default)]
    honour_cancel: bool,
    /// Fails instead of succeeding.
    #[serde(default)]
    fail: bool,
    /// Reports BLOCKED (after writing its marker) instead of SUCCESS.
    #[serde(default)]
    blocked: bool,
}

impl Score<LocalDeviceTopology> for SleepScore {
    fn create_interpret(&self) -> Box<dyn Interpret<LocalDeviceTopology>> {
        Box::new(SleepInterpret(self.clone()))
    }
    fn name(&self) -> String {
        format!("sleep [{}]", self.name)
    }
}

#[derive(Debug)]
struct SleepInterpret(SleepScore);

#[async_trait]
impl Interpret<LocalDeviceTopology> for SleepInterpret {
    async fn execute(
        &self,
        _: &Inventory,
        topology: &LocalDeviceTopology,
    ) -> Result<Outcome, InterpretError> {
        let sleep = tokio::time::sleep(Duration::from_millis(self.0.millis));
        if self.0.honour_cancel {
            tokio::select! {
                () = sleep => {}
                () = harmony_topology::run::cancelled() => {
                    return Err(InterpretError::with_kind(harmony_topology::InterpretErrorKind::Cancelled, "cancelled"));
                }
            }
        } else {
            sleep.await;
        }
        if self.0.fail {
            return Err(InterpretError::new("asked to fail"));
        }
        let marker = topology.root().join(format!("slept-{}", self.0.name));
        std::fs::write(marker, b"done").map_err(|e| InterpretError::new(e.to_string()))?;
        if self.0.blocked {
            return Ok(Outcome::new(InterpretStatus::BLOCKED, "slept; cannot wake up here"));
        }
        Ok(Outcome::success("slept"))
    }
    fn get_name(&self) -> InterpretName {
        InterpretName::Custom("Sleep")
    }
    fn get_version(&self) -> Version {
        Version::from("1.0.0")
    }
    fn get_status(&self) -> InterpretStatus {
        InterpretStatus::QUEUED
    }
    fn get_children(&self) -> Vec<Id> {
        Vec::new()
    }
}

device_score! {
    tag: "test.sleep/v1",
    summary: "test only: sleeps, then writes a marker",
    impl DeviceScore for SleepScore {
        fn validate(&self) -> Result<(), ScoreValidationError> {
            harmony_score_wire::validate::check_text("name", &self.name, 64)
        }
        fn resource(&self) -> ResourceId {
            ResourceId::named("sleep", &self.name).expect("validated name")
        }
        fn undo(&self) -> Option<Box<dyn DeviceScore>> {
            None
        }
    }
}

const WAIT: Duration = Duration::from_secs(20);

struct Device {
    dir: tempfile::TempDir,
}

struct Running {
    inbox: InboxSender,
    status: watch::Receiver<std::sync::Arc<AgentStatus>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    fn new() -> Self {
        harmony_scores::ensure_linked();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        Self { dir }
    }

    fn root(&self, path: &str) -> PathBuf {
        self.dir.path().join("root").join(path.trim_start_matches('/'))
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    async fn start(&self) -> Running {
        self.start_with(|_| {}).await
    }

    async fn start_with(&self, tweak: impl FnOnce(&mut ControllerSettings)) -> Running {
        let mut settings = settings();
        tweak(&mut settings);
        let maestro =
            Maestro::initialize(Inventory::empty(), LocalDeviceTopology::new(self.dir.path().join("root")))
                .await
                .unwrap();
        let store = Store::open(&self.state()).unwrap();
        let mut controller = Controller::new(settings, maestro, store);
        controller.boot();
        let (status_tx, status) = watch::channel(std::sync::Arc::new(controller.status()));
        let (inbox_tx, inbox_rx) = inbox();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(controller.run(inbox_rx, status_tx, async {
            let _ = shutdown_rx.await;
        }));
        Running { inbox: inbox_tx, status, shutdown: Some(shutdown_tx), task }
    }
}

impl Running {
    fn offer(&self, deployment: &str, generation: u64, scores: Value) {
        self.offer_bytes(deployment, doc(deployment, generation, scores));
    }

    fn offer_bytes(&self, deployment: &str, bytes: Vec<u8>) {
        assert!(self.inbox.send(Input::Document {
            deployment: name(deployment),
            bytes,
            format: DocumentFormat::Cbor
        }));
    }

    fn delete(&self, deployment: &str) {
        assert!(self.inbox.send(Input::Deleted { deployment: name(deployment) }));
    }

    /// Waits until `check` holds for the published status; returns it.
    async fn until(&mut self, what: &str, check: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
        let waited = tokio::time::timeout(WAIT, async {
            loop {
                {
                    let status = self.status.borrow_and_update();
                    if check(&status) {
                        return AgentStatus::clone(&status);
                    }
                }
                self.status.changed().await.expect("controller alive");
            }
        })
        .await;
        match waited {
            Ok(status) => status,
            Err(_) => {
                panic!("timed out waiting for {what}; last status: {:#?}", self.status.borrow().deployments)
            }
        }
    }

    async fn until_phase(&mut self, deployment: &str, generation: u64, phase: Phase) -> DeploymentStatus {
        let n = name(deployment);
        let status = self
            .until(&format!("{deployment} {phase:?} at {generation}"), |s| {
                s.deployments.get(&n).is_some_and(|d| d.phase == phase && d.desired_generation == generation)
            })
            .await;
        status.deployments[&n].clone()
    }

    async fn applied(&mut self, deployment: &str, generation: u64) -> DeploymentStatus {
        let n = name(deployment);
        let status = self
            .until(&format!("{deployment} applied at {generation}"), |s| {
                s.deployments
                    .get(&n)
                    .is_some_and(|d| d.phase == Phase::Applied && d.observed_generation == generation)
            })
            .await;
        status.deployments[&n].clone()
    }

    /// Shuts down and returns how long it took.
    async fn stop(mut self) -> Duration {
        let started = std::time::Instant::now();
        let _ = self.shutdown.take().unwrap().send(());
        tokio::time::timeout(WAIT, &mut self.task).await.expect("bounded shutdown").unwrap();
        started.elapsed()
    }
}

/// The settings every test starts from: dev-1, a resync of an hour (nothing
/// here converges by the timer), unsigned documents allowed.
fn settings() -> ControllerSettings {
    ControllerSettings {
        device: DeviceId::new("dev-1").unwrap(),
        max_parallel: 4,
        resync: Duration::from_secs(3600),
        timeouts: Timeouts::default(),
        shutdown_grace: Duration::from_secs(5),
        heartbeat: Duration::from_secs(30),
        info: DeviceInfo::default(),
        policy: crate::DevicePolicy::default(),
        trust: harmony_score_wire::TrustedKeys::new(Vec::new(), 1),
        allow_unsigned: true,
        root_keys: harmony_score_wire::TrustedKeys::new(Vec::new(), 1),
    }
}

fn name(text: &str) -> DeploymentName {
    DeploymentName::new(text).unwrap()
}

fn doc(deployment: &str, generation: u64, scores: Value) -> Vec<u8> {
    doc_for("dev-1", deployment, generation, scores)
}

fn doc_for(device: &str, deployment: &str, generation: u64, scores: Value) -> Vec<u8> {
    let value =
        json!({"device_id": device, "deployment": deployment, "generation": generation, "scores": scores});
    let doc: DesiredState = serde_json::from_value(value).unwrap();
    encode(&doc).unwrap()
}

fn file(path: &str, content: &str) -> Value {
    json!({"type": "harmony.file/v1", "path": path, "content": content})
}

fn dir_score(path: &str) -> Value {
    json!({"type": "harmony.directory/v1", "path": path})
}

fn sleep(name: &str, millis: u64) -> Value {
    json!({"type": "test.sleep/v1", "name": name, "millis": millis})
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn a_document_is_applied_and_an_unchanged_redelivery_runs_nothing() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("web", 1, json!([file("/etc/motd", "hello\n")]));
    let status = agent.applied("web", 1).await;
    assert_eq!(read(&device.root("/etc/motd")), "hello\n");
    assert_eq!(status.observed_digest, status.desired_digest);
    assert!(status.observed_digest.as_deref().unwrap().starts_with("sha256:"));
    let before = status.last_attempt_at_ms;
    agent.offer("web", 1, json!([file("/etc/motd", "hello\n")]));
    agent.offer("other", 1, json!([file("/other", "x")]));
    let status = agent.applied("other", 1).await;
    assert_eq!(status.observed_generation, 1);
    let web = &agent.status.borrow().deployments[&name("web")].clone();
    assert_eq!(web.last_attempt_at_ms, before, "the same document delivered again did not run again");
    agent.stop().await;
}

// Issue 6 §3: `/shared` in one deployment and `//shared` in another were
// both applied; a file and a directory at one path were not caught either.
#[tokio::test]
async fn aliases_and_a_file_against_a_directory_conflict_across_deployments() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("a", 1, json!([file("/shared", "from a")]));
    agent.applied("a", 1).await;
    agent.offer("b", 1, json!([file("//shared/", "from b")]));
    let b = agent.until_phase("b", 1, Phase::Rejected).await;
    assert_eq!(b.error.as_ref().unwrap().kind, ErrorKind::ResourceConflict);
    assert!(b.error.as_ref().unwrap().message.contains("path:/shared"), "{b:?}");
    agent.offer("c", 1, json!([dir_score("/./shared")]));
    let c = agent.until_phase("c", 1, Phase::Rejected).await;
    assert_eq!(c.error.as_ref().unwrap().kind, ErrorKind::ResourceConflict);
    assert_eq!(read(&device.root("/shared")), "from a");

    // Deleting the refused deployment never removes what another owns.
    agent.delete("b");
    agent.offer("d", 1, json!([file("/d", "x")]));
    agent.applied("d", 1).await;
    assert_eq!(read(&device.root("/shared")), "from a");
    agent.stop().await;
}

// Issue 6 §4: a document refused for a conflict stayed refused after the
// owner was deleted.
#[tokio::test]
async fn a_conflict_clears_when_the_owner_is_deleted() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("a", 1, json!([file("/shared", "from a")]));
    agent.applied("a", 1).await;
    agent.offer("b", 1, json!([file("/shared", "from b")]));
    agent.until_phase("b", 1, Phase::Rejected).await;
    agent.delete("a");
    let b = agent.applied("b", 1).await;
    assert_eq!(b.error, None);
    assert_eq!(read(&device.root("/shared")), "from b");
    let status = agent
        .until("a pruned", |s| s.deployments.get(&name("a")).is_some_and(|d| d.phase == Phase::Pruned))
        .await;
    assert_eq!(status.deployments[&name("a")].phase, Phase::Pruned);
    agent.stop().await;
}

#[tokio::test]
async fn wrong_device_wrong_key_expired_and_replayed_documents_are_refused() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer_bytes("a", doc_for("dev-2", "a", 1, json!([file("/a", "x")])));
    assert_eq!(agent.until_phase("a", 1, Phase::Rejected).await.error.unwrap().kind, ErrorKind::WrongDevice);
    agent.offer_bytes("b", doc("other", 1, json!([file("/b", "x")])));
    assert_eq!(
        agent.until_phase("b", 1, Phase::Rejected).await.error.unwrap().kind,
        ErrorKind::WrongDeployment
    );
    let mut expired: Value = serde_json::from_slice(&serde_json::to_vec(&json!({
        "device_id": "dev-1", "deployment": "c", "generation": 1, "expires_at": 1, "scores": [file("/c", "x")]
    })).unwrap()).unwrap();
    expired["issued_at"] = json!(0);
    let expired: DesiredState = serde_json::from_value(expired).unwrap();
    agent.offer_bytes("c", encode(&expired).unwrap());
    assert_eq!(agent.until_phase("c", 1, Phase::Rejected).await.error.unwrap().kind, ErrorKind::Expired);
    assert!(!device.root("/a").exists() && !device.root("/b").exists() && !device.root("/c").exists());

    // High-water mark: g2 applied, deleted, re-created at g3; an old g2 (or
    // g1) replayed afterwards stays refused.
    let g2 = doc("web", 2, json!([file("/web", "two")]));
    agent.offer_bytes("web", g2.clone());
    agent.applied("web", 2).await;
    agent.delete("web");
    agent
        .until("web pruned", |s| s.deployments.get(&name("web")).is_some_and(|d| d.phase == Phase::Pruned))
        .await;
    agent.offer_bytes("web", g2.clone());
    let web = agent.until_phase("web", 2, Phase::Rejected).await;
    assert_eq!(web.error.unwrap().kind, ErrorKind::StaleGeneration);
    assert!(!device.root("/web").exists());
    agent.offer("web", 3, json!([file("/web", "three")]));
    agent.applied("web", 3).await;
    // An older generation does not take the phase (the accepted one still
    // holds); it is refused and nothing of it runs.
    agent.offer("web", 1, json!([file("/web", "one")]));
    agent.offer("marker", 1, json!([file("/marker", "x")]));
    agent.applied("marker", 1).await;
    let web = agent.status.borrow().deployments[&name("web")].clone();
    assert_eq!((web.phase, web.observed_generation), (Phase::Applied, 3));
    // Also with the accepted generation's number and other content.
    agent.offer("web", 3, json!([file("/web", "forged three")]));
    agent.offer("marker3", 1, json!([file("/marker3", "x")]));
    agent.applied("marker3", 1).await;
    let web = agent.status.borrow().deployments[&name("web")].clone();
    assert_eq!((web.phase, web.observed_generation), (Phase::Applied, 3));
    assert_eq!(web.desired_digest, web.observed_digest, "the refused document is not the desired one");
    assert_eq!(read(&device.root("/web")), "three");
    agent.stop().await;

    // And after a restart, from the persisted high-water mark.
    let mut agent = device.start().await;
    agent.applied("web", 3).await;
    agent.offer_bytes("web", g2);
    agent.offer("marker2", 1, json!([file("/marker2", "x")]));
    agent.applied("marker2", 1).await;
    assert_eq!(agent.status.borrow().deployments[&name("web")].observed_generation, 3);
    assert_eq!(read(&device.root("/web")), "three");
    agent.stop().await;
}

#[tokio::test]
async fn corrupt_input_is_rejected_and_the_last_good_generation_keeps_running() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("web", 1, json!([file("/web", "one")]));
    agent.applied("web", 1).await;
    let mut truncated = doc("web", 2, json!([file("/web", "two")]));
    truncated.truncate(truncated.len() - 5);
    agent.offer_bytes("web", truncated);
    let web =
        agent.until("truncated g2 refused", |s| s.deployments[&name("web")].phase == Phase::Rejected).await;
    assert_eq!(web.deployments[&name("web")].error.as_ref().unwrap().kind, ErrorKind::Truncated);
    assert_eq!(web.deployments[&name("web")].observed_generation, 1);
    // An invalid Score (a mode beyond 0o7777) refuses the whole document before any Score runs.
    let mut bad = json!({"device_id": "dev-1", "deployment": "web", "generation": 3,
        "scores": [file("/first", "x"), {"type": "harmony.file/v1", "path": "/x", "mode": 0o14755}]});
    let cbor = {
        let mut out = Vec::new();
        ciborium::into_writer(&bad.take(), &mut out).unwrap();
        out
    };
    agent.offer_bytes("web", cbor);
    let web = agent.until_phase("web", 3, Phase::Rejected).await;
    let error = web.error.unwrap();
    assert_eq!(error.kind, ErrorKind::InvalidScore);
    assert!(error.message.contains("#1") && error.message.contains("mode"), "{}", error.message);
    assert!(!device.root("/first").exists(), "nothing of a refused document runs");
    assert_eq!(read(&device.root("/web")), "one");
    agent.stop().await;
}

// Issue 6 §1: one long Score held up every other deployment, commands and shutdown.
#[tokio::test]
async fn a_long_score_delays_neither_another_deployment_nor_shutdown() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("slow", 1, json!([sleep("slow", 60_000)]));
    let slow = agent
        .until("slow applying", |s| {
            s.deployments
                .get(&name("slow"))
                .is_some_and(|d| d.current_score.as_deref() == Some("1/1 sleep [slow]"))
        })
        .await;
    assert_eq!(slow.deployments[&name("slow")].phase, Phase::Applying);
    agent.offer("fast", 1, json!([file("/fast", "x")]));
    agent.applied("fast", 1).await;
    let (reply, answer) = oneshot::channel();
    agent.inbox.command(Command::ReconcileNow { reply });
    let text = tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
    assert!(text.contains("1 running"), "{text}");
    // The sleeping Score ignores cancellation: shutdown aborts it after the grace period.
    let took = agent.stop().await;
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
    assert!(!device.root("/slept-slow").exists());
}

// Issue 6 §1: a newer generation waited for the older one's run to finish.
#[tokio::test]
async fn a_newer_generation_supersedes_a_run_at_the_next_score_boundary() {
    let device = Device::new();
    let mut agent = device.start().await;
    let first = json!({"type": "test.sleep/v1", "name": "a", "millis": 60_000, "honour_cancel": true});
    agent.offer("web", 1, json!([first, sleep("b", 0), file("/web", "one")]));
    agent
        .until("g1 running its first Score", |s| {
            s.deployments
                .get(&name("web"))
                .is_some_and(|d| d.current_score.as_deref() == Some("1/3 sleep [a]"))
        })
        .await;
    agent.offer("web", 2, json!([file("/web", "two")]));
    let web = agent.applied("web", 2).await;
    assert_eq!(web.superseded_generation, Some(1));
    assert_eq!(read(&device.root("/web")), "two");
    assert!(!device.root("/slept-b").exists(), "g1 stopped at the boundary after the cancelled Score");
    agent.stop().await;
}

#[tokio::test]
async fn an_interpret_past_its_time_limit_fails_with_kind_timeout_and_is_retried() {
    let device = Device::new();
    let mut agent = device
        .start_with(|s| {
            s.timeouts.per_tag.insert("test.sleep/v1".into(), Duration::from_millis(200));
        })
        .await;
    agent.offer("web", 1, json!([sleep("long", 30_000), file("/after", "x")]));
    let web = agent.until_phase("web", 1, Phase::Failed).await;
    assert_eq!(web.scores[0].status, InterpretStatus::FAILURE);
    assert_eq!(web.scores[0].error_kind, Some(harmony_topology::InterpretErrorKind::Timeout));
    assert!(web.scores[1].is_ok(), "a failing Score does not stop the next");
    assert_eq!(web.error.unwrap().kind, ErrorKind::ScoresFailed);
    assert_eq!(web.observed_generation, 0);
    agent.stop().await;
}

// Issue 8 §3: a Score that is BLOCKED (a unit that cannot start where no
// systemd runs) was a failure, retried with backoff for ever. It is
// settled: applied, shown BLOCKED, not retried until the resync.
#[tokio::test]
async fn a_blocked_score_is_applied_shown_blocked_and_not_retried() {
    let device = Device::new();
    let mut agent = device.start().await;
    let blocked = json!({"type": "test.sleep/v1", "name": "b", "millis": 0, "blocked": true});
    agent.offer("web", 1, json!([blocked, file("/after", "x")]));
    let web = agent.applied("web", 1).await;
    assert_eq!(web.scores[0].status, InterpretStatus::BLOCKED);
    assert_eq!(web.scores[0].message, "slept; cannot wake up here");
    assert_eq!(web.scores[1].status, InterpretStatus::SUCCESS);
    assert_eq!(web.error, None);
    assert_eq!(web.observed_digest, web.desired_digest);
    // A failure would be retried after 2 to 2.5 s; a blocked Score is not.
    std::fs::remove_file(device.root("/slept-b")).unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(!device.root("/slept-b").exists(), "not run again");
    let now = agent.status.borrow().deployments[&name("web")].clone();
    assert_eq!((now.phase, now.last_attempt_at_ms), (Phase::Applied, web.last_attempt_at_ms));
    agent.stop().await;
}

// Issue 6 §8: a newer generation replaces a failing one's retry.
#[tokio::test]
async fn a_newer_generation_supersedes_a_retrying_one() {
    let device = Device::new();
    let mut agent = device.start().await;
    let failing = json!({"type": "test.sleep/v1", "name": "f", "millis": 0, "fail": true});
    agent.offer("web", 1, json!([failing]));
    agent.until_phase("web", 1, Phase::Failed).await;
    agent.offer("web", 2, json!([file("/web", "two")]));
    let web = agent.applied("web", 2).await;
    assert_eq!(web.error, None);
    agent.stop().await;
}

// Issue 6 §8: a prune that fails is reported and retried, and the resource stays owned.
#[tokio::test]
async fn a_failed_prune_is_reported_kept_owned_and_retried() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("web", 1, json!([dir_score("/data")]));
    agent.applied("web", 1).await;
    std::fs::write(device.root("/data/keep"), "user data").unwrap();
    agent.delete("web");
    let web = agent.until("prune failed", |s| s.deployments[&name("web")].phase == Phase::Failed).await;
    let web = &web.deployments[&name("web")];
    assert_eq!(web.error.as_ref().unwrap().kind, ErrorKind::PruneFailed);
    assert!(web.scores[0].message.starts_with("pruned:"), "{:?}", web.scores);
    // Another deployment cannot take the path while the undo is pending.
    agent.offer("other", 1, json!([dir_score("/data")]));
    agent.until_phase("other", 1, Phase::Rejected).await;
    std::fs::remove_file(device.root("/data/keep")).unwrap();
    // The retry (backoff 2 s) undoes it; the refused deployment is then accepted.
    agent.applied("other", 1).await;
    assert!(device.root("/data").is_dir());
    agent.stop().await;
}

#[tokio::test]
async fn a_restart_resumes_from_disk_and_finishes_an_interrupted_prune() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("web", 1, json!([file("/a", "1"), file("/b", "2")]));
    agent.applied("web", 1).await;
    agent.stop().await;
    // Simulate a crash after g2 was accepted (persisted) but before its prune ran.
    let store = Store::open(&device.state()).unwrap();
    let mut loaded = store.load_all().unwrap();
    let (_, record) = loaded.remove(0);
    let mut record = record.unwrap();
    let g2 = doc("web", 2, json!([file("/a", "1")]));
    record.document = Some(StoredDocument {
        digest: document_digest(&g2),
        bytes: g2,
        format: DocumentFormat::Cbor,
        generation: 2,
    });
    store.save(&name("web"), &record).unwrap();
    drop(store);
    std::fs::remove_file(device.root("/a")).unwrap(); // drift while down

    let mut agent = device.start().await;
    agent.applied("web", 2).await;
    assert_eq!(read(&device.root("/a")), "1");
    assert!(!device.root("/b").exists(), "the interrupted prune finished");
    agent.stop().await;
}

// Issue 6 §5: a corrupt record was logged and skipped, its resources leaked,
// and the next save overwrote it.
#[tokio::test]
async fn a_corrupt_record_is_reported_as_state_unreadable_and_kept() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("web", 1, json!([file("/a", "1")]));
    agent.applied("web", 1).await;
    agent.stop().await;
    let path = device.state().join("deployments/web.state");
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();

    let mut agent = device.start().await;
    let status = agent
        .until("state_unreadable", |s| s.deployments.get(&name("web")).is_some_and(|d| d.error.is_some()))
        .await;
    let web = &status.deployments[&name("web")];
    assert_eq!(web.error.as_ref().unwrap().kind, ErrorKind::StateUnreadable);
    assert_eq!(web.phase, Phase::Failed);
    let kept: Vec<_> = std::fs::read_dir(device.state().join("deployments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".unreadable-"))
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(std::fs::read(&kept[0]).unwrap(), bytes);
    // The source delivers the key again: the deployment recovers.
    agent.offer("web", 1, json!([file("/a", "1")]));
    agent.applied("web", 1).await;
    agent.stop().await;
}

// Issue 6 §5: a record whose Scores this agent cannot decode (a rollback to
// a version without the tag) is kept byte for byte and reported.
#[tokio::test]
async fn a_record_this_agent_cannot_run_is_reported_and_kept_byte_for_byte() {
    let device = Device::new();
    let store = Store::open(&device.state()).unwrap();
    let unknown = {
        let value = json!({"device_id": "dev-1", "deployment": "web", "generation": 4,
            "scores": [{"type": "future.thing/v9", "path": "/x"}]});
        let mut out = Vec::new();
        ciborium::into_writer(&value, &mut out).unwrap();
        out
    };
    // It owns a file, whose undo this agent could run: a rollback must not undo it.
    std::fs::write(device.root("/kept"), "still wanted").unwrap();
    let undo: Box<dyn DeviceScore> = Box::new(harmony_scores::FileScore {
        path: "/kept".into(),
        content: String::new(),
        mode: None,
        state: harmony_scores::PresenceState::Absent,
    });
    let owned = crate::store::OwnedResource {
        resource: ResourceId::path("/kept"),
        undo: harmony_score_wire::try_to_cbor(&undo).unwrap(),
    };
    let record = DeploymentRecord {
        owned: vec![owned],
        document: Some(StoredDocument {
            digest: document_digest(&unknown),
            bytes: unknown.clone(),
            format: DocumentFormat::Cbor,
            generation: 4,
        }),
        observed_generation: 4,
        high_water: Some(HighWater { generation: 4, digest: document_digest(&unknown) }),
        ..Default::default()
    };
    store.save(&name("web"), &record).unwrap();
    drop(store);
    let mut agent = device.start().await;
    let status = agent
        .until("unrunnable", |s| s.deployments.get(&name("web")).is_some_and(|d| d.error.is_some()))
        .await;
    let web = &status.deployments[&name("web")];
    assert_eq!(web.error.as_ref().unwrap().kind, ErrorKind::UnknownScoreTags);
    assert!(web.error.as_ref().unwrap().message.contains("future.thing/v9"));
    // A resync (a reconcile command) schedules nothing for it either.
    let (reply, answer) = oneshot::channel();
    agent.inbox.command(Command::ReconcileNow { reply });
    let text = tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
    assert!(text.starts_with("reconcile scheduled for 0 deployments"), "{text}");
    agent.stop().await;
    assert_eq!(read(&device.root("/kept")), "still wanted", "what it owns is still wanted");
    let reloaded = Store::open(&device.state()).unwrap().load_all().unwrap().remove(0).1.unwrap();
    assert_eq!(reloaded.document.unwrap().bytes, unknown, "the record is not re-encoded");
}

// Issue 6 §5: a failure to persist made the run `applied` anyway.
#[tokio::test]
async fn a_failure_to_persist_fails_the_deployment_and_nothing_runs() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("web", 1, json!([file("/a", "1")]));
    agent.applied("web", 1).await;
    // The records folder becomes a file: every save fails (even as root).
    let records = device.state().join("deployments");
    std::fs::rename(&records, device.state().join("moved")).unwrap();
    std::fs::write(&records, b"not a folder").unwrap();
    agent.offer("web", 2, json!([file("/a", "2")]));
    let web = agent.until_phase("web", 2, Phase::Failed).await;
    assert_eq!(web.error.unwrap().kind, ErrorKind::PersistFailed);
    assert_eq!(web.observed_generation, 1);
    assert_eq!(read(&device.root("/a")), "1", "an unpersisted document does not run");
    agent.stop().await;
}

#[tokio::test]
async fn deployments_run_in_parallel_up_to_the_bound() {
    let device = Device::new();
    let mut agent = device.start_with(|s| s.max_parallel = 2).await;
    for n in ["a", "b", "c"] {
        agent.offer(n, 1, json!([sleep(n, 60_000)]));
    }
    let status = agent
        .until("two running", |s| s.deployments.values().filter(|d| d.current_score.is_some()).count() == 2)
        .await;
    assert!(status.deployments.get(&name("c")).is_none_or(|d| d.current_score.is_none()));
    agent.stop().await;
}

#[tokio::test]
async fn a_second_agent_on_one_state_directory_is_refused() {
    let device = Device::new();
    let agent = device.start().await;
    let config = crate::ConfigLayer {
        device_id: Some("dev-1".into()),
        state_dir: Some(device.state()),
        root: Some(device.dir.path().join("root")),
        source: Some(format!("dir:{}", device.dir.path().display())),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let err = crate::run(config, async {}).await.unwrap_err();
    assert!(matches!(err, crate::DaemonError::StateFailed(crate::StoreError::Locked { .. })), "{err:?}");
    agent.stop().await;
}

// Issue 6 §6: two documents with a 600 kB invalid device id grew status past
// the server's payload limit, and the device stopped reporting for good.
#[tokio::test]
async fn huge_invalid_values_cannot_grow_status_past_its_bound() {
    let device = Device::new();
    let mut agent = device.start().await;
    for deployment in ["a", "b"] {
        let value = json!({"device_id": "x".repeat(600_000) + "\u{1b}[31m", "deployment": deployment, "generation": 1, "scores": []});
        let mut out = Vec::new();
        ciborium::into_writer(&value, &mut out).unwrap();
        agent.offer_bytes(deployment, out);
    }
    let status = agent
        .until("both refused", |s| {
            ["a", "b"].iter().all(|n| s.deployments.get(&name(n)).is_some_and(|d| d.phase == Phase::Rejected))
        })
        .await;
    for d in status.deployments.values() {
        let message = &d.error.as_ref().unwrap().message;
        assert!(message.len() <= harmony_score_wire::MAX_MESSAGE_BYTES, "{}", message.len());
        assert!(!message.contains('\u{1b}'));
    }
    assert!(harmony_score_wire::to_cbor(&status).len() < 16 * 1024);
    agent.stop().await;
}

// A run whose last Score honours the signal is superseded, not failed (no
// retry, no backoff).
#[tokio::test]
async fn a_run_cancelled_in_its_last_score_is_superseded_not_failed() {
    let device = Device::new();
    let mut agent = device.start().await;
    let only = json!({"type": "test.sleep/v1", "name": "a", "millis": 60_000, "honour_cancel": true});
    agent.offer("web", 1, json!([only]));
    agent
        .until("g1 running", |s| {
            s.deployments
                .get(&name("web"))
                .is_some_and(|d| d.current_score.as_deref() == Some("1/1 sleep [a]"))
        })
        .await;
    agent.offer("web", 2, json!([file("/web", "two")]));
    let web = agent.applied("web", 2).await;
    assert_eq!(web.superseded_generation, Some(1));
    assert!(web.scores.iter().all(|s| s.is_ok()), "{:?}", web.scores);
    agent.stop().await;
}

// ---------------------------------------------------------------------------
// Attacks on the second edition (branch `attack`).
// ---------------------------------------------------------------------------

fn absent_file(path: &str) -> Value {
    json!({"type": "harmony.file/v1", "path": path, "state": "absent"})
}

/// A controller driven by hand (no run loop), for states a test cannot wait
/// for in real time (ten minutes after a prune).
async fn manual_controller(device: &Device) -> Controller {
    let settings = settings();
    let maestro =
        Maestro::initialize(Inventory::empty(), LocalDeviceTopology::new(device.dir.path().join("root")))
            .await
            .unwrap();
    let mut controller = Controller::new(settings, maestro, Store::open(&device.state()).unwrap());
    controller.boot();
    controller
}

/// Starts what is ready and routes run events until nothing runs.
async fn drain(controller: &mut Controller) {
    controller.start_ready().await;
    while controller.running > 0 {
        let event = tokio::time::timeout(WAIT, controller.events_rx.recv()).await.unwrap().unwrap();
        controller.on_event(event).await;
        controller.start_ready().await;
    }
}

// Attack: the high-water mark "outlives deletes" only until the resync ten
// minutes after the prune, which removed the whole entry from memory (the
// mark included). The deleted deployment's old document written back to its
// key after that was accepted and ran again, and its record (holding the
// mark) was overwritten.
#[tokio::test]
async fn a_forgotten_pruned_deployment_still_refuses_its_old_generation() {
    let device = Device::new();
    let mut controller = manual_controller(&device).await;
    let g2 = doc("web", 2, json!([file("/web", "two")]));
    controller.offer(&name("web"), g2.clone(), DocumentFormat::Cbor).await;
    drain(&mut controller).await;
    assert_eq!(read(&device.root("/web")), "two");
    controller.delete(&name("web")).await;
    drain(&mut controller).await;
    assert!(!device.root("/web").exists());
    let entry = controller.deployments.get_mut(&name("web")).unwrap();
    assert!(entry.pruned_at.is_some(), "pruned");
    // Ten minutes and more later (std Instant: the clock cannot be paused).
    entry.pruned_at = Some(Instant::now().checked_sub(FORGET_PRUNED_AFTER * 2).expect("uptime"));
    controller.resync().await;
    assert!(!controller.status().deployments.contains_key(&name("web")), "forgotten from status");

    controller.offer(&name("web"), g2, DocumentFormat::Cbor).await;
    drain(&mut controller).await;
    assert!(!device.root("/web").exists(), "the replayed generation 2 ran again");
    let status = controller.status().deployments[&name("web")].clone();
    assert_eq!(status.error.map(|e| e.kind), Some(ErrorKind::StaleGeneration));
}

// Attack: a deployment whose Scores own nothing to undo (here a file that
// must be absent) was deleted. Nothing was left to run, so nothing ever set
// `pruned`: status said `applying` forever, and a document refused for a
// conflict with it waited for the next resync (an hour here).
#[tokio::test]
async fn a_deleted_deployment_with_nothing_to_undo_is_pruned_and_releases_its_resources() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("cleanup", 1, json!([absent_file("/stale")]));
    agent.applied("cleanup", 1).await;
    agent.offer("app", 1, json!([file("/stale", "wanted again")]));
    let app = agent.until_phase("app", 1, Phase::Rejected).await;
    assert_eq!(app.error.unwrap().kind, ErrorKind::ResourceConflict);
    agent.delete("cleanup");
    agent
        .until("cleanup pruned", |s| {
            s.deployments.get(&name("cleanup")).is_none_or(|d| d.phase == Phase::Pruned)
        })
        .await;
    agent.applied("app", 1).await;
    assert_eq!(read(&device.root("/stale")), "wanted again");
    agent.stop().await;
}

// Attack: a delete that arrives while the deployment's last Score runs. The
// run ends cancelled with nothing left owned, so it was neither rerun nor
// marked pruned: status said `applying` forever.
#[tokio::test]
async fn a_delete_during_the_last_score_ends_pruned_not_applying_forever() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("web", 1, json!([sleep("a", 0)]));
    agent.applied("web", 1).await;
    agent.offer("web", 2, json!([sleep("b", 1500)]));
    agent
        .until("g2 running", |s| {
            s.deployments
                .get(&name("web"))
                .is_some_and(|d| d.current_score.as_deref() == Some("1/1 sleep [b]"))
        })
        .await;
    agent.delete("web");
    agent
        .until("web pruned", |s| s.deployments.get(&name("web")).is_none_or(|d| d.phase == Phase::Pruned))
        .await;
    agent.stop().await;
}

/// A test-only Score owning `path:/<name>`: applying writes the file,
/// undoing it (`undo: true`) sleeps `millis` first, then removes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SlowUndoScore {
    name: String,
    millis: u64,
    #[serde(default)]
    undo: bool,
}

impl Score<LocalDeviceTopology> for SlowUndoScore {
    fn create_interpret(&self) -> Box<dyn Interpret<LocalDeviceTopology>> {
        Box::new(SlowUndoInterpret(self.clone()))
    }
    fn name(&self) -> String {
        format!("slow-undo [{}]", self.name)
    }
}

#[derive(Debug)]
struct SlowUndoInterpret(SlowUndoScore);

#[async_trait]
impl Interpret<LocalDeviceTopology> for SlowUndoInterpret {
    async fn execute(
        &self,
        _: &Inventory,
        topology: &LocalDeviceTopology,
    ) -> Result<Outcome, InterpretError> {
        let path = topology.root().join(&self.0.name);
        if self.0.undo {
            tokio::time::sleep(Duration::from_millis(self.0.millis)).await;
            let _ = std::fs::remove_file(path);
        } else {
            std::fs::write(path, b"made").map_err(|e| InterpretError::new(e.to_string()))?;
        }
        Ok(Outcome::success("done"))
    }
    fn get_name(&self) -> InterpretName {
        InterpretName::Custom("SlowUndo")
    }
    fn get_version(&self) -> Version {
        Version::from("1.0.0")
    }
    fn get_status(&self) -> InterpretStatus {
        InterpretStatus::QUEUED
    }
    fn get_children(&self) -> Vec<Id> {
        Vec::new()
    }
}

device_score! {
    tag: "test.slow-undo/v1",
    summary: "test only: writes a file; its undo sleeps, then removes it",
    impl DeviceScore for SlowUndoScore {
        fn validate(&self) -> Result<(), ScoreValidationError> {
            harmony_score_wire::validate::check_text("name", &self.name, 64)
        }
        fn resource(&self) -> ResourceId {
            ResourceId::path(&format!("/{}", self.name))
        }
        fn undo(&self) -> Option<Box<dyn DeviceScore>> {
            (!self.undo).then(|| Box::new(SlowUndoScore { undo: true, ..self.clone() }) as Box<dyn DeviceScore>)
        }
    }
}

// Attack: the disk fills up while a deleted deployment's undo runs. The
// undo held, the controller dropped the resource from what the deployment
// owns in memory, and the save of that failed. Memory and disk then
// disagreed: another deployment took the resource at once (nothing in
// memory owned it), the deleted one had no work left so its persist
// failure was never retried (`failed` forever), and its record on disk
// still owned the resource, so the next start would undo what the other
// deployment now owns.
#[tokio::test]
async fn a_failed_save_after_a_prune_keeps_memory_and_disk_in_step() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("old", 1, json!([{"type": "test.slow-undo/v1", "name": "r", "millis": 1500}]));
    agent.applied("old", 1).await;
    agent.delete("old");
    agent
        .until("undo running", |s| {
            s.deployments
                .get(&name("old"))
                .is_some_and(|d| d.current_score.as_deref() == Some("1/1 prune slow-undo [r]"))
        })
        .await;
    // The disk "fills up": every save fails from here on.
    let records = device.state().join("deployments");
    let moved = device.state().join("moved");
    std::fs::rename(&records, &moved).unwrap();
    std::fs::write(&records, b"not a folder").unwrap();
    agent
        .until("old failed to persist", |s| {
            s.deployments
                .get(&name("old"))
                .is_some_and(|d| d.error.as_ref().is_some_and(|e| e.kind == ErrorKind::PersistFailed))
        })
        .await;
    agent.offer("new", 1, json!([file("/r", "new")]));
    agent.until("new offered", |s| s.deployments.contains_key(&name("new"))).await;
    // The disk recovers.
    std::fs::remove_file(&records).unwrap();
    std::fs::rename(&moved, &records).unwrap();
    agent
        .until("old pruned", |s| s.deployments.get(&name("old")).is_some_and(|d| d.phase == Phase::Pruned))
        .await;
    agent.applied("new", 1).await;
    agent.stop().await;
    let loaded = Store::open(&device.state()).unwrap().load_all().unwrap();
    let old = loaded.iter().find(|(n, _)| n.as_str() == "old").unwrap().1.as_ref().unwrap();
    assert!(old.owned.is_empty(), "the record on disk still owns {:?}", old.owned);
}

// Attack: a bad write to a key (truncated, so its generation counts as
// newer and status says `rejected`), then the key restored to the document
// the device already runs (a revert from the key's history, another tool).
// The restored document was `Unchanged` and returned early, so the stale
// refusal stayed: `rejected` until some newer generation came.
#[tokio::test]
async fn restoring_the_accepted_document_clears_a_refusal_of_what_replaced_it() {
    let device = Device::new();
    let mut agent = device.start().await;
    let g1 = doc("web", 1, json!([file("/web", "one")]));
    agent.offer_bytes("web", g1.clone());
    agent.applied("web", 1).await;
    let mut truncated = doc("web", 2, json!([file("/web", "two")]));
    truncated.truncate(truncated.len() - 5);
    agent.offer_bytes("web", truncated);
    agent.until("truncated refused", |s| s.deployments[&name("web")].phase == Phase::Rejected).await;
    agent.offer_bytes("web", g1);
    let status =
        agent.until("the key holds g1 again", |s| s.deployments[&name("web")].phase != Phase::Rejected).await;
    let web = &status.deployments[&name("web")];
    assert_eq!((web.phase, web.error.as_ref()), (Phase::Applied, None));
    agent.stop().await;
}

// Attack: two names for one file through a symlinked directory, as every
// merged-/usr system has (`/lib -> usr/lib`, `/var/run -> /run`). Resource
// ids are normalized as text only, so `path:/lib/x` and `path:/usr/lib/x`
// do not collide: both deployments are accepted, overwrite each other's
// file, and deleting one removes the other's.
#[tokio::test]
async fn two_names_for_one_file_through_a_symlinked_directory_conflict() {
    let device = Device::new();
    std::fs::create_dir_all(device.root("/usr/lib")).unwrap();
    std::os::unix::fs::symlink("usr/lib", device.root("/lib")).unwrap();
    let mut agent = device.start().await;
    agent.offer("a", 1, json!([file("/lib/x.conf", "from a")]));
    agent.applied("a", 1).await;
    agent.offer("b", 1, json!([file("/usr/lib/x.conf", "from b")]));
    let b = agent.until_phase("b", 1, Phase::Rejected).await;
    assert_eq!(b.error.unwrap().kind, ErrorKind::ResourceConflict);
    assert_eq!(read(&device.root("/usr/lib/x.conf")), "from a");
    // And within one document.
    agent.offer("c", 1, json!([file("/lib/y.conf", "1"), file("/usr/lib/y.conf", "2")]));
    let c = agent.until_phase("c", 1, Phase::Rejected).await;
    assert_eq!(c.error.unwrap().kind, ErrorKind::DuplicateResource);
    assert!(!device.root("/usr/lib/y.conf").exists());
    agent.stop().await;
}

// Attack: a generation that fixes a failing one, accepted while every run
// slot is busy. Until it starts, status kept the old run's failure and
// showed it under the new desired generation: `failed` at generation 2
// before generation 2 ran at all. The operator's wait
// (`generation_progress`) reads exactly that as "generation 2 failed".
#[tokio::test]
async fn a_queued_generation_does_not_inherit_the_failure_of_the_one_it_replaces() {
    let device = Device::new();
    let mut agent = device.start_with(|s| s.max_parallel = 1).await;
    let failing = json!({"type": "test.sleep/v1", "name": "f", "millis": 0, "fail": true});
    agent.offer("web", 1, json!([failing]));
    agent.until_phase("web", 1, Phase::Failed).await;
    agent.offer("busy", 1, json!([sleep("busy", 3000)]));
    agent
        .until("busy running", |s| {
            s.deployments.get(&name("busy")).is_some_and(|d| d.current_score.is_some())
        })
        .await;
    agent.offer("web", 2, json!([file("/web", "fixed")]));
    let status = agent.until("web g2 seen", |s| s.deployments[&name("web")].desired_generation == 2).await;
    let web = &status.deployments[&name("web")];
    assert_ne!(web.phase, Phase::Failed, "generation 2 has not run yet: {web:?}");
    agent.applied("web", 2).await;
    agent.stop().await;
}

// Attack: the disk is full when a deployment with nothing to undo is
// deleted. The delete could not be saved (`persist_failed`), and as the
// deployment had no work left its save was never retried: `failed`
// forever, and its record on disk still held the deleted document, which
// the next start would run again.
#[tokio::test]
async fn a_delete_that_could_not_be_saved_is_saved_once_the_disk_recovers() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("cleanup", 1, json!([absent_file("/stale")]));
    agent.applied("cleanup", 1).await;
    let records = device.state().join("deployments");
    let moved = device.state().join("moved");
    std::fs::rename(&records, &moved).unwrap();
    std::fs::write(&records, b"not a folder").unwrap();
    agent.delete("cleanup");
    agent
        .until("delete not persisted", |s| {
            s.deployments[&name("cleanup")].error.as_ref().is_some_and(|e| e.kind == ErrorKind::PersistFailed)
        })
        .await;
    std::fs::remove_file(&records).unwrap();
    std::fs::rename(&moved, &records).unwrap();
    agent
        .until("cleanup pruned", |s| {
            s.deployments.get(&name("cleanup")).is_none_or(|d| d.phase == Phase::Pruned)
        })
        .await;
    agent.stop().await;
    let loaded = Store::open(&device.state()).unwrap().load_all().unwrap();
    let record = loaded.iter().find(|(n, _)| n.as_str() == "cleanup").unwrap().1.as_ref().unwrap();
    assert!(record.document.is_none(), "the deleted document is still on disk");
}

// Attack: a record copied in the state folder under another deployment's
// name (`cp web.state web-old.state`, a backup kept in place). At boot the
// copy ran web's document as deployment `web-old`, owning web's resources
// too (boot checks no conflict); the source then reported `web-old`'s key
// as deleted and its prune removed the file `web` still wants.
#[tokio::test]
async fn a_record_copied_under_another_name_does_not_prune_the_original() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("web", 1, json!([file("/a", "web's")]));
    agent.applied("web", 1).await;
    agent.stop().await;
    let records = device.state().join("deployments");
    std::fs::copy(records.join("web.state"), records.join("web-old.state")).unwrap();

    let mut agent = device.start().await;
    agent.applied("web", 1).await;
    agent.delete("web-old"); // its key does not exist
    agent.offer("marker", 1, json!([file("/marker", "x")]));
    agent.applied("marker", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(read(&device.root("/a")), "web's", "the copy's prune removed web's file");
    agent.stop().await;
}

// Issue 7 §5: the device owner's policy holds whatever a document says:
// tags and paths outside it refuse the whole document before anything runs,
// also through a symlinked directory that leads out of an allowed path.
#[tokio::test]
async fn a_score_outside_the_device_policy_refuses_the_whole_document() {
    let device = Device::new();
    std::fs::create_dir_all(device.root("/etc/app")).unwrap();
    std::os::unix::fs::symlink("..", device.root("/etc/app/up")).unwrap();
    let mut agent = device
        .start_with(|s| {
            s.policy = crate::DevicePolicy {
                allowed_tags: Some(["harmony.file/v1".to_owned()].into()),
                allowed_paths: vec!["/etc/app".to_owned()],
                ..Default::default()
            };
        })
        .await;
    agent.offer("ok", 1, json!([file("/etc/app/conf", "x")]));
    agent.applied("ok", 1).await;
    for (deployment, scores, what) in [
        ("tag", json!([file("/etc/app/a", "x"), dir_score("/etc/app/d")]), "harmony.directory/v1"),
        ("path", json!([file("/etc/app/b", "x"), file("/etc/passwd", "x")]), "path:/etc/passwd"),
        ("prefix", json!([file("/etc/application", "x")]), "path:/etc/application"),
        ("link", json!([file("/etc/app/up/shadow", "x")]), "on the device: /etc/shadow"),
    ] {
        agent.offer(deployment, 1, scores);
        let status = agent.until_phase(deployment, 1, Phase::Rejected).await;
        let error = status.error.unwrap();
        assert_eq!(error.kind, ErrorKind::PolicyDenied, "{deployment}: {}", error.message);
        assert!(error.message.contains(what), "{deployment}: {}", error.message);
    }
    for path in ["/etc/app/a", "/etc/app/d", "/etc/app/b", "/etc/passwd", "/etc/application", "/etc/shadow"] {
        assert!(!device.root(path).exists(), "{path} was written");
    }
    agent.stop().await;

    // An allowed path is itself resolved: on a merged-/usr device,
    // `/lib/firmware` allows `/lib/firmware/x`, which is `/usr/lib/firmware/x`.
    std::fs::create_dir_all(device.root("/usr/lib/firmware")).unwrap();
    std::os::unix::fs::symlink("usr/lib", device.root("/lib")).unwrap();
    let mut agent = device
        .start_with(|s| {
            s.policy =
                crate::DevicePolicy { allowed_paths: vec!["/lib/firmware".into()], ..Default::default() }
        })
        .await;
    agent.offer("fw", 1, json!([file("/lib/firmware/blob", "x")]));
    agent.applied("fw", 1).await;
    assert_eq!(read(&device.root("/usr/lib/firmware/blob")), "x");
    agent.stop().await;
}

// Issue 7 §5: whether a setuid or setgid mode may be set is the device
// owner's decision. Without `allow_setuid` a document with such a Score is
// refused whole (`policy_denied`, naming the Score, its tag and the
// privilege) before anything of it runs; with it, the mode is set exactly.
// An accepted one stops running when the policy no longer allows it.
#[tokio::test]
async fn a_setuid_mode_runs_only_where_the_device_policy_allows_it() {
    use std::os::unix::fs::PermissionsExt;
    let device = Device::new();
    let setuid = json!({"type": "harmony.file/v1", "path": "/usr/bin/tool", "content": "#!", "mode": 0o4755});
    let setgid_dir = json!({"type": "harmony.directory/v1", "path": "/srv/shared", "mode": 0o2770});
    let mut agent = device.start().await;
    for (deployment, scores, index) in [
        ("tool", json!([file("/first", "x"), setuid.clone()]), "#1 (harmony.file/v1)"),
        ("shared", json!([setgid_dir.clone(), file("/second", "x")]), "#0 (harmony.directory/v1)"),
    ] {
        agent.offer(deployment, 1, scores);
        let status = agent.until_phase(deployment, 1, Phase::Rejected).await;
        let error = status.error.unwrap();
        assert_eq!(error.kind, ErrorKind::PolicyDenied, "{}", error.message);
        for part in [index, "setuid_mode", "allow_setuid"] {
            assert!(error.message.contains(part), "{part:?} missing: {}", error.message);
        }
        assert_eq!(status.observed_generation, 0);
    }
    for path in ["/first", "/usr/bin/tool", "/srv/shared", "/second"] {
        assert!(!device.root(path).exists(), "{path} was written");
    }
    agent.stop().await;

    let allowing = |s: &mut ControllerSettings| s.policy.allow_setuid = true;
    let mut agent = device.start_with(allowing).await;
    agent.offer("tool", 2, json!([file("/first", "x"), setuid]));
    agent.offer("shared", 2, json!([setgid_dir, file("/second", "x")]));
    agent.applied("tool", 2).await;
    agent.applied("shared", 2).await;
    let mode = |path: &str| std::fs::metadata(device.root(path)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("/usr/bin/tool"), 0o4755);
    assert_eq!(mode("/srv/shared"), 0o2770);
    agent.stop().await;

    // The policy narrowed again: the accepted document stays owned, not run.
    std::fs::remove_file(device.root("/usr/bin/tool")).unwrap();
    let mut agent = device.start().await;
    let tool = agent.until_phase("tool", 2, Phase::Failed).await;
    assert_eq!(tool.error.unwrap().kind, ErrorKind::PolicyDenied);
    assert!(!device.root("/usr/bin/tool").exists(), "drift repair ran a document the policy refuses");
    agent.stop().await;
}

// Issue 8 §1: a container's bind-mount sources are paths on the device
// too: the device's allowed paths judge them as they judge a file's path
// (symlinked parents resolved), or a container could mount what no file
// Score may touch.
#[tokio::test]
async fn a_volume_source_outside_the_allowed_paths_is_refused() {
    let device = Device::new();
    std::fs::create_dir_all(device.root("/srv/app")).unwrap();
    std::fs::create_dir_all(device.root("/etc")).unwrap();
    std::os::unix::fs::symlink("../../etc", device.root("/srv/app/up")).unwrap();
    let narrow = |s: &mut ControllerSettings| {
        s.policy = crate::DevicePolicy { allowed_paths: vec!["/srv/app".into()], ..Default::default() }
    };
    let mut agent = device.start_with(narrow).await;
    let container = |source: &str| {
        json!({"type": "harmony.podman.container/v1", "name": "c", "image": "localhost/x:y",
               "volumes": [{"host_path": source, "container_path": "/data"}]})
    };
    for (deployment, source, named) in
        [("etc", "/etc", "path:/etc"), ("linked", "/srv/app/up/shadow", "on the device: /etc/shadow")]
    {
        agent.offer(deployment, 1, json!([file("/srv/app/a", "x"), container(source)]));
        let status = agent.until_phase(deployment, 1, Phase::Rejected).await;
        let error = status.error.unwrap();
        assert_eq!(error.kind, ErrorKind::PolicyDenied, "{}", error.message);
        assert!(error.message.contains(named), "{deployment}: {}", error.message);
    }
    assert!(!device.root("/srv/app/a").exists(), "a refused document ran");
    agent.stop().await;
}

// Review finding: an accepted document was never checked again. A key
// removed from the trusted set, a narrowed policy, or a passed expiry did
// not stop it: every restart and drift repair ran it again.
#[tokio::test]
async fn an_accepted_document_is_checked_again_before_every_run() {
    use harmony_score_wire::{DocumentSigner, TrustedKeys};
    let device = Device::new();
    let key = DocumentSigner::from_seed([5; 32]);
    let trusting = |s: &mut ControllerSettings| {
        s.trust = TrustedKeys::new(vec![DocumentSigner::from_seed([5; 32]).verifying_key()], 1);
        s.allow_unsigned = false;
    };
    let mut agent = device.start_with(trusting).await;
    agent.offer_bytes("web", key.sign(doc("web", 1, json!([file("/srv/web", "v1")]))));
    agent.applied("web", 1).await;
    agent.stop().await;

    // The key is no longer trusted: the document stays owned, is not run.
    std::fs::remove_file(device.root("/srv/web")).unwrap();
    let mut agent = device
        .start_with(|s| {
            s.trust = TrustedKeys::new(vec![DocumentSigner::from_seed([6; 32]).verifying_key()], 1);
            s.allow_unsigned = false;
        })
        .await;
    let web = agent.until_phase("web", 1, Phase::Failed).await;
    assert_eq!(web.error.unwrap().kind, ErrorKind::BadSignature);
    assert!(!device.root("/srv/web").exists(), "drift repair ran an untrusted document");
    agent.stop().await;

    // A narrowed policy.
    let mut agent = device
        .start_with(|s| {
            trusting(s);
            s.policy = crate::DevicePolicy { allowed_paths: vec!["/etc".into()], ..Default::default() };
        })
        .await;
    let web = agent.until_phase("web", 1, Phase::Failed).await;
    assert_eq!(web.error.unwrap().kind, ErrorKind::PolicyDenied);
    assert!(!device.root("/srv/web").exists());
    agent.stop().await;

    // Trusted again and inside the policy: it runs (and repairs the drift).
    let mut agent = device.start_with(trusting).await;
    agent.applied("web", 1).await;
    assert_eq!(read(&device.root("/srv/web")), "v1");

    // A document accepted before its expiry stops running once it passes.
    let expires_at = harmony_score_wire::now_ms() / 1000 + 2;
    let mut expiring: DesiredState =
        serde_json::from_value(json!({"device_id": "dev-1", "deployment": "web",
        "generation": 2, "expires_at": expires_at, "scores": [file("/srv/web", "v2")]}))
        .unwrap();
    expiring.issued_at = 0;
    agent.offer_bytes("web", key.sign(encode(&expiring).unwrap()));
    agent.applied("web", 2).await;
    while harmony_score_wire::now_ms() / 1000 <= expires_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::remove_file(device.root("/srv/web")).unwrap();
    let (reply, answer) = oneshot::channel();
    agent.inbox.command(Command::ReconcileNow { reply });
    tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
    let web = agent.until_phase("web", 2, Phase::Failed).await;
    assert_eq!(web.error.unwrap().kind, ErrorKind::Expired);
    assert!(!device.root("/srv/web").exists());
    agent.stop().await;
}

// Review finding: every run that held rewrote (and fsynced) the record,
// because its `last_applied_at_ms` moved: one fsync per deployment per
// resync. A drift repair that changes nothing the record says writes nothing.
#[tokio::test]
async fn a_drift_repair_that_holds_does_not_rewrite_the_record() {
    use std::os::unix::fs::MetadataExt;
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("web", 1, json!([file("/web", "one")]));
    agent.applied("web", 1).await;
    let record = device.state().join("deployments/web.state");
    let inode = std::fs::metadata(&record).unwrap().ino();
    let n = name("web");
    // A rerun that finds nothing to do (NOOP), then one that repairs drift
    // (SUCCESS): each is a distinct status, so the waits cannot be satisfied early.
    for (drift, outcome) in [(false, InterpretStatus::NOOP), (true, InterpretStatus::SUCCESS)] {
        if drift {
            std::fs::write(device.root("/web"), "drifted").unwrap();
        }
        let (reply, answer) = oneshot::channel();
        agent.inbox.command(Command::ReconcileNow { reply });
        tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
        agent
            .until(&format!("a rerun reporting {outcome:?}"), |s| {
                s.deployments.get(&n).is_some_and(|d| {
                    d.current_score.is_none() && d.scores.first().is_some_and(|sc| sc.status == outcome)
                })
            })
            .await;
        assert_eq!(read(&device.root("/web")), "one");
        assert_eq!(
            std::fs::metadata(&record).unwrap().ino(),
            inode,
            "the record was rewritten ({outcome:?})"
        );
    }
    agent.stop().await;
}

mod keysets {
    use harmony_score_wire::{DocumentSigner, KeySet, TrustedKeys};

    use super::*;

    fn key(n: u8) -> DocumentSigner {
        DocumentSigner::from_seed([n; 32])
    }

    const ROOT: u8 = 100;

    /// Trusts key 1 by configuration, and key sets signed by the root.
    fn rooted(s: &mut ControllerSettings) {
        s.trust = TrustedKeys::new(vec![key(1).verifying_key()], 1);
        s.root_keys = TrustedKeys::new(vec![key(ROOT).verifying_key()], 1);
        s.allow_unsigned = false;
    }

    fn keyset(version: u64, expires_at: u64, keys: &[u8], signer: u8) -> Vec<u8> {
        let keys: Vec<_> = keys.iter().map(|n| key(*n).verifying_key()).collect();
        KeySet::new(version, 0, expires_at, 1, &keys).sign(&[&key(signer)])
    }

    fn in_a_day() -> u64 {
        harmony_score_wire::now_ms() / 1000 + 86_400
    }

    fn has_error(s: &AgentStatus, kind: ErrorKind) -> bool {
        s.errors.iter().any(|e| e.kind == kind)
    }

    // Issue 7 §3: rotation without touching devices.
    #[tokio::test]
    async fn a_root_signed_key_set_rotates_the_trusted_keys_and_survives_a_restart() {
        let device = Device::new();
        let mut agent = device.start_with(rooted).await;
        agent.offer_bytes("web", key(1).sign(doc("web", 1, json!([file("/srv/web", "v1")]))));
        agent.applied("web", 1).await;

        // Signed by key 2, which nothing trusts yet.
        agent.offer_bytes("web", key(2).sign(doc("web", 2, json!([file("/srv/web", "v2")]))));
        let web = agent.until_phase("web", 2, Phase::Rejected).await;
        assert_eq!(web.error.unwrap().kind, ErrorKind::BadSignature);
        assert_eq!(read(&device.root("/srv/web")), "v1");

        // The root delegates to key 2: the refused document is offered again
        // by the agent itself (the source does not send it twice) and applies.
        assert!(agent.inbox.keyset(keyset(1, in_a_day(), &[2], ROOT)));
        agent.applied("web", 2).await;
        assert_eq!(read(&device.root("/srv/web")), "v2");
        assert_eq!(agent.status.borrow().keyset_version, Some(1));

        // Key 1 is no longer trusted, configured or not.
        agent.offer_bytes("web", key(1).sign(doc("web", 3, json!([file("/srv/web", "v3")]))));
        let web = agent.until_phase("web", 3, Phase::Rejected).await;
        assert_eq!(web.error.unwrap().kind, ErrorKind::BadSignature);
        assert_eq!(read(&device.root("/srv/web")), "v2");
        agent.stop().await;

        // After a restart the persisted key set is in force: the document
        // signed by key 2 passes its re-check and repairs drift.
        std::fs::remove_file(device.root("/srv/web")).unwrap();
        let mut agent = device.start_with(rooted).await;
        agent.applied("web", 2).await;
        assert_eq!(read(&device.root("/srv/web")), "v2");
        assert_eq!(agent.status.borrow().keyset_version, Some(1));

        // A key set signed by an online key, not the root, is refused.
        assert!(agent.inbox.keyset(keyset(5, in_a_day(), &[1], 2)));
        let s = agent
            .until("a key set refused for its signature", |s| has_error(s, ErrorKind::BadSignature))
            .await;
        assert_eq!(s.keyset_version, Some(1));
        // An older root-signed one too (rollback of keys).
        assert!(agent.inbox.keyset(keyset(0, in_a_day(), &[1], ROOT)));
        let s = agent.until("an older key set refused", |s| has_error(s, ErrorKind::StaleGeneration)).await;
        assert_eq!(s.keyset_version, Some(1));
        // The key holding the accepted key set again clears the refusal.
        assert!(agent.inbox.keyset(keyset(1, in_a_day(), &[2], ROOT)));
        agent.until("the refusal cleared", |s| s.errors.is_empty()).await;
        agent.stop().await;

        // A root the device no longer has: the persisted key set is not used.
        let mut agent = device
            .start_with(|s| {
                rooted(s);
                s.root_keys = TrustedKeys::new(vec![key(101).verifying_key()], 1);
            })
            .await;
        let s =
            agent.until("the persisted key set refused", |s| has_error(s, ErrorKind::StateUnreadable)).await;
        assert_eq!(s.keyset_version, None);
        // Review finding: the configured key 1, which the key set revoked,
        // was trusted again. Nothing is trusted until a valid key set arrives.
        agent.offer_bytes("web", key(1).sign(doc("web", 5, json!([file("/srv/web", "evil")]))));
        let web = agent.until_phase("web", 5, Phase::Rejected).await;
        assert_eq!(web.error.unwrap().kind, ErrorKind::BadSignature);
        assert_eq!(read(&device.root("/srv/web")), "v2");
        agent.stop().await;
    }

    // Issue 7 §3: an expired key set is refused; one that expires refuses
    // new documents while the last accepted generation keeps running.
    #[tokio::test]
    async fn an_expired_key_set_is_refused_and_one_that_expires_stops_new_documents_only() {
        let device = Device::new();
        let mut agent = device.start_with(rooted).await;
        let now = harmony_score_wire::now_ms() / 1000;
        assert!(agent.inbox.keyset(keyset(1, now - 1, &[2], ROOT)));
        let s = agent.until("an expired key set refused", |s| has_error(s, ErrorKind::KeysetExpired)).await;
        assert_eq!(s.keyset_version, None);

        let expires_at = now + 2;
        assert!(agent.inbox.keyset(keyset(2, expires_at, &[2], ROOT)));
        agent.until("key set 2 in force", |s| s.keyset_version == Some(2)).await;
        agent.offer_bytes("web", key(2).sign(doc("web", 1, json!([file("/srv/web", "v1")]))));
        agent.applied("web", 1).await;
        while harmony_score_wire::now_ms() / 1000 <= expires_at {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        agent.offer_bytes("web", key(2).sign(doc("web", 2, json!([file("/srv/web", "v2")]))));
        let web = agent.until_phase("web", 2, Phase::Rejected).await;
        assert_eq!(web.error.unwrap().kind, ErrorKind::KeysetExpired);
        assert_eq!(web.observed_generation, 1);
        let s = agent.status.borrow().clone();
        assert!(has_error(&s, ErrorKind::KeysetExpired), "{:?}", s.errors);
        // What was accepted under it still runs: drift is repaired.
        std::fs::remove_file(device.root("/srv/web")).unwrap();
        let (reply, answer) = oneshot::channel();
        agent.inbox.command(Command::ReconcileNow { reply });
        tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
        agent.until("drift repaired", |_| device.root("/srv/web").exists()).await;
        assert_eq!(read(&device.root("/srv/web")), "v1");
        // A newer key set lifts the freeze, and the refused document applies.
        assert!(agent.inbox.keyset(keyset(3, in_a_day(), &[2], ROOT)));
        agent.applied("web", 2).await;
        assert_eq!(read(&device.root("/srv/web")), "v2");
        agent.stop().await;
    }
}

// Issue 7 (threat model): a delete marker carries no signature, so whoever
// could write the bucket could prune every device. Where documents must be
// signed, only a signed document without Scores retires a deployment.
#[tokio::test]
async fn where_documents_are_signed_only_a_signed_retirement_prunes() {
    use harmony_score_wire::{DocumentSigner, TrustedKeys};
    let device = Device::new();
    let key = DocumentSigner::from_seed([5; 32]);
    let signed_only = |s: &mut ControllerSettings| {
        s.trust = TrustedKeys::new(vec![DocumentSigner::from_seed([5; 32]).verifying_key()], 1);
        s.allow_unsigned = false;
    };
    let mut agent = device.start_with(signed_only).await;
    agent.offer_bytes("web", key.sign(doc("web", 1, json!([file("/srv/web", "v1")]))));
    agent.applied("web", 1).await;

    // A bare delete: refused, nothing pruned, the generation keeps running.
    agent.delete("web");
    let web = agent.until_phase("web", 1, Phase::Rejected).await;
    assert_eq!(web.error.unwrap().kind, ErrorKind::UnsignedDelete);
    assert_eq!(web.observed_generation, 1);
    assert_eq!(read(&device.root("/srv/web")), "v1");

    // The signed retirement prunes, and reads as the same news again.
    let retire = key.sign(doc("web", 2, json!([])));
    agent.offer_bytes("web", retire.clone());
    agent.until_phase("web", 2, Phase::Pruned).await;
    assert!(!device.root("/srv/web").exists());
    agent.offer_bytes("web", retire.clone());
    agent.delete("web");
    agent.stop().await;

    // After a restart the retired deployment is gone from status, its old
    // document is still refused, and a newer one deploys again.
    let mut agent = device.start_with(signed_only).await;
    agent.offer_bytes("web", retire);
    agent.offer_bytes("web", key.sign(doc("web", 1, json!([file("/srv/web", "v1")]))));
    let web = agent.until_phase("web", 2, Phase::Rejected).await;
    assert_eq!(web.error.unwrap().kind, ErrorKind::StaleGeneration);
    assert!(!device.root("/srv/web").exists());
    agent.offer_bytes("web", key.sign(doc("web", 3, json!([file("/srv/web", "v3")]))));
    agent.applied("web", 3).await;
    assert_eq!(read(&device.root("/srv/web")), "v3");
    agent.stop().await;

    // Where unsigned documents are allowed, a delete prunes as before.
    let mut agent = device.start().await;
    agent.delete("web");
    agent.until_phase("web", 3, Phase::Pruned).await;
    assert!(!device.root("/srv/web").exists());
    agent.stop().await;
}

// Review finding: a systemd unit (its ExecStart a command line run as root)
// and a package (maintainer scripts as root) passed a device policy that
// allowed only /srv/app, since neither named a path nor a privilege.
#[tokio::test]
async fn units_and_packages_need_their_privilege_and_units_their_path() {
    let device = Device::new();
    let unit = json!({"type": "harmony.systemd.unit/v1", "name": "x.service",
        "content": "[Service]\nExecStart=/bin/sh -c 'echo pwned >> /etc/passwd'\n"});
    let package = json!({"type": "harmony.package/v1", "name": "hello"});
    let mut agent = device.start().await;
    for (name, score, privilege) in
        [("unit", unit.clone(), "system_service"), ("pkg", package, "package_change")]
    {
        agent.offer(name, 1, json!([score]));
        let d = agent.until_phase(name, 1, Phase::Rejected).await;
        let error = d.error.unwrap();
        assert_eq!(error.kind, ErrorKind::PolicyDenied);
        assert!(error.message.contains(privilege), "{}", error.message);
    }
    agent.stop().await;
    // Allowed as a privilege, the unit file's path is still judged.
    let mut agent = device
        .start_with(|s| {
            s.policy = crate::DevicePolicy {
                allowed_paths: vec!["/srv/app".into()],
                allow_system_services: true,
                ..Default::default()
            }
        })
        .await;
    agent.offer("unit", 2, json!([unit]));
    let d = agent.until_phase("unit", 2, Phase::Rejected).await;
    let error = d.error.unwrap();
    assert_eq!(error.kind, ErrorKind::PolicyDenied);
    assert!(error.message.contains("/etc/systemd/system/x.service"), "{}", error.message);
    assert!(!device.root("/etc/systemd/system/x.service").exists());
    agent.stop().await;
}

// Review finding: undos read back from the state directory were run without
// `validate()`, so an invalid one (a path with `..`, a container name
// `resource()` expects valid) reached code that assumes a validated Score.
#[tokio::test]
async fn an_invalid_undo_read_back_from_disk_is_reported_not_run() {
    let device = Device::new();
    let store = Store::open(&device.state()).unwrap();
    std::fs::write(device.root("/outside-the-plan"), "kept").unwrap();
    let undo = json!({"type": "harmony.file/v1", "path": "/a/../outside-the-plan", "content": "", "state": "absent"});
    let mut bytes = Vec::new();
    ciborium::into_writer(&undo, &mut bytes).unwrap();
    let record = DeploymentRecord {
        owned: vec![crate::store::OwnedResource { resource: ResourceId::path("/x"), undo: bytes }],
        high_water: Some(HighWater { generation: 1, digest: "sha256:00".into() }),
        ..Default::default()
    };
    store.save(&name("gone"), &record).unwrap();
    drop(store);
    let mut agent = device.start().await;
    let status = agent
        .until("the prune reported", |s| {
            s.deployments.get(&name("gone")).is_some_and(|d| d.scores.iter().any(|sc| !sc.is_ok()))
        })
        .await;
    let score = &status.deployments[&name("gone")].scores[0];
    assert!(score.message.contains("cannot run the undo"), "{}", score.message);
    assert_eq!(read(&device.root("/outside-the-plan")), "kept");
    agent.stop().await;
}

// Review, session 6: a document offered while its deployment's previous
// run is still in flight waits for that run to end; the first version let
// a run within a second of the offer skip every check, so a document whose
// expiry passed in between still ran. Its expiry is checked before the run.
#[tokio::test]
async fn a_document_that_expired_while_it_waited_for_a_run_does_not_run() {
    let device = Device::new();
    let mut agent = device.start().await;
    // At .200 of a second s: g1 runs for 1 s (ends at s+1.2, not cancellable).
    while harmony_score_wire::now_ms() % 1000 > 150 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while harmony_score_wire::now_ms() % 1000 < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let s = harmony_score_wire::now_ms() / 1000;
    agent.offer("web", 1, json!([sleep("a", 1000)]));
    agent
        .until("g1 running", |st| {
            st.deployments
                .get(&name("web"))
                .is_some_and(|d| d.current_score.as_deref() == Some("1/1 sleep [a]"))
        })
        .await;
    // At about s.500: g2, valid until s+1 (accepted now), waits for g1's end.
    while harmony_score_wire::now_ms() < s * 1000 + 500 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut expiring: DesiredState =
        serde_json::from_value(json!({"device_id": "dev-1", "deployment": "web",
        "generation": 2, "expires_at": s + 1, "scores": [file("/g2", "ran")]}))
        .unwrap();
    expiring.issued_at = 0;
    agent.offer_bytes("web", encode(&expiring).unwrap());
    let status = agent
        .until("g2 applied or refused", |st| {
            st.deployments.get(&name("web")).is_some_and(|d| {
                d.desired_generation == 2
                    && matches!(d.phase, Phase::Applied | Phase::Failed | Phase::Rejected)
            })
        })
        .await;
    let web = &status.deployments[&name("web")];
    assert!(harmony_score_wire::now_ms() >= (s + 1) * 1000, "g1 ended before g2 expired: timing off");
    assert!(!device.root("/g2").exists(), "g2 ran after it expired at {}: {web:?}", s + 1);
    assert_eq!(web.error.as_ref().map(|e| e.kind), Some(ErrorKind::Expired), "{web:?}");
    agent.stop().await;
}

#[path = "controller_verify_tests.rs"]
mod verify;
