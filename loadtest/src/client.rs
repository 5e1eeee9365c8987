//! The client threads: each owns a set of connections in one mio event loop,
//! keeps requests in flight on them, and checks every reply.
//!
//! Hot-path invariant: after connection setup nothing here allocates per
//! request. Requests are encoded into a reused write buffer, replies are
//! parsed in place in a fixed read buffer, the key and expected value are
//! written into reused scratch buffers, and the in-flight queue is a
//! `VecDeque` sized up front.

use crate::keyspace::{Chooser, Keyspace, Owned, Rng};
use crate::options::{Options, Protocol};
use crate::protocol::{self, Check, ErrorKind, Expect, Fault, Op, Presence};
use crate::stats::ThreadStats;
use crate::Error;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::collections::VecDeque;
use std::io::{ErrorKind as IoKind, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Requests in flight per connection in open-loop mode: past this the
/// connection falls behind schedule (which is reported) instead of queueing
/// without bound.
const OPEN_INFLIGHT_MAX: usize = 4096;
/// Pipeline depth of the prefill phase.
pub const PREFILL_PIPELINE: usize = 64;
/// Bytes read per socket read, on top of room for one whole reply.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Slack for headers around a value in a reply.
const REPLY_HEADER_BYTES_MAX: usize = 512;
/// Longest sleep of the event loop, so deadlines and timeouts are noticed.
const POLL_TIMEOUT_MAX: Duration = Duration::from_millis(50);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a connection's requests come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// SET every key the connection owns, from slot `next` on.
    Prefill { next: u64 },
    /// Random operations; `left` requests remain if the run is request-bounded.
    Mixed { rng: Rng, left: Option<u64> },
}

impl Source {
    fn next(&mut self, chooser: &Chooser, owned: &Owned) -> Option<(Op, u64)> {
        match self {
            Source::Prefill { next } => {
                if *next < owned.len() {
                    *next += 1;
                    Some((Op::Set, owned.key(*next - 1)))
                } else {
                    None
                }
            }
            Source::Mixed { rng, left } => {
                if let Some(left) = left {
                    if *left == 0 {
                        return None;
                    }
                    *left -= 1;
                }
                Some(chooser.next(rng, owned))
            }
        }
    }
}

/// How requests are issued in a phase.
#[derive(Clone, Copy, Debug)]
pub enum Pacing {
    /// Keep `pipeline` requests in flight; send the next batch when the whole
    /// batch has been answered.
    Closed { pipeline: usize },
    /// Request `j` (over all connections) is due at `j / rate` seconds;
    /// connection `c` sends requests `c, c + conns, c + 2 conns, …`.
    Open { rate: f64, conns: usize },
}

/// Everything a thread needs to run one phase; shared read-only.
pub struct Phase<'a> {
    pub protocol: Protocol,
    pub keyspace: &'a Keyspace,
    pub chooser: &'a Chooser,
    pub pacing: Pacing,
    /// Stop issuing requests at this time (duration-bounded runs).
    pub deadline: Option<Instant>,
    pub start: Instant,
    pub reply_timeout: Duration,
    /// Live counters for the progress line.
    pub live_ops: &'a AtomicU64,
    pub live_errors: &'a AtomicU64,
}

