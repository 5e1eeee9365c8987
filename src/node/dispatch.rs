//! From parsed commands to per-shard ops, and from op results back to replies in order.
//!
//! A [`Batch`] holds the commands of one segment of a connection's input: one [`Reply`]
//! per command (how to build its reply) and the [`ShardOp`]s it needs, each tagged with
//! the shard that owns it. Whoever executes the ops (inline on the owner thread, over a
//! channel to another shard thread, or [`execute_all`] on in-memory shards) fills
//! [`Results`];
//! [`Batch::assemble`] then writes every reply in command order. Per-shard op order is
//! command order, so a connection's commands on one key take effect in the order sent.

use crate::node::inbox::ShardReply;
use crate::node::info::{self, NodeInfo};
use crate::node::ops::{execute, line, OpKind, Outcome, ShardOp, CRLF};
use crate::protocol::native::{parse, Args, Command, Framer, ProtocolError, Step};
use crate::store::keyspace::{shard_of_bucket, KeyHash};
use crate::store::merkle::Digest;
use crate::store::shard::{Shard, ShardStats, StoreError};
use crate::wire::Span;

use crate::VERSION;

/// Most commands planned and executed together.
pub const SEGMENT_COMMANDS_MAX: usize = 128;

/// The reply to a data command while the node is catching up (node/bootstrap.rs).
pub const LOADING: &[u8] = b"ERROR: LOADING node is synchronising with its peers\r\n";
/// The LOADING reply while the node reads its data from disk.
pub const RECOVERING: &[u8] = b"ERROR: LOADING node is recovering its data from disk\r\n";
/// Most ops in one segment, apart from one multi-key command's. With every GET's reply
/// at most `max_line_bytes`, this bounds the reply bytes a segment can hold; a larger
/// MGET is answered in several segments (its `VALUES n` header goes out first).
pub const SEGMENT_OPS_MAX: usize = 128;
/// Keys one run of a multi-key command plans when it has a segment to itself. A run is
/// one hop to each other shard, so large runs make a 200k-key MGET a few hundred hops,
/// not thousands; memory stays bounded: ops are small, EXISTS/MSET/DEL runs reply no
/// bytes per key, and an MGET run stops at `RUN_REPLY_BYTES` per shard.
pub const RUN_OPS_MAX: usize = 4096;

/// How to build one command's reply from its ops' results.
#[derive(Clone, Copy, Debug)]
enum Reply {
    /// The bytes of one op.
    Op(u32),
    Error(ProtocolError),
    Static(&'static [u8]),
    /// A span of the received data, then CRLF (ECHO, PING msg).
    Echo(Span),
    Version,
    /// One run of a command over many keys.
    Multi(Run),
    Scan(u32),
    /// One op per shard, `first..first + shards`.
    Fanout(Fanout, u32),
    /// FLUSHDB's first phase, one clock reading per shard from `first`: no reply yet;
    /// the flush at their maximum is the next segment ([`Rest::Flush`]).
    FlushTick(u32),
}

/// One run of a command over many keys (see [`Multi`]): ops `first..first + n`.
/// `start` on its first run, `end` on its last; `keys` = its key count (MGET's header,
/// given on the first run only).
#[derive(Clone, Copy, Debug)]
struct Run {
    kind: Multi,
    first: u32,
    n: u32,
    start: bool,
    end: bool,
    keys: u32,
}

/// Commands over many keys. They are planned a segment's worth of keys at a time, so
/// one request of any length holds at most a segment of ops and results in memory; the
/// rest of its arguments waits in [`Batch`]'s `rest` for the next segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Multi {
    /// `VALUES n` on the first run, then each run's values as they are read.
    Mget,
    /// One count, once every run is done.
    Exists,
    /// `OK`, or the first error, once every run is done.
    Mset,
    /// DEL of two or more keys: `DELETED n` (keys that existed), or the first error.
    Del,
}

