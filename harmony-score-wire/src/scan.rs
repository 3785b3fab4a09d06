//! A validating walk over a document's CBOR bytes that builds no value tree.
//!
//! Before serde reads a document, [`outline`] checks that the bytes are one
//! well-formed CBOR item nested at most `max_depth` deep, and notes what the
//! codec's checks need: the top-level fields it validates first and, for
//! each Score, its `type` and where it lies. Every length is checked against
//! the bytes that remain before anything is skipped or read, so a header
//! claiming 2^64 − 1 items costs nothing. The walk allocates only for the
//! Score list (at most `max_scores` entries) and for text split into chunks
//! (indefinite-length text, bounded by the document's size).
//!
//! The walk recurses once per level of nesting, so its stack is bounded by
//! `max_depth`, as ciborium's own recursion limit bounds the typed pass.

use std::borrow::Cow;
use std::ops::Range;

use crate::DecodeError;

/// What the codec checks before building Scores, as the walk found it.
#[derive(Debug, Default)]
pub(crate) struct Outline<'a> {
    /// Whether the document is an (untagged) map; the fields below are its.
    pub is_map: bool,
    /// `format`: `Some(None)` when present but not an unsigned integer.
    pub format: Option<Option<u64>>,
    /// `device_id`: `Some(None)` when present but not text.
    pub device_id: Option<Option<Cow<'a, str>>>,
    /// `deployment`: `Some(None)` when present but not text.
    pub deployment: Option<Option<Cow<'a, str>>>,
    /// `scores`, when it is an (untagged) array.
    pub scores: Option<ScoreList<'a>>,
    /// Where the (first) `health` value lies, so a check that does not
    /// decode can be named.
    pub health: Option<Range<usize>>,
}

/// The `scores` array: how many items it holds, and the first `max_scores`.
#[derive(Debug, Default)]
pub(crate) struct ScoreList<'a> {
    pub count: usize,
    pub items: Vec<ScoreOutline<'a>>,
    /// The whole array, its head included.
    pub span: Range<usize>,
}

/// One item of `scores`.
#[derive(Debug)]
pub(crate) struct ScoreOutline<'a> {
    /// The text of its first `type` key; `None` when it is not a map, has no
    /// `type`, or its first `type` is not text.
    pub tag: Option<Cow<'a, str>>,
    /// The whole item.
    pub span: Range<usize>,
    /// Where its first entry starts (just past the map's header).
    pub first_entry: usize,
    /// Its `type` key and value, when it is a map with one.
    pub tag_entry: Option<Range<usize>>,
}

impl ScoreOutline<'_> {
    /// Whether `type` is not the map's first entry.
    fn tag_is_late(&self) -> bool {
        self.tag_entry.as_ref().is_some_and(|entry| entry.start != self.first_entry)
    }
}

/// Walks `bytes` as one CBOR document within `max_depth`, collecting at most
/// `max_scores` Score outlines (the count goes on past them).
pub(crate) fn outline(bytes: &[u8], max_depth: usize, max_scores: usize) -> Result<Outline<'_>, DecodeError> {
    let mut walk = Walk { bytes, pos: 0, max_depth };
    let mut outline = Outline::default();
    match walk.head()? {
        Head::Map(len) => {
            outline.is_map = true;
            let depth = walk.enter(0)?;
            walk.each(len, 2, |walk| walk.document_field(&mut outline, depth, max_scores))?;
        }
        other => walk.skip_body(other, 0)?,
    }
    if walk.pos < bytes.len() {
        return Err(DecodeError::Malformed {
            message: format!("{} trailing bytes after the document", bytes.len() - walk.pos),
        });
    }
    Ok(outline)
}

