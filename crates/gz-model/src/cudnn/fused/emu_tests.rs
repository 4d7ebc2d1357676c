//! The kernels of `src/kernels/bias_relu.cu` run on the CPU (`gz-kernel-emu`) with the launch
//! geometry of [`super::grid`], against the CPU twins of the ops they implement
//! ([`super::BiasRelu`], [`super::BiasReluBwd`], [`super::ReluPoolBwd`], candle's max-pool):
//! the indexing, the per-(channel, split) partial sums and their finish, the shared-memory lane
//! reduction of the channels-last kernels (with channels that divide the block unevenly and with
//! more channels than threads), the small-plane paths, odd map sides and ties in the pooling
//! windows, in f32, bf16 and f16. Every output buffer is checked for out-of-bounds writes and
//! for elements never written. What this cannot show is anything about the GPU itself (see
//! gz-kernel-emu's crate docs); `cuda_*` tests in `cudnn/tests.rs` do that on a device.

use candle_core::{Device, Result, Tensor, WithDType};
use gz_kernel_emu::ffi::Storage;
use half::{bf16, f16};

use super::grid::{self, THREADS};
use super::{BiasRelu, BiasReluBwd, ReluPoolBwd};
use crate::testutil::emu::{run_both, values, worst, Buf};

trait Elem: WithDType + Storage {}
impl<T: WithDType + Storage> Elem for T {}

const BLOCK: (u32, u32, u32) = (THREADS, 1, 1);

fn tensor<T: Elem>(v: &[T], shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
}

fn flat<T: Elem>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

fn of<T: Elem>(v: Vec<f64>) -> Vec<T> {
    v.into_iter().map(T::from_f64).collect()
}

/// The op layout's shape of logical (n, k, h, w).
fn shape(nhwc: bool, (n, k, h, w): (usize, usize, usize, usize)) -> Vec<usize> {
    if nhwc {
        vec![n, h, w, k]
    } else {
        vec![n, k, h, w]
    }
}

fn u(v: usize) -> u32 {
    u32::try_from(v).expect("test sizes fit 32 bits")
}

/// The forward epilogue, both layouts, against [`BiasRelu`]'s CPU path (the same f32 sum and
/// one rounding: equal to the bit).
fn check_fwd<T: Elem>(nhwc: bool, dims: (usize, usize, usize, usize)) -> Result<()> {
    check_fwd_in::<T>(nhwc, false, dims)
}

/// The vectorised channels-last kernels' width for T: (lanes, vectors per row of `k`).
fn vec_of<T: Elem>(k: usize) -> (usize, u32) {
    let lanes = grid::vec_lanes(std::mem::size_of::<T>());
    assert!(
        grid::vec_fits(k, std::mem::size_of::<T>()),
        "{k} channels do not suit the vector kernels"
    );
    (lanes, u(k / lanes))
}

