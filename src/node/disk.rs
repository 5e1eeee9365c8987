//! The node's persistence (`[storage] persistence_enabled`, docs/PERSISTENCE.md): a data
//! directory written with another shard count re-cut at start, then every shard recovered
//! from its directory, in parallel; the disk writer; what a shard thread hands it after
//! each batch of work; and the record of a rejoin owed (`REJOIN`), kept until it is done.

use crate::config::{Config, Fsync};
use crate::persist::backup::FrozenFile;
use crate::persist::files::{self, Identity};
use crate::persist::recover::{recover_into, Recovered};
use crate::persist::recut;
use crate::persist::writer::{self, Durable, ToDisk};
use crate::store::keyspace::shard_buckets;
use crate::store::shard::Shard;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

/// The disk side of a running node.
pub struct Disk {
    tx: mpsc::SyncSender<ToDisk>,
    pub durable: Durable,
    pub fsync: Fsync,
    /// Per shard, the number of the last batch handed over (written by its thread only).
    handed: Vec<AtomicU64>,
    /// Per shard, log bytes handed over since its last snapshot began.
    logged: Vec<AtomicU64>,
    /// A shard's log this long since its last snapshot starts the next.
    snapshot_after: u64,
    /// Per shard, whether a snapshot is being taken (one at a time).
    snapshotting: Vec<AtomicBool>,
    /// Per shard, wakes its thread's [`Disk::ship_each_pass`] task; `kicked` says it is
    /// already awake, so a burst of writes costs one wake-up.
    kick: Vec<tokio::sync::Notify>,
    kicked: Vec<AtomicBool>,
    /// Whether a backup is being taken (one at a time: node/backup.rs).
    pub backing_up: AtomicBool,
    /// When the node was last seen up before this start (µs since the epoch: its files'
    /// and `ALIVE`'s times): when it went down. `None` for a new directory.
    pub down_since_us: Option<u64>,
    /// The cut of the rejoin this node owes (its `REJOIN` marker), if any: entries
    /// older are dropped before it exchanges with a peer (node/bootstrap.rs).
    rejoin_cut_us: Mutex<Option<u64>>,
    dir: std::path::PathBuf,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A shard's log bytes shipped at once rather than at the end of the thread's pass, so a
/// long pass never holds much in memory.
const SHIP_NOW_BYTES: usize = 64 << 10;

impl Disk {
    /// Shard `index` recorded changes (or not): have them shipped at the end of the
    /// thread's current pass, with whatever the pass's other tasks record. Returns the
    /// number of the batch that will carry them, to wait on under `fsync = always`.
    ///
    /// Why not ship now: one message (and one writer wake-up) per connection's segment
    /// measured about a fifth slower under `everysec` at pipeline 16 (BENCHMARKS.md,
    /// "Persistence").
    pub fn queue(&self, index: usize, shard: &mut Shard) -> Option<u64> {
        let pending = shard.wal_len();
        if pending == 0 {
            return None;
        }
        if pending >= SHIP_NOW_BYTES {
            return self.ship(index, shard);
        }
        if !self.kicked[index].swap(true, Relaxed) {
            self.kick[index].notify_one();
        }
        Some(self.handed[index].load(Relaxed) + 1)
    }

    /// The task on shard `index`'s thread that ships what [`Disk::queue`] left: woken by
    /// the first change of a pass, it yields until the runtime has run every task that
    /// was ready (tokio defers a yielded task until after the next I/O poll), then ships.
    pub async fn ship_each_pass(&self, index: usize, shard: &std::cell::RefCell<Shard>) {
        loop {
            self.kick[index].notified().await;
            tokio::task::yield_now().await;
            self.kicked[index].store(false, Relaxed);
            self.ship(index, &mut shard.borrow_mut());
        }
    }

