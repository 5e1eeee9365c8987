//! Replication between real node processes through a real MQTT broker: the embedded
//! one (`merkle-kv broker`) always, and Mosquitto when it is installed (required when
//! MKV_TEST_REQUIRE_MOSQUITTO=1, as `.ci/run` sets).

mod common;

use common::{eventually, Broker, BrokerKind, Client, Node};
use std::collections::HashMap;
use std::time::Duration;

/// How long replication may take here: generous, the machine is shared and slow.
const SETTLE: Duration = Duration::from_secs(20);

fn cluster(broker: &Broker, prefix: &str, n: usize, extra: &str) -> Vec<Node> {
    let nodes: Vec<Node> = (0..n)
        .map(|_| Node::replicated(broker, prefix, extra))
        .collect();
    // Connected, and each sees the others' presence: subscriptions are in place.
    for node in &nodes {
        eventually(SETTLE, "nodes connect and see each other", || {
            let connected = node.field("INFO", "replication") == "connected";
            let peers: usize = node.field("INFO", "peers_online").parse().unwrap();
            (connected && peers >= n - 1).then_some(())
        });
    }
    nodes
}

fn get(node: &Node, key: &str) -> String {
    node.client().one(&format!("GET {key}"))
}

fn root(node: &Node) -> String {
    node.client().one("HASH")
}

fn wait_equal_roots(nodes: &[Node]) -> String {
    eventually(SETTLE, "Merkle roots converge", || {
        let roots: Vec<String> = nodes.iter().map(root).collect();
        roots
            .iter()
            .all(|r| *r == roots[0])
            .then(|| roots[0].clone())
    })
}

fn each_broker(test: impl Fn(&mut Broker, &str)) {
    for kind in BrokerKind::all() {
        let mut broker = Broker::start(kind);
        let prefix = format!("test-{}-{:?}", std::process::id(), kind);
        eprintln!("--- against {kind:?} on port {}", broker.port);
        test(&mut broker, &prefix);
    }
}

#[test]
fn a_write_on_each_node_is_read_on_the_others() {
    each_broker(|broker, prefix| {
        let nodes = cluster(broker, prefix, 3, "");
        for (i, node) in nodes.iter().enumerate() {
            assert_eq!(node.client().one(&format!("SET from:{i} v{i}")), "OK");
            node.client().one(&format!("INCR counter:{i}"));
            node.client().one(&format!("APPEND log:{i} x{i}"));
        }
        for node in &nodes {
            for i in 0..nodes.len() {
                eventually(SETTLE, "every write reaches every node", || {
                    (get(node, &format!("from:{i}")) == format!("v{i}")).then_some(())
                });
                eventually(SETTLE, "INCR and APPEND replicate their result", || {
                    let ok = get(node, &format!("counter:{i}")) == "1"
                        && get(node, &format!("log:{i}")) == format!("x{i}");
                    ok.then_some(())
                });
            }
        }
        wait_equal_roots(&nodes);
        let published: u64 = nodes.iter().map(|n| n.stat("repl_published_events")).sum();
        assert!(published >= 9, "{published}");
    });
}

#[test]
fn concurrent_conflicting_writes_converge_everywhere() {
    each_broker(|broker, prefix| {
        let nodes = cluster(broker, prefix, 3, "");
        // 1,000 writes to 100 keys, from all three nodes at once, pipelined.
        std::thread::scope(|s| {
            for (i, node) in nodes.iter().enumerate() {
                s.spawn(move || {
                    let mut c = node.client();
                    let mut batch = String::new();
                    for j in 0..334 {
                        let key = (j * 7 + i * 13) % 100;
                        batch.push_str(&format!("SET conflict:{key} node{i}-write{j}\r\n"));
                    }
                    c.send(batch.as_bytes());
                    for _ in 0..334 {
                        assert_eq!(c.line(), "OK");
                    }
                });
            }
        });
        let root = wait_equal_roots(&nodes);
        let mut values = HashMap::new();
        for key in 0..100 {
            let all: Vec<String> = nodes
                .iter()
                .map(|n| get(n, &format!("conflict:{key}")))
                .collect();
            assert!(
                all.iter().all(|v| *v == all[0]),
                "conflict:{key} differs: {all:?}"
            );
            assert_ne!(all[0], "(null)");
            values.insert(key, all[0].clone());
        }
        assert_eq!(root.len(), 64);
    });
}

