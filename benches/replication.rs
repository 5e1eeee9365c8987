//! The replication codec: encoding a batch of change events into one payload (what a
//! shard's journal and the replication thread do per write), decoding it, and routing
//! it to shards (what a receiving node does before applying). Per event, at the
//! default batch size (512) and one event per payload.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use merkle_kv::replication::changes::{decode, Limits, PayloadBuilder};
use merkle_kv::replication::inbound::route;
use merkle_kv::store::journal::encode_event;
use std::hint::black_box;

const LIMITS: Limits = Limits {
    payload_bytes_max: 1 << 22,
    value_bytes_max: 1 << 20,
};

fn payload(events: usize) -> Vec<u8> {
    let mut journal = Vec::new();
    for i in 0..events {
        let key = format!("key:{i:09}"); // 13 bytes, 32-byte values: the load-test shape
        encode_event(
            &mut journal,
            1_764_000_000_000_000 + i as u64,
            key.as_bytes(),
            Some(&[b'v'; 32]),
        );
    }
    let mut b = PayloadBuilder::new(0x1234_5678, "node-1");
    b.extend(&journal, events as u32);
    b.take()
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("replication_codec");
    for events in [1usize, 512] {
        g.throughput(Throughput::Elements(events as u64));
        let keys: Vec<String> = (0..events).map(|i| format!("key:{i:09}")).collect();
        let mut journal = Vec::with_capacity(64 * events);
        let mut b = PayloadBuilder::new(0x1234_5678, "node-1");
        g.bench_function(BenchmarkId::new("encode", events), |bench| {
            bench.iter(|| {
                journal.clear();
                for (i, k) in keys.iter().enumerate() {
                    encode_event(
                        &mut journal,
                        1_764_000_000_000_000 + i as u64,
                        k.as_bytes(),
                        Some(&[b'v'; 32]),
                    );
                }
                b.extend(&journal, events as u32);
                black_box(b.take())
            })
        });
        let p = payload(events);
        g.bench_function(BenchmarkId::new("decode", events), |bench| {
            bench.iter(|| black_box(decode(black_box(&p), LIMITS).unwrap().events.len()))
        });
        let data = bytes::Bytes::from(p);
        g.bench_function(
            BenchmarkId::new("decode_and_route_2_shards", events),
            |bench| bench.iter(|| black_box(route(black_box(&data), 1, LIMITS).unwrap().events)),
        );
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
