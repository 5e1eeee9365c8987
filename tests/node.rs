//! A real node over real TCP: pipelining, half-close, bad input, limits, shutdown.

mod common;
use common::{peak_rss_kb, Client, Node};
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[test]
fn thousand_pipelined_commands_in_one_write() {
    let node = Node::start("");
    let mut c = node.client();
    let mut batch = String::new();
    for i in 0..500 {
        batch += &format!("SET key:{i} value {i}\r\nGET key:{i}\r\n");
    }
    c.send(batch.as_bytes());
    for i in 0..500 {
        assert_eq!(c.line(), "OK");
        assert_eq!(c.line(), format!("value {i}"));
    }
    assert_eq!(c.one("DBSIZE"), "500");
}

#[test]
fn half_closed_client_gets_every_reply() {
    let node = Node::start("");
    let mut c = node.client();
    c.send(b"SET a hello\nGET a\nDEL a\nGET a\nSET partial no-newline");
    c.half_close();
    let all = c.read_to_end();
    assert_eq!(
        String::from_utf8(all).unwrap(),
        "OK\r\nhello\r\nDELETED\r\n(null)\r\n"
    );
    // The unterminated last line was not executed.
    assert_eq!(node.client().one("GET partial"), "(null)");
}

#[test]
fn garbage_bytes_get_errors_and_the_connection_survives() {
    let node = Node::start("");
    let mut c = node.client();
    c.send(b"\x00\x01\x02\xff\xfe\r\n\x1b[31mBOOM\r\nSET k \xc3\x28\r\n");
    assert_eq!(c.line(), "ERROR: Line is not valid UTF-8");
    assert_eq!(c.line(), "ERROR: Invalid command");
    assert_eq!(c.line(), "ERROR: Line is not valid UTF-8");
    assert_eq!(c.one("PING"), "PONG");
    assert_eq!(c.one("GET k"), "(null)");
}

#[test]
fn oversized_line_is_rejected_and_the_stream_resynchronises() {
    let node = Node::start("network.max_line_bytes = 2048");
    let mut c = node.client();
    let big = format!("SET big {}\r\nPING\r\n", "x".repeat(10_000));
    c.send(big.as_bytes());
    assert_eq!(c.line(), "ERROR: Line too long (max 2048 bytes)");
    assert_eq!(c.line(), "PONG");
    assert_eq!(c.one("GET big"), "(null)");
    // A value that fits the line limit exactly is accepted and read back whole.
    let value = "v".repeat(2048 - "SET fit ".len());
    assert_eq!(c.one(&format!("SET fit {value}")), "OK");
    assert_eq!(c.one("GET fit"), value);
    // APPEND past the limit is refused.
    assert_eq!(
        c.one("APPEND fit 0123456789"),
        "ERROR: Value too large (max 2048 bytes)"
    );
}

#[test]
fn megabyte_values_are_accepted_by_default() {
    let node = Node::start("");
    let mut c = node.client();
    let value = "m".repeat(1_000_000);
    assert_eq!(c.one(&format!("SET large {value}")), "OK");
    assert_eq!(c.one("GET large"), value);
}

