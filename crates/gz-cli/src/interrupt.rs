//! Ctrl-C and SIGTERM during `gz train`: a request to stop, not a kill.
//!
//! The first SIGINT or SIGTERM only records the signal; the trainer polls it at step
//! boundaries (`TrainObserver::stop_requested`), never inside a checkpoint write, and ends the
//! run with every finished epoch saved, saying where it stopped and how to continue. A second
//! Ctrl-C (SIGINT) ends the process at once, as if no handler were installed (the checkpoint
//! files are staged and renamed, so even that loses no finished epoch). SIGTERMs change nothing
//! after the first signal: a supervisor that repeats them, or `cargo xtask` passing a Ctrl-C on,
//! gets the same orderly stop. A signal gz was started with ignored stays ignored.
//!
//! Other subcommands keep the default disposition: their outputs are written to a temporary
//! file and renamed, so a kill leaves nothing half-written.

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

/// The first signal received (0: none), and how many SIGINTs came.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static SIGINTS: AtomicU32 = AtomicU32::new(0);

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe calls here: atomics, write(2), signal(2), raise(3).
    if sig == libc::SIGINT && SIGINTS.fetch_add(1, Ordering::SeqCst) >= 1 {
        // the second Ctrl-C (SIGTERMs between do not count: `cargo xtask` passes a Ctrl-C on as
        // SIGTERM while the terminal's reaches gz too)
        // SAFETY: restoring the default disposition and re-raising is the documented way to end
        // "as killed by the signal" from a handler.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return;
    }
    if SIGNAL
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
    {
        // (the same words for both: `cargo xtask` passes a Ctrl-C on as SIGTERM)
        let msg: &[u8] = b"\ngz: stopping before the next training step (Ctrl-C again to quit at once)\n";
        // SAFETY: writing a static buffer to stderr; the result is irrelevant.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
        }
    }
}

/// Installs the handler for SIGINT and SIGTERM (for the rest of the process).
pub fn install() {
    #[cfg(unix)]
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: reading the disposition into a zeroed sigaction; then a zeroed sigaction with
        // an emptied mask and a handler that only touches atomics and async-signal-safe calls;
        // SA_RESTART keeps blocking I/O from failing with EINTR.
        unsafe {
            // a signal gz was started with ignored (a background job's SIGINT) stays ignored
            let mut was: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut was) == 0 && was.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                tracing::warn!(sig, "cannot install the stop handler; the signal will kill gz at once");
            }
        }
    }
}

/// The signal that asked to stop, if any.
pub fn requested() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}
