//! Replication: every write published to MQTT and applied by every peer. The wire format,
//! the peer table, the replication thread, the embedded broker and `merkle-kv watch`.
//! Uses `store` and `node::inbox` only.

pub mod broker;
pub mod changes;
pub mod inbound;
pub mod link;
pub mod mqtt;
pub mod outbound;
pub mod peers;
pub mod stats;
pub mod thread;
pub mod watch;