#[test]
fn a_delete_racing_a_set_ends_the_same_everywhere_and_never_resurrects() {
    each_broker(|broker, prefix| {
        let nodes = cluster(broker, prefix, 3, "");
        // Deterministic order first: set on A, replicated, deleted on B.
        nodes[0].client().one("SET doomed alive");
        eventually(SETTLE, "set replicates", || {
            (get(&nodes[2], "doomed") == "alive").then_some(())
        });
        assert_eq!(nodes[1].client().one("DEL doomed"), "DELETED");
        for n in &nodes {
            eventually(SETTLE, "delete replicates", || {
                (get(n, "doomed") == "(null)").then_some(())
            });
        }
        // A delete of a key the deleting node has never seen still wins over an older
        // set that arrives later: DEL writes a fresh tombstone anyway.
        assert_eq!(nodes[1].client().one("DEL late-set"), "NOT_FOUND");
        let older = merkle_kv::store::version::now_us() - 1_000_000;
        let late = {
            let mut b = merkle_kv::replication::changes::PayloadBuilder::new(42, "slow-peer");
            let mut e = Vec::new();
            merkle_kv::store::journal::encode_event(&mut e, older, b"late-set", Some(b"zombie"));
            b.extend(&e, 1);
            b.take()
        };
        // Once the tombstone is everywhere, the older set arrives: it must lose.
        wait_equal_roots(&nodes);
        publish_raw(broker, &format!("{prefix}/updates"), &[late]);
        eventually(SETTLE, "the late set was received", || {
            nodes
                .iter()
                .all(|n| n.stat("repl_received_events") > 0)
                .then_some(())
        });
        std::thread::sleep(Duration::from_millis(300));
        for n in &nodes {
            assert_eq!(get(n, "late-set"), "(null)", "an older set undid a delete");
        }
        // Races: SET on one node, DEL on another, at the same time, 50 keys.
        std::thread::scope(|s| {
            let (a, b) = (&nodes[0], &nodes[2]);
            s.spawn(move || {
                let mut c = a.client();
                for k in 0..50 {
                    c.one(&format!("SET race:{k} set"));
                }
            });
            s.spawn(move || {
                let mut c = b.client();
                for k in 0..50 {
                    c.one(&format!("DEL race:{k}"));
                }
            });
        });
        wait_equal_roots(&nodes);
        let outcome: Vec<String> = (0..50)
            .map(|k| get(&nodes[1], &format!("race:{k}")))
            .collect();
        for n in &nodes {
            for (k, want) in outcome.iter().enumerate() {
                assert_eq!(get(n, &format!("race:{k}")), *want, "race:{k}");
            }
            assert_eq!(get(n, "doomed"), "(null)", "a deleted key came back");
        }
        // Later traffic does not resurrect anything either.
        nodes[2].client().one("SET unrelated 1");
        wait_equal_roots(&nodes);
        assert_eq!(get(&nodes[0], "doomed"), "(null)");
    });
}

