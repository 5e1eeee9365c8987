//! The disk writer: one thread per node that frames what the shards hand it into records,
//! appends them to each shard's current log segment and syncs by the `fsync` policy.
//! Shard threads never touch a file: they send bytes and go on. It also touches `ALIVE`
//! every [`ALIVE_EVERY`], so an idle node is not taken for one that was down.
//!
//! Durability is reported per shard as a batch sequence number on a `watch` channel:
//! a shard numbers the batches it hands over (1, 2, …), and [`Durable`] says up to which
//! one the policy's promise holds — synced to disk (`always`), or written to the OS
//! (`everysec`, `no`). A connection that must not reply before its write is durable waits
//! for its shard's number to pass its batch. Group commit falls out of the loop: while one
//! `fdatasync` runs, the next batches queue up, and the next pass writes and syncs them
//! all at once.

use crate::config::Fsync;
use crate::persist::backup::FrozenFile;
use crate::persist::files::{
    io_at, list, segment_name, shard_dir, snapshot_name, sync_dir, touch_alive, PersistError,
    ALIVE_EVERY, NODE_FILE,
};
use crate::persist::record::{self, RECORD_ENTRIES};
use crate::persist::snapshot::{Header, SnapshotWriter};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// How often `everysec` syncs, and how often a failed disk is tried again.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// What the writer is told.
pub enum ToDisk {
    /// Entries (store journal encoding) of shard `shard`'s batch number `batch`.
    Batch {
        shard: usize,
        batch: u64,
        entries: Vec<u8>,
    },
    /// Begin a snapshot of `shard`: its log goes on in a new segment, and the snapshot
    /// will cover everything before that segment.
    SnapshotBegin {
        shard: usize,
        shards: u32,
        flushed: (u64, u32),
    },
    /// The next `count` entries of the snapshot, encoded back to back.
    SnapshotEntries {
        shard: usize,
        entries: Vec<u8>,
        count: u64,
    },
    /// The snapshot is complete; `root` is the shard's Merkle root at its end.
    SnapshotEnd { shard: usize, root: [u8; 32] },
    /// Write and sync what is pending, and reply with what a backup copies
    /// ([`Writer::freeze`]); then go on.
    Backup(mpsc::Sender<Result<Vec<FrozenFile>, PersistError>>),
    /// Write and sync what is pending, reply, and go on: everything handed over before
    /// is then on disk whatever the `fsync` policy.
    Sync(mpsc::Sender<Result<(), PersistError>>),
    /// Sync everything, report, and stop.
    Stop(mpsc::Sender<Result<(), String>>),
}

/// Per shard, the last batch the `fsync` policy holds for; and whether the disk is
/// failing (writes are then refused, reads go on).
#[derive(Clone)]
pub struct Durable {
    pub shards: Vec<tokio::sync::watch::Receiver<u64>>,
    pub unavailable: Arc<AtomicBool>,
    /// Bytes of entries sent to the writer and not yet taken from its queue: senders
    /// add, the writer subtracts; senders wait while it is over [`QUEUED_BYTES_MAX`].
    pub queued_bytes: Arc<AtomicUsize>,
}

/// Entry bytes the writer's queue may hold before senders wait: its 1,024 messages
/// could otherwise hold a snapshot's 1 MiB slices or large batches, a GiB and more.
pub const QUEUED_BYTES_MAX: usize = 64 << 20;

/// One shard's open log segment.
struct Segment {
    dir: PathBuf,
    number: u64,
    path: PathBuf,
    file: File,
    bytes: u64,
    /// Written but not synced.
    dirty: bool,
}

/// Where each shard's log goes on: the segment to append to, and the newest complete
/// snapshot (`None` before the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardStart {
    pub segment: u64,
    pub snapshot: Option<u64>,
}

/// What [`start`] returns: the writer's inbox, the durability reports, the thread.
pub type Started = (
    mpsc::SyncSender<ToDisk>,
    Durable,
    std::thread::JoinHandle<()>,
);

