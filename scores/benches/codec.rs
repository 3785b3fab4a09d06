//! Encode, decode and signature costs of documents of 1, 100 and 1,000
//! FileScores, CBOR and the JSON form side by side, each beside its floor:
//! the same bytes parsed into (or written from) a generic value
//! (`ciborium::Value`, `serde_json::Value`), which no check or dispatch
//! can beat.
//!
//! `cargo bench -p harmony-scores --bench codec` (about a minute);
//! `-- decode/` (say) runs one group. Criterion prints each median.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use harmony_score_wire::{
    decode, decode_json, encode, DecodeLimits, DeploymentName, DesiredState, DeviceId, DeviceScore,
    DocumentSigner, TrustedKeys,
};
use harmony_scores::{FileScore, PresenceState};

/// A device's configuration deployment: `count` FileScores, each a small
/// config file under its own path.
fn document(count: usize) -> DesiredState {
    let scores: Vec<Box<dyn DeviceScore>> = (0..count)
        .map(|i| -> Box<dyn DeviceScore> {
            Box::new(FileScore {
                path: format!("/etc/app/conf.d/{i:04}-service.conf"),
                content: format!(
                    "# managed by harmony\n[service-{i}]\nlisten = 127.0.0.1:{}\nworkers = 4\nlog_level = info\n",
                    8000 + i
                ),
                mode: Some(0o644),
                state: PresenceState::Present,
            })
        })
        .collect();
    DesiredState::new(
        DeviceId::new("bench-device").unwrap(),
        DeploymentName::new("bench").unwrap(),
        1,
        scores,
    )
}

const COUNTS: [usize; 3] = [1, 100, 1000];

fn config() -> Criterion {
    // Long enough for stable medians of the 1,000-Score cases (about a
    // millisecond each), short enough to keep the whole file near a minute.
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
}

fn encode_benches(c: &mut Criterion) {
    harmony_scores::ensure_linked();
    let mut group = c.benchmark_group("encode");
    for count in COUNTS {
        let doc = document(count);
        let cbor = encode(&doc).unwrap();
        let json = serde_json::to_vec(&doc).unwrap();
        println!("document of {count} FileScore(s): {} bytes CBOR, {} bytes JSON", cbor.len(), json.len());
        let cbor_value: ciborium::Value = ciborium::from_reader(cbor.as_slice()).unwrap();
        let json_value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        // `encode` validates every Score and checks resources, as a device would.
        group.bench_with_input(BenchmarkId::new("cbor", count), &doc, |b, doc| {
            b.iter(|| encode(doc).unwrap())
        });
        group.bench_with_input(
            BenchmarkId::new("cbor_generic_value_floor", count),
            &cbor_value,
            |b, value| {
                b.iter(|| {
                    let mut out = Vec::new();
                    ciborium::into_writer(value, &mut out).unwrap();
                    out
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("json", count), &doc, |b, doc| {
            b.iter(|| serde_json::to_vec(doc).unwrap())
        });
        group.bench_with_input(
            BenchmarkId::new("json_generic_value_floor", count),
            &json_value,
            |b, value| b.iter(|| serde_json::to_vec(value).unwrap()),
        );
    }
    group.finish();
}

fn decode_benches(c: &mut Criterion) {
    harmony_scores::ensure_linked();
    let limits = DecodeLimits::default();
    let mut group = c.benchmark_group("decode");
    for count in COUNTS {
        let doc = document(count);
        let cbor = encode(&doc).unwrap();
        let json = serde_json::to_vec(&doc).unwrap();
        group.bench_with_input(BenchmarkId::new("cbor", count), &cbor, |b, bytes| {
            b.iter(|| decode(bytes, &limits).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("cbor_generic_value_floor", count), &cbor, |b, bytes| {
            b.iter(|| ciborium::from_reader::<ciborium::Value, _>(bytes.as_slice()).unwrap())
        });
        // serde through typetag straight from the bytes, with none of
        // decode's checks: what typetag's dispatch alone costs.
        group.bench_with_input(BenchmarkId::new("cbor_typetag_unchecked", count), &cbor, |b, bytes| {
            b.iter(|| ciborium::from_reader::<DesiredState, _>(bytes.as_slice()).unwrap())
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

/// What the operator's signing and the device's check of a signed envelope
/// cost (ed25519 over the document's bytes, one trusted key).
fn signature_benches(c: &mut Criterion) {
    harmony_scores::ensure_linked();
    let signer = DocumentSigner::from_seed([7; 32]);
    let trust = TrustedKeys::new(vec![signer.verifying_key()], 1);
    let mut group = c.benchmark_group("signature");
    for count in [100, 1000] {
        let payload = encode(&document(count)).unwrap();
        let signed = signer.sign(payload.clone());
        group.bench_with_input(BenchmarkId::new("sign", count), &payload, |b, payload| {
            b.iter(|| signer.sign(payload.clone()))
        });
        group.bench_with_input(BenchmarkId::new("verify", count), &signed, |b, signed| {
            b.iter(|| trust.verify(signed).unwrap())
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = encode_benches, decode_benches, signature_benches
}
criterion_main!(benches);
