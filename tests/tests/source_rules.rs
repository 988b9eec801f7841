//! Source-level rules of issue 10, checked by reading the source files (no build needed):
//!
//! - **No import cycle** among the supervisor's top-level modules (`crate::daemon`,
//!   `crate::lio`, …; a module's submodules count as the module) and none among the files of
//!   `worker/src/scsi/`. An *import* is any path naming another module: `use crate::x`,
//!   `super::x`, `self::x`, a bare `child::x` in a `mod.rs`, in `use` lines or inline in code.
//!   Code after a file's inline `#[cfg(test)] mod tests {` is ignored (unit tests may reach anywhere).
//! - **One writer of the kernel's LIO knobs**: no production source but `supervisor/src/lio.rs`
//!   names `block_dev`, `reset_ring`, `block_netlink` or `reset_netlink` as a file name (a
//!   string literal that is the name, or ends in `/name`); calling `lio::block_dev` is how the others use them.
//!
//! A failure names the cycle (`a -> b -> a`) or the offending file and line.

// Test code over the repository's own sources (trusted input): indexing and panics are fine.
#![allow(clippy::indexing_slicing, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Every `.rs` file under `dir`, recursively, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The module path of a source file relative to the crate's `src/` (`lib.rs`/`main.rs` → `[]`,
/// `a/mod.rs` and `a.rs` → `["a"]`, `a/b.rs` → `["a", "b"]`).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if !(stem == "mod" || (parts.is_empty() && (stem == "lib" || stem == "main"))) {
            parts.push(stem.to_owned());
        }
    }
    parts
}

/// The file's text without comments and without everything from the first inline
/// `#[cfg(test)] mod … {`.
fn production_code(text: &str) -> String {
    // The first `#[cfg(test)] mod name {` (an inline test module; `mod tests;` is kept).
    let cut = text
        .match_indices("#[cfg(test)]")
        .find(|(i, m)| {
            let rest = text[i + m.len()..].trim_start();
            rest.starts_with("mod ")
                && rest
                    .find(['{', ';'])
                    .is_some_and(|j| rest[j..].starts_with('{'))
        })
        .map_or(text, |(i, _)| &text[..i]);
    cut.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The `::`-separated identifiers starting at `s` (stops at anything else). A `{` group yields
/// the first identifier of each of its top-level elements as alternative continuations.
fn path_tails(s: &str) -> Vec<Vec<String>> {
    let mut head = Vec::new();
    let mut rest = s;
    loop {
        let n = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        if n == 0 {
            break;
        }
        head.push(rest[..n].to_owned());
        rest = &rest[n..];
        if let Some(r) = rest.strip_prefix("::") {
            rest = r;
        } else {
            return vec![head];
        }
    }
    if let Some(group) = rest.strip_prefix('{') {
        let mut out = Vec::new();
        // The group's top-level elements (split at top-level commas).
        let mut depth = 0usize;
        let mut elem = String::new();
        let mut elems = Vec::new();
        for c in group.chars() {
            match c {
                '{' => {
                    depth += 1;
                    elem.push(c);
                }
                '}' if depth == 0 => break,
                '}' => {
                    depth -= 1;
                    elem.push(c);
                }
                ',' if depth == 0 => elems.push(std::mem::take(&mut elem)),
                _ => elem.push(c),
            }
        }
        elems.push(elem);
        for e in elems {
            let e = e.trim();
            let n = e.find(|c: char| !is_ident(c)).unwrap_or(e.len());
            if n > 0 {
                let mut p = head.clone();
                p.push(e[..n].to_owned());
                out.push(p);
            }
        }
        if !out.is_empty() {
            return out;
        }
    }
    vec![head]
}

/// Module `from`'s references to other modules of the crate, as the longest known module each
/// path names.
fn references(
    from: &[String],
    is_dir_module: bool,
    code: &str,
    known: &BTreeSet<Vec<String>>,
) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < code.len() {
        let boundary = i == 0 || !is_ident(bytes[i - 1] as char) && bytes[i - 1] != b':';
        if !boundary || !(bytes[i] as char).is_ascii_alphabetic() && bytes[i] != b'_' {
            i += 1;
            continue;
        }
        let n = code[i..]
            .find(|c: char| !is_ident(c))
            .unwrap_or(code.len() - i);
        let word = &code[i..i + n];
        let after = &code[i + n..];
        let Some(tail) = after.strip_prefix("::") else {
            i += n.max(1);
            continue;
        };
        let base: Option<Vec<String>> = match word {
            "crate" => Some(Vec::new()),
            "self" => Some(from.to_vec()),
            "super" => Some(from[..from.len().saturating_sub(1)].to_vec()),
            // A bare path into a child module (2018 paths), e.g. `unit::Emulator` in `mod.rs`.
            w if is_dir_module || from.is_empty() => {
                let mut child = from.to_vec();
                child.push(w.to_owned());
                known.contains(&child).then(|| from.to_vec())
            }
            _ => None,
        };
        if let Some(base) = base {
            let tails = if matches!(word, "crate" | "self" | "super") {
                path_tails(tail)
            } else {
                // The bare child name itself is the first segment.
                let mut t = path_tails(tail);
                for p in &mut t {
                    p.insert(0, word.to_owned());
                }
                if t.is_empty() {
                    t.push(vec![word.to_owned()]);
                }
                t
            };
            for tail in tails {
                let mut target = base.clone();
                let mut best = base.clone();
                for seg in tail {
                    if seg == "super" {
                        target.pop();
                    } else {
                        target.push(seg);
                    }
                    if known.contains(&target) {
                        best = target.clone();
                    }
                }
                out.insert(best);
            }
        }
        i += n.max(1);
    }
    out
}

