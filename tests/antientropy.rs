//! Anti-entropy's pure core against a last-write-wins model: two in-process nodes
//! (production shards, possibly with different shard counts) with random divergence —
//! keys on one side only, different values, tombstones, conflicting versions — run one
//! exchange through the real message encoding. Afterwards both equal the model, their
//! roots are equal, and exactly the divergent entries crossed, once each way.

use merkle_kv::antientropy::exchange::{exchange, Report};
use merkle_kv::antientropy::serve::Shards;
use merkle_kv::store::keyspace::KeyHash;
use merkle_kv::store::shard::{MemoryBudget, Shard};
use merkle_kv::store::version::Version;
use proptest::prelude::*;
use std::collections::BTreeMap;

const NOW: u64 = 1_800_000_000_000_000;

fn node(shards: usize) -> Vec<Shard> {
    let bits = shards.trailing_zeros();
    (0..shards)
        .map(|i| Shard::new(i, bits, MemoryBudget::unlimited(), 1 << 16))
        .collect()
}

type Entry = (Version, Option<Vec<u8>>);

/// One exchange from `a` (the initiator) with `b`, both in this thread.
fn sync(a: &mut [Shard], b: &mut [Shard]) -> Report {
    let mut local = Shards {
        shards: a,
        now_us: NOW,
    };
    let mut peer = Shards {
        shards: b,
        now_us: NOW,
    };
    exchange(&mut local, &mut peer).unwrap()
}

fn put(shards: &mut [Shard], key: &[u8], e: &Entry) {
    let h = KeyHash::of(key);
    let s = h.shard(shards.len().trailing_zeros());
    shards[s].apply(h, key, e.1.as_deref(), e.0, NOW);
}

fn state(shards: &[Shard], key: &[u8]) -> Option<Entry> {
    let h = KeyHash::of(key);
    let s = &shards[h.shard(shards.len().trailing_zeros())];
    s.version_of(h, key)
        .map(|v| (v, s.get(h, key).map(<[u8]>::to_vec)))
}

/// One key's fate: 0 same on both, 1 only A, 2 only B, 3 both with different writes.
fn divergence() -> impl Strategy<Value = Vec<(u8, bool, bool, u8)>> {
    // (fate, A's write is a delete, B's write is a delete, version relation)
    proptest::collection::vec((0u8..4, any::<bool>(), any::<bool>(), 0u8..3), 0..300)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn one_exchange_makes_both_sides_equal_to_the_model(
        keys in divergence(),
        a_shards in prop::sample::select(vec![1usize, 2, 4]),
        b_shards in prop::sample::select(vec![1usize, 2, 8, 32]),
    ) {
        let (mut a, mut b) = (node(a_shards), node(b_shards));
        let mut model: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
        let mut divergent = (0u64, 0u64); // keys whose entry A / B must send
        for (i, &(fate, a_del, b_del, rel)) in keys.iter().enumerate() {
            let key = format!("key:{i}").into_bytes();
            let hlc = NOW - 10_000_000 + 1000 * i as u64;
            let write = |del: bool, v: Version| -> Entry {
                (v, (!del).then(|| format!("value-{}-{}", v.hlc, v.origin).into_bytes()))
            };
            let va = Version { hlc, origin: 1 };
            // B's version: older, newer, or the same clock with another origin.
            let vb = match rel {
                0 => Version { hlc: hlc - 1, origin: 2 },
                1 => Version { hlc: hlc + 1, origin: 2 },
                _ => Version { hlc, origin: 2 },
            };
            let (ea, eb) = (write(a_del, va), write(b_del, vb));
            let winner = match fate {
                0 => { put(&mut a, &key, &ea); put(&mut b, &key, &ea); ea }
                1 => { put(&mut a, &key, &ea); divergent.0 += 1; ea }
                2 => { put(&mut b, &key, &eb); divergent.1 += 1; eb }
                _ => {
                    put(&mut a, &key, &ea);
                    put(&mut b, &key, &eb);
                    // Same contents (two deletes) is no divergence: digests match.
                    if ea.1 != eb.1 { divergent.0 += 1; divergent.1 += 1; }
                    if vb > va { eb } else { ea }
                }
            };
            model.insert(key, winner);
        }
        let report = sync(&mut a, &mut b);
        prop_assert_eq!((report.entries_sent, report.entries_received), divergent);
        for (key, (v, value)) in &model {
            for (side, shards) in [("A", &a), ("B", &b)] {
                let got = state(shards, key).unwrap();
                // Equal contents may keep different versions (digests ignore versions).
                prop_assert_eq!(&got.1, value, "{} {}", side, String::from_utf8_lossy(key));
                if divergent != (0, 0) && got.1.is_some() {
                    prop_assert!(got.0 <= *v);
                }
            }
        }
        let root = |s: &mut Vec<Shard>| {
            let roots: Vec<_> = s.iter_mut().map(Shard::root).collect();
            merkle_kv::store::merkle::combine_roots(&roots)
        };
        prop_assert_eq!(root(&mut a), root(&mut b));
        if divergent == (0, 0) {
            prop_assert_eq!(report.round_trips, 1, "equal replicas cost one round trip");
        } else {
            // Root, four levels, then a listing and an exchange round trip per chunk
            // of differing buckets.
            let chunks = report.buckets_compared.div_ceil(merkle_kv::antientropy::messages::BUCKETS_PER_ROUND as u64);
            prop_assert!(report.round_trips <= 5 + 2 * chunks, "{:?}", report);
        }
        // A second exchange finds nothing.
        prop_assert_eq!(sync(&mut a, &mut b).round_trips, 1);
    }
}

