//! The replication link to the broker as a state machine, free of I/O (in the manner of
//! rumqttc's `MqttState`): the outbox of changes waiting to be published, the payloads
//! published and not yet acknowledged, what to send again after a reconnect, the hold
//! after a reconnect, the reconnect backoff and the offline buffer's bounds. The
//! replication thread (`thread.rs`) feeds it events — connected, connection lost, a
//! journal from the shards, a packet id sent, a PUBACK, a peer's presence, stop — and
//! carries out what [`Link::next`] says: publish these bytes, wait until then, or wait
//! for news.
//!
//! Order: events leave in the order they arrived, within a payload and across payloads;
//! payloads sent again after a reconnect go before anything newer. A payload can reach
//! the broker twice (its acknowledgement was lost with the connection): the merge on
//! the receiving side is idempotent.

use crate::replication::changes::{prefix_len, PayloadBuilder};
use crate::store::journal::Journal;
use bytes::Bytes;
use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

/// A payload is cut once it holds this many bytes (a single larger event goes alone).
pub const PAYLOAD_TARGET_BYTES: usize = 64 * 1024;
/// Payloads published and not yet acknowledged, at most, by count and by bytes. Some
/// brokers (rumqttd) acknowledge in bunches: a small window starves small payloads
/// (with 64, one event per payload ran at 2.7k/s through rumqttd; with 1,024, 63k/s).
pub const UNCONFIRMED_MAX: usize = 1024;
const UNCONFIRMED_BYTES_MAX: usize = 16 << 20;
/// Reconnect backoff: doubles from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest wait, after a reconnect, for peers to re-subscribe before publishing anyway.
pub const RESUBSCRIBE_WAIT: Duration = Duration::from_secs(6);

/// The link's bounds, from `[mqtt]`.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Events in one payload, at most (`batch_max_events`, at least 1).
    pub batch_events: usize,
    /// How long the oldest waiting event may wait for its payload to fill
    /// (`batch_max_delay_us`).
    pub batch_delay: Duration,
    /// The offline buffer: changes held while the broker is away, at most
    /// (`offline_buffer_events`, `offline_buffer_bytes`).
    pub offline_events_max: u64,
    pub offline_bytes_max: usize,
}

/// What the driver does next to publish.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Publish this payload (QoS 1); it is now awaiting its acknowledgement.
    Publish(Bytes),
    /// Nothing to do before this moment, unless something happens.
    WaitUntil(Instant),
    /// Nothing to do until something happens.
    Idle,
    /// These peers did not announce themselves within [`RESUBSCRIBE_WAIT`] after the
    /// reconnect: they are gone (their last will may have been lost with the broker).
    PeersGone(Vec<String>),
}

/// What became of a journal handed to the link.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    Queued,
    /// Disconnected and the offline buffer is full: its events are dropped.
    Dropped(u64),
}

/// The connection was lost: when to try again.
#[derive(Debug, PartialEq, Eq)]
pub struct Lost {
    pub retry_in: Duration,
    /// The link was up until now, or this is the first failure since it was: worth a
    /// warning (later failures of the same outage are not).
    pub news: bool,
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

/// The link's state. Time comes in as `now`: the link reads no clock.
pub struct Link {
    settings: Settings,
    builder: PayloadBuilder,
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
    /// Flushing before the node stops: publish without waiting for a batch to fill.
    stopping: bool,
    /// The wait before the next reconnect attempt, and the failures since the last
    /// connection.
    backoff: Duration,
    failures: u32,
}

impl Link {
    /// A link for the node `node_id` (its `origin`), disconnected.
    pub fn new(settings: Settings, origin: u32, node_id: &str) -> Link {
        assert!(
            settings.batch_events > 0,
            "a payload holds one event at least"
        );
        Link {
            settings,
            builder: PayloadBuilder::new(origin, node_id),
            connected: false,
            awaiting: HashSet::new(),
            settle_until: None,
            outbox: VecDeque::new(),
            outbox_events: 0,
            outbox_bytes: 0,
            outbox_since: None,
            retry: VecDeque::new(),
            retry_events: 0,
            retry_bytes: 0,
            unconfirmed: InFlight::default(),
            stopping: false,
            backoff: BACKOFF_FIRST,
            failures: 0,
        }
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping
    }

    /// Changes waiting to be published (the offline buffer), and their bytes.
    pub fn buffered(&self) -> u64 {
        self.outbox_events + self.retry_events
    }

    pub fn buffered_bytes(&self) -> usize {
        self.outbox_bytes + self.retry_bytes
    }

