//! Helpers shared by the integration tests: temp dirs, the `gz` binary, fixture paths.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (parent of `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `../shared/fixtures/` beside the repository.
pub fn fixtures() -> PathBuf {
    workspace_root().join("../shared/fixtures")
}

/// A fresh temporary directory, removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create temp dir")
}

/// Path of the `gz` binary, built once (debug profile) for the whole test run.
pub fn gz_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = workspace_root();
            let status = Command::new(env!("CARGO"))
                .args(["build", "--quiet", "-p", "gz-cli", "--bin", "gz"])
                .current_dir(&root)
                .status()
                .expect("run cargo build");
            assert!(status.success(), "building gz failed");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            target.join("debug").join(format!("gz{}", std::env::consts::EXE_SUFFIX))
        })
        .clone()
}

/// A `Command` for the `gz` binary.
pub fn gz() -> Command {
    Command::new(gz_bin())
}

/// Run a command, returning (status success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("spawn command");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
