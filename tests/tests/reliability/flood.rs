//! §6: a flood of 10,000 generations written to one deployment as fast as
//! the operator's connection takes them. The agent must apply the newest,
//! skip superseded ones rather than apply each, and end at the last one.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use harmony_e2e::{deployment, file_score, proc_status_kib, within, Fleet};
use harmony_score_wire::names::{desired_state_key, DESIRED_STATE_BUCKET};
use harmony_score_wire::{encode, DesiredState, DeviceId};

const WRITES: u64 = 10_000;
/// Writes published and not yet acknowledged.
const WINDOW: usize = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_generations_in_a_burst_end_at_the_last_without_applying_each() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let name = deployment("flood");
    let agent = f.agent_process("dev-1", "dev-1", &[]);
    let pid = agent.pid().unwrap();
    let first = f.deploy(&device, "flood", vec![file_score("/etc/flood", "generation 1\n")]).await;
    f.applied(&device, "flood", first).await;

    // Pipelined: WINDOW acknowledgements outstanding at most (the stream
    // refuses more pending writes with "too many requests").
    let subject = format!("$KV.{DESIRED_STATE_BUCKET}.{}", desired_state_key(&device, &name));
    let last = first + WRITES;
    let content = |g: u64| format!("generation {g}\n");
    let started = Instant::now();
    let mut acks = VecDeque::new();
    for generation in first + 1..=last {
        let doc = DesiredState::new(
            device.clone(),
            name.clone(),
            generation,
            vec![file_score("/etc/flood", &content(generation))],
        );
        let bytes = encode(&doc).unwrap();
        acks.push_back(within(f.client.jetstream().publish(subject.clone(), bytes.into())).await.unwrap());
        if acks.len() >= WINDOW {
            within(acks.pop_front().unwrap().into_future()).await.expect("write acknowledged");
        }
    }
    for ack in acks {
        within(ack.into_future()).await.expect("write acknowledged");
    }
    let written = started.elapsed();

    let status = tokio::time::timeout(Duration::from_secs(120), f.applied(&device, "flood", last))
        .await
        .unwrap_or_else(|_| panic!("the last generation was not applied:\n{}", agent.log_text()));
    let converged = started.elapsed();
    assert!(status.errors.is_empty(), "{:?}", status.errors);
    assert_eq!(std::fs::read_to_string(f.root("dev-1", "/etc/flood")).unwrap(), content(last));
    let peak_kib = proc_status_kib(pid, "VmHWM:").expect("agent running");

    let log = agent.log_text();
    let accepted =
        log.lines().filter(|l| l.contains(" accepted ") && l.contains("deployment=flood")).count() as u64;
    eprintln!(
        "{{\"writes\":{WRITES},\"write_ms\":{},\"converge_ms\":{},\"accepted\":{accepted},\"agent_peak_rss_kib\":{peak_kib}}}",
        written.as_millis(),
        converged.as_millis()
    );
    // Superseded generations were skipped: most were never accepted, let
    // alone applied (each accepted one is persisted and run).
    assert!(accepted >= 2, "the flood was not seen: {accepted}");
    assert!(accepted < WRITES / 2, "{accepted} of {WRITES} generations accepted one by one");
}