    /// Changes the broker has not confirmed: waiting, or published and not acknowledged.
    pub fn pending(&self) -> u64 {
        self.buffered() + self.unconfirmed.events()
    }

    /// The broker acknowledged the connection (ConnAck) at `now`. `online_peers`: the
    /// peers known to be online, whose re-subscription publishing waits for.
    pub fn on_connected(
        &mut self,
        session_present: bool,
        online_peers: impl IntoIterator<Item = String>,
        now: Instant,
    ) {
        self.connected = true;
        self.backoff = BACKOFF_FIRST;
        self.failures = 0;
        if !session_present {
            // The broker forgot our session, and rumqttc dropped its unacknowledged
            // publishes: send them again, in order, before anything newer.
            for s in self.unconfirmed.take_all().into_iter().rev() {
                self.retry_events += u64::from(s.events);
                self.retry_bytes += s.payload.len();
                self.retry.push_front(s);
            }
        }
        // Hold publishing until the peers that were online show up again. Not needed
        // when the broker kept our session: it kept theirs, and queues for them.
        self.awaiting = if session_present {
            HashSet::new()
        } else {
            online_peers.into_iter().collect()
        };
        self.settle_until = Some(now + RESUBSCRIBE_WAIT);
    }

    /// The connection failed or was lost. Unacknowledged payloads stay unconfirmed:
    /// rumqttc resends them if the broker kept the session, [`Link::on_connected`] queues
    /// them again if not.
    pub fn on_disconnected(&mut self) -> Lost {
        let was = std::mem::replace(&mut self.connected, false);
        self.failures += 1;
        let retry_in = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        Lost {
            retry_in,
            news: was || self.failures == 1,
        }
    }

    /// Whether to leave journals in the shards' queue for now: connected, with the
    /// outbox at its bounds, so writers feel backpressure. Disconnected, journals are
    /// taken (and dropped past the bounds) so the queue does not hold the writers up.
    pub fn holds_intake(&self) -> bool {
        self.connected
            && (self.buffered() >= self.settings.offline_events_max
                || self.buffered_bytes() >= self.settings.offline_bytes_max)
    }

    /// A journal from the shards arrived at `now`. Connected, the outbox may pass its
    /// bounds by this one journal ([`Link::holds_intake`] keeps it from growing
    /// further); disconnected, it never does.
    pub fn on_journal(&mut self, journal: Journal, now: Instant) -> Taken {
        let (n, bytes) = (u64::from(journal.events), journal.bytes.len());
        if !self.connected && self.over(n, bytes) {
            return Taken::Dropped(n);
        }
        self.outbox_since.get_or_insert(now);
        self.outbox_events += n;
        self.outbox_bytes += bytes;
        self.outbox.push_back(journal);
        Taken::Queued
    }

    /// Whether `events` more of `bytes` would pass the offline buffer's bounds.
    fn over(&self, events: u64, bytes: usize) -> bool {
        self.buffered() + events > self.settings.offline_events_max
            || self.buffered_bytes() + bytes > self.settings.offline_bytes_max
    }

    /// rumqttc sent a publish with packet id `pkid` (`Outgoing::Publish`).
    pub fn on_sent(&mut self, pkid: u16) {
        self.unconfirmed.assign(pkid);
    }

    /// The broker acknowledged `pkid`: the events of that payload, if it was ours.
    pub fn on_puback(&mut self, pkid: u16) -> Option<u32> {
        self.unconfirmed.ack(pkid).map(|s| s.events)
    }

    /// A presence record of `node` arrived; true when it ends the wait for that node.
    /// An *online* record that arrives after our reconnect settles its node: a live one
    /// is published after that node re-subscribed; a retained one means the broker kept
    /// its state (it did not restart), so the node's subscription is there too. An
    /// offline record (a last will) does not: the node lost its connection too and may
    /// be re-subscribing right now, so the wait goes on, at most until `settle_until`.
    pub fn on_presence(&mut self, node: &str, online: bool) -> bool {
        online && self.awaiting.remove(node)
    }

    /// The node is stopping: publish what is held without waiting for batches to fill.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    fn settled(&self, now: Instant) -> bool {
        self.awaiting.is_empty() || self.settle_until.is_none_or(|t| now >= t)
    }

