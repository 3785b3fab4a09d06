//! The agent's configuration: an optional TOML file, overridden by command-line flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harmony_score_wire::names::split_url_credentials;
use harmony_score_wire::{DeviceId, Privilege};
use serde::Deserialize;

use crate::runner::Timeouts;

/// Where the agent reads desired state from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// NATS JetStream KV (the fleet path).
    Nats,
    /// A folder of documents (`*.cbor`, `*.json`), for air-gapped devices.
    Dir(PathBuf),
}

impl std::str::FromStr for Source {
    type Err = ConfigError;
    fn from_str(text: &str) -> Result<Self, ConfigError> {
        match text.split_once(':') {
            None if text == "nats" => Ok(Source::Nats),
            Some(("dir", path)) if !path.is_empty() => Ok(Source::Dir(PathBuf::from(path))),
            _ => Err(ConfigError::Invalid(format!("source {text:?} is neither \"nats\" nor \"dir:PATH\""))),
        }
    }
}

/// The agent's settings after the file and the flags are merged.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// This device's id.
    pub device_id: DeviceId,
    /// NATS server URLs, tried in turn, without credentials.
    pub nats_urls: Vec<String>,
    /// User and password taken out of the URLs (the first URL that had
    /// them), passed through the client's auth options only.
    pub nats_auth: Option<(String, String)>,
    /// NATS credentials file.
    pub creds: Option<PathBuf>,
    /// Where accepted desired state and ownership are persisted.
    pub state_dir: PathBuf,
    /// Directory every Score path is resolved under.
    pub root: PathBuf,
    /// The podman binary container Scores run (a path, or a name looked up in `PATH`).
    pub podman: PathBuf,
    /// Largest artifact (image archive) the device fetches; cached under
    /// `<state_dir>/artifacts`.
    pub max_artifact_bytes: u64,
    /// How often keys are re-read and everything re-reconciled.
    pub resync: Duration,
    /// How often the status heartbeat is written.
    pub heartbeat: Duration,
    /// Whether changes are followed live through the bucket's republished
    /// hints (`false`: only at connect and on the resync timer; for a
    /// bucket made without republish, and to test the fallback).
    pub follow_hints: bool,
    /// Where desired state comes from.
    pub source: Source,
    /// Labels published in the device info.
    pub labels: BTreeMap<String, String>,
    /// Most deployments running at once.
    pub max_parallel: usize,
    /// How long an Interpret may run, by default and per Score tag.
    pub timeouts: Timeouts,
    /// How long shutdown waits for runs to reach a Score boundary.
    pub shutdown_grace: Duration,
    /// Commands are answered only on reply subjects starting with this
    /// (the operator's inbox prefix); anything else could make the device
    /// write where its own credentials let it.
    pub trusted_inbox_prefix: String,
    /// What the device owner allows, whatever a document says.
    pub policy: DevicePolicy,
    /// The keys whose signatures this device accepts, and how many must sign.
    pub trust: harmony_score_wire::TrustedKeys,
    /// Accept bare (unsigned) documents. Off unless set: a warning at every start.
    pub allow_unsigned: bool,
    /// The offline root keys whose key sets ([`harmony_score_wire::KeySet`])
    /// this device accepts; empty: key sets are ignored and `trust` stays.
    pub root_keys: harmony_score_wire::TrustedKeys,
}

/// The device owner's limits on what documents may do here. A document
/// with a Score outside them is refused whole, before anything of it runs
/// (`policy_denied`), whoever wrote or signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePolicy {
    /// Score tags that may run; `None`: every tag this agent knows.
    pub allowed_tags: Option<std::collections::BTreeSet<String>>,
    /// Normalized absolute paths beneath which every file and directory a
    /// Score names must lie (after resolving symlinked parents); `/`: anywhere.
    pub allowed_paths: Vec<String>,
    /// Whether Scores may set setuid or setgid modes ([`Privilege::SetuidMode`]).
    pub allow_setuid: bool,
    /// Whether Scores may run privileged containers ([`Privilege::PrivilegedContainer`]).
    pub allow_privileged_containers: bool,
    /// Whether Scores may run containers in the host's network namespace ([`Privilege::HostNetwork`]).
    pub allow_host_network: bool,
    /// Whether Scores may install, run or remove system services ([`Privilege::SystemService`]).
    pub allow_system_services: bool,
    /// Whether Scores may install or remove packages ([`Privilege::PackageChange`]).
    pub allow_packages: bool,
}

