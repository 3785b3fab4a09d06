//! NATS bucket, key and subject names, in one place so both sides agree.

use crate::{DeploymentName, DeviceId};

/// KV bucket of desired state: key `<device>.<deployment>` → `DesiredState` (CBOR).
pub const DESIRED_STATE_BUCKET: &str = "harmony-desired-state";
/// KV bucket of agent status: key `<device>` → `AgentStatus` (CBOR).
pub const AGENT_STATUS_BUCKET: &str = "harmony-agent-status";
/// The reserved deployment-key suffix of a device's index of deployments.
pub const INDEX_SUFFIX: &str = "_index";

/// Object Store bucket of artifacts (container image archives), addressed
/// by name and sha256 from Scores: the operator writes, devices only read.
pub const ARTIFACTS_BUCKET: &str = "harmony-artifacts";
/// KV bucket of staged rollouts (the operators' own; no device reads it):
/// key `<deployment>` → the rollout's state, `<deployment>.doc.<sha256>` → the
/// document rolled out, `<deployment>.prev.<digest>` → a document devices
/// had before it (CBOR).
pub const ROLLOUTS_BUCKET: &str = "harmony-rollouts";

/// `OBJ_harmony-artifacts`: the stream behind [`ARTIFACTS_BUCKET`].
pub fn artifacts_stream() -> String {
    format!("OBJ_{ARTIFACTS_BUCKET}")
}

/// `$O.harmony-artifacts.M.>`: the subjects of the artifacts' metadata
/// (one message per object, `$O.<bucket>.M.<base64url(name)>`).
pub fn artifact_meta_subjects() -> String {
    format!("$O.{ARTIFACTS_BUCKET}.M.>")
}

/// `$O.harmony-artifacts.C.<nuid>`: the subject of one stored object's chunks.
pub fn artifact_chunk_subject(nuid: &str) -> String {
    format!("$O.{ARTIFACTS_BUCKET}.C.{nuid}")
}

/// `<device>.<deployment>`: the desired-state key of one deployment.
pub fn desired_state_key(device: &DeviceId, deployment: &DeploymentName) -> String {
    format!("{device}.{deployment}")
}

/// `<device>._index`: the key listing a device's deployments and their generations.
pub fn index_key(device: &DeviceId) -> String {
    format!("{device}.{INDEX_SUFFIX}")
}

/// `_keyset`: the fleet's one key-set key in the desired-state bucket
/// (the root-signed online keys, [`crate::KeySet`]). It cannot be a
/// device's key: device ids never start with `_`.
pub const KEYSET_KEY: &str = "_keyset";

/// `harmony.hint._keyset`: the subject a device follows the key set on.
pub fn keyset_hint_subject() -> String {
    format!("{HINT_PREFIX}.{KEYSET_KEY}")
}

/// `<device>`: the device's status key.
pub fn status_key(device: &DeviceId) -> String {
    device.to_string()
}

/// The last token of a device's heartbeat key in the status bucket.
pub const HEARTBEAT_KEY_SUFFIX: &str = "heartbeat";

/// `<device>.heartbeat` in bucket `harmony-agent-status`: the device's last
/// sign of life (CBOR milliseconds since the epoch), a few bytes written at
/// every heartbeat, so the status itself is written only when it changes.
pub fn heartbeat_key(device: &DeviceId) -> String {
    format!("{device}.{HEARTBEAT_KEY_SUFFIX}")
}

/// The device of a heartbeat key; `None` for any other key.
pub fn parse_heartbeat_key(key: &str) -> Option<DeviceId> {
    let device = key.strip_suffix(HEARTBEAT_KEY_SUFFIX)?.strip_suffix('.')?;
    DeviceId::new(device).ok()
}

/// `$KV.harmony-desired-state.<device>.>`: the subject a device follows its keys on.
pub fn desired_state_subjects(device: &DeviceId) -> String {
    format!("$KV.{DESIRED_STATE_BUCKET}.{device}.>")
}

/// The prefix the desired-state bucket republishes every write to, headers
/// only, after it is stored: `harmony.hint.<device>.<deployment>`.
pub const HINT_PREFIX: &str = "harmony.hint";

/// `$KV.harmony-desired-state.>`: the bucket subjects the republish takes.
pub fn hint_republish_source() -> String {
    format!("$KV.{DESIRED_STATE_BUCKET}.>")
}

/// `harmony.hint.>`: where the bucket republishes to.
pub fn hint_republish_destination() -> String {
    format!("{HINT_PREFIX}.>")
}

