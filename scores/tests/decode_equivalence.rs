//! `decode` (each Score by its tag's own decoder) against `decode_via_typetag`
//! (the typed pass through serde and typetag it replaced): the same
//! document or the same error, byte for byte, on every registered Score's
//! golden fixture, on shapes chosen to tell the two apart, and on the
//! bad-input corpus, the fuzz seeds and thousands of mutations of them.

use std::path::{Path, PathBuf};

use ciborium::Value as V;
use harmony_score_wire::{
    decode, decode_via_typetag, encode, registered_scores, DecodeError, DecodeLimits, DesiredState,
};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn as_json(doc: &DesiredState) -> serde_json::Value {
    serde_json::to_value(doc).unwrap()
}

/// Decodes `bytes` both ways and asserts they agree; returns what `decode` said.
fn agree(what: &str, bytes: &[u8], limits: &DecodeLimits) -> Result<DesiredState, DecodeError> {
    let new = decode(bytes, limits);
    let old = decode_via_typetag(bytes, limits);
    match (&new, &old) {
        (Ok(new_doc), Ok(old_doc)) => {
            assert_eq!(as_json(new_doc), as_json(old_doc), "{what}: the documents differ");
            assert_eq!(encode(new_doc).ok(), encode(old_doc).ok(), "{what}: they encode differently");
        }
        (Err(new_err), Err(old_err)) => assert_eq!(new_err, old_err, "{what}: the errors differ"),
        _ => panic!("{what}: decode says {new:?}, typetag's pass says {old:?}"),
    }
    new
}

fn golden(tag: &str) -> Vec<u8> {
    let path = workspace().join("tests/fixtures/wire").join(format!("{}.cbor", tag.replace('/', "@")));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn cbor(value: &V) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).unwrap();
    out
}

fn entries(value: &mut V) -> &mut Vec<(V, V)> {
    match value {
        V::Map(entries) => entries,
        other => panic!("not a map: {other:?}"),
    }
}

/// The golden document's `scores` entries, to edit.
fn scores_of(doc: &mut V) -> &mut Vec<V> {
    let scores = entries(doc).iter_mut().find(|(k, _)| k.as_text() == Some("scores")).unwrap();
    match &mut scores.1 {
        V::Array(items) => items,
        other => panic!("scores is {other:?}"),
    }
}

/// Every registered Score's golden fixture, written by the encoder when the
/// Score was registered (typetag's serializer, the only encoder): both
/// decoders read the same document from it, and what each read encodes
/// back to the same bytes. Then the other way round: what the new decoder
/// read, encoded again, reads the same through typetag.
#[test]
fn every_registered_score_crosses_between_the_typetag_and_per_tag_decoders() {
    harmony_scores::ensure_linked();
    let limits = DecodeLimits::default();
    assert!(registered_scores().len() >= 5);
    for registration in registered_scores() {
        let bytes = golden(registration.tag);
        let new = agree(registration.tag, &bytes, &limits).unwrap();
        assert!(new.scores.iter().any(|s| s.typetag_name() == registration.tag));
        assert_eq!(encode(&new).unwrap(), bytes, "{}: not its golden bytes", registration.tag);
        let old = decode_via_typetag(&encode(&new).unwrap(), &limits).unwrap();
        assert_eq!(as_json(&old), as_json(&new), "{}", registration.tag);

        // Each Score with its `type` last, as a hand-written document may
        // have it: moved first before either decoder reads it.
        let mut value: V = ciborium::from_reader(bytes.as_slice()).unwrap();
        for score in scores_of(&mut value) {
            entries(score).rotate_left(1);
        }
        let late = agree(&format!("{} with type last", registration.tag), &cbor(&value), &limits).unwrap();
        assert_eq!(as_json(&late), as_json(&new));
    }
}

/// The FileScore fixture with its first Score edited by `edit`.
fn edited(edit: impl FnOnce(&mut Vec<(V, V)>)) -> Vec<u8> {
    let mut doc: V = ciborium::from_reader(golden("harmony.file/v1").as_slice()).unwrap();
    edit(entries(&mut scores_of(&mut doc)[0]));
    cbor(&doc)
}

fn set(score: &mut Vec<(V, V)>, key: &str, value: V) {
    match score.iter_mut().find(|(k, _)| k.as_text() == Some(key)) {
        Some(entry) => entry.1 = value,
        None => score.push((V::Text(key.into()), value)),
    }
}

