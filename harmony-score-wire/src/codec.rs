//! The CBOR codec for `DesiredState`, bounded in everything it reads.

use ciborium::Value;

use crate::registry::is_registered;
use crate::{DeploymentName, DesiredState, DeviceId, DeviceScore, ErrorKind, FORMAT_VERSION};

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
    let mut resources = std::collections::HashSet::new();
    for score in scores {
        let resource = score.resource();
        if !resources.insert(resource.clone()) {
            return Err(DecodeError::DuplicateResource { resource: resource.to_string() });
        }
    }
    Ok(())
}

/// The JSON form of a document (the serde form of the same types).
pub fn to_json_pretty(doc: &DesiredState) -> Result<String, EncodeError> {
    serde_json::to_string_pretty(doc).map_err(|e| EncodeError::SerializeFailed(one_line(&e.to_string())))
}

/// Decodes a CBOR document within `limits`.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<DesiredState, DecodeError> {
    check_size(bytes, limits)?;
    let mut reader = bytes;
    // ciborium counts recursion per container; the same bound as our own walk.
    let value: Value = ciborium::de::from_reader_with_recursion_limit(&mut reader, limits.max_depth + 1)
        .map_err(|err| cbor_error(err, limits))?;
    if !reader.is_empty() {
        return Err(DecodeError::Malformed {
            message: format!("{} trailing bytes after the document", reader.len()),
        });
    }
    decode_value(value, limits)
}

/// Decodes the JSON form of a document within `limits`, with the same checks
/// as [`decode`].
pub fn decode_json(bytes: &[u8], limits: &DecodeLimits) -> Result<DesiredState, DecodeError> {
    check_size(bytes, limits)?;
    let json: serde_json::Value = serde_json::from_slice(bytes).map_err(|err| {
        if err.is_eof() {
            DecodeError::Truncated
        } else if err.to_string().contains("recursion limit") {
            DecodeError::TooDeep { limit: limits.max_depth }
        } else {
            DecodeError::malformed(err)
        }
    })?;
    let value = Value::serialized(&json).map_err(DecodeError::malformed)?;
    decode_value(value, limits)
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

/// Checks the parsed value's shape, ids and tags before building Scores, so
/// that errors name what is wrong rather than where serde stopped.
fn decode_value(value: Value, limits: &DecodeLimits) -> Result<DesiredState, DecodeError> {
    if depth(&value) > limits.max_depth {
        return Err(DecodeError::TooDeep { limit: limits.max_depth });
    }
    let Value::Map(fields) = &value else {
        return Err(DecodeError::malformed("a document is a map"));
    };
    let field = |name: &str| fields.iter().find(|(k, _)| k.as_text() == Some(name)).map(|(_, v)| v);

    if let Some(format) = field("format") {
        match format.as_integer().and_then(|i| u64::try_from(i).ok()) {
            Some(f) if f == u64::from(FORMAT_VERSION) => {}
            Some(f) => return Err(DecodeError::UnsupportedFormat { format: f }),
            None => return Err(DecodeError::malformed("format is not an unsigned integer")),
        }
    }
    match field("device_id").map(Value::as_text) {
        Some(Some(id)) => {
            DeviceId::new(id).map_err(|e| DecodeError::InvalidDeviceId { message: e.to_string() })?;
        }
        _ => return Err(DecodeError::malformed("device_id is missing or not text")),
    }
    match field("deployment").map(Value::as_text) {
        Some(Some(name)) => {
            DeploymentName::new(name)
                .map_err(|e| DecodeError::InvalidDeploymentName { message: e.to_string() })?;
        }
        _ => return Err(DecodeError::malformed("deployment is missing or not text")),
    }
    let Some(Value::Array(scores)) = field("scores") else {
        return Err(DecodeError::malformed("scores is missing or not an array"));
    };
    if scores.len() > limits.max_scores {
        return Err(DecodeError::TooManyScores { count: scores.len(), limit: limits.max_scores });
    }
    let tags = score_tags(scores)?;
    let mut unknown: Vec<String> = tags.iter().filter(|t| !is_registered(t)).map(|t| t.to_string()).collect();
    if !unknown.is_empty() {
        unknown.sort();
        unknown.dedup();
        return Err(DecodeError::UnknownScoreTags { tags: unknown });
    }
    let doc = value.deserialized::<DesiredState>().map_err(|err| {
        // Find the Score at fault so the error names it; the whole document
        // is decoded only once when nothing is wrong.
        for (index, (score, tag)) in scores.iter().zip(&tags).enumerate() {
            if let Err(err) = score.deserialized::<Box<dyn crate::DeviceScore>>() {
                let message = one_line(&err.to_string());
                return DecodeError::InvalidScore { index, tag: tag.to_string(), field: None, message };
            }
        }
        DecodeError::malformed(err)
    })?;
    check_scores(&doc.scores)?;
    Ok(doc)
}

fn score_tags(scores: &[Value]) -> Result<Vec<&str>, DecodeError> {
    scores
        .iter()
        .enumerate()
        .map(|(index, score)| {
            let tag = match score {
                Value::Map(fields) => {
                    fields.iter().find(|(k, _)| k.as_text() == Some("type")).and_then(|(_, v)| v.as_text())
                }
                _ => None,
            };
            tag.ok_or_else(|| DecodeError::Malformed {
                message: format!("score #{index} has no text \"type\""),
            })
        })
        .collect()
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Map(entries) => 1 + entries.iter().map(|(k, v)| depth(k).max(depth(v))).max().unwrap_or(0),
        Value::Tag(_, inner) => 1 + depth(inner),
        _ => 0,
    }
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
        .map_err(|e| ValueDecodeError { what, message: one_line(&e.to_string()) })
}
