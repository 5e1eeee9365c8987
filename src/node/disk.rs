//! The node's persistence (`[storage] persistence_enabled`, docs/PERSISTENCE.md): every
//! shard recovered from its directory at start, in parallel; the disk writer; and what a
//! shard thread hands it after each batch of work.

use crate::config::{Config, Fsync};
use crate::persist::apply::restore_entries;
use crate::persist::files::{self, Identity};
use crate::persist::recover::{recover, Loaded, Recovered};
use crate::persist::writer::{self, Durable, ToDisk};
use crate::store::keyspace::shard_buckets;
use crate::store::shard::Shard;
use crate::store::version::Version;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

/// The disk side of a running node.
pub struct Disk {
    tx: mpsc::SyncSender<ToDisk>,
    pub durable: Durable,
    pub fsync: Fsync,
    /// Per shard, the number of the last batch handed over (written by its thread only).
    handed: Vec<AtomicU64>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Disk {
    /// Hand what shard `index` recorded since the last call to the writer. Returns the
    /// batch's number, to wait on under `fsync = always`. Blocks while the writer's queue
    /// is full: a disk slower than the writes slows the writes.
    pub fn ship(&self, index: usize, shard: &mut Shard) -> Option<u64> {
        let entries = shard.take_wal()?;
        let batch = self.handed[index].fetch_add(1, Relaxed) + 1;
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
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), rx.changed()).await;
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
        writer: Mutex::new(Some(handle)),
    };
    Ok((out, disk))
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
