//! Tests of `PodmanContainerScore`: validation, the spec digest and the wire form without podman; the Interpret through the `Maestro` against real podman where it is installed.

use std::process::Command;

use harmony_topology::{InterpretErrorKind, LocalDeviceTopology, Maestro};

use super::*;

const IMAGE: &str = "localhost/harmony-busybox:test";

fn web(name: &str) -> PodmanContainerScore {
    PodmanContainerScore {
        image: IMAGE.to_owned(),
        command: vec!["/bin/httpd".into(), "-f".into(), "-p".into(), "8080".into()],
        state: PresenceState::Present,
        ..PodmanContainerScore::absent(name, 30)
    }
}

#[test]
fn the_json_form_of_the_issue_decodes_as_written_with_defaults() {
    let json = r#"{"type":"harmony.podman.container/v1","name":"web","image":"localhost/harmony-busybox:test","command":["/bin/httpd","-f","-p","8080"],"ports":["127.0.0.1:18080:8080"]}"#;
    let score: Box<dyn DeviceScore> = serde_json::from_str(json).unwrap();
    score.validate().unwrap();
    assert_eq!(score.resource().to_string(), "container:web");
    assert_eq!(score.name(), "container [web]");
    assert_eq!(score.privileges(), []);
    assert_eq!(score.interpret_timeout(), Some(Duration::from_secs(630)));
    let form = serde_json::to_value(&score).unwrap();
    assert_eq!(form["stop_timeout_s"], 30);
    assert_eq!((form["restart"].as_str(), form["network"].as_str()), (Some("no"), Some("default")));
    assert_eq!((form["privileged"].as_bool(), form["state"].as_str()), (Some(false), Some("present")));
    assert!(form.get("memory").is_none() && form.get("cpus").is_none());
}

