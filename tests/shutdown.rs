//! A node that stops keeps what it acknowledged: it publishes until the broker confirms,
//! or hands its changes to a peer when the broker is gone.

mod common;
use common::{eventually, Broker, BrokerKind, Node};
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(20);

fn pair(broker: &Broker, prefix: &str) -> (Node, Node) {
    let a = Node::replicated(broker, prefix, "");
    let b = Node::replicated(broker, prefix, "");
    for n in [&a, &b] {
        eventually(SETTLE, "both connected and seeing each other", || {
            let up = n.field("INFO", "replication") == "connected";
            (up && n.field("INFO", "peers_online") == "1").then_some(())
        });
    }
    (a, b)
}

#[test]
fn with_the_broker_down_a_stopping_node_hands_its_writes_to_a_peer() {
    let mut broker = Broker::start(BrokerKind::Embedded);
    let (mut a, b) = pair(&broker, &format!("stop-{}", std::process::id()));
    broker.kill();
    eventually(SETTLE, "the node sees the broker gone", || {
        (a.field("INFO", "replication") != "connected").then_some(())
    });
    let mut c = a.client();
    assert_eq!(c.one("SET only-here acknowledged"), "OK");
    assert_eq!(c.one("MSET k1 1 k2 2"), "OK");
    assert_eq!(c.one("SHUTDOWN"), "OK");
    let status = a
        .wait_exit(Duration::from_secs(30))
        .expect("the node exits");
    assert!(status.success());
    // Anti-entropy is off on both: nothing but the stopping node's hand-off can carry it.
    let mut peer = b.client();
    assert_eq!(peer.one("GET only-here"), "acknowledged");
    assert_eq!(peer.cmd("MGET k1 k2"), ["VALUES 2", "1", "2"]);
    let log = a.log();
    assert!(log.contains("handed them to"), "{log}");
}

#[test]
fn with_nobody_to_take_them_the_loss_is_logged_exactly() {
    let mut broker = Broker::start(BrokerKind::Embedded);
    let mut a = Node::replicated(
        &broker,
        &format!("alone-{}", std::process::id()),
        "mqtt.shutdown_flush_ms = 1000",
    );
    eventually(SETTLE, "connected", || {
        (a.field("INFO", "replication") == "connected").then_some(())
    });
    broker.kill();
    eventually(SETTLE, "the node sees the broker gone", || {
        (a.field("INFO", "replication") != "connected").then_some(())
    });
    assert_eq!(a.client().one("MSET x 1 y 2 z 3"), "OK");
    a.signal("TERM");
    assert!(a
        .wait_exit(Duration::from_secs(30))
        .expect("exits")
        .success());
    let log = a.log();
    assert!(
        log.contains(
            "stopping with 3 changes neither confirmed by the broker nor handed to a peer"
        ),
        "{log}"
    );
    assert!(!log.contains("peers repair"), "{log}");
}
