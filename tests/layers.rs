//! The library's layers (ARCHITECTURE.md): every file of `harness/` imports only its own layer
//! or a lower one, and no files import each other in a circle. Reads the sources: each `use`
//! tree and each inline `crate::`/`super::` path (comments and `#[cfg(test)]` modules left out)
//! is resolved to the file that defines it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top; a file may import its own layer or one listed before it.
const LAYERS: &[&[&str]] = &[
    &["model", "support"],
    &["ssh"],
    &["config"],
    &["image"],
    &["host"],
    &["vm"],
    &["agent"],
    &["nats"],
    &["lab"],
    &["trials"],
    &["fixtures"],
];

/// Beyond the order: arrows that would be "down" but are still not allowed.
const FORBIDDEN: &[(&str, &[&str])] = &[
    // The vocabulary and the helpers import nothing else of the crate.
    (
        "model",
        &[
            "support", "ssh", "config", "image", "host", "vm", "agent", "nats", "lab",
        ],
    ),
    (
        "support",
        &[
            "model", "ssh", "config", "image", "host", "vm", "agent", "nats", "lab",
        ],
    ),
    // The NATS server knows nothing of VMs.
    ("nats", &["vm"]),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("harness")
}

/// Every library file, as its module path (`vm::handle`, `vm` for vm/mod.rs, `` for lib.rs).
fn modules() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root(), &mut files);
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(root()).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            (parts.join("::"), p)
        })
        .collect()
}

/// The source without comments, string and char literals, and `#[cfg(test)]` modules.
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    let chars: Vec<char> = text.chars().collect();
    let (mut out, mut i) = (String::new(), 0);
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !prev_is_ident(&chars, i)
        {
            // A raw string: r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            while j < chars.len()
                && !(chars[j] == '"' && (0..hashes).all(|h| chars.get(j + 1 + h) == Some(&'#')))
            {
                j += 1;
            }
            i = j + 1 + hashes;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '\'' && (next == Some('"') || next == Some('\\')) {
            // '"' or an escaped char literal.
            i += 2;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_is_ident(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into its paths.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.trim().to_owned()];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap()];
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|i| !i.trim().is_empty())
        .flat_map(expand)
        .map(|p| {
            if p == "self" {
                prefix.trim_end_matches("::").to_owned()
            } else {
                format!("{prefix}{p}")
            }
        })
        .collect()
}

/// The paths a file names, each with whether it is a `pub use` (a re-export): its `use` trees
/// (a `pub mod` is a declaration, not an import) and the inline `crate::…`/`super::…` paths. A
/// renamed import keeps its new name after `@` (`a::b@c` for `use a::b as c`).
fn paths_in(code: &str) -> Vec<(String, bool)> {
    let mut paths = Vec::new();
    let lines: Vec<&str> = code.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        let line = line.trim_start();
        let Some(at) = ["use ", "pub use ", "pub(crate) use ", "pub(super) use "]
            .iter()
            .find(|p| line.starts_with(*p))
        else {
            continue;
        };
        let mut tree = line[at.len()..].to_owned();
        let mut more = lines[n + 1..].iter();
        while !tree.contains(';') {
            match more.next() {
                Some(l) => tree.push_str(l),
                None => break,
            }
        }
        let tree = tree
            .split(';')
            .next()
            .unwrap()
            .replace(" as ", "@")
            .replace(char::is_whitespace, "");
        let public = at.starts_with("pub");
        paths.extend(expand(&tree).into_iter().map(|p| (p, public)));
    }
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            let before = code[..at].chars().last();
            let len = code[at..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(code.len() - at);
            if !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                paths.push((code[at..at + len].trim_end_matches(':').to_owned(), false));
            }
            from = at + len.max(1);
        }
    }
    paths
}

/// `path` (as written in `module`) from the crate root, or `None` for a path outside the crate
/// (std, other crates). A first segment that names a child module is relative to `module`.
fn absolute(path: &str, module: &str, modules: &BTreeMap<String, PathBuf>) -> Option<Vec<String>> {
    let path = path.split('@').next().unwrap();
    let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
    match segs.first().copied() {
        Some("crate") => {
            base.clear();
            segs.remove(0);
        }
        Some("super") => {
            while segs.first() == Some(&"super") {
                segs.remove(0);
                base.pop();
            }
        }
        Some("self") => {
            segs.remove(0);
        }
        Some(first) => {
            let child = if module.is_empty() {
                first.to_owned()
            } else {
                format!("{module}::{first}")
            };
            if !modules.contains_key(&child) {
                return None; // std, other crates
            }
        }
        None => return None,
    }
    Some(base.into_iter().chain(segs).map(str::to_owned).collect())
}

/// The paths each file names (read and parsed once).
fn parsed(modules: &BTreeMap<String, PathBuf>) -> BTreeMap<String, Vec<(String, bool)>> {
    modules
        .iter()
        .map(|(module, path)| (module.clone(), paths_in(&code_of(path))))
        .collect()
}