    /// Hand what shard `index` recorded since the last call to the writer. Returns the
    /// batch's number, to wait on under `fsync = always`. Blocks while the writer's queue
    /// is full: a disk slower than the writes slows the writes.
    pub fn ship(&self, index: usize, shard: &mut Shard) -> Option<u64> {
        let entries = shard.take_wal()?;
        let batch = self.handed[index].fetch_add(1, Relaxed) + 1;
        self.logged[index].fetch_add(entries.len() as u64, Relaxed);
        // A disk slower than the writes slows the writes, in bytes as in batches.
        while self.over_queue_bound() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.durable.queued_bytes.fetch_add(entries.len(), Relaxed);
        let msg = ToDisk::Batch {
            shard: index,
            batch,
            entries,
        };
        if self.tx.send(msg).is_err() {
            // The writer is gone (it only stops at shutdown): nothing more is durable.
            self.durable.unavailable.store(true, Relaxed);
        }
        Some(batch)
    }

    /// Whether the writer's queue holds more than [`writer::QUEUED_BYTES_MAX`] bytes (and
    /// the writer is there to take them).
    fn over_queue_bound(&self) -> bool {
        self.durable.queued_bytes.load(Relaxed) > writer::QUEUED_BYTES_MAX
            && self
                .writer
                .lock()
                .is_ok_and(|w| w.as_ref().is_some_and(|h| !h.is_finished()))
    }

    /// Whether shard `index` has logged enough since its last snapshot to take another.
    pub fn snapshot_due(&self, index: usize) -> bool {
        self.logged[index].load(Relaxed) >= self.snapshot_after
    }

    /// Snapshot shard `index` a slice at a time, yielding between slices so the shard
    /// keeps serving: the log is cut first (later changes go to the next segment and are
    /// replayed over the snapshot, which the merge makes exact), then its entries follow.
    pub async fn snapshot(&self, index: usize, shards: u32, shard: &std::cell::RefCell<Shard>) {
        /// Entry bytes per slice: a slice holds the shard thread about a millisecond.
        const SLICE_BYTES: usize = 1 << 20;
        if self.snapshotting[index].swap(true, Relaxed) {
            return; // the one in progress will do
        }
        self.take_snapshot(index, shards, shard, SLICE_BYTES).await;
        self.snapshotting[index].store(false, Relaxed);
    }

    async fn take_snapshot(
        &self,
        index: usize,
        shards: u32,
        shard: &std::cell::RefCell<Shard>,
        slice: usize,
    ) {
        self.ship(index, &mut shard.borrow_mut());
        self.logged[index].store(0, Relaxed);
        let f = shard.borrow().flushed();
        let begin = ToDisk::SnapshotBegin {
            shard: index,
            shards,
            flushed: (f.hlc, f.origin),
        };
        if self.tx.send(begin).is_err() {
            return;
        }
        let mut from = 0;
        loop {
            let mut entries = Vec::with_capacity(slice + (1 << 16));
            while self.over_queue_bound() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let (next, count) = shard.borrow().snapshot_entries(from, slice, &mut entries);
            self.durable.queued_bytes.fetch_add(entries.len(), Relaxed);
            let msg = ToDisk::SnapshotEntries {
                shard: index,
                entries,
                count,
            };
            if self.tx.send(msg).is_err() {
                return;
            }
            match next {
                Some(n) => from = n,
                None => break,
            }
            tokio::task::yield_now().await;
        }
        // The slices may hold changes made while the snapshot yielded, not shipped yet:
        // they go to the log first, and the writer writes the log before it completes
        // the snapshot, so no crash can keep them without what came before.
        let mut shard = shard.borrow_mut();
        self.ship(index, &mut shard);
        let root = shard.root();
        let _ = self.tx.send(ToDisk::SnapshotEnd { shard: index, root });
    }

    /// What a backup of this moment copies (persist::writer's `freeze`), once the writer
    /// has written and synced everything handed over before. Blocks until the writer
    /// answers: call it off the shard threads.
    pub fn freeze(&self) -> Result<Vec<FrozenFile>, String> {
        self.ask(ToDisk::Backup)
    }

