//! Score paths: normalization, the validation built on it, resource ids,
//! and how the device names a path under a real root with symlinks.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use harmony_score_wire::{normalize_path, validate::check_path, ResourceId};
use harmony_topology::LocalDeviceTopology;
use libfuzzer_sys::fuzz_target;

/// A root with directories and symlinks inside and out of it:
/// `a/b/`, `in -> a`, `abs -> <root>/a/b`, `out -> /`, `up -> ..`, `dangling -> nowhere`, `self -> self`.
fn topology() -> &'static (tempfile::TempDir, LocalDeviceTopology) {
    static ROOT: OnceLock<(tempfile::TempDir, LocalDeviceTopology)> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/file"), "x").unwrap();
        let link = |target: PathBuf, name: &str| std::os::unix::fs::symlink(target, root.join(name)).unwrap();
        link("a".into(), "in");
        link(root.join("a/b"), "abs");
        link("/".into(), "out");
        link("..".into(), "up");
        link("nowhere".into(), "dangling");
        link("self".into(), "self");
        let topology = LocalDeviceTopology::new(&root);
        (dir, topology)
    })
}

fn check_normalized(input: &str, normal: &str) {
    assert!(normal.starts_with('/') && normal.len() > 1, "{input:?} -> {normal:?}");
    assert!(!normal.ends_with('/'), "{normal:?}");
    assert!(normal.len() <= input.len(), "{input:?} grew to {normal:?}");
    for part in normal[1..].split('/') {
        assert!(!part.is_empty() && part != "." && part != "..", "{input:?} -> {normal:?}");
    }
    assert!(!normal.chars().any(char::is_control));
    assert_eq!(normalize_path(normal).as_deref(), Ok(normal), "not idempotent: {input:?}");
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();

    let normal = normalize_path(text);
    if let Ok(normal) = &normal {
        check_normalized(text, normal);
        // Aliases are one resource.
        assert_eq!(ResourceId::path(text), ResourceId::path(normal));
        assert_eq!(ResourceId::path(text).name(), normal);
    }
    assert_eq!(check_path("path", text).is_ok(), normal.is_ok());
    if text.split('/').any(|part| part == "..") {
        assert!(normal.is_err(), "{text:?} has a '..' component");
    }

    // `kind:name` text: what parses prints back as itself (other kinds, and
    // paths in normal form; a path that does not normalize keeps an escaped
    // text, which only a Score refused at validation ever has), and has no
    // control characters.
    if let Ok(id) = ResourceId::try_from(text.to_owned()) {
        let printed = id.to_string();
        assert!(printed.starts_with(&format!("{}:", id.kind())));
        if id.kind() != ResourceId::PATH || normalize_path(id.name()).as_deref() == Ok(id.name()) {
            assert_eq!(ResourceId::try_from(printed).as_ref(), Ok(&id));
        }
        assert!(!id.name().chars().any(char::is_control), "{id:?}");
    }

    // The device's name for the path stays beneath the root and is normal.
    if data.len() <= 512 {
        let (_dir, topology) = topology();
        if let Some(device) = topology.device_path(text) {
            assert!(text.starts_with('/'), "{text:?}");
            assert!(!text.split('/').any(|part| part == ".."), "{text:?} -> {device:?}");
            assert!(device.starts_with('/'), "{device:?}");
            assert!(
                !device[1..].split('/').any(|p| p.is_empty() || p == "." || p == ".."),
                "{text:?} -> {device:?}"
            );
            let canonical_root = std::fs::canonicalize(topology.root()).unwrap();
            let on_disk = canonical_root.join(&device[1..]);
            if let Some(parent) = on_disk.parent().and_then(|p| std::fs::canonicalize(p).ok()) {
                assert!(parent.starts_with(&canonical_root), "{text:?} -> {device:?} leaves the root");
            }
        }
    }
});