/// The module graph of the crate rooted at `src`: every module (file) to the modules it names.
fn module_graph(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let files = rust_files(src);
    let known: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(src, f)).collect();
    let mut graph = BTreeMap::new();
    for f in &files {
        let from = module_of(src, f);
        let text = fs::read_to_string(f).unwrap_or_default();
        let is_dir = f.file_name().is_some_and(|n| n == "mod.rs");
        let refs = references(&from, is_dir, &production_code(&text), &known);
        graph.insert(from, refs);
    }
    graph
}

/// A cycle of `graph`, if any, as the list of its nodes (first node repeated at the end).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(n.to_owned(), Mark::Open);
        stack.push(n.to_owned());
        for m in graph.get(n).into_iter().flatten() {
            match marks.get(m).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let start = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(m, graph, marks, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(n.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in graph.keys() {
        if marks.get(n).copied().unwrap_or(Mark::New) == Mark::New {
            let mut stack = Vec::new();
            if let Some(c) = visit(n, graph, &mut marks, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

/// Collapses a module graph onto named nodes; `node` maps a module to its node (or `None` to
/// leave it out). Self-edges are dropped.
fn collapse(
    graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
    node: impl Fn(&[String]) -> Option<String>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in graph {
        let Some(a) = node(from) else { continue };
        let entry = out.entry(a.clone()).or_default();
        for to in tos {
            if let Some(b) = node(to)
                && b != a
            {
                entry.insert(b);
            }
        }
    }
    out
}

#[test]
fn supervisor_top_level_modules_have_no_import_cycle() {
    let src = workspace().join("supervisor/src");
    let graph = module_graph(&src);
    assert!(
        graph.len() > 10,
        "expected the supervisor's modules under {}",
        src.display()
    );
    let top = collapse(&graph, |m| m.first().cloned());
    assert!(
        top.get("daemon").is_some_and(|d| d.contains("lio")),
        "the scan must see daemon -> lio (it found {top:?})"
    );
    if let Some(cycle) = find_cycle(&top) {
        panic!(
            "import cycle among the supervisor's modules: {}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn scsi_files_have_no_import_cycle() {
    let src = workspace().join("worker/src");
    let graph = module_graph(&src);
    let scsi = collapse(&graph, |m| {
        (m.first().map(String::as_str) == Some("scsi") && m.get(1).is_none_or(|s| s != "tests"))
            .then(|| {
                if m.len() == 1 {
                    "scsi/mod.rs".to_owned()
                } else {
                    format!("scsi/{}.rs", m[1..].join("/"))
                }
            })
    });
    assert!(
        scsi.get("scsi/block.rs")
            .is_some_and(|d| d.contains("scsi/unit.rs"))
            && scsi
                .get("scsi/mod.rs")
                .is_some_and(|d| d.contains("scsi/unit.rs")),
        "the scan must see block.rs -> unit.rs and mod.rs -> unit.rs (it found {scsi:?})"
    );
    if let Some(cycle) = find_cycle(&scsi) {
        panic!(
            "import cycle among worker/src/scsi/'s files: {}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_cycle_finder_names_a_cycle() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    g.entry("c".into()).or_default().remove("a");
    assert_eq!(find_cycle(&g), None);
}

#[test]
fn only_lio_rs_names_the_lio_knobs() {
    const KNOBS: [&str; 4] = ["block_dev", "reset_ring", "block_netlink", "reset_netlink"];
    // The fake sysfs tree of `discovery::fake` (test support) creates the empty action files
    // the kernel would provide; it never writes a value to them.
    const FIXTURES: [&str; 1] = ["supervisor/src/discovery.rs"];
    let root = workspace();
    let mut offenders = Vec::new();
    let mut scanned = 0;
    for dir in [
        "supervisor/src",
        "worker/src",
        "worker/sdk/src",
        "proto/src",
        "policy/src",
    ] {
        for f in rust_files(&root.join(dir)) {
            let rel = f
                .strip_prefix(&root)
                .unwrap_or(&f)
                .to_string_lossy()
                .into_owned();
            scanned += 1;
            if rel == "supervisor/src/lio.rs" || FIXTURES.contains(&rel.as_str()) {
                continue;
            }
            let text = fs::read_to_string(&f).unwrap_or_default();
            for (n, line) in production_code(&text).lines().enumerate() {
                for k in KNOBS {
                    let hit = line.match_indices(k).any(|(i, _)| {
                        let before = line[..i].chars().next_back();
                        let after = line[i + k.len()..].chars().next();
                        // The whole literal, or its last path component: a file name.
                        matches!(before, Some('"' | '/')) && after == Some('"')
                    });
                    if hit {
                        offenders.push(format!("{rel}:{}: {}", n + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(scanned > 20, "scanned only {scanned} files");
    assert!(
        offenders.is_empty(),
        "only supervisor/src/lio.rs may write the LIO knobs; found:\n{}",
        offenders.join("\n")
    );
}
