//! gz's own f32 convolution on the CPU: im2col / col2im around one matrix product per image
//! (the `gemm` crate, the kernel candle's own CPU matmul uses), for the forward pass and both
//! gradients. candle 0.11.1's CPU `conv2d` already runs im2col + matmul, but its
//! `conv_transpose2d` (the input gradient) is a direct loop and its filter gradient, written as
//! a convolution of the transposed input by the transposed output gradient, is im2col with the
//! batch as channels; on the nets' layer shapes this is 2–3× faster forward, 3–9× for the
//! input gradient and 2–9× for the filter gradient (`docs/benchmarks.md`).
//!
//! Used by the convolution ops' CPU paths ([`crate::cudnn`]'s custom ops, which the nets use
//! when training on the CPU) and by [`crate::ops::Conv2d`] in CPU inference, for f32 NCHW data;
//! other dtypes (f64 in the gradient checks) keep candle's kernels, and [`set_enabled`]`(false)`
//! (`GZ_CPU_CONV=candle` in `gz`) puts candle's back everywhere, for comparisons.
//!
//! 3×3 stride-1 layers with at least 16 channels in and out and outputs of at least 7×7 run
//! their forward pass, their input gradient (the forward convolution of the output gradient
//! with the filters flipped) and their filter gradient as Winograd instead (`winograd`):
//! F(4×4, 3×3) (4× fewer multiplications) on outputs of at least 12×12 that 4×4 tiles cover
//! without much waste, F(2×2, 3×3) (2.25× fewer) on the others ([`set_winograd`]`(false)`,
//! `GZ_CPU_WINOGRAD=0` in `gz`, turns Winograd off; [`set_winograd_large_tiles`]`(false)`,
//! `GZ_CPU_WINOGRAD=2`, keeps the small tiles everywhere).
//!
//! "Valid" stride-1 layers with at most 8 output channels and filters of at least 3×3
//! (Dieleman's image layer in `dieleman-tiny`: 3 → 8 channels, 6×6 on 45×45 parts) run their
//! forward pass and filter gradient as direct loops instead (`direct`, AVX2 + FMA where the CPU
//! has them): there the product is 8 rows tall, half of `gemm`'s tiles, after an im2col that
//! copies each part 36 times ([`set_direct`]`(false)`, `GZ_CPU_DIRECT=0` in `gz`, keeps
//! im2col). Their input gradient is not needed (the image) and stays im2col.
//!
//! Results do not depend on the number of threads: images are independent in the forward pass
//! and the input gradient (Winograd groups images by their sizes alone), and the filter gradient
//! sums per-chunk partials in a fixed order (chunks of the batch fixed by the sizes alone; small
//! outputs put several images side by side in one product).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

mod direct;
mod winograd;

static ENABLED: AtomicBool = AtomicBool::new(true);
static WINOGRAD: AtomicBool = AtomicBool::new(true);
static DIRECT: AtomicBool = AtomicBool::new(true);

/// Lets "valid" stride-1 layers with few output channels (Dieleman's image layer) run the
/// direct kernels (`direct`, the default) instead of im2col + product (`GZ_CPU_DIRECT=0` in
/// `gz`), for comparisons.
pub fn set_direct(on: bool) {
    DIRECT.store(on, Ordering::Relaxed);
}

fn direct_applies(g: &Geometry) -> bool {
    DIRECT.load(Ordering::Relaxed) && direct::applies(g)
}

/// Lets 3×3 stride-1 forward passes with enough channels run Winograd (the default,
/// `winograd`) instead of im2col + product (`GZ_CPU_WINOGRAD=0` in `gz`).
pub fn set_winograd(on: bool) {
    WINOGRAD.store(on, Ordering::Relaxed);
}

/// Lets Winograd use F(4×4, 3×3) on the layers where it pays (the default); `false` keeps
/// F(2×2, 3×3) on every layer (`GZ_CPU_WINOGRAD=2` in `gz`), for comparisons.
pub fn set_winograd_large_tiles(on: bool) {
    winograd::set_large_tiles(on);
}

/// Switches gz's CPU convolution on (the default) or off (candle's kernels, for comparisons).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether [`set_enabled`] allows gz's CPU convolution.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Filter-gradient partials per batch: the chunks are fixed by the batch size only, so the
/// summation order (and the result, to the bit) is the same on any number of threads.
const FILTER_PARTIALS: usize = 8;

