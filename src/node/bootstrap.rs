//! Readiness (LOADING): a node that may have peers to learn from serves no data command
//! until it has caught up with one of them, so a node restarted empty cannot answer
//! stale reads or turn a replicated counter of 1000 into 1 with an INCR.
//!
//! The decision is a pure state machine ([`Bootstrap`]); [`run`] feeds it what the node
//! observes (exchange results, the broker connection, presence) and acts on it.

use crate::node::shared::Shared;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long after the broker connection is up the node waits for an online presence
/// record before concluding nobody is there: retained records arrive right after the
/// subscription, milliseconds on a LAN. A node with no config file is ready within 2 s.
pub const PRESENCE_SETTLE: Duration = Duration::from_millis(1000);
/// How often the bootstrap looks at the peers and the broker again.
const POLL: Duration = Duration::from_millis(100);

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
    /// Ask this peer whether it is ready; exchange with it if it is.
    Probe(String),
    /// Exchange with this peer although it is loading too: no ready peer answered (a
    /// cluster's cold start, where every node is loading).
    ExchangeLoading(String),
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

/// How long a node with MQTT waits for its broker before exchanging with `peer_list`:
/// exchanging first could end LOADING before the node is subscribed, and changes
/// published in between would be missed until the next exchange.
pub const BROKER_WAIT: Duration = Duration::from_secs(2);

/// The bootstrap's pure core: which peers failed or are loading, and when to give up.
pub struct Bootstrap {
    mqtt: bool,
    started: Instant,
    deadline: Instant,
    /// Peers whose last exchange or probe failed (tried again once every other
    /// candidate has been tried).
    failed: Vec<String>,
    /// Peers that answered they are loading themselves: a restarted, empty peer must
    /// not pass for the cluster's state while a ready one may answer.
    loading: Vec<String>,
}

impl Bootstrap {
    pub fn new(mqtt: bool, timeout: Duration, now: Instant) -> Bootstrap {
        Bootstrap {
            mqtt,
            started: now,
            deadline: now + timeout,
            failed: Vec::new(),
            loading: Vec::new(),
        }
    }

