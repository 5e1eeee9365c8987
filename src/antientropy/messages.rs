//! Anti-entropy messages: the requests two replicas send each other and their replies,
//! encoded and parsed, and the limits every message keeps. Pure: bytes in, bytes or a
//! typed error out; docs/ANTI_ENTROPY.md draws each message byte by byte. Entries travel
//! as their origin and a store change event ([`crate::store::journal`]); varints are
//! LEB128 ([`crate::wire`]).

use crate::limits::{BUCKETS, BUCKET_BITS};
use crate::store::journal::{self, Entry, EventError};
use crate::store::merkle::Digest;
use crate::store::shard::OwnedEntry;
use crate::store::version::Version;
use crate::wire::{put_varint, ReadError, Reader};

/// Interior node digests travel truncated to 32 bits: a false "equal" needs a 2^-32
/// coincidence, and only delays a repair until the subtree's next write. Measured:
/// halving the digests cut the d = 100 exchange at 1M keys from 68.8 KB to about 45 KB.
pub const NODE_DIGEST_BYTES: usize = 4;
/// Most bytes of entries one exchange reply (or request) carries, besides one entry of
/// any size ([`ReplyRoom`]): bounds the memory an exchange needs whatever the value sizes.
pub const ENTRY_BYTES_PER_REPLY: usize = 16 << 20;
/// Most entries one exchange reply carries (so a request carrying them back is valid).
pub const ENTRIES_PER_REPLY_MAX: usize = REQUEST_ITEMS_MAX;
/// Most node indices, buckets or entries one request may name.
pub const REQUEST_ITEMS_MAX: usize = BUCKETS;
/// Buckets whose listings are compared per round trip: bounds every message (a node
/// that starts empty fills itself in chunks, never one message holding everything).
pub const BUCKETS_PER_ROUND: usize = 256;

pub(crate) const MSG_ROOT: u8 = 1;
pub(crate) const MSG_NODES: u8 = 2;
pub(crate) const MSG_LISTINGS: u8 = 3;
/// 5, not 4: the exchange message of earlier releases (4) sent its entries in another
/// layout. A node of either refuses the other's as an unknown type, never misreads it.
pub(crate) const MSG_EXCHANGE: u8 = 5;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("malformed sync message: {0}")]
    Malformed(&'static str),
    #[error("peer: {0}")]
    Transport(String),
}

impl From<ReadError> for SyncError {
    fn from(e: ReadError) -> SyncError {
        SyncError::Malformed(match e {
            ReadError::Truncated(_) => "truncated",
            ReadError::BadVarint(_) => "varint",
        })
    }
}

/// One side of the transport: send a request, get the reply. It lives beside the
/// messages rather than in exchange.rs so that the answering side (serve.rs) and the
/// network client implement it without depending on the exchange.
pub trait Peer {
    fn call(&mut self, request: &[u8]) -> Result<Vec<u8>, SyncError>;
}

/// A node digest as sent.
pub fn node32(d: &Digest) -> u32 {
    u32::from_le_bytes(d[..4].try_into().expect("32-byte digest"))
}

