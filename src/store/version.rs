//! Versions of stored entries and the last-write-wins rule that orders them.
//!
//! A version is a hybrid logical clock reading in microseconds plus the writing node's
//! origin id as a tie-break. [`Version::wins_over`] is the one merge rule: replication
//! and anti-entropy both apply a remote entry exactly when its version is higher, so
//! redelivered, duplicated or reordered changes are harmless. Pure: the wall clock is
//! passed in.

use crate::store::merkle::Digest;
use std::time::{SystemTime, UNIX_EPOCH};

/// The version of one write. Ordered by `hlc`, then `origin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version {
    /// Microseconds since the Unix epoch, pushed forward past every version this
    /// clock has issued or seen.
    pub hlc: u64,
    /// The writing node ([`origin_of`] its node id).
    pub origin: u32,
}

impl Version {
    /// True when an entry with this version replaces one with `other`. Equal
    /// versions are the same write: applying it again changes nothing.
    pub fn wins_over(self, other: Version) -> bool {
        self > other
    }
}

/// The origin id of a node: 32 bits of the xxh3 hash of its node id. Only a
/// tie-break between writes in the same microsecond.
pub fn origin_of(node_id: &str) -> u32 {
    xxhash_rust::xxh3::xxh3_64(node_id.as_bytes()) as u32
}

/// Wall-clock microseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A hybrid logical clock: never goes backwards, never repeats, and stays ahead of
/// every version it has observed. Read at each write, so a write that starts after
/// another was acknowledged (on any node sharing the wall clock) gets a higher reading.
#[derive(Debug, Default)]
pub struct Clock {
    last: u64,
}

impl Clock {
    /// The next reading, given the wall clock now.
    pub fn tick(&mut self, now_us: u64) -> u64 {
        self.last = now_us.max(self.last.saturating_add(1));
        self.last
    }

    /// Take a remote version into account, so local writes that follow it win.
    pub fn observe(&mut self, hlc: u64) {
        self.last = self.last.max(hlc);
    }
}

/// The last-write-wins rule between a remote and a local entry: the higher version
/// wins; equal versions with different contents (an origin-id collision, or a clock
/// reissued after a restart) are decided by the higher entry digest, so every replica
/// makes the same choice and converges. `digests` gives (remote, local) and is only
/// computed on a version tie.
pub fn remote_wins(
    remote: Version,
    local: Version,
    digests: impl FnOnce() -> (Digest, Digest),
) -> bool {
    remote.wins_over(local)
        || (remote == local && {
            let (r, l) = digests();
            r > l
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_clock_wins_then_origin_breaks_ties() {
        let v = |hlc, origin| Version { hlc, origin };
        assert!(v(2, 0).wins_over(v(1, 9)));
        assert!(!v(1, 9).wins_over(v(2, 0)));
        assert!(v(5, 2).wins_over(v(5, 1)));
        assert!(
            !v(5, 1).wins_over(v(5, 1)),
            "the same write does not win over itself"
        );
    }

    #[test]
    fn clock_is_strictly_increasing_even_when_the_wall_clock_stalls_or_steps_back() {
        let mut c = Clock::default();
        assert_eq!(c.tick(100), 100);
        assert_eq!(c.tick(100), 101);
        assert_eq!(c.tick(50), 102);
        assert_eq!(c.tick(500), 500);
    }

    #[test]
    fn clock_moves_past_observed_versions() {
        let mut c = Clock::default();
        c.tick(100);
        c.observe(1_000);
        assert_eq!(c.tick(200), 1_001);
        c.observe(10);
        assert_eq!(c.tick(200), 1_002);
    }

    #[test]
    fn origins_differ_for_different_nodes() {
        assert_ne!(origin_of("node-1"), origin_of("node-2"));
        assert_eq!(origin_of("node-1"), origin_of("node-1"));
    }

    #[test]
    fn wall_clock_is_in_microseconds() {
        let t = now_us();
        assert!(t > 1_700_000_000_000_000, "{t}");
    }
}
