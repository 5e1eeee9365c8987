//! Test support: start a real `merkle-kv` process on a free loopback port, and a small
//! blocking client that reads replies by the protocol's framing.
#![allow(dead_code)] // each test file uses a different part of this module

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_merkle-kv");

/// A node process; killed (and waited for) when dropped.
pub struct Node {
    pub child: Child,
    pub port: u16,
    pub config: PathBuf,
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn temp_path(name: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("merkle-kv-test-{}-{n}-{name}", std::process::id()))
}

impl Node {
    /// Start a standalone node. `extra` is TOML appended to a minimal config; it may add
    /// keys to `[network]` and `[storage]` (given as `network.x = ...` dotted keys).
    pub fn start(extra: &str) -> Node {
        Node::start_with(&format!("mqtt.enabled = false\n{extra}"))
    }

    /// Start a node replicating through `broker` on topic prefix `prefix`.
    pub fn replicated(broker: &Broker, prefix: &str, extra: &str) -> Node {
        Node::start_with(&format!(
            "mqtt.broker_address = \"tcp://127.0.0.1:{}\"\nmqtt.topic_prefix = \"{prefix}\"\n\
             storage.pin_threads = false\n{extra}",
            broker.port
        ))
    }

    /// Start a node; `extra` is TOML after `node_id` and the network address.
    pub fn start_with(extra: &str) -> Node {
        Node::start_with_env(extra, &[])
    }

    /// As [`Node::start_with`], with extra environment variables.
    pub fn start_with_env(extra: &str, env: &[(&str, &str)]) -> Node {
        for _ in 0..5 {
            let mut node = Node::spawn(free_port(), extra, env);
            if node.wait_ready() {
                return node;
            }
            // Someone took the port between our probe and the node's bind: try another.
        }
        panic!("could not start a node");
    }

    /// Start a node on `port` and return once it listens: it may still be LOADING.
    pub fn launch_on(port: u16, extra: &str) -> Node {
        let mut node = Node::spawn(port, extra, &[]);
        assert!(
            node.wait_listening(),
            "the node did not start on port {port}"
        );
        node
    }

    fn spawn(port: u16, extra: &str, env: &[(&str, &str)]) -> Node {
        let config = temp_path("node.toml");
        // Anti-entropy is off unless the test turns it on.
        let ae = if extra.contains("anti_entropy.enabled") {
            ""
        } else {
            "anti_entropy.enabled = false\n"
        };
        let toml = format!(
            "node_id = \"test-{port}\"\nnetwork.bind_address = \"127.0.0.1\"\nnetwork.bind_port = {port}\n{ae}{extra}\n"
        );
        std::fs::write(&config, toml).unwrap();
        let log = std::fs::File::create(config.with_extension("log")).unwrap();
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start merkle-kv");
        Node {
            child,
            port,
            config,
        }
    }

    /// Kill the process and start it again with the same configuration and port (an
    /// in-memory node comes back empty), and wait until it serves data.
    pub fn restart(&mut self) {
        self.restart_listening();
        self.wait_loaded();
    }

    /// As [`Node::restart`], with extra environment variables (`RUST_LOG=info` to read
    /// what it logs at start).
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.restart_listening_with_env(env);
        self.wait_loaded();
    }

    /// As [`Node::restart`], returning as soon as the port accepts (it may be LOADING).
    pub fn restart_listening(&mut self) {
        self.restart_listening_with_env(&[]);
    }

    fn restart_listening_with_env(&mut self, env: &[(&str, &str)]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.config.with_extension("log"))
            .unwrap();
        self.child = Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("restart merkle-kv");
        assert!(
            self.wait_listening(),
            "the node did not come back on port {}",
            self.port
        );
    }

    /// Whether the node came up listening; then waits until it is out of LOADING.
    fn wait_ready(&mut self) -> bool {
        let up = self.wait_listening();
        if up {
            self.wait_loaded();
        }
        up
    }

    fn wait_listening(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Wait until the node serves data commands (its bootstrap is over).
    pub fn wait_loaded(&self) {
        eventually(Duration::from_secs(60), "the node leaves LOADING", || {
            (self.field("INFO", "loading") == "0").then_some(())
        });
    }

    pub fn client(&self) -> Client {
        Client::connect(self.port)
    }

    /// A field of INFO or STATS, by name.
    pub fn field(&self, command: &str, name: &str) -> String {
        let reply = self.client().cmd(command);
        let prefix = format!("{name}:");
        reply
            .iter()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{command} has no {name}: {reply:?}"))
            .to_string()
    }

    pub fn stat(&self, name: &str) -> u64 {
        self.field("STATS", name).parse().unwrap()
    }

    /// The node's log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_extension("log")).unwrap_or_default()
    }

    /// Wait for the process to exit by itself, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(self.config.with_extension("log"));
    }
}

pub struct Client {
    pub reader: BufReader<TcpStream>,
}

