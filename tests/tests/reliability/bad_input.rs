//! Issue 9 §5: the bad-input corpus (`tests/corpus/bad-input/`, made by
//! `tests/corpus/generate.rs`), each value written raw to a running agent
//! process's key through NATS.
//!
//! Each must be refused with a typed error in status (`phase: rejected`, a
//! known `error.kind`) while the good generation stays observed and its
//! file stays on disk; at the end the agent is alive, never panicked, and
//! its peak memory (VmHWM) stayed bounded. The agent resyncs once an hour:
//! every refusal is reached through the live path.

#[path = "../../corpus/generate.rs"]
mod generate;

use std::path::PathBuf;

use futures_util::FutureExt;

use harmony_e2e::{until_status, within, workspace_root, AgentProcess, NatsServer};
use harmony_fleet::{DeployRequest, FleetClient};
use harmony_score_wire::names::{desired_state_key, DESIRED_STATE_BUCKET};
use harmony_score_wire::{document_digest, DeploymentName, DeviceId, ErrorKind, Phase};

/// Peak memory the agent may reach over the whole corpus.
const MAX_HWM_KIB: u64 = 200 * 1024;

fn corpus_dir() -> PathBuf {
    workspace_root().join("tests/corpus/bad-input")
}

/// The committed files, sorted by name.
fn committed_files() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir())
        .expect("tests/corpus/bad-input exists")
        .map(|e| e.expect("dir entry").path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

#[test]
fn corpus_matches_its_generator() {
    let cases = generate::committed();
    if std::env::var_os("HARMONY_REGENERATE_CORPUS").is_some() {
        let dir = corpus_dir();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &cases {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let expected: Vec<(String, Vec<u8>)> = cases.into_iter().map(|(n, b)| (n.to_owned(), b)).collect();
    let files = committed_files();
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&files),
        names(&expected),
        "the corpus' files are the generator's cases (regenerate it)"
    );
    for ((name, got), (_, want)) in files.iter().zip(&expected) {
        assert!(got == want, "{name} differs from what the generator makes (regenerate the corpus)");
    }
    assert!(files.len() >= 30, "at least 30 cases");
    let total: usize = files.iter().map(|(_, b)| b.len()).sum();
    assert!(total < 1 << 20, "the committed corpus stays small: {total} bytes");
}

fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent process exists")
}

fn status_field(status: &str, field: &str) -> String {
    let line = status.lines().find(|l| l.starts_with(field)).expect("field in /proc status");
    line[field.len()..].trim().to_owned()
}

fn hwm_kib(pid: u32) -> u64 {
    let value = status_field(&proc_status(pid), "VmHWM:");
    value.split_whitespace().next().and_then(|n| n.parse().ok()).expect("a number of KiB")
}

