//! `src/kernels/layout.cu` run on the CPU (`gz-kernel-emu`) with the launcher's grid
//! ([`super::grid`]) and with fewer blocks along the batch (so the batch loop steps), against
//! candle's transpose: every value moved to the bit, in f32, bf16 and f16, on sides that are
//! and are not multiples of the 32×32 tile.

use candle_core::{DType, Device, Tensor, WithDType};
use gz_kernel_emu::ffi::{gz_transpose_b16, gz_transpose_b32};
use half::{bf16, f16};

use super::{grid, Transpose};
use crate::testutil::emu::{assert_same_bits, run_both, values, Buf};

/// The kernel for `T`'s width, on `T`'s bits.
///
/// # Safety
/// Only inside an emulator launch, with `src` and `dst` holding batch·rows·cols values.
unsafe fn kernel<T: WithDType>(src: *const T, dst: *mut T, batch: u32, rows: u32, cols: u32) {
    match std::mem::size_of::<T>() {
        4 => unsafe { gz_transpose_b32(src.cast(), dst.cast(), batch, rows, cols) },
        2 => unsafe { gz_transpose_b16(src.cast(), dst.cast(), batch, rows, cols) },
        n => panic!("no transpose kernel for {n}-byte values"),
    }
}

fn check<T: WithDType>(batch: usize, rows: usize, cols: usize) -> candle_core::Result<()> {
    let n = batch * rows * cols;
    let mut x: Vec<T> = values(n as u64 ^ 0x7a, n, 50.0).into_iter().map(T::from_f64).collect();
    // values a float copy could change: -0 and the infinities move as they are
    for (i, v) in [-0.0, f64::INFINITY, f64::NEG_INFINITY].into_iter().enumerate() {
        if i < n {
            x[(i * 7919) % n] = T::from_f64(v);
        }
    }
    let reference = Tensor::from_vec(x.clone(), (batch, rows, cols), &Device::Cpu)?
        .transpose(1, 2)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<T>()?;
    let xb = Buf::new(&x);
    let xp = xb.ptr();
    let (g, block) = grid(batch, rows, cols).expect("a grid");
    let (b32, r32, c32) = (batch as u32, rows as u32, cols as u32);
    for g in [g, (g.0, g.1, g.2.min(2))] {
        let mut yb = Buf::<T>::out(n);
        let yp = yb.mut_ptr();
        // SAFETY: gz_transpose_*'s argument list; x and y hold batch·rows·cols values
        run_both("gz_transpose", g, block, &mut [&mut yb], || unsafe {
            kernel(xp, yp, b32, r32, c32)
        });
        let what = format!(
            "{:?} {batch}×{rows}×{cols} grid {g:?} (reference: candle's transpose)",
            T::DTYPE
        );
        assert_same_bits(&what, yb.values("y", true), &reference);
    }
    Ok(())
}

const SHAPES: [(usize, usize, usize); 7] = [
    (1, 1, 1),
    // a 3-channel NCHW image batch → NHWC, and back
    (2, 3, 35 * 35),
    (2, 35 * 35, 3),
    // both sides off the tile, several tiles each way
    (3, 40, 33),
    (2, 64, 9),
    (5, 1, 70),
    (4, 100, 3),
];

#[test]
fn transpose_kernel_matches_candle_to_the_bit() -> candle_core::Result<()> {
    for (batch, rows, cols) in SHAPES {
        check::<f32>(batch, rows, cols)?;
        check::<bf16>(batch, rows, cols)?;
        check::<f16>(batch, rows, cols)?;
    }
    Ok(())
}

/// The op's CPU side and [`super::transpose`]'s CPU route (candle's permute) agree with
/// candle's transpose, and the NCHW ↔ NHWC helpers are each other's inverse.
#[test]
fn cpu_transposes_agree() -> candle_core::Result<()> {
    for (batch, rows, cols) in SHAPES {
        let x = Tensor::arange(0f32, (batch * rows * cols) as f32, &Device::Cpu)?.reshape((batch, rows, cols))?;
        let want = x.transpose(1, 2)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let xd = x.to_dtype(dtype)?;
            let op = xd.apply_op1_no_bwd(&Transpose)?;
            assert_eq!(op.dims(), &[batch, cols, rows]);
            let via = super::transpose(&xd, batch, rows, cols, &[batch, cols, rows])?;
            let wd = Tensor::from_vec(want.clone(), (batch, cols, rows), &Device::Cpu)?.to_dtype(dtype)?;
            assert_eq!(
                crate::testutil::max_abs_diff(&op, &wd),
                0.0,
                "{dtype:?} {batch}×{rows}×{cols}"
            );
            assert_eq!(
                crate::testutil::max_abs_diff(&via, &wd),
                0.0,
                "{dtype:?} {batch}×{rows}×{cols}"
            );
        }
    }
    let t = Tensor::arange(0f32, 2.0 * 3.0 * 5.0 * 7.0, &Device::Cpu)?.reshape((2, 3, 5, 7))?;
    let nhwc = super::super::nhwc_of(&t)?;
    assert_eq!(nhwc.dims(), &[2, 5, 7, 3]);
    assert_eq!(
        crate::testutil::max_abs_diff(&nhwc, &t.permute((0, 2, 3, 1))?.contiguous()?),
        0.0
    );
    assert_eq!(crate::testutil::max_abs_diff(&super::super::nchw_of(&nhwc)?, &t), 0.0);
    Ok(())
}
