//! The change events the store emits: every local write, encoded as the state it left
//! (key, value or tombstone, version), and FLUSHDB markers. Replication copies these
//! bytes into MQTT payloads unchanged (docs/REPLICATION.md draws the format); the
//! decoder is `replication::changes`.

use crate::wire::put_varint;

/// Event kinds, the first byte of every event.
pub const KIND_SET: u8 = 1;
pub const KIND_DEL: u8 = 2;
pub const KIND_FLUSH: u8 = 3;

/// Change events of local writes, in write order, ready to be appended to a payload.
#[derive(Debug, Default)]
pub struct Journal {
    pub bytes: Vec<u8>,
    pub events: u32,
}

/// Append one event to `out` (a shard's journal, or a payload under construction).
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
