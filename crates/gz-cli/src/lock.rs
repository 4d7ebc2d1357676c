//! Folder locks of the gz commands that write a folder's files one by one: `gz synth`'s output
//! folder (`.gz-synth.lock`) and `gz eval`'s report folder (`.gz-eval.lock`).
//!
//! The lock is an exclusive `flock` on a file in the folder, taken before the folder is inspected
//! and held until the command's files are all written. A second writer into the same folder is
//! refused naming the folder and the first one's process, instead of removing or overwriting its
//! files. The file holds the holder's process id (for that message) and is removed when the
//! lock is dropped; a killed holder leaves the file, but its lock ends with it, so the file
//! blocks nobody. A Ctrl-C or SIGTERM (of a command that asked for it,
//! [`FolderLock::remove_on_signal`]) removes the file and the folders the lock made while they
//! are empty before the process ends by that signal, as it would have without the lock. Where
//! the file cannot be created (a read-only folder: this command cannot
//! write there either) or the file system has no locks, the command goes on without one, as it
//! did before there were locks.

use std::path::{Path, PathBuf};

#[cfg(unix)]
use anyhow::{bail, Context as _};

/// Who takes a lock, for its messages.
#[cfg_attr(not(unix), allow(dead_code, reason = "read by the flock messages only"))]
pub struct Holder<'a> {
    /// The command, as the messages name it: `gz synth`.
    pub command: &'a str,
    /// What the holder does in the folder, after "is": `writing into it`.
    pub doing: &'a str,
    /// What the refused run may do instead, after "wait for it to finish or".
    pub instead: &'a str,
}

/// A held folder lock (released, and its file removed, when dropped).
#[cfg_attr(not(unix), allow(dead_code, reason = "never made where there is no flock"))]
pub struct FolderLock {
    path: PathBuf,
    /// The folders taking the lock created, deepest first (`dir` and the missing folders above
    /// it): removed again on drop while empty (a command refused after the lock leaves no empty
    /// folders behind).
    created: Vec<PathBuf>,
    /// The open file the lock is held on (closing it releases the lock).
    _file: std::fs::File,
}

impl FolderLock {
    /// Creates `dir` if missing and takes its lock `name`, or fails naming `dir` and the process
    /// that holds it. `Ok(None)`: no lock could be had, and nothing says another run holds one.
    #[cfg(unix)]
    pub fn take(dir: &Path, name: &str, who: &Holder<'_>) -> anyhow::Result<Option<FolderLock>> {
        use std::io::Write as _;
        use std::os::unix::fs::MetadataExt as _;
        use std::os::unix::io::AsRawFd as _;

        // (`reports/x` when neither exists: both are made, and both go if unused)
        let created: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|a| !a.as_os_str().is_empty() && a.symlink_metadata().is_err())
            .map(Path::to_path_buf)
            .collect();
        let path = dir.join(name);
        let give_up = |created: &[PathBuf]| remove_empty(created);
        for _ in 0..10 {
            // (again in each round: the holder before this one removes a folder it made as it
            // ends, between this run's making it and opening the file)
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let file = match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
            {
                Ok(f) => f,
                // a folder this process cannot write into: it cannot clash with another writer
                // (writing fails later with its own message)
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc::EROFS) => {
                    return Ok(None)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    give_up(&created);
                    return Err(e).with_context(|| format!("creating the lock file {}", path.display()));
                }
            };
            // SAFETY: flock(2) on a descriptor this function owns; no memory is passed.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::WouldBlock {
                    let pid = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|t| t.trim().parse::<u32>().ok());
                    let command = who.command;
                    let holder = pid.map_or(format!("another {command}"), |p| {
                        format!("another {command} (process {p})")
                    });
                    bail!(
                        "{} is in use: {holder} is {}; wait for it to finish or {}",
                        dir.display(),
                        who.doing,
                        who.instead
                    );
                }
                // a file system without locks (some network shares): as before there was a lock
                eprintln!(
                    "{}: warning: cannot lock {} ({err}); going on unprotected from another {} writing into {} at \
                     the same time",
                    who.command,
                    path.display(),
                    who.command,
                    dir.display()
                );
                drop(file);
                let _ = std::fs::remove_file(&path);
                return Ok(None);
            }
            // the holder before this one removes the file as it finishes: a lock taken on the
            // removed file (opened just before) guards nothing, so open the name again
            let same = match (file.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if !same {
                continue;
            }
            let mut file = file;
            if let Err(e) = file
                .set_len(0)
                .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            {
                let _ = std::fs::remove_file(&path);
                give_up(&created);
                return Err(e).with_context(|| format!("writing the lock file {}", path.display()));
            }
            return Ok(Some(FolderLock {
                path,
                created,
                _file: file,
            }));
        }
        bail!(
            "could not lock {}: other {} runs keep starting and ending in {}",
            path.display(),
            who.command,
            dir.display()
        )
    }

    /// No `flock` here: the folder is created and nothing is locked.
    #[cfg(not(unix))]
    pub fn take(dir: &Path, _name: &str, _who: &Holder<'_>) -> anyhow::Result<Option<FolderLock>> {
        use anyhow::Context as _;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(None)
    }
}

