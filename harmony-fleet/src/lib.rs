//! The operator side of a Harmony device fleet: build, encode and deploy desired state.

pub use harmony_score_wire as wire;