/// [`check_fwd`]; with `vec` (channels-last only) the vectorised kernel.
fn check_fwd_in<T: Elem>(nhwc: bool, vec: bool, dims: (usize, usize, usize, usize)) -> Result<()> {
    let (n, k, h, w) = dims;
    let total = n * k * h * w;
    let z: Vec<T> = of(values(1, total, 2.0));
    let b: Vec<T> = of(values(2, k, 1.0));
    let reference =
        flat::<T>(&tensor(&z, &shape(nhwc, dims))?.apply_op2_no_bwd(&tensor(&b, &[k])?, &BiasRelu { nhwc })?)?;
    let (zb, bb) = (Buf::new(&z), Buf::new(&b));
    let (zp, bp) = (zb.ptr(), bb.ptr());
    let (total32, k32, hw, planes) = (u(total), u(k), u(h * w), u(n * k));
    let flat_kernel = grid::fwd_is_flat(hw, total);
    // the launchers' grid, and for the grid-stride kernels also 3 blocks (they must give the
    // same with any grid, and so the stride loop runs more than once)
    let (lanes, cvec) = if vec { vec_of::<T>(k) } else { (1, 0) };
    let vecs = u(total / lanes);
    let grids = if vec {
        vec![grid::stride4(vecs), (3, 1, 1)]
    } else if nhwc || flat_kernel {
        vec![grid::stride4(total32), (3, 1, 1)]
    } else {
        vec![grid::fwd_planes(planes, hw)]
    };
    for g in grids {
        let mut yb = Buf::<T>::out(total);
        let yp = yb.mut_ptr();
        // SAFETY: the kernels' argument lists, with buffers holding what they read and write
        // for these sizes
        run_both("bias_relu_fwd", g, BLOCK, &mut [&mut yb], || unsafe {
            if vec {
                T::bias_relu_fwd_nhwc_v(zp, bp, yp, vecs, cvec)
            } else if nhwc {
                T::bias_relu_fwd_nhwc(zp, bp, yp, total32, k32)
            } else if flat_kernel {
                T::bias_relu_fwd_flat(zp, bp, yp, total32, k32, hw)
            } else {
                T::bias_relu_fwd(zp, bp, yp, k32, hw)
            }
        });
        let (d, at) = worst(yb.values("y", true), &reference, 1e-30);
        assert!(
            d == 0.0,
            "{dims:?} nhwc {nhwc} vec {vec} grid {g:?}: y differs from the CPU op at {at} by {d}"
        );
    }
    Ok(())
}

/// The backward kernels' common launch, as the CUDA launcher's `packed_backward`: the first
/// kernel (dz and the partials), then the bias-gradient finish. Returns (dz, db).
fn packed<T: Elem>(
    name: &str,
    (grid_dim, splits): ((u32, u32, u32), u32),
    total: usize,
    k: u32,
    first: impl Fn(*mut T, *mut f32),
) -> (Vec<T>, Vec<T>) {
    let mut dz = Buf::<T>::out(total);
    let mut partial = Buf::<f32>::out(k as usize * splits as usize);
    let mut db = Buf::<T>::out(k as usize);
    let (dzp, pp, dbp) = (dz.mut_ptr(), partial.mut_ptr(), db.mut_ptr());
    run_both(name, grid_dim, BLOCK, &mut [&mut dz, &mut partial], || first(dzp, pp));
    partial.values(&format!("{name} partials"), true);
    let pc = pp as *const f32;
    // SAFETY: bias_grad_finish's argument list; `partial` holds k·splits values, db k
    run_both("bias_grad_finish", grid::finish(k), BLOCK, &mut [&mut db], || unsafe {
        T::bias_grad_finish(pc, dbp, k, splits)
    });
    let thread_per_channel = db.values("db", true).to_vec();
    // the block-per-channel finish (`GZ_BIAS_FINISH=wide`) on the same partials: the same sums
    // in another fixed order, so within the f32 rounding of the one from the other
    let mut wide = Buf::<T>::out(k as usize);
    let wp = wide.mut_ptr();
    // SAFETY: bias_grad_finish_wide's argument list, as above
    run_both(
        "bias_grad_finish_wide",
        grid::finish_wide(k),
        BLOCK,
        &mut [&mut wide],
        || unsafe { T::bias_grad_finish_wide(pc, wp, k, splits) },
    );
    let sums: Vec<f64> = (0..k as usize)
        .map(|c| {
            partial.values("partials", true)[c * splits as usize..(c + 1) * splits as usize]
                .iter()
                .map(|v| f64::from(*v).abs())
                .sum()
        })
        .collect();
    for (c, (a, b)) in wide
        .values("db (wide)", true)
        .iter()
        .zip(&thread_per_channel)
        .enumerate()
    {
        let (a, b) = (a.to_f64(), b.to_f64());
        // both round an f32 sum to T: one unit of T's last place apart at most, plus the f32
        // sums' own difference
        let unit = match T::DTYPE {
            candle_core::DType::BF16 => 2f64.powi(-8),
            candle_core::DType::F16 => 2f64.powi(-11),
            _ => 2f64.powi(-24),
        };
        let tol = 2.0 * unit * b.abs() + 1e-5 * sums[c] + 1e-30;
        assert!(
            (a - b).abs() <= tol,
            "{name}: wide finish db[{c}] {a} against {b} (tolerance {tol:e})"
        );
    }
    (dz.values("dz", true).to_vec(), thread_per_channel)
}

