//! Staged rollouts end to end (issue 11 §3): a real nats-server, 20 real
//! agents (in this process), the real `harmony-fleet` binary for the
//! command line, `FleetRolloutScore` through a `Maestro` for the library.
//!
//! Every device gets generation 1 (`/etc/app.conf` = `v1`, no checks).
//! The rollout's document sets it to `v2` and checks the sha256 of
//! `/etc/canary-ok`, a file the test puts on healthy devices only: a device
//! without it (labelled `health=bad`) fails its check and rolls itself back.
//! Agents resync once an hour: nothing converges by a timer.

use std::process::Stdio;
use std::time::{Duration, Instant};

use harmony_e2e::{deployment, file_score, within, workspace_bin, Fleet, InProcessAgent, WAIT};
use harmony_fleet::{
    Awaited, DeployRequest, DeviceState, FleetRolloutScore, FleetTopology, MaxFailures, RolloutPhase,
    RolloutStore, RolloutTargets, WaveSize,
};
use harmony_score_wire::{Check, DeviceId};
use harmony_topology::{InterpretStatus, Inventory, Maestro};
use tokio::io::AsyncBufReadExt;

const DEVICES: usize = 20;
/// sha256 of "ok".
const OK_SHA: &str = "2689367b205c16ce32ed4200942b8b8b1e262dfc70d9bc9fbc77c49699a4f1df";
/// `1,25%,50%,100%` of 20: dev-01 | dev-02..05 | dev-06..10 | dev-11..20.
const WAVES: &str = "1,25%,50%,100%";

fn id(n: usize) -> DeviceId {
    DeviceId::new(format!("dev-{n:02}")).unwrap()
}

/// 20 agents labelled `site=lab`, those in `bad` also `health=bad` and
/// without the canary file, each on generation 1 of `app`.
async fn fleet_of(bad: &[usize]) -> (Fleet, Vec<InProcessAgent>) {
    fleet_of_n(DEVICES, bad).await
}

/// [`fleet_of`] with `devices` agents.
async fn fleet_of_n(devices: usize, bad: &[usize]) -> (Fleet, Vec<InProcessAgent>) {
    let f = Fleet::new().await;
    let mut agents = Vec::new();
    for n in 1..=devices {
        let device = id(n);
        let mut layer = f.layer(device.as_str(), device.as_str());
        layer.labels.insert("site".into(), "lab".into());
        if bad.contains(&n) {
            layer.labels.insert("health".into(), "bad".into());
        } else {
            put_canary(&f, n);
        }
        agents.push(InProcessAgent::start(layer.resolve().unwrap()));
    }
    let mut awaited = Vec::new();
    for n in 1..=devices {
        f.online(&id(n)).await;
        let request = DeployRequest::new(id(n), deployment("app"), vec![file_score("/etc/app.conf", "v1")]);
        let deployed = within(f.client.deploy(request)).await.unwrap();
        awaited.push(Awaited {
            device: id(n),
            generation: deployed.generation,
            digest: Some(deployed.digest),
        });
    }
    for result in f.client.wait_for_generations(&deployment("app"), &awaited, WAIT).await.unwrap() {
        result.unwrap();
    }
    (f, agents)
}

fn put_canary(f: &Fleet, n: usize) {
    let canary = f.root(id(n).as_str(), "/etc/canary-ok");
    std::fs::create_dir_all(canary.parent().unwrap()).unwrap();
    std::fs::write(canary, "ok").unwrap();
}

/// The rollout's document, as the command line reads it.
fn document(f: &Fleet, health_timeout_s: u64) -> std::path::PathBuf {
    let path = f.dir.path().join("app-v2.json");
    let doc = serde_json::json!({
        "device_id": "dev-01", "deployment": "app", "generation": 1,
        "scores": [{"type": "harmony.file/v1", "path": "/etc/app.conf", "content": "v2"}],
        "health": [{"type": "file_sha256", "path": "/etc/canary-ok", "sha256": OK_SHA}],
        "health_timeout_s": health_timeout_s,
    });
    std::fs::write(&path, doc.to_string()).unwrap();
    path
}

