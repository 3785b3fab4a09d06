//! Key sets on the device: which root-signed key set is in force, and what changes when a newer one arrives.

use harmony_score_wire::{now_ms, ErrorKind, KeySet, StatusError};
use tracing::{error, info, warn};

use super::{Controller, HeldKeySet};
use crate::store::StoreError;

impl Controller {
    /// Loads the key set persisted at the last acceptance, checking the
    /// root's signature again (the configured root may have changed since).
    /// A key set that no longer checks out (or cannot be read) is reported
    /// and not used, and nothing is trusted until a valid one arrives: the
    /// configured keys may be ones it revoked.
    pub(super) fn load_keyset(&mut self) {
        if self.settings.root_keys.is_empty() {
            return;
        }
        let bytes = match self.store.load_keyset() {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return,
            Err(err) => {
                error!(cause = %err, "cannot read the persisted key set; trusting no key until a valid key set arrives");
                self.keyset_unusable = true;
                self.keyset_error = Some(StatusError::new(ErrorKind::StateUnreadable, err.to_string()));
                return;
            }
        };
        match KeySet::open(&bytes, &self.settings.root_keys).and_then(|k| Ok((k.trust()?, k))) {
            Ok((trust, keyset)) => {
                info!(version = keyset.version, "trusting the persisted key set");
                self.keyset = Some(HeldKeySet { keyset, trust, bytes });
            }
            Err(err) => {
                error!(cause = %err, "the persisted key set does not check out; trusting no key until a valid key set arrives");
                self.keyset_unusable = true;
                let message = format!("persisted key set: {err}");
                self.keyset_error = Some(StatusError::new(ErrorKind::StateUnreadable, message));
            }
        }
    }

    /// The fleet's key set as read from its key: accepted when the root
    /// signed it, it is newer than the one held and has not expired; then
    /// persisted, trusted instead of the configured keys, and every refused
    /// document is offered again (one signed by a new key may pass now)
    /// and every deployment re-checked (one signed by a dropped key stops).
    pub(super) async fn offer_keyset(&mut self, bytes: &[u8]) {
        if self.settings.root_keys.is_empty() {
            return; // No root to check it against: key sets do not apply here.
        }
        if self.keyset.as_ref().is_some_and(|held| held.bytes == bytes) {
            if self.keyset_error.take().is_some() {
                self.dirty = true;
            }
            return;
        }
        let held = self.keyset.as_ref().map(|h| &h.keyset);
        let accepted = KeySet::accept(bytes, &self.settings.root_keys, held, now_ms() / 1000)
            .and_then(|k| Ok((k.trust()?, k)));
        let (trust, keyset) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                let refusal = StatusError::new(err.kind(), format!("key set refused: {err}"));
                if self.keyset_error.as_ref() != Some(&refusal) {
                    warn!(kind = %refusal.kind, message = %refusal.message, "key set refused");
                    self.keyset_error = Some(refusal);
                    self.dirty = true;
                }
                return;
            }
        };
        // Persisted before it is trusted: a key set forgotten at a restart
        // would let an older one back in.
        let (store, to_save) = (self.store.clone(), bytes.to_vec());
        let saved =
            tokio::task::spawn_blocking(move || store.save_keyset(&to_save)).await.unwrap_or_else(|join| {
                Err(StoreError::IoFailed {
                    path: "(save task)".into(),
                    source: std::io::Error::other(join.to_string()),
                })
            });
        if let Err(err) = saved {
            error!(cause = %err, "cannot persist the key set; not trusting it yet");
            self.keyset_error = Some(StatusError::new(ErrorKind::PersistFailed, err.to_string()));
            self.dirty = true;
            return;
        }
        info!(
            version = keyset.version,
            keys = keyset.keys.len(),
            threshold = keyset.threshold,
            "key set accepted"
        );
        self.keyset = Some(HeldKeySet { keyset, trust, bytes: bytes.to_vec() });
        // Documents checked under the keys held before are checked again.
        self.deployments.values_mut().for_each(|d| d.checked_at = None);
        self.keyset_unusable = false;
        self.keyset_error = None;
        self.dirty = true;
        self.resync().await;
    }

    /// A device-wide error while the key set in force has expired.
    pub(super) fn keyset_expiry(&self) -> Option<StatusError> {
        let held = &self.keyset.as_ref()?.keyset;
        held.expired(now_ms() / 1000).then(|| {
            StatusError::new(
                ErrorKind::KeysetExpired,
                format!(
                    "key set version {} expired at {} (seconds since the epoch): new documents are refused",
                    held.version, held.expires_at
                ),
            )
        })
    }
}
