//! The CBOR codec for `DesiredState`, bounded in everything it reads.

use crate::registry::{lookup, Lookup};
use crate::{DeploymentName, DesiredState, DeviceId, DeviceScore, ErrorKind, FORMAT_VERSION};

/// Longest unknown tag a [`DecodeError::UnknownScoreTags`] repeats.
const MAX_TAG_ECHO: usize = 128;

/// Bounds on what [`decode`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest document, in bytes.
    pub max_bytes: usize,
    /// Most Scores in one document.
    pub max_scores: usize,
    /// Deepest nesting of arrays and maps.
    pub max_depth: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_bytes: 1024 * 1024, max_scores: 1024, max_depth: 32 }
    }
}

impl DecodeLimits {
    /// The same limits with another size bound.
    #[must_use]
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }
}

/// Why a document was rejected. Nothing of a rejected document is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Larger than [`DecodeLimits::max_bytes`].
    #[error("document is {size} bytes, more than the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    /// The bytes end in the middle of a value.
    #[error("document is truncated")]
    Truncated,
    /// Not well-formed CBOR or JSON, or not shaped like a document.
    #[error("malformed document: {message}")]
    Malformed { message: String },
    /// Nested deeper than [`DecodeLimits::max_depth`].
    #[error("document nests deeper than {limit} levels")]
    TooDeep { limit: usize },
    /// More Scores than [`DecodeLimits::max_scores`].
    #[error("document has {count} scores, more than the limit of {limit}")]
    TooManyScores { count: usize, limit: usize },
    /// Score tags this binary does not know; the whole document is refused.
    /// Each is escaped and cut to 128 bytes (it came from outside).
    #[error("unknown score tags: {}", tags.join(", "))]
    UnknownScoreTags { tags: Vec<String> },
    /// The `device_id` is not an RFC 1123 label.
    #[error("{message}")]
    InvalidDeviceId { message: String },
    /// The `deployment` name is not valid.
    #[error("{message}")]
    InvalidDeploymentName { message: String },
    /// A document format this binary does not read.
    #[error("unsupported document format {format} (this binary reads {FORMAT_VERSION})")]
    UnsupportedFormat { format: u64 },
    /// Two Scores of the document own the same resource.
    #[error("two scores own {resource}")]
    DuplicateResource { resource: String },
    /// A Score whose tag is known but whose fields are not valid (or do not
    /// deserialize); `field` names the field when known.
    #[error("score #{index} ({tag}): {}{message}", field.as_deref().map(|f| format!("field {f}: ")).unwrap_or_default())]
    InvalidScore { index: usize, tag: String, field: Option<String>, message: String },
    /// A health check that does not decode (an unknown `type`, a missing
    /// field) or is not valid (a host that is not loopback, a bad digest, a
    /// deadline out of bounds); `index` counts the document's own checks
    /// first, then its Scores'; `source` says which (`document`, a Score's name).
    #[error("health check #{index} ({source_name}): {}{message}", field.as_deref().map(|f| format!("field {f}: ")).unwrap_or_default())]
    InvalidHealthCheck { index: usize, source_name: String, field: Option<String>, message: String },
}

impl DecodeError {
    /// The error's kind, as status reports carry it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DecodeError::TooLarge { .. } => ErrorKind::TooLarge,
            DecodeError::Truncated => ErrorKind::Truncated,
            DecodeError::Malformed { .. } => ErrorKind::Malformed,
            DecodeError::TooDeep { .. } => ErrorKind::TooDeep,
            DecodeError::TooManyScores { .. } => ErrorKind::TooManyScores,
            DecodeError::UnknownScoreTags { .. } => ErrorKind::UnknownScoreTags,
            DecodeError::InvalidDeviceId { .. } => ErrorKind::InvalidDeviceId,
            DecodeError::InvalidDeploymentName { .. } => ErrorKind::InvalidDeploymentName,
            DecodeError::UnsupportedFormat { .. } => ErrorKind::UnsupportedFormat,
            DecodeError::InvalidScore { .. } => ErrorKind::InvalidScore,
            DecodeError::DuplicateResource { .. } => ErrorKind::DuplicateResource,
            DecodeError::InvalidHealthCheck { .. } => ErrorKind::InvalidHealthCheck,
        }
    }

    fn malformed(message: impl std::fmt::Display) -> Self {
        DecodeError::Malformed { message: one_line(&message.to_string()) }
    }
}

