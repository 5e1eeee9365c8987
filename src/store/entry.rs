//! The 24-byte entry a shard stores per key. The only `unsafe` code in the crate
//! (`tests/architecture.rs` checks it): a thin pointer instead of a `Box<[u8]>` saves
//! the second word of a fat pointer on every key.

#![allow(unsafe_code)]

use crate::store::merkle::{entry_digest, Digest};
use crate::store::version::Version;
use std::ptr::NonNull;

/// One stored entry: the version of the write that stored it, and key and value in one
/// heap allocation `u16 LE key length | key | value` behind a thin pointer. A
/// `Box<[u8]>` would carry its length in a second word; keeping the length in 31 bits
/// here keeps the entry at 24 bytes, which is what holds memory per key under Redis's
/// with versions stored (BENCHMARKS.md). A tombstone keeps only the key.
pub struct Entry {
    /// Owned allocation of exactly `len & !TOMBSTONE_BIT` bytes, from a `Box<[u8]>`.
    kv: NonNull<u8>,
    /// Allocation length; the top bit marks a tombstone.
    len: u32,
    origin: u32,
    hlc: u64,
}

// SAFETY: an `Entry` owns its allocation exclusively, like the `Box<[u8]>` it was made
// from; nothing else points into it. Moving it to another thread is as safe as moving
// the box (it moves once, with its shard, to the shard's thread).
unsafe impl Send for Entry {}

const TOMBSTONE_BIT: u32 = 1 << 31;
const KEY_LEN_BYTES: usize = 2;

impl Entry {
    pub fn new(key: &[u8], value: Option<&[u8]>, v: Version) -> Entry {
        assert!(
            key.len() <= usize::from(u16::MAX),
            "keys are limited at the edge"
        );
        let bytes = value.unwrap_or_default();
        let n = KEY_LEN_BYTES + key.len() + bytes.len();
        assert!(n < TOMBSTONE_BIT as usize, "entry of {n} bytes");
        let mut kv = Vec::with_capacity(n);
        kv.extend_from_slice(&(key.len() as u16).to_le_bytes());
        kv.extend_from_slice(key);
        kv.extend_from_slice(bytes);
        let raw = Box::into_raw(kv.into_boxed_slice()).cast::<u8>();
        let kv = NonNull::new(raw).expect("Box pointers are never null");
        let tomb = if value.is_none() { TOMBSTONE_BIT } else { 0 };
        Entry {
            kv,
            len: n as u32 | tomb,
            origin: v.origin,
            hlc: v.hlc,
        }
    }
    fn raw(&self) -> &[u8] {
        // SAFETY: `kv` points to the live allocation of `len` bytes this entry owns.
        unsafe {
            std::slice::from_raw_parts(self.kv.as_ptr(), (self.len & !TOMBSTONE_BIT) as usize)
        }
    }
    fn raw_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `raw`, and `&mut self` makes the access exclusive.
        unsafe {
            std::slice::from_raw_parts_mut(self.kv.as_ptr(), (self.len & !TOMBSTONE_BIT) as usize)
        }
    }
    fn key_len(&self) -> usize {
        let raw = self.raw();
        usize::from(u16::from_le_bytes([raw[0], raw[1]]))
    }
    pub fn key(&self) -> &[u8] {
        &self.raw()[KEY_LEN_BYTES..KEY_LEN_BYTES + self.key_len()]
    }
    /// The value, or `None` for a tombstone.
    pub fn value(&self) -> Option<&[u8]> {
        (self.len & TOMBSTONE_BIT == 0).then(|| &self.raw()[KEY_LEN_BYTES + self.key_len()..])
    }
    pub fn version(&self) -> Version {
        Version {
            hlc: self.hlc,
            origin: self.origin,
        }
    }
    pub fn digest(&self) -> Digest {
        entry_digest(self.key(), self.value())
    }
    pub fn bytes(&self) -> u64 {
        entry_bytes(self.key(), self.value())
    }
    pub fn replace(&mut self, value: Option<&[u8]>, v: Version) {
        match (self.value(), value) {
            (Some(old), Some(new)) if old.len() == new.len() => {
                // Same size (the common overwrite): no allocation.
                let at = KEY_LEN_BYTES + self.key_len();
                self.raw_mut()[at..].copy_from_slice(new);
                (self.hlc, self.origin) = (v.hlc, v.origin);
            }
            _ => *self = Entry::new(self.key(), value, v),
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let n = (self.len & !TOMBSTONE_BIT) as usize;
        // SAFETY: `kv` came from `Box::into_raw` of a `Box<[u8]>` of exactly `n` bytes and
        // is dropped exactly once, here.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.kv.as_ptr(),
                n,
            )))
        }
    }
}

/// Bytes charged per entry on top of its key and value: the table slot, the
/// allocation rounding and the share of the Merkle tree. Close to what an entry costs
/// in RSS, so `memory_limit_mb` means roughly what it says.
pub const ENTRY_OVERHEAD_BYTES: u64 = 64;

/// What an entry of `key` and `value` is charged against the memory budget.
pub fn entry_bytes(key: &[u8], value: Option<&[u8]>) -> u64 {
    (key.len() + value.map_or(0, <[u8]>::len)) as u64 + ENTRY_OVERHEAD_BYTES
}
