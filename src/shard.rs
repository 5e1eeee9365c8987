//! One shard's data: the key-value entries of its bucket range and its Merkle subtree.
//!
//! A `Shard` is plain data owned by exactly one thread; nothing here locks, blocks or
//! does I/O. Entries live in one small hash table per Merkle bucket, so a bucket's keys
//! can be listed without a scan (SCAN pages, and later anti-entropy listings), and every
//! write updates its leaf digest incrementally.

use crate::keyspace::{shard_buckets, KeyHash, BUCKET_BITS};
use crate::merkle::{entry_digest, xor_into, Digest, Subtree};
use hashbrown::hash_table::Entry as Slot;
use hashbrown::HashTable;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Bytes charged per entry on top of its key and value: the table slot, the
/// allocation rounding and the share of the Merkle tree. Close to what an entry costs
/// in RSS, so `memory_limit_mb` means roughly what it says.
pub const ENTRY_OVERHEAD_BYTES: u64 = 64;

/// How many entries one SCAN call may examine, so a prefix that matches little cannot
/// hold the shard thread for long; the cursor says where to go on.
pub const SCAN_EXAMINED_MAX: usize = 16 * 1024;

/// A failed write. `Display` is the reply line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("ERROR: Storage full")]
    StorageFull,
    #[error("ERROR: Value is not an integer")]
    NotAnInteger,
    #[error("ERROR: Increment or decrement would overflow")]
    Overflow,
    #[error("ERROR: Value too large (max {0} bytes)")]
    ValueTooLarge(usize),
}

/// Key and value in one allocation: `kv = key ++ value`.
struct Entry {
    kv: Box<[u8]>,
    key_len: u32,
}

impl Entry {
    fn new(key: &[u8], value: &[u8]) -> Entry {
        let mut kv = Vec::with_capacity(key.len() + value.len());
        kv.extend_from_slice(key);
        kv.extend_from_slice(value);
        Entry {
            kv: kv.into_boxed_slice(),
            key_len: key.len() as u32,
        }
    }
    fn key(&self) -> &[u8] {
        &self.kv[..self.key_len as usize]
    }
    fn value(&self) -> &[u8] {
        &self.kv[self.key_len as usize..]
    }
    fn set_value(&mut self, value: &[u8]) {
        if self.value().len() == value.len() {
            // Same size (the common overwrite): no allocation.
            let k = self.key_len as usize;
            self.kv[k..].copy_from_slice(value);
        } else {
            *self = Entry::new(self.key(), value);
        }
    }
}

fn entry_bytes(key: &[u8], value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64 + ENTRY_OVERHEAD_BYTES
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
    pub keys: u64,
    pub bytes_used: u64,
    pub gets: u64,
    pub get_hits: u64,
    pub writes: u64,
    pub dels: u64,
    pub storage_full: u64,
}

