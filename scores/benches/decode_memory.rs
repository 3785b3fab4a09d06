//! Peak memory of decoding a 1 MB document padded with a million-item junk
//! array, beside the same document without the padding.
//!
//! `cargo bench -p harmony-scores --bench decode_memory` runs each case in a
//! fresh process and prints how far decoding raised the process's resident
//! high-water mark (VmHWM, reset through `/proc/self/clear_refs` just before).

use std::process::Command;

use harmony_score_wire::{decode, decode_json, DecodeLimits};

/// Items of junk: one byte each in CBOR, so the document stays under 1 MiB.
const JUNK_ITEMS: u64 = 1_000_000;

/// CBOR major type and argument, definite length.
fn head(out: &mut Vec<u8>, major: u8, value: u64) {
    let major = major << 5;
    match value {
        0..=23 => out.push(major | value as u8),
        24..=0xff => out.extend([major | 24, value as u8]),
        0x100..=0xffff => {
            out.push(major | 25);
            out.extend((value as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(major | 26);
            out.extend((value as u32).to_be_bytes());
        }
        _ => {
            out.push(major | 27);
            out.extend(value.to_be_bytes());
        }
    }
}

fn text(out: &mut Vec<u8>, s: &str) {
    head(out, 3, s.len() as u64);
    out.extend(s.as_bytes());
}

fn junk(out: &mut Vec<u8>, items: u64) {
    head(out, 4, items);
    out.resize(out.len() + items as usize, 0);
}

/// Where the junk goes: beside the document's fields, inside a Score after
/// its `type`, or inside a Score before its `type` (which `typetag` must
/// buffer when it reads a Score straight from the bytes).
#[derive(Clone, Copy)]
enum Padding {
    None,
    Document,
    ScoreAfterType,
    ScoreBeforeType,
}

/// A valid document with three FileScores, written byte by byte so that
/// building it allocates nothing but the result.
fn document(padding: Padding) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024 * 1024);
    let pad = |out: &mut Vec<u8>, here: bool| {
        if here {
            text(out, "junk");
            junk(out, JUNK_ITEMS);
        }
    };
    head(&mut out, 5, if matches!(padding, Padding::Document) { 5 } else { 4 });
    pad(&mut out, matches!(padding, Padding::Document));
    text(&mut out, "device_id");
    text(&mut out, "dev-1");
    text(&mut out, "deployment");
    text(&mut out, "memory");
    text(&mut out, "generation");
    head(&mut out, 0, 1);
    text(&mut out, "scores");
    head(&mut out, 4, 3);
    for i in 0..3 {
        let padded = i == 1 && matches!(padding, Padding::ScoreAfterType | Padding::ScoreBeforeType);
        head(&mut out, 5, if padded { 4 } else { 3 });
        pad(&mut out, padded && matches!(padding, Padding::ScoreBeforeType));
        text(&mut out, "type");
        text(&mut out, "harmony.file/v1");
        pad(&mut out, padded && matches!(padding, Padding::ScoreAfterType));
        text(&mut out, "path");
        text(&mut out, &format!("/etc/f{i}"));
        text(&mut out, "content");
        text(&mut out, "x");
    }
    out
}

/// The same shapes in JSON (`0,` per junk item: 2 bytes, so half as many).
fn json_document(padding: Padding) -> Vec<u8> {
    let junk = format!("[{}0]", "0,".repeat(JUNK_ITEMS as usize / 2 - 1));
    let at = |here: bool| if here { format!("\"junk\":{junk},") } else { String::new() };
    let scores: Vec<String> = (0..3)
        .map(|i| {
            let padded = i == 1;
            let before = at(padded && matches!(padding, Padding::ScoreBeforeType));
            let after = at(padded && matches!(padding, Padding::ScoreAfterType));
            format!(r#"{{{before}"type":"harmony.file/v1",{after}"path":"/etc/f{i}","content":"x"}}"#)
        })
        .collect();
    let top = at(matches!(padding, Padding::Document));
    format!(
        r#"{{{top}"device_id":"dev-1","deployment":"memory","generation":1,"scores":[{}]}}"#,
        scores.join(",")
    )
    .into_bytes()
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

const CASES: [(&str, Padding, bool); 8] = [
    ("cbor, no padding", Padding::None, false),
    ("cbor, junk beside the fields", Padding::Document, false),
    ("cbor, junk in a Score after its type", Padding::ScoreAfterType, false),
    ("cbor, junk in a Score before its type", Padding::ScoreBeforeType, false),
    ("json, no padding", Padding::None, true),
    ("json, junk beside the fields", Padding::Document, true),
    ("json, junk in a Score after its type", Padding::ScoreAfterType, true),
    ("json, junk in a Score before its type", Padding::ScoreBeforeType, true),
];

fn run_case(index: usize) {
    harmony_scores::ensure_linked();
    let (name, padding, json) = CASES[index];
    let bytes = if json { json_document(padding) } else { document(padding) };
    let limits = DecodeLimits::default();
    // Fault in the code paths once on a small document, so the case measures data, not code.
    let small = if json { json_document(Padding::None) } else { document(Padding::None) };
    let warm = if json { decode_json(&small, &limits) } else { decode(&small, &limits) };
    assert_eq!(warm.unwrap().scores.len(), 3);
    drop(small);
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let before = status_kib("VmRSS:");
    let doc = if json { decode_json(&bytes, &limits) } else { decode(&bytes, &limits) };
    let peak = status_kib("VmHWM:");
    assert_eq!(doc.unwrap().scores.len(), 3, "{name}");
    println!(
        "{name:<42} {:>8} bytes  rss before {before:>6} KiB  high-water {peak:>6} KiB  (+{} KiB)",
        bytes.len(),
        peak.saturating_sub(before)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a case number runs that case here.
    if let Some(index) = std::env::args().nth(1).and_then(|a| a.parse().ok()) {
        return run_case(index);
    }
    let exe = std::env::current_exe().unwrap();
    for index in 0..CASES.len() {
        let status = Command::new(&exe).arg(index.to_string()).status().unwrap();
        assert!(status.success(), "case {index} failed");
    }
}
