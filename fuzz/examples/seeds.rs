//! Writes the seed corpora under `fuzz/seeds/<target>/` from valid documents,
//! the wire fixtures and a few edge shapes. Deterministic: run it again and
//! git sees no change. `scripts/fuzz seeds` runs it.

use std::path::{Path, PathBuf};

use harmony_fuzz::FUZZ_KEY_SEED;
use harmony_score_wire::{encode, DeploymentName, DesiredState, DeviceId, DeviceScore, DocumentSigner};
use harmony_scores::{DirectoryScore, FileScore, PresenceState};

fn document(scores: usize, expires: bool) -> DesiredState {
    let scores = (0..scores)
        .map(|i| -> Box<dyn DeviceScore> {
            if i % 3 == 0 {
                Box::new(DirectoryScore {
                    path: format!("/etc/app{i}"),
                    mode: Some(0o750),
                    state: PresenceState::Present,
                })
            } else {
                Box::new(FileScore {
                    path: format!("/etc/app{}/f{i}.conf", i - i % 3),
                    content: format!("key = {i}\nü\n"),
                    mode: (i % 2 == 0).then_some(0o640),
                    state: if i == 4 { PresenceState::Absent } else { PresenceState::Present },
                })
            }
        })
        .collect();
    let mut doc =
        DesiredState::new(DeviceId::new("dev-1").unwrap(), DeploymentName::new("app").unwrap(), 7, scores);
    doc.issued_at = 1_790_000_000;
    doc.expires_at = expires.then_some(1_890_000_000);
    doc
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    harmony_scores::ensure_linked();
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let seeds = fuzz.join("seeds");
    let fixtures = fuzz.join("../tests/fixtures/wire");
    let (cbor, json, envelope, paths) = (
        seeds.join("decode_cbor"),
        seeds.join("decode_json"),
        seeds.join("open_envelope"),
        seeds.join("path_resolution"),
    );

    let mut documents = Vec::new();
    for entry in std::fs::read_dir(&fixtures).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().replace('@', "-");
        let bytes = std::fs::read(&path).unwrap();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cbor") => documents.push((format!("fixture-{name}"), bytes)),
            Some("json") => write(&json, &format!("fixture-{name}"), &bytes),
            _ => {}
        }
    }
    write(&json, "example-motd.json", &std::fs::read(fuzz.join("../examples/motd.json")).unwrap());
    for (scores, expires) in [(0, false), (1, false), (3, true), (12, false)] {
        let doc = document(scores, expires);
        documents.push((format!("doc-{scores}.cbor"), encode(&doc).unwrap()));
        write(&json, &format!("doc-{scores}.json"), &serde_json::to_vec(&doc).unwrap());
    }
    write(
        &json,
        "doc-3-pretty.json",
        harmony_score_wire::to_json_pretty(&document(3, true)).unwrap().as_bytes(),
    );
    // Shapes the decoder must refuse or read carefully, written by hand.
    write(&json, "late-type-junk.json", br#"{"junk":[0,[1,{"a":null}],-1,1.5],"device_id":"dev-1","deployment":"d","generation":1,"scores":[{"path":"/a","content":"","type":"harmony.file/v1"}]}"#);
    write(
        &json,
        "unknown-tag.json",
        br#"{"device_id":"dev-1","deployment":"d","generation":1,"scores":[{"type":"acme.widget/v3"}]}"#,
    );
    write(&json, "bad-fields.json", br#"{"format":2,"device_id":"Dev_1","deployment":"a.b","generation":-1,"scores":[{"type":"harmony.file/v1","path":"/a/../b","mode":2541}]}"#);
    // The first Score of doc-3 with `type` last, and everything indefinite-length.
    let late = [
        &[0xbf][..],
        b"\x69device_id\x65dev-1\x6adeployment\x61d\x6ageneration\x01\x66scores\x9f",
        b"\xbf\x64path\x62/a\x67content\x7f\x61x\x61y\xff\x64type\x6fharmony.file/v1\xff",
        b"\xa2\x64type\x74harmony.directory/v1\x64path\x62/d",
        b"\xff\xff",
    ]
    .concat();
    documents.push(("late-type-indefinite.cbor".into(), late));
    // Lengths that claim far more than follows, and a nesting bomb.
    documents.push((
        "huge-lengths.cbor".into(),
        b"\xa1\x66scores\x9b\xff\xff\xff\xff\xff\xff\xff\xff\x00".to_vec(),
    ));
    documents.push(("deep.cbor".into(), [vec![0x81; 64], vec![0]].concat()));

    let signer = DocumentSigner::from_seed(FUZZ_KEY_SEED);
    for (name, bytes) in &documents {
        write(&cbor, name, bytes);
        write(&envelope, &format!("signed-{name}"), &signer.sign(bytes.clone()));
    }
    write(&envelope, "bare-doc-1.cbor", &encode(&document(1, false)).unwrap());
    let other = DocumentSigner::from_seed([0x17; 32]);
    write(&envelope, "signed-other-key.cbor", &other.sign(encode(&document(1, false)).unwrap()));

    let path_seeds = [
        "/etc/motd",
        "/etc//x/",
        "/./etc/x",
        "//etc/./x//",
        "/a/.../b",
        "/a/../b",
        "..",
        "relative/x",
        "/",
        "/a\nb",
        "/a\u{1b}[31m",
        "/in/b/file",
        "/abs/file",
        "/out/etc/passwd",
        "/up/x",
        "/dangling/x",
        "/self/x",
        "/a/b/file/x",
        "path:/etc//motd",
        "container:web",
        "unit:nginx.service",
        "Container:x",
        "path:rel",
        "package:a\u{85}b",
        "nocolon",
    ];
    for (i, seed) in path_seeds.iter().enumerate() {
        write(&paths, &format!("path-{i:02}"), seed.as_bytes());
    }
}
