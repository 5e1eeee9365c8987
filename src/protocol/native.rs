//! The native text protocol: framing (bytes → lines) and parsing (line → [`Command`]).
//!
//! Pure functions of bytes: no I/O, no allocation. An incomplete line is "read more",
//! not an error. Every rejection is a [`ProtocolError`] whose `Display` is the exact
//! reply line (without `\r\n`). docs/PROTOCOL.md is the user-facing contract.

use crate::limits::{is_valid_key, BUCKETS, KEY_BYTES_MAX, SYNC_MSG_BYTES_MAX};

/// `SCAN` page size when none is given, and the largest allowed.
pub const SCAN_COUNT_DEFAULT: u32 = 100;
pub const SCAN_COUNT_MAX: u32 = 1000;

/// One framing step over the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line (without its `\n` or `\r\n`) and the bytes it used up.
    Line(&'a [u8], usize),
    /// No newline yet and still within the limit: read more.
    Incomplete,
    /// More than `line_bytes_max` bytes without a newline.
    TooLong,
}

/// Find the next line in `buf`. Lines end in `\n`; one `\r` before it is dropped.
/// `line_bytes_max` limits the line without its ending.
pub fn next_line(buf: &[u8], line_bytes_max: usize) -> Frame<'_> {
    match memchr::memchr(b'\n', buf) {
        Some(n) => {
            let line = &buf[..n];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() <= line_bytes_max {
                Frame::Line(line, n + 1)
            } else {
                Frame::TooLong
            }
        }
        // `+ 1`: room for the `\r` of a line that is exactly at the limit.
        None if buf.len() > line_bytes_max + 1 => Frame::TooLong,
        None => Frame::Incomplete,
    }
}

/// What the [`Framer`] found next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// A complete line and the bytes it used up.
    Line(&'a [u8], usize),
    /// An over-long line starts here: answer it with [`ProtocolError::LineTooLong`].
    /// The framer now skips input up to the end of that line.
    TooLong,
    /// Bytes of an over-long line, dropped.
    Skip(usize),
    /// Nothing more to do until more bytes arrive.
    NeedMore,
}

/// Line framing with resynchronisation: after an over-long line, everything up to its
/// newline is skipped and framing resumes with the next line, so one bad line costs
/// one error reply, not the connection. The state survives between reads.
#[derive(Debug)]
pub struct Framer {
    line_bytes_max: usize,
    discarding: bool,
}

impl Framer {
    pub fn new(line_bytes_max: usize) -> Framer {
        Framer {
            line_bytes_max,
            discarding: false,
        }
    }

    pub fn line_bytes_max(&self) -> usize {
        self.line_bytes_max
    }

    /// The next step over `buf`, the input not yet consumed. Never `Skip(0)`.
    pub fn next<'a>(&mut self, buf: &'a [u8]) -> Step<'a> {
        if self.discarding {
            return match memchr::memchr(b'\n', buf) {
                Some(i) => {
                    self.discarding = false;
                    Step::Skip(i + 1)
                }
                None if buf.is_empty() => Step::NeedMore,
                None => Step::Skip(buf.len()),
            };
        }
        match next_line(buf, self.line_bytes_max) {
            Frame::Line(line, used) => Step::Line(line, used),
            Frame::Incomplete => Step::NeedMore,
            Frame::TooLong => {
                self.discarding = true;
                Step::TooLong
            }
        }
    }
}