    /// Send the writer the request `msg` makes of a reply channel, and wait for its answer.
    fn ask<T>(
        &self,
        msg: impl FnOnce(mpsc::Sender<Result<T, crate::persist::files::PersistError>>) -> ToDisk,
    ) -> Result<T, String> {
        let gone = || "the disk writer has stopped".to_string();
        let (reply, answer) = mpsc::channel();
        self.tx.send(msg(reply)).map_err(|_| gone())?;
        answer
            .recv()
            .map_err(|_| gone())?
            .map_err(|e| e.to_string())
    }

    /// Whether the disk is failing: writes are refused until it recovers.
    pub fn unavailable(&self) -> bool {
        self.durable.unavailable.load(Relaxed)
    }

    /// Wait until batch `batch` of shard `index` is durable by the `fsync` policy;
    /// `false` when the disk failed instead.
    pub async fn wait(&self, index: usize, batch: u64) -> bool {
        let mut rx = self.durable.shards[index].clone();
        let unavailable = &self.durable.unavailable;
        loop {
            if *rx.borrow_and_update() >= batch {
                return true;
            }
            if unavailable.load(Relaxed) {
                return false;
            }
            // The writer reports each pass; a failing disk is looked at again each second.
            let second = std::time::Duration::from_secs(1);
            if let Ok(Err(_)) = tokio::time::timeout(second, rx.changed()).await {
                return false; // the writer is gone
            }
        }
    }

