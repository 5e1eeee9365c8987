//! One client's conversation, without I/O: received bytes in; segments of ops to run,
//! replies, and the few things only the driver can do (read a `SYNC.MSG` body, run a
//! `SYNC` or a `BACKUP`, stop the node, close) out.
//!
//! Two drivers run it: a real connection (node/connection.rs) over a socket and shard
//! threads, and [`answer_all`] over in-memory shards for tests, benches and fuzzing.
//! Every decision a client can observe — the LOADING gate, QUIT and SHUTDOWN, which
//! `SYNC` peers are refused, whether a `SYNC.MSG` body may be held — is made here, so
//! both drivers answer alike.

use crate::node::dispatch::{execute_all, Batch, Gate, Results, Special};
use crate::node::info::NodeInfo;
use crate::node::ops::{line, ShardOp};
use crate::protocol::native::Framer;
use crate::store::shard::Shard;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Most bytes of `SYNC.MSG` bodies a node holds at once (each body ≤ 96 MiB), so many
/// connections each sending a large body do not add up past it.
pub const SYNC_BODIES_BYTES_MAX: usize = 256 << 20;

/// The reply to `SYNC` where there is no node to run an exchange from ([`answer_all`]).
const SYNC_NEEDS_A_NODE: &[u8] = b"ERROR: SYNC needs a running node\r\n";
/// The reply to `BACKUP` where there is no node, so no disk ([`answer_all`]).
const BACKUP_NEEDS_A_NODE: &[u8] = b"ERROR: BACKUP needs a running node\r\n";

/// What the driver does next with the received bytes it holds (`input` of
/// [`Session::next`]); counts are bytes from the start of `input`.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// No complete command left: drop the first `n` bytes (blank lines, the rest of an
    /// over-long line) and read more.
    Read(usize),
    /// A segment: its data is the first `n` bytes. Run [`Session::work`]'s ops on
    /// the data, then [`Session::answer`].
    Segment(usize),
    /// `SYNC.MSG`: its line is the first `line` bytes, and `len` body bytes follow.
    /// Ask [`Session::admit_body`] before reading them.
    SyncMsg { line: usize, len: usize },
    /// `SYNC <peer>` for an admissible peer, whose line is the first `line` bytes: run
    /// the exchange and reply with its line.
    Sync { line: usize, peer: String },
    /// `BACKUP`, whose line is the first `line` bytes: take a backup and reply with its
    /// line.
    Backup { line: usize },
    /// The first `n` bytes were a command the session has answered itself (a refused
    /// `SYNC`); go on.
    Answered(usize),
}

/// What a segment's answer leaves to the driver.
#[derive(Debug, PartialEq, Eq)]
pub enum Then {
    /// The command goes on (a multi-key command, FLUSHDB): run [`Session::work`]'s ops
    /// on the same data again, then answer again.
    Again,
    /// The segment is answered: [`Session::next`].
    Done,
    /// QUIT or SHUTDOWN (or a bad `SYNC.MSG` length) is answered: write, then close.
    Close {
        /// SHUTDOWN: stop the node too.
        shutdown: bool,
    },
}

/// A segment's answer: what next, and its protocol errors (for STATS).
#[derive(Debug)]
pub struct Answer {
    pub then: Then,
    pub protocol_errors: u32,
}

/// Why a `SYNC.MSG` body is not read; the reply is written and the client is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("anti-entropy peer not admitted")]
    Peer,
    #[error("anti-entropy memory bound reached")]
    Memory,
}

/// A body's share of the node-wide bound on `SYNC.MSG` bodies, released when dropped.
pub struct BodyBytes<'a> {
    held: &'a AtomicUsize,
    len: usize,
}

impl Drop for BodyBytes<'_> {
    fn drop(&mut self) {
        self.held.fetch_sub(self.len, Relaxed);
    }
}

/// One client's planning state: the segment in hand, its ops' results, and the
/// `SYNC.MSG` body it is waiting for.
pub struct Session {
    batch: Batch,
    results: Results,
    /// The body length of the `SYNC.MSG` just seen, until [`Session::admit_body`].
    body: Option<usize>,
}

impl Session {
    pub fn new(shard_bits: u32) -> Session {
        Session {
            batch: Batch::new(shard_bits),
            results: Results::default(),
            body: None,
        }
    }

