//! One shard's data: the key-value entries of its bucket range and its Merkle subtree.
//!
//! A `Shard` is plain data owned by exactly one thread; nothing here locks, blocks or
//! does I/O. Entries live in one small hash table per Merkle bucket, so a bucket's keys
//! can be listed without a scan (SCAN pages, and later anti-entropy listings), and every
//! write updates its leaf digest incrementally.

use crate::limits::{BUCKETS, BUCKET_BITS};
#[cfg(test)]
use crate::store::entry::ENTRY_OVERHEAD_BYTES;
use crate::store::entry::{entry_bytes, Entry};
use crate::store::journal::Journal;
use crate::store::keyspace::{shard_buckets, KeyHash};
use crate::store::merkle::{entry_digest, short_digest, xor_into, Digest, Subtree, EMPTY_LEAF};
use crate::store::version::{now_us, remote_wins, Clock, Version};
use hashbrown::hash_table::Entry as Slot;
use hashbrown::HashTable;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// How far ahead of this node's clock a remote version may be and still be applied.
pub const CLOCK_SKEW_MAX_US: u64 = 5 * 60 * 1_000_000;

/// An entry copied out of a shard (anti-entropy transfers these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedEntry {
    pub key: Vec<u8>,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
    pub version: Version,
}

/// Default for `[storage] tombstone_grace_seconds`.
pub const TOMBSTONE_GRACE_SECONDS_DEFAULT: u64 = 86_400;

/// How many entries one SCAN call may examine, so a prefix that matches little cannot
/// hold the shard thread for long; the cursor says where to go on.
pub const SCAN_EXAMINED_MAX: usize = 16 * 1024;

/// A failed write. `Display` is the reply line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("ERROR: Storage full")]
    StorageFull,
    /// The node cannot log writes (its disk is failing): nothing is acknowledged that
    /// was not logged.
    #[error("ERROR: Storage unavailable")]
    StorageUnavailable,
    #[error("ERROR: Value is not an integer")]
    NotAnInteger,
    #[error("ERROR: Increment or decrement would overflow")]
    Overflow,
    #[error("ERROR: Value too large (max {0} bytes)")]
    ValueTooLarge(usize),
}

fn rehash(e: &Entry) -> u64 {
    KeyHash::of(e.key()).table_hash()
}

/// The node's `memory_limit_mb`, shared by its shards: each charges the bytes it
/// stores, so one shard may use the whole budget (no per-shard split that would refuse
/// a value the node has room for). The only state shards share; one atomic add per
/// growing write.
#[derive(Debug)]
pub struct MemoryBudget {
    used: AtomicU64,
    /// `u64::MAX` = unlimited.
    limit: u64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            used: AtomicU64::new(0),
            limit,
        })
    }

    pub fn unlimited() -> Arc<MemoryBudget> {
        MemoryBudget::new(u64::MAX)
    }

    /// Charge `n` bytes; false (and nothing charged) when that would pass the limit.
    fn try_grow(&self, n: u64) -> bool {
        let before = self.used.fetch_add(n, Relaxed);
        if before.saturating_add(n) > self.limit {
            self.used.fetch_sub(n, Relaxed);
            return false;
        }
        true
    }

    fn shrink(&self, n: u64) {
        self.used.fetch_sub(n, Relaxed);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }
}

/// Counters a shard keeps about itself (STATS, INFO).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Live keys (tombstones are not keys).
    pub keys: u64,
    pub tombstones: u64,
    pub bytes_used: u64,
    pub gets: u64,
    pub get_hits: u64,
    pub writes: u64,
    pub dels: u64,
    pub storage_full: u64,
    /// Remote versions refused for being more than [`CLOCK_SKEW_MAX_US`] ahead.
    pub rejected_future: u64,
}

impl ShardStats {
    pub fn add(&mut self, o: &ShardStats) {
        self.keys += o.keys;
        self.tombstones += o.tombstones;
        self.bytes_used += o.bytes_used;
        self.gets += o.gets;
        self.get_hits += o.get_hits;
        self.writes += o.writes;
        self.dels += o.dels;
        self.storage_full += o.storage_full;
        self.rejected_future += o.rejected_future;
    }
}

pub struct Shard {
    /// First global bucket index this shard owns; `tables[i]` is bucket `first + i`.
    first_bucket: usize,
    tables: Vec<HashTable<Entry>>,
    tree: Subtree,
    /// Bytes of keys, values and per-entry overhead this shard has charged to `budget`.
    bytes_used: u64,
    budget: Arc<MemoryBudget>,
    value_bytes_max: usize,
    /// Versions of local writes; also moved forward by every remote version applied.
    clock: Clock,
    /// This node's origin id (the version tie-break).
    origin: u32,
    /// Tombstones are purged, and remote ones ignored, this long after their version.
    grace_us: u64,
    /// Next bucket the tombstone purge looks at.
    purge_cursor: usize,
    /// The wall clock local versions are read from (simulations pass their own).
    wall_clock: fn() -> u64,
    /// Local writes since the last [`Shard::take_journal`], encoded as change events
    /// ([`crate::store::journal`]) for replication; `None` when nobody replicates.
    journal: Option<Journal>,
    /// Every change to this shard's state since the last [`Shard::take_wal`], as
    /// entries ([`crate::store::journal::encode_entry`]) for its write-ahead log: local
    /// writes, remote entries stored, flush markers, forgets. `None` when nothing persists.
    wal: Option<Vec<u8>>,
    /// Set while the node's log cannot be written: writes are refused, reads go on.
    halted: Option<Arc<AtomicBool>>,
    /// The newest flush marker applied here (this node's FLUSHDB, or a peer's by
    /// replication or anti-entropy). Invariant: every entry held is newer, and a remote
    /// entry that is not newer is refused (it was flushed). `Version::default()`: never
    /// flushed. Never forgotten: it is what keeps flushed entries from coming back.
    flushed: Version,
    pub stats: ShardStats,
    /// The last version refused for being in the future, and how far ahead of this
    /// node's clock it was (µs): for the caller's log line.
    pub last_future: Option<(Version, u64)>,
}