impl ShardStats {
    pub fn add(&mut self, o: &ShardStats) {
        self.keys += o.keys;
        self.bytes_used += o.bytes_used;
        self.gets += o.gets;
        self.get_hits += o.get_hits;
        self.writes += o.writes;
        self.dels += o.dels;
        self.storage_full += o.storage_full;
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
    pub stats: ShardStats,
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
            stats: ShardStats::default(),
        }
    }

    /// Local index of the key's bucket. The key must belong to this shard.
    fn local(&self, h: KeyHash) -> usize {
        let b = h.bucket().wrapping_sub(self.first_bucket);
        assert!(b < self.tables.len(), "key routed to the wrong shard");
        b
    }

    pub fn get(&self, h: KeyHash, key: &[u8]) -> Option<&[u8]> {
        self.tables[self.local(h)]
            .find(h.table_hash(), |e| e.key() == key)
            .map(Entry::value)
    }

    pub fn set(&mut self, h: KeyHash, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if value.len() > self.value_bytes_max {
            return Err(StoreError::ValueTooLarge(self.value_bytes_max));
        }
        let b = self.local(h);
        let mut delta = entry_digest(key, value);
        match self.tables[b].entry(h.table_hash(), |e| e.key() == key, rehash) {
            Slot::Occupied(mut slot) => {
                let e = slot.get_mut();
                let (old, new) = (e.value().len() as u64, value.len() as u64);
                if new > old && !self.budget.try_grow(new - old) {
                    return Err(StoreError::StorageFull);
                }
                if new < old {
                    self.budget.shrink(old - new);
                }
                xor_into(&mut delta, &entry_digest(key, e.value()));
                e.set_value(value);
                self.bytes_used = self.bytes_used - old + new;
            }
            Slot::Vacant(slot) => {
                let cost = entry_bytes(key, value);
                if !self.budget.try_grow(cost) {
                    return Err(StoreError::StorageFull);
                }
                slot.insert(Entry::new(key, value));
                self.bytes_used += cost;
                self.stats.keys += 1;
            }
        }
        self.tree.toggle(b, &delta);
        Ok(())
    }

    /// Remove a key; false when it was absent.
    pub fn del(&mut self, h: KeyHash, key: &[u8]) -> bool {
        let b = self.local(h);
        let Ok(slot) = self.tables[b].find_entry(h.table_hash(), |e| e.key() == key) else {
            return false;
        };
        let (e, _) = slot.remove();
        self.tree.toggle(b, &entry_digest(e.key(), e.value()));
        let cost = entry_bytes(e.key(), e.value());
        self.bytes_used -= cost;
        self.budget.shrink(cost);
        self.stats.keys -= 1;
        true
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
            for e in table.iter().filter(|e| e.key().starts_with(prefix)) {
                visit(e.key());
                visited += 1;
            }
            bucket += 1;
        }
        bucket
    }

    /// Drop every entry.
    pub fn flush(&mut self) {
        self.tables.iter_mut().for_each(HashTable::clear);
        self.tree.clear();
        self.budget.shrink(self.bytes_used);
        self.bytes_used = 0;
        self.stats.keys = 0;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::combine_roots;
    use std::collections::HashMap;

    fn shard() -> Shard {
        Shard::new(0, 0, MemoryBudget::unlimited(), 1 << 20)
    }
    fn h(k: &[u8]) -> KeyHash {
        KeyHash::of(k)
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
        assert!(s.del(h(b"a"), b"a"));
        assert!(!s.del(h(b"a"), b"a"));
        assert_eq!(s.snapshot_stats().keys, 0);
        assert_eq!(s.snapshot_stats().bytes_used, 0);
    }

    #[test]
    fn root_returns_to_empty_after_deletes() {
        let mut s = shard();
        let empty = s.root();
        for i in 0..500 {
            let k = format!("k{i}");
            s.set(h(k.as_bytes()), k.as_bytes(), b"v").unwrap();
        }
        assert_ne!(s.root(), empty);
        for i in 0..500 {
            let k = format!("k{i}");
            assert!(s.del(h(k.as_bytes()), k.as_bytes()));
        }
        assert_eq!(s.root(), empty);
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
        let limit = 3 * (ENTRY_OVERHEAD_BYTES + 2 + 10);
        let mut s = Shard::new(0, 0, MemoryBudget::new(limit), 1 << 20);
        for k in [b"k1", b"k2", b"k3"] {
            s.set(h(k), k, b"0123456789").unwrap();
        }
        assert_eq!(
            s.set(h(b"k4"), b"k4", b"0123456789"),
            Err(StoreError::StorageFull)
        );
        assert_eq!(
            s.set(h(b"k1"), b"k1", b"0123456789+"),
            Err(StoreError::StorageFull)
        );
        s.set(h(b"k1"), b"k1", b"short").unwrap();
        assert!(s.del(h(b"k2"), b"k2"));
        s.set(h(b"k4"), b"k4", b"0123456789").unwrap();
        assert_eq!(s.get(h(b"k1"), b"k1"), Some(&b"short"[..]));
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
        assert!(a.del(h(&ka), &ka));
        b.set(h(&kb), &kb, &[b'x'; 800]).unwrap();
        assert_eq!(budget.used(), b.snapshot_stats().bytes_used);
        b.flush();
        assert_eq!(budget.used(), 0);
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
            if cursor == crate::keyspace::BUCKETS {
                break;
            }
        }
        for (k, n) in model {
            assert_eq!(n, usize::from(k.starts_with("user:")), "{k}");
        }
    }

    #[test]
    fn flush_empties_everything() {
        let mut s = shard();
        let empty = s.root();
        s.set(h(b"a"), b"a", b"1").unwrap();
        s.flush();
        assert_eq!(s.get(h(b"a"), b"a"), None);
        assert_eq!(s.root(), empty);
        assert_eq!(s.snapshot_stats().bytes_used, 0);
    }
}
