//! The replication thread's counters ([`ReplStats`], shared with the node for INFO and
//! STATS) and their copy ([`ReplSnapshot`]). Each counter is named once, beside its
//! field, so no counter can be reported under the wrong name or not at all.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Counters for INFO; all monotonic except the gauges named so.
#[derive(Default)]
pub struct ReplStats {
    pub connected: AtomicBool,
    /// While stopping: changes not yet confirmed by the broker (see `Replication::flush`).
    pub unconfirmed: AtomicU64,
    /// Wall-clock µs when the broker last had confirmed every change this node had made:
    /// what a rejoin after a long isolation may drop is older (node/bootstrap.rs, `cut`).
    pub settled_at_us: AtomicU64,
    pub connects: AtomicU64,
    pub published_events: AtomicU64,
    pub published_payloads: AtomicU64,
    /// Times a connection paused reading because the queue was full.
    pub backpressure_waits: AtomicU64,
    /// Changes dropped because the queue stayed full past `backpressure_max_ms`.
    pub dropped_overflow: AtomicU64,
    /// Changes dropped because the offline buffer was full.
    pub dropped_offline: AtomicU64,
    /// Gauges: changes waiting in the outbox (the offline buffer), and their bytes.
    pub buffered_events: AtomicU64,
    pub buffered_bytes: AtomicU64,
    pub received_events: AtomicU64,
    /// Remote changes that won by LWW and were applied.
    pub applied_events: AtomicU64,
    /// Remote changes that won but could not be stored (memory limit).
    pub apply_failed: AtomicU64,
    pub rejected_payloads: AtomicU64,
    pub rejected_presence: AtomicU64,
}

/// A copy of [`ReplStats`] for INFO and STATS (all zero on a standalone node).
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplSnapshot {
    pub enabled: bool,
    pub connected: bool,
    /// The counters' values, in the order of [`ReplSnapshot::NAMES`].
    pub counters: [u64; COUNTERS],
}

/// The reported counters: each field of [`ReplStats`] named here is reported as
/// `repl_<field>`, names and values from this one list.
macro_rules! reported {
    ($($field:ident),* $(,)?) => {
        const COUNTERS: usize = [$(stringify!($field)),*].len();

        impl ReplSnapshot {
            pub const NAMES: [&'static str; COUNTERS] = [$(concat!("repl_", stringify!($field))),*];
        }

        impl ReplStats {
            fn counters(&self) -> [u64; COUNTERS] {
                [$(self.$field.load(Relaxed)),*]
            }
        }
    };
}

reported!(
    connects,
    published_events,
    published_payloads,
    backpressure_waits,
    dropped_overflow,
    dropped_offline,
    buffered_events,
    buffered_bytes,
    received_events,
    applied_events,
    apply_failed,
    rejected_payloads,
    rejected_presence,
);

impl ReplSnapshot {
    pub fn state(&self) -> &'static str {
        match (self.enabled, self.connected) {
            (false, _) => "off",
            (true, true) => "connected",
            (true, false) => "disconnected",
        }
    }
}

impl ReplStats {
    pub fn snapshot(&self) -> ReplSnapshot {
        ReplSnapshot {
            enabled: true,
            connected: self.connected.load(Relaxed),
            counters: self.counters(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_counter_is_reported_under_its_own_name() {
        let stats = ReplStats::default();
        stats.connects.store(1, Relaxed);
        stats.dropped_offline.store(6, Relaxed);
        stats.rejected_presence.store(13, Relaxed);
        let s = stats.snapshot();
        let named = |name| {
            let i = ReplSnapshot::NAMES.iter().position(|n| *n == name);
            i.map(|i| s.counters[i])
        };
        assert_eq!(named("repl_connects"), Some(1));
        assert_eq!(named("repl_dropped_offline"), Some(6));
        assert_eq!(named("repl_rejected_presence"), Some(13));
        assert_eq!(named("repl_published_events"), Some(0));
        assert_eq!(s.state(), "disconnected");
    }
}
