//! Anti-entropy, the exchange: the initiator's algorithm, which drives two [`Peer`]s —
//! this node and the other replica — through the messages ([`crate::antientropy::messages`])
//! to find and repair their differences. No I/O: the transport is whatever carries
//! [`Peer::call`].
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

use crate::antientropy::messages::{
    exchange_reply, exchange_request, key32, listings_reply, listings_request, nodes_request,
    root_reply, root_request, Peer, SyncError, BUCKETS_PER_ROUND, NODE_DIGEST_BYTES,
};
use crate::limits::BUCKET_BITS;
use crate::store::keyspace::KeyHash;
use crate::store::shard::OwnedEntry;
use crate::store::version::Version;

/// Tree levels descended per round trip: 16 descendants per differing node.
pub const FANOUT_BITS: u32 = 4;

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
    let differing = descend(local, peer, &mut report)?;
    // Compare listings and repair, a bounded number of buckets per round.
    for buckets in differing.chunks(BUCKETS_PER_ROUND) {
        repair(local, peer, buckets, &mut report)?;
    }
    Ok(report)
}

/// Descend the tree from the root to the buckets, [`FANOUT_BITS`] levels per round
/// trip, expanding only the nodes that differ: the buckets that differ, sorted.
fn descend(
    local: &mut dyn Peer,
    peer: &mut dyn Peer,
    report: &mut Report,
) -> Result<Vec<usize>, SyncError> {
    // The frontier holds the differing nodes of the current level.
    let (mut level, mut frontier) = (0u32, vec![0usize]);
    while level < BUCKET_BITS && !frontier.is_empty() {
        let next = (level + FANOUT_BITS).min(BUCKET_BITS);
        let span = 1usize << (next - level);
        let children: Vec<usize> = frontier
            .iter()
            .flat_map(|&p| p * span..(p + 1) * span)
            .collect();
        let (mine, theirs) = ask_both(local, peer, nodes_request(next, &children), report)?;
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
    Ok(frontier)
}

/// Compare the listings of `buckets` (at most [`BUCKETS_PER_ROUND`]) and swap the
/// entries that differ.
fn repair(
    local: &mut dyn Peer,
    peer: &mut dyn Peer,
    buckets: &[usize],
    report: &mut Report,
) -> Result<(), SyncError> {
    let (mine, theirs) = ask_both(local, peer, listings_request(buckets), report)?;
    let (mine, theirs) = (
        listings_reply(&mine, buckets.len())?,
        listings_reply(&theirs, buckets.len())?,
    );
    let mut wanted: Vec<(usize, Vec<u32>)> = Vec::new();
    for ((&bucket, m), t) in buckets.iter().zip(&mine).zip(&theirs) {
        let differ = diff_listings(m, t);
        report.buckets_compared += 1;
        if !differ.is_empty() {
            wanted.push((bucket, differ));
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    // Our entries first (an exchange with nothing to apply), then one round trip
    // to the peer: it applies ours and returns its own; then we apply theirs.
    let (_, ours) = exchange_reply(&local.call(&exchange_request(&wanted, &[]))?)?;
    report.entries_sent += ours.len() as u64;
    let req = exchange_request(&wanted, &ours);
    let (there, theirs) = exchange_reply(&ask(peer, &req, report)?)?;
    report.entries_received += theirs.len() as u64;
    // Only what we asked for: a reply names no keys we can check otherwise, and a
    // peer has no business writing anything else here.
    let (theirs, other): (Vec<OwnedEntry>, Vec<OwnedEntry>) =
        theirs.into_iter().partition(|e| asked_for(&wanted, e));
    report.entries_ignored += other.len() as u64;
    let (here, _) = exchange_reply(&local.call(&exchange_request(&[], &theirs))?)?;
    report.keys_repaired += there.0 + here.0;
    report.entries_refused += there.1 + here.1;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::antientropy::messages::{encode_entry, parse, Request};
    use crate::antientropy::serve::tests::{entry, keys, node, put, put_at, stored};
    use crate::antientropy::serve::Shards;
    use crate::store::merkle::{combine_roots, Digest};
    use crate::store::shard::Shard;

    #[test]
    fn diff_finds_one_sided_and_changed_hashes() {
        let a = [(1, 10), (3, 30), (5, 50)];
        let b = [(2, 20), (3, 31), (5, 50), (9, 90)];
        assert_eq!(diff_listings(&a, &b), vec![1, 2, 3, 9]);
        assert_eq!(diff_listings(&a, &a), Vec::<u32>::new());
        assert_eq!(diff_listings(&[], &b), vec![2, 3, 5, 9]);
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
            if matches!(parse(request), Ok(Request::Exchange { .. })) {
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
}