/// Start the writer thread for the shards under `dir`, appending to each shard's segment
/// (a new file when absent).
pub fn start(dir: &Path, starts: &[ShardStart], fsync: Fsync) -> Result<Started, PersistError> {
    let shards = starts.len();
    let mut segments = Vec::with_capacity(shards);
    for (shard, start) in starts.iter().enumerate() {
        segments.push(Segment::open(&shard_dir(dir, shard), start.segment)?);
    }
    // Every shard directory is durable before the first record: a start that finds one
    // missing next to one holding data knows files were lost (files.rs).
    sync_dir(dir)?;
    touch_alive(dir)?;
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| tokio::sync::watch::channel(0u64))
        .unzip();
    let unavailable = Arc::new(AtomicBool::new(false));
    let sync_failed = Arc::new(AtomicBool::new(false));
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    // Bounded: a disk slower than the writes makes shards wait here, not memory grow.
    let (tx, rx) = mpsc::sync_channel(INBOX_BATCHES_MAX);
    let handles = Arc::new(Mutex::new(
        segments
            .iter()
            .map(|s| s.file.try_clone().ok())
            .collect::<Vec<_>>(),
    ));
    // `everysec` syncs on a thread of its own: a slow fdatasync must never hold back the
    // writes behind it (they are acknowledged once they reach the OS).
    let (stop_syncer, syncer_stopped) = mpsc::channel::<()>();
    if fsync == Fsync::EverySec {
        let handles = handles.clone();
        let failed = [sync_failed.clone(), unavailable.clone()];
        std::thread::Builder::new()
            .name("disk-sync".into())
            .spawn(move || sync_every_second(&handles, &syncer_stopped, &failed))
            .map_err(io_at(dir))?;
    }
    let mut w = Writer {
        dir: dir.to_path_buf(),
        segments,
        handles,
        _stop_syncer: stop_syncer,
        pending: (0..shards).map(|_| Vec::new()).collect(),
        pending_seq: vec![0; shards],
        snapshots: (0..shards).map(|_| None).collect(),
        kept: starts.iter().map(|s| s.snapshot).collect(),
        reported: senders,
        fsync,
        unavailable: unavailable.clone(),
        sync_failed,
        queued_bytes: queued_bytes.clone(),
        alive_at: Instant::now(),
    };
    let handle = std::thread::Builder::new()
        .name("disk".into())
        .spawn(move || w.run(rx))
        .map_err(io_at(dir))?;
    let durable = Durable {
        shards: receivers,
        unavailable,
        queued_bytes,
    };
    Ok((tx, durable, handle))
}

/// Batches queued for the writer before shards wait: small enough that under
/// `everysec` the OS is never far behind what was acknowledged.
const INBOX_BATCHES_MAX: usize = 1024;

struct Writer {
    /// The data directory.
    dir: PathBuf,
    segments: Vec<Segment>,
    /// Framed records not yet written (kept across a failing disk, so nothing handed
    /// over is dropped).
    pending: Vec<Vec<u8>>,
    /// The newest batch in `pending` (or written), per shard.
    pending_seq: Vec<u64>,
    /// Snapshots being written (with the segment they start at), per shard.
    snapshots: Vec<Option<(u64, SnapshotWriter, Instant)>>,
    /// The newest complete snapshot per shard: kept, with the segments after it, when
    /// the next one completes, so a damaged newest snapshot has one to fall back to.
    kept: Vec<Option<u64>>,
    reported: Vec<tokio::sync::watch::Sender<u64>>,
    fsync: Fsync,
    unavailable: Arc<AtomicBool>,
    /// An fsync failed: the OS may have dropped log pages it had accepted, and a later
    /// fsync that succeeds would not bring them back ("fsyncgate"). Writes stay refused
    /// and nothing more is reported durable until a restart recovers from the disk.
    sync_failed: Arc<AtomicBool>,
    /// See [`Durable::queued_bytes`].
    queued_bytes: Arc<AtomicUsize>,
    /// When `ALIVE` was last touched.
    alive_at: Instant,
    /// Clones of the segments' files, which the `everysec` syncer syncs.
    handles: Arc<Mutex<Vec<Option<File>>>>,
    /// Dropped with the writer: the syncer then stops.
    _stop_syncer: mpsc::Sender<()>,
}