/// The ways a Score's map can differ from what the encoder writes, where a
/// decoder of its own could read it differently from typetag: keys that
/// are not plain text, a second `type`, values of the wrong type, tags,
/// enum forms, unknown and missing fields.
#[test]
fn odd_score_shapes_are_read_alike() {
    harmony_scores::ensure_linked();
    let limits = DecodeLimits::default();
    let long = "k".repeat(5000);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("as encoded", edited(|_| {})),
        ("a byte-string key", edited(|s| s.push((V::Bytes(b"mode".to_vec()), V::from(0o600))))),
        ("an integer key", edited(|s| s.push((V::from(0), V::Text("/etc/other".into()))))),
        ("a null key", edited(|s| s.push((V::Null, V::from(1))))),
        ("a tagged key", edited(|s| s.push((V::Tag(32, Box::new(V::Text("mode".into()))), V::from(0o600))))),
        ("a key of 5000 bytes", edited(|s| s.push((V::Text(long.clone()), V::from(1))))),
        ("a second type", edited(|s| s.push((V::Text("type".into()), V::Text("other/v1".into()))))),
        ("a second path", edited(|s| s.push((V::Text("path".into()), V::Text("/etc/second".into()))))),
        ("unknown fields", edited(|s| s.push((V::Text("extra".into()), V::Array(vec![V::Null; 3]))))),
        ("a tagged path", edited(|s| set(s, "path", V::Tag(0, Box::new(V::Text("/etc/tagged".into())))))),
        ("a path as bytes", edited(|s| set(s, "path", V::Bytes(b"/etc/bytes".to_vec())))),
        ("a null path", edited(|s| set(s, "path", V::Null))),
        ("no path", edited(|s| s.retain(|(k, _)| k.as_text() != Some("path")))),
        ("only the type", edited(|s| s.truncate(1))),
        ("a negative mode", edited(|s| set(s, "mode", V::from(-1)))),
        ("a float mode", edited(|s| set(s, "mode", V::Float(420.0)))),
        ("a null mode", edited(|s| set(s, "mode", V::Null))),
        ("a bignum mode", edited(|s| set(s, "mode", V::Tag(2, Box::new(V::Bytes(vec![1, 0x00])))))),
        ("a huge mode", edited(|s| set(s, "mode", V::from(u64::MAX)))),
        ("an unknown state", edited(|s| set(s, "state", V::Text("gone".into())))),
        ("a state as a map", edited(|s| set(s, "state", V::Map(vec![(V::Text("absent".into()), V::Null)])))),
        ("a state as an integer", edited(|s| set(s, "state", V::from(1)))),
        ("content as an array", edited(|s| set(s, "content", V::Array(vec![V::Text("x".into())])))),
        ("an invalid path", edited(|s| set(s, "path", V::Text("relative/path".into())))),
    ];
    let mut accepted = 0;
    for (what, bytes) in &cases {
        accepted += usize::from(agree(what, bytes, &limits).is_ok());
    }
    assert!(accepted >= 5 && accepted < cases.len(), "{accepted} of {} accepted", cases.len());
}

/// A document field after `scores` that serde refuses: the per-tag pass
/// reads the fields from a copy without the Scores, and refuses it alike.
#[test]
fn errors_in_fields_after_the_scores_are_the_same() {
    harmony_scores::ensure_linked();
    let limits = DecodeLimits::default();
    for (field, value) in [
        ("generation", V::Text("seven".into())),
        ("issued_at", V::from(-1)),
        ("expires_at", V::Array(vec![])),
        ("device_id", V::from(1)),
    ] {
        let mut doc: V = ciborium::from_reader(golden("harmony.file/v1").as_slice()).unwrap();
        entries(&mut doc).retain(|(k, _)| k.as_text() != Some(field));
        entries(&mut doc).push((V::Text(field.into()), value));
        assert!(agree(field, &cbor(&doc), &limits).is_err(), "{field}");
    }
}

