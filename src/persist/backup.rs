//! Backups (docs/PERSISTENCE.md, "Backups and restore"): the files the disk writer froze
//! at one point of every shard's log, copied with a `MANIFEST` of sizes and checksums
//! into `<backup_dir>/<UTC time>/`; the pruning of old backups; and the restore, which
//! checks a backup against its manifest and installs it into an empty data directory.
//! File work only: the node decides when, and runs it on a thread of its own.

use crate::persist::files::{
    io_at, is_log_or_snapshot, read_node_file, sync_dir, Identity, PersistError, NODE_FILE,
};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MANIFEST: &str = "MANIFEST";
const MANIFEST_LINE: &str = "merkle-kv backup 1";
/// Longest manifest read: a file's line is under 120 bytes, so over 100,000 files fit.
const MANIFEST_BYTES_MAX: u64 = 16 << 20;
/// A backup being written ends in this; a crash leaves it under a name no complete one
/// has.
const PARTIAL: &str = ".partial";
/// A restore's staging copy, inside the data directory: on its file system, so each
/// checked item moves into place with a rename, even when the data directory is a mount
/// point. Only a restore makes it, and nothing in it is not also in the backup.
const STAGING: &str = ".restore.partial";
/// A file system's own directory at its root: a data directory on a disk of its own
/// holds it.
const LOST_FOUND: &str = "lost+found";
/// Bytes read and written at a time while copying.
const COPY_CHUNK_BYTES: usize = 1 << 20;

/// One file of a data directory, opened by the disk writer, and how much of it the
/// backup holds.
pub struct FrozenFile {
    /// Its path under the data directory: `NODE`, `shard-0/log-….wal`.
    pub name: String,
    pub file: File,
    /// Bytes to copy: whole records, as the writer had written them when it froze the
    /// log; what it appends later is not copied.
    pub len: u64,
}

/// A file as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    name: String,
    len: u64,
    blake3: blake3::Hash,
}

/// A backup's `MANIFEST`: when it was taken, and every file it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Manifest {
    /// The backup's directory name: its UTC time.
    created: String,
    files: Vec<Listed>,
}

impl Manifest {
    fn render(&self) -> String {
        let mut out = format!("{MANIFEST_LINE}\ncreated {}\n", self.created);
        for f in &self.files {
            out.push_str(&format!(
                "file {} {} {}\n",
                f.len,
                f.blake3.to_hex(),
                f.name
            ));
        }
        out.push_str(&format!("end {}\n", self.files.len()));
        out
    }

    fn parse(text: &str) -> Result<Manifest, String> {
        let mut lines = text.lines();
        if lines.next() != Some(MANIFEST_LINE) {
            return Err(format!("the first line is not {MANIFEST_LINE:?}"));
        }
        let created = lines
            .next()
            .and_then(|l| l.strip_prefix("created "))
            .filter(|t| parse_timestamp(t).is_some())
            .ok_or("no `created <time>` line")?
            .to_string();
        let mut files = Vec::new();
        let mut names = BTreeSet::new();
        loop {
            let line = lines
                .next()
                .ok_or("no `end` line: the manifest is cut short")?;
            if let Some(n) = line.strip_prefix("end ") {
                if n.parse() != Ok(files.len()) {
                    return Err(format!("`{line}`, but {} files are listed", files.len()));
                }
                break;
            }
            let listed = parse_file_line(line)?;
            if !names.insert(listed.name.clone()) {
                return Err(format!("{} is listed twice", listed.name));
            }
            files.push(listed);
        }
        if lines.next().is_some() {
            return Err("lines after `end`".into());
        }
        if !names.contains(NODE_FILE) {
            return Err(format!("{NODE_FILE} is not listed"));
        }
        Ok(Manifest { created, files })
    }
}

