//! `PodmanContainerScore`: a container running as specified, or its absence.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use harmony_score_wire::health::CONTAINER_STABLE_S;
use harmony_score_wire::validate::{
    check_artifact_name, check_container_name, check_path, check_sha256_hex, check_text,
};
use harmony_score_wire::{Check, DeviceScore, HealthCheck, Privilege, ResourceId, ScoreValidationError};
use harmony_topology::{
    async_trait, parse_memory, run, ArtifactStore, BindMount, ContainerRuntime, ContainerSpec,
    ContainerState, Id, Interpret, InterpretError, InterpretErrorKind, InterpretName, InterpretStatus,
    Inventory, NetworkMode, Outcome, PortMapping, RestartPolicy, Score, Topology, Version,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::PresenceState;

/// Label on every container this Score creates; a container without it is
/// never changed or removed.
pub const MANAGED_LABEL: &str = "harmony.managed";
/// Label holding the [`PodmanContainerScore::spec_digest`] the container was created from.
pub const SPEC_LABEL: &str = "harmony.spec";
/// Label naming the deployment whose run created the container (when known).
pub const DEPLOYMENT_LABEL: &str = "harmony.deployment";

/// Longest image reference.
const MAX_IMAGE_BYTES: usize = 512;
/// Most command arguments, environment variables, ports, volumes, labels.
const MAX_ITEMS: usize = 256;
/// Longest command argument or environment value.
const MAX_VALUE_BYTES: usize = 32 * 1024;
/// Longest grace period a stop may be given.
const MAX_STOP_TIMEOUT_S: u64 = 3600;

/// A container called `name`, created from a local `image` and running
/// `command`, with its environment, published ports, bind mounts, labels and
/// limits; or, with `state: absent`, no container of that name.
///
/// Minimal JSON form: `{"type": "harmony.podman.container/v1", "name":
/// "web", "image": "localhost/harmony-busybox:test"}`. Every field but
/// `name` has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodmanContainerScore {
    /// The container's name (`[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 128 bytes).
    pub name: String,
    /// The image reference; pulled when it is not present locally (or
    /// loaded from `image_archive`). Needed when present; empty when absent.
    #[serde(default)]
    pub image: String,
    /// Where the image comes from when it is not present locally: an image
    /// archive in the fleet's artifact store instead of a registry. The
    /// archive must hold `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_archive: Option<ImageArchive>,
    /// The command and its arguments; empty: the image's own.
    #[serde(default)]
    pub command: Vec<String>,
    /// Environment variables (values on one line).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Published ports: `[ip:][host_port:]container_port[/tcp|udp|sctp]`
    /// (`127.0.0.1:18080:8080`, `8080:80/udp`).
    #[serde(default)]
    pub ports: Vec<String>,
    /// Bind mounts of paths beneath the device's root.
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// What podman does when the process exits; the agent's reconcile
    /// restarts an exited container whatever this says.
    #[serde(default)]
    pub restart: Restart,
    /// Labels (keys starting with `harmony.` are reserved).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Memory limit: a number and a unit `b`, `k`, `m` or `g` (`256m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPU limit in CPUs (`0.5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Seconds a stop waits after SIGTERM before SIGKILL.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_s: u64,
    /// Run privileged (a [`Privilege`] the device's policy must grant).
    #[serde(default)]
    pub privileged: bool,
    /// The network: `default` or `host` (a [`Privilege`] too).
    #[serde(default)]
    pub network: Network,
    /// Present (default) or absent.
    #[serde(default)]
    pub state: PresenceState,
}

fn default_stop_timeout() -> u64 {
    30
}

/// An image archive (`podman save` output) in the fleet's artifact store
/// (`harmony-fleet artifact put` prints both fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageArchive {
    /// The artifact's name (`busybox.tar`).
    pub artifact: String,
    /// Its sha256: 64 lowercase hex digits. The device loads nothing else.
    pub sha256: String,
}

