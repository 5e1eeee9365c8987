//! Key names, the value of each key, which connection owns which key, and
//! the seeded random choice of key and operation.
//!
//! Key `n` is `<prefix><n zero-padded to width>`, so all keys have the same
//! length (`key:00042` for 100 000 keys). The value of key `n` depends only on
//! `n` and the configured size range — not on the seed or the run — so any
//! GET reply can be checked byte for byte, by any run, with no shared state.

use crate::options::{Distribution, Options, Ratio, SizeRange};
use crate::protocol::{Op, Presence};

/// Characters of generated values: lowercase letters and digits 2-7 (the
/// base32 alphabet). None of the protocols' reply words (`OK`, `ERROR`,
/// `(null)`, `END`) can be mistaken for a value, and no byte needs escaping.
const VALUE_ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// SplitMix64 finaliser: a cheap, well-mixed hash of a 64-bit integer.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Names keys and derives their values.
#[derive(Clone, Debug)]
pub struct Keyspace {
    prefix: Vec<u8>,
    width: usize,
    sizes: SizeRange,
}

impl Keyspace {
    pub fn new(opts: &Options) -> Self {
        Keyspace {
            prefix: opts.key_prefix.as_bytes().to_vec(),
            width: opts
                .key_width
                .unwrap_or_else(|| crate::options::digits(opts.keys - 1)),
            sizes: opts.value_size,
        }
    }

    /// Length of every key in bytes.
    pub fn key_len(&self) -> usize {
        self.prefix.len() + self.width
    }

    /// Replaces the contents of `out` with the name of key `n`.
    pub fn write_key(&self, n: u64, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.prefix);
        let start = out.len();
        out.resize(start + self.width, b'0');
        let mut rest = n;
        for slot in out[start..].iter_mut().rev() {
            *slot = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        assert_eq!(rest, 0, "key number {n} wider than {} digits", self.width);
    }

    /// Length of the value of key `n`, within the configured range.
    pub fn value_len(&self, n: u64) -> usize {
        let span = (self.sizes.max - self.sizes.min + 1) as u64;
        self.sizes.min + (mix64(n ^ 0x5157_0a1e) % span) as usize
    }

    /// Replaces the contents of `out` with the value of key `n`.
    pub fn write_value(&self, n: u64, out: &mut Vec<u8>) {
        out.clear();
        let mut h = mix64(n);
        for i in 0..self.value_len(n) {
            if i % 12 == 0 && i > 0 {
                h = mix64(h);
            }
            out.push(VALUE_ALPHABET[((h >> ((i % 12) * 5)) & 31) as usize]);
        }
    }
}

/// Small seeded PRNG (SplitMix64): the workload is reproducible from `--seed`.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(mix64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (multiply-shift; bias below 2^-32 for n < 2^32).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipfian key ranks as in YCSB (Gray et al., "Quickly generating
/// billion-record synthetic databases"): rank 0 is the most popular key.
#[derive(Clone, Copy, Debug)]
pub struct Zipf {
    n: f64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipf {
    pub fn new(n: u64, theta: f64) -> Self {
        assert!(n >= 1 && theta > 0.0 && theta < 1.0);
        let zeta = |count: u64| {
            (1..=count)
                .map(|i| 1.0 / (i as f64).powf(theta))
                .sum::<f64>()
        };
        let zetan = zeta(n);
        let zeta2 = zeta(2.min(n));
        let nf = n as f64;
        Zipf {
            n: nf,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta: (1.0 - (2.0 / nf).powf(1.0 - theta)) / (1.0 - zeta2 / zetan),
        }
    }

    pub fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        let uz = u * self.zetan;
        if uz < 1.0 || self.n < 2.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        let rank = (self.n * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.n as u64 - 1)
    }
}

/// The keys one connection owns and what it knows about each.
///
/// Connection `c` of `C` only ever touches keys `k` with `k % C == c`, so no
/// other client changes them and the connection can tell exactly whether
/// each key must exist: the server answers a connection's requests in
/// order, so a request sees the effect of every earlier request on it.
#[derive(Clone, Debug)]
pub struct Owned {
    conn: u64,
    conns: u64,
    /// Indexed by slot `k / C`.
    states: Vec<Presence>,
}

impl Owned {
    /// Keys of connection `conn` of `conns` among `keys` (`conn < keys`).
    pub fn new(conn: u64, conns: u64, keys: u64) -> Self {
        let len = (keys - conn).div_ceil(conns);
        Owned {
            conn,
            conns,
            states: vec![Presence::Unknown; len as usize],
        }
    }

    /// Number of keys owned.
    pub fn len(&self) -> u64 {
        self.states.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// The key in `slot` (`slot < len()`).
    pub fn key(&self, slot: u64) -> u64 {
        slot * self.conns + self.conn
    }

    /// Called when a request is encoded: returns what its reply must show
    /// (the state after all earlier requests) and records the request's effect.
    pub fn on_encode(&mut self, op: Op, key: u64) -> Presence {
        debug_assert_eq!(key % self.conns, self.conn, "key of another connection");
        let state = &mut self.states[(key / self.conns) as usize];
        let before = *state;
        match op {
            Op::Set => *state = Presence::Present,
            Op::Del => *state = Presence::Absent,
            Op::Get => {}
        }
        before
    }
}

/// Chooses the operation and key of each request of the measured phase.
#[derive(Clone, Copy, Debug)]
pub struct Chooser {
    /// Slots per connection, `ceil(keys / connections)`; the last slot does
    /// not exist for some connections.
    slots: u64,
    ratio: Ratio,
    /// Over slots, so every connection's key popularity is skewed alike:
    /// its own lowest key is its hottest.
    zipf: Option<Zipf>,
}

impl Chooser {
    pub fn new(opts: &Options) -> Self {
        let slots = opts.keys.div_ceil(opts.connections as u64);
        Chooser {
            slots,
            ratio: opts.ratio,
            zipf: (opts.distribution == Distribution::Zipfian)
                .then(|| Zipf::new(slots, opts.zipf_theta)),
        }
    }

