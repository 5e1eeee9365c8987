//! The replication wire format: the MQTT payload that carries a batch of change events,
//! and the rules its events must meet. Pure: bytes in, bytes or typed errors out.
//! docs/REPLICATION.md draws the format byte by byte; the events themselves are the
//! store's, encoded and decoded by [`crate::store::journal`].
//!
//! A payload is a header followed by events:
//!
//! ```text
//! u8      format version (FORMAT_VERSION = 1)
//! u32 LE  origin: the writing node's origin id (the version tie-break)
//! u8      node id length L (1..=255), then L bytes of node id (UTF-8)
//! u32 LE  event count N
//! N × event:
//!   u8      kind: 1 = set, 2 = delete (tombstone), 3 = flush (FLUSHDB)
//!   varint  hlc (the version's clock, microseconds)
//!   set and delete only:
//!     varint  key length (1..=KEY_BYTES_MAX), then the key (no whitespace or control
//!             bytes: [`crate::limits::is_valid_key`])
//!   set only: varint value length, then the value
//! ```
//!
//! Varints are unsigned LEB128 (7 bits per byte, low first, at most 10 bytes). Every
//! event carries the resulting state of a write (INCR and APPEND included), never the
//! operation, so applying an event twice or out of order is harmless under LWW. A flush
//! is a marker, `(hlc, origin)`: every entry not newer than it is dropped, whatever
//! order it arrives in relative to the writes around it ([`crate::store::shard::Shard::apply_flush`]).

use crate::limits::{is_valid_key, KEY_BYTES_MAX, NODE_ID_BYTES_MAX};
use crate::store::journal::{decode_event, Change, Event, EventError};
#[cfg(test)]
use crate::store::journal::{encode_event, encode_flush};
use crate::wire::{ReadError, Reader};

pub const FORMAT_VERSION: u8 = 1;
/// The fewest bytes an event takes (a flush: kind and a one-byte varint).
const EVENT_BYTES_MIN: usize = 2;
/// The fewest bytes a set or delete takes: sizes what a decoder allocates up front.
const CHANGE_BYTES_MIN: usize = 4;
/// Bytes before the first event, besides the node id.
const HEADER_FIXED_BYTES: usize = 1 + 4 + 1 + 4;

/// Why a payload was rejected. Every one is counted and logged by the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("unknown format version {0} (this node speaks {FORMAT_VERSION})")]
    UnknownVersion(u8),
    #[error("payload of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("bad node id")]
    BadNodeId,
    #[error("unknown event kind {0}")]
    BadKind(u8),
    #[error("malformed varint at byte {0}")]
    BadVarint(usize),
    #[error("key length {0} is out of range")]
    BadKey(u64),
    #[error("a key holds whitespace or a control byte")]
    KeyCharacters,
    #[error("value of {0} bytes is over this node's limit")]
    ValueTooLarge(u64),
    #[error("{0} bytes after the last event")]
    Trailing(usize),
}

impl From<ReadError> for DecodeError {
    fn from(e: ReadError) -> DecodeError {
        match e {
            ReadError::Truncated(at) => DecodeError::Truncated(at),
            ReadError::BadVarint(at) => DecodeError::BadVarint(at),
        }
    }
}

impl From<EventError> for DecodeError {
    fn from(e: EventError) -> DecodeError {
        match e {
            EventError::Read(e) => e.into(),
            EventError::BadKind(kind) => DecodeError::BadKind(kind),
        }
    }
}

/// A decoded payload; events borrow from the payload bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub origin: u32,
    pub node_id: &'a str,
    /// The sets and deletes, in payload order.
    pub events: Vec<Change<'a>>,
    /// The clock of the newest flush in the payload, if it holds any: a newer flush
    /// marker covers every older one, so one per payload is all a receiver applies.
    pub flush: Option<u64>,
}

/// What a decoder accepts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub payload_bytes_max: usize,
    pub value_bytes_max: usize,
}

/// Builds one payload: a header, then whole events appended as encoded bytes.
pub struct PayloadBuilder {
    buf: Vec<u8>,
    count_at: usize,
    events: u32,
}

impl PayloadBuilder {
    /// `node_id` must be 1..=255 bytes (the configuration checks it).
    pub fn new(origin: u32, node_id: &str) -> PayloadBuilder {
        let id = &node_id.as_bytes()[..node_id.len().min(NODE_ID_BYTES_MAX)];
        let mut buf = Vec::with_capacity(HEADER_FIXED_BYTES + id.len() + 4096);
        buf.push(FORMAT_VERSION);
        buf.extend_from_slice(&origin.to_le_bytes());
        buf.push(id.len() as u8);
        buf.extend_from_slice(id);
        let count_at = buf.len();
        buf.extend_from_slice(&0u32.to_le_bytes());
        PayloadBuilder {
            buf,
            count_at,
            events: 0,
        }
    }