impl Multi {
    /// Arguments per op: MSET takes key/value pairs.
    fn args_per_op(self) -> usize {
        if self == Multi::Mset {
            2
        } else {
            1
        }
    }
}

/// The unfinished command, continued by the next segment.
#[derive(Clone, Copy, Debug)]
enum Rest {
    /// A multi-key command: its kind and its remaining arguments.
    Multi { kind: Multi, args: Span },
    /// FLUSHDB after its first phase: flush every shard at `hlc`, the highest clock
    /// reading of every shard (set when the readings are assembled), so the flush is
    /// newer than every write made before it and older than every write after it.
    /// Nothing of the connection's runs between the two phases.
    Flush { hlc: u64 },
}

#[derive(Clone, Copy, Debug)]
enum Fanout {
    Dbsize,
    Flush,
    Hash,
    HashShards,
    Info,
    Stats,
}

/// Which commands the node's readiness lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// LOADING (node/bootstrap.rs): data commands wait.
    Loading,
    /// The shards are being recovered from disk: the Merkle roots wait too, as the
    /// shards are not there yet.
    Recovering,
}

impl Gate {
    fn refuses(self, cmd: &Command<'_>) -> bool {
        match self {
            Gate::Open => false,
            Gate::Loading => cmd.touches_data(),
            Gate::Recovering => {
                cmd.touches_data() || matches!(cmd, Command::Hash | Command::HashShards)
            }
        }
    }

    fn reply(self) -> &'static [u8] {
        match self {
            Gate::Recovering => RECOVERING,
            _ => LOADING,
        }
    }
}

pub struct Batch {
    replies: Vec<Reply>,
    /// Ops in command order, each with its owning shard.
    pub ops: Vec<(usize, ShardOp)>,
    shard_bits: u32,
    /// QUIT was seen: answer what came before it, then close.
    pub quit: bool,
    /// What the node's readiness lets through (set before each `fill`).
    pub gate: Gate,
    /// Keys the next run of an MGET plans (see [`Batch::multi`]).
    mget_run: usize,
    /// SHUTDOWN was seen: answer, then stop the node.
    pub shutdown: bool,
    /// Protocol errors in this batch (for STATS).
    pub errors: u32,
    /// The command to continue in the next segment, by [`Batch::fill_rest`] on the same
    /// data: the arguments of a multi-key command that did not fit this segment (a span
    /// of its data), or FLUSHDB's second phase.
    rest: Option<Rest>,
    /// What a multi-key command's runs add up to so far: keys counted (EXISTS, DEL) and
    /// the first failure (MSET, DEL). Reset by its first run, used by its last.
    carry_count: u64,
    carry_failed: Option<crate::store::shard::StoreError>,
    /// A command the session and its driver carry out (anti-entropy); it always forms a
    /// segment of its own.
    pub special: Option<Special>,
}

/// Commands that are not shard ops: the session (node/session.rs) hands them to its
/// driver between segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    /// `SYNC.MSG n`: `n` bytes of anti-entropy message follow the line.
    SyncMsg(u32),
    /// `SYNC host:port`: the peer's address, in this segment's data.
    Sync(Span),
    /// `BACKUP`: copy the data directory into a new backup.
    Backup,
}

impl Batch {
    pub fn new(shard_bits: u32) -> Batch {
        Batch {
            replies: Vec::new(),
            ops: Vec::new(),
            shard_bits,
            quit: false,
            gate: Gate::Open,
            mget_run: RUN_OPS_MAX,
            shutdown: false,
            errors: 0,
            rest: None,
            carry_count: 0,
            carry_failed: None,
            special: None,
        }
    }

    pub fn clear(&mut self) {
        self.replies.clear();
        self.ops.clear();
        self.errors = 0;
        self.rest = None;
        self.special = None;
    }