/// A parsed command. Slices borrow from the received line.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Command<'a> {
    Get(&'a [u8]),
    Set(&'a [u8], &'a [u8]),
    /// One key or several (several get a count reply).
    Del(Args<'a>),
    Exists(Args<'a>),
    Mget(Args<'a>),
    /// Validated: an even, non-zero number of tokens, every key within limits.
    Mset(Args<'a>),
    /// INCR/DECR: the key and the signed amount to add.
    Incr(&'a [u8], i64),
    Append(&'a [u8], &'a [u8]),
    Prepend(&'a [u8], &'a [u8]),
    Scan {
        prefix: &'a [u8],
        cursor: u32,
        count: u32,
    },
    Dbsize,
    Ping(Option<&'a [u8]>),
    Echo(&'a [u8]),
    Info,
    Stats,
    Version,
    Flushdb,
    Hash,
    HashShards,
    Shutdown,
    Quit,
    /// `SYNC.MSG <bytes>`: an anti-entropy message follows the line (docs/ANTI_ENTROPY.md).
    SyncMsg(u32),
    /// `SYNC <host:port>`: run one anti-entropy exchange with that peer now.
    Sync(&'a [u8]),
    /// Copy the node's data directory into a new backup (docs/PERSISTENCE.md).
    Backup,
}

impl Command<'_> {
    /// Whether the command reads or writes the data set, and so must wait while the node
    /// is LOADING (node/bootstrap.rs). Exhaustive, so every new command decides.
    pub fn touches_data(&self) -> bool {
        match self {
            Command::Get(_)
            | Command::Set(..)
            | Command::Del(_)
            | Command::Exists(_)
            | Command::Mget(_)
            | Command::Mset(_)
            | Command::Incr(..)
            | Command::Append(..)
            | Command::Prepend(..)
            | Command::Scan { .. }
            | Command::Dbsize
            | Command::Flushdb => true,
            Command::Ping(_)
            | Command::Echo(_)
            | Command::Info
            | Command::Stats
            | Command::Version
            | Command::Hash
            | Command::HashShards
            | Command::Shutdown
            | Command::Quit
            | Command::SyncMsg(_)
            | Command::Sync(_)
            | Command::Backup => false,
        }
    }
}

/// Space-separated tokens (keys, or MSET's key/value pairs), iterated without allocating.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Args<'a>(&'a [u8]);

impl<'a> Args<'a> {
    pub fn new(tokens: &'a [u8]) -> Args<'a> {
        Args(tokens)
    }
    pub fn as_bytes(self) -> &'a [u8] {
        self.0
    }
    /// The first `n` tokens, and the rest (possibly empty).
    pub fn split_after(self, n: usize) -> (Args<'a>, Args<'a>) {
        let mut seen = 0;
        let mut at = 0;
        while at < self.0.len() && seen < n {
            while at < self.0.len() && self.0[at] == b' ' {
                at += 1;
            }
            while at < self.0.len() && self.0[at] != b' ' {
                at += 1;
            }
            seen += 1;
        }
        (Args(&self.0[..at]), Args(&self.0[at..]))
    }
    pub fn iter(self) -> impl Iterator<Item = &'a [u8]> {
        self.0.split(|&b| b == b' ').filter(|t| !t.is_empty())
    }
    pub fn count(self) -> usize {
        self.iter().count()
    }
    /// No token at all (constant time after leading spaces, unlike `count() == 0`).
    pub fn is_empty(self) -> bool {
        self.iter().next().is_none()
    }
}

/// Why a line was rejected. `Display` gives the reply line.
#[derive(Debug, PartialEq, Eq, Clone, Copy, thiserror::Error)]
pub enum ProtocolError {
    #[error("ERROR: Invalid command")]
    InvalidCommand,
    #[error("ERROR: Missing arguments")]
    MissingArguments,
    #[error("ERROR: Too many arguments")]
    TooManyArguments,
    #[error("ERROR: Key too long (max {KEY_BYTES_MAX} bytes)")]
    KeyTooLong,
    #[error("ERROR: Key must not contain whitespace or control characters")]
    InvalidKey,
    #[error("ERROR: Line is not valid UTF-8")]
    InvalidUtf8,
    #[error("ERROR: Line too long (max {0} bytes)")]
    LineTooLong(usize),
    #[error("ERROR: Amount is not an integer")]
    AmountNotInteger,
    #[error("ERROR: MSET needs key value pairs")]
    MsetOddArguments,
    #[error("ERROR: Invalid SCAN cursor")]
    InvalidCursor,
    #[error("ERROR: SCAN count must be 1-{SCAN_COUNT_MAX}")]
    InvalidCount,
    #[error("ERROR: Unknown HASH option (expected SHARDS)")]
    UnknownHashOption,
    #[error("ERROR: SYNC.MSG length must be 1-{SYNC_MSG_BYTES_MAX}")]
    InvalidSyncLength,
}

/// Parse one line (without its line ending). `Ok(None)` for a blank line, which is
/// ignored without a reply, as Redis does for its inline protocol.
pub fn parse(line: &[u8]) -> Result<Option<Command<'_>>, ProtocolError> {
    if std::str::from_utf8(line).is_err() {
        return Err(ProtocolError::InvalidUtf8);
    }
    let line = trim_start(line);
    if line.is_empty() {
        return Ok(None);
    }
    let (name, rest) = split_token(line);
    let rest = trim_start(rest);
    let cmd = match data_command(name, rest)? {
        Some(cmd) => cmd,
        None => server_command(name, rest, line)?,
    };
    Ok(Some(cmd))
}

/// A command on the data set named `name`, its arguments `rest`; `None` for any other
/// name.
fn data_command<'a>(name: &[u8], rest: &'a [u8]) -> Result<Option<Command<'a>>, ProtocolError> {
    let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
    let cmd = if is("GET") {
        Command::Get(only_key(rest)?)
    } else if is("SET") {
        let (k, v) = key_and_value(rest)?;
        Command::Set(k, v)
    } else if is("DEL") || is("DELETE") {
        Command::Del(keys(rest)?)
    } else if is("EXISTS") {
        Command::Exists(keys(rest)?)
    } else if is("MGET") {
        Command::Mget(keys(rest)?)
    } else if is("MSET") {
        Command::Mset(pairs(rest)?)
    } else if is("INCR") || is("INC") {
        let (k, amount) = key_and_amount(rest)?;
        Command::Incr(k, amount)
    } else if is("DECR") || is("DEC") {
        let (k, amount) = key_and_amount(rest)?;
        Command::Incr(
            k,
            amount
                .checked_neg()
                .ok_or(ProtocolError::AmountNotInteger)?,
        )
    } else if is("APPEND") {
        let (k, v) = key_and_value(rest)?;
        Command::Append(k, v)
    } else if is("PREPEND") {
        let (k, v) = key_and_value(rest)?;
        Command::Prepend(k, v)
    } else if is("SCAN") {
        scan(rest)?
    } else if is("DBSIZE") {
        no_more(rest)?;
        Command::Dbsize
    } else if is("FLUSHDB") {
        no_more(rest)?;
        Command::Flushdb
    } else {
        return Ok(None);
    };
    Ok(Some(cmd))
}

/// Any other command: `name`, its arguments `rest`, and the whole `line` (whose
/// verbatim rest PING and ECHO send back).
fn server_command<'a>(
    name: &[u8],
    rest: &'a [u8],
    line: &'a [u8],
) -> Result<Command<'a>, ProtocolError> {
    let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
    let cmd = if is("PING") {
        // The message is the rest of the line, verbatim, like a SET value.
        Command::Ping(line.get(name.len() + 1..).filter(|_| !rest.is_empty()))
    } else if is("ECHO") {
        match line.get(name.len() + 1..) {
            Some(msg) if !rest.is_empty() => Command::Echo(msg),
            _ => return Err(ProtocolError::MissingArguments),
        }
    } else if is("SYNC.MSG") {
        Command::SyncMsg(sync_length(rest)?)
    } else if is("SYNC") {
        Command::Sync(only_key(rest)?)
    } else if is("HASH") {
        match split_token(rest) {
            (b"", _) => Command::Hash,
            (opt, tail) if opt.eq_ignore_ascii_case(b"SHARDS") => {
                no_more(tail)?;
                Command::HashShards
            }
            _ => return Err(ProtocolError::UnknownHashOption),
        }
    } else {
        let cmd = if is("INFO") {
            Command::Info
        } else if is("STATS") {
            Command::Stats
        } else if is("VERSION") {
            Command::Version
        } else if is("SHUTDOWN") {
            Command::Shutdown
        } else if is("BACKUP") {
            Command::Backup
        } else if is("QUIT") {
            Command::Quit
        } else {
            return Err(ProtocolError::InvalidCommand);
        };
        no_more(rest)?;
        cmd
    };
    Ok(cmd)
}

/// `SYNC.MSG <bytes>`: the body length, within bounds.
fn sync_length(rest: &[u8]) -> Result<u32, ProtocolError> {
    let (n, tail) = split_token(rest);
    no_more(tail)?;
    std::str::from_utf8(n)
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|n| (1..=SYNC_MSG_BYTES_MAX).contains(n))
        .ok_or(ProtocolError::InvalidSyncLength)
}

