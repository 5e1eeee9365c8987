//! Readiness (LOADING): a node that may have peers to learn from serves no data command
//! until it has caught up with one of them, so a node restarted empty cannot answer
//! stale reads or turn a replicated counter of 1000 into 1 with an INCR.
//!
//! The decision is a pure state machine ([`Bootstrap`]); [`run`] feeds it what the node
//! observes (exchange results, the broker connection, presence) and acts on it.

use crate::server::Shared;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long after the broker connection is up the node waits for an online presence
/// record before concluding nobody is there: retained records arrive right after the
/// subscription, milliseconds on a LAN. A node with no config file is ready within 2 s.
pub const PRESENCE_SETTLE: Duration = Duration::from_millis(1000);
/// How often the bootstrap looks at the peers and the broker again.
const POLL: Duration = Duration::from_millis(100);

/// The node-wide readiness flag connections check before each batch, and the progress
/// INFO shows.
pub struct Readiness {
    loading: AtomicBool,
    progress: Mutex<String>,
}

impl Readiness {
    pub fn new(loading: bool, progress: &str) -> Readiness {
        Readiness {
            loading: AtomicBool::new(loading),
            progress: Mutex::new(progress.to_string()),
        }
    }

    pub fn is_loading(&self) -> bool {
        self.loading.load(Relaxed)
    }

    pub fn progress(&self) -> String {
        self.progress.lock().map(|p| p.clone()).unwrap_or_default()
    }

    fn set(&self, loading: bool, progress: String) {
        if let Ok(mut p) = self.progress.lock() {
            *p = progress;
        }
        self.loading.store(loading, Relaxed);
    }
}

/// What the node knows at one moment, as the state machine sees it.
#[derive(Debug, Default)]
pub struct Seen {
    /// Peers to try: `peer_list` and the addresses of online presence records.
    pub candidates: Vec<String>,
    /// Whether any online presence record has arrived.
    pub presence_online: bool,
    /// How long the broker connection has been up (`None`: not connected, or MQTT off).
    pub connected_for: Option<Duration>,
}

/// What the bootstrap decides after an observation.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Run an exchange with this peer next.
    Exchange(String),
    /// Nothing to do now; look again shortly.
    Wait,
    /// Loading is over, for this reason (logged, and shown in INFO).
    Ready(Reason),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Reason {
    NobodyToLearnFrom,
    TimedOut,
}

/// The bootstrap's pure core: which peers failed, and when to give up.
pub struct Bootstrap {
    mqtt: bool,
    deadline: Instant,
    /// Peers whose last exchange failed (they are tried again once every other
    /// candidate has failed too).
    failed: Vec<String>,
}

impl Bootstrap {
    pub fn new(mqtt: bool, timeout: Duration, now: Instant) -> Bootstrap {
        Bootstrap {
            mqtt,
            deadline: now + timeout,
            failed: Vec::new(),
        }
    }

    /// When the node becomes ready whatever happens, even in the middle of an exchange.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn exchange_failed(&mut self, peer: &str) {
        if !self.failed.iter().any(|p| p == peer) {
            self.failed.push(peer.to_string());
        }
    }

    pub fn next(&mut self, seen: &Seen, now: Instant) -> Step {
        if now >= self.deadline {
            return Step::Ready(Reason::TimedOut);
        }
        if let Some(peer) = seen.candidates.iter().find(|c| !self.failed.contains(c)) {
            return Step::Exchange(peer.clone());
        }
        // Every candidate (if any) has failed. Nobody to learn from, unless the broker
        // may still tell of someone: it is not connected yet, or has not had time to
        // deliver the retained presence records, or did deliver one.
        let broker_silent = !self.mqtt
            || (!seen.presence_online && seen.connected_for.is_some_and(|t| t >= PRESENCE_SETTLE));
        if broker_silent {
            return Step::Ready(Reason::NobodyToLearnFrom);
        }
        if !seen.candidates.is_empty() {
            // Someone is (or was) online: try them all again, a round at a time.
            self.failed.clear();
        }
        Step::Wait
    }
}

/// Whether a node with this configuration starts loading: it can learn from peers
/// (a `peer_list`, or MQTT presence) and has anti-entropy to learn with.
pub fn needed(config: &crate::config::Config) -> bool {
    let ae = &config.anti_entropy;
    ae.enabled && (!ae.peer_list.is_empty() || config.mqtt.enabled)
}

/// The node's readiness for its whole life: the bootstrap at start, then the watch for
/// a long isolation (which sends it back to LOADING to rejoin).
pub async fn run(shared: Arc<Shared>) {
    catch_up(&shared).await;
    if needed(&shared.config) && !*shared.shutdown.borrow() {
        watch_isolation(&shared).await;
    }
}

