//! `src/kernels/dropout.cu` run on the CPU (`gz-kernel-emu`) with the launcher's grid
//! ([`super::grid`]) and on a 3-block grid, against the op's CPU path: the same hash, so the
//! same elements are kept and the values agree to the bit, in f32, bf16 and f16.

use candle_core::{Device, Tensor, WithDType};
use gz_kernel_emu::ffi::Storage;
use half::{bf16, f16};

use super::{grid, Dropout};
use crate::testutil::emu::{assert_same_bits, run_both, values, Buf};

fn check<T: WithDType + Storage>(n: usize, p: f32, seed: u64) -> candle_core::Result<()> {
    let x: Vec<T> = values(seed ^ 0x55, n, 3.0).into_iter().map(T::from_f64).collect();
    let op = Dropout::new(p, seed);
    let reference = Tensor::from_vec(x.clone(), n, &Device::Cpu)?
        .apply_op1_no_bwd(&op)?
        .to_vec1::<T>()?;
    let xb = Buf::new(&x);
    let xp = xb.ptr();
    let n64 = n as u64;
    let (g, block) = grid(n64);
    for g in [g, (3, 1, 1)] {
        let mut yb = Buf::<T>::out(n);
        let yp = yb.mut_ptr();
        // SAFETY: gz_dropout's argument list; x and y hold n values
        run_both("gz_dropout", g, block, &mut [&mut yb], || unsafe {
            T::dropout(xp, yp, n64, op.seed, op.threshold, op.scale)
        });
        let what = format!("{:?} p {p} grid {g:?}", T::DTYPE);
        assert_same_bits(&what, yb.values("y", true), &reference);
    }
    Ok(())
}

#[test]
fn dropout_kernel_matches_the_cpu_op_to_the_bit() -> candle_core::Result<()> {
    for (n, p, seed) in [
        (1, 0.5, 3),
        (1000, 0.5, 11),
        (4099, 0.1, u64::MAX),
        (70_000, 0.8, 1 << 40),
    ] {
        check::<f32>(n, p, seed)?;
        check::<bf16>(n, p, seed)?;
        check::<f16>(n, p, seed)?;
    }
    Ok(())
}