fn app_conf(f: &Fleet, n: usize) -> String {
    std::fs::read_to_string(f.root(id(n).as_str(), "/etc/app.conf")).unwrap()
}

/// The generation the desired-state key of `app` holds on device `n`.
async fn key_generation(f: &Fleet, n: usize) -> u64 {
    f.client.desired_state(&id(n), &deployment("app")).await.unwrap().map_or(0, |d| d.generation)
}

/// Runs `harmony-fleet` to its end (without blocking the agents' runtime).
async fn fleet_cli(f: &Fleet, args: &[&str]) -> std::process::Output {
    let run = tokio::process::Command::new(workspace_bin("harmony-fleet"))
        .args(["--nats", &f.nats.url()])
        .args(args)
        .output();
    tokio::time::timeout(Duration::from_secs(300), run).await.expect("harmony-fleet timed out").unwrap()
}

/// `harmony-fleet rollout` of `doc` to every `site=lab` device in
/// [`WAVES`], at most 2 failures, the last wave awaited, plus `extra`.
async fn roll_out(f: &Fleet, doc: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["rollout", "--deployment", "app", doc.to_str().unwrap(), "--selector", "site=lab"];
    args.extend(["--waves", WAVES, "--max-failures", "2", "--wave-timeout", "60", "--wait"]);
    args.extend(extra);
    fleet_cli(f, &args).await
}

// With 3 devices labelled to fail and --max-failures 2, the rollout stops
// after the wave where the third fails (wave 3): wave 4's devices never get
// the new generation, and the command exits 1 with the table of who
// failed which check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_stops_after_the_wave_where_the_third_device_fails_and_later_waves_are_untouched() {
    let bad = [3, 7, 8];
    let (f, _agents) = fleet_of(&bad).await;
    let doc = document(&f, 2);
    let out = roll_out(&f, &doc, &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("rollout of app: 20 devices in 4 waves (1, 4, 5, 10)"), "{stdout}");
    assert!(
        stdout.contains("wave 2/4: 3 done, 0 failed, 1 rolled back (1 failed in all so far)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "ABORTED after wave 3: 3 of 10 devices failed (at most 2 allowed); 10 devices not updated"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("wave 4/4"), "{stdout}");
    // The table: exactly the three, each with the check that failed.
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("dev-") && l.contains("rolled_back  file_sha256"))
        .collect();
    assert_eq!(rows.len(), 3, "{stdout}");
    for (row, n) in rows.iter().zip(bad) {
        assert!(row.trim_start().starts_with(id(n).as_str()), "{row}");
    }
    for n in 1..=10 {
        let want = if bad.contains(&n) { "v1" } else { "v2" };
        assert_eq!(app_conf(&f, n), want, "dev-{n:02}");
        assert_eq!(key_generation(&f, n).await, 2, "dev-{n:02}");
    }
    for n in 11..=DEVICES {
        assert_eq!(
            (app_conf(&f, n), key_generation(&f, n).await),
            ("v1".into(), 1),
            "dev-{n:02} was not to be reached"
        );
    }
    let listed = fleet_cli(&f, &["rollouts"]).await;
    let listed = String::from_utf8_lossy(&listed.stdout);
    let row = listed.lines().find(|l| l.starts_with("app ")).unwrap_or_default().to_owned();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1..5], ["aborted", "3/4", "10/20", "3"], "{listed}");
}