impl Default for DevicePolicy {
    fn default() -> Self {
        Self {
            allowed_tags: None,
            allowed_paths: vec!["/".to_owned()],
            allow_setuid: false,
            allow_privileged_containers: false,
            allow_host_network: false,
            allow_system_services: false,
            allow_packages: false,
        }
    }
}

impl DevicePolicy {
    /// Whether `path` (normalized, absolute) lies beneath an allowed path.
    pub fn allows_path(&self, path: &str) -> bool {
        self.allowed_paths.iter().any(|prefix| {
            prefix == "/"
                || path == prefix
                || path.strip_prefix(prefix.as_str()).is_some_and(|rest| rest.starts_with('/'))
        })
    }

    /// Why `doc` has a Score this policy refuses by what the Score is: a
    /// tag it does not allow, or a privilege it does not grant. `None` when
    /// every Score passes. (Paths need the device's filesystem; they are
    /// judged beside this, by the controller.)
    pub fn refused_score(&self, doc: &harmony_score_wire::DesiredState) -> Option<String> {
        doc.scores.iter().enumerate().find_map(|(index, score)| {
            let tag = score.typetag_name();
            if !self.allows_tag(tag) {
                return Some(format!("score #{index} ({tag}) is not allowed by this device's policy"));
            }
            let privilege = score.privileges().into_iter().find(|p| !self.allows_privilege(*p))?;
            let setting = privilege_setting(privilege).map(|s| format!(" ({s} = false)")).unwrap_or_default();
            Some(format!(
                "score #{index} ({tag}) needs privilege {privilege}, which this device's policy does not allow{setting}"
            ))
        })
    }

    /// Whether Scores tagged `tag` may run.
    pub fn allows_tag(&self, tag: &str) -> bool {
        self.allowed_tags.as_ref().is_none_or(|tags| tags.contains(tag))
    }

    /// Whether Scores may use `privilege`. A privilege this agent does not
    /// know is never granted.
    pub fn allows_privilege(&self, privilege: Privilege) -> bool {
        match privilege {
            Privilege::SetuidMode => self.allow_setuid,
            Privilege::PrivilegedContainer => self.allow_privileged_containers,
            Privilege::HostNetwork => self.allow_host_network,
            Privilege::SystemService => self.allow_system_services,
            Privilege::PackageChange => self.allow_packages,
            _ => false,
        }
    }
}

impl DevicePolicy {
    /// The policy of an agent configuration file: its `[policy]` table
    /// resolved as the daemon resolves it (defaults when it has none); its
    /// other settings are parsed, not used.
    pub fn from_config_file(path: &Path) -> Result<Self, ConfigError> {
        resolve_policy(ConfigLayer::from_file(path)?.policy.unwrap_or_default())
    }
}

/// The `[policy]` setting that grants `privilege`.
fn privilege_setting(privilege: Privilege) -> Option<&'static str> {
    match privilege {
        Privilege::SetuidMode => Some("allow_setuid"),
        Privilege::PrivilegedContainer => Some("allow_privileged_containers"),
        Privilege::HostNetwork => Some("allow_host_network"),
        Privilege::SystemService => Some("allow_system_services"),
        Privilege::PackageChange => Some("allow_packages"),
        _ => None,
    }
}

/// The `[policy]` table of the configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyLayer {
    /// `allowed_tags = ["harmony.file/v1"]`.
    pub allowed_tags: Option<Vec<String>>,
    /// `allowed_paths = ["/etc/app", "/var/lib/app"]`.
    pub allowed_paths: Option<Vec<String>>,
    /// `allow_setuid = false`: setuid and setgid modes.
    pub allow_setuid: Option<bool>,
    /// `allow_privileged_containers = false`.
    pub allow_privileged_containers: Option<bool>,
    /// `allow_host_network = false`: containers in the host's network namespace.
    pub allow_host_network: Option<bool>,
    /// `allow_system_services = false`: systemd units (their commands run as root).
    pub allow_system_services: Option<bool>,
    /// `allow_packages = false`: package installs and removals.
    pub allow_packages: Option<bool>,
}

