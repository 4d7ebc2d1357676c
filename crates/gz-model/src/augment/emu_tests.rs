//! `src/kernels/affine.cu` run on the CPU (`gz-kernel-emu`) with the launcher's arguments
//! ([`super::kernels::Resample::kernel_args`]) and grid ([`super::kernels::grid`]), against the
//! candle-ops reference ([`Resample::cpu_reference`]: [`super::affine_sample_ops`], and views +
//! parts for Dieleman's 16 parts): random affines that read outside the image, every storage type, with
//! the tolerances of the CUDA test `cuda_resampling_kernels_match_the_ops`.

use candle_core::{Device, Tensor, WithDType};
use gz_kernel_emu::ffi::Storage;
use half::{bf16, f16};
use rand::SeedableRng;

use super::kernels::{grid, Resample};
use super::{Affine, AugmentConfig};
use crate::testutil::emu::{run_both, values, Buf};

fn check<T: WithDType + Storage>(op: &Resample, x: &Tensor, tol: f64) -> candle_core::Result<()> {
    let x = x.to_dtype(T::DTYPE)?;
    let reference = op.cpu_reference(&x)?;
    let total = reference.elem_count();
    let reference = reference.flatten_all()?.to_vec1::<T>()?;
    let (mats, name, extra) = op.kernel_args();
    let (b, c, h, w) = x.dims4()?;
    let xv = x.flatten_all()?.to_vec1::<T>()?;
    let (xb, mb) = (Buf::new(&xv), Buf::new(&mats));
    let (xp, mp) = (xb.ptr(), mb.ptr());
    let u = |v: usize| u32::try_from(v).expect("test sizes fit 32 bits");
    let (b, c, h, w, e0, e1) = (u(b), u(c), u(h), u(w), u(extra[0]), u(extra[1]));
    let (g, block) = grid(u(total));
    // the launcher's grid, and 3 blocks (grid-stride: the same with any grid)
    for g in [g, (3, 1, 1)] {
        let mut ob = Buf::<T>::out(total);
        let op_ = ob.mut_ptr();
        // SAFETY: the kernels' argument lists; x holds b·c·h·w values, mats 6 per matrix the
        // kernel indexes, out the `total` values of the op's output shape
        run_both(name, g, block, &mut [&mut ob], || unsafe {
            if name == "affine_sample" {
                T::affine_sample(xp, mp, op_, b, c, h, w, e0, e1)
            } else {
                T::dieleman_parts(xp, mp, op_, b, c, h, w, e0, e1)
            }
        });
        let out = ob.values(name, true);
        let (worst, at) = out
            .iter()
            .zip(&reference)
            .map(|(a, r)| (a.to_f64() - r.to_f64()).abs())
            .enumerate()
            .fold((0.0, 0), |(m, at), (i, d)| if d > m { (d, i) } else { (m, at) });
        assert!(
            worst <= tol,
            "{name} {:?} grid {g:?}: differs from the CPU op at {at} by {worst}",
            T::DTYPE
        );
    }
    Ok(())
}

#[test]
fn resampling_kernels_match_the_cpu_ops() -> candle_core::Result<()> {
    let (b, c, h, w) = (3, 3, 40, 36);
    let x = Tensor::from_vec(
        values(31, b * c * h * w, 0.5)
            .into_iter()
            .map(|v| (v + 0.5) as f32)
            .collect::<Vec<_>>(),
        (b, c, h, w),
        &Device::Cpu,
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let cfg = AugmentConfig::default();
    let mats: Vec<Affine> = (0..b).map(|_| cfg.random_affine(w, h, &mut rng)).collect();
    let affine = Resample::Affine {
        mats,
        out_h: 23,
        out_w: 29,
    };
    let (view, part) = (crate::config::DIELEMAN_VIEW, crate::config::DIELEMAN_PART);
    let x2 = x.narrow(0, 0, 2)?.contiguous()?;
    let parts = Resample::DielemanParts {
        mats: crate::nets::dieleman::view_affines(207.0 / 212.0),
        view,
        part,
    };
    for (op, x) in [(&affine, &x), (&parts, &x2)] {
        check::<f32>(op, x, 1e-4)?;
        check::<bf16>(op, x, 1.6e-2)?;
        check::<f16>(op, x, 2e-3)?;
    }
    Ok(())
}