/// Compares a packed CPU result [dz, db] with the kernels': dz to the bit; db, per channel,
/// within one unit in the last place of T (both sides round an f32 sum to T) plus 1e-5 of the
/// channel's Σ|dz| (the two f32 sums add in different orders). `channel(i)` is the channel of
/// dz element i.
fn compare<T: Elem>(what: &str, cpu: &Tensor, (dz, db): (&[T], &[T]), channel: impl Fn(usize) -> usize) -> Result<()> {
    let cpu = flat::<T>(cpu)?;
    let total = dz.len();
    let (d, at) = worst(dz, &cpu[..total], 1e-30);
    assert!(d == 0.0, "{what}: dz differs from the CPU op at {at} by {d}");
    let mut abs_sum = vec![0f64; db.len()];
    for (i, v) in cpu[..total].iter().enumerate() {
        abs_sum[channel(i)] += v.to_f64().abs();
    }
    let unit = match T::DTYPE {
        candle_core::DType::BF16 => 2f64.powi(-8),
        candle_core::DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-24),
    };
    for (c, (a, r)) in db.iter().zip(&cpu[total..]).enumerate() {
        let (a, r) = (a.to_f64(), r.to_f64());
        let tol = 2.0 * unit * r.abs() + 1e-5 * abs_sum[c] + 1e-30;
        assert!(
            (a - r).abs() <= tol,
            "{what}: db[{c}] is {a}, the CPU op's {r} (tolerance {tol:e})"
        );
    }
    Ok(())
}

/// A ReLU output: non-negative, about half exact zeros, from a few levels so that 2×2 windows
/// often tie (the pooling backward must route to the first maximum, as the CPU op does).
fn relu_output<T: Elem>(seed: u64, n: usize) -> Vec<T> {
    of(values(seed, n, 1.0)
        .into_iter()
        .map(|v| (v * 4.0).round().max(-1.0).max(0.0) / 2.0 + if v > 0.9 { 0.25 } else { 0.0 })
        .collect())
}

fn check_bwd<T: Elem>(nhwc: bool, dims: (usize, usize, usize, usize)) -> Result<()> {
    check_bwd_in::<T>(nhwc, false, dims)
}

/// [`check_bwd`]; with `vec` (channels-last only) the vectorised kernel.
fn check_bwd_in<T: Elem>(nhwc: bool, vec: bool, dims: (usize, usize, usize, usize)) -> Result<()> {
    let (n, k, h, w) = dims;
    let total = n * k * h * w;
    let y: Vec<T> = relu_output(3, total);
    let dy: Vec<T> = of(values(4, total, 2.0));
    let cpu =
        tensor(&y, &shape(nhwc, dims))?.apply_op2_no_bwd(&tensor(&dy, &shape(nhwc, dims))?, &BiasReluBwd { nhwc })?;
    let (yb, dyb) = (Buf::new(&y), Buf::new(&dy));
    let (yp, dyp) = (yb.ptr(), dyb.ptr());
    let k32 = u(k);
    let (dz, db) = if vec {
        let rows = u(n * h * w);
        let (_, cvec) = vec_of::<T>(k);
        // SAFETY: bias_relu_bwd_nhwc_v's argument list; y, dy and dz hold rows·cvec aligned
        // 16-byte vectors
        packed::<T>(
            "bias_relu_bwd_nhwc_v",
            grid::bwd_nhwc(rows),
            total,
            k32,
            |dz, p| unsafe { T::bias_relu_bwd_nhwc_v(yp, dyp, dz, p, rows, cvec) },
        )
    } else if nhwc {
        let rows = u(n * h * w);
        // SAFETY: bias_relu_bwd_nhwc's argument list; y, dy and dz hold rows·k values
        packed::<T>("bias_relu_bwd_nhwc", grid::bwd_nhwc(rows), total, k32, |dz, p| unsafe {
            T::bias_relu_bwd_nhwc(yp, dyp, dz, p, rows, k32)
        })
    } else {
        let (n32, hw) = (u(n), u(h * w));
        // SAFETY: bias_relu_bwd's argument list; y, dy and dz hold n·k·hw values
        packed::<T>("bias_relu_bwd", grid::bwd(n32, k32), total, k32, |dz, p| unsafe {
            T::bias_relu_bwd(yp, dyp, dz, p, n32, k32, hw)
        })
    };
    compare(
        &format!("bias_relu_bwd {dims:?} nhwc {nhwc} vec {vec}"),
        &cpu,
        (&dz, &db),
        |i| channel_of(nhwc, k, h * w, i),
    )
}