/// `harmony.hint.<device>.>`: the subject a device follows its keys on. The
/// republished copy carries `Nats-Sequence` (the stream sequence of the
/// write) and no reply subject.
pub fn hint_subjects(device: &DeviceId) -> String {
    format!("{HINT_PREFIX}.{device}.>")
}

/// The prefix the status bucket republishes every write to, headers only:
/// `harmony.status-hint.<device>`. An agent follows its own, so a status
/// written over its own by anyone else is noticed and written again.
pub const STATUS_HINT_PREFIX: &str = "harmony.status-hint";

/// `$KV.harmony-agent-status.>`: the status bucket subjects its republish takes.
pub fn status_hint_republish_source() -> String {
    format!("$KV.{AGENT_STATUS_BUCKET}.>")
}

/// `harmony.status-hint.>`: where the status bucket republishes to.
pub fn status_hint_republish_destination() -> String {
    format!("{STATUS_HINT_PREFIX}.>")
}

/// `harmony.status-hint.<device>`: the headers-only copy of each write of
/// the device's status (`Nats-Sequence`: the stream sequence of the write).
pub fn status_hint_subject(device: &DeviceId) -> String {
    format!("{STATUS_HINT_PREFIX}.{device}")
}

/// `device-commands.<device>.<verb>`: request/reply commands to one device.
pub fn command_subject(device: &DeviceId, verb: &str) -> String {
    format!("device-commands.{device}.{verb}")
}

/// The reply-subject prefix an agent answers commands on unless its
/// configuration says otherwise (`trusted_inbox_prefix`): the operator
/// tools' inboxes (async-nats' default prefix `_INBOX`) and the
/// command-only role's [`COMMANDER_INBOX_PREFIX`] both start with it;
/// device inboxes (`_INBOX_<device>`) do not.
pub const DEFAULT_TRUSTED_INBOX_PREFIX: &str = "_INBOX.";

/// The inbox prefix of the command-only principal (`commander`): beneath
/// [`DEFAULT_TRUSTED_INBOX_PREFIX`], so devices answer it, and a name of its
/// own, so its credentials can be confined to its own replies (an
/// async-nats inbox is `<prefix>.<22 random characters>`: the operator's
/// own inboxes never take the token `commander`).
pub const COMMANDER_INBOX_PREFIX: &str = "_INBOX.commander";

/// `_INBOX_<device>`: the inbox prefix a device's connection uses, so its
/// credentials can be confined to its own replies.
pub fn inbox_prefix(device: &DeviceId) -> String {
    format!("_INBOX_{device}")
}

/// `harmony.heartbeat.<device>`: the device's heartbeat subject.
pub fn heartbeat_subject(device: &DeviceId) -> String {
    format!("harmony.heartbeat.{device}")
}

/// `harmony.info.<device>`: where the device publishes its `DeviceInfo`.
pub fn info_subject(device: &DeviceId) -> String {
    format!("harmony.info.{device}")
}

/// Splits a desired-state key into device and deployment; `None` for keys of
/// another shape. The index key yields `Some((device, None))`.
pub fn parse_desired_state_key(key: &str) -> Option<(DeviceId, Option<DeploymentName>)> {
    let (device, rest) = key.split_once('.')?;
    let device = DeviceId::new(device).ok()?;
    if rest == INDEX_SUFFIX {
        return Some((device, None));
    }
    Some((device, Some(DeploymentName::new(rest).ok()?)))
}

/// Splits the `user:password@` off a NATS server URL: the URL without it,
/// and the credentials, so they travel through the client's auth options
/// and never reach a log in a URL. The userinfo ends at the *last* `@`, so
/// a password may hold `@`, `:` and `/`; a URL without a scheme is split too.
pub fn split_url_credentials(url: &str) -> (String, Option<(String, String)>) {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    // NATS server URLs have no path or query, so everything up to the
    // last '@' is userinfo (a password may hold '@' as written or as %40).
    let Some(at) = rest.rfind('@') else { return (url.to_owned(), None) };
    let (userinfo, host) = (&rest[..at], &rest[at + 1..]);
    if host.is_empty() {
        return (url.to_owned(), None);
    }
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let bare = match scheme {
        Some(scheme) => format!("{scheme}://{host}"),
        None => host.to_owned(),
    };
    (bare, Some((percent_decode(user), percent_decode(password))))
}

/// `%40` → `@` (URL userinfo escapes); anything else is kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| text.to_owned())
}

