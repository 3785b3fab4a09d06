//! `harmony-agent apply` and `harmony-agent scores`, run as the binary against a temp root.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use harmony_score_wire::{decode_json, encode, DecodeLimits};
use serde_json::{json, Value};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_harmony-agent")).args(args).output().unwrap()
}

fn apply(doc: &Path, root: &Path) -> (i32, String, String) {
    let out = agent(&["apply", doc.to_str().unwrap(), "--root", root.to_str().unwrap()]);
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn doc(scores: Value) -> Value {
    json!({"device_id": "dev-1", "deployment": "motd", "generation": 1, "scores": scores})
}

/// Writes `value` as `name` in `dir`: JSON when `name` ends in `.json`,
/// else CBOR through the wire encoder.
fn write_doc(dir: &Path, name: &str, value: &Value) -> PathBuf {
    harmony_scores::ensure_linked();
    let path = dir.join(name);
    let text = serde_json::to_vec(value).unwrap();
    if name.ends_with(".json") {
        std::fs::write(&path, text).unwrap();
    } else {
        std::fs::write(&path, encode(&decode_json(&text, &DecodeLimits::default()).unwrap()).unwrap())
            .unwrap();
    }
    path
}

fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(root).unwrap().display().to_string());
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn apply_creates_then_second_run_is_all_noop_and_touches_nothing() {
    let work = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let value = doc(json!([
        {"type": "harmony.directory/v1", "path": "/etc/app", "mode": 0o750},
        {"type": "harmony.file/v1", "path": "/etc/app/conf", "content": "a = 1\n", "mode": 0o600},
        {"type": "harmony.file/v1", "path": "/etc/motd", "content": "hello\n"},
    ]));
    for name in ["doc.cbor", "doc.json"] {
        let path = write_doc(work.path(), name, &value);
        std::fs::remove_dir_all(root.path()).unwrap();
        std::fs::create_dir(root.path()).unwrap();

        let (code, stdout, stderr) = apply(&path, root.path());
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert_eq!(stdout.lines().filter(|l| l.contains("\tSUCCESS\t")).count(), 3, "{stdout}");
        assert!(stdout.starts_with("harmony.directory/v1\tdirectory [/etc/app]\tSUCCESS\t"), "{stdout}");
        let conf = root.path().join("etc/app/conf");
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "a = 1\n");
        assert_eq!(std::fs::metadata(&conf).unwrap().permissions().mode() & 0o7777, 0o600);
        assert_eq!(
            std::fs::metadata(root.path().join("etc/app")).unwrap().permissions().mode() & 0o7777,
            0o750
        );
        assert_eq!(
            std::fs::metadata(root.path().join("etc/motd")).unwrap().permissions().mode() & 0o7777,
            0o644
        );
        let before: Vec<_> = ["etc/app", "etc/app/conf", "etc/motd"]
            .iter()
            .map(|p| std::fs::metadata(root.path().join(p)).unwrap())
            .map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.mode()))
            .collect();

        let (code, stdout, _) = apply(&path, root.path());
        assert_eq!(code, 0);
        assert_eq!(stdout.lines().filter(|l| l.contains("\tNOOP\t")).count(), 3, "{stdout}");
        let after: Vec<_> = ["etc/app", "etc/app/conf", "etc/motd"]
            .iter()
            .map(|p| std::fs::metadata(root.path().join(p)).unwrap())
            .map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.mode()))
            .collect();
        assert_eq!(before, after);
    }
}