#[test]
fn replication_rides_out_a_broker_restart() {
    each_broker(|broker, prefix| {
        let nodes = cluster(broker, prefix, 3, "");
        for i in 0..50 {
            nodes[i % 3].client().one(&format!("SET before:{i} {i}"));
        }
        wait_equal_roots(&nodes);

        broker.kill();
        for node in &nodes {
            eventually(SETTLE, "nodes notice the outage", || {
                (node.field("INFO", "replication") == "disconnected").then_some(())
            });
        }
        // Local reads and writes keep working while the broker is away.
        for i in 0..100 {
            let mut c = nodes[i % 2].client();
            assert_eq!(c.one(&format!("SET during:{i} {i}")), "OK");
            assert_eq!(c.one(&format!("GET during:{i}")), i.to_string());
        }
        assert!(nodes[0].stat("repl_buffered_events") > 0);

        broker.restart();
        for i in 0..50 {
            nodes[2].client().one(&format!("SET after:{i} {i}"));
        }
        for node in &nodes {
            for i in 0..100 {
                eventually(SETTLE, "writes made during the outage arrive", || {
                    (get(node, &format!("during:{i}")) == i.to_string()).then_some(())
                });
            }
            for i in 0..50 {
                eventually(SETTLE, "writes after the restart arrive", || {
                    (get(node, &format!("after:{i}")) == i.to_string()).then_some(())
                });
            }
        }
        wait_equal_roots(&nodes);
        assert!(nodes[0].stat("repl_connects") >= 2);
        assert_eq!(nodes[0].stat("repl_dropped_offline"), 0);
    });
}

/// Publish raw payloads on a topic, as a misbehaving client would.
fn publish_raw(broker: &Broker, topic: &str, payloads: &[Vec<u8>]) {
    publish_as(broker, topic, payloads, false)
}

/// Publish payloads on a topic, retained or not, and wait for the broker's PUBACKs.
fn publish_as(broker: &Broker, topic: &str, payloads: &[Vec<u8>], retain: bool) {
    let mut opts = rumqttc::MqttOptions::new(
        format!("raw-{}", std::process::id()),
        "127.0.0.1",
        broker.port,
    );
    opts.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut connection) = rumqttc::Client::new(opts, 64);
    for p in payloads {
        client
            .publish(topic, rumqttc::QoS::AtLeastOnce, retain, p.clone())
            .unwrap();
    }
    let mut acked = 0;
    for event in connection.iter() {
        match event {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                acked += 1;
                if acked == payloads.len() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("raw publisher: {e}"),
        }
    }
    let _ = client.disconnect();
}

#[test]
fn garbage_payloads_are_rejected_and_counted() {
    each_broker(|broker, prefix| {
        // Small values, so the payload limit is small enough to exceed cheaply.
        let nodes = cluster(broker, prefix, 2, "network.max_line_bytes = 4096");
        let valid = {
            let mut b = merkle_kv::replication::changes::PayloadBuilder::new(1, "intruder");
            let mut e = Vec::new();
            merkle_kv::store::journal::encode_event(&mut e, 1, b"k", Some(b"v"));
            b.extend(&e, 1);
            b.take()
        };
        let mut foreign = valid.clone();
        foreign[0] = 99;
        let truncated = valid[..valid.len() - 1].to_vec();
        let mut oversized = valid.clone();
        oversized.resize(merkle_kv::replication::mqtt::payload_bytes_max(4096) + 1, 0);
        // A key no client could write (it would break SCAN's framing) rejects its
        // whole payload, the valid event beside it included.
        let bad_key = {
            let mut b = merkle_kv::replication::changes::PayloadBuilder::new(1, "intruder");
            let mut e = Vec::new();
            let now = merkle_kv::store::version::now_us();
            merkle_kv::store::journal::encode_event(&mut e, now, b"beside", Some(b"v"));
            merkle_kv::store::journal::encode_event(&mut e, now, b"x\r\nKEYS 0 1", Some(b"v"));
            b.extend(&e, 2);
            b.take()
        };
        let bad = vec![
            bad_key,
            b"hello, world".to_vec(),
            Vec::new(),
            truncated,
            foreign,
            oversized,
            vec![0xff; 1000],
        ];
        publish_raw(broker, &format!("{prefix}/updates"), &bad);
        for node in &nodes {
            eventually(SETTLE, "every bad payload is counted", || {
                (node.stat("repl_rejected_payloads") == bad.len() as u64).then_some(())
            });
            for key in ["k", "beside"] {
                assert_eq!(
                    get(node, key),
                    "(null)",
                    "nothing of a bad payload is applied"
                );
            }
            eventually(SETTLE, "the rejection is logged", || {
                node.log()
                    .contains("dropping a replication payload")
                    .then_some(())
            });
        }
        // A bad presence record is counted too, and the nodes still replicate.
        publish_raw(
            broker,
            &format!("{prefix}/nodes/liar"),
            &[b"online nonsense".to_vec()],
        );
        eventually(SETTLE, "bad presence counted", || {
            (nodes[0].stat("repl_rejected_presence") >= 1).then_some(())
        });
        nodes[0].client().one("SET still works");
        eventually(SETTLE, "replication still works", || {
            (get(&nodes[1], "still") == "works").then_some(())
        });
        // A well-formed, recent payload from another node is applied.
        let valid = {
            let mut b = merkle_kv::replication::changes::PayloadBuilder::new(1, "intruder");
            let mut e = Vec::new();
            let now = merkle_kv::store::version::now_us();
            merkle_kv::store::journal::encode_event(&mut e, now, b"k", Some(b"v"));
            b.extend(&e, 1);
            b.take()
        };
        publish_raw(broker, &format!("{prefix}/updates"), &[valid]);
        eventually(SETTLE, "a valid foreign payload applies", || {
            (get(&nodes[1], "k") == "v").then_some(())
        });
    });
}

