//! Presence: the retained `{topic_prefix}/nodes/{node_id}` records nodes publish about
//! themselves, and the live peer table built from them.
//!
//! A record is one line of text, so `mosquitto_sub` shows it as it is:
//! `online addr=127.0.0.1:7878 shards=2 version=0.1.0 clock_ms=1764170000123` (or
//! `offline ...`, the last will). The peer table is shared by the replication thread
//! (which writes it) and INFO and anti-entropy (which read it), hence a `DashMap`.
//! It also keeps how far each peer's wall clock is from ours, measured from its live
//! records ([`clock_offset_ms`]).

use dashmap::DashMap;
use std::time::{Duration, Instant};

/// Longest presence record accepted.
pub const RECORD_BYTES_MAX: usize = 512;
/// Most peers the table holds.
pub const PEERS_MAX: usize = 1024;
/// How long an offline peer is remembered after it was last heard of.
pub const FORGET_AFTER: Duration = Duration::from_secs(86_400);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub online: bool,
    /// The node's client address, `host:port`: what peers and anti-entropy dial.
    pub addr: String,
    pub shards: u32,
    pub version: String,
    /// The sender's wall clock when it published the record, Unix milliseconds; absent
    /// from last wills and from nodes older than this field.
    pub clock_ms: Option<u64>,
}

impl Presence {
    pub fn to_line(&self) -> String {
        let mut line = format!(
            "{} addr={} shards={} version={}",
            if self.online { "online" } else { "offline" },
            self.addr,
            self.shards,
            self.version
        );
        if let Some(c) = self.clock_ms {
            line.push_str(&format!(" clock_ms={c}"));
        }
        line
    }

    /// Parse a record; unknown `key=value` fields are ignored (newer nodes may add some).
    pub fn parse(bytes: &[u8]) -> Result<Presence, String> {
        if bytes.len() > RECORD_BYTES_MAX {
            return Err(format!("record of {} bytes is too long", bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| "record is not UTF-8".to_string())?;
        let mut words = text.split_ascii_whitespace();
        let online = match words.next() {
            Some("online") => true,
            Some("offline") => false,
            other => return Err(format!("expected online or offline, found {other:?}")),
        };
        let (mut addr, mut shards, mut version) = (None, None, String::new());
        let mut clock_ms = None;
        for word in words {
            match word.split_once('=') {
                Some(("addr", a)) if !a.is_empty() => addr = Some(a.to_string()),
                Some(("shards", s)) => shards = s.parse().ok(),
                Some(("version", v)) => version = v.to_string(),
                Some(("clock_ms", c)) => {
                    clock_ms = Some(c.parse().map_err(|_| "record has a bad clock_ms")?)
                }
                _ => {}
            }
        }
        Ok(Presence {
            online,
            addr: addr.ok_or("record has no addr")?,
            shards: shards.ok_or("record has no valid shards")?,
            version,
            clock_ms,
        })
    }
}

/// How far a peer's clock is ahead of ours (negative: behind), in milliseconds, from
/// a record that just arrived at `now_ms`; `None` when the record cannot tell. Only a
/// live record can: a retained one (`retained`, the broker's copy) is as old as its
/// last publication, and a last will carries no clock. The broker's delay makes a
/// peer look that much behind.
pub fn clock_offset_ms(p: &Presence, retained: bool, now_ms: u64) -> Option<i64> {
    let clock = p.clock_ms.filter(|_| p.online && !retained)?;
    Some(clock as i64 - now_ms as i64)
}

/// What this node knows of one peer.
#[derive(Debug, Clone)]
pub struct Peer {
    pub presence: Presence,
    /// When it was last heard of: its last record, or when it was marked offline.
    pub updated: Instant,
    /// Its clock's offset from ours, from its latest live record.
    pub clock_offset_ms: Option<i64>,
}

/// The online peers whose clocks are off: how many by more than the bound, and the
/// largest offset (either way) among all that were measured.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClockSkew {
    pub peers: u64,
    pub max_ms: u64,
}

/// What [`Peers::update`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A new peer, or a record that says something new besides its clock (worth a log
    /// line).
    News,
    /// The same as before but for its clock (a heartbeat).
    Same,
    /// The table is full of online peers and this one is new: not recorded (the caller
    /// counts and logs it).
    Refused,
}

/// Peers by node id, from their presence records.
#[derive(Default)]
pub struct Peers {
    table: DashMap<String, Peer>,
}

impl Peers {
    /// Record a peer's latest presence. `clock_offset_ms` is what this record measured
    /// (`None` keeps the last measurement).
    pub fn update(
        &self,
        node_id: &str,
        presence: Presence,
        clock_offset_ms: Option<i64>,
    ) -> Recorded {
        self.update_at(node_id, presence, clock_offset_ms, Instant::now())
    }

