//! A seeded, deterministic simulation of replication: no sockets, no wall clock.
//!
//! Several replicas (production `Shard`s with journals) take random local writes (SET,
//! DEL, INCR, APPEND) under skewed simulated clocks; every journal travels as a
//! production payload (`PayloadBuilder` → bytes → `replication::route` → `apply_remote`)
//! through a simulated network that delays, reorders, duplicates and loses deliveries
//! (a lost delivery is sent again later, as QoS 1 does). Once every delivery is done,
//! every replica must equal the last-write-wins model: the highest version written
//! for each key, with its value or tombstone, and all Merkle roots equal.
//!
//! A second run partitions replicas for a while (their traffic is lost for good) and
//! heals them with anti-entropy exchanges (`antientropy::exchange`, in-process, through the
//! real message encoding); every replica must again equal the model.
//!
//! A third run sends every change through each replica's production `replication::link::Link`
//! (batching, the unconfirmed window, re-sending after a reconnect) to a simulated
//! broker, with acknowledgements, dropped connections and reconnects with or without
//! the session; every acknowledged write must again reach every replica.
//!
//! A failure prints its seed; rerun one with MKV_SIM_SEED=<seed>.

use merkle_kv::antientropy::exchange::exchange;
use merkle_kv::antientropy::serve::Shards;
use merkle_kv::node::inbox::RemoteChanges;
use merkle_kv::replication::changes::{Limits, PayloadBuilder};
use merkle_kv::replication::inbound::{apply_remote, route};
use merkle_kv::replication::link::{Link, Next, Settings, Taken};
use merkle_kv::store::journal::Journal;
use merkle_kv::store::keyspace::KeyHash;
use merkle_kv::store::shard::{MemoryBudget, Shard};
use merkle_kv::store::version::{origin_of, Version};
use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

thread_local! {
    /// The simulated wall clock of the replica currently acting, in microseconds.
    static NOW: Cell<u64> = const { Cell::new(0) };
}

fn sim_now() -> u64 {
    NOW.with(Cell::get)
}

/// splitmix64: small, seedable, good enough to drive a simulation.
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

const LIMITS: Limits = Limits {
    payload_bytes_max: 1 << 20,
    value_bytes_max: 1 << 16,
};

struct Replica {
    shard: Shard,
    /// Offset of this replica's wall clock from simulated time (clock skew).
    skew_us: i64,
    name: String,
}

impl Replica {
    fn enter(&self, time_us: u64) {
        NOW.with(|n| n.set(time_us.saturating_add_signed(self.skew_us)));
    }
}

/// The model: for each key, the highest version written anywhere and what it wrote.
type Model = BTreeMap<Vec<u8>, (Version, Option<Vec<u8>>)>;

/// Replica `i`, with a journal and a skewed clock.
fn replica(i: usize, rng: &mut Rng) -> Replica {
    let name = format!("sim-{i}");
    let shard = Shard::new(0, 0, MemoryBudget::unlimited(), 1 << 16)
        .with_identity(origin_of(&name), 86_400)
        .with_journal()
        .with_wall_clock(sim_now);
    Replica {
        shard,
        skew_us: rng.below(4_000_000) as i64 - 2_000_000,
        name,
    }
}

/// Apply a payload to `r` as the replication thread and its shard would, at `time`.
fn deliver(r: &mut Replica, payload: &bytes::Bytes, time: u64) {
    r.enter(time);
    let routed = route(payload, 0, LIMITS).expect("our own payloads decode");
    let changes = RemoteChanges {
        data: payload.clone(),
        origin: routed.origin,
        events: routed.per_shard.into_iter().next().unwrap(),
        flush: routed.flush,
    };
    apply_remote(&mut r.shard, &changes, sim_now());
}

