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

use crate::changes::put_varint;
use crate::keyspace::{shard_of_bucket, KeyHash, BUCKETS, BUCKET_BITS};
use crate::merkle::{combine_roots, Digest};
use crate::shard::{short_digest, OwnedEntry, Shard};
use crate::version::Version;

/// Tree levels descended per round trip: 16 descendants per differing node.
pub const FANOUT_BITS: u32 = 4;
/// Interior node digests travel truncated to 32 bits: a false "equal" needs a 2^-32
/// coincidence, and only delays a repair until the subtree's next write. Measured:
/// halving the digests cut the d = 100 exchange at 1M keys from 68.8 KB to about 45 KB.
pub const NODE_DIGEST_BYTES: usize = 4;

/// A node digest as sent.
fn node32(d: &Digest) -> u32 {
    u32::from_le_bytes(d[..4].try_into().expect("32-byte digest"))
}

/// A key hash as listed: the 32 bits below the bucket bits (all keys of a bucket share
/// the top 16), so order within a bucket is kept.
fn key32(h: u64) -> u32 {
    (h >> (64 - BUCKET_BITS - 32)) as u32
}
/// Most bytes of entries one exchange reply (or request) carries: bounds the memory an
/// exchange needs whatever the value sizes.
pub const ENTRY_BYTES_PER_REPLY: usize = 16 << 20;
/// Most entries one exchange reply carries (so a request carrying them back is valid).
pub const ENTRIES_PER_REPLY_MAX: usize = REQUEST_ITEMS_MAX;
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

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Root,
    /// Truncated digests of these nodes of `level` (sorted indices).
    Nodes {
        level: u32,
        indices: Vec<usize>,
    },
    /// Listings of these buckets (sorted).
    Listings {
        buckets: Vec<usize>,
    },
    /// Apply `entries`; reply with the entries of `wanted` (bucket, sorted 32-bit key
    /// hashes) as they were before applying.
    Exchange {
        wanted: Vec<(usize, Vec<u32>)>,
        entries: Vec<OwnedEntry>,
    },
}

/// One shard's share of a reply; [`assemble`] joins the shares in request order.
#[derive(Debug, Default)]
pub struct Part {
    /// The shard's root (for nodes above the shards' subtrees).
    root: Option<Digest>,
    /// (position in the request, value) for the items this shard owns.
    digests: Vec<(usize, u32)>,
    listings: Vec<(usize, Vec<(u32, u32)>)>,
    entries: Vec<(usize, Vec<OwnedEntry>)>,
    applied: u64,
}

/// Parse a request. Malformed input is an error, never a panic.
pub fn parse(request: &[u8]) -> Result<Request, SyncError> {
    let mut r = Reader::new(request);
    let req = match r.byte()? {
        MSG_ROOT => Request::Root,
        MSG_NODES => {
            let level = u32::from(r.byte()?);
            if level > BUCKET_BITS {
                return Err(SyncError::Malformed("level"));
            }
            Request::Nodes {
                level,
                indices: r.index_list(1 << level)?,
            }
        }
        MSG_LISTINGS => {
            let buckets = r.index_list(BUCKETS)?;
            if buckets.len() > BUCKETS_PER_ROUND {
                return Err(SyncError::Malformed("too many buckets"));
            }
            Request::Listings { buckets }
        }
        MSG_EXCHANGE => {
            let wanted = r.wanted()?;
            if wanted.len() > BUCKETS_PER_ROUND {
                return Err(SyncError::Malformed("too many buckets"));
            }
            Request::Exchange {
                wanted,
                entries: r.entries()?,
            }
        }
        _ => return Err(SyncError::Malformed("message type")),
    };
    if !r.done() {
        return Err(SyncError::Malformed("trailing bytes"));
    }
    Ok(req)
}

