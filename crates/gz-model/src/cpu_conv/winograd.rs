//! Winograd F(2×2, 3×3) for 3×3, stride-1 convolutions on the CPU (Lavin & Gray 2015): each
//! 2×2 block of outputs comes from a 4×4 input patch with 16 multiplications per (input
//! channel, output channel) instead of 36, so the matrix products, which are most of the work,
//! shrink 2.25×, for the price of transforms that are linear in the data. [`forward`] serves
//! the forward pass and (with the filters flipped, by the caller) the input gradient;
//! [`backward_filter`] the filter gradient, from the same input transform.
//!
//! Layout: the filters are transformed once per call to `U` (16 × K × C); a group of images is
//! transformed to `V` (16 × C × T, T = the group's tiles), the 16 products `M[ξ] = U[ξ] · V[ξ]`
//! (K × T) run on the `gemm` kernel, and the inverse transform writes each tile's 2×2 outputs
//! (those inside the image) plus the bias. The arithmetic is f32 throughout; the values differ
//! from the direct convolution's by rounding only (the tests bound it).
//!
//! Results do not depend on the thread count: the grouping is a function of the sizes.

use rayon::prelude::*;

use super::{matmul, Geometry, Mat};

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

/// U (16 × K × C): each 3×3 filter g as G g Gᵀ, G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]].
fn filters(g: &Geometry, w: &[f32]) -> Vec<f32> {
    let (k, c) = (g.k, g.c);
    let mut u = vec![0f32; 16 * k * c];
    for kc in 0..k * c {
        let f = &w[kc * 9..kc * 9 + 9];
        // G g (4 × 3), row by row
        let mut gg = [[0f32; 3]; 4];
        for col in 0..3 {
            let (a, b, d) = (f[col], f[3 + col], f[6 + col]);
            gg[0][col] = a;
            gg[1][col] = 0.5 * (a + b + d);
            gg[2][col] = 0.5 * (a - b + d);
            gg[3][col] = d;
        }
        // (G g) Gᵀ (4 × 4)
        for (i, row) in gg.iter().enumerate() {
            let (a, b, d) = (row[0], row[1], row[2]);
            let t = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
            for (j, v) in t.into_iter().enumerate() {
                u[(i * 4 + j) * k * c + kc] = v;
            }
        }
    }
    u
}

/// Bᵀ d B of one 4×4 patch, Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]].
#[inline(always)]
fn input_tile(d: &[[f32; 4]; 4]) -> [[f32; 4]; 4] {
    let mut t = [[0f32; 4]; 4];
    for j in 0..4 {
        t[0][j] = d[0][j] - d[2][j];
        t[1][j] = d[1][j] + d[2][j];
        t[2][j] = d[2][j] - d[1][j];
        t[3][j] = d[1][j] - d[3][j];
    }
    let mut v = [[0f32; 4]; 4];
    for i in 0..4 {
        v[i][0] = t[i][0] - t[i][2];
        v[i][1] = t[i][1] + t[i][2];
        v[i][2] = t[i][2] - t[i][1];
        v[i][3] = t[i][1] - t[i][3];
    }
    v
}

/// The transforms of one row of `tw` tiles from its four zero-padded input rows (tile `t`
/// reads columns `2t..2t + 4`), into `out` (16 × tw, ξ-major).
#[inline(always)]
fn input_row(r0: &[f32], r1: &[f32], r2: &[f32], r3: &[f32], out: &mut [f32], tw: usize) {
    let (r0, r1, r2, r3) = (
        &r0[..2 * tw + 2],
        &r1[..2 * tw + 2],
        &r2[..2 * tw + 2],
        &r3[..2 * tw + 2],
    );
    let out = &mut out[..16 * tw];
    for t in 0..tw {
        let mut d = [[0f32; 4]; 4];
        for s in 0..4 {
            d[0][s] = r0[2 * t + s];
            d[1][s] = r1[2 * t + s];
            d[2][s] = r2[2 * t + s];
            d[3][s] = r3[2 * t + s];
        }
        let v = input_tile(&d);
        for (i, row) in v.iter().enumerate() {
            for (j, val) in row.iter().enumerate() {
                out[(i * 4 + j) * tw + t] = *val;
            }
        }
    }
}

/// Aᵀ m A of one 4×4 product tile, Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]].
#[inline(always)]
fn output_tile(m: &[[f32; 4]; 4]) -> [[f32; 2]; 2] {
    let mut s = [[0f32; 4]; 2];
    for j in 0..4 {
        s[0][j] = m[0][j] + m[1][j] + m[2][j];
        s[1][j] = m[1][j] - m[2][j] - m[3][j];
    }
    [
        [s[0][0] + s[0][1] + s[0][2], s[0][1] - s[0][2] - s[0][3]],
        [s[1][0] + s[1][1] + s[1][2], s[1][1] - s[1][2] - s[1][3]],
    ]
}

