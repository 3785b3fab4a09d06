//! Health-gated commit and rollback end to end (issue 11 §1, §2): a real nats-server, real agents (the binary where a crash is needed), real podman for containers.
//!
//! Agents resync once an hour: every change arrives through the live path,
//! and nothing converges by a timer. Every wait is on the status key.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use harmony_e2e::{
    deployment as name, file_score, free_port, until_status, within, workspace_bin, Fleet, WAIT,
};
use harmony_fleet::DeployRequest;
use harmony_score_wire::{AgentStatus, Check, CheckState, DeviceId, DeviceScore, ErrorKind, Phase};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IMAGE: &str = "localhost/harmony-busybox:test";
/// sha256 of "hello".
const HELLO_SHA: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

/// Whether podman can be used (see tests/tests/containers.rs): `false`
/// only when its binary is missing and CI did not require it.
fn podman_ready() -> bool {
    if Command::new("podman").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("HARMONY_REQUIRE_PODMAN").is_none(),
            "HARMONY_REQUIRE_PODMAN is set and no podman binary is on PATH"
        );
        eprintln!("skipped: no podman binary on PATH (scripts/install-podman installs it; CI runs it)");
        return false;
    }
    if !Command::new("podman").args(["image", "exists", IMAGE]).status().expect("podman runs").success() {
        let script = harmony_e2e::workspace_root().join("scripts/build-test-image");
        assert!(
            Command::new(script).status().expect("run build-test-image").success(),
            "cannot build {IMAGE}"
        );
    }
    true
}

/// A container name unique to this run; removed on drop, whatever happened.
struct Container(String);

impl Container {
    fn unique(what: &str) -> Self {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        Self(format!("harmony-e2e-{what}-{}-{nanos}", std::process::id()))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "--force", "--ignore", "--time", "0", &self.0]).output();
    }
}

/// busybox httpd serving on `inside` within the container, published on
/// loopback `port` (to container port 8080): with `inside` other than 8080
/// nothing answers on `port`.
fn web(container: &Container, port: u16, inside: u16) -> serde_json::Value {
    serde_json::json!({
        "type": "harmony.podman.container/v1",
        "name": container.0,
        "image": IMAGE,
        "command": ["/bin/httpd", "-f", "-p", inside.to_string(), "-h", "/www"],
        "ports": [format!("127.0.0.1:{port}:8080")],
        // httpd as PID 1 ignores SIGTERM: every stop waits this long.
        "stop_timeout_s": 1,
    })
}

/// One HTTP/1.0 GET of `/` on loopback `port`: its status line, `None` while nothing answers.
async fn status_line(port: u16) -> Option<String> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").await.ok()?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.ok()?;
        String::from_utf8_lossy(&reply).lines().next().map(str::to_owned)
    };
    tokio::time::timeout(Duration::from_secs(3), attempt).await.ok().flatten()
}

/// Waits (at most [`WAIT`]) until `port` answers 200.
async fn until_served(port: u16) {
    let deadline = Instant::now() + WAIT;
    while !status_line(port).await.is_some_and(|line| line.contains(" 200 ")) {
        assert!(Instant::now() < deadline, "nothing answered 200 on 127.0.0.1:{port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn checks(value: serde_json::Value) -> Vec<Check> {
    serde_json::from_value(value).expect("checks")
}

async fn deploy_checked(
    f: &Fleet,
    device: &DeviceId,
    deployment: &str,
    scores: Vec<Box<dyn DeviceScore>>,
    health: Vec<Check>,
    timeout_s: u64,
) -> u64 {
    let request = DeployRequest::new(device.clone(), name(deployment), scores)
        .health(health, Some(timeout_s))
        .force(true);
    within(f.client.deploy(request)).await.expect("deploy").generation
}

fn deployment_of<'a>(status: &'a AgentStatus, deployment: &str) -> &'a harmony_score_wire::DeploymentStatus {
    &status.deployments[&name(deployment)]
}