/// One random local write on `r` (SET, DEL, INCR or APPEND of one of `keys_n` keys),
/// recorded in `model` when it is the newest version of its key; returns the journal
/// it left.
fn local_write(
    rng: &mut Rng,
    r: &mut Replica,
    keys_n: u64,
    seq: u64,
    model: &mut Model,
) -> Option<Journal> {
    let key = format!("k{}", rng.below(keys_n)).into_bytes();
    let h = KeyHash::of(&key);
    let s = &mut r.shard;
    let wrote = match rng.below(10) {
        0..=4 => s.set(h, &key, format!("v{seq}").as_bytes()).is_ok(),
        5..=6 => s.del(h, &key).is_ok(),
        7 => s.incr(h, &key, 1 + rng.below(5) as i64).is_ok(),
        _ => s
            .concat(h, &key, format!("+{seq}").as_bytes(), rng.chance(50))
            .is_ok(),
    };
    if wrote {
        let v = s.version_of(h, &key).unwrap();
        let value = s.get(h, &key).map(<[u8]>::to_vec);
        let newest = model.get(&key).is_none_or(|(mv, _)| v > *mv);
        if newest {
            model.insert(key.clone(), (v, value));
        }
    }
    s.take_journal()
}

/// Every replica holds what the model says, and all Merkle roots agree. `heal`: after
/// anti-entropy, a replica may hold the winning contents under an older version.
fn assert_matches_model(replicas: &mut [Replica], model: &Model, heal: bool) {
    let roots: Vec<_> = replicas.iter_mut().map(|r| r.shard.root()).collect();
    for r in replicas.iter() {
        for (key, (v, value)) in model {
            let h = KeyHash::of(key);
            assert_eq!(
                r.shard.get(h, key),
                value.as_deref(),
                "{}: value of {}",
                r.name,
                String::from_utf8_lossy(key)
            );
            // Anti-entropy compares contents, not versions (docs/REPLICATION.md): a
            // replica may keep equal contents under an older version after healing.
            let version = r.shard.version_of(h, key);
            if heal {
                assert!(version.is_some_and(|got| got <= *v), "{}: version", r.name);
            } else {
                assert_eq!(version, Some(*v), "{}: version", r.name);
            }
        }
    }
    assert!(roots.iter().all(|x| *x == roots[0]), "Merkle roots differ");
}