/// The output positions one product of the gradients should cover: where one image's output
/// is smaller, [`backward_data`] (product width) and [`backward_filter`] (product depth) put
/// several images side by side until it does.
const PRODUCT_WIDTH: usize = 256;

/// One convolution's sizes: input (n, c, h, w), filters (k, c, kh, kw), square padding and
/// stride, no dilation, no groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub kh: usize,
    pub kw: usize,
    pub padding: usize,
    pub stride: usize,
}

impl Geometry {
    fn oh(&self) -> usize {
        (self.h + 2 * self.padding - self.kh) / self.stride + 1
    }

    fn ow(&self) -> usize {
        (self.w + 2 * self.padding - self.kw) / self.stride + 1
    }

    /// Rows of the im2col matrix: one per (channel, kernel row, kernel column).
    fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }

    fn check(&self) -> Result<()> {
        if self.c == 0 || self.k == 0 || self.h == 0 || self.w == 0 {
            candle_core::bail!("cpu convolution: empty channels or image in {self:?}");
        }
        let padded = |side: usize| self.padding.checked_mul(2).and_then(|p| p.checked_add(side));
        let (Some(ph), Some(pw)) = (padded(self.h), padded(self.w)) else {
            candle_core::bail!("cpu convolution: padding {} is too large", self.padding);
        };
        if self.stride == 0 || self.kh == 0 || self.kw == 0 || ph < self.kh || pw < self.kw {
            candle_core::bail!("cpu convolution: kernel {}×{} does not fit {self:?}", self.kh, self.kw);
        }
        Ok(())
    }

    /// Checks the geometry and that an output gradient of `(oh, ow)` belongs to it.
    fn check_output(&self, (oh, ow): (usize, usize)) -> Result<()> {
        self.check()?;
        if (self.oh(), self.ow()) != (oh, ow) {
            candle_core::bail!(
                "cpu convolution: output gradient is {oh}×{ow}, {self:?} gives {}×{}",
                self.oh(),
                self.ow()
            );
        }
        Ok(())
    }

    /// Output columns `ox` whose input column `ox·stride + kj − padding` lies inside the image.
    fn valid_cols(&self, kj: usize) -> (usize, usize) {
        valid(self.ow(), self.w, kj, self.padding, self.stride)
    }

    fn valid_rows(&self, ki: usize) -> (usize, usize) {
        valid(self.oh(), self.h, ki, self.padding, self.stride)
    }

    /// A 1×1 convolution with stride 1 and no padding: the image is its own im2col matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }
}

/// The range of output positions `o` in `0..out` with `o·stride + k − pad` in `0..size`.
fn valid(out: usize, size: usize, k: usize, pad: usize, stride: usize) -> (usize, usize) {
    let lo = pad.saturating_sub(k).div_ceil(stride);
    // o·stride + k − pad < size  ⇔  o·stride < size + pad − k
    let hi = (size + pad).saturating_sub(k).div_ceil(stride).min(out);
    (lo.min(hi), hi)
}