    /// Plan the next segment from `input`, the received bytes not yet used. While the
    /// node is LOADING, what its `gate` holds back is answered LOADING. A refused `SYNC` is
    /// answered into `out`.
    pub fn next(
        &mut self,
        framer: &mut Framer,
        input: &[u8],
        gate: Gate,
        out: &mut Vec<u8>,
    ) -> Next {
        assert!(
            !self.batch.has_rest() && self.body.is_none(),
            "next() before the last step was finished"
        );
        self.batch.gate = gate;
        let used = self.batch.fill(framer, input);
        match self.batch.special.take() {
            Some(Special::SyncMsg(len)) => {
                self.body = Some(len as usize);
                Next::SyncMsg {
                    line: used,
                    len: len as usize,
                }
            }
            Some(Special::Sync(peer)) => {
                let peer = String::from_utf8_lossy(peer.get(input)).into_owned();
                match crate::antientropy::client::admit_peer(&peer) {
                    Ok(()) => Next::Sync { line: used, peer },
                    Err(why) => {
                        line(out, &format!("ERROR: {why}"));
                        Next::Answered(used)
                    }
                }
            }
            Some(Special::Backup) => Next::Backup { line: used },
            None if self.batch.is_empty() => Next::Read(used),
            None => Next::Segment(used),
        }
    }

    /// The segment's ops, each with its shard, in command order, and where their
    /// results go.
    pub fn work(&mut self) -> (&[(usize, ShardOp)], &mut Results) {
        (&self.batch.ops, &mut self.results)
    }

    /// Run the segment's ops on `shards`, all in this thread, over `data`.
    pub fn run_on(&mut self, shards: &mut [Shard], data: &[u8]) {
        execute_all(shards, &self.batch, data, &mut self.results);
    }

    /// Write the segment's replies, in command order, once its ops have run on `data`.
    pub fn answer(
        &mut self,
        data: &[u8],
        info: &dyn Fn() -> NodeInfo,
        out: &mut Vec<u8>,
    ) -> Answer {
        self.batch.assemble(data, &self.results, info, out);
        let protocol_errors = self.batch.errors;
        let then = if self.batch.has_rest() {
            // The next run of a large command, from the same received bytes.
            self.batch.fill_rest(data);
            Then::Again
        } else if self.batch.stopped() {
            Then::Close {
                shutdown: self.batch.shutdown,
            }
        } else {
            Then::Done
        };
        Answer {
            then,
            protocol_errors,
        }
    }

    /// Whether the body of the `SYNC.MSG` just seen may be read: its sender must be
    /// `admitted` ([`crate::antientropy::client::admit_incoming`]) and the body must fit
    /// the node-wide bound, with `held` the bytes of the bodies the node holds now. The
    /// share returned holds the body's place until dropped. On refusal the reply is in
    /// `out`, and the driver writes it and closes: the body is not read, so what follows
    /// cannot be read as commands.
    pub fn admit_body<'h>(
        &mut self,
        admitted: Result<(), String>,
        held: &'h AtomicUsize,
        out: &mut Vec<u8>,
    ) -> Result<BodyBytes<'h>, Refused> {
        let len = self.body.take().expect("admit_body without a SYNC.MSG");
        if let Err(why) = admitted {
            line(out, &format!("ERROR: {why}"));
            return Err(Refused::Peer);
        }
        let before = held.fetch_add(len, Relaxed);
        let share = BodyBytes { held, len };
        if before + len > SYNC_BODIES_BYTES_MAX {
            out.extend_from_slice(
                b"ERROR: too many anti-entropy messages in flight; try again\r\n",
            );
            return Err(Refused::Memory);
        }
        Ok(share)
    }
}

/// The whole request path in one thread, without sockets: answer every complete line
/// of `input` into `out`, segment by segment, exactly as a connection does. Returns
/// the bytes consumed. For tests, benches and fuzzing.
pub fn answer_all(
    shards: &mut [Shard],
    framer: &mut Framer,
    input: &[u8],
    out: &mut Vec<u8>,
    info: &dyn Fn() -> NodeInfo,
) -> usize {
    answer_holding(shards, framer, &AtomicUsize::new(0), input, out, info)
}

