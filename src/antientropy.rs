//! Anti-entropy over the network (I/O edge): the blocking client that carries
//! [`crate::sync`] messages to a node's client port (`SYNC.MSG` / `SYNC.REPLY`), one
//! exchange between this node and a peer, and the per-peer results INFO shows.
//!
//! An exchange runs on a thread of its own and talks to both nodes over TCP — to the
//! peer, and to this node's own port — so it uses exactly the path a peer uses, and no
//! shard thread ever waits on the network.

use crate::sync::{exchange, Peer, Report, SyncError};
use dashmap::DashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest reply accepted (the server's own message limit).
const REPLY_BYTES_MAX: usize = crate::protocol::SYNC_MSG_BYTES_MAX as usize;

/// A node reached over its client port. Counts the bytes it moves, framing included.
pub struct TcpPeer {
    addr: String,
    reader: BufReader<TcpStream>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl TcpPeer {
    pub fn connect(addr: &str) -> Result<TcpPeer, SyncError> {
        let err = |e: std::io::Error| SyncError::Transport(format!("{addr}: {e}"));
        let target: SocketAddr = addr
            .to_socket_addrs()
            .map_err(err)?
            .next()
            .ok_or_else(|| SyncError::Transport(format!("{addr}: no address")))?;
        let stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT).map_err(err)?;
        stream.set_nodelay(true).map_err(err)?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(err)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(err)?;
        Ok(TcpPeer {
            addr: addr.to_string(),
            reader: BufReader::with_capacity(64 * 1024, stream),
            bytes_sent: 0,
            bytes_received: 0,
        })
    }
}

impl Peer for TcpPeer {
    fn call(&mut self, request: &[u8]) -> Result<Vec<u8>, SyncError> {
        let err = |e: std::io::Error| SyncError::Transport(format!("{}: {e}", self.addr));
        let header = format!("SYNC.MSG {}\r\n", request.len());
        let stream = self.reader.get_mut();
        stream.write_all(header.as_bytes()).map_err(err)?;
        stream.write_all(request).map_err(err)?;
        self.bytes_sent += (header.len() + request.len()) as u64;
        let mut line = String::new();
        self.reader.read_line(&mut line).map_err(err)?;
        self.bytes_received += line.len() as u64;
        let line = line.trim_end();
        let n = match line.strip_prefix("SYNC.REPLY ") {
            Some(n) => n.parse::<usize>().ok().filter(|&n| n <= REPLY_BYTES_MAX),
            None => {
                return Err(SyncError::Transport(format!("{}: {line:?}", self.addr)));
            }
        }
        .ok_or_else(|| SyncError::Transport(format!("{}: bad reply header {line:?}", self.addr)))?;
        let mut reply = vec![0; n];
        self.reader.read_exact(&mut reply).map_err(err)?;
        self.bytes_received += n as u64;
        Ok(reply)
    }
}

/// One exchange between the node at `local` (this one) and `peer`. The report's bytes
/// are the peer connection's, framing included.
pub fn run_exchange(local: &str, peer: &str) -> Result<(Report, Duration), SyncError> {
    let started = Instant::now();
    let mut mine = TcpPeer::connect(local)?;
    let mut theirs = TcpPeer::connect(peer)?;
    let mut report = exchange(&mut mine, &mut theirs)?;
    report.bytes_sent = theirs.bytes_sent;
    report.bytes_received = theirs.bytes_received;
    Ok((report, started.elapsed()))
}

/// The `SYNC` reply line.
pub fn report_line(r: &Report, took: Duration) -> String {
    format!(
        "OK keys_repaired={} bytes_sent={} bytes_received={} round_trips={} ms={} entries_sent={} entries_received={} buckets_compared={}",
        r.keys_repaired,
        r.bytes_sent,
        r.bytes_received,
        r.round_trips,
        took.as_millis(),
        r.entries_sent,
        r.entries_received,
        r.buckets_compared
    )
}

/// An exchange's outcome: the report and how long it took, or why it failed.
pub type Outcome = Result<(Report, Duration), String>;

/// The last exchange with each peer, for INFO.
#[derive(Default)]
pub struct SyncLog {
    last: DashMap<String, (Instant, Outcome)>,
}

impl SyncLog {
    pub fn record(&self, peer: &str, result: Outcome) {
        self.last.insert(peer.to_string(), (Instant::now(), result));
    }

    /// One INFO `sync_peer` value per peer, sorted: the address, how long ago, and the
    /// result line (or the error).
    pub fn info_values(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .last
            .iter()
            .map(|e| {
                let (at, result) = e.value();
                let ago = at.elapsed().as_secs();
                match result {
                    Ok((r, took)) => format!("{} {ago}s_ago {}", e.key(), report_line(r, *took)),
                    Err(err) => format!("{} {ago}s_ago ERROR {err}", e.key()),
                }
            })
            .collect();
        all.sort();
        all
    }
}

/// The one place a peer is admitted to an exchange. Every well-formed `host:port` is,
/// today; the security issue adds authentication here.
pub fn admit_peer(peer: &str) -> Result<(), String> {
    match peer.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => Err(format!("SYNC needs host:port, found {peer:?}")),
    }
}

/// How this node reaches itself: its bound address, or loopback when bound to all.
pub fn self_address(bound: SocketAddr) -> String {
    if bound.ip().is_unspecified() {
        let ip = if bound.is_ipv4() {
            "127.0.0.1"
        } else {
            "[::1]"
        };
        format!("{ip}:{}", bound.port())
    } else {
        bound.to_string()
    }
}