/// `heal`: replicas are also partitioned for a while (what they send or should receive
/// then is lost for good, as for a node that is down), and anti-entropy exchanges
/// between neighbours repair them at the end.
fn run(seed: u64, heal: bool) {
    let mut rng = Rng(seed);
    let replicas_n = 2 + rng.below(4) as usize; // 2..=5
    let keys_n = 1 + rng.below(30); // few keys: many conflicts
    let ops_n = 200 + rng.below(800);
    let (drop_pct, dup_pct) = (rng.below(40), rng.below(30));
    let mut replicas: Vec<Replica> = (0..replicas_n).map(|i| replica(i, &mut rng)).collect();
    let mut model = Model::new();
    // In flight: (delivery time, tie-break, destination, payload).
    let mut network: BTreeMap<(u64, u64), (usize, bytes::Bytes)> = BTreeMap::new();
    let mut time = 1_700_000_000_000_000u64;
    let mut seq = 0u64;
    // Each replica's partition window, in operations: (start, end); empty without heal.
    let windows: Vec<(u64, u64)> = (0..replicas_n)
        .map(|_| {
            let start = rng.below(ops_n);
            let len = if heal { rng.below(ops_n / 2 + 1) } else { 0 };
            (start, start + len)
        })
        .collect();
    let cut = |r: usize, op: u64| windows[r].0 <= op && op < windows[r].1;

    for op in 0..ops_n {
        // Up to 2 ms between operations; then deliver whatever is due by now, in
        // delivery-time order (reordered relative to sending).
        time += rng.below(2_000);
        while let Some((&(at, tie), _)) = network.first_key_value() {
            if at > time {
                break;
            }
            let (dest, payload) = network.remove(&(at, tie)).unwrap();
            if cut(dest, op) {
                continue; // partitioned: lost for good
            }
            if rng.chance(drop_pct) {
                // Lost on the way: at-least-once delivery sends it again later.
                network.insert((at + 1 + rng.below(50_000), tie), (dest, payload));
                continue;
            }
            deliver(&mut replicas[dest], &payload, at);
        }

        let w = rng.below(replicas_n as u64) as usize;
        let r = &mut replicas[w];
        r.enter(time);
        let journal = local_write(&mut rng, r, keys_n, seq, &mut model);
        seq += 1;
        if let Some(journal) = journal {
            let mut b = PayloadBuilder::new(origin_of(&r.name), &r.name);
            b.extend(&journal.bytes, journal.events);
            let payload = bytes::Bytes::from(b.take());
            for dest in (0..replicas_n).filter(|&d| d != w && !cut(w, op)) {
                let copies = if rng.chance(dup_pct) { 2 } else { 1 };
                for _ in 0..copies {
                    seq += 1;
                    let at = time + rng.below(30_000); // up to 30 ms on the wire
                    network.insert((at, seq), (dest, payload.clone()));
                }
            }
        }
    }
    // Let every delivery complete (retries included; loss is not forever).
    while let Some(((at, _), (dest, payload))) = network.pop_first() {
        deliver(&mut replicas[dest], &payload, at.max(time));
    }
    if heal {
        // Anti-entropy along the chain and back, until every root agrees. One pass is
        // not always enough: digests ignore versions, so a replica holding the winning
        // contents under an older version can still lose a tie to a concurrent write
        // and pass that on; every exchange only moves versions up, so it converges.
        let order: Vec<usize> = (0..replicas_n - 1)
            .chain((0..replicas_n - 1).rev())
            .collect();
        let mut passes = 0;
        loop {
            let roots: Vec<_> = replicas.iter_mut().map(|r| r.shard.root()).collect();
            if roots.iter().all(|x| *x == roots[0]) {
                break;
            }
            passes += 1;
            assert!(passes <= 2 * replicas_n, "anti-entropy did not converge");
            for &i in &order {
                let (left, right) = replicas.split_at_mut(i + 1);
                let (a, b) = (&mut left[i], &mut right[0]);
                a.enter(time);
                let now = sim_now();
                let mut local = Shards {
                    shards: std::slice::from_mut(&mut a.shard),
                    now_us: now,
                };
                let mut peer = Shards {
                    shards: std::slice::from_mut(&mut b.shard),
                    now_us: now,
                };
                exchange(&mut local, &mut peer).expect("in-process exchange");
            }
        }
    }

    assert_matches_model(&mut replicas, &model, heal);
}

/// One replica's connection to the broker, as its [`Link`] sees it (rumqttc 0.25 and
/// the broker): payloads the link publishes wait in rumqttc's request channel, then go
/// out on the wire with packet ids; the broker receives them in order and acknowledges
/// each; a dropped connection loses what was on the wire both ways (rumqttc keeps its
/// requests and unacknowledged publishes); a reconnect resumes the session (rumqttc
/// sends those again, the unacknowledged under the same ids) or starts a new one
/// (rumqttc forgets them: the link must send them again).
struct Connection {
    link: Link,
    up: bool,
    requests: VecDeque<bytes::Bytes>,
    wire: VecDeque<(u16, bytes::Bytes)>,
    acks: VecDeque<u16>,
    /// rumqttc's publishes not yet acknowledged, oldest first.
    outgoing: Vec<(u16, bytes::Bytes)>,
    pkid: u16,
}

impl Connection {
    fn publish(&mut self, payload: bytes::Bytes) {
        self.requests.push_back(payload);
    }

