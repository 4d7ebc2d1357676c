//! Ctrl-C and SIGTERM during `gz train`: a request to stop, not a kill.
//!
//! The first SIGINT or SIGTERM only records the signal; the trainer polls it at step
//! boundaries (`TrainObserver::stop_requested`), never inside a checkpoint write, and ends the
//! run with every finished epoch saved, saying where it stopped and how to continue. A second
//! Ctrl-C ends the process at once, as if no handler were installed (the checkpoint files are
//! staged and renamed, so even that loses no finished epoch). Further SIGTERMs change nothing:
//! a supervisor that repeats them gets the same orderly stop.
//!
//! Other subcommands keep the default disposition: their outputs are written to a temporary
//! file and renamed, so a kill leaves nothing half-written.

use std::sync::atomic::{AtomicI32, Ordering};

/// The first signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe calls here: atomics, write(2), signal(2), raise(3).
    if SIGNAL
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
    {
        let msg: &[u8] = if sig == libc::SIGINT {
            b"\ngz: stopping at the end of this training step (Ctrl-C again to quit at once)\n"
        } else {
            b"\ngz: SIGTERM: stopping at the end of this training step\n"
        };
        // SAFETY: writing a static buffer to stderr; the result is irrelevant.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
        }
    } else if sig == libc::SIGINT {
        // SAFETY: restoring the default disposition and re-raising is the documented way to end
        // "as killed by the signal" from a handler.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
}

/// Installs the handler for SIGINT and SIGTERM (for the rest of the process).
pub fn install() {
    #[cfg(unix)]
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with an emptied mask and a handler that only touches
        // atomics and async-signal-safe calls; SA_RESTART keeps blocking I/O from failing with
        // EINTR.
        unsafe {
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
