//! The change events the store emits: every local write, encoded as the state it left
//! (key, value or tombstone, version), and FLUSHDB markers — and their decoding. The
//! store owns this format both ways; replication carries events in MQTT payloads
//! (`replication::changes`, docs/REPLICATION.md draws the format) and anti-entropy
//! sends each entry as its origin and an event (docs/ANTI_ENTROPY.md).

use crate::store::version::Version;
use crate::wire::{put_varint, ReadError, Reader};

/// Event kinds, the first byte of every event.
pub const KIND_SET: u8 = 1;
pub const KIND_DEL: u8 = 2;
pub const KIND_FLUSH: u8 = 3;
/// Only in a shard's own log (persistence), never sent: the rejoin after a long
/// isolation dropped every entry older than its clock ([`Entry::Forget`]).
pub const KIND_FORGET: u8 = 4;

/// Change events of local writes, in write order, ready to be appended to a payload.
#[derive(Debug, Default)]
pub struct Journal {
    pub bytes: Vec<u8>,
    pub events: u32,
}

/// Append one event to `out` (a shard's journal, or a payload under construction).
#[inline]
pub fn encode_event(out: &mut Vec<u8>, hlc: u64, key: &[u8], value: Option<&[u8]>) {
    out.push(if value.is_some() { KIND_SET } else { KIND_DEL });
    put_varint(out, hlc);
    put_varint(out, key.len() as u64);
    out.extend_from_slice(key);
    if let Some(v) = value {
        put_varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }
}

/// Append a flush (FLUSHDB at `hlc` on the payload's origin) to `out`.
pub fn encode_flush(out: &mut Vec<u8>, hlc: u64) {
    out.push(KIND_FLUSH);
    put_varint(out, hlc);
}

/// One change: the state a key has after a write, at clock `hlc` (the origin is the
/// carrier's: a payload's header, an anti-entropy entry's own field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change<'a> {
    pub hlc: u64,
    pub key: &'a [u8],
    /// `None` is a delete (tombstone).
    pub value: Option<&'a [u8]>,
}

/// One event as read: a change to a key, or a flush at a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    Change(Change<'a>),
    Flush(u64),
}

/// Why an event could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("unknown event kind {0}")]
    BadKind(u8),
}

/// Read one event as [`encode_event`] or [`encode_flush`] wrote it. Only its shape is
/// checked here: the rules a key and a value must meet are the reader's (a payload is
/// refused whole for one bad key, an anti-entropy entry alone), checked on the result.
#[inline]
pub fn decode_event<'a>(r: &mut Reader<'a>) -> Result<Event<'a>, EventError> {
    let kind = r.byte()?;
    if kind != KIND_SET && kind != KIND_DEL && kind != KIND_FLUSH {
        return Err(EventError::BadKind(kind));
    }
    let hlc = r.varint()?;
    if kind == KIND_FLUSH {
        return Ok(Event::Flush(hlc));
    }
    let key_len = r.varint()?;
    let key = r.bytes(usize::try_from(key_len).unwrap_or(usize::MAX))?;
    let value = if kind == KIND_SET {
        let len = r.varint()?;
        Some(r.bytes(usize::try_from(len).unwrap_or(usize::MAX))?)
    } else {
        None
    };
    Ok(Event::Change(Change { hlc, key, value }))
}

/// Append one entry: its version's origin (u32 LE), then the event at the version's
/// clock. What anti-entropy sends, and what a shard's log and snapshots hold.
#[inline]
pub fn encode_entry(out: &mut Vec<u8>, v: Version, key: &[u8], value: Option<&[u8]>) {
    out.extend_from_slice(&v.origin.to_le_bytes());
    encode_event(out, v.hlc, key, value);
}

/// Append a flush marker as an entry (a shard's log).
pub fn encode_flush_entry(out: &mut Vec<u8>, marker: Version) {
    out.extend_from_slice(&marker.origin.to_le_bytes());
    encode_flush(out, marker.hlc);
}

