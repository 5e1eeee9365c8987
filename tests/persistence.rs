//! Persistence on real processes: a node that is killed (SIGKILL) or restarted comes
//! back with what it acknowledged, and damaged files give a clear log line and a clean
//! recovery, or a clear refusal to start (docs/PERSISTENCE.md).

mod common;

use common::{temp_path, Node, BIN};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn persistent(dir: &Path, fsync: &str) -> String {
    format!(
        "mqtt.enabled = false\nstorage.pin_threads = false\nstorage.shards = 2\n\
         storage.persistence_enabled = true\nstorage.data_dir = {:?}\nstorage.fsync = {fsync:?}",
        dir.display().to_string()
    )
}

/// What a client did to one key: set it once, perhaps deleted it later, and when each
/// was acknowledged.
#[derive(Clone, Default)]
struct Key {
    value: String,
    set_acked: Option<Instant>,
    del_sent: bool,
    del_acked: Option<Instant>,
}

type Seen = Arc<Mutex<BTreeMap<String, Key>>>;

/// Pipeline SETs (and a DEL of every fifth key set before) at `port` until the
/// connection breaks, recording what was sent and when each reply arrived.
fn write_until_killed(port: u16, tag: usize, seen: Seen, count: Arc<AtomicUsize>) {
    let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut i = 0usize;
    loop {
        let mut batch = String::new();
        let mut ops = Vec::new();
        for _ in 0..32 {
            let key = format!("w{tag}:{}", if i % 5 == 4 { i - 3 } else { i });
            let mut seen = seen.lock().unwrap();
            let k = seen.entry(key.clone()).or_default();
            if i % 5 == 4 {
                batch.push_str(&format!("DEL {key}\r\n"));
                k.del_sent = true;
                ops.push((key, "DELETED"));
            } else {
                k.value = format!("value-{i}");
                batch.push_str(&format!("SET {key} {}\r\n", k.value));
                ops.push((key, "OK"));
            }
            i += 1;
        }
        if writer.write_all(batch.as_bytes()).is_err() {
            return;
        }
        for (key, want) in ops {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(n) if n > 0 && line.ends_with("\r\n") => {}
                _ => return, // killed: this reply never came
            }
            assert_eq!(line.trim_end(), want, "{key}");
            let mut seen = seen.lock().unwrap();
            let k = seen.get_mut(&key).unwrap();
            match want {
                "OK" => k.set_acked = Some(Instant::now()),
                _ => k.del_acked = Some(Instant::now()),
            }
            count.fetch_add(1, Relaxed);
        }
    }
}

/// Check a restarted node against what was acknowledged by `promised` (the moment
/// before which every acknowledged write must be there). Later or unacknowledged
/// writes may or may not have survived. Returns the keys whose state was promised.
fn check_promised(node: &Node, seen: &BTreeMap<String, Key>, promised: Instant) -> usize {
    let mut c = node.client();
    let keys: Vec<_> = seen.iter().collect();
    let mut checked = 0;
    for chunk in keys.chunks(256) {
        let cmds: String = chunk.iter().map(|(k, _)| format!("GET {k}\r\n")).collect();
        c.send(cmds.as_bytes());
        for (key, k) in chunk {
            let got = c.line();
            let by = |t: Option<Instant>| t.is_some_and(|t| t <= promised);
            let ok = if by(k.del_acked) {
                got == "(null)"
            } else if by(k.set_acked) {
                got == k.value || (k.del_sent && got == "(null)")
            } else {
                continue; // nothing promised for this key
            };
            checked += 1;
            assert!(
                ok,
                "{key} after the restart: {got:?} (set by {:?}, deleted {})",
                k.set_acked.map(|t| promised - t.min(promised)),
                k.del_sent
            );
        }
    }
    checked
}

