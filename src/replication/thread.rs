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
//! - disconnected: changes wait in the outbox up to `offline_buffer_events` and
//!   `offline_buffer_bytes`, then are dropped and counted; after reconnecting they go
//!   out, oldest first.
//!
//! Payloads not yet acknowledged (PUBACK) when the connection drops are published
//! again after reconnecting, unless the broker kept the session (then rumqttc resends
//! them itself). After a reconnect the thread waits until every peer that was online has
//! announced itself online again (so has re-subscribed; its last will does not count),
//! at most [`RESUBSCRIBE_WAIT`], before publishing: changes published before a peer
//! re-subscribes would never reach it.

use crate::config::Config;
use crate::logging::LogLimit;
use crate::node::inbox::{RemoteChanges, ThreadMsg};
use crate::replication::changes::{Limits, PayloadBuilder};
use crate::replication::inbound::route;
use crate::replication::outbound::Outbound;
use crate::replication::peers::{clock_offset_ms, Peers, Presence, Recorded};
use crate::replication::stats::ReplStats;
use crate::store::journal::Journal;
use crate::store::version::origin_of;
use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use std::cell::{Cell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

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
/// How often a connected node republishes its presence record (with its clock).
pub const PRESENCE_INTERVAL: Duration = Duration::from_secs(30);

/// The largest payload a node sends or accepts: a full batch plus one largest event.
pub fn payload_bytes_max(value_bytes_max: usize) -> usize {
    PAYLOAD_TARGET_BYTES + value_bytes_max + 2 * crate::limits::KEY_BYTES_MAX
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
    let (host, port) =
        crate::config::host_port(rest).map_err(|why| ReplError::Address(address.clone(), why))?;
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

/// The MQTT client for `options`, with `cap` requests queued at most. Nagle is off:
/// a payload or acknowledgement that waits for the previous segment's ACK waits for
/// the peer's delayed ACK (40 ms on Linux), which was most of the replication lag
/// of writes a few milliseconds apart.
pub fn mqtt_client(options: MqttOptions, cap: usize) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, cap);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
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
    control: tokio::sync::mpsc::UnboundedSender<Control>,
    thread: std::thread::JoinHandle<()>,
}

/// What the server asks of the replication thread when the node stops.
enum Control {
    /// Publish everything held now, without batching delays, and keep
    /// [`ReplStats::unconfirmed`] current until `Stop`.
    Flush,
    /// Say goodbye (offline presence, disconnect) and end the thread.
    Stop,
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
        let outbound = Arc::new(Outbound::new(&config.mqtt, tx, stats.clone()));
        let (control, control_rx) = tokio::sync::mpsc::unbounded_channel();
        let shards = inboxes.len();
        let ctx = Context {
            node_id: config.node_id.clone(),
            origin: origin_of(&config.node_id),
            topics: Topics::new(&config.mqtt.topic_prefix),
            me: Presence {
                online: true,
                addr: client_addr,
                shards: shards as u32,
                version: crate::VERSION.into(),
                clock_ms: None,
            },
            shard_bits: shards.trailing_zeros(),
            limits: Limits {
                payload_bytes_max: payload_bytes_max(config.network.max_line_bytes),
                value_bytes_max: config.network.max_line_bytes,
            },
            batch_events: config.mqtt.batch_max_events.max(1),
            batch_delay: Duration::from_micros(config.mqtt.batch_max_delay_us),
            offline_max: config.mqtt.offline_buffer_events as u64,
            offline_bytes_max: config.mqtt.offline_buffer_bytes,
            inboxes,
            peers,
            outbound: outbound.clone(),
            stats,
            reject_log: Cell::new(LogLimit::new(Duration::from_secs(1))),
            skew_log: Cell::new(LogLimit::new(Duration::from_secs(10))),
            max_clock_skew_ms: config.mqtt.max_clock_skew_ms,
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
        let thread = std::thread::Builder::new()
            .name("replication".into())
            .spawn(move || {
                if let Some(core) = core {
                    if !core_affinity::set_for_current(core) {
                        tracing::warn!("could not pin the replication thread to core {}", core.id);
                    }
                }
                run_thread(ctx, options, rx, control_rx)
            })
            .map_err(ReplError::Thread)?;
        Ok(Replication {
            outbound,
            control,
            thread,
        })
    }