#[test]
fn replies_are_bounded_and_the_next_exchange_takes_the_rest() {
    let big = |n: usize| -> Vec<Shard> {
        let bits = n.trailing_zeros();
        (0..n)
            .map(|i| Shard::new(i, bits, MemoryBudget::unlimited(), 2 << 20))
            .collect()
    };
    let (mut a, mut b) = (big(1), big(2));
    // 40 MiB of values on B only: more than one reply may carry.
    for i in 0..40 {
        let key = format!("big:{i}").into_bytes();
        let v = Version {
            hlc: NOW - 1_000 + i,
            origin: 2,
        };
        put(&mut b, &key, &(v, Some(vec![b'x'; 1 << 20])));
    }
    let mut exchanges = 0;
    let mut received = 0;
    loop {
        let r = sync(&mut a, &mut b);
        exchanges += 1;
        if r.round_trips == 1 {
            break; // equal
        }
        assert!(
            r.bytes_received
                < (merkle_kv::antientropy::messages::ENTRY_BYTES_PER_REPLY + (2 << 20)) as u64 * 2,
            "{r:?}"
        );
        received += r.entries_received;
        assert!(exchanges < 10, "no progress: {r:?}");
    }
    assert_eq!(received, 40);
    assert!(
        exchanges >= 3,
        "40 MiB cannot fit one 16 MiB reply: {exchanges} exchanges"
    );
}

/// A peer whose data changes while the exchange runs: after every call, a write lands.
struct Moving<'a> {
    node: Shards<'a>,
    writes: u64,
}

impl merkle_kv::antientropy::messages::Peer for Moving<'_> {
    fn call(
        &mut self,
        request: &[u8],
    ) -> Result<Vec<u8>, merkle_kv::antientropy::messages::SyncError> {
        let reply = self.node.call(request);
        self.writes += 1;
        let key = format!("moving:{}", self.writes).into_bytes();
        let v = Version {
            hlc: NOW - 500 + self.writes,
            origin: 9,
        };
        put(self.node.shards, &key, &(v, Some(b"late".to_vec())));
        reply
    }
}

#[test]
fn a_moving_target_does_not_break_an_exchange_and_the_next_one_catches_up() {
    let (mut a, mut b) = (node(2), node(4));
    for i in 0..200 {
        let v = Version {
            hlc: NOW - 5_000 + i,
            origin: 1,
        };
        put(
            &mut b,
            format!("k{i}").as_bytes(),
            &(v, Some(b"x".to_vec())),
        );
    }
    {
        let mut local = Shards {
            shards: &mut a,
            now_us: NOW,
        };
        let mut peer = Moving {
            node: Shards {
                shards: &mut b,
                now_us: NOW,
            },
            writes: 0,
        };
        let r = exchange(&mut local, &mut peer).unwrap();
        // Everything there at the start arrives, and some of what landed meanwhile.
        assert!(r.entries_received >= 200, "{r:?}");
    }
    // The writes made during the exchange are found by the next one.
    let r = sync(&mut a, &mut b);
    assert!(
        r.round_trips > 1,
        "the writes made during the first exchange remain: {r:?}"
    );
    assert_eq!(sync(&mut a, &mut b).round_trips, 1);
}
