//! Re-cutting a data directory written with one shard count to another: every old
//! shard's directory is recovered, as at any start, into the new set of shards (each key
//! goes to the shard that owns its bucket now), and the new layout replaces the old one.
//!
//! Crash safety. The new layout is built whole in `<data_dir>/.recut-<n>.tmp/` — per
//! shard a snapshot (header with the new count) and an empty first segment, a `NODE`
//! file with the new count, an empty `old/` — synced, and renamed `.recut-<n>/`: that
//! rename decides the re-cut. Then, one rename at a time, each synced:
//!
//! 1. every old `shard-<i>/` moves to `.recut-<n>/old/`;
//! 2. `.recut-<n>/NODE` replaces `NODE` (from here the directory holds `n` shards);
//! 3. every new `.recut-<n>/shard-<j>/` moves up to `shard-<j>/`;
//! 4. `.recut-<n>/` (the old data now) is renamed `.recut-<n>.done/` and removed.
//!
//! [`resume`] runs at every start, before anything reads the directory, and reads which
//! step comes next from what is on disk: a `.recut-<n>.tmp/` (the build was cut short;
//! the old layout is untouched) or `.recut-<n>.done/` is removed, a `.recut-<n>/` is
//! finished. Finishing is always right: the new layout holds the old one's whole state,
//! and the old one has not changed since (nothing runs on it before `resume`). The old
//! data is removed only after the new layout is in place and durable.

use crate::persist::files::{
    self, io_at, segment_name, shard_dir, sync_dir, write_node_file, Identity, PersistError,
    NODE_FILE,
};
use crate::persist::recover::{recover_into, RecoveryError};
use crate::persist::snapshot::{Header, SnapshotWriter};
use crate::store::keyspace::{shard_bits, shard_buckets};
use crate::store::shard::Shard;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The segment a re-cut shard's log starts at; its snapshot says to replay from it.
const FIRST_SEGMENT: u64 = 1;
/// Entry bytes per snapshot record.
const SLICE_BYTES: usize = 1 << 20;
/// The directory of a re-cut to `n` shards: `.recut-<n>` complete, with a suffix while
/// built or once done.
const PREFIX: &str = ".recut-";
const BUILDING: &str = ".tmp";
const DONE: &str = ".done";
/// Where the old shard directories go inside the re-cut's directory.
const OLD: &str = "old";

/// Why a re-cut could not be made or finished.
#[derive(Debug, thiserror::Error)]
pub enum RecutError {
    #[error(transparent)]
    Io(#[from] PersistError),
    #[error(transparent)]
    Recover(#[from] RecoveryError),
    #[error(
        "{dir}: {entries} entries do not fit storage.memory_limit_mb in the new shards; \
         the data directory is left as it was"
    )]
    Full { dir: PathBuf, entries: u64 },
    #[error(
        "{dir} holds more than one unfinished re-cut ({found:?}), which no re-cut leaves: \
         move the data directory aside to resynchronise from peers"
    )]
    Ambiguous { dir: PathBuf, found: Vec<String> },
}

/// Re-cut the data directory `dir` of node `node_id` from `old` shards to `new`, each
/// new shard made by `make(i)`. Returns the number of live keys. The caller ran
/// [`resume`] first (no other re-cut is pending).
pub fn recut(
    dir: &Path,
    node_id: &str,
    old: usize,
    new: usize,
    make: impl Fn(usize) -> Shard,
) -> Result<u64, RecutError> {
    let (keys, staging) = build(dir, node_id, old, new, make)?;
    let built = dir.join(format!("{PREFIX}{new}"));
    rename(&staging, &built)?;
    resume(dir)?;
    Ok(keys)
}

/// Finish or roll back a re-cut a crash interrupted (module docs); nothing to do
/// otherwise.
pub fn resume(dir: &Path) -> Result<(), RecutError> {
    while step(dir)? {}
    Ok(())
}

