//! What the fuzz targets share: the limits they decode with and the invariants every outcome keeps.

use harmony_score_wire::{
    decode, decode_json, decode_via_typetag, encode, peek_generation, DecodeError, DecodeLimits, DesiredState,
};

/// The seed of the one key `open_envelope` trusts; `examples/seeds.rs`
/// signs its seeds with it.
pub const FUZZ_KEY_SEED: [u8; 32] = [0x42; 32];

/// The limits the agent decodes with.
pub fn limits() -> DecodeLimits {
    DecodeLimits::default()
}

/// A document's serde form, to compare two documents by value.
pub fn as_json(doc: &DesiredState) -> serde_json::Value {
    serde_json::to_value(doc).expect("a decoded document serializes")
}

/// What holds of every document the decoder accepts: the operator's encoder
/// accepts it too; its encoding decodes to the same document and encodes to
/// the same bytes again (one canonical form); its JSON form decodes to the
/// same; and the generation a refusal would name is its generation.
pub fn check_accepted(doc: &DesiredState) {
    let value = as_json(doc);
    let bytes = encode(doc).unwrap_or_else(|err| panic!("decoded, but the encoder refuses it: {err}"));
    let again = decode(&bytes, &limits()).unwrap_or_else(|err| panic!("its encoding does not decode: {err}"));
    assert_eq!(as_json(&again), value, "decode(encode(doc)) differs");
    assert_eq!(encode(&again).unwrap(), bytes, "encoding is not canonical");
    assert_eq!(peek_generation(&bytes, &limits()), Some(doc.generation));
    let json = serde_json::to_vec(doc).unwrap();
    let from_json =
        decode_json(&json, &limits()).unwrap_or_else(|err| panic!("its JSON does not decode: {err}"));
    assert_eq!(as_json(&from_json), value, "decode_json(json(doc)) differs");
}

/// What `decode` made of `data` is what its typed pass through serde and
/// typetag (the one each Score's own decoder replaced) makes of it: the
/// same document, or the same error.
pub fn check_agrees_with_typetag(data: &[u8], decoded: &Result<DesiredState, DecodeError>) {
    let reference = decode_via_typetag(data, &limits());
    match (decoded, &reference) {
        (Ok(new), Ok(old)) => {
            assert_eq!(as_json(new), as_json(old), "decode and typetag's pass read different documents")
        }
        (Err(new), Err(old)) => assert_eq!(new, old, "decode and typetag's pass refuse differently"),
        _ => panic!("decode: {decoded:?}; typetag's pass: {reference:?}"),
    }
}

/// What holds of every refusal: its text is one line without control
/// characters (it reaches logs, status and terminals), and not huge.
pub fn check_rejected(err: &DecodeError) {
    check_message(&err.to_string());
}

/// One line, no control characters, bounded.
pub fn check_message(text: &str) {
    assert!(!text.chars().any(char::is_control), "control character in {text:?}");
    assert!(text.len() <= 256 * 1024, "a message of {} bytes", text.len());
}