impl Phase<'_> {
    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.start).as_nanos() as u64
    }

    /// Intended send time (ns since start) of the `k`-th request of connection `c`.
    fn due_ns(&self, c: usize, k: u64) -> u64 {
        match self.pacing {
            Pacing::Open { rate, conns } => {
                ((c as f64 + k as f64 * conns as f64) * 1e9 / rate) as u64
            }
            Pacing::Closed { .. } => 0,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Inflight {
    op: Op,
    key: u64,
    /// The key's state before this request (see `Owned::on_encode`).
    expect: Presence,
    /// Send time (closed loop) or intended send time (open loop), ns since start.
    t_ns: u64,
}

/// One connection and its buffers.
pub struct Conn {
    /// Global index over all connections (fixes its open-loop schedule).
    pub index: usize,
    pub addr: SocketAddr,
    stream: Option<TcpStream>,
    wbuf: Vec<u8>,
    /// Bytes of `wbuf` already written.
    wpos: usize,
    /// Fixed-size read buffer; unparsed bytes are `rbuf[rstart..rend]`.
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    inflight: VecDeque<Inflight>,
    key: Vec<u8>,
    value: Vec<u8>,
    /// The keys this connection owns and their expected state.
    owned: Owned,
    pub source: Source,
    /// Requests sent in this phase (open loop: position in the schedule).
    sent: u64,
    exhausted: bool,
}

impl Conn {
    pub fn connect(
        index: usize,
        addr: SocketAddr,
        opts: &Options,
        ks: &Keyspace,
    ) -> Result<Conn, Error> {
        let std = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .and_then(|s| {
                s.set_nodelay(true)?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .map_err(|source| Error::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let reply_max = opts.value_size.max + ks.key_len() + REPLY_HEADER_BYTES_MAX;
        let request_max = reply_max;
        let depth = opts.pipeline.max(PREFILL_PIPELINE);
        Ok(Conn {
            index,
            addr,
            stream: Some(TcpStream::from_std(std)),
            wbuf: Vec::with_capacity(depth * request_max),
            wpos: 0,
            rbuf: vec![0; reply_max + READ_CHUNK_BYTES].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            inflight: VecDeque::with_capacity(depth.max(if opts.rate.is_some() {
                OPEN_INFLIGHT_MAX
            } else {
                0
            })),
            key: Vec::with_capacity(ks.key_len()),
            value: Vec::with_capacity(opts.value_size.max),
            owned: Owned::new(index as u64, opts.connections as u64, opts.keys),
            source: Source::Prefill { next: 0 },
            sent: 0,
            exhausted: false,
        })
    }

    pub fn alive(&self) -> bool {
        self.stream.is_some()
    }

    /// Resets per-phase state before a new phase.
    pub fn begin(&mut self, source: Source) {
        self.source = source;
        self.sent = 0;
        self.exhausted = false;
    }

    /// Still has work: requests to send, bytes to write or replies to await.
    fn busy(&self, stopping: bool) -> bool {
        self.alive() && (!self.inflight.is_empty() || !(stopping || self.exhausted))
    }

    /// Closes the connection after the reply to its oldest request failed
    /// (or never came): the error names that request's key.
    fn fail_oldest(&mut self, ks: &Keyspace, poll: &Poll, stats: &mut ThreadStats, fault: Fault) {
        let op = self.inflight.front().map(|req| {
            ks.write_key(req.key, &mut self.key);
            req.op
        });
        self.fail(poll, stats, fault, op);
    }

    /// Closes the connection after a failure: one error of `kind`, plus one
    /// `Unanswered` per request still in flight. With `op`, the failure is
    /// that of the oldest request, whose key is in `self.key`.
    fn fail(&mut self, poll: &Poll, stats: &mut ThreadStats, fault: Fault, op: Option<Op>) {
        stats.error(fault, op, &self.key, self.addr);
        // The request whose reply failed (if any) was counted just now.
        let skip = usize::from(op.is_some());
        for _ in skip..self.inflight.len() {
            stats.error_kind_only(ErrorKind::Unanswered);
        }
        self.inflight.clear();
        if let Some(mut s) = self.stream.take() {
            let _ = poll.registry().deregister(&mut s);
        }
    }

    /// Queues new requests according to the pacing.
    fn fill(&mut self, phase: &Phase<'_>, now_ns: u64, stopping: bool, stats: &mut ThreadStats) {
        if !self.alive() || stopping || self.exhausted {
            return;
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        match phase.pacing {
            Pacing::Closed { pipeline } => {
                if !self.inflight.is_empty() || self.wpos != self.wbuf.len() {
                    return;
                }
                for _ in 0..pipeline {
                    if !self.push_request(phase, now_ns) {
                        break;
                    }
                }
            }
            Pacing::Open { .. } => {
                while self.inflight.len() < OPEN_INFLIGHT_MAX {
                    let due = phase.due_ns(self.index, self.sent);
                    if due > now_ns || !self.push_request(phase, due) {
                        break;
                    }
                    stats.schedule_lag(now_ns - due);
                }
            }
        }
    }

    /// Encodes the next request; false when the source is exhausted.
    fn push_request(&mut self, phase: &Phase<'_>, t_ns: u64) -> bool {
        let Some((op, key)) = self.source.next(phase.chooser, &self.owned) else {
            self.exhausted = true;
            return false;
        };
        phase.keyspace.write_key(key, &mut self.key);
        if op == Op::Set {
            phase.keyspace.write_value(key, &mut self.value);
        }
        protocol::encode(phase.protocol, op, &self.key, &self.value, &mut self.wbuf);
        let expect = self.owned.on_encode(op, key);
        self.inflight.push_back(Inflight {
            op,
            key,
            expect,
            t_ns,
        });
        self.sent += 1;
        true
    }

    /// Writes as much of the write buffer as the socket takes.
    fn flush(&mut self, poll: &Poll, stats: &mut ThreadStats) {
        while self.wpos < self.wbuf.len() {
            let Some(stream) = self.stream.as_mut() else {
                return;
            };
            match stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return self.fail(poll, stats, dropped("write returned 0"), None),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == IoKind::WouldBlock => return,
                Err(e) if e.kind() == IoKind::Interrupted => {}
                Err(_) => return self.fail(poll, stats, dropped("write failed"), None),
            }
        }
    }

    /// Reads until the socket is drained, checking each complete reply.
    fn on_readable(
        &mut self,
        phase: &Phase<'_>,
        poll: &Poll,
        stats: &mut ThreadStats,
        stopping: bool,
    ) {
        loop {
            if self.rend == self.rbuf.len() {
                if self.rstart == 0 {
                    let f = Fault {
                        kind: ErrorKind::Desync,
                        what: "reply larger than the read buffer",
                    };
                    return self.fail_oldest(phase.keyspace, poll, stats, f);
                }
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            let Some(stream) = self.stream.as_mut() else {
                return;
            };
            match stream.read(&mut self.rbuf[self.rend..]) {
                Ok(0) => {
                    if self.busy(stopping) {
                        self.fail(poll, stats, dropped("server closed the connection"), None);
                    } else if let Some(mut s) = self.stream.take() {
                        let _ = poll.registry().deregister(&mut s);
                    }
                    return;
                }
                Ok(n) => {
                    self.rend += n;
                    if !self.parse_replies(phase, poll, stats) {
                        return;
                    }
                }
                Err(e) if e.kind() == IoKind::WouldBlock => return,
                Err(e) if e.kind() == IoKind::Interrupted => {}
                Err(_) => return self.fail(poll, stats, dropped("read failed"), None),
            }
        }
    }

    /// Checks all complete replies in the buffer; false if the connection failed.
    fn parse_replies(&mut self, phase: &Phase<'_>, poll: &Poll, stats: &mut ThreadStats) -> bool {
        let now_ns = phase.ns(Instant::now());
        while self.rstart < self.rend {
            let Some(&req) = self.inflight.front() else {
                let f = Fault {
                    kind: ErrorKind::Desync,
                    what: "bytes received with no request in flight",
                };
                self.fail(poll, stats, f, None);
                return false;
            };
            phase.keyspace.write_key(req.key, &mut self.key);
            if req.op == Op::Get {
                phase.keyspace.write_value(req.key, &mut self.value);
            }
            let expect = Expect {
                op: req.op,
                key: &self.key,
                value: &self.value,
                presence: req.expect,
            };
            match protocol::check(phase.protocol, &expect, &self.rbuf[self.rstart..self.rend]) {
                Check::Incomplete => break,
                Check::Reply { consumed, result } => {
                    self.rstart += consumed;
                    self.inflight.pop_front();
                    stats.reply(req.op, now_ns, now_ns.saturating_sub(req.t_ns));
                    if let Err(f) = result {
                        stats.error(f, Some(req.op), &self.key, self.addr);
                    }
                }
                Check::Desync(f) => {
                    stats.reply(req.op, now_ns, now_ns.saturating_sub(req.t_ns));
                    // `self.key` holds this request's key.
                    self.fail(poll, stats, f, Some(req.op));
                    return false;
                }
            }
        }
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
        true
    }

    /// Fails the connection if its oldest request has waited too long.
    fn check_timeout(
        &mut self,
        phase: &Phase<'_>,
        poll: &Poll,
        stats: &mut ThreadStats,
        now_ns: u64,
    ) {
        let Some(oldest) = self.inflight.front() else {
            return;
        };
        if now_ns.saturating_sub(oldest.t_ns) > phase.reply_timeout.as_nanos() as u64 {
            let f = Fault {
                kind: ErrorKind::Timeout,
                what: "no reply within --reply-timeout",
            };
            self.fail_oldest(phase.keyspace, poll, stats, f);
        }
    }

    /// Open loop: records each request due before the deadline that was
    /// never sent (for whatever reason, a dead connection included) as an
    /// `Unsent` error with latency `end_ns - due`: hiding them would let a
    /// client that fell behind report the latency of the requests it managed
    /// to send only. The operation is drawn as if the request had been sent.
    fn record_unsent(
        &mut self,
        phase: &Phase<'_>,
        deadline_ns: u64,
        end_ns: u64,
        stats: &mut ThreadStats,
    ) {
        let Pacing::Open { rate, conns } = phase.pacing else {
            return;
        };
        let due_total = (deadline_ns as f64 * rate / 1e9).ceil() as u64;
        let mine = due_total
            .saturating_sub(self.index as u64)
            .div_ceil(conns as u64);
        for k in self.sent..mine {
            let Some((op, _)) = self.source.next(phase.chooser, &self.owned) else {
                break;
            };
            let due = phase.due_ns(self.index, k);
            stats.unsent(op, end_ns.saturating_sub(due), self.addr);
        }
    }
}

fn dropped(what: &'static str) -> Fault {
    Fault {
        kind: ErrorKind::Dropped,
        what,
    }
}

/// Resolves every `--addr` to one socket address.
pub fn resolve(addrs: &[String]) -> Result<Vec<SocketAddr>, Error> {
    addrs
        .iter()
        .map(|a| {
            a.to_socket_addrs()
                .map_err(|source| Error::Resolve {
                    addr: a.clone(),
                    source,
                })?
                .next()
                .ok_or_else(|| Error::Resolve {
                    addr: a.clone(),
                    source: std::io::Error::new(IoKind::NotFound, "no address"),
                })
        })
        .collect()
}

/// Runs one phase on one thread's connections until all are done.
pub fn run_thread(conns: &mut [Conn], phase: &Phase<'_>) -> Result<ThreadStats, Error> {
    let mut stats = ThreadStats::new();
    let mut poll = Poll::new().map_err(Error::Poll)?;
    let mut events = Events::with_capacity(conns.len().max(16));
    for (i, c) in conns.iter_mut().enumerate() {
        if let Some(s) = c.stream.as_mut() {
            poll.registry()
                .register(s, Token(i), Interest::READABLE | Interest::WRITABLE)
                .map_err(Error::Poll)?;
        }
    }
    let deadline_ns = phase.deadline.map(|d| phase.ns(d));
    stats.deadline_ns = deadline_ns.unwrap_or(u64::MAX);
    let (mut ops_published, mut errors_published) = (0, 0);
    loop {
        let now_ns = phase.ns(Instant::now());
        let stopping = deadline_ns.is_some_and(|d| now_ns >= d);
        let mut busy = false;
        let mut next_due = u64::MAX;
        for c in conns.iter_mut() {
            c.fill(phase, now_ns, stopping, &mut stats);
            c.flush(&poll, &mut stats);
            c.check_timeout(phase, &poll, &mut stats, now_ns);
            busy |= c.busy(stopping);
            if let Pacing::Open { .. } = phase.pacing {
                if c.alive() && !c.exhausted && c.inflight.len() < OPEN_INFLIGHT_MAX {
                    next_due = next_due.min(phase.due_ns(c.index, c.sent));
                }
            }
        }
        ops_published = publish(phase.live_ops, stats.ops_total(), ops_published);
        errors_published = publish(phase.live_errors, stats.errors_total(), errors_published);
        if !busy {
            break;
        }
        let mut timeout = POLL_TIMEOUT_MAX;
        if !stopping {
            let wake = next_due.min(deadline_ns.unwrap_or(u64::MAX));
            timeout = timeout.min(Duration::from_nanos(wake.saturating_sub(now_ns)));
        }
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != IoKind::Interrupted {
                return Err(Error::Poll(e));
            }
        }
        for ev in events.iter() {
            let c = &mut conns[ev.token().0];
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                c.on_readable(phase, &poll, &mut stats, stopping);
                if let Pacing::Closed { .. } = phase.pacing {
                    // Send the next batch at once instead of after the loop.
                    c.fill(phase, phase.ns(Instant::now()), stopping, &mut stats);
                }
            }
            if ev.is_writable() || c.wpos < c.wbuf.len() {
                c.flush(&poll, &mut stats);
            }
        }
    }
    for c in conns.iter_mut() {
        if let Some(s) = c.stream.as_mut() {
            let _ = poll.registry().deregister(s);
        }
    }
    stats.end_ns = phase.ns(Instant::now());
    if let Some(d) = deadline_ns {
        for c in conns.iter_mut() {
            c.record_unsent(phase, d, stats.end_ns, &mut stats);
        }
    }
    Ok(stats)
}

/// Adds the growth of a thread-local counter to a shared one.
fn publish(shared: &AtomicU64, total: u64, published: u64) -> u64 {
    if total > published {
        shared.fetch_add(total - published, Ordering::Relaxed);
    }
    total
}
