//! Anti-entropy between real node processes (replication off): divergent writes,
//! deletes and conflicting writes on each side; one `SYNC` makes both equal.

mod common;

use common::Node;
use std::collections::BTreeMap;
use std::io::{Read, Write};

fn standalone(extra: &str) -> Node {
    Node::start(&format!("storage.pin_threads = false\n{extra}"))
}

fn get(n: &Node, k: &str) -> String {
    n.client().one(&format!("GET {k}"))
}

fn sync_fields(line: &str) -> BTreeMap<String, u64> {
    let rest = line
        .strip_prefix("OK ")
        .unwrap_or_else(|| panic!("SYNC failed: {line}"));
    rest.split(' ')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect()
}

#[test]
fn one_sync_repairs_both_sides() {
    let (a, b) = (standalone(""), standalone("storage.shards = 4"));
    let mut model = BTreeMap::new();
    // Shared history first (written on both, so equal contents).
    for i in 0..500 {
        for n in [&a, &b] {
            n.client().one(&format!("SET common:{i} {i}"));
        }
        model.insert(format!("common:{i}"), i.to_string());
    }
    // Then divergence: keys on one side only, deletes, and conflicting writes where the
    // later write (by wall clock) must win.
    for i in 0..50 {
        a.client().one(&format!("SET only-a:{i} a{i}"));
        model.insert(format!("only-a:{i}"), format!("a{i}"));
        b.client().one(&format!("SET only-b:{i} b{i}"));
        model.insert(format!("only-b:{i}"), format!("b{i}"));
        a.client().one(&format!("DEL common:{i}"));
        model.insert(format!("common:{i}"), "(null)".into());
        a.client().one(&format!("SET conflict:{i} first"));
        b.client().one(&format!("SET conflict:{i} second"));
        model.insert(format!("conflict:{i}"), "second".into());
        b.client().one(&format!("SET late-delete:{i} x"));
        a.client().one(&format!("DEL late-delete:{i}"));
        model.insert(format!("late-delete:{i}"), "(null)".into());
    }
    assert_ne!(a.client().one("HASH"), b.client().one("HASH"));
    let line = a.client().one(&format!("SYNC 127.0.0.1:{}", b.port));
    let f = sync_fields(&line);
    // 50 keys × (only-a, only-b, deleted common, conflict, late delete): each repair
    // is one entry applied on one side; conflicts and deletes of a shared key cross
    // both ways, one of the two winning.
    assert_eq!(f["keys_repaired"], 250, "{line}");
    assert_eq!(f["entries_sent"], 200, "{line}"); // only-a, common, conflict, late-delete
    assert_eq!(f["entries_received"], 200, "{line}"); // only-b, common, conflict, late-delete
    assert_eq!(
        (f["entries_refused"], f["entries_ignored"]),
        (0, 0),
        "{line}"
    );
    assert!(
        f["round_trips"] >= 2 && f["bytes_sent"] > 0 && f["bytes_received"] > 0,
        "{line}"
    );
    assert_eq!(a.client().one("HASH"), b.client().one("HASH"));
    for (k, want) in &model {
        assert_eq!(&get(&a, k), want, "A {k}");
        assert_eq!(&get(&b, k), want, "B {k}");
    }
    // Nothing left: one round trip, a few bytes.
    let again = sync_fields(&a.client().one(&format!("SYNC 127.0.0.1:{}", b.port)));
    assert_eq!((again["round_trips"], again["keys_repaired"]), (1, 0));
    assert!(again["bytes_sent"] + again["bytes_received"] < 1024);
    // INFO names the peer and the last result.
    let info = a.client().cmd("INFO");
    let peer = format!("sync_peer:127.0.0.1:{} ", b.port);
    assert!(
        info.iter()
            .any(|l| l.starts_with(&peer) && l.contains(" OK keys_repaired=0")),
        "{info:?}"
    );
}

