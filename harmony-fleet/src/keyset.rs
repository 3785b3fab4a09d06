//! Publishing the fleet's key set: the root-signed list of online signing keys every device with a root key follows.

use harmony_score_wire::names::KEYSET_KEY;
use harmony_score_wire::{KeySet, TrustedKeys};
use tracing::warn;

use crate::desired::{cas_write, read_latest};
use crate::{FleetClient, FleetError};

/// How often a compare-and-set write of the key set is tried.
const MAX_ATTEMPTS: u32 = 8;

/// Reads a signed key set, checking the root's signatures (`root`: the
/// fleet's root public keys and their threshold, as devices have them in
/// `root_keys` / `root_threshold`) and its shape, not its expiry.
pub fn read_keyset(bytes: &[u8], root: &TrustedKeys) -> Result<KeySet, FleetError> {
    KeySet::open(bytes, root).map_err(|e| FleetError::InvalidKeySet { message: e.to_string() })
}

impl FleetClient {
    /// The key set the bucket holds, if any that `root` signed: whatever
    /// else the bucket holds under the key (anyone able to write the bucket
    /// may put a key set signed by a key of its own there; devices refuse
    /// it) is ignored, with a warning.
    pub async fn keyset(&self, root: &TrustedKeys) -> Result<Option<KeySet>, FleetError> {
        let store = &self.buckets().await?.desired;
        Ok(read_latest(store, KEYSET_KEY).await?.value.and_then(|bytes| verified(&bytes, root)))
    }

    /// Publishes a key set signed by `root` (from [`KeySet::sign`]) for
    /// every device. Refused when it is not a well-formed key set signed by
    /// `root`, when its version is not above the root-signed one the bucket
    /// holds (devices would refuse it), or when already expired. A value in
    /// the bucket that `root` did not sign does not count: it is replaced.
    /// Returns the version.
    pub async fn publish_keyset(&self, bytes: &[u8], root: &TrustedKeys) -> Result<u64, FleetError> {
        let offered = read_keyset(bytes, root)?;
        if offered.expired(harmony_score_wire::now_ms() / 1000) {
            return Err(FleetError::InvalidKeySet {
                message: format!("version {} expired at {}", offered.version, offered.expires_at),
            });
        }
        let store = &self.buckets().await?.desired;
        for _ in 0..MAX_ATTEMPTS {
            let latest = read_latest(store, KEYSET_KEY).await?;
            if let Some(current) = latest.value.as_deref().and_then(|b| verified(b, root)) {
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

/// The key set in `bytes` when `root` signed it; otherwise `None`, with a warning.
fn verified(bytes: &[u8], root: &TrustedKeys) -> Option<KeySet> {
    KeySet::open(bytes, root)
        .inspect_err(|err| {
            warn!(
                key = KEYSET_KEY,
                cause = %harmony_score_wire::log_text(err.to_string()),
                "the bucket holds a key set the root did not sign (or a malformed one); ignored"
            )
        })
        .ok()
}
