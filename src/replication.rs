//! Replication over MQTT (I/O edge): one dedicated thread publishes this node's changes
//! in batches and applies the changes of its peers.
//!
//! Shards hand their journals ([`Shard::take_journal`]) to [`Outbound::push`], which
//! never blocks. The replication thread moves them into its outbox, packs events into
//! payloads ([`crate::changes`]) of at most `batch_max_events` events, published with
//! QoS 1 once full or `batch_max_delay_us` after the oldest event arrived. Flow control:
//! - connected and keeping up: nothing is dropped. When the queue to this thread is full,
//!   connections stop reading new commands ([`Outbound::admit`]); after
//!   `backpressure_max_ms` they go on and changes beyond the queue are dropped and
//!   counted (anti-entropy repairs them), so a stuck broker never stalls clients for long;
//! - disconnected: changes wait in the outbox up to `offline_buffer_events`, then are
//!   dropped and counted; after reconnecting they go out, oldest first.
//!
//! Payloads not yet acknowledged (PUBACK) when the connection drops are published
//! again after reconnecting, unless the broker kept the session (then rumqttc resends
//! them itself). After a reconnect the thread waits until every peer that was online has
//! announced itself again (so has re-subscribed), at most [`RESUBSCRIBE_WAIT`], before
//! publishing: changes published before a peer re-subscribes would never reach it.

use crate::changes::{decode, DecodeError, Limits, PayloadBuilder};
use crate::config::Config;
use crate::keyspace::{shard_of_bucket, KeyHash};
use crate::ops::Span;
use crate::peers::{Peers, Presence};
use crate::server::ThreadMsg;
use crate::shard::{Journal, Shard};
use crate::version::{origin_of, Version};
use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

/// Events queued from the shards to the replication thread before connections wait:
/// `offline_buffer_events`, within these bounds (both bound the same path's memory).
pub const QUEUE_EVENTS: std::ops::RangeInclusive<usize> = 1024..=64 * 1024;
/// A payload is cut once it holds this many bytes (a single larger event goes alone).
pub const PAYLOAD_TARGET_BYTES: usize = 64 * 1024;
/// Payloads published and not yet acknowledged, at most, by count and by bytes. Some
/// brokers (rumqttd) acknowledge in bunches: a small window starves small payloads
/// (with 64, one event per payload ran at 2.7k/s through rumqttd; with 1,024, 63k/s).
const UNCONFIRMED_MAX: usize = 1024;
const UNCONFIRMED_BYTES_MAX: usize = 16 << 20;
/// Reconnect backoff: doubles from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest wait, after a reconnect, for peers to re-subscribe before publishing anyway.
pub const RESUBSCRIBE_WAIT: Duration = Duration::from_secs(6);
/// How long a stopping node tries to publish what it still holds.
const STOP_FLUSH: Duration = Duration::from_secs(1);

/// The largest payload a node sends or accepts: a full batch plus one largest event.
pub fn payload_bytes_max(value_bytes_max: usize) -> usize {
    PAYLOAD_TARGET_BYTES + value_bytes_max + 2 * crate::protocol::KEY_BYTES_MAX
}

/// Counters for INFO; all monotonic except the gauges named so.
#[derive(Default)]
pub struct ReplStats {
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    pub published_events: AtomicU64,
    pub published_payloads: AtomicU64,
    /// Times a connection paused reading because the queue was full.
    pub backpressure_waits: AtomicU64,
    /// Changes dropped because the queue stayed full past `backpressure_max_ms`.
    pub dropped_overflow: AtomicU64,
    /// Changes dropped because the offline buffer was full.
    pub dropped_offline: AtomicU64,
    /// Gauge: changes waiting in the outbox (the offline buffer).
    pub buffered_events: AtomicU64,
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
    pub counters: [u64; 12],
}

impl ReplSnapshot {
    pub const NAMES: [&'static str; 12] = [
        "repl_connects",
        "repl_published_events",
        "repl_published_payloads",
        "repl_backpressure_waits",
        "repl_dropped_overflow",
        "repl_dropped_offline",
        "repl_buffered_events",
        "repl_received_events",
        "repl_applied_events",
        "repl_apply_failed",
        "repl_rejected_payloads",
        "repl_rejected_presence",
    ];

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
        let c = [
            &self.connects,
            &self.published_events,
            &self.published_payloads,
            &self.backpressure_waits,
            &self.dropped_overflow,
            &self.dropped_offline,
            &self.buffered_events,
            &self.received_events,
            &self.applied_events,
            &self.apply_failed,
            &self.rejected_payloads,
            &self.rejected_presence,
        ];
        ReplSnapshot {
            enabled: true,
            connected: self.connected.load(Relaxed),
            counters: c.map(|a| a.load(Relaxed)),
        }
    }
}