    /// [`Peers::update`] at `now`. Bounded, since anyone who can publish on the broker
    /// can announce node ids: peers not heard from for [`FORGET_AFTER`] are forgotten (a
    /// live node republishes its record every 30 s, so an online record that old is a
    /// ghost), and a newcomer to a full table takes the place of the offline peer seen
    /// longest ago.
    fn update_at(
        &self,
        node_id: &str,
        presence: Presence,
        clock_offset_ms: Option<i64>,
        now: Instant,
    ) -> Recorded {
        self.table
            .retain(|_, p| now.saturating_duration_since(p.updated) <= FORGET_AFTER);
        if let Some(mut peer) = self.table.get_mut(node_id) {
            let same = Presence {
                clock_ms: peer.presence.clock_ms,
                ..presence.clone()
            } == peer.presence;
            peer.clock_offset_ms = clock_offset_ms.or(peer.clock_offset_ms);
            peer.presence = presence;
            peer.updated = now;
            return if same { Recorded::Same } else { Recorded::News };
        }
        if self.table.len() >= PEERS_MAX {
            let oldest_offline = self
                .table
                .iter()
                .filter(|p| !p.presence.online)
                .min_by_key(|p| p.updated)
                .map(|p| p.key().clone());
            match oldest_offline {
                Some(id) => self.table.remove(&id),
                None => return Recorded::Refused,
            };
        }
        let peer = Peer {
            presence,
            updated: now,
            clock_offset_ms,
        };
        self.table.insert(node_id.to_string(), peer);
        Recorded::News
    }

    /// Mark a peer offline (it stopped announcing itself).
    pub fn mark_offline(&self, node_id: &str) {
        self.mark_offline_at(node_id, Instant::now())
    }

    fn mark_offline_at(&self, node_id: &str, now: Instant) {
        if let Some(mut p) = self.table.get_mut(node_id) {
            p.presence.online = false;
            p.updated = now;
        }
    }

    /// Node ids of the peers currently online.
    pub fn online(&self) -> Vec<String> {
        let live = self.table.iter().filter(|p| p.presence.online);
        live.map(|p| p.key().clone()).collect()
    }

    /// The client addresses of the peers currently online: whom anti-entropy can dial.
    pub fn online_addrs(&self) -> Vec<String> {
        let live = self.table.iter().filter(|p| p.presence.online);
        live.map(|p| p.presence.addr.clone()).collect()
    }

    /// Clock skew among the online peers, against a bound of `bound_ms`.
    pub fn clock_skew(&self, bound_ms: u64) -> ClockSkew {
        let live = self.table.iter().filter(|p| p.presence.online);
        let offsets = live.filter_map(|p| p.clock_offset_ms.map(i64::unsigned_abs));
        offsets.fold(ClockSkew::default(), |s, off| ClockSkew {
            peers: s.peers + u64::from(off > bound_ms),
            max_ms: s.max_ms.max(off),
        })
    }