/// [`answer_all`] on a node that holds `held` bytes of `SYNC.MSG` bodies.
fn answer_holding(
    shards: &mut [Shard],
    framer: &mut Framer,
    held: &AtomicUsize,
    input: &[u8],
    out: &mut Vec<u8>,
    info: &dyn Fn() -> NodeInfo,
) -> usize {
    let mut session = Session::new(shards.len().trailing_zeros());
    let mut used = 0;
    loop {
        match session.next(framer, &input[used..], Gate::Open, out) {
            Next::Read(n) => return used + n,
            Next::Answered(n) => used += n,
            Next::Sync { line, .. } => {
                used += line;
                out.extend_from_slice(SYNC_NEEDS_A_NODE);
            }
            Next::Backup { line } => {
                used += line;
                out.extend_from_slice(BACKUP_NEEDS_A_NODE);
            }
            Next::SyncMsg { line, len } => {
                let admitted = crate::antientropy::client::admit_incoming(None);
                let Ok(_share) = session.admit_body(admitted, held, out) else {
                    return used + line;
                };
                // The message body follows the line; wait for all of it.
                let Some(body) = input.get(used + line..used + line + len) else {
                    return used;
                };
                used += line + len;
                let mut node = crate::antientropy::serve::Shards {
                    shards,
                    now_us: crate::store::version::now_us(),
                };
                crate::antientropy::messages::write_reply(
                    out,
                    crate::antientropy::messages::Peer::call(&mut node, body),
                );
            }
            Next::Segment(n) => {
                let data = &input[used..used + n];
                used += n;
                loop {
                    session.run_on(shards, data);
                    match session.answer(data, info, out).then {
                        Then::Again => {}
                        Then::Done => break,
                        Then::Close { .. } => return used,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::dispatch::{execute_all, Batch, Results, RUN_OPS_MAX, SEGMENT_OPS_MAX};
    use crate::store::keyspace::KeyHash;
    use crate::store::shard::MemoryBudget;
    use crate::VERSION;

    /// Run `input` through framing, parsing, planning, execution and assembly.
    fn run(shards: &mut [Shard], input: &str) -> String {
        let mut out = Vec::new();
        answer_all(
            shards,
            &mut Framer::new(1 << 20),
            input.as_bytes(),
            &mut out,
            &NodeInfo::default,
        );
        String::from_utf8(out).unwrap()
    }

    fn shards(n: usize) -> Vec<Shard> {
        (0..n)
            .map(|i| Shard::new(i, n.trailing_zeros(), MemoryBudget::unlimited(), 1 << 20))
            .collect()
    }

    #[test]
    fn values_a_text_line_cannot_carry_are_refused_per_key_and_the_stream_stays_in_sync() {
        // Such values arrive from peers or binary-safe ports, never from a native SET.
        let mut s = shards(2);
        for (key, value) in [
            (&b"crlf"[..], &b"one\r\nOK"[..]),
            (b"lf", b"two\nlines"),
            (b"latin1", b"caf\xe9"),
            (b"fine", "café".as_bytes()),
        ] {
            let h = KeyHash::of(key);
            s[h.shard(1)].set(h, key, value).unwrap();
        }
        let out = run(
            &mut s,
            "GET crlf\nGET lf\nGET latin1\nGET fine\nMGET fine crlf nope\nPING\n",
        );
        let refused = "ERROR: Value not representable in the text protocol\r\n";
        assert_eq!(
            out,
            format!("{refused}{refused}{refused}café\r\nVALUES 3\r\ncafé\r\n{refused}(null)\r\nPONG\r\n")
        );
    }

    #[test]
    fn replies_come_back_in_command_order_across_shards() {
        for n in [1, 2, 8] {
            let mut s = shards(n);
            let out = run(
                &mut s,
                "SET a 1\nSET b 2\nGET b\nGET a\nGET zz\nDEL a\nDEL a\n",
            );
            assert_eq!(
                out,
                "OK\r\nOK\r\n2\r\n1\r\n(null)\r\nDELETED\r\nNOT_FOUND\r\n"
            );
        }
    }

    #[test]
    fn multi_key_commands_reassemble() {
        let mut s = shards(4);
        let out = run(
            &mut s,
            "MSET a 1 b 2 c 3\nMGET c x a b\nEXISTS a b x c\nDBSIZE\n",
        );
        assert_eq!(out, "OK\r\nVALUES 4\r\n3\r\n(null)\r\n1\r\n2\r\n3\r\n3\r\n");
    }

    #[test]
    fn large_mget_spans_segments() {
        let mut s = shards(2);
        let mut input = String::from("SET k7 seven\nMGET");
        let mut expected = format!("OK\r\nVALUES {}\r\n", 3 * SEGMENT_OPS_MAX + 5);
        for i in 0..3 * SEGMENT_OPS_MAX + 5 {
            input += &format!(" k{}", i % 10);
            expected += if i % 10 == 7 {
                "seven\r\n"
            } else {
                "(null)\r\n"
            };
        }
        input += "\nGET k7\n";
        expected += "seven\r\n";
        assert_eq!(run(&mut s, &input), expected);
    }

    #[test]
    fn exists_mset_and_del_span_segments_with_bounded_ops() {
        let n = 3 * RUN_OPS_MAX + 5;
        let keys: String = (0..n).map(|i| format!(" k{i}")).collect();
        let pairs: String = (0..n).map(|i| format!(" k{i} v{i}")).collect();
        for line in [
            format!("EXISTS{keys}"),
            format!("MSET{pairs}"),
            format!("DEL{keys}"),
        ] {
            let mut batch = Batch::new(1);
            let input = format!("{line}\n");
            batch.fill(&mut Framer::new(1 << 20), input.as_bytes());
            assert!(batch.ops.len() <= RUN_OPS_MAX, "{}", &line[..6]);
            let mut runs = 1;
            while batch.has_rest() {
                batch.fill_rest(input.as_bytes());
                assert!(batch.ops.len() <= RUN_OPS_MAX);
                runs += 1;
            }
            assert_eq!(runs, n.div_ceil(RUN_OPS_MAX));
        }
        let mut s = shards(2);
        let out = run(
            &mut s,
            &format!("SET k7 x\nEXISTS{keys}\nMSET{pairs}\nEXISTS{keys} nope\nDEL{keys} nope\nEXISTS{keys}\nDBSIZE\n"),
        );
        assert_eq!(
            out,
            format!("OK\r\n1\r\nOK\r\n{n}\r\nDELETED {n}\r\n0\r\n0\r\n")
        );
    }

    #[test]
    fn an_mget_run_of_large_values_stops_at_its_byte_bound_and_goes_on() {
        // More keys than a shared segment plans, so the run has its segment to itself.
        const VALUE: usize = 20_000;
        const KEYS: usize = SEGMENT_OPS_MAX + 72;
        let mut s = shards(2);
        let keys: Vec<String> = (0..KEYS).map(|i| format!("big{i}")).collect();
        for (i, key) in keys.iter().enumerate() {
            let h = KeyHash::of(key.as_bytes());
            let value = vec![b'a' + (i % 26) as u8; VALUE];
            s[h.shard(1)].set(h, key.as_bytes(), &value).unwrap();
        }
        let input = format!("MGET {} nope\nPING\n", keys.join(" "));
        // Run by run: no shard's share of a run holds much more than the bound.
        let (mut batch, mut results) = (Batch::new(1), Results::default());
        let mut framer = Framer::new(1 << 20);
        let (mut out, mut runs) = (Vec::new(), 0);
        let used = batch.fill(&mut framer, input.as_bytes());
        loop {
            execute_all(&mut s, &batch, input.as_bytes(), &mut results);
            let held: usize = results.bufs.iter().map(Vec::len).sum();
            let bound = 2 * (crate::node::ops::RUN_REPLY_BYTES + VALUE + 2);
            assert!(held <= bound, "{held} bytes in one run");
            batch.assemble(input.as_bytes(), &results, &NodeInfo::default, &mut out);
            runs += 1;
            if !batch.has_rest() {
                break;
            }
            batch.fill_rest(input.as_bytes());
        }
        assert!(runs > 3, "{runs} runs");
        batch.fill(&mut framer, &input.as_bytes()[used..]);
        execute_all(&mut s, &batch, &input.as_bytes()[used..], &mut results);
        batch.assemble(
            &input.as_bytes()[used..],
            &results,
            &NodeInfo::default,
            &mut out,
        );
        let mut expected = format!("VALUES {}\r\n", KEYS + 1);
        for i in 0..KEYS {
            expected += &String::from_utf8(vec![b'a' + (i % 26) as u8; VALUE]).unwrap();
            expected += "\r\n";
        }
        expected += "(null)\r\nPONG\r\n";
        assert!(
            String::from_utf8(out).unwrap() == expected,
            "values out of order or lost"
        );
        // The same through the whole path, and with a command after it in the segment.
        assert_eq!(run(&mut s, &input), expected);
    }

    #[test]
    fn del_of_one_key_keeps_its_replies_and_of_several_counts() {
        let mut s = shards(2);
        let out = run(
            &mut s,
            "MSET a 1 b 2\nDEL a\nDEL a\nDEL a b c\nDEL x y\nDBSIZE\n",
        );
        assert_eq!(
            out,
            "OK\r\nDELETED\r\nNOT_FOUND\r\nDELETED 1\r\nDELETED 0\r\n0\r\n"
        );
    }

    #[test]
    fn flushdb_runs_between_the_commands_around_it_on_every_shard() {
        for n in [1, 2, 8] {
            let mut s = shards(n);
            let out = run(
                &mut s,
                "MSET a 1 b 2 c 3\nDEL c\nFLUSHDB\nSET d 4\nDBSIZE\nMGET a b d\nFLUSHDB\nFLUSHDB\nDBSIZE\n",
            );
            assert_eq!(
                out,
                "OK\r\nDELETED\r\nOK\r\nOK\r\n1\r\nVALUES 3\r\n(null)\r\n(null)\r\n4\r\nOK\r\nOK\r\n0\r\n"
            );
            // One marker for the node, newer than every write before it.
            let markers: Vec<_> = s.iter().map(Shard::flushed).collect();
            assert!(markers.iter().all(|m| *m == markers[0]), "{markers:?}");
            assert_eq!(
                s.iter().map(|s| s.snapshot_stats().tombstones).sum::<u64>(),
                0
            );
            assert_eq!(run(&mut s, "HASH\n"), run(&mut shards(n), "HASH\n"));
        }
    }

    #[test]
    fn hash_is_the_same_for_every_shard_count() {
        let input = "MSET a 1 b 2 c 3 d 4\nDEL c\nHASH\n";
        let expected = run(&mut shards(1), input);
        for n in [2, 4, 8, 256] {
            assert_eq!(run(&mut shards(n), input), expected);
        }
    }

    #[test]
    fn hash_shards_lists_ranges() {
        let out = run(&mut shards(2), "HASH SHARDS\n");
        let lines: Vec<&str> = out.split("\r\n").collect();
        assert_eq!(lines[0], "SHARDS 2");
        assert!(lines[1].starts_with("0 0 32767 "));
        assert!(lines[2].starts_with("1 32768 65535 "));
        assert_eq!(lines[1].len(), "0 0 32767 ".len() + 64);
    }

    #[test]
    fn errors_and_static_replies() {
        let out = run(
            &mut shards(2),
            "PING\nPING hi there\nECHO x\nFOO\nVERSION\nQUIT\n",
        );
        assert_eq!(
            out,
            format!(
                "PONG\r\nhi there\r\nx\r\nERROR: Invalid command\r\nVERSION {VERSION}\r\nOK\r\n"
            )
        );
    }

    #[test]
    fn mset_reports_storage_full() {
        let budget = MemoryBudget::new(100);
        let mut s: Vec<Shard> = (0..2)
            .map(|i| Shard::new(i, 1, budget.clone(), 1 << 20))
            .collect();
        let out = run(&mut s, "MSET a 1 b 2 c 3 d 4 e 5\n");
        assert_eq!(out, "ERROR: Storage full\r\n");
    }

    #[test]
    fn scan_walks_all_shards_with_its_cursor() {
        let mut s = shards(4);
        let mut input = String::new();
        for i in 0..200 {
            input += &format!("SET k{i} v\n");
        }
        run(&mut s, &input);
        let mut cursor = 0;
        let mut seen = std::collections::HashSet::new();
        loop {
            let out = run(&mut s, &format!("SCAN k* {cursor} 7\n"));
            let mut lines = out.split("\r\n");
            let head: Vec<&str> = lines.next().unwrap().split(' ').collect();
            assert_eq!(head[0], "KEYS");
            let n: usize = head[2].parse().unwrap();
            for _ in 0..n {
                assert!(seen.insert(lines.next().unwrap().to_string()));
            }
            cursor = head[1].parse().unwrap();
            if cursor == 0 {
                break;
            }
        }
        assert_eq!(seen.len(), 200);
    }

    #[test]
    fn info_and_stats_are_counted_lines() {
        let out = run(&mut shards(2), "SET a 1\nGET a\nGET b\nSTATS\nINFO\n");
        let lines: Vec<&str> = out.split("\r\n").collect();
        let n: usize = lines[3].strip_prefix("STATS ").unwrap().parse().unwrap();
        assert!(lines[4..4 + n].contains(&"get_hits:1"));
        assert!(lines[4..4 + n].contains(&"get_misses:1"));
        assert!(lines[4 + n].starts_with("INFO "));
    }

    #[test]
    fn backup_is_a_segment_of_its_own_and_the_commands_around_it_are_answered_in_order() {
        let mut s = shards(2);
        let out = run(&mut s, "SET a 1\nBACKUP\nGET a\n");
        assert_eq!(out, "OK\r\nERROR: BACKUP needs a running node\r\n1\r\n");
    }

    #[test]
    fn a_sync_msg_past_the_node_wide_bound_is_refused_and_ends_the_client() {
        // Other connections hold all but 4 bytes of the bound: a 5-byte body must wait.
        let held = AtomicUsize::new(SYNC_BODIES_BYTES_MAX - 4);
        let input = b"SYNC.MSG 5\r\nabcdePING\r\n";
        let mut out = Vec::new();
        let used = answer_holding(
            &mut shards(2),
            &mut Framer::new(1 << 20),
            &held,
            input,
            &mut out,
            &NodeInfo::default,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ERROR: too many anti-entropy messages in flight; try again\r\n"
        );
        assert_eq!(used, "SYNC.MSG 5\r\n".len(), "the body is not read");
        assert_eq!(
            held.load(Relaxed),
            SYNC_BODIES_BYTES_MAX - 4,
            "its share is given back"
        );
    }

    #[test]
    fn a_sender_not_admitted_is_told_why_and_holds_nothing() {
        let (mut session, held, mut out) = (Session::new(1), AtomicUsize::new(0), Vec::new());
        let input = b"SYNC.MSG 5\r\nabcde";
        let next = session.next(&mut Framer::new(100), input, Gate::Open, &mut out);
        assert_eq!(next, Next::SyncMsg { line: 12, len: 5 });
        let refused = session.admit_body(Err("not from there".into()), &held, &mut out);
        assert_eq!(refused.err(), Some(Refused::Peer));
        assert_eq!(out, b"ERROR: not from there\r\n");
        assert_eq!(held.load(Relaxed), 0);
        // An admitted body holds its share until it is served.
        let share = session.next(&mut Framer::new(100), input, Gate::Open, &mut out);
        assert_eq!(share, Next::SyncMsg { line: 12, len: 5 });
        let share = session.admit_body(Ok(()), &held, &mut out);
        assert_eq!(held.load(Relaxed), 5);
        drop(share);
        assert_eq!(held.load(Relaxed), 0);
    }

    /// The replies to `input` through `gate`, and the keys it left in the shards.
    fn through(gate: Gate, input: &[u8]) -> (String, usize) {
        let mut s = shards(2);
        let (mut session, mut out) = (Session::new(1), Vec::new());
        let next = session.next(&mut Framer::new(100), input, gate, &mut out);
        assert_eq!(next, Next::Segment(input.len()));
        session.run_on(&mut s, input);
        session.answer(input, &NodeInfo::default, &mut out);
        let keys = s[0].snapshot_stats().keys + s[1].snapshot_stats().keys;
        (String::from_utf8(out).unwrap(), keys as usize)
    }

    #[test]
    fn while_loading_data_commands_wait_and_the_rest_are_answered() {
        let loading = String::from_utf8(crate::node::dispatch::LOADING.to_vec()).unwrap();
        let (out, keys) = through(Gate::Loading, b"SET a 1\r\nPING\r\nHASH\r\nQUIT\r\n");
        let (head, tail) = out.split_once("PONG\r\n").unwrap();
        assert_eq!(head, loading);
        let (hash, rest) = tail.split_once("\r\n").unwrap();
        assert_eq!((hash.len(), rest), (64, "OK\r\n"), "HASH is answered");
        assert_eq!(keys, 0);
    }

    #[test]
    fn while_recovering_the_merkle_roots_wait_too() {
        let recovering = String::from_utf8(crate::node::dispatch::RECOVERING.to_vec()).unwrap();
        let (out, keys) = through(Gate::Recovering, b"SET a 1\r\nHASH\r\nPING\r\n");
        assert_eq!(out, format!("{recovering}{recovering}PONG\r\n"));
        assert_eq!(keys, 0);
        let (out, keys) = through(Gate::Open, b"SET a 1\r\nPING\r\n");
        assert_eq!((out.as_str(), keys), ("OK\r\nPONG\r\n", 1));
    }
}