/// What a SIGINT or SIGTERM removes before the process ends ([`FolderLock::remove_on_signal`]):
/// slot 0 the lock file, then the folders the lock made, deepest first; leaked C strings, null
/// when empty. Whoever swaps a pointer out owns it (the handler uses it, `Drop` frees it).
#[cfg(unix)]
static ON_SIGNAL: [std::sync::atomic::AtomicPtr<std::ffi::c_char>; 9] =
    [const { std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()) }; 9];

/// The handler: `unlink` and `rmdir` (both async-signal-safe) of what [`ON_SIGNAL`] holds, then
/// the signal again with its default action, so the process ends as it would have.
#[cfg(unix)]
extern "C" fn remove_and_reraise(sig: libc::c_int) {
    use std::sync::atomic::Ordering;
    let mut folders_go = true;
    for (i, slot) in ON_SIGNAL.iter().enumerate() {
        let p = slot.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if p.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated path leaked by `remove_on_signal`, owned here now
        if i == 0 {
            unsafe { libc::unlink(p) };
        } else if folders_go {
            // (a folder with files in it stays, and so do those above it)
            folders_go = unsafe { libc::rmdir(p) } == 0;
        }
    }
    // SAFETY: restoring the default action and raising the signal again, both async-signal-safe
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Empties [`ON_SIGNAL`], freeing what it held.
#[cfg(unix)]
fn clear_on_signal() {
    for slot in &ON_SIGNAL {
        let p = slot.swap(std::ptr::null_mut(), std::sync::atomic::Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: made by `CString::into_raw` in `remove_on_signal`, swapped out here only
            drop(unsafe { std::ffi::CString::from_raw(p) });
        }
    }
}

impl FolderLock {
    /// Lets a Ctrl-C or SIGTERM remove the lock file and the empty folders the lock made before
    /// the process ends by that signal (an interrupted `gz eval` into a new folder left the
    /// folder and a lock file holding no lock). For commands with no handler of their own
    /// (`gz train` and `gz prep` stop in order instead); a signal the process ignores stays
    /// ignored.
    pub fn remove_on_signal(&self) {
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt as _;
            clear_on_signal();
            let paths = std::iter::once(&self.path).chain(&self.created).take(ON_SIGNAL.len());
            for (slot, p) in ON_SIGNAL.iter().zip(paths) {
                if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) {
                    slot.store(c.into_raw(), std::sync::atomic::Ordering::SeqCst);
                }
            }
            for sig in [libc::SIGINT, libc::SIGTERM] {
                // SAFETY: reading the current disposition, then installing a handler that only
                // makes async-signal-safe calls, for a signal that is not ignored
                unsafe {
                    let mut old: libc::sigaction = std::mem::zeroed();
                    if libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction != libc::SIG_IGN {
                        let mut act: libc::sigaction = std::mem::zeroed();
                        act.sa_sigaction = remove_and_reraise as *const () as libc::sighandler_t;
                        libc::sigemptyset(&mut act.sa_mask);
                        libc::sigaction(sig, &act, std::ptr::null_mut());
                    }
                }
            }
        }
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // the signal's removal first: from here this drop removes what it would have
        #[cfg(unix)]
        clear_on_signal();
        // removed while still locked (the lock goes with the file handle, after this): a run
        // that opened the file just before gets the lock on a removed file, sees that the name
        // no longer leads to it and opens the name again; best effort
        let _ = std::fs::remove_file(&self.path);
        remove_empty(&self.created);
    }
}

