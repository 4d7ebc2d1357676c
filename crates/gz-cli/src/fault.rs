//! SIGBUS from a memory-mapped shard: name the file before the process ends.
//!
//! Image shards are memory-mapped. A shard truncated or rewritten in place while gz reads it
//! (or a failing disk or network share under it) makes the next read raise SIGBUS, which ends
//! the process with no message. The handler installed here looks the faulting address up in
//! `gz_shards::mapped` and, if it lies in a shard, says which file failed and what to do; then
//! it restores the previous disposition and returns, so the access faults again and the process
//! ends exactly as before (killed by SIGBUS, exit status 135 in a shell). A fault outside any
//! shard goes straight to the previous handler (Rust's runtime installs one) unchanged, and so
//! does a SIGBUS sent by another process (`kill -BUS`), which the handler raises again.
//!
//! Nothing is lost by ending there: every gz output is staged and renamed, so files are whole
//! or absent, and `gz train --resume` continues from the last finished epoch.

#[cfg(unix)]
mod imp {
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The disposition found at install time, restored by the handler (written once, before
    /// the handler can run).
    static mut PREVIOUS: Option<libc::sigaction> = None;
    static INSTALLED: AtomicBool = AtomicBool::new(false);

    fn say(bytes: &[u8]) {
        // SAFETY: write(2) of a live buffer is async-signal-safe; a short or failed write of a
        // diagnostic is acceptable.
        unsafe {
            libc::write(2, bytes.as_ptr().cast(), bytes.len());
        }
    }

    extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
        // Only async-signal-safe work: an atomic load, slice reads, write(2), sigaction(2),
        // raise(3).
        // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
        let code = unsafe { (*info).si_code };
        // A signal sent by a process (kill, sigqueue, raise: si_code <= 0) is no fault: it has
        // no address (that field holds the sender's pid and uid), and no access runs again to
        // meet the previous disposition, so it is raised again below for that to see.
        let sent = code <= 0;
        // SAFETY: as above; for a SIGBUS the kernel made, si_addr is the faulting address.
        let path = if sent {
            None
        } else {
            gz_shards::mapped::file_at(unsafe { (*info).si_addr() } as usize)
        };
        if let Some(path) = path {
            say(b"\ngz: reading the cache file ");
            say(path);
            say(
                b" failed (SIGBUS): it was truncated or rewritten while gz had it open, \
                  or its disk or network share failed.\n\
                  gz: finished outputs are intact (gz writes files whole or not at all; \
                  `gz train --resume` continues from the last finished epoch); \
                  `gz prep --verify` with the same options checks the cache and rebuilds it if damaged.\n",
            );
        }
        // SAFETY: PREVIOUS was written before the handler was installed and never after;
        // sigaction(2) and raise(3) are async-signal-safe. Returning re-runs the faulting
        // access, which now meets the previous disposition.
        unsafe {
            match &*std::ptr::addr_of!(PREVIOUS) {
                Some(was) => {
                    libc::sigaction(libc::SIGBUS, was, std::ptr::null_mut());
                }
                None => {
                    libc::signal(libc::SIGBUS, libc::SIG_DFL);
                }
            }
            if sent {
                // pending (SIGBUS is blocked in its handler) until this returns, then delivered
                // to the disposition just restored, as if this handler had never been there
                libc::raise(libc::SIGBUS);
            }
        }
    }

    pub fn install() {
        if INSTALLED.swap(true, Ordering::SeqCst) {
            return;
        }
        // SAFETY: called once from main before other threads exist (INSTALLED guards repeats):
        // PREVIOUS is written before the handler that reads it is installed. The sigaction
        // structs are zeroed, then given an emptied mask and an SA_SIGINFO handler whose body
        // only uses async-signal-safe calls.
        unsafe {
            let mut was: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut was) == 0 {
                PREVIOUS = Some(was);
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction =
                on_sigbus as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as libc::sighandler_t;
            // SA_ONSTACK: run on the alternate stack Rust sets up per thread, as its own does
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
                tracing::debug!("cannot install the SIGBUS handler; a damaged shard ends gz silently");
            }
        }
    }
}

/// Installs the SIGBUS handler (for the rest of the process). Call once, early in `main`.
pub fn install() {
    #[cfg(unix)]
    imp::install();
}