    /// When the node becomes ready whatever happens, even in the middle of an exchange.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn failed(&mut self, peer: &str) {
        if !self.failed.iter().any(|p| p == peer) {
            self.failed.push(peer.to_string());
        }
    }

    pub fn is_loading(&mut self, peer: &str) {
        if !self.loading.iter().any(|p| p == peer) {
            self.loading.push(peer.to_string());
        }
    }

    pub fn next(&mut self, seen: &Seen, now: Instant) -> Step {
        if now >= self.deadline {
            return Step::Ready(Reason::TimedOut);
        }
        if self.mqtt && seen.connected_for.is_none() && now < self.started + BROKER_WAIT {
            return Step::Wait;
        }
        let tried = |p: &String| self.failed.contains(p) || self.loading.contains(p);
        if let Some(peer) = seen.candidates.iter().find(|c| !tried(c)) {
            return Step::Probe(peer.clone());
        }
        let loading = seen.candidates.iter().find(|c| self.loading.contains(c));
        if let Some(peer) = loading.filter(|c| !self.failed.contains(c)) {
            return Step::ExchangeLoading(peer.clone());
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
            self.loading.clear();
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
///
/// A node that recovers its data from disk after being down longer than the tombstone
/// grace rejoins instead (as after a long isolation): its peers may have purged deletes
/// of keys it still holds, and the bootstrap exchange would hand those keys back.
///
/// Starts once the shards are recovered from disk; [`must_rejoin`] decided by then
/// whether the node holds its old entries back (see [`rejoin`]).
pub async fn run(shared: Arc<Shared>) {
    shared.readiness.recovered().await;
    let cut = shared.disk.get().and_then(|d| d.rejoin_cut());
    match cut.filter(|_| shared.readiness.is_stale()) {
        Some(since) => {
            let down = Duration::from_micros(crate::store::version::now_us().saturating_sub(since));
            if !rejoin(&shared, since, down).await {
                return;
            }
        }
        None => catch_up(&shared).await,
    }
    if needed(&shared.config) && !*shared.shutdown.borrow() {
        watch_isolation(&shared).await;
    }
}

/// How long a node may be down and still bootstrap; `None` when it has no peers to
/// learn from. For `disk::open`, which records a rejoin owed ([`must_rejoin`]).
pub fn rejoin_after_us(config: &crate::config::Config) -> Option<u64> {
    let grace_us = config
        .storage
        .tombstone_grace_seconds
        .saturating_mul(1_000_000);
    needed(config).then_some(grace_us)
}

/// Whether a node that recovered from disk must rejoin rather than bootstrap: it has
/// peers to learn from and owes a rejoin — down longer than the tombstone grace, or a
/// rejoin a stop or crash cut short (`disk::open` recorded it). Then it is marked stale
/// before anything is served from its recovered shards, so no exchange sees the
/// entries it holds back.
pub fn must_rejoin(shared: &Shared) -> bool {
    let owed = shared.disk.get().and_then(|d| d.rejoin_cut());
    owed.is_some() && needed(&shared.config)
}

/// Record the rejoin this node starts, so a stop or crash before it ends cannot make
/// the next start forget it (a rejoin from disk was recorded when the disk opened).
async fn mark_rejoin(shared: &Shared, cut: u64) {
    let Some(disk) = shared.disk.get().cloned() else {
        return;
    };
    if disk.rejoin_cut() == Some(cut) {
        return;
    }
    let marked = tokio::task::spawn_blocking(move || disk.mark_rejoin(cut)).await;
    if let Ok(Err(e)) = marked {
        tracing::error!(
            "cannot record the rejoin on disk (a restart before it ends would not rejoin): {e}"
        );
    }
}

/// The rejoin is over: its marker goes, once everything logged so far (the forget of
/// the old entries among it) is synced.
async fn end_rejoin(shared: &Shared) {
    let Some(disk) = shared.disk.get().cloned() else {
        return;
    };
    if disk.rejoin_cut().is_none() {
        return;
    }
    let ended = tokio::task::spawn_blocking(move || disk.rejoined()).await;
    if let Ok(Err(e)) = ended {
        tracing::error!("cannot end the rejoin on disk (the next start rejoins again): {e}");
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
    let timeout = Duration::from_secs(config.anti_entropy.bootstrap_timeout_seconds);
    let started = Instant::now();
    let mut state = Bootstrap::new(config.mqtt.enabled, timeout, started);
    let mut connected_since: Option<Instant> = None;
    let mut shutdown = shared.shutdown.subscribe();
    let ready = |why: String| {
        let ms = started.elapsed().as_millis();
        shared
            .readiness
            .set(false, format!("{why} (after {ms} ms)"));
    };
    loop {
        connected_since =
            broker_connected(shared).then(|| connected_since.unwrap_or_else(Instant::now));
        let seen = Seen {
            candidates: peer_addrs(shared, true),
            presence_online: !shared.peers.online_addrs().is_empty(),
            connected_for: connected_since.map(|t| t.elapsed()),
        };
        let peer = match state.next(&seen, Instant::now()) {
            Step::Probe(peer) => match probe(&mut state, peer).await {
                Some(peer) => peer,
                None => continue,
            },
            Step::ExchangeLoading(peer) => peer,
            Step::Wait => {
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = shutdown.wait_for(|&s| s) => return,
                }
                continue;
            }
            Step::Ready(reason) => return ready(gave_up(reason, timeout)),
        };
        shared
            .readiness
            .set(true, format!("exchanging with {peer}"));
        // A peer that accepts and never answers must not hold the node past its
        // deadline: stop waiting (the exchange's own deadline ends its thread).
        let deadline = tokio::time::Instant::from_std(state.deadline());
        let result = tokio::select! {
            r = copy_from(shared, &peer) => r,
            _ = tokio::time::sleep_until(deadline) => continue,
            _ = shutdown.wait_for(|&s| s) => return,
        };
        match result {
            Ok(repaired) => {
                tracing::info!(%peer, keys_repaired = repaired, "caught up with a peer: serving clients");
                return ready(format!("synced with {peer}"));
            }
            Err(e) => {
                tracing::debug!(%peer, "bootstrap exchange failed: {e}");
                shared.readiness.set(true, format!("{peer} failed: {e}"));
                state.failed(&peer);
            }
        }
    }
}

/// Ask `peer` whether it is LOADING: it is the peer to learn from if it is not. A peer
/// that is LOADING, or cannot be asked, is noted in `state` instead.
async fn probe(state: &mut Bootstrap, peer: String) -> Option<String> {
    let target = peer.clone();
    match tokio::task::spawn_blocking(move || peer_is_loading(&target)).await {
        Ok(Some(false)) => Some(peer),
        Ok(Some(true)) => {
            state.is_loading(&peer);
            None
        }
        _ => {
            state.failed(&peer);
            None
        }
    }
}

/// Say why the bootstrap ends without an exchange; returns the progress INFO shows.
fn gave_up(reason: Reason, timeout: Duration) -> String {
    match reason {
        Reason::NobodyToLearnFrom => {
            tracing::info!("no peer to learn from: serving clients");
            "no peer to learn from".into()
        }
        Reason::TimedOut => {
            tracing::warn!(
                timeout_s = timeout.as_secs(),
                "bootstrap timed out before an exchange with a peer completed: serving \
                 clients with what this node has ([anti_entropy] bootstrap_timeout_seconds)"
            );
            "timed out".into()
        }
    }
}

/// Exchange with `peer` until an exchange repairs nothing: one exchange moves at most a
/// reply's worth of entries per round (16 MiB), so a large difference takes several.
/// Returns the keys repaired in all.
async fn copy_from(shared: &Arc<Shared>, peer: &str) -> Result<u64, String> {
    const EXCHANGES_MAX: usize = 1000;
    let mut repaired = 0;
    for _ in 0..EXCHANGES_MAX {
        let (shards, target) = (shared.inboxes.clone(), peer.to_string());
        let result = tokio::task::spawn_blocking(move || {
            crate::antientropy::client::run_exchange(shards, &target)
        })
        .await
        .map_err(|e| e.to_string())?;
        let (report, took) = result.map_err(|e| e.to_string())?;
        let n = report.keys_repaired;
        let periodic = crate::antientropy::log::Started::Periodic;
        shared
            .sync_log
            .record(peer, Ok((report, took)), periodic, Instant::now());
        repaired += n;
        if n == 0 {
            return Ok(repaired);
        }
    }
    Err(format!("still repairing after {EXCHANGES_MAX} exchanges"))
}

fn broker_connected(shared: &Shared) -> bool {
    shared
        .outbound
        .as_ref()
        .is_some_and(|o| o.stats.connected.load(Relaxed))
}

/// A node cut off from every peer and the broker for longer than the tombstone grace
/// may hold keys whose deletes its peers have since purged: pushed back, they would
/// come back to life everywhere. So once its last contact (connected to the broker, or
/// an exchange it ran completed) is older than the grace, it goes back to LOADING and
/// rejoins (docs/ANTI_ENTROPY.md, "Long isolation").
async fn watch_isolation(shared: &Arc<Shared>) {
    use crate::store::version::now_us;
    let grace_us = shared.config.storage.tombstone_grace_seconds * 1_000_000;
    let mut contact = now_us();
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|&s| s) => return,
        }
        let now = now_us();
        if broker_connected(shared) {
            contact = now;
        }
        if let Some(t) = shared.sync_log.last_success() {
            contact = contact.max(now.saturating_sub(t.elapsed().as_micros() as u64));
        }
        let silent = now.saturating_sub(contact);
        if silent > grace_us {
            if !rejoin(shared, cut(shared, now), Duration::from_micros(silent)).await {
                return;
            }
            contact = now_us();
        }
    }
}

