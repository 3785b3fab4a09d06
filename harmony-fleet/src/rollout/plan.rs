//! The pure parts of a staged rollout: waves, the failure threshold, the
//! persisted state, the events and the summary. No I/O here.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use harmony_score_wire::{bounded_text, CheckState, DeploymentName, DeploymentStatus, DeviceId, Phase};
use serde::{Deserialize, Serialize};

use crate::{error_chain, FleetError};

/// The newest format of [`RolloutState`] this crate writes and reads.
pub const ROLLOUT_STATE_FORMAT: u32 = 1;
/// Most bytes of one check's output or message kept per device.
const MAX_DETAIL_BYTES: usize = 256;

/// One wave's size: a number of devices or a share of them. Waves are
/// cumulative: `1,10%,50%,100%` reaches 1 device, then 10% of all of them
/// (the first included), then half, then every one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaveSize {
    /// This many devices in all, so far.
    Devices(u64),
    /// This percentage (1 to 100) of the devices in all, rounded up.
    Percent(u8),
}

impl FromStr for WaveSize {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        match text.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(p @ 1..=100) => Ok(WaveSize::Percent(p)),
                _ => Err(format!("wave {text:?}: a percentage is 1% to 100%")),
            },
            None => match text.parse::<u64>() {
                Ok(n @ 1..) => Ok(WaveSize::Devices(n)),
                _ => Err(format!("wave {text:?}: a number of devices (at least 1) or a percentage")),
            },
        }
    }
}

impl fmt::Display for WaveSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaveSize::Devices(n) => write!(f, "{n}"),
            WaveSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Parses `1,10%,50%,100%`.
pub fn parse_waves(text: &str) -> Result<Vec<WaveSize>, String> {
    let waves: Vec<WaveSize> = text.split(',').map(str::parse).collect::<Result<_, _>>()?;
    if waves.len() > MAX_WAVES {
        return Err(format!("{} waves; at most {MAX_WAVES}", waves.len()));
    }
    Ok(waves)
}

/// Most waves a rollout may have.
pub const MAX_WAVES: usize = 100;

/// The end of each wave in a list of `total` devices: cumulative counts,
/// strictly increasing (a wave that would add no device is dropped), the
/// last one `total`. An empty list of devices, or waves that never reach
/// every device, are refused.
pub fn wave_ends(waves: &[WaveSize], total: usize) -> Result<Vec<usize>, String> {
    if total == 0 {
        return Err("no devices to roll out to".into());
    }
    let mut ends: Vec<usize> = Vec::new();
    for wave in waves {
        let end = match *wave {
            WaveSize::Devices(n) => usize::try_from(n).unwrap_or(usize::MAX).min(total),
            // Rounded up: 10% of 5 devices is 1 device, never 0.
            WaveSize::Percent(p) => (total * usize::from(p)).div_ceil(100),
        };
        if end > ends.last().copied().unwrap_or(0) {
            ends.push(end);
        }
    }
    match ends.last() {
        Some(&last) if last == total => Ok(ends),
        last => Err(format!(
            "the waves reach {} of {total} devices; the last wave must reach every one (100%)",
            last.copied().unwrap_or(0)
        )),
    }
}

/// How many failed devices a rollout tolerates before it stops: a number,
/// or a percentage of the devices updated so far. Judged at the end of
/// every wave, over every device updated so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MaxFailures {
    /// At most this many.
    Devices(u64),
    /// At most this percentage (0 to 100) of the devices updated so far, rounded down.
    Percent(u8),
}

impl Default for MaxFailures {
    /// None: the first failure stops the rollout.
    fn default() -> Self {
        MaxFailures::Devices(0)
    }
}

impl MaxFailures {
    /// Whether `failed` of `updated` devices crosses the threshold.
    pub fn crossed(&self, failed: usize, updated: usize) -> bool {
        let limit = match *self {
            MaxFailures::Devices(n) => usize::try_from(n).unwrap_or(usize::MAX),
            MaxFailures::Percent(p) => updated * usize::from(p) / 100,
        };
        failed > limit
    }
}

impl FromStr for MaxFailures {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        match text.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(p @ 0..=100) => Ok(MaxFailures::Percent(p)),
                _ => Err(format!("--max-failures {text:?}: a percentage is 0% to 100%")),
            },
            None => text
                .parse::<u64>()
                .map(MaxFailures::Devices)
                .map_err(|_| format!("--max-failures {text:?}: a number of devices or a percentage")),
        }
    }
}

