//! The `DeviceScore` wire trait, its one-line registration, and the registry of tags a binary supports.

use std::sync::OnceLock;
use std::time::Duration;

use harmony_topology::{LocalDeviceTopology, Score};

use crate::{Privilege, ResourceId, ScoreDecoder, ScoreValidationError};

/// A Score that can travel to a device: the Harmony [`Score`] on the
/// device's topology, serialized with `typetag` under an explicit, versioned
/// tag in the field `type` (`{"type":"harmony.file/v1", …}`).
///
/// Register an implementation with [`device_score!`](crate::device_score),
/// which spells the tag once for both `typetag` and the [`ScoreRegistration`].
#[typetag::serde(tag = "type")]
pub trait DeviceScore: Score<LocalDeviceTopology> {
    /// Checks every field before anything of the document runs: paths,
    /// modes, names, whatever the Score needs. The codec calls it on every
    /// Score it decodes; a document with one invalid Score is refused whole.
    fn validate(&self) -> Result<(), ScoreValidationError>;

    /// The one resource this Score owns on the device. Two Scores of one
    /// device never own the same resource.
    fn resource(&self) -> ResourceId;

    /// The Score that undoes this one when it is pruned (a present file
    /// becomes absent); `None` when there is nothing to undo.
    fn undo(&self) -> Option<Box<dyn DeviceScore>>;

    /// How long this Score's Interpret may run before it is a `timeout`
    /// failure; `None`: the agent's default for the tag.
    fn interpret_timeout(&self) -> Option<Duration> {
        None
    }

    /// The privileges this Score needs on the device (a setuid mode, a
    /// privileged container), each granted only by the device's policy: a
    /// document with a Score needing one the policy does not grant is
    /// refused whole (`policy_denied`). Declare every one the Score's
    /// fields ask for; none by default.
    fn privileges(&self) -> Vec<Privilege> {
        Vec::new()
    }

    /// Paths on the device this Score uses besides its resource (a
    /// container's bind-mount sources), absolute and valid. The device's
    /// `allowed_paths` judge them as they judge resource paths, but they
    /// are not owned: two Scores may use one path. None by default.
    fn used_paths(&self) -> Vec<String> {
        Vec::new()
    }

    /// This Score's [`HealthCheck`](crate::HealthCheck) companion, if it
    /// has one: return `Some(self)` from a Score that implements it. Its
    /// checks run after an apply of a document that asks for verification.
    fn health(&self) -> Option<&dyn crate::HealthCheck> {
        None
    }
}

/// Implements [`DeviceScore`] for a Score and registers it for the wire,
/// with its tag spelled once:
///
/// ```ignore
/// harmony_score_wire::device_score! {
///     tag: "harmony.file/v1",
///     summary: "a file with the given content and mode, or its absence",
///     impl DeviceScore for FileScore {
///         fn validate(&self) -> Result<(), ScoreValidationError> { … }
///         fn resource(&self) -> ResourceId { … }
///         fn undo(&self) -> Option<Box<dyn DeviceScore>> { … }
///     }
/// }
/// ```
///
/// It emits the `#[typetag::serde(name = …)]` impl (the crate using it
/// depends on `typetag`) and an `inventory` [`ScoreRegistration`] with the
/// same tag and the type's own decoder, which the codec uses instead of
/// typetag's dispatch. A device Score is a struct with named fields (its
/// serde form a map, as typetag's internally tagged form requires of it).
#[macro_export]
macro_rules! device_score {
    (
        tag: $tag:literal,
        summary: $summary:literal,
        impl DeviceScore for $ty:ty { $($body:tt)* }
    ) => {
        #[::typetag::serde(name = $tag)]
        impl $crate::DeviceScore for $ty {
            $($body)*
        }
        $crate::inventory::submit! {
            $crate::ScoreRegistration {
                tag: $tag,
                summary: $summary,
                decode: $crate::ScoreDecoder::of::<$ty>(),
            }
        }
    };
}

/// One registered Score tag, as listed by `harmony-agent scores` and
/// published in the device's info.
#[derive(Debug)]
pub struct ScoreRegistration {
    /// The wire tag, `<namespace>.<name>/v<N>`.
    pub tag: &'static str,
    /// One line saying what the Score does.
    pub summary: &'static str,
    /// Reads the Score's CBOR straight into its type.
    pub decode: ScoreDecoder,
}

impl ScoreRegistration {
    /// The tag's version suffix (`v1` of `harmony.file/v1`).
    pub fn version(&self) -> &'static str {
        self.tag.rsplit_once('/').map_or("", |(_, v)| v)
    }
}

inventory::collect!(ScoreRegistration);

/// Every Score registration linked into this binary, sorted by tag.
pub fn registered_scores() -> Vec<&'static ScoreRegistration> {
    let mut all: Vec<_> = inventory::iter::<ScoreRegistration>.into_iter().collect();
    all.sort_by_key(|r| r.tag);
    all
}

/// Whether `tag` is registered in this binary.
pub fn is_registered(tag: &str) -> bool {
    !matches!(lookup(tag), Lookup::Unknown)
}

/// What a tag names in this binary.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lookup {
    Unknown,
    /// Registered once: its decoder.
    One(ScoreDecoder),
    /// Registered by more than one type (two crates chose one tag): no
    /// Score with it can be decoded, as typetag refuses such a tag.
    Ambiguous,
}

/// How `tag` resolves, from a table sorted once per process (the
/// registrations are fixed at link time).
pub(crate) fn lookup(tag: &str) -> Lookup {
    static TABLE: OnceLock<Vec<(&'static str, Lookup)>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table: Vec<(&'static str, Lookup)> = Vec::new();
        for registration in registered_scores() {
            match table.last_mut() {
                Some((last, entry)) if *last == registration.tag => *entry = Lookup::Ambiguous,
                _ => table.push((registration.tag, Lookup::One(registration.decode))),
            }
        }
        table
    });
    table.binary_search_by(|(t, _)| (*t).cmp(tag)).map_or(Lookup::Unknown, |i| table[i].1)
}
