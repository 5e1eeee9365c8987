//! Fuzz the native protocol front end exactly as a connection runs it, minus sockets:
//! framing (with over-long-line resync), parsing, planning, execution on two shards and
//! reply assembly (`node::session::answer_all`), including anti-entropy messages (`SYNC.MSG`)
//! served by the same shards. Nothing may panic, every reply must end in CRLF (but for
//! SYNC.REPLY's length-prefixed binary body), and a parsed SET must survive a print →
//! parse round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use merkle_kv::node::info::NodeInfo;
use merkle_kv::node::session::answer_all;
use merkle_kv::protocol::native::{parse, Command, Framer, Step};
use merkle_kv::store::shard::{MemoryBudget, Shard};
use merkle_kv::store::version::Version;
use std::cell::RefCell;

/// Small, so the fuzzer reaches the line-too-long and storage-full paths.
const LINE_MAX: usize = 256;

thread_local! {
    // Building shards (65,536 bucket tables, a 4 MB tree) costs far more than a run, so
    // they are built once and reset after any run that stored or flushed something:
    // every run starts from an empty node and a crash reproduces from its input alone.
    static SHARDS: RefCell<Vec<Shard>> = RefCell::new({
        let budget = MemoryBudget::new(1 << 14);
        (0..2).map(|i| Shard::new(i, 1, budget.clone(), LINE_MAX)).collect()
    });
}

fuzz_target!(|data: &[u8]| {
    check_set_round_trip(data);
    SHARDS.with_borrow_mut(|shards| {
        let mut out = Vec::new();
        let used = answer_all(shards, &mut Framer::new(LINE_MAX), data, &mut out, &NodeInfo::default);
        assert!(used <= data.len());
        // Every reply is CRLF-terminated, except SYNC.REPLY's binary body (a length
        // header says where it ends).
        let binary = out.windows(11).any(|w| w == b"SYNC.REPLY ");
        assert!(out.is_empty() || binary || out.ends_with(b"\r\n"));
        for s in shards.iter_mut() {
            let stats = s.snapshot_stats();
            if stats.keys > 0 || stats.tombstones > 0 || s.flushed() != Version::default() {
                s.reset();
            }
        }
    });
});

fn check_set_round_trip(data: &[u8]) {
    let mut framer = Framer::new(LINE_MAX);
    let mut at = 0;
    loop {
        match framer.next(&data[at..]) {
            Step::Line(line, used) => {
                if let Ok(Some(Command::Set(k, v))) = parse(line) {
                    let again = [b"SET ", k, b" ", v].concat();
                    assert_eq!(parse(&again), Ok(Some(Command::Set(k, v))));
                }
                at += used;
            }
            Step::Skip(n) => at += n,
            Step::TooLong => {}
            Step::NeedMore => return,
        }
    }
}
