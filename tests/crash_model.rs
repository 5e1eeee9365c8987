//! Crash points against a model (docs/PERSISTENCE.md): random writes, deletes, flushes
//! and snapshots taken a slice at a time on a shard whose log goes through the real disk
//! writer to real files; at the end of each round the process "crashes" — what the shard
//! did not hand over is lost, and the newest log segment is torn at a random byte at or
//! after the last batch reported durable. The real recovery must then give exactly the
//! model's state after the last whole record (so every durable batch is in it), with the
//! model's Merkle root; and the writer goes on from there for the next round.

use merkle_kv::config::Fsync;
use merkle_kv::persist::apply::restore_entries;
use merkle_kv::persist::files::{segment_name, shard_dir};
use merkle_kv::persist::recover::{recover, Loaded};
use merkle_kv::persist::writer::{self, ShardStart, ToDisk};
use merkle_kv::store::keyspace::KeyHash;
use merkle_kv::store::shard::{MemoryBudget, Shard};
use merkle_kv::store::version::Version;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Key → value, or `None` for a tombstone: what a shard holds, versions aside (the
/// Merkle digest does not cover them).
type Model = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

#[derive(Debug, Clone)]
enum Op {
    Set(u8, u8),
    Del(u8),
    Flush,
    /// Hand what the shard recorded to the writer (the end of a batch of work).
    Ship,
    /// As `Ship`, and wait until the writer reports it durable.
    ShipDurable,
    /// Begin a snapshot (none if one is in progress). It goes on a slice at a time
    /// after each later hand-over: as on a node, where a shard hands over what each unit
    /// of work changed before it takes the next slice, a slice holds only changes
    /// handed over.
    Snapshot,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..20u8, any::<u8>()).prop_map(|(k, v)| Op::Set(k, v)),
        2 => (0..20u8).prop_map(Op::Del),
        1 => Just(Op::Flush),
        4 => Just(Op::Ship),
        1 => Just(Op::ShipDurable),
        1 => Just(Op::Snapshot),
    ]
}

fn key(k: u8) -> Vec<u8> {
    format!("key{k}").into_bytes()
}

fn new_shard() -> Shard {
    Shard::new(0, 0, MemoryBudget::unlimited(), 1 << 10).with_identity(1, 3600)
}

/// Recover the shard in `dir` as the node does (node/disk.rs `recover_shard`).
fn recover_dir(dir: &Path) -> (Shard, ShardStart) {
    let mut one = [new_shard()];
    let buckets = 0..1 << 16;
    let rec = recover(dir, |loaded| match loaded {
        Loaded::Snapshot(s) => {
            let (hlc, origin) = s.header.flushed;
            one[0].restore_flush(Version { hlc, origin });
            for c in 0..s.chunks.len() {
                restore_entries(&mut one, buckets.clone(), s.chunk(c))?;
            }
            Ok(())
        }
        Loaded::Entries(e) => restore_entries(&mut one, buckets.clone(), e).map(|_| ()),
    })
    .unwrap();
    let [shard] = one;
    (shard, rec.start.unwrap())
}

/// The root of a shard holding exactly `model`.
fn model_root(model: &Model) -> [u8; 32] {
    let mut s = new_shard();
    for (k, v) in model {
        s.restore(
            KeyHash::of(k),
            k,
            v.as_deref(),
            Version { hlc: 1, origin: 1 },
        );
    }
    s.root()
}

