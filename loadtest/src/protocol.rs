//! Wire formats of the three protocols: request encoding and reply framing and
//! validation. Pure functions of bytes; no I/O, no allocation.
//!
//! A reply is checked in two steps. `frame` finds one complete reply at the
//! start of the buffer and classifies it (`Reply`), or says "need more bytes"
//! (`Ok(None)`), or says the stream cannot be parsed any more (`Err`, a
//! desync: the connection must be closed). `validate` then compares the
//! classified reply with what the request expects; that step is shared by all
//! protocols so they cannot drift apart.

use crate::options::Protocol;
use serde::Serialize;

/// One request type of the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Op {
    Set,
    Get,
    Del,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::Set, Op::Get, Op::Del];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Set => "SET",
            Op::Get => "GET",
            Op::Del => "DEL",
        }
    }
}

/// What can be wrong with a reply or a connection. Every kind is counted and
/// reported; none is ever ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The server answered with an error (`ERROR: …`, `SERVER_ERROR …`, `-ERR …`).
    ServerError,
    /// A well-formed reply of the wrong type for the request (e.g. `STORED` to a GET).
    WrongType,
    /// A value of the wrong length.
    WrongLength,
    /// A value (or echoed key) with the right length but wrong bytes.
    WrongContent,
    /// "Absent" (or NOT_FOUND) for a key that must exist.
    Missing,
    /// A value (or DELETED) for a key that must not exist.
    Unexpected,
    /// Bytes that are not a reply of the protocol; the connection is closed.
    Desync,
    /// The server closed the connection or a socket call failed.
    Dropped,
    /// No reply within `--reply-timeout`; the connection is closed.
    Timeout,
    /// Requests still in flight on a connection that was closed for one of
    /// the reasons above.
    Unanswered,
    /// Open loop: requests due before the deadline that were never sent.
    Unsent,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::ServerError,
        ErrorKind::WrongType,
        ErrorKind::WrongLength,
        ErrorKind::WrongContent,
        ErrorKind::Missing,
        ErrorKind::Unexpected,
        ErrorKind::Desync,
        ErrorKind::Dropped,
        ErrorKind::Timeout,
        ErrorKind::Unanswered,
        ErrorKind::Unsent,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::ServerError => "server_error",
            ErrorKind::WrongType => "wrong_type",
            ErrorKind::WrongLength => "wrong_length",
            ErrorKind::WrongContent => "wrong_content",
            ErrorKind::Missing => "missing",
            ErrorKind::Unexpected => "unexpected",
            ErrorKind::Desync => "desync",
            ErrorKind::Dropped => "dropped",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unanswered => "unanswered",
            ErrorKind::Unsent => "unsent",
        }
    }
}

/// A reply that failed validation: its kind and a short fixed description.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub kind: ErrorKind,
    pub what: &'static str,
}

fn fault(kind: ErrorKind, what: &'static str) -> Fault {
    Fault { kind, what }
}

/// A complete reply, classified independently of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    Stored,
    /// A value; `key` is the key echoed by the server (memcache only).
    Value {
        key: Option<&'a [u8]>,
        data: &'a [u8],
    },
    Absent,
    Deleted,
    NotFound,
    ServerError,
    /// Any other well-formed reply.
    Other,
}

/// Whether a key exists on the server when a request reaches it, as far as
/// the connection that owns the key knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// Not touched yet in this run and no prefill: absent or the key's value.
    Unknown,
    /// Written (by the owner's SET or the prefill).
    Present,
    /// Deleted by the owner's DEL.
    Absent,
}

/// What the request in flight expects.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    pub op: Op,
    pub key: &'a [u8],
    /// The key's value (only looked at for GET).
    pub value: &'a [u8],
    /// The key's state after all earlier requests of the connection.
    pub presence: Presence,
}

/// Result of checking the start of the read buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// No complete reply yet: read more.
    Incomplete,
    /// One reply of `consumed` bytes, valid or not; the stream is still in sync.
    Reply {
        consumed: usize,
        result: Result<(), Fault>,
    },
    /// The stream cannot be parsed: close the connection.
    Desync(Fault),
}