/// The `everysec` syncer: every second, fdatasync every shard's current segment. A
/// failure sets both `failed` flags (the writer's `sync_failed` and `unavailable`).
fn sync_every_second(
    handles: &Mutex<Vec<Option<File>>>,
    stopped: &mpsc::Receiver<()>,
    failed: &[Arc<AtomicBool>; 2],
) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(SYNC_EVERY) {
        let files: Vec<File> = match handles.lock() {
            Ok(h) => h
                .iter()
                .flatten()
                .filter_map(|f| f.try_clone().ok())
                .collect(),
            Err(_) => return,
        };
        for f in files {
            if let Err(e) = f.sync_data() {
                if !failed[0].swap(true, Relaxed) {
                    tracing::error!("{}: {e}", SYNC_FAILED);
                }
                failed[1].store(true, Relaxed);
            }
        }
    }
}

/// `entries` cut at entry boundaries into parts of at most `max` bytes, so each fits a
/// record: a batch is a pass's changes, almost always far smaller than one record, but
/// nothing bounds it below the record limit. Entries that do not decode (never written
/// by a shard) stay in one part.
fn record_parts(entries: &[u8], max: usize) -> Vec<&[u8]> {
    if entries.len() <= max {
        return vec![entries];
    }
    let mut parts = Vec::new();
    let mut r = crate::wire::Reader::new(entries);
    // The current part starts at `start`; `last` is where its last whole entry ends.
    let (mut start, mut last) = (0, 0);
    while !r.done() && crate::store::journal::decode_entry(&mut r).is_ok() {
        if r.at() - start > max && last > start {
            parts.push(&entries[start..last]);
            start = last;
        }
        last = r.at();
    }
    parts.push(&entries[start..]);
    parts
}

/// What a failed fsync means, for the log.
const SYNC_FAILED: &str = "fsync of a log segment failed: the OS may have dropped log data \
     it had accepted; writes are refused until the node restarts and recovers from what \
     is on disk";

