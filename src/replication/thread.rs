//! The replication thread (I/O edge): one dedicated thread, with its own runtime, that
//! publishes this node's changes in batches and applies the changes of its peers. Every
//! decision about what to publish when is the [`Link`]'s (`link.rs`, free of I/O); this
//! file feeds it events and carries out what it says. Four tasks share one `Context`:
//! - `drive` polls rumqttc's event loop: connection up or lost (with the link's
//!   backoff), packet ids and acknowledgements, peers' changes (decoded by
//!   [`route`] and sent to the shards' inboxes) and presence records;
//! - `intake` moves journals from the shards' queue ([`Outbound`]) into the link;
//! - `publish` asks the link what next ([`Link::next`]) and hands payloads to rumqttc;
//! - `heartbeat` republishes this node's presence record.
//!
//! Shards hand their journals ([`crate::store::shard::Shard::take_journal`]) to
//! [`Outbound::push`], which never blocks. The link packs their events into payloads
//! ([`crate::replication::changes`]) of at most `batch_max_events` events, published
//! with QoS 1 once full or `batch_max_delay_us` after the oldest event arrived. Flow
//! control:
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
//! them itself). After a reconnect the link waits until every peer that was online has
//! announced itself online again (so has re-subscribed; its last will does not count),
//! at most [`crate::replication::link::RESUBSCRIBE_WAIT`], before publishing: changes
//! published before a peer re-subscribes would never reach it.

use crate::config::Config;
use crate::logging::LogLimit;
use crate::node::inbox::{RemoteChanges, ThreadMsg};
use crate::replication::changes::Limits;
use crate::replication::inbound::route;
use crate::replication::link::{Link, Next, Settings, Taken};
use crate::replication::mqtt::{
    broker_address, mqtt_client, mqtt_options, payload_bytes_max, ReplError, Topics, REQUESTS_MAX,
};
use crate::replication::outbound::Outbound;
use crate::replication::peers::{clock_offset_ms, Peers, Presence, Recorded};
use crate::replication::stats::ReplStats;
use crate::store::journal::Journal;
use crate::store::version::origin_of;
use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

/// How often a connected node republishes its presence record (with its clock).
pub const PRESENCE_INTERVAL: Duration = Duration::from_secs(30);

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
        let mut options = mqtt_options(config, &config.mqtt.client_id)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(ReplStats::default());
        let outbound = Arc::new(Outbound::new(&config.mqtt, tx, stats));
        let (control, control_rx) = tokio::sync::mpsc::unbounded_channel();
        let ctx = Context::new(config, client_addr, inboxes, peers, outbound.clone());
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

/// What the thread's tasks share (one thread, so `Cell` and `RefCell`).
struct Context {
    node_id: String,
    topics: Topics,
    me: Presence,
    shard_bits: u32,
    limits: Limits,
    /// The link's state: every decision about what to publish when.
    link: RefCell<Link>,
    /// Wakes the publisher: the link may have something to publish.
    wake: Notify,
    /// Wakes the intake: the link may take journals again.
    room: Notify,
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
    fn new(
        config: &Config,
        client_addr: String,
        inboxes: Vec<tokio::sync::mpsc::Sender<ThreadMsg>>,
        peers: Arc<Peers>,
        outbound: Arc<Outbound>,
    ) -> Context {
        let shards = inboxes.len();
        let settings = Settings {
            batch_events: config.mqtt.batch_max_events.max(1),
            batch_delay: Duration::from_micros(config.mqtt.batch_max_delay_us),
            offline_events_max: config.mqtt.offline_buffer_events as u64,
            offline_bytes_max: config.mqtt.offline_buffer_bytes,
        };
        Context {
            node_id: config.node_id.clone(),
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
            link: RefCell::new(Link::new(
                settings,
                origin_of(&config.node_id),
                &config.node_id,
            )),
            wake: Notify::new(),
            room: Notify::new(),
            inboxes,
            peers,
            stats: outbound.stats.clone(),
            outbound,
            reject_log: Cell::new(LogLimit::new(Duration::from_secs(1))),
            skew_log: Cell::new(LogLimit::new(Duration::from_secs(10))),
            max_clock_skew_ms: config.mqtt.max_clock_skew_ms,
        }
    }

    /// Whether a rejection may be logged now.
    fn may_log_rejection(&self) -> bool {
        may_log(&self.reject_log)
    }

