//! Persistence: each shard's write-ahead log and snapshots on disk, and recovery from
//! them (docs/PERSISTENCE.md). Uses `store` and the shared files only; `node` drives it.

pub mod apply;
pub mod backup;
pub mod files;
pub mod record;
pub mod recover;
pub mod recut;
pub mod snapshot;
pub mod writer;