/// A bind mount: `host_path` (beneath the device's root, existing) at
/// `container_path` inside the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Absolute path on the device; a directory or a regular file.
    pub host_path: String,
    /// Absolute path inside the container.
    pub container_path: String,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// The restart policy podman applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Never (the default): the agent's reconcile repairs an exit.
    #[default]
    No,
    /// Always.
    Always,
    /// When the process exits non-zero.
    OnFailure,
    /// Unless stopped by hand.
    UnlessStopped,
}

/// The network a container joins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Podman's default network (private, ports published through NAT).
    #[default]
    Default,
    /// The host's network (no published ports; needs a privilege).
    Host,
}

impl<T: Topology + ContainerRuntime + ArtifactStore> Score<T> for PodmanContainerScore {
    fn create_interpret(&self) -> Box<dyn Interpret<T>> {
        Box::new(PodmanContainerInterpret { score: self.clone() })
    }

    fn name(&self) -> String {
        format!("container [{}]", self.name)
    }
}

harmony_score_wire::device_score! {
    tag: "harmony.podman.container/v1",
    summary: "a podman container running as specified (image, command, env, ports, volumes), or its absence",
    impl DeviceScore for PodmanContainerScore {
        fn validate(&self) -> Result<(), ScoreValidationError> {
            self.check()
        }

        fn resource(&self) -> ResourceId {
            ResourceId::named("container", &self.name).expect("validated container name")
        }

        fn privileges(&self) -> Vec<Privilege> {
            let mut needed = Vec::new();
            if self.state == PresenceState::Present {
                if self.privileged {
                    needed.push(Privilege::PrivilegedContainer);
                }
                if self.network == Network::Host {
                    needed.push(Privilege::HostNetwork);
                }
            }
            needed
        }

        // Bind-mount sources: judged by the device's allowed paths.
        fn used_paths(&self) -> Vec<String> {
            match self.state {
                PresenceState::Present => self.volumes.iter().map(|v| v.host_path.clone()).collect(),
                PresenceState::Absent => Vec::new(),
            }
        }

        fn undo(&self) -> Option<Box<dyn DeviceScore>> {
            match self.state {
                // Only what a removal needs: the agent keeps every undo in
                // its state, and the environment may hold secrets.
                PresenceState::Present => Some(Box::new(PodmanContainerScore::absent(&self.name, self.stop_timeout_s))),
                PresenceState::Absent => None,
            }
        }

        // A recreate stops the old container (up to its grace period) and
        // may load or pull an image: longer than the agent's 300 s default.
        fn interpret_timeout(&self) -> Option<Duration> {
            Some(Duration::from_secs(600 + self.stop_timeout_s))
        }

        fn health(&self) -> Option<&dyn HealthCheck> {
            Some(self)
        }
    }
}

/// The container's own check, run for documents that ask for verification:
/// a present container runs, unrestarted for [`CONTAINER_STABLE_S`]
/// seconds (one that crash-loops under `restart: always` fails it). An
/// absent one contributes nothing.
impl HealthCheck for PodmanContainerScore {
    fn health_checks(&self) -> Vec<Check> {
        match self.state {
            PresenceState::Present => {
                vec![Check::ContainerRunning { name: self.name.clone(), stable_s: CONTAINER_STABLE_S }]
            }
            PresenceState::Absent => Vec::new(),
        }
    }
}

impl PodmanContainerScore {
    /// No container called `name`; a stop waits `stop_timeout_s` before SIGKILL.
    pub fn absent(name: &str, stop_timeout_s: u64) -> Self {
        Self {
            name: name.to_owned(),
            image: String::new(),
            image_archive: None,
            command: Vec::new(),
            env: BTreeMap::new(),
            ports: Vec::new(),
            volumes: Vec::new(),
            restart: Restart::No,
            labels: BTreeMap::new(),
            memory: None,
            cpus: None,
            stop_timeout_s,
            privileged: false,
            network: Network::Default,
            state: PresenceState::Absent,
        }
    }

