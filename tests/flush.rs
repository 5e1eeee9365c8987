//! FLUSHDB is cluster-wide, on real processes: a flush on one node empties every
//! replica, reaches a node that missed it through anti-entropy, and is never undone by
//! an exchange with a node that still holds the flushed entries; writes made after the
//! flush survive it (docs/PROTOCOL.md, FLUSHDB).

mod common;

use common::{eventually, Broker, BrokerKind, Node};
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(30);

fn dbsize(n: &Node) -> u64 {
    n.client().one("DBSIZE").parse().unwrap()
}

fn get(n: &Node, k: &str) -> String {
    n.client().one(&format!("GET {k}"))
}

/// `SYNC` from `from` to `to`: one complete exchange, or a panic with the reply.
fn sync(from: &Node, to: &Node) {
    let line = from.client().one(&format!("SYNC 127.0.0.1:{}", to.port));
    assert!(line.starts_with("OK "), "SYNC failed: {line}");
}

/// Pipelined `SET {prefix}{i} v{i}` for `0..n`.
fn fill(n: &Node, prefix: &str, count: usize) {
    let mut c = n.client();
    let batch: String = (0..count)
        .map(|i| format!("SET {prefix}{i} v{i}\r\n"))
        .collect();
    c.send(batch.as_bytes());
    for _ in 0..count {
        assert_eq!(c.line(), "OK");
    }
}

fn wait_dbsize(nodes: &[&Node], want: u64, what: &str) {
    eventually(SETTLE, what, || {
        nodes.iter().all(|n| dbsize(n) == want).then_some(())
    });
}

#[test]
fn flushdb_on_one_node_empties_the_cluster_and_anti_entropy_does_not_bring_keys_back() {
    // A and B replicate through the broker and exchange with each other; C is not on
    // the broker at all (it never hears a change by MQTT) and exchanges with A.
    let broker = Broker::start(BrokerKind::Embedded);
    let prefix = format!("flush-{}", std::process::id());
    let ae = "anti_entropy.enabled = true\nanti_entropy.interval_seconds = 1";
    let a = Node::replicated(&broker, &prefix, ae);
    let b = Node::replicated(&broker, &prefix, ae);
    eventually(SETTLE, "A and B see each other", || {
        let up = |n: &Node| n.field("INFO", "peers_online") == "1";
        (up(&a) && up(&b)).then_some(())
    });
    let c = Node::start(&format!(
        "storage.pin_threads = false\n{ae}\nanti_entropy.peer_list = [\"127.0.0.1:{}\"]",
        a.port
    ));
    fill(&a, "from-a:", 100);
    fill(&c, "from-c:", 100);
    wait_dbsize(&[&a, &b, &c], 200, "every node holds every key");

    assert_eq!(b.client().one("FLUSHDB"), "OK");
    assert_eq!(dbsize(&b), 0);
    wait_dbsize(&[&a, &b, &c], 0, "the flush empties every node");

    // A write after the flush survives it everywhere.
    assert_eq!(c.client().one("SET after-flush yes"), "OK");
    eventually(
        SETTLE,
        "the write after the flush reaches every node",
        || {
            [&a, &b, &c]
                .iter()
                .all(|n| get(n, "after-flush") == "yes")
                .then_some(())
        },
    );
    // Exchanges in every direction (on top of the periodic ones) bring nothing back.
    for (from, to) in [(&c, &a), (&a, &c), (&b, &a), (&a, &b), (&c, &b), (&b, &c)] {
        sync(from, to);
    }
    for n in [&a, &b, &c] {
        assert_eq!(dbsize(n), 1, "a flushed key came back on {}", n.port);
        assert_eq!(get(n, "from-a:7"), "(null)");
        assert_eq!(get(n, "from-c:7"), "(null)");
    }
    let root = a.client().one("HASH");
    assert_eq!(b.client().one("HASH"), root);
    assert_eq!(c.client().one("HASH"), root);
}

