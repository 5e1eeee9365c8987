//! Entries read back from a log segment or a snapshot, applied to the shards being
//! recovered. Pure: bytes in, shards changed.
//!
//! Loading is the last-write-wins merge without its rules of time
//! ([`Shard::restore`]): an entry is applied if it is newer than what the shard holds,
//! whatever order it comes in. So a snapshot taken while the shard kept writing, followed
//! by the log from the snapshot's start, gives exactly the state the log ends in.

use crate::store::journal::{decode_entry, Entry};
use crate::store::keyspace::{shard_bits, shard_of_bucket, KeyHash};
use crate::store::shard::Shard;
use crate::wire::Reader;

/// Apply `entries`, read from the files of a shard that owned the (global) buckets
/// `from`, to `shards`: either that one shard, or every shard of the node (files written
/// with another shard count: each key goes to the shard that owns it now). A flush
/// applies to every shard given (it is node-wide, and order does not matter to it); a
/// forget only to the buckets `from` (its log holds those buckets' later entries, no
/// other's). Returns the number of entries read.
pub fn restore_entries(
    shards: &mut [Shard],
    from: std::ops::Range<usize>,
    entries: &[u8],
) -> Result<u64, String> {
    let bits = (shards.len() > 1).then(|| shard_bits(shards.len()));
    let mut r = Reader::new(entries);
    let mut read = 0;
    while !r.done() {
        let at = r.at();
        let entry = decode_entry(&mut r).map_err(|e| format!("entry at byte {at}: {e}"))?;
        match entry {
            Entry::Change {
                version,
                key,
                value,
            } => {
                let h = KeyHash::of(key);
                let shard = match bits {
                    Some(bits) => &mut shards[shard_of_bucket(h.bucket(), bits)],
                    None if shards[0].owns(h) => &mut shards[0],
                    None => return Err(format!("entry at byte {at}: a key of another shard")),
                };
                // The shard would drop it silently, and the next snapshot lose it for good.
                if !crate::limits::is_valid_key(key) {
                    return Err(format!("entry at byte {at}: a key no client can write"));
                }
                if shard.refuses(key, value) {
                    let len = value.map_or(0, <[u8]>::len);
                    return Err(format!(
                        "entry at byte {at}: a value of {len} bytes, over what this node \
                         accepts; raise network.max_line_bytes to what it was when the entry \
                         was written"
                    ));
                }
                shard.restore(h, key, value, version);
            }
            Entry::Flush(marker) => {
                for s in shards.iter_mut() {
                    s.restore_flush(marker);
                }
            }
            Entry::Forget(hlc) => {
                for s in shards.iter_mut() {
                    s.restore_forget(hlc, from.clone());
                }
            }
        }
        read += 1;
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::shard::MemoryBudget;
    use crate::store::version::Version;
    use proptest::prelude::*;

    const NOW: u64 = 1_800_000_000_000_000;

    fn shards(n: usize) -> Vec<Shard> {
        let budget = MemoryBudget::unlimited();
        (0..n)
            .map(|i| Shard::new(i, shard_bits(n), budget.clone(), 1 << 10).with_identity(1, 3600))
            .collect()
    }

    /// One change to a node of `n` shards, each with its log on.
    #[derive(Debug, Clone)]
    enum Op {
        Set(u8, u8),
        Del(u8),
        Remote(u8, Option<u8>, u64, u32),
        Flush,
        Forget(u64),
        Snapshot,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<u8>(), any::<u8>()).prop_map(|(k, v)| Op::Set(k % 40, v)),
            2 => any::<u8>().prop_map(|k| Op::Del(k % 40)),
            3 => (any::<u8>(), any::<Option<u8>>(), 0..2_000u64, 2..4u32)
                .prop_map(|(k, v, t, o)| Op::Remote(k % 40, v, t, o)),
            1 => Just(Op::Flush),
            1 => (0..2_000u64).prop_map(Op::Forget),
            1 => Just(Op::Snapshot),
        ]
    }

    fn key(k: u8) -> Vec<u8> {
        format!("key{k}").into_bytes()
    }

    proptest! {
        // Each case builds three nodes of 2^16 buckets: fewer cases than the default.
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The recovery rule, on its model: the state after any history equals the
        /// newest snapshot (taken a slice at a time, with writes in between) plus the log
        /// from its start — on the same shard count and re-cut to another.
        #[test]
        fn a_snapshot_taken_while_writing_plus_the_log_after_it_recovers_the_exact_state(
            ops in proptest::collection::vec(op(), 1..80),
            n in prop_oneof![Just(1usize), Just(2), Just(4)],
            other in prop_oneof![Just(1usize), Just(2), Just(8)],
        ) {
            let mut live: Vec<Shard> = shards(n).into_iter().map(Shard::with_wal).collect();
            // Per shard: the log since its snapshot began, and the snapshot's entries.
            let mut log: Vec<Vec<u8>> = vec![Vec::new(); n];
            let mut snap: Vec<Option<(Version, Vec<u8>)>> = vec![None; n];
            let mut taking: Option<(usize, usize, Version, Vec<u8>)> = None;
            let mut seq = 0u64;
            for op in ops {
                seq += 1;
                match op {
                    Op::Set(k, v) => {
                        let key = key(k);
                        let h = KeyHash::of(&key);
                        live[shard_of_bucket(h.bucket(), shard_bits(n))].set(h, &key, &[v]).unwrap();
                    }
                    Op::Del(k) => {
                        let key = key(k);
                        let h = KeyHash::of(&key);
                        live[shard_of_bucket(h.bucket(), shard_bits(n))].del(h, &key).unwrap();
                    }
                    Op::Remote(k, v, t, origin) => {
                        let key = key(k);
                        let h = KeyHash::of(&key);
                        let value = v.map(|v| vec![v]);
                        let version = Version { hlc: NOW - 10_000 + t, origin };
                        live[shard_of_bucket(h.bucket(), shard_bits(n))].apply(h, &key, value.as_deref(), version, NOW);
                    }
                    Op::Flush => {
                        let hlc = live.iter_mut().map(Shard::tick_clock).max().unwrap();
                        for s in &mut live {
                            s.flush(hlc, false);
                        }
                    }
                    Op::Forget(t) => {
                        for s in &mut live {
                            s.forget_older_than(NOW - 10_000 + t);
                        }
                    }
                    Op::Snapshot if taking.is_none() => {
                        // Begin one shard's snapshot: the log starts over from here.
                        let i = (seq as usize) % n;
                        if let Some(w) = live[i].take_wal() {
                            log[i].extend_from_slice(&w);
                        }
                        taking = Some((i, 0, live[i].flushed(), Vec::new()));
                        log[i].clear();
                    }
                    Op::Snapshot => {}
                }
                for (i, s) in live.iter_mut().enumerate() {
                    if let Some(w) = s.take_wal() {
                        log[i].extend_from_slice(&w);
                    }
                }
                // One slice of the snapshot in progress per step, writes in between.
                if let Some((i, from, marker, mut entries)) = taking.take() {
                    match live[i].snapshot_entries(from, 64, &mut entries) {
                        (Some(next), _) => taking = Some((i, next, marker, entries)),
                        (None, _) => snap[i] = Some((marker, entries)),
                    }
                }
            }
            // A snapshot still in progress at the end completes (no writes after it).
            if let Some((i, mut from, marker, mut entries)) = taking {
                while let (Some(next), _) = live[i].snapshot_entries(from, 64, &mut entries) {
                    from = next;
                }
                snap[i] = Some((marker, entries));
            }
            let recover = |into: &mut [Shard], i: usize| {
                let from = crate::store::keyspace::shard_buckets(i, shard_bits(n));
                if let Some((marker, entries)) = &snap[i] {
                    for s in into.iter_mut() {
                        s.restore_flush(*marker);
                    }
                    restore_entries(into, from.clone(), entries).unwrap();
                }
                restore_entries(into, from, &log[i]).unwrap();
            };
            let roots_of = |s: &mut [Shard]| s.iter_mut().map(Shard::root).collect::<Vec<_>>();
            let want = crate::store::merkle::combine_roots(&roots_of(&mut live));
            // Same shard count, each shard from its own files.
            let mut same = shards(n);
            for (i, s) in same.iter_mut().enumerate() {
                recover(std::slice::from_mut(s), i);
            }
            prop_assert_eq!(crate::store::merkle::combine_roots(&roots_of(&mut same)), want);
            // Another shard count: every file into all the shards.
            let mut recut = shards(other);
            for i in 0..n {
                recover(&mut recut, i);
            }
            prop_assert_eq!(crate::store::merkle::combine_roots(&roots_of(&mut recut)), want);
        }
    }

    #[test]
    fn an_entry_of_another_shard_or_a_torn_entry_is_an_error() {
        let mut two = shards(2);
        let mut out = Vec::new();
        let key = (0..100)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| shard_of_bucket(KeyHash::of(k).bucket(), 1) == 1)
            .unwrap();
        crate::store::journal::encode_entry(
            &mut out,
            Version { hlc: 5, origin: 1 },
            &key,
            Some(b"v"),
        );
        let e = restore_entries(&mut two[..1], 0..1 << 15, &out).unwrap_err();
        assert!(e.contains("another shard"), "{e}");
        assert_eq!(restore_entries(&mut two, 0..1 << 16, &out), Ok(1));
        let e = restore_entries(&mut two, 0..1 << 16, &out[..out.len() - 1]).unwrap_err();
        assert!(e.contains("entry at byte 0"), "{e}");
    }

    #[test]
    fn a_value_over_the_limit_is_an_error_not_dropped() {
        // Written when the node allowed 2 KiB; read back by one that allows 1 KiB.
        let mut one = shards(1);
        let mut out = Vec::new();
        let v = Version { hlc: 5, origin: 1 };
        crate::store::journal::encode_entry(&mut out, v, b"big", Some(&[7; 2048]));
        let e = restore_entries(&mut one, 0..1 << 16, &out).unwrap_err();
        assert!(
            e.contains("a value of 2048 bytes") && e.contains("max_line_bytes"),
            "{e}"
        );
    }
}