/// `file <bytes> <blake3 hex> <name>`, the name one of a data directory's own.
fn parse_file_line(line: &str) -> Result<Listed, String> {
    let bad = || format!("`{line}` is not `file <bytes> <blake3> <name>`");
    let mut parts = line.splitn(4, ' ');
    if parts.next() != Some("file") {
        return Err(bad());
    }
    let len = parts.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
    let blake3 = parts
        .next()
        .and_then(|h| blake3::Hash::from_hex(h).ok())
        .ok_or_else(bad)?;
    let name = parts.next().ok_or_else(bad)?.to_string();
    // Only names a data directory holds: a manifest cannot send a restore elsewhere.
    let ours = name == NODE_FILE
        || name
            .split_once('/')
            .is_some_and(|(dir, file)| is_shard_dir(dir) && is_log_or_snapshot(file));
    if !ours {
        return Err(format!("{name:?} is not a data directory file"));
    }
    Ok(Listed { name, len, blake3 })
}

/// What a backup or a restore could not do.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Disk(#[from] PersistError),
    #[error("{path}: not a MerkleKV backup manifest ({why})")]
    BadManifest { path: PathBuf, why: String },
    #[error("{path}: {why}")]
    Damaged { path: PathBuf, why: String },
    #[error(
        "{dir} is not empty: a restore installs only into an empty or absent data_dir \
         (move it aside first)"
    )]
    NotEmpty { dir: PathBuf },
    #[error(
        "{from} is a backup of node {found:?}, and this configuration's node_id is {want:?}: \
         restore it with that node's configuration"
    )]
    ForeignNode {
        from: PathBuf,
        found: String,
        want: String,
    },
    #[error(
        "{from} holds {found} shards and this configuration runs {want}: set storage.shards \
         = {found}"
    )]
    Shards {
        from: PathBuf,
        found: usize,
        want: usize,
    },
}

/// Copy `frozen` into a new backup under `backup_dir`, named by `now` (UTC): written as
/// `.<time>.partial`, every file and the `MANIFEST` synced, then renamed to `<time>`,
/// so a directory with a time for a name is always a whole backup. Returns its path.
pub fn write(
    frozen: Vec<FrozenFile>,
    backup_dir: &Path,
    now: SystemTime,
) -> Result<PathBuf, BackupError> {
    std::fs::create_dir_all(backup_dir).map_err(io_at(backup_dir))?;
    remove_partials(backup_dir);
    let name = timestamp(now);
    let partial = backup_dir.join(format!(".{name}{PARTIAL}"));
    std::fs::create_dir(&partial).map_err(io_at(&partial))?;
    let manifest = match copy_frozen(frozen, &partial, name) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    let done = backup_dir.join(&manifest.created);
    std::fs::rename(&partial, &done).map_err(io_at(&done))?;
    sync_dir(backup_dir)?;
    Ok(done)
}

/// Copy `frozen` into `partial` and write the `MANIFEST` last, everything synced.
fn copy_frozen(
    frozen: Vec<FrozenFile>,
    partial: &Path,
    created: String,
) -> Result<Manifest, BackupError> {
    let mut files = Vec::with_capacity(frozen.len());
    for f in frozen {
        let to = partial.join(&f.name);
        let (len, blake3) = copy(f.file.take(f.len), Path::new(&f.name), &to)?;
        if len != f.len {
            return Err(BackupError::Damaged {
                path: PathBuf::from(&f.name),
                why: format!("{len} bytes read, the log had written {}", f.len),
            });
        }
        files.push(Listed {
            name: f.name,
            len,
            blake3,
        });
    }
    sync_dirs(partial, &files)?;
    let manifest = Manifest { created, files };
    write_synced(partial, MANIFEST, manifest.render().as_bytes())?;
    Ok(manifest)
}

/// Remove the oldest complete backups in `backup_dir` beyond the newest `retain`;
/// returns those removed. Only directories named by a time and holding a `MANIFEST`
/// count: anything else there is left alone.
pub fn prune(backup_dir: &Path, retain: usize) -> Result<Vec<PathBuf>, PersistError> {
    let mut complete = complete(backup_dir)?;
    let excess = complete.len().saturating_sub(retain);
    let old: Vec<PathBuf> = complete.drain(..excess).collect();
    for p in &old {
        std::fs::remove_dir_all(p).map_err(io_at(p))?;
    }
    Ok(old)
}

/// When the newest complete backup in `backup_dir` was taken (its name); `None` when
/// there is none (or no readable `backup_dir`).
pub fn newest(backup_dir: &Path) -> Option<SystemTime> {
    let newest = complete(backup_dir).ok()?.pop()?;
    parse_timestamp(newest.file_name()?.to_str()?)
}