// The same rollout with --revert-on-abort, from the command line: after
// the abort in wave 3, every device of waves 1 to 3 is back on v1 as
// generation 3 (the healthy ones were on v2; the failed ones had rolled
// themselves back), and wave 4 was never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_on_abort_from_the_command_line_puts_every_updated_device_back_on_the_old_content() {
    let bad = [3, 7, 8];
    let (f, _agents) = fleet_of(&bad).await;
    let doc = document(&f, 2);
    let out = roll_out(&f, &doc, &["--revert-on-abort"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("rollout reverted after wave 3 of 4"), "{stdout}");
    assert_eq!(stdout.matches(": reverted: done (generation 3)").count(), 10, "{stdout}");
    for n in 1..=10 {
        assert_eq!((app_conf(&f, n), key_generation(&f, n).await), ("v1".into(), 3), "dev-{n:02}");
    }
    for n in 11..=DEVICES {
        assert_eq!((app_conf(&f, n), key_generation(&f, n).await), ("v1".into(), 1), "dev-{n:02}");
    }
}

// The library path: the Score through a Maestro, --revert-on-abort's
// counterpart. The canary fails, the rollout stops after wave 1 and gives
// it its previous document back as generation 3 (generations never go back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_on_abort_puts_the_previous_document_back_on_the_devices_reached() {
    let bad = [1, 4];
    let (f, _agents) = fleet_of(&bad).await;
    let score = FleetRolloutScore {
        deployment: deployment("app"),
        scores: vec![file_score("/etc/app.conf", "v2")],
        health: vec![Check::FileSha256 { path: "/etc/canary-ok".into(), sha256: OK_SHA.into() }],
        health_timeout_s: Some(2),
        expires_at: None,
        targets: RolloutTargets::Devices((1..=DEVICES).map(id).collect()),
        waves: vec![WaveSize::Devices(1), WaveSize::Percent(25), WaveSize::Percent(100)],
        max_failures: MaxFailures::Percent(20),
        wave_timeout_s: 60,
        wait: true,
        revert_on_abort: true,
        force: false,
        lease_s: 30,
        resume: false,
        events: None,
    };
    let maestro =
        Maestro::initialize(Inventory::empty(), FleetTopology::from_client(f.client.clone())).await.unwrap();
    let outcome = within(maestro.interpret(&score)).await.unwrap();
    // The canary alone failed: 1 of 1 is over 20%.
    assert_eq!(outcome.status, InterpretStatus::FAILURE, "{outcome:?}");
    assert!(outcome.message.contains("rollout reverted after wave 1 of 3"), "{}", outcome.message);
    assert!(
        outcome.details.iter().any(|l| l.starts_with("dev-01") && l.contains("rolled_back")),
        "{outcome:?}"
    );
    assert_eq!((app_conf(&f, 1), key_generation(&f, 1).await), ("v1".into(), 3));
    for n in 2..=DEVICES {
        assert_eq!((app_conf(&f, n), key_generation(&f, n).await), ("v1".into(), 1), "dev-{n:02}");
    }
    let stored = f.client.load_rollout(&deployment("app")).await.unwrap().unwrap().state;
    assert_eq!(stored.phase, RolloutPhase::Reverted);
    assert_eq!(stored.reverted.len(), 1);

    // Again, 2 failures allowed: the canary (now on generation 3) and
    // dev-04 in wave 2 fail and roll themselves back, the rest move to v2,
    // and the rollout completes. A finished rollout's key is reused.
    let score = FleetRolloutScore { max_failures: MaxFailures::Devices(2), revert_on_abort: false, ..score };
    let outcome = within(maestro.interpret(&score)).await.unwrap();
    assert_eq!(outcome.status, InterpretStatus::SUCCESS, "{outcome:?}");
    assert!(
        outcome.message.contains("rollout completed: 20 devices in 3 waves, 2 failed"),
        "{}",
        outcome.message
    );
    assert_eq!(key_generation(&f, 1).await, 4);
    for n in 1..=DEVICES {
        let want = if bad.contains(&n) { "v1" } else { "v2" };
        assert_eq!(app_conf(&f, n), want, "dev-{n:02}");
    }
    // The first rollout's documents (its own and dev-01's previous one)
    // were purged when the second took the key: the state and one document.
    let bucket = f.client.jetstream().get_key_value("harmony-rollouts").await.unwrap();
    let mut keys: Vec<String> =
        futures_util::TryStreamExt::try_collect(bucket.keys().await.unwrap()).await.unwrap();
    keys.sort();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys[0] == "app" && keys[1].starts_with("app.doc."), "{keys:?}");
}

