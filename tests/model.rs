//! Property test: random operation sequences against real nodes with 1, 2 and 8 shards
//! and against a plain `HashMap` model. Every read matches the model, and after every
//! sequence the three nodes report the same Merkle root (the tree's shape does not
//! depend on the shard count).

mod common;
use common::{Client, Node};
use proptest::prelude::*;
use std::collections::HashMap;

#[derive(Debug, Clone)]
enum Op {
    Set(u8, String),
    Get(u8),
    Del(u8),
    Exists(u8),
    Incr(u8, i32),
    Append(u8, String),
    Prepend(u8, String),
    Mget(Vec<u8>),
    Mset(Vec<(u8, String)>),
    Dbsize,
}

fn key(k: u8) -> String {
    format!("key:{k}")
}

fn value() -> impl Strategy<Value = String> {
    "[a-z0-9 {}\":]{0,12}"
}

fn token() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,8}"
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0u8..24;
    prop_oneof![
        3 => (k.clone(), value()).prop_map(|(k, v)| Op::Set(k, v)),
        3 => k.clone().prop_map(Op::Get),
        1 => k.clone().prop_map(Op::Del),
        1 => k.clone().prop_map(Op::Exists),
        1 => (k.clone(), -5i32..5).prop_map(|(k, d)| Op::Incr(k, d)),
        1 => (k.clone(), value()).prop_map(|(k, v)| Op::Append(k, v)),
        1 => (k.clone(), value()).prop_map(|(k, v)| Op::Prepend(k, v)),
        1 => prop::collection::vec(k.clone(), 1..6).prop_map(Op::Mget),
        1 => prop::collection::vec((k, token()), 1..5).prop_map(Op::Mset),
        1 => Just(Op::Dbsize),
    ]
}

/// The command line for `op` and the reply the model expects (applying it to the model).
fn apply(model: &mut HashMap<String, String>, op: &Op) -> (String, Vec<String>) {
    let get = |m: &HashMap<String, String>, k: u8| {
        m.get(&key(k)).cloned().unwrap_or_else(|| "(null)".into())
    };
    match op {
        Op::Set(k, v) => {
            model.insert(key(*k), v.clone());
            (format!("SET {} {v}", key(*k)), vec!["OK".into()])
        }
        Op::Get(k) => (format!("GET {}", key(*k)), vec![get(model, *k)]),
        Op::Del(k) => {
            let r = if model.remove(&key(*k)).is_some() {
                "DELETED"
            } else {
                "NOT_FOUND"
            };
            (format!("DEL {}", key(*k)), vec![r.into()])
        }
        Op::Exists(k) => (
            format!("EXISTS {}", key(*k)),
            vec![u8::from(model.contains_key(&key(*k))).to_string()],
        ),
        Op::Incr(k, d) => {
            let line = if *d < 0 {
                format!("DECR {} {}", key(*k), -d)
            } else {
                format!("INCR {} {d}", key(*k))
            };
            match model.get(&key(*k)).map(|v| v.parse::<i64>()) {
                Some(Err(_)) => (line, vec!["ERROR: Value is not an integer".into()]),
                cur => {
                    let n = cur.map_or(0, |r| r.unwrap()) + i64::from(*d);
                    model.insert(key(*k), n.to_string());
                    (line, vec![n.to_string()])
                }
            }
        }
        Op::Append(k, v) => {
            model.entry(key(*k)).or_default().push_str(v);
            (format!("APPEND {} {v}", key(*k)), vec!["OK".into()])
        }
        Op::Prepend(k, v) => {
            let cur = model.entry(key(*k)).or_default();
            *cur = format!("{v}{cur}");
            (format!("PREPEND {} {v}", key(*k)), vec!["OK".into()])
        }
        Op::Mget(ks) => {
            let mut reply = vec![format!("VALUES {}", ks.len())];
            reply.extend(ks.iter().map(|k| get(model, *k)));
            let names: Vec<String> = ks.iter().map(|k| key(*k)).collect();
            (format!("MGET {}", names.join(" ")), reply)
        }
        Op::Mset(pairs) => {
            let mut line = "MSET".to_string();
            for (k, v) in pairs {
                model.insert(key(*k), v.clone());
                line += &format!(" {} {v}", key(*k));
            }
            (line, vec!["OK".into()])
        }
        Op::Dbsize => ("DBSIZE".into(), vec![model.len().to_string()]),
    }
}