/// The channel of element i of an activation of logical (·, k, ·) with `hw` positions a plane.
fn channel_of(nhwc: bool, k: usize, hw: usize, i: usize) -> usize {
    if nhwc {
        i % k
    } else {
        (i / hw) % k
    }
}

fn check_pool_fwd<T: Elem>(nhwc: bool, dims: (usize, usize, usize, usize)) -> Result<()> {
    check_pool_fwd_in::<T>(nhwc, false, dims)
}

/// [`check_pool_fwd`]; with `vec` (channels-last only) the vectorised kernel.
fn check_pool_fwd_in<T: Elem>(nhwc: bool, vec: bool, dims: (usize, usize, usize, usize)) -> Result<()> {
    let (n, k, h, w) = dims;
    let total = n * k * h * w;
    let pooled = n * k * (h / 2) * (w / 2);
    let z: Vec<T> = of(values(5, total, 2.0));
    let b: Vec<T> = of(values(6, k, 1.0));
    let y_cpu = tensor(&z, &shape(nhwc, dims))?.apply_op2_no_bwd(&tensor(&b, &[k])?, &BiasRelu { nhwc })?;
    let p_cpu = if nhwc {
        y_cpu.permute((0, 3, 1, 2))?.max_pool2d(2)?.permute((0, 2, 3, 1))?
    } else {
        y_cpu.max_pool2d(2)?
    };
    let (zb, bb) = (Buf::new(&z), Buf::new(&b));
    let (zp, bp) = (zb.ptr(), bb.ptr());
    let (n32, k32, h32, w32) = (u(n), u(k), u(h), u(w));
    let cvec = if vec { vec_of::<T>(k).1 } else { 0 };
    let threads = n32 * if vec { cvec } else { k32 } * h32.div_ceil(2) * w32.div_ceil(2);
    let (y_ref, p_ref) = (flat::<T>(&y_cpu)?, flat::<T>(&p_cpu)?);
    // the launcher's grid, and 3 blocks (grid-stride: the same with any grid)
    for g in [grid::pool_fwd(threads), (3, 1, 1)] {
        let (mut yb, mut pb) = (Buf::<T>::out(total), Buf::<T>::out(pooled));
        let (yp, pp) = (yb.mut_ptr(), pb.mut_ptr());
        // SAFETY: the kernels' argument list; z, y hold n·k·h·w values, b k, p n·k·(h/2)·(w/2)
        run_both("bias_relu_pool_fwd", g, BLOCK, &mut [&mut yb, &mut pb], || unsafe {
            if vec {
                T::bias_relu_pool_fwd_nhwc_v(zp, bp, yp, pp, n32, cvec, h32, w32)
            } else if nhwc {
                T::bias_relu_pool_fwd_nhwc(zp, bp, yp, pp, n32, k32, h32, w32)
            } else {
                T::bias_relu_pool_fwd(zp, bp, yp, pp, n32, k32, h32, w32)
            }
        });
        let what = format!("bias_relu_pool_fwd {dims:?} nhwc {nhwc} vec {vec} grid {g:?}");
        let (d, at) = worst(yb.values("y", true), &y_ref, 1e-30);
        assert!(d == 0.0, "{what}: y differs at {at} by {d}");
        let (d, at) = worst(pb.values("p", true), &p_ref, 1e-30);
        assert!(d == 0.0, "{what}: p differs at {at} by {d}");
    }
    Ok(())
}

