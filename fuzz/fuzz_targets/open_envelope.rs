//! Signed envelopes: parsing and verification against one trusted key.
//! Never a panic; whatever is accepted is exactly a payload that key signed.

#![no_main]

use std::sync::OnceLock;

use harmony_fuzz::{check_message, limits, FUZZ_KEY_SEED};
use harmony_score_wire::{DocumentSigner, SignatureError, TrustedKeys};
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static (DocumentSigner, TrustedKeys, TrustedKeys) {
    static KEYS: OnceLock<(DocumentSigner, TrustedKeys, TrustedKeys)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let signer = DocumentSigner::from_seed(FUZZ_KEY_SEED);
        let other = DocumentSigner::from_seed([0x17; 32]).verifying_key();
        let one = TrustedKeys::new(vec![signer.verifying_key()], 1);
        let two = TrustedKeys::new(vec![signer.verifying_key(), other], 2);
        (signer, one, two)
    })
}

fuzz_target!(|data: &[u8]| {
    harmony_scores::ensure_linked();
    let (signer, trust, both) = keys();
    let signed = harmony_score_wire::is_signed(data);
    match trust.open(data, false) {
        Ok(payload) => {
            assert!(signed, "a bare document passed without allow_unsigned");
            // ed25519 signatures are deterministic: the envelope must carry
            // the very signature this key makes over the payload.
            let ours = harmony_score_wire::open_signed(&signer.sign(payload.clone())).unwrap();
            let envelope = harmony_score_wire::open_signed(data).expect("accepted, so it parses");
            assert_eq!(envelope.payload, payload);
            assert!(envelope.signatures.iter().any(|s| s.signature == ours.signatures[0].signature));
            // Nothing signed by the second key exists, so a threshold of two
            // finds exactly one valid signer, however often it signed.
            assert!(
                matches!(both.verify(data), Err(SignatureError::NotTrusted { valid: 1, threshold: 2, .. })),
                "{:?}",
                both.verify(data)
            );
            // A verified payload goes on to the decoder.
            if let Err(err) = harmony_score_wire::decode(&payload, &limits()) {
                harmony_fuzz::check_rejected(&err);
            }
        }
        Err(err) => {
            check_message(&err.to_string());
            if !signed {
                assert_eq!(err, SignatureError::Unsigned);
            }
        }
    }
    // Bare documents pass through unchanged when unsigned ones are allowed.
    if !signed {
        assert_eq!(trust.open(data, true).as_deref(), Ok(data));
    }
    let _ = harmony_score_wire::payload_of(data);
    let _ = harmony_score_wire::peek_generation(data, &limits());
});