// Issue 11, "Tests that must exist": a container whose HTTP check fails
// (its server listens on the wrong port) is rolled back to the previous
// generation, which answers again; status says rolled_back and names the
// check; `harmony-fleet deploy --wait` exits 1 and prints the failing check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_failing_its_http_check_is_rolled_back_and_answers_again() {
    if !podman_ready() {
        return;
    }
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let agent = f.agent(&device).await;
    let container = Container::unique("health");
    let port = free_port();
    let http = checks(
        serde_json::json!([{"type": "http", "url": format!("http://127.0.0.1:{port}/"), "status": 200}]),
    );

    // Generation 1 answers: its checks (the document's, and the container's
    // own container_running for 5 s) hold and it is committed.
    let started = Instant::now();
    let one: Box<dyn DeviceScore> = serde_json::from_value(web(&container, port, 8080)).unwrap();
    let g1 = deploy_checked(&f, &device, "web", vec![one], http.clone(), 20).await;
    let status = f.applied(&device, "web", g1).await;
    let committed_in = started.elapsed();
    let states: Vec<_> =
        deployment_of(&status, "web").health.iter().map(|c| (c.check.clone(), c.state)).collect();
    assert_eq!(
        states,
        [
            (format!("http http://127.0.0.1:{port}/ -> 200"), CheckState::Held),
            (format!("container_running {} (stable 5 s)", container.0), CheckState::Held),
        ]
    );
    until_served(port).await;

    // Generation 2 serves on the wrong port, through the operator's CLI.
    let doc = f.dir.path().join("web-2.json");
    let value = serde_json::json!({"device_id": "dev-1", "deployment": "web", "generation": 1,
        "scores": [web(&container, port, 9090)],
        "health": [{"type": "http", "url": format!("http://127.0.0.1:{port}/"), "status": 200}],
        "health_timeout_s": 8});
    std::fs::write(&doc, serde_json::to_vec(&value).unwrap()).unwrap();
    let started = Instant::now();
    let out = within(
        tokio::process::Command::new(workspace_bin("harmony-fleet"))
            .args(["--nats", &f.nats.url(), "deploy", "--wait", "--timeout", "60"])
            .arg(&doc)
            .output(),
    )
    .await
    .unwrap();
    let rolled_back_in = started.elapsed();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("harmony-fleet deploy --wait:\n{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let check = format!("http http://127.0.0.1:{port}/ -> 200");
    assert!(stdout.contains(&format!("check {check} (document): failed")), "{stdout}");
    assert!(stdout.contains("rolled_back (health_check_failed"), "{stdout}");
    assert!(stdout.contains("rolled back to generation 1"), "{stdout}");

    // Status names the check; the device runs generation 1 again and it answers.
    let status = f.reached(&device, "web", g1 + 1, Phase::RolledBack).await;
    let web_status = deployment_of(&status, "web");
    assert_eq!(web_status.observed_generation, g1);
    let error = web_status.error.clone().unwrap();
    assert_eq!(error.kind, ErrorKind::HealthCheckFailed);
    assert!(error.message.contains(&format!("check {check} (document) failed")), "{}", error.message);
    // Only generation 1's container answers on the port (2's listens inside on 9090).
    let served = Instant::now();
    until_served(port).await;
    let answered_again_in = served.elapsed();
    let command = Command::new("podman")
        .args(["container", "inspect", "--format", "{{json .Config.Cmd}}", &container.0])
        .output()
        .unwrap();
    let command = String::from_utf8_lossy(&command.stdout);
    assert!(
        command.contains("\"8080\"") && !command.contains("9090"),
        "generation 1's spec is back: {command}"
    );
    eprintln!(
        "measured: generation 1 committed in {committed_in:?}; deploy --wait of generation 2 exited 1 after {rolled_back_in:?} (deadline 8 s); port answered again {answered_again_in:?} after the rolled_back status"
    );
    agent.stop().await.unwrap();
}

// Issue 11, "Tests that must exist": a file checksum check that holds commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_checksum_check_that_holds_commits() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let agent = f.agent(&device).await;
    let g1 = f.deploy(&device, "app", vec![file_score("/etc/app.conf", "v1")]).await;
    f.applied(&device, "app", g1).await;
    let sha =
        checks(serde_json::json!([{"type": "file_sha256", "path": "/etc/app.conf", "sha256": HELLO_SHA}]));
    let request = DeployRequest::new(device.clone(), name("app"), vec![file_score("/etc/app.conf", "hello")])
        .health(sha, Some(10))
        .force(true);
    let deployed = within(f.client.deploy(request)).await.unwrap();
    let started = Instant::now();
    let status = within(f.client.wait_for_generation(
        &device,
        &name("app"),
        deployed.generation,
        Some(&deployed.digest),
        WAIT,
    ))
    .await
    .expect("committed");
    eprintln!("measured: committed {:?} after the write", started.elapsed());
    assert_eq!((status.phase, status.observed_generation), (Phase::Applied, deployed.generation));
    assert_eq!(status.health.len(), 1);
    assert_eq!(status.health[0].state, CheckState::Held);
    assert!(status.health[0].output.contains("sha256 matches"), "{}", status.health[0].output);
    assert_eq!(std::fs::read_to_string(f.root("dev-1", "/etc/app.conf")).unwrap(), "hello");
    agent.stop().await.unwrap();
}