// Written by hand so a credentials path never gets more than its name in logs.
impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("device_id", &self.device_id)
            .field("nats_urls", &self.nats_urls)
            .field("nats_auth", &self.nats_auth.as_ref().map(|(user, _)| format!("{user}:***")))
            .field("creds", &self.creds.as_ref().map(|_| "<set>"))
            .field("state_dir", &self.state_dir)
            .field("root", &self.root)
            .field("podman", &self.podman)
            .field("max_artifact_bytes", &self.max_artifact_bytes)
            .field("resync", &self.resync)
            .field("follow_hints", &self.follow_hints)
            .field("source", &self.source)
            .field("max_parallel", &self.max_parallel)
            .field("timeouts", &self.timeouts)
            .field("allow_unsigned", &self.allow_unsigned)
            .field("root_keys", &self.root_keys)
            .finish_non_exhaustive()
    }
}

/// Every setting, each optional: the TOML file and the flags both fill one.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    /// `device_id = "dev-1"`.
    pub device_id: Option<String>,
    /// `nats = ["nats://a:4222", "nats://b:4222"]`.
    pub nats: Option<Vec<String>>,
    /// `creds = "/etc/harmony/device.creds"`.
    pub creds: Option<PathBuf>,
    /// `state_dir = "/var/lib/harmony-agent"`.
    pub state_dir: Option<PathBuf>,
    /// `root = "/"`.
    pub root: Option<PathBuf>,
    /// `podman = "/usr/bin/podman"` (default `podman`, from `PATH`).
    pub podman: Option<PathBuf>,
    /// `max_artifact_bytes = 2147483648`: the largest artifact fetched.
    pub max_artifact_bytes: Option<u64>,
    /// `resync_secs = 60`.
    pub resync_secs: Option<u64>,
    /// `heartbeat_secs = 30`.
    pub heartbeat_secs: Option<u64>,
    /// `follow_hints = true`: follow changes live (`false`: resync only).
    pub follow_hints: Option<bool>,
    /// `source = "nats"` or `"dir:/path"`.
    pub source: Option<String>,
    /// `[labels]` table.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `max_parallel = 4`: most deployments running at once.
    pub max_parallel: Option<usize>,
    /// `interpret_timeout_secs = 300`: the default limit of one Interpret.
    pub interpret_timeout_secs: Option<u64>,
    /// `[interpret_timeouts]` table: Score tag → seconds.
    #[serde(default)]
    pub interpret_timeouts: BTreeMap<String, u64>,
    /// `shutdown_grace_secs = 10`.
    pub shutdown_grace_secs: Option<u64>,
    /// `trusted_inbox_prefix = "_INBOX."`.
    pub trusted_inbox_prefix: Option<String>,
    /// `[policy]` table.
    pub policy: Option<PolicyLayer>,
    /// `trusted_keys = ["/etc/harmony/operator.pub"]`: public key files (64 hex digits).
    pub trusted_keys: Option<Vec<PathBuf>>,
    /// `signature_threshold = 1`.
    pub signature_threshold: Option<usize>,
    /// `allow_unsigned = false`.
    pub allow_unsigned: Option<bool>,
    /// `root_keys = ["/etc/harmony/root.pub"]`: the offline root keys that
    /// sign key sets.
    pub root_keys: Option<Vec<PathBuf>>,
    /// `root_threshold = 1`: how many root keys must sign a key set.
    pub root_threshold: Option<usize>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    ReadFailed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for the agent.
    #[error("invalid config {path}: {message}")]
    ParseFailed { path: PathBuf, message: String },
    /// A required setting is missing.
    #[error("missing setting: {0}")]
    Missing(&'static str),
    /// A setting has an invalid value.
    #[error("{0}")]
    Invalid(String),
}