/// A copy of `bytes` in which every Score's `type` entry comes first in its
/// map, or `None` when each already does (as every encoder here writes it).
///
/// `typetag` reads a Score straight from the bytes only when the tag comes
/// first; otherwise it buffers the fields before it into a generic tree,
/// which a Score padded with junk ahead of its `type` would blow up. Moving
/// the entry is a copy of byte ranges within each Score's own span, so every
/// span the outline holds stays where it was.
pub(crate) fn with_tags_first(bytes: &[u8], scores: &[ScoreOutline<'_>]) -> Option<Vec<u8>> {
    if !scores.iter().any(ScoreOutline::tag_is_late) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut copied = 0;
    for score in scores.iter().filter(|s| s.tag_is_late()) {
        let Some(entry) = score.tag_entry.clone() else { continue };
        out.extend_from_slice(&bytes[copied..score.first_entry]);
        out.extend_from_slice(&bytes[entry.clone()]);
        out.extend_from_slice(&bytes[score.first_entry..entry.start]);
        copied = entry.end;
    }
    out.extend_from_slice(&bytes[copied..]);
    Some(out)
}

/// An item's initial byte and argument. Lengths are `None` when indefinite.
#[derive(Debug, Clone, Copy)]
enum Head {
    Unsigned(u64),
    Negative,
    Bytes(Option<u64>),
    Text(Option<u64>),
    Array(Option<u64>),
    Map(Option<u64>),
    Tag,
    Scalar,
    Break,
}

const BREAK: u8 = 0xff;

fn malformed_at(pos: usize, what: &str) -> DecodeError {
    DecodeError::Malformed { message: format!("invalid CBOR at byte {pos}: {what}") }
}

struct Walk<'a> {
    bytes: &'a [u8],
    pos: usize,
    max_depth: usize,
}

impl<'a> Walk<'a> {
    fn malformed(&self, what: &str) -> DecodeError {
        malformed_at(self.pos, what)
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn peek(&self) -> Result<u8, DecodeError> {
        self.bytes.get(self.pos).copied().ok_or(DecodeError::Truncated)
    }

    /// The next `len` bytes; `len` may be anything a header can say.
    fn take(&mut self, len: u64) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(len).map_err(|_| DecodeError::Truncated)?;
        if len > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        let taken = &self.bytes[self.pos..self.pos + len];
        self.pos += len;
        Ok(taken)
    }

    /// The argument that follows an initial byte with additional info `info`.
    fn argument(&mut self, info: u8) -> Result<Option<u64>, DecodeError> {
        let width = match info {
            0..=23 => return Ok(Some(u64::from(info))),
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            31 => return Ok(None),
            _ => return Err(self.malformed("reserved additional information")),
        };
        Ok(Some(self.take(width)?.iter().fold(0, |n, &b| (n << 8) | u64::from(b))))
    }

    fn head(&mut self) -> Result<Head, DecodeError> {
        let initial = self.peek()?;
        self.pos += 1;
        let (major, info) = (initial >> 5, initial & 0x1f);
        let argument = self.argument(info)?;
        let definite =
            |walk: &Self| argument.ok_or_else(|| walk.malformed("indefinite length on a number or tag"));
        Ok(match major {
            0 => Head::Unsigned(definite(self)?),
            1 => definite(self).map(|_| Head::Negative)?,
            2 => Head::Bytes(argument),
            3 => Head::Text(argument),
            4 => Head::Array(argument),
            5 => Head::Map(argument),
            6 => definite(self).map(|_| Head::Tag)?,
            _ => match info {
                31 => Head::Break,
                // false, true, null, undefined and the three float widths:
                // the simple values serde can read (ciborium refuses others).
                20..=23 | 25..=27 => Head::Scalar,
                _ => return Err(self.malformed("unknown simple value")),
            },
        })
    }

    /// One level deeper than `depth`, if the limit allows.
    fn enter(&self, depth: usize) -> Result<usize, DecodeError> {
        if depth >= self.max_depth {
            return Err(DecodeError::TooDeep { limit: self.max_depth });
        }
        Ok(depth + 1)
    }

