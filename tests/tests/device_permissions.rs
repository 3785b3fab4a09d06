//! The agent under least-privilege NATS credentials (docs/security.md): it
//! converges and reports using only its own keys and subjects, and those
//! credentials reach nothing of another device.

use std::time::Duration;

use harmony_e2e::{AgentProcess, NatsServer, WAIT};
use harmony_fleet::async_nats::{self, jetstream};
use harmony_fleet::{DeployRequest, FleetClient};
use harmony_score_wire::{DeploymentName, DeviceId, DeviceScore};

/// The authorization `harmony-fleet nats-config` generates, for dev-1 and dev-2.
fn generated() -> harmony_fleet::nats_config::NatsAuthConfig {
    harmony_fleet::nats_config::generate(&[DeviceId::new("dev-1").unwrap(), DeviceId::new("dev-2").unwrap()])
        .expect("random passwords")
}

/// A server running `auth`'s generated configuration, its client port, and
/// the operator connected with the buckets made.
struct Served {
    auth: harmony_fleet::nats_config::NatsAuthConfig,
    /// Stops the server when dropped.
    nats: NatsServer,
    port: String,
    host: String,
    operator: FleetClient,
}

async fn serve(auth: harmony_fleet::nats_config::NatsAuthConfig) -> Served {
    let nats = NatsServer::start_with_config(&auth.server_conf);
    let port = nats.url().rsplit(':').next().unwrap().to_owned();
    let host = format!("127.0.0.1:{port}");
    let operator = tokio::time::timeout(WAIT, FleetClient::connect(&[auth.operator.url(&host)], None))
        .await
        .unwrap()
        .unwrap();
    operator.ensure_buckets().await.unwrap();
    Served { auth, nats, port, host, operator }
}

/// [`serve`] with dev-1, dev-2 and the monitor.
async fn serve_with_monitor() -> Served {
    let devices = [DeviceId::new("dev-1").unwrap(), DeviceId::new("dev-2").unwrap()];
    let roles = harmony_fleet::nats_config::Roles { monitor: true, commander: false };
    serve(harmony_fleet::nats_config::generate_with(&devices, roles).unwrap()).await
}

/// The agent binary as device `device` at `url`, unsigned documents
/// allowed, state and root under `dir`, heartbeat every second, resync an
/// hour away, and, as `nats-config` writes it, trusting the `_R_.` replies
/// commands arrive with through the DEVICES account's service import.
/// The agent and its root.
fn start_agent(dir: &std::path::Path, device: &str, url: &str) -> (AgentProcess, std::path::PathBuf) {
    let (state, root, config) = (dir.join("state"), dir.join("root"), dir.join("agent.toml"));
    std::fs::create_dir_all(&root).unwrap();
    let prefix = harmony_fleet::nats_config::IMPORTED_REPLY_PREFIX;
    std::fs::write(&config, format!("trusted_inbox_prefix = \"{prefix}\"\n")).unwrap();
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--allow-unsigned",
        "--device-id",
        device,
        "--nats",
        url,
        "--state-dir",
        state.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "--heartbeat",
        "1",
        "--resync",
        "3600",
    ];
    (AgentProcess::start(&args, &dir.join("agent.log")), root)
}

fn device_user_with_password(id: &str, password: &str) -> String {
    harmony_fleet::nats_config::device_user(&DeviceId::new(id).unwrap(), password)
}