    fn check(&self) -> Result<(), ScoreValidationError> {
        check_container_name("name", &self.name)?;
        if self.state == PresenceState::Present || !self.image.is_empty() {
            check_image("image", &self.image)?;
        }
        if let Some(archive) = &self.image_archive {
            check_artifact_name("image_archive.artifact", &archive.artifact)?;
            check_sha256_hex("image_archive.sha256", &archive.sha256)?;
        }
        check_count("command", self.command.len())?;
        for (i, arg) in self.command.iter().enumerate() {
            if arg.len() > MAX_VALUE_BYTES || arg.contains('\0') {
                return Err(bad(format!("command[{i}]"), format!("at most {MAX_VALUE_BYTES} bytes, no NUL")));
            }
        }
        check_count("env", self.env.len())?;
        for (key, value) in &self.env {
            check_env(key, value)?;
        }
        check_count("ports", self.ports.len())?;
        let mut bound = HashSet::new();
        for (i, port) in self.ports.iter().enumerate() {
            let field = format!("ports[{i}]");
            let mapping: PortMapping = port.parse().map_err(|e| bad(&field, format!("{e}")))?;
            if self.network == Network::Host {
                return Err(bad(field, "a container on the host network publishes no ports"));
            }
            if mapping.host_port.is_some()
                && !bound.insert((mapping.host_ip, mapping.host_port, mapping.protocol))
            {
                return Err(bad(field, format!("{port:?} publishes a host port already published")));
            }
        }
        check_count("volumes", self.volumes.len())?;
        let mut targets = HashSet::new();
        for (i, volume) in self.volumes.iter().enumerate() {
            check_volume_path(&format!("volumes[{i}].host_path"), &volume.host_path)?;
            let field = format!("volumes[{i}].container_path");
            check_volume_path(&field, &volume.container_path)?;
            if !targets.insert(harmony_score_wire::normalize_path(&volume.container_path).unwrap_or_default())
            {
                return Err(bad(field, "two volumes at one container path"));
            }
        }
        check_count("labels", self.labels.len())?;
        for (key, value) in &self.labels {
            check_label(key, value)?;
        }
        if let Some(memory) = &self.memory {
            parse_memory(memory).map_err(|e| bad("memory", e))?;
        }
        if let Some(cpus) = self.cpus {
            if !(0.01..=1024.0).contains(&cpus) {
                return Err(bad("cpus", "must be 0.01 to 1024"));
            }
        }
        if self.stop_timeout_s > MAX_STOP_TIMEOUT_S {
            return Err(bad("stop_timeout_s", format!("at most {MAX_STOP_TIMEOUT_S}")));
        }
        Ok(())
    }

    /// What podman is asked to create, with the labels that mark it as
    /// managed, its spec digest, and the deployment (when known).
    /// The Score must be valid.
    pub fn container_spec(&self, deployment: Option<&str>) -> ContainerSpec {
        let mut labels = self.labels.clone();
        labels.insert(MANAGED_LABEL.to_owned(), "true".to_owned());
        labels.insert(SPEC_LABEL.to_owned(), self.spec_digest());
        if let Some(deployment) = deployment {
            labels.insert(DEPLOYMENT_LABEL.to_owned(), deployment.to_owned());
        }
        ContainerSpec {
            name: self.name.clone(),
            image: self.image.clone(),
            command: self.command.clone(),
            env: self.env.clone(),
            ports: self.ports.iter().filter_map(|p| p.parse().ok()).collect(),
            volumes: self
                .volumes
                .iter()
                .map(|v| BindMount {
                    source: v.host_path.clone(),
                    target: v.container_path.clone(),
                    read_only: v.read_only,
                })
                .collect(),
            restart: match self.restart {
                Restart::No => RestartPolicy::No,
                Restart::Always => RestartPolicy::Always,
                Restart::OnFailure => RestartPolicy::OnFailure,
                Restart::UnlessStopped => RestartPolicy::UnlessStopped,
            },
            labels,
            memory_bytes: self.memory.as_deref().and_then(|m| parse_memory(m).ok()),
            cpus: self.cpus,
            stop_timeout: Duration::from_secs(self.stop_timeout_s),
            privileged: self.privileged,
            network: match self.network {
                Network::Default => NetworkMode::Default,
                Network::Host => NetworkMode::Host,
            },
        }
    }