fn check_pool_bwd<T: Elem>(nhwc: bool, dims: (usize, usize, usize, usize)) -> Result<()> {
    check_pool_bwd_in::<T>(nhwc, false, dims)
}

/// [`check_pool_bwd`]; with `vec` (channels-last only) the vectorised kernel.
fn check_pool_bwd_in<T: Elem>(nhwc: bool, vec: bool, dims: (usize, usize, usize, usize)) -> Result<()> {
    let (n, k, h, w) = dims;
    let total = n * k * h * w;
    let pdims = (n, k, h / 2, w / 2);
    let y: Vec<T> = relu_output(7, total);
    let dp: Vec<T> = of(values(8, n * k * (h / 2) * (w / 2), 2.0));
    let cpu =
        tensor(&y, &shape(nhwc, dims))?.apply_op2_no_bwd(&tensor(&dp, &shape(nhwc, pdims))?, &ReluPoolBwd { nhwc })?;
    let (yb, dpb) = (Buf::new(&y), Buf::new(&dp));
    let (yp, dpp) = (yb.ptr(), dpb.ptr());
    let (n32, k32, h32, w32) = (u(n), u(k), u(h), u(w));
    let cvec = if vec { vec_of::<T>(k).1 } else { 0 };
    let name = if vec {
        "relu_pool_bwd_nhwc_v"
    } else if nhwc {
        "relu_pool_bwd_nhwc"
    } else {
        "relu_pool_bwd"
    };
    let (dz, db) = packed::<T>(name, grid::pool_bwd(n32, k32, h32, w32, nhwc), total, k32, |dz, p| {
        // SAFETY: the kernels' argument list; y and dz hold n·k·h·w values, dp n·k·(h/2)·(w/2)
        // (the vectorised kernel: as many aligned 16-byte vectors of cvec per row)
        unsafe {
            if vec {
                T::relu_pool_bwd_nhwc_v(yp, dpp, dz, p, n32, cvec, h32, w32)
            } else if nhwc {
                T::relu_pool_bwd_nhwc(yp, dpp, dz, p, n32, k32, h32, w32)
            } else {
                T::relu_pool_bwd(yp, dpp, dz, p, n32, k32, h32, w32)
            }
        }
    });
    compare(&format!("{name} {dims:?}"), &cpu, (&dz, &db), |i| {
        channel_of(nhwc, k, h * w, i)
    })
}

/// (n, k, h, w): a small plane (the flat forward), a plane of 1,600 (two chunks per plane), more
/// channels than threads (the channels-last kernels' per-channel loop), channel counts that
/// leave part of the block idle, one channel, more rows than the 2,048 channels-last ranges,
/// and 1×1 maps (the dense layers' (B, F) outputs on the fast path).
const SHAPES: [(usize, usize, usize, usize); 9] = [
    (6, 300, 1, 1),
    (64, 96, 1, 1),
    (3, 5, 7, 6),
    (2, 3, 40, 40),
    (5, 300, 2, 3),
    (2, 96, 3, 5),
    (1, 1, 33, 33),
    (1, 3, 50, 50),
    (4, 32, 9, 9),
];

/// Larger shapes, f32 only: several rows per channels-last range, so that the lanes' row loop
/// (96 channels: 2 lanes) and the more-than-256-channels loop each step more than once.
const LARGE_SHAPES: [(usize, usize, usize, usize); 2] = [(8, 96, 32, 32), (8, 300, 32, 32)];