#[test]
fn absent_removes_and_changed_content_is_rewritten() {
    let work = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let first = write_doc(
        work.path(),
        "1.json",
        &doc(json!([{"type": "harmony.file/v1", "path": "/f", "content": "1"}])),
    );
    assert_eq!(apply(&first, root.path()).0, 0);
    let second = write_doc(
        work.path(),
        "2.json",
        &doc(json!([{"type": "harmony.file/v1", "path": "/f", "content": "2"}])),
    );
    let (code, stdout, _) = apply(&second, root.path());
    assert_eq!((code, std::fs::read_to_string(root.path().join("f")).unwrap()), (0, "2".to_owned()));
    assert!(stdout.contains("content updated"), "{stdout}");
    let gone = write_doc(
        work.path(),
        "3.json",
        &doc(json!([{"type": "harmony.file/v1", "path": "/f", "state": "absent"}])),
    );
    let (code, stdout, _) = apply(&gone, root.path());
    assert_eq!(code, 0);
    assert!(stdout.contains("\tSUCCESS\t/f removed"), "{stdout}");
    assert!(!root.path().join("f").exists());
}

#[test]
fn rejected_documents_exit_2_and_write_nothing() {
    let work = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let valid_file = json!({"type": "harmony.file/v1", "path": "/written", "content": "x"});

    let unknown = doc(json!([valid_file, {"type": "acme.widget/v1"}]));
    let path = work.path().join("unknown.json");
    std::fs::write(&path, unknown.to_string()).unwrap();
    let (code, _, stderr) = apply(&path, root.path());
    assert_eq!(code, 2);
    assert!(stderr.contains("unknown_score_tags") && stderr.contains("acme.widget/v1"), "{stderr}");

    let good = write_doc(work.path(), "good.cbor", &doc(json!([valid_file])));
    let bytes = std::fs::read(&good).unwrap();
    let truncated = work.path().join("truncated.cbor");
    std::fs::write(&truncated, &bytes[..bytes.len() - 3]).unwrap();
    let (code, _, stderr) = apply(&truncated, root.path());
    assert_eq!(code, 2);
    assert!(stderr.contains("truncated"), "{stderr}");

    let mut bad_id = doc(json!([valid_file]));
    bad_id["device_id"] = json!("Not_A_Label");
    let path = work.path().join("bad-id.json");
    std::fs::write(&path, bad_id.to_string()).unwrap();
    let (code, _, stderr) = apply(&path, root.path());
    assert_eq!(code, 2);
    assert!(stderr.contains("invalid_device_id"), "{stderr}");

    let big =
        doc(json!([valid_file, {"type": "harmony.file/v1", "path": "/big", "content": "x".repeat(1 << 20)}]));
    let path = work.path().join("big.json");
    std::fs::write(&path, big.to_string()).unwrap();
    let (code, _, stderr) = apply(&path, root.path());
    assert_eq!(code, 2);
    assert!(stderr.contains("too_large"), "{stderr}");

    let (code, _, stderr) = apply(&work.path().join("missing.cbor"), root.path());
    assert_eq!(code, 2, "{stderr}");

    assert_eq!(tree(root.path()), Vec::<String>::new());
}

#[test]
fn escaping_paths_fail_without_stopping_other_scores_or_touching_the_outside() {
    let work = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
    let path = write_doc(
        work.path(),
        "escape.json",
        &doc(json!([
            {"type": "harmony.file/v1", "path": "/link/escaped", "content": "x"},
            {"type": "harmony.directory/v1", "path": "/link/dir"},
            {"type": "harmony.file/v1", "path": "/inside", "content": "x"},
        ])),
    );
    let (code, stdout, _) = apply(&path, root.path());
    assert_eq!(code, 1, "{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.contains("\tFAILURE\t") && l.contains("escapes the device root")).count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains("file [/inside]\tSUCCESS"), "{stdout}");
    // A `..` is refused at decode: the whole document, before anything runs.
    let dotdot = write_doc(
        work.path(),
        "dotdot.json",
        &doc(json!([
            {"type": "harmony.file/v1", "path": "/before", "content": "x"},
            {"type": "harmony.file/v1", "path": "/../escaped", "content": "x"},
        ])),
    );
    let (code, _, stderr) = apply(&dotdot, root.path());
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("invalid_score") && stderr.contains("score #1") && stderr.contains("path"),
        "{stderr}"
    );
    assert_eq!(tree(outside.path()), Vec::<String>::new());
    assert!(!root.path().parent().unwrap().join("escaped").exists());
    assert_eq!(tree(root.path()), vec!["inside".to_owned(), "link".to_owned()]);
}

