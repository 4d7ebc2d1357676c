//! Winograd F(m×m, 3×3) for 3×3, stride-1 convolutions on the CPU (Lavin & Gray 2015), in two
//! sizes: F(2×2, 3×3), where each 2×2 block of outputs comes from a 4×4 input patch with 16
//! multiplications per (input channel, output channel) instead of 36 (2.25× fewer), and
//! F(4×4, 3×3), a 6×6 patch for 4×4 outputs, 36 instead of 144 (4× fewer). The matrix products
//! are most of the work; the transforms are linear in the data and cost less per output for the
//! larger tiles too (2.25 transformed values per output instead of 4), but the larger tiles
//! waste more on outputs whose side is not a multiple of 4 and round a little more ([`pick`]
//! chooses per layer). [`forward`] serves the forward pass and (with the filters flipped, by the
//! caller) the input gradient; [`backward_filter`] the filter gradient, from the same input
//! transform.
//!
//! Layout (α = m + 2, the input patch side): the filters are transformed once per call to `U`
//! (K × C × α²); a group of images is transformed to `V` (C × α² × T, T = the group's tiles),
//! the α² products `M[ξ] = U[ξ] · V[ξ]` (K × T, `U[ξ]` and `V[ξ]` read through strided views)
//! run on the `gemm` kernel, and the inverse transform writes each tile's m×m outputs (those
//! inside the image) plus the bias. Each transform runs in parallel over what it writes
//! (filters, input channels, output planes), so a group of images alone on the machine (the
//! late layers) still uses every thread. The arithmetic is f32 throughout; the values differ
//! from the direct convolution's by rounding only (the tests bound it).
//!
//! Every transform is separable: a 1-D transform ([`Scheme`]) down each column, then along each
//! row ([`sep`]).
//!
//! Results do not depend on the thread count: the grouping is a function of the sizes, and
//! every value is computed by one thread in a fixed order.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use super::{matmul_strided, matmul_uninit, Geometry, Mat};

/// Fewer channels than this on either side: the transforms cost more than they save (the
/// image layer, 3 channels in).
const MIN_CHANNELS: usize = 16;

/// Tiles per group of images the grouping aims for, so that the late layers' small outputs
/// still make products of a useful width.
const GROUP_TILES: usize = 512;

/// Whether a pass of this geometry runs here: 3×3 kernel, stride 1, enough channels on both
/// sides, outputs of at least 7×7.
pub(super) fn applies(g: &Geometry) -> bool {
    g.kh == 3
        && g.kw == 3
        && g.stride == 1
        && g.c >= MIN_CHANNELS
        && g.k >= MIN_CHANNELS
        && g.oh().div_ceil(2) * g.ow().div_ceil(2) >= MIN_TILES
}

/// Fewer output tiles per image than this (outputs under 7×7): the late layers of VGG16-blog
/// (6×6) and Dieleman's 3×3 layers (6×6 and 4×4) were no faster with Winograd in the nets (its
/// transforms and the short products eat the saving; Dieleman's steps were 5–15 % slower), so
/// those keep im2col.
const MIN_TILES: usize = 16;

static LARGE_TILES: AtomicBool = AtomicBool::new(true);

/// Lets [`pick`] choose F(4×4, 3×3) where it pays (the default); `false` keeps F(2×2, 3×3)
/// everywhere (`GZ_CPU_WINOGRAD=2` in `gz`), for comparisons.
pub(super) fn set_large_tiles(on: bool) {
    LARGE_TILES.store(on, Ordering::Relaxed);
}

/// The tile size of one Winograd pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tiles {
    /// F(2×2, 3×3): 4×4 input patches.
    Two,
    /// F(4×4, 3×3): 6×6 input patches.
    Four,
}