impl Shard {
    /// Shard `index` of `1 << shard_bits`, charging the node's byte budget, storing
    /// values of at most `value_bytes_max` bytes.
    pub fn new(
        index: usize,
        shard_bits: u32,
        budget: Arc<MemoryBudget>,
        value_bytes_max: usize,
    ) -> Shard {
        let range = shard_buckets(index, shard_bits);
        Shard {
            first_bucket: range.start,
            tables: (0..range.len()).map(|_| HashTable::new()).collect(),
            tree: Subtree::new(BUCKET_BITS - shard_bits),
            bytes_used: 0,
            budget,
            value_bytes_max,
            clock: Clock::default(),
            origin: 0,
            grace_us: TOMBSTONE_GRACE_SECONDS_DEFAULT * 1_000_000,
            purge_cursor: 0,
            wall_clock: now_us,
            journal: None,
            wal: None,
            halted: None,
            flushed: Version::default(),
            stats: ShardStats::default(),
            last_future: None,
        }
    }

    /// Record every local write as a change event, to be collected with
    /// [`Shard::take_journal`].
    pub fn with_journal(mut self) -> Shard {
        self.journal = Some(Journal::default());
        self
    }

    /// Record every change to the shard's state for its write-ahead log, to be collected
    /// with [`Shard::take_wal`].
    pub fn with_wal(mut self) -> Shard {
        self.wal = Some(Vec::new());
        self
    }

    /// Refuse writes while `halted` is set (the log's disk is failing).
    pub fn with_halt(mut self, halted: Arc<AtomicBool>) -> Shard {
        self.halted = Some(halted);
        self
    }

    /// Whether writes are refused because the log's disk is failing.
    pub fn is_halted(&self) -> bool {
        self.halted.as_ref().is_some_and(|h| h.load(Relaxed))
    }

    /// Bytes of log entries recorded since the last [`Shard::take_wal`].
    pub fn wal_len(&self) -> usize {
        self.wal.as_ref().map_or(0, Vec::len)
    }

    /// The log entries recorded since the last call, if any.
    pub fn take_wal(&mut self) -> Option<Vec<u8>> {
        let w = self.wal.as_mut().filter(|w| !w.is_empty())?;
        Some(std::mem::take(w))
    }

    /// Read local versions from `wall_clock` (microseconds) instead of the system clock.
    pub fn with_wall_clock(mut self, wall_clock: fn() -> u64) -> Shard {
        self.wall_clock = wall_clock;
        self
    }

    /// The change events recorded since the last call, if any.
    pub fn take_journal(&mut self) -> Option<Journal> {
        let j = self.journal.as_mut().filter(|j| j.events > 0)?;
        Some(std::mem::take(j))
    }

    /// Write locally with a fresh version, and journal the resulting state.
    fn write_local(
        &mut self,
        h: KeyHash,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        if self.is_halted() {
            return Err(StoreError::StorageUnavailable);
        }
        let v = Version {
            hlc: self.clock.tick((self.wall_clock)()),
            origin: self.origin,
        };
        let was_live = self.put(h, key, value, v)?;
        if let Some(j) = &mut self.journal {
            crate::store::journal::encode_event(&mut j.bytes, v.hlc, key, value);
            j.events += 1;
        }
        Ok(was_live)
    }

    /// Set the node's origin id and the tombstone grace period.
    pub fn with_identity(mut self, origin: u32, tombstone_grace_seconds: u64) -> Shard {
        self.origin = origin;
        self.grace_us = tombstone_grace_seconds.saturating_mul(1_000_000);
        self
    }

    /// Local index of the key's bucket. The key must belong to this shard.
    fn local(&self, h: KeyHash) -> usize {
        let b = h.bucket().wrapping_sub(self.first_bucket);
        assert!(b < self.tables.len(), "key routed to the wrong shard");
        b
    }

    fn find(&self, h: KeyHash, key: &[u8]) -> Option<&Entry> {
        self.tables[self.local(h)].find(h.table_hash(), |e| e.key() == key)
    }

    /// The live value at `key` (a tombstone reads as absent).
    pub fn get(&self, h: KeyHash, key: &[u8]) -> Option<&[u8]> {
        self.find(h, key).and_then(Entry::value)
    }

    /// The version of what is stored at `key`, tombstones included.
    pub fn version_of(&self, h: KeyHash, key: &[u8]) -> Option<Version> {
        self.find(h, key).map(Entry::version)
    }

    pub fn set(&mut self, h: KeyHash, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if value.len() > self.value_bytes_max {
            return Err(StoreError::ValueTooLarge(self.value_bytes_max));
        }
        self.write_local(h, key, Some(value)).map(drop)
    }

    /// Delete `key` by writing a fresh tombstone, whether or not the key exists here (a
    /// peer may hold a write this delete must win over). Returns whether a live value
    /// was deleted. A tombstone replacing an entry never needs more room, so deleting a
    /// stored key always works; a delete of an absent key needs room for its tombstone
    /// and fails with `StorageFull` when there is none (otherwise deletes of made-up
    /// keys could grow memory past the limit).
    pub fn del(&mut self, h: KeyHash, key: &[u8]) -> Result<bool, StoreError> {
        self.write_local(h, key, None)
    }

    /// Apply a write made elsewhere (replication, anti-entropy): it replaces the local
    /// entry exactly when it wins by last-write-wins ([`remote_wins`]); applying the same
    /// write twice is a no-op. Ignored: a tombstone already past the grace period (so
    /// purging never brings keys back), a version more than [`CLOCK_SKEW_MAX_US`] ahead
    /// of this node's clock (one bad peer must not drag every clock into the future;
    /// counted in `stats.rejected_future`, the caller logs it), a version not newer than
    /// the flush marker (the entry was flushed), and entries this node
    /// [refuses](Shard::refuses). True when applied.
    pub fn apply(
        &mut self,
        h: KeyHash,
        key: &[u8],
        value: Option<&[u8]>,
        v: Version,
        now_us: u64,
    ) -> bool {
        let expired = value.is_none() && v.hlc.saturating_add(self.grace_us) < now_us;
        let from_the_future = v.hlc > now_us.saturating_add(CLOCK_SKEW_MAX_US);
        if from_the_future {
            self.stats.rejected_future += 1;
            self.last_future = Some((v, v.hlc - now_us));
        }
        if expired || from_the_future {
            return false;
        }
        self.merge(h, key, value, v)
    }

