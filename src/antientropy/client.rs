//! Anti-entropy over the network (I/O edge): the blocking client that carries
//! [`crate::sync`] messages to a node's client port (`SYNC.MSG` / `SYNC.REPLY`), one
//! exchange between this node and a peer, and the per-peer results INFO shows.
//!
//! An exchange runs on a thread of its own and talks to both nodes over TCP — to the
//! peer, and to this node's own port — so it uses exactly the path a peer uses, and no
//! shard thread ever waits on the network.

use crate::antientropy::exchange::{exchange, Report};
use crate::antientropy::messages::{Peer, SyncError};
use crate::node::inbox::ThreadMsg;
use dashmap::DashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a whole exchange may take.
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(600);
/// When the first periodic exchanges run after start (unless the interval is shorter).
const FIRST_ROUND_AFTER: Duration = Duration::from_secs(2);
/// How often the periodic loop looks for peers that are due.
const TICK: Duration = Duration::from_secs(1);
/// Longest reply accepted (the server's own message limit).
const REPLY_BYTES_MAX: usize = crate::limits::SYNC_MSG_BYTES_MAX as usize;

/// A node reached over its client port. Counts the bytes it moves, framing included.
pub struct TcpPeer {
    addr: String,
    reader: BufReader<Deadlined>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// A stream whose every read and write ends by `deadline`: a peer that trickles its
/// reply a byte at a time (each read quick, the whole reply not) cannot hold an
/// exchange, and its `max_concurrent_syncs` slot, past the exchange's deadline.
struct Deadlined {
    stream: TcpStream,
    deadline: Instant,
}

impl Deadlined {
    /// Time left for the next read or write: at most [`REPLY_TIMEOUT`], never past the
    /// deadline.
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out());
        }
        Ok(left.min(REPLY_TIMEOUT))
    }

    /// Why a read or write timed out (the OS says only "resource temporarily
    /// unavailable"); other errors pass as they are.
    fn explain(&self, e: std::io::Error) -> std::io::Error {
        use std::io::ErrorKind::{TimedOut, WouldBlock};
        if matches!(e.kind(), TimedOut | WouldBlock) {
            self.timed_out()
        } else {
            e
        }
    }

    fn timed_out(&self) -> std::io::Error {
        let why = if Instant::now() >= self.deadline {
            "exchange took too long".to_string()
        } else {
            format!("no progress for {} s", REPLY_TIMEOUT.as_secs())
        };
        std::io::Error::new(std::io::ErrorKind::TimedOut, why)
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        self.stream.read(buf).map_err(|e| self.explain(e))
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        self.stream.write(buf).map_err(|e| self.explain(e))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

impl TcpPeer {
    /// Connect to `addr`; everything this peer does must be over by `deadline`.
    pub fn connect(addr: &str, deadline: Instant) -> Result<TcpPeer, SyncError> {
        let err = |e: std::io::Error| SyncError::Transport(format!("{addr}: {e}"));
        let target: SocketAddr = addr
            .to_socket_addrs()
            .map_err(err)?
            .next()
            .ok_or_else(|| SyncError::Transport(format!("{addr}: no address")))?;
        let stream = Deadlined {
            stream: TcpStream::connect_timeout(&target, CONNECT_TIMEOUT).map_err(err)?,
            deadline,
        };
        stream.stream.set_nodelay(true).map_err(err)?;
        Ok(TcpPeer {
            addr: addr.to_string(),
            reader: BufReader::with_capacity(64 * 1024, stream),
            bytes_sent: 0,
            bytes_received: 0,
        })
    }
}

impl Peer for TcpPeer {
    fn call(&mut self, request: &[u8]) -> Result<Vec<u8>, SyncError> {
        let err = |e: std::io::Error| SyncError::Transport(format!("{}: {e}", self.addr));
        let header = format!("SYNC.MSG {}\r\n", request.len());
        let stream = self.reader.get_mut();
        stream.write_all(header.as_bytes()).map_err(err)?;
        stream.write_all(request).map_err(err)?;
        self.bytes_sent += (header.len() + request.len()) as u64;
        // The reply header is short; a peer that never ends it must not grow memory.
        let mut line = String::new();
        (&mut self.reader)
            .take(64)
            .read_line(&mut line)
            .map_err(err)?;
        self.bytes_received += line.len() as u64;
        let line = line.trim_end();
        let n = match line.strip_prefix("SYNC.REPLY ") {
            Some(n) => n.parse::<usize>().ok().filter(|&n| n <= REPLY_BYTES_MAX),
            None => {
                return Err(SyncError::Transport(format!("{}: {line:?}", self.addr)));
            }
        }
        .ok_or_else(|| SyncError::Transport(format!("{}: bad reply header {line:?}", self.addr)))?;
        let mut reply = vec![0; n];
        self.reader.read_exact(&mut reply).map_err(err)?;
        self.bytes_received += n as u64;
        Ok(reply)
    }
}

/// One exchange between this node, whose shards are reached through their inboxes
/// `shards`, and `peer`. The node does not call itself over TCP: that would take one of
/// its own client slots, and a shutting-down node has closed its port while its shards
/// still run (the shutdown hand-off). Blocking: run it on a thread of its own. The
/// report's bytes are the peer connection's, framing included.
pub fn run_exchange(
    shards: Vec<tokio::sync::mpsc::Sender<ThreadMsg>>,
    peer: &str,
) -> Result<(Report, Duration), SyncError> {
    admit_peer(peer).map_err(SyncError::Transport)?;
    let started = Instant::now();
    let mut mine = LocalShards(shards);
    let mut theirs = TcpPeer::connect(peer, started + EXCHANGE_DEADLINE)?;
    let mut report = exchange(&mut mine, &mut theirs)?;
    report.bytes_sent = theirs.bytes_sent;
    report.bytes_received = theirs.bytes_received;
    Ok((report, started.elapsed()))
}

/// This node's shards as an exchange [`Peer`]: each request goes to every shard's inbox,
/// as a `SYNC.MSG` on the client port would, and the parts are assembled the same way.
struct LocalShards(Vec<tokio::sync::mpsc::Sender<ThreadMsg>>);

impl Peer for LocalShards {
    fn call(&mut self, request: &[u8]) -> Result<Vec<u8>, SyncError> {
        let stopped = || SyncError::Transport("this node's shards have stopped".into());
        let request = std::sync::Arc::new(crate::antientropy::messages::parse(request)?);
        let mut waiting = Vec::with_capacity(self.0.len());
        for inbox in &self.0 {
            let (reply, rx) = tokio::sync::oneshot::channel();
            let msg = ThreadMsg::Sync {
                request: request.clone(),
                reply,
            };
            inbox.blocking_send(msg).map_err(|_| stopped())?;
            waiting.push(rx);
        }
        let parts = waiting
            .into_iter()
            .map(|rx| rx.blocking_recv().map_err(|_| stopped()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(crate::antientropy::serve::assemble(&request, parts))
    }
}

/// Slowest a `SYNC.MSG` body may arrive once the connection timeout has passed: a
/// sender that trickles (or stalls) would otherwise hold its connection, and its share
/// of the node's message memory, for ever.
pub const BODY_BYTES_PER_S_MIN: u64 = 64 << 10;

/// How long a `SYNC.MSG` body that has brought `received` bytes in `elapsed` may wait
/// for more; `None`: cut the sender now. A body may take `timeout_s` (the connection
/// timeout, 0 = none) whatever its pace; after that it must have come at
/// [`BODY_BYTES_PER_S_MIN`] since its first second. No single wait is longer than
/// `timeout_s`, so a sender that stops is cut after it, as an idle client is.
pub fn body_wait(received: usize, elapsed: Duration, timeout_s: u64) -> Option<Duration> {
    let timeout = Duration::from_secs(timeout_s);
    let by_rate = Duration::from_millis(1000 + received as u64 * 1000 / BODY_BYTES_PER_S_MIN);
    let left = by_rate.max(timeout).checked_sub(elapsed)?;
    let wait = if timeout_s == 0 {
        left
    } else {
        left.min(timeout)
    };
    (!wait.is_zero()).then_some(wait)
}

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

    /// Drop the results shown long enough ([`ONE_OFF_SHOWN`], [`PERIODIC_SHOWN`]).
    /// When the newest successful exchange still shown started, if any: every entry
    /// this node held then has reached that peer.
    pub fn last_success(&self) -> Option<Instant> {
        let started = |e: &(Instant, Started, Outcome)| match &e.2 {
            Ok((_, took)) => e.0.checked_sub(*took),
            Err(_) => None,
        };
        self.last.iter().filter_map(|e| started(e.value())).max()
    }

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

/// The one place a peer is admitted to an exchange, both ways: every exchange this node
/// starts (`SYNC`, the periodic loop) checks the peer it dials, and every `SYNC.MSG` it
/// serves checks the connection's address ([`admit_incoming`]). Every well-formed
/// `host:port` is admitted today; the security issue adds authentication here.
pub fn admit_peer(peer: &str) -> Result<(), String> {
    match crate::config::host_port(peer) {
        Ok((host, _)) => {
            if host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_unspecified())
            {
                return Err(format!("{peer} is not an address a peer can be reached on"));
            }
            Ok(())
        }
        Err(_) => Err(format!("SYNC needs host:port, found {peer:?}")),
    }
}

/// Whether a connection from `from` may send anti-entropy messages (see [`admit_peer`]).
pub fn admit_incoming(from: Option<SocketAddr>) -> Result<(), String> {
    let _ = from; // every connection, until authentication arrives
    Ok(())
}

/// How this node reaches itself: its bound address, or loopback when bound to all.
pub fn self_address(bound: SocketAddr) -> String {
    if bound.ip().is_unspecified() {
        let ip = if bound.is_ipv4() {
            "127.0.0.1"
        } else {
            "[::1]"
        };
        format!("{ip}:{}", bound.port())
    } else {
        bound.to_string()
    }
}

/// What the periodic loop needs from its node.
pub struct Periodic {
    pub config: crate::config::Config,
    /// How this node reaches itself ([`self_address`]), never taken for a peer.
    pub me: String,
    /// This node's shard inboxes.
    pub shards: Vec<tokio::sync::mpsc::Sender<ThreadMsg>>,
    /// The peers presence currently announces online.
    pub online: Box<dyn Fn() -> Vec<String> + Send>,
    pub log: std::sync::Arc<SyncLog>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// The periodic anti-entropy loop. Each peer — from `peer_list` plus the peers presence
/// announces (re-read every `peer_discovery_interval`, and while none is known) — has
/// its own schedule: first about 2 s after start (so a node that starts empty fills
/// itself), then every `interval_seconds` ±20% after its last exchange ended, so nodes
/// do not all sync at once and a slow peer delays no other. At most
/// `max_concurrent_syncs` exchanges run at once, each on a thread of its own. A peer
/// that fails waits longer each time ([`backoff_wait`]).
pub async fn run_periodic(node: Periodic) {
    use std::sync::Arc;
    let cfg = &node.config.anti_entropy;
    let interval = Duration::from_secs(cfg.interval_seconds.max(1));
    let discovery = Duration::from_secs(cfg.peer_discovery_interval.max(1));
    let grace = Duration::from_secs(node.config.storage.tombstone_grace_seconds);
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_syncs.max(1)));
    let me = node.me;
    let advertised = node.config.network.advertise_address.clone();
    let mut rng = xxhash_rust::xxh3::xxh3_64(node.config.node_id.as_bytes()) | 1;
    let mut next_random = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut shutdown = node.shutdown;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let first_due = started + jittered(interval.min(FIRST_ROUND_AFTER), next_random());
    let mut discovered: Vec<String> = Vec::new();
    let mut discovered_at: Option<Instant> = None;
    let mut schedule = Schedule::default();
    let mut tick = tokio::time::interval(interval.min(TICK));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some((peer, result)) = done_rx.recv() => {
                let peer: String = peer;
                let result: Result<(Report, Duration), SyncError> = result;
                let (wait, failures) = match &result {
                    Ok((r, took)) => {
                        if r.keys_repaired > 0 {
                            tracing::info!(%peer, keys_repaired = r.keys_repaired, ms = took.as_millis() as u64, "anti-entropy repaired differences");
                        }
                        (jittered(interval, next_random()), 0)
                    }
                    Err(e) => {
                        let failures = schedule.failures(&peer) + 1;
                        let wait = backoff_wait(interval, failures, grace);
                        tracing::warn!(%peer, failures, retry_in_s = wait.as_secs(), "anti-entropy exchange failed: {e}");
                        (wait, failures)
                    }
                };
                schedule.ended(&peer, failures, Instant::now() + wait);
                let result = result.map_err(|e| e.to_string());
                node.log.record(&peer, result, Started::Periodic, Instant::now());
                continue;
            }
            _ = shutdown.wait_for(|&s| s) => return,
        }
        // Presence arrives shortly after start: look again while nothing is known.
        if discovered.is_empty() || discovered_at.is_none_or(|t| t.elapsed() >= discovery) {
            discovered = (node.online)();
            discovered_at = Some(Instant::now());
        }
        let mut peers: Vec<String> = cfg.peer_list.iter().chain(&discovered).cloned().collect();
        peers.sort();
        peers.dedup();
        peers.retain(|p| *p != me && Some(p) != advertised.as_ref());
        for peer in schedule.due(&peers, first_due, Instant::now()) {
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                break;
            };
            let (shards, done) = (node.shards.clone(), done_tx.clone());
            let target = peer.clone();
            let spawned = std::thread::Builder::new()
                .name("sync".into())
                .spawn(move || {
                    let result = run_exchange(shards, &target);
                    drop(permit);
                    let _ = done.send((target, result));
                });
            match spawned {
                Ok(_) => schedule.started(&peer),
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
    fn a_peer_trickling_its_reply_cannot_hold_the_exchange_past_its_deadline() {
        // A fake peer: reads the request, announces a 40-byte reply, then sends one byte
        // every 100 ms (4 s) — each read is quick, the reply as a whole is not.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.read(&mut [0u8; 64]);
            let _ = s.write_all(b"SYNC.REPLY 40\r\n");
            for _ in 0..40 {
                if s.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut peer = TcpPeer::connect(&addr, deadline).unwrap();
        let r = peer.call(&[1]);
        assert!(
            matches!(&r, Err(SyncError::Transport(e)) if e.contains("took too long")),
            "{r:?}"
        );
        // One that says nothing at all is cut at the deadline too, and says so.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_millis(300);
        let r = TcpPeer::connect(&addr, deadline).unwrap().call(&[1]);
        assert!(
            matches!(&r, Err(SyncError::Transport(e)) if e.contains("took too long")),
            "{r:?}"
        );
    }

    #[test]
    fn a_sync_msg_body_must_come_within_the_timeout_or_at_the_minimum_rate() {
        let s = Duration::from_secs;
        let rate = BODY_BYTES_PER_S_MIN as usize;
        // Any pace within the connection timeout; each wait is at most the timeout.
        assert_eq!(body_wait(0, s(0), 30), Some(s(30)));
        assert_eq!(body_wait(10, s(29), 30), Some(s(1)));
        // A trickle is cut once the timeout has passed...
        assert_eq!(body_wait(10, s(30), 30), None);
        assert_eq!(body_wait(10 * rate, s(31), 30), None);
        // ...a sender keeping the minimum rate goes on...
        assert_eq!(body_wait(40 * rate, s(35), 30), Some(s(6)));
        // ...and one that stops after a fast start is cut after the timeout, not later.
        assert_eq!(body_wait(1000 * rate, s(2), 30), Some(s(30)));
        // Without a connection timeout only the rate counts.
        assert_eq!(
            body_wait(0, Duration::from_millis(400), 0),
            Some(Duration::from_millis(600))
        );
        assert_eq!(body_wait(rate, s(2), 0), None);
        assert_eq!(body_wait(2 * rate, s(2), 0), Some(s(1)));
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

    #[test]
    fn peers_are_admitted_by_address() {
        assert!(admit_peer("10.0.0.2:7878").is_ok());
        assert!(admit_peer("node-2.internal:7878").is_ok());
        assert!(admit_peer("0.0.0.0:7878").is_err());
        assert!(admit_peer("[::]:7878").is_err());
        assert!(admit_peer("nonsense").is_err());
        assert!(admit_peer("host:0").is_err());
    }
}
