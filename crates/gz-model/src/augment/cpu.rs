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
//! Each source plane is first copied, as f32, into a plane with a border of zeros ([`Padded`]),
//! so that every tap is an unconditional load (no bounds test per tap, no conversion per tap);
//! with AVX2 eight output pixels of a row are sampled at once (`_mm256_i32gather_ps`). Both give
//! the bits of the kernel's per-value `sample` written out in Rust with a bounds test per tap
//! (the same f32 operations in the same order, no fused multiply-add), which the tests keep as
//! the reference.
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

/// The kernel's store: f32 → `T`, rounding to nearest (exact through f64: every f32 is an f64).
#[inline]
fn store<T: WithDType>(v: f32) -> T {
    T::from_f64(v as f64)
}

/// Zeros above and left of a [`Padded`] plane: [`Padded::sample`]'s pixel coordinates are
/// clamped to [-2, side + 1], so a tap reads rows and columns -2 ..= side + 2.
const PAD_BEFORE: usize = 2;
/// Zeros below and right of a [`Padded`] plane.
const PAD_AFTER: usize = 3;

/// One source plane as f32 with a border of zeros wide enough for every tap
/// [`Padded::sample`] can make: a tap outside the image reads a zero, as the kernel's does.
struct Padded {
    v: Vec<f32>,
    /// Row length (`w + 5`).
    pw: usize,
    h: usize,
    w: usize,
}

impl Padded {
    fn new<T: WithDType>(src: &[T], h: usize, w: usize) -> Padded {
        let pw = w + PAD_BEFORE + PAD_AFTER;
        let mut v = vec![0f32; (h + PAD_BEFORE + PAD_AFTER) * pw];
        // (an image with no columns is all border: `chunks_exact(0)` would panic)
        if w > 0 {
            for (y, row) in src.chunks_exact(w).enumerate() {
                let o = &mut v[(y + PAD_BEFORE) * pw + PAD_BEFORE..][..w];
                for (d, s) in o.iter_mut().zip(row) {
                    *d = s.to_f64() as f32;
                }
            }
        }
        Padded { v, pw, h, w }
    }

    /// The kernel's `sample` of the plane this was made from: the point (`x`, `y`) (normalised
    /// output coordinates) through `m`, read bilinearly; zero outside. The kernel's operations,
    /// except that the input pixel coordinates are first clamped to [-2, side + 1] (a point
    /// further out reads only zeros either way; a NaN coordinate lands at -2 and reads zero
    /// where the kernel gives NaN), so the floor is a plain truncation of a small positive
    /// number: no libm `floorf` call (baseline x86-64 has no rounding instruction) and no
    /// saturating casts; and every tap is an unconditional load of the padded plane.
    #[inline(always)]
    fn sample(&self, m: &[[f32; 3]; 2], x: f32, y: f32) -> f32 {
        let xi = m[0][0] * x + m[0][1] * y + m[0][2];
        let yi = m[1][0] * x + m[1][1] * y + m[1][2];
        let (wf, hf) = (self.w as f32, self.h as f32);
        let px = (xi * (wf * 0.5) + (wf - 1.0) * 0.5).max(-2.0).min(wf + 1.0);
        let py = (yi * (hf * 0.5) + (hf - 1.0) * 0.5).max(-2.0).min(hf + 1.0);
        debug_assert!(
            self.w < (1 << 30) && self.h < (1 << 30),
            "checked by the op (Resample::cpu_fwd)"
        );
        // SAFETY: px + 2 and py + 2 are finite and in [0, side + 3] (`max` drops a NaN, `min`
        // bounds an infinity), so they fit an i32 (sides below 2^30, checked by the op) and
        // truncation is their floor
        let (ix2, iy2) = unsafe {
            (
                (px + 2.0).to_int_unchecked::<i32>(),
                (py + 2.0).to_int_unchecked::<i32>(),
            )
        };
        let (fx, fy) = (px - (ix2 - 2) as f32, py - (iy2 - 2) as f32);
        // (ix2, iy2) = (ix + 2, iy + 2) ∈ [0, side + 3]: the padded plane's own coordinates. The
        // `min` changes nothing where `side as f32` is exact (sides to 2^24); above, the float
        // bound can round up past the border, and the taps stay in the plane all the same
        let (ix2, iy2) = (ix2.min(self.w as i32 + 3), iy2.min(self.h as i32 + 3));
        let at = iy2 as usize * self.pw + ix2 as usize;
        let (t00, t01) = (self.v[at], self.v[at + 1]);
        let (t10, t11) = (self.v[at + self.pw], self.v[at + self.pw + 1]);
        let top = t00 * ((1.0 - fx) * (1.0 - fy)) + t01 * (fx * (1.0 - fy));
        top + t10 * ((1.0 - fx) * fy) + t11 * (fx * fy)
    }