/// The tile size for a geometry [`applies`] accepts: F(4×4, 3×3) when the outputs are at least
/// [`MIN_SIDE_FOUR`] on each side and 4×4 tiles cover at most a fifth more than 2×2 tiles do
/// (partial tiles at the edges), else F(2×2, 3×3). Measured (`tests::bench_winograd_tiles`):
/// 4×4 tiles are 5–25 % faster at 106, 53, 26 and 20 px (cover ratios 1.04, 1.08, 1.16, 1.0)
/// and up to 1.9× slower at 13 px (1.31).
pub(super) fn pick(g: &Geometry) -> Tiles {
    let (oh, ow) = (g.oh(), g.ow());
    let covered = |m: usize| oh.next_multiple_of(m) * ow.next_multiple_of(m);
    if LARGE_TILES.load(Ordering::Relaxed) && oh.min(ow) >= MIN_SIDE_FOUR && 5 * covered(4) <= 6 * covered(2) {
        Tiles::Four
    } else {
        Tiles::Two
    }
}

/// Outputs narrower than this keep F(2×2, 3×3).
const MIN_SIDE_FOUR: usize = 12;

/// One Winograd scheme F(M×M, 3×3) with input patches of A = M + 2, as its five 1-D transforms.
trait Scheme<const A: usize, const M: usize> {
    /// Bᵀ d: the input transform of A inputs.
    fn input(d: [f32; A]) -> [f32; A];
    /// Aᵀ m: M outputs from A products.
    fn output(m: [f32; A]) -> [f32; M];
    /// G g: A values from the 3 taps of a filter.
    fn filter(g: [f32; 3]) -> [f32; A];
    /// A d: the output transform's adjoint, A values from M output gradients.
    fn output_adjoint(d: [f32; M]) -> [f32; A];
    /// Gᵀ s: the filter transform's adjoint, 3 taps from A values.
    fn filter_adjoint(s: [f32; A]) -> [f32; 3];
}

/// F(2×2, 3×3): Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]],
/// G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]], Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]].
struct F2;

