//! Host allocator tuning: keep glibc from handing tensor-sized buffers back to the kernel.
//!
//! A CPU training step allocates and frees the same few hundred activation, gradient and
//! im2col buffers every step, from 128 KiB to hundreds of MiB. With glibc's defaults such
//! buffers are `mmap`ed and `munmap`ed each time (or the heap top is trimmed), so every step
//! pays for fresh zeroed pages (page faults, `clear_page`) and for the TLB shootdowns of the
//! unmapping: a profile of `dieleman-tiny` training showed ~20 % of the samples in the kernel
//! there. Raising the `mmap` and trim thresholds to 1 GiB keeps those buffers in the heap for
//! reuse. Peak memory grows somewhat (freed memory stays with the process for the next step,
//! and the heap fragments). Measured in `docs/benchmarks.md` ("Host allocator").
//!
//! Where glibc refuses a threshold that large (older versions cap `M_MMAP_THRESHOLD` at
//! 32 MiB on 64-bit targets), 32 MiB is used. `GZ_MALLOC=system` keeps glibc's defaults (and
//! whatever `GLIBC_TUNABLES` says), for comparisons or tight memory. Only glibc targets are
//! tuned; elsewhere this is a no-op. Buffers allocated by worker threads come from glibc's
//! per-thread arenas, where requests above 64 MiB are `mmap`ed whatever the threshold; a model
//! run allocates its tensors on the main thread (the rayon pool's worker 0 on the CPU, see
//! `main`), which uses glibc's main arena, without that limit. (From the eighth to the
//! fifteenth session the run went to another worker and every thread shared one arena
//! (`M_ARENA_MAX` 1) to keep big buffers in the heap; threads training parts of a batch side by
//! side then queued for that arena's lock.)

/// `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` asked for first.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const THRESHOLD: libc::c_int = 1 << 30;
/// The largest `M_MMAP_THRESHOLD` every glibc accepts on 64-bit targets (`HEAP_MAX_SIZE / 2`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const FALLBACK_MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Applies the tuning unless `GZ_MALLOC=system`; returns the `mmap` threshold set, if any.
/// Call it first in `main`, before any other thread exists.
pub fn tune() -> Option<usize> {
    if std::env::var("GZ_MALLOC").is_ok_and(|v| v == "system") {
        return None;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> Option<usize> {
    // SAFETY: `mallopt` only sets allocator parameters; it returns 0 and changes nothing when
    // it refuses a value. Called before other threads start.
    unsafe {
        if libc::mallopt(libc::M_TRIM_THRESHOLD, THRESHOLD) != 1 {
            return None;
        }
        [THRESHOLD, FALLBACK_MMAP_THRESHOLD]
            .into_iter()
            .find(|&t| libc::mallopt(libc::M_MMAP_THRESHOLD, t) == 1)
            .map(|t| t as usize)
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> Option<usize> {
    None
}

#[cfg(test)]
mod tests {
    /// glibc takes the tuning (this machine's glibc takes the full 1 GiB: if a future one does
    /// not, the fallback must still apply).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_takes_the_tuning() {
        let t = super::apply().expect("mallopt refused both thresholds");
        assert!(t == super::THRESHOLD as usize || t == super::FALLBACK_MMAP_THRESHOLD as usize);
    }
}