/// Why a document could not be encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A Score failed to serialize.
    #[error("cannot serialize document: {0}")]
    SerializeFailed(String),
    /// The document would be refused by a device with default limits.
    #[error("encoded document would be rejected: {0}")]
    WouldBeRejected(#[source] DecodeError),
}

/// Encodes a document as CBOR, refusing one that a device with default
/// [`DecodeLimits`] would reject for its size, its Score count, an invalid
/// Score ([`DeviceScore::validate`]) or two Scores owning one resource.
pub fn encode(doc: &DesiredState) -> Result<Vec<u8>, EncodeError> {
    let limits = DecodeLimits::default();
    if doc.scores.len() > limits.max_scores {
        return Err(EncodeError::WouldBeRejected(DecodeError::TooManyScores {
            count: doc.scores.len(),
            limit: limits.max_scores,
        }));
    }
    check_scores(&doc.scores).map_err(EncodeError::WouldBeRejected)?;
    check_health(doc).map_err(EncodeError::WouldBeRejected)?;
    let mut bytes = Vec::new();
    ciborium::into_writer(doc, &mut bytes)
        .map_err(|e| EncodeError::SerializeFailed(one_line(&e.to_string())))?;
    if bytes.len() > limits.max_bytes {
        return Err(EncodeError::WouldBeRejected(DecodeError::TooLarge {
            size: bytes.len(),
            limit: limits.max_bytes,
        }));
    }
    Ok(bytes)
}

/// Validates every Score and refuses two owning one resource (after
/// normalization, so aliases collide). Run at decode and at encode.
pub fn check_scores(scores: &[Box<dyn DeviceScore>]) -> Result<(), DecodeError> {
    for (index, score) in scores.iter().enumerate() {
        score.validate().map_err(|err| DecodeError::InvalidScore {
            index,
            tag: score.typetag_name().to_owned(),
            field: Some(crate::bounded_text(&err.field, 128)),
            message: crate::bounded_text(&err.message, crate::MAX_MESSAGE_BYTES),
        })?;
    }
    let mut resources = std::collections::HashSet::with_capacity(scores.len());
    for score in scores {
        if let Some(resource) = resources.replace(score.resource()) {
            return Err(DecodeError::DuplicateResource { resource: resource.to_string() });
        }
    }
    Ok(())
}

/// Validates a document's verification settings: its checks and its
/// Scores' (see [`DesiredState::health_plan`]), and the deadline. Run at
/// decode and at encode.
pub fn check_health(doc: &DesiredState) -> Result<(), DecodeError> {
    doc.health_plan().map(drop).map_err(|err| DecodeError::InvalidHealthCheck {
        index: err.index,
        source_name: err.source_name,
        field: Some(crate::bounded_text(&err.error.field, 128)),
        message: crate::bounded_text(&err.error.message, crate::MAX_MESSAGE_BYTES),
    })
}

/// The JSON form of a document (the serde form of the same types).
pub fn to_json_pretty(doc: &DesiredState) -> Result<String, EncodeError> {
    serde_json::to_string_pretty(doc).map_err(|e| EncodeError::SerializeFailed(one_line(&e.to_string())))
}

/// Decodes a CBOR document within `limits`.
///
/// The bytes are walked once without building anything ([`crate::scan`]):
/// well-formed, within the depth limit, the fields checked below, every
/// Score's tag known. Only then does serde read them, straight into the
/// typed document, so a document's memory is its bytes and its Scores,
/// never a generic value tree (a junk array of a million items costs
/// nothing more than its bytes). Each Score is read by its own type's
/// decoder, chosen by the tag the walk found, not through typetag's
/// erased dispatch (see [`crate::ScoreDecoder`]).
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<DesiredState, DecodeError> {
    check_size(bytes, limits)?;
    decode_checked_size(bytes, limits, TypedPass::PerTag)
}

/// [`decode`] with its typed pass through serde and typetag, as it was
/// before each Score got its own decoder: same checks, same errors, about
/// 1.6 times slower. Kept as the reference that tests and the fuzz target
/// hold [`decode`] to; not for use.
#[doc(hidden)]
pub fn decode_via_typetag(bytes: &[u8], limits: &DecodeLimits) -> Result<DesiredState, DecodeError> {
    check_size(bytes, limits)?;
    decode_checked_size(bytes, limits, TypedPass::Typetag)
}

