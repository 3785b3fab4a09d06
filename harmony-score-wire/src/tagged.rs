//! Each Score read straight into its own type, chosen by its tag, without typetag's erased dispatch.
//!
//! typetag reads a `Box<dyn DeviceScore>` through `erased_serde`: every
//! key, field and string of every Score crosses a virtual call and a boxed
//! `Any`, which was most of a document's decode time. The codec knows each
//! Score's tag and bytes before serde runs (the scan found them), so it
//! calls the registered type's own decoder ([`ScoreDecoder`]) on those
//! bytes instead: monomorphic serde from CBOR into the struct.
//!
//! The struct sees exactly what typetag shows it (its internally tagged
//! form, after the codec moved each `type` entry first): the map that
//! follows the leading `type` entry, each key read as a string.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::forward_to_deserialize_any;

use crate::DeviceScore;

/// The error of decoding one Score's bytes.
pub(crate) type ScoreDecodeError = ciborium::de::Error<std::io::Error>;

/// Reads one Score's bytes as one registered type: made for each Score by
/// [`device_score!`](crate::device_score) and kept in its
/// [`ScoreRegistration`](crate::ScoreRegistration).
#[derive(Clone, Copy)]
pub struct ScoreDecoder(DecodeFn);

/// Reads one Score from the front of the bytes, leaving what it did not read.
type DecodeFn = fn(&mut &[u8], &mut ScoreReader) -> Result<Box<dyn DeviceScore>, ScoreDecodeError>;

impl ScoreDecoder {
    /// The decoder of `S`, for its registration.
    pub const fn of<S: DeviceScore + DeserializeOwned + 'static>() -> Self {
        Self(decode_boxed::<S>)
    }

    /// `bytes`, one Score (a map whose first entry is its `type`), as the
    /// registered type; `Ok(None)` when the Score's `Deserialize` stopped
    /// before the end of its bytes.
    pub(crate) fn decode(
        self,
        bytes: &[u8],
        reader: &mut ScoreReader,
    ) -> Result<Option<Box<dyn DeviceScore>>, ScoreDecodeError> {
        let mut rest = bytes;
        let score = (self.0)(&mut rest, reader)?;
        Ok(rest.is_empty().then_some(score))
    }
}

impl fmt::Debug for ScoreDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScoreDecoder")
    }
}

/// What decoding a document's Scores shares: ciborium's scratch buffer and
/// the recursion limit.
pub(crate) struct ScoreReader {
    /// ciborium's own size (`from_reader`'s): keys and enum variants longer
    /// than this are refused, as they were when typetag read them.
    scratch: Box<[u8; 4096]>,
    recursion_limit: usize,
}

impl ScoreReader {
    pub(crate) fn new(recursion_limit: usize) -> Self {
        Self { scratch: Box::new([0; 4096]), recursion_limit }
    }
}

/// Reads one `S` from the front of `bytes`, leaving what it did not read.
fn decode_boxed<S: DeviceScore + DeserializeOwned + 'static>(
    bytes: &mut &[u8],
    reader: &mut ScoreReader,
) -> Result<Box<dyn DeviceScore>, ScoreDecodeError> {
    // One scratch buffer for all of a document's Scores: ciborium's
    // `from_reader_with_recursion_limit` zeroes 4 KiB on the stack for each
    // call. The buffer form has a fixed recursion limit of 256, above what
    // the scan already allowed (it bounds the whole document's depth); only
    // a larger configured limit takes the form that honours it.
    let score: Tagged<S> = if reader.recursion_limit < 256 {
        ciborium::de::from_reader_with_buffer(bytes, &mut reader.scratch[..])?
    } else {
        ciborium::de::from_reader_with_recursion_limit(bytes, reader.recursion_limit)?
    };
    Ok(Box::new(score.0))
}

/// A Score in its internally tagged form: a map whose first entry is
/// `type`, then the Score's own fields.
struct Tagged<S>(S);

impl<'de, S: DeserializeOwned> de::Deserialize<'de> for Tagged<S> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(TaggedVisitor(PhantomData))
    }
}

struct TaggedVisitor<S>(PhantomData<S>);

impl<'de, S: DeserializeOwned> Visitor<'de> for TaggedVisitor<S> {
    type Value = Tagged<S>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn DeviceScore")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        // The codec dispatched on this tag and moved its entry first; the
        // value is read as typetag reads it, and its text was checked then.
        if map.next_key_seed(IsType)? != Some(true) {
            return Err(de::Error::custom("a Score's first entry is not its \"type\""));
        }
        map.next_value_seed(IsType)?;
        S::deserialize(Fields(map)).map(Tagged)
    }
}

/// Whether a text item is `type`, read with `deserialize_str` as typetag
/// reads a Score's first key and its tag.
struct IsType;

impl<'de> DeserializeSeed<'de> for IsType {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for IsType {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
        Ok(value == "type")
    }
}

/// The rest of a Score's map, as the Score's `Deserialize` sees it (what
/// typetag's `MapWithStringKeys` shows it): a map whose keys are read as
/// strings. A device Score is a struct with named fields; any other shape
/// gets serde's "invalid type: map" error.
struct Fields<A>(A);

impl<'de, A: MapAccess<'de>> Deserializer<'de> for Fields<A> {
    type Error = A::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_map(self)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Fields<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Self::Error> {
        self.0.next_key_seed(StringKey(seed))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Self::Error> {
        self.0.next_value_seed(seed)
    }
}

/// A key read with `deserialize_str`, whatever the field visitor asks for.
struct StringKey<K>(K);

impl<'de, K: DeserializeSeed<'de>> DeserializeSeed<'de> for StringKey<K> {
    type Value = K::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(StringKeyDeserializer(deserializer))
    }
}

struct StringKeyDeserializer<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for StringKeyDeserializer<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.0.deserialize_str(visitor)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}