    /// Start publishing every change made so far at once (call it when no more arrive:
    /// connections are closed); a broker that is down is retried meanwhile. Then watch
    /// [`Self::unconfirmed`] fall to 0.
    pub fn flush(&self) {
        // Unknown until the thread has counted: never 0 by accident.
        self.outbound.stats.unconfirmed.store(u64::MAX, Relaxed);
        if self.control.send(Control::Flush).is_err() {
            self.outbound.stats.unconfirmed.store(0, Relaxed);
        }
    }

    /// Changes the broker has not confirmed yet, during a [`Self::flush`] (`u64::MAX`
    /// until the thread has counted them).
    pub fn unconfirmed(&self) -> u64 {
        self.outbound.stats.unconfirmed.load(Relaxed)
    }

    /// Whether the broker connection is up now.
    pub fn connected(&self) -> bool {
        self.outbound.stats.connected.load(Relaxed)
    }

    /// Mark this node offline, disconnect, and end the thread (after [`Self::flush`]).
    pub fn stop(self) {
        let _ = self.control.send(Control::Stop);
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
    offline_bytes_max: usize,
    inboxes: Vec<tokio::sync::mpsc::Sender<ThreadMsg>>,
    peers: Arc<Peers>,
    outbound: Arc<Outbound>,
    stats: Arc<ReplStats>,
    /// Rejected payloads and presence records: one line per second at most, so garbage
    /// on the topics cannot flood the log (the counters count all).
    reject_log: Cell<LogLimit>,
    /// Peers with a skewed clock: one line per 10 s at most (INFO counts them).
    skew_log: Cell<LogLimit>,
    max_clock_skew_ms: u64,
}

impl Context {
    /// Whether a rejection may be logged now.
    fn may_log_rejection(&self) -> bool {
        may_log(&self.reject_log)
    }
}

fn may_log(limit: &Cell<LogLimit>) -> bool {
    let mut l = limit.get();
    let due = l.due();
    limit.set(l);
    due
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
    /// Changes published and not yet acknowledged.
    fn events(&self) -> u64 {
        self.sent.iter().map(|s| u64::from(s.events)).sum()
    }

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
    /// Payloads to publish again, before the outbox, and their events and bytes.
    retry: VecDeque<Sent>,
    retry_events: u64,
    retry_bytes: usize,
    unconfirmed: InFlight,
    stopping: bool,
}

impl Link {
    fn buffered(&self) -> u64 {
        self.outbox_events + self.retry_events
    }

    fn buffered_bytes(&self) -> usize {
        self.outbox_bytes + self.retry_bytes
    }

    /// Whether `events` more of `bytes` would pass the offline buffer's bounds.
    fn over(&self, events: u64, bytes: usize, ctx: &Context) -> bool {
        self.buffered() + events > ctx.offline_max
            || self.buffered_bytes() + bytes > ctx.offline_bytes_max
    }

    /// A presence record of `node` arrived; true when it ends the wait for that node.
    /// An *online* record that arrives after our reconnect settles its node: a live one
    /// is published after that node re-subscribed; a retained one means the broker kept
    /// its state (it did not restart), so the node's subscription is there too. An
    /// offline record (a last will) does not: the node lost its connection too and may
    /// be re-subscribing right now, so the wait goes on, at most until `settle_until`.
    fn presence_seen(&mut self, node: &str, online: bool) -> bool {
        online && self.awaiting.remove(node)
    }

