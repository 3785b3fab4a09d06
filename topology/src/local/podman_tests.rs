//! Tests of the podman adapter: against real podman and the test image where podman is installed, against stand-in scripts for timeouts and output bounds.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;
use crate::container::*;
use crate::LocalDeviceTopology;

const IMAGE: &str = "localhost/harmony-busybox:test";

/// Real podman with the test image, or `None` (and why, on stderr) when the
/// podman binary is missing. CI installs it (`scripts/install-podman`), so
/// there these tests always run.
fn real_podman() -> Option<Podman> {
    if Command::new("podman").arg("--version").output().is_err() {
        // CI sets it: there a missing podman is a failure, never a skip.
        assert!(
            std::env::var_os("HARMONY_REQUIRE_PODMAN").is_none(),
            "HARMONY_REQUIRE_PODMAN is set and no podman binary is on PATH"
        );
        eprintln!("skipped: no podman binary on PATH (scripts/install-podman installs it)");
        return None;
    }
    let exists = Command::new("podman").args(["image", "exists", IMAGE]).status().expect("podman runs");
    if !exists.success() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-test-image");
        assert!(Command::new(script).status().expect("build-test-image").success(), "cannot build {IMAGE}");
    }
    Some(Podman::default())
}

/// A container name unique to this test run, removed on drop.
struct Name(String);

impl Name {
    fn new(what: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        Self(format!("harmony-topology-{what}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
    }
}

impl Drop for Name {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "--force", "--ignore", "--time", "0", &self.0]).output();
    }
}

fn spec(name: &str, command: &[&str]) -> ContainerSpec {
    ContainerSpec {
        name: name.to_owned(),
        image: IMAGE.to_owned(),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        env: BTreeMap::new(),
        ports: Vec::new(),
        volumes: Vec::new(),
        restart: RestartPolicy::No,
        labels: BTreeMap::from([("test.label".to_owned(), "yes".to_owned())]),
        memory_bytes: None,
        cpus: None,
        stop_timeout: Duration::from_secs(1),
        privileged: false,
        network: NetworkMode::Default,
    }
}