    /// Calls `each` once per item of an array (`per` 1) or entry of a map
    /// (`per` 2) of length `len`; `each` reads the whole item or entry.
    fn each(
        &mut self,
        len: Option<u64>,
        per: u64,
        mut each: impl FnMut(&mut Self) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        match len {
            Some(len) => {
                // Every item is at least one byte: a longer claim is cut short.
                if len > self.remaining() as u64 / per {
                    return Err(DecodeError::Truncated);
                }
                (0..len).try_for_each(|_| each(self))
            }
            None => loop {
                if self.peek()? == BREAK {
                    self.pos += 1;
                    return Ok(());
                }
                each(self)?;
            },
        }
    }

    /// Skips a byte or text string's content, after its header; text is
    /// checked as UTF-8.
    fn skip_string(&mut self, len: Option<u64>, text: bool) -> Result<(), DecodeError> {
        match len {
            Some(len) => {
                let at = self.pos;
                let content = self.take(len)?;
                if text && std::str::from_utf8(content).is_err() {
                    return Err(malformed_at(at, "text is not UTF-8"));
                }
                Ok(())
            }
            None => self.chunks(text, |_| ()),
        }
    }

    /// The chunks of an indefinite-length string, each handed to `sink`:
    /// each a definite string of the same type, a text chunk UTF-8 by itself.
    fn chunks(&mut self, text: bool, mut sink: impl FnMut(&'a [u8])) -> Result<(), DecodeError> {
        loop {
            let at = self.pos;
            let chunk = match self.head()? {
                Head::Break => return Ok(()),
                Head::Text(Some(len)) if text => self.take(len)?,
                Head::Bytes(Some(len)) if !text => self.take(len)?,
                _ => return Err(malformed_at(at, "bad chunk in an indefinite-length string")),
            };
            if text && std::str::from_utf8(chunk).is_err() {
                return Err(malformed_at(at, "text is not UTF-8"));
            }
            sink(chunk);
        }
    }

    /// Text content after its header, checked as UTF-8 once.
    fn text(&mut self, len: Option<u64>) -> Result<Cow<'a, str>, DecodeError> {
        let at = self.pos;
        if let Some(len) = len {
            let content = self.take(len)?;
            return std::str::from_utf8(content)
                .map(Cow::Borrowed)
                .map_err(|_| malformed_at(at, "text is not UTF-8"));
        }
        let mut joined = String::new();
        // Each chunk was checked as UTF-8 before it reaches the sink.
        self.chunks(true, |chunk| joined.push_str(&String::from_utf8_lossy(chunk)))?;
        Ok(Cow::Owned(joined))
    }

    /// Skips one whole item inside a container at `depth`.
    fn skip(&mut self, depth: usize) -> Result<(), DecodeError> {
        let head = self.head()?;
        self.skip_body(head, depth)
    }

    /// Skips what follows `head`; `depth` is that of the enclosing container.
    fn skip_body(&mut self, head: Head, depth: usize) -> Result<(), DecodeError> {
        match head {
            Head::Unsigned(_) | Head::Negative | Head::Scalar => Ok(()),
            Head::Bytes(len) => self.skip_string(len, false),
            Head::Text(len) => self.skip_string(len, true),
            Head::Array(len) => {
                let depth = self.enter(depth)?;
                self.each(len, 1, |walk| walk.skip(depth))
            }
            Head::Map(len) => {
                let depth = self.enter(depth)?;
                self.each(len, 2, |walk| {
                    walk.skip(depth)?;
                    walk.skip(depth)
                })
            }
            Head::Tag => {
                let depth = self.enter(depth)?;
                self.skip(depth)
            }
            Head::Break => Err(self.malformed("break outside an indefinite-length item")),
        }
    }

