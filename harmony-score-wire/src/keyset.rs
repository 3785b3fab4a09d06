//! Key sets: the online signing keys, named and bounded in time by an offline root key, so keys rotate without touching devices.
//!
//! This is TUF's root → targets delegation, cut to what a device needs. A
//! device is configured with one or more *root* public keys (kept offline
//! by the operator). The root signs a [`KeySet`] (`harmony.keyset/v1`):
//! the online keys that may sign documents, how many of them must, a
//! version and an expiry. The operator publishes it (one key for the whole
//! fleet, [`crate::names::KEYSET_KEY`]); a device accepts it only when it
//! is signed by its root and its version is higher than the one it holds,
//! and from then on trusts the key set's keys instead of its configured
//! ones. A key set whose expiry passed refuses every new document until a
//! newer one arrives (freeze protection for keys).

use serde::{Deserialize, Serialize};

use crate::signed::{parse_public_key, SignatureError, SignedDocument, TrustedKeys, SIGNED_TAG};
use crate::{from_cbor, to_cbor, DocumentSigner, VerifyingKey};

/// The `type` of a key set.
pub const KEYSET_TAG: &str = "harmony.keyset/v1";

/// Largest key set read (its envelope included).
pub const MAX_KEYSET_BYTES: usize = 64 * 1024;

/// Most keys one key set may name.
pub const MAX_KEYSET_KEYS: usize = 64;

/// The online keys a root delegates to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySet {
    /// Always [`KEYSET_TAG`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Higher than every key set before it; a device refuses a lower or equal one.
    pub version: u64,
    /// When the root signed it (seconds since the epoch).
    #[serde(default)]
    pub issued_at: u64,
    /// After this (seconds since the epoch) the key set signs nothing new.
    pub expires_at: u64,
    /// How many distinct keys of `keys` must sign a document.
    pub threshold: usize,
    /// The public keys, as 64 hex digits each.
    pub keys: Vec<String>,
}

/// Why a key set is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeySetError {
    /// Not a signed envelope, or not enough valid root signatures.
    #[error("key set is not signed by this device's root: {0}")]
    NotSignedByRoot(#[source] SignatureError),
    /// Signed by the root, but not a well-formed key set.
    #[error("malformed key set: {0}")]
    Malformed(String),
    /// Its expiry passed.
    #[error("key set version {version} expired at {expires_at} (seconds since the epoch)")]
    Expired { version: u64, expires_at: u64 },
    /// Not newer than the key set the device holds.
    #[error("key set version {offered} is not newer than version {held}, which this device holds")]
    NotNewer { offered: u64, held: u64 },
}

impl KeySetError {
    /// The kind a status reports.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            KeySetError::NotSignedByRoot(_) => crate::ErrorKind::BadSignature,
            KeySetError::Malformed(_) => crate::ErrorKind::Malformed,
            KeySetError::Expired { .. } => crate::ErrorKind::KeysetExpired,
            KeySetError::NotNewer { .. } => crate::ErrorKind::StaleGeneration,
        }
    }
}

impl KeySet {
    /// A key set of `keys`, `threshold` of which must sign.
    pub fn new(
        version: u64,
        issued_at: u64,
        expires_at: u64,
        threshold: usize,
        keys: &[VerifyingKey],
    ) -> Self {
        Self {
            kind: KEYSET_TAG.to_owned(),
            version,
            issued_at,
            expires_at,
            threshold,
            keys: keys.iter().map(|k| crate::to_hex32(k.as_bytes())).collect(),
        }
    }

