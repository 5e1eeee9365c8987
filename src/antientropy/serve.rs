//! The answering side of anti-entropy: each shard's share of a reply ([`answer_part`],
//! run on the shard's own thread) and their assembly into the reply bytes
//! ([`assemble`]). Pure; [`Shards`] runs both steps for a node's shards in one thread
//! (tests, benches, and the in-process side of an exchange).

use crate::antientropy::messages::{
    encode_entry, key32, node32, parse, put_exchange_counts, put_listing, put_root_reply, Peer,
    ReplyRoom, Request, SyncError,
};
use crate::limits::BUCKET_BITS;
use crate::store::keyspace::{shard_of_bucket, KeyHash};
use crate::store::merkle::{combine_roots, short_digest, Digest};
use crate::store::shard::{OwnedEntry, Shard};
use crate::store::version::Version;

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
        } => answer_exchange(
            shard,
            &owns_bucket,
            wanted,
            entries,
            room,
            &mut part,
            now_us,
        ),
    }
    part
}

/// A shard's share of an exchange: its `wanted` entries as they are, as many as `room`
/// takes, then the request's `entries` it owns, applied.
fn answer_exchange(
    shard: &mut Shard,
    owns_bucket: &dyn Fn(usize) -> bool,
    wanted: &[(usize, Vec<u32>)],
    entries: &[OwnedEntry],
    room: &ReplyRoom,
    part: &mut Part,
    now_us: u64,
) {
    // Ours are read before theirs are applied: each side sends what it held.
    for (pos, (b, hashes)) in wanted.iter().enumerate() {
        if owns_bucket(*b) {
            let mut found = shard.entries_by_hash(*b, |h| hashes.binary_search(&key32(h)).is_ok());
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

/// Join the shards' shares (index = shard) into the reply bytes. The one place both ways
/// of reaching a node's shards (a `SYNC.MSG` on the client port, this node's own
/// exchanges through the inboxes) meet, so it also says when a peer's flush marker
/// dropped entries here.
pub fn assemble(req: &Request, parts: Vec<Part>) -> Vec<u8> {
    let flushed: u64 = parts.iter().map(|p| p.flushed).sum();
    if flushed > 0 {
        tracing::info!(
            entries_dropped = flushed,
            "an anti-entropy peer knew of a newer FLUSHDB: applied its flush marker"
        );
    }
    let mut out = Vec::new();
    let bits = parts.len().trailing_zeros();
    let roots = |parts: &[Part]| -> Vec<Digest> { parts.iter().filter_map(|p| p.root).collect() };
    match req {
        Request::Root { .. } => {
            let marker = parts.iter().map(|p| p.marker).max().unwrap_or_default();
            put_root_reply(
                &mut out,
                short_digest(&combine_roots(&roots(&parts))),
                marker,
            );
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
                put_listing(&mut out, &listing);
            }
        }
        Request::Exchange { wanted, .. } => {
            let applied = parts.iter().map(|p| p.applied).sum();
            put_exchange_counts(&mut out, applied, parts.iter().map(|p| p.refused).sum());
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::antientropy::messages::{
        exchange_reply, exchange_request, MSG_EXCHANGE, MSG_LISTINGS, MSG_NODES, MSG_ROOT,
    };

    pub(crate) fn node(shards: usize, value_bytes_max: usize) -> Vec<Shard> {
        let budget = crate::store::shard::MemoryBudget::unlimited();
        (0..shards)
            .map(|i| Shard::new(i, shards.trailing_zeros(), budget.clone(), value_bytes_max))
            .collect()
    }

    pub(crate) fn entry(key: &[u8], value: Option<&[u8]>, hlc: u64) -> OwnedEntry {
        OwnedEntry {
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
            version: Version { hlc, origin: 9 },
        }
    }

    fn push(entries: &[OwnedEntry]) -> Vec<u8> {
        exchange_request(&[], entries)
    }

    pub(crate) fn stored(shards: &[Shard], key: &[u8]) -> bool {
        let h = KeyHash::of(key);
        shards[h.shard(shards.len().trailing_zeros())]
            .get(h, key)
            .is_some()
    }

    pub(crate) fn put(shards: &mut [Shard], key: &[u8], value: &[u8]) {
        let h = KeyHash::of(key);
        let bits = shards.len().trailing_zeros();
        let v = Version {
            hlc: 1 << 50,
            origin: 1,
        };
        assert!(shards[h.shard(bits)].apply(h, key, Some(value), v, 1 << 50));
    }

    /// Keys `{prefix}0..n`, sorted by bucket.
    pub(crate) fn keys(prefix: &str, n: usize) -> Vec<Vec<u8>> {
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
        exchange_request(&wanted, &[])
    }

    /// The entries of an exchange reply (after its counts).
    fn entries_of(reply: &[u8]) -> Vec<OwnedEntry> {
        exchange_reply(reply).unwrap().1
    }

    /// Store `key` on the shard that owns it, at version (`hlc`, 9).
    pub(crate) fn put_at(shards: &mut [Shard], key: &[u8], value: Option<&[u8]>, hlc: u64) {
        let h = KeyHash::of(key);
        let bits = shards.len().trailing_zeros();
        let v = Version { hlc, origin: 9 };
        assert!(shards[h.shard(bits)].apply(h, key, value, v, hlc));
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
