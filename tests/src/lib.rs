//! Test harness for end-to-end tests: a real `nats-server` owned by a guard, and the workspace binaries.

pub mod cluster;
pub mod sleep;

pub use cluster::{LeafNode, NatsCluster};
pub use sleep::{sleep_score, SleepScore};

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The nats-server binary: `$HARMONY_NATS_SERVER`, or what
/// `scripts/install-nats-server` installs (pinned, 2.10 or newer).
pub fn nats_server_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("HARMONY_NATS_SERVER") {
            return PathBuf::from(path);
        }
        let script = workspace_root().join("scripts/install-nats-server");
        let out =
            Command::new(&script).stderr(Stdio::inherit()).output().expect("run scripts/install-nats-server");
        assert!(out.status.success(), "scripts/install-nats-server failed");
        PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
    })
}

/// The workspace's root folder.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A workspace binary (`harmony-agent`, `harmony-fleet`) from the same
/// target folder as the running test; built on demand if missing.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe.parent().and_then(Path::parent).expect("target layout").join(name);
    if !path.exists() {
        let release = path.parent().and_then(Path::file_name).is_some_and(|p| p == "release");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", name, "--bin", name])
            .args(release.then_some("--release"))
            .current_dir(workspace_root())
            .status()
            .expect("cargo build");
        assert!(status.success() && path.exists(), "cannot build {name}");
    }
    path
}

/// A free TCP port on loopback (closed again, so a server can take it).
/// Prefer letting the server pick its own port (see [`NatsServer::start`]):
/// between this call and the server's bind another test may take the port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A running `nats-server` with JetStream in a temp store, killed (and its
/// store deleted) on drop.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
    /// Extra configuration (accounts, users), written to a config file.
    config: Option<String>,
}

impl NatsServer {
    /// Starts a server on a free loopback port and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts a server whose configuration file holds `config` (for example
    /// an `accounts { … }` block with per-device users and permissions).
    pub fn start_with_config(config: &str) -> Self {
        Self::start_with(Some(config.to_owned()))
    }

