//! The shards' queue into the replication thread: [`Outbound::push`] never blocks, and
//! [`Outbound::admit`] makes connections wait (at most `backpressure_max_ms`) while
//! the queue is full. The channel is unbounded by type and bounded by this gate.

use crate::replication::stats::ReplStats;
use crate::store::journal::Journal;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

/// Events and bytes queued from the shards to the replication thread before connections
/// wait: `offline_buffer_events` and `offline_buffer_bytes`, within these bounds (both
/// bound the same path's memory).
pub const QUEUE_EVENTS: std::ops::RangeInclusive<usize> = 1024..=64 * 1024;
pub const QUEUE_BYTES: std::ops::RangeInclusive<usize> = 1 << 20..=64 << 20;

/// The shards' side of the queue to the replication thread.
pub struct Outbound {
    tx: mpsc::UnboundedSender<Journal>,
    /// Events and bytes in the channel: the channel is unbounded by type, bounded by
    /// this gate.
    queued: AtomicUsize,
    queued_bytes: AtomicUsize,
    capacity: usize,
    capacity_bytes: usize,
    /// Set when admission gave up waiting: changes past the bound are dropped.
    overflow: AtomicBool,
    room: Notify,
    backpressure: Duration,
    pub stats: Arc<ReplStats>,
}

impl Outbound {
    pub(crate) fn new(
        mqtt: &crate::config::MqttConfig,
        tx: mpsc::UnboundedSender<Journal>,
        stats: Arc<ReplStats>,
    ) -> Outbound {
        Outbound {
            tx,
            queued: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            capacity: (mqtt.offline_buffer_events)
                .clamp(*QUEUE_EVENTS.start(), *QUEUE_EVENTS.end()),
            capacity_bytes: (mqtt.offline_buffer_bytes)
                .clamp(*QUEUE_BYTES.start(), *QUEUE_BYTES.end()),
            overflow: AtomicBool::new(false),
            room: Notify::new(),
            backpressure: Duration::from_millis(mqtt.backpressure_max_ms),
            stats,
        }
    }

    /// Queue a shard's journal. Never blocks: over the bound (only after admission gave
    /// up waiting) the changes are dropped and counted.
    pub fn push(&self, journal: Journal) {
        let (n, bytes) = (journal.events as usize, journal.bytes.len());
        if self.overflow.load(Relaxed) && self.full() {
            self.stats.dropped_overflow.fetch_add(n as u64, Relaxed);
            return;
        }
        self.queued.fetch_add(n, Relaxed);
        self.queued_bytes.fetch_add(bytes, Relaxed);
        if self.tx.send(journal).is_err() {
            // The replication thread is gone (shutting down): nothing left to send to.
            self.queued.fetch_sub(n, Relaxed);
            self.queued_bytes.fetch_sub(bytes, Relaxed);
        }
    }

    /// Events in the queue, not yet taken by the replication thread.
    pub(crate) fn queued_events(&self) -> usize {
        self.queued.load(Relaxed)
    }

    fn full(&self) -> bool {
        self.queued.load(Relaxed) >= self.capacity
            || self.queued_bytes.load(Relaxed) >= self.capacity_bytes
    }

    /// Wait, before reading more commands, until the queue has room, at most
    /// `backpressure_max_ms`; then stop waiting (and let [`Outbound::push`] drop).
    pub async fn admit(&self) {
        if !self.full() || self.overflow.load(Relaxed) {
            return;
        }
        self.stats.backpressure_waits.fetch_add(1, Relaxed);
        let deadline = tokio::time::Instant::now() + self.backpressure;
        loop {
            let room = self.room.notified();
            if !self.full() || self.overflow.load(Relaxed) {
                return;
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                if !self.overflow.swap(true, Relaxed) {
                    tracing::warn!(
                        waited_ms = self.backpressure.as_millis() as u64,
                        "replication queue stayed full: accepting writes and dropping \
                         changes that do not fit (anti-entropy repairs them)"
                    );
                }
                return;
            }
        }
    }

    /// Called by the replication thread after taking `n` events of `bytes` off the queue.
    pub(crate) fn taken(&self, n: usize, bytes: usize) {
        let left = self.queued.fetch_sub(n, Relaxed) - n;
        let left_bytes = self.queued_bytes.fetch_sub(bytes, Relaxed) - bytes;
        let half_empty = left < self.capacity / 2 && left_bytes < self.capacity_bytes / 2;
        if half_empty && self.overflow.swap(false, Relaxed) {
            tracing::info!("replication queue has room again: no more changes dropped");
        }
        if !self.full() {
            self.room.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_queue_is_full_by_bytes_too_and_drops_only_after_admission_gives_up() {
        let mut mqtt = Config::defaults(true).mqtt;
        mqtt.offline_buffer_bytes = 1 << 20;
        mqtt.backpressure_max_ms = 0;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let out = Outbound::new(&mqtt, tx, Arc::default());
        let big = || Journal {
            bytes: vec![0; 600 << 10],
            events: 1,
        };
        out.push(big());
        assert!(!out.full());
        out.push(big());
        assert!(out.full(), "two events, but 1.2 MiB of them");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(out.admit()); // gives up at once: backpressure_max_ms = 0
        out.push(big());
        assert_eq!(out.stats.dropped_overflow.load(Relaxed), 1);
        for _ in 0..2 {
            let j = rx.try_recv().unwrap();
            out.taken(j.events as usize, j.bytes.len());
        }
        assert!(
            rx.try_recv().is_err(),
            "the dropped journal was never queued"
        );
        assert!(!out.full() && !out.overflow.load(Relaxed));
    }
}
