//! The request path without sockets: parsing lines, and executing a pipelined batch of
//! 16 commands (parse → plan → execute on shards → assemble replies).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use merkle_kv::node::info::NodeInfo;
use merkle_kv::node::session::answer_all;
use merkle_kv::protocol::native::{parse, Framer};
use merkle_kv::store::shard::{MemoryBudget, Shard};
use std::hint::black_box;

fn parser(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    let set = format!("SET key:00012345 {}", "v".repeat(32));
    g.bench_function("set_32B", |b| b.iter(|| parse(black_box(set.as_bytes()))));
    g.bench_function("get", |b| b.iter(|| parse(black_box(b"GET key:00012345"))));
    g.bench_function("mget_8", |b| {
        b.iter(|| parse(black_box(b"MGET k1 k2 k3 k4 k5 k6 k7 k8")))
    });
    g.finish();
}

/// 16 pipelined commands, SET:GET 1:10 like the load test, on a 2-shard node.
fn pipeline(c: &mut Criterion) {
    let mut g = c.benchmark_group("execute_pipeline16");
    let mut input = String::new();
    for i in 0..16 {
        if i % 11 == 0 {
            input += &format!("SET key:{:08} {}\r\n", i * 7919 % 100_000, "v".repeat(32));
        } else {
            input += &format!("GET key:{:08}\r\n", i * 7919 % 100_000);
        }
    }
    let data = input.as_bytes();
    let mut shards: Vec<Shard> = (0..2)
        .map(|i| Shard::new(i, 1, MemoryBudget::unlimited(), 1 << 20))
        .collect();
    {
        let mut fill = String::new();
        for i in 0..100_000 {
            fill += &format!("SET key:{i:08} {}\r\n", "v".repeat(32));
        }
        run(&mut shards, fill.as_bytes(), &mut Vec::new());
    }
    let mut out = Vec::new();
    g.throughput(Throughput::Elements(16));
    g.bench_function("100k_keys", |b| {
        b.iter(|| {
            out.clear();
            run(&mut shards, data, &mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

/// One MGET of 200k keys (32 B values) on a 2-shard node: the per-key cost of planning
/// it in bounded runs and streaming the values (the continuation must stay linear).
fn mget_200k(c: &mut Criterion) {
    const KEYS: usize = 200_000;
    let mut g = c.benchmark_group("mget");
    g.sample_size(10);
    let mut shards: Vec<Shard> = (0..2)
        .map(|i| Shard::new(i, 1, MemoryBudget::unlimited(), 1 << 20))
        .collect();
    let mut fill = String::new();
    let mut mget = String::from("MGET");
    for i in 0..KEYS {
        fill += &format!("SET key:{i:08} {}\r\n", "v".repeat(32));
        mget += &format!(" key:{i:08}");
    }
    mget += "\r\n";
    run(&mut shards, fill.as_bytes(), &mut Vec::new());
    let mut out = Vec::new();
    g.throughput(Throughput::Elements(KEYS as u64));
    g.bench_function("200k_keys_32B", |b| {
        b.iter(|| {
            out.clear();
            run_with(&mut shards, 8 << 20, mget.as_bytes(), &mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

fn run(shards: &mut [Shard], data: &[u8], out: &mut Vec<u8>) {
    run_with(shards, 1 << 20, data, out);
}

fn run_with(shards: &mut [Shard], line_bytes_max: usize, data: &[u8], out: &mut Vec<u8>) {
    answer_all(
        shards,
        &mut Framer::new(line_bytes_max),
        data,
        out,
        &NodeInfo::default,
    );
}

criterion_group!(benches, parser, pipeline, mget_200k);
criterion_main!(benches);