/// The inverse transforms of one row of `tw` tiles from their products `m` (16 × tw, ξ-major),
/// plus `bias`, into two output rows of `2·tw` columns each (`out`, 2 × 2·tw).
#[inline(always)]
fn output_row(m: &[f32], out: &mut [f32], tw: usize, bias: f32) {
    let m = &m[..16 * tw];
    let (top, bottom) = out[..4 * tw].split_at_mut(2 * tw);
    for t in 0..tw {
        let mut mt = [[0f32; 4]; 4];
        for (a, row) in mt.iter_mut().enumerate() {
            for (c, val) in row.iter_mut().enumerate() {
                *val = m[(a * 4 + c) * tw + t];
            }
        }
        let o = output_tile(&mt);
        top[2 * t] = o[0][0] + bias;
        top[2 * t + 1] = o[0][1] + bias;
        bottom[2 * t] = o[1][0] + bias;
        bottom[2 * t + 1] = o[1][1] + bias;
    }
}

/// Images per group for `n` images of `tiles` tiles each: about [`GROUP_TILES`] tiles,
/// balanced (the last group may be smaller), one group or a multiple of 4; and the threads each group's products get (all
/// of them when there is one group, else 1: the groups run in parallel). Sizes only.
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

/// V (16 × C × T) of a group of images `xs` (each c × h × w), T = images · th · tw: per
/// (image, channel, tile row) four zero-padded input rows, the transforms of the row's tiles
/// into a contiguous buffer per ξ, then one copy per ξ.
fn inputs(g: &Geometry, xs: &[f32], (th, tw): (usize, usize)) -> Vec<f32> {
    let chw = g.c * g.h * g.w;
    let tiles = th * tw;
    let t_all = xs.len() / chw * tiles;
    let pad = g.padding as isize;
    let mut v = vec![0f32; 16 * g.c * t_all];
    let padded = 2 * tw + 2;
    let mut rows = vec![0f32; 4 * padded];
    let mut tmp = vec![0f32; 16 * tw];
    for (j, xi) in xs.chunks(chw).enumerate() {
        for c in 0..g.c {
            let plane = &xi[c * g.h * g.w..(c + 1) * g.h * g.w];
            for ti in 0..th {
                for (r, row) in rows.chunks_mut(padded).enumerate() {
                    row.fill(0.0);
                    let iy = (2 * ti + r) as isize - pad;
                    if iy >= 0 && iy < g.h as isize {
                        // row[q] holds input column q − padding
                        let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                        let n = g.w.min(padded - g.padding);
                        row[g.padding..g.padding + n].copy_from_slice(&src[..n]);
                    }
                }
                let (r0, rest) = rows.split_at(padded);
                let (r1, rest) = rest.split_at(padded);
                let (r2, r3) = rest.split_at(padded);
                input_row(r0, r1, r2, r3, &mut tmp, tw);
                let base = j * tiles + ti * tw;
                for (xi_, t) in tmp.chunks(tw).enumerate() {
                    v[(xi_ * g.c + c) * t_all + base..][..tw].copy_from_slice(t);
                }
            }
        }
    }
    v
}

/// y (n, k, oh, ow) = conv(x, w) + b for a geometry [`applies`] accepts (checked by the
/// caller, with the buffers' lengths).
pub(super) fn forward(g: &Geometry, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let (oh, ow) = (g.oh(), g.ow());
    let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
    let tiles = th * tw;
    let (chw, kohw) = (g.c * g.h * g.w, g.k * oh * ow);
    let mut y = vec![0f32; g.n * kohw];
    if tiles == 0 || g.n == 0 {
        return y;
    }
    let u = filters(g, w);
    let (gs, threads) = grouping(g.n, tiles);
    y.par_chunks_mut(gs * kohw)
        .zip(x.par_chunks(gs * chw))
        .for_each(|(ys, xs)| {
            let images = xs.len() / chw;
            let t_all = images * tiles;
            let v = inputs(g, xs, (th, tw));
            // M[ξ] (K × T) = U[ξ] (K × C) · V[ξ] (C × T)
            let mut m = vec![0f32; 16 * g.k * t_all];
            for (xi_, mx) in m.chunks_mut(g.k * t_all).enumerate() {
                let uk = &u[xi_ * g.k * g.c..(xi_ + 1) * g.k * g.c];
                let vx = &v[xi_ * g.c * t_all..(xi_ + 1) * g.c * t_all];
                matmul(
                    (g.k, t_all, g.c),
                    mx,
                    false,
                    Mat::rows(uk, g.c),
                    Mat::rows(vx, t_all),
                    threads,
                );
            }
            // outputs: per (image, channel, tile row), the row's 16 product streams copied together,
            // Aᵀ M A of each tile, plus the bias, into two output rows
            let stride = g.k * t_all;
            let mut tmp = vec![0f32; 16 * tw];
            let mut two = vec![0f32; 2 * 2 * tw];
            for (j, yi) in ys.chunks_mut(kohw).enumerate() {
                for k in 0..g.k {
                    let bias = b.map_or(0.0, |b| b[k]);
                    let out = &mut yi[k * oh * ow..(k + 1) * oh * ow];
                    for ti in 0..th {
                        let base = k * t_all + j * tiles + ti * tw;
                        for (xi_, t) in tmp.chunks_mut(tw).enumerate() {
                            t.copy_from_slice(&m[xi_ * stride + base..][..tw]);
                        }
                        output_row(&tmp, &mut two, tw, bias);
                        for a in 0..2 {
                            let oy = 2 * ti + a;
                            if oy < oh {
                                out[oy * ow..(oy + 1) * ow].copy_from_slice(&two[a * 2 * tw..][..ow]);
                            }
                        }
                    }
                }
            }
        });
    y
}