#[test]
fn validation_names_the_field() {
    let ok = PodmanContainerScore {
        ports: vec!["127.0.0.1:18080:8080".into(), "8080:80/udp".into(), "[::1]::9090".into()],
        volumes: vec![Volume {
            host_path: "/srv/www/".into(),
            container_path: "/www".into(),
            read_only: true,
        }],
        env: BTreeMap::from([("GREETING".into(), "hello = world".into()), ("_X1".into(), String::new())]),
        labels: BTreeMap::from([("org.example/team".into(), "edge".into())]),
        memory: Some("64m".into()),
        cpus: Some(0.5),
        ..web("web-1.a_b")
    };
    ok.validate().unwrap();
    PodmanContainerScore::absent("web", 0).validate().unwrap();
    let image = |s: &str| PodmanContainerScore { image: s.into(), ..web("web") };
    for good in [
        "busybox",
        "docker.io/library/busybox:1.36",
        "localhost:5000/a/b_c.d-e:tag",
        &format!("x@sha256:{}", "a".repeat(64)),
    ] {
        image(good).validate().unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    let port = |s: &str| PodmanContainerScore { ports: vec![s.into()], ..web("web") };
    let volume = |h: &str, c: &str| PodmanContainerScore {
        volumes: vec![Volume { host_path: h.into(), container_path: c.into(), read_only: false }],
        ..web("web")
    };
    let env =
        |k: &str, v: &str| PodmanContainerScore { env: BTreeMap::from([(k.into(), v.into())]), ..web("web") };
    let label = |k: &str, v: &str| PodmanContainerScore {
        labels: BTreeMap::from([(k.into(), v.into())]),
        ..web("web")
    };
    let cases: Vec<(PodmanContainerScore, &str)> = vec![
        (web(""), "name"),
        (web("-web"), "name"),
        (web("web/1"), "name"),
        (web("web 1"), "name"),
        (web("wéb"), "name"),
        (web(&"w".repeat(129)), "name"),
        (image(""), "image"),
        (image("--privileged"), "image"),
        (image("busy box"), "image"),
        (image("busybox\n"), "image"),
        (image("a//b"), "image"),
        (image("busybox:"), "image"),
        (image("x@sha256:abc"), "image"),
        (image(&"a".repeat(513)), "image"),
        (PodmanContainerScore { command: vec!["a\0b".into()], ..web("web") }, "command[0]"),
        (port("0"), "ports[0]"),
        (port("70000:80"), "ports[0]"),
        (port("80/icmp"), "ports[0]"),
        (port("8000-8010:80"), "ports[0]"),
        (port("localhost:80:80"), "ports[0]"),
        (PodmanContainerScore { ports: vec!["1:80".into(), "1:81".into()], ..web("web") }, "ports[1]"),
        (PodmanContainerScore { network: Network::Host, ..port("80") }, "ports[0]"),
        (volume("/srv/../etc", "/data"), "volumes[0].host_path"),
        (volume("srv", "/data"), "volumes[0].host_path"),
        (volume("/", "/data"), "volumes[0].host_path"),
        (volume("/srv:/etc", "/data"), "volumes[0].host_path"),
        (volume("/srv", "/data/.."), "volumes[0].container_path"),
        (volume("/srv", "/data,ro"), "volumes[0].container_path"),
        (
            PodmanContainerScore {
                volumes: vec![
                    Volume { host_path: "/a".into(), container_path: "/data".into(), read_only: false },
                    Volume { host_path: "/b".into(), container_path: "/data/".into(), read_only: true },
                ],
                ..web("web")
            },
            "volumes[1].container_path",
        ),
        (env("1X", "v"), "env.1X"),
        (env("A-B", "v"), "env.A-B"),
        (env("A", "two\nlines"), "env.A"),
        (label("harmony.managed", "false"), "labels.harmony.managed"),
        (label("Harmony.spec", "x"), "labels.Harmony.spec"),
        (label("", "x"), "labels."),
        (label("a b", "x"), "labels.a b"),
        (label("a", "x\ny"), "labels.a"),
        (PodmanContainerScore { memory: Some("5m".into()), ..web("web") }, "memory"),
        (PodmanContainerScore { memory: Some("1.5g".into()), ..web("web") }, "memory"),
        (PodmanContainerScore { cpus: Some(0.0), ..web("web") }, "cpus"),
        (PodmanContainerScore { cpus: Some(f64::NAN), ..web("web") }, "cpus"),
        (PodmanContainerScore { stop_timeout_s: 3601, ..web("web") }, "stop_timeout_s"),
        (archive("../busybox.tar", &"a".repeat(64)), "image_archive.artifact"),
        (archive("busybox tar", &"a".repeat(64)), "image_archive.artifact"),
        (archive("", &"a".repeat(64)), "image_archive.artifact"),
        (archive("busybox.tar", &"A".repeat(64)), "image_archive.sha256"),
        (archive("busybox.tar", "sha256:abc"), "image_archive.sha256"),
    ];
    for (score, field) in cases {
        let err = score.validate().expect_err(&format!("{score:?} was accepted"));
        assert_eq!(err.field, field, "{score:?}: {err}");
    }
}

/// `web` with its image from the archive `artifact` of digest `sha256`.
fn archive(artifact: &str, sha256: &str) -> PodmanContainerScore {
    PodmanContainerScore {
        image_archive: Some(ImageArchive { artifact: artifact.into(), sha256: sha256.into() }),
        ..web("web")
    }
}

#[test]
fn an_image_archive_is_named_by_artifact_and_digest_and_changes_the_spec() {
    let json = format!(
        r#"{{"type":"harmony.podman.container/v1","name":"web","image":"localhost/harmony-busybox:test",
            "image_archive":{{"artifact":"busybox.tar","sha256":"{}"}}}}"#,
        "0f".repeat(32)
    );
    let score: Box<dyn DeviceScore> = serde_json::from_str(&json).unwrap();
    score.validate().unwrap();
    let form = serde_json::to_value(&score).unwrap();
    assert_eq!(form["image_archive"]["artifact"], "busybox.tar");
    assert!(serde_json::to_value(web("web")).unwrap().get("image_archive").is_none(), "omitted when unset");
    let one = archive("busybox.tar", &"a".repeat(64));
    let other = archive("busybox.tar", &"b".repeat(64));
    assert_ne!(one.spec_digest(), other.spec_digest(), "a new archive recreates the container");
    assert_eq!(
        one.spec_digest(),
        archive("renamed.tar", &"a".repeat(64)).spec_digest(),
        "the digest decides"
    );
    assert!(one.undo().unwrap().validate().is_ok());
    assert!(!serde_json::to_string(&one.undo().unwrap()).unwrap().contains("image_archive"));
}