/// Shard `index` of `1 << bits` answers its share of `req`.
pub fn answer_part(shard: &mut Shard, index: usize, bits: u32, req: &Request, now_us: u64) -> Part {
    let mut part = Part::default();
    let owns_bucket = |b: usize| shard_of_bucket(b, bits) == index;
    match req {
        Request::Root => part.root = Some(shard.root()),
        // Above the shards' subtrees: every shard gives its root, `assemble` combines.
        Request::Nodes { level, .. } if *level < bits => part.root = Some(shard.root()),
        Request::Nodes { level, indices } => {
            for (pos, &i) in indices.iter().enumerate() {
                if owns_bucket(i << (BUCKET_BITS - level)) {
                    part.digests
                        .push((pos, node32(&shard.node_digest(*level, i))));
                }
            }
        }
        Request::Listings { buckets } => {
            for (pos, &b) in buckets.iter().enumerate() {
                if owns_bucket(b) {
                    let mut l: Vec<(u32, u32)> = shard
                        .listing(b)
                        .into_iter()
                        .map(|(h, d)| (key32(h), d as u32))
                        .collect();
                    l.sort_unstable();
                    part.listings.push((pos, l));
                }
            }
        }
        Request::Exchange { wanted, entries } => {
            // Ours are read before theirs are applied: each side sends what it held. A
            // reply carries at most ENTRY_BYTES_PER_REPLY of entries (shared by the
            // shards); what does not fit stays different and the next exchange takes it.
            let mut budget = ENTRY_BYTES_PER_REPLY >> bits;
            let mut room = ENTRIES_PER_REPLY_MAX >> bits;
            for (pos, (b, hashes)) in wanted.iter().enumerate() {
                if owns_bucket(*b) && budget > 0 && room > 0 {
                    let mut found =
                        shard.entries_by_hash(*b, |h| hashes.binary_search(&key32(h)).is_ok());
                    let mut first = pos == 0;
                    found.retain(|e| {
                        let size = e.key.len() + e.value.as_ref().map_or(0, Vec::len) + 16;
                        // The reply's very first entry goes however large it is (at most
                        // one such per reply), so no entry is ever too large to repair.
                        let fits = room > 0 && (size <= budget || first);
                        first = false;
                        if fits {
                            budget = budget.saturating_sub(size);
                            room -= 1;
                        }
                        fits
                    });
                    part.entries.push((pos, found));
                }
            }
            for e in entries {
                let h = KeyHash::of(&e.key);
                if owns_bucket(h.bucket()) {
                    let won = shard.apply(h, &e.key, e.value.as_deref(), e.version, now_us);
                    part.applied += u64::from(won);
                }
            }
        }
    }
    part
}

/// Join the shards' shares (index = shard) into the reply bytes.
pub fn assemble(req: &Request, parts: Vec<Part>) -> Vec<u8> {
    let mut out = Vec::new();
    let bits = parts.len().trailing_zeros();
    let roots = |parts: &[Part]| -> Vec<Digest> { parts.iter().filter_map(|p| p.root).collect() };
    match req {
        Request::Root => {
            out.extend_from_slice(&short_digest(&combine_roots(&roots(&parts))).to_le_bytes())
        }
        Request::Nodes { level, indices } if *level < bits => {
            let roots = roots(&parts);
            let per = 1usize << (bits - level);
            for &i in indices {
                let d = combine_roots(&roots[i * per..(i + 1) * per]);
                out.extend_from_slice(&node32(&d).to_le_bytes());
            }
        }
        Request::Nodes { indices, .. } => {
            let mut all = vec![0u32; indices.len()];
            for (pos, d) in parts.into_iter().flat_map(|p| p.digests) {
                all[pos] = d;
            }
            for d in all {
                out.extend_from_slice(&d.to_le_bytes());
            }
        }
        Request::Listings { buckets } => {
            let mut all = vec![Vec::new(); buckets.len()];
            for (pos, l) in parts.into_iter().flat_map(|p| p.listings) {
                all[pos] = l;
            }
            for listing in all {
                put_varint(&mut out, listing.len() as u64);
                for (h, d) in listing {
                    out.extend_from_slice(&h.to_le_bytes());
                    out.extend_from_slice(&d.to_le_bytes());
                }
            }
        }
        Request::Exchange { wanted, .. } => {
            put_varint(&mut out, parts.iter().map(|p| p.applied).sum());
            let mut all = vec![Vec::new(); wanted.len()];
            for (pos, e) in parts.into_iter().flat_map(|p| p.entries) {
                all[pos] = e;
            }
            for e in all.iter().flatten() {
                encode_entry(&mut out, e);
            }
        }
    }
    out
}

/// A node's shards in one thread (tests, benches, and the in-process side of an
/// exchange): parse, every shard's part, assemble — the same steps a node runs across
/// its shard threads.
pub struct Shards<'a> {
    pub shards: &'a mut [Shard],
    pub now_us: u64,
}

