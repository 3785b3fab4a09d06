//! §4: an offline boot runs the last accepted document from the state
//! directory, before any network; a corrupt or truncated state file is
//! detected, kept aside with a clear log line, and the state comes back
//! from NATS.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harmony_e2e::{file_score, within, Fleet};
use harmony_score_wire::DeviceId;

/// Waits until every `(path, content)` holds.
async fn until_files(files: &[(PathBuf, String)]) {
    within(async {
        while !files
            .iter()
            .all(|(path, content)| std::fs::read_to_string(path).ok().as_ref() == Some(content))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

// The server the agent is given accepts TCP connections and never says a
// word: a connect hangs until its timeout, and again at every retry. An
// agent that waited for the network before applying would never restore
// the files; this one must, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_boot_reapplies_the_last_accepted_document_before_any_network() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let mut agent = f.agent_process("dev-1", "dev-1", &[]);
    let files: Vec<(PathBuf, String)> =
        (0..5).map(|i| (f.root("dev-1", &format!("/etc/app/{i}.conf")), format!("file {i}\n"))).collect();
    let scores =
        (0..5).map(|i| file_score(&format!("/etc/app/{i}.conf"), &format!("file {i}\n"))).collect::<Vec<_>>();
    let g = f.deploy(&device, "app", scores).await;
    f.applied(&device, "app", g).await;
    agent.stop();

    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("nats://{}", silent.local_addr().unwrap());
    let mut took = Vec::new();
    for round in 0..5 {
        // Drift of every kind while the agent is down: a file deleted, one
        // rewritten, one truncated.
        std::fs::remove_file(&files[0].0).unwrap();
        std::fs::write(&files[1].0, "drifted\n").unwrap();
        std::fs::write(&files[2].0, "").unwrap();
        let started = Instant::now();
        let mut agent = f.agent_process("dev-1", "dev-1", &["--nats", &silent_url]);
        until_files(&files).await;
        took.push(started.elapsed());
        let log = agent.log_text();
        assert!(log.contains("applying persisted desired state"), "round {round}: {log}");
        assert!(!log.contains("connected to NATS"), "round {round}: it reached a server: {log}");
        // SIGTERM with no server: it exits by itself (no status write or
        // flush waiting on a connection that never comes).
        assert_eq!(agent.stop(), Some(0), "round {round}: {}", agent.log_text());
    }
    took.sort();
    eprintln!("offline boot: files restored after {took:?} (process start included); median {:?}", took[2]);
}

/// The one deployment record in `state`.
fn record(state: &Path) -> PathBuf {
    let records: Vec<_> = std::fs::read_dir(state.join("deployments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "state"))
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    records[0].clone()
}

fn kept_aside(state: &Path) -> usize {
    std::fs::read_dir(state.join("deployments"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".unreadable-"))
        .count()
}

// A record with one byte flipped (its checksum no longer holds), cut to
// half, cut to nothing: each is detected at boot, kept aside (never
// overwritten, never run), logged, and the deployment is read again from
// NATS and applied. The agent's resync is an hour away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_truncated_state_file_is_kept_aside_and_the_state_recovered_from_nats() {
    let f = Fleet::new().await;
    let device = DeviceId::new("dev-1").unwrap();
    let mut agent = f.agent_process("dev-1", "dev-1", &[]);
    let g = f.deploy(&device, "app", vec![file_score("/etc/app", "kept\n")]).await;
    f.applied(&device, "app", g).await;
    agent.stop();
    let state = f.folder("dev-1").join("state");
    let managed = f.root("dev-1", "/etc/app");

    type Corruption = (&'static str, fn(&mut Vec<u8>));
    let corruptions: [Corruption; 3] = [
        ("a flipped byte", |bytes| {
            let at = bytes.len() - 40;
            bytes[at] ^= 0x20;
        }),
        ("truncated to half", |bytes| bytes.truncate(bytes.len() / 2)),
        ("empty", Vec::clear),
    ];
    for (round, (what, corrupt)) in corruptions.into_iter().enumerate() {
        let path = record(&state);
        let mut bytes = std::fs::read(&path).unwrap();
        corrupt(&mut bytes);
        std::fs::write(&path, bytes).unwrap();
        std::fs::write(&managed, "drifted\n").unwrap();

        let mut agent = f.agent_process("dev-1", "dev-1", &[]);
        f.applied(&device, "app", g).await;
        until_files(&[(managed.clone(), "kept\n".to_owned())]).await;
        let log = agent.log_text();
        assert!(
            log.contains("persisted state unreadable; kept aside, reading the key again"),
            "{what}: {log}"
        );
        if what == "a flipped byte" {
            assert!(log.contains("checksum mismatch"), "{what}: {log}");
        }
        assert_eq!(kept_aside(&state), round + 1, "{what}: the corrupt record was not kept aside");
        // Recovered: a fresh, readable record again.
        agent.stop();
        let recovered = std::fs::read(record(&state)).unwrap();
        assert!(recovered.len() > 64, "{what}");
    }
}