    /// The sha256 (hex) of everything the container is created from, in a
    /// canonical form: ports as podman prints them, paths normalized, maps
    /// sorted. Not the name (that is identity) and not the state.
    ///
    /// Every container this Score made carries it as [`SPEC_LABEL`]: a
    /// change to this form makes every device recreate its containers once,
    /// so change it only with the tag version.
    pub fn spec_digest(&self) -> String {
        #[derive(Serialize)]
        struct Canonical<'a> {
            form: u8,
            image: &'a str,
            // Absent from the form when unset: digests of Scores without an
            // archive are what they were before the field existed.
            #[serde(skip_serializing_if = "Option::is_none")]
            image_archive: Option<&'a str>,
            command: &'a [String],
            env: &'a BTreeMap<String, String>,
            ports: Vec<String>,
            volumes: Vec<(String, String, bool)>,
            restart: Restart,
            labels: &'a BTreeMap<String, String>,
            memory_bytes: Option<u64>,
            cpus: Option<f64>,
            stop_timeout_s: u64,
            privileged: bool,
            network: Network,
        }
        let normalized = |p: &str| harmony_score_wire::normalize_path(p).unwrap_or_else(|_| p.to_owned());
        let canonical = Canonical {
            form: 1,
            image: &self.image,
            image_archive: self.image_archive.as_ref().map(|a| a.sha256.as_str()),
            command: &self.command,
            env: &self.env,
            ports: self
                .ports
                .iter()
                .map(|p| p.parse::<PortMapping>().map_or_else(|_| p.clone(), |m| m.to_string()))
                .collect(),
            volumes: self
                .volumes
                .iter()
                .map(|v| (normalized(&v.host_path), normalized(&v.container_path), v.read_only))
                .collect(),
            restart: self.restart,
            labels: &self.labels,
            memory_bytes: self.memory.as_deref().and_then(|m| parse_memory(m).ok()),
            cpus: self.cpus,
            stop_timeout_s: self.stop_timeout_s,
            privileged: self.privileged,
            network: self.network,
        };
        let json = serde_json::to_vec(&canonical).expect("plain data serializes");
        let mut hex = String::with_capacity(64);
        for byte in Sha256::digest(&json) {
            let _ = write!(hex, "{byte:02x}");
        }
        hex
    }
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> ScoreValidationError {
    ScoreValidationError::new(field, message)
}

fn check_count(field: &str, n: usize) -> Result<(), ScoreValidationError> {
    if n > MAX_ITEMS {
        return Err(bad(field, format!("at most {MAX_ITEMS} entries")));
    }
    Ok(())
}

/// An image reference: `[registry[:port]/]path[:tag][@sha256:hex]`, in the
/// characters references use, starting with a letter or digit (so it is
/// never read as a flag).
fn check_image(field: &str, image: &str) -> Result<(), ScoreValidationError> {
    let shown = harmony_topology::bounded_text(image, 64);
    if image.is_empty() || image.len() > MAX_IMAGE_BYTES {
        return Err(bad(field, format!("must be 1 to {MAX_IMAGE_BYTES} bytes")));
    }
    if !image.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !image.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@'))
    {
        return Err(bad(field, format!("{shown:?} is not an image reference")));
    }
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let hex = digest.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(field, format!("{shown:?}: a digest is sha256:<64 hex digits>")));
        }
    }
    if name.is_empty() || name.split('/').any(str::is_empty) || name.ends_with(':') {
        return Err(bad(field, format!("{shown:?} is not an image reference")));
    }
    Ok(())
}

fn check_env(key: &str, value: &str) -> Result<(), ScoreValidationError> {
    let field = format!("env.{}", harmony_topology::bounded_text(key, 64));
    let key_ok = key.len() <= 256
        && key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !key_ok {
        return Err(bad(field, "a name is [A-Za-z_][A-Za-z0-9_]*, at most 256 bytes"));
    }
    if value.len() > MAX_VALUE_BYTES || value.contains(['\0', '\n', '\r']) {
        return Err(bad(field, format!("a value is one line of at most {MAX_VALUE_BYTES} bytes")));
    }
    Ok(())
}