/// The shards' side of the queue to the replication thread.
pub struct Outbound {
    tx: mpsc::UnboundedSender<Journal>,
    /// Events in the channel: the channel is unbounded by type, bounded by this gate.
    queued: AtomicUsize,
    capacity: usize,
    /// Set when admission gave up waiting: changes past the bound are dropped.
    overflow: AtomicBool,
    room: Notify,
    backpressure: Duration,
    pub stats: Arc<ReplStats>,
}

impl Outbound {
    /// Queue a shard's journal. Never blocks: over the bound (only after admission gave
    /// up waiting) the changes are dropped and counted.
    pub fn push(&self, journal: Journal) {
        let n = journal.events as usize;
        if self.overflow.load(Relaxed) && self.queued.load(Relaxed) >= self.capacity {
            self.stats.dropped_overflow.fetch_add(n as u64, Relaxed);
            return;
        }
        self.queued.fetch_add(n, Relaxed);
        if self.tx.send(journal).is_err() {
            // The replication thread is gone (shutting down): nothing left to send to.
            self.queued.fetch_sub(n, Relaxed);
        }
    }

    /// Wait, before reading more commands, until the queue has room, at most
    /// `backpressure_max_ms`; then stop waiting (and let [`Outbound::push`] drop).
    pub async fn admit(&self) {
        if self.queued.load(Relaxed) < self.capacity || self.overflow.load(Relaxed) {
            return;
        }
        self.stats.backpressure_waits.fetch_add(1, Relaxed);
        let deadline = tokio::time::Instant::now() + self.backpressure;
        loop {
            let room = self.room.notified();
            if self.queued.load(Relaxed) < self.capacity || self.overflow.load(Relaxed) {
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

    /// Called by the replication thread after taking `n` events off the queue.
    fn taken(&self, n: usize) {
        let left = self.queued.fetch_sub(n, Relaxed) - n;
        if left < self.capacity / 2 && self.overflow.swap(false, Relaxed) {
            tracing::info!("replication queue has room again: no more changes dropped");
        }
        if left < self.capacity {
            self.room.notify_waiters();
        }
    }
}

/// Remote changes for one shard: spans into a received payload.
pub struct RemoteChanges {
    pub data: Bytes,
    pub origin: u32,
    pub events: Vec<RemoteEvent>,
    /// The clock of the payload's newest flush (a flush is node-wide: every shard
    /// gets it).
    pub flush: Option<u64>,
}

pub struct RemoteEvent {
    pub hash: KeyHash,
    pub key: Span,
    pub value: Option<Span>,
    pub hlc: u64,
}

/// What applying a batch of remote changes did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Changes that won the merge and were stored.
    pub applied: u64,
    /// Changes that would have won but found no room (`StorageFull`).
    pub failed: u64,
}

/// Apply replicated changes with the LWW merge. Changes older than the tombstone grace
/// period are ignored, sets as well as deletes: the delete that may have followed an
/// old set could already be purged everywhere, and applying the set alone would bring
/// the key back. (Anti-entropy, which compares states rather than replaying changes,
/// does apply old sets.) A flush is applied first; the order does not matter, since
/// the flush marker drops older entries and refuses older ones that come later alike.
pub fn apply_remote(shard: &mut Shard, changes: &RemoteChanges, now_us: u64) -> Applied {
    if let Some(hlc) = changes.flush {
        let origin = changes.origin;
        shard.apply_flush(Version { hlc, origin }, now_us);
    }
    let grace = shard.tombstone_grace_us();
    let full_before = shard.stats.storage_full;
    let mut applied = 0;
    for e in &changes.events {
        if e.hlc.saturating_add(grace) < now_us {
            continue;
        }
        let key = e.key.get(&changes.data);
        let value = e.value.map(|v| v.get(&changes.data));
        let v = Version {
            hlc: e.hlc,
            origin: changes.origin,
        };
        applied += u64::from(shard.apply(e.hash, key, value, v, now_us));
    }
    Applied {
        applied,
        failed: shard.stats.storage_full - full_before,
    }
}

/// Split a decoded payload into per-shard batches (index = shard).
pub fn route(data: &Bytes, shard_bits: u32, limits: Limits) -> Result<Routed, DecodeError> {
    let decoded = decode(data, limits)?;
    let mut per_shard: Vec<Vec<RemoteEvent>> = (0..1 << shard_bits).map(|_| Vec::new()).collect();
    for e in &decoded.events {
        let hash = KeyHash::of(e.key);
        per_shard[shard_of_bucket(hash.bucket(), shard_bits)].push(RemoteEvent {
            hash,
            key: Span::of(data, e.key),
            value: e.value.map(|v| Span::of(data, v)),
            hlc: e.hlc,
        });
    }
    Ok(Routed {
        node_id: decoded.node_id.to_string(),
        origin: decoded.origin,
        events: decoded.events.len() + usize::from(decoded.flush.is_some()),
        per_shard,
        flush: decoded.flush,
    })
}

pub struct Routed {
    pub node_id: String,
    pub origin: u32,
    /// Sets and deletes, plus one for a flush.
    pub events: usize,
    pub per_shard: Vec<Vec<RemoteEvent>>,
    /// For every shard: the clock of the payload's newest flush.
    pub flush: Option<u64>,
}

/// Topics of one cluster.
#[derive(Clone)]
pub struct Topics {
    pub updates: String,
    pub nodes: String,
    prefix_len: usize,
}

impl Topics {
    pub fn new(prefix: &str) -> Topics {
        Topics {
            updates: format!("{prefix}/updates"),
            nodes: format!("{prefix}/nodes/+"),
            prefix_len: prefix.len() + "/nodes/".len(),
        }
    }
    pub fn presence(&self, node_id: &str) -> String {
        format!("{}{node_id}", &self.nodes[..self.prefix_len])
    }
    /// The node id of a presence topic.
    pub fn presence_node<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let prefix = &self.nodes[..self.prefix_len];
        topic.strip_prefix(prefix).filter(|id| !id.is_empty())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error("mqtt.broker_address {0:?}: {1}")]
    Address(String, String),
    #[error("cannot set up TLS for {0}: {1}")]
    Tls(String, String),
    #[error("cannot start the replication thread: {0}")]
    Thread(std::io::Error),
}

/// MQTT client options from `[mqtt]`; `client_id` may differ from the config's (watch).
pub fn mqtt_options(config: &Config, client_id: &str) -> Result<MqttOptions, ReplError> {
    let m = &config.mqtt;
    let address = broker_address(config);
    let (tls, rest) = match address.split_once("://") {
        Some(("tcp", rest)) => (false, rest),
        Some(("mqtts", rest)) => (true, rest),
        _ => return Err(ReplError::Address(address, "unsupported scheme".into())),
    };
    let (host, port) = rest
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .ok_or_else(|| ReplError::Address(address.clone(), "expected host:port".into()))?;
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_secs(m.keep_alive.max(5)))
        .set_clean_session(m.clean_session)
        .set_inflight(UNCONFIRMED_MAX as u16 + 16)
        .set_request_channel_capacity(UNCONFIRMED_MAX * 2 + 16);
    // Accept packets well past our own payload limit, so an oversized payload on the
    // topic is rejected and counted by the decoder rather than failing the connection
    // (rumqttc drops the connection on a packet over its limit).
    let max = payload_bytes_max(config.network.max_line_bytes) + 4096;
    o.set_max_packet_size(max * 4, max);
    if let Some(user) = &m.username {
        o.set_credentials(user.clone(), m.password.clone().unwrap_or_default());
    }
    if tls {
        o.set_transport(rumqttc::Transport::tls_with_config(tls_config(&address)?));
    }
    Ok(o)
}

