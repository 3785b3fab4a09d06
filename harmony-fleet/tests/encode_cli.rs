//! `harmony-fleet encode` and `inspect`, run as the binary.

use std::process::Command;

fn fleet(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_harmony-fleet")).args(args).output().unwrap()
}

#[test]
fn encode_then_inspect_gives_back_the_document_with_defaults_filled_in() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("doc.json");
    let cbor_path = dir.path().join("doc.cbor");
    std::fs::write(
        &json_path,
        r#"{"device_id":"dev-1","deployment":"motd","generation":1,"scores":[{"type":"harmony.file/v1","path":"/etc/motd","content":"hello\n"}]}"#,
    )
    .unwrap();
    let out = fleet(&["encode", json_path.to_str().unwrap(), "-o", cbor_path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cbor = std::fs::read(&cbor_path).unwrap();
    assert_eq!(cbor[0] & 0xe0, 0xa0, "a CBOR map");

    let out = fleet(&["inspect", cbor_path.to_str().unwrap()]);
    assert!(out.status.success());
    let back: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        back,
        serde_json::json!({"format": 1, "device_id": "dev-1", "deployment": "motd", "generation": 1, "issued_at": 0,
            "scores": [{"type": "harmony.file/v1", "path": "/etc/motd", "content": "hello\n", "state": "present"}]})
    );
}

#[test]
fn encode_refuses_invalid_documents_and_writes_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("doc.json");
    let cbor_path = dir.path().join("doc.cbor");
    std::fs::write(&json_path, r#"{"device_id":"dev-1","deployment":"a.b","generation":1,"scores":[]}"#)
        .unwrap();
    let out = fleet(&["encode", json_path.to_str().unwrap(), "-o", cbor_path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_deployment_name"));
    assert!(!cbor_path.exists());

    std::fs::write(&cbor_path, [0xa1, 0x61]).unwrap();
    let out = fleet(&["inspect", cbor_path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"));
}
