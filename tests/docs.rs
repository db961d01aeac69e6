//! The documentation's claims point at real things: every test it cites exists and defines what
//! it names, every relative link (and its `#anchor`) resolves, every repository path it names is
//! there, the README stays a front door, and no page speaks of how it came about. Fast: reads
//! files only, no VM.
//!
//! A citation is a backticked source path (`tests/<file>.rs`, `harness/<…>.rs`, or
//! `examples/<…>.rs`: a user's crate) followed, in
//! the same sentence, list item or table cell, by backticked identifiers: `tests/leaks.rs`
//! `a_killed_run_is_reaped_by_the_next_one`, with brace expansion
//! (`a_nats_{process,container}_restarted_mid_report_loses_nothing`). Each identifier must be
//! defined in that file as `fn <name>`; for a `tests/matrix.rs` it is a trial name
//! (`heartbeat::partition::x86_64`) made of the matrix's agents, scenarios and architectures.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every docs/*.md: the pages held to every rule.
fn front_and_reference() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md"), root().join("ARCHITECTURE.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ has no .md page");
    pages.extend(docs);
    pages
}

/// The pages whose citations, links and paths are checked: the above, BENCHMARKS.md and
/// CHANGELOG.md where they exist.
fn all_pages() -> Vec<PathBuf> {
    let mut pages = front_and_reference();
    for extra in ["BENCHMARKS.md", "CHANGELOG.md"] {
        let p = root().join(extra);
        if p.exists() {
            pages.push(p);
        }
    }
    pages
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Markdown, as far as these checks need it.

/// A stretch of prose or one table cell: the text, and the line each piece of it came from.
struct Scope {
    text: String,
    /// (offset in `text`, 1-based line in the file), ascending.
    lines: Vec<(usize, usize)>,
}

impl Scope {
    fn line_at(&self, offset: usize) -> usize {
        self.lines
            .iter()
            .rev()
            .find(|(o, _)| *o <= offset)
            .map_or(0, |(_, l)| *l)
    }
}

/// The page's text outside fenced code blocks, as (1-based line number, line).
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// Splits a table row into its cells (`\|` is a pipe inside a cell).
fn cells(row: &str) -> Vec<String> {
    let row = row.trim().trim_start_matches('|');
    let mut cells = vec![String::new()];
    let mut chars = row.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cells.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().unwrap().push(c),
        }
    }
    cells.retain(|c| !c.trim().is_empty());
    cells
}

