//! The framing of every persisted file (log segments and snapshots): records of
//! `length │ CRC32C │ body`, and the scan that finds where valid data ends. Pure.
//!
//! ```text
//! u32 LE  body length L (1..=RECORD_BYTES_MAX)
//! u32 LE  CRC32C (Castagnoli) of the body
//! L bytes body
//! ```
//!
//! A crash can leave the last record of a file half written (a torn tail), and a disk can
//! return flipped bits. Either way the scan stops at the first record whose length or
//! checksum does not hold and reports how many bytes follow it, so recovery keeps every
//! record before it and truncates the rest, saying how much it dropped. A record is
//! never half applied: its body is seen only when every byte of it checks out.

/// Record kinds, the first byte of every record body. Log segments hold entries;
/// snapshots a header, entries and an end.
pub const RECORD_ENTRIES: u8 = 1;
pub const RECORD_SNAPSHOT_HEADER: u8 = 2;
pub const RECORD_SNAPSHOT_END: u8 = 3;

/// Bytes before a record's body.
pub const HEADER_BYTES: usize = 8;
/// Largest record body: a shard's share of one batch of writes, or one snapshot chunk.
/// A length above it is corruption, never a reason to allocate.
pub const RECORD_BYTES_MAX: usize = 256 << 20;

/// Append one record holding `body` to `out`.
pub fn append(out: &mut Vec<u8>, body: &[u8]) {
    let (&kind, rest) = body.split_first().expect("a record body is never empty");
    append_kind(out, kind, rest);
}

/// Append one record whose body is `kind` followed by `rest`, without building the body
/// first: the log writer frames each shard's batch straight from the bytes it was handed.
pub fn append_kind(out: &mut Vec<u8>, kind: u8, rest: &[u8]) {
    let len = 1 + rest.len();
    assert!(len <= RECORD_BYTES_MAX, "record body of {len} bytes");
    out.extend_from_slice(&(len as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&[kind]), rest);
    out.extend_from_slice(&crc.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(rest);
}

/// Why a scan stopped before the end of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    #[error("a record header cut short at byte {at}")]
    TornHeader { at: usize },
    #[error("a record of {len} bytes at byte {at} runs past the end (torn write)")]
    TornBody { at: usize, len: usize },
    #[error("a record length of {len} at byte {at} is out of range")]
    BadLength { at: usize, len: usize },
    #[error("the record at byte {at} fails its checksum")]
    BadChecksum { at: usize },
}

impl Damage {
    /// Where the damaged record starts: everything before it is valid.
    pub fn at(self) -> usize {
        match self {
            Damage::TornHeader { at }
            | Damage::TornBody { at, .. }
            | Damage::BadLength { at, .. }
            | Damage::BadChecksum { at } => at,
        }
    }
}

/// The records of `buf` in order, stopping at the first damaged one.
pub fn records(buf: &[u8]) -> Records<'_> {
    Records {
        buf,
        at: 0,
        damage: None,
    }
}

/// An iterator over record bodies; after it ends, [`Records::damage`] says whether it
/// reached the end of the bytes or stopped at damage, and [`Records::valid_len`] how many
/// bytes from the start are whole records.
pub struct Records<'a> {
    buf: &'a [u8],
    at: usize,
    damage: Option<Damage>,
}

impl<'a> Records<'a> {
    pub fn damage(&self) -> Option<Damage> {
        self.damage
    }

    pub fn valid_len(&self) -> usize {
        self.at
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.damage.is_some() || self.at == self.buf.len() {
            return None;
        }
        let at = self.at;
        let rest = &self.buf[at..];
        let damage = if rest.len() < HEADER_BYTES {
            Damage::TornHeader { at }
        } else {
            let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
            if len == 0 || len > RECORD_BYTES_MAX {
                Damage::BadLength { at, len }
            } else if rest.len() - HEADER_BYTES < len {
                Damage::TornBody { at, len }
            } else {
                let body = &rest[HEADER_BYTES..HEADER_BYTES + len];
                if crc32c::crc32c(body) == crc {
                    self.at += HEADER_BYTES + len;
                    return Some(body);
                }
                Damage::BadChecksum { at }
            }
        };
        self.damage = Some(damage);
        None
    }
}

