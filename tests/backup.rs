//! Backups on real processes (docs/PERSISTENCE.md, "Backups and restore"): `BACKUP` on a
//! persisting node, the node stopped and its data directory wiped, `merkle-kv restore`,
//! and the node back with the data set of the moment of the backup, Merkle root and
//! every key; a damaged backup or a used data directory refused; old backups pruned.

mod common;

use common::{eventually, temp_path, Node, BIN};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// A persisting node's settings, with its backups in `backups`.
fn settings(data: &Path, backups: &Path, extra: &str) -> String {
    format!(
        "mqtt.enabled = false\nstorage.pin_threads = false\nstorage.shards = 2\n\
         storage.persistence_enabled = true\nstorage.data_dir = {:?}\n\
         storage.backup_dir = {:?}\nstorage.snapshot_log_mb = 1\n{extra}",
        data.display().to_string(),
        backups.display().to_string()
    )
}

/// `BACKUP`'s path, from its `OK <path>` reply.
fn backup(node: &Node) -> PathBuf {
    let reply = node.client().one("BACKUP");
    let path = reply
        .strip_prefix("OK ")
        .unwrap_or_else(|| panic!("BACKUP: {reply}"));
    PathBuf::from(path)
}

fn restore(node: &Node, from: &Path) -> Output {
    Command::new(BIN)
        .args(["restore", "--config"])
        .arg(&node.config)
        .arg("--from")
        .arg(from)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stop(node: &mut Node) {
    let _ = node.child.kill();
    let _ = node.child.wait();
}

/// SET `n` keys `prefix<i>` with values long enough that each shard's log passes
/// `snapshot_log_mb` (1 MiB), pipelined; then DEL every seventh. What they hold after.
fn write_keys(node: &Node, prefix: &str, n: usize) -> BTreeMap<String, Option<String>> {
    let mut c = node.client();
    let mut want = BTreeMap::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let mut batch = String::new();
        for i in chunk {
            let value = format!("{i:0>1000}");
            batch.push_str(&format!("SET {prefix}{i} {value}\r\n"));
            want.insert(format!("{prefix}{i}"), Some(value));
        }
        c.send(batch.as_bytes());
        for _ in chunk {
            assert_eq!(c.line(), "OK");
        }
    }
    for i in (0..n).step_by(7) {
        assert_eq!(c.one(&format!("DEL {prefix}{i}")), "DELETED");
        want.insert(format!("{prefix}{i}"), None);
    }
    want
}

#[test]
fn a_backup_wiped_and_restored_brings_back_the_data_set_of_its_moment() {
    let (data, backups) = (temp_path("data"), temp_path("backups"));
    let mut node = Node::start_with(&settings(&data, &backups, ""));
    let mut want = write_keys(&node, "k", 3000);
    // Each shard's log passed snapshot_log_mb: the backup holds a snapshot and a log.
    for shard in ["shard-0", "shard-1"] {
        eventually(Duration::from_secs(30), "a snapshot", || {
            let names = std::fs::read_dir(data.join(shard)).ok()?;
            names
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .any(|n| n.ends_with(".snap"))
                .then_some(())
        });
    }
    let mut c = node.client();
    let taken = backup(&node);
    let root = c.one("HASH");
    assert!(taken.starts_with(&backups) && taken.join("MANIFEST").is_file());
    let manifest = std::fs::read_to_string(taken.join("MANIFEST")).unwrap();
    for shard in ["shard-0", "shard-1"] {
        let snap = format!(" {shard}/snap-");
        assert!(
            manifest.contains(&snap),
            "no snapshot of {shard}:\n{manifest}"
        );
    }
    // After the backup: not in it.
    assert_eq!(c.one("SET late 1"), "OK");
    assert_eq!(c.one("DEL k1"), "DELETED");
    assert_ne!(c.one("HASH"), root);
    drop(c);
    stop(&mut node);
    std::fs::remove_dir_all(&data).unwrap();

    let out = restore(&node, &taken);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.starts_with("restored ") && said.contains("2 shards"),
        "{said}"
    );
    node.restart_listening();
    node.wait_loaded();
    let mut c = node.client();
    assert_eq!(c.one("HASH"), root);
    want.insert("late".into(), None);
    for (key, value) in &want {
        let got = c.one(&format!("GET {key}"));
        assert_eq!(
            Some(&got),
            value.as_ref().or(Some(&"(null)".into())),
            "{key}"
        );
    }
    drop(c);
    stop(&mut node);
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_dir_all(&backups);
}