/// Build the new layout in `.recut-<new>.tmp/`, synced; returns the live keys and the
/// directory.
fn build(
    dir: &Path,
    node_id: &str,
    old: usize,
    new: usize,
    make: impl Fn(usize) -> Shard,
) -> Result<(u64, PathBuf), RecutError> {
    let staging = dir.join(format!("{PREFIX}{new}{BUILDING}"));
    if staging.exists() {
        remove(&staging)?;
    }
    let retired = staging.join(OLD);
    std::fs::create_dir_all(&retired).map_err(io_at(&retired))?;
    // Read before recovery touches the old files: when the node last wrote.
    let written = files::last_written(dir, old);
    let mut shards: Vec<Shard> = (0..new).map(make).collect();
    let old_bits = shard_bits(old);
    for i in 0..old {
        recover_into(&shard_dir(dir, i), &mut shards, shard_buckets(i, old_bits))?;
    }
    // An entry refused for want of memory would be gone from the new layout for good.
    let refused: u64 = shards.iter().map(|s| s.stats.storage_full).sum();
    if refused > 0 {
        return Err(RecutError::Full {
            dir: dir.to_path_buf(),
            entries: refused,
        });
    }
    let mut keys = 0;
    for (i, shard) in shards.iter_mut().enumerate() {
        keys += shard.snapshot_stats().keys;
        write_shard(&shard_dir(&staging, i), i, new, shard, written)?;
    }
    let id = Identity {
        node_id: node_id.to_string(),
        shards: new,
    };
    // Syncs `staging` too: its shard directories, `old/` and `NODE` are all there.
    write_node_file(&staging, &id)?;
    Ok((keys, staging))
}

/// Write shard `index` of `shards` as a snapshot and an empty first segment in `dir`,
/// dated `written` (so the time the node went down survives the re-cut).
fn write_shard(
    dir: &Path,
    index: usize,
    shards: usize,
    shard: &mut Shard,
    written: Option<SystemTime>,
) -> Result<(), PersistError> {
    std::fs::create_dir_all(dir).map_err(io_at(dir))?;
    let f = shard.flushed();
    let header = Header {
        shard: index as u32,
        shards: shards as u32,
        seq: FIRST_SEGMENT,
        flushed: (f.hlc, f.origin),
    };
    let mut w = SnapshotWriter::create(dir, header)?;
    let mut from = Some(0);
    while let Some(bucket) = from {
        let mut entries = Vec::with_capacity(SLICE_BYTES + (1 << 16));
        let (next, count) = shard.snapshot_entries(bucket, SLICE_BYTES, &mut entries);
        if count > 0 {
            w.entries(&entries, count)?;
        }
        from = next;
    }
    let snapshot = w.finish(shard.root())?;
    let segment = dir.join(segment_name(FIRST_SEGMENT));
    std::fs::File::create(&segment).map_err(io_at(&segment))?;
    for path in [&snapshot, &segment] {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_at(path))?;
        if let Some(t) = written {
            file.set_modified(t).map_err(io_at(path))?;
        }
        file.sync_all().map_err(io_at(path))?;
    }
    sync_dir(dir)
}

/// What comes next in finishing or rolling back a re-cut.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Rename(PathBuf, PathBuf),
    Remove(PathBuf),
}

/// Take the next step, if any; returns whether one was taken.
fn step(dir: &Path) -> Result<bool, RecutError> {
    match next_step(dir)? {
        Some(Step::Rename(from, to)) => rename(&from, &to)?,
        Some(Step::Remove(path)) => remove(&path)?,
        None => return Ok(false),
    }
    Ok(true)
}

