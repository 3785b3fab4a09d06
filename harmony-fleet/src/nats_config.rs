//! Generated per-device NATS authorization: a nats-server configuration with one user per device, an operator, and optionally a read-only monitor and a command-only role.
//!
//! Each device may read only its own keys (hints and direct gets), write
//! only its own status key, publish only its own info and heartbeat, and
//! answer its own commands. It cannot write desired state (not even its
//! own), list keys, create consumers or see another device's hints. See
//! `../shared/NATS-SECURITY.md` for why each line is there.
//!
//! Artifacts are the fleet's, not a device's: every device may read every
//! object of the artifacts bucket (its metadata by name, its chunks by
//! sequence), with direct gets only, and write none.
//!
//! The monitor reads (statuses, desired state, rollouts, stream info,
//! heartbeats, device info, hints) and writes nothing. The commander sends
//! `device-commands.<id>.<verb>` requests and reads their replies, nothing
//! else. Neither may answer anything (`allow_responses` is the device's
//! alone).

use std::io::Read;

use harmony_score_wire::names::{
    artifact_meta_subjects, artifacts_stream, hint_subjects, inbox_prefix, keyset_hint_subject,
    status_hint_subject, AGENT_STATUS_BUCKET, COMMANDER_INBOX_PREFIX, DESIRED_STATE_BUCKET,
    HEARTBEAT_KEY_SUFFIX, HINT_PREFIX, KEYSET_KEY, ROLLOUTS_BUCKET, STATUS_HINT_PREFIX,
};
use harmony_score_wire::DeviceId;

/// The user name of the operator.
pub const OPERATOR_USER: &str = "operator";
/// The user name of the read-only monitor.
pub const MONITOR_USER: &str = "monitor";
/// The user name of the command-only role.
pub const COMMANDER_USER: &str = "commander";
/// User names no device may take: a device named `monitor` would also share
/// the monitor's inbox prefix (`_INBOX_monitor`).
pub const RESERVED_USERS: [&str; 3] = [OPERATOR_USER, MONITOR_USER, COMMANDER_USER];

/// The monitor's inbox prefix. Not under the devices' trusted prefix
/// (`_INBOX.`): a monitor sends no commands, so no device ever answers it.
pub const MONITOR_INBOX_PREFIX: &str = "_INBOX_monitor";

/// One principal's credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Principal {
    /// The NATS user name (the device id, `operator`, `monitor` or `commander`).
    pub user: String,
    /// Its password (48 hex digits from the OS's random source).
    pub password: String,
}

// Written by hand: a password never reaches a log.
impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal").field("user", &self.user).field("password", &"***").finish()
    }
}

impl Principal {
    /// `scheme://user:password@host:port` for `server` (`host:port`, taken
    /// as `nats://`, or with its own scheme, which is kept: `tls://` stays TLS).
    pub fn url(&self, server: &str) -> String {
        let (scheme, host) = server.split_once("://").unwrap_or(("nats", server));
        format!("{scheme}://{}:{}@{host}", self.user, self.password)
    }
}

/// A generated authorization: the server configuration and every credential in it.
#[derive(Clone)]
pub struct NatsAuthConfig {
    /// The nats-server configuration (an `accounts` block with JetStream
    /// enabled for the account; the server itself runs with `-js` or a
    /// `jetstream` block).
    pub server_conf: String,
    /// The operator: full access to the account.
    pub operator: Principal,
    /// One per device, in the order given.
    pub devices: Vec<(DeviceId, Principal)>,
    /// The read-only monitor, when asked for (connects with the inbox
    /// prefix [`MONITOR_INBOX_PREFIX`]).
    pub monitor: Option<Principal>,
    /// The command-only role, when asked for (connects with the inbox
    /// prefix [`COMMANDER_INBOX_PREFIX`]).
    pub commander: Option<Principal>,
}

/// Which optional principals to generate besides the operator and the devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Roles {
    /// A read-only `monitor` user.
    pub monitor: bool,
    /// A command-only `commander` user.
    pub commander: bool,
}

impl std::fmt::Debug for NatsAuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAuthConfig")
            .field("operator", &self.operator)
            .field("devices", &self.devices)
            .field("monitor", &self.monitor)
            .field("commander", &self.commander)
            .finish_non_exhaustive()
    }
}