fn check_label(key: &str, value: &str) -> Result<(), ScoreValidationError> {
    let field = format!("labels.{}", harmony_topology::bounded_text(key, 64));
    let key_ok = !key.is_empty()
        && key.len() <= 253
        && key.starts_with(|c: char| c.is_ascii_alphanumeric())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if !key_ok {
        return Err(bad(field, "a key is 1 to 253 of [A-Za-z0-9._/-], starting with a letter or digit"));
    }
    if key.to_ascii_lowercase().starts_with("harmony.") {
        return Err(bad(field, "keys starting with harmony. are reserved for the agent"));
    }
    if value.len() > 4096 || value.chars().any(char::is_control) {
        return Err(bad(field, "a value is at most 4096 bytes without control characters"));
    }
    Ok(())
}

/// An absolute path without `..` that podman's `-v source:target[:ro]` can carry.
fn check_volume_path(field: &str, path: &str) -> Result<(), ScoreValidationError> {
    check_path(field, path)?;
    check_text(field, path, harmony_score_wire::MAX_PATH_BYTES)?;
    if path.contains([':', ',']) {
        return Err(bad(field, "a volume path cannot hold ':' or ','"));
    }
    Ok(())
}

/// Makes a [`PodmanContainerScore`] true: reads the container first, then
/// creates, starts, recreates or removes only what differs.
#[derive(Debug)]
pub struct PodmanContainerInterpret {
    score: PodmanContainerScore,
}

fn cancelled() -> InterpretError {
    InterpretError::with_kind(InterpretErrorKind::Cancelled, "cancelled")
}