#[test]
fn privileges_are_declared_for_what_a_present_container_asks() {
    let both = PodmanContainerScore { privileged: true, network: Network::Host, ..web("web") };
    assert_eq!(both.privileges(), [Privilege::PrivilegedContainer, Privilege::HostNetwork]);
    let undo = both.undo().unwrap();
    assert_eq!(undo.privileges(), [], "removing a privileged container needs no privilege");
    assert_eq!(undo.resource(), both.resource());
    assert!(undo.undo().is_none());
    // The undo is kept in the agent's state: no image, no environment.
    let secret =
        PodmanContainerScore { env: BTreeMap::from([("TOKEN".into(), "s3cr3t".into())]), ..web("web") };
    let form = serde_json::to_string(&secret.undo().unwrap()).unwrap();
    assert!(!form.contains("s3cr3t") && !form.contains(IMAGE), "{form}");
    assert_eq!(secret.undo().unwrap().interpret_timeout(), Some(Duration::from_secs(630)));
}

#[test]
fn the_spec_digest_covers_what_the_container_is_made_of_and_nothing_else() {
    let base = PodmanContainerScore {
        ports: vec!["127.0.0.1:18080:8080".into()],
        env: BTreeMap::from([("A".into(), "1".into())]),
        ..web("web")
    };
    // Locked: a change to the canonical form recreates every container in the field.
    assert_eq!(base.spec_digest(), "958f56de39ebd23f06f58256e59d00375ab021b5180ac9cb06a438bbc7ece8da");
    let same = [
        PodmanContainerScore { name: "other".into(), ..base.clone() },
        PodmanContainerScore { ports: vec!["127.0.0.1:18080:8080/tcp".into()], ..base.clone() },
    ];
    for score in same {
        assert_eq!(score.spec_digest(), base.spec_digest(), "{score:?}");
    }
    let changed = [
        PodmanContainerScore { env: BTreeMap::from([("A".into(), "2".into())]), ..base.clone() },
        PodmanContainerScore { image: "localhost/other:test".into(), ..base.clone() },
        PodmanContainerScore { command: vec![], ..base.clone() },
        PodmanContainerScore { ports: vec!["127.0.0.1:18081:8080".into()], ..base.clone() },
        PodmanContainerScore { labels: BTreeMap::from([("a".into(), "b".into())]), ..base.clone() },
        PodmanContainerScore { memory: Some("64m".into()), ..base.clone() },
        PodmanContainerScore { stop_timeout_s: 1, ..base.clone() },
        PodmanContainerScore { restart: Restart::Always, ..base.clone() },
        PodmanContainerScore {
            image_archive: archive("a.tar", &"a".repeat(64)).image_archive,
            ..base.clone()
        },
    ];
    for score in changed {
        assert_ne!(score.spec_digest(), base.spec_digest(), "{score:?}");
    }
    let spec = base.container_spec(Some("app"));
    assert_eq!(spec.labels[SPEC_LABEL], base.spec_digest());
    assert_eq!(
        (spec.labels[MANAGED_LABEL].as_str(), spec.labels[DEPLOYMENT_LABEL].as_str()),
        ("true", "app")
    );
    assert!(!base.container_spec(None).labels.contains_key(DEPLOYMENT_LABEL));
}

/// Real podman with the test image, or `None` (and why, on stderr) when the
/// podman binary is missing. CI installs it, so there this never skips.
fn podman_ready() -> bool {
    if Command::new("podman").arg("--version").output().is_err() {
        eprintln!("skipped: no podman binary on PATH (scripts/install-podman installs it)");
        return false;
    }
    if !Command::new("podman").args(["image", "exists", IMAGE]).status().expect("podman").success() {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-test-image");
        assert!(Command::new(script).status().expect("build-test-image").success());
    }
    true
}

/// A container name unique to this run; the container is removed on drop.
struct Unique(String);

impl Unique {
    fn new(what: &str) -> Self {
        Self(format!("harmony-scores-{what}-{}", std::process::id()))
    }
}

impl Drop for Unique {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "--force", "--ignore", "--time", "0", &self.0]).output();
    }
}

