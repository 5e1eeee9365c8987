//! Bytes on the wire, shared by the replication format and the anti-entropy messages.

/// Append `v` as an unsigned LEB128 varint (also the anti-entropy messages' varint).
#[inline]
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

/// Why bytes could not be read: each format maps it into its own typed error
/// (`replication::changes::DecodeError`, `antientropy`'s `SyncError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("malformed varint at byte {0}")]
    BadVarint(usize),
}

/// Reads a received buffer front to back, every read bounds-checked: malformed input is
/// an error, never a panic. The one reader of both wire formats.
pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, at: 0 }
    }

    /// Bytes read so far.
    #[inline]
    pub fn at(&self) -> usize {
        self.at
    }

    /// The next byte, left unread.
    #[inline]
    pub fn peek(&self) -> Option<u8> {
        self.buf.get(self.at).copied()
    }

    /// Bytes not read yet.
    #[inline]
    pub fn left(&self) -> usize {
        self.buf.len() - self.at
    }

    #[inline]
    pub fn done(&self) -> bool {
        self.at == self.buf.len()
    }

    #[inline]
    pub fn byte(&mut self) -> Result<u8, ReadError> {
        let b = *self.buf.get(self.at).ok_or(ReadError::Truncated(self.at))?;
        self.at += 1;
        Ok(b)
    }

    #[inline]
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ReadError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(ReadError::Truncated(self.at))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    #[inline]
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        Ok(self.bytes(N)?.try_into().expect("length checked"))
    }

    /// An unsigned LEB128 varint of at most 10 bytes whose value fits a u64: a 10th
    /// byte holding more than the top bit is refused, not silently cut.
    #[inline]
    pub fn varint(&mut self) -> Result<u64, ReadError> {
        let start = self.at;
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(ReadError::BadVarint(start));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ReadError::BadVarint(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_and_overflow_is_refused() {
        for v in [
            0,
            1,
            127,
            128,
            300,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut r = Reader::new(&out);
            assert_eq!((r.varint(), r.done()), (Ok(v), true), "{v}");
        }
        // u64::MAX is nine 0xff and a 1; a 10th byte of 2 would need bit 64.
        let mut over = vec![0xff; 9];
        over.push(0x02);
        assert_eq!(Reader::new(&over).varint(), Err(ReadError::BadVarint(0)));
        // Eleven bytes, or a 10th byte that goes on, are too long.
        assert_eq!(
            Reader::new(&[0x80; 11]).varint(),
            Err(ReadError::BadVarint(0))
        );
        assert_eq!(
            Reader::new(&[0x80, 0x80]).varint(),
            Err(ReadError::Truncated(2))
        );
    }

    #[test]
    fn reads_past_the_end_are_errors_at_their_position() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.byte(), Ok(1));
        assert_eq!(r.bytes(3), Err(ReadError::Truncated(1)));
        assert_eq!(r.bytes(usize::MAX), Err(ReadError::Truncated(1)));
        assert_eq!(r.array::<2>(), Ok([2, 3]));
        assert_eq!((r.left(), r.at()), (0, 3));
        assert_eq!(r.byte(), Err(ReadError::Truncated(3)));
    }
}
