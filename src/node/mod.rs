//! The node: threads and their inboxes, client sessions and connections, dispatch of
//! commands to shards, INFO, readiness. The top of the tree: it may use every other
//! folder.

pub mod backup;
pub mod bootstrap;
pub mod connection;
pub mod disk;
pub mod dispatch;
pub mod inbox;
pub mod info;
pub mod ops;
pub mod server;
pub mod session;
pub mod shared;