/// One round: run `ops` on `shard` (holding `model`) with the writer going on at
/// `start`, crash, tear the newest segment at `tear` (a fraction of what may go), and
/// return the model the recovered shard must equal.
fn round(
    dir: &Path,
    shard: &mut Shard,
    model: Model,
    start: ShardStart,
    ops: &[Op],
    tear: u64,
) -> Model {
    const SLICE_BYTES: usize = 32;
    let seg_path = |n: u64| shard_dir(dir, 0).join(segment_name(n));
    let (tx, mut durable, handle) = writer::start(dir, &[start], Fsync::No).unwrap();
    let mut model = model;
    // Per batch handed over (index = batch number; 0: the round's start): the model
    // after it, its segment and where its record ends there.
    let begin_len = std::fs::metadata(seg_path(start.segment)).map_or(0, |m| m.len());
    let mut batches = vec![(model.clone(), start.segment, begin_len)];
    let mut segment = (start.segment, begin_len);
    // The snapshot in progress (next bucket), and the last batch before the end of
    // the one completed last.
    let mut taking: Option<usize> = None;
    let mut covered = 0;
    let ship = |shard: &mut Shard,
                batches: &mut Vec<(Model, u64, u64)>,
                segment: &mut (u64, u64),
                model: &Model| {
        if let Some(entries) = shard.take_wal() {
            segment.1 += 8 + 1 + entries.len() as u64;
            batches.push((model.clone(), segment.0, segment.1));
            let batch = batches.len() as u64 - 1;
            tx.send(ToDisk::Batch {
                shard: 0,
                batch,
                entries,
            })
            .unwrap();
        }
    };
    for op in ops {
        let shipped = match op {
            Op::Set(k, v) => {
                let key = key(*k);
                shard.set(KeyHash::of(&key), &key, &[*v]).unwrap();
                model.insert(key, Some(vec![*v]));
                false
            }
            Op::Del(k) => {
                let key = key(*k);
                shard.del(KeyHash::of(&key), &key).unwrap();
                model.insert(key, None);
                false
            }
            Op::Flush => {
                let hlc = shard.tick_clock();
                shard.flush(hlc, false);
                model.clear();
                false
            }
            Op::Ship => {
                ship(shard, &mut batches, &mut segment, &model);
                true
            }
            Op::ShipDurable => {
                ship(shard, &mut batches, &mut segment, &model);
                let want = batches.len() as u64 - 1;
                let deadline = Instant::now() + Duration::from_secs(10);
                while *durable.shards[0].borrow_and_update() < want {
                    assert!(
                        Instant::now() < deadline,
                        "batch {want} never became durable"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
                true
            }
            Op::Snapshot if taking.is_none() => {
                // As node/disk.rs does: hand over what is recorded, then cut the log.
                ship(shard, &mut batches, &mut segment, &model);
                let f = shard.flushed();
                tx.send(ToDisk::SnapshotBegin {
                    shard: 0,
                    shards: 1,
                    flushed: (f.hlc, f.origin),
                })
                .unwrap();
                segment = (segment.0 + 1, 0);
                taking = Some(0);
                true
            }
            Op::Snapshot => false,
        };
        if let Some(from) = taking.filter(|_| shipped) {
            let mut entries = Vec::new();
            let (next, count) = shard.snapshot_entries(from, SLICE_BYTES, &mut entries);
            tx.send(ToDisk::SnapshotEntries {
                shard: 0,
                entries,
                count,
            })
            .unwrap();
            taking = next;
            if next.is_none() {
                tx.send(ToDisk::SnapshotEnd {
                    shard: 0,
                    root: shard.root(),
                })
                .unwrap();
                covered = batches.len() - 1;
            }
        }
    }
    // The crash: nothing more is handed over (what the shard holds unshipped is lost);
    // the writer has written what it was given (the OS keeps it), and the newest
    // segment is torn anywhere after what was reported durable — or, when a snapshot
    // completed, after the batches it covers (the writer puts those on disk first).
    let reported = *durable.shards[0].borrow_and_update() as usize;
    drop(tx);
    handle.join().unwrap();
    let len = std::fs::metadata(seg_path(segment.0)).map_or(0, |m| m.len());
    assert_eq!(
        len, segment.1,
        "the newest segment holds every batch handed over"
    );
    let floor = batches
        .iter()
        .enumerate()
        .filter(|(b, (_, s, _))| *s == segment.0 && (*b <= reported || *b <= covered))
        .map(|(_, (_, _, end))| *end)
        .max()
        .unwrap_or(0);
    let cut = floor + tear % (len - floor + 1);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(seg_path(segment.0))
        .unwrap();
    f.set_len(cut).unwrap();
    // The last batch whose record is whole after the cut.
    let last = batches
        .iter()
        .rposition(|(_, s, end)| *s < segment.0 || (*s == segment.0 && *end <= cut))
        .unwrap_or(0);
    batches.swap_remove(last).0
}

/// A case's directory, removed however the case ends (proptest runs failing cases
/// again while it shrinks them).
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn check(shard: &mut Shard, model: &Model) -> Result<(), TestCaseError> {
    for k in 0..20 {
        let key = key(k);
        let h = KeyHash::of(&key);
        let held = shard
            .version_of(h, &key)
            .map(|_| shard.get(h, &key).map(<[u8]>::to_vec));
        prop_assert_eq!(held.as_ref(), model.get(&key), "key{}", k);
    }
    prop_assert_eq!(shard.root(), model_root(model));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn recovery_after_a_crash_gives_the_state_after_the_last_whole_record(
        rounds in proptest::collection::vec(
            (proptest::collection::vec(op(), 1..60), any::<u64>()),
            1..=3,
        ),
    ) {
        static CASE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = Scratch(std::env::temp_dir().join(format!("merkle-kv-crash-{}-{n}", std::process::id())));
        let dir = &dir.0;
        let mut shard = new_shard().with_wal();
        let mut model = Model::new();
        let mut start = ShardStart { segment: 1, snapshot: None };
        for (ops, tear) in &rounds {
            model = round(dir, &mut shard, model, start, ops, *tear);
            let (recovered, next) = recover_dir(&shard_dir(dir, 0));
            shard = recovered.with_wal();
            start = next;
            check(&mut shard, &model)?;
        }
    }
}
