//! Bytes on the wire, shared by the replication format and the anti-entropy messages.

/// Append `v` as an unsigned LEB128 varint (also the anti-entropy messages' varint).
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A byte range of a received buffer: ops and remote changes name keys and values by
/// spans, so they travel to another thread with the shared bytes, uncopied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub len: u32,
}

impl Span {
    /// The span of `part`, which must be a subslice of `base` (or empty).
    pub fn of(base: &[u8], part: &[u8]) -> Span {
        if part.is_empty() {
            return Span::default();
        }
        let start = (part.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
        assert!(start + part.len() <= base.len(), "span outside its buffer");
        Span {
            start: start as u32,
            len: part.len() as u32,
        }
    }
    pub fn get(self, data: &[u8]) -> &[u8] {
        &data[self.start as usize..(self.start + self.len) as usize]
    }
}