fn is_list_item(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("- ")
        || t.starts_with("* ")
        || t.split_once(". ")
            .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// Splits a paragraph into sentences: a `.` followed by whitespace (or the end), outside
/// backticks, ends one.
fn sentences(paragraph: Scope) -> Vec<Scope> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_code = false;
    let bytes = paragraph.text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'`' => in_code = !in_code,
            b'.' if !in_code && bytes.get(i + 1).is_none_or(|n| n.is_ascii_whitespace()) => {
                out.push(sub_scope(&paragraph, start, i + 1));
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < bytes.len() {
        out.push(sub_scope(&paragraph, start, bytes.len()));
    }
    out
}

fn sub_scope(scope: &Scope, from: usize, to: usize) -> Scope {
    let mut lines = vec![(0, scope.line_at(from))];
    lines.extend(
        scope
            .lines
            .iter()
            .filter(|(o, _)| *o > from && *o < to)
            .map(|(o, l)| (o - from, *l)),
    );
    Scope {
        text: scope.text[from..to].to_owned(),
        lines,
    }
}

/// The page cut into the scopes a citation may span: each sentence of a paragraph or list
/// item, each heading, each table cell.
fn scopes(text: &str) -> Vec<Scope> {
    let mut out = Vec::new();
    let mut paragraph: Option<Scope> = None;
    let flush = |p: &mut Option<Scope>, out: &mut Vec<Scope>| {
        if let Some(p) = p.take() {
            out.extend(sentences(p));
        }
    };
    for (n, line) in prose_lines(text) {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with('|') || t.starts_with("<!--") {
            flush(&mut paragraph, &mut out);
            if t.starts_with('#') {
                out.push(Scope {
                    text: t.to_owned(),
                    lines: vec![(0, n)],
                });
            } else if t.starts_with('|') {
                for cell in cells(t) {
                    if !cell
                        .trim()
                        .chars()
                        .all(|c| c == '-' || c == ':' || c == ' ')
                    {
                        out.push(Scope {
                            text: cell,
                            lines: vec![(0, n)],
                        });
                    }
                }
            }
            continue;
        }
        if is_list_item(line) {
            flush(&mut paragraph, &mut out);
        }
        let p = paragraph.get_or_insert_with(|| Scope {
            text: String::new(),
            lines: Vec::new(),
        });
        if !p.text.is_empty() {
            p.text.push(' ');
        }
        p.lines.push((p.text.len(), n));
        p.text.push_str(t);
    }
    flush(&mut paragraph, &mut out);
    out
}

/// The backticked spans of a scope, with their offsets.
fn code_spans(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut rest = text;
    let mut base = 0;
    while let Some(open) = rest.find('`') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('`') else { break };
        out.push((base + open, &after[..close]));
        let consumed = open + 1 + close + 1;
        base += consumed;
        rest = &rest[consumed..];
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Citations.

#[derive(Debug)]
struct Citation {
    page: String,
    line: usize,
    file: String,
    names: Vec<String>,
}

fn is_source_path(span: &str) -> bool {
    (span.starts_with("tests/") || span.starts_with("harness/") || span.starts_with("examples/"))
        && span.ends_with(".rs")
        && span
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '/' || c == '.')
}

/// An identifier as cited: lower-case snake case, `::` between a trial's parts, `{a,b}`
/// alternatives.
fn is_identifier(span: &str) -> bool {
    let ok_chars = span
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_{},:".contains(c));
    let first_ok = span
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_' || c == '{');
    let balanced = span.matches('{').count() == span.matches('}').count();
    let colons_ok = span
        .split("::")
        .all(|part| !part.is_empty() && !part.contains(':'));
    ok_chars && first_ok && balanced && colons_ok
}

/// `a_{b,c}_d` → `a_b_d`, `a_c_d` (every brace group, in turn).
fn expand(name: &str) -> Vec<String> {
    let Some(open) = name.find('{') else {
        return vec![name.to_owned()];
    };
    let close = open + name[open..].find('}').expect("balanced braces");
    name[open + 1..close]
        .split(',')
        .flat_map(|alt| expand(&format!("{}{alt}{}", &name[..open], &name[close + 1..])))
        .collect()
}

fn citations_in(page: &str, text: &str) -> Vec<Citation> {
    let mut out = Vec::new();
    for scope in scopes(text) {
        let mut current: Option<Citation> = None;
        for (offset, span) in code_spans(&scope.text) {
            if is_source_path(span) {
                out.extend(current.take());
                current = Some(Citation {
                    page: page.to_owned(),
                    line: scope.line_at(offset),
                    file: span.to_owned(),
                    names: Vec::new(),
                });
            } else if let Some(c) = current.as_mut()
                && is_identifier(span)
            {
                c.names.push(span.to_owned());
            }
        }
        out.extend(current);
    }
    out
}

fn defines_fn(source: &str, name: &str) -> bool {
    source.match_indices(name).any(|(i, _)| {
        let before = source[..i].trim_end();
        let after = source[i + name.len()..].chars().next();
        before.ends_with("fn")
            && before[..before.len() - 2]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
            && after.is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    })
}

/// Every `.rs` file under `dir`, read.
fn sources_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            out.extend(sources_under(&path));
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(read(&path));
        }
    }
    out
}

/// What a trial name of tests/matrix.rs may be made of: the agents' prefixes (its
/// `.agent("…"` calls), and the scenario and architecture names (string literals of the
/// library, where `Scenario` and `VmArchitecture` name themselves).
struct MatrixNames {
    prefixes: BTreeSet<String>,
    library_strings: String,
}

impl MatrixNames {
    /// The names of the matrix in `file` (`tests/matrix.rs` or a user's crate's), whose
    /// agents may be described in the `agents/` folder beside it.
    fn load(file: &str) -> Self {
        let path = root().join(file);
        let mut matrix = read(&path);
        for agents in sources_under(&path.with_file_name("agents")) {
            matrix.push_str(&agents);
        }
        let prefixes = matrix
            .match_indices(".agent(\"")
            .filter_map(|(i, m)| {
                let rest = &matrix[i + m.len()..];
                rest.find('"').map(|end| rest[..end].to_owned())
            })
            .collect();
        Self {
            prefixes,
            library_strings: sources_under(&root().join("harness")).concat(),
        }
    }

