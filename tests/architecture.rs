//! The shape of `src/`, checked on every test run (in the spirit of rust-analyzer's tidy
//! tests): the folders depend on each other in one direction only, no two files import
//! each other in a circle, `unsafe` lives in `store/entry.rs` alone, and every folder
//! says what it is. ARCHITECTURE.md describes the same rules for readers.
//!
//! Imports are read from the source text: every `crate::` path (in `use` lines, inline
//! paths and doc links alike, braces expanded) and every `super::` chain, resolved to the
//! module it names. The rules are data ([`LAYERS`]), so the checker itself is tested on
//! deliberate violations below.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What each part of `src/` may import, by the first segment after `crate::`
/// (`"node::inbox"` admits that one module of a folder). A part not named here (a new
/// top-level file or folder) is an error until it is given its place.
const LAYERS: &[(&str, &[&str])] = &[
    // Shared by everyone: they import no folder.
    ("limits", &[]),
    ("wire", &["limits"]),
    ("config", &["limits"]),
    ("logging", &["config"]),
    // The pure cores.
    ("store", &["limits", "wire"]),
    ("protocol", &["limits", "wire"]),
    // The two ways replicas meet: the store, and shards only through their inboxes.
    (
        "replication",
        &[
            "store",
            "node::inbox",
            "config",
            "logging",
            "limits",
            "wire",
            "VERSION",
        ],
    ),
    (
        "antientropy",
        &[
            "store",
            "node::inbox",
            "config",
            "logging",
            "limits",
            "wire",
            "VERSION",
        ],
    ),
    // Disk: what the store emits, framed and checked.
    ("persist", &["store", "config", "logging", "limits", "wire"]),
    // The top: everything.
    (
        "node",
        &[
            "store",
            "protocol",
            "replication",
            "antientropy",
            "persist",
            "config",
            "logging",
            "limits",
            "wire",
            "VERSION",
        ],
    ),
];

/// The folders, which must each open with a `//!` header and a line in lib.rs's Layout.
const FOLDERS: &[&str] = &[
    "store",
    "protocol",
    "node",
    "replication",
    "antientropy",
    "persist",
];

/// The one file allowed to hold `unsafe` code.
const UNSAFE_FILE: &str = "store/entry.rs";

/// A source file: its path under `src/` (`replication/thread.rs`) and its text.
struct Source {
    rel: String,
    text: String,
}

fn read_src() -> Vec<Source> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<Source>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let rel = path.strip_prefix(root).expect("under src");
                out.push(Source {
                    rel: rel.to_string_lossy().replace('\\', "/"),
                    text: std::fs::read_to_string(&path).expect("source is UTF-8"),
                });
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    assert!(out.len() > 10, "found only {} files under src/", out.len());
    out
}

/// The module path of a file: `replication/thread.rs` → `[replication, thread]`,
/// `store/mod.rs` → `[store]`, `lib.rs` and `main.rs` → `[]`.
fn module_of(rel: &str) -> Vec<String> {
    let stem = rel.strip_suffix(".rs").expect(".rs file");
    let mut parts: Vec<String> = stem.split('/').map(str::to_string).collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The part a file belongs to: its folder, or its own name at the top (`config`);
/// `None` for lib.rs and main.rs, which sit above every part.
fn part_of(rel: &str) -> Option<String> {
    module_of(rel).first().cloned()
}

/// Text with `//` comments removed (doc comments are kept: their links are paths too,
/// but a prose mention of `unsafe` in a comment is not code).
fn without_plain_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) if !line[at..].starts_with("///") && !line[at..].starts_with("//!") => {
                &line[..at]
            }
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn skip_ws(s: &str, at: usize) -> usize {
    at + (s[at..].len() - s[at..].trim_start().len())
}

/// Parse a use tree at the start of `s` (`a::b`, `a::{b, c::d}`, `*`), appending each
/// full path, under `prefix`, to `out`. Returns the bytes read.
fn use_tree(s: &str, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut at = skip_ws(s, 0);
    let mut path = prefix.to_vec();
    loop {
        if s[at..].starts_with('{') {
            at += 1;
            loop {
                at = skip_ws(s, at);
                if at >= s.len() || s[at..].starts_with('}') {
                    return (at + 1).min(s.len());
                }
                at += use_tree(&s[at..], &path, out);
                at = skip_ws(s, at);
                if s[at..].starts_with(',') {
                    at += 1;
                } else {
                    return (at + 1).min(s.len());
                }
            }
        }
        let ident: String = s[at..].chars().take_while(|&c| is_ident(c)).collect();
        if ident.is_empty() {
            out.push(path); // `a::*`, or a path cut short
            return at;
        }
        at += ident.len();
        path.push(ident);
        if s[at..].starts_with("::") {
            at += 2;
        } else {
            out.push(path);
            return at;
        }
    }
}