/// Writes image `x` (c, h, w) as the (c·kh·kw, oh·ow) matrix of its receptive fields.
fn im2col(g: &Geometry, x: &[f32], cols: &mut [f32]) {
    let (oh, ow) = (g.oh(), g.ow());
    let ohw = oh * ow;
    for c in 0..g.c {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            let (y0, y1) = g.valid_rows(ki);
            for kj in 0..g.kw {
                let (x0, x1) = g.valid_cols(kj);
                let row = &mut cols[((c * g.kh + ki) * g.kw + kj) * ohw..][..ohw];
                row[..y0 * ow].fill(0.0);
                row[y1 * ow..].fill(0.0);
                for oy in y0..y1 {
                    let iy = oy * g.stride + ki - g.padding;
                    let src = &plane[iy * g.w..(iy + 1) * g.w];
                    let dst = &mut row[oy * ow..(oy + 1) * ow];
                    dst[..x0].fill(0.0);
                    dst[x1..].fill(0.0);
                    if x1 > x0 {
                        let ix0 = x0 * g.stride + kj - g.padding;
                        if g.stride == 1 {
                            dst[x0..x1].copy_from_slice(&src[ix0..ix0 + (x1 - x0)]);
                        } else {
                            for (d, s) in dst[x0..x1].iter_mut().zip(src[ix0..].iter().step_by(g.stride)) {
                                *d = *s;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Adds the (c·kh·kw, oh·ow) matrix `cols` back into image `dx` (c, h, w), which it first zeroes:
/// the adjoint of [`im2col`].
fn col2im(g: &Geometry, cols: &[f32], dx: &mut [f32]) {
    let (oh, ow) = (g.oh(), g.ow());
    let ohw = oh * ow;
    dx.fill(0.0);
    for c in 0..g.c {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            let (y0, y1) = g.valid_rows(ki);
            for kj in 0..g.kw {
                let (x0, x1) = g.valid_cols(kj);
                if x1 <= x0 {
                    continue;
                }
                let row = &cols[((c * g.kh + ki) * g.kw + kj) * ohw..][..ohw];
                for oy in y0..y1 {
                    let iy = oy * g.stride + ki - g.padding;
                    let dst = &mut plane[iy * g.w..(iy + 1) * g.w];
                    let src = &row[oy * ow + x0..oy * ow + x1];
                    let ix0 = x0 * g.stride + kj - g.padding;
                    if g.stride == 1 {
                        for (d, s) in dst[ix0..ix0 + src.len()].iter_mut().zip(src) {
                            *d += *s;
                        }
                    } else {
                        for (d, s) in dst[ix0..].iter_mut().step_by(g.stride).zip(src) {
                            *d += *s;
                        }
                    }
                }
            }
        }
    }
}

/// A matrix view of a slice: `rs` elements between rows, `cs` between columns.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    ptr: *const f32,
    len: usize,
    rs: usize,
    cs: usize,
}

impl Mat {
    /// The slice as a row-major matrix with `cols` columns.
    pub(crate) fn rows(s: &[f32], cols: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            len: s.len(),
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of the slice read as a row-major matrix with `cols` columns.
    pub(crate) fn transposed(s: &[f32], cols: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            len: s.len(),
            rs: 1,
            cs: cols,
        }
    }

    /// The slice as a matrix whose element (i, j) is at `i · rs + j · cs`.
    pub(crate) fn strided(s: &[f32], rs: usize, cs: usize) -> Self {
        Self {
            ptr: s.as_ptr(),
            len: s.len(),
            rs,
            cs,
        }
    }

    /// Whether a `rows × cols` matrix read through this view stays inside the slice.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.len
    }
}

/// `dst (m × n, row-major) (+)= a (m × k) · b (k × n)`; `accumulate` adds to `dst`.
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    a: Mat,
    b: Mat,
    threads: usize,
) {
    matmul_strided((m, n, k), dst, (n, 1), accumulate, a, b, threads)
}

/// `dst (m × n, rows of n) = a · b` into uninitialised memory: every element written, none
/// read (the product does not read `dst` unless accumulating).
pub(crate) fn matmul_uninit(
    (m, n, k): (usize, usize, usize),
    dst: &mut [std::mem::MaybeUninit<f32>],
    a: Mat,
    b: Mat,
    threads: usize,
) {
    if k == 0 {
        // nothing to multiply: the product is zero (gemm would not write it)
        dst[..m * n].fill(std::mem::MaybeUninit::new(0.0));
        return;
    }
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout; without accumulation gemm only writes
    // `dst`, each of its m × n elements.
    unsafe {
        gemm_into(
            (m, n, k),
            dst.as_mut_ptr().cast(),
            dst.len(),
            (n, 1),
            false,
            a,
            b,
            threads,
        )
    }
}

/// [`matmul`] into a `dst` whose element (i, j) is at `i · rs + j · cs`.
pub(crate) fn matmul_strided(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    strides: (usize, usize),
    accumulate: bool,
    a: Mat,
    b: Mat,
    threads: usize,
) {
    // SAFETY: `dst` is initialised memory of `dst.len()` values.
    unsafe { gemm_into(dims, dst.as_mut_ptr(), dst.len(), strides, accumulate, a, b, threads) }
}

/// The product into `dst_len` values at `dst`, element (i, j) at `i · rs + j · cs`.
///
/// # Safety
/// `dst` is valid for writes of `dst_len` values, and initialised when `accumulate`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_len: usize,
    (rs, cs): (usize, usize),
    accumulate: bool,
    a: Mat,
    b: Mat,
    threads: usize,
) {
    let dst_fits = m == 0 || n == 0 || (m - 1) * rs + (n - 1) * cs < dst_len;
    assert!(
        dst_fits && a.covers(m, k) && b.covers(k, n),
        "cpu convolution: a {m}×{k} · {k}×{n} product outside its buffers"
    );
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every element gemm reads through `a` (m × k) and `b` (k × n) lies inside their
    // slices, and every element of `dst` (m × n at the given strides) inside its `dst_len`
    // values (asserted above; the strides fit isize because the lengths do); gemm reads `dst`
    // only when accumulating (then initialised, the caller's contract).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            cs as isize,
            rs as isize,
            accumulate,
            a.ptr,
            a.cs as isize,
            a.rs as isize,
            b.ptr,
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Threads for one image's product: all of them when there is one image, else 1 (the images run
/// in parallel).
fn inner_threads(n: usize) -> usize {
    if n == 1 {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// y (n, k, oh, ow) = conv(x (n, c, h, w), w (k, c, kh, kw)) + b (k).
pub(crate) fn forward(g: &Geometry, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Result<Vec<f32>> {
    g.check()?;
    let (ckk, chw) = (g.ckk(), g.c * g.h * g.w);
    check_len("x", x, g.n * chw)?;
    check_len("w", w, g.k * ckk)?;
    if let Some(b) = b {
        check_len("b", b, g.k)?;
    }
    if WINOGRAD.load(Ordering::Relaxed) && winograd::applies(g) {
        return Ok(winograd::forward(g, x, w, b));
    }
    if direct_applies(g) {
        return Ok(direct::forward(g, x, w, b));
    }
    Ok(forward_im2col(g, x, w, b))
}

/// [`forward`] by im2col + one product per image (lengths checked by the caller).
fn forward_im2col(g: &Geometry, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let (ohw, ckk, chw) = (g.oh() * g.ow(), g.ckk(), g.c * g.h * g.w);
    let mut y = vec![0f32; g.n * g.k * ohw];
    if ohw == 0 || g.n == 0 {
        return y;
    }
    let threads = inner_threads(g.n);
    let scratch = if g.pointwise() { 0 } else { ckk * ohw };
    y.par_chunks_mut(g.k * ohw).zip(x.par_chunks(chw)).for_each_init(
        || vec![0f32; scratch],
        |cols, (yi, xi)| {
            if let Some(b) = b {
                for (row, &bk) in yi.chunks_mut(ohw).zip(b) {
                    row.fill(bk);
                }
            }
            let cols: &[f32] = if g.pointwise() {
                xi
            } else {
                im2col(g, xi, cols);
                cols
            };
            matmul(
                (g.k, ohw, ckk),
                yi,
                b.is_some(),
                Mat::rows(w, ckk),
                Mat::rows(cols, ohw),
                threads,
            );
        },
    );
    y
}

/// dx (n, c, h, w) from dy (n, k, oh, ow) and w (k, c, kh, kw); input positions no output
/// reads (the last rows and columns a stride skips) get 0.
pub(crate) fn backward_data(g: &Geometry, dy: &[f32], w: &[f32]) -> Result<Vec<f32>> {
    g.check()?;
    let (ohw, ckk, chw) = (g.oh() * g.ow(), g.ckk(), g.c * g.h * g.w);
    check_len("dy", dy, g.n * g.k * ohw)?;
    check_len("w", w, g.k * ckk)?;
    // a 3×3 stride-1 input gradient is the forward convolution of dy with the filters flipped
    // and transposed, padding 2 − p: Winograd when it applies
    let flipped = Geometry {
        n: g.n,
        c: g.k,
        h: g.oh(),
        w: g.ow(),
        k: g.c,
        kh: 3,
        kw: 3,
        padding: 2usize.wrapping_sub(g.padding),
        stride: 1,
    };
    let three_by_three = g.kh == 3 && g.kw == 3 && g.stride == 1 && g.padding <= 2;
    if WINOGRAD.load(Ordering::Relaxed) && three_by_three && winograd::applies(&flipped) {
        let mut wf = vec![0f32; w.len()];
        for k in 0..g.k {
            for c in 0..g.c {
                for i in 0..9 {
                    wf[(c * g.k + k) * 9 + i] = w[(k * g.c + c) * 9 + 8 - i];
                }
            }
        }
        return Ok(winograd::forward(&flipped, dy, &wf, None));
    }
    let mut dx = vec![0f32; g.n * chw];
    if ohw == 0 || g.n == 0 {
        return Ok(dx);
    }
    // small outputs: several images side by side in one product (width `side · ohw`), as in
    // the filter gradient; the groups are fixed by the sizes alone
    let side = PRODUCT_WIDTH.div_ceil(ohw).clamp(1, g.n);
    if side > 1 && !g.pointwise() {
        let threads = inner_threads(g.n.div_ceil(side));
        dx.par_chunks_mut(side * chw)
            .zip(dy.par_chunks(side * g.k * ohw))
            .for_each(|(dxs, dys)| {
                let m = dys.len() / (g.k * ohw);
                // dy (k × m·ohw), then cols (ckk × m·ohw) = wᵀ (ckk × k) · dy
                let mut wide_dy = vec![0f32; g.k * m * ohw];
                for (q, dyi) in dys.chunks(g.k * ohw).enumerate() {
                    put_columns(&mut wide_dy, (m, q), dyi, ohw);
                }
                let mut wide = vec![0f32; ckk * m * ohw];
                let wt = Mat::transposed(w, ckk);
                matmul(
                    (ckk, m * ohw, g.k),
                    &mut wide,
                    false,
                    wt,
                    Mat::rows(&wide_dy, m * ohw),
                    threads,
                );
                let mut cols = vec![0f32; ckk * ohw];
                for (q, dxi) in dxs.chunks_mut(chw).enumerate() {
                    take_columns(&mut cols, &wide, (m, q), ohw);
                    col2im(g, &cols, dxi);
                }
            });
        return Ok(dx);
    }
    let threads = inner_threads(g.n);
    dx.par_chunks_mut(chw).zip(dy.par_chunks(g.k * ohw)).for_each_init(
        || vec![0f32; if g.pointwise() { 0 } else { ckk * ohw }],
        |cols, (dxi, dyi)| {
            // cols (ckk × ohw) = wᵀ (ckk × k) · dy_i (k × ohw)
            let wt = Mat::transposed(w, ckk);
            if g.pointwise() {
                matmul((ckk, ohw, g.k), dxi, false, wt, Mat::rows(dyi, ohw), threads);
            } else {
                matmul((ckk, ohw, g.k), cols, false, wt, Mat::rows(dyi, ohw), threads);
                col2im(g, cols, dxi);
            }
        },
    );
    Ok(dx)
}

/// dw (k, c, kh, kw) from x (n, c, h, w) and dy (n, k, oh, ow): Σ over images of
/// dy_i (k × oh·ow) · im2col(x_i)ᵀ, summed in fixed chunks of the batch.
pub(crate) fn backward_filter(g: &Geometry, x: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
    g.check()?;
    let (ohw, chw) = (g.oh() * g.ow(), g.c * g.h * g.w);
    check_len("x", x, g.n * chw)?;
    check_len("dy", dy, g.n * g.k * ohw)?;
    if WINOGRAD.load(Ordering::Relaxed) && winograd::applies(g) {
        return Ok(winograd::backward_filter(g, x, dy));
    }
    if direct_applies(g) {
        return Ok(direct::backward_filter(g, x, dy));
    }
    Ok(backward_filter_im2col(g, x, dy))
}

/// [`backward_filter`] by im2col + products (lengths checked by the caller).
fn backward_filter_im2col(g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (ohw, ckk, chw) = (g.oh() * g.ow(), g.ckk(), g.c * g.h * g.w);
    let mut dw = vec![0f32; g.k * ckk];
    if ohw == 0 || g.n == 0 {
        return dw;
    }
    // chunks of the batch fixed by the sizes alone; small outputs put several images side by
    // side in one product (depth `side · ohw` instead of `ohw`: VGG16-blog's 6×6 and Dieleman's
    // 6×6 and 4×4 layers otherwise multiply with a depth of 36 or 16)
    let side = PRODUCT_WIDTH.div_ceil(ohw).clamp(1, g.n);
    let per = g.n.div_ceil(FILTER_PARTIALS).max(side);
    let chunks = g.n.div_ceil(per);
    let threads = inner_threads(chunks);
    let partials: Vec<Vec<f32>> = (0..chunks)
        .into_par_iter()
        .map(|chunk| {
            let mut part = vec![0f32; g.k * ckk];
            let images = chunk * per..((chunk + 1) * per).min(g.n);
            if side > 1 && !g.pointwise() {
                // cols (ckk × m·ohw) and dy (k × m·ohw) of up to `side` images side by side
                let mut cols = vec![0f32; ckk * ohw];
                let mut wide = vec![0f32; ckk * side * ohw];
                let mut dys = vec![0f32; g.k * side * ohw];
                for (j, group) in images.collect::<Vec<_>>().chunks(side).enumerate() {
                    let m = group.len();
                    for (q, &i) in group.iter().enumerate() {
                        im2col(g, &x[i * chw..(i + 1) * chw], &mut cols);
                        put_columns(&mut wide, (m, q), &cols, ohw);
                        put_columns(&mut dys, (m, q), &dy[i * g.k * ohw..(i + 1) * g.k * ohw], ohw);
                    }
                    // part (k × ckk) += dy (k × m·ohw) · colsᵀ (m·ohw × ckk)
                    matmul(
                        (g.k, ckk, m * ohw),
                        &mut part,
                        j > 0,
                        Mat::rows(&dys[..g.k * m * ohw], m * ohw),
                        Mat::transposed(&wide[..ckk * m * ohw], m * ohw),
                        threads,
                    );
                }
                return part;
            }
            let mut cols = vec![0f32; if g.pointwise() { 0 } else { ckk * ohw }];
            for (j, i) in images.enumerate() {
                let xi = &x[i * chw..(i + 1) * chw];
                let colsi: &[f32] = if g.pointwise() {
                    xi
                } else {
                    im2col(g, xi, &mut cols);
                    &cols
                };
                // part (k × ckk) += dy_i (k × ohw) · colsᵀ (ohw × ckk)
                let dyi = &dy[i * g.k * ohw..(i + 1) * g.k * ohw];
                matmul(
                    (g.k, ckk, ohw),
                    &mut part,
                    j > 0,
                    Mat::rows(dyi, ohw),
                    Mat::transposed(colsi, ohw),
                    threads,
                );
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

/// Copies `block` (rows × `width`, row-major) into the `q`-th of the `m` column blocks of `wide`
/// (rows × m·width): images side by side in one product.
fn put_columns(wide: &mut [f32], (m, q): (usize, usize), block: &[f32], width: usize) {
    for (r, row) in block.chunks(width).enumerate() {
        wide[(r * m + q) * width..][..width].copy_from_slice(row);
    }
}

/// The reverse of [`put_columns`]: the `q`-th column block of `wide` into `block`.
fn take_columns(block: &mut [f32], wide: &[f32], (m, q): (usize, usize), width: usize) {
    for (r, row) in block.chunks_mut(width).enumerate() {
        row.copy_from_slice(&wide[(r * m + q) * width..][..width]);
    }
}

fn check_len(what: &str, s: &[f32], want: usize) -> Result<()> {
    if s.len() != want {
        candle_core::bail!("cpu convolution: {what} has {} values, expected {want}", s.len());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tensor entry points: `None` where gz's kernel does not apply (not f32, not on the CPU, or
// switched off), so the caller runs candle's.

fn applies(ts: &[&Tensor]) -> bool {
    enabled() && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

fn geometry(
    x: (usize, usize, usize, usize),
    w: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Geometry> {
    let (n, c, h, wd) = x;
    let (k, wc, kh, kw) = w;
    if wc != c {
        candle_core::bail!("cpu convolution: input has {c} channels, the filters {wc}");
    }
    Ok(Geometry {
        n,
        c,
        h,
        w: wd,
        k,
        kh,
        kw,
        padding,
        stride,
    })
}

/// Runs a storage entry point on (contiguous) CPU tensors and returns its result as a tensor.
fn on_tensors(
    ts: &[&Tensor],
    f: impl FnOnce(&[(&CpuStorage, &Layout)]) -> Result<Option<(CpuStorage, Shape)>>,
) -> Result<Option<Tensor>> {
    if !applies(ts) {
        return Ok(None);
    }
    let ts: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let locked: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(locked.len());
    for (storage, layout) in &locked {
        match &**storage {
            Storage::Cpu(s) => views.push((s, *layout)),
            _ => return Ok(None),
        }
    }
    match f(&views)? {
        Some((CpuStorage::F32(v), shape)) => Ok(Some(Tensor::from_vec(v, shape, &Device::Cpu)?)),
        Some((other, _)) => candle_core::bail!("cpu convolution: {:?} result", other.dtype()),
        None => Ok(None),
    }
}

/// `conv2d(x, w) (+ b)` (NCHW, f32, CPU), with no autograd: for the ops' forward passes and
/// inference.
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Option<Tensor>> {
    let ts: Vec<&Tensor> = [x, w].into_iter().chain(b).collect();
    on_tensors(&ts, |v| forward_storage(v[0], v[1], v.get(2).copied(), padding, stride))
}

/// The input gradient of `conv2d` for an input of spatial size `x_hw`.
pub(crate) fn conv2d_backward_data(
    dy: &Tensor,
    w: &Tensor,
    x_hw: (usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Option<Tensor>> {
    on_tensors(&[dy, w], |v| backward_data_storage(v[0], v[1], x_hw, padding, stride))
}

/// The filter gradient of `conv2d` for filters of spatial size `k_hw`.
pub(crate) fn conv2d_backward_filter(
    x: &Tensor,
    dy: &Tensor,
    k_hw: (usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Option<Tensor>> {
    on_tensors(&[x, dy], |v| backward_filter_storage(v[0], v[1], k_hw, padding, stride))
}

// Storage entry points for the custom ops' CPU paths: the op's own buffers, read in place (no
// tensor copies); `None` where the kernel does not apply (not f32, a strided view, switched off).

/// The f32 values of a contiguous view of a CPU storage.
pub(crate) fn f32_view<'a>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => l.contiguous_offsets().and_then(|(a, b)| v.get(a..b)),
        _ => None,
    }
}

/// [`forward`] on an op's storages: x (n, c, h, w), w (k, c, kh, kw), optional b (k).
pub(crate) fn forward_storage(
    (xs, xl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
    b: Option<(&CpuStorage, &Layout)>,
    padding: usize,
    stride: usize,
) -> Result<Option<(CpuStorage, Shape)>> {
    let (Some(x), Some(w)) = (f32_view(xs, xl), f32_view(ws, wl)) else {
        return Ok(None);
    };
    let bias = match b {
        Some((bs, bl)) => match f32_view(bs, bl) {
            Some(b) => Some(b),
            None => return Ok(None),
        },
        None => None,
    };
    if !enabled() {
        return Ok(None);
    }
    let g = geometry(xl.shape().dims4()?, wl.shape().dims4()?, padding, stride)?;
    g.check()?;
    let y = forward(&g, x, w, bias)?;
    Ok(Some((CpuStorage::F32(y), Shape::from((g.n, g.k, g.oh(), g.ow())))))
}

/// [`backward_data`] on an op's storages: dy (n, k, oh, ow), w (k, c, kh, kw), for an input of
/// spatial size `x_hw`.
pub(crate) fn backward_data_storage(
    (dys, dyl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
    x_hw: (usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Option<(CpuStorage, Shape)>> {
    let (Some(dy), Some(w)) = (f32_view(dys, dyl), f32_view(ws, wl)) else {
        return Ok(None);
    };
    if !enabled() {
        return Ok(None);
    }
    let (n, k, oh, ow) = dyl.shape().dims4()?;
    let (wk, c, kh, kw) = wl.shape().dims4()?;
    if wk != k {
        candle_core::bail!("cpu convolution: output gradient has {k} channels, the filters {wk}");
    }
    let g = geometry((n, c, x_hw.0, x_hw.1), (k, c, kh, kw), padding, stride)?;
    g.check_output((oh, ow))?;
    let dx = backward_data(&g, dy, w)?;
    Ok(Some((CpuStorage::F32(dx), Shape::from((n, c, g.h, g.w)))))
}

/// [`backward_filter`] on an op's storages: x (n, c, h, w), dy (n, k, oh, ow), for filters of
/// spatial size `k_hw`.
pub(crate) fn backward_filter_storage(
    (xs, xl): (&CpuStorage, &Layout),
    (dys, dyl): (&CpuStorage, &Layout),
    k_hw: (usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Option<(CpuStorage, Shape)>> {
    let (Some(x), Some(dy)) = (f32_view(xs, xl), f32_view(dys, dyl)) else {
        return Ok(None);
    };
    if !enabled() {
        return Ok(None);
    }
    let (n, k, oh, ow) = dyl.shape().dims4()?;
    let (xn, c, ..) = xl.shape().dims4()?;
    if xn != n {
        candle_core::bail!("cpu convolution: {xn} inputs, {n} output gradients");
    }
    let g = geometry(xl.shape().dims4()?, (k, c, k_hw.0, k_hw.1), padding, stride)?;
    g.check_output((oh, ow))?;
    let dw = backward_filter(&g, x, dy)?;
    Ok(Some((CpuStorage::F32(dw), Shape::from((k, c, k_hw.0, k_hw.1)))))
}

#[cfg(test)]
mod tests;