fn alive(pid: u32) -> bool {
    !status_field(&proc_status(pid), "State:").starts_with('Z')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_refused_with_a_typed_error_and_the_good_generation_keeps_running() {
    harmony_scores::ensure_linked();
    // Room for the 1 MiB + 1 byte document (the default max payload is 1 MiB).
    let nats = NatsServer::start_with_config("max_payload: 4194304\n");
    let client = within(FleetClient::connect(&[nats.url()], None)).await.unwrap();
    within(client.ensure_buckets()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (root, state) = (dir.path().join("root"), dir.path().join("state"));
    std::fs::create_dir(&root).unwrap();
    let key_file = dir.path().join("operator.pub");
    std::fs::write(
        &key_file,
        harmony_score_wire::to_hex32(generate::trusted_signer().verifying_key().as_bytes()),
    )
    .unwrap();
    let device = DeviceId::new(generate::DEVICE).unwrap();
    let deployment = DeploymentName::new(generate::DEPLOYMENT).unwrap();
    let url = nats.url();
    let mut args = harmony_e2e::agent_args(device.as_str(), &url, &state, &root);
    args.extend(["--trusted-key".to_owned(), key_file.to_str().unwrap().to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = AgentProcess::start(&args, &dir.path().join("agent.log"));
    let pid = agent.pid().unwrap();
    until_status(&client, &device, "online", |s| s.info.is_some()).await;

    // The good generation, applied.
    let good = harmony_e2e::file_score("/etc/motd", "good\n");
    let request = DeployRequest::new(device.clone(), deployment.clone(), vec![good]).force(true);
    let deployed = within(client.deploy(request)).await.unwrap();
    let applied = until_status(&client, &device, "the good generation applied", |s| {
        s.deployments.get(&deployment).is_some_and(|d| {
            d.phase == Phase::Applied && d.observed_digest.as_deref() == Some(deployed.digest.as_str())
        })
    })
    .await;
    let good_status = applied.deployments[&deployment].clone();
    let motd = root.join("etc/motd");
    assert_eq!(std::fs::read(&motd).unwrap(), b"good\n");

    let kv = within(client.jetstream().get_key_value(DESIRED_STATE_BUCKET)).await.unwrap();
    let key = desired_state_key(&device, &deployment);
    let cases: Vec<(String, Vec<u8>)> = committed_files()
        .into_iter()
        .chain(generate::on_the_fly().into_iter().map(|(n, b)| (n.to_owned(), b)))
        .collect();
    assert!(cases.len() >= 30 + 4);
    let mut table = Vec::new();
    for (name, bytes) in &cases {
        let digest = document_digest(bytes);
        within(kv.put(key.clone(), bytes.clone().into()))
            .await
            .unwrap_or_else(|e| panic!("{name}: cannot write: {e}"));
        let what = format!("{name} refused");
        let refused = until_status(&client, &device, &what, |s| {
            s.deployments
                .get(&deployment)
                .is_some_and(|d| d.desired_digest.as_deref() == Some(digest.as_str()))
        });
        // On a timeout, the agent's log says what it made of the write.
        let Ok(status) = std::panic::AssertUnwindSafe(refused).catch_unwind().await else {
            panic!("{name}: no refusal in status; agent log:\n{}", agent.log_text())
        };
        let d = &status.deployments[&deployment];
        assert_eq!(d.phase, Phase::Rejected, "{name}: not refused: {d:#?}\n{}", agent.log_text());
        let error = d.error.as_ref().unwrap_or_else(|| panic!("{name}: refused without an error: {d:#?}"));
        assert_ne!(error.kind, ErrorKind::Unknown, "{name}: an untyped error: {error:?}");
        assert!(
            !error.message.chars().any(char::is_control),
            "{name}: the error message echoes control characters: {:?}",
            error.message
        );
        assert!(
            !error.message.contains("Semantic(None, \"Semantic("),
            "{name}: the error message nests the decoder's debug output: {:?}",
            error.message
        );
        assert_eq!(
            (d.observed_generation, d.observed_digest.as_ref()),
            (good_status.observed_generation, good_status.observed_digest.as_ref()),
            "{name}: the good generation is no longer the observed one"
        );
        assert_eq!(std::fs::read(&motd).unwrap(), b"good\n", "{name}: the good file changed");
        assert!(alive(pid), "{name}: the agent died:\n{}", agent.log_text());
        table.push((name.clone(), bytes.len(), error.kind, error.message.clone()));
    }

    let hwm = hwm_kib(pid);
    let log = agent.log_text();
    assert!(!log.contains("panicked"), "the agent panicked:\n{log}");
    println!("{:<44} {:>9}  {:<24} message", "case", "bytes", "error.kind");
    for (name, len, kind, message) in &table {
        let message: String = message.chars().take(100).collect();
        println!("{name:<44} {len:>9}  {:<24} {message}", kind.as_str());
    }
    println!("cases: {}; agent VmHWM: {hwm} KiB ({:.1} MiB)", table.len(), hwm as f64 / 1024.0);
    assert!(hwm < MAX_HWM_KIB, "the agent's peak memory {hwm} KiB is over {MAX_HWM_KIB} KiB");
    assert_eq!(agent.stop(), Some(0), "the agent stops cleanly:\n{}", agent.log_text());
}
