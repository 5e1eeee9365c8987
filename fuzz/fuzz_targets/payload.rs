//! Fuzz the receiving side of replication as the replication thread and a shard run it:
//! decode and route a payload (`replication::inbound::route`), then apply its events with the
//! merge (`apply_remote`) on two shards. Nothing may panic, and what decodes must
//! re-encode to a payload that decodes to the same events.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use merkle_kv::node::inbox::RemoteChanges;
use merkle_kv::replication::changes::{decode, Limits, PayloadBuilder};
use merkle_kv::replication::inbound::{apply_remote, route};
use merkle_kv::store::journal::{encode_event, encode_flush};
use merkle_kv::store::shard::{MemoryBudget, Shard};
use std::cell::RefCell;

const LIMITS: Limits = Limits {
    payload_bytes_max: 1 << 16,
    value_bytes_max: 256,
};

thread_local! {
    static SHARDS: RefCell<Vec<Shard>> = RefCell::new({
        let budget = MemoryBudget::new(1 << 14);
        (0..2).map(|i| Shard::new(i, 1, budget.clone(), 256)).collect()
    });
}

fuzz_target!(|data: &[u8]| {
    let Ok(d) = decode(data, LIMITS) else { return };
    // Re-encoding what was decoded decodes to the same events.
    let mut b = PayloadBuilder::new(d.origin, d.node_id);
    let mut e = Vec::new();
    for ev in &d.events {
        encode_event(&mut e, ev.hlc, ev.key, ev.value);
    }
    if let Some(hlc) = d.flush {
        encode_flush(&mut e, hlc);
    }
    b.extend(&e, (d.events.len() + usize::from(d.flush.is_some())) as u32);
    let again = b.take();
    assert_eq!(decode(&again, LIMITS).unwrap(), d);

    let bytes = Bytes::copy_from_slice(data);
    let routed = route(&bytes, 1, LIMITS).expect("decoded once, routes");
    SHARDS.with_borrow_mut(|shards| {
        for (shard, events) in shards.iter_mut().zip(routed.per_shard) {
            let changes = RemoteChanges {
                data: bytes.clone(),
                origin: routed.origin,
                events,
                flush: routed.flush,
            };
            apply_remote(shard, &changes, 1_800_000_000_000_000);
            shard.reset(); // a flush marker would refuse the next input's events
        }
    });
});