    /// One output row: `out[i]` = [`Self::sample`] at (`xs[i]`, `y`), eight at a time with AVX2.
    fn sample_row(&self, m: &[[f32; 3]; 2], xs: &[f32], y: f32, out: &mut [f32]) {
        debug_assert_eq!(xs.len(), out.len());
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if crate::cpu_features::avx2() && i32::try_from(self.v.len()).is_ok() {
            // SAFETY: AVX2 is present (checked above); every index fits an i32 (checked)
            done = unsafe { avx2::sample_row(self, m, xs, y, out) };
        }
        for (o, &x) in out[done..].iter_mut().zip(&xs[done..]) {
            *o = self.sample(m, x, y);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Padded;

    /// [`Padded::sample`] for eight consecutive output pixels at a time; returns how many
    /// leading pixels of the row it wrote (a multiple of 8; the caller does the rest). Plain
    /// multiplies and adds in [`Padded::sample`]'s order (no FMA: the same bits), `max`/`min` with the
    /// bound second (`_mm256_max_ps` returns its second operand for a NaN, as `f32::max` drops
    /// the NaN).
    ///
    /// # Safety
    /// AVX2 must be available, and `p.v.len()` must fit an i32.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sample_row(p: &Padded, m: &[[f32; 3]; 2], xs: &[f32], y: f32, out: &mut [f32]) -> usize {
        let n = xs.len().min(out.len()) / 8 * 8;
        let (wf, hf) = (p.w as f32, p.h as f32);
        let s = _mm256_set1_ps;
        // the row's y terms, as `Padded::sample` computes them: m01·y and m11·y
        let (m0y, m1y) = (s(m[0][1] * y), s(m[1][1] * y));
        let (m00, m02, m10, m12) = (s(m[0][0]), s(m[0][2]), s(m[1][0]), s(m[1][2]));
        let (ax, bx, hix) = (s(wf * 0.5), s((wf - 1.0) * 0.5), s(wf + 1.0));
        let (ay, by, hiy) = (s(hf * 0.5), s((hf - 1.0) * 0.5), s(hf + 1.0));
        let (lo, two, one) = (s(-2.0), s(2.0), s(1.0));
        let two_i = _mm256_set1_epi32(2);
        let pw = _mm256_set1_epi32(p.pw as i32);
        // (w + 3 and h + 3 fit an i32: the padded plane's length does, checked by the caller)
        let (max_x, max_y) = (_mm256_set1_epi32(p.w as i32 + 3), _mm256_set1_epi32(p.h as i32 + 3));
        let base = p.v.as_ptr();
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 <= n <= xs.len()
            let x = unsafe { _mm256_loadu_ps(xs.as_ptr().add(i)) };
            let xi = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(m00, x), m0y), m02);
            let yi = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(m10, x), m1y), m12);
            let px = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(_mm256_mul_ps(xi, ax), bx), lo), hix);
            let py = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(_mm256_mul_ps(yi, ay), by), lo), hiy);
            // truncation of the small positive px + 2 is its floor
            let ix2 = _mm256_cvttps_epi32(_mm256_add_ps(px, two));
            let iy2 = _mm256_cvttps_epi32(_mm256_add_ps(py, two));
            let fx = _mm256_sub_ps(px, _mm256_cvtepi32_ps(_mm256_sub_epi32(ix2, two_i)));
            let fy = _mm256_sub_ps(py, _mm256_cvtepi32_ps(_mm256_sub_epi32(iy2, two_i)));
            // as in `Padded::sample`: a no-op to sides of 2^24, a bound on the taps beyond
            let (ix2, iy2) = (_mm256_min_epi32(ix2, max_x), _mm256_min_epi32(iy2, max_y));
            let at = _mm256_add_epi32(_mm256_mullo_epi32(iy2, pw), ix2);
            let at1 = _mm256_add_epi32(at, pw);
            let one_i = _mm256_set1_epi32(1);
            // SAFETY: ix2 ∈ [0, w + 3] and iy2 ∈ [0, h + 3] (truncations of numbers clamped to
            // [0, side + 3], then bounded by `min`), so the four taps lie in the padded plane of
            // (h + 5)·(w + 5) values, whose length fits an i32 (so no index product wraps)
            let (t00, t01, t10, t11) = unsafe {
                (
                    _mm256_i32gather_ps::<4>(base, at),
                    _mm256_i32gather_ps::<4>(base, _mm256_add_epi32(at, one_i)),
                    _mm256_i32gather_ps::<4>(base, at1),
                    _mm256_i32gather_ps::<4>(base, _mm256_add_epi32(at1, one_i)),
                )
            };
            let (gx, gy) = (_mm256_sub_ps(one, fx), _mm256_sub_ps(one, fy));
            let top = _mm256_add_ps(
                _mm256_mul_ps(t00, _mm256_mul_ps(gx, gy)),
                _mm256_mul_ps(t01, _mm256_mul_ps(fx, gy)),
            );
            let r = _mm256_add_ps(top, _mm256_mul_ps(t10, _mm256_mul_ps(gx, fy)));
            let r = _mm256_add_ps(r, _mm256_mul_ps(t11, _mm256_mul_ps(fx, fy)));
            // SAFETY: i + 8 <= n <= out.len()
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), r) };
            i += 8;
        }
        n
    }
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
        let src = Padded::new(&img[plane * h * w..(plane + 1) * h * w], h, w);
        let m = &mats[plane / c].m;
        let mut vals = vec![0f32; ow];
        for (row, &y) in o.chunks_mut(ow).zip(&ys) {
            src.sample_row(m, &xs, y, &mut vals);
            for (v, &s) in row.iter_mut().zip(&vals) {
                *v = store(s);
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
    // each source plane padded once (its four views read it)
    let planes: Vec<Padded> = (0..b * c)
        .into_par_iter()
        .map(|gc| Padded::new(&img[gc * h * w..(gc + 1) * h * w], h, w))
        .collect();
    let mut views = vec![0f32; 4 * b * c * vv];
    views.par_chunks_mut(vv).enumerate().for_each(|(i, o)| {
        let (v, gc) = (i / (b * c), i % (b * c));
        let src = &planes[gc];
        let m = &mats[v].m;
        for (vr, row) in o.chunks_mut(view).enumerate() {
            if part * 2 >= view {
                // every pixel of the row is read by a part
                src.sample_row(m, &xs, xs[vr], row);
                continue;
            }
            for (vc, val) in row.iter_mut().enumerate() {
                if read_by_a_part(vr, vc, view, part) {
                    *val = src.sample(m, xs[vc], xs[vr]);
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

    /// The reference: the kernel's `sample`, a bounds test per tap (the CPU twin before
    /// [`Padded`]): plane `src` (`h`×`w`) read bilinearly at the normalised output point
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

    /// The padded plane's `sample`, and its rows (eight at a time with AVX2, the rest one by
    /// one), give the reference's bits: random planes (f32 and f16 storage, odd sides, empty
    /// ones), random
    /// matrices and points, and the edge cases (points far outside, on the border, NaN and
    /// infinite coordinates, a NaN pixel).
    #[test]
    fn padded_rows_match_the_reference_bit_for_bit() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
        for (h, w) in [(1, 1), (2, 3), (7, 5), (23, 19), (64, 64), (0, 3), (3, 0), (0, 0)] {
            let mut img: Vec<f32> = (0..h * w).map(|_| rng.gen_range(-1.5f32..2.0)).collect();
            if h * w > 4 {
                img[h * w / 2] = f32::NAN;
            }
            let img16: Vec<half::f16> = img.iter().map(|&v| half::f16::from_f32(v)).collect();
            let (p, p16) = (Padded::new(&img, h, w), Padded::new(&img16, h, w));
            for trial in 0..60 {
                let mut m = [[0f32; 3]; 2];
                for v in m.iter_mut().flatten() {
                    *v = rng.gen_range(-2.5f32..2.5);
                }
                match trial {
                    0 => m = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                    1 => m[0][2] = f32::NAN,
                    2 => m[1][2] = f32::INFINITY,
                    3 => m[0][0] = f32::NEG_INFINITY,
                    4 => m[1][1] = 1e30,
                    _ => {}
                }
                let n = rng.gen_range(1..40);
                let mut xs: Vec<f32> = (0..n).map(|_| rng.gen_range(-3f32..3.0)).collect();
                if trial % 7 == 0 {
                    // pixel centres and borders exactly
                    for (i, x) in xs.iter_mut().enumerate() {
                        *x = (i as f32 / 4.0).fract() * 2.0 - 1.0;
                    }
                }
                let y = if trial == 5 {
                    f32::NAN
                } else {
                    rng.gen_range(-1.2f32..1.2)
                };
                let mut row = vec![0f32; n];
                for (plane, pad, is16) in [(&img[..], &p, false), (&[][..], &p16, true)] {
                    pad.sample_row(&m, &xs, y, &mut row);
                    for (i, &x) in xs.iter().enumerate() {
                        let want = if is16 {
                            sample(&img16, &m, h, w, x, y)
                        } else {
                            sample(plane, &m, h, w, x, y)
                        };
                        let one = pad.sample(&m, x, y);
                        let what = format!("{h}×{w} f16 {is16} trial {trial} x {x} y {y} m {m:?}");
                        assert_eq!(one.to_bits(), want.to_bits(), "{what}: {one} vs {want}");
                        assert_eq!(
                            row[i].to_bits(),
                            want.to_bits(),
                            "{what}: row[{i}] {} vs {want}",
                            row[i]
                        );
                    }
                }
            }
        }
    }
}