    /// Load an entry from this shard's own log or snapshot at start: the merge of
    /// [`Shard::apply`] without its rules of time. The log holds what was stored, however
    /// old it is now or however far the clock has moved; the purge drops what expired.
    pub fn restore(&mut self, h: KeyHash, key: &[u8], value: Option<&[u8]>, v: Version) -> bool {
        self.merge(h, key, value, v)
    }

    /// Load a flush marker from this shard's own log or snapshot.
    pub fn restore_flush(&mut self, marker: Version) -> u64 {
        self.drop_flushed(marker)
    }

    /// Store `value` at version `v` if it wins the last-write-wins merge against what is
    /// held and is newer than the flush marker.
    fn merge(&mut self, h: KeyHash, key: &[u8], value: Option<&[u8]>, v: Version) -> bool {
        let flushed = !v.wins_over(self.flushed);
        if flushed || self.refuses(key, value) || self.is_halted() {
            return false;
        }
        self.clock.observe(v.hlc);
        if let Some(local) = self.find(h, key) {
            if !remote_wins(v, local.version(), || {
                (entry_digest(key, value), local.digest())
            }) {
                return false;
            }
        }
        let stored = self.put(h, key, value, v).is_ok();
        if !stored {
            self.stats.storage_full += 1; // the caller sees it in STATS and logs it
        }
        stored
    }

    /// Whether a remote entry breaks the rules client input meets (a key a client could
    /// not write, a value over the limit): such an entry is never stored.
    pub fn refuses(&self, key: &[u8], value: Option<&[u8]>) -> bool {
        !crate::limits::is_valid_key(key) || value.is_some_and(|v| v.len() > self.value_bytes_max)
    }

    /// The digest of the global Merkle node at `level` (0 = root, 16 = buckets) and
    /// `index`. The node must lie in this shard's subtree: `level >= shard_bits`.
    pub fn node_digest(&mut self, level: u32, index: usize) -> Digest {
        let height = BUCKET_BITS - self.tree_bits();
        let depth_in_tree = level - (BUCKET_BITS - height);
        let first = self.first_bucket >> (BUCKET_BITS - level);
        self.tree.node(depth_in_tree, index - first)
    }

    /// log2 of the number of shards (from the size of this shard's bucket range).
    fn tree_bits(&self) -> u32 {
        BUCKET_BITS - self.tables.len().trailing_zeros()
    }

    /// A bucket's entries as (key hash, entry digest) pairs sorted by key hash: what
    /// anti-entropy compares. The digest is the Merkle entry digest (value or
    /// tombstone, not the version), truncated to 64 bits.
    pub fn listing(&self, bucket: usize) -> Vec<(u64, u64)> {
        let table = &self.tables[bucket - self.first_bucket];
        let mut out: Vec<(u64, u64)> = table
            .iter()
            .map(|e| (KeyHash::of(e.key()).0, short_digest(&e.digest())))
            .collect();
        out.sort_unstable();
        out
    }

    /// The entries of `bucket` whose key hash `wanted` accepts, with versions.
    pub fn entries_by_hash(&self, bucket: usize, wanted: impl Fn(u64) -> bool) -> Vec<OwnedEntry> {
        let table = &self.tables[bucket - self.first_bucket];
        table
            .iter()
            .filter(|e| wanted(KeyHash::of(e.key()).0))
            .map(|e| OwnedEntry {
                key: e.key().to_vec(),
                value: e.value().map(<[u8]>::to_vec),
                version: e.version(),
            })
            .collect()
    }

    /// How long tombstones live, counted from their version (microseconds).
    pub fn tombstone_grace_us(&self) -> u64 {
        self.grace_us
    }

    /// Store `value` (or a tombstone) with version `v`, updating the leaf incrementally.
    /// Returns whether it replaced a live value.
    fn put(
        &mut self,
        h: KeyHash,
        key: &[u8],
        value: Option<&[u8]>,
        v: Version,
    ) -> Result<bool, StoreError> {
        let b = self.local(h);
        let mut delta = entry_digest(key, value);
        let new = entry_bytes(key, value);
        let tombstone = value.is_none();
        let was_live = match self.tables[b].entry(h.table_hash(), |e| e.key() == key, rehash) {
            Slot::Occupied(mut slot) => {
                let e = slot.get_mut();
                let old = e.bytes();
                if new > old && !self.budget.try_grow(new - old) {
                    return Err(StoreError::StorageFull);
                }
                if new < old {
                    self.budget.shrink(old - new);
                }
                xor_into(&mut delta, &e.digest());
                let was_live = e.value().is_some();
                match (was_live, tombstone) {
                    (true, true) => {
                        self.stats.keys -= 1;
                        self.stats.tombstones += 1;
                    }
                    (false, false) => {
                        self.stats.keys += 1;
                        self.stats.tombstones -= 1;
                    }
                    _ => {}
                }
                e.replace(value, v);
                self.bytes_used = self.bytes_used - old + new;
                was_live
            }
            Slot::Vacant(slot) => {
                if !self.budget.try_grow(new) {
                    return Err(StoreError::StorageFull);
                }
                if tombstone {
                    self.stats.tombstones += 1;
                } else {
                    self.stats.keys += 1;
                }
                slot.insert(Entry::new(key, value, v));
                self.bytes_used += new;
                false
            }
        };
        self.tree.toggle(b, &delta);
        if let Some(w) = &mut self.wal {
            crate::store::journal::encode_entry(w, v, key, value);
        }
        Ok(was_live)
    }

    /// Encode the entries of this shard's buckets from local bucket `from` on into `out`
    /// (as [`crate::store::journal::encode_entry`]), whole buckets, until this call has
    /// added `max_bytes`: a snapshot taken a slice at a time while the shard keeps
    /// serving. Returns the bucket to go on from (`None`: done) and how many entries were
    /// added.
    pub fn snapshot_entries(
        &self,
        from: usize,
        max_bytes: usize,
        out: &mut Vec<u8>,
    ) -> (Option<usize>, u64) {
        let (start, mut count) = (out.len(), 0);
        for b in from..self.tables.len() {
            if out.len() - start >= max_bytes {
                return (Some(b), count);
            }
            for e in self.tables[b].iter() {
                crate::store::journal::encode_entry(out, e.version(), e.key(), e.value());
                count += 1;
            }
        }
        (None, count)
    }

