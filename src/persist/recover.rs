//! Recovery of one shard directory: pick the newest snapshot that reads back whole (an
//! older one when it does not), then replay the log segments from the snapshot on — into
//! its shard, or into all the shards of a directory re-cut to another shard count.
//!
//! Damage is handled by where it is. A torn or corrupt tail of the newest segment is what
//! a crash in the middle of a write leaves: the segment is cut back to its last whole
//! record and a log line says how many bytes went. Damage anywhere else — inside an older
//! segment, or a segment missing from the sequence — is not a crash's doing, and records
//! after it cannot be trusted to complete the state: recovery stops with an error naming
//! the file and the byte, and the node does not start on silently wrong data.

use crate::persist::apply::restore_entries;
use crate::persist::files::{io_at, list, PersistError};
use crate::persist::record::{self, RECORD_ENTRIES};
use crate::persist::snapshot::{self, Snapshot};
use crate::persist::writer::ShardStart;
use crate::store::shard::Shard;
use crate::store::version::Version;
use std::path::{Path, PathBuf};

/// Most bytes checksummed while looking for good records behind damage in the newest
/// segment.
const SCAN_BYTES_MAX: usize = 64 << 20;

/// Why a shard directory cannot be recovered.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Io(#[from] PersistError),
    #[error(
        "{path}: {why}, and {after} more bytes of log follow it; the log cannot be trusted \
         past this point (move the data directory aside to resynchronise from peers)"
    )]
    Corrupt {
        path: PathBuf,
        why: String,
        after: u64,
    },
    #[error("{dir}: log segment {missing:016x} is missing (found {found:016x} after it)")]
    Gap {
        dir: PathBuf,
        missing: u64,
        found: u64,
    },
    #[error(
        "{dir}: log segment {seq:016x}, where snapshot {seq:016x}'s log goes on, is missing \
         (the writer creates it before the snapshot; move the data directory aside to \
         resynchronise from peers)"
    )]
    NoLogAfterSnapshot { dir: PathBuf, seq: u64 },
    #[error("{path}: {why}")]
    Apply { path: PathBuf, why: String },
}

/// What recovering a shard found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Where the writer goes on.
    pub start: Option<ShardStart>,
    /// Log records replayed after the snapshot.
    pub records: u64,
    /// Bytes of a torn tail cut from the newest segment.
    pub dropped_bytes: u64,
    /// Snapshots that did not read back whole, with the reason (moved aside).
    pub bad_snapshots: Vec<(PathBuf, String)>,
}

