//! Anti-entropy: peers compare Merkle roots, descend into divergent branches and repair
//! exactly the keys that differ. Uses `store` and `node::inbox` only.

pub mod client;
pub mod exchange;
pub mod log;
pub mod messages;
pub mod periodic;
pub mod serve;