#[test]
fn sync_errors_are_reported_not_fatal() {
    let a = standalone("");
    let port = common::free_port(); // nothing listens there
    let line = a.client().one(&format!("SYNC 127.0.0.1:{port}"));
    assert!(line.starts_with("ERROR: "), "{line}");
    assert!(a
        .client()
        .one("SYNC nonsense")
        .starts_with("ERROR: SYNC needs host:port"));
    // A malformed message gets an error reply, and the connection goes on.
    let mut c = a.client();
    c.send(b"SYNC.MSG 3\r\n\x09\x00\x00PING\r\n");
    assert!(c.line().starts_with("ERROR: malformed sync message"));
    assert_eq!(c.line(), "PONG");
    assert!(c.one("SYNC.MSG 0").starts_with("ERROR: SYNC.MSG length"));
    let info = a.client().cmd("INFO");
    assert!(info.iter().any(|l| l.contains("s_ago ERROR")), "{info:?}");
}

#[test]
fn a_node_that_starts_empty_fills_itself_from_a_peer() {
    let (full, empty) = (standalone(""), standalone(""));
    let mut c = full.client();
    let batch: String = (0..20_000)
        .map(|i| format!("SET fill:{i} value-{i}\r\n"))
        .collect();
    c.send(batch.as_bytes());
    for _ in 0..20_000 {
        assert_eq!(c.line(), "OK");
    }
    let f = sync_fields(&empty.client().one(&format!("SYNC 127.0.0.1:{}", full.port)));
    assert_eq!(f["keys_repaired"], 20_000);
    assert_eq!(f["entries_received"], 20_000);
    // In bounded chunks: many round trips, never one message with everything.
    assert!(f["round_trips"] > 10, "{f:?}");
    assert_eq!(empty.client().one("DBSIZE"), "20000");
    assert_eq!(empty.client().one("HASH"), full.client().one("HASH"));
}

#[test]
fn a_restarted_node_gets_the_writes_it_missed_within_a_few_intervals() {
    // The spec's scenario: stop node 2, write to node 1, restart node 2. Replication
    // cannot deliver what was published while node 2 was down; anti-entropy must.
    let broker = common::Broker::start(common::BrokerKind::Embedded);
    // No peer_list: each node learns the other from MQTT presence.
    let ae = "anti_entropy.enabled = true\nanti_entropy.interval_seconds = 1";
    let n1 = Node::replicated(&broker, "spec", ae);
    let mut n2 = Node::replicated(&broker, "spec", ae);
    let settle = std::time::Duration::from_secs(30);
    common::eventually(settle, "both connected", || {
        let up = |n: &Node| n.field("INFO", "peers_online") == "1";
        (up(&n1) && up(&n2)).then_some(())
    });
    n1.client().one("SET before-stop 1");
    common::eventually(settle, "replicated", || {
        (get(&n2, "before-stop") == "1").then_some(())
    });
    n2.signal("KILL");
    n1.client().one("SET while-down yes");
    n2.restart(); // empty: the store is in memory
    common::eventually(settle, "anti-entropy repairs node 2", || {
        (get(&n2, "while-down") == "yes" && get(&n2, "before-stop") == "1").then_some(())
    });
    // Node 2 syncs with the peers presence announces every interval; INFO shows it.
    let line = format!("sync_peer:127.0.0.1:{} ", n1.port);
    common::eventually(settle, "INFO shows the periodic exchange", || {
        let info = n2.client().cmd("INFO");
        info.iter()
            .any(|l| l.starts_with(&line) && l.contains(" OK "))
            .then_some(())
    });
}

