//! Health checks: typed probes a device runs after applying a generation, before it commits to it.
//!
//! A check is data, like a Score: it names what to look at (a loopback
//! port, a file's digest, a container, a unit), never a command line. A
//! document carries its own checks (`health`, with `health_timeout_s`
//! beside `scores`), and a Score may contribute checks of its own through
//! the [`HealthCheck`] companion (a container Score contributes
//! `container_running`). Every check comes from outside the device, so it
//! is validated at decode: only loopback for `tcp` and `http` (a document
//! must not make devices probe the network), paths as Score paths, sizes
//! and durations bounded.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::validate::{check_container_name, check_path, check_sha256_hex};
use crate::ScoreValidationError;

/// Seconds a document's checks get to hold when it sets checks but no `health_timeout_s`.
pub const DEFAULT_HEALTH_TIMEOUT_S: u64 = 30;
/// Longest `health_timeout_s` (and `stable_s`): an hour. Longer is a typo,
/// and a bound keeps deadline arithmetic far from overflow.
pub const MAX_HEALTH_TIMEOUT_S: u64 = 3600;
/// Most checks one document runs, its own and its Scores' together.
pub const MAX_HEALTH_CHECKS: usize = 256;
/// Longest `http` URL.
pub const MAX_URL_BYTES: usize = 2048;
/// The seconds a container Score's own `container_running` check wants it up.
pub const CONTAINER_STABLE_S: u64 = 5;

/// One health check, serialized with a `type` tag:
/// `{"type": "tcp", "address": "127.0.0.1:8080"}`.
///
/// Unknown types are refused at decode (the whole document is), never
/// skipped: a check the device cannot run must not let it commit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Check {
    /// A TCP connection to `address` (`127.0.0.1:8080`, `[::1]:8080`,
    /// `localhost:8080`) is accepted. Loopback only.
    Tcp {
        /// Loopback address and port.
        address: String,
    },
    /// An HTTP/1.0 GET of `url` answers with `status`. Plain `http://` on
    /// loopback only; the body is not read.
    Http {
        /// `http://127.0.0.1:8080/path` (or `localhost`, `[::1]`).
        url: String,
        /// The status expected (default 200).
        #[serde(default = "default_http_status")]
        status: u16,
    },
    /// The regular file at `path` (beneath the device's root, like every
    /// Score path) has this sha256 (64 lowercase hex digits).
    FileSha256 {
        /// Absolute path on the device.
        path: String,
        /// The expected digest, as `sha256sum` prints it.
        sha256: String,
    },
    /// The container `name` runs, and has run without a restart for at
    /// least `stable_s` seconds of the verification.
    ContainerRunning {
        /// The container's name.
        name: String,
        /// Seconds it must be seen running unchanged (default 0: running now).
        #[serde(default)]
        stable_s: u64,
    },
    /// The systemd unit is `active`. Where no systemd runs (a root that is
    /// not the host's), the check is `blocked` and does not fail.
    UnitActive {
        /// The unit's name with its type (`app.service`).
        unit: String,
    },
}

fn default_http_status() -> u16 {
    200
}

/// Where a [`Check`] of a document came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcedCheck {
    /// The check.
    pub check: Check,
    /// `document`, or the name of the Score that contributed it (`container [web]`).
    pub source: String,
}

/// The companion trait of a Score that knows how to tell its own work is
/// healthy (Harmony attaches new abilities as companions rather than by
/// widening `Score`). A Score opts in by returning itself from
/// [`DeviceScore::health`](crate::DeviceScore::health):
///
/// ```ignore
/// impl HealthCheck for PodmanContainerScore {
///     fn health_checks(&self) -> Vec<Check> { vec![Check::ContainerRunning { … }] }
/// }
/// // inside device_score! { … impl DeviceScore for PodmanContainerScore {
///     fn health(&self) -> Option<&dyn HealthCheck> { Some(self) }
/// // } }
/// ```
///
/// Its checks run only for documents that ask for verification (a
/// `health` list or a `health_timeout_s`); they are validated at decode
/// like the document's own.
pub trait HealthCheck {
    /// The checks that must hold once this Score is applied.
    fn health_checks(&self) -> Vec<Check>;
}