    /// Append `events` already-encoded events.
    pub fn extend(&mut self, encoded: &[u8], events: u32) {
        self.buf.extend_from_slice(encoded);
        self.events += events;
    }

    pub fn events(&self) -> u32 {
        self.events
    }

    /// Bytes so far, header included.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// The payload, ready to publish; the builder starts over with the same header.
    pub fn take(&mut self) -> Vec<u8> {
        let header = self.count_at;
        let mut next = Vec::with_capacity(self.buf.capacity());
        next.extend_from_slice(&self.buf[..header + 4]);
        let mut done = std::mem::replace(&mut self.buf, next);
        done[header..header + 4].copy_from_slice(&self.events.to_le_bytes());
        self.events = 0;
        done
    }
}

/// Decode and check a whole payload. Nothing is returned unless every byte is valid,
/// so a corrupt payload is rejected as a whole, never half applied.
pub fn decode(payload: &[u8], limits: Limits) -> Result<Decoded<'_>, DecodeError> {
    if payload.len() > limits.payload_bytes_max {
        return Err(DecodeError::TooLarge(payload.len()));
    }
    let mut r = Reader::new(payload);
    let version = r.byte().map_err(|_| DecodeError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let origin = u32::from_le_bytes(r.array()?);
    let id_len = r.byte()? as usize;
    let node_id = std::str::from_utf8(r.bytes(id_len)?)
        .ok()
        .filter(|id| !id.is_empty())
        .ok_or(DecodeError::BadNodeId)?;
    let count = u32::from_le_bytes(r.array()?) as usize;
    // A count larger than the bytes left can hold is a lie, and must not size an
    // allocation.
    let left = r.left();
    if count > left / EVENT_BYTES_MIN {
        return Err(DecodeError::Truncated(payload.len()));
    }
    let mut events = Vec::with_capacity(count.min(left / CHANGE_BYTES_MIN));
    let mut flush = None;
    for _ in 0..count {
        match read_event(&mut r, limits.value_bytes_max)? {
            Event::Change(c) => events.push(c),
            Event::Flush(hlc) => flush = flush.max(Some(hlc)),
        }
    }
    if !r.done() {
        return Err(DecodeError::Trailing(r.left()));
    }
    Ok(Decoded {
        origin,
        node_id,
        events,
        flush,
    })
}

/// Where to cut `encoded` (whole events) for a payload with room for `max_events`
/// events and `max_bytes` bytes: returns (bytes, events). With `take_one`, the first
/// event is taken even when it is larger than `max_bytes` (it then travels alone).
pub fn prefix_len(
    encoded: &[u8],
    max_events: usize,
    max_bytes: usize,
    take_one: bool,
) -> (usize, u32) {
    let mut r = Reader::new(encoded);
    let mut taken = 0;
    while taken < max_events && !r.done() {
        let start = r.at();
        if read_event(&mut r, usize::MAX).is_err() {
            // Our own journal is always well formed; never loop on anything else.
            return (encoded.len(), taken as u32 + 1);
        }
        if r.at() > max_bytes && !(take_one && taken == 0) {
            return (start, taken as u32);
        }
        taken += 1;
    }
    (r.at(), taken as u32)
}