    fn start_with(config: Option<String>) -> Self {
        let store = tempfile::tempdir().expect("store dir");
        // Port 0: the server binds a port of its own choosing and says which
        // in its ports file, so parallel tests never race for one.
        let mut server = Self { child: None, port: 0, store, config };
        server.spawn();
        server
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (its store stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Stops it, waits `down`, and starts it again on the same port with
    /// the same store (a server restart, a short outage).
    pub fn restart_after(&mut self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.spawn();
    }

    /// Starts it again (same port, same store) if it was stopped.
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    fn spawn(&mut self) {
        let ports_dir = self.store.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).expect("ports dir");
        // -1: a random free port (first start); a restart keeps the port.
        let port = if self.port == 0 { "-1".to_owned() } else { self.port.to_string() };
        let mut command = Command::new(nats_server_bin());
        command
            .args(["-js", "-a", "127.0.0.1", "-p", &port, "--ports_file_dir"])
            .arg(&ports_dir)
            .arg("-sd")
            .arg(self.store.path());
        if let Some(config) = &self.config {
            let path = self.store.path().join("server.conf");
            std::fs::write(&path, config).expect("write server config");
            command.arg("-c").arg(path);
        }
        let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        if self.port == 0 {
            self.port = loop {
                if let Some(port) = read_ports_file(&ports_dir) {
                    break port;
                }
                assert!(Instant::now() < deadline, "nats-server wrote no ports file");
                std::thread::sleep(Duration::from_millis(20));
            };
        }
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The client port from the `*.ports` file nats-server writes
/// (`{"nats":["nats://127.0.0.1:PORT"]}`).
fn read_ports_file(dir: &Path) -> Option<u16> {
    let entry = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "ports"))?;
    let value: serde_json::Value = serde_json::from_slice(&std::fs::read(entry.path()).ok()?).ok()?;
    let url = value["nats"].get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `harmony-agent run` process, stopped with SIGTERM (then killed) on drop.
pub struct AgentProcess {
    child: Option<Child>,
    /// Where its log goes.
    pub log: PathBuf,
}

impl AgentProcess {
    /// Starts `harmony-agent run` with `args`, logging to `log`.
    pub fn start(args: &[&str], log: &Path) -> Self {
        Self::start_logging(args, log, "harmony_agent=debug,info")
    }

    /// Like [`AgentProcess::start`], with `HARMONY_LOG` set to `filter`.
    pub fn start_logging(args: &[&str], log: &Path, filter: &str) -> Self {
        Self::start_binary(&workspace_bin("harmony-agent"), args, log, filter)
    }

    /// `bin run ARGS` (an agent binary of another profile), logging at `filter` to `log`.
    pub fn start_binary(bin: &Path, args: &[&str], log: &Path, filter: &str) -> Self {
        let file = std::fs::File::create(log).expect("agent log");
        let child = Command::new(bin)
            .arg("run")
            .args(args)
            .env("HARMONY_LOG", filter)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start harmony-agent");
        Self { child: Some(child), log: log.to_path_buf() }
    }

    /// Sends SIGTERM and waits up to 10 s for the process to exit; returns its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process with SIGKILL (a crash, a power cut) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log so far, for assertion messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long a test waits for anything before it fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// Awaits `f` for at most [`WAIT`]; panics when it takes longer.
pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(WAIT, f).await.expect("timed out")
}

/// The status an agent supporting `tags` would write (`None`: an agent that
/// never reported its info), with the given deployments.
pub fn reported_status(
    device: &harmony_score_wire::DeviceId,
    tags: Option<&[&str]>,
    deployments: std::collections::BTreeMap<
        harmony_score_wire::DeploymentName,
        harmony_score_wire::DeploymentStatus,
    >,
) -> harmony_score_wire::AgentStatus {
    use harmony_score_wire::{now_ms, DeviceInfo, SupportedScore};
    let info = tags.map(|tags| DeviceInfo {
        agent_version: "0.1.0".into(),
        scores: tags
            .iter()
            .map(|t| SupportedScore { tag: (*t).into(), version: "v1".into(), summary: String::new() })
            .collect(),
        ..Default::default()
    });
    harmony_score_wire::AgentStatus {
        device_id: device.clone(),
        agent_version: "0.1.0".into(),
        updated_at_ms: now_ms(),
        heartbeat_at_ms: now_ms(),
        heartbeat_interval_ms: 10_000,
        info,
        deployments,
        instance_id: "test-instance".into(),
        errors: Vec::new(),
        keyset_version: None,
        truncated: false,
    }
}

/// Writes `status` into the real status bucket, as the device's agent would
/// (for operator-side tests that need no agent).
pub async fn report_status(client: &harmony_fleet::FleetClient, status: &harmony_score_wire::AgentStatus) {
    use harmony_score_wire::names::{status_key, AGENT_STATUS_BUCKET};
    within(client.ensure_buckets()).await.expect("buckets");
    let kv = within(client.jetstream().get_key_value(AGENT_STATUS_BUCKET)).await.expect("status bucket");
    let bytes = harmony_score_wire::to_cbor(status);
    within(kv.put(status_key(&status.device_id), bytes.into())).await.expect("status written");
}

/// An agent running in this test process through the library's
/// [`harmony_agent::run`]: what the binary runs, without a process per
/// device, so one test can run hundreds. Stopped (and awaited) by
/// [`InProcessAgent::stop`], aborted on drop.
pub struct InProcessAgent {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), harmony_agent::DaemonError>>>,
}

impl InProcessAgent {
    /// Starts an agent with `config` on the current runtime.
    pub fn start(config: harmony_agent::AgentConfig) -> Self {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(harmony_agent::run(config, async {
            let _ = rx.await;
        }));
        Self { shutdown: Some(tx), task: Some(task) }
    }

    /// Whether the agent's task has ended (an error at start, say).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(tokio::task::JoinHandle::is_finished)
    }

    /// Asks the agent to shut down and waits for it (at most [`WAIT`]).
    pub async fn stop(mut self) -> Result<(), harmony_agent::DaemonError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().expect("running");
        within(task).await.expect("agent task")
    }
}