#[test]
fn a_stuck_broker_slows_writers_briefly_then_drops_and_counts() {
    // A stopped (SIGSTOP) broker accepts nothing: the node must not stall its clients
    // beyond backpressure_max_ms, and must count what it could not send.
    let broker = Broker::start(BrokerKind::Embedded);
    let prefix = format!("stuck-{}", std::process::id());
    let node = Node::replicated(
        &broker,
        &prefix,
        "mqtt.offline_buffer_events = 1000\nmqtt.backpressure_max_ms = 200",
    );
    eventually(SETTLE, "connected", || {
        (node.field("INFO", "replication") == "connected").then_some(())
    });
    let stop = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(broker.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    };
    stop("STOP");
    let mut c = node.client();
    // 48 MB of changes: more than every buffer on the way (queue, outbox, the 16 MiB
    // of unacknowledged payloads, the sockets) can hold.
    const N: usize = 48_000;
    let value = "v".repeat(1000);
    let mut sent = 0;
    let mut slowest = Duration::ZERO;
    while sent < N {
        let t = std::time::Instant::now();
        let mut batch = String::new();
        for i in sent..(sent + 1000).min(N) {
            batch.push_str(&format!("SET stuck:{i} {value}\r\n"));
        }
        c.send(batch.as_bytes());
        for _ in sent..(sent + 1000).min(N) {
            assert_eq!(c.line(), "OK");
        }
        sent += 1000;
        slowest = slowest.max(t.elapsed());
    }
    // A liveness bound, not a speed target: backpressure gives up after 200 ms, so no
    // batch may hang anywhere near this long even on a loaded machine.
    assert!(
        slowest < Duration::from_secs(10),
        "a batch of writes stalled for {slowest:?}"
    );
    assert_eq!(c.one(&format!("GET stuck:{}", N - 1)), value);
    let dropped = node.stat("repl_dropped_overflow") + node.stat("repl_dropped_offline");
    assert!(
        dropped > 0,
        "nothing was dropped, yet the broker took nothing"
    );
    stop("CONT");
    let _ = Client::connect(node.port);
}