impl fmt::Display for MaxFailures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaxFailures::Devices(n) => write!(f, "{n}"),
            MaxFailures::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutPhase {
    /// Waves are being written and awaited.
    Running,
    /// The threshold was crossed; the previous documents are being put back.
    Reverting,
    /// Every wave was written (and, with `wait`, the last one awaited) within the threshold.
    Completed,
    /// The threshold was crossed; no further wave was written.
    Aborted,
    /// Aborted, and the devices updated were given their previous document back.
    Reverted,
}

impl RolloutPhase {
    /// The name printed and stored.
    pub fn as_str(&self) -> &'static str {
        match self {
            RolloutPhase::Running => "running",
            RolloutPhase::Reverting => "reverting",
            RolloutPhase::Completed => "completed",
            RolloutPhase::Aborted => "aborted",
            RolloutPhase::Reverted => "reverted",
        }
    }

    /// Whether an operator process is (or was, until interrupted) working on it.
    pub fn is_active(&self) -> bool {
        matches!(self, RolloutPhase::Running | RolloutPhase::Reverting)
    }
}

/// How one device of a wave ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Written, not awaited (the last wave without `wait`).
    Written,
    /// It reports the generation applied (committed, when it had checks).
    Done,
    /// A health check failed and the device went back to its last good generation.
    RolledBack,
    /// Anything else: not written, failed, rejected, superseded, no answer in time.
    Failed,
}

impl DeviceState {
    /// The name printed and stored.
    pub fn as_str(&self) -> &'static str {
        match self {
            DeviceState::Written => "written",
            DeviceState::Done => "done",
            DeviceState::RolledBack => "rolled_back",
            DeviceState::Failed => "failed",
        }
    }

    /// Whether it counts against the threshold.
    pub fn is_failure(&self) -> bool {
        matches!(self, DeviceState::RolledBack | DeviceState::Failed)
    }
}

/// One device's result in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceResult {
    /// The wave (1-based) it was in.
    pub wave: usize,
    /// How it ended.
    pub state: DeviceState,
    /// The generation written (0: none).
    #[serde(default)]
    pub generation: u64,
    /// The first failed health check, in one line, when one failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// What went wrong (the check's output, or the error), bounded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl DeviceResult {
    /// Judges a device from how its wait ended.
    pub fn from_wait(wave: usize, generation: u64, waited: &Result<DeploymentStatus, FleetError>) -> Self {
        let result = |state, check: Option<String>, detail: &str| DeviceResult {
            wave,
            state,
            generation,
            check: check.map(|c| bounded_text(&c, MAX_DETAIL_BYTES)),
            detail: bounded_text(detail, MAX_DETAIL_BYTES),
        };
        match waited {
            Ok(_) => result(DeviceState::Done, None, ""),
            Err(err) => {
                let status = err.deployment_status();
                let failed_check =
                    status.and_then(|ds| ds.health.iter().find(|c| c.state == CheckState::Failed));
                let state = match status {
                    Some(ds) if ds.phase == Phase::RolledBack => DeviceState::RolledBack,
                    _ => DeviceState::Failed,
                };
                match failed_check {
                    Some(check) => result(state, Some(check.check.clone()), &check.output),
                    None => result(state, None, &error_chain(err)),
                }
            }
        }
    }

    /// A device whose document could not be written.
    pub fn not_written(wave: usize, err: &FleetError) -> Self {
        DeviceResult {
            wave,
            state: DeviceState::Failed,
            generation: 0,
            check: None,
            detail: bounded_text(&format!("not written: {}", error_chain(err)), MAX_DETAIL_BYTES),
        }
    }
}