impl Check {
    /// The check's `type` as written on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Check::Tcp { .. } => "tcp",
            Check::Http { .. } => "http",
            Check::FileSha256 { .. } => "file_sha256",
            Check::ContainerRunning { .. } => "container_running",
            Check::UnitActive { .. } => "unit_active",
        }
    }

    /// Checks every field; the error names it (`address`, `url`, `sha256`).
    pub fn validate(&self) -> Result<(), ScoreValidationError> {
        match self {
            Check::Tcp { address } => loopback_socket("address", address).map(drop),
            Check::Http { url, status } => {
                if !(100..=599).contains(status) {
                    return Err(ScoreValidationError::new("status", format!("{status} is not 100 to 599")));
                }
                HttpTarget::parse(url).map(drop)
            }
            Check::FileSha256 { path, sha256 } => {
                check_path("path", path)?;
                check_sha256_hex("sha256", sha256)
            }
            Check::ContainerRunning { name, stable_s } => {
                check_container_name("name", name)?;
                if *stable_s >= MAX_HEALTH_TIMEOUT_S {
                    return Err(ScoreValidationError::new(
                        "stable_s",
                        format!("{stable_s} is not below {MAX_HEALTH_TIMEOUT_S}"),
                    ));
                }
                Ok(())
            }
            Check::UnitActive { unit } => harmony_topology::check_unit_name(unit)
                .map_err(|message| ScoreValidationError::new("unit", message)),
        }
    }

    /// The path a check reads on the device (judged by the device's
    /// `allowed_paths` like a Score's), if it reads one.
    pub fn used_path(&self) -> Option<&str> {
        match self {
            Check::FileSha256 { path, .. } => Some(path),
            _ => None,
        }
    }
}

impl fmt::Display for Check {
    /// One line naming the check: `http http://127.0.0.1:8080/ -> 200`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Tcp { address } => write!(f, "tcp {address}"),
            Check::Http { url, status } => write!(f, "http {url} -> {status}"),
            Check::FileSha256 { path, sha256 } => write!(f, "file_sha256 {path} = {sha256}"),
            Check::ContainerRunning { name, stable_s } => {
                write!(f, "container_running {name} (stable {stable_s} s)")
            }
            Check::UnitActive { unit } => write!(f, "unit_active {unit}"),
        }
    }
}

/// `text` as a loopback socket address: an IP literal (or `localhost`,
/// taken as 127.0.0.1 without any name lookup) and a port 1–65535.
pub fn loopback_socket(field: &str, text: &str) -> Result<SocketAddr, ScoreValidationError> {
    let bad =
        |why: &str| ScoreValidationError::new(field, format!("{:?} {why}", crate::bounded_text(text, 128)));
    let parsed = match text.strip_prefix("localhost:") {
        Some(port) => port.parse::<u16>().ok().map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p)),
        None => text.parse::<SocketAddr>().ok(),
    };
    let addr = parsed.ok_or_else(|| bad("is not IP:port ([v6]:port, localhost:port)"))?;
    if addr.port() == 0 {
        return Err(bad("has port 0"));
    }
    // to_canonical: ::ffff:127.0.0.1 is loopback too; 0.0.0.0 is not
    // (Linux would connect it to the host itself, whatever listens there).
    if !addr.ip().to_canonical().is_loopback() {
        return Err(bad("is not a loopback address (127.0.0.0/8, ::1): checks never leave the device"));
    }
    Ok(addr)
}

/// A parsed `http` check URL: where to connect, and what to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// The loopback address and port.
    pub addr: SocketAddr,
    /// The `Host` header value (the URL's authority).
    pub host: String,
    /// The request target: path and query (`/` when the URL has none).
    pub path: String,
}

impl HttpTarget {
    /// Parses `http://HOST[:PORT][/PATH][?QUERY]`, HOST a loopback IP
    /// literal or `localhost`. Refused: other schemes and hosts, user
    /// info, fragments, and any byte that is not printable ASCII (a space
    /// or CR/LF would let a URL write its own request headers).
    pub fn parse(url: &str) -> Result<Self, ScoreValidationError> {
        let bad = |why: &str| {
            ScoreValidationError::new("url", format!("{:?} {why}", crate::bounded_text(url, 128)))
        };
        if url.len() > MAX_URL_BYTES {
            return Err(ScoreValidationError::new("url", format!("is longer than {MAX_URL_BYTES} bytes")));
        }
        if !url.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("holds a space, a control character or non-ASCII (percent-encode it)"));
        }
        let rest = url.strip_prefix("http://").ok_or_else(|| bad("is not an http:// URL"))?;
        if rest.contains('#') {
            return Err(bad("has a fragment"));
        }
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.contains('@') {
            return Err(bad("has user info"));
        }
        let with_port = if authority.ends_with(']') || !authority.contains(':') {
            format!("{authority}:80")
        } else {
            authority.to_owned()
        };
        let addr = loopback_socket("url", &with_port)?;
        let path = match path {
            "" => "/".to_owned(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_owned(),
        };
        Ok(Self { addr, host: authority.to_owned(), path })
    }
}

