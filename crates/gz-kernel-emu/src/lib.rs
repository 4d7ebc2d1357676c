//! gz-model's CUDA kernels, run on the CPU: the tests' way to check a kernel's indexing,
//! reductions, barriers and launch geometry on a machine without a GPU.
//!
//! `build.rs` compiles `crates/gz-model/src/kernels/*.cu` unchanged as C++ with a small header of
//! CUDA built-ins (`emu/include/cuda_emu.h`: `threadIdx` and friends, `__syncthreads`,
//! `__shfl_down_sync`, `__shared__`, the `__f*_rn` intrinsics, bf16/f16 conversions), and
//! `emu/runtime.cpp` runs a launch as the GPU would: every block of the grid, each block's
//! threads as cooperative fibers, so barriers and warp shuffles mean what they mean on the GPU
//! and a barrier that not every thread reaches is reported as a deadlock. [`launch`] also
//! refuses grids and blocks beyond CUDA's limits.
//!
//! What it does not model: uninitialised `__shared__` memory (it starts at zero and keeps the
//! previous block's values, so a read before a write goes unseen); truly concurrent blocks
//! (they run one after another; [`Order::Reverse`] shows order-dependent results, not every
//! race); memory spaces and out-of-bounds reads (the tests put guard values around every
//! buffer); the GPU's own float behaviour beyond IEEE f32/f64 (`-ffp-contract=off`: no FMA
//! contraction here, while nvcc contracts outside the `__f*_rn` intrinsics, so results may
//! differ from the GPU's in the last bit); and PTX itself (this is the C++ the PTX is compiled
//! from). It is a test tool: gz-model depends on it only as a dev-dependency.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};

pub mod ffi;

/// Runs `body` once per CUDA thread of a `grid` × `block` launch (block by block, the threads of
/// a block as fibers on the calling thread). `body` is the kernel call (an `unsafe` call of one
/// of [`ffi`]'s functions with the launch's arguments): every thread calls the same kernel with
/// the same arguments, as on the GPU. A panic in `body` ends the launch and is raised again
/// here; each thread's stack is 256 KiB above a guard page (an overflow is a SIGSEGV).
pub fn launch<F: Fn()>(grid: (u32, u32, u32), block: (u32, u32, u32), body: F) -> Result<(), String> {
    launch_in(Order::Forward, grid, block, body)
}

/// The order in which [`launch_in`] runs the blocks of the grid and the threads of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Block (0, 0, 0) first, x fastest; thread 0 first.
    Forward,
    /// The last block first, and the last thread of each block first. A kernel that computes
    /// the same outputs in both orders does not depend on the order of blocks or threads for
    /// them (no two threads writing one element with different values, no block reading what
    /// another writes): the closest the emulator comes to race detection.
    Reverse,
}