/// The broker to connect to: `broker_address`, or the embedded broker's listen address.
pub fn broker_address(config: &Config) -> String {
    let m = &config.mqtt;
    if m.broker_address.is_empty() {
        format!("tcp://{}", m.embedded_broker.listen)
    } else {
        m.broker_address.clone()
    }
}

fn tls_config(address: &str) -> Result<rumqttc::TlsConfiguration, ReplError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(ReplError::Tls(
            address.into(),
            "no trusted root certificates found on this system".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ReplError::Tls(address.into(), e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(cfg)))
}

/// The running replication thread.
pub struct Replication {
    pub outbound: Arc<Outbound>,
    stop: Arc<Notify>,
    thread: std::thread::JoinHandle<()>,
}

impl Replication {
    /// Start the thread. `inboxes[i]` is shard `i`'s inbox.
    pub fn start(
        config: &Config,
        client_addr: String,
        inboxes: Vec<tokio::sync::mpsc::Sender<ThreadMsg>>,
        peers: Arc<Peers>,
        core: Option<core_affinity::CoreId>,
    ) -> Result<Replication, ReplError> {
        let options = mqtt_options(config, &config.mqtt.client_id)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(ReplStats::default());
        let outbound = Arc::new(Outbound {
            tx,
            queued: AtomicUsize::new(0),
            capacity: (config.mqtt.offline_buffer_events)
                .clamp(*QUEUE_EVENTS.start(), *QUEUE_EVENTS.end()),
            overflow: AtomicBool::new(false),
            room: Notify::new(),
            backpressure: Duration::from_millis(config.mqtt.backpressure_max_ms),
            stats: stats.clone(),
        });
        let stop = Arc::new(Notify::new());
        let shards = inboxes.len();
        let ctx = Context {
            node_id: config.node_id.clone(),
            origin: origin_of(&config.node_id),
            topics: Topics::new(&config.mqtt.topic_prefix),
            me: Presence {
                online: true,
                addr: client_addr,
                shards: shards as u32,
                version: crate::dispatch::VERSION.into(),
            },
            shard_bits: shards.trailing_zeros(),
            limits: Limits {
                payload_bytes_max: payload_bytes_max(config.network.max_line_bytes),
                value_bytes_max: config.network.max_line_bytes,
            },
            batch_events: config.mqtt.batch_max_events.max(1),
            batch_delay: Duration::from_micros(config.mqtt.batch_max_delay_us),
            offline_max: config.mqtt.offline_buffer_events as u64,
            inboxes,
            peers,
            outbound: outbound.clone(),
            stats,
            last_reject_log: std::cell::Cell::new(None),
        };
        let mut options = options;
        let will = Presence {
            online: false,
            ..ctx.me.clone()
        };
        options.set_last_will(LastWill::new(
            ctx.topics.presence(&ctx.node_id),
            will.to_line(),
            QoS::AtLeastOnce,
            true,
        ));
        tracing::info!(broker = %broker_address(config), topic = %ctx.topics.updates, "replicating over MQTT");
        let stop_rx = stop.clone();
        let thread = std::thread::Builder::new()
            .name("replication".into())
            .spawn(move || {
                if let Some(core) = core {
                    if !core_affinity::set_for_current(core) {
                        tracing::warn!("could not pin the replication thread to core {}", core.id);
                    }
                }
                run_thread(ctx, options, rx, stop_rx)
            })
            .map_err(ReplError::Thread)?;
        Ok(Replication {
            outbound,
            stop,
            thread,
        })
    }

