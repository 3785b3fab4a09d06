//! §1: the nats-server restarts (same store) while the operator writes, and
//! is down when the agent starts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harmony_e2e::{deployment, file_score, within, FaultRng, Fleet};
use harmony_fleet::{DeployRequest, FleetClient};
use harmony_score_wire::DeviceId;

/// Deploys `content` to `device`'s `app`, retrying while the server is
/// away (the operator's job: a write that failed is written again), for at
/// most a minute. Returns the generation written.
async fn deploy_retrying(client: &FleetClient, device: &DeviceId, content: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let request =
            DeployRequest::new(device.clone(), deployment("app"), vec![file_score("/etc/app", content)])
                .force(true);
        match tokio::time::timeout(Duration::from_secs(5), client.deploy(request)).await {
            Ok(Ok(written)) => return written.generation,
            Ok(Err(err)) => assert!(Instant::now() < deadline, "deploy kept failing: {err}"),
            Err(_) => assert!(Instant::now() < deadline, "deploy kept timing out"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Ten restarts of the server at random points of a stream of writes; the
// agent must end at the last generation written, every time. The agent's
// resync is an hour away: what converges it is the reconnect's full read
// and the live hints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_generation_lands_through_ten_server_restarts_during_writes() {
    let mut rng = FaultRng::from_env("server restarts");
    let mut f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let agent = f.agent_process("dev-1", "dev-1", &[]);
    f.online(&device).await;

    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, device, done) = (f.client.clone(), device.clone(), done.clone());
        tokio::spawn(async move {
            let mut written = Vec::new();
            // Until the restarts are over, and a few writes after the last.
            let mut after = 0;
            for i in 0.. {
                let generation = deploy_retrying(&client, &device, &format!("write {i}\n")).await;
                written.push((generation, format!("write {i}\n")));
                if done.load(Ordering::Relaxed) {
                    after += 1;
                    if after == 3 {
                        break;
                    }
                }
            }
            written
        })
    };
    let mut downtimes = Vec::new();
    for _ in 0..10 {
        tokio::time::sleep(rng.millis(50..600)).await;
        let down = rng.millis(0..400);
        downtimes.push(down.as_millis());
        tokio::task::block_in_place(|| f.nats.restart_after(down));
    }
    done.store(true, Ordering::Relaxed);
    let written = within(writer).await.expect("writer");
    let (last, content) = written.last().cloned().expect("writes");
    eprintln!("server restarts: 10 restarts (down {downtimes:?} ms) during {} writes", written.len());

    let status = f.applied(&device, "app", last).await;
    assert!(status.errors.is_empty(), "{:?}", status.errors);
    assert_eq!(std::fs::read_to_string(f.root("dev-1", "/etc/app")).unwrap(), content);
    // The reconnects were real (one server process per restart), logged.
    let log = agent.log_text();
    assert!(log.matches("connected to NATS; reading all keys").count() >= 2, "{log}");
}

// The server is down when the agent starts: the agent runs its persisted
// state with no network, keeps trying (bounded, jittered backoff: see
// `reconnect_delays_double_are_capped_and_jittered`), and converges on
// what was written while it was away as soon as the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_while_the_server_is_down_runs_its_state_then_converges_when_it_returns() {
    let mut f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let mut agent = f.agent_process("dev-1", "dev-1", &[]);
    let g1 = f.deploy(&device, "app", vec![file_score("/etc/app", "one\n")]).await;
    f.applied(&device, "app", g1).await;
    agent.stop();

    // Drift while nobody watches, then the server goes away.
    let managed = f.root("dev-1", "/etc/app");
    std::fs::write(&managed, "drifted\n").unwrap();
    tokio::task::block_in_place(|| f.nats.stop());
    let agent = f.agent_process("dev-1", "dev-1", &[]);
    let started = Instant::now();
    within(async {
        while std::fs::read_to_string(&managed).unwrap_or_default() != "one\n" {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    eprintln!("server down at start: persisted state re-applied after {:?}", started.elapsed());

    // Several connection attempts fail while it stays down.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(agent.pid().is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists()));
    tokio::task::block_in_place(|| f.nats.start_again());
    let g2 = within(async { deploy_retrying(&f.client, &device, "two\n").await }).await;
    let back = Instant::now();
    f.applied(&device, "app", g2).await;
    eprintln!("server back: generation {g2} applied {:?} after the write", back.elapsed());
    assert_eq!(std::fs::read_to_string(&managed).unwrap(), "two\n");
}

// A partition: the agent's link to the server is cut while the server
// stays up for the operator, who writes meanwhile. The hint for that write
// went nowhere; the agent must read it when its link returns (the full
// read after every reconnect), not an hour later at the resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_made_while_the_agent_was_cut_off_is_applied_when_its_link_returns() {
    let f = Fleet::new().await;
    let proxy = harmony_e2e::TcpProxy::start(f.nats.port()).await;
    let device = DeviceId::new("dev-1").unwrap();
    let agent = f.agent_process("dev-1", "dev-1", &["--nats", &proxy.url()]);
    let g1 = f.deploy(&device, "app", vec![file_score("/etc/app", "one\n")]).await;
    f.applied(&device, "app", g1).await;

    for round in 0..3 {
        proxy.cut();
        within(async {
            while agent.log_text().matches("disconnected from NATS").count() <= round {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let content = format!("written while cut off {round}\n");
        let g = f.deploy(&device, "app", vec![file_score("/etc/app", &content)]).await;
        proxy.restore();
        f.applied(&device, "app", g).await;
        assert_eq!(std::fs::read_to_string(f.root("dev-1", "/etc/app")).unwrap(), content);
    }
}
