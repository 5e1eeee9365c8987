//! Backups of a persisting node (docs/PERSISTENCE.md, "Backups and restore"): the
//! `BACKUP` command and the periodic ones, one at a time. The disk writer only freezes
//! the files (a moment's work); the copy runs on a thread of its own, so neither a shard
//! thread nor the writer waits for it.

use crate::node::disk::Disk;
use crate::node::shared::Shared;
use crate::persist::backup;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
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
/// persists), the first one an interval after start, until the node stops.
pub async fn run_periodic(shared: Arc<Shared>) {
    let hours = shared.config.storage.backup_interval_hours;
    if hours == 0 || !shared.config.storage.persistence_enabled {
        return;
    }
    let period = Duration::from_secs(hours * 3600);
    let shutdown = shared.shutdown.subscribe();
    every(period, shutdown, || async {
        // The outcome is logged by `copy`; a BACKUP running then is this one's work done.
        if let Err(why) = take(&shared).await {
            tracing::warn!("periodic backup not taken: {why}");
        }
    })
    .await;
}

/// Run `job` every `period`, the first time one period from now, until `shutdown` turns
/// true. A run longer than the period delays the next rather than piling runs up.
async fn every<F: Future<Output = ()>>(
    period: Duration,
    mut shutdown: watch::Receiver<bool>,
    mut job: impl FnMut() -> F,
) {
    let start = tokio::time::Instant::now() + period;
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
        let ended = tokio::time::timeout(Duration::from_secs(30), every(period, shutdown, job));
        assert!(ended.await.is_ok(), "the schedule did not stop");
        assert_eq!(runs.load(Relaxed), 3);
    }
}