    fn knows(&self, trial: &str) -> Result<(), String> {
        let parts: Vec<&str> = trial.split("::").collect();
        let literal = |s: &str| self.library_strings.contains(&format!("\"{s}\""));
        let (prefix, rest) = match parts.len() {
            3 => (parts[0], &parts[1..]),
            2 => ("", &parts[..]),
            1 => {
                return if literal(parts[0]) {
                    Ok(())
                } else {
                    Err(format!("`{}` is not a scenario of the matrix", parts[0]))
                };
            }
            _ => return Err("a trial name is [agent::]scenario::arch".into()),
        };
        if !self.prefixes.contains(prefix) {
            return Err(format!(
                "the matrix has no agent {prefix:?} (its agents: {:?})",
                self.prefixes
            ));
        }
        for part in rest {
            if !literal(part) {
                return Err(format!(
                    "`{part}` is neither a scenario nor an architecture"
                ));
            }
        }
        Ok(())
    }
}

/// Every citation of the pages, checked; returns the problems and how many names were checked.
fn check_citations(pages: &[(String, String)]) -> (Vec<String>, usize) {
    let mut matrices = std::collections::BTreeMap::new();
    let mut problems = Vec::new();
    let mut checked = 0;
    for (page, text) in pages {
        for c in citations_in(page, text) {
            let at = format!("{}:{}: `{}`", c.page, c.line, c.file);
            let path = root().join(&c.file);
            let Ok(source) = std::fs::read_to_string(&path) else {
                problems.push(format!("{at}: no such file"));
                continue;
            };
            for name in &c.names {
                for expanded in expand(name) {
                    checked += 1;
                    if c.file.ends_with("tests/matrix.rs") {
                        let matrix = matrices
                            .entry(c.file.clone())
                            .or_insert_with(|| MatrixNames::load(&c.file));
                        if let Err(why) = matrix.knows(&expanded) {
                            problems.push(format!("{at} `{expanded}`: not a trial: {why}"));
                        }
                    } else if !defines_fn(&source, &expanded) {
                        problems.push(format!("{at} `{expanded}`: no `fn {expanded}` in it"));
                    }
                }
            }
        }
    }
    (problems, checked)
}

fn loaded(paths: &[PathBuf]) -> Vec<(String, String)> {
    paths.iter().map(|p| (rel(p), read(p))).collect()
}

fn report(what: &str, problems: &[String]) -> String {
    let mut msg = format!("{} {what}:\n", problems.len());
    for p in problems {
        let _ = writeln!(msg, "  {p}");
    }
    msg
}

#[test]
fn every_cited_test_exists_and_defines_what_is_cited() {
    let pages = loaded(&all_pages());
    let (problems, checked) = check_citations(&pages);
    assert!(
        problems.is_empty(),
        "{}",
        report("broken citations", &problems)
    );
    // The checker must have something to check: the docs cite well over a hundred tests.
    assert!(
        checked >= 30,
        "only {checked} cited names found: is the citation parser still finding them?"
    );
    let cited_files: BTreeSet<String> = pages
        .iter()
        .flat_map(|(page, text)| citations_in(page, text))
        .map(|c| c.file)
        .collect();
    assert!(
        cited_files.len() >= 10,
        "only {} cited files: {cited_files:?}",
        cited_files.len()
    );
    eprintln!(
        "{checked} cited names in {} files, all defined",
        cited_files.len()
    );
}

/// The checker itself: a page with one good and several broken citations reports each broken
/// one, with its page and line, and nothing else.
#[test]
fn the_checker_reports_every_broken_citation() {
    let page = "\
Good: `tests/leaks.rs` `a_killed_run_is_reaped_by_the_next_one`, and
`tests/faults.rs` `a_nats_{process,container}_restarted_mid_report_loses_nothing`.

| row | test |
| --- | --- |
| gone | `tests/leaks.rs` `a_test_that_does_not_exist` |
| moved | `tests/no_such_file.rs` `anything` |

A trial: `tests/matrix.rs` `heartbeat::partition::{x86_64,aarch64}`, `nobody::e2e::x86_64`.
";
    let (problems, checked) = check_citations(&[("page.md".into(), page.into())]);
    assert_eq!(checked, 7, "{problems:?}");
    let joined = problems.join("\n");
    assert_eq!(problems.len(), 3, "{joined}");
    assert!(
        joined.contains("page.md:6: `tests/leaks.rs` `a_test_that_does_not_exist`"),
        "{joined}"
    );
    assert!(
        joined.contains("page.md:7: `tests/no_such_file.rs`: no such file"),
        "{joined}"
    );
    assert!(
        joined.contains("page.md:9: `tests/matrix.rs` `nobody::e2e::x86_64`"),
        "{joined}"
    );
}

