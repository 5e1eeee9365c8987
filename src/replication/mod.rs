//! Replication: every write published to MQTT and applied by every peer. The wire format
//! (changes), the link's state machine (link) and the thread that drives it (thread),
//! the shards' queue into it (outbound), the receive side (inbound), MQTT setup (mqtt),
//! counters (stats), the peer table, the embedded broker and `merkle-kv watch`.
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
