//! The text of the INFO, STATS and HASH replies: the node-wide facts ([`NodeInfo`]),
//! gathered only when asked, and the shards' answers summed and rendered.

use crate::node::ops::line;
use crate::node::shared::Shared;
use crate::replication::stats::ReplSnapshot;
use crate::store::keyspace::shard_buckets;
use crate::store::merkle::{combine_roots, to_hex, Digest};
use crate::store::shard::ShardStats;
use crate::VERSION;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

/// Node-wide facts for INFO and STATS, gathered only when one of them is asked.
/// `Default` (all zero) serves tests, benches and fuzzing, which run without a node.
#[derive(Default)]
pub struct NodeInfo {
    pub node_id: String,
    pub uptime_seconds: u64,
    pub bind: String,
    pub connections_current: u64,
    pub connections_max: u64,
    pub connections_total: u64,
    pub connections_rejected: u64,
    pub protocol_errors: u64,
    /// 0 = unlimited.
    pub memory_limit_bytes: u64,
    pub peers_online: u64,
    pub clock_skew: crate::replication::peers::ClockSkew,
    pub replication: ReplSnapshot,
    /// One `sync_peer` INFO line per peer anti-entropy has run with.
    pub sync_peers: Vec<String>,
    pub loading: bool,
    /// What the bootstrap is doing, or how it ended.
    pub bootstrap: String,
}

impl NodeInfo {
    /// The facts of a running node, now.
    pub fn of(shared: &Shared) -> NodeInfo {
        let net = &shared.config.network;
        NodeInfo {
            node_id: shared.config.node_id.clone(),
            uptime_seconds: shared.started.elapsed().as_secs(),
            bind: shared.local_addr.to_string(),
            connections_current: shared.connections.load(Relaxed) as u64,
            connections_max: net.max_connections as u64,
            connections_total: shared.connections_total.load(Relaxed),
            connections_rejected: shared.connections_rejected.load(Relaxed),
            protocol_errors: shared.protocol_errors.load(Relaxed),
            memory_limit_bytes: shared
                .config
                .storage
                .memory_limit_mb
                .saturating_mul(1 << 20),
            peers_online: shared.peers.online().len() as u64,
            clock_skew: shared
                .peers
                .clock_skew(shared.config.mqtt.max_clock_skew_ms),
            replication: shared
                .outbound
                .as_ref()
                .map(|o| o.stats.snapshot())
                .unwrap_or_default(),
            sync_peers: shared.sync_log.info_values(std::time::Instant::now()),
            loading: shared.readiness.is_loading(),
            bootstrap: shared.readiness.progress(),
        }
    }
}

/// `HASH`: the node's root, the shard roots (in shard order) combined.
pub fn write_hash(out: &mut Vec<u8>, roots: &[Digest]) {
    line(out, &to_hex(&combine_roots(roots)));
}

/// `HASH SHARDS`: each shard's bucket range and root.
pub fn write_hash_shards(out: &mut Vec<u8>, roots: &[Digest], shard_bits: u32) {
    line(out, &format!("SHARDS {}", roots.len()));
    for (s, root) in roots.iter().enumerate() {
        let r = shard_buckets(s, shard_bits);
        line(
            out,
            &format!("{s} {} {} {}", r.start, r.end - 1, to_hex(root)),
        );
    }
}

/// `INFO`: the node's facts and the shards' statistics summed (`s`) over `shards`.
pub fn write_info(out: &mut Vec<u8>, i: NodeInfo, s: &ShardStats, shards: u32) {
    let fields = [
        ("version", VERSION.to_string()),
        ("node_id", i.node_id),
        ("uptime_seconds", i.uptime_seconds.to_string()),
        ("bind", i.bind),
        ("shards", shards.to_string()),
        ("keys", s.keys.to_string()),
        ("memory_used_bytes", s.bytes_used.to_string()),
        ("memory_limit_bytes", i.memory_limit_bytes.to_string()),
        ("connected_clients", i.connections_current.to_string()),
        ("max_connections", i.connections_max.to_string()),
        ("replication", i.replication.state().to_string()),
        ("peers_online", i.peers_online.to_string()),
        ("loading", u8::from(i.loading).to_string()),
        ("bootstrap", i.bootstrap),
        ("clock_skew_peers", i.clock_skew.peers.to_string()),
        ("clock_skew_max_ms", i.clock_skew.max_ms.to_string()),
    ];
    let peers = i.sync_peers.into_iter().map(|v| ("sync_peer", v));
    let fields: Vec<_> = fields.into_iter().chain(peers).collect();
    write_fields(out, "INFO", &fields);
}

/// `STATS`: the node's counters and the shards' statistics summed (`s`).
pub fn write_stats(out: &mut Vec<u8>, i: NodeInfo, s: &ShardStats) {
    let fields = [
        ("connections_current", i.connections_current),
        ("connections_total", i.connections_total),
        ("connections_rejected", i.connections_rejected),
        ("protocol_errors", i.protocol_errors),
        ("get_commands", s.gets),
        ("get_hits", s.get_hits),
        ("get_misses", s.gets - s.get_hits),
        ("write_commands", s.writes),
        ("del_commands", s.dels),
        ("storage_full_errors", s.storage_full),
        ("keys", s.keys),
        ("tombstones", s.tombstones),
        ("memory_used_bytes", s.bytes_used),
    ];
    let repl = ReplSnapshot::NAMES.iter().zip(i.replication.counters);
    // Counted by the shards: versions refused by replication or anti-entropy.
    let future = ("repl_rejected_future", s.rejected_future);
    let fields: Vec<_> = fields
        .into_iter()
        .chain(repl.map(|(k, v)| (*k, v)))
        .chain([future])
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    write_fields(out, "STATS", &fields);
}

/// `NAME <n>` then n lines of `field:value`.
fn write_fields(out: &mut Vec<u8>, name: &str, fields: &[(&str, String)]) {
    line(out, &format!("{name} {}", fields.len()));
    let mut s = String::new();
    for (k, v) in fields {
        s.clear();
        let _ = write!(s, "{k}:{v}");
        line(out, &s);
    }
}
