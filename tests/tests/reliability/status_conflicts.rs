//! §7: a second writer races the agent on its status key. The agent's
//! newest status must land in the end, and another instance writing under
//! the same device id must be reported as `duplicate_device`, never
//! silently overwritten.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use harmony_e2e::{deployment, file_score, until_status, within, Fleet};
use harmony_score_wire::names::{status_key, AGENT_STATUS_BUCKET};
use harmony_score_wire::{to_cbor, DeviceId, ErrorKind, Phase};

// The racer writes plain puts (no compare-and-set: the rude writer) of a
// status from another instance as fast as it can, while the operator
// deploys. Heartbeats are an hour away: after the racer's last write, only
// the agent's own following of its key can put its status back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_status_lands_after_a_racing_writer_and_the_twin_is_reported() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let _agent = f.agent_process("dev-1", "dev-1", &[]);
    let mut twin = f.online(&device).await;
    let mine = twin.instance_id.clone();

    let kv = within(f.client.jetstream().get_key_value(AGENT_STATUS_BUCKET)).await.unwrap();
    twin.instance_id = "twin-instance".into();
    let stop = Arc::new(AtomicBool::new(false));
    let racer = {
        let (kv, stop, key, bytes) = (kv.clone(), stop.clone(), status_key(&device), to_cbor(&twin));
        tokio::spawn(async move {
            let mut writes = 0u32;
            while !stop.load(Ordering::Relaxed) {
                within(kv.put(key.clone(), bytes.clone().into())).await.expect("racer's put");
                writes += 1;
            }
            // One last write after the agent's last change.
            within(kv.put(key, bytes.into())).await.expect("racer's put");
            writes + 1
        })
    };
    let mut last = 0;
    for i in 0..10 {
        last = f.deploy(&device, "app", vec![file_score("/etc/app", &format!("{i}\n"))]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The agent has written its last change (the racer may have written
    // over it since); then the racer's final write comes after it.
    let app = deployment("app");
    until_status(&f.client, &device, "the agent's last change written", |s| {
        s.instance_id == mine && s.deployments.get(&app).is_some_and(|d| d.observed_generation == last)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let writes = within(racer).await.unwrap();

    let status = until_status(&f.client, &device, "the agent's own status back, twin reported", |s| {
        s.instance_id == mine
            && s.deployments
                .get(&deployment("app"))
                .is_some_and(|d| d.phase == Phase::Applied && d.observed_generation == last)
            && s.errors.iter().any(|e| e.kind == ErrorKind::DuplicateDevice)
    })
    .await;
    let error = status.errors.iter().find(|e| e.kind == ErrorKind::DuplicateDevice).unwrap();
    assert!(error.message.contains("twin-instance"), "{}", error.message);
    eprintln!(
        "status conflicts: the racer wrote {writes} times; the agent's status landed after its last write"
    );
}

// A status key deleted by the operator (say, clearing a device's report)
// is no twin: the agent writes its status again, with no duplicate report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_deleted_under_the_agent_is_written_again_without_a_duplicate_report() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let _agent = f.agent_process("dev-1", "dev-1", &[]);
    let g = f.deploy(&device, "app", vec![file_score("/etc/app", "x\n")]).await;
    let mine = f.applied(&device, "app", g).await.instance_id;
    let kv = within(f.client.jetstream().get_key_value(AGENT_STATUS_BUCKET)).await.unwrap();
    within(kv.delete(status_key(&device))).await.unwrap();
    let status =
        until_status(&f.client, &device, "the status written again", |s| s.instance_id == mine).await;
    assert!(status.errors.is_empty(), "{:?}", status.errors);
    assert_eq!(status.deployments[&deployment("app")].observed_generation, g);
}
