//! The resampling kernels' CPU twin: `src/kernels/affine.cu`'s per-value arithmetic in Rust,
//! one rayon task per output plane, reading the op's storage in place.
//!
//! What it replaces on the CPU: [`super::affine_sample_ops`], about 40 candle ops (the grid
//! matmul, `floor`, comparisons, four `gather`s of a broadcast index), and for Dieleman's net
//! the views → parts composition (four more copies, `flip`s and a `cat`). A profile of
//! `dieleman-tiny` training put ~12 % of the step there. The values are the kernels': bilinear,
//! f32 arithmetic for every storage type, zero outside the image. They equal the candle-ops
//! reference up to f32 rounding (the reference forms the grid with a matmul), which the tests
//! bound.
//!
//! On by default on the CPU; [`super::set_resample_cpu`] (`GZ_RESAMPLE=ops` in `gz`) switches
//! back to the candle ops.

use candle_core::WithDType;
use rayon::prelude::*;

use super::Affine;

/// Normalised coordinates of the pixel centres of an `n`-pixel axis, `(2j + 1)/n - 1`, as the
/// kernel computes them (hoisted out of the per-value loop: the divisions are the slow part).
fn centres(n: usize) -> Vec<f32> {
    (0..n).map(|j| (2 * j + 1) as f32 / n as f32 - 1.0).collect()
}

/// `floor` without libm's call (baseline x86-64 has no rounding instruction): truncate, then
/// step down for negative non-integers. Equal to `f32::floor` for every finite value below
/// 2^63 in magnitude; NaN gives 0 and infinities saturate, and either way the sample reads
/// NaN weights or lands outside the image, as with `floorf`.
#[inline(always)]
fn floor(v: f32) -> f32 {
    let t = v as i64 as f32;
    if t > v {
        t - 1.0
    } else {
        t
    }
}

/// The kernel's `sample`: plane `src` (`h`×`w`) read bilinearly at the normalised output point
/// (`x`, `y`) through `m`; zero outside. Same operations in the same order as the kernel.
#[inline(always)]
fn sample<T: WithDType>(src: &[T], m: &[[f32; 3]; 2], h: usize, w: usize, x: f32, y: f32) -> f32 {
    let xi = m[0][0] * x + m[0][1] * y + m[0][2];
    let yi = m[1][0] * x + m[1][1] * y + m[1][2];
    let px = xi * (w as f32 * 0.5) + (w as f32 - 1.0) * 0.5;
    let py = yi * (h as f32 * 0.5) + (h as f32 - 1.0) * 0.5;
    let (x0, y0) = (floor(px), floor(py));
    let (fx, fy) = (px - x0, py - y0);
    // saturating casts: a point far outside still lands outside, which the checks below skip
    let (ix, iy) = (x0 as i64, y0 as i64);
    let wx = [1.0 - fx, fx];
    let wy = [1.0 - fy, fy];
    let mut acc = 0.0f32;
    for (dy, wy) in wy.iter().enumerate() {
        let yy = iy.saturating_add(dy as i64);
        if yy < 0 || yy >= h as i64 {
            continue;
        }
        for (dx, wx) in wx.iter().enumerate() {
            let xx = ix.saturating_add(dx as i64);
            if xx < 0 || xx >= w as i64 {
                continue;
            }
            acc += src[yy as usize * w + xx as usize].to_f64() as f32 * (wx * wy);
        }
    }
    acc
}

/// The kernel's store: f32 → `T`, rounding to nearest (exact through f64: every f32 is an f64).
#[inline]
fn store<T: WithDType>(v: f32) -> T {
    T::from_f64(v as f64)
}

/// `affine_sample`: `img` (`b`, `c`, `h`, `w`) contiguous, one matrix per image →
/// (`b`, `c`, `oh`, `ow`).
pub(super) fn affine_sample<T: WithDType>(
    img: &[T],
    mats: &[Affine],
    dims: [usize; 4],
    oh: usize,
    ow: usize,
) -> Vec<T> {
    let [b, c, h, w] = dims;
    debug_assert_eq!(img.len(), b * c * h * w);
    debug_assert_eq!(mats.len(), b);
    let (xs, ys) = (centres(ow), centres(oh));
    let mut out = vec![T::zero(); b * c * oh * ow];
    out.par_chunks_mut(oh * ow).enumerate().for_each(|(plane, o)| {
        let src = &img[plane * h * w..(plane + 1) * h * w];
        let m = &mats[plane / c].m;
        for (row, &y) in o.chunks_mut(ow).zip(&ys) {
            for (v, &x) in row.iter_mut().zip(&xs) {
                *v = store(sample(src, m, h, w, x, y));
            }
        }
    });
    out
}

/// `dieleman_parts`: `img` (`b`, `c`, `h`, `w`) contiguous → (16·`b`, `c`, `part`, `part`),
/// plane `((k·4 + v)·b + g, ch)` holding part `k` of view `v` (sampled through `mats[v]`) of
/// galaxy `g`, exactly as the kernel indexes it.
pub(super) fn dieleman_parts<T: WithDType>(
    img: &[T],
    mats: &[Affine; 4],
    dims: [usize; 4],
    view: usize,
    part: usize,
) -> Vec<T> {
    let [b, c, h, w] = dims;
    debug_assert_eq!(img.len(), b * c * h * w);
    let l = view - 1;
    let xs = centres(view); // a view is square: the same centres on both axes
    let mut out = vec![T::zero(); 16 * b * c * part * part];
    out.par_chunks_mut(part * part).enumerate().for_each(|(plane, o)| {
        let ch = plane % c;
        let n = plane / c; // (k·4 + v)·b + g
        let (g, v, k) = (n % b, (n / b) % 4, n / (4 * b));
        let src = &img[(g * c + ch) * h * w..(g * c + ch + 1) * h * w];
        let m = &mats[v].m;
        for (row, out_row) in o.chunks_mut(part).enumerate() {
            for (col, val) in out_row.iter_mut().enumerate() {
                let (vr, vc) = match k {
                    0 => (row, col),
                    1 => (col, l - row),
                    2 => (l - row, l - col),
                    _ => (l - col, row),
                };
                *val = store(sample(src, m, h, w, xs[vc], xs[vr]));
            }
        }
    });
    out
}
