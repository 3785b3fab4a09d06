//! The generator of the bad-input corpus (`tests/corpus/bad-input/`): every
//! malformed desired-state value the `bad_input` test writes to a running
//! agent's key.
//!
//! Included by `tests/tests/reliability/bad_input.rs`, which checks that the committed
//! files are exactly what this generator makes. After a change here,
//! regenerate them with
//!
//! ```sh
//! HARMONY_REGENERATE_CORPUS=1 cargo test -p harmony-e2e --test reliability corpus_matches_its_generator
//! ```
//!
//! Each case is for device `dev-1`, deployment `web`; wherever a readable
//! generation is part of a case it is above the good one the test deploys
//! first, so that the refusal (not a stale-generation skip) is what status
//! shows. The large cases (`ON_THE_FLY`) are made by the test, not committed.

use ciborium::Value;
use harmony_score_wire::DocumentSigner;

/// The device every case is written for.
pub const DEVICE: &str = "dev-1";
/// The deployment every case is written to.
pub const DEPLOYMENT: &str = "web";
/// The generation the cases carry (the good one deployed first is 1).
const GENERATION: u64 = 1000;

/// The key the test's agent trusts (its public half is passed with `--trusted-key`).
pub fn trusted_signer() -> DocumentSigner {
    DocumentSigner::from_seed([7; 32])
}

/// A key the agent does not trust.
fn other_signer() -> DocumentSigner {
    DocumentSigner::from_seed([9; 32])
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn int(n: i128) -> Value {
    Value::Integer(n.try_into().expect("fits a CBOR integer"))
}

fn cbor(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).expect("encodes");
    out
}

/// A CBOR head: major type and argument, in the shortest form.
fn head(major: u8, n: u64) -> Vec<u8> {
    let m = major << 5;
    match n {
        0..=23 => vec![m | n as u8],
        24..=0xff => vec![m | 24, n as u8],
        0x100..=0xffff => [vec![m | 25], (n as u16).to_be_bytes().to_vec()].concat(),
        0x1_0000..=0xffff_ffff => [vec![m | 26], (n as u32).to_be_bytes().to_vec()].concat(),
        _ => [vec![m | 27], n.to_be_bytes().to_vec()].concat(),
    }
}

fn raw_text(s: &str) -> Vec<u8> {
    [head(3, s.len() as u64), s.as_bytes().to_vec()].concat()
}

fn file_score(path: &str, content: &str) -> Value {
    Value::Map(vec![
        (text("type"), text("harmony.file/v1")),
        (text("path"), text(path)),
        (text("content"), text(content)),
        (text("state"), text("present")),
    ])
}

/// A valid document's fields, in order.
fn fields() -> Vec<(String, Value)> {
    vec![
        ("format".into(), int(1)),
        ("device_id".into(), text(DEVICE)),
        ("deployment".into(), text(DEPLOYMENT)),
        ("generation".into(), int(GENERATION.into())),
        ("issued_at".into(), int(1_790_000_000)),
        ("scores".into(), Value::Array(vec![file_score("/etc/motd", "bad input\n")])),
    ]
}

fn map(fields: Vec<(String, Value)>) -> Value {
    Value::Map(fields.into_iter().map(|(k, v)| (Value::Text(k), v)).collect())
}

/// A valid document with `key` set to `value` (added when missing).
fn with(key: &str, value: Value) -> Vec<u8> {
    let mut f = fields();
    match f.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value,
        None => f.push((key.into(), value)),
    }
    cbor(&map(f))
}

/// A valid document without `key`.
fn without(key: &str) -> Vec<u8> {
    cbor(&map(fields().into_iter().filter(|(k, _)| k != key).collect()))
}

fn with_scores(scores: Vec<Value>) -> Vec<u8> {
    with("scores", Value::Array(scores))
}

/// A document that would be accepted (the base the broken ones start from).
fn valid() -> Vec<u8> {
    cbor(&map(fields()))
}