/// A rollout's state, kept under its deployment's key in the rollouts
/// bucket and written with compare-and-set: the one operator process
/// running it writes it at every step, and another one can take it over
/// (`--resume`) only when it stopped writing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    /// [`ROLLOUT_STATE_FORMAT`].
    pub format: u32,
    /// The deployment rolled out.
    pub deployment: DeploymentName,
    /// Random, per rollout: a resumed rollout keeps it.
    pub id: String,
    /// Who runs it now (`host:pid`), for people reading `rollouts`.
    pub owner: String,
    /// Digest of the rolled-out document as stored beside the state.
    pub document_digest: String,
    /// Every device, in the order the waves take them.
    pub devices: Vec<DeviceId>,
    /// The end of each wave in `devices` (cumulative counts).
    pub wave_ends: Vec<usize>,
    /// The waves as asked for (`1,10%,50%,100%`).
    pub waves: String,
    /// The threshold.
    pub max_failures: MaxFailures,
    /// Seconds each wave's devices get to report.
    pub wave_timeout_s: u64,
    /// Await the last wave too.
    pub wait: bool,
    /// Put the previous documents back when the threshold is crossed.
    pub revert_on_abort: bool,
    /// Write even to devices that did not list the Score tags as supported.
    pub force: bool,
    /// How long the owner may go without writing this state before another
    /// operator may take it over, in milliseconds.
    pub lease_ms: u64,
    /// The wave (0-based) being run; `wave_ends.len()` once all ran.
    pub wave: usize,
    /// Where it stands.
    pub phase: RolloutPhase,
    /// Per device reached so far: how it ended.
    pub results: BTreeMap<DeviceId, DeviceResult>,
    /// Per device reached so far (with `revert_on_abort`): the digest key of
    /// the document it had before, `None` when it had none.
    pub previous: BTreeMap<DeviceId, Option<String>>,
    /// Per device reverted: how the revert ended.
    #[serde(default)]
    pub reverted: BTreeMap<DeviceId, DeviceResult>,
    /// When it started (operator's clock, ms since the epoch).
    pub started_at_ms: u64,
    /// Why it stopped, when it was aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl RolloutState {
    /// The devices of wave `wave` (0-based).
    pub fn wave_devices(&self, wave: usize) -> &[DeviceId] {
        let start = if wave == 0 { 0 } else { self.wave_ends[wave - 1] };
        &self.devices[start..self.wave_ends[wave]]
    }

    /// Failed devices so far, and devices with a result.
    pub fn failures(&self) -> (usize, usize) {
        let failed = self.results.values().filter(|r| r.state.is_failure()).count();
        (failed, self.results.len())
    }

    /// Checks what a state read back from the bucket claims (the bucket is
    /// the operators', but a value there is still only data).
    pub fn check(&self) -> Result<(), String> {
        if self.format != ROLLOUT_STATE_FORMAT {
            return Err(format!("format {} (this tool reads {ROLLOUT_STATE_FORMAT})", self.format));
        }
        let ascending = self.wave_ends.windows(2).all(|w| w[0] < w[1]);
        if self.wave_ends.is_empty()
            || self.wave_ends.len() > MAX_WAVES
            || !ascending
            || self.wave_ends[0] == 0
            || self.wave_ends.last() != Some(&self.devices.len())
            || self.wave > self.wave_ends.len()
        {
            return Err("its waves do not divide its devices".into());
        }
        // Names of documents beside the state: `prev.` and a sha256 in hex,
        // nothing that could name another key of the bucket.
        let valid = |name: &String| {
            name.strip_prefix("prev.").is_some_and(|hex| {
                hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            })
        };
        if !self.previous.values().flatten().all(valid) {
            return Err("it names a previous document that is not `prev.<sha256>`".into());
        }
        Ok(())
    }

    /// The summary table: one row per device that failed or rolled back
    /// (every text escaped and bounded: it comes from devices).
    pub fn failure_table(&self) -> String {
        let mut rows =
            vec![["DEVICE", "WAVE", "STATE", "FAILED CHECK", "OUTPUT"].map(str::to_owned).to_vec()];
        rows.extend(self.results.iter().filter(|(_, r)| r.state.is_failure()).map(|(device, r)| {
            [
                device.to_string(),
                r.wave.to_string(),
                r.state.as_str().to_owned(),
                r.check.clone().unwrap_or_else(|| "-".into()),
                if r.detail.is_empty() { "-".into() } else { r.detail.clone() },
            ]
            .to_vec()
        }));
        crate::report::render(&rows)
    }
}

