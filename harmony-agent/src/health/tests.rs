//! Verification against real loopback servers, a real temp root and the run's signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use harmony_score_wire::{HealthPlan, SourcedCheck};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

fn plan(checks: Vec<Check>, timeout_s: u64) -> HealthPlan {
    let checks = checks.into_iter().map(|check| SourcedCheck { check, source: "document".into() }).collect();
    HealthPlan::validate(checks, Some(timeout_s)).expect("valid plan")
}

/// A loopback HTTP server answering every request with `status_line`;
/// `None`: it accepts and never answers.
async fn server(status_line: Option<&'static str>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            match status_line {
                Some(line) => {
                    let reply = format!("{line}\r\nContent-Length: 2\r\n\r\nok");
                    let _ = stream.write_all(reply.as_bytes()).await;
                }
                None => held.push(stream),
            }
        }
    });
    port
}

/// A loopback port nothing listens on.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

fn http(port: u16, status: u16) -> Check {
    Check::Http { url: format!("http://127.0.0.1:{port}/health"), status }
}

fn topology() -> (tempfile::TempDir, LocalDeviceTopology) {
    let dir = tempfile::tempdir().unwrap();
    let topology = LocalDeviceTopology::new(dir.path());
    (dir, topology)
}

const HELLO_SHA: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

#[tokio::test]
async fn checks_that_hold_commit_in_the_first_round() {
    let (dir, topology) = topology();
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    std::fs::write(dir.path().join("etc/app.conf"), "hello").unwrap();
    let port = server(Some("HTTP/1.1 200 OK")).await;
    let checks = vec![
        Check::Tcp { address: format!("127.0.0.1:{port}") },
        http(port, 200),
        Check::FileSha256 { path: "/etc//app.conf".into(), sha256: HELLO_SHA.into() },
        // No systemd manages a temp root: blocked, which does not fail.
        Check::UnitActive { unit: "app.service".into() },
    ];
    let started = Instant::now();
    let result = verify(&topology, &plan(checks, 10), &RunSignal::new(), |_| {}).await;
    assert!(result.held(), "{result:#?}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    let states: Vec<CheckState> = result.checks.iter().map(|c| c.state).collect();
    assert_eq!(states, [CheckState::Held, CheckState::Held, CheckState::Held, CheckState::Blocked]);
    assert_eq!(result.checks[1].output, "HTTP/1.1 200 OK");
    assert!(result.checks[3].output.contains("no systemd"), "{}", result.checks[3].output);
}

#[tokio::test]
async fn a_wrong_status_a_closed_port_and_a_wrong_digest_fail_at_the_deadline_saying_what_they_saw() {
    let (dir, topology) = topology();
    std::fs::write(dir.path().join("app.conf"), "other").unwrap();
    let not_found = server(Some("HTTP/1.0 404 Not Found")).await;
    let closed = closed_port().await;
    let checks = vec![
        http(not_found, 200),
        Check::Tcp { address: format!("127.0.0.1:{closed}") },
        Check::FileSha256 { path: "/app.conf".into(), sha256: HELLO_SHA.into() },
        Check::FileSha256 { path: "/missing".into(), sha256: HELLO_SHA.into() },
    ];
    let started = Instant::now();
    let mut rounds = 0;
    let result = verify(&topology, &plan(checks, 2), &RunSignal::new(), |_| rounds += 1).await;
    let took = started.elapsed();
    assert!(!result.held());
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(4), "{took:?}");
    assert!(result.checks.iter().all(|c| c.state == CheckState::Failed), "{result:#?}");
    let output = |i: usize| result.checks[i].output.clone();
    assert_eq!(output(0), "HTTP/1.0 404 Not Found (expected 200)");
    assert!(output(1).contains(&format!("connect 127.0.0.1:{closed}")), "{}", output(1));
    assert!(output(2).contains("sha256 is ") && !output(2).contains(HELLO_SHA), "{}", output(2));
    assert_eq!(output(3), "/missing does not exist");
    assert_eq!(
        result.first_failed().unwrap().check,
        format!("http http://127.0.0.1:{not_found}/health -> 200")
    );
    assert_eq!(rounds, 1, "no state changed before the end: one progress report, at the end");
}

#[tokio::test]
async fn a_check_that_comes_true_before_the_deadline_holds() {
    let (dir, topology) = topology();
    let path = dir.path().join("late");
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        std::fs::write(path, "hello").unwrap();
    });
    let checks = vec![Check::FileSha256 { path: "/late".into(), sha256: HELLO_SHA.into() }];
    let mut seen = Vec::new();
    let result = verify(&topology, &plan(checks, 20), &RunSignal::new(), |c| seen.push(c[0].state)).await;
    writer.await.unwrap();
    assert!(result.held(), "{result:#?}");
    assert_eq!(seen.last(), Some(&CheckState::Held));
}

// Attack: a check path through a symlink that leaves the root reads nothing
// outside it (the topology resolves beneath its root), and a link at the
// last component is never followed.
#[tokio::test]
async fn a_file_check_never_reads_outside_the_root() {
    let (dir, topology) = topology();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "hello").unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
    let checks = vec![
        Check::FileSha256 { path: "/out/secret".into(), sha256: HELLO_SHA.into() },
        Check::FileSha256 { path: "/link".into(), sha256: HELLO_SHA.into() },
    ];
    let result = verify(&topology, &plan(checks, 1), &RunSignal::new(), |_| {}).await;
    assert!(!result.held());
    assert!(result.checks[0].output.contains("escapes the device root"), "{}", result.checks[0].output);
    assert!(result.checks[1].output.contains("not a regular file"), "{}", result.checks[1].output);
}

// A server that accepts and never answers cannot hold a verification past
// its deadline: every attempt is bounded.
#[tokio::test]
async fn a_server_that_never_answers_is_bounded_by_the_deadline() {
    let (_dir, topology) = topology();
    let silent = server(None).await;
    let started = Instant::now();
    let result = verify(&topology, &plan(vec![http(silent, 200)], 2), &RunSignal::new(), |_| {}).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2) + MIN_ATTEMPT + Duration::from_millis(500), "{took:?}");
    assert_eq!(result.checks[0].state, CheckState::Failed);
    assert!(result.checks[0].output.contains("no answer within"), "{}", result.checks[0].output);
}

#[tokio::test]
async fn the_runs_signal_stops_a_verification_at_once() {
    let (_dir, topology) = topology();
    let silent = server(None).await;
    let signal = RunSignal::new();
    let stopped = Arc::new(AtomicBool::new(false));
    let (raise, flag) = (signal.clone(), stopped.clone());
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        flag.store(true, Ordering::SeqCst);
        raise.cancel();
    });
    let started = Instant::now();
    let result = verify(&topology, &plan(vec![http(silent, 200)], 60), &signal, |_| {}).await;
    assert!(stopped.load(Ordering::SeqCst));
    assert!(result.cancelled && !result.held());
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}