    /// rumqttc takes the oldest request and sends it with a fresh packet id.
    fn rumqttc_sends(&mut self) -> bool {
        let Some(payload) = self.requests.pop_front() else {
            return false;
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
        true
    }

    /// The broker takes the oldest payload off the wire (and will acknowledge it).
    fn broker_receives(&mut self) -> Option<bytes::Bytes> {
        let (pkid, payload) = self.wire.pop_front()?;
        self.acks.push_back(pkid);
        Some(payload)
    }

    fn ack_arrives(&mut self) {
        if let Some(pkid) = self.acks.pop_front() {
            self.outgoing.retain(|(p, _)| *p != pkid);
            assert!(
                self.link.on_puback(pkid).is_some(),
                "an ack of an unknown id"
            );
        }
    }

    fn drop_connection(&mut self) {
        self.up = false;
        self.wire.clear();
        self.acks.clear();
        self.link.on_disconnected();
    }

    fn reconnect(&mut self, session_present: bool, now: Instant) {
        self.up = true;
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

    /// Nothing of this replica's left anywhere but at the broker.
    fn drained(&self) -> bool {
        let idle = self.requests.is_empty() && self.wire.is_empty() && self.acks.is_empty();
        idle && self.link.pending() == 0
    }
}

/// The broker's deliveries to the replicas, late (up to 30 ms), reordered, duplicated,
/// and lost and sent again (QoS 1): (delivery time, tie-break) → (replica, payload).
struct Fanout {
    queue: BTreeMap<(u64, u64), (usize, bytes::Bytes)>,
    ties: u64,
    replicas_n: usize,
    drop_pct: u64,
    dup_pct: u64,
}

impl Fanout {
    /// The broker received `payload` from replica `from` at `time`: to every other.
    fn forward(&mut self, from: usize, payload: &bytes::Bytes, time: u64, rng: &mut Rng) {
        for dest in (0..self.replicas_n).filter(|&d| d != from) {
            let copies = if rng.chance(self.dup_pct) { 2 } else { 1 };
            for _ in 0..copies {
                self.ties += 1;
                let at = time + rng.below(30_000);
                self.queue.insert((at, self.ties), (dest, payload.clone()));
            }
        }
    }

    /// The next delivery due by `time`: when, to which replica, what.
    fn due(&mut self, time: u64, rng: &mut Rng) -> Option<(u64, usize, bytes::Bytes)> {
        loop {
            let entry = self.queue.first_entry().filter(|e| e.key().0 <= time)?;
            let ((at, tie), (dest, payload)) = entry.remove_entry();
            if !rng.chance(self.drop_pct) {
                return Some((at, dest, payload));
            }
            let later = at + 1 + rng.below(50_000);
            self.queue.insert((later, tie), (dest, payload));
        }
    }
}

/// Every local write goes through each replica's production [`Link`] (batching, the
/// unconfirmed window, re-sending after a reconnect) to a simulated broker that forwards
/// what it receives to every other replica, late, reordered, duplicated, and lost and
/// sent again (QoS 1). Connections drop at random, and come back with or without their
/// session. Once every connection is back and everything is acknowledged and
/// delivered, every replica must equal the last-write-wins model.
fn run_link(seed: u64) {
    let mut rng = Rng(seed);
    let replicas_n = 2 + rng.below(4) as usize; // 2..=5
    let keys_n = 1 + rng.below(30);
    let ops_n = 200 + rng.below(800);
    let (drop_pct, dup_pct, outage_pct) = (rng.below(40), rng.below(30), 1 + rng.below(5));
    let settings = Settings {
        batch_events: 1 + rng.below(8) as usize,
        batch_delay: Duration::from_micros(rng.below(5_000)),
        // Never full here: every write is acknowledged, so every write must arrive.
        offline_events_max: 1 << 20,
        offline_bytes_max: 1 << 30,
    };
    let mut replicas: Vec<Replica> = (0..replicas_n).map(|i| replica(i, &mut rng)).collect();
    let mut conns: Vec<Connection> = replicas
        .iter()
        .map(|r| Connection {
            link: Link::new(settings, origin_of(&r.name), &r.name),
            up: false,
            requests: VecDeque::new(),
            wire: VecDeque::new(),
            acks: VecDeque::new(),
            outgoing: Vec::new(),
            pkid: 0,
        })
        .collect();
    let mut model = Model::new();
    let mut fanout = Fanout {
        queue: BTreeMap::new(),
        ties: 0,
        replicas_n,
        drop_pct,
        dup_pct,
    };
    let t0 = 1_700_000_000_000_000u64;
    let start = Instant::now();
    let instant = |time: u64| start + Duration::from_micros(time - t0);
    let (mut time, mut seq) = (t0, 0u64);

    for _ in 0..ops_n {
        time += rng.below(2_000);
        let now = instant(time);
        while let Some((at, dest, payload)) = fanout.due(time, &mut rng) {
            deliver(&mut replicas[dest], &payload, at);
        }
        for (w, c) in conns.iter_mut().enumerate() {
            if !c.up {
                if rng.chance(20) {
                    c.reconnect(rng.chance(50), now);
                }
                continue;
            }
            if rng.chance(outage_pct) {
                c.drop_connection();
                continue;
            }
            for _ in 0..rng.below(4) {
                match c.link.next(now) {
                    Next::Publish(payload) => c.publish(payload),
                    Next::PeersGone(_) => panic!("no peer was awaited"),
                    Next::WaitUntil(_) | Next::Idle => break,
                }
            }
            for _ in 0..rng.below(4) {
                c.rumqttc_sends();
            }
            for _ in 0..rng.below(4) {
                if let Some(payload) = c.broker_receives() {
                    fanout.forward(w, &payload, time, &mut rng);
                }
            }
            for _ in 0..rng.below(4) {
                c.ack_arrives();
            }
        }

        let w = rng.below(replicas_n as u64) as usize;
        let r = &mut replicas[w];
        r.enter(time);
        let journal = local_write(&mut rng, r, keys_n, seq, &mut model);
        seq += 1;
        if let Some(journal) = journal {
            let taken = conns[w].link.on_journal(journal, now);
            assert_eq!(
                taken,
                Taken::Queued,
                "the offline buffer is never full here"
            );
        }
    }
    // Every connection comes back for good; everything goes out, is acknowledged and
    // delivered (loss on the way to the replicas is not forever).
    for c in conns.iter_mut().filter(|c| !c.up) {
        c.reconnect(rng.chance(50), instant(time));
    }
    let mut rounds = 0;
    while !conns.iter().all(Connection::drained) {
        rounds += 1;
        assert!(rounds < 100_000, "the links do not drain");
        time += 10_000;
        let now = instant(time);
        for (w, c) in conns.iter_mut().enumerate() {
            while let Next::Publish(payload) = c.link.next(now) {
                c.publish(payload);
            }
            while c.rumqttc_sends() {}
            while let Some(payload) = c.broker_receives() {
                fanout.forward(w, &payload, time, &mut rng);
            }
            while !c.acks.is_empty() {
                c.ack_arrives();
            }
        }
    }
    while let Some(((at, _), (dest, payload))) = fanout.queue.pop_first() {
        deliver(&mut replicas[dest], &payload, at.max(time));
    }
    assert_matches_model(&mut replicas, &model, false);
}

/// The seeds to run: `MKV_SIM_SEED` alone, or `default`. A failure names its seed.
fn each_seed(
    default: std::ops::Range<u64>,
    what: &str,
    run: impl Fn(u64) + std::panic::RefUnwindSafe,
) {
    let seeds: Vec<u64> = match std::env::var("MKV_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("MKV_SIM_SEED must be a number")],
        Err(_) => default.collect(),
    };
    for seed in seeds {
        if std::panic::catch_unwind(|| run(seed)).is_err() {
            panic!("{what} failed for seed {seed}; rerun with MKV_SIM_SEED={seed}");
        }
    }
}

#[test]
fn replicas_converge_to_the_lww_model_under_loss_duplication_and_reordering() {
    each_seed(0..200, "simulation", |seed| run(seed, false));
}

#[test]
fn partitions_are_healed_by_anti_entropy() {
    each_seed(1000..1150, "partition simulation", |seed| run(seed, true));
}

#[test]
fn changes_through_the_link_reach_every_replica_across_acks_drops_and_reconnects() {
    each_seed(2000..2150, "link simulation", run_link);
}
