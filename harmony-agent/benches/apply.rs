//! Applying 100 FileScores through the agent's own path (`run_scores`: the
//! `Maestro`, each Score's Interpret, the `LocalDeviceTopology` resolving
//! every path beneath its root descriptor), on a real filesystem, each
//! beside its floor in the same run:
//!
//! - NOOP reconcile (every file already as desired) against a stat and a
//!   read of the same 100 files by path, on the calling thread and, as the
//!   topology does its file work, each on tokio's blocking pool;
//! - first apply (every file created, crash-safe) against writing the same
//!   files crash-safe by hand: temp file, fsync, rename, fsync of the
//!   directory.
//!
//! `cargo bench -p harmony-agent --bench apply` (under a minute). The roots
//! are temp directories under `$TMPDIR` (or `/tmp`); set `TMPDIR=/dev/shm`
//! to measure on tmpfs.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode};
use harmony_agent::run_scores;
use harmony_score_wire::{DeploymentName, DesiredState, DeviceId, DeviceScore};
use harmony_scores::{FileScore, PresenceState};
use harmony_topology::{Inventory, LocalDeviceTopology, Maestro};

const FILES: usize = 100;

/// The files of the codec bench's document: small configs, one path each.
fn files() -> Vec<FileScore> {
    (0..FILES)
        .map(|i| FileScore {
            path: format!("/etc/app/conf.d/{i:04}-service.conf"),
            content: format!(
                "# managed by harmony\n[service-{i}]\nlisten = 127.0.0.1:{}\nworkers = 4\nlog_level = info\n",
                8000 + i
            ),
            mode: Some(0o644),
            state: PresenceState::Present,
        })
        .collect()
}

fn document() -> DesiredState {
    let scores = files().into_iter().map(|f| Box::new(f) as Box<dyn DeviceScore>).collect();
    DesiredState::new(
        DeviceId::new("bench-device").unwrap(),
        DeploymentName::new("bench").unwrap(),
        1,
        scores,
    )
}

fn scores(doc: &DesiredState) -> impl Iterator<Item = &dyn DeviceScore> {
    doc.scores.iter().map(|s| s.as_ref())
}

/// Where each file lives under `root`.
fn file_paths(root: &Path) -> Vec<std::path::PathBuf> {
    files().iter().map(|f| root.join(f.path.trim_start_matches('/'))).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    // The agent's own runtime: one thread, blocking work on tokio's pool.
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn maestro(rt: &tokio::runtime::Runtime, root: &Path) -> Maestro<LocalDeviceTopology> {
    rt.block_on(Maestro::initialize(Inventory::empty(), LocalDeviceTopology::new(root))).unwrap()
}

fn noop_benches(c: &mut Criterion) {
    harmony_scores::ensure_linked();
    let (rt, doc) = (runtime(), document());
    let root = tempfile::tempdir().unwrap();
    let maestro = maestro(&rt, root.path());
    assert!(rt.block_on(run_scores(&maestro, scores(&doc))).all_ok());
    assert!(rt.block_on(run_scores(&maestro, scores(&doc))).all_noop());
    let paths = file_paths(root.path());
    assert!(paths.iter().all(|p| p.is_file()), "the bench reads the files the Scores wrote");

    let mut group = c.benchmark_group("apply_100_files");
    group.bench_function("noop", |b| b.iter(|| rt.block_on(run_scores(&maestro, scores(&doc)))));
    // What a NOOP cannot do without: look at each file and read it whole.
    group.bench_function("noop_floor_stat_read", |b| {
        b.iter(|| {
            for path in &paths {
                std::hint::black_box(std::fs::symlink_metadata(path).unwrap());
                std::hint::black_box(std::fs::read(path).unwrap());
            }
        })
    });
    // The same, each file on tokio's blocking pool as the topology's
    // operations are: what handing each one to another thread and back adds.
    let shared = std::sync::Arc::new(paths.clone());
    group.bench_function("noop_floor_stat_read_pooled", |b| {
        b.iter(|| {
            rt.block_on(async {
                for i in 0..shared.len() {
                    let paths = shared.clone();
                    tokio::task::spawn_blocking(move || {
                        std::hint::black_box(std::fs::symlink_metadata(&paths[i]).unwrap());
                        std::hint::black_box(std::fs::read(&paths[i]).unwrap());
                    })
                    .await
                    .unwrap();
                }
            })
        })
    });
    group.finish();
}

fn first_apply_benches(c: &mut Criterion) {
    harmony_scores::ensure_linked();
    let (rt, doc) = (runtime(), document());
    let files = files();

    let mut group = c.benchmark_group("apply_100_files");
    // Each iteration writes 100 files with fsyncs: a few hundred
    // milliseconds on a disk, so a few flat samples suffice.
    group.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(10));
    group.bench_function("first", |b| {
        b.iter_batched(
            || {
                let root = tempfile::tempdir().unwrap();
                let maestro = maestro(&rt, root.path());
                (root, maestro)
            },
            |(root, maestro)| {
                let report = rt.block_on(run_scores(&maestro, scores(&doc)));
                assert!(report.all_ok(), "{report:?}");
                // Returned so that removing the files is not timed.
                (root, maestro)
            },
            BatchSize::PerIteration,
        )
    });
    // The same files written as crash-safe as the agent writes them.
    group.bench_function("first_floor_write_fsync", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |root| {
                let dir_path = root.path().join("etc/app/conf.d");
                std::fs::create_dir_all(&dir_path).unwrap();
                let dir = std::fs::File::open(&dir_path).unwrap();
                for file in &files {
                    let name = Path::new(&file.path).file_name().unwrap();
                    let tmp = dir_path.join(".tmp");
                    let mut out = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o644)
                        .open(&tmp)
                        .unwrap();
                    out.write_all(file.content.as_bytes()).unwrap();
                    out.sync_all().unwrap();
                    std::fs::rename(&tmp, dir_path.join(name)).unwrap();
                    dir.sync_all().unwrap();
                }
                root
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = noop_benches, first_apply_benches
}
criterion_main!(benches);