    /// Start a new segment from `input` (unconsumed received bytes): frame, parse and
    /// plan commands until the segment is full, the input has no complete line left,
    /// or QUIT/SHUTDOWN. Returns the bytes consumed; spans point into `input`.
    pub fn fill(&mut self, framer: &mut Framer, input: &[u8]) -> usize {
        self.clear();
        let mut used = 0;
        while self.replies.len() < SEGMENT_COMMANDS_MAX
            && self.ops.len() < SEGMENT_OPS_MAX
            && self.rest.is_none()
            && !self.stopped()
        {
            match framer.next(&input[used..]) {
                Step::Line(line, n) => {
                    let parsed = parse(line).transpose();
                    let special = match parsed {
                        Some(Ok(Command::SyncMsg(len))) => Some(Special::SyncMsg(len)),
                        Some(Ok(Command::Sync(peer))) => Some(Special::Sync(Span::of(input, peer))),
                        Some(Ok(Command::Backup)) => Some(Special::Backup),
                        _ => None,
                    };
                    if special.is_some() {
                        // A segment of its own: end this one before it, or take it alone.
                        if self.replies.is_empty() {
                            self.special = special;
                            used += n;
                        }
                        break;
                    }
                    // A bad SYNC.MSG length: its body would be read as commands, so
                    // answer and close instead.
                    if parsed == Some(Err(ProtocolError::InvalidSyncLength)) {
                        self.quit = true;
                    }
                    if let Some(parsed) = parsed {
                        self.push(parsed, input);
                    }
                    used += n;
                }
                Step::TooLong => self.push(
                    Err(ProtocolError::LineTooLong(framer.line_bytes_max())),
                    input,
                ),
                Step::Skip(n) => used += n,
                Step::NeedMore => break,
            }
        }
        self.let_the_last_mget_stop_early();
        used
    }

    /// An MGET run may stop when its reply bytes fill up, and go on in the next segment;
    /// only the segment's last command may, or a later command's reply would come first.
    fn let_the_last_mget_stop_early(&mut self) {
        if let Some(&Reply::Multi(Run {
            kind: Multi::Mget,
            first,
            n,
            ..
        })) = self.replies.last()
        {
            let slots = &mut self.ops[first as usize..(first + n) as usize];
            slots
                .iter_mut()
                .for_each(|(_, op)| op.kind = OpKind::MgetSlot);
        }
    }

    /// True when a command is not finished (a multi-key command, FLUSHDB): call
    /// [`Batch::fill_rest`] with the same data.
    pub fn has_rest(&self) -> bool {
        self.rest.is_some()
    }

    /// Start a new segment with the next run of the unfinished command in `data`.
    pub fn fill_rest(&mut self, data: &[u8]) {
        let rest = self
            .rest
            .take()
            .expect("fill_rest without an unfinished command");
        self.clear();
        let reply = match rest {
            Rest::Multi { kind, args } => self.multi(kind, Args::new(args.get(data)), data, false),
            Rest::Flush { hlc } => {
                let first = self.fanout_ops(|shard| OpKind::Flush {
                    hlc,
                    publish: shard == 0,
                });
                Reply::Fanout(Fanout::Flush, first)
            }
        };
        self.replies.push(reply);
        self.let_the_last_mget_stop_early();
    }