/// Checks the reply at the start of `buf` against `expect`.
pub fn check(protocol: Protocol, expect: &Expect<'_>, buf: &[u8]) -> Check {
    match frame(protocol, expect.op, buf) {
        Ok(None) => Check::Incomplete,
        Ok(Some((consumed, reply))) => Check::Reply {
            consumed,
            result: validate(expect, reply),
        },
        Err(f) => Check::Desync(f),
    }
}

/// Compares a classified reply with the expectation.
pub fn validate(expect: &Expect<'_>, reply: Reply<'_>) -> Result<(), Fault> {
    let absent = |what| match expect.presence {
        Presence::Present => Err(fault(ErrorKind::Missing, what)),
        Presence::Unknown | Presence::Absent => Ok(()),
    };
    let present = |what| match expect.presence {
        Presence::Absent => Err(fault(ErrorKind::Unexpected, what)),
        Presence::Unknown | Presence::Present => Ok(()),
    };
    match (expect.op, reply) {
        (_, Reply::ServerError) => Err(fault(ErrorKind::ServerError, "server error reply")),
        (Op::Set, Reply::Stored) => Ok(()),
        (Op::Get, Reply::Absent) => absent("GET found no value for a key that must exist"),
        (Op::Get, Reply::Value { key, data }) => {
            present("GET found a value for a key that must not exist")?;
            if key.is_some_and(|k| k != expect.key) {
                Err(fault(ErrorKind::WrongContent, "value for another key"))
            } else if data.len() != expect.value.len() {
                Err(fault(ErrorKind::WrongLength, "value of the wrong length"))
            } else if data != expect.value {
                Err(fault(ErrorKind::WrongContent, "value with the wrong bytes"))
            } else {
                Ok(())
            }
        }
        (Op::Del, Reply::Deleted) => present("DEL deleted a key that must not exist"),
        (Op::Del, Reply::NotFound) => absent("DEL found no key that must exist"),
        _ => Err(fault(ErrorKind::WrongType, "reply of the wrong type")),
    }
}

/// Finds one complete reply at the start of `buf`: `Ok(Some((length, reply)))`,
/// `Ok(None)` if more bytes are needed, `Err` on a desync.
pub fn frame(protocol: Protocol, op: Op, buf: &[u8]) -> Result<Option<(usize, Reply<'_>)>, Fault> {
    match protocol {
        Protocol::Native => frame_native(op, buf),
        Protocol::Memcache => frame_memcache(buf),
        Protocol::Resp => frame_resp(buf),
    }
}

/// Splits off one `\r\n`-terminated line: `(line without CRLF, length with CRLF)`.
fn line(buf: &[u8]) -> Result<Option<(&[u8], usize)>, Fault> {
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err(fault(ErrorKind::Desync, "line not terminated by CRLF"));
    }
    Ok(Some((&buf[..lf - 1], lf + 1)))
}

fn frame_native(op: Op, buf: &[u8]) -> Result<Option<(usize, Reply<'_>)>, Fault> {
    let Some((text, len)) = line(buf)? else {
        return Ok(None);
    };
    let reply = if text.starts_with(b"ERROR") {
        Reply::ServerError
    } else if op == Op::Get {
        // A GET reply is the value itself, so it can only be told apart from
        // other replies by the request it answers.
        if text == b"(null)" {
            Reply::Absent
        } else {
            Reply::Value {
                key: None,
                data: text,
            }
        }
    } else {
        match text {
            b"OK" => Reply::Stored,
            b"DELETED" => Reply::Deleted,
            b"NOT_FOUND" => Reply::NotFound,
            _ => Reply::Other,
        }
    };
    Ok(Some((len, reply)))
}