fn file(path: &str, content: &str) -> Vec<Box<dyn DeviceScore>> {
    vec![harmony_e2e::file_score(path, content)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_device_credentials_converges_and_cannot_reach_another_device() {
    harmony_scores::ensure_linked();
    let auth = generated();
    let nats = NatsServer::start_with_config(&auth.server_conf);
    let port = nats.url().rsplit(':').next().unwrap().to_owned();
    let operator = auth.operator.url(&format!("127.0.0.1:{port}"));
    let dev1_password = auth.devices[0].1.password.clone();
    let client = tokio::time::timeout(WAIT, FleetClient::connect(&[operator], None)).await.unwrap().unwrap();
    client.ensure_buckets().await.unwrap();
    let (dev1, dev2) = (DeviceId::new("dev-1").unwrap(), DeviceId::new("dev-2").unwrap());
    let app = DeploymentName::new("app").unwrap();
    client
        .deploy(DeployRequest::new(dev2.clone(), app.clone(), file("/secret", "dev-2 only")).force(true))
        .await
        .unwrap();
    let g1 = client
        .deploy(DeployRequest::new(dev1.clone(), app.clone(), file("/etc/app", "v1")).force(true))
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let device_url = auth.devices[0].1.url(&format!("127.0.0.1:{port}"));
    let (agent, root) = start_agent(dir.path(), "dev-1", &device_url);
    let status = client.wait_for_generation(&dev1, &app, g1.generation, Some(&g1.digest), WAIT).await;
    assert!(status.is_ok(), "{status:?}\n{}", agent.log_text());
    let g2 =
        client.deploy(DeployRequest::new(dev1.clone(), app.clone(), file("/etc/app", "v2"))).await.unwrap();
    client.wait_for_generation(&dev1, &app, g2.generation, Some(&g2.digest), WAIT).await.unwrap();
    assert_eq!(std::fs::read_to_string(root.join("etc/app")).unwrap(), "v2");
    let reply = client.ping(&dev1, Duration::from_secs(5)).await.unwrap();
    assert!(reply.ok);
    // Heartbeats (its heartbeat key, `<id>.heartbeat`, which its
    // credentials allow) went through: the operator's view moves on.
    let (now, _) = client.device_status(&dev1).await.unwrap().unwrap();
    harmony_e2e::within(async {
        while client.device_status(&dev1).await.unwrap().unwrap().0.heartbeat_at_ms <= now.heartbeat_at_ms {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(!root.join("secret").exists());
    let log = agent.log_text();
    assert!(!log.contains("Permissions Violation"), "the agent stepped outside its permissions:\n{log}");

    // The same credentials, used by hand, reach nothing of dev-2.
    let device = async_nats::ConnectOptions::new()
        .custom_inbox_prefix("_INBOX_dev-1")
        .user_and_password("dev-1".into(), dev1_password)
        .connect(format!("nats://127.0.0.1:{port}"))
        .await
        .unwrap();
    let js = jetstream::ContextBuilder::new().timeout(Duration::from_secs(1)).build(device.clone());
    let desired = js.get_stream_no_info("KV_harmony-desired-state").await.unwrap();
    let own = desired.direct_get_last_for_subject("$KV.harmony-desired-state.dev-1.app").await;
    assert!(own.is_ok(), "{own:?}");
    let other = desired.direct_get_last_for_subject("$KV.harmony-desired-state.dev-2.app").await;
    assert!(other.is_err(), "dev-1 read dev-2's desired state");
    let write = js.publish("$KV.harmony-agent-status.dev-2", "forged".into()).await.unwrap().await;
    assert!(write.is_err(), "dev-1 wrote dev-2's status");
    let mut other_hints = device.subscribe("harmony.hint.dev-2.>").await.unwrap();
    client
        .deploy(DeployRequest::new(dev2.clone(), app.clone(), file("/secret", "dev-2 again")).force(true))
        .await
        .unwrap();
    let leaked =
        tokio::time::timeout(Duration::from_secs(1), futures_util::StreamExt::next(&mut other_hints)).await;
    assert!(!matches!(leaked, Ok(Some(_))), "dev-1 saw dev-2's hints");
    // A compromised device cannot rewrite its own desired state or index,
    // follow the raw bucket subjects, or create a consumer.
    for subject in ["$KV.harmony-desired-state.dev-1.app", "$KV.harmony-desired-state.dev-1._index"] {
        let forged = js.publish(subject, "forged".into()).await.unwrap().await;
        assert!(forged.is_err(), "dev-1 wrote {subject}");
    }
    let consumer = js
        .create_consumer_on_stream(
            jetstream::consumer::pull::Config {
                filter_subject: "$KV.harmony-desired-state.>".into(),
                ..Default::default()
            },
            "KV_harmony-desired-state",
        )
        .await;
    assert!(consumer.is_err(), "dev-1 created a consumer on the desired-state stream");
    let mut raw = device.subscribe("$KV.harmony-desired-state.>").await.unwrap();
    client
        .deploy(
            DeployRequest::new(dev2.clone(), app.clone(), file("/secret", "dev-2 a third time")).force(true),
        )
        .await
        .unwrap();
    let leaked = tokio::time::timeout(Duration::from_secs(1), futures_util::StreamExt::next(&mut raw)).await;
    assert!(!matches!(leaked, Ok(Some(_))), "dev-1 saw a raw desired-state write");
    assert_eq!(
        client.desired_state(&dev1, &app).await.unwrap().map(|d| d.generation),
        Some(g2.generation),
        "dev-1's desired state is the operator's"
    );
    let listing = js.get_key_value("harmony-desired-state").await;
    assert!(listing.is_err(), "dev-1 could read the bucket's stream info (every key name)");
    assert!(client.device_status(&dev2).await.unwrap().is_none());
}

// Issue 7 §1: redaction failed for a password holding `@`, for a URL
// without a scheme, and at HARMONY_LOG=debug, where async-nats printed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_a_url_never_reach_a_log_at_any_level() {
    harmony_scores::ensure_linked();
    const PASSWORD: &str = "p@ss:w0rd-xyzzy";
    let config = format!(
        "accounts {{ FLEET {{ jetstream: enabled, users: [ {{ user: operator, password: \"{PASSWORD}\" }}, {} ] }} }}\n",
        device_user_with_password("dev-1", PASSWORD)
    );
    let nats = NatsServer::start_with_config(&config);
    let port = nats.url().rsplit(':').next().unwrap().to_owned();
    let operator = format!("nats://operator:{PASSWORD}@127.0.0.1:{port}");
    let client = tokio::time::timeout(WAIT, FleetClient::connect(std::slice::from_ref(&operator), None))
        .await
        .unwrap()
        .unwrap();
    client.ensure_buckets().await.unwrap();
    let dev1 = DeviceId::new("dev-1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (i, url) in
        [format!("nats://dev-1:{PASSWORD}@127.0.0.1:{port}"), format!("dev-1:{PASSWORD}@127.0.0.1:{port}")]
            .iter()
            .enumerate()
    {
        let state = dir.path().join(format!("state-{i}"));
        let root = dir.path().join(format!("root-{i}"));
        std::fs::create_dir_all(&root).unwrap();
        let mut agent = AgentProcess::start_logging(
            &[
                "--allow-unsigned",
                "--device-id",
                "dev-1",
                "--nats",
                url,
                "--state-dir",
                state.to_str().unwrap(),
                "--root",
                root.to_str().unwrap(),
            ],
            &dir.path().join(format!("agent-{i}.log")),
            "trace",
        );
        let online = async {
            while client.ping(&dev1, Duration::from_secs(1)).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(WAIT, online)
            .await
            .unwrap_or_else(|_| panic!("agent {i} never answered:\n{}", agent.log_text()));
        agent.stop();
        let log = agent.log_text();
        assert!(log.contains("connected"), "{log}");
        assert!(!log.contains("w0rd"), "the password reached the agent's log ({url}):\n{log}");
    }
    let fleet = std::process::Command::new(harmony_e2e::workspace_bin("harmony-fleet"))
        .args(["--nats", &operator, "devices"])
        .env("HARMONY_LOG", "trace")
        .output()
        .unwrap();
    assert!(fleet.status.success(), "{}", String::from_utf8_lossy(&fleet.stderr));
    let output =
        format!("{}{}", String::from_utf8_lossy(&fleet.stdout), String::from_utf8_lossy(&fleet.stderr));
    assert!(!output.contains("w0rd"), "the password reached the operator's log:\n{output}");
}

// Issue 7 §4: the CLI writes the configuration and one credential file per
// principal, each readable by its owner only, and nats-server runs with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_config_writes_a_working_configuration_and_private_credentials() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("auth");
    let run = std::process::Command::new(harmony_e2e::workspace_bin("harmony-fleet"))
        .args(["nats-config", "--devices", "dev-1,dev-2", "--url", "nats://127.0.0.1:1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for name in ["nats-server.conf", "operator.env", "dev-1.toml", "dev-2.toml"] {
        let mode = std::fs::metadata(out.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    assert!(
        !out.join("monitor.env").exists() && !out.join("commander.env").exists(),
        "roles only on request"
    );
    let roles = dir.path().join("roles");
    let run = std::process::Command::new(harmony_e2e::workspace_bin("harmony-fleet"))
        .args(["nats-config", "--devices", "dev-1", "--monitor", "--commander", "--out"])
        .arg(&roles)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for (name, prefix) in [("monitor.env", "_INBOX_monitor"), ("commander.env", "_INBOX.commander")] {
        let mode = std::fs::metadata(roles.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
        let text = std::fs::read_to_string(roles.join(name)).unwrap();
        assert!(text.contains(&format!("HARMONY_INBOX_PREFIX={prefix}\n")), "{text}");
    }
    let bad = std::process::Command::new(harmony_e2e::workspace_bin("harmony-fleet"))
        .args(["nats-config", "--devices", "Not_An_Id", "--out"])
        .arg(dir.path().join("bad"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "an invalid device id is refused");
    for args in [
        &["--devices", "operator"][..],
        &["--devices", "dev-1,monitor"][..],
        &["--devices", "commander", "--commander"][..],
        &["--devices", "dev-1,dev-1"][..],
        &["--devices", "dev-1", "--url", "nats://h:1\"\nallow_unsigned = true"][..],
        &["--devices", "dev-1", "--url", "nats://$(reboot):1"][..],
    ] {
        let refused = std::process::Command::new(harmony_e2e::workspace_bin("harmony-fleet"))
            .arg("nats-config")
            .args(args)
            .arg("--out")
            .arg(dir.path().join("refused"))
            .output()
            .unwrap();
        assert_eq!(refused.status.code(), Some(2), "{args:?}");
    }
    assert!(!dir.path().join("refused").exists(), "nothing written for a refused request");

    let nats = NatsServer::start_with_config(&std::fs::read_to_string(out.join("nats-server.conf")).unwrap());
    let port = nats.url().rsplit(':').next().unwrap().to_owned();
    let env = std::fs::read_to_string(out.join("operator.env")).unwrap();
    let operator = env
        .trim()
        .strip_prefix("HARMONY_NATS=")
        .unwrap()
        .replace("127.0.0.1:1", &format!("127.0.0.1:{port}"));
    let client = tokio::time::timeout(WAIT, FleetClient::connect(&[operator], None)).await.unwrap().unwrap();
    tokio::time::timeout(WAIT, client.ensure_buckets()).await.unwrap().unwrap();
    let agent_toml = std::fs::read_to_string(out.join("dev-1.toml")).unwrap();
    let layer: harmony_agent::ConfigLayer = toml_like(&agent_toml, &port);
    let url = layer.nats.unwrap().remove(0);
    let (bare, auth) = harmony_score_wire::names::split_url_credentials(&url);
    let (user, password) = auth.unwrap();
    let device = async_nats::ConnectOptions::new()
        .custom_inbox_prefix("_INBOX_dev-1")
        .user_and_password(user, password)
        .connect(bare)
        .await
        .unwrap();
    let js = jetstream::ContextBuilder::new().timeout(Duration::from_secs(1)).build(device);
    let desired = js.get_stream_no_info("KV_harmony-desired-state").await.unwrap();
    let own = desired.direct_get_last_for_subject("$KV.harmony-desired-state.dev-1.app").await;
    assert!(matches!(&own, Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound), "{own:?}");
    let other = desired.direct_get_last_for_subject("$KV.harmony-desired-state.dev-2.app").await;
    assert!(
        other.as_ref().is_err_and(|e| e.kind() != jetstream::stream::DirectGetErrorKind::NotFound),
        "{other:?}"
    );
}

/// A raw connection as a generated principal, with the inbox prefix it
/// must use, and a channel of the server's `Permissions Violation` texts.
async fn connect_as(
    principal: &harmony_fleet::nats_config::Principal,
    port: &str,
    inbox_prefix: &str,
) -> (async_nats::Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::new()
        .custom_inbox_prefix(inbox_prefix)
        .user_and_password(principal.user.clone(), principal.password.clone())
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(async_nats::ServerError::Other(text)) = event {
                    if text.starts_with("Permissions Violation") {
                        let _ = tx.send(text);
                    }
                }
            }
        })
        .connect(format!("nats://127.0.0.1:{port}"))
        .await
        .unwrap();
    (client, rx)
}

/// Every permission violation reported so far, waiting briefly for stragglers.
async fn violations(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> Vec<String> {
    let mut seen = Vec::new();
    while let Ok(Some(text)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        seen.push(text);
    }
    seen
}

/// Whether `sub` receives anything within `wait`.
async fn receives(sub: &mut async_nats::Subscriber, wait: Duration) -> bool {
    matches!(tokio::time::timeout(wait, futures_util::StreamExt::next(sub)).await, Ok(Some(_)))
}

// Issue 7 §4: the read-only monitor reads every status and desired-state
// key, heartbeats, device info and hints, and every write is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_reads_statuses_and_desired_state_and_every_write_is_refused() {
    use harmony_fleet::nats_config::MONITOR_INBOX_PREFIX;
    harmony_scores::ensure_linked();
    let (dev1, dev2) = (DeviceId::new("dev-1").unwrap(), DeviceId::new("dev-2").unwrap());
    let Served { auth, nats: _nats, port, host, operator } = serve_with_monitor().await;
    let app = DeploymentName::new("app").unwrap();
    let g1 = operator
        .deploy(DeployRequest::new(dev1.clone(), app.clone(), file("/etc/app", "v1")).force(true))
        .await
        .unwrap();
    for device in [&dev1, &dev2] {
        harmony_e2e::report_status(
            &operator,
            &harmony_e2e::reported_status(device, Some(&[]), Default::default()),
        )
        .await;
    }

    // Reads: the operator's own client, connected as the monitor.
    let monitor_url = auth.monitor.as_ref().unwrap().url(&host);
    let monitor = FleetClient::connect_with_inbox_prefix(&[monitor_url], None, Some(MONITOR_INBOX_PREFIX))
        .await
        .unwrap();
    let statuses = tokio::time::timeout(WAIT, monitor.list_statuses()).await.unwrap().unwrap();
    assert_eq!(statuses.iter().map(|s| s.device_id.as_str()).collect::<Vec<_>>(), ["dev-1", "dev-2"]);
    let desired = monitor.desired_state(&dev1, &app).await.unwrap().expect("dev-1's desired state");
    assert_eq!(desired.generation, g1.generation);
    let (raw, mut refused) = connect_as(auth.monitor.as_ref().unwrap(), &port, MONITOR_INBOX_PREFIX).await;
    let mut beats = raw.subscribe("harmony.heartbeat.*").await.unwrap();
    let mut infos = raw.subscribe("harmony.info.*").await.unwrap();
    let mut hints = raw.subscribe("harmony.hint.>").await.unwrap();
    raw.flush().await.unwrap();
    let (device, _) = connect_as(&auth.devices[0].1, &port, "_INBOX_dev-1").await;
    device.publish("harmony.heartbeat.dev-1", "1".into()).await.unwrap();
    device.publish("harmony.info.dev-1", "info".into()).await.unwrap();
    device.flush().await.unwrap();
    let g2 = operator
        .deploy(DeployRequest::new(dev1.clone(), app.clone(), file("/etc/app", "v2")).force(true))
        .await
        .unwrap();
    for (what, sub) in [("heartbeat", &mut beats), ("info", &mut infos), ("hint", &mut hints)] {
        assert!(receives(sub, Duration::from_secs(5)).await, "the monitor saw no {what}");
    }
    assert!(violations(&mut refused).await.is_empty(), "reading is allowed");

    // Writes: each refused by the server, the victims unchanged.
    let status_before = operator.device_status(&dev2).await.unwrap().unwrap().1;
    let js = jetstream::ContextBuilder::new().timeout(Duration::from_secs(1)).build(raw.clone());
    for subject in [
        "$KV.harmony-desired-state.dev-1.app",
        "$KV.harmony-desired-state.dev-1._index",
        "$KV.harmony-agent-status.dev-2",
        "$KV.harmony-rollouts.app",
    ] {
        let put = js.publish(subject, "forged".into()).await.unwrap().await;
        assert!(put.is_err(), "the monitor wrote {subject}");
    }
    assert!(js.delete_stream("KV_harmony-agent-status").await.is_err(), "the monitor deleted a stream");
    let stream = js.get_stream("KV_harmony-desired-state").await.expect("stream info is a read");
    assert!(stream.purge().await.is_err(), "the monitor purged a stream");
    let stripped = jetstream::stream::Config { republish: None, ..stream.cached_info().config.clone() };
    assert!(js.update_stream(stripped).await.is_err(), "the monitor updated a stream");
    let consumer = js
        .create_consumer_on_stream(
            jetstream::consumer::pull::Config {
                filter_subject: "$KV.harmony-desired-state.>".into(),
                ..Default::default()
            },
            "KV_harmony-desired-state",
        )
        .await;
    assert!(consumer.is_err(), "the monitor created a consumer");
    let mut commands = device.subscribe("device-commands.dev-1.>").await.unwrap();
    device.flush().await.unwrap();
    let command = raw
        .send_request(
            "device-commands.dev-1.reconcile",
            async_nats::Request::new().timeout(Some(Duration::from_secs(1))),
        )
        .await;
    assert!(command.is_err(), "the monitor sent a command");
    assert!(!receives(&mut commands, Duration::from_millis(500)).await, "a command from the monitor arrived");
    // Nor can it read replies meant for the operator.
    let mut operator_replies = raw.subscribe("_INBOX.>").await.unwrap();
    raw.flush().await.unwrap();
    operator.device_status(&dev1).await.unwrap();
    assert!(
        !receives(&mut operator_replies, Duration::from_millis(500)).await,
        "the monitor read the operator's inbox"
    );

    let seen = violations(&mut refused).await.join("\n");
    for denied in [
        "$KV.harmony-desired-state.dev-1.app",
        "$KV.harmony-agent-status.dev-2",
        "$KV.harmony-rollouts.app",
        "$JS.API.STREAM.DELETE.KV_harmony-agent-status",
        "$JS.API.STREAM.PURGE.KV_harmony-desired-state",
        "$JS.API.STREAM.UPDATE.KV_harmony-desired-state",
        "$JS.API.CONSUMER.CREATE.KV_harmony-desired-state",
        "device-commands.dev-1.reconcile",
        "_INBOX.>",
    ] {
        assert!(seen.contains(denied), "no permission violation for {denied}:\n{seen}");
    }
    assert_eq!(operator.desired_state(&dev1, &app).await.unwrap().map(|d| d.generation), Some(g2.generation));
    assert_eq!(operator.device_status(&dev2).await.unwrap().unwrap().1, status_before);
    let info =
        operator.jetstream().get_stream("KV_harmony-desired-state").await.unwrap().cached_info().clone();
    assert_eq!(info.config.republish, stream.cached_info().config.republish, "the stream is unchanged");
    assert_eq!(info.state.consumer_count, 0);
    assert!(info.state.messages > 0, "nothing purged");
    operator.jetstream().get_stream("KV_harmony-agent-status").await.expect("the status stream still exists");
}

// Issue 7 §4: the command-only role pings and reconciles devices through
// the generated files (its inbox lies beneath the devices' trusted prefix),
// and reads and writes no bucket; the monitor's files run `status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commander_sends_commands_and_reaches_no_bucket() {
    harmony_scores::ensure_linked();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("auth");
    let run = std::process::Command::new(harmony_e2e::workspace_bin("harmony-fleet"))
        .args(["nats-config", "--devices", "dev-1,dev-2", "--monitor", "--commander"])
        .args(["--url", "nats://127.0.0.1:1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let nats = NatsServer::start_with_config(&std::fs::read_to_string(out.join("nats-server.conf")).unwrap());
    let port = nats.url().rsplit(':').next().unwrap().to_owned();
    let read = |name: &str| {
        std::fs::read_to_string(out.join(name)).unwrap().replace("127.0.0.1:1", &format!("127.0.0.1:{port}"))
    };
    let env = |name: &str| -> Vec<(String, String)> {
        read(name)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    };
    let fleet = |env_file: &str, args: &[&str]| {
        std::process::Command::new(harmony_e2e::workspace_bin("harmony-fleet"))
            .args(args)
            .env_remove("HARMONY_NATS")
            .env_remove("HARMONY_INBOX_PREFIX")
            .envs(env(env_file))
            .output()
            .unwrap()
    };
    let operator_url = env("operator.env").remove(0).1;
    let operator =
        tokio::time::timeout(WAIT, FleetClient::connect(&[operator_url], None)).await.unwrap().unwrap();
    operator.ensure_buckets().await.unwrap();
    let (dev1, dev2) = (DeviceId::new("dev-1").unwrap(), DeviceId::new("dev-2").unwrap());
    let app = DeploymentName::new("app").unwrap();
    operator
        .deploy(DeployRequest::new(dev2.clone(), app.clone(), file("/secret", "dev-2 only")).force(true))
        .await
        .unwrap();
    let g1 = operator
        .deploy(DeployRequest::new(dev1.clone(), app.clone(), file("/etc/app", "v1")).force(true))
        .await
        .unwrap();
    let config = dir.path().join("dev-1.toml");
    std::fs::write(&config, read("dev-1.toml")).unwrap();
    let (state, root) = (dir.path().join("state"), dir.path().join("root"));
    std::fs::create_dir(&root).unwrap();
    let agent = AgentProcess::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--allow-unsigned",
            "--state-dir",
            state.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
            "--heartbeat",
            "1",
            "--resync",
            "3600",
        ],
        &dir.path().join("agent.log"),
    );
    let applied = operator.wait_for_generation(&dev1, &app, g1.generation, Some(&g1.digest), WAIT).await;
    assert!(applied.is_ok(), "{applied:?}\n{}", agent.log_text());

    // The generated files work with the stock CLI.
    for verb in ["ping", "reconcile"] {
        let answered = fleet("commander.env", &[verb, "dev-1"]);
        assert!(answered.status.success(), "commander {verb}: {}", String::from_utf8_lossy(&answered.stderr));
    }
    let status = fleet("monitor.env", &["status"]);
    assert!(status.status.success(), "monitor status: {}", String::from_utf8_lossy(&status.stderr));
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("dev-1"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    let ping = fleet("monitor.env", &["ping", "dev-1", "--timeout", "1"]);
    assert_eq!(ping.status.code(), Some(1), "the monitor sent a command");
    // The monitor follows staged rollouts: `rollouts` reads their states
    // without a consumer and without creating anything.
    let listed = fleet("monitor.env", &["rollouts"]);
    assert!(listed.status.success(), "monitor rollouts: {}", String::from_utf8_lossy(&listed.stderr));
    let doc = dir.path().join("app-v3.json");
    let scores = serde_json::json!([{"type": "harmony.file/v1", "path": "/etc/app", "content": "v3"}]);
    let body =
        serde_json::json!({"device_id": "dev-1", "deployment": "app", "generation": 1, "scores": scores});
    std::fs::write(&doc, body.to_string()).unwrap();
    let rolled = fleet(
        "operator.env",
        &["rollout", "--deployment", "app", doc.to_str().unwrap(), "--devices", "dev-1", "--wait"],
    );
    assert!(rolled.status.success(), "operator rollout: {}", String::from_utf8_lossy(&rolled.stderr));
    let listed = fleet("monitor.env", &["rollouts"]);
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "monitor rollouts: {}", String::from_utf8_lossy(&listed.stderr));
    assert!(stdout.lines().any(|l| l.starts_with("app ") && l.contains("completed")), "{stdout}");

    // By hand: the commander's credentials reach no bucket.
    let commander: harmony_fleet::nats_config::Principal = {
        let url = env("commander.env").remove(0).1;
        let (_, auth) = harmony_score_wire::names::split_url_credentials(&url);
        let (user, password) = auth.unwrap();
        harmony_fleet::nats_config::Principal { user, password }
    };
    let prefix = harmony_score_wire::names::COMMANDER_INBOX_PREFIX;
    assert!(env("commander.env").contains(&("HARMONY_INBOX_PREFIX".to_owned(), prefix.to_owned())));
    let (raw, mut refused) = connect_as(&commander, &port, prefix).await;
    let as_commander = FleetClient::from_nats(raw.clone());
    assert!(as_commander.ping(&dev1, Duration::from_secs(5)).await.unwrap().ok);
    let mut listening = Vec::new();
    for subject in ["harmony.hint.>", "$KV.>", "harmony.heartbeat.*", "device-commands.>", "_INBOX.>"] {
        listening.push((subject, raw.subscribe(subject).await.unwrap()));
    }
    raw.flush().await.unwrap();
    let js = jetstream::ContextBuilder::new().timeout(Duration::from_secs(1)).build(raw.clone());
    let desired = js.get_stream_no_info("KV_harmony-desired-state").await.unwrap();
    let read = desired.direct_get_last_for_subject("$KV.harmony-desired-state.dev-1.app").await;
    assert!(read.is_err(), "the commander read desired state");
    let status = js.get_stream_no_info("KV_harmony-agent-status").await.unwrap();
    let read = status.direct_get_last_for_subject("$KV.harmony-agent-status.dev-1").await;
    assert!(read.is_err(), "the commander read a status");
    assert!(js.get_stream("KV_harmony-agent-status").await.is_err(), "the commander read stream info");
    let rollouts = js.get_stream_no_info("KV_harmony-rollouts").await.unwrap();
    let read = rollouts.direct_get_last_for_subject("$KV.harmony-rollouts.app").await;
    assert!(read.is_err(), "the commander read a rollout");
    for subject in ["$KV.harmony-desired-state.dev-1.app", "$KV.harmony-agent-status.dev-1"] {
        let put = js.publish(subject, "forged".into()).await.unwrap().await;
        assert!(put.is_err(), "the commander wrote {subject}");
    }
    // A reply subject pointing into a bucket (confused deputy) reaches no bucket.
    raw.publish_with_reply("device-commands.dev-1.ping", "$KV.harmony-desired-state.dev-2.app", "".into())
        .await
        .unwrap();
    operator.ping(&dev1, Duration::from_secs(5)).await.unwrap();
    let g2 =
        operator.deploy(DeployRequest::new(dev1.clone(), app.clone(), file("/etc/app", "v2"))).await.unwrap();
    operator.wait_for_generation(&dev1, &app, g2.generation, Some(&g2.digest), WAIT).await.unwrap();
    for (subject, sub) in &mut listening {
        assert!(!receives(sub, Duration::from_millis(200)).await, "the commander saw a message on {subject}");
    }
    let seen = violations(&mut refused).await.join("\n");
    for denied in [
        "$JS.API.DIRECT.GET.KV_harmony-desired-state",
        "$JS.API.STREAM.INFO.KV_harmony-agent-status",
        "$JS.API.DIRECT.GET.KV_harmony-rollouts",
        "$KV.harmony-desired-state.dev-1.app",
        "harmony.hint.>",
        "$KV.>",
        "_INBOX.>",
    ] {
        assert!(seen.contains(denied), "no permission violation for {denied}:\n{seen}");
    }
    // The device answered (the reply it saw was the server's `_R_.…`), and
    // the answer went back to the commander's own account, where no bucket
    // is: dev-2's key holds what the operator wrote.
    assert_eq!(operator.desired_state(&dev2, &app).await.unwrap().map(|d| d.generation), Some(1));
    assert!(!agent.log_text().contains("Permissions Violation"), "{}", agent.log_text());
}

/// The `nats = [...]` of a generated agent configuration, pointed at `port`.
fn toml_like(text: &str, port: &str) -> harmony_agent::ConfigLayer {
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("nats = [\"").and_then(|r| r.strip_suffix("\"]")))
        .expect("a nats line");
    assert!(text.contains("device_id = \"dev-1\""), "{text}");
    harmony_agent::ConfigLayer {
        nats: Some(vec![url.replace("127.0.0.1:1", &format!("127.0.0.1:{port}"))]),
        ..Default::default()
    }
}

/// sha256 as 64 lowercase hex digits.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

// Issue 8 §2: a device fetches an artifact with the generated credentials,
// through the agent's own code (direct gets, no consumer, no stream info),
// and cannot write, delete, purge or follow the artifacts bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_reads_artifacts_with_its_credentials_and_cannot_write_or_delete_them() {
    use harmony_agent::artifacts::NatsArtifacts;
    use harmony_topology::{ArtifactError, ArtifactStore};
    harmony_scores::ensure_linked();
    let auth = generated();
    let nats = NatsServer::start_with_config(&auth.server_conf);
    let port = nats.url().rsplit(':').next().unwrap().to_owned();
    let operator = tokio::time::timeout(
        WAIT,
        FleetClient::connect(&[auth.operator.url(&format!("127.0.0.1:{port}"))], None),
    )
    .await
    .unwrap()
    .unwrap();
    operator.ensure_buckets().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Three chunks of 128 KiB, the last one short.
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("blob.bin"), &content).unwrap();
    let sha = sha256_hex(&content);
    let put = operator.put_artifact(&dir.path().join("blob.bin"), "blob.bin", false).await.unwrap();
    assert_eq!(
        (put.artifact.sha256.as_str(), put.artifact.size, put.uploaded),
        (sha.as_str(), 300_000, true)
    );

    let (device, mut refused) = connect_as(&auth.devices[0].1, &port, "_INBOX_dev-1").await;
    let js = jetstream::ContextBuilder::new().timeout(Duration::from_secs(1)).build(device.clone());
    let (store, link) = NatsArtifacts::new(dir.path().join("cache"), 1 << 20);
    link.connect(js.clone());
    let fetched = tokio::time::timeout(WAIT, store.fetch("blob.bin", &sha)).await.unwrap().unwrap();
    assert!(fetched.transferred_in.is_some());
    assert_eq!(std::fs::read(&fetched.path).unwrap(), content);
    assert!(violations(&mut refused).await.is_empty(), "the fetch stepped outside the device's permissions");
    // Too large for this device: refused before a chunk moves.
    let (small, small_link) = NatsArtifacts::new(dir.path().join("small"), 1000);
    small_link.connect(js.clone());
    let err = small.fetch("blob.bin", &sha).await.unwrap_err();
    assert!(matches!(err, ArtifactError::TooLarge { size: 300_000, max: 1000, .. }), "{err:?}");
    let err = small.fetch("missing.bin", &sha).await.unwrap_err();
    assert!(matches!(err, ArtifactError::NotFound { .. }), "{err:?}");

    // Every write is refused; the object is as the operator left it.
    for subject in ["$O.harmony-artifacts.C.forged", "$O.harmony-artifacts.M.YmxvYi5iaW4="] {
        let put = js.publish(subject, "forged".into()).await.unwrap().await;
        assert!(put.is_err(), "dev-1 wrote {subject}");
    }
    assert!(js.get_object_store("harmony-artifacts").await.is_err(), "dev-1 read the stream info");
    assert!(js.delete_stream("OBJ_harmony-artifacts").await.is_err(), "dev-1 deleted the bucket");
    let purge = device
        .send_request(
            "$JS.API.STREAM.PURGE.OBJ_harmony-artifacts",
            async_nats::Request::new().payload("{}".into()).timeout(Some(Duration::from_secs(1))),
        )
        .await;
    assert!(purge.is_err(), "dev-1 purged the bucket");
    let consumer = js
        .create_consumer_on_stream(
            jetstream::consumer::pull::Config {
                filter_subject: "$O.harmony-artifacts.C.>".into(),
                ..Default::default()
            },
            "OBJ_harmony-artifacts",
        )
        .await;
    assert!(consumer.is_err(), "dev-1 created a consumer on the artifacts stream");
    // The unconfinable direct get reads this stream only: asked for a
    // desired-state subject, it finds nothing there.
    let stream = js.get_stream_no_info("OBJ_harmony-artifacts").await.unwrap();
    let elsewhere = stream.direct_get_last_for_subject("$KV.harmony-desired-state.dev-2.app").await;
    assert!(elsewhere.is_err(), "the artifacts stream answered for another stream's subject");
    let body_form = device
        .send_request(
            "$JS.API.DIRECT.GET.OBJ_harmony-artifacts",
            async_nats::Request::new()
                .payload(r#"{"last_by_subj":"$KV.harmony-desired-state.dev-2.app"}"#.into())
                .timeout(Some(Duration::from_secs(1))),
        )
        .await
        .unwrap();
    assert!(body_form.payload.is_empty() && body_form.status.is_some(), "{body_form:?}");

    let seen = violations(&mut refused).await.join("\n");
    for denied in [
        "$O.harmony-artifacts.C.forged",
        "$O.harmony-artifacts.M.YmxvYi5iaW4=",
        "$JS.API.STREAM.INFO.OBJ_harmony-artifacts",
        "$JS.API.STREAM.DELETE.OBJ_harmony-artifacts",
        "$JS.API.STREAM.PURGE.OBJ_harmony-artifacts",
        "$JS.API.CONSUMER.CREATE.OBJ_harmony-artifacts",
        "$JS.API.DIRECT.GET.OBJ_harmony-artifacts.$KV.harmony-desired-state.dev-2.app",
    ] {
        assert!(seen.contains(denied), "no permission violation for {denied}:\n{seen}");
    }
    let listed = operator.list_artifacts().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].name.as_str(), listed[0].sha256.as_str()), ("blob.bin", sha.as_str()));
    let info = operator.jetstream().get_stream("OBJ_harmony-artifacts").await.unwrap().cached_info().clone();
    assert_eq!(info.state.consumer_count, 0);
}

// Attack: the monitor may publish JetStream read requests, and the server
// answers on whatever reply subject the request names. Naming a bucket
// subject as the reply makes the server itself publish the answer there:
// a write by a principal allowed no write (here into a rollout state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_cannot_write_a_bucket_through_the_reply_subject_of_a_read() {
    use harmony_fleet::nats_config::MONITOR_INBOX_PREFIX;
    harmony_scores::ensure_linked();
    let dev1 = DeviceId::new("dev-1").unwrap();
    let Served { auth, nats: _nats, port, operator, .. } = serve_with_monitor().await;
    let app = DeploymentName::new("app").unwrap();
    operator
        .deploy(DeployRequest::new(dev1.clone(), app.clone(), file("/etc/app", "v1")).force(true))
        .await
        .unwrap();
    let rollouts = operator.jetstream().get_key_value("harmony-rollouts").await.unwrap();
    rollouts.put("app", "the operator's state".into()).await.unwrap();
    let desired = operator.jetstream().get_key_value("harmony-desired-state").await.unwrap();
    let before_rollout = rollouts.entry("app").await.unwrap().unwrap().revision;

    let (raw, _refused) = connect_as(auth.monitor.as_ref().unwrap(), &port, MONITOR_INBOX_PREFIX).await;
    // Stream info of the rollouts bucket, answered into a rollout's key.
    raw.publish_with_reply("$JS.API.STREAM.INFO.KV_harmony-rollouts", "$KV.harmony-rollouts.app", "".into())
        .await
        .unwrap();
    // A direct get of dev-1's document, answered into dev-2's key.
    raw.publish_with_reply(
        "$JS.API.DIRECT.GET.KV_harmony-desired-state.$KV.harmony-desired-state.dev-1.app",
        "$KV.harmony-desired-state.dev-2.app",
        "".into(),
    )
    .await
    .unwrap();
    raw.flush().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let after = rollouts.entry("app").await.unwrap().unwrap();
    assert_eq!(
        after.revision,
        before_rollout,
        "the monitor wrote the rollout state: {}",
        String::from_utf8_lossy(&after.value)
    );
    let forged = desired.entry("dev-2.app").await.unwrap();
    assert!(forged.is_none(), "the monitor wrote dev-2's desired state: {forged:?}");
}

