//! Long isolation never resurrects deletes (docs/ANTI_ENTROPY.md, "Long isolation"): a
//! node cut off from every peer and the broker for longer than the tombstone grace goes
//! back to LOADING, keeps only what it wrote since its last contact, and refetches the
//! rest from a ready peer. A node down past the grace comes back from its disk the same way.

mod common;
use common::{eventually, Broker, BrokerKind, Node};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A TCP forwarder that can be cut (open connections closed, new ones refused) and
/// restored on the same port: a network partition without root.
struct Proxy {
    port: u16,
    target: u16,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let port = common::free_port();
        let p = Proxy {
            port,
            target,
            cut: Arc::new(AtomicBool::new(false)),
            open: Arc::default(),
        };
        p.listen();
        p
    }

    fn listen(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        let (cut, open, target) = (self.cut.clone(), self.open.clone(), self.target);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                // Cut: stop listening (the port then refuses) and drop this one.
                if cut.load(Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let mut open = open.lock().unwrap();
                open.push(client.try_clone().unwrap());
                open.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 << 10];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
    }

    fn cut(&self) {
        self.cut.store(true, Relaxed);
        // Wake the accept loop so it sees the cut and closes the listener.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        eventually(Duration::from_secs(10), "the proxy refuses", || {
            TcpStream::connect(("127.0.0.1", self.port))
                .is_err()
                .then_some(())
        });
    }

    fn restore(&self) {
        self.cut.store(false, Relaxed);
        self.listen();
    }
}

#[test]
fn a_node_isolated_past_the_grace_period_does_not_bring_deleted_keys_back() {
    const GRACE: u64 = 60; // the smallest allowed
    let broker = Broker::start(BrokerKind::Embedded);
    let prefix = format!("iso-{}", std::process::id());
    // B: the healthy side, always on the broker; it does not dial A itself. It tells
    // peers (A) to reach it through a proxy, so cutting the proxy cuts A off from it.
    let b_port = common::free_port();
    let to_b = Proxy::start(b_port);
    let b = Node::launch_on(
        b_port,
        &format!(
            "mqtt.broker_address = \"tcp://127.0.0.1:{}\"\nmqtt.topic_prefix = \"{prefix}\"\n\
             storage.pin_threads = false\nstorage.tombstone_grace_seconds = {GRACE}\n\
             anti_entropy.interval_seconds = 5\n\
             network.advertise_address = \"127.0.0.1:{}\"",
            broker.port, to_b.port
        ),
    );
    b.wait_loaded();
    // A reaches the broker and B only through proxies that the test cuts.
    let to_broker = Proxy::start(broker.port);
    let a = Node::start_with(&format!(
        "mqtt.broker_address = \"tcp://127.0.0.1:{}\"\nmqtt.topic_prefix = \"{prefix}\"\n\
         storage.pin_threads = false\nstorage.tombstone_grace_seconds = {GRACE}\n\
         anti_entropy.enabled = true\nanti_entropy.interval_seconds = 5\n\
         anti_entropy.peer_list = [\"127.0.0.1:{}\"]",
        to_broker.port, to_b.port
    ));
    assert_eq!(a.client().one("SET doomed old-value"), "OK");
    eventually(Duration::from_secs(20), "the write replicates", || {
        (b.client().one("GET doomed") == "old-value").then_some(())
    });

    to_broker.cut();
    to_b.cut();
    eventually(Duration::from_secs(20), "A sees the broker gone", || {
        (a.field("INFO", "replication") != "connected").then_some(())
    });
    // While A is cut off: B deletes (A never hears of it), A writes.
    assert_eq!(b.client().one("DEL doomed"), "DELETED");
    assert_eq!(a.client().one("SET written-alone fresh"), "OK");

    // Past the grace period B has purged the tombstone and A has gone back to LOADING.
    eventually(
        Duration::from_secs(GRACE + 60),
        "A goes back to LOADING",
        || (a.field("INFO", "loading") == "1").then_some(()),
    );
    assert!(a.field("INFO", "bootstrap").starts_with("rejoining"));
    assert!(a.client().one("GET doomed").starts_with("ERROR: LOADING"));
    eventually(Duration::from_secs(60), "B purges the tombstone", || {
        (b.stat("tombstones") == 0).then_some(())
    });

    to_broker.restore();
    to_b.restore();
    a.wait_loaded();
    assert!(a.field("INFO", "bootstrap").starts_with("rejoined via"));
    // Exchanges both ways, now: nothing old comes back.
    for _ in 0..2 {
        let a_to_b = a.client().one(&format!("SYNC 127.0.0.1:{}", to_b.port));
        assert!(a_to_b.starts_with("OK "), "{a_to_b}");
        let b_to_a = b.client().one(&format!("SYNC 127.0.0.1:{}", a.port));
        assert!(b_to_a.starts_with("OK "), "{b_to_a}");
    }
    for n in [&a, &b] {
        assert_eq!(
            n.client().one("GET doomed"),
            "(null)",
            "a purged delete came back"
        );
        assert_eq!(n.client().one("GET written-alone"), "fresh");
    }
}

