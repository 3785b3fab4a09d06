//! Checks every Score runs at decode, before anything of its document runs.

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

/// The bits a mode may hold: `rwx` for all three, the sticky bit, setuid
/// and setgid. A mode with setuid or setgid is valid, and its Score must
/// declare [`Privilege::SetuidMode`](crate::Privilege::SetuidMode) (see
/// [`mode_privilege`](crate::mode_privilege)): whether it runs is the
/// device policy's decision (`allow_setuid`), not the document's.
pub const ALLOWED_MODE_BITS: u32 = 0o7777;

/// `value` is an absolute path that normalizes (no `..`, no control
/// characters, not the root, within `PATH_MAX`).
pub fn check_path(field: &str, value: &str) -> Result<(), ScoreValidationError> {
    crate::resource::check_normalizable(value)
        .map_err(|err| ScoreValidationError::new(field, err.to_string()))
}

/// `mode`, when set, holds only [`ALLOWED_MODE_BITS`].
pub fn check_mode(field: &str, mode: Option<u32>) -> Result<(), ScoreValidationError> {
    match mode {
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
    if has_control(value) {
        return Err(ScoreValidationError::new(field, "holds a control character"));
    }
    Ok(())
}

/// Longest container name (podman allows more; a device needs no more).
pub const MAX_CONTAINER_NAME_BYTES: usize = 128;

/// `name` can name a container: 1 to [`MAX_CONTAINER_NAME_BYTES`] of
/// `[A-Za-z0-9_.-]`, starting with a letter or digit (so it is never read
/// as a flag).
pub fn check_container_name(field: &str, name: &str) -> Result<(), ScoreValidationError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok
        || name.len() > MAX_CONTAINER_NAME_BYTES
        || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(ScoreValidationError::new(
            field,
            format!(
                "{:?} is not 1 to {MAX_CONTAINER_NAME_BYTES} of [A-Za-z0-9_.-], starting with a letter or digit",
                crate::bounded_text(name, 64)
            ),
        ));
    }
    Ok(())
}

/// Longest artifact name.
pub const MAX_ARTIFACT_NAME_BYTES: usize = 128;

/// `name` can name an artifact (an object of the artifacts bucket, and a
/// file name on devices): 1 to [`MAX_ARTIFACT_NAME_BYTES`] of
/// `[A-Za-z0-9._-]`, starting with a letter or digit, not ending in `.`.
pub fn check_artifact_name(field: &str, name: &str) -> Result<(), ScoreValidationError> {
    let ok = name.len() <= MAX_ARTIFACT_NAME_BYTES
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && !name.ends_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        let shown = crate::bounded_text(name, 64);
        return Err(ScoreValidationError::new(
            field,
            format!(
                "{shown:?} is not 1 to {MAX_ARTIFACT_NAME_BYTES} of [A-Za-z0-9._-], starting with a letter or digit, not ending in '.'"
            ),
        ));
    }
    Ok(())
}

/// `digest` is a sha256 as 64 lowercase hex digits (as `sha256sum` prints it).
pub fn check_sha256_hex(field: &str, digest: &str) -> Result<(), ScoreValidationError> {
    if digest.len() != 64 || !digest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(ScoreValidationError::new(
            field,
            format!("{:?} is not a sha256: 64 lowercase hex digits", crate::bounded_text(digest, 80)),
        ));
    }
    Ok(())
}

/// Whether `text` holds a control character (`char::is_control`: C0, DEL
/// and C1). Checked on every path and name of every Score decoded: ASCII
/// text, the usual case, is checked byte by byte without decoding chars.
pub(crate) fn has_control(text: &str) -> bool {
    if text.is_ascii() {
        text.bytes().any(|b| b < 0x20 || b == 0x7f)
    } else {
        text.chars().any(char::is_control)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ascii_fast_path_finds_the_control_characters_char_is_control_finds() {
        // Control characters are all below U+00A0; past it, a sample.
        for c in (0..0x800).chain([0x2028, 0xfeff, 0x10ffff]).filter_map(char::from_u32) {
            for text in [format!("/etc/{c}"), format!("{c}é")] {
                assert_eq!(has_control(&text), c.is_control(), "{c:?} in {text:?}");
            }
        }
    }

    // Setuid and setgid used to be refused here, for every device. They are
    // valid modes now: the Score declares Privilege::SetuidMode and the
    // device's policy decides (issue 7 §5). Only bits beyond 0o7777 are invalid.
    #[test]
    fn modes_are_the_twelve_permission_bits_and_setuid_is_a_privilege_not_an_error() {
        for ok in [None, Some(0), Some(0o644), Some(0o1777), Some(0o4755), Some(0o2755), Some(0o7777)] {
            assert!(check_mode("mode", ok).is_ok(), "{ok:?}");
        }
        for bad in [0o10000, 0o14755, u32::MAX] {
            let err = check_mode("mode", Some(bad)).unwrap_err();
            assert_eq!(err.field, "mode");
            assert!(err.message.contains("not a permission mode"), "{}", err.message);
        }
        assert_eq!(crate::mode_privilege(Some(0o4755)), Some(crate::Privilege::SetuidMode));
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

    #[test]
    fn artifact_names_and_digests_are_file_name_safe() {
        for ok in ["busybox.tar", "a", "web-1.2_x.tar.gz", &"a".repeat(128)] {
            check_artifact_name("artifact", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", ".tar", "-x", "a/b", "a.", "..", "a b", "a\nb", "é", &"a".repeat(129), "a:b"] {
            assert_eq!(check_artifact_name("artifact", bad).unwrap_err().field, "artifact", "{bad:?}");
        }
        check_sha256_hex("sha256", &"0a".repeat(32)).unwrap();
        for bad in ["", &"A".repeat(64), &"a".repeat(63), &"a".repeat(65), &"g".repeat(64)] {
            assert!(check_sha256_hex("sha256", bad).is_err(), "{bad:?}");
        }
    }
}