/// Drive the bootstrap until the node is ready (or stops).
async fn catch_up(shared: &Arc<Shared>) {
    let config = &shared.config;
    if !needed(config) {
        if !config.anti_entropy.enabled && config.mqtt.enabled {
            tracing::info!(
                "anti-entropy is disabled: this node cannot catch up with its peers and \
                 serves only what replication delivers from now on"
            );
        }
        return;
    }
    let me = crate::antientropy::self_address(shared.local_addr);
    let advertised = config.network.advertise_address.clone();
    let timeout = Duration::from_secs(config.anti_entropy.bootstrap_timeout_seconds);
    let mut state = Bootstrap::new(config.mqtt.enabled, timeout, Instant::now());
    let mut connected_since: Option<Instant> = None;
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let connected = shared
            .outbound
            .as_ref()
            .is_some_and(|o| o.stats.connected.load(Relaxed));
        connected_since = connected.then(|| connected_since.unwrap_or_else(Instant::now));
        let online = shared.peers.online_addrs();
        let mut candidates: Vec<String> = config.anti_entropy.peer_list.clone();
        candidates.extend(online.iter().cloned());
        candidates.sort();
        candidates.dedup();
        candidates.retain(|p| *p != me && Some(p) != advertised.as_ref());
        let seen = Seen {
            candidates,
            presence_online: !online.is_empty(),
            connected_for: connected_since.map(|t| t.elapsed()),
        };
        match state.next(&seen, Instant::now()) {
            Step::Exchange(peer) => {
                shared
                    .readiness
                    .set(true, format!("exchanging with {peer}"));
                let (local, target) = (me.clone(), peer.clone());
                let exchange = tokio::task::spawn_blocking(move || {
                    crate::antientropy::run_exchange(&local, &target)
                });
                // A peer that accepts and never answers must not hold the node past its
                // deadline: stop waiting (the exchange's own deadline ends its thread).
                let deadline = tokio::time::Instant::from_std(state.deadline());
                let result = tokio::select! {
                    r = exchange => r,
                    _ = tokio::time::sleep_until(deadline) => continue,
                    _ = shutdown.wait_for(|&s| s) => return,
                };
                match result {
                    Ok(Ok((report, took))) => {
                        tracing::info!(
                            %peer,
                            keys_repaired = report.keys_repaired,
                            ms = took.as_millis() as u64,
                            "caught up with a peer: serving clients"
                        );
                        let ended = Instant::now();
                        let periodic = crate::antientropy::Started::Periodic;
                        shared
                            .sync_log
                            .record(&peer, Ok((report, took)), periodic, ended);
                        shared.readiness.set(false, format!("synced with {peer}"));
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "bootstrap exchange failed: {e}");
                        shared.readiness.set(true, format!("{peer} failed: {e}"));
                        state.exchange_failed(&peer);
                    }
                    Err(e) => {
                        tracing::error!("bootstrap exchange task failed: {e}");
                        state.exchange_failed(&peer);
                    }
                }
            }
            Step::Wait => {
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = shutdown.wait_for(|&s| s) => return,
                }
            }
            Step::Ready(Reason::NobodyToLearnFrom) => {
                tracing::info!("no peer to learn from: serving clients");
                shared
                    .readiness
                    .set(false, "no peer to learn from".to_string());
                return;
            }
            Step::Ready(Reason::TimedOut) => {
                tracing::warn!(
                    timeout_s = timeout.as_secs(),
                    "bootstrap timed out before an exchange with a peer completed: serving \
                     clients with what this node has ([anti_entropy] bootstrap_timeout_seconds)"
                );
                shared.readiness.set(false, "timed out".to_string());
                return;
            }
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// A node cut off from every peer and the broker for longer than the tombstone grace
/// may hold keys whose deletes its peers have since purged: pushed back, they would
/// come back to life everywhere. So once its last contact (the broker connected, or an
/// exchange completed) is older than the grace, it goes back to LOADING and rejoins
/// (docs/ANTI_ENTROPY.md, "Long isolation").
async fn watch_isolation(shared: &Arc<Shared>) {
    use crate::version::now_us;
    let grace_us = shared.config.storage.tombstone_grace_seconds * 1_000_000;
    let mut contact = now_us();
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|&s| s) => return,
        }
        let now = now_us();
        // Through the broker: the last moment it had confirmed all this node wrote (a
        // write it never confirmed is newer, so it is kept through a rejoin).
        if let Some(o) = &shared.outbound {
            let s = &o.stats;
            contact = contact.max(s.settled_at_us.load(Relaxed));
            // Connected and idle: no event may come for a keep-alive period, yet the
            // broker has everything.
            let idle = s.buffered_events.load(Relaxed) == 0 && o.queued() == 0;
            if s.connected.load(Relaxed) && s.settled.load(Relaxed) && idle {
                contact = now;
            }
        }
        if let Some(t) = shared.sync_log.last_success() {
            contact = contact.max(now.saturating_sub(t.elapsed().as_micros() as u64));
        }
        let silent = now.saturating_sub(contact);
        if silent > grace_us {
            if !rejoin(shared, contact, Duration::from_micros(silent)).await {
                return;
            }
            contact = now_us();
        }
    }
}

