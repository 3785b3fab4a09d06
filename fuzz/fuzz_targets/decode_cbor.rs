//! The CBOR decoder, with the real Scores registered: never a panic, an
//! accepted document round-trips, a refusal is one clean line, and each
//! outcome is the one typetag's typed pass gives.

#![no_main]

use harmony_fuzz::{check_accepted, check_agrees_with_typetag, check_rejected, limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    harmony_scores::ensure_linked();
    // Whatever the bytes, peeking never panics; on an accepted document it
    // agrees (checked in check_accepted on the canonical bytes).
    let peeked = harmony_score_wire::peek_generation(data, &limits());
    let decoded = harmony_score_wire::decode(data, &limits());
    check_agrees_with_typetag(data, &decoded);
    match decoded {
        Ok(doc) => {
            assert_eq!(peeked, Some(doc.generation), "peek_generation disagrees with decode");
            check_accepted(&doc);
        }
        Err(err) => check_rejected(&err),
    }
});