/// A signed envelope around `payload`, with `signatures` as given.
fn envelope(payload: Value, signatures: Vec<Value>) -> Vec<u8> {
    cbor(&Value::Map(vec![
        (text("type"), text(harmony_score_wire::SIGNED_TAG)),
        (text("payload"), payload),
        (text("signatures"), Value::Array(signatures)),
    ]))
}

fn signature(signer: &DocumentSigner, payload: &[u8]) -> Value {
    let s = signer.signature(payload);
    Value::Map(vec![(text("key_id"), text(&s.key_id)), (text("signature"), Value::Bytes(s.signature))])
}

/// `payload` signed by the trusted key.
fn signed(payload: Vec<u8>) -> Vec<u8> {
    let sig = signature(&trusted_signer(), &payload);
    envelope(Value::Bytes(payload), vec![sig])
}

/// Raw CBOR: a valid document's map head and fields up to the key `scores`,
/// whose value the caller appends.
fn raw_doc_prefix() -> Vec<u8> {
    let f: Vec<_> = fields().into_iter().filter(|(k, _)| k != "scores").collect();
    let mut out = head(5, f.len() as u64 + 1);
    for (k, v) in f {
        out.extend(cbor(&Value::Text(k)));
        out.extend(cbor(&v));
    }
    out.extend(raw_text("scores"));
    out
}