    /// Whether the key with hash `h` belongs to this shard's buckets.
    pub fn owns(&self, h: KeyHash) -> bool {
        (self.first_bucket..self.first_bucket + self.tables.len()).contains(&h.bucket())
    }

    /// Drop tombstones whose version is older than the grace period, looking at up to
    /// `buckets` buckets from where the last call stopped. Returns how many went.
    pub fn purge_tombstones(&mut self, now_us: u64, buckets: usize) -> u64 {
        let cutoff = now_us.saturating_sub(self.grace_us);
        let mut purged = 0;
        for _ in 0..buckets.min(self.tables.len()) {
            let b = self.purge_cursor;
            self.purge_cursor = (b + 1) % self.tables.len();
            purged += self.drop_in_bucket(b, |e| e.value().is_none() && e.version().hlc < cutoff);
        }
        purged
    }

    /// Drop the entries of bucket `b` that `gone` selects, keeping the Merkle leaf, byte
    /// accounting and counts in step; returns how many went. The one way entries leave
    /// without a delete (tombstone purge, rejoin, flush marker).
    fn drop_in_bucket(&mut self, b: usize, gone: impl Fn(&Entry) -> bool) -> u64 {
        let table = &mut self.tables[b];
        let (mut delta, mut freed, mut keys, mut dropped) = (EMPTY_LEAF, 0, 0, 0);
        let mut drop_one = |e: &Entry| {
            dropped += 1;
            freed += e.bytes();
            keys += u64::from(e.value().is_some());
        };
        if !table.is_empty() && table.iter().all(&gone) {
            // The whole bucket goes (a FLUSHDB, say): its leaf becomes empty without
            // hashing a single entry.
            table.iter().for_each(&mut drop_one);
            table.clear();
            delta = *self.tree.leaf(b);
        } else {
            table.retain(|e| {
                let keep = !gone(e);
                if !keep {
                    drop_one(e);
                    xor_into(&mut delta, &e.digest());
                }
                keep
            });
        }
        if dropped > 0 {
            self.tree.toggle(b, &delta);
            self.bytes_used -= freed;
            self.budget.shrink(freed);
            self.stats.keys -= keys;
            self.stats.tombstones -= dropped - keys;
        }
        dropped
    }

    /// Drop every entry, value or tombstone, whose version is older than `hlc`: what a
    /// node cut off for longer than the tombstone grace cannot trust (its peers may have
    /// purged deletes it never saw). Its peers hold what is still live, and the rejoin
    /// fetches it back (node/bootstrap.rs). Records no change: nothing is replicated.
    /// Returns the number of entries dropped.
    pub fn forget_older_than(&mut self, hlc: u64) -> u64 {
        if let Some(w) = &mut self.wal {
            crate::store::journal::encode_forget(w, hlc);
        }
        self.forget_in(hlc, 0..BUCKETS)
    }

    /// Replay a forget from a log that covered the (global) buckets `buckets`: another
    /// shard count's log speaks only for its own buckets, whose later entries it holds.
    pub fn restore_forget(&mut self, hlc: u64, buckets: std::ops::Range<usize>) -> u64 {
        self.forget_in(hlc, buckets)
    }

    fn forget_in(&mut self, hlc: u64, buckets: std::ops::Range<usize>) -> u64 {
        let start = buckets.start.max(self.first_bucket) - self.first_bucket;
        let end = buckets.end.min(self.first_bucket + self.tables.len());
        let end = end.saturating_sub(self.first_bucket).max(start);
        (start..end)
            .map(|b| self.drop_in_bucket(b, |e| e.version().hlc < hlc))
            .sum()
    }

    /// Add `delta` to the integer stored at `key` (absent = 0); returns the new value.
    pub fn incr(&mut self, h: KeyHash, key: &[u8], delta: i64) -> Result<i64, StoreError> {
        let current = match self.get(h, key) {
            None => 0,
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or(StoreError::NotAnInteger)?,
        };
        let next = current.checked_add(delta).ok_or(StoreError::Overflow)?;
        self.set(h, key, itoa::Buffer::new().format(next).as_bytes())?;
        Ok(next)
    }

    /// Append (or prepend) to the value at `key`, creating it when absent.
    pub fn concat(
        &mut self,
        h: KeyHash,
        key: &[u8],
        part: &[u8],
        prepend: bool,
    ) -> Result<(), StoreError> {
        let old = self.get(h, key).unwrap_or_default();
        if old.len() + part.len() > self.value_bytes_max {
            return Err(StoreError::ValueTooLarge(self.value_bytes_max));
        }
        let value = if prepend {
            [part, old].concat()
        } else {
            [old, part].concat()
        };
        self.set(h, key, &value)
    }

    /// Visit the keys starting with `prefix` in buckets `cursor..` of this shard, whole
    /// buckets at a time, until at least `count` keys were visited or
    /// [`SCAN_EXAMINED_MAX`] entries examined. Returns the global bucket to resume at
    /// (the end of this shard's range when it is done).
    pub fn scan(
        &self,
        cursor: usize,
        prefix: &[u8],
        count: usize,
        mut visit: impl FnMut(&[u8]),
    ) -> usize {
        let end = self.first_bucket + self.tables.len();
        let mut bucket = cursor.max(self.first_bucket);
        let (mut visited, mut examined) = (0, 0);
        while bucket < end && visited < count && examined < SCAN_EXAMINED_MAX {
            let table = &self.tables[bucket - self.first_bucket];
            examined += table.len();
            let live = table.iter().filter(|e| e.value().is_some());
            for e in live.filter(|e| e.key().starts_with(prefix)) {
                visit(e.key());
                visited += 1;
            }
            bucket += 1;
        }
        bucket
    }

    /// Back to a fresh shard: every entry dropped, the flush marker and the clock
    /// forgotten. Never for a node's data — forgetting a marker lets flushed entries
    /// back — but for harnesses that reuse a shard because building one (a table per
    /// bucket, the Merkle tree) costs more than what they run on it (the fuzz targets).
    pub fn reset(&mut self) {
        self.tables.iter_mut().for_each(HashTable::clear);
        self.tree = Subtree::new(BUCKET_BITS - self.tree_bits());
        self.budget.shrink(self.bytes_used);
        self.bytes_used = 0;
        self.stats.keys = 0;
        self.stats.tombstones = 0;
        self.flushed = Version::default();
        self.clock = Clock::default();
    }

