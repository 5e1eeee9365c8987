//! Anti-entropy, the pure core: the messages two replicas exchange to find and repair
//! their differences, the server side that answers them from shards, and the
//! initiator's algorithm. No I/O: the transport is whatever carries [`Peer::call`].
//!
//! The exchange, in round trips to the peer:
//! 1. compare roots (64-bit truncated digests); equal → done, one round trip. The root
//!    message carries the newest flush marker (FLUSHDB) both ways, and each side applies
//!    the other's before its root is read: a node that missed a flush drops what was
//!    flushed before any entry is compared, so it never pushes flushed entries back;
//! 2. descend the fixed 2^16-bucket tree [`FANOUT_BITS`] levels per round trip, asking
//!    only for the descendants of nodes that differ (levels 4, 8, 12, 16);
//! 3. for the buckets that differ, compare listings (key hash + entry digest per entry);
//! 4. fetch the peer's differing entries and push ours in one round trip; each side
//!    applies the other's with the last-write-wins merge, so one exchange heals both.
//!
//! Messages are binary (docs/ANTI_ENTROPY.md draws them); varints are LEB128 as in
//! [`crate::changes`].

use crate::store::journal::{decode_event, encode_event, Event, EventError};
use crate::store::keyspace::{shard_of_bucket, KeyHash, BUCKETS, BUCKET_BITS};
use crate::store::merkle::short_digest;
use crate::store::merkle::{combine_roots, Digest};
use crate::store::shard::{OwnedEntry, Shard};
use crate::store::version::Version;
use crate::wire::{put_varint, ReadError, Reader};

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
/// Most bytes of entries one exchange reply (or request) carries, besides one entry of
/// any size ([`ReplyRoom`]): bounds the memory an exchange needs whatever the value sizes.
pub const ENTRY_BYTES_PER_REPLY: usize = 16 << 20;
/// Most entries one exchange reply carries (so a request carrying them back is valid).
pub const ENTRIES_PER_REPLY_MAX: usize = REQUEST_ITEMS_MAX;
/// Most node indices, buckets or entries one request may name.
pub const REQUEST_ITEMS_MAX: usize = BUCKETS;

const MSG_ROOT: u8 = 1;
const MSG_NODES: u8 = 2;
const MSG_LISTINGS: u8 = 3;
/// 5, not 4: the exchange message of earlier releases (4) sent its entries in another
/// layout. A node of either refuses the other's as an unknown type, never misreads it.
const MSG_EXCHANGE: u8 = 5;

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
    /// Entries a side could not store (a key or value over its limits, or no room
    /// left): not applied, and the rest went on.
    pub entries_refused: u64,
    /// Entries in the peer's replies that this node did not ask for: not applied.
    pub entries_ignored: u64,
}

/// A parsed request.
#[derive(Debug)]
pub enum Request {
    /// Apply this flush marker (when newer), then give the root and the newest marker.
    Root { marker: Version },
    /// Truncated digests of these nodes of `level` (sorted indices).
    Nodes { level: u32, indices: Vec<usize> },
    /// Listings of these buckets (sorted).
    Listings { buckets: Vec<usize> },
    /// Apply `entries`; reply with the entries of `wanted` (bucket, sorted 32-bit key
    /// hashes) as they were before applying, as many as `room` takes.
    Exchange {
        wanted: Vec<(usize, Vec<u32>)>,
        entries: Vec<OwnedEntry>,
        /// The reply's room, shared by the shards that answer (on their own threads).
        room: ReplyRoom,
    },
}

/// The room left in one exchange reply: [`ENTRY_BYTES_PER_REPLY`] bytes and
/// [`ENTRIES_PER_REPLY_MAX`] entries for the whole node — the shards take from it as
/// they find their entries, so the reply carries the documented amount whatever the
/// shard count — plus one entry that does not fit the bytes left, whatever its size
/// (so no entry is too large to repair, and one large entry leaves the others their
/// room). An entry that finds no room stays different; the next exchange takes it.
#[derive(Debug)]
pub struct ReplyRoom(std::sync::Mutex<Room>);

#[derive(Debug)]
struct Room {
    bytes: usize,
    entries: usize,
    /// The one entry beyond `bytes` is still to be taken.
    beyond: bool,
}