/// LOADING until this node has caught up with a peer that is itself ready (not loading
/// or rejoining): only such a peer knows which deletes happened meanwhile. Right before
/// the first exchange with it, every entry older than `cut` (the last contact) is
/// dropped; the exchange fetches back what is still live and hands the peer the writes
/// made since. When the only peers reachable are loading too (the whole cluster was cut
/// apart), it waits `bootstrap_timeout_seconds`, then merges with one without dropping
/// anything: losing data would be worse than deletes that reappear. Returns false when
/// the node stops meanwhile.
async fn rejoin(shared: &Arc<Shared>, cut: u64, silent: Duration) -> bool {
    tracing::warn!(
        silent_s = silent.as_secs(),
        "no contact with any peer or the broker for longer than tombstone_grace_seconds: \
         LOADING again to rejoin (entries older than the last contact are dropped and \
         fetched back from a ready peer)"
    );
    let progress = format!("rejoining after {} s without contact", silent.as_secs());
    shared.readiness.set(true, progress);
    let timeout = Duration::from_secs(shared.config.anti_entropy.bootstrap_timeout_seconds);
    let me = crate::antientropy::self_address(shared.local_addr);
    let (mut forgot, mut loading_peer_since) = (false, None::<Instant>);
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let mut loading_peer = None;
        for peer in every_known_peer(shared) {
            let target = peer.clone();
            let status = tokio::task::spawn_blocking(move || peer_is_loading(&target)).await;
            match status {
                Ok(Some(false)) => {
                    if !forgot {
                        let dropped = forget_older_than(shared, cut).await;
                        tracing::info!(dropped, %peer, "dropped entries older than the last contact; fetching from a ready peer");
                        forgot = true;
                    }
                    if exchange(shared, &me, &peer).await {
                        tracing::info!(%peer, "rejoined after a long isolation: serving clients");
                        shared.readiness.set(false, format!("rejoined via {peer}"));
                        return true;
                    }
                }
                Ok(Some(true)) => loading_peer = Some(peer),
                _ => {}
            }
        }
        match loading_peer {
            Some(peer) if !forgot => {
                let since = *loading_peer_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= timeout && exchange(shared, &me, &peer).await {
                    tracing::warn!(%peer, "no ready peer to rejoin through (every reachable one is loading too): merged with one without dropping old entries; deletes made elsewhere during the isolation may reappear");
                    shared
                        .readiness
                        .set(false, format!("merged with {peer} (no ready peer)"));
                    return true;
                }
            }
            _ => loading_peer_since = None,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|&s| s) => return false,
        }
    }
}

/// Every peer this node knows of: `peer_list`, and every peer presence ever announced
/// (online or not: with the broker gone, online flags are stale). For a rejoin, and for
/// the hand-off at shutdown.
pub fn every_known_peer(shared: &Shared) -> Vec<String> {
    let me = crate::antientropy::self_address(shared.local_addr);
    let known = shared
        .peers
        .snapshot()
        .into_iter()
        .map(|(_, p)| p.presence.addr);
    let mut all: Vec<String> = shared.config.anti_entropy.peer_list.clone();
    all.extend(known);
    all.sort();
    all.dedup();
    let advertised = shared.config.network.advertise_address.as_ref();
    all.retain(|p| *p != me && Some(p) != advertised);
    all
}

/// One exchange with `peer` through this node's own port (open, and SYNC.MSG is served
/// while loading); true when it completed.
async fn exchange(shared: &Arc<Shared>, me: &str, peer: &str) -> bool {
    let (local, target) = (me.to_string(), peer.to_string());
    let result =
        tokio::task::spawn_blocking(move || crate::antientropy::run_exchange(&local, &target))
            .await;
    match result {
        Ok(Ok((report, took))) => {
            let periodic = crate::antientropy::Started::Periodic;
            shared
                .sync_log
                .record(peer, Ok((report, took)), periodic, Instant::now());
            true
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, "rejoin exchange failed: {e}");
            false
        }
        Err(_) => false,
    }
}