    /// What to do next, at `now`: publish whenever connected, peers settled and room in
    /// flight; payloads to send again first, then the outbox once a batch is full or due.
    pub fn next(&mut self, now: Instant) -> Next {
        if !self.connected || self.unconfirmed.full() {
            return Next::Idle;
        }
        if !self.settled(now) {
            return Next::WaitUntil(self.settle_until.unwrap_or(now));
        }
        if !self.awaiting.is_empty() {
            // Waited long enough: the next reconnect will not wait for these.
            return Next::PeersGone(self.awaiting.drain().collect());
        }
        if let Some(s) = self.retry.pop_front() {
            self.retry_events -= u64::from(s.events);
            self.retry_bytes -= s.payload.len();
            return Next::Publish(self.publish(s));
        }
        if self.outbox_events == 0 {
            return Next::Idle;
        }
        let due = self
            .outbox_since
            .map_or(now, |t| t + self.settings.batch_delay);
        let full = self.outbox_events >= self.settings.batch_events as u64
            || self.outbox_bytes >= PAYLOAD_TARGET_BYTES;
        if full || self.stopping || now >= due {
            let s = self.cut(now);
            Next::Publish(self.publish(s))
        } else {
            Next::WaitUntil(due)
        }
    }

    fn publish(&mut self, s: Sent) -> Bytes {
        let payload = s.payload.clone();
        self.unconfirmed.push(s);
        payload
    }