/// Waits for the agent process that started after `previous` (a new
/// instance id) to report `generation` of `app` in `phase`.
async fn until_restarted_in(
    f: &Fleet,
    device: &DeviceId,
    previous: &str,
    generation: u64,
    phase: Phase,
    committed_by_mistake: &AtomicBool,
) -> AgentStatus {
    until_status(&f.client, device, &format!("the restarted agent in {phase:?} at {generation}"), |s| {
        let d = s.deployments.get(&name("app"));
        if d.is_some_and(|d| d.observed_generation >= generation && phase != Phase::Applied) {
            committed_by_mistake.store(true, Ordering::SeqCst);
        }
        s.instance_id != previous && d.is_some_and(|d| d.phase == phase && d.desired_generation == generation)
    })
    .await
}

// Issue 11, "Tests that must exist": a crash (SIGKILL of the agent binary)
// during verifying resumes verification after the restart, and ends as the
// checks say: committed once the check holds, rolled back when it never
// does; never committed without checking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_verifying_resumes_verification_after_restart() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let mut agent = f.agent_process("dev-1", "dev-1", &[]);
    f.online(&device).await;
    let g1 = f.deploy(&device, "app", vec![file_score("/etc/app.conf", "v1")]).await;
    f.applied(&device, "app", g1).await;

    // Generation 2 waits for a file nobody has written yet: killed while verifying.
    let ready =
        checks(serde_json::json!([{"type": "file_sha256", "path": "/etc/ready", "sha256": HELLO_SHA}]));
    let g2 = deploy_checked(&f, &device, "app", vec![file_score("/etc/app.conf", "v2")], ready, 60).await;
    let verifying = f.reached(&device, "app", g2, Phase::Verifying).await;
    assert_eq!(deployment_of(&verifying, "app").observed_generation, g1);
    agent.kill();
    let mut agent = f.agent_process("dev-1", "dev-1", &[]);
    let wrong = AtomicBool::new(false);
    let resumed = until_restarted_in(&f, &device, &verifying.instance_id, g2, Phase::Verifying, &wrong).await;
    assert_eq!(deployment_of(&resumed, "app").observed_generation, g1, "not committed by the restart");
    assert!(!wrong.load(Ordering::SeqCst), "committed without its check");
    // The check comes true: committed.
    std::fs::write(f.root("dev-1", "/etc/ready"), "hello").unwrap();
    let committed = f.applied(&device, "app", g2).await;
    assert_eq!(deployment_of(&committed, "app").health[0].state, CheckState::Held);

    // Generation 3 never passes: killed while verifying, it resumes after
    // the restart and is rolled back to 2 when its deadline passes.
    let never =
        checks(serde_json::json!([{"type": "file_sha256", "path": "/etc/never", "sha256": HELLO_SHA}]));
    let g3 = deploy_checked(&f, &device, "app", vec![file_score("/etc/app.conf", "v3")], never, 12).await;
    let verifying = f.reached(&device, "app", g3, Phase::Verifying).await;
    agent.kill();
    let restarted = Instant::now();
    let _agent = f.agent_process("dev-1", "dev-1", &[]);
    let wrong = AtomicBool::new(false);
    until_restarted_in(&f, &device, &verifying.instance_id, g3, Phase::Verifying, &wrong).await;
    let status = until_restarted_in(&f, &device, &verifying.instance_id, g3, Phase::RolledBack, &wrong).await;
    let took = restarted.elapsed();
    assert!(!wrong.load(Ordering::SeqCst), "generation 3 was committed without its check");
    let app = deployment_of(&status, "app");
    assert_eq!(app.observed_generation, g2);
    let error = app.error.clone().unwrap();
    assert!(error.message.contains("file_sha256 /etc/never"), "{}", error.message);
    assert!(error.message.contains("/etc/never does not exist"), "{}", error.message);
    // The resumed verification got its whole deadline again after the restart.
    assert!(took >= Duration::from_secs(12), "{took:?}");
    until_status(&f.client, &device, "generation 2's content back", |_| {
        std::fs::read_to_string(f.root("dev-1", "/etc/app.conf")).is_ok_and(|c| c == "v2")
    })
    .await;
    eprintln!("measured: after the second kill, rolled back {took:?} after the restart (deadline 12 s)");
}
