//! Checks every Score runs at decode, before anything of its document runs.

use crate::normalize_path;

/// Why a Score's fields are not valid: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {field}: {message}")]
pub struct ScoreValidationError {
    /// The field at fault (`path`, `mode`, `ports[2]`).
    pub field: String,
    /// What is wrong, in one line.
    pub message: String,
}

impl ScoreValidationError {
    /// An error naming `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// Permission bits a Score may ask for without a device policy: `rwx` for
/// all three and the sticky bit. Setuid and setgid are refused.
pub const ALLOWED_MODE_BITS: u32 = 0o1777;

/// `value` is an absolute path that normalizes (no `..`, no control
/// characters, not the root, within `PATH_MAX`).
pub fn check_path(field: &str, value: &str) -> Result<(), ScoreValidationError> {
    normalize_path(value).map(drop).map_err(|err| ScoreValidationError::new(field, err.to_string()))
}

/// `mode`, when set, holds only [`ALLOWED_MODE_BITS`].
pub fn check_mode(field: &str, mode: Option<u32>) -> Result<(), ScoreValidationError> {
    match mode {
        Some(m) if m & 0o6000 != 0 && m <= 0o7777 => Err(ScoreValidationError::new(
            field,
            format!("mode {m:04o} sets setuid or setgid, which no device policy allows"),
        )),
        Some(m) if m & !ALLOWED_MODE_BITS != 0 => {
            Err(ScoreValidationError::new(field, format!("{m} ({m:o} octal) is not a permission mode")))
        }
        _ => Ok(()),
    }
}

/// `value` is 1 to `max` bytes without control characters.
pub fn check_text(field: &str, value: &str, max: usize) -> Result<(), ScoreValidationError> {
    if value.is_empty() || value.len() > max {
        return Err(ScoreValidationError::new(field, format!("must be 1 to {max} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(ScoreValidationError::new(field, "holds a control character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_permission_bits_without_setuid_or_setgid() {
        for ok in [None, Some(0), Some(0o644), Some(0o1777)] {
            assert!(check_mode("mode", ok).is_ok(), "{ok:?}");
        }
        for bad in [0o4755, 0o2755, 0o6777, 0o10000, u32::MAX] {
            let err = check_mode("mode", Some(bad)).unwrap_err();
            assert_eq!(err.field, "mode");
        }
        assert!(check_mode("mode", Some(0o4755)).unwrap_err().message.contains("setuid"));
    }

    #[test]
    fn paths_and_text_name_their_field() {
        assert!(check_path("path", "/etc//motd").is_ok());
        assert_eq!(check_path("path", "/etc/../x").unwrap_err().field, "path");
        assert!(check_text("name", "web", 10).is_ok());
        assert!(check_text("name", "", 10).is_err());
        assert!(check_text("name", "a\tb", 10).is_err());
        assert!(check_text("name", "abcdefghijk", 10).is_err());
    }
}