/// Every module path `text` (the file `rel`) names, absolute from the crate root.
/// A `super::` chain is resolved twice — at the file's level and one level deeper (a
/// `mod tests` inside it) — and both count, so no chain slips past the check.
fn imports(rel: &str, text: &str) -> Vec<Vec<String>> {
    let module = module_of(rel);
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    for (at, _) in text.match_indices("crate::") {
        if at > 0 && (is_ident(bytes[at - 1] as char) || bytes[at - 1] == b'$') {
            continue; // `merkle_kv_crate::`, `$crate::`
        }
        use_tree(&text[at + "crate::".len()..], &[], &mut out);
    }
    for (at, _) in text.match_indices("super::") {
        if at > 0 && (is_ident(bytes[at - 1] as char) || text[..at].ends_with("::")) {
            continue; // counted with the chain's first `super::`
        }
        let mut ups = 0;
        let mut rest = &text[at..];
        while let Some(r) = rest.strip_prefix("super::") {
            ups += 1;
            rest = r;
        }
        let start = text.len() - rest.len();
        for depth in [module.len(), module.len() + 1] {
            if ups <= depth {
                let mut base = module.clone();
                base.truncate(depth - ups);
                use_tree(&text[start..], &base, &mut out);
            }
        }
    }
    out
}

/// Whether part `from` may import `path` (absolute, from the crate root). A path whose
/// first segment names no part (a `super::` chain read at the wrong depth) names
/// nothing, and passes.
fn allowed(from: &str, path: &[String], known: &BTreeSet<&str>) -> bool {
    let first = path.first().map(String::as_str).unwrap_or("");
    if first == from || !known.contains(first) {
        return true;
    }
    let rules = LAYERS
        .iter()
        .find(|(name, _)| *name == from)
        .map_or(&[][..], |(_, r)| *r);
    let two = path.iter().take(2).cloned().collect::<Vec<_>>().join("::");
    rules.iter().any(|r| *r == first || *r == two)
}

