//! MerkleKV: an eventually consistent, peer-to-peer key-value store.
//!
//! # Layout
//! - [`store`]: keys, versions, the Merkle tree and one shard's data. Pure; owned by one thread.
//! - [`protocol`]: bytes → lines → commands (the native text protocol). Pure.
//! - [`replication`]: the MQTT replication wire format, its thread and the broker.
//! - [`antientropy`]: Merkle anti-entropy messages, exchanges and their schedule.
//! - [`persist`]: each shard's write-ahead log and snapshots, and recovery from them.
//! - [`node`]: threads, connections, dispatch to shards, readiness; uses every part above.
//! - [`config`], [`logging`], [`limits`], [`wire`]: shared by every part.
//!
//! Dependencies run one way: `store` and `protocol` use none of the folders;
//! `replication` and `antientropy` use `store` (and `node::inbox`); `persist` uses
//! `store`; `node` uses them all.
//! `tests/architecture.rs` checks it. ARCHITECTURE.md has the whole map and the invariants.

#![deny(unsafe_code)]

pub mod antientropy;
pub mod config;
pub mod limits;
pub mod logging;
pub mod node;
pub mod persist;
pub mod protocol;
pub mod replication;
pub mod store;
pub mod wire;

/// This build's version, as INFO and presence records report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