fn frame_memcache(buf: &[u8]) -> Result<Option<(usize, Reply<'_>)>, Fault> {
    let Some((text, len)) = line(buf)? else {
        return Ok(None);
    };
    let reply = match text {
        b"STORED" => Reply::Stored,
        b"END" => Reply::Absent,
        b"DELETED" => Reply::Deleted,
        b"NOT_FOUND" => Reply::NotFound,
        _ if text == b"ERROR"
            || text.starts_with(b"SERVER_ERROR")
            || text.starts_with(b"CLIENT_ERROR") =>
        {
            Reply::ServerError
        }
        _ if text.starts_with(b"VALUE ") => return frame_memcache_value(buf, text, len),
        _ => Reply::Other,
    };
    Ok(Some((len, reply)))
}

/// `VALUE <key> <flags> <bytes>\r\n<data>\r\nEND\r\n`
fn frame_memcache_value<'a>(
    buf: &'a [u8],
    header: &'a [u8],
    header_len: usize,
) -> Result<Option<(usize, Reply<'a>)>, Fault> {
    let mut fields = header.split(|&b| b == b' ').skip(1);
    let (Some(key), Some(_flags), Some(bytes)) = (fields.next(), fields.next(), fields.next())
    else {
        return Err(fault(ErrorKind::Desync, "malformed VALUE line"));
    };
    let data_len = parse_decimal(bytes).ok_or(fault(ErrorKind::Desync, "bad VALUE length"))?;
    let data_end = header_len
        .checked_add(data_len)
        .ok_or(fault(ErrorKind::Desync, "bad VALUE length"))?;
    const TRAILER: &[u8] = b"\r\nEND\r\n";
    if buf.len() < data_end + TRAILER.len() {
        return Ok(None);
    }
    if &buf[data_end..data_end + TRAILER.len()] != TRAILER {
        return Err(fault(ErrorKind::Desync, "VALUE data not followed by END"));
    }
    let reply = Reply::Value {
        key: Some(key),
        data: &buf[header_len..data_end],
    };
    Ok(Some((data_end + TRAILER.len(), reply)))
}

/// Nesting limit for RESP arrays: a reply to SET/GET/DEL is never nested, so
/// deep nesting is garbage, and the limit bounds the recursion.
const RESP_DEPTH_MAX: usize = 4;

fn frame_resp(buf: &[u8]) -> Result<Option<(usize, Reply<'_>)>, Fault> {
    let Some(len) = resp_len(buf, 0)? else {
        return Ok(None);
    };
    let (text, header_len) = line(buf)?.expect("resp_len saw a whole frame");
    let reply = match text[0] {
        b'+' if text == b"+OK" => Reply::Stored,
        b'-' => Reply::ServerError,
        b':' if text == b":1" => Reply::Deleted,
        b':' if text == b":0" => Reply::NotFound,
        b'$' if text == b"$-1" => Reply::Absent,
        b'$' => Reply::Value {
            key: None,
            data: &buf[header_len..len - 2],
        },
        _ => Reply::Other,
    };
    Ok(Some((len, reply)))
}

/// Length of the complete RESP2 value at the start of `buf`, `None` if incomplete.
fn resp_len(buf: &[u8], depth: usize) -> Result<Option<usize>, Fault> {
    if depth > RESP_DEPTH_MAX {
        return Err(fault(ErrorKind::Desync, "RESP array nested too deep"));
    }
    let Some((text, header_len)) = line(buf)? else {
        return Ok(None);
    };
    let bad = fault(ErrorKind::Desync, "malformed RESP header");
    match text.first() {
        Some(b'+' | b'-') => Ok(Some(header_len)),
        Some(b':') => parse_signed(&text[1..])
            .map(|_| Some(header_len))
            .ok_or(bad),
        Some(b'$') if &text[1..] == b"-1" => Ok(Some(header_len)),
        Some(b'$') => {
            let n = parse_decimal(&text[1..]).ok_or(bad)?;
            let end = header_len.checked_add(n).ok_or(bad)?;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(fault(ErrorKind::Desync, "bulk string not followed by CRLF"));
            }
            Ok(Some(end + 2))
        }
        Some(b'*') if &text[1..] == b"-1" => Ok(Some(header_len)),
        Some(b'*') => {
            let n = parse_decimal(&text[1..]).ok_or(bad)?;
            let mut at = header_len;
            for _ in 0..n {
                match resp_len(&buf[at..], depth + 1)? {
                    Some(len) => at += len,
                    None => return Ok(None),
                }
            }
            Ok(Some(at))
        }
        _ => Err(fault(ErrorKind::Desync, "unknown RESP type byte")),
    }
}

