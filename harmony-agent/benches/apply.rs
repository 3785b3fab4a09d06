//! Document sizes, decode time and `apply` time of FileScores (first run and NOOP run).
//!
//! `cargo bench -p harmony-agent --bench apply` prints medians over repeated
//! runs, each on a fresh temp root on the real filesystem.

use std::time::{Duration, Instant};

use harmony_agent::run_scores;
use harmony_score_wire::{decode, encode, DecodeLimits, DeploymentName, DesiredState, DeviceId, DeviceScore};
use harmony_scores::{FileScore, PresenceState};
use harmony_topology::{Inventory, LocalDeviceTopology, Maestro};

const RUNS: usize = 21;

fn document(count: usize) -> DesiredState {
    let scores: Vec<Box<dyn DeviceScore>> = (0..count)
        .map(|i| {
            Box::new(FileScore {
                path: format!("/etc/app/conf.d/{i:03}.conf"),
                content: format!("# managed by harmony\nkey_{i} = value-{i}\nenabled = true\n"),
                mode: Some(0o644),
                state: PresenceState::Present,
            }) as Box<dyn DeviceScore>
        })
        .collect();
    DesiredState::new(
        DeviceId::new("bench-device").unwrap(),
        DeploymentName::new("bench").unwrap(),
        1,
        scores,
    )
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    harmony_scores::ensure_linked();
    for count in [1, 100] {
        let bytes = encode(&document(count)).unwrap();
        println!("encoded size, {count} FileScore(s): {} bytes", bytes.len());
    }
    let bytes = encode(&document(100)).unwrap();
    let decode_times = (0..RUNS * 10)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(decode(&bytes, &DecodeLimits::default()).unwrap());
            start.elapsed()
        })
        .collect();
    println!("decode, 100 FileScores: median {:?} over {} runs", median(decode_times), RUNS * 10);

    // Signatures: what signing costs the operator and verifying the device,
    // against the decode above.
    let signer = harmony_score_wire::DocumentSigner::from_seed([7; 32]);
    let trust = harmony_score_wire::TrustedKeys::new(vec![signer.verifying_key()], 1);
    let signed = signer.sign(bytes.clone());
    println!("signed envelope, 100 FileScores: {} bytes (+{})", signed.len(), signed.len() - bytes.len());
    let time = |f: &dyn Fn()| {
        median(
            (0..RUNS * 10)
                .map(|_| {
                    let start = Instant::now();
                    f();
                    start.elapsed()
                })
                .collect(),
        )
    };
    println!(
        "sign, 100 FileScores: median {:?}",
        time(&|| drop(std::hint::black_box(signer.sign(bytes.clone()))))
    );
    println!(
        "verify, 100 FileScores: median {:?}",
        time(&|| drop(std::hint::black_box(trust.verify(&signed).unwrap())))
    );

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let doc = decode(&bytes, &DecodeLimits::default()).unwrap();
    let (mut first, mut noop) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let root = tempfile::tempdir().unwrap();
        rt.block_on(async {
            let maestro =
                Maestro::initialize(Inventory::empty(), LocalDeviceTopology::new(root.path())).await.unwrap();
            let start = Instant::now();
            let report = run_scores(&maestro, doc.scores.iter().map(|s| s.as_ref())).await;
            first.push(start.elapsed());
            assert!(report.all_ok());
            let start = Instant::now();
            let report = run_scores(&maestro, doc.scores.iter().map(|s| s.as_ref())).await;
            noop.push(start.elapsed());
            assert!(report.all_noop());
        });
    }
    println!("apply, 100 FileScores, first run: median {:?} over {RUNS} runs", median(first));
    println!("apply, 100 FileScores, NOOP run:  median {:?} over {RUNS} runs", median(noop));
}
