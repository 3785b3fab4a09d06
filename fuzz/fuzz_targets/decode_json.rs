//! The JSON form of a document: never a panic, an accepted document
//! round-trips through CBOR and JSON, a refusal is one clean line.

#![no_main]

use harmony_fuzz::{as_json, check_accepted, check_rejected, limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    harmony_scores::ensure_linked();
    match harmony_score_wire::decode_json(data, &limits()) {
        Ok(doc) => {
            check_accepted(&doc);
            // The pretty form the operator's tools print decodes the same.
            let pretty = harmony_score_wire::to_json_pretty(&doc).unwrap();
            let again = harmony_score_wire::decode_json(pretty.as_bytes(), &limits()).unwrap();
            assert_eq!(as_json(&again), as_json(&doc));
        }
        Err(err) => check_rejected(&err),
    }
});