fn trim_start(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    &s[n..]
}

/// The first space-separated token and what follows it (starting at the space).
fn split_token(s: &[u8]) -> (&[u8], &[u8]) {
    let end = memchr::memchr(b' ', s).unwrap_or(s.len());
    (&s[..end], &s[end..])
}

fn no_more(rest: &[u8]) -> Result<(), ProtocolError> {
    if trim_start(rest).is_empty() {
        Ok(())
    } else {
        Err(ProtocolError::TooManyArguments)
    }
}

/// `key` if [`is_valid_key`], else the reply that says why not.
fn check_key(key: &[u8]) -> Result<&[u8], ProtocolError> {
    if is_valid_key(key) {
        Ok(key)
    } else if key.is_empty() {
        Err(ProtocolError::MissingArguments)
    } else if key.len() > KEY_BYTES_MAX {
        Err(ProtocolError::KeyTooLong)
    } else {
        Err(ProtocolError::InvalidKey)
    }
}

fn only_key(rest: &[u8]) -> Result<&[u8], ProtocolError> {
    let (key, tail) = split_token(rest);
    let key = check_key(key)?;
    no_more(tail)?;
    Ok(key)
}

/// `<key> <value>`: the value is everything after the key and one space, verbatim.
fn key_and_value(rest: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
    let (key, tail) = split_token(rest);
    let key = check_key(key)?;
    match tail.split_first() {
        Some((b' ', value)) => Ok((key, value)),
        _ => Err(ProtocolError::MissingArguments),
    }
}