// A rollout with --revert-on-abort reads the document each device holds
// before the wave (to put it back) and again before reverting. Both reads
// are batched: with one get per device, a wave of 5,000 devices was 5,000
// round trips before its first write (minutes across a WAN). The test
// counts the operator's one-key direct gets of desired state
// (`…DIRECT.GET.<stream>.<subject>`) while one wave of 20 devices is
// written, aborts and is reverted: 0 now, 80 before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reverted_rollout_reads_the_devices_documents_in_batches_not_one_get_each() {
    use futures_util::StreamExt;
    let bad = [1, 2];
    let (f, _agents) = fleet_of(&bad).await;
    let raw = async_nats::connect(f.nats.url()).await.unwrap();
    let mut gets = raw.subscribe("$JS.API.DIRECT.GET.KV_harmony-desired-state.>").await.unwrap();
    raw.flush().await.unwrap();
    let score = FleetRolloutScore {
        revert_on_abort: true,
        lease_s: 30,
        ..rollout_score("v2", 1..=DEVICES, vec![WaveSize::Percent(100)], 2)
    };
    let maestro = maestro(&f).await;
    let outcome = within(maestro.interpret(&score)).await.unwrap();
    assert!(outcome.message.contains("rollout reverted after wave 1 of 1"), "{}", outcome.message);
    for n in 1..=DEVICES {
        assert_eq!(app_conf(&f, n), "v1", "dev-{n:02}");
    }
    let stored = f.client.load_rollout(&deployment("app")).await.unwrap().unwrap().state;
    assert_eq!(stored.reverted.len(), DEVICES, "every device reached was reverted");
    raw.flush().await.unwrap();
    let mut one_key = 0;
    while let Ok(Some(get)) = tokio::time::timeout(Duration::from_millis(200), gets.next()).await {
        // The operator's, by its inbox (each agent reads its own key under `_INBOX_<id>`).
        one_key += usize::from(get.reply.is_some_and(|r| r.starts_with("_INBOX.")));
    }
    assert!(one_key < DEVICES, "{one_key} one-key gets for {DEVICES} devices: one per device");
}

