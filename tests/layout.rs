//! The house rules of `src/` (docs/architecture.md): data flows one way, so a module
//! only uses modules below it, never one above (no import circles); and no file is
//! longer than about a thousand lines.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The floors, from the ground up. A module may use modules of its own floor's folder
/// and of lower floors only. The ground floor holds the primitives everyone may use.
const FLOORS: &[&[&str]] = &[
    &[
        "alloc",
        "private_fs",
        "progress",
        "secret",
        "task",
        "telemetry",
        "timestamp",
    ],
    &["retry"],
    &["source"],
    &["lead"],
    &["identity"],
    &["state", "sink"],
    &["pipeline"],
    &["service"],
    &["config"],
    &["daemon"],
    &["cli"],
    &["lib", "main"],
];

/// A little above the thousand lines the issue allows, for a file that is nearly done.
const MAX_LINES: usize = 1_000;

fn floor_of(module: &str) -> usize {
    FLOORS
        .iter()
        .position(|floor| floor.contains(&module))
        .unwrap_or_else(|| panic!("module `{module}` is on no floor of tests/layout.rs: add it"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/sink/salesforce/api.rs` -> `sink`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("under src/");
    let first = relative.components().next().expect("a path");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_owned()
}

/// Whether a file holds only unit tests (`tests.rs`, or anything under a `tests/` folder).
fn is_test_file(src: &Path, file: &Path) -> bool {
    let relative = file.strip_prefix(src).expect("under src/");
    relative
        .components()
        .any(|c| c.as_os_str() == "tests" || c.as_os_str() == "tests.rs")
}

/// The code of a file outside its `#[cfg(test)]` module and comments.
fn production_code(text: &str) -> String {
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    code.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a piece of code names through `crate::`.
fn used_modules(code: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::X, b, c::{..}}`: the names at the group's top level.
            let mut depth = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if c.is_whitespace() => {}
                    _ if start && depth == 0 => {
                        used.insert(ident(&group[i..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            used.insert(ident(rest));
        }
    }
    used.retain(|m| !m.is_empty());
    used
}

#[test]
fn no_module_uses_a_module_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut upward = Vec::new();
    for file in &files {
        if is_test_file(&src, file) {
            continue;
        }
        let module = module_of(&src, file);
        let floor = floor_of(&module);
        let text = std::fs::read_to_string(file).expect("readable");
        for used in used_modules(&production_code(&text)) {
            // Items of the crate root (`crate::run`) are the daemon's, re-exported.
            let used_floor = FLOORS
                .iter()
                .position(|f| f.contains(&used.as_str()))
                .unwrap_or(floor_of("lib"));
            if used != module && used_floor >= floor && !(used_floor == floor && floor == 0) {
                upward.push(format!(
                    "{} ({module}) uses crate::{used}",
                    file.strip_prefix(&src).unwrap().display()
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "modules that use a module on their own floor or above (data flows one way: \
         see docs/architecture.md):\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_file_under_src_is_longer_than_a_thousand_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let lines = std::fs::read_to_string(file)
                .expect("readable")
                .lines()
                .count();
            (lines > MAX_LINES).then(|| format!("{} ({lines} lines)", file.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "files to split along their seams:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_import_scan_sees_grouped_and_plain_paths() {
    let code = "use crate::{a::X, b, c::{d, e}};\nlet x = crate::f::g();";
    let used: Vec<String> = used_modules(code).into_iter().collect();
    assert_eq!(used, ["a", "b", "c", "f"]);
}
