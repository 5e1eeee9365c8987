//! The data directory: which node and shard count wrote it, and where each shard keeps
//! its log segments and snapshots.
//!
//! ```text
//! <data_dir>/NODE                    "merkle-kv data 1\nnode_id <id>\nshards <n>\n"
//! <data_dir>/shard-<i>/log-<seq>.wal log segments, <seq> = 16 hex digits, ascending
//! <data_dir>/shard-<i>/snap-<seq>.snap a snapshot; replay the segments from <seq> on
//! ```
//!
//! `NODE` is written once, when the directory is first used, and checked at every start:
//! a data directory copied from another node would bring that node's origin and data under
//! this node's name, so it is refused. The shard count in it says how the shard
//! directories were cut, so a node restarted with another count can still read them (and
//! re-routes every key).

use std::io::Write;
use std::path::{Path, PathBuf};

pub const NODE_FILE: &str = "NODE";
const FORMAT_LINE: &str = "merkle-kv data 1";

/// A failed disk operation, with the file it concerned.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{dir} holds the data of node {found:?}, not {want:?}: give this node its own data_dir"
    )]
    ForeignNode {
        dir: PathBuf,
        found: String,
        want: String,
    },
    #[error("{path}: not a MerkleKV data directory file ({why})")]
    BadNodeFile { path: PathBuf, why: String },
    #[error(
        "{path} is missing, but {why}: no crash leaves that, so the data directory lost \
         files; put it back, or move the data directory aside to resynchronise from peers"
    )]
    Missing { path: PathBuf, why: String },
}

/// Attach `path` to an I/O error.
pub fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `NODE` records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub node_id: String,
    pub shards: usize,
}

impl Identity {
    fn render(&self) -> String {
        format!(
            "{FORMAT_LINE}\nnode_id {}\nshards {}\n",
            self.node_id, self.shards
        )
    }

    fn parse(text: &str) -> Result<Identity, String> {
        let mut lines = text.lines();
        if lines.next() != Some(FORMAT_LINE) {
            return Err(format!("the first line is not {FORMAT_LINE:?}"));
        }
        let mut field = |name: &str| {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|v| v.strip_prefix(' '))
                .map(str::to_string)
                .ok_or_else(|| format!("no `{name}` line"))
        };
        let node_id = field("node_id")?;
        let shards = field("shards")?
            .parse::<usize>()
            .ok()
            .filter(|n| n.is_power_of_two() && *n <= crate::limits::SHARDS_MAX)
            .ok_or("`shards` is not a power of two within the limit")?;
        Ok(Identity { node_id, shards })
    }
}

/// Open (creating it if need be) the data directory of node `me`. Returns the identity
/// found in it — the shard count the existing files were written with — or, for a new
/// directory, `me` as written now.
pub fn open(dir: &Path, me: &Identity) -> Result<Identity, PersistError> {
    std::fs::create_dir_all(dir).map_err(io_at(dir))?;
    match read_node_file(dir)? {
        Some(found) if found.node_id != me.node_id => Err(PersistError::ForeignNode {
            dir: dir.to_path_buf(),
            found: found.node_id,
            want: me.node_id.clone(),
        }),
        Some(found) => {
            check_shard_dirs(dir, found.shards)?;
            Ok(found)
        }
        None => {
            // `NODE` is written (and its directory synced) before any shard directory.
            if let Some(shard) = any_shard_dir(dir)? {
                return Err(PersistError::Missing {
                    path: dir.join(NODE_FILE),
                    why: format!("{} exists", shard.display()),
                });
            }
            write_node_file(dir, me)?;
            Ok(me.clone())
        }
    }
}

