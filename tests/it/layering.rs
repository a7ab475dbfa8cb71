//! One direction of dependency between keyrelay's folders (ARCHITECTURE.md,
//! "The map"): `config` at the bottom; `secrets`, `guard`, `usage` and
//! `telemetry` above it; the data path (`proxy`) above those; `ops`, which
//! runs the data path, on top. A folder may name the ones below it, never
//! one above: this test reads every `src/**/*.rs` and fails on an import
//! (`use crate::x`, or a `crate::x::` path in code) that points up.
//!
//! Comments are skipped: a doc link to a folder above is a pointer for the
//! reader, not a dependency.

use std::path::{Path, PathBuf};

/// Each folder, and the top-level modules it must not name.
const FORBIDDEN: &[(&str, &[&str])] = &[
    ("config", &["ops", "proxy", "telemetry", "demo"]),
    ("secrets", &["ops", "proxy", "guard", "usage", "demo"]),
    ("guard", &["ops", "proxy", "usage", "demo"]),
    ("usage", &["ops", "proxy", "guard", "secrets", "demo"]),
    (
        "telemetry",
        &["ops", "proxy", "guard", "usage", "secrets", "demo"],
    ),
    ("proxy", &["ops", "demo"]),
];

#[test]
fn no_folder_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "found only {} files in src/", files.len());
    let mut upward = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src/");
        let Some(folder) = relative.iter().next().and_then(|c| c.to_str()) else {
            continue;
        };
        let Some((_, forbidden)) = FORBIDDEN.iter().find(|(name, _)| *name == folder) else {
            continue;
        };
        let text = std::fs::read_to_string(file).expect("readable source");
        for (number, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for named in crate_paths(code) {
                if forbidden.contains(&named) {
                    upward.push(format!(
                        "src/{}:{}: {folder} names {named}: {}",
                        relative.display(),
                        number + 1,
                        code
                    ));
                }
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that point up the layers (config < secrets, guard, usage, telemetry < proxy < ops):\n{}",
        upward.join("\n")
    );
}

/// The top-level modules a line of code names through `crate::`, including
/// each of a grouped `use crate::{a, b::c}`.
fn crate_paths(code: &str) -> Vec<&str> {
    let mut named = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                named.push(first_segment(item.trim()));
            }
        } else {
            named.push(first_segment(after));
        }
        rest = after;
    }
    named
}

fn first_segment(path: &str) -> &str {
    let end = path
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(path.len());
    &path[..end]
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src/") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn crate_paths_finds_plain_and_grouped_imports() {
    assert_eq!(crate_paths("use crate::ops::workers::serve;"), ["ops"]);
    assert_eq!(
        crate_paths("use crate::{proxy::Proxy, usage};"),
        ["proxy", "usage"]
    );
    assert_eq!(
        crate_paths("let x = crate::ops::health::DEFAULT_URL; crate::config::load()"),
        ["ops", "config"]
    );
}
