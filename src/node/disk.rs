//! The node's persistence (`[storage] persistence_enabled`, docs/PERSISTENCE.md): every
//! shard recovered from its directory at start, in parallel; the disk writer; and what a
//! shard thread hands it after each batch of work.

use crate::config::{Config, Fsync};
use crate::persist::apply::restore_entries;
use crate::persist::backup::FrozenFile;
use crate::persist::files::{self, Identity};
use crate::persist::recover::{recover, Loaded, Recovered};
use crate::persist::writer::{self, Durable, ToDisk};
use crate::store::keyspace::shard_buckets;
use crate::store::shard::Shard;
use crate::store::version::Version;
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
    /// Whether a backup is being taken (one at a time: node/backup.rs).
    pub backing_up: AtomicBool,
    /// When the data directory was last written before this start (µs since the epoch):
    /// when the node went down. `None` for a new directory.
    pub down_since_us: Option<u64>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Disk {
    /// Hand what shard `index` recorded since the last call to the writer. Returns the
    /// batch's number, to wait on under `fsync = always`. Blocks while the writer's queue
    /// is full: a disk slower than the writes slows the writes.
    pub fn ship(&self, index: usize, shard: &mut Shard) -> Option<u64> {
        let entries = shard.take_wal()?;
        let batch = self.handed[index].fetch_add(1, Relaxed) + 1;
        self.logged[index].fetch_add(entries.len() as u64, Relaxed);
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
            let (next, count) = shard.borrow().snapshot_entries(from, slice, &mut entries);
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
        let root = shard.borrow_mut().root();
        let _ = self.tx.send(ToDisk::SnapshotEnd { shard: index, root });
    }

    /// What a backup of this moment copies (persist::writer's `freeze`), once the writer
    /// has written and synced everything handed over before. Blocks until the writer
    /// answers: call it off the shard threads.
    pub fn freeze(&self) -> Result<Vec<FrozenFile>, String> {
        let gone = || "the disk writer has stopped".to_string();
        let (reply, frozen) = mpsc::channel();
        self.tx.send(ToDisk::Backup(reply)).map_err(|_| gone())?;
        frozen
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
pub fn open(
    config: &Config,
    shards: usize,
    make: impl Fn(usize) -> Shard + Sync,
) -> Result<(Vec<Shard>, Disk), String> {
    let dir = config.data_dir();
    let me = Identity {
        node_id: config.node_id.clone(),
        shards,
    };
    let found = files::open(&dir, &me).map_err(|e| e.to_string())?;
    if found.shards != shards {
        return Err(format!(
            "{} was written with {} shards and this node runs {shards}: set storage.shards = {} \
             (re-cutting a data directory to another shard count is not built yet)",
            dir.display(),
            found.shards,
            found.shards
        ));
    }
    let down_since_us = last_written_us(&dir, shards);
    let started = Instant::now();
    let bits = shards.trailing_zeros();
    let recovered: Vec<Result<(Shard, Recovered), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..shards)
            .map(|i| {
                let (dir, make) = (&dir, &make);
                s.spawn(move || recover_shard(&files::shard_dir(dir, i), make(i), i, bits))
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
        backing_up: AtomicBool::new(false),
        down_since_us,
        snapshot_after: config.storage.snapshot_log_mb.saturating_mul(1 << 20),
        writer: Mutex::new(Some(handle)),
    };
    Ok((out, disk))
}

/// The newest modification time of the shards' files, in µs since the epoch.
fn last_written_us(dir: &std::path::Path, shards: usize) -> Option<u64> {
    (0..shards)
        .filter_map(|i| std::fs::read_dir(files::shard_dir(dir, i)).ok())
        .flatten()
        .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
        .filter_map(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_micros() as u64)
        .max()
}

/// Recover shard `index` of `1 << bits` from its directory.
fn recover_shard(
    dir: &std::path::Path,
    shard: Shard,
    index: usize,
    bits: u32,
) -> Result<(Shard, Recovered), String> {
    let buckets = shard_buckets(index, bits);
    let mut one = [shard];
    let rec = recover(dir, |loaded| match loaded {
        Loaded::Snapshot(s) => {
            let (hlc, origin) = s.header.flushed;
            one[0].restore_flush(Version { hlc, origin });
            let mut read = 0;
            for c in 0..s.chunks.len() {
                read += restore_entries(&mut one, buckets.clone(), s.chunk(c))?;
            }
            if read != s.entries {
                return Err(format!(
                    "holds {read} entries, its end record says {}",
                    s.entries
                ));
            }
            Ok(())
        }
        Loaded::Entries(e) => restore_entries(&mut one, buckets.clone(), e).map(|_| ()),
    })
    .map_err(|e| e.to_string())?;
    let [shard] = one;
    Ok((shard, rec))
}