/// What a rejoin keeps: entries newer than the last moment this node knew its writes
/// had reached the others — the broker had confirmed all of them, or an exchange it ran
/// started. Earlier entries the peers hold (or deleted); later ones may be only here.
/// Conservative: a write whose confirmation is unknown is newer, so it is kept.
fn cut(shared: &Shared, now: u64) -> u64 {
    let broker = shared
        .outbound
        .as_ref()
        .map_or(0, |o| o.stats.settled_at_us.load(Relaxed));
    let exchange = shared
        .sync_log
        .last_success()
        .map_or(0, |t| now.saturating_sub(t.elapsed().as_micros() as u64));
    broker.max(exchange)
}

/// LOADING until this node has caught up with a peer that is itself ready (not loading
/// or rejoining): only such a peer knows which deletes happened meanwhile. Right before
/// the first exchange with it, every entry older than `cut` is dropped; the exchange
/// fetches back what is still live and hands the peer the writes made since. Until then
/// the node holds those entries back ([`crate::node::shared::Readiness::is_stale`]): it
/// serves no peer's exchange and runs none of its own, or a peer would take them back.
///
/// While nobody can be reached the node stays LOADING: that is what isolation means.
/// Once contact is back without a ready peer, it does not wait for ever: with the broker
/// up and no other node announced within the settle time there is nobody to learn from;
/// and after `bootstrap_timeout_seconds` with only loading peers (the whole cluster was
/// cut apart, so no side knows more) it merges with one without dropping anything —
/// deletes made elsewhere meanwhile may reappear, but nothing is lost. Returns false
/// when the node stops meanwhile.
async fn rejoin(shared: &Arc<Shared>, cut: u64, silent: Duration) -> bool {
    tracing::warn!(
        silent_s = silent.as_secs(),
        "no contact with any peer or the broker for longer than tombstone_grace_seconds: \
         LOADING again to rejoin (entries older than the last contact are dropped and \
         fetched back from a ready peer)"
    );
    let progress = format!("rejoining after {} s without contact", silent.as_secs());
    shared.readiness.set(true, progress);
    shared.readiness.set_stale(true);
    mark_rejoin(shared, cut).await;
    let timeout = Duration::from_secs(shared.config.anti_entropy.bootstrap_timeout_seconds);
    let (mut forgot, mut back_since) = (false, None::<Instant>);
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
                        end_rejoin(shared).await;
                        shared.readiness.set_stale(false);
                    }
                    if copy_from(shared, &peer).await.is_ok() {
                        tracing::info!(%peer, "rejoined after a long isolation: serving clients");
                        shared.readiness.set(false, format!("rejoined via {peer}"));
                        return true;
                    }
                }
                Ok(Some(true)) => loading_peer = Some(peer),
                _ => {}
            }
        }
        let connected = broker_connected(shared);
        if connected || loading_peer.is_some() {
            let since = *back_since.get_or_insert_with(Instant::now);
            let nobody =
                connected && loading_peer.is_none() && shared.peers.online_addrs().is_empty();
            if nobody && since.elapsed() >= PRESENCE_SETTLE {
                tracing::info!("contact is back and no other node is there: serving clients");
                // Serving (and exchanging) what it holds from now on: a later start has
                // nothing left to hold back.
                end_rejoin(shared).await;
                shared.readiness.set_stale(false);
                shared
                    .readiness
                    .set(false, "rejoined: no peer to learn from".into());
                return true;
            }
            if since.elapsed() >= timeout {
                // Merging without dropping anything, both ways.
                end_rejoin(shared).await;
                shared.readiness.set_stale(false);
                let merged = match &loading_peer {
                    Some(peer) => copy_from(shared, peer).await.is_ok(),
                    None => false,
                };
                tracing::warn!(
                    merged,
                    dropped_old_entries = forgot,
                    "contact is back but no ready peer answered within \
                     bootstrap_timeout_seconds: serving clients with what this node has; \
                     deletes made elsewhere during the isolation may reappear"
                );
                shared
                    .readiness
                    .set(false, "rejoined without a ready peer".into());
                return true;
            }
        } else {
            back_since = None;
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
    peer_addrs(shared, false)
}