impl ConfigLayer {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::ReadFailed { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::ParseFailed {
            path: path.to_owned(),
            message: e.to_string().replace('\n', " "),
        })
    }

    /// This layer with every setting `over` has replacing its own.
    #[must_use]
    pub fn overridden_by(mut self, over: ConfigLayer) -> Self {
        macro_rules! take {
            ($($field:ident),*) => { $( if over.$field.is_some() { self.$field = over.$field; } )* };
        }
        take!(
            device_id,
            nats,
            creds,
            state_dir,
            root,
            podman,
            max_artifact_bytes,
            resync_secs,
            heartbeat_secs,
            follow_hints,
            source,
            max_parallel,
            interpret_timeout_secs,
            shutdown_grace_secs,
            trusted_inbox_prefix,
            policy,
            trusted_keys,
            signature_threshold,
            allow_unsigned,
            root_keys,
            root_threshold
        );
        self.labels.extend(over.labels);
        self.interpret_timeouts.extend(over.interpret_timeouts);
        self
    }

    /// Validates and fills defaults.
    pub fn resolve(self) -> Result<AgentConfig, ConfigError> {
        let device_id = DeviceId::new(self.device_id.ok_or(ConfigError::Missing("device_id"))?)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let source = self.source.as_deref().unwrap_or("nats").parse()?;
        let nats_urls: Vec<String> = self
            .nats
            .unwrap_or_else(|| vec!["nats://127.0.0.1:4222".to_owned()])
            .iter()
            .flat_map(|u| u.split(','))
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        let mut nats_auth = None;
        let nats_urls: Vec<String> = nats_urls
            .iter()
            .map(|url| {
                let (bare, auth) = split_url_credentials(url);
                nats_auth = nats_auth.take().or(auth);
                bare
            })
            .collect();
        if nats_urls.is_empty() && source == Source::Nats {
            return Err(ConfigError::Missing("nats"));
        }
        // A year at most: a larger value is a typo, and Instant arithmetic
        // must not overflow.
        let secs = |v: Option<u64>, default: u64, name: &str| match v.unwrap_or(default) {
            0 => Err(ConfigError::Invalid(format!("{name} must be at least 1 second"))),
            s if s > 366 * 24 * 3600 => Err(ConfigError::Invalid(format!("{name} must be at most a year"))),
            s => Ok(Duration::from_secs(s)),
        };
        Ok(AgentConfig {
            device_id,
            nats_urls,
            nats_auth,
            creds: self.creds,
            state_dir: self.state_dir.ok_or(ConfigError::Missing("state_dir"))?,
            root: self.root.unwrap_or_else(|| PathBuf::from("/")),
            podman: self.podman.unwrap_or_else(|| PathBuf::from("podman")),
            max_artifact_bytes: match self.max_artifact_bytes {
                Some(0) => return Err(ConfigError::Invalid("max_artifact_bytes must be at least 1".into())),
                Some(max) => max,
                None => crate::artifacts::DEFAULT_MAX_ARTIFACT_BYTES,
            },
            resync: secs(self.resync_secs, 60, "resync_secs")?,
            heartbeat: secs(self.heartbeat_secs, 30, "heartbeat_secs")?,
            follow_hints: self.follow_hints.unwrap_or(true),
            source,
            labels: self.labels,
            max_parallel: match self.max_parallel.unwrap_or(4) {
                0 => return Err(ConfigError::Invalid("max_parallel must be at least 1".into())),
                n => n,
            },
            timeouts: Timeouts {
                default: secs(self.interpret_timeout_secs, 300, "interpret_timeout_secs")?,
                per_tag: self
                    .interpret_timeouts
                    .iter()
                    .map(|(tag, s)| {
                        Ok((tag.clone(), secs(Some(*s), 0, &format!("interpret_timeouts.{tag:?}"))?))
                    })
                    .collect::<Result<_, ConfigError>>()?,
            },
            shutdown_grace: secs(self.shutdown_grace_secs, 10, "shutdown_grace_secs")?,
            policy: resolve_policy(self.policy.unwrap_or_default())?,
            trust: load_trusted_keys(self.trusted_keys.unwrap_or_default(), self.signature_threshold)?,
            root_keys: load_keys(
                self.root_keys.unwrap_or_default(),
                self.root_threshold,
                "root key",
                "root_threshold",
            )?,
            allow_unsigned: self.allow_unsigned.unwrap_or(false),
            trusted_inbox_prefix: match self.trusted_inbox_prefix {
                // Ending in '.' so `_INBOX` cannot also match `_INBOX_<id>`.
                Some(prefix)
                    if !prefix.ends_with('.') || prefix.len() < 2 || prefix.contains(['*', '>', ' ']) =>
                {
                    return Err(ConfigError::Invalid(format!(
                        "trusted_inbox_prefix {prefix:?} is not a subject prefix"
                    )))
                }
                Some(prefix) => prefix,
                None => harmony_score_wire::names::DEFAULT_TRUSTED_INBOX_PREFIX.to_owned(),
            },
        })
    }
}

