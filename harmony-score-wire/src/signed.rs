//! Signed documents: an envelope holding a document's exact CBOR bytes and ed25519 signatures over them.
//!
//! The signature covers the whole payload (device id, deployment,
//! generation, expiry and every Score), so nothing can be mixed and matched
//! between documents. The envelope is a CBOR map whose `type` is
//! [`SIGNED_TAG`]; a bare document has no `type` at its top level, so the
//! two never look alike.

use std::collections::BTreeSet;

use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{from_cbor, to_cbor};

/// The `type` of a signed envelope.
pub const SIGNED_TAG: &str = "harmony.signed/v1";

/// Largest envelope read (a 1 MiB document and its signatures).
const MAX_ENVELOPE_BYTES: usize = 1024 * 1024 + 64 * 1024;

/// Most signatures one envelope may carry.
const MAX_SIGNATURES: usize = 16;

/// A document's bytes and the signatures over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDocument {
    /// Always [`SIGNED_TAG`].
    #[serde(rename = "type")]
    pub kind: String,
    /// The CBOR `DesiredState`, exactly as signed.
    #[serde(with = "crate::cbor_bytes")]
    pub payload: Vec<u8>,
    /// One per signing key.
    pub signatures: Vec<DocumentSignature>,
}

/// One signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentSignature {
    /// [`key_id`] of the signing key.
    pub key_id: String,
    /// The 64-byte ed25519 signature of the payload.
    #[serde(with = "crate::cbor_bytes")]
    pub signature: Vec<u8>,
}

/// Why a signed document is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// A bare document where the device requires a signed one.
    #[error("document is not signed, and this device accepts signed documents only")]
    Unsigned,
    /// The envelope is not well formed.
    #[error("malformed signed envelope: {0}")]
    Malformed(String),
    /// A signed document, and no key is trusted.
    #[error("document is signed, but this device trusts no key")]
    NoTrustedKeys,
    /// Fewer valid signatures by trusted keys than the threshold.
    #[error("{valid} valid signature(s) by trusted keys, {threshold} required (signed by: {signers})")]
    NotTrusted { valid: usize, threshold: usize, signers: String },
}

impl SignatureError {
    /// The kind a status reports: `unsigned`, or `bad_signature` for the rest.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            SignatureError::Unsigned => crate::ErrorKind::Unsigned,
            _ => crate::ErrorKind::BadSignature,
        }
    }
}

/// `ed25519:<16 hex digits>`: a short, stable name of a public key.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = crate::document_digest(key.as_bytes());
    format!("ed25519:{}", &digest["sha256:".len().."sha256:".len() + 16])
}

/// Whether `bytes` is a signed envelope (rather than a bare document).
pub fn is_signed(bytes: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(rename = "type", default)]
        kind: Option<String>,
    }
    bytes.len() <= MAX_ENVELOPE_BYTES
        && ciborium::de::from_reader_with_recursion_limit::<Peek, _>(bytes, 4)
            .is_ok_and(|p| p.kind.as_deref() == Some(SIGNED_TAG))
}

/// Reads an envelope without checking its signatures (for the operator's
/// own reads, and the device's own verified state).
pub fn open_signed(bytes: &[u8]) -> Result<SignedDocument, SignatureError> {
    let envelope: SignedDocument = from_cbor(bytes, MAX_ENVELOPE_BYTES, "signed envelope")
        .map_err(|e| SignatureError::Malformed(e.to_string()))?;
    if envelope.kind != SIGNED_TAG {
        return Err(SignatureError::Malformed(format!("type is not {SIGNED_TAG}")));
    }
    if envelope.signatures.len() > MAX_SIGNATURES {
        return Err(SignatureError::Malformed(format!("more than {MAX_SIGNATURES} signatures")));
    }
    Ok(envelope)
}

/// The payload of `bytes` when it is an envelope, else `bytes` itself.
/// Nothing is verified.
pub fn payload_of(bytes: &[u8]) -> Result<Vec<u8>, SignatureError> {
    if is_signed(bytes) {
        Ok(open_signed(bytes)?.payload)
    } else {
        Ok(bytes.to_vec())
    }
}

/// An operator's signing key.
pub struct DocumentSigner {
    key: SigningKey,
}

// Written by hand: the secret never reaches a log.
impl std::fmt::Debug for DocumentSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocumentSigner").field("key_id", &key_id(&self.key.verifying_key())).finish()
    }
}

impl DocumentSigner {
    /// A signer from a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self { key: SigningKey::from_bytes(&seed) }
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// This key's signature of `payload`, to put in an envelope.
    pub fn signature(&self, payload: &[u8]) -> DocumentSignature {
        let signature = self.key.sign(payload).to_bytes().to_vec();
        DocumentSignature { key_id: key_id(&self.key.verifying_key()), signature }
    }

    /// Wraps a document's CBOR bytes in an envelope signed by this key.
    pub fn sign(&self, payload: Vec<u8>) -> Vec<u8> {
        let signatures = vec![self.signature(&payload)];
        to_cbor(&SignedDocument { kind: SIGNED_TAG.to_owned(), payload, signatures })
    }
}

/// The keys a device trusts, and how many of them must have signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: Vec<VerifyingKey>,
    threshold: usize,
}

