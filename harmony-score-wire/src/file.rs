//! Reading a desired-state document from a file, as CBOR or (by extension) JSON.

use std::path::{Path, PathBuf};

use crate::{decode, decode_json, DecodeError, DecodeLimits, DesiredState};

/// Why a document file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DocumentFileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    ReadFailed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a document this agent accepts.
    #[error("{path}: rejected ({}): {source}", source.kind())]
    Rejected {
        path: PathBuf,
        #[source]
        source: DecodeError,
    },
}

/// Whether `path` holds the JSON form (by its `.json` extension) rather than CBOR.
pub fn is_json_path(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// Reads and decodes the document at `path`; the file is read only up to
/// one byte past the size limit.
pub fn read_document_file(path: &Path, limits: &DecodeLimits) -> Result<DesiredState, DocumentFileError> {
    use std::io::Read;
    let read_failed = |source| DocumentFileError::ReadFailed { path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(read_failed)?;
    let mut bytes = Vec::new();
    file.take(limits.max_bytes as u64 + 1).read_to_end(&mut bytes).map_err(read_failed)?;
    // A signed envelope is opened, not verified: whoever runs a file by hand
    // decides whether to trust it (`harmony-agent apply --trusted-key` checks).
    let bytes = if is_json_path(path) { bytes } else { crate::payload_of(&bytes).unwrap_or(bytes) };
    let decoded = if is_json_path(path) { decode_json(&bytes, limits) } else { decode(&bytes, limits) };
    decoded.map_err(|source| DocumentFileError::Rejected { path: path.to_owned(), source })
}
