//! The load harness against a real MerkleKV node over TCP (native protocol),
//! and against a deliberately wrong server to prove that bad replies are
//! counted as errors.

use loadtest::{serde_json, Options};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};

mod common;
use common::{temp_path, Node};

fn options(port: u16, extra: &[&str]) -> Options {
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec![
        "loadtest",
        "--addr",
        &addr,
        "--protocol",
        "native",
        "--connections",
        "4",
        "--pipeline",
        "8",
        "--keys",
        "1000",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    Options::from_args(args).expect("valid options")
}

#[test]
fn native_run_against_a_real_node_has_no_errors() {
    let node = Node::start("");
    let port = node.port;
    let json = temp_path("result.json");
    let json_arg = json.to_str().unwrap().to_string();
    let opts = options(
        port,
        &[
            "--prefill",
            "--duration",
            "1.5",
            "--ratio",
            "1:10",
            "--json",
            &json_arg,
        ],
    );

    let report = loadtest::run(&opts).expect("run completes");
    assert_eq!(report.errors, 0, "errors against a correct node:\n{report}");

    let text = std::fs::read_to_string(&json).expect("JSON written");
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let num = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {text}"))
    };
    assert!(num("ops_per_sec") > 0.0, "{text}");
    assert_eq!(v["errors"].as_u64(), Some(0), "{text}");
    assert!(
        num("p50_us") <= num("p99_us") && num("p99_us") <= num("p999_us"),
        "{text}"
    );
    assert!(v["per_op"]["get"]["ops"].as_u64().unwrap() > 0, "{text}");
    assert_eq!(v["prefill"]["errors"].as_u64(), Some(0), "{text}");
    let _ = std::fs::remove_file(&json);
}

#[test]
fn native_run_with_deletes_has_no_errors() {
    let node = Node::start("");
    let port = node.port;
    let opts = options(
        port,
        &[
            "--requests",
            "20000",
            "--ratio",
            "1:4:1",
            "--value-size",
            "1-200",
        ],
    );
    let report = loadtest::run(&opts).expect("run completes");
    assert_eq!(report.errors, 0, "errors against a correct node:\n{report}");
    assert_eq!(report.ops, 20_000);
}

/// A native-protocol server that stores nothing: SET says OK, DEL says
/// DELETED, and GET answers a value of the right length (the harness's
/// default 32 bytes) made of '!', a byte the harness never writes.
fn start_wrong_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || serve_wrong(stream));
        }
    });
    port
}

fn serve_wrong(stream: TcpStream) {
    stream.set_nodelay(true).unwrap();
    let mut out = stream.try_clone().unwrap();
    let wrong_value = format!("{}\r\n", "!".repeat(32));
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let reply = match line.split(' ').next() {
            Some("SET") => "OK\r\n",
            Some("GET") => wrong_value.as_str(),
            Some("DEL") => "DELETED\r\n",
            _ => "ERROR: unknown command\r\n",
        };
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

#[test]
fn wrong_values_are_reported_as_errors() {
    let port = start_wrong_server();
    let opts = options(port, &["--prefill", "--requests", "2000", "--ratio", "0:1"]);
    let report = loadtest::run(&opts).expect("run completes");
    assert!(report.errors > 0, "wrong values went unnoticed:\n{report}");
    assert_eq!(report.error_kinds["wrong_content"], 2000, "{report}");
    assert_eq!(report.per_op["get"].errors, 2000, "{report}");
}

/// A native-protocol server that forgets everything: SET says OK, GET says
/// `(null)`, DEL says NOT_FOUND. Real threads, one per connection.
fn start_forgetful_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || serve_forgetful(stream));
        }
    });
    port
}

fn serve_forgetful(stream: TcpStream) {
    stream.set_nodelay(true).unwrap();
    let mut out = stream.try_clone().unwrap();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let reply = match line.split(' ').next() {
            Some("SET") => "OK\r\n",
            Some("GET") => "(null)\r\n",
            Some("DEL") => "NOT_FOUND\r\n",
            _ => "ERROR: unknown command\r\n",
        };
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// "Absent" for a key the run wrote is an error, with or without prefill:
/// each connection owns its keys, so it knows which must exist.
#[test]
fn forgotten_keys_are_reported_as_missing() {
    let port = start_forgetful_server();
    for prefill in [true, false] {
        let mut extra = vec!["--requests", "20000", "--ratio", "1:1"];
        if prefill {
            extra.push("--prefill");
        }
        let report = loadtest::run(&options(port, &extra)).expect("run completes");
        // Errors make the command exit with status 1.
        assert!(
            report.errors > 0,
            "prefill={prefill}: lost keys went unnoticed:\n{report}"
        );
        assert!(
            report.error_kinds["missing"] > 0,
            "prefill={prefill}:\n{report}"
        );
        assert_eq!(report.errors, report.error_kinds["missing"], "{report}");
    }
}

/// Open loop: requests the client could not send in time are errors and
/// count in the latency, not silently left out.
#[test]
fn unsent_requests_are_errors() {
    let port = start_forgetful_server();
    let opts = options(
        port,
        &["--rate", "2000000", "--duration", "0.3", "--ratio", "1:0"],
    );
    let report = loadtest::run(&opts).expect("run completes");
    let unsent = report.schedule.as_ref().expect("open loop").unsent;
    assert!(unsent > 0, "{report}");
    assert_eq!(report.error_kinds["unsent"], unsent, "{report}");
    assert_eq!(
        report.errors, unsent,
        "only SETs, all answered OK:\n{report}"
    );
    assert_eq!(report.per_op["set"].errors, unsent, "{report}");
    // A connection's unsent requests are the last of its schedule, so the
    // earliest of them waited at least its share of unsent / rate until the
    // end of the run; on average over connections that is unsent / rate.
    let waited_us = unsent as f64 / 2_000_000.0 * 1e6;
    assert!(report.max_us >= 0.9 * waited_us, "{report}");
}

/// A server that reads requests and never answers.
fn start_silent_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || std::io::copy(&mut stream, &mut std::io::sink()));
        }
    });
    port
}

/// A timeout names the key of the oldest request in flight (the one that
/// got no reply), not the last key encoded.
#[test]
fn timeout_names_the_oldest_request() {
    use loadtest::keyspace::{mix64, Chooser, Owned, Rng};
    let port = start_silent_server();
    let addr = format!("127.0.0.1:{port}");
    let opts = Options::from_args([
        "loadtest",
        "--addr",
        &addr,
        "--connections",
        "1",
        "--pipeline",
        "8",
        "--keys",
        "1000",
        "--requests",
        "8",
        "--ratio",
        "0:1",
        "--reply-timeout",
        "0.2",
        "--quiet",
    ])
    .expect("valid options");
    // The keys connection 0 draws, as the harness does.
    let (chooser, owned) = (Chooser::new(&opts), Owned::new(0, 1, opts.keys));
    let mut rng = Rng::new(opts.seed ^ mix64(0));
    let keys: Vec<u64> = (0..8).map(|_| chooser.next(&mut rng, &owned).1).collect();
    assert_ne!(
        keys[0], keys[7],
        "the test needs distinct first and last keys"
    );

    let report = loadtest::run(&opts).expect("run completes");
    assert_eq!(report.error_kinds["timeout"], 1, "{report}");
    assert_eq!(report.error_kinds["unanswered"], 7, "{report}");
    let first = format!("GET key:{:03}", keys[0]);
    assert!(
        report.error_samples[0].contains(&first),
        "want {first}:\n{report}"
    );
}
