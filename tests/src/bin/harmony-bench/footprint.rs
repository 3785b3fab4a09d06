//! `footprint`: the size-profile agent's binary size, idle RSS after applying
//! a 100-Score document, and what it costs while idle (CPU ticks, messages).

use std::path::PathBuf;
use std::time::Duration;

use harmony_e2e::{free_port, AgentProcess, NatsServer};
use harmony_fleet::{DeployRequest, FleetClient};
use harmony_score_wire::{DeploymentName, DeviceId};
use serde_json::json;

use crate::{proc_kib, BenchError};

pub async fn run(agent: Option<PathBuf>, idle: Duration) -> Result<serde_json::Value, BenchError> {
    let agent_bin = match agent {
        Some(path) => path,
        None => {
            let exe = std::env::current_exe()?;
            let target = exe.parent().and_then(|p| p.parent()).ok_or("no target folder")?;
            target.join("release-small").join("harmony-agent")
        }
    };
    if !agent_bin.exists() {
        return Err(format!(
            "{} not found: cargo build --profile release-small -p harmony-agent",
            agent_bin.display()
        )
        .into());
    }
    let binary_bytes = std::fs::metadata(&agent_bin)?.len();
    let monitor = free_port();
    let nats = NatsServer::start_with_config(&format!("http: \"127.0.0.1:{monitor}\"\n"));
    let client = FleetClient::connect(&[nats.url()], None).await?;
    client.ensure_buckets().await?;
    let dir = tempfile::tempdir()?;
    std::fs::create_dir(dir.path().join("root"))?;
    let device = DeviceId::new("small-1")?;
    let deployment = DeploymentName::new("hundred")?;
    let path = |p: PathBuf| p.to_str().map(str::to_owned).ok_or("a temp path that is not UTF-8");
    let (state, root) = (path(dir.path().join("state"))?, path(dir.path().join("root"))?);
    let url = nats.url();
    // Default heartbeat (30 s) and resync (60 s): what a device runs.
    let args = [
        "--allow-unsigned",
        "--device-id",
        device.as_str(),
        "--nats",
        &url,
        "--state-dir",
        &state,
        "--root",
        &root,
    ];
    let agent = AgentProcess::start_binary(&agent_bin, &args, &dir.path().join("agent.log"), "warn");
    let pid = agent.pid().ok_or("agent not running")?;
    let online = tokio::time::timeout(Duration::from_secs(30), async {
        while client.ping(&device, Duration::from_millis(500)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    online.await.map_err(|_| "the agent did not come online")?;
    let scores = (0..100)
        .map(|i| harmony_e2e::file_score(&format!("/etc/app/{i:03}.conf"), &format!("setting = {i}\n")))
        .collect();
    let deployed =
        client.deploy(DeployRequest::new(device.clone(), deployment.clone(), scores).force(true)).await?;
    client
        .wait_for_generation(
            &device,
            &deployment,
            deployed.generation,
            Some(&deployed.digest),
            Duration::from_secs(60),
        )
        .await?;
    // Let the first resync turn the Scores NOOP, then measure from quiet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ticks_before, msgs_before) = (cpu_ticks(pid)?, messages(monitor)?);
    tokio::time::sleep(idle).await;
    let (ticks_after, msgs_after) = (cpu_ticks(pid)?, messages(monitor)?);
    let idle_rss_kib = proc_kib(pid, "VmRSS:");
    let idle_hwm_kib = proc_kib(pid, "VmHWM:");
    let per_min = |d: u64| (d as f64 * 60.0 / idle.as_secs_f64()).round() as u64;
    drop(agent);
    Ok(json!({
        "binary_bytes": binary_bytes,
        "idle_rss_kib": idle_rss_kib,
        "idle_hwm_kib": idle_hwm_kib,
        "idle_cpu_ticks_per_min": per_min(ticks_after.saturating_sub(ticks_before)),
        "idle_msgs_per_min": per_min(msgs_after.saturating_sub(msgs_before)),
        "idle_secs": idle.as_secs(),
    }))
}

/// utime + stime of a process, in clock ticks (`/proc/<pid>/stat`).
fn cpu_ticks(pid: u32) -> Result<u64, BenchError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count from its closing parenthesis.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).ok_or("malformed /proc stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n).and_then(|v| v.parse::<u64>().ok()).ok_or("malformed /proc stat");
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    Ok(field(11)? + field(12)?)
}

/// Messages the agent's connection sent plus received, from the server's
/// monitoring endpoint (`/connz`).
fn messages(monitor: u16) -> Result<u64, BenchError> {
    let connz = crate::monitoring(monitor, "connz")?;
    let agent = connz["connections"]
        .as_array()
        .and_then(|all| {
            all.iter().find(|c| c["name"].as_str().is_some_and(|n| n.starts_with("harmony-agent-")))
        })
        .ok_or("the agent's connection is not in /connz")?;
    Ok(agent["in_msgs"].as_u64().unwrap_or(0) + agent["out_msgs"].as_u64().unwrap_or(0))
}