fn key_and_amount(rest: &[u8]) -> Result<(&[u8], i64), ProtocolError> {
    let (key, tail) = split_token(rest);
    let key = check_key(key)?;
    let (amount, tail) = split_token(trim_start(tail));
    no_more(tail)?;
    if amount.is_empty() {
        return Ok((key, 1));
    }
    Ok((
        key,
        parse_int(amount).ok_or(ProtocolError::AmountNotInteger)?,
    ))
}

fn parse_int<T: std::str::FromStr>(token: &[u8]) -> Option<T> {
    std::str::from_utf8(token).ok()?.parse().ok()
}

fn keys(rest: &[u8]) -> Result<Args<'_>, ProtocolError> {
    let args = Args(rest);
    if args.is_empty() {
        return Err(ProtocolError::MissingArguments);
    }
    for key in args.iter() {
        check_key(key)?;
    }
    Ok(args)
}

fn pairs(rest: &[u8]) -> Result<Args<'_>, ProtocolError> {
    let args = Args(rest);
    match args.count() {
        0 | 1 => return Err(ProtocolError::MissingArguments),
        n if n % 2 == 1 => return Err(ProtocolError::MsetOddArguments),
        _ => {}
    }
    for key in args.iter().step_by(2) {
        check_key(key)?;
    }
    Ok(args)
}