impl Drop for InProcessAgent {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The configuration of a NATS-following agent for `device`, with its state
/// and root under `dir`, a resync of an hour (convergence must come from
/// the live path, not from the timer) and a heartbeat of `heartbeat_secs`.
pub fn agent_config(
    device: &str,
    nats_url: &str,
    dir: &Path,
    heartbeat_secs: u64,
) -> harmony_agent::AgentConfig {
    std::fs::create_dir_all(dir.join("root")).expect("root dir");
    harmony_agent::ConfigLayer {
        device_id: Some(device.to_owned()),
        nats: Some(vec![nats_url.to_owned()]),
        state_dir: Some(dir.join("state")),
        root: Some(dir.join("root")),
        resync_secs: Some(3600),
        heartbeat_secs: Some(heartbeat_secs),
        allow_unsigned: Some(true),
        ..Default::default()
    }
    .resolve()
    .expect("valid agent config")
}

/// Waits until the status `device` reports satisfies `check`, following
/// every status write through a KV watch with history (an ordered
/// consumer that starts at the key's last stored value), so nothing
/// written in between is missed; panics after [`WAIT`].
///
/// A core subscription plus a read raced here: a status published before
/// the subscription reached the server was not delivered, and the read,
/// served while the stream was still storing it, returned the value before
/// (a core message is no read barrier). The test then waited for a status
/// the agent had written.
pub async fn until_status(
    client: &harmony_fleet::FleetClient,
    device: &harmony_score_wire::DeviceId,
    what: &str,
    check: impl Fn(&harmony_score_wire::AgentStatus) -> bool,
) -> harmony_score_wire::AgentStatus {
    use futures_util::StreamExt;
    use harmony_score_wire::names::{status_key, AGENT_STATUS_BUCKET};
    let mut last = None;
    let waited = tokio::time::timeout(WAIT, async {
        loop {
            // Opening the watch creates a consumer: in a cluster that
            // request fails while the stream elects a leader, so it is
            // tried again (within WAIT), as is a watch that ended.
            let opened = tokio::time::timeout(Duration::from_secs(10), async {
                let kv = client
                    .jetstream()
                    .get_key_value(AGENT_STATUS_BUCKET)
                    .await
                    .map_err(async_nats::Error::from)?;
                kv.watch_with_history(status_key(device)).await.map_err(async_nats::Error::from)
            })
            .await;
            let Ok(Ok(mut writes)) = opened else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            while let Some(entry) = writes.next().await {
                let Ok(entry) = entry else { continue };
                if let Ok(status) = harmony_score_wire::from_cbor::<harmony_score_wire::AgentStatus>(
                    &entry.value,
                    1 << 20,
                    "status",
                ) {
                    if check(&status) {
                        return status;
                    }
                    last = Some(status);
                }
            }
        }
    })
    .await;
    match waited {
        Ok(status) => status,
        Err(_) => panic!("timed out waiting for {device} {what}; last status: {last:#?}"),
    }
}

/// A `FileScore` that writes `content` to `path` (mode left as it is).
pub fn file_score(path: &str, content: &str) -> Box<dyn harmony_score_wire::DeviceScore> {
    Box::new(harmony_scores::FileScore {
        path: path.into(),
        content: content.into(),
        mode: None,
        state: harmony_scores::PresenceState::Present,
    })
}

/// A deployment name (panics on an invalid one: tests spell their own).
pub fn deployment(text: &str) -> harmony_score_wire::DeploymentName {
    harmony_score_wire::DeploymentName::new(text).expect("valid deployment name")
}

/// One real nats-server with the fleet's buckets, an operator client, and
/// a temp folder holding one sub-folder (state + root) per agent.
pub struct Fleet {
    pub nats: NatsServer,
    pub client: harmony_fleet::FleetClient,
    pub dir: tempfile::TempDir,
}

impl Fleet {
    /// Starts a server and creates the buckets.
    pub async fn new() -> Self {
        harmony_scores::ensure_linked();
        let nats = NatsServer::start();
        let client = within(harmony_fleet::FleetClient::connect(&[nats.url()], None))
            .await
            .expect("operator connects");
        within(client.ensure_buckets()).await.expect("buckets");
        Self { nats, client, dir: tempfile::tempdir().expect("temp dir") }
    }

