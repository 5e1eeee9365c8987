//! MerkleKV: an eventually consistent, peer-to-peer key-value store.
//!
//! # Layout
//! - [`protocol`]: bytes → lines → [`protocol::Command`]s. Pure.
//! - [`keyspace`]: key → hash → Merkle bucket → shard. The only place that routes.
//! - [`merkle`]: the fixed 2^16-bucket tree, leaf digests and incremental roots. Pure.
//! - [`shard`]: one shard's entries and Merkle subtree. Owned by one thread; no I/O.
//! - [`version`]: entry versions (hybrid logical clock + origin) and the LWW rule. Pure.
//! - [`ops`]: the op messages a shard executes and what they return.
//! - [`dispatch`]: commands → per-shard ops → replies in order. Pure.
//! - [`changes`]: the replication wire format (change events in MQTT payloads). Pure.
//! - [`peers`]: presence records and the peer table.
//! - [`replication`]: the MQTT replication thread (I/O edge).
//! - [`broker`]: the embedded MQTT broker (rumqttd).
//! - [`sync`]: anti-entropy messages, their server side and the exchange. Pure.
//! - [`antientropy`]: exchanges over TCP, per-peer results (I/O edge).
//! - [`bootstrap`]: readiness at start (LOADING until caught up with a peer).
//! - [`connection`]: a client connection's read/execute/write loop (I/O edge).
//! - [`server`]: threads, accept loop, signals, shutdown (I/O edge).
//! - [`config`]: TOML + environment configuration and its validation.
//! - [`logging`]: `tracing` set-up from `[logging]`.
//!
//! ARCHITECTURE.md at the repository root has the whole map and the invariants.

pub mod antientropy;
pub mod bootstrap;
pub mod broker;
pub mod changes;
pub mod config;
pub mod connection;
pub mod dispatch;
pub mod keyspace;
pub mod logging;
pub mod merkle;
pub mod ops;
pub mod peers;
pub mod protocol;
pub mod replication;
pub mod server;
pub mod shard;
pub mod sync;
pub mod version;
pub mod watch;
