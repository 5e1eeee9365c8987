//! The disk writer: one thread per node that frames what the shards hand it into records,
//! appends them to each shard's current log segment and syncs by the `fsync` policy.
//! Shard threads never touch a file: they send bytes and go on.
//!
//! Durability is reported per shard as a batch sequence number on a `watch` channel:
//! a shard numbers the batches it hands over (1, 2, …), and [`Durable`] says up to which
//! one the policy's promise holds — synced to disk (`always`), or written to the OS
//! (`everysec`, `no`). A connection that must not reply before its write is durable waits
//! for its shard's number to pass its batch. Group commit falls out of the loop: while one
//! `fdatasync` runs, the next batches queue up, and the next pass writes and syncs them
//! all at once.

use crate::persist::files::{io_at, segment_name, shard_dir, sync_dir, PersistError};
use crate::persist::record;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Record kinds, the first byte of every record body.
pub const RECORD_ENTRIES: u8 = 1;

/// When data reaches the disk (`[storage] fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// A write is acknowledged only once its record is synced (group commit).
    Always,
    /// Records are written to the OS as they come and synced once a second.
    EverySec,
    /// Records are written to the OS as they come; the OS decides when they reach the disk.
    No,
}

/// How often `everysec` syncs, and how often a failed disk is tried again.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// What the writer is told.
pub enum ToDisk {
    /// Entries (store journal encoding) of shard `shard`'s batch number `seq`.
    Batch {
        shard: usize,
        seq: u64,
        entries: Vec<u8>,
    },
    /// Sync everything, report, and stop.
    Stop(mpsc::Sender<Result<(), String>>),
}

/// Per shard, the last batch the `fsync` policy holds for; and whether the disk is
/// failing (writes are then refused, reads go on).
#[derive(Clone)]
pub struct Durable {
    pub shards: Vec<tokio::sync::watch::Receiver<u64>>,
    pub unavailable: Arc<AtomicBool>,
}

/// One shard's open log segment.
struct Segment {
    path: PathBuf,
    file: File,
    bytes: u64,
    /// Written but not synced.
    dirty: bool,
}

/// Start the writer thread for `shards` shards under `dir`, appending to segment `seq` of
/// each shard (a new file when absent). Returns its inbox and the durability reports.
pub fn start(
    dir: &Path,
    shards: usize,
    seqs: &[u64],
    fsync: Fsync,
) -> Result<
    (
        mpsc::SyncSender<ToDisk>,
        Durable,
        std::thread::JoinHandle<()>,
    ),
    PersistError,
> {
    let mut segments = Vec::with_capacity(shards);
    for (shard, &seq) in seqs.iter().enumerate().take(shards) {
        let d = shard_dir(dir, shard);
        std::fs::create_dir_all(&d).map_err(io_at(&d))?;
        let path = d.join(segment_name(seq));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_at(&path))?;
        let bytes = file.metadata().map_err(io_at(&path))?.len();
        sync_dir(&d)?;
        segments.push(Segment {
            path,
            file,
            bytes,
            dirty: false,
        });
    }
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| tokio::sync::watch::channel(0u64))
        .unzip();
    let unavailable = Arc::new(AtomicBool::new(false));
    // Bounded: a disk slower than the writes makes shards wait here, not memory grow.
    let (tx, rx) = mpsc::sync_channel(INBOX_BATCHES_MAX);
    let mut w = Writer {
        segments,
        pending: (0..shards).map(|_| Vec::new()).collect(),
        pending_seq: vec![0; shards],
        reported: senders,
        fsync,
        unavailable: unavailable.clone(),
        last_sync: Instant::now(),
    };
    let handle = std::thread::Builder::new()
        .name("disk".into())
        .spawn(move || w.run(rx))
        .map_err(io_at(dir))?;
    let durable = Durable {
        shards: receivers,
        unavailable,
    };
    Ok((tx, durable, handle))
}

/// Batches queued for the writer before shards wait.
const INBOX_BATCHES_MAX: usize = 4096;

