//! Text from outside the process made safe to print and log: control characters escaped, length bounded.
//!
//! Document fields, key names, NATS subjects, peers' error messages and
//! tool output reach logs and statuses. Unescaped, a newline in one of them
//! forges a log line and an ANSI escape rewrites an operator's terminal.
//! This is the one escaping rule: the wire crate re-exports both functions.

/// Longest log field [`log_text`] keeps.
pub const MAX_LOG_FIELD_BYTES: usize = 1024;

/// `text` with control characters escaped (`\u{1b}`, `\n`) and cut to at
/// most `max` bytes on a character boundary, ending in `…` when cut.
pub fn bounded_text(text: &str, max: usize) -> String {
    const ELLIPSIS: &str = "…";
    let mut out = String::with_capacity(text.len().min(max + 8));
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > max {
            break;
        }
    }
    if out.len() <= max {
        return out;
    }
    let mut cut = max.saturating_sub(ELLIPSIS.len());
    while !out.is_char_boundary(cut) {
        cut -= 1;
    }
    out.truncate(cut);
    if max >= ELLIPSIS.len() {
        out.push_str(ELLIPSIS);
    }
    out
}

/// Whether [`bounded_text`] would leave `text` as it is (at most `max`
/// bytes, no control character).
pub fn is_bounded(text: &str, max: usize) -> bool {
    text.len() <= max && !text.chars().any(char::is_control)
}

/// `text` made [`bounded_text`] in place, copied only when that changes it.
pub fn bound_in_place(text: &mut String, max: usize) {
    if !is_bounded(text, max) {
        *text = bounded_text(text, max);
    }
}

/// A log field's text: `value` displayed, then made one safe line by
/// [`bounded_text`] (at most [`MAX_LOG_FIELD_BYTES`]). Use it for every
/// field that carries text from outside the process — an error that may
/// quote a document, a key name, a subject, a path from a folder:
/// `warn!(key = %log_text(&key), cause = %log_text(&err), "…")`.
pub fn log_text(value: impl std::fmt::Display) -> String {
    bounded_text(&value.to_string(), MAX_LOG_FIELD_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_field_is_one_line_without_escapes_and_bounded() {
        let forged = "bad\n2026-01-01T00:00:00Z  INFO forged\r\u{1b}[31m\u{9b}";
        let field = log_text(forged);
        assert!(!field.chars().any(char::is_control), "{field:?}");
        assert_eq!(field, "bad\\n2026-01-01T00:00:00Z  INFO forged\\r\\u{1b}[31m\\u{9b}");
        assert!(log_text("x".repeat(5000)).len() <= MAX_LOG_FIELD_BYTES);
        let err = std::io::Error::other("quoted \"a\nb\"");
        assert_eq!(log_text(&err), "quoted \"a\\nb\"");
    }

    // The shortcut agrees with the rule: left alone exactly when
    // `bounded_text` would not change it.
    #[test]
    fn bounding_in_place_changes_exactly_what_bounded_text_changes() {
        for text in
            ["plain", "a\nb", "\u{1b}[2J", "\u{9b}", "é".repeat(300).as_str(), "x".repeat(512).as_str()]
        {
            let mut owned = text.to_owned();
            bound_in_place(&mut owned, 512);
            assert_eq!(owned, bounded_text(text, 512), "{text:?}");
            assert_eq!(is_bounded(text, 512), bounded_text(text, 512) == text, "{text:?}");
        }
    }
}