/// A key hash as listed: the 32 bits below the bucket bits (all keys of a bucket share
/// the top 16), so order within a bucket is kept.
pub fn key32(h: u64) -> u32 {
    (h >> (64 - BUCKET_BITS - 32)) as u32
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
    pub fn take(&self, size: usize) -> bool {
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

/// A root request carrying `marker`.
pub fn root_request(marker: Version) -> Vec<u8> {
    let mut req = vec![MSG_ROOT];
    put_version(&mut req, marker);
    req
}

/// A request for the digests of the nodes `indices` (sorted) of `level`.
pub fn nodes_request(level: u32, indices: &[usize]) -> Vec<u8> {
    let mut req = vec![MSG_NODES, level as u8];
    put_index_list(&mut req, indices);
    req
}

/// A request for the listings of `buckets` (sorted).
pub fn listings_request(buckets: &[usize]) -> Vec<u8> {
    let mut req = vec![MSG_LISTINGS];
    put_index_list(&mut req, buckets);
    req
}

/// An exchange request: apply `entries`, and send back the `wanted` ones.
pub fn exchange_request(wanted: &[(usize, Vec<u32>)], entries: &[OwnedEntry]) -> Vec<u8> {
    let mut req = vec![MSG_EXCHANGE];
    put_wanted(&mut req, wanted);
    put_entries(&mut req, entries);
    req
}

/// Append a root reply: the root's first 8 bytes, and the newest flush marker.
pub fn put_root_reply(out: &mut Vec<u8>, root: u64, marker: Version) {
    out.extend_from_slice(&root.to_le_bytes());
    put_version(out, marker);
}

/// A root reply: the root's first 8 bytes, and the newest flush marker.
pub fn root_reply(reply: &[u8]) -> Result<(u64, Version), SyncError> {
    let mut r = Reader::new(reply);
    let root = u64::from_le_bytes(r.array()?);
    let marker = read_version(&mut r)?;
    if !r.done() {
        return Err(SyncError::Malformed("root reply"));
    }
    Ok((root, marker))
}

/// Append one bucket's listing: a count, then (key hash, entry digest) pairs.
pub fn put_listing(out: &mut Vec<u8>, listing: &[(u32, u32)]) {
    put_varint(out, listing.len() as u64);
    for (h, d) in listing {
        out.extend_from_slice(&h.to_le_bytes());
        out.extend_from_slice(&d.to_le_bytes());
    }
}

/// A listings reply: one listing per bucket asked for, `buckets` of them.
pub fn listings_reply(reply: &[u8], buckets: usize) -> Result<Vec<Vec<(u32, u32)>>, SyncError> {
    let mut r = Reader::new(reply);
    let listings = (0..buckets)
        .map(|_| read_listing(&mut r))
        .collect::<Result<Vec<_>, _>>()?;
    if !r.done() {
        return Err(SyncError::Malformed("listings"));
    }
    Ok(listings)
}

/// Append the head of an exchange reply: how many of the request's entries were
/// applied, and how many refused. The wanted entries follow ([`encode_entry`]).
pub fn put_exchange_counts(out: &mut Vec<u8>, applied: u64, refused: u64) {
    put_varint(out, applied);
    put_varint(out, refused);
}

/// An exchange reply: (entries applied, entries refused) of the request's, and the
/// wanted entries.
pub fn exchange_reply(reply: &[u8]) -> Result<((u64, u64), Vec<OwnedEntry>), SyncError> {
    let mut r = Reader::new(reply);
    let counts = (r.varint()?, r.varint()?);
    Ok((counts, read_rest_entries(&mut r)?))
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

/// An entry as sent: the store's entry encoding ([`journal::encode_entry`]: its
/// version's origin, then the change event at the version's clock).
pub fn encode_entry(out: &mut Vec<u8>, e: &OwnedEntry) {
    journal::encode_entry(out, e.version, &e.key, e.value.as_deref());
}

/// A version as sent: varint hlc, u32 origin.
fn put_version(out: &mut Vec<u8>, v: Version) {
    put_varint(out, v.hlc);
    out.extend_from_slice(&v.origin.to_le_bytes());
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
    // The key and value rules are the receiving shard's (`Shard::refuses`): an
    // entry that breaks them is refused alone, the rest of the message applies.
    match journal::decode_entry(r) {
        Ok(Entry::Change {
            version,
            key,
            value,
        }) => Ok(OwnedEntry {
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
            version,
        }),
        Ok(Entry::Flush(_) | Entry::Forget(_)) | Err(EventError::BadKind(_)) => {
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
    use proptest::prelude::*;

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

    proptest! {
        #[test]
        fn entries_read_back_as_written(entries in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..40),
             proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
             any::<u64>(), any::<u32>()), 0..20)) {
            let entries: Vec<OwnedEntry> = entries
                .into_iter()
                .map(|(key, value, hlc, origin)| OwnedEntry { key, value, version: Version { hlc, origin } })
                .collect();
            // As a request carries them (counted) and as a reply does (to the end).
            let Ok(Request::Exchange { entries: got, .. }) = parse(&exchange_request(&[], &entries)) else {
                panic!("an exchange request");
            };
            prop_assert_eq!(&got, &entries);
            let mut reply = Vec::new();
            put_exchange_counts(&mut reply, 1, 2);
            for e in &entries {
                encode_entry(&mut reply, e);
            }
            prop_assert_eq!(exchange_reply(&reply).unwrap(), ((1, 2), entries));
        }
    }

    #[test]
    fn an_entry_is_its_origin_and_a_store_event() {
        // The example docs/ANTI_ENTROPY.md draws: origin 9 (u32 LE), then the set of k
        // to v at hlc 300 exactly as a replication payload carries it.
        let mut out = Vec::new();
        let e = OwnedEntry {
            key: b"k".to_vec(),
            value: Some(b"v".to_vec()),
            version: Version {
                hlc: 300,
                origin: 9,
            },
        };
        encode_entry(&mut out, &e);
        assert_eq!(out, [9, 0, 0, 0, 1, 0xac, 0x02, 1, b'k', 1, b'v']);
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
        let marker = Version {
            hlc: u64::MAX,
            origin: 0,
        };
        assert!(
            matches!(parse(&root_request(marker)), Ok(Request::Root { marker: m }) if m == marker)
        );
    }
}