/// A `shard-<i>` directory in `dir`, if there is one.
fn any_shard_dir(dir: &Path) -> Result<Option<PathBuf>, PersistError> {
    for entry in std::fs::read_dir(dir).map_err(io_at(dir))? {
        let entry = entry.map_err(io_at(dir))?;
        let name = entry.file_name();
        let digits = name.to_str().and_then(|n| n.strip_prefix("shard-"));
        if digits.is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

/// Each of the `shards` shard directories must be there once any holds a record: the
/// writer creates them all (and syncs `dir`) before it writes one, so only a crash
/// before the first write leaves some missing, with nothing in the others.
fn check_shard_dirs(dir: &Path, shards: usize) -> Result<(), PersistError> {
    let dirs: Vec<PathBuf> = (0..shards).map(|i| shard_dir(dir, i)).collect();
    let Some(missing) = dirs.iter().find(|d| !d.is_dir()) else {
        return Ok(());
    };
    for d in dirs.iter().filter(|d| d.is_dir()) {
        let l = list(d)?;
        let written =
            |(n, p): &(u64, PathBuf)| *n != 1 || std::fs::metadata(p).map_or(true, |m| m.len() > 0);
        if !l.snapshots.is_empty() || l.segments.iter().any(written) {
            return Err(PersistError::Missing {
                path: missing.clone(),
                why: format!("{} holds data", d.display()),
            });
        }
    }
    Ok(())
}

/// The identity `dir`'s `NODE` records; `None` when it has none.
pub fn read_node_file(dir: &Path) -> Result<Option<Identity>, PersistError> {
    let path = dir.join(NODE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Identity::parse(&text)
            .map(Some)
            .map_err(|why| PersistError::BadNodeFile { path, why }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at(&path)(e)),
    }
}

/// Record `id` as the directory's identity (after a re-cut to a new shard count, too):
/// written to a temporary file, synced and renamed, so `NODE` is always whole.
pub fn write_node_file(dir: &Path, id: &Identity) -> Result<(), PersistError> {
    let path = dir.join(NODE_FILE);
    let tmp = dir.join(format!("{NODE_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io_at(&tmp))?;
    f.write_all(id.render().as_bytes()).map_err(io_at(&tmp))?;
    f.sync_all().map_err(io_at(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_at(&path))?;
    sync_dir(dir)
}

/// Make a directory's entries (files created, renamed or removed in it) durable.
pub fn sync_dir(dir: &Path) -> Result<(), PersistError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

/// When the node was last seen up: the newest modification time of the files of the
/// `shards` shard directories under `dir` and of `ALIVE` (which a running node touches
/// every [`ALIVE_EVERY`], written or not). `None` without files.
pub fn last_written(dir: &Path, shards: usize) -> Option<std::time::SystemTime> {
    let modified = |p: &Path| std::fs::metadata(p).ok()?.modified().ok();
    (0..shards)
        .filter_map(|i| std::fs::read_dir(shard_dir(dir, i)).ok())
        .flatten()
        .filter_map(|e| modified(&e.ok()?.path()))
        .chain(modified(&dir.join(ALIVE_FILE)))
        .max()
}

/// Touched by a running node, so an idle node does not look down (its log files do not
/// change while nothing is written).
pub const ALIVE_FILE: &str = "ALIVE";
/// How often a running node touches `ALIVE`: well inside the shortest tombstone grace
/// (60 s), so a node that was up never counts as down past it.
pub const ALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Mark the node alive now (creating `ALIVE` if need be). Not synced: a time lost with
/// the page cache makes the node look down longer, which only costs a rejoin.
pub fn touch_alive(dir: &Path) -> Result<(), PersistError> {
    let path = dir.join(ALIVE_FILE);
    std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()))
        .map_err(io_at(&path))
}

/// Present while the node owes a rejoin (docs/PERSISTENCE.md, the rejoin rule): it holds
/// the cut, the time (µs since the epoch) before which its entries cannot be trusted.
pub const REJOIN_FILE: &str = "REJOIN";
const REJOIN_LINE: &str = "merkle-kv rejoin 1";

/// The cut a pending rejoin recorded; `None` when none is pending.
pub fn read_rejoin(dir: &Path) -> Result<Option<u64>, PersistError> {
    let path = dir.join(REJOIN_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_at(&path)(e)),
    };
    let mut lines = text.lines();
    let cut = (lines.next() == Some(REJOIN_LINE))
        .then(|| lines.next()?.strip_prefix("cut_us ")?.parse::<u64>().ok())
        .flatten();
    match cut {
        Some(cut) => Ok(Some(cut)),
        None => Err(PersistError::BadNodeFile {
            path,
            why: format!("not {REJOIN_LINE:?} and a `cut_us <µs>` line"),
        }),
    }
}

/// Record that the node must rejoin, dropping its entries older than `cut_us`: written
/// to a temporary file, synced, renamed, and the directory synced, so a start after any
/// crash finds it whole or not at all.
pub fn write_rejoin(dir: &Path, cut_us: u64) -> Result<(), PersistError> {
    let tmp = dir.join(format!("{REJOIN_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io_at(&tmp))?;
    f.write_all(format!("{REJOIN_LINE}\ncut_us {cut_us}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_at(&tmp))?;
    let path = dir.join(REJOIN_FILE);
    std::fs::rename(&tmp, &path).map_err(io_at(&path))?;
    sync_dir(dir)
}

/// The rejoin is done: remove its marker, durably.
pub fn remove_rejoin(dir: &Path) -> Result<(), PersistError> {
    let path = dir.join(REJOIN_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(&path)(e)),
    }
}

pub fn shard_dir(dir: &Path, shard: usize) -> PathBuf {
    dir.join(format!("shard-{shard}"))
}

pub fn segment_name(seq: u64) -> String {
    format!("log-{seq:016x}.wal")
}

pub fn snapshot_name(seq: u64) -> String {
    format!("snap-{seq:016x}.snap")
}

/// The files of one shard directory, by kind, each sorted by sequence number.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub segments: Vec<(u64, PathBuf)>,
    pub snapshots: Vec<(u64, PathBuf)>,
    /// Files a crash left half made (`*.tmp`): never read, removed at start.
    pub leftovers: Vec<PathBuf>,
}

/// List a shard directory (an absent one is empty). Names that are none of ours are
/// left alone.
pub fn list(shard_dir: &Path) -> Result<Listing, PersistError> {
    let mut out = Listing::default();
    let entries = match std::fs::read_dir(shard_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_at(shard_dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_at(shard_dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if name.ends_with(".tmp") {
            out.leftovers.push(path);
        } else if let Some(seq) = sequence(name, "log-", ".wal") {
            out.segments.push((seq, path));
        } else if let Some(seq) = sequence(name, "snap-", ".snap") {
            out.snapshots.push((seq, path));
        }
    }
    out.segments.sort();
    out.snapshots.sort();
    out.leftovers.sort();
    Ok(out)
}

/// Whether `name` is a log segment's or a snapshot's (the files a backup holds).
pub fn is_log_or_snapshot(name: &str) -> bool {
    sequence(name, "log-", ".wal").is_some() || sequence(name, "snap-", ".snap").is_some()
}

fn sequence(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let hex = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mkv-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn me(node_id: &str, shards: usize) -> Identity {
        Identity {
            node_id: node_id.into(),
            shards,
        }
    }

    #[test]
    fn a_new_directory_takes_the_node_and_later_starts_read_it_back() {
        let dir = temp("new");
        assert_eq!(open(&dir, &me("n1", 4)).unwrap(), me("n1", 4));
        // Restarted with another shard count: the files were cut in 4.
        assert_eq!(open(&dir, &me("n1", 2)).unwrap(), me("n1", 4));
        write_node_file(&dir, &me("n1", 2)).unwrap();
        assert_eq!(open(&dir, &me("n1", 8)).unwrap(), me("n1", 2));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_nodes_directory_or_a_garbled_node_file_is_refused() {
        let dir = temp("foreign");
        open(&dir, &me("n1", 1)).unwrap();
        let e = open(&dir, &me("n2", 1)).unwrap_err();
        assert!(
            e.to_string()
                .contains("holds the data of node \"n1\", not \"n2\""),
            "{e}"
        );
        for bad in [
            "",
            "merkle-kv data 1\nnode_id n1\nshards 3\n",
            "something else\n",
        ] {
            std::fs::write(dir.join(NODE_FILE), bad).unwrap();
            let e = open(&dir, &me("n1", 1)).unwrap_err();
            assert!(
                matches!(e, PersistError::BadNodeFile { .. }),
                "{bad:?}: {e}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_listing_sorts_by_sequence_and_ignores_foreign_names() {
        let dir = temp("list");
        let shard = shard_dir(&dir, 3);
        assert_eq!(list(&shard).unwrap(), Listing::default());
        std::fs::create_dir_all(&shard).unwrap();
        for name in [
            segment_name(10),
            segment_name(2),
            snapshot_name(9),
            "snap-0000000000000009.snap.tmp".to_string(),
            "log-12.wal".to_string(),
            "notes.txt".to_string(),
        ] {
            std::fs::write(shard.join(name), b"x").unwrap();
        }
        let l = list(&shard).unwrap();
        let seqs = |v: &[(u64, PathBuf)]| v.iter().map(|(s, _)| *s).collect::<Vec<_>>();
        assert_eq!(seqs(&l.segments), [2, 10]);
        assert_eq!(seqs(&l.snapshots), [9]);
        assert_eq!(l.leftovers.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rejoin_marker_reads_back_its_cut_until_removed_and_a_garbled_one_is_refused() {
        let dir = temp("rejoin");
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(read_rejoin(&dir).unwrap(), None);
        write_rejoin(&dir, 1_800_000_000_123_456).unwrap();
        assert_eq!(read_rejoin(&dir).unwrap(), Some(1_800_000_000_123_456));
        assert!(!dir.join("REJOIN.tmp").exists());
        remove_rejoin(&dir).unwrap();
        assert_eq!(read_rejoin(&dir).unwrap(), None);
        remove_rejoin(&dir).unwrap(); // already gone: nothing to do
        std::fs::write(dir.join(REJOIN_FILE), "merkle-kv rejoin 1\ncut_us soon\n").unwrap();
        let e = read_rejoin(&dir).unwrap_err();
        assert!(e.to_string().contains("cut_us"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_node_was_last_up_when_its_newest_file_or_alive_was_written() {
        let dir = temp("alive");
        let shard = shard_dir(&dir, 1);
        std::fs::create_dir_all(&shard).unwrap();
        assert_eq!(last_written(&dir, 2), None);
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let seg = std::fs::File::create(shard.join(segment_name(1))).unwrap();
        seg.set_modified(hour_ago).unwrap();
        assert_eq!(last_written(&dir, 2), Some(hour_ago));
        // Up but idle since: ALIVE says so.
        touch_alive(&dir).unwrap();
        let alive = std::fs::metadata(dir.join(ALIVE_FILE))
            .unwrap()
            .modified()
            .unwrap();
        assert!(alive > hour_ago);
        assert_eq!(last_written(&dir, 2), Some(alive));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_node_file_or_shard_directory_is_refused_unless_a_crash_can_leave_it() {
        let dir = temp("missing");
        // A crash before any shard directory (or between them) was made: starts.
        open(&dir, &me("n1", 2)).unwrap();
        std::fs::create_dir_all(shard_dir(&dir, 0)).unwrap();
        std::fs::write(shard_dir(&dir, 0).join(segment_name(1)), b"").unwrap();
        assert_eq!(open(&dir, &me("n1", 2)).unwrap(), me("n1", 2));
        // Shard 0 holds a record, shard 1's directory is gone: refused, naming it.
        std::fs::write(shard_dir(&dir, 0).join(segment_name(1)), b"x").unwrap();
        let e = open(&dir, &me("n1", 2)).unwrap_err().to_string();
        assert!(
            e.contains("shard-1 is missing, but") && e.contains("shard-0 holds data"),
            "{e}"
        );
        std::fs::create_dir_all(shard_dir(&dir, 1)).unwrap();
        open(&dir, &me("n1", 2)).unwrap();
        // NODE gone with shard directories there: refused, not rewritten.
        std::fs::remove_file(dir.join(NODE_FILE)).unwrap();
        let e = open(&dir, &me("n1", 1)).unwrap_err().to_string();
        assert!(
            e.contains("NODE is missing, but") && e.contains("shard-"),
            "{e}"
        );
        assert!(!dir.join(NODE_FILE).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