/// Loads the public key files a device trusts (`harmony.pub`: 64 hex
/// digits), one key counted once, and checks the threshold against them.
pub fn load_trusted_keys(
    files: Vec<PathBuf>,
    threshold: Option<usize>,
) -> Result<harmony_score_wire::TrustedKeys, ConfigError> {
    load_keys(files, threshold, "trusted key", "signature_threshold")
}

fn load_keys(
    files: Vec<PathBuf>,
    threshold: Option<usize>,
    what: &str,
    threshold_name: &str,
) -> Result<harmony_score_wire::TrustedKeys, ConfigError> {
    let keys = files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::ReadFailed { path: path.clone(), source })?;
            harmony_score_wire::parse_public_key(&text)
                .map_err(|e| ConfigError::Invalid(format!("{what} {}: {e}", path.display())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // One key listed twice is one signer: a threshold must not count it twice.
    let mut keys = keys;
    keys.sort_by_key(|k| k.to_bytes());
    keys.dedup();
    let threshold = threshold.unwrap_or(1);
    if threshold == 0 || (!keys.is_empty() && threshold > keys.len()) {
        return Err(ConfigError::Invalid(format!(
            "{threshold_name} {threshold} needs 1 to {} keys",
            keys.len()
        )));
    }
    Ok(harmony_score_wire::TrustedKeys::new(keys, threshold))
}

fn resolve_policy(layer: PolicyLayer) -> Result<DevicePolicy, ConfigError> {
    let allowed_paths = match layer.allowed_paths {
        None => vec!["/".to_owned()],
        Some(paths) if paths.is_empty() => {
            return Err(ConfigError::Invalid("policy.allowed_paths is empty: no Score could run".into()))
        }
        Some(paths) => paths
            .iter()
            .map(|p| {
                if p.trim_end_matches('/').is_empty() && p.starts_with('/') {
                    return Ok("/".to_owned());
                }
                harmony_score_wire::normalize_path(p)
                    .map_err(|e| ConfigError::Invalid(format!("policy.allowed_paths {p:?}: {e}")))
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(DevicePolicy {
        allowed_tags: layer.allowed_tags.map(|t| t.into_iter().collect()),
        allowed_paths,
        allow_setuid: layer.allow_setuid.unwrap_or(false),
        allow_privileged_containers: layer.allow_privileged_containers.unwrap_or(false),
        allow_host_network: layer.allow_host_network.unwrap_or(false),
        allow_system_services: layer.allow_system_services.unwrap_or(false),
        allow_packages: layer.allow_packages.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "device_id = \"dev-1\"\nnats = [\"nats://a:4222\"]\nstate_dir = \"/var/lib/h\"\nresync_secs = 5\n[labels]\nsite = \"x\"\n",
        )
        .unwrap();
        let flags = ConfigLayer {
            nats: Some(vec!["nats://b:1,nats://c:2".into()]),
            labels: [("rack".to_owned(), "7".to_owned())].into(),
            ..Default::default()
        };
        let config = ConfigLayer::from_file(&path).unwrap().overridden_by(flags).resolve().unwrap();
        assert_eq!(config.device_id.as_str(), "dev-1");
        assert_eq!(config.nats_urls, ["nats://b:1", "nats://c:2"]);
        assert_eq!(config.resync, Duration::from_secs(5));
        assert_eq!(config.heartbeat, Duration::from_secs(30));
        assert_eq!(config.root, PathBuf::from("/"));
        assert_eq!(config.source, Source::Nats);
        assert_eq!(config.labels.len(), 2);
        assert_eq!(config.max_parallel, 4);
        assert_eq!(config.timeouts.default, Duration::from_secs(300));
        assert_eq!(config.trusted_inbox_prefix, "_INBOX.");
        assert_eq!(config.max_artifact_bytes, 2 << 30);
    }

    #[test]
    fn runner_settings_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "device_id = \"d\"\nstate_dir = \"/s\"\nmax_parallel = 2\ninterpret_timeout_secs = 60\n[interpret_timeouts]\n\"harmony.file/v1\" = 5\n[policy]\nallowed_tags = [\"harmony.file/v1\"]\nallowed_paths = [\"/etc/app\"]\n",
        )
        .unwrap();
        let config = ConfigLayer::from_file(&path).unwrap().resolve().unwrap();
        assert_eq!(config.max_parallel, 2);
        assert_eq!(config.timeouts.default, Duration::from_secs(60));
        assert_eq!(config.timeouts.per_tag["harmony.file/v1"], Duration::from_secs(5));
        assert!(
            config.policy.allows_tag("harmony.file/v1") && !config.policy.allows_tag("harmony.directory/v1")
        );
        assert_eq!(config.policy.allowed_paths, ["/etc/app"]);
        let base = || ConfigLayer {
            device_id: Some("d".into()),
            state_dir: Some("/s".into()),
            ..Default::default()
        };
        assert!(ConfigLayer { max_parallel: Some(0), ..base() }.resolve().is_err());
        assert!(ConfigLayer { max_artifact_bytes: Some(0), ..base() }.resolve().is_err());
        let small = ConfigLayer { max_artifact_bytes: Some(1 << 20), ..base() }.resolve().unwrap();
        assert_eq!(small.max_artifact_bytes, 1 << 20);
        assert!(ConfigLayer { resync_secs: Some(u64::MAX), ..base() }.resolve().is_err());
        assert!(ConfigLayer { shutdown_grace_secs: Some(u64::MAX), ..base() }.resolve().is_err());
        assert!(ConfigLayer { trusted_inbox_prefix: Some(">".into()), ..base() }.resolve().is_err());
        assert!(ConfigLayer { trusted_inbox_prefix: Some("_INBOX".into()), ..base() }.resolve().is_err());
        assert!(ConfigLayer { trusted_inbox_prefix: Some("_OPS.".into()), ..base() }.resolve().is_ok());
        let policy = |paths: &[&str]| PolicyLayer {
            allowed_paths: Some(paths.iter().map(|p| (*p).to_owned()).collect()),
            ..Default::default()
        };
        assert!(ConfigLayer { policy: Some(policy(&[])), ..base() }.resolve().is_err());
        assert!(ConfigLayer { policy: Some(policy(&["etc"])), ..base() }.resolve().is_err());
        assert!(ConfigLayer { policy: Some(policy(&["/etc/../x"])), ..base() }.resolve().is_err());
        let config = ConfigLayer { policy: Some(policy(&["/etc//app/", "/"])), ..base() }.resolve().unwrap();
        assert_eq!(config.policy.allowed_paths, ["/etc/app", "/"]);
        let narrow = DevicePolicy { allowed_paths: vec!["/etc/app".into()], ..Default::default() };
        assert!(narrow.allows_path("/etc/app") && narrow.allows_path("/etc/app/x"));
        assert!(!narrow.allows_path("/etc/application") && !narrow.allows_path("/etc"));
    }

    #[test]
    fn privileges_are_off_unless_the_policy_grants_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "device_id = \"d\"\nstate_dir = \"/s\"\n").unwrap();
        let policy = ConfigLayer::from_file(&path).unwrap().resolve().unwrap().policy;
        assert_eq!(policy, DevicePolicy::default());
        for privilege in [Privilege::SetuidMode, Privilege::PrivilegedContainer, Privilege::HostNetwork] {
            assert!(!policy.allows_privilege(privilege), "{privilege}");
        }
        std::fs::write(
            &path,
            "device_id = \"d\"\nstate_dir = \"/s\"\n[policy]\nallow_setuid = true\nallow_host_network = true\n",
        )
        .unwrap();
        let policy = ConfigLayer::from_file(&path).unwrap().resolve().unwrap().policy;
        assert!(policy.allow_setuid && policy.allow_host_network && !policy.allow_privileged_containers);
        assert!(policy.allows_privilege(Privilege::SetuidMode));
        assert!(!policy.allows_privilege(Privilege::PrivilegedContainer));
        assert_eq!(DevicePolicy::from_config_file(&path).unwrap(), policy, "apply reads the same table");
        for bad in ["allow_setuid = \"yes\"", "allow_suid = true"] {
            std::fs::write(&path, format!("device_id = \"d\"\nstate_dir = \"/s\"\n[policy]\n{bad}\n"))
                .unwrap();
            assert!(matches!(ConfigLayer::from_file(&path), Err(ConfigError::ParseFailed { .. })), "{bad}");
        }
    }

    #[test]
    fn a_score_is_refused_for_its_tag_or_for_a_privilege_the_policy_does_not_grant() {
        harmony_scores::ensure_linked();
        let doc = |scores: serde_json::Value| -> harmony_score_wire::DesiredState {
            serde_json::from_value(serde_json::json!({"device_id": "d", "deployment": "web", "generation": 1,
                "scores": scores}))
            .unwrap()
        };
        let setuid = doc(serde_json::json!([
            {"type": "harmony.file/v1", "path": "/a", "mode": 0o644},
            {"type": "harmony.file/v1", "path": "/b", "mode": 0o4755},
        ]));
        let message = DevicePolicy::default().refused_score(&setuid).unwrap();
        assert_eq!(
            message,
            "score #1 (harmony.file/v1) needs privilege setuid_mode, which this device's policy does not allow (allow_setuid = false)"
        );
        let allowing = DevicePolicy { allow_setuid: true, ..Default::default() };
        assert_eq!(allowing.refused_score(&setuid), None);
        let narrow =
            DevicePolicy { allowed_tags: Some(["harmony.directory/v1".to_owned()].into()), ..allowing };
        assert!(narrow.refused_score(&setuid).unwrap().contains("score #0 (harmony.file/v1) is not allowed"));
    }

    #[test]
    fn credentials_in_urls_never_reach_debug_output() {
        let config = ConfigLayer {
            device_id: Some("d".into()),
            state_dir: Some("/s".into()),
            nats: Some(vec!["nats://u:s3cret@h:1".into()]),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert!(!format!("{config:?}").contains("s3cret"));
        assert_eq!(config.nats_urls, ["nats://h:1"]);
        assert_eq!(config.nats_auth, Some(("u".to_owned(), "s3cret".to_owned())));
    }

    #[test]
    fn bad_settings_are_named() {
        let bad_id = ConfigLayer {
            device_id: Some("Dev_1".into()),
            state_dir: Some("/s".into()),
            ..Default::default()
        };
        assert!(matches!(bad_id.resolve(), Err(ConfigError::Invalid(m)) if m.contains("device id")));
        let no_state = ConfigLayer { device_id: Some("d".into()), ..Default::default() };
        assert!(matches!(no_state.resolve(), Err(ConfigError::Missing("state_dir"))));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "device_idd = \"x\"\n").unwrap();
        assert!(matches!(ConfigLayer::from_file(&path), Err(ConfigError::ParseFailed { .. })));
        assert_eq!("dir:/srv/docs".parse::<Source>().unwrap(), Source::Dir("/srv/docs".into()));
        assert!("http://x".parse::<Source>().is_err());
    }
}