// Attack: since the monitor may read the rollouts bucket it may read the
// purge markers `prune_documents` leaves there (`KV-Operation: PURGE`,
// `Nats-Rollup: sub`). A direct get answers with the stored headers; named
// as the reply, a device's desired-state key receives them: the server
// purges that key and the device removes its deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_cannot_purge_a_deployment_with_a_rollout_purge_marker() {
    use harmony_fleet::nats_config::MONITOR_INBOX_PREFIX;
    harmony_scores::ensure_linked();
    let dev1 = DeviceId::new("dev-1").unwrap();
    let Served { auth, nats: _nats, port, operator, .. } = serve_with_monitor().await;
    let app = DeploymentName::new("app").unwrap();
    let g1 = operator
        .deploy(DeployRequest::new(dev1.clone(), app.clone(), file("/etc/app", "v1")).force(true))
        .await
        .unwrap();
    // What `prune_documents` does to an earlier rollout's document.
    let rollouts = operator.jetstream().get_key_value("harmony-rollouts").await.unwrap();
    rollouts.put("app.doc.0123", "an earlier document".into()).await.unwrap();
    rollouts.purge("app.doc.0123").await.unwrap();

    let (raw, _refused) = connect_as(auth.monitor.as_ref().unwrap(), &port, MONITOR_INBOX_PREFIX).await;
    raw.publish_with_reply(
        "$JS.API.DIRECT.GET.KV_harmony-rollouts.$KV.harmony-rollouts.app.doc.0123",
        "$KV.harmony-desired-state.dev-1.app",
        "".into(),
    )
    .await
    .unwrap();
    raw.flush().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let desired = operator.desired_state(&dev1, &app).await.unwrap();
    assert_eq!(desired.map(|d| d.generation), Some(g1.generation), "the monitor purged dev-1's deployment");
}

