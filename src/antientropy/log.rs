//! The results of anti-entropy exchanges, for INFO and the `SYNC` reply: the last
//! outcome per peer (expiring, bounded), the `SYNC` report line, and the slots that
//! bound the `SYNC` commands running at once.

use crate::antientropy::exchange::Report;
use dashmap::DashMap;
use std::time::{Duration, Instant};

/// The `SYNC` reply line.
pub fn report_line(r: &Report, took: Duration) -> String {
    format!(
        "OK keys_repaired={} bytes_sent={} bytes_received={} round_trips={} ms={} entries_sent={} entries_received={} buckets_compared={} entries_refused={} entries_ignored={}",
        r.keys_repaired,
        r.bytes_sent,
        r.bytes_received,
        r.round_trips,
        took.as_millis(),
        r.entries_sent,
        r.entries_received,
        r.buckets_compared,
        r.entries_refused,
        r.entries_ignored
    )
}

/// An exchange's outcome: the report and how long it took, or why it failed.
pub type Outcome = Result<(Report, Duration), String>;

/// Who started an exchange, which decides how long INFO shows its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// A `SYNC` command: shown for [`ONE_OFF_SHOWN`].
    OneOff,
    /// The periodic loop: shown for [`PERIODIC_SHOWN`].
    Periodic,
}

/// How long INFO shows the result of a `SYNC` command: a one-off exchange (say, with
/// a mistyped or dead address) must not stay in INFO for ever.
pub const ONE_OFF_SHOWN: Duration = Duration::from_secs(600);
/// How long INFO shows a periodic exchange's result: a peer that left the cluster
/// drops out of INFO a day after its last exchange.
pub const PERIODIC_SHOWN: Duration = Duration::from_secs(86_400);

/// The last exchange with each peer, for INFO.
#[derive(Default)]
pub struct SyncLog {
    last: DashMap<String, (Instant, Started, Outcome)>,
    /// `SYNC` commands running now.
    running: std::sync::atomic::AtomicUsize,
}

/// A running `SYNC`'s slot; released when dropped.
pub struct Running(std::sync::Arc<SyncLog>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Peers whose last exchange INFO keeps.
const PEERS_LOGGED_MAX: usize = 256;
/// `SYNC` commands running at once, node-wide (each has a thread).
const SYNC_COMMANDS_MAX: usize = 8;

impl SyncLog {
    /// Record the outcome of an exchange with `peer` that ended at `now`.
    pub fn record(&self, peer: &str, result: Outcome, started: Started, now: Instant) {
        self.forget_expired(now);
        // Bounded: `SYNC` accepts any address, so forget the oldest beyond the limit.
        if self.last.len() >= PEERS_LOGGED_MAX && !self.last.contains_key(peer) {
            let oldest = self
                .last
                .iter()
                .min_by_key(|e| e.value().0)
                .map(|e| e.key().clone());
            if let Some(k) = oldest {
                self.last.remove(&k);
            }
        }
        self.last.insert(peer.to_string(), (now, started, result));
    }

    /// When the newest successful exchange still shown started, if any: every entry
    /// this node held then has reached that peer.
    pub fn last_success(&self) -> Option<Instant> {
        let started = |e: &(Instant, Started, Outcome)| match &e.2 {
            Ok((_, took)) => e.0.checked_sub(*took),
            Err(_) => None,
        };
        self.last.iter().filter_map(|e| started(e.value())).max()
    }

    /// Drop the results shown long enough ([`ONE_OFF_SHOWN`], [`PERIODIC_SHOWN`]).
    fn forget_expired(&self, now: Instant) {
        self.last.retain(|_, (at, started, _)| {
            let shown = match started {
                Started::OneOff => ONE_OFF_SHOWN,
                Started::Periodic => PERIODIC_SHOWN,
            };
            now.saturating_duration_since(*at) <= shown
        });
    }

    /// Take a slot for a `SYNC` exchange; `None` when too many are running.
    pub fn start(self: &std::sync::Arc<Self>) -> Option<Running> {
        let n = self
            .running
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let slot = Running(self.clone());
        (n < SYNC_COMMANDS_MAX).then_some(slot)
    }

    /// One INFO `sync_peer` value per peer, sorted: the address, how long ago, and the
    /// result line (or the error).
    pub fn info_values(&self, now: Instant) -> Vec<String> {
        self.forget_expired(now);
        let mut all: Vec<String> = self
            .last
            .iter()
            .map(|e| {
                let (at, _, result) = e.value();
                let ago = now.saturating_duration_since(*at).as_secs();
                match result {
                    Ok((r, took)) => format!("{} {ago}s_ago {}", e.key(), report_line(r, *took)),
                    Err(err) => format!("{} {ago}s_ago ERROR {err}", e.key()),
                }
            })
            .collect();
        all.sort();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_off_results_leave_info_after_ten_minutes_and_periodic_ones_after_a_day() {
        let log = SyncLog::default();
        let t0 = Instant::now();
        let failed: Outcome = Err("connection refused".into());
        log.record("10.0.0.9:7878", failed.clone(), Started::OneOff, t0);
        log.record("10.0.0.2:7878", failed, Started::Periodic, t0);
        let shown = |at: Duration| log.info_values(t0 + at);
        assert_eq!(shown(Duration::from_secs(599)).len(), 2);
        let later = shown(Duration::from_secs(601));
        assert_eq!(later.len(), 1);
        assert!(
            later[0].starts_with("10.0.0.2:7878 601s_ago ERROR"),
            "{later:?}"
        );
        assert_eq!(
            shown(PERIODIC_SHOWN + Duration::from_secs(1)),
            Vec::<String>::new()
        );
    }
}