/// What recovery hands its caller, in order.
pub enum Loaded<'a> {
    /// The snapshot chosen, if any, first.
    Snapshot(&'a Snapshot),
    /// Then each replayed record's entries, in log order.
    Entries(&'a [u8]),
}

/// Recover `dir` (one shard's directory), handing `apply` the snapshot chosen and then
/// the log after it.
pub fn recover(
    dir: &Path,
    mut apply: impl FnMut(Loaded) -> Result<(), String>,
) -> Result<Recovered, RecoveryError> {
    let listing = list(dir)?;
    for tmp in &listing.leftovers {
        std::fs::remove_file(tmp).map_err(io_at(tmp))?;
    }
    let mut out = Recovered::default();
    let load = |s: &Snapshot| apply(Loaded::Snapshot(s));
    let chosen = choose_snapshot(&listing.snapshots, load, &mut out.bad_snapshots)?;
    let segments: Vec<&(u64, PathBuf)> = listing
        .segments
        .iter()
        .filter(|(n, _)| *n >= chosen.unwrap_or(0))
        .collect();
    check_sequence(dir, chosen.unwrap_or(1), &segments)?;
    // The writer opens a snapshot's segment (and syncs its directory) before it begins
    // the snapshot, so a snapshot without it lost its log, which no crash does.
    if let (Some(seq), true) = (chosen, segments.is_empty()) {
        let dir = dir.to_path_buf();
        return Err(RecoveryError::NoLogAfterSnapshot { dir, seq });
    }
    for (i, (_, path)) in segments.iter().enumerate() {
        let newest = i + 1 == segments.len();
        let mut entries = |e: &[u8]| apply(Loaded::Entries(e));
        let (records, dropped) = replay(path, newest, &segments[i + 1..], &mut entries)?;
        out.records += records;
        out.dropped_bytes += dropped;
    }
    out.start = Some(ShardStart {
        segment: segments.last().map(|(n, _)| *n).or(chosen).unwrap_or(1),
        snapshot: chosen,
    });
    Ok(out)
}

/// Recover `dir`, the directory of the shard that owned the (global) buckets `from`,
/// into `shards`: that one shard, or every shard of the node when the directory was
/// written with another shard count (each key goes to the shard that owns it now; the
/// snapshot's flush marker, node-wide, to all).
pub fn recover_into(
    dir: &Path,
    shards: &mut [Shard],
    from: std::ops::Range<usize>,
) -> Result<Recovered, RecoveryError> {
    recover(dir, |loaded| match loaded {
        Loaded::Snapshot(s) => {
            let (hlc, origin) = s.header.flushed;
            for shard in shards.iter_mut() {
                shard.restore_flush(Version { hlc, origin });
            }
            let mut read = 0;
            for c in 0..s.chunks.len() {
                read += restore_entries(shards, from.clone(), s.chunk(c))?;
            }
            if read != s.entries {
                return Err(format!(
                    "holds {read} entries, its end record says {}",
                    s.entries
                ));
            }
            Ok(())
        }
        Loaded::Entries(e) => restore_entries(shards, from.clone(), e).map(|_| ()),
    })
}

/// Load the newest snapshot that reads back whole; move the others that do not aside
/// (recording why), so the writer's pruning never counts on them.
fn choose_snapshot(
    snapshots: &[(u64, PathBuf)],
    mut load: impl FnMut(&Snapshot) -> Result<(), String>,
    bad: &mut Vec<(PathBuf, String)>,
) -> Result<Option<u64>, RecoveryError> {
    let mut chosen = None;
    for (number, path) in snapshots.iter().rev() {
        match snapshot::read(path) {
            Ok(s) if s.header.seq == *number => {
                load(&s).map_err(|why| RecoveryError::Apply {
                    path: path.clone(),
                    why,
                })?;
                chosen = Some(*number);
                break;
            }
            Ok(_) => bad.push((path.clone(), "its header names another segment".into())),
            Err(why) => bad.push((path.clone(), why)),
        }
    }
    for (path, why) in bad.iter() {
        tracing::warn!(path = %path.display(), "snapshot moved aside, an older one is used: {why}");
        let aside = path.with_extension("snap.corrupt");
        std::fs::rename(path, &aside).map_err(io_at(path))?;
    }
    Ok(chosen)
}

/// Segments are numbered without gaps from `first` (the snapshot's, or 1 without one):
/// a hole means lost log.
fn check_sequence(
    dir: &Path,
    first: u64,
    segments: &[&(u64, PathBuf)],
) -> Result<(), RecoveryError> {
    let mut want = first;
    for (n, _) in segments {
        if *n != want {
            return Err(RecoveryError::Gap {
                dir: dir.to_path_buf(),
                missing: want,
                found: *n,
            });
        }
        want = n + 1;
    }
    Ok(())
}

/// Replay one segment's records into `entries`; returns (records, bytes cut). Damage in
/// the `newest` segment is a torn tail, cut; elsewhere it stops recovery (`later` are the
/// segments after this one, counted in the error).
fn replay(
    path: &Path,
    newest: bool,
    later: &[&(u64, PathBuf)],
    entries: &mut impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(u64, u64), RecoveryError> {
    let bytes = std::fs::read(path).map_err(io_at(path))?;
    let mut recs = record::records(&bytes);
    let mut records = 0;
    for body in recs.by_ref() {
        if body.first() != Some(&RECORD_ENTRIES) {
            let rest = (bytes.len() - recs.valid_len()) as u64;
            return Err(corrupt(path, "a record of an unknown kind", later, rest));
        }
        entries(&body[1..]).map_err(|why| RecoveryError::Apply {
            path: path.to_path_buf(),
            why,
        })?;
        records += 1;
    }
    let Some(damage) = recs.damage() else {
        return Ok((records, 0));
    };
    let valid = recs.valid_len() as u64;
    let dropped = bytes.len() as u64 - valid;
    // A crash tears only the end of the newest segment; good records behind the damage
    // mean the disk changed bytes in the middle.
    let behind = record::whole_record_after(&bytes, damage.at() + 1, SCAN_BYTES_MAX);
    if !newest || behind.is_some() {
        return Err(corrupt(path, &damage.to_string(), later, dropped));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_at(path))?;
    file.set_len(valid).map_err(io_at(path))?;
    file.sync_all().map_err(io_at(path))?;
    tracing::warn!(
        path = %path.display(),
        dropped_bytes = dropped,
        "the log ended in a torn or corrupt record ({damage}); cut back to the last whole record"
    );
    Ok((records, dropped))
}

fn corrupt(path: &Path, why: &str, later: &[&(u64, PathBuf)], rest: u64) -> RecoveryError {
    let after = rest
        + later
            .iter()
            .map(|(_, p)| std::fs::metadata(p).map_or(0, |m| m.len()))
            .sum::<u64>();
    RecoveryError::Corrupt {
        path: path.to_path_buf(),
        why: why.to_string(),
        after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::files::{segment_name, shard_dir, snapshot_name};
    use crate::persist::snapshot::{Header, SnapshotWriter};

    /// Shard 0's directory of a data directory of the test's own, removed when dropped.
    struct Temp(PathBuf);

    impl std::ops::Deref for Temp {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            if let Some(data_dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(data_dir);
            }
        }
    }

    fn temp(name: &str) -> Temp {
        let dir = std::env::temp_dir().join(format!("mkv-recover-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let shard = shard_dir(&dir, 0);
        std::fs::create_dir_all(&shard).unwrap();
        Temp(shard)
    }

    fn segment(dir: &Path, n: u64, bodies: &[&[u8]]) {
        let mut out = Vec::new();
        for b in bodies {
            let mut body = vec![RECORD_ENTRIES];
            body.extend_from_slice(b);
            record::append(&mut out, &body);
        }
        std::fs::write(dir.join(segment_name(n)), out).unwrap();
    }

    fn snapshot(dir: &Path, seq: u64, tag: &[u8]) {
        let header = Header {
            shard: 0,
            shards: 1,
            seq,
            flushed: (0, 0),
        };
        let mut w = SnapshotWriter::create(dir, header).unwrap();
        w.entries(tag, 1).unwrap();
        w.finish([0; 32]).unwrap();
    }

    /// The snapshot chunk loaded, the entries replayed, and the report.
    type Run = (Option<Vec<u8>>, Vec<Vec<u8>>, Recovered);

    /// Recover `dir`.
    fn run(dir: &Path) -> Result<Run, RecoveryError> {
        let mut loaded = None;
        let mut replayed = Vec::new();
        let r = recover(dir, |l| {
            match l {
                Loaded::Snapshot(s) => loaded = Some(s.chunk(0).to_vec()),
                Loaded::Entries(e) => replayed.push(e.to_vec()),
            }
            Ok(())
        })?;
        Ok((loaded, replayed, r))
    }

    #[test]
    fn the_newest_snapshot_then_its_segments_and_the_writer_goes_on_at_the_last() {
        let dir = temp("normal");
        segment(&dir, 1, &[b"old"]);
        snapshot(&dir, 2, b"snap2");
        segment(&dir, 2, &[b"a", b"b"]);
        snapshot(&dir, 3, b"snap3");
        segment(&dir, 3, &[b"c"]);
        segment(&dir, 4, &[b"d"]);
        let (loaded, replayed, r) = run(&dir).unwrap();
        assert_eq!(loaded.as_deref(), Some(&b"snap3"[..]));
        assert_eq!(replayed, [b"c".to_vec(), b"d".to_vec()]);
        let start = ShardStart {
            segment: 4,
            snapshot: Some(3),
        };
        assert_eq!(
            r,
            Recovered {
                start: Some(start),
                records: 2,
                ..Recovered::default()
            }
        );
        // An empty directory starts at segment 1 with nothing to load.
        let empty = temp("empty");
        let (loaded, replayed, r) = run(&empty).unwrap();
        assert_eq!((loaded, replayed.len()), (None, 0));
        assert_eq!(
            r.start,
            Some(ShardStart {
                segment: 1,
                snapshot: None
            })
        );
    }

    #[test]
    fn a_damaged_newest_snapshot_falls_back_to_the_previous_one_and_is_moved_aside() {
        let dir = temp("fallback");
        snapshot(&dir, 2, b"snap2");
        segment(&dir, 2, &[b"a"]);
        snapshot(&dir, 3, b"snap3");
        segment(&dir, 3, &[b"b"]);
        let path = dir.join(snapshot_name(3));
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let (loaded, replayed, r) = run(&dir).unwrap();
        assert_eq!(loaded.as_deref(), Some(&b"snap2"[..]));
        assert_eq!(replayed, [b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(r.bad_snapshots.len(), 1);
        assert!(!path.exists() && path.with_extension("snap.corrupt").exists());
        assert_eq!(r.start.unwrap().snapshot, Some(2));
    }

    #[test]
    fn a_torn_tail_is_cut_at_every_offset_and_recovery_goes_on() {
        let dir = temp("torn");
        segment(&dir, 1, &[b"first", b"second"]);
        let path = dir.join(segment_name(1));
        let whole = std::fs::read(&path).unwrap();
        let second_at = record::HEADER_BYTES + 1 + b"first".len();
        for cut in second_at + 1..whole.len() {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let (_, replayed, r) = run(&dir).unwrap();
            assert_eq!(replayed, [b"first".to_vec()], "cut at {cut}");
            assert_eq!(r.dropped_bytes, (cut - second_at) as u64);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), second_at as u64);
        }
    }

    #[test]
    fn damage_before_the_newest_segment_or_a_missing_segment_refuses_to_start() {
        let dir = temp("corrupt");
        segment(&dir, 1, &[b"one", b"two"]);
        segment(&dir, 2, &[b"three"]);
        let path = dir.join(segment_name(1));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[record::HEADER_BYTES + 2] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = run(&dir).unwrap_err().to_string();
        assert!(
            e.contains("fails its checksum") && e.contains("cannot be trusted"),
            "{e}"
        );

        let gap = temp("gap");
        snapshot(&gap, 2, b"snap");
        segment(&gap, 2, &[b"a"]);
        segment(&gap, 4, &[b"c"]);
        let e = run(&gap).unwrap_err().to_string();
        assert!(e.contains("segment 0000000000000003 is missing"), "{e}");
        // A snapshot whose segment is gone: the log after it is lost.
        let lost = temp("lost");
        snapshot(&lost, 2, b"snap");
        let e = run(&lost).unwrap_err().to_string();
        assert!(
            e.contains("log segment 0000000000000002, where snapshot"),
            "{e}"
        );
        // Without a snapshot that reads back, the log must start at its first segment.
        let pruned = temp("pruned");
        segment(&pruned, 5, &[b"e"]);
        let e = run(&pruned).unwrap_err().to_string();
        assert!(e.contains("segment 0000000000000001 is missing"), "{e}");
    }
}
