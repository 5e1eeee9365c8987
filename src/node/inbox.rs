//! What travels into a thread's inbox: client connections, ops for its shard and their
//! replies, remote changes, anti-entropy requests. The one module of `node` that
//! `replication` and `antientropy` may use: they reach shards only through it.

use crate::antientropy::messages::Request;
use crate::antientropy::serve::Part;
use crate::node::ops::{Outcome, ShardOp};
use crate::store::keyspace::KeyHash;
use crate::wire::Span;
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Ops for one shard, sharing the received bytes they point into.
pub struct ShardRequest {
    pub data: bytes::Bytes,
    pub ops: Vec<ShardOp>,
    pub reply: oneshot::Sender<ShardReply>,
}

pub enum ThreadMsg {
    /// A new client connection to serve on this thread.
    Conn(std::net::TcpStream),
    /// Ops for the shard this thread owns.
    Ops(ShardRequest),
    /// Changes made on another node, for the shard this thread owns.
    Apply(RemoteChanges),
    /// An anti-entropy request: answer this shard's share.
    Sync {
        request: Arc<Request>,
        reply: oneshot::Sender<Part>,
    },
    /// Drop this shard's entries older than `hlc` (a rejoin after a long isolation);
    /// replies with how many were dropped.
    Forget {
        hlc: u64,
        reply: oneshot::Sender<u64>,
    },
    /// Take a snapshot of this shard now (graceful shutdown, so the restart reads a
    /// snapshot instead of the log); replies when it is handed to the disk writer.
    Snapshot {
        reply: oneshot::Sender<()>,
    },
    Stop,
}

/// What another shard thread sends back for a list of ops: their reply bytes back to
/// back, and per op its end offset in `out` and its outcome.
pub struct ShardReply {
    pub out: Vec<u8>,
    pub ends: Vec<(usize, Outcome)>,
    /// The shard's log batch holding these ops' changes, if they made any and the node
    /// persists: under `fsync = always` the replies wait until it is on disk.
    pub batch: Option<u64>,
}

/// Remote changes for one shard: spans into a received payload.
pub struct RemoteChanges {
    pub data: Bytes,
    pub origin: u32,
    pub events: Vec<RemoteEvent>,
    /// The clock of the payload's newest flush (a flush is node-wide: every shard
    /// gets it).
    pub flush: Option<u64>,
}

pub struct RemoteEvent {
    pub hash: KeyHash,
    pub key: Span,
    pub value: Option<Span>,
    pub hlc: u64,
}