    /// An operation and one of `owned`'s keys.
    pub fn next(&self, rng: &mut Rng, owned: &Owned) -> (Op, u64) {
        let r = self.ratio;
        let total = r.set as u64 + r.get as u64 + r.del as u64;
        let pick = rng.below(total);
        let op = if pick < r.set as u64 {
            Op::Set
        } else if pick < r.set as u64 + r.get as u64 {
            Op::Get
        } else {
            Op::Del
        };
        // Redraw a slot past the end of `owned` (only the last slot can be,
        // and slot 0 always exists), so the draw stays in the distribution.
        let slot = loop {
            let slot = match &self.zipf {
                Some(z) => z.sample(rng),
                None => rng.below(self.slots),
            };
            if slot < owned.len() {
                break slot;
            }
        };
        (op, owned.key(slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn opts(args: &[&str]) -> Options {
        let mut all = vec!["loadtest"];
        all.extend_from_slice(args);
        Options::try_parse_from(all).unwrap()
    }

    #[test]
    fn keys_are_padded_to_one_length() {
        let ks = Keyspace::new(&opts(&["--keys", "1000"]));
        let mut k = Vec::new();
        ks.write_key(7, &mut k);
        assert_eq!(k, b"key:007");
        ks.write_key(999, &mut k);
        assert_eq!(k, b"key:999");
        assert_eq!(ks.key_len(), 7);
        // The memory benchmark's 13-byte keys.
        let ks = Keyspace::new(&opts(&["--keys", "1000000", "--key-width", "9"]));
        ks.write_key(42, &mut k);
        assert_eq!(k, b"key:000000042");
        assert_eq!(ks.key_len(), 13);
    }

    #[test]
    fn values_are_deterministic_and_in_range() {
        let ks = Keyspace::new(&opts(&["--value-size", "5-40"]));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut lens = std::collections::HashSet::new();
        for n in 0..2000 {
            ks.write_value(n, &mut a);
            ks.write_value(n, &mut b);
            assert_eq!(a, b);
            assert!((5..=40).contains(&a.len()));
            assert_eq!(a.len(), ks.value_len(n));
            assert!(a.iter().all(|c| VALUE_ALPHABET.contains(c)));
            lens.insert(a.len());
        }
        assert_eq!(lens.len(), 36, "every length in the range occurs");
        ks.write_value(1, &mut b);
        ks.write_value(2, &mut a);
        assert_ne!(a, b);
    }

    #[test]
    fn zipf_is_skewed_and_in_range() {
        let z = Zipf::new(1000, 0.99);
        let mut rng = Rng::new(3);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[z.sample(&mut rng) as usize] += 1;
        }
        assert!(counts[0] > counts[10] && counts[10] > counts[500]);
        assert!(
            counts[0] > 10_000,
            "rank 0 gets ~13% of draws: {}",
            counts[0]
        );
    }

    #[test]
    fn mix_follows_the_ratio() {
        let o = opts(&["--ratio", "1:2:1", "--keys", "10", "--connections", "1"]);
        let c = Chooser::new(&o);
        let owned = Owned::new(0, 1, 10);
        let mut rng = Rng::new(9);
        let mut per_op = [0u32; 3];
        for _ in 0..40_000 {
            let (op, key) = c.next(&mut rng, &owned);
            assert!(key < 10);
            per_op[op.index()] += 1;
        }
        for (got, want) in per_op.iter().zip([10_000, 20_000, 10_000]) {
            assert!(got.abs_diff(want) < 800, "{per_op:?}");
        }
    }

    #[test]
    fn connections_own_disjoint_keys_covering_the_keyspace() {
        for dist in ["uniform", "zipfian"] {
            let o = opts(&["--keys", "10", "--connections", "4", "--distribution", dist]);
            let c = Chooser::new(&o);
            let mut seen = std::collections::BTreeSet::new();
            for conn in 0..4 {
                let owned = Owned::new(conn, 4, 10);
                assert_eq!(owned.len(), [3, 3, 2, 2][conn as usize]);
                let mut rng = Rng::new(conn);
                for _ in 0..2000 {
                    let (_, key) = c.next(&mut rng, &owned);
                    assert_eq!(key % 4, conn, "{dist}: key {key} not owned by {conn}");
                    assert!(key < 10);
                    seen.insert(key);
                }
            }
            assert_eq!(seen.len(), 10, "{dist}: every key is drawn: {seen:?}");
        }
    }

    #[test]
    fn expectation_is_the_state_after_earlier_requests() {
        use Presence::*;
        let mut owned = Owned::new(1, 3, 10); // keys 1, 4, 7
        assert_eq!(owned.on_encode(Op::Get, 4), Unknown);
        assert_eq!(owned.on_encode(Op::Del, 4), Unknown);
        assert_eq!(owned.on_encode(Op::Get, 4), Absent);
        assert_eq!(owned.on_encode(Op::Del, 4), Absent);
        assert_eq!(owned.on_encode(Op::Set, 4), Absent);
        assert_eq!(owned.on_encode(Op::Get, 4), Present);
        assert_eq!(owned.on_encode(Op::Set, 4), Present);
        assert_eq!(owned.on_encode(Op::Del, 4), Present);
        assert_eq!(owned.on_encode(Op::Get, 4), Absent);
        // Other keys are untouched.
        assert_eq!(owned.on_encode(Op::Get, 1), Unknown);
        assert_eq!(owned.on_encode(Op::Get, 7), Unknown);
    }
}