impl Peer for Shards<'_> {
    fn call(&mut self, request: &[u8]) -> Result<Vec<u8>, SyncError> {
        let req = parse(request)?;
        let bits = self.shards.len().trailing_zeros();
        let parts = self
            .shards
            .iter_mut()
            .enumerate()
            .map(|(i, s)| answer_part(s, i, bits, &req, self.now_us))
            .collect();
        Ok(assemble(&req, parts))
    }
}

/// The reply to `SYNC.MSG`: `SYNC.REPLY <n>`, CRLF, then `n` bytes; or an error line.
pub fn write_reply(out: &mut Vec<u8>, reply: Result<Vec<u8>, SyncError>) {
    match reply {
        Ok(bytes) => {
            out.extend_from_slice(format!("SYNC.REPLY {}\r\n", bytes.len()).as_bytes());
            out.extend_from_slice(&bytes);
        }
        Err(e) => out.extend_from_slice(format!("ERROR: {e}\r\n").as_bytes()),
    }
}

/// Buckets whose listings are compared per round trip: bounds every message (a node
/// that starts empty fills itself in chunks, never one message holding everything).
pub const BUCKETS_PER_ROUND: usize = 256;

/// Run one exchange between this node (`local`, whose traffic is not counted) and
/// `peer`. Differences that appear while it runs are found by the next exchange.
pub fn exchange(local: &mut dyn Peer, peer: &mut dyn Peer) -> Result<Report, SyncError> {
    let mut report = Report::default();
    let (mine, theirs) = ask_both(local, peer, vec![MSG_ROOT], &mut report)?;
    if mine == theirs {
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
        let (mine, theirs) = ask_both(local, peer, req, &mut report)?;
        if mine.len() != children.len() * NODE_DIGEST_BYTES || theirs.len() != mine.len() {
            return Err(SyncError::Malformed("node digests"));
        }
        frontier = children
            .iter()
            .zip(
                mine.chunks_exact(NODE_DIGEST_BYTES)
                    .zip(theirs.chunks_exact(NODE_DIGEST_BYTES)),
            )
            .filter(|(_, (m, t))| m != t)
            .map(|(&c, _)| c)
            .collect();
        level = next;
    }
    // Compare listings and repair, a bounded number of buckets per round.
    for buckets in frontier.chunks(BUCKETS_PER_ROUND) {
        let mut req = vec![MSG_LISTINGS];
        put_index_list(&mut req, buckets);
        let (mine, theirs) = ask_both(local, peer, req, &mut report)?;
        let (mut rm, mut rt) = (Reader::new(&mine), Reader::new(&theirs));
        let mut wanted: Vec<(usize, Vec<u32>)> = Vec::new();
        for &bucket in buckets {
            let differ = diff_listings(&rm.listing()?, &rt.listing()?);
            report.buckets_compared += 1;
            if !differ.is_empty() {
                wanted.push((bucket, differ));
            }
        }
        if !rm.done() || !rt.done() {
            return Err(SyncError::Malformed("listings"));
        }
        if wanted.is_empty() {
            continue;
        }
        // Our entries first (an exchange with nothing to apply), then one round trip
        // to the peer: it applies ours and returns its own; then we apply theirs.
        let mut req = vec![MSG_EXCHANGE];
        put_wanted(&mut req, &wanted);
        put_entries(&mut req, &[]);
        let ours = local.call(&req)?;
        let mut r = Reader::new(&ours);
        r.varint()?;
        let ours = r.rest_entries()?;
        let mut req = vec![MSG_EXCHANGE];
        put_wanted(&mut req, &wanted);
        put_entries(&mut req, &ours);
        report.entries_sent += ours.len() as u64;
        let reply = ask(peer, &req, &mut report)?;
        let mut r = Reader::new(&reply);
        let applied_there = r.varint()?;
        let theirs = r.rest_entries()?;
        report.entries_received += theirs.len() as u64;
        let mut req = vec![MSG_EXCHANGE];
        put_wanted(&mut req, &[]);
        put_entries(&mut req, &theirs);
        let applied_here = local.call(&req)?;
        report.keys_repaired += applied_there + Reader::new(&applied_here).varint()?;
    }
    Ok(report)
}

