//! The `Inventory`: the physical material a topology runs on.

/// The hosts and roles a topology is made of. A device agent runs on one
/// device, so its inventory is usually [`Inventory::empty`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Host names known to this inventory.
    pub hosts: Vec<String>,
}

impl Inventory {
    /// An inventory with nothing in it.
    pub fn empty() -> Self {
        Self::default()
    }
}
