//! The documentation stays navigable and complete (no network, no Azurite):
//!
//! 1. Every relative Markdown link in `README.md`, `BENCHMARKS.md` and
//!    `docs/**/*.md` points to a file or folder that exists, and every `#anchor`
//!    (on its own or after a `.md` path) names a heading of that page, with
//!    GitHub's slug rules: lower-case, spaces to `-`, punctuation dropped except
//!    `-` and `_`, a repeated heading gets `-1`, `-2`, ...
//! 2. Every key of every `config/*.example.toml` is in the configuration
//!    reference. The reference is the key tables (tables whose first column is
//!    headed `key`) of `docs/configuration.md`, plus those of each sink page
//!    `docs/sinks/<kind>.md` that `docs/configuration.md` links to; in a sink
//!    page a key written without the `sink.` prefix is relative to
//!    `[sink.<kind>]`. A row's first cell may name several keys as
//!    `` `a.b.c` / `d` / `e` ``: `d` and `e` are siblings of `c`.
//!    A key is its dotted path (`sink.salesforce.api_limit_pause`); a key whose
//!    value is an inline table (`connection_string = { env = … }`) counts as
//!    itself. Entries of a map-valued table (`[sink.dynamics.fields]`,
//!    `[sink.dynamics.max_lengths]`: CRM column names, not settings) need the
//!    map's own row in the reference and the entry's name in backticks in the
//!    sink page.
//! 3. `README.md` and `BENCHMARKS.md` are at most 300 lines each.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn markdown_files() -> Vec<PathBuf> {
    let root = root();
    let mut files = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "md") {
                files.push(path);
            }
        }
    }
    files
}

/// The page's lines outside fenced code blocks.
fn prose_lines(text: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push(line);
        }
    }
    out
}

/// GitHub's anchor for a heading's text.
fn slug(heading: &str) -> String {
    let mut text = String::new();
    // Links inside a heading count by their text.
    let mut rest = heading;
    while let Some(open) = rest.find('[') {
        let close = match rest[open..].find("](") {
            Some(c) => open + c,
            None => break,
        };
        let end = match rest[close..].find(')') {
            Some(e) => close + e,
            None => break,
        };
        text.push_str(&rest[..open]);
        text.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    text.push_str(rest);
    text.trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in prose_lines(text) {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(&line[hashes + 1..]);
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

/// Targets of inline links `[text](target)` outside code.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose_lines(text) {
        // Drop inline code spans, which may hold `](`.
        let mut clean = String::new();
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
                clean.push('`');
            } else if !in_code {
                clean.push(c);
            }
        }
        let mut rest = clean.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            let target = after[..end].split_whitespace().next().unwrap_or("");
            out.push(target.to_string());
            rest = &after[end..];
        }
    }
    out
}

fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let root = root();
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = fs::read_to_string(&file).unwrap();
        let own = anchors(&text);
        let name = file.strip_prefix(&root).unwrap().display().to_string();
        for target in links(&text) {
            if target.is_empty()
                || target.starts_with("http://")
                || target.starts_with("https://")
                || target.starts_with("mailto:")
            {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let dest = if path.is_empty() {
                file.clone()
            } else {
                normalise(&file.parent().unwrap().join(path))
            };
            if !dest.starts_with(&root) || !dest.exists() {
                broken.push(format!("{name}: `{target}`: no such file"));
                continue;
            }
            if let Some(anchor) = anchor {
                let set = if path.is_empty() {
                    own.clone()
                } else if dest.extension().is_some_and(|x| x == "md") {
                    anchors(&fs::read_to_string(&dest).unwrap())
                } else {
                    broken.push(format!(
                        "{name}: `{target}`: anchor into a non-Markdown file"
                    ));
                    continue;
                };
                if !set.contains(anchor) {
                    broken.push(format!("{name}: `{target}`: no heading `#{anchor}` there"));
                }
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} links found: is the link parser broken?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// Keys of one example file as dotted paths; a `[table]` header as `[name]`; an inline
/// table's key as itself.
fn example_keys(text: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut table: Vec<String> = Vec::new();
    let mut open_multiline: Option<&str> = None;
    let mut bracket_depth = 0i32;
    for raw in text.lines() {
        let line = raw.trim();
        if let Some(delim) = open_multiline {
            if line.contains(delim) {
                open_multiline = None;
            }
            continue;
        }
        if bracket_depth > 0 {
            bracket_depth += line.matches('[').count() as i32 - line.matches(']').count() as i32;
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            let name = line
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap()
                .trim();
            table = name
                .split('.')
                .map(|s| s.trim().trim_matches('"').to_string())
                .collect();
            keys.push(format!("[{}]", table.join(".")));
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            panic!("cannot read example line `{raw}`");
        };
        let key = key.trim().trim_matches('"').trim_matches('\'');
        let mut path = table.clone();
        path.extend(key.split('.').map(str::to_string));
        keys.push(path.join("."));
        let value = value.trim();
        for delim in ["\"\"\"", "'''"] {
            if value.starts_with(delim) && !value[3..].contains(delim) {
                open_multiline = Some(delim);
            }
        }
        if value.starts_with('[') {
            let depth = value.matches('[').count() as i32 - value.matches(']').count() as i32;
            if depth > 0 {
                bracket_depth = depth;
            }
        }
    }
    keys
}

/// First-cell keys of the `| key | ...` tables of a page.
fn reference_keys(text: &str, relative_to: Option<&str>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut in_key_table = false;
    for line in prose_lines(text) {
        let line = line.trim();
        if !line.starts_with('|') {
            in_key_table = false;
            continue;
        }
        let first = line
            .trim_matches('|')
            .split('|')
            .next()
            .unwrap_or("")
            .trim();
        if first == "key" {
            in_key_table = true;
            continue;
        }
        if !in_key_table || first.starts_with("---") {
            continue;
        }
        let mut parent: Option<String> = None;
        for part in first.split(" / ") {
            let part = part.trim();
            let Some(key) = part.strip_prefix('`').and_then(|p| p.split('`').next()) else {
                continue;
            };
            let mut key = key.to_string();
            if let Some(prefix) = relative_to {
                if !key.starts_with("sink.") && parent.is_none() {
                    key = format!("{prefix}.{key}");
                }
            }
            match &parent {
                Some(p) if !key.contains('.') => key = format!("{p}.{key}"),
                _ => parent = key.rsplit_once('.').map(|(p, _)| p.to_string()),
            }
            out.insert(key);
        }
    }
    out
}

/// Values of a map-valued table, not settings: their entry names are CRM
/// columns (or header names).
const MAP_TABLES: &[&str] = &[
    "fields",
    "ownership",
    "max_lengths",
    "placeholders",
    "headers",
];

#[test]
fn every_example_config_key_is_in_the_configuration_reference() {
    let root = root();
    let reference_page = root.join("docs/configuration.md");
    let reference_text = fs::read_to_string(&reference_page).unwrap();
    let mut reference = reference_keys(&reference_text, None);
    let mut sink_pages: BTreeMap<String, String> = BTreeMap::new();
    for target in links(&reference_text) {
        let path = target.split('#').next().unwrap();
        if let Some(kind) = path
            .strip_prefix("sinks/")
            .and_then(|p| p.strip_suffix(".md"))
        {
            let text = fs::read_to_string(root.join("docs").join(path)).unwrap();
            reference.extend(reference_keys(&text, Some(&format!("sink.{kind}"))));
            sink_pages.insert(kind.to_string(), text);
        }
    }
    assert!(
        reference.len() > 40,
        "only {} keys in the reference: is the table parser broken?",
        reference.len()
    );

    let mut missing = Vec::new();
    let mut examples: Vec<_> = fs::read_dir(root.join("config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".example.toml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 4, "example configs not found");
    for example in examples {
        let name = example.strip_prefix(&root).unwrap().display().to_string();
        for key in example_keys(&fs::read_to_string(&example).unwrap()) {
            // A `[[sinks]]` entry takes every key of `[sink]`.
            let key = match key.strip_prefix("[sinks.") {
                Some(rest) => format!("[sink.{rest}"),
                None => key,
            };
            if let Some(table) = key.strip_prefix('[').and_then(|k| k.strip_suffix(']')) {
                // A table header: some key must live in it.
                let prefix = format!("{table}.");
                if !reference.contains(table) && !reference.iter().any(|k| k.starts_with(&prefix)) {
                    missing.push(format!("{name}: table `[{table}]`"));
                }
                continue;
            }
            // A `[[sinks]]` entry takes every key of `[sink]`.
            let key = match key.strip_prefix("sinks.") {
                Some(rest) => format!("sink.{rest}"),
                None => key,
            };
            if reference.contains(&key) {
                continue;
            }
            // An entry of a map-valued table: the map's row, plus the entry named
            // in the sink page.
            let (parent, entry) = key.rsplit_once('.').unwrap();
            let map = parent.rsplit('.').next().unwrap();
            if MAP_TABLES.contains(&map) && reference.contains(parent) {
                let kind = parent.split('.').nth(1).unwrap_or("");
                let named = sink_pages.get(kind).is_some_and(|page| {
                    page.contains(&format!("`{entry}`")) || page.contains(&format!("`{entry} "))
                });
                if named {
                    continue;
                }
                missing.push(format!(
                    "{name}: `{key}` (not named in docs/sinks/{kind}.md)"
                ));
                continue;
            }
            missing.push(format!("{name}: `{key}`"));
        }
    }
    assert!(
        missing.is_empty(),
        "keys of the example configs missing from docs/configuration.md (or the sink pages it links to):\n{}",
        missing.join("\n")
    );
}

/// The README and BENCHMARKS.md stay an overview (issue 29): topics go to `docs/`,
/// the history of benchmark rounds to `bench/results/history.md`.
#[test]
fn readme_and_benchmarks_stay_at_most_300_lines() {
    for name in ["README.md", "BENCHMARKS.md"] {
        let lines = fs::read_to_string(root().join(name))
            .unwrap()
            .lines()
            .count();
        assert!(
            lines <= 300,
            "{name} has {lines} lines: move a topic to docs/ (see docs/architecture.md)"
        );
    }
}
