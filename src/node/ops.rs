//! What a shard executes: a [`ShardOp`] in, reply bytes plus an [`Outcome`] out.
//!
//! Ops name their key and argument by [`Span`]s into the batch's received bytes, so the
//! same op runs inline on the owner thread or, shipped with a shared `Bytes` chunk, on
//! another shard's thread — without copying keys and values.

use crate::limits::BUCKETS;
use crate::store::keyspace::KeyHash;
use crate::store::merkle::Digest;
use crate::store::shard::{Shard, ShardStats, StoreError};
use crate::wire::Span;

pub const CRLF: &[u8] = b"\r\n";

/// Write `s` as one reply line.
pub fn line(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(CRLF);
}

/// The reply to a GET (or an MGET slot) whose value cannot travel in a text line. Values
/// may hold any bytes (a peer or a binary-safe port may have stored them); written raw, a
/// CR or LF would split the reply and desynchronise the client for every later reply.
pub const NOT_REPRESENTABLE: &[u8] = b"ERROR: Value not representable in the text protocol\r\n";

/// Whether `value` can be written as one native reply line: valid UTF-8 (as every native
/// request line is) without CR or LF.
pub fn representable(value: &[u8]) -> bool {
    !value.iter().any(|&b| b == b'\r' || b == b'\n') && std::str::from_utf8(value).is_ok()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Get,
    /// A GET that is one slot of an MGET run: skipped (no bytes, [`Outcome::Skipped`])
    /// once the shard's share of the run holds [`RUN_REPLY_BYTES`]; the run resumes there.
    MgetSlot,
    Set,
    /// An MSET part: no reply bytes, the outcome says whether it was stored.
    SetQuiet,
    Del,
    /// A part of a DEL of several keys: no reply bytes, the outcome counts the key if
    /// it existed.
    DelQuiet,
    Exists,
    Incr(i64),
    Append,
    Prepend,
    /// `key` holds the prefix.
    Scan {
        cursor: u32,
        count: u32,
    },
    Dbsize,
    /// FLUSHDB, first phase: a fresh reading of the shard's clock (`Outcome::Count`).
    Tick,
    /// FLUSHDB, second phase: flush at `hlc`, the highest reading of the first, on
    /// every shard; `publish` on one of them, so the flush is replicated once.
    Flush {
        hlc: u64,
        publish: bool,
    },
    Root,
    Stats,
}

#[derive(Clone, Copy, Debug)]
pub struct ShardOp {
    pub kind: OpKind,
    pub hash: KeyHash,
    pub key: Span,
    pub arg: Span,
}

/// What an op tells the connection besides its reply bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Count(u64),
    Failed(StoreError),
    Root(Digest),
    /// Keys written to the reply bytes, and the cursor to resume at (0 = done).
    Scan {
        next: u32,
        keys: u32,
    },
    Stats(ShardStats),
    /// An MGET slot not run: the run's reply bytes were full (see [`OpKind::MgetSlot`]).
    Skipped,
}

/// Reply bytes one shard's share of an MGET run may hold before it skips the rest: a
/// run plans up to thousands of keys, and their values must not all sit in memory.
pub const RUN_REPLY_BYTES: usize = 256 << 10;

