//! Ctrl-C and SIGTERM during `gz train`: a request to stop, not a kill.
//!
//! The first SIGINT or SIGTERM only records the signal; the trainer polls it at step
//! boundaries (`TrainObserver::stop_requested`), never inside a checkpoint write, and ends the
//! run with every finished epoch saved, saying where it stopped and how to continue. A second
//! Ctrl-C (SIGINT) ends the process at once, as if no handler were installed (the checkpoint
//! files are staged and renamed, so even that loses no finished epoch). SIGTERMs change nothing
//! after the first signal: a supervisor that repeats them, or `cargo xtask` passing a Ctrl-C on,
//! gets the same orderly stop (and a shell's `kill %1` or a service manager signals xtask and gz
//! together, so gz sees two SIGTERMs for one request). A signal gz was started with ignored
//! stays ignored.
//!
//! The line the first signal prints says what ends gz at once from there: after a Ctrl-C,
//! another Ctrl-C; after a SIGTERM, two Ctrl-Cs (SIGINTs are counted from the first), or nothing
//! when SIGINT is ignored. Under `cargo xtask` a terminal's Ctrl-C reaches gz as SIGINT before
//! xtask's SIGTERM (the terminal signals the whole process group before xtask's handler runs,
//! and of two pending signals the lower-numbered SIGINT is delivered first), so that run prints
//! the Ctrl-C line; were the SIGTERM first, "Ctrl-C twice" would still end it (the press's own
//! SIGINT is the first of the two).
//!
//! `gz prep` installs the same handler ([`install_for_prep`]): the run stops after the chunk of
//! images being decoded and removes its unfinished cache (killed, it left a hidden
//! `.NAME.tmp-PID` folder that only the next prep or prune removed), then exits with 128 + the
//! signal. Other subcommands keep the default disposition: their outputs are written to a
//! temporary file and renamed, so a kill leaves nothing half-written.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};

/// The first signal received (0: none), and how many SIGINTs came.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static SIGINTS: AtomicU32 = AtomicU32::new(0);
/// Whether SIGINT goes to the handler (not ignored since gz started).
static SIGINT_CAUGHT: AtomicBool = AtomicBool::new(false);
/// Whether the handler serves `gz prep` (its own stop line).
static PREP: AtomicBool = AtomicBool::new(false);

/// The signals the handler is installed for (bit 0 SIGINT, bit 1 SIGTERM).
static INSTALLED: AtomicU32 = AtomicU32::new(0);

/// The line the first stop request prints (see the module docs).
fn stop_message(sig: i32, sigint_caught: bool, prep: bool) -> &'static [u8] {
    if prep {
        return if sig == libc::SIGINT {
            b"\ngz: stopping after the images being decoded; the unfinished cache is removed (Ctrl-C again to \
              quit at once)\n"
        } else if sigint_caught {
            b"\ngz: SIGTERM: stopping after the images being decoded; the unfinished cache is removed (further \
              SIGTERMs change nothing; Ctrl-C twice quits at once)\n"
        } else {
            b"\ngz: SIGTERM: stopping after the images being decoded; the unfinished cache is removed (further \
              SIGTERMs change nothing)\n"
        };
    }
    if sig == libc::SIGINT {
        b"\ngz: stopping before the next training step (Ctrl-C again to quit at once)\n"
    } else if sigint_caught {
        b"\ngz: SIGTERM: stopping before the next training step (further SIGTERMs change nothing; Ctrl-C twice \
          quits at once)\n"
    } else {
        b"\ngz: SIGTERM: stopping before the next training step (further SIGTERMs change nothing)\n"
    }
}

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
        let msg = stop_message(sig, SIGINT_CAUGHT.load(Ordering::SeqCst), PREP.load(Ordering::SeqCst));
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
            } else {
                INSTALLED.fetch_or(if sig == libc::SIGINT { 1 } else { 2 }, Ordering::SeqCst);
                if sig == libc::SIGINT {
                    SIGINT_CAUGHT.store(true, Ordering::SeqCst);
                }
            }
        }
    }
}

/// [`install`] for `gz prep`, with its own stop line.
pub fn install_for_prep() {
    PREP.store(true, Ordering::SeqCst);
    install();
}

/// Puts back the default disposition of the signals [`install`] took, so that from here a
/// signal ends gz at once (`gz prep` after its decoding: nothing polls for a stop any more, and
/// what is left, the summary or `--verify`'s read-only pass, loses nothing to a kill). A signal
/// already received stays in [`requested`].
pub fn restore_default() {
    #[cfg(unix)]
    for (bit, sig) in [(1, libc::SIGINT), (2, libc::SIGTERM)] {
        if INSTALLED.fetch_and(!bit, Ordering::SeqCst) & bit != 0 {
            // SAFETY: the default disposition is always valid.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
            }
            if sig == libc::SIGINT {
                SIGINT_CAUGHT.store(false, Ordering::SeqCst);
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

#[cfg(all(test, unix))]
mod tests {
    use super::stop_message;

    /// Each stop line names the signal's own way out: another Ctrl-C after a Ctrl-C; after a
    /// SIGTERM, two Ctrl-Cs, or nothing when SIGINT is ignored; for training and for prep.
    #[test]
    fn stop_lines_say_what_ends_gz_at_once() {
        for prep in [false, true] {
            let what = if prep {
                "the unfinished cache is removed"
            } else {
                "next training step"
            };
            let line = |sig, caught| String::from_utf8_lossy(stop_message(sig, caught, prep)).into_owned();
            let int = line(libc::SIGINT, true);
            assert!(
                int.contains(what) && int.contains("Ctrl-C again") && !int.contains("SIGTERM"),
                "{int}"
            );
            let term = line(libc::SIGTERM, true);
            assert!(
                term.contains(what) && term.contains("SIGTERM") && term.contains("Ctrl-C twice"),
                "{term}"
            );
            let term = line(libc::SIGTERM, false);
            assert!(term.contains(what) && !term.contains("Ctrl-C"), "{term}");
        }
    }
}