#[test]
fn a_lone_node_whose_broker_was_away_past_the_grace_period_serves_again_when_it_returns() {
    const GRACE: u64 = 60;
    let mut broker = Broker::start(BrokerKind::Embedded);
    let a = Node::replicated(
        &broker,
        &format!("lone-{}", std::process::id()),
        &format!(
            "storage.tombstone_grace_seconds = {GRACE}\nanti_entropy.enabled = true\n\
             anti_entropy.interval_seconds = 5"
        ),
    );
    assert_eq!(a.client().one("SET kept 1"), "OK");
    broker.kill();
    eventually(
        Duration::from_secs(GRACE + 60),
        "A goes back to LOADING",
        || (a.field("INFO", "loading") == "1").then_some(()),
    );
    // Nobody to rejoin through, and no way to tell: it stays LOADING while cut off.
    assert!(a.client().one("GET kept").starts_with("ERROR: LOADING"));
    broker.restart();
    a.wait_loaded();
    assert!(a
        .field("INFO", "bootstrap")
        .starts_with("rejoined: no peer to learn from"));
    // Nothing was dropped: there was nobody to fetch it back from.
    assert_eq!(a.client().one("GET kept"), "1");
}

#[test]
fn a_node_down_past_the_grace_period_comes_back_from_disk_without_bringing_deleted_keys_back() {
    const GRACE: u64 = 60; // the smallest allowed
    let dirs = ["a", "b"].map(|n| common::temp_path(&format!("down-{n}")));
    let persistent = |dir: &std::path::Path| {
        format!(
            "mqtt.enabled = false\nstorage.pin_threads = false\nstorage.shards = 4\n\
             storage.persistence_enabled = true\nstorage.data_dir = {:?}\n\
             storage.tombstone_grace_seconds = {GRACE}\nanti_entropy.interval_seconds = 5",
            dir.display().to_string()
        )
    };
    let a = Node::start_with(&persistent(&dirs[0]));
    assert_eq!(a.client().one("SET doomed old-value"), "OK");
    assert_eq!(a.client().one("SET kept 1"), "OK");
    // B reaches A through a proxy the test cuts; A reaches B directly.
    let to_a = Proxy::start(a.port);
    let mut b = Node::start_with(&format!(
        "{}\nanti_entropy.enabled = true\nanti_entropy.peer_list = [\"127.0.0.1:{}\"]",
        persistent(&dirs[1]),
        to_a.port
    ));
    assert_eq!(b.client().one("GET doomed"), "old-value");
    // B stops (its last write to disk is now) and A deletes: B never hears of it.
    assert_eq!(b.client().one("SHUTDOWN"), "OK");
    assert!(b.wait_exit(Duration::from_secs(20)).is_some());
    assert_eq!(a.client().one("DEL doomed"), "DELETED");
    eventually(
        Duration::from_secs(GRACE + 60),
        "A purges the tombstone",
        || (a.stat("tombstones") == 0).then_some(()),
    );
    // B's files are older than the grace by now: it rejoins, LOADING until it reaches
    // a ready peer. Meanwhile it hands its old entries to nobody, not even to a peer
    // that runs an exchange with it.
    to_a.cut();
    b.restart_listening();
    let rejoining = |b: &Node| {
        eventually(Duration::from_secs(20), "B rejoins", || {
            b.field("INFO", "bootstrap")
                .starts_with("rejoining")
                .then_some(())
        })
    };
    rejoining(&b);
    // Killed while it rejoins, its files written a moment ago (as a shutdown snapshot or
    // a logged replicated change leaves them): it still owes the rejoin, and makes it.
    b.signal("KILL");
    assert!(b.wait_exit(Duration::from_secs(10)).is_some());
    touch_files(&dirs[1]);
    b.restart_listening();
    rejoining(&b);
    let line = a.client().one(&format!("SYNC 127.0.0.1:{}", b.port));
    assert!(
        line.starts_with("ERROR") && line.contains("rejoining"),
        "{line}"
    );
    assert_eq!(a.client().one("GET doomed"), "(null)", "B handed it back");
    to_a.restore();
    b.wait_loaded();
    for _ in 0..2 {
        for (from, to) in [(&a, b.port), (&b, to_a.port)] {
            let line = from.client().one(&format!("SYNC 127.0.0.1:{to}"));
            assert!(line.starts_with("OK "), "{line}");
        }
    }
    for n in [&a, &b] {
        assert_eq!(
            n.client().one("GET doomed"),
            "(null)",
            "a purged delete came back"
        );
        assert_eq!(n.client().one("GET kept"), "1");
    }
    assert!(b.field("INFO", "bootstrap").starts_with("rejoined via"));
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Set the modification time of every file under `dir` to now.
fn touch_files(dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            touch_files(&path);
        } else {
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(std::time::SystemTime::now()).unwrap();
        }
    }
}