/// Removes `folders` (deepest first) while they are empty: a folder this command wrote into
/// stays, and so do those above it.
#[cfg_attr(not(unix), allow(dead_code, reason = "never made where there is no flock"))]
fn remove_empty(folders: &[PathBuf]) {
    for d in folders {
        if std::fs::remove_dir(d).is_err() {
            break;
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    const WHO: Holder<'static> = Holder {
        command: "gz test",
        doing: "writing into it",
        instead: "choose another folder",
    };

    /// A second lock of the same folder is refused naming the first holder's process (flock
    /// locks belong to open files, so one process's two opens clash as two processes' do); once
    /// the first is dropped its file is gone and the folder can be locked again.
    #[test]
    fn a_held_folder_is_refused_and_freed_on_drop() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("out");
        let first = FolderLock::take(&dir, ".x.lock", &WHO).unwrap().expect("a lock");
        assert_eq!(
            std::fs::read_to_string(dir.join(".x.lock")).unwrap().trim(),
            std::process::id().to_string()
        );
        let err = FolderLock::take(&dir, ".x.lock", &WHO).err().expect("refused");
        assert_eq!(
            err.to_string(),
            format!(
                "{} is in use: another gz test (process {}) is writing into it; wait for it to finish or choose \
                 another folder",
                dir.display(),
                std::process::id()
            )
        );
        // another lock name in the same folder is another lock
        let other = FolderLock::take(&dir, ".y.lock", &WHO).unwrap();
        assert!(other.is_some());
        drop(other);
        std::fs::write(dir.join("kept"), b"a file of the command's").unwrap();
        drop(first);
        assert!(!dir.join(".x.lock").exists(), "the lock file goes with the lock");
        assert!(dir.join("kept").exists(), "a folder written into stays");
        assert!(FolderLock::take(&dir, ".x.lock", &WHO).unwrap().is_some());
    }

    /// A folder the lock created is removed with it when nothing was written there (a command
    /// refused after taking its lock leaves no empty folder); one that existed stays.
    #[test]
    fn a_folder_made_for_the_lock_alone_goes_with_it() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("new");
        drop(FolderLock::take(&dir, ".x.lock", &WHO).unwrap());
        assert!(!dir.exists(), "the empty folder made for the lock is left");
        // and the folders made above it, up to the first that was there
        let deep = t.path().join("a/b/c");
        drop(FolderLock::take(&deep, ".x.lock", &WHO).unwrap());
        assert!(!t.path().join("a").exists(), "folders made above the lock's are left");
        // one written into stays, with those above it
        let lock = FolderLock::take(&deep, ".x.lock", &WHO).unwrap();
        std::fs::write(t.path().join("a/b/note"), b"kept").unwrap();
        drop(lock);
        assert!(!deep.exists() && t.path().join("a/b/note").exists());
        std::fs::create_dir(&dir).unwrap();
        drop(FolderLock::take(&dir, ".x.lock", &WHO).unwrap());
        assert!(dir.is_dir(), "a folder that was there before is removed");
    }

    /// A killed holder's file (no lock on it) blocks nobody.
    #[test]
    fn a_left_lock_file_without_a_lock_is_taken() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join(".x.lock"), "4242\n").unwrap();
        let lock = FolderLock::take(t.path(), ".x.lock", &WHO).unwrap();
        assert!(lock.is_some());
    }
}