/// Decodes the JSON form of a document within `limits`, with the same checks
/// as [`decode`]: the text is transcoded to CBOR as it is parsed (no value
/// tree either), then decoded as CBOR.
pub fn decode_json(bytes: &[u8], limits: &DecodeLimits) -> Result<DesiredState, DecodeError> {
    check_size(bytes, limits)?;
    let cbor = crate::json::to_cbor(bytes).map_err(|err| {
        if err.is_eof() {
            DecodeError::Truncated
        } else if err.to_string().contains("recursion limit") {
            DecodeError::TooDeep { limit: limits.max_depth }
        } else {
            DecodeError::malformed(err)
        }
    })?;
    // The size bound applies to the text the operator wrote; its CBOR may be
    // a little larger (a float is 9 bytes) and is bounded by the text.
    decode_checked_size(&cbor, limits, TypedPass::PerTag)
}

/// Checks the document's shape, ids and tags before building Scores, so
/// that errors name what is wrong rather than where serde stopped.
fn decode_checked_size(
    bytes: &[u8],
    limits: &DecodeLimits,
    typed: TypedPass,
) -> Result<DesiredState, DecodeError> {
    let outline = crate::scan::outline(bytes, limits.max_depth, limits.max_scores)?;
    if !outline.is_map {
        return Err(DecodeError::malformed("a document is a map"));
    }
    match outline.format {
        None => {}
        Some(Some(f)) if f == u64::from(FORMAT_VERSION) => {}
        Some(Some(f)) => return Err(DecodeError::UnsupportedFormat { format: f }),
        Some(None) => return Err(DecodeError::malformed("format is not an unsigned integer")),
    }
    let Some(Some(id)) = &outline.device_id else {
        return Err(DecodeError::malformed("device_id is missing or not text"));
    };
    DeviceId::new(id.as_ref()).map_err(|e| DecodeError::InvalidDeviceId { message: e.to_string() })?;
    let Some(Some(name)) = &outline.deployment else {
        return Err(DecodeError::malformed("deployment is missing or not text"));
    };
    DeploymentName::new(name.as_ref())
        .map_err(|e| DecodeError::InvalidDeploymentName { message: e.to_string() })?;
    let Some(scores) = outline.scores else {
        return Err(DecodeError::malformed("scores is missing or not an array"));
    };
    if scores.count > limits.max_scores {
        return Err(DecodeError::TooManyScores { count: scores.count, limit: limits.max_scores });
    }
    let mut tags = Vec::with_capacity(scores.items.len());
    for (index, score) in scores.items.iter().enumerate() {
        let tag = score.tag.as_deref().ok_or_else(|| DecodeError::Malformed {
            message: format!("score #{index} has no text \"type\""),
        })?;
        tags.push(tag);
    }
    // Each tag looked up once; a document's Scores share a few tags, often
    // in runs.
    let mut found = Vec::with_capacity(tags.len());
    for (index, tag) in tags.iter().enumerate() {
        let hit = match index.checked_sub(1) {
            Some(before) if tags[before] == *tag => found[before],
            _ => lookup(tag),
        };
        found.push(hit);
    }
    // An unknown tag is text from outside: echoed bounded and escaped.
    let mut unknown: Vec<String> = tags
        .iter()
        .zip(&found)
        .filter(|(_, hit)| matches!(hit, Lookup::Unknown))
        .map(|(tag, _)| crate::bounded_text(tag, MAX_TAG_ECHO))
        .collect();
    if !unknown.is_empty() {
        unknown.sort();
        unknown.dedup();
        return Err(DecodeError::UnknownScoreTags { tags: unknown });
    }
    let reordered = crate::scan::with_tags_first(bytes, &scores.items);
    let bytes = reordered.as_deref().unwrap_or(bytes);
    let doc = match typed {
        TypedPass::PerTag => per_tag(bytes, &scores, &tags, &found, limits),
        TypedPass::Typetag => through_typetag(bytes, &scores, &tags, limits),
    }
    .map_err(|err| match err {
        // A Score at fault is named as it is.
        DecodeError::InvalidScore { .. } | DecodeError::UnknownScoreTags { .. } => err,
        // Otherwise a check that does not decode is named, rather than
        // where serde stopped in the document.
        other => outline
            .health
            .as_ref()
            .and_then(|span| decode_checks(&bytes[span.clone()], limits).err())
            .unwrap_or(other),
    })?;
    check_scores(&doc.scores)?;
    check_health(&doc)?;
    Ok(doc)
}

