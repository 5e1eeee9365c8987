//! Anti-entropy, the pure core: the messages two replicas exchange to find and repair
//! their differences, the server side that answers them from shards, and the
//! initiator's algorithm. No I/O: the transport is whatever carries [`Peer::call`].
//!
//! The exchange, in round trips to the peer:
//! 1. compare roots (64-bit truncated digests); equal → done, one round trip;
//! 2. descend the fixed 2^16-bucket tree [`FANOUT_BITS`] levels per round trip, asking
//!    only for the descendants of nodes that differ (levels 4, 8, 12, 16);
//! 3. for the buckets that differ, compare listings (key hash + entry digest per entry);
//! 4. fetch the peer's differing entries and push ours in one round trip; each side
//!    applies the other's with the last-write-wins merge, so one exchange heals both.
//!
//! Messages are binary (docs/ANTI_ENTROPY.md draws them); varints are LEB128 as in
//! [`crate::changes`].

use crate::keyspace::{shard_of_bucket, KeyHash, BUCKETS, BUCKET_BITS};
use crate::merkle::{combine_roots, Digest};
use crate::shard::{short_digest, OwnedEntry, Shard};
use crate::version::Version;

/// Tree levels descended per round trip: 16 descendants per differing node.
pub const FANOUT_BITS: u32 = 4;
/// Most node indices, buckets or entries one request may name.
pub const REQUEST_ITEMS_MAX: usize = BUCKETS;

const MSG_ROOT: u8 = 1;
const MSG_NODES: u8 = 2;
const MSG_LISTINGS: u8 = 3;
const MSG_EXCHANGE: u8 = 4;
const KIND_SET: u8 = 1;
const KIND_DEL: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("malformed sync message: {0}")]
    Malformed(&'static str),
    #[error("peer: {0}")]
    Transport(String),
}

/// One side of the transport: send a request, get the reply.
pub trait Peer {
    fn call(&mut self, request: &[u8]) -> Result<Vec<u8>, SyncError>;
}

/// What one exchange did, as `SYNC` reports it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Entries applied (on either side) because they won the merge.
    pub keys_repaired: u64,
    /// Entries transferred, both directions.
    pub entries_sent: u64,
    pub entries_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub round_trips: u64,
    /// Buckets whose listings were compared.
    pub buckets_compared: u64,
}

/// A node's shards, as the server side of the exchange sees them.
pub struct Shards<'a> {
    pub shards: &'a mut [Shard],
    pub now_us: u64,
}