#[test]
fn enabled_false_runs_no_periodic_exchange() {
    let b = standalone("");
    let a = standalone(&format!(
        "anti_entropy.enabled = false\nanti_entropy.interval_seconds = 1\n\
         anti_entropy.peer_list = [\"127.0.0.1:{}\"]",
        b.port
    ));
    b.client().one("SET only-b 1");
    std::thread::sleep(std::time::Duration::from_secs(4)); // the first round would be at ~2 s
    assert_eq!(get(&a, "only-b"), "(null)");
    assert!(!a
        .client()
        .cmd("INFO")
        .iter()
        .any(|l| l.starts_with("sync_peer:")));
    // Turned on, the same configuration repairs it.
    let c = standalone(&format!(
        "anti_entropy.enabled = true\nanti_entropy.interval_seconds = 1\n\
         anti_entropy.peer_list = [\"127.0.0.1:{}\"]",
        b.port
    ));
    common::eventually(
        std::time::Duration::from_secs(30),
        "periodic exchange",
        || (get(&c, "only-b") == "1").then_some(()),
    );
}

#[test]
fn message_bodies_in_memory_are_bounded_node_wide() {
    let a = standalone("");
    // Two 96 MiB bodies announced (and not sent) hold 192 MiB of the 256 MiB bound.
    let mut held: Vec<common::Client> = (0..2).map(|_| a.client()).collect();
    for c in &mut held {
        c.send(b"SYNC.MSG 100663296\r\n");
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut third = a.client();
    third.send(b"SYNC.MSG 100663296\r\n");
    assert_eq!(
        third.line(),
        "ERROR: too many anti-entropy messages in flight; try again"
    );
    // The node goes on serving, and the bound frees when those connections go.
    drop(held);
    assert_eq!(a.client().one("PING"), "PONG");
    common::eventually(
        std::time::Duration::from_secs(10),
        "the bound is released",
        || {
            let mut c = a.client();
            c.send(b"SYNC.MSG 9\r\n");
            c.send(&[1u8; 9]);
            let l = c.line();
            (l.starts_with("ERROR: malformed")).then_some(())
        },
    );
}

#[test]
fn a_hung_peer_delays_no_other_peer() {
    // A "peer" that accepts connections and never answers: its exchange hangs until
    // the reply timeout (30 s). Exchanges with the real peer must go on meanwhile.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_port = hung.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hung.incoming().flatten() {
            held.push(s);
        }
    });
    let b = standalone("");
    let a = standalone(&format!(
        "anti_entropy.enabled = true\nanti_entropy.interval_seconds = 1\n\
         anti_entropy.peer_list = [\"127.0.0.1:{hung_port}\", \"127.0.0.1:{}\"]",
        b.port
    ));
    let limit = std::time::Duration::from_secs(10);
    b.client().one("SET first 1");
    common::eventually(limit, "first exchange", || {
        (get(&a, "first") == "1").then_some(())
    });
    // The hung exchange is still running; the next one with B comes within intervals.
    b.client().one("SET second 2");
    common::eventually(limit, "later exchanges with B", || {
        (get(&a, "second") == "2").then_some(())
    });
}

#[test]
fn a_trickling_sync_msg_sender_is_cut_after_the_connection_timeout() {
    // One byte every 100 ms is never idle for a second, but far below 64 KiB/s: once the
    // connection timeout (1 s) has passed, the node cuts the sender with an error.
    let a = standalone("network.connection_timeout = 1");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", a.port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_millis(100)))
        .unwrap();
    s.write_all(b"SYNC.MSG 1000000\r\n").unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let cut = loop {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "still connected after 30 s of trickling"
        );
        if s.write_all(b"x").is_err() {
            break "write failed";
        }
        let mut buf = [0u8; 256];
        match s.read(&mut buf) {
            Ok(0) => break "closed",
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break "reset",
        }
        if got.ends_with(b"\r\n") {
            break "error line";
        }
    };
    if !got.is_empty() {
        assert!(
            got.starts_with(b"ERROR: SYNC.MSG body arrived too slowly"),
            "{cut}: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    // The node goes on serving.
    assert_eq!(a.client().one("PING"), "PONG");
}