#[test]
fn the_embedded_broker_runs_without_a_config_file_and_a_taken_port_is_a_clear_error() {
    // No --config: the node starts the embedded broker and replicates through it.
    let mqtt = common::free_port();
    let port = common::free_port();
    let mut child = std::process::Command::new(common::BIN)
        .env("MERKLE_KV_NETWORK_BIND_PORT", port.to_string())
        .env(
            "MERKLE_KV_MQTT_EMBEDDED_BROKER_LISTEN",
            format!("127.0.0.1:{mqtt}"),
        )
        .env("MERKLE_KV_STORAGE_PIN_THREADS", "false")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let info = eventually(SETTLE, "the default node comes up connected", || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| Client::connect(port))?;
        let info = c.cmd("INFO");
        info.contains(&"replication:connected".to_string())
            .then_some(info)
    });
    assert!(info.iter().any(|l| l.starts_with("node_id:")));

    // A second node told to host a broker on the same port says why it cannot.
    let out = std::process::Command::new(common::BIN)
        .env(
            "MERKLE_KV_NETWORK_BIND_PORT",
            common::free_port().to_string(),
        )
        .env(
            "MERKLE_KV_MQTT_EMBEDDED_BROKER_LISTEN",
            format!("127.0.0.1:{mqtt}"),
        )
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot start the embedded MQTT broker on 127.0.0.1:{mqtt}"
        )),
        "{err}"
    );
}

#[test]
fn watch_prints_the_decoded_change_stream() {
    let broker = Broker::start(BrokerKind::Embedded);
    let prefix = format!("watch-{}", std::process::id());
    let node = Node::replicated(&broker, &prefix, "");
    eventually(SETTLE, "connected", || {
        (node.field("INFO", "replication") == "connected").then_some(())
    });
    let mut watch = std::process::Command::new(common::BIN)
        .arg("--config")
        .arg(&node.config)
        .arg("watch")
        .env("MERKLE_KV_MQTT_CLIENT_ID", "watcher")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The watcher subscribes some time after it starts: write until it sees a write.
    let node_id = node.field("INFO", "node_id");
    let seen = eventually(SETTLE, "watch prints a SET", || {
        node.client().one("SET watched hello");
        node.client().one("DEL gone");
        let lines: Vec<String> = rx.try_iter().collect();
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{node_id} SET watched \"hello\" hlc=")))
            .then_some(lines)
    });
    let more: Vec<String> = rx
        .recv_timeout(Duration::from_secs(5))
        .into_iter()
        .chain(rx.try_iter())
        .collect();
    let all: Vec<&String> = seen.iter().chain(&more).collect();
    assert!(
        all.iter()
            .any(|l| l.starts_with(&format!("{node_id} DEL gone hlc="))),
        "{all:?}"
    );
    let _ = watch.kill();
    let _ = watch.wait();
}