fn check(clients: &mut [Client], ops: &[Op]) -> Result<(), TestCaseError> {
    let mut model = HashMap::new();
    for c in clients.iter_mut() {
        prop_assert_eq!(c.one("FLUSHDB"), "OK");
    }
    for op in ops {
        let (line, expected) = apply(&mut model, op);
        for c in clients.iter_mut() {
            prop_assert_eq!(&c.cmd(&line), &expected, "{}", line);
        }
    }
    for c in clients.iter_mut() {
        let mut keys = scan_all(c);
        keys.sort();
        let mut expected: Vec<String> = model.keys().cloned().collect();
        expected.sort();
        prop_assert_eq!(
            keys,
            expected,
            "SCAN * does not list exactly the model's keys"
        );
    }
    let roots: Vec<String> = clients.iter_mut().map(|c| c.one("HASH")).collect();
    prop_assert!(
        roots.iter().all(|r| r == &roots[0]),
        "roots differ across shard counts: {:?}",
        roots
    );
    // Pipelined: the whole sequence again in one write gives the same replies.
    let mut pipelined = String::new();
    let mut expected = Vec::new();
    for op in ops {
        let (line, reply) = apply(&mut model, op);
        pipelined += &line;
        pipelined += "\r\n";
        expected.push(reply);
    }
    let c = &mut clients[2];
    c.send(pipelined.as_bytes());
    for e in expected {
        prop_assert_eq!(c.reply(), e);
    }
    Ok(())
}

/// Every key, by paging `SCAN *` with a small count until the cursor is 0.
fn scan_all(c: &mut Client) -> Vec<String> {
    let (mut keys, mut cursor) = (Vec::new(), "0".to_string());
    // Every call advances the cursor by at least one of the 65,536 buckets.
    for _ in 0..=65_536 {
        let reply = c.cmd(&format!("SCAN * {cursor} 5"));
        let head: Vec<&str> = reply[0].split(' ').collect();
        assert_eq!(head[0], "KEYS");
        keys.extend(reply[1..].iter().cloned());
        cursor = head[1].to_string();
        if cursor == "0" {
            return keys;
        }
    }
    panic!("SCAN never returned cursor 0");
}

#[test]
fn nodes_match_the_model_and_each_others_roots() {
    // One set of nodes for every case; they are killed when this test ends.
    let nodes: Vec<Node> = [1, 2, 8]
        .iter()
        .map(|s| Node::start(&format!("storage.shards = {s}")))
        .collect();
    let clients = std::cell::RefCell::new(nodes.iter().map(Node::client).collect::<Vec<Client>>());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    });
    let result = runner.run(&prop::collection::vec(op(), 1..120), |ops| {
        check(&mut clients.borrow_mut(), &ops)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Root equality also holds for data that built up through different histories. A
/// delete leaves a tombstone, which is part of the data: node `a` deletes keys it never
/// had and ends with the same tombstones as node `b`, which had them.
#[test]
fn same_data_same_root_whatever_the_history() {
    let a = Node::start("storage.shards = 1");
    let b = Node::start("storage.shards = 8");
    let (mut ca, mut cb) = (a.client(), b.client());
    for i in 0..300 {
        assert_eq!(ca.one(&format!("SET k{i} v{i}")), "OK");
    }
    for i in (0..400).rev() {
        assert_eq!(cb.one(&format!("SET k{i} temp")), "OK");
        assert_eq!(cb.one(&format!("SET k{i} v{i}")), "OK");
    }
    for i in 300..400 {
        assert_eq!(cb.one(&format!("DEL k{i}")), "DELETED");
    }
    assert_ne!(
        ca.one("HASH"),
        cb.one("HASH"),
        "b holds 100 tombstones a lacks"
    );
    for i in 300..400 {
        assert_eq!(ca.one(&format!("DEL k{i}")), "NOT_FOUND");
    }
    assert_eq!(ca.one("HASH"), cb.one("HASH"));
}
