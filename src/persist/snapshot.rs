//! Snapshot files: one shard's entries at one moment, so the log before it can go.
//!
//! ```text
//! record  kind 2 (header): u32 LE shard, u32 LE shard count, u64 LE seq (the first log
//!         segment to replay after this snapshot), u64 LE flush hlc, u32 LE flush origin
//! record  kind 1 (entries), any number: entries in the store's journal encoding
//! record  kind 3 (end): u64 LE entry count, 32 bytes the shard's Merkle root
//! ```
//!
//! A snapshot is written as `snap-<seq>.snap.tmp`, synced, and renamed: a file with the
//! final name is whole unless the disk damaged it since, which the record checksums and
//! the end record (its entry count) find. The end record's root is the shard's root when
//! the snapshot ended, for diagnosis only: it is not checked, as the changes made while
//! the snapshot was taken are in the log after it, not necessarily in the snapshot. The shard keeps
//! running while its snapshot is written: replaying the log from `seq` over the snapshot
//! gives the exact state, because applying an entry is idempotent under last-write-wins.

use crate::persist::files::{io_at, snapshot_name, sync_dir, PersistError};
use crate::persist::record::{self, RECORD_ENTRIES, RECORD_SNAPSHOT_END, RECORD_SNAPSHOT_HEADER};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

const HEADER_BYTES: usize = 1 + 4 + 4 + 8 + 8 + 4;
const END_BYTES: usize = 1 + 8 + 32;

