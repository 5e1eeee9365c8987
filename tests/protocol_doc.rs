//! Executes every `session` example of docs/PROTOCOL.md against a real node, so the
//! documentation cannot drift from what the node answers.

mod common;
use common::Node;

struct Example {
    line: usize,
    /// TOML dotted keys for the node this block runs on (`storage.shards=2 ...`).
    settings: String,
    steps: Vec<(String, Vec<String>)>,
}

/// The ```session blocks: `> cmd` lines with the expected reply lines after each. A
/// block may name node settings after `session`: ```session storage.shards=2
fn examples(doc: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut current: Option<Example> = None;
    for (i, line) in doc.lines().enumerate() {
        match (&mut current, line) {
            (None, l) if l.starts_with("```session") => {
                let settings = l["```session".len()..]
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join("\n");
                current = Some(Example {
                    line: i + 1,
                    settings,
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

/// `<c*N>` stands for the character `c` repeated N times (long keys and values).
fn expand(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('<') {
        let tail = &rest[at..];
        let macro_end = tail.find('>');
        let parsed = macro_end.and_then(|end| {
            let body = &tail[1..end];
            let mut chars = body.chars();
            let c = chars.next()?;
            let n: usize = chars.as_str().strip_prefix('*')?.parse().ok()?;
            Some((c.to_string().repeat(n), end))
        });
        match parsed {
            Some((expansion, end)) => {
                out += &rest[..at];
                out += &expansion;
                rest = &tail[end + 1..];
            }
            None => {
                out += &rest[..at + 1];
                rest = &rest[at + 1..];
            }
        }
    }
    out + rest
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
    let mut nodes: std::collections::HashMap<String, Node> = std::collections::HashMap::new();
    let mut commands = 0;
    for ex in examples {
        let stops = ex.steps.iter().any(|(cmd, _)| cmd == "SHUTDOWN");
        // A block that shuts its node down gets a node of its own.
        let own;
        let node = if stops {
            own = Node::start(&ex.settings);
            &own
        } else {
            let settings = if ex.settings.is_empty() {
                "storage.shards = 1".to_string()
            } else {
                ex.settings.clone()
            };
            nodes
                .entry(settings.clone())
                .or_insert_with(|| Node::start(&settings))
        };
        let mut c = node.client();
        assert_eq!(c.one("FLUSHDB"), "OK");
        for (cmd, expected) in &ex.steps {
            let actual = c.cmd(&expand(cmd));
            let expected: Vec<String> = expected.iter().map(|e| expand(e)).collect();
            let ok = actual.len() == expected.len()
                && expected.iter().zip(&actual).all(|(e, a)| matches(e, a));
            assert!(
                ok,
                "docs/PROTOCOL.md:{}: `{cmd}`\n expected {expected:?}\n      got {actual:?}",
                ex.line
            );
            if cmd == "QUIT" || cmd == "SHUTDOWN" {
                assert!(
                    c.read_to_end().is_empty(),
                    "docs/PROTOCOL.md:{}: connection not closed after {cmd}",
                    ex.line
                );
            }
            commands += 1;
        }
    }
    assert!(commands >= 60, "only {commands} documented commands ran");
}

#[test]
fn wildcard_matching() {
    assert!(matches("KEYS <any> 1", "KEYS 4096 1"));
    assert!(matches("a", "a"));
    assert!(!matches("KEYS <any> 1", "KEYS 4096 10"));
    assert!(matches("<any>", ""));
}

#[test]
fn repetition_macro() {
    assert_eq!(expand("GET <k*3>"), "GET kkk");
    assert_eq!(expand("<a*2> <any> <b*1>"), "aa <any> b");
}