/// `peer_list` and the addresses presence announced (only those online, or all), sorted,
/// without this node.
fn peer_addrs(shared: &Shared, online_only: bool) -> Vec<String> {
    let me = crate::antientropy::client::self_address(shared.local_addr);
    let known = shared.peers.snapshot().into_iter().map(|(_, p)| p.presence);
    let mut all: Vec<String> = shared.config.anti_entropy.peer_list.clone();
    all.extend(known.filter(|p| p.online || !online_only).map(|p| p.addr));
    all.sort();
    all.dedup();
    let advertised = shared.config.network.advertise_address.as_ref();
    all.retain(|p| *p != me && Some(p) != advertised);
    all
}

/// Drop every shard's entries older than `cut`; returns how many were dropped.
async fn forget_older_than(shared: &Shared, cut: u64) -> u64 {
    let mut dropped = 0;
    for inbox in &shared.inboxes[..1 << shared.shard_bits] {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let msg = crate::node::inbox::ThreadMsg::Forget { hlc: cut, reply };
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
        let peers = seen(&["a:1", "b:2"], false, Some(0));
        assert_eq!(b.next(&peers, t0), Step::Probe("a:1".into()));
        b.failed("a:1");
        assert_eq!(b.next(&peers, t0), Step::Probe("b:2".into()));
        b.failed("b:2");
        // The broker has not had time to deliver presence: wait, then try them again
        // (one of them may have been starting too).
        assert_eq!(b.next(&peers, t0), Step::Wait);
        assert_eq!(b.next(&peers, t0), Step::Probe("a:1".into()));
        b.failed("a:1");
        b.failed("b:2");
        let peers = seen(&["a:1", "b:2"], false, Some(1000));
        assert_eq!(b.next(&peers, t0), Step::Ready(Reason::NobodyToLearnFrom));
    }

    #[test]
    fn with_mqtt_it_waits_for_the_broker_before_dialling_the_peer_list() {
        let t0 = Instant::now();
        let mut b = Bootstrap::new(true, Duration::from_secs(30), t0);
        let peers = seen(&["a:1"], false, None);
        assert_eq!(b.next(&peers, t0), Step::Wait, "not subscribed yet");
        // The broker stays away: the peer list is tried anyway.
        assert_eq!(b.next(&peers, t0 + BROKER_WAIT), Step::Probe("a:1".into()));
    }

    #[test]
    fn a_loading_peer_is_used_only_when_no_ready_one_answers() {
        let t0 = Instant::now();
        let mut b = Bootstrap::new(false, Duration::from_secs(30), t0);
        let peers = seen(&["empty:1", "full:2"], false, None);
        assert_eq!(b.next(&peers, t0), Step::Probe("empty:1".into()));
        b.is_loading("empty:1");
        assert_eq!(b.next(&peers, t0), Step::Probe("full:2".into()));
        b.failed("full:2");
        // Nobody ready answered: a cluster starting cold, every node loading.
        assert_eq!(b.next(&peers, t0), Step::ExchangeLoading("empty:1".into()));
        b.failed("empty:1");
        assert_eq!(b.next(&peers, t0), Step::Ready(Reason::NobodyToLearnFrom));
    }

    #[test]
    fn an_online_peer_keeps_it_loading_until_an_exchange_succeeds_or_time_runs_out() {
        let t0 = Instant::now();
        let mut b = Bootstrap::new(true, Duration::from_secs(30), t0);
        let peers = seen(&["c:3"], true, Some(5000));
        assert_eq!(b.next(&peers, t0), Step::Probe("c:3".into()));
        b.failed("c:3");
        assert_eq!(b.next(&peers, t0), Step::Wait);
        // The next round tries it again.
        assert_eq!(b.next(&peers, t0), Step::Probe("c:3".into()));
        let late = t0 + Duration::from_secs(30);
        assert_eq!(b.next(&peers, late), Step::Ready(Reason::TimedOut));
    }

    #[test]
    fn without_mqtt_refusing_peers_mean_nobody_to_learn_from() {
        let t0 = Instant::now();
        let mut b = Bootstrap::new(false, Duration::from_secs(30), t0);
        let peers = seen(&["a:1"], false, None);
        assert_eq!(b.next(&peers, t0), Step::Probe("a:1".into()));
        b.failed("a:1");
        assert_eq!(b.next(&peers, t0), Step::Ready(Reason::NobodyToLearnFrom));
        let mut alone = Bootstrap::new(true, Duration::from_secs(30), t0);
        assert_eq!(
            alone.next(&seen(&[], false, Some(1000)), t0),
            Step::Ready(Reason::NobodyToLearnFrom)
        );
    }
}