impl Shards<'_> {
    fn bits(&self) -> u32 {
        self.shards.len().trailing_zeros()
    }

    fn shard_of_bucket(&mut self, bucket: usize) -> &mut Shard {
        let bits = self.bits();
        &mut self.shards[shard_of_bucket(bucket, bits)]
    }

    /// Global node digest at `level`, truncated.
    fn node(&mut self, level: u32, index: usize) -> u64 {
        let bits = self.bits();
        if level >= bits {
            let first_bucket = index << (BUCKET_BITS - level);
            short_digest(&self.shard_of_bucket(first_bucket).node_digest(level, index))
        } else {
            // Above the shards' subtrees: combine the roots under this node.
            let per = 1usize << (bits - level);
            let roots: Vec<Digest> = self.shards[index * per..(index + 1) * per]
                .iter_mut()
                .map(Shard::root)
                .collect();
            short_digest(&combine_roots(&roots))
        }
    }

    /// Answer one request (the server side). Malformed input is an error, never a panic.
    pub fn serve(&mut self, request: &[u8]) -> Result<Vec<u8>, SyncError> {
        let mut r = Reader::new(request);
        let mut out = Vec::new();
        match r.byte()? {
            MSG_ROOT => out.extend_from_slice(&self.node(0, 0).to_le_bytes()),
            MSG_NODES => {
                let level = u32::from(r.byte()?);
                if level > BUCKET_BITS {
                    return Err(SyncError::Malformed("level"));
                }
                for index in r.index_list(1 << level)? {
                    out.extend_from_slice(&self.node(level, index).to_le_bytes());
                }
            }
            MSG_LISTINGS => {
                for bucket in r.index_list(BUCKETS)? {
                    let listing = self.shard_of_bucket(bucket).listing(bucket);
                    put_varint(&mut out, listing.len() as u64);
                    for (h, d) in listing {
                        out.extend_from_slice(&h.to_le_bytes());
                        out.extend_from_slice(&d.to_le_bytes());
                    }
                }
            }
            MSG_EXCHANGE => {
                // Wanted key hashes per bucket, then the initiator's entries to apply.
                // Ours are read before theirs are applied: each side sends what it held.
                let wanted = r.wanted()?;
                let theirs = r.entries()?;
                let mut ours = Vec::new();
                for (bucket, hashes) in wanted {
                    for e in self
                        .shard_of_bucket(bucket)
                        .entries_by_hash(bucket, &hashes)
                    {
                        encode_entry(&mut ours, &e);
                    }
                }
                put_varint(&mut out, self.apply(&theirs));
                out.extend_from_slice(&ours);
            }
            _ => return Err(SyncError::Malformed("message type")),
        }
        if !r.done() {
            return Err(SyncError::Malformed("trailing bytes"));
        }
        Ok(out)
    }

    /// Apply entries with the merge; returns how many won.
    pub fn apply(&mut self, entries: &[OwnedEntry]) -> u64 {
        let now = self.now_us;
        let mut applied = 0;
        for e in entries {
            let h = KeyHash::of(&e.key);
            let shard = self.shard_of_bucket(h.bucket());
            applied += u64::from(shard.apply(h, &e.key, e.value.as_deref(), e.version, now));
        }
        applied
    }
}

/// Run one exchange between `local` (this node, served in-process) and `peer`.
/// Differences that appear while it runs are found by the next exchange.
pub fn exchange(local: &mut Shards, peer: &mut dyn Peer) -> Result<Report, SyncError> {
    let mut report = Report::default();
    let mut call = |req: Vec<u8>, report: &mut Report| -> Result<Vec<u8>, SyncError> {
        report.round_trips += 1;
        report.bytes_sent += req.len() as u64;
        let reply = peer.call(&req)?;
        report.bytes_received += reply.len() as u64;
        Ok(reply)
    };
    let root = call(vec![MSG_ROOT], &mut report)?;
    if root.as_slice() == local.node(0, 0).to_le_bytes() {
        return Ok(report);
    }
    // Descend: the frontier holds the differing nodes of the current level.
    let (mut level, mut frontier) = (0u32, vec![0usize]);
    while level < BUCKET_BITS && !frontier.is_empty() {
        let next = (level + FANOUT_BITS).min(BUCKET_BITS);
        let span = 1usize << (next - level);
        let children: Vec<usize> = frontier
            .iter()
            .flat_map(|&p| p * span..(p + 1) * span)
            .collect();
        let mut req = vec![MSG_NODES, next as u8];
        put_index_list(&mut req, &children);
        let reply = call(req, &mut report)?;
        if reply.len() != children.len() * 8 {
            return Err(SyncError::Malformed("node digests"));
        }
        frontier = children
            .iter()
            .zip(reply.chunks_exact(8))
            .filter(|&(&c, d)| d != local.node(next, c).to_le_bytes())
            .map(|(&c, _)| c)
            .collect();
        level = next;
    }
    if frontier.is_empty() {
        return Ok(report); // the difference went away while we looked
    }
    // Compare the differing buckets' listings.
    let mut req = vec![MSG_LISTINGS];
    put_index_list(&mut req, &frontier);
    let reply = call(req, &mut report)?;
    let mut r = Reader::new(&reply);
    let mut wanted: Vec<(usize, Vec<u64>)> = Vec::new();
    let mut ours: Vec<OwnedEntry> = Vec::new();
    for &bucket in &frontier {
        let theirs = r.listing()?;
        let mine = local.shard_of_bucket(bucket).listing(bucket);
        let differ = diff_listings(&mine, &theirs);
        report.buckets_compared += 1;
        if differ.is_empty() {
            continue;
        }
        ours.extend(
            local
                .shard_of_bucket(bucket)
                .entries_by_hash(bucket, &differ),
        );
        wanted.push((bucket, differ));
    }
    if !r.done() {
        return Err(SyncError::Malformed("listings"));
    }
    if wanted.is_empty() {
        return Ok(report);
    }
    // One round trip: push ours, fetch theirs; both sides apply with the merge.
    let mut req = vec![MSG_EXCHANGE];
    put_wanted(&mut req, &wanted);
    put_entries(&mut req, &ours);
    report.entries_sent = ours.len() as u64;
    let reply = call(req, &mut report)?;
    let mut r = Reader::new(&reply);
    let applied_there = r.varint()?;
    let mut theirs = Vec::new();
    while !r.done() {
        theirs.push(r.entry()?);
    }
    report.entries_received = theirs.len() as u64;
    report.keys_repaired = applied_there + local.apply(&theirs);
    Ok(report)
}