    /// A fresh reading of this shard's clock. FLUSHDB's first phase takes one from every
    /// shard and flushes at the highest, so the flush is newer than every write any
    /// shard made before it.
    pub fn tick_clock(&mut self) -> u64 {
        self.clock.tick((self.wall_clock)())
    }

    /// The newest flush marker applied here.
    pub fn flushed(&self) -> Version {
        self.flushed
    }

    /// This node's FLUSHDB at `hlc` (the same on every shard of the node): the marker
    /// `(hlc, this node's origin)` is applied ([`Shard::apply_flush`]) and, with
    /// `publish`, journaled for replication — one shard per node publishes, so the flush
    /// crosses the broker once. Returns how many entries were dropped.
    pub fn flush(&mut self, hlc: u64, publish: bool) -> u64 {
        let dropped = self.drop_flushed(Version {
            hlc,
            origin: self.origin,
        });
        if let Some(j) = self.journal.as_mut().filter(|_| publish) {
            crate::store::journal::encode_flush(&mut j.bytes, hlc);
            j.events += 1;
        }
        dropped
    }

    /// Apply a peer's flush marker (replication or anti-entropy): when it is newer than
    /// the one held, every entry — value or tombstone — whose version is not newer than
    /// it is dropped, and later remote entries that are not newer are refused. Writes
    /// made after the flush have newer versions and stay. Ignored, like any remote
    /// version, when more than [`CLOCK_SKEW_MAX_US`] ahead. Returns how many entries
    /// were dropped.
    pub fn apply_flush(&mut self, marker: Version, now_us: u64) -> u64 {
        if self.is_halted() {
            return 0; // not logged: refused like any remote change, repaired later
        }
        if marker.hlc > now_us.saturating_add(CLOCK_SKEW_MAX_US) {
            self.stats.rejected_future += 1;
            self.last_future = Some((marker, marker.hlc - now_us));
            return 0;
        }
        self.drop_flushed(marker)
    }

    fn drop_flushed(&mut self, marker: Version) -> u64 {
        if !marker.wins_over(self.flushed) {
            return 0;
        }
        self.flushed = marker;
        if let Some(w) = &mut self.wal {
            crate::store::journal::encode_flush_entry(w, marker);
        }
        // Local writes after the flush must be newer than it.
        self.clock.observe(marker.hlc);
        (0..self.tables.len())
            .map(|b| self.drop_in_bucket(b, |e| !e.version().wins_over(marker)))
            .sum()
    }

    /// The root of this shard's Merkle subtree (recomputes only dirty paths).
    pub fn root(&mut self) -> Digest {
        self.tree.root()
    }

    pub fn snapshot_stats(&self) -> ShardStats {
        ShardStats {
            bytes_used: self.bytes_used,
            ..self.stats
        }
    }
}

/// A shard dropped gives its bytes back: the node's budget counts the shards alive (a
/// data directory re-cut at start fills shards it then drops before the node loads).
impl Drop for Shard {
    fn drop(&mut self) {
        self.budget.shrink(self.bytes_used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::merkle::combine_roots;
    use std::collections::HashMap;

    fn shard() -> Shard {
        Shard::new(0, 0, MemoryBudget::unlimited(), 1 << 20)
    }
    fn h(k: &[u8]) -> KeyHash {
        KeyHash::of(k)
    }

    #[test]
    fn forgetting_drops_exactly_the_entries_older_than_the_cut() {
        let now = 10_000_000;
        let v = |hlc| Version { hlc, origin: 1 };
        let (mut s, mut kept) = (shard(), shard());
        for (key, value, hlc) in [
            (&b"old"[..], Some(&b"1"[..]), 100),
            (b"old-tombstone", None, 200),
            (b"new", Some(b"2"), 300),
            (b"new-tombstone", None, 400),
        ] {
            assert!(s.apply(h(key), key, value, v(hlc), now));
            if hlc >= 300 {
                assert!(kept.apply(h(key), key, value, v(hlc), now));
            }
        }
        let used = s.budget.used();
        assert_eq!(s.forget_older_than(300), 2);
        assert_eq!(s.get(h(b"old"), b"old"), None);
        assert_eq!(s.version_of(h(b"old-tombstone"), b"old-tombstone"), None);
        assert_eq!(s.get(h(b"new"), b"new"), Some(&b"2"[..]));
        assert!(s
            .version_of(h(b"new-tombstone"), b"new-tombstone")
            .is_some());
        assert_eq!(s.root(), kept.root(), "the tree follows the entries");
        let stats = s.snapshot_stats();
        assert_eq!((stats.keys, stats.tombstones), (1, 1));
        assert!(s.budget.used() < used);
        assert_eq!(s.bytes_used, kept.bytes_used);
    }

    #[test]
    fn entries_are_24_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 24);
    }

    #[test]
    fn entry_round_trips_keys_values_and_tombstones() {
        let v = Version { hlc: 7, origin: 3 };
        let long_key = vec![b'k'; crate::limits::KEY_BYTES_MAX];
        for (key, value) in [
            (&b"k"[..], Some(&b"v"[..])),
            (b"key", Some(b"")),
            (b"t", None),
            (&long_key[..], Some(b"x")),
        ] {
            let mut e = Entry::new(key, value, v);
            assert_eq!((e.key(), e.value(), e.version()), (key, value, v));
            e.replace(Some(b"new value"), Version { hlc: 8, origin: 3 });
            assert_eq!((e.key(), e.value()), (key, Some(&b"new value"[..])));
            e.replace(Some(b"NEW VALUE"), v); // same length: in place
            assert_eq!(e.value(), Some(&b"NEW VALUE"[..]));
            e.replace(None, v);
            assert_eq!((e.key(), e.value()), (key, None));
        }
    }