    /// Show the offline buffer's size in INFO.
    fn publish_gauges(&self) {
        let l = self.link.borrow();
        self.stats.buffered_events.store(l.buffered(), Relaxed);
        let bytes = l.buffered_bytes() as u64;
        self.stats.buffered_bytes.store(bytes, Relaxed);
    }
}

fn may_log(limit: &Cell<LogLimit>) -> bool {
    let mut l = limit.get();
    let due = l.due();
    limit.set(l);
    due
}

/// The thread's body: its runtime and tasks, until the server says stop.
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
    let (client, eventloop) = mqtt_client(options, REQUESTS_MAX);
    let ctx = Rc::new(ctx);
    tasks.block_on(&rt, async move {
        tokio::task::spawn_local(drive(ctx.clone(), client.clone(), eventloop));
        tokio::task::spawn_local(intake(ctx.clone(), rx));
        let heartbeat = tokio::task::spawn_local(heartbeat(ctx.clone(), client.clone()));
        let publisher = tokio::task::spawn_local(publish(ctx.clone(), client.clone()));
        if let Some(Control::Flush) = control.recv().await {
            flush(&ctx, &mut control).await;
        }
        publisher.abort();
        // No `online` record may follow the goodbye below.
        heartbeat.abort();
        if ctx.link.borrow().is_connected() {
            say_goodbye(&ctx, &client).await;
        }
    });
}

