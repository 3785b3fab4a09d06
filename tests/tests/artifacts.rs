//! Artifacts and logs end to end: image archives through the NATS Object Store into podman, and `logs` of managed containers.
//!
//! Needs podman and the test image, as `containers.rs` does (a missing
//! podman binary skips, unless `HARMONY_REQUIRE_PODMAN` is set). Each test
//! commits an image of its own from the test image, saves it and removes
//! it, so the load over NATS is what brings it back, while other tests keep
//! using `localhost/harmony-busybox:test`. (Not a second tag of the test
//! image: podman 4.3 loses tags of one image tagged concurrently.) Agents
//! resync once an hour.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harmony_e2e::{deployment as name, free_port, until_status, within, Fleet, InProcessAgent, WAIT};
use harmony_fleet::{FleetClient, FleetError};
use harmony_score_wire::{AgentStatus, DeviceId, DeviceScore, LogsErrorKind, Phase, MAX_LOG_BYTES};
use harmony_scores::PodmanContainerScore;
use harmony_topology::{InterpretErrorKind, InterpretStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IMAGE: &str = "localhost/harmony-busybox:test";

fn podman(args: &[&str]) -> String {
    let out = Command::new("podman").args(args).output().expect("podman runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn image_present(image: &str) -> bool {
    Command::new("podman").args(["image", "exists", image]).status().unwrap().success()
}

/// A name unique to this test run.
fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("harmony-e2e-{what}-{}-{nanos}", std::process::id())
}

/// A container removed on drop.
struct Container(String);

impl Container {
    fn unique(what: &str) -> Self {
        Self(unique(what))
    }

    fn state(&self) -> String {
        podman(&["container", "inspect", "--format", "{{.State.Status}} {{.Id}}", &self.0])
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "--force", "--ignore", "--time", "0", &self.0]).output();
    }
}

/// An image of its own (committed from the test image: its own id, so no
/// other test touches its names), saved (`podman save`) and removed: only
/// a load can bring it back. It goes on drop.
struct Archive {
    tag: String,
    path: PathBuf,
    sha256: String,
}

