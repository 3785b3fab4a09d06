//! The JSON form transcoded to CBOR as it is parsed, so it takes the CBOR decoder's one route.
//!
//! Arrays and objects become indefinite-length CBOR arrays and maps (their
//! lengths are not known until they end), numbers the smallest CBOR integer
//! or a double, strings text. Nothing is built but the CBOR bytes, whose
//! size is bounded by a few times the text's; serde_json's own recursion
//! limit bounds the nesting (and this stack) before the CBOR walk does.

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// The CBOR form of the JSON text `json` (one value, then only whitespace).
pub(crate) fn to_cbor(json: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(json.len());
    let mut de = serde_json::Deserializer::from_slice(json);
    Transcode(&mut out).deserialize(&mut de)?;
    de.end()?;
    Ok(out)
}

/// Writes the next JSON value it is given as CBOR to its buffer.
struct Transcode<'o>(&'o mut Vec<u8>);

impl Transcode<'_> {
    fn head(&mut self, major: u8, value: u64) {
        let major = major << 5;
        // Each arm's value fits the width it is written in.
        match value {
            0..=23 => self.0.push(major | value as u8),
            24..=0xff => self.0.extend([major | 24, value as u8]),
            0x100..=0xffff => {
                self.0.push(major | 25);
                self.0.extend((value as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                self.0.push(major | 26);
                self.0.extend((value as u32).to_be_bytes());
            }
            _ => {
                self.0.push(major | 27);
                self.0.extend(value.to_be_bytes());
            }
        }
    }
}

impl<'de> DeserializeSeed<'de> for Transcode<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Transcode<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.0.push(if v { 0xf5 } else { 0xf4 });
        Ok(())
    }

    fn visit_u64<E>(mut self, v: u64) -> Result<(), E> {
        self.head(0, v);
        Ok(())
    }

    fn visit_i64<E>(mut self, v: i64) -> Result<(), E> {
        match u64::try_from(v) {
            Ok(v) => self.head(0, v),
            // CBOR writes a negative n as -1 - n, which is !n in two's complement.
            Err(_) => self.head(1, !v as u64),
        }
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.0.push(0xfb);
        self.0.extend(v.to_be_bytes());
        Ok(())
    }

    fn visit_str<E>(mut self, v: &str) -> Result<(), E> {
        self.head(3, v.len() as u64);
        self.0.extend_from_slice(v.as_bytes());
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.push(0xf6);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.push(0x9f);
        while seq.next_element_seed(Transcode(self.0))?.is_some() {}
        self.0.push(0xff);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.push(0xbf);
        while map.next_key_seed(Transcode(self.0))?.is_some() {
            map.next_value_seed(Transcode(self.0))?;
        }
        self.0.push(0xff);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor_value(json: &str) -> ciborium::Value {
        ciborium::from_reader(to_cbor(json.as_bytes()).unwrap().as_slice()).unwrap()
    }

    #[test]
    fn every_json_value_transcodes_to_the_same_cbor_value() {
        let text = r#"{"a": [1, -1, 0, 24, 256, 65536, 4294967296, 18446744073709551615,
            -9223372036854775808, 1.5, -0.0, 1e300], "b": {"c": null, "d": true, "e": false},
            "f": "ü\n\u0000", "g": [], "h": {}}"#;
        let json: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(cbor_value(text), ciborium::Value::serialized(&json).unwrap());
    }

    #[test]
    fn bad_json_is_an_error_not_a_partial_document() {
        assert!(to_cbor(b"{\"a\":").unwrap_err().is_eof());
        assert!(to_cbor(b"{} x").is_err());
        assert!(to_cbor(b"[1,]").is_err());
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(to_cbor(deep.as_bytes()).unwrap_err().to_string().contains("recursion limit"));
    }
}
