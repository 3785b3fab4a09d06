//! Issue 9 §3: the agent process is killed with SIGKILL at random points of
//! the apply of a multi-Score document (four large files and a container),
//! 50 times.
//!
//! Each round deploys a new generation (every file's content changes, the
//! container's spec every third round), kills the agent after a random
//! delay calibrated from measured apply times (so kills land before, during
//! and after the apply), looks at what the kill left (each managed file is
//! exactly the old or the new content, the Scores ran in document order),
//! restarts the agent and waits on the status for that generation applied
//! by the new instance. A Score whose change was on disk before the kill
//! must report NOOP then, the others SUCCESS. A thread reads every managed
//! file throughout: each read must be one generation's content, byte for
//! byte. After each convergence no temp file is left in the managed
//! directories or the state directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harmony_e2e::{deployment, free_port, until_status, within, AgentProcess, Fleet, WAIT};
use harmony_score_wire::{AgentStatus, DeviceId, DeviceScore, Phase};
use harmony_scores::PodmanContainerScore;
use harmony_topology::InterpretStatus;
use sha2::{Digest, Sha256};

/// Kill rounds.
const ROUNDS: usize = 50;
/// Rounds before them that are not killed: they create everything and
/// measure how long an apply takes.
const CALIBRATION: usize = 3;
/// The managed files, in document order (the container sits between the
/// second and the third).
const FILES: [&str; 4] = ["/etc/app/a.conf", "/etc/app/b.conf", "/var/lib/app/c.dat", "/var/lib/app/d.dat"];
/// The container's index in the document.
const CONTAINER_AT: usize = 2;
const DEPLOYMENT: &str = "crash";
const IMAGE: &str = "localhost/harmony-busybox:test";
/// The temp files of the agent's atomic writes.
const TEMP_PREFIX: &str = ".harmony-tmp.";

/// A small xorshift generator: the kill delays (seeded from the clock, or
/// `HARMONY_CRASH_SEED` to replay a run) and the files' bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The content of file `file` at round `round`: 150 to 200 KiB of text,
/// different at every round and for every file, so a mix of two versions
/// or a truncation matches no version.
fn content(file: usize, round: usize) -> String {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((file as u64) << 32) ^ round as u64 ^ 1);
    let size = 150 * 1024 + (rng.next() % (50 * 1024)) as usize;
    let mut text = format!("# {} at round {round}\n", FILES[file]);
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    while text.len() < size {
        let line: String = (0..63).map(|_| ALPHABET[(rng.next() % 36) as usize] as char).collect();
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// The container's spec version at `round`: it changes every third round.
fn container_version(round: usize) -> usize {
    round.div_ceil(3)
}

fn sha(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn podman(args: &[&str]) -> String {
    let out = Command::new("podman").args(args).output().expect("podman runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The test's container, removed on drop whatever happened.
struct Container {
    name: String,
    port: u16,
}

impl Container {
    fn new() -> Self {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        Self { name: format!("harmony-e2e-crash-{}-{nanos}", std::process::id()), port: free_port() }
    }

    /// busybox httpd with `GREETING=v<version>`.
    fn score(&self, version: usize) -> Box<dyn DeviceScore> {
        let json = serde_json::json!({
            "type": "harmony.podman.container/v1",
            "name": self.name,
            "image": IMAGE,
            "command": ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
            "ports": [format!("127.0.0.1:{}:8080", self.port)],
            "env": {"GREETING": format!("v{version}")},
            // httpd as PID 1 ignores SIGTERM: every stop waits this long.
            "stop_timeout_s": 1,
        });
        Box::new(serde_json::from_value::<PodmanContainerScore>(json).expect("a container Score"))
    }

    /// `Some(version)` when the container runs with that spec version;
    /// `None` when it is missing, stopped or created but not started.
    fn running_version(&self) -> Option<usize> {
        let state = podman(&[
            "container",
            "inspect",
            "--format",
            "{{.State.Status}} {{range .Config.Env}}{{.}} {{end}}",
            &self.name,
        ]);
        let mut words = state.split_whitespace();
        if words.next() != Some("running") {
            return None;
        }
        words.find_map(|w| w.strip_prefix("GREETING=v")).and_then(|v| v.parse().ok())
    }

    /// Waits until no podman process naming this container is left: a
    /// podman the killed agent started goes on by itself, and the next
    /// agent must find what it leaves, not race it.
    async fn until_no_orphans(&self) -> usize {
        let deadline = Instant::now() + WAIT;
        let mut waited_for = 0;
        loop {
            let orphans = podman_processes_naming(&self.name);
            if orphans == 0 {
                return waited_for;
            }
            waited_for = waited_for.max(orphans);
            assert!(Instant::now() < deadline, "podman processes for {} still run", self.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ =
            Command::new("podman").args(["rm", "--force", "--ignore", "--time", "0", &self.name]).output();
    }
}

/// How many `podman` processes have `name` on their command line.
fn podman_processes_naming(name: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "podman"))
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == name.as_bytes()))
        })
        .count()
}