/// What a snapshot says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub shard: u32,
    pub shards: u32,
    /// The first log segment to replay after loading this snapshot.
    pub seq: u64,
    /// The shard's flush marker (hlc, origin) when the snapshot began.
    pub flushed: (u64, u32),
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_BYTES);
        b.push(RECORD_SNAPSHOT_HEADER);
        b.extend_from_slice(&self.shard.to_le_bytes());
        b.extend_from_slice(&self.shards.to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.flushed.0.to_le_bytes());
        b.extend_from_slice(&self.flushed.1.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Header> {
        if b.len() != HEADER_BYTES || b[0] != RECORD_SNAPSHOT_HEADER {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(Header {
            shard: u32_at(1),
            shards: u32_at(5),
            seq: u64_at(9),
            flushed: (u64_at(17), u32_at(25)),
        })
    }
}

/// A snapshot being written.
pub struct SnapshotWriter {
    tmp: PathBuf,
    path: PathBuf,
    out: BufWriter<std::fs::File>,
    entries: u64,
}

impl SnapshotWriter {
    pub fn create(shard_dir: &Path, header: Header) -> Result<SnapshotWriter, PersistError> {
        let path = shard_dir.join(snapshot_name(header.seq));
        let tmp = path.with_extension("snap.tmp");
        let file = std::fs::File::create(&tmp).map_err(io_at(&tmp))?;
        let mut w = SnapshotWriter {
            tmp,
            path,
            out: BufWriter::with_capacity(1 << 20, file),
            entries: 0,
        };
        w.record(&header.encode())?;
        Ok(w)
    }

    fn record(&mut self, body: &[u8]) -> Result<(), PersistError> {
        let mut framed = Vec::with_capacity(record::HEADER_BYTES + body.len());
        record::append(&mut framed, body);
        self.out.write_all(&framed).map_err(io_at(&self.tmp))
    }

    /// Append `count` entries, encoded back to back in `entries`.
    pub fn entries(&mut self, entries: &[u8], count: u64) -> Result<(), PersistError> {
        let mut body = Vec::with_capacity(1 + entries.len());
        body.push(RECORD_ENTRIES);
        body.extend_from_slice(entries);
        self.record(&body)?;
        self.entries += count;
        Ok(())
    }

    /// Give the snapshot up: its temporary file goes, so failed attempts on a full disk
    /// do not eat the space that comes back.
    pub fn abandon(self) {
        let tmp = self.tmp.clone();
        drop(self);
        let _ = std::fs::remove_file(tmp);
    }

    /// End the snapshot with the shard's root, make it durable under its final name, and
    /// return that name. On failure the temporary file is removed.
    pub fn finish(self, root: [u8; 32]) -> Result<PathBuf, PersistError> {
        let tmp = self.tmp.clone();
        self.complete(root).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    fn complete(mut self, root: [u8; 32]) -> Result<PathBuf, PersistError> {
        let mut end = Vec::with_capacity(END_BYTES);
        end.push(RECORD_SNAPSHOT_END);
        end.extend_from_slice(&self.entries.to_le_bytes());
        end.extend_from_slice(&root);
        self.record(&end)?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| io_at(&self.tmp)(e.into_error()))?;
        file.sync_all().map_err(io_at(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.path).map_err(io_at(&self.path))?;
        sync_dir(
            self.path
                .parent()
                .expect("a snapshot lives in a shard directory"),
        )?;
        Ok(self.path)
    }
}

/// A snapshot read back whole: its header, its entry chunks (bodies of kind-1 records
/// without the kind byte), and what its end record promises.
#[derive(Debug)]
pub struct Snapshot {
    pub header: Header,
    pub chunks: Vec<std::ops::Range<usize>>,
    pub entries: u64,
    pub root: [u8; 32],
    pub bytes: Vec<u8>,
}

impl Snapshot {
    pub fn chunk(&self, i: usize) -> &[u8] {
        &self.bytes[self.chunks[i].clone()]
    }
}

/// Read a snapshot file; any damage (a bad record, no end record, bytes after it) is an
/// error saying what, so the caller can fall back to an older one.
pub fn read(path: &Path) -> Result<Snapshot, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let base = bytes.as_ptr() as usize;
    let mut recs = record::records(&bytes);
    let header = recs
        .next()
        .and_then(Header::decode)
        .ok_or("no valid header record")?;
    let mut chunks = Vec::new();
    let mut end = None;
    for body in recs.by_ref() {
        match body.first() {
            Some(&RECORD_ENTRIES) if end.is_none() => {
                let start = body.as_ptr() as usize - base + 1;
                chunks.push(start..start + body.len() - 1);
            }
            Some(&RECORD_SNAPSHOT_END) if end.is_none() && body.len() == END_BYTES => {
                let count = u64::from_le_bytes(body[1..9].try_into().expect("8 bytes"));
                let root: [u8; 32] = body[9..].try_into().expect("32 bytes");
                end = Some((count, root));
            }
            _ => return Err("an unexpected record".into()),
        }
    }
    if let Some(damage) = recs.damage() {
        return Err(damage.to_string());
    }
    let (entries, root) = end.ok_or("no end record (the snapshot was cut short)")?;
    Ok(Snapshot {
        header,
        chunks,
        entries,
        root,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mkv-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const HEADER: Header = Header {
        shard: 3,
        shards: 4,
        seq: 42,
        flushed: (1234, 7),
    };

    fn write(dir: &Path) -> PathBuf {
        let mut w = SnapshotWriter::create(dir, HEADER).unwrap();
        w.entries(b"first chunk", 2).unwrap();
        w.entries(b"second", 1).unwrap();
        w.finish([9; 32]).unwrap()
    }

    #[test]
    fn a_snapshot_reads_back_as_written_and_only_under_its_final_name() {
        let dir = temp("roundtrip");
        let path = write(&dir);
        assert_eq!(path, dir.join(snapshot_name(42)));
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");
        let s = read(&path).unwrap();
        assert_eq!((s.header, s.entries, s.root), (HEADER, 3, [9; 32]));
        assert_eq!(
            (s.chunk(0), s.chunk(1)),
            (&b"first chunk"[..], &b"second"[..])
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_abandoned_snapshot_leaves_no_file() {
        let dir = temp("abandoned");
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = SnapshotWriter::create(&dir, HEADER).unwrap();
        w.entries(b"some entries", 1).unwrap();
        w.abandon();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cut_or_flipped_snapshot_is_refused_with_the_reason() {
        let dir = temp("damaged");
        let path = write(&dir);
        let good = std::fs::read(&path).unwrap();
        for cut in 0..good.len() {
            std::fs::write(&path, &good[..cut]).unwrap();
            assert!(read(&path).is_err(), "cut at {cut} was accepted");
        }
        for byte in 0..good.len() {
            let mut bad = good.clone();
            bad[byte] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            assert!(read(&path).is_err(), "a flip at byte {byte} was accepted");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
