//! The periodic anti-entropy loop: each peer on its own schedule, jittered, with a
//! backoff for peers that fail, at most `max_concurrent_syncs` exchanges at once, each
//! on a thread of its own ([`run_exchange`]).

use crate::antientropy::client::run_exchange;
use crate::antientropy::exchange::Report;
use crate::antientropy::log::{Started, SyncLog};
use crate::antientropy::messages::SyncError;
use crate::node::inbox::ThreadMsg;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// When the first periodic exchanges run after start (unless the interval is shorter).
const FIRST_ROUND_AFTER: Duration = Duration::from_secs(2);
/// How often the periodic loop looks for peers that are due.
const TICK: Duration = Duration::from_secs(1);

/// What the periodic loop needs from its node.
pub struct Periodic {
    pub config: crate::config::Config,
    /// How this node reaches itself ([`crate::antientropy::client::self_address`]),
    /// never taken for a peer.
    pub me: String,
    /// This node's shard inboxes.
    pub shards: Vec<tokio::sync::mpsc::Sender<ThreadMsg>>,
    /// The peers presence currently announces online.
    pub online: Box<dyn Fn() -> Vec<String> + Send>,
    /// Whether exchanges are held back now (a rejoining node whose old entries must
    /// reach no peer): none starts meanwhile.
    pub paused: Box<dyn Fn() -> bool + Send>,
    pub log: Arc<SyncLog>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// An exchange that ended: the peer, and its outcome.
type Ended = (String, Result<(Report, Duration), SyncError>);

/// The periodic anti-entropy loop. Each peer — from `peer_list` plus the peers presence
/// announces (re-read every `peer_discovery_interval`, and while none is known) — has
/// its own schedule: first about 2 s after start (so a node that starts empty fills
/// itself), then every `interval_seconds` ±20% after its last exchange ended, so nodes
/// do not all sync at once and a slow peer delays no other. At most
/// `max_concurrent_syncs` exchanges run at once, each on a thread of its own. A peer
/// that fails waits longer each time ([`backoff_wait`]).
pub async fn run_periodic(node: Periodic) {
    let (done, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut shutdown = node.shutdown.clone();
    let mut rounds = Rounds::new(node, done);
    let mut tick = tokio::time::interval(rounds.interval.min(TICK));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some((peer, result)) = done_rx.recv() => {
                rounds.ended(peer, result);
                continue;
            }
            _ = shutdown.wait_for(|&s| s) => return,
        }
        rounds.start_due();
    }
}

/// The periodic loop's state.
struct Rounds {
    node: Periodic,
    interval: Duration,
    /// How often presence is read again.
    discovery: Duration,
    /// The tombstone grace period, which caps the backoff.
    grace: Duration,
    /// One permit per exchange allowed to run at once.
    slots: Arc<tokio::sync::Semaphore>,
    /// The jitter's xorshift state, seeded by the node id (never 0).
    rng: u64,
    /// When a peer new to the schedule is due.
    first_due: Instant,
    /// The peers presence announced at `discovered_at`.
    discovered: Vec<String>,
    discovered_at: Option<Instant>,
    schedule: Schedule,
    /// Where an exchange's thread reports its end.
    done: tokio::sync::mpsc::UnboundedSender<Ended>,
}

impl Rounds {
    fn new(node: Periodic, done: tokio::sync::mpsc::UnboundedSender<Ended>) -> Rounds {
        let cfg = &node.config.anti_entropy;
        let interval = Duration::from_secs(cfg.interval_seconds.max(1));
        let mut rounds = Rounds {
            interval,
            discovery: Duration::from_secs(cfg.peer_discovery_interval.max(1)),
            grace: Duration::from_secs(node.config.storage.tombstone_grace_seconds),
            slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_syncs.max(1))),
            rng: xxhash_rust::xxh3::xxh3_64(node.config.node_id.as_bytes()) | 1,
            first_due: Instant::now(),
            discovered: Vec::new(),
            discovered_at: None,
            schedule: Schedule::default(),
            done,
            node,
        };
        let first = jittered(interval.min(FIRST_ROUND_AFTER), rounds.random());
        rounds.first_due += first;
        rounds
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// The exchange with `peer` ended: schedule its next one and record the result.
    fn ended(&mut self, peer: String, result: Result<(Report, Duration), SyncError>) {
        let (wait, failures) = match &result {
            Ok((r, took)) => {
                if r.keys_repaired > 0 {
                    tracing::info!(%peer, keys_repaired = r.keys_repaired, ms = took.as_millis() as u64, "anti-entropy repaired differences");
                }
                (jittered(self.interval, self.random()), 0)
            }
            Err(e) => {
                let failures = self.schedule.failures(&peer) + 1;
                let wait = backoff_wait(self.interval, failures, self.grace);
                tracing::warn!(%peer, failures, retry_in_s = wait.as_secs(), "anti-entropy exchange failed: {e}");
                (wait, failures)
            }
        };
        self.schedule.ended(&peer, failures, Instant::now() + wait);
        let result = result.map_err(|e| e.to_string());
        self.node
            .log
            .record(&peer, result, Started::Periodic, Instant::now());
    }

    /// The current peers, sorted: `peer_list` and the peers presence announces, less
    /// this node.
    fn peers(&mut self) -> Vec<String> {
        // Presence arrives shortly after start: look again while nothing is known.
        if self.discovered.is_empty()
            || self
                .discovered_at
                .is_none_or(|t| t.elapsed() >= self.discovery)
        {
            self.discovered = (self.node.online)();
            self.discovered_at = Some(Instant::now());
        }
        let config = &self.node.config;
        let mut peers: Vec<String> = config
            .anti_entropy
            .peer_list
            .iter()
            .chain(&self.discovered)
            .cloned()
            .collect();
        peers.sort();
        peers.dedup();
        let advertised = config.network.advertise_address.as_ref();
        peers.retain(|p| *p != self.node.me && Some(p) != advertised);
        peers
    }

    /// Start the exchanges that are due, as many as there are free slots.
    fn start_due(&mut self) {
        if (self.node.paused)() {
            return;
        }
        let peers = self.peers();
        for peer in self.schedule.due(&peers, self.first_due, Instant::now()) {
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                break;
            };
            let (shards, done) = (self.node.shards.clone(), self.done.clone());
            let target = peer.clone();
            let spawned = std::thread::Builder::new()
                .name("sync".into())
                .spawn(move || {
                    let result = run_exchange(shards, &target);
                    drop(permit);
                    let _ = done.send((target, result));
                });
            match spawned {
                Ok(_) => self.schedule.started(&peer),
                Err(e) => tracing::warn!("cannot start an anti-entropy exchange: {e}"),
            }
        }
    }
}

