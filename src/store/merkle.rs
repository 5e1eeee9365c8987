//! The Merkle tree: a fixed binary tree over the 2^16 key-hash buckets of `keyspace`.
//!
//! - A leaf is the XOR of the blake3 digests of the entries in its bucket. XOR is order
//!   independent and its own inverse, so a write updates its leaf with
//!   `leaf ^= digest(old) ^ digest(new)` — no scan of the bucket, no rebuild (Riak's
//!   TicTac trees do the same).
//! - An interior node is `blake3(left || right)`: one 64-byte compression per node.
//!   Writes only mark the path to the root stale; [`Subtree::root`] recomputes the stale
//!   nodes, so a batch of writes pays once for the upper levels they share.
//! - A shard owns a contiguous, power-of-two range of buckets, which is exactly one
//!   subtree of the binary tree. The node root combines the shard roots by the same
//!   binary rule ([`combine_roots`]), so 1, 2, …, 256 shards give the same node root.
//!
//! The tree's shape depends on neither the shard count nor insertion order: a key's
//! bucket is fixed by its hash, so two replicas that differ in one key differ in one
//! leaf and the 16 nodes above it. This module knows nothing of networking or MQTT.

use crate::limits::BUCKET_BITS;

/// A blake3 digest (and a leaf value).
pub type Digest = [u8; 32];

/// The leaf of an empty bucket.
pub const EMPTY_LEAF: Digest = [0; 32];

/// The digest of one stored entry: a live value, or a tombstone (`None`). The
/// encoding is unambiguous (lengths first):
///
/// `u32 LE key length | key | u8 state | (state 1 only) u64 LE value length | value`
///
/// with state 1 = live value, 0 = tombstone. The version is deliberately not part of
/// the digest: two replicas holding the same value (or both a tombstone) agree however
/// the data got there, and they still converge, because any later write reaches both
/// with the same last-write-wins rule (docs/MERKLE.md).
pub fn entry_digest(key: &[u8], value: Option<&[u8]>) -> Digest {
    // Small entries (the common case) are encoded on the stack and hashed in one call:
    // `blake3::Hasher` carries a 1.7 KB chaining-value stack that costs more to set up
    // than hashing 60 bytes does.
    const SMALL: usize = 192;
    let k = key.len();
    let len = 4 + k + 1 + value.map_or(0, |v| 8 + v.len());
    if len <= SMALL {
        let mut buf = [0u8; SMALL];
        buf[..4].copy_from_slice(&(k as u32).to_le_bytes());
        buf[4..4 + k].copy_from_slice(key);
        if let Some(value) = value {
            buf[4 + k] = 1;
            buf[5 + k..13 + k].copy_from_slice(&(value.len() as u64).to_le_bytes());
            buf[13 + k..len].copy_from_slice(value);
        }
        return *blake3::hash(&buf[..len]).as_bytes();
    }
    let mut h = blake3::Hasher::new();
    h.update(&(k as u32).to_le_bytes());
    h.update(key);
    match value {
        Some(value) => {
            h.update(&[1]);
            h.update(&(value.len() as u64).to_le_bytes());
            h.update(value);
        }
        None => {
            h.update(&[0]);
        }
    }
    *h.finalize().as_bytes()
}

/// `acc ^= d`: add an entry to a leaf, or remove it again.
pub fn xor_into(acc: &mut Digest, d: &Digest) {
    for (a, b) in acc.iter_mut().zip(d) {
        *a ^= b;
    }
}

/// An interior node from its two children.
pub fn combine(left: &Digest, right: &Digest) -> Digest {
    let mut buf = [0u8; 64];
    buf[..32].copy_from_slice(left);
    buf[32..].copy_from_slice(right);
    *blake3::hash(&buf).as_bytes()
}

/// The root over `2^k` subtree roots, in bucket order (shard roots → node root).
pub fn combine_roots(roots: &[Digest]) -> Digest {
    assert!(roots.len().is_power_of_two(), "{} roots", roots.len());
    let mut level = roots.to_vec();
    while level.len() > 1 {
        level = level.chunks(2).map(|p| combine(&p[0], &p[1])).collect();
    }
    level[0]
}