/// Read the next step from what is on disk (module docs).
fn next_step(dir: &Path) -> Result<Option<Step>, RecutError> {
    let top = names(dir)?;
    let recuts: Vec<&String> = top.iter().filter(|n| n.starts_with(PREFIX)).collect();
    if let Some(gone) = recuts
        .iter()
        .find(|n| n.ends_with(BUILDING) || n.ends_with(DONE))
    {
        return Ok(Some(Step::Remove(dir.join(gone))));
    }
    let staged = match recuts.as_slice() {
        [] => return Ok(None),
        [one] => dir.join(one),
        _ => {
            return Err(RecutError::Ambiguous {
                dir: dir.to_path_buf(),
                found: recuts.into_iter().cloned().collect(),
            })
        }
    };
    let first_shard = |names: &[String]| names.iter().find(|n| is_shard_dir(n)).cloned();
    if staged.join(NODE_FILE).exists() {
        // Before the switch: the old shard directories go first, then `NODE`.
        let step = match first_shard(&top) {
            Some(old) => Step::Rename(dir.join(&old), staged.join(OLD).join(old)),
            None => Step::Rename(staged.join(NODE_FILE), dir.join(NODE_FILE)),
        };
        return Ok(Some(step));
    }
    let step = match first_shard(&names(&staged)?) {
        Some(new) => Step::Rename(staged.join(&new), dir.join(new)),
        None => {
            let name = staged.file_name().expect("a re-cut directory has a name");
            let done = format!("{}{DONE}", name.to_string_lossy());
            Step::Rename(staged.clone(), dir.join(done))
        }
    };
    Ok(Some(step))
}

/// The names in `dir` (an absent one is empty), sorted.
fn names(dir: &Path) -> Result<Vec<String>, PersistError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_at(dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_at(dir))?;
        if let Ok(name) = entry.file_name().into_string() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