/// The MQTT brokers the replication tests run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    Mosquitto,
    /// `merkle-kv broker` (rumqttd), the embedded broker in a process of its own.
    Embedded,
}

/// Set to 1 (as `.ci/run` does) to make a missing Mosquitto a test failure.
pub const REQUIRE_MOSQUITTO: &str = "MKV_TEST_REQUIRE_MOSQUITTO";

pub fn mosquitto_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

impl BrokerKind {
    /// Every broker to test against: the embedded one always, Mosquitto when installed
    /// (required when `MKV_TEST_REQUIRE_MOSQUITTO=1`).
    pub fn all() -> Vec<BrokerKind> {
        let mut kinds = vec![BrokerKind::Embedded];
        if mosquitto_bin().is_some() {
            kinds.push(BrokerKind::Mosquitto);
        } else if std::env::var(REQUIRE_MOSQUITTO).as_deref() == Ok("1") {
            panic!("{REQUIRE_MOSQUITTO}=1 but no mosquitto binary was found (apt-get install mosquitto)");
        } else {
            eprintln!(
                "mosquitto not installed: replication tests run against the embedded broker only"
            );
        }
        kinds
    }
}

/// An MQTT broker process on a free loopback port; killed when dropped.
pub struct Broker {
    pub kind: BrokerKind,
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

impl Broker {
    pub fn start(kind: BrokerKind) -> Broker {
        let dir = temp_path("broker");
        std::fs::create_dir_all(&dir).unwrap();
        let mut b = Broker {
            kind,
            port: 0,
            child: None,
            dir,
        };
        for _ in 0..5 {
            b.port = free_port();
            if b.spawn() {
                return b;
            }
        }
        panic!("could not start {kind:?}");
    }

    /// Start the broker process on `self.port`; true once it accepts connections.
    fn spawn(&mut self) -> bool {
        let log = std::fs::File::create(self.dir.join("broker.log")).unwrap();
        let mut cmd = match self.kind {
            BrokerKind::Mosquitto => {
                let conf = self.dir.join("mosquitto.conf");
                // Queue and in-flight limits raised as docs/DEPLOYMENT.md says: the
                // defaults drop QoS 1 messages under load.
                std::fs::write(
                    &conf,
                    format!(
                        "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                         max_queued_messages 100000\nmax_inflight_messages 0\n",
                        self.port
                    ),
                )
                .unwrap();
                let mut c = Command::new(mosquitto_bin().expect("mosquitto"));
                c.arg("-c").arg(conf);
                c
            }
            BrokerKind::Embedded => {
                let mut c = Command::new(BIN);
                c.args(["broker", "--listen", &format!("127.0.0.1:{}", self.port)]);
                c.env("RUST_LOG", "warn");
                c
            }
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the broker");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Kill the broker abruptly (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "could not restart {:?}",
                self.kind
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Peak resident memory of a process, from /proc.
pub fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Poll `f` until it returns `Some`, up to `limit`; panics with `what` on timeout.
pub fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            reader: BufReader::new(stream),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).unwrap();
    }

    /// One reply line without its CRLF; panics on a line not ending in CRLF.
    pub fn line(&mut self) -> String {
        let mut buf = Vec::new();
        self.reader.read_until(b'\n', &mut buf).unwrap();
        assert!(
            buf.ends_with(b"\r\n"),
            "reply line without CRLF: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.truncate(buf.len() - 2);
        String::from_utf8(buf).unwrap()
    }

    /// One whole reply: a line, plus the lines a multi-line header announces.
    pub fn reply(&mut self) -> Vec<String> {
        let first = self.line();
        let n = multi_line_count(&first);
        let mut lines = vec![first];
        for _ in 0..n {
            lines.push(self.line());
        }
        lines
    }

    /// Send one command line and read its reply.
    pub fn cmd(&mut self, line: &str) -> Vec<String> {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Send one command and return its single-line reply.
    pub fn one(&mut self, line: &str) -> String {
        let r = self.cmd(line);
        assert_eq!(r.len(), 1, "{line}: {r:?}");
        r.into_iter().next().unwrap()
    }

    pub fn half_close(&mut self) {
        self.reader.get_mut().shutdown(Shutdown::Write).unwrap();
    }

    /// Everything until the node closes the connection.
    pub fn read_to_end(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        self.reader.read_to_end(&mut out).unwrap();
        out
    }
}

/// Lines that follow a multi-line header (`VALUES n`, `KEYS c n`, `SHARDS n`, `INFO n`,
/// `STATS n`): its last field.
pub fn multi_line_count(header: &str) -> usize {
    let mut words = header.split(' ');
    match words.next() {
        Some("VALUES" | "KEYS" | "SHARDS" | "INFO" | "STATS") => {
            words.next_back().and_then(|n| n.parse().ok()).unwrap_or(0)
        }
        _ => 0,
    }
}