// Attack (the same channel, open to every device; older than both changes
// reviewed): a device may direct-get its own keys, and it names the reply
// subject. The server's `404` answer to a get of a key it does not have,
// answered into another device's desired-state key, is stored there as an
// empty value: that device's document is replaced by one nobody can read.
// (A delete marker copied the same way deletes the deployment whenever the
// `Nats-Expected-Last-Subject-Sequence` it carries happens to match.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_overwrite_another_devices_desired_state_through_the_reply_of_its_own_read() {
    harmony_scores::ensure_linked();
    let dev2 = DeviceId::new("dev-2").unwrap();
    let Served { auth, nats: _nats, port, operator, .. } = serve(generated()).await;
    let app = DeploymentName::new("app").unwrap();
    let g1 = operator
        .deploy(DeployRequest::new(dev2.clone(), app.clone(), file("/etc/app", "v1")).force(true))
        .await
        .unwrap();

    let (device, mut refused) = connect_as(&auth.devices[0].1, &port, "_INBOX_dev-1").await;
    device
        .publish_with_reply(
            "$JS.API.DIRECT.GET.KV_harmony-desired-state.$KV.harmony-desired-state.dev-1.nothing",
            "$KV.harmony-desired-state.dev-2.app",
            "".into(),
        )
        .await
        .unwrap();
    // Its own status write, with the JetStream acknowledgement sent there.
    device
        .publish_with_reply(
            "$KV.harmony-agent-status.dev-1",
            "$KV.harmony-desired-state.dev-2.app",
            "x".into(),
        )
        .await
        .unwrap();
    device.flush().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(violations(&mut refused).await.is_empty(), "the get of its own key is allowed");
    let desired = operator.desired_state(&dev2, &app).await;
    assert_eq!(
        desired.as_ref().ok().and_then(|d| d.as_ref().map(|d| d.generation)),
        Some(g1.generation),
        "dev-1 overwrote dev-2's desired state: {desired:?}"
    );
}