/// `SCAN <pattern> [cursor] [count]`. The pattern is a key prefix; one trailing `*` is
/// dropped, so `user:*` and `user:` agree and `*` alone matches every key.
fn scan(rest: &[u8]) -> Result<Command<'_>, ProtocolError> {
    let (pattern, tail) = split_token(rest);
    if pattern.is_empty() {
        return Err(ProtocolError::MissingArguments);
    }
    let prefix = pattern.strip_suffix(b"*").unwrap_or(pattern);
    let (cursor, tail) = split_token(trim_start(tail));
    let (count, tail) = split_token(trim_start(tail));
    no_more(tail)?;
    let cursor = match cursor {
        b"" => 0,
        c => parse_int::<u32>(c)
            .filter(|&c| (c as usize) < BUCKETS)
            .ok_or(ProtocolError::InvalidCursor)?,
    };
    let count = match count {
        b"" => SCAN_COUNT_DEFAULT,
        c => parse_int::<u32>(c)
            .filter(|c| (1..=SCAN_COUNT_MAX).contains(c))
            .ok_or(ProtocolError::InvalidCount)?,
    };
    Ok(Command::Scan {
        prefix,
        cursor,
        count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Command as C;
    use ProtocolError as E;

    fn p(line: &str) -> Result<Option<Command<'_>>, ProtocolError> {
        parse(line.as_bytes())
    }
    fn ok(line: &str) -> Command<'_> {
        p(line).unwrap().unwrap()
    }
    fn keys_of(a: Args<'_>) -> Vec<&str> {
        a.iter().map(|k| std::str::from_utf8(k).unwrap()).collect()
    }

    #[test]
    fn framing_finds_lines_and_asks_for_more() {
        assert_eq!(next_line(b"GET a\r\nGET b", 100), Frame::Line(b"GET a", 7));
        assert_eq!(next_line(b"GET a\nrest", 100), Frame::Line(b"GET a", 6));
        assert_eq!(next_line(b"GET a", 100), Frame::Incomplete);
        assert_eq!(next_line(b"", 100), Frame::Incomplete);
        assert_eq!(next_line(b"GET a\r", 100), Frame::Incomplete);
        assert_eq!(next_line(b"\r\n", 100), Frame::Line(b"", 2));
    }

    #[test]
    fn framing_enforces_the_line_limit() {
        assert_eq!(next_line(b"0123456789a", 9), Frame::TooLong);
        assert_eq!(next_line(b"012345678\r", 9), Frame::Incomplete);
        assert_eq!(
            next_line(b"012345678\r\n", 9),
            Frame::Line(b"012345678", 11)
        );
        assert_eq!(next_line(b"012345678\n", 9), Frame::Line(b"012345678", 10));
        assert_eq!(next_line(b"0123456789\n", 9), Frame::TooLong);
    }

    #[test]
    fn framer_resynchronises_after_an_over_long_line() {
        let mut f = Framer::new(5);
        let input = b"GET a\nTOO LONG LINE\nGET b\n";
        assert_eq!(f.next(input), Step::Line(b"GET a", 6));
        assert_eq!(f.next(&input[6..]), Step::TooLong);
        assert_eq!(f.next(&input[6..]), Step::Skip(14));
        assert_eq!(f.next(&input[20..]), Step::Line(b"GET b", 6));
        assert_eq!(f.next(b""), Step::NeedMore);
        // An over-long line split across reads keeps being skipped until its newline.
        let mut f = Framer::new(4);
        assert_eq!(f.next(b"0123456"), Step::TooLong);
        assert_eq!(f.next(b"0123456"), Step::Skip(7));
        assert_eq!(f.next(b""), Step::NeedMore);
        assert_eq!(f.next(b"789\nPING\n"), Step::Skip(4));
        assert_eq!(f.next(b"PING\n"), Step::Line(b"PING", 5));
    }

    #[test]
    fn args_split_after() {
        let a = Args::new(b"a bb  ccc d");
        let (head, rest) = a.split_after(2);
        assert_eq!(head.iter().collect::<Vec<_>>(), [&b"a"[..], b"bb"]);
        assert_eq!(rest.iter().collect::<Vec<_>>(), [&b"ccc"[..], b"d"]);
        let (head, rest) = a.split_after(9);
        assert_eq!(head.count(), 4);
        assert_eq!(rest.count(), 0);
    }

    #[test]
    fn basic_commands() {
        assert_eq!(ok("GET a"), C::Get(b"a"));
        assert_eq!(ok("get a"), C::Get(b"a"));
        assert_eq!(ok("SET a b"), C::Set(b"a", b"b"));
        assert_eq!(ok("sEt a b"), C::Set(b"a", b"b"));
        assert_eq!(ok("DEL a"), C::Del(Args(b"a")));
        assert_eq!(ok("DELETE a"), C::Del(Args(b"a")));
        assert_eq!(ok("DEL a b"), C::Del(Args(b"a b")));
        assert_eq!(ok("  GET   a"), C::Get(b"a"));
    }

    #[test]
    fn set_value_is_the_verbatim_rest_of_the_line() {
        assert_eq!(ok("SET m Hello World"), C::Set(b"m", b"Hello World"));
        assert_eq!(ok("SET m  two  spaces "), C::Set(b"m", b" two  spaces "));
        assert_eq!(
            ok(r#"SET c {"host":"x", "port":1}"#),
            C::Set(b"c", br#"{"host":"x", "port":1}"#)
        );
        assert_eq!(ok("SET e "), C::Set(b"e", b""));
        assert_eq!(ok("APPEND k  x"), C::Append(b"k", b" x"));
        assert_eq!(ok("PREPEND k x y"), C::Prepend(b"k", b"x y"));
    }

    #[test]
    fn missing_and_extra_arguments() {
        for line in [
            "GET", "SET", "SET k", "DEL", "DELETE ", "EXISTS", "MGET", "MSET", "MSET a", "INCR",
            "DECR", "APPEND k", "PREPEND", "SCAN", "ECHO", "ECHO ",
        ] {
            assert_eq!(p(line), Err(E::MissingArguments), "{line:?}");
        }
        for line in [
            "GET a b",
            "DBSIZE x",
            "INCR a 1 2",
            "HASH SHARDS x",
            "FLUSHDB now",
            "SCAN a 0 10 x",
        ] {
            assert_eq!(p(line), Err(E::TooManyArguments), "{line:?}");
        }
    }

    #[test]
    fn unknown_commands_and_bad_input() {
        assert_eq!(p("FOO a"), Err(E::InvalidCommand));
        assert_eq!(p("GETX a"), Err(E::InvalidCommand));
        assert_eq!(parse(b"SET a \xff\xfe"), Err(E::InvalidUtf8));
        let long = format!("GET {}", "k".repeat(KEY_BYTES_MAX + 1));
        assert_eq!(p(&long), Err(E::KeyTooLong));
        let ok_key = format!("GET {}", "k".repeat(KEY_BYTES_MAX));
        assert!(p(&ok_key).is_ok());
        assert_eq!(p("HASH ROOTS"), Err(E::UnknownHashOption));
    }

    #[test]
    fn keys_with_whitespace_or_control_bytes_are_refused() {
        // A tab, a NUL or DEL inside a key would be stored and then written back raw by
        // SCAN; every key rule lives in `is_valid_key`, which peers' keys meet too.
        for line in [
            "GET a\tb",
            "SET a\x01b v",
            "DEL ok a\x7fb",
            "EXISTS a\x00",
            "MGET a b\x1b",
            "MSET k\tx 1",
            "INCR \x0bn",
            "APPEND a\rb x",
        ] {
            assert_eq!(
                p(line).map_err(|e| e.to_string()),
                Err("ERROR: Key must not contain whitespace or control characters".into()),
                "{line:?}"
            );
        }
        // Values may hold them, and keys may hold any other UTF-8.
        assert_eq!(ok("SET k a\tb\x01"), C::Set(b"k", b"a\tb\x01"));
        assert_eq!(
            ok("GET caf\u{e9}:\u{2603}"),
            C::Get("caf\u{e9}:\u{2603}".as_bytes())
        );
    }

    #[test]
    fn blank_lines_are_ignored() {
        assert_eq!(p(""), Ok(None));
        assert_eq!(p("   "), Ok(None));
    }

    #[test]
    fn multi_key_commands() {
        let C::Mget(a) = ok("MGET a b  c") else {
            panic!()
        };
        assert_eq!(keys_of(a), ["a", "b", "c"]);
        let C::Exists(a) = ok("EXISTS a") else {
            panic!()
        };
        assert_eq!(keys_of(a), ["a"]);
        let C::Mset(a) = ok("MSET a 1 b 2") else {
            panic!()
        };
        assert_eq!(keys_of(a), ["a", "1", "b", "2"]);
        assert_eq!(p("MSET a 1 b"), Err(E::MsetOddArguments));
    }

    #[test]
    fn counters() {
        assert_eq!(ok("INCR n"), C::Incr(b"n", 1));
        assert_eq!(ok("INC n 5"), C::Incr(b"n", 5));
        assert_eq!(ok("DECR n"), C::Incr(b"n", -1));
        assert_eq!(ok("DEC n 7"), C::Incr(b"n", -7));
        assert_eq!(ok("INCR n -3"), C::Incr(b"n", -3));
        assert_eq!(p("INCR n x"), Err(E::AmountNotInteger));
        assert_eq!(p("INCR n 99999999999999999999"), Err(E::AmountNotInteger));
        assert_eq!(p(&format!("DECR n {}", i64::MIN)), Err(E::AmountNotInteger));
    }

    #[test]
    fn scan_arguments() {
        assert_eq!(
            ok("SCAN user:*"),
            C::Scan {
                prefix: b"user:",
                cursor: 0,
                count: SCAN_COUNT_DEFAULT
            }
        );
        assert_eq!(
            ok("SCAN *"),
            C::Scan {
                prefix: b"",
                cursor: 0,
                count: SCAN_COUNT_DEFAULT
            }
        );
        assert_eq!(
            ok("SCAN u 17 5"),
            C::Scan {
                prefix: b"u",
                cursor: 17,
                count: 5
            }
        );
        assert_eq!(p("SCAN u x"), Err(E::InvalidCursor));
        assert_eq!(p("SCAN u 65536"), Err(E::InvalidCursor));
        assert_eq!(p("SCAN u 0 0"), Err(E::InvalidCount));
        assert_eq!(p("SCAN u 0 1001"), Err(E::InvalidCount));
    }

    #[test]
    fn server_commands() {
        assert_eq!(ok("PING"), C::Ping(None));
        assert_eq!(ok("PING hello there"), C::Ping(Some(b"hello there")));
        assert_eq!(ok("ECHO  hi"), C::Echo(b" hi"));
        assert_eq!(ok("hash"), C::Hash);
        assert_eq!(ok("HASH shards"), C::HashShards);
        assert_eq!(p("BACKUP now"), Err(E::TooManyArguments));
        for (line, cmd) in [
            ("DBSIZE", C::Dbsize),
            ("INFO", C::Info),
            ("STATS", C::Stats),
            ("VERSION", C::Version),
            ("FLUSHDB", C::Flushdb),
            ("SHUTDOWN", C::Shutdown),
            ("backup", C::Backup),
            ("quit", C::Quit),
        ] {
            assert_eq!(ok(line), cmd);
        }
    }

    #[test]
    fn error_replies_are_the_spec_lines() {
        assert_eq!(E::InvalidCommand.to_string(), "ERROR: Invalid command");
        assert_eq!(E::MissingArguments.to_string(), "ERROR: Missing arguments");
    }
}