/// Run `openssl` with `args` in `dir`; panics with its stderr on failure.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn replication_over_mqtts_with_a_private_ca() {
    let Some(mosquitto) = common::mosquitto_bin() else {
        assert_ne!(
            std::env::var(common::REQUIRE_MOSQUITTO).as_deref(),
            Ok("1"),
            "mosquitto is required"
        );
        return eprintln!("mosquitto not installed: the mqtts test needs it, not run");
    };
    let dir = common::temp_path("tls");
    std::fs::create_dir_all(&dir).unwrap();
    // A throwaway CA, and a broker certificate for 127.0.0.1 signed by it.
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=merkle-kv test CA",
            "-days",
            "2",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "broker.key",
            "-out",
            "broker.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName = IP:127.0.0.1\n").unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "broker.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "broker.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    // Mosquitto started as root reads its files as the mosquitto user.
    for f in ["broker.key", "broker.crt", "ca.crt"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let port = common::free_port();
    let conf = format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {d}/ca.crt\ncertfile {d}/broker.crt\nkeyfile {d}/broker.key\n",
        d = dir.display()
    );
    std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
    let mut broker = std::process::Command::new(mosquitto)
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stderr(std::fs::File::create(dir.join("broker.log")).unwrap())
        .spawn()
        .unwrap();
    eventually(SETTLE, "TLS broker listens", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    // The nodes trust the private CA through SSL_CERT_FILE (read by the system trust loader).
    let ca = dir.join("ca.crt").display().to_string();
    let cfg = format!("mqtt.broker_address = \"mqtts://127.0.0.1:{port}\"\nmqtt.topic_prefix = \"tls\"\nstorage.pin_threads = false");
    let a = Node::start_with_env(&cfg, &[("SSL_CERT_FILE", &ca)]);
    let b = Node::start_with_env(&cfg, &[("SSL_CERT_FILE", &ca)]);
    for n in [&a, &b] {
        eventually(SETTLE, "connected over TLS", || {
            (n.field("INFO", "replication") == "connected").then_some(())
        });
    }
    eventually(SETTLE, "a write replicates over TLS", || {
        a.client().one("SET secure yes");
        (get(&b, "secure") == "yes").then_some(())
    });
    // Without the CA the broker's certificate is not trusted: the node never connects.
    let untrusting = Node::start_with(&cfg);
    eventually(SETTLE, "the untrusting node gives up a connection", || {
        untrusting
            .log()
            .contains("MQTT broker unreachable")
            .then_some(())
    });
    assert_eq!(untrusting.field("INFO", "replication"), "disconnected");
    let _ = broker.kill();
    let _ = broker.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_write_after_an_acknowledged_write_on_another_node_wins() {
    // Versions come from the clock read at each write: a write that starts after
    // another was acknowledged, even on another node, gets the higher version.
    each_broker(|broker, prefix| {
        let nodes = cluster(broker, prefix, 2, "");
        let (mut a, mut b) = (nodes[0].client(), nodes[1].client());
        for k in 0..200 {
            assert_eq!(a.one(&format!("SET order:{k} first")), "OK");
            assert_eq!(b.one(&format!("SET order:{k} second")), "OK");
        }
        wait_equal_roots(&nodes);
        for n in &nodes {
            for k in 0..200 {
                assert_eq!(get(n, &format!("order:{k}")), "second", "order:{k}");
            }
        }
    });
}

#[test]
fn a_slow_but_working_broker_slows_writers_and_drops_nothing() {
    // One event per payload and a small outbox (so a small queue, 1,024 events): the
    // writer outruns replication, the queue fills, and connections wait (backpressure never gives up here). Every
    // change must still reach the peer.
    let broker = Broker::start(BrokerKind::Embedded);
    let prefix = format!("slow-{}", std::process::id());
    let extra = "mqtt.batch_max_events = 1\nmqtt.offline_buffer_events = 1000\nmqtt.backpressure_max_ms = 600000";
    let nodes = cluster(&broker, &prefix, 2, extra);
    let mut c = nodes[0].client();
    const N: usize = 20_000;
    for start in (0..N).step_by(2000) {
        let batch: String = (start..start + 2000)
            .map(|i| format!("SET slow:{i} {i}\r\n"))
            .collect();
        c.send(batch.as_bytes());
        for _ in 0..2000 {
            assert_eq!(c.line(), "OK");
        }
    }
    let converged = Duration::from_secs(120);
    eventually(converged, "the peer gets every change", || {
        (nodes[1].client().one("DBSIZE") == N.to_string()).then_some(())
    });
    wait_equal_roots(&nodes);
    assert_eq!(nodes[0].stat("repl_dropped_overflow"), 0);
    assert_eq!(nodes[0].stat("repl_dropped_offline"), 0);
    assert_eq!(nodes[0].stat("repl_published_events"), N as u64);
    assert!(
        nodes[0].stat("repl_backpressure_waits") > 0,
        "the writer never had to wait"
    );
}

#[test]
fn the_cluster_load_test_measures_lag_and_convergence() {
    let broker = Broker::start(BrokerKind::Embedded);
    let prefix = format!("lt-{}", std::process::id());
    let nodes = cluster(&broker, &prefix, 2, "");
    let addr = |n: &Node| format!("127.0.0.1:{}", n.port);
    let json = common::temp_path("cluster.json");
    let args = [
        "loadtest-cluster".to_string(),
        "--write".into(),
        addr(&nodes[0]),
        "--read".into(),
        addr(&nodes[1]),
        "--duration".into(),
        "1".into(),
        "--connections".into(),
        "2".into(),
        "--json".into(),
        json.display().to_string(),
    ];
    let opts = <loadtest::cluster::ClusterOptions as clap::Parser>::parse_from(args);
    let report = loadtest::cluster::run(&opts).unwrap();
    assert_eq!(report.errors, 0, "{report}");
    assert!(report.writes > 0 && report.lag_samples > 0, "{report}");
    assert!(report.lag_p50_us <= report.lag_p99_us && report.lag_p99_us <= report.lag_max_us);
    assert!(
        report.replicated_per_sec > 0.0
            && report.replicated_per_sec <= report.writes_per_sec * 1.01
    );
    // Every write reached the reader: the roots were equal at the end.
    assert_eq!(root(&nodes[0]), root(&nodes[1]));
    assert_eq!(nodes[1].client().one("DBSIZE"), report.writes.to_string());
    let saved: loadtest::serde_json::Value =
        loadtest::serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(saved["writes"], report.writes);
    let _ = std::fs::remove_file(json);
}

#[test]
fn a_node_that_dies_is_marked_offline_by_its_last_will() {
    each_broker(|broker, prefix| {
        let mut nodes = cluster(broker, prefix, 3, "");
        let mut dead = nodes.pop().unwrap();
        dead.signal("KILL"); // no goodbye: the broker publishes the last will
        let _ = dead.wait_exit(Duration::from_secs(5));
        for n in &nodes {
            eventually(SETTLE, "the last will marks the dead node offline", || {
                (n.field("INFO", "peers_online") == "1").then_some(())
            });
        }
        // A graceful stop says goodbye itself.
        let leaving = nodes.pop().unwrap();
        leaving.client().one("SHUTDOWN");
        eventually(SETTLE, "a node that shuts down is offline", || {
            (nodes[0].field("INFO", "peers_online") == "0").then_some(())
        });
    });
}

#[test]
fn writes_in_flight_when_the_broker_dies_are_delivered_after_it_returns() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
    each_broker(|broker, prefix| {
        // The offline buffer holds everything this test can write, so nothing is dropped
        // however fast the machine writes (overflow is another test's subject).
        let nodes = cluster(broker, prefix, 2, "mqtt.offline_buffer_events = 100000000");
        let stop = AtomicBool::new(false);
        let acked = AtomicUsize::new(0);
        let progress = |more: usize| {
            let from = acked.load(Relaxed);
            eventually(SETTLE, "the writer makes progress", || {
                (acked.load(Relaxed) >= from + more).then_some(())
            });
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                // Pipelined writes the whole time: some are in the outbox, some
                // published but unacknowledged, when the broker is killed.
                let mut c = nodes[0].client();
                let mut n = 0usize;
                while !stop.load(Relaxed) {
                    let batch: String = (n..n + 200)
                        .map(|i| format!("SET live:{i} {i}\r\n"))
                        .collect();
                    c.send(batch.as_bytes());
                    for _ in 0..200 {
                        assert_eq!(c.line(), "OK");
                    }
                    n += 200;
                    acked.store(n, Relaxed);
                }
            });
            // Each step waits for what it needs, not for a time: busy machines are slow.
            progress(2_000);
            broker.kill();
            eventually(SETTLE, "the writer sees the broker gone", || {
                (nodes[0].field("INFO", "replication") != "connected").then_some(())
            });
            progress(2_000);
            broker.restart();
            eventually(SETTLE, "the writer reconnects", || {
                (nodes[0].field("INFO", "replication") == "connected").then_some(())
            });
            progress(2_000);
            stop.store(true, Relaxed);
        });
        let acked = acked.load(Relaxed);
        eventually(SETTLE, "every acknowledged write reaches the peer", || {
            (nodes[1].client().one("DBSIZE") == acked.to_string()).then_some(())
        });
        wait_equal_roots(&nodes);
        assert_eq!(
            nodes[0].stat("repl_dropped_offline") + nodes[0].stat("repl_dropped_overflow"),
            0
        );
    });
}