/// Execute `op` against `shard`, appending its reply bytes (if it has any) to `out`,
/// which holds only this shard's share of the segment: an MGET slot is skipped once it
/// holds [`RUN_REPLY_BYTES`].
pub fn execute(shard: &mut Shard, op: &ShardOp, data: &[u8], out: &mut Vec<u8>) -> Outcome {
    let key = op.key.get(data);
    let arg = op.arg.get(data);
    let h = op.hash;
    match op.kind {
        OpKind::MgetSlot if out.len() >= RUN_REPLY_BYTES => Outcome::Skipped,
        OpKind::Get | OpKind::MgetSlot => get(shard, h, key, out),
        OpKind::Set => {
            let r = shard.set(h, key, arg);
            written(r, shard, out)
        }
        OpKind::SetQuiet => match shard.set(h, key, arg) {
            Ok(()) => {
                shard.stats.writes += 1;
                Outcome::Done
            }
            Err(e) => {
                count_failure(shard, e);
                Outcome::Failed(e)
            }
        },
        OpKind::Del => {
            shard.stats.dels += 1;
            match shard.del(h, key) {
                Ok(true) => out.extend_from_slice(b"DELETED\r\n"),
                Ok(false) => out.extend_from_slice(b"NOT_FOUND\r\n"),
                Err(e) => return error(shard, e, out),
            }
            Outcome::Done
        }
        OpKind::DelQuiet => {
            shard.stats.dels += 1;
            match shard.del(h, key) {
                Ok(existed) => Outcome::Count(u64::from(existed)),
                Err(e) => {
                    count_failure(shard, e);
                    Outcome::Failed(e)
                }
            }
        }
        OpKind::Exists => Outcome::Count(u64::from(shard.get(h, key).is_some())),
        OpKind::Incr(delta) => match shard.incr(h, key, delta) {
            Ok(n) => {
                shard.stats.writes += 1;
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.extend_from_slice(CRLF);
                Outcome::Done
            }
            Err(e) => error(shard, e, out),
        },
        OpKind::Append | OpKind::Prepend => {
            let r = shard.concat(h, key, arg, op.kind == OpKind::Prepend);
            written(r, shard, out)
        }
        OpKind::Scan { cursor, count } => scan(shard, cursor, key, count, out),
        OpKind::Dbsize => Outcome::Count(shard.snapshot_stats().keys),
        // FLUSHDB's first phase: a flush the log cannot take is refused before any
        // shard drops anything.
        OpKind::Tick if shard.is_halted() => Outcome::Failed(StoreError::StorageUnavailable),
        OpKind::Tick => Outcome::Count(shard.tick_clock()),
        OpKind::Flush { hlc, publish } => {
            shard.flush(hlc, publish);
            Outcome::Done
        }
        OpKind::Root => Outcome::Root(shard.root()),
        OpKind::Stats => Outcome::Stats(shard.snapshot_stats()),
    }
}

fn get(shard: &mut Shard, h: KeyHash, key: &[u8], out: &mut Vec<u8>) -> Outcome {
    shard.stats.gets += 1;
    match shard.get(h, key) {
        Some(v) if !representable(v) => {
            out.extend_from_slice(NOT_REPRESENTABLE);
            shard.stats.get_hits += 1;
        }
        Some(v) => {
            out.extend_from_slice(v);
            out.extend_from_slice(CRLF);
            shard.stats.get_hits += 1;
        }
        None => out.extend_from_slice(b"(null)\r\n"),
    }
    Outcome::Done
}

/// Up to `count` keys starting with `prefix` from bucket `cursor` on, one per line.
fn scan(shard: &mut Shard, cursor: u32, prefix: &[u8], count: u32, out: &mut Vec<u8>) -> Outcome {
    let mut keys = 0;
    let next = shard.scan(cursor as usize, prefix, count as usize, |k| {
        out.extend_from_slice(k);
        out.extend_from_slice(CRLF);
        keys += 1;
    });
    Outcome::Scan {
        next: if next == BUCKETS { 0 } else { next as u32 },
        keys,
    }
}

/// The reply to a write that answers `OK`.
fn written(r: Result<(), StoreError>, shard: &mut Shard, out: &mut Vec<u8>) -> Outcome {
    match r {
        Ok(()) => {
            shard.stats.writes += 1;
            out.extend_from_slice(b"OK\r\n");
            Outcome::Done
        }
        Err(e) => error(shard, e, out),
    }
}

fn count_failure(shard: &mut Shard, e: StoreError) {
    if e == StoreError::StorageFull {
        shard.stats.storage_full += 1;
    }
}

fn error(shard: &mut Shard, e: StoreError, out: &mut Vec<u8>) -> Outcome {
    count_failure(shard, e);
    out.extend_from_slice(e.to_string().as_bytes());
    out.extend_from_slice(CRLF);
    Outcome::Done
}