#[test]
fn extra_connections_are_refused_with_an_error() {
    let node = Node::start("network.max_connections = 2");
    let mut a = node.client();
    // Wait until the start-up probe connection is gone, so `a` is alone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a
        .cmd("STATS")
        .contains(&"connections_current:1".to_string())
    {
        assert!(
            Instant::now() < deadline,
            "probe connection never went away"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut b = node.client();
    assert_eq!(b.one("PING"), "PONG");
    let mut third = node.client();
    assert_eq!(
        String::from_utf8(third.read_to_end()).unwrap(),
        "ERROR: Too many connections (max 2)\r\n"
    );
    drop(a);
    // The slot frees once the node sees the close.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = node.client();
        c.send(b"PING\r\n");
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut c.reader, &mut line);
        if line == "PONG\r\n" {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed: {line:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(b
        .cmd("STATS")
        .iter()
        .any(|l| l.starts_with("connections_rejected:") && l != "connections_rejected:0"));
}

#[test]
fn memory_limit_rejects_writes_but_not_reads_or_deletes() {
    let node = Node::start("storage.memory_limit_mb = 1");
    let mut c = node.client();
    let value = "v".repeat(1000);
    let mut stored = 0;
    loop {
        match c.one(&format!("SET k{stored} {value}")).as_str() {
            "OK" => stored += 1,
            "ERROR: Storage full" => break,
            other => panic!("unexpected {other}"),
        }
        assert!(stored < 2000, "limit never reached");
    }
    assert!(stored > 800, "only {stored} KB stored under a 1 MiB limit");
    assert_eq!(c.one("GET k0"), value);
    assert_eq!(c.one("SET k0 shorter"), "OK"); // shrinking is always allowed
    for i in 1..50 {
        assert_eq!(c.one(&format!("DEL k{i}")), "DELETED");
    }
    assert_eq!(c.one(&format!("SET again {value}")), "OK");
    let stats = c.cmd("STATS");
    assert!(stats
        .iter()
        .any(|l| l.starts_with("storage_full_errors:") && l != "storage_full_errors:0"));
}

#[test]
fn idle_connections_are_told_why_and_closed() {
    let node = Node::start("network.connection_timeout = 1");
    let mut c = node.client();
    assert_eq!(c.one("PING"), "PONG");
    let started = Instant::now();
    assert_eq!(
        String::from_utf8_lossy(&c.read_to_end()),
        "ERROR: Idle timeout\r\n"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[test]
fn sigterm_answers_in_flight_commands_and_releases_the_port() {
    for sig in ["TERM", "INT"] {
        let mut node = Node::start("");
        let mut c = node.client();
        assert_eq!(c.one("SET a 1"), "OK");
        let started = Instant::now();
        node.signal(sig);
        let status = node
            .wait_exit(Duration::from_secs(2))
            .expect("node did not exit within 2 s");
        assert!(status.success(), "{sig}: {status}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(c.read_to_end().is_empty(), "connection closed cleanly");
        std::net::TcpListener::bind(("127.0.0.1", node.port)).expect("port released");
    }
}

#[test]
fn sigterm_mid_pipeline_answers_a_complete_prefix() {
    let mut node = Node::start("");
    let mut c = node.client();
    let writer = c.reader.get_ref().try_clone().unwrap();
    // A writer keeps pipelining until the node closes the connection.
    let pump = std::thread::spawn(move || {
        let mut w = writer;
        let batch = "SET k v\r\n".repeat(1000);
        let mut sent = 0u64;
        while std::io::Write::write_all(&mut w, batch.as_bytes()).is_ok() && sent < 10_000_000 {
            sent += 1000;
        }
    });
    for _ in 0..1000 {
        assert_eq!(c.line(), "OK");
    }
    let started = Instant::now();
    node.signal("TERM");
    let rest = String::from_utf8(c.read_to_end()).unwrap();
    let status = node
        .wait_exit(Duration::from_secs(2))
        .expect("node did not exit within 2 s");
    assert!(status.success());
    assert!(started.elapsed() < Duration::from_secs(2));
    // Every reply that was started was finished: whole lines only, all of them OK.
    assert!(
        rest.is_empty() || rest.ends_with("\r\n"),
        "partial reply at the end"
    );
    assert!(rest.split_terminator("\r\n").all(|l| l == "OK"));
    pump.join().unwrap();
}

#[test]
fn shutdown_command_stops_the_node() {
    let mut node = Node::start("");
    let mut other = node.client();
    let mut c = node.client();
    c.send(b"SET x 1\r\nSHUTDOWN\r\nGET x\r\n");
    assert_eq!(String::from_utf8(c.read_to_end()).unwrap(), "OK\r\nOK\r\n");
    let status = node
        .wait_exit(Duration::from_secs(2))
        .expect("node did not exit");
    assert!(status.success());
    assert!(other.read_to_end().is_empty());
    assert!(TcpStream::connect(("127.0.0.1", node.port)).is_err());
}

#[test]
fn quit_closes_after_answering() {
    let node = Node::start("");
    let mut c = node.client();
    c.send(b"PING\r\nQUIT\r\nPING\r\n");
    assert_eq!(
        String::from_utf8(c.read_to_end()).unwrap(),
        "PONG\r\nOK\r\n"
    );
}

#[test]
fn many_clients_at_once() {
    let node = Node::start("");
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let port = node.port;
            std::thread::spawn(move || {
                let mut c = Client::connect(port);
                for i in 0..200 {
                    assert_eq!(c.one(&format!("SET t{t}:{i} {i}")), "OK");
                }
                for i in 0..200 {
                    assert_eq!(c.one(&format!("GET t{t}:{i}")), i.to_string());
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert_eq!(node.client().one("DBSIZE"), "1600");
}

#[test]
fn bad_configuration_exits_with_every_problem() {
    let path = common::temp_path("bad.toml");
    std::fs::write(&path, "node_id = \"\"\n[network]\nbind_prot = 1\nbind_address = \"nowhere\"\n[storage]\nshards = 3\n").unwrap();
    let out = std::process::Command::new(common::BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["node_id", "bind_port", "bind_address", "shards"] {
        assert!(err.contains(needle), "no message about {needle}: {err}");
    }
}

#[test]
fn help_lists_every_flag() {
    let out = std::process::Command::new(common::BIN)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--print-config",
        "--check-config",
        "--help",
        "--version",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = std::process::Command::new(common::BIN)
        .env("MERKLE_KV_NETWORK_BIND_PORT", port.to_string())
        .env("MERKLE_KV_MQTT_ENABLED", "false")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    drop(taken);
}

#[test]
fn shipped_configs_are_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");
    for file in [
        "single-node.toml",
        "cluster/node1.toml",
        "cluster/node2.toml",
        "cluster/node3.toml",
    ] {
        let out = std::process::Command::new(common::BIN)
            .arg("--check-config")
            .arg("--config")
            .arg(format!("{dir}/{file}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_huge_mget_reply_is_streamed_not_buffered() {
    let node = Node::start("");
    let mut c = node.client();
    let value = "v".repeat(20_000);
    assert_eq!(c.one(&format!("SET big {value}")), "OK");
    let before = peak_rss_kb(node.child.id());
    // 10,000 × 20 KB = 200 MB of reply from one 40 KB command line.
    let keys = 10_000;
    c.send(format!("MGET{}\r\n", " big".repeat(keys)).as_bytes());
    assert_eq!(c.line(), format!("VALUES {keys}"));
    for _ in 0..keys {
        assert_eq!(c.line().len(), value.len());
    }
    let grown_mb = (peak_rss_kb(node.child.id()) - before) / 1024;
    assert!(
        grown_mb < 50,
        "node buffered {grown_mb} MB for one 200 MB MGET"
    );
}

/// What a user sees: a node with no `RUST_LOG`, on its embedded broker, stopped cleanly,
/// logs nothing that looks like trouble.
#[test]
fn a_clean_shutdown_logs_no_error_or_warning() {
    let port = common::free_port();
    let mqtt = common::free_port();
    let config = common::temp_path("quiet.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = \"quiet\"\n[network]\nbind_address = \"127.0.0.1\"\nbind_port = {port}\n\
             [mqtt]\nbroker_address = \"tcp://127.0.0.1:{mqtt}\"\n\
             [mqtt.embedded_broker]\nenabled = true\nlisten = \"127.0.0.1:{mqtt}\"\n\
             [anti_entropy]\nenabled = false\n[logging]\nformat = \"text\"\n"
        ),
    )
    .unwrap();
    let log = config.with_extension("log");
    let child = std::process::Command::new(common::BIN)
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut node = Node {
        child,
        port,
        config,
    };
    common::eventually(Duration::from_secs(20), "connected to its broker", || {
        (TcpStream::connect(("127.0.0.1", port)).is_ok()
            && node.field("INFO", "replication") == "connected")
            .then_some(())
    });
    assert_eq!(node.client().one("SET a 1"), "OK");
    node.signal("TERM");
    let status = node.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success());
    let text = node.log();
    assert!(text.contains("stopped"), "{text}");
    assert!(
        !text.contains("ERROR") && !text.contains("WARN"),
        "a clean shutdown logged trouble:\n{text}"
    );
}

/// A request may cost memory in proportion to its own line, by a small factor: an EXISTS
/// of 500k keys in one 4 MB line is planned in bounded runs, not as 500k ops at once.
#[test]
fn huge_multi_key_requests_cost_memory_in_proportion_to_their_line() {
    let node = Node::start("network.max_line_bytes = 8388608");
    let line: String = std::iter::once("EXISTS".to_string())
        .chain((0..500_000).map(|i| format!(" k{i:06}")))
        .chain(std::iter::once("\r\n".to_string()))
        .collect();
    assert!(line.len() > 4_000_000);
    let mut setup = node.client();
    assert_eq!(setup.one("MSET k000007 a k499999 b"), "OK");
    let base = peak_rss_kb(node.child.id()) * 1024;
    let run = |clients: usize| {
        std::thread::scope(|s| {
            for _ in 0..clients {
                s.spawn(|| {
                    let mut c = node.client();
                    c.send(line.as_bytes());
                    assert_eq!(c.line(), "2");
                });
            }
        });
        peak_rss_kb(node.child.id()) * 1024 - base
    };
    let one = run(1);
    assert!(
        one < 40 << 20,
        "one EXISTS raised peak RSS by {} MB",
        one >> 20
    );
    let four = run(4);
    assert!(
        four < 80 << 20,
        "four EXISTS raised peak RSS by {} MB",
        four >> 20
    );
    eprintln!(
        "peak RSS growth: one {} KB, four {} KB",
        one >> 10,
        four >> 10
    );
}

#[test]
fn in_memory_answers_match_a_real_connection_for_refused_sync_requests() {
    // `answer_all` (tests, benches, fuzzing) drives the same session as a connection:
    // a SYNC whose peer is refused, and a bad SYNC.MSG length (answered, then the
    // connection ends), get the same bytes from both.
    use merkle_kv::node::info::NodeInfo;
    use merkle_kv::node::session::answer_all;
    use merkle_kv::protocol::native::Framer;
    use merkle_kv::store::shard::{MemoryBudget, Shard};
    let input = b"SYNC nonsense\r\nSYNC 0.0.0.0:7000\r\nPING\r\nSYNC.MSG 0\r\nPING\r\n";
    let node = Node::start("");
    let mut c = node.client();
    c.send(input);
    let from_node = String::from_utf8(c.read_to_end()).unwrap();
    let mut shards = vec![Shard::new(0, 0, MemoryBudget::unlimited(), 1 << 20)];
    let mut out = Vec::new();
    answer_all(
        &mut shards,
        &mut Framer::new(1 << 20),
        input,
        &mut out,
        &NodeInfo::default,
    );
    assert_eq!(String::from_utf8(out).unwrap(), from_node);
    assert!(
        from_node.starts_with("ERROR: SYNC needs host:port"),
        "{from_node}"
    );
}
