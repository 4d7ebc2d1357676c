//! `kernels/im2col.cu` run on the CPU (`gz-kernel-emu`) with the launchers' grids (and a small
//! grid, so the grid-stride loops run more than once), against plain loops: the unfolding of
//! channels-last images (padding, odd sides, 1 to 8 channels, taps padded to a multiple of 8)
//! and the column copy, in f32, bf16 and f16, every output checked for unwritten values and
//! out-of-bounds writes. Then the layer itself as the CUDA path computes it: the emulator's `P`
//! times the padded filter matrix, and `dZᵀ P`, against candle's convolution and its filter
//! gradient (f32), which pins the column order to the channels-last (K, R, S, C) filters and the
//! product to cross-correlation.

use candle_core::{Device, Result, Tensor, Var, WithDType};
use gz_kernel_emu::ffi::Storage;
use half::{bf16, f16};

use super::cols_for;
use super::grid::{self, THREADS};
use crate::testutil::emu::{run_both, values, Buf};

trait Elem: WithDType + Storage {}
impl<T: WithDType + Storage> Elem for T {}

const BLOCK: (u32, u32, u32) = (THREADS, 1, 1);

fn u(v: usize) -> u32 {
    u32::try_from(v).expect("test sizes fit 32 bits")
}

/// (n, h, w, c, k, r, s, pad): VGG16-blog's image layer (3×3, pad 1) unpadded and padded to 8
/// channels, Dieleman's (6×6, no padding: 108 taps → 112 columns), odd sides, one channel, a
/// filter as large as the image.
type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

const SHAPES: [Case; 6] = [
    (2, 7, 6, 3, 5, 3, 3, 1),
    (1, 9, 9, 8, 4, 3, 3, 1),
    (2, 11, 10, 3, 4, 6, 6, 0),
    (3, 5, 5, 1, 2, 2, 2, 0),
    (1, 4, 4, 3, 3, 4, 4, 0),
    (2, 6, 5, 2, 3, 3, 3, 2),
];

/// The unfolded matrix by plain loops (f64), row (n, oy, ox), column (r·S + s)·C + c.
fn reference(x: &[f64], (n, h, w, c): (usize, usize, usize, usize), (r, s, pad): (usize, usize, usize)) -> Vec<f64> {
    let (oh, ow) = (h + 2 * pad - r + 1, w + 2 * pad - s + 1);
    let cols = cols_for(r * s * c);
    let mut p = vec![0.0; n * oh * ow * cols];
    for ni in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                let row = (ni * oh + oy) * ow + ox;
                for ri in 0..r {
                    for si in 0..s {
                        let (iy, ix) = ((oy + ri) as isize - pad as isize, (ox + si) as isize - pad as isize);
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            continue;
                        }
                        for ci in 0..c {
                            p[row * cols + (ri * s + si) * c + ci] =
                                x[((ni * h + iy as usize) * w + ix as usize) * c + ci];
                        }
                    }
                }
            }
        }
    }
    p
}

/// The kernel's P for `x` (channels-last), with the launcher's grid and with 3 blocks (both
/// must give the same, to the bit).
fn unfold<T: Elem>(x: &[T], (n, h, w, c): (usize, usize, usize, usize), (r, s, pad): (usize, usize, usize)) -> Vec<T> {
    let (oh, ow) = (h + 2 * pad - r + 1, w + 2 * pad - s + 1);
    let cols = cols_for(r * s * c);
    let rows = n * oh * ow;
    let xb = Buf::new(x);
    let xp = xb.ptr();
    let mut out = Vec::new();
    for g in [grid::im2col(u(rows)), (3, 1, 1)] {
        let mut pb = Buf::<T>::out(rows * cols);
        let pp = pb.mut_ptr();
        // SAFETY: im2col_nhwc's argument list; x holds n·h·w·c values, P rows·cols, cols ≤ 256
        run_both("im2col_nhwc", g, BLOCK, &mut [&mut pb], || unsafe {
            T::im2col_nhwc(
                xp,
                pp,
                u(n),
                u(h),
                u(w),
                u(c),
                u(r),
                u(s),
                u(pad),
                u(oh),
                u(ow),
                u(cols),
            )
        });
        let got = pb.values("P", true).to_vec();
        if !out.is_empty() {
            crate::testutil::emu::assert_same_bits(&format!("im2col grid {g:?}"), &got, &out);
        }
        out = got;
    }
    out
}