fn inspect_field(name: &str, template: &str) -> String {
    let out = Command::new("podman").args(["inspect", "--format", template, name]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn a_container_is_created_started_stopped_restarted_and_removed() {
    let Some(podman) = real_podman() else { return };
    let name = Name::new("life");
    assert_eq!(podman.inspect_container(&name.0).await.unwrap(), None);
    assert!(podman.image_present(IMAGE).await.unwrap());
    assert!(!podman.image_present("localhost/harmony-no-such-image:x").await.unwrap());

    let mut wanted = spec(&name.0, &["/bin/sleep", "600"]);
    wanted.env = BTreeMap::from([
        ("GREETING".to_owned(), "hello world = x ".to_owned()),
        ("SECRET".to_owned(), "s3cr3t".to_owned()),
    ]);
    wanted.memory_bytes = Some(64 << 20);
    let id = podman.create_and_start(&wanted).await.unwrap();
    let state = podman.inspect_container(&name.0).await.unwrap().expect("created");
    assert_eq!(
        (state.id.as_str(), &state.status, state.image.as_str()),
        (id.as_str(), &ContainerStatus::Running, IMAGE)
    );
    assert_eq!(state.labels.get("test.label").map(String::as_str), Some("yes"));
    let env = inspect_field(&name.0, "{{json .Config.Env}}");
    assert!(env.contains("\"GREETING=hello world = x \"") && env.contains("SECRET=s3cr3t"), "{env}");
    assert_eq!(inspect_field(&name.0, "{{.HostConfig.Memory}}"), (64u64 << 20).to_string());
    // The environment file is gone once the container exists.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name().to_string_lossy().starts_with(&format!(".harmony-env.{}.", std::process::id()))
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // sleep as PID 1 ignores SIGTERM: the grace period ends in SIGKILL.
    let started = Instant::now();
    podman.stop(&name.0, Duration::from_secs(1)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    let stopped = podman.inspect_container(&name.0).await.unwrap().unwrap();
    assert!(stopped.status.is_startable(), "{stopped:?}");
    podman.start(&name.0).await.unwrap();
    let again = podman.inspect_container(&name.0).await.unwrap().unwrap();
    // A health check tells a restart by its start time (the id stays).
    assert!(!state.started_at.is_empty() && again.started_at != state.started_at, "{state:?} {again:?}");
    assert_eq!(again.restart_count, 0, "started by hand, not by its restart policy");
    assert_eq!((again.id, again.status), (id, ContainerStatus::Running));

    podman.remove(&name.0).await.unwrap();
    assert_eq!(podman.inspect_container(&name.0).await.unwrap(), None);
    podman.remove(&name.0).await.unwrap();
    podman.stop(&name.0, Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn podman_refusals_carry_podmans_own_message() {
    let Some(podman) = real_podman() else { return };
    let name = Name::new("refused");
    let mut missing = spec(&name.0, &[]);
    missing.image = "localhost/harmony-no-such-image:x".to_owned();
    let err = podman.create_and_start(&missing).await.unwrap_err();
    assert!(matches!(&err, ContainerError::CommandFailed { code: Some(125), .. }), "{err:?}");
    assert!(err.to_string().contains("image not known"), "{err}");
    assert_eq!(crate::InterpretError::from(err).kind(), crate::InterpretErrorKind::Failed);
    let err = podman.start(&name.0).await.unwrap_err();
    assert!(err.to_string().contains("no such container"), "{err}");
}

#[tokio::test]
async fn a_missing_binary_is_unavailable() {
    let podman = Podman::new("/nonexistent/podman");
    let err = podman.inspect_container("x").await.unwrap_err();
    assert!(matches!(err, ContainerError::RuntimeUnavailable { .. }), "{err:?}");
    assert_eq!(crate::InterpretError::from(err).kind(), crate::InterpretErrorKind::Unavailable);
}

/// A stand-in `podman`: a shell script with the given body.
fn fake_podman(dir: &Path, body: &str) -> Podman {
    let path = dir.join("podman");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    Podman::new(path)
}

#[tokio::test]
async fn a_hung_podman_is_killed_at_its_time_limit() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let podman = fake_podman(dir.path(), &format!("echo $$ > {}\nexec sleep 60", pid_file.display()))
        .call_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = podman.start("x").await.unwrap_err();
    assert!(matches!(err, ContainerError::TimedOut { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(crate::InterpretError::from(err).kind(), crate::InterpretErrorKind::Timeout);
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let proc = Path::new("/proc").join(pid.trim());
    let deadline = Instant::now() + Duration::from_secs(10);
    // Killed, then reaped by tokio: its /proc entry goes.
    while proc.exists() && !std::fs::read_to_string(proc.join("stat")).unwrap_or_default().contains(") Z") {
        assert!(Instant::now() < deadline, "the timed-out podman still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn output_is_read_bounded_and_errors_keep_only_podmans_error_lines() {
    let dir = tempfile::tempdir().unwrap();
    // 16 MiB of JSON-looking output: more than an inspect may return.
    let podman = fake_podman(dir.path(), "head -c 16777216 /dev/zero | tr '\\0' '['\nexit 0");
    let err = podman.inspect_container("x").await.unwrap_err();
    assert!(matches!(err, ContainerError::BadOutput { .. }), "{err:?}");
    assert!(err.to_string().len() < 2048);
    let podman = fake_podman(
        dir.path(),
        "echo 'time=\"x\" level=warning msg=\"noise\"' >&2\necho 'Error: the real \u{1b}[31mreason' >&2\nexit 125",
    );
    let err = podman.start("x").await.unwrap_err();
    assert_eq!(err.to_string(), "start x failed: the real \\u{1b}[31mreason");
    let podman = fake_podman(dir.path(), "exit 3");
    assert!(podman.start("x").await.unwrap_err().to_string().contains("no message"));
}

#[test]
fn create_arguments_are_a_vector_with_the_command_after_the_image() {
    let mut s = spec("web", &["/bin/httpd", "-f", "-p", "8080", "$(reboot)"]);
    s.ports = vec!["127.0.0.1:18080:8080".parse().unwrap(), "53/udp".parse().unwrap()];
    s.volumes = vec![BindMount { source: "/srv/data".into(), target: "/data".into(), read_only: true }];
    s.cpus = Some(0.5);
    s.network = NetworkMode::Host;
    s.privileged = true;
    s.restart = RestartPolicy::OnFailure;
    let args: Vec<String> =
        create_args(&s, Some(Path::new("/tmp/env"))).into_iter().map(|a| a.into_string().unwrap()).collect();
    assert_eq!(
        args.join(" "),
        "create --name web --pull never --stop-timeout 1 --restart on-failure --label test.label=yes \
         --env-file /tmp/env --publish 127.0.0.1:18080:8080/tcp --publish 53/udp --volume /srv/data:/data:ro,nosuid,nodev \
         --cpus 0.5 --network host --privileged -- localhost/harmony-busybox:test /bin/httpd -f -p 8080 $(reboot)"
    );
    // Unprivileged: no privilege gained through setuid; a writable volume
    // is nosuid and nodev too.
    s.privileged = false;
    s.network = NetworkMode::Default;
    s.volumes[0].read_only = false;
    let args: Vec<String> = create_args(&s, None).into_iter().map(|a| a.into_string().unwrap()).collect();
    let line = args.join(" ");
    assert!(line.contains("--volume /srv/data:/data:nosuid,nodev "), "{line}");
    assert!(line.contains("--security-opt no-new-privileges "), "{line}");
}

#[tokio::test]
async fn volume_sources_resolve_beneath_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("srv/data")).unwrap();
    std::fs::write(root.join("srv/app.conf"), "x").unwrap();
    std::os::unix::fs::symlink("srv", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
    std::os::unix::fs::symlink("../../..", root.join("srv/up")).unwrap();
    std::fs::create_dir(root.join("a:b")).unwrap();
    let host = |p: &str| root.join(p).to_str().unwrap().to_owned();
    for topo in [LocalDeviceTopology::new(root), LocalDeviceTopology::new(root).walking_beneath()] {
        assert_eq!(topo.volume_source("/srv/data").await.unwrap(), host("srv/data"));
        assert_eq!(topo.volume_source("/srv//data/").await.unwrap(), host("srv/data"));
        assert_eq!(topo.volume_source("/link/data").await.unwrap(), host("srv/data"));
        assert_eq!(topo.volume_source("/link/app.conf").await.unwrap(), host("srv/app.conf"));
        assert_eq!(topo.volume_source("/srv/app.conf").await.unwrap(), host("srv/app.conf"));
        for (path, refused) in [
            // The last component is never followed, even beneath the root.
            ("/link", true),
            ("/abs", true),
            ("/abs/passwd", true),
            ("/srv/up", true),
            ("/srv/up/etc", true),
            ("/srv/../etc", true),
            ("/a:b", true),
            ("relative", true),
            ("/missing", false),
            ("/srv/missing/x", false),
            ("/srv/app.conf/x", false),
        ] {
            match topo.volume_source(path).await {
                Err(ContainerError::InvalidVolume { refused: r, .. }) => assert_eq!(r, refused, "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn an_archive_is_loaded_under_the_names_it_holds() {
    let Some(podman) = real_podman() else { return };
    let dir = tempfile::tempdir().unwrap();
    // A tag of this test alone: removing it leaves the shared test image.
    let tag = format!("localhost/harmony-busybox:load-{}", std::process::id());
    let archive = dir.path().join("image.tar");
    let run =
        |args: &[&str]| assert!(Command::new("podman").args(args).status().unwrap().success(), "{args:?}");
    run(&["tag", IMAGE, &tag]);
    run(&["save", "--quiet", "--output", archive.to_str().unwrap(), &tag]);
    run(&["rmi", &tag]);
    assert!(!podman.image_present(&tag).await.unwrap());
    assert_eq!(podman.load_image(&archive).await.unwrap(), std::slice::from_ref(&tag));
    assert!(podman.image_present(&tag).await.unwrap());
    run(&["rmi", &tag]);
    std::fs::write(&archive, "not an archive").unwrap();
    let err = podman.load_image(&archive).await.unwrap_err();
    assert!(matches!(err, ContainerError::CommandFailed { .. }), "{err:?}");
    assert_eq!(loaded_images("Loaded image(s): a:1,b:2\nnoise\n"), ["a:1", "b:2"]);
}

// conmon logs a line in parts when its 8 KiB read ends inside it; podman
// 4.3 prints such lines joined and split (podman#19545). The log file is
// read directly: every line whole, in order.
#[tokio::test]
async fn lines_a_fast_writer_had_logged_in_parts_come_back_whole() {
    let Some(podman) = real_podman() else { return };
    let name = Name::new("fastlogs");
    let script = "i=0; while [ $i -lt 3000 ]; do printf 'line %04d %0100d\\n' $i 0; i=$((i+1)); done; echo done; sleep 600";
    podman.create_and_start(&spec(&name.0, &["/bin/sh", "-c", script])).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let logs = loop {
        let logs = podman.logs(&name.0, 5000, 1 << 20).await.unwrap();
        if logs.lines.last().map(String::as_str) == Some("done") {
            break logs;
        }
        assert!(Instant::now() < deadline, "{:?}", logs.lines.last());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let want: Vec<String> =
        (0..3000).map(|i| format!("line {i:04} {:0100}", 0)).chain(["done".into()]).collect();
    assert!(
        logs.lines == want && !logs.truncated,
        "{} lines, first differing: {:?}",
        logs.lines.len(),
        logs.lines.iter().zip(&want).find(|(a, b)| a != b)
    );
    let tail = podman.logs(&name.0, 2, 1 << 20).await.unwrap();
    assert_eq!(tail.lines, want[2999..]);
}

#[tokio::test]
async fn logs_are_the_last_lines_of_stdout_and_stderr_in_order_and_bounded() {
    let Some(podman) = real_podman() else { return };
    let name = Name::new("logs");
    let script = "for i in 1 2 3 4 5; do echo out $i; echo err $i >&2; done; sleep 600";
    podman.create_and_start(&spec(&name.0, &["/bin/sh", "-c", script])).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let logs = loop {
        let logs = podman.logs(&name.0, 10, 64 * 1024).await.unwrap();
        if logs.lines.len() == 10 {
            break logs;
        }
        assert!(Instant::now() < deadline, "{logs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Both streams, in the order podman's log file keeps them (conmon
    // reads the two pipes separately: not strictly as written).
    let mut sorted = logs.lines.clone();
    sorted.sort();
    let expected: Vec<String> =
        ["err", "out"].iter().flat_map(|s| (1..=5).map(move |i| format!("{s} {i}"))).collect();
    assert_eq!(sorted, expected);
    assert!(!logs.truncated);
    let tail = podman.logs(&name.0, 3, 64 * 1024).await.unwrap();
    assert_eq!(tail.lines, logs.lines[7..]);
    let bounded = podman.logs(&name.0, 10, 12).await.unwrap();
    assert!(bounded.truncated && (1..=2).contains(&bounded.lines.len()), "{bounded:?}");
    assert_eq!(bounded.lines, logs.lines[10 - bounded.lines.len()..]);
    let err = podman.logs("harmony-no-such-container", 10, 1024).await.unwrap_err();
    assert!(
        err.to_string().contains("no such container") || err.to_string().contains("no container"),
        "{err}"
    );
}

#[test]
fn a_tail_keeps_the_newest_bytes() {
    let text: Vec<u8> = (0..100_000u32).flat_map(|i| format!("{i}\n").into_bytes()).collect();
    let (kept, cut) = read_tail(&text[..], 1000).unwrap();
    assert!(cut && kept.len() >= 1000 && kept.len() < 3000 + 8192);
    assert!(text.ends_with(&kept));
    let (kept, cut) = read_tail(&b"short"[..], 1000).unwrap();
    assert_eq!((kept.as_slice(), cut), (&b"short"[..], false));
}