impl Default for ReplyRoom {
    fn default() -> ReplyRoom {
        ReplyRoom(std::sync::Mutex::new(Room {
            bytes: ENTRY_BYTES_PER_REPLY,
            entries: ENTRIES_PER_REPLY_MAX,
            beyond: true,
        }))
    }
}

impl ReplyRoom {
    /// Take room for one entry of `size` bytes; false when there is none.
    fn take(&self, size: usize) -> bool {
        // Nothing panics while the lock is held, so it is never poisoned.
        let mut r = self.0.lock().expect("reply room lock");
        if r.entries == 0 {
            return false;
        }
        if size <= r.bytes {
            r.bytes -= size;
        } else if r.beyond {
            r.beyond = false;
        } else {
            return false;
        }
        r.entries -= 1;
        true
    }
}

/// The bytes an entry takes of a reply's room (about its encoded size).
fn entry_size(e: &OwnedEntry) -> usize {
    e.key.len() + e.value.as_ref().map_or(0, Vec::len) + 16
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
    refused: u64,
    /// The shard's flush marker, after applying the request's.
    marker: Version,
    /// Entries the request's flush marker dropped here (the caller logs them).
    pub flushed: u64,
}

/// Parse a request. Malformed input is an error, never a panic.
pub fn parse(request: &[u8]) -> Result<Request, SyncError> {
    let mut r = Reader::new(request);
    let req = match r.byte()? {
        MSG_ROOT => Request::Root {
            marker: read_version(&mut r)?,
        },
        MSG_NODES => {
            let level = u32::from(r.byte()?);
            if level > BUCKET_BITS {
                return Err(SyncError::Malformed("level"));
            }
            Request::Nodes {
                level,
                indices: read_index_list(&mut r, 1 << level)?,
            }
        }
        MSG_LISTINGS => {
            let buckets = read_index_list(&mut r, BUCKETS)?;
            if buckets.len() > BUCKETS_PER_ROUND {
                return Err(SyncError::Malformed("too many buckets"));
            }
            Request::Listings { buckets }
        }
        MSG_EXCHANGE => {
            let wanted = read_wanted(&mut r)?;
            if wanted.len() > BUCKETS_PER_ROUND {
                return Err(SyncError::Malformed("too many buckets"));
            }
            Request::Exchange {
                wanted,
                entries: read_entries(&mut r)?,
                room: ReplyRoom::default(),
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
        Request::Root { marker } => {
            part.flushed = shard.apply_flush(*marker, now_us);
            part.marker = shard.flushed();
            part.root = Some(shard.root());
        }
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
        Request::Exchange {
            wanted,
            entries,
            room,
        } => {
            // Ours are read before theirs are applied: each side sends what it held.
            for (pos, (b, hashes)) in wanted.iter().enumerate() {
                if owns_bucket(*b) {
                    let mut found =
                        shard.entries_by_hash(*b, |h| hashes.binary_search(&key32(h)).is_ok());
                    found.retain(|e| room.take(entry_size(e)));
                    part.entries.push((pos, found));
                }
            }
            // An entry this shard cannot store is counted and skipped: the rest of the
            // chunk applies.
            let full_before = shard.stats.storage_full;
            for e in entries {
                let h = KeyHash::of(&e.key);
                if owns_bucket(h.bucket()) {
                    let value = e.value.as_deref();
                    if shard.apply(h, &e.key, value, e.version, now_us) {
                        part.applied += 1;
                    } else if shard.refuses(&e.key, value) {
                        part.refused += 1;
                    }
                }
            }
            part.refused += shard.stats.storage_full - full_before;
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
        Request::Root { .. } => {
            out.extend_from_slice(&short_digest(&combine_roots(&roots(&parts))).to_le_bytes());
            let marker = parts.iter().map(|p| p.marker).max().unwrap_or_default();
            put_version(&mut out, marker);
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
            put_varint(&mut out, parts.iter().map(|p| p.refused).sum());
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
    // The newest flush marker first, both ways, so each root is read after it applied:
    // ours goes to the peer, and theirs, when newer, comes back to us.
    let (mine, marker) = root_reply(&local.call(&root_request(Version::default()))?)?;
    let (theirs, their_marker) = root_reply(&ask(peer, &root_request(marker), &mut report)?)?;
    let mine = if their_marker.wins_over(marker) {
        root_reply(&local.call(&root_request(their_marker))?)?.0
    } else {
        mine
    };
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
            let differ = diff_listings(&read_listing(&mut rm)?, &read_listing(&mut rt)?);
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
        let (_, ours) = exchange_reply(&local.call(&req)?)?;
        let mut req = vec![MSG_EXCHANGE];
        put_wanted(&mut req, &wanted);
        put_entries(&mut req, &ours);
        report.entries_sent += ours.len() as u64;
        let (there, theirs) = exchange_reply(&ask(peer, &req, &mut report)?)?;
        report.entries_received += theirs.len() as u64;
        // Only what we asked for: a reply names no keys we can check otherwise, and a
        // peer has no business writing anything else here.
        let (theirs, other): (Vec<OwnedEntry>, Vec<OwnedEntry>) =
            theirs.into_iter().partition(|e| asked_for(&wanted, e));
        report.entries_ignored += other.len() as u64;
        let mut req = vec![MSG_EXCHANGE];
        put_wanted(&mut req, &[]);
        put_entries(&mut req, &theirs);
        let (here, _) = exchange_reply(&local.call(&req)?)?;
        report.keys_repaired += there.0 + here.0;
        report.entries_refused += there.1 + here.1;
    }
    Ok(report)
}

/// A root request carrying `marker`.
fn root_request(marker: Version) -> Vec<u8> {
    let mut req = vec![MSG_ROOT];
    put_version(&mut req, marker);
    req
}

/// A root reply: the root's first 8 bytes, and the newest flush marker.
fn root_reply(reply: &[u8]) -> Result<(u64, Version), SyncError> {
    let mut r = Reader::new(reply);
    let root = u64::from_le_bytes(r.array()?);
    let marker = read_version(&mut r)?;
    if !r.done() {
        return Err(SyncError::Malformed("root reply"));
    }
    Ok((root, marker))
}

/// An exchange reply: (entries applied, entries refused) of the request's, and the
/// wanted entries.
fn exchange_reply(reply: &[u8]) -> Result<((u64, u64), Vec<OwnedEntry>), SyncError> {
    let mut r = Reader::new(reply);
    let counts = (r.varint()?, r.varint()?);
    Ok((counts, read_rest_entries(&mut r)?))
}

/// Whether `e` is one of the `wanted` (buckets and key hashes, both sorted).
fn asked_for(wanted: &[(usize, Vec<u32>)], e: &OwnedEntry) -> bool {
    let h = KeyHash::of(&e.key);
    wanted
        .binary_search_by_key(&h.bucket(), |w| w.0)
        .is_ok_and(|i| wanted[i].1.binary_search(&key32(h.0)).is_ok())
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

/// An entry as sent: its version's origin, then the store's change event at the
/// version's clock ([`encode_event`]).
fn encode_entry(out: &mut Vec<u8>, e: &OwnedEntry) {
    out.extend_from_slice(&e.version.origin.to_le_bytes());
    encode_event(out, e.version.hlc, &e.key, e.value.as_deref());
}

/// A version as sent: varint hlc, u32 origin.
fn put_version(out: &mut Vec<u8>, v: Version) {
    put_varint(out, v.hlc);
    out.extend_from_slice(&v.origin.to_le_bytes());
}

impl From<ReadError> for SyncError {
    fn from(e: ReadError) -> SyncError {
        SyncError::Malformed(match e {
            ReadError::Truncated(_) => "truncated",
            ReadError::BadVarint(_) => "varint",
        })
    }
}

fn read_u32(r: &mut Reader) -> Result<u32, SyncError> {
    Ok(u32::from_le_bytes(r.array()?))
}

/// A count, at most `REQUEST_ITEMS_MAX` and what the remaining bytes can hold.
fn read_count(r: &mut Reader, min_item_bytes: usize) -> Result<usize, SyncError> {
    let n = r.varint()? as usize;
    let room = r.left() / min_item_bytes.max(1);
    if n > REQUEST_ITEMS_MAX || n > room {
        return Err(SyncError::Malformed("count"));
    }
    Ok(n)
}

/// Strictly increasing indices below `limit`.
fn read_index_list(r: &mut Reader, limit: usize) -> Result<Vec<usize>, SyncError> {
    let n = read_count(r, 1)?;
    let mut out = Vec::with_capacity(n);
    let mut prev = 0usize;
    for k in 0..n {
        let gap = r.varint()? as usize;
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

fn read_listing(r: &mut Reader) -> Result<Vec<(u32, u32)>, SyncError> {
    let n = read_count(r, 8)?;
    (0..n).map(|_| Ok((read_u32(r)?, read_u32(r)?))).collect()
}

fn read_wanted(r: &mut Reader) -> Result<Vec<(usize, Vec<u32>)>, SyncError> {
    let buckets = read_index_list(r, BUCKETS)?;
    let mut out = Vec::with_capacity(buckets.len());
    for b in buckets {
        let n = read_count(r, 4)?;
        let mut hashes: Vec<u32> = (0..n).map(|_| read_u32(r)).collect::<Result<_, _>>()?;
        hashes.sort_unstable();
        out.push((b, hashes));
    }
    Ok(out)
}

fn read_rest_entries(r: &mut Reader) -> Result<Vec<OwnedEntry>, SyncError> {
    let mut out = Vec::new();
    while !r.done() {
        if out.len() == ENTRIES_PER_REPLY_MAX {
            return Err(SyncError::Malformed("too many entries"));
        }
        out.push(read_entry(r)?);
    }
    Ok(out)
}

fn read_entries(r: &mut Reader) -> Result<Vec<OwnedEntry>, SyncError> {
    let n = read_count(r, 7)?;
    (0..n).map(|_| read_entry(r)).collect()
}

/// An entry as [`encode_entry`] wrote it.
fn read_entry(r: &mut Reader) -> Result<OwnedEntry, SyncError> {
    let origin = read_u32(r)?;
    // The key and value rules are the receiving shard's (`Shard::refuses`): an
    // entry that breaks them is refused alone, the rest of the message applies.
    match decode_event(r) {
        Ok(Event::Change(c)) => Ok(OwnedEntry {
            key: c.key.to_vec(),
            value: c.value.map(<[u8]>::to_vec),
            version: Version { hlc: c.hlc, origin },
        }),
        Ok(Event::Flush(_)) | Err(EventError::BadKind(_)) => {
            Err(SyncError::Malformed("entry kind"))
        }
        Err(EventError::Read(e)) => Err(e.into()),
    }
}

fn read_version(r: &mut Reader) -> Result<Version, SyncError> {
    Ok(Version {
        hlc: r.varint()?,
        origin: read_u32(r)?,
    })
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
        let budget = crate::store::shard::MemoryBudget::unlimited();
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
        let reply = Shards {
            shards: &mut shards,
            now_us: now,
        }
        .call(&push(&pushed))
        .unwrap();
        assert_eq!(
            exchange_reply(&reply).unwrap().0,
            (1, 4),
            "applied, refused"
        );
        for e in &pushed[..4] {
            assert!(!stored(&shards, &e.key), "{:?}", e.key);
        }
        assert!(stored(&shards, b"good"), "the rest of the chunk applies");
    }

    fn put(shards: &mut [Shard], key: &[u8], value: &[u8]) {
        let h = KeyHash::of(key);
        let bits = shards.len().trailing_zeros();
        let v = Version {
            hlc: 1 << 50,
            origin: 1,
        };
        assert!(shards[h.shard(bits)].apply(h, key, Some(value), v, 1 << 50));
    }

    /// Keys `{prefix}0..n`, sorted by bucket.
    fn keys(prefix: &str, n: usize) -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> = (0..n)
            .map(|i| format!("{prefix}{i}").into_bytes())
            .collect();
        keys.sort_by_key(|k| KeyHash::of(k).0);
        keys
    }

    /// An exchange request asking for `keys`.
    fn ask_for(keys: &[Vec<u8>]) -> Vec<u8> {
        let mut wanted: Vec<(usize, Vec<u32>)> = Vec::new();
        for k in keys {
            let h = KeyHash::of(k);
            match wanted.last_mut() {
                Some((b, hashes)) if *b == h.bucket() => hashes.push(key32(h.0)),
                _ => wanted.push((h.bucket(), vec![key32(h.0)])),
            }
        }
        let mut req = vec![MSG_EXCHANGE];
        put_wanted(&mut req, &wanted);
        put_entries(&mut req, &[]);
        req
    }

    /// The entries of an exchange reply (after its counts).
    fn entries_of(reply: &[u8]) -> Vec<OwnedEntry> {
        exchange_reply(reply).unwrap().1
    }

    #[test]
    fn the_reply_room_holds_its_bytes_its_entries_and_one_entry_beyond() {
        let room = ReplyRoom::default();
        assert!(room.take(ENTRY_BYTES_PER_REPLY - 10));
        assert!(room.take(64 << 20), "one entry beyond the bytes left");
        assert!(!room.take(11), "only one");
        for _ in 2..ENTRIES_PER_REPLY_MAX {
            assert!(room.take(0));
        }
        assert!(!room.take(0), "{ENTRIES_PER_REPLY_MAX} entries at most");
    }

    #[test]
    fn a_reply_carries_the_whole_budget_whatever_the_shard_count() {
        // 20 entries of 1 MiB on 4 shards: one reply carries 15 within the 16 MiB, and
        // one more beyond it — not 16 MiB divided by the shards (3 per shard).
        let mut b = node(4, 1 << 20);
        let wanted = keys("big", 20);
        for k in &wanted {
            put(&mut b, k, &[b'v'; 1 << 20]);
        }
        let reply = Shards {
            shards: &mut b,
            now_us: 1 << 50,
        }
        .call(&ask_for(&wanted))
        .unwrap();
        let n = entries_of(&reply).len();
        assert_eq!(n, 16);
    }

    #[test]
    fn an_entry_the_receiver_refuses_does_not_block_the_rest_of_its_chunk() {
        // The peer holds a 17 MiB value this node cannot store (its limit is 1 MiB),
        // first in its chunk, and ten small ones. The big one is refused at every
        // exchange; the small ones must come all the same.
        let now = 1 << 50;
        let (mut a, mut b) = (node(1, 1 << 20), node(1, 32 << 20));
        let small = keys("small", 10);
        for k in &small {
            put(&mut b, k, b"v");
        }
        let lowest = KeyHash::of(&small[0]).0;
        let big = (0..)
            .map(|i| format!("big{i}").into_bytes())
            .find(|k| KeyHash::of(k).0 < lowest)
            .unwrap();
        put(&mut b, &big, &vec![b'x'; 17 << 20]);
        let mut local = Shards {
            shards: &mut a,
            now_us: now,
        };
        let mut peer = Shards {
            shards: &mut b,
            now_us: now,
        };
        let report = exchange(&mut local, &mut peer).unwrap();
        for k in &small {
            assert!(stored(&a, k), "{:?}", String::from_utf8_lossy(k));
        }
        assert!(!stored(&a, &big));
        assert_eq!((report.keys_repaired, report.entries_refused), (10, 1));
    }

    #[test]
    fn an_entry_a_full_receiver_cannot_store_does_not_block_the_rest_of_its_chunk() {
        // This node's memory budget holds the ten small entries, not the 100 KB one the
        // peer lists first: "Storage full" for it, the small ones come all the same.
        let now = 1 << 50;
        let full = crate::store::shard::MemoryBudget::new(4096);
        let mut a: Vec<Shard> = vec![Shard::new(0, 0, full, 1 << 20)];
        let mut b = node(1, 1 << 20);
        let small = keys("small", 10);
        for k in &small {
            put(&mut b, k, b"v");
        }
        let lowest = KeyHash::of(&small[0]).0;
        let big = (0..)
            .map(|i| format!("big{i}").into_bytes())
            .find(|k| KeyHash::of(k).0 < lowest)
            .unwrap();
        put(&mut b, &big, &vec![b'x'; 100_000]);
        let mut local = Shards {
            shards: &mut a,
            now_us: now,
        };
        let mut peer = Shards {
            shards: &mut b,
            now_us: now,
        };
        let report = exchange(&mut local, &mut peer).unwrap();
        for k in &small {
            assert!(stored(&a, k), "{:?}", String::from_utf8_lossy(k));
        }
        assert!(!stored(&a, &big));
        assert_eq!((report.keys_repaired, report.entries_refused), (10, 1));
    }

    /// A peer that slips an entry nobody asked for into its exchange replies.
    struct Slipping<'a> {
        peer: Shards<'a>,
        extra: OwnedEntry,
    }

    impl Peer for Slipping<'_> {
        fn call(&mut self, request: &[u8]) -> Result<Vec<u8>, SyncError> {
            let mut reply = self.peer.call(request)?;
            if request[0] == MSG_EXCHANGE {
                encode_entry(&mut reply, &self.extra);
            }
            Ok(reply)
        }
    }

    #[test]
    fn the_initiator_applies_only_the_entries_it_asked_for() {
        let now = 1 << 50;
        let (mut a, mut b) = (node(2, 1 << 10), node(2, 1 << 10));
        put(&mut b, b"asked", b"v");
        let mut local = Shards {
            shards: &mut a,
            now_us: now,
        };
        let mut peer = Slipping {
            peer: Shards {
                shards: &mut b,
                now_us: now,
            },
            extra: entry(b"slipped", Some(b"x"), now),
        };
        let report = exchange(&mut local, &mut peer).unwrap();
        assert!(stored(&a, b"asked"));
        assert!(!stored(&a, b"slipped"), "an entry it did not ask for");
        assert_eq!((report.entries_received, report.entries_ignored), (2, 1));
    }

    /// Store `key` on the shard that owns it, at version (`hlc`, 9).
    fn put_at(shards: &mut [Shard], key: &[u8], value: Option<&[u8]>, hlc: u64) {
        let h = KeyHash::of(key);
        let bits = shards.len().trailing_zeros();
        let v = Version { hlc, origin: 9 };
        assert!(shards[h.shard(bits)].apply(h, key, value, v, hlc));
    }

    #[test]
    fn an_exchange_carries_the_newest_flush_marker_both_ways_before_comparing() {
        let t = 1u64 << 50;
        for a_starts in [true, false] {
            // Both hold the same old entries; A is flushed at t, then each side gets a
            // newer write. B never heard of the flush.
            let (mut a, mut b) = (node(2, 1 << 10), node(1, 1 << 10));
            for k in keys("old", 50) {
                put_at(&mut a, &k, Some(b"v"), t - 1000);
                put_at(&mut b, &k, Some(b"v"), t - 1000);
            }
            put_at(&mut b, b"deleted", None, t - 500);
            for s in a.iter_mut() {
                s.flush(t, false);
            }
            put_at(&mut a, b"a-after", Some(b"1"), t + 1);
            put_at(&mut b, b"b-after", Some(b"2"), t + 2);
            let report = {
                let mut a = Shards {
                    shards: &mut a,
                    now_us: t,
                };
                let mut b = Shards {
                    shards: &mut b,
                    now_us: t,
                };
                if a_starts {
                    exchange(&mut a, &mut b)
                } else {
                    exchange(&mut b, &mut a)
                }
                .unwrap()
            };
            // Nothing flushed crossed: only the two newer writes did.
            assert_eq!(report.keys_repaired, 2, "{report:?}");
            assert_eq!(report.entries_sent + report.entries_received, 2);
            for n in [&a[..], &b[..]] {
                assert!(stored(n, b"a-after") && stored(n, b"b-after"));
                assert!(!stored(n, &keys("old", 50)[7]));
                let held: u64 = n.iter().map(|s| s.snapshot_stats().keys).sum();
                let tombstones: u64 = n.iter().map(|s| s.snapshot_stats().tombstones).sum();
                assert_eq!((held, tombstones), (2, 0));
                for s in n {
                    assert_eq!(s.flushed(), Version { hlc: t, origin: 0 });
                }
            }
            let root = |n: &mut [Shard]| {
                let roots: Vec<Digest> = n.iter_mut().map(Shard::root).collect();
                combine_roots(&roots)
            };
            assert_eq!(root(&mut a), root(&mut b));
        }
    }

    #[test]
    fn equal_contents_under_different_markers_still_pass_the_marker_in_one_round_trip() {
        let t = 1u64 << 50;
        let (mut a, mut b) = (node(1, 1 << 10), node(2, 1 << 10));
        a[0].flush(t, false);
        let mut local = Shards {
            shards: &mut b,
            now_us: t,
        };
        let mut peer = Shards {
            shards: &mut a,
            now_us: t,
        };
        let report = exchange(&mut local, &mut peer).unwrap();
        assert_eq!(report.round_trips, 1);
        for s in &b {
            assert_eq!(s.flushed(), Version { hlc: t, origin: 0 });
        }
        // A late copy of a write the flush covered is refused there now.
        let late = Version {
            hlc: t - 1,
            origin: 9,
        };
        let h = KeyHash::of(b"x");
        assert!(!b[h.shard(1)].apply(h, b"x", Some(b"old"), late, t));
    }

    proptest::proptest! {
        #[test]
        fn entries_read_back_as_written(entries in proptest::collection::vec(
            (proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
             proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)),
             proptest::prelude::any::<u64>(), proptest::prelude::any::<u32>()), 0..20)) {
            let entries: Vec<OwnedEntry> = entries
                .into_iter()
                .map(|(key, value, hlc, origin)| OwnedEntry { key, value, version: Version { hlc, origin } })
                .collect();
            // As a request carries them (counted) and as a reply does (to the end).
            let mut req = Vec::new();
            put_entries(&mut req, &entries);
            let mut r = Reader::new(&req);
            proptest::prop_assert_eq!(&read_entries(&mut r).unwrap(), &entries);
            proptest::prop_assert!(r.done());
            let mut reply = Vec::new();
            for e in &entries {
                encode_entry(&mut reply, e);
            }
            proptest::prop_assert_eq!(read_rest_entries(&mut Reader::new(&reply)).unwrap(), entries);
        }
    }

    #[test]
    fn an_entry_is_its_origin_and_a_store_event() {
        // The layout docs/ANTI_ENTROPY.md draws: origin 9 (u32 LE), then the set of k
        // to v at hlc 300 exactly as a replication payload carries it.
        let mut out = Vec::new();
        encode_entry(&mut out, &entry(b"k", Some(b"v"), 300));
        let origin = 9u32.to_le_bytes();
        assert_eq!(out[..4], origin);
        assert_eq!(out[4..], [1, 0xac, 0x02, 1, b'k', 1, b'v']);
        // A flush is no entry, and the exchange message of earlier releases (type 4,
        // entries in the old layout) is refused as a whole.
        let mut flush = vec![MSG_EXCHANGE, 0, 1, 9, 0, 0, 0];
        crate::store::journal::encode_flush(&mut flush, 300);
        assert_eq!(
            parse(&flush).err(),
            Some(SyncError::Malformed("entry kind"))
        );
        assert_eq!(
            parse(&[4, 0, 0]).err(),
            Some(SyncError::Malformed("message type"))
        );
    }

    #[test]
    fn a_varint_overflowing_64_bits_is_refused() {
        // A root request whose marker clock is nine 0xff bytes and a 10th byte of 2:
        // bit 64 and up. Cutting it silently would apply a marker nobody sent.
        let mut req = vec![MSG_ROOT];
        req.extend_from_slice(&[0xff; 9]);
        req.push(0x02);
        req.extend_from_slice(&[0; 4]);
        assert_eq!(parse(&req).err(), Some(SyncError::Malformed("varint")));
        // The largest clock a varint holds is read as it is.
        let mut req = vec![MSG_ROOT];
        put_varint(&mut req, u64::MAX);
        req.extend_from_slice(&[0; 4]);
        assert!(matches!(parse(&req), Ok(Request::Root { marker }) if marker.hlc == u64::MAX));
    }

    #[test]
    fn malformed_requests_are_errors_not_panics() {
        let mut shards: Vec<Shard> = (0..2)
            .map(|i| {
                Shard::new(
                    i,
                    1,
                    crate::store::shard::MemoryBudget::unlimited(),
                    1 << 10,
                )
            })
            .collect();
        let mut node = Shards {
            shards: &mut shards,
            now_us: 0,
        };
        for bad in [
            &[][..],
            &[9],
            &[MSG_NODES, 17, 1, 0],
            &[MSG_NODES, 4, 2, 3, 0],      // not increasing
            &[MSG_NODES, 4, 1, 16],        // index out of range
            &[MSG_LISTINGS, 200],          // count larger than the bytes
            &[MSG_EXCHANGE, 0, 1, 7],      // a bad entry
            &[MSG_ROOT, 0],                // a marker cut short
            &[MSG_ROOT, 0, 0, 0, 0, 0, 0], // trailing byte
        ] {
            assert!(node.call(bad).is_err(), "{bad:?}");
        }
    }
}