/// What the reader thread saw.
#[derive(Debug, Default)]
struct Reads {
    reads: u64,
    torn: Vec<String>,
}

/// Reads every managed file in a loop until `stop`: each read must be
/// exactly one round's content of that file (or missing before it was
/// first seen).
fn read_files_until(
    stop: Arc<AtomicBool>,
    paths: Vec<PathBuf>,
    known: Arc<HashMap<[u8; 32], (usize, usize)>>,
) -> Reads {
    let mut seen = vec![false; paths.len()];
    let mut reads = Reads::default();
    while !stop.load(Ordering::Relaxed) {
        for (i, path) in paths.iter().enumerate() {
            match std::fs::read(path) {
                Ok(bytes) => {
                    reads.reads += 1;
                    seen[i] = true;
                    if known.get(&sha(&bytes)).is_none_or(|(file, _)| *file != i) {
                        reads.torn.push(format!(
                            "{}: {} bytes matching no round",
                            path.display(),
                            bytes.len()
                        ));
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound && !seen[i] => {}
                Err(err) => reads.torn.push(format!("{}: {err}", path.display())),
            }
        }
        // A sampling pace, not a wait for a condition: leave the agent
        // and podman most of the machine's two cores.
        std::thread::sleep(Duration::from_millis(5));
    }
    reads
}

/// Stops the reader thread when dropped, also when the test fails.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The agent's temp files beneath `dir`, at any depth.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path);
            } else if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                found.push(path);
            }
        }
    }
    found
}

/// Polls `dir` until a temp file of the agent shows up in it, then waits
/// `after` more; `false` when none showed up within `limit`.
fn until_temp_file_in(dir: &Path, after: Duration, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let entries = std::fs::read_dir(dir).into_iter().flatten().filter_map(Result::ok);
        if entries.into_iter().any(|e| e.file_name().to_string_lossy().starts_with(TEMP_PREFIX)) {
            std::thread::sleep(after);
            return true;
        }
        // Its life is a few milliseconds: poll without pausing, but let
        // the agent run.
        std::thread::yield_now();
    }
    false
}