/// Generates the configuration for `devices` and an operator, with fresh passwords.
pub fn generate(devices: &[DeviceId]) -> std::io::Result<NatsAuthConfig> {
    generate_with(devices, Roles::default())
}

/// Generates the configuration for `devices`, an operator and the optional
/// `roles`, with fresh passwords. Device ids must not be [`RESERVED_USERS`].
pub fn generate_with(devices: &[DeviceId], roles: Roles) -> std::io::Result<NatsAuthConfig> {
    let principal =
        |user: &str| Ok::<_, std::io::Error>(Principal { user: user.into(), password: random_password()? });
    let operator = principal(OPERATOR_USER)?;
    let devices = devices
        .iter()
        .map(|d| Ok((d.clone(), principal(d.as_str())?)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let monitor = roles.monitor.then(|| principal(MONITOR_USER)).transpose()?;
    let commander = roles.commander.then(|| principal(COMMANDER_USER)).transpose()?;
    let operator_user = format!("{{ user: \"{OPERATOR_USER}\", password: \"{}\" }}", operator.password);
    let device_users: Vec<String> = devices.iter().map(|(id, p)| device_user(id, &p.password)).collect();
    let server_conf = format!(
        "# Generated by harmony-fleet nats-config: one user per device, one operator{}{}.\n{}",
        if monitor.is_some() { ", a read-only monitor" } else { "" },
        if commander.is_some() { ", a command-only commander" } else { "" },
        accounts(
            &operator_user,
            &device_users,
            monitor.as_ref().map(|p| monitor_user(&p.password)).as_deref(),
            commander.as_ref().map(|p| commander_user(&p.password)).as_deref(),
        )
    );
    Ok(NatsAuthConfig { server_conf, operator, devices, monitor, commander })
}

/// The account holding the buckets (JetStream) and the operator.
pub const FLEET_ACCOUNT: &str = "FLEET";
/// The account of every device.
pub const DEVICES_ACCOUNT: &str = "DEVICES";
/// The account of the read-only monitor.
pub const MONITOR_ACCOUNT: &str = "MONITOR";
/// The account of the command-only commander.
pub const COMMANDER_ACCOUNT: &str = "COMMANDER";

/// The reply prefix of requests that reach a device through a service
/// import (nats-server's `_R_.…`): what a device of the generated
/// configuration answers (`trusted_inbox_prefix`).
pub const IMPORTED_REPLY_PREFIX: &str = "_R_.";

/// The `accounts { … }` block: the buckets and the operator in
/// [`FLEET_ACCOUNT`], devices, the monitor and the commander each in an
/// account of their own that reaches FLEET only through imports.
///
/// Why accounts: the server answers a request on whatever reply subject it
/// names, whoever may publish there. A principal in FLEET allowed only to
/// read could name a bucket's subject as the reply of a direct get, a
/// stream info or a status write, and the server itself would write the
/// answer into that key (an empty value over another device's document, a
/// copied delete or purge marker deleting it). Across a service import the
/// reply is the server's own `_R_.…` subject and the answer goes back to
/// the requester's account, where no stream listens. What each principal
/// may ask is still its user permissions.
fn accounts(operator: &str, devices: &[String], monitor: Option<&str>, commander: Option<&str>) -> String {
    let with = |base: &str, extra: &[(bool, &str)]| {
        let mut names = vec![base.to_owned()];
        names.extend(extra.iter().filter(|(on, _)| *on).map(|(_, n)| (*n).to_owned()));
        names.join(", ")
    };
    let (m, c) = (monitor.is_some(), commander.is_some());
    let readers = with(DEVICES_ACCOUNT, &[(m, MONITOR_ACCOUNT)]);
    let fleet_exports = [
        // The whole API as one service: an account without JetStream that
        // does not import `$JS.API.>` has every API request answered with
        // "JetStream not enabled for account". Streamed answers (batched
        // direct gets) need the `stream` response type.
        format!("{{ service: \"$JS.API.>\", response_type: stream, accounts: [{readers}] }}"),
        format!("{{ service: \"$KV.{AGENT_STATUS_BUCKET}.>\", accounts: [{DEVICES_ACCOUNT}] }}"),
        format!("{{ stream: \"{HINT_PREFIX}.>\", accounts: [{readers}] }}"),
        format!("{{ stream: \"{STATUS_HINT_PREFIX}.>\", accounts: [{DEVICES_ACCOUNT}] }}"),
    ];
    let fleet_imports = [
        format!("{{ stream: {{ account: {DEVICES_ACCOUNT}, subject: \"harmony.heartbeat.*\" }} }}"),
        format!("{{ stream: {{ account: {DEVICES_ACCOUNT}, subject: \"harmony.info.*\" }} }}"),
        format!("{{ service: {{ account: {DEVICES_ACCOUNT}, subject: \"device-commands.>\" }} }}"),
    ];
    let device_imports = [
        format!("{{ service: {{ account: {FLEET_ACCOUNT}, subject: \"$JS.API.>\" }} }}"),
        format!("{{ service: {{ account: {FLEET_ACCOUNT}, subject: \"$KV.{AGENT_STATUS_BUCKET}.>\" }} }}"),
        format!("{{ stream: {{ account: {FLEET_ACCOUNT}, subject: \"{HINT_PREFIX}.>\" }} }}"),
        format!("{{ stream: {{ account: {FLEET_ACCOUNT}, subject: \"{STATUS_HINT_PREFIX}.>\" }} }}"),
    ];
    let telemetry_readers = with(FLEET_ACCOUNT, &[(m, MONITOR_ACCOUNT)]);
    let device_exports = [
        format!("{{ stream: \"harmony.heartbeat.*\", accounts: [{telemetry_readers}] }}"),
        format!("{{ stream: \"harmony.info.*\", accounts: [{telemetry_readers}] }}"),
        format!(
            "{{ service: \"device-commands.>\", accounts: [{}] }}",
            with(FLEET_ACCOUNT, &[(c, COMMANDER_ACCOUNT)])
        ),
    ];
    let list = |items: &[String]| items.join(",\n      ");
    let mut text = format!(
        "accounts {{\n  {FLEET_ACCOUNT} {{\n    jetstream: enabled\n    users: [\n      {operator}\n    ]\n    \
         exports: [\n      {}\n    ]\n    imports: [\n      {}\n    ]\n  }}\n  \
         {DEVICES_ACCOUNT} {{\n    users: [\n      {}\n    ]\n    exports: [\n      {}\n    ]\n    \
         imports: [\n      {}\n    ]\n  }}\n",
        list(&fleet_exports),
        list(&fleet_imports),
        list(devices),
        list(&device_exports),
        list(&device_imports),
    );
    if let Some(monitor) = monitor {
        let imports = [
            format!("{{ service: {{ account: {FLEET_ACCOUNT}, subject: \"$JS.API.>\" }} }}"),
            format!("{{ stream: {{ account: {FLEET_ACCOUNT}, subject: \"{HINT_PREFIX}.>\" }} }}"),
            format!("{{ stream: {{ account: {DEVICES_ACCOUNT}, subject: \"harmony.heartbeat.*\" }} }}"),
            format!("{{ stream: {{ account: {DEVICES_ACCOUNT}, subject: \"harmony.info.*\" }} }}"),
        ];
        text.push_str(&format!(
            "  {MONITOR_ACCOUNT} {{\n    users: [\n      {monitor}\n    ]\n    imports: [\n      {}\n    ]\n  }}\n",
            list(&imports)
        ));
    }
    if let Some(commander) = commander {
        let import =
            format!("{{ service: {{ account: {DEVICES_ACCOUNT}, subject: \"device-commands.>\" }} }}");
        text.push_str(&format!(
            "  {COMMANDER_ACCOUNT} {{\n    users: [\n      {commander}\n    ]\n    imports: [\n      {import}\n    ]\n  }}\n"
        ));
    }
    text.push_str("}\n");
    text
}

/// The user block of one device: exactly what its agent needs.
pub fn device_user(id: &DeviceId, password: &str) -> String {
    let desired = format!("KV_{DESIRED_STATE_BUCKET}");
    let status = format!("KV_{AGENT_STATUS_BUCKET}");
    let artifacts = artifacts_stream();
    // Artifacts: the metadata of an object by its subject (a direct get of
    // the last message), and its chunks by "next message on the chunk
    // subject from sequence N", a request whose subject cannot name the
    // chunks: it reaches every message of this one stream, read-only. No
    // consumer: one could be told to push any message anywhere.
    format!(
        r#"{{ user: "{id}", password: "{password}", permissions: {{
        publish: {{ allow: [
          "$JS.API.DIRECT.GET.{desired}.$KV.{DESIRED_STATE_BUCKET}.{id}.>",
          "$JS.API.DIRECT.GET.{desired}.$KV.{DESIRED_STATE_BUCKET}.{KEYSET_KEY}",
          "$JS.API.DIRECT.GET.{status}.$KV.{AGENT_STATUS_BUCKET}.{id}",
          "$JS.API.DIRECT.GET.{artifacts}",
          "$JS.API.DIRECT.GET.{artifacts}.{artifact_meta}",
          "$KV.{AGENT_STATUS_BUCKET}.{id}",
          "$KV.{AGENT_STATUS_BUCKET}.{id}.{HEARTBEAT_KEY_SUFFIX}",
          "harmony.heartbeat.{id}",
          "harmony.info.{id}"
        ] }},
        subscribe: {{ allow: [
          "{hints}",
          "{keyset_hint}",
          "{status_hint}",
          "{inbox}.>",
          "device-commands.{id}.>"
        ] }},
        allow_responses: {{ max: 1 }}
      }} }}"#,
        hints = hint_subjects(id),
        inbox = inbox_prefix(id),
        keyset_hint = keyset_hint_subject(),
        status_hint = status_hint_subject(id),
        artifact_meta = artifact_meta_subjects(),
    )
}

