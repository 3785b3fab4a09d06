//! The Harmony core (Score → Topology → Interpret) and the topology of one device.
//!
//! Names and shapes mirror Harmony's own so that a Harmony Score moves over
//! with few edits: a [`Score`] is declarative data, its [`Interpret`] does the
//! work against a [`Topology`], and the [`Maestro`] runs them.

mod artifact;
mod container;
mod interpret;
mod inventory;
pub mod local;
mod maestro;
mod package;
pub mod run;
mod score;
mod service;
pub mod text;
mod topology;

pub use artifact::{ArtifactError, ArtifactStore, FetchedArtifact};
pub use container::{
    parse_memory, BindMount, ContainerError, ContainerLogs, ContainerRuntime, ContainerSpec, ContainerState,
    ContainerStatus, NetworkMode, PortMapping, PortMappingError, Protocol, RestartPolicy, MIN_MEMORY_BYTES,
};
pub use interpret::{
    Id, Interpret, InterpretError, InterpretErrorKind, InterpretName, InterpretStatus, Outcome, Version,
};
pub use inventory::Inventory;
pub use local::{Filesystem, FilesystemError, LocalDeviceTopology, PathEntry, Podman};
pub use maestro::{Maestro, MaestroError};
pub use package::{
    check_package_name, check_package_version, PackageError, PackageManager, PackageState,
    MAX_PACKAGE_NAME_BYTES, MAX_PACKAGE_VERSION_BYTES,
};
pub use run::RunSignal;
pub use score::Score;
pub use service::{
    check_unit_name, Enablement, ServiceError, ServiceManager, ServiceRuntime, UnitState,
    MAX_UNIT_NAME_BYTES, UNIT_SUFFIXES,
};
pub use text::{bound_in_place, bounded_text, is_bounded, log_text};
pub use topology::{PreparationError, PreparationOutcome, Topology};

/// Re-exported so that Score crates implement [`Interpret`] with the same macro.
pub use async_trait::async_trait;