/// What a rollout reports as it goes: the CLI draws progress bars from
/// these, or prints them as JSON lines (`--json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RolloutEvent {
    /// The rollout (or its resumption) starts.
    Started {
        /// The deployment.
        deployment: DeploymentName,
        /// Devices in all.
        devices: usize,
        /// Devices per wave.
        waves: Vec<usize>,
        /// Resumed from a stored state.
        resumed: bool,
    },
    /// A wave's documents are being written.
    WaveStarted {
        /// 1-based.
        wave: usize,
        /// Waves in all.
        of: usize,
        /// Its devices.
        devices: Vec<DeviceId>,
    },
    /// One device of a wave ended.
    Device {
        /// The device.
        device: DeviceId,
        /// Its result.
        #[serde(flatten)]
        result: DeviceResult,
    },
    /// A wave ended.
    WaveFinished {
        /// 1-based.
        wave: usize,
        /// Its devices that applied (or were written, not awaited).
        done: usize,
        /// Its devices that failed.
        failed: usize,
        /// Its devices that rolled back.
        rolled_back: usize,
        /// Failed and rolled-back devices over all waves so far.
        failures_so_far: usize,
    },
    /// The threshold was crossed: no further wave is written.
    Aborted {
        /// The wave (1-based) after which it stopped.
        wave: usize,
        /// Why.
        reason: String,
    },
    /// One updated device was given its previous document back.
    Reverted {
        /// The device.
        device: DeviceId,
        /// Its result.
        #[serde(flatten)]
        result: DeviceResult,
    },
    /// The rollout ended.
    Finished {
        /// How.
        phase: RolloutPhase,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_are_cumulative_rounded_up_and_must_reach_every_device() {
        let waves = parse_waves("1,10%,50%,100%").unwrap();
        assert_eq!(wave_ends(&waves, 20).unwrap(), [1, 2, 10, 20]);
        // 10% of 5 is 1 device: the same as the canary, so that wave is dropped.
        assert_eq!(wave_ends(&waves, 5).unwrap(), [1, 3, 5]);
        assert_eq!(wave_ends(&waves, 1).unwrap(), [1]);
        assert_eq!(wave_ends(&parse_waves("5,3,100%").unwrap(), 10).unwrap(), [5, 10]);
        assert!(wave_ends(&parse_waves("1,50%").unwrap(), 10).unwrap_err().contains("reach 5 of 10"));
        assert!(wave_ends(&waves, 0).is_err());
        // A count near u64::MAX is every device, never an overflow.
        assert_eq!(wave_ends(&[WaveSize::Devices(u64::MAX)], 3).unwrap(), [3]);
        for bad in ["0", "0%", "101%", "-1", "x", "", "1,,2", "18446744073709551616"] {
            assert!(parse_waves(bad).is_err(), "{bad}");
        }
        assert!(parse_waves(&vec!["1"; MAX_WAVES + 1].join(",")).is_err());
    }

    #[test]
    fn the_threshold_counts_devices_or_a_share_of_those_updated() {
        let two: MaxFailures = "2".parse().unwrap();
        assert!(!two.crossed(2, 10) && two.crossed(3, 10));
        let ten: MaxFailures = "10%".parse().unwrap();
        assert!(!ten.crossed(1, 10) && ten.crossed(2, 10) && ten.crossed(1, 9));
        assert!(MaxFailures::default().crossed(1, 100) && !MaxFailures::default().crossed(0, 100));
        assert!(!MaxFailures::Devices(u64::MAX).crossed(usize::MAX, usize::MAX));
        for bad in ["101%", "-1", "x", ""] {
            assert!(bad.parse::<MaxFailures>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_failure_table_escapes_what_devices_wrote() {
        let device = DeviceId::new("dev-1").unwrap();
        let mut state = RolloutState {
            format: ROLLOUT_STATE_FORMAT,
            deployment: DeploymentName::new("web").unwrap(),
            id: "x".into(),
            owner: "me".into(),
            document_digest: "sha256:0".into(),
            devices: vec![device.clone()],
            wave_ends: vec![1],
            waves: "100%".into(),
            max_failures: MaxFailures::default(),
            wave_timeout_s: 1,
            wait: true,
            revert_on_abort: false,
            force: false,
            lease_ms: 1,
            wave: 0,
            phase: RolloutPhase::Running,
            results: BTreeMap::new(),
            previous: BTreeMap::new(),
            reverted: BTreeMap::new(),
            started_at_ms: 0,
            reason: None,
        };
        assert!(state.check().is_ok());
        let err = FleetError::WaitFailed("evil\u{1b}[2J\nline".into());
        state.results.insert(device, DeviceResult::from_wait(1, 3, &Err(err)));
        let table = state.failure_table();
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(!table.contains('\u{1b}') && table.contains("dev-1   1     failed"), "{table}");
        let forged = DeviceId::new("dev-2").unwrap();
        state.previous.insert(forged.clone(), Some(format!("prev.{}", "a".repeat(64))));
        assert!(state.check().is_ok());
        state.previous.insert(forged, Some("doc".into()));
        assert!(state.check().unwrap_err().contains("prev.<sha256>"));
        state.previous.clear();
        state.wave_ends = vec![2];
        assert!(state.check().is_err());
    }
}