/// Where the first whole, valid record at or after byte `from` of `buf` starts, if any:
/// what tells a torn tail (garbage to the end) from damage with good records behind it.
/// Looks at every offset, checking a checksum only where a length and a kind fit, and
/// gives up (`None`) after checksumming `budget` bytes.
pub fn whole_record_after(buf: &[u8], from: usize, mut budget: usize) -> Option<usize> {
    for at in from..buf.len().saturating_sub(HEADER_BYTES) {
        let len = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        let body_at = at + HEADER_BYTES;
        if len == 0 || len > buf.len() - body_at || len > budget {
            continue;
        }
        if !matches!(buf[body_at], RECORD_ENTRIES..=RECORD_SNAPSHOT_END) {
            continue;
        }
        budget -= len;
        let crc = u32::from_le_bytes(buf[at + 4..at + 8].try_into().expect("4 bytes"));
        if crc32c::crc32c(&buf[body_at..body_at + len]) == crc {
            return Some(at);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(bodies: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in bodies {
            append(&mut out, b);
        }
        out
    }

    #[test]
    fn records_come_back_in_order_and_the_end_is_clean() {
        let buf = file(&[b"one", b"two two", b"3"]);
        let mut r = records(&buf);
        let got: Vec<&[u8]> = r.by_ref().collect();
        assert_eq!(got, [&b"one"[..], b"two two", b"3"]);
        assert_eq!((r.damage(), r.valid_len()), (None, buf.len()));
        let mut empty = records(&[]);
        assert_eq!((empty.next(), empty.damage()), (None, None));
    }

    #[test]
    fn a_tail_torn_at_every_offset_keeps_every_whole_record_before_it() {
        let whole = file(&[b"first record", b"second", b"the last record"]);
        let last_starts = whole.len() - (HEADER_BYTES + b"the last record".len());
        for cut in last_starts..whole.len() {
            let mut r = records(&whole[..cut]);
            let got: Vec<&[u8]> = r.by_ref().collect();
            assert_eq!(got, [&b"first record"[..], b"second"], "cut at {cut}");
            assert_eq!(r.valid_len(), last_starts, "cut at {cut}");
            let damage = r.damage();
            if cut == last_starts {
                assert_eq!(damage, None, "a cut on a record boundary is a clean end");
            } else {
                assert_eq!(damage.map(Damage::at), Some(last_starts), "cut at {cut}");
            }
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_in_a_record_stops_the_scan_there() {
        let whole = file(&[b"first", b"middle record", b"last"]);
        let middle = HEADER_BYTES + 5;
        let middle_end = middle + HEADER_BYTES + b"middle record".len();
        for byte in middle..middle_end {
            for bit in 0..8 {
                let mut bad = whole.clone();
                bad[byte] ^= 1 << bit;
                let mut r = records(&bad);
                let got: Vec<&[u8]> = r.by_ref().collect();
                assert_eq!(got, [&b"first"[..]], "byte {byte} bit {bit}");
                assert_eq!(r.valid_len(), middle);
                assert!(r.damage().is_some(), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn a_huge_or_zero_length_is_damage_not_an_allocation() {
        for len in [0u32, RECORD_BYTES_MAX as u32 + 1, u32::MAX] {
            let mut buf = len.to_le_bytes().to_vec();
            buf.extend_from_slice(&[0; 12]);
            let mut r = records(&buf);
            assert_eq!(r.next(), None);
            let want = Damage::BadLength {
                at: 0,
                len: len as usize,
            };
            assert_eq!(r.damage(), Some(want));
        }
    }

    #[test]
    fn good_records_behind_damage_are_found_and_a_torn_tail_has_none() {
        let whole = file(&[&[RECORD_ENTRIES, 1, 2, 3], &[RECORD_ENTRIES, 4, 5]]);
        let second = HEADER_BYTES + 4;
        let mut bad = whole.clone();
        bad[HEADER_BYTES + 1] ^= 1; // the first record's body
        assert_eq!(whole_record_after(&bad, 1, usize::MAX), Some(second));
        assert_eq!(
            whole_record_after(&whole[..whole.len() - 1], 1, usize::MAX),
            None
        );
        assert_eq!(whole_record_after(&bad, 1, 1), None, "over its budget");
    }

    proptest! {
        #[test]
        fn any_bytes_scan_without_panic_and_valid_len_is_a_record_boundary(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..6),
            cut in any::<usize>(),
            noise in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let refs: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
            let whole = file(&refs);
            let cut = cut % (whole.len() + 1);
            let mut buf = whole[..cut].to_vec();
            buf.extend_from_slice(&noise);
            let mut r = records(&buf);
            let got: Vec<Vec<u8>> = r.by_ref().map(<[u8]>::to_vec).collect();
            // Whatever was read is a prefix of what was written (a noise record that
            // passes its CRC by chance is the only exception, and needs 2^-32 luck).
            let n = got.len().min(bodies.len());
            prop_assert_eq!(&got[..n], &bodies[..n]);
            prop_assert!(r.valid_len() <= buf.len());
        }
    }
}