#[test]
fn scores_lists_every_registered_tag_with_version_and_summary() {
    let out = agent(&["scores"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let tags: Vec<&str> = text.lines().map(|l| l.split('\t').next().unwrap()).collect();
    // The binary links every Score this workspace registers (none dropped
    // by the linker), and at least the two the issue names.
    harmony_scores::ensure_linked();
    let registered: Vec<&str> = harmony_score_wire::registered_scores().iter().map(|r| r.tag).collect();
    assert_eq!(tags, registered);
    assert!(tags.contains(&"harmony.file/v1") && tags.contains(&"harmony.directory/v1"), "{text}");
    assert!(text.lines().all(|l| l.split('\t').count() == 3 && l.split('\t').nth(1) == Some("v1")), "{text}");
}

// Issue 7 §3: `apply --trusted-key` runs the daemon's checks (signature,
// device, expiry); `apply` without keys still refuses an expired document or
// one for another `--device-id`. Nothing of a refused document is applied.
#[test]
fn apply_with_a_trusted_key_runs_the_daemons_checks() {
    use harmony_score_wire::{to_hex32, DocumentSigner};
    let work = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let (trusted, other) = (DocumentSigner::from_seed([3; 32]), DocumentSigner::from_seed([4; 32]));
    let public = work.path().join("trusted.pub");
    std::fs::write(&public, to_hex32(&trusted.verifying_key().to_bytes())).unwrap();
    let cbor = |value: &Value| {
        encode(&decode_json(&serde_json::to_vec(value).unwrap(), &DecodeLimits::default()).unwrap()).unwrap()
    };
    let file = |name: &str, bytes: Vec<u8>| {
        let path = work.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let good = doc(json!([{"type": "harmony.file/v1", "path": "/etc/motd", "content": "signed\n"}]));
    let signed = file("signed.cbor", trusted.sign(cbor(&good)));
    let unsigned = file("unsigned.cbor", cbor(&good));
    let wrong_key = file("other.cbor", other.sign(cbor(&good)));
    let mut expired = good.clone();
    expired["expires_at"] = json!(1);
    let expired = file("expired.cbor", trusted.sign(cbor(&expired)));
    let run = |doc: &Path, extra: &[&str]| {
        let mut args = vec!["apply", doc.to_str().unwrap(), "--root", root.path().to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = agent(&args);
        (out.status.code().unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let key = ["--trusted-key", public.to_str().unwrap()];
    for (doc, extra, reason) in [
        (&unsigned, &key[..], "unsigned"),
        (&wrong_key, &key[..], "bad_signature"),
        (&expired, &key[..], "expired"),
        (&expired, &[][..], "expired"),
        (&signed, &["--device-id", "dev-2"][..], "wrong_device"),
    ] {
        let (code, stderr) = run(doc, extra);
        assert_eq!(code, 2, "{reason}: {stderr}");
        assert!(stderr.contains(reason), "{reason}: {stderr}");
        assert!(!root.path().join("etc/motd").exists(), "{reason}: something was applied");
    }
    let (code, stderr) = run(&signed, &[&key[..], &["--device-id", "dev-1"][..]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read_to_string(root.path().join("etc/motd")).unwrap(), "signed\n");
}

// Issue 7 §5: `apply` judges a document by the device policy as the daemon
// does: by default no setuid; `--policy FILE` reads an agent
// configuration's `[policy]`, its privileges, tags and paths.
#[test]
fn apply_refuses_what_the_device_policy_refuses() {
    let work = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let root_arg = root.path().to_str().unwrap();
    let setuid = write_doc(
        work.path(),
        "setuid.cbor",
        &doc(json!([
            {"type": "harmony.file/v1", "path": "/etc/ok", "content": "x"},
            {"type": "harmony.file/v1", "path": "/usr/bin/tool", "content": "#!", "mode": 0o4755},
        ])),
    );
    let (code, _, stderr) = apply(&setuid, root.path());
    assert_eq!(code, 2, "{stderr}");
    for part in ["policy_denied", "score #1 (harmony.file/v1)", "setuid_mode"] {
        assert!(stderr.contains(part), "{part:?} missing: {stderr}");
    }
    assert!(tree(root.path()).is_empty(), "nothing of a refused document runs: {:?}", tree(root.path()));

    let policy = |text: &str| {
        let path = work.path().join("agent.toml");
        std::fs::write(&path, format!("device_id = \"dev-1\"\nstate_dir = \"/unused\"\n[policy]\n{text}\n"))
            .unwrap();
        path
    };
    let allowing = policy("allow_setuid = true");
    let out = agent(&[
        "apply",
        setuid.to_str().unwrap(),
        "--root",
        root_arg,
        "--policy",
        allowing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let tool = root.path().join("usr/bin/tool");
    assert_eq!(std::fs::metadata(&tool).unwrap().permissions().mode() & 0o7777, 0o4755);

    std::fs::remove_file(&tool).unwrap();
    for (text, part) in [
        ("allow_setuid = true\nallowed_paths = [\"/usr\"]", "outside this device's allowed paths"),
        ("allow_setuid = true\nallowed_tags = [\"harmony.directory/v1\"]", "is not allowed"),
    ] {
        let narrow = policy(text);
        let out = agent(&[
            "apply",
            setuid.to_str().unwrap(),
            "--root",
            root_arg,
            "--policy",
            narrow.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains("policy_denied") && stderr.contains(part), "{text}: {stderr}");
        assert!(!tool.exists(), "{text}: the refused document ran");
    }
    let broken = policy("allow_setuid = maybe");
    let out =
        agent(&["apply", setuid.to_str().unwrap(), "--root", root_arg, "--policy", broken.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "an unreadable policy refuses");
}

// Issue 7 §2: an unknown tag is echoed in the refusal; a newline or an
// escape in it must not reach the terminal raw.
#[test]
fn a_refusal_quoting_the_document_is_one_escaped_line() {
    let work = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let path = work.path().join("evil.json");
    let value = doc(json!([{"type": "evil\n2026-01-01 INFO forged\u{1b}[31m", "path": "/x"}]));
    std::fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
    let (code, _, stderr) = apply(&path, root.path());
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(!stderr.contains('\u{1b}') && stderr.contains("evil\\n2026"), "{stderr:?}");
}

// Issue 11: `apply` runs a document's health checks after its Scores, as
// the daemon does (it keeps no state, so nothing is rolled back), and exits
// 1 when one fails.
#[test]
fn apply_runs_the_documents_health_checks_and_exits_1_when_one_fails() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let hello = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    let mut value = doc(json!([{"type": "harmony.file/v1", "path": "/etc/app.conf", "content": "hello"}]));
    value["health"] = json!([{"type": "file_sha256", "path": "/etc/app.conf", "sha256": hello}]);
    value["health_timeout_s"] = json!(2);
    let held = write_doc(work.path(), "held.json", &value);
    let (code, stdout, stderr) = apply(&held, &root);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("check\tfile_sha256 /etc/app.conf = {hello}\tdocument\theld\t")),
        "{stdout}"
    );

    value["health"][0]["path"] = json!("/etc/missing");
    let failed = write_doc(work.path(), "failed.json", &value);
    let (code, stdout, _) = apply(&failed, &root);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("\tfailed\t/etc/missing does not exist"), "{stdout}");

    // A non-loopback check is a rejection (exit 2), before anything runs.
    value["health"] = json!([{"type": "tcp", "address": "192.0.2.1:22"}]);
    let refused = write_doc(work.path(), "refused.json", &value);
    let (code, _, stderr) = apply(&refused, &root);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not a loopback address"), "{stderr}");
}