/// Publish everything held at once, and count what the broker has not confirmed yet
/// until the server says stop (it decides how long to wait).
async fn flush(ctx: &Context, control: &mut mpsc::UnboundedReceiver<Control>) {
    ctx.link.borrow_mut().stop();
    ctx.wake.notify_one();
    loop {
        let pending = ctx.link.borrow().pending();
        let queued = ctx.outbound.queued_events() as u64;
        ctx.stats.unconfirmed.store(queued + pending, Relaxed);
        tokio::select! {
            _ = control.recv() => return,
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
}

/// Mark this node offline (retained) and disconnect.
async fn say_goodbye(ctx: &Context, client: &AsyncClient) {
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

/// Poll the MQTT event loop forever: connection state, acknowledgements, incoming changes
/// and presence. Never cancelled mid-poll (rumqttc's loop must not be).
async fn drive(ctx: Rc<Context>, client: AsyncClient, mut eventloop: EventLoop) {
    loop {
        match eventloop.poll().await {
            Ok(event) => on_event(&ctx, &client, event).await,
            Err(e) => {
                let retry_in = on_connection_error(&ctx, e);
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}

/// The connection failed or dropped: say so (once an outage), and return how long to
/// wait before the event loop tries again.
fn on_connection_error(ctx: &Context, e: rumqttc::ConnectionError) -> Duration {
    let lost = ctx.link.borrow_mut().on_disconnected();
    ctx.stats.connected.store(false, Relaxed);
    // Disconnected, the intake takes journals again (and drops past the bounds).
    ctx.room.notify_one();
    if let rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
        rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n),
    )) = e
    {
        // rumqttc drops the connection on a packet over its limit; with a persistent
        // session the broker sends it again on every reconnect.
        ctx.stats.rejected_payloads.fetch_add(1, Relaxed);
        tracing::error!(
            bytes = n,
            limit = ctx.limits.payload_bytes_max,
            "a message far over the payload limit arrived and cost the connection; \
             set the broker's message size limit (docs/DEPLOYMENT.md)"
        );
    }
    if ctx.link.borrow().is_stopping() {
        // Our own goodbye closed the connection: nothing to warn about.
        tracing::debug!("MQTT connection closed while stopping: {e}");
    } else if lost.news {
        tracing::warn!("MQTT broker unreachable ({e}); retrying, changes are buffered");
    } else {
        tracing::debug!("MQTT reconnect failed: {e}");
    }
    lost.retry_in
}

/// One event from rumqttc: news for the link, a peer's changes or presence.
async fn on_event(ctx: &Context, client: &AsyncClient, event: Event) {
    let incoming = matches!(event, Event::Incoming(_));
    match event {
        Event::Incoming(Packet::ConnAck(ack)) => on_connect(ctx, client, ack.session_present),
        Event::Incoming(Packet::SubAck(ack)) => check_subscribed(ctx, &ack),
        Event::Incoming(Packet::PubAck(ack)) => {
            let events = ctx.link.borrow_mut().on_puback(ack.pkid);
            if let Some(events) = events {
                ctx.stats
                    .published_events
                    .fetch_add(u64::from(events), Relaxed);
                ctx.stats.published_payloads.fetch_add(1, Relaxed);
                ctx.wake.notify_one();
            }
        }
        Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
            ctx.link.borrow_mut().on_sent(pkid);
        }
        Event::Incoming(Packet::Publish(p)) => {
            if p.topic == ctx.topics.updates {
                receive(ctx, p.payload).await;
            } else if let Some(node) = ctx.topics.presence_node(&p.topic) {
                on_presence(ctx, node, &p.payload, p.retain);
            }
        }
        _ => {}
    }
    if incoming {
        note_settled(ctx);
    }
}

/// Anything from the broker (acks, peers' changes, keep-alive answers) while it holds
/// nothing of ours unconfirmed: every change made so far has reached it.
fn note_settled(ctx: &Context) {
    let settled = {
        let l = ctx.link.borrow();
        l.is_connected() && l.pending() == 0
    };
    if settled && ctx.outbound.queued_events() == 0 {
        ctx.stats
            .settled_at_us
            .store(crate::store::version::now_us(), Relaxed);
    }
}

fn on_connect(ctx: &Context, client: &AsyncClient, session_present: bool) {
    ctx.stats.connects.fetch_add(1, Relaxed);
    ctx.stats.connected.store(true, Relaxed);
    tracing::info!(session_present, "connected to the MQTT broker");
    // rumqttc does not restore subscriptions: subscribe on every ConnAck.
    let subs = [&ctx.topics.updates, &ctx.topics.nodes]
        .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
    if let Err(e) = client.try_subscribe_many(subs) {
        tracing::error!("cannot subscribe: {e}");
    }
    announce(ctx, client);
    let online = ctx.peers.online();
    let now = Instant::now();
    ctx.link
        .borrow_mut()
        .on_connected(session_present, online, now);
    ctx.publish_gauges();
    ctx.wake.notify_one();
}

/// A broker may refuse a subscription (an ACL, say): the node would look connected and
/// never receive a change. Say so loudly.
fn check_subscribed(ctx: &Context, ack: &rumqttc::SubAck) {
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
async fn heartbeat(ctx: Rc<Context>, client: AsyncClient) {
    loop {
        tokio::time::sleep(PRESENCE_INTERVAL).await;
        if ctx.link.borrow().is_connected() {
            announce(&ctx, &client);
        }
    }
}

fn on_presence(ctx: &Context, node: &str, payload: &[u8], retained: bool) {
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
    if ctx.link.borrow_mut().on_presence(node, p.online) {
        ctx.wake.notify_one();
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

/// Move journals from the shards into the link's outbox. While the link holds them
/// back, they stay in the queue (writers feel backpressure) until the publisher or a
/// lost connection makes room.
async fn intake(ctx: Rc<Context>, mut rx: mpsc::UnboundedReceiver<Journal>) {
    loop {
        while ctx.link.borrow().holds_intake() {
            // A permit left by an earlier notification only costs one more look.
            ctx.room.notified().await;
        }
        let Some(journal) = rx.recv().await else {
            return;
        };
        ctx.outbound
            .taken(journal.events as usize, journal.bytes.len());
        let taken = ctx.link.borrow_mut().on_journal(journal, Instant::now());
        match taken {
            Taken::Queued => {
                ctx.publish_gauges();
                ctx.wake.notify_one();
            }
            Taken::Dropped(n) => {
                let total = ctx.stats.dropped_offline.fetch_add(n, Relaxed) + n;
                if total == n {
                    let s = ctx.link.borrow().settings();
                    tracing::warn!(
                        events_max = s.offline_events_max,
                        bytes_max = s.offline_bytes_max,
                        "offline buffer full: dropping changes (anti-entropy repairs them)"
                    );
                }
            }
        }
    }
}

/// Publish payloads whenever the link says so.
async fn publish(ctx: Rc<Context>, client: AsyncClient) {
    let topic = ctx.topics.updates.clone();
    loop {
        let next = ctx.link.borrow_mut().next(Instant::now());
        match next {
            Next::Idle => ctx.wake.notified().await,
            Next::WaitUntil(t) => {
                tokio::select! {
                    _ = ctx.wake.notified() => {}
                    _ = tokio::time::sleep_until(t.into()) => {}
                }
            }
            Next::PeersGone(gone) => {
                for node in gone {
                    tracing::warn!(
                        node,
                        "peer did not reappear after the reconnect: marked offline"
                    );
                    ctx.peers.mark_offline(&node);
                }
            }
            Next::Publish(payload) => {
                ctx.publish_gauges();
                // The outbox shrank: the intake may take more.
                ctx.room.notify_one();
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
