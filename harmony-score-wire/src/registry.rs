//! The `DeviceScore` wire trait and the registry of Score tags a binary supports.

use harmony_topology::{LocalDeviceTopology, Score};

/// A Score that can travel to a device: the Harmony [`Score`] on the
/// device's topology, serialized with `typetag` under an explicit, versioned
/// tag in the field `type` (`{"type":"harmony.file/v1", …}`).
///
/// Register every implementation twice: `#[typetag::serde(name = "…/vN")]`
/// on the impl, and an `inventory::submit!` of a [`ScoreRegistration`] with
/// the same tag. `docs/writing-a-score.md` shows both.
#[typetag::serde(tag = "type")]
pub trait DeviceScore: Score<LocalDeviceTopology> {
    /// The one resource this Score owns on the device, as `kind:name`
    /// (`file:/etc/motd`, `container:web`). Two Scores of one device never
    /// own the same resource.
    fn resource(&self) -> String;

    /// The Score that undoes this one when it is pruned (a present file
    /// becomes absent); `None` when there is nothing to undo.
    fn undo(&self) -> Option<Box<dyn DeviceScore>>;
}

/// One registered Score tag, as listed by `harmony-agent scores` and
/// published in the device's info.
#[derive(Debug)]
pub struct ScoreRegistration {
    /// The wire tag, `<namespace>.<name>/v<N>`.
    pub tag: &'static str,
    /// One line saying what the Score does.
    pub summary: &'static str,
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
pub(crate) fn is_registered(tag: &str) -> bool {
    inventory::iter::<ScoreRegistration>.into_iter().any(|r| r.tag == tag)
}
