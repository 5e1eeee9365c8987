//! Anti-entropy's pure core at scale: two nodes holding the same 1,000,000 keys (made
//! equal as replication would: the same writes, same versions), then `d` keys changed
//! on one side. One exchange repairs them; criterion times it (both sides in this
//! thread, no network), and a table of round trips and bytes on the wire is printed
//! against the minimum (the changed entries' own bytes) and shipping everything.

use criterion::{criterion_group, criterion_main, Criterion};
use merkle_kv::antientropy::exchange::exchange;
use merkle_kv::antientropy::serve::Shards;
use merkle_kv::store::keyspace::KeyHash;
use merkle_kv::store::shard::{MemoryBudget, Shard};
use merkle_kv::store::version::Version;

const KEYS: usize = 1_000_000;
const NOW: u64 = 1_800_000_000_000_000;

fn key(i: usize) -> Vec<u8> {
    format!("key:{i:09}").into_bytes() // 13 bytes
}

fn node() -> Vec<Shard> {
    (0..2)
        .map(|i| Shard::new(i, 1, MemoryBudget::unlimited(), 1 << 20))
        .collect()
}

fn write(n: &mut [Shard], k: &[u8], value: &[u8], hlc: u64) {
    let h = KeyHash::of(k);
    let v = Version { hlc, origin: 1 };
    n[h.shard(1)].apply(h, k, Some(value), v, NOW);
}

fn pair() -> (Vec<Shard>, Vec<Shard>) {
    let (mut a, mut b) = (node(), node());
    for i in 0..KEYS {
        let k = key(i);
        write(&mut a, &k, &[b'a'; 32], NOW - 20_000_000_000 + i as u64);
        write(&mut b, &k, &[b'a'; 32], NOW - 20_000_000_000 + i as u64);
    }
    (a, b)
}

/// Change `d` keys on `b` (spread over the key space): newer versions, and a value
/// no earlier round wrote (equal contents would be no difference at all).
fn diverge(b: &mut [Shard], d: usize, round: u64) {
    let value = format!("{round:032}");
    for j in 0..d {
        let i = (j * 7_919 + round as usize) % KEYS;
        write(
            b,
            &key(i),
            value.as_bytes(),
            NOW - 10_000_000_000 + round * 10_000 + j as u64,
        );
    }
}

fn bench(c: &mut Criterion) {
    let (mut a, mut b) = pair();
    let entry_bytes = 13 + 32;
    eprintln!("\nd | round trips | bytes sent | bytes received | total | minimum (d × 45 B) | ratio | all 1M entries");
    for (round, d) in [0usize, 1, 100, 10_000].into_iter().enumerate() {
        diverge(&mut b, d, round as u64 + 1);
        let r = exchange(
            &mut Shards {
                shards: &mut a,
                now_us: NOW,
            },
            &mut Shards {
                shards: &mut b,
                now_us: NOW,
            },
        )
        .unwrap();
        assert_eq!(r.keys_repaired, d as u64);
        let total = r.bytes_sent + r.bytes_received;
        let min = (d * entry_bytes).max(1);
        eprintln!(
            "{d} | {} | {} | {} | {total} | {} | {:.1}x | {} B",
            r.round_trips,
            r.bytes_sent,
            r.bytes_received,
            d * entry_bytes,
            total as f64 / min as f64,
            KEYS * entry_bytes
        );
    }
    let mut g = c.benchmark_group("antientropy_1M_keys");
    g.sample_size(10);
    let mut round = 10;
    for d in [0usize, 1, 100, 10_000] {
        g.bench_function(format!("exchange_d{d}"), |bench| {
            // Diverging again before every exchange is setup, not measured.
            bench.iter_custom(|iters| {
                let mut spent = std::time::Duration::ZERO;
                for _ in 0..iters {
                    if d > 0 {
                        // Rounds move versions forward: only count those that write.
                        round += 1;
                        diverge(&mut b, d, round);
                    }
                    let t = std::time::Instant::now();
                    let mut local = Shards {
                        shards: &mut a,
                        now_us: NOW,
                    };
                    let mut peer = Shards {
                        shards: &mut b,
                        now_us: NOW,
                    };
                    let r = exchange(&mut local, &mut peer).unwrap();
                    assert_eq!(
                        r.keys_repaired, d as u64,
                        "every change is repaired: {r:?} round {round}"
                    );
                    spent += t.elapsed();
                }
                spent
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
