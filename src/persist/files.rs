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
        Some(found) => Ok(found),
        None => {
            write_node_file(dir, me)?;
            Ok(me.clone())
        }
    }
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

/// When the files of the `shards` shard directories under `dir` were last modified:
/// when the node last wrote, that is when it went down. `None` without files.
pub fn last_written(dir: &Path, shards: usize) -> Option<std::time::SystemTime> {
    (0..shards)
        .filter_map(|i| std::fs::read_dir(shard_dir(dir, i)).ok())
        .flatten()
        .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
        .max()
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
}