/// The periodic loop's state per peer: when its next exchange is due, its failures in
/// a row, and whether an exchange with it is running.
#[derive(Default)]
pub struct Schedule {
    peers: std::collections::HashMap<String, PeerSchedule>,
}

struct PeerSchedule {
    due: Instant,
    failures: u32,
    running: bool,
}

impl Schedule {
    /// The peers of `current` (sorted) whose exchange is due at `now` and not running,
    /// in order; a peer new to the schedule is due at `first_due`. Peers no longer in
    /// `current` are forgotten once no exchange with them runs: the schedule holds no
    /// more than the current peers (bounded by `peer_list` and the peer table) and the
    /// running exchanges.
    pub fn due(&mut self, current: &[String], first_due: Instant, now: Instant) -> Vec<String> {
        self.peers
            .retain(|peer, s| s.running || current.binary_search(peer).is_ok());
        let mut out = Vec::new();
        for peer in current {
            let s = self.peers.entry(peer.clone()).or_insert(PeerSchedule {
                due: first_due,
                failures: 0,
                running: false,
            });
            if s.due <= now && !s.running {
                out.push(peer.clone());
            }
        }
        out
    }

    /// An exchange with `peer` is running.
    pub fn started(&mut self, peer: &str) {
        if let Some(s) = self.peers.get_mut(peer) {
            s.running = true;
        }
    }

    /// Failures in a row of the exchanges with `peer`.
    pub fn failures(&self, peer: &str) -> u32 {
        self.peers.get(peer).map_or(0, |s| s.failures)
    }

    /// The exchange with `peer` ended, after `failures` in a row (0: it succeeded); the
    /// next is due at `due`.
    pub fn ended(&mut self, peer: &str, failures: u32, due: Instant) {
        self.peers.insert(
            peer.to_string(),
            PeerSchedule {
                due,
                failures,
                running: false,
            },
        );
    }
    #[cfg(test)]
    fn len(&self) -> usize {
        self.peers.len()
    }
}

/// `wait` scaled by 0.8..=1.2, chosen by the random `r`: nodes do not all sync at once.
pub fn jittered(wait: Duration, r: u64) -> Duration {
    wait.mul_f64(0.8 + (r % 401) as f64 / 1000.0)
}

/// How long to skip a peer after its `failures`-th failure in a row: the interval
/// doubled per failure, at most an hour, and never more than a quarter of the tombstone
/// grace period (a returning peer must be reached before its missed deletes expire).
pub fn backoff_wait(interval: Duration, failures: u32, grace: Duration) -> Duration {
    interval
        .saturating_mul(1 << failures.min(10))
        .min(Duration::from_secs(3600))
        .min(grace / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped_by_an_hour_and_the_grace() {
        let s = Duration::from_secs;
        let day = s(86_400);
        assert_eq!(backoff_wait(s(300), 1, day), s(600));
        assert_eq!(backoff_wait(s(300), 2, day), s(1200));
        assert_eq!(backoff_wait(s(300), 5, day), s(3600));
        assert_eq!(backoff_wait(s(300), 40, day), s(3600), "no overflow");
        assert_eq!(
            backoff_wait(s(300), 3, s(600)),
            s(150),
            "a quarter of a short grace"
        );
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let base = Duration::from_secs(100);
        let all: Vec<Duration> = (0..1000u64).map(|r| jittered(base, r * 7919)).collect();
        assert!(all
            .iter()
            .all(|d| *d >= Duration::from_secs(80) && *d <= Duration::from_secs(120)));
        assert!(all.iter().any(|d| *d < Duration::from_secs(90)));
        assert!(all.iter().any(|d| *d > Duration::from_secs(110)));
    }

    #[test]
    fn the_schedule_forgets_peers_that_left_once_their_exchange_ended() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(60);
        let mut s = Schedule::default();
        assert_eq!(
            s.due(&names(&["a", "b", "c"]), t0, t0),
            names(&["a", "b", "c"])
        );
        s.started("a");
        s.started("b");
        s.ended("b", 2, later);
        // b and c leave the peer list; a's exchange is still running, so a stays.
        assert_eq!(s.due(&names(&["a", "d"]), t0, t0), names(&["d"]));
        assert_eq!(
            s.len(),
            2,
            "b and c forgotten, a kept while its exchange runs"
        );
        s.ended("a", 1, later);
        assert_eq!(s.failures("a"), 1);
        assert!(s.due(&names(&["d"]), t0, t0).contains(&"d".to_string()));
        assert_eq!(s.len(), 1, "a forgotten once its exchange ended");
        // A peer that comes back starts over.
        assert_eq!(s.due(&names(&["b"]), t0, t0), names(&["b"]));
        assert_eq!(s.failures("b"), 0);
    }
}
