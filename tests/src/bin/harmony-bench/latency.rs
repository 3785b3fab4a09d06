//! `latency --count N`: sequential generations to one real agent process.

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use harmony_e2e::{file_score, AgentProcess, NatsServer};
use harmony_fleet::{DeployRequest, FleetClient};
use harmony_score_wire::names::{
    desired_state_key, hint_subjects, AGENT_STATUS_BUCKET, DESIRED_STATE_BUCKET,
};
use harmony_score_wire::{
    encode, from_cbor, AgentStatus, DeploymentName, DesiredState, DeviceId, DocumentSigner, Phase,
};
use serde_json::json;

use crate::{quantile, sibling_bin, within, BenchError};

const LIMIT: Duration = Duration::from_secs(30);
/// How long one floor round may take before it counts as lost.
const FLOOR_ROUND_LIMIT: Duration = Duration::from_secs(2);
/// Lost floor rounds tolerated in one run.
const MAX_FLOOR_LOST: usize = 5;

pub async fn run(count: usize, state_in: &Path, signed: bool) -> Result<serde_json::Value, BenchError> {
    let nats = NatsServer::start();
    let client = FleetClient::connect(&[nats.url()], None).await?;
    client.ensure_buckets().await?;
    let dir = tempfile::tempdir_in(state_in)?;
    let device = DeviceId::new("bench-1")?;
    let deployment = DeploymentName::new("bench")?;
    let signer = DocumentSigner::from_seed([11; 32]);
    let public = dir.path().join("bench.pub");
    std::fs::write(&public, harmony_score_wire::to_hex32(&signer.verifying_key().to_bytes()))?;
    std::fs::create_dir(dir.path().join("root"))?;
    let (state, root, url) = (dir.path().join("state"), dir.path().join("root"), nats.url());
    let path = |p: &Path| p.to_str().map(str::to_owned).ok_or("a temp path that is not UTF-8");
    let mut args = vec![
        "--device-id".to_owned(),
        device.to_string(),
        "--nats".to_owned(),
        url,
        "--state-dir".to_owned(),
        path(&state)?,
        "--root".to_owned(),
        path(&root)?,
        "--resync".to_owned(),
        "3600".to_owned(),
        "--heartbeat".to_owned(),
        "3600".to_owned(),
    ];
    if signed {
        args.extend(["--trusted-key".to_owned(), path(&public)?]);
    } else {
        args.push("--allow-unsigned".to_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // `HARMONY_BENCH_AGENT_LOG=debug` (and `HARMONY_BENCH_KEEP=1` to keep
    // the folder) to see where the time goes.
    let filter = std::env::var("HARMONY_BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".to_owned());
    let agent = AgentProcess::start_binary(
        &sibling_bin("harmony-agent")?,
        &args,
        &dir.path().join("agent.log"),
        &filter,
    );

    let client = if signed { client.with_signer(DocumentSigner::from_seed([11; 32])) } else { client };

    // The operator follows the device's status subject; a status is seen
    // when its write reaches subscribers (after it is stored).
    let status_subject = format!("$KV.{AGENT_STATUS_BUCKET}.{device}");
    let mut statuses = client.nats().subscribe(status_subject).await?;
    let applied = |payload: &[u8], generation: u64| {
        from_cbor::<AgentStatus>(payload, 1 << 20, "status").is_ok_and(|s| {
            s.deployments
                .get(&deployment)
                .is_some_and(|d| d.phase == Phase::Applied && d.observed_generation == generation)
        })
    };
    // Generation 1 through the full operator path (index, numbering).
    let first = within(LIMIT, "the agent to come online", async {
        loop {
            if client.ping(&device, Duration::from_millis(500)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    first?;
    let request =
        DeployRequest::new(device.clone(), deployment.clone(), vec![file_score("/etc/bench", "0\n")])
            .force(true);
    let first = client.deploy(request).await?.generation;
    within(LIMIT, "the first generation", async {
        while let Some(message) = statuses.next().await {
            if applied(&message.payload, first) {
                return;
            }
        }
    })
    .await?;

    let key = format!("$KV.{DESIRED_STATE_BUCKET}.{}", desired_state_key(&device, &deployment));
    let mut took = Vec::with_capacity(count);
    for i in 1..=count as u64 {
        let generation = first + i;
        let doc = DesiredState::new(
            device.clone(),
            deployment.clone(),
            generation,
            vec![file_score("/etc/bench", &format!("{generation}\n"))],
        );
        let mut bytes = encode(&doc)?;
        if signed {
            bytes = signer.sign(bytes);
        }
        let started = Instant::now();
        let ack = client.jetstream().publish(key.clone(), bytes.into()).await?;
        within(LIMIT, "a status", async {
            while let Some(message) = statuses.next().await {
                if applied(&message.payload, generation) {
                    return;
                }
            }
        })
        .await?;
        took.push(started.elapsed().as_micros() as u64);
        ack.await?;
    }
    drop(agent);
    if std::env::var_os("HARMONY_BENCH_KEEP").is_some() {
        eprintln!("agent folder kept: {}", dir.keep().display());
    }
    took.sort_unstable();

    let (floor, floor_lost) = floor(&client, &nats.url(), count).await?;
    Ok(json!({
        "count": count,
        "p50_us": quantile(&took, 0.5),
        "p90_us": quantile(&took, 0.9),
        "p99_us": quantile(&took, 0.99),
        "max_us": took.last().copied().unwrap_or(0),
        "floor_p50_us": quantile(&floor, 0.5),
        "floor_p99_us": quantile(&floor, 0.99),
        "floor_lost": floor_lost,
        "signed": signed,
        "state_in": state_in.display().to_string(),
    }))
}

/// The bare two-hop round trip on the same server, sorted: the operator
/// puts a desired-state key; a subscriber on another connection gets the
/// bucket's republished hint and puts a status; the operator gets that.
async fn floor(client: &FleetClient, url: &str, count: usize) -> Result<(Vec<u64>, usize), BenchError> {
    let device = DeviceId::new("floor-1")?;
    let deployment = DeploymentName::new("bench")?;
    // The same server, on a connection of its own (as a device has).
    let other = async_nats::connect(url).await?;
    let device_js = async_nats::jetstream::new(other.clone());
    let mut hints = other.subscribe(hint_subjects(&device)).await?;
    let status_subject = format!("$KV.{AGENT_STATUS_BUCKET}.{device}");
    let responder = {
        let status_subject = status_subject.clone();
        tokio::spawn(async move {
            while let Some(_hint) = hints.next().await {
                if let Ok(ack) = device_js.publish(status_subject.clone(), "applied".into()).await {
                    let _ = ack.await;
                }
            }
        })
    };
    let mut statuses = client.nats().subscribe(status_subject).await?;
    other.flush().await?;
    client.nats().flush().await?;
    let key = format!("$KV.{DESIRED_STATE_BUCKET}.{}", desired_state_key(&device, &deployment));
    let mut took = Vec::with_capacity(count);
    let mut lost = 0;
    while took.len() < count {
        let started = Instant::now();
        let ack = client.jetstream().publish(key.clone(), "doc".into()).await?;
        // A round that never comes back (seen about once in twenty runs
        // here: a hint or a status of this bare pair lost, cause not
        // found) is counted and measured again instead of ending the run.
        match tokio::time::timeout(FLOOR_ROUND_LIMIT, statuses.next()).await {
            Ok(Some(_)) => took.push(started.elapsed().as_micros() as u64),
            Ok(None) => return Err("status subscription ended".into()),
            Err(_) if lost < MAX_FLOOR_LOST => lost += 1,
            Err(_) => return Err(format!("{lost} floor rounds never came back").into()),
        }
        ack.await?;
    }
    responder.abort();
    took.sort_unstable();
    Ok((took, lost))
}
