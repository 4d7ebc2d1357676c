//! Direct convolution for "valid" stride-1 layers with few output channels: Dieleman's image
//! layer (3 → 8 channels in `dieleman-tiny`, 6×6 filters on 45×45 parts). There im2col +
//! `gemm` multiplies a product only 8 rows tall, which `gemm`'s 16-row tiles half waste, after
//! copying each part 36 times into its im2col matrix; here each strip of an output row is a few
//! vectors of sums that every filter tap adds a shifted input row into, and the filter
//! gradient is dot products of output-gradient rows with shifted input rows, each vector loaded
//! once for several channels and taps, both straight from the image.
//!
//! Each loop is written twice: portable (generic over `FMA`, multiplying and adding separately
//! without it) and in AVX2 + FMA intrinsics, picked at run time
//! ([`crate::cpu_features::avx2_fma`]); the portable loops with `FMA` are the reference the
//! tests hold the vector ones to, bit for bit (the same sums in the same order). The sums run in a fixed order whatever the number of threads (images are
//! independent; the filter gradient sums per-chunk partials as the im2col path does), so a run
//! gives the same bits on any number of threads, as before.

use std::ops::Range;

use rayon::prelude::*;

use super::{Geometry, FILTER_PARTIALS};

/// Lanes of one vector (AVX2: 8 f32).
const L: usize = 8;
/// Output channels one forward strip computes together.
const KG: usize = 2;
/// Vectors of output columns one forward strip computes together (40 columns: Dieleman's):
/// with [`KG`], 10 vectors of sums, 2 of weights and 1 of input in AVX2's 16 registers.
const V: usize = 5;
/// Output rows the filter gradient takes at a time (their output gradients stay in L1).
const ROWS: usize = 20;
/// Output channels and filter columns the filter gradient sums together: 12 vectors of sums,
/// 2 of output gradients and 1 of input (filter columns past the last 6 go by 3, then 1).
const KD: usize = 2;
const KJ: usize = 6;

/// Whether the direct kernels apply and pay: stride 1, no padding, at most 8 output channels
/// (from 16, `gemm`'s tiles are full and it wins: `docs/benchmarks.md`), rows of at least one
/// vector and filters of at least 3×3.
pub(super) fn applies(g: &Geometry) -> bool {
    g.stride == 1 && g.padding == 0 && g.k <= 8 && g.ow() >= L && g.kh >= 3 && g.kw >= 3
}