/// How the checked bytes become a typed document.
#[derive(Debug, Clone, Copy)]
enum TypedPass {
    /// Each Score by its tag's registered decoder, the rest of the
    /// document by serde from a copy without the Scores.
    PerTag,
    /// The whole document through serde and typetag (the reference).
    Typetag,
}

/// Each Score decoded from its own bytes by the decoder its tag registered
/// ([`crate::ScoreDecoder`], no erased dispatch), in order, so that the
/// first Score at fault is named; then the document's other fields.
fn per_tag(
    bytes: &[u8],
    scores: &crate::scan::ScoreList<'_>,
    tags: &[&str],
    found: &[Lookup],
    limits: &DecodeLimits,
) -> Result<DesiredState, DecodeError> {
    let mut reader = crate::tagged::ScoreReader::new(limits.max_depth + 1);
    let mut decoded = Vec::with_capacity(scores.items.len());
    for (index, ((score, tag), hit)) in scores.items.iter().zip(tags).zip(found).enumerate() {
        let invalid = |message: String| DecodeError::InvalidScore {
            index,
            tag: tag.to_string(),
            field: None,
            message: one_line(&message),
        };
        let decoder = match *hit {
            Lookup::One(decoder) => decoder,
            // typetag's words for a tag two types registered.
            Lookup::Ambiguous => return Err(invalid(format!("non-unique tag of dyn DeviceScore: {tag:?}"))),
            // Refused above: every tag is registered.
            Lookup::Unknown => {
                return Err(DecodeError::UnknownScoreTags {
                    tags: vec![crate::bounded_text(tag, MAX_TAG_ECHO)],
                })
            }
        };
        match decoder.decode(&bytes[score.span.clone()], &mut reader) {
            Ok(Some(score)) => decoded.push(score),
            // Its `Deserialize` stopped short of the Score's end (ciborium
            // leaves the value of a unit variant written as a map unread):
            // read in one pass, the rest of the document would have been
            // read out of step. Such a document is read the old way, so it
            // is refused (or not) exactly as before.
            Ok(None) => return through_typetag(bytes, scores, tags, limits),
            Err(err) => return Err(invalid(as_typetag_said(err))),
        }
    }
    // The other fields are read by serde as ever, from a copy of the
    // document whose `scores` is an empty array (a few dozen bytes).
    let span = &scores.span;
    let mut header = Vec::with_capacity(bytes.len() - span.len() + 1);
    header.extend_from_slice(&bytes[..span.start]);
    header.push(0x80);
    header.extend_from_slice(&bytes[span.end..]);
    let mut rest = header.as_slice();
    let mut doc: DesiredState =
        ciborium::de::from_reader_with_recursion_limit(&mut rest, limits.max_depth + 1).map_err(|err| {
            // An offset names a byte of the document, not of the copy.
            let original = |at: usize| if at > span.start { at + span.len() - 1 } else { at };
            cbor_error(moved(err, original), limits)
        })?;
    if !rest.is_empty() {
        return through_typetag(bytes, scores, tags, limits);
    }
    doc.scores = decoded;
    Ok(doc)
}

/// The document through serde and typetag in one pass; on an error, each
/// Score alone, to name the one at fault. The reference the per-tag pass
/// is tested against.
fn through_typetag(
    bytes: &[u8],
    scores: &crate::scan::ScoreList<'_>,
    tags: &[&str],
    limits: &DecodeLimits,
) -> Result<DesiredState, DecodeError> {
    // ciborium counts recursion per container; the same bound as the walk.
    ciborium::de::from_reader_with_recursion_limit(bytes, limits.max_depth + 1).map_err(|err| {
        for (index, (score, tag)) in scores.items.iter().zip(tags).enumerate() {
            let one = &bytes[score.span.clone()];
            let decoded = ciborium::de::from_reader_with_recursion_limit::<Box<dyn DeviceScore>, _>(
                one,
                limits.max_depth + 1,
            );
            if let Err(err) = decoded {
                let message = one_line(&cbor_error_text(&err));
                return DecodeError::InvalidScore { index, tag: tag.to_string(), field: None, message };
            }
        }
        cbor_error(err, limits)
    })
}

