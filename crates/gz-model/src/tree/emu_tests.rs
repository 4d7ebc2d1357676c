//! `src/kernels/tree.cu` run on the CPU (`gz-kernel-emu`) with the launcher's table
//! ([`super::launch::table`]) and grid ([`super::launch::grid`]), against the candle-ops layer
//! ([`super::TreeOutput::forward_ops`] and its autograd gradient): the kernels' walk of the tree
//! forward and in reverse, on rows of every scale, rows whose questions are all dead, exact zeros
//! (the ReLU subgradient convention), and a row count that leaves the last block part-empty.

use candle_core::{Device, Tensor, Var, WithDType};
use gz_kernel_emu::ffi::TreeStorage;

use super::launch;
use super::{TreeOutput, N_ANSWERS};
use crate::testutil::emu::{run_both, values, worst, Buf};

fn ffi_table(t: &launch::Tree) -> gz_kernel_emu::ffi::Tree {
    gz_kernel_emu::ffi::Tree {
        questions: t.questions,
        answers: t.answers,
        first: t.first,
        len: t.len,
        parent: t.parent,
    }
}

fn check<T: WithDType + TreeStorage>(tol: f64) -> candle_core::Result<()> {
    let tree = TreeOutput::new();
    let plan = tree.plan();
    let table = ffi_table(&launch::table(&plan)?);
    let eps = T::from_f64(plan.eps);
    for (seed, scale) in [(1u64, 0.01), (2, 1.0), (3, 100.0)] {
        let rows = 300; // 3 blocks of 128, the last part-empty
        let mut xv = values(seed, rows * N_ANSWERS, scale);
        // a row with every raw output negative (all questions dead), a row of exact zeros
        for x in &mut xv[..N_ANSWERS] {
            *x = -x.abs() - 0.1;
        }
        for x in &mut xv[N_ANSWERS..2 * N_ANSWERS] {
            *x = 0.0;
        }
        let x: Vec<T> = xv.iter().map(|&v| T::from_f64(v)).collect();
        let w: Vec<T> = values(seed + 10, rows * N_ANSWERS, 1.0)
            .into_iter()
            .map(T::from_f64)
            .collect();
        // the reference: candle's ops and autograd, on the CPU
        let xt = Var::from_tensor(&Tensor::from_vec(x.clone(), (rows, N_ANSWERS), &Device::Cpu)?)?;
        let wt = Tensor::from_vec(w.clone(), (rows, N_ANSWERS), &Device::Cpu)?;
        let y_ref = tree.forward_ops(xt.as_tensor())?;
        let dx_ref = (&y_ref * &wt)?
            .sum_all()?
            .backward()?
            .get(xt.as_tensor())
            .expect("dx")
            .clone();
        let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<T>());
        let (y_ref, dx_ref) = (flat(&y_ref)?, flat(&dx_ref)?);

        let (xb, wb) = (Buf::new(&x), Buf::new(&w));
        let (mut yb, mut dxb) = (Buf::<T>::out(x.len()), Buf::<T>::out(x.len()));
        let (xp, wp, yp, dxp) = (xb.ptr(), wb.ptr(), yb.mut_ptr(), dxb.mut_ptr());
        let (grid, block) = launch::grid(rows as u32);
        // SAFETY: tree_fwd's argument list; x and y hold rows × 37 values
        run_both("tree_fwd", grid, block, &mut [&mut yb], || unsafe {
            T::tree_fwd(xp, yp, rows as u32, table, eps)
        });
        let y = yb.values("y", true).to_vec();
        let yc = yb.ptr();
        // SAFETY: tree_bwd's argument list; x, y, dy and dx hold rows × 37 values
        run_both("tree_bwd", grid, block, &mut [&mut dxb], || unsafe {
            T::tree_bwd(xp, yc, wp, dxp, rows as u32, table, eps)
        });
        let dx = dxb.values("dx", true);
        let (d, at) = worst(&y, &y_ref, 1e-30);
        assert!(
            d <= tol,
            "{:?} scale {scale}: y differs at {at} by {d} (relative)",
            T::DTYPE
        );
        let (d, at) = worst(dx, &dx_ref, 1e-30);
        assert!(
            d <= tol,
            "{:?} scale {scale}: dx differs at {at} by {d} (relative)",
            T::DTYPE
        );
    }
    Ok(())
}

#[test]
fn tree_kernels_match_the_ops() -> candle_core::Result<()> {
    check::<f64>(1e-12)?;
    check::<f32>(2e-5)?;
    Ok(())
}
