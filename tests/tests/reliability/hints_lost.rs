//! §9: hints lost. The live path (the bucket's republished hints) is gone;
//! every change must still converge within one resync, and the agent must
//! say that it fell back.

use std::time::{Duration, Instant};

use harmony_e2e::{file_score, within, Fleet, NatsServer};
use harmony_fleet::FleetClient;
use harmony_score_wire::DeviceId;

const RESYNC_SECS: u64 = 2;

/// Deploys three changes one after the other and checks each is applied
/// within one resync (plus a second for the apply and the status) of its write.
async fn three_changes_converge_within_a_resync(f: &Fleet, device: &DeviceId) -> Vec<Duration> {
    let mut took = Vec::new();
    for i in 0..3 {
        let content = format!("change {i}\n");
        let written = Instant::now();
        let g = f.deploy(device, "app", vec![file_score("/etc/app", &content)]).await;
        f.applied(device, "app", g).await;
        took.push(written.elapsed());
        assert_eq!(std::fs::read_to_string(f.root(device.as_str(), "/etc/app")).unwrap(), content);
    }
    let bound = Duration::from_secs(RESYNC_SECS + 1);
    assert!(took.iter().all(|t| *t <= bound), "a change took longer than one resync: {took:?}");
    took
}

// The test hook: `--resync-only` drops the hint subscription altogether.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_hint_subscription_dropped_every_change_converges_within_one_resync() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let agent = f.agent_process("dev-1", "dev-1", &["--resync-only", "--resync", &RESYNC_SECS.to_string()]);
    f.online(&device).await;
    let took = three_changes_converge_within_a_resync(&f, &device).await;
    eprintln!("hints dropped (hook): changes applied after {took:?} (resync {RESYNC_SECS} s)");
    let log = agent.log_text();
    assert!(log.contains("not following hints"), "{log}");
    assert!(log.contains("the resync found changes"), "{log}");
}

// The real failure: the agent subscribes to its hints, but the server
// refuses the subscription (a device permission gone wrong), so no hint
// ever arrives while everything else works. Nothing in the agent is told
// to fall back: it must notice by itself that its resyncs find what no
// hint announced, say so, and converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_the_server_silently_withholds_are_noticed_and_the_resync_converges() {
    harmony_scores::ensure_linked();
    let nats = NatsServer::start_with_config(
        r#"authorization {
  users = [
    { user: op, password: op }
    { user: dev, password: dev, permissions: { subscribe: { allow: [">"], deny: ["harmony.hint.>"] } } }
  ]
}
"#,
    );
    let operator = format!("nats://op:op@127.0.0.1:{}", nats.port());
    let client = within(FleetClient::connect(&[operator], None)).await.unwrap();
    within(client.ensure_buckets()).await.unwrap();
    let f = Fleet { nats, client, dir: tempfile::tempdir().unwrap() };
    let device = DeviceId::new("dev-1").unwrap();
    let url = format!("nats://dev:dev@127.0.0.1:{}", f.nats.port());
    let agent = f.agent_process("dev-1", "dev-1", &["--nats", &url, "--resync", &RESYNC_SECS.to_string()]);
    f.online(&device).await;
    let took = three_changes_converge_within_a_resync(&f, &device).await;
    eprintln!("hints withheld by the server: changes applied after {took:?} (resync {RESYNC_SECS} s)");
    let log = agent.log_text();
    assert!(log.contains("Permissions Violation"), "{log}");
    assert!(log.contains("hints are being lost; fell back to the resync"), "{log}");
}
