//! Time from `deploy` to the device's status showing the generation applied,
//! over sequential deploys on loopback; plus the agent's binary size and idle RSS.
//!
//! `cargo build --release --bins && cargo bench -p harmony-e2e --bench deploy_latency [-- DEPLOYS]`
//! (default 200 deploys; the agent binary must be built first, in release).

use std::time::{Duration, Instant};

use harmony_e2e::{workspace_bin, AgentProcess, NatsServer};
use harmony_fleet::{DeployRequest, FleetClient};
use harmony_score_wire::{DeploymentName, DeviceId, DeviceScore};
use harmony_scores::{FileScore, PresenceState};

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    harmony_scores::ensure_linked();
    let deploys: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(200);
    let agent_bin = workspace_bin("harmony-agent");
    let size = std::fs::metadata(&agent_bin).map(|m| m.len()).unwrap_or(0);
    println!("agent binary: {} ({:.1} MiB)", agent_bin.display(), size as f64 / 1048576.0);

    let nats = NatsServer::start();
    let client = FleetClient::connect(&[nats.url()], None).await.expect("connect");
    client.ensure_buckets().await.expect("buckets");
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("root");
    let state = dir.path().join("state");
    let url = nats.url();
    // `HARMONY_BENCH_SIGNED=1`: the operator signs, the agent verifies.
    let signed = std::env::var_os("HARMONY_BENCH_SIGNED").is_some();
    let public = dir.path().join("bench.pub");
    let signer = harmony_score_wire::DocumentSigner::from_seed([11; 32]);
    std::fs::write(&public, harmony_score_wire::to_hex32(&signer.verifying_key().to_bytes())).expect("key");
    let client = if signed { client.with_signer(signer) } else { client };
    let trust: Vec<&str> =
        if signed { vec!["--trusted-key", public.to_str().unwrap()] } else { vec!["--allow-unsigned"] };
    println!("documents: {}", if signed { "signed (ed25519), verified by the agent" } else { "unsigned" });
    let agent = AgentProcess::start(
        &[
            &trust[..],
            &[
                "--device-id",
                "bench-1",
                "--nats",
                &url,
                "--state-dir",
                state.to_str().unwrap(),
                "--root",
                root.to_str().unwrap(),
            ][..],
        ]
        .concat(),
        &dir.path().join("agent.log"),
    );
    let device = DeviceId::new("bench-1").expect("id");
    let deployment = DeploymentName::new("bench").expect("name");
    let started = Instant::now();
    while client.ping(&device, Duration::from_secs(1)).await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "agent did not come up:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Some(kib) = agent.pid().and_then(rss_kib) {
        println!("agent idle RSS after start: {kib} KiB");
    }

    let mut samples = Vec::with_capacity(deploys);
    let mut writes = Vec::with_capacity(deploys);
    for i in 0..deploys {
        let scores: Vec<Box<dyn DeviceScore>> = vec![Box::new(FileScore {
            path: "/etc/bench.conf".into(),
            content: format!("revision = {i}\n"),
            mode: None,
            state: PresenceState::Present,
        })];
        let start = Instant::now();
        let deployed = client
            .deploy(DeployRequest::new(device.clone(), deployment.clone(), scores))
            .await
            .expect("deploy");
        writes.push(start.elapsed());
        client
            .wait_for_generation(
                &device,
                &deployment,
                deployed.generation,
                Some(&deployed.digest),
                Duration::from_secs(30),
            )
            .await
            .expect("applied");
        samples.push(start.elapsed());
    }
    samples.sort();
    writes.sort();
    println!(
        "deploy -> status applied, {deploys} sequential deploys: median {:?}, p99 {:?}, max {:?}",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1]
    );
    println!(
        "  of which the operator's write (index and key, compare-and-set): median {:?}, p99 {:?}",
        percentile(&writes, 0.5),
        percentile(&writes, 0.99)
    );
    if let Some(kib) = agent.pid().and_then(rss_kib) {
        println!("agent RSS after the deploys: {kib} KiB");
    }
}
