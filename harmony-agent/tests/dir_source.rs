//! `harmony-agent run --source dir:PATH`: a folder of documents, for air-gapped devices.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status(state: &Path) -> serde_json::Value {
    std::fs::read(state.join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

#[test]
fn folder_documents_are_applied_updated_pruned_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (docs, root, state) = (dir.path().join("docs"), dir.path().join("root"), dir.path().join("state"));
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    let start = || {
        let source = format!("dir:{}", docs.display());
        Agent(
            Command::new(env!("CARGO_BIN_EXE_harmony-agent"))
                .args(["run", "--allow-unsigned", "--device-id", "dev-1", "--source", &source, "--state-dir"])
                .arg(&state)
                .arg("--root")
                .arg(&root)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let doc = |generation: u64, files: &[(&str, &str)]| {
        let scores: Vec<_> = files
            .iter()
            .map(|(p, c)| serde_json::json!({"type": "harmony.file/v1", "path": p, "content": c}))
            .collect();
        serde_json::json!({"device_id": "dev-1", "deployment": "site", "generation": generation, "scores": scores})
            .to_string()
    };

    std::fs::write(docs.join("site.json"), doc(1, &[("/a", "1"), ("/b", "1")])).unwrap();
    let agent = start();
    wait_for("generation 1", || status(&state)["deployments"]["site"]["observed_generation"] == 1);
    assert_eq!(std::fs::read_to_string(root.join("a")).unwrap(), "1");

    std::fs::write(docs.join("site.json"), doc(2, &[("/a", "2")])).unwrap();
    wait_for("generation 2", || status(&state)["deployments"]["site"]["observed_generation"] == 2);
    assert_eq!(std::fs::read_to_string(root.join("a")).unwrap(), "2");
    assert!(!root.join("b").exists());
    drop(agent);

    // Offline restart with the folder emptied meanwhile: boot applies the
    // persisted state, then the folder scan prunes the removed deployment.
    std::fs::remove_file(docs.join("site.json")).unwrap();
    let _agent = start();
    wait_for("prune", || status(&state)["deployments"]["site"]["phase"] == "pruned");
    assert!(!root.join("a").exists());
}

/// `run --config agent.toml` with a flag overriding the file, and a clean
/// exit (status 0) on SIGINT.
#[test]
fn a_toml_config_with_flag_overrides_runs_and_sigint_stops_it_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (docs, root, state) = (dir.path().join("docs"), dir.path().join("root"), dir.path().join("state"));
    let unused_root = dir.path().join("root-from-file");
    for d in [&docs, &root, &unused_root] {
        std::fs::create_dir_all(d).unwrap();
    }
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"dev-1\"\nallow_unsigned = true\nsource = \"dir:{}\"\nstate_dir = \"{}\"\nroot = \"{}\"\n[labels]\nsite = \"lab\"\n",
            docs.display(),
            state.display(),
            unused_root.display()
        ),
    )
    .unwrap();
    let doc = r#"{"device_id":"dev-1","deployment":"site","generation":1,"scores":[{"type":"harmony.file/v1","path":"/f","content":"x"}]}"#;
    std::fs::write(docs.join("site.json"), doc).unwrap();
    let mut agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_harmony-agent"))
            .args(["run", "--config"])
            .arg(&config)
            .arg("--root")
            .arg(&root)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("generation 1", || status(&state)["deployments"]["site"]["observed_generation"] == 1);
    assert!(root.join("f").exists(), "the --root flag wins over the file");
    assert!(!unused_root.join("f").exists());
    assert_eq!(status(&state)["info"]["labels"]["site"], "lab");

    let pid = agent.0.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(exit) = agent.0.try_wait().unwrap() {
            break exit.code();
        }
        assert!(Instant::now() < deadline, "agent did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
}
