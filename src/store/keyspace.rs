//! The key → hash → Merkle bucket → shard function. It lives here and nowhere else.
//!
//! One xxh3 hash per key decides everything: the top [`BUCKET_BITS`] bits pick the Merkle
//! leaf bucket, and the top `shard_bits` of those pick the owning shard. So every shard
//! owns one contiguous range of buckets, and the bucket of a key never depends on the
//! shard count — the Merkle tree has the same shape on every node.

use xxhash_rust::xxh3::xxh3_64;

use crate::limits::SHARDS_MAX;
use crate::limits::{BUCKETS, BUCKET_BITS};

/// The 64-bit xxh3 hash of a key. Computed once per command, carried along with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyHash(pub u64);

impl KeyHash {
    pub fn of(key: &[u8]) -> KeyHash {
        KeyHash(xxh3_64(key))
    }

    /// The Merkle leaf bucket of the key, in `0..BUCKETS`.
    pub fn bucket(self) -> usize {
        (self.0 >> (64 - BUCKET_BITS)) as usize
    }

    /// The owning shard for a node of `1 << shard_bits` shards.
    pub fn shard(self, shard_bits: u32) -> usize {
        shard_of_bucket(self.bucket(), shard_bits)
    }

    /// The hash a bucket's own hash table uses. Within one bucket the top 16 bits are
    /// all equal, and hashbrown takes its control tag from the top 7 bits, so the hash
    /// is remixed (a multiply moves low entropy into the high bits).
    pub fn table_hash(self) -> u64 {
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

/// Which shard owns `bucket` on a node of `1 << shard_bits` shards.
pub fn shard_of_bucket(bucket: usize, shard_bits: u32) -> usize {
    debug_assert!(bucket < BUCKETS);
    if shard_bits == 0 {
        0
    } else {
        bucket >> (BUCKET_BITS - shard_bits)
    }
}

/// The buckets shard `shard` owns: `first..first + count`.
pub fn shard_buckets(shard: usize, shard_bits: u32) -> std::ops::Range<usize> {
    let per_shard = BUCKETS >> shard_bits;
    shard * per_shard..(shard + 1) * per_shard
}

/// log2 of a shard count; the count must be a power of two in `1..=SHARDS_MAX`.
pub fn shard_bits(shards: usize) -> u32 {
    assert!(
        shards.is_power_of_two() && shards <= SHARDS_MAX,
        "shard count {shards}"
    );
    shards.trailing_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_own_contiguous_bucket_ranges() {
        for bits in 0..=8 {
            let shards = 1usize << bits;
            let mut next = 0;
            for s in 0..shards {
                let range = shard_buckets(s, bits);
                assert_eq!(range.start, next);
                for b in [range.start, range.end - 1] {
                    assert_eq!(shard_of_bucket(b, bits), s);
                }
                next = range.end;
            }
            assert_eq!(next, BUCKETS);
        }
    }

    #[test]
    fn key_routing_agrees_with_bucket_ranges() {
        for i in 0..10_000u32 {
            let key = format!("key:{i}");
            let h = KeyHash::of(key.as_bytes());
            for bits in [0, 1, 3, 8] {
                let shard = h.shard(bits);
                assert!(shard_buckets(shard, bits).contains(&h.bucket()));
            }
        }
    }

    #[test]
    fn keys_spread_over_shards() {
        let mut counts = [0u32; 8];
        for i in 0..80_000u32 {
            counts[KeyHash::of(format!("user:{i}").as_bytes()).shard(3)] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "uneven spread {counts:?}");
        }
    }

    #[test]
    fn shard_bits_of_powers_of_two() {
        assert_eq!(shard_bits(1), 0);
        assert_eq!(shard_bits(2), 1);
        assert_eq!(shard_bits(256), 8);
    }
}
