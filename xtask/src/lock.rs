//! One `cargo xtask` at a time in a root: `<root>/.xtask.lock`, held with `flock` from the first
//! stage that runs gz until xtask exits.
//!
//! Two pipelines in one root would write the same stamps (through the same temporary names),
//! the same run folder and the same reports; gz's own locks (`gz synth`'s output folder,
//! `gz train`'s run folder) refuse only some of that, and only once a stage has started. The
//! file holds the holder's process id for the message of the run that is refused; it is never
//! removed (so no second run can lock a file that is being deleted), and a killed holder's lock
//! ends with it. Where the file system has no locks (some network shares) xtask warns and goes
//! on unprotected, as before this lock existed.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The lock file's name in the root.
pub const LOCK_FILE: &str = ".xtask.lock";

/// The roots this process holds, with the open files that hold them.
static HELD: Mutex<Vec<(PathBuf, std::fs::File)>> = Mutex::new(Vec::new());

/// Takes `root`'s lock for the rest of this process (creating `root` if missing), or fails
/// naming the `cargo xtask` that holds it. Taking it again is a no-op.
pub fn hold(root: &Path) -> Result<()> {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    if held.iter().any(|(r, _)| r == root) {
        return Ok(());
    }
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let path = root.join(LOCK_FILE);
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
    {
        Ok(f) => f,
        // a root this process cannot write into (mounted read-only, another user's): no second
        // xtask can write there either, and a pipeline that is up to date still says so (it
        // stopped "at synth" on the lock file); a stage that must write fails with its own error
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied || is_read_only(&e) => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("creating the lock file {}", path.display())),
    };
    match try_lock(&file) {
        Ok(true) => {}
        Ok(false) => {
            let who = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
                .map_or("another `cargo xtask`".to_string(), |p| {
                    format!("another `cargo xtask` (process {p})")
                });
            bail!(
                "{} is in use: {who} is running stages there, and two would write the same stamps, runs and \
                 reports; wait for it to finish, or give this one another --root",
                root.display()
            );
        }
        Err(e) => {
            eprintln!(
                "xtask: warning: cannot lock {} ({e}); going on unprotected from another `cargo xtask` in {}",
                path.display(),
                root.display()
            );
            held.push((root.to_path_buf(), file));
            return Ok(());
        }
    }
    let mut f = &file;
    f.set_len(0)
        .and_then(|()| std::io::Write::write_all(&mut f, format!("{}\n", std::process::id()).as_bytes()))
        .with_context(|| format!("writing the lock file {}", path.display()))?;
    held.push((root.to_path_buf(), file));
    Ok(())
}

/// Whether `e` is a read-only file system's refusal (EROFS).
fn is_read_only(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    return e.raw_os_error() == Some(libc::EROFS);
    #[cfg(not(unix))]
    false
}

/// `Ok(false)`: another open file holds the lock.
#[cfg(unix)]
fn try_lock(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd as _;
    // SAFETY: flock(2) on a descriptor `file` owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.kind() == std::io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(err)
    }
}

/// No `flock` here: nothing is locked.
#[cfg(not(unix))]
fn try_lock(_file: &std::fs::File) -> std::io::Result<bool> {
    Ok(true)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A root this process cannot write into is no refusal (a pipeline that is up to date
    /// there still says so; it stopped on the lock file). Root ignores the mode bits, so the
    /// check runs only for another user.
    #[test]
    fn an_unwritable_root_is_not_an_error() {
        use std::os::unix::fs::PermissionsExt as _;
        // SAFETY: geteuid(2) cannot fail and touches no memory
        if unsafe { libc::geteuid() } == 0 {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("ro");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o555)).unwrap();
        let held = hold(&root);
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        held.unwrap();
        assert!(!root.join(LOCK_FILE).exists());
    }

    /// A root whose lock another open file holds is refused, naming the holder's process; once
    /// that file is closed, the root is taken (and taking it twice is fine).
    #[test]
    fn a_root_held_by_another_xtask_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let other = std::fs::File::create(root.join(LOCK_FILE)).unwrap();
        assert!(try_lock(&other).unwrap());
        std::fs::write(root.join(LOCK_FILE), "4242\n").unwrap();
        let e = format!("{:#}", hold(&root).unwrap_err());
        assert!(
            e.contains("is in use") && e.contains("(process 4242)") && e.contains("--root"),
            "{e}"
        );
        drop(other);
        // another test of this binary that spawns a process at this moment holds a copy of
        // `other`'s descriptor (and so its lock) between its fork and its exec: retry briefly
        let start = std::time::Instant::now();
        while let Err(e) = hold(&root) {
            assert!(start.elapsed().as_secs() < 10, "{e:#}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        hold(&root).unwrap();
        let pid = std::fs::read_to_string(root.join(LOCK_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        // and now this process's lock refuses another open file
        let again = std::fs::File::open(root.join(LOCK_FILE)).unwrap();
        assert!(!try_lock(&again).unwrap());
    }
}