    /// Publish what is still buffered (briefly), mark this node offline, disconnect.
    pub fn stop(self) {
        self.stop.notify_one();
        let _ = self.thread.join();
    }
}

struct Context {
    node_id: String,
    origin: u32,
    topics: Topics,
    me: Presence,
    shard_bits: u32,
    limits: Limits,
    batch_events: usize,
    batch_delay: Duration,
    offline_max: u64,
    inboxes: Vec<tokio::sync::mpsc::Sender<ThreadMsg>>,
    peers: Arc<Peers>,
    outbound: Arc<Outbound>,
    stats: Arc<ReplStats>,
    /// When a rejected payload or presence record was last logged: one line per second
    /// at most, so garbage on the topics cannot flood the log (the counters count all).
    last_reject_log: std::cell::Cell<Option<Instant>>,
}

impl Context {
    /// Whether a rejection may be logged now: once a second at most.
    fn may_log_rejection(&self) -> bool {
        let now = Instant::now();
        let due = self
            .last_reject_log
            .get()
            .is_none_or(|t| now - t >= Duration::from_secs(1));
        if due {
            self.last_reject_log.set(Some(now));
        }
        due
    }
}

/// A published payload awaiting its PUBACK.
struct Sent {
    pkid: Option<u16>,
    payload: Bytes,
    events: u32,
}

/// Published payloads awaiting their PUBACK, in publish order. rumqttc reports each
/// publish's packet id (`Outgoing::Publish`) in the order the publishes were made, so
/// the entries that have an id are always a prefix: `unassigned` counts the rest.
#[derive(Default)]
struct InFlight {
    sent: VecDeque<Sent>,
    unassigned: usize,
    pkids: HashSet<u16>,
    bytes: usize,
}

impl InFlight {
    fn push(&mut self, s: Sent) {
        debug_assert!(s.pkid.is_none());
        self.bytes += s.payload.len();
        self.unassigned += 1;
        self.sent.push_back(s);
    }

    /// rumqttc sent a publish with `pkid`: the oldest payload without an id. An id
    /// already known is a retransmission (after a resumed session).
    fn assign(&mut self, pkid: u16) {
        if self.unassigned == 0 || !self.pkids.insert(pkid) {
            return;
        }
        let i = self.sent.len() - self.unassigned;
        self.sent[i].pkid = Some(pkid);
        self.unassigned -= 1;
    }

    /// The payload acknowledged by `pkid` (brokers acknowledge in order, mostly).
    fn ack(&mut self, pkid: u16) -> Option<Sent> {
        if !self.pkids.remove(&pkid) {
            return None;
        }
        let i = if self.sent.front().is_some_and(|s| s.pkid == Some(pkid)) {
            0
        } else {
            self.sent.iter().position(|s| s.pkid == Some(pkid))?
        };
        let s = self.sent.remove(i)?;
        self.bytes -= s.payload.len();
        Some(s)
    }

