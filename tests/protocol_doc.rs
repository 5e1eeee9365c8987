//! Executes every `session` example of docs/PROTOCOL.md against a real node, so the
//! documentation cannot drift from what the node answers.

mod common;
use common::Node;

struct Example {
    line: usize,
    steps: Vec<(String, Vec<String>)>,
}

/// The ```session blocks: `> cmd` lines with the expected reply lines after each.
fn examples(doc: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut current: Option<Example> = None;
    for (i, line) in doc.lines().enumerate() {
        match (&mut current, line) {
            (None, "```session") => {
                current = Some(Example {
                    line: i + 1,
                    steps: Vec::new(),
                })
            }
            (Some(_), "```") => out.push(current.take().unwrap()),
            (Some(ex), l) => match l.strip_prefix("> ") {
                Some(cmd) => ex.steps.push((cmd.to_string(), Vec::new())),
                None => ex
                    .steps
                    .last_mut()
                    .expect("reply before a command")
                    .1
                    .push(l.to_string()),
            },
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "unterminated session block");
    out
}

/// `<any>` in `expected` matches any run of characters.
fn matches(expected: &str, actual: &str) -> bool {
    let parts: Vec<&str> = expected.split("<any>").collect();
    if parts.len() == 1 {
        return expected == actual;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !actual.starts_with(first) || !actual[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &actual[first.len()..actual.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(at) => rest = &rest[at + mid.len()..],
            None => return false,
        }
    }
    true
}

#[test]
fn every_documented_example_is_what_the_node_answers() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).unwrap();
    let examples = examples(&doc);
    assert!(
        examples.len() >= 12,
        "found only {} examples",
        examples.len()
    );
    let node = Node::start("storage.shards = 1");
    let mut commands = 0;
    for ex in examples {
        let mut c = node.client();
        assert_eq!(c.one("FLUSHDB"), "OK");
        for (cmd, expected) in &ex.steps {
            let actual = c.cmd(cmd);
            let ok = actual.len() == expected.len()
                && expected.iter().zip(&actual).all(|(e, a)| matches(e, a));
            assert!(
                ok,
                "docs/PROTOCOL.md:{}: `{cmd}`\n expected {expected:?}\n      got {actual:?}",
                ex.line
            );
            commands += 1;
        }
    }
    assert!(commands >= 50, "only {commands} documented commands ran");
}

#[test]
fn wildcard_matching() {
    assert!(matches("KEYS <any> 1", "KEYS 4096 1"));
    assert!(matches("a", "a"));
    assert!(!matches("KEYS <any> 1", "KEYS 4096 10"));
    assert!(matches("<any>", ""));
}
