//! The fleet path end to end: a real nats-server, the real `harmony-agent` binary, the operator's `FleetClient`.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use harmony_e2e::{file_score, within, AgentProcess, NatsServer, WAIT};
use harmony_fleet::{DeployRequest, Deployed, FleetClient, FleetError};
use harmony_score_wire::{DeploymentName, DeviceId, DeviceScore, Phase};
use harmony_topology::{
    async_trait, Id, Interpret, InterpretError, InterpretName, InterpretStatus, Inventory,
    LocalDeviceTopology, Outcome, Score, Version,
};
use serde::{Deserialize, Serialize};

/// A Score this test binary knows and the agent binary does not: what an
/// operator newer than its devices would send.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NewerScore {
    path: String,
}

impl Score<LocalDeviceTopology> for NewerScore {
    fn create_interpret(&self) -> Box<dyn Interpret<LocalDeviceTopology>> {
        Box::new(NewerInterpret)
    }
    fn name(&self) -> String {
        format!("newer [{}]", self.path)
    }
}

#[derive(Debug)]
struct NewerInterpret;

#[async_trait]
impl Interpret<LocalDeviceTopology> for NewerInterpret {
    async fn execute(&self, _: &Inventory, _: &LocalDeviceTopology) -> Result<Outcome, InterpretError> {
        Ok(Outcome::success("ran"))
    }
    fn get_name(&self) -> InterpretName {
        InterpretName::Custom("Newer")
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

#[typetag::serde(name = "test.newer/v1")]
impl DeviceScore for NewerScore {
    fn validate(&self) -> Result<(), harmony_score_wire::ScoreValidationError> {
        Ok(())
    }
    fn resource(&self) -> harmony_score_wire::ResourceId {
        harmony_score_wire::ResourceId::named("newer", &self.path).expect("valid resource")
    }
    fn undo(&self) -> Option<Box<dyn DeviceScore>> {
        None
    }
}

/// A Score whose tag holds a newline, a forged log line and a terminal
/// escape: unknown to the agent, which echoes unknown tags in its error.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ForgingScore;

impl Score<LocalDeviceTopology> for ForgingScore {
    fn create_interpret(&self) -> Box<dyn Interpret<LocalDeviceTopology>> {
        Box::new(NewerInterpret)
    }
    fn name(&self) -> String {
        "forging".into()
    }
}

/// The line the tag tries to forge in the agent's log.
const FORGED: &str = "2026-01-01T00:00:00.000000Z  INFO harmony_agent: forged";

#[typetag::serde(name = "evil\n2026-01-01T00:00:00.000000Z  INFO harmony_agent: forged\u{1b}[31m")]
impl DeviceScore for ForgingScore {
    fn validate(&self) -> Result<(), harmony_score_wire::ScoreValidationError> {
        Ok(())
    }
    fn resource(&self) -> harmony_score_wire::ResourceId {
        harmony_score_wire::ResourceId::named("forging", "x").expect("valid resource")
    }
    fn undo(&self) -> Option<Box<dyn DeviceScore>> {
        None
    }
}

struct Fixture {
    nats: NatsServer,
    client: FleetClient,
    dir: tempfile::TempDir,
    device: DeviceId,
}

impl Fixture {
    async fn new() -> Self {
        harmony_scores::ensure_linked();
        let nats = NatsServer::start();
        let client =
            tokio::time::timeout(WAIT, FleetClient::connect(&[nats.url()], None)).await.unwrap().unwrap();
        tokio::time::timeout(WAIT, client.ensure_buckets()).await.unwrap().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        Self { nats, client, dir, device: DeviceId::new("dev-1").unwrap() }
    }

    fn root(&self, path: &str) -> PathBuf {
        self.dir.path().join("root").join(path.trim_start_matches('/'))
    }

    fn start_agent(&self, log: &str) -> AgentProcess {
        self.start_agent_logging(log, "harmony_agent=debug,info")
    }

    /// [`Fixture::start_agent`] with `HARMONY_LOG` set to `filter`.
    fn start_agent_logging(&self, log: &str, filter: &str) -> AgentProcess {
        let root = self.dir.path().join("root");
        let state = self.dir.path().join("state");
        let url = self.nats.url();
        let args = [
            "--allow-unsigned",
            "--device-id",
            self.device.as_str(),
            "--nats",
            &url,
            "--state-dir",
            state.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
            // An hour: everything here must converge through hints, not the timer.
            "--resync",
            "3600",
            "--heartbeat",
            "1",
            "--label",
            "site=lab",
        ];
        AgentProcess::start_logging(&args, &self.dir.path().join(log), filter)
    }

    /// Waits until the agent answers a ping (it then has its subscriptions).
    async fn until_online(&self, agent: &AgentProcess) {
        let ping = async {
            loop {
                if self.client.ping(&self.device, Duration::from_secs(1)).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(WAIT, ping)
            .await
            .unwrap_or_else(|_| panic!("agent never answered:\n{}", agent.log_text()));
    }

    async fn deploy(&self, deployment: &str, scores: Vec<Box<dyn DeviceScore>>) -> Deployed {
        let request =
            DeployRequest::new(self.device.clone(), DeploymentName::new(deployment).unwrap(), scores);
        tokio::time::timeout(WAIT, self.client.deploy(request.force(true))).await.unwrap().unwrap()
    }

    async fn wait_applied(
        &self,
        agent: &AgentProcess,
        deployment: &str,
        deployed: &Deployed,
    ) -> harmony_score_wire::DeploymentStatus {
        let (name, generation) = (DeploymentName::new(deployment).unwrap(), deployed.generation);
        self.client
            .wait_for_generation(&self.device, &name, generation, Some(&deployed.digest), WAIT)
            .await
            .unwrap_or_else(|e| panic!("generation {generation} not applied: {e:?}\n{}", agent.log_text()))
    }
}

fn statuses(status: &harmony_score_wire::DeploymentStatus) -> Vec<InterpretStatus> {
    status.scores.iter().map(|s| s.status).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_applies_redeploy_is_noop_update_converges_delete_prunes() {
    let f = Fixture::new().await;
    let agent = f.start_agent("agent.log");
    f.until_online(&agent).await;

    let g1 = f
        .deploy("web", vec![file_score("/etc/web.conf", "port = 80\n"), file_score("/etc/motd", "hi\n")])
        .await;
    let status = f.wait_applied(&agent, "web", &g1).await;
    assert_eq!(statuses(&status), [InterpretStatus::SUCCESS, InterpretStatus::SUCCESS]);
    assert_eq!((status.phase, status.observed_generation), (Phase::Applied, g1.generation));
    assert_eq!(std::fs::read_to_string(f.root("/etc/web.conf")).unwrap(), "port = 80\n");
    assert_eq!(status.scores[0].tag, "harmony.file/v1");
    assert_eq!(status.scores[0].resource, "path:/etc/web.conf");

    let g2 = f
        .deploy("web", vec![file_score("/etc/web.conf", "port = 80\n"), file_score("/etc/motd", "hi\n")])
        .await;
    assert_eq!(g2.generation, g1.generation + 1);
    let status = f.wait_applied(&agent, "web", &g2).await;
    assert_eq!(statuses(&status), [InterpretStatus::NOOP, InterpretStatus::NOOP]);

    // Update one file and drop the other: the dropped one is pruned.
    let g3 = f.deploy("web", vec![file_score("/etc/web.conf", "port = 8080\n")]).await;
    let status = f.wait_applied(&agent, "web", &g3).await;
    assert_eq!(std::fs::read_to_string(f.root("/etc/web.conf")).unwrap(), "port = 8080\n");
    assert!(!f.root("/etc/motd").exists());
    assert_eq!(statuses(&status), [InterpretStatus::SUCCESS, InterpretStatus::SUCCESS]);
    assert!(status.scores[1].message.starts_with("pruned:"), "{:?}", status.scores[1]);

    let web = DeploymentName::new("web").unwrap();
    assert!(tokio::time::timeout(WAIT, f.client.delete(&f.device, &web)).await.unwrap().unwrap());
    tokio::time::timeout(WAIT, f.client.wait_for_prune(&f.device, &web, WAIT)).await.unwrap().unwrap();
    assert!(!f.root("/etc/web.conf").exists());
    let (status, _) = f.client.device_status(&f.device).await.unwrap().unwrap();
    assert_eq!(status.deployments[&web].phase, Phase::Pruned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_started_later_reads_current_values_and_a_restart_resumes_without_changes() {
    let f = Fixture::new().await;
    let g1 = f.deploy("app", vec![file_score("/srv/app/config", "v1\n")]).await;

    let mut agent = f.start_agent("agent-1.log");
    let status = f.wait_applied(&agent, "app", &g1).await;
    assert_eq!(statuses(&status), [InterpretStatus::SUCCESS]);
    let before = std::fs::metadata(f.root("/srv/app/config")).unwrap();
    let (old, _) = f.client.device_status(&f.device).await.unwrap().unwrap();
    let first_start = old.info.map(|i| i.started_at_ms);
    assert_eq!(agent.stop(), Some(0), "{}", agent.log_text());

    let agent = f.start_agent("agent-2.log");
    f.until_online(&agent).await;
    // The restarted agent reports the persisted generation again, all NOOP.
    let fresh = async {
        loop {
            if let Some((status, _)) = f.client.device_status(&f.device).await.unwrap() {
                let started = status.info.as_ref().map(|i| i.started_at_ms);
                if started != first_start
                    && status.deployments.contains_key(&DeploymentName::new("app").unwrap())
                {
                    return status;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let status = tokio::time::timeout(WAIT, fresh).await.unwrap();
    let app = &status.deployments[&DeploymentName::new("app").unwrap()];
    assert_eq!((app.phase, app.observed_generation), (Phase::Applied, g1.generation));
    assert_eq!(statuses(app), [InterpretStatus::NOOP]);
    let after = std::fs::metadata(f.root("/srv/app/config")).unwrap();
    assert_eq!(
        (before.ino(), before.mtime_nsec(), before.mtime()),
        (after.ino(), after.mtime_nsec(), after.mtime())
    );
    assert!(agent.log_text().contains("applying persisted desired state"), "{}", agent.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_written_right_after_a_server_restart_is_applied() {
    let mut f = Fixture::new().await;
    let agent = f.start_agent("agent.log");
    f.until_online(&agent).await;
    let g1 = f.deploy("app", vec![file_score("/etc/app", "1")]).await;
    f.wait_applied(&agent, "app", &g1).await;

    f.nats.restart();
    // The operator reconnects too; write as soon as the server takes writes.
    let write = async {
        loop {
            let request = DeployRequest::new(
                f.device.clone(),
                DeploymentName::new("app").unwrap(),
                vec![file_score("/etc/app", "2")],
            );
            match f.client.deploy(request.force(true)).await {
                Ok(deployed) => return deployed,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    };
    let g2 = tokio::time::timeout(WAIT, write).await.unwrap();
    f.wait_applied(&agent, "app", &g2).await;
    assert_eq!(std::fs::read_to_string(f.root("/etc/app")).unwrap(), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_document_is_reported_typed_and_the_previous_generation_keeps_running() {
    let f = Fixture::new().await;
    let agent = f.start_agent("agent.log");
    f.until_online(&agent).await;
    let g1 = f.deploy("app", vec![file_score("/etc/app", "good")]).await;
    f.wait_applied(&agent, "app", &g1).await;

    let g2 = f
        .deploy("app", vec![file_score("/etc/app", "changed"), Box::new(NewerScore { path: "/x".into() })])
        .await;
    let name = DeploymentName::new("app").unwrap();
    let err = f
        .client
        .wait_for_generation(&f.device, &name, g2.generation, Some(&g2.digest), WAIT)
        .await
        .unwrap_err();
    let FleetError::DeploymentFailed { status, .. } = err else { panic!("{err:?}") };
    assert_eq!(
        (status.phase, status.desired_generation, status.observed_generation),
        (Phase::Rejected, g2.generation, g1.generation)
    );
    let error = status.error.as_ref().unwrap();
    assert_eq!(error.kind, harmony_score_wire::ErrorKind::UnknownScoreTags);
    assert!(error.message.contains("test.newer/v1"), "{}", error.message);
    assert_eq!(std::fs::read_to_string(f.root("/etc/app")).unwrap(), "good");

    // A newer good generation replaces the rejected one.
    let g3 = f.deploy("app", vec![file_score("/etc/app", "fixed")]).await;
    let status = f.wait_applied(&agent, "app", &g3).await;
    assert!(status.error.is_none());
    assert_eq!(std::fs::read_to_string(f.root("/etc/app")).unwrap(), "fixed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_answer_drift_is_repaired_and_the_heartbeat_and_info_are_reported() {
    let f = Fixture::new().await;
    let agent = f.start_agent("agent.log");
    f.until_online(&agent).await;
    let reply =
        tokio::time::timeout(WAIT, f.client.ping(&f.device, Duration::from_secs(5))).await.unwrap().unwrap();
    assert!(reply.ok);
    assert_eq!(reply.message, "pong");

    let g1 = f.deploy("app", vec![file_score("/etc/app", "desired")]).await;
    f.wait_applied(&agent, "app", &g1).await;
    std::fs::write(f.root("/etc/app"), "drifted").unwrap();
    let reply = tokio::time::timeout(WAIT, f.client.reconcile(&f.device, WAIT)).await.unwrap().unwrap();
    assert!(reply.ok && reply.message.starts_with("reconcile scheduled for 1 deployments"), "{reply:?}");
    // The reply comes once the run is scheduled, not when it ends.
    harmony_e2e::within(async {
        while std::fs::read_to_string(f.root("/etc/app")).unwrap_or_default() != "desired" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // The heartbeat (its key `<id>.heartbeat`, merged into the operator's
    // view) keeps the device fresh without rewriting the status (the
    // resync timer alone is tested in agent_runner.rs), and the info
    // describes the device.
    let (first, _) = f.client.device_status(&f.device).await.unwrap().unwrap();
    let later = within(async {
        loop {
            let (seen, _) = f.client.device_status(&f.device).await.unwrap().unwrap();
            if seen.heartbeat_at_ms > first.heartbeat_at_ms {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(later.heartbeat_interval_ms, 1000);
    let info = later.info.unwrap();
    assert_eq!(info.labels.get("site").map(String::as_str), Some("lab"));
    assert_eq!(info.arch, std::env::consts::ARCH);
    assert!(
        info.supports("harmony.file/v1")
            && info.supports("harmony.directory/v1")
            && !info.supports("test.newer/v1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_and_rebooted_without_a_server_runs_what_it_last_accepted() {
    let mut f = Fixture::new().await;
    let mut agent = f.start_agent("agent-1.log");
    f.until_online(&agent).await;
    let g1 = f.deploy("app", vec![file_score("/etc/app", "accepted")]).await;
    f.wait_applied(&agent, "app", &g1).await;
    agent.kill();

    // The device loses its network and someone removes the file.
    f.nats.stop();
    std::fs::remove_file(f.root("/etc/app")).unwrap();
    let agent = f.start_agent("agent-2.log");
    let repaired = async {
        while !f.root("/etc/app").exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, repaired)
        .await
        .unwrap_or_else(|_| panic!("not re-applied offline:\n{}", agent.log_text()));
    assert_eq!(std::fs::read_to_string(f.root("/etc/app")).unwrap(), "accepted");
    let local: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.dir.path().join("state/status.json")).unwrap()).unwrap();
    assert_eq!(local["deployments"]["app"]["observed_generation"], g1.generation);

    // When the server is back, the agent reports and follows again.
    f.nats.restart();
    let g2 = f.deploy("app", vec![file_score("/etc/app", "online again")]).await;
    f.wait_applied(&agent, "app", &g2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_key_is_pruned_like_a_deleted_one() {
    let f = Fixture::new().await;
    let agent = f.start_agent("agent.log");
    f.until_online(&agent).await;
    let g1 = f.deploy("app", vec![file_score("/etc/app", "x")]).await;
    f.wait_applied(&agent, "app", &g1).await;

    // Another tool purges the key directly (a PURGE marker, not a DEL).
    let kv = f.client.jetstream().get_key_value("harmony-desired-state").await.unwrap();
    tokio::time::timeout(WAIT, kv.purge("dev-1.app")).await.unwrap().unwrap();
    let app = DeploymentName::new("app").unwrap();
    f.client
        .wait_for_prune(&f.device, &app, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.log_text()));
    assert!(!f.root("/etc/app").exists());
}

// Issue 7 §2: newlines and escapes in document text forged agent log lines.
// Every field the agent logs from outside the process is escaped: a Score
// tag holding a newline, a whole forged log line and an ANSI escape (the
// agent echoes unknown tags in its error) shows up escaped, on one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_cannot_forge_a_line_or_an_escape_in_the_agents_log() {
    let f = Fixture::new().await;
    let agent = f.start_agent_logging("agent.log", "debug");
    f.until_online(&agent).await;
    let g1 = f.deploy("app", vec![file_score("/etc/app", "good"), Box::new(ForgingScore)]).await;
    let name = DeploymentName::new("app").unwrap();
    let err = f
        .client
        .wait_for_generation(&f.device, &name, g1.generation, Some(&g1.digest), WAIT)
        .await
        .unwrap_err();
    let FleetError::DeploymentFailed { status, .. } = err else { panic!("{err:?}") };
    let error = status.error.unwrap();
    assert_eq!(error.kind, harmony_score_wire::ErrorKind::UnknownScoreTags);
    assert!(!error.message.contains(['\n', '\u{1b}']), "status escapes too: {:?}", error.message);
    let log = agent.log_text();
    for line in log.lines() {
        assert!(!line.starts_with(FORGED) && !line.starts_with("2026-01-01"), "a forged line: {line:?}");
    }
    assert!(!log.contains('\u{1b}'), "a raw ESC reached the log:\n{log}");
    assert!(log.contains("evil\\n2026-01-01"), "the rejection was logged, escaped:\n{log}");
}