/// The complete backups in `backup_dir`, oldest first: directories named by a time
/// that hold a `MANIFEST`.
fn complete(backup_dir: &Path) -> Result<Vec<PathBuf>, PersistError> {
    let mut complete: Vec<PathBuf> = std::fs::read_dir(backup_dir)
        .map_err(io_at(backup_dir))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(is_timestamp))
        .map(|e| e.path())
        .filter(|p| p.join(MANIFEST).is_file())
        .collect();
    // The names are times of fixed width: their order is their age.
    complete.sort();
    Ok(complete)
}

/// Backups a crash left half written: only one runs at a time per node, and
/// `backup_dir` is the node's own, so any found when one starts is dead.
fn remove_partials(backup_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(backup_dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let stale = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(PARTIAL))
            .is_some_and(is_timestamp);
        if stale {
            tracing::warn!(path = %e.path().display(), "removing a backup a crash left half written");
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(path = %e.path().display(), "cannot remove: {err}");
            }
        }
    }
}

/// What a restore installed.
#[derive(Debug)]
pub struct Restored {
    pub created: String,
    pub files: usize,
    pub bytes: u64,
    pub identity: Identity,
}

/// Check the backup in `from` against its manifest and install it as `data_dir`, which
/// must be absent or empty, for node `want` (same node id and shard count). The data
/// directory may hold the backup directory `backup_dir` (by default it does), which
/// stays where it is, a file system's `lost+found`, and what an interrupted restore left
/// (removed first). The files are copied, checked while copied, into a staging
/// directory inside `data_dir` — on its file system, even when `data_dir` is a mount
/// point — and moved into place only when every file matched, `NODE` last: a failed
/// restore installs nothing.
pub fn restore(
    from: &Path,
    data_dir: &Path,
    backup_dir: &Path,
    want: &Identity,
) -> Result<Restored, BackupError> {
    let manifest = read_manifest(from)?;
    let identity = read_node_file(from)?.ok_or_else(|| BackupError::Damaged {
        path: from.join(NODE_FILE),
        why: "missing".into(),
    })?;
    if identity.node_id != want.node_id {
        return Err(BackupError::ForeignNode {
            from: from.to_path_buf(),
            found: identity.node_id,
            want: want.node_id.clone(),
        });
    }
    if identity.shards != want.shards {
        return Err(BackupError::Shards {
            from: from.to_path_buf(),
            found: identity.shards,
            want: want.shards,
        });
    }
    let keep = kept_entry(data_dir, backup_dir);
    let leftover = check_empty(data_dir, keep.as_deref())?;
    if !leftover.is_empty() {
        tracing::warn!(dir = %data_dir.display(), "removing what an interrupted restore left");
        clear(data_dir, &leftover)?;
    }
    let created = !data_dir.exists();
    std::fs::create_dir_all(data_dir).map_err(io_at(data_dir))?;
    let stage = data_dir.join(STAGING);
    let installed = std::fs::create_dir(&stage)
        .map_err(|e| io_at(&stage)(e).into())
        .and_then(|()| copy_checked(from, &manifest, &stage))
        .and_then(|bytes| install(&stage, data_dir, &manifest).map(|()| bytes));
    let bytes = match installed {
        Ok(bytes) => bytes,
        Err(e) => {
            // Back to what it was: no shard directory of this restore, no staging, and
            // no data directory if there was none.
            let _ = clear(data_dir, &restored_entries(data_dir));
            if created {
                let _ = std::fs::remove_dir(data_dir);
            }
            return Err(e);
        }
    };
    if created {
        sync_dir(&parent_of(data_dir))?;
    }
    Ok(Restored {
        created: manifest.created,
        files: manifest.files.len(),
        bytes,
        identity,
    })
}