/// (n, k, h, w) of the pooled layers: odd and even sides, the smallest map, more channels than
/// threads, uneven batch splits (7 images over 4 splits).
const POOL_SHAPES: [(usize, usize, usize, usize); 7] = [
    (2, 5, 7, 6),
    (3, 4, 5, 5),
    (2, 300, 4, 3),
    (1, 3, 40, 40),
    (2, 2, 2, 2),
    (5, 96, 6, 7),
    (7, 300, 4, 4),
];

/// Larger pooled shapes, f32 only: 5,120 window rows, 3 to a channels-last range, 2 lanes.
const LARGE_POOL_SHAPES: [(usize, usize, usize, usize); 1] = [(20, 96, 32, 32)];

#[test]
fn bias_relu_forward_kernels_match_the_cpu_op() -> Result<()> {
    for nhwc in [false, true] {
        for dims in SHAPES {
            check_fwd::<f32>(nhwc, dims)?;
            check_fwd::<bf16>(nhwc, dims)?;
            check_fwd::<f16>(nhwc, dims)?;
        }
    }
    Ok(())
}

#[test]
fn bias_relu_backward_kernels_match_the_cpu_op() -> Result<()> {
    for nhwc in [false, true] {
        for dims in SHAPES {
            check_bwd::<f32>(nhwc, dims)?;
            check_bwd::<bf16>(nhwc, dims)?;
            check_bwd::<f16>(nhwc, dims)?;
        }
        for dims in LARGE_SHAPES {
            check_bwd::<f32>(nhwc, dims)?;
        }
    }
    Ok(())
}

#[test]
fn bias_relu_pool_forward_kernels_match_the_cpu_ops() -> Result<()> {
    for nhwc in [false, true] {
        for dims in POOL_SHAPES {
            check_pool_fwd::<f32>(nhwc, dims)?;
            check_pool_fwd::<bf16>(nhwc, dims)?;
            check_pool_fwd::<f16>(nhwc, dims)?;
        }
        for dims in LARGE_POOL_SHAPES {
            check_pool_fwd::<f32>(nhwc, dims)?;
        }
    }
    Ok(())
}

#[test]
fn relu_pool_backward_kernels_match_the_cpu_op() -> Result<()> {
    for nhwc in [false, true] {
        for dims in POOL_SHAPES {
            check_pool_bwd::<f32>(nhwc, dims)?;
            check_pool_bwd::<bf16>(nhwc, dims)?;
            check_pool_bwd::<f16>(nhwc, dims)?;
        }
        for dims in LARGE_POOL_SHAPES {
            check_pool_bwd::<f32>(nhwc, dims)?;
        }
    }
    Ok(())
}

/// (n, k, h, w) for the vectorised channels-last kernels (k a multiple of 8, so every dtype
/// fits): 1×1 maps (the dense layers), a small map, one bf16 vector a row (all 256 threads as
/// lanes), 256 vectors a row (bf16/f16: one lane; f32 has 512 and is skipped), vector counts
/// that leave part of the block idle (3 bf16, 6 f32, 12), and more rows than the 2,048 ranges.
const VEC_SHAPES: [(usize, usize, usize, usize); 7] = [
    (64, 96, 1, 1),
    (2, 1024, 2, 2),
    (4, 32, 9, 9),
    (2, 8, 40, 40),
    (3, 2048, 2, 3),
    (5, 24, 7, 6),
    (1, 64, 50, 50),
];

/// Pooled shapes for the vectorised kernels: odd and even sides, the smallest map, uneven
/// lanes, 512 channels (64 bf16 vectors, 128 f32), 256 vectors a row (2,048 bf16 channels,
/// 1,024 f32), more window rows than the 2,048 ranges (2,304), and a larger f32 one.
const VEC_POOL_SHAPES: [(usize, usize, usize, usize); 10] = [
    (1, 2048, 2, 3),
    (1, 1024, 3, 3),
    (9, 8, 32, 32),
    (2, 8, 7, 6),
    (3, 16, 5, 5),
    (2, 24, 4, 3),
    (5, 96, 6, 7),
    (7, 512, 4, 4),
    (2, 8, 2, 2),
    (20, 96, 32, 32),
];