    /// Every known peer, sorted by node id.
    pub fn snapshot(&self) -> Vec<(String, Peer)> {
        let mut all: Vec<_> = self
            .table
            .iter()
            .map(|p| (p.key().clone(), p.value().clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_tolerate_new_fields() {
        let p = Presence {
            online: true,
            addr: "127.0.0.1:7878".into(),
            shards: 2,
            version: "0.1.0".into(),
            clock_ms: Some(1_764_170_000_123),
        };
        assert_eq!(
            p.to_line(),
            "online addr=127.0.0.1:7878 shards=2 version=0.1.0 clock_ms=1764170000123"
        );
        assert_eq!(Presence::parse(p.to_line().as_bytes()), Ok(p.clone()));
        let newer = format!("{} zone=eu-1", p.to_line());
        assert_eq!(Presence::parse(newer.as_bytes()), Ok(p.clone()));
        // A record of a node from before clock_ms: the same, without a clock.
        let older = Presence {
            clock_ms: None,
            ..p
        };
        let line = "online addr=127.0.0.1:7878 shards=2 version=0.1.0";
        assert_eq!(older.to_line(), line);
        assert_eq!(Presence::parse(line.as_bytes()), Ok(older));
    }

    #[test]
    fn only_live_online_records_measure_a_clock() {
        let p = Presence {
            online: true,
            addr: "h:1".into(),
            shards: 1,
            version: String::new(),
            clock_ms: Some(10_000),
        };
        assert_eq!(clock_offset_ms(&p, false, 9_000), Some(1000));
        assert_eq!(clock_offset_ms(&p, false, 12_500), Some(-2500));
        assert_eq!(clock_offset_ms(&p, true, 9_000), None, "retained");
        let will = Presence {
            online: false,
            ..p.clone()
        };
        assert_eq!(clock_offset_ms(&will, false, 9_000), None, "offline");
        let old = Presence {
            clock_ms: None,
            ..p
        };
        assert_eq!(clock_offset_ms(&old, false, 9_000), None, "no clock");
    }

    #[test]
    fn skew_counts_online_peers_past_the_bound_and_keeps_the_last_measurement() {
        let peers = Peers::default();
        let rec = |online, clock_ms| Presence {
            online,
            addr: "h:1".into(),
            shards: 1,
            version: String::new(),
            clock_ms,
        };
        assert_eq!(
            peers.update("a", rec(true, Some(1)), Some(-1500)),
            Recorded::News
        );
        assert_eq!(
            peers.update("b", rec(true, Some(1)), Some(300)),
            Recorded::News
        );
        assert_eq!(
            peers.update("c", rec(false, None), Some(9000)),
            Recorded::News
        );
        assert_eq!(
            peers.clock_skew(1000),
            ClockSkew {
                peers: 1,
                max_ms: 1500
            },
            "c is offline: not counted"
        );
        // A retained record of b (no measurement) keeps b's offset and is no news.
        assert_eq!(peers.update("b", rec(true, Some(2)), None), Recorded::Same);
        assert_eq!(
            peers.update("a", rec(true, Some(3)), Some(20)),
            Recorded::Same,
            "a heartbeat with a new clock alone is no news"
        );
        assert_eq!(
            peers.clock_skew(1000),
            ClockSkew {
                peers: 0,
                max_ms: 300
            }
        );
        assert_eq!(
            peers.update("b", rec(false, None), None),
            Recorded::News,
            "b went offline"
        );
    }

    #[test]
    fn bad_records_are_errors() {
        for bad in [
            &b""[..],
            b"maybe addr=x shards=1",
            b"online shards=1",
            b"online addr=x shards=many",
            b"online addr=x shards=1 clock_ms=soon",
            b"\xff\xfe",
        ] {
            assert!(Presence::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Presence::parse(&[b'a'; RECORD_BYTES_MAX + 1]).is_err());
    }

    fn record(online: bool) -> Presence {
        Presence {
            online,
            addr: "h:1".into(),
            shards: 1,
            version: String::new(),
            clock_ms: None,
        }
    }

    #[test]
    fn peers_not_heard_from_for_a_day_are_forgotten() {
        let peers = Peers::default();
        let t0 = Instant::now();
        let day = std::time::Duration::from_secs(86_400);
        peers.update_at("gone", record(false), None, t0);
        peers.update_at("left", record(true), None, t0);
        peers.mark_offline_at("left", t0 + day);
        peers.update_at("quiet", record(true), None, t0);
        peers.update_at("alive", record(true), None, t0 + day);
        // A day and a second later: "gone" was last seen over a day ago; "left" went
        // offline a second ago; "quiet" still says online but has not republished its
        // record for a day (a live node does every 30 s): a ghost; "alive" has.
        peers.update_at(
            "new",
            record(true),
            None,
            t0 + day + std::time::Duration::from_secs(1),
        );
        let ids: Vec<_> = peers.snapshot().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec!["alive", "left", "new"]);
    }

    #[test]
    fn the_table_is_capped() {
        let peers = Peers::default();
        let t0 = Instant::now();
        let at = |i: usize| t0 + std::time::Duration::from_secs(i as u64);
        for i in 0..PEERS_MAX {
            assert_eq!(
                peers.update_at(&format!("online-{i}"), record(true), None, at(i)),
                Recorded::News
            );
        }
        peers.mark_offline_at("online-7", at(PEERS_MAX));
        peers.mark_offline_at("online-3", at(PEERS_MAX + 1));
        // Full: a newcomer takes the place of the offline peer seen longest ago...
        assert_eq!(
            peers.update_at("newcomer", record(true), None, at(PEERS_MAX + 2)),
            Recorded::News
        );
        assert_eq!(peers.snapshot().len(), PEERS_MAX);
        assert!(peers.snapshot().iter().all(|(id, _)| id != "online-7"));
        // ...a known peer is always updated...
        assert_eq!(
            peers.update_at("online-9", record(false), None, at(PEERS_MAX + 3)),
            Recorded::News
        );
        // ...and with every peer online, a newcomer is refused.
        peers.update_at("online-3", record(true), None, at(PEERS_MAX + 4));
        peers.update_at("online-9", record(true), None, at(PEERS_MAX + 4));
        assert_eq!(
            peers.update_at("one-too-many", record(true), None, at(PEERS_MAX + 5)),
            Recorded::Refused
        );
        assert_eq!(peers.snapshot().len(), PEERS_MAX);
    }

    #[test]
    fn the_table_lists_online_peers() {
        let peers = Peers::default();
        let rec = |online| Presence {
            online,
            addr: "h:1".into(),
            shards: 1,
            version: String::new(),
            clock_ms: None,
        };
        peers.update("b", rec(true), None);
        peers.update("a", rec(false), None);
        assert_eq!(peers.online(), vec!["b".to_string()]);
        peers.update("a", rec(true), None);
        let all: Vec<_> = peers.snapshot().into_iter().map(|(id, _)| id).collect();
        assert_eq!(all, vec!["a", "b"]);
    }
}