/// Lowercase hex of a digest (64 characters).
pub fn to_hex(d: &Digest) -> String {
    let mut s = String::with_capacity(64);
    for b in d {
        s.push(char::from(b"0123456789abcdef"[(b >> 4) as usize]));
        s.push(char::from(b"0123456789abcdef"[(b & 15) as usize]));
    }
    s
}

/// The part of the tree one shard owns: `2^height` leaves and the nodes above them.
pub struct Subtree {
    height: u32,
    /// Heap layout: index 1 is the root, node `i` has children `2i` and `2i + 1`, the
    /// leaves sit at `2^height..2^(height+1)`. Index 0 is unused.
    nodes: Vec<Digest>,
    /// `stale[i]`: interior node `i` must be recomputed before it is read.
    /// Invariant: a stale node's ancestors are all stale.
    stale: Vec<bool>,
}

impl Subtree {
    /// An empty subtree over `2^height` buckets.
    pub fn new(height: u32) -> Subtree {
        assert!(height <= BUCKET_BITS);
        let leaves = 1usize << height;
        let mut nodes = vec![EMPTY_LEAF; 2 * leaves];
        // Every node at one level of an empty tree has the same digest.
        let mut digest = EMPTY_LEAF;
        for level in (0..height).rev() {
            digest = combine(&digest, &digest);
            nodes[1 << level..2 << level].fill(digest);
        }
        Subtree {
            height,
            nodes,
            stale: vec![false; leaves],
        }
    }

    pub fn leaf_count(&self) -> usize {
        1 << self.height
    }

    pub fn leaf(&self, leaf: usize) -> &Digest {
        &self.nodes[self.leaf_count() + leaf]
    }

    /// XOR `d` into leaf `leaf` (an index within this subtree) and mark its path stale.
    /// Marking stops at the first node already stale: its ancestors are stale too.
    pub fn toggle(&mut self, leaf: usize, d: &Digest) {
        let mut i = self.leaf_count() + leaf;
        xor_into(&mut self.nodes[i], d);
        i /= 2;
        while i >= 1 && !self.stale[i] {
            self.stale[i] = true;
            i /= 2;
        }
    }

    /// The digest of node `index` at `depth` below this subtree's root (depth 0 is the
    /// root, depth `height` the leaves), recomputing only stale nodes under it.
    pub fn node(&mut self, depth: u32, index: usize) -> Digest {
        assert!(
            depth <= self.height && index < 1 << depth,
            "node outside the subtree"
        );
        let i = (1 << depth) + index;
        self.refresh(i);
        self.nodes[i]
    }

    /// The subtree root, recomputing only the stale nodes.
    pub fn root(&mut self) -> Digest {
        self.refresh(1);
        self.nodes[1]
    }

    fn refresh(&mut self, i: usize) {
        if i >= self.leaf_count() || !self.stale[i] {
            return;
        }
        self.refresh(2 * i);
        self.refresh(2 * i + 1);
        self.nodes[i] = combine(&self.nodes[2 * i], &self.nodes[2 * i + 1]);
        self.stale[i] = false;
    }
}

