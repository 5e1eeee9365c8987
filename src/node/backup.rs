//! Backups of a persisting node (docs/PERSISTENCE.md, "Backups and restore"): the
//! `BACKUP` command and the periodic ones (due an interval after the newest backup, so
//! restarts do not put them off), one at a time. The disk writer only freezes
//! the files (a moment's work); the copy runs on a thread of its own, so neither a shard
//! thread nor the writer waits for it.

use crate::node::disk::Disk;
use crate::node::shared::Shared;
use crate::persist::backup;
use crate::persist::files::NODE_FILE;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{oneshot, watch};

/// Holds the node's one backup slot; frees it when dropped, however the backup ends.
struct Running(Arc<Disk>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.backing_up.store(false, Relaxed);
    }
}

/// The `BACKUP` reply line: `OK <path>` once the backup is complete, or an error.
pub async fn reply(shared: &Arc<Shared>) -> String {
    match take(shared).await {
        Ok(path) => format!("OK {}", path.display()),
        Err(why) => format!("ERROR: {why}"),
    }
}

/// Take a backup into `backup_dir` and prune the old ones; its path.
async fn take(shared: &Arc<Shared>) -> Result<PathBuf, String> {
    // A node still recovering its shards backs them up once they are there.
    shared.readiness.recovered().await;
    let Some(disk) = shared.disk.get().cloned() else {
        return Err("BACKUP needs persistence ([storage] persistence_enabled = true)".into());
    };
    if disk.backing_up.swap(true, Relaxed) {
        return Err("a backup is being taken; try again when it completes".into());
    }
    let running = Running(disk);
    let dir = shared.config.backup_dir();
    let retain = shared.config.storage.backup_retain;
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("backup".into())
        .spawn(move || {
            let result = copy(&running.0, &dir, retain);
            // Free before replying: a client told OK may take the next one at once.
            drop(running);
            let _ = tx.send(result);
        })
        .map_err(|e| format!("cannot start the backup: {e}"))?;
    rx.await
        .unwrap_or_else(|_| Err("the backup thread died".into()))
}

/// The backup itself, on its own thread.
fn copy(disk: &Disk, dir: &Path, retain: usize) -> Result<PathBuf, String> {
    let frozen = disk.freeze()?;
    let path = backup::write(frozen, dir, std::time::SystemTime::now()).map_err(|e| {
        tracing::error!("backup failed: {e}");
        e.to_string()
    })?;
    tracing::info!(path = %path.display(), "backup written");
    match backup::prune(dir, retain) {
        Ok(removed) => {
            for old in removed {
                tracing::info!(path = %old.display(), retain, "old backup removed");
            }
        }
        Err(e) => tracing::warn!("cannot remove old backups: {e}"),
    }
    Ok(path)
}

/// A backup every `[storage] backup_interval_hours` (none when 0, or when nothing
/// persists) until the node stops, the first one an interval after the newest backup
/// in `backup_dir` (see [`first_delay`]): a node restarted more often than the interval
/// still gets its backups.
pub async fn run_periodic(shared: Arc<Shared>) {
    let hours = shared.config.storage.backup_interval_hours;
    if hours == 0 || !shared.config.storage.persistence_enabled {
        return;
    }
    let period = Duration::from_secs(hours * 3600);
    let (dir, node_file) = (
        shared.config.backup_dir(),
        shared.config.data_dir().join(NODE_FILE),
    );
    // Without a backup yet: since the data directory was first written (its `NODE`).
    let last = tokio::task::spawn_blocking(move || {
        backup::newest(&dir).or_else(|| std::fs::metadata(node_file).ok()?.modified().ok())
    })
    .await
    .ok()
    .flatten();
    let first = first_delay(SystemTime::now(), last, period);
    tracing::info!(in_secs = first.as_secs(), "first periodic backup scheduled");
    let shutdown = shared.shutdown.subscribe();
    every(first, period, shutdown, || async {
        // The outcome is logged by `copy`; a BACKUP running then is this one's work done.
        if let Err(why) = take(&shared).await {
            tracing::warn!("periodic backup not taken: {why}");
        }
    })
    .await;
}

/// How long from `now` until the first periodic backup: one `period` after `last` (the
/// newest backup's time, or without one the data directory's), at once when that is
/// past, one period from now without `last` — and never more than one period, so a
/// clock set back does not put it off.
fn first_delay(now: SystemTime, last: Option<SystemTime>, period: Duration) -> Duration {
    match last.and_then(|l| l.checked_add(period)) {
        Some(due) => due
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(period),
        None => period,
    }
}

/// Run `job` after `first`, then every `period`, until `shutdown` turns true. A run
/// longer than the period delays the next rather than piling runs up.
async fn every<F: Future<Output = ()>>(
    first: Duration,
    period: Duration,
    mut shutdown: watch::Receiver<bool>,
    mut job: impl FnMut() -> F,
) {
    let start = tokio::time::Instant::now() + first;
    let mut ticks = tokio::time::interval_at(start, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            // Dropped here: the guard it returns must not live across the job's awaits.
            _ = async { drop(shutdown.wait_for(|&stop| stop).await) } => return,
            _ = ticks.tick() => job().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn the_first_backup_is_due_an_interval_after_the_newest_one_at_once_if_overdue() {
        let day = Duration::from_secs(86_400);
        let hour = Duration::from_secs(3600);
        let now = std::time::UNIX_EPOCH + 1000 * day;
        // Restarted an hour after the last backup: the rest of the interval, not all of it.
        assert_eq!(first_delay(now, Some(now - hour), day), day - hour);
        // Down past the interval, or restarted just as it came due: at once.
        assert_eq!(first_delay(now, Some(now - 3 * day), day), Duration::ZERO);
        assert_eq!(first_delay(now, Some(now - day), day), Duration::ZERO);
        // Nothing to go by: an interval from now.
        assert_eq!(first_delay(now, None, day), day);
        // A backup "from the future" (the clock was set back): no more than an interval.
        assert_eq!(first_delay(now, Some(now + 5 * day), day), day);
    }

    #[tokio::test]
    async fn a_job_runs_each_period_and_not_once_the_node_stops() {
        let (stop, shutdown) = watch::channel(false);
        let stop = Arc::new(stop);
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let job = move || {
            let (runs, stop) = (counted.clone(), stop.clone());
            async move {
                if runs.fetch_add(1, Relaxed) + 1 == 3 {
                    let _ = stop.send(true);
                }
            }
        };
        let period = Duration::from_millis(5);
        let ended = every(period, period, shutdown, job);
        let ended = tokio::time::timeout(Duration::from_secs(30), ended);
        assert!(ended.await.is_ok(), "the schedule did not stop");
        assert_eq!(runs.load(Relaxed), 3);
    }
}
