//! Layers import downward only, and so do files: no file under src/ may reach itself through
//! `use` paths (`crate::`, `super::`, `self::`, or a child module's name). A mod.rs that both
//! defines what its children import and re-exports them makes such a cycle; the shared items
//! belong in a leaf file. Paths written inline (`crate::a::b::f()`) count like `use`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every .rs file under `dir`, keyed by its module path (`["qcow2", "engine", "io"]`).
fn modules(root: &Path, dir: &Path, out: &mut BTreeMap<Vec<String>, PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            modules(root, &p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let rel = p.strip_prefix(root).unwrap().with_extension("");
            let mut segs: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                segs.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                segs.pop();
            }
            out.insert(segs, p);
        }
    }
}

/// The source without `#[cfg(test)] mod tests { ... }` (tests may import anything) and without
/// line comments (prose says "use" too).
fn code_of(src: &str) -> String {
    let src = match src.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &src[..i],
        None => src,
    };
    src.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The file a path names, from module `cur`: the longest prefix that is a file.
fn resolve(
    mods: &BTreeMap<Vec<String>, PathBuf>,
    cur: &[String],
    path: &[&str],
) -> Option<PathBuf> {
    let (mut base, rest): (Vec<String>, &[&str]) = match path.first()? {
        &"crate" => (Vec::new(), &path[1..]),
        &"self" => (cur.to_vec(), &path[1..]),
        &"super" => {
            let mut b = cur.to_vec();
            let mut r = path;
            while r.first() == Some(&"super") {
                b.pop();
                r = &r[1..];
            }
            (b, r)
        }
        first => {
            let mut child = cur.to_vec();
            child.push(first.to_string());
            if !mods.contains_key(&child) {
                return None;
            }
            (cur.to_vec(), path)
        }
    };
    let whole = base.len() + rest.len();
    base.extend(rest.iter().map(|s| s.to_string()));
    for n in (0..=whole).rev() {
        if let Some(p) = mods.get(&base[..n]) {
            return Some(p.clone());
        }
    }
    None
}

/// Every path a file mentions: `use` trees (braces expanded) and inline `a::b::c` paths.
fn paths(src: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("use ") {
        let before = rest[..i].chars().last();
        rest = &rest[i + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = rest.find(';') else { break };
        expand("", &rest[..end], &mut out);
    }
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if (b[i].is_ascii_alphabetic() || b[i] == b'_')
            && (i == 0
                || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b':'))
        {
            let mut j = i;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b':') {
                j += 1;
            }
            let p = &src[i..j];
            // `a::{...}` is a use tree, expanded above.
            if p.contains("::") && !p.ends_with("::") {
                out.push(
                    p.split("::")
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect(),
                );
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// Expand one `use` tree (`a::{b, c::{d}}`) under `prefix`.
fn expand(prefix: &str, tree: &str, out: &mut Vec<Vec<String>>) {
    // `a::b as c` names `a::b`.
    let tree: String = tree
        .split(',')
        .map(|t| t.split(" as ").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(",")
        .split_whitespace()
        .collect();
    match tree.find('{') {
        None => {
            let full = format!("{prefix}{tree}");
            out.push(
                full.split("::")
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            );
        }
        Some(open) => {
            let head = format!("{prefix}{}", &tree[..open]);
            let close = tree.rfind('}').filter(|&c| c > open).unwrap_or(tree.len());
            let inner = &tree[open + 1..close];
            let (mut depth, mut start) = (0, 0);
            for (k, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(&head, &inner[start..k], out);
                        start = k + 1;
                    }
                    _ => {}
                }
            }
            expand(&head, &inner[start..], out);
        }
    }
}

/// The import graph of src/: file -> files it imports from.
fn graph(root: &Path) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut mods = BTreeMap::new();
    modules(root, root, &mut mods);
    let mut g = BTreeMap::new();
    for (cur, file) in &mods {
        let src = std::fs::read_to_string(file).unwrap();
        let mut deps = BTreeSet::new();
        for p in paths(&code_of(&src)) {
            let p: Vec<&str> = p.iter().map(String::as_str).collect();
            if let Some(t) = resolve(&mods, cur, &p) {
                if &t != file {
                    deps.insert(t);
                }
            }
        }
        g.insert(file.clone(), deps);
    }
    g
}

/// A cycle through `start`, if any (depth-first search).
fn cycle_from(g: &BTreeMap<PathBuf, BTreeSet<PathBuf>>, start: &PathBuf) -> Option<Vec<PathBuf>> {
    let mut stack = vec![(start.clone(), vec![start.clone()])];
    let mut seen = BTreeSet::new();
    while let Some((at, trail)) = stack.pop() {
        for next in g.get(&at).into_iter().flatten() {
            if next == start {
                return Some(trail);
            }
            if seen.insert(next.clone()) {
                let mut t = trail.clone();
                t.push(next.clone());
                stack.push((next.clone(), t));
            }
        }
    }
    None
}

#[test]
fn no_file_imports_itself_through_others() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&root);
    assert!(
        g.len() > 50,
        "the scan found the source files ({})",
        g.len()
    );
    let cycles: Vec<String> = g
        .keys()
        .filter_map(|f| cycle_from(&g, f))
        .map(|c| {
            c.iter()
                .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
                .collect::<Vec<_>>()
                .join(" -> ")
        })
        .collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_scan_sees_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "mod a;\n").unwrap();
    std::fs::write(
        src.join("a/mod.rs"),
        "mod b;\npub use b::B;\npub struct A;\n",
    )
    .unwrap();
    std::fs::write(src.join("a/b.rs"), "use super::A;\npub struct B(A);\n").unwrap();
    let g = graph(src);
    assert!(cycle_from(&g, &src.join("a/b.rs")).is_some(), "{g:?}");
    std::fs::write(src.join("a/b.rs"), "pub struct B;\n").unwrap();
    assert!(cycle_from(&graph(src), &src.join("a/b.rs")).is_none());
}