struct Writer {
    segments: Vec<Segment>,
    /// Framed records not yet written (kept across a failing disk, so nothing handed
    /// over is dropped).
    pending: Vec<Vec<u8>>,
    /// The newest batch in `pending` (or written), per shard.
    pending_seq: Vec<u64>,
    reported: Vec<tokio::sync::watch::Sender<u64>>,
    fsync: Fsync,
    unavailable: Arc<AtomicBool>,
    last_sync: Instant,
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<ToDisk>) {
        let mut stop = None;
        while stop.is_none() {
            let wait = SYNC_EVERY.saturating_sub(self.last_sync.elapsed());
            match rx.recv_timeout(wait) {
                Ok(msg) => stop = self.take(msg),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            // Everything already queued joins this pass: one write and one sync for all.
            while stop.is_none() {
                match rx.try_recv() {
                    Ok(msg) => stop = self.take(msg),
                    Err(_) => break,
                }
            }
            let sync_now = match self.fsync {
                Fsync::Always => true,
                Fsync::EverySec => self.last_sync.elapsed() >= SYNC_EVERY,
                Fsync::No => false,
            };
            self.flush(sync_now || stop.is_some());
        }
        let result = if self.unavailable.load(Relaxed) {
            Err("the disk failed; changes since the last good write are not on disk".into())
        } else {
            Ok(())
        };
        if let Some(reply) = stop {
            let _ = reply.send(result);
        }
    }

    fn take(&mut self, msg: ToDisk) -> Option<mpsc::Sender<Result<(), String>>> {
        match msg {
            ToDisk::Batch {
                shard,
                seq,
                entries,
            } => {
                let mut body = Vec::with_capacity(1 + entries.len());
                body.push(RECORD_ENTRIES);
                body.extend_from_slice(&entries);
                record::append(&mut self.pending[shard], &body);
                self.pending_seq[shard] = seq;
                None
            }
            ToDisk::Stop(reply) => Some(reply),
        }
    }

    /// Write what is pending (and sync when `sync`), then report what the policy holds
    /// for. A failure keeps the bytes for the next pass and marks the disk unavailable.
    fn flush(&mut self, sync: bool) {
        let mut failed = None;
        for (shard, seg) in self.segments.iter_mut().enumerate() {
            let pending = &mut self.pending[shard];
            if !pending.is_empty() {
                match seg.file.write_all(pending) {
                    Ok(()) => {
                        seg.bytes += pending.len() as u64;
                        seg.dirty = true;
                        pending.clear();
                    }
                    Err(e) => {
                        // Part of it may have landed: cut back to the last whole record,
                        // so the retry does not leave a torn record mid-file.
                        let _ = seg.file.set_len(seg.bytes);
                        failed = Some(format!("{}: {e}", seg.path.display()));
                        continue;
                    }
                }
            }
            if sync && seg.dirty {
                match seg.file.sync_data() {
                    Ok(()) => seg.dirty = false,
                    Err(e) => failed = Some(format!("{}: {e}", seg.path.display())),
                }
            }
        }
        if sync {
            self.last_sync = Instant::now();
        }
        let was = self.unavailable.swap(failed.is_some(), Relaxed);
        match (&failed, was) {
            (Some(why), false) => tracing::error!("storage unavailable, writes refused: {why}"),
            (None, true) => tracing::info!("storage available again, writes accepted"),
            _ => {}
        }
        for (shard, seg) in self.segments.iter().enumerate() {
            let holds =
                self.pending[shard].is_empty() && (self.fsync != Fsync::Always || !seg.dirty);
            if holds {
                self.reported[shard].send_if_modified(|d| {
                    let moved = *d < self.pending_seq[shard];
                    *d = (*d).max(self.pending_seq[shard]);
                    moved
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mkv-writer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn wait_for(rx: &mut tokio::sync::watch::Receiver<u64>, seq: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while *rx.borrow_and_update() < seq {
            assert!(
                Instant::now() < deadline,
                "batch {seq} never became durable"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn batches_land_in_their_shards_segment_in_order_and_are_reported_durable() {
        for fsync in [Fsync::Always, Fsync::EverySec, Fsync::No] {
            let dir = temp(&format!("{fsync:?}"));
            let (tx, mut durable, handle) = start(&dir, 2, &[1, 7], fsync).unwrap();
            for seq in 1..=3u64 {
                for shard in 0..2 {
                    let entries = format!("s{shard}b{seq}").into_bytes();
                    tx.send(ToDisk::Batch {
                        shard,
                        seq,
                        entries,
                    })
                    .unwrap();
                }
            }
            wait_for(&mut durable.shards[0], 3);
            wait_for(&mut durable.shards[1], 3);
            let (reply, done) = mpsc::channel();
            tx.send(ToDisk::Stop(reply)).unwrap();
            assert_eq!(done.recv().unwrap(), Ok(()));
            handle.join().unwrap();
            for (shard, seq) in [(0, 1), (1, 7)] {
                let path = shard_dir(&dir, shard).join(segment_name(seq));
                let bytes = std::fs::read(path).unwrap();
                let bodies: Vec<Vec<u8>> = record::records(&bytes).map(<[u8]>::to_vec).collect();
                let want: Vec<Vec<u8>> = (1..=3)
                    .map(|b| {
                        let mut body = vec![RECORD_ENTRIES];
                        body.extend_from_slice(format!("s{shard}b{b}").as_bytes());
                        body
                    })
                    .collect();
                assert_eq!(bodies, want, "{fsync:?} shard {shard}");
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn appending_goes_on_after_what_a_segment_already_holds() {
        let dir = temp("append");
        for round in 1..=2u64 {
            let (tx, mut durable, handle) = start(&dir, 1, &[1], Fsync::Always).unwrap();
            tx.send(ToDisk::Batch {
                shard: 0,
                seq: 1,
                entries: vec![round as u8],
            })
            .unwrap();
            wait_for(&mut durable.shards[0], 1);
            drop(tx);
            handle.join().unwrap();
        }
        let bytes = std::fs::read(shard_dir(&dir, 0).join(segment_name(1))).unwrap();
        let bodies: Vec<&[u8]> = record::records(&bytes).collect();
        assert_eq!(bodies, [&[RECORD_ENTRIES, 1][..], &[RECORD_ENTRIES, 2]]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_disk_marks_storage_unavailable_and_reports_nothing_durable() {
        let dir = temp("full");
        let shard = shard_dir(&dir, 0);
        std::fs::create_dir_all(&shard).unwrap();
        // Every write to /dev/full fails with ENOSPC.
        std::os::unix::fs::symlink("/dev/full", shard.join(segment_name(1))).unwrap();
        let (tx, mut durable, handle) = start(&dir, 1, &[1], Fsync::Always).unwrap();
        tx.send(ToDisk::Batch {
            shard: 0,
            seq: 1,
            entries: b"lost?".to_vec(),
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !durable.unavailable.load(Relaxed) {
            assert!(Instant::now() < deadline, "the failure was never reported");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(*durable.shards[0].borrow_and_update(), 0);
        let (reply, done) = mpsc::channel();
        tx.send(ToDisk::Stop(reply)).unwrap();
        assert!(done.recv().unwrap().is_err());
        handle.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