/// Key hashes present on one side only, or with different digests. Both sorted.
pub fn diff_listings(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<u64> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x.0 == y.0 => {
                if x.1 != y.1 {
                    out.push(x.0);
                }
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x.0 < y.0 => {
                out.push(x.0);
                i += 1;
            }
            (Some(_), Some(y)) => {
                out.push(y.0);
                j += 1;
            }
            (Some(x), None) => {
                out.push(x.0);
                i += 1;
            }
            (None, Some(y)) => {
                out.push(y.0);
                j += 1;
            }
            (None, None) => unreachable!("loop condition"),
        }
    }
    out
}

/// Sorted indices as a count and gaps (small numbers, so short varints).
fn put_index_list(out: &mut Vec<u8>, sorted: &[usize]) {
    put_varint(out, sorted.len() as u64);
    let mut prev = 0;
    for &i in sorted {
        put_varint(out, (i - prev) as u64);
        prev = i;
    }
}

fn put_wanted(out: &mut Vec<u8>, wanted: &[(usize, Vec<u64>)]) {
    let buckets: Vec<usize> = wanted.iter().map(|w| w.0).collect();
    put_index_list(out, &buckets);
    for (_, hashes) in wanted {
        put_varint(out, hashes.len() as u64);
        for h in hashes {
            out.extend_from_slice(&h.to_le_bytes());
        }
    }
}

fn put_entries(out: &mut Vec<u8>, entries: &[OwnedEntry]) {
    put_varint(out, entries.len() as u64);
    for e in entries {
        encode_entry(out, e);
    }
}