fn podman(args: &[&str]) -> String {
    let out = Command::new("podman").args(args).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn maestro(root: &std::path::Path) -> Maestro<LocalDeviceTopology> {
    Maestro::initialize(Inventory::empty(), LocalDeviceTopology::new(root)).await.unwrap()
}

#[tokio::test]
async fn creates_then_noop_then_recreates_on_change_restarts_when_killed_and_removes() {
    if !podman_ready() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("srv/www")).unwrap();
    std::fs::write(root.path().join("srv/www/index.html"), "from the device\n").unwrap();
    let m = maestro(root.path()).await;
    let name = Unique::new("life");
    let score = PodmanContainerScore {
        command: vec!["/bin/sleep".into(), "600".into()],
        env: BTreeMap::from([("GREETING".into(), "one".into())]),
        volumes: vec![Volume {
            host_path: "/srv/www".into(),
            container_path: "/www".into(),
            read_only: true,
        }],
        stop_timeout_s: 1,
        ..web(&name.0)
    };
    let out = m.interpret(&score).await.unwrap();
    assert_eq!(out.status, InterpretStatus::SUCCESS, "{out:?}");
    assert!(out.message.contains("created and started"), "{}", out.message);
    let id = podman(&["inspect", "--format", "{{.Id}}", &name.0]);
    assert_eq!(podman(&["exec", &name.0, "/bin/cat", "/www/index.html"]), "from the device");

    let out = m.interpret(&score).await.unwrap();
    assert_eq!((out.status, out.message.contains("running")), (InterpretStatus::NOOP, true), "{out:?}");
    assert_eq!(podman(&["inspect", "--format", "{{.Id}}", &name.0]), id);

    let changed =
        PodmanContainerScore { env: BTreeMap::from([("GREETING".into(), "two".into())]), ..score.clone() };
    let out = m.interpret(&changed).await.unwrap();
    assert_eq!(out.status, InterpretStatus::SUCCESS);
    assert!(out.message.contains("recreated: its spec changed"), "{}", out.message);
    let new_id = podman(&["inspect", "--format", "{{.Id}}", &name.0]);
    assert_ne!(new_id, id);
    assert!(podman(&["inspect", "--format", "{{json .Config.Env}}", &name.0]).contains("GREETING=two"));

    podman(&["kill", &name.0]);
    let out = m.interpret(&changed).await.unwrap();
    assert_eq!(out.status, InterpretStatus::SUCCESS);
    assert!(out.message.contains("restarted (was exited"), "{}", out.message);
    assert_eq!(
        podman(&["inspect", "--format", "{{.State.Status}} {{.Id}}", &name.0]),
        format!("running {new_id}")
    );

    let undo = changed.undo().unwrap();
    let out = m.interpret(undo.as_ref()).await.unwrap();
    assert_eq!((out.status, out.message), (InterpretStatus::SUCCESS, format!("{} removed", name.0)));
    assert_eq!(
        podman(&["ps", "-a", "--filter", &format!("name=^{}$", name.0), "--format", "{{.Names}}"]),
        ""
    );
    assert_eq!(m.interpret(undo.as_ref()).await.unwrap().status, InterpretStatus::NOOP);
}

#[tokio::test]
async fn a_container_this_agent_did_not_create_is_never_touched() {
    if !podman_ready() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let m = maestro(root.path()).await;
    let name = Unique::new("foreign");
    podman(&["run", "-d", "--name", &name.0, IMAGE, "/bin/sleep", "600"]);
    let id = podman(&["inspect", "--format", "{{.Id}}", &name.0]);
    let err = m.interpret(&web(&name.0)).await.unwrap_err();
    assert!(err.message().contains("did not create"), "{err}");
    let out = m.interpret(web(&name.0).undo().unwrap().as_ref()).await.unwrap();
    assert_eq!(out.status, InterpretStatus::NOOP, "{out:?}");
    assert_eq!(
        podman(&["inspect", "--format", "{{.State.Status}} {{.Id}}", &name.0]),
        format!("running {id}")
    );
}

#[tokio::test]
async fn failures_are_typed_and_leave_the_running_container_alone() {
    if !podman_ready() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let m = maestro(root.path()).await;
    let name = Unique::new("fail");
    let score = PodmanContainerScore {
        command: vec!["/bin/sleep".into(), "600".into()],
        stop_timeout_s: 1,
        ..web(&name.0)
    };
    assert_eq!(m.interpret(&score).await.unwrap().status, InterpretStatus::SUCCESS);
    let id = podman(&["inspect", "--format", "{{.Id}}", &name.0]);

    // A missing volume source: refused before the old container goes.
    let missing = PodmanContainerScore {
        volumes: vec![Volume {
            host_path: "/no/such/dir".into(),
            container_path: "/d".into(),
            read_only: false,
        }],
        ..score.clone()
    };
    let err = m.interpret(&missing).await.unwrap_err();
    assert!(err.message().contains("does not exist"), "{err}");
    // An image that is not here and cannot be pulled (no registry answers
    // for localhost/): podman's own words, the old container still running.
    let unknown = PodmanContainerScore { image: "localhost/harmony-no-such-image:x".into(), ..score.clone() };
    let err = m.interpret(&unknown).await.unwrap_err();
    assert_eq!(err.kind(), InterpretErrorKind::Failed);
    assert!(err.message().starts_with("pull localhost/harmony-no-such-image:x failed: "), "{err}");
    assert_eq!(
        podman(&["inspect", "--format", "{{.State.Status}} {{.Id}}", &name.0]),
        format!("running {id}")
    );

    let invalid =
        PodmanContainerScore { labels: BTreeMap::from([("harmony.spec".into(), "x".into())]), ..score };
    assert_eq!(m.interpret(&invalid).await.unwrap_err().kind(), InterpretErrorKind::InvalidInput);
    let escaping = PodmanContainerScore {
        volumes: vec![Volume { host_path: "/../etc".into(), container_path: "/d".into(), read_only: false }],
        ..web(&name.0)
    };
    assert_eq!(m.interpret(&escaping).await.unwrap_err().kind(), InterpretErrorKind::InvalidInput);
    assert_eq!(podman(&["inspect", "--format", "{{.Id}}", &name.0]), id);
}