/// The re-exports of every file: `module::name` → the absolute path it stands for.
fn aliases(
    modules: &BTreeMap<String, PathBuf>,
    parsed: &BTreeMap<String, Vec<(String, bool)>>,
) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for (module, paths) in parsed {
        for (p, public) in paths {
            if !public {
                continue;
            }
            let Some(target) = absolute(p, module, modules) else {
                continue;
            };
            let name = match p.split_once('@') {
                Some((_, renamed)) => renamed.to_owned(),
                None => target.last().cloned().unwrap_or_default(),
            };
            let key = if module.is_empty() {
                name
            } else {
                format!("{module}::{name}")
            };
            out.insert(key, target);
        }
    }
    out
}

/// The file that defines what `path` (absolute) names: the longest prefix that is a file of
/// the library, following re-exports to where the item is defined. `None` if it names nothing.
fn resolve(
    mut path: Vec<String>,
    modules: &BTreeMap<String, PathBuf>,
    aliases: &BTreeMap<String, Vec<String>>,
) -> Option<String> {
    for _ in 0..8 {
        let n = (0..=path.len())
            .rev()
            .find(|n| modules.contains_key(&path[..*n].join("::")))?;
        let module = path[..n].join("::");
        let Some(item) = path.get(n) else {
            return Some(module);
        };
        let key = if module.is_empty() {
            item.clone()
        } else {
            format!("{module}::{item}")
        };
        match aliases.get(&key) {
            Some(target) => {
                let mut next = target.clone();
                next.extend(path[n + 1..].iter().cloned());
                path = next;
            }
            None => return Some(module),
        }
    }
    None
}

fn layer_of(module: &str) -> Option<usize> {
    let top = module.split("::").next().unwrap();
    LAYERS.iter().position(|l| l.contains(&top))
}

/// Every file's arrows: the files it imports from. A `pub use` in a `mod.rs` or `lib.rs` is
/// the folder's front (it names what the folder offers), not an arrow; a path through it
/// points at the file that defines the item.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let parsed = parsed(&modules);
    let aliases = aliases(&modules, &parsed);
    let mut graph = BTreeMap::new();
    for (module, path) in &modules {
        let front = matches!(
            path.file_name().and_then(|n| n.to_str()),
            Some("mod.rs" | "lib.rs")
        );
        let targets: BTreeSet<String> = parsed[module]
            .iter()
            .filter(|(_, public)| !(front && *public))
            .filter_map(|(p, _)| absolute(p, module, &modules))
            .map(|abs| {
                let shown = abs.join("::");
                resolve(abs, &modules, &aliases)
                    .unwrap_or_else(|| panic!("{module}: `{shown}` names no file of the library"))
            })
            .filter(|t| t != module && !t.is_empty())
            .collect();
        graph.insert(module.clone(), targets);
    }
    graph
}

#[test]
fn every_file_imports_only_its_own_layer_or_lower_ones() {
    let graph = graph();
    assert!(graph.len() > 50, "found only {} files", graph.len());
    let arrows: usize = graph.values().map(BTreeSet::len).sum();
    assert!(
        arrows > 100,
        "found only {arrows} imports: is the parser broken?"
    );
    let mut wrong = Vec::new();
    for (from, targets) in &graph {
        let Some(mine) = layer_of(from) else {
            assert!(from.is_empty(), "{from} is in no layer: add it to LAYERS");
            continue;
        };
        for to in targets {
            let theirs = layer_of(to).unwrap_or_else(|| panic!("{to} is in no layer"));
            let top = |m: &str| m.split("::").next().unwrap().to_owned();
            let forbidden = FORBIDDEN
                .iter()
                .any(|(f, never)| *f == top(from) && never.contains(&top(to).as_str()));
            if theirs > mine || forbidden {
                wrong.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that point up a layer (ARCHITECTURE.md):\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn no_files_import_each_other_in_a_circle() {
    let graph = graph();
    // Depth-first search; a node met again on the current path closes a circle.
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        circles: &mut Vec<String>,
    ) {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_owned());
            circles.push(c.join(" -> "));
            return;
        }
        if !done.insert(n.to_owned()) {
            return;
        }
        path.push(n.to_owned());
        for t in &graph[n] {
            visit(t, graph, path, done, circles);
        }
        path.pop();
    }
    let (mut done, mut circles) = (BTreeSet::new(), Vec::new());
    for n in graph.keys() {
        visit(n, &graph, &mut Vec::new(), &mut done, &mut circles);
    }
    assert!(
        circles.is_empty(),
        "import circles:\n  {}",
        circles.join("\n  ")
    );
}

/// The checker sees what it must: known imports of known files.
#[test]
fn the_checker_resolves_imports_to_files() {
    let graph = graph();
    for (from, to) in [
        ("vm::cold", "vm::start"),
        ("vm::warm", "vm::cold"),
        ("vm::waits", "vm::handle"),
        ("host::slots", "model::arch"),
        ("lab", "vm::run"),
        ("nats::server", "support::probe"),
    ] {
        assert!(
            graph[from].contains(to),
            "{from} should import {to}; it imports {:?}",
            graph[from]
        );
    }
    assert!(
        graph["model::arch"].is_empty(),
        "{:?}",
        graph["model::arch"]
    );
}