/// The document's verification settings, validated: every check (its own,
/// then its Scores', in order) and the deadline. Empty when the document
/// does not ask for verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPlan {
    /// The checks, each with where it came from.
    pub checks: Vec<SourcedCheck>,
    /// How long they get to hold.
    pub timeout: Duration,
}

/// Why a document's checks are not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("health check #{index} ({source_name}): {error}")]
pub struct HealthCheckError {
    /// The check's index among all the document's checks (its own first).
    pub index: usize,
    /// `document`, or the Score that contributed it.
    pub source_name: String,
    /// The field and what is wrong.
    pub error: ScoreValidationError,
}

impl HealthPlan {
    /// Checks the whole plan: the count, the deadline (1 to
    /// [`MAX_HEALTH_TIMEOUT_S`]), each check, and that every
    /// `stable_s` leaves room before the deadline.
    pub fn validate(checks: Vec<SourcedCheck>, timeout_s: Option<u64>) -> Result<Self, HealthCheckError> {
        let plan_error = |field: &str, message: String| HealthCheckError {
            index: 0,
            source_name: "document".into(),
            error: ScoreValidationError::new(field, message),
        };
        if checks.len() > MAX_HEALTH_CHECKS {
            return Err(plan_error(
                "health",
                format!("{} checks, more than {MAX_HEALTH_CHECKS}", checks.len()),
            ));
        }
        let timeout_s = timeout_s.unwrap_or(DEFAULT_HEALTH_TIMEOUT_S);
        if !(1..=MAX_HEALTH_TIMEOUT_S).contains(&timeout_s) {
            return Err(plan_error(
                "health_timeout_s",
                format!("{timeout_s} is not 1 to {MAX_HEALTH_TIMEOUT_S}"),
            ));
        }
        for (index, sourced) in checks.iter().enumerate() {
            let failed = |error| HealthCheckError {
                index,
                source_name: crate::bounded_text(&sourced.source, 128),
                error,
            };
            sourced.check.validate().map_err(failed)?;
            if let Check::ContainerRunning { stable_s, .. } = sourced.check {
                if stable_s >= timeout_s {
                    return Err(failed(ScoreValidationError::new(
                        "stable_s",
                        format!("{stable_s} leaves no time before health_timeout_s {timeout_s}"),
                    )));
                }
            }
        }
        Ok(Self { checks, timeout: Duration::from_secs(timeout_s) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sourced(check: Check) -> SourcedCheck {
        SourcedCheck { check, source: "document".into() }
    }

    #[test]
    fn the_issues_json_form_reads_as_written() {
        let json = r#"[{"type": "tcp", "address": "127.0.0.1:8080"},
            {"type": "http", "url": "http://127.0.0.1:8080/", "status": 200},
            {"type": "file_sha256", "path": "/etc/app.conf", "sha256": "0000000000000000000000000000000000000000000000000000000000000000"},
            {"type": "container_running", "name": "web", "stable_s": 5},
            {"type": "unit_active", "unit": "app.service"},
            {"type": "http", "url": "http://localhost:8080/health?x=1"}]"#;
        let checks: Vec<Check> = serde_json::from_str(json).unwrap();
        assert_eq!(checks.len(), 6);
        assert_eq!(checks[5], Check::Http { url: "http://localhost:8080/health?x=1".into(), status: 200 });
        for check in &checks {
            check.validate().unwrap_or_else(|e| panic!("{check}: {e}"));
        }
        let unknown = serde_json::from_str::<Check>(r#"{"type": "exec", "command": "rm -rf /"}"#);
        assert!(unknown.unwrap_err().to_string().contains("unknown variant `exec`"));
    }

    // Attack: a document makes a fleet probe a network it can reach (an
    // internal service, a cloud metadata endpoint), or writes its own
    // request headers through the URL.
    #[test]
    fn only_loopback_is_probed_and_urls_cannot_carry_headers() {
        for ok in ["127.0.0.1:1", "127.9.9.9:65535", "[::1]:80", "localhost:8080", "[::ffff:127.0.0.1]:80"] {
            loopback_socket("address", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "10.0.0.1:80",
            "0.0.0.0:80",
            "[::]:80",
            "169.254.169.254:80",
            "example.com:80",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "localhost:",
            "localhost:x",
            "",
        ] {
            let err = Check::Tcp { address: bad.into() }.validate().unwrap_err();
            assert_eq!(err.field, "address", "{bad}");
        }
        let target = HttpTarget::parse("http://127.0.0.1:8080/a/b?c=d").unwrap();
        assert_eq!((target.addr.port(), target.path.as_str()), (8080, "/a/b?c=d"));
        assert_eq!(target.host, "127.0.0.1:8080");
        assert_eq!(HttpTarget::parse("http://[::1]").unwrap().addr, "[::1]:80".parse().unwrap());
        assert_eq!(HttpTarget::parse("http://localhost?q").unwrap().path, "/?q");
        for bad in [
            "https://127.0.0.1/",
            "http://10.1.2.3/",
            "http://169.254.169.254/latest/meta-data/",
            "http://user@127.0.0.1/",
            "http://127.0.0.1@10.0.0.1/",
            "http://127.0.0.1/ HTTP/1.0\r\nX-Evil: 1",
            "http://127.0.0.1/a\nb",
            "http://127.0.0.1/#frag",
            "http://127.0.0.1:0/",
            "http://[::1/",
            "http:///x",
            "ftp://127.0.0.1/",
            &format!("http://127.0.0.1/{}", "a".repeat(MAX_URL_BYTES)),
        ] {
            let err = Check::Http { url: bad.into(), status: 200 }.validate().unwrap_err();
            assert_eq!(err.field, "url", "{bad:?}");
        }
        let err = Check::Http { url: "http://127.0.0.1/".into(), status: 99 }.validate().unwrap_err();
        assert_eq!(err.field, "status");
    }

    #[test]
    fn paths_digests_names_and_units_are_checked_like_scores() {
        let sha = "ab".repeat(32);
        assert!(Check::FileSha256 { path: "/etc//app.conf".into(), sha256: sha.clone() }.validate().is_ok());
        for (check, field) in [
            (Check::FileSha256 { path: "etc/app".into(), sha256: sha.clone() }, "path"),
            (Check::FileSha256 { path: "/etc/../shadow".into(), sha256: sha.clone() }, "path"),
            (Check::FileSha256 { path: "/".into(), sha256: sha.clone() }, "path"),
            (Check::FileSha256 { path: "/x".into(), sha256: "AB".repeat(32) }, "sha256"),
            (Check::FileSha256 { path: "/x".into(), sha256: "ab".repeat(31) }, "sha256"),
            (Check::FileSha256 { path: "/x".into(), sha256: "zz".repeat(32) }, "sha256"),
            (Check::ContainerRunning { name: "-web".into(), stable_s: 0 }, "name"),
            (Check::ContainerRunning { name: "web".into(), stable_s: u64::MAX }, "stable_s"),
            (Check::UnitActive { unit: "app".into() }, "unit"),
            (Check::UnitActive { unit: "../x.service".into() }, "unit"),
        ] {
            assert_eq!(check.validate().unwrap_err().field, field, "{check:?}");
        }
    }

    #[test]
    fn a_plan_bounds_its_deadline_its_count_and_stable_times() {
        let web = || sourced(Check::ContainerRunning { name: "web".into(), stable_s: 5 });
        let plan = HealthPlan::validate(vec![web()], None).unwrap();
        assert_eq!(plan.timeout, Duration::from_secs(DEFAULT_HEALTH_TIMEOUT_S));
        for timeout in [0, MAX_HEALTH_TIMEOUT_S + 1, u64::MAX] {
            let err = HealthPlan::validate(vec![], Some(timeout)).unwrap_err();
            assert_eq!(err.error.field, "health_timeout_s", "{timeout}");
        }
        let err =
            HealthPlan::validate(vec![sourced(Check::Tcp { address: "127.0.0.1:1".into() }), web()], Some(5))
                .unwrap_err();
        assert_eq!((err.index, err.error.field.as_str()), (1, "stable_s"));
        let many = vec![sourced(Check::Tcp { address: "127.0.0.1:1".into() }); MAX_HEALTH_CHECKS + 1];
        assert_eq!(HealthPlan::validate(many, None).unwrap_err().error.field, "health");
        let mut bad = web();
        bad.source = "container [w\neb]".into();
        bad.check = Check::ContainerRunning { name: "w eb".into(), stable_s: 0 };
        let err = HealthPlan::validate(vec![bad], None).unwrap_err();
        assert!(!err.to_string().contains('\n'), "{err}");
    }
}