/// Every import in `sources` against the direction, and every part without a place in
/// [`LAYERS`].
fn direction_violations(sources: &[Source]) -> Vec<String> {
    let parts: BTreeSet<String> = sources.iter().filter_map(|s| part_of(&s.rel)).collect();
    let mut known: BTreeSet<&str> = LAYERS.iter().map(|(name, _)| *name).collect();
    known.extend(parts.iter().map(String::as_str));
    known.insert("VERSION");
    let mut found = Vec::new();
    for part in &parts {
        if !LAYERS.iter().any(|(name, _)| name == part) {
            found.push(format!(
                "src/{part}: has no place in LAYERS (tests/architecture.rs)"
            ));
        }
    }
    for s in sources {
        let Some(part) = part_of(&s.rel) else {
            continue; // lib.rs and main.rs sit on top
        };
        for path in imports(&s.rel, &without_plain_comments(&s.text)) {
            if !allowed(&part, &path, &known) {
                found.push(format!(
                    "src/{}: `{part}` may not import crate::{}",
                    s.rel,
                    path.join("::")
                ));
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// The file a module path lives in, if any: the longest prefix that is a file.
fn file_of(path: &[String], files: &BTreeSet<String>) -> Option<String> {
    (1..=path.len()).rev().find_map(|n| {
        let stem = path[..n].join("/");
        [format!("{stem}.rs"), format!("{stem}/mod.rs")]
            .into_iter()
            .find(|f| files.contains(f))
    })
}

/// A circle of file imports, if there is one, as `a.rs → b.rs → a.rs`.
fn file_cycles(sources: &[Source]) -> Vec<String> {
    let files: BTreeSet<String> = sources.iter().map(|s| s.rel.clone()).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in sources {
        let to = edges.entry(s.rel.clone()).or_default();
        for path in imports(&s.rel, &without_plain_comments(&s.text)) {
            if let Some(f) = file_of(&path, &files) {
                // A folder's mod.rs only declares its files; it is not imported *from*.
                if f != s.rel && !f.ends_with("mod.rs") {
                    to.insert(f);
                }
            }
        }
    }
    // Depth-first search with colours: a grey node reached again closes a circle.
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
        found: &mut Vec<String>,
    ) {
        colour.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            match colour.get(m).copied().unwrap_or(0) {
                0 => visit(m, edges, colour, stack, found),
                1 => {
                    let from = stack.iter().position(|x| x == m).expect("on the stack");
                    let mut circle = stack[from..].to_vec();
                    circle.push(m.clone());
                    found.push(circle.join(" → "));
                }
                _ => {}
            }
        }
        stack.pop();
        colour.insert(n.to_string(), 2);
    }
    let mut colour = BTreeMap::new();
    let mut found = Vec::new();
    for n in edges.keys() {
        if colour.get(n).copied().unwrap_or(0) == 0 {
            visit(n, &edges, &mut colour, &mut Vec::new(), &mut found);
        }
    }
    found
}

/// `unsafe` outside [`UNSAFE_FILE`], or a missing crate-wide deny.
fn unsafe_violations(sources: &[Source]) -> Vec<String> {
    let mut found = Vec::new();
    for s in sources {
        let code = without_plain_comments(&s.text);
        let code: String = code
            .lines()
            .filter(|l| !l.trim_start().starts_with("///") && !l.trim_start().starts_with("//!"))
            .collect::<Vec<_>>()
            .join("\n");
        let uses_unsafe = code.match_indices("unsafe").any(|(at, _)| {
            let before = code[..at].chars().next_back().is_some_and(is_ident);
            let after = code[at + 6..].chars().next().is_some_and(is_ident);
            !before && !after
        });
        let allows = code.contains("allow(unsafe_code)");
        if (uses_unsafe || allows) && s.rel != UNSAFE_FILE {
            found.push(format!("src/{}: unsafe code outside {UNSAFE_FILE}", s.rel));
        }
    }
    match sources.iter().find(|s| s.rel == "lib.rs") {
        Some(lib) if lib.text.contains("#![deny(unsafe_code)]") => {}
        _ => found.push("src/lib.rs: lacks #![deny(unsafe_code)]".to_string()),
    }
    found
}

/// Folders without a `//!` header in their mod.rs, or without a line in lib.rs's Layout.
fn header_violations(sources: &[Source]) -> Vec<String> {
    let text = |rel: &str| {
        sources
            .iter()
            .find(|s| s.rel == rel)
            .map(|s| s.text.as_str())
    };
    let layout = text("lib.rs")
        .and_then(|t| t.split_once("# Layout"))
        .map(|(_, after)| after)
        .unwrap_or("");
    let mut found = Vec::new();
    for folder in FOLDERS {
        let rel = format!("{folder}/mod.rs");
        if !text(&rel).is_some_and(|t| t.trim_start().starts_with("//!")) {
            found.push(format!(
                "src/{rel}: a folder opens with a //! header saying what it is"
            ));
        }
        if !layout.contains(&format!("[`{folder}`]")) {
            found.push(format!(
                "src/lib.rs: the # Layout section lacks a line for `{folder}`"
            ));
        }
    }
    found
}

#[test]
fn folders_import_in_one_direction_only() {
    let v = direction_violations(&read_src());
    assert!(
        v.is_empty(),
        "imports against the direction:\n{}",
        v.join("\n")
    );
}

#[test]
fn no_two_files_import_each_other_in_a_circle() {
    let v = file_cycles(&read_src());
    assert!(
        v.is_empty(),
        "files importing in a circle:\n{}",
        v.join("\n")
    );
}

#[test]
fn unsafe_code_lives_in_the_entry_alone() {
    let v = unsafe_violations(&read_src());
    assert!(v.is_empty(), "{}", v.join("\n"));
}

#[test]
fn every_folder_says_what_it_is() {
    let v = header_violations(&read_src());
    assert!(v.is_empty(), "{}", v.join("\n"));
}

// The checker on deliberate violations: a rule that never fires would pass the tree
// above whatever it held.

fn src(rel: &str, text: &str) -> Source {
    Source {
        rel: rel.to_string(),
        text: text.to_string(),
    }
}

#[test]
fn the_checker_sees_every_form_of_a_wrong_import() {
    let cases = [
        ("replication/thread.rs", "use crate::node::server::Shared;"),
        ("replication/thread.rs", "use crate::node;"),
        (
            "replication/thread.rs",
            "use crate::{store::shard::Shard, node::dispatch::VERSION};",
        ),
        (
            "replication/thread.rs",
            "use crate::{store::{shard, version}, node::{server}};",
        ),
        (
            "antientropy/client.rs",
            "fn f(s: &crate::node::server::Shared) {}",
        ),
        ("antientropy/client.rs", "use super::super::node::server;"),
        (
            "antientropy/client.rs",
            "mod tests { use super::super::super::node::ops; }",
        ),
        (
            "store/shard.rs",
            "let k = crate::protocol::native::KEY_BYTES_MAX;",
        ),
        ("store/shard.rs", "/// See [`crate::replication::changes`]."),
        ("protocol/native.rs", "use crate::store::keyspace::BUCKETS;"),
        (
            "config.rs",
            "use crate::replication::changes::NODE_ID_BYTES_MAX;",
        ),
        ("wire.rs", "use crate::store;"),
        ("newpart/x.rs", "pub fn f() {}"),
    ];
    for (rel, text) in cases {
        let v = direction_violations(&[src(rel, text)]);
        assert_eq!(v.len(), 1, "{rel}: {text:?} gave {v:?}");
    }
    let fine = [
        (
            "replication/thread.rs",
            "use crate::node::inbox::{ThreadMsg, RemoteChanges};",
        ),
        (
            "replication/thread.rs",
            "use crate::{store::shard::Shard, config::Config, VERSION};",
        ),
        (
            "replication/thread.rs",
            "mod tests { use super::*; use super::super::changes; }",
        ),
        (
            "antientropy/client.rs",
            "use crate::antientropy::exchange::Peer; use super::exchange;",
        ),
        (
            "node/server.rs",
            "use crate::replication::thread::Outbound;",
        ),
        (
            "store/shard.rs",
            "// a comment may name crate::node::server\nuse crate::limits;",
        ),
        ("lib.rs", "pub mod node;"),
        ("main.rs", "use merkle_kv::node::server;"),
    ];
    for (rel, text) in fine {
        let v = direction_violations(&[src(rel, text)]);
        assert!(v.is_empty(), "{rel}: {text:?} gave {v:?}");
    }
}

#[test]
fn the_checker_sees_circles_unsafe_and_missing_headers() {
    let circle = [
        src("node/server.rs", "use crate::node::connection::x;"),
        src("node/connection.rs", "use crate::node::dispatch::y;"),
        src("node/dispatch.rs", "fn f() { crate::node::server::z() }"),
    ];
    assert_eq!(
        file_cycles(&circle),
        ["node/connection.rs → node/dispatch.rs → node/server.rs → node/connection.rs"]
    );
    let line = [
        src("node/a.rs", "use crate::node::b::x;"),
        src("node/b.rs", "use crate::store::c::y;"),
        src("store/c.rs", ""),
    ];
    assert!(file_cycles(&line).is_empty());

    let lib = src("lib.rs", "#![deny(unsafe_code)]");
    let unsafe_cases = [
        "unsafe { *p }",
        "unsafe impl Send for X {}",
        "#![allow(unsafe_code)]",
    ];
    for code in unsafe_cases {
        let v = unsafe_violations(&[src("store/shard.rs", code), src("lib.rs", &lib.text)]);
        assert_eq!(v.len(), 1, "{code:?} gave {v:?}");
    }
    let v = unsafe_violations(&[
        src(
            "store/entry.rs",
            "#![allow(unsafe_code)]\nunsafe impl Send for Entry {}",
        ),
        src(
            "store/shard.rs",
            "// unsafe in a comment\nlet unsafe_ish = 1;",
        ),
        src("lib.rs", &lib.text),
    ]);
    assert!(v.is_empty(), "{v:?}");
    assert_eq!(unsafe_violations(&[src("lib.rs", "")]).len(), 1);

    let mut tree: Vec<Source> = FOLDERS
        .iter()
        .map(|f| src(&format!("{f}/mod.rs"), "//! What it is.\npub mod x;"))
        .collect();
    let layout: String = FOLDERS
        .iter()
        .map(|f| format!("//! - [`{f}`]: …\n"))
        .collect();
    tree.push(src("lib.rs", &format!("//! # Layout\n{layout}")));
    assert!(header_violations(&tree).is_empty());
    tree[1] = src("protocol/mod.rs", "pub mod native;");
    tree.last_mut().expect("lib.rs").text = "//! # Layout\n".to_string();
    let v = header_violations(&tree);
    assert_eq!(v.len(), 1 + FOLDERS.len(), "{v:?}");
}
