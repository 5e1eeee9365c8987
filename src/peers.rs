//! Presence: the retained `{topic_prefix}/nodes/{node_id}` records nodes publish about
//! themselves, and the live peer table built from them.
//!
//! A record is one line of text, so `mosquitto_sub` shows it as it is:
//! `online addr=127.0.0.1:7878 shards=2 version=0.1.0` (or `offline ...`, the last
//! will). The peer table is shared by the replication thread (which writes it) and
//! INFO and anti-entropy (which read it), hence a `DashMap`.

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
}

impl Presence {
    pub fn to_line(&self) -> String {
        format!(
            "{} addr={} shards={} version={}",
            if self.online { "online" } else { "offline" },
            self.addr,
            self.shards,
            self.version
        )
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
        for word in words {
            match word.split_once('=') {
                Some(("addr", a)) if !a.is_empty() => addr = Some(a.to_string()),
                Some(("shards", s)) => shards = s.parse().ok(),
                Some(("version", v)) => version = v.to_string(),
                _ => {}
            }
        }
        Ok(Presence {
            online,
            addr: addr.ok_or("record has no addr")?,
            shards: shards.ok_or("record has no valid shards")?,
            version,
        })
    }
}

/// What this node knows of one peer.
#[derive(Debug, Clone)]
pub struct Peer {
    pub presence: Presence,
    /// When it was last heard of: its last record, or when it was marked offline.
    pub updated: Instant,
}

/// Peers by node id, from their presence records.
#[derive(Default)]
pub struct Peers {
    table: DashMap<String, Peer>,
}

impl Peers {
    /// Record a peer's presence. False when the table is full of online peers and this
    /// one is new: it is not recorded (the caller counts and logs it).
    pub fn update(&self, node_id: &str, presence: Presence) -> bool {
        self.update_at(node_id, presence, Instant::now())
    }

    /// [`Peers::update`] at `now`. Bounded, since anyone who can publish on the broker
    /// can announce node ids: offline peers not seen for [`FORGET_AFTER`] are forgotten
    /// (an online one stays: its record stands until its last will says otherwise), and
    /// a newcomer to a full table takes the place of the offline peer seen longest ago.
    fn update_at(&self, node_id: &str, presence: Presence, now: Instant) -> bool {
        self.table.retain(|_, p| {
            p.presence.online || now.saturating_duration_since(p.updated) <= FORGET_AFTER
        });
        if self.table.len() >= PEERS_MAX && !self.table.contains_key(node_id) {
            let oldest_offline = self
                .table
                .iter()
                .filter(|p| !p.presence.online)
                .min_by_key(|p| p.updated)
                .map(|p| p.key().clone());
            match oldest_offline {
                Some(id) => self.table.remove(&id),
                None => return false,
            };
        }
        let peer = Peer {
            presence,
            updated: now,
        };
        self.table.insert(node_id.to_string(), peer);
        true
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
        };
        assert_eq!(Presence::parse(p.to_line().as_bytes()), Ok(p.clone()));
        let newer = format!("{} zone=eu-1", p.to_line());
        assert_eq!(Presence::parse(newer.as_bytes()), Ok(p));
    }

    #[test]
    fn bad_records_are_errors() {
        for bad in [
            &b""[..],
            b"maybe addr=x shards=1",
            b"online shards=1",
            b"online addr=x shards=many",
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
        }
    }

    #[test]
    fn offline_peers_not_seen_for_a_day_are_forgotten() {
        let peers = Peers::default();
        let t0 = Instant::now();
        let day = std::time::Duration::from_secs(86_400);
        peers.update_at("gone", record(false), t0);
        peers.update_at("left", record(true), t0);
        peers.mark_offline_at("left", t0 + day);
        peers.update_at("quiet", record(true), t0);
        // A day and a second later: "gone" was last seen over a day ago; "left" went
        // offline a second ago; "quiet" is online (its record stands until its will).
        peers.update_at(
            "new",
            record(true),
            t0 + day + std::time::Duration::from_secs(1),
        );
        let ids: Vec<_> = peers.snapshot().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec!["left", "new", "quiet"]);
    }

    #[test]
    fn the_table_is_capped() {
        let peers = Peers::default();
        let t0 = Instant::now();
        let at = |i: usize| t0 + std::time::Duration::from_secs(i as u64);
        for i in 0..PEERS_MAX {
            assert!(peers.update_at(&format!("online-{i}"), record(true), at(i)));
        }
        peers.mark_offline_at("online-7", at(PEERS_MAX));
        peers.mark_offline_at("online-3", at(PEERS_MAX + 1));
        // Full: a newcomer takes the place of the offline peer seen longest ago...
        assert!(peers.update_at("newcomer", record(true), at(PEERS_MAX + 2)));
        assert_eq!(peers.snapshot().len(), PEERS_MAX);
        assert!(peers.snapshot().iter().all(|(id, _)| id != "online-7"));
        // ...a known peer is always updated...
        assert!(peers.update_at("online-9", record(false), at(PEERS_MAX + 3)));
        // ...and with every peer online, a newcomer is refused.
        peers.update_at("online-3", record(true), at(PEERS_MAX + 4));
        peers.update_at("online-9", record(true), at(PEERS_MAX + 4));
        assert!(!peers.update_at("one-too-many", record(true), at(PEERS_MAX + 5)));
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
        };
        peers.update("b", rec(true));
        peers.update("a", rec(false));
        assert_eq!(peers.online(), vec!["b".to_string()]);
        peers.update("a", rec(true));
        let all: Vec<_> = peers.snapshot().into_iter().map(|(id, _)| id).collect();
        assert_eq!(all, vec!["a", "b"]);
    }
}