/// The committed cases: name → bytes.
pub fn committed() -> Vec<(&'static str, Vec<u8>)> {
    let good = valid();
    let mut cases: Vec<(&'static str, Vec<u8>)> = vec![
        // Not CBOR, or nothing at all.
        ("empty.bin", Vec::new()),
        ("single-null.cbor", vec![0xf6]),
        ("break-byte-alone.cbor", vec![0xff]),
        ("reserved-additional-info.cbor", vec![0x1c, 0x00]),
        (
            "json-where-cbor.json",
            br#"{"format":1,"device_id":"dev-1","deployment":"web","generation":1000,"scores":[]}"#.to_vec(),
        ),
        ("text-garbage.bin", b"GET / HTTP/1.1\r\nHost: dev-1\r\n\r\n".to_vec()),
        // Truncated.
        ("truncated-map.cbor", good[..good.len() / 2].to_vec()),
        ("truncated-last-byte.cbor", good[..good.len() - 1].to_vec()),
        ("truncated-map-header.cbor", vec![0xbb, 0x00, 0x00]),
        // Huge lengths that the bytes do not back.
        ("huge-length-u64max.cbor", [raw_doc_prefix(), head(4, u64::MAX)].concat()),
        ("huge-length-map-u64max.cbor", head(5, u64::MAX)),
        (
            "huge-length-text.cbor",
            [head(5, 1), raw_text("device_id"), head(3, 1 << 62), b"dev".to_vec()].concat(),
        ),
        ("huge-length-bytes.cbor", [raw_doc_prefix(), head(2, u64::MAX - 1)].concat()),
        // Nesting.
        ("deep-nesting.cbor", [vec![0x81; 10_000], vec![0x00]].concat()),
        ("deep-nesting-maps.cbor", [[0xa1, 0x61, b'a'].repeat(5_000), vec![0x00]].concat()),
        (
            "deep-nesting-in-score.cbor",
            with_scores(vec![Value::Map(vec![
                (text("type"), text("harmony.file/v1")),
                (text("path"), text("/etc/motd")),
                (text("content"), (0..200).fold(int(0), |v, _| Value::Array(vec![v]))),
            ])]),
        ),
        // Encoding errors.
        (
            "invalid-utf8-text.cbor",
            [head(5, 1), raw_text("device_id"), head(3, 4), vec![0xff, 0xfe, 0xc3, 0x28]].concat(),
        ),
        ("invalid-utf8-key.cbor", [head(5, 1), head(3, 2), vec![0xc3, 0x28], vec![0x01]].concat()),
        ("indefinite-length-garbage.cbor", [vec![0xbf], [0x61, b'x'].repeat(8), vec![0x5f, 0x01]].concat()),
        ("indefinite-array-unterminated.cbor", [vec![0x9f], vec![0x01; 64]].concat()),
        (
            "indefinite-text-with-int-chunk.cbor",
            [vec![0xa1], raw_text("device_id"), vec![0x7f, 0x01, 0xff]].concat(),
        ),
        ("unknown-tag.cbor", with("generation", Value::Tag(9999, Box::new(text("1000"))))),
        ("bignum-generation.cbor", with("generation", Value::Tag(2, Box::new(Value::Bytes(vec![0xff; 16]))))),
        // Shape: the top level.
        ("top-level-array.cbor", cbor(&Value::Array(fields().into_iter().map(|(_, v)| v).collect()))),
        ("top-level-text.cbor", cbor(&text("dev-1 web 1000"))),
        ("top-level-integer.cbor", cbor(&int(1000))),
        // Wrong types for every top-level field.
        ("format-as-text.cbor", with("format", text("1"))),
        ("format-unsupported.cbor", with("format", int(99))),
        ("device-id-as-integer.cbor", with("device_id", int(1))),
        ("deployment-as-array.cbor", with("deployment", Value::Array(vec![text("web")]))),
        ("generation-as-string.cbor", with("generation", text("1000"))),
        ("generation-negative.cbor", with("generation", int(-1))),
        ("generation-float.cbor", with("generation", Value::Float(1000.5))),
        ("generation-most-negative.cbor", with("generation", int(-(1i128 << 64)))),
        ("issued-at-as-text.cbor", with("issued_at", text("yesterday"))),
        ("expires-at-as-bool.cbor", with("expires_at", Value::Bool(true))),
        ("scores-not-an-array.cbor", with("scores", text("harmony.file/v1"))),
        ("scores-as-map.cbor", with("scores", Value::Map(vec![(text("type"), text("harmony.file/v1"))]))),
        // Missing fields.
        ("missing-generation.cbor", without("generation")),
        ("missing-device-id.cbor", without("device_id")),
        ("missing-scores.cbor", without("scores")),
        // Duplicate keys.
        ("duplicate-keys.cbor", {
            let mut f = fields();
            f.push(("generation".into(), int(1001)));
            cbor(&map(f))
        }),
        ("duplicate-device-id-keys.cbor", {
            let mut f = fields();
            f.push(("device_id".into(), text("dev-2")));
            cbor(&map(f))
        }),
        // Ids and names.
        ("invalid-device-id.cbor", with("device_id", text("Dev_1!"))),
        ("device-id-too-long.cbor", with("device_id", text(&"d".repeat(300)))),
        ("text-with-control-characters.cbor", with("device_id", text("dev-1\u{0}\u{1b}[31m\r\n"))),
        ("deployment-with-control-characters.cbor", with("deployment", text("web\u{1b}]0;pwned\u{7}"))),
        ("invalid-deployment-name.cbor", with("deployment", text("web.*"))),
        ("wrong-device.cbor", with("device_id", text("dev-2"))),
        ("wrong-deployment.cbor", with("deployment", text("other"))),
        ("expired.cbor", with("expires_at", int(1))),
        // Scores.
        ("score-without-type.cbor", {
            with_scores(vec![Value::Map(vec![
                (text("path"), text("/etc/motd")),
                (text("content"), text("x")),
            ])])
        }),
        ("score-type-not-text.cbor", {
            with_scores(vec![Value::Map(vec![(text("type"), int(7)), (text("path"), text("/etc/motd"))])])
        }),
        ("score-not-a-map.cbor", with_scores(vec![int(0)])),
        ("unknown-score-tag.cbor", {
            with_scores(vec![Value::Map(vec![(text("type"), text("harmony.nope/v1"))])])
        }),
        ("unknown-score-tag-with-escapes.cbor", {
            with_scores(vec![Value::Map(vec![(
                text("type"),
                text(&format!("\u{1b}[2J{}", "x".repeat(400))),
            )])])
        }),
        ("score-field-wrong-type.cbor", {
            with_scores(vec![Value::Map(vec![
                (text("type"), text("harmony.file/v1")),
                (text("path"), text("/etc/motd")),
                (text("mode"), text("rwxrwxrwx")),
            ])])
        }),
        ("score-relative-path.cbor", with_scores(vec![file_score("etc/../../motd", "x")])),
        ("score-path-with-nul.cbor", with_scores(vec![file_score("/etc/mo\u{0}td", "x")])),
        (
            "duplicate-resource.cbor",
            with_scores(vec![file_score("/etc/motd", "a"), file_score("/etc/motd", "b")]),
        ),
        (
            "too-many-scores.cbor",
            with_scores((0..1025).map(|i| file_score(&format!("/s/{i}"), "")).collect()),
        ),
        // Signed envelopes (the agent trusts `trusted_signer`).
        ("signed-garbage-payload.cbor", signed(b"\xde\xad\xbe\xef garbage".to_vec())),
        ("signed-truncated-payload.cbor", signed(good[..good.len() - 3].to_vec())),
        ("signed-empty-payload.cbor", signed(Vec::new())),
        ("signed-envelope-in-envelope.cbor", signed(signed(good.clone()))),
        ("signed-by-untrusted-key.cbor", {
            let sig = signature(&other_signer(), &good);
            envelope(Value::Bytes(good.clone()), vec![sig])
        }),
        ("signed-tampered-payload.cbor", {
            let sig = signature(&trusted_signer(), &good);
            let mut tampered = good.clone();
            *tampered.last_mut().expect("not empty") ^= 1;
            envelope(Value::Bytes(tampered), vec![sig])
        }),
        ("signed-payload-as-text.cbor", envelope(text("not bytes"), Vec::new())),
        ("signed-signature-garbage.cbor", {
            envelope(
                Value::Bytes(good.clone()),
                vec![Value::Map(vec![(text("key_id"), int(3)), (text("signature"), Value::Bool(false))])],
            )
        }),
        ("signed-17-signatures.cbor", {
            let sig = signature(&trusted_signer(), &good);
            envelope(Value::Bytes(good.clone()), vec![sig; 17])
        }),
    ];
    cases.sort_by_key(|(name, _)| *name);
    cases
}

