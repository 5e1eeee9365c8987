//! Readiness at start (LOADING), on real processes: a node that may have peers to learn
//! from serves no data command until it has caught up with one (docs/PROTOCOL.md).

mod common;
use common::{eventually, free_port, Broker, BrokerKind, Node};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

const SETTLE: Duration = Duration::from_secs(30);
const LOADING: &str = "ERROR: LOADING node is synchronising with its peers";

/// Anti-entropy on, peers found by presence; the periodic rounds far apart, so what a
/// restarted node knows early comes from its bootstrap.
fn replicated(broker: &Broker, prefix: &str) -> Node {
    Node::replicated(
        broker,
        prefix,
        "anti_entropy.enabled = true\nanti_entropy.interval_seconds = 3600",
    )
}

#[test]
fn a_node_restarted_empty_cannot_reset_a_replicated_counter() {
    let broker = Broker::start(BrokerKind::Embedded);
    let prefix = format!("ready-{}", std::process::id());
    let a = replicated(&broker, &prefix);
    let mut b = replicated(&broker, &prefix);
    let mut c = a.client();
    let incrs = "INCR counter\r\n".repeat(1000);
    c.send(incrs.as_bytes());
    for i in 1..=1000 {
        assert_eq!(c.line(), i.to_string());
    }
    eventually(SETTLE, "the counter replicates", || {
        (b.client().one("GET counter") == "1000").then_some(())
    });

    b.restart_listening(); // in memory: it comes back empty
    let mut client = b.client();
    let started = Instant::now();
    let first = loop {
        let reply = client.one("INCR counter");
        if reply != LOADING {
            break reply;
        }
        assert!(started.elapsed() < SETTLE, "still LOADING after {SETTLE:?}");
        std::thread::sleep(Duration::from_millis(20)); // a client retrying, not spinning
    };
    assert_eq!(
        first, "1001",
        "an INCR on the restarted node reset the counter"
    );
    eventually(SETTLE, "the increment reaches the other node", || {
        (a.client().one("GET counter") == "1001").then_some(())
    });
    assert!(b.field("INFO", "bootstrap").starts_with("synced with"));
}