#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// The sum of a vector's lanes, pairwise in a fixed order.
#[inline(always)]
fn lanes_sum(a: &[f32; L]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// `S` vectors of output columns from `ox` of output row `oy`, for the `N` output channels
/// `ws` (each its filter, c·kh·kw) starting at `bias`: Σ over taps of the tap's weight × the
/// input row it reads, shifted by the tap's column.
#[inline(always)]
fn strip<const FMA: bool, const S: usize, const N: usize>(
    g: &Geometry,
    x: &[f32],
    ws: [&[f32]; N],
    bias: [f32; N],
    (oy, ox): (usize, usize),
) -> [[[f32; L]; S]; N] {
    let mut acc = [[[0f32; L]; S]; N];
    for (a, b) in acc.iter_mut().zip(bias) {
        *a = [[b; L]; S];
    }
    for c in 0..g.c {
        for ki in 0..g.kh {
            let row = &x[(c * g.h + oy + ki) * g.w + ox..][..g.kw - 1 + S * L];
            let tap0 = (c * g.kh + ki) * g.kw;
            for kj in 0..g.kw {
                let wt: [f32; N] = std::array::from_fn(|q| ws[q][tap0 + kj]);
                for (v, xs) in row[kj..][..S * L].chunks_exact(L).enumerate() {
                    for q in 0..N {
                        for l in 0..L {
                            acc[q][v][l] = fmadd::<FMA>(wt[q], xs[l], acc[q][v][l]);
                        }
                    }
                }
            }
        }
    }
    acc
}

/// One output value, the scalar way (the columns right of the last whole vector).
#[inline(always)]
fn point<const FMA: bool>(g: &Geometry, x: &[f32], wk: &[f32], bias: f32, (oy, ox): (usize, usize)) -> f32 {
    let mut s = bias;
    for c in 0..g.c {
        for ki in 0..g.kh {
            let row = &x[(c * g.h + oy + ki) * g.w + ox..][..g.kw];
            let taps = &wk[(c * g.kh + ki) * g.kw..][..g.kw];
            for (t, v) in taps.iter().zip(row) {
                s = fmadd::<FMA>(*t, *v, s);
            }
        }
    }
    s
}

/// The filters and biases of output channels `k0..k0 + N`.
fn filters<'a, const N: usize>(g: &Geometry, w: &'a [f32], b: Option<&[f32]>, k0: usize) -> ([&'a [f32]; N], [f32; N]) {
    let ckk = g.ckk();
    (
        std::array::from_fn(|q| &w[(k0 + q) * ckk..][..ckk]),
        std::array::from_fn(|q| b.map_or(0.0, |b| b[k0 + q])),
    )
}

/// Output channels `k0..k0 + N` of one image: `y` holds those channels' planes (N × oh·ow).
#[inline(always)]
fn channels<const FMA: bool, const N: usize>(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    k0: usize,
    y: &mut [f32],
) {
    let (oh, ow) = (g.oh(), g.ow());
    let (ws, bias) = filters::<N>(g, w, b, k0);
    for oy in 0..oh {
        let mut ox = 0;
        while ox + V * L <= ow {
            let acc = strip::<FMA, V, N>(g, x, ws, bias, (oy, ox));
            for (q, a) in acc.iter().enumerate() {
                y[(q * oh + oy) * ow + ox..][..V * L].copy_from_slice(a.as_flattened());
            }
            ox += V * L;
        }
        while ox + L <= ow {
            let acc = strip::<FMA, 1, N>(g, x, ws, bias, (oy, ox));
            for (q, a) in acc.iter().enumerate() {
                y[(q * oh + oy) * ow + ox..][..L].copy_from_slice(a.as_flattened());
            }
            ox += L;
        }
        for ox in ox..ow {
            for q in 0..N {
                y[(q * oh + oy) * ow + ox] = point::<FMA>(g, x, ws[q], bias[q], (oy, ox));
            }
        }
    }
}

/// One image's forward pass: `y` (k × oh·ow) from `x` (c × h·w).
fn image_forward<const FMA: bool>(g: &Geometry, x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32]) {
    let ohw = g.oh() * g.ow();
    let mut k0 = 0;
    while k0 + KG <= g.k {
        channels::<FMA, KG>(g, x, w, b, k0, &mut y[k0 * ohw..(k0 + KG) * ohw]);
        k0 += KG;
    }
    for k in k0..g.k {
        channels::<FMA, 1>(g, x, w, b, k, &mut y[k * ohw..(k + 1) * ohw]);
    }
}

/// Where one block of filter-gradient sums sits: input channel and filter row, the first filter
/// column and output channel, and the output rows summed over.
#[derive(Clone)]
struct Block {
    c: usize,
    ki: usize,
    kj0: usize,
    k0: usize,
    rows: Range<usize>,
}

/// The input row a block reads for output row `oy`, from its first filter column
/// (`kj0 + KJ − 1 + ow ≤ w`: a valid convolution), and output channel `k`'s gradient row.
#[inline(always)]
fn rows_of<'a, const KJ: usize>(
    g: &Geometry,
    (x, dy): (&'a [f32], &'a [f32]),
    at: &Block,
    (oy, k): (usize, usize),
) -> (&'a [f32], &'a [f32]) {
    let ow = g.ow();
    (
        &x[(at.c * g.h + oy + at.ki) * g.w + at.kj0..][..ow + KJ - 1],
        &dy[(k * g.oh() + oy) * ow..][..ow],
    )
}