    /// The cut of the rejoin this node owes, if any.
    pub fn rejoin_cut(&self) -> Option<u64> {
        *self.rejoin_cut_us.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record, durably, that the node must rejoin dropping its entries older than
    /// `cut_us` — before it does anything a crash could leave it believing otherwise.
    /// Blocks: call it off the shard threads.
    pub fn mark_rejoin(&self, cut_us: u64) -> Result<(), String> {
        files::write_rejoin(&self.dir, cut_us).map_err(|e| e.to_string())?;
        *self.rejoin_cut_us.lock().unwrap_or_else(|e| e.into_inner()) = Some(cut_us);
        Ok(())
    }

    /// The rejoin is over: once everything handed over so far — the forget of the old
    /// entries among it — is synced, remove the marker. Removed before, a crash could
    /// lose the forget under `everysec` and bring the old entries back without a rejoin.
    /// Blocks: call it off the shard threads.
    pub fn rejoined(&self) -> Result<(), String> {
        self.ask(ToDisk::Sync)?;
        files::remove_rejoin(&self.dir).map_err(|e| e.to_string())?;
        *self.rejoin_cut_us.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    /// Write and sync what is queued, and stop the writer (after the shards stopped).
    pub fn stop(&self) {
        let (reply, done) = mpsc::channel();
        if self.tx.send(ToDisk::Stop(reply)).is_ok() {
            match done.recv() {
                Ok(Ok(())) => tracing::info!("changes written and synced to disk"),
                Ok(Err(why)) => tracing::error!("stopping with changes not on disk: {why}"),
                Err(_) => tracing::error!("the disk writer stopped before syncing"),
            }
        }
        if let Some(h) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = h.join();
        }
    }
}

/// Open this node's data directory, recover every shard `make(i)` creates from it (in
/// parallel), and start the writer. The shards come back recording their changes.
///
/// `rejoin_after_us`: a node down longer than this (the tombstone grace, when it has
/// peers to learn from) owes a rejoin; it is recorded (`REJOIN`) before anything else
/// touches the directory, since every later write makes the node look up recently.
pub fn open(
    config: &Config,
    shards: usize,
    rejoin_after_us: Option<u64>,
    make: impl Fn(usize) -> Shard + Sync,
) -> Result<(Vec<Shard>, Disk), String> {
    let dir = config.data_dir();
    let me = Identity {
        node_id: config.node_id.clone(),
        shards,
    };
    // A re-cut a crash interrupted is finished (or rolled back) before anything reads.
    recut::resume(&dir).map_err(|e| e.to_string())?;
    let found = files::open(&dir, &me).map_err(|e| e.to_string())?;
    let down_since_us = files::last_written(&dir, found.shards)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_micros() as u64);
    let marked = files::read_rejoin(&dir).map_err(|e| e.to_string())?;
    let now = crate::store::version::now_us();
    let rejoin_cut_us = rejoin_cut(marked, down_since_us, now, rejoin_after_us);
    if let Some(cut) = rejoin_cut_us.filter(|c| marked != Some(*c)) {
        files::write_rejoin(&dir, cut).map_err(|e| e.to_string())?;
    }
    if found.shards != shards {
        let started = Instant::now();
        let keys =
            recut::recut(&dir, &config.node_id, found.shards, shards, &make).map_err(|e| {
                format!(
                    "re-cutting {} from {} to {shards} shards: {e}",
                    dir.display(),
                    found.shards
                )
            })?;
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            dir = %dir.display(),
            "re-cut data dir from {} to {shards} shards: {keys} keys, {ms} ms",
            found.shards
        );
    }
    let started = Instant::now();
    let bits = shards.trailing_zeros();
    let recovered: Vec<Result<(Shard, Recovered), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..shards)
            .map(|i| {
                let (dir, make) = (&dir, &make);
                s.spawn(move || {
                    let mut one = [make(i)];
                    let from = shard_buckets(i, bits);
                    let rec = recover_into(&files::shard_dir(dir, i), &mut one, from)
                        .map_err(|e| e.to_string())?;
                    let [shard] = one;
                    Ok((shard, rec))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("recovery panicked".into())))
            .collect()
    });
    let mut out = Vec::with_capacity(shards);
    let mut starts = Vec::with_capacity(shards);
    let (mut records, mut keys) = (0, 0);
    for r in recovered {
        let (shard, rec) = r?;
        records += rec.records;
        keys += shard.snapshot_stats().keys;
        starts.push(rec.start.unwrap_or(writer::ShardStart {
            segment: 1,
            snapshot: None,
        }));
        out.push(shard.with_wal());
    }
    // An entry the memory budget refused would be gone for good at the next snapshot:
    // starting with part of the data is worse than not starting.
    let refused: u64 = out.iter().map(|s| s.stats.storage_full).sum();
    if refused > 0 {
        return Err(format!(
            "{}: {refused} entries do not fit storage.memory_limit_mb ({} MiB); raise it to \
             at least what it was when they were written (the data directory is left as it was)",
            dir.display(),
            config.storage.memory_limit_mb
        ));
    }
    tracing::info!(
        dir = %dir.display(),
        keys,
        log_records = records,
        ms = started.elapsed().as_millis() as u64,
        "recovered from disk"
    );
    let (tx, durable, handle) =
        writer::start(&dir, &starts, config.storage.fsync).map_err(|e| e.to_string())?;
    let disk = Disk {
        tx,
        durable,
        fsync: config.storage.fsync,
        handed: (0..shards).map(|_| AtomicU64::new(0)).collect(),
        logged: (0..shards).map(|_| AtomicU64::new(0)).collect(),
        snapshotting: (0..shards).map(|_| AtomicBool::new(false)).collect(),
        kick: (0..shards).map(|_| tokio::sync::Notify::new()).collect(),
        kicked: (0..shards).map(|_| AtomicBool::new(false)).collect(),
        backing_up: AtomicBool::new(false),
        down_since_us,
        rejoin_cut_us: Mutex::new(rejoin_cut_us),
        dir,
        snapshot_after: config.storage.snapshot_log_mb.saturating_mul(1 << 20),
        writer: Mutex::new(Some(handle)),
    };
    Ok((out, disk))
}