/// A FileScore whose key, tag or path is indefinite-length text, or whose
/// map is of indefinite length, which ciborium's value type cannot write.
#[test]
fn indefinite_length_text_is_read_alike() {
    harmony_scores::ensure_linked();
    fn text(out: &mut Vec<u8>, s: &str) {
        assert!(s.len() < 24);
        out.push(0x60 | s.len() as u8);
        out.extend(s.as_bytes());
    }
    fn chunks(out: &mut Vec<u8>, parts: &[&str]) {
        out.push(0x7f);
        parts.iter().for_each(|p| text(out, p));
        out.push(0xff);
    }
    let document = |score: &dyn Fn(&mut Vec<u8>)| {
        let mut out = vec![0xa4];
        for (key, value) in [("device_id", "dev-1"), ("deployment", "motd")] {
            text(&mut out, key);
            text(&mut out, value);
        }
        text(&mut out, "generation");
        out.push(0x01);
        text(&mut out, "scores");
        out.push(0x81);
        score(&mut out);
        out
    };
    type WriteScore<'a> = &'a dyn Fn(&mut Vec<u8>);
    let cases: [(&str, WriteScore); 4] = [
        ("an indefinite path", &|out| {
            out.push(0xa2);
            text(out, "type");
            text(out, "harmony.file/v1");
            text(out, "path");
            chunks(out, &["/etc", "/x"]);
        }),
        ("an indefinite key", &|out| {
            out.push(0xa2);
            text(out, "type");
            text(out, "harmony.file/v1");
            chunks(out, &["pa", "th"]);
            text(out, "/etc/x");
        }),
        ("an indefinite type key and tag", &|out| {
            out.push(0xa2);
            chunks(out, &["ty", "pe"]);
            chunks(out, &["harmony.", "file/v1"]);
            text(out, "path");
            text(out, "/etc/x");
        }),
        ("an indefinite map", &|out| {
            out.push(0xbf);
            text(out, "type");
            text(out, "harmony.file/v1");
            text(out, "path");
            text(out, "/etc/x");
            out.push(0xff);
        }),
    ];
    // ciborium reads indefinite-length text only where serde asks for any
    // type: both refuse it as a field or tag alike.
    for (what, score) in cases {
        if let Ok(doc) = agree(what, &document(score), &DecodeLimits::default()) {
            assert_eq!(doc.scores[0].resource().to_string(), "path:/etc/x", "{what}");
        }
    }
    assert!(decode(&document(cases[3].1), &DecodeLimits::default()).is_ok(), "an indefinite map is read");
}

/// A deterministic xorshift, so that a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One random edit: a byte changed, flipped, removed, inserted or
/// repeated, or the end cut off.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    if out.is_empty() {
        return vec![rng.next() as u8];
    }
    let at = rng.below(out.len());
    match rng.below(6) {
        0 => out[at] = rng.next() as u8,
        1 => out[at] ^= 1 << rng.below(8),
        2 => drop(out.remove(at)),
        3 => out.insert(at, rng.next() as u8),
        4 => {
            let len = rng.below(16).min(out.len() - at);
            let piece = out[at..at + len].to_vec();
            out.splice(at..at, piece);
        }
        _ => out.truncate(at),
    }
    out
}

fn files_in(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

/// The bad-input corpus, the fuzz seeds and the golden fixtures, each as
/// it is and mutated, under the default limits and tight ones.
#[test]
fn the_corpus_the_seeds_and_their_mutations_are_read_alike() {
    harmony_scores::ensure_linked();
    let mut inputs = files_in(&workspace().join("tests/corpus/bad-input"));
    inputs.extend(files_in(&workspace().join("fuzz/seeds/decode_cbor")));
    inputs.extend(registered_scores().iter().map(|r| (r.tag.to_owned(), golden(r.tag))));
    assert!(inputs.len() >= 80, "{} inputs", inputs.len());
    let tight = DecodeLimits { max_bytes: 64 * 1024, max_scores: 2, max_depth: 5 };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut accepted, mut total) = (0, 0);
    for (name, input) in &inputs {
        for limits in [DecodeLimits::default(), tight] {
            agree(name, input, &limits).ok();
        }
        // Mutating the 1 MiB cases would only slow the test down.
        if input.len() > 64 * 1024 {
            continue;
        }
        let mut current = input.clone();
        for round in 0..300 {
            // Mostly one edit from the input, sometimes a walk of edits.
            if round % 4 != 0 {
                current = input.clone();
            }
            current = mutate(&mut rng, &current);
            total += 1;
            let what = format!("{name}, mutation {round}");
            accepted += usize::from(agree(&what, &current, &DecodeLimits::default()).is_ok());
            agree(&what, &current, &tight).ok();
        }
    }
    // The mutations reach past the checks into the Scores.
    assert!(accepted > total / 100, "{accepted} of {total} mutations accepted");
}