    /// Everything, oldest first, without ids (to be published again).
    fn take_all(&mut self) -> Vec<Sent> {
        self.bytes = 0;
        self.unassigned = 0;
        self.pkids.clear();
        self.sent
            .drain(..)
            .map(|s| Sent { pkid: None, ..s })
            .collect()
    }

    fn full(&self) -> bool {
        self.sent.len() >= UNCONFIRMED_MAX || self.bytes >= UNCONFIRMED_BYTES_MAX
    }

    fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }
}

/// The replication thread's state, shared by its tasks (one thread, so `RefCell`).
#[derive(Default)]
struct Link {
    connected: bool,
    /// After a reconnect: peers that have not announced themselves since, and how long
    /// to wait for them at most.
    awaiting: HashSet<String>,
    settle_until: Option<Instant>,
    outbox: VecDeque<Journal>,
    outbox_events: u64,
    outbox_bytes: usize,
    /// When the oldest event in the outbox arrived.
    outbox_since: Option<Instant>,
    /// Payloads to publish again, before the outbox, and their events.
    retry: VecDeque<Sent>,
    retry_events: u64,
    unconfirmed: InFlight,
    stopping: bool,
}

impl Link {
    fn buffered(&self) -> u64 {
        self.outbox_events + self.retry_events
    }

    fn settled(&self, now: Instant) -> bool {
        self.awaiting.is_empty() || self.settle_until.is_none_or(|t| now >= t)
    }
}