    /// An item (a map key, a field) read when it is untagged text, else
    /// skipped as `None`.
    fn text_or_skip(&mut self, depth: usize) -> Result<Option<Cow<'a, str>>, DecodeError> {
        match self.head()? {
            Head::Text(len) => self.text(len).map(Some),
            other => self.skip_body(other, depth).map(|()| None),
        }
    }

    /// An item read when it is an unsigned integer, else skipped as `None`.
    fn unsigned_or_skip(&mut self, depth: usize) -> Result<Option<u64>, DecodeError> {
        match self.head()? {
            Head::Unsigned(n) => Ok(Some(n)),
            other => self.skip_body(other, depth).map(|()| None),
        }
    }

    /// One entry of the document's map, at `depth` (1). The first of each
    /// field counts, as it did when a value tree was searched.
    fn document_field(
        &mut self,
        outline: &mut Outline<'a>,
        depth: usize,
        max_scores: usize,
    ) -> Result<(), DecodeError> {
        match self.text_or_skip(depth)?.as_deref() {
            Some("format") if outline.format.is_none() => {
                outline.format = Some(self.unsigned_or_skip(depth)?)
            }
            Some("device_id") if outline.device_id.is_none() => {
                outline.device_id = Some(self.text_or_skip(depth)?);
            }
            Some("deployment") if outline.deployment.is_none() => {
                outline.deployment = Some(self.text_or_skip(depth)?);
            }
            Some("scores") if outline.scores.is_none() => outline.scores = self.scores(depth, max_scores)?,
            Some("health") if outline.health.is_none() => {
                let start = self.pos;
                self.skip(depth)?;
                outline.health = Some(start..self.pos);
            }
            _ => self.skip(depth)?,
        }
        Ok(())
    }

    /// The `scores` value: `None` when it is not an array.
    fn scores(&mut self, depth: usize, max_scores: usize) -> Result<Option<ScoreList<'a>>, DecodeError> {
        let start = self.pos;
        let len = match self.head()? {
            Head::Array(len) => len,
            other => return self.skip_body(other, depth).map(|()| None),
        };
        let depth = self.enter(depth)?;
        // Room for the items up front, bounded by the bytes left (each
        // takes one at least): a false length costs no more than the document.
        let expected = len.map_or(0, |len| usize::try_from(len).unwrap_or(usize::MAX));
        let mut list = ScoreList {
            items: Vec::with_capacity(expected.min(max_scores).min(self.remaining())),
            ..ScoreList::default()
        };
        self.each(len, 1, |walk| {
            let score = walk.score(depth)?;
            list.count += 1;
            if list.items.len() < max_scores {
                list.items.push(score);
            }
            Ok(())
        })?;
        list.span = start..self.pos;
        Ok(Some(list))
    }

    /// One item of `scores`, in the array at `depth`.
    fn score(&mut self, depth: usize) -> Result<ScoreOutline<'a>, DecodeError> {
        let start = self.pos;
        let head = self.head()?;
        let mut score =
            ScoreOutline { tag: None, span: start..start, first_entry: self.pos, tag_entry: None };
        match head {
            Head::Map(len) => {
                let depth = self.enter(depth)?;
                self.each(len, 2, |walk| {
                    let entry = walk.pos;
                    let key = walk.text_or_skip(depth)?;
                    if score.tag_entry.is_none() && key.as_deref() == Some("type") {
                        score.tag = walk.text_or_skip(depth)?;
                        score.tag_entry = Some(entry..walk.pos);
                        Ok(())
                    } else {
                        walk.skip(depth)
                    }
                })?;
            }
            other => self.skip_body(other, depth)?,
        }
        score.span.end = self.pos;
        Ok(score)
    }
}

#[cfg(test)]
mod tests {
    use ciborium::Value;

    use super::*;