/// The pooling-mask kernels ([`super::set_pool_mask`]) for channels-last (n, k, h, w).
/// Forward: p equal to the y-keeping path's (candle's max-pool of the CPU op's y) and the mask
/// equal to [`super::cpu_pool_mask`] of that y, with the launcher's grid and with 3 blocks; z is
/// drawn from a few levels, so windows tie. Backward: from the CPU's mask of a ReLU output with
/// ties and zero windows, dz and db as the y-keeping CPU op gives them ([`compare`]).
fn check_pool_mask<T: Elem>(dims: (usize, usize, usize, usize)) -> Result<()> {
    let (n, k, h, w) = dims;
    let total = n * k * h * w;
    let (oh, ow) = (h / 2, w / 2);
    let pooled = n * k * oh * ow;
    let (n32, k32, h32, w32) = (u(n), u(k), u(h), u(w));
    let cvec = vec_of::<T>(k).1;
    // forward
    let z: Vec<T> = of(values(5, total, 2.0)
        .into_iter()
        .map(|v| (v * 4.0).round() / 4.0)
        .collect());
    let b: Vec<T> = of(values(6, k, 1.0).into_iter().map(|v| (v * 4.0).round() / 4.0).collect());
    let y_cpu = tensor(&z, &shape(true, dims))?.apply_op2_no_bwd(&tensor(&b, &[k])?, &BiasRelu { nhwc: true })?;
    let p_ref = flat::<T>(&y_cpu.permute((0, 3, 1, 2))?.max_pool2d(2)?.permute((0, 2, 3, 1))?)?;
    let mask_ref = super::cpu_pool_mask(&y_cpu)?.flatten_all()?.to_vec1::<u8>()?;
    let (zb, bb) = (Buf::new(&z), Buf::new(&b));
    let (zp, bp) = (zb.ptr(), bb.ptr());
    let threads = n32 * cvec * u(oh) * u(ow);
    for g in [grid::pool_fwd(threads), (3, 1, 1)] {
        let mut pb = Buf::<T>::out(pooled);
        // 0xEE: no mask value, so a byte the kernel never writes fails the comparison
        let mut mb = Buf::<u8>::new(&vec![0xEE; pooled]);
        let (pp, mp) = (pb.mut_ptr(), mb.mut_ptr());
        // SAFETY: the kernel's argument list; z holds n·h·w·k values, b k, p and the mask
        // n·(h/2)·(w/2)·k, all starting 16-byte aligned
        run_both(
            "bias_relu_pool_fwd_mask_nhwc_v",
            g,
            BLOCK,
            &mut [&mut pb, &mut mb],
            || unsafe { T::bias_relu_pool_fwd_mask_nhwc_v(zp, bp, pp, mp, n32, cvec, h32, w32) },
        );
        let what = format!("bias_relu_pool_fwd_mask_nhwc_v {dims:?} grid {g:?}");
        let (d, at) = worst(pb.values("p", true), &p_ref, 1e-30);
        assert!(d == 0.0, "{what}: p differs at {at} by {d}");
        let got = mb.values("mask", false);
        if let Some(i) = got.iter().zip(&mask_ref).position(|(a, b)| a != b) {
            panic!("{what}: mask byte {i} is {}, the CPU's {}", got[i], mask_ref[i]);
        }
    }
    // backward
    let y: Vec<T> = relu_output(7, total);
    let dp: Vec<T> = of(values(8, pooled, 2.0));
    let y_t = tensor(&y, &shape(true, dims))?;
    let pdims = (n, k, oh, ow);
    let cpu = y_t.apply_op2_no_bwd(&tensor(&dp, &shape(true, pdims))?, &ReluPoolBwd { nhwc: true })?;
    let mask = super::cpu_pool_mask(&y_t)?.flatten_all()?.to_vec1::<u8>()?;
    let (mb, dpb) = (Buf::new(&mask), Buf::new(&dp));
    let (mp, dpp) = (mb.ptr(), dpb.ptr());
    let name = "relu_pool_bwd_mask_nhwc_v";
    let (dz, db) = packed::<T>(name, grid::pool_bwd(n32, k32, h32, w32, true), total, k32, |dz, p| {
        // SAFETY: the kernel's argument list; the mask and dp hold n·(h/2)·(w/2)·k values, dz
        // n·h·w·k, all starting 16-byte aligned
        unsafe { T::relu_pool_bwd_mask_nhwc_v(mp, dpp, dz, p, n32, cvec, h32, w32) }
    });
    mb.values("mask", false);
    compare(&format!("{name} {dims:?}"), &cpu, (&dz, &db), |i| i % k)
}