/// [`launch`] with the blocks and threads run in `order`.
pub fn launch_in<F: Fn()>(order: Order, grid: (u32, u32, u32), block: (u32, u32, u32), body: F) -> Result<(), String> {
    /// What the fibers call: the body, and the first panic any thread of the launch raised.
    struct Call<'a, F> {
        body: &'a F,
        panic: RefCell<Option<Box<dyn Any + Send>>>,
    }
    extern "C" fn trampoline<F: Fn()>(data: *mut c_void) {
        // SAFETY: `data` is the `&Call<F>` passed to gz_emu_launch below, alive for the whole
        // launch; fibers run one at a time on this thread, so the RefCell is never contended.
        let call = unsafe { &*(data as *const Call<'_, F>) };
        if call.panic.borrow().is_some() {
            return; // after a panic the remaining threads only finish
        }
        // Unwinding must not leave the fiber (C frames above): catch here, re-raise after the
        // launch. Threads waiting at a barrier the panicking one never reaches end the launch
        // as a "deadlock", which the panic then replaces.
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call.body)) {
            *call.panic.borrow_mut() = Some(p);
        }
    }
    let call = Call {
        body: &body,
        panic: RefCell::new(None),
    };
    let g = [grid.0, grid.1, grid.2];
    let b = [block.0, block.1, block.2];
    let mut err = [0 as c_char; 256];
    // SAFETY: g and b are 3-element arrays, `trampoline::<F>` matches `body`'s C type and reads
    // `data` as the `&Call<F>` we pass, which outlives the call; err has the length we pass.
    let rc = unsafe {
        ffi::gz_emu_launch(
            g.as_ptr(),
            b.as_ptr(),
            trampoline::<F>,
            &call as *const Call<'_, F> as *mut c_void,
            c_int::from(order == Order::Reverse),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if let Some(p) = call.panic.into_inner() {
        std::panic::resume_unwind(p);
    }
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: the runtime writes a NUL-terminated message into err (snprintf).
        Err(unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The runtime's own behaviour, with Rust closures as kernels that call its C entry points
    // for thread indices, __syncthreads and shuffles; the real kernels are run by gz-model's
    // `emu_tests` modules.

    #[test]
    fn every_thread_of_every_block_runs_once() {
        use std::cell::RefCell;
        let seen = RefCell::new(Vec::new());
        launch((3, 2, 1), (64, 1, 1), || {
            // SAFETY: reads the emulator's per-thread indices
            let (t, b) = unsafe { (ffi::gz_emu_thread_idx(), ffi::gz_emu_block_idx()) };
            seen.borrow_mut().push((b, t));
        })
        .unwrap();
        let mut seen = seen.into_inner();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 3 * 2 * 64);
    }

    #[test]
    fn reverse_order_runs_the_last_block_and_thread_first() {
        use std::cell::RefCell;
        for (order, first) in [(Order::Forward, (0, 0)), (Order::Reverse, (5, 31))] {
            let seen = RefCell::new(Vec::new());
            launch_in(order, (3, 2, 1), (32, 1, 1), || {
                // SAFETY: reads the emulator's per-thread indices
                let (t, b) = unsafe { (ffi::gz_emu_thread_idx(), ffi::gz_emu_block_idx()) };
                seen.borrow_mut().push((b, t));
            })
            .unwrap();
            let seen = seen.into_inner();
            assert_eq!(seen[0], first, "{order:?}");
            assert_eq!(seen.len(), 6 * 32);
        }
    }

    #[test]
    fn a_panic_in_a_thread_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| {
            launch((2, 1, 1), (64, 1, 1), || {
                // SAFETY: the emulator's per-thread index and __syncthreads, called by every
                // thread but the panicking one (so the others end in a "deadlock")
                unsafe {
                    if ffi::gz_emu_thread_idx() == 5 {
                        panic!("thread 5 failed");
                    }
                    ffi::gz_emu_sync_threads();
                }
            })
        });
        let p = r.expect_err("the panic propagates");
        assert_eq!(p.downcast_ref::<&str>(), Some(&"thread 5 failed"));
    }

    #[test]
    fn limits_are_refused() {
        assert!(launch((1, 70_000, 1), (32, 1, 1), || {}).unwrap_err().contains("grid"));
        assert!(launch((1, 1, 1), (2048, 1, 1), || {}).unwrap_err().contains("block"));
        assert!(launch((0, 1, 1), (32, 1, 1), || {}).unwrap_err().contains("empty"));
    }

    #[test]
    fn a_barrier_not_every_thread_reaches_is_a_deadlock() {
        let e = launch((1, 1, 1), (64, 1, 1), || {
            // SAFETY: the emulator's __syncthreads, called by half the threads
            unsafe {
                if ffi::gz_emu_thread_idx() < 32 {
                    ffi::gz_emu_sync_threads();
                }
            }
        })
        .unwrap_err();
        assert!(e.contains("deadlock"), "{e}");
    }

    #[test]
    fn shuffle_down_sums_a_warp() {
        use std::cell::RefCell;
        let out = RefCell::new(vec![f32::NAN; 64]);
        launch((1, 1, 1), (64, 1, 1), || {
            // SAFETY: the emulator's __shfl_down_sync, called by every thread of each warp
            unsafe {
                let t = ffi::gz_emu_thread_idx();
                let mut v = t as f32;
                let mut o = 16;
                while o > 0 {
                    v += ffi::gz_emu_shfl_down(v, o, 32);
                    o >>= 1;
                }
                out.borrow_mut()[t as usize] = v;
            }
        })
        .unwrap();
        let out = out.into_inner();
        assert_eq!(out[0], (0..32).sum::<u32>() as f32);
        assert_eq!(out[32], (32..64).sum::<u32>() as f32);
    }
}