fn is_shard_dir(name: &str) -> bool {
    name.strip_prefix("shard-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Rename, then make the rename durable in both directories before anything else.
fn rename(from: &Path, to: &Path) -> Result<(), PersistError> {
    std::fs::rename(from, to).map_err(io_at(from))?;
    let parent = |p: &Path| p.parent().expect("inside the data directory").to_path_buf();
    let (a, b) = (parent(from), parent(to));
    sync_dir(&b)?;
    if a != b {
        sync_dir(&a)?;
    }
    Ok(())
}

fn remove(path: &Path) -> Result<(), PersistError> {
    std::fs::remove_dir_all(path).map_err(io_at(path))?;
    sync_dir(path.parent().expect("inside the data directory"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::files::{list, snapshot_name};
    use crate::persist::record::{self, RECORD_ENTRIES};
    use crate::store::journal::{decode_entry, Entry};
    use crate::store::keyspace::{shard_of_bucket, KeyHash};
    use crate::store::merkle::{combine_roots, Digest};
    use crate::store::shard::MemoryBudget;
    use crate::store::version::Version;
    use std::collections::BTreeMap;

    const NODE_ID: &str = "n1";

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mkv-recut-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn maker(n: usize) -> impl Fn(usize) -> Shard {
        let budget = MemoryBudget::unlimited();
        move |i| Shard::new(i, shard_bits(n), budget.clone(), 1 << 10).with_identity(1, 3600)
    }

    /// Every entry a node holds (tombstones too): key → (value, version).
    type Entries = BTreeMap<Vec<u8>, (Option<Vec<u8>>, Version)>;

    /// What a node's state is: its root, its entries, its flush marker.
    #[derive(Debug, PartialEq)]
    struct State {
        root: Digest,
        entries: Entries,
        flushed: Vec<Version>,
    }

    fn state(shards: &mut [Shard]) -> State {
        let mut entries = Entries::new();
        for s in shards.iter() {
            let mut bytes = Vec::new();
            s.snapshot_entries(0, usize::MAX, &mut bytes);
            let mut r = crate::wire::Reader::new(&bytes);
            while !r.done() {
                if let Entry::Change {
                    version,
                    key,
                    value,
                } = decode_entry(&mut r).unwrap()
                {
                    entries.insert(key.to_vec(), (value.map(<[u8]>::to_vec), version));
                }
            }
        }
        let roots: Vec<Digest> = shards.iter_mut().map(Shard::root).collect();
        State {
            root: combine_roots(&roots),
            entries,
            flushed: shards.iter().map(Shard::flushed).collect(),
        }
    }

    fn append_segment(dir: &Path, n: u64, entries: &[u8]) {
        let mut body = vec![RECORD_ENTRIES];
        body.extend_from_slice(entries);
        let mut out = Vec::new();
        record::append(&mut out, &body);
        let path = dir.join(segment_name(n));
        let mut old = std::fs::read(&path).unwrap_or_default();
        old.extend_from_slice(&out);
        std::fs::write(path, old).unwrap();
    }

    /// Write the data directory of a node of `n` shards the way a running node leaves
    /// it: keys set before a flush (gone after it), keys set and deleted after it; shard
    /// 0 snapshotted after the flush (its marker only in the snapshot header from then
    /// on), its log going on in segment 2, the others' logs in segment 1. Returns the
    /// state the node ended in.
    fn write_old(dir: &Path, n: usize) -> State {
        let mut live: Vec<Shard> = (0..n).map(maker(n)).map(Shard::with_wal).collect();
        let bits = shard_bits(n);
        let route = |k: &[u8]| shard_of_bucket(KeyHash::of(k).bucket(), bits);
        let set = |live: &mut [Shard], k: String| {
            let i = route(k.as_bytes());
            live[i]
                .set(KeyHash::of(k.as_bytes()), k.as_bytes(), b"v")
                .unwrap();
        };
        for i in 0..100 {
            set(&mut live, format!("before{i}"));
        }
        let hlc = live.iter_mut().map(Shard::tick_clock).max().unwrap();
        for s in &mut live {
            s.flush(hlc, false);
        }
        for i in 0..100 {
            set(&mut live, format!("after{i}"));
        }
        let log = |live: &mut [Shard], i: usize, seg: u64| {
            if let Some(w) = live[i].take_wal() {
                append_segment(&shard_dir(dir, i), seg, &w);
            }
        };
        for i in 0..n {
            std::fs::create_dir_all(shard_dir(dir, i)).unwrap();
            log(&mut live, i, 1);
        }
        let f = live[0].flushed();
        let header = Header {
            shard: 0,
            shards: n as u32,
            seq: 2,
            flushed: (f.hlc, f.origin),
        };
        let mut w = SnapshotWriter::create(&shard_dir(dir, 0), header).unwrap();
        let mut entries = Vec::new();
        let (_, count) = live[0].snapshot_entries(0, usize::MAX, &mut entries);
        w.entries(&entries, count).unwrap();
        w.finish(live[0].root()).unwrap();
        for i in (0..100).step_by(3) {
            let k = format!("after{i}");
            live[route(k.as_bytes())]
                .del(KeyHash::of(k.as_bytes()), k.as_bytes())
                .unwrap();
        }
        for i in 100..150 {
            set(&mut live, format!("after{i}"));
        }
        for i in 0..n {
            log(&mut live, i, if i == 0 { 2 } else { 1 });
        }
        write_node_file(
            dir,
            &Identity {
                node_id: NODE_ID.into(),
                shards: n,
            },
        )
        .unwrap();
        let s = state(&mut live);
        // 116 live, 34 deleted, none from before the flush.
        let tombstones = s.entries.values().filter(|(v, _)| v.is_none()).count();
        assert_eq!((s.entries.len(), tombstones), (150, 34));
        s
    }

    /// Recover the directory as a start with `n` shards does, after checking `NODE`
    /// says `n` and only the layout's shard directories are there.
    fn recovered(dir: &Path, n: usize) -> State {
        let me = Identity {
            node_id: NODE_ID.into(),
            shards: n,
        };
        assert_eq!(files::open(dir, &me).unwrap(), me);
        let mut want: Vec<String> = (0..n).map(|i| format!("shard-{i}")).collect();
        want.push("NODE".into());
        want.sort();
        assert_eq!(
            names(dir).unwrap(),
            want,
            "the layout of {n} shards, nothing else"
        );
        let mut shards: Vec<Shard> = (0..n).map(maker(n)).collect();
        for (i, s) in shards.iter_mut().enumerate() {
            let from = shard_buckets(i, shard_bits(n));
            recover_into(&shard_dir(dir, i), std::slice::from_mut(s), from).unwrap();
        }
        state(&mut shards)
    }

    #[test]
    fn a_recut_keeps_every_key_tombstone_and_the_flush_marker_and_the_root() {
        for (old, new) in [(1, 2), (2, 1), (2, 4), (4, 2)] {
            let dir = temp(&format!("{old}-{new}"));
            let before = write_old(&dir, old);
            let written = files::last_written(&dir, old).unwrap();
            let keys = recut(&dir, NODE_ID, old, new, maker(new)).unwrap();
            let live = before.entries.values().filter(|(v, _)| v.is_some()).count();
            assert_eq!(keys, live as u64, "{old} → {new}");
            let after = recovered(&dir, new);
            assert_eq!(after.root, before.root, "{old} → {new}");
            assert_eq!(after.entries, before.entries, "{old} → {new}");
            assert_eq!(after.flushed, vec![before.flushed[0]; new], "{old} → {new}");
            // Each new shard: a snapshot to replay segment 1 from, an empty segment 1,
            // dated when the old files were last written.
            for i in 0..new {
                let l = list(&shard_dir(&dir, i)).unwrap();
                assert_eq!(l.snapshots.len(), 1);
                assert_eq!(l.snapshots[0].1.file_name().unwrap(), &*snapshot_name(1));
                assert_eq!(l.segments.len(), 1);
                assert_eq!(std::fs::metadata(&l.segments[0].1).unwrap().len(), 0);
            }
            assert_eq!(files::last_written(&dir, new), Some(written));
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn a_crash_at_any_step_of_the_swap_is_finished_at_the_next_start() {
        for (old, new) in [(2, 4), (4, 1)] {
            // Retire each old shard, switch NODE, install each new shard, set the old
            // data aside, remove it.
            let steps = old + 1 + new + 2;
            for crash_after in 0..=steps {
                let dir = temp(&format!("crash-{old}-{new}-{crash_after}"));
                let before = write_old(&dir, old);
                let (_, staging) = build(&dir, NODE_ID, old, new, maker(new)).unwrap();
                rename(&staging, &dir.join(format!("{PREFIX}{new}"))).unwrap();
                for _ in 0..crash_after {
                    assert!(
                        step(&dir).unwrap(),
                        "{old} → {new}: fewer steps than {steps}"
                    );
                }
                if crash_after == steps {
                    assert!(
                        !step(&dir).unwrap(),
                        "{old} → {new}: more than {steps} steps"
                    );
                }
                // The next start.
                resume(&dir).unwrap();
                assert_eq!(
                    recovered(&dir, new),
                    {
                        let mut b = before;
                        b.flushed = vec![b.flushed[0]; new];
                        b
                    },
                    "{old} → {new}, crashed after step {crash_after}"
                );
                std::fs::remove_dir_all(&dir).unwrap();
            }
        }
    }

    #[test]
    fn a_crash_while_building_leaves_the_old_layout_whole_and_the_next_start_recuts() {
        let dir = temp("building");
        let before = write_old(&dir, 2);
        let (_, staging) = build(&dir, NODE_ID, 2, 4, maker(4)).unwrap();
        // Cut short: a shard of the new layout and the new NODE never made it.
        std::fs::remove_dir_all(shard_dir(&staging, 3)).unwrap();
        std::fs::remove_file(staging.join(NODE_FILE)).unwrap();
        resume(&dir).unwrap();
        assert_eq!(recovered(&dir, 2), before);
        recut(&dir, NODE_ID, 2, 4, maker(4)).unwrap();
        assert_eq!(recovered(&dir, 4).root, before.root);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn data_that_does_not_fit_the_memory_limit_is_not_recut() {
        let dir = temp("full");
        let before = write_old(&dir, 2);
        let budget = MemoryBudget::new(1000);
        let small = |i| Shard::new(i, 0, budget.clone(), 1 << 10);
        let e = recut(&dir, NODE_ID, 2, 1, small).unwrap_err().to_string();
        assert!(e.contains("do not fit storage.memory_limit_mb"), "{e}");
        resume(&dir).unwrap();
        assert_eq!(recovered(&dir, 2), before);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn two_unfinished_recuts_are_refused() {
        let dir = temp("two");
        std::fs::create_dir_all(dir.join(".recut-2")).unwrap();
        std::fs::create_dir_all(dir.join(".recut-4")).unwrap();
        let e = resume(&dir).unwrap_err().to_string();
        assert!(e.contains("more than one unfinished re-cut"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
