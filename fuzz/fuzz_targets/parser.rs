//! Fuzz the native protocol front end: framing, parsing, planning, execution on two
//! shards and reply assembly. Nothing may panic, every reply must end in CRLF, and a
//! parsed SET must survive a print → parse round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use merkle_kv::dispatch::{execute_all, Batch, NodeInfo, Results};
use merkle_kv::protocol::{next_line, parse, Command, Frame};
use merkle_kv::shard::Shard;

const LINE_MAX: usize = 4096;

fn info() -> NodeInfo {
    NodeInfo {
        node_id: "fuzz".into(),
        uptime_seconds: 0,
        bind: "127.0.0.1:0".into(),
        io_threads: 0,
        connections_current: 0,
        connections_max: 1,
        connections_total: 0,
        connections_rejected: 0,
        protocol_errors: 0,
    }
}

thread_local! {
    // Building shards (65,536 bucket tables, a 4 MB tree) costs more than a run, so
    // they live across runs; the 64 KiB budget per shard keeps their state small.
    static SHARDS: std::cell::RefCell<Vec<Shard>> =
        std::cell::RefCell::new((0..2).map(|i| Shard::new(i, 1, 1 << 16, LINE_MAX)).collect());
}

fuzz_target!(|data: &[u8]| SHARDS.with_borrow_mut(|shards| run(shards, data)));

fn run(shards: &mut [Shard], data: &[u8]) {
    let mut batch = Batch::new(1);
    let mut at = 0;
    loop {
        match next_line(&data[at..], LINE_MAX) {
            Frame::Line(line, used) => {
                let parsed = parse(line);
                if let Ok(Some(Command::Set(k, v))) = parsed {
                    let again = [b"SET ", k, b" ", v].concat();
                    assert_eq!(parse(&again), Ok(Some(Command::Set(k, v))));
                }
                if let Some(p) = parsed.transpose() {
                    batch.push(p, data);
                }
                at += used;
            }
            Frame::Incomplete | Frame::TooLong => break,
        }
        if batch.stopped() {
            break;
        }
    }
    let mut results = Results::default();
    execute_all(shards, &batch, data, &mut results);
    let mut out = Vec::new();
    batch.assemble(data, &results, &info, &mut out);
    assert!(out.is_empty() || out.ends_with(b"\r\n"));
}
