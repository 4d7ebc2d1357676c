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

/// A child process killed (and reaped) when this is dropped: a test that fails while its child
/// runs (a failed assertion, a timeout's panic) leaves nothing running behind it. Without it a
/// long `gz synth --train 100000` or `gz train --epochs 100000` went on for minutes after its
/// test had failed, and one stopped with SIGSTOP stayed for good.
pub struct Running(Option<std::process::Child>);

impl Running {
    /// Starts `cmd`.
    pub fn spawn(cmd: &mut Command) -> Running {
        Running(Some(cmd.spawn().expect("spawn command")))
    }

    /// Waits for the child to end on its own and collects what it printed (as
    /// `Child::wait_with_output`).
    pub fn wait_with_output(mut self) -> std::io::Result<std::process::Output> {
        self.0.take().expect("a running child").wait_with_output()
    }
}

impl std::ops::Deref for Running {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        self.0.as_ref().expect("a running child")
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("a running child")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // (a child that ended already: kill fails, wait reaps it)
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A test that panics while its child runs kills and reaps it on the way out: the process is
/// gone (not even a zombie) once the panic is caught.
#[cfg(unix)]
#[test]
fn a_running_child_is_killed_when_its_test_fails() {
    let child = Running::spawn(Command::new("sleep").arg("30"));
    let pid = child.id() as libc::pid_t;
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _child = child;
        panic!("(expected) a test failing while its child runs");
    }));
    assert!(failed.is_err());
    // SAFETY: kill(2) with signal 0 only asks whether the process exists
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    if exists {
        // SAFETY: the child this test started
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(!exists, "the failed test's child {pid} still runs");
}