impl Scheme<4, 2> for F2 {
    #[inline(always)]
    fn input(d: [f32; 4]) -> [f32; 4] {
        [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]
    }
    #[inline(always)]
    fn output(m: [f32; 4]) -> [f32; 2] {
        [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
    }
    #[inline(always)]
    fn filter([a, b, d]: [f32; 3]) -> [f32; 4] {
        [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d]
    }
    #[inline(always)]
    fn output_adjoint([a, b]: [f32; 2]) -> [f32; 4] {
        [a, a + b, a - b, -b]
    }
    #[inline(always)]
    fn filter_adjoint(s: [f32; 4]) -> [f32; 3] {
        [
            s[0] + 0.5 * (s[1] + s[2]),
            0.5 * (s[1] - s[2]),
            0.5 * (s[1] + s[2]) + s[3],
        ]
    }
}

/// F(4×4, 3×3) on the points 0, ±1, ±2, ∞ (Lavin & Gray's matrices):
/// Bᵀ = [[4, 0, −5, 0, 1, 0], [0, −4, −4, 1, 1, 0], [0, 4, −4, −1, 1, 0], [0, −2, −1, 2, 1, 0],
/// [0, 2, −1, −2, 1, 0], [0, 4, 0, −5, 0, 1]],
/// G = [[¼, 0, 0], [−⅙, −⅙, −⅙], [−⅙, ⅙, −⅙], [1/24, 1/12, ⅙], [1/24, −1/12, ⅙], [0, 0, 1]],
/// Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, −1, 2, −2, 0], [0, 1, 1, 4, 4, 0], [0, 1, −1, 8, −8, 1]].
struct F4;

impl Scheme<6, 4> for F4 {
    #[inline(always)]
    fn input(d: [f32; 6]) -> [f32; 6] {
        let (p, q) = (d[4] - 4.0 * d[2], d[3] - 4.0 * d[1]);
        let (r, s) = (d[4] - d[2], 2.0 * (d[3] - d[1]));
        [
            4.0 * d[0] - 5.0 * d[2] + d[4],
            p + q,
            p - q,
            r + s,
            r - s,
            4.0 * d[1] - 5.0 * d[3] + d[5],
        ]
    }
    #[inline(always)]
    fn output(m: [f32; 6]) -> [f32; 4] {
        let (a, b) = (m[1] + m[2], m[1] - m[2]);
        let (c, d) = (m[3] + m[4], m[3] - m[4]);
        [m[0] + a + c, b + 2.0 * d, a + 4.0 * c, b + 8.0 * d + m[5]]
    }
    #[inline(always)]
    fn filter([a, b, d]: [f32; 3]) -> [f32; 6] {
        let (s, t) = (a + d, a + 4.0 * d);
        [
            a / 4.0,
            -(s + b) / 6.0,
            -(s - b) / 6.0,
            (t + 2.0 * b) / 24.0,
            (t - 2.0 * b) / 24.0,
            d,
        ]
    }
    #[inline(always)]
    fn output_adjoint([a, b, c, d]: [f32; 4]) -> [f32; 6] {
        let (e, o) = (a + c, b + d);
        let (e4, o2) = (a + 4.0 * c, 2.0 * b + 8.0 * d);
        [a, e + o, e - o, e4 + o2, e4 - o2, d]
    }
    #[inline(always)]
    fn filter_adjoint(s: [f32; 6]) -> [f32; 3] {
        let (p, m) = (s[1] + s[2], s[3] + s[4]);
        let (pd, md) = (s[2] - s[1], s[3] - s[4]);
        [
            s[0] / 4.0 - p / 6.0 + m / 24.0,
            pd / 6.0 + md / 12.0,
            -p / 6.0 + m / 6.0 + s[5],
        ]
    }
}

/// The separable 2-D transform of a square tile: `f` down each column, then along each row.
#[inline(always)]
fn sep<const I: usize, const O: usize>(x: &[[f32; I]; I], f: impl Fn([f32; I]) -> [f32; O]) -> [[f32; O]; O] {
    let mut t = [[0f32; I]; O];
    for j in 0..I {
        let col = f(std::array::from_fn(|i| x[i][j]));
        for (o, v) in col.into_iter().enumerate() {
            t[o][j] = v;
        }
    }
    std::array::from_fn(|o| f(t[o]))
}

/// U (K × C × α²): each 3×3 filter g as G g Gᵀ, filters in parallel. Product ξ reads
/// `U[ξ]` (K × C) through a strided view ([`u_view`]).
fn filters<S: Scheme<A, M>, const A: usize, const M: usize>(w: &[f32]) -> Vec<f32> {
    let mut u = vec![0f32; w.len() / 9 * A * A];
    u.par_chunks_mut(A * A).zip(w.par_chunks(9)).for_each(|(out, f)| {
        let taps: [[f32; 3]; 3] = std::array::from_fn(|i| [f[3 * i], f[3 * i + 1], f[3 * i + 2]]);
        for (i, row) in sep(&taps, S::filter).iter().enumerate() {
            out[i * A..(i + 1) * A].copy_from_slice(row);
        }
    });
    u
}

/// `U[ξ]` (K × C) of [`filters`]' layout.
fn u_view(u: &[f32], xi: usize, c: usize, a2: usize) -> Mat {
    Mat::strided(&u[xi..], c * a2, a2)
}

/// The transforms of one row of `tw` tiles from its A zero-padded input rows (`rows`, A ×
/// `padded`; tile `t` reads columns `M·t..M·t + A`): value ξ of tile `t` into
/// `out[ξ · stride + t]` (every one of those α² × tw places written).
#[inline(always)]
fn input_row<S: Scheme<A, M>, const A: usize, const M: usize>(
    rows: &[f32],
    padded: usize,
    out: &mut [MaybeUninit<f32>],
    (tw, stride): (usize, usize),
) {
    let rows: [&[f32]; A] = std::array::from_fn(|r| &rows[r * padded..r * padded + M * tw + 2]);
    let out = &mut out[..(A * A - 1) * stride + tw];
    for t in 0..tw {
        let d: [[f32; A]; A] = std::array::from_fn(|r| std::array::from_fn(|s| rows[r][M * t + s]));
        for (i, row) in sep(&d, S::input).iter().enumerate() {
            for (j, val) in row.iter().enumerate() {
                out[(i * A + j) * stride + t].write(*val);
            }
        }
    }
}

/// The inverse transforms of one row of `tw` tiles from their products (value ξ of tile `t`
/// at `m[ξ · stride + t]`), plus `bias`, into M output rows of `M·tw` columns each (`out`,
/// M × M·tw).
#[inline(always)]
fn output_row<S: Scheme<A, M>, const A: usize, const M: usize>(
    m: &[f32],
    (tw, stride): (usize, usize),
    out: &mut [f32],
    bias: f32,
) {
    let m = &m[..(A * A - 1) * stride + tw];
    let out = &mut out[..M * M * tw];
    for t in 0..tw {
        let mt: [[f32; A]; A] = std::array::from_fn(|a| std::array::from_fn(|c| m[(a * A + c) * stride + t]));
        for (a, row) in sep(&mt, S::output).iter().enumerate() {
            for (b, val) in row.iter().enumerate() {
                out[a * M * tw + M * t + b] = val + bias;
            }
        }
    }
}

/// The distance, in values, at which to place blocks of `n` values that one loop reads side by
/// side (the α² product streams of the output transform): `n` rounded up to a whole number of
/// 64-byte cache lines, and to an odd number of them. Blocks a multiple of 4 KiB apart (K × T is
/// one for K = 256, 8 images of 7 × 7 tiles) all fall in the same cache sets, and the α² = 36
/// streams then evict each other: the output transform ran 2–2.5× slower.
pub(super) fn spread(n: usize) -> usize {
    const LINE: usize = 16;
    let lines = n.div_ceil(LINE);
    (lines | 1) * LINE
}

/// Images per group for `n` images of `tiles` tiles each: about [`GROUP_TILES`] tiles,
/// balanced (the last group may be smaller), one group or a multiple of 4; and the threads each
/// group's products get (all of them when there is one group, else 1: the groups run in
/// parallel). Sizes only.
fn grouping(n: usize, tiles: usize) -> (usize, usize) {
    let want = GROUP_TILES.div_ceil(tiles).clamp(1, n);
    let mut groups = n.div_ceil(want);
    if groups > 1 {
        // a multiple of 4 (as far as the images go), so that 2 or 4 threads share the groups
        // evenly: Dieleman's 128 parts in 3 groups left one of 2 threads idle a third of the time
        groups = groups.next_multiple_of(4).min(n);
    }
    let gs = n.div_ceil(groups);
    let threads = if n.div_ceil(gs) == 1 {
        rayon::current_num_threads()
    } else {
        1
    };
    (gs, threads)
}

/// V (C × α² × T) of a group of images `xs` (each c × h × w), T = images · th · tw, channels in
/// parallel: per (channel, image, tile row) A zero-padded input rows and the transforms of the
/// row's tiles, copied per ξ. Product ξ reads `V[ξ]` (C × T) through a strided view.
fn inputs<S: Scheme<A, M>, const A: usize, const M: usize>(
    g: &Geometry,
    xs: &[f32],
    (th, tw): (usize, usize),
) -> Vec<f32> {
    let (hw, chw) = (g.h * g.w, g.c * g.h * g.w);
    let tiles = th * tw;
    let images = xs.len() / chw;
    let t_all = images * tiles;
    let pad = g.padding as isize;
    let padded = M * tw + 2;
    let n = A * A * g.c * t_all;
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(A * A * t_all)
        .enumerate()
        .for_each_init(
            || vec![0f32; A * padded],
            |rows, (c, vc)| {
                for j in 0..images {
                    let plane = &xs[j * chw + c * hw..j * chw + (c + 1) * hw];
                    for ti in 0..th {
                        for (r, row) in rows.chunks_mut(padded).enumerate() {
                            row.fill(0.0);
                            let iy = (M * ti + r) as isize - pad;
                            if iy >= 0 && iy < g.h as isize {
                                // row[q] holds input column q − padding
                                let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                                let n = g.w.min(padded.saturating_sub(g.padding));
                                row[g.padding..g.padding + n].copy_from_slice(&src[..n]);
                            }
                        }
                        let base = j * tiles + ti * tw;
                        input_row::<S, A, M>(rows, padded, &mut vc[base..], (tw, t_all));
                    }
                }
            },
        );
    // SAFETY: the channels' chunks cover all `n` values, and each chunk's images × tile rows
    // wrote each of its α² streams of `t_all` tiles once (`input_row`).
    unsafe { v.set_len(n) };
    v
}

/// y (n, k, oh, ow) = conv(x, w) + b for a geometry [`applies`] accepts (checked by the
/// caller, with the buffers' lengths), with the tiles [`pick`] chooses.
pub(super) fn forward(g: &Geometry, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    forward_in(pick(g), g, x, w, b)
}

/// [`forward`] with the given tiles.
pub(super) fn forward_in(tiles: Tiles, g: &Geometry, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    match tiles {
        Tiles::Two => forward_with::<F2, 4, 2>(g, x, w, b),
        Tiles::Four => forward_with::<F4, 6, 4>(g, x, w, b),
    }
}

fn forward_with<S: Scheme<A, M>, const A: usize, const M: usize>(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
) -> Vec<f32> {
    let (oh, ow) = (g.oh(), g.ow());
    let (th, tw) = (oh.div_ceil(M), ow.div_ceil(M));
    let tiles = th * tw;
    let (chw, kohw) = (g.c * g.h * g.w, g.k * oh * ow);
    let mut y = vec![0f32; g.n * kohw];
    if tiles == 0 || g.n == 0 {
        return y;
    }
    let u = filters::<S, A, M>(w);
    let (gs, threads) = grouping(g.n, tiles);
    y.par_chunks_mut(gs * kohw)
        .zip(x.par_chunks(gs * chw))
        .for_each(|(ys, xs)| {
            let images = xs.len() / chw;
            let t_all = images * tiles;
            let v = inputs::<S, A, M>(g, xs, (th, tw));
            // M[ξ] (K × T) = U[ξ] (K × C) · V[ξ] (C × T), the α² blocks `stride` values apart
            // (a little more than K × T: see `spread`)
            let block = g.k * t_all;
            let stride = spread(block);
            let mut m = Vec::with_capacity(A * A * stride);
            for (xi_, mx) in m.spare_capacity_mut()[..A * A * stride].chunks_mut(stride).enumerate() {
                let (mx, pad) = mx.split_at_mut(block);
                matmul_uninit(
                    (g.k, t_all, g.c),
                    mx,
                    u_view(&u, xi_, g.c, A * A),
                    Mat::strided(&v[xi_ * t_all..], A * A * t_all, 1),
                    threads,
                );
                pad.fill(MaybeUninit::new(0.0));
            }
            // SAFETY: the α² products wrote their K × T blocks and the pads after them were
            // zeroed, which covers the buffer.
            unsafe { m.set_len(A * A * stride) };
            // outputs, planes in parallel: per tile row Aᵀ M A of each tile (its α² values
            // read from the product streams), plus the bias, into M output rows
            ys.par_chunks_mut(oh * ow).enumerate().for_each_init(
                || vec![0f32; M * M * tw],
                |rows, (plane, out)| {
                    let (j, k) = (plane / g.k, plane % g.k);
                    let bias = b.map_or(0.0, |b| b[k]);
                    for ti in 0..th {
                        let base = k * t_all + j * tiles + ti * tw;
                        output_row::<S, A, M>(&m[base..], (tw, stride), rows, bias);
                        for a in 0..M {
                            let oy = M * ti + a;
                            if oy < oh {
                                out[oy * ow..(oy + 1) * ow].copy_from_slice(&rows[a * M * tw..][..ow]);
                            }
                        }
                    }
                },
            );
        });
    y
}

/// dw (k, c, 3, 3) from x (n, c, h, w) and dy (n, k, oh, ow) for a geometry [`applies`]
/// accepts (checked by the caller, with the buffers' lengths), with the tiles [`pick`] chooses:
/// with Z = A dy Aᵀ of each M×M output-gradient tile (zero past the output's edge) and V the
/// input transform, `S[ξ]` (K × C) = Σ over tiles `Z[ξ] Vᵀ[ξ]`, and dw = Gᵀ S G. The groups'
/// partial S are summed in group order, so the result does not depend on the thread count.
pub(super) fn backward_filter(g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    backward_filter_in(pick(g), g, x, dy)
}

/// [`backward_filter`] with the given tiles.
pub(super) fn backward_filter_in(tiles: Tiles, g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    match tiles {
        Tiles::Two => backward_filter_with::<F2, 4, 2>(g, x, dy),
        Tiles::Four => backward_filter_with::<F4, 6, 4>(g, x, dy),
    }
}

fn backward_filter_with<S: Scheme<A, M>, const A: usize, const M: usize>(
    g: &Geometry,
    x: &[f32],
    dy: &[f32],
) -> Vec<f32> {
    let (oh, ow) = (g.oh(), g.ow());
    let (th, tw) = (oh.div_ceil(M), ow.div_ceil(M));
    let tiles = th * tw;
    let (chw, kohw) = (g.c * g.h * g.w, g.k * oh * ow);
    let mut dw = vec![0f32; g.k * g.c * 9];
    if tiles == 0 || g.n == 0 {
        return dw;
    }
    let (gs, threads) = grouping(g.n, tiles);
    let a2 = A * A;
    let partials: Vec<Vec<f32>> = x
        .par_chunks(gs * chw)
        .zip(dy.par_chunks(gs * kohw))
        .map(|(xs, dys)| {
            let images = xs.len() / chw;
            let t_all = images * tiles;
            let v = inputs::<S, A, M>(g, xs, (th, tw));
            // Z (K × α² × T), output channels in parallel, every value written
            let mut z = Vec::with_capacity(a2 * g.k * t_all);
            z.spare_capacity_mut()[..a2 * g.k * t_all]
                .par_chunks_mut(a2 * t_all)
                .enumerate()
                .for_each(|(k, zk)| {
                    for j in 0..images {
                        let plane = &dys[j * kohw + k * oh * ow..j * kohw + (k + 1) * oh * ow];
                        for ti in 0..th {
                            for tj in 0..tw {
                                let d: [[f32; M]; M] = std::array::from_fn(|a| {
                                    std::array::from_fn(|b| {
                                        let (oy, ox) = (M * ti + a, M * tj + b);
                                        if oy < oh && ox < ow {
                                            plane[oy * ow + ox]
                                        } else {
                                            0.0
                                        }
                                    })
                                });
                                let t = j * tiles + ti * tw + tj;
                                for (i, row) in sep(&d, S::output_adjoint).iter().enumerate() {
                                    for (jj, &val) in row.iter().enumerate() {
                                        zk[(i * A + jj) * t_all + t].write(val);
                                    }
                                }
                            }
                        }
                    }
                });
            // SAFETY: each output channel's chunk got all α² values of its `t_all` tiles (the
            // images × tile rows × tiles above), and the chunks cover the buffer.
            unsafe { z.set_len(a2 * g.k * t_all) };
            // S[ξ] (K × C) = Z[ξ] (K × T) · V[ξ]ᵀ (T × C), into S (K × C × α²)
            let mut part = vec![0f32; a2 * g.k * g.c];
            for xi_ in 0..a2 {
                matmul_strided(
                    (g.k, g.c, t_all),
                    &mut part[xi_..],
                    (g.c * a2, a2),
                    false,
                    Mat::strided(&z[xi_ * t_all..], a2 * t_all, 1),
                    Mat::strided(&v[xi_ * t_all..], 1, a2 * t_all),
                    threads,
                );
            }
            part
        })
        .collect();
    let mut parts = partials.into_iter();
    let mut sum = parts.next().unwrap_or_default();
    for part in parts {
        sum.par_iter_mut().zip(part.par_iter()).for_each(|(d, p)| *d += p);
    }
    // dw = Gᵀ S G, filters in parallel
    dw.par_chunks_mut(9).zip(sum.par_chunks(a2)).for_each(|(out, sk)| {
        let s: [[f32; A]; A] = std::array::from_fn(|a| std::array::from_fn(|b| sk[a * A + b]));
        for (a, row) in sep(&s, S::filter_adjoint).iter().enumerate() {
            out[a * 3..a * 3 + 3].copy_from_slice(row);
        }
    });
    dw
}
