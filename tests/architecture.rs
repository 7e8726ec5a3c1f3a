//! The layering of ARCHITECTURE.md, checked from the source: every
//! `crate::<module>` a file of `src/` names (outside comments) is an arrow
//! from its top-level module to that one. An arrow may point to the same
//! layer or down, never up, and the modules' graph has no cycle. Also: no
//! source file over 800 lines except the ones ARCHITECTURE.md names.
//!
//! Run alone with `cargo test --test architecture`; needs no services.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first, and the top-level modules in each. Keep in
/// step with ARCHITECTURE.md's table.
const LAYERS: &[(&str, &[&str])] = &[
    ("foundation", &["lsn", "redact", "config", "metrics"]),
    (
        "protocol and connections",
        &["pgoutput", "database", "replication", "error"],
    ),
    ("outbox table contract", &["outbox"]),
    ("pipeline", &["pipeline"]),
    ("sinks", &["sink"]),
    ("sources", &["cdc", "poll"]),
    ("runner", &["runner"]),
    ("operator tools", &["operate", "idempotency"]),
    ("command line", &["cli"]),
];

/// Files allowed over 800 lines, each with its reason in ARCHITECTURE.md.
const LONG_FILES: &[&str] = &["src/pgoutput/tests.rs"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`None` for the crate root and
/// the binary).
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    let name = first.trim_end_matches(".rs").to_owned();
    (name != "lib" && name != "main").then_some(name)
}

/// The code of a file without its comments (line comments, doc comments,
/// block comments) and string literals, so a doc link or a message text is
/// not taken for an import.
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            while i < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if b[i..].starts_with(b"'\"'") {
            i += 3;
        } else if b[i..].starts_with(b"'\\\"'") {
            i += 4;
        } else if let Some(hashes) = raw_string_start(&b[i..]) {
            // r"…", r#"…"#: ends at a quote followed by as many hashes.
            i += 2 + hashes;
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            while i < b.len() && !b[i..].starts_with(&close) {
                i += 1;
            }
            i += close.len();
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// `Some(number of #)` when `rest` starts a raw string literal.
fn raw_string_start(rest: &[u8]) -> Option<usize> {
    if rest.first() != Some(&b'r') {
        return None;
    }
    let hashes = rest[1..].iter().take_while(|&&c| c == b'#').count();
    (rest.get(1 + hashes) == Some(&b'"')).then_some(hashes)
}

/// The top-level modules `code` names as `crate::<module>`.
fn crate_references(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        // `pgoutbox::crate::` cannot occur; skip identifiers ending in
        // "crate" (e.g. `my_crate::`).
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, mods)| mods.contains(&module))
}

/// Module → modules it imports, from every file of `src/`.
fn module_graph() -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut graph: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for file in files {
        let Some(from) = module_of(&file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read source");
        let rel = file.strip_prefix(src()).unwrap().display().to_string();
        let edges = graph.entry(from.clone()).or_default();
        for to in crate_references(&code_of(&text)) {
            // `crate::Lsn` and `crate::VERSION` name the crate root's
            // re-exports; only lower-case names are modules.
            if to != from {
                edges.entry(to).or_default().push(rel.clone());
            }
        }
    }
    graph
}

#[test]
fn every_module_is_in_a_layer() {
    let graph = module_graph();
    let unplaced: Vec<&String> = graph.keys().filter(|m| layer_of(m).is_none()).collect();
    assert!(
        unplaced.is_empty(),
        "modules missing from LAYERS (and from ARCHITECTURE.md): {unplaced:?}"
    );
}

#[test]
fn no_arrow_points_up_the_layers() {
    let mut upward = Vec::new();
    for (from, edges) in module_graph() {
        let Some(lf) = layer_of(&from) else { continue };
        for (to, files) in edges {
            let Some(lt) = layer_of(&to) else {
                upward.push(format!("{from} -> {to} (unknown module) in {files:?}"));
                continue;
            };
            if lt > lf {
                upward.push(format!(
                    "{from} ({}) -> {to} ({}) in {files:?}",
                    LAYERS[lf].0, LAYERS[lt].0
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "arrows pointing up:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = module_graph();
    // Depth-first search; a back edge closes a cycle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeMap<String, Vec<String>>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
        cycles: &mut Vec<String>,
    ) {
        state.insert(m.to_owned(), 1);
        path.push(m.to_owned());
        if let Some(edges) = graph.get(m) {
            for to in edges.keys() {
                match state.get(to.as_str()) {
                    Some(1) => {
                        let start = path.iter().position(|p| p == to).unwrap_or(0);
                        cycles.push(format!("{} -> {to}", path[start..].join(" -> ")));
                    }
                    Some(_) => {}
                    None => visit(to, graph, state, path, cycles),
                }
            }
        }
        path.pop();
        state.insert(m.to_owned(), 2);
    }
    let mut state = BTreeMap::new();
    let mut cycles = Vec::new();
    for m in graph.keys() {
        if !state.contains_key(m.as_str()) {
            visit(m, &graph, &mut state, &mut Vec::new(), &mut cycles);
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn no_source_file_is_over_800_lines_unless_architecture_says_why() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let architecture =
        std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut long = Vec::new();
    for file in files {
        let lines = std::fs::read_to_string(&file)
            .expect("read")
            .lines()
            .count();
        let rel = file.strip_prefix(root).unwrap().display().to_string();
        if lines > 800 && !(LONG_FILES.contains(&rel.as_str()) && architecture.contains(&rel)) {
            long.push(format!("{rel}: {lines} lines"));
        }
    }
    assert!(
        long.is_empty(),
        "files over 800 lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_checker_sees_imports_and_ignores_comments_and_strings() {
    let code = code_of(
        "use crate::outbox::X; // crate::cli\n/* crate::runner */ let s = \"crate::sink\"; \
         let q = '\"'; let r = r#\"a \" crate::cdc\"#; crate::pipeline::f();",
    );
    let refs = crate_references(&code);
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        ["outbox", "pipeline"],
        "{code}"
    );
    assert_eq!(layer_of("cli"), Some(LAYERS.len() - 1));
    assert!(layer_of("pipeline") < layer_of("sink"));
}
