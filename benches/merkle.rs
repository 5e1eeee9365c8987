//! Write-path cost as the store grows: a SET that overwrites an existing key (hash
//! table + incremental Merkle leaf update) and the root after a batch of writes, on a
//! shard that really holds 10k and then 1M entries. Flat numbers from 10k to 1M are
//! the point: nothing here may scan the data or rebuild the tree.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use merkle_kv::store::keyspace::KeyHash;
use merkle_kv::store::merkle::{entry_digest, Subtree};
use merkle_kv::store::shard::{MemoryBudget, Shard};
use std::hint::black_box;

const SIZES: [usize; 2] = [10_000, 1_000_000];

fn key(i: usize) -> Vec<u8> {
    format!("key:{i:09}").into_bytes() // 13 bytes, as in the memory benchmark
}

fn filled(n: usize) -> (Shard, Vec<(KeyHash, Vec<u8>)>) {
    let mut shard = Shard::new(0, 0, MemoryBudget::unlimited(), 1 << 20);
    let keys: Vec<(KeyHash, Vec<u8>)> = (0..n).map(|i| (KeyHash::of(&key(i)), key(i))).collect();
    for (h, k) in &keys {
        shard.set(*h, k, &[b'a'; 32]).unwrap();
    }
    shard.root();
    (shard, keys)
}

/// Keys visited in a scattered but repeatable order (no cache-friendly sequence).
fn scattered(i: usize, n: usize) -> usize {
    (i.wrapping_mul(2_654_435_761)) % n
}

fn set_overwrite(c: &mut Criterion) {
    let mut g = c.benchmark_group("set_overwrite");
    g.throughput(Throughput::Elements(1));
    for n in SIZES {
        let (mut shard, keys) = filled(n);
        let mut i = 0usize;
        let mut value = [b'b'; 32];
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let (h, k) = &keys[scattered(i, n)];
                value[0] = i as u8;
                shard.set(*h, k, &value).unwrap();
                i += 1;
            })
        });
    }
    g.finish();
}

fn root_after_batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("root_after_batch");
    for n in SIZES {
        let (mut shard, keys) = filled(n);
        for batch in [1usize, 100, 10_000] {
            g.throughput(Throughput::Elements(batch as u64));
            let mut round = 0usize;
            g.bench_function(BenchmarkId::new(format!("{n}_keys"), batch), |b| {
                b.iter(|| {
                    round += 1;
                    for j in 0..batch {
                        let (h, k) = &keys[scattered(round * batch + j, n)];
                        shard.set(*h, k, &[round as u8; 32]).unwrap();
                    }
                    black_box(shard.root())
                })
            });
        }
    }
    g.finish();
}

/// The tree alone: leaf toggle + root, without the hash table.
fn tree_only(c: &mut Criterion) {
    let mut g = c.benchmark_group("tree_only");
    let d = entry_digest(b"key:000000001", Some(&[b'a'; 32]));
    g.bench_function("toggle", |b| {
        let mut tree = Subtree::new(16);
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            tree.toggle(scattered(i, 1 << 16), &d);
        })
    });
    g.bench_function("toggle_then_root", |b| {
        let mut tree = Subtree::new(16);
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            tree.toggle(scattered(i, 1 << 16), &d);
            black_box(tree.root())
        })
    });
    g.bench_function("entry_digest_13B_key_32B_value", |b| {
        b.iter(|| entry_digest(black_box(b"key:000000001"), Some(black_box(&[b'a'; 32]))))
    });
    // The reference point: what an implementation that rebuilds the tree on every write
    // pays (all 65,535 interior nodes of the 2^16-leaf tree).
    let leaves: Vec<[u8; 32]> = (0..1u32 << 16)
        .map(|i| entry_digest(&i.to_le_bytes(), Some(b"v")))
        .collect();
    g.bench_function("rebuild_all_65536_leaves", |b| {
        b.iter(|| black_box(merkle_kv::store::merkle::combine_roots(&leaves)))
    });
    g.finish();
}

criterion_group!(benches, set_overwrite, root_after_batch, tree_only);
criterion_main!(benches);