/// The large cases, made when the test runs: name → bytes.
pub fn on_the_fly() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("too-large-1mib-plus-1.cbor", too_large()),
        (
            "million-item-junk-array.cbor",
            [raw_doc_prefix(), head(4, 1_000_000), vec![0x00; 1_000_000]].concat(),
        ),
        ("million-item-junk-field.cbor", {
            // A field nobody reads, a million items, then scores that are not an array.
            let f: Vec<_> = fields().into_iter().filter(|(k, _)| k != "scores").collect();
            let mut out = head(5, f.len() as u64 + 2);
            for (k, v) in f {
                out.extend(cbor(&Value::Text(k)));
                out.extend(cbor(&v));
            }
            out.extend(raw_text("junk"));
            out.extend(head(4, 1_000_000));
            out.extend(vec![0xf6; 1_000_000]);
            out.extend(raw_text("scores"));
            out.extend(raw_text("not an array"));
            out
        }),
        ("signed-10000-signatures.cbor", {
            let good = valid();
            let junk =
                Value::Map(vec![(text("key_id"), text("")), (text("signature"), Value::Bytes(Vec::new()))]);
            envelope(Value::Bytes(good), vec![junk; 10_000])
        }),
    ]
}

/// A document that would be accepted but is 1 MiB + 1 byte long.
fn too_large() -> Vec<u8> {
    const TARGET: usize = 1024 * 1024 + 1;
    let make = |n: usize| with_scores(vec![file_score("/etc/motd", &"x".repeat(n))]);
    let probe = make(100_000).len();
    let bytes = make(100_000 + TARGET - probe);
    assert_eq!(bytes.len(), TARGET);
    bytes
}
