//! Publishing the fleet's key set: the root-signed list of online signing keys every device with a root key follows.

use harmony_score_wire::names::KEYSET_KEY;
use harmony_score_wire::{from_cbor, open_signed, KeySet, MAX_KEYSET_BYTES};

use crate::desired::{cas_write, read_latest};
use crate::{FleetClient, FleetError};

/// How often a compare-and-set write of the key set is tried.
const MAX_ATTEMPTS: u32 = 8;

/// Reads the key set inside a signed envelope, without checking the
/// signature (the operator's side may not hold the root's public key; the
/// devices check it).
pub fn read_keyset(bytes: &[u8]) -> Result<KeySet, FleetError> {
    let invalid = |message: String| FleetError::InvalidKeySet { message };
    if bytes.len() > MAX_KEYSET_BYTES {
        return Err(invalid(format!("{} bytes, more than the limit of {MAX_KEYSET_BYTES}", bytes.len())));
    }
    let envelope = open_signed(bytes).map_err(|e| invalid(format!("not a signed key set: {e}")))?;
    if envelope.signatures.is_empty() {
        return Err(invalid("carries no signature".into()));
    }
    let keyset: KeySet =
        from_cbor(&envelope.payload, MAX_KEYSET_BYTES, "key set").map_err(|e| invalid(e.to_string()))?;
    keyset.check().map_err(|e| invalid(e.to_string()))?;
    Ok(keyset)
}

impl FleetClient {
    /// The key set the bucket holds, if any.
    pub async fn keyset(&self) -> Result<Option<KeySet>, FleetError> {
        let store = &self.buckets().await?.desired;
        match read_latest(store, KEYSET_KEY).await?.value {
            Some(bytes) => read_keyset(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Publishes a root-signed key set (from [`KeySet::sign`]) for every
    /// device. Refused when it is not a signed, well-formed key set, or
    /// when its version is not above the one the bucket holds (devices
    /// would refuse it), or already expired. Returns its version.
    pub async fn publish_keyset(&self, bytes: &[u8]) -> Result<u64, FleetError> {
        let offered = read_keyset(bytes)?;
        if offered.expired(harmony_score_wire::now_ms() / 1000) {
            return Err(FleetError::InvalidKeySet {
                message: format!("version {} expired at {}", offered.version, offered.expires_at),
            });
        }
        let store = &self.buckets().await?.desired;
        for _ in 0..MAX_ATTEMPTS {
            let latest = read_latest(store, KEYSET_KEY).await?;
            if let Some(current) = latest.value.as_deref().and_then(|b| read_keyset(b).ok()) {
                if offered.version <= current.version {
                    return Err(FleetError::InvalidKeySet {
                        message: format!(
                            "version {} is not above version {}, which the fleet holds",
                            offered.version, current.version
                        ),
                    });
                }
            }
            if cas_write(store, KEYSET_KEY, bytes.to_vec(), latest.revision).await? {
                return Ok(offered.version);
            }
        }
        Err(FleetError::Conflict { key: KEYSET_KEY.to_owned(), reason: "other writers kept winning".into() })
    }
}