/// Parses a non-empty run of ASCII digits (at most 18, so it cannot overflow).
fn parse_decimal(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0usize, |n, &d| n * 10 + usize::from(d - b'0')),
    )
}

fn parse_signed(text: &[u8]) -> Option<i64> {
    match text.split_first() {
        Some((b'-', rest)) => parse_decimal(rest).map(|n| -(n as i64)),
        _ => parse_decimal(text).map(|n| n as i64),
    }
}

/// Appends the decimal form of `n` without allocating.
pub fn push_decimal(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends one request to `out`. `value` is only used for SET.
pub fn encode(protocol: Protocol, op: Op, key: &[u8], value: &[u8], out: &mut Vec<u8>) {
    match protocol {
        Protocol::Native => {
            let verb: &[u8] = match op {
                Op::Set => b"SET ",
                Op::Get => b"GET ",
                Op::Del => b"DEL ",
            };
            out.extend_from_slice(verb);
            out.extend_from_slice(key);
            if op == Op::Set {
                out.push(b' ');
                out.extend_from_slice(value);
            }
            out.extend_from_slice(b"\r\n");
        }
        Protocol::Memcache => {
            let verb: &[u8] = match op {
                Op::Set => b"set ",
                Op::Get => b"get ",
                Op::Del => b"delete ",
            };
            out.extend_from_slice(verb);
            out.extend_from_slice(key);
            if op == Op::Set {
                out.extend_from_slice(b" 0 0 ");
                push_decimal(out, value.len());
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(value);
            }
            out.extend_from_slice(b"\r\n");
        }
        Protocol::Resp => {
            let (head, verb): (&[u8], &[u8]) = match op {
                Op::Set => (b"*3\r\n", b"SET"),
                Op::Get => (b"*2\r\n", b"GET"),
                Op::Del => (b"*2\r\n", b"DEL"),
            };
            out.extend_from_slice(head);
            push_bulk(out, verb);
            push_bulk(out, key);
            if op == Op::Set {
                push_bulk(out, value);
            }
        }
    }
}

fn push_bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'$');
    push_decimal(out, bytes.len());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"key:042";
    const VALUE: &[u8] = b"abcdefgh";

    fn expect(op: Op, presence: Presence) -> Expect<'static> {
        Expect {
            op,
            key: KEY,
            value: VALUE,
            presence,
        }
    }

    fn kind(protocol: Protocol, op: Op, p: Presence, bytes: &[u8]) -> Result<(), ErrorKind> {
        match check(protocol, &expect(op, p), bytes) {
            Check::Reply { consumed, result } => {
                assert_eq!(
                    consumed,
                    bytes.len(),
                    "reply should consume all of {bytes:?}"
                );
                result.map_err(|f| f.kind)
            }
            Check::Desync(f) => Err(f.kind),
            Check::Incomplete => panic!("incomplete: {bytes:?}"),
        }
    }

    /// (protocol, op, presence expected, reply, expected outcome).
    type Case = (Protocol, Op, Presence, &'static [u8], Result<(), ErrorKind>);

    /// One table for all three protocols.
    #[rustfmt::skip]
    fn cases() -> Vec<Case> {
        use ErrorKind::*;
        use Op::*;
        use Presence::*;
        use Protocol::*;
        vec![
            // native
            (Native, Set, Present, b"OK\r\n", Ok(())),
            (Native, Set, Present, b"DELETED\r\n", Err(WrongType)),
            (Native, Set, Present, b"ERROR: Storage full\r\n", Err(ServerError)),
            (Native, Get, Present, b"abcdefgh\r\n", Ok(())),
            (Native, Get, Present, b"abcdefg\r\n", Err(WrongLength)),
            (Native, Get, Present, b"abcdefgX\r\n", Err(WrongContent)),
            (Native, Get, Present, b"(null)\r\n", Err(Missing)),
            (Native, Get, Unknown, b"(null)\r\n", Ok(())),
            (Native, Get, Present, b"ERROR: unknown command\r\n", Err(ServerError)),
            (Native, Get, Present, b"abcdefgh\n", Err(Desync)),
            (Native, Del, Present, b"DELETED\r\n", Ok(())),
            (Native, Del, Present, b"NOT_FOUND\r\n", Err(Missing)),
            (Native, Del, Unknown, b"NOT_FOUND\r\n", Ok(())),
            (Native, Del, Unknown, b"OK\r\n", Err(WrongType)),
            (Native, Get, Absent, b"(null)\r\n", Ok(())),
            (Native, Get, Absent, b"abcdefgh\r\n", Err(Unexpected)),
            (Native, Get, Unknown, b"abcdefgX\r\n", Err(WrongContent)),
            (Native, Del, Absent, b"NOT_FOUND\r\n", Ok(())),
            (Native, Del, Absent, b"DELETED\r\n", Err(Unexpected)),
            (Native, Del, Unknown, b"DELETED\r\n", Ok(())),
            // memcache
            (Memcache, Set, Present, b"STORED\r\n", Ok(())),
            (Memcache, Set, Present, b"NOT_STORED\r\n", Err(WrongType)),
            (Memcache, Set, Present, b"SERVER_ERROR out of memory\r\n", Err(ServerError)),
            (Memcache, Set, Present, b"ERROR\r\n", Err(ServerError)),
            (Memcache, Set, Present, b"VALUE key:042 0 8\r\nabcdefgh\r\nEND\r\n", Err(WrongType)),
            (Memcache, Get, Present, b"VALUE key:042 0 8\r\nabcdefgh\r\nEND\r\n", Ok(())),
            (Memcache, Get, Present, b"VALUE key:043 0 8\r\nabcdefgh\r\nEND\r\n", Err(WrongContent)),
            (Memcache, Get, Present, b"VALUE key:042 0 7\r\nabcdefg\r\nEND\r\n", Err(WrongLength)),
            (Memcache, Get, Present, b"VALUE key:042 0 8\r\nabcdXfgh\r\nEND\r\n", Err(WrongContent)),
            (Memcache, Get, Present, b"VALUE key:042 0 7\r\nabcdefgh\r\nEND\r\n", Err(Desync)),
            (Memcache, Get, Present, b"VALUE key:042 0 x\r\n", Err(Desync)),
            (Memcache, Get, Present, b"END\r\n", Err(Missing)),
            (Memcache, Get, Unknown, b"END\r\n", Ok(())),
            (Memcache, Get, Present, b"STORED\r\n", Err(WrongType)),
            (Memcache, Del, Present, b"DELETED\r\n", Ok(())),
            (Memcache, Del, Present, b"NOT_FOUND\r\n", Err(Missing)),
            (Memcache, Get, Absent, b"VALUE key:042 0 8\r\nabcdefgh\r\nEND\r\n", Err(Unexpected)),
            (Memcache, Del, Absent, b"DELETED\r\n", Err(Unexpected)),
            (Memcache, Del, Present, b"CLIENT_ERROR bad command line format\r\n", Err(ServerError)),
            // resp
            (Resp, Set, Present, b"+OK\r\n", Ok(())),
            (Resp, Set, Present, b"+QUEUED\r\n", Err(WrongType)),
            (Resp, Set, Present, b"-ERR wrong number of arguments\r\n", Err(ServerError)),
            (Resp, Set, Present, b"*2\r\n$1\r\na\r\n:1\r\n", Err(WrongType)),
            (Resp, Get, Present, b"$8\r\nabcdefgh\r\n", Ok(())),
            (Resp, Get, Present, b"$7\r\nabcdefg\r\n", Err(WrongLength)),
            (Resp, Get, Present, b"$8\r\nabcdefgX\r\n", Err(WrongContent)),
            (Resp, Get, Present, b"$7\r\nabcdefgh\r\n", Err(Desync)),
            (Resp, Get, Present, b"$-1\r\n", Err(Missing)),
            (Resp, Get, Unknown, b"$-1\r\n", Ok(())),
            (Resp, Get, Present, b":8\r\n", Err(WrongType)),
            (Resp, Get, Present, b"?what\r\n", Err(Desync)),
            (Resp, Del, Present, b":1\r\n", Ok(())),
            (Resp, Del, Present, b":0\r\n", Err(Missing)),
            (Resp, Del, Unknown, b":0\r\n", Ok(())),
            (Resp, Get, Absent, b"$-1\r\n", Ok(())),
            (Resp, Get, Absent, b"$8\r\nabcdefgh\r\n", Err(Unexpected)),
            (Resp, Del, Absent, b":1\r\n", Err(Unexpected)),
            (Resp, Del, Unknown, b":2\r\n", Err(WrongType)),
            (Resp, Del, Unknown, b":x\r\n", Err(Desync)),
        ]
    }

    #[test]
    fn replies_are_classified_and_validated() {
        for (protocol, op, presence, bytes, want) in cases() {
            assert_eq!(
                kind(protocol, op, presence, bytes),
                want,
                "{protocol:?} {op:?} {presence:?} {:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    /// Every strict prefix of a reply is "read more", never an error or a
    /// reply: a reply split across reads at any byte is handled.
    #[test]
    fn every_prefix_of_a_reply_is_incomplete() {
        for (protocol, op, presence, bytes, _) in cases() {
            for cut in 0..bytes.len() {
                let prefix = &bytes[..cut];
                let got = check(protocol, &expect(op, presence), prefix);
                // A desync may be seen early (e.g. a bad type byte) but never
                // a complete reply.
                assert!(
                    matches!(got, Check::Incomplete | Check::Desync(_)),
                    "{protocol:?} {op:?} prefix {:?} gave {got:?}",
                    String::from_utf8_lossy(prefix)
                );
            }
        }
    }

    /// Extra bytes after a reply are left for the next request, not swallowed.
    #[test]
    fn extra_bytes_after_a_reply_are_not_consumed() {
        for (protocol, op, presence, bytes, want) in cases() {
            if want == Err(ErrorKind::Desync) {
                continue;
            }
            let mut long = bytes.to_vec();
            long.extend_from_slice(b"+garbage\r\n");
            match check(protocol, &expect(op, presence), &long) {
                Check::Reply { consumed, .. } => assert_eq!(consumed, bytes.len()),
                other => panic!(
                    "{protocol:?} {:?} gave {other:?}",
                    String::from_utf8_lossy(&long)
                ),
            }
        }
    }

    #[test]
    fn requests_are_encoded_exactly() {
        let mut out = Vec::new();
        encode(Protocol::Native, Op::Set, b"k1", b"vv", &mut out);
        encode(Protocol::Native, Op::Get, b"k1", b"", &mut out);
        encode(Protocol::Native, Op::Del, b"k1", b"", &mut out);
        assert_eq!(out, b"SET k1 vv\r\nGET k1\r\nDEL k1\r\n");
        out.clear();
        encode(Protocol::Memcache, Op::Set, b"k1", b"vv", &mut out);
        encode(Protocol::Memcache, Op::Get, b"k1", b"", &mut out);
        encode(Protocol::Memcache, Op::Del, b"k1", b"", &mut out);
        assert_eq!(out, b"set k1 0 0 2\r\nvv\r\nget k1\r\ndelete k1\r\n");
        out.clear();
        encode(Protocol::Resp, Op::Set, b"k1", b"vv", &mut out);
        encode(Protocol::Resp, Op::Get, b"k1", b"", &mut out);
        assert_eq!(
            out,
            b"*3\r\n$3\r\nSET\r\n$2\r\nk1\r\n$2\r\nvv\r\n*2\r\n$3\r\nGET\r\n$2\r\nk1\r\n"
        );
    }

    #[test]
    fn decimals_round_trip() {
        for n in [0usize, 7, 10, 123_456_789, usize::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        assert_eq!(parse_decimal(b"0012"), Some(12));
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"1a"), None);
        assert_eq!(parse_signed(b"-3"), Some(-3));
    }
}