/// The first 8 bytes of a digest, as a number: what anti-entropy sends instead of 32.
pub fn short_digest(d: &Digest) -> u64 {
    u64::from_le_bytes(d[..8].try_into().expect("32-byte digest"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::BUCKETS;
    use crate::store::keyspace::KeyHash;

    /// The reference: build every level from the leaves, no caching.
    fn root_from_scratch(leaves: &[Digest]) -> Digest {
        combine_roots(leaves)
    }

    fn entries(n: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..n)
            .map(|i| {
                (
                    format!("k{i}").into_bytes(),
                    format!("v{}", i * 7).into_bytes(),
                )
            })
            .collect()
    }

    fn leaves_of(entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<Digest> {
        let mut leaves = vec![EMPTY_LEAF; BUCKETS];
        for (k, v) in entries {
            xor_into(
                &mut leaves[KeyHash::of(k).bucket()],
                &entry_digest(k, Some(v)),
            );
        }
        leaves
    }

    /// A whole node's root through `shards` subtrees, inserting in `order`.
    fn root_with_shards(entries: &[(Vec<u8>, Vec<u8>)], shard_bits: u32) -> Digest {
        let height = BUCKET_BITS - shard_bits;
        let mut trees: Vec<Subtree> = (0..1 << shard_bits).map(|_| Subtree::new(height)).collect();
        for (k, v) in entries {
            let h = KeyHash::of(k);
            let per = 1usize << height;
            trees[h.shard(shard_bits)].toggle(h.bucket() % per, &entry_digest(k, Some(v)));
        }
        let roots: Vec<Digest> = trees.iter_mut().map(Subtree::root).collect();
        combine_roots(&roots)
    }

    #[test]
    fn empty_tree_matches_scratch_build() {
        assert_eq!(
            Subtree::new(BUCKET_BITS).root(),
            root_from_scratch(&vec![EMPTY_LEAF; BUCKETS])
        );
    }

    #[test]
    fn incremental_equals_rebuilt_from_scratch() {
        let data = entries(5_000);
        let mut tree = Subtree::new(BUCKET_BITS);
        for (i, (k, v)) in data.iter().enumerate() {
            tree.toggle(KeyHash::of(k).bucket(), &entry_digest(k, Some(v)));
            if i % 997 == 0 {
                tree.root(); // interleave reads with writes
            }
        }
        assert_eq!(tree.root(), root_from_scratch(&leaves_of(&data)));
    }

    #[test]
    fn root_is_independent_of_order_and_shard_count() {
        let data = entries(3_000);
        let mut reversed = data.clone();
        reversed.reverse();
        let expected = root_from_scratch(&leaves_of(&data));
        for bits in [0, 1, 2, 3, 8] {
            assert_eq!(root_with_shards(&data, bits), expected, "shard_bits {bits}");
            assert_eq!(
                root_with_shards(&reversed, bits),
                expected,
                "shard_bits {bits}"
            );
        }
    }

    #[test]
    fn removing_an_entry_restores_the_previous_root() {
        let mut tree = Subtree::new(BUCKET_BITS);
        let before = tree.root();
        let d = entry_digest(b"a", Some(b"1"));
        tree.toggle(7, &d);
        assert_ne!(tree.root(), before);
        tree.toggle(7, &d);
        assert_eq!(tree.root(), before);
    }

    #[test]
    fn small_and_large_entries_use_the_same_encoding() {
        for (k, v) in [(10, 20), (50, 120), (100, 79), (100, 80), (300, 5000)] {
            let (key, value) = (vec![b'k'; k], vec![b'v'; v]);
            let mut h = blake3::Hasher::new();
            h.update(&(k as u32).to_le_bytes());
            h.update(&key);
            h.update(&[1]);
            h.update(&(v as u64).to_le_bytes());
            h.update(&value);
            assert_eq!(
                entry_digest(&key, Some(&value)),
                *h.finalize().as_bytes(),
                "{k} {v}"
            );
        }
    }

    #[test]
    fn digest_encoding_is_unambiguous() {
        assert_ne!(
            entry_digest(b"ab", Some(b"c")),
            entry_digest(b"a", Some(b"bc"))
        );
        assert_ne!(entry_digest(b"", Some(b"x")), entry_digest(b"x", Some(b"")));
        assert_ne!(entry_digest(b"k", None), entry_digest(b"k", Some(b"")));
        let mut h = blake3::Hasher::new();
        h.update(&300u32.to_le_bytes());
        h.update(&[b'k'; 300]);
        h.update(&[0]);
        assert_eq!(entry_digest(&[b'k'; 300], None), *h.finalize().as_bytes());
        let mut h = blake3::Hasher::new();
        h.update(&1u32.to_le_bytes());
        h.update(b"k");
        h.update(&[0]);
        assert_eq!(entry_digest(b"k", None), *h.finalize().as_bytes());
    }

    #[test]
    fn hex_is_lowercase_64_chars() {
        let h = to_hex(&[0xAB; 32]);
        assert_eq!(h.len(), 64);
        assert!(h.starts_with("abab"));
    }
}