impl Archive {
    fn new(dir: &Path, what: &str) -> Self {
        let tag = format!("localhost/harmony-busybox:{}", unique(what).trim_start_matches("harmony-e2e-"));
        let path = dir.join(format!("{what}.tar"));
        let builder = unique(&format!("{what}-build"));
        let run = |args: &[&str]| {
            let out = Command::new("podman").args(args).output().unwrap();
            assert!(out.status.success(), "podman {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&["create", "--name", &builder, IMAGE, "/bin/true"]);
        run(&["commit", "--quiet", &builder, &tag]);
        run(&["rm", &builder]);
        run(&["save", "--quiet", "--output", path.to_str().unwrap(), &tag]);
        run(&["rmi", &tag]);
        assert!(!image_present(&tag));
        let sha256 = sha256_hex(&std::fs::read(&path).unwrap());
        Self { tag, path, sha256 }
    }
}

impl Drop for Archive {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rmi", "--force", &self.tag]).output();
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

async fn http_ok(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").await.ok()?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.ok()?;
        Some(String::from_utf8_lossy(&reply).into_owned())
    };
    let reply = tokio::time::timeout(Duration::from_secs(3), attempt).await.ok().flatten();
    reply.is_some_and(|r| r.lines().next().is_some_and(|l| l.contains(" 200 ")))
}

async fn until_served(port: u16) {
    let deadline = Instant::now() + WAIT;
    while !http_ok(port).await {
        assert!(Instant::now() < deadline, "nothing answered 200 on 127.0.0.1:{port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (at most [`WAIT`]) until `check` holds.
async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An agent for `device`, running `podman` (default: from PATH), once online.
async fn agent(f: &Fleet, device: &DeviceId, podman: Option<&Path>) -> InProcessAgent {
    let mut layer = f.layer(device.as_str(), device.as_str());
    layer.podman = podman.map(Path::to_path_buf);
    let agent = InProcessAgent::start(layer.resolve().unwrap());
    f.online(device).await;
    agent
}

fn cache(f: &Fleet, device: &DeviceId) -> PathBuf {
    f.folder(device.as_str()).join("state/artifacts")
}

async fn put(f: &Fleet, archive: &Archive, name: &str) {
    let put = within(f.client.put_artifact(&archive.path, name, false)).await.unwrap();
    assert_eq!(put.artifact.sha256, archive.sha256);
}

/// busybox httpd from `image`, loaded from the artifact `artifact` of digest `sha256`.
fn web(container: &Container, image: &str, artifact: &str, sha256: &str, port: u16) -> Box<dyn DeviceScore> {
    score(serde_json::json!({
        "type": "harmony.podman.container/v1",
        "name": container.0,
        "image": image,
        "image_archive": {"artifact": artifact, "sha256": sha256},
        "command": ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
        "ports": [format!("127.0.0.1:{port}:8080")],
        "stop_timeout_s": 1,
    }))
}

fn score(json: serde_json::Value) -> Box<dyn DeviceScore> {
    Box::new(serde_json::from_value::<PodmanContainerScore>(json).unwrap())
}

fn first_score(status: &AgentStatus, deployment: &str) -> harmony_score_wire::ScoreStatus {
    status.deployments[&name(deployment)].scores[0].clone()
}

// Issue 8 §2: an image archive uploaded once reaches the device over its
// NATS connection, is loaded, and runs; a redeploy that needs the image
// again takes it from the device's cache without a transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_archive_travels_through_the_object_store_and_is_cached_for_the_next_load() {
    if !harmony_e2e::podman_ready("artifact test") {
        return;
    }
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let agent = agent(&f, &device, None).await;
    let archive = Archive::new(f.dir.path(), "busybox");
    put(&f, &archive, "busybox.tar").await;
    // Uploaded once: a second put sends nothing.
    let again = within(f.client.put_artifact(&archive.path, "busybox.tar", false)).await.unwrap();
    assert!(!again.uploaded);
    let web1 = Container::unique("art");
    let port = free_port();

    let g =
        f.deploy(&device, "app", vec![web(&web1, &archive.tag, "busybox.tar", &archive.sha256, port)]).await;
    let status = f.reached(&device, "app", g, Phase::Applied).await;
    let first = first_score(&status, "app");
    assert_eq!(first.status, InterpretStatus::SUCCESS, "{first:?}");
    assert!(first.message.contains("created and started"), "{}", first.message);
    assert!(
        first.message.contains(&format!("{} loaded from artifact busybox.tar (", archive.tag)),
        "{}",
        first.message
    );
    let size = std::fs::metadata(&archive.path).unwrap().len();
    assert!(first.message.contains(&format!("{size} bytes fetched in ")), "{}", first.message);
    eprintln!("measured: {}", first.message);
    until_served(port).await;
    assert!(image_present(&archive.tag));
    let cached = cache(&f, &device).join(&archive.sha256);
    assert_eq!(std::fs::read(&cached).unwrap(), std::fs::read(&archive.path).unwrap());

    // The image and the container go by hand; a reconcile needs the image
    // again and takes it from the cache.
    podman(&["rm", "--force", "--time", "0", &web1.0]);
    podman(&["rmi", &archive.tag]);
    let last = status.deployments[&name("app")].last_attempt_at_ms;
    within(f.client.reconcile(&device, Duration::from_secs(5))).await.unwrap();
    let status = until_status(&f.client, &device, "app reconciled", |s| {
        s.deployments.get(&name("app")).is_some_and(|d| {
            d.phase == Phase::Applied && d.last_attempt_at_ms > last && d.current_score.is_none()
        })
    })
    .await;
    let again = first_score(&status, "app");
    assert_eq!(again.status, InterpretStatus::SUCCESS, "{again:?}");
    assert!(again.message.contains(&format!("{size} bytes from the cache")), "{}", again.message);
    until_served(port).await;

    assert!(within(f.client.delete(&device, &name("app"))).await.unwrap());
    within(f.client.wait_for_prune(&device, &name("app"), WAIT)).await.unwrap();
    assert_eq!(web1.state(), "");
    agent.stop().await.unwrap();
}

// Issue 8 "Tests that must exist": an archive whose digest is not the one
// the Score names is refused: FAILURE of kind digest_mismatch, nothing
// loaded or cached, and the previous generation's container keeps running.
// Both checks are exercised: the store's announced digest (nothing moves)
// and the bytes themselves (metadata forged to announce the right digest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_digest_is_refused_nothing_is_loaded_and_the_previous_generation_keeps_running() {
    if !harmony_e2e::podman_ready("artifact test") {
        return;
    }
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let _agent = agent(&f, &device, None).await;
    let archive = Archive::new(f.dir.path(), "wrong");
    put(&f, &archive, "busybox.tar").await;
    let web1 = Container::unique("wrong");
    let port = free_port();
    // Generation 1: the test image, present; no archive needed.
    let plain = score(serde_json::json!({
        "type": "harmony.podman.container/v1", "name": web1.0, "image": IMAGE,
        "command": ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
        "ports": [format!("127.0.0.1:{port}:8080")], "stop_timeout_s": 1,
    }));
    let g = f.deploy(&device, "app", vec![plain]).await;
    f.reached(&device, "app", g, Phase::Applied).await;
    until_served(port).await;
    let running = web1.state();
    assert!(running.starts_with("running "), "{running}");

    // Generation 2: a Score naming a digest the artifact does not have.
    let wrong = "f".repeat(64);
    let g = f.deploy(&device, "app", vec![web(&web1, &archive.tag, "busybox.tar", &wrong, port)]).await;
    let status = f.reached(&device, "app", g, Phase::Failed).await;
    let refused = first_score(&status, "app");
    assert_eq!(
        (refused.status, refused.error_kind),
        (InterpretStatus::FAILURE, Some(InterpretErrorKind::DigestMismatch)),
        "{refused:?}"
    );
    assert!(refused.message.contains(&format!("sha256 is {}", archive.sha256)), "{}", refused.message);
    assert_eq!(status.deployments[&name("app")].observed_generation, g - 1);
    assert!(!image_present(&archive.tag), "an archive with the wrong digest was loaded");
    assert_eq!(web1.state(), running, "the previous generation's container was touched");
    assert!(http_ok(port).await);

    // Metadata forged to announce the digest the Score names: the bytes
    // are hashed on the way in and refused all the same.
    forge_announced_digest(&f.client, "busybox.tar", &wrong).await;
    let g = f.deploy(&device, "app", vec![web(&web1, &archive.tag, "busybox.tar", &wrong, port)]).await;
    let status = f.reached(&device, "app", g, Phase::Failed).await;
    let refused = first_score(&status, "app");
    assert_eq!(refused.error_kind, Some(InterpretErrorKind::DigestMismatch), "{refused:?}");
    assert!(!image_present(&archive.tag));
    assert_eq!(web1.state(), running);
    let cache: Vec<_> = std::fs::read_dir(cache(&f, &device))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(cache.is_empty(), "a refused transfer left {cache:?} in the cache");
}

/// Rewrites the artifact's metadata (as a compromised or buggy uploader
/// could) so that it announces `sha256` for unchanged chunks.
async fn forge_announced_digest(client: &FleetClient, artifact: &str, sha256: &str) {
    use base64::Engine as _;
    let store = within(client.artifact_store()).await.unwrap();
    let mut info = within(store.info(artifact)).await.unwrap();
    let bytes: Vec<u8> =
        (0..32).map(|i| u8::from_str_radix(&sha256[2 * i..2 * i + 2], 16).unwrap()).collect();
    info.digest = Some(format!("SHA-256={}", base64::engine::general_purpose::URL_SAFE.encode(bytes)));
    let subject =
        format!("$O.harmony-artifacts.M.{}", base64::engine::general_purpose::URL_SAFE.encode(artifact));
    let mut headers = harmony_fleet::async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    let ack = within(client.jetstream().publish_with_headers(
        subject,
        headers,
        serde_json::to_vec(&info).unwrap().into(),
    ))
    .await
    .unwrap();
    within(std::future::IntoFuture::into_future(ack)).await.unwrap();
}

/// A stand-in `podman` that runs the real one, except that a `load` first
/// says so (the file `started`) and then waits for the file `release`.
/// A podman that writes each call's arguments, one line each, to `calls`.
fn recording_podman(dir: &Path, calls: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("podman");
    let script = format!("#!/bin/sh\necho \"$*\" >> '{}'\nexec podman \"$@\"\n", calls.display());
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn slow_loading_podman(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("podman");
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = load ]; then\n  touch '{started}'\n  while [ ! -e '{release}' ]; do sleep 0.05; done\nfi\nexec podman \"$@\"\n",
        started = dir.join("started").display(),
        release = dir.join("release").display(),
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

// Issue 8 "Tests that must exist": a slow image load does not delay
// another deployment or a ping. The load is held (never released): both
// must land while it is held, and a newer generation of its own
// deployment cancels it (podman killed) and lands without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_load_delays_neither_another_deployment_nor_a_ping() {
    if !harmony_e2e::podman_ready("artifact test") {
        return;
    }
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let wrapper_dir = tempfile::tempdir().unwrap();
    let wrapper = slow_loading_podman(wrapper_dir.path());
    let agent = agent(&f, &device, Some(&wrapper)).await;
    let archive = Archive::new(f.dir.path(), "slow");
    put(&f, &archive, "slow.tar").await;
    let slow = Container::unique("slow");
    f.deploy(&device, "slow", vec![web(&slow, &archive.tag, "slow.tar", &archive.sha256, free_port())]).await;
    let started = wrapper_dir.path().join("started");
    until("the load to start", || started.exists()).await;

    let held = Instant::now();
    let g_fast = f.deploy(&device, "fast", vec![harmony_e2e::file_score("/etc/fast", "not held up\n")]).await;
    let status = f.reached(&device, "fast", g_fast, Phase::Applied).await;
    let fast_took = held.elapsed();
    assert_eq!(
        status.deployments[&name("slow")].phase,
        Phase::Applying,
        "the slow deployment finished first: the test proves nothing"
    );
    let pinged = Instant::now();
    let reply = within(f.client.ping(&device, Duration::from_secs(5))).await.unwrap();
    let ping_took = pinged.elapsed();
    assert!(reply.ok);
    assert!(!image_present(&archive.tag), "the load was not held");
    eprintln!("while a load was held: another deployment applied in {fast_took:?}, a ping answered in {ping_took:?}");
    assert!(fast_took < Duration::from_secs(10) && ping_took < Duration::from_secs(2));

    // A newer generation cancels the held load (podman is killed) and
    // lands without it.
    let superseded = Instant::now();
    let g_new = f
        .deploy(
            &device,
            "slow",
            vec![score(serde_json::json!({
                "type": "harmony.podman.container/v1", "name": slow.0, "image": IMAGE,
                "command": ["/bin/sleep", "600"], "stop_timeout_s": 1,
            }))],
        )
        .await;
    let status = f.reached(&device, "slow", g_new, Phase::Applied).await;
    eprintln!("a newer generation replaced the held load in {:?}", superseded.elapsed());
    assert_eq!(first_score(&status, "slow").status, InterpretStatus::SUCCESS);
    assert!(slow.state().starts_with("running "));
    assert!(!wrapper_dir.path().join("release").exists() && !image_present(&archive.tag));
    agent.stop().await.unwrap();
}

// Issue 8 §5: `logs` returns a managed container's last lines, bounded in
// lines and bytes (with `truncated`), and refuses, with a typed error, a
// container the agent does not manage or that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_bounded_and_refused_for_a_container_the_agent_does_not_manage() {
    if !harmony_e2e::podman_ready("artifact test") {
        return;
    }
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let wrapper_dir = tempfile::tempdir().unwrap();
    let calls = wrapper_dir.path().join("calls");
    let _agent = agent(&f, &device, Some(&recording_podman(wrapper_dir.path(), &calls))).await;
    let printer = Container::unique("printer");
    // 3000 lines of 110 bytes: more than one reply may carry.
    // `done` on stdout too: podman keeps the two streams' order only within each.
    let script = "i=0; while [ $i -lt 3000 ]; do printf 'line %04d %0100d\\n' $i 0; i=$((i+1)); done; echo done; sleep 600";
    let g = f
        .deploy(
            &device,
            "printer",
            vec![score(serde_json::json!({
                "type": "harmony.podman.container/v1", "name": printer.0, "image": IMAGE,
                "command": ["/bin/sh", "-c", script], "stop_timeout_s": 1,
            }))],
        )
        .await;
    f.reached(&device, "printer", g, Phase::Applied).await;
    let deadline = Instant::now() + WAIT;
    let last = loop {
        let reply = within(f.client.logs(&device, &printer.0, 2, Duration::from_secs(10))).await.unwrap();
        if reply.lines.iter().any(|l| l == "done") {
            break reply;
        }
        assert!(Instant::now() < deadline, "{reply:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(last.lines.len(), 2);
    assert!(last.lines[0].starts_with("line 2999 ") && !last.truncated, "{last:?}");
    // One inspection per request (by name: the label and the log file);
    // the runtime's logs call inspected the container a second time (by id).
    let inspections = || {
        let text = std::fs::read_to_string(&calls).unwrap_or_default();
        text.lines().filter(|l| l.starts_with("container inspect")).count()
    };
    let before = inspections();
    within(f.client.logs(&device, &printer.0, 2, Duration::from_secs(10))).await.unwrap();
    assert_eq!(inspections() - before, 1, "{}", std::fs::read_to_string(&calls).unwrap_or_default());

    let all = within(f.client.logs(&device, &printer.0, 10_000, Duration::from_secs(10))).await.unwrap();
    assert!(all.truncated, "{} lines", all.lines.len());
    let bytes: usize = all.lines.iter().map(|l| l.len() + 1).sum();
    assert!(bytes <= MAX_LOG_BYTES && bytes > MAX_LOG_BYTES - 200, "{bytes} bytes");
    assert_eq!(all.lines.last().map(String::as_str), Some("done"));
    // Whole lines only, none lost or joined: conmon logged some of these
    // lines in parts (its reads end inside lines), which podman 4.3 itself
    // prints joined and split.
    let first: usize = all.lines[0].get(5..9).and_then(|n| n.parse().ok()).unwrap_or(usize::MAX);
    let want: Vec<String> =
        (first..3000).map(|i| format!("line {i:04} {:0100}", 0)).chain(["done".into()]).collect();
    assert!(
        all.lines == want,
        "whole lines only: first {:?}, first differing {:?}",
        all.lines[0],
        all.lines.iter().zip(&want).find(|(a, b)| a != b)
    );

    // The CLI prints them.
    let cli = Command::new(harmony_e2e::workspace_bin("harmony-fleet"))
        .args(["--nats", &f.nats.url(), "logs", "dev-1", &printer.0, "--tail", "3"])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    let printed = String::from_utf8_lossy(&cli.stdout);
    assert_eq!(printed.lines().count(), 3, "{printed}");
    assert!(printed.ends_with("done\n"), "{printed}");

    // A container the agent did not create: refused, whatever it holds.
    let foreign = Container::unique("foreign");
    podman(&["run", "-d", "--name", &foreign.0, IMAGE, "/bin/sh", "-c", "echo secret; sleep 600"]);
    let refused = within(f.client.logs(&device, &foreign.0, 10, Duration::from_secs(10))).await.unwrap_err();
    assert!(
        matches!(&refused, FleetError::LogsRefused { kind: Some(LogsErrorKind::NotManaged), .. }),
        "{refused:?}"
    );
    assert!(!refused.to_string().contains("secret"));
    let missing = within(f.client.logs(&device, "harmony-no-such-container", 10, Duration::from_secs(10)))
        .await
        .unwrap_err();
    assert!(
        matches!(missing, FleetError::LogsRefused { kind: Some(LogsErrorKind::NotFound), .. }),
        "{missing:?}"
    );
    let cli = Command::new(harmony_e2e::workspace_bin("harmony-fleet"))
        .args(["--nats", &f.nats.url(), "logs", "dev-1", &foreign.0])
        .output()
        .unwrap();
    assert_eq!(cli.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&cli.stderr).contains("not_managed"),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    // Out of bounds: refused before anything is sent.
    let bad = f.client.logs(&device, &printer.0, 10_001, Duration::from_secs(10)).await.unwrap_err();
    assert!(
        matches!(bad, FleetError::LogsRefused { kind: Some(LogsErrorKind::InvalidRequest), .. }),
        "{bad:?}"
    );
}

// Issue 8 §2 asks for the transfer in the status; this measures it apart
// from podman: the agent's fetch (a direct get per 128 KiB chunk, hashed
// and written to the cache) of a 2 MiB and a 64 MiB artifact, and a reuse
// from the cache. A measurement, not a check:
//   cargo test -p harmony-e2e --test artifacts -- --ignored --nocapture
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn measure_artifact_transfer() {
    use harmony_agent::artifacts::NatsArtifacts;
    use harmony_topology::ArtifactStore;
    let f = Fleet::new().await;
    let js = harmony_fleet::async_nats::jetstream::new(f.client.nats().clone());
    for (name, size) in [("small.bin", 2 << 20), ("large.bin", 64 << 20)] {
        let content: Vec<u8> = (0..size as u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
        let path = f.dir.path().join(name);
        std::fs::write(&path, &content).unwrap();
        let sha = sha256_hex(&content);
        let started = Instant::now();
        within(f.client.put_artifact(&path, name, false)).await.unwrap();
        let put = started.elapsed();
        let mut fetches = Vec::new();
        for run in 0..3 {
            let (store, link) = NatsArtifacts::new(f.dir.path().join(format!("cache-{name}-{run}")), 1 << 30);
            link.connect(js.clone());
            let fetched = within(store.fetch(name, &sha)).await.unwrap();
            fetches.push(fetched.transferred_in.unwrap());
            let started = Instant::now();
            assert!(within(store.fetch(name, &sha)).await.unwrap().transferred_in.is_none());
            if run == 0 {
                eprintln!("{name}: reuse from the cache (rehash) {:?}", started.elapsed());
            }
        }
        let mib_s: Vec<String> = fetches
            .iter()
            .map(|d| format!("{:.0} MiB/s", size as f64 / (1 << 20) as f64 / d.as_secs_f64()))
            .collect();
        eprintln!("{name}: {size} bytes, put {put:?}, fetches {fetches:?} ({})", mib_s.join(", "));
    }
}