/// Drop every shard's entries older than `cut`; returns how many were dropped.
async fn forget_older_than(shared: &Shared, cut: u64) -> u64 {
    let mut dropped = 0;
    for inbox in &shared.inboxes[..1 << shared.shard_bits] {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let msg = crate::server::ThreadMsg::Forget { hlc: cut, reply };
        if inbox.send(msg).await.is_ok() {
            dropped += rx.await.unwrap_or(0);
        }
    }
    dropped
}

/// Whether the node at `addr` says it is loading (its INFO `loading` field); `None` when
/// it cannot be asked. A node too old to have the field is ready.
fn peer_is_loading(addr: &str) -> Option<bool> {
    use std::io::{BufRead, BufReader, Read, Write};
    let target = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .ok()?
        .next()?;
    let wait = Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&target, wait).ok()?;
    stream.set_read_timeout(Some(wait)).ok()?;
    stream.write_all(b"INFO\r\n").ok()?;
    let mut reader = BufReader::new(stream).take(64 << 10);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let n: usize = line.trim().strip_prefix("INFO ")?.parse().ok()?;
    for _ in 0..n {
        line.clear();
        reader.read_line(&mut line).ok()?;
        if let Some(v) = line.trim().strip_prefix("loading:") {
            return Some(v == "1");
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(candidates: &[&str], presence: bool, connected_ms: Option<u64>) -> Seen {
        Seen {
            candidates: candidates.iter().map(|s| s.to_string()).collect(),
            presence_online: presence,
            connected_for: connected_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn tries_each_candidate_then_finds_nobody_once_the_broker_had_time_to_tell() {
        let t0 = Instant::now();
        let mut b = Bootstrap::new(true, Duration::from_secs(30), t0);
        let peers = seen(&["a:1", "b:2"], false, None);
        assert_eq!(b.next(&peers, t0), Step::Exchange("a:1".into()));
        b.exchange_failed("a:1");
        assert_eq!(b.next(&peers, t0), Step::Exchange("b:2".into()));
        b.exchange_failed("b:2");
        // The broker is not connected yet: it may still tell of a peer. Wait, then try
        // the same peers again (one of them may have been starting too).
        assert_eq!(b.next(&peers, t0), Step::Wait);
        let peers = seen(&["a:1", "b:2"], false, Some(200));
        assert_eq!(b.next(&peers, t0), Step::Exchange("a:1".into()));
        b.exchange_failed("a:1");
        b.exchange_failed("b:2");
        assert_eq!(b.next(&peers, t0), Step::Wait);
        let peers = seen(&["a:1", "b:2"], false, Some(1000));
        b.exchange_failed("a:1");
        b.exchange_failed("b:2");
        assert_eq!(b.next(&peers, t0), Step::Ready(Reason::NobodyToLearnFrom));
    }

    #[test]
    fn an_online_peer_keeps_it_loading_until_an_exchange_succeeds_or_time_runs_out() {
        let t0 = Instant::now();
        let mut b = Bootstrap::new(true, Duration::from_secs(30), t0);
        let peers = seen(&["c:3"], true, Some(5000));
        assert_eq!(b.next(&peers, t0), Step::Exchange("c:3".into()));
        b.exchange_failed("c:3");
        assert_eq!(b.next(&peers, t0), Step::Wait);
        // The next round tries it again.
        assert_eq!(b.next(&peers, t0), Step::Exchange("c:3".into()));
        let late = t0 + Duration::from_secs(30);
        assert_eq!(b.next(&peers, late), Step::Ready(Reason::TimedOut));
    }

    #[test]
    fn without_mqtt_refusing_peers_mean_nobody_to_learn_from() {
        let t0 = Instant::now();
        let mut b = Bootstrap::new(false, Duration::from_secs(30), t0);
        let peers = seen(&["a:1"], false, None);
        assert_eq!(b.next(&peers, t0), Step::Exchange("a:1".into()));
        b.exchange_failed("a:1");
        assert_eq!(b.next(&peers, t0), Step::Ready(Reason::NobodyToLearnFrom));
        let mut alone = Bootstrap::new(true, Duration::from_secs(30), t0);
        assert_eq!(
            alone.next(&seen(&[], false, Some(1000)), t0),
            Step::Ready(Reason::NobodyToLearnFrom)
        );
    }
}