    /// Plan one run of a multi-key command: as many keys as the segment has room for
    /// (at least one); the rest waits in `self.rest`. Linear in the keys planned: the
    /// rest is not scanned here.
    fn multi(&mut self, kind: Multi, args: Args<'_>, base: &[u8], start: bool) -> Reply {
        let first = self.ops.len() as u32;
        if start {
            self.mget_run = RUN_OPS_MAX;
        }
        let cap = match (self.replies.is_empty(), kind) {
            // Large values stop runs early: plan about what the last run got through,
            // so the keys after a stop are not planned (and run) again and again.
            (true, Multi::Mget) => self.mget_run,
            (true, _) => RUN_OPS_MAX,
            (false, _) => SEGMENT_OPS_MAX,
        };
        let room = cap.saturating_sub(self.ops.len()).max(1);
        let (now, later) = args.split_after(room * kind.args_per_op());
        let mut tokens = now.iter();
        while let Some(key) = tokens.next() {
            match kind {
                Multi::Mget => self.op(OpKind::Get, key, b"", base),
                Multi::Exists => self.op(OpKind::Exists, key, b"", base),
                Multi::Del => self.op(OpKind::DelQuiet, key, b"", base),
                Multi::Mset => {
                    let value = tokens.next().expect("MSET pairs are validated");
                    self.op(OpKind::SetQuiet, key, value, base)
                }
            }
        }
        let end = later.is_empty();
        if !end {
            self.rest = Some(Rest::Multi {
                kind,
                args: Span::of(base, later.as_bytes()),
            });
        }
        let keys = if start && kind == Multi::Mget {
            args.count() as u32
        } else {
            0
        };
        Reply::Multi(Run {
            kind,
            first,
            n: self.ops.len() as u32 - first,
            start,
            end,
            keys,
        })
    }