/// Move every shard directory of the checked copy in `stage` into `data_dir`, then
/// `NODE`, each a rename on one file system, and remove the emptied `stage`. Until
/// `NODE` is there the directory is no node's (a start refuses shard directories
/// without it, and the next restore clears them); from then on it is the backup's.
fn install(stage: &Path, data_dir: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    let shards: BTreeSet<&str> = manifest
        .files
        .iter()
        .filter_map(|f| f.name.split_once('/').map(|(dir, _)| dir))
        .collect();
    for dir in shards {
        let to = data_dir.join(dir);
        std::fs::rename(stage.join(dir), &to).map_err(io_at(&to))?;
    }
    sync_dir(data_dir)?;
    let node = data_dir.join(NODE_FILE);
    std::fs::rename(stage.join(NODE_FILE), &node).map_err(io_at(&node))?;
    sync_dir(data_dir)?;
    std::fs::remove_dir(stage).map_err(io_at(stage))?;
    sync_dir(data_dir)?;
    Ok(())
}

fn read_manifest(from: &Path) -> Result<Manifest, BackupError> {
    let path = from.join(MANIFEST);
    let file = File::open(&path).map_err(io_at(&path))?;
    let mut text = String::new();
    file.take(MANIFEST_BYTES_MAX + 1)
        .read_to_string(&mut text)
        .map_err(io_at(&path))?;
    if text.len() as u64 > MANIFEST_BYTES_MAX {
        let why = format!("longer than {MANIFEST_BYTES_MAX} bytes");
        return Err(BackupError::BadManifest { path, why });
    }
    Manifest::parse(&text).map_err(|why| BackupError::BadManifest { path, why })
}

/// Copy every file the manifest lists from `from` into `stage`, checking its size and
/// checksum; the bytes copied.
fn copy_checked(from: &Path, manifest: &Manifest, stage: &Path) -> Result<u64, BackupError> {
    let mut bytes = 0;
    // Checked when the manifest was read.
    let taken = parse_timestamp(&manifest.created).unwrap_or(UNIX_EPOCH);
    for f in &manifest.files {
        let path = from.join(&f.name);
        let file = File::open(&path).map_err(io_at(&path))?;
        let to = stage.join(&f.name);
        // One byte past the listed size tells a longer file from an exact one.
        let (len, blake3) = copy(file.take(f.len + 1), &path, &to)?;
        // A node reads when it went down from its files' times (the rejoin rule after
        // a downtime past the tombstone grace): a restored backup was last up when it
        // was taken — its MANIFEST says when, whatever copies of it did to the times.
        File::options()
            .write(true)
            .open(&to)
            .and_then(|f| f.set_modified(taken))
            .map_err(io_at(&to))?;
        let why = if len != f.len {
            format!("{len} bytes, the MANIFEST says {}", f.len)
        } else if blake3 != f.blake3 {
            "its checksum differs from the MANIFEST's: the file is damaged".into()
        } else {
            bytes += len;
            continue;
        };
        let why = format!("{why}; nothing was restored");
        return Err(BackupError::Damaged { path, why });
    }
    sync_dirs(stage, &manifest.files)?;
    Ok(bytes)
}

/// Copy `from` (named `from_path` in errors) to a new file `to`, creating its
/// directory, and sync it; the bytes copied and their BLAKE3 hash.
fn copy(
    mut from: impl Read,
    from_path: &Path,
    to: &Path,
) -> Result<(u64, blake3::Hash), PersistError> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(io_at(dir))?;
    }
    let mut out = File::create(to).map_err(io_at(to))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0; COPY_CHUNK_BYTES];
    let mut len = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_at(from_path)(e)),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_at(to))?;
        len += n as u64;
    }
    out.sync_all().map_err(io_at(to))?;
    Ok((len, hasher.finalize()))
}

/// Make the entries of `root` and of every directory of `files` under it durable.
fn sync_dirs(root: &Path, files: &[Listed]) -> Result<(), PersistError> {
    let dirs: BTreeSet<PathBuf> = files
        .iter()
        .filter_map(|f| root.join(&f.name).parent().map(Path::to_path_buf))
        .collect();
    for d in dirs.iter().filter(|d| d.as_path() != root) {
        sync_dir(d)?;
    }
    sync_dir(root)
}

fn write_synced(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), PersistError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
    f.write_all(bytes).map_err(io_at(&tmp))?;
    f.sync_all().map_err(io_at(&tmp))?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).map_err(io_at(&path))?;
    sync_dir(dir)
}

