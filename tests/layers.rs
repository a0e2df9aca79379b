//! The routing layer (`src/route/`) sits below the shards, the application side, the backend
//! API and the server: it must not import them, or the import cycle between `app` and `shard`
//! that it exists to break comes back. This test reads its source and fails on any such path.

use std::path::{Path, PathBuf};

/// Modules `src/route/` must not name: everything that builds on it.
const ABOVE_ROUTE: [&str; 6] = ["app", "shard", "api", "server", "cluster", "backend"];

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The forbidden modules `source` names: `crate::m`, `crate::{.., m, ..}` or `super::super::m`.
fn forbidden_in(source: &str) -> Vec<(usize, &'static str)> {
    let mut found = Vec::new();
    for (number, line) in source.lines().enumerate() {
        for module in ABOVE_ROUTE {
            let named = |prefix: &str| {
                line.match_indices(prefix).any(|(at, _)| {
                    let rest = &line[at + prefix.len()..];
                    rest.strip_prefix(module).is_some_and(|after| !after.starts_with(is_ident))
                })
            };
            let grouped = line.match_indices("crate::{").any(|(at, _)| {
                let group = &line[at + "crate::{".len()..];
                let group = &group[..group.find('}').unwrap_or(group.len())];
                group.split(',').any(|item| item.trim().split("::").next() == Some(module))
            });
            if named("crate::") || named("super::super::") || grouped {
                found.push((number + 1, module));
            }
        }
    }
    found
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

#[test]
fn the_routing_layer_imports_nothing_above_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/route");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() >= 4, "src/route/ should hold the routing layer's files: {files:?}");
    let mut problems = Vec::new();
    for file in &files {
        let source = std::fs::read_to_string(file).expect("read a source file");
        for (line, module) in forbidden_in(&source) {
            problems.push(format!("{}:{line}: names crate::{module}", file.display()));
        }
    }
    assert!(problems.is_empty(), "src/route/ must not import the layers above it:\n{}", problems.join("\n"));
}

#[test]
fn the_scan_finds_every_spelling() {
    assert_eq!(forbidden_in("use crate::shard::Shared;"), vec![(1, "shard")]);
    assert_eq!(forbidden_in("\nlet h = crate::app::Handle::new(x);"), vec![(2, "app")]);
    assert_eq!(forbidden_in("use crate::{core::ConnKey, api};"), vec![(1, "api")]);
    assert_eq!(forbidden_in("use super::super::server::start;"), vec![(1, "server")]);
    assert!(forbidden_in("use crate::core::shard_of; use crate::applied; use super::app;").is_empty());
}