// ---------------------------------------------------------------------------------------------
// Links, paths, length, words.

/// GitHub's anchor for a heading: lower case, letters, digits, `-` and `_` kept, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim_start_matches('#')
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    prose_lines(text)
        .into_iter()
        .filter(|(_, l)| l.starts_with('#'))
        .map(|(_, l)| slug(l))
        .collect()
}

/// `](target)` of every link outside code, with its line.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in prose_lines(text) {
        // Inline code may hold `](` too: drop it first.
        let mut plain = String::new();
        for (i, piece) in line.split('`').enumerate() {
            if i % 2 == 0 {
                plain.push_str(piece);
            }
        }
        for (i, _) in plain.match_indices("](") {
            let rest = &plain[i + 2..];
            if let Some(end) = rest.find(')') {
                out.push((n, rest[..end].to_owned()));
            }
        }
    }
    out
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in all_pages() {
        let text = read(&page);
        for (line, target) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let path = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            let at = format!("{}:{line}: ]({target})", rel(&page));
            if !path.exists() {
                problems.push(format!("{at}: {} does not exist", rel(&path)));
            } else if !anchor.is_empty() {
                if path.is_dir() || path.extension().is_none_or(|x| x != "md") {
                    problems.push(format!("{at}: an anchor into a file that is not markdown"));
                } else if !anchors(&read(&path)).contains(anchor) {
                    problems.push(format!("{at}: {} has no heading #{anchor}", rel(&path)));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", report("broken links", &problems));
    assert!(checked >= 30, "only {checked} relative links found");
}

/// A backticked path into the repository (`fixtures/…`, `.ci/run`, `tests/…`) names something
/// that is there.
#[test]
fn every_repository_path_named_exists() {
    const TOP: [&str; 9] = [
        "harness/",
        "tests/",
        "fixtures/",
        "examples/",
        "benches/",
        "cli/",
        "snapshots/",
        ".ci/",
        ".config/",
    ];
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in all_pages() {
        let text = read(&page);
        for scope in scopes(&text) {
            for (offset, span) in code_spans(&scope.text) {
                let is_path = TOP.iter().any(|t| span.starts_with(t))
                    && span
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c));
                if !is_path {
                    continue;
                }
                checked += 1;
                if !root().join(span).exists() {
                    problems.push(format!(
                        "{}:{}: `{span}` does not exist",
                        rel(&page),
                        scope.line_at(offset)
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{}",
        report("missing paths", &problems)
    );
    assert!(checked >= 30, "only {checked} repository paths found");
}

#[test]
fn the_readme_is_a_front_door() {
    let readme = read(&root().join("README.md"));
    let lines = readme.lines().count();
    assert!(
        lines <= 150,
        "README.md has {lines} lines; it is the front door (≤ 150): move reference to docs/"
    );
}

/// README.md, docs/ and BENCHMARKS.md describe devicelab as it is, for someone on their own
/// host: no history ("used to", "has since", issue numbers) and no paths or machines outside
/// the repository.
#[test]
fn no_history_words_or_outside_paths() {
    const WORDS: [&str; 7] = [
        concat!("this ", "session"),
        concat!("../", "shared"),
        concat!("sand", "box"),
        "used to",
        "has since",
        "this ci machine",
        "older figures",
    ];
    let mut pages = front_and_reference();
    pages.push(root().join("BENCHMARKS.md"));
    let mut problems = Vec::new();
    for page in pages {
        let Ok(text) = std::fs::read_to_string(&page) else {
            continue;
        };
        for (i, line) in text.lines().enumerate() {
            let lower = line.to_lowercase();
            let mut found: Vec<String> = WORDS
                .iter()
                .filter(|w| lower.contains(*w))
                .map(|w| w.to_string())
                .collect();
            // An issue number ("issue" and digits).
            found.extend(
                lower
                    .match_indices("issue ")
                    .filter(|(j, m)| lower[j + m.len()..].starts_with(|c: char| c.is_ascii_digit()))
                    .map(|(j, _)| lower[j..].chars().take(8).collect()),
            );
            for word in found {
                problems.push(format!(
                    "{}:{}: {word:?}: {}",
                    rel(&page),
                    i + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{}",
        report("history words or outside paths", &problems)
    );
}