    #[test]
    fn set_get_overwrite_delete() {
        let mut s = shard();
        assert_eq!(s.get(h(b"a"), b"a"), None);
        s.set(h(b"a"), b"a", b"1").unwrap();
        assert_eq!(s.get(h(b"a"), b"a"), Some(&b"1"[..]));
        s.set(h(b"a"), b"a", b"2").unwrap();
        s.set(h(b"a"), b"a", b"longer").unwrap();
        assert_eq!(s.get(h(b"a"), b"a"), Some(&b"longer"[..]));
        assert_eq!(s.del(h(b"a"), b"a"), Ok(true));
        assert_eq!(s.del(h(b"a"), b"a"), Ok(false));
        assert_eq!(s.get(h(b"a"), b"a"), None);
        let stats = s.snapshot_stats();
        assert_eq!((stats.keys, stats.tombstones), (0, 1));
        assert_eq!(
            stats.bytes_used,
            1 + ENTRY_OVERHEAD_BYTES,
            "the tombstone keeps the key"
        );
    }

    #[test]
    fn deletes_leave_tombstones_until_the_grace_period_ends() {
        let mut s = shard().with_identity(1, 10);
        let empty = s.root();
        for i in 0..500 {
            let k = format!("k{i}");
            s.set(h(k.as_bytes()), k.as_bytes(), b"v").unwrap();
        }
        for i in 0..500 {
            let k = format!("k{i}");
            assert_eq!(s.del(h(k.as_bytes()), k.as_bytes()), Ok(true));
        }
        assert_ne!(s.root(), empty, "tombstones are part of the tree");
        assert_eq!(s.snapshot_stats().tombstones, 500);
        // Not yet expired: nothing goes.
        assert_eq!(s.purge_tombstones(now_us(), usize::MAX), 0);
        // Past the grace period: all go, the tree and the budget are empty again.
        let later = now_us() + 11_000_000;
        assert_eq!(
            s.purge_tombstones(later, 1 << 15) + s.purge_tombstones(later, 1 << 16),
            500
        );
        assert_eq!(s.root(), empty);
        assert_eq!(s.snapshot_stats().bytes_used, 0);
        assert_eq!(s.snapshot_stats().tombstones, 0);
    }

    #[test]
    fn a_delete_is_not_undone_by_an_older_write() {
        let mut s = shard().with_identity(1, 3600);
        s.set(h(b"k"), b"k", b"old").unwrap();
        let before_delete = s.version_of(h(b"k"), b"k").unwrap();
        assert_eq!(s.del(h(b"k"), b"k"), Ok(true));
        let late = Version {
            hlc: before_delete.hlc + 1,
            origin: 7,
        };
        assert!(late < s.version_of(h(b"k"), b"k").unwrap());
        assert!(!s.apply(h(b"k"), b"k", Some(b"resurrected"), late, now_us()));
        assert_eq!(s.get(h(b"k"), b"k"), None);
        // A delete of a key this node never saw still beats the older write.
        assert_eq!(s.del(h(b"x"), b"x"), Ok(false));
        assert!(!s.apply(
            h(b"x"),
            b"x",
            Some(b"v"),
            Version { hlc: 1, origin: 9 },
            now_us()
        ));
        assert_eq!(s.get(h(b"x"), b"x"), None);
    }

    #[test]
    fn remote_writes_apply_by_last_write_wins() {
        let mut s = shard().with_identity(1, 3600);
        let now = now_us();
        let v1 = Version {
            hlc: now,
            origin: 5,
        };
        assert!(s.apply(h(b"k"), b"k", Some(b"one"), v1, now));
        assert!(
            !s.apply(h(b"k"), b"k", Some(b"one"), v1, now),
            "the same write twice is a no-op"
        );
        let v0 = Version {
            hlc: now - 1,
            origin: 9,
        };
        assert!(!s.apply(h(b"k"), b"k", Some(b"older"), v0, now));
        let tie = Version {
            hlc: now,
            origin: 6,
        };
        assert!(
            s.apply(h(b"k"), b"k", Some(b"tie"), tie, now),
            "origin breaks the tie"
        );
        assert_eq!(s.get(h(b"k"), b"k"), Some(&b"tie"[..]));
        // A local write after seeing a remote version gets a higher version.
        let future = Version {
            hlc: now + 60_000_000,
            origin: 2,
        };
        assert!(s.apply(h(b"f"), b"f", Some(b"remote"), future, now));
        s.set(h(b"f"), b"f", b"local").unwrap();
        assert!(s.version_of(h(b"f"), b"f").unwrap().wins_over(future));
    }

    #[test]
    fn equal_versions_with_different_contents_converge() {
        let now = now_us();
        let v = Version {
            hlc: now,
            origin: 4,
        };
        let (mut a, mut b) = (
            shard().with_identity(1, 3600),
            shard().with_identity(2, 3600),
        );
        a.apply(h(b"k"), b"k", Some(b"from a"), v, now);
        b.apply(h(b"k"), b"k", Some(b"from b"), v, now);
        a.apply(h(b"k"), b"k", Some(b"from b"), v, now);
        b.apply(h(b"k"), b"k", Some(b"from a"), v, now);
        assert_eq!(a.get(h(b"k"), b"k"), b.get(h(b"k"), b"k"));
        assert_eq!(a.root(), b.root());
    }

    #[test]
    fn versions_far_in_the_future_and_oversized_entries_are_refused() {
        let mut s = shard().with_identity(1, 3600);
        let now = now_us();
        let future = Version {
            hlc: now + CLOCK_SKEW_MAX_US + 1,
            origin: 2,
        };
        assert!(!s.apply(h(b"k"), b"k", Some(b"v"), future, now));
        assert_eq!(s.last_future, Some((future, CLOCK_SKEW_MAX_US + 1)));
        let max = Version {
            hlc: u64::MAX,
            origin: 2,
        };
        assert!(!s.apply(h(b"k"), b"k", Some(b"v"), max, now));
        assert_eq!(s.stats.rejected_future, 2, "both counted");
        let big_key = vec![b'k'; crate::limits::KEY_BYTES_MAX + 1];
        assert!(!s.apply(
            h(&big_key),
            &big_key,
            Some(b"v"),
            Version {
                hlc: now,
                origin: 2
            },
            now
        ));
        s.set(h(b"k"), b"k", b"local").unwrap(); // the clock was not dragged forward
        assert!(s.version_of(h(b"k"), b"k").unwrap().hlc < now + CLOCK_SKEW_MAX_US);
    }