/// The entry of `data_dir` that `backup_dir` lies in, if it lies in it.
fn kept_entry(data_dir: &Path, backup_dir: &Path) -> Option<PathBuf> {
    match backup_dir.strip_prefix(data_dir).ok()?.components().next() {
        Some(Component::Normal(entry)) => Some(entry.into()),
        _ => None,
    }
}

/// The entries of `data_dir` that keep a restore out: any but the kept one, a file
/// system's `lost+found`, and what an interrupted restore left. Returns the latter —
/// the staging directory and the shard directories it had moved in — to be removed:
/// a data directory with the staging directory and without `NODE` is one no node has
/// run on since (a node refuses shard directories without `NODE`, and writes `NODE`
/// before anything else in a new one), so its shard directories are the restore's.
fn check_empty(data_dir: &Path, keep: Option<&Path>) -> Result<Vec<PathBuf>, BackupError> {
    let entries = match std::fs::read_dir(data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_at(data_dir)(e).into()),
    };
    let not_empty = || BackupError::NotEmpty {
        dir: data_dir.to_path_buf(),
    };
    let (mut staging, mut shards) = (false, Vec::new());
    for e in entries {
        let e = e.map_err(io_at(data_dir))?;
        let name = e.file_name();
        let dir = e.file_type().map_err(io_at(data_dir))?.is_dir();
        if keep == Some(Path::new(&name)) || (dir && name == LOST_FOUND) {
            continue;
        }
        match name.to_str() {
            Some(STAGING) if dir => staging = true,
            Some(n) if dir && is_shard_dir(n) => shards.push(e.path()),
            _ => return Err(not_empty()),
        }
    }
    if !staging {
        return match shards.is_empty() {
            true => Ok(Vec::new()),
            false => Err(not_empty()),
        };
    }
    shards.push(data_dir.join(STAGING));
    Ok(shards)
}

/// The shard directories and the staging directory a restore may have put in
/// `data_dir`, when `NODE` is not there yet (once it is, the restore is done).
fn restored_entries(data_dir: &Path) -> Vec<PathBuf> {
    if data_dir.join(NODE_FILE).exists() {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(is_shard_dir))
        .map(|e| e.path())
        .collect();
    out.push(data_dir.join(STAGING));
    out
}

/// Remove `entries` (directories of `data_dir`) in order — the staging directory, which
/// marks them as a restore's, last — and make it durable.
fn clear(data_dir: &Path, entries: &[PathBuf]) -> Result<(), PersistError> {
    for p in entries {
        match std::fs::remove_dir_all(p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_at(p)(e)),
            _ => {}
        }
    }
    sync_dir(data_dir)
}

fn is_shard_dir(name: &str) -> bool {
    name.strip_prefix("shard-")
        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
}

fn parent_of(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `now` in UTC to the microsecond, `YYYYMMDDTHHMMSS.ffffffZ`: sorts by age as text.
fn timestamp(now: SystemTime) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}.{:06}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        since.subsec_micros()
    )
}

