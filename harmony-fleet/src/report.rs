//! Turning device statuses into the lines and tables people read.
//!
//! Every string here was written by a device, and a device's status is not
//! trusted to be short or printable: each is bounded and its control
//! characters escaped before it reaches a terminal.

use harmony_score_wire::{bounded_text, AgentStatus, DeploymentStatus, ScoreStatus};
use harmony_topology::InterpretStatus;

/// Longest device-written text printed in a table cell.
const MAX_CELL_BYTES: usize = 64;
/// Longest device-written message printed on a line of its own.
const MAX_LINE_BYTES: usize = harmony_score_wire::MAX_MESSAGE_BYTES;

/// A heartbeat older than this is stale when the agent did not say how often it beats.
pub const DEFAULT_STALE_AFTER_MS: u64 = 90_000;

/// An age in the largest whole unit: `3s`, `5m`, `2h`, `4d`.
pub fn format_age(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// Counts of Score statuses: `2 SUCCESS, 1 NOOP`; `-` when there are none.
pub fn scores_summary(scores: &[ScoreStatus]) -> String {
    use InterpretStatus::*;
    let parts: Vec<String> = [SUCCESS, NOOP, FAILURE, RUNNING, QUEUED, BLOCKED]
        .into_iter()
        .filter_map(|status| {
            let count = scores.iter().filter(|s| s.status == status).count();
            (count > 0).then(|| format!("{count} {status}"))
        })
        .collect();
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

/// One line per Score: `file [/etc/motd]: SUCCESS /etc/motd created`; a
/// Score that failed with a typed error shows its kind:
/// `file [/etc/motd]: FAILURE (io) permission denied`.
pub fn score_lines(status: &DeploymentStatus) -> Vec<String> {
    status
        .scores
        .iter()
        .map(|s| {
            let kind = s.error_kind.map(|k| format!(" ({})", k.as_str())).unwrap_or_default();
            format!(
                "{}: {}{kind} {}",
                bounded_text(&s.name, MAX_LINE_BYTES),
                s.status,
                bounded_text(&s.message, MAX_LINE_BYTES)
            )
        })
        .collect()
}

/// One line per health check: `check http http://127.0.0.1:8080/ -> 200
/// (document): failed connect 127.0.0.1:8080: Connection refused`.
pub fn check_lines(status: &DeploymentStatus) -> Vec<String> {
    status
        .health
        .iter()
        .map(|c| {
            let state = c.state.as_str();
            format!(
                "check {} ({}): {state} {}",
                bounded_text(&c.check, MAX_LINE_BYTES),
                bounded_text(&c.source, MAX_LINE_BYTES),
                bounded_text(&c.output, MAX_LINE_BYTES)
            )
        })
        .collect()
}

/// The phase as the table shows it; a refused or failed document adds its
/// error kind (its stable wire name, `resource_conflict`).
pub fn phase_label(status: &DeploymentStatus) -> String {
    let phase = status.phase.as_str();
    match &status.error {
        Some(err) => format!("{phase} ({})", err.kind.as_str()),
        None => phase.to_owned(),
    }
}

/// Whether the device's last heartbeat is older than three of its intervals
/// (or [`DEFAULT_STALE_AFTER_MS`] when it did not say).
pub fn is_stale(status: &AgentStatus, now_ms: u64) -> bool {
    // The interval is device-written: saturate rather than overflow.
    let stale_after = if status.heartbeat_interval_ms > 0 {
        status.heartbeat_interval_ms.saturating_mul(3)
    } else {
        DEFAULT_STALE_AFTER_MS
    };
    now_ms.saturating_sub(last_seen_ms(status)) > stale_after
}

/// The age of the device's last sign of life, or `never`.
pub fn heartbeat_age(status: &AgentStatus, now_ms: u64) -> String {
    match last_seen_ms(status) {
        0 => "never".to_owned(),
        at => format_age(now_ms.saturating_sub(at)),
    }
}

fn last_seen_ms(status: &AgentStatus) -> u64 {
    status.heartbeat_at_ms.max(status.updated_at_ms)
}

/// The `status` table: one row per device and deployment (a device without
/// deployments gets one row), a STALE marker on devices whose heartbeat is old.
pub fn status_table(statuses: &[AgentStatus], now_ms: u64) -> String {
    let mut rows =
        vec![row(["DEVICE", "DEPLOYMENT", "DESIRED", "OBSERVED", "PHASE", "SCORES", "HEARTBEAT", ""])];
    for status in statuses {
        let device = status.device_id.to_string();
        let heartbeat = heartbeat_age(status, now_ms);
        let stale = if is_stale(status, now_ms) { "STALE" } else { "" };
        if status.deployments.is_empty() {
            rows.push(row([&device, "-", "-", "-", "-", "-", &heartbeat, stale]));
        }
        for (name, ds) in &status.deployments {
            rows.push(row([
                &device,
                name.as_str(),
                &ds.desired_generation.to_string(),
                &ds.observed_generation.to_string(),
                &phase_label(ds),
                &scores_summary(&ds.scores),
                &heartbeat,
                stale,
            ]));
        }
    }
    render(&rows)
}

/// The `devices` table: agent version, host, architecture, heartbeat, labels.
pub fn devices_table(statuses: &[AgentStatus], now_ms: u64) -> String {
    let mut rows = vec![row(["DEVICE", "AGENT", "HOSTNAME", "ARCH", "HEARTBEAT", "LABELS"])];
    for status in statuses {
        let info = status.info.clone().unwrap_or_default();
        let labels: Vec<String> = info.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let cell = |text: &str| bounded_text(text, MAX_CELL_BYTES);
        let mut heartbeat = heartbeat_age(status, now_ms);
        if is_stale(status, now_ms) {
            heartbeat.push_str(" (stale)");
        }
        rows.push(row([
            status.device_id.as_str(),
            &cell(&status.agent_version),
            or_dash(&cell(&info.hostname)),
            or_dash(&cell(&info.arch)),
            &heartbeat,
            or_dash(&bounded_text(&labels.join(","), MAX_LINE_BYTES)),
        ]));
    }
    render(&rows)
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() {
        "-"
    } else {
        text
    }
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// Left-aligned columns two spaces apart, trailing blanks trimmed (the
/// first row is the header).
pub fn render(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use harmony_score_wire::{
        CheckState, CheckStatus, DeploymentName, DeviceId, DeviceInfo, Phase, StatusError,
    };

    use super::*;

    fn score(status: InterpretStatus) -> ScoreStatus {
        ScoreStatus {
            tag: "harmony.file/v1".into(),
            name: "file [/etc/motd]".into(),
            resource: "file:/etc/motd".into(),
            status,
            message: "done".into(),
            details: Vec::new(),
            error_kind: None,
        }
    }

    fn agent(
        heartbeat_at_ms: u64,
        interval_ms: u64,
        deployments: Vec<(&str, DeploymentStatus)>,
    ) -> AgentStatus {
        AgentStatus {
            device_id: DeviceId::new("dev-1").unwrap(),
            agent_version: "0.1.0".into(),
            updated_at_ms: 0,
            heartbeat_at_ms,
            heartbeat_interval_ms: interval_ms,
            info: None,
            deployments: deployments.into_iter().map(|(n, d)| (DeploymentName::new(n).unwrap(), d)).collect(),
            instance_id: String::new(),
            errors: Vec::new(),
            keyset_version: None,
            truncated: false,
        }
    }

    fn deployment(phase: Phase, scores: Vec<ScoreStatus>, error: Option<StatusError>) -> DeploymentStatus {
        DeploymentStatus {
            desired_generation: 2,
            observed_generation: 1,
            phase,
            scores,
            error,
            last_attempt_at_ms: 0,
            last_applied_at_ms: 0,
            ..Default::default()
        }
    }

    #[test]
    fn ages_use_the_largest_whole_unit() {
        assert_eq!(format_age(3_400), "3s");
        assert_eq!(format_age(59_999), "59s");
        assert_eq!(format_age(60_000), "1m");
        assert_eq!(format_age(7_200_000), "2h");
        assert_eq!(format_age(3 * 86_400_000), "3d");
    }

    #[test]
    fn score_summaries_count_by_status() {
        use InterpretStatus::*;
        assert_eq!(scores_summary(&[score(NOOP), score(SUCCESS), score(SUCCESS)]), "2 SUCCESS, 1 NOOP");
        assert_eq!(scores_summary(&[score(FAILURE)]), "1 FAILURE");
        assert_eq!(scores_summary(&[]), "-");
    }

    #[test]
    fn staleness_follows_the_agents_interval_or_90_seconds() {
        let now = 1_000_000;
        assert!(!is_stale(&agent(now - 25_000, 10_000, vec![]), now));
        assert!(is_stale(&agent(now - 31_000, 10_000, vec![]), now));
        assert!(!is_stale(&agent(now - 80_000, 0, vec![]), now));
        assert!(is_stale(&agent(now - 91_000, 0, vec![]), now));
        assert!(is_stale(&agent(0, 0, vec![]), now));
    }

    #[test]
    fn the_status_table_shows_phases_errors_scores_and_staleness() {
        let now = 1_000_000;
        let rejected = deployment(
            Phase::Rejected,
            vec![],
            Some(StatusError::new(harmony_score_wire::ErrorKind::UnknownScoreTags, "x")),
        );
        let applied = deployment(Phase::Applied, vec![score(InterpretStatus::SUCCESS)], None);
        let table =
            status_table(&[agent(now - 3_000, 10_000, vec![("web", applied), ("bad", rejected)])], now);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "DEVICE  DEPLOYMENT  DESIRED  OBSERVED  PHASE                          SCORES     HEARTBEAT"
        );
        assert_eq!(
            lines[1],
            "dev-1   bad         2        1         rejected (unknown_score_tags)  -          3s"
        );
        assert_eq!(
            lines[2],
            "dev-1   web         2        1         applied                        1 SUCCESS  3s"
        );

        let stale = status_table(&[agent(now - 200_000, 0, vec![])], now);
        assert!(stale.lines().nth(1).unwrap().ends_with("3m         STALE"), "{stale}");
    }

    #[test]
    fn a_huge_heartbeat_interval_saturates_instead_of_overflowing() {
        let now = 1_000_000;
        assert!(!is_stale(&agent(now - 1_000, u64::MAX, vec![]), now));
        assert!(!is_stale(&agent(0, u64::MAX, vec![]), now));
    }

    #[test]
    fn score_lines_name_the_error_kind_and_escape_device_text() {
        let mut failed = score(InterpretStatus::FAILURE);
        failed.error_kind = Some(harmony_topology::InterpretErrorKind::Timeout);
        failed.message = "took too long\n\u{1b}[2J".into();
        let mut long = score(InterpretStatus::SUCCESS);
        long.message = "x".repeat(10_000);
        let lines = score_lines(&deployment(Phase::Failed, vec![failed, long], None));
        assert_eq!(lines[0], "file [/etc/motd]: FAILURE (timeout) took too long\\n\\u{1b}[2J");
        assert!(lines[1].len() <= 600 && lines[1].ends_with('…'), "{}", lines[1].len());
    }

    #[test]
    fn phase_labels_carry_the_error_kinds_wire_name() {
        use harmony_score_wire::ErrorKind;
        for (kind, label) in [
            (ErrorKind::ResourceConflict, "rejected (resource_conflict)"),
            (ErrorKind::InvalidScore, "rejected (invalid_score)"),
            (ErrorKind::Unknown, "rejected (unknown)"),
        ] {
            let status = deployment(Phase::Rejected, vec![], Some(StatusError::new(kind, "m")));
            assert_eq!(phase_label(&status), label);
        }
        let failed = deployment(Phase::Failed, vec![], Some(StatusError::new(ErrorKind::ScoresFailed, "m")));
        assert_eq!(phase_label(&failed), "failed (scores_failed)");
        let rolled =
            deployment(Phase::RolledBack, vec![], Some(StatusError::new(ErrorKind::HealthCheckFailed, "m")));
        assert_eq!(phase_label(&rolled), "rolled_back (health_check_failed)");
        assert_eq!(phase_label(&deployment(Phase::Verifying, vec![], None)), "verifying");
    }

    // Check lines echo what a device wrote: escaped and bounded like Score lines.
    #[test]
    fn check_lines_name_the_check_its_source_state_and_output() {
        let mut status = deployment(Phase::RolledBack, vec![], None);
        status.health = vec![CheckStatus {
            check: "http http://127.0.0.1:1/ -> 200".into(),
            source: "document".into(),
            state: CheckState::Failed,
            output: "connect 127.0.0.1:1: refused\n\u{1b}[2J".into(),
        }];
        let lines = check_lines(&status);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("check http http://127.0.0.1:1/ -> 200 (document): failed connect"),
            "{}",
            lines[0]
        );
        assert!(!lines[0].chars().any(char::is_control), "{:?}", lines[0]);
    }

    #[test]
    fn the_devices_table_lists_info_and_labels() {
        let mut status = agent(990_000, 10_000, vec![]);
        status.info = Some(DeviceInfo {
            hostname: "edge-1".into(),
            arch: "aarch64".into(),
            labels: BTreeMap::from([("site".into(), "a".into()), ("env".into(), "prod".into())]),
            ..Default::default()
        });
        let table = devices_table(&[status], 1_000_000);
        assert_eq!(
            table.lines().nth(1),
            Some("dev-1   0.1.0  edge-1    aarch64  10s        env=prod,site=a")
        );
    }
}