impl Segment {
    fn open(dir: &Path, number: u64) -> Result<Segment, PersistError> {
        std::fs::create_dir_all(dir).map_err(io_at(dir))?;
        let path = dir.join(segment_name(number));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_at(&path))?;
        let bytes = file.metadata().map_err(io_at(&path))?.len();
        sync_dir(dir)?;
        Ok(Segment {
            dir: dir.to_path_buf(),
            number,
            path,
            file,
            bytes,
            dirty: false,
        })
    }
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<ToDisk>) {
        let mut stop = None;
        while stop.is_none() {
            // Idle, a pass each second retries what a failing disk refused.
            match rx.recv_timeout(SYNC_EVERY) {
                Ok(msg) => stop = self.take(msg),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Every sender is gone without a Stop: still write what was handed.
                    self.flush(true);
                    break;
                }
            }
            // Everything already queued joins this pass: one write and one sync for all.
            while stop.is_none() {
                match rx.try_recv() {
                    Ok(msg) => stop = self.take(msg),
                    Err(_) => break,
                }
            }
            // `always` syncs each pass (group commit); `everysec` leaves it to its syncer;
            // every policy syncs before stopping.
            self.flush(self.fsync == Fsync::Always || stop.is_some());
            if self.alive_at.elapsed() >= ALIVE_EVERY {
                self.alive_at = Instant::now();
                if let Err(e) = touch_alive(&self.dir) {
                    tracing::warn!("cannot mark the node alive: {e}");
                }
            }
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
                batch,
                entries,
            } => {
                self.taken(entries.len());
                for part in record_parts(&entries, record::RECORD_BYTES_MAX - 1) {
                    record::append_kind(&mut self.pending[shard], RECORD_ENTRIES, part);
                }
                self.pending_seq[shard] = batch;
            }
            ToDisk::SnapshotBegin {
                shard,
                shards,
                flushed,
            } => {
                if let Err(e) = self.begin_snapshot(shard, shards, flushed) {
                    tracing::error!(shard, "cannot begin a snapshot: {e}");
                }
            }
            ToDisk::SnapshotEntries {
                shard,
                entries,
                count,
            } => {
                self.taken(entries.len());
                if let Some((_, w, _)) = &mut self.snapshots[shard] {
                    if let Err(e) = w.entries(&entries, count) {
                        tracing::error!(shard, "snapshot abandoned: {e}");
                        if let Some((_, w, _)) = self.snapshots[shard].take() {
                            w.abandon();
                        }
                    }
                }
            }
            ToDisk::SnapshotEnd { shard, root } => {
                if let Some((number, w, began)) = self.snapshots[shard].take() {
                    // The snapshot holds the changes of every batch handed over before
                    // its end: their records go to disk first, or a crash could keep
                    // those changes and lose earlier ones of other keys.
                    let finished = match self.sync_pending(Some(shard)) {
                        Ok(()) => w.finish(root).map_err(|e| e.to_string()),
                        Err(e) => {
                            w.abandon();
                            Err(e.to_string())
                        }
                    };
                    match finished {
                        Ok(path) => {
                            let ms = began.elapsed().as_millis() as u64;
                            tracing::info!(shard, path = %path.display(), ms, "snapshot written");
                            self.prune(shard, number);
                        }
                        Err(e) => tracing::error!(shard, "snapshot abandoned: {e}"),
                    }
                }
            }
            ToDisk::Backup(reply) => {
                let _ = reply.send(self.freeze());
            }
            ToDisk::Sync(reply) => {
                let _ = reply.send(self.sync_pending(None));
            }
            ToDisk::Stop(reply) => return Some(reply),
        }
        None
    }

    /// Open what a backup of this moment copies, once everything handed over before is
    /// written and synced: `NODE`, and per shard its newest complete snapshot and every
    /// segment from it on (every segment before the first snapshot), each with its length
    /// now. The handles stay readable when a later snapshot removes their files, and the
    /// lengths leave out whatever is appended later: the copy, made elsewhere while the
    /// writer goes on, is every shard's log cut at this one point.
    fn freeze(&mut self) -> Result<Vec<FrozenFile>, PersistError> {
        self.sync_pending(None)?;
        let mut out = vec![self.frozen(&self.dir.join(NODE_FILE), None)?];
        for (shard, seg) in self.segments.iter().enumerate() {
            let from = self.kept[shard];
            if let Some(n) = from {
                out.push(self.frozen(&seg.dir.join(snapshot_name(n)), None)?);
            }
            let listing = list(&seg.dir)?;
            let segments = listing
                .segments
                .iter()
                .filter(|(n, _)| from.is_none_or(|f| *n >= f) && *n <= seg.number);
            for (n, path) in segments {
                // Only the current segment still grows; the writer knows its whole records.
                let len = (*n == seg.number).then_some(seg.bytes);
                out.push(self.frozen(path, len)?);
            }
        }
        Ok(out)
    }

    /// Write and sync everything handed over so far; an error when the disk keeps some
    /// of it back — of shard `only`'s log, or of any shard's — unwritten or unsynced.
    fn sync_pending(&mut self, only: Option<usize>) -> Result<(), PersistError> {
        self.flush(true);
        let sync_failed = self.sync_failed.load(Relaxed);
        let held = (0..self.segments.len())
            .filter(|s| only.is_none_or(|o| o == *s))
            .find(|&s| sync_failed || self.segments[s].dirty || !self.pending[s].is_empty());
        match held {
            Some(shard) => Err(PersistError::Io {
                path: self.segments[shard].path.clone(),
                source: std::io::Error::other("the log cannot be written or synced"),
            }),
            None => Ok(()),
        }
    }

    /// `path` opened for a backup, `len` bytes of it (`None`: all it holds now).
    fn frozen(&self, path: &Path, len: Option<u64>) -> Result<FrozenFile, PersistError> {
        let file = File::open(path).map_err(io_at(path))?;
        let len = match len {
            Some(len) => len,
            None => file.metadata().map_err(io_at(path))?.len(),
        };
        let name = path.strip_prefix(&self.dir).unwrap_or(path);
        Ok(FrozenFile {
            name: name.to_string_lossy().into_owned(),
            file,
            len,
        })
    }

    /// `n` entry bytes left the queue.
    fn taken(&self, n: usize) {
        let _ = self
            .queued_bytes
            .fetch_update(Relaxed, Relaxed, |q| Some(q.saturating_sub(n)));
    }

    /// Cut the shard's log: what is pending goes to the old segment, which is synced; new
    /// batches go to the next one; the snapshot covers everything before it.
    fn begin_snapshot(
        &mut self,
        shard: usize,
        shards: u32,
        flushed: (u64, u32),
    ) -> Result<(), PersistError> {
        if let Some((number, _, _)) = &self.snapshots[shard] {
            return Err(PersistError::Io {
                path: self.segments[shard].dir.join(snapshot_name(*number)),
                source: std::io::Error::other("a snapshot of this shard is being written"),
            });
        }
        self.sync_pending(Some(shard))?;
        let seg = &self.segments[shard];
        let next = Segment::open(&seg.dir, seg.number + 1)?;
        let header = Header {
            shard: shard as u32,
            shards,
            seq: next.number,
            flushed,
        };
        let writer = match SnapshotWriter::create(&next.dir, header) {
            Ok(w) => w,
            Err(e) => {
                // The log goes on in the current segment: an empty one after it would
                // make a later torn tail there look like damage in an older segment.
                let _ = std::fs::remove_file(&next.path);
                let _ = sync_dir(&next.dir);
                return Err(e);
            }
        };
        if let Ok(mut h) = self.handles.lock() {
            h[shard] = next.file.try_clone().ok();
        }
        self.segments[shard] = next;
        self.snapshots[shard] = Some((header.seq, writer, Instant::now()));
        Ok(())
    }

    /// Snapshot `number` is complete: remove what the one before it made redundant —
    /// older snapshots, and the segments before the previous snapshot.
    fn prune(&mut self, shard: usize, number: u64) {
        let dir = &self.segments[shard].dir;
        let previous = self.kept[shard].replace(number);
        let Some(previous) = previous else { return };
        let listing = match list(dir) {
            Ok(l) => l,
            Err(e) => return tracing::warn!(shard, "cannot list old log files: {e}"),
        };
        let old = listing.segments.iter().chain(&listing.snapshots);
        for (_, p) in old.filter(|(n, _)| *n < previous) {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!(shard, "cannot remove {}: {e}", p.display());
            }
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
                    Err(e) => {
                        if !self.sync_failed.swap(true, Relaxed) {
                            tracing::error!("{}: {}: {e}", SYNC_FAILED, seg.path.display());
                        }
                    }
                }
            }
        }
        let sync_failed = self.sync_failed.load(Relaxed);
        let was = self
            .unavailable
            .swap(failed.is_some() || sync_failed, Relaxed);
        match (&failed, was) {
            (Some(why), false) => tracing::error!("storage unavailable, writes refused: {why}"),
            (None, true) if !sync_failed => {
                tracing::info!("storage available again, writes accepted")
            }
            _ => {}
        }
        for (shard, seg) in self.segments.iter().enumerate() {
            let synced = self.fsync != Fsync::Always || (!seg.dirty && !sync_failed);
            let holds = self.pending[shard].is_empty() && synced;
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

    const FIRST: ShardStart = ShardStart {
        segment: 1,
        snapshot: None,
    };

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
            let starts = [1, 7].map(|segment| ShardStart {
                segment,
                snapshot: None,
            });
            let (tx, mut durable, handle) = start(&dir, &starts, fsync).unwrap();
            for seq in 1..=3u64 {
                for shard in 0..2 {
                    let entries = format!("s{shard}b{seq}").into_bytes();
                    tx.send(ToDisk::Batch {
                        shard,
                        batch: seq,
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
            let (tx, mut durable, handle) = start(&dir, &[FIRST], Fsync::Always).unwrap();
            tx.send(ToDisk::Batch {
                shard: 0,
                batch: 1,
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
        let (tx, mut durable, handle) = start(&dir, &[FIRST], Fsync::Always).unwrap();
        tx.send(ToDisk::Batch {
            shard: 0,
            batch: 1,
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

    #[test]
    fn a_batch_too_big_for_one_record_is_cut_at_entry_boundaries() {
        let mut entries = Vec::new();
        let mut ends = Vec::new();
        for i in 0..50u64 {
            let v = crate::store::version::Version {
                hlc: i + 1,
                origin: 7,
            };
            let (key, value) = (format!("key{i}"), vec![b'v'; i as usize % 40]);
            crate::store::journal::encode_entry(&mut entries, v, key.as_bytes(), Some(&value));
            ends.push(entries.len());
        }
        for max in [entries.len(), 200, 64] {
            let parts = record_parts(&entries, max);
            assert_eq!(parts.concat(), entries, "max {max}");
            let mut at = 0;
            for part in &parts {
                assert!(part.len() <= max, "max {max}: a part of {}", part.len());
                at += part.len();
                assert!(ends.contains(&at), "max {max}: a cut inside an entry");
            }
        }
        assert_eq!(record_parts(&entries, entries.len()).len(), 1);
    }

    #[test]
    fn the_queued_bytes_senders_count_are_taken_off_as_the_writer_takes_them() {
        let dir = temp("queued");
        let (tx, mut durable, handle) = start(&dir, &[FIRST], Fsync::No).unwrap();
        durable.queued_bytes.fetch_add(3000, Relaxed);
        for batch in 1..=3 {
            let entries = vec![batch as u8; 1000];
            tx.send(ToDisk::Batch {
                shard: 0,
                batch,
                entries,
            })
            .unwrap();
        }
        wait_for(&mut durable.shards[0], 3);
        assert_eq!(durable.queued_bytes.load(Relaxed), 0);
        drop(tx);
        handle.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_snapshot_that_cannot_begin_leaves_the_log_in_its_segment() {
        let dir = temp("snapshot-cannot-begin");
        let shard = shard_dir(&dir, 0);
        std::fs::create_dir_all(&shard).unwrap();
        // Its temporary file cannot be created where a directory has that name.
        std::fs::create_dir(shard.join(snapshot_name(2)).with_extension("snap.tmp")).unwrap();
        let (tx, mut durable, handle) = start(&dir, &[FIRST], Fsync::Always).unwrap();
        let begin = ToDisk::SnapshotBegin {
            shard: 0,
            shards: 1,
            flushed: (0, 0),
        };
        tx.send(begin).unwrap();
        tx.send(ToDisk::Batch {
            shard: 0,
            batch: 1,
            entries: vec![7],
        })
        .unwrap();
        wait_for(&mut durable.shards[0], 1);
        let (reply, done) = mpsc::channel();
        tx.send(ToDisk::Stop(reply)).unwrap();
        assert_eq!(done.recv().unwrap(), Ok(()));
        handle.join().unwrap();
        let listing = list(&shard).unwrap();
        let numbers: Vec<u64> = listing.segments.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            numbers,
            [1],
            "no empty segment after the one the log goes on in"
        );
        let bytes = std::fs::read(shard.join(segment_name(1))).unwrap();
        assert_eq!(record::records(&bytes).count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_fsync_refuses_writes_for_good_and_reports_nothing_more_durable() {
        for fsync in [Fsync::Always, Fsync::EverySec] {
            let dir = temp(&format!("fsync-{fsync:?}"));
            let shard = shard_dir(&dir, 0);
            std::fs::create_dir_all(&shard).unwrap();
            // A segment that is a pipe: writes go through, fdatasync fails (EINVAL).
            let fifo = shard.join(segment_name(1));
            let made = std::process::Command::new("mkfifo").arg(&fifo).status();
            assert!(made.unwrap().success(), "mkfifo");
            let reader = {
                let fifo = fifo.clone();
                std::thread::spawn(move || {
                    let mut sink = Vec::new();
                    std::io::Read::read_to_end(&mut File::open(fifo).unwrap(), &mut sink)
                })
            };
            let (tx, mut durable, handle) = start(&dir, &[FIRST], fsync).unwrap();
            let batch = |batch: u64| ToDisk::Batch {
                shard: 0,
                batch,
                entries: vec![batch as u8],
            };
            tx.send(batch(1)).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !durable.unavailable.load(Relaxed) {
                assert!(
                    Instant::now() < deadline,
                    "{fsync:?}: the failure was never seen"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            // Later writes reach the pipe, and later syncs are not retried into success.
            tx.send(batch(2)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                durable.unavailable.load(Relaxed),
                "{fsync:?}: storage came back"
            );
            if fsync == Fsync::Always {
                assert_eq!(*durable.shards[0].borrow_and_update(), 0);
            }
            // Nor is a snapshot begun over a log that is not synced.
            tx.send(ToDisk::SnapshotBegin {
                shard: 0,
                shards: 1,
                flushed: (0, 0),
            })
            .unwrap();
            let (reply, done) = mpsc::channel();
            tx.send(ToDisk::Stop(reply)).unwrap();
            assert!(done.recv().unwrap().is_err(), "{fsync:?}");
            handle.join().unwrap();
            reader.join().unwrap().unwrap();
            let listing = list(&shard).unwrap();
            assert_eq!(listing.segments.len(), 1, "{fsync:?}: a snapshot began");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn a_snapshot_is_not_completed_before_the_log_handed_over_ahead_of_its_end_is_written() {
        // The snapshot holds the changes of every batch handed over before its end. Were
        // it completed while their records are not on disk, a crash would keep the later
        // changes it holds and lose earlier ones of other keys, a state that never was.
        let dir = temp("snapshot-order");
        let shard = shard_dir(&dir, 0);
        std::fs::create_dir_all(&shard).unwrap();
        // The segment the snapshot starts cannot be written: ENOSPC.
        std::os::unix::fs::symlink("/dev/full", shard.join(segment_name(2))).unwrap();
        let (tx, _durable, handle) = start(&dir, &[FIRST], Fsync::EverySec).unwrap();
        let begin = ToDisk::SnapshotBegin {
            shard: 0,
            shards: 1,
            flushed: (0, 0),
        };
        tx.send(begin).unwrap();
        tx.send(ToDisk::Batch {
            shard: 0,
            batch: 1,
            entries: vec![1],
        })
        .unwrap();
        tx.send(ToDisk::SnapshotEntries {
            shard: 0,
            entries: vec![1],
            count: 1,
        })
        .unwrap();
        tx.send(ToDisk::SnapshotEnd {
            shard: 0,
            root: [1; 32],
        })
        .unwrap();
        let (reply, done) = mpsc::channel();
        tx.send(ToDisk::Stop(reply)).unwrap();
        assert!(done.recv().unwrap().is_err());
        handle.join().unwrap();
        assert!(
            !shard.join(snapshot_name(2)).exists(),
            "a snapshot was completed while the log before its end was not written"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_snapshot_cuts_the_log_and_the_one_after_it_removes_what_both_cover() {
        let dir = temp("snapshots");
        let (tx, mut durable, handle) = start(&dir, &[FIRST], Fsync::Always).unwrap();
        let batch = |batch: u64| ToDisk::Batch {
            shard: 0,
            batch,
            entries: vec![batch as u8],
        };
        let snapshot = |tx: &mpsc::SyncSender<ToDisk>, tag: u8| {
            let begin = ToDisk::SnapshotBegin {
                shard: 0,
                shards: 1,
                flushed: (0, 0),
            };
            tx.send(begin).unwrap();
            let entries = ToDisk::SnapshotEntries {
                shard: 0,
                entries: vec![tag],
                count: 1,
            };
            tx.send(entries).unwrap();
            tx.send(ToDisk::SnapshotEnd {
                shard: 0,
                root: [tag; 32],
            })
            .unwrap();
        };
        tx.send(batch(1)).unwrap();
        snapshot(&tx, 0xa);
        tx.send(batch(2)).unwrap();
        wait_for(&mut durable.shards[0], 2);
        let names = |dir: &Path| {
            let l = list(&shard_dir(dir, 0)).unwrap();
            let n = |v: &[(u64, PathBuf)]| v.iter().map(|(n, _)| *n).collect::<Vec<_>>();
            (n(&l.segments), n(&l.snapshots))
        };
        // The first snapshot has nothing older to fall back to: every segment stays.
        assert_eq!(names(&dir), (vec![1, 2], vec![2]));
        snapshot(&tx, 0xb);
        tx.send(batch(3)).unwrap();
        wait_for(&mut durable.shards[0], 3);
        let (reply, done) = mpsc::channel();
        tx.send(ToDisk::Stop(reply)).unwrap();
        assert_eq!(done.recv().unwrap(), Ok(()));
        handle.join().unwrap();
        // The second makes the first the fallback: segment 1 (before it) goes.
        assert_eq!(names(&dir), (vec![2, 3], vec![2, 3]));
        let log = |n: u64| std::fs::read(shard_dir(&dir, 0).join(segment_name(n))).unwrap();
        let bodies = |b: &[u8]| record::records(b).map(<[u8]>::to_vec).collect::<Vec<_>>();
        assert_eq!(bodies(&log(2)), [vec![RECORD_ENTRIES, 2]]);
        assert_eq!(bodies(&log(3)), [vec![RECORD_ENTRIES, 3]]);
        let snap = crate::persist::snapshot::read(&shard_dir(&dir, 0).join(snapshot_name(3)));
        let snap = snap.unwrap();
        assert_eq!(
            (snap.header.seq, snap.chunk(0), snap.root),
            (3, &[0xb][..], [0xb; 32])
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_backup_holds_the_newest_snapshot_and_the_log_after_it_up_to_its_message() {
        let dir = temp("backup");
        let me = crate::persist::files::Identity {
            node_id: "n".into(),
            shards: 1,
        };
        crate::persist::files::open(&dir, &me).unwrap();
        let (tx, mut durable, handle) = start(&dir, &[FIRST], Fsync::EverySec).unwrap();
        let batch = |batch: u64| ToDisk::Batch {
            shard: 0,
            batch,
            entries: vec![batch as u8],
        };
        let freeze = |tx: &mpsc::SyncSender<ToDisk>| {
            let (reply, frozen) = mpsc::channel();
            tx.send(ToDisk::Backup(reply)).unwrap();
            frozen.recv().unwrap().unwrap()
        };
        tx.send(batch(1)).unwrap();
        // Before any snapshot: NODE and every segment.
        let names = |f: &[FrozenFile]| f.iter().map(|f| f.name.clone()).collect::<Vec<_>>();
        let log = |n: u64| format!("shard-0/{}", segment_name(n));
        assert_eq!(names(&freeze(&tx)), ["NODE".to_string(), log(1)]);
        tx.send(ToDisk::SnapshotBegin {
            shard: 0,
            shards: 1,
            flushed: (0, 0),
        })
        .unwrap();
        tx.send(ToDisk::SnapshotEnd {
            shard: 0,
            root: [0; 32],
        })
        .unwrap();
        tx.send(batch(2)).unwrap();
        let frozen = freeze(&tx);
        // Written after the backup froze the log: not in it.
        tx.send(batch(3)).unwrap();
        wait_for(&mut durable.shards[0], 3);
        let snap = format!("shard-0/{}", snapshot_name(2));
        assert_eq!(names(&frozen), ["NODE".to_string(), snap, log(2)]);
        let mut copied = Vec::new();
        let current = frozen.into_iter().next_back().unwrap();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(current.file, current.len),
            &mut copied,
        )
        .unwrap();
        let bodies: Vec<Vec<u8>> = record::records(&copied).map(<[u8]>::to_vec).collect();
        assert_eq!(bodies, [vec![RECORD_ENTRIES, 2]]);
        drop(tx);
        handle.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