    fn publish_gauges(&self, stats: &ReplStats) {
        stats.buffered_events.store(self.buffered(), Relaxed);
        stats
            .buffered_bytes
            .store(self.buffered_bytes() as u64, Relaxed);
    }

    fn settled(&self, now: Instant) -> bool {
        self.awaiting.is_empty() || self.settle_until.is_none_or(|t| now >= t)
    }
}

fn run_thread(
    ctx: Context,
    options: MqttOptions,
    rx: mpsc::UnboundedReceiver<Journal>,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("replication runtime");
    let tasks = tokio::task::LocalSet::new();
    let (client, eventloop) = mqtt_client(options, UNCONFIRMED_MAX * 2 + 16);
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
        let heartbeat =
            tokio::task::spawn_local(heartbeat(ctx.clone(), link.clone(), client.clone()));
        let publisher = tokio::task::spawn_local(publish(
            ctx.clone(),
            link.clone(),
            wake.clone(),
            client.clone(),
        ));
        if let Some(Control::Flush) = control.recv().await {
            link.borrow_mut().stopping = true;
            wake.notify_one();
            // The server decides how long to wait; until it says stop, keep counting.
            loop {
                let pending = {
                    let l = link.borrow();
                    l.buffered() + l.unconfirmed.events()
                };
                let queued = ctx.outbound.queued_events() as u64;
                ctx.stats.unconfirmed.store(queued + pending, Relaxed);
                tokio::select! {
                    _ = control.recv() => break,
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
        }
        publisher.abort();
        // No `online` record may follow the goodbye below.
        heartbeat.abort();
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
        let incoming = matches!(event, Event::Incoming(_));
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
                    let l = &mut link.borrow_mut();
                    on_presence(&ctx, l, &wake, node, &p.payload, p.retain);
                }
            }
            _ => {}
        }
        // Anything from the broker (acks, peers' changes, keep-alive answers) while it
        // holds nothing of ours unconfirmed: every change made so far has reached it.
        if incoming {
            let l = link.borrow();
            let settled = l.connected
                && l.buffered() == 0
                && l.unconfirmed.events() == 0
                && ctx.outbound.queued_events() == 0;
            if settled {
                ctx.stats
                    .settled_at_us
                    .store(crate::store::version::now_us(), Relaxed);
            }
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
    announce(ctx, client);
    if !session_present {
        // The broker forgot our session, and rumqttc dropped its unacknowledged
        // publishes: send them again, in order, before anything newer.
        for s in l.unconfirmed.take_all().into_iter().rev() {
            l.retry_events += u64::from(s.events);
            l.retry_bytes += s.payload.len();
            l.retry.push_front(s);
        }
        l.publish_gauges(&ctx.stats);
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

/// Publish this node's presence record (retained), with its clock as of now.
fn announce(ctx: &Context, client: &AsyncClient) {
    let topic = ctx.topics.presence(&ctx.node_id);
    let me = Presence {
        clock_ms: Some(crate::store::version::now_us() / 1000),
        ..ctx.me.clone()
    };
    // QoS 0: its packet id (0) never mixes with the payloads' acknowledgements.
    if let Err(e) = client.try_publish(topic, QoS::AtMostOnce, true, me.to_line()) {
        tracing::error!("cannot publish presence: {e}");
    }
}

/// Announce this node every [`PRESENCE_INTERVAL`] while connected, so peers measure its
/// clock (a retained record is as old as its publication, so a record seen on
/// subscribing cannot tell), and notice drift.
async fn heartbeat(ctx: Rc<Context>, link: Rc<RefCell<Link>>, client: AsyncClient) {
    loop {
        tokio::time::sleep(PRESENCE_INTERVAL).await;
        if link.borrow().connected {
            announce(&ctx, &client);
        }
    }
}

fn on_presence(
    ctx: &Context,
    l: &mut Link,
    wake: &Notify,
    node: &str,
    payload: &[u8],
    retained: bool,
) {
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
    if l.presence_seen(node, p.online) {
        wake.notify_one();
    }
    let offset = clock_offset_ms(&p, retained, crate::store::version::now_us() / 1000);
    let skewed = offset.filter(|o| o.unsigned_abs() > ctx.max_clock_skew_ms);
    if let Some(offset_ms) = skewed {
        if may_log(&ctx.skew_log) {
            tracing::warn!(
                node,
                offset_ms,
                max_clock_skew_ms = ctx.max_clock_skew_ms,
                "a peer's clock differs from this node's (positive: ahead): last-write-wins \
                 favours the node whose clock runs ahead; synchronise the clocks (NTP)"
            );
        }
    }
    let (online, addr) = (p.online, p.addr.clone());
    match ctx.peers.update(node, p, offset) {
        Recorded::News => tracing::info!(node, online, %addr, "peer presence"),
        Recorded::Same => {}
        Recorded::Refused => {
            ctx.stats.rejected_presence.fetch_add(1, Relaxed);
            if ctx.may_log_rejection() {
                let max = crate::replication::peers::PEERS_MAX;
                tracing::warn!(
                    node,
                    "ignoring a new peer: the peer table is full ({max} online peers)"
                );
            }
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
    let hold = |l: &Link| {
        l.connected
            && (l.buffered() >= ctx.offline_max || l.buffered_bytes() >= ctx.offline_bytes_max)
    };
    loop {
        while hold(&link.borrow()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let Some(journal) = rx.recv().await else {
            return;
        };
        let bytes = journal.bytes.len();
        ctx.outbound.taken(journal.events as usize, bytes);
        let mut l = link.borrow_mut();
        let n = u64::from(journal.events);
        // Connected, the outbox may pass its bounds by this one journal (the hold above
        // keeps it from growing further); disconnected, it never does.
        if !l.connected && l.over(n, bytes, &ctx) {
            let total = ctx.stats.dropped_offline.fetch_add(n, Relaxed) + n;
            if total == n {
                tracing::warn!(
                    events_max = ctx.offline_max,
                    bytes_max = ctx.offline_bytes_max,
                    "offline buffer full: dropping changes (anti-entropy repairs them)"
                );
            }
            continue;
        }
        l.outbox_since.get_or_insert_with(Instant::now);
        l.outbox_events += n;
        l.outbox_bytes += bytes;
        l.outbox.push_back(journal);
        l.publish_gauges(&ctx.stats);
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
                let payload = {
                    let mut l = link.borrow_mut();
                    let sent = match l.retry.pop_front() {
                        Some(s) => {
                            l.retry_events -= u64::from(s.events);
                            l.retry_bytes -= s.payload.len();
                            s
                        }
                        None => next_payload(&ctx, &mut l, &mut builder),
                    };
                    let payload = sent.payload.clone();
                    l.unconfirmed.push(sent);
                    l.publish_gauges(&ctx.stats);
                    payload
                };
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
        let (len, n) = crate::replication::changes::prefix_len(
            &front.bytes,
            room_events,
            room_bytes,
            builder.is_empty(),
        );
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
        assert_eq!(f.events(), 0);
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
        assert!(f.events() == 0 && !f.full());
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
    fn the_reconnect_hold_ends_only_on_online_records_of_awaited_peers() {
        let mut l = Link {
            awaiting: ["a", "b"].map(String::from).into(),
            settle_until: Some(Instant::now() + RESUBSCRIBE_WAIT),
            ..Link::default()
        };
        // A retained last will says the peer was cut off, not that it re-subscribed:
        // it may be reconnecting right now, and what we publish first would miss it.
        assert!(
            !l.presence_seen("a", false),
            "an offline record ends no wait"
        );
        assert!(!l.presence_seen("c", true), "c was not awaited");
        assert!(l.presence_seen("b", true));
        assert!(!l.settled(Instant::now()), "still waiting for a");
        assert!(l.presence_seen("a", true));
        assert!(l.settled(Instant::now()));
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