/// The user block of the read-only monitor: stream info and direct gets of
/// the desired-state, status and rollouts buckets (every key, no consumer;
/// one key by its subject, or many in one batched request by the body
/// form), and subscriptions to heartbeats, device info and hints. No KV or
/// stream write, no consumer, no command, no response.
pub fn monitor_user(password: &str) -> String {
    let desired = format!("KV_{DESIRED_STATE_BUCKET}");
    let status = format!("KV_{AGENT_STATUS_BUCKET}");
    let rollouts = format!("KV_{ROLLOUTS_BUCKET}");
    format!(
        r#"{{ user: "{MONITOR_USER}", password: "{password}", permissions: {{
        publish: {{ allow: [
          "$JS.API.STREAM.INFO.{desired}",
          "$JS.API.STREAM.INFO.{status}",
          "$JS.API.STREAM.INFO.{rollouts}",
          "$JS.API.DIRECT.GET.{desired}",
          "$JS.API.DIRECT.GET.{desired}.>",
          "$JS.API.DIRECT.GET.{status}",
          "$JS.API.DIRECT.GET.{status}.>",
          "$JS.API.DIRECT.GET.{rollouts}",
          "$JS.API.DIRECT.GET.{rollouts}.>"
        ] }},
        subscribe: {{ allow: [
          "{MONITOR_INBOX_PREFIX}.>",
          "harmony.heartbeat.*",
          "harmony.info.*",
          "{HINT_PREFIX}.>"
        ] }}
      }} }}"#
    )
}

