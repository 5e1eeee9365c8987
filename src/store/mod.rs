//! The store: keys and their routing, versions and the merge rule, the Merkle tree, and
//! one shard's entries. Pure data owned by one thread; no I/O, no locks. Imports none of
//! the other folders.

pub mod entry;
pub mod journal;
pub mod keyspace;
pub mod merkle;
pub mod shard;
pub mod version;
