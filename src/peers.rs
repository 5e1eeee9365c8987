//! Presence: the retained `{topic_prefix}/nodes/{node_id}` records nodes publish about
//! themselves, and the live peer table built from them.
//!
//! A record is one line of text, so `mosquitto_sub` shows it as it is:
//! `online addr=127.0.0.1:7878 shards=2 version=0.1.0` (or `offline ...`, the last
//! will). The peer table is shared by the replication thread (which writes it) and
//! INFO and anti-entropy (which read it), hence a `DashMap`.

use dashmap::DashMap;
use std::time::Instant;

/// Longest presence record accepted.
pub const RECORD_BYTES_MAX: usize = 512;

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
    pub updated: Instant,
}

/// Peers by node id, from their presence records.
#[derive(Default)]
pub struct Peers {
    table: DashMap<String, Peer>,
}

impl Peers {
    pub fn update(&self, node_id: &str, presence: Presence) {
        let peer = Peer {
            presence,
            updated: Instant::now(),
        };
        self.table.insert(node_id.to_string(), peer);
    }

    /// Mark a peer offline (it stopped announcing itself).
    pub fn mark_offline(&self, node_id: &str) {
        if let Some(mut p) = self.table.get_mut(node_id) {
            p.presence.online = false;
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