/// The message of a Score's decode error as it read when typetag passed it
/// on: erased-serde kept ciborium's `Debug` form of it, so control
/// characters in it (from the bytes: an unknown variant's name) come out
/// escaped as `Debug` escapes them.
fn as_typetag_said(err: ciborium::de::Error<std::io::Error>) -> String {
    cbor_error_text(&ciborium::de::Error::Semantic(None, err.to_string()))
}

/// `err` with its byte offset, if any, passed through `original`.
fn moved(
    err: ciborium::de::Error<std::io::Error>,
    original: impl Fn(usize) -> usize,
) -> ciborium::de::Error<std::io::Error> {
    use ciborium::de::Error;
    match err {
        Error::Syntax(at) => Error::Syntax(original(at)),
        Error::Semantic(Some(at), msg) => Error::Semantic(Some(original(at)), msg),
        other => other,
    }
}

/// Decodes a `health` value alone, check by check, so that the one that
/// does not decode is named (`health check #1 (document): unknown variant
/// `exec`, …`) instead of where serde stopped in the document.
fn decode_checks(bytes: &[u8], limits: &DecodeLimits) -> Result<(), DecodeError> {
    use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};
    use std::cell::Cell;
    thread_local! {
        /// Which check the last decode stopped at (ciborium takes no seed,
        /// and the reader is unusable after a failed element).
        static FAILED_AT: Cell<usize> = const { Cell::new(0) };
    }
    struct Checks;
    impl<'de> Deserialize<'de> for Checks {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_seq(ChecksVisitor)
        }
    }
    struct ChecksVisitor;
    impl<'de> Visitor<'de> for ChecksVisitor {
        type Value = Checks;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of health checks")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checks, A::Error> {
            let mut index = 0;
            FAILED_AT.set(0);
            while seq.next_element::<crate::Check>().inspect_err(|_| FAILED_AT.set(index))?.is_some() {
                index += 1;
            }
            Ok(Checks)
        }
    }
    ciborium::de::from_reader_with_recursion_limit::<Checks, _>(bytes, limits.max_depth + 1)
        .map(drop)
        .map_err(|err| DecodeError::InvalidHealthCheck {
            index: FAILED_AT.get(),
            source_name: "document".into(),
            field: None,
            message: one_line(&cbor_error_text(&err)),
        })
}

/// The `generation` of a document that may not decode (or its signed
/// envelope), so that a rejection can still say which generation it
/// refused. `None` when it cannot be read.
pub fn peek_generation(bytes: &[u8], limits: &DecodeLimits) -> Option<u64> {
    // Only the field asked for is kept: the rest (every Score) is skipped
    // as it is read, not built into a value tree.
    #[derive(serde::Deserialize)]
    struct Header {
        generation: u64,
    }
    if crate::is_signed(bytes) {
        // Not verified: this only says which generation a refusal was about.
        return peek_generation(&crate::open_signed(bytes).ok()?.payload, limits);
    }
    check_size(bytes, limits).ok()?;
    ciborium::de::from_reader_with_recursion_limit::<Header, _>(bytes, limits.max_depth + 1)
        .ok()
        .map(|h| h.generation)
}

fn check_size(bytes: &[u8], limits: &DecodeLimits) -> Result<(), DecodeError> {
    if bytes.len() > limits.max_bytes {
        return Err(DecodeError::TooLarge { size: bytes.len(), limit: limits.max_bytes });
    }
    Ok(())
}

fn cbor_error(err: ciborium::de::Error<std::io::Error>, limits: &DecodeLimits) -> DecodeError {
    use ciborium::de::Error;
    match err {
        Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => DecodeError::Truncated,
        Error::Io(io) => DecodeError::malformed(io),
        Error::Syntax(offset) => DecodeError::Malformed { message: format!("invalid CBOR at byte {offset}") },
        Error::Semantic(Some(offset), msg) => DecodeError::malformed(format!("at byte {offset}: {msg}")),
        Error::Semantic(None, msg) => DecodeError::malformed(msg),
        Error::RecursionLimitExceeded => DecodeError::TooDeep { limit: limits.max_depth },
    }
}

/// The message of a decode error, without ciborium's wrapping. typetag passes the inner
/// error on through its `Display`, which for ciborium is `Debug`: each
/// layer wraps and escapes the last (`Semantic(None, "Semantic(None,
/// \"invalid type…`). Only the innermost message is kept.
fn cbor_error_text(err: &ciborium::de::Error<std::io::Error>) -> String {
    let mut text = match err {
        ciborium::de::Error::Semantic(_, msg) => msg.clone(),
        other => return other.to_string(),
    };
    while let Some(inner) = text
        .strip_prefix("Semantic(")
        .and_then(|rest| rest.split_once(", \""))
        .and_then(|(_, rest)| rest.strip_suffix("\")"))
    {
        text = inner.replace("\\\"", "\"").replace("\\\\", "\\");
    }
    text
}