/// An artifact store holding one archive (or answering with an error), counting fetches.
#[derive(Debug)]
struct OneArchive {
    path: std::path::PathBuf,
    sha256: String,
    fetches: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl harmony_topology::ArtifactStore for OneArchive {
    async fn fetch(
        &self,
        name: &str,
        sha256: &str,
    ) -> Result<harmony_topology::FetchedArtifact, harmony_topology::ArtifactError> {
        self.fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if sha256 != self.sha256 {
            return Err(harmony_topology::ArtifactError::DigestMismatch {
                name: name.into(),
                expected: sha256.into(),
                actual: self.sha256.clone(),
            });
        }
        let bytes = std::fs::metadata(&self.path).unwrap().len();
        Ok(harmony_topology::FetchedArtifact {
            path: self.path.clone(),
            bytes,
            transferred_in: Some(Duration::from_millis(7)),
        })
    }
}

#[tokio::test]
async fn an_image_missing_locally_is_loaded_from_its_archive_and_a_wrong_digest_loads_nothing() {
    if !podman_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A tag of this test alone: untagging it leaves the shared test image.
    let tag = format!("localhost/harmony-busybox:scores-{}", std::process::id());
    let tar = dir.path().join("image.tar");
    podman(&["tag", IMAGE, &tag]);
    podman(&["save", "--quiet", "--output", tar.to_str().unwrap(), &tag]);
    podman(&["rmi", &tag]);
    let store =
        std::sync::Arc::new(OneArchive { path: tar, sha256: "c".repeat(64), fetches: Default::default() });
    let topology = LocalDeviceTopology::new(dir.path()).with_artifacts(store.clone());
    let m = Maestro::initialize(Inventory::empty(), topology).await.unwrap();
    let name = Unique::new("archive");
    let wrong = PodmanContainerScore {
        image: tag.clone(),
        command: vec!["/bin/sleep".into(), "600".into()],
        stop_timeout_s: 1,
        ..archive("image.tar", &"d".repeat(64))
    };
    let wrong = PodmanContainerScore { name: name.0.clone(), ..wrong };
    let err = m.interpret(&wrong).await.unwrap_err();
    assert_eq!(err.kind(), InterpretErrorKind::DigestMismatch, "{err}");
    assert!(!Command::new("podman").args(["image", "exists", &tag]).status().unwrap().success(), "loaded");
    assert_eq!(
        podman(&["ps", "-a", "--filter", &format!("name=^{}$", name.0), "--format", "{{.Names}}"]),
        ""
    );

    let right =
        PodmanContainerScore { image_archive: archive("image.tar", &"c".repeat(64)).image_archive, ..wrong };
    let out = m.interpret(&right).await.unwrap();
    assert_eq!(out.status, InterpretStatus::SUCCESS, "{out:?}");
    assert!(out.message.contains("created and started"), "{}", out.message);
    assert!(out.message.contains(&format!("{tag} loaded from artifact image.tar (")), "{}", out.message);
    assert!(out.message.contains("bytes fetched in 7 ms"), "{}", out.message);
    assert_eq!(store.fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
    // Present now: the next run fetches nothing.
    assert_eq!(m.interpret(&right).await.unwrap().status, InterpretStatus::NOOP);
    assert_eq!(store.fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
    m.interpret(right.undo().unwrap().as_ref()).await.unwrap();
    podman(&["rmi", &tag]);
}
