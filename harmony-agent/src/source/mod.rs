//! Where desired state comes from: NATS JetStream KV, or a folder of documents.

pub mod dir;
pub mod nats;