#[test]
fn a_damaged_backup_or_a_used_data_dir_is_refused_and_nothing_is_installed() {
    let (data, backups) = (temp_path("data"), temp_path("backups"));
    let mut node = Node::start_with(&settings(&data, &backups, ""));
    write_keys(&node, "d", 200);
    let taken = backup(&node);
    stop(&mut node);

    let out = restore(&node, &taken);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("is not empty"), "{said}");

    std::fs::remove_dir_all(&data).unwrap();
    let victim = std::fs::read_dir(taken.join("shard-1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::metadata(p).unwrap().len() > 100)
        .expect("a shard file with records");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[50] ^= 1;
    std::fs::write(&victim, bytes).unwrap();
    let out = restore(&node, &taken);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    let name = victim.file_name().unwrap().to_string_lossy();
    assert!(
        said.contains(&*name) && said.contains("checksum differs"),
        "{said}"
    );
    assert!(!data.exists(), "a damaged backup installed something");
    let _ = std::fs::remove_dir_all(&backups);
}

#[test]
fn backups_past_backup_retain_are_removed_oldest_first() {
    let (data, backups) = (temp_path("data"), temp_path("backups"));
    let node = Node::start_with(&settings(&data, &backups, "storage.backup_retain = 2"));
    let taken: Vec<PathBuf> = (0..3)
        .map(|i| {
            assert_eq!(node.client().one(&format!("SET r{i} {i}")), "OK");
            backup(&node)
        })
        .collect();
    let mut left: Vec<PathBuf> = std::fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    left.sort();
    assert_eq!(left, taken[1..]);
    drop(node);
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_dir_all(&backups);
}

/// Unmounts a test's tmpfs (and removes its mount point) however the test ends.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Remove everything in `dir` but `keep`.
fn wipe(dir: &Path, keep: Option<&Path>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if Some(p.as_path()) != keep {
            let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
        }
    }
}

fn restored(node: &Node, from: &Path) {
    let out = restore(node, from);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_data_dir_that_is_a_mount_point_is_restored_into_with_or_without_its_backups_in_it() {
    // data_dir a file system of its own, as on a dedicated disk (docs/DEPLOYMENT.md);
    // mounting needs root, as .ci/run runs.
    let data = temp_path("mounted");
    std::fs::create_dir_all(&data).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&data)
        .status()
        .expect("run mount");
    assert!(mounted.success(), "cannot mount a tmpfs (needs root)");
    let _unmount = Unmount(data.clone());
    // The default backup_dir: `<data_dir>/backups`, on the mounted file system.
    let mut node = Node::start_with(&format!(
        "mqtt.enabled = false\nstorage.pin_threads = false\nstorage.shards = 2\n\
         storage.persistence_enabled = true\nstorage.data_dir = {:?}\n",
        data.display().to_string()
    ));
    write_keys(&node, "m", 300);
    let taken = backup(&node);
    assert!(
        taken.starts_with(data.join("backups")),
        "{}",
        taken.display()
    );
    let root = node.client().one("HASH");
    stop(&mut node);

    // The data directory wiped but for its backups, which stay where they are.
    wipe(&data, Some(&data.join("backups")));
    restored(&node, &taken);
    assert!(taken.join("MANIFEST").is_file());
    let left: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !["NODE", "shard-0", "shard-1", "backups"].contains(&n.as_str()))
        .collect();
    assert!(left.is_empty(), "left in the data directory: {left:?}");
    node.restart_listening();
    node.wait_loaded();
    assert_eq!(node.client().one("HASH"), root);
    stop(&mut node);

    // The backups elsewhere, and the mounted data directory wiped whole.
    let elsewhere = temp_path("backups");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let copy = elsewhere.join(taken.file_name().unwrap());
    let copied = Command::new("cp").arg("-a").arg(&taken).arg(&copy).status();
    assert!(copied.unwrap().success());
    let mut config = std::fs::read_to_string(&node.config).unwrap();
    config.push_str(&format!(
        "storage.backup_dir = {:?}\n",
        elsewhere.display().to_string()
    ));
    std::fs::write(&node.config, config).unwrap();
    wipe(&data, None);
    restored(&node, &copy);
    node.restart_listening();
    node.wait_loaded();
    assert_eq!(node.client().one("HASH"), root);
    stop(&mut node);
    let _ = std::fs::remove_dir_all(&elsewhere);
}