    /// Checks the shape of a key set: its type, 1 to [`MAX_KEYSET_KEYS`]
    /// distinct valid keys, a threshold between 1 and their number.
    pub fn check(&self) -> Result<(), KeySetError> {
        if self.kind != KEYSET_TAG {
            return Err(KeySetError::Malformed(format!("type is not {KEYSET_TAG}")));
        }
        if self.keys.is_empty() || self.keys.len() > MAX_KEYSET_KEYS {
            return Err(KeySetError::Malformed(format!(
                "holds {} keys, 1 to {MAX_KEYSET_KEYS} allowed",
                self.keys.len()
            )));
        }
        let keys = self.verifying_keys()?;
        let distinct: std::collections::BTreeSet<_> = keys.iter().map(|k| k.to_bytes()).collect();
        if distinct.len() != keys.len() {
            return Err(KeySetError::Malformed("names one key twice".into()));
        }
        if self.threshold == 0 || self.threshold > keys.len() {
            return Err(KeySetError::Malformed(format!(
                "threshold {} needs 1 to {} keys",
                self.threshold,
                keys.len()
            )));
        }
        Ok(())
    }

    fn verifying_keys(&self) -> Result<Vec<VerifyingKey>, KeySetError> {
        self.keys
            .iter()
            .enumerate()
            .map(|(i, k)| parse_public_key(k).map_err(|e| KeySetError::Malformed(format!("key #{i}: {e}"))))
            .collect()
    }

    /// The trust this key set gives: its keys and threshold.
    pub fn trust(&self) -> Result<TrustedKeys, KeySetError> {
        Ok(TrustedKeys::new(self.verifying_keys()?, self.threshold))
    }

    /// Whether it has expired at `now_secs`.
    pub fn expired(&self, now_secs: u64) -> bool {
        self.expires_at <= now_secs
    }

    /// The root's signature over this key set, in the envelope documents use.
    pub fn sign(&self, roots: &[&DocumentSigner]) -> Vec<u8> {
        let payload = to_cbor(self);
        let signatures = roots.iter().map(|root| root.signature(&payload)).collect();
        to_cbor(&SignedDocument { kind: SIGNED_TAG.to_owned(), payload, signatures })
    }

    /// Reads a signed key set, checking the root's signatures and its shape
    /// (not its expiry or version: see [`KeySet::accept`]).
    pub fn open(bytes: &[u8], root: &TrustedKeys) -> Result<KeySet, KeySetError> {
        if bytes.len() > MAX_KEYSET_BYTES {
            return Err(KeySetError::Malformed(format!(
                "{} bytes, more than the limit of {MAX_KEYSET_BYTES}",
                bytes.len()
            )));
        }
        let payload = root.open(bytes, false).map_err(KeySetError::NotSignedByRoot)?;
        let keyset: KeySet = from_cbor(&payload, MAX_KEYSET_BYTES, "key set")
            .map_err(|e| KeySetError::Malformed(e.to_string()))?;
        keyset.check()?;
        Ok(keyset)
    }