/// The cut of the rejoin a start owes: down longer than `rejoin_after_us`, the moment it
/// went down (every entry older may have had its delete purged by a peer meanwhile, the
/// ones logged during a rejoin cut short too); else the one a marker recorded (a rejoin
/// a stop or crash cut short, whatever the files' times say since). Entries older than
/// the cut are dropped.
fn rejoin_cut(
    marked: Option<u64>,
    down_since_us: Option<u64>,
    now_us: u64,
    rejoin_after_us: Option<u64>,
) -> Option<u64> {
    let down_long =
        |since: &u64| rejoin_after_us.is_some_and(|g| now_us.saturating_sub(*since) > g);
    down_since_us.filter(down_long).or(marked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keyspace::KeyHash;
    use crate::store::shard::MemoryBudget;
    use std::cell::RefCell;

    #[test]
    fn a_snapshot_ships_the_changes_made_while_it_was_taken_before_it_ends() {
        let dir = std::env::temp_dir().join(format!("mkv-disk-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = Config::defaults(true);
        config.storage.data_dir = Some(dir.display().to_string());
        config.storage.persistence_enabled = true;
        let make = |i| Shard::new(i, 0, MemoryBudget::unlimited(), 1 << 20);
        let (mut shards, disk) = open(&config, 1, None, make).unwrap();
        let shard = RefCell::new(shards.pop().unwrap());
        let set = |key: String| {
            let h = KeyHash::of(key.as_bytes());
            shard.borrow_mut().set(h, key.as_bytes(), b"v").unwrap();
        };
        (0..100).for_each(|i| set(format!("before{i}")));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let tasks = tokio::task::LocalSet::new();
        tasks.block_on(&rt, async {
            // Slices of one entry: the writer below runs while the snapshot yields.
            let snapshot = disk.take_snapshot(0, 1, &shard, 1);
            let writer = async {
                for i in 0..10 {
                    set(format!("during{i}"));
                    tokio::task::yield_now().await;
                }
            };
            tokio::join!(snapshot, writer);
        });
        // Nothing ships these but the snapshot (no per-pass task runs here): a change
        // left behind could be in the snapshot and not in the log.
        assert_eq!(shard.borrow().wal_len(), 0);
        disk.stop();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const NOW: u64 = 1_800_000_000_000_000;
    const GRACE: u64 = 60_000_000;

    #[test]
    fn a_marker_decides_the_rejoin_whatever_the_files_times_say() {
        // Down 61 s with peers: rejoin, cut where it went down.
        assert_eq!(
            rejoin_cut(None, Some(NOW - 61_000_000), NOW, Some(GRACE)),
            Some(NOW - 61_000_000)
        );
        // Down 59 s, or a new directory, or no peers to learn from: no rejoin.
        assert_eq!(
            rejoin_cut(None, Some(NOW - 59_000_000), NOW, Some(GRACE)),
            None
        );
        assert_eq!(rejoin_cut(None, None, NOW, Some(GRACE)), None);
        assert_eq!(rejoin_cut(None, Some(NOW - 600_000_000), NOW, None), None);
        // A rejoin cut short: the files were written a moment ago (a shutdown snapshot,
        // a new segment), the marker still holds the first cut.
        let cut = NOW - 3_600_000_000;
        assert_eq!(
            rejoin_cut(Some(cut), Some(NOW - 1_000_000), NOW, Some(GRACE)),
            Some(cut)
        );
        assert_eq!(
            rejoin_cut(Some(cut), Some(NOW - 1_000_000), NOW, None),
            Some(cut)
        );
        // Cut short, then down past the grace again: what it took in while rejoining is
        // as old now, so the newer cut.
        let again = NOW - 600_000_000;
        assert_eq!(
            rejoin_cut(Some(cut), Some(again), NOW, Some(GRACE)),
            Some(again)
        );
    }
}