    /// Cut the next payload from the outbox: at most `batch_events` events and (unless
    /// a single event is larger) [`PAYLOAD_TARGET_BYTES`] bytes.
    fn cut(&mut self, now: Instant) -> Sent {
        let builder = &mut self.builder;
        while let Some(front) = self.outbox.front_mut() {
            let room_events = self.settings.batch_events - builder.events() as usize;
            let room_bytes = PAYLOAD_TARGET_BYTES.saturating_sub(builder.len());
            if room_events == 0 || (room_bytes == 0 && !builder.is_empty()) {
                break;
            }
            let (len, n) = prefix_len(&front.bytes, room_events, room_bytes, builder.is_empty());
            if n == 0 {
                break; // the next event does not fit: it starts the next payload
            }
            builder.extend(&front.bytes[..len], n);
            self.outbox_events -= u64::from(n);
            self.outbox_bytes -= len;
            if n == front.events {
                self.outbox.pop_front();
            } else {
                front.bytes.drain(..len);
                front.events -= n;
            }
        }
        if self.outbox_events == 0 {
            self.outbox_since = None;
        } else {
            // What is left is due now too: it waited as long as what just went.
            self.outbox_since = self.outbox_since.or(Some(now));
        }
        let events = builder.events();
        Sent {
            pkid: None,
            payload: Bytes::from(builder.take()),
            events,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::changes::{decode, Limits};
    use crate::store::journal::encode_event;

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
        let now = Instant::now();
        let mut l = Link::new(settings(1), 1, "me");
        l.on_connected(false, ["a", "b"].map(String::from), now);
        // A retained last will says the peer was cut off, not that it re-subscribed:
        // it may be reconnecting right now, and what we publish first would miss it.
        assert!(!l.on_presence("a", false), "an offline record ends no wait");
        assert!(!l.on_presence("c", true), "c was not awaited");
        assert!(l.on_presence("b", true));
        assert_eq!(l.on_journal(journal(&[1]), now), Taken::Queued);
        let settle = now + RESUBSCRIBE_WAIT;
        assert_eq!(l.next(now), Next::WaitUntil(settle), "still waiting for a");
        assert!(l.on_presence("a", true));
        assert!(matches!(l.next(now), Next::Publish(_)));
    }

    #[test]
    fn peers_that_never_reappear_are_given_up_after_the_wait() {
        let now = Instant::now();
        let mut l = Link::new(settings(1), 1, "me");
        l.on_connected(false, ["a".to_string()], now);
        let settle = now + RESUBSCRIBE_WAIT;
        assert_eq!(l.next(now), Next::WaitUntil(settle));
        assert_eq!(l.next(settle), Next::PeersGone(vec!["a".to_string()]));
        assert_eq!(
            l.next(settle),
            Next::Idle,
            "nothing to publish, nobody awaited"
        );
        // With the session kept, the broker kept the peers' too: no wait at all.
        l.on_disconnected();
        l.on_connected(true, ["a".to_string()], now);
        l.on_journal(journal(&[1]), now);
        assert!(matches!(l.next(now), Next::Publish(_)));
    }

    #[test]
    fn a_batch_goes_when_full_or_due_or_stopping() {
        let t0 = Instant::now();
        let mut l = Link::new(settings(3), 1, "me");
        l.on_journal(journal(&[1, 2]), t0);
        assert_eq!(l.next(t0), Next::Idle, "disconnected");
        l.on_connected(true, [], t0);
        let due = t0 + settings(3).batch_delay;
        assert_eq!(l.next(t0), Next::WaitUntil(due), "two of three events");
        assert_eq!(events_of(&publish(l.next(due))), [1, 2], "due");
        l.on_journal(journal(&[3, 4, 5, 6]), due);
        assert_eq!(events_of(&publish(l.next(due))), [3, 4, 5], "full");
        // What is left is due when what went with it was.
        let later = due + settings(3).batch_delay;
        assert_eq!(l.next(due), Next::WaitUntil(later));
        assert_eq!(events_of(&publish(l.next(later))), [6]);
        l.on_journal(journal(&[7]), later);
        l.stop();
        assert_eq!(events_of(&publish(l.next(later))), [7], "stopping");
        assert_eq!(l.pending(), 7, "all published, none acknowledged");
    }

    #[test]
    fn the_offline_buffer_drops_past_its_bounds_and_the_outbox_holds_intake() {
        let now = Instant::now();
        let mut l = Link::new(settings(100), 1, "me");
        for n in 0..10 {
            assert_eq!(l.on_journal(journal(&[n]), now), Taken::Queued);
        }
        assert!(
            !l.holds_intake(),
            "disconnected: journals are taken, and dropped"
        );
        assert_eq!(l.on_journal(journal(&[10, 11]), now), Taken::Dropped(2));
        l.on_connected(true, [], now);
        assert!(l.holds_intake(), "connected: journals wait in the queue");
        let _ = publish(l.next(now + Duration::from_secs(1)));
        assert!(!l.holds_intake(), "the outbox has room again");
        assert_eq!(l.buffered(), 0);
    }

    #[test]
    fn the_reconnect_backoff_doubles_up_to_its_bound_and_restarts_on_connect() {
        let mut l = Link::new(settings(1), 1, "me");
        let first = l.on_disconnected();
        assert_eq!(
            first,
            Lost {
                retry_in: BACKOFF_FIRST,
                news: true
            }
        );
        let waits: Vec<Lost> = (0..8).map(|_| l.on_disconnected()).collect();
        assert!(waits.iter().all(|w| !w.news), "one warning an outage");
        assert_eq!(waits[0].retry_in, BACKOFF_FIRST * 2);
        assert_eq!(waits[7].retry_in, BACKOFF_MAX);
        l.on_connected(true, [], Instant::now());
        assert_eq!(l.on_disconnected(), first, "a new outage");
    }

    /// rumqttc (0.25) and the broker as the link sees them, driven by a seed: publishes
    /// wait in rumqttc's request channel, then go out on the wire with packet ids; the
    /// broker receives them in order and acknowledges them; a connection drop loses
    /// whatever was on the wire either way (rumqttc keeps its requests and unacknowledged
    /// publishes); a reconnect resumes the session (rumqttc sends those again, the
    /// unacknowledged under the same ids) or starts a new one (rumqttc forgets them).
    struct Model {
        link: Link,
        connected: bool,
        requests: VecDeque<Bytes>,
        wire: VecDeque<(u16, Bytes)>,
        acks: VecDeque<u16>,
        /// rumqttc's publishes not yet acknowledged, oldest first.
        outgoing: Vec<(u16, Bytes)>,
        pkid: u16,
        /// Events handed to the link, and events the broker received (with repeats).
        accepted: Vec<u64>,
        received: Vec<u64>,
    }

    impl Model {
        fn publish(&mut self, payload: Bytes) {
            self.requests.push_back(payload);
        }

        /// rumqttc takes the oldest request and sends it with a fresh packet id.
        fn rumqttc_sends(&mut self) {
            let Some(payload) = self.requests.pop_front() else {
                return;
            };
            loop {
                self.pkid = self.pkid.checked_add(1).unwrap_or(1);
                if !self.outgoing.iter().any(|(p, _)| *p == self.pkid) {
                    break;
                }
            }
            self.outgoing.push((self.pkid, payload.clone()));
            self.wire.push_back((self.pkid, payload));
            self.link.on_sent(self.pkid);
        }

        fn broker_receives(&mut self) {
            if let Some((pkid, payload)) = self.wire.pop_front() {
                self.received.extend(events_of(&payload));
                self.acks.push_back(pkid);
            }
        }

        fn ack_arrives(&mut self) {
            if let Some(pkid) = self.acks.pop_front() {
                self.outgoing.retain(|(p, _)| *p != pkid);
                assert!(self.link.on_puback(pkid).is_some(), "ack of an unknown id");
            }
        }

        fn drop_connection(&mut self) {
            self.connected = false;
            self.wire.clear();
            self.acks.clear();
            self.link.on_disconnected();
        }

        fn reconnect(&mut self, session_present: bool, now: Instant) {
            self.connected = true;
            if session_present {
                for (pkid, payload) in self.outgoing.clone() {
                    self.wire.push_back((pkid, payload));
                    self.link.on_sent(pkid);
                }
            } else {
                self.outgoing.clear();
                self.requests.clear();
            }
            self.link.on_connected(session_present, [], now);
        }
    }

    fn run_model(seed: u64) {
        let mut rng = Rng(seed);
        let t0 = Instant::now();
        let mut m = Model {
            link: Link::new(settings(1 + rng.below(6) as usize), 1, "me"),
            connected: false,
            requests: VecDeque::new(),
            wire: VecDeque::new(),
            acks: VecDeque::new(),
            outgoing: Vec::new(),
            pkid: 0,
            accepted: Vec::new(),
            received: Vec::new(),
        };
        let mut now = t0;
        let mut seq = 0;
        for _ in 0..2_000 {
            now += Duration::from_micros(rng.below(1_000));
            match rng.below(100) {
                0..=24 => {
                    let events: Vec<u64> = (0..1 + rng.below(4)).map(|i| seq + i).collect();
                    seq += events.len() as u64;
                    if m.link.on_journal(journal(&events), now) == Taken::Queued {
                        m.accepted.extend(events);
                    }
                }
                25..=54 if m.connected => match m.link.next(now) {
                    Next::Publish(payload) => m.publish(payload),
                    Next::WaitUntil(t) => assert!(t > now),
                    Next::Idle => {}
                    Next::PeersGone(_) => panic!("no peers were awaited"),
                },
                55..=64 if m.connected => m.rumqttc_sends(),
                65..=79 if m.connected => m.broker_receives(),
                80..=94 if m.connected => m.ack_arrives(),
                95..=97 if m.connected => m.drop_connection(),
                _ if !m.connected && rng.chance(30) => m.reconnect(rng.chance(50), now),
                _ => {}
            }
        }
        // Heal: connected for good, everything goes out and is acknowledged.
        if !m.connected {
            m.reconnect(rng.chance(50), now);
        }
        let mut rounds = 0;
        while m.link.pending() > 0 || !m.wire.is_empty() || !m.requests.is_empty() {
            rounds += 1;
            assert!(rounds < 100_000, "seed {seed}: the link does not drain");
            now += Duration::from_secs(1);
            if let Next::Publish(payload) = m.link.next(now) {
                m.publish(payload);
            }
            m.rumqttc_sends();
            m.broker_receives();
            m.ack_arrives();
        }
        // None lost, none out of order: the first time the broker saw each event is
        // the order the link was given them. (Repeats are payloads whose
        // acknowledgement was lost with a connection.)
        let mut seen = HashSet::new();
        let first: Vec<u64> = m
            .received
            .iter()
            .copied()
            .filter(|e| seen.insert(*e))
            .collect();
        let lost: Vec<u64> = m
            .accepted
            .iter()
            .copied()
            .filter(|e| !seen.contains(e))
            .collect();
        assert!(
            lost.is_empty(),
            "seed {seed}: {} events lost, first {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        let at = first.iter().zip(&m.accepted).position(|(a, b)| a != b);
        assert_eq!(
            at, None,
            "seed {seed}: events out of order from this index on"
        );
    }

    #[test]
    fn every_accepted_change_reaches_the_broker_in_order_across_reconnects() {
        for seed in 0..200 {
            run_model(seed);
        }
    }

    /// splitmix64.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// `batch_events` per payload, 2 ms of batching delay, an offline buffer of ten
    /// events.
    fn settings(batch_events: usize) -> Settings {
        Settings {
            batch_events,
            batch_delay: Duration::from_millis(2),
            offline_events_max: 10,
            offline_bytes_max: 1 << 20,
        }
    }

    /// A journal of events numbered `ns` (the number is the event's clock).
    fn journal(ns: &[u64]) -> Journal {
        let mut j = Journal::default();
        for &n in ns {
            encode_event(&mut j.bytes, n, format!("k{n}").as_bytes(), Some(b"v"));
            j.events += 1;
        }
        j
    }

    fn publish(next: Next) -> Bytes {
        match next {
            Next::Publish(p) => p,
            other => panic!("expected a payload, got {other:?}"),
        }
    }

    /// The numbers of a payload's events.
    fn events_of(payload: &Bytes) -> Vec<u64> {
        let limits = Limits {
            payload_bytes_max: 1 << 20,
            value_bytes_max: 1 << 10,
        };
        let decoded = decode(payload, limits).expect("the link's payloads decode");
        decoded.events.iter().map(|e| e.hlc).collect()
    }
}