/// The sums of a block over the columns right of the last whole vector.
#[inline(always)]
fn tail<const FMA: bool, const KQ: usize, const KJ: usize>(
    g: &Geometry,
    x: &[f32],
    dy: &[f32],
    at: &Block,
) -> [[f32; KJ]; KQ] {
    let ow = g.ow();
    let mut t = [[0f32; KJ]; KQ];
    for oy in at.rows.clone() {
        for (q, tq) in t.iter_mut().enumerate() {
            let (xr, d) = rows_of::<KJ>(g, (x, dy), at, (oy, at.k0 + q));
            for o in ow / L * L..ow {
                for (j, s) in tq.iter_mut().enumerate() {
                    *s = fmadd::<FMA>(d[o], xr[o + j], *s);
                }
            }
        }
    }
    t
}

/// The gradients of output channels `k0..k0 + KQ` at taps `(c, ki, kj0..kj0 + KJ)` over the
/// block's output rows of one image, added into `part` (k × c·kh·kw).
#[inline(always)]
fn taps<const FMA: bool, const KQ: usize, const KJ: usize>(
    g: &Geometry,
    x: &[f32],
    dy: &[f32],
    at: &Block,
    part: &mut [f32],
) {
    let mut acc = [[[0f32; L]; KJ]; KQ];
    for oy in at.rows.clone() {
        for (q, aq) in acc.iter_mut().enumerate() {
            let (xr, d) = rows_of::<KJ>(g, (x, dy), at, (oy, at.k0 + q));
            for (v, dv) in d.chunks_exact(L).enumerate() {
                for (j, a) in aq.iter_mut().enumerate() {
                    let xs = &xr[v * L + j..][..L];
                    for l in 0..L {
                        a[l] = fmadd::<FMA>(dv[l], xs[l], a[l]);
                    }
                }
            }
        }
    }
    let t = tail::<FMA, KQ, KJ>(g, x, dy, at);
    add_block::<KQ, KJ>(g, at, part, |q, j| lanes_sum(&acc[q][j]) + t[q][j]);
}

/// Adds a block's sums (`sum(q, j)` for channel `k0 + q`, filter column `kj0 + j`) into `part`.
#[inline(always)]
fn add_block<const KQ: usize, const KJ: usize>(
    g: &Geometry,
    at: &Block,
    part: &mut [f32],
    sum: impl Fn(usize, usize) -> f32,
) {
    let ckk = g.ckk();
    let tap = (at.c * g.kh + at.ki) * g.kw + at.kj0;
    for q in 0..KQ {
        for j in 0..KJ {
            part[(at.k0 + q) * ckk + tap + j] += sum(q, j);
        }
    }
}

/// The blocks of one image's filter gradient, in the order they are summed, each with its
/// number of channels (`KD`, or 1 at the edge) and filter columns (`KJ`, 3 or 1).
fn blocks(g: &Geometry) -> impl Iterator<Item = (Block, usize, usize)> + '_ {
    let oh = g.oh();
    // `n` in steps of `step`, then of 3 (where `step` is larger), then of 1
    let split = |n: usize, step: usize| {
        let whole = n / step * step;
        let threes = if step > 3 { whole + (n - whole) / 3 * 3 } else { whole };
        (0..whole)
            .step_by(step)
            .map(move |i| (i, step))
            .chain((whole..threes).step_by(3).map(|i| (i, 3)))
            .chain((threes..n).map(|i| (i, 1)))
    };
    (0..oh).step_by(ROWS).flat_map(move |r0| {
        let rows = r0..(r0 + ROWS).min(oh);
        (0..g.c).flat_map(move |c| {
            let rows = rows.clone();
            (0..g.kh).flat_map(move |ki| {
                let rows = rows.clone();
                split(g.k, KD).flat_map(move |(k0, nk)| {
                    let rows = rows.clone();
                    split(g.kw, KJ).map(move |(kj0, nj)| {
                        (
                            Block {
                                c,
                                ki,
                                kj0,
                                k0,
                                rows: rows.clone(),
                            },
                            nk,
                            nj,
                        )
                    })
                })
            })
        })
    })
}

