//! `rollout` and `rollouts`: a `FleetRolloutScore` run by a `Maestro`, its
//! progress drawn as one bar per wave (a terminal), plain lines (a pipe) or
//! JSON lines (`--json`).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use harmony_fleet::report::format_age;
use harmony_fleet::{
    parse_waves, FleetRolloutScore, FleetTopology, MaxFailures, RolloutEvent, RolloutEvents, RolloutStore,
    RolloutTargets,
};
use harmony_score_wire::{bounded_text, DeploymentName, DeviceId};
use harmony_topology::{InterpretStatus, Inventory, Maestro};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{read_doc, CliError, Connection};

/// `rollout`'s flags.
#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    /// The deployment.
    #[arg(long)]
    deployment: DeploymentName,
    /// The document, CBOR or (by its .json extension) JSON; its device id
    /// and generation are ignored. Not given with --resume.
    #[arg(required_unless_present = "resume", conflicts_with = "resume")]
    doc: Option<PathBuf>,
    /// The devices, in wave order (the first is the canary).
    #[arg(long, value_delimiter = ',', conflicts_with = "selector", required_unless_present_any = ["selector", "resume"])]
    devices: Vec<DeviceId>,
    /// Every device whose published labels hold all of these (`key=value,…`),
    /// in device id order.
    #[arg(long, value_parser = parse_selector)]
    selector: Option<BTreeMap<String, String>>,
    /// Cumulative waves: device counts or percentages of all devices; the
    /// last must reach every device.
    #[arg(long, default_value = "1,10%,50%,100%", value_name = "N|P%,...")]
    waves: String,
    /// Stop writing waves once more devices than this failed or rolled back,
    /// over every wave so far: a number, or a percentage of the devices updated.
    #[arg(long, default_value = "0", value_name = "N|P%")]
    max_failures: MaxFailures,
    /// Seconds each wave's devices get to report applied (and committed), 1 to 86400.
    #[arg(long, default_value_t = 300, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    wave_timeout: u64,
    /// Wait for the last wave too (else it is written and the command ends).
    #[arg(long)]
    wait: bool,
    /// When aborted, give every device reached its previous document back,
    /// as a newer generation (a device that had none loses the deployment).
    #[arg(long)]
    revert_on_abort: bool,
    /// Resume the interrupted rollout of --deployment (its own settings apply).
    #[arg(long)]
    resume: bool,
    /// Print events as JSON lines instead of progress.
    #[arg(long)]
    json: bool,
    /// Write even Score tags a device did not list as supported.
    #[arg(long)]
    force: bool,
    /// Seconds after the state's last write before another operator may
    /// resume it (this process writes it every third of this), 1 to 3600.
    #[arg(long, default_value_t = 30, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    lease: u64,
}

fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut selector = BTreeMap::new();
    for pair in text.split(',') {
        let (key, value) = pair.split_once('=').ok_or_else(|| format!("{pair:?} is not key=value"))?;
        if key.trim().is_empty() {
            return Err(format!("{pair:?} has an empty key"));
        }
        selector.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    Ok(selector)
}

/// What the events draw.
struct Progress {
    json: bool,
    multi: Option<MultiProgress>,
    bar: Option<ProgressBar>,
    counts: [usize; 3],
    /// Devices in the current wave.
    len: usize,
    of: usize,
}

impl Progress {
    fn new(json: bool) -> Self {
        let terminal = !json && std::io::stderr().is_terminal();
        let multi = terminal.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self { json, multi, bar: None, counts: [0; 3], len: 0, of: 0 }
    }

    /// A line above the bars, or on standard output.
    fn line(&self, text: &str) {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(text);
            }
            None => println!("{text}"),
        }
    }

    fn message(&self) -> String {
        let [done, failed, rolled_back] = self.counts;
        let pending = self.len.saturating_sub(done + failed + rolled_back);
        format!("done {done}  failed {failed}  rolled back {rolled_back}  pending {pending}")
    }

    fn on(&mut self, event: &RolloutEvent) {
        if self.json {
            if let Ok(line) = serde_json::to_string(event) {
                println!("{line}");
            }
            return;
        }
        match event {
            RolloutEvent::Started { deployment, devices, waves, resumed } => {
                self.of = waves.len();
                let sizes: Vec<String> = waves.iter().map(ToString::to_string).collect();
                let verb = if *resumed { "resuming rollout" } else { "rollout" };
                self.line(&format!(
                    "{verb} of {deployment}: {devices} devices in {} waves ({})",
                    waves.len(),
                    sizes.join(", ")
                ));
            }
            RolloutEvent::WaveStarted { wave, of, devices } => {
                self.counts = [0; 3];
                self.len = devices.len();
                let mut names: Vec<String> = devices.iter().take(6).map(ToString::to_string).collect();
                if devices.len() > 6 {
                    names.push(format!("… {} more", devices.len() - 6));
                }
                let prefix = format!("wave {wave}/{of}");
                match &self.multi {
                    Some(multi) => {
                        let bar = multi.add(ProgressBar::new(devices.len() as u64));
                        let style = ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> ");
                        bar.set_style(style);
                        bar.set_prefix(prefix);
                        self.bar = Some(bar);
                        let message = self.message();
                        if let Some(bar) = &self.bar {
                            bar.set_message(message);
                        }
                    }
                    None => println!("{prefix}: {} devices: {}", devices.len(), names.join(", ")),
                }
            }
            RolloutEvent::Device { device, result } => {
                let slot = match result.state {
                    harmony_fleet::DeviceState::Done | harmony_fleet::DeviceState::Written => 0,
                    harmony_fleet::DeviceState::Failed => 1,
                    harmony_fleet::DeviceState::RolledBack => 2,
                };
                self.counts[slot] += 1;
                let mut text =
                    format!("  {device}: {} (generation {})", result.state.as_str(), result.generation);
                if let Some(check) = &result.check {
                    text.push_str(&format!(": check {check} failed"));
                }
                if !result.detail.is_empty() {
                    text.push_str(&format!(": {}", result.detail));
                }
                // Device-written text: one escaped, bounded line.
                let text = bounded_text(&text, 1024);
                if self.multi.is_none() || result.state.is_failure() {
                    self.line(&text);
                }
                let message = self.message();
                if let Some(bar) = &self.bar {
                    bar.set_message(message);
                    bar.inc(1);
                }
            }
            RolloutEvent::WaveFinished { wave, done, failed, rolled_back, failures_so_far } => {
                let text = format!(
                    "wave {wave}/{}: {done} done, {failed} failed, {rolled_back} rolled back ({failures_so_far} failed in all so far)",
                    self.of
                );
                match self.bar.take() {
                    Some(bar) if self.multi.is_some() => bar.finish_with_message(text),
                    _ => self.line(&text),
                }
            }
            RolloutEvent::Aborted { wave, reason } => {
                self.line(&format!("ABORTED after wave {wave}: {reason}"));
            }
            RolloutEvent::Reverted { device, result } => {
                let text = format!(
                    "  {device}: reverted: {} (generation {}){}",
                    result.state.as_str(),
                    result.generation,
                    if result.detail.is_empty() { String::new() } else { format!(": {}", result.detail) }
                );
                self.line(&bounded_text(&text, 1024));
            }
            RolloutEvent::Finished { .. } => {}
        }
    }
}