/// dw (k, c, 3, 3) from x (n, c, h, w) and dy (n, k, oh, ow) for a geometry [`applies`]
/// accepts (checked by the caller, with the buffers' lengths): with Z = A dy Aᵀ of each 2×2
/// output-gradient tile (zero past the output's edge) and V the input transform,
/// `S[ξ]` (K × C) = Σ over tiles `Z[ξ] Vᵀ[ξ]`, and dw = Gᵀ S G. The groups' partial S are summed in
/// group order, so the result does not depend on the thread count.
pub(super) fn backward_filter(g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (oh, ow) = (g.oh(), g.ow());
    let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
    let tiles = th * tw;
    let (chw, kohw) = (g.c * g.h * g.w, g.k * oh * ow);
    let mut dw = vec![0f32; g.k * g.c * 9];
    if tiles == 0 || g.n == 0 {
        return dw;
    }
    let (gs, threads) = grouping(g.n, tiles);
    let partials: Vec<Vec<f32>> = x
        .par_chunks(gs * chw)
        .zip(dy.par_chunks(gs * kohw))
        .map(|(xs, dys)| {
            let t_all = xs.len() / chw * tiles;
            let v = inputs(g, xs, (th, tw));
            // Z (16 × K × T)
            let mut z = vec![0f32; 16 * g.k * t_all];
            for (j, dyi) in dys.chunks(kohw).enumerate() {
                for k in 0..g.k {
                    let plane = &dyi[k * oh * ow..(k + 1) * oh * ow];
                    for ti in 0..th {
                        for tj in 0..tw {
                            let at = |a: usize, b: usize| {
                                let (oy, ox) = (2 * ti + a, 2 * tj + b);
                                if oy < oh && ox < ow {
                                    plane[oy * ow + ox]
                                } else {
                                    0.0
                                }
                            };
                            // A d (4 × 2), A = [[1, 0], [1, 1], [1, −1], [0, −1]], then · Aᵀ
                            let (d00, d01, d10, d11) = (at(0, 0), at(0, 1), at(1, 0), at(1, 1));
                            let ad = [[d00, d01], [d00 + d10, d01 + d11], [d00 - d10, d01 - d11], [-d10, -d11]];
                            let t = k * t_all + j * tiles + ti * tw + tj;
                            for (i, [a, b]) in ad.into_iter().enumerate() {
                                for (jj, val) in [a, a + b, a - b, -b].into_iter().enumerate() {
                                    z[(i * 4 + jj) * g.k * t_all + t] = val;
                                }
                            }
                        }
                    }
                }
            }
            // S[ξ] (K × C) = Z[ξ] (K × T) · V[ξ]ᵀ (T × C)
            let mut part = vec![0f32; 16 * g.k * g.c];
            for (xi_, sx) in part.chunks_mut(g.k * g.c).enumerate() {
                let zx = &z[xi_ * g.k * t_all..(xi_ + 1) * g.k * t_all];
                let vx = &v[xi_ * g.c * t_all..(xi_ + 1) * g.c * t_all];
                matmul(
                    (g.k, g.c, t_all),
                    sx,
                    false,
                    Mat::rows(zx, t_all),
                    Mat::transposed(vx, t_all),
                    threads,
                );
            }
            part
        })
        .collect();
    let mut sum = vec![0f32; 16 * g.k * g.c];
    for part in partials {
        for (d, p) in sum.iter_mut().zip(part) {
            *d += p;
        }
    }
    // dw = Gᵀ S G, Gᵀ = [[1, ½, ½, 0], [0, ½, −½, 0], [0, ½, ½, 1]]
    let kc = g.k * g.c;
    for (i, out) in dw.chunks_mut(9).enumerate() {
        let s = |a: usize, b: usize| sum[(a * 4 + b) * kc + i];
        let r: [[f32; 4]; 3] = [
            std::array::from_fn(|b| s(0, b) + 0.5 * (s(1, b) + s(2, b))),
            std::array::from_fn(|b| 0.5 * (s(1, b) - s(2, b))),
            std::array::from_fn(|b| 0.5 * (s(1, b) + s(2, b)) + s(3, b)),
        ];
        for (a, row) in r.iter().enumerate() {
            out[a * 3] = row[0] + 0.5 * (row[1] + row[2]);
            out[a * 3 + 1] = 0.5 * (row[1] - row[2]);
            out[a * 3 + 2] = 0.5 * (row[1] + row[2]) + row[3];
        }
    }
    dw
}
