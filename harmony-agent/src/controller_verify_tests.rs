//! Commit or roll back, on a real controller, temp root and state directory: checks that hold commit, a failed check rolls back from disk and is never retried, no good generation fails in place, a restart resumes verification.

use harmony_score_wire::{CheckState, Phase};

use super::*;

const HELLO_SHA: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

/// A document of `web` with `extra` top-level fields (`health`, `health_timeout_s`).
fn gated(generation: u64, scores: Value, extra: Value) -> Vec<u8> {
    let mut value =
        json!({"device_id": "dev-1", "deployment": "web", "generation": generation, "scores": scores});
    for (key, v) in extra.as_object().unwrap() {
        value[key] = v.clone();
    }
    let doc: DesiredState = serde_json::from_value(value).unwrap();
    encode(&doc).unwrap()
}

fn sha_check(path: &str) -> Value {
    json!({"type": "file_sha256", "path": path, "sha256": HELLO_SHA})
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn record_of(device: &Device) -> DeploymentRecord {
    Store::open(&device.state()).unwrap().load_all().unwrap().remove(0).1.unwrap()
}

impl Running {
    async fn phase(&mut self, generation: u64, phase: Phase) -> DeploymentStatus {
        self.until_phase("web", generation, phase).await
    }

    async fn reconcile(&self) -> String {
        let (reply, answer) = oneshot::channel();
        self.inbox.command(Command::ReconcileNow { reply });
        tokio::time::timeout(WAIT, answer).await.unwrap().unwrap()
    }
}

#[tokio::test]
async fn checks_that_hold_commit_the_generation() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("web", 1, json!([file("/etc/app.conf", "v1")]));
    agent.applied("web", 1).await;
    let g2 =
        gated(2, json!([file("/etc/app.conf", "hello")]), json!({"health": [sha_check("/etc/app.conf")]}));
    agent.offer_bytes("web", g2);
    let status = agent.applied("web", 2).await;
    assert_eq!(status.health.len(), 1);
    assert_eq!(status.health[0].state, CheckState::Held, "{:?}", status.health);
    assert!(status.health[0].output.contains("sha256 matches"), "{}", status.health[0].output);
    agent.stop().await;
    let record = record_of(&device);
    assert_eq!((record.observed_generation, record.verifying, record.last_good), (2, None, None));
}

// Issue 11 §2: a failed check re-applies the last good generation from the
// device's own record, prunes what the failed one added, reports the check,
// and never tries the failed generation again: not when its document is
// offered again, not at a resync. A later generation is tried normally.
#[tokio::test]
async fn a_failed_check_rolls_back_and_the_failed_generation_is_never_retried() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("web", 1, json!([file("/etc/app.conf", "v1"), file("/etc/one", "1")]));
    agent.applied("web", 1).await;
    let port = closed_port();
    let tcp = json!({"type": "tcp", "address": format!("127.0.0.1:{port}")});
    let g2 = gated(
        2,
        json!([file("/etc/app.conf", "v2"), file("/etc/two", "2")]),
        json!({"health": [tcp], "health_timeout_s": 1}),
    );
    agent.offer_bytes("web", g2.clone());
    let status = agent.phase(2, Phase::RolledBack).await;
    assert_eq!(status.observed_generation, 1);
    let error = status.error.clone().unwrap();
    assert_eq!(error.kind, ErrorKind::HealthCheckFailed);
    assert!(
        error.message.starts_with(&format!("generation 2 rolled back to generation 1: check tcp 127.0.0.1:{port} (document) failed: connect 127.0.0.1:{port}")),
        "{}",
        error.message
    );
    assert_eq!(status.health[0].state, CheckState::Failed);
    // The rollback run: generation 1's content back, what 2 added pruned.
    let status = agent
        .until("the rollback applied", |s| {
            let scores = &s.deployments[&name("web")].scores;
            scores.iter().any(|sc| sc.resource == "path:/etc/two" && sc.message.starts_with("pruned:"))
        })
        .await;
    assert_eq!(status.deployments[&name("web")].phase, Phase::RolledBack);
    assert_eq!(read(&device.root("/etc/app.conf")), "v1");
    assert_eq!(read(&device.root("/etc/one")), "1");
    assert!(!device.root("/etc/two").exists(), "what generation 2 added was pruned");
    let rolled_back_at = status.deployments[&name("web")].last_attempt_at_ms;

    // The key still holds generation 2: offered again, it changes nothing.
    agent.offer_bytes("web", g2);
    // A resync re-applies generation 1 (drift repair), never 2.
    std::fs::write(device.root("/etc/app.conf"), "drifted").unwrap();
    assert!(agent.reconcile().await.starts_with("reconcile scheduled for 1 deployments"));
    let status = agent
        .until("the resync ran", |s| s.deployments[&name("web")].last_attempt_at_ms > rolled_back_at)
        .await;
    let web = &status.deployments[&name("web")];
    assert_eq!((web.phase, web.desired_generation, web.observed_generation), (Phase::RolledBack, 2, 1));
    assert_eq!(read(&device.root("/etc/app.conf")), "v1", "repaired to generation 1, not 2");
    assert!(!device.root("/etc/two").exists());

    // A later generation is tried normally.
    agent.offer("web", 3, json!([file("/etc/app.conf", "v3")]));
    let status = agent.applied("web", 3).await;
    assert_eq!(status.error, None);
    assert!(status.health.is_empty());
    agent.stop().await;

    // After a restart the record still knows: 2 is refused as stale, not rolled back again.
    let record = record_of(&device);
    assert_eq!(record.health_failure, None, "a newer generation clears it");
    assert_eq!(record.high_water.unwrap().generation, 3);
}

