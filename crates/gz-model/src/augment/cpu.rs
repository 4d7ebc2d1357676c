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

/// The kernel's `sample`: plane `src` (`h`×`w`) read bilinearly at the normalised output point
/// (`x`, `y`) through `m`; zero outside. The kernel's operations, except that the input pixel
/// coordinates are first clamped to [-2, side + 1] (a point further out reads only zeros
/// either way; a NaN coordinate lands at -2 and reads zero where the kernel gives NaN), so the
/// floor is a plain truncation of a small positive number: no libm `floorf` call (baseline
/// x86-64 has no rounding instruction) and no saturating casts.
#[inline(always)]
fn sample<T: WithDType>(src: &[T], m: &[[f32; 3]; 2], h: usize, w: usize, x: f32, y: f32) -> f32 {
    let xi = m[0][0] * x + m[0][1] * y + m[0][2];
    let yi = m[1][0] * x + m[1][1] * y + m[1][2];
    let (wf, hf) = (w as f32, h as f32);
    let px = (xi * (wf * 0.5) + (wf - 1.0) * 0.5).max(-2.0).min(wf + 1.0);
    let py = (yi * (hf * 0.5) + (hf - 1.0) * 0.5).max(-2.0).min(hf + 1.0);
    debug_assert!(w < (1 << 30) && h < (1 << 30), "checked by the op (Resample::cpu_fwd)");
    // SAFETY: px + 2 and py + 2 are finite and in [0, side + 3] (`max` drops a NaN, `min`
    // bounds an infinity), so they fit an i32 (sides below 2^30, checked by the op) and
    // truncation is their floor
    let (ix, iy) = unsafe {
        (
            (px + 2.0).to_int_unchecked::<i32>() - 2,
            (py + 2.0).to_int_unchecked::<i32>() - 2,
        )
    };
    let (fx, fy) = (px - ix as f32, py - iy as f32);
    let (w_i, h_i) = (w as i32, h as i32);
    let tap = |yy: i32, xx: i32| -> f32 {
        if (0..h_i).contains(&yy) && (0..w_i).contains(&xx) {
            src[yy as usize * w + xx as usize].to_f64() as f32
        } else {
            0.0
        }
    };
    let top = tap(iy, ix) * ((1.0 - fx) * (1.0 - fy)) + tap(iy, ix + 1) * (fx * (1.0 - fy));
    top + tap(iy + 1, ix) * ((1.0 - fx) * fy) + tap(iy + 1, ix + 1) * (fx * fy)
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
///
/// The kernel samples every part value on its own; the four parts of a view overlap (45-px
/// corners of a 69-px view), so here each view is sampled once per (galaxy, channel), every
/// view pixel a part reads, and the parts are copied out of it: the same values (the same
/// `sample` call per view pixel), about 1.7× fewer samples.
pub(super) fn dieleman_parts<T: WithDType>(
    img: &[T],
    mats: &[Affine; 4],
    dims: [usize; 4],
    view: usize,
    part: usize,
) -> Vec<T> {
    let [b, c, h, w] = dims;
    debug_assert_eq!(img.len(), b * c * h * w);
    debug_assert!(part <= view);
    let l = view - 1;
    // a view is square: the same centres on both axes
    let xs = centres(view);
    // views[(v·b + g)·c + ch]: view × view values (only the pixels some part reads are
    // sampled: with part ≥ view / 2, all of them)
    let vv = view * view;
    let mut views = vec![0f32; 4 * b * c * vv];
    views.par_chunks_mut(vv).enumerate().for_each(|(i, o)| {
        let (v, gc) = (i / (b * c), i % (b * c));
        let src = &img[gc * h * w..(gc + 1) * h * w];
        let m = &mats[v].m;
        for (vr, row) in o.chunks_mut(view).enumerate() {
            for (vc, val) in row.iter_mut().enumerate() {
                if read_by_a_part(vr, vc, view, part) {
                    *val = sample(src, m, h, w, xs[vc], xs[vr]);
                }
            }
        }
    });
    let mut out = vec![T::zero(); 16 * b * c * part * part];
    out.par_chunks_mut(part * part).enumerate().for_each(|(plane, o)| {
        let ch = plane % c;
        let n = plane / c; // (k·4 + v)·b + g
        let (g, v, k) = (n % b, (n / b) % 4, n / (4 * b));
        let src = &views[((v * b + g) * c + ch) * vv..][..vv];
        for (row, out_row) in o.chunks_mut(part).enumerate() {
            for (col, val) in out_row.iter_mut().enumerate() {
                let (vr, vc) = part_to_view(k, row, col, l);
                *val = store(src[vr * view + vc]);
            }
        }
    });
    out
}

/// The view pixel (row, column) that pixel (`row`, `col`) of part `k` shows, for a view of side
/// `l + 1`: the kernel's orientation of the four corners.
#[inline(always)]
fn part_to_view(k: usize, row: usize, col: usize, l: usize) -> (usize, usize) {
    match k {
        0 => (row, col),
        1 => (col, l - row),
        2 => (l - row, l - col),
        _ => (l - col, row),
    }
}

/// Whether some part reads view pixel (`vr`, `vc`): the parts are the view's four `part`-px
/// corners.
#[inline(always)]
fn read_by_a_part(vr: usize, vc: usize, view: usize, part: usize) -> bool {
    let near = |x: usize| x < part || x >= view - part;
    near(vr) && near(vc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's indexing, one `sample` per part value (the previous CPU twin).
    fn parts_one_by_one(
        img: &[f32],
        mats: &[Affine; 4],
        [b, c, h, w]: [usize; 4],
        view: usize,
        part: usize,
    ) -> Vec<f32> {
        let l = view - 1;
        let xs = centres(view);
        let mut out = vec![0f32; 16 * b * c * part * part];
        for (plane, o) in out.chunks_mut(part * part).enumerate() {
            let ch = plane % c;
            let n = plane / c;
            let (g, v, k) = (n % b, (n / b) % 4, n / (4 * b));
            let src = &img[(g * c + ch) * h * w..(g * c + ch + 1) * h * w];
            for (row, out_row) in o.chunks_mut(part).enumerate() {
                for (col, val) in out_row.iter_mut().enumerate() {
                    let (vr, vc) = part_to_view(k, row, col, l);
                    *val = sample(src, &mats[v].m, h, w, xs[vc], xs[vr]);
                }
            }
        }
        out
    }

    /// Sampling each view once gives every part value bit for bit, with parts that cover the
    /// whole view (45 of 69, as Dieleman's net) and parts that leave its middle out.
    #[test]
    fn parts_from_views_match_one_sample_per_value() {
        let [b, c, h, w] = [3, 2, 23, 19];
        let img: Vec<f32> = (0..b * c * h * w)
            .map(|i| ((i * 37 % 101) as f32 - 30.0) * 0.0123)
            .collect();
        let mats = [0.3f32, -0.7, 1.1, 2.9].map(|a| Affine {
            m: [[a.cos() * 0.9, -a.sin(), 0.05 * a], [a.sin(), a.cos() * 1.1, -0.03]],
        });
        for (view, part) in [(69, 45), (11, 5), (9, 9), (4, 2)] {
            let want = parts_one_by_one(&img, &mats, [b, c, h, w], view, part);
            let got = dieleman_parts(&img, &mats, [b, c, h, w], view, part);
            assert_eq!(got.len(), want.len());
            for (i, (a, e)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    e.to_bits(),
                    "view {view} part {part}: value {i}: {a} vs {e}"
                );
            }
        }
    }
}