    /// The decision a device makes on an offered key set: signed by its
    /// root, well formed, not expired at `now_secs`, and newer than `held`.
    pub fn accept(
        bytes: &[u8],
        root: &TrustedKeys,
        held: Option<&KeySet>,
        now_secs: u64,
    ) -> Result<KeySet, KeySetError> {
        let offered = KeySet::open(bytes, root)?;
        if let Some(held) = held {
            if offered.version <= held.version {
                return Err(KeySetError::NotNewer { offered: offered.version, held: held.version });
            }
        }
        if offered.expired(now_secs) {
            return Err(KeySetError::Expired { version: offered.version, expires_at: offered.expires_at });
        }
        Ok(offered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(n: u8) -> DocumentSigner {
        DocumentSigner::from_seed([n; 32])
    }

    fn root_trust() -> TrustedKeys {
        TrustedKeys::new(vec![signer(100).verifying_key()], 1)
    }

    fn keyset(version: u64, expires_at: u64) -> KeySet {
        KeySet::new(version, 1, expires_at, 1, &[signer(1).verifying_key(), signer(2).verifying_key()])
    }

    #[test]
    fn a_root_signed_newer_unexpired_key_set_is_accepted_and_gives_its_trust() {
        let bytes = keyset(2, 2000).sign(&[&signer(100)]);
        let held = keyset(1, 2000);
        let got = KeySet::accept(&bytes, &root_trust(), Some(&held), 1000).unwrap();
        assert_eq!(got, keyset(2, 2000));
        let doc = signer(2).sign(vec![0xa0]);
        assert_eq!(got.trust().unwrap().verify(&doc).unwrap(), vec![0xa0]);
        assert!(got.trust().unwrap().verify(&signer(3).sign(vec![0xa0])).is_err());
    }

    #[test]
    fn a_key_set_signed_by_another_key_older_or_expired_is_refused_with_its_reason() {
        let root = root_trust();
        // Signed by an online key, not the root.
        let by_online = keyset(5, 2000).sign(&[&signer(1)]);
        let err = KeySet::accept(&by_online, &root, None, 1000).unwrap_err();
        assert!(matches!(err, KeySetError::NotSignedByRoot(_)), "{err}");
        assert_eq!(err.kind(), crate::ErrorKind::BadSignature);
        // Bare, unsigned.
        let bare = to_cbor(&keyset(5, 2000));
        assert!(matches!(KeySet::accept(&bare, &root, None, 1000), Err(KeySetError::NotSignedByRoot(_))));
        // Not newer (a replay of the held one, or an older one).
        let held = keyset(5, 2000);
        for version in [4, 5] {
            let err = KeySet::accept(&keyset(version, 2000).sign(&[&signer(100)]), &root, Some(&held), 1000)
                .unwrap_err();
            assert_eq!(err, KeySetError::NotNewer { offered: version, held: 5 });
        }
        // Expired.
        let err =
            KeySet::accept(&keyset(6, 999).sign(&[&signer(100)]), &root, Some(&held), 1000).unwrap_err();
        assert_eq!(err, KeySetError::Expired { version: 6, expires_at: 999 });
        assert_eq!(err.kind(), crate::ErrorKind::KeysetExpired);
        // A flipped byte anywhere is refused or changes nothing signed.
        let good = keyset(6, 2000).sign(&[&signer(100)]);
        for i in 0..good.len() {
            let mut flipped = good.clone();
            flipped[i] ^= 0x20;
            if let Ok(k) = KeySet::accept(&flipped, &root, Some(&held), 1000) {
                assert_eq!(k, keyset(6, 2000), "byte {i}");
            }
        }
    }

    #[test]
    fn malformed_key_sets_are_refused_even_when_the_root_signed_them() {
        let root = root_trust();
        let open = |k: KeySet| KeySet::open(&k.sign(&[&signer(100)]), &root);
        let mut zero = keyset(1, 2000);
        zero.threshold = 0;
        let mut too_high = keyset(1, 2000);
        too_high.threshold = 3;
        let mut empty = keyset(1, 2000);
        empty.keys.clear();
        let mut twice = keyset(1, 2000);
        twice.keys[1] = twice.keys[0].clone();
        let mut bad_key = keyset(1, 2000);
        bad_key.keys[0] = "zz".into();
        let mut wrong_type = keyset(1, 2000);
        wrong_type.kind = "harmony.keyset/v9".into();
        for k in [zero, too_high, empty, twice, bad_key, wrong_type] {
            assert!(matches!(open(k.clone()), Err(KeySetError::Malformed(_))), "{k:?}");
        }
        assert!(matches!(
            KeySet::open(&vec![0u8; MAX_KEYSET_BYTES + 1], &root),
            Err(KeySetError::Malformed(_))
        ));
    }

    #[test]
    fn a_root_threshold_needs_that_many_root_signatures() {
        let roots = TrustedKeys::new(vec![signer(100).verifying_key(), signer(101).verifying_key()], 2);
        let one = keyset(1, 2000).sign(&[&signer(100)]);
        assert!(matches!(KeySet::open(&one, &roots), Err(KeySetError::NotSignedByRoot(_))));
        let two = keyset(1, 2000).sign(&[&signer(100), &signer(101)]);
        assert_eq!(KeySet::open(&two, &roots).unwrap(), keyset(1, 2000));
    }
}