fn check_cancelled() -> Result<(), InterpretError> {
    if run::is_cancelled() {
        return Err(cancelled());
    }
    Ok(())
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Whether the container carries the label this Score puts on what it creates.
fn is_managed(container: &ContainerState) -> bool {
    container.labels.get(MANAGED_LABEL).map(String::as_str) == Some("true")
}

impl PodmanContainerInterpret {
    /// Makes sure the image is local: loads it from its archive, or pulls
    /// it, when missing, racing the run's cancellation. Returns what it
    /// did, for the message.
    async fn ensure_image<T: ContainerRuntime + ArtifactStore>(
        &self,
        topology: &T,
    ) -> Result<Option<String>, InterpretError> {
        let image = &self.score.image;
        if topology.image_present(image).await? {
            return Ok(None);
        }
        check_cancelled()?;
        if let Some(archive) = &self.score.image_archive {
            return self.load_archive(topology, archive).await.map(Some);
        }
        let started = Instant::now();
        tokio::select! {
            pulled = topology.pull_image(image) => pulled?,
            () = run::cancelled() => return Err(cancelled()),
        }
        Ok(Some(format!("pulled {image} in {:.1} s", started.elapsed().as_secs_f64())))
    }

    /// Fetches the archive (its digest checked by the store) and loads it;
    /// the image must then be present. Nothing is loaded from an archive
    /// whose digest is wrong.
    async fn load_archive<T: ContainerRuntime + ArtifactStore>(
        &self,
        topology: &T,
        archive: &ImageArchive,
    ) -> Result<String, InterpretError> {
        let image = &self.score.image;
        let fetched = tokio::select! {
            fetched = topology.fetch(&archive.artifact, &archive.sha256) => fetched?,
            () = run::cancelled() => return Err(cancelled()),
        };
        check_cancelled()?;
        let started = Instant::now();
        let loaded = tokio::select! {
            loaded = topology.load_image(&fetched.path) => loaded?,
            () = run::cancelled() => return Err(cancelled()),
        };
        if !topology.image_present(image).await? {
            return Err(InterpretError::new(format!(
                "artifact {} was loaded but holds {}, not {image}",
                archive.artifact,
                if loaded.is_empty() { "no named image".to_owned() } else { loaded.join(", ") }
            )));
        }
        Ok(format!(
            "{image} loaded from artifact {} ({fetched}; podman load {} ms)",
            archive.artifact,
            started.elapsed().as_millis()
        ))
    }

    async fn create<T: ContainerRuntime>(
        &self,
        topology: &T,
        spec: &ContainerSpec,
        what: &str,
        image_note: Option<String>,
    ) -> Result<Outcome, InterpretError> {
        let id = topology.create_and_start(spec).await?;
        let name = &self.score.name;
        let mut message =
            format!("{name} {what} (id {}, spec {})", short(&id), short(&self.score.spec_digest()));
        if let Some(note) = &image_note {
            message.push_str("; ");
            message.push_str(note);
        }
        Ok(Outcome::success_with_details(message, image_note.into_iter().collect()))
    }

    async fn present<T: ContainerRuntime + ArtifactStore>(
        &self,
        topology: &T,
    ) -> Result<Outcome, InterpretError> {
        let score = &self.score;
        let name = &score.name;
        let spec = score.container_spec(run::deployment().as_deref());
        let digest = &spec.labels[SPEC_LABEL];
        let grace = spec.stop_timeout;
        let current = topology.inspect_container(name).await?;
        check_cancelled()?;
        let Some(current) = current else {
            let pulled = self.ensure_image(topology).await?;
            check_cancelled()?;
            return self.create(topology, &spec, "created and started", pulled).await;
        };
        if !is_managed(&current) {
            return Err(InterpretError::new(format!(
                "a container named {name} exists that this agent did not create (no label {MANAGED_LABEL}=true); \
                 remove or rename it"
            )));
        }
        let same_spec = current.labels.get(SPEC_LABEL) == Some(digest);
        if same_spec && current.status == harmony_topology::ContainerStatus::Running {
            return Ok(Outcome::noop(format!("{name} running (spec {})", short(digest))));
        }
        if same_spec && current.status.is_startable() {
            topology.start(name).await?;
            return Ok(Outcome::success(format!(
                "{name} restarted (was {}, exit code {})",
                current.status, current.exit_code
            )));
        }
        let why =
            if same_spec { format!("it was {}", current.status) } else { "its spec changed".to_owned() };
        // What the new container needs first: a pull or a volume that fails
        // leaves the old container running.
        let pulled = self.ensure_image(topology).await?;
        topology.check_spec(&spec).await?;
        check_cancelled()?;
        topology.stop(name, grace).await?;
        topology.remove(name).await?;
        self.create(topology, &spec, &format!("recreated: {why}"), pulled).await
    }

    async fn absent<T: ContainerRuntime>(&self, topology: &T) -> Result<Outcome, InterpretError> {
        let name = &self.score.name;
        match topology.inspect_container(name).await? {
            None => Ok(Outcome::noop(format!("{name} already absent"))),
            Some(current) if !is_managed(&current) => Ok(Outcome::noop(format!(
                "{name} was not created by this agent (no label {MANAGED_LABEL}=true): left in place"
            ))),
            Some(_) => {
                check_cancelled()?;
                topology.stop(name, Duration::from_secs(self.score.stop_timeout_s)).await?;
                topology.remove(name).await?;
                Ok(Outcome::success(format!("{name} removed")))
            }
        }
    }
}

#[async_trait]
impl<T: Topology + ContainerRuntime + ArtifactStore> Interpret<T> for PodmanContainerInterpret {
    async fn execute(&self, _inventory: &Inventory, topology: &T) -> Result<Outcome, InterpretError> {
        // Validated at decode; checked again for Scores built in code.
        self.score.validate().map_err(|e| InterpretError::invalid_input(e.to_string()))?;
        check_cancelled()?;
        match self.score.state {
            PresenceState::Present => self.present(topology).await,
            PresenceState::Absent => self.absent(topology).await,
        }
    }

    fn get_name(&self) -> InterpretName {
        InterpretName::PodmanContainer
    }

    fn get_version(&self) -> Version {
        Version::from("1.0.0")
    }

    fn get_status(&self) -> InterpretStatus {
        InterpretStatus::QUEUED
    }

    fn get_children(&self) -> Vec<Id> {
        Vec::new()
    }
}

// A device Score must run on the device topology; this fails to compile if
// the generic impl above stops covering it.
const _: fn() = || {
    fn runs_on_device<S: Score<harmony_topology::LocalDeviceTopology>>() {}
    runs_on_device::<PodmanContainerScore>();
};

#[cfg(test)]
#[path = "container_tests.rs"]
mod tests;