    /// The folder of one agent (`state/` and `root/` beneath it).
    pub fn folder(&self, folder: &str) -> PathBuf {
        self.dir.path().join(folder)
    }

    /// The configuration layer of an agent for `device` in `folder`: this
    /// server, resync and heartbeat an hour away (convergence must come from
    /// the live path), unsigned documents allowed. Edit it, then `resolve()`.
    pub fn layer(&self, device: &str, folder: &str) -> harmony_agent::ConfigLayer {
        let dir = self.folder(folder);
        std::fs::create_dir_all(dir.join("root")).expect("root dir");
        harmony_agent::ConfigLayer {
            device_id: Some(device.to_owned()),
            nats: Some(vec![self.nats.url()]),
            state_dir: Some(dir.join("state")),
            root: Some(dir.join("root")),
            resync_secs: Some(3600),
            heartbeat_secs: Some(3600),
            allow_unsigned: Some(true),
            ..Default::default()
        }
    }

    /// Starts an in-process agent for `device` in `folder`, not waiting for it.
    pub fn agent_in(&self, device: &str, folder: &str) -> InProcessAgent {
        InProcessAgent::start(self.layer(device, folder).resolve().expect("valid agent config"))
    }

    /// Starts an in-process agent for `device` (folder named after it) and
    /// waits until its status shows it online.
    pub async fn agent(&self, device: &harmony_score_wire::DeviceId) -> InProcessAgent {
        let agent = self.agent_in(device.as_str(), device.as_str());
        self.online(device).await;
        agent
    }

    /// `path` beneath the root of the agent in `folder`.
    pub fn root(&self, folder: &str, path: &str) -> PathBuf {
        self.folder(folder).join("root").join(path.trim_start_matches('/'))
    }

    /// Deploys `scores` (tag support not checked) and returns the generation.
    pub async fn deploy(
        &self,
        device: &harmony_score_wire::DeviceId,
        name: &str,
        scores: Vec<Box<dyn harmony_score_wire::DeviceScore>>,
    ) -> u64 {
        let request = harmony_fleet::DeployRequest::new(device.clone(), deployment(name), scores).force(true);
        within(self.client.deploy(request)).await.expect("deploy").generation
    }

    /// Waits until the device's status carries its info.
    pub async fn online(&self, device: &harmony_score_wire::DeviceId) -> harmony_score_wire::AgentStatus {
        until_status(&self.client, device, "online", |s| s.info.is_some()).await
    }

    /// Waits until `name` reports `generation` desired, in `phase`.
    pub async fn reached(
        &self,
        device: &harmony_score_wire::DeviceId,
        name: &str,
        generation: u64,
        phase: harmony_score_wire::Phase,
    ) -> harmony_score_wire::AgentStatus {
        let n = deployment(name);
        until_status(&self.client, device, &format!("{name} {phase:?} at {generation}"), |s| {
            s.deployments.get(&n).is_some_and(|d| d.phase == phase && d.desired_generation == generation)
        })
        .await
    }

    /// Waits until `name` reports `generation` applied (and observed).
    pub async fn applied(
        &self,
        device: &harmony_score_wire::DeviceId,
        name: &str,
        generation: u64,
    ) -> harmony_score_wire::AgentStatus {
        let n = deployment(name);
        until_status(&self.client, device, &format!("{name} applied at {generation}"), |s| {
            s.deployments.get(&n).is_some_and(|d| {
                d.phase == harmony_score_wire::Phase::Applied && d.observed_generation == generation
            })
        })
        .await
    }
}

/// The `harmony-agent run` flags of a test agent: `device`, the server(s)
/// `nats` (comma-separated), its state and root, resync and heartbeat an
/// hour away (convergence must come from the live path), unsigned
/// documents allowed.
pub fn agent_args(device: &str, nats: &str, state: &Path, root: &Path) -> Vec<String> {
    let path = |p: &Path| p.to_str().expect("utf-8 temp path").to_owned();
    [
        "--allow-unsigned",
        "--device-id",
        device,
        "--nats",
        nats,
        "--state-dir",
        &path(state),
        "--root",
        &path(root),
        "--resync",
        "3600",
        "--heartbeat",
        "3600",
    ]
    .map(str::to_owned)
    .to_vec()
}

impl Fleet {
    /// The `harmony-agent run` flags of an agent for `device` in `folder`,
    /// configured like [`Fleet::layer`].
    pub fn agent_args(&self, device: &str, folder: &str) -> Vec<String> {
        let dir = self.folder(folder);
        std::fs::create_dir_all(dir.join("root")).expect("root dir");
        agent_args(device, &self.nats.url(), &dir.join("state"), &dir.join("root"))
    }

