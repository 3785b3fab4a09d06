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
            WaveSize::Percent(p) => share(total, p, u128::div_ceil),
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

/// `percent`% of `count`, rounded by `round(count × percent, 100)`, in
/// wider integers: never an overflow, and never more than `count`.
fn share(count: usize, percent: u8, round: fn(u128, u128) -> u128) -> usize {
    let exact = round(count as u128 * u128::from(percent.min(100)), 100);
    usize::try_from(exact).unwrap_or(count)
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
            MaxFailures::Percent(p) => share(updated, p, |a, b| a / b),
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
                // Rolled back by a check only when the awaited generation
                // failed so: a status's checks may be an older generation's
                // (a refused document, a timeout, a newer generation).
                let rolled_back = match err {
                    FleetError::DeploymentFailed { status, .. } if status.phase == Phase::RolledBack => {
                        Some(status)
                    }
                    _ => None,
                };
                let failed_check =
                    rolled_back.and_then(|ds| ds.health.iter().find(|c| c.state == CheckState::Failed));
                let state = if rolled_back.is_some() { DeviceState::RolledBack } else { DeviceState::Failed };
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

    /// The name of the rolled-out document beside the state: by its digest,
    /// so that an operator whose start lost the compare-and-set never
    /// replaces the winner's.
    pub fn document_name(&self) -> String {
        format!("doc.{}", self.document_digest.trim_start_matches("sha256:"))
    }

    /// The most bytes this state can take encoded: every device with a
    /// result, and with `revert_on_abort` a previous document and a revert,
    /// failure details aside ([`encode_within`](Self::encode_within) drops
    /// those when they would not fit).
    pub fn largest_encoded_size(&self) -> usize {
        let mut full = self.clone();
        // The longest of each field but the details; a new owner's name may be longer.
        let result = DeviceResult {
            wave: self.wave_ends.len(),
            state: DeviceState::RolledBack,
            generation: u64::MAX,
            check: None,
            detail: String::new(),
        };
        let previous = Some(format!("prev.{}", "0".repeat(64)));
        for device in &self.devices {
            full.results.insert(device.clone(), result.clone());
            if self.revert_on_abort {
                full.previous.insert(device.clone(), previous.clone());
                full.reverted.insert(device.clone(), result.clone());
            }
        }
        full.reason = Some("0".repeat(256));
        full.owner = "0".repeat(256);
        harmony_score_wire::to_cbor(&full).len()
    }

    /// The state encoded in at most `max` bytes: as it is, or without the
    /// failed devices' checks and outputs (already reported as events).
    /// `Err` with the size when even that does not fit.
    pub fn encode_within(&self, max: usize) -> Result<Vec<u8>, usize> {
        let bytes = harmony_score_wire::to_cbor(self);
        if bytes.len() <= max {
            return Ok(bytes);
        }
        let mut trimmed = self.clone();
        for result in trimmed.results.values_mut().chain(trimmed.reverted.values_mut()) {
            result.check = None;
            result.detail.clear();
        }
        let bytes = harmony_score_wire::to_cbor(&trimmed);
        if bytes.len() <= max {
            Ok(bytes)
        } else {
            Err(bytes.len())
        }
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
        // Names of documents beside the state: `prev.` or `doc.` and a
        // sha256 in hex, nothing that could name another key of the bucket.
        let sha256 = |hex: &str| {
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !self.previous.values().flatten().all(|name| name.strip_prefix("prev.").is_some_and(sha256)) {
            return Err("it names a previous document that is not `prev.<sha256>`".into());
        }
        if !self.document_digest.strip_prefix("sha256:").is_some_and(sha256) {
            return Err("its document digest is not `sha256:<hex>`".into());
        }
        if self.lease_ms < 1000 || self.wave_timeout_s == 0 {
            return Err("its lease is under 1 s or its wave timeout is 0".into());
        }
        // Devices, once each; results only for the waves run, previous
        // documents only up to the wave being run, reverts only of devices
        // with a result: `--resume` writes to (and reverts) what it names.
        let mut seen = std::collections::BTreeSet::new();
        if !self.devices.iter().all(|d| seen.insert(d)) {
            return Err("it lists a device twice".into());
        }
        let end =
            |wave: usize| if wave == 0 { 0 } else { self.wave_ends[wave.min(self.wave_ends.len()) - 1] };
        let run: std::collections::BTreeSet<&DeviceId> = self.devices[..end(self.wave)].iter().collect();
        let reached: std::collections::BTreeSet<&DeviceId> =
            self.devices[..end(self.wave + 1)].iter().collect();
        if !self.results.keys().all(|d| run.contains(d)) {
            return Err("it holds a result for a device outside the waves run".into());
        }
        if !self.previous.keys().all(|d| reached.contains(d)) {
            return Err("it holds a previous document for a device outside the waves reached".into());
        }
        if !self.reverted.keys().all(|d| self.results.contains_key(d)) {
            return Err("it holds a revert for a device without a result".into());
        }
        // A device written without its previous document recorded would
        // lose its deployment on a revert.
        if self.revert_on_abort
            && self.results.iter().any(|(d, r)| r.generation > 0 && !self.previous.contains_key(d))
        {
            return Err("a device it wrote has no previous document recorded".into());
        }
        Ok(())
    }

    /// The summary table: one row per device that failed or rolled back
    /// (every text escaped and bounded: it comes from devices).
    pub fn failure_table(&self) -> String {
        let mut rows =
            vec![["DEVICE", "WAVE", "STATE", "FAILED CHECK", "OUTPUT"].map(str::to_owned).to_vec()];
        // Escaped again: a resumed rollout's results are what the bucket held.
        rows.extend(self.results.iter().filter(|(_, r)| r.state.is_failure()).map(|(device, r)| {
            [
                device.to_string(),
                r.wave.to_string(),
                r.state.as_str().to_owned(),
                r.check.as_deref().map_or_else(|| "-".into(), |c| bounded_text(c, MAX_DETAIL_BYTES)),
                if r.detail.is_empty() { "-".into() } else { bounded_text(&r.detail, MAX_DETAIL_BYTES) },
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
pub(crate) mod tests {
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

    fn dev(n: usize) -> DeviceId {
        DeviceId::new(format!("dev-{n}")).unwrap()
    }

    /// A state over `devices` devices (`dev-1`…) in the waves ending at `ends`.
    pub(crate) fn state_of(devices: usize, ends: &[usize]) -> RolloutState {
        RolloutState {
            format: ROLLOUT_STATE_FORMAT,
            deployment: DeploymentName::new("web").unwrap(),
            id: "x".into(),
            owner: "me".into(),
            document_digest: format!("sha256:{}", "0".repeat(64)),
            devices: (1..=devices).map(dev).collect(),
            wave_ends: ends.to_vec(),
            waves: "100%".into(),
            max_failures: MaxFailures::default(),
            wave_timeout_s: 1,
            wait: true,
            revert_on_abort: false,
            force: false,
            lease_ms: 1000,
            wave: 0,
            phase: RolloutPhase::Running,
            results: BTreeMap::new(),
            previous: BTreeMap::new(),
            reverted: BTreeMap::new(),
            started_at_ms: 0,
            reason: None,
        }
    }

    fn done(wave: usize) -> DeviceResult {
        DeviceResult { wave, state: DeviceState::Done, generation: 2, check: None, detail: String::new() }
    }

    #[test]
    fn the_failure_table_escapes_what_devices_wrote() {
        let device = dev(1);
        let mut state = state_of(1, &[1]);
        assert!(state.check().is_ok());
        let err = FleetError::WaitFailed("evil\u{1b}[2J\nline".into());
        state.results.insert(device.clone(), DeviceResult::from_wait(1, 3, &Err(err)));
        state.wave = 1;
        let table = state.failure_table();
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(!table.contains('\u{1b}') && table.contains("dev-1   1     failed"), "{table}");
        state.previous.insert(device.clone(), Some(format!("prev.{}", "a".repeat(64))));
        assert!(state.check().is_ok());
        state.previous.insert(device, Some("doc".into()));
        assert!(state.check().unwrap_err().contains("prev.<sha256>"));
        state.previous.clear();
        state.wave_ends = vec![2];
        assert!(state.check().is_err());
    }

    // A state read back from the bucket is data: a result, a previous
    // document or a revert for a device the rollout never reached would
    // make `--resume` revert (or delete the deployment of) a device that is
    // not in the rollout, and more results than devices made the count of
    // devices not updated underflow (a panic in debug builds).
    #[test]
    fn a_forged_state_naming_devices_outside_the_waves_run_is_refused() {
        let mut state = state_of(4, &[1, 2, 4]);
        state.wave = 1;
        state.results.insert(dev(1), done(1));
        assert_eq!(state.check(), Ok(()));
        let refused = |state: &RolloutState, what: &str| {
            let err = state.check().expect_err(what);
            assert!(!err.is_empty(), "{what}");
        };
        // A device not in the list at all.
        let mut forged = state.clone();
        forged.results.insert(dev(9), done(1));
        refused(&forged, "a result for a device not in the rollout");
        // A device of a wave not run yet (wave 2 is running: dev-2 has no result yet).
        let mut forged = state.clone();
        forged.results.insert(dev(3), done(3));
        refused(&forged, "a result for a device of a later wave");
        let mut forged = state.clone();
        forged.previous.insert(dev(9), None);
        refused(&forged, "a previous document for a device not in the rollout");
        // The wave being run may have its previous documents recorded; later ones not.
        let mut ok = state.clone();
        ok.previous.insert(dev(2), None);
        assert_eq!(ok.check(), Ok(()));
        ok.previous.insert(dev(3), None);
        refused(&ok, "a previous document for a device of a later wave");
        let mut forged = state.clone();
        forged.reverted.insert(dev(2), done(2));
        refused(&forged, "a revert of a device without a result");
        let mut forged = state.clone();
        forged.devices[1] = dev(1);
        refused(&forged, "a device twice");
        // Reverting a device written without its previous document recorded
        // would delete its deployment.
        let mut forged = state.clone();
        forged.revert_on_abort = true;
        refused(&forged, "a device written without its previous document");
        forged.previous.insert(dev(1), None);
        assert_eq!(forged.check(), Ok(()));
        // A lease under a second (saved every millisecond, taken over at
        // once) and a wave timeout of 0 are no settings `rollout` writes.
        let mut forged = state.clone();
        forged.lease_ms = 0;
        refused(&forged, "a lease of 0 ms");
        let mut forged = state.clone();
        forged.wave_timeout_s = 0;
        refused(&forged, "a wave timeout of 0 s");
        // The digest names the document's key: nothing but a sha256.
        let mut forged = state;
        forged.document_digest = "sha256:0.prev.x".into();
        refused(&forged, "a document digest that names another key");
    }

    // The table and the outcome print what the state holds; on `--resume`
    // that is what the bucket held, not what this process escaped.
    #[test]
    fn the_failure_table_escapes_a_stored_result_too() {
        let mut state = state_of(1, &[1]);
        state.results.insert(
            dev(1),
            DeviceResult {
                wave: 1,
                state: DeviceState::Failed,
                generation: 2,
                check: Some("evil\u{1b}[2J".into()),
                detail: format!("line\nbreak{}", "x".repeat(10_000)),
            },
        );
        let table = state.failure_table();
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(!table.contains('\u{1b}') && table.len() < 2048, "{table}");
    }

    // A status's checks are those of the generation being verified "or of
    // the last one verified": a generation the device refused (expired)
    // shows an older one's failed check, and a device that times out may
    // last have reported an older generation rolled back. Neither is this
    // generation rolled back by that check.
    #[test]
    fn only_the_awaited_generation_rolled_back_names_a_failed_check() {
        use harmony_score_wire::{CheckStatus, ErrorKind, StatusError};
        let stale_check = CheckStatus {
            check: "file_sha256 /etc/canary-ok".into(),
            source: "document".into(),
            state: CheckState::Failed,
            output: "/etc/canary-ok does not exist".into(),
        };
        let rejected = DeploymentStatus {
            desired_generation: 4,
            observed_generation: 2,
            phase: Phase::Rejected,
            error: Some(StatusError::new(ErrorKind::Expired, "document expired at 5")),
            health: vec![stale_check.clone()],
            ..Default::default()
        };
        let err = FleetError::DeploymentFailed {
            device: dev(1),
            deployment: DeploymentName::new("web").unwrap(),
            status: Box::new(rejected),
        };
        let result = DeviceResult::from_wait(1, 4, &Err(err));
        assert_eq!((result.state, result.check.as_deref()), (DeviceState::Failed, None), "{result:?}");
        assert!(result.detail.contains("expired"), "{result:?}");
        let older_rollback = DeploymentStatus {
            desired_generation: 2,
            observed_generation: 1,
            phase: Phase::RolledBack,
            health: vec![stale_check],
            ..Default::default()
        };
        let err = FleetError::Timeout {
            what: "dev-1/web to apply generation 3".into(),
            after: std::time::Duration::from_secs(1),
            last: Some(Box::new(older_rollback)),
        };
        let result = DeviceResult::from_wait(1, 3, &Err(err));
        assert_eq!((result.state, result.check.as_deref()), (DeviceState::Failed, None), "{result:?}");
    }

    // A state is one KV value (at most 1 MiB, the server's default
    // payload too). 10,000 devices with --revert-on-abort took 1.28 MB
    // once every device had a result and a previous document: the rollout
    // failed at a save mid-way and could not be resumed. A rollout whose
    // state could outgrow one value is known before it writes anything,
    // and failure details never push an accepted one over.
    #[test]
    fn a_state_never_outgrows_one_value() {
        const MAX: usize = crate::client::MAX_VALUE_BYTES;
        let mut big = state_of(10_000, &[10_000]);
        big.revert_on_abort = true;
        assert!(big.largest_encoded_size() > MAX, "{}", big.largest_encoded_size());
        big.revert_on_abort = false;
        assert!(big.largest_encoded_size() <= MAX, "{}", big.largest_encoded_size());
        let mut state = state_of(3_000, &[3_000]);
        state.revert_on_abort = true;
        assert!(state.largest_encoded_size() <= MAX, "{}", state.largest_encoded_size());
        // Every device failed, each with the longest check and output kept.
        state.wave = 1;
        for (i, device) in state.devices.clone().into_iter().enumerate() {
            let long = "é".repeat(MAX_DETAIL_BYTES);
            let waited = Err(FleetError::WaitFailed(long.clone()));
            let mut result = DeviceResult::from_wait(1, u64::MAX - i as u64, &waited);
            result.check = Some(bounded_text(&long, MAX_DETAIL_BYTES));
            state.results.insert(device.clone(), result.clone());
            state.previous.insert(device.clone(), Some(format!("prev.{}", "f".repeat(64))));
            state.reverted.insert(device, result);
        }
        assert!(harmony_score_wire::to_cbor(&state).len() > MAX);
        let bytes = state.encode_within(MAX).expect("fits once failure details are dropped");
        assert!(bytes.len() <= MAX, "{}", bytes.len());
        let back: RolloutState = harmony_score_wire::from_cbor(&bytes, MAX, "state").unwrap();
        assert_eq!((back.results.len(), back.check()), (3_000, Ok(())));
        assert!(back.results.values().all(|r| r.state == DeviceState::Failed && r.detail.is_empty()));
    }

    #[test]
    fn the_threshold_and_the_waves_never_overflow() {
        assert!(MaxFailures::Percent(100).crossed(usize::MAX, usize::MAX - 1));
        assert!(!MaxFailures::Percent(100).crossed(usize::MAX, usize::MAX));
        assert!(!MaxFailures::Percent(50).crossed(usize::MAX / 2, usize::MAX));
        assert_eq!(wave_ends(&[WaveSize::Percent(100)], usize::MAX).unwrap(), [usize::MAX]);
        assert_eq!(
            wave_ends(&[WaveSize::Percent(50), WaveSize::Percent(100)], usize::MAX).unwrap()[0],
            usize::MAX / 2 + 1
        );
    }
}
