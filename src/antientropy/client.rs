//! Anti-entropy over the network (I/O edge): the blocking client that carries the
//! messages ([`crate::antientropy::messages`]) to a peer's client port (`SYNC.MSG` /
//! `SYNC.REPLY`), every read and write bounded by the exchange's deadline; one exchange
//! between this node's shards and a peer ([`run_exchange`]); the one place a peer is
//! admitted; and the pace a `SYNC.MSG` body must keep.
//!
//! An exchange runs on a thread of its own and reaches the peer over TCP and this node's
//! shards through their inboxes, so no shard thread ever waits on the network.

use crate::antientropy::exchange::{exchange, Report};
use crate::antientropy::messages::{Peer, SyncError};
use crate::node::inbox::ThreadMsg;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a whole exchange may take.
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(600);
/// Longest reply accepted (the server's own message limit).
const REPLY_BYTES_MAX: usize = crate::limits::SYNC_MSG_BYTES_MAX as usize;

/// A node reached over its client port. Counts the bytes it moves, framing included.
pub struct TcpPeer {
    addr: String,
    reader: BufReader<Deadlined>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// A stream whose every read and write ends by `deadline`: a peer that trickles its
/// reply a byte at a time (each read quick, the whole reply not) cannot hold an
/// exchange, and its `max_concurrent_syncs` slot, past the exchange's deadline.
struct Deadlined {
    stream: TcpStream,
    deadline: Instant,
}

impl Deadlined {
    /// Time left for the next read or write: at most [`REPLY_TIMEOUT`], never past the
    /// deadline.
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out());
        }
        Ok(left.min(REPLY_TIMEOUT))
    }

    /// Why a read or write timed out (the OS says only "resource temporarily
    /// unavailable"); other errors pass as they are.
    fn explain(&self, e: std::io::Error) -> std::io::Error {
        use std::io::ErrorKind::{TimedOut, WouldBlock};
        if matches!(e.kind(), TimedOut | WouldBlock) {
            self.timed_out()
        } else {
            e
        }
    }

    fn timed_out(&self) -> std::io::Error {
        let why = if Instant::now() >= self.deadline {
            "exchange took too long".to_string()
        } else {
            format!("no progress for {} s", REPLY_TIMEOUT.as_secs())
        };
        std::io::Error::new(std::io::ErrorKind::TimedOut, why)
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        self.stream.read(buf).map_err(|e| self.explain(e))
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        self.stream.write(buf).map_err(|e| self.explain(e))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

impl TcpPeer {
    /// Connect to `addr`; everything this peer does must be over by `deadline`.
    pub fn connect(addr: &str, deadline: Instant) -> Result<TcpPeer, SyncError> {
        let err = |e: std::io::Error| SyncError::Transport(format!("{addr}: {e}"));
        let target: SocketAddr = addr
            .to_socket_addrs()
            .map_err(err)?
            .next()
            .ok_or_else(|| SyncError::Transport(format!("{addr}: no address")))?;
        let stream = Deadlined {
            stream: TcpStream::connect_timeout(&target, CONNECT_TIMEOUT).map_err(err)?,
            deadline,
        };
        stream.stream.set_nodelay(true).map_err(err)?;
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
        // The reply header is short; a peer that never ends it must not grow memory.
        let mut line = String::new();
        (&mut self.reader)
            .take(64)
            .read_line(&mut line)
            .map_err(err)?;
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

/// One exchange between this node, whose shards are reached through their inboxes
/// `shards`, and `peer`. The node does not call itself over TCP: that would take one of
/// its own client slots, and a shutting-down node has closed its port while its shards
/// still run (the shutdown hand-off). Blocking: run it on a thread of its own. The
/// report's bytes are the peer connection's, framing included.
pub fn run_exchange(
    shards: Vec<tokio::sync::mpsc::Sender<ThreadMsg>>,
    peer: &str,
) -> Result<(Report, Duration), SyncError> {
    admit_peer(peer).map_err(SyncError::Transport)?;
    let started = Instant::now();
    let mut mine = LocalShards(shards);
    let mut theirs = TcpPeer::connect(peer, started + EXCHANGE_DEADLINE)?;
    let mut report = exchange(&mut mine, &mut theirs)?;
    report.bytes_sent = theirs.bytes_sent;
    report.bytes_received = theirs.bytes_received;
    Ok((report, started.elapsed()))
}

/// This node's shards as an exchange [`Peer`]: each request goes to every shard's inbox,
/// as a `SYNC.MSG` on the client port would, and the parts are assembled the same way.
struct LocalShards(Vec<tokio::sync::mpsc::Sender<ThreadMsg>>);

impl Peer for LocalShards {
    fn call(&mut self, request: &[u8]) -> Result<Vec<u8>, SyncError> {
        let stopped = || SyncError::Transport("this node's shards have stopped".into());
        let request = std::sync::Arc::new(crate::antientropy::messages::parse(request)?);
        let mut waiting = Vec::with_capacity(self.0.len());
        for inbox in &self.0 {
            let (reply, rx) = tokio::sync::oneshot::channel();
            let msg = ThreadMsg::Sync {
                request: request.clone(),
                reply,
            };
            inbox.blocking_send(msg).map_err(|_| stopped())?;
            waiting.push(rx);
        }
        let parts = waiting
            .into_iter()
            .map(|rx| rx.blocking_recv().map_err(|_| stopped()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(crate::antientropy::serve::assemble(&request, parts))
    }
}

/// Slowest a `SYNC.MSG` body may arrive once the connection timeout has passed: a
/// sender that trickles (or stalls) would otherwise hold its connection, and its share
/// of the node's message memory, for ever.
pub const BODY_BYTES_PER_S_MIN: u64 = 64 << 10;

/// How long a `SYNC.MSG` body that has brought `received` bytes in `elapsed` may wait
/// for more; `None`: cut the sender now. A body may take `timeout_s` (the connection
/// timeout, 0 = none) whatever its pace; after that it must have come at
/// [`BODY_BYTES_PER_S_MIN`] since its first second. No single wait is longer than
/// `timeout_s`, so a sender that stops is cut after it, as an idle client is.
pub fn body_wait(received: usize, elapsed: Duration, timeout_s: u64) -> Option<Duration> {
    let timeout = Duration::from_secs(timeout_s);
    let by_rate = Duration::from_millis(1000 + received as u64 * 1000 / BODY_BYTES_PER_S_MIN);
    let left = by_rate.max(timeout).checked_sub(elapsed)?;
    let wait = if timeout_s == 0 {
        left
    } else {
        left.min(timeout)
    };
    (!wait.is_zero()).then_some(wait)
}

/// The one place a peer is admitted to an exchange, both ways: every exchange this node
/// starts (`SYNC`, the periodic loop) checks the peer it dials, and every `SYNC.MSG` it
/// serves checks the connection's address ([`admit_incoming`]). Every well-formed
/// `host:port` is admitted today; the security issue adds authentication here.
pub fn admit_peer(peer: &str) -> Result<(), String> {
    match crate::config::host_port(peer) {
        Ok((host, _)) => {
            if host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_unspecified())
            {
                return Err(format!("{peer} is not an address a peer can be reached on"));
            }
            Ok(())
        }
        Err(_) => Err(format!("SYNC needs host:port, found {peer:?}")),
    }
}

/// Whether a connection from `from` may send anti-entropy messages (see [`admit_peer`]).
pub fn admit_incoming(from: Option<SocketAddr>) -> Result<(), String> {
    let _ = from; // every connection, until authentication arrives
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_trickling_its_reply_cannot_hold_the_exchange_past_its_deadline() {
        // A fake peer: reads the request, announces a 40-byte reply, then sends one byte
        // every 100 ms (4 s) — each read is quick, the reply as a whole is not.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.read(&mut [0u8; 64]);
            let _ = s.write_all(b"SYNC.REPLY 40\r\n");
            for _ in 0..40 {
                if s.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut peer = TcpPeer::connect(&addr, deadline).unwrap();
        let r = peer.call(&[1]);
        assert!(
            matches!(&r, Err(SyncError::Transport(e)) if e.contains("took too long")),
            "{r:?}"
        );
        // One that says nothing at all is cut at the deadline too, and says so.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_millis(300);
        let r = TcpPeer::connect(&addr, deadline).unwrap().call(&[1]);
        assert!(
            matches!(&r, Err(SyncError::Transport(e)) if e.contains("took too long")),
            "{r:?}"
        );
    }

    #[test]
    fn a_sync_msg_body_must_come_within_the_timeout_or_at_the_minimum_rate() {
        let s = Duration::from_secs;
        let rate = BODY_BYTES_PER_S_MIN as usize;
        // Any pace within the connection timeout; each wait is at most the timeout.
        assert_eq!(body_wait(0, s(0), 30), Some(s(30)));
        assert_eq!(body_wait(10, s(29), 30), Some(s(1)));
        // A trickle is cut once the timeout has passed...
        assert_eq!(body_wait(10, s(30), 30), None);
        assert_eq!(body_wait(10 * rate, s(31), 30), None);
        // ...a sender keeping the minimum rate goes on...
        assert_eq!(body_wait(40 * rate, s(35), 30), Some(s(6)));
        // ...and one that stops after a fast start is cut after the timeout, not later.
        assert_eq!(body_wait(1000 * rate, s(2), 30), Some(s(30)));
        // Without a connection timeout only the rate counts.
        assert_eq!(
            body_wait(0, Duration::from_millis(400), 0),
            Some(Duration::from_millis(600))
        );
        assert_eq!(body_wait(rate, s(2), 0), None);
        assert_eq!(body_wait(2 * rate, s(2), 0), Some(s(1)));
    }

    #[test]
    fn peers_are_admitted_by_address() {
        assert!(admit_peer("10.0.0.2:7878").is_ok());
        assert!(admit_peer("node-2.internal:7878").is_ok());
        assert!(admit_peer("0.0.0.0:7878").is_err());
        assert!(admit_peer("[::]:7878").is_err());
        assert!(admit_peer("nonsense").is_err());
        assert!(admit_peer("host:0").is_err());
    }
}