    fn walk(bytes: &[u8]) -> Result<Outline<'_>, DecodeError> {
        outline(bytes, 4, 8)
    }

    /// A map in the order given (serde_json's maps would sort the keys).
    fn map(entries: Vec<(&str, Value)>) -> Value {
        Value::Map(entries.into_iter().map(|(k, v)| (Value::Text(k.into()), v)).collect())
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn cbor(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out).unwrap();
        out
    }

    fn is_malformed(result: Result<Outline<'_>, DecodeError>) -> bool {
        matches!(result, Err(DecodeError::Malformed { .. }))
    }

    #[test]
    fn lengths_past_the_end_are_truncated_whatever_their_size() {
        // Byte string, text, array, map: 8-byte lengths near u64::MAX, then 1, 0.
        for major in [0x5b, 0x7b, 0x9b, 0xbb] {
            for len in [u64::MAX, u64::MAX / 2 + 1, u64::MAX / 2, 1 << 32, 2] {
                let mut bytes = vec![major];
                bytes.extend(len.to_be_bytes());
                bytes.push(0);
                assert_eq!(walk(&bytes).unwrap_err(), DecodeError::Truncated, "{major:#x} {len}");
            }
        }
        for cut in [&[][..], &[0x18], &[0x19, 1], &[0x1b, 0, 0, 0], &[0x62, b'a'], &[0x82, 1], &[0x9f, 1]] {
            assert_eq!(walk(cut).unwrap_err(), DecodeError::Truncated, "{cut:x?}");
        }
    }

    #[test]
    fn indefinite_items_breaks_and_reserved_values_are_checked() {
        // [_ 1, [_ ], {_ "a": h'' (_ h'01' h'02')}, (_ "x" "y")]
        let ok = [
            0x9f, 0x01, 0x9f, 0xff, 0xbf, 0x61, b'a', 0x5f, 0x41, 1, 0x41, 2, 0xff, 0xff, 0x7f, 0x61, b'x',
            0x61, b'y', 0xff, 0xff,
        ];
        assert!(walk(&ok).is_ok());
        assert!(is_malformed(walk(&[0xff])), "a break alone");
        assert!(is_malformed(walk(&[0xbf, 0x01, 0xff])), "a break where a value belongs");
        assert!(is_malformed(walk(&[0x1f])), "an indefinite integer");
        assert!(is_malformed(walk(&[0xdf, 0x01])), "an indefinite tag");
        assert!(is_malformed(walk(&[0x1c])), "reserved additional information");
        assert!(is_malformed(walk(&[0xf0])), "an unassigned simple value");
        assert!(is_malformed(walk(&[0xf8, 0x20])), "a one-byte simple value");
        assert!(is_malformed(walk(&[0x7f, 0x41, 0x00, 0xff])), "a byte chunk in text");
        assert!(is_malformed(walk(&[0x7f, 0x7f, 0xff, 0xff])), "a nested indefinite chunk");
        assert!(is_malformed(walk(&[0x62, 0xc3, 0x28])), "text that is not UTF-8");
        assert!(is_malformed(walk(&[0x01, 0x02])), "trailing bytes");
        for scalar in
            [&[0xf4][..], &[0xf7], &[0xf9, 0, 0], &[0xfa, 0, 0, 0, 0], &[0xfb, 0, 0, 0, 0, 0, 0, 0, 0]]
        {
            assert!(walk(scalar).is_ok(), "{scalar:x?}");
        }
    }

    #[test]
    fn depth_counts_arrays_maps_and_tags() {
        // Four levels pass a limit of 4; a fifth, of any kind, does not.
        assert!(walk(&[0x81, 0x81, 0x81, 0x81, 0x00]).is_ok());
        assert!(walk(&[0x81, 0xa1, 0x00, 0xc1, 0x81, 0x00]).is_ok());
        for deeper in [
            &[0x81, 0x81, 0x81, 0x81, 0x81, 0x00][..],
            &[0x81, 0x81, 0x81, 0x81, 0xc1, 0x00],
            &[0x81, 0x81, 0x81, 0x81, 0xa0],
        ] {
            assert_eq!(walk(deeper).unwrap_err(), DecodeError::TooDeep { limit: 4 }, "{deeper:x?}");
        }
        let mut bomb = vec![0x9f; 1_000_000];
        bomb.push(0);
        assert_eq!(walk(&bomb).unwrap_err(), DecodeError::TooDeep { limit: 4 });
    }

    #[test]
    fn the_outline_holds_the_first_of_each_field_and_every_tag() {
        let score = |entries| map(entries);
        let bytes = cbor(&map(vec![
            ("format", Value::from(1)),
            ("device_id", text("dev-1")),
            ("deployment", Value::from(7)),
            ("device_id", text("dev-2")),
            (
                "scores",
                Value::Array(vec![
                    score(vec![("type", text("a/v1")), ("x", Value::from(1))]),
                    score(vec![("x", Value::from(1)), ("type", text("b/v1")), ("type", text("c/v1"))]),
                    Value::from(5),
                    score(vec![("type", Value::from(5))]),
                ]),
            ),
        ]));
        let outline = walk(&bytes).unwrap();
        assert!(outline.is_map);
        assert_eq!(outline.format, Some(Some(1)));
        assert_eq!(outline.device_id, Some(Some(Cow::Borrowed("dev-1"))));
        assert_eq!(outline.deployment, Some(None));
        let scores = outline.scores.unwrap();
        assert_eq!(scores.count, 4);
        // The span is the array, head and all: the codec cuts it out.
        let array: Value = ciborium::from_reader(&bytes[scores.span.clone()]).unwrap();
        assert_eq!(array.as_array().map(Vec::len), Some(4));
        assert_eq!(scores.span.end, bytes.len(), "scores is the last entry");
        let tags: Vec<_> = scores.items.iter().map(|s| s.tag.as_deref()).collect();
        assert_eq!(tags, [Some("a/v1"), Some("b/v1"), None, None]);
        let late: Vec<_> = scores.items.iter().map(ScoreOutline::tag_is_late).collect();
        assert_eq!(late, [false, true, false, false]);
        assert!(!walk(&[0xc1, 0xa0]).unwrap().is_map, "a tagged map is not a document");
        let not_array = cbor(&map(vec![("scores", map(vec![("a", Value::from(1))]))]));
        assert!(walk(&not_array).unwrap().scores.is_none());
    }

    #[test]
    fn scores_past_the_limit_are_counted_not_kept() {
        let many = (0..20).map(|_| map(vec![("type", text("a/v1"))])).collect();
        let bytes = cbor(&map(vec![("scores", Value::Array(many))]));
        let scores = walk(&bytes).unwrap().scores.unwrap();
        assert_eq!((scores.count, scores.items.len()), (20, 8));
    }

    #[test]
    fn a_late_tag_moves_first_and_nothing_else_changes() {
        let pairs = Value::Array(vec![Value::from(1), Value::from(2)]);
        let late = cbor(&map(vec![(
            "scores",
            Value::Array(vec![
                map(vec![("type", text("a/v1"))]),
                map(vec![
                    ("x", pairs.clone()),
                    ("y", text("z")),
                    ("type", text("b/v1")),
                    ("w", Value::from(0)),
                ]),
                map(vec![("v", Value::from(0)), ("type", text("c/v1"))]),
            ]),
        )]));
        let outline = walk(&late).unwrap();
        let moved = with_tags_first(&late, &outline.scores.as_ref().unwrap().items).unwrap();
        let expected = cbor(&map(vec![(
            "scores",
            Value::Array(vec![
                map(vec![("type", text("a/v1"))]),
                map(vec![("type", text("b/v1")), ("x", pairs), ("y", text("z")), ("w", Value::from(0))]),
                map(vec![("type", text("c/v1")), ("v", Value::from(0))]),
            ]),
        )]));
        assert_eq!(moved, expected);
        let first = cbor(&map(vec![("scores", Value::Array(vec![map(vec![("type", text("a/v1"))])]))]));
        assert!(with_tags_first(&first, &walk(&first).unwrap().scores.unwrap().items).is_none());
    }
}