// An operator killed mid-rollout: a second operator is refused while the
// first one holds the rollout, `--resume` is refused until its lease runs
// out, then resumes and finishes it. No device gets the document twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rollout_resumes_and_finishes_and_no_second_operator_runs_it_meanwhile() {
    // Wave 2's devices lack the canary until the first operator is dead:
    // they stay `verifying`, holding the rollout in wave 2.
    let late = [2, 3, 4, 5];
    let (f, _agents) = fleet_of(&late).await;
    let doc = document(&f, 120);
    let mut first = tokio::process::Command::new(workspace_bin("harmony-fleet"))
        .args(["--nats", &f.nats.url(), "rollout", "--deployment", "app", doc.to_str().unwrap()])
        .args([
            "--selector",
            "site=lab",
            "--waves",
            WAVES,
            "--wave-timeout",
            "120",
            "--wait",
            "--json",
            "--lease",
            "2",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut events = tokio::io::BufReader::new(first.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    within(async {
        while let Some(line) = events.next_line().await.unwrap() {
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            seen.push(event.clone());
            if event["event"] == "wave_started" && event["wave"] == 2 {
                break;
            }
        }
    })
    .await;
    assert_eq!(seen[0]["event"], "started", "{seen:?}");
    assert!(
        seen.iter().any(|e| e["event"] == "device" && e["device"] == "dev-01" && e["state"] == "done"),
        "{seen:?}"
    );
    // Another operator: a new rollout and a resume are both refused.
    let second =
        fleet_cli(&f, &["rollout", "--deployment", "app", doc.to_str().unwrap(), "--devices", "dev-01"])
            .await;
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("another rollout is running (wave 2 of 4"), "{stderr}");
    let early = fleet_cli(&f, &["rollout", "--deployment", "app", "--resume"]).await;
    let stderr = String::from_utf8_lossy(&early.stderr);
    assert_eq!(early.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("it is still running"), "{stderr}");

    first.start_kill().unwrap();
    first.wait().await.unwrap();
    for n in late {
        put_canary(&f, n);
    }
    // Resume as soon as the dead operator's lease ran out.
    let deadline = Instant::now() + WAIT;
    let resumed = loop {
        let out = fleet_cli(&f, &["rollout", "--deployment", "app", "--resume"]).await;
        if !String::from_utf8_lossy(&out.stderr).contains("it is still running") {
            break out;
        }
        assert!(Instant::now() < deadline, "the lease never ran out");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let stdout = String::from_utf8_lossy(&resumed.stdout);
    println!("{stdout}");
    assert!(resumed.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(stdout.contains("resuming rollout of app: 20 devices in 4 waves"), "{stdout}");
    assert!(stdout.contains("rollout completed: 20 devices in 4 waves, 0 failed"), "{stdout}");
    for n in 1..=DEVICES {
        // Generation 2 everywhere: the resumed wave was not written twice.
        assert_eq!((app_conf(&f, n), key_generation(&f, n).await), ("v2".into(), 2), "dev-{n:02}");
    }
    let stored = f.client.load_rollout(&deployment("app")).await.unwrap().unwrap().state;
    assert_eq!((stored.phase, stored.results.len()), (RolloutPhase::Completed, DEVICES));
}

/// A rollout of `content` to `devices`, in `waves`, the canary check with
/// `health_timeout_s`, no failure allowed, a lease of 1 s.
fn rollout_score(
    content: &str,
    devices: std::ops::RangeInclusive<usize>,
    waves: Vec<WaveSize>,
    health_timeout_s: u64,
) -> FleetRolloutScore {
    FleetRolloutScore {
        deployment: deployment("app"),
        scores: vec![file_score("/etc/app.conf", content)],
        health: vec![Check::FileSha256 { path: "/etc/canary-ok".into(), sha256: OK_SHA.into() }],
        health_timeout_s: Some(health_timeout_s),
        expires_at: None,
        targets: RolloutTargets::Devices(devices.map(id).collect()),
        waves,
        max_failures: MaxFailures::Devices(0),
        wave_timeout_s: 60,
        wait: true,
        revert_on_abort: false,
        force: false,
        lease_s: 1,
        resume: false,
        events: None,
    }
}

async fn maestro(f: &Fleet) -> Maestro<FleetTopology> {
    Maestro::initialize(Inventory::empty(), FleetTopology::from_client(f.client.clone())).await.unwrap()
}

/// Resumes the rollout of `app` as soon as its owner's lease ran out.
async fn resume_after_lease(maestro: &Maestro<FleetTopology>) -> harmony_topology::Outcome {
    let deadline = Instant::now() + WAIT;
    loop {
        match within(maestro.interpret(&FleetRolloutScore::resume(deployment("app"), None))).await {
            Err(err) if err.to_string().contains("it is still running") => {
                assert!(Instant::now() < deadline, "the lease never ran out");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => break other.unwrap(),
        }
    }
}

// Attack: two operators start a rollout of one deployment at the same
// instant, with different documents. Exactly one may run; the other must
// write no device, and must not leave its document where the winner's
// `--resume` reads the winner's (it wrote `<deployment>.doc` before its
// compare-and-set lost, so a killed winner could never be resumed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_rollouts_started_at_once_one_runs_the_other_writes_nothing_and_the_winner_resumes() {
    let late = [2, 3];
    let (f, _agents) = fleet_of_n(3, &late).await;
    let maestro = maestro(&f).await;
    let waves = vec![WaveSize::Devices(1), WaveSize::Percent(100)];
    let (a, b) = (rollout_score("v2", 1..=3, waves.clone(), 120), rollout_score("v3", 1..=3, waves, 120));
    let raced =
        futures_util::future::select(Box::pin(maestro.interpret(&a)), Box::pin(maestro.interpret(&b)));
    let (lost, winner, content) = match within(raced).await {
        futures_util::future::Either::Left((lost, winner)) => (lost, winner, "v3"),
        futures_util::future::Either::Right((lost, winner)) => (lost, winner, "v2"),
    };
    let err = lost.expect_err("the loser is refused").to_string();
    assert!(err.contains("at the same time") || err.contains("another rollout is running"), "{err}");
    // The winner writes wave 2 and waits on it (its devices lack the
    // canary); then its operator dies.
    let _ = tokio::time::timeout(Duration::from_secs(4), winner).await;
    for n in 1..=3 {
        assert_eq!(key_generation(&f, n).await, 2, "dev-{n:02}: only the winner writes, once");
    }
    for n in late {
        put_canary(&f, n);
    }
    let outcome = resume_after_lease(&maestro).await;
    assert_eq!(outcome.status, InterpretStatus::SUCCESS, "{outcome:?}");
    for n in 1..=3 {
        assert_eq!((app_conf(&f, n), key_generation(&f, n).await), (content.into(), 2), "dev-{n:02}");
    }
}

// Attack: the document a device held before the rollout carried an expiry
// (now past). The docs promise the revert writes it "without its expiry";
// written with it, every device rejects the revert as expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_gives_the_previous_document_back_without_its_expiry() {
    let (f, _agents) = fleet_of_n(2, &[1]).await;
    let expires_at = harmony_score_wire::now_ms() / 1000 + 3;
    for n in 1..=2 {
        let request = DeployRequest::new(id(n), deployment("app"), vec![file_score("/etc/app.conf", "v1")])
            .expires_at(Some(expires_at));
        assert_eq!(within(f.client.deploy(request)).await.unwrap().generation, 2);
        f.applied(&id(n), "app", 2).await;
    }
    while harmony_score_wire::now_ms() / 1000 <= expires_at {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let score = FleetRolloutScore {
        revert_on_abort: true,
        ..rollout_score("v2", 1..=2, vec![WaveSize::Devices(1), WaveSize::Percent(100)], 2)
    };
    let outcome = within(maestro(&f).await.interpret(&score)).await.unwrap();
    assert!(outcome.message.contains("rollout reverted after wave 1 of 2"), "{}", outcome.message);
    let stored = f.client.load_rollout(&deployment("app")).await.unwrap().unwrap().state;
    let reverted = &stored.reverted[&id(1)];
    assert_eq!((reverted.state, reverted.generation), (DeviceState::Done, 4), "{reverted:?}");
    assert_eq!(app_conf(&f, 1), "v1");
    assert_eq!(key_generation(&f, 2).await, 2, "dev-02 was not reached");
}

// Attack: another operator deploys to a device after the rollout wrote it
// and before the rollout aborts. The revert must undo the rollout's write,
// not the other operator's: it leaves that device as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_leaves_a_device_another_operator_wrote_since() {
    let (f, _agents) = fleet_of_n(3, &[2]).await;
    let score = FleetRolloutScore {
        revert_on_abort: true,
        ..rollout_score("v2", 1..=3, vec![WaveSize::Devices(2), WaveSize::Percent(100)], 4)
    };
    let client = f.client.clone();
    let rollout = tokio::spawn(async move {
        let maestro =
            Maestro::initialize(Inventory::empty(), FleetTopology::from_client(client)).await.unwrap();
        maestro.interpret(&score).await
    });
    // dev-01 applies the rollout's generation 2 while dev-02's check still
    // runs (4 s); then another operator gives dev-01 generation 3.
    f.applied(&id(1), "app", 2).await;
    let request = DeployRequest::new(id(1), deployment("app"), vec![file_score("/etc/app.conf", "v9")]);
    assert_eq!(within(f.client.deploy(request)).await.unwrap().generation, 3);
    let outcome = within(rollout).await.unwrap().unwrap();
    assert!(outcome.message.contains("rollout reverted after wave 1 of 2"), "{}", outcome.message);
    f.applied(&id(1), "app", 3).await;
    assert_eq!(
        (app_conf(&f, 1), key_generation(&f, 1).await),
        ("v9".into(), 3),
        "the other operator's write"
    );
    assert_eq!((app_conf(&f, 2), key_generation(&f, 2).await), ("v1".into(), 3), "dev-02 reverted");
    let stored = f.client.load_rollout(&deployment("app")).await.unwrap().unwrap().state;
    let left = &stored.reverted[&id(1)];
    assert!(left.state.is_failure() && left.detail.contains("written since"), "{left:?}");
    assert_eq!(stored.reverted[&id(2)].state, DeviceState::Done);
}

// Attack: an operator killed during the revert, after the revert wrote a
// device, resumed: that device holds its previous document as a newer
// generation than the rollout's, which is the revert's own write, not
// another operator's. It is awaited, not written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_interrupted_after_its_writes_resumes_without_writing_again() {
    let (f, _agents) = fleet_of_n(2, &[1]).await;
    let score = FleetRolloutScore {
        revert_on_abort: true,
        ..rollout_score("v2", 1..=2, vec![WaveSize::Devices(1), WaveSize::Percent(100)], 2)
    };
    let maestro = maestro(&f).await;
    let outcome = within(maestro.interpret(&score)).await.unwrap();
    assert!(outcome.message.contains("rollout reverted"), "{}", outcome.message);
    assert_eq!(key_generation(&f, 1).await, 3);
    // As stored just before its owner died: reverting, dev-01 not yet recorded as reverted.
    let stored = f.client.load_rollout(&deployment("app")).await.unwrap().unwrap();
    let mut state = stored.state;
    state.phase = RolloutPhase::Reverting;
    state.reverted.clear();
    f.client.save_rollout(&state, stored.revision).await.unwrap();
    let outcome = resume_after_lease(&maestro).await;
    assert!(outcome.message.contains("rollout reverted"), "{}", outcome.message);
    let stored = f.client.load_rollout(&deployment("app")).await.unwrap().unwrap().state;
    let reverted = &stored.reverted[&id(1)];
    assert_eq!((reverted.state, reverted.generation), (DeviceState::Done, 3), "{reverted:?}");
    assert_eq!((app_conf(&f, 1), key_generation(&f, 1).await), ("v1".into(), 3));
}

// Attack: an owner that is alive but stopped (SIGSTOP: a laptop lid, a
// long GC pause) past its lease is taken over; once it runs again it must
// stop at its next state write and write no device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_owner_that_was_taken_over_stops_and_writes_nothing_more() {
    let late = [2, 3];
    let (f, _agents) = fleet_of_n(4, &late).await;
    let doc = document(&f, 120);
    let mut first = tokio::process::Command::new(workspace_bin("harmony-fleet"))
        .args(["--nats", &f.nats.url(), "rollout", "--deployment", "app", doc.to_str().unwrap()])
        .args(["--devices", "dev-01,dev-02,dev-03,dev-04", "--waves", "1,100%", "--wave-timeout", "120"])
        .args(["--wait", "--json", "--lease", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = first.id().unwrap().to_string();
    let mut events = tokio::io::BufReader::new(first.stdout.take().unwrap()).lines();
    within(async {
        while let Some(line) = events.next_line().await.unwrap() {
            if line.contains("\"wave_started\"") && line.contains("\"wave\":2") {
                break;
            }
        }
    })
    .await;
    within(async {
        while key_generation(&f, 4).await != 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let signal = |sig: &str| std::process::Command::new("kill").args([sig, &pid]).status().unwrap();
    assert!(signal("-STOP").success());
    for n in late {
        put_canary(&f, n);
    }
    let outcome = resume_after_lease(&maestro(&f).await).await;
    assert_eq!(outcome.status, InterpretStatus::SUCCESS, "{outcome:?}");
    assert!(signal("-CONT").success());
    let out = within(first.wait_with_output()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("taken over by another operator"), "{stderr}");
    for n in 1..=4 {
        assert_eq!((app_conf(&f, n), key_generation(&f, n).await), ("v2".into(), 2), "dev-{n:02}");
    }
}

// Attack: a value in the rollouts bucket that is not a rollout state (a
// foreign tool's, a corrupt one) under a key that looks like a deployment.
// `rollouts` lists every other rollout, and names that key as unreadable,
// instead of failing the whole listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_lists_the_others_when_one_value_is_undecodable() {
    let (f, _agents) = fleet_of_n(1, &[]).await;
    let doc = document(&f, 5);
    let out =
        fleet_cli(&f, &["rollout", "--deployment", "app", doc.to_str().unwrap(), "--devices", "dev-01"])
            .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let nats = async_nats::connect(f.nats.url()).await.unwrap();
    let bucket = async_nats::jetstream::new(nats)
        .get_key_value(harmony_score_wire::names::ROLLOUTS_BUCKET)
        .await
        .unwrap();
    bucket.put("junk", "\u{1b}[2Jnot cbor".into()).await.unwrap();
    let listed = fleet_cli(&f, &["rollouts"]).await;
    let (stdout, stderr) = (String::from_utf8_lossy(&listed.stdout), String::from_utf8_lossy(&listed.stderr));
    assert!(listed.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.lines().any(|l| l.starts_with("app ") && l.contains("completed")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("junk ") && l.contains("unreadable")), "{stdout}");
    assert!(!stdout.contains('\u{1b}') && !stderr.contains('\u{1b}'), "{stdout}\n{stderr}");
    let json = fleet_cli(&f, &["rollouts", "--json"]).await;
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
}

// --wave-timeout: a device that never reports (its agent stopped) counts
// as failed when the wave's time is up, names the timeout, and with no
// failure allowed stops the rollout before the next wave. The wave ends at
// its timeout, not later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_reports_fails_its_wave_at_the_wave_timeout() {
    let (f, mut agents) = fleet_of_n(4, &[]).await;
    // dev-02's agent is gone: its key is written, nobody applies it.
    within(agents.remove(1).stop()).await.unwrap();
    let score = FleetRolloutScore {
        wave_timeout_s: 2,
        ..rollout_score(
            "v2",
            1..=4,
            vec![WaveSize::Devices(1), WaveSize::Devices(2), WaveSize::Percent(100)],
            30,
        )
    };
    let started = Instant::now();
    let outcome = within(maestro(&f).await.interpret(&score)).await.unwrap();
    let took = started.elapsed();
    assert_eq!(outcome.status, InterpretStatus::FAILURE, "{outcome:?}");
    assert!(outcome.message.contains("rollout aborted after wave 2 of 3"), "{}", outcome.message);
    let row = outcome.details.iter().find(|l| l.starts_with("dev-02")).cloned().unwrap_or_default();
    assert!(row.contains("failed") && row.contains("timed out"), "{outcome:?}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(20), "{took:?}");
    assert_eq!((app_conf(&f, 1), key_generation(&f, 2).await), ("v2".into(), 2));
    // Wave 3 (dev-03, dev-04) never written.
    for n in 3..=4 {
        assert_eq!((app_conf(&f, n), key_generation(&f, n).await), ("v1".into(), 1), "dev-{n:02}");
    }
}
