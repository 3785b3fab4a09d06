//! The `Score` trait: declarative desired state for a topology.

use std::fmt::Debug;

use crate::{Interpret, Topology};

/// Declarative desired state that knows how to build the [`Interpret`] doing
/// the work on a topology `T`.
///
/// Implement it generically over any topology with the capabilities the
/// Score needs (`impl<T: Topology + Filesystem> Score<T> for FileScore`), so
/// the same struct runs on an operator's topology and on a device.
pub trait Score<T: Topology>: Debug + Send + Sync {
    /// Builds the Interpret that makes this Score true on `T`.
    fn create_interpret(&self) -> Box<dyn Interpret<T>>;
    /// A human-readable name such as `"file [/etc/motd]"`.
    fn name(&self) -> String;
}
