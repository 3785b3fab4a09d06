//! Decode of documents with 1, 100 and 1,000 Scores, CBOR and the JSON form,
//! each beside the floor of parsing the same bytes into a generic value.
//!
//! `cargo bench -p harmony-scores --bench decode`; criterion prints each median.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use harmony_score_wire::{
    decode, decode_json, encode, DecodeLimits, DeploymentName, DesiredState, DeviceId, DeviceScore,
};
use harmony_scores::{DirectoryScore, FileScore, PresenceState};

/// `count` Scores, nine files for every directory, as a device's config
/// deployment would hold them.
fn document(count: usize) -> DesiredState {
    let scores: Vec<Box<dyn DeviceScore>> = (0..count)
        .map(|i| -> Box<dyn DeviceScore> {
            if i % 10 == 0 {
                Box::new(DirectoryScore {
                    path: format!("/etc/app/d{i:04}"),
                    mode: Some(0o750),
                    state: PresenceState::Present,
                })
            } else {
                Box::new(FileScore {
                    path: format!("/etc/app/conf.d/{i:04}.conf"),
                    content: format!("# managed by harmony\nkey_{i} = value-{i}\nenabled = true\n"),
                    mode: Some(0o644),
                    state: PresenceState::Present,
                })
            }
        })
        .collect();
    DesiredState::new(
        DeviceId::new("bench-device").unwrap(),
        DeploymentName::new("bench").unwrap(),
        1,
        scores,
    )
}

fn decode_benches(c: &mut Criterion) {
    harmony_scores::ensure_linked();
    let limits = DecodeLimits::default();
    let mut group = c.benchmark_group("decode");
    for count in [1, 100, 1000] {
        let doc = document(count);
        let cbor = encode(&doc).unwrap();
        let json = serde_json::to_vec(&doc).unwrap();
        group.bench_with_input(BenchmarkId::new("cbor", count), &cbor, |b, bytes| {
            b.iter(|| decode(bytes, &limits).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("cbor_generic_value_floor", count), &cbor, |b, bytes| {
            b.iter(|| ciborium::from_reader::<ciborium::Value, _>(bytes.as_slice()).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("json", count), &json, |b, bytes| {
            b.iter(|| decode_json(bytes, &limits).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("json_generic_value_floor", count), &json, |b, bytes| {
            b.iter(|| serde_json::from_slice::<serde_json::Value>(bytes).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, decode_benches);
criterion_main!(benches);