fn kill_under_load(fsync: &str, window: Duration) -> usize {
    let dir = temp_path("kill9");
    let mut node = Node::start_with(&persistent(&dir, fsync));
    let seen: Seen = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..2)
        .map(|tag| {
            let (port, seen, count) = (node.port, seen.clone(), count.clone());
            std::thread::spawn(move || write_until_killed(port, tag, seen, count))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(Relaxed) < 20_000 || Instant::now() < deadline - Duration::from_secs(58) {
        assert!(
            Instant::now() < deadline,
            "writes too slow: {}",
            count.load(Relaxed)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed = Instant::now();
    node.restart(); // SIGKILL, then the same configuration again
    for w in writers {
        w.join().unwrap();
    }
    let checked = check_promised(&node, &seen.lock().unwrap(), killed - window);
    let _ = std::fs::remove_dir_all(&dir);
    checked
}

#[test]
fn killed_under_a_pipelined_load_with_fsync_always_every_acknowledged_write_survives() {
    let n = kill_under_load("always", Duration::ZERO);
    assert!(n >= 10_000, "{n} keys checked");
}

#[test]
fn killed_with_fsync_everysec_what_was_acknowledged_a_moment_before_survives() {
    // Records reach the OS as they come (milliseconds behind their batch on an idle
    // machine; the writer's bounded queue keeps it well under a second on a loaded one),
    // and a SIGKILL loses nothing the OS holds: every write acknowledged a second before
    // the kill is there.
    let n = kill_under_load("everysec", Duration::from_secs(1));
    assert!(n >= 5_000, "{n} keys checked");
}

/// The node's segment files, newest last.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = (0..2)
        .flat_map(|s| std::fs::read_dir(dir.join(format!("shard-{s}"))).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    out.sort();
    out
}

/// Run the binary on `config` and return its exit status and log, if it exits within
/// a few seconds (a node that starts is killed and reported as `None`).
fn start_once(node_id: &str, config: &str) -> (Option<std::process::ExitStatus>, String) {
    let path = temp_path("once.toml");
    let port = common::free_port();
    std::fs::write(
        &path,
        format!("node_id = {node_id:?}\nnetwork.bind_port = {port}\n{config}\n"),
    )
    .unwrap();
    let log = path.with_extension("log");
    let mut child = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        // Data commands are answered LOADING until recovery is done: one answered
        // DBSIZE means the node recovered.
        let answered = TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut s| {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut line = String::new();
            s.write_all(b"DBSIZE\r\n").is_ok()
                && BufReader::new(s).read_line(&mut line).is_ok()
                && line.trim_end().parse::<u64>().is_ok()
        });
        if Instant::now() > deadline || answered {
            let _ = child.kill();
            let _ = child.wait();
            break if answered {
                None
            } else {
                child.try_wait().unwrap()
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&path);
    (status, text)
}

#[test]
fn a_torn_tail_is_cut_with_a_log_line_and_damage_elsewhere_refuses_to_start() {
    let dir = temp_path("damage");
    let config = persistent(&dir, "always");
    {
        // Killed, not shut down: a graceful stop would leave a snapshot and empty logs.
        let mut node = Node::start_with(&config);
        let mut c = node.client();
        for i in 0..200 {
            assert_eq!(c.one(&format!("SET k{i} v{i}")), "OK");
        }
        node.signal("KILL");
        assert!(node.wait_exit(Duration::from_secs(10)).is_some());
    }
    let files = segments(&dir);
    assert!(
        files
            .iter()
            .all(|f| std::fs::metadata(f).unwrap().len() > 100),
        "{files:?}"
    );
    let newest = files.last().unwrap().clone();
    let len = std::fs::metadata(&newest).unwrap().len();
    // A torn last record: the node starts, says how many bytes it cut, serves the rest.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap();
    f.set_len(len - 3).unwrap();
    let id = std::fs::read_to_string(dir.join("NODE")).unwrap();
    let id = id
        .lines()
        .nth(1)
        .unwrap()
        .strip_prefix("node_id ")
        .unwrap()
        .to_string();
    let (status, log) = start_once(&id, &config);
    assert!(status.is_none(), "did not start: {log}");
    assert!(log.contains("cut back to the last whole record"), "{log}");
    assert!(log.contains("dropped_bytes="), "{log}");

    // A flipped bit in the first record of a shard's log, with more after it.
    let first = files.first().unwrap();
    let mut bytes = std::fs::read(first).unwrap();
    bytes[10] ^= 0x40;
    std::fs::write(first, &bytes).unwrap();
    let mut more = std::fs::OpenOptions::new()
        .append(true)
        .open(first)
        .unwrap();
    more.write_all(&bytes[..]).unwrap(); // whole records after the damage
    let (status, log) = start_once(&id, &config);
    assert!(
        status.is_some_and(|s| !s.success()),
        "started on a corrupt log: {log}"
    );
    assert!(log.contains("cannot be trusted past this point"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn another_nodes_data_directory_is_refused() {
    let dir = temp_path("foreign");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("NODE"),
        "merkle-kv data 1\nnode_id someone-else\nshards 2\n",
    )
    .unwrap();
    let (status, log) = start_once("me", &persistent(&dir, "everysec"));
    assert!(status.is_some_and(|s| !s.success()), "started: {log}");
    assert!(
        log.contains("holds the data of node \"someone-else\""),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The node id a data directory's `NODE` names.
fn node_id_of(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("NODE")).unwrap();
    let line = text.lines().nth(1).unwrap();
    line.strip_prefix("node_id ").unwrap().to_string()
}

#[test]
fn data_over_a_lowered_memory_or_value_limit_refuses_to_start_and_the_old_limits_get_it_all() {
    let dir = temp_path("limits");
    let config = persistent(&dir, "everysec");
    let mut node = Node::start_with(&config);
    let mut c = node.client();
    let value = "v".repeat(100_000);
    for i in 0..24 {
        assert_eq!(c.one(&format!("SET big{i} {value}")), "OK");
    }
    drop(c);
    node.signal("TERM");
    assert!(node.wait_exit(Duration::from_secs(20)).is_some());
    let id = node_id_of(&dir);
    // 2.4 MB of values in 1 MiB: recovery would keep part of them.
    let (status, log) = start_once(&id, &format!("{config}\nstorage.memory_limit_mb = 1"));
    assert!(status.is_some_and(|s| !s.success()), "started: {log}");
    assert!(
        log.contains("entries do not fit storage.memory_limit_mb (1 MiB)"),
        "{log}"
    );
    // Values of 100 KB with lines of at most 64 KiB.
    let small_lines = format!("{config}\nnetwork.max_line_bytes = 65536");
    let (status, log) = start_once(&id, &small_lines);
    assert!(status.is_some_and(|s| !s.success()), "started: {log}");
    assert!(log.contains("a value of 100000 bytes"), "{log}");
    // Nothing was lost meanwhile.
    node.restart();
    assert_eq!(node.client().one("DBSIZE"), "24");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_lost_shard_directory_refuses_to_start_naming_it() {
    let dir = temp_path("lost-shard");
    let config = persistent(&dir, "everysec");
    let mut node = Node::start_with(&config);
    let mut c = node.client();
    for i in 0..100 {
        assert_eq!(c.one(&format!("SET k{i} v{i}")), "OK");
    }
    drop(c);
    node.signal("TERM");
    assert!(node.wait_exit(Duration::from_secs(20)).is_some());
    std::fs::remove_dir_all(dir.join("shard-1")).unwrap();
    let (status, log) = start_once(&node_id_of(&dir), &config);
    assert!(status.is_some_and(|s| !s.success()), "started: {log}");
    assert!(log.contains("shard-1 is missing, but"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restarted_node_comes_back_with_its_data_and_its_root() {
    let dir = temp_path("restart");
    let mut node = Node::start_with(&persistent(&dir, "everysec"));
    let mut c = node.client();
    for i in 0..500 {
        assert_eq!(c.one(&format!("SET r{i} v{i}")), "OK");
    }
    assert_eq!(c.one("DEL r7"), "DELETED");
    assert_eq!(c.one("INCR counter"), "1");
    let root = c.one("HASH");
    std::thread::sleep(Duration::from_millis(100)); // everysec: in the OS by now
    drop(c);
    node.restart();
    let mut c = node.client();
    assert_eq!(c.one("HASH"), root);
    assert_eq!(c.one("GET r499"), "v499");
    assert_eq!(c.one("GET r7"), "(null)");
    assert_eq!(c.one("INCR counter"), "2");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The numbers of shard 0's files of one kind (`wal`, `snap`).
fn numbers(dir: &Path, kind: &str) -> Vec<u64> {
    let mut out: Vec<u64> = std::fs::read_dir(dir.join("shard-0"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            let hex = name
                .strip_suffix(&format!(".{kind}"))?
                .split_once('-')?
                .1
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .collect();
    out.sort();
    out
}

#[test]
fn snapshots_bound_the_log_and_a_restart_loads_them() {
    let dir = temp_path("snapshots");
    let config = format!(
        "{}\nstorage.snapshot_log_mb = 1",
        persistent(&dir, "everysec")
    );
    let mut node = Node::start_with(&config);
    let mut c = node.client();
    let value = "v".repeat(1000);
    let fill = |c: &mut common::Client, from: usize| {
        let cmds: String = (from..from + 3000)
            .map(|i| format!("SET s{i} {value}{i}\r\n"))
            .collect();
        c.send(cmds.as_bytes());
        for _ in 0..3000 {
            assert_eq!(c.line(), "OK");
        }
    };
    // ~1.5 MB of log per shard: past the 1 MiB mark, each takes a snapshot.
    fill(&mut c, 0);
    common::eventually(Duration::from_secs(20), "a first snapshot", || {
        (!numbers(&dir, "snap").is_empty()).then_some(())
    });
    fill(&mut c, 3000);
    // The second snapshot makes the first the fallback: the segment before it goes.
    common::eventually(
        Duration::from_secs(20),
        "a second snapshot and pruning",
        || {
            let (snaps, logs) = (numbers(&dir, "snap"), numbers(&dir, "wal"));
            (snaps.len() == 2 && logs.first() == snaps.first()).then_some(())
        },
    );
    assert_eq!(c.one("DEL s5"), "DELETED");
    let root = c.one("HASH");
    std::thread::sleep(Duration::from_millis(100));
    drop(c);
    node.restart();
    let mut c = node.client();
    assert_eq!(c.one("HASH"), root);
    assert_eq!(c.one("GET s5"), "(null)");
    assert_eq!(c.one("GET s5999"), format!("{value}5999"));
    assert_eq!(c.one("DBSIZE"), "5999");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_graceful_shutdown_leaves_a_snapshot_and_the_restart_reads_it() {
    let dir = temp_path("shutdown-snapshot");
    let mut node = Node::start_with(&persistent(&dir, "everysec"));
    let mut c = node.client();
    for i in 0..300 {
        assert_eq!(c.one(&format!("SET g{i} v{i}")), "OK");
    }
    let root = c.one("HASH");
    assert_eq!(c.one("SHUTDOWN"), "OK");
    assert!(node
        .wait_exit(Duration::from_secs(20))
        .is_some_and(|s| s.success()));
    assert_eq!(numbers(&dir, "snap").len(), 1, "shard 0 has its snapshot");
    node.restart();
    let mut c = node.client();
    assert_eq!(c.one("HASH"), root);
    assert_eq!(c.one("GET g299"), "v299");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Run `node` from now on with `shards` shards (its configuration rewritten).
fn set_shards(node: &Node, shards: usize) {
    let config = std::fs::read_to_string(&node.config).unwrap();
    let line = config
        .lines()
        .find(|l| l.starts_with("storage.shards"))
        .unwrap();
    let config = config.replace(line, &format!("storage.shards = {shards}"));
    std::fs::write(&node.config, config).unwrap();
}

/// The data directory's shard count and what else it holds (shard directories, and
/// anything a re-cut left) besides `NODE` and `ALIVE`, as `NODE` and the listing say.
fn layout(dir: &Path) -> (String, Vec<String>) {
    let node = std::fs::read_to_string(dir.join("NODE")).unwrap();
    let shards = node.lines().nth(2).unwrap().to_string();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "NODE" && n != "ALIVE")
        .collect();
    names.sort();
    (shards, names)
}

#[test]
fn a_data_directory_written_with_another_shard_count_is_re_cut_and_keeps_its_root() {
    let dir = temp_path("recut");
    let mut node = Node::start_with(&persistent(&dir, "always"));
    let mut c = node.client();
    for i in 0..400 {
        assert_eq!(c.one(&format!("SET k{i} v{i}")), "OK");
    }
    assert_eq!(c.one("DEL k7"), "DELETED");
    let root = c.one("HASH");
    drop(c);
    let every_key = |node: &Node, deleted: &[usize]| {
        let mut c = node.client();
        for i in 0..400 {
            let want = match deleted.contains(&i) {
                true => "(null)".to_string(),
                false => format!("v{i}"),
            };
            assert_eq!(c.one(&format!("GET k{i}")), want, "k{i}");
        }
        assert_eq!(c.one("DBSIZE"), (400 - deleted.len()).to_string());
    };
    // Killed with 2 shards (everything in the logs), restarted with 1.
    set_shards(&node, 1);
    node.restart();
    assert_eq!(node.client().one("HASH"), root);
    every_key(&node, &[7]);
    assert_eq!(layout(&dir), ("shards 1".into(), vec!["shard-0".into()]));
    // A delete, a graceful shutdown (snapshots, empty logs), restarted with 4.
    let mut c = node.client();
    assert_eq!(c.one("DEL k8"), "DELETED");
    let root = c.one("HASH");
    assert_eq!(c.one("SHUTDOWN"), "OK");
    assert!(node
        .wait_exit(Duration::from_secs(20))
        .is_some_and(|s| s.success()));
    set_shards(&node, 4);
    node.restart();
    assert_eq!(node.client().one("HASH"), root);
    every_key(&node, &[7, 8]);
    let shards = (0..4).map(|i| format!("shard-{i}")).collect();
    assert_eq!(layout(&dir), ("shards 4".into(), shards));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Unmounts a test's tmpfs (and removes its mount point) however the test ends.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// SET `key` on a connection of its own: the reply line, or `None` when the connection
/// closed unanswered (under `fsync = always`, a write the disk failed under).
fn set_once(port: u16, key: &str, value: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("SET {key} {value}\r\n").as_bytes())
        .unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    line.strip_suffix("\r\n").map(str::to_string)
}

#[test]
fn a_full_disk_refuses_writes_keeps_reads_and_recovers_when_space_returns() {
    // A 4 MiB filesystem of the test's own; mounting needs root, as .ci/run runs.
    let mnt = temp_path("tmpfs");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("run mount");
    assert!(mounted.success(), "cannot mount a tmpfs (needs root)");
    let _unmount = Unmount(mnt.clone());
    // Space to give back once the disk is full.
    std::fs::write(mnt.join("filler"), vec![0u8; 1 << 20]).unwrap();
    let config = persistent(&mnt.join("data"), "always") + "\nstorage.snapshot_log_mb = 1024";
    let mut node = Node::start_with(&config);
    let value = "v".repeat(1000);
    let mut acked = Vec::new();
    let refused = loop {
        assert!(acked.len() < 10_000, "4 MiB never filled up");
        let key = format!("full{}", acked.len());
        match set_once(node.port, &key, &value) {
            Some(reply) if reply == "OK" => acked.push(key),
            other => break other,
        }
    };
    // The write the disk failed under is not acknowledged: its connection closes
    // unanswered, or it is refused.
    assert!(
        matches!(
            refused.as_deref(),
            None | Some("ERROR: Storage unavailable")
        ),
        "{refused:?}"
    );
    assert!(acked.len() > 100, "only {} writes fit", acked.len());
    let mut c = node.client();
    assert_eq!(c.one("SET more x"), "ERROR: Storage unavailable");
    assert_eq!(c.one("DEL full0"), "ERROR: Storage unavailable");
    assert_eq!(c.one("FLUSHDB"), "ERROR: Storage unavailable");
    assert_eq!(c.one("GET full0"), value, "reads keep working");
    assert!(node.log().contains("storage unavailable, writes refused"));

    std::fs::remove_file(mnt.join("filler")).unwrap();
    common::eventually(Duration::from_secs(30), "writes accepted again", || {
        (c.one("SET more x") == "OK").then_some(())
    });
    drop(c);
    node.restart();
    let mut c = node.client();
    for key in &acked {
        assert_eq!(c.one(&format!("GET {key}")), value, "{key}");
    }
    assert_eq!(c.one("GET more"), "x");
}

/// The value of `field=` in the first line of `log` that contains `message`.
fn logged(log: &str, message: &str, field: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains(message))
        .unwrap_or_else(|| panic!("no {message:?} in the log:\n{log}"));
    let value = line
        .split(' ')
        .find_map(|w| w.strip_prefix(&format!("{field}=")))
        .unwrap_or_else(|| panic!("no {field}= in {line:?}"));
    value.parse().unwrap()
}

/// How the node that misses writes goes down.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    Shutdown,
    Kill,
}

/// Three persisting nodes, replication off (anti-entropy is the only way C learns what
/// it missed): C goes down, A takes new keys, deletes and overwrites, and C comes back
/// with its data from disk and fetches exactly those.
fn a_restarted_node_fetches_only_what_it_missed(stop: Stop) {
    const N: usize = 2000;
    let (new, deleted, overwritten) = (50, 5, 5);
    let dirs: Vec<PathBuf> = ["a", "b", "c"]
        .map(|n| temp_path(&format!("three-{n}")))
        .into();
    let a = Node::start_with(&persistent(&dirs[0], "everysec"));
    let b = Node::start_with(&persistent(&dirs[1], "everysec"));
    let sync = |from: &Node, to: &Node| {
        let line = from.client().one(&format!("SYNC 127.0.0.1:{}", to.port));
        assert!(line.starts_with("OK "), "{line}");
        line
    };
    let mut c = a.client();
    let cmds: String = (1..N).map(|i| format!("SET k{i} v{i}\r\n")).collect();
    c.send(cmds.as_bytes());
    for _ in 1..N {
        assert_eq!(c.line(), "OK");
    }
    // C learns from its peers by anti-entropy only: at its bootstrap, and never from a
    // periodic round during the test.
    let mut node_c = Node::start_with(&format!(
        "{}\nanti_entropy.enabled = true\nanti_entropy.interval_seconds = 3600\n\
         anti_entropy.peer_list = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]",
        persistent(&dirs[2], "always"),
        a.port,
        b.port
    ));
    // Under `always` a reply waits for its batch to be synced, and the writer takes
    // batches in order: once C answers, what its bootstrap stored is on disk too.
    assert_eq!(node_c.client().one("SET k0 from-c"), "OK");
    sync(&a, &node_c);
    sync(&b, &a);
    let root = a.client().one("HASH");
    for n in [&b, &node_c] {
        assert_eq!(n.client().one("HASH"), root);
    }

    match stop {
        Stop::Shutdown => {
            assert_eq!(node_c.client().one("SHUTDOWN"), "OK");
            assert!(node_c
                .wait_exit(Duration::from_secs(20))
                .is_some_and(|s| s.success()));
        }
        Stop::Kill => {
            node_c.signal("KILL");
            assert!(node_c.wait_exit(Duration::from_secs(10)).is_some());
        }
    }
    let mut c = a.client();
    for i in 0..new {
        assert_eq!(c.one(&format!("SET new{i} n{i}")), "OK");
    }
    for i in 0..deleted {
        assert_eq!(c.one(&format!("DEL k{}", 100 + i)), "DELETED");
    }
    for i in 0..overwritten {
        assert_eq!(c.one(&format!("SET k{} changed", 200 + i)), "OK");
    }
    sync(&b, &a);

    node_c.restart_with_env(&[("RUST_LOG", "info")]);
    let log = node_c.log();
    // Recovery runs before the node serves or dials anyone: this is what the disk held.
    assert_eq!(logged(&log, "recovered from disk", "keys"), N as u64);
    let missed = (new + deleted + overwritten) as u64;
    assert_eq!(
        logged(&log, "caught up with a peer", "keys_repaired"),
        missed
    );
    let root = a.client().one("HASH");
    for n in [&b, &node_c] {
        assert_eq!(n.client().one("HASH"), root);
    }
    let mut c = node_c.client();
    assert_eq!(c.one("GET k0"), "from-c");
    assert_eq!(c.one("GET k1999"), "v1999");
    assert_eq!(c.one("GET new49"), "n49");
    assert_eq!(c.one("GET k100"), "(null)");
    assert_eq!(c.one("GET k200"), "changed");
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn in_a_three_node_cluster_a_node_shut_down_comes_back_with_its_data_and_fetches_only_what_it_missed(
) {
    a_restarted_node_fetches_only_what_it_missed(Stop::Shutdown);
}

#[test]
fn in_a_three_node_cluster_a_killed_node_comes_back_with_its_data_and_fetches_only_what_it_missed()
{
    a_restarted_node_fetches_only_what_it_missed(Stop::Kill);
}