/// `nats://user:secret@host` → `nats://***@host`, for logs.
pub fn redact_userinfo(url: &str) -> String {
    match split_url_credentials(url) {
        (bare, Some(_)) => match bare.split_once("://") {
            Some((scheme, host)) => format!("{scheme}://***@{host}"),
            None => format!("***@{bare}"),
        },
        (bare, None) => bare,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // These literals are the contract with deployed agents and operator
    // tools: changing one is a wire break.
    #[test]
    fn names_are_locked() {
        let d = DeviceId::new("dev-1").unwrap();
        let n = DeploymentName::new("web").unwrap();
        assert_eq!(desired_state_key(&d, &n), "dev-1.web");
        assert_eq!(index_key(&d), "dev-1._index");
        assert_eq!(status_key(&d), "dev-1");
        assert_eq!(desired_state_subjects(&d), "$KV.harmony-desired-state.dev-1.>");
        assert_eq!(hint_subjects(&d), "harmony.hint.dev-1.>");
        assert_eq!(keyset_hint_subject(), "harmony.hint._keyset");
        assert_eq!(KEYSET_KEY, "_keyset");
        assert_eq!(hint_republish_source(), "$KV.harmony-desired-state.>");
        assert_eq!(hint_republish_destination(), "harmony.hint.>");
        assert_eq!(status_hint_subject(&d), "harmony.status-hint.dev-1");
        assert_eq!(heartbeat_key(&d), "dev-1.heartbeat");
        assert_eq!(parse_heartbeat_key("dev-1.heartbeat"), Some(d.clone()));
        for other in
            ["dev-1", "heartbeat", ".heartbeat", "dev-1.heartbeats", "a.b.heartbeat", "dev-1heartbeat"]
        {
            assert_eq!(parse_heartbeat_key(other), None, "{other}");
        }
        assert_eq!(status_hint_republish_source(), "$KV.harmony-agent-status.>");
        assert_eq!(status_hint_republish_destination(), "harmony.status-hint.>");
        assert_eq!(command_subject(&d, "ping"), "device-commands.dev-1.ping");
        assert_eq!(inbox_prefix(&d), "_INBOX_dev-1");
        assert_eq!(DEFAULT_TRUSTED_INBOX_PREFIX, "_INBOX.");
        assert!(format!("{COMMANDER_INBOX_PREFIX}.x").starts_with(DEFAULT_TRUSTED_INBOX_PREFIX));
        assert!(!format!("{}.x", inbox_prefix(&d)).starts_with(DEFAULT_TRUSTED_INBOX_PREFIX));
        assert_eq!(heartbeat_subject(&d), "harmony.heartbeat.dev-1");
        assert_eq!(info_subject(&d), "harmony.info.dev-1");
        assert_eq!(ARTIFACTS_BUCKET, "harmony-artifacts");
        assert_eq!(artifacts_stream(), "OBJ_harmony-artifacts");
        assert_eq!(artifact_meta_subjects(), "$O.harmony-artifacts.M.>");
        assert_eq!(artifact_chunk_subject("N1"), "$O.harmony-artifacts.C.N1");
        assert_eq!(parse_desired_state_key("dev-1.web"), Some((d.clone(), Some(n))));
        assert_eq!(parse_desired_state_key("dev-1._index"), Some((d, None)));
        assert_eq!(parse_desired_state_key("dev-1.a.b"), None);
        assert_eq!(parse_desired_state_key("nodot"), None);
    }

    #[test]
    fn url_credentials_are_redacted() {
        assert_eq!(redact_userinfo("nats://dev-1:s3cret@10.0.0.5:4222"), "nats://***@10.0.0.5:4222");
        assert_eq!(redact_userinfo("nats://10.0.0.5:4222"), "nats://10.0.0.5:4222");
        assert_eq!(redact_userinfo("10.0.0.5:4222"), "10.0.0.5:4222");
        // Issue 7 §1: a password holding `@`, and a URL without a scheme, leaked.
        assert_eq!(redact_userinfo("nats://dev-1:p@ss:w/rd@10.0.0.5:4222"), "nats://***@10.0.0.5:4222");
        assert_eq!(redact_userinfo("dev-1:s3cret@10.0.0.5:4222"), "***@10.0.0.5:4222");
        assert_eq!(
            split_url_credentials("nats://dev-1:p@ss:w/rd@h:1"),
            ("nats://h:1".to_owned(), Some(("dev-1".to_owned(), "p@ss:w/rd".to_owned())))
        );
        assert_eq!(split_url_credentials("h:1"), ("h:1".to_owned(), None));
        assert_eq!(
            split_url_credentials("nats://u:p%40ss%2Fx@h:1").1,
            Some(("u".to_owned(), "p@ss/x".to_owned()))
        );
    }
}