fn run_thread(
    ctx: Context,
    options: MqttOptions,
    rx: mpsc::UnboundedReceiver<Journal>,
    stop: Arc<Notify>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("replication runtime");
    let tasks = tokio::task::LocalSet::new();
    let (client, eventloop) = AsyncClient::new(options, UNCONFIRMED_MAX * 2 + 16);
    let ctx = Rc::new(ctx);
    let link = Rc::new(RefCell::new(Link::default()));
    let wake = Rc::new(Notify::new());
    tasks.block_on(&rt, async move {
        tokio::task::spawn_local(drive(
            ctx.clone(),
            link.clone(),
            wake.clone(),
            client.clone(),
            eventloop,
        ));
        tokio::task::spawn_local(intake(ctx.clone(), link.clone(), wake.clone(), rx));
        let publisher = tokio::task::spawn_local(publish(
            ctx.clone(),
            link.clone(),
            wake.clone(),
            client.clone(),
        ));
        stop.notified().await;
        link.borrow_mut().stopping = true;
        wake.notify_one();
        // Give the publisher a moment to send what it holds, then say goodbye.
        let deadline = Instant::now() + STOP_FLUSH;
        let done = |l: &Link| !l.connected || (l.buffered() == 0 && l.unconfirmed.is_empty());
        while Instant::now() < deadline && !done(&link.borrow()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        publisher.abort();
        let left = link.borrow().buffered();
        if left > 0 {
            tracing::warn!(
                events = left,
                "stopping with unpublished changes (peers repair them by anti-entropy)"
            );
        }
        if link.borrow().connected {
            let gone = Presence {
                online: false,
                ..ctx.me.clone()
            };
            let topic = ctx.topics.presence(&ctx.node_id);
            let _ = client
                .publish(topic, QoS::AtLeastOnce, true, gone.to_line())
                .await;
            let _ = client.disconnect().await;
            tokio::time::sleep(Duration::from_millis(100)).await; // let the loop send both
        }
    });
}

/// Poll the MQTT event loop forever: connection state, acknowledgements, incoming changes
/// and presence. Never cancelled mid-poll (rumqttc's loop must not be).
async fn drive(
    ctx: Rc<Context>,
    link: Rc<RefCell<Link>>,
    wake: Rc<Notify>,
    client: AsyncClient,
    mut eventloop: EventLoop,
) {
    let mut backoff = BACKOFF_FIRST;
    let mut failures = 0u32;
    loop {
        let event = match eventloop.poll().await {
            Ok(e) => e,
            Err(e) => {
                let was = std::mem::replace(&mut link.borrow_mut().connected, false);
                ctx.stats.connected.store(false, Relaxed);
                failures += 1;
                if let rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
                    rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n),
                )) = e
                {
                    // rumqttc drops the connection on a packet over its limit; with a
                    // persistent session the broker sends it again on every reconnect.
                    ctx.stats.rejected_payloads.fetch_add(1, Relaxed);
                    tracing::error!(
                        bytes = n,
                        limit = ctx.limits.payload_bytes_max,
                        "a message far over the payload limit arrived and cost the connection; \
                         set the broker's message size limit (docs/DEPLOYMENT.md)"
                    );
                }
                if link.borrow().stopping {
                    // Our own goodbye closed the connection: nothing to warn about.
                    tracing::debug!("MQTT connection closed while stopping: {e}");
                } else if was || failures == 1 {
                    tracing::warn!("MQTT broker unreachable ({e}); retrying, changes are buffered");
                } else {
                    tracing::debug!("MQTT reconnect failed: {e}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                backoff = BACKOFF_FIRST;
                failures = 0;
                ctx.stats.connects.fetch_add(1, Relaxed);
                ctx.stats.connected.store(true, Relaxed);
                on_connect(&ctx, &mut link.borrow_mut(), &client, ack.session_present);
                wake.notify_one();
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                // A broker may refuse a subscription (an ACL, say): the node would look
                // connected and never receive a change. Say so loudly.
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                if refused {
                    tracing::error!(
                        topics = %format!("{}, {}", ctx.topics.updates, ctx.topics.nodes),
                        "the broker refused a subscription: this node will not receive \
                         its peers' changes (check the broker's ACL for this user)"
                    );
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(sent) = link.borrow_mut().unconfirmed.ack(ack.pkid) {
                    ctx.stats
                        .published_events
                        .fetch_add(u64::from(sent.events), Relaxed);
                    ctx.stats.published_payloads.fetch_add(1, Relaxed);
                    wake.notify_one();
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
                link.borrow_mut().unconfirmed.assign(pkid);
            }
            Event::Incoming(Packet::Publish(p)) => {
                if p.topic == ctx.topics.updates {
                    receive(&ctx, p.payload).await;
                } else if let Some(node) = ctx.topics.presence_node(&p.topic) {
                    on_presence(&ctx, &mut link.borrow_mut(), &wake, node, &p.payload);
                }
            }
            _ => {}
        }
    }
}

fn on_connect(ctx: &Context, l: &mut Link, client: &AsyncClient, session_present: bool) {
    l.connected = true;
    tracing::info!(session_present, "connected to the MQTT broker");
    // rumqttc does not restore subscriptions: subscribe on every ConnAck.
    let subs = [&ctx.topics.updates, &ctx.topics.nodes]
        .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
    if let Err(e) = client.try_subscribe_many(subs) {
        tracing::error!("cannot subscribe: {e}");
    }
    let topic = ctx.topics.presence(&ctx.node_id);
    // QoS 0: its packet id (0) never mixes with the payloads' acknowledgements.
    if let Err(e) = client.try_publish(topic, QoS::AtMostOnce, true, ctx.me.to_line()) {
        tracing::error!("cannot publish presence: {e}");
    }
    if !session_present {
        // The broker forgot our session, and rumqttc dropped its unacknowledged
        // publishes: send them again, in order, before anything newer.
        for s in l.unconfirmed.take_all().into_iter().rev() {
            l.retry_events += u64::from(s.events);
            l.retry.push_front(s);
        }
    }
    // Hold publishing until the peers that were online show up again. Not needed when
    // the broker kept our session: it kept theirs, and queues for them.
    l.awaiting = if session_present {
        HashSet::new()
    } else {
        ctx.peers.online().into_iter().collect()
    };
    l.settle_until = Some(Instant::now() + RESUBSCRIBE_WAIT);
}

fn on_presence(ctx: &Context, l: &mut Link, wake: &Notify, node: &str, payload: &[u8]) {
    if node == ctx.node_id {
        return;
    }
    let p = match Presence::parse(payload) {
        Ok(p) => p,
        Err(why) => {
            ctx.stats.rejected_presence.fetch_add(1, Relaxed);
            if ctx.may_log_rejection() {
                tracing::warn!(node, "ignoring a bad presence record: {why}");
            }
            return;
        }
    };
    tracing::info!(node, online = p.online, addr = %p.addr, "peer presence");
    // A record that arrives after our reconnect settles its node: a live one is
    // published after that node re-subscribed; a retained one means the broker kept
    // its state (it did not restart), so the node's subscription is there too.
    if l.awaiting.remove(node) {
        wake.notify_one();
    }
    if !ctx.peers.update(node, p) {
        ctx.stats.rejected_presence.fetch_add(1, Relaxed);
        if ctx.may_log_rejection() {
            let max = crate::peers::PEERS_MAX;
            tracing::warn!(
                node,
                "ignoring a new peer: the peer table is full ({max} online peers)"
            );
        }
    }
}

/// Decode a payload and hand each shard its events. Bad payloads are counted and logged.
async fn receive(ctx: &Context, payload: Bytes) {
    let stats = &ctx.stats;
    let routed = match route(&payload, ctx.shard_bits, ctx.limits) {
        Ok(r) => r,
        Err(e) => {
            let n = stats.rejected_payloads.fetch_add(1, Relaxed) + 1;
            if ctx.may_log_rejection() {
                let bytes = payload.len();
                tracing::warn!(
                    bytes,
                    rejected_total = n,
                    "dropping a replication payload: {e}"
                );
            }
            return;
        }
    };
    if routed.node_id == ctx.node_id {
        return; // our own changes, back from the broker
    }
    stats
        .received_events
        .fetch_add(routed.events as u64, Relaxed);
    if let Some(hlc) = routed.flush {
        tracing::info!(node = %routed.node_id, hlc, "a peer flushed the database (FLUSHDB): applying its flush marker");
    }
    for (shard, events) in routed.per_shard.into_iter().enumerate() {
        if events.is_empty() && routed.flush.is_none() {
            continue;
        }
        let changes = RemoteChanges {
            data: payload.clone(),
            origin: routed.origin,
            events,
            flush: routed.flush,
        };
        // Waiting here slows reading from the broker: backpressure, not loss.
        let _ = ctx.inboxes[shard].send(ThreadMsg::Apply(changes)).await;
    }
}

/// Move journals from the shards into the outbox.
async fn intake(
    ctx: Rc<Context>,
    link: Rc<RefCell<Link>>,
    wake: Rc<Notify>,
    mut rx: mpsc::UnboundedReceiver<Journal>,
) {
    // Connected: leave changes in the queue while the outbox is full, so writers feel
    // backpressure. Disconnected: take them, and drop what does not fit.
    let hold = |l: &Link| l.connected && l.buffered() >= ctx.offline_max;
    loop {
        while hold(&link.borrow()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let Some(journal) = rx.recv().await else {
            return;
        };
        ctx.outbound.taken(journal.events as usize);
        let mut l = link.borrow_mut();
        let n = u64::from(journal.events);
        // Connected, the outbox may pass its bound by this one journal (the hold above
        // keeps it from growing further); disconnected, it never does.
        if !l.connected && l.buffered() + n > ctx.offline_max {
            let total = ctx.stats.dropped_offline.fetch_add(n, Relaxed) + n;
            if total == n {
                tracing::warn!(
                    limit = ctx.offline_max,
                    "offline buffer full: dropping changes (anti-entropy repairs them)"
                );
            }
            continue;
        }
        l.outbox_since.get_or_insert_with(Instant::now);
        l.outbox_events += n;
        l.outbox_bytes += journal.bytes.len();
        l.outbox.push_back(journal);
        ctx.stats.buffered_events.store(l.buffered(), Relaxed);
        wake.notify_one();
    }
}

enum Next {
    Publish,
    WaitUntil(Instant),
    Idle,
}

/// Publish payloads whenever the link allows: connected, peers settled, room in flight.
async fn publish(ctx: Rc<Context>, link: Rc<RefCell<Link>>, wake: Rc<Notify>, client: AsyncClient) {
    let mut builder = PayloadBuilder::new(ctx.origin, &ctx.node_id);
    let topic = ctx.topics.updates.clone();
    loop {
        let next = {
            let l = link.borrow();
            let now = Instant::now();
            if !l.connected || l.unconfirmed.full() {
                Next::Idle
            } else if !l.settled(now) {
                Next::WaitUntil(l.settle_until.unwrap_or(now))
            } else if !l.awaiting.is_empty() {
                // Waited long enough: peers that never showed up are gone (their last
                // will may have been lost with the broker); the next reconnect will
                // not wait for them.
                drop(l);
                let gone: Vec<String> = link.borrow_mut().awaiting.drain().collect();
                for node in gone {
                    tracing::warn!(
                        node,
                        "peer did not reappear after the reconnect: marked offline"
                    );
                    ctx.peers.mark_offline(&node);
                }
                continue;
            } else if !l.retry.is_empty() {
                Next::Publish
            } else if l.outbox_events == 0 {
                Next::Idle
            } else {
                let due = l.outbox_since.map_or(now, |t| t + ctx.batch_delay);
                let full = l.outbox_events >= ctx.batch_events as u64
                    || l.outbox_bytes >= PAYLOAD_TARGET_BYTES;
                if full || l.stopping || now >= due {
                    Next::Publish
                } else {
                    Next::WaitUntil(due)
                }
            }
        };
        match next {
            Next::Idle => wake.notified().await,
            Next::WaitUntil(t) => {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep_until(t.into()) => {}
                }
            }
            Next::Publish => {
                let sent = {
                    let mut l = link.borrow_mut();
                    match l.retry.pop_front() {
                        Some(s) => {
                            l.retry_events -= u64::from(s.events);
                            s
                        }
                        None => next_payload(&ctx, &mut l, &mut builder),
                    }
                };
                let payload = sent.payload.clone();
                link.borrow_mut().unconfirmed.push(sent);
                ctx.stats
                    .buffered_events
                    .store(link.borrow().buffered(), Relaxed);
                if let Err(e) = client
                    .publish_bytes(topic.clone(), QoS::AtLeastOnce, false, payload)
                    .await
                {
                    tracing::error!("cannot hand a payload to the MQTT client: {e}");
                }
            }
        }
    }
}

/// Cut the next payload from the outbox: at most `batch_events` events and (unless a
/// single event is larger) [`PAYLOAD_TARGET_BYTES`] bytes.
fn next_payload(ctx: &Context, l: &mut Link, builder: &mut PayloadBuilder) -> Sent {
    while let Some(front) = l.outbox.front_mut() {
        let room_events = ctx.batch_events - builder.events() as usize;
        let room_bytes = PAYLOAD_TARGET_BYTES.saturating_sub(builder.len());
        if room_events == 0 || (room_bytes == 0 && !builder.is_empty()) {
            break;
        }
        let (len, n) =
            crate::changes::prefix_len(&front.bytes, room_events, room_bytes, builder.is_empty());
        if n == 0 {
            break; // the next event does not fit: it starts the next payload
        }
        builder.extend(&front.bytes[..len], n);
        l.outbox_events -= u64::from(n);
        l.outbox_bytes -= len;
        if n == front.events {
            l.outbox.pop_front();
        } else {
            front.bytes.drain(..len);
            front.events -= n;
        }
    }
    if l.outbox_events == 0 {
        l.outbox_since = None;
    } else {
        // What is left is due now too: it waited as long as what just went.
        l.outbox_since = l.outbox_since.or(Some(Instant::now()));
    }
    let events = builder.events();
    Sent {
        pkid: None,
        payload: Bytes::from(builder.take()),
        events,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(n: u8) -> Sent {
        Sent {
            pkid: None,
            payload: Bytes::from(vec![n; 10]),
            events: u32::from(n),
        }
    }

    #[test]
    fn in_flight_assigns_ids_in_publish_order_and_acks_any_order() {
        let mut f = InFlight::default();
        for n in 1..=3 {
            f.push(sent(n));
        }
        assert_eq!(f.bytes, 30);
        f.assign(7);
        f.assign(8);
        f.assign(7); // a retransmission: known id, nothing assigned
        assert_eq!(f.unassigned, 1);
        assert_eq!(f.ack(8).map(|s| s.events), Some(2), "out of order");
        assert_eq!(f.ack(8).map(|s| s.events), None, "acked once");
        assert_eq!(f.ack(99).map(|s| s.events), None, "unknown id");
        f.assign(9);
        assert_eq!(f.ack(7).map(|s| s.events), Some(1));
        assert_eq!(f.ack(9).map(|s| s.events), Some(3));
        assert!(f.is_empty());
        assert_eq!((f.bytes, f.unassigned), (0, 0));
    }

    #[test]
    fn in_flight_gives_everything_back_in_order_without_ids() {
        let mut f = InFlight::default();
        for n in 1..=3 {
            f.push(sent(n));
        }
        f.assign(1);
        let back = f.take_all();
        assert_eq!(
            back.iter().map(|s| s.events).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(back.iter().all(|s| s.pkid.is_none()));
        assert!(f.is_empty() && !f.full());
        f.push(sent(4));
        f.assign(1); // ids are free again
        assert_eq!(f.ack(1).map(|s| s.events), Some(4));
    }

    #[test]
    fn in_flight_is_full_by_count_or_bytes() {
        let mut f = InFlight::default();
        f.push(Sent {
            pkid: None,
            payload: Bytes::from(vec![0; UNCONFIRMED_BYTES_MAX]),
            events: 1,
        });
        assert!(f.full());
        let mut f = InFlight::default();
        for _ in 0..UNCONFIRMED_MAX {
            f.push(sent(1));
        }
        assert!(f.full());
    }

    #[test]
    fn topics_name_presence_records() {
        let t = Topics::new("a/b");
        assert_eq!(t.updates, "a/b/updates");
        assert_eq!(t.nodes, "a/b/nodes/+");
        assert_eq!(t.presence("n1"), "a/b/nodes/n1");
        assert_eq!(t.presence_node("a/b/nodes/n1"), Some("n1"));
        assert_eq!(t.presence_node("a/b/nodes/"), None);
        assert_eq!(t.presence_node("a/b/updates"), None);
    }
}