// Attack (on the accounts of b41bf83): a device's JetStream reply still
// lands in its own account, DEVICES, and every device listens there. dev-1
// writes its own status with a stored `Nats-Sequence` header, then direct-
// gets it with dev-2's hint and status-hint subjects as the reply: the
// server delivers the answer (stored headers first, so async-nats' `get`
// returns dev-1's sequence) to dev-2's agent, which held it for a hint.
// It read its key again and again behind a sequence that never comes (a
// real write batched with such a hint waits the whole lag cycle, ~16 s),
// and rewrote its status each second as if another writer had taken it.
// Devices hold no publish right on these subjects; the reply gives one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_make_another_agent_act_on_hints_forged_through_the_reply_of_its_own_read() {
    harmony_scores::ensure_linked();
    let dev2 = DeviceId::new("dev-2").unwrap();
    let Served { auth, nats: _nats, port, host, operator } = serve(generated()).await;
    let app = DeploymentName::new("app").unwrap();
    let g1 = operator
        .deploy(DeployRequest::new(dev2.clone(), app.clone(), file("/etc/app", "v1")).force(true))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (agent, _root) = start_agent(dir.path(), "dev-2", &auth.devices[1].1.url(&host));
    let applied = operator.wait_for_generation(&dev2, &app, g1.generation, Some(&g1.digest), WAIT).await;
    assert!(applied.is_ok(), "{applied:?}\n{}", agent.log_text());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = operator.device_status(&dev2).await.unwrap().unwrap().1;

    let (device, mut refused) = connect_as(&auth.devices[0].1, &port, "_INBOX_dev-1").await;
    let js = jetstream::ContextBuilder::new().timeout(Duration::from_secs(1)).build(device.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Sequence", "99999999999");
    headers.insert("Nats-Msg-Size", "0");
    js.publish_with_headers("$KV.harmony-agent-status.dev-1", headers, "".into())
        .await
        .unwrap()
        .await
        .unwrap();
    for _ in 0..5 {
        for reply in ["harmony.hint.dev-2.app", "harmony.status-hint.dev-2"] {
            device
                .publish_with_reply(
                    "$JS.API.DIRECT.GET.KV_harmony-agent-status.$KV.harmony-agent-status.dev-1",
                    reply,
                    "".into(),
                )
                .await
                .unwrap();
        }
        device.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(violations(&mut refused).await.is_empty(), "dev-1 used only its own rights");
    let log = agent.log_text();
    for acted in ["read is behind its hint", "written by someone else"] {
        assert!(!log.contains(acted), "dev-2 acted on a message dev-1 forged ({acted}):\n{log}");
    }
    let after = operator.device_status(&dev2).await.unwrap().unwrap().1;
    assert_eq!(after, before, "dev-2 rewrote its status on dev-1's forged status hints");
    // The bucket's own hints still work: a new generation lands by its hint
    // (resync is an hour away).
    let g2 =
        operator.deploy(DeployRequest::new(dev2.clone(), app.clone(), file("/etc/app", "v2")).force(true));
    let g2 = g2.await.unwrap();
    let applied = operator.wait_for_generation(&dev2, &app, g2.generation, Some(&g2.digest), WAIT).await;
    assert!(applied.is_ok(), "{applied:?}\n{}", agent.log_text());
}