/// ciborium and serde nest messages over several lines; status lines need one.
fn one_line(text: &str) -> String {
    crate::bounded_text(&text.split_whitespace().collect::<Vec<_>>().join(" "), crate::MAX_MESSAGE_BYTES)
}

/// Why a status, index or reply value could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode {what}: {message}")]
pub struct ValueDecodeError {
    what: &'static str,
    message: String,
}

/// Encodes a plain wire value (status, index, reply, timestamp) as CBOR.
///
/// These types are plain data whose `Serialize` cannot fail into memory;
/// for anything holding Scores use [`try_to_cbor`].
pub fn to_cbor<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = Vec::new();
    // Writing plain data (no Scores, no custom Serialize) into a Vec has no
    // failure path in ciborium; a panic here is a bug in a wire type.
    ciborium::into_writer(value, &mut bytes).expect("CBOR encoding of a plain wire value into memory");
    bytes
}

/// Encodes a value that holds Scores (whose `Serialize` is each Score's own) as CBOR.
pub fn try_to_cbor<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    let mut bytes = Vec::new();
    ciborium::into_writer(value, &mut bytes)
        .map_err(|e| EncodeError::SerializeFailed(one_line(&e.to_string())))?;
    Ok(bytes)
}

/// Decodes a wire value (status, index, reply) of at most `max_bytes`; `what`
/// names it in the error.
pub fn from_cbor<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    max_bytes: usize,
    what: &'static str,
) -> Result<T, ValueDecodeError> {
    if bytes.len() > max_bytes {
        return Err(ValueDecodeError {
            what,
            message: format!("{} bytes, more than {max_bytes}", bytes.len()),
        });
    }
    ciborium::de::from_reader_with_recursion_limit(bytes, 64)
        .map_err(|e| ValueDecodeError { what, message: one_line(&cbor_error_text(&e)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Found by the bad-input corpus: envelope and record errors read
    // `Semantic(None, "invalid type: …")`, ciborium's Debug form.
    #[test]
    fn value_errors_carry_the_message_not_ciboriums_wrapping() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Wants {
            n: u64,
        }
        let bytes = to_cbor(&std::collections::BTreeMap::from([("n", "text")]));
        let err = from_cbor::<Wants>(&bytes, 1024, "thing").unwrap_err();
        assert!(!err.to_string().contains("Semantic("), "{err}");
        assert!(err.to_string().contains("invalid type: string"), "{err}");
    }

    fn document_with_tags(tags: &[&str]) -> Vec<u8> {
        let scores: Vec<_> = tags.iter().map(|t| serde_json::json!({ "type": t })).collect();
        let doc =
            serde_json::json!({"device_id": "dev-1", "deployment": "d", "generation": 1, "scores": scores});
        let mut out = Vec::new();
        ciborium::into_writer(&doc, &mut out).unwrap();
        out
    }

    // Found by fuzzing (decode_cbor): an unknown tag was repeated raw, so a
    // tag holding NULs, newlines or terminal escapes reached logs and
    // terminals as they were, at any length.
    #[test]
    fn unknown_tags_are_named_escaped_and_bounded() {
        let long = "x".repeat(10_000);
        let bytes = document_with_tags(&["harmj\0\0\0file/v1", "a\u{1b}[31m\nb", &long, "a\u{1b}[31m\nb"]);
        let Err(DecodeError::UnknownScoreTags { tags }) = decode(&bytes, &DecodeLimits::default()) else {
            panic!("not refused for its tags");
        };
        assert_eq!(tags.len(), 3, "{tags:?}");
        assert!(tags.contains(&"harmj\\u{0}\\u{0}\\u{0}file/v1".to_owned()), "{tags:?}");
        assert!(tags.contains(&"a\\u{1b}[31m\\nb".to_owned()), "{tags:?}");
        assert!(tags.iter().all(|t| t.len() <= MAX_TAG_ECHO), "{tags:?}");
        let text = DecodeError::UnknownScoreTags { tags }.to_string();
        assert!(!text.chars().any(char::is_control), "{text:?}");
    }
}