    /// A run's reply bytes filled up at op `at`: the command goes on from that op's key
    /// (ops after it, already run on another shard, are run again: reads only).
    fn resume_mget_at(&mut self, at: u32, run_end: u32, data: &[u8]) {
        let from = self.ops[at as usize].1.key.start;
        let to = match self.rest {
            Some(Rest::Multi { args, .. }) => args.start + args.len,
            _ => {
                let last = self.ops[run_end as usize - 1].1.key;
                last.start + last.len
            }
        };
        let args = Span {
            start: from,
            len: to - from,
        };
        debug_assert!(args.get(data).first() != Some(&b' '));
        self.rest = Some(Rest::Multi {
            kind: Multi::Mget,
            args,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.replies.is_empty() && self.special.is_none()
    }

    /// True once QUIT or SHUTDOWN was pushed: later commands are not read.
    pub fn stopped(&self) -> bool {
        self.quit || self.shutdown
    }

    fn op(&mut self, kind: OpKind, key: &[u8], arg: &[u8], base: &[u8]) {
        let hash = KeyHash::of(key);
        let op = ShardOp {
            kind,
            hash,
            key: Span::of(base, key),
            arg: Span::of(base, arg),
        };
        self.ops.push((hash.shard(self.shard_bits), op));
    }

    fn single(&mut self, kind: OpKind, key: &[u8], arg: &[u8], base: &[u8]) -> Reply {
        self.op(kind, key, arg, base);
        Reply::Op(self.ops.len() as u32 - 1)
    }

    fn fanout(&mut self, what: Fanout, kind: OpKind) -> Reply {
        Reply::Fanout(what, self.fanout_ops(|_| kind))
    }

    /// One op per shard, `kind(shard)`; returns the index of the first.
    fn fanout_ops(&mut self, kind: impl Fn(usize) -> OpKind) -> u32 {
        let first = self.ops.len() as u32;
        for shard in 0..1 << self.shard_bits {
            let op = ShardOp {
                kind: kind(shard),
                hash: KeyHash(0),
                key: Span::default(),
                arg: Span::default(),
            };
            self.ops.push((shard, op));
        }
        first
    }

    /// Add one parsed line. Its slices must borrow from `base`, the batch's data.
    pub fn push(&mut self, parsed: Result<Command<'_>, ProtocolError>, base: &[u8]) {
        let first = self.ops.len() as u32;
        let reply = match parsed {
            Err(e) => {
                self.errors += 1;
                Reply::Error(e)
            }
            Ok(cmd) if self.gate.refuses(&cmd) => Reply::Static(self.gate.reply()),
            Ok(cmd) => match cmd {
                Command::Get(k) => self.single(OpKind::Get, k, b"", base),
                Command::Set(k, v) => self.single(OpKind::Set, k, v, base),
                Command::Del(keys) => match keys.split_after(1) {
                    (one, rest) if rest.is_empty() => {
                        let key = one.iter().next().expect("DEL keys are validated");
                        self.single(OpKind::Del, key, b"", base)
                    }
                    _ => self.multi(Multi::Del, keys, base, true),
                },
                Command::Incr(k, d) => self.single(OpKind::Incr(d), k, b"", base),
                Command::Append(k, v) => self.single(OpKind::Append, k, v, base),
                Command::Prepend(k, v) => self.single(OpKind::Prepend, k, v, base),
                Command::Exists(keys) => self.multi(Multi::Exists, keys, base, true),
                Command::Mget(keys) => self.multi(Multi::Mget, keys, base, true),
                Command::Mset(pairs) => self.multi(Multi::Mset, pairs, base, true),
                Command::Scan {
                    prefix,
                    cursor,
                    count,
                } => {
                    let op = ShardOp {
                        kind: OpKind::Scan { cursor, count },
                        hash: KeyHash(0),
                        key: Span::of(base, prefix),
                        arg: Span::default(),
                    };
                    self.ops
                        .push((shard_of_bucket(cursor as usize, self.shard_bits), op));
                    Reply::Scan(first)
                }
                Command::Dbsize => self.fanout(Fanout::Dbsize, OpKind::Dbsize),
                Command::Flushdb => {
                    // Ends the segment: the flush itself must run before what follows.
                    self.rest = Some(Rest::Flush { hlc: 0 });
                    Reply::FlushTick(self.fanout_ops(|_| OpKind::Tick))
                }
                Command::Hash => self.fanout(Fanout::Hash, OpKind::Root),
                Command::HashShards => self.fanout(Fanout::HashShards, OpKind::Root),
                Command::Info => self.fanout(Fanout::Info, OpKind::Stats),
                Command::Stats => self.fanout(Fanout::Stats, OpKind::Stats),
                Command::Ping(None) => Reply::Static(b"PONG\r\n"),
                Command::Ping(Some(msg)) | Command::Echo(msg) => Reply::Echo(Span::of(base, msg)),
                Command::Version => Reply::Version,
                Command::Shutdown => {
                    self.shutdown = true;
                    Reply::Static(b"OK\r\n")
                }
                Command::Quit => {
                    self.quit = true;
                    Reply::Static(b"OK\r\n")
                }
                // `fill` takes these out before planning; never planned as ops.
                Command::SyncMsg(_) | Command::Sync(_) | Command::Backup => {
                    Reply::Error(ProtocolError::InvalidCommand)
                }
            },
        };
        self.replies.push(reply);
    }

    /// Write every reply, in command order, to `out`.
    pub fn assemble(
        &mut self,
        data: &[u8],
        results: &Results,
        info: &dyn Fn() -> NodeInfo,
        out: &mut Vec<u8>,
    ) {
        for i in 0..self.replies.len() {
            match self.replies[i] {
                Reply::Op(i) => out.extend_from_slice(results.bytes(i)),
                Reply::Error(e) => line(out, &e.to_string()),
                Reply::Static(s) => out.extend_from_slice(s),
                Reply::Echo(span) => {
                    out.extend_from_slice(span.get(data));
                    out.extend_from_slice(CRLF);
                }
                Reply::Version => line(out, &format!("VERSION {VERSION}")),
                Reply::Multi(run) => self.multi_reply(run, data, results, out),
                Reply::Scan(i) => {
                    let Outcome::Scan { next, keys } = results.outcome(i) else {
                        unreachable!("SCAN op without a scan outcome")
                    };
                    line(out, &format!("KEYS {next} {keys}"));
                    out.extend_from_slice(results.bytes(i));
                }
                Reply::Fanout(what, first) => self.fanout_reply(what, first, results, info, out),
                Reply::FlushTick(first) => {
                    let n = 1u32 << self.shard_bits;
                    let ticks: Result<Vec<u64>, StoreError> = (first..first + n)
                        .map(|i| match results.outcome(i) {
                            Outcome::Count(hlc) => Ok(hlc),
                            Outcome::Failed(e) => Err(e),
                            o => unreachable!("clock op gave {o:?}"),
                        })
                        .collect();
                    match ticks {
                        Ok(ticks) => {
                            let hlc = ticks.into_iter().max();
                            let hlc = hlc.expect("a node has at least one shard");
                            self.rest = Some(Rest::Flush { hlc });
                        }
                        Err(e) => {
                            // No second phase: nothing is flushed.
                            self.rest = None;
                            line(out, &e.to_string());
                        }
                    }
                }
            }
        }
    }

    /// The reply of one run of a multi-key command: MGET's values as they come, the
    /// others' once their last run is done.
    fn multi_reply(&mut self, run: Run, data: &[u8], results: &Results, out: &mut Vec<u8>) {
        let Run {
            kind,
            first,
            n,
            start,
            end,
            keys,
        } = run;
        if start {
            self.carry_count = 0;
            self.carry_failed = None;
        }
        self.carry_count += results.count(first, n);
        if self.carry_failed.is_none() {
            self.carry_failed = (first..first + n).find_map(|i| match results.outcome(i) {
                Outcome::Failed(e) => Some(e),
                _ => None,
            });
        }
        match kind {
            Multi::Mget => {
                if start {
                    line(out, &format!("VALUES {keys}"));
                }
                let done = (first..first + n)
                    .find(|&i| results.outcome(i) == Outcome::Skipped)
                    .unwrap_or(first + n);
                (first..done).for_each(|i| out.extend_from_slice(results.bytes(i)));
                if done < first + n {
                    self.resume_mget_at(done, first + n, data);
                    let got = (done - first) as usize;
                    self.mget_run = (2 * got).clamp(16, RUN_OPS_MAX);
                } else {
                    self.mget_run = (2 * self.mget_run).min(RUN_OPS_MAX);
                }
            }
            _ if !end => {}
            Multi::Exists => line(out, &self.carry_count.to_string()),
            Multi::Mset | Multi::Del => match self.carry_failed {
                Some(e) => line(out, &e.to_string()),
                None if kind == Multi::Mset => out.extend_from_slice(b"OK\r\n"),
                None => line(out, &format!("DELETED {}", self.carry_count)),
            },
        }
    }

    /// The reply of a command every shard answered: ops `first..first + shards`.
    fn fanout_reply(
        &self,
        what: Fanout,
        first: u32,
        results: &Results,
        info: &dyn Fn() -> NodeInfo,
        out: &mut Vec<u8>,
    ) {
        let n = 1u32 << self.shard_bits;
        let ops = first..first + n;
        match what {
            Fanout::Dbsize => line(out, &results.count(first, n).to_string()),
            Fanout::Flush => out.extend_from_slice(b"OK\r\n"),
            Fanout::Hash => info::write_hash(out, &results.roots(ops)),
            Fanout::HashShards => {
                info::write_hash_shards(out, &results.roots(ops), self.shard_bits)
            }
            Fanout::Info => info::write_info(out, info(), &results.stats(ops), n),
            Fanout::Stats => info::write_stats(out, info(), &results.stats(ops)),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct OpResult {
    buf: usize,
    start: usize,
    end: usize,
    outcome: Outcome,
}

const PENDING: OpResult = OpResult {
    buf: 0,
    start: 0,
    end: 0,
    outcome: Outcome::Done,
};

/// The results of a batch's ops: reply bytes live in `bufs` (0 = inline execution, then
/// one per remote reply), `items[i]` locates op `i`'s bytes and outcome.
pub struct Results {
    /// Visible to the node so tests of the whole path (node/session.rs) can weigh them.
    pub(super) bufs: Vec<Vec<u8>>,
    items: Vec<OpResult>,
}

impl Default for Results {
    fn default() -> Self {
        Results {
            bufs: vec![Vec::new()],
            items: Vec::new(),
        }
    }
}

impl Results {
    pub fn reset(&mut self, ops: usize) {
        self.bufs.truncate(1);
        self.bufs[0].clear();
        self.items.clear();
        self.items.resize(ops, PENDING);
    }

    /// Run op `i` on `shard` right here, recording its reply.
    pub fn run_inline(&mut self, i: usize, shard: &mut Shard, op: &ShardOp, data: &[u8]) {
        let start = self.bufs[0].len();
        // bufs[0] holds this thread's own shard's share of the segment.
        let outcome = execute(shard, op, data, &mut self.bufs[0]);
        self.items[i] = OpResult {
            buf: 0,
            start,
            end: self.bufs[0].len(),
            outcome,
        };
    }

    /// Take a remote shard's reply for the ops with batch indices `indices` (in order).
    pub fn add_remote(&mut self, indices: &[u32], reply: ShardReply) {
        assert_eq!(
            indices.len(),
            reply.ends.len(),
            "shard answered a different number of ops"
        );
        let buf = self.bufs.len();
        let mut start = 0;
        for (&i, &(end, outcome)) in indices.iter().zip(&reply.ends) {
            self.items[i as usize] = OpResult {
                buf,
                start,
                end,
                outcome,
            };
            start = end;
        }
        self.bufs.push(reply.out);
    }

    fn bytes(&self, i: u32) -> &[u8] {
        let r = &self.items[i as usize];
        &self.bufs[r.buf][r.start..r.end]
    }

    fn outcome(&self, i: u32) -> Outcome {
        self.items[i as usize].outcome
    }

    fn count(&self, first: u32, n: u32) -> u64 {
        (first..first + n)
            .map(|i| match self.outcome(i) {
                Outcome::Count(c) => c,
                _ => 0,
            })
            .sum()
    }

    /// The Merkle roots that ops `ops` (one per shard) answered.
    fn roots(&self, ops: std::ops::Range<u32>) -> Vec<Digest> {
        ops.map(|i| match self.outcome(i) {
            Outcome::Root(d) => d,
            o => unreachable!("root op gave {o:?}"),
        })
        .collect()
    }

    /// The statistics that ops `ops` (one per shard) answered, summed.
    fn stats(&self, ops: std::ops::Range<u32>) -> ShardStats {
        let mut sum = ShardStats::default();
        for i in ops {
            if let Outcome::Stats(s) = self.outcome(i) {
                sum.add(&s);
            }
        }
        sum
    }
}

/// Execute a list of ops on a shard (the receiving side of a cross-thread request).
pub fn serve_ops(shard: &mut Shard, ops: &[ShardOp], data: &[u8]) -> ShardReply {
    let mut out = Vec::new();
    let ends = ops
        .iter()
        .map(|op| {
            let outcome = execute(shard, op, data, &mut out);
            (out.len(), outcome)
        })
        .collect();
    ShardReply {
        out,
        ends,
        batch: None,
    }
}

/// Execute every op of `batch` on `shards` in this thread.
pub fn execute_all(shards: &mut [Shard], batch: &Batch, data: &[u8], results: &mut Results) {
    results.reset(batch.ops.len());
    for (i, (s, op)) in batch.ops.iter().enumerate() {
        results.run_inline(i, &mut shards[*s], op, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Batch {
        /// Commands in the batch.
        fn len(&self) -> usize {
            self.replies.len()
        }
    }

    #[test]
    fn segments_are_bounded() {
        let mut batch = Batch::new(1);
        let input = "GET a\n".repeat(SEGMENT_COMMANDS_MAX + 10);
        let used = batch.fill(&mut Framer::new(100), input.as_bytes());
        assert_eq!(batch.len(), SEGMENT_COMMANDS_MAX);
        assert_eq!(used, SEGMENT_COMMANDS_MAX * 6);
        let input = format!("EXISTS {}\nGET a\n", "k ".repeat(SEGMENT_OPS_MAX + 1));
        batch.fill(&mut Framer::new(10_000), input.as_bytes());
        assert_eq!(
            batch.len(),
            1,
            "a segment ends once its ops budget is spent"
        );
    }
}
