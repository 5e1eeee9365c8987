//! The limits every part agrees on: what a key is, how many shards and buckets there
//! are, how long a node id and an anti-entropy message may be. Defined once here
//! because both sides of a boundary check them (the protocol and the store, the config
//! and the replication header), and neither side may import the other.

/// Longest key accepted, in bytes.
pub const KEY_BYTES_MAX: usize = 1024;

/// Whether `key` may be stored: 1..=[`KEY_BYTES_MAX`] bytes, none of them ASCII
/// whitespace or a control byte (0x00–0x20, 0x7F). The one key rule, for clients and
/// peers alike (replication, anti-entropy): a key is a token of the text protocol, and
/// SCAN writes keys back one per line, so a key with a space or a newline could not be
/// named by a client and would break the framing of every reply that lists it.
#[inline]
pub fn is_valid_key(key: &[u8]) -> bool {
    (1..=KEY_BYTES_MAX).contains(&key.len()) && key.iter().all(|&b| b > b' ' && b != 0x7f)
}

/// log2 of the number of Merkle leaf buckets. Every node has the same tree shape, and a
/// SCAN cursor is a bucket index.
pub const BUCKET_BITS: u32 = 16;
/// Number of Merkle leaf buckets (2^16).
pub const BUCKETS: usize = 1 << BUCKET_BITS;

/// Most shards a node may run (a power of two; each owns at least 256 buckets).
pub const SHARDS_MAX: usize = 256;

/// Longest node id: what the replication header can carry.
pub const NODE_ID_BYTES_MAX: usize = 255;

/// Largest anti-entropy message accepted after `SYNC.MSG`: 16 MiB of entries, one
/// entry of up to the largest `max_line_bytes` (64 MiB), and room for the rest.
pub const SYNC_MSG_BYTES_MAX: u32 = 96 << 20;