fn encode_entry(out: &mut Vec<u8>, e: &OwnedEntry) {
    out.push(if e.value.is_some() {
        KIND_SET
    } else {
        KIND_DEL
    });
    put_varint(out, e.version.hlc);
    out.extend_from_slice(&e.version.origin.to_le_bytes());
    put_varint(out, e.key.len() as u64);
    out.extend_from_slice(&e.key);
    if let Some(v) = &e.value {
        put_varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, at: 0 }
    }

    fn done(&self) -> bool {
        self.at == self.buf.len()
    }

    fn byte(&mut self) -> Result<u8, SyncError> {
        let b = *self
            .buf
            .get(self.at)
            .ok_or(SyncError::Malformed("truncated"))?;
        self.at += 1;
        Ok(b)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], SyncError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(SyncError::Malformed("truncated"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u64(&mut self) -> Result<u64, SyncError> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn varint(&mut self) -> Result<u64, SyncError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(SyncError::Malformed("varint"))
    }

    /// A count, at most `REQUEST_ITEMS_MAX` and what the remaining bytes can hold.
    fn count(&mut self, min_item_bytes: usize) -> Result<usize, SyncError> {
        let n = self.varint()? as usize;
        let room = (self.buf.len() - self.at) / min_item_bytes.max(1);
        if n > REQUEST_ITEMS_MAX || n > room {
            return Err(SyncError::Malformed("count"));
        }
        Ok(n)
    }

    /// Strictly increasing indices below `limit`.
    fn index_list(&mut self, limit: usize) -> Result<Vec<usize>, SyncError> {
        let n = self.count(1)?;
        let mut out = Vec::with_capacity(n);
        let mut prev = 0usize;
        for k in 0..n {
            let gap = self.varint()? as usize;
            if k > 0 && gap == 0 {
                return Err(SyncError::Malformed("index order"));
            }
            prev = prev
                .checked_add(gap)
                .filter(|&i| i < limit)
                .ok_or(SyncError::Malformed("index"))?;
            out.push(prev);
        }
        Ok(out)
    }

    fn listing(&mut self) -> Result<Vec<(u64, u64)>, SyncError> {
        let n = self.count(16)?;
        (0..n).map(|_| Ok((self.u64()?, self.u64()?))).collect()
    }

    fn wanted(&mut self) -> Result<Vec<(usize, Vec<u64>)>, SyncError> {
        let buckets = self.index_list(BUCKETS)?;
        let mut out = Vec::with_capacity(buckets.len());
        for b in buckets {
            let n = self.count(8)?;
            let mut hashes: Vec<u64> = (0..n).map(|_| self.u64()).collect::<Result<_, _>>()?;
            hashes.sort_unstable();
            out.push((b, hashes));
        }
        Ok(out)
    }

    fn entries(&mut self) -> Result<Vec<OwnedEntry>, SyncError> {
        let n = self.count(7)?;
        (0..n).map(|_| self.entry()).collect()
    }

    fn entry(&mut self) -> Result<OwnedEntry, SyncError> {
        let kind = self.byte()?;
        if kind != KIND_SET && kind != KIND_DEL {
            return Err(SyncError::Malformed("entry kind"));
        }
        let hlc = self.varint()?;
        let origin = u32::from_le_bytes(self.bytes(4)?.try_into().expect("4 bytes"));
        let key_len = self.varint()? as usize;
        if key_len == 0 || key_len > crate::protocol::KEY_BYTES_MAX {
            return Err(SyncError::Malformed("key length"));
        }
        let key = self.bytes(key_len)?.to_vec();
        let value = if kind == KIND_SET {
            let n = self.varint()? as usize;
            Some(self.bytes(n)?.to_vec())
        } else {
            None
        };
        Ok(OwnedEntry {
            key,
            value,
            version: Version { hlc, origin },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_finds_one_sided_and_changed_hashes() {
        let a = [(1, 10), (3, 30), (5, 50)];
        let b = [(2, 20), (3, 31), (5, 50), (9, 90)];
        assert_eq!(diff_listings(&a, &b), vec![1, 2, 3, 9]);
        assert_eq!(diff_listings(&a, &a), Vec::<u64>::new());
        assert_eq!(diff_listings(&[], &b), vec![2, 3, 5, 9]);
    }

    #[test]
    fn malformed_requests_are_errors_not_panics() {
        let mut shards: Vec<Shard> = (0..2)
            .map(|i| Shard::new(i, 1, crate::shard::MemoryBudget::unlimited(), 1 << 10))
            .collect();
        let mut node = Shards {
            shards: &mut shards,
            now_us: 0,
        };
        for bad in [
            &[][..],
            &[9],
            &[MSG_NODES, 17, 1, 0],
            &[MSG_NODES, 4, 2, 3, 0], // not increasing
            &[MSG_NODES, 4, 1, 16],   // index out of range
            &[MSG_LISTINGS, 200],     // count larger than the bytes
            &[MSG_EXCHANGE, 0, 1, 7], // a bad entry
            &[MSG_ROOT, 0],           // trailing byte
        ] {
            assert!(node.serve(bad).is_err(), "{bad:?}");
        }
    }
}
