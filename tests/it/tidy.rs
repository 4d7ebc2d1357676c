//! Tidy checks as tests (after rust-analyzer's xtask tidy): every Rust source file opens with a
//! `//!` doc paragraph, no `#[ignore]` without a reason, no `dbg!` left behind.

use std::path::{Path, PathBuf};

use crate::support;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn sources() -> Vec<PathBuf> {
    let root = support::workspace_root();
    let mut files = Vec::new();
    for d in ["crates", "xtask", "tests"] {
        rust_files(&root.join(d), &mut files);
    }
    assert!(files.len() > 10, "found the sources");
    files
}

#[test]
fn every_source_file_has_a_module_doc() {
    let mut missing = Vec::new();
    for f in sources() {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        if !first.trim_start().starts_with("//!") {
            missing.push(f.display().to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "files without a leading `//!` doc:\n{}",
        missing.join("\n")
    );
}

#[test]
fn no_ignore_without_reason_and_no_dbg() {
    let mut bad = Vec::new();
    let ignore_bare = ["#", "[ignore]"].concat();
    let dbg_call = ["dbg", "!("].concat();
    for f in sources() {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            if line.trim() == ignore_bare || line.contains(&dbg_call) {
                bad.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
