//! What every thread of a node sees: the configuration, the inboxes, the counters, the
//! replication queue, readiness. Shard data is not here: each shard thread owns its own.

use crate::antientropy::log::SyncLog;
use crate::config::Config;
use crate::node::inbox::ThreadMsg;
use crate::replication::outbound::Outbound;
use crate::replication::peers::Peers;
use crate::store::shard::Shard;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use tokio::sync::{mpsc, watch};

/// State every thread sees. Shard data is not here: each shard thread owns its own.
pub struct Shared {
    pub config: Config,
    pub shard_bits: u32,
    pub local_addr: SocketAddr,
    pub started: Instant,
    /// Inbox of shard thread `i` (index = shard).
    pub inboxes: Vec<mpsc::Sender<ThreadMsg>>,
    pub connections: AtomicUsize,
    pub connections_total: AtomicU64,
    pub connections_rejected: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Where shards send their change events; `None` on a standalone node.
    pub outbound: Option<Arc<Outbound>>,
    pub peers: Arc<Peers>,
    /// The last anti-entropy exchange with each peer.
    pub sync_log: Arc<SyncLog>,
    /// Bytes of `SYNC.MSG` bodies being received or served now, node-wide.
    pub sync_bytes: AtomicUsize,
    /// Set to true once: every task stops reading, answers what it has, and closes.
    pub shutdown: watch::Sender<bool>,
    /// LOADING or ready: data commands wait for the bootstrap (node/bootstrap.rs).
    pub readiness: Readiness,
    /// The disk writer and durability reports; empty when nothing persists, and until
    /// the shards are recovered.
    pub disk: OnceLock<Arc<crate::node::disk::Disk>>,
}

/// The node-wide readiness flag connections check before each batch, and the progress
/// INFO shows. While the shards are being recovered from disk the node is LOADING and
/// `recovering` too: the shard threads hold placeholder shards then, which nothing may
/// read (node/server.rs).
pub struct Readiness {
    loading: AtomicBool,
    progress: Mutex<String>,
    recovering: watch::Sender<bool>,
    /// Set while this node rejoins and still holds entries older than its cut
    /// (node/bootstrap.rs): it serves no exchange and runs none but the rejoin's own
    /// until it has dropped them, so no peer takes back a delete it purged.
    stale: AtomicBool,
}

impl Readiness {
    pub fn new(loading: bool, progress: &str, recovering: bool) -> Readiness {
        Readiness {
            loading: AtomicBool::new(loading || recovering),
            progress: Mutex::new(progress.to_string()),
            recovering: watch::Sender::new(recovering),
            stale: AtomicBool::new(false),
        }
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(Relaxed)
    }

    pub fn set_stale(&self, stale: bool) {
        self.stale.store(stale, Relaxed);
    }

    pub fn is_loading(&self) -> bool {
        self.loading.load(Relaxed)
    }

    pub fn is_recovering(&self) -> bool {
        *self.recovering.borrow()
    }

    /// Wait until every shard is recovered from disk (at once when nothing persists).
    pub async fn recovered(&self) {
        let _ = self.recovering.subscribe().wait_for(|r| !r).await;
    }

    /// The shards are recovered: the node is `loading` still or not, for `progress`.
    pub fn end_recovery(&self, loading: bool, progress: String) {
        self.set(loading, progress);
        self.recovering.send_replace(false);
    }

    pub fn progress(&self) -> String {
        self.progress.lock().map(|p| p.clone()).unwrap_or_default()
    }

    pub fn set(&self, loading: bool, progress: String) {
        if let Ok(mut p) = self.progress.lock() {
            *p = progress;
        }
        self.loading.store(loading, Relaxed);
    }
}

/// Hand what shard `index` recorded to replication (its local writes) and queue it for
/// the disk (every change); returns the disk batch that will carry it, if any.
pub fn ship_changes(shard: &mut Shard, index: usize, shared: &Shared) -> Option<u64> {
    if let Some(out) = &shared.outbound {
        if let Some(journal) = shard.take_journal() {
            out.push(journal);
        }
    }
    shared.disk.get()?.queue(index, shard)
}