fn is_timestamp(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 23
        && b.iter().enumerate().all(|(i, c)| match i {
            8 => *c == b'T',
            15 => *c == b'.',
            22 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// The time a [`timestamp`] names; `None` for a name that is none or no real time.
fn parse_timestamp(name: &str) -> Option<SystemTime> {
    if !is_timestamp(name) {
        return None;
    }
    let num = |from: usize, to: usize| name[from..to].parse::<u32>().ok();
    let (y, m, d) = (num(0, 4)?, num(4, 6)?, num(6, 8)?);
    let (h, min, sec, micros) = (num(9, 11)?, num(11, 13)?, num(13, 15)?, num(16, 22)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 || min > 59 || sec > 59 {
        return None;
    }
    let days = u64::try_from(days_from_civil(i64::from(y), m, d)).ok()?;
    let secs = days * 86_400 + u64::from(h * 3600 + min * 60 + sec);
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(u64::from(micros)))
}

/// Days since 1970-01-01 of a proleptic Gregorian date: [`civil_from_days`] reversed.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of `days` since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::files::write_node_file;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mkv-backup-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn me(node_id: &str) -> Identity {
        Identity {
            node_id: node_id.into(),
            shards: 2,
        }
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A data directory of node `n1` with two shards, and what a backup of all of it is.
    fn data_dir(dir: &Path) -> Vec<FrozenFile> {
        std::fs::create_dir_all(dir).unwrap();
        write_node_file(dir, &me("n1")).unwrap();
        let names = [
            "shard-0/log-0000000000000001.wal",
            "shard-0/snap-0000000000000002.snap",
            "shard-1/log-0000000000000001.wal",
        ];
        for (i, name) in names.iter().enumerate() {
            std::fs::create_dir_all(dir.join(name).parent().unwrap()).unwrap();
            std::fs::write(dir.join(name), vec![i as u8; 1000 * (i + 1)]).unwrap();
        }
        [NODE_FILE]
            .iter()
            .chain(&names)
            .map(|n| frozen(dir, n))
            .collect()
    }

    fn frozen(dir: &Path, name: &str) -> FrozenFile {
        let file = File::open(dir.join(name)).unwrap();
        let len = file.metadata().unwrap().len();
        FrozenFile {
            name: name.into(),
            file,
            len,
        }
    }

    fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                out.extend(
                    tree(&p)
                        .into_iter()
                        .map(|(n, b)| (format!("{name}/{n}"), b)),
                );
            } else {
                out.push((name, std::fs::read(&p).unwrap()));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn timestamps_are_utc_to_the_microsecond_and_sort_by_age() {
        assert_eq!(timestamp(UNIX_EPOCH), "19700101T000000.000000Z");
        assert_eq!(timestamp(at(1_700_000_000)), "20231114T221320.000000Z");
        // A leap day, and a century that is one.
        assert_eq!(timestamp(at(951_782_400)), "20000229T000000.000000Z");
        let t = at(4_102_444_799) + Duration::from_micros(999_999);
        assert_eq!(timestamp(t), "20991231T235959.999999Z");
        assert!(is_timestamp(&timestamp(t)));
        for t in [UNIX_EPOCH, at(951_782_400), at(1_700_000_000), t] {
            assert_eq!(parse_timestamp(&timestamp(t)), Some(t));
        }
        assert_eq!(parse_timestamp("20991331T235959.999999Z"), None);
        assert_eq!(parse_timestamp("20991231T245959.999999Z"), None);
        for bad in [
            "20991231T235959.999999",
            "20991231T235959Z",
            "2099123xT235959.999999Z",
        ] {
            assert!(!is_timestamp(bad), "{bad}");
        }
    }

    #[test]
    fn a_manifest_reads_back_and_one_that_is_cut_or_points_elsewhere_is_refused() {
        let listed = |name: &str| Listed {
            name: name.into(),
            len: 7,
            blake3: blake3::hash(name.as_bytes()),
        };
        let m = Manifest {
            created: timestamp(at(1)),
            files: vec![listed("NODE"), listed("shard-3/log-0000000000000001.wal")],
        };
        let text = m.render();
        assert_eq!(Manifest::parse(&text), Ok(m.clone()));
        let cut = &text[..text.find("end").unwrap()];
        let cases = [
            (cut.to_string(), "cut short"),
            (text.replace("end 2", "end 3"), "but 2 files are listed"),
            (
                text.replace("shard-3/log", "shard-3/../log"),
                "not a data directory file",
            ),
            (
                text.replace("shard-3/log-0000000000000001.wal", "../NODE"),
                "not a data directory",
            ),
            (text.replace("file 7 ", "file x "), "is not `file <bytes>"),
            (
                text.replace(" NODE\n", " shard-0/snap-0000000000000001.snap\n"),
                "NODE is not listed",
            ),
            (
                format!("{text}file 7 {} NODE\n", blake3::hash(b"")),
                "lines after",
            ),
            (
                text.replacen("merkle-kv backup 1", "merkle-kv backup 2", 1),
                "first line",
            ),
        ];
        for (bad, why) in cases {
            let e = Manifest::parse(&bad).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn a_backup_restores_into_an_absent_data_dir_file_for_file() {
        let root = temp("roundtrip");
        let (data, backups, restored) = (root.join("d"), root.join("b"), root.join("r"));
        let frozen = data_dir(&data);
        let backup = write(frozen, &backups, at(60)).unwrap();
        assert_eq!(backup, backups.join("19700101T000100.000000Z"));
        let text = std::fs::read_to_string(backup.join(MANIFEST)).unwrap();
        assert!(text.lines().any(|l| l.ends_with(" NODE")), "{text}");
        let r = restore(&backup, &restored, &backups, &me("n1")).unwrap();
        let node = std::fs::metadata(data.join(NODE_FILE)).unwrap().len();
        assert_eq!((r.files, r.bytes, r.identity), (4, 6000 + node, me("n1")));
        assert_eq!(tree(&restored), tree(&data));
        let name = "shard-0/log-0000000000000001.wal";
        let modified = |dir: &Path| {
            std::fs::metadata(dir.join(name))
                .unwrap()
                .modified()
                .unwrap()
        };
        // The backup copied elsewhere, its times changed: restored files are dated when
        // the backup was taken (its MANIFEST's `created`), not restored or copied.
        std::fs::File::options()
            .write(true)
            .open(backup.join(name))
            .unwrap()
            .set_modified(at(7))
            .unwrap();
        std::fs::remove_dir_all(&restored).unwrap();
        restore(&backup, &restored, &backups, &me("n1")).unwrap();
        assert_eq!(modified(&restored), at(60), "the time it was taken");
        // Nothing of the staging copy is left beside it.
        let mut left: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["b", "d", "r"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_damaged_backup_names_the_file_and_installs_nothing() {
        let root = temp("damaged");
        let (data, backups, restored) = (root.join("d"), root.join("b"), root.join("r"));
        let backup = write(data_dir(&data), &backups, at(0)).unwrap();
        let victim = backup.join("shard-0/snap-0000000000000002.snap");
        let mut bytes = std::fs::read(&victim).unwrap();
        bytes[500] ^= 0x40;
        std::fs::write(&victim, &bytes).unwrap();
        let e = restore(&backup, &restored, &backups, &me("n1")).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.contains("shard-0/snap-0000000000000002.snap: its checksum differs"),
            "{shown}"
        );
        assert!(!restored.exists());
        bytes.push(0);
        std::fs::write(&victim, &bytes).unwrap();
        let e = restore(&backup, &restored, &backups, &me("n1")).unwrap_err();
        assert!(
            e.to_string().contains("2001 bytes, the MANIFEST says 2000"),
            "{e}"
        );
        std::fs::remove_file(&victim).unwrap();
        let e = restore(&backup, &restored, &backups, &me("n1")).unwrap_err();
        assert!(e.to_string().contains("snap-0000000000000002.snap"), "{e}");
        assert!(!restored.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_restore_refuses_a_used_data_dir_and_another_nodes_backup() {
        let root = temp("refused");
        let (data, backups) = (root.join("d"), root.join("d/backups"));
        let backup = write(data_dir(&data), &backups, at(0)).unwrap();
        let e = restore(&backup, &data, &backups, &me("n1")).unwrap_err();
        assert!(matches!(e, BackupError::NotEmpty { .. }), "{e}");
        let e = restore(&backup, &root.join("x"), &backups, &me("n2")).unwrap_err();
        assert!(
            e.to_string()
                .contains("is a backup of node \"n1\", and this configuration's node_id is \"n2\""),
            "{e}"
        );
        let four = Identity {
            shards: 4,
            ..me("n1")
        };
        let e = restore(&backup, &root.join("x"), &backups, &four).unwrap_err();
        assert!(e.to_string().contains("set storage.shards = 2"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_data_dir_holding_only_its_backups_is_restored_into_and_keeps_them() {
        let root = temp("inside");
        let (data, backups) = (root.join("d"), root.join("d/backups"));
        let frozen = data_dir(&data);
        let want = tree(&data);
        let backup = write(frozen, &backups, at(0)).unwrap();
        let kept = tree(&backups);
        for e in std::fs::read_dir(&data).unwrap() {
            let p = e.unwrap().path();
            if p != backups {
                let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
            }
        }
        restore(&backup, &data, &backups, &me("n1")).unwrap();
        assert_eq!(tree(&backups), kept);
        let restored: Vec<_> = tree(&data)
            .into_iter()
            .filter(|(n, _)| !n.starts_with("backups/"))
            .collect();
        assert_eq!(restored, want);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_restore_clears_what_an_interrupted_one_left_and_a_failed_one_leaves_nothing() {
        let root = temp("interrupted");
        let (data, backups) = (root.join("d"), root.join("d/backups"));
        let frozen = data_dir(&data);
        let want = tree(&data);
        let backup = write(frozen, &backups, at(0)).unwrap();
        let kept = tree(&backups);
        let only_backups = |data: &Path| {
            for e in std::fs::read_dir(data).unwrap() {
                let p = e.unwrap().path();
                if p != backups {
                    let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
                }
            }
        };
        only_backups(&data);
        // Cut short while installing: one shard directory moved in, no NODE yet.
        std::fs::create_dir_all(data.join(STAGING).join("shard-1")).unwrap();
        std::fs::write(data.join(STAGING).join("NODE"), "half").unwrap();
        std::fs::create_dir_all(data.join("shard-0")).unwrap();
        std::fs::write(data.join("shard-0/log-0000000000000001.wal"), "half").unwrap();
        // A file system's own directory, as on a disk mounted as data_dir.
        std::fs::create_dir(data.join(LOST_FOUND)).unwrap();
        restore(&backup, &data, &backups, &me("n1")).unwrap();
        let restored: Vec<_> = tree(&data)
            .into_iter()
            .filter(|(n, _)| !n.starts_with("backups/"))
            .collect();
        assert_eq!(restored, want);
        assert!(data.join(LOST_FOUND).is_dir() && !data.join(STAGING).exists());
        assert_eq!(tree(&backups), kept);

        // Shard directories without the staging one, or NODE beside it: not a restore's.
        only_backups(&data);
        std::fs::create_dir(data.join("shard-0")).unwrap();
        let e = restore(&backup, &data, &backups, &me("n1")).unwrap_err();
        assert!(matches!(e, BackupError::NotEmpty { .. }), "{e}");
        std::fs::create_dir(data.join(STAGING)).unwrap();
        std::fs::write(data.join(NODE_FILE), "").unwrap();
        let e = restore(&backup, &data, &backups, &me("n1")).unwrap_err();
        assert!(matches!(e, BackupError::NotEmpty { .. }), "{e}");

        // A damaged backup leaves the data directory as it was: its backups only.
        only_backups(&data);
        let victim = backup.join("shard-1/log-0000000000000001.wal");
        std::fs::write(&victim, vec![9u8; 3000]).unwrap();
        let e = restore(&backup, &data, &backups, &me("n1")).unwrap_err();
        assert!(e.to_string().contains("checksum differs"), "{e}");
        let left: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(left, [backups]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn pruning_keeps_the_newest_complete_backups_and_nothing_else_is_touched() {
        let root = temp("prune");
        let (data, backups) = (root.join("d"), root.join("b"));
        for secs in [30, 10, 40, 20] {
            write(data_dir(&data), &backups, at(secs)).unwrap();
        }
        let partial = backups.join(format!(".{}{PARTIAL}", timestamp(at(5))));
        let foreign = backups.join(timestamp(at(1)).replace('Z', "Y"));
        let no_manifest = backups.join(timestamp(at(2)));
        for d in [&partial, &foreign, &no_manifest] {
            std::fs::create_dir_all(d).unwrap();
        }
        assert_eq!(newest(&backups), Some(at(40)));
        let removed = prune(&backups, 2).unwrap();
        assert_eq!(
            removed,
            [at(10), at(20)].map(|t| backups.join(timestamp(t)))
        );
        let mut left: Vec<_> = std::fs::read_dir(&backups)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        left.sort();
        let mut want = vec![partial.clone(), foreign, no_manifest];
        want.extend([at(30), at(40)].map(|t| backups.join(timestamp(t))));
        want.sort();
        assert_eq!(left, want);
        // The next backup clears what a crash left half written.
        write(data_dir(&data), &backups, at(50)).unwrap();
        assert!(!partial.exists());
        assert_eq!(newest(&backups), Some(at(50)));
        assert_eq!(newest(&root.join("none")), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