/// The pooling-mask kernels against the CPU for [`VEC_POOL_SHAPES`] (each dtype where the vector
/// kernels take its channels; the largest shape in f32 only).
#[test]
fn pool_mask_kernels_match_the_cpu_ops() -> Result<()> {
    for dims in VEC_POOL_SHAPES {
        let k = dims.1;
        if_fits::<f32>(k, || check_pool_mask::<f32>(dims))?;
        if dims.0 < 20 {
            if_fits::<bf16>(k, || check_pool_mask::<bf16>(dims))?;
            if_fits::<f16>(k, || check_pool_mask::<f16>(dims))?;
        }
    }
    Ok(())
}

/// Runs `check` for T when the vector kernels take `k` channels of it.
fn if_fits<T: Elem>(k: usize, check: impl FnOnce() -> Result<()>) -> Result<()> {
    if grid::vec_fits(k, std::mem::size_of::<T>()) {
        check()
    } else {
        Ok(())
    }
}

/// The vectorised channels-last kernels (`*_nhwc_v_*`) against the same CPU ops, as the scalar
/// ones: every value to the bit, the bias gradient within the sums' rounding.
#[test]
fn vectorised_nhwc_kernels_match_the_cpu_ops() -> Result<()> {
    for dims in VEC_SHAPES {
        let k = dims.1;
        if_fits::<f32>(k, || check_fwd_in::<f32>(true, true, dims))?;
        if_fits::<bf16>(k, || check_fwd_in::<bf16>(true, true, dims))?;
        if_fits::<f16>(k, || check_fwd_in::<f16>(true, true, dims))?;
        if_fits::<f32>(k, || check_bwd_in::<f32>(true, true, dims))?;
        if_fits::<bf16>(k, || check_bwd_in::<bf16>(true, true, dims))?;
        if_fits::<f16>(k, || check_bwd_in::<f16>(true, true, dims))?;
    }
    for dims in VEC_POOL_SHAPES {
        let k = dims.1;
        if_fits::<f32>(k, || check_pool_fwd_in::<f32>(true, true, dims))?;
        if_fits::<f32>(k, || check_pool_bwd_in::<f32>(true, true, dims))?;
        if dims.0 < 20 {
            if_fits::<bf16>(k, || check_pool_fwd_in::<bf16>(true, true, dims))?;
            if_fits::<f16>(k, || check_pool_fwd_in::<f16>(true, true, dims))?;
            if_fits::<bf16>(k, || check_pool_bwd_in::<bf16>(true, true, dims))?;
            if_fits::<f16>(k, || check_pool_bwd_in::<f16>(true, true, dims))?;
        }
    }
    // what the launcher leaves to the scalar kernels
    assert!(!grid::vec_fits(12, 2) && !grid::vec_fits(2048, 4) && grid::vec_fits(2048, 2));
    assert!(!grid::vec_fits(0, 2) && grid::vec_fits(4, 4) && !grid::vec_fits(3, 4));
    Ok(())
}
