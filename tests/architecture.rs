//! The shape of `src/`, checked on every test run (in the spirit of rust-analyzer's tidy
//! tests): the folders depend on each other in one direction only, no two files import
//! each other in a circle, `unsafe` lives in `store/entry.rs` alone, every folder says
//! what it is, and nothing re-exports a path past these rules. ARCHITECTURE.md describes
//! the same rules for readers.
//!
//! The source is lexed (comments and literals dropped), then every path that starts with
//! `crate`, `super` or `self` — in `use` trees, braces and all, and inline in code — is
//! resolved against the module it appears in (inline `mod` blocks included) to the
//! module it names. The rules are data ([`LAYERS`]), so the checker itself is tested on
//! deliberate violations at the end of this file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What each part of `src/` may import, by the module path's first segment (or its
/// first two, `"node::inbox"`). A file may have a rule of its own (`"node/inbox"`), which
/// replaces its folder's. A part not named here is an error until it is given its place.
const LAYERS: &[(&str, &[&str])] = &[
    // Shared by every part: they import no folder.
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
    // The messages a shard thread accepts: what replication and anti-entropy may reach
    // of the node, so it names only what those messages carry.
    (
        "node/inbox",
        &[
            "store",
            "antientropy::messages",
            "antientropy::serve",
            "node::ops",
            "wire",
            "limits",
        ],
    ),
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

/// Items of the crate root other parts may name (`crate::VERSION`).
const ROOT_ITEMS: &[&str] = &["VERSION"];

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

/// The rule a file follows: its own (`node/inbox`), else its part's (its folder, or its
/// own name at the top); `None` for lib.rs and main.rs, which sit above every part.
fn rule_of(rel: &str) -> Option<String> {
    let module = module_of(rel).join("/");
    if LAYERS.iter().any(|(name, _)| *name == module) {
        return Some(module);
    }
    module_of(rel).first().cloned()
}

// ---------------------------------------------------------------------------------------
// Lexing: enough of Rust's to tell code from comments and literals.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    Path,
    Punct(char),
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The tokens of `text`, comments and string, byte and char literals dropped, raw
/// identifiers (`r#node`) read as plain ones.
fn lex(text: &str) -> Vec<Tok> {
    let s: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        let next = s.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < s.len() {
                if s[i] == '/' && s.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && s.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if let Some(end) = raw_string_end(&s, i) {
            i = end;
        } else if c == '"' || (c == 'b' && next == Some('"')) {
            i += if c == 'b' { 2 } else { 1 };
            while i < s.len() && s[i] != '"' {
                i += if s[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '\'' || (c == 'b' && next == Some('\'')) {
            let start = if c == 'b' { i + 1 } else { i };
            // A char literal ('x', '\n', '\u{1F600}'), or a lifetime ('a), kept as punct.
            if s.get(start + 1) == Some(&'\\') {
                i = start + 2;
                while i < s.len() && s[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if s.get(start + 2) == Some(&'\'') {
                i = start + 3;
            } else {
                out.push(Tok::Punct('\''));
                i = start + 1;
            }
        } else if c == 'r' && next == Some('#') && s.get(i + 2).is_some_and(|&c| is_ident_char(c)) {
            i += 2; // r#ident: the identifier follows
        } else if is_ident_char(c) {
            let start = i;
            while i < s.len() && is_ident_char(s[i]) {
                i += 1;
            }
            out.push(Tok::Ident(s[start..i].iter().collect()));
        } else if c == ':' && next == Some(':') {
            out.push(Tok::Path);
            i += 2;
        } else {
            if !c.is_whitespace() {
                out.push(Tok::Punct(c));
            }
            i += 1;
        }
    }
    out
}

/// Where a raw (byte) string starting at `i` ends, if one starts there: `r"…"`,
/// `r#"…"#`, `br##"…"##`.
fn raw_string_end(s: &[char], i: usize) -> Option<usize> {
    if i > 0 && is_ident_char(s[i - 1]) {
        return None;
    }
    let mut j = i;
    if s.get(j) == Some(&'b') {
        j += 1;
    }
    if s.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = s[j..].iter().take_while(|&&c| c == '#').count();
    j += hashes;
    if s.get(j) != Some(&'"') {
        return None;
    }
    j += 1;
    while j < s.len() {
        if s[j] == '"'
            && s[j + 1..]
                .iter()
                .take(hashes)
                .filter(|&&c| c == '#')
                .count()
                == hashes
        {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    Some(s.len())
}

// ---------------------------------------------------------------------------------------
// Paths.

/// What a file's code names, resolved from the crate root.
#[derive(Debug, Default)]
struct Names {
    /// Every module path named (`[node, server, Shared]`).
    paths: Vec<Vec<String>>,
    /// Problems no direction rule can see: an alias or a glob of the crate root, a
    /// re-export.
    problems: Vec<String>,
}

fn ident(t: Option<&Tok>) -> Option<&str> {
    match t {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

/// Every path in `text` (the file `rel`), resolved.
fn names(rel: &str, text: &str) -> Names {
    let toks = lex(text);
    let file_module = module_of(rel);
    let mut out = Names::default();
    // Inline modules (`mod tests { … }`) by the brace depth they close at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let mut module = file_module.clone();
        module.extend(inline.iter().map(|(name, _)| name.clone()));
        match &toks[i] {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Tok::Ident(k) if k == "mod" => {
                if let (Some(name), Some(Tok::Punct('{'))) =
                    (ident(toks.get(i + 1)), toks.get(i + 2))
                {
                    inline.push((name.to_string(), depth));
                }
            }
            Tok::Ident(k) if k == "use" => {
                let reexport = i > 0 && pub_before(&toks, i);
                if reexport {
                    out.problems.push(format!(
                        "src/{rel}: `pub use` re-exports a path past the layer rules"
                    ));
                }
                let (paths, used) = use_tree(&toks[i + 1..], &module, true);
                for (path, how) in paths {
                    match how {
                        Leaf::Alias | Leaf::Glob if path.is_empty() => out.problems.push(format!(
                            "src/{rel}: {} of the crate root hides the paths behind it",
                            if how == Leaf::Alias {
                                "an alias"
                            } else {
                                "a glob import"
                            }
                        )),
                        _ => {}
                    }
                    out.paths.push(path);
                }
                i += 1 + used;
                continue;
            }
            Tok::Ident(k) if matches!(k.as_str(), "crate" | "super" | "self") => {
                let starts_path = toks.get(i + 1) == Some(&Tok::Path)
                    && !(i > 0 && toks[i - 1] == Tok::Path)
                    && !(i > 0 && toks[i - 1] == Tok::Punct('$'));
                if starts_path {
                    let (paths, used) = use_tree(&toks[i..], &module, false);
                    out.paths.extend(paths.into_iter().map(|(p, _)| p));
                    i += used;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Whether the `use` at `i` is preceded by `pub` or `pub(…)`.
fn pub_before(toks: &[Tok], i: usize) -> bool {
    if ident(toks.get(i - 1)) == Some("pub") {
        return true;
    }
    if toks[i - 1] == Tok::Punct(')') {
        let open = toks[..i - 1].iter().rposition(|t| *t == Tok::Punct('('));
        return open.is_some_and(|o| o > 0 && ident(toks.get(o - 1)) == Some("pub"));
    }
    false
}

/// How a use-tree path ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaf {
    Name,
    Alias,
    Glob,
}

/// Read a path or use tree from `toks` relative to `module`; returns each full path
/// (from the crate root) with how it ends, and the tokens read. In a `use` tree a bare
/// first name is an external crate or a local item: only `crate`/`super`/`self` paths
/// (and braces under them) are followed.
fn use_tree(toks: &[Tok], module: &[String], in_use: bool) -> (Vec<(Vec<String>, Leaf)>, usize) {
    let mut out = Vec::new();
    let used = tree(toks, module, None, in_use, &mut out);
    (out, used)
}

/// `at`: the path so far, or `None` when nothing has anchored it to the crate yet.
fn tree(
    toks: &[Tok],
    module: &[String],
    at: Option<Vec<String>>,
    in_use: bool,
    out: &mut Vec<(Vec<String>, Leaf)>,
) -> usize {
    let mut i = 0;
    let mut path = at;
    loop {
        match toks.get(i) {
            Some(Tok::Punct('{')) => {
                i += 1;
                loop {
                    match toks.get(i) {
                        Some(Tok::Punct('}')) | None => return i + 1,
                        Some(Tok::Punct(',')) => i += 1,
                        _ => i += tree(&toks[i..], module, path.clone(), in_use, out).max(1),
                    }
                }
            }
            Some(Tok::Punct('*')) => {
                if let Some(p) = path {
                    out.push((p, Leaf::Glob));
                }
                return i + 1;
            }
            Some(Tok::Ident(name)) => {
                path = match (path, name.as_str()) {
                    (None, "crate") => Some(Vec::new()),
                    (None, "self") => Some(module.to_vec()),
                    (None, "super") => Some(module[..module.len().saturating_sub(1)].to_vec()),
                    (Some(mut p), "super") => {
                        p.pop();
                        Some(p)
                    }
                    (Some(p), "self") => Some(p),
                    (Some(mut p), _) => {
                        p.push(name.clone());
                        Some(p)
                    }
                    (None, _) => None, // std::…, an external crate, a local name
                };
                i += 1;
                let more = matches!(
                    toks.get(i + 1),
                    Some(Tok::Ident(_) | Tok::Punct('{') | Tok::Punct('*'))
                );
                if toks.get(i) == Some(&Tok::Path) && more {
                    i += 1;
                    continue;
                }
                if in_use && ident(toks.get(i)) == Some("as") {
                    if let Some(p) = path {
                        out.push((p, Leaf::Alias));
                    }
                    return i + 2;
                }
                if let Some(p) = path {
                    out.push((p, Leaf::Name));
                }
                return i;
            }
            _ => return i,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The rules.

/// Whether a file under `rule` may name `path` (from the crate root).
fn allowed(rule: &str, path: &[String], known: &BTreeSet<String>) -> Result<(), String> {
    let Some(first) = path.first() else {
        return Ok(()); // the crate root itself: aliases and globs are checked apart
    };
    if !known.contains(first) && !ROOT_ITEMS.contains(&first.as_str()) {
        return Err(format!(
            "names crate::{first}, which is no part of the crate"
        ));
    }
    if rule == first
        || rule.replace('/', "::") == path.iter().take(2).cloned().collect::<Vec<_>>().join("::")
    {
        return Ok(()); // within its own part (or, for a file with its own rule, itself)
    }
    let rules = LAYERS
        .iter()
        .find(|(name, _)| *name == rule)
        .map_or(&[][..], |(_, r)| *r);
    let two = path.iter().take(2).cloned().collect::<Vec<_>>().join("::");
    if rules.iter().any(|r| r == first || *r == two) {
        Ok(())
    } else {
        Err(format!(
            "`{rule}` may not import crate::{}",
            path.join("::")
        ))
    }
}

/// Every import in `sources` against the direction, every part without a place in
/// [`LAYERS`], every alias, glob or re-export that would hide a path.
fn direction_violations(sources: &[Source]) -> Vec<String> {
    let mut known: BTreeSet<String> = sources
        .iter()
        .filter_map(|s| module_of(&s.rel).first().cloned())
        .collect();
    known.extend(
        LAYERS
            .iter()
            .map(|(name, _)| name.split('/').next().unwrap_or(name).to_string()),
    );
    let mut found = Vec::new();
    for s in sources {
        let Some(rule) = rule_of(&s.rel) else {
            found.extend(names(&s.rel, &s.text).problems);
            continue; // lib.rs and main.rs sit on top
        };
        if !LAYERS.iter().any(|(name, _)| *name == rule) {
            found.push(format!(
                "src/{}: `{rule}` has no place in LAYERS (tests/architecture.rs)",
                s.rel
            ));
        }
        let n = names(&s.rel, &s.text);
        found.extend(n.problems);
        for path in n.paths {
            if let Err(why) = allowed(&rule, &path, &known) {
                found.push(format!("src/{}: {why}", s.rel));
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

/// Circles of file imports, each as `a.rs → b.rs → a.rs`. A folder's mod.rs only
/// declares its files ([`module_files_only_declare`] holds it to that), so it is no hub.
fn file_cycles(sources: &[Source]) -> Vec<String> {
    let files: BTreeSet<String> = sources.iter().map(|s| s.rel.clone()).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in sources {
        let to = edges.entry(s.rel.clone()).or_default();
        for path in names(&s.rel, &s.text).paths {
            if let Some(f) = file_of(&path, &files) {
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

/// The lint attributes (`#[allow(…)]`, `#![deny(…)]`) of `toks` that name `unsafe_code`,
/// by their level.
fn unsafe_code_levels(toks: &[Tok]) -> Vec<String> {
    let mut levels = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        if ident(Some(t)) != Some("unsafe_code") {
            continue;
        }
        // Walk back to the attribute's `[`: the ident after it is the level.
        let open = toks[..i].iter().rposition(|t| *t == Tok::Punct('['));
        let level = open.and_then(|o| ident(toks.get(o + 1))).unwrap_or("?");
        levels.push(level.to_string());
    }
    levels
}

/// `unsafe` outside [`UNSAFE_FILE`], a lint level other than deny for `unsafe_code`, or
/// a crate root without the deny.
fn unsafe_violations(sources: &[Source]) -> Vec<String> {
    let mut found = Vec::new();
    for s in sources {
        let toks = lex(&s.text);
        let uses = toks.iter().any(|t| ident(Some(t)) == Some("unsafe"));
        let loosened = unsafe_code_levels(&toks)
            .iter()
            .any(|l| l != "deny" && l != "forbid");
        if (uses || loosened) && s.rel != UNSAFE_FILE {
            found.push(format!("src/{}: unsafe code outside {UNSAFE_FILE}", s.rel));
        }
    }
    for root in ["lib.rs", "main.rs"] {
        let levels = sources
            .iter()
            .find(|s| s.rel == root)
            .map(|s| unsafe_code_levels(&lex(&s.text)));
        if !levels.is_some_and(|l| l.iter().any(|l| l == "deny" || l == "forbid")) {
            found.push(format!("src/{root}: lacks #![deny(unsafe_code)]"));
        }
    }
    found
}

/// Folders (directories under src/) without a mod.rs that opens with a `//!` header, or
/// without a line in lib.rs's Layout.
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
    let folders: BTreeSet<&str> = sources
        .iter()
        .filter_map(|s| s.rel.split_once('/').map(|(folder, _)| folder))
        .collect();
    let mut found = Vec::new();
    for folder in folders {
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

/// A folder's mod.rs holds its `//!` header and `pub mod` lines, nothing else: no code,
/// and no re-export that would let a path skip the layer rules.
fn module_files_only_declare(sources: &[Source]) -> Vec<String> {
    let mut found = Vec::new();
    for s in sources.iter().filter(|s| s.rel.ends_with("/mod.rs")) {
        let toks = lex(&s.text);
        let mut i = 0;
        while i < toks.len() {
            let decl = [Some("pub"), Some("mod")] == [ident(toks.get(i)), ident(toks.get(i + 1))]
                && ident(toks.get(i + 2)).is_some()
                && toks.get(i + 3) == Some(&Tok::Punct(';'));
            if !decl {
                found.push(format!(
                    "src/{}: a folder's mod.rs only declares its files (`pub mod x;`)",
                    s.rel
                ));
                break;
            }
            i += 4;
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
    // Every target of the package (tests, benches, the binary) denies it too.
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
    let manifest = manifest.expect("Cargo.toml");
    assert!(
        manifest.contains("[lints.rust]\nunsafe_code = \"deny\""),
        "Cargo.toml lacks [lints.rust] unsafe_code = \"deny\""
    );
}

#[test]
fn every_folder_says_what_it_is_and_only_declares_its_files() {
    let src = read_src();
    let mut v = header_violations(&src);
    v.extend(module_files_only_declare(&src));
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

/// The violations of one file placed in a minimal tree (so every part is known).
fn check_one(rel: &str, text: &str) -> Vec<String> {
    let mut tree: Vec<Source> = [
        "store/shard.rs",
        "node/server.rs",
        "node/inbox.rs",
        "antientropy/messages.rs",
    ]
    .iter()
    .filter(|f| **f != rel)
    .map(|f| src(f, ""))
    .collect();
    tree.push(src(rel, text));
    direction_violations(&tree)
}

#[test]
fn the_checker_sees_every_form_of_a_wrong_import() {
    let cases = [
        ("replication/thread.rs", "use crate::node::server::Shared;"),
        ("replication/thread.rs", "use crate::node;"),
        (
            "replication/thread.rs",
            "use crate::{store::shard::Shard, node::dispatch::X};",
        ),
        (
            "replication/thread.rs",
            "use crate::{store::{shard, version}, node::{server}};",
        ),
        ("replication/thread.rs", "use crate :: node :: server;"),
        ("replication/thread.rs", "use crate::r#node::server;"),
        (
            "replication/thread.rs",
            "use crate::{/* x */ node::server};",
        ),
        (
            "replication/thread.rs",
            "let u = \"mqtt://x\"; crate::node::server::f();",
        ),
        (
            "replication/thread.rs",
            "let c = '\"'; crate::node::server::f();",
        ),
        (
            "antientropy/client.rs",
            "fn f(s: &crate::node::server::Shared) {}",
        ),
        ("antientropy/client.rs", "use super::super::node::server;"),
        ("antientropy/client.rs", "use super::{super::node::server};"),
        (
            "antientropy/client.rs",
            "use self::super::super::node::server;",
        ),
        (
            "antientropy/client.rs",
            "mod tests { use super::super::super::node::ops; }",
        ),
        (
            "antientropy/client.rs",
            "mod a { mod b { fn f() { super::super::super::super::node::x(); } } }",
        ),
        ("antientropy/client.rs", "use crate as root;"),
        ("antientropy/client.rs", "use super::super as up;"),
        ("antientropy/client.rs", "use crate::{self as c};"),
        ("antientropy/client.rs", "use crate::*;"),
        (
            "antientropy/client.rs",
            "pub use crate::store::shard::Shard;",
        ),
        (
            "antientropy/client.rs",
            "pub(crate) use crate::store::shard::Shard;",
        ),
        (
            "store/shard.rs",
            "let k = crate::protocol::native::KEY_BYTES_MAX;",
        ),
        ("store/shard.rs", "use crate::Shared;"),
        ("protocol/native.rs", "use crate::store::keyspace::BUCKETS;"),
        (
            "config.rs",
            "use crate::replication::changes::NODE_ID_BYTES_MAX;",
        ),
        ("wire.rs", "use crate::store;"),
        ("node/inbox.rs", "use crate::node::server::Shared;"),
        ("node/inbox.rs", "use crate::replication::thread::X;"),
        ("newpart/x.rs", "pub fn f() {}"),
    ];
    for (rel, text) in cases {
        let v = check_one(rel, text);
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
            "replication/thread.rs",
            "pub(crate) fn f() {} pub(super) struct S; pub(in crate::replication) fn g() {}",
        ),
        (
            "replication/thread.rs",
            "fn f<'a>(x: &'a str) -> &'a str { x } let c = 'x';",
        ),
        (
            "antientropy/client.rs",
            "use crate::antientropy::messages::Peer; use super::messages;",
        ),
        (
            "antientropy/client.rs",
            "let s = r#\"crate::node::server \"quoted\"\"#; let b = b\"crate::node\";",
        ),
        (
            "antientropy/client.rs",
            "// crate::node::server\n/* crate::node /* nested */ crate::node */",
        ),
        (
            "antientropy/client.rs",
            "use std::collections::HashMap; use tokio::sync::mpsc;",
        ),
        (
            "antientropy/client.rs",
            "macro_rules! m { () => { $crate::store::x() } }",
        ),
        (
            "node/server.rs",
            "use crate::replication::thread::Outbound;",
        ),
        (
            "node/inbox.rs",
            "use crate::antientropy::messages::Request; use crate::node::ops::ShardOp;",
        ),
        ("store/shard.rs", "use crate::limits;"),
        ("lib.rs", "pub mod node;"),
        ("main.rs", "use merkle_kv::node::server;"),
    ];
    for (rel, text) in fine {
        let v = check_one(rel, text);
        assert!(v.is_empty(), "{rel}: {text:?} gave {v:?}");
    }
}

#[test]
fn the_checker_sees_circles_unsafe_headers_and_code_in_mod_files() {
    let circle = [
        src("node/server.rs", "use crate::node::connection::x;"),
        src("node/connection.rs", "use crate::node::dispatch::y;"),
        src("node/dispatch.rs", "fn f() { crate::node::server::z() }"),
    ];
    assert_eq!(
        file_cycles(&circle),
        ["node/connection.rs → node/dispatch.rs → node/server.rs → node/connection.rs"]
    );
    let via_super = [
        src("node/a.rs", "use super::b::x;"),
        src("node/b.rs", "mod tests { use super::super::a; }"),
    ];
    assert_eq!(
        file_cycles(&via_super),
        ["node/a.rs → node/b.rs → node/a.rs"]
    );
    let line = [
        src("node/a.rs", "use crate::node::b::x;"),
        src("node/b.rs", "use crate::store::c::y;"),
        src("store/c.rs", ""),
    ];
    assert!(file_cycles(&line).is_empty());

    let roots = |lib: &str| [src("lib.rs", lib), src("main.rs", "#![deny(unsafe_code)]")];
    let deny = "#![deny(unsafe_code)]";
    for code in [
        "unsafe { *p }",
        "unsafe impl Send for X {}",
        "#![allow(unsafe_code)]",
        "#![allow(clippy::all, unsafe_code)]",
    ] {
        let mut tree = Vec::from(roots(deny));
        tree.push(src("store/shard.rs", code));
        let v = unsafe_violations(&tree);
        assert_eq!(v.len(), 1, "{code:?} gave {v:?}");
    }
    let mut fine = Vec::from(roots(deny));
    fine.push(src(
        "store/entry.rs",
        "#![allow(unsafe_code)]\nunsafe impl Send for Entry {}",
    ));
    fine.push(src(
        "store/shard.rs",
        "// unsafe in a comment\nlet unsafe_ish = \"unsafe\";",
    ));
    assert!(unsafe_violations(&fine).is_empty());
    assert_eq!(
        unsafe_violations(&roots("// #![deny(unsafe_code)]")).len(),
        1
    );

    let folders = ["store", "node"];
    let mut tree: Vec<Source> = folders
        .iter()
        .map(|f| src(&format!("{f}/mod.rs"), "//! What it is.\npub mod x;"))
        .collect();
    let layout: String = folders
        .iter()
        .map(|f| format!("//! - [`{f}`]: …\n"))
        .collect();
    tree.push(src("lib.rs", &format!("//! # Layout\n{layout}")));
    assert!(header_violations(&tree).is_empty() && module_files_only_declare(&tree).is_empty());
    tree.push(src("newfolder/x.rs", ""));
    assert_eq!(
        header_violations(&tree).len(),
        2,
        "a folder without mod.rs or a Layout line"
    );
    tree[1] = src("node/mod.rs", "pub mod x;\npub use x::Shared;");
    assert_eq!(header_violations(&tree).len(), 3);
    assert_eq!(module_files_only_declare(&tree).len(), 1);
}