#[test]
fn a_broker_outage_with_large_values_keeps_the_offline_buffer_within_its_bytes() {
    // Nothing listens on the broker port: every change waits in the offline buffer.
    // 160 changes of 1 MiB are ten times its 16 MiB (a count of 100,000 events, the
    // default, would hold 100 GB of them).
    let node = Node::start_with_env(
        &format!(
            "mqtt.broker_address = \"tcp://127.0.0.1:{}\"\nnetwork.max_line_bytes = {}\n\
             storage.pin_threads = false",
            common::free_port(),
            2 << 20
        ),
        &[("MERKLE_KV_MQTT_OFFLINE_BUFFER_BYTES", "16777216")],
    );
    let mut c = node.client();
    let value = "v".repeat(1 << 20);
    let set = format!("SET big {value}");
    assert_eq!(c.one(&set), "OK");
    let before = common::peak_rss_kb(node.child.id());
    for _ in 0..160 {
        assert_eq!(c.one(&set), "OK");
    }
    let dropped = eventually(SETTLE, "what overflows is dropped and counted", || {
        let d = node.stat("repl_dropped_offline");
        (node.stat("repl_buffered_events") + d == 161).then_some(d)
    });
    let grown_mb = (common::peak_rss_kb(node.child.id()) - before) / 1024;
    assert!(
        grown_mb < 64,
        "160 MiB of changes grew the node by {grown_mb} MiB (buffer: 16 MiB)"
    );
    assert!(dropped >= 140, "only {dropped} of 161 changes dropped");
    assert_eq!(c.one("GET big").len(), value.len(), "the node still serves");
}