/// Where a kill landed, judged by what it left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Landed {
    /// Nothing of the new generation was on the device.
    Before,
    /// Some of it was.
    Mid,
    /// All of it was (the status may or may not have said so).
    After,
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_of_applies_never_tears_a_file_and_a_restart_converges_with_noops() {
    let started = Instant::now();
    let with_container = harmony_e2e::podman_ready("the container part of the crash test");
    let seed = std::env::var("HARMONY_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    }) | 1;
    eprintln!("crashes: seed {seed} (HARMONY_CRASH_SEED replays the kill delays)");
    let mut rng = Rng(seed);

    let f = Fleet::new().await;
    let device = DeviceId::new("crash-1").unwrap();
    let name = deployment(DEPLOYMENT);
    let folder = f.folder("crash");
    let root = folder.join("root");
    let state = folder.join("state");
    std::fs::create_dir_all(&root).unwrap();
    let url = f.nats.url();
    let args = harmony_e2e::agent_args(device.as_str(), &url, &state, &root);
    let start_agent = |round: usize| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        AgentProcess::start(&args, &folder.join(format!("agent-{round}.log")))
    };
    let container = with_container.then(Container::new);
    let last_round = CALIBRATION + ROUNDS - 1;
    let known: HashMap<[u8; 32], (usize, usize)> = (0..=last_round)
        .flat_map(|round| {
            (0..FILES.len()).map(move |file| (sha(content(file, round).as_bytes()), (file, round)))
        })
        .collect();
    assert_eq!(known.len(), FILES.len() * (last_round + 1), "every round's content is distinct");
    let known = Arc::new(known);
    let paths: Vec<PathBuf> = FILES.iter().map(|p| f.root("crash", p)).collect();
    let stop_reading = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let reader = {
        let (stop, paths, known) = (stop_reading.0.clone(), paths.clone(), known.clone());
        std::thread::spawn(move || read_files_until(stop, paths, known))
    };

    let document = |round: usize| -> Vec<Box<dyn DeviceScore>> {
        let mut scores: Vec<Box<dyn DeviceScore>> = FILES
            .iter()
            .enumerate()
            .map(|(i, path)| harmony_e2e::file_score(path, &content(i, round)))
            .collect();
        if let Some(c) = &container {
            scores.insert(CONTAINER_AT, c.score(container_version(round)));
        }
        scores
    };
    let n_scores = document(0).len();
    // The Score index of each file in the document.
    let file_index = |file: usize| if container.is_some() && file >= CONTAINER_AT { file + 1 } else { file };

    // Waits for `generation` applied and reported by an instance other
    // than `old` (the killed one), after a run of every Score.
    let converged = |generation: u64, old: Option<String>| {
        let (client, device, name) = (&f.client, &device, &name);
        async move {
            until_status(client, device, &format!("generation {generation} applied after a restart"), |s| {
                Some(&s.instance_id) != old.as_ref()
                    && s.deployments.get(name).is_some_and(|d| {
                        d.phase == Phase::Applied
                            && d.observed_generation == generation
                            && d.scores.len() == n_scores
                    })
            })
            .await
        }
    };

    // Calibration: create everything, then a round changing the container
    // and one changing only files, each timed from the deploy to the status.
    let mut agent = start_agent(0);
    let mut instance: Option<String> = None;
    let (mut with_container_change, mut files_only) = (Duration::ZERO, Duration::ZERO);
    for round in 0..CALIBRATION {
        let at = Instant::now();
        let generation = f.deploy(&device, DEPLOYMENT, document(round)).await;
        let status = converged(generation, None).await;
        let took = at.elapsed();
        if round > 0 && container_version(round) != container_version(round - 1) {
            with_container_change = took;
        } else {
            files_only = took;
        }
        instance = Some(status.instance_id.clone());
        for (i, path) in paths.iter().enumerate() {
            assert!(std::fs::read(path).unwrap() == content(i, round).as_bytes(), "round {round}: {path:?}");
        }
    }
    if container.is_none() {
        with_container_change = files_only;
    }
    eprintln!(
        "crashes: an apply takes {with_container_change:?} with a container change, {files_only:?} without"
    );

    let mut landed = Vec::new();
    let (mut mid_write, mut reported_before_kill, mut noops, mut successes) = (0, 0, 0, 0);
    let mut temp_left_by_kills = 0;
    let mut orphans_waited = 0;
    let mut kills_on_sight = 0;
    let mut restart_to_converged = Vec::new();
    for round in CALIBRATION..=last_round {
        let changes_container =
            container.is_some() && container_version(round) != container_version(round - 1);
        let apply_time = if changes_container { with_container_change } else { files_only };
        // A write of 200 KiB with its fsync takes a few milliseconds here:
        // a random delay rarely lands in one. So half the rounds without a
        // container change kill the agent as soon as a temp file shows in
        // one of the managed directories, plus a random 0-3 ms.
        let aimed = (!changes_container && rng.unit() < 0.5).then(|| {
            let dir = paths[(rng.next() % FILES.len() as u64) as usize].parent().unwrap().to_path_buf();
            (dir, Duration::from_micros(rng.next() % 3000))
        });
        // Otherwise up to 30% past the measured apply time: some kills land
        // after the apply, a few before the agent saw the write at all.
        let delay = apply_time.mul_f64(1.3 * rng.unit());
        let generation = f.deploy(&device, DEPLOYMENT, document(round)).await;
        let mut aimed_round = false;
        let delay = match aimed {
            Some((dir, after)) => {
                let seen = Instant::now();
                // Past twice the apply time the apply is over: kill then.
                let limit = apply_time * 2;
                let found = tokio::task::spawn_blocking(move || until_temp_file_in(&dir, after, limit));
                aimed_round = within(found).await.unwrap();
                seen.elapsed()
            }
            None => {
                tokio::time::sleep(delay).await;
                delay
            }
        };
        agent.kill();
        kills_on_sight += usize::from(aimed_round);

        // What the kill left.
        if let Some(c) = &container {
            orphans_waited += usize::from(c.until_no_orphans().await > 0);
        }
        let mut new_on_disk = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            let bytes =
                std::fs::read(path).unwrap_or_else(|e| panic!("round {round}: {path:?} after the kill: {e}"));
            let found = known.get(&sha(&bytes)).copied();
            assert!(
                found == Some((i, round - 1)) || found == Some((i, round)),
                "round {round}: {path:?} after the kill is neither the old nor the new content \
                 ({} bytes, matches {found:?})",
                bytes.len()
            );
            new_on_disk.push(found == Some((i, round)));
        }
        let container_new = container.as_ref().map(|c| c.running_version() == Some(container_version(round)));
        // Scores run in document order: what changed is a prefix of it.
        let mut changed: Vec<bool> = new_on_disk.clone();
        if let Some(new) = container_new {
            changed.insert(CONTAINER_AT, if changes_container { new } else { changed[CONTAINER_AT] });
        }
        assert!(
            changed.windows(2).all(|w| w[0] || !w[1]),
            "round {round}: the kill left changes out of document order: {changed:?}"
        );
        let container_in_flux = changes_container
            && container.as_ref().is_some_and(|c| c.running_version() != Some(container_version(round - 1)));
        let done = new_on_disk.iter().filter(|n| **n).count()
            + usize::from(changes_container && container_new == Some(true));
        let total = FILES.len() + usize::from(changes_container);
        let temps: Vec<PathBuf> = temp_files(&root);
        landed.push(match done {
            // A temp file: the kill cut the first write short.
            0 if !container_in_flux && temps.is_empty() => Landed::Before,
            d if d == total => Landed::After,
            _ => Landed::Mid,
        });
        mid_write += usize::from(!temps.is_empty());
        temp_left_by_kills += temps.len() + temp_files(&state).len();
        eprintln!(
            "crashes: round {round}: killed {delay:?} after the deploy{}: {:?}, changed {changed:?}, temp files {temps:?}",
            if aimed_round { " (on sight of a temp file)" } else { "" },
            landed.last().unwrap()
        );
        let before_kill = within(f.client.device_status(&device)).await.unwrap().map(|(s, _)| s);
        reported_before_kill += usize::from(before_kill.as_ref().is_some_and(|s| {
            s.deployments
                .get(&name)
                .is_some_and(|d| d.observed_generation == generation && d.phase == Phase::Applied)
        }));

        // Restart; the new instance converges and says NOOP for what was done.
        let restarted = Instant::now();
        agent = start_agent(round);
        let status = converged(generation, instance.clone()).await;
        restart_to_converged.push(restarted.elapsed());
        check_converged(&status, &name, round);
        assert!(
            !agent.log_text().contains("panicked"),
            "round {round}: the agent panicked:\n{}",
            agent.log_text()
        );
        let d = &status.deployments[&name];
        for (i, path) in FILES.iter().enumerate() {
            let score = &d.scores[file_index(i)];
            assert!(score.resource.ends_with(path), "round {round}: Score order: {score:?}");
            let want = if new_on_disk[i] { InterpretStatus::NOOP } else { InterpretStatus::SUCCESS };
            assert_eq!(
                score.status,
                want,
                "round {round}: {path} (new content on disk before the kill: {}): {score:?}\n{}",
                new_on_disk[i],
                agent.log_text()
            );
        }
        if let (Some(c), Some(new)) = (&container, container_new) {
            let score = &d.scores[CONTAINER_AT];
            let want = if new { InterpretStatus::NOOP } else { InterpretStatus::SUCCESS };
            assert_eq!(
                score.status, want,
                "round {round}: the container (running the new spec before the kill: {new}): {score:?}"
            );
            assert_eq!(c.running_version(), Some(container_version(round)), "round {round}: the container");
        }
        for score in &d.scores {
            match score.status {
                InterpretStatus::NOOP => noops += 1,
                _ => successes += 1,
            }
        }
        for (i, path) in paths.iter().enumerate() {
            assert!(
                std::fs::read(path).unwrap() == content(i, round).as_bytes(),
                "round {round}: {path:?} is not the final content after convergence"
            );
        }
        let left: Vec<PathBuf> = temp_files(&root).into_iter().chain(temp_files(&state)).collect();
        assert!(left.is_empty(), "round {round}: temp files left after convergence: {left:?}");
        instance = Some(status.instance_id.clone());
    }
    agent.stop();
    drop(stop_reading);
    let reads = reader.join().expect("the reader thread");
    assert!(reads.torn.is_empty(), "torn reads: {:#?}", reads.torn);

    let count = |l: Landed| landed.iter().filter(|x| **x == l).count();
    let (min, max) = (
        restart_to_converged.iter().min().copied().unwrap_or_default(),
        restart_to_converged.iter().max().copied().unwrap_or_default(),
    );
    println!(
        "crashes: {ROUNDS} kills (seed {seed}, container {}; {kills_on_sight} on sight of a temp file): \
         {} before the apply, {} mid-apply ({} mid-write, \
         {} temp files left by kills, all gone after convergence), {} after it ({} already reported); \
         after restarts {noops} Scores NOOP, {successes} SUCCESS; restart to converged min {min:?} median {:?} max {max:?}; \
         orphaned podman waited for {orphans_waited} times; {} file reads, none torn; total {:?}",
        if with_container { "included" } else { "skipped: no podman" },
        count(Landed::Before),
        count(Landed::Mid),
        mid_write,
        temp_left_by_kills,
        count(Landed::After),
        reported_before_kill,
        median(&mut restart_to_converged),
        reads.reads,
        started.elapsed()
    );
    assert!(count(Landed::Mid) > 0, "no kill landed mid-apply: the delays are miscalibrated");
    assert!(kills_on_sight > 0, "no temp file of a file write was ever seen: are writes still atomic?");
}

/// The converged status: no device errors, nothing failed.
fn check_converged(status: &AgentStatus, name: &harmony_score_wire::DeploymentName, round: usize) {
    assert!(status.errors.is_empty(), "round {round}: device errors after a restart: {:?}", status.errors);
    let d = &status.deployments[name];
    assert!(d.error.is_none(), "round {round}: {:?}", d.error);
    for score in &d.scores {
        assert!(
            matches!(score.status, InterpretStatus::SUCCESS | InterpretStatus::NOOP),
            "round {round}: {score:?}"
        );
    }
}