/// `rollout`: the Score, run by a Maestro; exits 1 when aborted.
pub async fn rollout(conn: &Connection, args: RolloutArgs) -> Result<(), CliError> {
    let progress = Arc::new(Mutex::new(Progress::new(args.json)));
    let sink = {
        let progress = Arc::clone(&progress);
        RolloutEvents(Arc::new(move |event: &RolloutEvent| {
            if let Ok(mut progress) = progress.lock() {
                progress.on(event);
            }
        }))
    };
    let score = if args.resume {
        FleetRolloutScore::resume(args.deployment.clone(), Some(sink))
    } else {
        let Some(path) = &args.doc else {
            return Err(CliError::Usage("a document is needed (or --resume)".into()));
        };
        let doc = read_doc(path)?;
        let targets = match args.selector {
            Some(selector) => RolloutTargets::Selector(selector),
            None => RolloutTargets::Devices(args.devices),
        };
        FleetRolloutScore {
            deployment: args.deployment.clone(),
            scores: doc.scores,
            health: doc.health,
            health_timeout_s: doc.health_timeout_s,
            expires_at: doc.expires_at,
            targets,
            waves: parse_waves(&args.waves).map_err(CliError::Usage)?,
            max_failures: args.max_failures,
            wave_timeout_s: args.wave_timeout,
            wait: args.wait,
            revert_on_abort: args.revert_on_abort,
            force: args.force,
            lease_s: args.lease,
            resume: false,
            events: Some(sink),
        }
    };
    let client = conn.client().await?;
    let maestro = Maestro::initialize(Inventory::empty(), FleetTopology::from_client(client))
        .await
        .map_err(|e| CliError::Failed(harmony_fleet::error_chain(&e)))?;
    let outcome = maestro.interpret(&score).await.map_err(|e| CliError::Failed(e.to_string()))?;
    if !args.json {
        println!("{}: {}", outcome.status, outcome.message);
        for line in &outcome.details {
            println!("  {line}");
        }
    }
    match outcome.status {
        InterpretStatus::FAILURE => Err(CliError::Failed("rollout aborted".into())),
        _ => Ok(()),
    }
}

/// `rollouts`: every rollout and where it stands. A value that is not a
/// usable rollout state is listed as `unreadable` (why, on stderr), not
/// allowed to hide the others.
pub async fn rollouts(conn: &Connection, json: bool) -> Result<(), CliError> {
    let client = conn.client().await?;
    let mut states = Vec::new();
    let mut rows = vec![["DEPLOYMENT", "PHASE", "WAVES", "REACHED", "FAILED", "OWNER", "WRITTEN"]
        .map(str::to_owned)
        .to_vec()];
    for (deployment, stored) in client.list_rollouts().await? {
        let stored = match stored {
            Ok(stored) => stored,
            Err(err) => {
                let why = bounded_text(&harmony_fleet::error_chain(&err), 512);
                eprintln!("harmony-fleet: rollout {deployment}: unreadable: {why}");
                let mut row = vec![deployment.to_string(), "unreadable".into()];
                row.extend(["-"; 5].map(str::to_owned));
                rows.push(row);
                continue;
            }
        };
        let s = &stored.state;
        let (failed, reached) = s.failures();
        rows.push(vec![
            s.deployment.to_string(),
            s.phase.as_str().to_owned(),
            format!("{}/{}", s.wave.min(s.wave_ends.len()), s.wave_ends.len()),
            format!("{reached}/{}", s.devices.len()),
            failed.to_string(),
            bounded_text(&s.owner, 64),
            format!("{} ago", format_age(u64::try_from(stored.age.as_millis()).unwrap_or(u64::MAX))),
        ]);
        states.push(stored.state);
    }
    if json {
        let text = serde_json::to_string_pretty(&states).map_err(|e| CliError::Failed(e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", harmony_fleet::report::render(&rows));
    }
    Ok(())
}
