//! `merkle-kv watch`: the cluster's change stream and presence records, decoded, one
//! line each, for humans:
//!
//! ```text
//! node-1 SET user:1 "alice" hlc=1764170000123456
//! node-2 DEL user:1 hlc=1764170000200000
//! presence node-3: online addr=127.0.0.1:7880 shards=2 version=0.1.0 clock_ms=1764170000201
//! rejected payload (412 bytes): unknown format version 9 (this node speaks 1)
//! ```

use crate::config::Config;
use crate::replication::changes::{decode, Limits};
use crate::replication::mqtt::{mqtt_options, payload_bytes_max, ReplError, Topics};
use rumqttc::{Event, Packet, QoS};
use std::io::Write;

/// Bytes of a value shown before it is cut with `...`.
const VALUE_SHOWN_BYTES: usize = 64;

/// Print every change published on the broker until `stop` completes (main passes the
/// SIGINT/SIGTERM future).
pub fn run(config: &Config, stop: impl std::future::Future<Output = ()>) -> Result<(), ReplError> {
    let client_id = format!("{}-watch-{}", config.mqtt.client_id, std::process::id());
    let mut options = mqtt_options(config, &client_id)?;
    options.set_clean_session(true);
    let topics = Topics::new(&config.mqtt.topic_prefix);
    let limits = Limits {
        payload_bytes_max: payload_bytes_max(config.network.max_line_bytes),
        value_bytes_max: config.network.max_line_bytes,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ReplError::Thread)?;
    eprintln!(
        "watching {} on {} (Ctrl-C to stop)",
        topics.updates,
        crate::replication::mqtt::broker_address(config)
    );
    rt.block_on(async move {
        let (client, mut eventloop) = crate::replication::mqtt::mqtt_client(options, 16);
        tokio::pin!(stop);
        loop {
            let event = tokio::select! {
                _ = &mut stop => return Ok(()),
                e = eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for t in [&topics.updates, &topics.nodes] {
                        let _ = client.try_subscribe(t.clone(), QoS::AtLeastOnce);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let text = if p.topic == topics.updates {
                        describe_payload(&p.payload, limits)
                    } else {
                        let node = topics.presence_node(&p.topic).unwrap_or(&p.topic);
                        format!("presence {node}: {}\n", String::from_utf8_lossy(&p.payload))
                    };
                    let mut out = std::io::stdout().lock();
                    if out
                        .write_all(text.as_bytes())
                        .and_then(|_| out.flush())
                        .is_err()
                    {
                        return Ok(()); // stdout closed (piped into head, say)
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("broker: {e}; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    })
}

/// One line per event of a payload, or one line saying why it was rejected.
pub fn describe_payload(payload: &[u8], limits: Limits) -> String {
    let d = match decode(payload, limits) {
        Ok(d) => d,
        Err(e) => return format!("rejected payload ({} bytes): {e}\n", payload.len()),
    };
    let mut s = String::new();
    if let Some(hlc) = d.flush {
        s.push_str(&format!("{} FLUSHDB hlc={hlc}\n", d.node_id));
    }
    for e in d.events {
        let key = show(e.key);
        match e.value {
            Some(v) => s.push_str(&format!(
                "{} SET {key} \"{}\" hlc={}\n",
                d.node_id,
                show(v),
                e.hlc
            )),
            None => s.push_str(&format!("{} DEL {key} hlc={}\n", d.node_id, e.hlc)),
        }
    }
    s
}

/// Text as is (UTF-8 included: `café`, not `caf\xc3\xa9`); control characters, quotes
/// and backslashes escaped, bytes that are not UTF-8 as `\xNN`; long values cut.
fn show(bytes: &[u8]) -> String {
    let cut = bytes.len() > VALUE_SHOWN_BYTES;
    let mut s = String::new();
    for chunk in bytes[..bytes.len().min(VALUE_SHOWN_BYTES)].utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '"' || c == '\\' {
                s.extend(c.escape_default());
            } else {
                s.push(c);
            }
        }
        for b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    if cut {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::changes::PayloadBuilder;
    use crate::store::journal::encode_event;

    #[test]
    fn payloads_are_described_one_line_per_event() {
        let mut b = PayloadBuilder::new(1, "node-1");
        let mut e = Vec::new();
        encode_event(&mut e, 10, b"user:1", Some(b"al\"ice\n"));
        encode_event(&mut e, 11, b"user:1", None);
        encode_event(&mut e, 12, "café".as_bytes(), Some(b"caf\xc3\xa9 \xff\x01"));
        crate::store::journal::encode_flush(&mut e, 13);
        b.extend(&e, 4);
        let limits = Limits {
            payload_bytes_max: 1 << 20,
            value_bytes_max: 1 << 20,
        };
        assert_eq!(
            describe_payload(&b.take(), limits),
            "node-1 FLUSHDB hlc=13\nnode-1 SET user:1 \"al\\\"ice\\n\" hlc=10\nnode-1 DEL user:1 hlc=11\n\
             node-1 SET café \"café \\xff\\u{1}\" hlc=12\n"
        );
        assert!(describe_payload(b"\x09junk", limits).starts_with("rejected payload (5 bytes)"));
    }
}