/// Read one event, checking a change's key and value against the format's and this
/// node's limits.
#[inline]
fn read_event<'a>(r: &mut Reader<'a>, value_max: usize) -> Result<Event<'a>, DecodeError> {
    let event = decode_event(r)?;
    if let Event::Change(c) = event {
        if c.key.is_empty() || c.key.len() > KEY_BYTES_MAX {
            return Err(DecodeError::BadKey(c.key.len() as u64));
        }
        if !is_valid_key(c.key) {
            return Err(DecodeError::KeyCharacters);
        }
        match c.value {
            Some(v) if v.len() > value_max => {
                return Err(DecodeError::ValueTooLarge(v.len() as u64))
            }
            _ => {}
        }
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_shards_journal_decodes_with_its_flush() {
        use crate::store::keyspace::KeyHash;
        use crate::store::shard::{MemoryBudget, Shard};
        let h = |k: &[u8]| KeyHash::of(k);
        let mut s = Shard::new(0, 0, MemoryBudget::unlimited(), 1 << 10)
            .with_identity(1, 3600)
            .with_journal();
        s.set(h(b"a"), b"a", b"1").unwrap();
        s.del(h(b"d"), b"d").unwrap();
        let hlc = s.tick_clock();
        s.flush(hlc, true);
        s.set(h(b"a"), b"a", b"2").unwrap();
        let j = s.take_journal().unwrap();
        let mut p = PayloadBuilder::new(1, "n");
        p.extend(&j.bytes, j.events);
        let limits = Limits {
            payload_bytes_max: 1 << 20,
            value_bytes_max: 1 << 20,
        };
        let payload = p.take();
        let d = decode(&payload, limits).unwrap();
        assert_eq!((j.events, d.events.len(), d.flush), (4, 3, Some(hlc)));
        assert_eq!(d.events[2].value, Some(&b"2"[..]));
    }

    const LIMITS: Limits = Limits {
        payload_bytes_max: 1 << 20,
        value_bytes_max: 1 << 16,
    };

    type Change<'a> = (u64, &'a [u8], Option<&'a [u8]>);

    fn payload(events: &[Change]) -> Vec<u8> {
        let mut b = PayloadBuilder::new(7, "node-a");
        for &(hlc, k, v) in events {
            let mut e = Vec::new();
            encode_event(&mut e, hlc, k, v);
            b.extend(&e, 1);
        }
        b.take()
    }

    #[test]
    fn the_documented_example_is_byte_exact() {
        // The example drawn in docs/REPLICATION.md.
        let p = {
            let mut b = PayloadBuilder::new(0x0403_0201, "n1");
            let mut e = Vec::new();
            encode_event(&mut e, 300, b"k", Some(b"v"));
            encode_event(&mut e, 1, b"k", None);
            b.extend(&e, 2);
            b.take()
        };
        let want: &[u8] = &[
            1, 0x01, 0x02, 0x03, 0x04, 2, b'n', b'1', 2, 0, 0, 0, // header
            1, 0xac, 0x02, 1, b'k', 1, b'v', // set k=v at hlc 300
            2, 0x01, 1, b'k', // delete k at hlc 1
        ];
        assert_eq!(p, want);
    }

    #[test]
    fn a_flush_travels_as_kind_and_clock_and_the_newest_one_counts() {
        let mut e = Vec::new();
        encode_flush(&mut e, 300);
        assert_eq!(e, [3, 0xac, 0x02], "the example in docs/REPLICATION.md");
        encode_event(&mut e, 301, b"k", Some(b"v"));
        encode_flush(&mut e, 1);
        let mut b = PayloadBuilder::new(7, "node-a");
        b.extend(&e, 3);
        let p = b.take();
        let d = decode(&p, LIMITS).unwrap();
        assert_eq!((d.flush, d.events.len()), (Some(300), 1));
        assert_eq!(prefix_len(&e, 1, usize::MAX, false), (3, 1));
        // A payload holding only a flush is valid (its event is 2 bytes at least).
        let mut b = PayloadBuilder::new(7, "node-a");
        let mut f = Vec::new();
        encode_flush(&mut f, 5);
        b.extend(&f, 1);
        let p = b.take();
        let d = decode(&p, LIMITS).unwrap();
        assert_eq!((d.flush, d.events.len()), (Some(5), 0));
    }

    #[test]
    fn round_trip_keeps_every_event_in_order() {
        let p = payload(&[
            (1, b"a", Some(b"1")),
            (u64::MAX, b"b", None),
            (1 << 52, b"c", Some(b"")),
        ]);
        let d = decode(&p, LIMITS).unwrap();
        assert_eq!((d.origin, d.node_id), (7, "node-a"));
        assert_eq!(
            d.events,
            vec![
                crate::store::journal::Change {
                    hlc: 1,
                    key: b"a",
                    value: Some(b"1")
                },
                crate::store::journal::Change {
                    hlc: u64::MAX,
                    key: b"b",
                    value: None
                },
                crate::store::journal::Change {
                    hlc: 1 << 52,
                    key: b"c",
                    value: Some(b"")
                },
            ]
        );
    }

    #[test]
    fn builder_starts_over_after_take() {
        let mut b = PayloadBuilder::new(1, "x");
        let mut e = Vec::new();
        encode_event(&mut e, 5, b"k", Some(b"v"));
        b.extend(&e, 1);
        let first = b.take();
        assert!(b.is_empty());
        b.extend(&e, 1);
        b.extend(&e, 1);
        assert_eq!(decode(&first, LIMITS).unwrap().events.len(), 1);
        assert_eq!(decode(&b.take(), LIMITS).unwrap().events.len(), 2);
    }

    #[test]
    fn every_truncation_is_rejected() {
        let p = payload(&[(300, b"key", Some(b"value")), (301, b"key", None)]);
        for cut in 0..p.len() {
            assert!(decode(&p[..cut], LIMITS).is_err(), "cut at {cut}");
        }
        let mut extra = p.clone();
        extra.push(0);
        assert_eq!(decode(&extra, LIMITS), Err(DecodeError::Trailing(1)));
    }

    #[test]
    fn foreign_versions_bad_kinds_and_limits_are_rejected() {
        let p = payload(&[(1, b"k", Some(b"vv"))]);
        let mut v2 = p.clone();
        v2[0] = 2;
        assert_eq!(decode(&v2, LIMITS), Err(DecodeError::UnknownVersion(2)));
        let at = p.len() - 7; // the event's kind byte
        let mut bad = p.clone();
        bad[at] = 9;
        assert_eq!(decode(&bad, LIMITS), Err(DecodeError::BadKind(9)));
        let small = Limits {
            payload_bytes_max: p.len() - 1,
            ..LIMITS
        };
        assert_eq!(decode(&p, small), Err(DecodeError::TooLarge(p.len())));
        let tiny_values = Limits {
            value_bytes_max: 1,
            ..LIMITS
        };
        assert_eq!(decode(&p, tiny_values), Err(DecodeError::ValueTooLarge(2)));
        let long_key = vec![b'k'; KEY_BYTES_MAX + 1];
        let p = payload(&[(1, &long_key, None)]);
        assert!(matches!(decode(&p, LIMITS), Err(DecodeError::BadKey(_))));
        assert_eq!(decode(&[], LIMITS), Err(DecodeError::Empty));
    }

    #[test]
    fn a_payload_with_one_key_a_client_could_not_write_is_rejected_whole() {
        // The same key rule as client input: a peer (or an intruder on the broker)
        // cannot store a key that SCAN would write back with a newline in it.
        for bad in [
            &b"two words"[..],
            b"line\r\nbreak",
            b"tab\t",
            b"nul\0",
            b"\x7f",
        ] {
            let p = payload(&[(1, b"fine", Some(b"v")), (2, bad, Some(b"v"))]);
            assert!(decode(&p, LIMITS).is_err(), "{bad:?}");
        }
        // Values may hold any bytes.
        let p = payload(&[(1, "caf\u{e9}".as_bytes(), Some(b"a b\r\n\0\xff"))]);
        assert_eq!(decode(&p, LIMITS).unwrap().events.len(), 1);
    }

    #[test]
    fn a_huge_event_count_does_not_allocate() {
        let mut p = payload(&[]);
        let n = p.len();
        p[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&p, LIMITS), Err(DecodeError::Truncated(_))));
    }

    #[test]
    fn prefix_len_cuts_at_event_boundaries() {
        let mut e = Vec::new();
        encode_event(&mut e, 1, b"a", Some(b"1"));
        let one = e.len();
        encode_event(&mut e, 2, b"b", None);
        assert_eq!(prefix_len(&e, 1, usize::MAX, false), (one, 1));
        assert_eq!(prefix_len(&e, 5, usize::MAX, false), (e.len(), 2));
        assert_eq!(prefix_len(&e, 0, usize::MAX, false), (0, 0));
        assert_eq!(prefix_len(&e, 5, one, false), (one, 1), "byte room for one");
        assert_eq!(prefix_len(&e, 5, 1, false), (0, 0), "no room");
        assert_eq!(
            prefix_len(&e, 5, 1, true),
            (one, 1),
            "a large first event goes alone"
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes, LIMITS);
            let _ = prefix_len(&bytes, 3, 64, true);
        }

        #[test]
        fn any_event_list_round_trips(events in proptest::collection::vec(
            (any::<u64>(), proptest::collection::vec(0x21u8..0x7f, 1..40),
             proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40))), 0..20)) {
            let refs: Vec<_> = events.iter().map(|(h, k, v)| (*h, &k[..], v.as_deref())).collect();
            let p = payload(&refs);
            let d = decode(&p, LIMITS).unwrap();
            let got: Vec<_> = d.events.iter().map(|e| (e.hlc, e.key, e.value)).collect();
            prop_assert_eq!(got, refs);
        }
    }
}