#[test]
fn clock_skew_is_seen_and_versions_from_the_future_are_counted() {
    each_broker(|broker, prefix| {
        let now_ms = || merkle_kv::store::version::now_us() / 1000;
        let record = |clock_ms: u64| {
            format!("online addr=127.0.0.1:1 shards=1 version=0.1.0 clock_ms={clock_ms}")
                .into_bytes()
        };
        // A retained record is as old as its last publication: its clock says nothing
        // about the peer's. An hour-old one is there before the node subscribes.
        let sleeper = format!("{prefix}/nodes/sleeper");
        publish_as(broker, &sleeper, &[record(now_ms() - 3_600_000)], true);
        let nodes = cluster(broker, prefix, 1, "");
        let node = &nodes[0];
        eventually(SETTLE, "the retained record arrives", || {
            (node.field("INFO", "peers_online") == "1").then_some(())
        });
        assert_eq!(node.field("INFO", "clock_skew_peers"), "0");
        // A live record from a peer whose clock is 5 s ahead.
        publish_raw(
            broker,
            &format!("{prefix}/nodes/ahead"),
            &[record(now_ms() + 5000)],
        );
        let max: u64 = eventually(SETTLE, "the skewed peer is counted", || {
            (node.field("INFO", "clock_skew_peers") == "1")
                .then(|| node.field("INFO", "clock_skew_max_ms").parse().unwrap())
        });
        assert!((4000..=5000).contains(&max), "clock_skew_max_ms:{max}");
        eventually(SETTLE, "the skew is logged", || {
            node.log().contains("clock differs").then_some(())
        });
        // A change stamped 10 minutes ahead is refused, counted and logged.
        let future = {
            let mut b = merkle_kv::replication::changes::PayloadBuilder::new(7, "ahead");
            let mut e = Vec::new();
            let hlc = merkle_kv::store::version::now_us() + 600_000_000;
            merkle_kv::store::journal::encode_event(&mut e, hlc, b"later", Some(b"v"));
            b.extend(&e, 1);
            b.take()
        };
        publish_raw(broker, &format!("{prefix}/updates"), &[future]);
        eventually(SETTLE, "the future version is counted", || {
            (node.stat("repl_rejected_future") == 1).then_some(())
        });
        assert_eq!(get(node, "later"), "(null)");
        // Logged by the shard's once-a-second check.
        eventually(SETTLE, "the refusal is logged", || {
            node.log().contains("from the future").then_some(())
        });
    });
}