    /// Starts the real agent binary for `device` in `folder` with `extra`
    /// flags after [`Fleet::agent_args`] (one of its flags among them
    /// replaces the default), logging at debug to `<folder>/agent-<n>.log`.
    pub fn agent_process(&self, device: &str, folder: &str, extra: &[&str]) -> AgentProcess {
        let mut args = self.agent_args(device, folder);
        for flag in ["--nats", "--resync", "--heartbeat", "--state-dir", "--root"] {
            if extra.contains(&flag) {
                let at = args.iter().position(|a| a == flag).expect("a default flag");
                args.drain(at..at + 2);
            }
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let logs = std::fs::read_dir(self.folder(folder)).map_or(0, |d| {
            d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().ends_with(".log")).count()
        });
        AgentProcess::start(&args, &self.folder(folder).join(format!("agent-{logs}.log")))
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A small seeded random source for fault injection (xorshift64*): the
/// seed is printed by the tests so a failing run can be replayed with
/// `HARMONY_FAULT_SEED`.
pub struct FaultRng(u64);

impl FaultRng {
    /// Seeded from `HARMONY_FAULT_SEED`, else from the clock; prints the seed.
    pub fn from_env(what: &str) -> Self {
        let seed =
            std::env::var("HARMONY_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{what}: HARMONY_FAULT_SEED={seed}");
        Self(seed | 1)
    }

    /// A number in `range`.
    pub fn range(&mut self, range: std::ops::Range<u64>) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let n = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        range.start + n % (range.end - range.start).max(1)
    }

    /// A duration of `range` milliseconds.
    pub fn millis(&mut self, range: std::ops::Range<u64>) -> Duration {
        Duration::from_millis(self.range(range))
    }
}

/// A TCP proxy on loopback in front of a server, which a test can cut (every
/// connection closed, new ones closed at once) and restore: a network
/// partition between one client and a server that stays up for everyone else.
pub struct TcpProxy {
    port: u16,
    open: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts forwarding a free loopback port to `127.0.0.1:target`.
    pub async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let open = std::sync::Arc::new(tokio::sync::watch::Sender::new(true));
        let links = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*links.borrow() {
                    continue; // dropped: closed at once
                }
                let mut cut = links.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self { port, open, task }
    }

    /// `nats://127.0.0.1:<proxy port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl NatsServer {
    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// The image container tests run: busybox-static imported by `scripts/build-test-image`.
pub const TEST_IMAGE: &str = "localhost/harmony-busybox:test";

/// Whether podman can be used: `false`, saying on stderr that `what` is
/// skipped, only when its binary is missing and `HARMONY_REQUIRE_PODMAN` is
/// unset (CI sets it: there a missing podman fails). Builds
/// [`TEST_IMAGE`] when it is not there yet.
pub fn podman_ready(what: &str) -> bool {
    if Command::new("podman").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("HARMONY_REQUIRE_PODMAN").is_none(),
            "HARMONY_REQUIRE_PODMAN is set and no podman binary is on PATH"
        );
        eprintln!(
            "{what} skipped: no podman binary on PATH (scripts/install-podman installs it; CI runs it)"
        );
        return false;
    }
    let present = Command::new("podman").args(["image", "exists", TEST_IMAGE]).status();
    if !present.is_ok_and(|s| s.success()) {
        let script = workspace_root().join("scripts/build-test-image");
        assert!(
            Command::new(script).status().is_ok_and(|s| s.success()),
            "cannot build {TEST_IMAGE} with scripts/build-test-image"
        );
    }
    true
}