/// One image's filter gradient added into `part` (k × c·kh·kw).
fn image_filter<const FMA: bool>(g: &Geometry, x: &[f32], dy: &[f32], part: &mut [f32]) {
    for (at, nk, nj) in blocks(g) {
        match (nk, nj) {
            (KD, KJ) => taps::<FMA, KD, KJ>(g, x, dy, &at, part),
            (KD, 3) => taps::<FMA, KD, 3>(g, x, dy, &at, part),
            (KD, _) => taps::<FMA, KD, 1>(g, x, dy, &at, part),
            (_, KJ) => taps::<FMA, 1, KJ>(g, x, dy, &at, part),
            (_, 3) => taps::<FMA, 1, 3>(g, x, dy, &at, part),
            _ => taps::<FMA, 1, 1>(g, x, dy, &at, part),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod fma {
    //! The loops in AVX2 + FMA intrinsics (the portable ones vectorise poorly: LLVM mixes the
    //! lanes of different sums and spills them); callers check
    //! [`crate::cpu_features::avx2_fma`] first. The same sums as the portable loops with
    //! `FMA`, in the same order.
    // reason: indexed loops over the const-sized blocks unroll into named registers; iterators
    // over arrays of vectors here went through memory
    #![allow(clippy::needless_range_loop)]
    use std::arch::x86_64::*;

    use super::{Block, Geometry, KD, KG, KJ, L, V};

    /// The lanes' sum in [`super::lanes_sum`]'s order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lanes_sum(v: __m256) -> f32 {
        // (a0 + a4, a1 + a5, a2 + a6, a3 + a7), then ((a0 + a4) + (a2 + a6), (a1 + a5) + (a3 + a7))
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// [`super::strip`] in vectors, stored into `y`'s rows (`N` planes of oh × ow).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn strip<const S: usize, const N: usize>(
        g: &Geometry,
        x: &[f32],
        (ws, bias): ([&[f32]; N], [f32; N]),
        (oy, ox): (usize, usize),
        y: &mut [f32],
    ) {
        let mut acc = [[_mm256_setzero_ps(); S]; N];
        for q in 0..N {
            acc[q] = [_mm256_set1_ps(bias[q]); S];
        }
        for c in 0..g.c {
            for ki in 0..g.kh {
                let row = x[(c * g.h + oy + ki) * g.w + ox..][..g.kw - 1 + S * L].as_ptr();
                let tap0 = (c * g.kh + ki) * g.kw;
                // (loops, not closures: a closure does not inherit the target features, and
                // its vectors would pass through memory)
                for kj in 0..g.kw {
                    let mut wt = [_mm256_setzero_ps(); N];
                    for q in 0..N {
                        wt[q] = _mm256_set1_ps(ws[q][tap0 + kj]);
                    }
                    for v in 0..S {
                        // SAFETY: kj + v·L + L ≤ kw − 1 + S·L: inside the row checked above
                        let xv = unsafe { _mm256_loadu_ps(row.add(kj + v * L)) };
                        for q in 0..N {
                            acc[q][v] = _mm256_fmadd_ps(wt[q], xv, acc[q][v]);
                        }
                    }
                }
            }
        }
        let (oh, ow) = (g.oh(), g.ow());
        for q in 0..N {
            let out = y[(q * oh + oy) * ow + ox..][..S * L].as_mut_ptr();
            for v in 0..S {
                // SAFETY: v·L + L ≤ S·L, inside the slice checked above
                unsafe { _mm256_storeu_ps(out.add(v * L), acc[q][v]) };
            }
        }
    }

    /// [`super::channels`] in vectors (the columns past the last vector the portable way).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn channels<const N: usize>(g: &Geometry, x: &[f32], w: &[f32], b: Option<&[f32]>, k0: usize, y: &mut [f32]) {
        let (oh, ow) = (g.oh(), g.ow());
        let (ws, bias) = super::filters::<N>(g, w, b, k0);
        for oy in 0..oh {
            let mut ox = 0;
            while ox + V * L <= ow {
                strip::<V, N>(g, x, (ws, bias), (oy, ox), y);
                ox += V * L;
            }
            while ox + L <= ow {
                strip::<1, N>(g, x, (ws, bias), (oy, ox), y);
                ox += L;
            }
            for ox in ox..ow {
                for q in 0..N {
                    y[(q * oh + oy) * ow + ox] = super::point::<true>(g, x, ws[q], bias[q], (oy, ox));
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn image_forward(g: &Geometry, x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32]) {
        let ohw = g.oh() * g.ow();
        let mut k0 = 0;
        while k0 + KG <= g.k {
            channels::<KG>(g, x, w, b, k0, &mut y[k0 * ohw..(k0 + KG) * ohw]);
            k0 += KG;
        }
        for k in k0..g.k {
            channels::<1>(g, x, w, b, k, &mut y[k * ohw..(k + 1) * ohw]);
        }
    }

    /// [`super::taps`] in vectors.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn taps<const KQ: usize, const KJ_: usize>(g: &Geometry, x: &[f32], dy: &[f32], at: &Block, part: &mut [f32]) {
        let whole = g.ow() / L;
        let mut acc = [[_mm256_setzero_ps(); KJ_]; KQ];
        for oy in at.rows.clone() {
            // (loops, not closures: see `strip`)
            let mut d = [std::ptr::null::<f32>(); KQ];
            let mut xr = std::ptr::null::<f32>();
            for q in 0..KQ {
                let (xrow, drow) = super::rows_of::<KJ_>(g, (x, dy), at, (oy, at.k0 + q));
                (xr, d[q]) = (xrow.as_ptr(), drow.as_ptr());
            }
            for v in 0..whole {
                let mut dv = [_mm256_setzero_ps(); KQ];
                for q in 0..KQ {
                    // SAFETY: v·L + L ≤ ow, inside the rows checked by `rows_of` (the input's
                    // is KJ_ − 1 longer, for the filter columns)
                    dv[q] = unsafe { _mm256_loadu_ps(d[q].add(v * L)) };
                }
                for j in 0..KJ_ {
                    // SAFETY: as above
                    let xv = unsafe { _mm256_loadu_ps(xr.add(v * L + j)) };
                    for q in 0..KQ {
                        acc[q][j] = _mm256_fmadd_ps(dv[q], xv, acc[q][j]);
                    }
                }
            }
        }
        let t = super::tail::<true, KQ, KJ_>(g, x, dy, at);
        let mut sums = [[0f32; KJ_]; KQ];
        for q in 0..KQ {
            for j in 0..KJ_ {
                sums[q][j] = lanes_sum(acc[q][j]) + t[q][j];
            }
        }
        super::add_block::<KQ, KJ_>(g, at, part, |q, j| sums[q][j]);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn image_filter(g: &Geometry, x: &[f32], dy: &[f32], part: &mut [f32]) {
        for (at, nk, nj) in super::blocks(g) {
            match (nk, nj) {
                (KD, KJ) => taps::<KD, KJ>(g, x, dy, &at, part),
                (KD, 3) => taps::<KD, 3>(g, x, dy, &at, part),
                (KD, _) => taps::<KD, 1>(g, x, dy, &at, part),
                (_, KJ) => taps::<1, KJ>(g, x, dy, &at, part),
                (_, 3) => taps::<1, 3>(g, x, dy, &at, part),
                _ => taps::<1, 1>(g, x, dy, &at, part),
            }
        }
    }
}

/// One image (`x`, c × h·w; `dy`, k × oh·ow) through the portable loops with FMA and through
/// the intrinsics: (forward, filter gradient) each way, for the tests to hold equal to the bit.
/// `None` where the CPU lacks AVX2 + FMA.
#[cfg(test)]
pub(super) fn both_ways(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    dy: &[f32],
) -> Option<[(Vec<f32>, Vec<f32>); 2]> {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu_features::avx2_fma() {
        let (ohw, ckk) = (g.oh() * g.ow(), g.ckk());
        let mut out = [
            (vec![0f32; g.k * ohw], vec![0f32; g.k * ckk]),
            (vec![0f32; g.k * ohw], vec![0f32; g.k * ckk]),
        ];
        image_forward::<true>(g, x, w, Some(b), &mut out[0].0);
        image_filter::<true>(g, x, dy, &mut out[0].1);
        // SAFETY: `cpu_features::avx2_fma()` found AVX2 and FMA
        unsafe {
            fma::image_forward(g, x, w, Some(b), &mut out[1].0);
            fma::image_filter(g, x, dy, &mut out[1].1);
        }
        return Some(out);
    }
    let _ = (g, x, w, b, dy);
    None
}

/// y (n, k, oh, ow) = conv(x, w) + b, lengths checked by the caller.
pub(super) fn forward(g: &Geometry, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    forward_with(crate::cpu_features::avx2_fma(), g, x, w, b)
}

/// [`forward`] with (`fast`, on a CPU [`crate::cpu_features::avx2_fma`] accepts) or without
/// AVX2 + FMA.
pub(super) fn forward_with(fast: bool, g: &Geometry, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let (ohw, chw) = (g.oh() * g.ow(), g.c * g.h * g.w);
    let mut y = vec![0f32; g.n * g.k * ohw];
    if y.is_empty() {
        return y;
    }
    y.par_chunks_mut(g.k * ohw).zip(x.par_chunks(chw)).for_each(|(yi, xi)| {
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: `fast` only where `cpu_features::avx2_fma()` found AVX2 and FMA.
            return unsafe { fma::image_forward(g, xi, w, b, yi) };
        }
        let _ = fast;
        image_forward::<false>(g, xi, w, b, yi)
    });
    y
}

/// dw (k, c, kh, kw) from x and dy, lengths checked by the caller: per image, summed in fixed
/// chunks of the batch (an eighth of it, by its size alone, as the im2col path without its
/// images side by side).
pub(super) fn backward_filter(g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    backward_filter_with(crate::cpu_features::avx2_fma(), g, x, dy)
}

/// [`backward_filter`] with or without AVX2 + FMA (as [`forward_with`]).
pub(super) fn backward_filter_with(fast: bool, g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (ohw, ckk, chw) = (g.oh() * g.ow(), g.ckk(), g.c * g.h * g.w);
    let mut dw = vec![0f32; g.k * ckk];
    if ohw == 0 || g.n == 0 {
        return dw;
    }
    let per = g.n.div_ceil(FILTER_PARTIALS);
    let partials: Vec<Vec<f32>> = (0..g.n.div_ceil(per))
        .into_par_iter()
        .map(|chunk| {
            let mut part = vec![0f32; g.k * ckk];
            for i in chunk * per..((chunk + 1) * per).min(g.n) {
                let (xi, dyi) = (&x[i * chw..(i + 1) * chw], &dy[i * g.k * ohw..(i + 1) * g.k * ohw]);
                #[cfg(target_arch = "x86_64")]
                if fast {
                    // SAFETY: `fast` only where `cpu_features::avx2_fma()` found AVX2 and FMA.
                    unsafe { fma::image_filter(g, xi, dyi, &mut part) };
                    continue;
                }
                let _ = fast;
                image_filter::<false>(g, xi, dyi, &mut part);
            }
            part
        })
        .collect();
    for part in partials {
        for (d, p) in dw.iter_mut().zip(part) {
            *d += p;
        }
    }
    dw
}