/// The user block of the command-only role: requests on
/// `device-commands.<id>.<verb>` and their replies under its own inbox
/// prefix, which devices answer (it lies beneath their trusted prefix) and
/// no one else's inbox shares. Nothing of either bucket.
pub fn commander_user(password: &str) -> String {
    format!(
        r#"{{ user: "{COMMANDER_USER}", password: "{password}", permissions: {{
        publish: {{ allow: [ "device-commands.*.*" ] }},
        subscribe: {{ allow: [ "{COMMANDER_INBOX_PREFIX}.>" ] }}
      }} }}"#
    )
}

fn random_password() -> std::io::Result<String> {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_gets_its_own_user_with_its_own_subjects_and_passwords_differ() {
        let devices = [DeviceId::new("dev-1").unwrap(), DeviceId::new("dev-2").unwrap()];
        let config = generate(&devices).unwrap();
        assert_eq!(config.devices.len(), 2);
        assert_ne!(config.devices[0].1.password, config.devices[1].1.password);
        assert_eq!(config.devices[0].1.password.len(), 48);
        assert!(config.server_conf.contains("\"harmony.hint.dev-1.>\""));
        assert!(config.server_conf.contains("\"_INBOX_dev-2.>\""));
        // Artifacts: read with direct gets, on the artifacts stream only.
        assert!(config.server_conf.contains("\"$JS.API.DIRECT.GET.OBJ_harmony-artifacts\""));
        assert!(config
            .server_conf
            .contains("\"$JS.API.DIRECT.GET.OBJ_harmony-artifacts.$O.harmony-artifacts.M.>\""));
        assert!(
            !config.server_conf.contains("$O.harmony-artifacts.C")
                && !config.server_conf.contains("CONSUMER")
        );
        assert!(!format!("{config:?}").contains(&config.operator.password), "Debug hides passwords");
        assert!(config.monitor.is_none() && config.commander.is_none());
        assert!(!config.server_conf.contains("monitor") && !config.server_conf.contains("commander"));
        assert!(config.operator.url("tls://h:4222").starts_with("tls://operator:"), "the scheme is kept");
        assert_eq!(
            config.devices[0].1.url("127.0.0.1:4222"),
            format!("nats://dev-1:{}@127.0.0.1:4222", config.devices[0].1.password)
        );
    }

    #[test]
    fn roles_get_their_own_users_and_inboxes() {
        let devices = [DeviceId::new("dev-1").unwrap()];
        let config = generate_with(&devices, Roles { monitor: true, commander: true }).unwrap();
        let (monitor, commander) = (config.monitor.clone().unwrap(), config.commander.clone().unwrap());
        assert_eq!((monitor.user.as_str(), commander.user.as_str()), ("monitor", "commander"));
        assert_ne!(monitor.password, commander.password);
        assert!(config.server_conf.contains(&format!("password: \"{}\"", monitor.password)));
        assert!(config.server_conf.contains("\"_INBOX_monitor.>\""));
        assert!(config.server_conf.contains("\"_INBOX.commander.>\""));
        assert!(!format!("{config:?}").contains(&commander.password));
        // The commander's replies come from devices, which answer only
        // beneath their trusted prefix; the monitor's never do.
        let trusted = harmony_score_wire::names::DEFAULT_TRUSTED_INBOX_PREFIX;
        assert!(format!("{COMMANDER_INBOX_PREFIX}.x").starts_with(trusted));
        assert!(!format!("{MONITOR_INBOX_PREFIX}.x").starts_with(trusted));
        assert!(
            !monitor_user("p").contains("allow_responses")
                && !commander_user("p").contains("allow_responses")
        );
        assert!(!monitor_user("p").contains("$KV.") && !monitor_user("p").contains("device-commands"));
        assert!(generate_with(&devices, Roles { monitor: true, commander: false })
            .unwrap()
            .commander
            .is_none());
    }

    // Only the operator shares the buckets' account: any other principal
    // there could have the server answer into a bucket (docs/security.md).
    #[test]
    fn only_the_operator_is_a_user_of_the_buckets_account() {
        let devices = [DeviceId::new("dev-1").unwrap(), DeviceId::new("dev-2").unwrap()];
        for roles in [Roles::default(), Roles { monitor: true, commander: true }] {
            let config = generate_with(&devices, roles).unwrap();
            let conf = &config.server_conf;
            let block = |name: &str| {
                let start =
                    conf.find(&format!("  {name} {{")).unwrap_or_else(|| panic!("no {name}:\n{conf}"));
                let end = conf[start + 3..].find("\n  }\n").map_or(conf.len(), |e| start + 3 + e);
                &conf[start..end]
            };
            let fleet = block(FLEET_ACCOUNT);
            assert!(fleet.contains("jetstream: enabled") && fleet.contains(&config.operator.password));
            assert_eq!(fleet.matches("password:").count(), 1, "{fleet}");
            let devices_block = block(DEVICES_ACCOUNT);
            assert!(!devices_block.contains("jetstream"), "{devices_block}");
            for (_, principal) in &config.devices {
                assert!(devices_block.contains(&principal.password));
            }
            if let Some(monitor) = &config.monitor {
                assert!(block(MONITOR_ACCOUNT).contains(&monitor.password));
            }
            if let Some(commander) = &config.commander {
                assert!(block(COMMANDER_ACCOUNT).contains(&commander.password));
            }
        }
    }
}