    #[test]
    fn expired_remote_tombstones_are_ignored() {
        let mut s = shard().with_identity(1, 10);
        let now = now_us();
        let stale = Version {
            hlc: now - 11_000_000,
            origin: 3,
        };
        assert!(!s.apply(h(b"k"), b"k", None, stale, now));
        assert_eq!(s.snapshot_stats().tombstones, 0);
        let fresh = Version {
            hlc: now - 1_000_000,
            origin: 3,
        };
        assert!(s.apply(h(b"k"), b"k", None, fresh, now));
    }

    #[test]
    fn replicas_with_the_same_data_have_the_same_root_whatever_the_versions() {
        let (mut a, mut b) = (
            shard().with_identity(1, 3600),
            shard().with_identity(2, 3600),
        );
        a.set(h(b"k"), b"k", b"v").unwrap();
        a.del(h(b"gone"), b"gone").unwrap();
        let now = now_us();
        b.apply(
            h(b"k"),
            b"k",
            Some(b"v"),
            Version {
                hlc: now - 5,
                origin: 8,
            },
            now,
        );
        b.apply(
            h(b"gone"),
            b"gone",
            None,
            Version {
                hlc: now - 9,
                origin: 8,
            },
            now,
        );
        assert_eq!(a.root(), b.root());
    }

    #[test]
    fn overwrites_give_the_root_of_the_final_state() {
        let mut a = shard();
        let mut b = shard();
        for i in 0..300 {
            let k = format!("k{i}");
            a.set(h(k.as_bytes()), k.as_bytes(), b"first").unwrap();
            a.set(h(k.as_bytes()), k.as_bytes(), b"x").unwrap();
        }
        for i in (0..300).rev() {
            let k = format!("k{i}");
            b.set(h(k.as_bytes()), k.as_bytes(), b"x").unwrap();
        }
        assert_eq!(a.root(), b.root());
    }

    #[test]
    fn shards_compose_to_the_single_shard_root() {
        let mut one = shard();
        let mut four: Vec<Shard> = (0..4)
            .map(|i| Shard::new(i, 2, MemoryBudget::unlimited(), 1 << 20))
            .collect();
        for i in 0..2000 {
            let k = format!("key:{i}");
            one.set(h(k.as_bytes()), k.as_bytes(), k.as_bytes())
                .unwrap();
            four[h(k.as_bytes()).shard(2)]
                .set(h(k.as_bytes()), k.as_bytes(), k.as_bytes())
                .unwrap();
        }
        let roots: Vec<Digest> = four.iter_mut().map(Shard::root).collect();
        assert_eq!(combine_roots(&roots), one.root());
    }

    #[test]
    fn memory_limit_rejects_growth_but_allows_shrinking_and_deletes() {
        let value = [b'x'; 100];
        let limit = 3 * (ENTRY_OVERHEAD_BYTES + 2 + 100);
        let mut s = Shard::new(0, 0, MemoryBudget::new(limit), 1 << 20);
        for k in [b"k1", b"k2", b"k3"] {
            s.set(h(k), k, &value).unwrap();
        }
        assert_eq!(s.set(h(b"k4"), b"k4", &value), Err(StoreError::StorageFull));
        assert_eq!(
            s.set(h(b"k1"), b"k1", &[b'x'; 101]),
            Err(StoreError::StorageFull)
        );
        s.set(h(b"k1"), b"k1", b"short").unwrap();
        // Deleting a stored key always works and frees the value's bytes (the tombstone
        // keeps the key).
        assert_eq!(s.del(h(b"k2"), b"k2"), Ok(true));
        s.set(h(b"k4"), b"k4", &value).unwrap();
        assert_eq!(s.get(h(b"k1"), b"k1"), Some(&b"short"[..]));
        // A delete of an absent key needs room for its tombstone: none is left.
        assert_eq!(s.del(h(b"absent"), b"absent"), Err(StoreError::StorageFull));
        assert_eq!(s.snapshot_stats().tombstones, 1);
    }

    #[test]
    fn shards_share_one_budget() {
        let budget = MemoryBudget::new(1000);
        let mut a = Shard::new(0, 1, budget.clone(), 1 << 20);
        let mut b = Shard::new(1, 1, budget.clone(), 1 << 20);
        let (ka, kb) = (key_in(0), key_in(1));
        // One shard may take (nearly) all of it: no per-shard split.
        a.set(h(&ka), &ka, &[b'x'; 800]).unwrap();
        assert_eq!(
            b.set(h(&kb), &kb, &[b'x'; 200]),
            Err(StoreError::StorageFull)
        );
        assert_eq!(a.del(h(&ka), &ka), Ok(true));
        b.set(h(&kb), &kb, &[b'x'; 800]).unwrap();
        let used = |s: &Shard| s.snapshot_stats().bytes_used;
        assert_eq!(budget.used(), used(&a) + used(&b));
        let hlc = a.tick_clock().max(b.tick_clock());
        b.flush(hlc, false);
        a.flush(hlc, false);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_dropped_shard_gives_its_bytes_back_to_the_budget() {
        let budget = MemoryBudget::new(1000);
        let mut a = Shard::new(0, 0, budget.clone(), 1 << 20);
        a.set(h(b"k"), b"k", &[b'x'; 800]).unwrap();
        drop(a);
        assert_eq!(budget.used(), 0);
        let mut b = Shard::new(0, 0, budget.clone(), 1 << 20);
        b.set(h(b"k"), b"k", &[b'x'; 800]).unwrap();
    }

    /// A key owned by `shard` of a 2-shard node.
    fn key_in(shard: usize) -> Vec<u8> {
        (0..)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| h(k).shard(1) == shard)
            .unwrap()
    }

