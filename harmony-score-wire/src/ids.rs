//! Validated names: `DeviceId` and `DeploymentName`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a device id or deployment name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct IdError {
    what: &'static str,
    value: String,
    reason: &'static str,
}

impl IdError {
    /// The refused value is echoed bounded and escaped: it came from outside.
    fn new(what: &'static str, value: &str, reason: &'static str) -> Self {
        Self { what, value: crate::bounded_text(value, 80), reason }
    }
}

/// A device's id: an RFC 1123 label (1–63 of `a-z`, `0-9`, `-`, neither
/// starting nor ending with `-`). It becomes a NATS subject token and a file
/// name, so nothing else is allowed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    /// Validates `value` as a device id.
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        let fail = |reason| Err(IdError::new("device id", &value, reason));
        if value.is_empty() || value.len() > 63 {
            return fail("must be 1 to 63 characters");
        }
        if !value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return fail("only a-z, 0-9 and '-' are allowed");
        }
        if value.starts_with('-') || value.ends_with('-') {
            return fail("must not start or end with '-'");
        }
        Ok(Self(value))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A deployment's name, unique per device: 1–200 bytes of ASCII letters,
/// digits, `-` and `_`, not starting with `_` (names starting with `_` are
/// reserved for the agent's own keys, such as the per-device index).
///
/// Harmony itself only forbids `.`, wildcards and whitespace and allows 253
/// bytes; this is narrower because the name is also a NATS KV key token and
/// the agent's state file names (`<name>.state`, and the name a corrupt
/// record is kept under) must fit within `NAME_MAX` (255).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeploymentName(String);

impl DeploymentName {
    /// Longest name, in bytes.
    pub const MAX_LEN: usize = 200;

    /// Validates `value` as a deployment name.
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        let fail = |reason| Err(IdError::new("deployment name", &value, reason));
        if value.is_empty() || value.len() > Self::MAX_LEN {
            return fail("must be 1 to 200 bytes");
        }
        if !value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return fail("only letters, digits, '-' and '_' are allowed (no '.', '*', '>' or whitespace)");
        }
        if value.starts_with('_') {
            return fail("names starting with '_' are reserved");
        }
        Ok(Self(value))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype {
    ($name:ident) => {
        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }
        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }
        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(value: &str) -> Result<Self, IdError> {
                Self::new(value)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
string_newtype!(DeviceId);
string_newtype!(DeploymentName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_follow_rfc1123_labels() {
        for ok in ["a", "dev-1", "0abc", &"x".repeat(63)] {
            assert!(DeviceId::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Dev", "a.b", "a_b", "a*", "a>", "a b", &"x".repeat(64)] {
            assert!(DeviceId::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deployment_names_refuse_subject_syntax_and_reserved_names() {
        for ok in ["motd", "Web_App-2", &"x".repeat(200)] {
            assert!(DeploymentName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a.b", "a*", "a>", "a b", "a\tb", "_index", "a/b", &"x".repeat(201)] {
            assert!(DeploymentName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_runs_on_deserialize() {
        let err = serde_json::from_str::<DeviceId>("\"Bad_Id\"").unwrap_err();
        assert!(err.to_string().contains("invalid device id"), "{err}");
        assert!(serde_json::from_str::<DeploymentName>("\"a.b\"").is_err());
        assert_eq!(serde_json::from_str::<DeviceId>("\"dev-1\"").unwrap().as_str(), "dev-1");
    }
}