impl TrustedKeys {
    /// `keys`, of which `threshold` (at least 1) must sign.
    pub fn new(keys: Vec<VerifyingKey>, threshold: usize) -> Self {
        Self { keys, threshold: threshold.max(1) }
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The one decision every reader makes (the agent on each offer and
    /// before each run, `harmony-agent apply`): a signed envelope must carry
    /// enough valid signatures by these keys; a bare document passes only
    /// with `allow_unsigned`. Returns the document's bytes.
    pub fn open(&self, bytes: &[u8], allow_unsigned: bool) -> Result<Vec<u8>, SignatureError> {
        if is_signed(bytes) {
            if self.is_empty() {
                return Err(SignatureError::NoTrustedKeys);
            }
            return self.verify(bytes);
        }
        if allow_unsigned {
            Ok(bytes.to_vec())
        } else {
            Err(SignatureError::Unsigned)
        }
    }

    /// Checks the envelope's signatures and returns the payload when at
    /// least `threshold` distinct trusted keys signed it.
    pub fn verify(&self, bytes: &[u8]) -> Result<Vec<u8>, SignatureError> {
        let envelope = open_signed(bytes)?;
        let mut valid = BTreeSet::new();
        for sig in &envelope.signatures {
            let Ok(signature) = ed25519_dalek::Signature::from_slice(&sig.signature) else { continue };
            for key in &self.keys {
                if key_id(key) == sig.key_id && key.verify(&envelope.payload, &signature).is_ok() {
                    valid.insert(key.to_bytes());
                }
            }
        }
        if valid.len() >= self.threshold {
            return Ok(envelope.payload);
        }
        let signers = envelope
            .signatures
            .iter()
            .map(|s| crate::bounded_text(&s.key_id, 64))
            .collect::<Vec<_>>()
            .join(", ");
        Err(SignatureError::NotTrusted { valid: valid.len(), threshold: self.threshold, signers })
    }
}

/// Parses a public key written as 64 hex digits (what `harmony-fleet
/// keygen` writes to `harmony.pub`).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = parse_hex32(text)?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an ed25519 public key: {e}"))
}

/// Parses a 32-byte seed written as 64 hex digits (`harmony.key`).
pub fn parse_secret_key(text: &str) -> Result<DocumentSigner, String> {
    Ok(DocumentSigner::from_seed(parse_hex32(text)?))
}

fn parse_hex32(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("expected 64 hex digits".to_owned());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Hex of 32 bytes, as the key files hold them.
pub fn to_hex32(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(n: u8) -> DocumentSigner {
        DocumentSigner::from_seed([n; 32])
    }

    #[test]
    fn a_signed_payload_verifies_and_every_alteration_is_refused() {
        let payload = b"\xa1\x61a\x01".to_vec();
        let envelope = signer(1).sign(payload.clone());
        assert!(is_signed(&envelope) && !is_signed(&payload));
        let trust = TrustedKeys::new(vec![signer(1).verifying_key()], 1);
        assert_eq!(trust.verify(&envelope).unwrap(), payload);
        assert_eq!(payload_of(&envelope).unwrap(), payload);

        // Another key, a tampered payload, a tampered signature, none at all.
        let other = TrustedKeys::new(vec![signer(2).verifying_key()], 1);
        assert!(matches!(other.verify(&envelope), Err(SignatureError::NotTrusted { valid: 0, .. })));
        let mut tampered = open_signed(&envelope).unwrap();
        tampered.payload[3] ^= 1;
        assert!(trust.verify(&to_cbor(&tampered)).is_err());
        let mut bad_sig = open_signed(&envelope).unwrap();
        bad_sig.signatures[0].signature[0] ^= 1;
        assert!(trust.verify(&to_cbor(&bad_sig)).is_err());
        let mut none = open_signed(&envelope).unwrap();
        none.signatures.clear();
        assert!(trust.verify(&to_cbor(&none)).is_err());
        // Every single flipped byte of the envelope is refused or changes nothing it signs.
        for i in 0..envelope.len() {
            let mut flipped = envelope.clone();
            flipped[i] ^= 0x40;
            if let Ok(p) = trust.verify(&flipped) {
                assert_eq!(p, payload, "byte {i}");
            }
        }
    }

    #[test]
    fn a_threshold_counts_distinct_trusted_keys() {
        let payload = vec![0xa0];
        let mut envelope = open_signed(&signer(1).sign(payload.clone())).unwrap();
        let second = open_signed(&signer(2).sign(payload.clone())).unwrap();
        let trust = TrustedKeys::new(vec![signer(1).verifying_key(), signer(2).verifying_key()], 2);
        let one = to_cbor(&envelope);
        assert!(matches!(trust.verify(&one), Err(SignatureError::NotTrusted { valid: 1, threshold: 2, .. })));
        envelope.signatures.push(envelope.signatures[0].clone());
        assert!(trust.verify(&to_cbor(&envelope)).is_err(), "the same key twice is one signer");
        envelope.signatures.push(second.signatures[0].clone());
        assert_eq!(trust.verify(&to_cbor(&envelope)).unwrap(), payload);
    }

    #[test]
    fn key_files_round_trip_as_hex() {
        let key = signer(7);
        let public = to_hex32(&key.verifying_key().to_bytes());
        assert_eq!(parse_public_key(&format!("{public}\n")).unwrap(), key.verifying_key());
        assert!(parse_public_key("zz").is_err());
        assert_eq!(parse_secret_key(&to_hex32(&[7; 32])).unwrap().verifying_key(), key.verifying_key());
        assert!(key_id(&key.verifying_key()).starts_with("ed25519:"));
        assert!(!format!("{key:?}").contains(&to_hex32(&[7; 32])));
    }
}