    #[test]
    fn incr_and_concat() {
        let mut s = Shard::new(0, 0, MemoryBudget::unlimited(), 8);
        assert_eq!(s.incr(h(b"n"), b"n", 5), Ok(5));
        assert_eq!(s.incr(h(b"n"), b"n", -7), Ok(-2));
        s.set(h(b"t"), b"t", b"abc").unwrap();
        assert_eq!(s.incr(h(b"t"), b"t", 1), Err(StoreError::NotAnInteger));
        s.set(h(b"m"), b"m", i64::MAX.to_string().as_bytes())
            .unwrap_err(); // 19 bytes > 8
        let mut s = Shard::new(0, 0, MemoryBudget::unlimited(), 64);
        s.set(h(b"m"), b"m", i64::MAX.to_string().as_bytes())
            .unwrap();
        assert_eq!(s.incr(h(b"m"), b"m", 1), Err(StoreError::Overflow));
        s.concat(h(b"c"), b"c", b"mid", false).unwrap();
        s.concat(h(b"c"), b"c", b"<", true).unwrap();
        s.concat(h(b"c"), b"c", b">", false).unwrap();
        assert_eq!(s.get(h(b"c"), b"c"), Some(&b"<mid>"[..]));
        let big = vec![b'x'; 64];
        assert_eq!(
            s.concat(h(b"c"), b"c", &big, false),
            Err(StoreError::ValueTooLarge(64))
        );
    }

    #[test]
    fn scan_pages_visit_every_key_once() {
        let mut s = shard();
        let mut model = HashMap::new();
        for i in 0..3000 {
            let k = format!("{}:{i}", if i % 3 == 0 { "user" } else { "item" });
            s.set(h(k.as_bytes()), k.as_bytes(), b"v").unwrap();
            model.insert(k, 0);
        }
        let mut cursor = 0;
        loop {
            cursor = s.scan(cursor, b"user:", 50, |k| {
                *model.get_mut(std::str::from_utf8(k).unwrap()).unwrap() += 1
            });
            if cursor == crate::limits::BUCKETS {
                break;
            }
        }
        for (k, n) in model {
            assert_eq!(n, usize::from(k.starts_with("user:")), "{k}");
        }
    }

    fn v(hlc: u64, origin: u32) -> Version {
        Version { hlc, origin }
    }

    #[test]
    fn a_local_flush_covers_every_earlier_write_and_no_later_one() {
        let mut s = shard().with_identity(1, 3600).with_journal();
        let empty = s.root();
        let now = now_us();
        // A peer's write ahead of our wall clock (within the skew bound) is covered too.
        assert!(s.apply(
            h(b"ahead"),
            b"ahead",
            Some(b"x"),
            v(now + 60_000_000, 2),
            now
        ));
        s.set(h(b"a"), b"a", b"1").unwrap();
        s.del(h(b"d"), b"d").unwrap();
        let hlc = s.tick_clock();
        assert_eq!(s.flush(hlc, true), 3, "values and tombstones");
        assert_eq!(s.flushed(), v(hlc, 1));
        assert_eq!(s.root(), empty);
        assert_eq!(s.snapshot_stats(), ShardStats::default());
        s.set(h(b"a"), b"a", b"2").unwrap();
        assert!(s.version_of(h(b"a"), b"a").unwrap().wins_over(s.flushed()));
        // The flush is journaled in write order, between the writes around it.
        use crate::store::journal::{decode_event, Change, Event};
        let j = s.take_journal().unwrap();
        let mut r = crate::wire::Reader::new(&j.bytes);
        let events: Vec<Event> = (0..j.events)
            .map(|_| decode_event(&mut r).unwrap())
            .collect();
        assert!(r.done());
        let shape: Vec<(&[u8], Option<&[u8]>)> = events
            .iter()
            .map(|e| match e {
                Event::Change(Change { key, value, .. }) => (*key, *value),
                Event::Flush(_) => (&b"FLUSH"[..], None),
            })
            .collect();
        let want: [(&[u8], Option<&[u8]>); 4] = [
            (b"a", Some(b"1")),
            (b"d", None),
            (b"FLUSH", None),
            (b"a", Some(b"2")),
        ];
        assert_eq!(shape, want);
        assert_eq!(events[2], Event::Flush(hlc));
        // A harness's reset forgets the marker: an old entry is taken again.
        s.reset();
        assert_eq!((s.root(), s.flushed()), (empty, Version::default()));
        assert!(s.apply(h(b"old"), b"old", Some(b"1"), v(now - 1, 2), now));
    }

    #[test]
    fn a_flush_marker_drops_older_entries_keeps_newer_ones_and_refuses_late_older_ones() {
        let now = now_us();
        let mut s = shard().with_identity(1, 3600);
        // "mixed" shares a bucket with "new": that bucket keeps one entry of two.
        let mixed = (0..)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| h(k).bucket() == h(b"new").bucket())
            .unwrap();
        for (key, value, hlc) in [
            (&b"old"[..], Some(&b"1"[..]), now - 30),
            (b"gone", None, now - 20),
            (&mixed, Some(b"m"), now - 25),
            (b"new", Some(b"2"), now - 10),
        ] {
            assert!(s.apply(h(key), key, value, v(hlc, 3), now));
        }
        let marker = v(now - 15, 2);
        assert_eq!(s.apply_flush(marker, now), 3);
        assert_eq!(s.flushed(), marker);
        assert_eq!(s.version_of(h(b"gone"), b"gone"), None, "tombstones go too");
        assert_eq!(s.get(h(&mixed), &mixed), None);
        assert_eq!(s.get(h(b"old"), b"old"), None);
        assert_eq!(s.get(h(b"new"), b"new"), Some(&b"2"[..]));
        let stats = s.snapshot_stats();
        assert_eq!((stats.keys, stats.tombstones), (1, 0));
        assert_eq!(stats.bytes_used, 4 + ENTRY_OVERHEAD_BYTES);
        // The same root as a shard that only ever held the newer entry.
        let mut only_new = shard();
        assert!(only_new.apply(h(b"new"), b"new", Some(b"2"), v(now - 10, 3), now));
        assert_eq!(s.root(), only_new.root());
        // Late entries that are not newer than the marker were flushed: refused.
        assert!(!s.apply(h(b"old"), b"old", Some(b"late"), v(now - 16, 9), now));
        assert!(!s.apply(h(b"old"), b"old", None, marker, now));
        assert!(s.apply(h(b"old"), b"old", Some(b"after"), v(now - 14, 9), now));
        // An older, equal or far-future marker changes nothing.
        for stale in [v(now - 20, 9), marker, v(now + CLOCK_SKEW_MAX_US + 1, 9)] {
            assert_eq!(s.apply_flush(stale, now), 0);
            assert_eq!(s.flushed(), marker);
        }
        assert_eq!(s.snapshot_stats().keys, 2);
    }
}
