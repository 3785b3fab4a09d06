//! The Scores a Harmony device can run, one per module, each registered for the wire.
//!
//! Every module holds a `FooScore` (serde data), its `FooInterpret` (the
//! doing), its wire registration (one `device_score!`) and its tests. A new
//! Score is one new module here and one `mod` line below.

mod container;
mod directory;
mod file;
mod package;
mod systemd_unit;

use serde::{Deserialize, Serialize};

pub use container::{
    ImageArchive, Network, PodmanContainerInterpret, PodmanContainerScore, Restart, Volume, DEPLOYMENT_LABEL,
    MANAGED_LABEL, SPEC_LABEL,
};
pub use directory::{DirectoryInterpret, DirectoryScore};
pub use file::{FileInterpret, FileScore};
pub use package::{PackageInterpret, PackageScore, INSTALLED_BY_AGENT_DIR};
pub use systemd_unit::{ServiceState, SystemdUnitInterpret, SystemdUnitScore, MAX_UNIT_CONTENT_BYTES};

/// Whether a Score's resource should exist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceState {
    /// It exists as the Score describes (the default).
    #[default]
    Present,
    /// It does not exist.
    Absent,
}

/// Call once from a binary that never names a Score type otherwise: it makes
/// the linker keep this crate, and with it the Scores' wire registrations
/// (`typetag` and `inventory` silently lose crates that nothing references).
pub fn ensure_linked() {
    std::hint::black_box(octal(0o644));
}

/// Formats permission bits the way people write them (`0644`).
pub(crate) fn octal(mode: u32) -> String {
    format!("{mode:04o}")
}