/// One round trip to the peer, counted.
fn ask(peer: &mut dyn Peer, req: &[u8], report: &mut Report) -> Result<Vec<u8>, SyncError> {
    report.round_trips += 1;
    report.bytes_sent += req.len() as u64;
    let reply = peer.call(req)?;
    report.bytes_received += reply.len() as u64;
    Ok(reply)
}

/// The same request to both sides: (ours, theirs). Only the peer's traffic counts.
fn ask_both(
    local: &mut dyn Peer,
    peer: &mut dyn Peer,
    req: Vec<u8>,
    report: &mut Report,
) -> Result<(Vec<u8>, Vec<u8>), SyncError> {
    let theirs = ask(peer, &req, report)?;
    Ok((local.call(&req)?, theirs))
}

/// Key hashes present on one side only, or with different digests. Both sorted.
pub fn diff_listings(a: &[(u32, u32)], b: &[(u32, u32)]) -> Vec<u32> {
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

fn put_wanted(out: &mut Vec<u8>, wanted: &[(usize, Vec<u32>)]) {
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

    fn u32(&mut self) -> Result<u32, SyncError> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
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

    fn listing(&mut self) -> Result<Vec<(u32, u32)>, SyncError> {
        let n = self.count(8)?;
        (0..n).map(|_| Ok((self.u32()?, self.u32()?))).collect()
    }

    fn wanted(&mut self) -> Result<Vec<(usize, Vec<u32>)>, SyncError> {
        let buckets = self.index_list(BUCKETS)?;
        let mut out = Vec::with_capacity(buckets.len());
        for b in buckets {
            let n = self.count(4)?;
            let mut hashes: Vec<u32> = (0..n).map(|_| self.u32()).collect::<Result<_, _>>()?;
            hashes.sort_unstable();
            out.push((b, hashes));
        }
        Ok(out)
    }

    fn rest_entries(&mut self) -> Result<Vec<OwnedEntry>, SyncError> {
        let mut out = Vec::new();
        while !self.done() {
            if out.len() == ENTRIES_PER_REPLY_MAX {
                return Err(SyncError::Malformed("too many entries"));
            }
            out.push(self.entry()?);
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
        // The key and value rules are the receiving shard's (`Shard::refuses`): an
        // entry that breaks them is refused alone, the rest of the message applies.
        let key_len = self.varint()? as usize;
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
        assert_eq!(diff_listings(&a, &a), Vec::<u32>::new());
        assert_eq!(diff_listings(&[], &b), vec![2, 3, 5, 9]);
    }

    fn node(shards: usize, value_bytes_max: usize) -> Vec<Shard> {
        let budget = crate::shard::MemoryBudget::unlimited();
        (0..shards)
            .map(|i| Shard::new(i, shards.trailing_zeros(), budget.clone(), value_bytes_max))
            .collect()
    }

    fn entry(key: &[u8], value: Option<&[u8]>, hlc: u64) -> OwnedEntry {
        OwnedEntry {
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
            version: Version { hlc, origin: 9 },
        }
    }

    fn push(entries: &[OwnedEntry]) -> Vec<u8> {
        let mut req = vec![MSG_EXCHANGE];
        put_wanted(&mut req, &[]);
        put_entries(&mut req, entries);
        req
    }

    fn stored(shards: &[Shard], key: &[u8]) -> bool {
        let h = KeyHash::of(key);
        shards[h.shard(shards.len().trailing_zeros())]
            .get(h, key)
            .is_some()
    }

    #[test]
    fn pushed_entries_with_bad_keys_or_oversize_values_are_refused_alone() {
        let mut shards = node(2, 16);
        let now = 1 << 50;
        let pushed = [
            entry(b"two words", Some(b"v"), now),
            entry(b"line\r\nbreak", Some(b"v"), now),
            entry(b"tab\t", None, now),
            entry(b"big", Some(&[b'x'; 17]), now),
            entry(b"good", Some(b"a b\r\n\0"), now),
        ];
        Shards {
            shards: &mut shards,
            now_us: now,
        }
        .call(&push(&pushed))
        .unwrap();
        for e in &pushed[..4] {
            assert!(!stored(&shards, &e.key), "{:?}", e.key);
        }
        assert!(stored(&shards, b"good"), "the rest of the chunk applies");
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
            assert!(node.call(bad).is_err(), "{bad:?}");
        }
    }
}
