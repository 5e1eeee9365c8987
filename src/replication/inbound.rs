//! The receive side of replication, free of I/O: a payload from the updates topic is
//! decoded within its limits and split by shard ([`route`]), and each shard merges its
//! part with last-write-wins ([`apply_remote`], run on the shard's own thread).

use crate::node::inbox::{RemoteChanges, RemoteEvent};
use crate::replication::changes::{decode, DecodeError, Limits};
use crate::store::keyspace::{shard_of_bucket, KeyHash};
use crate::store::shard::Shard;
use crate::store::version::Version;
use crate::wire::Span;
use bytes::Bytes;

/// What applying a batch of remote changes did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Changes that won the merge and were stored.
    pub applied: u64,
    /// Changes that would have won but found no room (`StorageFull`).
    pub failed: u64,
}

/// Apply replicated changes with the LWW merge. Changes older than the tombstone grace
/// period are ignored, sets as well as deletes: the delete that may have followed an
/// old set could already be purged everywhere, and applying the set alone would bring
/// the key back. (Anti-entropy, which compares states rather than replaying changes,
/// does apply old sets.) A flush is applied first; the order does not matter, since
/// the flush marker drops older entries and refuses older ones that come later alike.
pub fn apply_remote(shard: &mut Shard, changes: &RemoteChanges, now_us: u64) -> Applied {
    if let Some(hlc) = changes.flush {
        let origin = changes.origin;
        shard.apply_flush(Version { hlc, origin }, now_us);
    }
    let grace = shard.tombstone_grace_us();
    let full_before = shard.stats.storage_full;
    let mut applied = 0;
    for e in &changes.events {
        if e.hlc.saturating_add(grace) < now_us {
            continue;
        }
        let key = e.key.get(&changes.data);
        let value = e.value.map(|v| v.get(&changes.data));
        let v = Version {
            hlc: e.hlc,
            origin: changes.origin,
        };
        applied += u64::from(shard.apply(e.hash, key, value, v, now_us));
    }
    Applied {
        applied,
        failed: shard.stats.storage_full - full_before,
    }
}

/// Split a decoded payload into per-shard batches (index = shard).
pub fn route(data: &Bytes, shard_bits: u32, limits: Limits) -> Result<Routed, DecodeError> {
    let decoded = decode(data, limits)?;
    let mut per_shard: Vec<Vec<RemoteEvent>> = (0..1 << shard_bits).map(|_| Vec::new()).collect();
    for e in &decoded.events {
        let hash = KeyHash::of(e.key);
        per_shard[shard_of_bucket(hash.bucket(), shard_bits)].push(RemoteEvent {
            hash,
            key: Span::of(data, e.key),
            value: e.value.map(|v| Span::of(data, v)),
            hlc: e.hlc,
        });
    }
    Ok(Routed {
        node_id: decoded.node_id.to_string(),
        origin: decoded.origin,
        events: decoded.events.len() + usize::from(decoded.flush.is_some()),
        per_shard,
        flush: decoded.flush,
    })
}

pub struct Routed {
    pub node_id: String,
    pub origin: u32,
    /// Sets and deletes, plus one for a flush.
    pub events: usize,
    pub per_shard: Vec<Vec<RemoteEvent>>,
    /// For every shard: the clock of the payload's newest flush.
    pub flush: Option<u64>,
}