#[test]
fn while_loading_data_commands_wait_and_the_rest_work() {
    // A peer that says it is ready and then never answers the exchange keeps the node
    // LOADING until its bootstrap timeout.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake = silent.try_clone().unwrap();
    std::thread::spawn(move || {
        for conn in fake.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut first = [0u8; 4];
                if conn.read_exact(&mut first).is_ok() && &first == b"INFO" {
                    let _ = conn.write_all(b"INFO 1\r\nloading:0\r\n");
                }
                // Anything else (SYNC.MSG): hold the connection, answer nothing.
                let mut sink = [0u8; 4096];
                while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    let node = Node::launch_on(
        free_port(),
        &format!(
            "mqtt.enabled = false\nanti_entropy.enabled = true\n\
             anti_entropy.bootstrap_timeout_seconds = 3\n\
             anti_entropy.peer_list = [\"{}\"]",
            silent.local_addr().unwrap()
        ),
    );
    let mut c = node.client();
    for cmd in [
        "GET a",
        "SET a 1",
        "DEL a",
        "DEL a b",
        "EXISTS a",
        "MGET a b",
        "MSET a 1 b 2",
        "INCR n",
        "DECR n",
        "APPEND a x",
        "PREPEND a x",
        "SCAN *",
        "DBSIZE",
        "FLUSHDB",
    ] {
        assert_eq!(c.one(cmd), LOADING, "{cmd}");
    }
    assert_eq!(c.one("PING"), "PONG");
    assert_eq!(c.one("ECHO hi"), "hi");
    assert!(c.one("VERSION").starts_with("VERSION "));
    assert_eq!(c.one("HASH").len(), 64);
    assert!(c.cmd("HASH SHARDS")[0].starts_with("SHARDS "));
    assert!(c.cmd("STATS")[0].starts_with("STATS "));
    assert_eq!(node.field("INFO", "loading"), "1");
    assert!(node.field("INFO", "bootstrap").contains("exchanging with"));
    // SYNC.MSG is served while loading: a_cluster_cold_start_does_not_wait_for_the_timeout.

    // Then the timeout passes: ready, with a warning in the log.
    node.wait_loaded();
    assert!(node.field("INFO", "bootstrap").starts_with("timed out"));
    assert_eq!(node.client().one("SET a 1"), "OK");
    assert!(node.log().contains("bootstrap timed out"), "{}", node.log());
    drop(silent);
}

#[test]
fn nodes_with_nobody_to_learn_from_are_ready_at_once_or_soon() {
    // Standalone, or anti-entropy off: no bootstrap at all.
    let alone = Node::launch_on(free_port(), "mqtt.enabled = false");
    assert_eq!(alone.field("INFO", "loading"), "0");
    let broker = Broker::start(BrokerKind::Embedded);
    let no_ae = Node::replicated(&broker, "no-ae", "");
    assert_eq!(no_ae.field("INFO", "loading"), "0");
    assert_eq!(no_ae.field("INFO", "bootstrap"), "not needed");

    // Every peer_list address refuses, and no broker: ready as soon as that is known.
    let dead = free_port();
    let refused = Node::launch_on(
        free_port(),
        &format!(
            "mqtt.enabled = false\nanti_entropy.enabled = true\n\
             anti_entropy.peer_list = [\"127.0.0.1:{dead}\"]"
        ),
    );
    refused.wait_loaded();
    assert!(refused
        .field("INFO", "bootstrap")
        .starts_with("no peer to learn from"));

    // The first node on a broker: nobody announces themselves within the settle time.
    let first = Node::launch_on(
        free_port(),
        &format!(
            "mqtt.broker_address = \"tcp://127.0.0.1:{}\"\nmqtt.topic_prefix = \"first\"\n\
             anti_entropy.enabled = true",
            broker.port
        ),
    );
    first.wait_loaded();
    assert!(first
        .field("INFO", "bootstrap")
        .starts_with("no peer to learn from"));
}

/// The node's own account of when it became ready: `bootstrap:<why> (after N ms)`.
fn ready_after_ms(node: &Node) -> u64 {
    let how = node.field("INFO", "bootstrap");
    let ms = how
        .rsplit_once("(after ")
        .and_then(|(_, r)| r.strip_suffix(" ms)"));
    ms.and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no time in {how:?}"))
}

#[test]
fn a_node_with_no_config_file_is_ready_within_two_seconds() {
    // No --config: the defaults (embedded broker, anti-entropy on), on free ports.
    let (port, mqtt) = (free_port(), free_port());
    let child = std::process::Command::new(common::BIN)
        .env("MERKLE_KV_NETWORK_BIND_PORT", port.to_string())
        .env(
            "MERKLE_KV_MQTT_EMBEDDED_BROKER_LISTEN",
            format!("127.0.0.1:{mqtt}"),
        )
        .env(
            "MERKLE_KV_MQTT_BROKER_ADDRESS",
            format!("tcp://127.0.0.1:{mqtt}"),
        )
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let node = Node {
        child,
        port,
        config: common::temp_path("no-config.toml"),
    };
    eventually(SETTLE, "the node listens", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    node.wait_loaded();
    assert!(node
        .field("INFO", "bootstrap")
        .starts_with("no peer to learn from"));
    let ms = ready_after_ms(&node);
    assert!(ms < 2000, "ready after {ms} ms");
}

#[test]
fn a_cluster_cold_start_does_not_wait_for_the_timeout() {
    // Two nodes started together on one broker: each sees the other announced while
    // both are loading, no ready peer answers, and an exchange between two loading nodes
    // completes (SYNC.MSG is served while loading).
    let broker = Broker::start(BrokerKind::Embedded);
    let cfg = format!(
        "mqtt.broker_address = \"tcp://127.0.0.1:{}\"\nmqtt.topic_prefix = \"cold-{}\"\n\
         storage.pin_threads = false\nanti_entropy.enabled = true\n\
         anti_entropy.bootstrap_timeout_seconds = 120",
        broker.port,
        std::process::id()
    );
    let a = Node::launch_on(free_port(), &cfg);
    let b = Node::launch_on(free_port(), &cfg);
    a.wait_loaded();
    b.wait_loaded();
    let how = [a.field("INFO", "bootstrap"), b.field("INFO", "bootstrap")];
    assert!(
        how.iter().any(|h| h.starts_with("synced with")),
        "no exchange between the starting nodes: {how:?}"
    );
    assert!(
        how.iter().all(|h| !h.starts_with("timed out")),
        "a cold start waited for the timeout: {how:?}"
    );
}