/// Append a forget (a shard's log): every entry older than `hlc` was dropped here.
pub fn encode_forget(out: &mut Vec<u8>, hlc: u64) {
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(KIND_FORGET);
    put_varint(out, hlc);
}

/// One entry as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    Change {
        version: Version,
        key: &'a [u8],
        /// `None` is a tombstone.
        value: Option<&'a [u8]>,
    },
    /// A flush marker.
    Flush(Version),
    /// Entries older than this clock were dropped (a shard's log only).
    Forget(u64),
}

/// Read one entry as [`encode_entry`], [`encode_flush_entry`] or [`encode_forget`]
/// wrote it; as with [`decode_event`], only its shape is checked.
#[inline]
pub fn decode_entry<'a>(r: &mut Reader<'a>) -> Result<Entry<'a>, EventError> {
    let origin = u32::from_le_bytes(r.array()?);
    if r.peek() == Some(KIND_FORGET) {
        r.byte()?;
        return Ok(Entry::Forget(r.varint()?));
    }
    Ok(match decode_event(r)? {
        Event::Change(c) => Entry::Change {
            version: Version { hlc: c.hlc, origin },
            key: c.key,
            value: c.value,
        },
        Event::Flush(hlc) => Entry::Flush(Version { hlc, origin }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_event_reads_back_as_written(
            events in proptest::collection::vec(
                (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..40),
                 proptest::option::of(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)))),
                0..20)) {
            // `None`: a flush at the clock; `Some(value)`: a set or a delete of the key.
            let mut out = Vec::new();
            for (hlc, key, value) in &events {
                match value {
                    None => encode_flush(&mut out, *hlc),
                    Some(v) => encode_event(&mut out, *hlc, key, v.as_deref()),
                }
            }
            let mut r = Reader::new(&out);
            for (hlc, key, value) in &events {
                let want = match value {
                    None => Event::Flush(*hlc),
                    Some(v) => Event::Change(Change { hlc: *hlc, key, value: v.as_deref() }),
                };
                prop_assert_eq!(decode_event(&mut r), Ok(want));
            }
            prop_assert!(r.done());
        }
    }

    #[test]
    fn entries_read_back_as_written_and_a_forget_is_not_an_event() {
        let v = |hlc, origin| Version { hlc, origin };
        let mut out = Vec::new();
        encode_entry(&mut out, v(300, 7), b"k", Some(b"value"));
        encode_entry(&mut out, v(301, 8), b"gone", None);
        encode_flush_entry(&mut out, v(302, 9));
        encode_forget(&mut out, 303);
        let mut r = Reader::new(&out);
        let want = [
            Entry::Change {
                version: v(300, 7),
                key: b"k",
                value: Some(b"value"),
            },
            Entry::Change {
                version: v(301, 8),
                key: b"gone",
                value: None,
            },
            Entry::Flush(v(302, 9)),
            Entry::Forget(303),
        ];
        for w in want {
            assert_eq!(decode_entry(&mut r), Ok(w));
        }
        assert!(r.done());
        // A forget never travels: the event decoder refuses its kind.
        let mut forget = Vec::new();
        encode_forget(&mut forget, 1);
        assert_eq!(
            decode_event(&mut Reader::new(&forget[4..])),
            Err(EventError::BadKind(KIND_FORGET))
        );
        for cut in 0..out.len() {
            let mut r = Reader::new(&out[..cut]);
            let read: Result<Vec<_>, _> = (0..4).map(|_| decode_entry(&mut r)).collect();
            assert!(read.is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn an_unknown_kind_or_a_cut_event_is_an_error() {
        assert_eq!(
            decode_event(&mut Reader::new(&[4, 1])),
            Err(EventError::BadKind(4))
        );
        let mut e = Vec::new();
        encode_event(&mut e, 300, b"key", Some(b"value"));
        for cut in 0..e.len() {
            let r = decode_event(&mut Reader::new(&e[..cut]));
            assert!(matches!(r, Err(EventError::Read(_))), "cut at {cut}: {r:?}");
        }
    }
}