fn check_unfold<T: Elem>(dims: (usize, usize, usize, usize), filt: (usize, usize, usize)) {
    let (n, h, w, c) = dims;
    let x: Vec<T> = values(11, n * h * w * c, 2.0).into_iter().map(T::from_f64).collect();
    let want = reference(&x.iter().map(|v| v.to_f64()).collect::<Vec<_>>(), dims, filt);
    let got = unfold(&x, dims, filt);
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            a.to_f64() == *b,
            "{dims:?} {filt:?}: P[{i}] is {}, want {b}",
            a.to_f64()
        );
    }
}

#[test]
fn im2col_kernel_matches_the_loops() {
    for (n, h, w, c, _, r, s, pad) in SHAPES {
        check_unfold::<f32>((n, h, w, c), (r, s, pad));
        check_unfold::<bf16>((n, h, w, c), (r, s, pad));
        check_unfold::<f16>((n, h, w, c), (r, s, pad));
    }
}

fn check_copy<T: Elem>(rows: usize, src_w: usize, dst_w: usize) {
    let src: Vec<T> = values(12, rows * src_w, 1.0).into_iter().map(T::from_f64).collect();
    let sb = Buf::new(&src);
    let sp = sb.ptr();
    let total = rows * dst_w;
    for g in [grid::copy(u(total)), (3, 1, 1)] {
        let mut db = Buf::<T>::out(total);
        let dp = db.mut_ptr();
        // SAFETY: copy_cols' argument list; src holds rows·src_w values, dst rows·dst_w
        run_both("copy_cols", g, BLOCK, &mut [&mut db], || unsafe {
            T::copy_cols(sp, dp, u(rows), u(src_w), u(dst_w))
        });
        let got = db.values("dst", true);
        for row in 0..rows {
            for col in 0..dst_w {
                let want = if col < src_w {
                    src[row * src_w + col].to_f64()
                } else {
                    0.0
                };
                assert!(
                    got[row * dst_w + col].to_f64() == want,
                    "copy_cols {rows}×{src_w}→{dst_w} grid {g:?}: [{row}, {col}]"
                );
            }
        }
    }
}

#[test]
fn copy_cols_kernel_pads_and_cuts() {
    for (rows, a, b) in [(5, 27, 32), (4, 108, 112), (3, 112, 108), (64, 72, 72), (1, 1, 8)] {
        check_copy::<f32>(rows, a, b);
        check_copy::<bf16>(rows, a, b);
        check_copy::<f16>(rows, a, b);
    }
}

fn check_sum_parts<T: Elem>(slots: usize, k: usize, cols: usize, taps: usize) {
    let partials: Vec<f32> = values(16, slots * k * cols, 3.0)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let pb = Buf::new(&partials);
    let pp = pb.ptr();
    let outs = k * taps;
    for (g, order) in [(grid::sum_parts(u(outs)), "launcher's grid"), ((2, 1, 1), "2 blocks")] {
        let mut db = Buf::<T>::out(outs);
        let dp = db.mut_ptr();
        // SAFETY: sum_parts' argument list; partials holds slots·k·cols values, dw k·taps
        run_both("sum_parts", g, BLOCK, &mut [&mut db], || unsafe {
            T::sum_parts(pp, dp, u(slots), u(k), u(cols), u(taps))
        });
        let got = db.values("dw", true);
        for ki in 0..k {
            for t in 0..taps {
                // the kernel's order: warp w adds slots w, w + 8, ... in f32, then the 8 warps'
                // sums in order
                let mut warps = [0f32; 8];
                for (i, part) in partials.chunks_exact(k * cols).enumerate() {
                    warps[i % 8] += part[ki * cols + t];
                }
                let want = T::from_f64(f64::from(warps.iter().fold(0f32, |a, &w| a + w)));
                let got = got[ki * taps + t];
                assert!(
                    got.to_f64() == want.to_f64(),
                    "sum_parts {slots} parts of {k}×{cols}→{taps}, {order}: dw[{ki}, {t}] {} vs {}",
                    got.to_f64(),
                    want.to_f64()
                );
            }
        }
    }
}