#[test]
fn a_node_that_missed_a_flush_drops_its_old_entries_instead_of_pushing_them_back() {
    // No broker: A is flushed while C and D, which hold A's keys, hear nothing of it.
    let standalone = || {
        let config = "mqtt.enabled = false\nstorage.pin_threads = false\nstorage.shards = 2";
        Node::start_with_env(config, &[("RUST_LOG", "info")])
    };
    let (a, c, d) = (standalone(), standalone(), standalone());
    fill(&a, "old:", 100);
    a.client().one("DEL old:0"); // a tombstone is flushed too
    sync(&c, &a);
    sync(&d, &a);
    wait_dbsize(&[&a, &c, &d], 99, "C and D hold A's keys");

    assert_eq!(a.client().one("FLUSHDB"), "OK");
    assert_eq!(a.client().one("SET a-after 1"), "OK");
    // Made after the flush on a node that has not heard of it: newer, so it stays.
    assert_eq!(c.client().one("SET c-after 1"), "OK");

    // The node that missed the flush starts the exchange...
    sync(&c, &a);
    // ...and says so, whether its shards were reached through their inboxes (C started
    // the exchange) or over its client port (D, below).
    let said = "an anti-entropy peer knew of a newer FLUSHDB: applied its flush marker";
    assert!(c.log().contains(said), "C's log:\n{}", c.log());
    for n in [&a, &c] {
        assert_eq!(dbsize(n), 2, "node {}", n.port);
        assert_eq!(get(n, "a-after"), "1");
        assert_eq!(get(n, "c-after"), "1");
        assert_eq!(get(n, "old:5"), "(null)");
    }
    // ...or is the peer of one that knows of it.
    sync(&a, &d);
    assert!(d.log().contains(said), "D's log:\n{}", d.log());
    assert_eq!(dbsize(&d), 2);
    assert_eq!(dbsize(&a), 2);
    assert_eq!(get(&d, "old:5"), "(null)");
    let root = a.client().one("HASH");
    assert_eq!(c.client().one("HASH"), root);
    assert_eq!(d.client().one("HASH"), root);
}

#[test]
fn a_flush_made_while_the_broker_is_down_reaches_every_node_and_late_changes_stay_flushed() {
    let mut broker = Broker::start(BrokerKind::Embedded);
    let prefix = format!("flush-down-{}", std::process::id());
    let ae = "anti_entropy.enabled = true\nanti_entropy.interval_seconds = 1";
    let nodes: Vec<Node> = (0..3)
        .map(|_| Node::replicated(&broker, &prefix, ae))
        .collect();
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    eventually(SETTLE, "the nodes see each other", || {
        nodes
            .iter()
            .all(|n| n.field("INFO", "peers_online") == "2")
            .then_some(())
    });
    fill(a, "old:", 50);
    wait_dbsize(&[a, b, c], 50, "the keys replicate");

    broker.kill();
    for n in &nodes {
        eventually(SETTLE, "the nodes notice the outage", || {
            (n.field("INFO", "replication") == "disconnected").then_some(())
        });
    }
    // Made before the flush, held in B's offline buffer: published only after it.
    assert_eq!(b.client().one("SET late 1"), "OK");
    assert_eq!(a.client().one("FLUSHDB"), "OK");
    // Nobody hears the flush by MQTT: anti-entropy carries it to every node.
    wait_dbsize(
        &[a, b, c],
        0,
        "the flush reaches every node by anti-entropy",
    );
    assert_eq!(c.client().one("SET after 1"), "OK");
    wait_dbsize(
        &[a, b, c],
        1,
        "the write after the flush reaches every node",
    );

    // The broker returns: B's late change and A's flush go out now, in any order.
    broker.restart();
    eventually(SETTLE, "the buffered changes are delivered", || {
        let sent = b.stat("repl_buffered_events") == 0 && a.stat("repl_buffered_events") == 0;
        (sent && a.stat("repl_received_events") >= 2 && c.stat("repl_received_events") >= 52)
            .then_some(())
    });
    for (i, n) in nodes.iter().enumerate() {
        sync(n, &nodes[(i + 1) % nodes.len()]);
        assert_eq!(get(n, "late"), "(null)", "a flushed change came back");
        assert_eq!(get(n, "after"), "1");
        assert_eq!(dbsize(n), 1);
    }
}