// Issue 11 §2: "With no last good generation, it reports failed and leaves
// the device as it is."
#[tokio::test]
async fn with_no_good_generation_a_failed_check_leaves_the_device_as_it_is() {
    let device = Device::new();
    let mut agent = device.start().await;
    let g1 = gated(
        1,
        json!([file("/etc/app.conf", "v1")]),
        json!({"health": [sha_check("/etc/app.conf")], "health_timeout_s": 1}),
    );
    agent.offer_bytes("web", g1);
    let status = agent.phase(1, Phase::Failed).await;
    assert_eq!(status.observed_generation, 0);
    let error = status.error.unwrap();
    assert_eq!(error.kind, ErrorKind::HealthCheckFailed);
    assert!(error.message.contains("no earlier good generation"), "{}", error.message);
    assert!(error.message.contains("sha256 is "), "{}", error.message);
    assert_eq!(read(&device.root("/etc/app.conf")), "v1", "left as it is");
    // Not run again by a resync: a drifted file stays drifted.
    std::fs::write(device.root("/etc/app.conf"), "drifted").unwrap();
    assert!(agent.reconcile().await.starts_with("reconcile scheduled for 0 deployments"));
    agent.stop().await;
    assert_eq!(read(&device.root("/etc/app.conf")), "drifted");
    // Nor after a restart.
    let mut agent = device.start().await;
    let status = agent.phase(1, Phase::Failed).await;
    assert_eq!(status.error.unwrap().kind, ErrorKind::HealthCheckFailed);
    agent.offer("web", 2, json!([file("/etc/app.conf", "v2")]));
    agent.applied("web", 2).await;
    agent.stop().await;
}

// Issue 11 §2: "A crash or reboot during verifying resumes verification
// after boot. It never silently commits." A restart cuts the verification
// short; the next start applies and verifies again from the record, and
// commits only once the check holds.
#[tokio::test]
async fn a_restart_during_verification_resumes_it_and_never_commits_unchecked() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("web", 1, json!([file("/etc/app.conf", "v1")]));
    agent.applied("web", 1).await;
    let g2 = gated(
        2,
        json!([file("/etc/app.conf", "v2")]),
        json!({"health": [sha_check("/late")], "health_timeout_s": 60}),
    );
    agent.offer_bytes("web", g2);
    agent.phase(2, Phase::Verifying).await;
    agent.stop().await;
    let record = record_of(&device);
    let verifying = record.verifying.clone().expect("persisted before the checks ran");
    assert_eq!((verifying.generation, verifying.interruptions, record.observed_generation), (2, 0, 1));

    let mut agent = device.start().await;
    let status = agent.phase(2, Phase::Verifying).await;
    assert_eq!(status.observed_generation, 1, "not committed by the restart");
    std::fs::write(device.root("/late"), "hello").unwrap();
    let status = agent.applied("web", 2).await;
    assert_eq!(status.health[0].state, CheckState::Held);
    agent.stop().await;
    let record = record_of(&device);
    assert_eq!((record.observed_generation, record.verifying), (2, None));
}

// A generation whose verification keeps being cut short (it crashes the
// agent, say) is given up after MAX_INTERRUPTIONS restarts: rolled back.
#[tokio::test]
async fn a_verification_cut_short_by_too_many_restarts_rolls_back() {
    let device = Device::new();
    let mut agent = device.start().await;
    agent.offer("web", 1, json!([file("/etc/app.conf", "v1")]));
    agent.applied("web", 1).await;
    let g2 = gated(
        2,
        json!([file("/etc/app.conf", "v2")]),
        json!({"health": [sha_check("/never")], "health_timeout_s": 60}),
    );
    agent.offer_bytes("web", g2);
    for _ in 0..=crate::commit::MAX_INTERRUPTIONS {
        agent.phase(2, Phase::Verifying).await;
        agent.stop().await;
        agent = device.start().await;
    }
    let status = agent.phase(2, Phase::RolledBack).await;
    let message = status.error.unwrap().message;
    assert!(message.contains("check verification failed"), "{message}");
    agent
        .until("generation 1 back", |s| {
            s.deployments[&name("web")]
                .scores
                .first()
                .is_some_and(|sc| sc.message.contains("content updated"))
        })
        .await;
    agent.stop().await;
    assert_eq!(read(&device.root("/etc/app.conf")), "v1");
}

// Attack: a file check is a read of the device: the device's allowed
// paths judge it like a Score's path.
#[tokio::test]
async fn a_file_check_outside_the_allowed_paths_is_refused() {
    let device = Device::new();
    let mut agent = device.start_with(|s| s.policy.allowed_paths = vec!["/etc/app".into()]).await;
    let g1 = gated(1, json!([file("/etc/app/conf", "x")]), json!({"health": [sha_check("/etc/shadow")]}));
    agent.offer_bytes("web", g1);
    let status = agent.phase(1, Phase::Rejected).await;
    let error = status.error.unwrap();
    assert_eq!(error.kind, ErrorKind::PolicyDenied);
    assert!(error.message.contains("/etc/shadow"), "{}", error.message);
    agent.stop().await;
}