/// The filter gradient's parts added (`sum_parts`): every output once (grid-stride with 2
/// blocks), the columns past the taps left out, the parts added in the kernel's fixed order in
/// f32 and rounded once to the storage type; Dieleman's sizes (32 × 112 → 108, hundreds of
/// parts), VGG16-blog's unpadded image layer (64 × 32 → 27), fewer parts than warps, one part.
#[test]
fn sum_parts_kernel_adds_the_parts_in_its_order() {
    for (slots, k, cols, taps) in [(400, 32, 112, 108), (3, 64, 32, 27), (13, 5, 8, 8), (1, 3, 16, 9)] {
        check_sum_parts::<f32>(slots, k, cols, taps);
        check_sum_parts::<bf16>(slots, k, cols, taps);
        check_sum_parts::<f16>(slots, k, cols, taps);
    }
}

/// Row-major `a` (m × k) times row-major `b` (n × k) transposed: (m × n), in f64.
fn mul_bt(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
        }
    }
    out
}

/// The CUDA path's arithmetic on the emulator's P: Z = P · Wpᵀ and dW = dZᵀ · P (cut back to
/// R·S·C columns), against candle's convolution of the same NCHW data and its filter gradient
/// under `loss = Σ Z ⊙ G`.
#[test]
fn the_products_on_the_unfolded_image_are_the_convolution() -> Result<()> {
    let cpu = Device::Cpu;
    for (n, h, w, c, k, r, s, pad) in SHAPES {
        let (oh, ow) = (h + 2 * pad - r + 1, w + 2 * pad - s + 1);
        let (taps, cols, rows) = (r * s * c, cols_for(r * s * c), n * oh * ow);
        // channels-last data and (K, R, S, C) filters, as the tower runs them
        let x: Vec<f32> = values(13, n * h * w * c, 1.0).into_iter().map(|v| v as f32).collect();
        let wk: Vec<f32> = values(14, k * taps, 0.5).into_iter().map(|v| v as f32).collect();
        let g: Vec<f32> = values(15, rows * k, 1.0).into_iter().map(|v| v as f32).collect();
        let p: Vec<f64> = unfold(&x, (n, h, w, c), (r, s, pad))
            .iter()
            .map(|v| f64::from(*v))
            .collect();
        let mut wp = vec![0.0; k * cols];
        for ki in 0..k {
            for t in 0..taps {
                wp[ki * cols + t] = f64::from(wk[ki * taps + t]);
            }
        }
        let z = mul_bt(&p, &wp, rows, k, cols);
        // dWᵀ (cols × K) = Pᵀ · dZ, i.e. dW[k, col] = Σ_rows dZ[row, k] · P[row, col]
        let mut dw = vec![0.0; k * taps];
        for ki in 0..k {
            for t in 0..taps {
                dw[ki * taps + t] = (0..rows)
                    .map(|row| f64::from(g[row * k + ki]) * p[row * cols + t])
                    .sum();
            }
        }
        // candle, NCHW / KCRS
        let xt = Tensor::from_vec(x, (n, h, w, c), &cpu)?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let wv = Var::from_tensor(
            &Tensor::from_vec(wk, (k, r, s, c), &cpu)?
                .permute((0, 3, 1, 2))?
                .contiguous()?,
        )?;
        let zc = xt.conv2d(wv.as_tensor(), pad, 1, 1, 1)?;
        let gt = Tensor::from_vec(g, (n, oh, ow, k), &cpu)?.permute((0, 3, 1, 2))?;
        let grads = (&zc * &gt)?.sum_all()?.backward()?;
        let zc: Vec<f32> = zc.permute((0, 2, 3, 1))?.flatten_all()?.to_vec1()?;
        let dwc: Vec<f32> = grads
            .get(wv.as_tensor())
            .expect("dw")
            .permute((0, 2, 3, 1))?
            .flatten_all()?
            .to_vec1()?;
        let what = format!("{:?}", (n, h, w, c, k, r, s, pad));
        for (i, (a, b)) in z.iter().zip(&zc).enumerate() {
            assert!(
                (a - f64::from(*b)).abs() < 1e-4 * (1.0 + a.abs()),
                "{what}: Z[{i}] {a} vs candle's {b}"
            );
        }
        for (i, (a, b)) in dw.iter().zip(&dwc).enumerate() {
            assert!(
                (a - f64::from(*b)).abs() < 1e-3 * (1.0 + a.abs()),
                "{what}: dW[{i}] {a} vs candle's {b}"
            );
        }
    }
    Ok(())
}
